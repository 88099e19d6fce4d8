"""The trace: one record per task attempt, written when the attempt ends (stdlib only).

``SPOOL/runs/RUN/trace.jsonl`` holds one JSON object a line, appended like
done.log (``Durable.append``: no fsync, so no cost on the task's commit
path). It is statistics, never state: a power loss may cut its last records,
and a line cut short (a crash in the middle of a write) is skipped when it is
read. ``flowctl trace`` and ``flowctl report`` read it (``read_page``).

Fields (docs/flowctl.md, "trace"): see ``FIELDS``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone

from .errors import StorageError
from .executor import base as X

log = logging.getLogger("flowd.run")

TRACE = "trace.jsonl"
FIELDS = ("task", "process", "attempt", "state", "exit_status", "reason",
          "queued", "started", "finished", "queued_at", "started_at", "finished_at",
          "wait_seconds", "run_seconds", "peak_memory", "cpu_seconds",
          "bytes_read", "bytes_written", "started_how", "node")
# state values
SUCCEEDED, FAILED, TIMEOUT, OOM, CANCELLED, DAMAGED, LOST = (
    "succeeded", "failed", "timeout", "oom", "cancelled", "damaged", "lost")
STATES = (SUCCEEDED, FAILED, TIMEOUT, OOM, CANCELLED, DAMAGED, LOST)
# started_how values: a new container, a kept one (process@container="warm"),
# or not run at all, its outputs from the cache (process@cache, to come)
FRESH, WARM, CACHED = "fresh", "warm", "cached"
MAX_REASON = 2000  # characters of a reason kept (it may quote a container's words)


def iso(t: float | None) -> str | None:
    """``t`` (epoch seconds) in ISO 8601, UTC, to the millisecond."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def state_of(res: X.TaskResult) -> str:
    if res.retryable or res.status == X.MISSING:
        return LOST
    if res.status == X.EXITED:
        return SUCCEEDED if res.exit_code == 0 else FAILED
    return {X.TIMEOUT: TIMEOUT, X.OOM: OOM, X.KILLED: CANCELLED, X.DAMAGED: DAMAGED}.get(
        res.status, FAILED)


class TraceLog:
    """The trace of one ``flowd.run.Run``."""

    def __init__(self, run):
        self.run = run
        self.path = run.store.path(TRACE)
        self._checked = False  # whether a torn last line was closed (once per daemon life)

    def begin(self, act, res: X.TaskResult) -> dict | None:
        """The record of the attempt ``res`` ended, before the run acts on it
        (a retry then changes ``act``); None if it cannot be made (statistics:
        never in the way of the run)."""
        try:
            return self._record(act, res)
        except Exception:  # noqa: BLE001
            log.exception("run %s: no trace record for %r", self.run.id, res)
            return None

    def _record(self, act, res: X.TaskResult) -> dict:
        rec, spec = act.rec, act.spec
        queued = act.started_at if act.started_at is not None else self._claimed_at(rec)
        started, finished = res.started_at, res.finished_at
        if finished is None:
            finished = time.time()
        if started is not None and finished < started:
            finished = started
        if queued is not None and started is not None and started < queued:
            queued = started  # an adopted task: the claim time was not found
        reason = res.message or ("" if res.ok else res.status)
        return {
            "task": rec.task_id, "process": rec.name, "attempt": rec.attempt,
            "state": state_of(res), "exit_status": res.exit_code,
            "reason": reason[:MAX_REASON],
            "queued": iso(queued), "started": iso(started), "finished": iso(finished),
            "queued_at": _round(queued), "started_at": _round(started), "finished_at": _round(finished),
            "wait_seconds": _round(started - queued) if started is not None and queued is not None
            else None,
            "run_seconds": _round(finished - started) if started is not None else None,
            "peak_memory": res.peak_memory, "cpu_seconds": res.cpu_seconds,
            "bytes_read": res.bytes_in, "bytes_written": res.bytes_out,
            "started_how": WARM if spec is not None and spec.container == "warm" else FRESH,
            "node": res.node or None,
            "_history": len(act.history),
            **cache_note(act),
        }

    def cached(self, act, answer) -> None:
        """The record of an attempt the cache answered: no container ran."""
        now = time.time()
        res = X.TaskResult(self.run.id, act.rec.task_id, act.rec.attempt, X.EXITED, exit_code=0,
                           started_at=now, finished_at=now, bytes_out=answer.entry.get("size"))
        record = self.begin(act, res)
        if record is not None:
            record["started_how"] = CACHED
            record["cache"]["from"] = {"run": answer.entry.get("run"), "task": answer.entry.get("task")}
            self.end(record, act)

    def end(self, record: dict | None, act) -> None:
        """Append ``record`` once the run has acted on its attempt: a success
        whose outputs were refused is a failure, with that reason."""
        if record is None:
            return
        seen = record.pop("_history")
        if record["state"] == SUCCEEDED and len(act.history) > seen:
            record["state"] = FAILED
            why = act.history[seen].split(": ", 1)[-1]
            record["reason"] = why[:MAX_REASON]
            record["bytes_written"] = None
        self.append(record)

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        fs = self.run.fs
        try:
            if not self._checked:
                self._checked = True
                if _torn(self.path):
                    line = b"\n" + line  # a crash cut the last line: it stays apart, skipped
            fs.append(self.path, line)
        except StorageError as e:
            log.warning("run %s: trace record not written: %s", self.run.id, e)

    def _claimed_at(self, rec) -> float | None:
        """When the task was claimed (task.json): an adopted task's first attempt."""
        try:
            with open(self.run.store.task_path(rec, "task.json"), "rb") as f:
                t = json.loads(f.read(1 << 20)).get("claimed_at")
        except (OSError, ValueError, AttributeError):
            return None
        return t if isinstance(t, (int, float)) else None


def cache_note(act) -> dict:
    """A process@cache task's key, its parts and why it ran, for ``flowctl why``
    (read from the raw line: not one of ``FIELDS``)."""
    answer = getattr(act, "cache", None)
    if answer is None:
        return {}
    return {"cache": {"key": answer.key, "parts": answer.parts, "why": answer.why}}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _torn(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def read_chunk(root: str, offset: int, length: int) -> bytes:
    """Whole lines of the run folder ``root``'s trace from byte ``offset``, at
    most ``length`` bytes (more when one line is longer); b"" at the end. A last
    line with no newline (being written, or cut by a crash) is left out."""
    try:
        with open(os.path.join(root, TRACE), "rb") as f:
            f.seek(offset)
            data = f.read(length)
            while data and b"\n" not in data:  # a line longer than length: read on to its end
                more = f.read(length)
                if not more:
                    return b""
                data += more
    except FileNotFoundError:
        return b""
    cut = data.rfind(b"\n")
    return data[:cut + 1] if cut >= 0 else b""


def parse_lines(data: bytes, process: str | None = None) -> list[dict]:
    """The records in ``data`` (whole lines), skipping any that is not one
    (a line a crash cut short), optionally of one process only."""
    rows = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("task"), str):
            continue
        if process is not None and row.get("process") != process:
            continue
        rows.append({k: row.get(k) for k in FIELDS})
    return rows


def read_all(root: str, process: str | None = None) -> list[dict]:
    """Every record of the run folder ``root`` (tests, small runs)."""
    rows: list[dict] = []
    offset = 0
    while True:
        data = read_chunk(root, offset, 1 << 20)
        if not data:
            return rows
        offset += len(data)
        rows += parse_lines(data, process)
