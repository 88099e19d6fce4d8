"""The protocol's edge: every request argument checked, and what one client
can make the daemon hold is bounded (issue 9 #3-#7, issue 8 #3, #5, #6).

A real flowd in a subprocess, spoken to over its real socket by a raw
DEALER (``Raw``), which can send what flowctl never would.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pwd

import daemon_fixtures
import pytest
import zmq
from daemon_fixtures import env_for_subprocess, wait_until
from flowd import checksum
from flowd import protocol as P
from flowd.store import seq_name

CODES = {"usage", "invalid", "not_found", "ambiguous", "conflict", "protocol", "storage",
         "disk_full", "engine", "engine_down", "image"}  # what a client may be told; never "internal"

SERVICE = """<workflow name="edge" mode="service">
  <channel name="box"><item file="big.bin"/></channel>
  <channel name="requests"/><channel name="replies"/>
  <process name="echo" image="flowd/busybox">
    <input channel="requests" as="in"/><output channel="replies" as="out"/>
    <script>cp in out</script>
  </process>
</workflow>
"""
BIG = 3 * P.CHUNK + 123  # the item in channel "box"


class Raw:
    """A bare DEALER: any header, any args (NaN too), optional payload."""

    def __init__(self, path: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(P.endpoint(path))
        self.n = 0

    def send(self, cmd: str, args: dict | None = None, payload: bytes | None = None) -> str:
        self.n += 1
        req_id = f"r{self.n}"
        frames = [json.dumps({"v": 1, "id": req_id, "cmd": cmd, "args": args or {}}).encode()]
        if payload is not None:
            frames.append(payload)
        self.sock.send_multipart(frames)
        return req_id

    def recv(self, timeout: float = 60.0) -> tuple[dict, bytes | None] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return json.loads(frames[0]), (frames[1] if len(frames) > 1 else None)

    def call(self, cmd: str, args: dict | None = None, payload: bytes | None = None,
             timeout: float = 60.0) -> tuple[dict, bytes | None]:
        req_id = self.send(cmd, args, payload)
        while True:
            got = self.recv(timeout)
            assert got is not None, f"no answer to {cmd} {args!r} within {timeout}s"
            if got[0].get("id") == req_id:
                return got

    def ok(self, cmd: str, args: dict | None = None, payload: bytes | None = None) -> dict:
        msg, data = self.call(cmd, args, payload)
        assert msg["ok"], (cmd, args, msg)
        return msg["result"] if data is None else (msg["result"], data)

    def error(self, cmd: str, args: dict | None = None, payload: bytes | None = None) -> dict:
        msg, _ = self.call(cmd, args, payload)
        assert not msg["ok"], (cmd, args, msg)
        return msg["error"]

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def ping_seconds(raw: Raw) -> float:
    t0 = time.monotonic()
    raw.ok("ping")
    return time.monotonic() - t0


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def service_run(d, workdir: str) -> str:
    """A running service run whose channel "box" holds one BIG-byte item (0)."""
    folder = os.path.join(workdir, "svc")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        f.write(bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256))
    xml = write(os.path.join(folder, "edge.xml"), SERVICE)
    return d.flowctl("submit", xml, check=0).stdout.strip()


@pytest.fixture
def svc(daemon_factory, workdir):
    d = daemon_factory().start()
    run = service_run(d, workdir)
    raw = Raw(d.socket)
    yield d, run, raw
    raw.close()


# -- 1. every argument of every command is checked before any handler runs --------------
def bad_cases(run: str) -> list[tuple[str, dict, str]]:
    """(command, args, the argument the error must name)"""
    read = {"run": run, "channel": "box", "seq": 0}
    up = "0" * 16
    return [
        ("status", {"run": run, "wait": float("nan")}, "wait"),
        ("status", {"run": run, "wait": float("inf")}, "wait"),
        ("status", {"run": run, "wait": -1}, "wait"),
        ("status", {"run": run, "wait": "30"}, "wait"),
        ("status", {"run": run, "wait": True}, "wait"),
        ("status", {"run": run, "wait": 1e300}, "wait"),
        ("status", {"run": 7}, "run"),
        ("read", dict(read, length=-1), "length"),
        ("read", dict(read, length=0), "length"),
        ("read", dict(read, length=10 ** 12), "length"),
        ("read", dict(read, length=1.5), "length"),
        ("read", dict(read, length=True), "length"),
        ("read", dict(read, offset=-1), "offset"),
        ("read", dict(read, offset=float("inf")), "offset"),
        ("read", dict(read, seq="0"), "seq"),
        ("read", dict(read, seq=-1), "seq"),
        ("read", dict(read, seq=None), "seq"),
        ("read", dict(read, channel=["box"]), "channel"),
        ("read", dict(read, run={"id": run}), "run"),
        ("read_log", {"run": run, "name": "x", "offset": -5}, "offset"),
        ("read_log", {"run": run, "name": 3}, "name"),
        ("items", {"run": run}, "channel"),
        ("items", {"run": "a" * 100000, "channel": "box"}, "run"),
        ("cancel", {"runs": run}, "runs"),
        ("cancel", {"runs": []}, "runs"),
        ("cancel", {"runs": [1, 2]}, "runs"),
        ("upload_begin", {}, "size"),
        ("upload_begin", {"size": -1}, "size"),
        ("upload_begin", {"size": "10"}, "size"),
        ("upload_begin", {"size": 1e20}, "size"),
        ("upload_begin", {"size": 2 ** 80}, "size"),
        ("upload_begin", {"size": float("nan")}, "size"),
        ("upload_chunk", {"upload": up, "path": "f", "offset": -1}, "offset"),
        ("upload_chunk", {"upload": up, "path": "f"}, "offset"),
        ("upload_chunk", {"upload": "../x", "path": "f", "offset": 0}, "upload"),
        ("upload_chunk", {"upload": up, "path": 5, "offset": 0}, "path"),
        ("submit", {"upload": 12}, "upload"),
        ("submit", {"upload": up, "name": ""}, "name"),
        ("push_begin", {"run": run, "channel": "box", "size": -3}, "size"),
        ("push_begin", {"run": run, "channel": "box", "size": True}, "size"),
        ("push_chunk", {"push": up, "offset": float("-inf")}, "offset"),
        ("push_end", {"push": up, "run": run}, "channel"),
        ("logs", {"run": run, "process": 5}, "process"),
        ("logs", {"run": run, "task": ["0"]}, "task"),
        ("graph", {}, "run"),
    ]


def test_every_bad_argument_gets_a_usage_error_naming_it(svc):
    d, run, raw = svc
    for cmd, args, name in bad_cases(run):
        err = raw.error(cmd, args)
        assert err["code"] == "usage", (cmd, args, err)
        assert f"argument '{name}'" in err["message"], (cmd, args, err)
    assert P.COMMANDS == tuple(P.SCHEMA)  # one table of commands
    assert raw.ok("ping")["pid"] == d.proc.pid
    assert "internal error" not in d.log(full=True)


# -- 2. read: never a whole item in one reply (issue 9 #4) --------------------------------
def test_read_returns_at_most_one_chunk_whatever_the_length(svc):
    d, run, raw = svc
    before = rss_kib(d.proc.pid)
    [item] = raw.ok("items", {"run": run, "channel": "box"})["items"]
    assert item["size"] == BIG
    args = {"run": run, "channel": "box", "seq": item["seq"]}
    assert raw.error("read", dict(args, length=-1))["code"] == "usage"
    result, data = raw.ok("read", args)
    assert len(data) == P.CHUNK == result["size"]
    _, data = raw.ok("read", dict(args, offset=BIG - 10, length=P.CHUNK))
    assert len(data) == 10
    msg, data = raw.call("read", dict(args, offset=BIG + 10 ** 9))  # past the end: nothing
    assert msg["ok"] and not data
    assert rss_kib(d.proc.pid) - before < 64 * 1024


# -- 3. uploads and pushes: their uploader's, bounded, in order, expiring --------------------
OTHER_CLIENT = r"""
import json, sys, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect("ipc://" + sys.argv[1])
out = {}
for name, cmd, args in json.loads(sys.argv[2]):
    frames = [json.dumps({"v": 1, "id": name, "cmd": cmd, "args": args}).encode()]
    if cmd.endswith("_chunk"):
        frames.append(b"hijacked")
    sock.send_multipart(frames)
    assert sock.poll(60000), "no answer"
    msg = json.loads(sock.recv_multipart()[0])
    out[name] = msg.get("error", {}).get("code", "ok")
