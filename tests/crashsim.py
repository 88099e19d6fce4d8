"""In-process crash simulation for flowd's spool (used by tests/test_crash.py).

Three pieces:

- ``Sim``: one spool on disk driven by successive daemon *lives*. Each life
  makes a new ``Durable`` (``crash_mode="raise"``), a new executor and opens
  the run again, exactly as a restarted daemon does (``Daemon.serve``: drop
  ``.new-*`` runs, ``Run.open``, ``resume``, ``sweep``, then ticks). Nothing
  in memory survives a crash except the container engine (``World``).
- ``SimExecutor``/``World``: the fake executor with containers that outlive
  the daemon the way Docker's do: a container that exited keeps its result
  (adopting it reports that result, the script does not run again); one still
  running finishes after the restart; removal is explicit.
- ``DiskModel``: the lost-writes simulator. It is told of every fsync
  (``Durable.observer``) and records what each one made durable: a folder's
  entries (name -> inode) at its fsync, a file's bytes at its fsync. At a
  "power loss" it rebuilds the tree as the disk could hold it: every folder
  has its fsynced entries plus a chosen subset of the changes made since
  (none in ``drop`` mode; a random subset for a seed), every file its fsynced
  bytes (empty if never fsynced) or, for a seed, maybe its newer ones. Two
  rules keep the subsets to what a journaling filesystem (ext4, XFS) can
  show: a folder is never in two places or none (a folder rename is atomic),
  and a renamed file never loses its old name before it has the new one (it
  may land in the new folder before it leaves the old one, so both names may
  survive, but never neither; an item a mux linked into several channels
  has several names, so names are counted, not inodes).

``python3 tests/crashsim.py`` runs every sweep and prints the figures for
docs/reliability.md (``--mutation`` adds the full fsync mutation check).
"""
from __future__ import annotations

import collections
import json
import os
import random
import shutil
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from helpers import proc, wf  # noqa: E402

from flowd import scheduler as E  # noqa: E402
from flowd import fsops, reaper, removal  # noqa: E402
from flowd.executor import base as X  # noqa: E402
from flowd.executor.fake import FakeExecutor, FakeTask  # noqa: E402
from flowd.fsops import Durable, SimulatedCrash  # noqa: E402
from flowd.model import InitialItem, Workflow  # noqa: E402
from flowd import run as R  # noqa: E402
from flowd.run import Run  # noqa: E402
from flowd.taskspec import Limits  # noqa: E402

RUN_ID = "c0ffee000001"
CAPACITY = 8


# -- the container engine, which outlives the daemon ---------------------------
@dataclass
class Container:
    spec: X.TaskSpec
    result: X.TaskResult | None = None  # set once it exited
    rounds: int = 0  # run_pending rounds it still runs before its script is run


@dataclass
class World:
    containers: dict[str, Container] = field(default_factory=dict)
    executions: int = 0  # how many times a script ran (may exceed the task count)
    lost: set = field(default_factory=set)  # flow "lost": the tasks whose container was lost once
    fixed: bool = False  # flow "retry": the user fixed the script (before retrying)


class SimExecutor(FakeExecutor):
    def __init__(self, report: X.Report, scripts, world: World, wf: Workflow,
                 slow: dict[str, int] | None = None):
        super().__init__(report, scripts)
        self.world = world
        self.wf = wf
        self.slow = slow or {}  # process -> rounds its containers run before they exit

    def start(self, spec: X.TaskSpec) -> None:
        self.started.append(spec)
        self.world.containers.pop(spec.key, None)  # an old attempt's goes
        sources = [spec.workdir, spec.script_path] + [m.source for m in spec.inputs]
        missing = [p for p in sources if not os.path.exists(p)]
        if missing or not os.path.isdir(spec.workdir):  # Docker's bind mounts refuse it
            self.report(X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.ERROR,
                                     message=f"could not start the container: no {missing}"))
            return
        self.world.containers[spec.key] = Container(
            spec, rounds=self.slow.get(spec.process, 0))
        self.pending.append(spec)

    def adopt(self, spec: X.TaskSpec) -> None:
        self.adopted.append(spec)
        c = self.world.containers.get(spec.key)
        if spec.container == "warm" or c is None or c.spec.attempt != spec.attempt:
            # As the Docker executor: a warm task is never taken back after a
            # restart (its container is swept; it may still be running now).
            self.world.containers.pop(spec.key, None)
            self.report(X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.MISSING))
        elif c.result is not None:
            self.report(c.result)  # it exited while the daemon was down
        else:
            self.pending.append(spec)  # still running: it finishes later

    def kill(self, run_id: str, task_id: str) -> None:
        self.killed.append((run_id, task_id))
        for spec in list(self.pending):
            if spec.key == (run_id, task_id):
                self.pending.remove(spec)
                res = X.TaskResult(run_id, task_id, spec.attempt, X.KILLED, message="killed")
                c = self.world.containers.get(spec.key)
                if c is not None:
                    c.result = res
                self.report(res)

    def remove(self, spec: X.TaskSpec) -> None:
        self.removed.append(spec.key)
        self.world.containers.pop(spec.key, None)

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> None:
        for name, c in list(self.world.containers.items()):
            if c.spec.key not in keep:
                del self.world.containers[name]

    def run_pending(self, limit: int | None = None) -> int:
        n = 0
        later = []  # slow containers: still running after this round
        while self.pending and (limit is None or n < limit):
            spec = self.pending.pop(0)
            c = self.world.containers.get(spec.key)
            if c is None or c.spec.attempt != spec.attempt:
                continue  # removed meanwhile
            if c.result is None and c.rounds > 0:
                c.rounds -= 1
                later.append(spec)
                continue
            if c.result is None:
                fn = self.scripts.get(spec.process, lambda t: 0)
                self.world.executions += 1
                try:
                    with open(spec.script_path, "rb") as f:
                        text = f.read().decode()
                except OSError:
                    text = None
                if text != self.wf.processes[spec.process].script:
                    outcome = 126  # the container ran a missing or damaged script
                else:
                    task = FakeTask(spec)
                    task.world = self.world  # what a script may remember across the sim's lives
                    outcome = fn(task)
                if isinstance(outcome, str):
                    c.result = X.TaskResult(spec.run_id, spec.task_id, spec.attempt, outcome,
                                            message=outcome)
                else:
                    c.result = X.TaskResult(spec.run_id, spec.task_id, spec.attempt, X.EXITED,
                                            exit_code=outcome, message=f"exit status {outcome}")
            self.report(c.result)
            n += 1
        self.pending += later
        return n


# -- the lost-writes simulator -------------------------------------------------
class SiteRecorder:
    """An observer that only notes which fsync sites ran (the kill -9 sweeps)."""

    def __init__(self):
        self.sites: set[str] = set()

    def renamed(self, src: str, dst: str) -> None:
        pass

    def synced_dir(self, path: str, site: str) -> None:
        self.sites.add(site)

    synced_file = synced_dir

    def synced_all(self, path: str, site: str | None = None) -> None:
        if site is not None:  # Durable.sync_fs (a site); sync_all at start has none
            self.sites.add(site)


