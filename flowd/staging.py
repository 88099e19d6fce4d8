"""Uploads in progress: the files a client sends in chunks (stdlib only).

``flowctl submit`` sends a workflow and the files it names (an *upload*),
``flowctl push`` one new item of a running run (a *push*). Each lives in its
own folder ``SPOOL/uploads/ID/`` until it is submitted, pushed or dropped.
What bounds them (docs/operations.md, "Limits"):

- **Owner.** An upload belongs to the uid that began it (SO_PEERCRED, from
  the kernel). Any other uid is told it does not exist, exactly as for an
  unknown id, so ids cannot be probed or hijacked. ``uploads/`` and every
  upload folder are ``0700``: only the daemon can list or open them.
- **Size.** An upload declares its size first (a push may leave it out: then
  the daemon's ``max_upload_size`` is its bound); no chunk may take it past
  that. Chunks of a file come in order: a chunk's offset is the number of
  bytes of that file received so far (so there is never a sparse file), and
  a file's first chunk is at offset 0. At most ``MAX_ENTRIES`` files and
  folders per upload.
- **Count and age.** At most ``max_per_uid`` uploads open per uid; the
  daemon's loop drops those older than ``max_age`` (``expire``).
- A push's CRC-32 is computed while it is received (``Upload.summer``), so
  the item is never read again on the loop.

The daemon checks the spool's free-space floor before each begin and each
chunk; this class keeps no knowledge of the config. Every change goes
through the daemon's ``Durable`` (its scratch files: no fsync, as uploads do
not outlive the daemon).
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field

from . import checksum
from .collect import ITEM_MODE
from .errors import Conflict, DiskFull, NotFound, StorageError, UsageError
from .fsops import Durable

UPLOAD_MAX_AGE = 3600.0  # seconds an upload may stay open
MAX_PER_UID = 16  # uploads and pushes open at once, per uid
MAX_ENTRIES = 110_000  # files and folders in one upload: a glob of 100,000 files (MAX_GLOB_MATCHES), its folders and more
_SAFE_PART = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,254}$")
PUSH_FILE = "item"


@dataclass(eq=False)
class Upload:
    id: str
    uid: int | None
    kind: str  # "upload" or "push"
    path: str  # its folder
    size: int  # the most bytes it may hold (declared, or the daemon's bound)
    declared: bool  # size was given by the client
    created: float  # monotonic
    received: int = 0  # bytes, all files together
    entries: int = 0  # files and folders made
    summer: checksum.Summer | None = None  # a push's running checksum
    meta: dict = field(default_factory=dict)  # a push's run and channel
    folders: set = field(default_factory=set)  # its folders made and checked (relative paths)
    # An upload's files sent in chunks (upload_chunk), with their running checksums:
    # stamped when the upload is taken. A file sent whole (upload_files) is stamped
    # as it is written, so that every file of a taken upload is an item as it is.
    summers: dict = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Bytes declared and not yet received (what the disk must still take)."""
        return self.size - self.received if self.declared else 0


