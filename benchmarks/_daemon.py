"""A real flowd daemon for the benchmarks (scale.py, responsiveness.py, cache.py, split.py).

``start_daemon`` runs ``python -m flowd`` from this checkout with its spool and
socket, its log in ``ROOT/flowd.log``, and returns once it answers a ping.
With ``user`` (needs root) it runs the way systemd/flowd.service and the
tests (tests/daemon_fixtures.py) run it: as that system user with its groups,
UMask 0027, owning its spool and its socket's folder.
"""
from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from flowctl.client import Client  # noqa: E402

DAEMON_UMASK = 0o027  # systemd/flowd.service: UMask=0027


def start_daemon(root: str, sock: str, spool: str, extra_args=(), *,
                 user: str | None = None) -> tuple[subprocess.Popen, dict, str]:
    """(the daemon, the environment for flowctl, its log's path).

    ``user``: the system user it runs as (it must exist and be in the docker
    group to run containers; ``ROOT`` and every folder above must let it
    through); None: as the caller."""
    env = dict(os.environ, PYTHONPATH=REPO, FLOWD_SOCKET=sock)
    extra: dict = {}
    daemon_env = env
    if user:
        pw = pwd.getpwnam(user)
        if not os.path.isdir(spool):
            os.mkdir(spool, 0o750)
        sockdir = os.path.dirname(sock)
        for d in (spool, sockdir):  # theirs, as packaging's tmpfiles and RuntimeDirectory make them
            os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o750)
        extra = dict(user=pw.pw_uid, group=pw.pw_gid, cwd=REPO,
                     extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid), umask=DAEMON_UMASK)
        daemon_env = dict(env, HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    log = open(os.path.join(root, "flowd.log"), "ab")
    daemon = subprocess.Popen([sys.executable, "-m", "flowd", "--spool", spool, "--socket", sock,
                               "--log-level", "warning", *extra_args], env=daemon_env, stdout=log,
                              stderr=subprocess.STDOUT, **extra)
    log.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(sock, timeout=5).call("ping")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or daemon.poll() is not None:
                stop_daemon(daemon)
                raise SystemExit("flowd did not start; see " + log.name)
            time.sleep(0.1)
    return daemon, env, log.name


def stop_daemon(daemon: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM, then SIGKILL if it has not ended in ``timeout`` seconds."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def proc_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (``VmRSS``, ``VmHWM``); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return proc_kb(pid, "VmRSS") / 1024


def remove_containers(spool: str) -> None:
    """Remove every container labelled with ``spool`` (what a daemon of it left)."""
    from flowd.executor.container import LABEL_SPOOL
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={LABEL_SPOOL}={spool}"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True)
