"""Spool drop-in (docs/spool.md): flowd/intake.py.

The unit tests drive the intake with a fake submit function and a stepped
clock (``poll(now)``): no Docker, no sleeps, real inotify events. The intake
does its slow work on a worker thread; ``Stepped`` waits for it after each
poll, so a test reads like the loop's view of things. The tests marked
``docker`` run a real daemon and drop workflows into its spool. The crash
sweep of the intake is tests/test_intake_crash.py.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
import threading
import time

import pytest

from daemon_fixtures import REPO, system_user, wait_until
from flowd import intake as I
from flowd.errors import Problem, UsageError, WorkflowError

ME = pwd.getpwuid(os.geteuid()).pw_name


# -- helpers -----------------------------------------------------------------------
class FakeSubmit:
    """Stands in for Creator.submit_bundle: records the bundle, consumes it like the
    daemon, and answers through ``reply`` (result, error), as the loop would.

    The workflow text decides: ``INVALID`` on a line -> WorkflowError naming that
    line; ``DENIED`` -> another FlowError; ``BOOM`` -> a bug (RuntimeError).
    """

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, bundle: str, name: str, user: str, reply, run_id: str, uid: int | None = None) -> None:
        try:
            result = self.make(bundle, name, user, run_id)
        except Exception as e:  # noqa: BLE001 - handed to the intake, as _created does
            reply(None, e)
        else:
            reply(result, None)

    def make(self, bundle: str, name: str, user: str, run_id: str) -> dict:
        files, inodes = {}, {}
        for folder, dirs, names in os.walk(bundle):
            for n in names:
                p = os.path.join(folder, n)
                rel = os.path.relpath(p, bundle)
                assert not os.path.islink(p)
                with open(p, "rb") as f:
                    files[rel] = f.read()
                inodes[rel] = os.lstat(p).st_ino
        self.calls.append({"name": name, "user": user, "files": files, "inodes": inodes,
                           "run_id": run_id})
        text = files.get("workflow.xml", b"")
        if b"BOOM" in text:
            raise RuntimeError("boom")  # the bundle is left: the intake must cope
        shutil.rmtree(bundle)  # consumed: moved into a run, or removed on an error
        if b"INVALID" in text:
            line = text[:text.index(b"INVALID")].count(b"\n") + 1
            raise WorkflowError([Problem(name, line, "process", "INVALID is not a process",
                                         "remove it")])
        if b"DENIED" in text:
            raise UsageError("process 'p' uses image 'evil', which this flowd does not allow")
        return {"run": run_id, "name": "wf", "warnings": []}


def parser_submit(bundle: str, name: str, user: str, reply, run_id: str, uid: int | None = None) -> None:
    """The daemon's validation, without a daemon."""
    from flowd.parser import load_workflow

    try:
        wf, _ = load_workflow(os.path.join(bundle, "workflow.xml"))
    except WorkflowError as e:
        for p in e.problems:
            p.file = name
        reply(None, e)
        return
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    reply({"run": run_id, "name": wf.name, "warnings": []}, None)


class Stepped(I.Intake):
    """The intake, its worker waited for after start and each poll."""

    def start(self, now: float) -> None:
        super().start(now)
        assert self.wait_idle(), "the intake's worker did not finish"

    def poll(self, now: float, take: bool = True) -> None:
        super().poll(now, take)
        assert self.wait_idle(), "the intake's worker did not finish"


@pytest.fixture
def spool(tmp_path):
    for d in ("incoming", "rejected", "runs", "work"):
        os.mkdir(tmp_path / d)
    return str(tmp_path)


@pytest.fixture
def make(spool):
    made = []

    def make_(submit=None, start=True, **kw):
        kw.setdefault("settle", 2.0)
        it = Stepped(spool, submit or FakeSubmit(), **kw)
        if start:
            it.start(0.0)
        made.append(it)
        return it

    yield make_
    for it in made:
        it.close()


def put(path: str, content) -> str:
    """Write a file (bytes/str) or a folder ({rel: content}) at ``path``."""
    if isinstance(content, dict):
        os.makedirs(path, exist_ok=True)
        for rel, c in content.items():
            put(os.path.join(path, rel), c)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def drop(spool: str, name: str, content) -> None:
    """Write elsewhere on the spool's filesystem, then rename into incoming/ (the right way)."""
    src = put(os.path.join(spool, "work", name), content)
    os.rename(src, os.path.join(spool, "incoming", name))


def listing(spool: str, sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(spool, sub)))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


WF = '<workflow name="w">\n  <channel name="c"><item>x</item></channel>\n</workflow>\n'
INVALID = '<workflow name="w">\n  <channel name="c"/>\n  INVALID\n</workflow>\n'


