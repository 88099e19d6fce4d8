"""flowctl in a hostile or unsteady world (issue 8 #5 and "Reading items", issue 9 #8, #9).

- What a container or another user chose is printed escaped: control
  characters other than newline and tab show as ``\\x1b`` and so on, in
  ``status``, ``watch``, error messages, and ``logs`` on a terminal; ``logs``
  into a pipe stays byte-exact and ``--json`` stays JSON.
- ``pull`` never follows a link planted in a shared ``--out`` folder.
- ``watch`` and ``submit --wait`` tell a stopped daemon at once, and ride a
  restart.
- Ctrl-C during ``submit`` says what exists; bad ``--timeout`` values, a
  folder or a missing file given to ``validate``, a missing file given to
  ``push``, and image references Docker would refuse get clear errors.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from daemon_fixtures import env_for_subprocess, on_a_terminal, readable, wait_until

from flowctl import cli
from flowd.errors import WorkflowError
from flowd.parser import image_reference_problem, load_workflow

ESC = "\x1b"
TITLE = "\x1b]0;pwned\x07"  # OSC 0: sets the window title
CLIP = "\x1b]52;c;aGk=\x07"  # OSC 52: writes the clipboard


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def flowctl_cmd(sock, *args):
    return [sys.executable, "-m", "flowctl", "--socket", sock, *map(str, args)]


def sigint_default() -> None:
    """preexec_fn of a flowctl the test sends Ctrl-C: a test run started in the
    background (bash's `cmd &`, as .ci/run runs its passes) ignores SIGINT, and
    a Python that starts with SIGINT ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_containers(docker_client, run_id):
    return docker_client.api.containers(all=True, filters={"label": [f"io.flowd.run={run_id}"]})


# -- 1. escaping -----------------------------------------------------------------

HOSTILE = r"""<workflow name="hostile">
  <channel name="in"><item>x</item></channel>
  <channel name="res"/>
  <process name="evil" image="flowd/busybox">
    <input channel="in"/><output channel="res"/>
    <script>
      printf 'before\033]0;pwned\007after\n' >&amp;2
      printf 'clip\033]52;c;aGk=\007 caf\303\251\n'
      mkdir res
      echo ok > res/a
      ln -s / "res/$(printf 'x\033[2Jy')"
    </script>
  </process>
</workflow>
"""


@pytest.mark.docker
def test_status_watch_and_logs_escape_what_a_container_chose(daemon, workdir, docker_images):
    """A script's log bytes and its output's name (in the failure reason) hold
    terminal control sequences; flowctl shows them, never sends them."""
    xml = write(os.path.join(workdir, "wf", "hostile.xml"), HOSTILE)
    res = daemon.flowctl("submit", "--wait", xml)
    assert res.returncode == 1, res.stderr
    (run,) = [r["id"] for r in json.loads(daemon.flowctl("status", "--json").stdout)["runs"]]
    detail = json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)
    (failure,) = detail["failures"]
    assert TITLE in failure["log_tail"]  # the daemon keeps the bytes; --json is JSON

    watch = daemon.flowctl("watch", run, check=1)
    for what, out in [("submit --wait", res.stdout + res.stderr),
                      ("status", daemon.flowctl("status", run, check=0).stdout),
                      ("status (list)", daemon.flowctl("status", check=0).stdout),
                      ("watch", watch.stdout + watch.stderr)]:
        assert ESC not in out and "\x07" not in out, f"{what} printed raw control characters"
    text = daemon.flowctl("status", run, check=0).stdout
    assert "before\\x1b]0;pwned\\x07after" in text  # the log tail, escaped and readable
    assert "x\\x1b[2Jy" in text  # the output's name in the failure reason
    assert "café" in text  # UTF-8 text stays as it is

    raw = json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)
    assert raw == detail and ESC not in daemon.flowctl("status", run, "--json").stdout

    # logs into a pipe: byte-exact
    piped = subprocess.run(flowctl_cmd(daemon.socket, "logs", run), env=env_for_subprocess(),
                           capture_output=True, timeout=60)
    assert piped.returncode == 0
    assert b"before" + TITLE.encode() + b"after\n" in piped.stdout
    assert b"clip" + CLIP.encode() + b" caf\xc3\xa9\n" in piped.stdout

    # logs on a terminal: escaped, the UTF-8 intact
    rc, shown = on_a_terminal(flowctl_cmd(daemon.socket, "logs", run))
    assert rc == 0
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"before\\x1b]0;pwned\\x07after\n" in shown
    assert "clip\\x1b]52;c;aGk=\\x07 café\n".encode() in shown
    assert b"==> evil task" in shown


