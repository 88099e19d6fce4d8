"""A page of a run's task logs, read from its trace, never from a listing (stdlib only).

A run of 100,000 tasks has 100,000 logs: ``flowctl logs`` must not list that
folder on every call (and ``--follow`` calls every second). The run's trace
(``flowd/trace.py``, ``trace.jsonl``) already names every ended attempt, in
the order attempts ended, with its process, task and attempt, from which
its log's name follows (``RunStore.log_path``). So ``logs`` pages through
the trace: each page reads up to ``PAGE_ENTRIES`` records (whole lines) and
names their attempts' logs (each one looked up by name: an attempt the cache
answered ran no container and has no log), with ``next`` (the trace offset to
ask for next) and ``more`` (whether the trace has more after it). The page that reaches the trace's end
adds the running attempts' live logs (``executor.base.live_log_path``).

A run made by a flowd older than the trace has no trace.jsonl: its logs
folder is listed instead, once per call (``RunView.logs``).
"""
from __future__ import annotations

import os

from . import scheduler as S
from . import trace
from .executor import base as X
from . import store
from .store import parse_log_name

PAGE_ENTRIES = 1000  # trace records one page reads, so log entries it names, at most
PAGE_BYTES = 512 * 1024  # trace bytes one page reads at most (whole lines)
PROBE_BYTES = 4096  # read past a page's end to learn whether a whole line follows


def log_name(process, task, attempt) -> str | None:
    """The log name of ``process``'s task ``task``, attempt ``attempt``
    (``p.PROCESS.TASK.ATTEMPT.log``), or None if these (read from the trace:
    data) cannot make a log name of this run's folder."""
    if not (isinstance(process, str) and isinstance(task, str) and type(attempt) is int
            and attempt >= 1):
        return None
    proc = process.replace("#", "")
    name = store.log_name(process, task, attempt)
    if "/" in name or "\0" in name or parse_log_name(name) != (proc, task, attempt):
        return None
    return name


def page(view, process: str | None, offset: int) -> dict:
    """The logs of the attempts the trace records from byte ``offset``:
    {logs: [{name, process, task, attempt, size, mtime, running}], next, more}."""
    run = view.run
    view.check_process(process)
    if not os.path.exists(os.path.join(run.root, trace.TRACE)):
        # Made by a flowd older than the trace (or no attempt has ended yet):
        # the folder is listed, once per call.
        return {"logs": view.logs(process), "next": 0, "more": False}
    folder = run.store.path("logs")
    data = trace.read_chunk(run.root, offset, PAGE_BYTES)
    lines = data.split(b"\n")[:-1][:PAGE_ENTRIES]  # whole lines, a record each: as many entries at most
    page_bytes = sum(len(line) + 1 for line in lines)
    pos = offset + page_bytes
    entries: list[dict] = []
    names: set[str] = set()
    for rec in trace.parse_lines(data[:page_bytes], process):  # a torn line gives none
        name = log_name(rec["process"], rec["task"], rec["attempt"])
        if name is None or name in names:
            continue
        entry = _entry(folder, name, name, running=False)
        if entry is not None:  # none: no container ran (cached), or its log was not kept
            names.add(name)
            entries.append(entry)
    more = page_bytes < len(data) or bool(trace.read_chunk(run.root, pos, PROBE_BYTES))
    if not more:
        entries += _running(run, folder, process, names)
    return {"logs": entries, "next": pos, "more": more}


def _running(run, folder: str, process: str | None, names: set[str]) -> list[dict]:
    """The running attempts' logs, by task: each one's live log, or its final
    one if it has just ended (its trace record is still to come)."""
    acts = [a for a in run.active.values()
            if a.rec.kind == S.PROCESS and not a.parked and a.spec is not None
            and process in (None, a.rec.name)]
    acts.sort(key=lambda a: (int(a.rec.task_id) if a.rec.task_id.isdigit() else 0,
                             a.rec.task_id, a.rec.attempt))
    out = []
    for a in acts:
        name = log_name(a.rec.name, a.rec.task_id, a.rec.attempt)
        if name is None or name in names:
            continue
        final = os.path.join(folder, name)
        entry = (_entry(folder, name, os.path.basename(X.live_log_path(final)), running=True)
                 or _entry(folder, name, name, running=False))
        if entry is not None:
            names.add(name)
            out.append(entry)
    return out


def _entry(folder: str, name: str, file: str, *, running: bool) -> dict | None:
    try:
        st = os.stat(os.path.join(folder, file))
    except (FileNotFoundError, NotADirectoryError):
        return None
    proc, task, attempt = parse_log_name(name)
    return {"name": name, "process": proc, "task": task, "attempt": attempt,
            "size": st.st_size, "mtime": st.st_mtime, "running": running}
