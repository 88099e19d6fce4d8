"""Run task attempts in Docker containers (the executor itself).

Its rooms: ``dockerapi`` (the connection to the engine, the one error
boundary, outages; with ``dockerspec``, the only modules importing
``docker``), ``dockerspec`` (the container's command and hardened settings,
and how its end reads), ``dockerlogs`` (the final and the live log) and
``lanes`` (the worker threads).

Works with the docker SDK 5.0.3 (Debian bookworm) and 7.x; it uses only the
low-level ``APIClient`` calls both have.

Threads. The caller's thread never talks to the engine: ``start``,
``adopt``, ``kill``, ``remove`` and ``sweep`` queue a job and return a
``concurrent.futures.Future`` that completes when that job is done (the daemon
may ignore it; tests wait on it). Jobs run on three lanes of *daemon* worker
threads, so a wait on a container that runs for hours never holds up
``close()`` or the interpreter's exit (``ThreadPoolExecutor`` joins its
workers at exit):

- ``starts`` (4 threads): remove a leftover, ensure/pull the image, create
  and start; then hand the container to the waits lane.
- ``waits`` (``max_workers`` threads): one blocking ``wait`` per running
  container (``adopt`` runs here too, since it may wait for the engine).
- ``ops`` (2 threads): kill, remove, sweep; never stuck behind a pull.

Results go to ``report`` as ``TaskResult``; engine outages as ``EngineState``.

Errors. Every SDK call goes through ``_call``, the one boundary where docker,
requests and urllib3 errors become ``flowd.errors``: ``EngineUnavailable``
(cannot reach the engine; this also reports ``EngineState(up=False)`` once and
starts a watcher that pings every ``ping_interval`` seconds until the engine
answers, then reports ``EngineState(up=True)``), ``ImageUnavailable``,
``NotFound`` (no such container) and ``EngineError`` (the engine refused).

Removal. A container is always removed with its anonymous volumes (an
image that declares a VOLUME would otherwise leak one per task).

Logs. Containers log with the ``json-file`` driver rotated at
``ENGINE_LOG_FACTOR * log_limit / 2`` bytes, two files, so a chatty task can
never fill the engine's disk. The engine's JSON costs about 70 bytes per
line on top of the output, so it keeps ``ENGINE_LOG_FACTOR`` times the room
flowd promises. The log written to ``spec.log_path`` is the *tail* of
stdout+stderr (interleaved as written): the last ``log_limit`` bytes of what
the engine kept (all of them unless the output is mostly lines of under ~25
bytes), streamed in chunks; it is fsynced and renamed into place. While a
fresh container runs and someone follows its task's log (``follow``, from
``flowctl logs --follow``), a thread copies its log into
``live_log_path(spec.log_path)`` (the first ``log_limit`` bytes, from the
start); the final log starts with the same bytes unless the output was over
``log_limit``. Nobody following: no log stream and no thread per task.

OOM. A task is ``OOM`` only on exit 137 with the engine's OOMKilled flag (it
is container-wide and sticky) or, since that flag is lost now and then on
cgroup v1, with the line the container's shell prints after the script when
its cgroup's ``oom_kill`` counter moved (see ``dockerspec._OOM_CHECK``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any

from .. import units
from ..errors import FlowError, NotFound
from .base import Report, Settings, TaskSpec, done_future
from .container import LABEL_POOL, LABEL_RUN, LABEL_SPOOL, LABEL_TASK, Task
from .dockerapi import EngineLink
from .dockerlogs import LogCopier
from .engine import EngineExecutor
from .fresh import FreshContainers
from .warm import WarmPool

log = logging.getLogger(__name__)

MiB = 1024 * 1024
STARTS_LANE = 4
OPS_LANE = 2



class DockerExecutor(EngineExecutor):

    def __init__(
        self,
        report: Report,
        *,
        spool: str = "",
        settings: Settings | None = None,
        pool_dir: str | None = None,
        max_workers: int = 64,
        cap_add: list[str] | None = None,
        security_opt: list[str] | None = None,
        log_limit: int = 10 * MiB,
        client: Any = None,
    ):
        """
        ``spool``: default spool label (a ``TaskSpec`` with its own wins).
        ``settings``: max_containers, cap_add and the warm pool's (base.Settings).
        ``pool_dir``: where warm containers' folders go (in the spool, on its
        file system); default ``spool``/pool when ``spool`` is a path.
        ``max_workers``: containers waited on at once (more are queued; their
        timeouts still count from their start).
        ``cap_add``: capabilities given back after ``cap_drop=["ALL"]`` (when
        no ``settings`` are given).
        ``security_opt``: extra options after ``no-new-privileges`` (e.g. a
        seccomp or AppArmor profile).
        ``log_limit``: bytes of log kept per task (the tail).
        ``client``: a ``docker.DockerClient`` (or ``APIClient``) to use;
        default: ``docker.from_env()``, made lazily on first use so that
        building an executor never blocks or fails when the engine is down.
        """
        super().__init__(report, settings or Settings(max_containers=max_workers, cap_add=list(cap_add or [])),
                         spool=spool, max_workers=max_workers, log_limit=log_limit, lanes="flowd-docker",
                         starts=STARTS_LANE, ops=OPS_LANE)
        if pool_dir is None and os.path.isabs(spool):
            pool_dir = os.path.join(spool, "pool")
        self.fresh = FreshContainers(self)  # the jobs of fresh tasks
        self.pool = WarmPool(self, pool_dir or "")  # warm tasks
        self.security_opt = ["no-new-privileges"] + list(security_opt or [])
        self.link = EngineLink(self, client)  # the engine: calls, errors, outages
        self.logs = LogCopier(self)
        # (run, process) -> (memory, cpus) a resize gave it: containers made from
        # then on get them, whatever the spec handed over before said
        self._limits: dict[tuple[str, str], tuple[int | None, float | None]] = {}

    @property
    def cap_add(self) -> list[str]:
        return self.settings.cap_add

    # -- the Executor interface ---------------------------------------------
    def start(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
            self._kills.discard(spec.key)
        self.pool.forget_kill(spec.key)
        if spec.container == "warm":
            return self._waits.submit(self.pool.run, t)
        return self._starts.submit(self.fresh._start_job, t)

    def adopt(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
        if spec.container == "warm":
            return self._ops.submit(self.pool.adopt, t)
        return self._waits.submit(self.fresh._adopt_job, t)

    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        key = (run_id, task_id)
        with self._lock:
            self._kills.add(key)
            t = self._tasks.get(key)
            cid = t.container_id if t is not None else None
            spool = self._spool(t.spec) if t is not None else self.spool
            warm = t is not None and t.spec.container == "warm"
        if warm:
            self.pool.kill(key)  # its thread sees it within warmtask.POLL and retires the container
            return done_future()
        return self._ops.submit(self.fresh._kill_job, key, cid, spool)

    def remove(self, spec: TaskSpec) -> concurrent.futures.Future:
        with self._lock:
            self._kills.discard(spec.key)
        if spec.container == "warm":
            return done_future()  # the container stays in the pool; its slot is empty already
        with self._lock:
            cid = self._ended.pop((spec.key, spec.attempt), None)
        return self._ops.submit(self.fresh._remove_job, spec, cid)

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        with self._lock:  # ended attempts nobody removes any more (their containers go below)
            self._ended = {k: v for k, v in self._ended.items() if k[0] in keep}
            # a resize's limits, for the runs no task of which runs now: their later
            # specs carry the limits themselves (run.json's "resized"), so none is lost
            runs = {run for run, _ in keep}
            self._limits = {k: v for k, v in self._limits.items() if k[0] in runs}
        return self._ops.submit(self._sweep_job, spool, set(keep))

    def follow(self, run_id: str, task_id: str) -> None:
        """A fresh task's live log is copied from the engine only while someone
        follows it; a warm task's is always written as it comes."""
        with self._lock:
            t = self._tasks.get((run_id, task_id))
        if t is not None and t.spec.container != "warm":
            self.fresh.follow(t)

    def resize(self, run_id: str, process: str, memory: int | None,
               cpus: float | None) -> concurrent.futures.Future:
        """Fresh containers of the process get the limits live (``docker update``),
        unless one uses more memory now than asked (refused: nothing changes);
        its warm containers are retired (idle ones now, busy ones after their
        task) and new ones made with the new limits (the pool's key has them)."""
        return self._ops.submit(self._resize_job, run_id, process, memory, cpus)

    def with_limits(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with the limits a resize of its process gave since it was made."""
        with self._lock:
            limits = self._limits.get((spec.run_id, spec.process))
        if limits is None or limits == (spec.memory, spec.cpus):
            return spec
        return dataclasses.replace(spec, memory=limits[0], cpus=limits[1])

    def reconfigure(self, settings: Settings) -> None:
        """New settings from the next task on; warm containers made with other
        capabilities or root settings are no longer used (their key differs)."""
        self.settings = settings
        self.pool.retire_all("the configuration changed")
        self.make_room()

    def status(self) -> dict:
        with self._lock:
            fresh = sum(1 for t in self._tasks.values() if t.spec.container != "warm")
        return {"fresh": fresh, "warm": self.pool.counts(), "max_containers": self.settings.max_containers}

    def make_room(self) -> None:
        """Retire idle warm containers so that every container fits in max_containers."""
        with self._lock:
            fresh = sum(1 for t in self._tasks.values() if t.spec.container != "warm")
        self.pool.make_room(fresh)

    def close(self) -> None:
        """Stop the threads; containers keep running (``adopt`` finds them)."""
        if not self.link.close():
            return
        self.pool.close()
        self._close_lanes()

    def _resize_job(self, run_id: str, process: str, memory: int | None, cpus: float | None) -> dict:
        """On the ops lane: check, then change. The check reads each running
        fresh container's memory use; the new limits are then recorded (so a
        container made meanwhile gets them) and every container found again is
        updated, so none made between the two looks is missed."""
        key = (run_id, process)
        try:
            if memory is not None:
                for c in self.fresh.of_process(run_id, process, self.spool):
                    try:
                        used = self.fresh.memory_used(c["id"])
                    except NotFound:
                        continue  # gone meanwhile
                    if used is not None and used > memory:
                        return {"refused": (
                            f"container {c['name']} (task {c['task']}) uses {units.size(used)} of "
                            f"memory now, more than the {units.size(memory, trim=True)} asked; nothing "
                            f"was changed (fix: ask for more than {units.size(used)}, or resize once "
                            "that task has ended)")}
            with self._lock:
                before = self._limits.get(key)
                self._limits[key] = (memory, cpus)
            updated = 0
            try:
                for c in self.fresh.of_process(run_id, process, self.spool):
                    try:
                        self.fresh.update_limits(c["id"], memory, cpus)
                    except NotFound:
                        continue
                    updated += 1
            except FlowError as e:
                with self._lock:
                    if before is None:
                        self._limits.pop(key, None)
                    else:
                        self._limits[key] = before
                done = f"; {updated} container(s) had been given them already" if updated else ""
                return {"refused": f"the engine did not take the new limits: {e}{done}"}
        except FlowError as e:
            return {"refused": f"could not reach the containers: {e}; nothing was changed (fix: try "
                               "again once the engine answers)"}
        idle, busy = self.pool.resize(run_id, process, memory, cpus)
        note = []
        if busy:
            note.append(f"{busy} busy warm container(s) are replaced after their current task")
        return {"updated": updated, "retired": idle + busy, "kept": 0, "note": "; ".join(note)}

    def _sweep_job(self, spool: str, keep: set[tuple[str, str]]) -> None:
        try:
            found = self.link.call(self.link.api.containers, all=True,
                               filters={"label": [f"{LABEL_SPOOL}={spool}"]})
        except FlowError as e:
            log.warning("sweep of spool %r failed: %s", spool, e)
            return
        keep = keep | self._tracked()
        pool = self.pool.names()
        for c in found:
            labels = c.get("Labels") or {}
            if labels.get(LABEL_POOL):  # a warm container: the pool's, or an earlier daemon's
                if not any(n.lstrip("/") in pool for n in c.get("Names") or []):
                    self.link.quiet_remove(c["Id"])
            elif (labels.get(LABEL_RUN), labels.get(LABEL_TASK)) not in keep:
                self.link.quiet_remove(c["Id"])
        if self.pool.root:
            self.pool.leftover_slots(pool)

    # -- reporting ---------------------------------------------------------------------
    def _ended_id(self, t: Task) -> str | None:
        # remove() needs no search of the engine's containers for a fresh one
        return t.container_id if t.spec.container != "warm" else None
