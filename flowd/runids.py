"""New run ids, and the ones handed out for runs not made yet (stdlib only)."""
from __future__ import annotations

import os
import secrets
from typing import Callable, Iterable

from .errors import StorageError

RUN_ID_TRIES = 64  # random ids tried for a unique 4-digit prefix before any unique id will do


class RunIds:
    """The one owner of new run ids: 12 random hex digits, unique, and with a
    unique 4-digit prefix while one is easily found (short prefixes name runs
    in flowctl). ``taken()``: the ids of the runs there are and being made;
    ``reserve`` hands out an id for a run to be made later (a spool drop's,
    picked when the drop is taken), which no other new id shares a prefix
    with until it is ``release``d (its run is being made, or never will be)."""

    def __init__(self, taken: Callable[[], Iterable[str]] = tuple, runs_dir: str | None = None):
        self._taken = taken
        self.runs_dir = runs_dir
        self.reserved: set[str] = set()

    def new(self) -> str:
        """Past 65,536 runs the prefixes run out: then any unique id will do."""
        taken = set(self._taken()) | self.reserved
        prefixes = {r[:4] for r in taken}
        for _ in range(RUN_ID_TRIES):
            rid = secrets.token_hex(6)
            if rid[:4] not in prefixes:
                return rid
        for _ in range(RUN_ID_TRIES):  # 2**48 ids: a clash is as good as impossible
            rid = secrets.token_hex(6)
            if rid not in taken and not (self.runs_dir
                                         and os.path.lexists(os.path.join(self.runs_dir, rid))):
                return rid
        raise StorageError("no free run id was found; try again")

    def reserve(self) -> str:
        rid = self.new()
        self.reserved.add(rid)
        return rid

    def release(self, rid: str) -> None:
        self.reserved.discard(rid)
