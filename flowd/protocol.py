"""The control protocol between flowctl and flowd (stdlib only).

Transport: ZeroMQ, a ROUTER bound by the daemon on an ``ipc://`` socket, a
DEALER in each client. A message is one or two frames:

1. a UTF-8 JSON header,
   request ``{"v": 1, "id": "<id>", "cmd": "<command>", "args": {...}}``,
   reply ``{"v": 1, "id": "<id>", "ok": true, "result": {...}}`` or
   ``{"v": 1, "id": "<id>", "ok": false, "error": {"code": ..., "message": ...}}``;
2. optionally, raw bytes (a chunk of a file being uploaded or pulled).

A client drops any reply whose id is not the one it waits for. Error codes
are the ``code`` of the classes in ``flowd.errors``; they are stable.
Messages over ``MAX_MESSAGE`` bytes are refused; files move in ``CHUNK``
sized pieces, so neither side ever holds a whole item in memory.
"""
from __future__ import annotations

import json
import os
import uuid

from .errors import FlowError, ProtocolError, error_from_dict

VERSION = 1
CHUNK = 1024 * 1024
MAX_HEADER = 256 * 1024
MAX_MESSAGE = CHUNK + MAX_HEADER
DEFAULT_SOCKET = "/run/flowd/flowd.sock"

COMMANDS = (
    "ping", "status", "submit", "upload_begin", "upload_chunk", "cancel",
    "items", "read", "push_begin", "push_chunk", "push_end", "logs", "read_log", "graph",
)


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("FLOWD_SOCKET") or DEFAULT_SOCKET


def endpoint(path: str) -> str:
    return "ipc://" + os.path.abspath(path)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def encode_request(req_id: str, cmd: str, args: dict, payload: bytes | None = None) -> list[bytes]:
    frames = [json.dumps({"v": VERSION, "id": req_id, "cmd": cmd, "args": args}).encode()]
    if payload is not None:
        frames.append(payload)
    return frames


def decode_request(frames: list[bytes]) -> tuple[str, str, dict, bytes | None]:
    """-> (id, cmd, args, payload); raises ProtocolError with a message for the peer."""
    if not frames or len(frames) > 2:
        raise ProtocolError("a request is a JSON header and at most one data frame")
    if len(frames[0]) > MAX_HEADER:
        raise ProtocolError(f"request header over {MAX_HEADER} bytes")
    try:
        msg = json.loads(frames[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("request header is not UTF-8 JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("request header is not a JSON object")
    req_id = msg.get("id")
    if not isinstance(req_id, str) or not req_id or len(req_id) > 64:
        raise ProtocolError("request has no valid id")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not {VERSION}; upgrade flowctl or flowd")
    cmd = msg.get("cmd")
    args = msg.get("args", {})
    if cmd not in COMMANDS:
        raise ProtocolError(f"unknown command {cmd!r}")
    if not isinstance(args, dict):
        raise ProtocolError("request args must be a JSON object")
    return req_id, cmd, args, (frames[1] if len(frames) == 2 else None)


def encode_reply(req_id: str | None, result: dict | None = None, *, error: FlowError | None = None,
                 payload: bytes | None = None) -> list[bytes]:
    msg: dict = {"v": VERSION, "id": req_id}
    if error is not None:
        msg["ok"] = False
        msg["error"] = error.to_dict()
    else:
        msg["ok"] = True
        msg["result"] = result or {}
    frames = [json.dumps(msg).encode()]
    if payload is not None:
        frames.append(payload)
    return frames


def decode_reply(frames: list[bytes]) -> tuple[str | None, dict, bytes | None]:
    """-> (id, result, payload); raises the FlowError the daemon sent."""
    try:
        msg = json.loads(frames[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, IndexError):
        raise ProtocolError("the daemon sent a reply that is not JSON") from None
    payload = frames[1] if len(frames) > 1 else None
    if not msg.get("ok"):
        raise error_from_dict(msg.get("error") or {})
    return msg.get("id"), msg.get("result") or {}, payload


def reply_id(frames: list[bytes]) -> str | None:
    try:
        return json.loads(frames[0].decode("utf-8")).get("id")
    except (UnicodeDecodeError, ValueError, IndexError, AttributeError):
        return None
