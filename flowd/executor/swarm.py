"""Run task attempts as one-shot Docker Swarm jobs (``executor = "swarm"``).

Each attempt is a new service in job mode (``flowd.executor.swarmspec``: the
name, the labels, the hardened spec and what Swarm cannot carry of it), made
on the Swarm manager this daemon's engine is; Swarm places it on a node with
room for its memory and cpus (reservations) and the process's constraints.
The spool must be on storage every node mounts at the same path: the task's
folder, script and inputs are bind-mounted from it, as for a local fresh
container. A ``container="warm"`` task also runs as a job here (Swarm has no
warm pool).

Threads and errors as in ``flowd.executor.docker``: the caller's thread
never talks to the engine; jobs run on lanes (``starts``, ``waits``,
``ops``, ``follows``); every SDK call goes through ``EngineLink.call``
(``flowd.executor.dockerapi``), the one error boundary, which also reports
the engine's outages.

The end of a job is read by polling its service's tasks
(``APIClient.tasks``) every ``POLL_MIN`` to ``POLL_MAX`` seconds for
``Status.State`` (complete, failed, rejected, ...) and
``Status.ContainerStatus.ExitCode``. A timeout or a kill saves the log and
removes the service (its container gets SIGKILL): ``TIMEOUT``/``KILLED``.
``OOM``: exit 137 with the container's OOMKilled flag when it ran on this
node, or the OOM mark line the wrapper prints (``dockerspec``). A task
whose node is drained, leaves the swarm, or stays down past
``swarmspec.NODE_LOST_AFTER`` (Swarm itself leaves a job's task there:
see swarmspec) has its service removed and is ``MISSING``: the daemon runs
the same attempt again as a new job, not counted as a failure. A rejected
task (the node lacks the image, a mount source is missing) is ``ERROR``
naming the image and the node. The final log is the service's log
(``service_logs``): its tail, fsynced and renamed into ``spec.log_path``;
``follow`` copies it live. ``adopt`` finds a service by its labels;
``remove`` removes the service and the container it left (job tasks can
outlive ``service rm``: Moby #42789), ``sweep`` the spool's services and
job containers by label.

Works with docker-py 5.0.3 and 7.x: only ``APIClient`` calls both have, and
the service spec as the engine API's JSON.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..channelvalues import with_values
from ..errors import EngineError, EngineUnavailable, FlowError, NotFound
from ..textsafe import for_log
from .base import (DAMAGED, ERROR, KILLED, MISSING, Report, Settings, TaskSpec, check_inputs, done_future,
                   live_log_path)
from .container import LABEL_ATTEMPT, LABEL_RUN, LABEL_SPOOL, LABEL_TASK
from .dockerapi import EngineLink, _boot_time, _parse_time
from .dockerlogs import LogCopier, _close_quietly, _unlink
from .dockerspec import OOM_MARK, outcome
from .engine import EngineExecutor
from .swarmnodes import PROBE_TIMEOUT, SwarmNodes
from . import swarmspec as S

log = logging.getLogger("flowd.executor.swarm")

MiB = 1024 * 1024
POLL_MIN = 0.05  # seconds between two looks at a job's tasks, at first
POLL_MAX = 1.0  # ... growing to this
ERR_MAX = 300  # characters of an engine's error kept in a message
NODE_CHECK = 1.0  # seconds between two looks at the node under a job's task
# A job's task that Swarm can place on no node ("no suitable node (insufficient
# resources on 2 nodes)", a constraint no node meets) fails after this long
# instead of waiting for ever; meanwhile status shows why it waits.
PENDING_LIMIT = 600.0
SERVICE_LABEL = "com.docker.swarm.service.id"  # on the containers Swarm makes


@dataclass(eq=False)
class Job:
    """The record of one attempt this executor runs as a Swarm job."""

    spec: TaskSpec
    service_id: str | None = None
    started_at: float | None = None
    timed_out: bool = False
    engine_lost: bool = False
    reported: bool = False
    finished: bool = False  # its end is being read: the live log is done with
    following: bool = False
    node_id: str = ""  # the node Swarm put its task on (once it did)
    waiting: str = ""  # why Swarm has not placed its task yet (the scheduler's words)
    waiting_since: float | None = None  # monotonic
    node_checked: float = 0.0  # monotonic time of the last look at its node
    node_silent_since: float | None = None  # monotonic time its node was first seen silent


class SwarmExecutor(EngineExecutor):
    pulls_images = False  # image_id: the manager's own copy, if it has one (its nodes pull)

    def __init__(self, report: Report, *, spool: str = "", settings: Settings | None = None,
                 max_workers: int = 64, log_limit: int = 10 * MiB, client: Any = None,
                 probe_image: str | None = None):
        """As ``DockerExecutor``: ``spool`` the default spool label, ``settings``
        (max_containers, cap_add; the warm ones do not apply), ``log_limit``
        bytes of log kept per task, ``client`` a docker client (default: made
        lazily from the environment) on a Swarm manager. ``probe_image``: watch
        the cluster's nodes and check each sees ``spool`` with a job of that
        image (``flowd.executor.swarmnodes``; None: no watching)."""
        super().__init__(report, settings or Settings(max_containers=max_workers), spool=spool,
                         max_workers=max_workers, log_limit=log_limit, lanes="flowd-swarm", starts=4, ops=2)
        # The engine is back after an outage when its swarm answers (a manager
        # without a leader answers pings).
        self.link = EngineLink(self, client, health=lambda api: api.nodes())
        self.cluster = SwarmNodes(self.link, spool, probe_image) if probe_image and spool else None
        if self.cluster is not None:
            self.cluster.start()
        self.logs = LogCopier(self)
        self.jobs = SwarmJobs(self)

    # -- the Executor interface ---------------------------------------------
    def start(self, spec: TaskSpec) -> concurrent.futures.Future:
        j = Job(spec)
        with self._lock:
            self._tasks[spec.key] = j
            self._kills.discard(spec.key)
            # A retry: the daemon removes no failed attempt it retries (a fresh
            # container's name is the task's, so the next create replaces it).
            earlier = [k for k in self._ended if k[0] == spec.key and k[1] != spec.attempt]
            old = [self._ended.pop(k) for k in earlier]
        return self._starts.submit(self.jobs.start_job, j, old)

    def adopt(self, spec: TaskSpec) -> concurrent.futures.Future:
        j = Job(spec)
        with self._lock:
            self._tasks[spec.key] = j
        return self._waits.submit(self.jobs.adopt_job, j)

    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        key = (run_id, task_id)
        with self._lock:
            self._kills.add(key)
            tracked = key in self._tasks
        if tracked:  # its wait job sees the kill within POLL_MAX and stops the job
            return done_future()
        return self._ops.submit(self.jobs.kill_job, key, self.spool)

    def remove(self, spec: TaskSpec) -> concurrent.futures.Future:
        with self._lock:
            self._kills.discard(spec.key)
            sid = self._ended.pop((spec.key, spec.attempt), None)
        return self._ops.submit(self.jobs.remove_job, spec, sid)

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        with self._lock:
            self._ended = {k: v for k, v in self._ended.items() if k[0] in keep}
        return self._ops.submit(self.jobs.sweep_job, spool, set(keep))

    def follow(self, run_id: str, task_id: str) -> None:
        with self._lock:
            j = self._tasks.get((run_id, task_id))
        if (j is not None and j.spec.log_path and j.service_id is not None
                and not j.following and not j.finished):
            j.following = True
            self._follows.submit(self.jobs.follow_job, j)

    def status(self) -> dict:
        with self._lock:
            jobs = len(self._tasks)
            on: dict[str, int] = {}
            for j in self._tasks.values():
                if j.node_id:
                    on[j.node_id] = on.get(j.node_id, 0) + 1
        out = {"swarm": jobs, "max_containers": self.settings.max_containers}
        if self.cluster is not None:
            out.update(self.cluster.snapshot(on))
        return out

    def nodes(self) -> dict[tuple[str, str], str]:
        with self._lock:
            placed = [(key, j.node_id) for key, j in self._tasks.items() if j.node_id]
            waiting = {key: f"(waiting: {j.waiting})" for key, j in self._tasks.items()
                       if j.waiting and not j.node_id}
        name = self.cluster.name if self.cluster is not None else (lambda node: node[:12])
        return {**waiting, **{key: name(node) for key, node in placed}}

    def close(self) -> None:
        """Stop the threads; the jobs keep running (``adopt`` finds them)."""
        if not self.link.close():
            return
        self._close_lanes()

    # -- for the jobs ---------------------------------------------------------------
    def _ended_id(self, j: Job) -> str | None:
        return j.service_id

    def _node_name(self, j: Job) -> str:
        """The node Swarm ran the job's task on (its hostname), "" if it was never placed."""
        if not j.node_id:
            return ""
        return self.cluster.name(j.node_id) if self.cluster is not None else j.node_id[:12]


