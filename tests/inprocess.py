"""A daemon in this process, with the fake executor: what tests/test_daemon_inprocess.py
and tests/test_intake_crash.py both start (no subprocess, no Docker)."""
from __future__ import annotations

import os
import shutil
import tempfile
import textwrap

from flowd.config import load
from flowd.daemon import Daemon
from flowd.executor.fake import FakeExecutor
from flowd.fsops import Durable

WAIT = 60.0  # seconds: a generous bound for a condition, never a measured duration


def write_config(path: str, text: str = "") -> None:
    """A config for a test spool: no free-space floor, then ``text``."""
    with open(path, "w") as f:
        f.write('min_free_space = "0"\n' + textwrap.dedent(text))


def new_daemon(conf: str, spool: str, scripts: dict | None = None,
               fs: Durable | None = None) -> Daemon:
    """A daemon on ``spool`` with config file ``conf``, not yet prepared. Its socket is
    in a short folder of its own (a socket's path must stay under 108 bytes), which
    ``end`` removes. ``fs``: the Durable it is to use (a crash test's)."""
    cfg = load(conf, required=True)
    sockdir = tempfile.mkdtemp(prefix="fd-")
    cfg.spool, cfg.socket = spool, os.path.join(sockdir, "s.sock")
    d = Daemon(cfg, lambda report: FakeExecutor(report, scripts or {}))
    if fs is not None:
        d.fs = fs
    d._test_sockdir = sockdir
    return d


def end(d: Daemon) -> None:
    """Close ``d`` and remove its socket's folder."""
    d.close()
    shutil.rmtree(d._test_sockdir, ignore_errors=True)
