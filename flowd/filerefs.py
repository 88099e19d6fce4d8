"""The files a workflow names (``file=``, ``glob=``), checked against its folder (stdlib only).

Every path is relative to the workflow file's folder and must stay inside it,
also through symbolic links; a glob never descends into a linked folder and
is bounded (``MAX_GLOBS`` per file, ``MAX_GLOB_MATCHES`` paths each); a
script file is read only up to ``MAX_SCRIPT_BYTES``. A refused reference
raises ``flowd.problems.Invalid``; the caller reports it at its element.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat

from flowd.limits import MAX_GLOB_MATCHES, MAX_GLOBS, MAX_SCRIPT_BYTES
from flowd.problems import Invalid, quote as _q


class FileRefs:
    """The checks for one workflow, whose folder is ``base`` (a real path)."""

    def __init__(self, base: str):
        self.base = base
        self.globs = 0
        self._checked: set[tuple[str, str]] = set()

    def rel_path(self, attr: str, value: str) -> str:
        """Check a file= value: relative, inside the base folder, a regular file."""
        norm = self._norm(attr, value)
        if (attr, norm) not in self._checked:  # a file named many times is checked once
            self._check_file(attr, value, norm)
            self._checked.add((attr, norm))
        return norm

    def _check_file(self, attr: str, value: str, norm: str) -> None:
        real = os.path.realpath(os.path.join(self.base, norm))
        if not inside(real, self.base):
            raise Invalid(f'{attr}={_q(value)} leads outside the workflow\'s folder '
                          f"(through a symbolic link, to {_q(real, 120)})",
                          "copy the file into the workflow's folder instead of linking to it")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise Invalid(f"{attr}={_q(value)}: no such file in the workflow's folder",
                          "check the name; paths are relative to the workflow file's folder") from None
        except OSError as exc:
            raise Invalid(f"{attr}={_q(value)} cannot be read: {exc.strerror}",
                          "check the path and its permissions") from None
        if stat.S_ISDIR(st.st_mode):
            raise Invalid(f"{attr}={_q(value)} is a folder, not a file",
                          f'name a file, or use <items glob="{norm}/*"/> for every file in it')
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"{attr}={_q(value)} is not a regular file", "name a regular file")

    def _norm(self, attr: str, value: str) -> str:
        if value == "" or not value.strip():
            raise Invalid(f"{attr}= is empty", f'write {attr}="data/input.txt"')
        if value.startswith("/") or os.path.isabs(value):
            raise Invalid(f"{attr}={_q(value)} is an absolute path; paths must be relative "
                          "to the workflow file's folder and stay inside it",
                          "copy the file next to the workflow and write a relative path, "
                          f'e.g. {attr}="data/{posixpath.basename(value) or "input.txt"}"')
        norm = posixpath.normpath(value)
        if norm == ".." or norm.startswith("../"):
            raise Invalid(f"{attr}={_q(value)} goes up out of the workflow's folder with \"..\"; "
                          "paths must stay inside it",
                          "copy the file into the workflow's folder and name it from there")
        if norm == ".":
            raise Invalid(f"{attr}={_q(value)} names the workflow's folder itself",
                          f'write {attr}="data/input.txt"')
        return norm

    def expand_glob(self, value: str) -> list[str]:
        """The regular files a glob= value matches, sorted (an empty list past ``MAX_GLOBS``)."""
        norm = self._norm("glob", value)
        self.globs += 1
        if self.globs > MAX_GLOBS:
            if self.globs == MAX_GLOBS + 1:
                raise Invalid(f"more than {MAX_GLOBS} <items glob=...> in one workflow",
                              "use fewer, broader patterns such as \"data/*.txt\"")
            return []
        try:
            matches = _expand_glob(self.base, norm)
        except _TooMany:
            raise Invalid(f"glob={_q(value)} matches more than {MAX_GLOB_MATCHES} paths",
                          "use a narrower pattern, or fewer files") from None
        files: list[str] = []
        outside: list[str] = []
        parents: dict[str, bool] = {}  # folder -> whether its real path is inside base
        for rel in matches:
            rel = posixpath.normpath(rel.replace(os.sep, "/"))
            # A plain file (not a link) is inside when its folder's real path is:
            # one realpath per folder, not per file (100,000 files in one folder).
            parent, name = posixpath.split(rel)
            try:
                st = os.lstat(os.path.join(self.base, rel))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and name not in ("", ".", ".."):
                ok = parents.get(parent)
                if ok is None:
                    ok = parents[parent] = inside(
                        os.path.realpath(os.path.join(self.base, parent)), self.base)
                if ok:
                    files.append(rel)
                else:
                    outside.append(rel)
                continue
            real = os.path.realpath(os.path.join(self.base, rel))
            if not inside(real, self.base):
                outside.append(rel)
                continue
            try:
                if stat.S_ISREG(os.stat(real).st_mode):
                    files.append(rel)
            except OSError:
                continue
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            raise Invalid(f"glob={_q(value)} matches {_q(outside[0])}{more}, which leads outside "
                          "the workflow's folder through a symbolic link",
                          "copy the files into the workflow's folder instead of linking to them")
        if not files:
            raise Invalid(f"glob={_q(value)} matches no file in the workflow's folder",
                          "check the pattern (relative to the workflow file's folder, e.g. "
                          '"data/*.txt"), or add the files')
        return files

    def read_script(self, norm: str) -> str:
        """The text of a script file already checked by ``rel_path``."""
        real = os.path.realpath(os.path.join(self.base, norm))
        try:
            with open(real, "rb") as f:
                data = f.read(MAX_SCRIPT_BYTES + 1)
        except OSError as exc:
            raise Invalid(f"script file {_q(norm)} cannot be read: {exc.strerror}",
                          "check the file's permissions") from None
        if len(data) > MAX_SCRIPT_BYTES:
            raise Invalid(f"script file {_q(norm)} is larger than 1 MiB",
                          "keep scripts small; put data in channels")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"script file {_q(norm)} is not UTF-8 text", "save it as UTF-8") from None


class _TooMany(Exception):
    pass


_MAGIC_RE = re.compile(r"[*?[]")


def _expand_glob(base: str, pattern: str) -> list[str]:
    """Paths under ``base`` matching ``pattern`` (relative, normalised), sorted.

    Like ``glob.glob(pattern, root_dir=base)`` (``*``, ``?``, ``[...]``; names
    starting with "." only when the pattern's part does; ``**`` is ``*``), but
    a wildcard never descends into a symbolic link to a folder, so a planted
    link loop cannot make the expansion explode, and the number of paths is
    capped. Callers still check that every match resolves inside ``base``.
    """
    parts = pattern.split("/")
    current = [""]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        magic = bool(_MAGIC_RE.search(part))
        found: list[str] = []
        for d in current:
            folder = os.path.join(base, d) if d else base
            if magic:
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                names = [n for n in names if fnmatch.fnmatchcase(n, part)
                         and (not n.startswith(".") or part.startswith("."))]
            else:
                names = [part] if os.path.lexists(os.path.join(folder, part)) else []
            for n in names:
                rel = f"{d}/{n}" if d else n
                if not last:
                    full = os.path.join(base, rel)
                    if not os.path.isdir(full) or (magic and os.path.islink(full)):
                        continue
                found.append(rel)
                if len(found) > MAX_GLOB_MATCHES:
                    raise _TooMany()
        current = found
    return sorted(current)


def inside(real: str, base: str) -> bool:
    """Whether the real path ``real`` is ``base`` or under it."""
    try:
        return os.path.commonpath([real, base]) == base
    except ValueError:
        return False
