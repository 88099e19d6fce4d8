"""The live event stream (``flowctl events``, ``flowctl watch``) and the counters
behind ``flowctl metrics`` (stdlib only).

One ``Hub`` per daemon (``Daemon.hub``; each ``Run`` holds it as ``run.hub``).
The daemon's code calls ``hub.emit(type, run_id, **fields)`` at the places a
run or a task changes; an emit counts what the metrics count (a few dict
operations) and, with no subscriber, does nothing else.

Transport: the request/answer control socket, long-polled. A client opens a
subscription (``events`` without ``sub``), then asks ``events`` with its
``sub`` id again and again; each answer carries what happened since the last
one (at most ``BATCH`` events), at once if there is any, else when the next
event comes or after ``wait`` seconds (empty). Nothing is ever sent that was
not asked for, so a slow or stopped reader never blocks the loop: its
events wait in a queue of at most ``QUEUE`` events; beyond that they are
dropped and counted, and the reader gets one ``lost`` event with the count
where the gap is. A subscription nobody asks for in ``IDLE`` seconds
expires. At most ``PER_USER`` subscriptions per uid and ``MAX_SUBS`` in all;
every string in an event is cut to ``MAX_TEXT`` characters. So the whole
stream holds at most MAX_SUBS x QUEUE events, whoever asks.
"""
from __future__ import annotations

import secrets
import time
from collections import deque

QUEUE = 1000  # events one subscription holds for its reader
BATCH = 200  # events one answer carries
MAX_SUBS = 128  # subscriptions, all users together
PER_USER = 32  # subscriptions one uid may hold (a benchmark runs 20)
IDLE = 60.0  # seconds a subscription lives without a request
MAX_WAIT = 30.0  # seconds one request may wait for events
MAX_TEXT = 300  # characters of any string in an event (a reason, a name)
MAX_KEYS = 1000  # distinct process names the per-process counters keep (then "_other")
OTHER = "_other"

TYPES = ("run_submitted", "run_started", "run_finished", "task_started", "task_succeeded",
         "task_failed", "task_retried", "item_pushed", "lost")
DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
LOOP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    """Cumulative buckets, a sum and a count (the Prometheus histogram)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


class Counters:
    """What the metrics count from the events since the daemon started."""

    def __init__(self):
        self.tasks: dict[str, dict[str, int]] = {}  # process -> {"started": n, ...}
        self.durations: dict[str, Histogram] = {}  # process -> its tasks' run seconds
        self.loop = Histogram(LOOP_BUCKETS)  # seconds each turn of the loop took
        self.loop_max = 0.0
        self.loop_last = 0.0

    def _key(self, process: object) -> str:
        process = str(process)
        if process in self.tasks or len(self.tasks) < MAX_KEYS:
            return process
        return OTHER  # bounded: a user's thousands of process names share one row

    def count(self, kind: str, fields: dict) -> None:
        what = _COUNTED.get(kind)
        if what is None:
            return
        key = self._key(fields.get("process"))
        row = self.tasks.get(key)
        if row is None:
            row = self.tasks[key] = {"started": 0, "succeeded": 0, "failed": 0, "retried": 0}
        row[what] += 1
        seconds = fields.get("seconds")
        if seconds is not None and what in ("succeeded", "failed", "retried"):
            hist = self.durations.get(key)
            if hist is None:
                hist = self.durations[key] = Histogram(DURATION_BUCKETS)
            hist.observe(max(0.0, seconds))

    def loop_took(self, seconds: float) -> None:
        self.loop.observe(seconds)
        self.loop_last = seconds
        self.loop_max = max(self.loop_max, seconds)


_COUNTED = {"task_started": "started", "task_succeeded": "succeeded", "task_failed": "failed",
            "task_retried": "retried"}


class Sub:
    """One reader's subscription: its queue and, while it waits, its request."""

    __slots__ = ("id", "uid", "run", "queue", "lost", "waiting", "deadline", "last_asked", "ended")

    def __init__(self, sub_id: str, uid: int | None, run: str | None, now: float):
        self.id, self.uid, self.run = sub_id, uid, run
        self.queue: deque = deque()
        self.lost = 0  # events dropped since the last ``lost`` marker was queued
        self.waiting: tuple[bytes, str] | None = None  # (peer, request id) of a long-poll
        self.deadline = 0.0  # when that request is answered empty
        self.last_asked = now
        self.ended = False  # its run ended: gone once that was delivered

    def put(self, ev: dict) -> None:
        final = ev["type"] == "run_finished" and self.run is not None
        if len(self.queue) >= QUEUE - 1 and not final:
            self.lost += 1  # full (one place kept for the marker): dropped, counted
            return
        if self.lost:
            self.queue.append({"type": "lost", "count": self.lost})
            self.lost = 0
        self.queue.append(ev)
        if final:
            self.ended = True

    def take(self) -> list[dict]:
        out = []
        while self.queue and len(out) < BATCH:
            out.append(self.queue.popleft())
        if not self.queue and self.lost:
            out.append({"type": "lost", "count": self.lost})
            self.lost = 0
        return out


