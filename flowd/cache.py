"""The content cache: ``process@cache="yes"`` never computes the same thing twice.

A task's *key* is a SHA-256 over what decides its outputs (``key_parts``,
docs/format.md "cache"): the image by its id (not its tag), ``lang``, the
script's bytes, the process's ``<env>``, each input's ``as`` name, ``value``
flag and content hash (the item's SHA-256, computed off the loop the first
time a key needs it and then kept in the item's checksum stamp:
``checksum.content_hash``, so an item is read for it once), and each
output's ``as``, ``from`` and ``split``.

On disk, ``SPOOL/cache/``:

- ``entries/KEY/`` one entry: ``entry.json`` (its key parts, the run and task
  it came from, its size) and ``out/J`` (output J's item) or ``out/J/NAME``
  (output J's items, a folder or a split), each a *hard link* to the item the
  task produced. An entry holds its own link: deleting a run never breaks an
  entry, and evicting an entry never touches a run's items.
- ``.new-KEY/`` an entry being stored: built whole, then renamed to
  ``entries/KEY``. A crash leaves a ``.new-`` folder, removed at the next
  start, or the entry.

An entry is a hint, checked whenever it is used, so storing one costs no
fsync: its items are the run's items, durable already, and a power loss can
only take away what was not flushed (the entry's name, its record, some of
its links). A lookup reads the record and checks every item it lists
against its checksum; a publish links exactly the listed items, after
checking each is there. An entry short of anything is a miss (the task
runs, and the entry is replaced), never half a hit. The hit itself is
durable like any task's outputs: ``publish`` fsyncs ``out/``, then COMMIT.

The daemon's loop owns every change: ``store_many`` (after a task commits,
before its outputs are applied into their channels), ``publish`` (a hit: the
entry's items are linked into the task's ``out/`` as its outputs, then the
task commits like one that ran) and eviction (``cache_max_size``: least
recently used first; the last use is the entry.json's mtime, kept across
restarts). Lookups (``lookup``) run on the cache's threads: they ask the
executor for the image's id, read the inputs' stamps, and check the entry's
items against their checksums (a damaged entry is a miss, and is removed);
the answer goes back to the loop (``Answer``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from . import checksum
from .fsops import Durable
from .offloop import OffLoop
from .textsafe import for_log

log = logging.getLogger("flowd.cache")

KEY_VERSION = 1  # part of every key: a change of what a key covers makes new keys
ENTRY = "entry.json"
NEW = ".new-"
LOOKUP_THREADS = 2
MAX_ENTRY_ITEMS = 100_000  # items a task's outputs may be to be kept (its entry lists each)
WHY_CANDIDATES = 1000  # entries of a process compared by `why` at most (the newest)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key_parts(proc, image_id: str, input_hashes: list[str]) -> dict:
    """What decides a task's outputs (the key hashes this, canonical JSON)."""
    return {
        "v": KEY_VERSION,
        "image_id": image_id,
        "lang": proc.lang,
        "script": sha256_text(proc.script),
        # names and the hashes of their values: a secret in <env> is never written here
        "env": {k: sha256_text(v) for k, v in sorted(proc.env.items())},
        "inputs": [{"as": p.as_name, "value": bool(p.value), "sha256": h}
                   for p, h in zip(proc.inputs, input_hashes)],
        "outputs": [{"as": p.as_name, "from": p.source, "split": p.split} for p in proc.outputs],
    }


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def differences(now: dict, before: dict, image: str, image_before: str = "") -> list[str]:
    """The parts of key ``now`` that differ from ``before``, in words (``flowctl why``);
    ``image``: the image the process names now, ``image_before``: the one it named then."""
    out: list[str] = []
    if now.get("v") != before.get("v"):
        out.append("the cache's key format changed (flowd was upgraded)")
    if now.get("image_id") != before.get("image_id"):
        if image_before and image_before != image:
            out.append(f"the image is `{image}` (id {now.get('image_id')}); it was `{image_before}` "
                       f"(id {before.get('image_id')})")
        else:
            out.append(f"image `{image}` now has id {now.get('image_id')} "
                       f"(it was {before.get('image_id')}: rebuilt or retagged)")
    if now.get("lang") != before.get("lang"):
        out.append(f"lang is `{now.get('lang')}` (it was `{before.get('lang')}`)")
    if now.get("script") != before.get("script"):
        out.append(f"the script differs (sha256 {_short(now.get('script'))}, "
                   f"it was {_short(before.get('script'))})")
    env_now, env_before = now.get("env") or {}, before.get("env") or {}
    for name in sorted(set(env_now) | set(env_before)):
        if name not in env_before:
            out.append(f"env `{name}` is new")
        elif name not in env_now:
            out.append(f"env `{name}` is no longer set")
        elif env_now[name] != env_before[name]:
            out.append(f"env `{name}` has another value")
    ins_now, ins_before = now.get("inputs") or [], before.get("inputs") or []
    by_name = {i.get("as"): i for i in ins_before if isinstance(i, dict)}
    for i in ins_now:
        old = by_name.pop(i.get("as"), None)
        if old is None:
            out.append(f"input `{i.get('as')}` is new")
        elif old.get("sha256") != i.get("sha256"):
            out.append(f"input `{i.get('as')}` differs (sha256 {_short(i.get('sha256'))}, "
                       f"it was {_short(old.get('sha256'))})")
        elif old.get("value") != i.get("value"):
            out.append(f"input `{i.get('as')}` value= changed")
    for name in by_name:
        out.append(f"input `{name}` is gone")
    if now.get("outputs") != before.get("outputs"):
        out.append("the outputs differ (their names, from= or split=)")
    return out


