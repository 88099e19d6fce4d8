"""Scripts that try to break the daemon, against the real engine and a non-root daemon.

The daemon runs as the package runs it (tests/daemon_fixtures.py: a non-root
member of the docker group): a folder a script leaves that root could delete
but flowd cannot is exactly what once killed it at every start (issue 9 #1).
"""
from __future__ import annotations

import json
import os

import pytest
from test_daemon import pull, submit_wait, wait_until, write

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    pass


JUNK = """<workflow name="junk">
  <channel name="in"><item>a</item><item>b</item></channel><channel name="out"/>
  <process name="p" image="flowd/busybox" retries="1">
    <input channel="in"/><output channel="out"/>
    <script><![CDATA[
mkdir junk junk/deep; echo x > junk/f; echo y > junk/deep/g
chmod 000 junk/deep; chmod 500 junk
mkdir shut; echo z > shut/h; chmod 555 shut
# the first attempt fails (its work/ is reset for the retry), the second succeeds
[ "$FLOWD_ATTEMPT" -ge 2 ] || exit 3
tr a-z A-Z < in > out
]]></script>
  </process>
</workflow>"""


def _config(workdir, text: str) -> list[str]:
    return ["--config", write(os.path.join(workdir, "flowd.toml"), text)]


@pytest.mark.parametrize("who", ["daemon", "image"])
def test_a_folder_a_script_makes_undeletable_never_stops_flowd(daemon_factory, workdir, who):
    d = daemon_factory(extra_args=_config(workdir, f'container_user = "{who}"\n')).start()
    detail = submit_wait(d, write(os.path.join(workdir, "wf", "workflow.xml"), JUNK))
    assert detail["state"] == "succeeded", d.log()
    run = detail["id"]
    assert pull(d, run, "out", os.path.join(workdir, "pulled")) == [b"A", b"B"]
    run_dir = os.path.join(d.spool, "runs", run)
    assert os.listdir(os.path.join(run_dir, "tasks")) == []
    assert d.flowctl("status", check=0).returncode == 0  # still serving
    # and every start after that: the old crash was at recovery, again and again
    for _ in range(2):
        d.stop()
        d.start()
        res = d.flowctl("status", "--json", run, check=0)
        assert json.loads(res.stdout)["state"] == "succeeded"
    trash = os.path.join(d.spool, "trash")
    if who == "daemon":
        # the container ran as flowd: flowd owns all it left and deletes all of it
        wait_until(lambda: os.listdir(trash) == [], what="the trash to be emptied")
        assert "could not delete" not in d.log(full=True)
    else:
        # root in the container (no capabilities) made folders flowd cannot change:
        # they are set aside in SPOOL/trash and named in the log, never a crash
        names = os.listdir(trash)
        assert names and all(n.split(".")[0].isdigit() for n in names)
        assert "could not delete" in d.log(full=True) and "delete it as root" in d.log(full=True)


SOURCES = """<workflow name="sources">
  <channel name="one"/><channel name="two"/><channel name="three"/>
  <process name="slow" image="flowd/busybox">
    <output channel="one"/>
    <script>sleep 3; echo "slow $FLOWD_TASK" > one</script>
  </process>
  <process name="fast" image="flowd/busybox">
    <output channel="two"/>
    <script>echo "fast $FLOWD_TASK" > two</script>
  </process>
  <process name="flaky" image="flowd/busybox" retries="2">
    <output channel="three"/>
    <script>[ "$FLOWD_ATTEMPT" -ge 2 ] || exit 1; sleep 1; echo "flaky $FLOWD_TASK" > three</script>
  </process>
</workflow>"""


def test_processes_without_inputs_each_run_once_with_their_own_task_id(daemon, workdir):
    detail = submit_wait(daemon, write(os.path.join(workdir, "wf", "workflow.xml"), SOURCES))
    assert detail["state"] == "succeeded", daemon.log()
    run = detail["id"]
    got = {}
    for ch in ("one", "two", "three"):
        items = pull(daemon, run, ch, os.path.join(workdir, "pulled", ch))
        assert len(items) == 1, (ch, items)  # exactly once: none lost, none doubled
        got[ch] = items[0].decode().split()
    assert [got[c][0] for c in ("one", "two", "three")] == ["slow", "fast", "flaky"]
    ids = [got[c][1] for c in ("one", "two", "three")]
    assert len(set(ids)) == 3, ids  # FLOWD_TASK is unique in the run
    procs = {p["name"]: p for p in detail["processes"]}
    assert all(procs[n]["done"] == 1 and procs[n]["failed"] == 0 for n in ("slow", "fast", "flaky"))
    logs = json.loads(daemon.flowctl("logs", "--json", run, check=0).stdout)["logs"]
    assert sorted((entry["process"], entry["task"]) for entry in logs) == sorted(
        [("slow", ids[0]), ("fast", ids[1]), ("flaky", ids[2]), ("flaky", ids[2])])
