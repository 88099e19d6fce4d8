"""The container a task runs in: its command, its hardened settings, and how its end reads.

Every container flowd creates gets: no privileged mode, ``no-new-privileges``
(and any extra security options), every capability dropped (and only the
config's ``cap_add`` given back), no network unless the workflow asks for
``bridge``, a pids limit, memory (no swap) and cpu limits, the task's
folder, script and inputs as its only mounts, labels, a bounded json-file
log, and the user ``TaskSpec.user`` (flowd's own by default).
"""
from __future__ import annotations

from typing import Any, Callable

import docker.types

from .. import units
from . import container as C
from .base import ERROR, EXITED, KILLED, OOM, TASK_DIR, TIMEOUT, TaskSpec

ENGINE_LOG_FACTOR = 4  # the engine keeps this many times log_limit of JSON log (executor docstring, "Logs")

# The engine's OOMKilled flag is not reliable on cgroup v1: when the container
# exits right after the kill, containerd can drop the OOM event (its cgroup is
# already gone), so under load a few percent of OOM exits show OOMKilled=false.
# So the container's shell reads the kernel's oom_kill counter of its own
# cgroup (v1: memory.oom_control, v2: memory.events) after the script and says
# so on stderr; _finish looks for that line when the flag is missing.
OOM_MARK = "flowd: out of memory:"
_OOM_CHECK = (
    "for f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do "
    "[ -r $f ] && while read k v; do "
    '[ "$k" = oom_kill ] && [ "$v" != 0 ] && '
    f'echo "{OOM_MARK} the kernel killed $v process(es) of this task" >&2; '
    "done < $f; done; "
)


def create_args(api, spec: TaskSpec, *, spool: str, cap_add: list[str], security_opt: list[str],
                log_limit: int) -> dict:
    """create_container's arguments for a fresh task: the hardened defaults are in _hardened."""
    mounts = [
        docker.types.Mount(TASK_DIR, spec.workdir, type="bind", read_only=False),
        docker.types.Mount(C.SCRIPT_PATH, spec.script_path, type="bind", read_only=True),
    ] + [
        docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
        for m in spec.inputs
    ]
    return _hardened(api, spec, mounts, command(spec), C.container_name(spec), C.labels(spec, spool),
                     cap_add=cap_add, security_opt=security_opt, log_limit=log_limit)


def warm_create_args(api, spec: TaskSpec, *, name: str, slot, labels: dict[str, str],
                     cap_add: list[str], security_opt: list[str], log_limit: int,
                     read_only: bool) -> dict:
    """create_container's arguments for a warm container (flowd.executor.warmagent):
    the same hardening, its slot's folders as /task, /tmp and the control
    folder, the engine's init as pid 1, and a read-only root if asked."""
    from .warmagent import CTL_DIR, agent_command

    mounts = [
        docker.types.Mount(TASK_DIR, slot.task, type="bind", read_only=False),
        docker.types.Mount("/tmp", slot.tmp, type="bind", read_only=False),
        docker.types.Mount(CTL_DIR, slot.ctl, type="bind", read_only=True),
        docker.types.Mount(C.SCRIPT_PATH, spec.script_path, type="bind", read_only=True),
    ]
    return _hardened(api, spec, mounts, agent_command(spec), name, labels, cap_add=cap_add,
                     security_opt=security_opt, log_limit=log_limit, init=True, read_only=read_only,
                     environment={"HOME": spec.env["HOME"]} if "HOME" in spec.env else {})


def _hardened(api, spec: TaskSpec, mounts: list, cmd: list[str], name: str, labels: dict[str, str], *,
              cap_add: list[str], security_opt: list[str], log_limit: int, init: bool = False,
              read_only: bool = False, environment: dict[str, str] | None = None) -> dict:
    """Every container flowd creates: the hardened settings are all here."""
    limits: dict[str, Any] = {}
    if spec.memory:
        limits["mem_limit"] = int(spec.memory)
        limits["memswap_limit"] = int(spec.memory)  # the same: no swap
    if spec.cpus:
        limits["nano_cpus"] = int(spec.cpus * 1e9)
    if init:
        limits["init"] = True
    if read_only:
        limits["read_only"] = True
    half = max(ENGINE_LOG_FACTOR * log_limit // 2, 4096)
    host_config = api.create_host_config(
        mounts=mounts,
        privileged=False,
        security_opt=list(security_opt),
        cap_drop=["ALL"],
        cap_add=list(cap_add) or None,
        network_mode="bridge" if spec.network == "bridge" else "none",
        pids_limit=spec.pids_limit,
        group_add=list(spec.group_add) or None,
        log_config=docker.types.LogConfig(
            type="json-file", config={"max-size": str(half), "max-file": "2"}
        ),
        **limits,
    )
    return dict(
        image=spec.image,
        command=cmd,
        entrypoint=[""],  # the image's entrypoint would wrap our command
        name=name,
        labels=labels,
        working_dir=TASK_DIR,
        environment=dict(spec.env) if environment is None else environment,
        user=spec.user or "",  # "": the image's USER
        host_config=host_config,
        use_config_proxy=False,  # no proxy variables from ~/.docker/config.json
    )


def command(spec: TaskSpec) -> list[str]:
    """The wrapper (flowd.executor.container), run in a subshell and followed by the OOM check."""
    return ["/bin/sh", "-c", f"( {C.wrapper(spec)} ); rc=$?; {_OOM_CHECK}exit $rc"]


def outcome(spec: TaskSpec, state: dict, *, killed: bool, timed_out: bool, engine_lost: bool,
            oom_marked: Callable[[], bool]) -> tuple[str, str, bool]:
    """How an ended container's attempt is reported: (status, message, retryable).

    A kill asked for, a timeout, the engine's own restart (not the script's
    failure: run it again, same attempt), an OOM kill (exit 137 with the
    engine's flag or the shell's mark), else the exit status.
    """
    code = state.get("ExitCode")
    if killed and code != 0:
        return KILLED, "killed on request", False
    if timed_out and code != 0:
        return TIMEOUT, f"timed out after {units.duration(spec.timeout or 0, exact=True)}", False
    if engine_lost and code in (137, 143) and not state.get("OOMKilled"):
        # Without live-restore a dockerd restart kills every container (SIGTERM,
        # then SIGKILL): not the script's failure.
        return (ERROR, f"engine unavailable: the engine restarted and stopped the container "
                       f"(exit status {code})", True)
    if code == 137 and (state.get("OOMKilled") or oom_marked()):
        limit = f" (limit {units.size(spec.memory, trim=True)})" if spec.memory else ""
        return OOM, f"killed: out of memory{limit}", False
    message = f"exit status {code}"
    if state.get("Error"):
        message += f": {state['Error']}"
    return EXITED, message, False