def _short(h) -> str:
    return f"{h[:12]}…" if isinstance(h, str) else "none"


@dataclass
class Answer:
    """A lookup's result, handed to the run on the loop."""

    key: str | None  # None: no key could be made (``why`` says why)
    parts: dict | None = None
    entry: dict | None = None  # a hit: the entry's entry.json
    why: str = ""  # a key that could not be made, or an entry that was damaged


@dataclass
class Entry:
    key: str
    process: str  # "WORKFLOW/PROCESS": the process across runs
    size: int
    used: float  # last use (mtime of entry.json)
    created: float
    run: str = ""
    task: str = ""
    owner: int | None = None  # the uid whose run stored it (flowctl cache rm by a non-admin)

    @classmethod
    def of(cls, key: str, d: dict, used: float) -> "Entry":
        """The index's record of the entry whose entry.json is ``d``."""
        owner = d.get("owner")
        return cls(key=key, process=str(d["process"]), size=int(d["size"]), used=used,
                   created=float(d["created"]), run=str(d.get("run", "")), task=str(d.get("task", "")),
                   owner=owner if isinstance(owner, int) and not isinstance(owner, bool) else None)


@dataclass
class Cache:
    """``SPOOL/cache``: entries, their index (in memory), lookups and bounds."""

    root: str
    fs: Durable
    max_size: int | None = None  # bytes (config cache_max_size); None: no bound
    report: Callable[[object], None] | None = None  # hands an answer to the loop
    run_inline: bool = False  # lookups on the caller's thread (deterministic: the crash sweep, tests)
    index: dict[str, Entry] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    stored: int = 0
    evicted: int = 0

    def __post_init__(self) -> None:
        self.entries = os.path.join(self.root, "entries")
        self._worker = OffLoop(LOOKUP_THREADS, "flowd-cache", self.report, self.run_inline)

    # -- start-up -------------------------------------------------------------
    def open(self) -> None:
        """Make the folders, remove what a crash left half-built, load the index."""
        for d in (self.root, self.entries):
            # plain, as the daemon makes its spool folders: no durability point (a
            # folder lost in a power loss is an empty cache, made again at start)
            os.makedirs(d, mode=0o700, exist_ok=True)
        for name in os.listdir(self.root):
            if name.startswith("."):
                self.fs.rmtree(os.path.join(self.root, name))
        self.index = {}
        for key in os.listdir(self.entries):
            entry = self._load(key)
            if entry is None:
                log.warning("cache entry %s is unreadable; removed", for_log(key))
                self.fs.rmtree(os.path.join(self.entries, key))
            else:
                self.index[key] = entry
        self.evict()

    def _load(self, key: str) -> Entry | None:
        path = os.path.join(self.entries, key, ENTRY)
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                d = json.loads(f.read(1 << 20))
            return Entry.of(key, d, used=st.st_mtime)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def close(self) -> None:
        self._worker.close()

    # -- lookups (their threads) ---------------------------------------------------
    def lookup(self, executor, proc, input_paths: list[str],
               answer: Callable[[Answer], None]) -> None:
        """Work out the task's key and whether an entry has it, off the loop;
        then hand ``answer(Answer)`` to the loop (``report``) or, inline, call it."""
        def answered(got: object) -> None:
            if isinstance(got, Exception):  # whatever went wrong, the task gets an answer
                log.error("cache lookup failed: %s", for_log(got))
                got = Answer(None, why=f"the cache lookup failed ({for_log(got)})")
            answer(got)

        self._worker.submit(lambda: self._lookup(executor, proc, input_paths), answered)

    def _lookup(self, executor, proc, input_paths: list[str]) -> Answer:
        try:
            image_id = executor.image_id(proc.image)
        except Exception as e:  # noqa: BLE001 - the engine's words become the reason
            return Answer(None, why=f"the id of image `{proc.image}` could not be read ({for_log(e)})")
        if not image_id:
            return Answer(None, why=f"the id of image `{proc.image}` is not known here "
                                    "(the executor cannot tell it)")
        try:
            hashes = [checksum.content_hash(p) for p in input_paths]
        except OSError as e:
            return Answer(None, why=f"an input could not be read ({for_log(e.strerror or e)})")
        parts = key_parts(proc, image_id, hashes)
        key = key_of(parts)
        entry, why = self._read_entry(key)
        return Answer(key, parts, entry, why)

    def _read_entry(self, key: str) -> tuple[dict | None, str]:
        """The entry of ``key`` if it is whole and every item matches its checksum."""
        folder = os.path.join(self.entries, key)
        try:
            with open(os.path.join(folder, ENTRY), "rb") as f:
                entry = json.loads(f.read(1 << 20))
            listed = listed_files(entry)
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError, AttributeError) as e:
            return None, f"the cache entry {key[:12]} is unreadable ({for_log(e)})"
        for rel in listed:
            bad = checksum.check(os.path.join(folder, "out", rel))
            if bad is not None:
                return None, f"the cache entry {key[:12]} is damaged: out/{rel} {bad}"
        return entry, ""

    # -- the loop's side ------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.index

    def touch(self, key: str) -> None:
        """A hit: the entry is the most recently used (kept in its mtime, no fsync)."""
        entry = self.index.get(key)
        if entry is None:
            return
        entry.used = time.time()
        try:
            os.utime(os.path.join(self.entries, key, ENTRY))
        except OSError:
            pass

    def publish(self, key: str, outdir: str, attempt: int) -> None:
        """Link entry ``key``'s items into a task's ``out/`` as attempt
        ``attempt``'s outputs: ``out/A.J`` (a file, or a folder built as
        ``out/.A.J.tmp`` and renamed whole), as a collect makes them; then
        out/ is fsynced. Idempotent: what is there already is kept. Exactly the
        items its entry.json lists, each checked to be there first: raises
        FileNotFoundError when one is gone (nothing is linked; the caller runs
        the task)."""
        folder = os.path.join(self.entries, key)
        with open(os.path.join(folder, ENTRY), "rb") as f:
            listed = listed_files(json.loads(f.read(1 << 20)))
        src = os.path.join(folder, "out")
        for rel in listed:
            if not os.path.isfile(os.path.join(src, rel)):
                raise FileNotFoundError(f"cache entry {key[:12]} has lost its item out/{rel}")
        outputs: dict[str, list[str]] = {}
        for rel in listed:
            j, _, n = rel.partition("/")
            outputs.setdefault(j, []).append(n)
        fs = self.fs
        for j, names in outputs.items():
            dst = os.path.join(outdir, f"{attempt}.{j}")
            if os.path.lexists(dst):
                continue
            if names != [""]:  # a folder of items
                tmp = os.path.join(outdir, f".{attempt}.{j}.tmp")
                fs.rmtree(tmp)
                fs.mkdir(tmp, sync_parent=False)
                for n in names:
                    fs.link(os.path.join(src, j, n), os.path.join(tmp, n))
                fs.fsync_dir(tmp)
                fs.rename(tmp, dst, sync=False)
            else:
                fs.link(os.path.join(src, j), dst)
        fs.fsync_dir(outdir)
        self.hits += 1
        self.touch(key)

    def store_many(self, stores: list[tuple[str, dict, dict, str, int, int]]) -> None:
        """Keep the outputs of tasks that succeeded: (key, parts, meta, out/
        folder, attempt, outputs). Each entry is built as ``.new-KEY`` and
        renamed into ``entries/``; no fsync (see the module's docstring). A
        key already kept is left as it is; outputs bigger than the whole cache
        are not kept."""
        fs = self.fs
        built: dict[str, tuple[str, dict]] = {}
        for key, parts, meta, outdir, attempt, n_outputs in stores:
            if key in self.index or key in built:
                continue
            items = _task_outputs(outdir, attempt, n_outputs)  # [(rel under out/, path, size)]
            size = sum(n for _, _, n in items)
            if self.max_size is not None and size > self.max_size:
                log.info("cache: the outputs of %s task %s are bigger than cache_max_size (%d bytes); "
                         "not kept", for_log(meta.get("process", "?")), for_log(meta.get("task", "?")),
                         self.max_size)
                continue
            tmp = os.path.join(self.root, NEW + key)
            fs.rmtree(tmp)
            fs.mkdir(tmp, mode=0o700, sync_parent=False)
            out = os.path.join(tmp, "out")
            fs.mkdir(out, mode=0o700, sync_parent=False)
            for rel, src, _ in items:
                if "/" in rel and not os.path.isdir(os.path.join(out, rel.split("/")[0])):
                    fs.mkdir(os.path.join(out, rel.split("/")[0]), mode=0o700, sync_parent=False)
                fs.link(src, os.path.join(out, rel))
            entry = dict(meta, key=key, parts=parts, size=size, created=time.time(),
                         outputs=n_outputs, files=[rel for rel, _, _ in items])
            fs.write_file(os.path.join(tmp, ENTRY), json.dumps(entry).encode(), mode=0o600,
                          sync=False)
            built[key] = (tmp, entry)
        for key, (tmp, entry) in built.items():
            fs.rename(tmp, os.path.join(self.entries, key), sync=False)
            self.index[key] = Entry.of(key, entry, used=entry["created"])
            self.stored += 1
        self.evict()

    # -- bounds and control ------------------------------------------------------
    def size(self) -> int:
        return sum(e.size for e in self.index.values())

    def evict(self) -> list[Entry]:
        """Least recently used entries out until the cache fits ``max_size``."""
        if self.max_size is None:
            return []
        total = self.size()
        gone: list[Entry] = []
        for entry in sorted(self.index.values(), key=lambda e: (e.used, e.created)):
            if total <= self.max_size:
                break
            del self.index[entry.key]
            self.fs.rmtree(os.path.join(self.entries, entry.key))
            total -= entry.size
            gone.append(entry)
        if gone:
            self.evicted += len(gone)
            log.info("cache: %d entries evicted (least recently used first) to keep within "
                     "cache_max_size %d bytes", len(gone), self.max_size)
        return gone

    def remove(self, key: str) -> None:
        """Take an entry out (no fsync: one that a power loss brings back, whole
        or in part, is checked when used, like any)."""
        self.index.pop(key, None)
        self.fs.rmtree(os.path.join(self.entries, key))

    def remove_where(self, process: str | None = None, owner: int | None = None) -> list[Entry]:
        """``flowctl cache rm``: every entry, or those of one process (``WORKFLOW/PROCESS``
        or a bare process name, matching any workflow's); with ``owner``, only
        those that uid's runs stored."""
        gone = [e for e in self.index.values() if (process is None or _matches(e.process, process))
                and (owner is None or e.owner == owner)]
        for e in gone:
            self.index.pop(e.key, None)
            self.fs.rmtree(os.path.join(self.entries, e.key))
        return gone

    def listing(self) -> list[dict]:
        """``flowctl cache ls``: a row per process."""
        rows: dict[str, dict] = {}
        for e in self.index.values():
            r = rows.setdefault(e.process, {"process": e.process, "entries": 0, "size": 0,
                                            "last_used": 0.0})
            r["entries"] += 1
            r["size"] += e.size
            r["last_used"] = max(r["last_used"], e.used)
        return sorted(rows.values(), key=lambda r: r["process"])

    def nearest(self, process: str, parts: dict, before: float | None,
                exclude: str | None = None, image: str = "") -> tuple[dict | None, list[str]]:
        """The entry of ``process`` made before ``before`` whose key differs from
        ``parts`` in the fewest parts (the newest among equals), and those parts
        (``image``: the image the process names now)."""
        cands = sorted((e for e in self.index.values() if e.process == process and e.key != exclude
                        and (before is None or e.created <= before)),
                       key=lambda e: e.created, reverse=True)[:WHY_CANDIDATES]
        best: tuple[int, dict, list[str]] | None = None
        for e in cands:
            try:
                with open(os.path.join(self.entries, e.key, ENTRY), "rb") as f:
                    d = json.loads(f.read(1 << 20))
            except (OSError, ValueError):
                continue
            then = str(d.get("image") or "")
            diff = differences(parts, d.get("parts") or {}, image or then, then)
            if best is None or len(diff) < best[0]:
                best = (len(diff), d, diff)
        return (best[1], best[2]) if best else (None, [])

    def stats(self) -> dict:
        return {"entries": len(self.index), "size": self.size(), "max_size": self.max_size,
                "hits": self.hits, "misses": self.misses, "stored": self.stored,
                "evicted": self.evicted}


