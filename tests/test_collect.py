"""Collection: where a container's files become items (docs/reliability.md, "Collection").

What a script leaves in /task is hostile. ``TaskStore.collect`` must turn only
the declared outputs' regular files into items, and each item must be a new
file flowd made and owns: mode 0640, one link, no setuid, the bytes of a file
that was in work/ (never of a file outside it), stamped with its checksum.

- a property test (hypothesis) over every kind of entry a script can leave:
  regular files of any mode (0000, setuid, setgid, 0777) and owner, folders,
  nested folders, symbolic links (to files and folders inside and outside),
  FIFOs, hard links (between outputs, to a file outside), device nodes (as
  root), and a second process that swaps entries while collect runs;
- the same property test again as a non-root user (``nobody``), the way the
  service runs the daemon: permission bits then count;
- collect is idempotent after a crash at any of its durability points;
- ``reaper.remove_tree`` and the reaper as a non-root user: whatever a script
  left (unreadable folders, a 2,000-level tree, links, FIFOs) goes; what
  cannot go (another uid's folder) is reported, never raised, and logged once.

Everything runs without Docker, on a real ``Durable`` (real fsyncs).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowd import checksum
from flowd.fsops import CHUNK, Durable, SimulatedCrash
from flowd.collect import ITEM_MODE, Span, TaskOutputError, split_name
from flowd.store import RunStore
from flowd.taskstore import TaskStore

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.geteuid() == 0
NOBODY = 65534  # the non-root user the root-run tests switch to
FOREIGN = 4242  # another uid, for files a root-run script gives away
EXAMPLES = int(os.environ.get("FLOWD_COLLECT_EXAMPLES", "300"))
RACER_MAX_SWAPS = 200_000  # a bound on the racing process, whatever happens
WAIT = 60.0  # generous waits for the racing process (never a timing assertion)

MODES = [0o644, 0o600, 0o640, 0o000, 0o400, 0o4755, 0o2755, 0o6777, 0o1777, 0o777]
DIR_MODES = [0o755, 0o700, 0o500, 0o555, 0o000, 0o300, 0o100, 0o2775, 0o1777, 0o777]
LINK_TARGETS = ["/etc/passwd", "SENTINEL", "/", "OUTSIDE", "o0", ".", "nowhere", "SELF"]
NAME_CHARS = "abcXYZ019._-"


def _can_mknod() -> bool:
    if not ROOT:
        return False
    d = tempfile.mkdtemp()
    try:
        os.mknod(os.path.join(d, "n"), 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


DEVICES = _can_mknod()  # root in a container may still be refused mknod


# -- a task with a work/ folder -------------------------------------------------
def new_task(base: str, fs: Durable | None = None):
    """A run folder under ``base`` and one claimed source task, attempt 1."""
    fs = fs or Durable()
    os.makedirs(base, exist_ok=True)
    store = RunStore.layout(os.path.join(base, "run"), fs, [])
    rec = TaskStore(store).claim("process", "p", "s1", [])
    TaskStore(store).set_attempt(rec, 1)
    return store, rec


def outside_files(base: str) -> tuple[str, str, bytes]:
    """A folder beside the run with a sentinel file whose bytes must never become an item."""
    outside = os.path.join(base, "outside")
    os.mkdir(outside)
    marker = b"SENTINEL-" + os.urandom(8).hex().encode()
    sentinel = os.path.join(outside, "secret")
    for p in (sentinel, sentinel + ".copy"):  # the copy: for the racing process's hard links
        with open(p, "wb") as f:
            f.write(marker + b"\n")
    return outside, sentinel, marker


# -- what a script leaves: drawn, then made --------------------------------------
DATA = st.tuples(st.binary(max_size=40), st.sampled_from([False, False, False, True])).map(
    lambda t: (t[0] or b"\x00") * (CHUNK // max(1, len(t[0])) + 3) if t[1] else t[0])


def draw_file(data) -> dict:
    return {"kind": "file", "data": data.draw(DATA, label="bytes"),
            "mode": data.draw(st.sampled_from(MODES), label="mode"),
            "foreign": ROOT and data.draw(st.booleans(), label="foreign owner")}


def draw_node(data, in_folder: bool) -> dict:
    bad = ["symlink", "fifo", "hardlink_outside", "hardlink_sibling" if in_folder else "hardlink_output"]
    if DEVICES:
        bad.append("device")
    if in_folder:
        bad.append("nested")
        kinds = ["file"] * 14 + bad
    else:
        kinds = ["file"] * 9 + ["dir"] * 6 + ["missing"] * 2 + bad
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "file":
        return draw_file(data)
    if kind == "symlink":
        return {"kind": kind, "to": data.draw(st.sampled_from(LINK_TARGETS), label="target")}
    if kind in ("dir", "nested"):
        names = data.draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=5).filter(
            lambda n: n not in (".", "..")), unique=True, max_size=4 if kind == "dir" else 2),
            label="names")
        children = {n: (draw_node(data, True) if kind == "dir" else draw_file(data)) for n in names}
        return {"kind": kind, "mode": data.draw(st.sampled_from(DIR_MODES), label="folder mode"),
                "children": children}
    return {"kind": kind}


def make(path: str, node: dict, env: dict, links: list) -> None:
    """Make ``node`` at ``path`` as a script would (hard links and folder modes come later)."""
    kind = node["kind"]
    if kind == "file":
        with open(path, "wb") as f:
            f.write(node["data"])
        if node["foreign"]:
            os.chown(path, FOREIGN, FOREIGN)  # before the chmod: chown clears setuid
        os.chmod(path, node["mode"])
        env["contents"].append(node["data"])
        env["files"].append(path)
    elif kind == "symlink":
        to = {"SENTINEL": env["sentinel"], "OUTSIDE": env["outside"],
              "SELF": os.path.basename(path)}.get(node["to"], node["to"])
        os.symlink(to, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless if read
    elif kind in ("dir", "nested"):
        os.mkdir(path)
        for name, child in node["children"].items():
            make(os.path.join(path, name), child, env, links)
        env["folders"].append((path, node["mode"]))
    elif kind == "missing":
        pass
    else:  # a hard link, made once every file exists
        links.append((path, kind))


def link(env: dict, links: list) -> None:
    for path, kind in links:
        target = env["link_to"]
        siblings = [f for f in env["files"] if os.path.dirname(f) == os.path.dirname(path)]
        if kind in ("hardlink_sibling", "hardlink_output") and siblings:
            target = siblings[0]
        os.link(target, path)


def seal(env: dict) -> None:
    for path, mode in env["folders"]:  # deepest first (as made): a 0000 parent would stop the rest
        os.chmod(path, mode)


def expected(nodes: list[dict], env: dict, cap: int | None) -> list[tuple[str, bytes]] | None:
    """What collect must return for ``nodes`` (declared in order), or None: TaskOutputError."""
    def regular_ok(path: str, node: dict) -> bool:
        return (node["kind"] == "file" and os.lstat(path).st_nlink == 1
                and (cap is None or len(node["data"]) <= cap))

    out: list[tuple[str, bytes]] = []
    for j, node in enumerate(nodes):
        path = os.path.join(env["work"], f"o{j}")
        if node["kind"] == "missing":
            continue
        if node["kind"] == "file":
            if not regular_ok(path, node):
                return None
            out.append((f"ch{j}", node["data"]))
        elif node["kind"] == "dir":
            for name in sorted(node["children"]):
                if not regular_ok(os.path.join(path, name), node["children"][name]):
                    return None
                out.append((f"ch{j}", node["children"][name]["data"]))
        else:
            return None
    return out


# -- the racing process ------------------------------------------------------------
def _racer(work: str, targets: list[str], folders: list[str], outside: str, sentinel: str,
           seed: int, ready, stop) -> None:
    """Swap entries of work/ until told to stop: links over checked files, folders
    replaced by links, FIFOs, hard links to a file outside, setuid files."""
    rng = random.Random(seed)
    k = 0
    while not stop.is_set() and k < RACER_MAX_SWAPS:
        k += 1
        tmp = os.path.join(work, f".race{k}")
        dst = rng.choice(targets)
        op = rng.randrange(8)
        try:
            if op == 0:
                os.symlink(rng.choice(["/etc/passwd", sentinel, "/", outside]), tmp)
                os.rename(tmp, dst)
            elif op == 1:
                with open(tmp, "wb") as f:
                    f.write(b"RACER-%d" % k)
                os.chmod(tmp, rng.choice([0o4755, 0o777, 0o000]))
                os.rename(tmp, dst)
            elif op == 2:
                os.mkfifo(tmp)
                os.rename(tmp, dst)
            elif op == 3:
                # A hard link to a file inside work/, or to the sentinel's copy outside
                # (whose bytes must never become an item, even if the name goes again)
                if rng.random() < 0.5:
                    keep = os.path.join(work, f".racer-file{k}")
                    with open(keep, "wb") as f:
                        f.write(b"RACER-link-%d" % k)
                else:
                    keep = sentinel + ".copy"
                os.link(keep, tmp)
                os.rename(tmp, dst)
                if rng.random() < 0.5:
                    os.unlink(dst)  # the count of links reads 1 again
            elif op == 4 and DEVICES:
                os.mknod(tmp, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
                os.rename(tmp, dst)
            elif op in (5, 6) and folders:
                folder = rng.choice(folders)
                aside = folder + ".aside"
                if os.path.lexists(aside):  # put the folder back
                    if os.path.islink(folder) or not os.path.isdir(folder):
                        os.unlink(folder)
                    os.rename(aside, folder)
                else:  # replace it with a link to somewhere else
                    os.rename(folder, aside)
                    os.symlink(rng.choice(["/", outside, aside]), folder)
            else:
                os.chmod(dst, rng.choice([0o000, 0o4755, 0o2777]), follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass
        if k == 1:
            ready.set()
    ready.set()


def _targets(env: dict, nodes: list[dict]) -> tuple[list[str], list[str]]:
    work = env["work"]
    targets, folders = [], []
    for j, node in enumerate(nodes):
        p = os.path.join(work, f"o{j}")
        targets.append(p)
        if node["kind"] in ("dir", "nested"):
            folders.append(p)
            targets += [os.path.join(p, n) for n in node["children"]]
    return targets, folders


# -- the property ------------------------------------------------------------------
def _inodes_under(top: str) -> dict[tuple[int, int], int]:
    """(dev, ino) -> an O_PATH descriptor holding it, for every entry under ``top``
    (held open so that no number is reused by a file flowd makes meanwhile)."""
    held = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames + [""]:
            p = os.path.join(dirpath, n) if n else dirpath
            try:
                fd = os.open(p, os.O_PATH | os.O_NOFOLLOW)
            except OSError:
                continue
            st_ = os.fstat(fd)
            key = (st_.st_dev, st_.st_ino)
            if key in held:
                os.close(fd)
            else:
                held[key] = fd
    return held


def check_items(store: RunStore, rec, result, allowed: set[bytes] | None, racer: bool,
                before: dict, marker: bytes, passwd: bytes) -> list[tuple[str, bytes]]:
    """Every returned item is a safe, new, stamped copy of a file that was in work/."""
    got = []
    me = os.geteuid()
    for channel, rel in result:
        path = store.task_path(rec, rel)
        st_ = os.lstat(path)
        assert stat.S_ISREG(st_.st_mode), f"{rel} is not a regular file"
        assert st_.st_uid == me, f"{rel} is owned by uid {st_.st_uid}, not flowd's {me}"
        assert st_.st_nlink == 1, f"{rel} has {st_.st_nlink} links"
        assert stat.S_IMODE(st_.st_mode) == ITEM_MODE, f"{rel} has mode {stat.S_IMODE(st_.st_mode):o}"
        assert (st_.st_dev, st_.st_ino) not in before, f"{rel} is an inode the script made"
        with open(path, "rb") as f:
            body = f.read()
        assert marker not in body, f"{rel} holds the bytes of a file outside work/"
        assert body != passwd, f"{rel} holds /etc/passwd"
        if allowed is not None:
            assert body in allowed or (racer and body.startswith(b"RACER-")), (
                f"{rel}: {body[:40]!r} was in no file of work/")
        assert checksum.check_stamp_present(path) is not False, f"{rel} has no checksum stamp"
        assert checksum.check(path) is None, f"{rel}: {checksum.check(path)}"
        got.append((channel, body))
    names = os.listdir(store.task_path(rec, "out"))
    assert all(n.startswith("1.") and n[2:].isdigit() for n in names), f"out/ holds {names}"
    assert {rel.split("/")[1] for _, rel in result} <= set(names)
    return got


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_collect_makes_only_safe_new_copies_of_checked_files(tmp_path_factory, data):
    n = data.draw(st.integers(1, 4), label="outputs")
    nodes = [draw_node(data, False) for _ in range(n)]
    cap = data.draw(st.sampled_from([None, None, None, 16, CHUNK]), label="max_output_bytes")
    race = data.draw(st.booleans(), label="race")
    base = str(tmp_path_factory.mktemp("collect"))
    store, rec = new_task(base)
    tasks = TaskStore(store, max_output_bytes=cap)
    outside, sentinel, marker = outside_files(base)
    work = store.task_path(rec, "work")
    env = {"work": work, "outside": outside, "sentinel": sentinel, "contents": [], "files": [],
           "folders": [],
           # the racing process chmods what it finds: keep the sentinel itself out of its reach
           "link_to": sentinel + ".copy" if race else sentinel}
    links: list = []
    for j, node in enumerate(nodes):
        make(os.path.join(work, f"o{j}"), node, env, links)
    link(env, links)
    want = expected(nodes, env, cap)
    before = _inodes_under(work)
    seal(env)  # the folder modes last, as a script's final chmod
    sentinel_before = (os.lstat(sentinel), open(sentinel, "rb").read())
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    outputs = [(f"ch{j}", f"o{j}") for j in range(n)]
    proc = stop = None
    if race:
        targets, folders = _targets(env, nodes)
        ctx = multiprocessing.get_context("fork")
        ready, stop = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_racer, daemon=True, args=(
            work, targets, folders, outside, sentinel, data.draw(st.integers(0, 2**32)), ready, stop))
        proc.start()
        assert ready.wait(WAIT), "the racing process did not start"
    try:
        try:
            result = tasks.collect(rec, outputs)
        except TaskOutputError as e:
            event(f"{'race' if race else 'still'}: TaskOutputError ({_why(str(e))})")
            result = None
            assert str(e).startswith("output "), str(e)
    finally:
        if proc is not None:
            stop.set()
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join()
    try:
        if not race:
            if want is None:
                assert result is None, f"collect accepted what it must refuse: {result}"
            else:
                assert result is not None, "collect refused outputs that are all fine"
        if result is not None:
            event(f"{'race' if race else 'still'}: {len(result)} items")
            got = check_items(store, rec, result, set(env["contents"]), race, before, marker, passwd)
            if not race:
                assert got == want
        assert open(sentinel, "rb").read() == sentinel_before[1], "the file outside work/ changed"
        assert os.lstat(sentinel).st_mode == sentinel_before[0].st_mode, "its mode changed"
    finally:
        for fd in before.values():
            os.close(fd)
        _remove(base)


def _why(message: str) -> str:
    """The kind of refusal in a TaskOutputError's message (for the statistics)."""
    for words in ("a symbolic link", "a FIFO", "a device", "a folder", "hard link", "changed while",
                  "cannot be opened", "cannot be read", "the limit"):
        if words in message:
            return words
    return message[:40]


