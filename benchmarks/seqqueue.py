#!/usr/bin/env python3
"""A channel's queue of item numbers: runs (flowd/seqqueue.py) against the
plain ``array('q')`` with a read head it replaced (copied below as the
baseline), in one run, for two cases:

- **consecutive**: 10,000,000 consecutive numbers (one split output);
- **scattered**: 1,000,000 numbers, every other one (the worst case for runs:
  each item is a run of its own).

For each, in a fresh process per implementation and case:

- **build**: the start-up load (``Scan.channels``), from the numbers in a
  folder listing's order (chunks of 10,000 in random order, each scrambled):
  its wall time, and the memory it needs: the growth of the process's peak
  RSS (``ru_maxrss``; tracemalloc would slow a 10M load tenfold) and the
  queue's own size (``sys.getsizeof`` of its arrays);
- **mixed**: the scheduler's work, 20,000 steps on the loaded queue:
  take the oldest (a task claims it), add a new item past the last (its
  output), and one step in 20 put a taken item back in its place (a task
  released);
- **take+add**: 1,000,000 steps without the put-backs (each of which costs
  the baseline a move of its whole array: 8 ms for 10M), so the hot path alone;
- **pop all**: take every item, oldest first.

Each process is run ``--repeat`` times (3), the two in turns, and the least
of each figure is kept (the machine may be shared). Ratios are new/baseline (under 1: the new one is smaller or faster). The goal
for the hot path: mixed and take+add at most 1.3.

    python benchmarks/seqqueue.py [--consecutive 10000000] [--scattered 1000000] [--steps 1000000] [--mixed-steps 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import resource
import subprocess
import sys
import time
from array import array
from typing import Iterable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowd.seqqueue import SeqQueue  # noqa: E402

COMPACT_AT = 4096


class ArrayQueue:
    """The baseline: flowd/seqqueue.py's SeqQueue before runs (4cb252d)."""
    __slots__ = ("_a", "_head")

    def __init__(self, seqs: Iterable[int] = ()):
        a = array("q", seqs)
        if any(a[i] > a[i + 1] for i in range(len(a) - 1)):
            a = array("q", sorted(a))
        self._a = a
        self._head = 0

    def __len__(self) -> int:
        return len(self._a) - self._head

    def __bool__(self) -> bool:
        return len(self._a) > self._head

    def __getitem__(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("SeqQueue index out of range")
        return self._a[self._head + i]

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
        self._a.append(seq)

    def insort(self, seq: int) -> None:
        a = self._a
        if len(a) == self._head or seq > a[-1]:
            a.append(seq)
        else:
            a.insert(bisect.bisect_left(a, seq, self._head), seq)


def listing(total: int, step: int, chunk: int = 10_000, seed: int = 15) -> Iterator[int]:
    """step, 2*step, ... total*step in a folder listing's order."""
    order = list(range((total + chunk - 1) // chunk))
    random.Random(seed).shuffle(order)
    for c in order:
        size = min(chunk, total - c * chunk)
        for k in range(size):
            yield (c * chunk + (k * 7919) % size + 1) * step


def sizeof(q) -> int:
    if isinstance(q, SeqQueue):
        return sys.getsizeof(q._s) + sys.getsizeof(q._e)
    return sys.getsizeof(q._a)


def one(impl: str, total: int, step: int, steps: int, mixed_steps: int) -> dict:
    cls = SeqQueue if impl == "runs" else ArrayQueue
    source = listing(total, step)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    q = cls.from_unsorted(source) if cls is SeqQueue else cls(source)
    build = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"build_s": build, "rss_growth": (rss1 - rss0) * 1024, "size": sizeof(q), "len": len(q)}
    rng = random.Random(7)
    back = [rng.random() < 0.05 for _ in range(mixed_steps)]
    nxt = q[-1] + step
    popleft, append, insort = q.popleft, q.append, q.insort
    t = time.perf_counter()
    taken = 0
    for b in back:
        seq = popleft()
        append(nxt)
        nxt += step
        if b:
            insort(taken)  # the last one put back: before the head
        taken = seq
    out["mixed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):  # take and add only: no put-back (which the baseline pays O(n) for)
        popleft()
        append(nxt)
        nxt += step
    out["hot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    while q:
        popleft()
        n += 1
    out["pop_s"] = time.perf_counter() - t
    out["popped"] = n
    return out


def run_one(impl: str, total: int, step: int, steps: int, mixed_steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", impl, str(total), str(step), str(steps),
                          str(mixed_steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--consecutive", type=int, default=10_000_000)
    ap.add_argument("--scattered", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--mixed-steps", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, *numbers = args.one
        print(json.dumps(one(impl, *map(int, numbers))))
        return
    fails = []
    for name, total, step in (("consecutive", args.consecutive, 1), ("scattered", args.scattered, 2)):
        runs: dict[str, list[dict]] = {"array": [], "runs": []}
        for _ in range(args.repeat):  # taken in turns; the machine is shared: the least of each
            for impl in runs:
                runs[impl].append(run_one(impl, total, step, args.steps, args.mixed_steps))
        base, new = ({k: min(r[k] for r in runs[impl]) for k in runs[impl][0]} for impl in runs)
        assert new["len"] == base["len"] == total and new["popped"] == base["popped"], (new, base)
        print(f"{name}: {total:,} numbers, step {step}; mixed: {args.mixed_steps:,} steps;"
              f" take+add: {args.steps:,}")
        print(f"  {'':22}{'array (baseline)':>18}{'runs (new)':>14}{'ratio':>9}")
        rows = (("build time", "build_s", lambda v: f"{v:.3f} s"),
                ("build peak RSS growth", "rss_growth", mb),
                ("queue size", "size", mb),
                ("mixed time", "mixed_s", lambda v: f"{v:.3f} s"),
                ("take+add time", "hot_s", lambda v: f"{v:.3f} s"),
                ("pop all time", "pop_s", lambda v: f"{v:.3f} s"))
        for label, key, fmt in rows:
            ratio = new[key] / base[key] if base[key] else float("nan")
            print(f"  {label:22}{fmt(base[key]):>18}{fmt(new[key]):>14}{ratio:>9.3f}")
        for key in ("mixed_s", "hot_s"):
            if new[key] > 1.3 * base[key]:
                fails.append(f"{name}: {key[:-2]} {new[key] / base[key]:.2f}x the baseline")
    print("goal (mixed and take+add <= 1.3x the baseline):", "; ".join(fails) if fails else "met")


if __name__ == "__main__":
    main()