class DiskModel:
    """What a power loss could leave on disk (see the module docstring)."""

    def __init__(self, root: str):
        self.root = root
        self.fds: dict[int, int] = {}  # inode -> open fd: keeps the inode (and its number) alive
        self.kind: dict[int, str] = {}  # inode -> "d" or "f"
        self.mode: dict[int, int] = {}
        self.dirs: dict[int, dict[str, int]] = {}  # folder inode -> its durable entries
        self.data: dict[int, bytes] = {}  # file inode -> its durable bytes
        self.moves: dict[tuple, set] = {}  # (inode, (folder, name)) -> {(folder, name)} renamed to
        self.sites: collections.Counter = collections.Counter()
        self.site_points: dict[str, list[int]] = {}  # site -> the points where it ran
        self.clock = None  # the Durable of the life, for its point counter
        self.root_ino = 0
        self.baseline()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.kind.clear()
        self.mode.clear()
        self.dirs.clear()
        self.data.clear()
        self.moves.clear()

    def _keep(self, path: str, st: os.stat_result) -> int | None:
        ino = st.st_ino
        if ino not in self.fds:
            if stat.S_ISDIR(st.st_mode):
                fd, kind = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW), "d"
            elif stat.S_ISREG(st.st_mode):
                fd, kind = os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "f"
            else:
                return None  # links, FIFOs: not part of these workflows
            self.fds[ino] = fd
            self.kind[ino] = kind
        self.mode[ino] = stat.S_IMODE(st.st_mode)
        return ino

    def _read(self, ino: int) -> bytes:
        fd = self.fds[ino]
        return os.pread(fd, os.fstat(fd).st_size, 0)

    def _entries(self, path: str) -> dict[str, int]:
        out = {}
        for name in os.listdir(path):
            p = os.path.join(path, name)
            i = self._keep(p, os.lstat(p))
            if i is not None:
                out[name] = i
        return out

    def _walk(self) -> dict[int, dict[str, int]]:
        """The folders as they are now (the page cache), from the root."""
        cur: dict[int, dict[str, int]] = {}
        stack = [self.root]
        while stack:
            path = stack.pop()
            ino = self._keep(path, os.lstat(path))
            cur[ino] = ents = self._entries(path)
            for name, i in ents.items():
                if self.kind[i] == "d":
                    stack.append(os.path.join(path, name))
        return cur

    def baseline(self) -> None:
        """Everything on disk now is durable (the start, or after a reboot)."""
        self.close()
        self.root_ino = os.lstat(self.root).st_ino
        self.dirs = self._walk()
        for ino, kind in self.kind.items():
            if kind == "f":
                self.data[ino] = self._read(ino)

    # Durable's observer interface
    def renamed(self, src: str, dst: str) -> None:
        st = os.lstat(dst)
        ino = self._keep(dst, st)
        if ino is None or self.kind[ino] != "f":
            return
        sd = self._keep(os.path.dirname(src), os.lstat(os.path.dirname(src)))
        dd = self._keep(os.path.dirname(dst), os.lstat(os.path.dirname(dst)))
        self.moves.setdefault((ino, (sd, os.path.basename(src))), set()).add(
            (dd, os.path.basename(dst)))

    def _site(self, site: str) -> None:
        self.sites[site] += 1
        if self.clock is not None:
            self.site_points.setdefault(site, []).append(self.clock.points)

    def synced_dir(self, path: str, site: str) -> None:
        self._site(site)
        ino = self._keep(path, os.lstat(path))
        self.dirs[ino] = ents = self._entries(path)
        # A folder has one parent: once its new name is durable, its rename is,
        # so it leaves its old place too (files may keep both names: see crash).
        moved = {i for i in ents.values() if self.kind[i] == "d"}
        for d, other in self.dirs.items():
            if d != ino:
                for name in [n for n, i in other.items() if i in moved]:
                    del other[name]

    def synced_file(self, path: str, site: str) -> None:
        self._site(site)
        ino = self._keep(path, os.lstat(path))
        self.data[ino] = self._read(ino)

    def synced_all(self, path: str, site: str | None = None) -> None:
        """syncfs: all that is in the page cache now is durable (on the one
        filesystem the sweeps use). ``site``: Durable.sync_fs's, a point the
        mutation check can leave out; the start's sync_all has none."""
        if site is not None:
            self._site(site)
        self.baseline()

    # the power loss
    def crash(self, rng: random.Random | None = None) -> dict:
        """Rewrite the tree as a power loss could leave it; ``rng=None``: drop all unsynced."""
        cur = self._walk()
        changes = []  # (folder, name, old inode or None, new inode or None)
        for d in sorted(set(self.dirs) | set(cur)):
            old, new = self.dirs.get(d, {}), cur.get(d, {})
            for name in sorted(old.keys() | new.keys()):
                if old.get(name) != new.get(name):
                    changes.append((d, name, old.get(name), new.get(name)))
        kept = {c for c in changes if rng is not None and rng.random() < 0.5}
        by_name = {(d, name): c for c in changes for d, name in [c[:2]]}
        folders = collections.defaultdict(set)  # folder inode -> the changes that move it
        for c in changes:
            for i in c[2:]:
                if i is not None and self.kind[i] == "d":
                    folders[i].add(c)
        needs = {}  # a file's removal -> the additions of its new names (it was renamed)
        for c in changes:
            d, name, o, _ = c
            if o is None or self.kind[o] != "f":
                continue
            dests, todo, seen = set(), [(d, name)], set()
            while todo:  # follow the renames of this name, a -> b -> c
                key = todo.pop()
                for nxt in self.moves.get((o, key), ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
                        a = by_name.get(nxt)
                        if a is not None and a[3] == o:
                            dests.add(a)
            if dests:
                needs[c] = dests
        while True:
            undo = set()
            for group in folders.values():
                if group & kept and not group <= kept:
                    undo |= group & kept  # a folder moves whole or not at all
            for c, dests in needs.items():
                if c in kept and not dests & kept:
                    undo.add(c)  # a renamed file leaves its old name only once it has the new one
            if not undo:
                break
            kept -= undo
        result = self._apply(kept)
        contents = {}
        for ino, kind in self.kind.items():
            if kind != "f":
                continue
            durable = self.data.get(ino, b"")
            if rng is None:
                contents[ino] = durable
            else:
                now = self._read(ino)
                contents[ino] = now if now == durable else rng.choice([durable, now])
        self._materialize(result, contents)
        self.baseline()
        return {"changes": len(changes), "kept": len(kept)}

    def _apply(self, kept: set) -> dict[int, dict[str, int]]:
        result = {d: dict(e) for d, e in self.dirs.items()}
        for d, name, _, n in kept:
            ents = result.setdefault(d, {})
            if n is None:
                ents.pop(name, None)
            else:
                ents[name] = n
        return result

    def _materialize(self, result: dict[int, dict[str, int]], contents: dict[int, bytes]) -> None:
        new_root = self.root + ".crash"
        old_root = self.root + ".old"
        for p in (new_root, old_root):
            if os.path.exists(p):
                reaper.remove_tree(p)
        os.mkdir(new_root)
        made_files: dict[int, str] = {}
        made_dirs = {self.root_ino}
        modes = []

        def build(d: int, path: str) -> None:
            for name, i in sorted(result.get(d, {}).items()):
                p = os.path.join(path, name)
                if self.kind[i] == "d":
                    if i in made_dirs:
                        raise AssertionError(f"model error: folder inode {i} in two places ({p})")
                    made_dirs.add(i)
                    os.mkdir(p)
                    build(i, p)
                    modes.append((p, self.mode[i]))
                elif i in made_files:
                    os.link(made_files[i], p)
                else:
                    with open(p, "wb") as f:
                        f.write(contents[i])
                    os.chmod(p, self.mode[i])
                    made_files[i] = p

        build(self.root_ino, new_root)
        for p, m in modes:
            os.chmod(p, m)
        os.rename(self.root, old_root)
        os.rename(new_root, self.root)
        self.close()
        reaper.remove_tree(old_root)


# -- workflows and their oracle ------------------------------------------------
def _proc(name: str, inputs: str = "", outputs: str = "", **kw):
    """A process whose script file holds its own text: the fake container checks it."""
    return proc(name, inputs, outputs, script=f"# the script of {name}\nrun {name}\n", **kw)


def _f(name: str) -> Callable[[FakeTask], int]:
    """A deterministic one-input script: output = NAME(input)."""

    def script(t: FakeTask) -> int:
        port = t.spec.inputs[0].target.rsplit("/", 1)[1]
        t.write(t.spec.outputs[0], f"{name}(".encode() + t.read(port) + b")")
        return 0

    return script


def _join(t: FakeTask) -> int:
    t.write("pairs", t.read("a") + b"|" + t.read("b"))
    return 0


def _gen(t: FakeTask) -> int:
    t.write("a", b"gen")
    return 0


def _faulty(t: FakeTask) -> int:
    x = t.read("a")
    if x == b"bad" or (x == b"flaky" and t.attempt == 1):
        t.write("out", b"partial")  # must never be published
        return 3 if x == b"bad" else 1
    t.write("out", b"f(" + x + b")")
    return 0


@dataclass
class Flow:
    name: str
    wf: Workflow
    scripts: dict
    expected: dict[str, list[bytes]]  # channel -> its items at the end (the others: empty)
    ordered: set[str]  # channels whose order is part of the promise
    files: dict[str, bytes] = field(default_factory=dict)  # bundle files (file= items)
    failed: list[bytes] = field(default_factory=list)  # inputs kept as dead letters
    fired: set[str] = field(default_factory=set)  # source processes, done once
    state: str = E.SUCCEEDED
    client: Callable | None = None  # (sim, run) -> None, called after each tick
    slow: dict[str, int] = field(default_factory=dict)  # process -> rounds its containers run
    expect: Callable | None = None  # (seen items) -> (expected, problems), when it depends
    on_end: Callable | None = None  # (sim, run) -> True if the run goes on: the client, once it ended
    removed: bool = False  # the client deletes the run at the end (flow rm): it may be gone
    cache: bool = False  # the daemon's content cache is there (flow cache: SPOOL/cache)
    cache_max: int | None = None  # its cache_max_size (bytes)
    stamped: bool = False  # the bundle's files come as a taken upload's: items already (flow rm)
    worker: bool = False  # split collects go through the daemon's worker (flowd/offloop.py), inline
    apply_slice: int | None = None  # flowd.run.APPLY_SLICE for this flow (None: the daemon's)


DEFAULT_APPLY_SLICE = R.APPLY_SLICE


def _one(t: FakeTask) -> int:
    x = t.read("a")
    if x == b"x2":  # a folder output: one item per file, in name order
        t.write("out/1", b"f(x2).1")
        t.write("out/2", b"f(x2).2")
        return 0
    t.write("out", b"f(" + x + b")")
    return 0


def flow_one() -> Flow:
    """A 1-input process, parallel=1: the order is checked; one item comes from a file
    (put_file's hard link), one task writes a folder (two items)."""
    w = wf(channels={"a": ["x1", "x2"], "out": []}, processes=[_proc("p", "a", "out")])
    w.channels["a"].items.append(InitialItem(file="x3.txt"))
    return Flow("one", w, {"p": _one},
                {"out": [b"f(x1)", b"f(x2).1", b"f(x2).2", b"f(x3)"]}, {"out"},
                {"x3.txt": b"x3"})


def flow_join() -> Flow:
    """A 2-input join, parallel=2: the i-th items of a and b must meet."""
    n = 3
    w = wf(channels={"a": [f"a{i}" for i in range(n)], "b": [f"b{i}" for i in range(n)],
                     "pairs": []},
           processes=[_proc("j", "a b", "pairs", parallel=2)])
    return Flow("join", w, {"j": _join},
                {"pairs": [f"a{i}|b{i}".encode() for i in range(n)]}, set())


def flow_pipeline() -> Flow:
    """3 stages: f, a mux fan-out to g and h, a mux merge, then k (parallel=2)."""
    srcs = ["s1"]
    w = wf(channels={"src": srcs, "m1": [], "l": [], "r": [], "l2": [], "r2": [], "merged": [],
                     "out": []},
           processes=[_proc("f", "src", "m1"), _proc("g", "l", "l2"), _proc("h", "r", "r2"),
                      _proc("k", "merged", "out", parallel=2)],
           muxes=[("m1", "l r"), ("l2 r2", "merged")])
    want = []
    for s in srcs:
        want += [f"k(g(f({s})))".encode(), f"k(h(f({s})))".encode()]
    return Flow("pipeline", w, {"f": _f("f"), "g": _f("g"), "h": _f("h"), "k": _f("k")},
                {"out": want}, set())


def flow_faults() -> Flow:
    """Retries, a dead letter (on-failure=continue) and a source process."""
    w = wf(channels={"a": ["ok1", "flaky", "bad", "ok2"], "out": []},
           processes=[_proc("gen", "", "a"),
                      _proc("p", "a", "out", retries=1, on_failure="continue")])
    return Flow("faults", w, {"gen": _gen, "p": _faulty},
                {"out": [b"f(ok1)", b"f(flaky)", b"f(ok2)", b"f(gen)"]}, {"out"},
                failed=[b"bad"], fired={"gen"})


def _cancel_client(sim: "Sim", run: Run) -> None:
    """The user cancels once two outputs are out and the third task runs its second
    attempt; after a crash the user asks again until the daemon has answered."""
    if sim.cancel_acked:
        return
    if run.finished or run.meta.get("cancel_requested"):
        sim.cancel_acked = True  # taken before the crash; asking again changes nothing
    elif len(run.sched.queues["out"]) >= 2 and any(
            a.rec.attempt >= 2 and a.spec is not None for a in run.active.values()):
        run.cancel()
        sim.cancel_acked = True


def _fails_once(t: FakeTask) -> int:
    if t.read("a") == b"c3" and t.attempt == 1:
        return 1
    return _f("f")(t)


def _cancel_expect(seen: dict[str, list[bytes]], sim: "Sim | None" = None):
    items = [b"c1", b"c2", b"c3", b"c4"]
    k = len(seen.get("out", []))
    problems = [] if k >= 2 else [f"only {k} outputs before the cancel"]
    return {"out": [b"f(" + x + b")" for x in items[:k]], "a": items[k:]}, problems


def flow_cancel() -> Flow:
    """A cancel while a retried task runs: it is killed and its input goes back (release)."""
    w = wf(channels={"a": ["c1", "c2", "c3", "c4"], "out": []},
           processes=[_proc("p", "a", "out", retries=1)])
    return Flow("cancel", w, {"p": _fails_once}, {}, {"out", "a"}, state=E.CANCELLED,
                client=_cancel_client, expect=_cancel_expect)


def flow_muxbatch() -> Flow:
    """One mux task moves a batch: items of two channels, oldest first, into two
    channels; each target must get them all, in the order they came."""
    w = wf(channels={"a": ["a1", "a2"], "b": ["b1"], "l": [], "r": []}, processes=[],
           muxes=[("a b", "l r")])
    want = [b"a1", b"a2", b"b1"]
    return Flow("muxbatch", w, {}, {"l": want, "r": want}, {"l", "r"})


def _src_a(t: FakeTask) -> int:
    t.write("a/1", b"A1")  # a folder output: two items, in name order
    t.write("a/2", b"A2")
    return 0


def _src_b(t: FakeTask) -> int:
    t.write("b", b"B1")
    return 0


def _src_c(t: FakeTask) -> int:
    t.write("c", b"C1")
    t.write("e", b"")  # an empty item: it has no data to fsync
    return 0  # and "none", declared, is not written: no item


def _pick(t: FakeTask) -> int:
    x = t.read("pairs")
    if not x.startswith(b"A1|"):
        t.write("out", b"f(" + x + b")")
    return 0  # a filter: for A1's pair it writes nothing


def flow_sources() -> Flow:
    """Three source processes (task ids s1, s2, s3, all running at once; the first
    one's container exits a round after the others, so results do not come in the
    order of the claims): two feed a join (one with a folder output, one beside an
    initial item), the third writes a file, an empty file and nothing for its third
    output; a filter drops one pair."""
    w = wf(channels={"a": [], "b": ["b0"], "pairs": [], "c": [], "e": [], "none": [], "out": []},
           processes=[_proc("sa", "", "a"), _proc("sb", "", "b"), _proc("sc", "", "c e none"),
                      _proc("j", "a b", "pairs", parallel=2), _proc("pick", "pairs", "out")])
    return Flow("sources", w, {"sa": _src_a, "sb": _src_b, "sc": _src_c, "j": _join, "pick": _pick},
                {"out": [b"f(A2|B1)"], "c": [b"C1"], "e": [b""]}, {"out", "c", "e"},
                fired={"sa", "sb", "sc"}, slow={"sa": 1})


def flow_warm() -> Flow:
    """Warm processes (container="warm"), slow enough that crashes find tasks in flight:
    after a restart such a task is MISSING (never taken back) and runs again; its
    effect must still count once. A folder output and a 2-stage pipeline."""
    w = wf(channels={"a": ["w1", "w2", "w3"], "mid": [], "out": []},
           processes=[_proc("p", "a", "mid", container="warm", parallel=2),
                      _proc("q", "mid", "out", container="warm")])
    return Flow("warm", w, {"p": _f("p"), "q": _f("q")},
                {"out": [b"q(p(w1))", b"q(p(w2))", b"q(p(w3))"]}, set(), slow={"p": 1, "q": 1})


def flow_lost() -> Flow:
    """Containers lost mid-task (a Swarm node drained or gone: the executor says
    MISSING) after writing files: each such task runs again as the same attempt
    in an empty work/, so what the lost one wrote never becomes an item."""
    def script(t: FakeTask) -> int | str:
        x = t.read("a")
        if x in (b"l1", b"l3") and x not in t.world.lost:  # once per simulated world
            t.world.lost.add(x)
            t.write("out/1", b"stale(" + x + b").1")
            t.write("out/2", b"stale(" + x + b").2")
            return X.MISSING
        t.write("out/1", b"f(" + x + b")")
        return 0

    w = wf(channels={"a": ["l1", "l2", "l3"], "out": []}, processes=[_proc("p", "a", "out", parallel=2)])
    return Flow("lost", w, {"p": script}, {"out": [b"f(l1)", b"f(l2)", b"f(l3)"]}, set())


def _retry_script(t: FakeTask) -> int:
    """Fails for r2 and the source until the user has fixed it (world.fixed: before the retry)."""
    if t.spec.process == "gen":
        if not t.world.fixed:
            return 5
        t.write("a", b"gen")
        return 0
    x = t.read("a")
    if x == b"r2" and not t.world.fixed:
        t.write("out", b"partial")  # must never be published
        return 3
    t.write("out", b"f(" + x + b")")
    return 0


def _retry_client(sim: "Sim", run: Run) -> bool:
    """Once the run has failed: fix the script, then `flowctl retry RUN` (again after a
    crash until the daemon has answered); the run goes on."""
    from flowd import retrying

    if sim.client_acked:
        return False
    if run.state != E.FAILED:
        sim.client_acked = True  # taken before the crash: the run went on and ended
        return False
    if not run.failures.letters:
        raise AssertionError("the run failed without dead letters")
    sim.world.fixed = True
    retrying.retry(run)
    sim.client_acked = True
    return True


def flow_retry() -> Flow:
    """A run that fails (on-failure="stop") with two dead letters, one of a source
    process; the user fixes the script and retries once: every item is processed
    exactly once, the earlier success is not run again, r3 (never claimed) too."""
    w = wf(channels={"a": ["r1", "r2", "r3"], "out": []},
           processes=[_proc("gen", "", "a", on_failure="continue"),
                      _proc("p", "a", "out", on_failure="stop")])
    return Flow("retry", w, {"gen": _retry_script, "p": _retry_script},
                {"out": [b"f(r1)", b"f(r2)", b"f(r3)", b"f(gen)"]}, set(),
                fired={"gen"}, on_end=_retry_client)


def _rm_client(sim: "Sim", run: Run) -> bool:
    """Once the run has ended: `flowctl rm RUN` (again after a crash, until answered)."""
    from flowd import removal

    if not sim.client_acked:
        # Found after a restart, before it is deleted (again): it must be whole (a
        # retired task's hidden folder that a power loss brought back into a run that
        # then ended included: Run.open removes it from a finished run too).
        for problem in sim.check()["problems"]:
            sim.problems.append(f"before the rm: {problem}")
        removal.remove_run_dir(run.fs, sim.runs, run.id)
        sim.client_acked = True
    return False


def flow_rm() -> Flow:
    """`one`, then the client deletes the finished run: whole or gone, never half. Its
    file= item comes as `flowctl submit` sends it: written as an item in the upload
    and linked into the run as it is (Run.create(stamped=True))."""
    f = flow_one()
    return Flow("rm", f.wf, f.scripts, f.expected, f.ordered, f.files, on_end=_rm_client,
                removed=True, stamped=True)


def _lines(t: FakeTask) -> int:
    x = t.read("a").decode()
    t.write("out", f"{x}.1\n{x}.2\r\n\n{x}.3".encode())  # split="lines": 4 items
    return 0


def flow_split() -> Flow:
    """output@split="lines" (flowd.collect.Collector._split_output): one item per line, in order,
    built as a folder of unsynced files fsynced in one batch, renamed whole."""
    w = wf(channels={"a": ["s1", "s2"], "out": []}, processes=[_proc("p", "a", "out")])
    w.processes["p"].outputs[0].split = "lines"
    want = [f"{x}.{k}".encode() if k else b"" for x in ("s1", "s2") for k in (1, 2, 0, 3)]
    return Flow("split", w, {"p": _lines}, {"out": want}, {"out"}, worker=True)


def _five_lines(t: FakeTask) -> int:
    x = t.read("a").decode()
    t.write(t.spec.outputs[0], "".join(f"{x}.{k}\n" for k in range(1, 6)).encode())
    return 0


def flow_slices() -> Flow:
    """A split of 5 lines applied in slices of 2, 2 and 1 (APPLY_SLICE lowered: a big output),
    read by a second process while its later slices still move. Each slice is durable
    in both folders before the scheduler sees it (TaskStore.move_slice); a restart
    applies the rest (recover_tasks: what moved before is made durable first, then
    passed over, and an item taken meanwhile is not brought back)."""
    w = wf(channels={"a": ["s1"], "mid": [], "out": []},
           processes=[_proc("p", "a", "mid"), _proc("q", "mid", "out")])
    w.processes["p"].outputs[0].split = "lines"
    want = [f"q(s1.{k})".encode() for k in range(1, 6)]
    return Flow("slices", w, {"p": _five_lines, "q": _f("q")}, {"out": want}, {"out"},
                worker=True, apply_slice=2)


def _push_client(sim: "Sim", run: Run) -> None:
    """`flowctl push RUN a FILE` while the run runs, once answered: the file as the
    daemon stages it (plain writes), then Run.push (commands/transfers.py push_end).
    A push a crash cut short is sent again after the restart, as its user would."""
    if sim.client_acked:
        return
    if run.finished:
        sim.problems.append("the run ended before the push was answered")
        sim.client_acked = True
        return
    path = os.path.join(sim.uploads, "push")
    with open(path, "wb") as f:
        f.write(b"p1")
    sim.pushes += 1
    run.push("a", path)
    sim.client_acked = True


def _push_expect(seen: dict[str, list[bytes]], sim: "Sim"):
    """An answered push is there once. One a crash cut short before its answer may
    have landed already: sent again, it is there twice at most (a push is at least
    once; docs/flowctl.md, push), never lost."""
    k = seen.get("out", []).count(b"f(p1)")
    problems = [] if 1 <= k <= sim.pushes else [f"the pushed item is there {k} times after "
                                                 f"{sim.pushes} push(es)"]
    return {"out": [b"f(q1)", b"f(q2)"] + [b"f(p1)"] * max(k, 1)}, problems


def flow_push() -> Flow:
    """An item pushed into a running run (RunStore.put_file: link, stamp, fsyncs):
    it is processed like the others, once."""
    w = wf(channels={"a": ["q1", "q2"], "out": []}, processes=[_proc("p", "a", "out")])
    return Flow("push", w, {"p": _f("f")}, {}, set(), client=_push_client, expect=_push_expect,
                slow={"p": 1})


def flow_cache() -> Flow:
    """process@cache="yes" (flowd/cache.py) with cache_max_size 16 bytes: x1 (5 bytes)
    runs and is stored; x2 (a folder output, two items, 14 bytes) runs and is stored,
    which evicts x1; the second x2 is a hit published from the cache; the second x1
    runs again and is stored, which evicts x2. A crash at any point of a store, an
    eviction or a hit gives the same items, never half a hit."""
    w = wf(channels={"a": ["x1", "x2", "x2", "x1"], "out": []}, processes=[_proc("p", "a", "out")])
    w.processes["p"].cache = True
    return Flow("cache", w, {"p": _one},
                {"out": [b"f(x1)", b"f(x2).1", b"f(x2).2", b"f(x2).1", b"f(x2).2", b"f(x1)"]},
                {"out"}, cache=True, cache_max=16)


FLOWS = {"one": flow_one, "join": flow_join, "pipeline": flow_pipeline,
         "faults": flow_faults, "cancel": flow_cancel, "muxbatch": flow_muxbatch,
         "sources": flow_sources, "warm": flow_warm, "lost": flow_lost,
         "retry": flow_retry, "rm": flow_rm, "split": flow_split, "slices": flow_slices,
         "push": flow_push, "cache": flow_cache}


class Sim:
    """One spool on disk and the daemon lives that drive its run."""

    def __init__(self, root: str, flow: Flow, *, lost: bool = False, skip: frozenset = frozenset()):
        self.root = root
        self.flow = flow
        self.skip = skip
        self.runs = os.path.join(root, "runs")
        self.uploads = os.path.join(root, "uploads")
        self.path = os.path.join(self.runs, RUN_ID)
        self.world = World()
        self.submitted = False
        self.accepted = False
        self.cancel_acked = False
        self.client_acked = False  # flows retry and rm: the daemon answered the client
        self.pushes = 0  # flow push: lives that sent the push (answered or not)
        self.problems: list[str] = []  # found during a life (flow rm: the run half there)
        self.lives = 0
        self.recovery_points = 0
        self.durable: Durable | None = None
        if os.path.exists(root):
            reaper.remove_tree(root)
        os.makedirs(self.runs)
        os.makedirs(self.uploads)
        self.model = DiskModel(root) if lost else None
        self.recorder = SiteRecorder()
        # The upload, as the daemon receives it: plain writes, no fsync.
        self.bundle = os.path.join(self.uploads, "u1")
        os.mkdir(self.bundle)
        with open(os.path.join(self.bundle, "workflow.xml"), "wb") as f:
            f.write(b"<workflow/>")
        for name, data in flow.files.items():
            if flow.stamped:  # as Staging.write_whole makes an upload's file: an item, no fsync
                Durable().scratch_create(os.path.join(self.bundle, name), data, mode=0o640)
                continue
            with open(os.path.join(self.bundle, name), "wb") as f:
                f.write(data)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
        for p in (self.root, self.root + ".crash", self.root + ".old"):
            if os.path.exists(p):
                reaper.remove_tree(p)

    def life(self, crash_at: int | None = None) -> tuple[bool, int]:
        """One daemon life; returns (crashed, durability points it went through)."""
        self.lives += 1
        fs = Durable(crash_at=crash_at, crash_mode="raise")
        fs.observer = self.model if self.model is not None else self.recorder
        fs.skip_fsync = self.skip
        self.durable = fs
        if self.model is not None:
            self.model.clock = fs
        R.APPLY_SLICE = self.flow.apply_slice or DEFAULT_APPLY_SLICE  # read by Run.open's recovery
        events: list = []
        ex = SimExecutor(events.append, self.flow.scripts, self.world, self.flow.wf, self.flow.slow)
        try:
            if self.submitted:  # a restart: Daemon.serve flushes the spool before recovery
                fs.sync_all(self.root)  # (the first life's upload comes after its start)
            for name in sorted(os.listdir(self.runs)):
                if name.startswith(".new-"):
                    fs.rmtree(os.path.join(self.runs, name))  # Daemon._open_runs
            removal.clear_leftovers(fs, self.runs)  # Daemon.prepare (Removal.start)
            if not self.submitted:
                self.submitted = True
                Run.create(self.runs, RUN_ID, self.flow.wf, self.bundle, fs, {},
                           stamped=self.flow.stamped)
                self.accepted = True  # the client has its answer
                run = Run.open(self.path, fs, ex, Limits())
                run.cache, run.worker = self._cache(fs, events), self._worker(events)
            else:
                shutil.rmtree(self.uploads, ignore_errors=True)
                os.makedirs(self.uploads, exist_ok=True)
                if not os.path.exists(self.path):
                    return False, fs.points
                run = Run.open(self.path, fs, ex, Limits())
                run.cache, run.worker = self._cache(fs, events), self._worker(events)
                if not run.finished:
                    run.resume()
                ex.sweep("", run.keep())
                self.recovery_points = fs.points  # the recovery proper ends here
            self._drain(run, ex, events)
        except SimulatedCrash:
            return True, fs.points
        finally:
            fs.close()
        return False, fs.points

    def _cache(self, fs: Durable, events: list):
        """The daemon's cache for this life (flows with ``cache``), opened as
        Daemon.prepare opens it: what a crash left half-built goes. Its lookups
        run at once (deterministic points); the answers reach the run as the
        daemon's do, as work handed to the loop (``events``)."""
        if not self.flow.cache:
            return None
        from flowd.cache import Cache

        cache = Cache(os.path.join(self.root, "cache"), fs, self.flow.cache_max,
                      report=events.append, run_inline=True)
        cache.open()
        return cache

    def _worker(self, events: list):
        """The daemon's worker for collects that may be long (a split's), for flows
        with ``worker``: inline (deterministic points), its answers handed to the
        loop as the daemon's are (``events``)."""
        if not self.flow.worker:
            return None
        from flowd.offloop import OffLoop

        return OffLoop(1, "crashsim", report=events.append, run_inline=True)

    def _drain(self, run: Run, ex: SimExecutor, events: list) -> None:
        # One scheduler step per tick: the order of operations (so the numbering
        # of the points) never hangs on the clock, and tick slicing is swept.
        run.tick_budget = 0.0
        for _ in range(1000):
            if run.finished:
                if self.flow.on_end is not None and self.flow.on_end(self, run):
                    continue  # the client made it go on (flow retry)
                return
            run.tick(CAPACITY - run.running_containers())
            if self.flow.client is not None:
                self.flow.client(self, run)
            ex.run_pending()
            if not events and not ex.pending and not run.finished and not run.more:
                raise AssertionError(f"run stalled in state {run.state}: active "
                                     f"{sorted(run.active)}, queues {run.sched.queues}")
            if events:  # all that came in this round, together: the daemon's group commit
                batch, events[:] = list(events), []
                for answer in [ev for ev in batch if callable(ev)]:
                    answer()  # a cache lookup's or a collect's answer (Daemon._drain_events runs them first)
                run.on_results([ev for ev in batch if not callable(ev)])
        raise AssertionError("run did not end")

    def power_loss(self, rng: random.Random | None) -> None:
        # The machine went down, and the containers with it. (A Docker engine may
        # list them as exited after the reboot; their outputs were never fsynced,
        # so the executor must take them as missing: see docs/reliability.md.)
        self.world.containers.clear()
        self.model.crash(rng)

    # -- the oracle ----------------------------------------------------------
    def check(self) -> dict:
        """Problems found (empty: pass) and the lost/duplicated/unexpected counts."""
        problems: list[str] = []
        figures = {"lost": 0, "duplicated": 0, "unexpected": 0}
        flow = self.flow
        problems += self.problems
        stray = [n for n in os.listdir(self.runs) if n.startswith(".")]
        if stray:
            problems.append(f"hidden entries in runs/: {stray}")
        if not os.path.exists(self.path):
            if self.flow.removed:
                return {"problems": problems, **figures}  # deleted, as the client asked
            if self.accepted:
                problems.append("the accepted run is gone")
                figures["lost"] = sum(len(v) for v in flow.expected.values()) or 1
            return {"problems": problems, **figures}
        if self.flow.removed and self.client_acked:
            problems.append("the run is there again after `rm` was answered")
            figures["unexpected"] += 1
        with open(os.path.join(self.path, "run.json"), "rb") as f:
            state = json.load(f)["state"]
        if state != flow.state:
            problems.append(f"run state {state}, not {flow.state}")
        seen: dict[str, list[bytes]] = {}
        for ch in flow.wf.channels:
            folder = os.path.join(self.path, "channels", ch)
            seen[ch] = []
            for n in sorted(os.listdir(folder)):
                with open(os.path.join(folder, n), "rb") as f:
                    seen[ch].append(f.read())
        dead = []
        for name in sorted(os.listdir(os.path.join(self.path, "failed"))):
            folder = os.path.join(self.path, "failed", name)
            try:
                with open(os.path.join(folder, "failure.json"), "rb") as f:
                    reason = json.load(f)["reason"]
                if not reason:
                    problems.append(f"dead letter {name} has no reason")
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"dead letter {name}: failure.json unreadable: {e}")
            for n in sorted(os.listdir(os.path.join(folder, "in"))):
                with open(os.path.join(folder, "in", n), "rb") as f:
                    dead.append(f.read())
        seen["failed/"] = dead
        expected = dict(flow.expected)
        if flow.expect is not None:
            expected, more = flow.expect(seen, self)
            problems += more
        expected["failed/"] = flow.failed
        for ch, items in seen.items():
            want = expected.get(ch, [])
            got_c, want_c = collections.Counter(items), collections.Counter(want)
            extra = got_c - want_c
            figures["lost"] += sum((want_c - got_c).values())
            figures["duplicated"] += sum(k for v, k in extra.items() if v in want_c)
            figures["unexpected"] += sum(k for v, k in extra.items() if v not in want_c)
            if got_c != want_c:
                problems.append(f"channel {ch}: {items} != expected {want}")
            elif ch in flow.ordered and items != want:
                problems.append(f"channel {ch}: order {items} != {want}")
        left = os.listdir(os.path.join(self.path, "tasks"))
        if left:
            problems.append(f"tasks/ not empty: {left}")
        fired = set(os.listdir(os.path.join(self.path, "fired")))
        if fired != flow.fired:
            problems.append(f"fired/ holds {sorted(fired)}, not {sorted(flow.fired)}")
        for dirpath, dirnames, filenames in os.walk(self.path):
            for n in dirnames + filenames:
                if n.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, n), self.path)
                    problems.append(f"hidden leftover {rel}")
        if flow.cache:
            problems += self._check_cache()
        return {"problems": problems, **figures}

    def _check_cache(self) -> list[str]:
        """Nothing half-built left once the daemon has started again, and every item
        an entry holds is one of the flow's outputs. An entry may be short of its
        record or items after a power loss (storing one costs no fsync: it is a
        hint, checked when used); that it never gives half a hit is the channels'
        check above."""
        problems = []
        root = os.path.join(self.root, "cache")
        if not os.path.isdir(root):
            return problems
        problems += [f"cache: leftover {n}" for n in os.listdir(root) if n.startswith(".")]
        want = set(self.flow.expected.get("out", []))
        for dirpath, _, filenames in os.walk(os.path.join(root, "entries")):
            for n in filenames:
                if n == "entry.json":
                    continue
                with open(os.path.join(dirpath, n), "rb") as f:
                    got = f.read()
                if got not in want:  # (the model keeps no extended attributes: no stamps)
                    problems.append(f"cache: {os.path.relpath(os.path.join(dirpath, n), root)} "
                                    f"holds {got!r}")
        return problems


