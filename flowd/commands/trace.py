"""Command on a run's trace: its records, a page of whole lines at a time (flowd/trace.py)."""
from __future__ import annotations

from .. import protocol as P
from .. import trace
from .runs import find_run


def read(d, args, payload, **kw):
    """Whole lines of the run's trace.jsonl from byte ``offset``, at most about
    one CHUNK: ``size`` 0 is the end. flowctl formats them (trace, report)."""
    run = find_run(d, args["run"])
    data = trace.read_chunk(run.root, args["offset"], P.CHUNK // 2)
    if len(data) > P.CHUNK:  # one line longer than a frame: not one flowd wrote
        data = b""
    return {"run": run.id, "state": run.state, "size": len(data)}, data
