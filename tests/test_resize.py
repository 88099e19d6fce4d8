"""``flowctl resize RUN PROCESS [--memory SIZE] [--cpus N]`` (SPEC 6.3, issue 12 item 4).

In-process with the fake executor: what the daemon checks, saves in run.json
and gives later tasks, also after a restart; a refusal changes nothing. The
warm pool's part with its engine link stubbed (the Docker boundary). Against
the real engine (marker docker), the daemon run as the unit runs it: a running
fresh container's limits read back from Docker after a resize, a later task's
container with them too, a warm pool's containers replaced, a resize below
what a container uses refused, the limits kept across a daemon restart, and
bad arguments as a user meets them.
"""
from __future__ import annotations

import io
import json
import os
import uuid

import pytest

from flowd.errors import Conflict, NotFound, UsageError
from flowd.executor import base as X
from flowd.executor.warm import PoolKey, WarmContainer, WarmPool
from daemon_fixtures import wait_until
from inprocess import end, new_daemon
from test_daemon_inprocess import Harness
from test_warm import spool_containers, start, workflow, write

MiB = 1024 * 1024


# -- in-process, fake executor --------------------------------------------------------------

SERVICE = """\
    <workflow name="svc" mode="service">
      <channel name="in"/>
      <channel name="out"/>
      <process name="work" image="busybox" memory="64m" cpus="0.5">
        <input channel="in" as="in"/><output channel="out" as="out"/>
        <script>cat in > out</script>
      </process>
    </workflow>
"""


def resize(h: Harness, **args) -> dict:
    return h.client(lambda c: c.call("resize", args)[0])


def started_limits(h: Harness) -> tuple:
    spec = h.d.executor.started[-1]
    return spec.memory, spec.cpus


def push(h: Harness, run: str, data: bytes = b"x") -> None:
    h.client(lambda c: c.push(run, "in", io.BytesIO(data)))
    h.until(lambda: h.d.executor.pending, "the pushed item's task")


def test_resize_saves_the_limits_later_tasks_get_them_also_after_a_restart(tmp_path):
    h = Harness(tmp_path)
    try:
        run = h.submit(SERVICE)
        push(h, run)
        assert started_limits(h) == (64 * MiB, 0.5)
        out = resize(h, run=run, process="work", memory=96 * MiB, cpus=1.5)
        assert (out["memory"], out["cpus"], out["updated"], out["retired"]) == (96 * MiB, 1.5, 1, 0)
        assert h.d.executor.resized == [(run, "work", 96 * MiB, 1.5)]
        h.run_tasks()
        push(h, run)
        assert started_limits(h) == (96 * MiB, 1.5)
        # only cpus: memory stays what the last resize gave
        out = resize(h, run=run, process="work", cpus=0.25)
        assert (out["memory"], out["cpus"]) == (96 * MiB, 0.25)
        with open(os.path.join(h.d.runs_dir, run, "run.json")) as f:
            assert json.load(f)["resized"] == {"work": {"memory": 96 * MiB, "cpus": 0.25}}
        h.run_tasks()
    finally:
        h.close()
    d = new_daemon(h.conf, str(tmp_path / "spool"), h.scripts)  # a restart: all in memory gone
    d.prepare(signals=False)
    try:
        r = d.runs[run]
        r.push("in", _item(tmp_path))
        r.tick(None)
        assert (d.executor.started[-1].memory, d.executor.started[-1].cpus) == (96 * MiB, 0.25)
    finally:
        end(d)


def _item(tmp_path) -> str:
    path = str(tmp_path / ("item-" + uuid.uuid4().hex[:6]))
    with open(path, "wb") as f:
        f.write(b"y")
    return path


def test_a_resize_below_what_a_task_uses_is_refused_and_changes_nothing(tmp_path):
    h = Harness(tmp_path)
    try:
        run = h.submit(SERVICE)
        push(h, run)
        spec = h.d.executor.started[-1]
        h.d.executor.usage[spec.key] = 40 * MiB
        with pytest.raises(Conflict, match=f"task {spec.task_id} uses"):
            resize(h, run=run, process="work", memory=8 * MiB)
        assert h.d.executor.resized == []
        with open(os.path.join(h.d.runs_dir, run, "run.json")) as f:
            assert "resized" not in json.load(f)
        h.run_tasks()
        push(h, run)
        assert started_limits(h) == (64 * MiB, 0.5)
    finally:
        h.close()


