"""flowd as a system service, end to end: the .deb installed in a real systemd.

A Debian bookworm root with systemd, made by debootstrap
(tests/service/build-image, cached as flowd-test/systemd:bookworm), boots as
PID 1 of a container that has the host's Docker socket. The .deb built by
packaging/build-deb (cached in dist/, keyed on the sources) is installed in it
with dpkg, and the service is driven with systemctl as an admin would: start
and READY, a submission by a member of the group flowd and a refusal for
anyone else, stop/start and kill -9 during a run, the watchdog, reload, a
reboot of the container, and purge.

Task containers are started by the HOST's engine, which resolves bind-mount
paths on the host: so the spool is a host folder mounted at the same path in
the systemd container (the "same-path rule", docs/operations.md).

The fast tests at the end need no container: the example config is in sync
with ``flowd --print-config``, reload and the image allowlist on a daemon in
a subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid

import pytest

from conftest import REPO_ROOT
from daemon_fixtures import env_for_subprocess

IMAGE = "flowd-test/systemd:bookworm"
LABEL = "io.flowd.test=service"
SERVICE_DIR = os.path.join(REPO_ROOT, "tests", "service")
DIST = os.path.join(REPO_ROOT, "dist")
# what goes into the .deb: a change to any of these rebuilds it
DEB_SOURCES = ("flowd", "flowctl", "pyproject.toml", "systemd", "packaging", "docs/operations.md",
               "docs/format.md", "docs/flowctl.md", "docs/spool.md")

service = [pytest.mark.slow, pytest.mark.docker]


def _version() -> str:
    from flowd import __version__

    return __version__


# -- the package ------------------------------------------------------------------
def _sources_key() -> str:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                            "--", *DEB_SOURCES], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    h = hashlib.sha256()
    for rel in sorted(f for f in files if f):
        path = os.path.join(REPO_ROOT, rel.decode())
        if os.path.isfile(path):
            h.update(rel + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
            h.update(b"x" if os.access(path, os.X_OK) else b"-")
    return h.hexdigest()


@pytest.fixture(scope="session")
def deb():
    """dist/flowd_VERSION_all.deb built by packaging/build-deb, rebuilt when a source changed."""
    version = _version()
    path = os.path.join(DIST, f"flowd_{version}_all.deb")
    key_file = os.path.join(DIST, ".flowd-deb.key")
    key = _sources_key()
    try:
        with open(key_file) as f:
            cached = f.read().strip() == key
    except OSError:
        cached = False
    if not (cached and os.path.exists(path)):
        t = time.monotonic()
        res = subprocess.run([os.path.join(REPO_ROOT, "packaging", "build-deb"), "--no-lintian"],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.fail(f"packaging/build-deb failed:\n{res.stdout}\n{res.stderr}", pytrace=False)
        with open(key_file, "w") as f:
            f.write(key + "\n")
        print(f"\nbuilt {path} in {time.monotonic() - t:.0f}s")
    return path


@pytest.mark.slow
def test_lintian_reports_no_errors_and_every_warning_is_explained(deb):
    changes = deb.replace("_all.deb", f"_{_arch()}.changes")
    res = subprocess.run(["lintian", "--fail-on", "error", changes], capture_output=True, text=True,
                         env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    tags = [line for line in res.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert res.returncode == 0 and not [t for t in tags if t.startswith("E:")], \
        f"lintian errors:\n{res.stdout}{res.stderr}"
    with open(os.path.join(REPO_ROOT, "packaging", "README.md")) as f:
        readme = f.read()
    unexplained = [t for t in tags if t.startswith("W:") and t.split()[2] not in readme]
    assert not unexplained, f"lintian warnings not explained in packaging/README.md: {unexplained}"
    print("\nlintian:", "clean" if not tags else "\n".join(tags))


def _arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


# -- the systemd container ----------------------------------------------------------
class Box:
    """A container whose PID 1 is systemd; commands run in it with ``docker exec``."""

    def __init__(self, name: str, spool: str):
        self.name = name
        self.spool = spool

    def sh(self, script: str, *, user: str | None = None, check: bool = True,
           input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = ["docker", "exec", "-i", self.name]
        if user:
            cmd += ["runuser", "-u", user, "--"]
        cmd += ["sh", "-c", script]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"in {self.name}{' as ' + user if user else ''}: {script!r} exited "
                                 f"{res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                                 f"journal:\n{self.journal()}")
        return res

    def journal(self, lines: int = 60) -> str:
        res = subprocess.run(["docker", "exec", self.name, "journalctl", "-u", "flowd",
                              "--no-pager", "-n", str(lines), "-o", "short-monotonic"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout + res.stderr

    def show(self, *props: str, unit: str = "flowd") -> dict[str, str]:
        out = self.sh(f"systemctl show -p {','.join(props)} {unit}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n"
                                     f"journal:\n{self.journal()}")
            time.sleep(0.2)

    def boot_wait(self, timeout: float = 90.0) -> None:
        def up():
            r = self.sh("systemctl is-system-running", check=False)
            return r.stdout.strip() in ("running", "degraded")
        self.wait(up, timeout, "systemd to finish booting")
        state = self.sh("systemctl is-system-running", check=False).stdout.strip()
        if state == "degraded":  # say which unit failed; flowd must not be one of them
            failed = self.sh("systemctl --failed --no-legend --plain", check=False).stdout
            assert "flowd" not in failed, failed

    def flowctl(self, *args: str, user: str = "alice", check: int | None = 0,
                timeout: float = 180) -> subprocess.CompletedProcess:
        quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
        res = self.sh(f"flowctl {quoted}", user=user, check=False, timeout=timeout)
        if check is not None and res.returncode != check:
            raise AssertionError(f"flowctl {' '.join(args)} as {user} exited {res.returncode}, "
                                 f"not {check}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                                 f"journal:\n{self.journal()}")
        return res

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])


def _rm_containers(*filters: str) -> None:
    for flt in filters:
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", flt], capture_output=True,
                             text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@pytest.fixture(scope="module")
def systemd_image(docker_client):
    """flowd-test/systemd:bookworm, made by tests/service/build-image when missing or stale."""
    t = time.monotonic()
    res = subprocess.run([os.path.join(SERVICE_DIR, "build-image")], capture_output=True, text=True,
                         timeout=1200)
    if res.returncode != 0:
        pytest.fail(f"tests/service/build-image failed:\n{res.stdout}\n{res.stderr}", pytrace=False)
    if "up to date" not in res.stderr:
        print(f"\nbuilt {IMAGE} in {time.monotonic() - t:.0f}s")
    return IMAGE


SERVICE_ROOT = os.environ.get("FLOWD_SERVICE_TEST_DIR", "/var/lib/flowd-test")


@pytest.fixture(scope="module")
def box(systemd_image, deb, docker_images):
    """A booted systemd container with the .deb installed and flowd reconfigured for
    a spool at the same path on the host and inside (so the host engine finds it)."""
    tag = uuid.uuid4().hex[:10]
    name = f"flowd-systemd-{tag}"
    # Not under /tmp (nor /home): the unit's PrivateTmp= (and ProtectHome=) would hide
    # it from flowd, and a CI clone may well live in /tmp.
    top = os.path.join(SERVICE_ROOT, f"service-{tag}")
    spool = os.path.join(top, "spool")
    os.makedirs(spool)
    os.chmod(SERVICE_ROOT, 0o755)
    os.chmod(top, 0o755)
    sock = os.path.realpath(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")[7:])
    cmd = ["docker", "run", "-d", "--name", name, "--label", LABEL, "--hostname", "flowd-test",
           "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined",
           "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup",
           "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
           "--stop-signal", "SIGRTMIN+3",
           "-v", f"{sock}:/run/docker.sock",
           "-v", f"{DIST}:/mnt/dist:ro",
           "-v", f"{spool}:{spool}",
           systemd_image]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot start the systemd container: {res.stderr}", pytrace=False)
    b = Box(name, spool)
    try:
        b.boot_wait()
        yield b
    finally:
        logs = os.path.join(top, "journal.txt")
        with open(logs, "w") as f:
            f.write(b.journal(400))
        _rm_containers(f"name={name}", f"label=io.flowd.spool={spool}")
        shutil.rmtree(top, ignore_errors=True)


def _ready_then_answers(box: Box, action: str = "start") -> None:
    """`systemctl start` of a Type=notify unit returns once READY=1 came: the
    socket must answer at once, with no retry."""
    box.sh(f"systemctl {action} flowd && runuser -u alice -- flowctl --timeout 5 status")


# -- the tests, in the order an admin meets them --------------------------------------
@pytest.mark.slow
@pytest.mark.docker
def test_install_creates_user_spool_and_starts_the_service_after_ready(box, deb):
    box.sh(f"dpkg -i /mnt/dist/{os.path.basename(deb)}", timeout=300)
    # the package made the user, the folders, and enabled and started the unit
    assert box.sh("id -nG flowd").stdout.split() == ["flowd"]  # docker: from the unit only
    assert box.sh("getent passwd flowd | cut -d: -f6,7").stdout.strip() == \
        "/var/spool/flowd:/usr/sbin/nologin"
    assert box.sh("stat -c '%U:%G %a' /var/spool/flowd /var/spool/flowd/incoming").stdout.split(
        "\n")[:2] == ["flowd:flowd 750", "flowd:flowd 3770"]
    assert box.sh("systemctl is-enabled flowd").stdout.strip() == "enabled"
    props = box.show("ActiveState", "SubState", "Type", "StatusText", "MainPID", "User")
    assert props["ActiveState"] == "active" and props["Type"] == "notify", (props, box.journal())
    assert re.match(r"\d+ active runs, \d+ containers; docker up", props["StatusText"]), props
    assert box.sh("stat -c '%U:%G %a' /run/flowd /run/flowd/flowd.sock").stdout.split("\n")[:2] == \
        ["flowd:flowd 750", "flowd:flowd 660"]
    # the daemon runs as flowd, with the docker group, and nothing more
    pid = props["MainPID"]
    status = box.sh(f"cat /proc/{pid}/status").stdout
    uid = box.sh("id -u flowd").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    # active only after READY=1: systemd marked the unit active well after it
    # started the process (Python's start-up, the spool, the socket), not at exec
    t = box.show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    waited = (int(t["ActiveEnterTimestampMonotonic"]) - int(t["ExecMainStartTimestampMonotonic"])) / 1e6
    assert waited > 0.1, t

    # users: alice may submit (group flowd), mallory may not
    box.sh("useradd -m -s /bin/sh -G flowd alice && useradd -m -s /bin/sh mallory")
    _ready_then_answers(box, "restart")


@pytest.mark.slow
@pytest.mark.docker
def test_unit_passes_systemd_analyze_verify(box):
    res = box.sh("systemd-analyze verify /lib/systemd/system/flowd.service", check=False)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), \
        res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_spool_at_the_same_path_as_on_the_host(box):
    """The documented way to run flowd in a container next to the host engine."""
    s = box.spool
    conf = box.sh("cat /etc/flowd/flowd.toml").stdout
    box.sh("cat > /etc/flowd/flowd.toml", input=conf + f'\nspool = "{s}"\n')
    dropin = f"[Service]\nReadWritePaths={s}\n"
    if s.startswith(("/root/", "/home/", "/run/user/")):
        dropin += "ProtectHome=no\n"  # ProtectHome=yes would hide the spool
    box.sh("mkdir -p /etc/systemd/system/flowd.service.d && "
           "cat > /etc/systemd/system/flowd.service.d/spool.conf", input=dropin)
    # what tmpfiles.d does for /var/spool/flowd: the spool is flowd's, incoming/ is
    # where members of the group flowd drop workflows
    box.sh(f"install -d -m 0750 -o flowd -g flowd {s} && "
           f"install -d -m 3770 -o flowd -g flowd {s}/incoming && systemctl daemon-reload")
    _ready_then_answers(box, "restart")
    assert json.loads(box.flowctl("status", "--json").stdout)["runs"] == []
    assert os.path.isdir(os.path.join(s, "runs"))  # made by flowd, seen on the host


WORKFLOW = """<workflow name="shout">
  <channel name="words"><item>alpha</item><item>beta</item><item>gamma</item></channel>
  <channel name="upper"/>
  <process name="shout" image="flowd/busybox" parallel="3">
    <input channel="words" as="w"/>
    <output channel="upper"/>
    <script>sleep {sleep}; tr a-z A-Z &lt; w &gt; upper</script>
  </process>
