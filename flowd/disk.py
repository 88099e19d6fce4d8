"""The spool's free-space floor (config key min_free_space).

Below the floor, runs pause (nothing new is claimed), submissions, uploads
and pushes are refused, spool drops wait in incoming/, and a task result
that cannot be committed waits (``deferred``) until space is freed; then
everything resumes by itself (docs/operations.md).
"""
from __future__ import annotations

import logging
import os
import shutil

from .errors import DiskFull

log = logging.getLogger("flowd")

DISK_CHECK_EVERY = 2.0  # seconds between the loop's checks (every tick checks too)
# The spool is also "full" with fewer free inodes than this (or than 1% of them on
# a small filesystem): every item is a file, and a split of millions of lines
# can take the last ones while bytes are left.
MIN_FREE_INODES = 10_000


class Disk:
    def __init__(self, d):
        self.d = d  # the Daemon: its config, events and status line
        self.ok = True
        self.free = 0
        self.deferred: list[object] = []  # results that could not be committed: disk full

    def _free(self) -> int:
        return shutil.disk_usage(self.d.spool).free

    def inodes_short(self) -> int | None:
        """The free inodes when they are below the floor (MIN_FREE_INODES), else None
        (also for a filesystem that does not count them)."""
        st = os.statvfs(self.d.spool)
        if st.f_files and st.f_favail < min(MIN_FREE_INODES, st.f_files // 100):
            return st.f_favail
        return None

    def check(self) -> None:
        free = self._free()
        self.free = free
        self.set(free >= self.d.cfg.min_free_space and self.inodes_short() is None)

    def set(self, ok: bool) -> None:
        d = self.d
        if ok == self.ok:
            return
        self.ok = ok
        if ok:
            log.info("spool has %s free again: runs resume", _mib(self.free))
            for ev in self.deferred:
                d.events.put(ev)
            self.deferred = []
            d.report(None)  # wake the loop to commit what waited
        else:
            inodes = self.inodes_short()
            log.warning("spool %s is below its free-space floor (%s free, min_free_space %s%s): "
                        "runs pause, submissions and pushes are refused", d.spool,
                        _mib(self._free()), _mib(d.cfg.min_free_space),
                        "" if inodes is None else f"; {inodes} inodes free, below flowd's floor")
        d.notifier.status(d.status_line())

    def defer(self, ev: object) -> None:
        """A result that could not be committed: kept until space is freed."""
        self.deferred.append(ev)
        self.set(False)

    def check_space(self, need: int) -> None:
        """DiskFull unless ``need`` more bytes leave the spool above its floor."""
        free = self._free()
        if free - need < self.d.cfg.min_free_space:
            self.free = free
            if free < self.d.cfg.min_free_space:
                self.set(False)
            raise DiskFull(
                f"the spool {self.d.spool} has {_mib(free)} free; with this {_mib(need)} it would "
                f"go below its floor of {_mib(self.d.cfg.min_free_space)} (min_free_space): "
                "free some space (flowd resumes by itself) and try again")


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"
