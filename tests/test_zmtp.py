"""flowctl status without ZeroMQ (flowctl/zmtp.py, Client.call_once): against a
pyzmq ROUTER (the daemon's kind of socket, this Python's libzmq) and a real daemon."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import zmq
from daemon_fixtures import env_for_subprocess

from flowctl.client import Client, DaemonStopped
from flowd import protocol as P
from flowd.errors import DaemonUnreachable, NotFound


class Router:
    """A ROUTER on ``path`` whose ``answer(body, frame)`` returns the replies to send
    (lists of frames), or None to close the socket (the daemon stopping)."""

    def __init__(self, path: str, answer):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("ipc://" + path)
        self.answer, self.seen, self.stop = answer, [], False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop:
            if not self.sock.poll(50):
                continue
            parts = self.sock.recv_multipart(copy=False)
            peer, body = parts[0].bytes, [p.bytes for p in parts[1:]]
            self.seen.append((body, parts[-1].get("Peer-Address")))
            replies = self.answer(body)
            if replies is None:
                self.sock.close(0)
                return
            for frames in replies:
                self.sock.send_multipart([peer] + frames)

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def reply(body, result, req_id=None):
    return P.encode_reply(req_id or json.loads(body[0])["id"], result)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "s.sock")


def test_one_request_and_its_reply_go_as_zeromq_frames(sock_path):
    big = {"runs": [{"id": f"r{i}", "name": "x" * 300} for i in range(500)]}  # frames over 255 bytes
    late = {"stale": True}
    fake = Router(sock_path, lambda body: [reply(body, late, req_id="0" * 16), reply(body, big)])
    try:
        client = Client(sock_path, timeout=10)
        assert client.call_once("status", {"run": "a" * 300}) == big  # the late answer is dropped
        body, peer_address = fake.seen[0]
        assert len(body) == 1
        sent = json.loads(body[0])
        assert sent["cmd"] == "status" and sent["args"] == {"run": "a" * 300} and sent["v"] == P.VERSION
        # the daemon names the caller from this (flowd/control.py _caller)
        assert peer_address.split(":")[-3] == str(os.getuid())
        assert peer_address.split(":")[-1] == str(os.getpid())
        assert "zmq" in sys.modules  # this test's router; the client's own check is below
        client.close()
    finally:
        fake.close()


def test_an_error_reply_is_raised_as_the_daemon_sent_it(sock_path):
    fake = Router(sock_path, lambda body: [P.encode_reply(json.loads(body[0])["id"],
                                                          error=NotFound("no run matches 'x'"))])
    try:
        with pytest.raises(NotFound, match="no run matches 'x'"):
            Client(sock_path, timeout=10).call_once("status", {"run": "x"})
    finally:
        fake.close()


@pytest.mark.parametrize("answer, timeout, error, words", [
    (lambda body: None, 30, DaemonStopped, "flowd stopped: it closed the connection"),  # at once
    (lambda body: [], 0.5, DaemonUnreachable, "did not answer within 0.5s"),
], ids=["stops", "silent"])
def test_a_daemon_that_stops_or_does_not_answer_is_said_so(sock_path, answer, timeout, error,
                                                          words):
    fake = Router(sock_path, answer)
    try:
        with pytest.raises(error, match=words):
            Client(sock_path, timeout=timeout).call_once("status")
    finally:
        fake.close()


def test_something_else_on_the_socket_is_not_taken_for_flowd(sock_path):
    import socket

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)

    def talk():
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n" + b"x" * 64)
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=talk, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonUnreachable, match="cannot talk to flowd .*not a ZMTP 3 greeting"):
            Client(sock_path, timeout=10).call_once("status")
    finally:
        t.join(5)
        srv.close()


def test_flowctl_status_against_a_daemon_imports_no_zeromq(daemon):
    code = ("import sys, flowctl.cli\n"
            f"rc = flowctl.cli.main(['--socket', {daemon.socket!r}, 'status', '--json'])\n"
            "assert rc == 0, rc\n"
            f"rc = flowctl.cli.main(['--socket', {daemon.socket!r}, 'status', 'nope'])\n"
            "assert rc == 1, rc\n"
            "assert 'zmq' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], env=env_for_subprocess(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["runs"] == []
    assert "no run matches 'nope'" in res.stderr
