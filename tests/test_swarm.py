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

import contextlib
import grp
import json
import os
import re
import subprocess
import threading
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
    spec = _spec(memory_reservation=64 * 1024 * 1024)  # the process asked for memory="64m"
    spec.placement = ["node.labels.disk==ssd"]
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


def test_a_memory_limit_nobody_asked_for_is_not_reserved():
    """A process without memory= gets max_memory as its limit (a cap): reserving
    it would let Swarm place one task a node (and none on a smaller node)."""
    res = S.service_args(_spec(memory=8 << 30, memory_reservation=None), spool="s", cap_add=[],
                         log_limit=1024)["task_template"]["Resources"]
    assert res["Limits"]["MemoryBytes"] == 8 << 30 and "MemoryBytes" not in res["Reservations"]
    res = S.service_args(_spec(memory=8 << 30, memory_reservation=256 << 20), spool="s", cap_add=[],
                         log_limit=1024)["task_template"]["Resources"]  # config default_memory
    assert res["Reservations"]["MemoryBytes"] == 256 << 20


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


def _run_fake(api, tmp_path, **spec) -> X.TaskResult:
    """One attempt (``_spec`` with ``spec``'s changes) on a SwarmExecutor over the fake ``api``: its result."""
    import queue

    from flowd.executor.swarm import SwarmExecutor
    got: queue.Queue = queue.Queue()
    ex = SwarmExecutor(got.put, spool="s", client=api)
    try:
        work = tmp_path / "work"
        work.mkdir()
        ex.start(_spec(**{"workdir": str(work), "inputs": [], "log_path": "", **spec})).result(timeout=WAIT)
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


def test_a_task_whose_container_went_away_runs_again_never_reads_as_exit_0(tmp_path):
    """What a manager's dockerd restart leaves (checked on Docker 20.10): the job's
    task "failed", Err "No such container", and the ExitCode it had when it
    started (0). The item must not be lost as a success without outputs."""
    api = FakeAPI({"State": "failed", "Err": "No such container: flowd-r1-t7-a2.x.y",
                   "ContainerStatus": {"ContainerID": "c0651ed4", "ExitCode": 0}})
    res = _run_fake(api, tmp_path)
    assert res.status == X.MISSING, res  # started again by the daemon, not counted as a failure
    assert "went away" in res.message and api.removed == ["svc1"]
    assert S.task_status({"Status": {"State": "failed", "Err": "task: non-zero exit (3)",
                                     "ContainerStatus": {"ExitCode": 3}}})[1] == 3
    assert S.task_status({"Status": {"State": "complete", "ContainerStatus": {"ExitCode": 0}}})[1] == 0


def test_an_engine_that_is_not_a_swarm_manager_is_waited_for_with_a_clear_reason(tmp_path):
    """Not (or no longer, or not yet: a restarting manager says so too) a
    manager: the task waits as for an engine outage, and says why."""
    import docker.errors
    from unittest import mock
    api = FakeAPI(create_error=docker.errors.APIError(
        "503", response=mock.Mock(status_code=503),
        explanation='This node is not a swarm manager. Use "docker swarm init" or '
                    '"docker swarm join" to connect this node to swarm and try again.'))
    res = _run_fake(api, tmp_path)
    assert res.status == X.ERROR and res.retryable, res  # started again once the engine is back
    assert "not a Swarm manager" in res.message and 'executor = "docker"' in res.message, res.message


# -- end to end on a one-node swarm ---------------------------------------------------------------

# Each job reserves its memory limit, and a process that sets none gets
# max_memory (8 GiB by default): a node places only as many as it has room for,
# and Swarm's constraint enforcer takes tasks off a node whose reservations
# exceed its memory (when any node changes: another test's drain, a label), so
# a task runs again. The tests that count jobs give theirs a small default; the
# wordcount test keeps the defaults, as a user's first run.
SMALL_JOBS = 'executor = "swarm"\nmax_containers = {n}\ndefault_memory = "64m"\n'


