"""The spool intake's crash sweep: a crash at every durability point of taking
one drop, then a restart, makes the drop exactly one run (or one rejection).

The daemon runs in-process with the fake executor (no Docker, no subprocess),
its ``Durable`` set to ``crash_mode="raise"``: at the N-th point a
``SimulatedCrash`` ends whichever thread reached it (the loop, the intake's
worker or a run's creation thread) and every later point too, so nothing
more of the "dead" daemon reaches the disk. The test then drops the daemon
and starts a new one on the same spool, as systemd would, and waits until the
intake is idle. For a valid file drop, a valid folder drop and an invalid
drop: the drop is exactly one run with its source (never none, never two), or
exactly one ``rejected/NAME`` with its ``.error``; nothing is left in
staging/ or incoming/. At a few points of each drop (the marker, the run's
folder renamed into place, the rejection) the restart itself is crashed at
every point of its recovery, then restarted again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import pytest

from flowd.daemon import Daemon
from flowd.fsops import Durable, SimulatedCrash
from inprocess import WAIT, end, new_daemon, write_config

FILE_WF = '<workflow name="dropped">\n  <channel name="c"><item>x</item></channel>\n</workflow>\n'
FOLDER_WF = ('<workflow name="dropped-folder">\n  <channel name="c"><item file="data/in.txt"/>'
             '</channel>\n</workflow>\n')
INVALID = '<workflow name="w">\n  <channel name="c"/>\n  INVALID\n</workflow>\n'

DROPS = {  # name -> (content, the run's source or None: rejected)
    "job.xml": (FILE_WF, "job.xml"),
    "job": ({"workflow.xml": FOLDER_WF, "data/in.txt": "hello\n"}, "job/workflow.xml"),
    "bad.xml": (INVALID, None),
}


class Crashes:
    """SimulatedCrash raised in a thread of the daemon (its worker, a creation thread)."""

    def __init__(self, monkeypatch):
        self.seen: list[BaseException] = []
        real = threading.excepthook

        def hook(args):
            if isinstance(args.exc_value, SimulatedCrash):
                self.seen.append(args.exc_value)
            else:
                real(args)

        monkeypatch.setattr(threading, "excepthook", hook)


def put(path: str, content) -> None:
    if isinstance(content, dict):
        for rel, c in content.items():
            put(os.path.join(path, rel), c)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)


class Spool:
    """One spool; daemons started on it one after the other, as after a crash."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, "spool")
        os.makedirs(os.path.join(root, "work"))
        self.conf = os.path.join(root, "flowd.toml")
        write_config(self.conf)

    def start(self, crash_at: int | None = None, trace: str | None = None) -> Daemon:
        """A prepared daemon; a crash in its own recovery raises SimulatedCrash (after
        closing it)."""
        d = new_daemon(self.conf, self.path,
                       fs=Durable(crash_at=crash_at, crash_mode="raise", trace=trace))
        try:
            d.prepare(signals=False)
        except SimulatedCrash:
            stop(d)
            raise
        return d

    def drop(self, name: str, content) -> None:
        """Built beside incoming/ and renamed in, as docs/spool.md says."""
        src = os.path.join(self.root, "work", name)
        put(src, content)
        os.rename(src, os.path.join(self.path, "incoming", name))

    def listing(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.path, sub)))


