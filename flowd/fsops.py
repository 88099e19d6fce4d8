"""Every change flowd makes to its spool goes through ``Durable``.

The crash rules live here, in one place: a file counts only once its data is
fsynced and it has been renamed into place; the folder is fsynced after each
create, rename, unlink and mkdir; a failed fsync is fatal (never retried:
after the kernel drops dirty pages a retry can falsely succeed).

Each operation is a *durability point*. For the crash tests, the environment
variable ``FLOWD_CRASH_AT=N`` ends the process (``os._exit``) just before the
N-th point, and ``FLOWD_CRASH_TRACE=FILE`` appends one line per point, so a
test can count the points of a workflow and sweep every one of them.

Test hooks used by ``tests/crashsim.py`` (the in-process crash sweep):

- ``crash_mode="raise"`` raises ``SimulatedCrash`` (a ``BaseException``) at the
  crash point instead of exiting, so one pytest process can sweep thousands of
  points; the test then throws away every in-memory object, as a restart would.
- ``observer``: told of every rename (``renamed(src, dst)``) and of every
  fsync that made something durable (``synced_dir``/``synced_file``), with its
  *site* (``store.py:LINE:FUNCTION:KIND``, the first caller outside this
  module and which fsync of the operation it is), so a simulator can work out
  what a power loss could leave on disk.
- ``skip_fsync``: a set of sites whose fsync is left out (the mutation check).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import threading
import time
from typing import BinaryIO, Iterable

from . import checksum as checksum_mod
from .errors import DiskFull, StorageError
from .textsafe import for_log

log = logging.getLogger("flowd.fsops")

CHUNK = 1024 * 1024
CRASH_EXIT = 86  # exit status of a test-only crash


class SimulatedCrash(BaseException):
    """The test-only crash of ``crash_mode="raise"``: the "process" ends here.

    A ``BaseException`` so that no ``except Exception`` on the way up can
    swallow it; nothing may clean up after it (a real crash would not).
    """


class Durable:
    def __init__(self, *, crash_at: int | None = None, trace: str | None = None,
                 crash_mode: str = "exit"):
        if crash_at is None and os.environ.get("FLOWD_CRASH_AT"):
            crash_at = int(os.environ["FLOWD_CRASH_AT"])
        if crash_mode not in ("exit", "raise"):
            raise ValueError(f"crash_mode must be 'exit' or 'raise', not {crash_mode!r}")
        self.crash_at = crash_at
        self.crash_mode = crash_mode
        self.points = 0
        trace = trace or os.environ.get("FLOWD_CRASH_TRACE")
        self._trace = open(trace, "a", buffering=1) if trace else None
        # Where a folder that is out of the protocol goes to be deleted, off the
        # caller's thread (``Reaper``); None: deleted in place (tests, tools).
        self.reaper: Reaper | None = None
        # Test hooks (module docstring); both off in the daemon.
        self.observer = None  # .renamed(src, dst), .synced_dir(path, site), .synced_file(path, site)
        self.skip_fsync: set[str] | frozenset[str] = frozenset()

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    # -- the test hook ---------------------------------------------------
    def point(self, what: str, path: str) -> None:
        self.points += 1
        if self._trace is not None:
            self._trace.write(f"{self.points} {what} {path}\n")
        if self.crash_at is not None and self.points >= self.crash_at:
            if self.crash_mode == "raise":
                raise SimulatedCrash(self.points)
            os._exit(CRASH_EXIT)

    def _site(self, kind: str) -> str | None:
        """The fsync's site, computed only when a test hook is on."""
        if self.observer is None and not self.skip_fsync:
            return None
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename == __file__:
            f = f.f_back
        if f is None:
            return f"fsops.py:0:?:{kind}"
        return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}:{f.f_code.co_name}:{kind}"

    # -- primitives --------------------------------------------------------
    def fsync_dir(self, path: str) -> None:
        self._sync_dir(path, "dir")

    def _sync_dir(self, path: str, kind: str) -> None:
        self.point("fsync", path)
        site = self._site(kind)
        if site is not None and site in self.skip_fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)
        if self.observer is not None:
            self.observer.synced_dir(path, site)

    def sync_all(self, path: str) -> None:
        """Make everything on ``path``'s filesystem durable (syncfs), before recovery.

        A process crash (kill -9) keeps its unsynced writes in the page cache,
        so the restarted daemon sees them and would redo nothing for them; a
        power loss during that recovery could then lose what it trusted. So
        the daemon flushes the whole filesystem once at start, before it acts
        on anything it finds (PostgreSQL fsyncs its data folder before crash
        recovery for the same reason). Not a durability point: it changes
        nothing, it only makes the present durable.
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd, path)
        finally:
            os.close(fd)
        if self.observer is not None and hasattr(self.observer, "synced_all"):
            self.observer.synced_all(path)

    def fsync_file(self, path: str) -> None:
        self.point("fsync", path)
        site = self._site("file")
        if site is not None and site in self.skip_fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)
        if self.observer is not None:
            self.observer.synced_file(path, site)

    def mkdir(self, path: str, mode: int = 0o750, *, sync_parent: bool = True) -> None:
        self.point("mkdir", path)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as e:
            raise _storage(e, path) from None
        os.chmod(path, mode)  # not subject to the umask
        if sync_parent:
            self._sync_dir(os.path.dirname(path), "mkdir.parent")

    def rename(self, src: str, dst: str, *, sync: bool = True, site: str = "rename.dst") -> None:
        self.point("rename", dst)
        try:
            os.rename(src, dst)
        except OSError as e:
            raise _storage(e, dst) from None
        if self.observer is not None:
            self.observer.renamed(src, dst)
        if sync:
            self._sync_dir(os.path.dirname(dst), site)
            # A folder has one parent: once its new name is durable, so is the
            # whole rename (ext4 and XFS journal it as one). A file may keep
            # both names until its old folder is fsynced too.
            if os.path.dirname(src) != os.path.dirname(dst) and not _is_dir(dst):
                self._sync_dir(os.path.dirname(src), "rename.src")

    def link(self, src: str, dst: str) -> None:
        self.point("link", dst)
        try:
            os.link(src, dst)
        except FileExistsError:
            pass
        except OSError as e:
            raise _storage(e, dst) from None

    def unlink(self, path: str, *, missing_ok: bool = True) -> None:
        self.point("unlink", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:
            raise _storage(e, path) from None

    def rmtree(self, path: str) -> None:
        """Remove a folder that is already out of the protocol (hidden/retired).

        Never raises for what is inside: a script may have left anything in a
        task's folder (a folder it made unreadable, a million files). With a
        ``reaper`` the folder is renamed into its trash (one syscall) and
        deleted there on the reaper's thread; without one it is deleted here.
        What cannot be deleted is left in the trash (or in place) and logged.
        """
        self.point("rmtree", path)
        if not os.path.lexists(path):
            return
        if self.reaper is not None and self.reaper.take(path):
            return
        problems = remove_tree(path)
        if problems:
            log.warning("could not delete all of %s: %s", for_log(path), for_log(problems[0]))

    def write_file(
        self,
        path: str,
        data: bytes | Iterable[bytes] | BinaryIO,
        *,
        mode: int = 0o640,
        sync_dir: bool = True,
        sync: bool = True,
        checksum: bool = False,
    ) -> int:
        """Write ``path`` atomically: temp name, fsync, rename, fsync folder.

        ``data`` may be bytes, an iterable of chunks or a binary file object;
        it is streamed, never held whole. Returns the number of bytes written.
        ``sync_dir=False``: the caller fsyncs the folder later. ``sync=False``:
        no fsync at all, for a file whose loss in a power failure recovery
        tolerates (still atomic: a crash of the process leaves old or new).
        ``checksum=True``: stamp the file with its CRC-32 (an item).
        """
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.tmp")
        self.point("create", tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        except OSError as e:
            raise _storage(e, tmp) from None
        size = 0
        summer = checksum_mod.Summer() if checksum else None
        try:
            for chunk in _chunks(data):
                if summer is not None:
                    summer.update(chunk)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            os.fchmod(fd, mode)
            if summer is not None:
                checksum_mod.stamp(fd, summer)
            if sync and size:  # an empty file has no data to lose: its folder's fsync is enough
                self.point("fsync", tmp)
                site = self._site("write.data")
                if site is None or site not in self.skip_fsync:
                    _fsync(fd, tmp)
                    if self.observer is not None:
                        self.observer.synced_file(tmp, site)
        except OSError as e:
            os.close(fd)
            _quiet_unlink(tmp)
            raise _storage(e, tmp) from None
        except SimulatedCrash:
            os.close(fd)  # a crash cleans nothing up: the temp file stays
            raise
        except BaseException:
            os.close(fd)
            _quiet_unlink(tmp)
            raise
        os.close(fd)
        self.rename(tmp, path, sync=sync and sync_dir, site="write.dir")
        return size

    def copy_file(self, src: str, dst: str, *, mode: int = 0o640, checksum: bool = False) -> int:
        """Copy ``src`` to ``dst`` atomically; the source is opened without following links."""
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return self.write_file(dst, f, mode=mode, checksum=checksum)


def _chunks(data) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data) if not isinstance(data, bytes) else data
    elif hasattr(data, "read"):
        while True:
            chunk = data.read(CHUNK)
            if not chunk:
                return
            yield chunk
    else:
        yield from data


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        # PostgreSQL's lesson: never retry a failed fsync; the data may be gone.
        raise StorageError(f"fsync failed on {path}: {e.strerror}; flowd stops to protect the spool") from None


def _syncfs(fd: int, path: str) -> None:
    """syncfs(2) through libc (Python has no os.syncfs); os.sync() if it is missing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise StorageError(f"syncfs failed on {path}: {os.strerror(err)}; flowd stops to protect "
                           "the spool")


