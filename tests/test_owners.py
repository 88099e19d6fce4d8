"""Who may change a run (flowd/owners.py, docs/operations.md "Who may change a run"):
its owner, root and members of admin_group; anyone else is refused, exit 1, with a
message naming the owner. Real users of this machine throughout (the tests run as
root and make them); the last tests go through the real socket of a non-root daemon."""
from __future__ import annotations

import grp
import json
import logging
import os
import subprocess
import textwrap
import time
from types import SimpleNamespace

import pytest

from daemon_fixtures import daemon_user, system_user, wait_until
from flowd import owners
from flowd.control import Caller
from flowd.errors import FlowError

ADMINS = "flowd-own-admins"
OWNER, OTHER, ADMIN_SUPP, ADMIN_PRIMARY = ("flowd-own-a", "flowd-own-b", "flowd-own-adm",
                                           "flowd-own-pri")


def group(name: str) -> int:
    """The system group ``name``, made when missing (a lost race with another session is fine)."""
    for _ in range(20):
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            if os.geteuid() != 0:
                pytest.skip(f"needs root to make the test group {name}")
            subprocess.run(["groupadd", "--system", name], capture_output=True)
            time.sleep(0.1)
    raise AssertionError(f"could not make the group {name}")


@pytest.fixture(scope="module")
def cast():
    """The users: an owner, another user, an admin by a supplementary group and one by
    the primary group; all in the socket's group (the daemon's own), so they may connect."""
    sock_group = grp.getgrgid(daemon_user().pw_gid).gr_name
    admins = group(ADMINS)
    return SimpleNamespace(
        owner=system_user(OWNER, groups=(sock_group,)),
        other=system_user(OTHER, groups=(sock_group,)),
        admin=system_user(ADMIN_SUPP, groups=(sock_group, ADMINS)),
        primary=system_user(ADMIN_PRIMARY, groups=(sock_group,), gid=admins),
        admins=admins)


def a_run(meta: dict):
    return SimpleNamespace(id="abcdef012345", meta=meta)


# -- the decision ----------------------------------------------------------------------

def test_the_owner_root_and_admins_may_change_a_run_and_another_user_may_not(cast):
    meta = {"submitted_uid": cast.owner.pw_uid, "submitted_by": OWNER}
    assert owners.may_change(cast.owner.pw_uid, meta, ADMINS)
    assert owners.may_change(0, meta, ADMINS)
    assert owners.may_change(cast.admin.pw_uid, meta, ADMINS), "a supplementary group's member"
    assert cast.primary.pw_gid == cast.admins, "the test user's primary group must be the admins'"
    assert owners.may_change(cast.primary.pw_uid, meta, ADMINS), "a primary group's member"
    assert not owners.may_change(cast.other.pw_uid, meta, ADMINS)
    assert not owners.may_change(cast.admin.pw_uid, meta, ""), "no admin_group: no admins"
    assert not owners.may_change(None, meta, ADMINS), "a caller the kernel did not name"


def test_a_refusal_names_the_owner_and_the_fix_and_both_outcomes_are_logged(cast, caplog):
    run = a_run({"submitted_uid": cast.owner.pw_uid, "submitted_by": OWNER})
    caplog.set_level(logging.INFO, logger="flowd")
    with pytest.raises(FlowError) as e:
        owners.check(run, Caller(cast.other.pw_uid, 42), ADMINS, "cancel")
    assert e.value.exit_status == 1
    assert str(e.value).startswith(f"run abcdef012345 belongs to {OWNER} (fix: ask {OWNER}, or an admin")
    owners.check(run, Caller(cast.admin.pw_uid, 43), ADMINS, "cancel")
    text = caplog.text
    assert f"run abcdef012345: cancel by {OTHER} (uid {cast.other.pw_uid}) refused" in text
    assert f"run abcdef012345: cancel by {ADMIN_SUPP} (uid {cast.admin.pw_uid}) allowed" in text


def test_one_refused_run_refuses_them_all_and_logs_no_allowed_change(cast, caplog):
    mine = a_run({"submitted_uid": cast.other.pw_uid})
    theirs = SimpleNamespace(id="0123456789ab", meta={"submitted_uid": cast.owner.pw_uid})
    caplog.set_level(logging.INFO, logger="flowd")
    with pytest.raises(FlowError, match=f"run 0123456789ab belongs to {OWNER}"):
        owners.check_all([mine, theirs], Caller(cast.other.pw_uid, 42), ADMINS, "cancel")
    assert "allowed" not in caplog.text


def test_an_owner_without_a_name_is_named_by_uid_and_an_unknown_owner_only_by_admins(cast):
    nameless = 4000321
    with pytest.raises(KeyError):
        __import__("pwd").getpwuid(nameless)
    run = a_run({"submitted_uid": nameless, "submitted_by": str(nameless)})
    assert owners.owner_name(run.meta) == str(nameless)
    with pytest.raises(FlowError, match=f"belongs to {nameless} \\(fix: ask {nameless}, or an admin"):
        owners.check(run, Caller(cast.other.pw_uid, 1), ADMINS, "resize")
    assert owners.may_change(nameless, run.meta, ADMINS)

    old = a_run({"submitted_by": OWNER})  # an older flowd's run: a name, no uid
    assert owners.owner_name(old.meta) == OWNER
    assert not owners.may_change(cast.owner.pw_uid, old.meta, ADMINS)
    assert owners.may_change(0, old.meta, ADMINS) and owners.may_change(cast.admin.pw_uid, old.meta, ADMINS)
    with pytest.raises(FlowError, match="older flowd .* only root and members of the config's "
                                        "admin_group may push to it"):
        owners.check(old, Caller(cast.owner.pw_uid, 1), ADMINS, "push to")