</workflow>
"""
SHOUTED = ["ALPHA", "BETA", "GAMMA"]


def _submit(box: Box, sleep: float = 0, name: str = "wf") -> str:
    path = f"/home/alice/{name}.xml"
    box.sh(f"cat > {path}", user="alice", input=WORKFLOW.format(sleep=sleep))
    return box.flowctl("submit", path).stdout.strip()


def _results(box: Box, run: str) -> list[str]:
    out = f"/home/alice/out-{run}"
    box.flowctl("pull", run, "upper", "--out", out)
    names = box.sh(f"ls {out}", user="alice").stdout.split()
    return sorted(box.sh(f"cat {out}/{n}", user="alice").stdout.strip() for n in names)


def _watch(box: Box, run: str) -> dict:
    box.flowctl("watch", run, timeout=240)
    return json.loads(box.flowctl("status", run, "--json").stdout)


def _running_containers(run: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-q", "--filter", f"label=io.flowd.run={run}",
                           "--filter", "status=running"], capture_output=True,
                          text=True).stdout.split()


@pytest.mark.slow
@pytest.mark.docker
def test_a_member_of_flowd_submits_and_gets_the_result(box):
    run = _submit(box, sleep=0)
    assert re.fullmatch(r"[0-9a-f]{12}", run)
    assert _watch(box, run)["state"] == "succeeded"
    assert _results(box, run) == SHOUTED
    detail = json.loads(box.flowctl("status", run, "--json").stdout)
    assert detail.get("submitted_by", "alice") in ("alice", "")


@pytest.mark.slow
@pytest.mark.docker
def test_a_user_outside_the_group_is_refused_with_exit_3(box):
    res = box.flowctl("status", user="mallory", check=3)
    assert "permission denied" in res.stderr, res.stderr
    res = box.sh(f"touch {box.spool}/incoming/x.xml", user="mallory", check=False)
    assert res.returncode != 0 and "Permission denied" in res.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_a_member_of_flowd_drops_a_workflow_into_incoming(box):
    before = {r["id"] for r in json.loads(box.flowctl("status", "--json").stdout)["runs"]}
    inc = f"{box.spool}/incoming"
    box.sh(f"cat > {inc}/.dropped.xml.tmp && mv {inc}/.dropped.xml.tmp {inc}/dropped.xml",
           user="alice", input=WORKFLOW.format(sleep=0))

    def new_run():
        runs = json.loads(box.flowctl("status", "--json").stdout)["runs"]
        return [r["id"] for r in runs if r["id"] not in before]
    (run,) = box.wait(new_run, 30, "the dropped workflow to become a run")
    assert _watch(box, run)["state"] == "succeeded"
    assert _results(box, run) == SHOUTED
    assert box.sh(f"ls -A {inc}", user="alice").stdout.strip() == ""
    assert "inotify unavailable" not in box.journal(400)  # the hardening lets inotify work


@pytest.mark.slow
@pytest.mark.docker
def test_stop_and_start_during_a_run_lose_nothing(box):
    run = _submit(box, sleep=6, name="stopstart")
    running = box.wait(lambda: _running_containers(run), 60, "the run's containers to run")
    box.sh("systemctl stop flowd")
    assert box.show("ActiveState")["ActiveState"] == "inactive"
    assert set(running) <= set(_running_containers(run))  # flowd left them running
    res = box.flowctl("status", check=3)
    assert "not running" in res.stderr, res.stderr
    _ready_then_answers(box, "start")
    assert _watch(box, run)["state"] == "succeeded"
    assert _results(box, run) == SHOUTED


@pytest.mark.slow
@pytest.mark.docker
def test_kill_9_of_the_main_process_is_restarted_by_systemd(box):
    before = box.show("MainPID", "NRestarts")
    run = _submit(box, sleep=4, name="kill9")
    box.wait(lambda: _running_containers(run), 60, "the run's containers to run")
    box.sh(f"kill -9 {before['MainPID']}")

    def restarted():
        p = box.show("MainPID", "NRestarts", "ActiveState")
        return (p["ActiveState"] == "active" and p["MainPID"] not in ("0", before["MainPID"])
                and int(p["NRestarts"]) == int(before["NRestarts"]) + 1)
    box.wait(restarted, 30, "systemd to restart flowd after kill -9")
    assert _watch(box, run)["state"] == "succeeded"
    assert _results(box, run) == SHOUTED


@pytest.mark.slow
@pytest.mark.docker
def test_the_watchdog_restarts_a_hung_main_loop(box):
    box.sh("cat > /etc/systemd/system/flowd.service.d/watchdog.conf",
           input="[Service]\nWatchdogSec=4s\n")
    try:
        box.sh("systemctl daemon-reload")
        _ready_then_answers(box, "restart")
        assert box.show("WatchdogUSec")["WatchdogUSec"] == "4s"
        before = box.show("MainPID", "NRestarts")
        time.sleep(3)  # pings at 2 s intervals keep it alive
        assert box.show("MainPID")["MainPID"] == before["MainPID"]
        box.sh(f"kill -STOP {before['MainPID']}")  # the loop hangs

        def restarted():
            p = box.show("MainPID", "NRestarts", "ActiveState")
            return (p["ActiveState"] == "active" and p["MainPID"] not in ("0", before["MainPID"])
                    and int(p["NRestarts"]) == int(before["NRestarts"]) + 1)
        box.wait(restarted, 60, "the watchdog to restart flowd")
        assert "Watchdog timeout" in box.journal(200)
    finally:
        box.sh("rm -f /etc/systemd/system/flowd.service.d/watchdog.conf && systemctl daemon-reload")
    _ready_then_answers(box, "restart")


@pytest.mark.slow
@pytest.mark.docker
def test_reload_applies_the_allowlist_live_and_refuses_a_bad_file(box):
    good = box.sh("cat /etc/flowd/flowd.toml").stdout
    pid = box.main_pid()
    inflight = _submit(box, sleep=3, name="inflight")  # reloads must not disturb it
    try:
        box.sh("cat > /etc/flowd/flowd.toml", input=good + '\nallowed_images = ["debian:*"]\n'
                                                           "max_containers = 2\n")
        box.sh("systemctl reload flowd")
        box.wait(lambda: "max_containers=2" in box.journal(), 20, "the reload to be logged")
        path = "/home/alice/denied.xml"
        box.sh(f"cat > {path}", user="alice", input=WORKFLOW.format(sleep=0))
        res = box.flowctl("submit", path, check=2)
        assert "flowd/busybox" in res.stderr and "allowed_images" in res.stderr, res.stderr
        # a broken file is refused as a whole: the allowlist stays
        box.sh("cat > /etc/flowd/flowd.toml", input=good + "\nmax_containers = -1\n")
        box.sh("systemctl reload flowd")
        box.wait(lambda: "the configuration in use is unchanged" in box.journal(), 20,
                 "the refused reload to be logged")
        assert box.show("ActiveState")["ActiveState"] == "active"
        box.flowctl("submit", path, check=2)
    finally:
        box.sh("cat > /etc/flowd/flowd.toml", input=good)
        box.sh("systemctl reload flowd")
    box.wait(lambda: box.flowctl("submit", "/home/alice/denied.xml", check=None).returncode == 0,
             20, "the allowlist to be lifted")
    assert box.main_pid() == pid  # reloads never restarted it
    assert _watch(box, inflight)["state"] == "succeeded"
    assert _results(box, inflight) == SHOUTED


@pytest.mark.slow
@pytest.mark.docker
def test_flowd_comes_up_at_boot(box):
    runs = {r["id"] for r in json.loads(box.flowctl("status", "--json").stdout)["runs"]}
    res = subprocess.run(["docker", "restart", "-t", "30", box.name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    box.boot_wait()
    box.wait(lambda: box.show("ActiveState")["ActiveState"] == "active", 60, "flowd at boot")
    props = box.show("NRestarts", "StatusText", "UnitFileState")
    assert props["UnitFileState"] == "enabled" and props["NRestarts"] == "0", props
    after = {r["id"] for r in json.loads(box.flowctl("status", "--json").stdout)["runs"]}
    assert after == runs


@pytest.mark.slow
@pytest.mark.docker
def test_security_exposure_score(box):
    res = box.sh("systemd-analyze security --no-pager flowd.service", check=False)
    m = re.search(r"Overall exposure level for flowd.service: ([\d.]+) (\w+)", res.stdout)
    assert m, res.stdout + res.stderr
    print(f"\nsystemd-analyze security flowd.service: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 2.5, res.stdout


@pytest.mark.slow
@pytest.mark.docker
def test_purge_removes_the_service_user_and_spool(box):
    box.sh("dpkg --purge flowd", timeout=120)
    assert box.sh("systemctl show -p LoadState flowd").stdout.strip() == "LoadState=not-found"
    assert box.sh("getent passwd flowd", check=False).returncode == 2
    assert box.sh("getent group flowd", check=False).returncode == 2
    for path in ("/var/spool/flowd", "/etc/flowd", "/run/flowd", "/lib/systemd/system/flowd.service",
                 "/usr/bin/flowd", "/usr/bin/flowctl"):
        assert box.sh(f"test -e {path}", check=False).returncode == 1, path
    assert box.sh("id -nG alice").stdout.split() == ["alice"]


# -- fast: no container --------------------------------------------------------------
EXAMPLE_CONFIG = os.path.join(REPO_ROOT, "systemd", "flowd.toml")


def _example_keys() -> dict[str, object]:
    """key -> value of every line `key = value` or `#key = value` in systemd/flowd.toml."""
    keys = {}
    with open(EXAMPLE_CONFIG) as f:
        for line in f:
            m = re.match(r"^#?([a-z_]+) = (.*)$", line.rstrip("\n"))
            if m:
                keys[m.group(1)] = tomllib.loads(line.lstrip("#"))[m.group(1)]
    return keys


def test_example_config_lists_every_key_with_its_default():
    out = subprocess.run([sys.executable, "-m", "flowd", "--print-config"], capture_output=True,
                         text=True, check=True, env=env_for_subprocess()).stdout
    printed = tomllib.loads(out)
    example = _example_keys()
    assert list(example) == list(printed), "systemd/flowd.toml and flowd --print-config differ"
    for key, value in example.items():
        if key != "socket_group":  # the package sets the group that may submit
            assert value == printed[key], key
    assert example["socket_group"] == "flowd"


def test_example_config_loads_as_shipped_and_with_every_line_uncommented(tmp_path):
    from flowd.config import load

    cfg = load(EXAMPLE_CONFIG, required=True)
    assert cfg.socket_group == "flowd"
    with open(EXAMPLE_CONFIG) as f:
        text = re.sub(r"^#([a-z_]+ = )", r"\1", f.read(), flags=re.M)
    (tmp_path / "all.toml").write_text(text)
    assert load(str(tmp_path / "all.toml"), required=True).spool == "/var/spool/flowd"


def test_operations_doc_describes_every_config_key():
    from flowd.config import KEYS

    with open(os.path.join(REPO_ROOT, "docs", "operations.md")) as f:
        rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", f.read(), re.M)}
    assert rows == set(KEYS), "docs/operations.md's key table and flowd.config.KEYS differ"


def test_allowed_images_patterns():
    from flowd.config import Config

    cfg = Config()
    assert cfg.image_allowed("anything/at:all")
    cfg = Config(allowed_images=["flowd/*", "debian:bookworm", "busybox"])
    assert cfg.image_allowed("flowd/busybox") and cfg.image_allowed("flowd/busybox:1.36")
    assert cfg.image_allowed("debian:bookworm") and not cfg.image_allowed("debian")
    assert cfg.image_allowed("busybox") and cfg.image_allowed("busybox:latest")
    assert not cfg.image_allowed("busybox:musl") and not cfg.image_allowed("evil/flowd")


def test_config_rejects_a_bad_allowlist(tmp_path):
    from flowd.config import load
    from flowd.errors import UsageError

    p = tmp_path / "c.toml"
    p.write_text('allowed_images = ["ok", 3]\n')
    with pytest.raises(UsageError, match="allowed_images"):
        load(str(p))


@pytest.mark.docker
def test_reload_by_sighup_applies_live_keys_and_keeps_the_old_config_on_errors(
        daemon_factory, workdir):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write('max_containers = 3\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    d.flowctl("status", check=0)  # the loop runs (a SIGHUP right after READY may be lost: see report)
    wf = os.path.join(workdir, "wf.xml")
    with open(wf, "w") as f:
        f.write(WORKFLOW.format(sleep=0))
    with open(conf, "w") as f:
        f.write('max_containers = 1\nallowed_images = ["debian:*"]\npids_limit = 64\n'
                'socket_mode = "0600"\n')
    d.proc.send_signal(1)
    _wait_log(d, "reload: configuration re-read")
    log = d.log()
    assert "max_containers=1" in log and "pids_limit=64" in log, log
    assert "socket_mode changed" in log, log
    res = d.flowctl("submit", wf, check=2)
    assert "'shout'" in res.stderr and "flowd/busybox" in res.stderr and "allowed_images" in res.stderr
    # an invalid file: refused, nothing changes
    with open(conf, "w") as f:
        f.write("max_containers = 'many'\n")
    d.proc.send_signal(1)
    _wait_log(d, "the configuration in use is unchanged")
    d.flowctl("submit", wf, check=2)
    assert d.proc.poll() is None


def _wait_log(d, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"flowd did not log {text!r}:\n{d.log()}")
        time.sleep(0.1)
