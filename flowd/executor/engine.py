"""What the executors that drive a Docker engine share (``DockerExecutor``,
``SwarmExecutor``): the record of the attempts they run, the kill marks, the
engine's ids of ended attempts (so ``remove`` needs no search), reporting a
result exactly once, and the four lanes their jobs run on.

A backend's record of an attempt (``container.Task``, ``swarm.Job``) has
``spec`` and ``reported``; ``_ended_id(record)`` says what ``remove`` is to
remove once it has ended (a container id, a service id, or None).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from .base import Executor, Report, Settings, TaskResult, TaskSpec
from .lanes import Lane
from .usage import Sampler, attempt_fields, host_name

log = logging.getLogger("flowd.executor")


class EngineExecutor(Executor):
    ping_interval = 2.0  # seconds between pings while the engine is down

    def __init__(self, report: Report, settings: Settings, *, spool: str, max_workers: int,
                 log_limit: int, lanes: str, starts: int, ops: int):
        super().__init__(report, settings)
        self.spool = spool
        self.max_workers = max_workers
        self.log_limit = log_limit
        self.link: Any = None  # the subclass's EngineLink (flowd.executor.dockerapi)
        self._lock = threading.Lock()  # guards the fields below
        self._tasks: dict[tuple[str, str], Any] = {}  # (run, task) -> the record of its attempt
        self._kills: set[tuple[str, str]] = set()
        self._ended: dict[tuple[tuple[str, str], int], str] = {}  # (key, attempt) -> engine id
        self._starts = Lane(f"{lanes}-start", starts)
        self._waits = Lane(f"{lanes}-wait", max_workers)
        self._ops = Lane(f"{lanes}-ops", ops)
        self._follows = Lane(f"{lanes}-logs", max_workers)
        self.usage = Sampler()  # the running containers' cgroups, for the trace

    # Whether image_id pulls a missing image (the local engine does, as a start
    # would; a Swarm manager does not: its nodes pull)
    pulls_images = True

    def image_id(self, image: str) -> str | None:
        return self.link.image_id(image, pull=self.pulls_images)

    def _close_lanes(self) -> None:
        for lane in (self._starts, self._waits, self._ops, self._follows):
            lane.close()

    # -- for the jobs ---------------------------------------------------------------
    def _kill_requested(self, spec: TaskSpec) -> bool:
        with self._lock:
            return spec.key in self._kills

    def _spool(self, spec: TaskSpec) -> str:
        return spec.spool or self.spool

    def _tracked(self) -> set[tuple[str, str]]:
        """The attempts running now. A sweep reads this *after* it listed the
        engine's objects: an attempt started meanwhile (not in the caller's
        ``keep`` yet) is never swept."""
        with self._lock:
            return set(self._tasks)

    def _ended_id(self, record) -> str | None:
        """What ``remove`` removes once the attempt has ended (None: nothing by id)."""
        return None

    def _result(self, record, status: str, **fields) -> None:
        """Report the attempt's result, once; it is no longer running."""
        spec = record.spec
        with self._lock:
            if record.reported:
                return
            record.reported = True
            if self._tasks.get(spec.key) is record:
                del self._tasks[spec.key]
                self._kills.discard(spec.key)
            ended = self._ended_id(record)
            if ended is not None:
                self._ended[(spec.key, spec.attempt)] = ended
        fields = {**attempt_fields(self.usage, record, status, fields.get("exit_code"),
                                   self._node_name(record)), **fields}
        self._report(TaskResult(spec.run_id, spec.task_id, spec.attempt, status, **fields))

    def _node_name(self, record) -> str:
        """Where the attempt ran, for its trace: this machine (a local engine)."""
        return host_name()

    def _report(self, event: object) -> None:
        if self.link.closed:
            return
        try:
            self.report(event)
        except Exception:  # noqa: BLE001 - a broken callback must not kill our threads
            log.exception("report callback failed for %r", event)
