"""The content cache (flowd/cache.py) with the fake executor: keys, hits, misses, bounds.

The same behaviours against the real engine and the daemon are in
tests/test_cache.py; the crash sweep's ``cache`` flow proves a crash at any
point of a store or a hit loses and duplicates nothing.
"""
from __future__ import annotations

import json
import os

from helpers import proc, wf
from test_run import Harness

from flowd import cache as C
from flowd import checksum
from flowd import trace as T
from flowd.fsops import Durable

RUN_IDS = iter(f"abcdef{n:06d}" for n in range(1, 10 ** 6))


def f(t):
    x = t.read("a")
    if x == b"dir":
        t.write("out/1", b"f(dir).1")
        t.write("out/2", b"f(dir).2")
        return 0
    if x == b"bad":
        return 3
    t.write("out", b"f(" + x + b")")
    return 0


def entry_items(cache, key) -> list[str]:
    """The item files entry ``key`` lists (its entry.json), as paths."""
    folder = os.path.join(cache.entries, key)
    with open(os.path.join(folder, C.ENTRY), "rb") as fh:
        return [os.path.join(folder, "out", rel) for rel in C.listed_files(json.load(fh))]


def make_cache(root, max_size=None, **kw) -> C.Cache:
    os.makedirs(os.path.join(str(root), "cache"), exist_ok=True)
    cache = C.Cache(os.path.join(str(root), "cache"), Durable(), max_size, run_inline=True, **kw)
    cache.open()
    return cache


def workflow(items, **kw):
    w = wf(channels={"a": list(items), "out": []}, processes=[proc("p", "a", "out", **kw)])
    w.processes["p"].cache = True
    return w


def run_once(root, cache, w, scripts=None, images=None) -> Harness:
    h = Harness(os.path.join(str(root), "runs-" + str(len(os.listdir(str(root))))), w,
                scripts or {"p": f}, run_id=next(RUN_IDS))
    h.ex.images.update(images or {})
    h.run.cache = cache
    h.drain()
    return h


def hows(h) -> list[str]:
    return [r["started_how"] for r in T.read_all(h.path)]


def notes(h) -> list[dict]:
    with open(os.path.join(h.path, T.TRACE), "rb") as fh:
        return [json.loads(line).get("cache") for line in fh if line.strip()]


def test_a_second_identical_run_is_published_from_the_cache_without_a_container(tmp_path):
    cache = make_cache(tmp_path)
    w = workflow(["x1", "dir", "x2"])
    first = run_once(tmp_path, cache, w)
    assert first.run.state == "succeeded" and len(first.ex.started) == 3
    assert hows(first) == ["fresh"] * 3
    second = run_once(tmp_path, cache, w)
    assert second.run.state == "succeeded"
    assert second.ex.started == []  # no container at all
    assert second.items("out") == first.items("out") == [b"f(x1)", b"f(dir).1", b"f(dir).2", b"f(x2)"]
    assert hows(second) == ["cached"] * 3
    assert {n["from"]["run"] for n in notes(second)} == {first.run.id}
    assert second.leftovers() == []
    # the published items are the daemon's items: stamped, checked like any other
    folder = os.path.join(second.path, "channels", "out")
    assert all(checksum.check(os.path.join(folder, n)) is None for n in os.listdir(folder))


def test_an_identical_item_later_in_the_same_run_is_a_hit(tmp_path):
    cache = make_cache(tmp_path)
    h = run_once(tmp_path, cache, workflow(["x1", "x1", "x1"]))
    assert len(h.ex.started) == 1 and hows(h) == ["fresh", "cached", "cached"]
    assert h.items("out") == [b"f(x1)"] * 3


