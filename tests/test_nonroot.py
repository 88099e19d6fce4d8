"""The non-root pass: the test daemon runs as the unit runs it, and works that way.

flowd.service runs flowd as the system user ``flowd`` with the supplementary
group ``docker`` and UMask=0027. Root ignores permission bits, so a daemon run
as root in tests hid every bug of the real one (issue 9, finding 1). These
tests keep the default honest (daemon_fixtures), and check that what a
non-root daemon writes with that umask (the script, items from inline text,
from the workflow's files and from pushes) reaches a container whichever
user it runs as (config ``container_user``).
"""
from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys

import pytest

from daemon_fixtures import DAEMON_UMASK, DAEMON_USER, daemon_user, env_for_subprocess, user_groups, wait_until

pytestmark = pytest.mark.docker


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_the_test_daemon_runs_as_the_unit_runs_it(daemon):
    if os.geteuid() != 0:
        pytest.skip("the tests run as an ordinary user: the daemon runs as that user")
    pw = daemon_user(DAEMON_USER)
    st = _status(daemon.proc.pid)
    assert st["Uid"].split() == [str(pw.pw_uid)] * 4 and pw.pw_uid != 0, st["Uid"]
    assert st["Gid"].split() == [str(pw.pw_gid)] * 4, st["Gid"]
    assert str(grp.getgrnam("docker").gr_gid) in st["Groups"].split(), st["Groups"]
    assert int(st["Umask"], 8) == DAEMON_UMASK
    assert int(st["CapEff"], 16) == 0, "no capability: permission bits apply to it"
    spool = os.stat(daemon.spool)
    assert (spool.st_uid, stat.S_IMODE(spool.st_mode)) == (pw.pw_uid, 0o750)
    sock = os.stat(daemon.socket)
    assert sock.st_uid == pw.pw_uid and sock.st_gid == pw.pw_gid
    assert stat.S_IMODE(sock.st_mode) == 0o660


def test_the_interpreter_of_the_tests_runs_as_the_daemons_user():
    """.ci/setup-host builds .venv on /usr/bin/python3: a pyenv python under /root
    (0700) cannot run as another user, and every test daemon would fail to start."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    pw = daemon_user(DAEMON_USER)
    res = subprocess.run([sys.executable, "-c", "import flowd, docker, zmq, lxml, sdnotify"],
                         env=env_for_subprocess(HOME=pw.pw_dir), capture_output=True, text=True,
                         user=pw.pw_uid, group=pw.pw_gid, extra_groups=user_groups(pw), cwd="/")
    assert res.returncode == 0, (f"{sys.executable} cannot run as {pw.pw_name}: {res.stderr}\n"
                                 "fix: bash .ci/setup-host")


ECHO = """<workflow name="inputs" mode="service">
  <channel name="in">
    <item>inline</item>
    <item file="data/one.txt"/>
    <items glob="data/many/*.txt"/>
  </channel>
  <channel name="out"/>
  <process name="echo" image="{image}">
    <input channel="in"/><output channel="out"/>
    <script>cat in > out</script>
  </process>
</workflow>
"""


@pytest.mark.parametrize("container_user,image", [
    ("daemon", "flowd/busybox"),          # the default: flowd's uid and gid
    ("image", "flowd/busybox"),           # the image's root, without capabilities
    ("image", "flowd/busybox-nobody"),    # the image's uid 65534
])
def test_every_kind_of_input_reaches_the_container_of_a_non_root_daemon(
        daemon_factory, workdir, docker_images, container_user, image):
    cfg = os.path.join(workdir, "flowd.toml")
    with open(cfg, "w") as f:
        f.write(f'container_user = "{container_user}"\n')
    d = daemon_factory(extra_args=["--config", cfg]).start()
    folder = os.path.join(workdir, "wf")
    os.makedirs(os.path.join(folder, "data", "many"))
    files = {"data/one.txt": "from a file\n", "data/many/a.txt": "globbed a\n",
             "data/many/b.txt": "globbed b\n", "workflow.xml": ECHO.format(image=image)}
    for rel, text in files.items():
        with open(os.path.join(folder, rel), "w") as f:
            f.write(text)
    run = d.flowctl("submit", os.path.join(folder, "workflow.xml"), check=0).stdout.strip()
    d.flowctl("push", run, "in", input="pushed\n", check=0)

    def depth():
        detail = json.loads(d.flowctl("status", run, "--json", check=0).stdout)
        assert not detail["failures"], (detail["failures"], d.log())
        return {c["name"]: c["depth"] for c in detail["channels"]}["out"] == 5

    wait_until(depth, 180, "five outputs")
    out = os.path.join(workdir, "out")
    d.flowctl("pull", run, "out", "--out", out, check=0)
    got = sorted(open(os.path.join(out, n)).read() for n in os.listdir(out))
    assert got == sorted(["inline", "from a file\n", "globbed a\n", "globbed b\n", "pushed\n"])
    d.flowctl("cancel", run, check=0)
