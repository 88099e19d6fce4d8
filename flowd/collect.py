"""Collection: what a task's container left in work/ becomes flowd's own items.

What a container leaves is hostile (docs/reliability.md, "Collection"): an
item is never the container's own inode. Each declared output is opened once,
through its folder's descriptor, without following links (lstat first, so
nothing but a regular file or a folder is ever opened; then fstat: the very
inode checked), and its bytes are copied into a new file flowd creates and
owns (mode 0640, no setuid, one link), stamped with its checksum and
fsynced. The result is exactly the files copied.
"""
from __future__ import annotations

import itertools
import os
import stat
from typing import Callable, NamedTuple

from .channelvalues import MAX_SPLIT_ITEMS, SPLIT_SYNC_BATCH, LineSplitter
from .fsops import Durable, file_kind

MAX_OUTPUT_FILES = 10_000  # per output name, when the script writes a folder


class TaskOutputError(Exception):
    """The script's outputs break the rules (a task failure, not a crash)."""


class CollectStopped(Exception):
    """The daemon is stopping: a long collect gives up (done again at the next start)."""


class Span(NamedTuple):
    """A split output's items, told by their count, never listed: the files
    ``rel/000000000`` .. ``rel/%09d`` of ``count - 1``, each one item of
    ``channel`` in that order (a split writes them so; so does a cache hit)."""

    channel: str
    rel: str
    count: int


def split_name(k: int) -> str:
    """The name of a split output's item ``k`` (0 first) in its folder."""
    return f"{k:09d}"


def collected(outdir: str, attempt: int, outputs: list[tuple[str, bool]]) -> list:
    """What ``out/`` holds as attempt ``attempt``'s outputs, read back, in order:
    (channel, rel) per item, and a ``Span`` for a split output. ``outputs``
    is (channel, split) per output; output J is ``out/A.J``, a file or a
    folder of items by name (a collect makes them, and so does a cache hit:
    flowd/cache.py). A split's folder is never listed: its count is found by
    looking up names (``_span_count``), so 10 million items cost no list."""
    result: list = []
    for j, (channel, split) in enumerate(outputs):
        rel = f"out/{attempt}.{j}"
        dst = os.path.join(outdir, f"{attempt}.{j}")
        if split and os.path.isdir(dst):
            result.append(Span(channel, rel, _span_count(dst)))
        elif os.path.isdir(dst):
            result += [(channel, f"{rel}/{n}") for n in sorted(os.listdir(dst))]
        elif os.path.lexists(dst):
            result.append((channel, rel))
    return result


def _span_count(folder: str) -> int:
    """How many items a split folder holds: its names are 0, 1, ... with no gap,
    so the first missing one is found by doubling, then halving (about 50
    lookups for 10 million)."""
    def has(k: int) -> bool:
        return os.path.lexists(os.path.join(folder, split_name(k)))

    if not has(0):
        return 0
    hi = 1
    while has(hi):
        hi *= 2
    lo = hi // 2  # has(lo), not has(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if has(mid):
            lo = mid
        else:
            hi = mid
    return hi


def collect(fs: Durable, work: str, outdir: str, attempt: int, outputs: list[tuple],
            max_output_bytes: int | None = None, max_split_items: int = MAX_SPLIT_ITEMS,
            stopping: Callable[[], bool] | None = None) -> list:
    """Copy the declared outputs from ``work`` into ``outdir``: see ``Collector.collect``."""
    return Collector(fs, work, outdir, max_output_bytes, max_split_items,
                     stopping).collect(attempt, outputs)


