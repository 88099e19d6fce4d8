"""Commands that read a run's data: its items and its logs, a chunk at a time."""
from __future__ import annotations

from .. import logpage
from .. import protocol as P
from .runs import find_run


def items(d, args, payload, **kw):
    run = find_run(d, args["run"])
    return {"run": run.id, "channel": args["channel"], "items": run.view.items(args["channel"])}


def pull(d, args, payload, **kw):
    # many items to a request, small ones with their bytes (flowctl pull)
    run = find_run(d, args["run"])
    return run.view.pull(args["channel"], args["after"], args["upto"])


def read(d, args, payload, **kw):
    # 1 <= length <= CHUNK and offset >= 0 (checked at the edge): never a whole item
    run = find_run(d, args["run"])
    data = run.view.read(args["channel"], args["seq"], args["offset"], args["length"])
    return {"size": len(data)}, data


def logs(d, args, payload, **kw):
    run = find_run(d, args["run"])
    if args["follow"]:  # someone watches: the running tasks' logs are to grow as they run
        for task_id in run.running_tasks(args["process"], args["task"]):
            d.executor.follow(run.id, task_id)
    if args["task"]:  # one task's logs, looked up by name: all of them at once
        return {"run": run.id, "state": run.state, "logs": run.view.logs(args["process"], args["task"]),
                "next": 0, "more": False}
    return {"run": run.id, "state": run.state, **logpage.page(run.view, args["process"], args["offset"])}


def read_log(d, args, payload, **kw):
    run = find_run(d, args["run"])
    data = run.view.read_log(args["name"], args["offset"], P.CHUNK)
    return {"size": len(data)}, data
