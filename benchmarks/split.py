#!/usr/bin/env python3
"""Split: a task's stdout of N lines split into N items (issue 15, ``split="lines"``).

One process (image flowd/busybox, a fresh container) prints N lines of 8
bytes (``seq 10000000 ...``: line k is ``10000000 + k``) with
``<output channel="lines" from="stdout" split="lines"/>``; nothing consumes
``lines``, so the run ends when the task commits. A real daemon runs it, as
the system user flowd-test (like the tests and systemd/flowd.service: its own
spool, UMask 0027). In the same run:

- **wall**: ``flowctl submit --wait`` from submit to the run's end;
- **items**: the count in channel ``lines`` (``flowctl status RUN``'s depth,
  and the channel's folder read as root), which must be N, and the first,
  middle and last items' bytes, read from the spool as root;
- **memory**: the daemon's VmRSS before the submit and its peak during the
  run (/proc/PID/status every 0.2 s, and VmHWM at the end): growth = peak -
  before, also per million lines;
- **responsiveness**: the ``status`` request (what ``flowctl status`` asks,
  from a client already connected: flowctl's own start is not in it) every
  0.2 s during the run, against the same request with the daemon idle;
- **baseline**: plain Python on the same filesystem, in a process of its
  own, doing the same work the plainest fast way: read the same N-line file,
  write one file per line into a folder, fsync them 1,024 at a time on 8
  threads (flowd's SPLIT_SYNC_BATCH and ``Durable.sync_many``), fsync the
  folder, rename each file into a second folder (the channel) and fsync
  that; its wall time and RSS growth (VmHWM - VmRSS at its start).

It then prints flowd / baseline for the wall time. Before anything it checks
the filesystem of --dir has the inodes and space (one file and one 4 KiB
block per line, plus twice the output); at the end it stops the daemon and
deletes everything it made (``--keep``: keeps the spool; the baseline's
files are removed before the daemon starts, whatever), which for 10 million
files takes minutes.

    sudo python benchmarks/split.py [--lines 10000000] [--dir /var/tmp] [--keep]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pwd
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowctl.client import Client  # noqa: E402
from _daemon import proc_kb, remove_containers, start_daemon, stop_daemon  # noqa: E402

USER = "flowd-test"  # the tests' daemon user (tests/daemon_fixtures.py)
FIRST = 10_000_000  # line k is FIRST + k: 8 digits for up to 90 million lines
SYNC_BATCH = 1024  # flowd.channelvalues.SPLIT_SYNC_BATCH
SYNC_THREADS = 8  # flowd.fsops._sync_pool

WORKFLOW = """<workflow name="splitbench">
  <channel name="lines"/>
  <process name="print" image="flowd/busybox">
    <output channel="lines" from="stdout" split="lines"/>
    <script>seq {first} {last}</script>
  </process>
</workflow>
"""


def line_of(k: int) -> bytes:
    return b"%d" % (FIRST + k)


def room(folder: str, n: int) -> str:
    """Why ``folder``'s filesystem cannot hold the run, or ''."""
    st = os.statvfs(folder)
    block = max(st.f_frsize, 4096)
    need_bytes = n * block + 2 * n * 9 + 2**30  # a block per item, the output twice, 1 GiB spare
    need_inodes = n + 10_000
    have_bytes = st.f_bavail * st.f_frsize
    why = []
    if have_bytes < need_bytes:
        why.append(f"{need_bytes / 1e9:.1f} GB free (one {block // 1024} KiB block per line, "
                   f"the output twice, 1 GiB spare), it has {have_bytes / 1e9:.1f} GB")
    if st.f_files and st.f_favail < need_inodes:  # f_files 0: no inode limit (btrfs)
        why.append(f"{need_inodes:,} free inodes (one per line), it has {st.f_favail:,}")
    return "" if not why else (f"{n:,} lines need " + " and ".join(why) + f" in {folder}; "
                               "fix: --dir on a bigger filesystem, or fewer --lines")


# -- the baseline (run in a process of its own: --baseline-child) --

def baseline_child(src: str, folder: str) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < SYNC_BATCH + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    pool = concurrent.futures.ThreadPoolExecutor(SYNC_THREADS)
    pool.submit(int).result()  # the threads' start is not the work's
    tmp, chan = os.path.join(folder, "tmp"), os.path.join(folder, "channel")
    os.mkdir(tmp)
    os.mkdir(chan)
    tfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    cfd = os.open(chan, os.O_RDONLY | os.O_DIRECTORY)
    rss0 = proc_kb(os.getpid(), "VmRSS")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    open_, write, close, fsync = os.open, os.write, os.close, os.fsync
    t = time.perf_counter()
    k = 0
    fds: list[int] = []
    with open(src, "rb", buffering=1 << 20) as f:
        for line in f:
            fd = open_(f"{k:09d}", flags, 0o640, dir_fd=tfd)
            write(fd, line[:-1] if line[-1:] == b"\n" else line)
            fds.append(fd)
            k += 1
            if len(fds) == SYNC_BATCH:
                list(pool.map(fsync, fds))
                for fd in fds:
                    close(fd)
                fds = []
    list(pool.map(fsync, fds))
    for fd in fds:
        close(fd)
    fsync(tfd)
    rename = os.rename
    for i in range(k):
        rename(f"{i:09d}", f"{i:016d}", src_dir_fd=tfd, dst_dir_fd=cfd)
    fsync(cfd)
    wall = time.perf_counter() - t
    print(json.dumps({"wall": wall, "items": k, "rss0_kb": rss0,
                      "hwm_kb": proc_kb(os.getpid(), "VmHWM")}))
    return 0


