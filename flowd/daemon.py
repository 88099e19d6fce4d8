"""The flowd daemon: one loop over the control socket, executor reports and timers.

The loop never blocks on a long operation and never sleep-polls: it waits in
``zmq.Poller.poll`` on the ROUTER socket and on a wake-up pipe that executor
threads and signal handlers write to, with a timeout set by the next timer.
Signals are recorded by their handlers and acted on in the loop.
"""
from __future__ import annotations

import fcntl
import heapq
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

from . import __version__
from . import protocol as P
from .config import DEFAULT_CONFIG, KEYS, Config
from . import checksum
from .errors import (AlreadyRunning, Ambiguous, Conflict, DiskFull, FlowError, NotFound, Problem,
                     ProtocolError, StorageError, UsageError, WorkflowError)
from .executor import base as X
from .fsops import Durable, Reaper
from .intake import Intake
from .notify import Notifier
from .run import Limits, Run
from .staging import PUSH_FILE, UPLOAD_MAX_AGE, Staging
from .textsafe import for_log

log = logging.getLogger("flowd")

STATUS_EVERY = 10.0
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")
RUN_ID_TRIES = 64  # random ids tried for a unique 4-digit prefix before any unique id will do
WAITERS_PER_PEER = 16  # status --wait requests one client may have waiting
MAX_WAITERS = 4096  # all clients together


