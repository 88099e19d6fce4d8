"""The channel store: a run's channels and tasks as files in the spool.

Layout of one run (``SPOOL/runs/RUN/``)::

    run.json                 state, times, message (rewritten atomically)
    workflow.json            the validated model; the daemon never re-parses XML
    bundle/                  the workflow file and the files it names, as sent
    scripts/PROCESS          each process's script, mounted read-only
    channels/CHANNEL/SEQ     items; SEQ is a 16-digit number, global to the run,
                             so names sort in FIFO order across channels
    tasks/TASK/              a claimed task (see below)
    failed/TASK/             a dead letter: inputs, task.json and reason kept
    fired/PROCESS            marks a source process (no inputs) as done
    logs/TASK.ATTEMPT.log    the task's stdout and stderr
    done.log                 "PROCESS<TAB>TASK" per process task applied, for the
                             counts `status` shows after a restart (statistics
                             only: appended without fsync, read as a set)

One task's life (RELIABILITY.md), each step durable before the next:

1. Claim: build ``tasks/.TASK.new/`` (task.json, in/, work/), rename it to
   ``tasks/TASK``; rename each input item into ``in/``; create ``CLAIMED``.
2. Run: ``attempt`` holds the attempt number, written before each start.
3. Collect: declared outputs only, regular files opened without following
   links, one link, size-capped; fsynced, then output J of attempt A moved
   whole to ``out/A.J`` and the folders fsynced. Idempotent: a collect that a
   crash cut short is done again from what is in ``work/`` and ``out/``.
4. Commit: ``COMMIT`` lists every output's final channel and SEQ.
5. Apply (idempotent): move outputs into channels, then delete inputs, then
   retire (rename to ``tasks/.TASK.done``, then remove).
6. Recovery: hidden task folders are removed; claimed but not marked:
   inputs go back to their channels (their SEQ keeps their old place);
   COMMIT present: redo Apply; otherwise the daemon asks the executor.

A mux move is a task without a container: its COMMIT links the input into
every target channel, so fan-out costs no copy.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

from .errors import NotFound, StorageError
from . import checksum
from .fsops import Durable, file_kind

DONE_LOG = "done.log"
SEQ_DIGITS = 16
MAX_OUTPUT_FILES = 10_000  # per output name, when the script writes a folder


def seq_name(seq: int) -> str:
    return str(seq).zfill(SEQ_DIGITS)


def _is_seq(name: str) -> bool:
    return len(name) == SEQ_DIGITS and name.isdigit()


class TaskOutputError(Exception):
    """The script's outputs break the rules (a task failure, not a crash)."""


@dataclass
class TaskRecord:
    """A claimed task as the store knows it (also what recovery returns)."""

    dirname: str  # folder name under tasks/
    kind: str  # "process" or "mux"
    name: str  # process or mux name
    task_id: str
    inputs: list[tuple[str, int]]  # (channel, seq) in input order
    attempt: int = 0
    claimed: bool = False
    committed: bool = False
    extra: dict = field(default_factory=dict)


def task_dirname(kind: str, name: str, task_id: str) -> str:
    prefix = "p" if kind == "process" else "m"
    return f"{prefix}.{name.replace('#', '')}.{task_id}"


