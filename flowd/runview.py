"""What flowctl reads of a run: its summary and detail, items, logs (stdlib only).

Read queries only: nothing here changes the run or the spool. Each run has
one (``Run.view``), reading the run's store, workflow and scheduler counts.
"""
from __future__ import annotations

import itertools
import os
import time

from .errors import NotFound, StorageError
from . import owners
from . import protocol as P
from . import scheduler as S
from .executor import base as X
from .store import log_name, parse_log_name, seq_name

LOG_TAIL_BYTES = 2048
MAX_RUNNING_SHOWN = 200  # running tasks listed in a run's detail (the rest are counted)
PULL_ITEMS = 1000  # items one pull request answers at most
ITEMS_SHOWN = 10_000  # items an ``items`` request lists at most (the oldest)
PULL_INLINE = 256 * 1024  # items of at most this many bytes come in the pull's data frame


class RunView:
    """The read side of one ``flowd.run.Run``."""

    def __init__(self, run):
        self.run = run

    def summary(self) -> dict:
        m = self.run.meta
        end = m.get("finished_at") or time.time()
        start = m.get("started_at")
        return {
            "id": self.run.id,
            "name": self.run.wf.name,
            "mode": self.run.wf.mode,
            "state": m["state"],
            "owner": owners.owner_name(m),
            "submitted_at": m.get("submitted_at"),
            "started_at": start,
            "finished_at": m.get("finished_at"),
            "elapsed": (end - start) if start else 0.0,
            "tasks_done": sum(c.done for c in self.run.sched.counts.values()),
            "tasks_running": sum(c.running for c in self.run.sched.counts.values()),
            "tasks_failed": sum(c.failed for c in self.run.sched.counts.values()),
            "message": m.get("message", ""),
        }

    def detail(self) -> dict:
        out = self.summary()
        eng = self.run.sched
        procs = []
        for p in self.run.wf.processes.values():
            c = eng.counts[p.name]
            if p.inputs:
                queued = min(eng.depth(port.channel) for port in p.inputs)
            else:
                queued = 0 if p.name in eng.fired else 1
            procs.append({"name": p.name, "image": p.image, "done": c.done, "running": c.running,
                          "queued": 0 if self.run.finished else queued, "failed": c.failed})
        results = set(self.run.wf.result_channels())
        chans = [{"name": ch, "depth": eng.depth(ch), "result": ch in results}
                 for ch in self.run.wf.channels]
        fails = []
        for info in self.run.failures.letters[-10:]:
            fails.append({
                "task": str(info.get("task_id", "")),  # as in FLOWD_TASK, logs --task
                "folder": info.get("dirname", info.get("task")),  # SPOOL/runs/RUN/failed/...
                "process": info.get("process"),
                "reason": info.get("reason"),
                "attempts": info.get("attempts"),
                "history": info.get("history", []),
                "log_tail": self._log_tail(info),
            })
        running = [a for a in self.run.active.values()
                   if a.rec.kind == S.PROCESS and a.spec is not None and not a.parked]
        nodes = self.run.executor.nodes() if running else {}
        tasks = [{"task": a.rec.task_id, "process": a.rec.name, "attempt": a.rec.attempt,
                  "started_at": a.started_at, "node": nodes.get((self.run.id, a.rec.task_id), "")}
                 for a in sorted(running, key=lambda a: a.started_at or 0)[:MAX_RUNNING_SHOWN]]
        out.update(processes=procs, channels=chans, failures=fails, running=tasks,
                   running_more=max(len(running) - MAX_RUNNING_SHOWN, 0),
                   quarantined=[{k: q.get(k) for k in ("channel", "seq", "reason", "process")}
                                for q in self.run.failures.quarantined])
        return out

    def _log_tail(self, info: dict) -> str:
        logs = info.get("logs") or []
        if not logs:
            return ""
        path = self.run.store.path("logs", logs[-1])
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def items(self, channel: str) -> list[dict]:
        if channel not in self.run.wf.channels:
            raise NotFound(f"run {self.run.id} has no channel {channel!r}; it has: "
                           + ", ".join(self.run.wf.channels))
        out = []
        # The oldest ITEMS_SHOWN: a channel may hold 10,000,000 items (a split
        # output); all of them are read a page at a time with ``pull``.
        for seq in list(itertools.islice(self.run.sched.queues[channel], ITEMS_SHOWN)):
            try:
                size = os.stat(self.run.store.item_path(channel, seq)).st_size
            except FileNotFoundError:
                continue
            out.append({"seq": seq, "name": seq_name(seq), "size": size})
        return out

    def pull(self, channel: str, after: int, upto: int) -> tuple[dict, bytes]:
        """The channel's items past ``after`` and at most ``upto`` (0: the newest
        now, which the answer gives back for the next calls), oldest first: up to
        ``PULL_ITEMS`` of them, the small ones' bytes in the data frame (at most
        ``CHUNK`` in all), the others only named (read with ``read``). ``done``:
        no item is left to give."""
        if channel not in self.run.wf.channels:
            raise NotFound(f"run {self.run.id} has no channel {channel!r}; it has: "
                           + ", ".join(self.run.wf.channels))
        q = self.run.sched.queues[channel]
        if not upto:
            upto = q[-1] if q else 0
        items, chunks, total, done = [], [], 0, True
        for seq in q.after(after):
            if seq > upto:
                break
            if len(items) >= PULL_ITEMS:
                done = False
                break
            try:
                with self.run.store.open_item(channel, seq) as f:
                    size = os.fstat(f.fileno()).st_size
                    inline = size <= PULL_INLINE and total + size <= P.CHUNK
                    if inline:
                        data = f.read(size + 1)
                        inline = len(data) == size  # items never change; but be sure
                        if inline:
                            chunks.append(data)
                            total += size
            except NotFound:
                continue  # taken by a task meanwhile
            items.append({"seq": seq, "name": seq_name(seq), "size": size, "inline": inline})
            if total >= P.CHUNK:
                done = False
                break
        return {"run": self.run.id, "channel": channel, "upto": upto, "items": items,
                "done": done}, b"".join(chunks)

    def logs(self, process: str | None = None, task: str | None = None) -> list[dict]:
        """The run's task logs, oldest first: [{name, process, task, attempt,
        size, running}]. A running attempt's log is its live file (see
        ``executor.base.live_log_path``), under the name its final log will have."""
        self.check_process(process)
        found: dict[str, dict] = {}
        folder = self.run.store.path("logs")
        # One task's logs are looked up by name: a run of 100,000 tasks has as
        # many logs, and `logs --task` (or a follow of one task) must not list them all.
        names = self._task_log_names(process, str(task)) if task else os.listdir(folder)
        for entry in sorted(names, key=lambda n: n.startswith(".")):  # finals first
            running = entry.startswith(".") and entry.endswith(".live")
            name = entry[1:-len(".live")] if running else entry
            parsed = parse_log_name(name)
            if parsed is None or name in found:
                continue
            proc, task_id, attempt = parsed
            if (process and proc != process) or (task and task_id != str(task)):
                continue
            try:
                st = os.stat(os.path.join(folder, entry))
            except FileNotFoundError:  # a live log that just ended
                continue
            found[name] = {"name": name, "process": proc, "task": task_id, "attempt": attempt,
                           "size": st.st_size, "mtime": st.st_mtime, "running": running}
        # Ended attempts in the order they ended, then the running ones by task.
        return sorted(found.values(), key=lambda d: (
            d["running"], 0 if d["running"] else d["mtime"],
            int(d["task"]) if d["task"].isdigit() else 0, d["attempt"]))

    def check_process(self, process: str | None) -> None:
        """NotFound unless ``process`` is None or a process of the run."""
        if process and process not in self.run.wf.processes:
            raise NotFound(f"run {self.run.id} has no process {process!r}; it has: "
                           + ", ".join(self.run.wf.processes))

    def _task_log_names(self, process: str | None, task: str) -> list[str]:
        """The names (final and live) of task ``task``'s logs that exist: attempt
        1, 2, ... up to its process's last possible attempt (retries + 1), and
        on while there are more."""
        folder = self.run.store.path("logs")
        out = []
        for proc in self.run.wf.processes.values():
            if process and proc.name != process:
                continue
            attempt = 1
            while True:
                final = log_name(proc.name, task, attempt)
                have = [n for n in (final, f".{final}.live") if os.path.lexists(os.path.join(folder, n))]
                if not have and attempt > proc.retries + 1:
                    break
                out.extend(have)
                attempt += 1
        return out

    def read_log(self, name: str, offset: int, length: int) -> bytes:
        if parse_log_name(name) is None:
            raise NotFound(f"no log named {name!r}")
        final = self.run.store.path("logs", name)
        for path in (final, X.live_log_path(final), final):  # the final one may land meanwhile
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(length)
            except FileNotFoundError:
                continue
        raise NotFound(f"run {self.run.id} has no log {name!r}")

    def read(self, channel: str, seq: int, offset: int, length: int) -> bytes:
        if channel not in self.run.wf.channels:
            raise NotFound(f"run {self.run.id} has no channel {channel!r}")
        try:
            with self.run.store.open_item(channel, seq) as f:
                f.seek(offset)
                return f.read(length)
        except StorageError:
            raise
        except OSError as e:
            raise NotFound(f"item {seq} of channel {channel}: {e.strerror}") from None
