#!/usr/bin/env python3
"""Responsiveness: how long a request waits while flowd writes and moves a big run,
or takes a big spool drop.

Mode ``run`` (the default): a workflow with N initial items (default 20,000) whose channel a mux copies
to two others is submitted; from then until the last item is moved, a client
pings the daemon in a loop. The baseline is the same ping against the same
daemon, idle, in the same run: the ratio (busy / idle) says what a big run
costs everyone else, whatever the machine. No container runs (the process
waits on a channel nothing fills), so no Docker engine is needed.

    python benchmarks/responsiveness.py [--items 20000] [--pings 200]

Prints ping latency (median, p99, max) idle and busy, the busy/idle ratios,
and the rates at which the run's items were written (submit) and moved (mux).

Mode ``spool``: a folder of 1 GiB in all (``--drop-mib``; the most a drop
may hold) is renamed into SPOOL/incoming/ while a client asks ``status``
(what ``flowctl status`` asks) in a loop, until the drop is a run and its
staging copy is gone. Its files have a second hard link, so flowd copies
them (it only hard-links a file it owns with one link). The baseline is the
same ``status`` against the same daemon, idle, in the same run.

    python benchmarks/responsiveness.py --mode spool [--drop-mib 1024] [--pings 200]

Mode ``events``: a service run gets ``--items`` items pushed one by one (each
push an ``item_pushed`` event) while a client pings; first with no event
reader, then with 20 ``flowctl events --json`` readers, one of them stopped
(SIGSTOP: its queue fills, and it is to be told what it lost). The ratio
(with readers / without) says what readers cost everyone else; a stopped
reader must cost nothing more than a reading one.

    python benchmarks/responsiveness.py --mode events [--items 3000] [--readers 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowctl.client import Client  # noqa: E402
from _daemon import start_daemon, stop_daemon  # noqa: E402  (benchmarks/_daemon.py)


def pings(client: Client, stop: threading.Event | None = None, count: int | None = None,
          gap: float = 0.005, command: str = "ping") -> list[float]:
    out = []
    while (count is None or len(out) < count) and not (stop is not None and stop.is_set()):
        t = time.perf_counter()
        client.call(command)
        out.append(time.perf_counter() - t)
        time.sleep(gap)
    return out


def summary(lat: list[float]) -> tuple[float, float, float]:
    lat = sorted(lat)
    return (statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))], lat[-1])


def idle_then_busy(sock: str, count: int, work, command: str = "ping"):
    """``command``'s latency idle (``count`` calls, after 20 to warm up), then from a
    second client while ``work(client)`` runs: (idle, busy, what ``work`` returned)."""
    client = Client(sock, timeout=120)
    pings(client, count=20, command=command)  # warm up
    idle = pings(client, count=count, command=command)
    stop = threading.Event()
    busy: list[float] = []
    pinger = threading.Thread(target=lambda: busy.extend(
        pings(Client(sock, timeout=120), stop, command=command)))
    pinger.start()
    try:
        result = work(client)
    finally:
        stop.set()
        pinger.join()
    return idle, busy, result


def report(idle: list[float], busy: list[float], command: str) -> None:
    i, b = summary(idle), summary(busy)
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"{command} idle: median {ms(i[0])}, p99 {ms(i[1])}, max {ms(i[2])} ({len(idle)} calls)")
    print(f"{command} busy: median {ms(b[0])}, p99 {ms(b[1])}, max {ms(b[2])} ({len(busy)} calls)")
    print(f"ratio busy/idle: median {b[0] / i[0]:.1f}, p99 {b[1] / i[1]:.1f}; "
          f"worst wait {ms(b[2])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--pings", type=int, default=200, help="idle pings for the baseline")
    ap.add_argument("--mode", choices=("run", "spool", "events"), default="run",
                    help="run: submit a big run (default); spool: a big spool drop; events: "
                         "pushes with and without event readers")
    ap.add_argument("--readers", type=int, default=20, help="events mode: readers (one stopped)")
    ap.add_argument("--drop-mib", type=int, default=1024,
                    help="spool mode: the drop's size in MiB (at most 1024, a drop's limit)")
    args = ap.parse_args()
    if args.mode == "spool":
        return spool_mode(args)
    if args.mode == "events":
        return events_mode(args)

    root = tempfile.mkdtemp(prefix="flowd-resp-", dir="/var/tmp")
    sockdir = tempfile.mkdtemp(prefix="flowd-resp-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    wfdir = os.path.join(root, "wf")
    os.makedirs(wfdir)
    with open(os.path.join(wfdir, "workflow.xml"), "w") as f:
        f.write(waiting_workflow(args.items))
    daemon, env, _ = start_daemon(root, sock, spool)

    def submit_and_move(client: Client):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "flowctl", "submit",
                              os.path.join(wfdir, "workflow.xml")], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        t_made = time.monotonic()
        while True:
            detail = client.call("status", {"run": run})[0]["run"]
            depth = {c["name"]: c["depth"] for c in detail["channels"]}
            if depth["x"] == args.items and depth["y"] == args.items:
                break
            time.sleep(0.2)
        return run, t0, t_made, time.monotonic()

    try:
        idle, busy, (run, t0, t_made, t_moved) = idle_then_busy(sock, args.pings, submit_and_move)
        Client(sock, timeout=120).call("cancel", {"runs": [run]})
    finally:
        stop_daemon(daemon)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"items: {args.items}; submit (upload + durable write) {t_made - t0:.1f} s "
          f"({args.items / (t_made - t0):.0f} items/s); mux copy to 2 channels "
          f"{t_moved - t_made:.1f} s ({args.items / (t_moved - t_made):.0f} items/s)")
    report(idle, busy, "ping")
    return 0


def waiting_workflow(items: int) -> str:
    """A service run whose channel ``a`` (``items`` items) a mux copies to ``x`` and
    ``y``; its process waits on ``go``, which nothing fills: no container runs."""
    lines = "\n".join(f"    <item>{i}</item>" for i in range(items))
    return f"""<workflow name="responsiveness" mode="service">
  <channel name="a">
{lines}
  </channel>
  <channel name="x"/><channel name="y"/><channel name="go"/><channel name="out"/>
  <mux from="a" to="x y"/>
  <process name="p" image="flowd/busybox">
    <input channel="x"/><input channel="go"/><output channel="out"/>
    <script>cp x out</script>
  </process>
