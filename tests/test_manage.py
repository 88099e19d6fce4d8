"""Managing runs (SPEC §6.3): ``flowctl rm``, ``keep_finished`` and ``flowctl retry``,
against the real engine and a non-root daemon (tests/daemon_fixtures.py); the owner
checks with a second real user over the real socket (tests/test_owners.py's cast).
The crash safety of both is the crash sweep's (tests/crashsim.py, flows rm and retry)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from daemon_fixtures import env_for_subprocess, wait_until
from test_daemon import pull, run_containers, submit_wait, write
from test_docs import _doc_json, assert_shape
from test_owners import OWNER, cast  # noqa: F401 - the fixture, used by name

pytestmark = pytest.mark.docker

QUICK = """<workflow name="quick">
  <channel name="in"><item>a</item><item>b</item></channel>
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>cp in out</script>
  </process>
</workflow>
"""

SLEEPER = """<workflow name="sleeper">
  <process name="nap" image="flowd/busybox"><script>sleep 300</script></process>
</workflow>
"""

# Item b needs more memory than the daemon's default_memory (8m) gives a process that
# sets none (a 5 MiB string, built by doubling): it is OOM-killed (the hog is a child,
# so the script says so and fails); with 256m it succeeds.
HOG = ("sh -c 'x=aaaaaaaaaaaaaaaaaaaa; i=0; while [ $i -lt 18 ]; do x=$x$x; i=$((i+1)); done; "
       "echo ${#x} > /dev/null'")
GREEDY = f"""<workflow name="greedy">
  <channel name="in"><item>a</item><item>b</item><item>c</item></channel>
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>v=$(cat in); if [ "$v" = b ]; then {HOG} || exit 3; fi; echo "p($v)" > out</script>
  </process>
</workflow>
"""

# Two processes that both lose an item to the memory limit: p's limit is the daemon's
# default_memory, q's its own (8m); both go on (the run ends succeeded, 2 failed).
TWO = f"""<workflow name="two">
  <channel name="in"><item>a</item><item>b</item></channel>
  <channel name="in2"><item>b</item></channel>
  <channel name="out"/><channel name="out2"/>
  <process name="p" image="flowd/busybox" on-failure="continue">
    <input channel="in"/><output channel="out"/>
    <script>v=$(cat in); if [ "$v" = b ]; then {HOG} || exit 3; fi; echo "p($v)" > out</script>
  </process>
  <process name="q" image="flowd/busybox" memory="8m" on-failure="continue">
    <input channel="in2"/><output channel="out2"/>
    <script>{HOG} || exit 3; cat in2 > out2</script>
  </process>
</workflow>
"""


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    pass


def _xml(workdir, name, text) -> str:
    path = write(os.path.join(workdir, "wf", name + ".xml"), text)
    os.chmod(os.path.dirname(path), 0o755)  # another user submits it too
    os.chmod(workdir, 0o755)
    return path


def _config(workdir, text: str) -> str:
    path = os.path.join(workdir, "flowd.toml")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def _status(d) -> dict:
    return json.loads(d.flowctl("status", "--json", check=0).stdout)


def _ids(d) -> list[str]:
    return [r["id"] for r in _status(d)["runs"]]


def _detail(d, run) -> dict:
    return json.loads(d.flowctl("status", run, "--json", check=0).stdout)


def _starts(run: str, since: float) -> list[str]:
    """Task ids of the run's containers the engine started since ``since`` (its events, by label)."""
    res = subprocess.run(["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                          "--filter", f"label=io.flowd.run={run}", "--filter", "event=start",
                          "--format", '{{index .Actor.Attributes "io.flowd.task"}}'],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return sorted(res.stdout.split())


def _reload(d, conf: str, text: str) -> None:
    """The operator edits the config and reloads (SIGHUP, as `systemctl reload flowd`)."""
    n = d.log(full=True).count("reload: configuration re-read")
    with open(conf, "w") as f:
        f.write(text)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.log(full=True).count("reload: configuration re-read") > n, 60,
               "the daemon to reload its config")