def _remove(path: str) -> None:
    from flowd.reaper import remove_tree

    problems = remove_tree(path)
    assert not problems, problems


def test_a_hard_link_to_a_file_outside_cannot_be_collected_by_losing_its_name(tmp_path, monkeypatch):
    """What the racing process above can do, made deterministic: work/out is a hard link to
    a file outside; right after flowd opens it, the name in work/ is removed."""
    store, rec = new_task(str(tmp_path))
    outside, sentinel, marker = outside_files(str(tmp_path))
    work = store.task_path(rec, "work")
    os.link(sentinel, os.path.join(work, "out"))
    real_open = os.open

    def open_then_lose_the_name(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if path == "out" and dir_fd is not None:
            os.unlink(os.path.join(work, "out"))  # the racer, at the worst moment
        return fd

    monkeypatch.setattr(os, "open", open_then_lose_the_name)
    try:
        result = TaskStore(store).collect(rec, [("o", "out")])
    except TaskOutputError:
        result = []
    monkeypatch.undo()
    for _, rel in result:
        assert marker not in open(store.task_path(rec, rel), "rb").read(), "a file outside became an item"


# -- idempotent after a crash ---------------------------------------------------------
def _fill(work: str) -> None:
    os.mkdir(os.path.join(work, "many"))
    for name, body in (("b", b"second"), ("a", b"first" * 1000), ("c", b"")):
        with open(os.path.join(work, "many", name), "wb") as f:
            f.write(body)
    with open(os.path.join(work, "one"), "wb") as f:
        f.write(b"single")
    os.chmod(os.path.join(work, "many"), 0o500)


OUTPUTS = [("m", "many"), ("o", "one"), ("n", "none")]


def test_collect_is_idempotent_after_a_crash_at_any_point(tmp_path):
    """A crash at each durability point of a collect (a folder output of three files,
    then a file output, then one not written); the restarted daemon collects again
    and gets exactly what a collect without a crash gets, with no temp file left."""
    store, rec = new_task(str(tmp_path / "clean"))
    _fill(store.task_path(rec, "work"))
    points0 = store.fs.points
    clean = TaskStore(store).collect(rec, OUTPUTS)
    total = store.fs.points - points0
    want = [(ch, open(store.task_path(rec, rel), "rb").read()) for ch, rel in clean]
    assert want == [("m", b"first" * 1000), ("m", b"second"), ("m", b""), ("o", b"single")]
    assert total >= 12  # mkdir, 3 x (create, fsync, rename), fsync, rename, ... fsync out/
    for n in range(1, total + 1):
        base = str(tmp_path / f"crash{n}")
        store, rec = new_task(base)
        _fill(store.task_path(rec, "work"))
        store.fs = Durable(crash_at=n, crash_mode="raise")  # its points count from 0
        with pytest.raises(SimulatedCrash):
            TaskStore(store).collect(rec, OUTPUTS)
        again = RunStore(store.root, Durable())  # the restarted daemon
        rec2 = TaskStore(again)._load_task(rec.dirname)
        assert rec2.attempt == 1
        result = TaskStore(again).collect(rec2, OUTPUTS)
        got = [(ch, open(again.task_path(rec2, rel), "rb").read()) for ch, rel in result]
        assert got == want, f"crash at point {n} of {total}"
        out = again.task_path(rec2, "out")
        assert sorted(os.listdir(out)) == ["1.0", "1.1"], f"crash at point {n}: out/ {os.listdir(out)}"
        for _, rel in result:
            path = again.task_path(rec2, rel)
            assert stat.S_IMODE(os.lstat(path).st_mode) == ITEM_MODE
            assert checksum.check(path) is None
        _remove(base)


def test_what_collect_returns_is_durable_even_after_a_crash_at_any_point(tmp_path):
    """COMMIT comes right after collect, so what collect returns must already survive a
    power loss. Crash (kill -9) at each point of a collect, collect again in the next
    life, then lose every write no fsync covered (tests/crashsim.py's DiskModel):
    every output the second collect returned is still there, whole."""
    from crashsim import DiskModel

    store, rec = new_task(str(tmp_path / "clean"))
    _fill(store.task_path(rec, "work"))
    points0 = store.fs.points
    clean = TaskStore(store).collect(rec, OUTPUTS)
    total = store.fs.points - points0
    want = [(ch, open(store.task_path(rec, rel), "rb").read()) for ch, rel in clean]
    lost = []
    for n in list(range(1, total + 1)) + [None]:
        base = str(tmp_path / f"power{n}")
        store, rec = new_task(base)
        _fill(store.task_path(rec, "work"))
        model = DiskModel(base)  # all of it durable so far
        try:
            if n is not None:
                store.fs = Durable(crash_at=n, crash_mode="raise")
                store.fs.observer = model
                with pytest.raises(SimulatedCrash):
                    TaskStore(store).collect(rec, OUTPUTS)
            fs = Durable()
            fs.observer = model
            again = RunStore(store.root, fs)
            rec2 = TaskStore(again)._load_task(rec.dirname)
            result = TaskStore(again).collect(rec2, OUTPUTS)
            model.crash(None)  # the power goes: every write no fsync covered is gone
            got = []
            for ch, rel in result:
                path = again.task_path(rec2, rel)
                got.append((ch, open(path, "rb").read() if os.path.exists(path) else None))
            if got != want:
                lost.append(f"crash at point {n} of {total}, then a power loss: {got}")
        finally:
            model.close()
        _remove(base)
    assert not lost, "\n".join(lost)


# -- as a non-root user ----------------------------------------------------------------
def run_as_non_root(code: str, tmp: str) -> dict:
    """Run ``code`` (Python) as a non-root user in ``tmp``; returns the JSON it prints last.

    As root: as ``nobody`` (setpriv), with ``tmp`` given to it. Otherwise as
    this user, who is already not root.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO_ROOT,
           "HOME": tmp, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": tmp, "LANG": "C.UTF-8"}
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if ROOT:
        os.chown(tmp, NOBODY, NOBODY)
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] + cmd
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def shared_tmp():
    """A folder a non-root user can own (the pytest tmp_path of root is 0700)."""
    path = tempfile.mkdtemp(prefix="flowd-nonroot-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="already not root: the property test above ran as this user")
def test_the_collect_property_holds_for_a_non_root_daemon(shared_tmp):
    """The property test again as ``nobody`` (the service's daemon is not root):
    permission bits count, and flowd's own unreadable files must still be collected."""
    examples = max(20, EXAMPLES // 2)
    res = run_as_non_root(f"""
        import json, subprocess, sys
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--rootdir", {shared_tmp!r}, "--basetemp", {shared_tmp!r} + "/pt",
                            {os.path.join(REPO_ROOT, "tests", "test_collect.py")!r},
                            "-k", "test_collect_makes_only_safe_new_copies_of_checked_files"],
                           capture_output=True, text=True,
                           env=dict(__import__("os").environ, FLOWD_COLLECT_EXAMPLES="{examples}"))
        print(json.dumps({{"rc": p.returncode, "out": p.stdout[-6000:] + p.stderr[-3000:]}}))
        """, shared_tmp)
    assert res["rc"] == 0 and "1 passed" in res["out"], res["out"]


def test_a_non_root_daemon_collects_its_own_unreadable_outputs_and_removes_the_task(shared_tmp):
    """As the service runs it: a script running as flowd's uid made its output 0000
    and its output folder 0500 (with a 0000 file and a 0 folder beside); flowd
    collects them, and then deletes the task folder whole."""
    res = run_as_non_root("""
        import json, os, stat
        from flowd.fsops import Durable
        from flowd.reaper import remove_tree
        from flowd.store import RunStore
        from flowd.taskstore import TaskStore
        from flowd import checksum
        fs = Durable()
        store = RunStore.layout(os.path.abspath("run"), fs, [])
        rec = TaskStore(store).claim("process", "p", "s1", [])
        TaskStore(store).set_attempt(rec, 1)
        work = store.task_path(rec, "work")
        with open(os.path.join(work, "shut"), "wb") as f:
            f.write(b"mine")
        os.chmod(os.path.join(work, "shut"), 0)
        os.mkdir(os.path.join(work, "dir"))
        for n, body in (("x", b"x1"), ("y", b"y2")):
            with open(os.path.join(work, "dir", n), "wb") as f:
                f.write(body)
        os.chmod(os.path.join(work, "dir", "y"), 0)
        os.chmod(os.path.join(work, "dir"), 0o500)
        os.mkdir(os.path.join(work, "junk"))
        os.mkdir(os.path.join(work, "junk", "deep"))
        with open(os.path.join(work, "junk", "deep", "f"), "wb") as f:
            f.write(b"junk")
        os.chmod(os.path.join(work, "junk", "deep"), 0)
        os.chmod(os.path.join(work, "junk"), 0o500)
        result = TaskStore(store).collect(rec, [("a", "shut"), ("b", "dir")])
        items = []
        for ch, rel in result:
            p = store.task_path(rec, rel)
            st = os.lstat(p)
            items.append([ch, open(p, "rb").read().decode(), st.st_uid == os.geteuid(),
                          stat.S_IMODE(st.st_mode), st.st_nlink, checksum.check(p)])
        problems = remove_tree(store.task_path(rec))
        print(json.dumps({"uid": os.geteuid(), "items": items, "problems": problems,
                          "left": os.path.lexists(store.task_path(rec))}))
        """, shared_tmp)
    assert res["uid"] != 0
    assert res["items"] == [["a", "mine", True, 0o640, 1, None], ["b", "x1", True, 0o640, 1, None],
                            ["b", "y2", True, 0o640, 1, None]]
    assert res["problems"] == [] and res["left"] is False


def test_a_non_root_daemon_collects_or_refuses_an_unsearchable_output_folder(shared_tmp):
    """A script ran ``chmod -R 444 out`` (a folder flowd can list but not enter)."""
    res = run_as_non_root("""
        import json, os
        from flowd.fsops import Durable
        from flowd.collect import TaskOutputError
        from flowd.store import RunStore
        from flowd.taskstore import TaskStore
        store = RunStore.layout(os.path.abspath("run"), Durable(), [])
        rec = TaskStore(store).claim("process", "p", "s1", [])
        TaskStore(store).set_attempt(rec, 1)
        work = store.task_path(rec, "work")
        os.mkdir(os.path.join(work, "out"))
        with open(os.path.join(work, "out", "f"), "wb") as f:
            f.write(b"data")
        os.chmod(os.path.join(work, "out", "f"), 0o444)
        os.chmod(os.path.join(work, "out"), 0o444)
        try:
            got = [open(store.task_path(rec, rel), "rb").read().decode()
                   for _, rel in TaskStore(store).collect(rec, [("o", "out")])]
        except TaskOutputError as e:
            got = "refused: " + str(e)
        except OSError as e:
            got = type(e).__name__
        print(json.dumps({"got": got}))
        """, shared_tmp)
    assert res["got"] == ["data"] or res["got"].startswith("refused: output out/f "), res


# -- remove_tree and the reaper as a non-root user ------------------------------------------
REMOVE_SCRIPT = """
    import json, logging, os, stat
    from flowd import fsops, reaper
    records = []
    class Keep(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())
    logging.getLogger("flowd.fsops").addHandler(Keep())
    logging.getLogger("flowd.fsops").setLevel(logging.DEBUG)
    base = os.getcwd()
    out = {"uid": os.geteuid()}

    # what must never be touched: a folder and a file outside, reached by links
    outside = os.path.join(base, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "keep"), "wb") as f:
        f.write(b"keep")
    os.chmod(outside, 0o755)
    def outside_state():
        st = os.lstat(os.path.join(outside, "keep"))
        return [sorted(os.listdir(outside)), open(os.path.join(outside, "keep"), "rb").read().decode(),
                stat.S_IMODE(os.lstat(outside).st_mode), stat.S_IMODE(st.st_mode)]
    out["outside_before"] = outside_state()

    # a tree a script could leave
    t = os.path.join(base, "tree")
    os.mkdir(t)
    for d, mode in (("shut", 0), ("ro", 0o500), ("rx", 0o555), ("wx", 0o300)):
        p = os.path.join(t, d)
        os.mkdir(p)
        os.mkdir(os.path.join(p, "sub"))
        with open(os.path.join(p, "sub", "f"), "wb") as f:
            f.write(b"f")
        with open(os.path.join(p, "g"), "wb") as f:
            f.write(b"g")
        os.chmod(os.path.join(p, "g"), 0)
        os.chmod(os.path.join(p, "sub"), mode)
        os.chmod(p, mode)
    os.symlink(outside, os.path.join(t, "to-outside"))
    os.symlink(os.path.join(outside, "keep"), os.path.join(t, "to-file"))
    os.mkfifo(os.path.join(t, "fifo"))
    fd = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
    sealed = []
    for i in range(2000):  # 2,000 levels: a path of 4,000 characters and more
        os.mkdir("d", 0o700, dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if i % 500 == 499:
            os.symlink(outside, "link", dir_fd=nfd)
            sealed.append(nfd)  # made 0500 at the end: its entries cannot go until made writable
        if fd not in sealed:
            os.close(fd)
        fd = nfd
    os.mkfifo("fifo", dir_fd=fd)
    if fd not in sealed:
        os.close(fd)
    for sfd in sealed:
        os.fchmod(sfd, 0o500)
        os.close(sfd)
    os.chmod(t, 0o500)
    out["tree_problems"] = reaper.remove_tree(t)
    out["tree_left"] = os.path.lexists(t)
    out["outside_after"] = outside_state()

    # a folder with another uid's folder in it (made by root before this ran)
    stuck = os.path.join(base, "stuck")
    if not os.path.exists(stuck):
        print(json.dumps(out))
        raise SystemExit(0)
    out["stuck_problems"] = reaper.remove_tree(stuck)
    out["stuck_left"] = sorted(os.listdir(stuck)) if os.path.exists(stuck) else None

    # the same through Durable.rmtree without a reaper: never raises, logs it
    fs = fsops.Durable()
    fs.rmtree(os.path.join(base, "stuck2"))
    out["rmtree_logged"] = [m for m in records if "stuck2" in m]

    # and with a reaper: into the trash at once, left there, logged once
    records.clear()
    trash = os.path.join(base, "trash")
    fs.reaper = reaper.Reaper(trash)
    fs.reaper.start()
    fs.rmtree(os.path.join(base, "stuck3"))
    out["stuck3_gone_from_place"] = not os.path.lexists(os.path.join(base, "stuck3"))
    out["idle1"] = fs.reaper.idle(120)
    for k in range(3):  # later deletions wake the reaper again
        p = os.path.join(base, f"fine{k}")
        os.mkdir(p)
        os.mkdir(os.path.join(p, "x"))
        os.chmod(os.path.join(p, "x"), 0)
        fs.rmtree(p)
        out.setdefault("idle_more", []).append(fs.reaper.idle(120))
    out["fine_left"] = [os.path.lexists(os.path.join(base, f"fine{k}")) for k in range(3)]
    out["trash"] = [sorted(os.listdir(os.path.join(trash, n))) for n in sorted(os.listdir(trash))]
    out["reaper_logged"] = records[:]
    fs.reaper.close()
    print(json.dumps(out))
"""


def _another_users_folder(base: str, name: str) -> str:
    """``base/name`` (the non-root user's) holding ``own`` (another uid's, 0755) with a file."""
    top = os.path.join(base, name)
    own = os.path.join(top, "own")
    os.makedirs(own)
    with open(os.path.join(own, "f"), "wb") as f:
        f.write(b"theirs")
    with open(os.path.join(top, "mine"), "wb") as f:
        f.write(b"mine")
    os.chmod(own, 0o755)
    os.chown(os.path.join(own, "f"), FOREIGN, FOREIGN)
    os.chown(own, FOREIGN, FOREIGN)
    for p in (top, os.path.join(top, "mine")):
        os.chown(p, NOBODY, NOBODY)
    return own


def test_remove_tree_as_non_root_removes_what_it_can_and_reports_the_rest(shared_tmp):
    """As a non-root daemon: a tree of 0000, 0500, 0555 and 0300 folders, 2,000 levels
    deep, with links to outside and a FIFO, goes whole, and nothing outside is touched.
    As root, also: another uid's folder that cannot go is reported (never raised), and
    Durable.rmtree logs it, or with a reaper leaves it in the trash and logs it once."""
    if ROOT:
        for name in ("stuck", "stuck2", "stuck3"):
            _another_users_folder(shared_tmp, name)
    res = run_as_non_root(REMOVE_SCRIPT, shared_tmp)
    assert res["uid"] != 0
    # a 0000/0500/0555/0300 tree, 2,000 levels deep, links and a FIFO: all gone
    assert res["tree_problems"] == [] and res["tree_left"] is False
    # the links were not followed: what they pointed at is as it was
    assert res["outside_after"] == res["outside_before"] == [["keep"], "keep", 0o755, 0o644]
    if not ROOT:
        return  # no other uid to give a folder to
    # another uid's folder: described, not raised; what could go went
    assert len(res["stuck_problems"]) == 1 and "own/f" in res["stuck_problems"][0], res
    assert "Permission denied" in res["stuck_problems"][0]
    assert res["stuck_left"] == ["own"]
    assert os.path.exists(os.path.join(shared_tmp, "stuck", "own", "f"))
    assert len(res["rmtree_logged"]) == 1 and "could not delete" in res["rmtree_logged"][0]
    # with the reaper: moved to the trash at once, left there, logged once
    assert res["stuck3_gone_from_place"] and res["idle1"] and all(res["idle_more"])
    assert res["fine_left"] == [False, False, False]
    assert res["trash"] == [["own"]]  # what is left is only the other uid's folder
    assert len(res["reaper_logged"]) == 1, res["reaper_logged"]
    assert "delete it as root" in res["reaper_logged"][0]



# -- output@split="lines" (flowd.channelvalues.LineSplitter, Collector._split_one) ----------

def _split(tmp_path, data: bytes, cap: int | None = None, name: str = "t", **kw) -> list[bytes]:
    store, rec = new_task(str(tmp_path / name))
    with open(os.path.join(store.task_path(rec, "work"), "lines"), "wb") as f:
        f.write(data)
    result = TaskStore(store, max_output_bytes=cap, **kw).collect(rec, [("l", "lines", "lines")])
    for rel in _rels(result):
        path = store.task_path(rec, rel)
        assert stat.S_IMODE(os.lstat(path).st_mode) == ITEM_MODE
        assert checksum.check(path) is None
    return [open(store.task_path(rec, rel), "rb").read() for rel in _rels(result)]


def _rels(result) -> list[str]:
    """The items a collect gave, each by its path in the task folder (a split's
    ``Span`` told by its count: its files must be exactly those)."""
    rels = []
    for out in result:
        if isinstance(out, Span):
            folder = out.rel
            rels += [f"{folder}/{split_name(k)}" for k in range(out.count)]
        else:
            rels.append(out[1])
    return rels


@pytest.mark.parametrize("data,want", [
    (b"", []),
    (b"\n", [b""]),
    (b"a", [b"a"]),
    (b"a\nb\n", [b"a", b"b"]),
    (b"a\n\nb", [b"a", b"", b"b"]),
    (b"a\r\nb\r\n", [b"a", b"b"]),
    (b"a\rb\r", [b"a\rb\r"]),
    (b"a\r\r\n", [b"a\r"]),
    (b"\x00\xff\n\xfe", [b"\x00\xff", b"\xfe"]),
])
def test_split_lines_rules(tmp_path, data, want):
    assert _split(tmp_path, data) == want


def test_split_streams_a_line_longer_than_a_chunk_and_many_lines_in_order(tmp_path):
    long = b"x" * (3 * CHUNK + 7)
    assert _split(tmp_path, long + b"\r\n" + long, name="long") == [long, long]
    n = 5000  # several fsync batches
    data = b"".join(b"%d\n" % i for i in range(n))
    assert _split(tmp_path, data, name="many") == [b"%d" % i for i in range(n)]


def test_split_fsyncs_in_batches_not_once_per_line(tmp_path, monkeypatch):
    from flowd import channelvalues

    calls = []
    real = Durable.sync_many
    monkeypatch.setattr(Durable, "sync_many", lambda self, **kw: calls.append(
        len(list(kw.get("files", ())))) or real(self, **kw))
    n = 3 * channelvalues.SPLIT_SYNC_BATCH + 5
    _split(tmp_path, b"".join(b"line %d\n" % i for i in range(n)))
    b = channelvalues.SPLIT_SYNC_BATCH
    file_rounds = [c for c in calls if c][1:]  # the first: the claim's task.json
    assert file_rounds == [b, b, b, 5], file_rounds


def test_split_bounds_and_refusals(tmp_path):
    with pytest.raises(TaskOutputError, match="12 bytes; the limit is 10"):
        _split(tmp_path, b"a\n" * 6, cap=10, name="cap")
    with pytest.raises(TaskOutputError, match="more than 3 lines.*max_split_lines"):
        _split(tmp_path, b"1\n2\n3\n4\n", name="many", max_split_items=3)
    assert _split(tmp_path, b"1\n2\n3\n", name="three", max_split_items=3) == [b"1", b"2", b"3"]
    store, rec = new_task(str(tmp_path / "folder"))
    os.mkdir(os.path.join(store.task_path(rec, "work"), "lines"))
    with pytest.raises(TaskOutputError, match="is a folder"):
        TaskStore(store).collect(rec, [("l", "lines", "lines")])


def test_split_is_idempotent_after_a_crash_at_any_point(tmp_path):
    data = b"one\ntwo\r\n\nthree"
    want = [b"one", b"two", b"", b"three"]
    store, rec = new_task(str(tmp_path / "clean"))
    with open(os.path.join(store.task_path(rec, "work"), "lines"), "wb") as f:
        f.write(data)
    points0 = store.fs.points
    TaskStore(store).collect(rec, [("l", "lines", "lines")])
    total = store.fs.points - points0
    for n in range(1, total + 1):
        base = str(tmp_path / f"crash{n}")
        store, rec = new_task(base)
        with open(os.path.join(store.task_path(rec, "work"), "lines"), "wb") as f:
            f.write(data)
        store.fs = Durable(crash_at=n, crash_mode="raise")
        with pytest.raises(SimulatedCrash):
            TaskStore(store).collect(rec, [("l", "lines", "lines")])
        again = RunStore(store.root, Durable())
        rec2 = TaskStore(again)._load_task(rec.dirname)
        result = TaskStore(again).collect(rec2, [("l", "lines", "lines")])
        got = [open(again.task_path(rec2, rel), "rb").read() for rel in _rels(result)]
        assert got == want, f"crash at point {n} of {total}"
        assert os.listdir(again.task_path(rec2, "out")) == ["1.0"], n
        _remove(base)


def test_a_split_gives_up_when_the_daemon_stops_and_is_collected_whole_later(tmp_path):
    """A daemon that stops does not wait for a split of millions of lines: the
    collect checks between batches, gives up, and the next start collects it all."""
    from flowd.collect import CollectStopped

    store, rec = new_task(str(tmp_path / "t"))
    n = 3000
    with open(os.path.join(store.task_path(rec, "work"), "lines"), "wb") as f:
        f.write(b"".join(b"%d\n" % i for i in range(n)))
    asked = []
    with pytest.raises(CollectStopped):
        TaskStore(store).collect(rec, [("l", "lines", "lines")], stopping=lambda: asked.append(1) or True)
    assert asked and not os.path.exists(store.task_path(rec, "out", "1.0"))
    result = TaskStore(store).collect(rec, [("l", "lines", "lines")])
    assert [open(store.task_path(rec, r), "rb").read() for r in _rels(result)] == \
        [b"%d" % i for i in range(n)]
