"""What a run's folder holds, read at start-up (and by ``status``).

The channels' items (FIFO order), the sources that fired, the dead letters,
the quarantined items and the done counts. Reading only, but for two things
a scan must do as it goes: it removes half-written temporary files (a crash
left them; they are no item), and it raises the store's ``next_seq`` past
every item number it sees, so a new item never takes an old one's number.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from .seqqueue import SeqQueue
from .store import DONE_LOG, RunStore, _is_seq


class Scan:
    """Reads of ``store``'s folder (``flowd.store.RunStore``)."""

    def __init__(self, store: RunStore):
        self.store = store

    def channels(self, channels: Iterable[str]) -> dict[str, SeqQueue]:
        """Each channel's items in FIFO order; removes half-written temp files.
        Read as a stream into compact queues (runs of consecutive numbers, built
        through a bitmap): 10,000,000 items never become a list of names or of
        Python ints."""
        queues: dict[str, SeqQueue] = {}
        top = 0
        for ch in channels:
            folder = self.store.path("channels", ch)
            with os.scandir(folder) as it:
                queues[ch] = q = SeqQueue.from_unsorted(self._seqs(folder, it))
            if q:
                top = max(top, q[-1])
        self.store.next_seq = max(self.store.next_seq, top + 1)
        return queues

    def _seqs(self, folder: str, entries) -> Iterator[int]:
        """The item numbers among a folder's ``entries`` (hash order); removes
        the half-written temporary files on the way."""
        for entry in entries:
            name = entry.name
            if _is_seq(name):
                yield int(name)
            elif name.startswith("."):
                self.store.fs.unlink(os.path.join(folder, name))

    def fired(self) -> set[str]:
        return set(os.listdir(self.store.path("fired")))

    def failed(self) -> list[dict]:
        out = []
        folder = self.store.path("failed")
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                self.store.fs.rmtree(os.path.join(folder, name))
                continue
            try:
                with open(os.path.join(folder, name, "failure.json"), "rb") as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {"task": name, "reason": "unknown"}
            info["dirname"] = name
            for _, seq in info.get("inputs", []):
                self.store.next_seq = max(self.store.next_seq, int(seq) + 1)
            out.append(info)
        return out

    def quarantined(self) -> list[dict]:
        folder = self.store.path("quarantine")
        out = []
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json") and not name.startswith("."):
                    try:
                        with open(os.path.join(folder, name), "rb") as f:
                            out.append(json.load(f))
                    except (OSError, ValueError):
                        out.append({"seq": name[:-5], "reason": "unknown"})
        return out

    def done(self) -> dict[str, int]:
        """Process tasks applied so far, per process (see done.log)."""
        try:
            with open(self.store.path(DONE_LOG), "rb") as f:
                lines = set(f.read().decode("utf-8", "replace").splitlines())
        except FileNotFoundError:
            return {}
        counts: dict[str, int] = {}
        for line in lines:
            name, sep, _ = line.partition("\t")
            if sep:
                counts[name] = counts.get(name, 0) + 1
        return counts
