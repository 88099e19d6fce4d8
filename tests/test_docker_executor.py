"""DockerExecutor: against the real engine (marked ``docker``) and, for error
translation, against a mocked SDK (unmarked, no engine needed).

Results are awaited on the report queue (``Reports.result``); the futures that
``start``/``kill``/``remove``/``sweep`` return are awaited where a test must
know a job is done. No sleeps.
"""
from __future__ import annotations

import os
import queue
import socket
import stat
import subprocess
import threading
import time
import uuid
from unittest import mock

import pytest

docker = pytest.importorskip("docker")
import docker.errors  # noqa: E402
import requests.exceptions  # noqa: E402
import urllib3.exceptions  # noqa: E402

from flowd.errors import EngineError, EngineUnavailable, ImageUnavailable, NotFound  # noqa: E402
from flowd.executor import base as X  # noqa: E402
from flowd.executor import container as C  # noqa: E402
from flowd.executor import dockerapi as DA  # noqa: E402
from flowd.executor import dockerspec as DS  # noqa: E402
from flowd.executor.docker import DockerExecutor  # noqa: E402
from flowd.taskspec import container_identity  # noqa: E402

IMAGE = "flowd/busybox:latest"
WAIT = 30  # seconds: upper bound on any single result


# -- helpers ---------------------------------------------------------------------------
class Reports:
    """The report callable: a queue the test reads with a timeout."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.engine: list[X.EngineState] = []
        self.results: list[X.TaskResult] = []

    def __call__(self, event):
        self.q.put(event)

    def _next(self, timeout):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing reported within {timeout}s") from None

    def result(self, key=None, timeout=WAIT) -> X.TaskResult:
        for r in self.results:
            if key is None or r.key == key:
                self.results.remove(r)
                return r
        end = time.monotonic() + timeout
        while True:
            ev = self._next(max(end - time.monotonic(), 0.01))
            if isinstance(ev, X.EngineState):
                self.engine.append(ev)
            elif key is None or ev.key == key:
                return ev
            else:
                self.results.append(ev)

    def engine_state(self, timeout=WAIT) -> X.EngineState:
        if self.engine:
            return self.engine.pop(0)
        end = time.monotonic() + timeout
        while True:
            ev = self._next(max(end - time.monotonic(), 0.01))
            if isinstance(ev, X.EngineState):
                return ev
            self.results.append(ev)

    def assert_quiet(self):
        assert self.q.empty() and not self.results, (list(self.q.queue), self.results)


def make_spec(tmp: str, spool: str, script: str, *, task: str = "t1", run: str | None = None,
              image: str = IMAGE, **kw) -> X.TaskSpec:
    """A task folder like the daemon makes (flowd.taskspec.container_identity): by
    default the container runs as this process's uid:gid and work/ is 0700;
    with ``user=None`` (config container_user="image") it runs as the image's
    user with this process's group added, and work/ is 02770."""
    run = run or "r" + uuid.uuid4().hex[:8]
    base = os.path.join(tmp, f"{run}-{task}")
    work = os.path.join(base, "work")
    os.makedirs(work)
    user, group_add, mode = container_identity("image" if "user" in kw and kw["user"] is None
                                                else "daemon")
    kw.setdefault("user", user)
    kw.setdefault("group_add", group_add)
    os.chmod(work, mode)
    script_path = os.path.join(base, "script.sh")
    with open(script_path, "w") as f:
        f.write(script)
    os.chmod(script_path, 0o640)
    kw.setdefault("timeout", 60)
    return X.TaskSpec(run_id=run, process="p", task_id=task, attempt=kw.pop("attempt", 1),
                      image=image, lang="sh", script_path=script_path, workdir=work,
                      log_path=os.path.join(base, "log"), spool=spool, **kw)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def containers(client, spec_or_spool) -> list[dict]:
    if isinstance(spec_or_spool, X.TaskSpec):
        labels = [f"{C.LABEL_RUN}={spec_or_spool.run_id}", f"{C.LABEL_TASK}={spec_or_spool.task_id}"]
    else:
        labels = [f"{C.LABEL_SPOOL}={spec_or_spool}"]
    return client.api.containers(all=True, filters={"label": labels})


@pytest.fixture
def reports():
    return Reports()


@pytest.fixture
def executor(reports, docker_images, docker_spool):
    ex = DockerExecutor(reports, spool=docker_spool)
    yield ex
    ex.close()


