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
bytes), streamed in chunks; it is fsynced and renamed into place. While the
container runs, one thread per task follows its log into
``live_log_path(spec.log_path)`` (the first ``log_limit`` bytes), for
``flowctl logs --follow``; the final log starts with the same bytes unless
the output was over ``log_limit``.

OOM. A task is ``OOM`` only on exit 137 with the engine's OOMKilled flag (it
is container-wide and sticky) or, since that flag is lost now and then on
cgroup v1, with the line the container's shell prints after the script when
its cgroup's ``oom_kill`` counter moved (see ``dockerspec._OOM_CHECK``).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any


from ..errors import (
    EngineError,
    EngineUnavailable,
    FlowError,
    ImageUnavailable,
    NotFound,
)
from .dockerapi import EngineLink, _WaitTimedOut, _boot_time, _parse_time
from .dockerlogs import LogCopier, _unlink
from .dockerspec import create_args, outcome
from .lanes import Lane
from .container import LABEL_ATTEMPT, LABEL_POOL, LABEL_RUN, LABEL_SPOOL, LABEL_TASK, container_name
from .base import (
    DAMAGED,
    ERROR,
    KILLED,
    MISSING,
    Executor,
    Report,
    Settings,
    TaskResult,
    TaskSpec,
    check_inputs,
    done_future,
    live_log_path,
)
from .warm import WarmPool

log = logging.getLogger(__name__)

MiB = 1024 * 1024
STARTS_LANE = 4
OPS_LANE = 2
_RUNNING_STATES = ("running", "paused", "restarting")



