"""``flowctl events`` and ``flowctl watch`` on the live event stream (flowd/events.py),
against a real daemon and the real engine."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
from daemon_fixtures import env_for_subprocess, on_a_terminal, wait_until
from helpers import write_file as write

from flowctl.client import Client
from flowctl.live import Progress, describe
from flowd import events as E
from flowd.errors import FlowError

pytestmark = pytest.mark.docker

TWO = """<workflow name="two">
  <channel name="in"><item>a</item><item>b</item></channel>
  <channel name="out"/>
  <process name="copy" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>cp in out</script>
  </process>
</workflow>
"""
FAILING = """<workflow name="failing">
  <channel name="in"><item>a</item></channel>
  <channel name="out"/>
  <process name="boom" image="flowd/busybox" retries="1">
    <input channel="in"/><output channel="out"/>
    <script>echo no; exit 3</script>
  </process>
</workflow>
"""
SERVICE = """<workflow name="svc" mode="service">
  <channel name="in"/><channel name="go"/><channel name="out"/>
  <process name="never" image="flowd/busybox">
    <input channel="in"/><input channel="go"/><output channel="out"/>
    <script>cp in out</script>
  </process>
</workflow>
"""


def reader(d, *args):
    """A ``flowctl events`` running in the background."""
    return subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", d.socket, "events", *args],
                            env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stream_of(proc, timeout=120) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def until_subscribed(d, n=1):
    wait_until(lambda: _readers(d) >= n, what="the reader to subscribe")


@contextlib.contextmanager
def client_of(d, timeout=60):
    """An in-process client, closed after (a ZeroMQ context left to the garbage
    collector may block the test process in its term())."""
    c = Client(d.socket, timeout=timeout)
    try:
        yield c
    finally:
        c.close()


def _readers(d) -> int:
    with client_of(d) as c:
        text = c.call("metrics")[0]["text"]
    return int(text.split("\nflowd_event_readers ")[1].split()[0])


def test_the_events_of_a_whole_run_in_order(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    everything = reader(d, "--json")  # no RUN: every run's events, until stopped
    until_subscribed(d)
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "two.xml"), TWO), check=0).stdout.strip()
    mine = stream_of(reader(d, run, "--json"))  # started late: ends with the run, at once
    assert [e["type"] for e in mine] == ["run_finished"] or mine[-1]["type"] == "run_finished"
    d.flowctl("watch", run, check=0)
    everything.terminate()
    evs = [json.loads(line) for line in everything.communicate(timeout=30)[0].splitlines()]
    kinds = [e["type"] for e in evs]
    assert kinds[:2] == ["run_submitted", "run_started"], kinds
    assert kinds[-1] == "run_finished" and evs[-1]["state"] == "succeeded"
    assert sorted(kinds[2:-1]) == ["task_started"] * 2 + ["task_succeeded"] * 2, kinds
    for task in {e["task"] for e in evs if e["type"] == "task_started"}:
        assert [e["type"] for e in evs if e.get("task") == task] == ["task_started", "task_succeeded"]
    assert all(e["run"] == run for e in evs)
    assert evs[0]["workflow"] == "two" and evs[0]["owner"] == "root"
    ok = [e for e in evs if e["type"] == "task_succeeded"]
    assert all(e["process"] == "copy" and e["attempt"] == 1 and e["seconds"] >= 0 for e in ok)
    assert [e["seq"] for e in evs] == sorted(e["seq"] for e in evs)
    as_documented(evs + mine)


def as_documented(evs):
    """Each event has the keys docs/flowctl.md shows for its type, of the same kinds."""
    from test_docs import _doc_json, assert_shape

    doc = {e["type"]: e for e in _doc_json("events")}
    for ev in evs:
        assert_shape(doc[ev["type"]], ev, ev["type"])


def test_a_failing_task_is_retried_then_given_up(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    everything = reader(d, "--json")
    until_subscribed(d)
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "f.xml"), FAILING), check=0).stdout.strip()
    stream_of(reader(d, run, "--json"))  # ends with the run
    everything.terminate()
    evs = [json.loads(line) for line in everything.communicate(timeout=30)[0].splitlines()]
    tasks = [(e["type"], e.get("attempt")) for e in evs if e["type"].startswith("task_")]
    assert tasks == [("task_started", 1), ("task_retried", 1), ("task_started", 2),
                     ("task_failed", 2)], evs
    retried = next(e for e in evs if e["type"] == "task_retried")
    assert retried["process"] == "boom" and "3" in retried["reason"]
    assert evs[-1]["type"] == "run_finished" and evs[-1]["state"] == "failed"
    as_documented(evs)
    # the readable form: one line an event, the run's end last
    text = d.flowctl("events", run, check=0).stdout.splitlines()
    assert text[-1].endswith("finished: failed" + text[-1].split("finished: failed", 1)[1])
    assert f" {run} finished: failed" in text[-1]


def test_item_pushed_and_a_reader_for_a_run_ends_with_it(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "s.xml"), SERVICE), check=0).stdout.strip()
    follow = reader(d, run[:6], "--json")  # a prefix names the run
    until_subscribed(d)
    d.flowctl("push", run, "in", write(os.path.join(workdir, "item"), "x"), check=0)
    assert follow.poll() is None  # a service run goes on: so does its reader
    d.flowctl("cancel", run, check=0)
    evs = stream_of(follow)
    pushed = [e for e in evs if e["type"] == "item_pushed"]
    assert [(e["channel"], e["run"]) for e in pushed] == [("in", run)] and pushed[0]["item"] >= 0
    assert evs[-1]["type"] == "run_finished" and evs[-1]["state"] == "cancelled"
    as_documented(evs)
    assert wait_until(lambda: _readers(d) == 0, what="the ended reader to go")  # gone with its run


def test_a_stopped_reader_gets_lost_and_the_daemon_stays_quick(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "s.xml"), SERVICE), check=0).stdout.strip()
    with client_of(d) as client:
        stopped_reader(d, run, client)


def stopped_reader(d, run, client):
    sub = client.call("events", {"run": run})[0]["sub"]  # opened, then not read (stopped)

    def ping_times(n=30):
        out = []
        for _ in range(n):
            t = time.monotonic()
            client.call("ping")
            out.append(time.monotonic() - t)
        return out

    before = ping_times()
    pushes = E.QUEUE + 300
    for i in range(pushes):
        client.push(run, "in", io.BytesIO(b"%d" % i))
    during = ping_times()
    # a generous bound, not a timing test: a blocked loop would not answer at all
    assert max(during) < max(5.0, 50 * max(before)), (before, during)
    got = []
    while True:
        batch = client.call("events", {"sub": sub})[0]["events"]
        if not batch:
            break
        got += batch
    pushed = [e for e in got if e["type"] == "item_pushed"]
    lost = [e for e in got if e["type"] == "lost"]
    assert len(lost) == 1 and lost[0]["count"] > 0, got[-3:]
    assert len(pushed) + lost[0]["count"] == pushes
    as_documented(lost)
    assert got[-1] == lost[0]  # the gap is where the events were dropped: the newest
    assert [e["seq"] for e in pushed] == sorted(e["seq"] for e in pushed)
    # after the gap the reader follows again
    client.push(run, "in", io.BytesIO(b"late"))
    batch = client.call("events", {"sub": sub, "wait": 10})[0]["events"]
    assert [e["type"] for e in batch] == ["item_pushed"]
    d.flowctl("cancel", run, check=0)


def test_subscriptions_are_capped_per_user(daemon_factory, docker_images):
    d = daemon_factory().start()
    with client_of(d) as client:
        subs = [client.call("events", {})[0]["sub"] for _ in range(E.PER_USER)]
        with pytest.raises(FlowError) as err:
            client.call("events", {})
        assert "too many event readers" in str(err.value)
        assert len(set(subs)) == E.PER_USER
        with pytest.raises(FlowError) as err:  # an id made up (or another user's)
            client.call("events", {"sub": "0" * 16})
        assert err.value.code == "not_found"


def test_watch_follows_the_run_on_the_stream(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "f.xml"), FAILING), check=0).stdout.strip()
    res = d.flowctl("watch", run, check=1)  # not a terminal: plain progress lines on stderr
    assert f"{run}: failed, 0 tasks done, 0 running, 1 failed" in res.stderr
    assert "\x1b" not in res.stderr
    assert f"run       {run}\n" in res.stdout and "state     failed" in res.stdout


def test_watch_on_a_terminal_draws_a_board(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "two.xml"), TWO), check=0).stdout.strip()
    status, out = on_a_terminal([sys.executable, "-m", "flowctl", "--socket", d.socket, "watch", run],
                                whole=True)
    text = out.decode()
    assert status == 0, text
    assert "  copy  [" in text and "  total [" in text  # a bar per process, and the total
    assert "2 done, 0 running, 0 queued, 0 failed" in text  # the last board drawn
    assert "elapsed" in text and "state     succeeded" in text


# -- without a daemon --------------------------------------------------------------

def test_describe_escapes_what_a_container_chose():
    line = describe({"type": "task_failed", "run": "r", "process": "p", "task": "t", "attempt": 2,
                     "reason": "bad \x1b]0;pwned\x07 output", "time": 0})
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line


def test_progress_counts_from_events():
    p = Progress({"state": "running", "elapsed": 1, "name": "w",
                  "processes": [{"name": "a", "done": 0, "running": 0, "queued": 2, "failed": 0}]})
    for ev in [{"type": "task_started", "process": "a", "attempt": 1},
               {"type": "task_retried", "process": "a", "attempt": 1},
               {"type": "task_started", "process": "a", "attempt": 2},
               {"type": "task_failed", "process": "a", "attempt": 2},
               {"type": "task_started", "process": "a", "attempt": 1},
               {"type": "task_succeeded", "process": "a", "attempt": 1},
               {"type": "run_finished", "state": "failed"}]:
        p.apply(ev)
    assert p.procs["a"] == {"done": 1, "running": 0, "queued": 0, "failed": 1}
    assert p.line("r") == "r: failed, 1 tasks done, 0 running, 1 failed"
    assert any("[" in line and "1 done" in line for line in p.board("r"))


def test_a_full_queue_drops_and_counts_and_no_subscriber_costs_nothing():
    hub = E.Hub()
    hub.emit("task_started", "r", process="p", task="t", attempt=1)
    assert hub.seq == 0 and hub.metrics.tasks["p"]["started"] == 1  # counted, nothing queued
    sub = hub.open(1, None, 0.0)
    for i in range(E.QUEUE + 10):
        hub.emit("item_pushed", "r", channel="c", item=i)
    batch, _ = hub.ask(sub, b"peer", "id", 0, 1.0)
    assert len(batch) == E.BATCH
    got = batch
    while batch:
        batch, _ = hub.ask(sub, b"peer", "id", 0, 1.0)
        got += batch
    assert got[-1] == {"type": "lost", "count": 11}
    assert len(got) == E.QUEUE