class RunStore:
    """One run's durable state. All writes go through ``Durable``."""

    def __init__(self, root: str, fs: Durable, *, max_output_bytes: int | None = None,
                 work_mode: int = 0o700):
        self.root = root
        self.fs = fs
        self.max_output_bytes = max_output_bytes
        # work/ (the container's /task): 0700 when containers run as flowd's own
        # uid; 02770 when they run as another (the container gets flowd's group,
        # and setgid keeps new files in it). Reached only through the run's 0700
        # folders either way.
        self.work_mode = work_mode
        self.next_seq = 1

    # -- paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def item_path(self, channel: str, seq: int) -> str:
        return self.path("channels", channel, seq_name(seq))

    def task_path(self, rec: TaskRecord, *parts: str) -> str:
        return self.path("tasks", rec.dirname, *parts)

    def log_path(self, rec: TaskRecord, attempt: int) -> str:
        return self.path("logs", f"{rec.dirname}.{attempt}.log")

    # -- creation ----------------------------------------------------------
    @classmethod
    def layout(cls, root: str, fs: Durable, channels: Iterable[str]) -> "RunStore":
        """Make the folders of a new run under ``root`` (not yet in place).

        ``root`` itself is not fsynced here: the caller writes files in it
        (``run.json`` last, which fsyncs it) before renaming it into place.
        """
        for d in ("", "channels", "tasks", "failed", "fired", "logs", "scripts"):
            fs.mkdir(os.path.join(root, d) if d else root, sync_parent=False)
        for ch in channels:
            fs.mkdir(os.path.join(root, "channels", ch), sync_parent=False)
        fs.fsync_dir(os.path.join(root, "channels"))
        return cls(root, fs)

    # -- metadata ----------------------------------------------------------
    def read_json(self, name: str) -> dict:
        with open(self.path(name), "rb") as f:
            return json.load(f)

    def write_json(self, name: str, data: dict) -> None:
        self.fs.write_file(self.path(name), json.dumps(data, indent=1, sort_keys=True).encode())

    # -- items ---------------------------------------------------------------
    def put(self, channel: str, data: bytes | Iterable[bytes] | BinaryIO) -> int:
        """Append an item (streamed); durable when this returns."""
        seq = self._alloc()
        self.fs.write_file(self.item_path(channel, seq), data, checksum=True)
        return seq

    def put_file(self, channel: str, src: str, *, stamped: bool = False) -> int:
        """Append a copy of ``src`` (a hard link when possible: items never change).

        ``src`` must be a file only flowd writes (an upload, a staged drop).
        ``stamped``: its checksum stamp was written while it was received, so
        it is not read again here (a big push costs the loop nothing).
        """
        seq = self._alloc()
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

    def _alloc(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def open_item(self, channel: str, seq: int) -> BinaryIO:
        try:
            return open(self.item_path(channel, seq), "rb")
        except FileNotFoundError:
            raise NotFound(f"item {seq} is no longer in channel {channel}") from None

    # -- scan (start-up) -----------------------------------------------------
    def scan_channels(self, channels: Iterable[str]) -> dict[str, list[int]]:
        """Each channel's items in FIFO order; removes half-written temp files."""
        queues: dict[str, list[int]] = {}
        top = 0
        for ch in channels:
            folder = self.path("channels", ch)
            seqs = []
            for name in os.listdir(folder):
                if _is_seq(name):
                    seqs.append(int(name))
                elif name.startswith("."):
                    self.fs.unlink(os.path.join(folder, name))
            seqs.sort()
            queues[ch] = seqs
            if seqs:
                top = max(top, seqs[-1])
        self.next_seq = max(self.next_seq, top + 1)
        return queues

    def scan_fired(self) -> set[str]:
        return set(os.listdir(self.path("fired")))

    def scan_failed(self) -> list[dict]:
        out = []
        folder = self.path("failed")
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                self.fs.rmtree(os.path.join(folder, name))
                continue
            try:
                with open(os.path.join(folder, name, "failure.json"), "rb") as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {"task": name, "reason": "unknown"}
            info["dirname"] = name
            for _, seq in info.get("inputs", []):
                self.next_seq = max(self.next_seq, int(seq) + 1)
            out.append(info)
        return out

    def recover_tasks(self) -> list[TaskRecord]:
        """Step 6 for the store's part. Returns the tasks still claimed.

        Hidden folders are removed, unmarked claims are released, committed
        tasks are applied and retired. What is returned has CLAIMED and no
        COMMIT: the caller asks the executor about its container.
        """
        folder = self.path("tasks")
        live: list[TaskRecord] = []
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name.startswith("."):
                self.fs.rmtree(full)
                continue
            rec = self._load_task(name)
            for _, seq in rec.inputs:
                self.next_seq = max(self.next_seq, seq + 1)
            if rec.committed:
                commit = self._read_commit(rec)
                for _, _, seq in commit["outputs"]:
                    self.next_seq = max(self.next_seq, seq + 1)
                live.append(rec)
            elif not rec.claimed:
                self.release(rec)
            else:
                live.append(rec)
        for rec in [r for r in live if r.committed]:
            self.apply(rec)  # its retire fsyncs tasks/
        return [r for r in live if not r.committed]

    def _load_task(self, dirname: str) -> TaskRecord:
        with open(self.path("tasks", dirname, "task.json"), "rb") as f:
            d = json.load(f)
        rec = TaskRecord(
            dirname=dirname,
            kind=d["kind"],
            name=d["name"],
            task_id=d["task_id"],
            inputs=[(c, int(s)) for c, s in d["inputs"]],
        )
        rec.claimed = os.path.exists(self.task_path(rec, "CLAIMED"))
        rec.committed = os.path.exists(self.task_path(rec, "COMMIT"))
        try:
            with open(self.task_path(rec, "attempt"), "rb") as f:
                rec.attempt = int(f.read().strip() or 0)
        except FileNotFoundError:
            rec.attempt = 0
        return rec

    # -- 1. claim --------------------------------------------------------------
    def claim(self, kind: str, name: str, task_id: str, inputs: list[tuple[str, int]]) -> TaskRecord:
        rec = TaskRecord(task_dirname(kind, name, task_id), kind, name, task_id, list(inputs))
        tasks = self.path("tasks")
        hidden = os.path.join(tasks, f".{rec.dirname}.new")
        fs = self.fs
        fs.rmtree(hidden)
        fs.mkdir(hidden, sync_parent=False)
        fs.mkdir(os.path.join(hidden, "in"), sync_parent=False)
        if kind == "process":
            fs.mkdir(os.path.join(hidden, "work"), mode=self.work_mode, sync_parent=False)
            fs.mkdir(os.path.join(hidden, "out"), sync_parent=False)
        meta = {"kind": kind, "name": name, "task_id": task_id, "inputs": rec.inputs,
                "claimed_at": time.time()}
        fs.write_file(os.path.join(hidden, "task.json"), json.dumps(meta).encode(), sync_dir=False)
        fs.fsync_dir(hidden)
        fs.rename(hidden, self.task_path(rec))
        into = self.task_path(rec, "in")
        touched = set()
        for ch, seq in rec.inputs:
            fs.rename(self.item_path(ch, seq), os.path.join(into, seq_name(seq)), sync=False)
            touched.add(self.path("channels", ch))
        fs.fsync_dir(into)
        for d in sorted(touched):
            fs.fsync_dir(d)
        # No fsync: a mark lost in a power failure makes recovery release the
        # claim, which is safe (the machine's containers died with it). It
        # becomes durable with COMMIT, the next fsync of the task folder; keep
        # it so (release relies on it: see there).
        fs.write_file(self.task_path(rec, "CLAIMED"), b"", sync=False)
        rec.claimed = True
        return rec

    def quarantine(self, rec: TaskRecord, bad: list[tuple[str, int, str]]) -> None:
        """Move damaged inputs to quarantine/ with their reason; release the rest.

        Nothing is deleted: ``quarantine/SEQ`` keeps the bytes as found and
        ``quarantine/SEQ.json`` says where the item was and why it was taken out.
        """
        folder = self.path("quarantine")
        if not os.path.isdir(folder):
            self.fs.mkdir(folder)
        for ch, seq, why in bad:
            info = {"channel": ch, "seq": seq, "reason": why, "task": rec.dirname,
                    "process": rec.name, "quarantined_at": time.time()}
            self.fs.write_file(os.path.join(folder, seq_name(seq) + ".json"),
                               json.dumps(info).encode())
            self.fs.rename(self.input_path(rec, seq), os.path.join(folder, seq_name(seq)))
        self.release(rec)

    def scan_quarantine(self) -> list[dict]:
        folder = self.path("quarantine")
        out = []
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json") and not name.startswith("."):
                    try:
                        with open(os.path.join(folder, name), "rb") as f:
                            out.append(json.load(f))
                    except (OSError, ValueError):
                        out.append({"seq": name[:-5], "reason": "unknown"})
        return out

    def input_path(self, rec: TaskRecord, seq: int) -> str:
        return self.task_path(rec, "in", seq_name(seq))

    # -- 2. attempts -----------------------------------------------------------
    def set_attempt(self, rec: TaskRecord, attempt: int) -> None:
        """Written before each start. It survives a crash of the daemon (the page
        cache does; the container may run on); no fsync, because after a power
        failure no container of the task is running: a lost number only means
        the task starts again from an earlier attempt."""
        self.fs.write_file(self.task_path(rec, "attempt"), str(attempt).encode(), sync=False)
        rec.attempt = attempt

    def reset_work(self, rec: TaskRecord) -> None:
        """Give the task an empty ``work/`` for its next attempt.

        Idempotent: a crash half-way leaves ``.work.old`` and maybe no
        ``work/``, and the restarted daemon, given the same failed result by
        the container, does it again.
        """
        work = self.task_path(rec, "work")
        old = self.task_path(rec, ".work.old")
        if os.path.lexists(work):
            if os.path.lexists(old):
                self.fs.rmtree(old)
            self.fs.rename(work, old, sync=False)
        self.fs.rmtree(old)
        # No fsync: work/ only matters while CLAIMED does, and CLAIMED becomes
        # durable with COMMIT only; after a power failure the task is released.
        self.fs.mkdir(work, mode=self.work_mode, sync_parent=False)

    # -- 3. collect ------------------------------------------------------------
    def collect(self, rec: TaskRecord, outputs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Copy the declared outputs from work/ into out/; returns (channel, rel) in order.

        ``outputs`` is the process's (channel, as-name) list. A regular file is
        one item; a folder gives one item per regular file in it, by name; no
        file gives no item. Anything else (a link, a FIFO, a device, a folder
        in the folder, a hard link, an oversized file) is a TaskOutputError.

        What a container leaves is hostile (RELIABILITY.md), so an item is
        never the container's own inode: each output is opened once, without
        following links, through the descriptor of its folder; the open file
        is checked (fstat) and its bytes are copied into a new file that flowd
        creates and owns, mode 0640, no setuid, one link, stamped with its
        checksum and fsynced. Nothing is looked up twice: a name swapped
        during the collect is either the file checked or not collected. The
        result is exactly the files copied.

        Idempotent (a crash can stop it half-way and the restarted daemon
        collects the same attempt again): output J of attempt A is built as
        ``out/.A.J.tmp`` and renamed whole to ``out/A.J`` (a file, or a
        folder of files named 000000, 000001... in the order of the names the
        script gave), so an output found in out/ is complete and not copied
        again; the result is read back from ``out/``.
        """
        work = self.task_path(rec, "work")
        outdir = self.task_path(rec, "out")
        fs = self.fs
        made = False
        wfd = os.open(work, _DIR_OPEN)
        try:
            for j, (channel, as_name) in enumerate(outputs):
                dst = os.path.join(outdir, f"{rec.attempt}.{j}")
                if os.path.lexists(dst):
                    continue  # an earlier collect of this attempt finished it
                made = self._collect_one(wfd, as_name, dst) or made
        finally:
            os.close(wfd)
        result: list[tuple[str, str]] = []
        for j, (channel, _) in enumerate(outputs):
            rel = f"out/{rec.attempt}.{j}"
            dst = self.task_path(rec, rel)
            if os.path.isdir(dst):
                result += [(channel, f"{rel}/{n}") for n in sorted(os.listdir(dst))]
            elif os.path.lexists(dst):
                result.append((channel, rel))
        if made or result:
            # also when an earlier collect of this attempt made them all: its
            # fsync of out/ may never have run (a kill -9 right before it)
            fs.fsync_dir(outdir)
        return result

    def _collect_one(self, wfd: int, as_name: str, dst: str) -> bool:
        """Copy one declared output into ``dst``; False when the script wrote none."""
        fs = self.fs
        fd = _open_output(wfd, as_name, as_name)
        if fd is None:
            return False
        tmp = os.path.join(os.path.dirname(dst), "." + os.path.basename(dst) + ".tmp")
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self._check_output(st, as_name)
                self._copy_output(fd, st, dst, as_name)  # via .A.J.tmp, renamed whole
                _drop(wfd, [as_name])
                return True
            # a folder: one item per regular file in it, in name order
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
                os.fchmod(fd, 0o700)  # flowd's own folder, left unsearchable by the script
            names = _list_output(fd, as_name)
            if os.path.lexists(tmp):
                fs.rmtree(tmp)  # left by an earlier collect of this attempt
            fs.mkdir(tmp, sync_parent=False)
            for k, n in enumerate(names):
                label = f"{as_name}/{n}"
                ffd = _open_output(fd, n, label, folder_ok=False)
                if ffd is None:
                    continue  # gone since the listing: not collected
                try:
                    fst = os.fstat(ffd)
                    self._check_output(fst, label)
                    self._copy_output(ffd, fst, os.path.join(tmp, f"{k:06d}"), label, sync_dir=False)
                finally:
                    os.close(ffd)
            fs.fsync_dir(tmp)
            fs.rename(tmp, dst, sync=False)
            _drop(fd, names)
            return True
        finally:
            os.close(fd)

    def _copy_output(self, fd: int, st: os.stat_result, path: str, label: str, *,
                     sync_dir: bool = False) -> None:
        """A new, daemon-owned item file at ``path`` with the bytes of ``fd``."""
        cap = self.max_output_bytes
        src = os.fdopen(os.dup(fd), "rb", buffering=0)
        with src:
            reader = src if cap is None else _Capped(src, cap, label)
            self.fs.write_file(path, reader, mode=ITEM_MODE, checksum=True, sync_dir=sync_dir)

    def _check_output(self, st: os.stat_result, label: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise TaskOutputError(f"output {label} is {file_kind(st.st_mode)}; only regular files become items")
        if st.st_nlink != 1:
            raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
        if self.max_output_bytes is not None and st.st_size > self.max_output_bytes:
            raise TaskOutputError(
                f"output {label} is {st.st_size} bytes; the limit is {self.max_output_bytes}")

    # -- 4. commit and 5. apply -----------------------------------------------
    def commit(self, rec: TaskRecord, outputs: list[tuple[str, str]]) -> list[tuple[str, int]]:
        """Record the task's outputs durably, then apply. Returns (channel, seq)."""
        entries = []
        for channel, rel in outputs:
            entries.append([rel, channel, self._alloc()])
        data = {"outputs": entries, "inputs": rec.inputs}
        self.fs.write_file(self.task_path(rec, "COMMIT"), json.dumps(data).encode())
        rec.committed = True
        self.apply(rec)
        return [(channel, seq) for _, channel, seq in entries]

    def commit_mux(self, rec: TaskRecord, targets: list[str]) -> list[tuple[str, int]]:
        """Each input, oldest first, into every target: numbered in that order,
        so each target gets the items in the order they came."""
        return self.commit(rec, [(t, f"in/{seq_name(seq)}") for _, seq in rec.inputs
                                 for t in targets])

    def _note_done(self, rec: TaskRecord) -> None:
        """One line in done.log (a redo may write it twice: read as a set)."""
        try:
            fd = os.open(self.path(DONE_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{rec.name}\t{rec.task_id}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # a count, never data: the commit stands

    def scan_done(self) -> dict[str, int]:
        """Process tasks applied so far, per process (see done.log)."""
        try:
            with open(self.path(DONE_LOG), "rb") as f:
                lines = set(f.read().decode("utf-8", "replace").splitlines())
        except FileNotFoundError:
            return {}
        counts: dict[str, int] = {}
        for line in lines:
            name, sep, _ = line.partition("\t")
            if sep:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _read_commit(self, rec: TaskRecord) -> dict:
        with open(self.task_path(rec, "COMMIT"), "rb") as f:
            return json.load(f)

    def apply(self, rec: TaskRecord) -> None:
        """Idempotent redo of a committed task; then retire it."""
        commit = self._read_commit(rec)
        fs = self.fs
        if rec.kind == "process":
            self._note_done(rec)
        touched = set()
        for rel, channel, seq in commit["outputs"]:
            src = self.task_path(rec, rel)
            dst = self.item_path(channel, seq)
            if os.path.lexists(dst):
                continue
            if rel.startswith("in/"):
                fs.link(src, dst)  # a mux: every target shares the one file
            else:
                fs.rename(src, dst, sync=False)
            touched.add(os.path.dirname(dst))
        for d in sorted(touched):
            fs.fsync_dir(d)
        for rel, channel, seq in commit["outputs"]:
            if not os.path.lexists(self.item_path(channel, seq)):
                raise StorageError(f"task {rec.dirname}: output {rel} did not reach channel {channel}")
        indir = self.task_path(rec, "in")
        for _, seq in rec.inputs:
            fs.unlink(os.path.join(indir, seq_name(seq)))
        # No fsync of in/: if the unlinks are lost, COMMIT is still there and
        # recovery redoes them, or retire's durable rename hid the folder.
        self.retire(rec)

    def retire(self, rec: TaskRecord) -> None:
        if rec.kind == "process" and not rec.inputs:
            self.mark_fired(rec.name)
        self._remove_task(rec)

    def _remove_task(self, rec: TaskRecord) -> None:
        """Take the task folder out of the protocol, then delete it, durably.

        The rename to a hidden name is fsynced before the delete starts, so a
        crash half-way through leaves a hidden folder (which recovery deletes),
        never a live task short of files. The fsync after the delete makes the
        removal durable too: recovery does not run on a finished run, so a
        folder that came back after a power loss would stay forever.
        """
        hidden = self.path("tasks", f".{rec.dirname}.done")
        self.fs.rename(self.task_path(rec), hidden)
        self.fs.rmtree(hidden)
        self.fs.fsync_dir(self.path("tasks"))

    def mark_fired(self, process: str) -> None:
        path = self.path("fired", process)
        if not os.path.exists(path):
            self.fs.write_file(path, b"")

    # -- release and dead letters ---------------------------------------------
    def release(self, rec: TaskRecord) -> None:
        """Put a task's inputs back in their channels (same SEQ: same place).

        CLAIMED goes first, so a crash half-way leaves an unmarked claim,
        which recovery finishes releasing: never a claimed task short of inputs.
        Its removal needs no fsync: CLAIMED is never durable before COMMIT (no
        fsync of the task folder comes between them), so after a power failure
        an uncommitted task is always unmarked, and released again.
        """
        if rec.claimed:
            self.fs.unlink(self.task_path(rec, "CLAIMED"))
            rec.claimed = False
        indir = self.task_path(rec, "in")
        touched = set()
        for ch, seq in rec.inputs:
            src = os.path.join(indir, seq_name(seq))
            if os.path.lexists(src):
                self.fs.rename(src, self.item_path(ch, seq), sync=False)
                touched.add(self.path("channels", ch))
        for d in sorted(touched):
            self.fs.fsync_dir(d)
        # No fsync of in/: an input found in both places after a power failure
        # is one file (rename gave it its old name back); CLAIMED is gone for
        # good, so recovery releases again, and the rename is then a no-op.
        self._remove_task(rec)

    def dead_letter(self, rec: TaskRecord, reason: str, attempts: int) -> dict:
        """Keep a failed task's inputs and reason under failed/ (nothing is lost)."""
        info = {
            "task": rec.dirname,
            "task_id": rec.task_id,
            "process": rec.name,
            "kind": rec.kind,
            "inputs": rec.inputs,
            "reason": reason,
            "attempts": attempts,
            "failed_at": time.time(),
            "logs": [os.path.basename(self.log_path(rec, a)) for a in range(1, attempts + 1)],
        }
        self.fs.write_file(self.task_path(rec, "failure.json"), json.dumps(info).encode())
        self.fs.rename(self.task_path(rec), self.path("failed", rec.dirname))
        if rec.kind == "process" and not rec.inputs:
            self.mark_fired(rec.name)
        info["dirname"] = rec.dirname
        return info


def _same_file(st: os.stat_result, path: str) -> bool:
    try:
        return os.path.samestat(st, os.lstat(path))
    except FileNotFoundError:
        return False


def _chmod_nofollow(path: str, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


ITEM_MODE = 0o640  # every item: owned by flowd, no setuid, readable by its group at most
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_output(dfd: int, name: str, label: str, *, folder_ok: bool = True) -> int | None:
    """Open an output once, through its folder's descriptor; None if it is not there.

    lstat first, so nothing but a regular file or a folder is ever opened (a
    device's open can act); then open without following a link and without
    blocking, and fstat what was opened: it must be the very inode checked,
    and it is what gets copied.
    """
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder the script left unsearchable (not flowd's to change)
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror}); "
                              "leave outputs readable") from None
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        # before the open: a link to a file elsewhere must never be opened, even if
        # its name here goes away right after (the count would then read 1 again)
        raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
    if stat.S_ISDIR(st.st_mode) and not folder_ok:
        raise TaskOutputError(f"output {label} is a folder; only regular files become items")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise TaskOutputError(f"output {label} is {file_kind(st.st_mode)}; only regular files become items")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except PermissionError:
        if st.st_uid != os.geteuid():
            raise TaskOutputError(f"output {label} cannot be read by flowd (owner uid {st.st_uid}, "
                                  f"mode {stat.S_IMODE(st.st_mode):o}); leave outputs readable") from None
        fd = _reopen_own(dfd, name, st, label)
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be opened: {e.strerror}") from None
    try:
        got = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not os.path.samestat(st, got):
        os.close(fd)
        raise TaskOutputError(f"output {label} changed while flowd collected it")
    if stat.S_ISREG(got.st_mode):
        os.set_blocking(fd, True)
    return fd


def _reopen_own(dfd: int, name: str, st: os.stat_result, label: str) -> int:
    """The script made its own output unreadable; the file is flowd's (same uid),
    so flowd gives itself read permission on that very inode (through an
    O_PATH descriptor, never a second lookup of the name) and opens it."""
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror})") from None
    try:
        got = os.fstat(pfd)
        if not os.path.samestat(st, got):
            raise TaskOutputError(f"output {label} changed while flowd collected it")
        if stat.S_ISREG(got.st_mode) and got.st_nlink != 1:
            raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
        folder = stat.S_ISDIR(st.st_mode)
        proc = f"/proc/self/fd/{pfd}"
        os.chmod(proc, 0o700 if folder else 0o600)
        return os.open(proc, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror})") from None
    finally:
        os.close(pfd)


