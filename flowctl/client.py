"""The flowctl side of the control protocol: one DEALER, one request at a time.

It tells apart the three ways a daemon can be out of reach (SPEC §4, exit
status 3): no socket file (flowd is not running), a socket nobody listens on
(a stale file: flowd died), and a daemon that does not answer in time.
"""
from __future__ import annotations

import errno
import os
import socket
import time

import zmq

from flowd import protocol as P
from flowd.errors import DaemonUnreachable, ProtocolError, UsageError

START_HINT = "start it with `systemctl start flowd`, or run `flowd --socket {path}` in another terminal"


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float = 10.0):
        self.path = P.socket_path(socket_path)
        self.timeout = timeout
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._sock is not None:
            return self._sock
        path = self.path
        hint = START_HINT.format(path=path)
        if not os.path.exists(path):
            folder = os.path.dirname(path) or "."
            if os.path.isdir(folder) and not os.access(folder, os.X_OK):
                raise DaemonUnreachable(f"permission denied on {folder}: you may not reach the "
                                        f"socket {path}")
            raise DaemonUnreachable(f"flowd is not running: there is no socket at {path} ({hint})")
        if not os.access(path, os.R_OK | os.W_OK):
            raise DaemonUnreachable(
                f"permission denied on {path}: only the socket's group may talk to flowd "
                "(ask an administrator to add you to it, e.g. `adduser $USER flowd`)")
        self._probe(path, hint)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a send with no live peer fails instead of queueing
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        sock.connect(P.endpoint(path))
        self._sock = sock
        return sock

    def call(self, cmd: str, args: dict | None = None, payload: bytes | None = None,
             timeout: float | None = None) -> tuple[dict, bytes | None]:
        sock = self._connect()
        req_id = self._send(sock, cmd, args, payload)
        wait = self.timeout if timeout is None else timeout
        reply = self._receive(sock, {req_id}, time.monotonic() + wait)
        if reply is None:
            raise self._no_answer(wait)
        _, result, data = P.decode_reply(reply)
        return result, data

    def call_patiently(self, cmd: str, args: dict, limit: float) -> dict:
        """A request the daemon may take minutes to answer (``submit``): wait
        up to ``limit`` seconds, as long as the daemon (the same process)
        answers a ping every ``timeout`` seconds meanwhile."""
        sock = self._connect()
        pid = self.call("ping")[0]["pid"]
        req_id = self._send(sock, cmd, args, None)
        deadline = time.monotonic() + limit
        while True:
            reply = self._receive(sock, {req_id}, min(deadline, time.monotonic() + self.timeout))
            if reply is None:
                if time.monotonic() >= deadline:
                    raise self._no_answer(limit)
                ping_id = self._send(sock, "ping", {}, None)
                reply = self._receive(sock, {req_id, ping_id}, time.monotonic() + self.timeout)
                if reply is None:
                    raise self._no_answer(self.timeout)
                if P.reply_id(reply) == ping_id:
                    if P.decode_reply(reply)[1].get("pid") != pid:
                        raise DaemonUnreachable(
                            f"flowd restarted before it answered {cmd}; see `flowctl status` "
                            "whether it was done, and try again if not")
                    continue
            return P.decode_reply(reply)[1]

    def _send(self, sock: zmq.Socket, cmd: str, args: dict | None, payload: bytes | None) -> str:
        req_id = P.new_id()
        frames = P.encode_request(req_id, cmd, args or {}, payload)
        if sum(len(f) for f in frames) > P.MAX_MESSAGE:
            raise ProtocolError(f"message over {P.MAX_MESSAGE} bytes; this is a flowctl bug")
        try:
            sock.send_multipart(frames)
        except zmq.Again:
            raise self._no_answer(self.timeout) from None
        except zmq.ZMQError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise DaemonUnreachable(f"permission denied on {self.path}") from None
            raise DaemonUnreachable(f"cannot reach flowd at {self.path}: {e}") from None
        return req_id

    @staticmethod
    def _receive(sock: zmq.Socket, ids: set[str], deadline: float) -> list[bytes] | None:
        """The first reply to one of ``ids`` before ``deadline``, or None."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                continue
            reply = sock.recv_multipart()
            if P.reply_id(reply) in ids:
                return reply
            # else: a late answer to an earlier request

    def _no_answer(self, wait: float) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"flowd at {self.path} did not answer within {wait:g}s: it is running but busy or "
            "stuck; try again, raise --timeout, or see its log (`journalctl -u flowd`)")

    @staticmethod
    def _probe(path: str, hint: str) -> None:
        """A plain connect tells a stale socket file (refused) from a live daemon."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2.0)
            s.connect(path)
        except ConnectionRefusedError:
            raise DaemonUnreachable(
                f"flowd is not running: nothing listens on {path} (a socket file left by a "
                f"daemon that stopped); {hint}") from None
        except PermissionError:
            raise DaemonUnreachable(f"permission denied on {path}: only the socket's group may "
                                    "talk to flowd") from None
        except OSError:
            pass  # let ZeroMQ have its say
        finally:
            s.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = None

    # -- file transfer ---------------------------------------------------
    def upload(self, files: list[tuple[str, str]]) -> str:
        """Send (name in bundle, local path) pairs in chunks; returns the upload id."""
        total = 0
        for _, local in files:
            total += os.path.getsize(local)
        upload = self.call("upload_begin", {"size": total})[0]["upload"]
        for name, local in files:
            with open(local, "rb") as f:
                offset = 0
                while True:
                    chunk = f.read(P.CHUNK)
                    if not chunk and offset:
                        break
                    self.call("upload_chunk", {"upload": upload, "path": name, "offset": offset}, chunk)
                    offset += len(chunk)
                    if not chunk:
                        break
        return upload

    def download(self, run: str, channel: str, seq: int, dest: str) -> int:
        """Write one item to ``dest`` (via ``dest.part``); returns its size."""
        part = dest + ".part"
        size = 0
        with open(part, "wb") as f:
            while True:
                _, data = self.call("read", {"run": run, "channel": channel, "seq": seq,
                                             "offset": size, "length": P.CHUNK})
                if not data:
                    break
                f.write(data)
                size += len(data)
                if len(data) < P.CHUNK:
                    break
        os.replace(part, dest)
        return size


    def push(self, run: str, channel: str, src) -> dict:
        """Stream ``src`` (a binary file object) as one new item; durable when this returns."""
        begin = self.call("push_begin", {"run": run, "channel": channel})[0]
        offset = 0
        while True:
            chunk = src.read(P.CHUNK)
            if not chunk:
                break
            self.call("push_chunk", {"push": begin["push"], "offset": offset}, chunk)
            offset += len(chunk)
        return self.call("push_end", {"push": begin["push"], "run": begin["run"],
                                      "channel": channel})[0]

    def copy_log(self, run: str, name: str, offset: int, out) -> int:
        """Write a task log from ``offset`` to ``out``; returns the bytes written."""
        n = 0
        while True:
            _, data = self.call("read_log", {"run": run, "name": name, "offset": offset + n})
            if not data:
                return n
            out.write(data)
            n += len(data)
            if len(data) < P.CHUNK:
                return n


def check_out_dir(path: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    return path
