"""flowctl without a daemon: validate, usage errors, human output helpers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon_fixtures import env_for_subprocess
from test_parser import INVALID_FILES, _expectation

from flowctl import cli, fmt
from flowd.errors import FlowError, InternalError, error_from_dict

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples"


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.name)
def test_validate_rejects_every_invalid_file_with_exit_2_naming_the_line(path, capsys):
    exp = _expectation(path)
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    where = f"{path}:{exp['line']}:" if exp["line"] else f"{path}:"
    assert where in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["wordcount", "join", "filter", "wordcount-values"])
def test_validate_accepts_the_examples(name, capsys):
    assert cli.main(["validate", str(EXAMPLES / name / "workflow.xml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_as_a_user_runs_it():
    bad = INVALID_FILES[0]
    res = subprocess.run([sys.executable, "-m", "flowctl", "validate", str(bad)],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "flowctl", "validate", "/nonexistent.xml"],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "/nonexistent.xml: error: no such file (fix: check the path)"


def test_bad_usage_exits_2():
    res = subprocess.run([sys.executable, "-m", "flowctl", "frobnicate"],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_socket_comes_from_flowd_socket_env_and_the_flag_wins(monkeypatch, capsys):
    monkeypatch.setenv("FLOWD_SOCKET", "/nonexistent/from-env.sock")
    assert cli.main(["status"]) == 3
    assert "/nonexistent/from-env.sock" in capsys.readouterr().err
    assert cli.main(["--socket", "/nonexistent/flag.sock", "status"]) == 3
    assert "/nonexistent/flag.sock" in capsys.readouterr().err


def test_tables_align_and_units_are_human():
    out = fmt.table(["A", "LONGER"], [["xxxx", 1], ["y", 22]]).splitlines()
    assert out == ["A     LONGER", "xxxx  1", "y     22"]
    assert fmt.size(512) == "512 B" and fmt.size(3 * 1024 * 1024) == "3.0 MiB"
    assert fmt.duration(5.25) == "5.2s" and fmt.duration(125) == "2m05s"
    assert fmt.duration(3 * 3600 + 60) == "3h01m"
    assert fmt.size(None) == "-" and fmt.duration(None) == "-"


def test_flowctl_status_imports_nothing_heavy():
    # No daemon and no Docker needed: status against a socket that is not there. Every
    # flowctl call starts this way (status must answer in well under 100 ms wall with a
    # big spool: benchmarks/scale.py), so what only other commands need is imported there.
    code = ("import sys, flowctl.cli\n"
            "rc = flowctl.cli.main(['--socket', '/nonexistent/flowd.sock', 'status'])\n"
            "assert rc == 3, rc\n"
            "bad = [m for m in ('docker', 'lxml', 'logging', 'dataclasses', 'asyncio', 'flowd.trace',\n"
            "                   'flowd.report', 'flowd.executor', 'flowctl.live', 'flowctl.tracecmd',\n"
            "                   'flowctl.cachecmd', 'uuid', 'socket', 'zmq') if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], env=env_for_subprocess(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_flowctl_parses_a_command_as_its_whole_parser_does():
    # main() builds the parser of the command argv names alone (flowctl/cli.py command_of);
    # what it parses must be what the whole parser parses.
    from flowctl import cachecmd, tracecmd
    from flowctl.cli import CACHE_COMMANDS, COMMANDS, TRACE_COMMANDS, build_parser, command_of

    assert set(TRACE_COMMANDS) == set(tracecmd.COMMANDS)
    assert set(CACHE_COMMANDS) == set(cachecmd.COMMANDS)
    assert command_of(["status"]) == "status"
    assert command_of(["--socket", "/s", "--timeout=5", "status", "abc"]) == "status"
    assert command_of(["--sock=/s", "--time", "5", "logs", "r"]) == "logs"
    for argv in (["-h"], ["--", "status"], ["statu"], ["--socket"], [], ["-x", "status"],
                 ["--help", "status"], ["--s", "/x"]):
        assert command_of(argv) is None, argv
    full = build_parser()
    for argv in (["status"], ["--socket", "/s", "status", "abc", "--json"],
                 ["--time", "3", "status", "--timeout", "4"], ["cancel", "a", "b"],
                 ["cache", "rm", "--all"], ["trace", "r", "--csv"], ["why", "r", "p"],
                 ["logs", "r", "p", "--task", "t7", "-f"], ["pull", "r", "c", "--out", "d"]):
        only = command_of(argv)
        assert only in COMMANDS, argv
        assert build_parser(only).parse_args(argv) == full.parse_args(argv), argv
    for argv in (["status", "a", "b"], ["cancel"], ["--timeout", "0", "status"]):
        for parser in (full, build_parser(command_of(argv))):
            with pytest.raises(SystemExit) as e:
                parser.parse_args(argv)
            assert e.value.code == 2


def test_an_internal_error_reaches_flowctl_as_one_without_a_traceback():
    sent = InternalError().to_dict()
    assert sent == {"code": "internal",
                    "message": "internal error in flowd; see its log (journalctl -u flowd)"}
    got = error_from_dict(sent)
    assert isinstance(got, InternalError) and got.code == "internal" and got.exit_status == 1
    assert str(got) == sent["message"]
    other = error_from_dict({"code": "from_a_newer_flowd", "message": "m"})  # kept as sent
    assert type(other) is FlowError and other.code == "from_a_newer_flowd"


class FakeDaemon:
    """A ROUTER that answers ``ping`` with ``pids`` in turn and keeps ``slow``
    requests unanswered until ``answer_slow`` rounds of pings have passed."""

    def __init__(self, path, pids, answer_slow_after=None):
        import threading

        import zmq

        from flowd import protocol as P

        self.P, self.zmq = P, zmq
        self.pids = list(pids)
        self.answer_slow_after = answer_slow_after
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("ipc://" + path)
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        slow = None
        pings = 0
        while not self.stop:
            if not self.sock.poll(50):
                continue
            peer, *body = self.sock.recv_multipart()
            req_id, cmd, _, _ = self.P.decode_request(body)
            if cmd == "ping":
                pid = self.pids[min(pings, len(self.pids) - 1)]
                pings += 1
                self.sock.send_multipart([peer] + self.P.encode_reply(req_id, {"pid": pid}))
                if slow is not None and self.answer_slow_after is not None \
                        and pings > self.answer_slow_after:
                    self.sock.send_multipart([peer] + self.P.encode_reply(slow, {"run": "r1"}))
                    slow = None
            else:
                slow = req_id

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_a_slow_request_waits_while_the_same_daemon_answers_pings(tmp_path):
    from flowctl.client import Client

    path = str(tmp_path / "s.sock")
    fake = FakeDaemon(path, pids=[7], answer_slow_after=3)
    try:
        # The answer comes after 3 pings, each after a silent 0.5 s: well past one timeout.
        assert Client(path, timeout=0.5).call_patiently("submit", {}, 30) == {"run": "r1"}
    finally:
        fake.close()


def test_a_slow_request_gives_up_when_the_daemon_restarted(tmp_path):
    from flowctl.client import Client

    from flowd.errors import DaemonUnreachable

    path = str(tmp_path / "s.sock")
    fake = FakeDaemon(path, pids=[7, 7, 8])  # never answers the submit; a new pid on ping 3
    try:
        with pytest.raises(DaemonUnreachable, match="flowd restarted before it answered submit"):
            Client(path, timeout=0.5).call_patiently("submit", {}, 30)
    finally:
        fake.close()
