#!/usr/bin/env python3
"""Scale: what a run of 100,000 small items costs (issue 13, "Big runs stay light").

A workflow whose channel ``a`` gets N small files (``<items glob="data/*">``,
default 100,000) is submitted to a real daemon (no container runs: its only
process waits on a channel nothing fills, so no Docker engine is needed).
Then, in the same run:

- **submit**: ``flowctl submit`` wall time (upload + durable write), against a
  baseline of plain Python writing the same files into one folder on the
  same filesystem, each fsynced (``fsync each``: a tenth of them, times ten), and written then made durable
  by one ``syncfs`` (``syncfs``);
- **memory**: the daemon's RSS before, after the submit, and after a restart;
- **status**: ``flowctl status`` and ``flowctl status RUN`` wall (median of 7, after
  one run that compiles flowctl's modules as an install does) with 100 runs,
  against ``python -c pass`` (the interpreter's start);
- **pull**: ``flowctl pull`` of the channel, against plain Python reading the
  same files (one open/read each) and writing copies;
- **logs**: ``flowctl logs RUN --task T`` with N task logs in the run's logs
  folder (written there by the benchmark, as N tasks would have); then, with
  the run's trace naming those N attempts (written likewise), ``flowctl logs
  RUN --json`` (every log, a page of the trace at a time) against plain Python
  listing the folder and stat-ing each log once, and one call of a follow at
  the trace's end (what ``logs --follow`` asks each second) against plain
  Python listing the folder (what each such call did before: the goal is
  that none lists it).

Each figure is printed beside the issue's ("before", measured on the same
machine) and the goal, with the ratio figure/goal (at most 1 is met).

    python benchmarks/scale.py [--items 100000]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowctl.client import Client  # noqa: E402
from _daemon import rss_mb, start_daemon, stop_daemon  # noqa: E402  (benchmarks/_daemon.py)

# The figures (issue 13, measured from a fresh clone on this machine).
BEFORE = {"submit": 76.0, "rss_grow": 64.0, "rss_restart_grow": 40.0, "pull": 52.0,
          "status": 0.120, "status_run": 0.120, "logs": None}
GOAL = {"submit": 10.0, "rss_grow": 10.0, "rss_restart_grow": 10.0, "pull": 10.0,
        "status": 0.100, "status_run": 0.100, "logs": 1.0}

# logs without --task: every log (N of them, paged), and a follow's call at the trace's end
# (goals of this benchmark: the issue asks only that no call lists the folder). Before: 1af8f30
# on this machine, 100,000 logs: one reply of them all, and each follow call listed the folder.
BEFORE.update(logs_all=2.7, logs_follow=1.6)
GOAL.update(logs_all=10.0, logs_follow=0.010)


# A service run whose process waits on a channel nothing fills: no container runs.
WAITING = """<workflow name="{name}" mode="service">
  <channel name="a">{items}</channel>
  <channel name="go"/><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="a"/><input channel="go"/><output channel="out"/>
    <script>cp a out</script>
  </process>