def test_each_key_part_that_changes_makes_a_miss_and_why_names_it(tmp_path):
    cache = make_cache(tmp_path)
    base = run_once(tmp_path, cache, workflow(["x1"]))
    assert len(base.ex.started) == 1
    pid = base.run.process_id("p")

    def miss(w, images=None, expect=""):
        h = run_once(tmp_path, cache, w, images=images)
        assert len(h.ex.started) == 1, f"{expect}: it should have run"
        note = notes(h)[-1]
        entry, diff = cache.nearest(pid, note["parts"], None, exclude=note["key"])
        assert entry is not None and any(expect in d for d in diff), (expect, diff)
        return diff

    assert miss(workflow(["x1"]), images={"flowd/busybox": "2"}, expect="image `flowd/busybox` now has id")
    assert miss(workflow(["x1"], script="echo edited"), expect="the script differs")
    assert miss(workflow(["x1"], env={"MODE": "fast"}), expect="env `MODE` is new")
    assert miss(workflow(["x1"], env={"MODE": "slow"}), expect="env `MODE` has another value")
    diff = miss(workflow(["x9"]), expect="input `a` differs (sha256")
    assert diff == [d for d in diff if d.startswith("input `a` differs")]  # only that part
    w = workflow(["x1"])
    w.processes["p"].lang = "python"
    assert miss(w, expect="lang is `python`")


def test_secret_env_values_are_never_written_to_the_cache(tmp_path):
    cache = make_cache(tmp_path)
    run_once(tmp_path, cache, workflow(["x1"], env={"TOKEN": "s3cret-value"}))
    for dirpath, _, files in os.walk(cache.root):
        for n in files:
            with open(os.path.join(dirpath, n), "rb") as fh:
                assert b"s3cret-value" not in fh.read()


def test_a_failed_task_is_never_cached(tmp_path):
    cache = make_cache(tmp_path)
    first = run_once(tmp_path, cache, workflow(["bad", "x1"], on_failure="continue"))
    assert len(first.ex.started) == 2 and len(cache.index) == 1
    second = run_once(tmp_path, cache, workflow(["bad", "x1"], on_failure="continue"))
    assert [s.task_id for s in second.ex.started] == ["1"]  # the failed one runs again
    assert hows(second).count("cached") == 1


def test_a_cancelled_run_stores_nothing_and_a_lookup_under_way_starts_no_container(tmp_path):
    events: list = []
    os.makedirs(tmp_path / "cache")
    cache = C.Cache(str(tmp_path / "cache"), Durable(), None, report=events.append, run_inline=True)
    cache.open()
    h = Harness(tmp_path / "r", workflow(["x1", "x2"]), {"p": f})
    h.run.cache = cache
    h.run.tick(8)  # the lookup's answer waits in the loop's queue
    assert events and h.ex.started == []
    h.run.cancel()
    for answer in [e for e in events if callable(e)]:
        answer()
    assert h.ex.started == [] and h.run.state == "cancelled"
    assert h.items("a") == [b"x1", b"x2"] and len(cache.index) == 0  # its input went back
    assert h.leftovers() == []


def test_least_recently_used_entries_are_evicted_to_fit_cache_max_size(tmp_path):
    cache = make_cache(tmp_path, max_size=12)  # each entry is 5 bytes: two fit
    run_once(tmp_path, cache, workflow(["x1"]))
    run_once(tmp_path, cache, workflow(["x2"]))
    assert len(cache.index) == 2
    again = run_once(tmp_path, cache, workflow(["x1"]))  # x1 is now the most recently used
    assert again.ex.started == []
    run_once(tmp_path, cache, workflow(["x3"]))  # x2, least recently used, goes
    assert len(cache.index) == 2 and cache.size() <= 12
    assert run_once(tmp_path, cache, workflow(["x1"])).ex.started == []
    assert len(run_once(tmp_path, cache, workflow(["x2"])).ex.started) == 1
    # the index survives a restart, last uses included (entry.json's mtime)
    reopened = make_cache(tmp_path, max_size=12)
    assert set(reopened.index) == set(cache.index)


def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path):
    cache = make_cache(tmp_path)
    run_once(tmp_path, cache, workflow(["x1"]))
    (key,) = cache.index
    item = entry_items(cache, key)[0]
    with open(item, "r+b") as fh:  # a flipped byte: the run's item (same inode) too
        fh.write(b"F")
    h = run_once(tmp_path, cache, workflow(["x1"]))
    assert len(h.ex.started) == 1 and h.items("out") == [b"f(x1)"]
    assert "damaged" in notes(h)[0]["why"]
    assert run_once(tmp_path, cache, workflow(["x1"])).ex.started == []  # stored again, whole


