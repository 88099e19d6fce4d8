"""The executor seam's contract (flowd/executor/base.py), one suite for every backend.

Each test runs against every executor: ``fake`` (FakeExecutor: scripts are
Python functions), ``fresh`` (DockerExecutor, a new container per task) and
``warm`` (DockerExecutor, ``spec.container == "warm"``: kept containers) and
``swarm`` (SwarmExecutor: a one-shot Swarm job per task, on a one-node swarm
made by test_swarm's ``docker_swarm`` and left again; ``-m swarm``).
A case gives both forms of its script: ``Case(sh=..., fake=...)``. The
Docker backends need the real engine (a failure, not a skip, when CI=true:
see conftest.docker_client).

Results are awaited on the report queue; futures are awaited where a test
must know a job is done. No sleeps, no timed assertions.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest

from flowd import checksum
from flowd.executor import base as X
from flowd.executor.fake import FakeExecutor, FakeTask
from flowd.taskspec import container_identity
from test_swarm import docker_swarm, remove_spool_services, spool_services  # noqa: F401 - a fixture

IMAGE = "flowd/busybox:latest"
WAIT = 60  # seconds: upper bound on any single result (a warm container's start included)


@dataclass
class Case:
    """One script in both forms: ``sh`` for the Docker backends, ``fake`` for FakeExecutor."""

    sh: str
    fake: Callable[[FakeTask], "int | str"]


class Reports:
    """The report callable: a queue read with a timeout."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.kept: list[X.TaskResult] = []

    def __call__(self, event):
        self.q.put(event)

    def result(self, key, timeout=WAIT) -> X.TaskResult:
        for r in self.kept:
            if r.key == key:
                self.kept.remove(r)
                return r
        while True:
            try:
                ev = self.q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no result for {key} within {timeout}s") from None
            if not isinstance(ev, X.TaskResult):
                continue  # EngineState: not what these tests look at
            if ev.key == key:
                return ev
            self.kept.append(ev)