class Collector:
    """One task's collect: ``work`` (the container's /task) into ``outdir`` (out/)."""

    def __init__(self, fs: Durable, work: str, outdir: str, max_output_bytes: int | None,
                 max_split_items: int = MAX_SPLIT_ITEMS, stopping: Callable[[], bool] | None = None):
        self.fs, self.work, self.outdir = fs, work, outdir
        self.max_output_bytes = max_output_bytes
        self.max_split_items = max_split_items
        # True once the daemon stops: a split checks it between batches (CollectStopped)
        self.stopping = stopping

    def collect(self, attempt: int, outputs: list[tuple]) -> list:
        """Copy the declared outputs from work/ into out/; returns (channel, rel)
        per item in order, and a ``Span`` for a split output (``collected``).

        ``outputs`` is the process's (channel, as-name[, split]) list; a split
        of ``"lines"`` makes one item per line (``_split_output``). A regular file is
        one item; a folder gives one item per regular file in it, by name; no
        file gives no item. Anything else (a link, a FIFO, a device, a folder
        in the folder, a hard link, an oversized file) is a TaskOutputError.

        What a container leaves is hostile (docs/reliability.md), so an item is
        never the container's own inode: each output is opened once, without
        following links, through the descriptor of its folder; the open file
        is checked (fstat) and its bytes are copied into a new file that flowd
        creates and owns, mode 0640, no setuid, one link, stamped with its
        checksum and fsynced. Nothing is looked up twice: a name swapped
        during the collect is either the file checked or not collected. The
        result is exactly the files copied.

        Idempotent (a crash can stop it half-way and the restarted daemon
        collects the same attempt again): output J of attempt A is built as
        ``out/.A.J.tmp`` and renamed whole to ``out/A.J`` (a file, or a
        folder of files named 000000, 000001... in the order of the names the
        script gave), so an output found in out/ is complete and not copied
        again; the result is read back from ``out/``.
        """
        work, outdir, fs = self.work, self.outdir, self.fs
        made = False
        wfd = os.open(work, _DIR_OPEN)
        try:
            for j, (channel, as_name, *split) in enumerate(outputs):
                dst = os.path.join(outdir, f"{attempt}.{j}")
                if os.path.lexists(dst):
                    continue  # an earlier collect of this attempt finished it
                made = self._collect_one(wfd, as_name, dst, split[0] if split else None) or made
        finally:
            os.close(wfd)
        result = collected(outdir, attempt, [(channel, bool(split and split[0]))
                                             for channel, _, *split in outputs])
        if made or result:
            # also when an earlier collect of this attempt made them all: its
            # fsync of out/ may never have run (a kill -9 right before it)
            fs.fsync_dir(outdir)
        return result

    def _collect_one(self, wfd: int, as_name: str, dst: str, split: str | None = None) -> bool:
        """Copy one declared output into ``dst`` (``split="lines"``: one item per
        line, ``_split_output``); False when the script wrote none."""
        fs = self.fs
        fd = _open_output(wfd, as_name, as_name)
        if fd is None:
            return False
        tmp = os.path.join(os.path.dirname(dst), "." + os.path.basename(dst) + ".tmp")
        try:
            st = os.fstat(fd)
            if split == "lines":
                self._split_output(fd, st, tmp, as_name)
                fs.rename(tmp, dst, sync=False)
                _drop(wfd, [as_name])
                return True
            if stat.S_ISREG(st.st_mode):
                self._check_output(st, as_name)
                self._copy_output(fd, st, dst, as_name)  # via .A.J.tmp, renamed whole
                _drop(wfd, [as_name])
                return True
            # a folder: one item per regular file in it, in name order
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
                os.fchmod(fd, 0o700)  # flowd's own folder, left unsearchable by the script
            names = _list_output(fd, as_name)
            self._new_tmp(tmp)
            for k, n in enumerate(names):
                label = f"{as_name}/{n}"
                ffd = _open_output(fd, n, label, folder_ok=False)
                if ffd is None:
                    continue  # gone since the listing: not collected
                try:
                    fst = os.fstat(ffd)
                    self._check_output(fst, label)
                    self._copy_output(ffd, fst, os.path.join(tmp, f"{k:06d}"), label, sync_dir=False)
                finally:
                    os.close(ffd)
            fs.fsync_dir(tmp)
            fs.rename(tmp, dst, sync=False)
            _drop(fd, names)
            return True
        finally:
            os.close(fd)

    def _new_tmp(self, tmp: str) -> None:
        """An empty ``out/.A.J.tmp/`` (what an earlier collect of this attempt left goes)."""
        if os.path.lexists(tmp):
            self.fs.rmtree(tmp)
        self.fs.mkdir(tmp, sync_parent=False)

    def _split_output(self, fd: int, st: os.stat_result, tmp: str, as_name: str) -> None:
        """``output@split="lines"``: one item per line of the output file, in
        order, streamed (flowd.channelvalues.LineSplitter), into ``tmp`` as
        files 000000000, 000000001..., then renamed whole like a folder output.
        The item files are written unsynced and fsynced ``SPLIT_SYNC_BATCH`` at
        a time (``Durable.sync_many``: one group commit each), then the folder,
        before the rename: never one fsync round per line."""
        fs = self.fs
        if stat.S_ISDIR(st.st_mode):
            raise TaskOutputError(f"output {as_name} is a folder; split=\"lines\" takes a file "
                                  "(or stdout)")
        self._check_output(st, as_name)
        self._new_tmp(tmp)
        cap = self.max_output_bytes
        with os.fdopen(os.dup(fd), "rb", buffering=0) as src:
            lines = LineSplitter((src if cap is None else _Capped(src, cap, as_name)).read)
            batch: list[str] = []
            k = 0
            most = self.max_split_items
            more = True
            while more:
                more = lines.more()
                if more:
                    if k >= most:
                        raise TaskOutputError(f"output {as_name} has more than {most} lines; "
                                              f"split=\"lines\" gives at most {most} items "
                                              "(the daemon's max_split_lines)")
                    path = os.path.join(tmp, split_name(k))
                    if _write_line(fs, path, lines.line()):
                        batch.append(path)  # an empty item has no data to lose
                    k += 1
                if batch and (len(batch) >= SPLIT_SYNC_BATCH or not more):
                    fs.sync_many(files=batch)  # one site: a full batch and the last one
                    batch = []
                if k % SPLIT_SYNC_BATCH == 0 and self.stopping is not None and self.stopping():
                    raise CollectStopped("the daemon is stopping")
        fs.fsync_dir(tmp)

    def _copy_output(self, fd: int, st: os.stat_result, path: str, label: str, *,
                     sync_dir: bool = False) -> None:
        """A new, daemon-owned item file at ``path`` with the bytes of ``fd``."""
        cap = self.max_output_bytes
        src = os.fdopen(os.dup(fd), "rb", buffering=0)
        with src:
            reader = src if cap is None else _Capped(src, cap, label)
            self.fs.write_file(path, reader, mode=ITEM_MODE, checksum=True, sync_dir=sync_dir)

    def _check_output(self, st: os.stat_result, label: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise TaskOutputError(f"output {label} is {file_kind(st.st_mode)}; only regular files become items")
        if st.st_nlink != 1:
            raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
        if self.max_output_bytes is not None and st.st_size > self.max_output_bytes:
            raise TaskOutputError(
                f"output {label} is {st.st_size} bytes; the limit is {self.max_output_bytes}")


ITEM_MODE = 0o640  # every item: owned by flowd, no setuid, readable by its group at most


def _write_line(fs: Durable, path: str, pieces) -> int:
    """One split item: made in place (its folder is not live: a collect cut short
    makes it again whole), stamped, not fsynced; a line longer than one read
    (in several pieces) is streamed through a temp name instead. Its size."""
    first = next(pieces, b"")
    more = next(pieces, None)
    if more is None:
        fs.create(path, first, mode=ITEM_MODE, checksum=True)
        return len(first)
    return fs.write_file(path, itertools.chain((first, more), pieces), mode=ITEM_MODE,
                         checksum=True, sync=False)
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_output(dfd: int, name: str, label: str, *, folder_ok: bool = True) -> int | None:
    """Open an output once, through its folder's descriptor; None if it is not there.

    lstat first, so nothing but a regular file or a folder is ever opened (a
    device's open can act); then open without following a link and without
    blocking, and fstat what was opened: it must be the very inode checked,
    and it is what gets copied.
    """
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder the script left unsearchable (not flowd's to change)
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror}); "
                              "leave outputs readable") from None
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        # before the open: a link to a file elsewhere must never be opened, even if
        # its name here goes away right after (the count would then read 1 again)
        raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
    if stat.S_ISDIR(st.st_mode) and not folder_ok:
        raise TaskOutputError(f"output {label} is a folder; only regular files become items")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise TaskOutputError(f"output {label} is {file_kind(st.st_mode)}; only regular files become items")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except PermissionError:
        if st.st_uid != os.geteuid():
            raise TaskOutputError(f"output {label} cannot be read by flowd (owner uid {st.st_uid}, "
                                  f"mode {stat.S_IMODE(st.st_mode):o}); leave outputs readable") from None
        fd = _reopen_own(dfd, name, st, label)
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be opened: {e.strerror}") from None
    try:
        got = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not os.path.samestat(st, got):
        os.close(fd)
        raise TaskOutputError(f"output {label} changed while flowd collected it")
    if stat.S_ISREG(got.st_mode):
        os.set_blocking(fd, True)
    return fd