class Staging:
    """The open uploads of one spool: bounded per uid, expiring, each bound to its uid."""

    def __init__(self, root: str, fs: Durable, *, max_per_uid: int = MAX_PER_UID,
                 max_age: float = UPLOAD_MAX_AGE, max_entries: int = MAX_ENTRIES):
        self.root = root
        self.fs = fs
        self.max_per_uid = max_per_uid
        self.max_age = max_age
        self.max_entries = max_entries
        self.open: dict[str, Upload] = {}
        self.chmod = _umask_strips(ITEM_MODE)  # an fchmod per file only if the umask takes bits

    def reset(self) -> None:
        """At start: what a previous life left is dropped; the folder is made ``0700``."""
        self.fs.rmtree(self.root)
        self.fs.mkdir(self.root, 0o700, sync_parent=False)
        self.open.clear()

    # -- the requests ------------------------------------------------------------
    def begin(self, uid: int | None, kind: str, size: int, now: float, *, declared: bool = True,
              **meta) -> Upload:
        mine = [u for u in self.open.values() if u.uid == uid]
        if len(mine) >= self.max_per_uid:
            raise Conflict(f"you have {len(mine)} uploads and pushes open, the most one user may "
                           f"have at once; let them finish, or wait for the oldest to expire "
                           f"({_age(self.max_age)} after it began)")
        upload_id = secrets.token_hex(8)
        while upload_id in self.open:  # 64 random bits: for form's sake
            upload_id = secrets.token_hex(8)
        path = os.path.join(self.root, upload_id)
        try:
            self.fs.scratch_mkdir(path, 0o700)
        except OSError as e:
            raise _storage(e, "cannot make an upload folder") from None
        up = Upload(upload_id, uid, kind, path, size, declared, now, meta=meta,
                    summer=checksum.Summer() if kind == "push" else None)
        self.open[upload_id] = up
        return up

    def get(self, upload_id: str, uid: int | None, kind: str) -> Upload:
        """The caller's open upload, or NotFound (also for another uid's: ids cannot be probed)."""
        up = self.open.get(upload_id)
        if up is None or up.uid != uid or up.kind != kind:
            raise NotFound(f"that {kind} is unknown: it expires {_age(self.max_age)} after it "
                           "began, ends when flowd restarts, and belongs to the user who began it")
        return up

    def write_whole(self, up: Upload, rel: str, data: bytes) -> int:
        """File ``rel`` of the upload, sent whole (``upload_files``): made in one
        go (open, write, checksum stamp, close: an item as it is, mode
        ``ITEM_MODE``). A file already there is appended to as by ``write``
        at offset 0 (which refuses it unless it is empty)."""
        target = self._target(up, rel, len(data))
        self._count(up)
        try:
            self.fs.scratch_create(target, data, mode=ITEM_MODE, chmod=self.chmod)
        except FileExistsError:
            return self.write(up, rel, 0, data)
        except OSError as e:
            raise _storage(e, f"cannot store {rel}") from None
        up.entries += 1
        up.received += len(data)
        return len(data)

    def write(self, up: Upload, rel: str, offset: int, data: bytes) -> int:
        """Append ``data`` to file ``rel`` of the upload at ``offset`` (which
        must be the file's size so far); returns the bytes written."""
        target = self._target(up, rel, len(data))
        if offset == 0:
            self._count(up)
        try:
            made, have = self.fs.scratch_write(target, data, offset, create=offset == 0)
        except FileNotFoundError:
            raise UsageError(f"{rel}: the first chunk of a file is at offset 0, "
                             f"not {offset}") from None
        except OSError as e:
            raise _storage(e, f"cannot store {rel}") from None
        up.entries += made
        if offset != have:
            raise UsageError(f"{rel}: chunk at offset {offset}, but {have} bytes of it "
                             "were received so far; send the chunks of a file in order")
        up.received += len(data)
        if up.summer is not None:
            up.summer.update(data)
        elif up.kind == "upload":
            summer = up.summers.get(rel)
            if summer is None and offset:  # more to a file sent whole: summed again from its start
                up.summers[rel] = checksum.of_file(target)
            elif summer is None:
                up.summers[rel] = summer = checksum.Summer()
                summer.update(data)
            else:
                summer.update(data)
        return len(data)

    def _target(self, up: Upload, rel: str, size: int) -> str:
        """Where file ``rel`` of the upload goes, its folders made; checks the
        path and that ``size`` more bytes fit."""
        parts = rel.split("/")
        if not all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts):
            raise UsageError(f"upload path {rel!r} is not a plain relative path "
                             "(names of letters, digits, '.', '_', '+', '-' and spaces)")
        if up.received + size > up.size:
            what = "its declared size" if up.declared else "max_upload_size, the most flowd takes"
            raise UsageError(f"this chunk of {rel} would take the {up.kind} to "
                             f"{up.received + size} bytes, past {what} ({up.size} bytes)")
        folder = up.path
        for i, part in enumerate(parts[:-1]):
            folder = os.path.join(folder, part)
            known = "/".join(parts[:i + 1])
            if known in up.folders:
                continue
            try:
                self._count(up)
                if self.fs.scratch_mkdir(folder, 0o700):
                    up.entries += 1
            except OSError as e:
                raise _storage(e, f"cannot store {rel}") from None
            if os.path.islink(folder) or not os.path.isdir(folder):
                raise UsageError(f"upload path {rel!r} is not a plain relative path")
            up.folders.add(known)
        return os.path.join(folder, parts[-1])

    def _count(self, up: Upload) -> None:
        if up.entries >= self.max_entries:
            raise UsageError(f"an upload holds at most {self.max_entries} files and folders")

    def take(self, up: Upload) -> str:
        """The upload leaves the table; its folder is the caller's to consume.
        Every file in it is then stamped with its checksum and has mode
        ``ITEM_MODE`` (``RunStore.put_initial_file(stamped=True)`` links it
        into a channel as it is): those sent in chunks are stamped here, from
        the checksums computed while they came in (never read again)."""
        self.open.pop(up.id, None)
        for rel, summer in up.summers.items():
            path = os.path.join(up.path, *rel.split("/"))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, ITEM_MODE)
                    checksum.stamp(fd, summer)
                finally:
                    os.close(fd)
            except OSError as e:
                self.discard(up)
                raise _storage(e, f"cannot stamp {rel}") from None
        up.summers.clear()
        return up.path

    def push_item(self, up: Upload) -> str:
        """The push leaves the table; returns its item, stamped with the checksum
        computed while its chunks came in (never read whole on the loop). The
        caller ``discard``s the push once the item is in its channel."""
        self.take(up)
        item = os.path.join(up.path, PUSH_FILE)
        self.fs.scratch_write(item, b"", 0, create=True)  # a push with no chunk: an empty item
        checksum.stamp(item, up.summer)
        return item

    def discard(self, up: Upload) -> None:
        self.open.pop(up.id, None)
        self.fs.rmtree(up.path)

    # -- the loop's side -----------------------------------------------------------
    def pending(self) -> int:
        """Bytes declared by open uploads and not received yet."""
        return sum(u.pending for u in self.open.values())

    def next_deadline(self) -> float | None:
        if not self.open:
            return None
        return min(u.created for u in self.open.values()) + self.max_age

    def expire(self, now: float) -> list[Upload]:
        """Drop the uploads older than ``max_age``; returns them."""
        old = [u for u in self.open.values() if now - u.created >= self.max_age]
        for up in old:
            self.discard(up)
        return old


def _umask_strips(mode: int) -> bool:
    """Whether the process's umask takes bits from ``mode`` (then files made
    with it need an fchmod); True when it cannot be told (no /proc)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return bool(int(line.split()[1], 8) & mode)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _storage(e: OSError, what: str) -> StorageError:
    if e.errno == 28:  # ENOSPC
        return DiskFull(f"no space left on the spool: {what}")
    return StorageError(f"{what}: {e.strerror}")


def _age(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
