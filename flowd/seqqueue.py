"""A channel's queue of item numbers, compact (stdlib only).

The scheduler keeps one per channel (``Scheduler.queues``): the item
numbers (SEQ) in the channel, sorted, oldest first. A run of 100,000 queued
items holds them in an ``array('q')`` (8 bytes each, 0.8 MB) instead of a
deque of Python ints (about 36 bytes each), with a read head, so taking the
oldest is O(1) and the array is compacted now and then.

It behaves as the deque it replaces for its users: ``len``, truth,
iteration (oldest first), ``q[0]``, ``q[-1]``, ``popleft``, ``append``;
plus ``insort`` (an item put back in its old place) and ``after`` (the
items past a number, for a pull that streams the channel).
"""
from __future__ import annotations

import bisect
from array import array
from typing import Iterable, Iterator

COMPACT_AT = 4096  # taken items kept before the array is compacted


class SeqQueue:
    __slots__ = ("_a", "_head")

    def __init__(self, seqs: Iterable[int] = ()):
        """``seqs`` in any order."""
        a = array("q", seqs)
        if any(a[i] > a[i + 1] for i in range(len(a) - 1)):
            a = array("q", sorted(a))
        self._a = a
        self._head = 0

    def __len__(self) -> int:
        return len(self._a) - self._head

    def __bool__(self) -> bool:
        return len(self._a) > self._head

    def __iter__(self) -> Iterator[int]:
        a, i = self._a, self._head
        for k in range(i, len(a)):
            yield a[k]

    def __getitem__(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("SeqQueue index out of range")
        return self._a[self._head + i]

    def __repr__(self) -> str:
        return f"SeqQueue({list(self)!r})"

    def popleft(self) -> int:
        if not self:
            raise IndexError("pop from an empty SeqQueue")
        seq = self._a[self._head]
        self._head += 1
        if self._head >= COMPACT_AT and self._head * 2 >= len(self._a):
            del self._a[:self._head]
            self._head = 0
        return seq

    def append(self, seq: int) -> None:
        """Add ``seq``, which must be past the last (``insort`` otherwise)."""
        self._a.append(seq)

    def insort(self, seq: int) -> None:
        """Put ``seq`` in its place (a released item goes back where it was)."""
        a = self._a
        if len(a) == self._head or seq > a[-1]:
            a.append(seq)
        else:
            a.insert(bisect.bisect_left(a, seq, self._head), seq)

    def after(self, seq: int) -> Iterator[int]:
        """The items past ``seq``, oldest first (a snapshot is not taken: read
        them before the queue changes)."""
        a = self._a
        for k in range(bisect.bisect_right(a, seq, self._head), len(a)):
            yield a[k]
