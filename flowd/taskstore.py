"""The task protocol on disk: how one claimed task of a run moves through its steps.

One task's life (docs/reliability.md), each step durable before the next:

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

A task that does not commit leaves by ``release`` (its inputs go back),
``quarantine`` (damaged inputs are taken out, the rest go back) or
``dead_letter`` (kept whole under failed/). A mux move is a task without a
container: its COMMIT links the input into every target channel, so fan-out
costs no copy. The run's folder, its paths and items are ``flowd.store``'s.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from .collect import Span, split_name
from .collect import collect as collect_outputs
from .channelvalues import MAX_SPLIT_ITEMS
from .errors import StorageError
from .fsops import Durable
from .store import RunStore, seq_name


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
    commit: dict | None = None  # what COMMIT holds, once written or read (not read again)
    moved: tuple[int, int] = (0, 0)  # how far its apply got: (COMMIT entry, item in it); memory only


def entry_range(entry: list) -> tuple[str, int, int]:
    """A COMMIT entry's items: (channel, first SEQ, count)."""
    return (entry[1], entry[2], entry[3] if len(entry) == 4 else 1)


def task_dirname(kind: str, name: str, task_id: str) -> str:
    prefix = "p" if kind == "process" else "m"
    return f"{prefix}.{name.replace('#', '')}.{task_id}"


