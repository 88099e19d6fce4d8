"""Deleting what a task's script left: never raising, never following a link.

``remove_tree`` deletes a folder as far as this process can (fd-relative, its
own stack, flowd's own unreadable folders made 0700 first) and says what it
could not delete; ``Reaper`` deletes folders that are out of the protocol on a
thread of its own, from ``SPOOL/trash/`` (``flowd.fsops.Durable.rmtree``
renames them there), so neither the loop nor a start waits for a script's
million files, nor fails on a folder a script made undeletable.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time

from .textsafe import for_log

log = logging.getLogger("flowd.fsops")

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