def _drop(dfd: int, names: list[str]) -> None:
    """Unlink what was copied from work/ once its copy is complete in out/, so an
    output does not take its room twice until the task folder goes (only after
    out/A.J is whole: a collect done again after a crash finds it there)."""
    for n in names:
        try:
            os.unlink(n, dir_fd=dfd)
        except OSError:
            pass  # scratch: it goes with the task folder anyway


def _list_output(fd: int, label: str) -> list[str]:
    """The names in an output folder (by its descriptor), sorted; bounded."""
    names = []
    with os.scandir(fd) as it:
        for entry in it:
            names.append(entry.name)
            if len(names) > MAX_OUTPUT_FILES:
                raise TaskOutputError(
                    f"output {label}/ holds more than {MAX_OUTPUT_FILES} entries; that is the limit")
    names.sort()
    return names


class _Capped:
    """A reader that fails once more than ``cap`` bytes came (a file that grew)."""

    def __init__(self, f, cap: int, label: str):
        self.f, self.left, self.label, self.cap = f, cap, label, cap

    def read(self, n: int) -> bytes:
        chunk = self.f.read(min(n, self.left + 1))
        self.left -= len(chunk)
        if self.left < 0:
            raise TaskOutputError(f"output {self.label} is over {self.cap} bytes; that is the limit")
        return chunk
