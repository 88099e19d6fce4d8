"""Item checksums: a CRC-32, the size and a SHA-256, kept in an extended attribute of the file.

The attribute lives in the inode, so it moves with every rename and is
shared by the hard links a mux makes; the file's fsync makes it durable with
the data. Every item is stamped when it enters a channel (submitted, pushed,
or collected from a task) and checked before a script is given it (by the
executor, on its own thread: ``executor.base.check_inputs``): a flipped
byte or a truncated file is found and the item quarantined, never fed to a
script and never deleted. On a filesystem without user extended attributes
items carry no stamp and are not checked (flowd says so once in its log).

The SHA-256 is the item's content hash for the cache (flowd/cache.py). It is
computed the first time a cache key needs it (``content_hash``, on a cache
lookup's thread, streamed), checked against the CRC and size in the same
pass, and added to the stamp (``CRC:SIZE:SHA256``), so it is computed once
per item and shared by every hard link to it. Items that never meet a
process with ``cache="yes"`` never pay for it: a SHA-256 costs about twice
a CRC-32 (441 against 929 MB/s here), and collecting happens on the loop.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import zlib

XATTR = "user.flowd.crc32"
CHUNK = 1024 * 1024
_NO_XATTRS = ("cannot record an item checksum (user extended attributes: %s); "
              "such items are not checked")


class _FirstTimeOnly(logging.Filter):
    """Lets one message (by its format string) through once: a filesystem
    without user extended attributes is said once in the log, not per item."""

    def __init__(self, msg: str) -> None:
        super().__init__()
        self.msg = msg
        self.passed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.msg:
            return True
        first, self.passed = not self.passed, True
        return first


log = logging.getLogger("flowd.checksum")
log.addFilter(_FirstTimeOnly(_NO_XATTRS))


class Summer:
    """A running CRC-32 and size (and, with ``sha=True``, SHA-256), fed while data is written."""

    def __init__(self, sha: bool = False) -> None:
        self.crc = 0
        self.size = 0
        self.sha = hashlib.sha256() if sha else None

    def update(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        if self.sha is not None:
            self.sha.update(data)

    @property
    def value(self) -> bytes:
        base = f"{self.crc:08x}:{self.size}"
        return (base if self.sha is None else f"{base}:{self.sha.hexdigest()}").encode()


def of_file(path: str, sha: bool = False) -> Summer:
    s = Summer(sha)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while chunk := os.read(fd, CHUNK):
            s.update(chunk)
    finally:
        os.close(fd)
    return s


def stamp(target: int | str, summer: Summer) -> None:
    """Record the checksum on a file (an open fd or a path, never followed)."""
    try:
        if isinstance(target, int):
            os.setxattr(target, XATTR, summer.value)
        else:
            os.setxattr(target, XATTR, summer.value, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            log.warning(_NO_XATTRS, e.strerror)  # once: the filter above
            return
        raise


def check_stamp_present(path: str) -> bool | None:
    """Has the file a stamp? None when the filesystem has no extended attributes."""
    try:
        os.getxattr(path, XATTR, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        return False


def stamp_file(path: str) -> None:
    stamp(path, of_file(path))


def check(path: str) -> str | None:
    """None if the file matches its stamp (or the filesystem has no extended
    attributes at all); else why it does not: a missing stamp is a failure."""
    try:
        stored = os.getxattr(path, XATTR, follow_symlinks=False).decode()
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None  # no extended attributes on this filesystem: items are not stamped
        if e.errno == errno.ENODATA:
            # Every item is stamped when it enters a channel: one without a stamp
            # did not come through flowd (or its stamp was stripped). Not a pass.
            return "it has no checksum stamp (it did not enter its channel through flowd)"
        return f"its checksum cannot be read: {e.strerror}"
    try:
        crc_hex, size_text = stored.split(":")[:2]
        want_crc, want_size = int(crc_hex, 16), int(size_text)
    except ValueError:
        return f"its checksum record is unreadable ({stored!r})"
    got = of_file(path)
    if got.size != want_size:
        return f"truncated or grown: {got.size} bytes, {want_size} when it was stored"
    if got.crc != want_crc:
        return f"checksum mismatch: CRC-32 {got.crc:08x}, {want_crc:08x} when it was stored"
    return None


def content_hash(path: str) -> str:
    """The item's SHA-256 (hex): from its stamp, or read whole (streamed) the first
    time and then added to its stamp, once its CRC and size are found to match
    what the stamp holds (a damaged item is hashed as it is, and not stamped:
    its key then matches no earlier task's)."""
    try:
        stored = os.getxattr(path, XATTR, follow_symlinks=False).decode()
    except (OSError, UnicodeDecodeError):
        stored = ""
    parts = stored.split(":")
    if len(parts) == 3 and len(parts[2]) == 64:
        return parts[2]
    got = of_file(path, sha=True)
    if len(parts) == 2 and parts[0] == f"{got.crc:08x}" and parts[1] == str(got.size):
        try:
            os.setxattr(path, XATTR, got.value, follow_symlinks=False)
        except OSError:
            pass  # not kept: computed again next time
    return got.sha.hexdigest()