def test_admin_group_must_name_a_group(tmp_path, cast):
    from flowd.config import load
    from flowd.errors import UsageError

    conf = tmp_path / "flowd.toml"
    conf.write_text(f'admin_group = "{ADMINS}"\n')
    assert load(str(conf), required=True).admin_group == ADMINS
    conf.write_text('admin_group = "no-such-group-here"\n')
    with pytest.raises(UsageError, match="admin_group = 'no-such-group-here': no group named"):
        load(str(conf), required=True)


# -- a spool drop records its file's owner (in-process daemon) ---------------------------

def test_a_spool_drop_belongs_to_the_owner_of_the_dropped_file(tmp_path, cast):
    from test_daemon_inprocess import BATCH, Harness

    h = Harness(tmp_path)
    try:
        src = str(tmp_path / "job.xml")
        with open(src, "w") as f:
            f.write(textwrap.dedent(BATCH))
        os.chown(src, cast.owner.pw_uid, cast.owner.pw_gid)
        os.rename(src, os.path.join(h.d.spool, "incoming", "job.xml"))
        now = time.monotonic()
        end = now + 60
        while not h.d.runs:  # a stepped clock: the drop settles without sleeping
            assert time.monotonic() < end, "the intake did not make a run of the drop"
            h.step(now=now)
            h.d.control.wait(50)
            now += 0.5
        (run,) = h.d.runs.values()
        assert run.meta["submitted_uid"] == cast.owner.pw_uid
        assert run.view.summary()["owner"] == OWNER
    finally:
        h.close()


# -- a real second user over the real socket -----------------------------------------------

SLEEPER = """<workflow name="sleeper">
  <process name="nap" image="flowd/busybox"><script>sleep 300</script></process>
</workflow>
"""


@pytest.mark.docker
def test_only_the_owner_and_an_admin_may_cancel_over_the_real_socket(daemon_factory, workdir,
                                                                    docker_images, cast):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write(f'admin_group = "{ADMINS}"\nmax_containers = 4\n')  # the 3 runs at once
    d = daemon_factory(extra_args=["--config", conf]).start()
    assert d.pw is not None and d.pw.pw_uid != 0, "the daemon must run non-root here"
    xml = os.path.join(workdir, "wf", "sleeper.xml")
    os.makedirs(os.path.dirname(xml))
    with open(xml, "w") as f:
        f.write(SLEEPER)
    os.chmod(os.path.dirname(xml), 0o755)
    os.chmod(workdir, 0o755)

    def submit(pw) -> str:
        return d.flowctl("submit", xml, as_user=pw, check=0).stdout.strip()

    def state(run: str) -> dict:
        return json.loads(d.flowctl("status", run, "--json", check=0).stdout)

    runs = [submit(cast.owner) for _ in range(3)]
    for run in runs:
        wait_until(lambda: state(run)["tasks_running"] == 1, 120, f"run {run}'s task to start")
        assert state(run)["owner"] == OWNER
    table = d.flowctl("status", as_user=cast.other, check=0).stdout
    assert "OWNER" in table.splitlines()[0] and all(
        OWNER in line for line in table.splitlines() if line.startswith(tuple(runs))), table

    res = d.flowctl("cancel", runs[0], as_user=cast.other)
    assert res.returncode == 1, (res, d.log())
    assert f"run {runs[0]} belongs to {OWNER}" in res.stderr and "admin" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = d.flowctl("resize", runs[0], "nap", "--memory", "64m", as_user=cast.other)
    assert res.returncode == 1 and f"belongs to {OWNER}" in res.stderr, res
    res = d.flowctl("push", runs[0], "in", input="not yours\n", as_user=cast.other)
    assert res.returncode == 1 and f"belongs to {OWNER}" in res.stderr, res
    assert state(runs[0])["state"] == "running" and state(runs[0])["tasks_running"] == 1

    d.flowctl("cancel", runs[0], as_user=cast.admin, check=0)  # admin_group, supplementary
    d.flowctl("cancel", runs[1], as_user=cast.primary, check=0)  # admin_group, primary
    d.flowctl("cancel", runs[2], as_user=cast.owner, check=0)  # the owner
    for run in runs:
        assert state(run)["state"] == "cancelled"
    log = d.log(full=True)
    assert f"cancel by {OTHER} (uid {cast.other.pw_uid}) refused" in log, log
    assert f"run {runs[0]}: cancel by {ADMIN_SUPP} (uid {cast.admin.pw_uid}) allowed" in log, log
    assert f"run {runs[2]}: cancel by {OWNER} (uid {cast.owner.pw_uid}) allowed" in log, log
