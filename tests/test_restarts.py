"""The daemon and the engine die and come back; no item is lost or duplicated.

Real Docker, a real daemon killed with SIGKILL. The soak's size comes from
FLOWD_SOAK_ITEMS and FLOWD_SOAK_KILLS (the everyday suite runs a small one;
docs/reliability.md gives the long command and its last figures).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
from test_daemon import pull, run_containers, wait_until, write
from test_swarm import docker_swarm  # noqa: F401 - the one-node swarm fixture

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    pass


class CreationCounter:
    """Counts the engine's container-create events for a label, live.

    Read as they happen: dockerd keeps only its last 256 events, so asking
    afterwards undercounts on a busy engine.
    """

    def __init__(self, docker_client, label: str):
        self.count = 0
        self._stream = docker_client.api.events(
            decode=True, filters={"type": "container", "event": "create", "label": label})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for _ in self._stream:
                self.count += 1
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            pass

    def close(self) -> int:
        self._stream.close()
        return self.count


def test_kill9_with_20_tasks_running_takes_them_all_back(daemon_factory, workdir, docker_client):
    cfg = write(os.path.join(workdir, "flowd.toml"), "max_containers = 20\n")
    d = daemon_factory(extra_args=["--config", cfg]).start()
    items = "".join(f"<item>{i}</item>" for i in range(20))
    # even items finish while the daemon is down; odd ones still run when it returns
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="twenty">
  <channel name="in">{items}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox" parallel="20">
    <input channel="in"/><output channel="out"/>
    <script>n=$(cat in); sleep $(( n % 2 == 0 ? 25 : 45 )); echo "done $n" > out</script>
  </process>
</workflow>""")
    creations = CreationCounter(docker_client, f"io.flowd.spool={os.path.realpath(d.spool)}")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: sum(c["State"] == "running" for c in run_containers(docker_client, run))
               == 20, timeout=90, what="20 running containers")
    d.kill9()
    # the short half exits while no daemon is there
    wait_until(lambda: sum(c["State"] == "exited" for c in run_containers(docker_client, run))
               >= 10, timeout=60, what="the short tasks to exit")
    d.start()
    detail = json.loads(d.flowctl("watch", run, "--json", check=0, timeout=180).stdout)
    assert detail["state"] == "succeeded"
    out = pull(d, run, "out", os.path.join(workdir, "out"))
    assert sorted(out) == sorted(f"done {i}\n".encode() for i in range(20))  # 0 lost, 0 dup
    assert creations.close() == 20  # none ran twice


def _dockerd_cmdline():
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    if len(out) != 1:
        return None, None
    pid = int(out[0])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return pid, [a.decode() for a in f.read().split(b"\0") if a]


@pytest.mark.slow
@pytest.mark.parametrize("container", ["fresh", "warm"])
def test_dockerd_restarted_mid_run_completes_with_nothing_lost(daemon, workdir, docker_client, container):
    """A dockerd restart stops every container (no live-restore): the tasks
    wait for the engine and run again, fresh or warm (a warm container that
    stopped is retired, never handed a task), and each item counts once."""
    _restart_dockerd_mid_run(daemon, workdir, docker_client, container)


@pytest.mark.slow
@pytest.mark.swarm
def test_the_swarm_manager_s_dockerd_restarted_mid_run_completes_with_nothing_lost(
        daemon_factory, workdir, docker_client, docker_swarm):
    """executor = "swarm": the manager (this engine) restarts under running
    jobs: runs wait while it is away (status says so), then go on; each item
    counts once and no job is left behind."""
    from test_swarm import SMALL_JOBS, spool_services
    conf = write(os.path.join(workdir, "flowd.toml"), SMALL_JOBS.format(n=3))
    d = daemon_factory(extra_args=["--config", conf]).start()
    try:
        _restart_dockerd_mid_run(d, workdir, docker_client, "fresh")
        wait_until(lambda: spool_services(docker_client, os.path.realpath(d.spool)) == [],
                   timeout=120, what="the run's Swarm jobs to be removed")
    finally:
        d.stop()