class Backend:
    """One executor under test, with what the suite needs around it."""

    def __init__(self, name: str, tmp: str, spool: str, docker_client=None):
        self.name = name
        self.tmp = tmp
        self.spool = spool
        self.client = docker_client
        self.run_id = "r" + uuid.uuid4().hex[:8]
        self.reports = Reports()
        self._n = 0
        self.ex = self.new_executor()

    @property
    def docker(self) -> bool:
        return self.name != "fake"

    def new_executor(self) -> X.Executor:
        """A new executor on the same spool (a daemon's restart)."""
        if self.name == "fake":
            return FakeExecutor(self.reports)
        if self.name == "swarm":
            from flowd.executor.swarm import SwarmExecutor
            return SwarmExecutor(self.reports, spool=self.spool, settings=X.Settings(max_containers=8))
        from flowd.executor.docker import DockerExecutor
        return DockerExecutor(self.reports, spool=self.spool, pool_dir=os.path.join(self.tmp, "pool"),
                              settings=X.Settings(max_containers=8, warm_idle=300))

    def spec(self, case: Case, *, process: str = "p", inputs: dict[str, bytes] | None = None,
             **kw) -> X.TaskSpec:
        """A task like the daemon makes one: its own folder, its process's script file,
        inputs stamped with their checksum (as every item in a channel is)."""
        self._n += 1
        task = f"t{self._n}"
        base = os.path.join(self.tmp, f"{self.run_id}-{task}")
        work = os.path.join(base, "work")
        os.makedirs(work)
        user, group_add, mode = container_identity("daemon")
        os.chmod(work, mode)
        script_path = os.path.join(self.tmp, f"script-{process}")  # one per process, as run.py does
        if not os.path.exists(script_path):
            with open(script_path, "w") as f:
                f.write(case.sh)
            os.chmod(script_path, 0o640)
        if self.name == "fake":
            self.ex.scripts[process] = case.fake
        mounts, verify = [], []
        for seq, (name, data) in enumerate((inputs or {}).items(), 1):
            path = os.path.join(base, f"in-{name}")
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            checksum.stamp_file(path)
            mounts.append(X.Mount(path, f"{X.TASK_DIR}/{name}", True))
            verify.append((name, seq, path))
        env = {"FLOWD_RUN": self.run_id, "FLOWD_PROCESS": process, "FLOWD_TASK": task,
               "FLOWD_ATTEMPT": "1", **kw.pop("env", {})}
        kw.setdefault("timeout", 60)
        return X.TaskSpec(
            run_id=self.run_id, process=process, task_id=task, attempt=1, image=IMAGE, lang="sh",
            script_path=script_path, workdir=work, inputs=mounts, verify=verify, env=env,
            log_path=os.path.join(base, "log"), spool=self.spool, user=user, group_add=group_add,
            container="warm" if self.name == "warm" else "fresh", **kw)

    def result(self, spec: X.TaskSpec) -> X.TaskResult:
        if self.name == "fake":
            self.ex.run_pending()
        return self.reports.result(spec.key)

    def run(self, case: Case, **kw) -> tuple[X.TaskSpec, X.TaskResult]:
        spec = self.spec(case, **kw)
        fut = self.ex.start(spec)
        assert isinstance(fut, concurrent.futures.Future)
        return spec, self.result(spec)

    def wait_started(self, spec: X.TaskSpec) -> None:
        """Until the script has printed "started" (the live log, followed as
        ``flowctl logs --follow`` follows it: ``follow`` asked again and again): it is running."""
        if self.name == "fake":
            return
        from daemon_fixtures import wait_until

        def printed():
            self.ex.follow(spec.run_id, spec.task_id)
            for path in (X.live_log_path(spec.log_path), spec.log_path):
                try:
                    with open(path, "rb") as f:
                        if b"started" in f.read():
                            return True
                except FileNotFoundError:
                    pass
            return False
        wait_until(printed, timeout=WAIT, what="the task to print 'started'")

    def spool_containers(self) -> list[dict]:
        return self.client.api.containers(all=True, filters={"label": [f"io.flowd.spool={self.spool}"]})

    def holds(self, key) -> bool:
        """Does the executor keep something of task ``key`` (a container, or the fake's record)?"""
        if self.name == "fake":
            return key in self.ex.containers
        if self.name == "swarm":  # its Swarm job (a service)
            return any((s["Spec"].get("Labels") or {}).get("io.flowd.task") == key[1]
                       and (s["Spec"].get("Labels") or {}).get("io.flowd.run") == key[0]
                       for s in spool_services(self.client, self.spool))
        return any((c.get("Labels") or {}).get("io.flowd.task") == key[1]
                   and (c.get("Labels") or {}).get("io.flowd.run") == key[0]
                   for c in self.spool_containers())


@pytest.fixture(params=["fake", pytest.param("fresh", marks=pytest.mark.docker),
                        pytest.param("warm", marks=pytest.mark.docker),
                        pytest.param("swarm", marks=[pytest.mark.docker, pytest.mark.swarm])])
def backend(request, tmp_path):
    if request.param == "fake":
        b = Backend("fake", str(tmp_path), "spool-fake")
        yield b
        return
    client = request.getfixturevalue("docker_client")
    request.getfixturevalue("docker_images")
    spool = request.getfixturevalue("docker_spool")  # removes the spool's containers afterwards
    tmp = request.getfixturevalue("docker_tmp")
    if request.param == "swarm":
        request.getfixturevalue("docker_swarm")  # a one-node swarm, left again after the module
    b = Backend(request.param, tmp, spool, client)
    yield b
    b.ex.close()
    if request.param == "swarm":
        remove_spool_services(client, spool)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- what every executor promises ----------------------------------------------------------------