# -- sweeps ------------------------------------------------------------------
@dataclass
class Tally:
    runs: int = 0
    failures: list = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    not_accepted: int = 0  # the crash cut a submission short: no run, nothing was promised
    sites: set = field(default_factory=set)  # fsync sites the runs went through

    def add(self, sim: Sim, label: str) -> bool:
        res = sim.check()
        self.sites |= sim.recorder.sites
        if sim.model is not None:
            self.sites |= set(sim.model.sites)
        self.runs += 1
        self.lost += res["lost"]
        self.duplicated += res["duplicated"]
        self.unexpected += res["unexpected"]
        if not sim.accepted and not os.path.exists(sim.path):
            self.not_accepted += 1
        if res["problems"]:
            self.failures.append((label, res["problems"]))
            return False
        return True

    def error(self, label: str, e: BaseException) -> None:
        self.runs += 1
        self.failures.append((label, [f"{type(e).__name__}: {e}"]))

    def merge(self, other: "Tally") -> "Tally":
        self.runs += other.runs
        self.failures += other.failures
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.unexpected += other.unexpected
        self.not_accepted += other.not_accepted
        self.sites |= other.sites
        return self

    def line(self) -> str:
        return (f"{self.runs} runs, {len(self.failures)} failures, lost {self.lost}, "
                f"duplicated {self.duplicated}, unexpected {self.unexpected}")