class SwarmJobs:
    """The jobs the Swarm executor runs on its lanes; ``owner`` is the SwarmExecutor."""

    def __init__(self, owner: SwarmExecutor):
        self.owner = owner
        self._nodes_lock = threading.Lock()
        self._nodes: dict[str, tuple[float, dict | None]] = {}  # id -> (monotonic time, inspect_node or None)

    @property
    def link(self) -> EngineLink:
        return self.owner.link

    # -- start ------------------------------------------------------------------
    def start_job(self, j: Job, earlier: list[str]) -> None:
        """Remove the task's earlier attempts' jobs (``earlier``), then make this one's."""
        spec = j.spec
        for sid in earlier:
            self._remove_service(sid)
        if earlier:  # and the containers their tasks leave (Moby #42789)
            self._remove_containers(spec, lambda attempt: attempt != str(spec.attempt))
        damaged = check_inputs(spec)
        if damaged is not None:
            self.owner._result(j, DAMAGED, **damaged)
            return
        spec, why = with_values(spec)  # input@value: into the job's Env
        if why is not None:
            self.owner._result(j, ERROR, message=why)
            return
        if self.owner._kill_requested(spec):
            self.owner._result(j, KILLED, message="killed before it started")
            return
        try:
            j.service_id = self._create(spec)
        except EngineUnavailable as e:
            self.owner._result(j, ERROR, message=f"engine unavailable: {e}", retryable=True)
            return
        except FlowError as e:
            self.owner._result(j, ERROR, message=_start_error(e))
            return
        self.owner._waits.submit(self.wait_job, j)

    def _create(self, spec: TaskSpec) -> str:
        args = S.service_args(spec, spool=self.owner._spool(spec), cap_add=self.owner.settings.cap_add,
                              log_limit=self.owner.log_limit)
        avoid = self.owner.cluster.avoid() if self.owner.cluster is not None else []
        if avoid:  # nodes that cannot see the spool (swarmnodes)
            args["task_template"].setdefault("Placement", {}).setdefault("Constraints", []).extend(avoid)
        for n in range(3):
            try:
                return self.link.call(self.link.api.create_service, **args)["ID"]
            except EngineError as e:
                # A service of this attempt is there (a start asked again): never
                # reuse a job (Moby #44312); remove it and make a new one.
                if n == 2 or "already exists" not in str(e).lower() and "in use" not in str(e):
                    raise
                self._remove_service(args["name"])
                self.link.stop.wait(0.2 * (n + 1))
        raise AssertionError("not reached")

    # -- wait and finish -----------------------------------------------------------
    def wait_job(self, j: Job) -> None:
        spec, pause = j.spec, POLL_MIN
        while not self.link.closed:
            try:
                task = S.latest_task(self.link.call(self.link.api.tasks, filters={"service": j.service_id}))
                state = S.task_status(task)[0] if task else ""
                if task is not None and task.get("NodeID"):
                    j.node_id = str(task["NodeID"])[:64]
                if self._unplaced(j, task, state):
                    return
                if state in S.ENDED:
                    self._finish(j, task)
                    return
                if task is None and not self._service_exists(j.service_id):
                    self.owner._result(j, MISSING, message="the Swarm job was removed while it ran")
                    return
                if state in S.ON_NODE and task.get("NodeID"):
                    why = self._node_lost(j, str(task["NodeID"]))
                    if why:
                        self._lost(j, why)
                        return
                if state == "running" and j.started_at is None:
                    j.started_at = _parse_time((task.get("Status") or {}).get("Timestamp")) or time.time()
                if self.owner._kill_requested(spec):
                    self._stop(j)
                    return
                if (spec.timeout is not None and j.started_at is not None
                        and time.time() >= j.started_at + spec.timeout):
                    j.timed_out = True
                    self._stop(j)
                    return
            except EngineUnavailable:
                j.engine_lost = True
                if not self.link.wait_up():
                    return
                continue
            except FlowError as e:
                self.owner._result(j, ERROR, message=f"lost the Swarm job: {e}")
                return
            self.link.stop.wait(pause)
            pause = min(pause * 1.5, POLL_MAX)

    def _stop(self, j: Job) -> None:
        """Kill or timeout: keep the log, remove the service (SIGKILL), report."""
        j.finished = True
        note = self._save_log(j)
        self._remove_service(j.service_id)
        status, message, _ = outcome(j.spec, {"ExitCode": 137}, killed=self.owner._kill_requested(j.spec),
                                     timed_out=j.timed_out, engine_lost=False, oom_marked=lambda: False)
        self.owner._result(j, status, exit_code=None, message=message + note,
                           started_at=j.started_at, finished_at=time.time())

    def _unplaced(self, j: Job, task: dict | None, state: str) -> bool:
        """Note why a pending task waits; past PENDING_LIMIT, fail it (True)."""
        why = str(((task or {}).get("Status") or {}).get("Err") or "") if state == "pending" else ""
        if not why:
            j.waiting, j.waiting_since = "", None
            return False
        j.waiting = for_log(why[:ERR_MAX])
        now = time.monotonic()
        if j.waiting_since is None:
            j.waiting_since = now
        if now - j.waiting_since < PENDING_LIMIT:
            return False
        j.finished = True
        self._remove_service(j.service_id)
        if j.spec.log_path:
            _unlink(live_log_path(j.spec.log_path))
        self.owner._result(j, ERROR, message=(
            f"Swarm found no node for the task in {PENDING_LIMIT:g} s: {j.waiting} (fix: ask for less "
            "memory or cpus, loosen process@placement, or add a node with room)"))
        return True

    def _node_lost(self, j: Job, node_id: str) -> str:
        """Why the job's task must run again elsewhere because of its node
        (drained, gone, silent past ``S.NODE_LOST_AFTER``), or ""; looks at
        the node every NODE_CHECK seconds at most."""
        now = time.monotonic()
        if now < j.node_checked + NODE_CHECK:
            return ""
        j.node_checked = now
        try:
            node = self._node(node_id)
        except EngineUnavailable:
            raise
        except FlowError as e:  # cannot tell: the task stays
            log.debug("could not inspect Swarm node %s: %s", node_id[:12], e)
            return ""
        trouble = S.node_trouble(node)
        if trouble != "silent":
            j.node_silent_since = None
        elif j.node_silent_since is None:
            j.node_silent_since = now
        silent_for = None if j.node_silent_since is None else now - j.node_silent_since
        return S.node_verdict(trouble, S.node_label(node, node_id), silent_for)

    def _node(self, node_id: str) -> dict | None:
        """``inspect_node`` (None: no such node), shared by the jobs for NODE_CHECK seconds."""
        now = time.monotonic()
        with self._nodes_lock:
            got = self._nodes.get(node_id)
            if got is not None and now - got[0] < NODE_CHECK:
                return got[1]
        try:
            info: dict | None = self.link.call(self.link.api.inspect_node, node_id)
        except NotFound:
            info = None
        with self._nodes_lock:
            if len(self._nodes) > 1000:
                self._nodes.clear()
            self._nodes[node_id] = (now, info)
        return info

    def _lost(self, j: Job, why: str) -> None:
        """The task's node was drained or lost: remove its job (its container, if
        the node still runs it, gets SIGKILL) and report MISSING, which the
        daemon starts again (the same attempt, a new job) without counting a
        failure. Its log is not read: the node may not answer, and the next
        job writes the same log path."""
        j.finished = True
        self._remove_service(j.service_id)
        if j.spec.log_path:
            _unlink(live_log_path(j.spec.log_path))
        log.warning("task %s/%s attempt %d: %s", for_log(j.spec.run_id), for_log(j.spec.task_id),
                    j.spec.attempt, why)
        self.owner._result(j, MISSING, message=why)

    def _finish(self, j: Job, task: dict) -> None:
        spec = j.spec
        state, code, err, cid = S.task_status(task)
        j.finished = True
        if state == "rejected" and S.MOVED_OFF in err.lower():
            # Swarm's constraint enforcer took it off a node that changed under it
            # (labels, resources): not the task's doing; run it again.
            self._lost(j, f"Swarm took the task off node {S.node_label(None, str(task.get('NodeID') or ''))} "
                          f"({for_log(err[:ERR_MAX])}): the task runs again")
            return
        if state == "failed" and code is None and (j.engine_lost or "no such container" in err.lower()):
            # Its container went away under it (the engine restarted): it never ended; run it again.
            self._lost(j, f"the Swarm task's container went away ({for_log(err[:ERR_MAX])}): the task runs again")
            return
        if state == "rejected" or (state == "failed" and code is None):
            node = self._node_name(task.get("NodeID"))
            self._remove_service(j.service_id)
            if spec.log_path:
                _unlink(live_log_path(spec.log_path))
            self.owner._result(j, ERROR, message=S.rejection(spec, err[:ERR_MAX], node))
            return
        if code is None:  # shut down or orphaned (its node was lost) before it ended: run it again
            self._remove_service(j.service_id)
            self.owner._result(j, MISSING, message=f"the Swarm task ended {state} without an exit status")
            return
        note = self._save_log(j)
        local = self._container_state(cid)
        status, message, retryable = outcome(
            spec, {"ExitCode": code, "OOMKilled": local.get("OOMKilled")},
            killed=self.owner._kill_requested(spec), timed_out=j.timed_out, engine_lost=j.engine_lost,
            oom_marked=lambda: self._oom_marked(j))
        if retryable:
            self.owner._result(j, status, exit_code=code, retryable=True, message=message)
            return
        started = _parse_time(local.get("StartedAt")) or j.started_at
        finished = _parse_time(local.get("FinishedAt")) or _parse_time((task.get("Status") or {}).get("Timestamp"))
        if started is not None and finished is not None and finished < started:
            started = finished
        self.owner._result(j, status, exit_code=code, message=message + note,
                           started_at=started, finished_at=finished)

    # -- adopt, kill, remove, sweep -----------------------------------------------
    def adopt_job(self, j: Job) -> None:
        spec = j.spec
        while True:
            try:
                found = self._find(spec.run_id, spec.task_id, self.owner._spool(spec))
                break
            except EngineUnavailable:
                if not self.link.wait_up():
                    return
            except FlowError as e:
                self.owner._result(j, ERROR, message=str(e))
                return
        mine = None
        for svc in found:
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            if mine is None and labels.get(LABEL_ATTEMPT) == str(spec.attempt):
                mine = svc
            else:
                self._remove_service(svc["ID"])  # another attempt's: not ours
        if mine is None:
            self.owner._result(j, MISSING, message=f"no Swarm job for attempt {spec.attempt}")
            return
        j.service_id = mine["ID"]
        try:
            task = S.latest_task(self.link.call(self.link.api.tasks, filters={"service": j.service_id}))
        except FlowError:
            task = None  # wait_job meets the same trouble and handles it
        if task is not None:
            state = S.task_status(task)[0]
            stamp = _parse_time((task.get("Status") or {}).get("Timestamp"))
            boot = _boot_time()
            if state == "complete" and stamp is not None and boot is not None and stamp < boot:
                # Ended before this machine booted: its outputs may never have reached the disk.
                self._remove_service(j.service_id)
                self.owner._result(j, MISSING, message="the Swarm job ended before the machine "
                                                       "restarted; its outputs are not trusted")
                return
            if state == "running":
                j.started_at = stamp or time.time()
        self.wait_job(j)

    def kill_job(self, key: tuple[str, str], spool: str) -> None:
        try:
            for svc in self._find(key[0], key[1], spool):
                self._remove_service(svc["ID"])
        except FlowError as e:
            log.warning("could not kill task %s/%s: %s", key[0], key[1], e)

    def remove_job(self, spec: TaskSpec, sid: str | None) -> None:
        """Remove the attempt's service (by id when this executor ran it) and
        the container its task left here."""
        try:
            if sid is not None:
                self._remove_service(sid)
            else:
                for svc in self._find(spec.run_id, spec.task_id, self.owner._spool(spec)):
                    if ((svc.get("Spec") or {}).get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                        self._remove_service(svc["ID"])
        except FlowError as e:
            log.warning("could not remove the Swarm job of %s/%s: %s", spec.run_id, spec.task_id, e)
        self._remove_containers(spec, lambda attempt: attempt == str(spec.attempt))

    def _remove_containers(self, spec: TaskSpec, which) -> None:
        """Remove the containers here of the task's attempts ``which(attempt label)`` picks."""
        try:
            for c in self.link.find(spec.run_id, spec.task_id, self.owner._spool(spec)):
                if which((c.get("Labels") or {}).get(LABEL_ATTEMPT)):
                    self.link.quiet_remove(c["Id"])
        except FlowError as e:
            log.warning("could not remove the containers of %s/%s: %s", spec.run_id, spec.task_id, e)

    def sweep_job(self, spool: str, keep: set[tuple[str, str]]) -> None:
        try:
            services = self.link.call(self.link.api.services, filters={"label": [f"{LABEL_SPOOL}={spool}"]})
            keep = keep | self.owner._tracked()
            for svc in services:
                labels = (svc.get("Spec") or {}).get("Labels") or {}
                if labels.get(S.LABEL_KIND) == "probe":  # a node's spool check: its own while it may run
                    made = _parse_time(svc.get("CreatedAt"))
                    if made is not None and time.time() - made < 2 * PROBE_TIMEOUT:
                        continue
                    self._remove_service(svc["ID"])
                elif (labels.get(LABEL_RUN), labels.get(LABEL_TASK)) not in keep:
                    self._remove_service(svc["ID"])
            # Job containers left after their service went (Moby #42789).
            found = self.link.call(self.link.api.containers, all=True,
                                   filters={"label": [f"{LABEL_SPOOL}={spool}", SERVICE_LABEL]})
            keep = keep | self.owner._tracked()
            for c in found:
                labels = c.get("Labels") or {}
                if labels.get(S.LABEL_KIND) == "probe" and c.get("State") == "running":
                    continue  # a node's spool check under way
                if (labels.get(LABEL_RUN), labels.get(LABEL_TASK)) not in keep:
                    self.link.quiet_remove(c["Id"])
        except FlowError as e:
            log.warning("sweep of spool %r's Swarm jobs failed: %s", spool, e)

    # -- logs --------------------------------------------------------------------------
    def _save_log(self, j: Job) -> str:
        """The service's log (its tail) into spec.log_path; "" or a note on why not."""
        path = j.spec.log_path
        if not path:
            return ""
        part = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".part")
        try:
            stream = self.link.call(self.link.api.service_logs, j.service_id, stdout=True, stderr=True,
                                    follow=False, is_tty=False)
            try:
                with open(part, "w+b") as f:
                    self.owner.logs.copy_tail(stream, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, path)
            finally:
                _close_quietly(stream)
        except (OSError, FlowError) as e:
            _unlink(part)
            return f" (log not saved: {getattr(e, 'strerror', None) or e})"
        finally:
            _unlink(live_log_path(path))
        return ""

    def follow_job(self, j: Job) -> None:
        """Copy the job's log into its live file while it runs (``flowctl logs --follow``)."""
        self.owner.logs.follow(j, lambda: self.link.call(
            self.link.api.service_logs, j.service_id, stdout=True, stderr=True, follow=True, is_tty=False))

    def _oom_marked(self, j: Job) -> bool:
        try:
            with open(j.spec.log_path, "rb") as f:
                f.seek(max(os.fstat(f.fileno()).st_size - 4096, 0))
                return OOM_MARK.encode() in f.read()
        except OSError:
            return False

    # -- engine helpers --------------------------------------------------------------
    def _find(self, run_id: str, task_id: str, spool: str) -> list[dict]:
        labels = [f"{LABEL_RUN}={run_id}", f"{LABEL_TASK}={task_id}", f"{LABEL_SPOOL}={spool}"]
        return self.link.call(self.link.api.services, filters={"label": labels})

    def _service_exists(self, sid: str) -> bool:
        try:
            self.link.call(self.link.api.inspect_service, sid)
            return True
        except NotFound:
            return False

    def _remove_service(self, sid: str | None) -> None:
        if not sid:
            return
        try:
            self.link.call(self.link.api.remove_service, sid)
        except NotFound:
            pass
        except FlowError as e:
            log.warning("could not remove Swarm service %s: %s", sid[:12], e)

    def _container_state(self, cid: str) -> dict:
        """The container's State when it ran on this node; {} when elsewhere."""
        if not cid:
            return {}
        try:
            return self.link.state(cid)
        except FlowError:
            return {}

    def _node_name(self, node_id: str | None) -> str:
        if not node_id:
            return ""
        try:
            info = self.link.call(self.link.api.inspect_node, node_id)
        except FlowError:
            return node_id[:12]
        return str(((info.get("Description") or {}).get("Hostname")) or node_id[:12])[:64]


def _start_error(e: FlowError) -> str:
    return f"could not create the Swarm job: {str(e)[:ERR_MAX]}"
