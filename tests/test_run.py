"""A run on the real file store with the fake executor: the whole task protocol, no Docker."""
from __future__ import annotations

import os

import pytest
from helpers import proc, wf

from flowd import scheduler as E
from flowd.executor import base as X
from flowd.executor.fake import FakeExecutor
from flowd.fsops import Durable
from flowd.run import Run
from flowd.taskspec import Limits


class Harness:
    def __init__(self, root, w, scripts, run_id="abcdef012345"):
        self.root = str(root)
        self.scripts = scripts
        runs = os.path.join(self.root, "runs")
        os.makedirs(runs, exist_ok=True)
        bundle = os.path.join(self.root, "bundle")
        os.makedirs(bundle, exist_ok=True)
        self.fs = Durable()
        self.path = Run.create(runs, run_id, w, bundle, self.fs, {})
        self.open()

    def open(self, containers=None):
        """(Re)start as a new daemon would; ``containers`` survived the old one."""
        self.events = []
        self.ex = FakeExecutor(self.events.append, self.scripts)
        self.ex.containers.update(containers or {})
        self.run = Run.open(self.path, self.fs, self.ex, Limits())
        self.run.resume()

    def pump(self, capacity=8, limit=None):
        self.run.tick(capacity)
        self.ex.run_pending(limit)
        while self.events:
            self.run.on_result(self.events.pop(0))

    def drain(self, rounds=100):
        for _ in range(rounds):
            self.pump()
            if self.run.finished:
                return self.run.state
        raise AssertionError("run did not end")

    def items(self, channel):
        folder = os.path.join(self.path, "channels", channel)
        return [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))]

    def leftovers(self):
        return os.listdir(os.path.join(self.path, "tasks"))


def count_words(t):
    t.write("counts", str(len(t.read("lines").split())).encode())
    return 0


def test_pipeline_with_fan_out_delivers_every_item_in_order(tmp_path):
    w = wf(channels={"lines": ["a b c", "d e", "f"], "counts": [], "left": [], "right": []},
           processes=[proc("count", "lines", "counts")], muxes=[("counts", "left right")])
    h = Harness(tmp_path, w, {"count": count_words})
    assert h.drain() == E.SUCCEEDED
    assert h.items("left") == [b"3", b"2", b"1"]
    assert h.items("right") == [b"3", b"2", b"1"]
    assert h.items("lines") == [] and h.leftovers() == []


def test_folder_output_gives_one_item_per_file_in_name_order(tmp_path):
    def split(t):
        for i, word in enumerate(t.read("lines").split()):
            t.write(f"words/{i:03d}", word)
        return 0

    w = wf(channels={"lines": ["x y z"], "words": []}, processes=[proc("split", "lines", "words")])
    h = Harness(tmp_path, w, {"split": lambda t: split_bytes(t)})
    assert h.drain() == E.SUCCEEDED
    assert h.items("words") == [b"x", b"y", b"z"]


def split_bytes(t):
    for i, word in enumerate(t.read("lines").split()):
        t.write(f"words/{i:03d}", word)
    return 0


def test_missing_output_gives_no_item_a_filter(tmp_path):
    def keep_even(t):
        n = int(t.read("nums"))
        if n % 2 == 0:
            t.write("even", str(n).encode())
        return 0

    w = wf(channels={"nums": ["1", "2", "3", "4"], "even": []},
           processes=[proc("filter", "nums", "even")])
    h = Harness(tmp_path, w, {"filter": keep_even})
    assert h.drain() == E.SUCCEEDED
    assert h.items("even") == [b"2", b"4"]


def test_retry_reruns_same_inputs_with_attempt_counting_from_1(tmp_path):
    seen = []

    def flaky(t):
        seen.append((t.read("a"), t.attempt))
        if t.attempt < 3:
            t.write("out", b"partial")  # must not leak out of a failed attempt
            return 1
        t.write("out", b"ok:" + t.read("a"))
        return 0

    w = wf(channels={"a": ["item"], "out": []}, processes=[proc("p", "a", "out", retries=2)])
    h = Harness(tmp_path, w, {"p": flaky})
    assert h.drain() == E.SUCCEEDED
    assert seen == [(b"item", 1), (b"item", 2), (b"item", 3)]
    assert h.items("out") == [b"ok:item"]


