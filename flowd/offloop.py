"""Work the daemon's loop hands to a few threads, and gets back as an answer.

The loop never blocks on a long job (a cache lookup hashes inputs; a split
collect writes millions of files). ``OffLoop.submit(work, answer)`` runs
``work()`` on a thread; then ``answer(outcome)`` (what ``work`` returned, or
the exception it raised) is handed to the loop through ``report`` (the
daemon's event queue: ``Daemon._drain_events`` calls it there). Stdlib only.

``run_inline``: ``work`` runs at once on the caller's thread, so the order
of operations never hangs on a thread (the crash sweep, tests); its answer
still goes through ``report`` when there is one, as the daemon's would.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from typing import Callable

log = logging.getLogger("flowd.offloop")

tokens = itertools.count(1)  # tell one piece of work from a later one for the same task


class OffLoop:
    def __init__(self, threads: int, name: str, report: Callable[[object], None] | None = None,
                 run_inline: bool = False):
        self.threads, self.name = threads, name
        self.report, self.run_inline = report, run_inline
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def stopping(self) -> bool:
        """True once closed: long work checks it and gives up (the daemon is stopping)."""
        return self._closed.is_set()

    def submit(self, work: Callable[[], object], answer: Callable[[object], None]) -> None:
        def job() -> None:
            try:
                outcome = work()
            except Exception as e:  # noqa: BLE001 - the answer decides what an error means
                outcome = e
            if self.report is None:
                answer(outcome)  # at once, on this thread (tests without a loop)
            else:
                self.report(lambda: answer(outcome))

        if self.run_inline:
            job()
            return
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, self.name)
        self._pool.submit(_logged, job)

    def close(self) -> None:
        self._closed.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _logged(job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # noqa: BLE001 - a bug must not kill the pool's thread silently
        log.exception("work handed off the loop failed")
