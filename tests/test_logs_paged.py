"""`flowctl logs` of a big run pages through the run's trace (flowd/logpage.py):
every log, in the order the attempts ended, across pages; a follow prints a log
that ends after it started once; an attempt the cache answered (no container,
no log) is skipped; and the logs folder is never listed for a run with a trace.

In-process (tests/inprocess.py): the daemon's real socket and loop, flowctl's
own cmd_logs, the fake executor (what it stands for, logs of real containers
paged the same way, is in test_features.py: test_logs_show_what_the_script_printed,
test_logs_follow_prints_lines_while_the_script_runs)."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import pytest

from flowctl.cli import cmd_logs
from flowd import logpage
from flowd import trace as T
from flowd.executor import base as X
from test_cache_unit import make_cache, run_once, workflow
from test_daemon_inprocess import Harness

MANY = 130  # items: three pages of PAGE (below)
PAGE = 50


def batch(n: int, retries: int = 0) -> str:
    items = "".join(f"<item>{i}</item>" for i in range(n))
    return f"""\
    <workflow name="many">
      <channel name="in">{items}</channel>
      <channel name="out"/>
      <process name="upper" image="flowd/busybox" retries="{retries}" parallel="8">
        <input channel="in"/>
        <output channel="out"/>
        <script>cp in out</script>
      </process>
    </workflow>
"""


class Out(io.BytesIO):
    """What cmd_logs writes to stdout (bytes), readable while it runs."""


def logs_args(run: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"run": run, "process": None, "task": None, "follow": False,
                                 "json": False, **kw})


class Stdout:
    """sys.stdout, once ``on()`` (in the test's body: pytest's capture sets its own
    around fixtures): what cmd_logs writes, readable while it runs."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.out = Out()
        self.text = io.TextIOWrapper(self.out, encoding="utf-8", write_through=True)

    def on(self) -> None:
        self.monkeypatch.setattr(sys, "stdout", self.text)

    def getvalue(self) -> bytes:
        return self.out.getvalue()

    def clear(self) -> None:
        self.out.seek(0)
        self.out.truncate()


@pytest.fixture
def stdout(monkeypatch):
    return Stdout(monkeypatch)


@pytest.fixture
def no_listing(monkeypatch):
    """Listing a run's logs folder fails the test (os.listdir, os.scandir)."""
    real_listdir, real_scandir = os.listdir, os.scandir

    def guard(real):
        def call(path=".", *a):
            if not isinstance(path, int) and os.path.basename(os.path.normpath(os.fsdecode(path))) == "logs":
                raise AssertionError(f"the logs folder {path} was listed")
            return real(path, *a)
        return call

    def on():
        monkeypatch.setattr(os, "listdir", guard(real_listdir))
        monkeypatch.setattr(os, "scandir", guard(real_scandir))
    return on


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, scripts={"upper": flaky})
    yield harness
    harness.close()


def flaky(t):
    """Every 7th item fails its first attempt: attempts end out of task order."""
    x = t.read("in")
    if int(x) % 7 == 3 and t.spec.attempt == 1:
        return 1
    t.write("out", x)
    return 0


def headers(text: str) -> list[tuple[str, str, int]]:
    out = []
    for line in text.splitlines():
        if line.startswith("==> "):
            proc, _, task, _, attempt, _ = line[4:].split()
            out.append((proc, task, int(attempt)))
    return out


def test_a_run_of_more_attempts_than_a_page_prints_every_log_in_the_order_they_ended(
        h, stdout, no_listing, monkeypatch):
    monkeypatch.setattr(logpage, "PAGE_ENTRIES", PAGE)
    pages = []
    real_page = logpage.page
    monkeypatch.setattr(logpage, "page", lambda *a: pages.append(real_page(*a)) or pages[-1])
    run = h.submit(batch(MANY, retries=1))
    while h.d.executor.pending:  # the containers started together end last first
        h.d.executor.pending.reverse()
        h.d.executor.run_pending()
        h.step(2)
    assert h.state(run) == "succeeded"
    root = os.path.join(h.d.cfg.spool, "runs", run)
    ended = [(r["process"], r["task"], r["attempt"]) for r in T.read_all(root)]
    files = os.listdir(os.path.join(root, "logs"))
    assert len(ended) == len(files) == MANY + len(range(3, MANY, 7))  # the failed ones twice
    assert ended != sorted(ended, key=lambda e: (int(e[1]), e[2]))  # not in task order
    no_listing()
    stdout.on()
    h.client(lambda c: cmd_logs(c, logs_args(run)))
    text = stdout.getvalue().decode()
    assert headers(text) == ended
    assert text.count("fake upper task") == len(ended)  # each log's text, once
    assert len(pages) == 3 and [len(p["logs"]) for p in pages] == [PAGE, PAGE, len(ended) - 2 * PAGE]
    assert [p["more"] for p in pages] == [True, True, False]
    # --json: the same logs, as docs/flowctl.md shows them
    stdout.clear()
    h.client(lambda c: cmd_logs(c, logs_args(run, json=True)))
    listed = json.loads(stdout.getvalue())
    assert listed["run"] == run
    assert [(e["process"], e["task"], e["attempt"]) for e in listed["logs"]] == ended
    assert {e["name"] for e in listed["logs"]} == set(files)
    assert not any(e["running"] for e in listed["logs"])
    # one process's logs (all of them here), and a process the run has not
    h.client(lambda c: cmd_logs(c, logs_args(run, process="upper", json=True)))
    with pytest.raises(Exception, match="no process 'nosuch'"):
        h.client(lambda c: cmd_logs(c, logs_args(run, process="nosuch")))


