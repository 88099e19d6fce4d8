#!/usr/bin/env python3
"""Throughput: N items through a trivial process, flowd against a plain docker SDK loop.

Both sides run the same container work at the same concurrency C: a
container of flowd/busybox that copies a small input file to an output file
in a bind-mounted folder. The baseline is the least a tool must do: create,
start, wait, remove, in C threads. flowd adds its durable protocol (claim,
collect, commit, apply, each fsynced), log capture and its control loop.
Both are measured in the same run, on the same machine, so the ratio is
meaningful even on a noisy, shared machine; the absolute rates are not.

    python benchmarks/throughput.py [--items 200] [--concurrency 4] [--rounds 1]

Prints the two rates (items/s) and flowd/plain. Goal: 0.9 or better.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import docker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "flowd/busybox:latest"
SCRIPT = "cat /task/in > /task/out"


def plain_loop(client, items: int, concurrency: int, root: str) -> float:
    """items/s of create+start+wait+remove with the same mounts and command, C threads."""
    todo = list(range(items))
    lock = threading.Lock()
    errors: list[str] = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            work = os.path.join(root, f"t{i}")
            os.makedirs(work)
            os.chmod(work, 0o777)
            src = os.path.join(root, f"in{i}")
            with open(src, "w") as f:
                f.write(f"item {i}\n")
            c = client.containers.create(
                IMAGE, ["/bin/sh", "-c", SCRIPT], name=f"flowd-bench-{os.getpid()}-{i}",
                working_dir="/task", network_mode="none",
                mounts=[docker.types.Mount("/task", work, type="bind"),
                        docker.types.Mount("/task/in", src, type="bind", read_only=True)],
                labels={"io.flowd.bench": "1"}, security_opt=["no-new-privileges"],
                cap_drop=["ALL"], pids_limit=256)
            c.start()
            rc = c.wait()["StatusCode"]
            c.remove(force=True)
            if rc != 0 or not os.path.exists(os.path.join(work, "out")):
                errors.append(f"task {i}: exit {rc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"baseline failed: {errors[:3]}")
    return items / elapsed


def flowd_run(items: int, concurrency: int, root: str) -> tuple[float, dict]:
    spool = os.path.join(root, "spool")
    sockdir = tempfile.mkdtemp(prefix="flowd-bench-")
    sock = os.path.join(sockdir, "flowd.sock")
    cfg = os.path.join(root, "flowd.toml")
    with open(cfg, "w") as f:
        f.write(f"max_containers = {concurrency}\n")
    wfdir = os.path.join(root, "wf")
    os.makedirs(wfdir)
    lines = [f"    <item>item {i}\n</item>" for i in range(items)]
    with open(os.path.join(wfdir, "workflow.xml"), "w") as f:
        f.write(f"""<workflow name="throughput">
  <channel name="in">
{chr(10).join(lines)}
  </channel>
  <channel name="out"/>
  <process name="copy" image="{IMAGE}" parallel="{concurrency}">
    <input channel="in"/><output channel="out"/>
    <script>cat in > out</script>
  </process>
</workflow>
""")
    env = dict(os.environ, PYTHONPATH=REPO, FLOWD_SOCKET=sock)
    log = open(os.path.join(root, "flowd.log"), "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "flowd", "--config", cfg, "--spool", spool,
                               "--socket", sock, "--log-level", "warning"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        flowctl = [sys.executable, "-m", "flowctl", "--timeout", "60"]
        deadline = time.monotonic() + 30
        while subprocess.run(flowctl + ["status"], env=env, capture_output=True).returncode:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("flowd did not start; see " + log.name)
            time.sleep(0.1)
        run = subprocess.run(flowctl + ["submit", os.path.join(wfdir, "workflow.xml")], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        res = subprocess.run(flowctl + ["watch", run, "--json"], env=env, capture_output=True,
                             text=True)
        detail = json.loads(res.stdout)
        if detail["state"] != "succeeded" or detail["channels"][1]["depth"] != items:
            raise SystemExit(f"flowd run did not deliver every item: {detail['state']}")
        # the run's own clock: from its first claim to its last commit
        return items / detail["elapsed"], detail
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(sockdir, ignore_errors=True)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times")
    args = ap.parse_args()
    subprocess.run(["bash", os.path.join(REPO, "examples", "build-images")], check=True,
                   stdout=subprocess.DEVNULL)
    client = docker.from_env()
    base = os.environ.get("FLOWD_BENCH_DIR") or os.path.join(REPO, ".bench-tmp")
    os.makedirs(base, exist_ok=True)
    plain_rates, flowd_rates = [], []
    try:
        for r in range(args.rounds):
            for side in ("plain", "flowd") if r % 2 == 0 else ("flowd", "plain"):
                root = tempfile.mkdtemp(prefix=f"{side}-", dir=base)
                try:
                    if side == "plain":
                        plain_rates.append(plain_loop(client, args.items, args.concurrency, root))
                    else:
                        flowd_rates.append(flowd_run(args.items, args.concurrency, root)[0])
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                print(f"round {r + 1} {side}: {(plain_rates if side == 'plain' else flowd_rates)[-1]:.2f} items/s",
                      file=sys.stderr)
    finally:
        for c in client.containers.list(all=True, filters={"label": "io.flowd.bench=1"}):
            c.remove(force=True)
    plain = sorted(plain_rates)[len(plain_rates) // 2]
    flowd = sorted(flowd_rates)[len(flowd_rates) // 2]
    print(f"items={args.items} concurrency={args.concurrency} rounds={args.rounds}")
    print(f"plain docker SDK loop: {plain:.2f} items/s")
    print(f"flowd:                 {flowd:.2f} items/s")
    print(f"ratio flowd/plain:     {flowd / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
