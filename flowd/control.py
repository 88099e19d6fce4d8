"""The control socket: flowd's only ZeroMQ module.

A ROUTER bound on an ``ipc://`` socket (docs/operations.md: its mode and
group), the caller's credentials from the kernel (SO_PEERCRED, which ZeroMQ
gives as a frame's Peer-Address), receiving, decoding, checking and
answering requests. What a command does is the command table's
(flowd/commands); this module only carries requests to it and replies back.
The loop's poller lives here too, since it polls the socket.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import zmq

from . import protocol as P
from .commands import TABLE
from .errors import FlowError, InternalError, UsageError
from .textsafe import for_log

log = logging.getLogger("flowd")

PER_TURN = 256  # requests served in one turn of the loop; then it breathes

# (peer, request id, command, checked arguments, payload) -> reply frames, or None (answered later)
Dispatch = Callable[[bytes, str, str, dict, "bytes | None"], "list[bytes] | None"]


class Control:
    """The ROUTER socket of one daemon, and the poller its loop waits in."""

    def __init__(self, path: str, mode: int):
        self.path = path
        self.mode = mode
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.poller = zmq.Poller()

    def bind(self, gid: int | None) -> None:
        """Bind the socket with its mode (``socket_mode``) and group (``gid``)."""
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        try:
            os.unlink(self.path)  # ours: we hold its lock
        except FileNotFoundError:
            pass
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(P.endpoint(self.path))
        except zmq.ZMQError as e:
            sock.close(0)
            raise UsageError(f"cannot bind the control socket {self.path}: {e}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        if gid is not None and gid != os.getegid():  # ours already: no chown needed
            os.chown(self.path, -1, gid)
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)

    def watch(self, fd: int) -> None:
        """Wake the loop when ``fd`` is readable too (the wake-up pipe, inotify)."""
        self.poller.register(fd, zmq.POLLIN)

    def wait(self, timeout_ms: int) -> None:
        """Block until the socket or a watched fd is readable, or ``timeout_ms`` passed."""
        self.poller.poll(timeout_ms)

    def serve(self, dispatch: Dispatch) -> None:
        """Answer what is waiting on the socket, without blocking."""
        if self.sock is None:
            return
        for _ in range(PER_TURN):  # then let the loop breathe
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 2:
                continue  # no identity: nothing to answer
            caller = _caller(parts[-1])
            frames = [p.bytes for p in parts]
            peer, body = frames[0], frames[1:]
            req_id = None
            try:
                req_id, cmd, args, payload = P.decode_request(body)
                if TABLE[cmd].logged:
                    log.info("%s: %s %s", caller, cmd, _brief(args))
                args = P.check_args(cmd, args)  # every argument, before any handler runs
                args["_caller"] = caller
                reply = dispatch(peer, req_id, cmd, args, payload)
            except FlowError as e:
                reply = P.encode_reply(req_id, error=e)
            except Exception:  # a bug: log it here, never send a traceback
                log.exception("internal error serving a request")
                reply = P.encode_reply(req_id, error=InternalError())  # the log has the traceback
            if reply is not None:
                self.send(peer, reply)

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart([peer] + frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("reply dropped: %s", e)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


class Caller:
    """Who sent a request, from the kernel (SO_PEERCRED via ZeroMQ's Peer-Address)."""

    def __init__(self, uid: int | None, pid: int | None):
        self.uid, self.pid = uid, pid

    @property
    def user(self) -> str:
        if self.uid is None:
            return "?"
        import pwd

        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def __str__(self) -> str:
        if self.uid is None:
            return "unknown caller"
        return f"uid {self.uid} ({for_log(self.user)}) pid {self.pid}"


def _caller(frame) -> Caller:
    """Peer-Address of an ipc peer reads "host:UID:GID:PID" on Linux."""
    try:
        parts = frame.get("Peer-Address").split(":")
        return Caller(int(parts[-3]), int(parts[-1]))
    except (zmq.ZMQError, AttributeError, ValueError, IndexError, TypeError):
        return Caller(None, None)


def _brief(args: dict) -> str:
    """The arguments a log line names, as the client sent them: escaped, so
    none can start a line of its own, and cut to 200 characters each."""
    keep = {k: v for k, v in args.items() if k in ("run", "runs", "channel", "name", "process")}
    return " ".join(f"{k}={_cut(for_log(v))}" for k, v in keep.items())


def _cut(text: str, most: int = 200) -> str:
    return text if len(text) <= most else text[:most] + f"...({len(text)} characters)"