# -- noticing drops --------------------------------------------------------------------
def test_rename_in_is_taken_at_once(spool, make):
    it = make()
    assert it.fileno() is not None
    drop(spool, "a.xml", WF)
    assert it.next_deadline() == 60.0  # nothing timed: the event wakes the loop
    it.poll(0.0)
    [call] = it.submit.calls
    assert call == {"name": "a.xml", "user": ME, "files": {"workflow.xml": WF.encode()},
                    "inodes": call["inodes"], "run_id": call["run_id"]}
    assert re.fullmatch(r"[0-9a-f]{12}", call["run_id"])     # picked before it is submitted
    assert listing(spool, "incoming") == [] and listing(spool, "rejected") == []
    assert listing(spool, "staging") == []


def test_folder_renamed_in_is_taken_with_its_files(spool, make):
    it = make()
    drop(spool, "job", {"workflow.xml": WF, "data/a.txt": "A", "data/deep/b.txt": "B"})
    it.poll(0.0)
    [call] = it.submit.calls
    assert call["name"] == "job/workflow.xml"
    assert call["files"] == {"workflow.xml": WF.encode(), "data/a.txt": b"A",
                             "data/deep/b.txt": b"B"}
    assert listing(spool, "incoming") == [] and listing(spool, "staging") == []


def test_dotfiles_tmp_and_part_are_ignored_until_renamed(spool, make):
    it = make()
    inc = os.path.join(spool, "incoming")
    put(os.path.join(inc, ".a.xml"), WF)           # written in place: close-write fires
    put(os.path.join(inc, "b.xml.tmp"), WF)
    drop(spool, "c.xml.part", WF)                   # even renamed in
    os.mkdir(os.path.join(inc, ".job"))
    for now in (0.0, 1.0, 5.0, 61.0, 200.0):        # past settle times and rescans
        it.poll(now)
    assert it.submit.calls == []
    assert listing(spool, "incoming") == [".a.xml", ".job", "b.xml.tmp", "c.xml.part"]
    os.rename(os.path.join(inc, ".a.xml"), os.path.join(inc, "a.xml"))
    os.rename(os.path.join(inc, "c.xml.part"), os.path.join(inc, "c.xml"))
    it.poll(200.0)
    assert sorted(c["name"] for c in it.submit.calls) == ["a.xml", "c.xml"]
    assert listing(spool, "incoming") == [".job", "b.xml.tmp"]


def test_close_write_is_a_hint_the_file_is_taken_whole_once_settled(spool, make):
    it = make(settle=2.0)
    path = os.path.join(spool, "incoming", "w.xml")
    half = WF[:30]
    with open(path, "w") as f:                      # cat > w.xml
        f.write(half)
    it.poll(0.0)
    assert it.submit.calls == [] and it.next_deadline() == 2.0
    it.poll(1.0)
    with open(path, "a") as f:                      # >> w.xml, 1 s later (< settle)
        f.write(WF[30:])
    it.poll(1.5)
    it.poll(2.0)                                    # changed since 0.0: wait again
    assert it.submit.calls == [] and it.next_deadline() == 4.0
    it.poll(3.9)
    assert it.submit.calls == []
    it.poll(4.0)
    [call] = it.submit.calls
    assert call["files"]["workflow.xml"] == WF.encode()


def test_folder_made_in_place_is_taken_once_settled(spool, make):
    it = make(settle=2.0)
    job = os.path.join(spool, "incoming", "job")
    os.mkdir(job)                                   # IN_CREATE (a folder)
    it.poll(0.0)
    put(os.path.join(job, "workflow.xml"), WF)      # nothing fires on incoming/ for these
    put(os.path.join(job, "data", "x.txt"), "x")
    it.poll(1.0)
    it.poll(2.0)
    assert it.submit.calls == []
    it.poll(4.0)
    [call] = it.submit.calls
    assert set(call["files"]) == {"workflow.xml", "data/x.txt"}


def test_rescan_at_start_takes_what_was_there_before(spool, make):
    put(os.path.join(spool, "incoming", "early.xml"), WF)
    put(os.path.join(spool, "incoming", "early-job"), {"workflow.xml": WF})
    it = make(settle=2.0)
    it.poll(0.0)
    assert it.submit.calls == []                    # might still be being written: settle
    it.poll(2.0)
    assert sorted(c["name"] for c in it.submit.calls) == ["early-job/workflow.xml", "early.xml"]


def test_overflow_rescans(spool, make):
    it = make(settle=2.0)
    drop(spool, "lost.xml", WF)
    assert it.inotify.read() != b""                 # the kernel's queue overflowed: events lost
    it.poll(0.5)
    it.poll(30.0)
    assert it.submit.calls == []                    # nobody knows about lost.xml
    it.handle_events(struct.pack("iIII", -1, I.IN_Q_OVERFLOW, 0, 0), 30.0)
    assert it.next_deadline() == 32.0
    it.poll(32.0)
    assert [c["name"] for c in it.submit.calls] == ["lost.xml"]


