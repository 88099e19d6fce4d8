#!/usr/bin/env python3
"""Cache: a second identical run of a 1,000-task workflow (issue 15, "Measured").

A workflow whose one process (``cache="yes"``, fresh containers, flowd/busybox)
takes N small items (default 1,000) is submitted twice to a real daemon, each
time waited for (``flowctl submit --wait``). The first run is the baseline:
every task starts a container. The second should find every task in the
cache. Printed for each run: wall time (submit to end) and the containers the
engine created for it (its own record: ``docker events`` read live, the run's label);
then the second run's figures against the first's (goal: at least 20x faster,
0 containers), and whether every task of the second run was ``cached``
(``flowctl trace``) with the first run's outputs (``flowctl pull``).

The daemon runs as the user who runs this (root: it needs the Docker engine),
with its spool under --dir; the daemon, the spool and every container it made
are removed at the end, whatever happens.

    python benchmarks/cache.py [--tasks 1000] [--parallel 1] [--max-containers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowd.executor.container import LABEL_RUN, LABEL_SPOOL  # noqa: E402
from _daemon import remove_containers, start_daemon, stop_daemon  # noqa: E402  (benchmarks/_daemon.py)

GOAL_SPEEDUP = 20.0

WORKFLOW = """<workflow name="cachebench">
  <channel name="words"><items glob="data/*.txt"/></channel>
  <channel name="out"/>
  <process name="stamp" image="flowd/busybox" container="fresh" cache="yes" parallel="{parallel}">
    <input channel="words" as="w"/><output channel="out" as="o"/>
    <script>{{ cat w; cat /proc/sys/kernel/random/uuid; }} &gt; o</script>
  </process>
</workflow>
"""


class CreateWatch:
    """The engine's container creations with the spool's label, read live from
    ``docker events`` as they happen (a replay with --since/--until keeps only the
    engine's last few hundred events: it undercounts a long run). ``sync`` makes a
    marker container and reads on until its creation is seen, so every creation
    before it has been counted."""

    def __init__(self, spool: str):
        self.spool = spool
        self.by_run: dict[str, int] = {}
        self.seen: set[str] = set()
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["docker", "events", "--filter", "type=container", "--filter", "event=create",
             "--filter", f"label={LABEL_SPOOL}={spool}", "--format", "{{json .Actor.Attributes}}"],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                attrs = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                run = attrs.get(LABEL_RUN, "")
                self.by_run[run] = self.by_run.get(run, 0) + 1
                self.seen.add(attrs.get("flowd.bench.marker", ""))
                self.cond.notify_all()

    def sync(self) -> None:
        marker = f"m{time.time_ns()}"
        cid = subprocess.run(["docker", "create", "--label", f"{LABEL_SPOOL}={self.spool}",
                              "--label", f"flowd.bench.marker={marker}", "flowd/busybox", "true"],
                             capture_output=True, text=True, check=True).stdout.strip()
        try:
            with self.cond:
                if not self.cond.wait_for(lambda: marker in self.seen, timeout=120):
                    raise SystemExit("docker events did not show the marker container's creation")
        finally:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True)

    def created(self, run: str) -> int:
        self.sync()
        with self.cond:
            return self.by_run.get(run, 0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def submit(flowctl: list[str], env: dict, path: str) -> tuple[dict, float, float, float]:
    """Submit and wait; (the run's details, wall seconds, start and end times)."""
    start = time.time()
    t = time.perf_counter()
    res = subprocess.run(flowctl + ["submit", "--wait", "--json", path], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"submit failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout), wall, start, time.time()


def pulled(flowctl: list[str], env: dict, run: str, out: str) -> list[bytes]:
    subprocess.run(flowctl + ["pull", run, "out", "--out", out], env=env, check=True,
                   capture_output=True)
    return sorted(open(os.path.join(out, n), "rb").read() for n in os.listdir(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000, help="tasks in the workflow (default 1000)")
    ap.add_argument("--max-containers", type=int, default=4,
                    help="the daemon's max_containers (default 4)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="the process's parallel= (default 1, the format's default; both runs "
                         "have the same: hits too are claimed at most that many at once)")
    ap.add_argument("--dir", default="/var/tmp", help="where the spool goes (a real disk)")
    args = ap.parse_args()
    if args.tasks < 1:
        ap.error("--tasks must be at least 1")

    root = tempfile.mkdtemp(prefix="flowd-cachebench-", dir=args.dir)
    os.chmod(root, 0o755)
    sockdir = tempfile.mkdtemp(prefix="flowd-cachebench-")
    sock = os.path.join(sockdir, "flowd.sock")
    spool = os.path.join(root, "spool")
    wfdir = os.path.join(root, "wf")
    os.makedirs(os.path.join(wfdir, "data"))
    for i in range(args.tasks):
        with open(os.path.join(wfdir, "data", f"{i:08}.txt"), "w") as f:
            f.write(f"item {i}\n")
    path = os.path.join(wfdir, "workflow.xml")
    with open(path, "w") as f:
        f.write(WORKFLOW.format(parallel=args.parallel))
    conf = os.path.join(root, "flowd.toml")
    with open(conf, "w") as f:
        f.write(f"max_containers = {args.max_containers}\n")
    print(f"{args.tasks} tasks, fresh containers of flowd/busybox, parallel={args.parallel}, "
          f"max_containers {args.max_containers}; {os.cpu_count()} CPUs; spool under {root}", flush=True)

    daemon = None
    watch = CreateWatch(os.path.realpath(spool))
    try:
        daemon, env, _ = start_daemon(root, sock, spool, ["--config", conf])
        flowctl = [sys.executable, "-m", "flowctl", "--timeout", "600"]
        runs = []
        for name in ("first", "second"):
            det, wall, _, _ = submit(flowctl, env, path)
            if det.get("state") != "succeeded":
                raise SystemExit(f"the {name} run did not succeed: {det}")
            n = watch.created(det["id"])
            runs.append((det["id"], wall, n))
            print(f"{name + ' run':<12} {wall:8.2f} s   {n:5d} containers started", flush=True)
        (r1, w1, n1), (r2, w2, n2) = runs
        speedup = w1 / w2 if w2 > 0 else float("inf")
        print(f"second/first: wall {w2 / w1:.4f} ({speedup:.1f}x faster; goal at least "
              f"{GOAL_SPEEDUP:.0f}x: {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}), "
              f"containers {n2}/{n1} ({'met' if n2 == 0 else 'NOT met'}: goal 0)", flush=True)

        trace = subprocess.run(flowctl + ["trace", r2, "--json"], env=env, check=True,
                               capture_output=True, text=True).stdout.splitlines()
        cached = sum(json.loads(x).get("started_how") == "cached" for x in trace)
        same = pulled(flowctl, env, r1, os.path.join(root, "o1")) == \
            pulled(flowctl, env, r2, os.path.join(root, "o2"))
        print(f"second run: {cached}/{args.tasks} tasks cached (flowctl trace); outputs "
              f"{'equal to' if same else 'DIFFERENT from'} the first run's", flush=True)
        ok = n2 == 0 and cached == args.tasks and same
        return 0 if ok else 1
    finally:
        watch.close()
        if daemon is not None:
            stop_daemon(daemon)
        remove_containers(os.path.realpath(spool))
        remove_containers(spool)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
