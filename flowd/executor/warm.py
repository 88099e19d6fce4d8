"""The warm pool: ``container="warm"`` tasks run one at a time in kept containers.

A warm container serves one process of one run (as an OpenWhisk container
serves one action), with one set of settings: the pool's key is the run,
the process, and the image, user, memory, cpus, network, pids limit and
capabilities of its tasks (so a resized process gets new containers: its
old ones are retired, idle ones at once, busy ones after their task). Its resident agent and its host folder (the
*slot*) are in ``flowd.executor.warmagent``; the container's settings in
``flowd.executor.dockerspec.warm_create_args`` (the same hardening as a fresh
container, the engine's init as pid 1, a read-only root unless the config's
``warm_read_only`` is false).

A task, on one of the executor's ``waits`` threads: its inputs are checked
(as for a fresh one), an idle container of its key is taken (the one used
last) or a new one started; its inputs are copied into the slot's ``task/``;
the agent is woken; the task's output is written to its log as it comes;
the answer is read (``done SEQ STATUS ...``), the container's processes are
counted from the host, the declared outputs are moved into the task's own
``work/`` folder (``flowd.collect`` then treats them exactly as a fresh
task's), and the slot is emptied for the next task.

A container is *retired* (killed and removed, its slot deleted) after a
failed task, a timeout, an OOM, a cancel, a process left behind, anything
the agent says that is not the answer expected, a slot that cannot be
emptied, ``warm_tasks`` tasks, or ``warm_idle`` seconds idle. All containers,
fresh and warm, stay within ``max_containers``: an idle warm container is
retired to make room when a task needs one.

After a daemon restart, warm containers are not taken back: ``sweep``
removes them, and a warm task that was running is reported ``MISSING``, so
it runs again (its outputs were never committed, so it counts once).
"""
from __future__ import annotations

import logging
import os
import secrets
import select
import threading
import time
from dataclasses import dataclass

from ..channelvalues import with_values
from ..errors import EngineUnavailable, FlowError
from ..reaper import remove_tree
from . import usage
from .base import DAMAGED, ERROR, KILLED, MISSING, TaskSpec, check_inputs
from .container import LABEL_POOL, LABEL_PROCESS, LABEL_RUN, LABEL_SPOOL
from .dockerspec import warm_create_args
from .warmagent import MAX_LINE, WarmSlot, is_ready
from .warmtask import Outcome, WarmTaskRun

log = logging.getLogger("flowd.executor.warm")

READY_TIMEOUT = 30.0  # seconds a new container has to say "ready"


@dataclass(frozen=True)
class PoolKey:
    run_id: str
    process: str
    image: str
    user: str | None
    group_add: tuple[str, ...]
    memory: int | None
    cpus: float | None
    network: str
    pids_limit: int
    cap_add: tuple[str, ...]
    read_only: bool


@dataclass(eq=False)
class WarmContainer:
    key: PoolKey
    name: str
    slot: WarmSlot
    cid: str = ""
    seq: int = 0  # tasks sent to it so far
    started_at: float = 0.0  # time.time() when it was created
    busy: bool = True
    idle_since: float = 0.0
    task: tuple[str, str] | None = None  # (run, task) it runs now
    retire: str = ""  # why it is to be retired once its task ends (a resize), else ""