class quick_fsync:
    """The crashes are simulated: a real fsync (ms each on ext4) would only cost time."""

    def __enter__(self):
        self.saved = fsops._fsync
        fsops._fsync = lambda fd, path: None

    def __exit__(self, *exc):
        fsops._fsync = self.saved


def scratch() -> str:
    """Where sweeps make their spools: $FLOWD_CRASH_DIR, else tmpfs (/dev/shm), else /tmp."""
    d = os.environ.get("FLOWD_CRASH_DIR")
    if d:
        return d
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def workers() -> int:
    """Sweep processes: $FLOWD_CRASH_WORKERS, else the CPUs, at most 4."""
    if os.environ.get("FLOWD_CRASH_WORKERS"):
        return max(1, int(os.environ["FLOWD_CRASH_WORKERS"]))
    return max(1, min(os.cpu_count() or 1, 4))


class _Scratch:
    def __enter__(self) -> str:
        self.base = tempfile.mkdtemp(prefix="flowd-crash-", dir=scratch())
        self.q = quick_fsync()
        self.q.__enter__()
        return self.base

    def __exit__(self, *exc):
        self.q.__exit__()
        shutil.rmtree(self.base, ignore_errors=True)


def _parallel(fn, jobs: list[tuple]) -> list:
    n = min(workers(), len(jobs))
    if threading.active_count() > 1:
        n = 1  # forking a process with threads can deadlock: stay in this one
    if n <= 1:
        return [fn(*j) for j in jobs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(n) as pool:
        return pool.starmap(fn, jobs, chunksize=1)


def _chunks(ns: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(ns)))
    return [ns[i::parts] for i in range(parts)]


