"""The command table: every request flowctl can send, declared once.

Each ``Command`` names its handler, the arguments it takes (checked at the
edge, before any handler runs: ``protocol.check_args``) and whether each
request is logged. ``protocol.SCHEMA`` and ``protocol.COMMANDS`` are derived
from ``TABLE``, so adding a command touches this table and its handler only.

Handlers live by what they touch: ``runs`` (submit, status, cancel, graph),
``resize`` (a process's limits, live and for its later tasks),
``transfers`` (uploads and pushes, whose state is flowd/staging.py's) and
``data`` (items and logs). A handler is ``fn(d, args, payload, peer, req_id)``
with ``d`` the Daemon; it returns a result dict, a ``(result, bytes)`` pair,
or None when the answer comes later (a ``status --wait``, a submit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import protocol as P
from ..protocol import CHUNK, MAX_LIST, MAX_SEQ, MAX_SIZE, MAX_STRING, MAX_WAIT, UPLOAD_ID, Arg
from . import cachecmds, data, events, manage, resize, runs, trace, transfers


@dataclass(frozen=True)
class Command:
    name: str
    args: dict[str, Arg]  # what it takes: the handler gets exactly these names
    handler: Callable
    logged: bool = False  # each request gets a line in flowd's log (those that change something)


_RUN = Arg("str", True, 1, 64, hint="a run id or a unique prefix of it")
_CHANNEL = Arg("str", True, 1, 255)
_UPLOAD = Arg("str", True, pattern=UPLOAD_ID, hint="the id upload_begin or push_begin gave")
_OFFSET = Arg("int", False, 0, MAX_SEQ, default=0)

# Payload frames are bounded by protocol.MAX_MESSAGE.
TABLE: dict[str, Command] = {c.name: c for c in (
    Command("ping", {}, runs.ping),
    Command("status", {"run": Arg("str", False, 0, 64),
                       "wait": Arg("num", False, 0, MAX_WAIT, default=0)}, runs.status),
    Command("submit", {"upload": _UPLOAD, "name": Arg("str", False, 1, 255, default="workflow.xml")},
            runs.submit, logged=True),
    Command("upload_begin", {"size": Arg("int", True, 0, MAX_SIZE,
                                         hint="the total bytes of the files to send")},
            transfers.upload_begin),
    Command("upload_chunk", {"upload": _UPLOAD, "path": Arg("str", True, 1, MAX_STRING),
                             "offset": Arg("int", True, 0, MAX_SIZE)}, transfers.upload_chunk),
    Command("upload_files", {"upload": _UPLOAD,
                             "paths": Arg("strs", True, 1, MAX_LIST, hint="one path per file"),
                             "sizes": Arg("ints", True, 1, MAX_LIST,
                                          hint="each file's bytes, in the data frame in order")},
            transfers.upload_files),
    Command("cancel", {"runs": Arg("strs", True, 1, MAX_LIST, hint="one or more run ids")},
            runs.cancel, logged=True),
    Command("items", {"run": _RUN, "channel": _CHANNEL}, data.items),
    Command("pull", {"run": _RUN, "channel": _CHANNEL, "after": Arg("int", False, 0, MAX_SEQ, default=0),
                     "upto": Arg("int", False, 0, MAX_SEQ, default=0)}, data.pull),
    Command("read", {"run": _RUN, "channel": _CHANNEL, "seq": Arg("int", True, 0, MAX_SEQ),
                     "offset": _OFFSET, "length": Arg("int", False, 1, CHUNK, default=CHUNK)},
            data.read),
    Command("push_begin", {"run": _RUN, "channel": _CHANNEL, "size": Arg("int", False, 0, MAX_SIZE)},
            transfers.push_begin),
    Command("push_chunk", {"push": _UPLOAD, "offset": Arg("int", True, 0, MAX_SIZE)},
            transfers.push_chunk),
    Command("push_end", {"push": _UPLOAD, "run": _RUN, "channel": _CHANNEL}, transfers.push_end,
            logged=True),
    Command("logs", {"run": _RUN, "process": Arg("str", False, 1, 255),
                     "task": Arg("str", False, 1, 64),
                     "follow": Arg("int", False, 0, 1, default=0), "offset": _OFFSET}, data.logs),
    Command("read_log", {"run": _RUN, "name": Arg("str", True, 1, 255), "offset": _OFFSET},
            data.read_log),
    Command("graph", {"run": _RUN}, runs.graph),
    Command("resize", {"run": _RUN, "process": Arg("str", True, 1, 255, hint="a process of the run"),
                       "memory": Arg("int", False, 1, MAX_SIZE, hint="bytes, e.g. 268435456"),
                       "cpus": Arg("num", False, 0.01, resize.MAX_CPUS,
                                   hint="a number of CPUs, e.g. 0.5 or 2")},
            resize.resize, logged=True),
    Command("trace", {"run": _RUN, "offset": _OFFSET}, trace.read),
    Command("rm", {"runs": Arg("strs", True, 1, MAX_LIST, hint="one or more run ids"),
                   "force": Arg("int", False, 0, 1, default=0)}, manage.rm, logged=True),
    Command("retry", {"run": _RUN, "process": Arg("str", False, 1, 255, hint="a process of the run")},
            manage.retry, logged=True),
    Command("events", {"sub": Arg("str", False, 16, 16, pattern=UPLOAD_ID,
                                  hint="the id the first events request gave"),
                       "run": Arg("str", False, 1, 64, hint="a run id or a unique prefix of it"),
                       "wait": Arg("num", False, 0, 30, default=0)}, events.events),
    Command("metrics", {}, events.metrics),
    Command("why", {"run": _RUN, "task": Arg("str", True, 1, 64, hint="a task id, as trace shows it")},
            cachecmds.why),
    Command("cache_ls", {}, cachecmds.ls),
    Command("cache_rm", {"process": Arg("str", False, 1, 255, hint="a process name, or WORKFLOW/PROCESS"),
                         "all": Arg("int", False, 0, 1, default=0)}, cachecmds.rm, logged=True),
)}
SCHEMA: dict[str, dict[str, Arg]] = {name: c.args for name, c in TABLE.items()}
COMMANDS = tuple(TABLE)


def dispatch(d, peer: bytes, req_id: str, cmd: str, args: dict, payload: bytes | None
             ) -> list[bytes] | None:
    """Run ``cmd``'s handler on checked ``args``: the reply's frames, or None (answered later)."""
    out = TABLE[cmd].handler(d, args, payload, peer=peer, req_id=req_id)
    if out is None:
        return None  # deferred (a waiter, a submit being made)
    result, data = out if isinstance(out, tuple) else (out, None)
    return P.encode_reply(req_id, result, payload=data)