class Hub:
    """The daemon's event hub: counters, subscriptions, and their answers."""

    def __init__(self):
        self.metrics = Counters()
        self.subs: dict[str, Sub] = {}
        self.seq = 0
        self._ready: set[str] = set()  # subs with a waiting request and events to send

    def emit(self, kind: str, run: str, **fields) -> None:
        self.metrics.count(kind, fields)
        if not self.subs:
            return  # nobody reads: nothing more to do
        self.seq += 1
        ev = {"seq": self.seq, "time": round(time.time(), 3), "type": kind, "run": run}
        for k, v in fields.items():
            ev[k] = v[:MAX_TEXT] if isinstance(v, str) else v
        for sub in self.subs.values():
            if sub.run is None or sub.run == run:
                sub.put(ev)
                if sub.waiting is not None:
                    self._ready.add(sub.id)

    # -- subscriptions (flowd/commands/events.py) --------------------------
    def open(self, uid: int | None, run: str | None, now: float) -> Sub | None:
        """A new subscription, or None when the caps are reached (after expiring idle ones)."""
        self.expire(now)
        if len(self.subs) >= MAX_SUBS or sum(1 for s in self.subs.values() if s.uid == uid) >= PER_USER:
            return None
        sub = Sub(secrets.token_hex(8), uid, run, now)
        self.subs[sub.id] = sub
        return sub

    def close(self, sub: Sub) -> None:
        self.subs.pop(sub.id, None)
        self._ready.discard(sub.id)

    def ask(self, sub: Sub, peer: bytes, req_id: str, wait: float, now: float):
        """A request for ``sub``'s events: (the batch, or None when it waits),
        and the earlier request of the same sub still waiting, to answer empty."""
        sub.last_asked = now
        old, sub.waiting = sub.waiting, None
        batch = sub.take()
        if batch or wait <= 0:
            self._done(sub, batch)
            return batch, old
        sub.waiting = (peer, req_id)
        sub.deadline = now + min(wait, MAX_WAIT)
        return None, old

    def _done(self, sub: Sub, batch: list[dict]) -> None:
        if sub.ended and not sub.queue:
            self.close(sub)  # its run ended and the reader has it all

    def due(self, now: float) -> list[tuple[tuple[bytes, str], list[dict]]]:
        """The waiting requests to answer now: those with events, those whose time is up."""
        out = []
        ready, self._ready = self._ready, set()
        for sid in ready:
            sub = self.subs.get(sid)
            if sub is not None and sub.waiting is not None:
                out.append((sub.waiting, sub.take()))
                sub.waiting = None
                sub.last_asked = now
                self._done(sub, out[-1][1])
        for sub in list(self.subs.values()):
            if sub.waiting is not None and now >= sub.deadline:
                out.append((sub.waiting, []))
                sub.waiting = None
                sub.last_asked = now
        self.expire(now)
        return out

    def expire(self, now: float) -> None:
        for sub in [s for s in self.subs.values() if s.waiting is None and now - s.last_asked > IDLE]:
            self.close(sub)

    def next_deadline(self) -> float:
        waits = [s.deadline for s in self.subs.values() if s.waiting is not None]
        idle = [s.last_asked + IDLE for s in self.subs.values() if s.waiting is None]
        return min(waits + idle, default=float("inf"))


class _Quiet:
    """The hub of a run no daemon holds (a test's, a tool's): emits go nowhere."""

    def emit(self, kind: str, run: str, **fields) -> None:
        pass


QUIET = _Quiet()


def since(started_at: float | None) -> float | None:
    """Seconds since a task's start (``time.time()``), or None when it is not known
    (a task taken back after a restart)."""
    return None if started_at is None else round(max(0.0, time.time() - started_at), 3)