@pytest.fixture
def run_task(executor, reports, docker_tmp, docker_spool):
    """run_task(script, **spec fields) -> (spec, result); the container is kept."""

    def run(script: str, **kw):
        spec = make_spec(docker_tmp, docker_spool, script, **kw)
        executor.start(spec)
        return spec, reports.result(spec.key)

    return run


# -- the real engine -----------------------------------------------------------------------
@pytest.mark.docker
def test_success_writes_output_log_and_sees_env(run_task, docker_client):
    t0 = time.time()
    spec, res = run_task(
        'echo "to stdout"; echo "to stderr" >&2; echo "$GREETING $FLOWD_RUN" > result\n',
        outputs=["result"], env={"GREETING": "hello", "FLOWD_RUN": "r-env"},
    )
    assert (res.status, res.exit_code, res.message) == (X.EXITED, 0, "exit status 0")
    assert res.ok and not res.retryable and res.attempt == 1
    assert read(os.path.join(spec.workdir, "result")) == "hello r-env\n"
    log = read(spec.log_path)
    assert "to stdout\n" in log and "to stderr\n" in log
    assert t0 - 1 <= res.started_at <= res.finished_at <= time.time() + 1
    # Not removed: the daemon removes it after collecting the outputs.
    (c,) = containers(docker_client, spec)
    assert c["State"] == "exited"


@pytest.mark.docker
def test_nonzero_exit_is_a_result(run_task):
    _, res = run_task("echo failing >&2; exit 3\n")
    assert (res.status, res.exit_code, res.message) == (X.EXITED, 3, "exit status 3")
    assert not res.ok


@pytest.mark.docker
def test_timeout_kills_the_container(run_task, docker_client):
    t0 = time.monotonic()
    spec, res = run_task("echo started; sleep 60\n", timeout=1)
    assert time.monotonic() - t0 < 15
    assert (res.status, res.message) == (X.TIMEOUT, "timed out after 1s")
    assert "started" in read(spec.log_path)
    assert all(c["State"] != "running" for c in containers(docker_client, spec))


@pytest.mark.docker
def test_oom(run_task):
    # dd's one 64 MiB buffer: over the limit at once.
    _, res = run_task("dd if=/dev/zero of=/dev/null bs=64M count=1\n", memory=8 * 1024 * 1024)
    assert (res.status, res.exit_code) == (X.OOM, 137), res
    assert res.message == "killed: out of memory (limit 8 MiB)"


@pytest.mark.docker
def test_oom_is_seen_even_when_the_engine_misses_it(run_task, docker_client):
    """The engine's OOMKilled flag is lost now and then on cgroup v1; the
    container's own oom_kill counter, said on stderr, is not. (One dd child, so
    that the shell that says it is never a second victim: see below.)"""
    spec, res = run_task("dd if=/dev/zero of=/dev/null bs=64M count=1\n", memory=8 * 1024 * 1024)
    assert res.status == X.OOM
    assert DS.OOM_MARK in read(spec.log_path)
    # And the decision without the flag:
    info = docker_client.api.inspect_container(C.container_name(spec))
    info["State"]["OOMKilled"] = False
    q = Reports()
    ex = DockerExecutor(q, spool=spec.spool)
    try:
        ex.fresh._finish(C.Task(spec), info)
        assert q.result(spec.key).status == X.OOM
    finally:
        ex.close()


@pytest.mark.docker
def test_oom_flag_alone_is_not_oom(run_task):
    # A child is OOM-killed but the script goes on and exits 0: success.
    # (OOMKilled is container-wide and sticky.) The child is one dd with a
    # 64 MiB buffer: with a pipe (head | tail) head's pipe writes can charge
    # the cgroup while tail is still being reaped, and the kernel then kills
    # the script's shell as a second victim (seen 1 in 5 on cgroup v1).
    spec, res = run_task("dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived rc=$?\n",
                         memory=8 * 1024 * 1024)
    assert (res.status, res.exit_code) == (X.EXITED, 0), res
    log = read(spec.log_path)
    assert "survived rc=137" in log  # the child really was killed
    assert DS.OOM_MARK in log


@pytest.mark.docker
def test_a_damaged_input_is_reported_and_no_container_is_made(run_task, docker_client, docker_tmp):
    from flowd import checksum

    good, bad = os.path.join(docker_tmp, "good"), os.path.join(docker_tmp, "bad")
    for path in (good, bad):
        with open(path, "wb") as f:
            f.write(b"an item\n")
        checksum.stamp_file(path)
    with open(bad, "r+b") as f:
        f.write(b"A")  # a flipped byte, after the stamp
    spec, res = run_task("touch ran\n", verify=[("a", 1, good), ("b", 2, bad)])
    assert res.status == X.DAMAGED and not res.retryable
    assert [(ch, seq) for ch, seq, _ in res.damaged] == [("b", 2)]
    assert "checksum mismatch" in res.damaged[0][2] and "item 2 of b" in res.message
    assert containers(docker_client, spec) == [] and not os.path.exists(
        os.path.join(spec.workdir, "ran"))
    _, res = run_task("touch ran\n", verify=[("a", 1, good)])
    assert res.ok


