"""The spool's filesystem fills up during a run: flowd pauses, refuses, then resumes."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest
from test_daemon import pull, wait_until, write

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(workdir: str, options: str):
    """A small filesystem of its own (``options``: tmpfs's size=, nr_inodes=), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = os.path.join(workdir, "fs")
    os.mkdir(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0755", "flowd-test", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def small_fs(workdir, docker_images):
    with tmpfs(workdir, "size=48m") as path:
        yield path


def daemon_status(d) -> dict:
    """``flowctl status --json``: the daemon's state (disk_ok among it)."""
    return json.loads(d.flowctl("status", "--json", check=0).stdout)


def daemon_on(daemon_factory, fs: str, workdir: str, floor: str):
    """A daemon whose spool is on ``fs``, with min_free_space ``floor``."""
    cfg = write(os.path.join(workdir, "flowd.toml"), f'min_free_space = "{floor}"\n')
    return daemon_factory(spool=os.path.join(fs, "spool"), extra_args=["--config", cfg]).start()


def test_disk_full_pauses_refuses_and_resumes_with_nothing_lost(daemon_factory, small_fs, workdir):
    d = daemon_on(daemon_factory, small_fs, workdir, "12m")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * 24 * MiB)  # about 24 MiB free is left; the run needs 20 more
    items = "".join(f"<item>{i}</item>" for i in range(5))
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="fill" mode="service">
  <channel name="in">{items}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>head -c 4194304 /dev/zero > out</script>
  </process>
</workflow>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()

    def status():
        return daemon_status(d)

    wait_until(lambda: not status()["disk_ok"], timeout=120, what="the floor to be reached")
    d.wait_for("DISK FULL", timeout=30)  # systemd's STATUS= says so
    assert "below its free-space floor" in d.flowctl("status", check=0).stdout
    # refused with a clear error, and nothing half-written
    res = d.flowctl("submit", xml)
    assert res.returncode == 1 and "min_free_space" in res.stderr and "Traceback" not in res.stderr
    res = d.flowctl("push", run, "in", input="more")
    assert res.returncode == 1 and "min_free_space" in res.stderr
    assert len(status()["runs"]) == 1
    paused = {c["name"]: c["depth"] for c in json.loads(
        d.flowctl("status", run, "--json", check=0).stdout)["channels"]}
    assert paused["in"] >= 1  # some items wait
    assert d.proc.poll() is None  # the daemon stays up
    os.unlink(filler)  # space comes back: flowd resumes by itself
    wait_until(lambda: {c["name"]: c["depth"] for c in json.loads(
        d.flowctl("status", run, "--json", check=0).stdout)["channels"]}["out"] == 5,
        timeout=120, what="the run to finish its items")
    out = pull(d, run, "out", os.path.join(workdir, "pulled"))
    assert [len(x) for x in out] == [4 * MiB] * 5  # every item whole, none lost
    d.flowctl("cancel", run, check=0)


def test_a_split_that_takes_the_last_inodes_waits_and_is_collected_whole_once_freed(
        daemon_factory, workdir, docker_images):
    """Every item is a file: a split of more lines than the spool has inodes meets
    ENOSPC with bytes to spare. The task waits (its collect, off the loop, is
    deferred like a result), the spool counts as full (free inodes below flowd's
    floor: runs pause, status says so), and once inodes are freed the split is
    collected again, whole: every line once, in order."""
    with tmpfs(workdir, "size=64m,nr_inodes=3000") as path:
        d = daemon_on(daemon_factory, path, workdir, "1m")
        n = 4000
        xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="inodes">
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <output channel="out" from="stdout" split="lines"/>
    <script>seq 1 {n}</script>
  </process>
</workflow>""")
        run = d.flowctl("submit", xml, check=0).stdout.strip()

        def status():
            return daemon_status(d)

        wait_until(lambda: not status()["disk_ok"], timeout=120, what="the spool to count as full")
        wait_until(lambda: "the task waits for free space" in d.log(), timeout=60,
                   what="the collect's answer to be deferred")
        assert "inodes free, below flowd's floor" in d.log()
        assert "Traceback" not in d.log() and d.proc.poll() is None
        detail = json.loads(d.flowctl("status", run, "--json", check=0).stdout)
        assert detail["state"] == "running", detail
        subprocess.run(["mount", "-o", "remount,nr_inodes=20000", path], check=True)
        wait_until(lambda: json.loads(d.flowctl("status", run, "--json", check=0).stdout)["state"]
                   == "succeeded", timeout=120, what="the run to end once inodes are freed")
        assert status()["disk_ok"]
        out = pull(d, run, "out", os.path.join(workdir, "pulled"))
        assert out == [b"%d" % i for i in range(1, n + 1)]
        d.stop()