def _reopen_own(dfd: int, name: str, st: os.stat_result, label: str) -> int:
    """The script made its own output unreadable; the file is flowd's (same uid),
    so flowd gives itself read permission on that very inode (through an
    O_PATH descriptor, never a second lookup of the name) and opens it."""
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror})") from None
    try:
        got = os.fstat(pfd)
        if not os.path.samestat(st, got):
            raise TaskOutputError(f"output {label} changed while flowd collected it")
        if stat.S_ISREG(got.st_mode) and got.st_nlink != 1:
            raise TaskOutputError(f"output {label} is a hard link; write a new file instead")
        folder = stat.S_ISDIR(st.st_mode)
        proc = f"/proc/self/fd/{pfd}"
        os.chmod(proc, 0o700 if folder else 0o600)
        return os.open(proc, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    except OSError as e:
        raise TaskOutputError(f"output {label} cannot be read by flowd ({e.strerror})") from None
    finally:
        os.close(pfd)


def _drop(dfd: int, names: list[str]) -> None:
    """Unlink what was copied from work/ once its copy is complete in out/, so an
    output does not take its room twice until the task folder goes (only after
    out/A.J is whole: a collect done again after a crash finds it there)."""
    for n in names:
        try:
            os.unlink(n, dir_fd=dfd)
        except OSError:
            pass  # scratch: it goes with the task folder anyway


def _list_output(fd: int, label: str) -> list[str]:
    """The names in an output folder (by its descriptor), sorted; bounded."""
    names = []
    with os.scandir(fd) as it:
        for entry in it:
            names.append(entry.name)
            if len(names) > MAX_OUTPUT_FILES:
                raise TaskOutputError(
                    f"output {label}/ holds more than {MAX_OUTPUT_FILES} entries; that is the limit")
    names.sort()
    return names


class _Capped:
    """A reader that fails once more than ``cap`` bytes came (a file that grew)."""

    def __init__(self, f, cap: int, label: str):
        self.f, self.left, self.label, self.cap = f, cap, label, cap

    def read(self, n: int) -> bytes:
        chunk = self.f.read(min(n, self.left + 1))
        self.left -= len(chunk)
        if self.left < 0:
            raise TaskOutputError(f"output {self.label} is over {self.cap} bytes; that is the limit")
        return chunk
