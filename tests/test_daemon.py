"""flowd and flowctl end to end against the real Docker engine, as a user runs them."""
from __future__ import annotations

import grp
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq

from daemon_fixtures import REPO, daemon_user, env_for_subprocess, system_user, wait_until

pytestmark = pytest.mark.docker
EXAMPLES = os.path.join(REPO, "examples")


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    """Every test here needs the engine (fails under CI without it) and flowd/busybox."""


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def submit_wait(daemon, xml, check=0):
    res = daemon.flowctl("submit", "--wait", "--json", xml, check=check)
    return json.loads(res.stdout)


def pull(daemon, run, channel, out):
    daemon.flowctl("pull", run, channel, "--out", out, check=0)
    names = sorted(os.listdir(out))
    return [open(os.path.join(out, n), "rb").read() for n in names]


def run_containers(docker_client, run_id):
    """The run's containers as the engine lists them (dicts; "State" is e.g. "running")."""
    return docker_client.api.containers(all=True, filters={"label": [f"io.flowd.run={run_id}"]})


# -- the examples -------------------------------------------------------------

def test_wordcount_example_merges_counts_and_fans_out(daemon, workdir):
    detail = submit_wait(daemon, os.path.join(EXAMPLES, "wordcount", "workflow.xml"))
    assert detail["state"] == "succeeded"
    run = detail["id"]
    # merge keeps arrival order: the two prose items, then the two poem files by name
    tally = pull(daemon, run, "tally", os.path.join(workdir, "tally"))
    assert [int(x) for x in tally] == [9, 8, 4, 8]
    report = pull(daemon, run, "report", os.path.join(workdir, "report"))
    assert [re.sub(rb"task \d+: ", b"", r).strip() for r in report] == \
        [b"9 words", b"8 words", b"4 words", b"8 words"]
    procs = {p["name"]: p for p in detail["processes"]}
    assert procs["count"]["done"] == 4 and procs["report"]["done"] == 4
    assert docker_containers_gone(run)


def docker_containers_gone(run_id):
    import docker

    client = docker.from_env()
    try:
        return run_containers(client, run_id) == []
    finally:
        client.close()


def test_join_example_pairs_the_ith_items(daemon, workdir):
    detail = submit_wait(daemon, os.path.join(EXAMPLES, "join", "workflow.xml"))
    out = pull(daemon, detail["id"], "messages", os.path.join(workdir, "m"))
    assert out == [b"Hello, Ada!\n", b"Bonjour, Grace!\n", b"Hej, Linus!\n"]


def test_filter_example_drops_items_and_folder_output_gives_several(daemon, workdir):
    detail = submit_wait(daemon, os.path.join(EXAMPLES, "filter", "workflow.xml"))
    chans = {c["name"]: c["depth"] for c in detail["channels"]}
    assert chans["even"] == 0 and chans["numbers"] == 0
    digits = pull(daemon, detail["id"], "digits", os.path.join(workdir, "d"))
    # 12 -> 1 2 and 408 -> 4 0 8; with parallel="2" the two tasks may finish in either order
    assert sorted(d.strip() for d in digits) == sorted([b"1", b"2", b"4", b"0", b"8"])
    assert len(digits) == 5


# -- runs and tasks -------------------------------------------------------------

SLEEPER = """<workflow name="sleeper">
  <channel name="in"><item>x</item></channel>
  <channel name="out"/>
  <process name="nap" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>echo started; sleep {secs}; cp in out</script>
  </process>
</workflow>
"""


