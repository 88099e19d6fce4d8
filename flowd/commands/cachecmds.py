"""Commands on the content cache (flowd/cache.py): why a task ran, and the cache's entries."""
from __future__ import annotations

import json

from .. import owners
from .. import trace as T
from ..errors import Conflict, NotFound, UsageError
from ..textsafe import for_log
from .runs import find_run

TRACE_PAGE = 1 << 20


def _last_record(run, task: str) -> dict | None:
    """The task's last trace record (its raw line: the cache note is in it)."""
    found = None
    offset = 0
    while True:
        data = T.read_chunk(run.root, offset, TRACE_PAGE)
        if not data:
            return found
        offset += len(data)
        for line in data.split(b"\n"):
            if b'"task":"' + task.encode() + b'"' not in line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("task") == task:
                found = row


def why(d, args, payload, **kw):
    """Why a task of a process with cache="yes" ran, or where its outputs came from."""
    run = find_run(d, args["run"])
    task = args["task"]
    rec = _last_record(run, task)
    if rec is None:
        if any(a.rec.task_id == task for a in run.active.values()):
            raise Conflict(f"task {task} of run {run.id} has not ended yet; ask again once it has")
        raise NotFound(f"run {run.id} has no task {for_log(repr(task))} that ran; "
                       f"`flowctl trace {run.id}` lists its tasks")
    process = str(rec.get("process"))
    proc = run.wf.processes.get(process)
    out = {"run": run.id, "task": task, "process": process, "cached": False, "from": None,
           "compared_with": None, "differences": [], "message": ""}
    note = rec.get("cache")
    if proc is None or not proc.cache or not isinstance(note, dict):
        out["message"] = (f"process {process} does not use the cache (set cache=\"yes\" on it); "
                          f"task {task} ran as every task does")
        return out
    if rec.get("started_how") == T.CACHED:
        src = note.get("from") or {}
        out.update(cached=True, **{"from": src})
        out["message"] = (f"task {task} did not run: its outputs came from the cache, from run "
                          f"{src.get('run')} task {src.get('task')} (key {str(note.get('key'))[:12]})")
        return out
    if not note.get("key"):
        out["message"] = f"task {task} ran without the cache: {note.get('why') or 'no key'}"
        return out
    if note.get("why"):
        out["differences"] = [str(note["why"])]
        out["message"] = f"task {task} ran: {note['why']}"
        return out
    before = rec.get("started_at") if isinstance(rec.get("started_at"), (int, float)) else None
    entry, diff = d.cache.nearest(run.process_id(process), note.get("parts") or {}, before,
                                  exclude=note.get("key"), image=proc.image)
    if entry is None:
        out["message"] = (f"task {task} ran: no earlier task of process {process} was in the "
                          "cache (the first run of it, or its entries were evicted or removed)")
        return out
    out["compared_with"] = {"run": entry.get("run"), "task": entry.get("task")}
    out["differences"] = diff or ["nothing: an identical entry was stored while this task ran"]
    out["message"] = (f"task {task} ran; compared with run {entry.get('run')} task "
                      f"{entry.get('task')}: " + "; ".join(out["differences"]))
    return out


def ls(d, args, payload, **kw):
    return {"processes": d.cache.listing(), **d.cache.stats()}


def rm(d, args, payload, **kw):
    """Entries out of the cache: every entry (``all``) or one process's. Root and
    the admin_group may remove any; others only those their own runs stored."""
    process, everything = args.get("process"), bool(args.get("all"))
    if not process and not everything:
        raise UsageError("name what to remove: --process P, or --all")
    if process and everything:
        raise UsageError("give --process P or --all, not both")
    caller = args["_caller"]
    uid = getattr(caller, "uid", None)
    admin = uid == 0 or (uid is not None and owners.in_group(uid, d.cfg.admin_group))
    gone = d.cache.remove_where(None if everything else process, owner=None if admin else uid)
    owners.log.info("cache: %d entries removed by %s%s", len(gone), for_log(caller.user),
                    "" if admin else " (their own runs' only)")
    return {"removed": len(gone), "size": sum(e.size for e in gone), "own_only": not admin}