# -- rm ---------------------------------------------------------------------------------

def test_rm_deletes_a_finished_run_and_everything_of_it(daemon, workdir, docker_client):
    xml = _xml(workdir, "quick", QUICK)
    keep = submit_wait(daemon, xml)["id"]
    run = submit_wait(daemon, xml)["id"]
    folder = os.path.join(daemon.spool, "runs", run)
    assert os.path.isdir(folder) and run in _ids(daemon)

    res = daemon.flowctl("rm", run, check=0)
    assert res.stdout.strip() == f"{run}: deleted"
    assert _ids(daemon) == [keep]
    wait_until(lambda: not os.path.exists(folder), 60, "the run's folder to go")
    wait_until(lambda: not [n for n in os.listdir(os.path.join(daemon.spool, "runs"))
                            if run in n], 60, "the hidden folder to go")
    for args in (("status", run), ("pull", run, "out", "--out", os.path.join(workdir, "o")),
                 ("logs", run), ("retry", run)):
        res = daemon.flowctl(*args)
        assert res.returncode == 1 and f"no run matches '{run}'" in res.stderr, (args, res)
    res = daemon.flowctl("rm", run)
    assert res.returncode == 1 and "no run matches" in res.stderr
    # the other run is untouched, and survives a restart; the deleted one does not come back
    daemon.stop()
    daemon.start()
    assert _ids(daemon) == [keep]
    assert pull(daemon, keep, "out", os.path.join(workdir, "k")) == [b"a", b"b"]
    assert f"run {run} (quick): deleted by root" in daemon.log(full=True)


def test_rm_refuses_an_active_run_and_force_cancels_then_deletes_it(daemon, workdir,
                                                                    docker_client):
    xml = _xml(workdir, "sleeper", SLEEPER)
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: _detail(daemon, run)["tasks_running"] == 1, 120, "the task to start")

    res = daemon.flowctl("rm", run)
    assert res.returncode == 1, res
    assert f"run {run} is running; cancel it first (flowctl cancel {run}) or use --force" \
        in res.stderr and "Traceback" not in res.stderr
    assert _detail(daemon, run)["state"] == "running" and _detail(daemon, run)["tasks_running"] == 1
    assert [c["State"] for c in run_containers(docker_client, run)] == ["running"]

    # someone follows the run meanwhile (a status --wait waiter in the daemon)
    watch = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", daemon.socket, "watch", run],
                             env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    first = watch.stderr.readline()  # its first answer: it now waits in the daemon
    assert first.startswith(f"{run}: running"), first
    res = daemon.flowctl("rm", "--force", run, check=0)
    assert res.stdout.strip() == f"{run}: deleted"
    assert run not in _ids(daemon)
    out, err = watch.communicate(timeout=120)
    assert watch.returncode == 1, (out, err)
    assert f"run {run} is gone (removed while it was followed)" in err, (out, err)
    wait_until(lambda: run_containers(docker_client, run) == [], 60, "the container to go")
    assert not os.path.exists(os.path.join(daemon.spool, "runs", run))
    log = daemon.log(full=True)
    assert f"run {run}: delete by root refused: it is running" in log
    assert f"run {run}: cancelled by root; deleted once its tasks stop" in log


def test_rm_of_several_runs_changes_nothing_when_one_is_unknown(daemon, workdir):
    xml = _xml(workdir, "quick", QUICK)
    runs = [submit_wait(daemon, xml)["id"] for _ in range(2)]
    res = daemon.flowctl("rm", runs[0], "ffffffffffff", runs[1])
    assert res.returncode == 1 and "no run matches 'ffffffffffff'" in res.stderr, res
    assert sorted(_ids(daemon)) == sorted(runs)
    res = json.loads(daemon.flowctl("rm", *runs, "--json", check=0).stdout)
    assert_shape(_doc_json("rm"), res)
    assert sorted(r["id"] for r in res["runs"]) == sorted(runs)
    assert _ids(daemon) == []


