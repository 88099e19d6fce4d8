"""Sizes and durations, read and written (stdlib only; flowctl uses it too).

Two directions, one module:

- ``parse_size``/``parse_duration`` read what a workflow file or flowd.toml
  says (``256m``, ``1g``, ``90s``, ``250ms``); ``spell_size``/
  ``spell_duration`` write a value back in that same form, for a message
  that tells a user what to write.
- ``size``/``duration`` write a value for a person to read (``3.0 MiB``,
  ``2m05s``): flowctl's tables, log lines and task messages.
"""
from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``2h``, ``1.5h``, ``250ms`` or bare seconds -> seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 5m or 2h")
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return value


def parse_size(text: str) -> int:
    """``256m``, ``1g``, ``512k``, ``1GiB`` or bare bytes -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 256m or 1g")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return value


def spell_size(n: int) -> str:
    """Bytes as ``parse_size`` reads them: 268435456 -> '256m', 1000 -> '1000'."""
    for unit, k in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def spell_duration(seconds: float) -> str:
    """Seconds as ``parse_duration`` reads them: 7200 -> '2h', 90 -> '90s', 0.25 -> '250ms'."""
    for unit, k in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= k and seconds % k == 0:
            return f"{int(seconds // k)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def size(n: int, *, trim: bool = False, unit: str | None = None, byte_unit: str = "B") -> str:
    """Bytes for a person, in binary units.

    By default one decimal above bytes, for columns that line up:
    3145728 -> '3.0 MiB', 512 -> '512 B'. ``trim=True`` drops a '.0', for a
    limit a user set: 67108864 -> '64 MiB', 1536 -> '1.5 KiB'. ``unit``
    fixes the unit ('MiB': 1572864 -> '1.5 MiB'); ``byte_unit`` names the
    smallest one ('bytes': 10 -> '10 bytes').
    """
    value, i = float(n), 0
    while i < len(_BINARY) - 1 and (value >= 1024 if unit is None else _BINARY[i] != unit):
        value /= 1024
        i += 1
    if i == 0:
        return f"{int(value)} {byte_unit}" if value == int(value) else f"{value:g} {byte_unit}"
    return f"{round(value, 1):g} {_BINARY[i]}" if trim else f"{value:.1f} {_BINARY[i]}"


def duration(seconds: float, *, exact: bool = False) -> str:
    """Seconds for a person.

    By default two units at most, rounded, for elapsed times: 5.25 -> '5.2s',
    125 -> '2m05s', 3660 -> '1h01m', 93600 -> '1d02h'. ``exact=True`` keeps
    every unit that is not zero, for a limit a user set: 30 -> '30s',
    1.5 -> '1.5s', 90 -> '1m30s', 7200 -> '2h', 3601 -> '1h1s'.
    """
    if exact:
        if seconds < 60:
            return f"{seconds:g}s"
        total = int(round(seconds))
        h, rest = divmod(total, 3600)
        m, s = divmod(rest, 60)
        return "".join([f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""])
    s = int(round(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
