"""Warm containers against the real engine, with the daemon run as the unit runs it
(non-root flowd-test, see daemon_fixtures): every SPEC section 3 promise in warm mode,
beside the fresh one, and the pool's own rules (SPEC 6.1).

Waits are for conditions (wait_until), never for durations.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import threading
import uuid

import pytest

from daemon_fixtures import REPO, env_for_subprocess, readable, wait_until

pytestmark = pytest.mark.docker
EXAMPLES = os.path.join(REPO, "examples")
WAIT = 120  # seconds: the bound on any one condition


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    """Every test here needs the engine (fails under CI without it) and flowd/busybox."""


# -- helpers ---------------------------------------------------------------------------------

def submit_wait(daemon, path, *args):
    out = daemon.flowctl("submit", "--wait", "--json", path, *args, check=None)
    return json.loads(out.stdout)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def start(daemon_factory, workdir, toml: str = ""):
    """A daemon (non-root, as the unit runs it) with ``toml`` as its config file."""
    conf = write(os.path.join(workdir, "flowd.toml"), toml)
    return daemon_factory(extra_args=["--config", conf]).start()


def workflow(workdir, body: str, name: str = "w", mode: str = "batch") -> str:
    folder = os.path.join(workdir, "wf-" + uuid.uuid4().hex[:6])
    return write(os.path.join(folder, "workflow.xml"),
                 f'<workflow name="{name}" mode="{mode}">{body}\n</workflow>\n')


def items(*values: str) -> str:
    return "".join(f"<item>{v}</item>" for v in values)


def detail(d, run) -> dict:
    return json.loads(d.flowctl("status", run, "--json", check=0).stdout)


def pull(d, run, channel, out) -> list[bytes]:
    d.flowctl("pull", run, channel, "--out", out, check=0)
    return [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]


def reasons(det) -> dict[str, str]:
    return {f["process"]: f["reason"] for f in det["failures"]}


def spool_containers(client, d, *, running_only=False, **labels) -> list[dict]:
    want = [f"io.flowd.spool={os.path.realpath(d.spool)}"] + [
        f"io.flowd.{k}={v}" for k, v in labels.items()]
    return client.api.containers(all=not running_only, filters={"label": want})


def run_running(client, d, run) -> list[dict]:
    return spool_containers(client, d, running_only=True, run=run)


def host_processes(word: str) -> list[int]:
    """Host pids whose command line holds ``word`` (a sleep's unique argument)."""
    found = []
    needle = word.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def hostnames(outs: list[bytes]) -> list[str]:
    return [re.search(rb"host=(\S+)", o).group(1).decode() for o in outs]


# -- the existing end-to-end check ------------------------------------------------------------

def test_wordcount_example_in_warm_containers_gives_what_fresh_gives(daemon_factory, workdir):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write('default_container = "warm"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    detail = submit_wait(d, os.path.join(EXAMPLES, "wordcount", "workflow.xml"))
    assert detail["state"] == "succeeded", detail
    out = os.path.join(workdir, "tally")
    d.flowctl("pull", detail["id"], "report", "--out", out, check=0)
    report = [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]
    assert [re.sub(rb"task \w+: ", b"", r).strip() for r in report] == \
        [b"9 words", b"8 words", b"4 words", b"8 words"]
    status = d.flowctl("status", check=0).stdout
    assert "warm" in status


# -- SPEC section 3 in warm mode ------------------------------------------------------------------

ISOLATION = """
  <channel name="in">{items}</channel><channel name="out"/>
  <process name="iso" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>
count() {{  # processes whose command line is exactly "sleep TAG", by ps and by /proc
  n=0; for p in /proc/[0-9]*; do [ "$(tr '\\0' ' ' &lt; $p/cmdline 2>/dev/null)" = "sleep {tag} " ] &amp;&amp; n=$((n+1)); done
  echo "ps: $(ps -o args | grep -c '^[s]leep {tag}$') proc: $n"
}}
if [ "$(cat in)" = first ]; then
  echo planted > /task/planted; echo planted > /tmp/planted; mkdir /tmp/dir; echo x > /tmp/dir/f
  sleep {tag} &amp;
  setsid sleep {tag} &amp;
  i=0; while [ "$(count)" != "ps: 2 proc: 2" ] &amp;&amp; [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  r="host=$(hostname)
$(count)"
else
  r="host=$(hostname)
task: $(ls -A /task | grep -v '^out$' | tr '\\n' ' ')
tmp: $(ls -A /tmp | tr '\\n' ' ')
$(count)"
fi
echo "$r" > out
</script>
  </process>"""


def test_isolation_a_warm_task_sees_no_file_or_process_of_the_task_before(
        daemon_factory, workdir, docker_client):
    """Task 1 leaves files in /task and /tmp and a background and a setsid sleep; task 2,
    in the same container (same hostname: the agent killed the sleeps, so the container
    was kept), finds only its own input, an empty /tmp, and no sleep."""
    d = start(daemon_factory, workdir)
    tag = str(900000 + os.getpid() % 99999)
    det = submit_wait(d, workflow(workdir, ISOLATION.format(items=items("first", "second"), tag=tag)))
    assert det["state"] == "succeeded", (det, d.log())
    first, second = pull(d, det["id"], "out", os.path.join(workdir, "out"))
    assert first.decode().endswith("ps: 2 proc: 2\n"), first  # the check sees both sleeps
    text = second.decode()
    assert "task: in \n" in text, text  # only its own input (and the output it writes)
    assert "tmp: \n" in text, text  # /tmp empty
    assert text.endswith("ps: 0 proc: 0\n"), text  # no sleep of task 1
    assert hostnames([first]) == hostnames([second]), "task 2 ran in another container"
    assert host_processes(tag) == []  # nor on the host


def test_a_warm_timeout_kills_the_sleep_child_and_retires_the_container(
        daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir)
    tag = str(800000 + os.getpid() % 99999)
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="slow" image="flowd/busybox" container="warm" timeout="2s">
    <input channel="in"/><output channel="out"/>
    <script>echo started; sleep {tag} &amp; sleep {tag}; cp in out</script>
  </process>""")
    det = submit_wait(d, xml)
    assert det["state"] == "failed", det
    assert "timed out after 2s" in reasons(det)["slow"], det["failures"]
    wait_until(lambda: run_running(docker_client, d, det["id"]) == [], WAIT,
               "the timed-out warm container to go")
    wait_until(lambda: host_processes(tag) == [], WAIT, "no sleep left on the host")
    assert spool_containers(docker_client, d, pool="warm", run=det["id"]) == []  # retired, not kept


def test_oom_in_a_warm_container_is_shown_as_oom_and_retires_it(daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="fresh" image="flowd/busybox" memory="16m" on-failure="continue">
    <input channel="in"/><output channel="out"/>
    <script>x=$(head -c 64m /dev/zero | tr '\\0' a); echo survived > out</script>
  </process>
  <channel name="in2">{items("x")}</channel><channel name="out2"/>
  <process name="warm" image="flowd/busybox" memory="16m" container="warm" on-failure="continue">
    <input channel="in2"/><output channel="out2"/>
    <script>x=$(head -c 64m /dev/zero | tr '\\0' a); echo survived > out2</script>
  </process>""")
    det = submit_wait(d, xml)
    why = reasons(det)
    assert "out of memory" in why.get("fresh", ""), det["failures"]
    assert "out of memory" in why.get("warm", ""), (det["failures"], d.log())
    assert why["warm"] == why["fresh"], why  # the same words as fresh
    wait_until(lambda: spool_containers(docker_client, d, pool="warm", run=det["id"]) == [], WAIT,
               "the OOM-killed warm container to be retired")


def test_hostile_outputs_are_refused_in_warm_mode_exactly_as_in_fresh(daemon_factory, workdir):
    from test_hostile import HOSTILE, SECRET, assert_never_in_spool

    HOSTILE = {k: v for k, v in HOSTILE.items() if k != "hardlink"}  # its own test below
    sentinel = os.path.join(workdir, "sentinel")
    with open(sentinel, "wb") as f:
        f.write(SECRET)
    os.chmod(sentinel, 0o644)
    d = start(daemon_factory, workdir, 'max_output_size = "1m"\n')

    def hostile_run(mode: str, extra: str = "") -> dict:
        """One run per mode: status lists a run's last 10 failures only."""
        procs = "".join(f"""
  <channel name="{name}-{mode}"><item>x</item></channel><channel name="{name}-{mode}-out"/>
  <process name="{name}-{mode}" image="flowd/busybox" container="{mode}" on-failure="continue" timeout="2m">
    <input channel="{name}-{mode}" as="in"/><output channel="{name}-{mode}-out" as="out"/>
    <script>{script.format(sentinel=sentinel)}</script>
  </process>""" for name, (script, _) in HOSTILE.items())
        det = submit_wait(d, workflow(workdir, procs + extra, name="hostile-" + mode))
        assert det["state"] == "succeeded", json.dumps(det["failures"], indent=1)  # on-failure="continue"
        assert sorted(reasons(det)) == sorted(f"{n}-{mode}" for n in HOSTILE), reasons(det)
        return det
    suid = """
  <channel name="suid"/>
  <process name="suid" image="flowd/busybox" container="warm">
    <output channel="suid"/>
    <script>printf '#!/bin/sh\\nid -u\\n' > suid; chmod 4755 suid; chmod g+s suid 2>/dev/null; true</script>
  </process>"""
    det = hostile_run("warm", suid)
    why = {**reasons(det), **reasons(hostile_run("fresh"))}
    for name, (_, expected) in HOSTILE.items():
        warm, fresh = why.get(f"{name}-warm", ""), why.get(f"{name}-fresh", "")
        assert expected in warm and warm.startswith("bad output:"), (name, warm)
        assert warm.replace("-warm", "-fresh") == fresh, (name, warm, fresh)
    depths = {c["name"]: c["depth"] for c in det["channels"]}
    assert all(depths[f"{name}-warm-out"] == 0 for name in HOSTILE)  # nothing published
    with open(sentinel, "rb") as f:
        assert f.read() == SECRET
    # the setuid output: a plain item of the daemon's (test_attacker's assertions)
    folder = os.path.join(d.spool, "runs", det["id"], "channels", "suid")
    names = os.listdir(folder)
    assert names, "the setuid output became no item"
    for name in names:
        st = os.lstat(os.path.join(folder, name))
        assert stat.S_ISREG(st.st_mode) and st.st_uid == d.pw.pw_uid and st.st_nlink == 1
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), stat.filemode(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & ~0o640 == 0, stat.filemode(st.st_mode)
    assert_never_in_spool(d.spool, SECRET)


def test_a_hard_linked_warm_output_is_refused_as_fresh(daemon_factory, workdir):
    """test_hostile's hard link, in a file output and in a directory output: fresh
    refuses both ("is a hard link"); warm must too."""
    d = start(daemon_factory, workdir)
    scripts = {"file": "echo x > a; ln a out", "dir": "mkdir out; echo x > a; ln a out/1"}
    xml = workflow(workdir, "".join(f"""
  <channel name="{k}-{m}"><item>x</item></channel><channel name="{k}-{m}-out"/>
  <process name="{k}-{m}" image="flowd/busybox" container="{m}" on-failure="continue">
    <input channel="{k}-{m}" as="in"/><output channel="{k}-{m}-out" as="out"/>
    <script>{script}</script>
  </process>""" for k, script in scripts.items() for m in ("fresh", "warm")))
    det = submit_wait(d, xml)
    why = reasons(det)
    depths = {c["name"]: c["depth"] for c in det["channels"]}
    for k in scripts:
        assert "is a hard link" in why.get(f"{k}-fresh", ""), why
    wrong = {k: f"warm: {why.get(k + '-warm')!r}, published {depths[k + '-warm-out']} item(s)"
             for k in scripts if why.get(f"{k}-warm", "").replace("-warm", "-fresh") != why[f"{k}-fresh"]
             or depths[f"{k}-warm-out"] != 0}
    assert wrong == {}, wrong


def test_a_warm_directory_output_gives_one_item_per_file_in_name_order(daemon_factory, workdir):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, f"""
  <channel name="in">{items("a", "b")}</channel><channel name="out"/>
  <process name="split" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>mkdir out; for i in 2 1 3; do echo "$(cat in)$i" > out/f$i; done</script>
  </process>""")
    det = submit_wait(d, xml)
    assert det["state"] == "succeeded", det["failures"]
    assert pull(d, det["id"], "out", os.path.join(workdir, "o")) == [
        b"a1\n", b"a2\n", b"a3\n", b"b1\n", b"b2\n", b"b3\n"]