class TaskStore:
    """The claimed tasks of one run's ``RunStore``. All writes go through ``Durable``."""

    def __init__(self, store: RunStore, *, max_output_bytes: int | None = None,
                 max_split_items: int = MAX_SPLIT_ITEMS, work_mode: int = 0o700):
        self.store = store
        self.max_output_bytes = max_output_bytes
        self.max_split_items = max_split_items
        # work/ (the container's /task): 0700 when containers run as flowd's own
        # uid; 02770 when they run as another (the container gets flowd's group,
        # and setgid keeps new files in it). Reached only through the run's 0700
        # folders either way.
        self.work_mode = work_mode

    @property
    def fs(self) -> Durable:
        return self.store.fs  # one Durable per run, the store's (a test may swap it)

    # -- 6. recovery -----------------------------------------------------------
    def recover_tasks(self, slice_items: int | None = None) -> list[TaskRecord]:
        """Step 6 for the store's part. Returns the tasks still claimed.

        Hidden folders are removed, unmarked claims are released, committed
        tasks are applied and retired. What is returned has CLAIMED and no
        COMMIT (the caller asks the executor about its container), or COMMIT
        and more than ``slice_items`` output items: the caller applies those in
        slices (``move_slice``). What an earlier life moved of them is durable
        already (the daemon flushes the spool before recovery: Daemon.prepare),
        so the scan that follows shows no item a power loss could put back in
        the split folder it left.
        """
        folder = self.store.path("tasks")
        live: list[TaskRecord] = []
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name.startswith("."):
                self.fs.rmtree(full)
                continue
            rec = self._load_task(name)
            for _, seq in rec.inputs:
                self.store.next_seq = max(self.store.next_seq, seq + 1)
            if rec.committed:
                for entry in self._read_commit(rec)["outputs"]:
                    _, first, count = entry_range(entry)
                    self.store.next_seq = max(self.store.next_seq, first + count)
                live.append(rec)
            elif not rec.claimed:
                self.release(rec)
            else:
                live.append(rec)
        big = [r for r in live if r.committed and slice_items is not None
               and self.output_count(r) > slice_items]
        for rec in [r for r in live if r.committed and r not in big]:
            self.apply(rec)  # its retire fsyncs tasks/
        return [r for r in live if not r.committed or r in big]

    def remove_hidden(self) -> list:
        """The hidden folders in tasks/ (out of the protocol) removed; returns []
        (a finished run's recovery: nothing else there is live)."""
        folder = self.store.path("tasks")
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                self.fs.rmtree(os.path.join(folder, name))
        return []

    def _load_task(self, dirname: str) -> TaskRecord:
        with open(self.store.path("tasks", dirname, "task.json"), "rb") as f:
            d = json.load(f)
        rec = TaskRecord(
            dirname=dirname,
            kind=d["kind"],
            name=d["name"],
            task_id=d["task_id"],
            inputs=[(c, int(s)) for c, s in d["inputs"]],
        )
        rec.claimed = os.path.exists(self.store.task_path(rec, "CLAIMED"))
        rec.committed = os.path.exists(self.store.task_path(rec, "COMMIT"))
        try:
            with open(self.store.task_path(rec, "attempt"), "rb") as f:
                rec.attempt = int(f.read().strip() or 0)
        except FileNotFoundError:
            rec.attempt = 0
        return rec


    # -- 1. claim --------------------------------------------------------------
    def claim(self, kind: str, name: str, task_id: str, inputs: list[tuple[str, int]]) -> TaskRecord:
        return self.claim_many([(kind, name, task_id, inputs)])[0]

    def claim_many(self, claims: list[tuple[str, str, str, list[tuple[str, int]]]]) -> list[TaskRecord]:
        """Step 1 for the tasks a tick claims together: each goes through the
        same steps in the same order as alone, and each step's fsyncs are one
        round for all of them (``Durable.sync_many``: group commit)."""
        recs = [TaskRecord(task_dirname(kind, name, task_id), kind, name, task_id, list(inputs))
                for kind, name, task_id, inputs in claims]
        tasks = self.store.path("tasks")
        fs = self.fs
        hidden = [os.path.join(tasks, f".{rec.dirname}.new") for rec in recs]
        for rec, h in zip(recs, hidden):
            fs.rmtree(h)
            fs.mkdir(h, sync_parent=False)
            fs.mkdir(os.path.join(h, "in"), sync_parent=False)
            if rec.kind == "process":
                fs.mkdir(os.path.join(h, "work"), mode=self.work_mode, sync_parent=False)
                fs.mkdir(os.path.join(h, "out"), sync_parent=False)
            meta = {"kind": rec.kind, "name": rec.name, "task_id": rec.task_id, "inputs": rec.inputs,
                    "claimed_at": time.time()}
            # renamed into place unsynced; its data and its folder are the round below
            fs.write_file(os.path.join(h, "task.json"), json.dumps(meta).encode(), sync=False)
        # Each folder whole on disk before it takes its live name.
        fs.sync_many(files=[os.path.join(h, "task.json") for h in hidden], dirs=hidden)
        for rec, h in zip(recs, hidden):
            fs.rename(h, self.store.task_path(rec), sync=False)
        fs.fsync_dir(tasks)
        touched: list[str] = []
        for rec in recs:
            into = self.store.task_path(rec, "in")
            for ch, seq in rec.inputs:
                fs.rename(self.store.item_path(ch, seq), os.path.join(into, seq_name(seq)), sync=False)
                touched.append(self.store.path("channels", ch))
            touched.insert(0, into)
        fs.sync_many(dirs=touched)
        for rec in recs:
            # No fsync: a mark lost in a power failure makes recovery release the
            # claim, which is safe (the machine's containers died with it). It
            # becomes durable with COMMIT, the next fsync of the task folder; keep
            # it so (release relies on it: see there).
            fs.write_file(self.store.task_path(rec, "CLAIMED"), b"", sync=False)
            rec.claimed = True
        return recs

    # -- 2. attempts -----------------------------------------------------------
    def set_attempt(self, rec: TaskRecord, attempt: int) -> None:
        """Written before each start. It survives a crash of the daemon (the page
        cache does; the container may run on); no fsync, because after a power
        failure no container of the task is running: a lost number only means
        the task starts again from an earlier attempt."""
        self.fs.write_file(self.store.task_path(rec, "attempt"), str(attempt).encode(), sync=False)
        rec.attempt = attempt

    def empty_work(self, rec: TaskRecord) -> None:
        """``work/`` empty for the attempt about to start: what is there is moved
        away first (``reset_work``). A new claim's empty work/ costs one listdir."""
        try:
            if not os.listdir(self.store.task_path(rec, "work")):
                return
        except FileNotFoundError:
            pass
        self.reset_work(rec)

    def empty_out(self, rec: TaskRecord) -> None:
        """``out/`` empty for an attempt about to start: nothing there is committed
        (a task with COMMIT never starts again), and what an earlier attempt or
        a cache hit a crash cut short left there must never be taken for this
        attempt's outputs. Usually empty: one listdir. No fsync, as for work/."""
        out = self.store.task_path(rec, "out")
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            return
        for n in names:
            path = os.path.join(out, n)
            if os.path.isdir(path) and not os.path.islink(path):
                self.fs.rmtree(path)
            else:
                self.fs.unlink(path)

    def reset_work(self, rec: TaskRecord) -> None:
        """Give the task an empty ``work/`` for its next attempt.

        Idempotent: a crash half-way leaves ``.work.old`` and maybe no
        ``work/``, and the restarted daemon, given the same failed result by
        the container, does it again.
        """
        work = self.store.task_path(rec, "work")
        old = self.store.task_path(rec, ".work.old")
        if os.path.lexists(work):
            if os.path.lexists(old):
                self.fs.rmtree(old)
            self.fs.rename(work, old, sync=False)
        self.fs.rmtree(old)
        # No fsync: work/ only matters while CLAIMED does, and CLAIMED becomes
        # durable with COMMIT only; after a power failure the task is released.
        self.fs.mkdir(work, mode=self.work_mode, sync_parent=False)


    # -- 3. collect ------------------------------------------------------------
    def collect(self, rec: TaskRecord, outputs: list[tuple], stopping=None) -> list:
        """Copy the declared outputs from work/ into out/; (channel, rel) per item
        in order, a ``Span`` per split output.
        See ``flowd.collect.collect``: an item is a new file flowd makes, never
        the container's own."""
        return collect_outputs(self.fs, self.store.task_path(rec, "work"), self.store.task_path(rec, "out"),
                               rec.attempt, outputs, self.max_output_bytes, self.max_split_items,
                               stopping)

    # -- 4. commit and 5. apply -----------------------------------------------
    def commit(self, rec: TaskRecord, outputs: list) -> list[tuple[str, int, int]]:
        """Record the task's outputs durably (the caller then applies: ``apply_many``,
        for all the tasks committed together). ``outputs`` is (channel, rel) per
        item and a ``Span`` per split output (``flowd.collect.collected``).
        Returns (channel, first SEQ, count) per COMMIT entry.

        An entry is ``[rel, channel, seq]`` for one item, and ``[rel, channel,
        first, count]`` for a split's items ``rel/000000000`` ... (numbered
        ``first`` on, in order): 10 million lines are one entry, not a list."""
        entries: list[list] = []
        for out in outputs:
            if isinstance(out, Span):
                if out.count:
                    entries.append([out.rel, out.channel, self.store.alloc(out.count), out.count])
            else:
                channel, rel = out
                entries.append([rel, channel, self.store.alloc()])
        data = {"outputs": entries, "inputs": rec.inputs}
        self.fs.write_file(self.store.task_path(rec, "COMMIT"), json.dumps(data).encode())
        rec.committed = True
        rec.commit = data
        return [entry_range(e) for e in entries]

    def commit_mux(self, rec: TaskRecord, targets: list[str]) -> list[tuple[str, int, int]]:
        """Each input, oldest first, into every target: numbered in that order,
        so each target gets the items in the order they came."""
        return self.commit(rec, [(t, f"in/{seq_name(seq)}") for _, seq in rec.inputs
                                 for t in targets])

    def _read_commit(self, rec: TaskRecord) -> dict:
        if rec.commit is None:
            with open(self.store.task_path(rec, "COMMIT"), "rb") as f:
                rec.commit = json.load(f)
        return rec.commit

    def output_count(self, rec: TaskRecord) -> int:
        """How many items the committed task's outputs are."""
        return sum(entry_range(e)[2] for e in self._read_commit(rec)["outputs"])

    def apply(self, rec: TaskRecord) -> None:
        self.apply_many([rec])

    def apply_many(self, recs: list[TaskRecord]) -> None:
        """Idempotent redo of committed tasks; then retire them. Several at once
        share each step's fsyncs (the channels' folders once, tasks/ twice)."""
        touched: list[str] = []
        for rec in recs:
            self.begin_apply(rec)
            self._move(rec, None, touched, [])
        # Only the channels: the folders the items left need no fsync, as nothing
        # sees the items before the task is retired (a durable rename).
        self.fs.sync_many(dirs=touched)
        self.finish_apply(recs)

    def begin_apply(self, rec: TaskRecord) -> None:
        """The first step of applying ``rec``: its done count (a redo may note it twice)."""
        self._read_commit(rec)
        if rec.kind == "process":
            self.store.note_done(rec.name, rec.task_id)

    def move_slice(self, rec: TaskRecord, limit: int) -> tuple[list[tuple[str, int, int]], bool]:
        """Move the next ``limit`` items of a committed task into their channels,
        from where the last call stopped (``rec.moved``, in memory: after a
        restart it begins again, and what moved before is passed over), and make
        the moves durable on both sides before returning: the folders they left
        and the channels'. Returns the SEQ ranges this call moved (channel,
        first, count: not what was there already, which the start-up scan
        found) and whether all are. What it returns may be handed to the scheduler at
        once, before the task is retired (flowd/run.py, a big output applied in
        slices): an item a later task takes meanwhile is gone from both places,
        and the redo passes over a split item no longer where it was (never
        brought back: its old folder was fsynced when it left)."""
        touched: list[str] = []
        ranges, done = self._move(rec, limit, touched, touched)
        self.fs.sync_many(dirs=touched)
        return ranges, done

    def _move(self, rec: TaskRecord, limit: int | None, touched: list[str],
              left: list[str]) -> tuple[list[tuple[str, int, int]], bool]:
        """Move up to ``limit`` (None: all) of ``rec``'s output items on from
        ``rec.moved``; the channels they reached go into ``touched``, the split
        folders they left into ``left``."""
        fs = self.fs
        entries = self._read_commit(rec)["outputs"]
        i, k = rec.moved
        ranges: list[tuple[str, int, int]] = []
        budget = limit
        while i < len(entries) and (budget is None or budget > 0):
            entry = entries[i]
            if len(entry) == 3:
                rel, channel, seq = entry
                dst = self.store.item_path(channel, seq)
                if not os.path.lexists(dst):
                    if rel.startswith("in/"):
                        fs.link(self.store.task_path(rec, rel), dst)  # a mux: every target shares the one file
                    else:
                        fs.rename(self.store.task_path(rec, rel), dst, sync=False)
                    touched.append(os.path.dirname(dst))
                    ranges.append((channel, seq, 1))
                i, k = i + 1, 0
                budget = None if budget is None else budget - 1
                continue
            rel, channel, first, count = entry
            end = count if budget is None else min(count, k + budget)
            folder = self.store.task_path(rec, rel)
            chdir = self.store.path("channels", channel)
            since = None  # where the run of items this call moved began
            for n in range(k, end):
                dst = os.path.join(chdir, seq_name(first + n))
                if not os.path.lexists(dst) and \
                        fs.rename(os.path.join(folder, split_name(n)), dst, sync=False, missing_ok=True):
                    since = n if since is None else since
                elif since is not None:
                    ranges.append((channel, first + since, n - since))
                    since = None
            if since is not None:
                ranges.append((channel, first + since, end - since))
            if end > k:
                touched.append(chdir)
                left.append(folder)
                budget = None if budget is None else budget - (end - k)
            i, k = (i + 1, 0) if end == count else (i, end)
        rec.moved = (i, k)
        return ranges, i == len(entries)

    def finish_apply(self, recs: list[TaskRecord]) -> None:
        """The last steps of applying tasks whose outputs all moved: their inputs
        deleted, then the tasks retired."""
        fs = self.fs
        for rec in recs:
            for entry in rec.commit["outputs"]:
                # A split's items are not checked one by one: a task may have taken
                # some already (apply in slices), and each rename raised if it failed.
                if len(entry) == 3 and not os.path.lexists(self.store.item_path(entry[1], entry[2])):
                    raise StorageError(f"task {rec.dirname}: output {entry[0]} did not reach "
                                       f"channel {entry[1]}")
            indir = self.store.task_path(rec, "in")
            for _, seq in rec.inputs:
                fs.unlink(os.path.join(indir, seq_name(seq)))
        # No fsync of in/: if the unlinks are lost, COMMIT is still there and
        # recovery redoes them, or retire's durable rename hid the folder.
        for rec in recs:
            if rec.kind == "process" and not rec.inputs:
                self.store.mark_fired(rec.name)
        self._remove_tasks(recs)

    def _remove_task(self, rec: TaskRecord) -> None:
        self._remove_tasks([rec])

    def _remove_tasks(self, recs: list[TaskRecord]) -> None:
        """Take task folders out of the protocol, then delete them, durably.

        The renames to hidden names are fsynced before any delete starts, so a
        crash half-way through leaves hidden folders (which recovery deletes),
        never a live task short of files. The deletes are not fsynced: a hidden
        folder a power loss brings back is deleted at the next start, by
        recovery, or by ``remove_hidden`` when the run has ended meanwhile (the
        mutation check found the fsync that stood here for that case covers
        nothing since).
        """
        if not recs:
            return
        hidden = [self.store.path("tasks", f".{rec.dirname}.done") for rec in recs]
        for rec, h in zip(recs, hidden):
            self.fs.rename(self.store.task_path(rec), h, sync=False)
        self.fs.fsync_dir(self.store.path("tasks"))
        for h in hidden:
            self.fs.rmtree(h)

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
            self.fs.unlink(self.store.task_path(rec, "CLAIMED"))
            rec.claimed = False
        indir = self.store.task_path(rec, "in")
        touched = set()
        for ch, seq in rec.inputs:
            src = os.path.join(indir, seq_name(seq))
            if os.path.lexists(src):
                self.fs.rename(src, self.store.item_path(ch, seq), sync=False)
                touched.add(self.store.path("channels", ch))
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
            "logs": [os.path.basename(self.store.log_path(rec, a)) for a in range(1, attempts + 1)],
        }
        self.fs.write_file(self.store.task_path(rec, "failure.json"), json.dumps(info).encode())
        self.fs.rename(self.store.task_path(rec), self.store.path("failed", rec.dirname))
        if rec.kind == "process" and not rec.inputs:
            self.store.mark_fired(rec.name)
        info["dirname"] = rec.dirname
        return info

    def quarantine(self, rec: TaskRecord, bad: list[tuple[str, int, str]]) -> None:
        """Move damaged inputs to quarantine/ with their reason; release the rest.

        Nothing is deleted: ``quarantine/SEQ`` keeps the bytes as found and
        ``quarantine/SEQ.json`` says where the item was and why it was taken out.
        """
        folder = self.store.path("quarantine")
        if not os.path.isdir(folder):
            self.fs.mkdir(folder)
        for ch, seq, why in bad:
            info = {"channel": ch, "seq": seq, "reason": why, "task": rec.dirname,
                    "process": rec.name, "quarantined_at": time.time()}
            self.fs.write_file(os.path.join(folder, seq_name(seq) + ".json"),
                               json.dumps(info).encode())
            self.fs.rename(self.store.input_path(rec, seq), os.path.join(folder, seq_name(seq)))
        self.release(rec)
