"""``flowctl retry``: failed tasks' kept inputs go back to their channels (stdlib only).

A dead letter (``failed/TASK/``, flowd/runfailures.py) keeps its task's
inputs in ``in/SEQ``. A retry puts them back as ``channels/CH/SEQ``: their
numbers are lower than anything queued since, so they are at the head of
their channels, in their old order, and the run goes on. A source process
(no inputs) loses its ``fired/`` mark and runs again. Nothing that succeeded
runs again: its inputs are gone and its outputs are in their channels.

Crash safety, in the task protocol's style (docs/reliability.md):

1. Commit: one run.json write (``RunStore.write_meta``) names the letters
   being retried (``retrying``) and sets the state to ``running``. Before it
   the run is as it was; from it on the retry will be finished.
2. Each letter's inputs are renamed back into their channels (a name already
   there is left), and the channels fsynced; the sources' fired marks unlinked.
3. The letters are renamed to hidden names (``failed/.TASK.retried``),
   ``failed/`` fsynced, and deleted.
4. ``retrying`` is removed from run.json (durably: a later dead letter of the
   same task must never be taken for this retry's).

``finish`` does steps 2 to 4 and is idempotent: ``Run.open`` calls it when
run.json still names letters (``recover``), before the run's folder is read.
"""
from __future__ import annotations

import json
import logging
import os

from . import scheduler as S
from .errors import Conflict, NotFound
from .store import seq_name
from .textsafe import for_log

log = logging.getLogger("flowd.run")

RETRYING = "retrying"  # run.json: the dead letters (failed/ names) a retry puts back
ATTEMPTS_BEFORE = "attempts_before"  # run.json: task folder -> its last attempt before a retry


def retry(run, process: str | None = None) -> dict:
    """Retry ``run``'s dead letters (of ``process`` only, if given); the in-memory
    run goes on from them. Conflict when there is nothing to retry."""
    if process is not None and process not in run.wf.processes:
        raise NotFound(f"run {run.id} has no process {for_log(repr(process))}; it has: "
                       + ", ".join(run.wf.processes))
    if run.state == S.CANCELLED or run.meta.get("cancel_requested"):
        raise Conflict(f"run {run.id} was cancelled; a cancelled run is not retried "
                       "(fix: submit the workflow again)")
    letters = [info for info in run.failures.letters if _retryable(run, info, process)]
    if not letters:
        of = f" of process {process}" if process else ""
        raise Conflict(f"run {run.id} has no failed task{of} to retry "
                       "(`flowctl status RUN` lists its failed tasks)")
    left = [info for info in run.failures.letters if info not in letters
            and info.get("process") in run.wf.processes
            and run.wf.processes[info["process"]].on_failure == "stop"]
    if left:
        p = left[0]["process"]
        raise Conflict(f"run {run.id} stopped because a task of process {p} failed, and "
                       f"{p} has on-failure=\"stop\": retrying only {process} would stop it "
                       f"again (fix: flowctl retry {run.id} without --process, or with "
                       f"--process {p})")
    names = [info["dirname"] for info in letters]
    # Their attempts go on from the last one (Run.first_attempt): the earlier logs stay.
    before = run.meta.get(ATTEMPTS_BEFORE)
    before = dict(before) if isinstance(before, dict) else {}
    for info in letters:
        if isinstance(info.get("attempts"), int):
            before[info["dirname"]] = info["attempts"]
    meta = dict(run.meta, **{RETRYING: names, "state": S.RUNNING, ATTEMPTS_BEFORE: before})
    meta.pop("finished_at", None)
    meta.pop("message", None)
    meta["retried"] = int(meta.get("retried") or 0) + 1
    run.store.write_meta(meta)  # 1. the commit point
    run.meta = meta
    finish(run)  # 2.-4.
    # The run in memory, as if it had been opened now.
    eng = run.sched
    for info in letters:
        run.failures.letters.remove(info)
        inputs = [(ch, int(seq)) for ch, seq in info.get("inputs", [])]
        for ch, seq in inputs:
            eng.add_item(ch, seq)
        if not inputs:
            eng.fired.discard(info["process"])
    for name, c in eng.counts.items():
        c.failed = sum(1 for i in run.failures.letters if i.get("process") == name
                       and i.get("kind", S.PROCESS) == S.PROCESS)
    eng.failed_stop = False
    eng.stopping = eng.cancelled
    log.info("run %s: %d failed task(s) retried%s", run.id, len(names),
             f" (process {for_log(process)})" if process else "")
    return {"run": run.id, "state": run.state, "retried": len(names),
            "tasks": [info.get("task_id") or info["dirname"] for info in letters]}


def _retryable(run, info: dict, process: str | None) -> bool:
    return (info.get("kind", S.PROCESS) == S.PROCESS and info.get("process") in run.wf.processes
            and "dirname" in info and (process is None or info["process"] == process))


def recover(run) -> None:
    """At open: finish a retry that a crash cut short (run.json names its letters)."""
    if run.meta.get(RETRYING):
        finish(run)


def finish(run) -> None:
    """Steps 2 to 4 for the letters run.json names; idempotent."""
    store, fs = run.store, run.fs
    names = [n for n in run.meta.get(RETRYING) or [] if isinstance(n, str) and n
             and not n.startswith(".") and "/" not in n]
    failed = store.path("failed")
    letters = []
    channels: set[str] = set()
    sources: list[str] = []
    for name in names:
        folder = os.path.join(failed, name)
        try:
            with open(os.path.join(folder, "failure.json"), "rb") as f:
                info = json.load(f)
        except FileNotFoundError:
            continue  # done before a crash (step 3)
        letters.append(folder)
        inputs = [(ch, int(seq)) for ch, seq in info.get("inputs", [])]
        if not inputs and info.get("process") in run.wf.processes:
            sources.append(info["process"])
        for ch, seq in inputs:
            if ch not in run.wf.channels:
                continue
            src = os.path.join(folder, "in", seq_name(seq))
            dst = store.item_path(ch, seq)
            if os.path.lexists(src) and not os.path.lexists(dst):
                fs.rename(src, dst, sync=False)
            channels.add(store.path("channels", ch))
    # Every channel named, moved now or before a crash: what a killed life left
    # in the page cache becomes durable before the letters go.
    fs.sync_many(dirs=sorted(channels))
    for p in sources:
        fs.unlink(store.path("fired", p))
    if sources:  # also when a killed life unlinked them: durable before the letters go
        fs.fsync_dir(store.path("fired"))
    hidden = []
    for folder in letters:
        h = os.path.join(failed, f".{os.path.basename(folder)}.retried")
        fs.rename(folder, h, sync=False)
        hidden.append(h)
    if names:  # also when a killed life renamed them: durable before run.json forgets them
        fs.fsync_dir(failed)
    for h in hidden:
        fs.rmtree(h)
    meta = dict(run.meta)
    meta.pop(RETRYING, None)
    store.write_meta(meta)  # 4.
    run.meta = meta