def test_bad_resize_requests_are_refused_with_the_fix(tmp_path):
    h = Harness(tmp_path, config='max_memory = "1g"\n')
    try:
        run = h.submit(SERVICE)
        with pytest.raises(NotFound, match="has no process 'nope'; its processes are: work"):
            resize(h, run=run, process="nope", memory=64 * MiB)
        with pytest.raises(UsageError, match="nothing to change"):
            resize(h, run=run, process="work")
        with pytest.raises(UsageError, match=r"below 6 MiB.*--memory 6m or more"):
            resize(h, run=run, process="work", memory=4 * MiB)
        with pytest.raises(UsageError, match=r"max_memory.*1g"):
            resize(h, run=run, process="work", memory=2048 * MiB)
        with pytest.raises(UsageError, match="argument 'cpus'"):
            resize(h, run=run, process="work", cpus=0)
        h.client(lambda c: c.call("cancel", {"runs": [run]}))
        h.until(lambda: h.d.runs[run].finished, "the cancel")
        with pytest.raises(Conflict, match="is cancelled: it runs no more tasks"):
            resize(h, run=run, process="work", memory=64 * MiB)
        assert h.d.executor.resized == []
    finally:
        h.close()


def test_a_backend_that_cannot_resize_live_says_the_running_tasks_keep_their_limits(tmp_path):
    h = Harness(tmp_path)
    try:
        h.d.executor.resize = lambda *a: X.Executor.resize(h.d.executor, *a)  # the seam's default
        run = h.submit(SERVICE)
        push(h, run)
        out = resize(h, run=run, process="work", memory=32 * MiB)
        assert (out["kept"], out["updated"]) == (1, 0)
        assert out["note"] == "Swarm tasks keep their limits; later tasks get the new ones"
    finally:
        h.close()


# -- the warm pool, its engine link stubbed ---------------------------------------------------

class _Link:
    def __init__(self):
        self.removed: list[str] = []

    def quiet_remove(self, cid):
        self.removed.append(cid)


class _Slot:
    root = "/nonexistent/flowd-test-slot"

    def close(self):
        pass


def test_warm_pool_resize_retires_idle_containers_now_and_busy_ones_after_their_task():
    owner = type("Owner", (), {})()
    owner.link = _Link()
    pool = WarmPool(owner, "")

    def add(name, process, memory, busy):
        key = PoolKey("r1", process, "img", None, (), memory, 0.5, "none", 256, (), True)
        pool._containers[name] = WarmContainer(key, name, _Slot(), cid="id-" + name, busy=busy)

    add("idle", "work", 64 * MiB, False)
    add("busy", "work", 64 * MiB, True)
    add("other", "else", 64 * MiB, False)
    add("same", "work", 96 * MiB, False)  # made with the new limits already
    assert pool.resize("r1", "work", 96 * MiB, 0.5) == (1, 1)
    assert owner.link.removed == ["id-idle"]
    assert set(pool._containers) == {"busy", "other", "same"}
    assert pool._containers["busy"].retire and not pool._containers["same"].retire


# -- the real engine, the daemon as the unit runs it --------------------------------------------

WAIT = 120  # seconds: the bound on any one condition

# The task's own limits, as its cgroup has them (v1 or v2), in its output.
LIMIT = ("limit() { cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
         "|| cat /sys/fs/cgroup/memory.max; }\n")


def _containers(client, d, **labels) -> list[dict]:
    return spool_containers(client, d, running_only=True, **labels)


def _host_config(client, cid: str) -> dict:
    return client.api.inspect_container(cid)["HostConfig"]


def _one_running(client, d, what: str, **labels) -> dict:
    return wait_until(lambda: (lambda cs: cs[0] if len(cs) == 1 else None)(
        _containers(client, d, **labels)), WAIT, what)


def _resize(d, *args, check=0):
    return d.flowctl("resize", *args, check=check)


