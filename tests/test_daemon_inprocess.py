"""The daemon in-process: its real control socket and loop, driven by ``step(now)``
from the test, with the fake executor (scripts are Python functions). No
subprocess, no Docker: submit, status, cancel, push, upload expiry, reload,
disk full and garbage frames, each as a client sees it.

A client call needs the daemon to turn while the client waits: flowctl's
client library runs in a thread (``Harness.client``), or raw frames go
through a DEALER and the test steps until the answer comes (``Raw``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import textwrap
import stat
import threading
import time

import pytest
import zmq

from flowctl.client import Client
from flowd import checksum
from flowd import protocol as P
from flowd.errors import DiskFull, NotFound, UsageError, WorkflowError
from flowd.staging import UPLOAD_MAX_AGE
from inprocess import WAIT, end, new_daemon, write_config


def upper(t):
    t.write("out", t.read("in").upper())
    return 0


class Harness:
    """One daemon on a tmp spool and a short socket path, prepared, not yet stepped."""

    def __init__(self, tmp_path, config: str = "", scripts: dict | None = None):
        self.conf = str(tmp_path / "flowd.toml")
        self.write_config(config)
        self.scripts = {"upper": upper, **(scripts or {})}
        self.d = new_daemon(self.conf, str(tmp_path / "spool"), self.scripts)
        self.d.prepare(signals=False)
        self.tmp = tmp_path

    def write_config(self, text: str) -> None:
        write_config(self.conf, text)

    def step(self, times: int = 1, now: float | None = None) -> float:
        for _ in range(times):
            deadline = self.d.step(time.monotonic() if now is None else now)
        return deadline

    def until(self, cond, what: str):
        end = time.monotonic() + WAIT
        while not cond():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            self.d.control.wait(10)
            self.step()
        return cond()

    def client(self, fn):
        """``fn(Client)`` in a thread while the daemon steps here; its value, or its error."""
        box: dict = {}

        def run():
            c = Client(self.d.socket_path, timeout=WAIT)
            try:
                box["value"] = fn(c)
            except BaseException as e:  # noqa: BLE001 - raised again in the test
                box["error"] = e
            finally:
                c.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.until(lambda: not t.is_alive(), "the client's call")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def submit(self, xml: str) -> str:
        path = str(self.tmp / "workflow.xml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(xml))

        def go(c):
            up = c.upload([("workflow.xml", path)])
            return c.call("submit", {"upload": up, "name": "workflow.xml"})[0]

        return self.client(go)["run"]

    def run_tasks(self) -> None:
        """Run what the executor was given, and let the daemon commit the results."""
        while self.d.executor.pending:
            self.d.executor.run_pending()
            self.step(2)

    def state(self, run: str) -> str:
        return self.client(lambda c: c.call("status", {"run": run}))[0]["run"]["state"]

    def close(self) -> None:
        end(self.d)


class Raw:
    """A DEALER sending raw frames; ``answer`` steps the daemon until the reply comes."""

    def __init__(self, h: Harness):
        self.h = h
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(P.endpoint(h.d.socket_path))

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def reply(self) -> list[bytes] | None:
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def answer(self) -> dict:
        got: list = []

        def came() -> bool:
            if not got:
                frames = self.reply()
                if frames is not None:
                    got.append(frames)
            return bool(got)

        self.h.until(came, "a reply")
        return json.loads(got[0][0])

    def call(self, cmd: str, args: dict | None = None, payload: bytes | None = None) -> dict:
        self.send(P.encode_request(P.new_id(), cmd, args or {}, payload))
        return self.answer()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


@pytest.fixture
def raw(h):
    r = Raw(h)
    yield r
    r.close()


BATCH = """\
    <workflow name="shout">
      <channel name="in"><item>hello</item><item>world</item></channel>
      <channel name="out"/>
      <process name="upper" image="flowd/busybox">
        <input channel="in"/>
        <output channel="out"/>
        <script>tr a-z A-Z &lt; in &gt; out</script>
      </process>
    </workflow>
"""

SERVICE = """\
    <workflow name="echo" mode="service">
      <channel name="in"/>
      <channel name="out"/>
      <process name="upper" image="flowd/busybox">
        <input channel="in"/>
        <output channel="out"/>
        <script>tr a-z A-Z &lt; in &gt; out</script>
      </process>
    </workflow>
