"""Every change flowd makes to its spool goes through ``Durable``.

The crash rules live here, in one place: a file counts only once its data is
fsynced and it has been renamed into place; the folder is fsynced after each
create, rename, unlink and mkdir; a failed fsync is fatal (never retried:
after the kernel drops dirty pages a retry can falsely succeed).

Each operation is a *durability point*. For the crash tests, the environment
variable ``FLOWD_CRASH_AT=N`` ends the process (``os._exit``) just before the
N-th point, and ``FLOWD_CRASH_TRACE=FILE`` appends one line per point, so a
test can count the points of a workflow and sweep every one of them.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import BinaryIO, Iterable

from .errors import DiskFull, StorageError

CHUNK = 1024 * 1024
CRASH_EXIT = 86  # exit status of a test-only crash


class Durable:
    def __init__(self, *, crash_at: int | None = None, trace: str | None = None):
        if crash_at is None and os.environ.get("FLOWD_CRASH_AT"):
            crash_at = int(os.environ["FLOWD_CRASH_AT"])
        self.crash_at = crash_at
        self.points = 0
        trace = trace or os.environ.get("FLOWD_CRASH_TRACE")
        self._trace = open(trace, "a", buffering=1) if trace else None

    # -- the test hook ---------------------------------------------------
    def point(self, what: str, path: str) -> None:
        self.points += 1
        if self._trace is not None:
            self._trace.write(f"{self.points} {what} {path}\n")
        if self.crash_at is not None and self.points >= self.crash_at:
            os._exit(CRASH_EXIT)

    # -- primitives --------------------------------------------------------
    def fsync_dir(self, path: str) -> None:
        self.point("fsync", path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)

    def fsync_file(self, path: str) -> None:
        self.point("fsync", path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            _fsync(fd, path)
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int = 0o755, *, sync_parent: bool = True) -> None:
        self.point("mkdir", path)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as e:
            raise _storage(e, path) from None
        os.chmod(path, mode)  # not subject to the umask
        if sync_parent:
            self.fsync_dir(os.path.dirname(path))

    def rename(self, src: str, dst: str, *, sync: bool = True) -> None:
        self.point("rename", dst)
        try:
            os.rename(src, dst)
        except OSError as e:
            raise _storage(e, dst) from None
        if sync:
            self.fsync_dir(os.path.dirname(dst))
            if os.path.dirname(src) != os.path.dirname(dst):
                self.fsync_dir(os.path.dirname(src))

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
        """Remove a folder that is already out of the protocol (hidden/retired)."""
        self.point("rmtree", path)
        _rmtree(path)

    def write_file(
        self,
        path: str,
        data: bytes | Iterable[bytes] | BinaryIO,
        *,
        mode: int = 0o644,
        sync_dir: bool = True,
    ) -> int:
        """Write ``path`` atomically: temp name, fsync, rename, fsync folder.

        ``data`` may be bytes, an iterable of chunks or a binary file object;
        it is streamed, never held whole. Returns the number of bytes written.
        """
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.tmp")
        self.point("create", tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        except OSError as e:
            raise _storage(e, tmp) from None
        size = 0
        try:
            for chunk in _chunks(data):
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            os.fchmod(fd, mode)
            self.point("fsync", tmp)
            _fsync(fd, tmp)
        except OSError as e:
            os.close(fd)
            _quiet_unlink(tmp)
            raise _storage(e, tmp) from None
        except BaseException:
            os.close(fd)
            _quiet_unlink(tmp)
            raise
        os.close(fd)
        self.rename(tmp, path, sync=sync_dir)
        return size

    def copy_file(self, src: str, dst: str, *, mode: int = 0o644) -> int:
        """Copy ``src`` to ``dst`` atomically; the source is opened without following links."""
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return self.write_file(dst, f, mode=mode)


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


def _storage(e: OSError, path: str) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the spool's filesystem (writing {path})")
    return StorageError(f"{e.strerror or e} ({path})")


def _quiet_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _rmtree(path: str) -> None:
    """rmtree that also removes entries whose folders a container made read-only."""

    def onerror(func, p, exc_info):
        err = exc_info[1]
        if isinstance(err, FileNotFoundError):
            return
        if isinstance(err, PermissionError):
            parent = os.path.dirname(p)
            try:
                os.chmod(parent, stat.S_IRWXU)
                func(p)
                return
            except OSError:
                pass
        raise err

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)
