"""One request and its reply over the daemon's socket without ZeroMQ (stdlib only).

``import zmq`` and a ZeroMQ context cost flowctl about 20 ms of CPU at every
start, more than the rest of ``flowctl status`` together. A command that sends
one message and waits for one (``Client.call_once``: ``status``) needs
neither: the daemon's ``ipc://`` socket is a Unix stream socket, and this
speaks ZMTP 3.0 on it (https://rfc.zeromq.org/spec/23/, the NULL mechanism)
as a DEALER. The daemon's ROUTER sees an ordinary DEALER peer, and
SO_PEERCRED still names the caller.
"""
from __future__ import annotations

import time

SIGNATURE = b"\xff" + bytes(8) + b"\x7f"
GREETING = SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
MORE, LONG, COMMAND = 1, 2, 4  # frame flags
MAX_FRAME = 8 << 20  # bytes a reply frame may claim (the daemon's replies are at most ~1 MiB)


class Closed(Exception):
    """The daemon closed the connection before it answered."""


class BadPeer(Exception):
    """What listens does not speak ZMTP 3 (a bug, or not flowd)."""


def _frame(flags: int, body: bytes) -> bytes:
    if len(body) > 255:
        return bytes([flags | LONG]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def _ready() -> bytes:
    name, value = b"Socket-Type", b"DEALER"
    body = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
    return _frame(COMMAND, body)


class _Reader:
    def __init__(self, sock, deadline: float):
        self.sock, self.deadline, self.buf = sock, deadline, bytearray()

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise Closed
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[int, bytes]:
        flags = self.take(1)[0]
        size = int.from_bytes(self.take(8), "big") if flags & LONG else self.take(1)[0]
        if size > MAX_FRAME:
            raise BadPeer(f"a frame of {size} bytes")
        return flags, self.take(size)


def exchange(sock, frames: list[bytes], deadline: float, is_reply) -> list[bytes]:
    """Send the message ``frames`` on the connected stream ``sock`` as a DEALER
    and return the first message ``is_reply`` accepts (others are late answers,
    dropped as ``Client`` drops them). ``TimeoutError`` at ``deadline``,
    ``Closed`` if the peer hangs up, ``BadPeer`` if it speaks something else."""
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(GREETING)
    rd = _Reader(sock, deadline)
    peer = rd.take(64)
    if peer[:1] != SIGNATURE[:1] or peer[9:10] != SIGNATURE[9:] or peer[10] < 3:
        raise BadPeer("not a ZMTP 3 greeting")
    message = b"".join(_frame(MORE if i < len(frames) - 1 else 0, f) for i, f in enumerate(frames))
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(_ready() + message)
    parts: list[bytes] = []
    while True:
        flags, body = rd.frame()
        if flags & COMMAND:  # READY, or a command this client does not use
            if body[:6] == b"\x05ERROR":
                raise BadPeer("the daemon refused the connection")
            continue
        parts.append(body)
        if not flags & MORE:
            if is_reply(parts):
                return parts
            parts = []
