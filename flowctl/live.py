"""``flowctl events`` and ``flowctl watch``: the daemon's live event stream
(flowd/events.py), read by long-polls over the control socket.

Loaded only by those commands (and ``submit --wait``): ``status`` never
imports it. Every string of an event (names, reasons, messages) is the
daemon's or a container's: printed through ``flowd.textsafe.for_terminal``.
"""
from __future__ import annotations

import json
import sys
import time

from flowd.errors import NotFound
from flowd.textsafe import for_terminal as _t

from . import fmt

POLL = 25.0  # seconds one request waits in the daemon for events
FINAL = ("succeeded", "failed", "cancelled")


class Stream:
    """One subscription: ``open`` (with RUN, the run's detail at that instant),
    then ``next`` batches. ``call(cmd, args, timeout)`` sends a request."""

    def __init__(self, client, call, run: str | None):
        self.client, self.call, self.run = client, call, run
        self.sub: str | None = None
        self.detail: dict | None = None

    def open(self) -> dict | None:
        result = self.call("events", {"run": self.run}, self.client.timeout)
        self.sub, self.detail = result["sub"], result.get("run")
        if self.detail is not None:
            self.run = self.detail["id"]  # a prefix becomes the run's id
        return self.detail

    def next(self) -> list[dict]:
        try:
            result = self.call("events", {"sub": self.sub, "wait": POLL}, self.client.timeout + POLL)
        except NotFound:  # expired (the reader stopped for over a minute), or a new daemon
            self.open()
            return [{"type": "lost", "count": None, "expired": True}]
        return [e for e in result.get("events") or [] if isinstance(e, dict)]

    def ends(self, ev: dict) -> bool:
        return self.run is not None and ev.get("type") == "run_finished" and ev.get("run") == self.run


def _clock(ev: dict) -> str:
    t = ev.get("time")
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "--:--:--"


def describe(ev: dict) -> str:
    """One event as a readable line (escaped)."""
    kind, g = ev.get("type"), ev.get
    task = f"task {g('process')}/{g('task')} attempt {g('attempt')}"
    took = f" in {fmt.duration(g('seconds'))}" if isinstance(g("seconds"), (int, float)) else ""
    text = {
        "run_submitted": f"submitted: workflow {g('workflow')!r} by {g('owner')}",
        "run_started": "started",
        "run_finished": f"finished: {g('state')}" + (f" ({g('message')})" if g("message") else ""),
        "task_started": f"{task} started",
        "task_succeeded": f"{task} " + ("taken from the cache" if g("cached") is True
                                         else f"succeeded{took}"),
        "task_retried": f"{task} failed{took}, retried: {g('reason')}",
        "task_failed": f"{task} failed{took}, given up: {g('reason')}",
        "item_pushed": f"item {g('item')} pushed to channel {g('channel')}",
    }.get(kind)
    if kind == "lost":
        count = g("count")
        return _t(f"{time.strftime('%H:%M:%S')} lost {count if count is not None else 'some'} "
                  "events: this reader fell behind")
    if text is None:
        text = json.dumps({k: v for k, v in ev.items() if k not in ("seq", "time", "run")})
    return _t(f"{_clock(ev)} {g('run')} {text}")


def events(client, call, run: str | None, as_json: bool) -> int:
    stream = Stream(client, call, run)
    stream.open()
    while True:
        for ev in stream.next():
            print(json.dumps(ev) if as_json else describe(ev), flush=True)
            if stream.ends(ev):
                return 0


