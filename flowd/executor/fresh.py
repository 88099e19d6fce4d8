"""Fresh containers: one new container per task attempt (``container="fresh"``).

The jobs the Docker executor runs on its lanes for a fresh task: start
(``_start_job``: image, create, start, then the wait), wait and finish
(the result, the final log), adopt after a restart (found by label), kill
and remove. The container's settings are ``flowd.executor.dockerspec``'s;
the engine calls go through ``owner.link`` (``flowd.executor.dockerapi``).
"""
from __future__ import annotations

import logging
import time

from ..channelvalues import with_values
from ..errors import EngineError, EngineUnavailable, FlowError, ImageUnavailable, NotFound
from .base import DAMAGED, ERROR, KILLED, MISSING, TaskSpec, check_inputs, live_log_path
from .container import (LABEL_ATTEMPT, LABEL_POOL, LABEL_PROCESS, LABEL_RUN, LABEL_SPOOL, LABEL_TASK,
                        Task, container_name)
from .dockerapi import _WaitTimedOut, _boot_time, _parse_time
from .dockerlogs import _unlink
from .dockerspec import create_args, outcome

log = logging.getLogger("flowd.executor.docker")

RUNNING_STATES = ("running", "paused", "restarting")
# a resize changes these too: made, not yet started, it starts with what it was given
RESIZABLE_STATES = RUNNING_STATES + ("created",)