def test_cancel_stops_the_containers_and_keeps_the_data(daemon, workdir, docker_client):
    xml = write(os.path.join(workdir, "wf", "sleep.xml"), SLEEPER.format(secs=300))
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: [c for c in run_containers(docker_client, run) if c["State"] == "running"],
               what="the task's container to run")
    res = daemon.flowctl("cancel", run[:6], check=0)
    assert "cancelled" in res.stdout
    wait_until(lambda: json.loads(daemon.flowctl("status", run, "--json").stdout)["state"]
               == "cancelled", what="the run to be cancelled")
    wait_until(lambda: not [c for c in run_containers(docker_client, run)
                            if c["State"] == "running"], what="the container to stop")
    assert pull(daemon, run, "in", os.path.join(workdir, "kept")) == [b"x"]


def test_failed_task_is_shown_with_its_log_and_submit_wait_exits_1(daemon, workdir):
    xml = write(os.path.join(workdir, "wf", "fail.xml"), """<workflow name="fails">
  <channel name="in"><item>data</item></channel><channel name="out"/>
  <process name="boom" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>echo "MARKER-$FLOWD_TASK about to fail" >&amp;2; exit 3</script>
  </process></workflow>""")
    detail = submit_wait(daemon, xml, check=1)
    assert detail["state"] == "failed"
    (failure,) = detail["failures"]
    assert failure["reason"] == "exit status 3"
    assert "MARKER-" in failure["log_tail"]
    text = daemon.flowctl("status", detail["id"], check=0).stdout
    assert "failed" in text and "MARKER-" in text


def test_missing_image_says_it_could_not_be_pulled(daemon, workdir):
    xml = write(os.path.join(workdir, "wf", "img.xml"), """<workflow name="noimage">
  <process name="p" image="flowd/no-such-image:1"><script>true</script></process>
</workflow>""")
    detail = submit_wait(daemon, xml, check=1)
    assert "image flowd/no-such-image:1 is not present and could not be pulled" in \
        detail["failures"][0]["reason"]