</workflow>
"""


def spool_mode(args) -> int:
    size = min(args.drop_mib, 1024) * 1024 * 1024 - 64 * 1024  # room for workflow.xml and in.txt
    root = tempfile.mkdtemp(prefix="flowd-resp-", dir="/var/tmp")
    sockdir = tempfile.mkdtemp(prefix="flowd-resp-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    drop = os.path.join(root, "big")  # on the spool's filesystem: moved in by rename
    links = os.path.join(root, "links")
    os.makedirs(os.path.join(drop, "data"))
    os.makedirs(links)
    with open(os.path.join(drop, "workflow.xml"), "w") as f:
        f.write("""<workflow name="big-drop">
  <channel name="in"><item file="data/in.txt"/></channel>
</workflow>
""")
    with open(os.path.join(drop, "data", "in.txt"), "w") as f:
        f.write("hello\n")
    files, block = 16, b"\xa5" * (1024 * 1024)
    per = size // files
    for i in range(files):
        path = os.path.join(drop, "data", f"blob{i:02}")
        with open(path, "wb") as f:
            left = per
            while left:
                left -= f.write(block[:min(left, len(block))])
        os.link(path, os.path.join(links, f"blob{i:02}"))  # two links: flowd must copy it
    os.sync()
    daemon, env, logname = start_daemon(root, sock, spool)

    def drop_and_wait(client: Client):
        time.sleep(0.5)  # the pinger is going
        t0 = time.monotonic()
        os.rename(drop, os.path.join(spool, "incoming", "big"))
        staging = os.path.join(spool, "staging")
        while True:
            runs = client.call("status")[0]["runs"]
            if any(r["name"] == "big-drop" for r in runs) and not os.listdir(staging):
                break
            if time.monotonic() - t0 > 600:
                raise SystemExit("the drop did not become a run in 10 minutes; see " + logname)
            time.sleep(0.1)
        t_taken = time.monotonic()
        time.sleep(0.5)  # and a little after
        return t0, t_taken

    try:
        idle, busy, (t0, t_taken) = idle_then_busy(sock, args.pings, drop_and_wait,
                                                   command="status")
    finally:
        stop_daemon(daemon)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"spool drop: a folder of {files} files, {(per * files) / 2**30:.2f} GiB in all, "
          f"became a run in {t_taken - t0:.1f} s (copied: {per * files / 2**20 / (t_taken - t0):.0f}"
          f" MiB/s)")
    report(idle, busy, "status")
    return 0


def events_mode(args) -> int:
    import io

    items = args.items if args.items != 20_000 else 3000
    root = tempfile.mkdtemp(prefix="flowd-resp-", dir="/var/tmp")
    sockdir = tempfile.mkdtemp(prefix="flowd-resp-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    wf = os.path.join(root, "wf", "workflow.xml")
    os.makedirs(os.path.dirname(wf))
    with open(wf, "w") as f:
        f.write(waiting_workflow(0))  # pushed to x: nothing moves or runs
    daemon, env, _ = start_daemon(root, sock, spool)
    readers: list[subprocess.Popen] = []

    def push_all(client: Client):
        for i in range(items):
            client.push(run, "x", io.BytesIO(b"%d" % i))
        return None

    try:
        run = subprocess.run([sys.executable, "-m", "flowctl", "submit", wf], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        alone, alone_busy, _ = idle_then_busy(sock, args.pings, push_all)
        for i in range(args.readers):
            readers.append(subprocess.Popen([sys.executable, "-m", "flowctl", "events", "--json"],
                                            env=env, stdout=subprocess.DEVNULL))
        client = Client(sock, timeout=120)
        while True:  # every reader subscribed
            text = client.call("metrics")[0]["text"]
            if int(text.split("\nflowd_event_readers ")[1].split()[0]) >= args.readers:
                break
            time.sleep(0.1)
        readers[0].send_signal(signal.SIGSTOP)  # the stopped one
        idle, busy, _ = idle_then_busy(sock, args.pings, push_all)
        Client(sock, timeout=120).call("cancel", {"runs": [run]})
    finally:
        for r in readers:
            r.send_signal(signal.SIGCONT)
            r.terminate()
            r.wait(30)
        stop_daemon(daemon)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"{items} pushes (one item_pushed event each), without readers:")
    report(alone, alone_busy, "ping")
    print(f"the same with {args.readers} event readers, one of them stopped:")
    report(idle, busy, "ping")
    a, b = summary(alone_busy), summary(busy)
    print(f"ratio with readers / without, while pushing: median {b[0] / a[0]:.2f}, "
          f"p99 {b[1] / a[1]:.2f}, max {b[2] / a[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
