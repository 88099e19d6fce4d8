"""A task's node drained or lost: the Swarm executor runs the attempt again
elsewhere (flowd.executor.swarm ``_node_lost``, swarmspec ``node_trouble``).

Unit part (no engine, no marker): the decision, and the wait loop against a
fake engine API (the Docker boundary).

Two-node part (markers slow, swarm, docker): a second Docker engine on this
machine (tests/secondengine.py) joined to the main engine's swarm as a
worker, labelled ``<label>=two``; the daemon as the tests run it (non-root
flowd-test, ``executor = "swarm"``): placement by constraint, a node drained
mid-task, a node's engine killed mid-task (kill -9 of it and all it runs).
Each run completes with 0 lost and 0 duplicated items. The second node is
``pause``d between tests (the main engine's swarm may be shared with other
tests: their jobs are kept off it), the main node's label is removed and the
killed engine started again after each test.

Waits are for conditions, never for durations.
"""
from __future__ import annotations

import json
import os
import threading
import uuid

import pytest

import secondengine as SE
from daemon_fixtures import wait_until
from flowd.executor import base as X
from flowd.executor import swarmspec as S
from test_swarm import _pull, _run_fake, _start, docker_swarm, remove_spool_services  # noqa: F401 - the fixture

WAIT = 240  # seconds: the bound on any one condition (a lost node takes ~30 s to be given up)


# -- the decision (no engine) ------------------------------------------------------------------

def _node(state="ready", availability="active", host="vm"):
    return {"Spec": {"Availability": availability}, "Status": {"State": state},
            "Description": {"Hostname": host}}


def test_a_node_that_is_drained_gone_or_silent_is_trouble_and_a_ready_one_is_not():
    assert S.node_trouble(_node()) == ""
    assert S.node_trouble(_node(availability="pause")) == ""  # pause: no new tasks, running ones stay
    assert S.node_trouble(_node(availability="drain")) == "drain"
    assert S.node_trouble(None) == "gone"
    for state in ("down", "unknown", "disconnected"):
        assert S.node_trouble(_node(state=state)) == "silent"


def test_a_silent_node_is_given_up_only_after_the_bound():
    assert S.node_verdict("silent", "vm (n2)", None) == ""
    assert S.node_verdict("silent", "vm (n2)", S.NODE_LOST_AFTER - 1) == ""
    why = S.node_verdict("silent", "vm (n2)", S.NODE_LOST_AFTER)
    assert why.startswith("node vm (n2) is down") and "runs again on another node" in why
    assert S.node_verdict("drain", "vm (n2)", None) == \
        "node vm (n2) was drained: the task runs again on another node"
    assert S.node_verdict("", "vm (n2)", None) == ""


def test_a_node_s_name_has_its_id_and_a_hostile_hostname_is_escaped():
    assert S.node_label(_node(host="vm"), "abcdefghijklmnopq") == "vm (abcdefghijkl)"
    assert S.node_label(None, "abcdefghijklmnopq") == "abcdefghijkl"
    assert "\x1b" not in S.node_label(_node(host="evil\x1b[2J\nhost"), "n2")


class NodeAPI:
    """The engine's Swarm calls for one running job task on node ``n2``."""

    def __init__(self, node: dict | None, end_after: int | None = None):
        self.node = node
        self.end_after = end_after  # polls after which the task completes (exit 0)
        self.polls = 0
        self.removed: list[str] = []
        self.node_looks = 0

    def create_service(self, **kw):
        return {"ID": "svc1"}

    def tasks(self, filters):
        self.polls += 1
        status = {"State": "running", "Timestamp": "2026-01-01T00:00:00Z", "ContainerStatus": {"ExitCode": 0}}
        if self.end_after is not None and self.polls > self.end_after:
            status = {"State": "complete", "Timestamp": "2026-01-01T00:00:05Z",
                      "ContainerStatus": {"ExitCode": 0, "ContainerID": ""}}
        return [{"ID": "task1", "NodeID": "n2", "Version": {"Index": 5}, "Status": status}]

    def inspect_node(self, node_id):
        self.node_looks += 1
        if self.node is None:
            import docker.errors
            raise docker.errors.NotFound("node n2 not found")
        return self.node

    def remove_service(self, sid):
        self.removed.append(sid)

    def inspect_container(self, cid):
        import docker.errors
        raise docker.errors.NotFound("no such container")

    def service_logs(self, *a, **kw):
        return iter([])


def _run(api, tmp_path) -> X.TaskResult:
    return _run_fake(api, tmp_path, timeout=None)  # the fake's clock is not now