def stop(d: Daemon) -> None:
    """What is left of a daemon that crashed (or ended): its threads end, its locks go."""
    end(d)
    deadline = time.monotonic() + WAIT
    while any(t.name.startswith("flowd-create-") and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a run's creation thread did not end"
        time.sleep(0.01)


def drive(d: Daemon, sp: Spool, crashes: Crashes) -> bool:
    """Step ``d`` until the intake has nothing left to do (True) or it crashed (False)."""
    now = time.monotonic()
    end = now + WAIT
    while True:
        if crashes.seen:
            return False
        try:
            d.step(now)
        except SimulatedCrash:
            return False
        if crashes.seen:
            return False
        if (d.intake.idle() and not sp.listing("incoming") and not sp.listing("staging")
                and not d.creating):
            return True
        assert time.monotonic() < end, "the intake did not finish the drop"
        d.control.wait(5)
        now += 0.5  # a stepped clock: a drop found by a rescan settles without sleeping


def check(sp: Spool, name: str) -> None:
    """Exactly one run of the drop, or exactly one rejection; nothing left behind."""
    source = DROPS[name][1]
    runs = sp.listing("runs")
    assert sp.listing("incoming") == [] and sp.listing("staging") == []
    if source is None:
        assert runs == []
        assert sp.listing("rejected") == [name, name + ".error"]
        with open(os.path.join(sp.path, "rejected", name + ".error")) as f:
            text = f.read()
        assert f"{name}:2: error:" in text and "To resubmit:" in text, text
        return
    assert len(runs) == 1 and re.fullmatch(r"[0-9a-f]{12}", runs[0]), runs
    with open(os.path.join(sp.path, "runs", runs[0], "run.json")) as f:
        assert json.load(f)["source"] == source
    assert sp.listing("rejected") == []


def take(root: str, name: str, crashes: Crashes, crash_at: int | None,
         again_at: int | None = None, trace: str | None = None) -> tuple[Daemon, bool]:
    """Drop ``name`` into a new spool under a daemon crashing at ``crash_at``; after a
    crash, restart (crashing the restart at ``again_at``, then restarting again).
    Returns the last daemon (stopped) and whether the first one crashed."""
    sp = Spool(root)
    d = sp.start(crash_at, trace)
    sp.drop(name, DROPS[name][0])
    finished = drive(d, sp, crashes)
    stop(d)
    if not finished:
        crashes.seen.clear()
        if again_at is not None:
            try:
                d2 = sp.start(again_at)
            except SimulatedCrash:
                pass
            else:
                drive(d2, sp, crashes)
                stop(d2)
            crashes.seen.clear()
        d = sp.start()
        assert drive(d, sp, crashes), "the restarted daemon crashed without a crash point"
        stop(d)
    check(sp, name)
    return d, not finished


@pytest.mark.parametrize("name", list(DROPS))
def test_a_crash_at_any_point_of_taking_a_drop_makes_it_one_run_or_one_rejection(
        tmp_path, monkeypatch, name):
    crashes = Crashes(monkeypatch)
    trace = str(tmp_path / "trace")
    take(str(tmp_path / "count"), name, crashes, None, trace=trace)
    total = _points(trace)
    with open(trace) as f:
        steps = [line.split(" ", 2) for line in f.read().splitlines()]
    intake = [s for s in steps if "/staging/" in s[2] or "/rejected/" in s[2]
              or "/incoming" in s[2]]
    assert intake, "the intake's steps go through Durable"
    assert any(s[2].endswith("/submitting") or s[2].endswith("/rejecting") for s in steps)
    crashed = 0
    for n in range(1, total + 1):
        _, did = take(str(tmp_path / f"n{n}"), name, crashes, n)
        crashed += did
        shutil.rmtree(tmp_path / f"n{n}", ignore_errors=True)
    assert crashed >= len(intake)   # each of the intake's points was a crash


def _points(trace: str) -> int:
    with open(trace) as f:
        return sum(1 for _ in f)


def _marks(trace: str) -> list[int]:
    """Points worth crashing just after, and crashing the recovery from."""
    with open(trace) as f:
        steps = [line.split(" ", 2) for line in f.read().splitlines()]
    out = []
    for n, what, path in steps:
        if (path.endswith("/submitting") or path.endswith("/rejecting")
                or re.search(r"/runs/[0-9a-f]{12}$", path) or "/.done-" in path):
            out.append(int(n) + 1)
    return out


@pytest.mark.parametrize("name", list(DROPS))
def test_a_second_crash_during_recovery_still_makes_one_run_or_one_rejection(
        tmp_path, monkeypatch, name):
    crashes = Crashes(monkeypatch)
    trace = str(tmp_path / "trace")
    take(str(tmp_path / "count"), name, crashes, None, trace=trace)
    marks = _marks(trace)
    assert marks
    for n in marks:
        # how many points the recovery from a crash at n has
        rtrace = str(tmp_path / f"r{n}")
        sp = Spool(str(tmp_path / f"c{n}"))
        d = sp.start(n)
        sp.drop(name, DROPS[name][0])
        if drive(d, sp, crashes):
            stop(d)
            continue
        stop(d)
        crashes.seen.clear()
        d = sp.start(trace=rtrace)
        assert drive(d, sp, crashes)
        stop(d)
        check(sp, name)
        for m in range(1, _points(rtrace) + 1):
            take(str(tmp_path / f"m{n}-{m}"), name, crashes, n, again_at=m)
            shutil.rmtree(tmp_path / f"m{n}-{m}", ignore_errors=True)

