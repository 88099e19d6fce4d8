"""A channel's queue of item numbers, compact (stdlib only).

The scheduler keeps one per channel (``Scheduler.queues``): the item
numbers (SEQ) in the channel, sorted, oldest first. It holds them as *runs*
of consecutive numbers, in two ``array('q')`` (each run's first number and
the number past its last), with a read head: 10,000,000 consecutive items
(one split output) are one run, 16 bytes; scattered items cost at most 16
bytes each (two int64), never a Python int per item. Taking the oldest is
O(1) (the head run's start moves up) and the arrays are compacted now and
then; adding past the last is O(1) (the last run grows, or a run is added).

It behaves as the deque it replaced for its users: ``len``, truth,
iteration (oldest first), ``q[0]``, ``q[-1]`` (``q[i]`` walks the runs),
``popleft``, ``append``; plus ``insort`` (an item put back in its old
place), ``extend_range`` (many new items at once) and ``after`` (the items
past a number, for a pull that streams the channel).

A number is in a queue once or not at all (it names a file in the channel's
folder): ``insort`` or ``extend_range`` of numbers already there leave them
there once. Loading numbers in any order (``SeqQueue(seqs)``, and the
start-up scan through ``from_unsorted``) goes through a bitmap of the span
of numbers seen (one bit per number), never a Python list of them.
"""
from __future__ import annotations

import bisect
import heapq
import re
from array import array
from typing import Iterable, Iterator

COMPACT_AT = 4096  # taken runs kept before the arrays are compacted
BITMAP_FLOOR = 1 << 24  # bytes: a bitmap this big (134M numbers' span) is always fine...
BITMAP_PER_ITEM = 8  # ...and a bigger one while it costs at most 8 bytes per number seen
SORT_CHUNK = 1 << 20  # numbers sorted at once when the span is too wide for a bitmap
REPR_ITEMS = 1000  # a longer queue's repr shows its runs, not every number

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")
# each byte value's runs of set bits, (first bit, bit past the last), low bit first
_BYTE_RUNS: list[tuple[tuple[int, int], ...]] = []
for _v in range(256):
    _r, _b = [], 0
    while _b < 8:
        if _v >> _b & 1:
            _lo = _b
            while _b < 8 and _v >> _b & 1:
                _b += 1
            _r.append((_lo, _b))
        else:
            _b += 1
    _BYTE_RUNS.append(tuple(_r))
del _v, _r, _b