@pytest.mark.docker
def test_missing_image_is_an_error(run_task):
    _, res = run_task("true\n", image="flowd/no-such-image:latest")
    assert res.status == X.ERROR and not res.retryable
    assert res.message.startswith(
        "image flowd/no-such-image:latest is not present and could not be pulled: "), res.message


@pytest.mark.docker
def test_image_without_a_shell_is_an_error(run_task, docker_client, docker_tmp):
    empty = os.path.join(docker_tmp, "empty.tar")
    subprocess.run(["tar", "-C", docker_tmp, "-cf", empty, "--files-from", "/dev/null"], check=True)
    with open(empty, "rb") as f:
        docker_client.api.import_image_from_data(f.read(), repository="flowd/test-empty", tag="latest")
    try:
        spec, res = run_task("true\n", image="flowd/test-empty:latest")
        assert res.status == X.ERROR and not res.retryable
        assert res.message.startswith("could not start the container: "), res.message
        assert "/bin/sh" in res.message
        assert containers(docker_client, spec) == []  # not left behind
    finally:
        docker_client.api.remove_image("flowd/test-empty:latest", force=True)


@pytest.mark.docker
def test_kill_running(executor, reports, docker_tmp, docker_spool):
    spec = make_spec(docker_tmp, docker_spool, "sleep 60\n")
    executor.start(spec).result(WAIT)  # the container has been started
    executor.kill(spec.run_id, spec.task_id).result(WAIT)
    res = reports.result(spec.key)
    assert (res.status, res.message) == (X.KILLED, "killed on request")


@pytest.mark.docker
def test_kill_right_after_start(executor, reports, docker_tmp, docker_spool, docker_client):
    spec = make_spec(docker_tmp, docker_spool, "sleep 60\n")
    executor.start(spec)
    executor.kill(spec.run_id, spec.task_id)
    assert reports.result(spec.key).status == X.KILLED
    assert all(c["State"] != "running" for c in containers(docker_client, spec))


@pytest.mark.docker
def test_remove_and_start_again_under_the_same_name(executor, run_task, reports, docker_client):
    spec, res = run_task("echo one\n")
    assert res.ok
    # A second attempt with the leftover still there: removed first.
    spec.attempt = 2
    executor.start(spec)
    res2 = reports.result(spec.key)
    assert res2.ok and res2.attempt == 2
    (c,) = containers(docker_client, spec)
    assert c["Labels"][C.LABEL_ATTEMPT] == "2"
    # remove() of the old attempt leaves the new one alone; of the new one removes it.
    spec.attempt = 1
    executor.remove(spec).result(WAIT)
    assert len(containers(docker_client, spec)) == 1
    spec.attempt = 2
    executor.remove(spec).result(WAIT)
    assert containers(docker_client, spec) == []
    executor.remove(spec).result(WAIT)  # NotFound is fine


@pytest.mark.docker
def test_adopt_running_container(reports, docker_images, docker_tmp, docker_spool):
    spec = make_spec(docker_tmp, docker_spool, 'read line < fifo; echo "got $line" > out\n')
    os.mkfifo(os.path.join(spec.workdir, "fifo"), 0o666)
    first = DockerExecutor(reports, spool=docker_spool)
    first.start(spec).result(WAIT)
    first.close()  # a daemon restart: the container keeps running
    second = DockerExecutor(reports, spool=docker_spool)
    try:
        second.adopt(spec)
        with open(os.path.join(spec.workdir, "fifo"), "w") as f:  # blocks until it reads
            f.write("go\n")
        res = reports.result(spec.key)
        assert res.ok, res
        assert read(os.path.join(spec.workdir, "out")) == "got go\n"
    finally:
        second.close()


@pytest.mark.docker
def test_adopt_counts_the_timeout_from_the_start(reports, docker_images, docker_tmp, docker_spool):
    spec = make_spec(docker_tmp, docker_spool, "sleep 60\n", timeout=2)
    first = DockerExecutor(reports, spool=docker_spool)
    first.start(spec).result(WAIT)
    t0 = time.monotonic()
    first.close()
    second = DockerExecutor(reports, spool=docker_spool)
    try:
        second.adopt(spec)
        res = reports.result(spec.key)
        assert (res.status, res.message) == (X.TIMEOUT, "timed out after 2s")
        assert time.monotonic() - t0 < 2 + 5
    finally:
        second.close()