class WarmPool:
    """``owner`` is the DockerExecutor: its link, settings, ``_result`` and capacity."""

    def __init__(self, owner, root: str):
        self.owner = owner
        self.root = root  # SPOOL/pool: one slot folder per container
        self._lock = threading.Lock()
        self._containers: dict[str, WarmContainer] = {}
        self._creating: set[str] = set()  # names of containers being started (counted, kept by sweep)
        self._kills: set[tuple[str, str]] = set()
        self._stops: dict[tuple[tuple[str, str], int], bool] = {}  # attempts whose container stopped once
        self._idle_thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def link(self):
        return self.owner.link

    # -- what the executor asks ---------------------------------------------------------
    def size(self) -> int:
        with self._lock:
            return len(self._containers) + len(self._creating)

    def counts(self) -> dict[str, int]:
        with self._lock:
            busy = sum(1 for c in self._containers.values() if c.busy)
            return {"containers": len(self._containers), "busy": busy,
                    "idle": len(self._containers) - busy, "starting": len(self._creating)}

    def names(self) -> set[str]:
        with self._lock:
            return set(self._containers) | self._creating

    def make_room(self, others: int) -> None:
        """Retire idle containers (least recently used first) until the pool and
        ``others`` containers fit in ``max_containers``."""
        cap = self.owner.settings.max_containers
        victims = []
        with self._lock:
            idle = sorted((c for c in self._containers.values() if not c.busy), key=lambda c: c.idle_since)
            while idle and len(self._containers) + len(self._creating) + others > cap:
                c = idle.pop(0)
                del self._containers[c.name]
                victims.append(c)
        for c in victims:
            self._remove(c, "room for another task")

    def kill(self, key: tuple[str, str]) -> bool:
        """Ask the task's thread to stop it (it retires the container within warmtask.POLL); False: not a warm task here."""
        with self._lock:
            running = any(c.task == key for c in self._containers.values())
            self._kills.add(key)
        return running

    def first_unexplained_stop(self, spec: TaskSpec) -> bool:
        """True the first time an attempt's container stops under it for no known reason."""
        with self._lock:
            if (spec.key, spec.attempt) in self._stops:
                return False
            if len(self._stops) >= 10_000:  # bounded: the oldest are forgotten
                self._stops.pop(next(iter(self._stops)))
            self._stops[(spec.key, spec.attempt)] = True
            return True

    def forget_kill(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._kills.discard(key)

    def adopt(self, t) -> None:
        """A warm task in flight when flowd stopped: not taken back (see the module docstring)."""
        self.owner._result(t, MISSING, message="a warm container is not taken back after a "
                                              "restart; the task runs again")

    def close(self) -> None:
        """Stop the idle thread and let go of the slots' pipes (the agents then
        see the end of ``in`` and their containers stop; a restarted flowd
        sweeps them: warm containers are never taken back)."""
        self._closed.set()
        with self._lock:
            containers = list(self._containers.values())
        for c in containers:
            if not c.busy:
                c.slot.close()

    def retire_all(self, why: str) -> None:
        with self._lock:
            victims = [c for c in self._containers.values() if not c.busy]
            for c in victims:
                del self._containers[c.name]
        for c in victims:
            self._remove(c, why)

    def resize(self, run_id: str, process: str, memory: int | None,
               cpus: float | None) -> tuple[int, int]:
        """The process's containers made with other limits are retired: the
        idle ones now, the busy ones after their task (``run``). Its next
        tasks have another key, so new containers get the new limits.
        Returns (idle retired, busy to retire)."""
        why = "its process was resized"
        with self._lock:
            old = [c for c in self._containers.values()
                   if (c.key.run_id, c.key.process) == (run_id, process)
                   and (c.key.memory, c.key.cpus) != (memory, cpus)]
            idle = [c for c in old if not c.busy]
            for c in idle:
                del self._containers[c.name]
            for c in old:
                if c.busy:
                    c.retire = why
        for c in idle:
            self._remove(c, why)
        return len(idle), len(old) - len(idle)

    def leftover_slots(self, keep: set[str]) -> None:
        """Delete slot folders of containers this pool does not know (an earlier daemon's)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        keep = set(keep) | self.names()  # read after listdir: a container started meanwhile is kept
        for name in names:
            if name not in keep:
                remove_tree(os.path.join(self.root, name))

    # -- one task ----------------------------------------------------------------------------
    def run(self, t) -> None:
        """The whole of one warm task, on a waits thread; reports its result."""
        spec: TaskSpec = t.spec
        damaged = check_inputs(spec)
        if damaged is not None:
            self.owner._result(t, DAMAGED, **damaged)
            return
        spec, why = with_values(spec)  # input@value: in this task's env file only
        if why is not None:
            self.owner._result(t, ERROR, message=why)
            return
        if self._kill_requested(spec.key):
            self.owner._result(t, KILLED, message="killed before it started")
            return
        try:
            c = self._acquire(spec)
        except EngineUnavailable as e:
            self.owner._result(t, ERROR, message=f"engine unavailable: {e}", retryable=True)
            return
        except (FlowError, OSError) as e:
            self.owner._result(t, ERROR, message=f"could not start a warm container: {e}")
            return
        with self._lock:
            c.task = spec.key
        started = time.time()
        self.owner.usage.watch(t, c.cid, delta=True)  # the task's share of the container (trace)
        try:
            out = WarmTaskRun(self).run_on(c, spec)
        except OSError as e:  # flowd's side (its disk): the task fails and counts a retry
            out = Outcome(ERROR, message=f"warm container: {e.strerror or e}", retire="host error")
        usage.finish(self.owner.usage, t)  # before the container may go
        finished = time.time()
        with self._lock:
            c.task = None
            self._kills.discard(spec.key)
            retire = out.retire or c.retire
        if retire:
            with self._lock:
                self._containers.pop(c.name, None)
            self._remove(c, retire)
        else:
            self._release(c)
        if out.retryable:
            self.owner._result(t, out.status, exit_code=out.exit_code, message=out.message, retryable=True)
        else:
            self.owner._result(t, out.status, exit_code=out.exit_code, message=out.message,
                               started_at=started, finished_at=finished)

    def _kill_requested(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return key in self._kills

    # -- containers -----------------------------------------------------------------------------
    def _acquire(self, spec: TaskSpec) -> WarmContainer:
        spec = self.owner.with_limits(spec)  # a resize since the task was handed over
        key = self.key_of(spec)
        while True:
            with self._lock:
                idle = [c for c in self._containers.values() if c.key == key and not c.busy]
                if not idle:
                    break
                c = max(idle, key=lambda c: c.idle_since)  # the warmest
                if c.slot.usable():
                    c.busy = True
                    return c
                del self._containers[c.name]  # it stopped while idle (a dockerd restart, say)
            self._remove(c, "it stopped, or its pipe holds words nobody asked for")
        with self._lock:
            name = f"flowd-warm-{spec.run_id}-{spec.process}-{secrets.token_hex(4)}"
            self._creating.add(name)
        try:
            self.owner.make_room()
            c = self._create(spec, key, name)
            with self._lock:
                self._containers[c.name] = c
        finally:
            with self._lock:
                self._creating.discard(name)
        self._ensure_idle_thread()
        return c

    def key_of(self, spec: TaskSpec) -> PoolKey:
        s = self.owner.settings
        return PoolKey(spec.run_id, spec.process, spec.image, spec.user, tuple(spec.group_add),
                       spec.memory, spec.cpus, spec.network, spec.pids_limit, tuple(s.cap_add),
                       s.warm_read_only)

    def _create(self, spec: TaskSpec, key: PoolKey, name: str) -> WarmContainer:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        slot = WarmSlot(os.path.join(self.root, name), shared=bool(spec.group_add))
        c = WarmContainer(key, name, slot, started_at=time.time())
        try:
            slot.create()
            self.link.ensure_image(spec.image)
            labels = {LABEL_SPOOL: self.owner._spool(spec), LABEL_POOL: "warm",
                      LABEL_RUN: spec.run_id, LABEL_PROCESS: spec.process}
            kwargs = self.link.call(
                warm_create_args, self.link.api, spec, name=name, slot=slot, labels=labels,
                cap_add=list(key.cap_add), security_opt=self.owner.security_opt,
                log_limit=self.owner.log_limit, read_only=key.read_only)
            c.cid = self.link.call(self.link.api.create_container, **kwargs)["Id"]
            self.link.call(self.link.api.start, c.cid)
            self._wait_ready(c)
            return c
        except BaseException:
            self._remove(c, "it did not start")
            raise

    def _wait_ready(self, c: WarmContainer) -> None:
        slot = c.slot
        end = time.monotonic() + READY_TIMEOUT
        buf = b""
        poller = select.poll()
        poller.register(slot.out_r, select.POLLIN)
        while time.monotonic() < end:
            if poller.poll(500):
                data = slot.read(slot.out_r, MAX_LINE)
                if data == b"":
                    break  # the agent is gone
                buf += data or b""
                if b"\n" in buf:
                    line, _, rest = buf.partition(b"\n")
                    if is_ready(line.decode("ascii", "replace")) and not rest:
                        info = self.link.call(self.link.api.inspect_container, c.cid)
                        slot.find_cgroup(int((info.get("State") or {}).get("Pid") or 0))
                        if slot.procs_path is None:
                            log.warning("warm container %s: its cgroup was not found on the host; "
                                        "processes left behind are found by its agent only", c.name)
                        return
                    break
                if len(buf) > MAX_LINE:
                    break
            elif (self.link.state(c.cid).get("Status") or "") not in ("running", "created"):
                break
        try:
            tail = self.link.call(self.link.api.logs, c.cid, stdout=True, stderr=True, tail=5)
            why = tail.decode("utf-8", "replace").strip()[-300:]
        except FlowError:
            why = ""
        raise FlowError("its agent did not start" + (f": {why}" if why else
                        " (the image needs /bin/sh)"))

    def _release(self, c: WarmContainer) -> None:
        with self._lock:
            c.busy = False
            c.idle_since = time.monotonic()

    def _kill_now(self, c: WarmContainer) -> None:
        try:
            self.link.kill_container(c.cid)
            self.link.call(self.link.api.wait, c.cid, timeout=30)
        except FlowError as e:
            log.warning("warm container %s: could not stop it: %s", c.name, e)

    def _remove(self, c: WarmContainer, why: str) -> None:
        log.debug("warm container %s retired: %s", c.name, why)
        if c.cid:
            self.link.quiet_remove(c.cid)
        c.slot.close()
        problems = remove_tree(c.slot.root)
        if problems:
            log.warning("warm container %s: its folder could not be deleted: %s", c.name, problems[0])

    # -- idle containers ---------------------------------------------------------------------------
    def _ensure_idle_thread(self) -> None:
        with self._lock:
            if self._idle_thread is not None:
                return
            self._idle_thread = threading.Thread(target=self._idle_loop, name="flowd-warm-idle",
                                                 daemon=True)
        self._idle_thread.start()

    def _idle_loop(self) -> None:
        while not self._closed.wait(min(5.0, max(0.5, self.owner.settings.warm_idle / 4))):
            self.retire_idle(time.monotonic())

    def retire_idle(self, now: float) -> None:
        limit = self.owner.settings.warm_idle
        with self._lock:
            victims = [c for c in self._containers.values()
                       if not c.busy and (now - c.idle_since >= limit or not c.slot.usable())]
            for c in victims:
                del self._containers[c.name]
        for c in victims:
            self._remove(c, "idle")
