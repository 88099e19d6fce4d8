"""The flowd daemon: one loop over the control socket, executor reports and timers.

The loop never blocks on a long operation and never sleep-polls: it waits in
``zmq.Poller.poll`` on the ROUTER socket and on a wake-up pipe that executor
threads and signal handlers write to, with a timeout set by the next timer.
Signals are recorded by their handlers and acted on in the loop.
"""
from __future__ import annotations

import fcntl
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
from .errors import (AlreadyRunning, Ambiguous, Conflict, DiskFull, FlowError, NotFound,
                     ProtocolError, StorageError, UsageError)
from .executor import base as X
from .fsops import Durable
from .intake import Intake
from .notify import Notifier
from .run import Limits, Run

log = logging.getLogger("flowd")

UPLOAD_MAX_AGE = 3600.0
STATUS_EVERY = 10.0
_SAFE_PART = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,254}$")
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")


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
        self.waiters: list[tuple[float, str, bytes, str]] = []  # (deadline, run, peer, req id)
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
                             default_memory=cfg.default_memory, spool=self.spool)

    # -- start-up ----------------------------------------------------------
    def _prepare_spool(self) -> None:
        for d in (self.spool, self.runs_dir, self.uploads_dir,
                  os.path.join(self.spool, "incoming"), os.path.join(self.spool, "rejected")):
            try:
                if not os.path.isdir(d):
                    os.makedirs(d, exist_ok=True)
                    if d.endswith("/incoming"):  # the daemon's group may drop workflows
                        os.chmod(d, 0o2770)
            except OSError as e:
                raise UsageError(f"cannot create spool folder {d}: {e.strerror}") from None
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
                log.error("run %s cannot be loaded and is left as it is: %s", name, e)
                continue
            self.runs[run.id] = run
        shutil.rmtree(self.uploads_dir, ignore_errors=True)
        os.makedirs(self.uploads_dir, exist_ok=True)

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
                    deadlines.append(min(w[0] for w in self.waiters))
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

        Live: max_containers, pids_limit, default_memory, max_output_size (runs
        opened from now on), cap_add and allowed_images (containers started and
        workflows submitted from now on), min_free_space and log_level. spool,
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
        live = ("max_containers", "pids_limit", "default_memory", "max_output_size", "cap_add",
                "allowed_images", "min_free_space", "log_level")
        for key in live:
            if key not in pinned:
                setattr(old, key, getattr(new, key))
        old.file_values = new.file_values
        old.source = new.source or old.source
        self.limits.pids_limit = old.pids_limit
        self.limits.default_memory = old.default_memory
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
                    log.error("run %s: %s; the task's result waits for free space", run.id, e)
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
                    log.warning("container engine unavailable: %s", ev.message)
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
                log.error("run %s: %s", run.id, e)
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
            raise NotFound(f"no run matches {ref!r}; `flowctl status` lists the runs")
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
        wait = args.get("wait")
        if wait and not run.finished:
            wait = min(float(wait), 300.0)
            self.waiters.append((time.monotonic() + wait, run.id, peer, req_id))
            return None
        return {"run": run.detail(), "engine_up": self.engine_up, "disk_ok": self.disk_ok}

    def _answer_waiters(self, now: float) -> None:
        keep = []
        for deadline, run_id, peer, req_id in self.waiters:
            run = self.runs.get(run_id)
            if run is None or run.finished or now >= deadline:
                result = {"run": run.detail() if run else None, "engine_up": self.engine_up}
                self._send(peer, P.encode_reply(req_id, result))
            else:
                keep.append((deadline, run_id, peer, req_id))
        self.waiters = keep

    def _cmd_cancel(self, args, payload, **kw):
        refs = args.get("runs")
        if not isinstance(refs, list) or not refs:
            raise UsageError("cancel needs one or more run ids")
        runs = [self.find_run(r) for r in refs]  # all names checked before anything changes
        out = []
        for run in runs:
            try:
                run.cancel()
                out.append({"id": run.id, "state": run.state, "ok": True})
            except Conflict as e:
                out.append({"id": run.id, "state": run.state, "ok": False, "message": str(e)})
        return {"runs": out}

    # uploads: flowctl sends the workflow and every file it names, in chunks
    def _cmd_upload_begin(self, args, payload, **kw):
        total = args.get("size", 0)
        if not isinstance(total, int) or total < 0:
            raise UsageError("upload size must be a whole number of bytes")
        self._check_space(total)
        upload = secrets.token_hex(8)
        os.mkdir(os.path.join(self.uploads_dir, upload), 0o755)
        return {"upload": upload}

    def _upload_dir(self, args) -> str:
        upload = args.get("upload")
        if not isinstance(upload, str) or not re.fullmatch(r"[0-9a-f]{16}", upload):
            raise UsageError("bad upload id")
        path = os.path.join(self.uploads_dir, upload)
        if not os.path.isdir(path):
            raise NotFound("that upload is unknown (it expires after an hour, or flowd restarted)")
        return path

    def _cmd_upload_chunk(self, args, payload, **kw):
        base = self._upload_dir(args)
        rel = args.get("path")
        offset = args.get("offset", 0)
        if not isinstance(rel, str) or not isinstance(offset, int) or offset < 0:
            raise UsageError("upload_chunk needs a path and an offset")
        parts = rel.split("/")
        if not all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts):
            raise UsageError(f"upload path {rel!r} is not a plain relative path")
        folder = base
        for part in parts[:-1]:
            folder = os.path.join(folder, part)
            try:
                os.mkdir(folder, 0o755)
            except FileExistsError:
                pass
            if os.path.islink(folder) or not os.path.isdir(folder):
                raise UsageError(f"upload path {rel!r} is not a plain relative path")
        target = os.path.join(folder, parts[-1])
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                if payload:
                    os.pwrite(fd, payload, offset)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno == 28:
                raise DiskFull(f"no space left on the spool while receiving {rel}") from None
            raise StorageError(f"cannot store {rel}: {e.strerror}") from None
        return {"received": len(payload or b"")}

    def _cmd_submit(self, args, payload, peer, req_id):
        base = self._upload_dir(args)
        return self.submit_bundle(base, args.get("name") or "workflow.xml", args["_caller"].user,
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
        from .errors import WorkflowError
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
                     job.meta["submitted_by"] or "?", job.wf.name, job.meta["source"])
            result = {"run": run.id, "name": job.wf.name, "warnings": job.warnings}
        if job.reply is None:
            return result
        self._send(job.reply[0], P.encode_reply(job.reply[1], result, error=error))
        return None

    # push: a client appends an item to a channel of a running run, in chunks
    def _cmd_push_begin(self, args, payload, **kw):
        run = self.find_run(args.get("run"))
        run.check_push(str(args.get("channel")))
        self._check_space(int(args.get("size") or 0))
        result = self._cmd_upload_begin({"size": 0}, None)
        return {"push": result["upload"], "run": run.id}

    def _cmd_push_chunk(self, args, payload, **kw):
        return self._cmd_upload_chunk({"upload": args.get("push"), "path": "item",
                                       "offset": args.get("offset", 0)}, payload)

    def _cmd_push_end(self, args, payload, **kw):
        base = self._upload_dir({"upload": args.get("push")})
        run = self.find_run(args.get("run"))
        item = os.path.join(base, "item")
        if not os.path.exists(item):
            open(item, "wb").close()  # an empty item
        try:
            seq = run.push(str(args.get("channel")), item)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        log.info("run %s: item %d pushed to %s by %s", run.id, seq, args.get("channel"),
                 args["_caller"])
        return {"run": run.id, "channel": args.get("channel"), "seq": seq}

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
        run = self.find_run(args.get("run"))
        return {"run": run.id, "state": run.state,
                "logs": run.logs(args.get("process"), args.get("task"))}

    def _cmd_read_log(self, args, payload, **kw):
        run = self.find_run(args.get("run"))
        offset = args.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise UsageError("read_log needs an offset")
        data = run.read_log(str(args.get("name")), offset, P.CHUNK)
        return {"size": len(data)}, data

    def _cmd_graph(self, args, payload, **kw):
        run = self.find_run(args.get("run"))
        return {"run": run.id, "state": run.state, "workflow": run.wf.to_dict(),
                "depths": {ch: run.engine.depth(ch) for ch in run.wf.channels}}

    def _new_run_id(self) -> str:
        while True:
            rid = secrets.token_hex(6)
            if not any(r.startswith(rid[:4]) for r in (*self.runs, *self.creating)):
                return rid

    def _cmd_items(self, args, payload, **kw):
        run = self.find_run(args.get("run"))
        return {"run": run.id, "channel": args.get("channel"),
                "items": run.items(str(args.get("channel")))}

    def _cmd_read(self, args, payload, **kw):
        run = self.find_run(args.get("run"))
        seq, offset = args.get("seq"), args.get("offset", 0)
        length = min(int(args.get("length", P.CHUNK)), P.CHUNK)
        if not isinstance(seq, int) or not isinstance(offset, int):
            raise UsageError("read needs an item number and an offset")
        data = run.read(str(args.get("channel")), seq, offset, length)
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
        return f"uid {self.uid} ({self.user}) pid {self.pid}"


def _caller(frame) -> Caller:
    """Peer-Address of an ipc peer reads "host:UID:GID:PID" on Linux."""
    try:
        parts = frame.get("Peer-Address").split(":")
        return Caller(int(parts[-3]), int(parts[-1]))
    except (zmq.ZMQError, AttributeError, ValueError, IndexError, TypeError):
        return Caller(None, None)


def _brief(args: dict) -> str:
    keep = {k: v for k, v in args.items() if k in ("run", "runs", "channel", "name", "process")}
    return " ".join(f"{k}={v}" for k, v in keep.items())


DISK_CHECK_EVERY = 2.0


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

