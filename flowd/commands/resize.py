"""``resize``: new memory and cpu limits for one process of a running run.

Checked here, on the loop, before anything changes: the run (not finished),
the process (one of its processes), the memory (at least the 6 MiB Docker
allows, at most the config's ``max_memory``), that something is asked. The
executor then does the live part off the loop (``Executor.resize``): it
refuses, changing nothing, when a running container of the process uses
more memory than asked; else running fresh containers get the new limits
(``docker update``), warm ones are retired and replaced. Only then are the
limits saved in the run's run.json (``Run.set_limits``): later tasks get
them, also after a restart. The answer comes from the loop once the
executor is done: its thread reports a callable, which the daemon's loop
runs (``Daemon._drain_events``) before it starts more tasks.
"""
from __future__ import annotations

import logging

from .. import owners
from .. import protocol as P
from .. import units
from ..errors import Conflict, FlowError, InternalError, NotFound, UsageError
from ..limits import MIN_MEMORY
from ..textsafe import for_log
from .runs import find_run

log = logging.getLogger("flowd")

MAX_CPUS = 1024.0  # --cpus: a bound at the edge (the engine refuses more than the machine has)


def resize(d, args, payload, peer, req_id):
    run = find_run(d, args["run"])
    owners.check(run, args["_caller"], d.cfg.admin_group, "resize")
    process, memory, cpus = args["process"], args["memory"], args["cpus"]
    if memory is None and cpus is None:
        raise UsageError("resize: nothing to change (fix: give --memory SIZE, --cpus N or both)")
    if process not in run.wf.processes:
        raise NotFound(f"run {run.id} has no process {for_log(repr(process))}; its processes are: "
                       + for_log(", ".join(run.wf.processes)) + " (fix: name one of them)")
    if run.finished:
        raise Conflict(f"run {run.id} is {run.state}: it runs no more tasks, so there is nothing "
                       "to resize (fix: resize a run that is running; `flowctl status` shows "
                       "each run's state)")
    if memory is not None:
        if memory < MIN_MEMORY:
            raise UsageError(f"resize: --memory {units.size(memory, trim=True)} is below 6 MiB, the "
                             "least Docker allows (fix: --memory 6m or more)")
        cap = d.cfg.max_memory
        if cap is not None and memory > cap:
            raise UsageError(f"resize: --memory {units.size(memory, trim=True)} is more than this "
                             f"flowd allows (max_memory in {d.cfg.source or 'its config'}: "
                             f"{units.spell_size(cap)}) (fix: ask for {units.spell_size(cap)} or "
                             "less, or ask the administrator to raise max_memory)")
    if process in run.resizing:
        raise Conflict(f"a resize of process {process!r} of run {run.id} is under way (fix: try "
                       "again once it has answered)")
    now_memory, now_cpus = run.limits_of(process)
    memory = memory if memory is not None else now_memory
    cpus = float(cpus) if cpus is not None else now_cpus
    fut = d.executor.resize(run.id, process, memory, cpus)
    run.resizing.add(process)
    fut.add_done_callback(lambda f: d.report(lambda: _finish(d, run, process, memory, cpus, f, peer, req_id)))
    return None  # answered by _finish, from the loop


def _finish(d, run, process: str, memory: int | None, cpus: float | None, fut,
            peer: bytes, req_id: str) -> None:
    """In the loop, once the executor is done: save the limits and answer."""
    run.resizing.discard(process)
    result = error = None
    try:
        out = fut.result()
        if out.get("refused"):
            error = Conflict(f"resize of process {process!r} of run {run.id} refused: "
                             f"{out['refused']}")
        else:
            kept = out.get("kept")
            if kept is None:  # a backend that changes nothing that runs
                kept = len(run.running_tasks(process))
            run.set_limits(process, memory, cpus, live=not kept)
            result = {"run": run.id, "process": process, "memory": memory, "cpus": cpus,
                      "updated": int(out.get("updated") or 0), "retired": int(out.get("retired") or 0),
                      "kept": int(kept), "note": str(out.get("note") or "")}
            log.info("run %s: process %s resized (memory %s, cpus %s): %d running container(s) "
                     "updated, %d warm retired, %d kept%s", run.id, for_log(process),
                     "none" if memory is None else units.spell_size(memory),
                     "none" if cpus is None else f"{cpus:g}", result["updated"], result["retired"],
                     result["kept"], f" ({for_log(result['note'])})" if result["note"] else "")
    except FlowError as e:  # the limits could not be saved (a full disk, say)
        error = FlowError(f"the new limits of process {process!r} could not be saved: {e}; "
                          "running containers may have them already, later tasks do not")
    except Exception:  # a bug: logged here, never sent as a traceback
        log.exception("resize of process %s of run %s failed", for_log(process), run.id)
        error = InternalError()
    d.control.send(peer, P.encode_reply(req_id, result, error=error))
