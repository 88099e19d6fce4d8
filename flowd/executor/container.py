"""What a task's container is, for the Docker backends (fresh, warm): its
name, its labels, and the shell wrapper around the script (stdlib only).

The seam (``flowd.executor.base``) knows none of this: another backend may
name and label its work differently.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import TASK_DIR, TaskSpec

LABEL_PREFIX = "io.flowd."
LABEL_RUN = LABEL_PREFIX + "run"
LABEL_TASK = LABEL_PREFIX + "task"
LABEL_PROCESS = LABEL_PREFIX + "process"
LABEL_ATTEMPT = LABEL_PREFIX + "attempt"
LABEL_SPOOL = LABEL_PREFIX + "spool"
LABEL_POOL = LABEL_PREFIX + "pool"  # "warm" on a warm pool's containers (they have no task)

# Where things appear inside the container.
SCRIPT_PATH = "/.flowd/script"

INTERPRETERS = {
    "sh": "sh",
    "bash": "bash",
    "python": "python3",
    "node": "node",
}


def container_name(spec: TaskSpec) -> str:
    """A fresh task's container: one per attempt's task, found again by name."""
    return f"flowd-{spec.run_id}-{spec.process}-{spec.task_id}"


def labels(spec: TaskSpec, spool: str) -> dict[str, str]:
    """A fresh task's container labels: ``adopt``, ``remove`` and ``sweep`` find it by them."""
    return {
        LABEL_RUN: spec.run_id,
        LABEL_TASK: spec.task_id,
        LABEL_PROCESS: spec.process,
        LABEL_ATTEMPT: str(spec.attempt),
        LABEL_SPOOL: spool,
    }


def wrapper(spec: TaskSpec) -> str:
    """The POSIX-sh wrapper around the script, for ``/bin/sh -c``.

    It runs the script with the process's interpreter in /task, says plainly
    when the image lacks that interpreter, and leaves every output readable
    and deletable by the daemon whatever uid the image uses.
    """
    interp = INTERPRETERS[spec.lang]
    # New files are rw for the user and flowd's group (the container's own
    # group is flowd's, or it was added: TaskSpec.group_add); outputs a
    # script chmod-ed shut are opened again for that group at the end.
    # Nothing is ever world-writable. The outputs are copied, never used.
    outs = " ".join(sh_quote(f"{TASK_DIR}/{o}") for o in spec.outputs)
    chmod = f"chmod -R ug+rwX {outs} 2>/dev/null; " if outs else ""
    # output@from="stdout": the script's stdout is that output's file, collected
    # like any other (the log then keeps stderr only)
    stdout = f" >{sh_quote(f'{TASK_DIR}/{spec.stdout}')}" if spec.stdout else ""
    return (
        "umask 007; "
        f"cd {TASK_DIR} || exit 125; "
        f"if ! command -v {interp} >/dev/null 2>&1; then "
        f"echo 'flowd: the image has no {interp} for lang=\"{spec.lang}\"; "
        f"use an image that has it, or another lang' >&2; exit 127; fi; "
        f"{interp} {SCRIPT_PATH}{stdout}; rc=$?; "
        f"{chmod}exit $rc"
    )


def sh_quote(s: str) -> str:
    """``s`` as one word for a POSIX shell (single quotes; no NUL in ``s``)."""
    return "'" + s.replace("'", "'\"'\"'") + "'"


@dataclass(eq=False)
class Task:
    """A Docker backend's record of one attempt it runs (fresh or warm)."""

    spec: TaskSpec
    container_id: str | None = None
    timed_out: bool = False
    reported: bool = False
    engine_lost: bool = False  # the engine went away while we waited
    finished: bool = False  # _finish began: the live log is done with
    following: bool = False  # its live log is being copied (someone follows it)