print(json.dumps(out))
"""


def as_other_user(d, calls: list) -> dict:
    """Run ``calls`` as uid/gid 65534 (nobody), on the same socket."""
    res = subprocess.run([sys.executable, "-c", OTHER_CLIENT, d.socket, json.dumps(calls)],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=120,
                         user=65534, group=65534, extra_groups=[], cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_an_upload_or_push_is_its_uploaders_alone(daemon_factory, workdir):
    if os.geteuid() != 0:
        pytest.skip("needs root to speak as a second user")
    conf = write(os.path.join(workdir, "open.toml"), 'socket_mode = "0666"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    os.chmod(os.path.dirname(d.socket), 0o755)
    run = service_run(d, workdir)
    raw = Raw(d.socket)
    up = raw.ok("upload_begin", {"size": 100})["upload"]
    raw.ok("upload_chunk", {"upload": up, "path": "workflow.xml", "offset": 0}, b"<workflow")
    push = raw.ok("push_begin", {"run": run, "channel": "box", "size": 3})["push"]
    uploads = os.path.join(d.spool, "uploads")
    assert os.stat(uploads).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(uploads, up)).st_mode & 0o777 == 0o700
    got = as_other_user(d, [
        ["chunk", "upload_chunk", {"upload": up, "path": "workflow.xml", "offset": 9}],
        ["submit", "submit", {"upload": up}],
        ["push_chunk", "push_chunk", {"push": push, "offset": 0}],
        ["push_end", "push_end", {"push": push, "run": run, "channel": "box"}],
        ["unknown", "upload_chunk", {"upload": "f" * 16, "path": "x", "offset": 0}],
    ])
    # refused exactly as an id that does not exist: ids cannot be probed
    assert got == {"chunk": "not_found", "submit": "not_found", "push_chunk": "not_found",
                   "push_end": "not_found", "unknown": "not_found"}, got
    with open(os.path.join(uploads, up, "workflow.xml"), "rb") as f:
        assert f.read() == b"<workflow"  # untouched
    raw.ok("push_chunk", {"push": push, "offset": 0}, b"abc")
    seq = raw.ok("push_end", {"push": push, "run": run, "channel": "box"})["seq"]
    assert raw.ok("read", {"run": run, "channel": "box", "seq": seq})[1] == b"abc"
    raw.close()


def test_chunks_stay_within_the_declared_size_and_in_order(svc):
    d, run, raw = svc
    up = raw.ok("upload_begin", {"size": 10})["upload"]
    err = raw.error("upload_chunk", {"upload": up, "path": "a", "offset": 0}, b"x" * 11)
    assert err["code"] == "usage" and "declared size" in err["message"]
    err = raw.error("upload_chunk", {"upload": up, "path": "a", "offset": 64 << 30}, b"x")
    assert err["code"] == "usage" and "offset 0" in err["message"]
    raw.ok("upload_chunk", {"upload": up, "path": "a", "offset": 0}, b"12345")
    err = raw.error("upload_chunk", {"upload": up, "path": "a", "offset": 6}, b"6")  # a hole
    assert err["code"] == "usage" and "in order" in err["message"]
    raw.ok("upload_chunk", {"upload": up, "path": "a", "offset": 5}, b"6")
    raw.ok("upload_chunk", {"upload": up, "path": "b", "offset": 0}, b"7890")
    err = raw.error("upload_chunk", {"upload": up, "path": "c", "offset": 0}, b"!")
    assert err["code"] == "usage"  # 11 bytes in all: past the 10 declared
    for path in ("a", "b"):
        st = os.stat(os.path.join(d.spool, "uploads", up, path))
        assert st.st_blocks * 512 <= 8192  # nothing sparse, nothing big
    # a push: the sparse chunk that froze the loop for 75 s is refused at once
    push = raw.ok("push_begin", {"run": run, "channel": "box", "size": 4})["push"]
    err = raw.error("push_chunk", {"push": push, "offset": 64 << 30}, b"x" * 4096)
    assert err["code"] == "usage"
    raw.ok("push_chunk", {"push": push, "offset": 0}, b"da")
    err = raw.error("push_end", {"push": push, "run": run, "channel": "box"})
    assert err["code"] == "usage" and "4 declared" in err["message"]
    raw.ok("push_chunk", {"push": push, "offset": 2}, b"ta")
    seq = raw.ok("push_end", {"push": push, "run": run, "channel": "box"})["seq"]
    path = os.path.join(d.spool, "runs", run, "channels", "box", seq_name(seq))
    with open(path, "rb") as f:
        assert f.read() == b"data"
    assert checksum.check(path) is None  # stamped as received
    assert raw.ok("ping")["pid"] == d.proc.pid


def test_a_push_without_a_size_is_bounded_by_max_upload_size(daemon_factory, workdir):
    conf = write(os.path.join(workdir, "c.toml"), 'max_upload_size = "4m"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    run = service_run(d, workdir)
    raw = Raw(d.socket)
    err = raw.error("upload_begin", {"size": 4 * P.CHUNK + 1})
    assert err["code"] == "usage" and "max_upload_size" in err["message"]
    push = raw.ok("push_begin", {"run": run, "channel": "box"})["push"]
    for i in range(4):
        raw.ok("push_chunk", {"push": push, "offset": i * P.CHUNK}, b"y" * P.CHUNK)
    err = raw.error("push_chunk", {"push": push, "offset": 4 * P.CHUNK}, b"y")
    assert err["code"] == "usage" and "max_upload_size" in err["message"]
    raw.close()


def test_open_uploads_per_user_are_bounded(svc):
    d, run, raw = svc
    ids = [raw.ok("upload_begin", {"size": 1})["upload"] for _ in range(12)]
    ids += [raw.ok("push_begin", {"run": run, "channel": "box"})["push"] for _ in range(4)]
    err = raw.error("upload_begin", {"size": 1})
    assert err["code"] == "conflict" and "16" in err["message"]
    assert raw.error("push_begin", {"run": run, "channel": "box"})["code"] == "conflict"
    raw.ok("upload_chunk", {"upload": ids[0], "path": "workflow.xml", "offset": 0}, b"<")
    assert raw.error("submit", {"upload": ids[0]})["code"] == "invalid"  # consumed, either way
    raw.ok("upload_begin", {"size": 1})  # one slot free again
    assert len(os.listdir(os.path.join(d.spool, "uploads"))) == 16


def test_an_abandoned_upload_expires(daemon_factory, workdir):
    # the daemon as a user runs it, with UPLOAD_MAX_AGE at 2 s instead of an hour
    wrapper = write(os.path.join(workdir, "flowd-short"), f"""#!/bin/sh
