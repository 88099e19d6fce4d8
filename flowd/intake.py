"""Spool intake: workflows dropped into ``SPOOL/incoming/`` become runs (docs/spool.md).

A drop is a workflow file ``NAME.xml`` or a folder ``NAME`` holding
``workflow.xml`` and its files. docs/spool.md says what users see; how it
works is in three modules besides this one:

- flowd/dropwatch.py notices drops (inotify through ctypes, settling, rescans);
- flowd/dropstaging.py takes them, exactly once: the staging boxes, the
  markers, recovery after a crash, rejecting (the protocol is described there);
- flowd/dropbundle.py builds a drop's private bundle (the fd walk, copies,
  links, limits).

``Intake`` is what the daemon uses (``start``, ``fileno``, ``next_deadline``,
``poll``, ``close``) and ties them together. On the daemon's loop thread it
only notices a drop and picks the id its run will have; everything slow
(moving, copying up to 1 GiB, the reject and clean-up steps) is done by the
intake's one worker thread, which hands results back through a queue and
wakes the loop through a pipe. ``fileno`` is one epoll fd holding that pipe
and the inotify fd, for the daemon's ``zmq.Poller``. Validation and run
creation are done by ``submit`` (``Creator.submit_bundle``) on a thread of
its own, as for a client's ``flowctl submit``. While the spool is full
(``poll(now, take=False)``) drops wait in incoming/ and made bundles wait to
be submitted.

Everything on the loop is driven by ``poll(now)`` and ``next_deadline()`` with
the daemon's monotonic clock, so tests can step time without sleeping;
``wait_idle`` lets a test wait for the worker.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from typing import Callable

from .dropbundle import MAX_DROP_BYTES, MAX_DROP_ENTRIES, XML_CAP, Bundler, Stopped
from .dropstaging import MARKER, REJECTING, Staging, show_name
from .dropwatch import (FALLBACK_EVERY, IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_ISDIR,
                        IN_MOVED_TO, IN_Q_OVERFLOW, RESCAN_EVERY, SETTLE, DropWatch, Inotify,
                        InotifyUnavailable, ignored_name, parse_events)
from .errors import StorageError
from .fsops import Durable
from .runids import RunIds

log = logging.getLogger("flowd.intake")

TAKES_PER_POLL = 16  # then let the daemon loop breathe

__all__ = [  # the intake, and the names its tests read from here
    "Intake", "TAKES_PER_POLL", "XML_CAP", "MARKER", "REJECTING", "Inotify",
    "InotifyUnavailable", "parse_events", "ignored_name", "IN_ATTRIB", "IN_CLOSE_WRITE",
    "IN_CREATE", "IN_ISDIR", "IN_MOVED_TO", "IN_Q_OVERFLOW"]


class Intake:
    def __init__(self, spool: str, submit: Callable[..., None], *,
                 fs: Durable | None = None, run_ids: RunIds | None = None,
                 settle: float = SETTLE, rescan_every: float = RESCAN_EVERY,
                 fallback_every: float = FALLBACK_EVERY, use_inotify: bool = True,
                 max_bytes: int = MAX_DROP_BYTES, max_entries: int = MAX_DROP_ENTRIES):
        """``submit(bundle, source, user, reply=CALLBACK, run_id=RUN)`` is
        ``Creator.submit_bundle``: called on the loop, it must call
        ``CALLBACK(result, error)`` on the loop once RUN is made (or not).
        ``run_ids``: the daemon's (``Creator.ids``), so that a drop's id, picked
        when it is taken, shares no prefix with a run submitted meanwhile; by
        default the intake's own."""
        self.spool = spool
        self.incoming = os.path.join(spool, "incoming")
        self.rejected = os.path.join(spool, "rejected")
        self.staging = os.path.join(spool, "staging")
        self.submit = submit
        self.fs = fs if fs is not None else Durable()
        self.run_ids = run_ids if run_ids is not None else RunIds()
        self.fallback_every = fallback_every
        self.use_inotify = use_inotify
        self.watch = DropWatch(self.incoming, settle=settle, rescan_every=rescan_every,
                               fallback_every=fallback_every, max_entries=max_entries)
        self._stopping = threading.Event()
        self.bundler = Bundler(self._stopping, max_bytes=max_bytes, max_entries=max_entries)
        # _build_bundle and _rename are looked up at each call: tests replace them on the intake.
        self.boxes = Staging(spool, self.fs, post=self._post, on_moved=self._moved,
                             on_stuck=self._stuck_now, on_ready=self._submit,
                             build=lambda *a: self._build_bundle(*a),
                             rename=lambda src, dst: self._rename(src, dst))
        # The worker: jobs in, completions out (run on the loop by poll), a pipe to wake the loop.
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._busy: dict[str, str] = {}  # name -> its job's run id, until moved out of incoming/
        self._inflight = 0  # drops handed to the worker and not yet finished
        self._held: list[Callable[[], None]] = []  # submits waiting for free space
        self._taking = True
        self._worker: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)

    @property
    def inotify(self) -> Inotify | None:
        """The watch's inotify (None: not used, or unavailable)."""
        return self.watch.inotify

    # -- the daemon's side -------------------------------------------------------
    def start(self, now: float) -> None:
        """Watch incoming/, take back what a stop left in staging/, rescan. Never raises."""
        try:
            self._start(now)
        except Exception:  # noqa: BLE001 - drops then wait in incoming/; the daemon goes on
            log.exception("spool: the intake of %s could not start", self.incoming)
            self.watch.next_rescan = now + self.fallback_every

    def _start(self, now: float) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work_loop, name="flowd-intake",
                                            daemon=True)
            self._worker.start()
        for d in (self.incoming, self.rejected):
            os.makedirs(d, exist_ok=True)
        try:
            os.mkdir(self.staging, 0o700)
        except FileExistsError:
            pass
        os.chmod(self.staging, 0o700)
        for d in (self.incoming, self.rejected):
            if os.stat(d).st_dev != os.stat(self.staging).st_dev:
                log.error("spool: %s is on another filesystem than %s; drops cannot be moved "
                          "there and stay where they are (keep the whole spool on one filesystem)",
                          d, self.staging)
        if self.use_inotify:
            try:
                inotify = Inotify()
            except InotifyUnavailable as e:
                log.warning("spool: inotify unavailable (%s); incoming/ is rescanned every %g s "
                            "instead", e, self.fallback_every)
            else:
                self.watch.attach(inotify)  # the watch closes it
                self._epoll.register(inotify.fd, select.EPOLLIN)
        else:
            log.info("spool: inotify not used; incoming/ is rescanned every %g s", self.fallback_every)
        self._recover()
        self.watch.rescan(now)

    def fileno(self) -> int | None:
        """One fd for the daemon's poller: readable on an inotify event or a finished job."""
        return self._epoll.fileno()

    def next_deadline(self) -> float:
        """When ``poll`` next has timed work (the daemon's monotonic clock); 0.0: at once."""
        if not self._taking:
            return self.watch.next_rescan  # the spool is full: drops wait, nothing is due
        if self._held:
            return 0.0
        return self.watch.deadline()

    def poll(self, now: float, take: bool = True) -> None:
        """Apply what the worker finished, read inotify events, rescan if due,
        hand what is ready to the worker. ``take=False`` (the spool is full):
        nothing new is taken or submitted meanwhile. Never raises."""
        self._taking = take
        try:
            _drain(self._wake_r)
            self._apply()
            self.watch.read_events(now)
            if not take:
                return
            held, self._held = self._held, []
            for fn in held:
                fn()
            if now >= self.watch.next_rescan:
                self.watch.rescan(now)
            for name in self.watch.ready(now, TAKES_PER_POLL):
                self._take(name, now)
        except Exception:  # noqa: BLE001 - the daemon loop must go on
            log.exception("spool: unexpected error in the intake; carrying on")

    def handle_events(self, buf: bytes, now: float) -> None:
        """Act on raw ``struct inotify_event`` records (public for tests)."""
        self.watch.handle_events(buf, now)

    def idle(self) -> bool:
        """Nothing handed to the worker is still being taken, submitted or rejected."""
        return self._inflight == 0 and self._done.empty()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Apply completions here until ``idle`` (tests whose ``submit`` answers at once)."""
        end = time.monotonic() + timeout
        while not self.idle():
            try:
                fn = self._done.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return False
            self._run_completion(fn)
        _drain(self._wake_r)
        return True

    def close(self) -> None:
        """Stop the worker (a drop it is copying stays in staging/ for the next start)."""
        self._stopping.set()
        if self._worker is not None:
            self._todo.put(None)
            self._worker.join(30)
            self._worker = None
        self.watch.close()
        if self._wake_r >= 0:
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- the worker and its completions ----------------------------------------------
    def _work_loop(self) -> None:
        """The worker thread. A ``SimulatedCrash`` (tests) ends it, as a crash would."""
        while True:
            job = self._todo.get()
            if job is None:
                return
            fn, rid, name, args = job
            handed = False
            try:
                handed = fn(*args)
            except Stopped:
                log.info("spool: stopping; the drop being taken stays in %s and is taken again "
                         "at the next start", self.staging)
            except Exception:  # noqa: BLE001 - never lose the worker; the drop stays in staging/
                log.exception("spool: unexpected error while taking a drop; it is left where it "
                              "is (incoming/ or staging/) and taken again at the next start")
            if not handed:  # else the loop submits it, and the callback finishes it
                self._post(lambda rid=rid, name=name: self._finished(rid, name))

    def _queue(self, fn: Callable[..., bool], rid: str, name: str | None, *args) -> None:
        """Hand a drop to the worker: ``fn(*args)`` returns True if it went on to be submitted."""
        self._inflight += 1
        if name is not None:
            self._busy[name] = rid
        self._todo.put((fn, rid, name, args))

    def _post(self, fn: Callable[[], None]) -> None:
        """From the worker: run ``fn`` on the loop, and wake it."""
        self._done.put(fn)
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full (the loop is awake anyway) or closed (stopping)

    def _apply(self) -> None:
        while True:
            try:
                fn = self._done.get_nowait()
            except queue.Empty:
                return
            self._run_completion(fn)

    def _run_completion(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the daemon loop must go on
            log.exception("spool: unexpected error in the intake; carrying on")

    def _finished(self, rid: str, name: str | None) -> None:
        self._inflight -= 1
        self.run_ids.release(rid)
        if name is not None and self._busy.get(name) == rid:
            del self._busy[name]

    # -- taking (the loop hands a drop to the worker, and hears back) --------------------
    def _take(self, name: str, now: float) -> None:
        src = os.path.join(self.incoming, name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            self.watch.forget_stuck(name)
            return
        except OSError as e:
            log.error("spool: cannot look at %s: %s", show_name(name), e.strerror)
            return
        if name in self._busy:  # the worker is still moving one of this name: look again later
            self.watch.hint(name, now)
            return
        key = (st.st_ino, st.st_ctime_ns)
        if self.watch.is_stuck(name, key):
            return
        rid = self.run_ids.reserve()
        self._queue(self.boxes.take, rid, name, name, st, key, rid)

    def _moved(self, name: str, rid: str) -> None:
        if self._busy.get(name) == rid:
            del self._busy[name]
        error_path = self.watch.forget_stuck(name)
        if error_path:
            try:
                self.fs.unlink(error_path)  # the drop got through after all
            except (OSError, StorageError):
                pass

    def _stuck_now(self, name: str, key: tuple, error_path: str | None) -> None:
        self.watch.stuck(name, key, error_path)

    def _submit(self, box: str, name: str, st: os.stat_result, user: str, source: str,
                rid: str) -> None:
        """Loop: make run RID of the bundle, off the loop, as for ``flowctl submit``."""
        if not self._taking:  # the spool is full: submit once it has room again
            self._held.append(lambda: self._submit(box, name, st, user, source, rid))
            return

        def done(result: dict | None, error: BaseException | None) -> None:
            self._todo.put((self.boxes.finish, rid, None, (box, name, st, user, source, result,
                                                           error)))

        self.run_ids.release(rid)  # from now on the daemon knows it (Creator's creating)
        try:
            self.submit(os.path.join(box, "bundle"), source, user, reply=done, run_id=rid, uid=st.st_uid)
        except Exception as e:  # noqa: BLE001 - rejected by the worker like any other error
            done(None, e)

    def _recover(self) -> None:
        """Loop, at start: hand every staging/ID a stop or crash left to the worker."""
        try:
            entries = sorted(os.listdir(self.staging))
        except OSError as e:
            log.error("spool: cannot list %s: %s", self.staging, e.strerror)
            return
        for entry in entries:
            rid = self.run_ids.reserve()  # used only by a drop that has no marker yet
            self._queue(self.boxes.recover, rid, None, os.path.join(self.staging, entry), rid)

    # -- the worker's steps that tests watch ----------------------------------------------
    def _build_bundle(self, staged: str, st: os.stat_result, bundle: str, name: str) -> None:
        """Make ``bundle`` from the staged drop, or raise Refused (``bundle`` then removed)."""
        self.bundler.build(staged, st, bundle, name)

    def _rename(self, src: str, dst: str) -> None:
        self.fs.rename(src, dst)  # a method, so tests can watch the order of things


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass
