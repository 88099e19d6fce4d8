"""Run a real flowd daemon in a subprocess, the way a user would.

Readiness is not guessed with sleeps: the test listens on a NOTIFY_SOCKET
like systemd does, and waits for READY=1 (which flowd sends only once its
socket answers and recovery is done).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_root() -> str:
    """A folder the Docker engine sees as the host does (never /tmp)."""
    root = os.environ.get("FLOWD_TEST_DIR") or os.path.join(REPO, ".test-tmp")
    os.makedirs(root, exist_ok=True)
    return root


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Daemon:
    def __init__(self, spool: str, sock: str, extra_args=(), env=None, user: str | None = None,
                 python: str = sys.executable):
        self.user = user  # run the daemon as this user (with its groups)
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
        extra = {}
        if self.user:
            import pwd

            pw = pwd.getpwnam(self.user)
            os.chmod(self.notify_path, 0o777)
            os.chown(os.path.dirname(self.socket), pw.pw_uid, pw.pw_gid)
            extra = dict(user=pw.pw_uid, group=pw.pw_gid,
                         extra_groups=os.getgrouplist(self.user, pw.pw_gid))
        e = env_for_subprocess(NOTIFY_SOCKET=self.notify_path, **self.extra_env, **env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "flowd", "--spool", self.spool, "--socket", self.socket,
             "--config", "/dev/null", *self.extra_args],
            env=e, stdout=self._log, stderr=subprocess.STDOUT, **extra)
        if wait:
            self.wait_for("READY=1", timeout)
        return self

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

    def flowctl(self, *args, timeout: float = 120.0, input=None, check=None, **env):
        cmd = [sys.executable, "-m", "flowctl", "--socket", self.socket, *map(str, args)]
        res = subprocess.run(cmd, env=env_for_subprocess(**env), capture_output=True, text=True,
                             timeout=timeout, input=input)
        if check is not None and res.returncode != check:
            raise AssertionError(f"flowctl {' '.join(map(str, args))} exited {res.returncode}, "
                                 f"not {check}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n"
                                 f"daemon log:\n{self.log()}")
        return res


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
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory().start()