def test_periodic_rescan_without_inotify(spool, make, caplog):
    caplog.set_level(logging.INFO, logger="flowd.intake")
    it = make(use_inotify=False, settle=2.0, fallback_every=2.0)
    assert it.inotify is None
    drop(spool, "a.xml", WF)
    it.poll(1.0)
    assert it.submit.calls == []
    it.poll(2.0)                                    # the rescan sees it
    it.poll(4.0)
    assert [c["name"] for c in it.submit.calls] == ["a.xml"]
    assert "rescanned every 2 s" in caplog.text


def test_without_inotify_in_the_kernel_it_says_so_and_rescans(spool, make, caplog, monkeypatch):
    def unavailable():
        raise I.InotifyUnavailable("inotify_init1: Too many open files")

    monkeypatch.setattr(I, "Inotify", unavailable)
    it = make(fallback_every=2.0)
    assert it.inotify is None and it.next_deadline() == 2.0
    assert "inotify unavailable (inotify_init1: Too many open files)" in caplog.text
    drop(spool, "a.xml", WF)
    it.poll(2.0)
    it.poll(4.0)
    assert [c["name"] for c in it.submit.calls] == ["a.xml"]


def test_incoming_replaced_is_watched_again(spool, make, caplog):
    it = make(fallback_every=2.0)
    inc = os.path.join(spool, "incoming")
    os.rename(inc, inc + ".old")                    # IN_MOVE_SELF: the watch follows the old one
    it.poll(0.0)
    assert "was removed, moved or unmounted" in caplog.text and it.next_deadline() == 2.0
    it.poll(2.0)                                    # not there: said once, tried again
    it.poll(4.0)
    assert caplog.text.count("cannot watch") == 1
    os.mkdir(inc)
    it.poll(6.0)
    drop(spool, "a.xml", WF)
    it.poll(6.0)
    assert [c["name"] for c in it.submit.calls] == ["a.xml"]  # by its rename event
    assert it.next_deadline() == 66.0


def test_inotify_event_records_are_parsed():
    def rec(wd, mask, name):
        raw = name.encode() + b"\0" * (16 - len(name) % 16)
        return struct.pack("iIII", wd, mask, 0, len(raw)) + raw

    buf = (rec(1, I.IN_MOVED_TO, "a.xml") + rec(1, I.IN_CREATE | I.IN_ISDIR, "job")
           + rec(-1, I.IN_Q_OVERFLOW, ""))
    assert I.parse_events(buf) == [(1, I.IN_MOVED_TO, "a.xml"), (1, I.IN_CREATE | I.IN_ISDIR, "job"),
                                   (-1, I.IN_Q_OVERFLOW, "")]
    assert I.parse_events(buf[:-3]) == I.parse_events(buf)[:2]  # a torn tail is dropped


def test_the_loop_is_not_held_by_a_burst_of_drops(spool, make):
    it = make()
    for i in range(I.TAKES_PER_POLL + 3):
        drop(spool, f"d{i:02}.xml", WF)
    it.poll(0.0)
    assert len(it.submit.calls) == I.TAKES_PER_POLL
    assert it.next_deadline() == 0.0                # more to do: come back at once
    it.poll(0.0)
    assert len(it.submit.calls) == I.TAKES_PER_POLL + 3
    assert [c["name"] for c in it.submit.calls] == sorted(c["name"] for c in it.submit.calls)


# -- rejecting ---------------------------------------------------------------------------
def test_invalid_drop_goes_to_rejected_with_its_error_written_first(spool, make, monkeypatch):
    it = make()
    seen = []
    real = it._rename

    def watch(src, dst):
        seen.append((dst, os.path.exists(dst + ".error")))
        real(src, dst)

    monkeypatch.setattr(it, "_rename", watch)
    drop(spool, "bad.xml", INVALID)
    it.poll(0.0)
    target = os.path.join(spool, "rejected", "bad.xml")
    assert seen == [(target, True)]                 # NAME.error was there before NAME
    assert read(target) == INVALID                  # the user's file, as dropped
    text = read(target + ".error")
    assert "bad.xml:3: error: <process>: INVALID is not a process (fix: remove it)" in text
    assert "To resubmit:" in text
    assert listing(spool, "incoming") == [] and listing(spool, "staging") == []
    assert [n for n in listing(spool, "rejected") if n.endswith(".tmp")] == []


def test_real_parser_problems_name_the_line(spool, make):
    it = make(submit=parser_submit)
    drop(spool, "bad.xml", '<workflow name="w">\n  <channel name="c"/>\n'
                           '  <channel name="d" colour="red"/>\n</workflow>\n')
    it.poll(0.0)
    text = read(os.path.join(spool, "rejected", "bad.xml.error"))
    assert "bad.xml:3: error: <channel>:" in text and "colour" in text


