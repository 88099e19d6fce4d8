"""A run's folder in the spool: its paths, run.json, channel items and fired marks.

Layout of one run (``SPOOL/runs/RUN/``)::

    run.json                 state, times, message (rewritten atomically)
    workflow.json            the validated model without its initial items (they are
                             in channels/); the daemon never re-parses XML
    bundle/                  the workflow file and the files it names, as sent
    scripts/PROCESS          each process's script, mounted read-only
    channels/CHANNEL/SEQ     items; SEQ is a 16-digit number, global to the run,
                             so names sort in FIFO order across channels
    tasks/TASK/              a claimed task (flowd/taskstore.py: the task protocol)
    failed/TASK/             a dead letter: inputs, task.json and reason kept
    quarantine/SEQ           a damaged item taken out, with SEQ.json saying why
    fired/PROCESS            marks a source process (no inputs) as done
    logs/TASK.ATTEMPT.log    the task's stdout and stderr
    done.log                 "PROCESS<TAB>TASK" per process task applied, for the
                             counts `status` shows after a restart (statistics
                             only: appended without fsync, read as a set)
    trace.jsonl              a record per ended task attempt (flowd/trace.py;
                             statistics: appended without fsync, like done.log)

How a task moves through ``tasks/`` is ``flowd.taskstore``'s; what a folder
holds at start-up is read by ``flowd.storescan``.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, BinaryIO, Iterable

from .errors import NotFound, StorageError
from . import checksum
from .collect import ITEM_MODE
from .fsops import Durable

if TYPE_CHECKING:
    from .taskstore import TaskRecord

DONE_LOG = "done.log"
META = "run.json"  # the run's state, times and message: read and written only through here
SEQ_DIGITS = 16


def seq_name(seq: int) -> str:
    return str(seq).zfill(SEQ_DIGITS)


def _is_seq(name: str) -> bool:
    return len(name) == SEQ_DIGITS and name.isdigit()


class RunStore:
    """One run's folder. All writes go through ``Durable``."""

    def __init__(self, root: str, fs: Durable):
        self.root = root
        self.fs = fs
        self.next_seq = 1

    # -- paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def item_path(self, channel: str, seq: int) -> str:
        return self.path("channels", channel, seq_name(seq))

    def task_path(self, rec: "TaskRecord", *parts: str) -> str:
        return self.path("tasks", rec.dirname, *parts)

    def input_path(self, rec: "TaskRecord", seq: int) -> str:
        return self.task_path(rec, "in", seq_name(seq))

    def log_path(self, rec: "TaskRecord", attempt: int) -> str:
        return self.path("logs", f"{rec.dirname}.{attempt}.log")

    # -- creation ----------------------------------------------------------
    @classmethod
    def layout(cls, root: str, fs: Durable, channels: Iterable[str]) -> "RunStore":
        """Make the folders of a new run under ``root`` (not yet in place).

        Nothing is fsynced here: the caller makes the whole folder durable
        (``Durable.sync_fs``, then run.json) before renaming it into place.
        """
        for d in ("", "channels", "tasks", "failed", "fired", "logs", "scripts"):
            fs.mkdir(os.path.join(root, d) if d else root, sync_parent=False)
        for ch in channels:
            fs.mkdir(os.path.join(root, "channels", ch), sync_parent=False)
        return cls(root, fs)

    # -- metadata ----------------------------------------------------------
    def read_json(self, name: str) -> dict:
        with open(self.path(name), "rb") as f:
            return json.load(f)

    def write_meta(self, meta: dict) -> None:
        """run.json, atomically and durably."""
        self.write_json(META, meta)

    def write_json(self, name: str, data: dict) -> None:
        self.fs.write_file(self.path(name), json.dumps(data, indent=1, sort_keys=True).encode())

    # -- items ---------------------------------------------------------------
    def put_file(self, channel: str, src: str, *, stamped: bool = False) -> int:
        """Append a copy of ``src`` (a hard link when possible: items never change).

        ``src`` must be a file only flowd writes (an upload, a staged drop).
        ``stamped``: its checksum stamp was written while it was received, so
        it is not read again here (a big push costs the loop nothing).
        """
        seq = self.alloc()
        dst = self.item_path(channel, seq)
        try:
            self.fs.link(src, dst)
        except StorageError:
            self.fs.copy_file(src, dst, mode=ITEM_MODE, checksum=True)
            return seq
        _chmod_nofollow(dst, ITEM_MODE)
        if not stamped or checksum.check_stamp_present(dst) is False:
            checksum.stamp_file(dst)  # the inode's: made durable by the fsync below
        # Outside the try: a failed fsync is fatal, never retried as a copy.
        self.fs.fsync_file(dst)
        self.fs.fsync_dir(os.path.dirname(dst))
        return seq

    # -- a new run's initial items, in bulk (Run.create) --------------------------
    def put_initial(self, channel: str, data: bytes) -> int:
        """Append an item to a run folder not yet in place, without fsync: the
        caller makes them all durable at once (``Durable.sync_fs``) before the
        folder takes its live name."""
        seq = self.alloc()
        self.fs.create(self.item_path(channel, seq), data, mode=ITEM_MODE, checksum=True)
        return seq

    def put_initial_file(self, channel: str, src: str, *, stamped: bool = False) -> int:
        """``put_initial`` of a copy of ``src`` (an upload's file: hard-linked when possible).

        ``stamped``: ``src`` already has mode ``ITEM_MODE`` and its checksum
        stamp (a taken upload's file, ``Staging.take``): the link is all."""
        seq = self.alloc()
        dst = self.item_path(channel, seq)
        try:
            self.fs.link(src, dst)
        except StorageError:
            with open(src, "rb") as f:  # another filesystem: copied, then synced with the rest
                self.fs.write_file(dst, f, mode=ITEM_MODE, checksum=True, sync=False)
            return seq
        if stamped:
            return seq
        fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # one open: mode and stamp
        try:
            os.fchmod(fd, ITEM_MODE)
            summer = checksum.Summer()
            while chunk := os.read(fd, 1 << 20):
                summer.update(chunk)
            checksum.stamp(fd, summer)
        finally:
            os.close(fd)
        return seq

    def alloc(self, count: int = 1) -> int:
        """The next ``count`` item numbers of the run (numbers are never reused):
        the first of them."""
        seq = self.next_seq
        self.next_seq += count
        return seq

    def open_item(self, channel: str, seq: int) -> BinaryIO:
        try:
            return open(self.item_path(channel, seq), "rb")
        except FileNotFoundError:
            raise NotFound(f"item {seq} is no longer in channel {channel}") from None

    # -- bookkeeping ---------------------------------------------------------
    def mark_fired(self, process: str) -> None:
        path = self.path("fired", process)
        if not os.path.exists(path):
            self.fs.write_file(path, b"")

    def note_done(self, process: str, task_id: str) -> None:
        """One line in done.log (a redo may write it twice: read as a set)."""
        try:
            self.fs.append(self.path(DONE_LOG), f"{process}\t{task_id}\n".encode())
        except StorageError:
            pass  # a count, never data: the commit stands


def _chmod_nofollow(path: str, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def log_name(process: str, task: str, attempt: int) -> str:
    """The name of a process task's log, as ``RunStore.log_path`` gives it
    (``p.PROCESS.TASK.ATTEMPT.log``: the task's folder name and the attempt)."""
    return f"p.{process.replace('#', '')}.{task}.{attempt}.log"


def parse_log_name(name: str) -> tuple[str, str, int] | None:
    """A log name ``RunStore.log_path`` makes, ``p.PROCESS.TASK.ATTEMPT.log`` -> (process, task,
    attempt); None for any other name."""
    parts = name.split(".")
    if len(parts) != 5 or parts[0] != "p" or parts[4] != "log" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def read_meta(root: str) -> dict:
    """run.json of the run folder ``root`` (OSError or ValueError if unreadable)."""
    with open(os.path.join(root, META), "rb") as f:
        return json.load(f)
