"""Fuzz the control protocol (issue 9, "Done when"): random and boundary values
for every argument of every command, against a real daemon over its real
socket. Each request gets a clean answer (ok, or an error with a known code:
never "internal", never silence), and afterwards the daemon answers a ping
as fast as before and its memory has not grown.

Bounded: a fixed number of examples (FLOWD_FUZZ_EXAMPLES, default 4000),
well under a minute on CI's machine.
"""
from __future__ import annotations

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol_edge import CODES, Raw, ping_seconds, rss_kib, service_run

from flowd import protocol as P
from flowd.errors import FlowError

EXAMPLES = int(os.environ.get("FLOWD_FUZZ_EXAMPLES", "4000"))

NUMBERS = [0, 1, -1, 2, 15, 16, 17, P.CHUNK - 1, P.CHUNK, P.CHUNK + 1, 2 ** 31, 2 ** 53, 2 ** 53 + 1,
           2 ** 63, -2 ** 63, 2 ** 64 + 7, 10 ** 40, -(10 ** 40), 0.5, -0.0, 1e-300, 1e308, 299.9,
           300, 300.5, float("nan"), float("inf"), float("-inf"), True, False]
STRINGS = ["", " ", ".", "..", "/", "../../etc/passwd", "a/../../b", "/etc/passwd", "box", "requests",
           "workflow.xml", "p.echo.0.1.log", "0" * 16, "f" * 16, "x" * 300, "x" * 5000, "\x00",
           "a\nINFO uid 0 (root) forged", "\x1b]0;title\x07", "\u202egnp.exe", "\udcff", "*", "%s%n"]


def from_known(known: list[str]):
    """The run, its prefixes, and the upload and push ids given so far (the list grows:
    an index is drawn, so the draws stay the same whatever it holds)."""
    return st.integers(min_value=0, max_value=63).map(lambda i: known[i % len(known)])


def any_value(known: list[str]):
    """A JSON value a client might send for any argument, boundary-heavy."""
    return st.one_of(
        st.sampled_from(NUMBERS),
        st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(STRINGS),
        st.text(alphabet=st.characters(max_codepoint=0x2FFF), max_size=40),
        st.text(alphabet=string.hexdigits.lower(), min_size=1, max_size=16),
        from_known(known),
        st.none(), st.booleans(),
        st.lists(st.one_of(from_known(known), st.sampled_from(STRINGS), st.integers()),
                 max_size=4),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )


def args_for(cmd: str, known: list[str]):
    names = list(P.SCHEMA[cmd]) + ["unknown", "_caller", "args"]
    return st.dictionaries(st.sampled_from(names), any_value(known), max_size=len(names))


def deferred(cmd: str, args: dict) -> bool:
    """A valid ``status`` with a wait is answered when its run ends, or later: not waited for."""
    if cmd != "status":
        return False
    try:
        checked = P.check_args(cmd, args)
    except FlowError:
        return False
    return bool(checked["wait"]) and bool(checked["run"])


@pytest.fixture
def target(daemon_factory, workdir):
    d = daemon_factory().start()
    run = service_run(d, workdir)
    raw = Raw(d.socket)
    yield d, run, raw
    raw.close()


def test_every_argument_of_every_command_gets_a_clean_answer(target):
    d, run, raw = target
    # not JSON, not an object, an unknown command, too many frames, an oversized header
    for frames in ([b"\xff\xfe"], [b"[1, 2]"], [b'{"v": 1, "id": "x", "cmd": "frobnicate", "args": {}}'],
                   [b'{"v": 1, "id": "x", "cmd": "ping"}', b"a", b"b"],
                   [b'{"v": 1, "id": "x", "cmd": "ping", "args": {"p": "' + b"x" * P.MAX_HEADER
                    + b'"}}'], [b'{"v": 1, "id": "x", "cmd": "ping", "args": [1]}']):
        raw.sock.send_multipart(frames)
        got = raw.recv(30.0)
        assert got is not None, frames[0][:80]
        msg = got[0]
        assert msg["ok"] is False and msg["error"]["code"] == "protocol", msg
    for _ in range(20):
        ping_seconds(raw)
    base_ping = max(ping_seconds(raw) for _ in range(20))
    base_rss = rss_kib(d.proc.pid)
    known = [run, run[:4], run[:1], "f" * 16]
    seen_codes: set[str] = set()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one_request(data):
        cmd = data.draw(st.sampled_from(P.COMMANDS), label="cmd")
        args = data.draw(args_for(cmd, known), label="args")
        payload = data.draw(st.one_of(st.none(), st.binary(max_size=2048)), label="payload")
        if deferred(cmd, args):
            raw.send(cmd, args, payload)  # answered later (or early, past 16): ids tell apart
            return
        msg, _ = raw.call(cmd, args, payload, timeout=30.0)
        if msg["ok"]:
            result = msg["result"]
            for key in ("upload", "push"):  # later requests may use what was given
                if isinstance(result.get(key), str) and result[key] not in known:
                    known.append(result[key])
            seen_codes.add("ok")
            return
        err = msg["error"]
        assert err["code"] in CODES, (cmd, args, err)
        assert isinstance(err["message"], str) and err["message"], (cmd, args, err)
        seen_codes.add(err["code"])

    one_request()
    print(f"fuzz: {EXAMPLES} requests; answers seen: {', '.join(sorted(seen_codes))}")
    assert {"ok", "usage", "not_found"} <= seen_codes, seen_codes
    assert "internal error" not in d.log(full=True), d.log()
    assert d.proc.poll() is None
    worst = max(ping_seconds(raw) for _ in range(20))
    assert worst < max(1.0, 20 * base_ping), (worst, base_ping)
    grown = rss_kib(d.proc.pid) - base_rss
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB over {EXAMPLES} requests"