def _restart_dockerd_mid_run(daemon, workdir, docker_client, container: str) -> None:
    pid, cmd = _dockerd_cmdline()
    if pid is None or os.path.exists("/run/systemd/system"):
        pytest.skip("dockerd is not a plain process here (systemd manages it)")
    items = "".join(f"<item>{i}</item>" for i in range(6))
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="engine-restart">
  <channel name="in">{items}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox" parallel="3" container="{container}">
    <input channel="in"/><output channel="out"/>
    <script>sleep 3; echo "done $(cat in)" > out</script>
  </process>
</workflow>""")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: any(c["State"] == "running" for c in run_containers(docker_client, run)),
               what="a running task")
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.2)
        daemon.wait_for("UNAVAILABLE", timeout=30)
    finally:
        log = open("/var/log/dockerd.log", "ab")
        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
                   timeout=90, what="dockerd to come back")
    detail = json.loads(daemon.flowctl("watch", run, "--json", check=0, timeout=300).stdout)
    assert detail["state"] == "succeeded", detail
    out = pull(daemon, run, "out", os.path.join(workdir, "out"))
    assert sorted(out) == sorted(f"done {i}\n".encode() for i in range(6)), daemon.log()[-6000:]


def test_random_kill9_soak_loses_and_duplicates_nothing(daemon_factory, workdir, docker_client):
    n_items = int(os.environ.get("FLOWD_SOAK_ITEMS", "40"))
    n_kills = int(os.environ.get("FLOWD_SOAK_KILLS", "8"))
    seed = int(os.environ.get("FLOWD_SOAK_SEED", "1"))
    rnd = random.Random(seed)
    cfg = write(os.path.join(workdir, "flowd.toml"), "max_containers = 4\n")
    d = daemon_factory(extra_args=["--config", cfg])
    items = "".join(f"<item>{i}</item>" for i in range(n_items))
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="soak">
  <channel name="in">{items}</channel>
  <channel name="a"/><channel name="b"/><channel name="b1"/><channel name="b2"/>
  <channel name="out"/><channel name="copy"/>
  <process name="s1" image="flowd/busybox" parallel="2">
    <input channel="in"/><output channel="a"/>
    <script>echo "s1($(cat in))" > a</script>
  </process>
  <process name="s2" image="flowd/busybox" parallel="2">
    <input channel="a"/><output channel="b"/>
    <script>echo "s2($(cat a))" > b</script>
  </process>
  <mux from="b" to="b1 copy"/>
  <process name="s3" image="flowd/busybox" parallel="2">
    <input channel="b1"/><output channel="out"/>
    <script>echo "s3($(cat b1))" > out</script>
  </process>
</workflow>""")
    d.start()
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    recoveries = []
    kills = 0
    while kills < n_kills:
        time.sleep(rnd.uniform(0.2, 2.0))
        state = json.loads(d.flowctl("status", run, "--json", check=0).stdout)["state"]
        if state != "running":
            break
        d.kill9()
        kills += 1
        t0 = time.monotonic()
        d.start()
        recoveries.append(time.monotonic() - t0)
    detail = json.loads(d.flowctl("watch", run, "--json", check=0,
                                  timeout=600 + 3 * n_items).stdout)
    assert detail["state"] == "succeeded"
    expected = sorted(f"s3(s2(s1({i})))\n".encode() for i in range(n_items))
    assert sorted(pull(d, run, "out", os.path.join(workdir, "out"))) == expected
    copies = sorted(pull(d, run, "copy", os.path.join(workdir, "copy")))
    assert copies == sorted(f"s2(s1({i}))\n".encode() for i in range(n_items))
    tasks = os.listdir(os.path.join(d.spool, "runs", run, "tasks"))
    assert tasks == []
    # the daemon's own measure: from loading the spool to READY (socket bound, tasks adopted)
    import re

    spool_times = [float(x) for x in re.findall(r"recovered \d+ runs \(\d+ active\) in ([\d.]+)s",
                                                d.log(full=True))]
    print(f"\nsoak: {n_items} items, {kills} kills, 0 lost, 0 duplicated; recovery (spool to "
          f"READY) max {max(spool_times):.3f}s; process start to READY max "
          f"{max(recoveries or [0]):.2f}s mean {sum(recoveries) / max(1, len(recoveries)):.2f}s")
    assert len(spool_times) >= kills + 1
    assert max(spool_times) < 2.0