def test_a_task_on_a_drained_node_is_missing_and_its_job_removed(tmp_path):
    api = NodeAPI(_node(availability="drain", host="worker-2"))
    res = _run(api, tmp_path)
    assert (res.status, res.retryable) == (X.MISSING, False), res
    assert res.message == "node worker-2 (n2) was drained: the task runs again on another node"
    assert api.removed == ["svc1"]


def test_a_task_on_a_node_that_left_the_swarm_is_missing(tmp_path):
    api = NodeAPI(None)
    res = _run(api, tmp_path)
    assert res.status == X.MISSING and "node n2 left the swarm" in res.message, res
    assert api.removed == ["svc1"]


def test_a_task_on_a_silent_node_is_missing_once_the_bound_is_past(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "NODE_LOST_AFTER", 0.5)
    api = NodeAPI(_node(state="down", host="worker-2"))
    res = _run(api, tmp_path)
    assert res.status == X.MISSING and res.message.startswith("node worker-2 (n2) is down"), res
    assert api.node_looks >= 2  # seen silent, then silent past the bound
    assert api.removed == ["svc1"]


def test_a_task_swarm_takes_off_its_node_for_its_constraints_is_missing(tmp_path):
    class Moved(NodeAPI):
        def tasks(self, filters):
            return [{"ID": "task1", "NodeID": "n2", "Version": {"Index": 5},
                     "Status": {"State": "rejected", "Err": "assigned node no longer meets constraints"}}]
    api = Moved(_node())
    res = _run(api, tmp_path)
    assert res.status == X.MISSING and "no longer meets constraints" in res.message, res
    assert api.removed == ["svc1"]


def test_a_task_on_a_ready_node_runs_to_its_end(tmp_path):
    api = NodeAPI(_node(), end_after=10)
    res = _run(api, tmp_path)
    assert res.ok, res
    assert api.removed == [] and api.node_looks >= 1


# -- two nodes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_node(docker_swarm, docker_images):
    """A second engine joined as a worker, labelled ``<label>=two``, paused
    between tests; everything put back at the end (also on failure)."""
    root = os.path.join(SE_root(), "docker2-" + uuid.uuid4().hex[:8])
    os.makedirs(root)
    eng = SE.SecondEngine(root, [docker_images["root"], docker_images["nobody"]], SE.new_label())
    try:
        eng.start()
    except Exception as e:  # noqa: BLE001 - said as a failure, with the engine's words
        pytest.fail(f"could not bring up the second Docker engine: {e}", pytrace=False)
    try:
        eng.set_availability("pause")
        yield eng
    finally:
        eng.close()


def SE_root() -> str:
    from conftest import docker_test_root
    return docker_test_root()