def test_a_single_file_cannot_bring_files_it_names(spool, make):
    it = make(submit=parser_submit)
    drop(spool, "lonely.xml", '<workflow name="w">\n  <channel name="c">\n'
                              '    <item file="data.txt"/>\n  </channel>\n</workflow>\n')
    it.poll(0.0)
    text = read(os.path.join(spool, "rejected", "lonely.xml.error"))
    assert "lonely.xml:3: error:" in text and "data.txt" in text
    assert "drop a folder holding workflow.xml and its files" in text


def test_folder_drop_checked_by_the_parser_is_accepted(spool, make):
    it = make(submit=parser_submit)
    drop(spool, "job", {"workflow.xml": '<workflow name="w">\n  <channel name="c">\n'
                                        '    <item file="data.txt"/>\n  </channel>\n</workflow>\n',
                        "data.txt": "hello"})
    it.poll(0.0)
    assert listing(spool, "rejected") == [] and listing(spool, "incoming") == []


def test_name_clash_in_rejected_gets_a_suffix(spool, make):
    it = make()
    for _ in range(3):
        drop(spool, "bad.xml", INVALID)
        it.poll(0.0)
    assert listing(spool, "rejected") == ["bad.xml", "bad.xml.1", "bad.xml.1.error", "bad.xml.2",
                                          "bad.xml.2.error", "bad.xml.error"]


def test_other_flow_errors_and_bugs_reject_and_the_intake_goes_on(spool, make):
    it = make()
    drop(spool, "denied.xml", "DENIED")
    drop(spool, "boom.xml", "BOOM")
    it.poll(0.0)
    denied = read(os.path.join(spool, "rejected", "denied.xml.error"))
    assert "denied.xml: process 'p' uses image 'evil'" in denied
    boom = read(os.path.join(spool, "rejected", "boom.xml.error"))
    assert "internal error in flowd: RuntimeError: boom" in boom
    assert read(os.path.join(spool, "rejected", "boom.xml")) == "BOOM"
    drop(spool, "ok.xml", WF)
    it.poll(1.0)
    assert [c["name"] for c in it.submit.calls] == ["denied.xml", "boom.xml", "ok.xml"]
    assert listing(spool, "staging") == []


def test_names_that_are_not_workflows_are_rejected(spool, make):
    it = make()
    drop(spool, "notes.txt", WF)
    drop(spool, "job", {"data.txt": "x"})
    drop(spool, "big.xml", "x" * (I.XML_CAP + 1))
    it.poll(0.0)
    assert it.submit.calls == []
    assert "must be named NAME.xml" in read(os.path.join(spool, "rejected", "notes.txt.error"))
    assert "must hold workflow.xml" in read(os.path.join(spool, "rejected", "job.error"))
    assert "larger than 1 MiB" in read(os.path.join(spool, "rejected", "big.xml.error"))
    assert os.path.getsize(os.path.join(spool, "rejected", "big.xml")) == I.XML_CAP + 1


def test_folder_drop_limits(spool, make):
    it = make(max_entries=3, max_bytes=10)
    drop(spool, "many", {"workflow.xml": "a", "1": "", "2": "", "3": ""})
    drop(spool, "heavy", {"workflow.xml": "a", "data": "x" * 10})
    it.poll(0.0)
    assert it.submit.calls == []
    assert "more than 3 files and folders" in read(os.path.join(spool, "rejected", "many.error"))
    assert "more than 10 bytes in all" in read(os.path.join(spool, "rejected", "heavy.error"))
    assert sorted(os.listdir(os.path.join(spool, "rejected", "many"))) == ["1", "2", "3", "workflow.xml"]


def test_names_with_control_characters_are_escaped_in_the_error(spool, make):
    it = make()
    drop(spool, "a\nb.xml", INVALID)
    it.poll(0.0)
    text = read(os.path.join(spool, "rejected", "a\nb.xml.error"))
    assert text.splitlines()[0].startswith("# flowd did not take a\\nb.xml,")


# -- what is never followed or trusted ---------------------------------------------------------
IN_ACCESS, IN_OPEN = 0x1, 0x20