def test_success_leaves_the_declared_outputs_in_the_workdir(backend):
    def fake(t):
        t.write("result", b"made\n")
        return 0
    spec, res = backend.run(Case(sh="echo made > result\n", fake=fake), outputs=["result"])
    assert (res.status, res.exit_code, res.message) == (X.EXITED, 0, "exit status 0"), res
    assert res.ok and res.key == spec.key and res.attempt == 1 and not res.retryable
    assert read(os.path.join(spec.workdir, "result")) == b"made\n"


def test_a_nonzero_exit_is_a_result_with_its_status(backend):
    spec, res = backend.run(Case(sh="echo failing >&2; exit 3\n", fake=lambda t: 3))
    assert (res.status, res.exit_code, res.message) == (X.EXITED, 3, "exit status 3"), res
    assert not res.ok and not res.retryable


def test_the_log_holds_what_the_script_printed(backend):
    spec, res = backend.run(Case(sh="echo to-stdout; echo to-stderr >&2\n", fake=lambda t: 0))
    assert res.ok, res
    log = read(spec.log_path)
    if backend.name == "fake":  # a fake script prints nothing; the fake says what ran
        assert f"fake p task {spec.task_id} attempt 1".encode() in log
    else:
        assert b"to-stdout\n" in log and b"to-stderr\n" in log
    assert not os.path.exists(X.live_log_path(spec.log_path))  # the live log goes at the end


def test_the_script_sees_flowd_variables_and_the_process_env(backend):
    names = ("FLOWD_RUN", "FLOWD_PROCESS", "FLOWD_TASK", "FLOWD_ATTEMPT", "GREETING")

    def fake(t):
        t.write("env", "".join(f"{n}={t.spec.env[n]}\n" for n in names).encode())
        return 0
    sh = "".join(f'echo "{n}=${n}" >> env\n' for n in names)
    spec, res = backend.run(Case(sh=sh, fake=fake), outputs=["env"],
                            env={"GREETING": "hello 'quoted' $world"})
    assert res.ok, res
    assert read(os.path.join(spec.workdir, "env")).decode().splitlines() == [
        f"FLOWD_RUN={backend.run_id}", "FLOWD_PROCESS=p", f"FLOWD_TASK={spec.task_id}",
        "FLOWD_ATTEMPT=1", "GREETING=hello 'quoted' $world"]


def test_inputs_appear_at_task_as(backend):
    def fake(t):
        t.write("out", t.read("left") + t.read("right.txt"))
        return 0
    spec, res = backend.run(Case(sh="cat /task/left /task/right.txt > out\n", fake=fake),
                            outputs=["out"], inputs={"left": b"L\n", "right.txt": b"R\n"})
    assert res.ok, res
    assert read(os.path.join(spec.workdir, "out")) == b"L\nR\n"


def test_kill_reports_killed(backend):
    spec = backend.spec(Case(sh="echo started; sleep 120\n", fake=lambda t: 0))
    assert isinstance(backend.ex.start(spec), concurrent.futures.Future)
    backend.wait_started(spec)
    fut = backend.ex.kill(spec.run_id, spec.task_id)
    assert isinstance(fut, concurrent.futures.Future)
    fut.result(timeout=WAIT)
    res = backend.result(spec)
    assert res.status == X.KILLED and not res.ok, res


def test_a_timeout_reports_timeout(backend):
    spec, res = backend.run(Case(sh="echo started; sleep 120\n", fake=lambda t: X.TIMEOUT), timeout=1)
    assert res.status == X.TIMEOUT and not res.ok, res
    if backend.docker:
        assert res.message == "timed out after 1s"
        assert b"started" in read(spec.log_path)


def test_adopt_of_an_attempt_that_is_not_there_reports_missing(backend):
    spec = backend.spec(Case(sh="true\n", fake=lambda t: 0))
    fut = backend.ex.adopt(spec)  # never started
    assert isinstance(fut, concurrent.futures.Future)
    res = backend.reports.result(spec.key)
    assert res.status == X.MISSING, res