def baseline(src: str, folder: str) -> dict:
    os.mkdir(folder)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline-child", src, folder],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the baseline failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout)


# -- flowd --

class Sampler:
    """The daemon's VmRSS, and the ``status`` request's round trip, every 0.2 s until stopped."""

    def __init__(self, pid: int, sock: str):
        self.pid, self.sock = pid, sock
        self.stop = threading.Event()
        self.rss_kb: list[int] = []
        self.status: list[float] = []
        self.threads = [threading.Thread(target=self._rss), threading.Thread(target=self._status)]
        for th in self.threads:
            th.start()

    def _rss(self) -> None:
        while not self.stop.wait(0.2):
            self.rss_kb.append(proc_kb(self.pid, "VmRSS"))

    def _status(self) -> None:
        client = Client(self.sock, timeout=3600)
        while not self.stop.wait(0.2):
            t = time.perf_counter()
            try:
                client.call("status")
            except Exception as e:  # noqa: BLE001 - the daemon died: said at the end
                print(f"status failed: {e}", file=sys.stderr)
                return
            self.status.append(time.perf_counter() - t)

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join()


def status_idle(sock: str, count: int = 50) -> list[float]:
    client = Client(sock, timeout=60)
    out = []
    for i in range(count + 10):
        t = time.perf_counter()
        client.call("status")
        if i >= 10:  # after 10 to warm up
            out.append(time.perf_counter() - t)
        time.sleep(0.02)
    return out