def test_symlinks_are_refused_and_their_target_never_read(spool, make, tmp_path_factory):
    secret_dir = tmp_path_factory.mktemp("secret")
    sentinel = os.path.join(secret_dir, "sentinel")
    secret = b"SENTINEL-d41d8cd98f00b204"
    put(sentinel, secret)
    watch = I.Inotify()                             # does anyone open or read the target?
    watch.add_watch(sentinel, IN_ACCESS | IN_OPEN)
    try:
        it = make(settle=2.0)
        work = os.path.join(spool, "work")
        os.symlink(sentinel, os.path.join(work, "evil.xml"))
        os.rename(os.path.join(work, "evil.xml"), os.path.join(spool, "incoming", "evil.xml"))
        put(os.path.join(work, "job", "workflow.xml"), WF)
        os.symlink(sentinel, os.path.join(work, "job", "data.txt"))
        os.rename(os.path.join(work, "job"), os.path.join(spool, "incoming", "job"))
        os.symlink(secret_dir, os.path.join(spool, "incoming", "linkdir"))  # in place: settles
        it.poll(0.0)
        it.poll(2.0)
        assert it.submit.calls == []
        rej = os.path.join(spool, "rejected")
        assert os.path.islink(os.path.join(rej, "evil.xml"))  # moved as the link it is
        assert os.path.islink(os.path.join(rej, "linkdir"))
        assert "a symbolic link" in read(os.path.join(rej, "evil.xml.error"))
        assert "job/data.txt: a symbolic link" in read(os.path.join(rej, "job.error"))
        assert "a symbolic link" in read(os.path.join(rej, "linkdir.error"))
        assert watch.read() == b""                  # the target was never opened
        for folder, dirs, names in os.walk(spool):  # and its content is nowhere in the spool
            for n in names:
                p = os.path.join(folder, n)
                if not os.path.islink(p):
                    with open(p, "rb") as f:
                        assert secret not in f.read(), p
    finally:
        watch.close()


