"""Run a real flowd daemon in a subprocess, the way a user would.

Readiness is not guessed with sleeps: the test listens on a NOTIFY_SOCKET
like systemd does, and waits for READY=1 (which flowd sends only once its
socket answers and recovery is done).

The daemon runs the way systemd/flowd.service runs it: as a non-root system
user (``flowd-test``, made on first use) in the docker group, with its spool
and socket folder its own and UMask=0027. Root ignores permission bits, so a
root daemon hides every bug a real one would hit (issue 9, finding 1). A test
that truly needs a root daemon passes ``user=None`` and says why. The test
process itself stays root: it reads the spool and plays other users.
"""
from __future__ import annotations

import grp
import os
import pty
import pwd
import select
import stat
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON_USER = "flowd-test"  # the test daemons' user: a system user in the docker group
DAEMON_UMASK = 0o027        # systemd/flowd.service: UMask=0027


def test_root() -> str:
    """A folder the Docker engine sees as the host does (never /tmp)."""
    root = os.environ.get("FLOWD_TEST_DIR") or os.path.join(REPO, ".test-tmp")
    if not os.path.isdir(root):
        os.makedirs(root, exist_ok=True)
        os.chmod(root, 0o755)  # the daemon's user goes through it to its spool
    return root


def _fail_or_skip(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must not skip this)", pytrace=False)
    pytest.skip(why)


def system_user(name: str, groups: tuple[str, ...] = (), gid: int | None = None) -> pwd.struct_passwd:
    """The system user ``name`` (``useradd --system --no-create-home``), made when missing.

    ``groups``: supplementary groups it must have (added when it lacks them);
    ``gid``: its primary group when it is made (default: a group of its own).
    Several test sessions may make the same user at once: a lost race is fine.
    """
    if os.geteuid() != 0:
        _fail_or_skip(f"needs root to make the test user {name}")
    for attempt in range(20):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            if gid is not None:
                cmd += ["--gid", str(gid)]
            if groups:
                cmd += ["--groups", ",".join(groups)]
            res = subprocess.run(cmd + [name], capture_output=True, text=True)
            if res.returncode not in (0, 9):  # 9: made meanwhile by someone else
                if attempt == 19:
                    raise AssertionError(f"useradd {name} failed: {res.stderr}")
                time.sleep(0.2)  # /etc/passwd locked by another useradd
            continue
        missing = [g for g in groups if pw.pw_gid != grp.getgrnam(g).gr_gid
                   and name not in grp.getgrnam(g).gr_mem]
        if not missing:
            return pw
        subprocess.run(["usermod", "--append", "--groups", ",".join(missing), name],
                       capture_output=True)
        time.sleep(0.2)
    raise AssertionError(f"could not make the test user {name} with groups {groups}")


def daemon_user(name: str = DAEMON_USER) -> pwd.struct_passwd:
    """The daemon's user: like the packaged ``flowd``, a system user in the docker group."""
    return system_user(name, groups=("docker",))


def user_groups(pw: pwd.struct_passwd) -> list[int]:
    return os.getgrouplist(pw.pw_name, pw.pw_gid)