def test_keep_finished_deletes_old_finished_runs_and_keeps_young_ones(daemon_factory, workdir):
    conf = _config(workdir, "")
    d = daemon_factory(extra_args=["--config", conf]).start()
    xml = _xml(workdir, "quick", QUICK)
    old = submit_wait(d, xml)["id"]
    young = submit_wait(d, xml)["id"]
    d.stop()
    # The daemon reads a run's end from its run.json (finished_at): make one 3 days old.
    path = os.path.join(d.spool, "runs", old, "run.json")
    meta = json.load(open(path))
    meta["finished_at"] -= 3 * 86400
    st = os.stat(path)
    with open(path, "w") as f:
        json.dump(meta, f)
    os.chown(path, st.st_uid, st.st_gid)
    _config(workdir, 'keep_finished = "2d"\n')
    d.start()
    wait_until(lambda: _ids(d) == [young], 60, "the old run to be deleted")
    assert f"run {old} (quick): deleted: it ended" in d.log(full=True)
    assert "more than keep_finished (172800s)" in d.log(full=True)
    # a short keep_finished: the young run goes too, by the periodic check, as it ages;
    # an active run (older than that) never does
    running = d.flowctl("submit", _xml(workdir, "sleeper", SLEEPER), check=0).stdout.strip()
    wait_until(lambda: _detail(d, running)["tasks_running"] == 1, 120, "the task to start")
    _reload(d, conf, 'keep_finished = "2s"\n')
    wait_until(lambda: young not in _ids(d), 60, "the young run to be deleted once 2 s old")
    later = submit_wait(d, xml)["id"]  # ends after the sleeper started
    wait_until(lambda: later not in _ids(d), 60, "a run that ended later to be deleted too")
    assert _ids(d) == [running] and _detail(d, running)["tasks_running"] == 1
    d.flowctl("cancel", running, check=0)
    wait_until(lambda: _ids(d) == [], 60, "the cancelled run to be deleted 2 s after it ended")


def test_keep_finished_must_be_a_duration(tmp_path):
    from flowd.config import load
    from flowd.errors import UsageError

    conf = tmp_path / "flowd.toml"
    conf.write_text('keep_finished = "7d"\n')
    assert load(str(conf), required=True).keep_finished == 7 * 86400
    conf.write_text('keep_finished = ""\n')
    assert load(str(conf), required=True).keep_finished is None
    conf.write_text('keep_finished = "a week"\n')
    with pytest.raises(UsageError, match=r"keep_finished = 'a week': 'a week' is not a duration; "
                                         r"write e.g. 90s, 5m or 2h"):
        load(str(conf), required=True)


# -- retry ------------------------------------------------------------------------------

