"""The executor seam: how the daemon runs one task attempt somewhere.

The daemon's loop never blocks on an executor. ``start``, ``adopt``, ``kill``
and ``remove`` return at once; the executor does the slow work on threads it
owns and reports back by calling the ``report`` callable it was built with
(thread-safe: the daemon's implementation puts the event on a queue and
wakes its loop). Implementations: ``flowd.executor.docker.DockerExecutor``
(the real one: fresh containers, and warm ones through
``flowd.executor.warm``; its docker* modules are the only ones that import
docker) and ``flowd.executor.fake.FakeExecutor`` (unit tests). One contract
suite (tests/test_executor_contract.py) runs against each.

What the seam knows is what every backend does: start, adopt, kill,
remove, sweep, resize, reconfigure, status. Names, labels and the shell wrapper of
a container are the Docker backends' (``flowd.executor.container``).

A script that exits non-zero is a *result*, never an exception.
"""
from __future__ import annotations

import abc
import concurrent.futures
import os
from dataclasses import dataclass, field
from typing import Callable

# TaskResult.status values
EXITED = "exited"  # the script ran to its end; see exit_code (0 is success)
TIMEOUT = "timeout"  # killed after the process's timeout
OOM = "oom"  # killed by the kernel for going over its memory limit
KILLED = "killed"  # stopped on request (cancel)
MISSING = "missing"  # adopt found no container: never started, or removed
ERROR = "error"  # could not start: no image, bad config, engine refused
DAMAGED = "damaged"  # an input failed its checksum: not started (see TaskResult.damaged)

# Where a task's inputs and outputs are, for its script (every backend).
TASK_DIR = "/task"


@dataclass
class Mount:
    source: str  # absolute host path (never under /tmp: the engine may see another)
    target: str  # absolute path in the container
    read_only: bool = True


@dataclass
class TaskSpec:
    """Everything needed to run one attempt of one task."""

    run_id: str
    process: str
    task_id: str  # unique within the run; also in the container name
    attempt: int  # 1 on the first try
    image: str
    lang: str
    script_path: str  # host path of the script file, mounted read-only
    workdir: str  # host path mounted read-write at /task
    inputs: list[Mount] = field(default_factory=list)  # read-only files in /task
    outputs: list[str] = field(default_factory=list)  # declared names in /task
    env: dict[str, str] = field(default_factory=dict)
    # Inputs to check against their checksums before the container starts, on
    # the executor's thread (reading a big item must not stall the loop):
    # [(channel, seq, host path)]. Any that fails: a DAMAGED result, no start.
    verify: list[tuple[str, int, str]] = field(default_factory=list)
    log_path: str = ""  # host path where stdout+stderr are written at the end
    # (while the task runs, executors that can may grow live_log_path(log_path))
    timeout: float | None = None  # seconds of run time
    memory: int | None = None  # bytes
    cpus: float | None = None
    memory_reservation: int | None = None  # what a cluster reserves for it (None: nothing; memory is the limit)
    pids_limit: int = 256
    network: str = "none"
    spool: str = ""  # label, so one engine can serve several spools
    user: str | None = None  # "UID:GID" the container runs as; None: the image's USER
    group_add: list[str] = field(default_factory=list)  # extra gids (flowd's, for another uid)
    container: str = "fresh"  # "warm": run in a kept container of this process (process@container)
    placement: list[str] = field(default_factory=list)  # Swarm constraints (process@placement, to come)
    # Value inputs (input@value): [(variable, what, host path)], read by the
    # executor on its thread (flowd.channelvalues.value_env) into the environment.
    values: list[tuple[str, str, str]] = field(default_factory=list)
    stdout: str = ""  # output@from="stdout": the as-name in /task that gets the script's stdout

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.task_id)


@dataclass
class TaskResult:
    run_id: str
    task_id: str
    attempt: int
    status: str  # one of the constants above
    exit_code: int | None = None
    message: str = ""  # human words: "exit status 3", "timed out after 30s"
    started_at: float | None = None
    finished_at: float | None = None
    retryable: bool = False  # not the script's fault (engine down): start again, same attempt
    damaged: list[tuple[str, int, str]] = field(default_factory=list)  # DAMAGED: (channel, seq, why)
    # What the attempt used, for its trace record (None: not known; flowd.executor.usage)
    peak_memory: int | None = None  # bytes, the container's high-water mark
    cpu_seconds: float | None = None
    bytes_in: int | None = None  # the inputs put in /task
    bytes_out: int | None = None  # the outputs taken from /task (after a success)
    node: str = ""  # the hostname of the machine it ran on

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.task_id)

    @property
    def ok(self) -> bool:
        return self.status == EXITED and self.exit_code == 0


@dataclass
class EngineState:
    """Reported when the container engine goes away or comes back."""

    up: bool
    message: str = ""


Report = Callable[[object], None]


@dataclass
class Settings:
    """The daemon's settings an executor follows; ``reconfigure`` changes them live."""

    max_containers: int = 64  # all containers at once, fresh and warm, running or idle
    cap_add: list[str] = field(default_factory=list)  # given back after every one is dropped
    warm_idle: float = 120.0  # seconds an idle warm container is kept
    warm_tasks: int = 1000  # tasks one warm container runs before it is replaced (0: no limit)
    warm_read_only: bool = True  # warm containers' root file system is read-only