[ "$1 $2" = "-m flowd" ] || exec {sys.executable} "$@"
shift 2
exec {sys.executable} -c 'import sys, flowd.staging as s; s.UPLOAD_MAX_AGE = 2.0
from flowd.cli import main; sys.exit(main())' "$@"
""")
    os.chmod(wrapper, 0o755)
    d = daemon_factory(python=wrapper).start()
    raw = Raw(d.socket)
    up = raw.ok("upload_begin", {"size": 10})["upload"]
    raw.ok("upload_chunk", {"upload": up, "path": "a", "offset": 0}, b"half")
    folder = os.path.join(d.spool, "uploads", up)
    assert os.path.isdir(folder)
    wait_until(lambda: not os.path.exists(folder), 60, "the upload to expire")
    assert raw.error("upload_chunk", {"upload": up, "path": "a", "offset": 4}, b"x")["code"] \
        == "not_found"
    assert re.search(rf"upload {up} of uid \d+ expired", d.log())
    raw.close()


# -- 4. run ids never run out (issue 9 #6) --------------------------------------------
def test_run_ids_do_not_run_out_after_65536_runs(tmp_path, monkeypatch):
    from flowd import daemon as D
    from flowd import runids
    from flowd.config import Config

    dm = D.Daemon(Config(spool=str(tmp_path / "spool"), socket=str(tmp_path / "s.sock")))
    os.makedirs(dm.runs_dir)
    dm.runs = {f"{p:04x}00000000": None for p in range(65536)}  # every 4-digit prefix taken
    real = runids.secrets.token_hex
    calls = []

    def counted(n):
        calls.append(n)
        if len(calls) > 10_000:
            raise AssertionError("_new_run_id is still looking after 10,000 tries")
        return real(n)

    monkeypatch.setattr(runids.secrets, "token_hex", counted)
    rid = dm._new_run_id()
    assert re.fullmatch(r"[0-9a-f]{12}", rid) and rid not in dm.runs
    assert len(calls) <= 2 * runids.RUN_ID_TRIES
    dm.runs = {}
    calls.clear()
    assert dm._new_run_id() and len(calls) == 1  # the usual case: the first try


# -- 5. status --wait: bounded per client, in a heap (issue 9 #7) ---------------------------
def test_a_flood_of_waiters_leaves_ping_fast_and_memory_flat(svc):
    d, run, raw = svc
    for _ in range(20):  # warm up, then the baseline
        ping_seconds(raw)
    base_rss, base_ping = rss_kib(d.proc.pid), max(ping_seconds(raw) for _ in range(20))
    flood = Raw(d.socket)
    sent = answered = 0
    while sent < 100_000:
        for _ in range(500):
            flood.send("status", {"run": run, "wait": 300})
            sent += 1
        # a client over its share of 16 has its oldest waiters answered at once, with
        # the run as it is (no reply is dropped: this client reads as it goes)
        while sent - answered > 16:
            got = flood.recv(60.0)
            assert got is not None, f"{sent - answered} waiters of one client held, not 16"
            assert got[0]["ok"] and got[0]["result"]["run"]["state"] == "running"
            answered += 1
    worst = max(ping_seconds(raw) for _ in range(20))
    assert worst < max(1.0, 20 * base_ping), (worst, base_ping)
    grown = rss_kib(d.proc.pid) - base_rss
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB"
    raw.ok("cancel", {"runs": [run]})  # the run ends: the 16 still waiting are answered now
    last = [flood.recv(30.0) for _ in range(16)]
    assert all(g is not None and g[0]["result"]["run"]["state"] == "cancelled" for g in last)
    flood.close()


# -- 6. the daemon's log: no line can be forged (issue 8 #5) -------------------------------
FORGED = "2030-01-01 00:00:00,000 flowd[1] INFO uid 0 (root) pid 1: FORGED"


def test_a_client_chosen_string_cannot_forge_a_log_line(svc, workdir):
    d, run, raw = svc
    name = "x\n" + FORGED + "\n.xml"
    xml = write(os.path.join(workdir, "wf", name), """<workflow name="w">
  <process name="p" image="flowd/busybox"><script>true</script></process></workflow>""")
    d.flowctl("submit", xml, check=0)
    raw.error("cancel", {"runs": ["nope\n" + FORGED]})
    raw.error("items", {"run": "nope\r" + FORGED, "channel": "\x1b]0;title\x07"})
    log = d.log(full=True)
    assert "FORGED" in log
    for line in log.splitlines():
        if "FORGED" in line:
            assert not line.startswith(FORGED[:10]), line
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ flowd\[\d+\] ", line), line
    assert "\x1b" not in log and "\\n" + FORGED in log


# -- 7. config: what a workflow may ask for (issue 8 #6) -----------------------------------
def test_network_memory_and_timeout_beyond_the_config_are_refused_at_submit(daemon_factory,
                                                                           workdir):
    conf = write(os.path.join(workdir, "flowd.toml"), "")
    d = daemon_factory(extra_args=["--config", conf]).start()
    asks = []
    for attr, key in (('network="bridge"', "allowed_networks"), ('memory="16g"', "max_memory"),
                      ('timeout="48h"', "max_timeout")):
        xml = write(os.path.join(workdir, key, "ask.xml"), f"""<workflow name="ask">
  <process name="greedy" image="flowd/busybox" {attr}><script>true</script></process>
