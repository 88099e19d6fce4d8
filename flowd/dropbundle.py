"""Building a drop's private bundle (docs/spool.md): the fd walk, copies, links, limits.

The intake's worker calls ``Bundler.build`` once a drop has been moved into
its staging box (flowd/dropstaging.py). The bundle ``staging/ID/bundle/`` is
scratch, rebuilt from the drop after a crash: ``workflow.xml`` (a file drop is
copied there, at most 1 MiB) and, for a folder, every file and folder under
it, walked with directory fds, ``lstat`` and ``O_NOFOLLOW``: nothing of the
drop is ever opened through a symbolic link. Symbolic links, FIFOs, devices
and sockets are refused; so are files that do not belong to the owner of the
folder (unless that owner is root), more than ``max_entries`` entries or
``max_bytes`` bytes. Files are copied (daemon-owned, so the run's items cannot
be changed through another name or a still-open descriptor); a file the
daemon itself owns with one link is hard-linked instead (cheap).

A drop refused here raises ``Refused`` (its lines say why, for the user's
``rejected/NAME.error``); a daemon stopping mid-copy raises ``Stopped``.
"""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import threading
from typing import Callable

from .fsops import file_kind
from .limits import MAX_XML_BYTES as XML_CAP  # stdlib: lxml stays out of start-up

MAX_DROP_BYTES = 1024 ** 3  # a whole folder drop
MAX_DROP_ENTRIES = 10_000
MAX_DEPTH = 32
CHUNK = 1024 * 1024


class Refused(Exception):
    """The drop is refused before it reaches the parser; ``lines`` say why."""

    def __init__(self, *lines: str):
        super().__init__(lines[0])
        self.lines = list(lines)


class Stopped(Exception):
    """The daemon is stopping: the drop is left in staging/ and taken again at the next start."""


class Bundler:
    """Builds bundles within the limits; ``stopping`` set ends a copy (``Stopped``)."""

    def __init__(self, stopping: threading.Event, *, max_bytes: int = MAX_DROP_BYTES,
                 max_entries: int = MAX_DROP_ENTRIES):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._stopping = stopping
        self._euid = os.geteuid()

    def build(self, staged: str, st: os.stat_result, bundle: str, name: str) -> None:
        """Make ``bundle`` from the staged drop, or raise Refused (``bundle`` then removed)."""
        os.mkdir(bundle, 0o755)
        try:
            if stat.S_ISREG(st.st_mode):
                if not name.endswith(".xml"):
                    raise Refused(
                        f"{name}: not a workflow file: a file dropped here must be named NAME.xml",
                        f"{name}: to send a workflow with its files, drop a folder holding "
                        "workflow.xml and its files")
                self._copy_workflow_file(staged, st, os.path.join(bundle, "workflow.xml"), name)
            elif stat.S_ISDIR(st.st_mode):
                self._copy_folder(staged, st, bundle, name)
            else:
                raise Refused(f"{name}: {file_kind(st.st_mode)}: only a workflow file or a folder "
                               "is taken" + (" (links are never followed: drop the file itself)"
                                             if stat.S_ISLNK(st.st_mode) else ""))
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise

    def _copy_workflow_file(self, staged: str, st: os.stat_result, dst: str, name: str) -> None:
        fd, fst = _open_same(staged, None, os.O_NONBLOCK, st, name)
        try:
            if fst.st_size > XML_CAP:
                raise Refused(_too_big_xml(name))
            _copy_fd(fd, dst, XML_CAP, 0o644, lambda: Refused(_too_big_xml(name)),
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
            raise Refused(f"{name}: a folder dropped here must hold workflow.xml (and the "
                           "files it names); this one has none") from None
        if not stat.S_ISREG(wst.st_mode):
            raise Refused(f"{name}/workflow.xml: not a regular file")

    def _copy_tree(self, dfd: int, out: str, rel: str, owner: int, state: dict, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Refused(f"{rel}: folders nested more than {MAX_DEPTH} deep")
        with os.scandir(dfd) as it:
            entries = sorted(e.name for e in it)
        for entry in entries:
            if self._stopping.is_set():
                raise Stopped()
            path = f"{rel}/{entry}"
            state["entries"] += 1
            if state["entries"] > self.max_entries:
                raise Refused(f"{rel.split('/')[0]}: more than {self.max_entries} files and folders; "
                               "that is more than a drop may hold")
            try:
                est = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = est.st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
                raise Refused(f"{path}: {file_kind(kind)}: a folder drop may hold only regular files "
                               "and folders" + (" (links are never followed: copy the file in)"
                                                if stat.S_ISLNK(kind) else ""))
            if owner != 0 and est.st_uid != owner:
                raise Refused(f"{path}: belongs to {user_name(est.st_uid)}, not to {user_name(owner)} who "
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

            def too_big() -> Refused:
                return Refused(f"{rel.split('/')[0]}: more than {_human(self.max_bytes)} in all; "
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


# -- helpers -------------------------------------------------------------------------
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
    Refused naming ``path``."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dfd)
    except OSError as e:
        raise Refused(*_unreadable(path, e)) from None
    fst = os.fstat(fd)
    if (stat.S_IFMT(fst.st_mode), fst.st_dev, fst.st_ino) != (
            stat.S_IFMT(est.st_mode), est.st_dev, est.st_ino):
        os.close(fd)
        raise Refused(f"{path}: it changed while flowd took it; drop it again")
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
                raise Stopped()
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