def test_a_damaged_input_reports_damaged_and_nothing_runs(backend):
    ran = []

    def fake(t):
        ran.append(t.spec.task_id)
        return 0
    spec = backend.spec(Case(sh="echo ran > ran\n", fake=fake), inputs={"a": b"precious"},
                        outputs=["ran"])
    path = spec.inputs[0].source
    with open(path, "r+b") as f:  # a flipped byte after the stamp
        f.write(b"X")
    backend.ex.start(spec)
    res = backend.result(spec)
    assert res.status == X.DAMAGED, res
    assert res.damaged and res.damaged[0][:2] == ("a", 1) and "checksum mismatch" in res.damaged[0][2]
    assert "damaged input: item 1 of a" in res.message
    assert ran == [] and not os.path.exists(os.path.join(spec.workdir, "ran"))
    if backend.docker:
        assert not backend.holds(spec.key)  # no container was made for it
        assert read(path) == b"Xrecious"  # kept as found


def test_sweep_removes_what_is_not_kept(backend):
    ok = Case(sh="true\n", fake=lambda t: 0)
    kept, _ = backend.run(ok)
    gone, _ = backend.run(ok)
    if backend.name == "fake":
        ex = backend.ex
    else:  # a restarted daemon sweeps what the earlier one left
        backend.ex.close()
        ex = backend.ex = backend.new_executor()
    fut = ex.sweep(backend.spool, {kept.key})
    assert isinstance(fut, concurrent.futures.Future)
    fut.result(timeout=WAIT)
    assert not backend.holds(gone.key)
    if backend.name == "warm":
        # a warm container is never taken back after a restart: all of them go
        assert [c for c in backend.spool_containers()
                if (c.get("Labels") or {}).get("io.flowd.pool") == "warm"] == []
        assert os.listdir(os.path.join(backend.tmp, "pool")) == []  # and their folders
    else:
        assert backend.holds(kept.key)


def test_a_sweep_never_removes_a_task_the_executor_is_running(backend):
    """The daemon sweeps now and then with the tasks its runs know; an attempt
    the executor started meanwhile (not in that set yet) is spared."""
    spec = backend.spec(Case(sh="echo started; sleep 120\n", fake=lambda t: 0))
    backend.ex.start(spec)
    backend.wait_started(spec)
    backend.ex.sweep(backend.spool, set()).result(timeout=WAIT)
    if backend.name != "warm":  # a warm container is the pool's, not labelled with a task
        assert backend.holds(spec.key)
    backend.ex.kill(spec.run_id, spec.task_id).result(timeout=WAIT)
    assert backend.result(spec).status == X.KILLED  # it ran on until the kill, untouched


def test_remove_returns_a_future_and_forgets_the_attempt(backend):
    spec, res = backend.run(Case(sh="true\n", fake=lambda t: 0))
    assert res.ok, res
    fut = backend.ex.remove(spec)
    assert isinstance(fut, concurrent.futures.Future)
    fut.result(timeout=WAIT)
    assert not backend.holds(spec.key)


def test_reconfigure_and_status(backend):
    spec, res = backend.run(Case(sh="true\n", fake=lambda t: 0))
    assert res.ok, res
    st = backend.ex.status()
    assert isinstance(st, dict)
    if backend.name == "warm":
        assert st["warm"]["containers"] == 1 and st["warm"]["idle"] == 1, st
    new = X.Settings(max_containers=3, warm_idle=300, warm_tasks=5)
    assert backend.ex.reconfigure(new) is None
    assert backend.ex.settings.max_containers == 3 and backend.ex.settings.warm_tasks == 5
    st = backend.ex.status()
    if backend.docker:
        assert st["max_containers"] == 3
    if backend.name in ("fresh", "warm"):
        assert st["warm"]["containers"] == 0  # kept ones were made under the old settings
    # and the executor still runs tasks under the new settings
    _, res = backend.run(Case(sh="true\n", fake=lambda t: 0), process="q")
    assert res.ok, res