def test_follow_prints_a_log_that_ends_after_it_started_once(tmp_path, stdout, no_listing):
    def ends(t):  # the container's end: its live log becomes its final one, then more
        live = X.live_log_path(t.spec.log_path)
        kept = b""
        if os.path.exists(live):  # someone followed it
            with open(live, "rb") as f:
                kept = f.read()
        with open(t.spec.log_path, "wb") as f:
            f.write(kept + b"LIVE-2\n")
        if kept:
            os.unlink(live)
        t.write("out", b"x")
        return 0

    h = Harness(tmp_path, scripts={"upper": ends})
    try:
        run = h.submit(batch(2))
        h.step()
        first, spec = h.d.executor.started
        h.d.executor.run_pending(1)  # the first task ends before the follow starts
        h.step(2)
        with open(X.live_log_path(spec.log_path), "wb") as f:
            f.write(b"LIVE-1\n")
        no_listing()
        stdout.on()
        step = h.step

        def step_and_end_it_once_its_line_is_shown(*a, **kw):
            deadline = step(*a, **kw)
            if b"LIVE-1" in stdout.getvalue() and h.d.executor.pending:
                h.d.executor.run_pending()  # the task ends only after its live line is shown
            return deadline

        h.step = step_and_end_it_once_its_line_is_shown
        assert h.client(lambda c: cmd_logs(c, logs_args(run, follow=True))) == 0
        assert not h.d.executor.pending and h.state(run) == "succeeded"
        assert stdout.getvalue().decode().splitlines() == [
            f"==> upper task {first.task_id} attempt 1 <==", "LIVE-2",
            f"fake upper task {first.task_id} attempt 1",
            f"==> upper task {spec.task_id} attempt 1 <==", "LIVE-1", "LIVE-2",
            f"fake upper task {spec.task_id} attempt 1"]
    finally:
        h.close()


def test_an_attempt_the_cache_answered_has_no_log_and_is_skipped(tmp_path, no_listing):
    cache = make_cache(tmp_path)
    r = run_once(tmp_path, cache, workflow(["x1", "x2", "x1"]))
    assert [x["started_how"] for x in T.read_all(r.path)] == ["fresh", "fresh", "cached"]
    no_listing()
    got = logpage.page(r.run.view, None, 0)
    assert [(e["task"], e["attempt"], e["running"]) for e in got["logs"]] == [("1", 1, False),
                                                                               ("2", 1, False)]
    assert got["more"] is False and got["next"] == os.path.getsize(os.path.join(r.path, T.TRACE))
    assert logpage.page(r.run.view, None, got["next"]) == {"logs": [], "next": got["next"],
                                                          "more": False}


def test_torn_or_foreign_trace_lines_name_no_log(tmp_path, no_listing):
    cache = make_cache(tmp_path)
    r = run_once(tmp_path, cache, workflow(["x1"]))
    path = os.path.join(r.path, T.TRACE)
    good = open(path, "rb").read()
    bad = [{"task": "1", "process": "../p", "attempt": 1},  # names outside p.PROCESS.TASK.N.log
           {"task": "1/../../x", "process": "p", "attempt": 1},
           {"task": "1", "process": "p", "attempt": "1"}, {"task": "1", "process": "p", "attempt": 0},
           {"task": "1", "process": "p", "attempt": True}]
    with open(path, "ab") as f:
        f.write(b'{"task": "1", "proc\n')  # a line a crash cut short
        f.write(b"".join(json.dumps(b).encode() + b"\n" for b in bad))
        f.write(good)  # the same attempt twice: listed once
        f.write(b'{"task": "1", "process": "p", "attempt": 1')  # being written: not yet read
    no_listing()
    got = logpage.page(r.run.view, None, 0)
    assert [e["name"] for e in got["logs"]] == ["p.p.1.1.log"]
    assert got["more"] is False and got["next"] == os.path.getsize(path) - len(
        b'{"task": "1", "process": "p", "attempt": 1')


def test_a_run_without_a_trace_lists_its_logs_folder_once_per_call(tmp_path):
    """Made by a flowd older than the trace: its logs are still shown."""
    cache = make_cache(tmp_path)
    r = run_once(tmp_path, cache, workflow(["x1", "x2"]))
    os.unlink(os.path.join(r.path, T.TRACE))
    got = logpage.page(r.run.view, None, 0)
    assert sorted(e["name"] for e in got["logs"]) == ["p.p.1.1.log", "p.p.2.1.log"]
    assert got["more"] is False
