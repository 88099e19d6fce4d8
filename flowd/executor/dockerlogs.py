"""Task logs from the engine: the final log (its tail) and the live one.

Containers log with the ``json-file`` driver, rotated by the executor's
settings (see ``flowd.executor.docker``, "Logs"). ``save`` writes the last
``log_limit`` bytes of stdout+stderr to the task's log path (fsynced, renamed
into place); ``follow`` copies a running container's log into its live file
(the first ``log_limit`` bytes) for ``flowctl logs --follow``.
"""
from __future__ import annotations

import os
from typing import Callable

from ..errors import FlowError
from .base import live_log_path


class LogCopier:
    """``owner`` is the DockerExecutor: its ``link`` and ``log_limit``."""

    def __init__(self, owner):
        self.owner = owner

    @property
    def link(self):
        return self.owner.link

    @property
    def log_limit(self) -> int:
        return self.owner.log_limit

    def save(self, cid: str, path: str) -> None:
        part = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".part")
        stream = self.link.call(self.link.api.logs, cid, stdout=True, stderr=True, stream=True, follow=False)
        try:
            with open(part, "w+b") as f:
                self.copy_tail(stream, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
        except BaseException:
            _unlink(part)
            raise
        finally:
            _close_quietly(stream)

    def copy_tail(self, stream, f) -> None:
        """Write the last ``log_limit`` bytes of a log stream to ``f`` (empty, w+b).

        The file is cut back to its last ``log_limit`` bytes whenever it grows
        past twice that, so the work is linear and the file stays small.
        """
        limit = self.log_limit
        size = 0
        for chunk in self.link.iterate(stream):
            f.write(chunk)
            size += len(chunk)
            if size > 2 * limit:
                size = _keep_tail(f, size, limit)
        if size > limit:
            _keep_tail(f, size, limit)

    def copy_log(self, stream, f, stop: Callable[[], bool] | None = None) -> None:
        """Write a log stream's chunks to ``f`` up to ``log_limit`` bytes (or
        until ``stop()``), each flushed when ``stop`` is given (a live log,
        which also ends once the task is quiet for the client's read timeout)."""
        written = 0
        for chunk in self.link.iterate(stream, quiet_ends=stop is not None):
            if stop is not None and stop():
                return
            chunk = chunk[: self.log_limit - written]
            f.write(chunk)
            written += len(chunk)
            if stop is not None:
                f.flush()
            if written >= self.log_limit:
                return

    def follow(self, t, open_stream=None) -> None:
        """Copy the running container's log into the live file as it comes
        (``open_stream()``: the engine's log stream to follow; default the
        container's, ``t.container_id``; the Swarm executor's is its service's).

        Best effort: the final log (``_save_log``) is the record. The live file
        is (re)written from the start, so an adopted task's is whole again.
        """
        live = live_log_path(t.spec.log_path)
        try:
            if open_stream is None:
                stream = self.link.call(self.link.api.logs, t.container_id, stdout=True, stderr=True,
                                        stream=True, follow=True)
            else:
                stream = open_stream()
        except FlowError:
            t.following = False
            return
        try:
            with open(live, "wb") as f:
                if t.finished:  # _finish ran while we opened it: leave nothing behind
                    _unlink(live)
                    return
                self.copy_log(stream, f, stop=lambda: t.finished or self.link.closed)
        except (OSError, FlowError):
            return  # the final log still comes from the engine
        finally:
            _close_quietly(stream)
            # A task quiet for the client's read timeout ends this copy (not an
            # engine outage); the next `logs --follow` request starts it again
            # and it rewrites the live file whole.
            t.following = False
            if t.finished:  # it ended meanwhile: its final log is (being) saved
                _unlink(live)


class LogSink:
    """A task's log written as it comes, for executors that receive the bytes
    themselves (the warm pool): the live file gets the first ``limit`` bytes,
    each write flushed (``flowctl logs --follow``); ``finish`` writes the
    last ``limit`` bytes as the final log (fsynced, renamed into place) and
    removes the live file, exactly as for a fresh container's log."""

    def __init__(self, path: str, limit: int):
        self.path = path
        self.limit = limit
        self.live_path = live_log_path(path)
        self.part_path = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".part")
        self.live = open(self.live_path, "wb")
        self.part = open(self.part_path, "w+b")
        self.live_size = self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.live is not None and self.live_size < self.limit:
            piece = chunk[: self.limit - self.live_size]
            self.live.write(piece)
            self.live.flush()
            self.live_size += len(piece)
        self.part.write(chunk)
        self.size += len(chunk)
        if self.size > 2 * self.limit:
            self.size = _keep_tail(self.part, self.size, self.limit)

    def finish(self) -> str:
        """Save the final log; "" or a note on why it could not be saved."""
        note = ""
        try:
            if self.size > self.limit:
                self.size = _keep_tail(self.part, self.size, self.limit)
            self.part.flush()
            os.fsync(self.part.fileno())
            os.replace(self.part_path, self.path)
        except OSError as e:
            note = f" (log not saved: {e.strerror or e})"
            _unlink(self.part_path)
        self.close()
        return note

    def close(self) -> None:
        for f in (self.live, self.part):
            try:
                f.close()
            except OSError:
                pass
        _unlink(self.live_path)
        _unlink(self.part_path)


def _keep_tail(f, size: int, limit: int) -> int:
    """Keep only the last ``limit`` of the ``size`` bytes written to ``f``; the new size."""
    f.flush()
    f.seek(size - limit)
    tail = f.read(limit)
    f.seek(0)
    f.write(tail)
    f.truncate(len(tail))
    return len(tail)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _close_quietly(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
