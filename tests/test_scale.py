"""Big runs (issue 13, "Big runs stay light"), as a user sees them: a submit of
many small items is whole and in order, also across a kill -9 of the daemon;
a pull of many items gives every one byte-identical and in order; a pull that
stops half-way leaves no partial file. No container runs: the process waits on
a channel nothing fills (a service run). Timings are benchmarks/scale.py's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

from daemon_fixtures import env_for_subprocess, wait_until

N = 20_000  # items: a few seconds to submit and to pull

WAITING = """<workflow name="many" mode="service">
  <channel name="a"><items glob="data/*"/></channel>
  <channel name="go"/><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="a"/><input channel="go"/><output channel="out"/>
    <script>cp a out</script>
  </process>
</workflow>
"""


def sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # see test_flowctl_safety.sigint_default


def content(i: int) -> bytes:
    if i == 7:
        return b""  # an empty item
    if i == 11:
        return bytes(range(256)) * 2048  # 512 KiB: read in chunks, not in a pull's batch
    return f"item {i}\n".encode() * (1 + i % 5)


def make_workflow(workdir: str, n: int = N) -> str:
    data = os.path.join(workdir, "wf", "data")
    os.makedirs(data)
    for i in range(n):
        with open(os.path.join(data, f"{i:06}"), "wb") as f:
            f.write(content(i))
    xml = os.path.join(workdir, "wf", "many.xml")
    with open(xml, "w") as f:
        f.write(WAITING)
    return xml


def depth(daemon, run: str, channel: str = "a") -> int:
    detail = json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)
    return {c["name"]: c["depth"] for c in detail["channels"]}[channel]


def runs_of(daemon) -> list[dict]:
    return json.loads(daemon.flowctl("status", "--json", check=0).stdout)["runs"]


def pulled(folder: str) -> list[bytes]:
    return [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))]


def test_a_big_submit_is_whole_and_a_pull_gives_every_item_in_order(daemon, workdir):
    xml = make_workflow(workdir)
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    assert depth(daemon, run) == N
    out = os.path.join(workdir, "out")
    res = daemon.flowctl("pull", run, "a", "--out", out, "--json", check=0)
    files = json.loads(res.stdout)["files"]
    assert [f["seq"] for f in files] == sorted(f["seq"] for f in files)  # in channel order
    assert len(files) == N and sorted(os.listdir(out)) == [os.path.basename(f["file"]) for f in files]
    assert pulled(out) == [content(i) for i in range(N)]  # byte-identical, glob order kept
    assert [f["size"] for f in files] == [len(content(i)) for i in range(N)]
    # and again after a restart (the channel is read back from disk)
    daemon.stop()
    daemon.start()
    assert depth(daemon, run) == N
    again = os.path.join(workdir, "again")
    daemon.flowctl("pull", run, "a", "--out", again, check=0)
    assert pulled(again) == [content(i) for i in range(N)]


def test_kill9_during_or_right_after_a_big_submit_leaves_the_run_whole_or_absent(daemon, workdir):
    xml = make_workflow(workdir)
    runs_dir = os.path.join(daemon.spool, "runs")
    # during: once the daemon writes the run's folder (a hidden .new- folder)
    proc = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", daemon.socket,
                             "submit", xml], env=env_for_subprocess(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(n.startswith(".new-") for n in os.listdir(runs_dir)) or
               proc.poll() is not None, 120, "the run's folder to be written")
    daemon.kill9()
    proc.communicate(timeout=60)
    daemon.start()
    for r in runs_of(daemon):  # none, or a whole one
        assert depth(daemon, r["id"]) == N, r
    assert not [n for n in os.listdir(runs_dir) if n.startswith(".")]
    # right after: the submit was answered, so the run is there, whole, in order
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    daemon.kill9()
    daemon.start()
    assert run in [r["id"] for r in runs_of(daemon)]
    assert depth(daemon, run) == N
    out = os.path.join(workdir, "out")
    daemon.flowctl("pull", run, "a", "--out", out, check=0)
    assert pulled(out) == [content(i) for i in range(N)]


def _pull_then(daemon, workdir, run: str, stop) -> tuple[subprocess.Popen, str]:
    """Start a pull, freeze the daemon once some items are written, then ``stop(proc)``."""
    out = tempfile.mkdtemp(prefix="stopped-", dir=workdir)
    proc = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", daemon.socket,
                             "pull", run, "a", "--out", out], env=env_for_subprocess(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    wait_until(lambda: len(os.listdir(out)) > 100 or proc.poll() is not None, 120,
               "the pull to write some items")
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # the pull cannot finish meanwhile
    try:
        assert proc.poll() is None, "the pull ended before the test could stop it"
        stop(proc)
        proc.wait(60)
    finally:
        if daemon.proc.poll() is None:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    return proc, out


def _only_whole_items(out: str) -> None:
    names = sorted(os.listdir(out))
    assert names and len(names) < N
    assert not [n for n in names if n.endswith(".part") or n.startswith(".")], names[-5:]
    want = {f"{i + 1:016}": content(i) for i in range(N)}  # item numbers follow the glob's order
    for n in names:
        assert open(os.path.join(out, n), "rb").read() == want[n], n


def test_a_pull_stopped_half_way_leaves_no_partial_file(daemon, workdir):
    xml = make_workflow(workdir)
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()

    proc, out = _pull_then(daemon, workdir, run, lambda p: p.send_signal(signal.SIGINT))
    assert proc.returncode == 130, proc.stderr.read()
    _only_whole_items(out)

    proc, out = _pull_then(daemon, workdir, run, lambda p: p.terminate())  # SIGTERM
    assert proc.returncode == 130, proc.stderr.read()
    _only_whole_items(out)

    proc, out = _pull_then(daemon, workdir, run, lambda p: daemon.kill9())  # the daemon gone
    assert proc.returncode == 3, proc.stderr.read()
    _only_whole_items(out)