@pytest.mark.docker
def test_adopt_exited_container(reports, docker_images, docker_tmp, docker_spool):
    spec = make_spec(docker_tmp, docker_spool, "echo bye; exit 4\n")
    first = DockerExecutor(reports, spool=docker_spool)
    first.start(spec)
    assert reports.result(spec.key).exit_code == 4
    first.close()
    os.unlink(spec.log_path)
    second = DockerExecutor(reports, spool=docker_spool)
    try:
        second.adopt(spec)
        res = reports.result(spec.key)
        assert (res.status, res.exit_code, res.message) == (X.EXITED, 4, "exit status 4")
        assert res.started_at and res.finished_at
        assert read(spec.log_path) == "bye\n"
    finally:
        second.close()


@pytest.mark.docker
def test_adopt_does_not_trust_a_container_that_ended_before_a_reboot(
        reports, docker_images, docker_tmp, docker_spool, docker_client, monkeypatch):
    spec = make_spec(docker_tmp, docker_spool, "exit 0\n")
    first = DockerExecutor(reports, spool=docker_spool)
    first.start(spec)
    assert reports.result(spec.key).exit_code == 0
    first.close()
    import flowd.executor.fresh as F

    monkeypatch.setattr(F, "_boot_time", lambda: time.time() + 1)  # "the machine rebooted since"
    second = DockerExecutor(reports, spool=docker_spool)
    try:
        second.adopt(spec).result(WAIT)
        res = reports.result(spec.key)
        assert res.status == X.MISSING and "not trusted" in res.message
        assert docker_client.api.containers(
            all=True, filters={"name": C.container_name(spec)}) == []
    finally:
        second.close()


@pytest.mark.docker
def test_adopt_missing_and_other_attempt(executor, run_task, reports, docker_tmp, docker_spool,
                                         docker_client):
    nothing = make_spec(docker_tmp, docker_spool, "true\n", task="never")
    executor.adopt(nothing)
    assert reports.result(nothing.key).status == X.MISSING

    spec, res = run_task("true\n")
    assert res.ok
    spec.attempt = 2  # the daemon wants attempt 2; attempt 1's container is not it
    executor.adopt(spec).result(WAIT)
    res = reports.result(spec.key)
    assert (res.status, res.attempt) == (X.MISSING, 2)
    assert containers(docker_client, spec) == []


@pytest.mark.docker
def test_sweep_removes_only_unkept(executor, reports, docker_tmp, docker_spool, docker_client):
    specs = [make_spec(docker_tmp, docker_spool, "true\n", task=f"t{i}", run="rsweep")
             for i in range(3)]
    for s in specs:
        executor.start(s)
    for s in specs:
        assert reports.result(s.key).ok
    other_spool = docker_spool + "-other"
    other = make_spec(docker_tmp, other_spool, "true\n", task="t9", run="rsweep")
    executor.start(other)
    assert reports.result(other.key).ok
    try:
        executor.sweep(docker_spool, {("rsweep", "t1")}).result(WAIT)
        left = containers(docker_client, docker_spool)
        assert [c["Labels"][C.LABEL_TASK] for c in left] == ["t1"]
        assert len(containers(docker_client, other_spool)) == 1  # another spool's: untouched
    finally:
        executor.sweep(other_spool, set()).result(WAIT)


@pytest.mark.docker
@pytest.mark.parametrize("network", ["none", "bridge"])
def test_hardening_audit(run_task, docker_client, docker_tmp, network):
    data = os.path.join(docker_tmp, "input.txt")
    with open(data, "w") as f:
        f.write("data\n")
    os.chmod(data, 0o644)
    spec, res = run_task("cat in.txt\n", network=network, memory=64 * 1024 * 1024, cpus=0.5,
                         pids_limit=50, inputs=[X.Mount(data, "/task/in.txt")])
    assert res.ok, res
    info = docker_client.api.inspect_container(C.container_name(spec))
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert hc["NetworkMode"] == network
    assert hc["PidsLimit"] == 50
    assert hc["Memory"] == hc["MemorySwap"] == 64 * 1024 * 1024
    assert hc["NanoCpus"] == 500_000_000
    assert hc["AutoRemove"] is False
    assert hc["LogConfig"]["Type"] == "json-file"
    assert info["Config"]["User"] == f"{os.geteuid()}:{os.getegid()}"  # flowd's (container_user)
    assert info["Config"]["WorkingDir"] == "/task"
    assert info["Config"]["Cmd"][:2] == ["/bin/sh", "-c"] and not info["Config"]["Entrypoint"]
    assert C.wrapper(spec) in info["Config"]["Cmd"][2]  # wrapped with the OOM check
    assert info["Config"]["Labels"] == C.labels(spec, spec.spool)
    mounts = {(m["Source"], m["Destination"], m["RW"]) for m in info["Mounts"]}
    assert mounts == {
        (spec.workdir, "/task", True),
        (spec.script_path, C.SCRIPT_PATH, False),
        (data, "/task/in.txt", False),
    }