ENV_SCRIPT = ("env | grep -v '^[ ]' | sort > out; export LEAKED=1; echo 'LEAKED2=1' >> /tmp/vars; "
              "echo \"host=$(hostname)\" >> out")


def test_warm_env_is_flowd_s_and_the_process_s_as_fresh_and_nothing_carries_over(
        daemon_factory, workdir):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, "".join(f"""
  <channel name="in-{m}">{items("1", "2")}</channel><channel name="out-{m}"/>
  <process name="{m}" image="flowd/busybox" container="{m}">
    <input channel="in-{m}"/><output channel="out-{m}" as="out"/>
    <env name="GREETING" value="hi 'there' $HOME"/>
    <script>{ENV_SCRIPT}</script>
  </process>""" for m in ("fresh", "warm")))
    det = submit_wait(d, xml)
    assert det["state"] == "succeeded", det["failures"]
    run = det["id"]

    def envs(m):
        outs = pull(d, run, f"out-{m}", os.path.join(workdir, m))
        return [dict(line.split("=", 1) for line in o.decode().splitlines()
                     if "=" in line and not line.startswith("host=")) for o in outs], hostnames(outs)
    (w1, w2), hosts = envs("warm")
    (f1, f2), _ = envs("fresh")
    assert hosts[0] == hosts[1]  # both warm tasks in one container
    for w, f in ((w1, f1), (w2, f2)):
        assert w["GREETING"] == "hi 'there' $HOME"
        assert (w["FLOWD_RUN"], w["FLOWD_PROCESS"], w["FLOWD_ATTEMPT"]) == (run, "warm", "1")
        assert "LEAKED" not in w and "LEAKED2" not in w
        # the same names as fresh (HOSTNAME's value is each container's own)
        assert set(w) == set(f), (sorted(set(w) ^ set(f)))
        same = {k for k in w if k not in ("FLOWD_PROCESS", "FLOWD_TASK", "HOSTNAME")}
        assert {k: w[k] for k in same} == {k: f[k] for k in same}
    assert w1["FLOWD_TASK"] != w2["FLOWD_TASK"]  # each task its own


