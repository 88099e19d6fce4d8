"""One task on a warm container: send it, follow it, read its end (flowd.executor.warm).

The pool (``flowd.executor.warm.WarmPool``) takes a container for the task
and decides what becomes of the container; this module does the task
itself: its inputs into the slot, the wake-up, its log as it comes, the
agent's answer, the host's count of the container's processes, and the
declared outputs into the task's ``work/`` folder. The result is an
``Outcome``: what to report and whether the container must be retired.
"""
from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import EngineUnavailable, FlowError
from .base import ERROR, EXITED, OOM, TaskSpec
from .dockerlogs import LogSink
from .dockerspec import outcome
from .warmagent import MAX_LINE, WarmSlot, env_file, parse_done

if TYPE_CHECKING:
    from .warm import WarmContainer

log = logging.getLogger("flowd.executor.warm")

POLL = 0.2  # seconds between checks for a kill while a task runs
ENGINE_WATCH = 5.0  # seconds a container that stopped under its task waits to see the engine go
_EXPECTED_PROCESSES = 2  # the engine's init and the agent


@dataclass(eq=False)
class Outcome:
    status: str
    exit_code: int | None = None
    message: str = ""
    retire: str = ""  # why the container goes ("" : it may serve again)
    retryable: bool = False
    fields: dict = field(default_factory=dict)


class WarmTaskRun:
    """``pool`` is the WarmPool: its link, owner (settings, log limit) and kill requests."""

    def __init__(self, pool):
        self.pool = pool

    def run_on(self, c: WarmContainer, spec: TaskSpec) -> Outcome:
        slot = c.slot
        slot.put_inputs(spec)
        c.seq += 1
        slot.write_ctl("env", env_file(spec.env))
        slot.write_ctl("task", f"seq={c.seq}\n".encode())
        slot.reopen_log()
        sink = LogSink(spec.log_path, self.pool.owner.log_limit) if spec.log_path else None
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
                if self.pool._kill_requested(spec.key):
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
                # Only the task's own processes could have written it (the agent
                # answers once): the script's doing, so the task fails, and counts
                # against its retries (never the same attempt again and again).
                log.warning("warm container %s: answer %r for task %d is not the one expected",
                            c.name, answer[:MAX_LINE], c.seq)
                self.pool._kill_now(c)
                note = sink.finish() if sink is not None else ""
                sink = None
                return Outcome(ERROR, message="the task wrote to flowd's control pipe "
                                              "(/.flowd/ctl/out) and broke the warm container's "
                                              "protocol; the container was retired" + note,
                               retire="protocol")
            code, _killed, oom = done
            left = self._left_behind(slot)
            if left:
                self.pool._kill_now(c)  # before its outputs are touched: nothing writes behind us
            status, message, _ = outcome(spec, {"ExitCode": code}, killed=False, timed_out=False,
                                         engine_lost=False, oom_marked=lambda: oom)
            if sink is not None:
                message += sink.finish()
                sink = None
            if status == EXITED and code == 0:
                slot.take_outputs(spec)  # all it left: a hard link is then seen as one, as for fresh
                problems = slot.empty()
                retire = (f"{left} process(es) of the task were left behind" if left
                          else "its folders could not be emptied: " + "; ".join(problems[:3]) if problems
                          else "it ran its warm_tasks tasks" if self._worn(c) else "")
                return Outcome(status, code, message, retire=retire)
            return Outcome(status, code, message, retire="the task failed" if status != OOM else "OOM")
        finally:
            if sink is not None:
                sink.close()

    def _stopped(self, c: WarmContainer, spec: TaskSpec, sink, *, killed: bool,
                 timed_out: bool = False) -> Outcome:
        """The task ends with its container: a kill, a timeout, or it stopped by itself."""
        stopped_by_us = killed or timed_out
        if stopped_by_us:
            self.pool._kill_now(c)
        try:
            state = self.pool.link.state(c.cid)
        except EngineUnavailable as e:
            if sink is not None:
                sink.finish()
            return Outcome(ERROR, message=f"engine unavailable: {e}", retire="engine", retryable=True)
        except FlowError:
            state = {}
        if sink is not None:
            self._drain(c.slot, sink)
        code = state.get("ExitCode", 137)
        # Stopped by the engine (a dockerd stop or restart stops every container
        # without live-restore; an operator's docker kill): not the script's
        # failure, run it again. A script cannot make the engine log a kill; but
        # a restarted engine has forgotten its events, and the agent may die
        # while the old one still answers: so a first stop nothing explains is
        # also taken as the engine's (once per attempt: a script that stops its
        # container each time then fails, as it should, and never loops).
        engine_lost = (not stopped_by_us and not state.get("OOMKilled")
                       and (self._engine_killed(c) or self.pool.first_unexplained_stop(spec)))
        if engine_lost:  # whatever its exit status (the agent may exit 0 on the engine's SIGTERM)
            note = sink.finish() if sink is not None else ""
            return Outcome(ERROR, code, f"engine unavailable: the engine stopped the warm container "
                                        f"(exit status {code}){note}", retire="engine", retryable=True)
        status, message, retryable = outcome(
            spec, {"ExitCode": code, "OOMKilled": state.get("OOMKilled")},
            killed=killed, timed_out=timed_out, engine_lost=False, oom_marked=lambda: False)
        if not stopped_by_us and status == EXITED:
            # never a success, whatever its exit status: the task did not end in it
            status, message = ERROR, f"the warm container stopped during the task ({message})"
        note = sink.finish() if sink is not None else ""
        return Outcome(status, state.get("ExitCode"), message + note, retire="stopped",
                        retryable=retryable)

    def _engine_killed(self, c: WarmContainer) -> bool:
        """Did the engine itself stop the container? It is going away (a dockerd
        stop or restart kills its containers, and may still answer a moment:
        watched for ENGINE_WATCH seconds), or it logged a "kill" event for it."""
        link = self.pool.link
        end = time.monotonic() + ENGINE_WATCH
        try:
            while time.monotonic() < end:
                link.call(link.api.ping)
                time.sleep(0.25)
        except EngineUnavailable:
            return True
        except FlowError:
            pass
        try:
            events = link.call(link.api.events, since=int(c.started_at), until=int(time.time()) + 1,
                               filters={"container": c.cid, "event": "kill"}, decode=True)
            return any(True for _ in link.iterate(events))
        except EngineUnavailable:
            return True  # the engine is going away: that is what stopped it
        except FlowError:
            return False

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
        limit = self.pool.owner.settings.warm_tasks
        return bool(limit) and c.seq >= limit