def check_channel(folder: str, n: int) -> tuple[int, list[str]]:
    """(items in the channel's folder, what is wrong with the first, middle and last)."""
    count, low, high = 0, None, None
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            seq = int(e.name)
            count += 1
            low = seq if low is None or seq < low else low
            high = seq if high is None or seq > high else high
    if not count:
        return 0, ["the channel is empty"]
    wrong = []
    if high - low + 1 != count:
        wrong.append(f"the items' numbers {low}..{high} are not {count} in a row")
    for k in (0, n // 2, n - 1):
        try:
            with open(os.path.join(folder, f"{low + k:016d}"), "rb") as f:
                got = f.read(64)
        except OSError as e:
            wrong.append(f"item {k}: {e.strerror}")
            continue
        if got != line_of(k):
            wrong.append(f"item {k} is {got!r}, not {line_of(k)!r}")
    return count, wrong


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=10_000_000, help="lines in the output (default 10,000,000)")
    ap.add_argument("--dir", default="/var/tmp", help="where the spool goes (a real disk; default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the spool (the baseline's files go)")
    ap.add_argument("--baseline-child", nargs=2, metavar=("SRC", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        return baseline_child(*args.baseline_child)
    n = args.lines
    if not 1 <= n <= 90_000_000:
        ap.error("--lines must be from 1 to 90,000,000 (8-digit lines)")
    if os.geteuid() != 0:
        ap.error(f"run as root: the daemon runs as the user {USER}, and the spool is read as root")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        ap.error(f"no user {USER}; make it as the tests do: useradd --system --no-create-home "
                 f"--shell /usr/sbin/nologin --groups docker {USER}")
    if subprocess.run(["docker", "image", "inspect", "flowd/busybox"], capture_output=True).returncode:
        ap.error("no image flowd/busybox; build it: bash examples/build-images")
    why = room(args.dir, n)
    if why:
        print(f"split.py: {why}", file=sys.stderr)
        return 2

    root = tempfile.mkdtemp(prefix="flowd-split-", dir=args.dir)
    os.chmod(root, 0o755)  # the daemon's user goes through it to its spool
    sockdir = tempfile.mkdtemp(prefix="flowd-split-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    wf = os.path.join(root, "workflow.xml")
    with open(wf, "w") as f:
        f.write(WORKFLOW.format(first=FIRST, last=FIRST + n - 1))
    src = os.path.join(root, "lines.txt")  # the same N lines, for the baseline
    with open(src, "wb") as f:
        for start in range(0, n, 100_000):
            f.write(b"".join(line_of(k) + b"\n" for k in range(start, min(n, start + 100_000))))
    print(f"{n:,} lines of 8 bytes; flowd as {USER}, spool under {root}; {os.cpu_count()} CPUs",
          flush=True)
    daemon = None
    ok = False
    try:
        os.sync()
        base = baseline(src, os.path.join(root, "baseline"))
        if base["items"] != n:
            raise SystemExit(f"the baseline made {base['items']} files, not {n}")
        base_grow = (base["hwm_kb"] - base["rss0_kb"]) / 1024
        print(f"baseline (plain Python: a file per line, fsync {SYNC_BATCH} at a time, rename into "
              f"the channel): {base['wall']:.1f} s, RSS +{base_grow:.1f} MB", flush=True)
        t = time.perf_counter()
        shutil.rmtree(os.path.join(root, "baseline"))
        print(f"(removed the baseline's {n:,} files: {time.perf_counter() - t:.1f} s)", flush=True)
        os.sync()

        daemon, env, log = start_daemon(root, sock, spool, ["--config", "/dev/null"], user=USER)
        time.sleep(1.0)
        idle = status_idle(sock)
        rss0 = proc_kb(daemon.pid, "VmRSS")
        sampler = Sampler(daemon.pid, sock)
        try:
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "flowctl", "--timeout", "3600", "submit",
                                  "--wait", "--json", wf], env=env, capture_output=True, text=True)
            t_flowd = time.perf_counter() - t
            t_end = time.time()
        finally:
            sampler.close()
        hwm = proc_kb(daemon.pid, "VmHWM")
        try:
            detail = json.loads(res.stdout)
        except ValueError:
            raise SystemExit(f"flowctl submit --wait exited {res.returncode}: "
                             f"{res.stderr[-2000:]}; see {log}") from None
        if detail.get("state") != "succeeded":
            print(f"the run {detail.get('id')} ended {detail.get('state')}: "
                  f"{json.dumps(detail)[:2000]}; see {log}", flush=True)
        run = detail["id"]
        depth = {c["name"]: c["depth"] for c in
                 Client(sock, timeout=600).call("status", {"run": run})[0]["run"]["channels"]}
        trace = subprocess.run([sys.executable, "-m", "flowctl", "trace", run, "--json"], env=env,
                               capture_output=True, text=True).stdout.splitlines()
        task = json.loads(trace[-1]) if trace else {}
        count, wrong = check_channel(os.path.join(spool, "runs", run, "channels", "lines"), n)
        peak = max([hwm, *sampler.rss_kb])
        grow = (peak - rss0) / 1024
        busy = sorted(sampler.status)
        ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731

        print(f"flowd: run {detail.get('state')} in {t_flowd:.1f} s (submit to end, "
              f"flowctl submit --wait): {t_flowd / base['wall']:.2f}x the baseline's "
              f"{base['wall']:.1f} s", flush=True)
        if task.get("finished_at") and task.get("started_at"):
            after = t_end - task["finished_at"]
            print(f"  of which (flowctl trace): container start {task.get('wait_seconds') or 0:.1f} s, "
                  f"script {task.get('run_seconds') or 0:.1f} s; from the script's end to the run's "
                  f"end (collect, split, commit) {after:.1f} s: {after / base['wall']:.2f}x the "
                  f"baseline", flush=True)
        print(f"items in channel lines: {depth.get('lines')} (flowctl status), {count} files "
              f"(its folder, read as root); want {n}: {'ok' if depth.get('lines') == count == n else 'WRONG'}")
        print("first, middle and last items' bytes (read from the spool as root): "
              + ("as printed" if not wrong else "WRONG: " + "; ".join(wrong)))
        print(f"daemon RSS: {rss0 / 1024:.1f} MB before, peak {peak / 1024:.1f} MB "
              f"(VmRSS every 0.2 s: {max(sampler.rss_kb, default=0) / 1024:.1f} MB; VmHWM "
              f"{hwm / 1024:.1f} MB): growth {grow:.1f} MB, {grow / (n / 1e6):.1f} MB per million "
              f"lines; the baseline's {base_grow:.1f} MB")
        if busy:
            print(f"status during the run: median {ms(statistics.median(busy))}, "
                  f"p99 {ms(busy[min(len(busy) - 1, int(len(busy) * 0.99))])}, max {ms(busy[-1])} "
                  f"({len(busy)} calls); idle median {ms(statistics.median(idle))}, max "
                  f"{ms(max(idle))}: busy/idle median {statistics.median(busy) / statistics.median(idle):.1f}, "
                  f"max {busy[-1] / max(idle):.1f}")
        ok = detail.get("state") == "succeeded" and depth.get("lines") == count == n and not wrong
    finally:
        if daemon is not None:
            stop_daemon(daemon)
            remove_containers(os.path.realpath(spool))
        shutil.rmtree(sockdir, ignore_errors=True)
        if args.keep:
            print(f"kept {root}; remove it with: rm -rf {root}")
        else:
            print(f"removing the spool ({n:,} item files), daemon stopped: this may take minutes",
                  flush=True)
            t = time.perf_counter()
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed the spool and the run's files: {time.perf_counter() - t:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
