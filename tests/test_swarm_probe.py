"""The spool check of each Swarm node (flowd.executor.swarmnodes): what a
probe job's end says, the node list and what is kept off a node, against a
fake engine API (the Docker boundary) and on the real one-node swarm.

The real "does not see the spool" case: the spool is a tmpfs mounted in a
private mount namespace, so flowd sees it and the engine (the node) does
not, as a node without the NFS mount would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from daemon_fixtures import REPO
from flowd.executor import swarmnodes as N
from test_swarm import docker_swarm  # noqa: F401 - the one-node swarm fixture

SPOOL = "/srv/flowd-spool"


def _node(nid, *, state="ready", availability="active", role="worker", host="n"):
    return {"ID": nid, "Description": {"Hostname": host}, "Spec": {"Role": role, "Availability": availability},
            "Status": {"State": state, "Addr": "10.0.0.1"}}


class FakeLink:
    """An EngineLink over a fake API: ``nodes`` listed, probe jobs ending as ``ends[node]`` says."""

    def __init__(self, nodes, ends=None, *, touch=True):
        self.nodes_list, self.ends, self.touch = nodes, ends or {}, touch
        self.closed = False
        self.made: list[dict] = []
        self.removed: list[str] = []
        self.stop = SimpleNamespace(wait=lambda s: None)
        self.api = SimpleNamespace(nodes=lambda: self.nodes_list, create_service=self.create_service,
                                   tasks=self.tasks, remove_service=self.removed.append)

    def call(self, fn, *a, **kw):
        return fn(*a, **kw)

    def create_service(self, task_template, name, labels, mode):
        node = task_template["Placement"]["Constraints"][0].split("==")[1]
        self.made.append({"node": node, "template": task_template, "labels": labels, "mode": mode})
        state, err, code = self.ends.get(node, ("complete", "", 0))
        if state == "complete" and self.touch:
            src = task_template["ContainerSpec"]["Mounts"][0]["Source"]
            open(os.path.join(src, "seen"), "w").close()
        self._end = {"Status": {"State": state, "Err": err, "ContainerStatus": {"ExitCode": code}}}
        return {"ID": f"svc-{node}"}

    def tasks(self, filters):
        return [self._end]


def _nodes(tmp_path, link, image="flowd/busybox"):
    return N.SwarmNodes(link, str(tmp_path), image, probe_timeout=5)


def test_a_node_that_wrote_the_file_sees_the_spool_and_is_not_avoided(tmp_path):
    link = FakeLink([_node("aaaa", role="manager", host="m1"), _node("bbbb", host="w1")])
    nodes = _nodes(tmp_path, link)
    nodes.refresh()
    snap = nodes.snapshot({"bbbb": 2})
    assert [(n["name"], n["spool"], n["tasks"]) for n in snap["nodes"]] == [("m1", "ok", 0), ("w1", "ok", 2)]
    assert nodes.avoid() == []
    probe = link.made[0]
    assert probe["mode"] == {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
    spec = probe["template"]["ContainerSpec"]
    assert spec["User"] == f"{os.getuid()}:{os.getgid()}" and spec["CapabilityDrop"] == ["ALL"]
    assert probe["template"]["RestartPolicy"]["Condition"] == "none"
    assert probe["labels"]["io.flowd.kind"] == "probe" and probe["labels"]["io.flowd.spool"] == str(tmp_path)
    assert sorted(link.removed) == ["svc-aaaa", "svc-bbbb"]  # each probe job removed
    assert os.listdir(tmp_path / "probe") == []  # and its folder


def test_a_node_without_the_spool_is_kept_off_with_its_reason(tmp_path, caplog):
    err = 'invalid mount config for type "bind": bind source path does not exist: /srv/x'
    link = FakeLink([_node("aaaa", host="m1"), _node("bbbb", host="w\x1b[31mred")],
                    ends={"bbbb": ("rejected", err, None)})
    nodes = _nodes(tmp_path, link)
    nodes.refresh()
    assert nodes.avoid() == ["node.id!=bbbb"]
    bad = [n for n in nodes.snapshot({})["nodes"] if n["spool"] == "no"]
    assert len(bad) == 1 and "does not see the spool" in bad[0]["why"] and "mount it there" in bad[0]["why"]
    warned = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert warned and "\x1b" not in warned[0]  # a node's hostname is escaped in the log


@pytest.mark.parametrize("state,err,code,touched,want,words", [
    ("complete", "", 0, False, "no", "is not the shared one"),
    ("failed", "task: non-zero exit (1)", 1, False, "no", "cannot write into"),
    ("rejected", "No such image: img:latest", None, False, "unknown", "probe image img is not on the node"),
    ("timeout", "", None, False, "unknown", "did not end within"),
    ("complete", "", 0, True, "ok", ""),
])
def test_what_each_end_of_a_probe_says(state, err, code, touched, want, words):
    got, why = N.verdict(state, code, err, touched, spool=SPOOL, image="img", timeout=5)
    assert got == want and words in why


def test_a_node_that_comes_back_is_checked_again_and_a_gone_node_is_dropped(tmp_path):
    link = FakeLink([_node("aaaa"), _node("bbbb")], ends={"bbbb": ("complete", "", 0)}, touch=False)
    nodes = _nodes(tmp_path, link)
    nodes.refresh()
    assert nodes.avoid() == ["node.id!=aaaa", "node.id!=bbbb"]
    link.touch = True
    link.nodes_list = [_node("aaaa"), _node("bbbb", availability="drain")]
    nodes.refresh()  # nothing came back: no new probe
    assert len(link.made) == 2
    link.nodes_list = [_node("bbbb", availability="active")]  # bbbb back from a drain; aaaa gone
    nodes.refresh()
    assert len(link.made) == 3 and nodes.avoid() == []
    assert [n["id"] for n in nodes.snapshot({})["nodes"]] == ["bbbb"]


def test_a_manager_that_cannot_be_reached_is_said_in_status(tmp_path):
    from flowd.errors import EngineUnavailable

    def down():
        raise EngineUnavailable("cannot connect to the Docker engine")
    link = FakeLink([])
    link.api.nodes = down
    nodes = _nodes(tmp_path, link)
    nodes.refresh()
    assert "Swarm manager cannot be reached" in nodes.snapshot({})["message"]


# -- on the real one-node swarm --------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, sys, docker
    from types import SimpleNamespace
    from flowd.executor.dockerapi import EngineLink
    from flowd.executor.swarmnodes import SwarmNodes
    owner = SimpleNamespace(max_workers=4, _report=lambda e: None, ping_interval=1.0)
    link = EngineLink(owner, docker.from_env(timeout=60))
    nodes = SwarmNodes(link, sys.argv[1], sys.argv[2], probe_timeout=60)
    nodes.refresh()
    print(json.dumps({"snapshot": nodes.snapshot({}), "avoid": nodes.avoid()}))
""")


