"""A test double for the executor: "scripts" are Python functions.

``FakeExecutor(report, scripts={"count": fn})`` queues every started task;
``run_pending()`` runs each queued task's function with a ``FakeTask`` (its
inputs by ``as`` name, a place to write outputs) and reports the result, so
a test drives a whole run step by step without Docker or sleeps.
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Callable

from . import base as X
from .usage import host_name, task_bytes


@dataclass
class FakeTask:
    spec: X.TaskSpec

    def read(self, name: str) -> bytes:
        for m in self.spec.inputs:
            if m.target == f"{X.TASK_DIR}/{name}":
                with open(m.source, "rb") as f:
                    return f.read()
        raise KeyError(name)

    def write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.spec.workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    @property
    def attempt(self) -> int:
        return self.spec.attempt


# A fake script returns an exit code (0 = success) or a TaskResult status string.
Script = Callable[[FakeTask], "int | str"]


class FakeExecutor(X.Executor):
    def __init__(self, report: X.Report, scripts: dict[str, Script] | None = None):
        super().__init__(report)
        self.scripts = scripts if scripts is not None else {}  # the caller may fill its dict later
        self.pending: list[X.TaskSpec] = []
        self.started: list[X.TaskSpec] = []
        self.removed: list[str] = []
        self.killed: list[tuple[str, str]] = []
        self.adopted: list[X.TaskSpec] = []
        self.containers: dict[tuple[str, str], X.TaskSpec] = {}  # (run, task) -> spec, until removed
        self.usage: dict[tuple[str, str], int] = {}  # (run, task) -> bytes its "container" uses (tests set it)
        self.resized: list[tuple[str, str, int | None, float | None]] = []  # resize calls that went through
        self.sweeps: list[set[tuple[str, str]]] = []  # the keep set of each sweep
        # image -> its build (tests change it to "rebuild" an image): image_id's answer
        self.images: dict[str, str] = {}

    def image_id(self, image: str) -> str | None:
        import hashlib

        build = self.images.get(image, "1")
        return "sha256:" + hashlib.sha256(f"{image}\0{build}".encode()).hexdigest()

    def start(self, spec: X.TaskSpec) -> concurrent.futures.Future:
        self.started.append(spec)
        self.pending.append(spec)
        self.containers[spec.key] = spec
        return X.done_future()

    def adopt(self, spec: X.TaskSpec) -> concurrent.futures.Future:
        self.adopted.append(spec)
        if spec.key in self.containers and spec.container != "warm":
            self.pending.append(spec)
        else:  # as the Docker executor: a warm task is never taken back after a restart
            self.containers.pop(spec.key, None)
            self.report(X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.MISSING))
        return X.done_future()

    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        self.killed.append((run_id, task_id))
        for spec in list(self.pending):
            if spec.key == (run_id, task_id):
                self.pending.remove(spec)
                self.report(X.TaskResult(run_id, task_id, spec.attempt, X.KILLED, message="killed"))
        return X.done_future()

    def remove(self, spec: X.TaskSpec) -> concurrent.futures.Future:
        self.removed.append(spec.key)
        self.containers.pop(spec.key, None)
        return X.done_future()

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        self.sweeps.append(set(keep))
        running = {spec.key for spec in self.pending}  # as the real ones: never what it runs
        for name, spec in list(self.containers.items()):
            if spec.key not in keep and spec.key not in running:
                del self.containers[name]
        return X.done_future()

    def resize(self, run_id: str, process: str, memory: int | None,
               cpus: float | None) -> concurrent.futures.Future:
        """As the Docker executor: refused if a running task uses more than
        ``memory``; else its running fresh tasks get the limits (their specs
        here) and its warm ones count as retired."""
        mine = [s for s in self.containers.values() if (s.run_id, s.process) == (run_id, process)]
        for spec in mine:
            used = self.usage.get(spec.key)
            if memory is not None and used is not None and used > memory:
                return X._resolved({"refused": f"task {spec.task_id} uses {used} bytes now, more "
                                               f"than the {memory} bytes asked"})
        self.resized.append((run_id, process, memory, cpus))
        fresh = [s for s in mine if s.container != "warm"]
        for spec in fresh:
            spec.memory, spec.cpus = memory, cpus
        return X._resolved({"updated": len(fresh), "retired": len(mine) - len(fresh), "kept": 0,
                            "note": ""})

    def run_pending(self, limit: int | None = None) -> int:
        """Run queued tasks (oldest first) and report their results."""
        n = 0
        while self.pending and (limit is None or n < limit):
            spec = self.pending.pop(0)
            n += 1
            damaged = X.check_inputs(spec)
            if damaged is not None:  # as the real executor: never started
                self.containers.pop(spec.key, None)
                self.report(X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.DAMAGED,
                                         **damaged))
                continue
            fn = self.scripts.get(spec.process, lambda t: 0)
            outcome = fn(FakeTask(spec))
            if isinstance(outcome, str):
                res = X.TaskResult(spec.run_id, spec.task_id, spec.attempt, outcome, message=outcome)
            else:
                res = X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.EXITED,
                                   exit_code=outcome, message=f"exit status {outcome}")
            res.node = host_name()  # what it can fill of a trace record: no container, no cgroup
            for k, v in task_bytes(spec, res.status, res.exit_code).items():
                setattr(res, k, v)
            os.makedirs(os.path.dirname(spec.log_path), exist_ok=True)
            with open(spec.log_path, "a") as f:
                f.write(f"fake {spec.process} task {spec.task_id} attempt {spec.attempt}\n")
            self.report(res)
        return n
