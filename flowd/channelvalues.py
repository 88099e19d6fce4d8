"""Values through channels (SPEC 6.5, docs/format.md "Values, stdout and split"); stdlib only.

Three port attributes:

- ``input@value="yes"``: the input item is also the environment variable
  named after ``as``. Checked at submission (``value_name``): the name is an
  environment name and none that would break the wrapper, the interpreter
  or the loader (``RESERVED``, ``RESERVED_PREFIXES``). Read when the task
  starts, on the executor's thread (``value_env``): at most
  ``MAX_VALUE_BYTES``, no NUL, UTF-8 text (Docker's API and the warm agent's
  env file carry text), and within the kernel's limit for one variable;
  anything else fails the task with that reason (inputs kept, retried or
  dead-lettered like any failure), never a truncation.
- ``output@from="stdout"``: the wrapper sends the script's standard output
  to ``/task/<as>`` (``flowd.executor.container.wrapper``), so it is
  collected like a file output: streamed, capped, copied, committed.
- ``output@split="lines"``: the output (file or stdout) becomes one item per
  line (``LineSplitter``, used by ``flowd.collect``).
"""
from __future__ import annotations

import dataclasses
import os
import re

from flowd.problems import Invalid, quote

MAX_VALUE_BYTES = 128 * 1024  # one value input's item, at most
ARG_STRLEN = 128 * 1024  # Linux's MAX_ARG_STRLEN: one "NAME=value" string with its NUL
MAX_SPLIT_ITEMS = 10_000_000  # items one split="lines" output may give: config max_split_lines's default
SPLIT_SYNC_BATCH = 1024  # item files fsynced together (one group commit)

VALUE_CHOICES = ("no", "yes")
FROM_CHOICES = ("file", "stdout")
SPLIT_CHOICES = ("no", "lines")

ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names an untrusted item must not set: the wrapper's and the shells' own
# (PATH finds the interpreter; HOME is flowd's; IFS, ENV, BASH_ENV, SHELLOPTS,
# BASHOPTS, CDPATH, PS4 change how sh or bash read and run the script; PWD and
# OLDPWD are the shell's), and whole families that make the loader or an
# interpreter load code named by the value (LD_*, PYTHON*, NODE_*, BASH_FUNC_*).
RESERVED = frozenset({"PATH", "HOME", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "CDPATH",
                      "PS4", "PWD", "OLDPWD", "SHELL", "TMPDIR", "HOSTNAME"})
RESERVED_PREFIXES = ("FLOWD_", "LD_", "PYTHON", "NODE_", "BASH_FUNC_")


def value_name(name: str, env: dict[str, str]) -> str:
    """The environment variable of a value input named ``name`` (its ``as``):
    Invalid with the fix when it cannot be one."""
    if not ENV_RE.match(name):
        raise Invalid(f"a value input's as={quote(name)} is also an environment variable's name, "
                      "which must be letters, digits and _, not starting with a digit",
                      f'write as="{_env_like(name)}"')
    if name in RESERVED or name.startswith(RESERVED_PREFIXES) or name.upper().startswith("FLOWD_"):
        raise Invalid(f"a value input's as={quote(name)} would set the environment variable {name}, "
                      "which the shell, the interpreter or flowd rely on (the reserved names are "
                      "in docs/format.md, \"Value inputs\")",
                      f'write as="{name.lower()}_value"' if ENV_RE.match(name.lower() + "_value")
                      else 'write as="item"')
    if name in env:
        raise Invalid(f"a value input's as={quote(name)} sets the same environment variable as an "
                      "<env> of this process", "rename one of them")
    return name


def _env_like(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)[:63] or "item"
    return cleaned if ENV_RE.match(cleaned) else "v_" + cleaned


# -- at the start of a task (the executor's thread) ----------------------------

def value_env(values: list[tuple[str, str, str]]) -> tuple[dict[str, str], str | None]:
    """The environment of a task's value inputs: ``values`` is its
    [(variable, what (for messages), host path)]. Returns (variables, None),
    or ({}, why) when one cannot be a variable: the task then fails."""
    env: dict[str, str] = {}
    for name, what, path in values:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            return {}, f"value input {name}: {what} cannot be read ({e.strerror})"
        try:
            data = _read_upto(fd, MAX_VALUE_BYTES + 1)
        finally:
            os.close(fd)
        why = value_problem(name, data)
        if why is not None:
            return {}, f"value input {name}: {what} {why}"
        env[name] = data.decode("utf-8")
    return env, None


def value_problem(name: str, data: bytes) -> str | None:
    """Why ``data`` cannot be the variable ``name``, or None."""
    if len(data) > MAX_VALUE_BYTES:
        return (f"is over {MAX_VALUE_BYTES // 1024} KiB; a value input holds at most "
                f"{MAX_VALUE_BYTES} bytes (pass a bigger item as a file: leave value out)")
    nul = data.find(b"\x00")
    if nul >= 0:
        return (f"holds a NUL byte (at offset {nul}); an environment variable cannot "
                "(pass it as a file: leave value out)")
    if len(name) + 1 + len(data) + 1 > ARG_STRLEN:
        return (f"is {len(data)} bytes; with its name, \"{name}=\" and the ending NUL that is over "
                f"the kernel's limit of {ARG_STRLEN} bytes for one variable")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a value "
                "input is passed as text (pass binary data as a file: leave value out)")
    return None


def _read_upto(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# -- split="lines" ------------------------------------------------------------------

class LineSplitter:
    """The lines of a file, each as an iterable of pieces (never a whole line
    in memory: a 1 GiB line streams in 1 MiB pieces).

    A line ends at LF; a CR right before the LF is part of the line end (so a
    Windows text file gives the same items); a CR anywhere else is data. An
    empty last line after a final LF is no line; a last line without LF is one.
    """

    def __init__(self, read, chunk: int = 1024 * 1024):
        self._read = read
        self._chunk = chunk
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> bool:
        """True when there are unread bytes."""
        if self._pos < len(self._buf):
            return True
        if self._eof:
            return False
        self._buf = self._read(self._chunk)
        self._pos = 0
        if not self._buf:
            self._eof = True
            return False
        return True

    def more(self) -> bool:
        return self._fill()

    def line(self):
        """A generator of the next line's pieces (consume it whole before the next)."""
        cr = False  # a CR held back at a piece's end: is an LF next?
        while self._fill():
            buf, pos = self._buf, self._pos
            end = buf.find(b"\n", pos)
            if end >= 0:
                self._pos = end + 1
                if end > pos and buf[end - 1] == 0x0D:
                    if cr:
                        yield b"\r"
                    if end - 1 > pos:
                        yield buf[pos:end - 1]
                elif end == pos:
                    pass  # the held CR, if any, was the line end's
                else:
                    if cr:
                        yield b"\r"
                    yield buf[pos:end]
                return
            self._pos = len(buf)
            if cr:
                yield b"\r"
            piece = buf[pos:]
            cr = piece.endswith(b"\r")
            if cr:
                piece = piece[:-1]
            if piece:
                yield piece
        if cr:
            yield b"\r"  # a CR at the very end, with no LF after it: data


def with_values(spec):
    """``spec`` (an executor's TaskSpec) with its value inputs in its environment,
    and None; or (None, why) when one cannot be a variable. For the executor's
    thread, right before the container (or the warm task) starts; the daemon's
    own spec is left as it was (no value stays in memory past the start)."""
    if not getattr(spec, "values", None):
        return spec, None
    env, why = value_env(spec.values)
    if why is not None:
        return None, why
    return dataclasses.replace(spec, env={**spec.env, **env}), None
