"""flowctl trace against the real engine, the daemon run as the unit runs it
(non-root flowd-test, see daemon_fixtures): one record per task attempt with
its outcome, times and the cgroup's figures, kept across a restart.

Waits are for conditions (``submit --wait``), never for durations.
"""
from __future__ import annotations

import csv
import io
import json
import os
import uuid

import pytest

pytestmark = pytest.mark.docker

# A script that holds ~60 MB for a while: the sampler (every 0.2 s) sees it.
HOLD_60M = "x=$(head -c 60000000 /dev/zero | tr '\\0' a); sleep 2; echo ${#x} &gt; out"


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    """Every test here needs the engine (fails under CI without it) and flowd/busybox."""


def workflow(workdir, body: str) -> str:
    folder = os.path.join(workdir, "wf-" + uuid.uuid4().hex[:6])
    os.makedirs(folder)
    path = os.path.join(folder, "workflow.xml")
    with open(path, "w") as f:
        f.write(f'<workflow name="traced">{body}\n</workflow>\n')
    return path


def submit_wait(d, path) -> dict:
    res = d.flowctl("submit", "--wait", "--json", path)
    return json.loads(res.stdout)


def trace_json(d, run, *args) -> list[dict]:
    res = d.flowctl("trace", run, "--json", *args, check=0)
    return [json.loads(line) for line in res.stdout.splitlines()]


BODY = f"""
  <channel name="seed"><item>one</item></channel>
  <channel name="a"/><channel name="b"/><channel name="c"/><channel name="e"/><channel name="w"/>
  <process name="big" image="flowd/busybox" on-failure="continue">
    <input channel="seed"/><output channel="a" as="out"/>
    <script>{HOLD_60M}</script>
  </process>
  <process name="retry" image="flowd/busybox" retries="1" on-failure="continue">
    <output channel="b" as="out"/>
    <script>[ "$FLOWD_ATTEMPT" = 2 ] || {{ echo first try fails; exit 3; }}; echo done &gt; out</script>
  </process>
  <process name="slow" image="flowd/busybox" timeout="1s" on-failure="continue">
    <output channel="c" as="out"/>
    <script>sleep 60; echo late &gt; out</script>
  </process>
  <process name="hog" image="flowd/busybox" memory="16m" on-failure="continue">
    <output channel="e" as="out"/>
    <script>{HOLD_60M}</script>
  </process>
  <process name="kept" image="flowd/busybox" container="warm">
    <output channel="w" as="out"/>
    <script>echo warm &gt; out</script>
  </process>
"""


def test_trace_records_every_attempt(daemon, workdir):
    run = submit_wait(daemon, workflow(workdir, BODY))
    rid = run["run"]["id"] if "run" in run else run["id"]
    rows = trace_json(daemon, rid)
    by = {}
    for r in rows:
        by.setdefault(r["process"], []).append(r)
    assert sorted(by) == ["big", "hog", "kept", "retry", "slow"], rows
    for r in rows:
        assert r["node"] == os.uname().nodename
        assert r["queued_at"] <= r["started_at"] <= r["finished_at"]
        assert r["wait_seconds"] == pytest.approx(r["started_at"] - r["queued_at"], abs=0.002)
        assert r["run_seconds"] == pytest.approx(r["finished_at"] - r["started_at"], abs=0.002)
        assert r["finished"].endswith("Z") and r["finished"][:4].isdigit()

    [big] = by["big"]
    assert (big["state"], big["exit_status"], big["attempt"]) == ("succeeded", 0, 1)
    assert big["started_how"] == "fresh"
    assert big["peak_memory"] > 50_000_000, big
    assert big["cpu_seconds"] > 0, big
    assert big["run_seconds"] >= 2
    assert big["bytes_read"] == 3  # the item "one"
    assert big["bytes_written"] == len("60000000\n")

    first, second = sorted(by["retry"], key=lambda r: r["attempt"])
    assert (first["attempt"], first["state"], first["exit_status"]) == (1, "failed", 3)
    assert first["reason"] == "exit status 3"
    assert (second["attempt"], second["state"]) == (2, "succeeded")
    assert second["queued_at"] >= first["finished_at"] - 0.01

    [slow] = by["slow"]
    assert slow["state"] == "timeout" and "timed out" in slow["reason"], slow
    assert 1 <= slow["run_seconds"] < 30

    [hog] = by["hog"]
    assert hog["state"] == "oom", hog
    assert "memory" in hog["reason"].lower() or "oom" in hog["reason"].lower(), hog
    assert hog["bytes_written"] is None

    [kept] = by["kept"]
    assert (kept["state"], kept["started_how"]) == ("succeeded", "warm")
    assert kept["cpu_seconds"] is None or kept["cpu_seconds"] >= 0

    # --process, --csv and the table agree with --json
    assert [r["task"] for r in trace_json(daemon, rid, "--process", "retry")] == \
        [r["task"] for r in by["retry"]]
    res = daemon.flowctl("trace", rid, "--csv", check=0)
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(table) == len(rows)
    assert {(t["process"], t["attempt"], t["state"]) for t in table} == \
        {(r["process"], str(r["attempt"]), r["state"]) for r in rows}
    text = daemon.flowctl("trace", rid, check=0).stdout.splitlines()
    assert text[0].split()[:4] == ["TASK", "PROCESS", "TRY", "STATE"]
    assert len(text) == 1 + len(rows)


