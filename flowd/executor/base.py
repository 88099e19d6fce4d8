"""The executor seam: how the daemon runs one task attempt somewhere.

The daemon's loop never blocks on an executor. ``start``, ``adopt``, ``kill``
and ``remove`` return at once; the executor does the slow work on threads it
owns and reports back by calling the ``report`` callable it was built with
(thread-safe: the daemon's implementation puts the event on a queue and
wakes its loop). Implementations: ``flowd.executor.docker.DockerExecutor``
(the real one; its docker* modules are the only ones that import docker) and
``flowd.executor.fake.FakeExecutor`` (unit tests).

A container that exits non-zero is a *result*, never an exception.
"""
from __future__ import annotations

import abc
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

LABEL_PREFIX = "io.flowd."
LABEL_RUN = LABEL_PREFIX + "run"
LABEL_TASK = LABEL_PREFIX + "task"
LABEL_PROCESS = LABEL_PREFIX + "process"
LABEL_ATTEMPT = LABEL_PREFIX + "attempt"
LABEL_SPOOL = LABEL_PREFIX + "spool"

# Where things appear inside the container.
TASK_DIR = "/task"
SCRIPT_PATH = "/.flowd/script"

INTERPRETERS = {
    "sh": "sh",
    "bash": "bash",
    "python": "python3",
    "node": "node",
}


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
    pids_limit: int = 256
    network: str = "none"
    spool: str = ""  # label, so one engine can serve several spools
    user: str | None = None  # "UID:GID" the container runs as; None: the image's USER
    group_add: list[str] = field(default_factory=list)  # extra gids (flowd's, for another uid)
    container: str = "fresh"  # "warm": run in a kept container of this process (process@container)

    @property
    def key(self) -> tuple[str, str]:
        return (self.run_id, self.task_id)

    @property
    def container_name(self) -> str:
        return f"flowd-{self.run_id}-{self.process}-{self.task_id}"

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_RUN: self.run_id,
            LABEL_TASK: self.task_id,
            LABEL_PROCESS: self.process,
            LABEL_ATTEMPT: str(self.attempt),
            LABEL_SPOOL: self.spool,
        }

    def command(self) -> list[str]:
        """The command the container runs: a POSIX-sh wrapper around the script.

        It runs the script with the process's interpreter in /task, says
        plainly when the image lacks that interpreter, and leaves every output
        readable and deletable by the daemon whatever uid the image uses.
        """
        interp = INTERPRETERS[self.lang]
        # New files are rw for the user and flowd's group (the container's own
        # group is flowd's, or it was added: TaskSpec.group_add); outputs a
        # script chmod-ed shut are opened again for that group at the end.
        # Nothing is ever world-writable. The outputs are copied, never used.
        outs = " ".join(_sh_quote(f"{TASK_DIR}/{o}") for o in self.outputs)
        chmod = f"chmod -R ug+rwX {outs} 2>/dev/null; " if outs else ""
        wrapper = (
            "umask 007; "
            f"cd {TASK_DIR} || exit 125; "
            f"if ! command -v {interp} >/dev/null 2>&1; then "
            f"echo 'flowd: the image has no {interp} for lang=\"{self.lang}\"; "
            f"use an image that has it, or another lang' >&2; exit 127; fi; "
            f"{interp} {SCRIPT_PATH}; rc=$?; "
            f"{chmod}exit $rc"
        )
        return ["/bin/sh", "-c", wrapper]


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


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


class Executor(abc.ABC):
    """Runs task attempts; reports ``TaskResult`` and ``EngineState``."""

    def __init__(self, report: Report):
        self.report = report

    @abc.abstractmethod
    def start(self, spec: TaskSpec) -> None:
        """Create and start the attempt's container; report its result later.

        A container of the same name left from an earlier attempt is removed
        first. An image that is missing is pulled; when that fails the result
        is ``ERROR`` with "image X is not present and could not be pulled".
        """

    @abc.abstractmethod
    def adopt(self, spec: TaskSpec) -> None:
        """After a daemon restart: find the attempt's container by label.

        Running: wait for it (the timeout counts from its start). Exited:
        report its result. Not there: report ``MISSING``.
        """

    @abc.abstractmethod
    def kill(self, run_id: str, task_id: str) -> None:
        """Stop a task's container; its result is reported as ``KILLED``."""

    @abc.abstractmethod
    def remove(self, spec: TaskSpec) -> None:
        """Remove the attempt's container (its outputs have been collected)."""

    @abc.abstractmethod
    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> None:
        """Remove this spool's containers whose (run, task) is not in ``keep``."""

    def close(self) -> None:
        """Stop threads; running containers are left running."""


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