class SeqQueue:
    __slots__ = ("_s", "_e", "_h", "_n")

    def __init__(self, seqs: Iterable[int] = ()):
        """``seqs`` in any order (a repeat counts once)."""
        if isinstance(seqs, SeqQueue):
            self._s, self._e = seqs._s[seqs._h:], seqs._e[seqs._h:]
            self._n = seqs._n
        elif isinstance(seqs, range) and seqs.step == 1:
            self._s, self._e = array("q"), array("q")
            if seqs:
                self._s.append(seqs.start)
                self._e.append(seqs.stop)
            self._n = len(seqs)
        else:
            self._s, self._e, self._n = _runs_of(seqs)
        self._h = 0  # the head run; runs before it are taken (stale slots)

    @classmethod
    def from_unsorted(cls, seqs: Iterable[int]) -> "SeqQueue":
        """A queue of ``seqs``, read once as a stream in any order (a folder's
        listing): memory is a bitmap of their span, or 8 bytes per number when
        the span is too wide for one, never a Python int per number."""
        return cls(seqs)

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[int]:
        s, e = self._s, self._e
        for k in range(self._h, len(s)):
            yield from range(s[k], e[k])

    def __getitem__(self, i: int) -> int:
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("SeqQueue index out of range")
        s, e = self._s, self._e
        if i == 0:
            return s[self._h]
        if i == n - 1:
            return e[-1] - 1
        for k in range(self._h, len(s)):
            size = e[k] - s[k]
            if i < size:
                return s[k] + i
            i -= size
        raise AssertionError("SeqQueue runs disagree with its length")  # pragma: no cover

    def runs(self) -> Iterator[tuple[int, int]]:
        """The runs, oldest first: (first number, number past the last)."""
        s, e = self._s, self._e
        for k in range(self._h, len(s)):
            yield s[k], e[k]

    def __repr__(self) -> str:
        if self._n <= REPR_ITEMS:
            return f"SeqQueue({list(self)!r})"
        return f"SeqQueue(<{self._n} items in {len(self._s) - self._h} runs: {_runs_text(self)}>)"

    def popleft(self) -> int:
        h, s = self._h, self._s
        try:
            seq = s[h]
        except IndexError:
            raise IndexError("pop from an empty SeqQueue") from None
        if seq + 1 == self._e[h]:  # the head run is used up
            h += 1
            if h >= COMPACT_AT and h * 2 >= len(s):
                del s[:h]
                del self._e[:h]
                h = 0
            self._h = h
        else:
            s[h] = seq + 1
        self._n -= 1
        return seq

    def append(self, seq: int) -> None:
        """Add ``seq`` in its place: O(1) past the last (a new item), else a
        released item goes back where it was (``insort``, the same method). One
        already in the queue stays there once."""
        if self._n:
            e = self._e
            last = e[-1]
            if seq == last:
                e[-1] = seq + 1
                self._n += 1
                return
            if seq < last:
                self._insert(seq, seq + 1)
                return
        self._s.append(seq)
        self._e.append(seq + 1)
        self._n += 1

    insort = append  # a released item goes back where it was: the same code

    def extend_range(self, first: int, count: int) -> None:
        """Add the ``count`` numbers from ``first`` on: O(1) when they are past
        the last (new items), else put in their place (numbers already there
        stay once)."""
        if count < 0:
            raise ValueError(f"extend_range: count {count} is negative")
        if not count:
            return
        e = self._e
        if self._n and first == e[-1]:
            e[-1] = first + count
            self._n += count
        elif not self._n or first > e[-1]:
            self._s.append(first)
            e.append(first + count)
            self._n += count
        else:
            self._insert(first, first + count)

    def _insert(self, lo: int, hi: int) -> None:
        """Add the numbers lo..hi-1, merged with the runs they touch or meet."""
        s, e, h = self._s, self._e, self._h
        a = bisect.bisect_left(e, lo, h)  # the first run ending at lo or after
        b = bisect.bisect_right(s, hi, h)  # past the last run starting at hi or before
        if a >= b:  # touches none: a new run at a
            if a == h and h:  # before the head: reuse a taken slot
                h = self._h = h - 1
                s[h], e[h] = lo, hi
            else:
                s.insert(a, lo)
                e.insert(a, hi)
            self._n += hi - lo
            return
        covered = 0
        for k in range(a, b):
            covered += e[k] - s[k]
        first, past = min(lo, s[a]), max(hi, e[b - 1])
        s[a], e[a] = first, past
        if b - a > 1:
            del s[a + 1:b]
            del e[a + 1:b]
        self._n += past - first - covered

    def after(self, seq: int) -> Iterator[int]:
        """The items past ``seq``, oldest first (a snapshot is not taken: read
        them before the queue changes)."""
        s, e = self._s, self._e
        k = bisect.bisect_right(e, seq + 1, self._h)  # the first run ending past seq + 1
        if k < len(s):
            yield from range(max(s[k], seq + 1), e[k])
            for k in range(k + 1, len(s)):
                yield from range(s[k], e[k])


def _runs_text(q: SeqQueue, most: int = 10) -> str:
    parts = []
    for first, past in q.runs():
        if len(parts) == most:
            parts.append("...")
            break
        parts.append(str(first) if past == first + 1 else f"{first}-{past - 1}")
    return ", ".join(parts)