def listed_files(entry: dict) -> list[str]:
    """The items an entry.json lists (``J`` or ``J/NAME`` under its out/), checked:
    a name that could leave the folder makes the entry unreadable (ValueError)."""
    files = entry.get("files")
    if not isinstance(files, list):
        raise ValueError("its record lists no items")
    for rel in files:
        if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/") \
                or rel.count("/") > 1:
            raise ValueError(f"its record lists an item out/{rel!r}")
    return files


def _task_outputs(outdir: str, attempt: int, n_outputs: int) -> list[tuple[str, str, int]]:
    """A task's outputs in its out/ as an entry keeps them: (``J`` or ``J/NAME``,
    the item's path, its size), output by output, a folder's items by name."""
    items: list[tuple[str, str, int]] = []
    for j in range(n_outputs):
        item = os.path.join(outdir, f"{attempt}.{j}")
        if os.path.isdir(item):
            for n in sorted(os.listdir(item)):
                path = os.path.join(item, n)
                items.append((f"{j}/{n}", path, os.lstat(path).st_size))
        elif os.path.lexists(item):
            items.append((str(j), item, os.lstat(item).st_size))
    return items


def _matches(process_id: str, wanted: str) -> bool:
    return process_id == wanted or process_id.rsplit("/", 1)[-1] == wanted
