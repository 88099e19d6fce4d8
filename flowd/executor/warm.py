"""The warm pool: ``container="warm"`` tasks run one at a time in kept containers.

A warm container serves one process of one run (as an OpenWhisk container
serves one action), with one set of settings: the pool's key is the run,
the process, and the image, user, memory, cpus, network, pids limit and
capabilities of its tasks. Its resident agent and its host folder (the
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
from dataclasses import dataclass, field

from ..errors import EngineUnavailable, FlowError
from ..reaper import remove_tree
from .base import DAMAGED, ERROR, EXITED, KILLED, MISSING, OOM, TaskSpec, check_inputs
from .container import LABEL_POOL, LABEL_PROCESS, LABEL_RUN, LABEL_SPOOL
from .dockerlogs import LogSink
from .dockerspec import outcome, warm_create_args
from .warmagent import MAX_LINE, WarmSlot, env_file, is_ready, parse_done

log = logging.getLogger("flowd.executor.warm")

READY_TIMEOUT = 30.0  # seconds a new container has to say "ready"
POLL = 0.2  # seconds between checks for a kill while a task runs
_EXPECTED_PROCESSES = 2  # the engine's init and the agent


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
    busy: bool = True
    idle_since: float = 0.0
    task: tuple[str, str] | None = None  # (run, task) it runs now


@dataclass(eq=False)
class _Outcome:
    status: str
    exit_code: int | None = None
    message: str = ""
    retire: str = ""  # why the container goes ("" : it may serve again)
    retryable: bool = False
    fields: dict = field(default_factory=dict)


class WarmPool:
    """``owner`` is the DockerExecutor: its link, settings, ``_result`` and capacity."""

    def __init__(self, owner, root: str):
        self.owner = owner
        self.root = root  # SPOOL/pool: one slot folder per container
        self._lock = threading.Lock()
        self._containers: dict[str, WarmContainer] = {}
        self._creating: set[str] = set()  # names of containers being started (counted, kept by sweep)
        self._kills: set[tuple[str, str]] = set()
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
        """Ask the task's thread to stop it (it retires the container); False: not a warm task here."""
        with self._lock:
            running = any(c.task == key for c in self._containers.values())
            self._kills.add(key)
        return running

    def forget_kill(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._kills.discard(key)

    def adopt(self, t) -> None:
        """A warm task in flight when flowd stopped: not taken back (see the module docstring)."""
        self.owner._result(t, MISSING, message="a warm container is not taken back after a "
                                              "restart; the task runs again")

    def close(self) -> None:
        self._closed.set()

    def retire_all(self, why: str) -> None:
        with self._lock:
            victims = [c for c in self._containers.values() if not c.busy]
            for c in victims:
                del self._containers[c.name]
        for c in victims:
            self._remove(c, why)

    def leftover_slots(self, keep: set[str]) -> None:
        """Delete slot folders of containers this pool does not know (an earlier daemon's)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
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
        try:
            out = self._run_on(c, spec)
        except OSError as e:
            out = _Outcome(ERROR, message=f"warm container: {e.strerror or e}", retire="host error",
                           retryable=True)
        finished = time.time()
        with self._lock:
            c.task = None
            self._kills.discard(spec.key)
        if out.retire:
            with self._lock:
                self._containers.pop(c.name, None)
            self._remove(c, out.retire)
        else:
            self._release(c)
        if out.retryable:
            self.owner._result(t, out.status, exit_code=out.exit_code, message=out.message, retryable=True)
        else:
            self.owner._result(t, out.status, exit_code=out.exit_code, message=out.message,
                               started_at=started, finished_at=finished)

    def _run_on(self, c: WarmContainer, spec: TaskSpec) -> _Outcome:
        slot = c.slot
        if slot.read(slot.out_r, MAX_LINE) is not None:  # words nobody asked for: a forger's
            return _Outcome(ERROR, message="the warm container said something out of turn; "
                                           "it was retired", retire="protocol", retryable=True)
        slot.put_inputs(spec)
        c.seq += 1
        slot.write_ctl("env", env_file(spec.env))
        slot.write_ctl("task", f"seq={c.seq}\n".encode())
        slot.reopen_log()
        sink = LogSink(spec.log_path, self.owner.log_limit) if spec.log_path else None
        deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
        timed_out = killed = False
        answer = None
        poller = select.poll()
        poller.register(slot.out_r, select.POLLIN)
        poller.register(slot.log_r, select.POLLIN)
        log_open = True
        buf = b""
        slot.wake()
        try:
            while answer is None:
                if self._kill_requested(spec.key):
                    killed = True
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                wait = POLL if deadline is None else max(0.0, min(POLL, deadline - time.monotonic()))
                for fd, ev in poller.poll(wait * 1000):
                    if fd == slot.log_r:
                        data = slot.read(slot.log_r)
                        if data:
                            if sink is not None:
                                sink.write(data)
                        elif data == b"" and ev & select.POLLHUP:
                            poller.unregister(slot.log_r)  # this task's writers are all gone
                            log_open = False
                    elif fd == slot.out_r:
                        data = slot.read(slot.out_r, MAX_LINE)
                        if data is None:
                            continue
                        if data == b"":  # the agent is gone: the container stopped
                            return self._stopped(c, spec, sink, killed=False)
                        buf += data
                        if b"\n" in buf or len(buf) > MAX_LINE:
                            answer = buf
            if answer is None:  # a kill or the timeout: the container goes with its task
                return self._stopped(c, spec, sink, killed=killed, timed_out=timed_out)
            if log_open:
                self._drain(slot, sink)
            line, _, rest = answer.partition(b"\n")
            done = parse_done(line.decode("ascii", "replace"), c.seq)
            if done is None or rest:
                log.warning("bad answer %r (seq %d)", answer, c.seq)
                self._kill_now(c)
                note = sink.finish() if sink is not None else ""
                sink = None
                return _Outcome(ERROR, message="the warm container's answer was not the one "
                                               "expected; it was retired" + note, retire="protocol",
                                retryable=True)
            code, _killed, oom = done
            left = self._left_behind(slot)
            if left:
                self._kill_now(c)  # before its outputs are touched: nothing writes behind us
            status, message, _ = outcome(spec, {"ExitCode": code}, killed=False, timed_out=False,
                                         engine_lost=False, oom_marked=lambda: oom)
            if sink is not None:
                message += sink.finish()
                sink = None
            if status == EXITED and code == 0:
                slot.take_outputs(spec)
                problems = slot.empty()
                retire = (f"{left} process(es) of the task were left behind" if left
                          else "its folders could not be emptied: " + "; ".join(problems[:3]) if problems
                          else "it ran its warm_tasks tasks" if self._worn(c) else "")
                return _Outcome(status, code, message, retire=retire)
            return _Outcome(status, code, message, retire="the task failed" if status != OOM else "OOM")
        finally:
            if sink is not None:
                sink.close()

    def _stopped(self, c: WarmContainer, spec: TaskSpec, sink, *, killed: bool,
                 timed_out: bool = False) -> _Outcome:
        """The task ends with its container: a kill, a timeout, or it stopped by itself."""
        stopped_by_us = killed or timed_out
        if stopped_by_us:
            self._kill_now(c)
        try:
            state = self.link.state(c.cid)
        except EngineUnavailable as e:
            if sink is not None:
                sink.finish()
            return _Outcome(ERROR, message=f"engine unavailable: {e}", retire="engine", retryable=True)
        except FlowError:
            state = {}
        if sink is not None:
            self._drain(c.slot, sink)
        status, message, retryable = outcome(
            spec, {"ExitCode": state.get("ExitCode", 137), "OOMKilled": state.get("OOMKilled")},
            killed=killed, timed_out=timed_out, engine_lost=False, oom_marked=lambda: False)
        if not stopped_by_us and status == EXITED:
            message = f"the warm container stopped during the task ({message})"
        note = sink.finish() if sink is not None else ""
        return _Outcome(status, state.get("ExitCode"), message + note, retire="stopped",
                        retryable=retryable)

    def _drain(self, slot: WarmSlot, sink) -> None:
        while True:
            data = slot.read(slot.log_r)
            if not data:
                return
            if sink is not None:
                sink.write(data)

    def _left_behind(self, slot: WarmSlot) -> int:
        """Processes other than init and the agent, counted on the host (a few tries:
        killed processes take a moment to go)."""
        for _ in range(20):
            n = slot.processes()
            if n is None or n <= _EXPECTED_PROCESSES:
                return 0
            time.sleep(0.005)
        return n - _EXPECTED_PROCESSES

    def _worn(self, c: WarmContainer) -> bool:
        limit = self.owner.settings.warm_tasks
        return bool(limit) and c.seq >= limit

    def _kill_requested(self, key: tuple[str, str]) -> bool:
        with self._lock:
            return key in self._kills

    # -- containers -----------------------------------------------------------------------------
    def _acquire(self, spec: TaskSpec) -> WarmContainer:
        key = self.key_of(spec)
        with self._lock:
            idle = [c for c in self._containers.values() if c.key == key and not c.busy]
            if idle:
                c = max(idle, key=lambda c: c.idle_since)  # the warmest
                c.busy = True
                return c
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
        c = WarmContainer(key, name, slot)
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
            victims = [c for c in self._containers.values() if not c.busy and now - c.idle_since >= limit]
            for c in victims:
                del self._containers[c.name]
        for c in victims:
            self._remove(c, "idle")