# One clean run: its points, the points of Run.create, its fsync sites and where they ran.
@dataclass
class Clean:
    total: int
    create: int
    sites: dict[str, list[int]]


def clean(name: str) -> Clean:
    flow = FLOWS[name]()
    with _Scratch() as base:
        sim = Sim(os.path.join(base, "clean"), flow, lost=True)
        try:
            crashed, total = sim.life()
            assert not crashed
            res = sim.check()
            assert not res["problems"], res["problems"]
            sites = {k: list(v) for k, v in sim.model.site_points.items()}
        finally:
            sim.close()
        sim = Sim(os.path.join(base, "create"), flow)
        try:
            fs = Durable(crash_mode="raise")
            Run.create(sim.runs, RUN_ID, flow.wf, sim.bundle, fs, {})
            create = fs.points
        finally:
            sim.close()
    return Clean(total, create, sites)


def _single_job(name: str, ns: list[int]) -> Tally:
    """kill -9 at point n (the page cache survives; containers too), restart, drain."""
    flow, t = FLOWS[name](), Tally()
    with _Scratch() as base:
        for n in ns:
            sim = Sim(os.path.join(base, "s"), flow)
            label = f"{name}: crash at point {n}"
            try:
                assert sim.life(crash_at=n)[0], f"no crash at point {n}"
                assert not sim.life()[0]
                t.add(sim, label)
            except Exception as e:  # noqa: BLE001 - a failure to report, with the rest
                t.error(label, e)
            finally:
                sim.close()
    return t


