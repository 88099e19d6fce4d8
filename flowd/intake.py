"""Spool intake: workflows dropped into ``SPOOL/incoming/`` become runs (docs/spool.md).

A drop is a workflow file ``NAME.xml`` or a folder ``NAME`` holding
``workflow.xml`` and its files. docs/spool.md says what users see; this is how
it works.

Noticing drops (the daemon's loop thread)
    inotify (through ctypes on libc: no dependency) watches incoming/; its fd
    sits in the daemon's ``zmq.Poller`` (inside an epoll fd, with the pipe the
    intake's worker wakes the loop through). A rename into the folder
    (IN_MOVED_TO) is one clean event and is taken at once. Everything else
    (IN_CLOSE_WRITE, IN_CREATE, IN_ATTRIB, a rescan) is only a *hint*: the
    entry is taken once it has *settled*, i.e. its signature (size and mtime;
    for a folder the entry count, total size and newest mtime) is the same
    at two looks ``settle`` seconds apart. A file written with ``>`` then
    ``>>`` fires close-write while half written; settling takes it whole.
    Names starting with ``.`` or ending in ``.tmp``/``.part`` are ignored
    until renamed. incoming/ is rescanned at start, on IN_Q_OVERFLOW and every
    ``rescan_every`` seconds; without inotify (log says why) every
    ``fallback_every`` seconds.

Taking a drop (never losing it, never making two runs of it)
    The loop only notices a drop and picks the id its run will have (RUN);
    everything slow (moving, copying up to 1 GiB, the reject and clean-up
    steps) is done by the intake's one worker thread, and validation and run
    creation by ``Creator.submit_bundle`` on its own thread, as for a
    client's ``flowctl submit``. Every change goes through ``Durable`` (the
    daemon's ``fs``), so the crash tests see each step.

    1. ``mkdir staging/ID/d``, then ``rename(incoming/NAME,
       staging/ID/d/NAME)``: first of all, so the user can no longer reach it
       by path. staging/ is the daemon's (0700) and on the spool's
       filesystem. Nothing is opened before this, and nothing of the drop is
       ever opened through a symbolic link.
    2. A private *bundle* staging/ID/bundle/ is built from the drop (scratch:
       rebuilt from the drop after a crash): ``workflow.xml`` (a file drop is
       copied there, at most 1 MiB) and, for a folder, every file and folder
       under it, walked with directory fds, ``lstat`` and ``O_NOFOLLOW``.
       Symbolic links, FIFOs, devices and sockets are refused; so are files
       that do not belong to the owner of the folder (unless that owner is
       root), more than ``max_entries`` entries or ``max_bytes`` bytes. Files
       are copied (daemon-owned, so the run's items cannot be changed through
       another name or a still-open descriptor); a file the daemon itself
       owns with one link is hard-linked instead (cheap).
    3. The marker staging/ID/submitting is written durably, holding RUN;
       then, on the loop, ``submit(bundle, source, user, reply=CALLBACK,
       run_id=RUN)`` (``Creator.submit_bundle``) makes runs/RUN off the loop
       (via runs/.new-RUN, renamed into place last) and calls CALLBACK on the
       loop with (result, error). The original in staging/ID/d/ is untouched.
    4. Success: staging/ID is renamed to staging/.done-ID and removed.
       Failure (WorkflowError, any FlowError, any bug): the marker
       staging/ID/rejecting (the name chosen in rejected/ and the error
       text) is written durably, then ``rejected/NAME.error``, then the
       original is renamed to ``rejected/NAME`` (``NAME.1``, ``NAME.2``... on
       a clash), then staging/ID is retired as above.

    Recovery (start-up takes every staging/ID again, on the worker) is exact:
    a box with ``rejecting`` redoes step 4's rejection with the same name and
    text; one with ``submitting`` holding RUN is just retired if runs/RUN
    exists (the run is whole: it appears by one rename), and otherwise is
    submitted again *as RUN* (the daemon removed any runs/.new-RUN before);
    one without a marker was never submitted and is taken from step 2. So a
    crash at any point makes a drop exactly one run, or one rejection.

    A drop that cannot even be moved out of incoming/ (a folder of another
    user without group write permission, another filesystem) stays there with
    a ``rejected/NAME.error`` saying why; it is tried again once it changes
    (its ctime: e.g. ``chmod g+w``).

Everything on the loop is driven by ``poll(now)`` and ``next_deadline()`` with
the daemon's monotonic clock, so tests can step time without sleeping;
``wait_idle`` lets a test wait for the worker.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pwd
import queue
import re
import secrets
import select
import shutil
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .errors import FlowError, StorageError, WorkflowError
from .fsops import Durable, file_kind
from .limits import MAX_XML_BYTES as XML_CAP  # stdlib: lxml stays out of start-up

log = logging.getLogger("flowd.intake")

SETTLE = 2.0
RESCAN_EVERY = 60.0
FALLBACK_EVERY = 2.0
MAX_DROP_BYTES = 1024 ** 3  # a whole folder drop
MAX_DROP_ENTRIES = 10_000
MAX_DEPTH = 32
TAKES_PER_POLL = 16  # then let the daemon loop breathe
MARKER = "submitting"  # holds the id the drop's run gets: written before it is submitted
REJECTING = "rejecting"  # {"target", "text"}: written before a drop is moved to rejected/
CHUNK = 1024 * 1024
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")

# inotify(7)
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
WATCH_MASK = (IN_MOVED_TO | IN_CLOSE_WRITE | IN_CREATE | IN_ATTRIB | IN_DELETE_SELF
              | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class InotifyUnavailable(Exception):
    pass


class Inotify:
    """The three inotify calls, through ctypes; the fd is non-blocking and close-on-exec."""

    def __init__(self):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init1 = libc.inotify_init1
        except (OSError, AttributeError):
            try:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                init1 = libc.inotify_init1
            except (OSError, AttributeError) as e:
                raise InotifyUnavailable(f"no inotify in the C library ({e})") from None
        init1.argtypes, init1.restype = [ctypes.c_int], ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes, self._add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes, self._rm.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(f"inotify_init1: {os.strerror(err)}")
        self.fd = fd

    def add_watch(self, path: str, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
        return wd

    def rm_watch(self, wd: int) -> None:
        self._rm(self.fd, wd)

    def read(self) -> bytes:
        """Whatever events are queued (b"" if none); never blocks."""
        try:
            return os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_events(buf: bytes) -> list[tuple[int, int, str]]:
    """``struct inotify_event`` records -> [(wd, mask, name)]; a truncated tail is dropped."""
    out = []
    off = 0
    while off + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
        off += _EVENT.size
        if off + length > len(buf):
            break  # never from the kernel (it returns whole records)
        raw = buf[off:off + length].split(b"\0", 1)[0]
        off += length
        out.append((wd, mask, os.fsdecode(raw)))
    return out


def ignored_name(name: str) -> bool:
    """Names that are still being written: ``.x``, ``x.tmp``, ``x.part``."""
    return name.startswith(".") or name.endswith(".tmp") or name.endswith(".part")


class _Refused(Exception):
    """The drop is refused before it reaches the parser; ``lines`` say why."""

    def __init__(self, *lines: str):
        super().__init__(lines[0])
        self.lines = list(lines)


@dataclass
class _Pending:
    sig: tuple | None
    since: float
    due: float


class _Stopped(Exception):
    """The daemon is stopping: the drop is left in staging/ and taken again at the next start."""


class Intake:
    def __init__(self, spool: str, submit: Callable[..., None], *,
                 fs: Durable | None = None, new_run_id: Callable[[], str] | None = None,
                 settle: float = SETTLE, rescan_every: float = RESCAN_EVERY,
                 fallback_every: float = FALLBACK_EVERY, use_inotify: bool = True,
                 max_bytes: int = MAX_DROP_BYTES, max_entries: int = MAX_DROP_ENTRIES):
        """``submit(bundle, source, user, reply=CALLBACK, run_id=RUN)`` is
        ``Creator.submit_bundle``: called on the loop, it must call
        ``CALLBACK(result, error)`` on the loop once RUN is made (or not)."""
        self.spool = spool
        self.incoming = os.path.join(spool, "incoming")
        self.rejected = os.path.join(spool, "rejected")
        self.staging = os.path.join(spool, "staging")
        self.runs_dir = os.path.join(spool, "runs")
        self.submit = submit
        self.fs = fs if fs is not None else Durable()
        self.new_run_id = new_run_id or (lambda: secrets.token_hex(6))
        self.settle = settle
        self.rescan_every = rescan_every
        self.fallback_every = fallback_every
        self.use_inotify = use_inotify
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.inotify: Inotify | None = None
        self._wd: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._now: list[str] = []  # renamed in: taken at the next poll, in order
        self._stuck: dict[str, tuple[tuple, str | None]] = {}  # name -> (lstat key, its .error)
        self._next_rescan = 0.0
        self._euid = os.geteuid()
        self._watch_failed = self._list_failed = False
        # The worker: jobs in, completions out (run on the loop by poll), a pipe to wake the loop.
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._busy: dict[str, str] = {}  # name -> its job's run id, until moved out of incoming/
        self._reserved: set[str] = set()  # run ids picked for drops not yet submitted
        self._inflight = 0  # drops handed to the worker and not yet finished
        self._held: list[Callable[[], None]] = []  # submits waiting for free space
        self._taking = True
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)

    # -- the daemon's side -------------------------------------------------------
    def start(self, now: float) -> None:
        """Watch incoming/, take back what a stop left in staging/, rescan. Never raises."""
        try:
            self._start(now)
        except Exception:  # noqa: BLE001 - drops then wait in incoming/; the daemon goes on
            log.exception("spool: the intake of %s could not start", self.incoming)
            self._next_rescan = now + self.fallback_every

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
                self.inotify = Inotify()
            except InotifyUnavailable as e:
                log.warning("spool: inotify unavailable (%s); incoming/ is rescanned every %g s "
                            "instead", e, self.fallback_every)
            else:
                self._epoll.register(self.inotify.fd, select.EPOLLIN)
                self._watch()
        else:
            log.info("spool: inotify not used; incoming/ is rescanned every %g s", self.fallback_every)
        self._recover()
        self._rescan(now)

    def fileno(self) -> int | None:
        """One fd for the daemon's poller: readable on an inotify event or a finished job."""
        return self._epoll.fileno()

    def next_deadline(self) -> float:
        """When ``poll`` next has timed work (the daemon's monotonic clock); 0.0: at once."""
        if not self._taking:
            return self._next_rescan  # the spool is full: drops wait, nothing is due
        if self._now or self._held:
            return 0.0
        due = [p.due for p in self._pending.values()]
        return min([self._next_rescan, *due])

    def poll(self, now: float, take: bool = True) -> None:
        """Apply what the worker finished, read inotify events, rescan if due,
        hand what is ready to the worker. ``take=False`` (the spool is full):
        nothing new is taken or submitted meanwhile. Never raises."""
        self._taking = take
        try:
            _drain(self._wake_r)
            self._apply()
            self._read_events(now)
            if not take:
                return
            held, self._held = self._held, []
            for fn in held:
                fn()
            if now >= self._next_rescan:
                self._rescan(now)
            budget = TAKES_PER_POLL
            while self._now and budget > 0:
                name = self._now.pop(0)
                self._pending.pop(name, None)
                self._take(name, now)
                budget -= 1
            for name, p in sorted(self._pending.items(), key=lambda kv: kv[1].due):
                if budget <= 0 or p.due > now:
                    break
                if self._settled(name, p, now):
                    del self._pending[name]
                    self._take(name, now)
                    budget -= 1
        except Exception:  # noqa: BLE001 - the daemon loop must go on
            log.exception("spool: unexpected error in the intake; carrying on")

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
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
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
            except _Stopped:
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
        self._reserved.discard(rid)
        if name is not None and self._busy.get(name) == rid:
            del self._busy[name]

    def _reserve(self) -> str:
        """A run id for a drop, its 4-digit prefix unlike the other drops' waiting."""
        prefixes = {r[:4] for r in self._reserved}
        for _ in range(16):
            rid = self.new_run_id()
            if rid[:4] not in prefixes:
                break
        self._reserved.add(rid)
        return rid

    # -- noticing ------------------------------------------------------------------
    def _watch(self) -> None:
        assert self.inotify is not None
        try:
            self._wd = self.inotify.add_watch(self.incoming, WATCH_MASK)
        except OSError as e:
            self._wd = None
            if not self._watch_failed:  # said once, not at every rescan
                log.error("spool: cannot watch %s (%s); rescanning it every %g s until it can be",
                          self.incoming, e.strerror, self.fallback_every)
            self._watch_failed = True
            return
        if self._watch_failed:
            log.info("spool: watching %s again", self.incoming)
        self._watch_failed = False

    def _read_events(self, now: float) -> None:
        if self.inotify is None:
            return
        for _ in range(64):
            buf = self.inotify.read()
            if not buf:
                return
            self.handle_events(buf, now)

    def handle_events(self, buf: bytes, now: float) -> None:
        """Act on raw ``struct inotify_event`` records (public for tests)."""
        for wd, mask, name in parse_events(buf):
            if mask & IN_Q_OVERFLOW:
                log.warning("spool: inotify queue overflowed; rescanning incoming/")
                self._rescan(now)
                continue
            if wd != self._wd:
                continue
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                log.error("spool: %s was removed, moved or unmounted; watching it again at the "
                          "next rescan", self.incoming)
                if self.inotify is not None and not mask & IN_IGNORED:
                    self.inotify.rm_watch(wd)
                self._wd = None
                self._next_rescan = min(self._next_rescan, now + self.fallback_every)
                continue
            if not name or ignored_name(name):
                continue
            if mask & IN_MOVED_TO:
                if name not in self._now:
                    self._now.append(name)
            elif mask & (IN_CLOSE_WRITE | IN_CREATE | IN_ATTRIB):
                self._hint(name, now)

    def _rescan(self, now: float) -> None:
        if self.inotify is not None and self._wd is None:
            self._watch()  # incoming/ is not re-made here: its mode and group are the admin's
        watching = self.inotify is not None and self._wd is not None
        self._next_rescan = now + (self.rescan_every if watching else self.fallback_every)
        try:
            names = os.listdir(self.incoming)
        except OSError as e:
            if not self._list_failed:
                log.error("spool: cannot list %s: %s", self.incoming, e.strerror)
            self._list_failed = True
            return
        self._list_failed = False
        present = set(names)
        for name in list(self._pending):
            if name not in present:
                del self._pending[name]
        for name in list(self._stuck):
            if name not in present:
                self._forget_stuck(name)
        for name in sorted(names):
            if not ignored_name(name):
                self._hint(name, now)

    def _hint(self, name: str, now: float) -> None:
        if name in self._pending or name in self._now:
            return
        sig = self._signature(os.path.join(self.incoming, name))
        if sig is None:
            return
        stuck = self._stuck.get(name)
        if stuck is not None and stuck[0] == _key(sig):
            return  # reported already, unchanged
        self._pending[name] = _Pending(sig, now, now + self.settle)

    def _settled(self, name: str, p: _Pending, now: float) -> bool:
        sig = self._signature(os.path.join(self.incoming, name))
        if sig is None:
            del self._pending[name]
            return False
        if sig != p.sig:
            p.sig, p.since, p.due = sig, now, now + self.settle
            return False
        if now - p.since >= self.settle:
            return True
        p.due = p.since + self.settle
        return False

    def _signature(self, path: str) -> tuple | None:
        """What must stay the same for an entry to count as settled (None: gone)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError:
            return ("?",)
        head = (st.st_ino, st.st_ctime_ns)
        if stat.S_ISREG(st.st_mode):
            return (*head, "f", st.st_size, st.st_mtime_ns)
        if not stat.S_ISDIR(st.st_mode):
            return (*head, "o", st.st_mode)
        count, total, newest = 0, 0, st.st_mtime_ns
        stack = [path]
        while stack and count <= self.max_entries:
            try:
                it = os.scandir(stack.pop())
            except OSError:
                continue
            with it:
                for e in it:
                    count += 1
                    try:
                        est = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += est.st_size
                    newest = max(newest, est.st_mtime_ns, est.st_ctime_ns)
                    if stat.S_ISDIR(est.st_mode):
                        stack.append(e.path)
        return (*head, "d", count, total, newest)

    # -- taking (the loop hands a drop to the worker) ----------------------------------
    def _take(self, name: str, now: float) -> None:
        src = os.path.join(self.incoming, name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            self._forget_stuck(name)
            return
        except OSError as e:
            log.error("spool: cannot look at %s: %s", _show(name), e.strerror)
            return
        if name in self._busy:  # the worker is still moving one of this name: look again later
            self._hint(name, now)
            return
        key = (st.st_ino, st.st_ctime_ns)
        stuck = self._stuck.get(name)
        if stuck is not None and stuck[0] == key:
            return
        rid = self._reserve()
        self._queue(self._w_take, rid, name, name, st, key, rid)

    def _w_take(self, name: str, st: os.stat_result, key: tuple, rid: str) -> bool:
        """Worker: move the drop into a new staging/ID/d/, then process it."""
        fs = self.fs
        box = os.path.join(self.staging, secrets.token_hex(8))
        fs.mkdir(box, 0o700)
        fs.mkdir(os.path.join(box, "d"), 0o700, sync_parent=False)
        src, dst = os.path.join(self.incoming, name), os.path.join(box, "d", name)
        fs.point("rename", dst)
        try:
            os.rename(src, dst)  # not fs.rename: the errno says what to tell the user
        except OSError as e:
            fs.rmtree(box)  # holds nothing of the user's
            if e.errno != errno.ENOENT:
                error_path = self._cannot_take(name, st, e)
                self._post(lambda: self._stuck_now(name, key, error_path))
            return False
        fs.fsync_dir(os.path.join(box, "d"))
        fs.fsync_dir(self.incoming)
        self._post(lambda: self._moved(name, rid))
        return self._w_process(box, name, rid)

    def _moved(self, name: str, rid: str) -> None:
        if self._busy.get(name) == rid:
            del self._busy[name]
        self._forget_stuck(name, remove_error=True)

    def _stuck_now(self, name: str, key: tuple, error_path: str | None) -> None:
        self._stuck[name] = (key, error_path)

    def _cannot_take(self, name: str, st: os.stat_result, e: OSError) -> str | None:
        """Worker: the drop cannot be moved out of incoming/: say why (its .error path)."""
        user = _user(st.st_uid)
        lines = [f"{name}: flowd cannot move it out of {self.incoming}: {e.strerror}"]
        if e.errno in (errno.EACCES, errno.EPERM) and stat.S_ISDIR(st.st_mode):
            lines.append(f"{name}: a folder is moved, and moving a folder needs write permission on "
                         "it: make it writable by the flowd group (chmod -R g+w, or write it with "
                         "umask 002); flowd takes it as soon as it changes")
        elif e.errno in (errno.EACCES, errno.EPERM):
            lines.append(f"{name}: incoming/ must be writable by flowd (and, if it is sticky, "
                         "owned by flowd)")
        elif e.errno == errno.EXDEV:
            lines.append(f"{name}: incoming/ must be on the same filesystem as the rest of the spool")
        lines.append(f"The drop is left in {self.incoming}.")
        error_path = None
        try:
            target = self._rejected_name(name)
            error_path = os.path.join(self.rejected, target + ".error")
            self.fs.write_file(error_path, self._error_text(name, user, lines, resubmit=False)
                               .encode("utf-8", "replace"), mode=0o644)
        except (OSError, StorageError) as werr:
            log.error("spool: cannot write %s: %s", error_path, getattr(werr, "strerror", werr))
            error_path = None
        log.error("spool: %s (dropped by %s) cannot be moved out of incoming/: %s; left there%s",
                  _show(name), user, e.strerror, f", see {error_path}" if error_path else "")
        return error_path

    def _forget_stuck(self, name: str, remove_error: bool = False) -> None:
        stuck = self._stuck.pop(name, None)
        if stuck is not None and remove_error and stuck[1]:
            try:
                self.fs.unlink(stuck[1])  # the drop got through after all
            except (OSError, StorageError):
                pass

    def _w_process(self, box: str, name: str, rid: str) -> bool:
        """Worker: build the bundle of the drop staged in ``box``, write the
        marker (RUN) and hand it to the loop to submit (True); or reject it."""
        staged = os.path.join(box, "d", name)
        st = os.lstat(staged)
        user = _user(st.st_uid)
        source = f"{name}/workflow.xml" if stat.S_ISDIR(st.st_mode) else name
        bundle = os.path.join(box, "bundle")
        shutil.rmtree(bundle, ignore_errors=True)  # a half-built one, from before a crash
        try:
            self._build_bundle(staged, st, bundle, name)
        except _Refused as r:
            self._w_reject(box, name, st, user, r.lines)
            return False
        except OSError as e:
            log.error("spool: cannot stage %s: %s", _show(name), e)
            self._w_reject(box, name, st, user, [f"{name}: flowd could not stage it: {e.strerror}"])
            return False
        try:
            self.fs.write_file(os.path.join(box, MARKER), f"{rid}\n".encode(), mode=0o600)
        except StorageError as e:  # e.g. the spool is full: taken again at the next start
            log.error("spool: cannot write the marker in %s: %s; %s stays there and is taken "
                      "again when flowd restarts", box, e, _show(name))
            shutil.rmtree(bundle, ignore_errors=True)
            return False
        self._post(lambda: self._submit(box, name, st, user, source, rid))
        return True

    def _submit(self, box: str, name: str, st: os.stat_result, user: str, source: str,
                rid: str) -> None:
        """Loop: make run RID of the bundle, off the loop, as for ``flowctl submit``."""
        if not self._taking:  # the spool is full: submit once it has room again
            self._held.append(lambda: self._submit(box, name, st, user, source, rid))
            return

        def done(result: dict | None, error: BaseException | None) -> None:
            self._todo.put((self._w_finish, rid, None, (box, name, st, user, source, result, error)))

        self._reserved.discard(rid)  # from now on the daemon knows it (Creator's creating)
        try:
            self.submit(os.path.join(box, "bundle"), source, user, reply=done, run_id=rid)
        except Exception as e:  # noqa: BLE001 - rejected by the worker like any other error
            done(None, e)

    def _w_finish(self, box: str, name: str, st: os.stat_result, user: str, source: str,
                  result: dict | None, error: BaseException | None) -> bool:
        """Worker: the drop became a run (retire its box) or is rejected."""
        if error is None:
            result = result or {}
            log.info("spool: %s dropped by %s became run %s (workflow %s)", _show(name), user,
                     result.get("run"), result.get("name"))
            for w in result.get("warnings") or ():
                log.warning("spool: %s", w)
            self._discard(box)
            return False
        if isinstance(error, WorkflowError):
            lines = [str(p) for p in error.problems] or [str(error)]
            if not stat.S_ISDIR(st.st_mode) and any("workflow's folder" in p.message
                                                    for p in error.problems):
                lines.append(f"{name}: a workflow file dropped alone brings no other files: "
                             "drop a folder holding workflow.xml and its files")
        elif isinstance(error, FlowError):
            lines = [f"{source}: {line}" for line in str(error).splitlines()]
        else:  # a bug must not lose the drop or stop the daemon
            log.error("spool: internal error while submitting %s", _show(name), exc_info=error)
            lines = [f"{source}: internal error in flowd: {type(error).__name__}: {error}",
                     "this is a bug in flowd; the daemon's log has the details"]
        self._w_reject(box, name, st, user, lines)
        return False

    # -- rejecting and retiring (worker) -----------------------------------------------
    def _w_reject(self, box: str, name: str, st: os.stat_result, user: str,
                  lines: list[str]) -> None:
        """The marker ``rejecting`` first (so a crash rejects it once, under the same name)."""
        shutil.rmtree(os.path.join(box, "bundle"), ignore_errors=True)
        target = self._rejected_name(name)
        text = self._error_text(name, user, lines, resubmit=True, is_dir=stat.S_ISDIR(st.st_mode))
        first = next((line for line in lines if ": error:" in line), lines[0])
        try:
            self.fs.write_file(os.path.join(box, REJECTING), json.dumps(
                {"target": target, "text": text, "first": first, "user": user}).encode(), mode=0o600)
        except StorageError as e:
            log.error("spool: %s (dropped by %s) is rejected (%s) but cannot be moved to %s: %s; "
                      "it is kept in %s and taken again when flowd restarts", _show(name), user,
                      first, self.rejected, e, box)
            return
        self._w_rejected(box, name, target, text, first, user)

    def _w_rejected(self, box: str, name: str, target: str, text: str, first: str,
                    user: str) -> None:
        """NAME.error (atomically), then the drop beside it, then retire the box; redone
        as a whole after a crash."""
        staged = os.path.join(box, "d", name)
        error_path = os.path.join(self.rejected, target + ".error")
        try:
            if os.path.lexists(staged) and os.path.lexists(os.path.join(self.rejected, target)):
                target = self._rejected_name(name)  # someone put a file there meanwhile
                error_path = os.path.join(self.rejected, target + ".error")
            self.fs.write_file(error_path, text.encode("utf-8", "replace"), mode=0o644)
            if os.path.lexists(staged):
                self._rename(staged, os.path.join(self.rejected, target))
        except (OSError, StorageError) as e:
            log.error("spool: %s (dropped by %s) is rejected (%s) but cannot be moved to %s: %s; "
                      "it is kept in %s and taken again when flowd restarts", _show(name), user,
                      first, self.rejected, getattr(e, "strerror", None) or e, staged)
            return
        log.warning("spool: %s dropped by %s is rejected: %s (see %s)", _show(name), user,
                    first, error_path)
        self._discard(box)

    def _rename(self, src: str, dst: str) -> None:
        self.fs.rename(src, dst)  # a method, so tests can watch the order of things

    def _build_bundle(self, staged: str, st: os.stat_result, bundle: str, name: str) -> None:
        """Make ``bundle`` from the staged drop, or raise _Refused (``bundle`` then removed)."""
        os.mkdir(bundle, 0o755)
        try:
            if stat.S_ISREG(st.st_mode):
                if not name.endswith(".xml"):
                    raise _Refused(
                        f"{name}: not a workflow file: a file dropped here must be named NAME.xml",
                        f"{name}: to send a workflow with its files, drop a folder holding "
                        "workflow.xml and its files")
                self._copy_workflow_file(staged, st, os.path.join(bundle, "workflow.xml"), name)
            elif stat.S_ISDIR(st.st_mode):
                self._copy_folder(staged, st, bundle, name)
            else:
                raise _Refused(f"{name}: {file_kind(st.st_mode)}: only a workflow file or a folder "
                               "is taken" + (" (links are never followed: drop the file itself)"
                                             if stat.S_ISLNK(st.st_mode) else ""))
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise

    def _copy_workflow_file(self, staged: str, st: os.stat_result, dst: str, name: str) -> None:
        fd, fst = _open_same(staged, None, os.O_NONBLOCK, st, name)
        try:
            if fst.st_size > XML_CAP:
                raise _Refused(_too_big_xml(name))
            _copy_fd(fd, dst, XML_CAP, 0o644, lambda: _Refused(_too_big_xml(name)),
                     self._stopping)
        finally:
            os.close(fd)

    def _copy_folder(self, staged: str, st: os.stat_result, bundle: str, name: str) -> None:
        owner = st.st_uid
        state = {"entries": 0, "bytes": 0}
        top, _ = _open_same(staged, None, os.O_DIRECTORY, st, name)
        try:
            self._copy_tree(top, bundle, name, owner, state, 0)
        finally:
            os.close(top)
        try:
            wst = os.lstat(os.path.join(bundle, "workflow.xml"))
        except FileNotFoundError:
            raise _Refused(f"{name}: a folder dropped here must hold workflow.xml (and the "
                           "files it names); this one has none") from None
        if not stat.S_ISREG(wst.st_mode):
            raise _Refused(f"{name}/workflow.xml: not a regular file")

    def _copy_tree(self, dfd: int, out: str, rel: str, owner: int, state: dict, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Refused(f"{rel}: folders nested more than {MAX_DEPTH} deep")
        with os.scandir(dfd) as it:
            entries = sorted(e.name for e in it)
        for entry in entries:
            if self._stopping.is_set():
                raise _Stopped()
            path = f"{rel}/{entry}"
            state["entries"] += 1
            if state["entries"] > self.max_entries:
                raise _Refused(f"{rel.split('/')[0]}: more than {self.max_entries} files and folders; "
                               "that is more than a drop may hold")
            try:
                est = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = est.st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
                raise _Refused(f"{path}: {file_kind(kind)}: a folder drop may hold only regular files "
                               "and folders" + (" (links are never followed: copy the file in)"
                                                if stat.S_ISLNK(kind) else ""))
            if owner != 0 and est.st_uid != owner:
                raise _Refused(f"{path}: belongs to {_user(est.st_uid)}, not to {_user(owner)} who "
                               "owns the folder; copy it (cp) so that it is yours")
            dst = os.path.join(out, entry)
            if stat.S_ISDIR(kind):
                sub, _ = _open_same(entry, dfd, os.O_DIRECTORY, est, path)
                try:
                    os.mkdir(dst, 0o755)
                    self._copy_tree(sub, dst, path, owner, state, depth + 1)
                finally:
                    os.close(sub)
                continue
            left = self.max_bytes - state["bytes"]

            def too_big() -> _Refused:
                return _Refused(f"{rel.split('/')[0]}: more than {_human(self.max_bytes)} in all; "
                                "that is more than a drop may hold")
            if est.st_size > left:
                raise too_big()
            if est.st_uid == self._euid and est.st_nlink == 1 and self._try_link(entry, dfd, dst, est):
                state["bytes"] += est.st_size
                continue
            fd, fst = _open_same(entry, dfd, os.O_NONBLOCK, est, path)
            try:
                mode = 0o755 if fst.st_mode & 0o111 else 0o644
                state["bytes"] += _copy_fd(fd, dst, left, mode, too_big, self._stopping)
            finally:
                os.close(fd)

    @staticmethod
    def _try_link(entry: str, dfd: int, dst: str, est: os.stat_result) -> bool:
        try:
            os.link(entry, dst, src_dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        lst = os.lstat(dst)
        if (lst.st_dev, lst.st_ino) != (est.st_dev, est.st_ino) or not stat.S_ISREG(lst.st_mode):
            os.unlink(dst)  # the entry was swapped under us: copy instead
            return False
        return True

    # -- names and texts ------------------------------------------------------------
    def _rejected_name(self, name: str) -> str:
        base = name
        if len(os.fsencode(base)) > 200:
            base = os.fsdecode(os.fsencode(base)[:200])
        k = 0
        while True:
            cand = base if k == 0 else f"{base}.{k}"
            path = os.path.join(self.rejected, cand)
            if not os.path.lexists(path) and not os.path.lexists(path + ".error"):
                return cand
            k += 1

    def _error_text(self, name: str, user: str, lines: list[str], *, resubmit: bool,
                    is_dir: bool = False) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out = [f"# flowd did not take {_show(name)}, dropped by {user} into {self.incoming} "
               f"({when}):"]
        out += [_one_line(line) for line in lines]
        if resubmit:
            what = (f"fix {_show(name)}/workflow.xml (flowctl validate checks it), then rename the "
                    f"folder into {self.incoming} again (build it under a name starting with "
                    f"\".\" there, e.g. .{_show(name)}, then mv it to {_show(name)})"
                    if is_dir else
                    f"fix the file (flowctl validate checks it), then drop it again: write it "
                    f"to {self.incoming}/.{_show(name)}.part and mv it to {_show(name)}")
            out.append(f"To resubmit: {what}. This copy stays in {self.rejected} until an "
                       "administrator removes it.")
        return "\n".join(out) + "\n"


    def _already_submitted_legacy(self, box: str, name: str, marker: str) -> bool:
        """A marker of an older flowd (the time it was written, no run id): the
        drop's run, if any, is one of the same source and user submitted after it."""
        try:
            since = float(marker)
            st = os.lstat(os.path.join(box, "d", name))
            names = os.listdir(self.runs_dir)
        except (ValueError, OSError):
            return False
        user = _user(st.st_uid)
        source = f"{name}/workflow.xml" if stat.S_ISDIR(st.st_mode) else name
        for rid in names:
            try:
                with open(os.path.join(self.runs_dir, rid, "run.json"), "rb") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if (meta.get("source") == source and meta.get("submitted_by") == user
                    and float(meta.get("submitted_at") or 0) >= since - 1.0):
                log.info("spool: %s had become run %s before flowd stopped", _show(name), rid)
                return True
        return False

    def _discard(self, box: str) -> None:
        """Retire a box whose drop became a run or was rejected."""
        done = os.path.join(self.staging, ".done-" + os.path.basename(box))
        try:
            self.fs.rename(box, done)
        except StorageError as e:
            log.error("spool: cannot retire %s: %s", box, e)
            return
        self.fs.rmtree(done)

    # -- start-up ------------------------------------------------------------------
    def _recover(self) -> None:
        """Loop, at start: hand every staging/ID a stop or crash left to the worker."""
        try:
            entries = sorted(os.listdir(self.staging))
        except OSError as e:
            log.error("spool: cannot list %s: %s", self.staging, e.strerror)
            return
        for entry in entries:
            rid = self._reserve()  # used only by a drop that has no marker yet
            self._queue(self._w_recover, rid, None, os.path.join(self.staging, entry), rid)

    def _w_recover(self, box: str, rid: str) -> bool:
        """Worker: finish what a crash interrupted, exactly as the markers say."""
        if os.path.basename(box).startswith(".done-"):
            self.fs.rmtree(box)
            return False
        try:
            names = os.listdir(os.path.join(box, "d"))
        except FileNotFoundError:
            names = []
        except OSError as e:
            log.error("spool: cannot read %s: %s; left as it is", box, e.strerror)
            return False
        if not names:
            self.fs.rmtree(box)  # nothing of a user's in it
            return False
        if len(names) > 1:
            log.error("spool: %s holds more than one drop; left as it is", box)
            return False
        name = names[0]
        rejecting = _read(os.path.join(box, REJECTING))
        if rejecting is not None:
            try:
                r = json.loads(rejecting)
                args = (str(r["target"]), str(r["text"]), str(r["first"]), str(r["user"]))
            except (ValueError, KeyError, TypeError):
                log.error("spool: %s has an unreadable %s; left as it is", box, REJECTING)
                return False
            log.info("spool: rejecting %s again (flowd stopped while rejecting it)", _show(name))
            self._w_rejected(box, name, *args)
            return False
        marker = (_read(os.path.join(box, MARKER)) or "").strip()
        if _RUN_ID.match(marker):
            if os.path.lexists(os.path.join(self.runs_dir, marker)):
                log.info("spool: %s had become run %s before flowd stopped", _show(name), marker)
                self._discard(box)
                return False
            rid = marker  # never made (runs/.new-RUN was removed at start): made now, as RUN
        elif marker and self._already_submitted_legacy(box, name, marker):
            self._discard(box)
            return False
        log.info("spool: taking %s again (flowd stopped while taking it)", _show(name))
        return self._w_process(box, name, rid)