@pytest.mark.docker
def test_network_none_has_no_network(run_task):
    _, res = run_task("ls /sys/class/net > nets\n")
    assert res.ok


@pytest.mark.docker
def test_input_mount_is_readable_and_read_only(run_task, docker_tmp):
    data = os.path.join(docker_tmp, "input.txt")
    with open(data, "w") as f:
        f.write("payload\n")
    os.chmod(data, 0o644)
    spec, res = run_task(
        "cat in.txt > copy\n"
        "if echo more >> in.txt; then echo writable; else echo read-only; fi > check\n",
        inputs=[X.Mount(data, "/task/in.txt")], outputs=["copy", "check"],
    )
    assert res.ok, res
    assert read(os.path.join(spec.workdir, "copy")) == "payload\n"
    assert read(os.path.join(spec.workdir, "check")) == "read-only\n"
    assert read(data) == "payload\n"


@pytest.mark.docker
def test_a_container_runs_as_flowd_by_default_so_all_it_writes_is_flowds(run_task):
    spec, res = run_task("id -u > out; id -g >> out; mkdir many; echo a > many/a; "
                         "chmod 000 many/a; chmod 500 many\n", outputs=["out", "many"])
    assert res.ok, (res, read(spec.log_path))
    out = os.path.join(spec.workdir, "out")
    assert read(out) == f"{os.geteuid()}\n{os.getegid()}\n"
    for path in (out, os.path.join(spec.workdir, "many")):
        assert os.stat(path).st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(spec.workdir).st_mode) == 0o700


@pytest.mark.docker
def test_an_image_user_gets_flowds_group_and_nothing_is_world_writable(run_task, docker_images):
    spec, res = run_task(
        "id -u > out; mkdir many; echo a > many/a; echo b > many/b; chmod 600 many/b\n",
        image=docker_images["nobody"], outputs=["out", "many"], user=None,
    )
    assert res.ok, (res, read(spec.log_path))
    out = os.path.join(spec.workdir, "out")
    assert read(out) == "65534\n"
    for path in (out, os.path.join(spec.workdir, "many", "a"), os.path.join(spec.workdir, "many", "b")):
        st = os.stat(path)
        assert st.st_uid == 65534 and st.st_gid == os.getegid()  # the setgid work/ gave flowd's group
        assert stat.S_IMODE(st.st_mode) & 0o660 == 0o660, oct(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)  # nothing for others
    if os.geteuid() == 0:  # a host user of flowd's group (neither 0 nor 65534) can delete them all
        rm = subprocess.run(["rm", "-r", out, os.path.join(spec.workdir, "many")], user=12345,
                            group=os.getegid(), extra_groups=[], capture_output=True, text=True)
        assert rm.returncode == 0, rm.stderr
    else:
        os.unlink(out)
    assert sorted(os.listdir(spec.workdir)) == []


@pytest.mark.docker
def test_log_keeps_the_tail_within_the_limit(reports, docker_images, docker_tmp, docker_spool):
    limit = 64 * 1024
    ex = DockerExecutor(reports, spool=docker_spool, log_limit=limit)
    try:
        # 20,000 lines of 40 bytes: far over the limit, and ordinary lines, so
        # the whole limit is kept (the docs promise "the last 10 MiB"), exactly
        # the last bytes printed
        spec = make_spec(docker_tmp, docker_spool,
                         "i=0; while [ $i -lt 20000 ]; do printf 'line %05d of some ordinary log text.\\n' $i; "
                         "i=$((i+1)); done; echo THE END\n")
        ex.start(spec)
        assert reports.result(spec.key).ok
        printed = "".join(f"line {i:05d} of some ordinary log text.\n" for i in range(20000)) + "THE END\n"
        assert len(printed) > 10 * limit
        assert read(spec.log_path) == printed[-limit:]
    finally:
        ex.close()


