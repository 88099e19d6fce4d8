"""Deleting runs: ``flowctl rm`` and the config's ``keep_finished`` (stdlib only).

A run leaves the spool in one durable step: ``SPOOL/runs/RUN`` is renamed to
``SPOOL/runs/.rm-RUN`` and ``runs/`` is fsynced. The loader lists only run
ids, so from that rename on the run is gone for every later start; before it,
the run is whole. The hidden folder is then deleted off the loop (the
``Durable``'s reaper, ``SPOOL/trash/``); what a crash leaves of it is deleted
at the next start (``clear_leftovers``). A crash mid-delete therefore leaves
the run whole or gone, never half there and listed.

An active run is deleted only with ``--force``: it is cancelled with
``remove_requested`` in the same run.json write, and deleted once it has
ended and its containers are gone (``Removal.step``; at start for a run that
ended while flowd was down).
"""
from __future__ import annotations

import logging
import os
import time

from .errors import Conflict
from .fsops import Durable
from .textsafe import for_log

log = logging.getLogger("flowd")

REMOVED = ".rm-"  # a run folder being deleted: never listed, removed at start
CHECK_EVERY = 60.0  # seconds between keep_finished checks (shorter for a short keep_finished)


def clear_leftovers(fs: Durable, runs_dir: str) -> None:
    """At start: delete what an interrupted deletion left (``.rm-RUN``)."""
    for name in sorted(os.listdir(runs_dir)):
        if name.startswith(REMOVED):
            fs.rmtree(os.path.join(runs_dir, name))


def remove_run_dir(fs: Durable, runs_dir: str, run_id: str) -> None:
    """Take ``runs/RUN`` out of the spool durably (one rename, one fsync of
    runs/), then delete it (off the loop when ``fs`` has a reaper)."""
    hidden = os.path.join(runs_dir, REMOVED + run_id)
    if os.path.lexists(hidden):
        fs.rmtree(hidden)
    fs.rename(os.path.join(runs_dir, run_id), hidden)  # the commit point: fsyncs runs/
    fs.rmtree(hidden)


class Removal:
    """The daemon's side: runs waiting for a forced deletion, and retention."""

    def __init__(self, d):
        self.d = d
        self.pending: set[str] = set()  # forced: cancelled, deleted once they end
        self.next_check = 0.0

    # -- the loop ---------------------------------------------------------------
    def start(self) -> None:
        """At start, after the runs are open and resumed."""
        clear_leftovers(self.d.fs, self.d.runs_dir)
        for run in list(self.d.runs.values()):
            if run.meta.get("remove_requested"):
                self.pending.add(run.id)
        self.step(time.monotonic())

    def step(self, now: float) -> None:
        for rid in sorted(self.pending):
            run = self.d.runs.get(rid)
            if run is None:
                self.pending.discard(rid)
            elif run.finished and not run.active:
                self._remove(run, "deleted (flowctl rm --force) once its tasks stopped")
        keep = self.d.cfg.keep_finished
        if keep and now >= self.next_check:
            self.next_check = now + min(CHECK_EVERY, max(0.5, keep / 4))
            self.expire(keep, time.time())

    def expire(self, keep: float, wall: float) -> list[str]:
        """Delete the finished runs that ended more than ``keep`` seconds ago."""
        gone = []
        for run in list(self.d.runs.values()):
            ended = run.meta.get("finished_at")
            if not run.finished or not isinstance(ended, (int, float)) or run.active:
                continue
            if wall - ended > keep:
                self._remove(run, f"deleted: it ended {wall - ended:.0f}s ago, more than "
                                  f"keep_finished ({keep:g}s)")
                gone.append(run.id)
        return gone

    # -- flowctl rm -------------------------------------------------------------
    def rm(self, runs: list, force: bool, who: str) -> list[dict]:
        """Delete ``runs`` (already checked: they exist and the caller may)."""
        active = [r for r in runs if not r.finished or r.active]
        if active and not force:
            for r in active:
                log.info("run %s: delete by %s refused: it is %s", r.id, who, r.state)
            r = active[0]
            raise Conflict(f"run {r.id} is {r.state}; cancel it first (flowctl cancel {r.id}) "
                           "or use --force")
        out = []
        for run in runs:
            if run.finished and not run.active:
                self._remove(run, f"deleted by {who}")
                out.append({"id": run.id, "removed": True})
                continue
            if not run.finished:
                run.meta["remove_requested"] = True  # durable with the cancel's run.json write
                try:
                    run.cancel()
                except BaseException:
                    run.meta.pop("remove_requested", None)
                    raise
            log.info("run %s: cancelled by %s; deleted once its tasks stop", run.id, who)
            self.pending.add(run.id)
            if run.finished and not run.active:
                self._remove(run, f"deleted by {who}")
                out.append({"id": run.id, "removed": True})
            else:
                out.append({"id": run.id, "removed": False, "state": run.state})
        return out

    def _remove(self, run, why: str) -> None:
        d = self.d
        remove_run_dir(d.fs, d.runs_dir, run.id)
        d.runs.pop(run.id, None)
        self.pending.discard(run.id)
        for up in list(d.staging.open.values()):  # pushes begun for it go with it
            if up.meta.get("run") == run.id:
                d.staging.discard(up)
        log.info("run %s (%s): %s", run.id, for_log(run.wf.name), for_log(why))