def test_fifos_and_devices_are_refused_without_blocking(spool, make):
    it = make()
    work = os.path.join(spool, "work")
    os.mkfifo(os.path.join(work, "pipe.xml"))
    os.rename(os.path.join(work, "pipe.xml"), os.path.join(spool, "incoming", "pipe.xml"))
    put(os.path.join(work, "job", "workflow.xml"), WF)
    os.mkfifo(os.path.join(work, "job", "data"))
    os.rename(os.path.join(work, "job"), os.path.join(spool, "incoming", "job"))
    if os.geteuid() == 0:
        os.mknod(os.path.join(work, "dev.xml"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.rename(os.path.join(work, "dev.xml"), os.path.join(spool, "incoming", "dev.xml"))
    it.poll(0.0)
    assert it.submit.calls == []
    assert "a FIFO" in read(os.path.join(spool, "rejected", "pipe.xml.error"))
    assert "job/data: a FIFO" in read(os.path.join(spool, "rejected", "job.error"))
    if os.geteuid() == 0:
        assert "a device" in read(os.path.join(spool, "rejected", "dev.xml.error"))


def test_hard_linked_files_are_copied_private_ones_linked(spool, make):
    it = make()
    shared = put(os.path.join(spool, "work", "shared.txt"), "shared")
    put(os.path.join(spool, "work", "job", "workflow.xml"), WF)
    put(os.path.join(spool, "work", "job", "own.txt"), "own")
    os.link(shared, os.path.join(spool, "work", "job", "shared.txt"))
    own_ino = os.lstat(os.path.join(spool, "work", "job", "own.txt")).st_ino
    os.rename(os.path.join(spool, "work", "job"), os.path.join(spool, "incoming", "job"))
    it.poll(0.0)
    [call] = it.submit.calls
    assert call["files"]["shared.txt"] == b"shared"
    assert call["inodes"]["shared.txt"] != os.lstat(shared).st_ino  # a private copy
    assert call["inodes"]["own.txt"] == own_ino                     # ours, one link: linked
    with open(shared, "a") as f:
        f.write(" changed")                         # cannot reach what was submitted


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_folder_may_not_hold_files_of_another_user(spool, make):
    it = make()
    put(os.path.join(spool, "work", "job", "workflow.xml"), WF)
    put(os.path.join(spool, "work", "job", "theirs.txt"), "x")
    for p in ("job", "job/workflow.xml"):
        os.chown(os.path.join(spool, "work", p), 65534, 65534)
    os.rename(os.path.join(spool, "work", "job"), os.path.join(spool, "incoming", "job"))
    it.poll(0.0)
    assert it.submit.calls == []
    assert "job/theirs.txt: belongs to root, not to " in read(os.path.join(spool, "rejected", "job.error"))


def test_a_drop_that_cannot_be_moved_stays_with_an_error_and_is_taken_once_fixed(
        spool, make, monkeypatch):
    it = make(settle=2.0)
    real_rename = os.rename
    inc = os.path.join(spool, "incoming")

    def no_write_permission(src, dst, *a, **kw):
        if os.path.dirname(src) == inc:
            raise PermissionError(errno.EACCES, "Permission denied", src)
        return real_rename(src, dst, *a, **kw)

    drop(spool, "job", {"workflow.xml": WF})
    monkeypatch.setattr(os, "rename", no_write_permission)
    it.poll(0.0)
    it.poll(61.0)                                   # a rescan: reported once, not again
    it.poll(63.0)
    assert os.listdir(os.path.join(inc, "job")) == ["workflow.xml"]
    assert listing(spool, "rejected") == ["job.error"]
    text = read(os.path.join(spool, "rejected", "job.error"))
    assert "cannot move it out of" in text and "chmod -R g+w" in text
    monkeypatch.setattr(os, "rename", real_rename)
    time.sleep(0.02)                                # so that the ctime surely moves
    os.chmod(os.path.join(inc, "job"), 0o775)       # the user's fix: IN_ATTRIB
    it.poll(64.0)
    it.poll(66.0)
    assert [c["name"] for c in it.submit.calls] == ["job/workflow.xml"]
    assert listing(spool, "rejected") == []         # the stale error went with it


# -- crash recovery ----------------------------------------------------------------------------
def test_a_drop_left_in_staging_is_taken_at_start(spool, make):
    box = os.path.join(spool, "staging", "0123456789abcdef")
    put(os.path.join(box, "d", "half.xml"), WF)
    put(os.path.join(box, "bundle", "workflow.xml"), "partial")    # a half-built bundle
    put(os.path.join(spool, "staging", ".done-fedcba9876543210", "d", "old.xml"), WF)
    it = make()
    [call] = it.submit.calls
    assert call["name"] == "half.xml" and call["files"] == {"workflow.xml": WF.encode()}
    assert listing(spool, "staging") == []


def test_a_drop_whose_run_was_made_before_a_crash_is_not_submitted_twice(spool, make):
    box = os.path.join(spool, "staging", "0123456789abcdef")
    put(os.path.join(box, "d", "done.xml"), WF)
    put(os.path.join(box, I.MARKER), "aaaaaaaaaaaa\n")          # its run id...
    put(os.path.join(spool, "runs", "aaaaaaaaaaaa", "run.json"), "{}")  # ...and the run exists
    other = os.path.join(spool, "staging", "fedcba9876543210")
    put(os.path.join(other, "d", "again.xml"), WF)
    put(os.path.join(other, I.MARKER), "bbbbbbbbbbbb\n")        # its run was never made
    it = make()
    [call] = it.submit.calls
    assert (call["name"], call["run_id"]) == ("again.xml", "bbbbbbbbbbbb")   # made now, as that id
    assert listing(spool, "staging") == [] and listing(spool, "rejected") == []


def test_a_marker_of_an_older_flowd_is_still_understood(spool, make):
    box = os.path.join(spool, "staging", "0123456789abcdef")
    put(os.path.join(box, "d", "done.xml"), WF)
    put(os.path.join(box, I.MARKER), f"{time.time() - 5}\n")  # the time it was written
    put(os.path.join(spool, "runs", "aaaaaaaaaaaa", "run.json"),
        json.dumps({"source": "done.xml", "submitted_by": ME, "submitted_at": time.time() - 4}))
    other = os.path.join(spool, "staging", "fedcba9876543210")
    put(os.path.join(other, "d", "again.xml"), WF)
    put(os.path.join(other, I.MARKER), f"{time.time() - 5}\n")
    it = make()
    assert [c["name"] for c in it.submit.calls] == ["again.xml"]     # no run of it yet
    assert listing(spool, "staging") == []


def test_a_rejection_cut_short_is_finished_under_the_same_name(spool, make):
    box = os.path.join(spool, "staging", "0123456789abcdef")
    put(os.path.join(box, "d", "bad.xml"), INVALID)
    put(os.path.join(box, I.REJECTING), json.dumps(
        {"target": "bad.xml.1", "text": "# why\n", "first": "bad.xml:3: error", "user": ME}))
    put(os.path.join(spool, "rejected", "bad.xml.1.error"), "# why\n")  # written before the crash
    it = make()
    assert it.submit.calls == []                    # not validated again, not a second .error
    assert listing(spool, "rejected") == ["bad.xml.1", "bad.xml.1.error"]
    assert read(os.path.join(spool, "rejected", "bad.xml.1")) == INVALID
    assert listing(spool, "staging") == []


def test_the_loop_only_notices_the_worker_takes(spool, make):
    """The copy and the submit run on the intake's worker thread, never on the caller's."""
    seen = []

    class Watching(FakeSubmit):
        def make(self, bundle, name, user, run_id):
            seen.append(threading.current_thread().name)
            return super().make(bundle, name, user, run_id)

    it = make(submit=Watching())
    real = it._build_bundle

    def build(*a):
        seen.append(threading.current_thread().name)
        return real(*a)

    it._build_bundle = build
    drop(spool, "job", {"workflow.xml": WF})
    I.Intake.poll(it, 0.0)                          # the loop's turn: it only hands it over
    assert it.wait_idle()
    assert seen == ["flowd-intake", threading.current_thread().name]  # copied off the loop;
    [call] = it.submit.calls                        # submitted from the loop (the Creator then
    assert call["name"] == "job/workflow.xml"       # makes the run on a thread of its own)


# -- end to end, with a real daemon ---------------------------------------------------------


def writable_by_the_daemons_group(path: str, daemon) -> None:
    """As a member of the daemon's group drops a folder (umask 002, docs/spool.md): the
    daemon, not root, must move it out of incoming/, which needs write access to it."""
    if daemon.pw is None:
        return
    for folder, dirs, files in os.walk(path):
        for p in [folder] + [os.path.join(folder, n) for n in files]:
            os.chown(p, -1, daemon.pw.pw_gid)
            os.chmod(p, os.stat(p).st_mode | 0o060)


def run_named(daemon, name):
    res = daemon.flowctl("status", "--json", check=0)
    runs = [r for r in json.loads(res.stdout)["runs"] if r["name"] == name]
    return runs[0]["id"] if runs else None


def finished(daemon, run):
    detail = json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)
    return detail if detail["state"] in ("succeeded", "failed", "cancelled") else None


UPPER = """<workflow name="{name}">
  <channel name="in"><item file="data/in.txt"/></channel>
  <channel name="out"/>
  <process name="upper" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>tr a-z A-Z &lt; in &gt; out</script>
  </process>
</workflow>
"""


@pytest.mark.docker
def test_e2e_a_dropped_folder_becomes_a_run_that_succeeds(daemon, workdir, docker_images):
    src = put(os.path.join(workdir, "job"), {"workflow.xml": UPPER.format(name="dropped-ok"),
                                             "data/in.txt": "hello drop\n"})
    writable_by_the_daemons_group(src, daemon)
    os.rename(src, os.path.join(daemon.spool, "incoming", "job"))
    run = wait_until(lambda: run_named(daemon, "dropped-ok"), 30, "the drop to become a run")
    detail = wait_until(lambda: finished(daemon, run), 60, "the run to end")
    assert detail["state"] == "succeeded", daemon.log()
    out = os.path.join(workdir, "out")
    daemon.flowctl("pull", run, "out", "--out", out, check=0)
    assert [read(os.path.join(out, n)) for n in sorted(os.listdir(out))] == ["HELLO DROP\n"]
    with open(os.path.join(daemon.spool, "runs", run, "run.json")) as f:
        meta = json.load(f)
    assert meta["source"] == "job/workflow.xml" and meta["submitted_by"] == ME
    assert os.listdir(os.path.join(daemon.spool, "incoming")) == []
    assert os.listdir(os.path.join(daemon.spool, "staging")) == []
    assert f"became run {run}" in daemon.log()


@pytest.mark.docker
def test_e2e_an_invalid_drop_lands_in_rejected_naming_the_line(daemon, workdir, docker_images):
    bad = ('<workflow name="dropped-bad">\n  <channel name="in"/>\n'
           '  <process name="p" image="flowd/busybox" colour="red">\n'
           '    <input channel="in"/><script>true</script>\n  </process>\n</workflow>\n')
    src = put(os.path.join(workdir, "bad.xml.part"), bad)
    os.rename(src, os.path.join(daemon.spool, "incoming", "bad.xml"))
    rejected = os.path.join(daemon.spool, "rejected")
    wait_until(lambda: os.path.exists(os.path.join(rejected, "bad.xml")), 30, "the rejection")
    text = read(os.path.join(rejected, "bad.xml.error"))
    assert "bad.xml:3: error: <process>:" in text and "colour" in text, text
    assert read(os.path.join(rejected, "bad.xml")) == bad
    sample = doc_blocks("text")[0][1].splitlines()  # docs/spool.md shows this very error
    assert sample[1] in text.splitlines() and sample[2].startswith("To resubmit: fix the file")
    assert json.loads(daemon.flowctl("status", "--json", check=0).stdout)["runs"] == []
    assert os.listdir(os.path.join(daemon.spool, "incoming")) == []


def doc_blocks(info: str) -> list[tuple[str, str]]:
    """(fence info, body) of docs/spool.md's fenced blocks whose info starts with ``info``."""
    with open(os.path.join(REPO, "docs", "spool.md")) as f:
        found = re.findall(r"^ *```([^\n]*)\n(.*?)^ *```$", f.read(), re.M | re.S)
    return [(i, body) for i, body in found if i.split()[:1] == [info] or i.startswith(info + " ")]


@pytest.mark.docker
def test_e2e_the_examples_of_docs_spool_md_run_as_written(daemon, docker_images):
    examples = [(i, body) for i, body in doc_blocks("sh") if "spool-example" in i.split()]
    assert len(examples) >= 2
    for info, body in examples:
        name = re.search(r"run=(\S+)", info).group(1)
        res = subprocess.run(["bash", "-euc", body], cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, SPOOL=daemon.spool))
        assert res.returncode == 0, res.stderr
        run = wait_until(lambda: run_named(daemon, name), 30, f"{name} to become a run")
        detail = wait_until(lambda: finished(daemon, run), 60, f"{name} to end")
        assert detail["state"] == "succeeded", (name, daemon.log())
    assert os.listdir(os.path.join(daemon.spool, "incoming")) == []
    assert os.listdir(os.path.join(daemon.spool, "rejected")) == []