def _probe(spool: str, image: str, *, private_tmpfs: bool = False) -> dict:
    cmd = [sys.executable, "-c", PROBE, spool, image]
    if private_tmpfs:  # flowd sees a tmpfs at the spool; the engine sees the empty folder under it
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs flowd-probe-test "$0" && exec "$@"', spool, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mine(result: dict) -> dict:
    """This engine's node in a probe's snapshot (another test may have joined a worker)."""
    managers = [n for n in result["snapshot"]["nodes"] if n["role"] == "manager"]
    assert len(managers) == 1, result
    return managers[0]


@pytest.mark.swarm
def test_the_manager_node_sees_a_real_spool(docker_swarm, tmp_path):  # noqa: F811
    spool = tmp_path / "spool"
    spool.mkdir()
    got = _mine(_probe(str(spool), "flowd/busybox"))
    assert (got["spool"], got["why"], got["state"]) == ("ok", "", "ready"), got
    assert not (spool / "probe").exists() or os.listdir(spool / "probe") == []


@pytest.mark.swarm
def test_a_node_that_does_not_see_the_spool_is_named_and_kept_off(docker_swarm, tmp_path):  # noqa: F811
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (a private mount namespace)")
    spool = tmp_path / "spool"
    spool.mkdir()
    result = _probe(str(spool), "flowd/busybox", private_tmpfs=True)
    got = _mine(result)
    assert got["spool"] == "no" and "does not see the spool" in got["why"], got
    assert any(c.startswith(f"node.id!={got['id']}") for c in result["avoid"]), result
    assert docker_swarm.api.services(filters={"label": [f"io.flowd.spool={spool}"]}) == []


