"""The Swarm executor (flowd.executor.swarm, SPEC 6.2): its service spec and
end reading against a fake engine API (the Docker boundary), and end to end
on a real one-node swarm: the daemon (non-root flowd-test, as the unit runs
it) with ``executor = "swarm"``.

The ``docker_swarm`` fixture inits a one-node swarm (``docker swarm init
--advertise-addr 127.0.0.1``) and leaves it again at the end of the module,
even on failure; an engine already in a swarm as a manager is used and left
as found. The contract suite (test_executor_contract.py) uses it too.

Waits are for conditions, never for durations.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import pytest

from daemon_fixtures import REPO, wait_until
from flowd.executor import base as X
from flowd.executor import swarmspec as S

EXAMPLES = os.path.join(REPO, "examples")
WAIT = 120  # seconds: the bound on any one condition
LEAVE_WAIT = 120  # tries, a second apart, to leave the swarm made here


# -- the swarm: made and left again -------------------------------------------------------------

def _swarm_state(client) -> tuple[str, bool]:
    sw = client.info().get("Swarm") or {}
    return str(sw.get("LocalNodeState") or ""), bool(sw.get("ControlAvailable"))


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def docker_swarm(docker_client, docker_images):
    """A docker client on a Swarm manager: the engine's own swarm, or a
    one-node swarm made here and left at the end (also on failure), with the
    networks ``swarm init`` made removed again."""
    state, manager = _swarm_state(docker_client)
    if state == "active":
        if not manager:
            pytest.fail("the engine is a Swarm worker; the swarm tests need a manager", pytrace=False)
        yield docker_client  # used as found, left as found
        return
    if state != "inactive":
        pytest.fail(f"the engine's Swarm state is {state!r}; the swarm tests need it inactive "
                    "(they init a one-node swarm) or a manager", pytrace=False)
    networks = {n["Name"] for n in docker_client.api.networks()}
    try:
        made = _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        if made.returncode != 0:
            pytest.fail(f"docker swarm init failed: {made.stderr.strip()}", pytrace=False)
        yield docker_client
    finally:
        _leave(networks)


def _leave(networks: set[str]) -> None:
    """Leave the swarm made here, also when the engine is restarting (another
    test may restart dockerd, and a restarted engine comes back in its swarm):
    until the engine says inactive, for up to LEAVE_WAIT seconds."""
    left = False
    for _ in range(LEAVE_WAIT):
        _docker("swarm", "leave", "--force")
        state = _docker("info", "--format", "{{.Swarm.LocalNodeState}}")
        if state.returncode == 0 and state.stdout.strip() == "inactive":
            left = True
            break
        time.sleep(1)
    for name in ("docker_gwbridge",):  # made by swarm init, kept by leave
        if name not in networks:
            _docker("network", "rm", name)
    if not left:
        pytest.fail("could not leave the swarm the tests made: run `docker swarm leave --force`",
                    pytrace=False)


def spool_services(client, spool: str) -> list[dict]:
    return client.api.services(filters={"label": [f"io.flowd.spool={spool}"]})


def remove_spool_services(client, spool: str) -> None:
    for svc in spool_services(client, spool):
        try:
            client.api.remove_service(svc["ID"])
        except Exception:  # noqa: BLE001 - gone already
            pass


# -- the service spec (no engine) ---------------------------------------------------------------

def _spec(**kw) -> X.TaskSpec:
    base = dict(run_id="r1", process="count", task_id="t7", attempt=2, image="flowd/busybox",
                lang="sh", script_path="/spool/runs/r1/scripts/count", workdir="/spool/runs/r1/t7/work",
                inputs=[X.Mount("/spool/runs/r1/items/1", "/task/lines", True)], outputs=["counts"],
                env={"A": "b c"}, timeout=30, memory=64 * 1024 * 1024, cpus=0.5, pids_limit=99,
                spool="/spool", user="999:999", group_add=["998"])
    base.update(kw)
    return X.TaskSpec(**base)


def test_a_task_is_a_one_shot_job_with_the_local_hardening():
    spec = _spec()
    spec.placement = ["node.labels.disk==ssd"]  # TaskSpec.placement, once the seam has it
    args = S.service_args(spec, spool="/spool", cap_add=["CHOWN"], log_limit=1024 * 1024)
    assert args["mode"] == {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
    tt = args["task_template"]
    assert tt["RestartPolicy"]["Condition"] == "none"
    c = tt["ContainerSpec"]
    assert c["CapabilityDrop"] == ["ALL"] and c["CapabilityAdd"] == ["CHOWN"]
    assert (c["User"], c["Groups"], c["Dir"]) == ("999:999", ["998"], "/task")
    assert c["Env"] == ["A=b c"] and c["StopSignal"] == "SIGKILL"
    assert c["Command"][:2] == ["/bin/sh", "-c"] and "flowd: out of memory" in c["Command"][2]
    assert {(m["Source"], m["Target"], m["ReadOnly"]) for m in c["Mounts"]} == {
        ("/spool/runs/r1/t7/work", "/task", False), ("/spool/runs/r1/scripts/count", "/.flowd/script", True),
        ("/spool/runs/r1/items/1", "/task/lines", True)}
    res = tt["Resources"]
    assert res["Limits"] == {"Pids": 99, "MemoryBytes": 64 * 1024 * 1024, "NanoCPUs": 500_000_000}
    assert res["Reservations"] == {"MemoryBytes": 64 * 1024 * 1024, "NanoCPUs": 500_000_000}
    assert "Networks" not in tt  # Swarm has no "none" network: the engine's default (see swarmspec)
    assert tt["Placement"] == {"Constraints": ["node.labels.disk==ssd"]}
    assert tt["LogDriver"]["Name"] == "json-file"
    want = {"io.flowd.run": "r1", "io.flowd.task": "t7", "io.flowd.process": "count",
            "io.flowd.attempt": "2", "io.flowd.spool": "/spool", "io.flowd.kind": "job"}
    assert args["labels"] == want and c["Labels"] == want
    assert args["name"] == "flowd-r1-t7-a2"


def test_bridge_network_and_no_limits_when_none_are_asked():
    args = S.service_args(_spec(network="bridge", memory=None, cpus=None), spool="s", cap_add=[],
                          log_limit=1024)
    tt = args["task_template"]
    assert tt["Networks"] == [{"Target": "bridge"}]
    assert tt["Resources"] == {"Limits": {"Pids": 99}, "Reservations": {}}
    assert "CapabilityAdd" not in tt["ContainerSpec"] and "Placement" not in tt


def test_service_names_are_dns_labels_one_per_attempt():
    long = _spec(run_id="r" * 40, task_id="t_" + "x" * 40)
    names = {S.service_name(long), S.service_name(_spec(run_id="r" * 40, task_id="t_" + "x" * 40,
                                                        attempt=3))}
    assert len(names) == 2
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", n), n


class FakeAPI:
    """The engine's Swarm calls, as the SDK's APIClient answers them (the Docker boundary)."""

    def __init__(self, task_status: dict | None = None, create_error: Exception | None = None):
        self.task_status = task_status
        self.create_error = create_error
        self.created: list[dict] = []
        self.removed: list[str] = []

    def create_service(self, **kw):
        if self.create_error is not None:
            raise self.create_error
        self.created.append(kw)
        return {"ID": "svc1"}

    def tasks(self, filters):
        return [{"ID": "task1", "NodeID": "node1", "Version": {"Index": 5}, "Status": self.task_status}]

    def inspect_node(self, node_id):
        return {"Description": {"Hostname": "worker-7"}}

    def remove_service(self, sid):
        self.removed.append(sid)

    def inspect_container(self, cid):
        import docker.errors
        raise docker.errors.NotFound("no such container")


def _run_fake(api, tmp_path) -> X.TaskResult:
    import queue

    from flowd.executor.swarm import SwarmExecutor
    got: queue.Queue = queue.Queue()
    ex = SwarmExecutor(got.put, spool="s", client=api)
    try:
        work = tmp_path / "work"
        work.mkdir()
        spec = _spec(workdir=str(work), inputs=[], log_path="")
        ex.start(spec).result(timeout=WAIT)
        while True:
            ev = got.get(timeout=WAIT)
            if isinstance(ev, X.TaskResult):
                return ev
    finally:
        ex.close()


def test_a_rejected_task_is_an_error_naming_the_image_and_the_node(tmp_path):
    api = FakeAPI({"State": "rejected", "Err": "No such image: flowd/busybox:latest"})
    res = _run_fake(api, tmp_path)
    assert res.status == X.ERROR and not res.retryable, res
    assert "image flowd/busybox is not on node worker-7 and could not be pulled" in res.message, res.message
    assert "docker load" in res.message
    assert api.removed == ["svc1"]  # nothing to collect: the job goes at once


def test_an_exit_status_and_its_time_come_from_the_task(tmp_path):
    api = FakeAPI({"State": "failed", "Err": "task: non-zero exit (3)",
                   "Timestamp": "2026-01-01T00:00:05.5Z", "ContainerStatus": {"ExitCode": 3}})
    res = _run_fake(api, tmp_path)
    assert (res.status, res.exit_code, res.message) == (X.EXITED, 3, "exit status 3"), res
    assert res.finished_at == pytest.approx(1767225605.5)
    assert api.removed == []  # kept until the daemon removes it after collecting


def test_an_engine_that_is_not_a_swarm_manager_is_a_clear_error(tmp_path):
    import docker.errors
    api = FakeAPI(create_error=docker.errors.APIError(
        "503", explanation='This node is not a swarm manager. Use "docker swarm init" or '
                           '"docker swarm join" to connect this node to swarm and try again.'))
    res = _run_fake(api, tmp_path)
    assert res.status == X.ERROR, res
    assert "not a Swarm manager" in res.message and 'executor = "docker"' in res.message, res.message


# -- end to end on a one-node swarm ---------------------------------------------------------------

def _start(daemon_factory, workdir, toml: str = 'executor = "swarm"\n'):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write(toml)
    return daemon_factory(extra_args=["--config", conf]).start()


def _submit_wait(d, path) -> dict:
    return json.loads(d.flowctl("submit", "--wait", "--json", path, check=None).stdout)


def _pull(d, run, channel, out) -> list[bytes]:
    d.flowctl("pull", run, channel, "--out", out, check=0)
    return [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]


def _left(client, d) -> bool:
    return _what_is_left(client, d) == ([], [])


def _wait_all_removed(client, d) -> None:
    try:
        wait_until(lambda: _left(client, d), WAIT, "the run's Swarm jobs to be removed")
    except AssertionError:
        raise AssertionError(f"left (services, containers): {_what_is_left(client, d)}") from None


def _what_is_left(client, d) -> tuple[list[str], list[str]]:
    """The names of the spool's services and containers."""
    spool = os.path.realpath(d.spool)
    return ([s["Spec"]["Name"] for s in spool_services(client, spool)],
            [f"{c['Names'][0]} {c['State']}" for c in client.api.containers(
                all=True, filters={"label": [f"io.flowd.spool={spool}"]})])