def sweep_single(name: str, total: int) -> Tally:
    ns = list(range(1, total + 1))
    return _merge(_parallel(_single_job, [(name, c) for c in _chunks(ns, 4 * workers())]))


def _double_job(name: str, firsts: list[int], scope: str) -> Tally:
    """Crash at n, then again at each point m of the next life: of its recovery proper
    (Run.open, resume, sweep) when scope is "recovery", of recovery and drain for "all"."""
    flow, t = FLOWS[name](), Tally()
    with _Scratch() as base:
        for n in firsts:
            sim = Sim(os.path.join(base, "d"), flow)
            try:
                sim.life(crash_at=n)
                sim.recovery_points = 0
                _, after = sim.life()
                upto = after if scope == "all" else sim.recovery_points
            finally:
                sim.close()
            for m in range(1, upto + 1):
                sim = Sim(os.path.join(base, "d"), flow)
                label = f"{name}: crash at point {n}, then at point {m} of the restart"
                try:
                    assert sim.life(crash_at=n)[0]
                    assert sim.life(crash_at=m)[0], f"no second crash at {m}"
                    assert not sim.life()[0]
                    t.add(sim, label)
                except Exception as e:  # noqa: BLE001
                    t.error(label, e)
                finally:
                    sim.close()
    return t