class Daemon:
    def __init__(self, cfg: Config, executor_factory: Callable[[X.Report], X.Executor] | None = None):
        self.cfg = cfg
        self.spool = os.path.realpath(cfg.spool)
        self.runs_dir = os.path.join(self.spool, "runs")
        self.uploads_dir = os.path.join(self.spool, "uploads")
        self.socket_path = os.path.abspath(cfg.socket)
        self.fs = Durable()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.runs: dict[str, Run] = {}
        self.waiters = _Waiters(WAITERS_PER_PEER, MAX_WAITERS)  # status --wait requests
        self.staging = Staging(self.uploads_dir, max_age=UPLOAD_MAX_AGE)  # uploads and pushes
        self.creating: dict[str, _Creation] = {}  # runs whose folders are being made
        self.engine_up = True
        self.engine_message = ""
        self.disk_ok = True
        self.disk_free = 0
        self.deferred: list[object] = []  # results that could not be committed: disk full
        self.stop_requested = False
        self._hup = False
        self.notifier = Notifier()
        self._executor_factory = executor_factory
        self._locks: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.executor: X.Executor | None = None
        self.limits = Limits(pids_limit=cfg.pids_limit, max_output_bytes=cfg.max_output_size,
                             default_memory=cfg.memory_for_unset, default_timeout=cfg.max_timeout,
                             container_user=cfg.container_user, spool=self.spool)

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
        self._lock(os.path.join(self.spool, "flowd.lock"), f"spool {self.spool}")
        sock_dir = os.path.dirname(self.socket_path)
        try:
            os.makedirs(sock_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the socket's folder {sock_dir}: {e.strerror}") from None
        self._lock(self.socket_path + ".lock", f"socket {self.socket_path}")
        # renames must never cross filesystems (EXDEV is not atomic)
        for d in (self.runs_dir, self.uploads_dir):
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
                (os.path.join(self.spool, "incoming"), 0o3770),
                (os.path.join(self.spool, "rejected"), 0o750)]

    def _lock(self, path: str, what: str) -> None:
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
        self._locks.append(fd)

    def _open_runs(self) -> None:
        for name in sorted(os.listdir(self.runs_dir)):
            path = os.path.join(self.runs_dir, name)
            if name.startswith(".new-"):
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
        self.staging.reset()  # uploads do not outlive the daemon

    def _bind(self) -> None:
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        try:
            os.unlink(self.socket_path)  # ours: we hold its lock
        except FileNotFoundError:
            pass
        old = os.umask(0o777 & ~self.cfg.socket_mode)
        try:
            sock.bind(P.endpoint(self.socket_path))
        except zmq.ZMQError as e:
            raise UsageError(f"cannot bind the control socket {self.socket_path}: {e}") from None
        finally:
            os.umask(old)
        os.chmod(self.socket_path, self.cfg.socket_mode)
        gid = self.cfg.socket_gid()
        if gid is not None and gid != os.getegid():  # ours already: no chown needed
            os.chown(self.socket_path, -1, gid)
        self.sock = sock

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_requested = True

    def _on_hup(self, signum, frame) -> None:
        self._hup = True

    def report(self, event: object) -> None:
        """Called by executor threads: queue the event and wake the loop."""
        self.events.put(event)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    # -- the loop ----------------------------------------------------------
    def serve(self) -> int:
        self._prepare_spool()
        # Folders out of the protocol (retired tasks, old work/) are deleted off
        # the loop, in SPOOL/trash/; what a script made undeletable stays there.
        self.fs.reaper = Reaper(os.path.join(self.spool, "trash"))
        self.fs.reaper.start()
        # What a killed flowd wrote but never fsynced is still in the page cache:
        # make it durable before recovery trusts it (Durable.sync_all).
        self.fs.sync_all(self.spool)
        if self._executor_factory is None:
            from .executor.docker import DockerExecutor

            self.executor = DockerExecutor(self.report, spool=self.spool, cap_add=self.cfg.cap_add)
        else:
            self.executor = self._executor_factory(self.report)
        t0 = time.monotonic()
        self._open_runs()
        self.intake = Intake(self.spool, self.submit_bundle)  # SPOOL/incoming/ drops
        self._bind()
        self._install_signals()
        for run in self.runs.values():
            if not run.finished:
                run.resume()
        keep: set[tuple[str, str]] = set()
        for run in self.runs.values():
            keep |= run.keep()
        self.executor.sweep(self.spool, keep)
        more = self._tick_runs()
        active = sum(1 for r in self.runs.values() if not r.finished)
        log.info("recovered %d runs (%d active) in %.3fs", len(self.runs), active,
                 time.monotonic() - t0)
        log.info("flowd %s ready: spool %s, socket %s, %d runs", __version__, self.spool,
                 self.socket_path, len(self.runs))
        self.notifier.ready(self._status_line())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self.intake.start(time.monotonic())  # takes back staging/, rescans incoming/
        if self.intake.fileno() is not None:
            poller.register(self.intake.fileno(), zmq.POLLIN)
        next_status = next_watchdog = next_disk = time.monotonic()
        try:
            while not self.stop_requested:
                now = time.monotonic()
                deadlines = [next_status, next_disk]
                if self.notifier.watchdog_interval:
                    deadlines.append(next_watchdog)
                if self.waiters:
                    deadlines.append(self.waiters.next_deadline())
                if self.staging.open:
                    deadlines.append(self.staging.next_deadline())
                deadlines.append(self.intake.next_deadline())
                timeout_ms = max(0, int((min(deadlines) - now) * 1000)) + 1
                if more:
                    timeout_ms = 0  # a tick ran out of time: serve the socket, then go on
                ready = dict(poller.poll(timeout_ms))
                if self._wake_r in ready:
                    _drain(self._wake_r)
                if self.sock in ready:
                    self._serve_socket()
                self._drain_events()
                if self.disk_ok:  # drops wait in incoming/ while the spool is full
                    self.intake.poll(time.monotonic())
                if self._hup:
                    self._hup = False
                    self._reload()
                now = time.monotonic()
                if now >= next_disk:
                    self._check_disk()
                    next_disk = now + DISK_CHECK_EVERY
                more = self._tick_runs()
                now = time.monotonic()
                if self.waiters:
                    self._answer_waiters(now)
                if self.staging.open and now >= self.staging.next_deadline():
                    for up in self.staging.expire(now):
                        log.info("%s %s of uid %s expired after %.0f s, unfinished (%d bytes "
                                 "received)", up.kind, up.id, up.uid, now - up.created, up.received)
                if now >= next_status:
                    self.notifier.status(self._status_line())
                    next_status = now + STATUS_EVERY
                if self.notifier.watchdog_interval and now >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = now + self.notifier.watchdog_interval
        finally:
            self.intake.close()
            self._shutdown()
        return 0

    def _reload(self) -> None:
        """SIGHUP (``systemctl reload flowd``): re-read the config file, apply what can change live.

        Live: max_containers, pids_limit, default_memory, max_memory and
        max_timeout (their defaults for containers started, their caps for
        workflows submitted from now on), max_output_size (runs opened from now
        on), container_user and cap_add (containers started from now on),
        allowed_images and allowed_networks (workflows submitted from now on),
        max_upload_size (uploads begun from now on), min_free_space and
        log_level. spool,
        socket, socket_group and socket_mode need a restart: a change is logged,
        not applied. An invalid file changes nothing. Options given on the command
        line (--spool, --socket, --log-level) keep winning over the file.
        Runs and containers are not touched.
        """
        from .config import load

        path = self.cfg.source or DEFAULT_CONFIG
        self.notifier.send("RELOADING=1", f"STATUS=reloading {path}")
        try:
            new = load(path, required=self.cfg.source is not None)
            new.socket_gid()  # a group that does not exist would stop the next start
        except FlowError as e:
            log.error("reload: %s; the configuration in use is unchanged", e)
            self.notifier.send("READY=1", f"STATUS={self._status_line()}")
            return
        old = self.cfg
        before = {k: getattr(old, k) for k in KEYS}
        # a key whose value differs from what the file said was set on the command line
        from_file = Config()
        for key, value in old.file_values.items():
            setattr(from_file, key, value)
        pinned = {k for k in ("spool", "socket", "log_level") if getattr(old, k) != getattr(from_file, k)}
        for key in ("spool", "socket", "socket_group", "socket_mode"):
            if getattr(new, key) != getattr(from_file, key) and key not in pinned:
                log.warning("reload: %s changed in %s; it takes effect only when flowd restarts "
                            "(systemctl restart flowd; a new spool also needs ReadWritePaths=)", key, path)
        live = ("max_containers", "pids_limit", "default_memory", "max_memory", "max_timeout",
                "max_output_size", "container_user", "cap_add", "allowed_images",
                "allowed_networks", "max_upload_size", "min_free_space", "log_level")
        for key in live:
            if key not in pinned:
                setattr(old, key, getattr(new, key))
        old.file_values = new.file_values
        old.source = new.source or old.source
        self.limits.pids_limit = old.pids_limit
        self.limits.default_memory = old.memory_for_unset
        self.limits.default_timeout = old.max_timeout
        self.limits.container_user = old.container_user
        self.limits.max_output_bytes = old.max_output_size
        if self.executor is not None and hasattr(self.executor, "cap_add"):
            self.executor.cap_add = list(old.cap_add)
        logging.getLogger().setLevel(getattr(logging, old.log_level.upper()))
        changed = [k for k in live if getattr(old, k) != before[k]]
        log.info("reload: configuration re-read from %s; %s", path,
                 "changed: " + ", ".join(f"{k}={getattr(old, k)!r}" for k in changed) if changed
                 else "no live setting changed")
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")

    def _shutdown(self) -> None:
        self.notifier.stopping("stopping; containers keep running")
        log.info("stopping: containers keep running and are taken back at the next start")
        if self.fs.reaper is not None:
            self.fs.reaper.close()
        if self.executor is not None:
            self.executor.close()
        if self.sock is not None:
            self.sock.close(0)
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self.ctx is not None:
            self.ctx.term()
        signal.set_wakeup_fd(-1)
        for fd in self._locks:
            os.close(fd)

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, _Creation):
                self._created(ev)
            elif isinstance(ev, X.TaskResult):
                run = self.runs.get(ev.run_id)
                if run is None:
                    continue
                try:
                    run.on_result(ev)
                except DiskFull as e:
                    # keep the result; it is committed once space is freed (_check_disk)
                    log.error("run %s: %s; the task's result waits for free space", run.id,
                              for_log(e))
                    self.deferred.append(ev)
                    self._set_disk(False)
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
                self.notifier.status(self._status_line())

    def _free(self) -> int:
        return shutil.disk_usage(self.spool).free

    def _check_disk(self) -> None:
        free = self._free()
        self.disk_free = free
        self._set_disk(free >= self.cfg.min_free_space)

    def _set_disk(self, ok: bool) -> None:
        if ok == self.disk_ok:
            return
        self.disk_ok = ok
        if ok:
            log.info("spool has %s free again: runs resume", _mib(self.disk_free))
            for ev in self.deferred:
                self.events.put(ev)
            self.deferred = []
            self.report(None)  # wake the loop to commit what waited
        else:
            log.warning("spool %s is below its free-space floor (%s free, min_free_space %s): "
                        "runs pause, submissions and pushes are refused", self.spool,
                        _mib(self._free()), _mib(self.cfg.min_free_space))
        self.notifier.status(self._status_line())

    def _tick_runs(self) -> bool:
        """Let the runs claim and start what is ready; True if one ran out of
        time with work left (the loop then polls without waiting)."""
        self._check_disk()  # one statvfs: cheap, and no claim starts past the floor
        if not self.disk_ok:
            return False  # nothing new is claimed until space is freed
        more = False
        capacity = self.cfg.container_cap - sum(r.running_containers() for r in self.runs.values())
        if not self.engine_up:
            capacity = 0
        for run in sorted(self.runs.values(), key=lambda r: r.meta.get("submitted_at", 0)):
            if run.finished:
                continue
            if self.engine_up and run.parked():
                run.engine_back()  # a start refused during an outage that is over
            try:
                capacity -= run.tick(max(0, capacity))
            except StorageError as e:
                log.error("run %s: %s", run.id, for_log(e))
            more = more or run.more
        return more

    def _status_line(self) -> str:
        active = [r for r in self.runs.values() if not r.finished]
        running = sum(r.running_containers() for r in active)
        engine = "up" if self.engine_up else f"UNAVAILABLE ({self.engine_message})"
        disk = "" if self.disk_ok else "; DISK FULL: runs paused"
        return f"{len(active)} active runs, {running} containers; docker {engine}{disk}"

    # -- requests ------------------------------------------------------------
    def _serve_socket(self) -> None:
        for _ in range(256):  # then let the loop breathe
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 2:
                continue  # no identity: nothing to answer
            caller = _caller(parts[-1])
            frames = [p.bytes for p in parts]
            peer, body = frames[0], frames[1:]
            req_id = None
            try:
                req_id, cmd, args, payload = P.decode_request(body)
                if cmd not in _QUIET:
                    log.info("%s: %s %s", caller, cmd, _brief(args))
                args = P.check_args(cmd, args)  # every argument, before any handler runs
                args["_caller"] = caller
                reply = self._dispatch(peer, req_id, cmd, args, payload)
            except FlowError as e:
                reply = P.encode_reply(req_id, error=e)
            except Exception:  # a bug: log it here, never send a traceback
                log.exception("internal error serving a request")
                err = FlowError("internal error in flowd; see its log (journalctl -u flowd)")
                err.code = "internal"
                reply = P.encode_reply(req_id, error=err)
            if reply is not None:
                self._send(peer, reply)

    def _send(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart([peer] + frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("reply dropped: %s", e)

    def _dispatch(self, peer, req_id, cmd, args, payload) -> list[bytes] | None:
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            raise ProtocolError(f"command {cmd!r} is not supported by this flowd ({__version__})")
        out = handler(args, payload, peer=peer, req_id=req_id)
        if out is None:
            return None  # deferred (a waiter)
        result, data = out if isinstance(out, tuple) else (out, None)
        return P.encode_reply(req_id, result, payload=data)

    def find_run(self, ref: object) -> Run:
        if not isinstance(ref, str) or not ref:
            raise UsageError("name a run by its id or a unique prefix of it")
        if ref in self.runs:
            return self.runs[ref]
        matches = [r for r in self.runs if r.startswith(ref)]
        if not matches:
            raise NotFound(f"no run matches {for_log(repr(ref))}; `flowctl status` lists the runs")
        if len(matches) > 1:
            raise Ambiguous(f"{ref!r} matches {len(matches)} runs ({', '.join(sorted(matches)[:5])}); "
                            "give more characters")
        return self.runs[matches[0]]

    def _cmd_ping(self, args, payload, **kw):
        return {"version": __version__, "pid": os.getpid(), "spool": self.spool,
                "engine_up": self.engine_up, "engine_message": self.engine_message,
                "runs": len(self.runs)}

    def _cmd_status(self, args, payload, peer, req_id):
        ref = args.get("run")
        if not ref:
            runs = sorted(self.runs.values(), key=lambda r: r.meta.get("submitted_at", 0))
            return {"runs": [r.summary() for r in runs], "engine_up": self.engine_up,
                    "engine_message": self.engine_message, "disk_ok": self.disk_ok,
                    "disk_free": self._free()}
        run = self.find_run(ref)
        wait = args["wait"]  # finite, 0 to P.MAX_WAIT (checked at the edge)
        if wait and not run.finished:
            # a client over its share, or all over MAX_WAITERS: the oldest are answered now
            for w in self.waiters.add(time.monotonic() + wait, run.id, peer, req_id):
                self._answer_waiter(w)
            return None
        return {"run": run.detail(), "engine_up": self.engine_up, "disk_ok": self.disk_ok}

    def _answer_waiters(self, now: float) -> None:
        """Answer the waiters whose run ended (or went) and those whose time is up."""
        for w in self.waiters.due(now, lambda rid: rid not in self.runs or self.runs[rid].finished):
            self._answer_waiter(w)

    def _answer_waiter(self, w: "_Waiter") -> None:
        run = self.runs.get(w.run_id)
        result = {"run": run.detail() if run else None, "engine_up": self.engine_up}
        self._send(w.peer, P.encode_reply(w.req_id, result))

    def _cmd_cancel(self, args, payload, **kw):
        runs = [self.find_run(r) for r in args["runs"]]  # all names checked before anything changes
        out = []
        for run in runs:
            try:
                run.cancel()
                out.append({"id": run.id, "state": run.state, "ok": True})
            except Conflict as e:
                out.append({"id": run.id, "state": run.state, "ok": False, "message": str(e)})
        return {"runs": out}

    # uploads: flowctl sends the workflow and every file it names, in chunks.
    # Each upload and push is its caller's alone, bounded and expiring (flowd/staging.py).
    def _cmd_upload_begin(self, args, payload, **kw):
        size = args["size"]
        if size > self.cfg.max_upload_size:
            raise UsageError(f"upload_begin: argument 'size' is {size} bytes, more than this flowd "
                             f"takes at once ({self.cfg.max_upload_size} bytes: max_upload_size "
                             f"in {self.cfg.source or 'its config'})")
        self._check_space(size + self.staging.pending())
        up = self.staging.begin(args["_caller"].uid, "upload", size, time.monotonic())
        return {"upload": up.id}

    def _cmd_upload_chunk(self, args, payload, **kw):
        up = self.staging.get(args["upload"], args["_caller"].uid, "upload")
        return {"received": self._receive(up, args["path"], args["offset"], payload)}

    def _receive(self, up, rel: str, offset: int, payload: bytes | None) -> int:
        data = payload or b""
        if data:
            self._check_space(len(data))  # the floor, on every chunk
        return self.staging.write(up, rel, offset, data)

    def _cmd_submit(self, args, payload, peer, req_id):
        up = self.staging.get(args["upload"], args["_caller"].uid, "upload")
        return self.submit_bundle(self.staging.take(up), args["name"], args["_caller"].user,
                                  reply=(peer, req_id))

    def submit_bundle(self, bundle: str, name: str, user: str = "",
                      reply: tuple[bytes, str] | None = None) -> dict | None:
        """Validate ``bundle/workflow.xml`` and make a run of it; the folder is consumed.

        ``bundle`` must be a folder of the spool's filesystem that only flowd
        writes (an upload, or a drop moved out of incoming/). An invalid
        workflow gives WorkflowError (its problems naming ``name``), or
        UsageError for an image the config does not allow, and the folder is
        removed.

        With ``reply`` (a client's peer and request id), this is done on a
        thread, since 20,000 items take seconds to write: the loop goes on
        serving, and the client gets the run or the error when it is done
        (``_created``). Without, it is done here: the result is returned, the
        error raised.
        """
        run_id = self._new_run_id()
        meta = {"submitted_at": time.time(), "source": name, "submitted_by": user}
        job = _Creation(run_id, bundle, meta, reply)
        self.creating[run_id] = job
        if reply is None:
            self._create(job)
            return self._created(job)
        threading.Thread(target=self._create, args=(job,), name=f"flowd-create-{run_id}",
                         daemon=True).start()
        return None  # answered by _created, from the loop

    def _create(self, job: "_Creation") -> None:
        """Validate the workflow and make the run's folder (on a thread for a
        client's submit: parsing 20,000 items takes a fraction of a second,
        writing them seconds). A crash or a stop meanwhile leaves a
        ``.new-RUN`` folder, removed at start."""
        try:
            job.wf, job.warnings = self._validate(job.bundle, job.meta["source"])
            job.path = Run.create(self.runs_dir, job.run_id, job.wf, job.bundle, self.fs, job.meta)
        except Exception as e:  # noqa: BLE001 - answered to the client by _created
            job.error = e
            shutil.rmtree(os.path.join(self.runs_dir, f".new-{job.run_id}"), ignore_errors=True)
            shutil.rmtree(job.bundle, ignore_errors=True)
        if job.reply is not None:
            self.report(job)

    def _validate(self, bundle: str, name: str) -> tuple:
        """The bundle's workflow and its warnings, or WorkflowError/UsageError."""
        from .parser import load_workflow  # lxml lives only there

        try:
            wf, warnings = load_workflow(os.path.join(bundle, "workflow.xml"))
        except WorkflowError as e:
            for p in e.problems:  # speak of the user's file, not our private copy
                p.file = name
            raise
        cfg = self.cfg  # one config, though a reload may replace it meanwhile
        for proc in wf.processes.values():  # the image allowlist (config key allowed_images)
            if not cfg.image_allowed(proc.image):
                raise UsageError(f"process {proc.name!r} uses image {proc.image!r}, which this flowd "
                                 f"does not allow (allowed_images in {cfg.source or 'its config'}: "
                                 f"{', '.join(cfg.allowed_images)})")
        problems = _over_limits(wf, name, cfg)
        if problems:
            raise WorkflowError(problems)
        return wf, [str(w) for w in warnings]

    def _created(self, job: "_Creation") -> dict | None:
        """In the loop: open the new run, and answer its submitter."""
        self.creating.pop(job.run_id, None)
        if job.reply is None and job.error is not None:
            raise job.error  # the caller (intake) tells its errors apart
        result = error = None
        if isinstance(job.error, FlowError):
            error = job.error
        elif job.error is not None:
            log.error("could not create run %s", job.run_id, exc_info=job.error)
            error = FlowError("internal error in flowd; see its log (journalctl -u flowd)")
            error.code = "internal"
        else:
            run = Run.open(job.path, self.fs, self.executor, self.limits)
            self.runs[run.id] = run
            log.info("run %s submitted by %s: workflow %s (%s)", run.id,
                     for_log(job.meta["submitted_by"] or "?"), for_log(job.wf.name),
                     for_log(job.meta["source"]))
            result = {"run": run.id, "name": job.wf.name, "warnings": job.warnings}
        if job.reply is None:
            return result
        self._send(job.reply[0], P.encode_reply(job.reply[1], result, error=error))
        return None

    # push: a client appends an item to a channel of a running run, in chunks
    def _cmd_push_begin(self, args, payload, **kw):
        run = self.find_run(args["run"])
        run.check_push(args["channel"])
        limit = self.cfg.max_upload_size
        size = args["size"]
        if size is not None and size > limit:
            raise UsageError(f"push_begin: argument 'size' is {size} bytes, more than this flowd "
                             f"takes at once ({limit} bytes: max_upload_size in "
                             f"{self.cfg.source or 'its config'})")
        self._check_space((size or 0) + self.staging.pending())
        up = self.staging.begin(args["_caller"].uid, "push", limit if size is None else size,
                                time.monotonic(), declared=size is not None,
                                run=run.id, channel=args["channel"])
        return {"push": up.id, "run": run.id}

    def _cmd_push_chunk(self, args, payload, **kw):
        up = self.staging.get(args["push"], args["_caller"].uid, "push")
        return {"received": self._receive(up, PUSH_FILE, args["offset"], payload)}

    def _cmd_push_end(self, args, payload, **kw):
        up = self.staging.get(args["push"], args["_caller"].uid, "push")
        run = self.find_run(args["run"])
        channel = args["channel"]
        if (run.id, channel) != (up.meta["run"], up.meta["channel"]):
            raise UsageError(f"push_end: this push was begun for channel {for_log(up.meta['channel'])} "
                             f"of run {up.meta['run']}, not {for_log(channel)} of {run.id}")
        if up.declared and up.received != up.size:
            raise UsageError(f"push_end: {up.received} bytes were received, {up.size} declared; "
                             "send the rest, or push again")
        item = os.path.join(self.staging.take(up), PUSH_FILE)
        try:
            # The checksum was computed while the chunks came in: stamped here,
            # the item is never read whole on the loop (issue 9 #3).
            fd = os.open(item, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                checksum.stamp(fd, up.summer)
            finally:
                os.close(fd)
            seq = run.push(channel, item, stamped=True)
        except OSError as e:
            raise StorageError(f"cannot store the pushed item: {e.strerror}") from None
        finally:
            shutil.rmtree(up.path, ignore_errors=True)
        log.info("run %s: item %d pushed to %s by %s", run.id, seq, for_log(channel),
                 args["_caller"])
        return {"run": run.id, "channel": channel, "seq": seq}

    def _check_space(self, need: int) -> None:
        free = self._free()
        if free - need < self.cfg.min_free_space:
            self.disk_free = free
            if free < self.cfg.min_free_space:
                self._set_disk(False)
            raise DiskFull(
                f"the spool {self.spool} has {_mib(free)} free; with this {_mib(need)} it would "
                f"go below its floor of {_mib(self.cfg.min_free_space)} (min_free_space): "
                "free some space (flowd resumes by itself) and try again")

    def _cmd_logs(self, args, payload, **kw):
        run = self.find_run(args["run"])
        return {"run": run.id, "state": run.state, "logs": run.logs(args["process"], args["task"])}

    def _cmd_read_log(self, args, payload, **kw):
        run = self.find_run(args["run"])
        data = run.read_log(args["name"], args["offset"], P.CHUNK)
        return {"size": len(data)}, data

    def _cmd_graph(self, args, payload, **kw):
        run = self.find_run(args["run"])
        return {"run": run.id, "state": run.state, "workflow": run.wf.to_dict(),
                "depths": {ch: run.engine.depth(ch) for ch in run.wf.channels}}

    def _new_run_id(self) -> str:
        """12 random hex digits, unique, and with a unique 4-digit prefix
        while one is easily found (short prefixes name runs in flowctl).
        Past 65,536 runs the prefixes run out: then any unique id will do."""
        taken = set(self.runs) | set(self.creating)
        prefixes = {r[:4] for r in taken}
        for _ in range(RUN_ID_TRIES):
            rid = secrets.token_hex(6)
            if rid[:4] not in prefixes:
                return rid
        for _ in range(RUN_ID_TRIES):  # 2**48 ids: a clash is as good as impossible
            rid = secrets.token_hex(6)
            if rid not in taken and not os.path.lexists(os.path.join(self.runs_dir, rid)):
                return rid
        raise StorageError("no free run id was found; try again")

    def _cmd_items(self, args, payload, **kw):
        run = self.find_run(args["run"])
        return {"run": run.id, "channel": args["channel"], "items": run.items(args["channel"])}

    def _cmd_read(self, args, payload, **kw):
        # 1 <= length <= CHUNK and offset >= 0 (checked at the edge): never a whole item
        run = self.find_run(args["run"])
        data = run.read(args["channel"], args["seq"], args["offset"], args["length"])
        return {"size": len(data)}, data


_QUIET = {"ping", "status", "items", "read", "upload_begin", "upload_chunk", "push_begin", "push_chunk", "logs", "read_log",
          "graph"}


@dataclass(eq=False)
class _Creation:
    """A run being made (``Daemon.submit_bundle``)."""

    run_id: str
    bundle: str
    meta: dict  # run.json's first fields: submitted_at, source, submitted_by
    reply: tuple[bytes, str] | None  # (peer, request id) to answer, or None: made inline
    wf: object = None  # the validated workflow
    warnings: list[str] = field(default_factory=list)
    path: str = ""
    error: BaseException | None = None


class Caller:
    """Who sent a request, from the kernel (SO_PEERCRED via ZeroMQ's Peer-Address)."""

    def __init__(self, uid: int | None, pid: int | None):
        self.uid, self.pid = uid, pid

    @property
    def user(self) -> str:
        if self.uid is None:
            return "?"
        import pwd

        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def __str__(self) -> str:
        if self.uid is None:
            return "unknown caller"
        return f"uid {self.uid} ({for_log(self.user)}) pid {self.pid}"


def _caller(frame) -> Caller:
    """Peer-Address of an ipc peer reads "host:UID:GID:PID" on Linux."""
    try:
        parts = frame.get("Peer-Address").split(":")
        return Caller(int(parts[-3]), int(parts[-1]))
    except (zmq.ZMQError, AttributeError, ValueError, IndexError, TypeError):
        return Caller(None, None)


def _brief(args: dict) -> str:
    """The arguments a log line names, as the client sent them: escaped, so
    none can start a line of its own, and cut to 200 characters each."""
    keep = {k: v for k, v in args.items() if k in ("run", "runs", "channel", "name", "process")}
    return " ".join(f"{k}={_cut(for_log(v))}" for k, v in keep.items())


def _cut(text: str, most: int = 200) -> str:
    return text if len(text) <= most else text[:most] + f"...({len(text)} characters)"


def _over_limits(wf, name: str, cfg: Config) -> list[Problem]:
    """What in ``wf`` asks more than this flowd's config allows
    (allowed_networks, max_memory, max_timeout): one problem per field."""
    where = cfg.source or "flowd's config"
    out = []
    for proc in wf.processes.values():
        if not cfg.network_allowed(proc.network):
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks network=\"{proc.network}\", which this flowd does not "
                f"allow (allowed_networks in {where}: {', '.join(cfg.allowed_networks)})",
                f"leave network= out (no network), or ask the administrator to add "
                f"\"{proc.network}\" to allowed_networks"))
        if proc.memory is not None and cfg.max_memory is not None and proc.memory > cfg.max_memory:
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks memory=\"{_size(proc.memory)}\", more than this flowd "
                f"allows (max_memory in {where}: {_size(cfg.max_memory)})",
                f"ask for {_size(cfg.max_memory)} or less, or ask the administrator to raise "
                "max_memory"))
        if proc.timeout is not None and cfg.max_timeout is not None and proc.timeout > cfg.max_timeout:
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks timeout=\"{_duration(proc.timeout)}\", longer than this "
                f"flowd allows (max_timeout in {where}: {_duration(cfg.max_timeout)})",
                f"ask for {_duration(cfg.max_timeout)} or less, or ask the administrator to raise "
                "max_timeout"))
    return out


