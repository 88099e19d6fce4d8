"""A channel's queue of item numbers (flowd/seqqueue.py): runs of consecutive
numbers that behave as the sorted queue of numbers they stand for, and a
start-up load of 10,000,000 items that never holds a Python int per item."""
from __future__ import annotations

import bisect
import os
import random
import subprocess
import sys
import tracemalloc

import pytest

from flowd import seqqueue as SQ
from flowd.seqqueue import COMPACT_AT, SeqQueue


def _check(q: SeqQueue, model: list[int]) -> None:
    """q holds exactly the model's numbers, its runs sorted, apart and not touching."""
    assert list(q) == model
    assert len(q) == len(model) and bool(q) == bool(model)
    runs = list(q.runs())
    assert all(first < past for first, past in runs)
    assert all(a[1] < b[0] for a, b in zip(runs, runs[1:]))  # a gap between runs
    if model:
        assert q[0] == model[0] and q[-1] == model[-1]
    else:
        with pytest.raises(IndexError):
            q[0]
        with pytest.raises(IndexError):
            q[-1]


def test_random_operations_agree_with_a_sorted_list():
    rng = random.Random(15)
    for round_ in range(20):
        span = rng.choice([20, 200, 5000])
        start = rng.sample(range(span), rng.randrange(0, span // 2))
        q, model = SeqQueue(start), sorted(start)
        _check(q, model)
        for _ in range(1500):
            op = rng.random()
            top = model[-1] + 1 if model else 0
            if op < 0.3:
                if model:
                    assert q.popleft() == model.pop(0)
                else:
                    with pytest.raises(IndexError):
                        q.popleft()
            elif op < 0.45:  # a new item past the last (or just past a gap)
                seq = top + rng.choice([0, 0, 0, 1, 3])
                q.append(seq)
                model.append(seq)
            elif op < 0.65:  # a released item back in its place, maybe one there already
                seq = rng.randrange(0, top + 5)
                q.insort(seq)
                if seq not in model:
                    bisect.insort(model, seq)
            elif op < 0.72:  # a split output: many at once, maybe over numbers there
                first, count = rng.randrange(0, top + 5), rng.choice([0, 1, 2, 7, 300])
                q.extend_range(first, count)
                model = sorted(set(model) | set(range(first, first + count)))
            elif op < 0.82:
                after = rng.randrange(-2, top + 3)
                assert list(q.after(after)) == [s for s in model if s > after]
            elif op < 0.92 and model:
                i = rng.randrange(-len(model), len(model))
                assert q[i] == model[i]
            else:
                _check(q, model)
        _check(q, model)
        assert SeqQueue(q) is not q and list(SeqQueue(q)) == model  # a copy


def test_put_backs_go_to_their_old_places_and_join_runs():
    q = SeqQueue([5, 1, 3])
    assert list(q) == [1, 3, 5] and repr(q) == "SeqQueue([1, 3, 5])"
    assert q.popleft() == 1
    q.insort(1)  # before the head: back in front
    q.insort(4)  # joins 3 and 5 into one run
    assert list(q.runs()) == [(1, 2), (3, 6)]
    q.append(9)
    assert list(q) == [1, 3, 4, 5, 9] and list(q.after(3)) == [4, 5, 9]
    assert q[2] == 4 and q[-2] == 5


def test_insort_of_an_item_already_there_keeps_it_once():
    q = SeqQueue([1, 2, 3, 7])
    for seq in (1, 2, 3, 7):
        q.insort(seq)
    q.extend_range(2, 3)  # 2, 3 there; 4 new
    assert list(q) == [1, 2, 3, 4, 7] and len(q) == 5
    assert list(SeqQueue([4, 4, 2, 4])) == [2, 4]  # a repeat given to the constructor counts once


def test_edges_empty_single_and_empty_again():
    q = SeqQueue()
    assert not q and len(q) == 0 and list(q) == [] and list(q.after(0)) == []
    with pytest.raises(IndexError):
        q.popleft()
    q.insort(5)
    assert list(q) == [5] and q[0] == q[-1] == 5
    assert q.popleft() == 5 and not q
    q.append(3)  # empty again: any number goes
    q.extend_range(4, 0)  # nothing
    q.extend_range(10, 3)
    assert list(q) == [3, 10, 11, 12] and list(q.runs()) == [(3, 4), (10, 13)]
    with pytest.raises(ValueError, match="negative"):
        q.extend_range(20, -1)
    q.append(4)  # not past the last: put in its place
    assert list(q.runs()) == [(3, 5), (10, 13)]


def test_insort_joins_runs_and_fills_gaps_before_the_head():
    q = SeqQueue()
    q.extend_range(1, 10)
    q.extend_range(20, 10)
    for _ in range(12):
        q.popleft()  # the head is now in the second run (22)
    for seq in (15, 1, 5, 4, 21, 20):
        q.insort(seq)
    assert list(q.runs()) == [(1, 2), (4, 6), (15, 16), (20, 30)]
    q.extend_range(2, 2)  # joins 1 and 4-5
    q.extend_range(6, 14)  # 6..19 joins everything
    assert list(q.runs()) == [(1, 30)] and len(q) == 29


def test_compaction_keeps_the_queue():
    q = SeqQueue(range(6 * COMPACT_AT, 0, -2))  # any order; 3 * COMPACT_AT isolated items
    taken = [q.popleft() for _ in range(2 * COMPACT_AT)]  # compacts on the way
    assert taken == list(range(2, 4 * COMPACT_AT + 1, 2))
    q.insort(7)
    assert list(q) == [7] + list(range(4 * COMPACT_AT + 2, 6 * COMPACT_AT + 1, 2))
    assert list(q.after(6 * COMPACT_AT - 3)) == [6 * COMPACT_AT - 2, 6 * COMPACT_AT]
    while q:
        q.popleft()
    assert not q and len(q) == 0 and list(q.after(0)) == []


def test_a_long_queue_prints_its_runs_not_every_number():
    q = SeqQueue()
    q.extend_range(1, 10_000_000)
    q.append(10_000_002)
    assert repr(q) == "SeqQueue(<10000001 items in 2 runs: 1-10000000, 10000002>)"


def _arrays_size(q: SeqQueue) -> int:
    return sys.getsizeof(q._s) + sys.getsizeof(q._e)


def test_ten_million_new_items_are_one_run():
    q = SeqQueue([1, 2])
    q.extend_range(3, 10_000_000)
    assert len(q) == 10_000_002 and q[-1] == 10_000_002 and list(q.runs()) == [(1, 10_000_003)]
    assert _arrays_size(q) < 1000
    scattered = SeqQueue(range(0, 2_000_000, 2))  # 1,000,000 isolated items
    assert _arrays_size(scattered) < 17 * 1_000_000  # 16 bytes an isolated item, and some slack


def _shuffled_chunks(total: int, chunk: int, seed: int):
    """1..total in a scandir-like order: chunks in random order, each scrambled."""
    order = list(range(total // chunk))
    random.Random(seed).shuffle(order)
    for c in order:
        base = c * chunk + 1
        for k in range(chunk):
            yield base + (k * 7919) % chunk  # 7919 is prime: a permutation of the chunk


def test_loading_items_in_any_order_holds_no_int_per_item():
    tracemalloc.start()  # it slows every allocation tenfold: a million items here, ten below
    try:
        q = SeqQueue.from_unsorted(_shuffled_chunks(1_000_000, 10_000, 8))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(q) == 1_000_000 and list(q.runs()) == [(1, 1_000_001)]
    assert peak < 2 * 2**20, f"peak {peak} bytes"  # a list of them: about 36 MB, an array 8 MB


LOAD_10M = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from test_seqqueue import _shuffled_chunks
from flowd.seqqueue import SeqQueue
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = SeqQueue.from_unsorted(_shuffled_chunks(10_000_000, 10_000, 9))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(q) == 10_000_000 and list(q.runs()) == [(1, 10_000_001)], q
print(after - before)
"""


def test_loading_ten_million_items_in_any_order_grows_the_process_by_a_few_mb():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", LOAD_10M, os.path.join(root, "tests")], cwd=root,
                         capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout)
    assert grown_kib < 16 * 1024, f"the peak RSS grew by {grown_kib} KiB"  # a list: about 400 MB


def test_loading_scattered_items_keeps_every_gap():
    rng = random.Random(3)
    seqs = [s for s in range(1, 300_000) if rng.random() < 0.6]
    shuffled = seqs[:]
    rng.shuffle(shuffled)
    q = SeqQueue.from_unsorted(iter(shuffled))
    assert list(q) == seqs


def test_numbers_spread_too_wide_for_a_bitmap_are_sorted_instead(monkeypatch):
    monkeypatch.setattr(SQ, "BITMAP_FLOOR", 64)
    monkeypatch.setattr(SQ, "SORT_CHUNK", 7)
    rng = random.Random(4)
    seqs = sorted(set(rng.randrange(0, 1 << 50) for _ in range(200)) | set(range(100, 140)))
    shuffled = seqs + seqs[:20]  # repeats count once
    rng.shuffle(shuffled)
    q = SeqQueue.from_unsorted(iter(shuffled))
    assert list(q) == seqs
    assert (100, 140) in set(q.runs())


def test_start_up_scan_loads_a_channel_folder_and_drops_temp_files(tmp_path):
    from flowd.store import seq_name
    from flowd.storescan import Scan

    class FS:
        def unlink(self, path):
            os.unlink(path)

    class Store:
        next_seq = 1
        fs = FS()

        def path(self, *parts):
            return str(tmp_path.joinpath(*parts))

    folder = tmp_path / "channels" / "a"
    folder.mkdir(parents=True)
    seqs = [s for s in range(1, 400) if s % 7 != 3] + [1000, 1001]
    for s in seqs:
        (folder / seq_name(s)).write_bytes(b"x")
    (folder / ".tmp-half").write_bytes(b"")
    (tmp_path / "channels" / "b").mkdir()
    store = Store()
    queues = Scan(store).channels(["a", "b"])
    assert list(queues["a"]) == seqs and not queues["b"]
    assert sorted(os.listdir(folder)) == sorted(seq_name(s) for s in seqs)  # the temp file is gone
    assert store.next_seq == 1002


def test_items_of_a_channel_of_ten_million_lists_the_oldest_page(tmp_path, monkeypatch):
    """``items`` (what flowctl pull asks of an empty channel) lists the oldest
    ITEMS_SHOWN, never the whole queue: the rest are read with ``pull``."""
    from types import SimpleNamespace

    from flowd import runview
    from flowd.store import seq_name

    monkeypatch.setattr(runview, "ITEMS_SHOWN", 5)
    q = SeqQueue()
    q.extend_range(1, 10_000_000)
    for seq in (1, 2, 3, 8):  # 4..7: taken by a task meanwhile (no file)
        (tmp_path / seq_name(seq)).write_bytes(b"x" * seq)
    run = SimpleNamespace(id="r1", wf=SimpleNamespace(channels={"a": None}),
                          sched=SimpleNamespace(queues={"a": q}),
                          store=SimpleNamespace(item_path=lambda ch, seq: str(tmp_path / seq_name(seq))))
    got = runview.RunView(run).items("a")
    assert [(i["seq"], i["size"]) for i in got] == [(1, 1), (2, 2), (3, 3)]
    assert len(q) == 10_000_000
