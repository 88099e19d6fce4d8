"""Human output: aligned tables, sizes and times in human units (flowd.units), "-" for none."""
from __future__ import annotations

import time

from flowd import units


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) if i < len(r) - 1 else c for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(line.rstrip())
    return "\n".join(lines)


def size(n: int | None) -> str:
    return "-" if n is None else units.size(n)


def duration(seconds: float | None) -> str:
    return "-" if seconds is None else units.duration(seconds)


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    delta = (now or time.time()) - ts
    if delta < 1:
        return "just now"
    return duration(delta) + " ago"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