@pytest.mark.docker
def test_close_leaves_containers_running(reports, docker_images, docker_tmp, docker_spool,
                                         docker_client):
    spec = make_spec(docker_tmp, docker_spool, "sleep 60\n")
    ex = DockerExecutor(reports, spool=docker_spool)
    ex.start(spec).result(WAIT)
    t0 = time.monotonic()
    ex.close()
    assert time.monotonic() - t0 < 1
    (c,) = containers(docker_client, spec)
    assert c["State"] == "running"
    assert ex.start(spec).exception(1) is not None  # closed: refuses work
    reports.assert_quiet()


# -- engine outages, with the real SDK through a socket proxy we can cut --------------------
class EngineProxy:
    """A unix socket forwarding to the engine's; ``cut()`` drops every connection
    and stops listening, like a dockerd restart; ``serve()`` listens again."""

    def __init__(self, path: str, target: str):
        self.path, self.target = path, target
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def serve(self):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.path)
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self):
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = self._conns, []
        if srv is not None:
            srv.close()
            os.unlink(self.path)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, srv):
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            with self._lock:
                if self._server is not srv:  # cut while we connected
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def engine_proxy(docker_client, docker_tmp):
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip("the engine is not on a unix socket")
    proxy = EngineProxy(os.path.join(docker_tmp, "engine.sock"), host[len("unix://"):])
    yield proxy
    proxy.cut()


@pytest.mark.docker
def test_engine_down_then_back(engine_proxy, reports, docker_images, docker_tmp, docker_spool):
    client = docker.DockerClient(base_url="unix://" + engine_proxy.path, version="1.41")
    ex = DockerExecutor(reports, spool=docker_spool, client=client)
    ex.ping_interval = 0.05
    try:
        spec = make_spec(docker_tmp, docker_spool, "echo hi\n")
        ex.start(spec)
        res = reports.result(spec.key)
        assert res.status == X.ERROR and res.retryable, res
        assert res.message.startswith("engine unavailable: cannot reach the Docker engine"), res.message
        down = reports.engine_state()
        assert not down.up and "cannot reach the Docker engine" in down.message
        engine_proxy.serve()
        assert reports.engine_state() == X.EngineState(up=True, message="engine is back")
        ex.start(spec)
        assert reports.result(spec.key).ok
    finally:
        ex.close()


@pytest.mark.docker
def test_wait_survives_an_engine_outage(engine_proxy, reports, docker_images, docker_tmp,
                                        docker_spool):
    engine_proxy.serve()
    client = docker.DockerClient(base_url="unix://" + engine_proxy.path, version="1.41")
    ex = DockerExecutor(reports, spool=docker_spool, client=client)
    ex.ping_interval = 0.05
    try:
        spec = make_spec(docker_tmp, docker_spool, "read x < fifo; exit 5\n")
        os.mkfifo(os.path.join(spec.workdir, "fifo"), 0o666)
        ex.start(spec).result(WAIT)
        engine_proxy.cut()  # the wait in flight breaks
        assert reports.engine_state().up is False
        with open(os.path.join(spec.workdir, "fifo"), "w") as f:  # it exits while "down"
            f.write("go\n")
        engine_proxy.serve()
        assert reports.engine_state().up is True
        res = reports.result(spec.key)
        assert (res.status, res.exit_code) == (X.EXITED, 5), res
    finally:
        ex.close()


@pytest.mark.docker
def test_round_trip_time(executor, reports, docker_tmp, docker_spool):
    """Not a benchmark: prints one start -> result round trip (see -s)."""
    spec = make_spec(docker_tmp, docker_spool, "true\n")
    executor.start(spec)  # warm up: image lookup, connection pool
    assert reports.result(spec.key).ok
    spec2 = make_spec(docker_tmp, docker_spool, "true\n", task="t2")
    t0 = time.perf_counter()
    executor.start(spec2)
    assert reports.result(spec2.key).ok
    print(f"\nstart -> result round trip: {time.perf_counter() - t0:.3f}s")


# -- a mocked SDK: error translation at the boundary ---------------------------------------
def mocked_executor(reports):
    client = mock.MagicMock(name="DockerClient")
    ex = DockerExecutor(reports, spool="s", client=client)
    ex.ping_interval = 0.01
    return ex, client.api


def plain_spec(**kw) -> X.TaskSpec:
    return X.TaskSpec(run_id="r", process="p", task_id="t", attempt=1, image="img:1", lang="sh",
                      script_path="/nowhere/script", workdir="/nowhere/work", **kw)


