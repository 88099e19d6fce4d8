"""Commands on runs: ping, status (and its waiters), submit, cancel, graph."""
from __future__ import annotations

import os
import time

from .. import __version__
from .. import owners
from .. import protocol as P
from ..errors import Ambiguous, Conflict, NotFound, UsageError
from ..textsafe import for_log


def ping(d, args, payload, **kw):
    return {"version": __version__, "pid": os.getpid(), "spool": d.spool,
            "engine_up": d.engine_up, "engine_message": d.engine_message,
            "runs": len(d.runs)}


def status(d, args, payload, peer, req_id):
    ref = args.get("run")
    if not ref:
        runs = sorted(d.runs.values(), key=lambda r: r.meta.get("submitted_at", 0))
        return {"runs": [r.view.summary() for r in runs], "engine_up": d.engine_up,
                "engine_message": d.engine_message, "disk_ok": d.disk.ok,
                "disk_free": d.disk._free(), "containers": d.executor.status()}
    run = find_run(d, ref)
    wait = args["wait"]  # finite, 0 to P.MAX_WAIT (checked at the edge)
    if wait and not run.finished:
        # a client over its share, or all over MAX_WAITERS: the oldest are answered now
        for w in d.waiters.add(time.monotonic() + wait, run.id, peer, req_id):
            answer_waiter(d, w)
        return None
    return {"run": run.view.detail(), "engine_up": d.engine_up, "disk_ok": d.disk.ok}


def answer_waiters(d, now: float) -> None:
    """Answer the waiters whose run ended (or went) and those whose time is up."""
    for w in d.waiters.due(now, lambda rid: rid not in d.runs or d.runs[rid].finished):
        answer_waiter(d, w)


def answer_waiter(d, w) -> None:
    run = d.runs.get(w.run_id)
    result = {"run": run.view.detail() if run else None, "engine_up": d.engine_up}
    d.control.send(w.peer, P.encode_reply(w.req_id, result))


def submit(d, args, payload, peer, req_id):
    up = d.staging.get(args["upload"], args["_caller"].uid, "upload")
    return d.creator.submit_bundle(d.staging.take(up), args["name"], args["_caller"].user,
                                   reply=(peer, req_id), uid=args["_caller"].uid, stamped=True)


def cancel(d, args, payload, **kw):
    runs = [find_run(d, r) for r in args["runs"]]  # all names checked before anything changes
    # and who may: one refused run refuses them all, before any is cancelled
    owners.check_all(runs, args["_caller"], d.cfg.admin_group, "cancel")
    out = []
    for run in runs:
        try:
            run.cancel()
            out.append({"id": run.id, "state": run.state, "ok": True})
        except Conflict as e:
            out.append({"id": run.id, "state": run.state, "ok": False, "message": str(e)})
    return {"runs": out}


def graph(d, args, payload, **kw):
    run = find_run(d, args["run"])
    return {"run": run.id, "state": run.state, "workflow": run.wf.to_dict(),
            "depths": {ch: run.sched.depth(ch) for ch in run.wf.channels}}


def find_run(d, ref: object):
    """The run ``ref`` names: its id or a unique prefix of it."""
    if not isinstance(ref, str) or not ref:
        raise UsageError("name a run by its id or a unique prefix of it")
    if ref in d.runs:
        return d.runs[ref]
    matches = [r for r in d.runs if r.startswith(ref)]
    if not matches:
        raise NotFound(f"no run matches {for_log(repr(ref))}; `flowctl status` lists the runs")
    if len(matches) > 1:
        raise Ambiguous(f"{ref!r} matches {len(matches)} runs ({', '.join(sorted(matches)[:5])}); "
                        "give more characters")
    return d.runs[matches[0]]