def test_a_failing_warm_task_fails_with_fresh_s_message_and_its_log(daemon_factory, workdir):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, "".join(f"""
  <channel name="in-{m}">{items("x")}</channel><channel name="out-{m}"/>
  <process name="{m}" image="flowd/busybox" container="{m}" on-failure="continue">
    <input channel="in-{m}"/><output channel="out-{m}"/>
    <script>echo "oops from {m}"; echo "err from {m}" >&amp;2; exit 3</script>
  </process>""" for m in ("fresh", "warm")))
    det = submit_wait(d, xml)
    why = reasons(det)
    assert "exit status 3" in why["warm"], why
    assert why["warm"].replace("warm", "fresh") == why["fresh"], why
    logs = d.flowctl("logs", det["id"], "warm", check=0).stdout
    assert "oops from warm" in logs and "err from warm" in logs, logs
    assert "fresh" not in logs


def _follow_until(d, args, word: str, timeout=WAIT) -> tuple[subprocess.Popen, bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", d.socket, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_for_subprocess())
    seen = b""

    def got():
        nonlocal seen
        if readable(proc.stdout, 0.5):
            chunk = os.read(proc.stdout.fileno(), 65536)
            seen += chunk
            if not chunk:
                raise AssertionError(f"flowctl ended before {word!r}: {seen!r}")
        return word.encode() in seen
    try:
        wait_until(got, timeout, f"{word!r} from flowctl {' '.join(args)}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, seen


def test_logs_follow_shows_a_running_warm_task_s_lines_live_and_cancel_stops_it(
        daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="talk" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>echo first-line; echo second-line >&amp;2; sleep 600; echo never</script>
  </process>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    proc, seen = _follow_until(d, ["logs", run, "talk", "--follow"], "second-line")
    try:
        assert b"first-line" in seen
        assert detail(d, run)["state"] == "running"  # live: the task has not ended
        (c,) = run_running(docker_client, d, run)
        assert c["Labels"]["io.flowd.pool"] == "warm"
        assert "cancelled" in d.flowctl("cancel", run, check=0).stdout
        wait_until(lambda: detail(d, run)["state"] == "cancelled", WAIT, "the run to be cancelled")
        wait_until(lambda: run_running(docker_client, d, run) == [], WAIT,
                   "the run's warm container to stop")
        proc.wait(timeout=WAIT)  # --follow ends with the task
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert b"never" not in seen
    assert pull(d, run, "in", os.path.join(workdir, "kept")) == [b"x"]  # the data kept


def test_kill_9_with_warm_tasks_running_loses_and_duplicates_nothing(
        daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir)
    want = [f"item-{i:02d}" for i in range(24)]
    xml = workflow(workdir, f"""
  <channel name="in">{items(*want)}</channel><channel name="out"/>
  <process name="copy" image="flowd/busybox" container="warm" parallel="3">
    <input channel="in"/><output channel="out"/>
    <script>sleep 0.3; cp in out</script>
  </process>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()

    def some_done():
        depth = {c["name"]: c["depth"] for c in detail(d, run)["channels"]}["out"]
        return 3 <= depth < len(want)
    wait_until(some_done, WAIT, "a few items committed")
    old = {c["Id"] for c in spool_containers(docker_client, d, pool="warm", run=run)}
    assert old, "no warm container while the run went"
    d.kill9()
    d.start()
    d.flowctl("watch", run, timeout=WAIT * 3, check=0)
    det = detail(d, run)
    assert det["state"] == "succeeded", det["failures"]
    got = pull(d, run, "out", os.path.join(workdir, "out"))
    assert sorted(got) == sorted(w.encode() for w in want), "lost or duplicated items"
    wait_until(lambda: not old & {c["Id"] for c in spool_containers(docker_client, d)}, WAIT,
               "the earlier daemon's warm containers to be removed")


def test_max_containers_holds_for_warm_and_fresh_together(daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir, "max_containers = 2\n")
    procs = "".join(f"""
  <channel name="in-{p}">{items(*"abcdef")}</channel><channel name="out-{p}"/>
  <process name="{p}" image="flowd/busybox" container="{m}" parallel="2">
    <input channel="in-{p}"/><output channel="out-{p}"/>
    <script>sleep 0.5; cp in-{p} out-{p}</script>
  </process>""" for p, m in (("w1", "warm"), ("w2", "warm"), ("f", "fresh")))
    xml = workflow(workdir, procs)
    seen: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(len(spool_containers(docker_client, d, running_only=True)))
            stop.wait(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        det = submit_wait(d, xml)
    finally:
        stop.set()
        sampler.join()
    assert det["state"] == "succeeded", det["failures"]
    assert max(seen) <= 2, f"docker ps showed {max(seen)} of the spool's containers at once"
    assert max(seen) >= 1  # the sampler did see the run


def test_warm_tasks_3_replaces_the_container_after_3_tasks(daemon_factory, workdir):
    d = start(daemon_factory, workdir, "warm_tasks = 3\n")
    xml = workflow(workdir, f"""
  <channel name="in">{items(*"1234567")}</channel><channel name="out"/>
  <process name="who" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>echo "host=$(hostname)" > out</script>
  </process>""")
    det = submit_wait(d, xml)
    assert det["state"] == "succeeded", det["failures"]
    hosts = hostnames(pull(d, det["id"], "out", os.path.join(workdir, "o")))
    a, b, c = hosts[0], hosts[3], hosts[6]
    assert hosts == [a, a, a, b, b, b, c], hosts  # parallel="1": in order
    assert len({a, b, c}) == 3, hosts


def test_an_idle_warm_container_is_removed_after_warm_idle(daemon_factory, workdir, docker_client):
    d = start(daemon_factory, workdir, 'warm_idle = "2s"\n')
    xml = workflow(workdir, """
  <channel name="in"/><channel name="out"/>
  <process name="who" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>echo "host=$(hostname)" > out</script>
  </process>""", mode="service")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    d.flowctl("push", run, "in", "-", input="1", check=0)

    def depth():
        return {c["name"]: c["depth"] for c in detail(d, run)["channels"]}["out"]
    wait_until(lambda: depth() == 1, WAIT, "the first output")
    (host,) = hostnames(pull(d, run, "out", os.path.join(workdir, "o1")))
    wait_until(lambda: not [c for c in spool_containers(docker_client, d, run=run)
                            if c["Id"].startswith(host)], 30, "the idle warm container to go")
    assert detail(d, run)["state"] == "running"  # the run goes on: it was idleness, not the end
    d.flowctl("push", run, "in", "-", input="2", check=0)
    wait_until(lambda: depth() == 2, WAIT, "the second output")
    hosts = hostnames(pull(d, run, "out", os.path.join(workdir, "o2")))
    assert hosts[0] == host and hosts[1] != host, hosts  # a new container served it
    d.flowctl("cancel", run, check=0)


@pytest.fixture(scope="module")
def no_shell_image(docker_client):
    """flowd-test/nosh: FROM scratch with one static file and no /bin/sh (docker import)."""
    tag = "flowd-test/nosh:latest"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"nothing to run here\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    res = subprocess.run(["docker", "import", "-", tag], input=buf.getvalue(), capture_output=True)
    assert res.returncode == 0, res.stderr
    return tag


def test_an_image_without_bin_sh_fails_the_warm_task_clearly_and_nothing_hangs(
        daemon_factory, workdir, docker_client, no_shell_image):
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, "".join(f"""
  <channel name="in-{m}">{items("x")}</channel><channel name="out-{m}"/>
  <process name="{m}" image="{no_shell_image}" container="{m}" on-failure="continue">
    <input channel="in-{m}"/><output channel="out-{m}"/>
    <script>cp in out-{m}</script>
  </process>""" for m in ("fresh", "warm")))
    det = submit_wait(d, xml)  # returns: nothing hangs
    assert det["state"] in ("succeeded", "failed"), det
    why = reasons(det)
    assert "/bin/sh" in why.get("warm", ""), (det["failures"], d.log())
    assert "/bin/sh" in why.get("fresh", ""), det["failures"]
    wait_until(lambda: spool_containers(docker_client, d, pool="warm") == [], WAIT,
               "no warm container left")


def test_docker_ps_labels_pool_containers_and_status_shows_the_pool(daemon_factory, workdir,
                                                                   docker_client):
    d = start(daemon_factory, workdir, "max_containers = 5\n")
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="nap" image="flowd/busybox" container="warm">
    <input channel="in"/><output channel="out"/>
    <script>echo started; sleep 600</script>
  </process>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: run_running(docker_client, d, run), WAIT, "the warm container to run")
    (c,) = run_running(docker_client, d, run)
    assert c["Labels"]["io.flowd.pool"] == "warm"
    assert c["Labels"]["io.flowd.process"] == "nap"
    assert c["Names"][0].lstrip("/").startswith(f"flowd-warm-{run}-nap-")
    out = subprocess.run(["docker", "ps", "--filter", "label=io.flowd.pool=warm",
                          "--format", "{{.Names}} {{.Label \"io.flowd.run\"}}"],
                         capture_output=True, text=True, check=True).stdout
    assert f"{c['Names'][0].lstrip('/')} {run}" in out.splitlines()
    wait_until(lambda: "1 warm (1 busy, 0 idle)" in d.flowctl("status", check=0).stdout, WAIT,
               "flowctl status to show the busy warm container")
    assert "containers: 0 fresh, 1 warm (1 busy, 0 idle), at most 5" in d.flowctl(
        "status", check=0).stdout
    d.flowctl("cancel", run, check=0)


def test_a_script_that_writes_junk_to_the_agent_s_pipe_fails_its_task_and_does_not_loop(
        daemon_factory, workdir, docker_client):
    """/.flowd/ctl/out is writable by the script (a FIFO in a read-only mount). A script
    that writes a line there breaks the protocol: that is the script's doing, so its task
    must fail (or be retried within retries=), not start again forever as if the engine
    were away."""
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="forger" image="flowd/busybox" container="warm" timeout="30s">
    <input channel="in"/><output channel="out"/>
    <script>echo started; echo "not an answer" > /.flowd/ctl/out; sleep 5; cp in out</script>
  </process>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    made: set[str] = set()

    def ended():
        made.update(c["Id"] for c in spool_containers(docker_client, d, pool="warm", run=run))
        return detail(d, run)["state"] in ("succeeded", "failed")
    try:
        try:
            wait_until(ended, 60, "the run to end")
        except AssertionError:
            det = detail(d, run)
            raise AssertionError(f"the run is still {det['state']!r} after 60s; warm containers "
                                 f"seen: {len(made)}; processes: {det['processes']}") from None
        det = detail(d, run)
        assert det["state"] == "failed", det
        assert "wrote to flowd's control pipe" in reasons(det)["forger"], det["failures"]
    finally:
        d.flowctl("cancel", run)


# -- the pool, with the executor driven directly ---------------------------------------------------

@pytest.fixture
def warm_backend(docker_client, docker_spool, docker_tmp):
    from test_executor_contract import Backend

    b = Backend("warm", docker_tmp, docker_spool, docker_client)
    yield b
    b.ex.close()


def test_a_sweep_keeps_the_folder_of_a_container_started_while_it_ran(warm_backend):
    """A restart's sweep lists the pool's containers, removes the others (slow), then
    deletes slot folders it was not told of. A container the new daemon started
    meanwhile must keep its folder (it lost it: 'bind source path does not exist' and the
    task failed; test_kill_9_with_warm_tasks_running_loses_and_duplicates_nothing met it)."""
    from test_executor_contract import Case

    b = warm_backend
    ok = Case(sh="echo \"host=$(hostname)\" > out\n", fake=lambda t: 0)
    spec, res = b.run(ok, outputs=["out"])
    assert res.ok, res
    before = os.listdir(os.path.join(b.tmp, "pool"))
    assert len(before) == 1
    b.ex.pool.leftover_slots(set())  # what the sweep does with the names it read before
    assert os.listdir(os.path.join(b.tmp, "pool")) == before
    spec2, res = b.run(ok, outputs=["out"])  # and the kept container still serves
    assert res.ok, res
    first, second = hostnames([open(os.path.join(s.workdir, "out"), "rb").read() for s in (spec, spec2)])
    assert first == second


def test_a_warm_root_is_read_only_by_default_and_home_is_tmp(warm_backend):
    """warm_read_only (default true): nothing written outside /task and /tmp can carry
    over to the next task."""
    from test_executor_contract import Case

    sh = ("{ touch /planted 2>/dev/null && echo root-writable || echo root-read-only; "
          "touch /tmp/t && echo tmp-writable; echo \"home=$HOME\"; } > out\n")
    spec, res = warm_backend.run(Case(sh=sh, fake=lambda t: 0), outputs=["out"], env={"HOME": "/tmp"})
    assert res.ok, res
    assert open(os.path.join(spec.workdir, "out")).read() == "root-read-only\ntmp-writable\nhome=/tmp\n"


def test_a_script_that_stops_its_warm_container_fails_its_task_and_never_succeeds(
        daemon_factory, workdir):
    """`kill -TERM 1` reaches the agent through the engine's init: the container
    stops with exit status 0. That is not the task's success (its outputs were
    never taken), nor the engine's doing (no kill event): the task fails, within
    its retries, and nothing is published."""
    d = start(daemon_factory, workdir)
    xml = workflow(workdir, f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="stopper" image="flowd/busybox" container="warm" retries="1" timeout="30s">
    <input channel="in"/><output channel="out"/>
    <script>cp in out; kill -TERM 1; sleep 5</script>
  </process>""")
    run = d.flowctl("submit", xml, check=0).stdout.strip()
    wait_until(lambda: detail(d, run)["state"] in ("succeeded", "failed"), 60, "the run to end")
    det = detail(d, run)
    assert det["state"] == "failed", det
    assert "the warm container stopped during the task" in reasons(det)["stopper"], det["failures"]
    assert {c["name"]: c["depth"] for c in det["channels"]}["out"] == 0