def refused() -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", FileNotFoundError(2, "No such file or directory")))


def test_mock_engine_unreachable_is_retryable_and_watched(reports):
    ex, api = mocked_executor(reports)
    api.inspect_image.side_effect = refused()  # the first engine call of a start
    api.ping.side_effect = [refused(), True]
    try:
        ex.start(plain_spec()).result(WAIT)
        res = reports.result()
        assert res.status == X.ERROR and res.retryable
        assert res.message == ("engine unavailable: cannot reach the Docker engine: "
                               "No such file or directory")
        assert reports.engine_state() == X.EngineState(
            up=False, message="cannot reach the Docker engine: No such file or directory")
        assert reports.engine_state() == X.EngineState(up=True, message="engine is back")
        assert api.ping.call_count == 2
        api.create_container.assert_not_called()
    finally:
        ex.close()


def test_mock_engine_down_reported_once(reports):
    ex, api = mocked_executor(reports)
    ex.ping_interval = 60
    api.inspect_image.side_effect = refused()
    try:
        for task in ("a", "b"):
            spec = plain_spec()
            spec.task_id = task
            ex.start(spec).result(WAIT)
        assert {reports.result().task_id, reports.result().task_id} == {"a", "b"}
        assert reports.engine_state().up is False
        assert reports.engine == [] and reports.q.empty()
    finally:
        ex.close()


def test_mock_image_missing_and_pull_fails(reports):
    ex, api = mocked_executor(reports)
    api.remove_container.side_effect = docker.errors.NotFound("No such container: x")
    api.inspect_image.side_effect = docker.errors.ImageNotFound("No such image: img:1")
    api.pull.side_effect = docker.errors.APIError(
        "500 Server Error", explanation='Get "https://registry-1.docker.io/v2/": no such host')
    try:
        ex.start(plain_spec()).result(WAIT)
        res = reports.result()
        assert res.status == X.ERROR and not res.retryable
        assert res.message == ('image img:1 is not present and could not be pulled: '
                               'the Docker engine refused: Get "https://registry-1.docker.io/v2/": '
                               'no such host')
        api.pull.assert_called_once_with("img", tag="1", stream=True, decode=True)
        api.create_container.assert_not_called()
    finally:
        ex.close()


def test_mock_pull_error_in_the_stream(reports):
    ex, api = mocked_executor(reports)
    api.remove_container.side_effect = docker.errors.NotFound("No such container: x")
    api.inspect_image.side_effect = docker.errors.ImageNotFound("No such image: img:1")
    api.pull.return_value = iter([{"status": "Pulling"}, {"error": "manifest unknown"}])
    try:
        ex.start(plain_spec()).result(WAIT)
        res = reports.result()
        assert res.message == "image img:1 is not present and could not be pulled: manifest unknown"
    finally:
        ex.close()


def test_mock_no_sdk_error_escapes(reports):
    ex, api = mocked_executor(reports)
    api.remove_container.side_effect = docker.errors.NotFound("No such container: x")
    api.inspect_image.return_value = {}
    api.create_container.side_effect = docker.errors.APIError(
        "400 Client Error", explanation="invalid mount config for type \"bind\": bind source "
        "path does not exist: /nowhere/work")
    try:
        fut = ex.start(plain_spec())
        assert fut.exception(WAIT) is None
        res = reports.result()
        assert res.status == X.ERROR and not res.retryable
        assert "bind source path does not exist" in res.message
    finally:
        ex.close()


@pytest.mark.parametrize("exc, cls, words", [
    (refused(), EngineUnavailable, "No such file or directory"),
    (requests.exceptions.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")),
     EngineUnavailable, "did not answer in time"),
    (docker.errors.DockerException("Error while fetching server API version"), EngineError, "fetching"),
    (docker.errors.ImageNotFound("No such image: x"), ImageUnavailable, "No such image"),
    (docker.errors.NotFound("No such container: x"), NotFound, "No such container"),
    (docker.errors.APIError("409", explanation="Conflict. The container name is already in use"),
     EngineError, "already in use"),
    (docker.errors.APIError("500", response=mock.Mock(status_code=500), explanation="connection error: desc = \"transport: Error while "
                            "dialing dial unix /run/containerd/containerd.sock: connect: connection "
                            "refused\""), EngineUnavailable, "containerd"),
    # a Swarm manager whose managers lost their quorum: wait, as for an engine outage
    (docker.errors.APIError("503", response=mock.Mock(status_code=503), explanation="rpc error: code = "
                            "Unknown desc = The swarm does not have a leader. It's possible that too few "
                            "managers are online. Make sure more than half of the managers are online."),
     EngineUnavailable, "does not have a leader"),
    # ... and one that is restarting (its swarm part stops first) or not in a swarm
    (docker.errors.APIError("503", response=mock.Mock(status_code=503), explanation="This node is not a "
                            "swarm manager."), EngineUnavailable, "not a Swarm manager (now): tasks wait"),
    (ValueError("odd"), EngineError, "ValueError: odd"),
])
def test_translate(exc, cls, words):
    err = DA._translate(exc)
    assert type(err) is cls and words in str(err)