class DockerExecutor(Executor):
    ping_interval = 2.0  # seconds between pings while the engine is down

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
        super().__init__(report, settings or Settings(max_containers=max_workers,
                                                      cap_add=list(cap_add or [])))
        self.spool = spool
        self.max_workers = max_workers
        if pool_dir is None and os.path.isabs(spool):
            pool_dir = os.path.join(spool, "pool")
        self.pool = WarmPool(self, pool_dir or "")
        self.security_opt = ["no-new-privileges"] + list(security_opt or [])
        self.log_limit = log_limit
        self.link = EngineLink(self, client)  # the engine: calls, errors, outages
        self.logs = LogCopier(self)
        self._lock = threading.Lock()  # guards the fields below
        self._tasks: dict[tuple[str, str], _Task] = {}
        self._kills: set[tuple[str, str]] = set()
        self._starts = Lane("flowd-docker-start", STARTS_LANE)
        self._waits = Lane("flowd-docker-wait", max_workers)
        self._ops = Lane("flowd-docker-ops", OPS_LANE)
        self._follows = Lane("flowd-docker-logs", max_workers)

    @property
    def cap_add(self) -> list[str]:
        return self.settings.cap_add

    # -- the Executor interface ---------------------------------------------
    def start(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = _Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
            self._kills.discard(spec.key)
        self.pool.forget_kill(spec.key)
        if spec.container == "warm":
            return self._waits.submit(self.pool.run, t)
        return self._starts.submit(self._start_job, t)

    def adopt(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = _Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
        if spec.container == "warm":
            return self._ops.submit(self.pool.adopt, t)
        return self._waits.submit(self._adopt_job, t)

    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        key = (run_id, task_id)
        with self._lock:
            self._kills.add(key)
            t = self._tasks.get(key)
            cid = t.container_id if t is not None else None
            spool = self._spool(t.spec) if t is not None else self.spool
            warm = t is not None and t.spec.container == "warm"
        if warm:
            self.pool.kill(key)  # its thread sees it within warm.POLL and retires the container
            return done_future()
        return self._ops.submit(self._kill_job, key, cid, spool)

    def remove(self, spec: TaskSpec) -> concurrent.futures.Future:
        with self._lock:
            self._kills.discard(spec.key)
        if spec.container == "warm":
            return done_future()  # the container stays in the pool; its slot is empty already
        return self._ops.submit(self._remove_job, spec)

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        return self._ops.submit(self._sweep_job, spool, set(keep))

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
        for lane in (self._starts, self._waits, self._ops, self._follows):
            lane.close()

    # -- jobs: start --------------------------------------------------------
    def _start_job(self, t: _Task) -> None:
        spec = t.spec
        damaged = check_inputs(spec)  # here, not in the loop: it reads every input whole
        if damaged is not None:
            self._result(t, DAMAGED, **damaged)
            return
        try:
            # No removal of a leftover container up front: create() meets a
            # name conflict only in the rare case there is one, and handles it.
            self.link.ensure_image(spec.image)
            self.make_room()  # an idle warm container may hold the slot this one needs
            if self._kill_requested(spec):
                self._result(t, KILLED, message="killed before it started")
                return
            try:
                t.container_id = self._create(spec)
            except ImageUnavailable:  # removed since we last looked: pull it again
                self.link.image_seen.pop(spec.image, None)
                self.link.ensure_image(spec.image)
                t.container_id = self._create(spec)
            try:
                self.link.call(self.link.api.start, t.container_id)
            except EngineUnavailable:
                raise
            except FlowError:
                self.link.quiet_remove(t.container_id)
                raise
            deadline = None if spec.timeout is None else time.time() + spec.timeout
        except EngineUnavailable as e:
            self._result(t, ERROR, message=f"engine unavailable: {e}", retryable=True)
            return
        except ImageUnavailable as e:
            self._result(t, ERROR, message=str(e))
            return
        except FlowError as e:
            self._result(t, ERROR, message=f"could not start the container: {e}")
            return
        if self._kill_requested(spec):  # a kill that came in while we started it
            try:
                self.link.kill_container(t.container_id)
            except FlowError:
                pass  # the wait below meets the same trouble and handles it
        self._follow(t)
        self._waits.submit(self._wait_job, t, deadline)

    def _create(self, spec: TaskSpec) -> str:
        kwargs = self.link.call(self._create_args, spec)
        for n in range(3):
            try:
                return self.link.call(self.link.api.create_container, **kwargs)["Id"]
            except EngineError as e:
                # The name is still taken: a removal still in progress.
                if n == 2 or "is already in use" not in str(e):
                    raise
                self.link.remove_by_name(container_name(spec))
                self.link.stop.wait(0.2 * (n + 1))
        raise AssertionError("not reached")

    def _create_args(self, spec: TaskSpec) -> dict:
        """create_container's arguments (flowd.executor.dockerspec: the hardening)."""
        return create_args(self.link.api, spec, spool=self._spool(spec), cap_add=self.cap_add,
                           security_opt=self.security_opt, log_limit=self.log_limit)

    # -- jobs: wait and finish -----------------------------------------------
    def _wait_job(self, t: _Task, deadline: float | None) -> None:
        cid = t.container_id
        while not self.link.closed:
            try:
                if deadline is not None and time.time() >= deadline:
                    state = self.link.state(cid)
                    if state.get("Status") in _RUNNING_STATES:
                        t.timed_out = True
                        self.link.kill_container(cid)
                        self.link.call(self.link.api.wait, cid, timeout=60, expect_timeout=True)
                else:
                    remaining = None if deadline is None else max(deadline - time.time(), 0.05)
                    self.link.call(self.link.api.wait, cid, timeout=remaining, expect_timeout=True)
                info = self.link.call(self.link.api.inspect_container, cid)
                if info["State"].get("Status") in _RUNNING_STATES:
                    continue  # restarted under us (should not happen): wait again
                self._finish(t, info)
                return
            except _WaitTimedOut:
                continue  # the deadline check above decides
            except EngineUnavailable:
                t.engine_lost = True
                if not self.link.wait_up():
                    return
            except NotFound:
                self._result(t, MISSING, message="the container was removed while it ran")
                return
            except FlowError as e:
                self._result(t, ERROR, message=f"lost the container: {e}")
                return

    def _finish(self, t: _Task, info: dict) -> None:
        spec = t.spec
        state = info.get("State") or {}
        code = state.get("ExitCode")
        started = _parse_time(state.get("StartedAt"))
        finished = _parse_time(state.get("FinishedAt"))
        if started is not None and finished is not None and finished < started:
            # dockerd stamps StartedAt after runc has started the process; a
            # process that exits at once can have a FinishedAt a bit earlier.
            started = finished
        note = ""
        t.finished = True  # before the live log goes: see _follow_job
        if spec.log_path:
            try:
                self.logs.save(info["Id"], spec.log_path)
            except OSError as e:
                note = f" (log not saved: {e.strerror or e})"
            _unlink(live_log_path(spec.log_path))
        status, message, retryable = outcome(
            spec, state, killed=self._kill_requested(spec), timed_out=t.timed_out,
            engine_lost=t.engine_lost, oom_marked=lambda: self.link.oom_marked(info["Id"]))
        if retryable:
            self._result(t, status, exit_code=code, retryable=True, message=message)
            return
        self._result(t, status, exit_code=code, message=message + note,
                     started_at=started, finished_at=finished)

    # -- the live log ---------------------------------------------------------------
    def _follow(self, t: _Task) -> None:
        if t.spec.log_path and t.container_id is not None:
            self._follows.submit(self.logs.follow, t)

    # -- jobs: adopt ------------------------------------------------------------
    def _adopt_job(self, t: _Task) -> None:
        spec = t.spec
        while True:
            try:
                found = self.link.find(spec.run_id, spec.task_id, self._spool(spec))
                break
            except EngineUnavailable:
                if not self.link.wait_up():
                    return
            except FlowError as e:
                self._result(t, ERROR, message=str(e))
                return
        mine = None
        for c in found:
            if mine is None and (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                mine = c
            else:
                self.link.quiet_remove(c["Id"])  # another attempt's: not ours
        if mine is None:
            self._result(t, MISSING, message=f"no container for attempt {spec.attempt}")
            return
        t.container_id = mine["Id"]
        deadline = None
        if mine.get("State") == "created":  # made but never started: it did not run
            self.link.quiet_remove(t.container_id)
            self._result(t, MISSING, message="the container was created but never started")
            return
        if mine.get("State") == "exited" and _boot_time() is not None:
            try:
                finished = _parse_time(self.link.state(t.container_id).get("FinishedAt"))
            except FlowError:
                finished = None
            if finished is not None and finished < _boot_time():
                # It ended before this machine booted: what it wrote may never have
                # reached the disk. Do not trust it: run the attempt again.
                self.link.quiet_remove(t.container_id)
                self._result(t, MISSING, message="the container ended before the machine "
                                                 "restarted; its outputs are not trusted")
                return
        if mine.get("State") in _RUNNING_STATES:
            if spec.timeout is not None:
                try:
                    state = self.link.state(t.container_id)
                except FlowError:
                    state = {}  # _wait_job meets the same trouble and handles it
                started = _parse_time(state.get("StartedAt")) or time.time()
                deadline = started + spec.timeout
            if self._kill_requested(spec):
                self._ops.submit(self._kill_job, spec.key, t.container_id, self._spool(spec))
            self._follow(t)
        # An exited container's wait returns at once; _wait_job then reports it.
        self._wait_job(t, deadline)

    # -- jobs: kill, remove, sweep ---------------------------------------------
    def _kill_job(self, key: tuple[str, str], cid: str | None, spool: str) -> None:
        try:
            if cid is not None:
                self.link.kill_container(cid)
            else:  # not started by us yet, or never adopted: find it
                for c in self.link.find(key[0], key[1], spool):
                    if c.get("State") in _RUNNING_STATES:
                        self.link.kill_container(c["Id"])
        except FlowError as e:
            log.warning("could not kill task %s/%s: %s", key[0], key[1], e)

    def _remove_job(self, spec: TaskSpec) -> None:
        try:
            for c in self.link.find(spec.run_id, spec.task_id, self._spool(spec)):
                if (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                    self.link.quiet_remove(c["Id"])
        except FlowError as e:
            log.warning("could not remove the container of %s/%s: %s", spec.run_id, spec.task_id, e)

    def _sweep_job(self, spool: str, keep: set[tuple[str, str]]) -> None:
        try:
            found = self.link.call(self.link.api.containers, all=True,
                               filters={"label": [f"{LABEL_SPOOL}={spool}"]})
        except FlowError as e:
            log.warning("sweep of spool %r failed: %s", spool, e)
            return
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
    def _kill_requested(self, spec: TaskSpec) -> bool:
        with self._lock:
            return spec.key in self._kills

    def _spool(self, spec: TaskSpec) -> str:
        return spec.spool or self.spool

    def _result(self, t: _Task, status: str, **fields) -> None:
        with self._lock:
            if t.reported:
                return
            t.reported = True
            if self._tasks.get(t.spec.key) is t:
                del self._tasks[t.spec.key]
                self._kills.discard(t.spec.key)
        self._report(TaskResult(t.spec.run_id, t.spec.task_id, t.spec.attempt, status, **fields))

    def _report(self, event: object) -> None:
        if self.link.closed:
            return
        try:
            self.report(event)
        except Exception:  # noqa: BLE001 - a broken callback must not kill our threads
            log.exception("report callback failed for %r", event)


@dataclass(eq=False)
class _Task:
    spec: TaskSpec
    container_id: str | None = None
    timed_out: bool = False
    reported: bool = False
    engine_lost: bool = False  # the engine went away while we waited
    finished: bool = False  # _finish began: the live log is done with