</workflow>
"""


def settle_rss(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return rss_mb(pid)


def wall(cmd: list[str], env: dict, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def syncfs(path: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


def baseline_write(folder: str, n: int, each: bool) -> float:
    os.makedirs(folder)
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(folder, f"{i:016}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, f"item {i}\n".encode())
        if each:
            os.fsync(fd)
        os.close(fd)
    if not each:
        syncfs(folder)
    else:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t


def baseline_read(folder: str, out: str) -> float:
    os.makedirs(out)
    t = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return time.perf_counter() - t


def line(what: str, value: float | None, unit: str, key: str, baseline: str = "") -> None:
    before, goal = BEFORE.get(key), GOAL[key]
    fmt = (lambda v: f"{v * 1000:.0f} ms") if unit == "ms" else \
        ((lambda v: f"{v:.1f} MB") if unit == "MB" else (lambda v: f"{v:.1f} s"))
    text = f"{what:<34} {fmt(value) if value is not None else '-':>10}"
    text += f"   before {fmt(before) if before is not None else '-':>8}"
    if before and value:
        text += f" ({before / value:.1f}x)"
    text += f"   goal {fmt(goal)}: ratio {value / goal:.2f}" if value is not None else ""
    text += f" {'met' if value is not None and value <= goal else 'NOT met'}"
    if baseline:
        text += f"   [{baseline}]"
    print(text, flush=True)


def logs_all(flowctl: list[str], env: dict, client: Client, run: str, root: str, n: int) -> None:
    """``logs RUN --json`` and a follow's call, with the trace naming the N logs of ``root``."""
    trace = os.path.join(root, "trace.jsonl")
    with open(trace, "ab") as f:
        for i in range(1, n + 1):
            f.write(b'{"task":"%d","process":"p","attempt":1,"state":"succeeded",'
                    b'"exit_status":0,"reason":"","started_how":"fresh"}\n' % i)
    folder = os.path.join(root, "logs")
    t = time.perf_counter()
    for name in os.listdir(folder):
        os.stat(os.path.join(folder, name))
    t_list_stat = time.perf_counter() - t
    listing = []
    for _ in range(5):
        t = time.perf_counter()
        os.listdir(folder)
        listing.append(time.perf_counter() - t)
    t_all = wall(flowctl + ["logs", run, "--json"], env)
    end = os.path.getsize(trace)
    ask = []
    for _ in range(21):
        t = time.perf_counter()
        client.call("logs", {"run": run, "offset": end, "follow": 1})
        ask.append(time.perf_counter() - t)
    line(f"logs --json ({n} logs, paged)", t_all, "s", "logs_all",
         f"plain Python list+stat {t_list_stat:.1f} s; {t_all / t_list_stat:.1f}x it")
    t_ask, t_listing = statistics.median(ask), statistics.median(listing)
    line("logs --follow: a call at the end", t_ask, "ms", "logs_follow",
         f"the call {t_ask * 1000:.1f} ms; plain Python listing the folder "
         f"{t_listing * 1000:.0f} ms, {t_listing / t_ask:.0f}x it")
    os.unlink(trace)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=100, help="runs in the spool for status")
    ap.add_argument("--dir", default="/var/tmp", help="where the spool goes (a real disk)")
    ap.add_argument("--keep", action="store_true", help="keep the spool (for profiling)")
    args = ap.parse_args()
    n = args.items

    root = tempfile.mkdtemp(prefix="flowd-scale-", dir=args.dir)
    sockdir = tempfile.mkdtemp(prefix="flowd-scale-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    wfdir = os.path.join(root, "wf")
    os.makedirs(os.path.join(wfdir, "data"))
    for i in range(n):
        with open(os.path.join(wfdir, "data", f"{i:08}.txt"), "w") as f:
            f.write(f"item {i}\n")
    for name, items in (("workflow.xml", '<items glob="data/*.txt"/>'),
                        ("small.xml", "<item>1</item><item>2</item>")):
        with open(os.path.join(wfdir, name), "w") as f:
            f.write(WAITING.format(name=name[:-4], items=items))
    print(f"{n} items, {args.runs} runs, spool under {root}; {os.cpu_count()} CPUs", flush=True)
    os.sync()
    # fsync each: a tenth of the files, times ten (100,000 fsyncs take minutes here)
    t_write_each = 10 * baseline_write(os.path.join(root, "base-each"), max(n // 10, 1), each=True)
    t_write_fs = baseline_write(os.path.join(root, "base-fs"), n, each=False)
    t_read = baseline_read(os.path.join(root, "base-fs"), os.path.join(root, "base-read"))
    for d in ("base-each", "base-fs", "base-read"):
        shutil.rmtree(os.path.join(root, d))
    os.sync()

    daemon, env, _ = start_daemon(root, sock, spool)
    flowctl = [sys.executable, "-m", "flowctl", "--timeout", "120"]
    try:
        rss0 = settle_rss(daemon.pid, 1.0)
        t = time.perf_counter()
        run = subprocess.run(flowctl + ["submit", os.path.join(wfdir, "workflow.xml")], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        t_submit = time.perf_counter() - t
        rss1 = settle_rss(daemon.pid)
        line("submit (upload + durable write)", t_submit, "s", "submit",
             f"plain Python: fsync each {t_write_each:.1f} s, one syncfs {t_write_fs:.1f} s; "
             f"{t_submit / t_write_fs:.1f}x the syncfs baseline")
        line(f"daemon RSS growth ({rss0:.0f} -> {rss1:.0f} MB)", rss1 - rss0, "MB", "rss_grow")

        client = Client(sock, timeout=120)
        for _ in range(args.runs - 1):
            client.call("submit", {"name": "small.xml",
                                   "upload": client.upload([("workflow.xml",
                                                             os.path.join(wfdir, "small.xml"))])},
                        timeout=120)
        # As installed, with compiled modules: a PYTHONDONTWRITEBYTECODE in the
        # environment would have flowctl compile its sources at every start.
        warm = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        wall(flowctl + ["status", run], warm)
        t_py = wall([sys.executable, "-c", "pass"], warm, 7)
        t_status = wall(flowctl + ["status"], warm, 7)
        t_status_run = wall(flowctl + ["status", run], warm, 7)
        ask = []  # the daemon's part: the request alone, from a client already connected
        for _ in range(21):
            t = time.perf_counter()
            client.call("status")
            ask.append(time.perf_counter() - t)
        ask_run = []
        for _ in range(21):
            t = time.perf_counter()
            client.call("status", {"run": run})
            ask_run.append(time.perf_counter() - t)
        line(f"status ({args.runs} runs)", t_status, "ms", "status",
             f"python -c pass {t_py * 1000:.0f} ms; the request alone "
             f"{statistics.median(ask) * 1000:.1f} ms")
        line("status RUN (a channel of N items)", t_status_run, "ms", "status_run",
             f"python -c pass {t_py * 1000:.0f} ms; the request alone "
             f"{statistics.median(ask_run) * 1000:.1f} ms")

        out = os.path.join(root, "pulled")
        t_pull = wall(flowctl + ["pull", run, "a", "--out", out], env)
        got = len(os.listdir(out))
        line(f"pull ({got} items)", t_pull, "s", "pull",
             f"plain Python read+write {t_read:.1f} s; {t_pull / t_read:.1f}x it")
        shutil.rmtree(out)

        logs = os.path.join(spool, "runs", run, "logs")
        for i in range(1, n + 1):
            with open(os.path.join(logs, f"p.p.{i}.1.log"), "wb") as f:
                f.write(b"x\n")
        t_logs = wall(flowctl + ["logs", run, "--task", str(n // 2)], env, 3)
        line(f"logs --task ({n} logs in the folder)", t_logs, "s", "logs",
             f"python -c pass {t_py * 1000:.0f} ms")
        logs_all(flowctl, env, client, run, os.path.join(spool, "runs", run), n)
        shutil.rmtree(logs)
        os.mkdir(logs)

        stop_daemon(daemon)
        daemon, env, _ = start_daemon(root, sock, spool)
        rss2 = settle_rss(daemon.pid)
        line(f"RSS after restart, vs empty ({rss2:.0f} MB)", rss2 - rss0, "MB", "rss_restart_grow")
    finally:
        stop_daemon(daemon)
        shutil.rmtree(sockdir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