def _storage(e: OSError, path: str) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the spool's filesystem (writing {path})")
    return StorageError(f"{e.strerror or e} ({path})")


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _quiet_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PROBLEMS = 20  # what remove_tree reports of what it could not delete
OPEN_FDS = 32  # descriptors remove_tree keeps open at most


def remove_tree(path: str) -> list[str]:
    """Delete ``path`` and everything under it as far as this process can.

    Never raises an OSError and never follows a link: entries are reached
    through folder descriptors (no path is looked up twice, so a swapped
    entry cannot redirect it), folders the process owns but cannot list or
    change are made ``0700`` first, and the walk uses its own stack (a
    script's 100,000-level tree cannot overflow Python's). What could not be
    deleted (another uid's folder without write permission, say) is left
    and described in the list returned (empty: all gone).
    """
    problems: list[str] = []
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, _DIR_FLAGS)
    except OSError as e:
        return [f"{parent}: {e.strerror}"]
    try:
        _remove_entry(pfd, name, path, problems)
    finally:
        os.close(pfd)
    return problems


def _remove_entry(pfd: int, name: str, shown: str, problems: list[str]) -> None:
    """Remove ``name`` in the folder ``pfd``; a folder is emptied first (iteratively)."""
    if _unlink_at(pfd, name, shown, problems):
        return
    # A folder: walk it with a stack of (fd, shown path, names left).
    me = os.geteuid()
    # Only the deepest OPEN_FDS levels keep their descriptor open; a shallower
    # one is opened again through ".." of its child on the way back up.
    stack: list[list] = []  # [fd or None, shown path, names left]
    fd = _open_dir_at(pfd, name, shown, me, problems)
    if fd is None:
        return
    stack.append([fd, shown, _list(fd, shown, me, problems)])
    while stack:
        fd, where, names = stack[-1]
        if names:
            child = names.pop()
            child_shown = os.path.join(where, child)
            if _unlink_at(fd, child, child_shown, problems):
                continue
            cfd = _open_dir_at(fd, child, child_shown, me, problems)
            if cfd is not None:
                if len(stack) >= OPEN_FDS and stack[-OPEN_FDS][0] is not None:
                    os.close(stack[-OPEN_FDS][0])
                    stack[-OPEN_FDS][0] = None
                stack.append([cfd, child_shown, _list(cfd, child_shown, me, problems)])
            continue
        stack.pop()
        if stack and stack[-1][0] is None:
            try:
                stack[-1][0] = os.open("..", _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                _note(problems, stack[-1][1], e)
                for entry in stack:
                    if entry[0] is not None:
                        os.close(entry[0])
                return
        os.close(fd)
        up = stack[-1][0] if stack else pfd
        base = os.path.basename(where)
        try:
            os.rmdir(base, dir_fd=up)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                continue  # what is left was reported when it failed
            if _make_writable(up, me) and _try(lambda: os.rmdir(base, dir_fd=up)):
                continue
            _note(problems, where, e)


def _unlink_at(dfd: int, name: str, shown: str, problems: list[str]) -> bool:
    """Unlink a non-folder entry; True when it is gone (or was never there)."""
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    except IsADirectoryError:
        return False
    except PermissionError as e:
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                return False  # unlink of a folder says EPERM on Linux
        except OSError:
            return True
        if _make_writable(dfd, os.geteuid()) and _try(lambda: os.unlink(name, dir_fd=dfd)):
            return True
        _note(problems, shown, e)
        return True
    except OSError as e:
        _note(problems, shown, e)
        return True


def _open_dir_at(dfd: int, name: str, shown: str, me: int, problems: list[str]) -> int | None:
    for again in (True, False):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except PermissionError as e:
            if again:
                try:  # ours but not readable or searchable: make it so
                    st = os.lstat(name, dir_fd=dfd)
                    if stat.S_ISDIR(st.st_mode) and st.st_uid == me:
                        os.chmod(name, 0o700, dir_fd=dfd)  # a folder: chmod does not follow it
                        continue
                except OSError:
                    pass
            _note(problems, shown, e)
            return None
        except OSError as e:
            _note(problems, shown, e)
            return None
    return None


def _list(fd: int, shown: str, me: int, problems: list[str]) -> list[str]:
    st = os.fstat(fd)
    if st.st_uid == me and (st.st_mode & 0o700) != 0o700:
        _try(lambda: os.fchmod(fd, 0o700))  # so its entries can be removed
    try:
        return os.listdir(fd)
    except OSError as e:
        _note(problems, shown, e)
        return []


def _make_writable(dfd: int, me: int) -> bool:
    try:
        st = os.fstat(dfd)
        if st.st_uid != me:
            return False
        os.fchmod(dfd, 0o700)
        return True
    except OSError:
        return False


def _try(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


def _note(problems: list[str], where: str, e: OSError) -> None:
    if len(problems) < MAX_PROBLEMS:
        shown = where if len(where) <= 200 else "..." + where[-197:]
        problems.append(f"{shown}: {e.strerror or e}")


class Reaper:
    """Deletes folders that are out of the protocol, on a thread of its own.

    ``take(path)`` renames the folder into ``trash`` (same filesystem, one
    syscall) and wakes the thread, so neither the daemon's loop nor its start
    ever waits for a script's million files, nor fails on a folder a script
    made undeletable. What the thread cannot delete stays in the trash,
    logged once, and is tried again at the next start.
    """

    def __init__(self, trash: str):
        self.trash = trash
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._n = 0
        self._given_up: set[str] = set()
        self._thread: threading.Thread | None = None
        self.busy = False  # True while the thread deletes (tests wait on idle())

    def start(self) -> None:
        os.makedirs(self.trash, mode=0o700, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="flowd-reaper", daemon=True)
        self._thread.start()
        self._wake.set()  # what an earlier life left

    def take(self, path: str) -> bool:
        """Move ``path`` into the trash; False if it could not be moved."""
        with self._lock:
            self._n += 1
            dst = os.path.join(self.trash, f"{time.time_ns()}.{self._n}")
        try:
            os.rename(path, dst)
        except OSError:
            return False
        self._wake.set()
        return True

    def close(self) -> None:
        self._stop = True
        self._wake.set()

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until the trash holds only what cannot be deleted (for tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.busy and not self._wake.is_set():
                try:
                    if set(os.listdir(self.trash)) <= self._given_up:
                        return True
                except OSError:
                    return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            if self._stop:
                return
            self.busy = True
            self._wake.clear()
            try:
                names = os.listdir(self.trash)
            except OSError:
                names = []
            for name in names:
                if self._stop:
                    break
                if name in self._given_up:
                    continue
                problems = remove_tree(os.path.join(self.trash, name))
                if problems:
                    self._given_up.add(name)
                    log.warning("could not delete %s (left by a task's script): %s%s; it stays "
                                "in %s (delete it as root)", for_log(name), for_log(problems[0]),
                                f" and {len(problems) - 1} more" if len(problems) > 1 else "",
                                for_log(self.trash))
            self.busy = False


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages ("a symbolic link")."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"