@pytest.mark.docker
def test_resize_a_running_fresh_container_live_and_later_tasks_get_the_limits(
        daemon_factory, workdir, docker_client, docker_images):
    # Task a waits (a bounded while) until its cgroup's limit changes, and says what it saw;
    # task b runs after it (parallel 1) and waits until the run is cancelled.
    script = LIMIT + (
        'first=$(limit); i=0\n'
        'if [ "$(cat in)" = a ]; then\n'
        '  while [ "$(limit)" = "$first" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n'
        'else\n'
        '  while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n'
        'fi\n'
        'echo "$first $(limit)" > out\n')
    wf = workflow(workdir, f"""
      <channel name="in"><item>a</item><item>b</item></channel>
      <channel name="out"/>
      <process name="hold" image="{docker_images['root']}" memory="64m" cpus="0.5" parallel="1">
        <input channel="in" as="in"/><output channel="out" as="out"/>
        <script><![CDATA[{script}]]></script>
      </process>""")
    d = start(daemon_factory, workdir)
    run = d.flowctl("submit", wf, check=0).stdout.strip()
    first = _one_running(docker_client, d, "task a's container", run=run)
    assert (_host_config(docker_client, first["Id"])["Memory"],
            _host_config(docker_client, first["Id"])["NanoCpus"]) == (64 * MiB, 500_000_000)

    res = _resize(d, run, "hold", "--memory", "96m", "--cpus", "1")
    assert "1 running container(s) given them live" in res.stdout, res.stdout
    hc = _host_config(docker_client, first["Id"])  # read back from Docker
    assert (hc["Memory"], hc["MemorySwap"], hc["NanoCpus"]) == (96 * MiB, 96 * MiB, 1_000_000_000)

    later = wait_until(lambda: [c for c in _containers(docker_client, d, run=run)
                                if c["Id"] != first["Id"]], WAIT, "task b's container")
    hc = _host_config(docker_client, later[0]["Id"])
    assert (hc["Memory"], hc["MemorySwap"], hc["NanoCpus"]) == (96 * MiB, 96 * MiB, 1_000_000_000)
    # task a saw its own limit change under it, from 64 MiB to 96 MiB
    det = json.loads(d.flowctl("status", run, "--json", check=0).stdout)
    assert det["processes"][0]["done"] == 1, det
    out = os.path.join(workdir, "out")
    d.flowctl("pull", run, "out", "--out", out, check=0)
    seen = [open(os.path.join(out, n)).read().split() for n in os.listdir(out)]
    assert seen == [[str(64 * MiB), str(96 * MiB)]]
    d.flowctl("cancel", run, check=0)


@pytest.mark.docker
def test_resize_below_what_a_container_uses_is_refused_and_nothing_changes(
        daemon_factory, workdir, docker_client, docker_images):
    # 40 MiB in /dev/shm (tmpfs: charged to the container's memory), then a long wait
    script = ("dd if=/dev/zero of=/dev/shm/fill bs=1048576 count=40 2>/dev/null && touch /task/filled\n"
              "i=0; while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n")
    wf = workflow(workdir, f"""
      <process name="fill" image="{docker_images['root']}" memory="128m">
        <script><![CDATA[{script}]]></script>
      </process>""")
    d = start(daemon_factory, workdir)
    run = d.flowctl("submit", wf, check=0).stdout.strip()
    c = _one_running(docker_client, d, "the filling task's container", run=run)
    wait_until(lambda: any(os.path.exists(os.path.join(root, "work", "filled")) for root in
                           _task_dirs(d, run)), WAIT, "40 MiB filled")

    res = _resize(d, run, "fill", "--memory", "8m", check=1)
    assert "refused" in res.stderr and "more than the 8 MiB asked" in res.stderr, res.stderr
    assert c["Names"][0].lstrip("/") in res.stderr and "Traceback" not in res.stderr
    assert _host_config(docker_client, c["Id"])["Memory"] == 128 * MiB  # unchanged
    with open(os.path.join(d.spool, "runs", run, "run.json")) as f:
        assert "resized" not in json.load(f)
    # above what it uses: lowered live; the answer as docs/flowctl.md shows it
    from test_docs import _doc_json, assert_shape
    got = json.loads(_resize(d, run, "fill", "--memory", "100m", "--json").stdout)
    assert_shape(_doc_json("resize"), got)
    assert (got["memory"], got["cpus"], got["updated"]) == (100 * MiB, None, 1)
    hc = _host_config(docker_client, c["Id"])
    assert (hc["Memory"], hc["MemorySwap"]) == (100 * MiB, 100 * MiB)
    d.flowctl("cancel", run, check=0)