def test_trace_survives_restart_and_skips_a_torn_line(daemon, workdir):
    body = """
  <channel name="o"/>
  <process name="one" image="flowd/busybox" retries="1">
    <output channel="o" as="out"/>
    <script>[ "$FLOWD_ATTEMPT" = 2 ] || exit 7; echo ok &gt; out</script>
  </process>"""
    run = submit_wait(daemon, workflow(workdir, body))
    rid = run["run"]["id"] if "run" in run else run["id"]
    before = trace_json(daemon, rid)
    assert [(r["attempt"], r["state"]) for r in before] == [(1, "failed"), (2, "succeeded")]
    daemon.stop()
    path = os.path.join(daemon.spool, "runs", rid, "trace.jsonl")
    with open(path, "ab") as f:  # what a crash in the middle of an append leaves
        f.write(b'{"task":"9","process":"one","att')
    daemon.start()
    assert trace_json(daemon, rid) == before


def test_a_record_after_a_torn_line_is_read(tmp_path):
    """The next life's first append closes a line a crash cut short: both are
    kept apart, the torn one skipped when read."""
    from types import SimpleNamespace

    from flowd import trace as T
    from flowd.fsops import Durable
    from flowd.store import RunStore

    fs = Durable()
    (tmp_path / T.TRACE).write_bytes(b'{"task":"1","process":"p"}\n{"task":"2","pro')
    run = SimpleNamespace(id="r", fs=fs, store=RunStore(str(tmp_path), fs))
    T.TraceLog(run).append({"task": "3", "process": "p"})
    assert [r["task"] for r in T.read_all(str(tmp_path))] == ["1", "3"]


def test_trace_of_unknown_run_is_a_clear_error(daemon):
    res = daemon.flowctl("trace", "nosuchrun")
    assert res.returncode != 0
    assert "nosuchrun" in res.stderr and "Traceback" not in res.stderr


def test_pages_hold_whole_lines_and_cover_every_record(tmp_path):
    """What the daemon's ``trace`` command reads a page at a time: 20,000
    records in pages of 64 KiB come back whole, once each, in order."""
    from flowd import trace as T

    with open(tmp_path / T.TRACE, "wb") as f:
        for i in range(20_000):
            f.write(json.dumps({"task": str(i), "process": "p" if i % 2 else "q",
                                "reason": "x" * (i % 300)}).encode() + b"\n")
    got, offset, pages = [], 0, 0
    while True:
        data = T.read_chunk(str(tmp_path), offset, 65536)
        if not data:
            break
        assert data.endswith(b"\n") and len(data) <= 65536
        offset += len(data)
        pages += 1
        got += T.parse_lines(data, "p")
    assert pages > 10
    assert [r["task"] for r in got] == [str(i) for i in range(1, 20_000, 2)]