def test_exhausted_retries_keep_inputs_as_a_dead_letter_and_stop_the_run(tmp_path):
    w = wf(channels={"a": ["one", "two"], "out": []}, processes=[proc("p", "a", "out", retries=1)])
    h = Harness(tmp_path, w, {"p": lambda t: 3})
    assert h.drain() == E.FAILED
    failed = os.listdir(os.path.join(h.path, "failed"))
    assert len(failed) == 1
    kept = os.listdir(os.path.join(h.path, "failed", failed[0], "in"))
    assert len(kept) == 1
    assert h.items("a") == [b"two"]  # never started: still queued
    d = h.run.view.detail()
    assert d["failures"][0]["attempts"] == 2
    assert "exit status 3" in d["failures"][0]["reason"]
    assert "fake p" in d["failures"][0]["log_tail"]


def test_continue_goes_on_and_succeeds_with_failures_counted(tmp_path):
    def odd_fails(t):
        n = int(t.read("a"))
        if n % 2:
            return 1
        t.write("out", b"%d" % n)
        return 0

    w = wf(channels={"a": ["1", "2", "3", "4"], "out": []},
           processes=[proc("p", "a", "out", on_failure="continue")])
    h = Harness(tmp_path, w, {"p": odd_fails})
    assert h.drain() == E.SUCCEEDED
    assert h.items("out") == [b"2", b"4"]
    assert h.run.view.summary()["tasks_failed"] == 2


def test_stop_failure_kills_other_running_tasks_and_keeps_their_inputs(tmp_path):
    w = wf(channels={"a": ["bad", "x", "y"], "out": []},
           processes=[proc("p", "a", "out", parallel=3)])
    h = Harness(tmp_path, w, {"p": lambda t: 1 if t.read("a") == b"bad" else 0})
    h.run.tick(8)
    h.ex.run_pending(limit=1)  # only "bad" finishes; the other two are still running
    while h.events:
        h.run.on_result(h.events.pop(0))
    assert len(h.ex.killed) == 2
    assert h.run.state == E.FAILED
    assert h.items("a") == [b"x", b"y"]
    assert h.leftovers() == []