@pytest.mark.docker
@pytest.mark.swarm
def test_wordcount_runs_as_swarm_jobs_and_leaves_no_service(daemon_factory, workdir, docker_swarm):
    d = _start(daemon_factory, workdir)
    try:
        det = _submit_wait(d, os.path.join(EXAMPLES, "wordcount", "workflow.xml"))
        assert det["state"] == "succeeded", det
        report = _pull(d, det["id"], "report", os.path.join(workdir, "report"))
        assert [re.sub(rb"task \w+: ", b"", r).strip() for r in report] == \
            [b"9 words", b"8 words", b"4 words", b"8 words"]
        assert len(_pull(d, det["id"], "tally", os.path.join(workdir, "tally"))) == 4
        _wait_all_removed(docker_swarm, d)
    finally:
        d.stop()
        remove_spool_services(docker_swarm, os.path.realpath(d.spool))


@pytest.mark.docker
@pytest.mark.swarm
def test_a_failing_task_is_retried_as_new_jobs_and_nothing_is_lost_or_duplicated(
        daemon_factory, workdir, docker_swarm):
    d = _start(daemon_factory, workdir)
    want = [f"item-{i}" for i in range(6)]
    folder = os.path.join(workdir, "wf-" + uuid.uuid4().hex[:6])
    os.makedirs(folder)
    xml = os.path.join(folder, "workflow.xml")
    items = "".join(f"<item>{w}</item>" for w in want)
    # item-3 fails on its first two attempts (exit 3) and passes on its third.
    with open(xml, "w") as f:
        f.write(f"""<workflow name="retries" mode="batch">
  <channel name="in">{items}</channel><channel name="out"/>
  <process name="copy" image="flowd/busybox" retries="2" parallel="2">
    <input channel="in"/><output channel="out"/>
    <script>if [ "$(cat in)" = item-3 ] &amp;&amp; [ "$FLOWD_ATTEMPT" -lt 3 ]; then echo "attempt $FLOWD_ATTEMPT fails" >&amp;2; exit 3; fi; cp in out</script>
  </process>
</workflow>
""")
    try:
        det = _submit_wait(d, xml)
        assert det["state"] == "succeeded", det
        got = _pull(d, det["id"], "out", os.path.join(workdir, "out"))
        assert sorted(got) == sorted(w.encode() for w in want), "lost or duplicated items"
        logs = d.flowctl("logs", det["id"], "copy", check=0).stdout  # the jobs' logs, kept
        assert "attempt 1 fails" in logs and "attempt 2 fails" in logs, logs
        assert "attempt 3 fails" not in logs
        _wait_all_removed(docker_swarm, d)
    finally:
        d.stop()
        remove_spool_services(docker_swarm, os.path.realpath(d.spool))


