"""Lanes: a bounded set of daemon worker threads fed by one queue (stdlib only).

The Docker executor runs its engine calls on lanes, so a wait on a container
that runs for hours never holds up ``close()`` or the interpreter's exit
(``ThreadPoolExecutor`` joins its workers at exit; these are daemon threads).
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("flowd.executor.docker")


class Lane:
    """A bounded set of daemon worker threads fed by one queue."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = max(1, size)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                fut.set_exception(RuntimeError("executor is closed"))
                return fut
            self._queue.put((fut, fn, args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                th = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                      daemon=True)
                self._threads.append(th)
                th.start()
        return fut

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - kept in the future
                    log.exception("%s job %s failed", self.name, getattr(fn, "__name__", fn))
                    fut.set_exception(e)
            self._idle.release()