# -- helpers -------------------------------------------------------------------------
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _show(name: str) -> str:
    """A name safe to print on one line (control characters and bad bytes escaped)."""
    if name.isprintable():
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    return repr(name)[1:-1]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", " / ")


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def _too_big_xml(name: str) -> str:
    return (f"{name}: larger than 1 MiB, the limit for a workflow file (keep data out of the "
            "workflow: drop a folder holding workflow.xml and its data files)")


def _open_same(entry: str, dfd: int | None, flags: int, est: os.stat_result,
               path: str) -> tuple[int, os.stat_result]:
    """Open ``entry`` (in folder ``dfd``; never through a link) and check it is
    still the file or folder ``est`` saw, of the same kind: (fd, its fstat), or
    _Refused naming ``path``."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dfd)
    except OSError as e:
        raise _Refused(*_unreadable(path, e)) from None
    fst = os.fstat(fd)
    if (stat.S_IFMT(fst.st_mode), fst.st_dev, fst.st_ino) != (
            stat.S_IFMT(est.st_mode), est.st_dev, est.st_ino):
        os.close(fd)
        raise _Refused(f"{path}: it changed while flowd took it; drop it again")
    return fd, fst


def _unreadable(what: str, e: OSError) -> list[str]:
    lines = [f"{what}: flowd cannot read it: {e.strerror}"]
    if e.errno in (errno.EACCES, errno.EPERM):
        lines.append(f"{what}: make it readable by the flowd group (chmod -R g+rX), or write it "
                     "with umask 002 or 027")
    return lines


def _copy_fd(fd: int, dst: str, limit: int, mode: int, too_big: Callable[[], Exception],
             stopping: threading.Event) -> int:
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    total = 0
    try:
        while True:
            if stopping.is_set():
                raise _Stopped()
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return total
            total += len(chunk)
            if total > limit:
                raise too_big()
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(out)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _read(path: str) -> str | None:
    """A marker's text (None: there is none)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(64 * 1024)
    except FileNotFoundError:
        return None


def _key(sig: tuple) -> tuple:
    return tuple(sig[:2])