def test_cancel_stops_containers_and_keeps_data(tmp_path):
    w = wf(channels={"a": ["1", "2"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {})
    h.run.tick(8)
    h.run.cancel()
    assert h.ex.killed == [(h.run.id, "1")]
    while h.events:
        h.run.on_result(h.events.pop(0))
    assert h.run.state == E.CANCELLED
    assert h.items("a") == [b"1", b"2"]


@pytest.mark.parametrize("make_bad", ["symlink", "hardlink", "fifo"])
def test_hostile_outputs_fail_the_task_and_publish_nothing(tmp_path, make_bad):
    sentinel = tmp_path / "sentinel"
    sentinel.write_bytes(b"host secret")

    def hostile(t):
        target = os.path.join(t.spec.workdir, "out")
        if make_bad == "symlink":
            os.symlink(str(sentinel), target)
        elif make_bad == "hardlink":
            os.link(str(sentinel), target)
        else:
            os.mkfifo(target)
        return 0

    w = wf(channels={"a": ["x"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": hostile})
    assert h.drain() == E.FAILED
    assert h.items("out") == []
    assert "bad output" in h.run.view.detail()["failures"][0]["reason"]
    assert sentinel.read_bytes() == b"host secret"


def test_restart_adopts_a_running_task_and_does_not_run_it_twice(tmp_path):
    runs = []

    def once(t):
        runs.append(t.read("a"))
        t.write("out", t.read("a"))
        return 0

    w = wf(channels={"a": ["1", "2"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": once})
    h.run.tick(8)  # task for "1" is claimed and started; the daemon "dies" here
    h.open(containers=h.ex.containers)  # a new daemon: the container is still there
    assert [s.task_id for s in h.ex.adopted] == ["1"]
    assert h.drain() == E.SUCCEEDED
    assert runs == [b"1", b"2"]
    assert h.items("out") == [b"1", b"2"]


def test_restart_reruns_a_claimed_task_whose_container_is_gone(tmp_path):
    w = wf(channels={"a": ["1"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": lambda t: (t.write("out", b"done"), 0)[1]})
    h.run.tick(8)
    h.open()  # the engine lost the container
    assert h.drain() == E.SUCCEEDED
    assert h.items("out") == [b"done"]
    assert any(s.attempt == 1 for s in h.ex.started)


def test_task_spec_gives_the_script_its_inputs_env_and_limits(tmp_path):
    w = wf(channels={"a": ["1"], "out": []},
           processes=[proc("p", "a", "out", timeout=30.0, memory=64 << 20, cpus=0.5,
                           network="bridge", env={"K": "v"})])
    h = Harness(tmp_path, w, {})
    h.run.tick(8)
    (spec,) = h.ex.started
    from flowd.executor.container import container_name
    assert container_name(spec) == f"flowd-{h.run.id}-p-1"
    assert spec.env == {"K": "v", "FLOWD_RUN": h.run.id, "FLOWD_PROCESS": "p",
                        "FLOWD_TASK": "1", "FLOWD_ATTEMPT": "1", "HOME": "/tmp"}
    # by default the container runs as flowd itself, so all it writes is flowd's
    assert spec.user == f"{os.geteuid()}:{os.getegid()}" and spec.group_add == []
    assert [m.target for m in spec.inputs] == ["/task/a"] and spec.inputs[0].read_only
    assert open(spec.inputs[0].source, "rb").read() == b"1"
    assert (spec.timeout, spec.memory, spec.cpus, spec.network) == (30.0, 64 << 20, 0.5, "bridge")
    assert spec.memory_reservation == 64 << 20  # asked for: a cluster reserves it
    from flowd.executor import container as C
    labels = C.labels(spec, spec.spool)
    assert labels[C.LABEL_RUN] == h.run.id and labels[C.LABEL_TASK] == "1"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_item_is_quarantined_never_fed_and_never_deleted(tmp_path, damage):
    fed = []

    def copy(t):
        fed.append(t.read("a"))
        t.write("out", t.read("a"))
        return 0

    w = wf(channels={"a": ["first item", "second item", "third item"], "out": []},
           processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": copy})
    folder = os.path.join(h.path, "channels", "a")
    victim = os.path.join(folder, sorted(os.listdir(folder))[1])
    with open(victim, "r+b") as f:
        if damage == "flip":
            f.seek(3)
            f.write(b"X")
        else:
            f.truncate(4)
    assert h.drain() == E.SUCCEEDED
    assert fed == [b"first item", b"third item"]  # the damaged one never reached a script
    assert h.items("out") == [b"first item", b"third item"]
    (q,) = h.run.view.detail()["quarantined"]
    assert q["channel"] == "a" and q["process"] == "p"
    assert ("checksum mismatch" if damage == "flip" else "truncated") in q["reason"]
    kept = os.path.join(h.path, "quarantine", os.path.basename(victim))
    assert os.path.exists(kept) and os.path.exists(kept + ".json")  # kept, with its reason
    h.open()  # a restart still knows it
    assert len(h.run.view.detail()["quarantined"]) == 1


@pytest.mark.parametrize("planted", ["no-stamp", "symlink", "setuid", "world-writable"])
def test_an_input_that_is_not_an_item_flowd_made_is_never_mounted(tmp_path, planted):
    """An input is mounted only as a regular file flowd owns, with its stamp (issue 8 #2)."""
    from flowd import checksum

    fed = []

    def copy(t):
        fed.append(t.read("a"))
        t.write("out", t.read("a"))
        return 0

    w = wf(channels={"a": ["first", "second", "third"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": copy})
    folder = os.path.join(h.path, "channels", "a")
    victim = os.path.join(folder, sorted(os.listdir(folder))[1])
    if planted == "no-stamp":
        os.removexattr(victim, checksum.XATTR)
    elif planted == "symlink":
        outside = tmp_path / "host-file"
        outside.write_bytes(b"secret")
        os.unlink(victim)
        os.symlink(outside, victim)
    elif planted == "setuid":
        os.chmod(victim, 0o4755)
    else:
        os.chmod(victim, 0o666)
    assert h.drain() == E.SUCCEEDED
    assert fed == [b"first", b"third"]  # never given to a script
    (q,) = h.run.view.detail()["quarantined"]
    assert q["channel"] == "a"
    assert {"no-stamp": "no checksum stamp", "symlink": "not a regular file", "setuid": "mode 4755",
            "world-writable": "mode 666"}[planted] in q["reason"]


def test_task_outputs_and_pushed_items_carry_a_checksum(tmp_path):
    from flowd import checksum

    w = wf(channels={"a": ["x"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": lambda t: (t.write("out", b"made by the task"), 0)[1]})
    assert h.drain() == E.SUCCEEDED
    folder = os.path.join(h.path, "channels", "out")
    (name,) = os.listdir(folder)
    path = os.path.join(folder, name)
    assert checksum.check(path) is None and os.getxattr(path, checksum.XATTR)
    with open(path, "r+b") as f:
        f.write(b"M")
    assert "checksum mismatch" in checksum.check(path)


def test_a_long_mux_move_is_done_in_slices_in_order(tmp_path):
    """A tick out of time gives the loop back (``more``) and the next one goes
    on where it stopped: items through a merge-and-copy mux, FIFO kept."""
    import flowd.run as R

    n = 2 * R.MOVE_SLICE + 10
    items = [str(i) for i in range(n)]
    w = wf(channels={"a": items[:n // 2], "b": items[n // 2:], "x": [], "y": []}, processes=[],
           muxes=[("a b", "x y")])
    h = Harness(tmp_path, w, {})
    h.run.tick_budget = 0.0  # every tick runs out of time after one slice
    h.run.tick(8)
    assert h.run.more and h.run.state == E.RUNNING
    assert len(h.items("x")) == R.MOVE_SLICE  # one slice, not the whole channel
    ticks = 1
    while h.run.more:
        h.run.tick(8)
        ticks += 1
    assert ticks == 3
    assert h.run.state == E.SUCCEEDED
    want = [i.encode() for i in items]
    assert h.items("x") == want and h.items("y") == want
    # A fan-out copies no bytes: each item's two copies are one file (docs/format.md, mux).
    xs, ys = (sorted(os.listdir(os.path.join(h.path, "channels", c))) for c in "xy")
    assert all(os.path.samefile(os.path.join(h.path, "channels", "x", a),
                                os.path.join(h.path, "channels", "y", b)) for a, b in zip(xs, ys))
    assert h.items("a") == [] and h.items("b") == [] and h.leftovers() == []


def test_done_counts_survive_a_restart(tmp_path):
    w = wf(channels={"lines": ["a b c", "d e", "f"], "counts": []},
           processes=[proc("count", "lines", "counts")])
    h = Harness(tmp_path, w, {"count": count_words})
    h.pump(limit=1)  # one task done, then the daemon stops
    assert [p["done"] for p in h.run.view.detail()["processes"]] == [1]
    h.open(containers=dict(h.ex.containers))
    assert [p["done"] for p in h.run.view.detail()["processes"]] == [1]
    assert h.drain() == E.SUCCEEDED
    h.open()
    assert h.run.view.summary()["tasks_done"] == 3
    assert [p["done"] for p in h.run.view.detail()["processes"]] == [3]


def test_a_lost_attempt_runs_again_in_an_empty_work_folder_and_its_files_are_never_collected(tmp_path):
    """A task whose container was lost (a Swarm node drained or gone: MISSING)
    runs again as the same attempt; what the lost one wrote is not its output."""
    seen = []

    def lost_once(t):
        seen.append((t.attempt, sorted(os.listdir(t.spec.workdir))))
        if len(seen) == 1:
            t.write("out", b"from the lost container")
            return X.MISSING
        return 0  # writes nothing: a filter that passes no item

    w = wf(channels={"a": ["item"], "out": []}, processes=[proc("p", "a", "out")])
    h = Harness(tmp_path, w, {"p": lost_once})
    assert h.drain() == E.SUCCEEDED
    assert seen == [(1, []), (1, [])]  # the same attempt, both in an empty work/
    assert h.items("out") == []


@pytest.mark.parametrize("default_memory,reserved", [(None, None), (256 << 20, 256 << 20)])
def test_a_process_without_memory_has_the_cap_as_its_limit_and_reserves_only_default_memory(
        tmp_path, default_memory, reserved):
    w = wf(channels={"a": ["1"]}, processes=[proc("p", "a")])
    h = Harness(tmp_path, w, {})
    h.run.limits = Limits(default_memory=default_memory or 8 << 30, reserved_memory=default_memory)
    h.run.tick(8)
    (spec,) = h.ex.started
    assert (spec.memory, spec.memory_reservation) == (default_memory or 8 << 30, reserved)


def test_logs_of_one_task_among_many_are_found_by_name(tmp_path, monkeypatch):
    """A run with thousands of task logs: ``logs --task`` lists that task's
    attempts (a finished one, then the running one), without reading the folder."""
    w = wf(channels={"a": ["x"], "b": []}, processes=[proc("p", "a", "b", retries=2)])
    h = Harness(tmp_path, w, {"p": lambda t: 0})
    logs = os.path.join(h.path, "logs")
    for task in range(1, 3001):
        with open(os.path.join(logs, f"p.p.{task}.1.log"), "wb") as f:
            f.write(b"done\n")
    with open(os.path.join(logs, ".p.p.1234.2.log.live"), "wb") as f:
        f.write(b"running\n")
    assert len(h.run.view.logs()) == 3001  # all of them, the running one last
    monkeypatch.setattr(os, "listdir", lambda *a: pytest.fail("logs --task listed the folder"))
    got = h.run.view.logs(task="1234")
    assert [(e["task"], e["attempt"], e["running"], e["size"]) for e in got] == \
        [("1234", 1, False, 5), ("1234", 2, True, 8)]
    assert h.run.view.logs("p", task="77")[0]["name"] == "p.p.77.1.log"
    assert h.run.view.logs(task="99999") == []


def test_a_split_bigger_than_a_slice_is_applied_a_slice_a_tick_and_read_meanwhile(tmp_path, monkeypatch):
    """A split of more lines than APPLY_SLICE: its COMMIT is one entry (a count, not
    a list of its items); its items reach the channel a slice a tick, each slice
    read at once (the next process starts on the first lines while later ones
    still move); a restart half-way applies the rest. Every line once, in order."""
    import json

    import flowd.run as R

    monkeypatch.setattr(R, "APPLY_SLICE", 7)
    n = 50

    def lines(t):
        t.write(t.spec.outputs[0], "".join(f"{i}\n" for i in range(n)).encode())
        return 0

    def q(t):
        t.write(t.spec.outputs[0], b"q" + t.read("mid"))
        return 0

    w = wf(channels={"a": ["go"], "mid": [], "out": []},
           processes=[proc("p", "a", "mid"), proc("q", "mid", "out")])
    w.processes["p"].outputs[0].split = "lines"
    h = Harness(tmp_path, w, {"p": lines, "q": q})
    h.run.tick_budget = 0.0  # a slice a tick
    h.pump()  # p runs and commits
    [task] = h.leftovers()
    with open(os.path.join(h.path, "tasks", task, "COMMIT"), "rb") as f:
        assert [e[3] for e in json.load(f)["outputs"]] == [n]  # one entry: its count
    assert h.items("mid") == []
    h.pump()  # the first slice, and q's first task on it
    assert len(h.items("mid")) + len(h.items("out")) == 7 and h.items("out") == [b"q0"]
    h.pump()
    assert task in h.leftovers()  # p's task is still being applied
    h.open(containers=dict(h.ex.containers))  # a restart half-way: the rest is applied
    assert h.drain() == E.SUCCEEDED
    assert h.items("out") == [b"q%d" % i for i in range(n)]
    assert h.items("mid") == [] and h.leftovers() == []