DAEMON_USER = "flowd-test"       # as in test_daemon.py: a system user in the docker group
DROPPER = "flowd-dropper"        # a user in the daemon's group (kept, as flowd-test)


def _need_root_or_fail(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must not skip this)")
    pytest.skip(why)


@pytest.fixture
def users():
    if os.geteuid() != 0:
        _need_root_or_fail("needs root to make test users")
    check = subprocess.run(["/usr/bin/python3", "-c", "import docker, zmq, lxml, sdnotify"],
                           capture_output=True)
    if check.returncode:
        _need_root_or_fail("Debian's python3-docker/zmq/lxml/sdnotify are needed (.ci/setup-host)")
    # Made when missing and kept (as flowd-test is): CI runs two test sessions at
    # once, and one must not delete the user the other is dropping files as.
    daemon_pw = system_user(DAEMON_USER, groups=("docker",))
    yield daemon_pw, system_user(DROPPER, gid=daemon_pw.pw_gid)


def as_dropper(pw, script: str, umask: int, **env):
    res = subprocess.run(["/bin/sh", "-ec", script], user=pw.pw_uid, group=pw.pw_gid,
                         extra_groups=[pw.pw_gid], umask=umask, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env})
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.docker
def test_e2e_drops_by_another_user_work_as_the_spool_permissions_allow(
        daemon_factory, workdir, docker_images, users):
    daemon_pw, dropper = users
    os.chmod(workdir, 0o755)
    spool = os.path.join(workdir, "spool")
    os.mkdir(spool, 0o750)
    incoming = os.path.join(spool, "incoming")
    os.mkdir(incoming)
    for p in (spool, incoming):
        os.chown(p, daemon_pw.pw_uid, daemon_pw.pw_gid)
    os.chmod(incoming, 0o2770)                      # as packaging/tmpfiles makes it
    d = daemon_factory(spool=spool, user=DAEMON_USER, python="/usr/bin/python3").start()
    rejected = os.path.join(spool, "rejected")
    build = ('cd "$INCOMING"; mkdir ".$NAME" ".$NAME/data"; printf %s "$WF" > ".$NAME/workflow.xml"; '
             'printf "hi from %s\\n" "$(id -un)" > ".$NAME/data/in.txt"; mv ".$NAME" "$NAME"')

    # 1. group-writable (umask 002): taken at once, owned by the dropper
    as_dropper(dropper, build, 0o002, INCOMING=incoming, NAME="job", WF=UPPER.format(name="by-other"))
    run = wait_until(lambda: run_named(d, "by-other"), 30, "the drop to become a run")
    detail = wait_until(lambda: finished(d, run), 60, "the run to end")
    assert detail["state"] == "succeeded", d.log()
    out = os.path.join(workdir, "out")
    d.flowctl("pull", run, "out", "--out", out, check=0)
    assert [read(os.path.join(out, n)) for n in os.listdir(out)] == [f"HI FROM {DROPPER.upper()}\n"]
    with open(os.path.join(spool, "runs", run, "run.json")) as f:
        assert json.load(f)["submitted_by"] == DROPPER

    # 2. umask 022: flowd may not move the folder; it says so, and takes it once fixed
    as_dropper(dropper, build, 0o022, INCOMING=incoming, NAME="job2", WF=UPPER.format(name="fixed"))
    error = os.path.join(rejected, "job2.error")
    wait_until(lambda: os.path.exists(error), 30, "job2.error")
    assert "chmod -R g+w" in read(error) and os.path.isdir(os.path.join(incoming, "job2"))
    as_dropper(dropper, 'chmod -R g+w "$INCOMING/job2"', 0o022, INCOMING=incoming)
    run2 = wait_until(lambda: run_named(d, "fixed"), 30, "the fixed drop to become a run")
    assert wait_until(lambda: finished(d, run2), 60, "the run to end")["state"] == "succeeded"
    assert not os.path.exists(error) and os.listdir(incoming) == []

    # 3. umask 077: flowd cannot read it; rejected, saying so, still the dropper's
    as_dropper(dropper, 'cd "$INCOMING"; printf %s "$WF" > .s.xml.part; mv .s.xml.part s.xml',
               0o077, INCOMING=incoming, WF=UPPER.format(name="secret"))
    wait_until(lambda: os.path.exists(os.path.join(rejected, "s.xml")), 30, "the rejection")
    text = read(os.path.join(rejected, "s.xml.error"))
    assert "flowd cannot read it: Permission denied" in text and "g+r" in text
    assert os.stat(os.path.join(rejected, "s.xml")).st_uid == dropper.pw_uid
    assert os.listdir(os.path.join(spool, "staging")) == []