def _size(n: int) -> str:
    for unit, k in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    for unit, k in (("h", 3600), ("m", 60)):
        if seconds >= k and seconds % k == 0:
            return f"{int(seconds // k)}{unit}"
    return f"{seconds:g}s"


@dataclass(eq=False)
class _Waiter:
    """A ``status --wait`` request waiting for its run to end."""

    run_id: str
    peer: bytes
    req_id: str
    seq: int
    live: bool = True


class _Waiters:
    """The waiting ``status`` requests: a heap by deadline, at most ``per_peer``
    per client and ``total`` in all (beyond that the oldest are answered at
    once, with the run as it is: a client asks again). libzmq as packaged
    does not tell a ROUTER when a peer goes (ZMQ_ROUTER_NOTIFY is a draft
    option, refused by both pyzmq 24's and today's), so the caps and the
    deadline (at most protocol.MAX_WAIT) are the bound on a gone client's."""

    def __init__(self, per_peer: int, total: int):
        self.per_peer, self.total = per_peer, total
        self.heap: list[tuple[float, int, _Waiter]] = []
        self.by_peer: dict[bytes, dict[int, _Waiter]] = {}  # in arrival order
        self.by_run: dict[str, dict[int, _Waiter]] = {}
        self.live = 0
        self._seq = 0

    def __len__(self) -> int:
        return self.live

    def add(self, deadline: float, run_id: str, peer: bytes, req_id: str) -> list[_Waiter]:
        """Queue a waiter; returns those it pushes out (to be answered now)."""
        self._seq += 1
        w = _Waiter(run_id, peer, req_id, self._seq)
        heapq.heappush(self.heap, (deadline, w.seq, w))
        self.by_peer.setdefault(peer, {})[w.seq] = w
        self.by_run.setdefault(run_id, {})[w.seq] = w
        self.live += 1
        out = []
        mine = self.by_peer[peer]
        while len(mine) > self.per_peer:
            out.append(self._drop(next(iter(mine.values()))))
        while self.live > self.total:
            out.append(self._drop(self._pop_live()))
        self._compact()
        return out

    def next_deadline(self) -> float:
        return self.heap[0][0] if self.heap else float("inf")

    def due(self, now: float, ended) -> list[_Waiter]:
        """Those whose run ``ended(run_id)`` and those whose deadline passed."""
        out = []
        for run_id in [r for r in self.by_run if ended(r)]:
            out += [self._drop(w) for w in list(self.by_run[run_id].values())]
        while self.heap and self.heap[0][0] <= now:
            w = heapq.heappop(self.heap)[2]
            if w.live:
                out.append(self._drop(w))
        self._compact()
        return out

    def _pop_live(self) -> _Waiter:
        while True:
            w = heapq.heappop(self.heap)[2]
            if w.live:
                return w

    def _drop(self, w: _Waiter) -> _Waiter:
        w.live = False
        self.live -= 1
        for index, key in ((self.by_peer, w.peer), (self.by_run, w.run_id)):
            entries = index[key]
            del entries[w.seq]
            if not entries:
                del index[key]
        return w

    def _compact(self) -> None:
        """Entries answered early stay in the heap until popped: rebuilt when
        they outnumber the live ones, so the heap stays O(live)."""
        if len(self.heap) > 2 * self.live + 64:
            self.heap = [e for e in self.heap if e[2].live]
            heapq.heapify(self.heap)


DISK_CHECK_EVERY = 2.0


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

