"""The one escaping rule for strings flowd did not choose (stdlib only).

A container chooses its output names, its log bytes and (through them) the
failure reasons flowd reports; a client chooses file names and request
arguments. Any of them may hold terminal control sequences (OSC 0 sets a
window title, OSC 52 writes the clipboard, CSI erases lines) or a newline
that forges a whole line in the daemon's log. So every such string is passed
through one of these two functions where it is printed or logged:

- ``for_terminal(s)``: what flowctl prints (``status``, ``watch``, and
  ``logs`` on a terminal). Newline and tab stay; every other control
  character becomes a visible escape.
- ``for_log(s)``: one line of the daemon's log or of a message. Newline and
  tab are escaped too, so a value can never start a line of its own.

Escapes are Python-style (``\\x1b``, ``\\n``, ``\\u202e``) and a backslash
is doubled, so the escaped text maps back to exactly one original. Besides
C0, DEL and C1, the Unicode format characters that reorder or hide text
(bidi overrides and isolates, zero-width joiners, the BOM) are escaped too.
"""
from __future__ import annotations

import re

# C0 (but \t \n, handled per function), DEL, C1, and the invisible reorderers.
_HIDDEN = "\udc80-\udcff\u00ad\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ufff9-\ufffb\U000e0000-\U000e007f"
_TERMINAL = re.compile("[\\\\\x00-\x08\x0b-\x1f\x7f-\x9f" + _HIDDEN + "]")
_LOG = re.compile("[\\\\\x00-\x1f\x7f-\x9f" + _HIDDEN + "]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match) -> str:
    c = m.group(0)
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    if 0xdc80 <= n <= 0xdcff:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{n - 0xdc00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def for_terminal(s: object) -> str:
    """``s`` as text safe to print on a terminal (newline and tab kept)."""
    return _TERMINAL.sub(_escape, s if isinstance(s, str) else str(s))


def for_log(s: object) -> str:
    """``s`` as text safe inside one log line (no newline, no control)."""
    return _LOG.sub(_escape, s if isinstance(s, str) else str(s))


def bytes_for_terminal(data: bytes) -> str:
    """Raw bytes (a log) for a terminal: UTF-8 where valid, ``\\xNN`` for other bytes."""
    return for_terminal(data.decode("utf-8", "surrogateescape"))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f" + _HIDDEN + "]")


def _escape_control(text: str) -> str:
    return _CONTROL.sub(_escape, text)


def __getattr__(name: str):
    """``LogFormatter`` is made on first use: flowctl, which never logs, does
    not import logging (a tenth of its start-up)."""
    if name == "LogFormatter":
        cls = globals()["LogFormatter"] = _log_formatter()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log_formatter():
    import logging

    class LogFormatter(logging.Formatter):
        """The daemon's log lines, one record per line whatever went into it.

        A safety net behind ``for_log``: control characters left in a message are
        escaped (backslashes are not doubled, so a value ``for_log`` escaped
        already reads the same); a traceback's lines follow indented by a tab,
        each escaped, so no line of it can pass for a record of its own.
        """

        def format(self, record: logging.LogRecord) -> str:
            record.message = _escape_control(record.getMessage())
            if self.usesTime():
                record.asctime = self.formatTime(record, self.datefmt)
            s = self.formatMessage(record)
            extra = []
            if record.exc_info:
                if not record.exc_text:
                    record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                extra.append(record.exc_text)
            if record.stack_info:
                extra.append(self.formatStack(record.stack_info))
            for block in extra:
                s += "".join("\n\t" + _escape_control(line) for line in block.splitlines())
            return s

    return LogFormatter
