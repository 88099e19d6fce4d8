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
  *site* (``taskstore.py:LINE:FUNCTION:KIND``, the first caller outside this
  module and which fsync of the operation it is), so a simulator can work out
  what a power loss could leave on disk.
- ``skip_fsync``: a set of sites whose fsync is left out (the mutation check).
"""
from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import stat
import sys
import threading
from typing import BinaryIO, Iterable

from . import checksum as checksum_mod
from .errors import DiskFull, StorageError
from .reaper import Reaper, remove_tree  # noqa: F401  (Durable.rmtree's; also imported from here)
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
        # Run creation and the intake's threads share the daemon's Durable with
        # its loop: the count (and the trace) is kept under a lock.
        self._points_lock = threading.Lock()
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
        with self._points_lock:
            if self._trace is not None:
                self._trace.close()
                self._trace = None

    # -- the test hook ---------------------------------------------------
    def point(self, what: str, path: str) -> None:
        with self._points_lock:
            self.points += 1
            n = self.points
            if self._trace is not None:
                self._trace.write(f"{n} {what} {path}\n")
        if self.crash_at is not None and n >= self.crash_at:
            if self.crash_mode == "raise":
                raise SimulatedCrash(n)
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
        self._syncfs(path, None)

    def sync_fs(self, path: str) -> None:
        """Make every earlier write on ``path``'s filesystem durable: one syncfs.

        For many new files at once (a new run's initial items, written and
        linked without fsync, ``Durable.create``): one flush instead of two
        fsyncs per item. A durability point with its site (kind ``syncfs``),
        like an fsync: the power-loss model takes the whole tree as durable
        here, and the mutation check can leave it out.
        """
        self.point("syncfs", path)
        site = self._site("syncfs")
        if site is not None and site in self.skip_fsync:
            return
        self._syncfs(path, site)

    def _syncfs(self, path: str, site: str | None) -> None:
        """One syncfs of ``path``'s filesystem, told to the observer (``site``:
        the durability point's, or None for the flush before recovery)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _syncfs(fd, path)
        finally:
            os.close(fd)
        if self.observer is not None and hasattr(self.observer, "synced_all"):
            self.observer.synced_all(path, site)

    def create(self, path: str, data: bytes, *, mode: int = 0o640, checksum: bool = False) -> None:
        """Make the new file ``path`` holding ``data``, without fsync or temp name:
        only in a folder that is not live yet (a run being made, whose crash
        leaves a ``.new-`` folder removed at start), made durable by a later
        ``sync_fs``. ``checksum=True``: stamp it with its CRC-32 (an item)."""
        self.point("create", path)
        try:
            _new_file(path, data, mode, chmod=True, checksum=checksum)
        except OSError as e:
            raise _storage(e, path) from None

    def sync_many(self, *, files: Iterable[str] = (), dirs: Iterable[str] = ()) -> None:
        """fsync each of ``files`` and ``dirs`` (deduplicated), as one round: what
        a step does for several tasks at once (group commit) waits for one
        journal commit, not one per file. Each path is a durability point and
        has its site (the caller's line, kind ``file`` or ``dir``), as for
        ``fsync_file`` and ``fsync_dir``.

        With a test hook on (crash points, an observer, skipped sites) they
        run one after another, exactly as that many calls would; in the
        daemon they run at once on a few threads (ext4 and XFS then share one
        journal commit among them). Either way all are done on return.
        """
        files = list(dict.fromkeys(files))
        dirs = list(dict.fromkeys(dirs))
        if self.crash_at is not None or self.observer is not None or self.skip_fsync or \
                self._trace is not None or len(files) + len(dirs) < 2:
            for path in files:
                self.fsync_file(path)
            for path in dirs:
                self._sync_dir(path, "dir")
            return
        for path in files + dirs:
            self.point("fsync", path)
        jobs = [(path, os.O_RDONLY | os.O_NOFOLLOW) for path in files] + \
               [(path, os.O_RDONLY | os.O_DIRECTORY) for path in dirs]
        for fut in [_sync_pool().submit(_open_fsync, path, flags) for path, flags in jobs]:
            fut.result()  # a failed fsync is fatal, as everywhere (StorageError)

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

    def rename(self, src: str, dst: str, *, sync: bool = True, site: str = "rename.dst",
               missing_ok: bool = False) -> bool:
        """Rename ``src`` to ``dst``; False (nothing done) when ``src`` is not
        there and ``missing_ok`` says that is fine (a redo: it moved before)."""
        self.point("rename", dst)
        try:
            os.rename(src, dst)
        except FileNotFoundError as e:
            if missing_ok and not os.path.lexists(src):
                return False
            raise _storage(e, dst) from None
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
        return True

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

    def append(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Add ``data`` at the end of ``path`` (made if missing), without fsync:
        for a file whose tail a power failure may cut (done.log's counts)."""
        self.point("append", path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode)
        except OSError as e:
            raise _storage(e, path) from None
        try:
            os.write(fd, data)
        except OSError as e:
            raise _storage(e, path) from None
        finally:
            os.close(fd)

    # -- scratch files: never fsynced, dropped when the daemon restarts (uploads) --
    # OSError is raised as it is: the caller words it for its client.
    def scratch_mkdir(self, path: str, mode: int = 0o700) -> bool:
        """Make the folder ``path``; False if it was there already."""
        self.point("mkdir", path)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return False
        return True

    def scratch_write(self, path: str, data: bytes, offset: int, *, create: bool,
                      mode: int = 0o640) -> tuple[bool, int]:
        """Write ``data`` at ``offset`` of ``path`` if the file holds exactly
        ``offset`` bytes now (no hole, no overwrite); nothing otherwise.

        ``create``: make the file if it is missing (FileNotFoundError otherwise).
        Links are never followed. Returns (whether it was made, its size before).
        """
        self.point("write", path)
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        made = False
        if create:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
                made = True
            except FileExistsError:
                fd = os.open(path, flags)
        else:
            fd = os.open(path, flags)
        try:
            have = os.fstat(fd).st_size
            if have == offset and data:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        return made, have

    def scratch_create(self, path: str, data: bytes, *, mode: int = 0o640,
                       chmod: bool = True) -> None:
        """Make the new file ``path`` holding ``data``, stamped with its checksum
        (an upload's small file, sent whole): one open, write, setxattr and
        close. FileExistsError if ``path`` is there (nothing changed then); links
        are never followed. ``chmod=False``: the caller knows the umask leaves
        ``mode`` whole, so no fchmod is needed."""
        self.point("write", path)
        _new_file(path, data, mode, chmod=chmod, checksum=True)

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


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _sync_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="flowd-fsync")
        return _POOL


def _open_fsync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise _storage(e, path) from None
    try:
        _fsync(fd, path)
    finally:
        os.close(fd)


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


def _new_file(path: str, data: bytes, mode: int, *, chmod: bool, checksum: bool) -> None:
    """``path`` made new (O_EXCL, no link followed) holding ``data``, with ``mode``
    and, with ``checksum``, its stamp: ``Durable.create`` and ``scratch_create``.
    OSError as it comes; a file it could not finish (the disk full) is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if chmod:
            os.fchmod(fd, mode)
        if checksum:
            summer = checksum_mod.Summer()
            summer.update(data)
            checksum_mod.stamp(fd, summer)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            _quiet_unlink(path)
        raise
    os.close(fd)


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