def test_a_log_on_a_terminal_keeps_a_character_split_across_chunks(monkeypatch):
    """``logs --follow`` reads a growing log in pieces: a UTF-8 character (or an
    escape sequence) cut between two reads is shown whole, not mangled."""
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    sink = cli._TerminalLog(out)
    data = "é€😀 ok\x1b]0;t\x07\n".encode() + b"\xff tail\xe2\x82"  # ends mid-character
    for i in range(len(data)):  # one byte at a time: every split there is
        sink.name = "a.log"
        sink.write(data[i:i + 1])
    sink.finish()
    assert out.getvalue().decode() == "é€😀 ok\\x1b]0;t\\x07\n\\xff tail\\xe2\\x82"
    # two logs interleaved, each cut mid-character, each kept apart
    out = io.BytesIO()
    sink = cli._TerminalLog(out)
    for name, piece in [("a", b"\xc3"), ("b", b"\xe2\x82"), ("a", b"\xa9"), ("b", b"\xac")]:
        sink.name = name
        sink.write(piece)
    sink.finish()
    assert out.getvalue().decode() == "é€"


class ErrorDaemon:
    """A control socket whose every answer is an error with ``message``: what a
    daemon quoting a client- or container-chosen string might send."""

    def __init__(self, path, message):
        import zmq

        from flowd import protocol as P
        from flowd.errors import NotFound

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("ipc://" + path)
        self.stop = False

        def serve():
            while not self.stop:
                if self.sock.poll(50):
                    peer, *body = self.sock.recv_multipart()
                    req_id = P.decode_request(body)[0]
                    self.sock.send_multipart([peer] + P.encode_reply(req_id,
                                                                     error=NotFound(message)))

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_error_messages_from_the_daemon_are_escaped(tmp_path):
    path = str(tmp_path / "s.sock")
    fake = ErrorDaemon(path, f"no run matches {TITLE}\u202eevil")
    try:
        res = subprocess.run(flowctl_cmd(path, "status", "x"), env=env_for_subprocess(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert ESC not in res.stderr and "\u202e" not in res.stderr
        assert "no run matches \\x1b]0;pwned\\x07\\u202eevil" in res.stderr
        res = subprocess.run(flowctl_cmd(path, "status", "x", "--json"), env=env_for_subprocess(),
                             capture_output=True, text=True, timeout=60)
        assert json.loads(res.stdout)["error"]["message"] == f"no run matches {TITLE}\u202eevil"
    finally:
        fake.close()


# -- 2. pull in a shared folder ------------------------------------------------

PARKED = """<workflow name="parked" mode="service">
  <channel name="in"><item>first</item><item>second</item></channel>
  <channel name="go"/><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="in"/><input channel="go"/><output channel="out"/>
    <script>cp in out</script>
  </process>
</workflow>
"""


@pytest.mark.docker
def test_pull_never_follows_a_link_planted_in_a_shared_out_folder(daemon, workdir, docker_images):
    xml = write(os.path.join(workdir, "wf", "parked.xml"), PARKED)
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    listing = json.loads(daemon.flowctl("pull", run, "in", "--out",
                                        os.path.join(workdir, "mine"), "--json", check=0).stdout)
    names = [os.path.basename(f["file"]) for f in listing["files"]]
    assert len(names) == 2
    shared = os.path.join(workdir, "shared")
    os.makedirs(shared)
    victim = write(os.path.join(workdir, "victim"), "precious\n")
    created = os.path.join(workdir, "created-by-pull")  # a dangling link's target

    # flowctl writes each item unnamed (O_TMPFILE) and links it in whole: a
    # planted NAME.part is never opened, followed or removed (a first pull, and
    # a second that replaces the files)
    for target in (victim, created, victim + TITLE):
        part = os.path.join(shared, names[0] + ".part")
        os.symlink(target, part)
        res = daemon.flowctl("pull", run, "in", "--out", shared)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr and ESC not in res.stderr
        assert os.path.islink(part) and os.readlink(part) == target  # left as found
        assert open(os.path.join(shared, names[0])).read() == "first"
        os.unlink(part)
    for name in names:
        os.unlink(os.path.join(shared, name))
    assert open(victim).read() == "precious\n"
    assert not os.path.exists(created)

    # a link where the item itself goes is not replaced or written through either
    dest = os.path.join(shared, names[1])
    os.symlink(victim, dest)
    res = daemon.flowctl("pull", run, "in", "--out", shared)
    assert res.returncode == 1 and f"{dest} is in the way: a symbolic link to {victim}" \
        in res.stderr
    assert open(victim).read() == "precious\n" and os.path.islink(dest)
    assert not [n for n in os.listdir(shared) if n.endswith(".part")]  # no temporary left
    os.unlink(dest)

    daemon.flowctl("pull", run, "in", "--out", shared, check=0)
    assert [open(os.path.join(shared, n)).read() for n in names] == ["first", "second"]
    daemon.flowctl("cancel", run, check=0)


# -- 3. a daemon that stops or restarts under watch / submit --wait -------------------

SLEEPER = """<workflow name="sleeper">
  <channel name="in"><item>x</item></channel>
  <channel name="out"/>
  <process name="nap" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>sleep {secs}; cp in out</script>
  </process>
</workflow>
"""


def _read_until(stream, marker: bytes, timeout=120.0) -> bytes:
    """What a child wrote on ``stream`` up to and including ``marker``."""
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in time; got {got!r}"
        if readable(stream, min(left, 1.0)):
            data = os.read(stream.fileno(), 65536)
            assert data, f"the stream ended without {marker!r}: {got!r}"
            got += data
    return got


def _running_run(d, docker_client):
    """The one run of ``d``, once its task's container runs."""
    runs = os.path.join(d.spool, "runs")
    run = wait_until(lambda: [n for n in os.listdir(runs) if not n.startswith(".")],
                     what="the run to exist")[0]
    wait_until(lambda: [c for c in run_containers(docker_client, run) if c["State"] == "running"],
               what="the task's container to run")
    return run


@pytest.mark.docker
@pytest.mark.parametrize("command", ["watch", "submit --wait"])
def test_watch_and_submit_wait_follow_the_run_through_a_daemon_restart(
        command, daemon_factory, workdir, docker_client, docker_images):
    d = daemon_factory().start()
    xml = write(os.path.join(workdir, "wf", "sleep.xml"), SLEEPER.format(secs=15))
    if command == "watch":
        run = d.flowctl("submit", xml, check=0).stdout.strip()
        cmd = flowctl_cmd(d.socket, "--timeout", 30, "watch", run)
    else:
        cmd = flowctl_cmd(d.socket, "--timeout", 30, "submit", "--wait", xml)
    proc = subprocess.Popen(cmd, env=env_for_subprocess(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        run = _running_run(d, docker_client)
        # following: the first progress line is out, a long-poll waits in the daemon
        err = _read_until(proc.stderr, f"{run}: running, ".encode())
        d.stop()  # SIGTERM: the container goes on, and the restarted daemon takes it back
        d.start()
        out, rest = proc.communicate(timeout=180)
        out, err = out.decode(), (err + rest).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"run       {run}\n" in out and "state     succeeded\n" in out
    assert f"flowd stopped while following run {run}" in err
    assert "flowd is back; following the run again" in err


@pytest.mark.docker
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_watch_says_at_once_that_flowd_stopped_for_good(sig, daemon_factory, workdir,
                                                        docker_client, docker_images):
    """Before, the watch waited out its long-poll (30 s + --timeout) and then
    said flowd was "busy or stuck"; now it says flowd is not running."""
    d = daemon_factory().start()
    xml = write(os.path.join(workdir, "wf", "sleep.xml"), SLEEPER.format(secs=120))
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    proc = subprocess.Popen(flowctl_cmd(d.socket, "--timeout", 2, "watch", run),
                            env=env_for_subprocess(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _running_run(d, docker_client)
        err = _read_until(proc.stderr, f"{run}: running, ".encode())  # it follows the run
        d.stop(sig)
        t0 = time.monotonic()
        out, rest = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        err = (err + rest).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "flowd is not running" in err and "busy or stuck" not in err, err
    assert f"`flowctl watch {run}`" in err  # how to go on
    assert took < 20, f"it took {took:.0f}s to tell flowd stopped (the long-poll is 30s)"


# -- 4. Ctrl-C during submit ------------------------------------------------------

def _files_under(folder):
    return [os.path.join(p, n) for p, _, names in os.walk(folder) for n in names]


@pytest.mark.docker
def test_ctrl_c_while_uploading_says_no_run_was_made(daemon, workdir, docker_images):
    folder = os.path.join(workdir, "wf")
    write(os.path.join(folder, "wf.xml"), """<workflow name="bulky">
  <channel name="in"><item file="big.bin"/></channel><channel name="out"/>
  <process name="p" image="flowd/busybox"><input channel="in"/><output channel="out"/>
    <script>cp in out</script></process>
</workflow>""")
    size = 256 << 20
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        f.truncate(size)
    # --timeout: the daemon is stopped on purpose, and may be slow on a busy machine
    proc = subprocess.Popen(flowctl_cmd(daemon.socket, "--timeout", 120, "submit", os.path.join(folder, "wf.xml")),
                            env=env_for_subprocess(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    uploads = os.path.join(daemon.spool, "uploads")
    try:
        wait_until(lambda: _files_under(uploads), what="the upload to begin")
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # the upload cannot finish meanwhile
        try:
            got = sum(os.lstat(p).st_size for p in _files_under(uploads))
            assert got < size, "the upload ended before the test could stop it: make it bigger"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "no run was made" in err and "Traceback" not in err and out == ""
    assert json.loads(daemon.flowctl("status", "--json", check=0).stdout)["runs"] == []


def _submit_a_big_run(daemon, workdir):
    """A flowctl submit of 20,000 items (seconds of writing: the run is made
    after the request has left), once the daemon is making the run."""
    n = 20_000
    items = "".join(f"<item>{i}</item>" for i in range(n))
    xml = write(os.path.join(workdir, "big", "workflow.xml"), f"""<workflow name="big" mode="service">
  <channel name="a">{items}</channel><channel name="go"/><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="a"/><input channel="go"/><output channel="out"/>
    <script>cp a out</script>
  </process>
</workflow>""")
    runs = os.path.join(daemon.spool, "runs")
    # --timeout: the subject is Ctrl-C, not how fast a busy machine answers each chunk
    proc = subprocess.Popen(flowctl_cmd(daemon.socket, "--timeout", 120, "submit", xml), env=env_for_subprocess(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    wait_until(lambda: [n for n in os.listdir(runs) if n.startswith(".new-")] or proc.poll(),
               timeout=120, what="the run's folder to be in the making")
    return proc


def _runs(daemon):
    return [r["id"] for r in json.loads(daemon.flowctl("status", "--json", check=0).stdout)["runs"]]


@pytest.mark.docker
def test_ctrl_c_after_the_submit_was_sent_prints_the_run_and_how_to_cancel_it(daemon, workdir,
                                                                                 docker_images):
    proc = _submit_a_big_run(daemon, workdir)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
        out, err = out.decode(), err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    run = out.strip()
    assert "interrupted after the workflow was sent" in err, err
    assert f"run {run} was made and goes on; `flowctl cancel {run}` stops it" in err, err
    assert _runs(daemon) == [run]
    daemon.flowctl("cancel", run, check=0)


@pytest.mark.docker
def test_a_second_ctrl_c_stops_waiting_and_says_the_run_may_still_appear(daemon, workdir,
                                                                         docker_images):
    proc = _submit_a_big_run(daemon, workdir)
    try:
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # the run cannot be finished meanwhile
        try:
            assert proc.poll() is None, "the run was made before the test could stop flowd"
            proc.send_signal(signal.SIGINT)
            err = _read_until(proc.stderr, b"Ctrl-C again to stop waiting")
            proc.send_signal(signal.SIGINT)
            out, rest = proc.communicate(timeout=60)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (err + rest).decode()
    assert proc.returncode == 130 and out == b""
    assert ("the run of workflow 'big' may still be made: `flowctl status` lists it once it is, "
            "and `flowctl cancel RUN` stops it") in err
    assert "Traceback" not in err
    (run,) = wait_until(lambda: _runs(daemon), timeout=300, what="the run to be made")
    daemon.flowctl("cancel", run, check=0)


# -- 5. usage: --timeout, validate, push ------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0", "inf", "-inf", "nan", "soon", "1e300", ""])
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_bad_timeout_is_refused_with_exit_2(value, where, tmp_path):
    opt = f"--timeout={value}"  # -inf would read as an option otherwise
    args = [opt, "status"] if where == "before" else ["status", opt]
    res = subprocess.run([sys.executable, "-m", "flowctl", "--socket", str(tmp_path / "s"), *args],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "argument --timeout" in res.stderr and "more than 0" in res.stderr
    assert "e.g. --timeout 30" in res.stderr and "Traceback" not in res.stderr


def test_a_good_timeout_is_taken(tmp_path, capsys):
    assert cli.main(["--socket", str(tmp_path / "none.sock"), "--timeout", "0.5", "status"]) == 3
    assert "not running" in capsys.readouterr().err


def test_validate_says_a_folder_is_a_folder_and_a_missing_file_in_the_documented_form(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "flowctl", *a],  # noqa: E731
                                    env=env_for_subprocess(), capture_output=True, text=True,
                                    timeout=60)
    res = run("validate", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip() == (f"{tmp_path}: error: this is a folder, not a workflow file "
                                  "(fix: name the .xml file inside it)")
    missing = tmp_path / "nope.xml"
    res = run("validate", str(missing))
    assert res.returncode == 2
    assert res.stderr.strip() == f"{missing}: error: no such file (fix: check the path)"
    res = run("validate", "--json", str(missing))
    problem = json.loads(res.stdout)["error"]["problems"][0]
    assert (problem["file"], problem["message"], problem["fix"]) == \
        (str(missing), "no such file", "check the path")


def test_push_of_a_missing_local_file_exits_1(tmp_path):
    res = subprocess.run([sys.executable, "-m", "flowctl", "--socket", str(tmp_path / "s"),
                          "push", "abcd", "requests", str(tmp_path / "photo.jpg")],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{tmp_path / 'photo.jpg'}: cannot read it: No such file or directory" in res.stderr


# -- 6. image references as Docker parses them -------------------------------------------

VALID_IMAGES = [
    "busybox", "busybox:1.36", "flowd/busybox", "python:3.12-slim", "library/busybox:latest",
    "registry.example.com:5000/team/tool:2", "localhost:5000/a/b", "localhost/x",
    "Registry.Example.com/team/tool", "a__b/c-d---e/f.g_h:TAG_1.x-y",
    "alpine@sha256:" + "0123456789abcdef" * 4, "alpine:3.19@sha256:" + "a" * 64,
    "x@sha512:" + "b" * 128, "0/1", "busybox:" + "t" * 128, "a" * 255,
]

INVALID_IMAGES = [
    ("Flowd/Busybox", "must be lowercase", 'image="flowd/busybox"'),
    ("Busybox:1.36", "must be lowercase", 'image="busybox:1.36"'),
    ("a:b:c:d", 'holds ":"', None),
    ("flowd//busybox", "empty path part", 'image="flowd/busybox"'),
    ("/busybox", "empty path part", 'image="busybox"'),
    ("busybox/", "empty path part", 'image="busybox"'),
    ("busybox:", "the tag", None),
    ("busybox:-1", "the tag", None),
    ("busybox:.x", "the tag", None),
    ("busybox:" + "t" * 129, "the tag", None),
    ("busybox:a+b", "the tag", None),
    (":1.36", "no name", None),
    ("@sha256:" + "a" * 64, "no name", None),
    ("busybox@", "digest", None),
    ("busybox@sha256:abc", "64 lowercase hex", None),
    ("busybox@sha256:" + "A" * 64, "64 lowercase hex", None),
    ("busybox@md5:" + "a" * 32, "not one Docker supports", None),
    ("busybox@sha256:" + "a" * 64 + "@sha256:" + "a" * 64, "more than one @", None),
    ("x..y", "not valid", None),
    ("x_.y", "not valid", None),
    ("x___y", "not valid", None),
    ("-x", "not valid", None),
    ("x-", "not valid", None),
    ("my image", "white space", None),
    ("a" * 256, "longer than 255", None),
    ("a" * 252 + ":1.36", "longer than 255", None),  # flowd bounds the whole reference
    ("[::1]:5000/foo", "not a host name", None),  # Docker takes it; flowd has no IPv6 hosts
    ("0123456789abcdef" * 4, "image id", None),
    ("ex_ample.com:80/x", "not a host name", None),
    ("example.com:/x", "not a host name", None),
    ("--privileged", "not valid", None),
]


@pytest.mark.parametrize("ref", VALID_IMAGES)
def test_validate_takes_what_docker_takes(ref, tmp_path):
    assert image_reference_problem(ref) is None
    path = write(str(tmp_path / "wf.xml"),
                 f'<workflow name="w">\n  <process name="p" image="{ref}"><script>true</script>'
                 '</process>\n</workflow>')
    wf, _ = load_workflow(path)
    assert wf.processes["p"].image == ref


@pytest.mark.parametrize("ref,why,fix", INVALID_IMAGES, ids=lambda v: str(v)[:30])
@pytest.mark.parametrize("element", ["process", "defaults"])
def test_validate_refuses_what_docker_refuses_with_line_field_and_fix(ref, why, fix, element,
                                                                      tmp_path):
    if element == "process":
        text = (f'<workflow name="w">\n\n  <process name="p" image="{ref}">'
                '<script>true</script></process>\n</workflow>')
    else:
        text = (f'<workflow name="w">\n\n  <defaults image="{ref}"/>\n'
                '  <process name="p"><script>true</script></process>\n</workflow>')
    path = write(str(tmp_path / "wf.xml"), text)
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    (problem,) = [p for p in info.value.problems if 'attribute "image"' in p.message]
    assert (problem.file, problem.line, problem.element) == (path, 3, element)
    assert problem.message.startswith('attribute "image" is ')
    assert "not a Docker image reference" in problem.message and why in problem.message
    assert problem.fix == (f"write {fix}" if fix else 'write image="busybox:1.36"')
    assert image_reference_problem(ref) is not None


def test_validate_names_a_bad_image_on_the_command_line(tmp_path):
    path = write(str(tmp_path / "wf.xml"), '<workflow name="w">\n  <process name="p" '
                 'image="Flowd/Busybox"><script>true</script></process>\n</workflow>')
    res = subprocess.run([sys.executable, "-m", "flowctl", "validate", path],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f'{path}:2: error: <process>: attribute "image" is "Flowd/Busybox"; it is not a Docker '
        'image reference: the repository name must be lowercase (fix: write image="flowd/busybox")')