def test_an_entry_whose_files_went_by_hand_runs_the_task(tmp_path):
    cache = make_cache(tmp_path)
    run_once(tmp_path, cache, workflow(["dir"]))
    (key,) = cache.index
    files = entry_items(cache, key)
    h = Harness(tmp_path / "r", workflow(["dir"]), {"p": f})
    h.run.cache = cache
    real = cache.publish

    def publish_after_removal(*a, **kw):
        os.unlink(files[-1])  # between the lookup and the publish
        return real(*a, **kw)

    cache.publish = publish_after_removal
    h.drain()
    assert len(h.ex.started) == 1 and h.items("out") == [b"f(dir).1", b"f(dir).2"]


def test_deleting_a_run_never_breaks_an_entry_and_emptying_the_cache_never_touches_a_run(tmp_path):
    from flowd import removal

    cache = make_cache(tmp_path)
    first = run_once(tmp_path, cache, workflow(["x1", "dir"]))
    removal.remove_run_dir(Durable(), os.path.dirname(first.path), first.run.id)
    assert not os.path.exists(first.path)
    second = run_once(tmp_path, cache, workflow(["x1", "dir"]))
    assert second.ex.started == [] and second.items("out") == [b"f(x1)", b"f(dir).1", b"f(dir).2"]
    assert len(cache.remove_where()) == 2 and os.listdir(cache.entries) == []
    assert second.items("out") == [b"f(x1)", b"f(dir).1", b"f(dir).2"]


def test_a_restarted_daemon_finds_its_entries_and_drops_a_half_built_one(tmp_path):
    cache = make_cache(tmp_path)
    run_once(tmp_path, cache, workflow(["x1"]))
    os.mkdir(os.path.join(cache.root, C.NEW + "0" * 64))
    reopened = make_cache(tmp_path)
    assert not any(n.startswith(".") for n in os.listdir(reopened.root))
    assert run_once(tmp_path, reopened, workflow(["x1"])).ex.started == []


def test_an_items_content_hash_is_computed_once_and_kept_in_its_stamp(tmp_path, monkeypatch):
    import hashlib

    path = str(tmp_path / "item")
    with open(path, "wb") as fh:
        fh.write(b"hello")
    checksum.stamp_file(path)
    stamp = os.getxattr(path, checksum.XATTR).decode()
    assert stamp.count(":") == 1  # no hash until a cache key needs it
    want = hashlib.sha256(b"hello").hexdigest()
    assert checksum.content_hash(path) == want
    assert os.getxattr(path, checksum.XATTR).decode() == stamp + ":" + want
    assert checksum.check(path) is None
    reads = []
    real = checksum.of_file
    monkeypatch.setattr(checksum, "of_file", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    assert checksum.content_hash(path) == want and reads == []  # read once, kept
    monkeypatch.undo()
    with open(path, "r+b") as fh:  # damaged after its stamp: hashed as it is, never stamped
        fh.write(b"J")
    os.setxattr(path, checksum.XATTR, stamp.encode())
    assert checksum.content_hash(path) == hashlib.sha256(b"Jello").hexdigest()
    assert os.getxattr(path, checksum.XATTR).decode() == stamp


def test_the_key_covers_what_decides_the_outputs_and_nothing_else():
    p = proc("p", "a", "out", env={"K": "v"})
    parts = C.key_parts(p, "sha256:1", ["h1"])
    key = C.key_of(parts)
    assert key == C.key_of(C.key_parts(proc("p", "a", "out", env={"K": "v"}), "sha256:1", ["h1"]))
    assert C.key_of(C.key_parts(proc("q", "a", "out", env={"K": "v"}), "sha256:1", ["h1"])) == key, \
        "the process's name is not in the key"
    for other in (C.key_parts(p, "sha256:2", ["h1"]), C.key_parts(p, "sha256:1", ["h2"]),
                  C.key_parts(proc("p", "a", "out", env={"K": "w"}), "sha256:1", ["h1"]),
                  C.key_parts(proc("p", "a", "o2", env={"K": "v"}), "sha256:1", ["h1"])):
        assert C.key_of(other) != key