def _task_dirs(d, run: str) -> list[str]:
    tasks = os.path.join(d.spool, "runs", run, "tasks")
    try:
        return [os.path.join(tasks, n) for n in os.listdir(tasks)]
    except OSError:
        return []


@pytest.mark.docker
def test_resize_retires_a_warm_pool_and_new_containers_get_the_limits_after_a_restart(
        daemon_factory, workdir, docker_client, docker_images):
    wf = workflow(workdir, f"""
      <channel name="in"><item>a</item></channel>
      <channel name="out"/>
      <process name="w" image="{docker_images['root']}" memory="64m" container="warm">
        <input channel="in" as="in"/><output channel="out" as="out"/>
        <script><![CDATA[{LIMIT}limit > out]]></script>
      </process>""", mode="service")
    d = start(daemon_factory, workdir)
    run = d.flowctl("submit", wf, check=0).stdout.strip()
    wait_until(lambda: json.loads(d.flowctl("status", run, "--json", check=0).stdout)
               ["processes"][0]["done"] == 1, WAIT, "task a")
    old = _one_running(docker_client, d, "the idle warm container", run=run, pool="warm")
    res = _resize(d, run, "w", "--memory", "80m")
    assert "1 warm container(s) replaced" in res.stdout, res.stdout
    wait_until(lambda: not _containers(docker_client, d, run=run, pool="warm"), WAIT,
               "the old warm container gone")

    d.stop()
    d.start()  # the limits are in run.json
    write(os.path.join(workdir, "b"), "b")
    d.flowctl("push", run, "in", os.path.join(workdir, "b"), check=0)
    new = _one_running(docker_client, d, "a new warm container", run=run, pool="warm")
    assert new["Id"] != old["Id"]
    assert _host_config(docker_client, new["Id"])["Memory"] == 80 * MiB
    wait_until(lambda: json.loads(d.flowctl("status", run, "--json", check=0).stdout)
               ["processes"][0]["done"] == 2, WAIT, "task b")
    out = os.path.join(workdir, "out")
    d.flowctl("pull", run, "out", "--out", out, check=0)
    assert sorted(open(os.path.join(out, n)).read().strip() for n in os.listdir(out)) == \
        sorted([str(64 * MiB), str(80 * MiB)])
    d.flowctl("cancel", run, check=0)


@pytest.mark.docker
def test_bad_resize_arguments_exit_with_a_clear_message_and_no_traceback(
        daemon_factory, workdir, docker_images):
    wf = workflow(workdir, f"""
      <channel name="out"/>
      <process name="p" image="{docker_images['root']}">
        <output channel="out" as="o"/><script>echo hi > o</script>
      </process>""")
    d = start(daemon_factory, workdir)
    run = d.flowctl("submit", "--wait", "--json", wf, check=0)
    run = json.loads(run.stdout)["id"]
    cases = [
        (("resize", run, "nope", "--memory", "64m"), 1, "has no process 'nope'; its processes are: p"),
        (("resize", run, "p"), 2, "nothing to change (fix: give --memory SIZE, --cpus N or both)"),
        (("resize", run, "p", "--memory", "64m"), 1, "is succeeded: it runs no more tasks"),
        (("resize", run, "p", "--memory", "lots"), 2, "is not a size (fix: e.g. --memory 256m"),
        (("resize", run, "p", "--cpus", "-1"), 2, "not a number of CPUs more than 0"),
        (("resize", "0000", "p", "--cpus", "1"), 1, "no run matches"),
    ]
    for args, status, words in cases:
        res = d.flowctl(*args)
        assert res.returncode == status, (args, res.stdout, res.stderr)
        assert words in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
