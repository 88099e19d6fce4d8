"""Commands of the live stream and the metrics: ``events`` (a long-poll per
batch, flowd/events.py) and ``metrics`` (flowd/metrics.py)."""
from __future__ import annotations

import time

from .. import protocol as P
from ..errors import Conflict, NotFound
from .runs import find_run


def events(d, args, payload, peer, req_id):
    hub, now = d.hub, time.monotonic()
    caller = args["_caller"]
    if not args["sub"]:  # open a subscription (with RUN: the run's detail, taken at once)
        run = find_run(d, args["run"]) if args["run"] else None
        sub = hub.open(caller.uid, run.id if run else None, now)
        if sub is None:
            raise Conflict(f"too many event readers (at most {hub_caps()}); stop one "
                           "(`flowctl events`, `flowctl watch`) or wait a minute for an idle one "
                           "to expire")
        if run is not None and run.finished:
            hub.subs[sub.id].put(finished_event(hub, run))
        return {"sub": sub.id, "run": run.view.detail() if run else None}
    sub = hub.subs.get(args["sub"])
    if sub is None or sub.uid != caller.uid:
        raise NotFound("this event subscription expired (no request for a minute) or never was; "
                       "open a new one")
    batch, old = hub.ask(sub, peer, req_id, args["wait"], now)
    if old is not None:  # the same reader asked again: its earlier request is answered empty
        d.control.send(old[0], P.encode_reply(old[1], {"events": []}))
    if batch is None:
        return None  # answered by answer_events when an event comes or the wait is over
    return {"events": batch}


def answer_events(d, now: float) -> None:
    """In the loop: answer the waiting readers that have events or whose time is up."""
    for (peer, req_id), batch in d.hub.due(now):
        d.control.send(peer, P.encode_reply(req_id, {"events": batch}))


def finished_event(hub, run) -> dict:
    hub.seq += 1
    return {"seq": hub.seq, "time": round(time.time(), 3), "type": "run_finished", "run": run.id,
            "workflow": run.wf.name, "state": run.state, "message": run.meta.get("message", "")}


def hub_caps() -> str:
    from ..events import MAX_SUBS, PER_USER

    return f"{PER_USER} per user, {MAX_SUBS} in all"


def metrics(d, args, payload, **kw):
    from ..metrics import render

    return {"text": render(d)}
