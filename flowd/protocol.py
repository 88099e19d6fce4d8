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
import math
import os
import re

from .errors import FlowError, ProtocolError, UsageError, error_from_dict

VERSION = 1
CHUNK = 1024 * 1024
MAX_HEADER = 256 * 1024
MAX_MESSAGE = CHUNK + MAX_HEADER
DEFAULT_SOCKET = "/run/flowd/flowd.sock"

MAX_WAIT = 300.0  # seconds a ``status`` request may wait for its run to end
MAX_SIZE = 1 << 60  # bytes: a bound on declared sizes before the config's (max_upload_size)
MAX_SEQ = 1 << 53  # item numbers and offsets (JSON's exact integers)
UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")


class Arg:
    """One request argument: its type, whether it is required, and its range.

    ``kind`` is ``str``, ``int`` (a JSON integer, never a bool or a float),
    ``num`` (an int or a finite float), ``strs`` (a list of strings) or
    ``ints`` (a list of integers from 0 to ``MAX_SEQ``). An
    optional argument that is absent or null takes ``default``. ``lo``/``hi``
    bound a number, or a string's or list's length; ``pattern`` a string.
    """

    __slots__ = ("kind", "required", "lo", "hi", "default", "pattern", "hint")

    def __init__(self, kind: str, required: bool = False, lo: float | None = None,
                 hi: float | None = None, default: object = None, pattern: re.Pattern | None = None,
                 hint: str = ""):
        self.kind, self.required, self.lo, self.hi = kind, required, lo, hi
        self.default, self.pattern, self.hint = default, pattern, hint

    def check(self, cmd: str, name: str, value: object) -> object:
        """The value to give the handler, or UsageError naming the argument."""
        def bad(what: str) -> UsageError:
            fix = f" ({self.hint})" if self.hint else ""
            return UsageError(f"{cmd}: argument {name!r} {what}{fix}")

        if value is None:
            if self.required:
                raise bad("is required")
            return self.default
        if self.kind == "str":
            if not isinstance(value, str):
                raise bad(f"must be a string, not {_json_type(value)}")
            if not (self.lo or 0) <= len(value) <= (self.hi or MAX_STRING):
                raise bad(f"must be {int(self.lo or 0)} to {int(self.hi or MAX_STRING)} characters long")
            if self.pattern is not None and not self.pattern.match(value):
                raise bad("is malformed")
            return value
        if self.kind == "strs":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(f"must be a list of strings, not {_json_type(value)}")
            if not (self.lo or 0) <= len(value) <= (self.hi or MAX_LIST):
                raise bad(f"must list {int(self.lo or 0)} to {int(self.hi or MAX_LIST)} values")
            if any(len(v) > MAX_STRING for v in value):
                raise bad(f"holds a string over {MAX_STRING} characters")
            return value
        if self.kind == "ints":  # a list of whole numbers, each 0 to MAX_SEQ
            if not isinstance(value, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise bad(f"must be a list of whole numbers, not {_json_type(value)}")
            if not (self.lo or 0) <= len(value) <= (self.hi or MAX_LIST):
                raise bad(f"must list {int(self.lo or 0)} to {int(self.hi or MAX_LIST)} values")
            if any(not 0 <= v <= MAX_SEQ for v in value):
                raise bad(f"holds a number outside 0 to {MAX_SEQ}")
            return value
        # numbers: bool is an int to Python, never to the protocol
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, not {_json_type(value)}")
        if self.kind == "int" and not isinstance(value, int):
            raise bad("must be a whole number")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad("must be a finite number")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise bad(f"must be between {_num(self.lo)} and {_num(self.hi)}")
        return value


MAX_STRING = 4096
MAX_LIST = 1000


def __getattr__(name: str):
    """``SCHEMA`` (each command's arguments) and ``COMMANDS`` (their names)
    are derived from the daemon's command table (flowd/commands), read on
    first use: flowctl, which never needs them, does not load the handlers."""
    if name in ("SCHEMA", "COMMANDS"):
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_args(cmd: str, args: dict) -> dict:
    """``args`` checked against ``SCHEMA[cmd]``: a new dict of exactly its
    names (defaults filled in; unknown names are dropped), or UsageError
    naming the first bad one. The daemon checks every request so before any
    handler runs."""
    from .commands import SCHEMA

    return {name: arg.check(cmd, name, args.get(name)) for name, arg in SCHEMA[cmd].items()}


def _json_type(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _num(x: float | None) -> str:
    return "any" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def socket_path(explicit: str | None = None) -> str:
    """The socket's path: ``explicit``, else $FLOWD_SOCKET, else the default.

    A ZeroMQ address ``ipc:///run/flowd/flowd.sock`` is taken as its path (a
    user who read "ipc://" in the docs may well write it)."""
    path = explicit or os.environ.get("FLOWD_SOCKET") or DEFAULT_SOCKET
    return path[len("ipc://"):] if path.startswith("ipc://") else path


def endpoint(path: str) -> str:
    if path.startswith("ipc://"):
        path = path[len("ipc://"):]
    return "ipc://" + os.path.abspath(path)


def new_id() -> str:
    return os.urandom(8).hex()  # 16 random hex digits (no uuid import: flowctl starts faster)


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
    from .commands import COMMANDS

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