class FreshContainers:
    """``owner`` is the DockerExecutor: its link, lanes, settings and ``_result``."""

    def __init__(self, owner):
        self.owner = owner

    @property
    def link(self):
        return self.owner.link

    # -- jobs: start --------------------------------------------------------
    def _start_job(self, t: Task) -> None:
        spec = t.spec
        damaged = check_inputs(spec)  # here, not in the loop: it reads every input whole
        if damaged is not None:
            self.owner._result(t, DAMAGED, **damaged)
            return
        spec, why = with_values(spec)  # input@value: read here, off the loop
        if why is not None:
            self.owner._result(t, ERROR, message=why)
            return
        try:
            # No removal of a leftover container up front: create() meets a
            # name conflict only in the rare case there is one, and handles it.
            self.link.ensure_image(spec.image)
            self.owner.make_room()  # an idle warm container may hold the slot this one needs
            if self.owner._kill_requested(spec):
                self.owner._result(t, KILLED, message="killed before it started")
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
            self.owner.usage.watch(t, t.container_id)  # its cgroup, sampled while it runs (trace)
            deadline = None if spec.timeout is None else time.time() + spec.timeout
        except EngineUnavailable as e:
            self.owner._result(t, ERROR, message=f"engine unavailable: {e}", retryable=True)
            return
        except ImageUnavailable as e:
            self.owner._result(t, ERROR, message=str(e))
            return
        except FlowError as e:
            self.owner._result(t, ERROR, message=f"could not start the container: {e}")
            return
        if self.owner._kill_requested(spec):  # a kill that came in while we started it
            try:
                self.link.kill_container(t.container_id)
            except FlowError:
                pass  # the wait below meets the same trouble and handles it
        self.owner._waits.submit(self._wait_job, t, deadline)

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
        """create_container's arguments (flowd.executor.dockerspec: the hardening),
        with the limits a resize gave the process since the task was handed over."""
        spec = self.owner.with_limits(spec)
        return create_args(self.link.api, spec, spool=self.owner._spool(spec), cap_add=self.owner.cap_add,
                           security_opt=self.owner.security_opt, log_limit=self.owner.log_limit)

    # -- jobs: wait and finish -----------------------------------------------
    def _wait_job(self, t: Task, deadline: float | None) -> None:
        cid = t.container_id
        while not self.link.closed:
            try:
                if deadline is not None and time.time() >= deadline:
                    state = self.link.state(cid)
                    if state.get("Status") in RUNNING_STATES:
                        t.timed_out = True
                        self.link.kill_container(cid)
                        self.link.call(self.link.api.wait, cid, timeout=60, expect_timeout=True)
                else:
                    remaining = None if deadline is None else max(deadline - time.time(), 0.05)
                    self.link.call(self.link.api.wait, cid, timeout=remaining, expect_timeout=True)
                info = self.link.call(self.link.api.inspect_container, cid)
                if info["State"].get("Status") in RUNNING_STATES:
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
                self.owner._result(t, MISSING, message="the container was removed while it ran")
                return
            except FlowError as e:
                self.owner._result(t, ERROR, message=f"lost the container: {e}")
                return

    def _finish(self, t: Task, info: dict) -> None:
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
                self.owner.logs.save(info["Id"], spec.log_path)
            except OSError as e:
                note = f" (log not saved: {e.strerror or e})"
            _unlink(live_log_path(spec.log_path))
        status, message, retryable = outcome(
            spec, state, killed=self.owner._kill_requested(spec), timed_out=t.timed_out,
            engine_lost=t.engine_lost, oom_marked=lambda: self.link.oom_marked(info["Id"]))
        if retryable:
            self.owner._result(t, status, exit_code=code, retryable=True, message=message)
            return
        self.owner._result(t, status, exit_code=code, message=message + note,
                     started_at=started, finished_at=finished)

    # -- the live log ---------------------------------------------------------------
    def follow(self, t: Task) -> None:
        """Copy the running container's log into its live file, once per task
        (asked by ``flowctl logs --follow``: no stream or thread per task otherwise)."""
        if t.spec.log_path and t.container_id is not None and not t.following and not t.finished:
            t.following = True
            self.owner._follows.submit(self.owner.logs.follow, t)

    # -- jobs: adopt ------------------------------------------------------------
    def _adopt_job(self, t: Task) -> None:
        spec = t.spec
        while True:
            try:
                found = self.link.find(spec.run_id, spec.task_id, self.owner._spool(spec))
                break
            except EngineUnavailable:
                if not self.link.wait_up():
                    return
            except FlowError as e:
                self.owner._result(t, ERROR, message=str(e))
                return
        mine = None
        for c in found:
            if mine is None and (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                mine = c
            else:
                self.link.quiet_remove(c["Id"])  # another attempt's: not ours
        if mine is None:
            self.owner._result(t, MISSING, message=f"no container for attempt {spec.attempt}")
            return
        t.container_id = mine["Id"]
        deadline = None
        if mine.get("State") == "created":  # made but never started: it did not run
            self.link.quiet_remove(t.container_id)
            self.owner._result(t, MISSING, message="the container was created but never started")
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
                self.owner._result(t, MISSING, message="the container ended before the machine "
                                                 "restarted; its outputs are not trusted")
                return
        if mine.get("State") in RUNNING_STATES:
            self.owner.usage.watch(t, t.container_id)  # from now on: the trace's figures are partial
            if spec.timeout is not None:
                try:
                    state = self.link.state(t.container_id)
                except FlowError:
                    state = {}  # _wait_job meets the same trouble and handles it
                started = _parse_time(state.get("StartedAt")) or time.time()
                deadline = started + spec.timeout
            if self.owner._kill_requested(spec):
                self.owner._ops.submit(self._kill_job, spec.key, t.container_id, self.owner._spool(spec))
        # An exited container's wait returns at once; _wait_job then reports it.
        self._wait_job(t, deadline)

    # -- jobs: kill, remove, sweep ---------------------------------------------
    def _kill_job(self, key: tuple[str, str], cid: str | None, spool: str) -> None:
        try:
            if cid is not None:
                self.link.kill_container(cid)
            else:  # not started by us yet, or never adopted: find it
                for c in self.link.find(key[0], key[1], spool):
                    if c.get("State") in RUNNING_STATES:
                        self.link.kill_container(c["Id"])
        except FlowError as e:
            log.warning("could not kill task %s/%s: %s", key[0], key[1], e)

    def _remove_job(self, spec: TaskSpec, cid: str | None = None) -> None:
        """Remove the attempt's container: by its id when this executor ran it
        (one engine call), else found by its labels (after a restart)."""
        if cid is not None:
            self.link.quiet_remove(cid)
            return
        try:
            for c in self.link.find(spec.run_id, spec.task_id, self.owner._spool(spec)):
                if (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                    self.link.quiet_remove(c["Id"])
        except FlowError as e:
            log.warning("could not remove the container of %s/%s: %s", spec.run_id, spec.task_id, e)

    # -- resize -------------------------------------------------------------------
    def of_process(self, run_id: str, process: str, spool: str) -> list[dict]:
        """The fresh containers of ``process`` in ``run_id`` that run now (or are
        made and about to): {"id", "name", "task"} each."""
        labels = [f"{LABEL_RUN}={run_id}", f"{LABEL_PROCESS}={process}"]
        if spool:
            labels.append(f"{LABEL_SPOOL}={spool}")
        found = self.link.call(self.link.api.containers, all=True, filters={"label": labels})
        return [{"id": c["Id"], "name": ((c.get("Names") or ["?"])[0]).lstrip("/"),
                 "task": (c.get("Labels") or {}).get(LABEL_TASK, "?")}
                for c in found if c.get("State") in RESIZABLE_STATES
                and not (c.get("Labels") or {}).get(LABEL_POOL)]

    def memory_used(self, cid: str) -> int | None:
        """Bytes of memory the container uses now, as ``docker stats`` counts them
        (its cgroup's usage less the page cache it can drop: inactive files,
        cgroup v1 or v2); None when the engine has no figure (not running)."""
        api = self.link.api
        kwargs = {"one_shot": True} if _has_one_shot(api) else {}
        stats = self.link.call(api.stats, cid, stream=False, **kwargs)
        mem = (stats or {}).get("memory_stats") or {}
        usage = mem.get("usage")
        if not isinstance(usage, int):
            return None
        detail = mem.get("stats") or {}
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))  # v1, v2
        if isinstance(cache, int) and 0 <= cache < usage:
            usage -= cache
        return usage

    def update_limits(self, cid: str, memory: int | None, cpus: float | None) -> None:
        """Give the container new limits live (``docker update``). Memory and
        swap together (flowd gives no swap: memswap = memory), cpus as NanoCpus:
        the SDK's ``update_container`` has no NanoCpus on 5.0.3 nor 7.x, and the
        engine refuses a CpuQuota on a container made with NanoCpus, so the
        engine's update endpoint is called as ``update_container`` does."""
        body: dict = {}
        if memory is not None:
            body["Memory"] = int(memory)
            body["MemorySwap"] = int(memory)
        if cpus is not None:
            body["NanoCpus"] = int(cpus * 1e9)
        if body:
            self.link.call(_update, self.link.api, cid, body)


def _update(api, cid: str, body: dict) -> dict:
    """POST /containers/ID/update, as the SDK's ``update_container`` does (5.0.3 and 7.x)."""
    return api._result(api._post_json(api._url("/containers/{0}/update", cid), data=body), True)


def _has_one_shot(api) -> bool:
    """``stats(one_shot=True)`` (no wait for a second sample): docker-py 7.x on API 1.41 and later."""
    import inspect

    if "one_shot" not in inspect.signature(api.stats).parameters:
        return False
    try:
        major, minor = (int(x) for x in str(api.api_version).split(".")[:2])
    except (ValueError, AttributeError):
        return False
    return (major, minor) >= (1, 41)