def sweep_double(name: str, firsts: list[int], scope: str = "recovery") -> Tally:
    jobs = [(name, c, scope) for c in _chunks(firsts, 4 * workers())]
    return _merge(_parallel(_double_job, jobs))


def _lost_job(name: str, ns: list[int], total: int, seeds: list[int], skip: tuple = (),
              stop_at_first: bool = False) -> Tally:
    """Power loss at point n (n = total + 1: after the run ended): unsynced writes are
    dropped (all of them, then a random subset per seed), containers are gone; restart."""
    flow, t = FLOWS[name](), Tally()
    with _Scratch() as base:
        for n in ns:
            for seed in [None] + list(seeds):
                sim = Sim(os.path.join(base, "l"), flow, lost=True, skip=frozenset(skip))
                label = f"{name}: power loss at point {n}" + (
                    " (all unsynced writes lost)" if seed is None else f" (seed {seed})")
                ok = False
                try:
                    crashed, _ = sim.life(crash_at=n if n <= total else None)
                    assert crashed or n > total, f"no crash at point {n}"
                    sim.power_loss(None if seed is None else random.Random(seed * 100003 + n))
                    assert not sim.life()[0]
                    ok = t.add(sim, label)
                except Exception as e:  # noqa: BLE001
                    t.error(label, e)
                finally:
                    sim.close()
                if not ok and stop_at_first:
                    return t
    return t


