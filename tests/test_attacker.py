"""An attacker with a seat in the socket's group, against a non-root daemon (issue 8).

The daemon runs as the unit runs it (daemon_fixtures: ``flowd-test``, in the
docker group, umask 0027), over its real socket, with the real engine. Two
more system users share the socket's group and nothing else: the victim
``flowd-alice`` and the attacker ``flowd-mallory`` (neither is in docker).
Each test repeats one finding of issue 8 and shows the attack refused.
"""
from __future__ import annotations

import grp
import json
import os
import re
import stat
import subprocess
import sys
import uuid

import pytest

from daemon_fixtures import (daemon_user, env_for_subprocess, on_a_terminal, system_user, user_groups,
                             wait_until)

pytestmark = pytest.mark.docker

ALICE = "flowd-alice"
MALLORY = "flowd-mallory"
VOLUME_IMAGE = "flowd/busybox-volume:latest"  # flowd/busybox with VOLUME /data
OSC_TITLE = b"\x1b]0;pwned\x07"
OSC_CLIPBOARD = b"\x1b]52;c;cHduZWQ=\x07"
CSI_ERASE = b"\x1b[2K"


# -- the cast ---------------------------------------------------------------------------

class Cast:
    def __init__(self, daemon, workdir):
        self.d = daemon
        self.workdir = workdir
        self.alice = system_user(ALICE, groups=(self.group,))
        self.mallory = system_user(MALLORY, groups=(self.group,))
        for pw in (self.alice, self.mallory):
            names = {grp.getgrgid(g).gr_name for g in user_groups(pw)}
            assert "docker" not in names, f"{pw.pw_name} must not be in the docker group"
        self.home = {}
        for pw in (self.alice, self.mallory):  # a private folder each, like a home
            home = os.path.join(workdir, pw.pw_name)
            os.mkdir(home, 0o700)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            self.home[pw.pw_name] = home

    @property
    def group(self) -> str:
        """The socket's group (the daemon's own group: flowd's, in the package)."""
        pw = daemon_user()
        return grp.getgrgid(pw.pw_gid).gr_name

    def file(self, pw, rel: str, text: str | bytes) -> str:
        """A file of ``pw``'s, in their folder."""
        path = os.path.join(self.home[pw.pw_name], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def run(self, pw, argv, timeout=120, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` as ``pw`` (their uid, gid and groups), from /."""
        return subprocess.run(argv, user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=user_groups(pw), cwd="/", capture_output=True,
                              env=env_for_subprocess(HOME=pw.pw_dir, USER=pw.pw_name),
                              timeout=timeout, **kw)

    def python(self, pw, code: str, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(pw, [sys.executable, "-c", code, *map(str, args)], text=True, **kw)

    def sh(self, pw, script: str, **env) -> subprocess.CompletedProcess:
        return self.run(pw, ["/bin/sh", "-c", script, "sh", *env.values()], text=True)

    def submit(self, pw, xml_text: str, name="workflow.xml", wait=True, check=None) -> dict:
        xml = self.file(pw, os.path.join(uuid.uuid4().hex[:8], name), xml_text)
        args = ["submit", "--json", xml] + (["--wait"] if wait else [])
        res = self.d.flowctl(*args, as_user=pw, check=check)
        assert res.stdout.strip(), f"flowctl submit said nothing:\n{res.stderr}\n{self.d.log()}"
        return json.loads(res.stdout)


@pytest.fixture
def cast(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    assert d.pw is not None and d.pw.pw_uid != 0, "the daemon must run non-root here"
    return Cast(d, workdir)


def spool_path(cast, *parts) -> str:
    return os.path.join(cast.d.spool, *parts)


def containers_of(docker_client, run: str) -> list[dict]:
    return docker_client.api.containers(all=True, filters={"label": [f"io.flowd.run={run}"]})


def inspect(docker_client, cid: str) -> dict:
    """The engine's view of a container; {} once it is gone (flowd removes them)."""
    import docker

    try:
        return docker_client.api.inspect_container(cid)
    except docker.errors.NotFound:
        return {}


def task_folder(docker_client, run: str) -> str:
    """The host folder a running task of ``run`` has at /task (from the engine)."""
    def find():
        for c in containers_of(docker_client, run):
            info = inspect(docker_client, c["Id"])
            if info and info["State"]["Running"]:
                for m in info["Mounts"]:
                    if m["Destination"] == "/task":
                        return m["Source"]
        return None
    return wait_until(find, 120, f"a running container of run {run}")


def on_terminal(argv, pw=None) -> bytes:
    """What ``argv``, run as ``pw``, writes to a terminal (all of its stdio on it)."""
    who = {}
    if pw is not None:
        who = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=user_groups(pw))
    return on_a_terminal(argv, whole=True, cwd="/", env=env_for_subprocess(TERM="xterm"),
                         **who)[1]


# -- 1. root through a setuid output ----------------------------------------------------

def test_a_setuid_output_becomes_a_plain_item_of_the_daemons_that_mallory_cannot_run(cast):
    detail = cast.submit(cast.alice, """<workflow name="suid">
  <channel name="o"/>
  <process name="p" image="flowd/busybox">
    <output channel="o"/>
    <script>cp /bin/busybox o; chmod 4755 o; chmod g+s o 2>/dev/null; true</script>
  </process>
</workflow>""")
    assert detail["state"] == "succeeded", (detail, cast.d.log())
    folder = spool_path(cast, "runs", detail["id"], "channels", "o")
    names = os.listdir(folder)
    assert names, "the output became no item"
    for name in names:
        path = os.path.join(folder, name)
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
        assert st.st_uid == cast.d.pw.pw_uid, f"{path} belongs to uid {st.st_uid}, not flowd's"
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{path}: {stat.filemode(st.st_mode)}"
        assert stat.S_IMODE(st.st_mode) & ~0o640 == 0, f"{path}: {stat.filemode(st.st_mode)}"
        assert st.st_nlink == 1, f"{path} has {st.st_nlink} links"
        # mallory, in the group, may not run it, nor even reach it
        with pytest.raises(PermissionError):
            cast.run(cast.mallory, [path, "sh", "-c", "id -u"])
        res = cast.sh(cast.mallory, 'cat "$1" > /dev/null', p=path)
        assert res.returncode != 0 and "Permission denied" in res.stderr, res


# -- 2. host bind mount through a symlink race ---------------------------------------

def test_mallory_cannot_plant_anything_in_a_running_tasks_folder(cast, docker_client):
    detail = cast.submit(cast.alice, """<workflow name="slow">
  <channel name="res"/>
  <process name="p" image="flowd/busybox" timeout="5m">
    <output channel="res"/>
    <script>mkdir res; echo mine > res/a; sleep 300</script>
  </process>
</workflow>""", wait=False, check=0)
    run = detail["run"]
    work = task_folder(docker_client, run)
    wait_until(lambda: os.path.exists(os.path.join(work, "res", "a")), 120, "the task's output")
    attempts = {
        "a link in the output folder": 'ln -s / "$1/res/zz"',
        "a link in the task folder": 'ln -s / "$1/zz"',
        "a new file": 'echo evil > "$1/evil"',
        "overwrite an output": 'echo evil > "$1/res/a"',
        "rename an output": 'mv "$1/res/a" "$1/res/b"',
        "list the folder": 'ls "$1"',
    }
    for what, script in attempts.items():
        res = cast.sh(cast.mallory, script, w=work)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (what, res)
    assert sorted(os.listdir(os.path.join(work, "res"))) == ["a"]
    assert not os.path.lexists(os.path.join(work, "zz"))
    with open(os.path.join(work, "res", "a"), "rb") as f:
        assert f.read() == b"mine\n"
    cast.d.flowctl("cancel", run, as_user=cast.alice, check=0)


def test_a_link_in_an_output_folder_never_shows_the_host_to_the_next_task(cast):
    token = uuid.uuid4().hex
    sentinel = os.path.join(cast.workdir, "sentinel")
    with open(sentinel, "w") as f:
        f.write(token + "\n")
    os.chmod(sentinel, 0o644)  # anyone on the host may read it; no container should see it
    detail = cast.submit(cast.alice, f"""<workflow name="links">
  <channel name="res"/><channel name="out"/>
  <process name="make" image="flowd/busybox">
    <output channel="res"/>
    <script>mkdir res; echo ok > res/a; ln -s / res/zz; ln -s {sentinel} res/zf</script>
  </process>
  <process name="use" image="flowd/busybox">
    <input channel="res" as="x"/><output channel="out"/>
    <script>{{ cat /task/x; cat /task/x{sentinel}; ls /task/x/; }} > out 2>&amp;1; true</script>
  </process>
</workflow>""")
    out = os.path.join(cast.home[ALICE], "out")
    cast.d.flowctl("pull", detail["id"], "out", "--out", out, as_user=cast.alice, check=0)
    outs = [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]
    for got in outs:
        assert token.encode() not in got, f"a task read the host's file through a link: {got!r}"
    if detail["state"] == "succeeded":
        assert outs == [b"ok\n"], ("only the regular file may become an item", outs)
    else:
        reasons = [f["reason"] for f in detail["failures"] if f["process"] == "make"]
        assert reasons and "bad output" in reasons[0], (detail, cast.d.log())
        assert outs == []


# -- 3. upload hijack --------------------------------------------------------------------

BEGIN = """import sys
from flowctl.client import Client
print(Client(sys.argv[1], timeout=60).call("upload_begin", {"size": int(sys.argv[2])})[0]["upload"])
"""
CHUNK = """import sys
from flowctl.client import Client
from flowd.errors import FlowError
c = Client(sys.argv[1], timeout=60)
try:
    c.call("upload_chunk", {"upload": sys.argv[2], "path": "workflow.xml", "offset": 0},
           open(sys.argv[3], "rb").read())
except FlowError as e:
    print(f"refused: {e}")
    sys.exit(3)
print("written")
"""
SUBMIT = """import sys
from flowctl.client import Client
from flowd.errors import FlowError
try:
    r = Client(sys.argv[1], timeout=60).call("submit", {"upload": sys.argv[2], "name": "workflow.xml"},
                                             timeout=300)[0]
except FlowError as e:
    print(f"refused: {e}")
    sys.exit(3)
print(r["run"])
"""

HIJACK = """<workflow name="{who}s">  <!-- alice and pwned: the same length -->
  <channel name="o"/>
  <process name="p" image="flowd/busybox"><output channel="o"/><script>echo {who} > o</script></process>
</workflow>
"""


def test_mallory_can_neither_list_uploads_nor_write_to_alices(cast):
    res = cast.sh(cast.mallory, 'ls "$1"', u=spool_path(cast, "uploads"))
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    alices = cast.file(cast.alice, "up/workflow.xml", HIJACK.format(who="alice"))
    evil = cast.file(cast.mallory, "up/workflow.xml", HIJACK.format(who="pwned"))
    size = os.path.getsize(alices)
    assert os.path.getsize(evil) == size  # refused for whose it is, not for its size
    begun = cast.python(cast.alice, BEGIN, cast.d.socket, size)
    assert begun.returncode == 0, begun.stderr
    upload = begun.stdout.strip()
    # mallory knows (or guesses) the id: the daemon refuses her anyway
    hijack = cast.python(cast.mallory, CHUNK, cast.d.socket, upload, evil)
    assert hijack.returncode == 3 and hijack.stdout.startswith("refused:"), (hijack, cast.d.log())
    # alice's own upload is untouched and goes on
    mine = cast.python(cast.alice, CHUNK, cast.d.socket, upload, alices)
    assert mine.returncode == 0, (mine, cast.d.log())
    # nor may she submit it as her own
    steal = cast.python(cast.mallory, SUBMIT, cast.d.socket, upload)
    assert steal.returncode == 3 and steal.stdout.startswith("refused:"), (steal, cast.d.log())
    assert not json.loads(cast.d.flowctl("status", "--json", check=0).stdout)["runs"]
    sub = cast.python(cast.alice, SUBMIT, cast.d.socket, upload)
    assert sub.returncode == 0, (sub, cast.d.log())
    run = sub.stdout.strip()
    detail = json.loads(cast.d.flowctl("watch", run, "--json", as_user=cast.alice).stdout)
    assert detail["state"] == "succeeded", (detail, cast.d.log())
    out = os.path.join(cast.home[ALICE], "out")
    cast.d.flowctl("pull", run, "o", "--out", out, as_user=cast.alice, check=0)
    assert [open(os.path.join(out, n), "rb").read() for n in os.listdir(out)] == [b"alice\n"]


# -- 4. tampering with other users' runs --------------------------------------------------

PROBE = """import json, os, sys
wins = []
def attempt(what, fn):
    try:
        fn()
    except OSError:
        return
    wins.append(what)
for line in sys.stdin:
    kind, p = line.rstrip("\\n").split(" ", 1)
    attempt("open " + p, lambda: os.close(os.open(p, os.O_RDONLY | os.O_NOFOLLOW)))
    attempt("rename " + p, lambda: os.rename(p, p + ".mallory"))
    if kind == "d":
        attempt("list " + p, lambda: os.listdir(p))
        attempt("create in " + p, lambda: os.close(os.open(os.path.join(p, ".mallory"),
                                                            os.O_WRONLY | os.O_CREAT | os.O_EXCL)))
    else:
        attempt("write " + p, lambda: os.close(os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)))
print(json.dumps(wins))
"""


def test_mallory_cannot_open_rename_or_write_anything_under_runs(cast, docker_client):
    done = cast.submit(cast.alice, """<workflow name="done">
  <channel name="in"><item>x</item></channel><channel name="o"/>
  <process name="p" image="flowd/busybox"><input channel="in"/><output channel="o"/>
    <script>mkdir o; cat in > o/1; echo two > o/2</script></process>
</workflow>""")
    assert done["state"] == "succeeded", (done, cast.d.log())
    running = cast.submit(cast.alice, """<workflow name="running">
  <channel name="in"><item>y</item></channel><channel name="o"/>
  <process name="p" image="flowd/busybox" timeout="5m"><input channel="in"/><output channel="o"/>
    <script>echo partial > o; sleep 300</script></process>
</workflow>""", wait=False, check=0)
    work = task_folder(docker_client, running["run"])
    wait_until(lambda: os.path.exists(os.path.join(work, "o")), 120, "the running task's output")
    entries = []
    for top in {spool_path(cast, "runs"), work}:  # the task's folder, wherever flowd keeps it
        for folder, dirs, files in os.walk(top):  # as root: everything there is
            entries.append(f"d {folder}")
            entries += [f"f {os.path.join(folder, n)}" for n in dirs
                        if os.path.islink(os.path.join(folder, n))]
            entries += [f"f {os.path.join(folder, n)}" for n in files]
    assert f"f {os.path.join(work, 'o')}" in entries, entries
    assert any("/channels/o/" in e for e in entries), ("alice's outputs should be there", entries)
    probe = cast.python(cast.mallory, PROBE, input="\n".join(entries) + "\n")
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == [], "mallory got through:\n" + probe.stdout
    cast.d.flowctl("cancel", running["run"], as_user=cast.alice, check=0)


# -- 5. terminal and log injection -------------------------------------------------------

def _injecting_run(cast) -> dict:
    printf = r"\033]0;pwned\007\033]52;c;cHduZWQ=\007\033[2Kafter"
    return cast.submit(cast.alice, f"""<workflow name="inject">
  <channel name="o"/><channel name="f"/>
  <process name="shout" image="flowd/busybox">
    <output channel="o"/>
    <script>printf '{printf}\\n'; exit 3</script>
  </process>
  <process name="names" image="flowd/busybox">
    <output channel="f"/>
    <script>mkdir f; mkfifo "f/$(printf 'n{printf}')"; printf '{printf}\\n'</script>
  </process>
</workflow>""")


def test_container_chosen_strings_are_escaped_on_a_terminal_and_logs_stay_exact_in_a_pipe(cast):
    detail = _injecting_run(cast)
    assert detail["state"] == "failed", (detail, cast.d.log())
    evil = OSC_TITLE + OSC_CLIPBOARD + CSI_ERASE + b"after"
    assert any(evil.decode() in (f.get("log_tail") or "") + f["reason"] for f in detail["failures"]), \
        ("the test needs the sequences in a failure", detail)
    flowctl = [sys.executable, "-m", "flowctl", "--socket", cast.d.socket]
    run = detail["id"]
    shown = {
        "status on a terminal": on_terminal(flowctl + ["status", run], cast.mallory),
        "status in a pipe": cast.run(cast.mallory, flowctl + ["status", run]).stdout,
        "watch on a terminal": on_terminal(flowctl + ["watch", run], cast.mallory),
        "logs on a terminal": on_terminal(flowctl + ["logs", run], cast.mallory),
    }
    # watch's live display moves the cursor itself (flowctl/live.py: CSI n F, CSI 2K, CSI J):
    # those three are flowctl's own; nothing else may reach the terminal
    shown["watch on a terminal"] = re.sub(rb"\x1b\[(?:\d+F|2K|J)", b"", shown["watch on a terminal"])
    for what, out in shown.items():
        assert b"\x1b" not in out and b"\x07" not in out, (what, out)
        assert b"\\x1b]0;pwned\\x07" in out, (what, "the escaped form should be shown", out)
    piped = cast.run(cast.mallory, flowctl + ["logs", run, "shout"])
    assert piped.returncode == 0, piped.stderr
    assert evil + b"\n" in piped.stdout, ("piped logs are byte-exact", piped.stdout)


def test_a_file_name_or_argument_with_a_newline_forges_no_daemon_log_line(cast):
    forged = "2026-01-01 00:00:00,000 flowd[1] INFO uid 0 (root) pid 1: cancel runs=['all']"
    name = f"w.xml\n{forged}\n.xml"
    xml = cast.file(cast.mallory, os.path.join("forge", name), """<workflow name="named">
  <process name="p" image="flowd/busybox"><script>true</script></process>
</workflow>""")
    res = cast.d.flowctl("submit", xml, as_user=cast.mallory)
    assert "Traceback" not in res.stderr, res
    for args in (["cancel", f"abc\n{forged}"], ["status", f"abc\n{forged}"],
                 ["logs", f"abc\n{forged}"]):
        res = cast.d.flowctl(*args, as_user=cast.mallory)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res
    log = cast.d.log(full=True)
    assert "pid 1: cancel" in log, "the arguments should reach the log, escaped:\n" + log
    for line in log.splitlines():
        assert not line.startswith("2026-01-01 00:00:00,000 flowd[1]"), f"forged: {line!r}\n{log}"


# -- 6. containers, pull, config limits ----------------------------------------------------

@pytest.fixture(scope="session")
def volume_image(docker_client, docker_images):
    try:
        docker_client.api.inspect_image(VOLUME_IMAGE)
    except Exception:  # noqa: BLE001 - not there yet: make it
        cid = docker_client.api.create_container(docker_images["root"], ["true"])["Id"]
        try:
            repo, tag = VOLUME_IMAGE.rsplit(":", 1)
            docker_client.api.commit(cid, repository=repo, tag=tag, changes=["VOLUME /data"])
        finally:
            docker_client.api.remove_container(cid, force=True)
    return VOLUME_IMAGE


def _volumes() -> set[str]:
    res = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True, check=True)
    return set(res.stdout.split())


def test_a_tasks_anonymous_volume_is_removed_with_its_container(cast, docker_client, volume_image):
    before = _volumes()
    detail = cast.submit(cast.alice, f"""<workflow name="vol">
  <channel name="o"/>
  <process name="p" image="{volume_image}">
    <output channel="o"/><script>ls /data > o; sleep 5</script>
  </process>
</workflow>""", wait=False, check=0)
    run = detail["run"]

    def volume_of_task():
        for c in containers_of(docker_client, run):
            for m in inspect(docker_client, c["Id"]).get("Mounts", []):
                if m["Destination"] == "/data" and m.get("Type") == "volume":
                    return m["Name"]
        return None
    volume = wait_until(volume_of_task, 120, "the task's container with its volume")
    assert volume not in before
    detail = json.loads(cast.d.flowctl("watch", run, "--json", as_user=cast.alice).stdout)
    assert detail["state"] == "succeeded", (detail, cast.d.log())
    wait_until(lambda: not containers_of(docker_client, run), 120, "the task's container to go")
    after = _volumes()
    assert volume not in after, f"the task's anonymous volume {volume} was left behind"


def test_pull_into_a_shared_folder_does_not_follow_a_planted_part_link(cast):
    detail = cast.submit(cast.alice, """<workflow name="pullme">
  <channel name="o"/>
  <process name="p" image="flowd/busybox"><output channel="o"/><script>echo result > o</script></process>
</workflow>""")
    assert detail["state"] == "succeeded", (detail, cast.d.log())
    first = os.path.join(cast.home[ALICE], "first")
    got = json.loads(cast.d.flowctl("pull", detail["id"], "o", "--out", first, "--json",
                                    as_user=cast.alice, check=0).stdout)
    (name,) = [os.path.basename(f["file"]) for f in got["files"]]
    precious = cast.file(cast.alice, "precious", "alice's own\n")
    shared = os.path.join(cast.workdir, "shared")  # a group's folder: no sticky bit
    os.mkdir(shared)
    os.chown(shared, 0, grp.getgrnam(cast.group).gr_gid)
    os.chmod(shared, 0o2770)
    planted = cast.sh(cast.mallory, 'ln -s "$1" "$2"', t=precious, l=os.path.join(shared, name + ".part"))
    assert planted.returncode == 0, planted.stderr
    res = cast.d.flowctl("pull", detail["id"], "o", "--out", shared, as_user=cast.alice)
    with open(precious) as f:
        assert f.read() == "alice's own\n", "pull wrote through mallory's link"
    assert "Traceback" not in res.stderr, res.stderr
    dest = os.path.join(shared, name)
    if res.returncode == 0:
        assert not os.path.islink(dest) and open(dest, "rb").read() == b"result\n"
    else:
        assert name + ".part" in res.stderr, ("a refusal should name the file", res.stderr)
        assert not os.path.lexists(dest) or not os.path.islink(dest)


BRIDGE = """<workflow name="net">
  <process name="p" image="flowd/busybox" network="bridge"><script>true</script></process>
</workflow>"""


def test_network_bridge_is_refused_unless_allowed_networks_lists_it(cast, daemon_factory, workdir):
    xml = cast.file(cast.alice, "net/workflow.xml", BRIDGE)
    res = cast.d.flowctl("submit", xml, as_user=cast.alice)
    assert res.returncode == 2, (res, cast.d.log())
    assert "allowed_networks" in res.stderr and "bridge" in res.stderr, res.stderr
    cfg = os.path.join(workdir, "bridge.toml")
    with open(cfg, "w") as f:
        f.write('allowed_networks = ["none", "bridge"]\n')
    open_d = daemon_factory(spool=os.path.join(workdir, "spool-bridge"),
                            extra_args=["--config", cfg]).start()
    res = open_d.flowctl("submit", "--wait", "--json", xml, as_user=cast.alice)
    assert res.returncode == 0, (res, open_d.log())
    assert json.loads(res.stdout)["state"] == "succeeded"


def test_max_memory_and_max_timeout_refuse_a_workflow_asking_for_more(daemon_factory, workdir,
                                                                       docker_images):
    cfg = os.path.join(workdir, "limits.toml")
    with open(cfg, "w") as f:
        f.write('max_memory = "64m"\nmax_timeout = "1m"\n')
    d = daemon_factory(extra_args=["--config", cfg]).start()
    cast = Cast(d, workdir)
    proc = '<process name="p" image="flowd/busybox" {}><script>true</script></process>'
    for attrs, key in (('memory="128m"', "max_memory"), ('timeout="2m"', "max_timeout")):
        xml = cast.file(cast.alice, f"{key}/workflow.xml",
                        f'<workflow name="big">{proc.format(attrs)}</workflow>')
        res = d.flowctl("submit", xml, as_user=cast.alice)
        assert res.returncode == 2, (attrs, res, d.log())
        assert key in res.stderr and "Traceback" not in res.stderr, res.stderr
    fits = proc.format('memory="32m" timeout="30s"')
    ok = cast.submit(cast.alice, f'<workflow name="fits">{fits}</workflow>')
    assert ok["state"] == "succeeded", (ok, d.log())