# -- watch ------------------------------------------------------------------
class Progress:
    """A run's per-process counts: from a detail, then kept up by events."""

    def __init__(self, detail: dict):
        self.reset(detail)

    def reset(self, detail: dict) -> None:
        self.detail = detail
        self.state = detail["state"]
        self.since = time.monotonic() - (detail.get("elapsed") or 0)
        self.procs = {p["name"]: {k: _n(p.get(k)) for k in ("done", "running", "queued", "failed")}
                      for p in detail.get("processes") or [] if isinstance(p, dict)}

    def apply(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "run_started":
            self.state = "running"
        elif kind == "run_finished":
            self.state = str(ev.get("state"))
        row = self.procs.get(ev.get("process"))
        if row is None:
            return
        if kind == "task_started":
            row["running"] += 1
            if ev.get("attempt") == 1 and row["queued"]:
                row["queued"] -= 1
        elif kind in ("task_succeeded", "task_failed", "task_retried"):
            row["running"] = max(0, row["running"] - 1)
            if kind == "task_succeeded":
                row["done"] += 1
            elif kind == "task_failed":
                row["failed"] += 1

    def totals(self) -> dict:
        return {k: sum(r[k] for r in self.procs.values()) for k in ("done", "running", "queued", "failed")}

    def line(self, run: str) -> str:
        t = self.totals()
        return f"{run}: {self.state}, {t['done']} tasks done, {t['running']} running, {t['failed']} failed"

    def board(self, run: str, width: int = 24) -> list[str]:
        names = list(self.procs)
        wide = max([len(_t(n)) for n in names] + [5])
        out = [_t(f"{run} {self.detail.get('name', '')}: {self.state}, elapsed "
                  f"{fmt.duration(time.monotonic() - self.since)}")]
        for name in names + ["total"]:
            r = self.procs[name] if name != "total" else self.totals()
            whole = r["done"] + r["running"] + r["queued"] + r["failed"]
            full = (r["done"] + r["failed"]) * width // whole if whole else 0
            run_w = min(width - full, r["running"] * width // whole if whole else 0)
            bar = "#" * full + ">" * run_w + "." * (width - full - run_w)
            out.append(f"  {_t(name):<{wide}} [{bar}] {r['done']} done, {r['running']} running, "
                       f"{r['queued']} queued, {r['failed']} failed")
        return out


class Display:
    """On a terminal: the board redrawn in place (at most 5 times a second).
    Otherwise: the one-line progress, printed when it changes."""

    def __init__(self, run: str, quiet: bool, out=None):
        self.run, self.quiet = run, quiet
        self.out = out or sys.stderr
        self.tty = not quiet and self.out.isatty()
        self.drawn = 0  # lines of the board on screen
        self.last_line = None
        self.last_draw = 0.0

    def show(self, p: Progress, force: bool = False) -> None:
        if self.quiet:
            return
        if not self.tty:
            line = p.line(self.run)
            if line != self.last_line:
                print(_t(line), file=self.out, flush=True)
                self.last_line = line
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        lines = p.board(self.run)
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{ln}\n" for ln in lines) + "\x1b[J")
        self.out.flush()
        self.drawn = len(lines)

    def forget(self) -> None:
        """Messages were printed under the board: draw the next one below them."""
        self.drawn = 0


def watch(client, call, run: str, quiet: bool) -> dict:
    """Follow ``run`` to its end on the event stream; its final detail.
    ``call`` rides a daemon restart (flowctl.cli._call_riding): a new
    subscription then brings a new picture."""
    stream = Stream(client, call, run)
    progress = Progress(stream.open())
    display = Display(stream.run, quiet)
    display.show(progress, force=True)
    while progress.state not in FINAL:
        batch = stream.next()
        lost = [e for e in batch if e.get("type") == "lost"]
        if lost:  # events missed, or a new daemon: a new picture
            display.forget()
            if not lost[0].get("expired"):
                stream.open()
            progress.reset(stream.detail)
            batch = []
        for ev in batch:
            progress.apply(ev)
            if stream.ends(ev):
                break
        display.show(progress, force=progress.state in FINAL)
    try:  # `flowctl rm --force` deletes a run as soon as it has ended
        detail = call("status", {"run": stream.run}, client.timeout)["run"]
    except NotFound:
        detail = None
    if detail is None:
        raise NotFound(f"run {run} is gone (removed while it was followed)")
    return detail


def _n(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
