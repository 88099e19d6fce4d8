"""A run's failed tasks and damaged items: dead letters and quarantine (stdlib only).

Whether a failed attempt is retried or its task dead-lettered, and whether
the run then stops, is the scheduler's decision (flowd/scheduler.py);
``Failures`` carries it out for a ``flowd.run.Run``, keeps what ``status``
shows of it (``letters``: the dead letters under failed/; ``quarantined``:
the damaged items under quarantine/) and reads both back at start.
"""
from __future__ import annotations

import logging

from . import scheduler as S
from .events import since
from .storescan import Scan
from .textsafe import for_log

log = logging.getLogger("flowd.run")


class Failures:
    """The failure side of one ``flowd.run.Run``."""

    def __init__(self, run):
        self.run = run
        self.letters: list[dict] = []  # failure.json of each dead letter, oldest first
        self.quarantined: list[dict] = []  # damaged items taken out (quarantine/)

    def load(self, scan: Scan) -> None:
        """At start: the dead letters and quarantined items as found on disk
        (item numbers are never reused: the store's next one goes past theirs)."""
        store = self.run.store
        self.letters = scan.failed()
        self.quarantined = scan.quarantined()
        for q in self.quarantined:
            if isinstance(q.get("seq"), int):
                store.next_seq = max(store.next_seq, q["seq"] + 1)

    def count(self) -> None:
        """At start, after the scheduler has loaded the channels: each dead
        letter counts as a failed task of its process (and fired a source)."""
        run, eng = self.run, self.run.sched
        for info in self.letters:
            if info.get("kind", S.PROCESS) == S.PROCESS:
                process = info.get("process")
                if process not in run.wf.processes:
                    continue  # an unreadable failure.json: kept on disk, not counted
                if not info.get("inputs"):
                    eng.fired.add(process)
                if not run.finished:
                    eng.count_failed(process)

    def failed(self, act, reason: str, action: S.Action | None = None) -> None:
        """An attempt of ``act`` (an ``flowd.run.Active``) failed: retry it, or
        keep its task as a dead letter (and stop the run if the rule says so)."""
        run, rec = self.run, act.rec
        act.history.append(f"attempt {rec.attempt}: {reason}")
        log.info("run %s: task %s attempt %d failed: %s", run.id, rec.dirname, rec.attempt,
                 for_log(reason))
        if action is None:
            action = run.sched.on_failure(rec.name, rec.attempt, run.first_attempt(rec))
        run.hub.emit("task_retried" if action.kind == S.RETRY else "task_failed", run.id, process=rec.name,
                     task=rec.task_id, attempt=rec.attempt, reason=reason, seconds=since(act.started_at))
        if action.kind == S.RETRY:
            run.start(act, action.attempt)  # in an empty work/ (Run.start)
            return
        run.executor.remove(act.spec)
        info = run.tasks.dead_letter(rec, reason, rec.attempt)
        info["history"] = act.history
        self.letters.append(info)
        del run.active[rec.dirname]
        if run.sched.failed(rec.name, rec.task_id):
            run.stop_all(f"task {rec.dirname} failed: {reason}")

    def quarantine(self, act, bad: list[tuple[str, int, str]]) -> None:
        """Take ``act``'s damaged inputs out (quarantine/), put the rest back."""
        run, rec = self.run, act.rec
        for ch, seq, why in bad:
            log.error("run %s: item %d of channel %s is damaged (%s); quarantined, not given "
                      "to %s", run.id, seq, ch, why, rec.name)
        run.tasks.quarantine(rec, bad)
        del run.active[rec.dirname]
        run.sched.released(rec.kind, rec.name, rec.task_id,
                           skip=frozenset(seq for _, seq, _ in bad))
        self.quarantined = Scan(run.store).quarantined()