</workflow>""")
        res = d.flowctl("submit", xml, check=2)
        assert "ask.xml:2" in res.stderr and "'greedy'" in res.stderr, res.stderr
        assert attr in res.stderr and key in res.stderr and "fix:" in res.stderr, res.stderr
        asks.append(xml)
    write(conf, 'allowed_networks = ["none", "bridge"]\nmax_memory = "32g"\nmax_timeout = "3d"\n')
    d.proc.send_signal(1)
    wait_until(lambda: "changed: " in d.log() and "allowed_networks" in d.log(), 30, "the reload")
    for xml in asks:  # allowed now: each is taken and runs
        d.flowctl("submit", xml, check=0)


def test_config_keys_are_checked_and_reach_the_runs_limits(tmp_path):
    from flowd.config import load
    from flowd.daemon import Daemon
    from flowd.errors import UsageError

    p = tmp_path / "c.toml"
    for bad, key in (('container_user = "root"', "container_user"),
                     ('container_user = "1000:"', "container_user"),
                     ('allowed_networks = ["host"]', "allowed_networks"),
                     ('max_memory = "lots"', "max_memory"), ('max_timeout = "-1h"', "max_timeout"),
                     ('max_upload_size = ""', "max_upload_size"),
                     ('default_memory = "16g"\nmax_memory = "1g"', "max_memory")):
        p.write_text(bad + "\n")
        with pytest.raises(UsageError, match=key):
            load(str(p))
    for good in ('container_user = "image"', 'container_user = "1000:1000"',
                 'container_user = "65534"', 'max_memory = ""', 'max_timeout = ""'):
        p.write_text(good + "\n")
        load(str(p))
    cfg = load(str(tmp_path / "none.toml"))
    assert (cfg.allowed_networks, cfg.max_memory, cfg.max_timeout) == (["none"], 8 << 30, 86400.0)
    p.write_text('container_user = "1000:1000"\nmax_timeout = "2h"\n')
    cfg = load(str(p))
    cfg.spool, cfg.socket = str(tmp_path / "spool"), str(tmp_path / "s.sock")
    limits = Daemon(cfg).limits
    assert (limits.container_user, limits.default_timeout, limits.default_memory) == \
        ("1000:1000", 7200.0, 8 << 30)


# -- 8. spool folder modes ------------------------------------------------------------
def test_spool_folders_get_their_modes_at_start(daemon_factory, workdir):
    spool = os.path.join(workdir, "spool")
    loose = {"": 0o755, "runs": 0o755, "uploads": 0o777, "incoming": 0o2770, "rejected": 0o777}
    d = daemon_factory(spool=spool)
    owner = pwd.getpwnam(d.user) if getattr(d, "user", None) else None
    if owner is None and getattr(d, "user", None) and hasattr(daemon_fixtures, "daemon_user"):
        owner = daemon_fixtures.daemon_user(d.user)
    for sub, mode in loose.items():
        path = os.path.join(spool, sub)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        if owner is not None:  # a non-root daemon: its spool, as tmpfiles or an older flowd made it
            os.chown(path, owner.pw_uid, owner.pw_gid)
    d.start()
    modes = {sub: os.stat(os.path.join(spool, sub)).st_mode & 0o7777 for sub in loose}
    assert modes == {"": 0o750, "runs": 0o700, "uploads": 0o700, "incoming": 0o3770,
                     "rejected": 0o750}, {k: oct(v) for k, v in modes.items()}
    assert d.flowctl("status", check=0)


def test_a_zeromq_address_for_the_socket_is_taken_as_its_path(monkeypatch):
    """A user who read "ipc://" in the docs may write it: it names the same socket,
    never a folder called "ipc:" in the current directory."""
    from flowd import protocol as P

    assert P.socket_path("ipc:///run/x/flowd.sock") == "/run/x/flowd.sock"
    monkeypatch.setenv("FLOWD_SOCKET", "ipc:///srv/s.sock")
    assert P.socket_path() == "/srv/s.sock"
    assert P.endpoint("ipc:///srv/s.sock") == P.endpoint("/srv/s.sock") == "ipc:///srv/s.sock"