"""


def items(h: Harness, run: str, channel: str) -> list[bytes]:
    def go(c):
        out = []
        for it in c.call("items", {"run": run, "channel": channel})[0]["items"]:
            out.append(c.call("read", {"run": run, "channel": channel, "seq": it["seq"]})[1])
        return out

    return h.client(go)


# -- submit and status ---------------------------------------------------------------------
def test_a_submitted_workflow_runs_to_success_and_status_says_so(h):
    run = h.submit(BATCH)
    assert h.state(run) in ("queued", "running")
    listed = h.client(lambda c: c.call("status"))[0]
    assert [r["id"] for r in listed["runs"]] == [run] and listed["disk_ok"] is True
    h.step()
    assert len(h.d.executor.started) == 1  # parallel="1" (the default): one task at a time
    h.run_tasks()
    assert h.state(run) == "succeeded"
    assert items(h, run, "out") == [b"HELLO", b"WORLD"]
    assert h.client(lambda c: c.call("ping"))[0]["runs"] == 1


def test_an_invalid_workflow_is_refused_with_its_problem_and_makes_no_run(h):
    with pytest.raises(WorkflowError) as e:
        h.submit('<workflow name="x"><process name="p"/></workflow>')
    assert e.value.problems and all(p.file == "workflow.xml" for p in e.value.problems)
    assert h.client(lambda c: c.call("status"))[0]["runs"] == []


def test_status_wait_is_answered_when_the_run_ends(h, raw):
    run = h.submit(BATCH)
    raw.send(P.encode_request("w1", "status", {"run": run, "wait": 30}))
    h.step(3)
    assert raw.reply() is None  # the run is not over: the answer waits
    h.run_tasks()
    reply = raw.answer()
    assert reply["id"] == "w1" and reply["result"]["run"]["state"] == "succeeded"


def test_a_run_id_prefix_names_the_run_and_an_unknown_one_is_not_found(h):
    run = h.submit(BATCH)
    assert h.client(lambda c: c.call("status", {"run": run[:5]}))[0]["run"]["id"] == run
    with pytest.raises(NotFound, match="no run matches"):
        h.client(lambda c: c.call("status", {"run": "zzzz"}))


# -- cancel --------------------------------------------------------------------------------
def test_cancel_ends_a_run_and_a_second_cancel_says_why_not(h):
    run = h.submit(SERVICE)
    h.step()
    assert h.state(run) == "running"
    first = h.client(lambda c: c.call("cancel", {"runs": [run[:6]]}))[0]["runs"]
    assert first == [{"id": run, "state": "cancelled", "ok": True}]
    again = h.client(lambda c: c.call("cancel", {"runs": [run]}))[0]["runs"][0]
    assert again["ok"] is False and again["message"]
    assert h.state(run) == "cancelled"


# -- push ----------------------------------------------------------------------------------
def test_a_pushed_item_is_taken_by_the_service_and_its_result_can_be_read(h):
    run = h.submit(SERVICE)
    h.step()
    res = h.client(lambda c: c.push(run, "in", io.BytesIO(b"pushed")))
    assert res["run"] == run and res["channel"] == "in"
    h.step()
    h.run_tasks()
    assert items(h, run, "out") == [b"PUSHED"]
    assert h.state(run) == "running"  # a service stays open for more
    with pytest.raises(UsageError, match="declared"):  # a push ends only when whole
        def short(c):
            begin = c.call("push_begin", {"run": run, "channel": "in", "size": 10})[0]
            c.call("push_chunk", {"push": begin["push"], "offset": 0}, b"half")
            c.call("push_end", {"push": begin["push"], "run": run, "channel": "in"})
        h.client(short)


# -- uploads expire ------------------------------------------------------------------------
def test_an_abandoned_upload_expires_when_its_time_is_up(h, raw, caplog):
    up = raw.call("upload_begin", {"size": 10})["result"]["upload"]
    assert raw.call("upload_chunk", {"upload": up, "path": "a", "offset": 0}, b"half")["ok"]
    folder = os.path.join(h.d.spool, "uploads", up)
    assert os.path.isdir(folder)
    now = time.monotonic()
    deadline = h.step(now=now)
    assert deadline <= now + UPLOAD_MAX_AGE  # the loop wakes for the expiry
    assert os.path.isdir(folder)  # not yet
    with caplog.at_level(logging.INFO, logger="flowd"):
        h.step(now=now + UPLOAD_MAX_AGE + 1)
    assert not os.path.exists(folder)
    assert f"upload {up} of uid {os.getuid()} expired" in caplog.text
    err = raw.call("upload_chunk", {"upload": up, "path": "a", "offset": 4}, b"x")
    assert err["ok"] is False and err["error"]["code"] == "not_found"


# -- reload --------------------------------------------------------------------------------
def test_reload_applies_a_live_key_and_an_invalid_file_changes_nothing(tmp_path, caplog):
    h = Harness(tmp_path, 'max_upload_size = "1k"\n')
    raw = Raw(h)
    try:
        err = raw.call("upload_begin", {"size": 2048})
        assert err["error"]["code"] == "usage" and "max_upload_size" in err["error"]["message"]
        h.write_config('max_upload_size = "4k"\n')
        h.d.reload_requested = True  # what SIGHUP sets
        with caplog.at_level(logging.INFO, logger="flowd"):
            h.step()
        assert "changed: max_upload_size=4096" in caplog.text
        assert raw.call("upload_begin", {"size": 2048})["ok"]
        h.write_config("max_upload_size = [\n")
        h.d.reload_requested = True
        with caplog.at_level(logging.INFO, logger="flowd"):
            h.step()
        assert "the configuration in use is unchanged" in caplog.text
        assert raw.call("upload_begin", {"size": 2048})["ok"]
        assert raw.call("upload_begin", {"size": 8192})["error"]["code"] == "usage"
    finally:
        raw.close()
        h.close()


# -- disk full -----------------------------------------------------------------------------
def test_below_the_free_space_floor_runs_pause_and_uploads_are_refused_until_space_returns(h):
    run = h.submit(BATCH)
    h.d.disk._free = lambda: 0  # the spool reports no free space
    h.d.cfg.min_free_space = 1 << 20
    h.step()
    status = h.client(lambda c: c.call("status"))[0]
    assert status["disk_ok"] is False and status["disk_free"] == 0
    assert "DISK FULL" in h.d.status_line()
    started = len(h.d.executor.started)  # the first item's task, claimed at submit
    h.d.executor.run_pending()
    h.step(3)
    assert len(h.d.executor.started) == started  # the second item is not claimed past the floor
    with pytest.raises(DiskFull, match="min_free_space"):
        h.client(lambda c: c.call("upload_begin", {"size": 10}))
    del h.d.disk._free  # space is back
    h.step()
    assert h.client(lambda c: c.call("status"))[0]["disk_ok"] is True
    h.step()
    h.run_tasks()
    assert h.state(run) == "succeeded"


def test_a_result_that_cannot_be_committed_waits_for_space(h, monkeypatch):
    run = h.submit(BATCH)
    h.step()
    r = h.d.runs[run]
    real = r.on_results
    full = [True]

    def on_results(evs):
        if full[0]:
            e = DiskFull("no space left on the spool")
            e.left = list(evs)  # as Run.on_results says: none of them was taken
            raise e
        return real(evs)

    monkeypatch.setattr(r, "on_results", on_results)
    h.d.disk._free = lambda: 0  # and the spool reports no free space
    h.d.cfg.min_free_space = 1 << 20
    h.d.executor.run_pending()
    h.step(3)
    assert h.d.disk.ok is False and len(h.d.disk.deferred) == 1  # kept, not lost
    assert h.state(run) == "running"
    full[0] = False
    del h.d.disk._free  # space is back: the result is committed
    h.step(2)
    h.run_tasks()
    assert h.d.disk.deferred == [] and h.state(run) == "succeeded"


# -- garbage on the socket -----------------------------------------------------------------
@pytest.mark.parametrize("frames, code", [
    ([b"\xff\xfe not json"], "protocol"),
    ([b"[1, 2]"], "protocol"),
    ([b'{"v": 1, "cmd": "ping"}'], "protocol"),  # no id
    ([b'{"v": 2, "id": "x", "cmd": "ping"}'], "protocol"),
    ([b'{"v": 1, "id": "x", "cmd": "rm -rf"}'], "protocol"),
    ([b'{"v": 1, "id": "x", "cmd": "status", "args": [1]}'], "protocol"),
    ([b'{"v": 1, "id": "x", "cmd": "ping"}', b"a", b"b"], "protocol"),
    ([b'{"v": 1, "id": "x", "cmd": "status", "args": {"run": 5}}'], "usage"),
    ([b'{"v": 1, "id": "x", "cmd": "read", "args": {"run": "r", "channel": "c", "seq": -1}}'],
     "usage"),
    ([b'{"v": 1, "id": "x", "cmd": "upload_chunk", "args": {"upload": "../../etc", '
      b'"path": "a", "offset": 0}}'], "usage"),
])
def test_garbage_frames_get_a_clean_error_and_the_daemon_goes_on(h, raw, frames, code):
    raw.send(frames)
    reply = raw.answer()
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert raw.call("ping")["result"]["pid"] == os.getpid()


def test_a_flood_of_garbage_is_served_a_turn_at_a_time(h, raw):
    for i in range(600):
        raw.send([b"garbage %d" % i])
    got: list = []

    def all_answered() -> bool:
        got.extend(iter(raw.reply, None))
        return len(got) >= 600

    h.until(all_answered, "600 replies")
    assert len(got) == 600
    assert all(json.loads(f[0])["error"]["code"] == "protocol" for f in got)
    assert raw.call("ping")["ok"]


# -- run ids: one owner for submits and drops ---------------------------------------------
def test_a_drop_being_taken_and_a_submit_meanwhile_get_runs_of_different_prefixes(h, monkeypatch):
    """Short prefixes name runs in flowctl. A drop's run id is picked when the drop is
    taken, before its run is made; a submit meanwhile must not get its prefix."""
    from flowd import runids

    drawn = iter(["abcd00000001", "abcd00000002", "ef0100000003"])  # the 2nd shares the 1st's prefix
    real = runids.secrets.token_hex
    monkeypatch.setattr(runids.secrets, "token_hex", lambda n=None: next(drawn) if n == 6 else real(n))
    building, gate = threading.Event(), threading.Event()
    build = h.d.intake._build_bundle

    def held_build(*args):  # the intake's worker, held while the drop's id is picked
        building.set()
        assert gate.wait(WAIT)
        return build(*args)

    h.d.intake._build_bundle = held_build
    src = str(h.tmp / "job.xml")
    with open(src, "w") as f:
        f.write(textwrap.dedent(BATCH))
    os.rename(src, os.path.join(h.d.spool, "incoming", "job.xml"))
    now = time.monotonic()
    end = now + WAIT
    while not building.is_set():  # a stepped clock: the drop settles without sleeping
        assert time.monotonic() < end, "the intake did not take the drop"
        h.step(now=now)
        now += 0.5
        building.wait(0.05)
    submitted = h.submit(BATCH)
    gate.set()
    h.until(lambda: len(h.d.runs) == 2, "the drop's run")
    assert sorted(h.d.runs) == ["abcd00000001", "ef0100000003"] and submitted == "ef0100000003"


def test_status_of_a_run_lists_its_running_tasks_and_their_nodes(h, capsys):
    """`flowctl status RUN` names each running task, and its node when the
    executor runs tasks elsewhere (Swarm: Executor.nodes)."""
    import argparse

    from flowctl.cli import cmd_status
    run = h.submit(BATCH)
    h.step()
    (spec,) = h.d.executor.started
    show = argparse.Namespace(run=run, json=False)
    h.client(lambda c: cmd_status(c, show))
    out = capsys.readouterr().out
    lines = out.split("TASK")[1].splitlines()
    assert "PROCESS" in lines[0] and "NODE" not in lines[0]  # one machine: no node column
    assert lines[1].split()[:3] == [spec.task_id, spec.process, str(spec.attempt)]
    h.d.executor.nodes = lambda: {(run, spec.task_id): "worker-\x1b[2J7"}
    h.client(lambda c: cmd_status(c, show))
    out = capsys.readouterr().out
    lines = out.split("TASK")[1].splitlines()
    assert lines[0].split()[-1] == "NODE" and lines[1].split()[-1] == "worker-\\x1b[2J7"  # escaped
    h.run_tasks()
    h.client(lambda c: cmd_status(c, show))
    assert "TASK" not in capsys.readouterr().out  # nothing runs any more


def test_the_spool_is_swept_at_start_and_now_and_then_keeping_what_runs(h):
    """Containers or Swarm jobs nobody removed (a remove that failed, Moby
    #42789) do not pile up: the daemon sweeps every SWEEP_EVERY seconds."""
    from flowd.daemon import SWEEP_EVERY
    assert len(h.d.executor.sweeps) == 1  # at start
    run = h.submit(BATCH)
    h.step()
    (spec,) = h.d.executor.started
    h.step(now=time.monotonic() + SWEEP_EVERY / 2)
    assert len(h.d.executor.sweeps) == 1
    h.step(now=time.monotonic() + SWEEP_EVERY + 1)
    assert len(h.d.executor.sweeps) == 2 and (run, spec.task_id) in h.d.executor.sweeps[-1]


# -- an upload's files become items as they are ------------------------------------------------
def test_uploaded_files_become_items_with_their_mode_and_a_checksum_that_matches(h, raw):
    """Files sent whole (upload_files) are stamped as they are written, those sent in
    chunks (upload_chunk, or more appended to a file sent whole) when the upload is
    submitted: each item is linked into its channel as it is, and must still be
    mode 0640 with a stamp that matches its bytes. (Its process also waits on
    "go", which nothing fills: the items stay in their channel.)"""
    xml = textwrap.dedent("""\
        <workflow name="files" mode="service">
          <channel name="in">
            <item file="data/small.txt"/><item file="data/grown.txt"/><item file="big.bin"/>
            <item file="data/small.txt"/>
          </channel>
          <channel name="go"/><channel name="out"/>
          <process name="upper" image="flowd/busybox">
            <input channel="in"/><input channel="go"/><output channel="out"/><script>cp in out</script>
          </process>
        </workflow>
        """).encode()
    big = bytes(range(256)) * 800  # two chunks
    up = raw.call("upload_begin", {"size": len(xml) + 3 + 6 + len(big)})["result"]["upload"]
    paths = ["workflow.xml", "data/small.txt", "data/grown.txt"]
    files = [xml, b"one", b"two"]
    sent = raw.call("upload_files", {"upload": up, "paths": paths, "sizes": [len(f) for f in files]},
                    b"".join(files))
    assert sent["ok"], sent
    assert raw.call("upload_chunk", {"upload": up, "path": "data/grown.txt", "offset": 3},
                    b"+++")["ok"]
    for at in (0, len(big) // 2):
        assert raw.call("upload_chunk", {"upload": up, "path": "big.bin", "offset": at},
                        big[at:at + len(big) // 2])["ok"]
    got = raw.call("submit", {"upload": up, "name": "workflow.xml"})
    assert got["ok"], got
    run = got["result"]["run"]
    folder = os.path.join(h.d.runs_dir, run, "channels", "in")
    names = sorted(os.listdir(folder))
    want = [b"one", b"two+++", big, b"one"]
    assert [open(os.path.join(folder, n), "rb").read() for n in names] == want
    for n in names:
        path = os.path.join(folder, n)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640, n
        assert checksum.check(path) is None, (n, checksum.check(path))


def test_a_file_sent_twice_whole_is_refused_and_the_first_stays(h, raw):
    up = raw.call("upload_begin", {"size": 20})["result"]["upload"]
    assert raw.call("upload_files", {"upload": up, "paths": ["a"], "sizes": [3]}, b"one")["ok"]
    err = raw.call("upload_files", {"upload": up, "paths": ["a"], "sizes": [3]}, b"two")
    assert err["error"]["code"] == "usage" and "offset 0, but 3 bytes" in err["error"]["message"]
    with open(os.path.join(h.d.spool, "uploads", up, "a"), "rb") as f:
        assert f.read() == b"one"