def test_retry_after_an_oom_and_a_bigger_memory_finishes_the_run(daemon_factory, workdir):
    conf = _config(workdir, 'default_memory = "8m"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    t0 = time.time()
    detail = submit_wait(d, _xml(workdir, "greedy", GREEDY), check=1)
    run = detail["id"]
    assert detail["state"] == "failed" and detail["tasks_failed"] == 1, detail
    (failure,) = detail["failures"]
    assert "out of memory" in failure["reason"] or "exit status 3" in failure["reason"], failure
    assert _starts(run, t0) == ["1", "2"]  # a, then b (c never started: on-failure stop)

    _reload(d, conf, 'default_memory = "256m"\n')
    t1 = time.time()
    res = d.flowctl("retry", run, "--wait", "--json", check=0)
    done = json.loads(res.stdout)
    assert done["state"] == "succeeded" and done["tasks_failed"] == 0 and done["failures"] == []
    assert pull(d, run, "out", os.path.join(workdir, "o")) == [b"p(a)\n", b"p(b)\n", b"p(c)\n"]
    assert _starts(run, t1) == ["2", "3"]  # b again, then c; a never again
    # b's attempt numbers go on: its first attempt's log and trace row stay beside the new
    rows = [json.loads(line) for line in d.flowctl("trace", run, "--json", check=0).stdout.splitlines()]
    assert sorted((r["task"], r["attempt"], r["state"] == "succeeded") for r in rows) == [
        ("1", 1, True), ("2", 1, False), ("2", 2, True), ("3", 1, True)], rows
    assert sorted(n for n in os.listdir(os.path.join(d.spool, "runs", run, "logs"))
                  if ".p.2." in n) == ["p.p.2.1.log", "p.p.2.2.log"]
    assert not os.listdir(os.path.join(d.spool, "runs", run, "failed"))
    assert f"run {run}: 1 failed task(s) retried" in d.log(full=True)
    assert f"run {run}: retry by root (uid 0) allowed" in d.log(full=True)
    # nothing left to retry
    res = d.flowctl("retry", run)
    assert res.returncode == 1 and f"run {run} has no failed task to retry" in res.stderr, res


def test_retry_of_one_process_leaves_the_others_failed(daemon_factory, workdir):
    conf = _config(workdir, 'default_memory = "8m"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    detail = submit_wait(d, _xml(workdir, "two", TWO))
    run = detail["id"]
    assert detail["state"] == "succeeded" and detail["tasks_failed"] == 2, detail
    res = d.flowctl("retry", run, "--process", "nosuch")
    assert res.returncode == 1 and "has no process 'nosuch'" in res.stderr, res

    _reload(d, conf, 'default_memory = "256m"\n')
    res = json.loads(d.flowctl("retry", run, "--process", "p", "--json", check=0).stdout)
    assert_shape(_doc_json("retry"), res)
    assert res["retried"] == 1 and res["state"] == "running" and res["tasks"] == ["2"], res
    done = json.loads(d.flowctl("watch", run, "--json", check=0).stdout)
    assert done["state"] == "succeeded" and done["tasks_failed"] == 1, done
    assert [f["task"] for f in done["failures"]] == [f["task"] for f in detail["failures"]
                                                      if f["process"] == "q"]
    assert pull(d, run, "out", os.path.join(workdir, "o")) == [b"p(a)\n", b"p(b)\n"]
    assert pull(d, run, "out2", os.path.join(workdir, "o2")) == []
    res = d.flowctl("retry", run, "--process", "p")
    assert res.returncode == 1 and "has no failed task of process p to retry" in res.stderr
    res = d.flowctl("retry", run, "--process", "q")  # q's own memory= is still 8m
    assert res.stdout.strip() == f"{run}: 1 failed task(s) retried; the run is running", res


# -- owners -----------------------------------------------------------------------------

def test_only_the_owner_and_an_admin_may_rm_and_retry(daemon_factory, workdir, cast):  # noqa: F811
    from test_owners import ADMINS, OTHER

    conf = _config(workdir, f'admin_group = "{ADMINS}"\ndefault_memory = "8m"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    xml = _xml(workdir, "greedy", GREEDY)
    runs = [json.loads(d.flowctl("submit", "--wait", "--json", xml, as_user=cast.owner).stdout)["id"]
            for _ in range(2)]
    for run in runs:
        assert _detail(d, run)["state"] == "failed"

    res = d.flowctl("retry", runs[0], as_user=cast.other)
    assert res.returncode == 1 and f"run {runs[0]} belongs to {OWNER}" in res.stderr, res
    res = d.flowctl("rm", runs[1], runs[0], as_user=cast.other)
    assert res.returncode == 1 and f"belongs to {OWNER}" in res.stderr, res
    assert sorted(_ids(d)) == sorted(runs) and _detail(d, runs[0])["tasks_failed"] == 1
    log = d.log(full=True)
    assert f"retry by {OTHER} (uid {cast.other.pw_uid}) refused" in log
    assert f"delete by {OTHER} (uid {cast.other.pw_uid}) refused" in log

    d.flowctl("rm", runs[0], as_user=cast.admin, check=0)
    d.flowctl("rm", runs[1], as_user=cast.owner, check=0)
    assert _ids(d) == []
    log = d.log(full=True)
    assert f"run {runs[1]}: delete by {OWNER} (uid {cast.owner.pw_uid}) allowed" in log