# Executor.resize's default: what a backend that cannot change a running task does
KEEPS_LIMITS = "Swarm tasks keep their limits; later tasks get the new ones"


def _resolved(value: object) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def done_future() -> concurrent.futures.Future:
    """A future already done: what an executor that works at once returns."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(None)
    return fut


class Executor(abc.ABC):
    """Runs task attempts; reports ``TaskResult`` and ``EngineState``.

    Every call returns at once with a ``concurrent.futures.Future`` that is
    done when the executor has done the job (not when the task ends: that is
    the ``TaskResult`` report). The daemon ignores them; tests may wait.
    """

    def __init__(self, report: Report, settings: Settings | None = None):
        self.report = report
        self.settings = settings or Settings()

    @abc.abstractmethod
    def start(self, spec: TaskSpec) -> concurrent.futures.Future:
        """Run the attempt; report its ``TaskResult`` when it ends.

        Inputs that fail their checks are reported ``DAMAGED`` and nothing
        runs. What the backend could not start is ``ERROR`` (``retryable``
        when the backend itself is away: the same attempt starts again later).
        """

    @abc.abstractmethod
    def adopt(self, spec: TaskSpec) -> concurrent.futures.Future:
        """After a daemon restart: take the attempt back if it is still there.

        Running: follow it (its timeout counts from its start). Ended: report
        its result. Not there, or not trusted: report ``MISSING`` (it runs again).
        """

    @abc.abstractmethod
    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        """Stop the task; its result is reported as ``KILLED``."""

    @abc.abstractmethod
    def remove(self, spec: TaskSpec) -> concurrent.futures.Future:
        """Forget the attempt (its outputs have been collected): remove what it left."""

    @abc.abstractmethod
    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        """Remove this spool's leftovers whose (run, task) is not in ``keep``."""

    def image_id(self, image: str) -> str | None:
        """The id (``sha256:...``) of the image ``image`` names now, for the cache's
        key (flowd/cache.py); None when the backend cannot tell (no caching).
        Blocking: called on a cache lookup's thread, never on the loop. Raises
        ``flowd.errors.FlowError`` when the engine cannot answer."""
        return None

    def follow(self, run_id: str, task_id: str) -> None:
        """Someone follows the task's log: from now on it grows as the task runs
        (``live_log_path``). A backend whose logs are always live does nothing."""

    def resize(self, run_id: str, process: str, memory: int | None,
               cpus: float | None) -> concurrent.futures.Future:
        """New limits for ``process`` of run ``run_id`` (``flowctl resize``):
        ``memory`` (bytes) and ``cpus`` as its later tasks get them, None for
        no limit. What already runs gets them live where the backend can.

        The future's result is a dict: ``updated`` (running containers given
        the new limits live), ``retired`` (kept containers that are replaced),
        ``kept`` (running tasks that keep their old limits), ``note`` (words
        for the user). When ``memory`` is below what a running container of
        the process uses now, nothing is changed and the dict has ``refused``
        instead (the message naming the container, its usage and the limit).

        This default changes nothing that runs: its tasks keep their limits.
        """
        return _resolved({"updated": 0, "retired": 0, "kept": None, "note": KEEPS_LIMITS})

    def reconfigure(self, settings: Settings) -> None:
        """Follow new settings (config reload) from the next task on."""
        self.settings = settings

    def status(self) -> dict:
        """What the backend holds now, for ``flowctl status`` (e.g. its warm pool)."""
        return {}

    def nodes(self) -> dict[tuple[str, str], str]:
        """Where the running tasks are: (run id, task id) -> the node's name,
        for ``flowctl status RUN`` (from memory: no engine call). Empty when
        every task runs on this machine's engine."""
        return {}

    def close(self) -> None:
        """Stop threads; running work is left running (``adopt`` finds it)."""


def live_log_path(log_path: str) -> str:
    """Where a task's log grows while it runs, beside its final ``log_path``.

    The final log replaces nothing here: it is renamed to ``log_path`` at the
    end and the live file is then removed. Its content starts with what the
    live file held (same stream, same order), so a reader that printed N bytes
    of the live file goes on at byte N of the final one.
    """
    folder, name = os.path.split(log_path)
    return os.path.join(folder, "." + name + ".live")


def check_inputs(spec: TaskSpec) -> dict | None:
    """If an input of ``spec.verify`` fails its checksum, the fields of the
    DAMAGED result to report (``damaged``, ``message``); else None.

    Executors call it on their own thread before they start a container.
    """
    bad = [(ch, seq, why) for ch, seq, path in spec.verify
           if (why := check_input(path)) is not None]
    if not bad:
        return None
    return {"damaged": bad, "message": "damaged input: " + "; ".join(
        f"item {seq} of {ch}: {why}" for ch, seq, why in bad)}


def check_input(path: str) -> str | None:
    """Why the item at ``path`` must not be mounted into a container, or None.

    Only a regular file that flowd owns (lstat: a link is never followed into
    a bind mount), with no setuid, setgid or write bit for others, whose
    checksum stamp is present and matches.
    """
    import stat

    from .. import checksum  # flowd's own, stdlib only

    try:
        st = os.lstat(path)
    except OSError as e:
        return f"it cannot be found ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by flowd"
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o022):
        return f"its mode {stat.S_IMODE(st.st_mode):o} is not one flowd gives items"
    return checksum.check(path)