def _may_enter(path: str, pw: pwd.struct_passwd) -> bool:
    st = os.stat(path)
    if pw.pw_uid == 0:
        return True
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in user_groups(pw):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_reachable(path: str, pw: pwd.struct_passwd, what: str) -> None:
    """Every folder above ``path`` must let ``pw`` through, or the test fails saying which."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(1, len(parts)):
        folder = os.sep.join(parts[:i]) or os.sep
        if os.path.isdir(folder) and not _may_enter(folder, pw):
            pytest.fail(f"{what} {path}: the daemon's user {pw.pw_name} may not enter {folder} "
                        f"(mode {stat.S_IMODE(os.stat(folder).st_mode):o}); "
                        f"fix: chmod o+x {folder}, or put the tests elsewhere (FLOWD_TEST_DIR)",
                        pytrace=False)


_usable: dict[tuple[str, str], None] = {}


def check_interpreter(python: str, pw: pwd.struct_passwd) -> None:
    """``python`` with flowd's libraries must run as ``pw`` (once per session and pair)."""
    if (python, pw.pw_name) in _usable:
        return
    res = subprocess.run([python, "-c", "import flowd, docker, zmq, lxml"], cwd=REPO,
                         env=env_for_subprocess(HOME=pw.pw_dir), capture_output=True, text=True,
                         user=pw.pw_uid, group=pw.pw_gid, extra_groups=user_groups(pw))
    if res.returncode != 0:
        pytest.fail(f"the daemon's user {pw.pw_name} cannot run {python} with flowd's libraries: "
                    f"{res.stderr.strip()[-500:]}\nfix: `bash .ci/setup-host` (it builds .venv from "
                    "Debian's /usr/bin/python3), and every folder above the repo needs o+x",
                    pytrace=False)
    _usable[(python, pw.pw_name)] = None


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Daemon:
    def __init__(self, spool: str, sock: str, extra_args=(), env=None,
                 user: str | None = DAEMON_USER, python: str = sys.executable):
        # run the daemon as this user, with its groups; None: as the test process (root)
        self.user = user if os.geteuid() == 0 else None
        self.pw: pwd.struct_passwd | None = None
        self.python = python
        self.spool = spool
        self.socket = sock
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.notify_path = sock + ".notify"
        self.messages: list[str] = []
        self.log_path = os.path.join(os.path.dirname(sock), "flowd.log")

    def start(self, wait: bool = True, timeout: float = 30.0, **env) -> "Daemon":
        self.messages = []
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self._nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._nsock.bind(self.notify_path)
        extra: dict = {}
        user_env: dict = {}
        if self.user:
            self.pw = pw = daemon_user(self.user)
            self._give_spool(pw)
            os.chmod(self.notify_path, 0o777)
            # RuntimeDirectory=flowd, RuntimeDirectoryMode=0750: the daemon's, its group may enter
            sock_dir = os.path.dirname(self.socket)
            os.chown(sock_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(sock_dir, 0o750)
            check_reachable(sock_dir, pw, "the socket's folder")
            check_interpreter(self.python, pw)
            extra = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=user_groups(pw),
                         umask=DAEMON_UMASK)
            user_env = dict(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)  # as systemd sets
        e = env_for_subprocess(NOTIFY_SOCKET=self.notify_path, **user_env, **self.extra_env, **env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "flowd", "--spool", self.spool, "--socket", self.socket,
             "--config", "/dev/null", *self.extra_args],
            env=e, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, **extra)
        if wait:
            self.wait_for("READY=1", timeout)
        return self

    def _give_spool(self, pw: pwd.struct_passwd) -> None:
        """The spool folder is the daemon's, as packaging/tmpfiles makes /var/spool/flowd.

        Folders the tests made on the way to it (under test_root()) get o+x so the
        daemon may pass; anything above must be passable already. Only the spool
        folder itself changes owner: what a test or a container put inside stays
        as it is, as on a real machine.
        """
        spool = os.path.abspath(self.spool)
        if not os.path.isdir(spool):
            os.makedirs(os.path.dirname(spool), exist_ok=True)
            os.mkdir(spool, 0o750)
        if os.stat(spool).st_uid == 0:
            os.chown(spool, pw.pw_uid, pw.pw_gid)
            os.chmod(spool, 0o750)
        root = os.path.realpath(test_root())
        folder = os.path.dirname(os.path.realpath(spool))
        while folder.startswith(root + os.sep) or folder == root:
            st = os.stat(folder)
            if st.st_uid == 0 and not st.st_mode & stat.S_IXOTH:
                os.chmod(folder, stat.S_IMODE(st.st_mode) | 0o011)
            folder = os.path.dirname(folder)
        check_reachable(spool, pw, "the spool")

    def wait_for(self, word: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if word in m:
                    return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"flowd did not send {word} (exit {self.proc.poll()}):\n"
                                     + self.log())
            self._nsock.settimeout(min(left, 1.0))
            try:
                self.messages.append(self._nsock.recv(4096).decode())
            except socket.timeout:
                pass

    def log(self, full: bool = False) -> str:
        """The daemon's log (all its lives): the last 6,000 characters, or all of it."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
                return text if full else text[-6000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._drain_notify()
        self._nsock.close()
        self._log.close()
        return rc

    def _drain_notify(self) -> None:
        self._nsock.setblocking(False)
        while True:
            try:
                self.messages.append(self._nsock.recv(4096).decode())
            except BlockingIOError:
                return

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def flowctl(self, *args, timeout: float = 120.0, input=None, check=None,
                as_user: pwd.struct_passwd | None = None, **env):
        """Run flowctl against this daemon: as the test process (root), or as ``as_user``."""
        cmd = [sys.executable, "-m", "flowctl", "--socket", self.socket, *map(str, args)]
        who: dict = {}
        if as_user is not None:
            who = dict(user=as_user.pw_uid, group=as_user.pw_gid,
                       extra_groups=user_groups(as_user), cwd="/")
            env = dict(HOME=as_user.pw_dir, USER=as_user.pw_name, LOGNAME=as_user.pw_name, **env)
        res = subprocess.run(cmd, env=env_for_subprocess(**env), capture_output=True, text=True,
                             timeout=timeout, input=input, **who)
        if check is not None and res.returncode != check:
            raise AssertionError(f"flowctl {' '.join(map(str, args))} exited {res.returncode}, "
                                 f"not {check}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                                 f"daemon log:\n{self.log()}")
        return res


def on_a_terminal(argv, *, timeout=120, whole=False, **popen) -> tuple[int | None, bytes]:
    """Run ``argv`` with its stdout on a pseudo-terminal; (exit status, the bytes it
    printed there, the tty's \\r\\n made \\n). ``whole``: its stdin and stderr are on
    the terminal too (else stdin is empty and stderr discarded). ``popen``: more
    ``subprocess.Popen`` arguments (``env`` defaults to ``env_for_subprocess()``)."""
    popen.setdefault("env", env_for_subprocess())
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=slave,
                                stdin=slave if whole else subprocess.DEVNULL,
                                stderr=slave if whole else subprocess.DEVNULL, **popen)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready = readable(master, 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.replace(b"\r\n", b"\n")


def wait_until(predicate, timeout=60.0, what="condition"):
    """Poll an outside condition (the engine, the daemon's status) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def workdir(request):
    """A fresh folder under the test root (Docker-visible), removed after a pass."""
    path = tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=test_root())
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(workdir):
    """make(spool=None, user=DAEMON_USER, python=sys.executable, extra_args=(), env=None):
    a Daemon, non-root by default. ``user=None`` runs it as the test process (root): only
    for a test that truly needs that, with a comment saying why."""
    made: list[Daemon] = []
    sockdir = tempfile.mkdtemp(prefix="flowd-sock-")  # short: ipc paths are limited to ~100 bytes

    def make(spool: str | None = None, **kw) -> Daemon:
        d = Daemon(spool or os.path.join(workdir, "spool"),
                   os.path.join(sockdir, f"flowd{len(made)}.sock"), **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        _remove_containers(os.path.realpath(d.spool))
    shutil.rmtree(sockdir, ignore_errors=True)


def _remove_containers(spool: str) -> None:
    """Containers a test's daemons left (SIGTERM leaves them running, by design)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=io.flowd.spool={spool}"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True)  # -v: their volumes


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()


def readable(f, timeout: float) -> bool:
    """Whether ``f`` (a file object or descriptor) has something to read within
    ``timeout`` seconds. poll(), not select(): a long test session may hold
    descriptors past select's 1024."""
    p = select.poll()
    p.register(f, select.POLLIN)
    return bool(p.poll(timeout * 1000))
