"""The flowd daemon: one loop over the control socket, executor reports and timers.

The loop never blocks on a long operation and never sleep-polls: it waits on
the control socket and on a wake-up pipe that executor threads and signal
handlers write to, with a timeout set by the next timer (``step`` returns
it). Signals are recorded by their handlers and acted on in the loop.

The rooms: flowd/control.py (the socket and its callers), flowd/commands/
(the command table and its handlers), flowd/creation.py (making runs),
flowd/staging.py (uploads and pushes), flowd/waiters.py (``status --wait``),
flowd/disk.py (the free-space floor), flowd/reload.py (SIGHUP). This module
starts them, runs the loop (``step``) and stops them.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import queue
import re
import signal
import time
from typing import Callable

from . import __version__
from . import commands
from .cache import Cache
from .protocol import socket_path
from .commands import runs as run_commands
from .commands.events import answer_events
from .config import Config
from .control import Control
from .creation import Creator, _Creation
from .disk import DISK_CHECK_EVERY, Disk
from .events import Hub
from .errors import AlreadyRunning, DiskFull, StorageError, UsageError
from .executor import base as X
from .fsops import Durable
from .metrics import serve_metrics
from .reaper import Reaper
from .intake import Intake
from .notify import Notifier
from .offloop import OffLoop
from .reload import reload
from .removal import Removal
from .run import UNFINISHED, Run
from .taskspec import Limits
from .staging import UPLOAD_MAX_AGE, Staging
from .textsafe import for_log
from .waiters import MAX_WAITERS, WAITERS_PER_PEER, Waiters

log = logging.getLogger("flowd")

STATUS_EVERY = 10.0
# Containers and Swarm jobs of the spool that no run knows (a remove that failed,
# Moby #42789's job containers) are swept at start and this often.
SWEEP_EVERY = 600.0
COLLECT_THREADS = 2  # collects off the loop at once (a split's: flowd/run.py _collect_off_loop)
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")


class Daemon:
    def __init__(self, cfg: Config, executor_factory: Callable[[X.Report], X.Executor] | None = None):
        self.cfg = cfg
        self.spool = os.path.realpath(cfg.spool)
        self.runs_dir = os.path.join(self.spool, "runs")
        self.uploads_dir = os.path.join(self.spool, "uploads")
        self.socket_path = os.path.abspath(socket_path(cfg.socket))  # "ipc://PATH" is PATH too
        self.fs = Durable()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.runs: dict[str, Run] = {}
        self.waiters = Waiters(WAITERS_PER_PEER, MAX_WAITERS)  # status --wait requests
        self.hub = Hub()  # the live event stream and the metrics' counters (flowd/events.py)
        self.metrics_http = None  # config metrics_listen's server (flowd/metrics.py)
        self.staging = Staging(self.uploads_dir, self.fs, max_age=UPLOAD_MAX_AGE)  # uploads and pushes
        self.creating: dict[str, _Creation] = {}  # runs whose folders are being made
        self.creator = Creator(self)
        self.removal = Removal(self)  # flowctl rm --force and keep_finished (flowd/removal.py)
        self.disk = Disk(self)
        self.control = Control(self.socket_path, cfg.socket_mode)
        self.engine_up = True
        self.engine_message = ""
        self.stop_requested = False
        self.reload_requested = False  # SIGHUP: acted on in the loop
        self.notifier = Notifier()
        self._executor_factory = executor_factory
        self._locks: list[int] = []  # the spool's and the socket's lock files, held open
        self._signals = False  # handlers installed (prepare)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.executor: X.Executor | None = None
        self.cache: Cache | None = None  # process@cache="yes" (flowd/cache.py), opened in prepare
        self.intake: Intake | None = None
        # Collects that may be long (a split of millions of lines), off the loop.
        self.worker = OffLoop(COLLECT_THREADS, "flowd-collect", self.report)
        self.limits = Limits(pids_limit=cfg.pids_limit, max_output_bytes=cfg.max_output_size,
                             max_split_items=cfg.max_split_lines,
                             default_memory=cfg.memory_for_unset, reserved_memory=cfg.default_memory,
                             default_timeout=cfg.max_timeout,
                             container_user=cfg.container_user, spool=self.spool,
                             default_container=cfg.default_container)
        self._more = False  # a tick ran out of time with work left
        self._next_status = self._next_watchdog = self._next_disk = self._next_sweep = 0.0

    # -- start-up ----------------------------------------------------------
    def _prepare_spool(self) -> None:
        for d, mode in self._spool_modes():
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create spool folder {d}: {e.strerror}") from None
            try:
                if os.stat(d).st_mode & 0o7777 != mode:
                    os.chmod(d, mode)  # created by flowd, or made by hand, or by an older flowd
            except OSError as e:
                log.warning("spool folder %s should have mode %04o and cannot be given it (%s); "
                            "fix it: chmod %04o %s", d, mode, e.strerror, mode, d)
        self._locks.append(_lock(os.path.join(self.spool, "flowd.lock"), f"spool {self.spool}"))
        sock_dir = os.path.dirname(self.socket_path)
        try:
            os.makedirs(sock_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the socket's folder {sock_dir}: {e.strerror}") from None
        self._locks.append(_lock(self.socket_path + ".lock", f"socket {self.socket_path}"))
        # renames must never cross filesystems (EXDEV is not atomic)
        for d in (self.runs_dir, self.uploads_dir, os.path.join(self.spool, "cache")):
            if os.stat(d).st_dev != os.stat(self.spool).st_dev:
                raise UsageError(f"{d} is on another filesystem than {self.spool}; "
                                 "keep the whole spool on one filesystem")

    def _spool_modes(self) -> list[tuple[str, int]]:
        """Each spool folder flowd makes, and its mode (docs/spool.md): the
        group may enter the spool and read rejected drops; it may drop into
        incoming/ (setgid: drops stay in the group; sticky: members cannot
        rename or delete each other's drops, flowd as the owner can); runs/
        and uploads/ are flowd's alone (pull results with flowctl)."""
        return [(self.spool, 0o750), (self.runs_dir, 0o700), (self.uploads_dir, 0o700),
                (os.path.join(self.spool, "cache"), 0o700),
                (os.path.join(self.spool, "incoming"), 0o3770),
                (os.path.join(self.spool, "rejected"), 0o750)]

    def _open_runs(self) -> None:
        for name in sorted(os.listdir(self.runs_dir)):
            path = os.path.join(self.runs_dir, name)
            if name.startswith(UNFINISHED):
                self.fs.rmtree(path)  # a submission the crash cut short
                continue
            if not _RUN_ID.match(name):
                continue
            try:
                run = Run.open(path, self.fs, self.executor, self.limits)
            except (OSError, ValueError, KeyError, StorageError) as e:
                log.error("run %s cannot be loaded and is left as it is: %s", name, for_log(e))
                continue
            self.runs[run.id] = run
            self.attach(run)
        self.staging.reset()  # uploads do not outlive the daemon

    def _install_signals(self) -> None:
        self._signals = True
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _on_hup(self, signum, frame) -> None:
        self.reload_requested = True

    def attach(self, run: Run) -> None:
        """What a run the daemon holds uses of it: the event hub, the cache, the worker."""
        run.hub, run.cache, run.worker = self.hub, self.cache, self.worker

    def report(self, event: object) -> None:
        """Called by executor threads: queue the event and wake the loop."""
        self.events.put(event)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    # -- the loop ----------------------------------------------------------
    def serve(self) -> int:
        self.prepare()
        try:
            deadline = time.monotonic()
            while not self.stop_requested:
                self.control.wait(max(0, math.ceil((deadline - time.monotonic()) * 1000)))
                now = time.monotonic()
                deadline = self.step(now)
                self.hub.metrics.loop_took(time.monotonic() - now)
        finally:
            self.close()
        return 0

    def prepare(self, signals: bool = True) -> None:
        """Everything before the loop: spool, executor, recovery, socket, intake.
        ``signals=False`` (tests in-process) leaves the signal handlers alone."""
        self._prepare_spool()
        self.metrics_http = serve_metrics(self)  # config metrics_listen (None when empty), before any thread
        # Folders out of the protocol (retired tasks, old work/) are deleted off
        # the loop, in SPOOL/trash/; what a script made undeletable stays there.
        self.fs.reaper = Reaper(os.path.join(self.spool, "trash"))
        self.fs.reaper.start()
        # What a killed flowd wrote but never fsynced is still in the page cache:
        # make it durable before recovery trusts it (Durable.sync_all).
        self.fs.sync_all(self.spool)
        if self._executor_factory is None and self.cfg.executor == "swarm":
            from .executor.swarm import SwarmExecutor

            self.executor = SwarmExecutor(self.report, spool=self.spool, settings=self.cfg.executor_settings(),
                                          probe_image=self.cfg.swarm_probe_image)
            log.warning("executor swarm: every task runs on the engine's bridge network, whatever its "
                        "network= (a Swarm service cannot run without one), and without "
                        "no-new-privileges unless each node's daemon.json sets it; see "
                        "/usr/share/doc/flowd/operations.md, \"Running on a cluster\"")
        elif self._executor_factory is None:
            from .executor.docker import DockerExecutor

            self.executor = DockerExecutor(self.report, spool=self.spool, settings=self.cfg.executor_settings(),
                                           pool_dir=os.path.join(self.spool, "pool"))
        else:
            self.executor = self._executor_factory(self.report)
        self.cache = Cache(os.path.join(self.spool, "cache"), self.fs, self.cfg.cache_max_size,
                           report=self.report)
        self.cache.open()  # an entry a crash cut short goes; cache_max_size is kept
        t0 = time.monotonic()
        self._open_runs()
        self.intake = Intake(self.spool, self.creator.submit_bundle, fs=self.fs,
                             run_ids=self.creator.ids)  # SPOOL/incoming/ drops
        self.control.bind(self.cfg.socket_gid())
        if signals:
            self._install_signals()
        for run in self.runs.values():
            if not run.finished:
                run.resume()
        self.removal.start()  # leftovers of a deletion, forced deletions due, keep_finished
        self._sweep()
        self._more = self._tick_runs()
        active = sum(1 for r in self.runs.values() if not r.finished)
        log.info("recovered %d runs (%d active) in %.3fs", len(self.runs), active,
                 time.monotonic() - t0)
        log.info("flowd %s ready: spool %s, socket %s, %d runs", __version__, self.spool,
                 self.socket_path, len(self.runs))
        self.notifier.ready(self.status_line())
        self.control.watch(self._wake_r)
        self.intake.start(time.monotonic())  # takes back staging/, rescans incoming/
        if self.intake.fileno() is not None:
            self.control.watch(self.intake.fileno())
        self._next_status = self._next_watchdog = self._next_disk = time.monotonic()
        self._next_sweep = time.monotonic() + SWEEP_EVERY

    def _sweep(self) -> None:
        """Remove the spool's containers and jobs that no run's task is running
        (the executor spares what it started meanwhile)."""
        keep: set[tuple[str, str]] = set()
        for run in self.runs.values():
            keep |= run.keep()
        self.executor.sweep(self.spool, keep)

    def step(self, now: float) -> float:
        """One turn of the loop, never blocking; returns when the next one is
        due (monotonic seconds; ``now`` or earlier: at once)."""
        _drain(self._wake_r)
        self.control.serve(self._dispatch)
        self._drain_events()
        self.intake.poll(now, take=self.disk.ok)  # drops wait in incoming/ while the spool is full
        if self.reload_requested:
            self.reload_requested = False
            reload(self)
        if now >= self._next_disk:
            self.disk.check()
            self._next_disk = now + DISK_CHECK_EVERY
        if now >= self._next_sweep:
            self._sweep()
            self._next_sweep = now + SWEEP_EVERY
        self._more = self._tick_runs()
        self.removal.step(now)  # before the waiters: a deleted run's are answered now
        if self.waiters:
            run_commands.answer_waiters(self, now)
        if self.hub.subs:
            answer_events(self, now)
        if self.staging.open and now >= self.staging.next_deadline():
            for up in self.staging.expire(now):
                log.info("%s %s of uid %s expired after %.0f s, unfinished (%d bytes "
                         "received)", up.kind, up.id, up.uid, now - up.created, up.received)
        if now >= self._next_status:
            self.notifier.status(self.status_line())
            self._next_status = now + STATUS_EVERY
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        return self.next_deadline(now)

    def next_deadline(self, now: float) -> float:
        if self._more:
            return now  # a tick ran out of time: serve the socket, then go on
        deadlines = [self._next_status, self._next_disk, self._next_sweep, self.intake.next_deadline()]
        if self.notifier.watchdog_interval:
            deadlines.append(self._next_watchdog)
        if self.waiters:
            deadlines.append(self.waiters.next_deadline())
        if self.hub.subs:
            deadlines.append(self.hub.next_deadline())
        if self.staging.open:
            deadlines.append(self.staging.next_deadline())
        return min(deadlines)

    def _dispatch(self, peer: bytes, req_id: str, cmd: str, args: dict, payload: bytes | None):
        return commands.dispatch(self, peer, req_id, cmd, args, payload)

    def close(self) -> None:
        if self.intake is not None:
            self.intake.close()
        self._shutdown()

    def _shutdown(self) -> None:
        self.notifier.stopping("stopping; containers keep running")
        log.info("stopping: containers keep running and are taken back at the next start")
        if self.fs.reaper is not None:
            self.fs.reaper.close()
        if self.executor is not None:
            self.executor.close()
        if self.cache is not None:
            self.cache.close()
        self.worker.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        self.control.close()
        if self._signals:
            signal.set_wakeup_fd(-1)
        for fd in self._locks:
            os.close(fd)

    def _drain_events(self) -> None:
        results: dict[str, list[X.TaskResult]] = {}  # run -> its results, in order
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(ev, _Creation):
                self.creator._created(ev)
            elif isinstance(ev, X.TaskResult):
                results.setdefault(ev.run_id, []).append(ev)
            elif callable(ev):  # work a thread hands to the loop (a resize's, a cache lookup's or a collect's answer)
                try:
                    ev()
                except DiskFull as e:  # a cache hit or a collect that met a full disk: it waits
                    log.error("%s; the task waits for free space", for_log(e))
                    self.disk.defer(ev)
                except Exception:  # noqa: BLE001 - one handler's bug must not stop the loop
                    log.exception("a loop callback failed")
            elif isinstance(ev, X.EngineState):
                was = self.engine_up
                self.engine_up = ev.up
                self.engine_message = ev.message
                if ev.up and not was:
                    log.info("container engine is back")
                    for run in self.runs.values():
                        if not run.finished:
                            run.engine_back()
                elif not ev.up and was:
                    log.warning("container engine unavailable: %s", for_log(ev.message))
                self.notifier.status(self.status_line())
        # A run's results that came in together are committed together (group commit).
        for run_id, batch in results.items():
            run = self.runs.get(run_id)
            if run is None:
                continue
            try:
                run.on_results(batch)
            except DiskFull as e:
                # keep the results; they are committed once space is freed (Disk.set)
                log.error("run %s: %s; %d task result(s) wait for free space", run.id,
                          for_log(e), len(e.left))
                for ev in e.left:
                    self.disk.defer(ev)

    def _tick_runs(self) -> bool:
        """Let the runs claim and start what is ready; True if one ran out of
        time with work left (the loop then polls without waiting)."""
        self.disk.check()  # one statvfs: cheap, and no claim starts past the floor
        if not self.disk.ok:
            return False  # nothing new is claimed until space is freed
        more = False
        active = sorted((r for r in self.runs.values() if not r.finished),
                        key=lambda r: r.meta.get("submitted_at", 0))
        # (a cancelled run is finished while its containers are still being stopped: they count)
        capacity = self.cfg.container_cap - sum(r.running_containers() for r in self.runs.values())
        if not self.engine_up:
            capacity = 0
        for run in active:
            if self.engine_up and run.parked():
                run.engine_back()  # a start refused during an outage that is over
            try:
                capacity -= run.tick(max(0, capacity))
            except StorageError as e:
                log.error("run %s: %s", run.id, for_log(e))
            more = more or run.more
        return more

    def status_line(self) -> str:
        active = [r for r in self.runs.values() if not r.finished]
        running = sum(r.running_containers() for r in active)
        engine = "up" if self.engine_up else f"UNAVAILABLE ({self.engine_message})"
        disk = "" if self.disk.ok else "; DISK FULL: runs paused"
        return f"{len(active)} active runs, {running} containers; docker {engine}{disk}"

    def _new_run_id(self) -> str:
        return self.creator.new_run_id()


def _lock(path: str, what: str) -> int:
    """An exclusive lock on ``path`` holding our pid; its fd (kept open while flowd runs)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            other = os.pread(fd, 32, 0).decode().strip() or "?"
        except OSError:
            other = "?"
        os.close(fd)
        raise AlreadyRunning(f"another flowd (pid {other}) is already using the {what}; "
                             "stop it first, or give this one its own --spool and --socket") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

