"""Hostile scripts, damaged items and the containers flowd makes, against the real engine."""
from __future__ import annotations

import json
import os

import pytest
from test_daemon import pull, run_containers, submit_wait, wait_until, write

pytestmark = pytest.mark.docker
SECRET = b"host secret 8f2e1c"

HOSTILE = {
    "symlink": ("ln -s {sentinel} out", "is a symbolic link"),
    "hardlink": ("echo x > a; ln a out", "is a hard link"),
    "fifo": ("mkfifo out", "is a FIFO"),
    "manyfiles": ("mkdir out; cd out; i=0; while [ $i -lt 100000 ]; do : > $i; i=$((i+1)); done",
                  "holds more than 10000 entries"),
    "oversized": ("head -c 2097152 /dev/zero > out", "the limit is 1048576"),
    "escape": ("mkdir out; ln -s {sentinel} out/1", "is a symbolic link"),
}


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    pass


def test_hostile_outputs_fail_their_task_and_nothing_outside_the_spool_is_touched(
        daemon_factory, workdir):
    sentinel = os.path.join(workdir, "sentinel")
    with open(sentinel, "wb") as f:
        f.write(SECRET)
    os.chmod(sentinel, 0o644)
    cfg = write(os.path.join(workdir, "flowd.toml"), 'max_output_size = "1m"\n')
    d = daemon_factory(extra_args=["--config", cfg]).start()
    procs = "".join(f"""
  <channel name="{name}"><item>x</item></channel><channel name="{name}-out"/>
  <process name="{name}" image="flowd/busybox" on-failure="continue" timeout="2m">
    <input channel="{name}" as="in"/><output channel="{name}-out" as="out"/>
    <script>{script.format(sentinel=sentinel)}</script>
  </process>""" for name, (script, _) in HOSTILE.items())
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), f"""<workflow name="hostile">{procs}
  <channel name="ok"><item>fine</item></channel><channel name="ok-out"/>
  <process name="undeclared" image="flowd/busybox">
    <input channel="ok" as="in"/><output channel="ok-out" as="out"/>
    <script>echo junk > extra; mkdir scratch; echo more > scratch/f; cp in out</script>
  </process>
</workflow>""")
    detail = submit_wait(d, xml)
    assert detail["state"] == "succeeded"  # on-failure="continue"
    reasons = {f["process"]: f["reason"] for f in detail["failures"]}
    for name, (_, expected) in HOSTILE.items():
        assert expected in reasons[name], (name, reasons.get(name))
        assert reasons[name].startswith("bad output:")
    depths = {c["name"]: c["depth"] for c in detail["channels"]}
    assert all(depths[f"{name}-out"] == 0 for name in HOSTILE)  # nothing published
    # undeclared names are never collected: only the declared output became an item
    assert pull(d, detail["id"], "ok-out", os.path.join(workdir, "ok")) == [b"fine"]
    with open(sentinel, "rb") as f:
        assert f.read() == SECRET
    assert_never_in_spool(d.spool, SECRET)


def test_every_container_flowd_creates_is_hardened(daemon_factory, workdir, docker_client):
    cfg = write(os.path.join(workdir, "flowd.toml"), 'allowed_networks = ["none", "bridge"]\n')
    daemon = daemon_factory(extra_args=["--config", cfg]).start()
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), """<workflow name="audit">
  <channel name="a"><item>1</item></channel><channel name="b"><item>2</item></channel>
  <channel name="a-out"/><channel name="b-out"/>
  <process name="plain" image="flowd/busybox" memory="64m" cpus="0.5">
    <input channel="a"/><output channel="a-out"/>
    <script>sleep 30</script>
  </process>
  <process name="net" image="flowd/busybox" network="bridge">
    <input channel="b"/><output channel="b-out"/>
    <script>sleep 30</script>
  </process>
</workflow>""")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: sum(c["State"] == "running" for c in run_containers(docker_client, run))
               == 2, what="both containers to run")
    spool = os.path.realpath(daemon.spool)
    for c in run_containers(docker_client, run):
        info = docker_client.api.inspect_container(c["Id"])
        hc = info["HostConfig"]
        process = info["Config"]["Labels"]["io.flowd.process"]
        assert hc["Privileged"] is False
        assert "no-new-privileges" in hc["SecurityOpt"]
        assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
        assert hc["PidsLimit"] and hc["PidsLimit"] > 0
        assert hc["AutoRemove"] is False
        assert hc["NetworkMode"] == ("bridge" if process == "net" else "none")
        if process == "plain":
            assert hc["Memory"] == 64 * 1024 * 1024 and hc["NanoCpus"] == 500_000_000
        # flowd's own uid:gid (config container_user = "daemon", the default): all the
        # script writes is flowd's, and it is not the image's root
        uid, gid = (daemon.pw.pw_uid, daemon.pw.pw_gid) if daemon.user else (os.geteuid(), os.getegid())
        assert info["Config"]["User"] == f"{uid}:{gid}"
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        # only the task's own folder, its script and its inputs; nothing else of the host
        assert set(mounts) == {"/task", "/.flowd/script", "/task/" + ("a" if process == "plain" else "b")}
        for m in mounts.values():
            assert m["Source"].startswith(os.path.join(spool, "runs", run) + "/")
            assert m["RW"] == (m["Destination"] == "/task")
    daemon.flowctl("cancel", run, check=0)


def test_a_flipped_byte_on_disk_is_quarantined_not_fed(daemon, workdir, docker_client):
    xml = write(os.path.join(workdir, "wf", "workflow.xml"), """<workflow name="corrupt" mode="service">
  <channel name="a"><item>precious data</item></channel><channel name="b"/><channel name="out"/>
  <process name="join" image="flowd/busybox">
    <input channel="a"/><input channel="b"/><output channel="out"/>
    <script>cat a b > out</script>
  </process>
</workflow>""")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    folder = os.path.join(daemon.spool, "runs", run, "channels", "a")
    (name,) = os.listdir(folder)
    with open(os.path.join(folder, name), "r+b") as f:  # bit rot while it waits
        f.write(b"X")
    daemon.flowctl("push", run, "b", input="partner", check=0)

    def detail():
        return json.loads(daemon.flowctl("status", run, "--json", check=0).stdout)

    wait_until(lambda: detail()["quarantined"], what="the damaged item to be quarantined")
    d = detail()
    (q,) = d["quarantined"]
    assert q["channel"] == "a" and "checksum mismatch" in q["reason"]
    depths = {c["name"]: c["depth"] for c in d["channels"]}
    assert depths == {"a": 0, "b": 1, "out": 0}  # the partner went back; nothing published
    assert run_containers(docker_client, run) == []  # no script ever saw it
    kept = os.path.join(daemon.spool, "runs", run, "quarantine", name)
    assert open(kept, "rb").read() == b"Xrecious data"  # kept as found, never deleted
    text = daemon.flowctl("status", run, check=0).stdout
    assert "quarantined: item" in text and "checksum mismatch" in text
    daemon.flowctl("cancel", run, check=0)


def assert_never_in_spool(spool: str, secret: bytes) -> None:
    """No file of the spool holds ``secret``: a hostile output was never read into it."""
    for root, _, files in os.walk(spool):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                assert secret not in f.read(), path
