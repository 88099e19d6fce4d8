"""The one escaping rule (flowd/textsafe.py) and the daemon's one-line-per-record log."""
from __future__ import annotations

import io
import logging

import pytest
from hypothesis import given, strategies as st

from flowd.textsafe import LogFormatter, bytes_for_terminal, for_log, for_terminal

HOSTILE = [
    "\x1b]0;pwned\x07",                 # OSC 0: window title
    "\x1b]52;c;ZWNobyBoaQ==\x07",       # OSC 52: clipboard
    "\x1b[2K\r",                        # erase the line
    "\x9b31m",                          # C1 CSI
    "abc\u202edcba",                    # right-to-left override
]


@pytest.mark.parametrize("text", HOSTILE)
def test_no_control_character_reaches_a_terminal_or_a_log_line(text):
    for out in (for_terminal(text), for_log(text)):
        assert out.isprintable(), repr(out)
        assert "\x1b" not in out and "\x07" not in out


def test_newline_and_tab_stay_on_a_terminal_but_not_in_a_log_line():
    assert for_terminal("a\n\tb") == "a\n\tb"
    assert for_log("a\n\tb") == "a\\n\\tb"


DANGEROUS = {"Cc", "Zl", "Zp"}


@given(st.text())
def test_escaping_leaves_no_control_and_is_reversible(text):
    import unicodedata

    out = for_log(text)
    assert "\n" not in out
    assert not [c for c in out if unicodedata.category(c) in DANGEROUS], repr(out)
    assert not any(c in out for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b")
    assert _unescape(out) == text  # one original per escaped text


def _unescape(s: str) -> str:
    import re

    def one(m):
        e = m.group(1)
        return {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}.get(e) or chr(int(e[1:], 16))

    return re.sub(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})", one, s)


def test_bytes_that_are_not_utf8_are_shown_as_hex():
    assert bytes_for_terminal(b"ok \xff\xfe\x1b[2K\n") == "ok \\xff\\xfe\\x1b[2K\n"


def test_a_forged_line_in_a_log_message_or_a_traceback_stays_in_its_record():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(LogFormatter("%(asctime)s flowd[1] %(levelname)s %(message)s"))
    log = logging.getLogger("test-textsafe")
    log.addHandler(handler)
    log.propagate = False
    try:
        forged = "x.xml\n2026-11-30 07:00:00,000 flowd[1] INFO uid 0 (root) pid 1: cancel"
        log.warning("submitted %s", forged)
        try:
            raise KeyError(forged)
        except KeyError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    records = [line for line in lines if not line.startswith("\t")]
    assert len(records) == 2, lines  # the two records, and no forged third
    assert all("INFO uid 0" not in line.split(" flowd[1] ")[1][:12] for line in records)
    assert sum("INFO uid 0 (root)" in line for line in lines) == 2  # still shown, escaped