def test_translate_client_construction_failure():
    try:
        try:
            raise refused()
        except requests.exceptions.ConnectionError as e:
            raise docker.errors.DockerException(f"Error while fetching server API version: {e}")
    except docker.errors.DockerException as e:
        err = DA._translate(e)
    assert isinstance(err, EngineUnavailable) and "No such file or directory" in str(err)


def test_docker_times_are_read():
    # (sizes and durations in words: flowd.units, tests/test_units.py)
    assert DA._parse_time("0001-01-01T00:00:00Z") is None
    assert DA._parse_time("2024-01-02T03:04:05.123456789Z") == pytest.approx(1704164645.123456789)
    assert DA._parse_time("2024-01-02T04:04:05+01:00") == 1704164645.0


def test_package_does_not_import_docker():
    code = "import sys, flowd.executor; assert 'docker' not in sys.modules, 'docker imported'"
    subprocess.run([os.sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.docker
def test_removal_takes_the_containers_anonymous_volumes(executor, reports, docker_client,
                                                        docker_images, docker_tmp, docker_spool):
    image = "flowd/busybox-volume:latest"
    try:
        docker_client.api.inspect_image(image)
    except docker.errors.ImageNotFound:
        cid = docker_client.api.create_container(docker_images["root"], ["true"])["Id"]
        try:
            docker_client.api.commit(cid, repository=image.split(":")[0], tag="latest",
                                     changes=["VOLUME /data"])
        finally:
            docker_client.api.remove_container(cid, force=True)
    spec = make_spec(docker_tmp, docker_spool, "echo x > /data/x\n", image=image)
    executor.start(spec)
    assert reports.result(spec.key).ok
    (c,) = containers(docker_client, spec)
    (vol,) = [m["Name"] for m in docker_client.api.inspect_container(c["Id"])["Mounts"]
              if m["Type"] == "volume"]
    executor.remove(spec).result(WAIT)
    assert containers(docker_client, spec) == []
    with pytest.raises(docker.errors.NotFound):  # an image with a VOLUME leaks nothing per task
        docker_client.api.inspect_volume(vol)


def test_an_outage_ends_when_the_health_check_passes_not_at_the_first_ping():
    """The Swarm executor's engine is back when its swarm answers (a manager
    without a leader still answers pings)."""
    from types import SimpleNamespace
    events = []
    owner = SimpleNamespace(ping_interval=0.01, max_workers=1, _report=events.append)
    api = mock.Mock()
    checks = iter([RuntimeError("no leader"), RuntimeError("no leader"), None])

    def health(a):
        assert a is api
        err = next(checks)
        if err is not None:
            raise err
    link = DA.EngineLink(owner, SimpleNamespace(api=api, close=lambda: None), health=health)
    try:
        link.lost("the swarm does not have a leader")
        assert link.up.wait(WAIT) and link.engine_up
        assert [e.up for e in events] == [False, True]
        assert api.ping.call_count == 0  # the health check replaces the ping
    finally:
        link.close()


def test_a_quiet_followed_log_ends_its_copy_and_is_no_engine_outage():
    """A live log whose task prints nothing for the client's read timeout ends
    the copy (the next `logs --follow` starts it again); the same timeout on
    any other stream is the engine not answering."""
    from types import SimpleNamespace
    events = []
    owner = SimpleNamespace(ping_interval=60, max_workers=1, _report=events.append)
    link = DA.EngineLink(owner, SimpleNamespace(api=mock.Mock(), close=lambda: None))

    def stream():
        yield b"started\n"
        raise requests.exceptions.ConnectionError(
            urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out."))
    try:
        assert list(link.iterate(stream(), quiet_ends=True)) == [b"started\n"]
        assert link.engine_up and events == []
        with pytest.raises(EngineUnavailable):
            list(link.iterate(stream()))
        assert not link.engine_up and [e.up for e in events] == [False]
    finally:
        link.close()