# -- the executor on a one-node swarm (what the contract suite does not cover) --------------------

@pytest.fixture
def swarm_backend(docker_swarm, docker_spool, docker_tmp):
    from test_executor_contract import Backend  # the contract suite's harness, backend "swarm"
    b = Backend("swarm", docker_tmp, docker_spool, docker_swarm)
    yield b
    b.ex.close()
    remove_spool_services(docker_swarm, docker_spool)


def _case(sh: str):
    from test_executor_contract import Case
    return Case(sh=sh, fake=lambda t: 0)


@pytest.mark.docker
@pytest.mark.swarm
def test_a_job_s_container_has_the_hardening_swarm_carries(swarm_backend):
    b = swarm_backend
    spec = b.spec(_case("echo started; sleep 120\n"), memory=64 * 1024 * 1024, cpus=0.5, pids_limit=99)
    b.ex.start(spec)
    b.wait_started(spec)
    (c,) = b.client.api.containers(filters={"label": [f"io.flowd.spool={b.spool}",
                                                      f"io.flowd.task={spec.task_id}"]})
    info = b.client.api.inspect_container(c["Id"])
    hc = info["HostConfig"]
    assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd") and not hc["Privileged"], hc
    assert (hc["PidsLimit"], hc["Memory"], hc["NanoCpus"]) == (99, 64 * 1024 * 1024, 500_000_000), hc
    assert hc["LogConfig"]["Type"] == "json-file" and hc["LogConfig"]["Config"]["max-file"] == "2"
    assert info["Config"]["User"] == spec.user and (hc["GroupAdd"] or []) == spec.group_add
    assert {m["Destination"] for m in info["Mounts"]} == {"/task", "/.flowd/script"}
    (svc,) = spool_services(b.client, b.spool)
    res = svc["Spec"]["TaskTemplate"]["Resources"]
    assert res["Reservations"] == {"MemoryBytes": 64 * 1024 * 1024, "NanoCPUs": 500_000_000}, res
    b.ex.kill(spec.run_id, spec.task_id).result(timeout=WAIT)
    r = b.result(spec)
    assert r.status == X.KILLED, r
    b.ex.remove(spec).result(timeout=WAIT)
    assert spool_services(b.client, b.spool) == []