class TaskWatch:
    """Records the spool's Swarm tasks (by the io.flowd labels) as they are seen:
    Swarm task id -> (flowd task, node id, states seen)."""

    def __init__(self, spool: str):
        import docker
        self.client = docker.from_env(version="auto", timeout=30)
        self.spool = spool
        self.seen: dict[str, tuple[str, str, set[str]]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                tasks = self.client.api.tasks(filters={"label": f"io.flowd.spool={self.spool}"})
            except Exception:  # noqa: BLE001 - look again
                tasks = []
            with self.lock:
                for t in tasks:
                    labels = ((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}
                    node = t.get("NodeID") or ""
                    if not node or "io.flowd.task" not in labels:
                        continue
                    state = (t.get("Status") or {}).get("State") or ""
                    entry = self.seen.setdefault(t["ID"], (labels["io.flowd.task"], node, set()))
                    entry[2].add(state)
            self.stop.wait(0.2)

    def nodes_by_task(self, states=("running", "complete")) -> dict[str, list[str]]:
        """flowd task -> the nodes its Swarm tasks were seen in ``states`` on."""
        with self.lock:
            out: dict[str, list[str]] = {}
            for task, node, seen in self.seen.values():
                if seen & set(states):
                    out.setdefault(task, []).append(node)
            return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.client.close()


def _main_node(client) -> str:
    return client.info()["Swarm"]["NodeID"]


def _workflow(folder: str, items: list[str], placement: str, sleep: int) -> str:
    os.makedirs(folder)
    xml = os.path.join(folder, "workflow.xml")
    body = "".join(f"<item>{w}</item>" for w in items)
    with open(xml, "w") as f:
        f.write(f"""<workflow name="nodes" mode="batch">
  <channel name="in">{body}</channel><channel name="out"/>
  <process name="work" image="flowd/busybox" parallel="{len(items)}" placement="{placement}">
    <input channel="in"/><output channel="out"/>
    <script>echo "started $FLOWD_TASK"; sleep {sleep}; cp in out</script>
  </process>
</workflow>
""")
    return xml


def _submit(d, xml) -> str:
    return json.loads(d.flowctl("submit", "--json", xml, check=0).stdout)["run"]


def _state(d, run) -> str:
    return json.loads(d.flowctl("status", run, "--json", check=0).stdout)["state"]


def _wait_end(d, run) -> str:
    return wait_until(lambda: (s := _state(d, run)) in ("succeeded", "failed", "cancelled") and s,
                      WAIT, f"run {run} to end")


def _check_items(d, workdir, run, want) -> None:
    got = _pull(d, run, "out", os.path.join(workdir, "out-" + run))
    assert sorted(got) == sorted(w.encode() for w in want), f"lost or duplicated items: {got}"


def _running_on(watch: TaskWatch, node: str, n: int) -> bool:
    on = watch.nodes_by_task(states=("running",))
    return sum(1 for nodes in on.values() if node in nodes) >= n


@pytest.fixture
def two_nodes(second_node, docker_swarm, daemon_factory, workdir):
    """(second engine, daemon, watch, main node id) with the second node active;
    afterwards: the spool's services removed, the main node's label removed,
    the second engine running again and its node paused."""
    eng = second_node
    if eng.proc is None or eng.proc.poll() is not None:
        eng.restart()
    eng.set_availability("active")
    d = _start(daemon_factory, workdir)
    spool = os.path.realpath(d.spool)
    watch = TaskWatch(spool)
    main = _main_node(docker_swarm)
    try:
        yield eng, d, watch, main
    finally:
        watch.close()
        d.stop()
        remove_spool_services(docker_swarm, spool)
        SE.docker1("node", "update", "--label-rm", eng.label, main, check=False)
        if eng.proc is None or eng.proc.poll() is not None:
            eng.restart()
        eng.set_availability("pause")


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.swarm
def test_placement_by_constraint_runs_every_task_on_the_labelled_node(two_nodes, workdir):
    eng, d, watch, main = two_nodes
    want = [f"item-{i}" for i in range(4)]
    xml = _workflow(os.path.join(workdir, "wf"), want, f"node.labels.{eng.label}==two", sleep=2)
    run = _submit(d, xml)
    assert _wait_end(d, run) == "succeeded", d.log()
    _check_items(d, workdir, run, want)
    nodes = watch.nodes_by_task()
    assert len(nodes) == len(want), nodes  # each task seen running on a node
    assert all(set(n) == {eng.node_id} for n in nodes.values()), (nodes, eng.node_id, main)


def _moved(eng, d, watch, main, workdir, act, words: tuple[str, ...]) -> None:
    """Tasks placed on the second node; once all run there, the main node gets
    the label too and ``act()`` happens to the second node: every task runs
    again on the main node, the run succeeds, nothing lost or duplicated."""
    want = [f"item-{i}" for i in range(2)]  # both run at once (a third started only when one ended here)
    xml = _workflow(os.path.join(workdir, "wf"), want, f"node.labels.{eng.label}==two", sleep=40)
    run = _submit(d, xml)
    wait_until(lambda: _running_on(watch, eng.node_id, len(want)), WAIT, "every task running on node two")
    SE.docker1("node", "update", "--label-add", f"{eng.label}=two", main)  # the rerun's place
    act()
    assert _wait_end(d, run) == "succeeded", d.log()
    _check_items(d, workdir, run, want)
    nodes = watch.nodes_by_task()
    assert len(nodes) == len(want), nodes
    for task, on in nodes.items():
        assert eng.node_id in on and main in on, (task, on, eng.node_id, main, watch.seen,
                                                  d.log(full=True)[-4000:])
    log = d.log(full=True)
    moved = [line for line in log.splitlines() if "the task runs again" in line and any(w in line for w in words)]
    assert len(moved) >= len(want), log[-3000:]
    assert "failed" not in _state(d, run)


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.swarm
def test_a_node_drained_mid_task_runs_its_tasks_again_on_the_other_node(two_nodes, workdir):
    eng, d, watch, main = two_nodes
    try:
        _moved(eng, d, watch, main, workdir, lambda: eng.set_availability("drain"), ("was drained",))
    finally:
        eng.set_availability("active")


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.swarm
def test_a_node_whose_engine_is_killed_mid_task_runs_its_tasks_again_on_the_other_node(
        two_nodes, workdir):
    eng, d, watch, main = two_nodes
    # Swarm's constraint enforcer may take the tasks off first (after the main node's
    # label change), before the manager calls the killed node down: either way they run again.
    _moved(eng, d, watch, main, workdir, eng.kill_machine, ("is down", "no longer meets constraints"))
    assert eng.node_state()[0] == "down"
