"""Noticing drops in ``SPOOL/incoming/`` (docs/spool.md): inotify, settling, rescans.

All of it runs on the daemon's loop thread, driven by the intake
(flowd/intake.py). inotify (through ctypes on libc: no dependency) watches
incoming/; its fd sits in the daemon's ``zmq.Poller`` (inside the intake's
epoll fd, with the pipe the intake's worker wakes the loop through). A rename
into the folder (IN_MOVED_TO) is one clean event and is taken at once.
Everything else (IN_CLOSE_WRITE, IN_CREATE, IN_ATTRIB, a rescan) is only a
*hint*: the entry is taken once it has *settled*, i.e. its signature (size and
mtime; for a folder the entry count, total size and newest mtime) is the same
at two looks ``settle`` seconds apart. A file written with ``>`` then ``>>``
fires close-write while half written; settling takes it whole. Names starting
with ``.`` or ending in ``.tmp``/``.part`` are ignored until renamed.
incoming/ is rescanned at start, on IN_Q_OVERFLOW and every ``rescan_every``
seconds; without inotify (log says why) every ``fallback_every`` seconds.

A drop that could not be moved out of incoming/ is *stuck*: it is not taken
again until it changes (its inode or ctime: e.g. ``chmod g+w``).
"""
from __future__ import annotations

import ctypes
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("flowd.intake")  # the intake's one logger, whichever module speaks

SETTLE = 2.0
RESCAN_EVERY = 60.0
FALLBACK_EVERY = 2.0

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


@dataclass
class _Pending:
    sig: tuple | None
    since: float
    due: float


class DropWatch:
    """Which names in incoming/ are ready to be taken, and when to look next."""

    def __init__(self, incoming: str, *, settle: float, rescan_every: float,
                 fallback_every: float, max_entries: int):
        self.incoming = incoming
        self.settle = settle
        self.rescan_every = rescan_every
        self.fallback_every = fallback_every
        self.max_entries = max_entries  # a folder's signature counts no further
        self.inotify: Inotify | None = None
        self.next_rescan = 0.0
        self._wd: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._now: list[str] = []  # renamed in: taken at the next poll, in order
        self._stuck: dict[str, tuple[tuple, str | None]] = {}  # name -> (lstat key, its .error)
        self._watch_failed = self._list_failed = False

    def attach(self, inotify: Inotify) -> None:
        """Watch incoming/ with ``inotify`` (its fd is the intake's to poll)."""
        self.inotify = inotify
        self._watch()

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None

    def deadline(self) -> float:
        """When ``ready`` next has something (0.0: at once) or a rescan is due."""
        if self._now:
            return 0.0
        due = [p.due for p in self._pending.values()]
        return min([self.next_rescan, *due])

    def ready(self, now: float, budget: int) -> Iterator[str]:
        """The names to take now, at most ``budget``: renamed in first, in order,
        then the settled ones. The caller takes each before the next is chosen."""
        while self._now and budget > 0:
            name = self._now.pop(0)
            self._pending.pop(name, None)
            yield name
            budget -= 1
        for name, p in sorted(self._pending.items(), key=lambda kv: kv[1].due):
            if budget <= 0 or p.due > now:
                break
            if self._settled(name, p, now):
                del self._pending[name]
                yield name
                budget -= 1

    def is_stuck(self, name: str, key: tuple) -> bool:
        """``name`` could not be moved out and has not changed since (``key``: inode, ctime)."""
        stuck = self._stuck.get(name)
        return stuck is not None and stuck[0] == key

    def stuck(self, name: str, key: tuple, error_path: str | None) -> None:
        self._stuck[name] = (key, error_path)

    def forget_stuck(self, name: str) -> str | None:
        """No longer stuck: the path of the .error written for it, if any."""
        stuck = self._stuck.pop(name, None)
        return stuck[1] if stuck is not None else None

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

    def read_events(self, now: float) -> None:
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
                self.rescan(now)
                continue
            if wd != self._wd:
                continue
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                log.error("spool: %s was removed, moved or unmounted; watching it again at the "
                          "next rescan", self.incoming)
                if self.inotify is not None and not mask & IN_IGNORED:
                    self.inotify.rm_watch(wd)
                self._wd = None
                self.next_rescan = min(self.next_rescan, now + self.fallback_every)
                continue
            if not name or ignored_name(name):
                continue
            if mask & IN_MOVED_TO:
                if name not in self._now:
                    self._now.append(name)
            elif mask & (IN_CLOSE_WRITE | IN_CREATE | IN_ATTRIB):
                self.hint(name, now)

    def rescan(self, now: float) -> None:
        if self.inotify is not None and self._wd is None:
            self._watch()  # incoming/ is not re-made here: its mode and group are the admin's
        watching = self.inotify is not None and self._wd is not None
        self.next_rescan = now + (self.rescan_every if watching else self.fallback_every)
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
                self.forget_stuck(name)
        for name in sorted(names):
            if not ignored_name(name):
                self.hint(name, now)

    def hint(self, name: str, now: float) -> None:
        if name in self._pending or name in self._now:
            return
        sig = self._signature(os.path.join(self.incoming, name))
        if sig is None:
            return
        if self.is_stuck(name, _key(sig)):
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



def _key(sig: tuple) -> tuple:
    return tuple(sig[:2])