def test_a_200_mib_item_passes_through_with_the_daemon_memory_flat(daemon_factory, workdir):
    d = daemon_factory().start()
    folder = os.path.join(workdir, "big")
    os.makedirs(folder)
    digest = hashlib.sha256()
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(200):
            chunk = bytes([i % 251]) + block[1:]
            f.write(chunk)
            digest.update(chunk)
    write(os.path.join(folder, "wf.xml"), """<workflow name="big">
  <channel name="in"><item file="big.bin"/></channel><channel name="out"/>
  <process name="copy" image="flowd/busybox"><input channel="in"/><output channel="out"/>
    <script>cat in > out</script></process></workflow>""")
    before = _rss_peak(d.proc.pid)
    detail = submit_wait(d, os.path.join(folder, "wf.xml"))
    assert detail["state"] == "succeeded"
    out = os.path.join(workdir, "pulled")
    d.flowctl("pull", detail["id"], "out", "--out", out, check=0)
    (name,) = os.listdir(out)
    got = hashlib.sha256()
    with open(os.path.join(out, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()
    peak = _rss_peak(d.proc.pid)
    # the item is 200 MiB; the daemon streams it in 1 MiB chunks
    assert peak - before < 40 * 1024, f"daemon peak RSS grew by {(peak - before) // 1024} MiB"


def _rss_peak(pid) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_sigterm_leaves_containers_running_and_the_next_start_takes_them_back(
        daemon_factory, workdir, docker_client):
    d = daemon_factory().start()
    xml = write(os.path.join(workdir, "wf", "sleep.xml"), SLEEPER.format(secs=4))
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: [c for c in run_containers(docker_client, run) if c["State"] == "running"],
               what="the task's container to run")
    assert d.stop(signal.SIGTERM) == 0
    assert any("STOPPING=1" in m for m in d.messages)
    assert [c["State"] for c in run_containers(docker_client, run)] == ["running"]
    d.start()
    detail = json.loads(d.flowctl("watch", run, "--json", check=0).stdout)
    assert detail["state"] == "succeeded"
    assert pull(d, run, "out", os.path.join(workdir, "out")) == [b"x"]
    started = [line for line in open(os.path.join(
        d.spool, "runs", run, "logs", os.listdir(os.path.join(d.spool, "runs", run, "logs"))[0]))]
    assert started.count("started\n") == 1  # the script ran once, not twice


# -- the daemon and its socket ---------------------------------------------------

def test_daemon_reports_ready_and_status_to_systemd_and_socket_is_0660(daemon):
    assert any("READY=1" in m and "STATUS=" in m for m in daemon.messages)
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == "0o660"
    res = daemon.flowctl("status", check=0)
    assert res.stdout.strip() == "no runs"


def test_second_daemon_on_the_same_spool_refuses_to_start(daemon, daemon_factory):
    other = daemon_factory(spool=daemon.spool)
    proc = subprocess.run([sys.executable, "-m", "flowd", "--config", "/dev/null",
                           "--spool", daemon.spool, "--socket", other.socket],
                          env=env_for_subprocess(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "already using the spool" in proc.stderr and str(daemon.proc.pid) in proc.stderr
    assert "Traceback" not in proc.stderr
    daemon.flowctl("status", check=0)  # the first one is unharmed


def test_garbage_and_oversized_frames_leave_the_daemon_answering(daemon):
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect("ipc://" + daemon.socket)
        rnd = os.urandom(10_000 * 16)
        for i in range(10_000):
            s.send(rnd[i * 16:(i + 1) * 16], zmq.NOBLOCK if i % 100 else 0)
        s.send_multipart([b"{}", b"x", b"y"])
        s.send(b"x" * (3 << 20))  # over the limit: zmq drops this peer
        s.close(0)
    finally:
        ctx.term()
    res = daemon.flowctl("status", check=0)
    assert res.stdout.strip() == "no runs"


def test_a_big_submission_is_written_while_the_daemon_goes_on_answering(daemon, workdir):
    """20,000 items take seconds to write durably: the loop serves others meanwhile."""
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
    submit = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", daemon.socket,
                               "submit", xml], env=env_for_subprocess(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: [n for n in os.listdir(runs) if n.startswith(".new-")], timeout=60,
                   what="the run's folder to be in the making")
        res = daemon.flowctl("--timeout", "5", "status", "--json", check=0)
        making = [n for n in os.listdir(runs) if n.startswith(".new-")]
        assert making, "the run was made before status answered: make the workflow bigger"
        assert json.loads(res.stdout)["runs"] == []  # not a run until it is whole
        out, err = submit.communicate(timeout=300)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, err
    run = out.strip()
    assert making == [f".new-{run}"]
    detail = json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)
    assert {c["name"]: c["depth"] for c in detail["channels"]}["a"] == n
    daemon.flowctl("cancel", run, check=0)


def test_replies_carry_the_request_id_and_errors_are_codes_not_tracebacks(daemon):
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect("ipc://" + daemon.socket)
        s.send(json.dumps({"v": 1, "id": "r1", "cmd": "status", "args": {"run": "zzzz"}}).encode())
        assert s.poll(10_000)
        reply = json.loads(s.recv())
        assert reply["id"] == "r1" and reply["ok"] is False
        assert reply["error"]["code"] == "not_found"
        s.send(b"not json at all")
        assert s.poll(10_000)
        reply = json.loads(s.recv())
        assert reply["error"]["code"] == "protocol" and "Traceback" not in reply["error"]["message"]
        s.close(0)
    finally:
        ctx.term()


def test_unreachable_daemon_exits_3_and_says_why(daemon_factory, workdir):
    d = daemon_factory()
    missing = os.path.join(workdir, "nope.sock")
    res = subprocess.run([sys.executable, "-m", "flowctl", "--socket", missing, "status"],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=30)
    assert res.returncode == 3
    assert "not running" in res.stderr and missing in res.stderr and "flowd" in res.stderr
    # a socket file nobody listens on (a daemon that died)
    stale = os.path.join(os.path.dirname(d.socket), "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "flowctl", "--socket", stale, "--timeout", "3",
                          "status"], env=env_for_subprocess(), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 3 and "not running" in res.stderr and "nothing listens" in res.stderr
    assert time.monotonic() - t0 < 10
    # a daemon that is there but does not answer (stopped)
    d.start()
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        res = d.flowctl("--timeout", "2", "status")
        assert res.returncode == 3
        assert "did not answer within 2s" in res.stderr
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def test_run_names_by_unique_prefix_and_ambiguous_is_usage_error(daemon, workdir):
    xml = write(os.path.join(workdir, "wf", "ok.xml"), """<workflow name="ok">
  <process name="p" image="flowd/busybox"><script>true</script></process></workflow>""")
    runs = [daemon.flowctl("submit", xml, check=0).stdout.strip() for _ in range(2)]
    for r in runs:
        detail = json.loads(daemon.flowctl("watch", r[:5], "--json", check=0).stdout)
        assert detail["id"] == r and detail["state"] == "succeeded"
    res = daemon.flowctl("status", "")  # empty prefix: list all
    assert all(r in res.stdout for r in runs)
    res = daemon.flowctl("status", "nomatch")
    assert res.returncode == 1 and "no run matches" in res.stderr


def test_invalid_workflow_is_refused_by_submit_with_exit_2_naming_the_line(daemon, workdir):
    xml = write(os.path.join(workdir, "wf", "bad.xml"), """<workflow name="bad">
  <channel name="a"/>
  <process name="p" image="flowd/busybox">
    <input channel="nope"/>
    <script>true</script>
  </process>
</workflow>""")
    res = daemon.flowctl("submit", xml)
    assert res.returncode == 2
    assert "bad.xml:4" in res.stderr and "nope" in res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads(daemon.flowctl("status", "--json").stdout)["runs"] == []


def test_watchdog_is_pinged_when_systemd_asks(daemon_factory):
    d = daemon_factory().start(WATCHDOG_USEC="400000")
    d.wait_for("WATCHDOG=1", timeout=10)
    count = sum("WATCHDOG=1" in m for m in d.messages)
    d.wait_for("WATCHDOG=1", timeout=10)
    assert sum("WATCHDOG=1" in m for m in d.messages) >= count


def test_engine_down_is_reported_and_the_run_resumes_when_it_returns(daemon_factory, workdir):
    from test_docker_executor import EngineProxy

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    proxy = EngineProxy(os.path.join(workdir, "engine.sock"), host[len("unix://"):])
    d = daemon_factory(env={"DOCKER_HOST": "unix://" + proxy.path})
    try:
        d.start()  # no engine behind the proxy yet
        xml = write(os.path.join(workdir, "wf", "ok.xml"), SLEEPER.format(secs=0))
        run = d.flowctl("submit", xml, check=0).stdout.strip()
        d.wait_for("UNAVAILABLE", timeout=30)  # STATUS= tells systemd
        status = d.flowctl("status", check=0).stdout
        assert "Docker engine is unavailable" in status
        assert json.loads(d.flowctl("status", run, "--json").stdout)["state"] == "running"
        proxy.serve()  # the engine is back
        # like /run/docker.sock (root:docker 0660): the daemon reaches it through its docker group
        os.chown(proxy.path, 0, grp.getgrnam("docker").gr_gid)
        os.chmod(proxy.path, 0o660)
        detail = json.loads(d.flowctl("watch", run, "--json", check=0).stdout)
        assert detail["state"] == "succeeded"
        assert pull(d, run, "out", os.path.join(workdir, "out")) == [b"x"]
    finally:
        proxy.cut()


NONROOT = "flowd-test"


@pytest.fixture
def nonroot_user():
    return daemon_user(NONROOT)


def test_daemon_as_a_non_root_docker_group_member_collects_any_uids_outputs(
        daemon_factory, workdir, nonroot_user):
    os.chmod(workdir, 0o755)
    spool = os.path.join(workdir, "spool")
    os.mkdir(spool, 0o750)
    os.chown(spool, nonroot_user.pw_uid, nonroot_user.pw_gid)
    # every test daemon runs non-root; this one also runs Debian's python3 with its
    # packaged libraries, as the .deb does, whichever Python runs the tests
    check = subprocess.run(["/usr/bin/python3", "-c", "import docker, zmq, lxml, sdnotify"],
                           capture_output=True)
    if check.returncode:
        if os.environ.get("CI"):
            pytest.fail("Debian's python3-docker/zmq/lxml/sdnotify are needed (.ci/setup-host)")
        pytest.skip("Debian's python3 libraries are not installed")
    # the images' own users (root, 65534), not flowd's (the default container_user)
    cfg = write(os.path.join(workdir, "flowd.toml"), 'container_user = "image"\n')
    d = daemon_factory(spool=spool, user=NONROOT, python="/usr/bin/python3",
                       extra_args=["--config", cfg]).start()
    xml = write(os.path.join(workdir, "wf", "uids.xml"), """<workflow name="uids">
  <channel name="in"><item>abc</item></channel>
  <channel name="mid"/><channel name="out"/>
  <process name="asroot" image="flowd/busybox">
    <input channel="in"/><output channel="mid"/>
    <script>id -u > /task/uid; cp in mid; chmod 600 mid</script>
  </process>
  <process name="asnobody" image="flowd/busybox-nobody">
    <input channel="mid"/><output channel="out"/>
    <script>mkdir out; cp mid out/1; id -u > out/2; chmod 600 out/*; chmod 700 out</script>
  </process>
</workflow>""")
    detail = submit_wait(d, xml)
    assert detail["state"] == "succeeded", d.log()
    out = pull(d, detail["id"], "out", os.path.join(workdir, "pulled"))
    assert out == [b"abc", b"65534\n"]
    run_dir = os.path.join(spool, "runs", detail["id"])
    assert os.listdir(os.path.join(run_dir, "tasks")) == []  # work folders deleted
    owners = {os.stat(os.path.join(run_dir, "channels", "out", n)).st_uid
              for n in os.listdir(os.path.join(run_dir, "channels", "out"))}
    assert owners <= {nonroot_user.pw_uid, 65534, 0}


def test_a_user_outside_the_sockets_group_is_refused_and_callers_are_logged(daemon, workdir):
    other = system_user("flowd-other")
    os.chmod(os.path.dirname(daemon.socket), 0o755)  # the folder is open; the socket is 0660
    res = subprocess.run(["/usr/bin/python3", "-m", "flowctl", "--socket", daemon.socket, "status"],
                         env=env_for_subprocess(), capture_output=True, text=True, timeout=60,
                         user=other.pw_uid, group=other.pw_gid, extra_groups=[], cwd="/")
    assert res.returncode == 3, res.stderr
    assert "permission denied" in res.stderr and daemon.socket in res.stderr
    xml = write(os.path.join(workdir, "wf", "ok.xml"), """<workflow name="ok">
  <process name="p" image="flowd/busybox"><script>true</script></process></workflow>""")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    daemon.flowctl("cancel", run)
    log = daemon.log()
    assert re.search(r"uid 0 \(root\) pid \d+: submit name=ok.xml", log), log
    assert re.search(rf"uid 0 \(root\) pid \d+: cancel runs=\['{run}'\]", log), log
    assert f"run {run} submitted by root" in log


def test_a_systemd_that_stops_reading_never_blocks_the_loop(daemon_factory):
    # watchdog pings every 10 ms; after READY this test reads none of them, so the
    # notify socket's queue (10 datagrams) is full within a fraction of a second
    d = daemon_factory().start(WATCHDOG_USEC="20000")
    for _ in range(5):
        assert d.flowctl("--timeout", "5", "status", check=0).stdout.strip() == "no runs"