def _start(daemon_factory, workdir, toml: str = SMALL_JOBS.format(n=2)):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write(toml)
    return daemon_factory(extra_args=["--config", conf]).start()


@contextlib.contextmanager
def _cleaned_up(client, d):
    """Counts the jobs the manager creates meanwhile (``ServiceCreates``); at the end, also on
    failure, stops the daemon and removes whatever its spool left in the swarm."""
    creates = ServiceCreates(client)
    try:
        yield creates
    finally:
        creates.close()
        d.stop()
        remove_spool_services(client, os.path.realpath(d.spool))


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
    d = _start(daemon_factory, workdir, 'executor = "swarm"\n')
    with _cleaned_up(docker_swarm, d):
        det = _submit_wait(d, os.path.join(EXAMPLES, "wordcount", "workflow.xml"))
        assert det["state"] == "succeeded", det
        report = _pull(d, det["id"], "report", os.path.join(workdir, "report"))
        assert [re.sub(rb"task \w+: ", b"", r).strip() for r in report] == \
            [b"9 words", b"8 words", b"4 words", b"8 words"]
        assert len(_pull(d, det["id"], "tally", os.path.join(workdir, "tally"))) == 4
        _wait_all_removed(docker_swarm, d)


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
    with _cleaned_up(docker_swarm, d) as creates:
        det = _submit_wait(d, xml)
        assert det["state"] == "succeeded" and det["failures"] == [], det
        got = _pull(d, det["id"], "out", os.path.join(workdir, "out"))
        assert sorted(got) == sorted(w.encode() for w in want), "lost or duplicated items"
        logs = d.flowctl("logs", det["id"], "copy", check=0).stdout  # the jobs' logs, kept
        assert "attempt 1 fails" in logs and "attempt 2 fails" in logs, logs
        assert "attempt 3 fails" not in logs
        # one job per attempt: six first attempts, and item-3's second and third
        made = creates.of(det["id"])
        assert len(made) == len(set(made)) == 8, made
        assert sorted(n.rsplit("-", 1)[1] for n in made) == ["a1"] * 6 + ["a2", "a3"], made
        _wait_all_removed(docker_swarm, d)