@pytest.mark.swarm
def test_a_probe_image_missing_on_the_node_is_unknown_not_a_verdict(docker_swarm, tmp_path):  # noqa: F811
    spool = tmp_path / "spool"
    spool.mkdir()
    got = _mine(_probe(str(spool), "flowd/no-such-image-here:1"))
    assert got["spool"] == "unknown" and "swarm_probe_image" in got["why"], got


# -- end to end: the daemon (non-root, as the unit runs it) on the one-node swarm -------------

SLEEPER = """<workflow name="sleeper">
  <channel name="in"><item>a</item></channel>
  <process name="nap" image="flowd/busybox"><input channel="in"/><script>sleep 60</script></process>
</workflow>
"""


@pytest.mark.swarm
@pytest.mark.docker
def test_status_shows_the_nodes_their_spool_check_and_each_running_task_s_node(
        daemon_factory, workdir, docker_swarm):  # noqa: F811
    from daemon_fixtures import wait_until
    from test_swarm import _start, remove_spool_services
    d = _start(daemon_factory, workdir, 'executor = "swarm"\nswarm_probe_image = "flowd/busybox"\n')
    try:
        def manager():
            nodes = json.loads(d.flowctl("status", "--json").stdout)["containers"].get("nodes") or []
            mine = [n for n in nodes if n["role"] == "manager" and n["spool"] != "checking"]
            return mine[0] if mine else None
        node = wait_until(manager, 120, "the manager node's spool check")
        assert (node["spool"], node["state"], node["why"]) == ("ok", "ready", ""), node
        table = d.flowctl("status").stdout
        assert "NODE" in table and "SPOOL" in table and node["id"] in table, table
        assert "sees the spool" in d.log()
        wf = os.path.join(workdir, "sleeper.xml")
        with open(wf, "w") as f:
            f.write(SLEEPER)
        run = json.loads(d.flowctl("submit", "--json", wf).stdout)["run"]

        seen = {}

        def placed():
            seen["run"] = json.loads(d.flowctl("status", run, "--json").stdout)
            running = seen["run"].get("running") or []
            return running if running and running[0]["node"] else None
        try:
            (task,) = wait_until(placed, 120, "the task to be placed on a node")
        except AssertionError:
            raise AssertionError(f"not placed: {seen.get('run')}\n{d.log()[-3000:]}") from None
        assert task["process"] == "nap" and task["node"].startswith(node["name"]), task
        shown = d.flowctl("status", run).stdout
        assert "NODE" in shown and task["node"] in shown, shown
        busy = wait_until(lambda: (manager() or {}).get("tasks") == 1 and manager(), 60, "the node's task count")
        assert busy["tasks"] == 1
        d.flowctl("cancel", run)
    finally:
        d.stop()
        remove_spool_services(docker_swarm, os.path.realpath(d.spool))
    assert not os.listdir(os.path.join(d.spool, "probe"))  # each probe's folder removed


# -- a task no node can take ------------------------------------------------------------------

@pytest.mark.swarm
@pytest.mark.docker
def test_a_task_no_node_has_room_for_says_why_it_waits_then_fails_naming_the_fix(
        docker_swarm, docker_spool, docker_tmp, monkeypatch):  # noqa: F811
    from daemon_fixtures import wait_until
    from flowd.executor import base as X
    from flowd.executor import swarm as SW
    from test_executor_contract import Backend
    from test_swarm import _case, remove_spool_services
    monkeypatch.setattr(SW, "PENDING_LIMIT", 4.0)
    b = Backend("swarm", docker_tmp, docker_spool, docker_swarm)
    try:
        huge = 1 << 50  # a PiB: more than any node has
        spec = b.spec(_case("echo never\n"), memory=huge, memory_reservation=huge)
        b.ex.start(spec)
        why = wait_until(lambda: b.ex.nodes().get(spec.key), 60, "the task to wait for a node")
        assert why.startswith("(waiting: ") and "insufficient resources" in why, why
        r = b.result(spec)
        assert r.status == X.ERROR and not r.retryable, r
        assert "found no node for the task" in r.message and "insufficient resources" in r.message, r
        assert "add a node" in r.message
        assert docker_swarm.api.services(filters={"label": [f"io.flowd.spool={docker_spool}"]}) == []
    finally:
        b.ex.close()
        remove_spool_services(docker_swarm, docker_spool)