def sweep_lost(name: str, total: int, seeds: list[int]) -> Tally:
    ns = list(range(1, total + 2))
    jobs = [(name, c, total, seeds) for c in _chunks(ns, 4 * workers())]
    return _merge(_parallel(_lost_job, jobs))


def _kill_lost_job(name: str, firsts: list[int], window: int | None, seeds: list[int]) -> Tally:
    """kill -9 at n (what it wrote stays unsynced in the page cache), then a power loss
    at each point m of the restart: its recovery and the ``window`` points after it
    (None: all of it). Finds a redo that skips an fsync because an earlier life did
    the work but died before that life's fsync."""
    flow, t = FLOWS[name](), Tally()
    with _Scratch() as base:
        for n in firsts:
            sim = Sim(os.path.join(base, "k"), flow, lost=True)
            try:
                sim.life(crash_at=n)
                sim.recovery_points = 0
                _, after = sim.life()
                upto = after if window is None else min(after, sim.recovery_points + window)
            finally:
                sim.close()
            for m in range(1, upto + 1):
                for seed in [None] + list(seeds):
                    sim = Sim(os.path.join(base, "k"), flow, lost=True)
                    label = f"{name}: kill -9 at point {n}, then a power loss at point {m} of the restart" + (
                        " (all unsynced writes lost)" if seed is None else f" (seed {seed})")
                    try:
                        assert sim.life(crash_at=n)[0]
                        assert sim.life(crash_at=m)[0], f"no second crash at {m}"
                        sim.power_loss(None if seed is None else random.Random(seed * 100003 + n * 1009 + m))
                        assert not sim.life()[0]
                        t.add(sim, label)
                    except Exception as e:  # noqa: BLE001
                        t.error(label, e)
                    finally:
                        sim.close()
    return t


def sweep_kill_then_lost(name: str, firsts: list[int], window: int | None = 12,
                         seeds: list[int] = ()) -> Tally:
    jobs = [(name, c, window, list(seeds)) for c in _chunks(firsts, 4 * workers())]
    return _merge(_parallel(_kill_lost_job, jobs))


def _merge(tallies: list[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.merge(t)
    return out


def _mutant_job(site: str, plan: list[tuple[str, list[int], int, int]], seeds: list[int],
                window: int | None) -> tuple[str, str | None]:
    """Leave out one fsync site and run the lost-writes sweep where it could matter:
    every point from its first use on, or (``window``) the few points after each use
    and after Run.create (what is built under .new- counts once renamed into place)."""
    for name, uses, total, create in plan:
        if window is None:
            ns = list(range(uses[0], total + 2))
        else:
            starts = list(uses) + ([create - 2] if uses[0] < create else [])
            ns = sorted({n for u in starts for n in range(u + 1, min(u + window, total + 1) + 1)})
        t = _lost_job(name, ns, total, seeds, skip=(site,), stop_at_first=True)
        if t.failures:
            label, problems = t.failures[0]
            return site, f"{label}: {problems[0]}"
    return site, None


def mutation(seeds: list[int], cleans: dict[str, Clean] | None = None,
             window: int | None = None) -> dict[str, str | None]:
    """For every fsync site the clean runs reach: is it covered (leaving it out fails the
    lost-writes sweep of some flow)? Returns site -> the first failure, or None."""
    cleans = cleans or {name: clean(name) for name in FLOWS}
    plans: dict[str, list] = collections.defaultdict(list)
    for name, c in cleans.items():
        for site, points in c.sites.items():
            plans[site].append((name, points, c.total, c.create))
    jobs = [(site, sorted(plan, key=lambda p: p[2]), seeds, window)
            for site, plan in sorted(plans.items())]
    return dict(_parallel(_mutant_job, jobs))


def main(argv: list[str]) -> int:
    """Print the figures of docs/reliability.md (``--mutation``: the mutation check too)."""
    seeds = [1, 2, 3, 4, 5]
    t0 = time.time()
    print(f"{workers()} workers, spools under {scratch()}")
    cleans = {}
    for name in FLOWS:
        c = cleans[name] = clean(name)
        print(f"{name}: {c.total} durability points ({c.create} in Run.create), "
              f"{len(c.sites)} fsync sites")
        firsts = list(range(1, c.total + 1))
        sample = firsts if name == "one" else firsts[::10]
        for label, run in (
                ("crash sweep: kill -9 at every point", lambda: sweep_single(name, c.total)),
                (f"lost writes: power loss at every point and after the end; all unsynced "
                 f"writes lost, then seeds {seeds}", lambda: sweep_lost(name, c.total, seeds)),
                ("double crash: every first point x every point of its recovery",
                 lambda: sweep_double(name, firsts, "recovery")),
                (f"double crash: {len(sample)} first points x every later point",
                 lambda: sweep_double(name, sample, "all")),
                ("kill -9 at every point, then a power loss at each point of the restart's "
                 "recovery and the 12 after it (all unsynced writes lost)",
                 lambda: sweep_kill_then_lost(name, firsts, 12))):
            t1 = time.time()
            tl = run()
            print(f"  {label}: {tl.line()}; {time.time() - t1:.1f}s", flush=True)
            for f in tl.failures[:5]:
                print("     ", f)
    if "--mutation" in argv:
        t2 = time.time()
        res = mutation(seeds, cleans)
        for site, why in sorted(res.items()):
            print(f"  {'covered' if why else 'NOT COVERED'}: {site}" + (f"\n      <- {why}" if why else ""))
        covered = sum(1 for v in res.values() if v)
        print(f"mutation: {covered} of {len(res)} fsync sites covered; {time.time() - t2:.1f}s")
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
