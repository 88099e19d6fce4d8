"""Spool intake: workflows dropped into ``SPOOL/incoming/`` become runs (SPEC §5).

A drop is a workflow file ``NAME.xml`` or a folder ``NAME`` holding
``workflow.xml`` and its files. docs/spool.md says what users see; this is how
it works.

Noticing drops
    inotify (through ctypes on libc: no dependency) watches incoming/; its fd
    sits in the daemon's ``zmq.Poller``. A rename into the folder
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

Taking a drop (never losing it)
    1. ``rename(incoming/NAME, staging/ID/d/NAME)``: first of all, so the user
       can no longer reach it by path. staging/ is the daemon's (0700) and on
       the spool's filesystem. Nothing is opened before this, and nothing of
       the drop is ever opened through a symbolic link.
    2. A private *bundle* staging/ID/bundle/ is built from the drop:
       ``workflow.xml`` (a file drop is copied there, at most 1 MiB) and, for a
       folder, every file and folder under it, walked with directory fds,
       ``lstat`` and ``O_NOFOLLOW``. Symbolic links, FIFOs, devices and
       sockets are refused; so are files that do not belong to the owner of
       the folder (unless that owner is root), more than ``max_entries``
       entries or ``max_bytes`` bytes. Files are copied (daemon-owned, so the
       run's items cannot be changed through another name or a still-open
       descriptor); a file the daemon itself owns with one link is
       hard-linked instead (cheap).
    3. A marker staging/ID/submitting is written, then
       ``submit(bundle, name, user)`` (``Daemon.submit_bundle``) consumes the
       bundle. The original in staging/ID/d/ is untouched by it.
    4. Success: staging/ID is renamed to staging/.done-ID and removed.
       Failure (WorkflowError, any FlowError, any bug): ``rejected/NAME.error``
       is written first (temp + fsync + rename), then the original is renamed
       to ``rejected/NAME`` (``NAME.1``, ``NAME.2``... on a clash).
    After a crash, start-up takes every staging/ID again; one with the
    marker whose run already exists (same source and user, submitted after
    the marker) is just cleaned up, so a crash never duplicates a run.
    A drop that cannot even be moved out of incoming/ (a folder of another
    user without group write permission, another filesystem) stays there with
    a ``rejected/NAME.error`` saying why; it is tried again once it changes
    (its ctime: e.g. ``chmod g+w``).

Everything is driven by ``poll(now)`` and ``next_deadline()`` with the
daemon's monotonic clock, so tests can step time without sleeping.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import secrets
import shutil
import stat
import struct
import time
from dataclasses import dataclass
from typing import Callable

from .errors import FlowError, WorkflowError
from .fsops import file_kind
from .limits import MAX_XML_BYTES as XML_CAP  # stdlib: lxml stays out of start-up

log = logging.getLogger("flowd.intake")

SETTLE = 2.0
RESCAN_EVERY = 60.0
FALLBACK_EVERY = 2.0
MAX_DROP_BYTES = 1024 ** 3  # a whole folder drop
MAX_DROP_ENTRIES = 10_000
MAX_DEPTH = 32
TAKES_PER_POLL = 16  # then let the daemon loop breathe
MARKER = "submitting"
CHUNK = 1024 * 1024

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


class Intake:
    def __init__(self, spool: str, submit: Callable[[str, str, str], dict], *,
                 settle: float = SETTLE, rescan_every: float = RESCAN_EVERY,
                 fallback_every: float = FALLBACK_EVERY, use_inotify: bool = True,
                 max_bytes: int = MAX_DROP_BYTES, max_entries: int = MAX_DROP_ENTRIES):
        self.spool = spool
        self.incoming = os.path.join(spool, "incoming")
        self.rejected = os.path.join(spool, "rejected")
        self.staging = os.path.join(spool, "staging")
        self.runs_dir = os.path.join(spool, "runs")
        self.submit = submit
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

    # -- the daemon's side -------------------------------------------------------
    def start(self, now: float) -> None:
        """Watch incoming/, take back what a stop left in staging/, rescan. Never raises."""
        try:
            self._start(now)
        except Exception:  # noqa: BLE001 - drops then wait in incoming/; the daemon goes on
            log.exception("spool: the intake of %s could not start", self.incoming)
            self._next_rescan = now + self.fallback_every

    def _start(self, now: float) -> None:
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
                self._watch()
        else:
            log.info("spool: inotify not used; incoming/ is rescanned every %g s", self.fallback_every)
        self._recover()
        self._rescan(now)

    def fileno(self) -> int | None:
        """The inotify fd for the daemon's poller (None: rescans only)."""
        return self.inotify.fd if self.inotify is not None else None

    def next_deadline(self) -> float:
        """When ``poll`` next has timed work (the daemon's monotonic clock); 0.0: at once."""
        if self._now:
            return 0.0
        due = [p.due for p in self._pending.values()]
        return min([self._next_rescan, *due])

    def poll(self, now: float) -> None:
        """Read inotify events, rescan if due, take what is ready. Never raises."""
        try:
            self._read_events(now)
            if now >= self._next_rescan:
                self._rescan(now)
            budget = TAKES_PER_POLL
            while self._now and budget > 0:
                name = self._now.pop(0)
                self._pending.pop(name, None)
                self._take(name)
                budget -= 1
            for name, p in sorted(self._pending.items(), key=lambda kv: kv[1].due):
                if budget <= 0 or p.due > now:
                    break
                if self._settled(name, p, now):
                    del self._pending[name]
                    self._take(name)
                    budget -= 1
        except Exception:  # noqa: BLE001 - the daemon loop must go on
            log.exception("spool: unexpected error in the intake; carrying on")

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

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

    # -- taking --------------------------------------------------------------------
    def _take(self, name: str) -> None:
        try:
            self._take_inner(name)
        except Exception:  # noqa: BLE001 - never crash the daemon; the drop stays where it is
            log.exception("spool: unexpected error while taking %s; it is left where it is "
                          "(incoming/ or staging/)", _show(name))

    def _take_inner(self, name: str) -> None:
        src = os.path.join(self.incoming, name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            self._forget_stuck(name)
            return
        key = (st.st_ino, st.st_ctime_ns)
        stuck = self._stuck.get(name)
        if stuck is not None and stuck[0] == key:
            return
        box = os.path.join(self.staging, secrets.token_hex(8))
        os.mkdir(box, 0o700)
        os.mkdir(os.path.join(box, "d"), 0o700)
        try:
            os.rename(src, os.path.join(box, "d", name))
        except OSError as e:
            shutil.rmtree(box, ignore_errors=True)  # holds nothing of the user's
            if e.errno == errno.ENOENT:
                return
            self._cannot_take(name, st, key, e)
            return
        _fsync_dir(os.path.join(box, "d"))
        _fsync_dir(self.incoming)
        self._forget_stuck(name, remove_error=True)
        self._process(box, name)

    def _cannot_take(self, name: str, st: os.stat_result, key: tuple, e: OSError) -> None:
        """The drop cannot be moved out of incoming/: say why, once per change of it."""
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
            _write_atomic(error_path, self._error_text(name, user, lines, resubmit=False))
        except OSError as werr:
            log.error("spool: cannot write %s: %s", error_path, werr.strerror)
            error_path = None
        log.error("spool: %s (dropped by %s) cannot be moved out of incoming/: %s; left there%s",
                  _show(name), user, e.strerror, f", see {error_path}" if error_path else "")
        self._stuck[name] = (key, error_path)

    def _forget_stuck(self, name: str, remove_error: bool = False) -> None:
        stuck = self._stuck.pop(name, None)
        if stuck is not None and remove_error and stuck[1]:
            try:
                os.unlink(stuck[1])  # the drop got through after all
            except OSError:
                pass

    def _process(self, box: str, name: str, marker_time: float | None = None) -> None:
        """Submit the drop staged in ``box``; reject it on any failure."""
        staged = os.path.join(box, "d", name)
        st = os.lstat(staged)
        user = _user(st.st_uid)
        is_dir = stat.S_ISDIR(st.st_mode)
        source = f"{name}/workflow.xml" if is_dir else name  # what problems and the run name
        if marker_time is not None:
            run = self._already_submitted(source, user, marker_time)
            if run:
                log.info("spool: %s (dropped by %s) had become run %s before flowd stopped",
                         _show(name), user, run)
                self._discard(box)
                return
        bundle = os.path.join(box, "bundle")
        shutil.rmtree(bundle, ignore_errors=True)
        try:
            self._build_bundle(staged, st, bundle, name)
        except _Refused as r:
            self._reject(box, name, st, user, r.lines)
            return
        except OSError as e:
            log.error("spool: cannot stage %s: %s", _show(name), e)
            self._reject(box, name, st, user, [f"{name}: flowd could not stage it: {e.strerror}"])
            return
        try:
            _write_atomic(os.path.join(box, MARKER), f"{time.time()}\n")
        except OSError as e:  # only a crash in the next milliseconds could then duplicate the run
            log.warning("spool: cannot write the marker in %s: %s", box, e.strerror)
        try:
            result = self.submit(bundle, source, user)
        except WorkflowError as e:
            lines = [str(p) for p in e.problems] or [str(e)]
            if not is_dir and any("workflow's folder" in p.message for p in e.problems):
                lines.append(f"{name}: a workflow file dropped alone brings no other files: "
                             "drop a folder holding workflow.xml and its files")
            self._reject(box, name, st, user, lines)
        except FlowError as e:
            self._reject(box, name, st, user, [f"{source}: {line}" for line in str(e).splitlines()])
        except Exception as e:  # noqa: BLE001 - a bug must not lose the drop or stop the daemon
            log.exception("spool: internal error while submitting %s", _show(name))
            self._reject(box, name, st, user, [
                f"{source}: internal error in flowd: {type(e).__name__}: {e}",
                "this is a bug in flowd; the daemon's log has the details"])
        else:
            log.info("spool: %s dropped by %s became run %s (workflow %s)", _show(name), user,
                     result.get("run"), result.get("name"))
            for w in result.get("warnings") or ():
                log.warning("spool: %s", w)
            self._discard(box)

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
            _copy_fd(fd, dst, XML_CAP, 0o644, lambda: _Refused(_too_big_xml(name)))
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
                state["bytes"] += _copy_fd(fd, dst, left, mode, too_big)
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

    # -- after submit ------------------------------------------------------------
    def _reject(self, box: str, name: str, st: os.stat_result, user: str, lines: list[str]) -> None:
        """NAME.error first (atomically), then the drop beside it."""
        shutil.rmtree(os.path.join(box, "bundle"), ignore_errors=True)
        staged = os.path.join(box, "d", name)
        try:
            target = self._rejected_name(name)
            error_path = os.path.join(self.rejected, target + ".error")
            _write_atomic(error_path, self._error_text(name, user, lines, resubmit=True,
                                                       is_dir=stat.S_ISDIR(st.st_mode)))
            self._rename(staged, os.path.join(self.rejected, target))
            _fsync_dir(self.rejected)
        except OSError as e:
            log.error("spool: %s (dropped by %s) is rejected (%s) but cannot be moved to %s: %s; "
                      "it is kept in %s and taken again when flowd restarts", _show(name), user,
                      lines[0], self.rejected, e.strerror, staged)
            return
        first = next((line for line in lines if ": error:" in line), lines[0])
        log.warning("spool: %s dropped by %s is rejected: %s (see %s)", _show(name), user,
                    first, error_path)
        self._discard(box)

    def _rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)  # a method, so tests can watch the order of things

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

    def _discard(self, box: str) -> None:
        done = os.path.join(self.staging, ".done-" + os.path.basename(box))
        try:
            os.rename(box, done)
            _fsync_dir(self.staging)
        except OSError as e:
            log.error("spool: cannot retire %s: %s", box, e.strerror)
            return
        _remove_tree(done)

    def _already_submitted(self, source: str, user: str, since: float) -> str | None:
        """The run a drop became just before a crash, if any (read from runs/*/run.json)."""
        import json

        try:
            names = os.listdir(self.runs_dir)
        except OSError:
            return None
        for rid in names:
            try:
                with open(os.path.join(self.runs_dir, rid, "run.json"), "rb") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if (meta.get("source") == source and meta.get("submitted_by") == user
                    and float(meta.get("submitted_at") or 0) >= since - 1.0):
                return rid
        return None

    # -- start-up ------------------------------------------------------------------
    def _recover(self) -> None:
        """Take again what a stop or crash left in staging/."""
        try:
            entries = sorted(os.listdir(self.staging))
        except OSError as e:
            log.error("spool: cannot list %s: %s", self.staging, e.strerror)
            return
        for entry in entries:
            box = os.path.join(self.staging, entry)
            if entry.startswith(".done-"):
                _remove_tree(box)
                continue
            try:
                names = os.listdir(os.path.join(box, "d"))
            except FileNotFoundError:
                names = []
            except OSError as e:
                log.error("spool: cannot read %s: %s; left as it is", box, e.strerror)
                continue
            if not names:
                shutil.rmtree(box, ignore_errors=True)  # nothing of a user's in it
                continue
            if len(names) > 1:
                log.error("spool: %s holds more than one drop; left as it is", box)
                continue
            marker_time = None
            try:
                with open(os.path.join(box, MARKER)) as f:
                    marker_time = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            log.info("spool: taking %s again (flowd stopped while taking it)", _show(names[0]))
            try:
                self._process(box, names[0], marker_time)
            except Exception:  # noqa: BLE001
                log.exception("spool: cannot take %s again; it is left in %s", _show(names[0]), box)


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


def _copy_fd(fd: int, dst: str, limit: int, mode: int, too_big: Callable[[], Exception]) -> int:
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    total = 0
    try:
        while True:
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


def _write_atomic(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        data = memoryview(text.encode("utf-8", "replace"))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.error("spool: fsync of %s failed: %s", path, e.strerror)


def _remove_tree(path: str) -> None:
    """Remove a retired staging folder; a user's subfolder flowd may not write is left, logged."""
    errors = []
    shutil.rmtree(path, onerror=lambda func, p, exc: errors.append((p, exc[1])))
    if errors and os.path.lexists(path):
        p, err = errors[0]
        log.warning("spool: cannot remove all of %s (%s: %s); remove it by hand (a dropped folder "
                    "whose subfolders are not writable by flowd leaves this)", path, p,
                    getattr(err, "strerror", err))


def _key(sig: tuple) -> tuple:
    return tuple(sig[:2])