class _Runs:
    """Runs built from numbers in ascending order (a repeat counts once)."""

    def __init__(self):
        self.s, self.e, self.n = array("q"), array("q"), 0

    def add(self, seq: int) -> None:
        e = self.e
        if e and seq <= e[-1]:
            if seq == e[-1]:
                e[-1] = seq + 1
                self.n += 1
        else:
            self.s.append(seq)
            e.append(seq + 1)
            self.n += 1


def _runs_of(seqs: Iterable[int]) -> tuple[array, array, int]:
    """The runs of ``seqs`` (any order, repeats counted once): starts, ends
    (past the last), count. A bitmap of the span seen, grown by doubling, one
    bit per number; when the span gets wide (over ``BITMAP_FLOOR`` bytes and
    over ``BITMAP_PER_ITEM`` bytes a number seen) the numbers go to an
    ``array('q')`` instead and are sorted a chunk at a time."""
    base, cap, bits = 0, 0, bytearray()
    it = iter(seqs)
    for n in it:
        i = n - base
        if 0 <= i < cap:
            bits[i >> 3] |= 1 << (i & 7)
            continue
        if not cap:
            base, bits = n & ~7, bytearray(64)
        else:
            lo, hi = min(base, n & ~7), max(base + cap, (n & ~7) + 8)
            need = (hi - lo) >> 3  # bytes
            if need > BITMAP_FLOOR and need > BITMAP_PER_ITEM * _popcount(bits):
                return _runs_sorted(_numbers(bits, base), n, it)
            extra = min(max(need, 2 * len(bits)), max(BITMAP_FLOOR, need)) - len(bits)
            if lo < base:  # grow down
                bits[0:0] = bytes(extra)
                base -= extra << 3
            else:
                bits.extend(bytes(extra))
        cap = len(bits) << 3
        i = n - base
        bits[i >> 3] |= 1 << (i & 7)
    if not cap:
        return array("q"), array("q"), 0
    s, e = _bit_runs(bits, base)
    return s, e, sum(e) - sum(s)


def _popcount(bits: bytearray) -> int:
    return int.from_bytes(bits, "little").bit_count()


def _numbers(bits: bytearray, base: int) -> Iterator[int]:
    s, e = _bit_runs(bits, base)
    for k in range(len(s)):
        yield from range(s[k], e[k])


def _runs_sorted(head: Iterable[int], n: int, rest: Iterator[int]) -> tuple[array, array, int]:
    """Runs of numbers too widely spread for a bitmap: an ``array('q')`` of them,
    sorted ``SORT_CHUNK`` at a time and merged."""
    a = array("q", head)
    a.append(n)
    a.extend(rest)
    chunks = []
    while a:
        chunk = a[-SORT_CHUNK:]
        del a[-SORT_CHUNK:]
        chunks.append(array("q", sorted(chunk)))
        del chunk
    out = _Runs()
    for n in heapq.merge(*chunks):
        out.add(n)
    return out.s, out.e, out.n


def _bit_runs(bits: bytearray, base: int) -> tuple[array, array]:
    """The runs of set bits in ``bits`` (bit i, for number base + i, is
    bits[i >> 3] >> (i & 7) & 1), as arrays of firsts and of pasts: stretches
    of zero bytes (and of full ones inside a run) are skipped by regex."""
    s, e = array("q"), array("q")
    first, past = s.append, e.append
    nonzero, not_full = _NONZERO.search, _NOT_FULL.search
    size, j, open_ = len(bits), 0, False  # open_: a run goes on past byte j - 1
    while j < size:
        v = bits[j]
        if v == (255 if open_ else 0):
            m = (not_full if open_ else nonzero)(bits, j)
            if m is None:
                break
            j = m.start()
            v = bits[j]
        at = base + (j << 3)
        if open_ and not v & 1:
            past(at)
            open_ = False
        for lo, hi in _BYTE_RUNS[v]:
            if not open_:
                first(at + lo)
            if hi < 8:
                past(at + hi)
                open_ = False
            else:
                open_ = True
        j += 1
    if open_:
        past(base + (size << 3))
    return s, e
