"""Collect and phrase a workflow file's problems (stdlib only).

``Report`` gathers errors and warnings (``flowd.errors.Problem``), at most
``MAX_PROBLEMS`` of each, counting the rest; ``quote`` and ``closest`` phrase
values from the file in messages. The XML translation (``flowd.parser``) and
the rules on the model (``flowd.rules``) report into the same ``Report``.
"""
from __future__ import annotations

import difflib
import json

from flowd.errors import Problem, WorkflowError
from flowd.limits import MAX_PROBLEMS


class Invalid(Exception):
    """A value or a file reference that breaks a rule: the message and the fix.

    Raised by the stdlib checks (``flowd.values``, ``flowd.filerefs``); the
    caller reports it at the element it came from.
    """

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix


def quote(value: str, limit: int = 60) -> str:
    """Quote a (possibly hostile) value for a message: short, one line."""
    if len(value) > limit:
        value = value[:limit] + "…"
    return json.dumps(value, ensure_ascii=False)


def closest(word: str, candidates) -> str | None:
    """The candidate closest to ``word`` (for "did you mean"), if any is close."""
    cands = list(candidates)
    if not word or not cands or len(cands) > 500:  # difflib is quadratic-ish
        return None
    best = difflib.get_close_matches(word, cands, n=1, cutoff=0.6)
    return best[0] if best else None


class Report:
    """The problems found in one file (``display`` names it in every message)."""

    def __init__(self, display: str):
        self.display = display
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.dropped_errors = 0
        self.dropped_warnings = 0

    def error(self, message: str, fix: str | None = None, *, line: int | None = None,
              element: str | None = None):
        self._add(line, element, message, fix, "error")

    def warn(self, message: str, fix: str | None = None, *, line: int | None = None,
             element: str | None = None):
        self._add(line, element, message, fix, "warning")

    def _add(self, line, element, message, fix, severity):
        bucket = self.errors if severity == "error" else self.warnings
        if len(bucket) >= MAX_PROBLEMS:
            if severity == "error":
                self.dropped_errors += 1
            else:
                self.dropped_warnings += 1
            return
        bucket.append(Problem(self.display, line, element, message, fix, severity))

    def has_errors(self) -> bool:
        return bool(self.errors)

    def room(self) -> bool:
        """Whether another error would still be shown (skip costly hints if not)."""
        return len(self.errors) < MAX_PROBLEMS

    def finish(self) -> list[Problem]:
        """The warnings, in line order; raises ``WorkflowError`` if there is an error.

        The error lists every problem (errors and warnings) in line order, and
        says how many more were found than shown.
        """
        display = self.display
        warnings = sorted(self.warnings, key=lambda p: p.line or 0)
        if self.dropped_warnings:
            warnings.append(Problem(display, None, None,
                                    f"... and {self.dropped_warnings} more warnings not shown",
                                    None, "warning"))
        if self.errors:
            problems = sorted(self.errors + self.warnings, key=lambda p: p.line or 0)
            if self.dropped_errors:
                problems.append(Problem(display, None, None,
                                        f"... and {self.dropped_errors} more errors not shown"))
            raise WorkflowError(problems)
        return warnings