@pytest.mark.docker
@pytest.mark.swarm
def test_out_of_memory_is_oom(swarm_backend):
    b = swarm_backend
    spec, r = b.run(_case("x=$(head -c 64m /dev/zero | tr '\\0' a); echo survived\n"),
                    memory=16 * 1024 * 1024)
    assert (r.status, r.exit_code) == (X.OOM, 137), r
    assert r.message == "killed: out of memory (limit 16 MiB)", r.message


@pytest.mark.docker
@pytest.mark.swarm
def test_a_missing_image_is_an_error_naming_the_image_and_the_node(swarm_backend):
    b = swarm_backend
    spec = b.spec(_case("true\n"))
    spec.image = "flowd/not-here-" + uuid.uuid4().hex[:8] + ":latest"
    b.ex.start(spec)
    r = b.result(spec)
    assert r.status == X.ERROR and not r.retryable, r
    host = b.client.info()["Name"]
    assert f"image {spec.image} is not on node {host}" in r.message, r.message


@pytest.mark.docker
@pytest.mark.swarm
def test_a_restarted_executor_takes_a_running_job_back_by_its_labels(swarm_backend):
    b = swarm_backend
    spec = b.spec(_case("echo started; while [ ! -e /task/go ]; do sleep 0.1; done; echo done > out\n"),
                  outputs=["out"])
    b.ex.start(spec)
    b.wait_started(spec)
    b.ex.close()  # the daemon goes; its job runs on
    b.ex = b.new_executor()
    b.ex.adopt(spec)
    with open(os.path.join(spec.workdir, "go"), "w"):
        pass
    r = b.result(spec)
    assert r.ok, r
    with open(os.path.join(spec.workdir, "out"), "rb") as f:
        assert f.read() == b"done\n"
    with open(spec.log_path, "rb") as f:
        assert b"started" in f.read()
    b.ex.remove(spec).result(timeout=WAIT)
    assert spool_services(b.client, b.spool) == []