class ServiceCreates:
    """Counts the Swarm services made for one run, live (the manager's event stream).

    A service is one job, one attempt (``flowd-RUN-TASK-aN``); the manager sees
    every node's, so a task placed on another node counts too. Read as they
    happen: the engine keeps only its last events."""

    def __init__(self, client):
        self.names: list[str] = []
        self._stream = client.api.events(decode=True, filters={"type": "service", "event": "create"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for ev in self._stream:
                self.names.append(str(((ev.get("Actor") or {}).get("Attributes") or {}).get("name")))
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            pass

    def of(self, run: str) -> list[str]:
        return sorted(n for n in self.names if n.startswith(f"flowd-{run}-"))

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # noqa: BLE001
            pass


def _task_jobs(client, d) -> list[tuple[dict, dict | None]]:
    """The spool's task jobs with their latest task: not the daemon's node
    probes, which come and go (one may be removed between the listing and
    the look at its tasks, as a finished job may)."""
    import docker.errors
    out = []
    for svc in spool_services(client, os.path.realpath(d.spool)):
        if (svc["Spec"].get("Labels") or {}).get("io.flowd.kind") != "job":
            continue
        try:
            out.append((svc, S.latest_task(client.api.tasks(filters={"service": svc["ID"]}))))
        except docker.errors.NotFound:
            continue  # removed meanwhile
    return out


def _running_jobs(client, d) -> list[dict]:
    """The spool's task jobs whose task runs now."""
    return [svc for svc, task in _task_jobs(client, d)
            if task is not None and S.task_status(task)[0] == "running"]


def _job_states(client, d) -> dict[str, str]:
    """Each of the spool's task jobs: its task's state (by the service's task label)."""
    return {svc["Spec"]["Labels"]["io.flowd.task"]: S.task_status(task)[0] if task else ""
            for svc, task in _task_jobs(client, d)}


def _job_log(client, svc: dict) -> bytes:
    """What a job printed so far, as the engine keeps it."""
    return b"".join(client.api.service_logs(svc["ID"], stdout=True, stderr=True, follow=False))


def _gate_script(body: str) -> str:
    """A task that says it started, then waits for /task/go (a file the test makes
    in its work folder), then does ``body``."""
    return f'echo "started $(cat in)"; while [ ! -e /task/go ]; do sleep 0.1; done; {body}'


def _open_gates(d, run, which=lambda item: True) -> set[str]:
    """Make /task/go in the work folder of the run's tasks whose input ``which``
    picks (as the daemon's user, as if the task had made it); their task ids."""
    tasks = os.path.join(d.spool, "runs", run, "tasks")
    opened = set()
    for name in os.listdir(tasks):
        folder = os.path.join(tasks, name)
        (item,) = os.listdir(os.path.join(folder, "in"))
        with open(os.path.join(folder, "in", item), "rb") as f:
            if not which(f.read().decode()):
                continue
        work = os.path.join(folder, "work")
        go = os.path.join(work, "go")
        with open(go, "w"):
            pass
        st = os.stat(work)
        os.chown(go, st.st_uid, st.st_gid)
        opened.add(name.rsplit(".", 1)[1])
    return opened


def _task_logs(d, run) -> dict[str, str]:
    """Each task log kept in the spool (name -> text)."""
    folder = os.path.join(d.spool, "runs", run, "logs")
    return {n: open(os.path.join(folder, n), encoding="utf-8", errors="replace").read()
            for n in sorted(os.listdir(folder)) if n.endswith(".log")}


def _status(d, run) -> dict:
    return json.loads(d.flowctl("status", run, "--json", check=0).stdout)


@pytest.mark.docker
@pytest.mark.swarm
def test_join_pairs_the_ith_items_as_swarm_jobs(daemon_factory, workdir, docker_swarm):
    d = _start(daemon_factory, workdir)
    with _cleaned_up(docker_swarm, d) as creates:
        det = _submit_wait(d, os.path.join(EXAMPLES, "join", "workflow.xml"))
        assert det["state"] == "succeeded", det
        assert _pull(d, det["id"], "messages", os.path.join(workdir, "m")) == \
            [b"Hello, Ada!\n", b"Bonjour, Grace!\n", b"Hej, Linus!\n"]
        assert len(creates.of(det["id"])) == 3  # one job per task, none twice
        _wait_all_removed(docker_swarm, d)


@pytest.mark.docker
@pytest.mark.swarm
@pytest.mark.parametrize("kind,script,attrs,reason", [
    ("crash", "exit 7", {}, "exit status 7"),
    ("timeout", "sleep 60", {"timeout": "1s"}, "timed out after 1s"),
    # the hog is a child: the script's shell lives to print the OOM mark
    ("oom", "sh -c 'x=aaaaaaaaaaaaaaaaaaaa; while :; do x=$x$x; done'", {"memory": "8m"},
     "killed: out of memory (limit 8 MiB)"),
])
def test_a_failure_is_retried_as_a_new_job_then_kept_with_its_reason_and_log(
        daemon_factory, workdir, docker_swarm, kind, script, attrs, reason):
    from test_features import one_process
    d = _start(daemon_factory, workdir)
    xml = one_process(workdir, kind, f'echo "MARKER attempt $FLOWD_ATTEMPT"\n{script}', retries=1,
                      **attrs)
    with _cleaned_up(docker_swarm, d) as creates:
        det = json.loads(d.flowctl("submit", "--wait", "--json", xml, check=1).stdout)
        assert det["state"] == "failed", det
        (failure,) = det["failures"]
        assert reason in failure["reason"], failure
        assert failure["attempts"] == 2 and len(failure["history"]) == 2, failure
        assert [h.split(":", 1)[0] for h in failure["history"]] == ["attempt 1", "attempt 2"]
        assert all(reason in h for h in failure["history"]), failure["history"]
        assert "MARKER attempt 2" in failure["log_tail"], failure["log_tail"]
        assert reason in d.flowctl("status", det["id"], check=0).stdout
        # the input is kept, with the failed task, for the operator
        kept = os.path.join(d.spool, "runs", det["id"], "failed", failure["folder"], "in")
        (name,) = os.listdir(kept)
        assert open(os.path.join(kept, name), "rb").read() == b"x"
        # each attempt's log is kept: both attempts printed their line
        logs = d.flowctl("logs", det["id"], "p", check=0).stdout
        assert "MARKER attempt 1" in logs and "MARKER attempt 2" in logs, logs
        assert creates.of(det["id"]) == [f"flowd-{det['id']}-1-a1", f"flowd-{det['id']}-1-a2"]
        _wait_all_removed(docker_swarm, d)


@pytest.mark.docker
@pytest.mark.swarm
def test_cancel_removes_the_running_jobs_and_keeps_the_data_and_logs(daemon_factory, workdir, docker_swarm):
    from test_features import one_process
    d = _start(daemon_factory, workdir, SMALL_JOBS.format(n=3))
    items = ("a", "b", "c")
    xml = one_process(workdir, "cancel", _gate_script("cp in out"), items=items, parallel=3)
    with _cleaned_up(docker_swarm, d):
        run = d.flowctl("submit", xml, check=0).stdout.strip()
        wait_until(lambda: len(_running_jobs(docker_swarm, d)) == 3, WAIT, "three running jobs")
        wait_until(lambda: all(b"started" in _job_log(docker_swarm, svc)
                               for svc in _running_jobs(docker_swarm, d)), WAIT, "the jobs' first lines")
        assert "cancelled" in d.flowctl("cancel", run, check=0).stdout
        wait_until(lambda: _status(d, run)["state"] == "cancelled", WAIT, "the run to be cancelled")
        _wait_all_removed(docker_swarm, d)  # the jobs are stopped and gone
        assert "cancelled" in d.flowctl("status", run, check=0).stdout
        assert sorted(_pull(d, run, "in", os.path.join(workdir, "kept"))) == [b"a", b"b", b"c"]
        assert _pull(d, run, "out", os.path.join(workdir, "out")) == []
        logs = d.flowctl("logs", run, "p", check=0).stdout  # what the jobs printed is kept
        assert all(f"started {i}" in logs for i in items), logs


@pytest.mark.docker
@pytest.mark.swarm
def test_kill9_mid_run_takes_the_jobs_back_by_label_none_runs_twice(daemon_factory, workdir, docker_swarm):
    from test_features import one_process
    d = _start(daemon_factory, workdir, SMALL_JOBS.format(n=6))
    items = [str(i) for i in range(6)]
    # even items end while no flowd is there; odd ones still run when it is back
    xml = one_process(workdir, "kill9", _gate_script('echo "done $(cat in)" > out'), items=items,
                      parallel=6)
    with _cleaned_up(docker_swarm, d) as creates:
        run = d.flowctl("submit", xml, check=0).stdout.strip()
        wait_until(lambda: len(_running_jobs(docker_swarm, d)) == 6, WAIT, "six running jobs")
        d.kill9()
        ended = _open_gates(d, run, lambda item: int(item) % 2 == 0)
        assert len(ended) == 3
        wait_until(lambda: {t for t, s in _job_states(docker_swarm, d).items() if s == "complete"} == ended,
                   WAIT, "the even items' jobs to end while flowd is down")
        d.start()
        assert _status(d, run)["state"] == "running"
        assert len(_open_gates(d, run, lambda item: int(item) % 2 == 1)) == 3
        det = json.loads(d.flowctl("watch", run, "--json", check=0, timeout=WAIT).stdout)
        assert det["state"] == "succeeded", det
        out = _pull(d, run, "out", os.path.join(workdir, "out"))
        assert sorted(out) == sorted(f"done {i}\n".encode() for i in items)  # 0 lost, 0 duplicated
        assert creates.of(run) == sorted(f"flowd-{run}-{t}-a1" for t in range(1, 7))  # none ran twice
        logs = _task_logs(d, run)
        assert len(logs) == 6 and all(text.count("started") == 1 for text in logs.values()), logs
        _wait_all_removed(docker_swarm, d)


@pytest.mark.docker
@pytest.mark.swarm
def test_the_manager_unreachable_mid_run_runs_wait_status_says_so_nothing_is_lost(
        daemon_factory, workdir, docker_swarm):
    """flowd reaches the manager through a proxy the test cuts (no dockerd restart:
    the engine is shared): the jobs run on in the swarm, one ends while flowd
    cannot see it; the run waits, status says the engine is unavailable; when
    the manager answers again the run completes, each job made once."""
    from test_docker_executor import EngineProxy
    from test_features import one_process
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip("the engine is not on a unix socket")
    proxy = EngineProxy(os.path.join(workdir, "manager.sock"), host[len("unix://"):])

    def serve():
        proxy.serve()
        # as /run/docker.sock (root:docker 0660): the daemon reaches it through its docker group
        os.chown(proxy.path, 0, grp.getgrnam("docker").gr_gid)
        os.chmod(proxy.path, 0o660)

    serve()
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write(SMALL_JOBS.format(n=2))
    d = daemon_factory(extra_args=["--config", conf], env={"DOCKER_HOST": "unix://" + proxy.path})
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.cut)  # last: after the daemon has stopped
        creates = stack.enter_context(_cleaned_up(docker_swarm, d))
        d.start()
        xml = one_process(workdir, "unreachable", _gate_script('echo "done $(cat in)" > out'),
                          items=("0", "1"), parallel=2)
        run = d.flowctl("submit", xml, check=0).stdout.strip()
        wait_until(lambda: len(_running_jobs(docker_swarm, d)) == 2, WAIT, "two running jobs")
        proxy.cut()
        d.wait_for("UNAVAILABLE", timeout=WAIT)  # STATUS= tells systemd
        assert "the Docker engine is unavailable" in d.flowctl("status", check=0).stdout
        text = d.flowctl("status", run, check=0).stdout
        assert "the Docker engine is unavailable; tasks wait for it" in text, text
        assert _status(d, run)["state"] == "running"
        ended = _open_gates(d, run, lambda item: item == "0")  # ends unseen
        wait_until(lambda: _job_states(docker_swarm, d).get(next(iter(ended))) == "complete", WAIT,
                   "a job to end while the manager is unreachable")
        assert _status(d, run)["state"] == "running"  # nothing was collected meanwhile
        serve()
        _open_gates(d, run, lambda item: item == "1")
        det = json.loads(d.flowctl("watch", run, "--json", check=0, timeout=WAIT).stdout)
        assert det["state"] == "succeeded", det
        assert "unavailable" not in d.flowctl("status", check=0).stdout
        assert sorted(_pull(d, run, "out", os.path.join(workdir, "out"))) == [b"done 0\n", b"done 1\n"]
        assert creates.of(run) == [f"flowd-{run}-1-a1", f"flowd-{run}-2-a1"]  # none ran twice
        _wait_all_removed(docker_swarm, d)


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
    spec = b.spec(_case("echo started; sleep 120\n"), memory=64 * 1024 * 1024, cpus=0.5, pids_limit=99,
                  memory_reservation=64 * 1024 * 1024)
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
