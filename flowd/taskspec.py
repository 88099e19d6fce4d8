"""What the executor gets for a task: its ``TaskSpec``, from the run's workflow,
store and the daemon's limits, and who its container runs as (stdlib only)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .executor import base as X
from .taskstore import TaskRecord


@dataclass
class Limits:
    """Daemon-wide settings a run needs (from the config)."""

    pids_limit: int = 256
    max_output_bytes: int | None = None
    max_split_items: int = 10_000_000  # items one output@split="lines" may give (config max_split_lines)
    default_memory: int | None = None  # the limit of processes that set none (default_memory or max_memory)
    # What such a process reserves on a Swarm cluster: config default_memory
    # (max_memory is a cap, not a need: reserving it would fit one task a node).
    reserved_memory: int | None = None
    default_timeout: float | None = None  # for processes that set none (config max_timeout)
    # Who a task's container runs as (config container_user): "daemon" (flowd's
    # own uid:gid), "image" (the image's USER) or "UID[:GID]".
    container_user: str = "daemon"
    default_container: str = "fresh"  # for processes that set no container= (config)
    spool: str = ""


def task_spec(run, rec: TaskRecord) -> X.TaskSpec:
    """The attempt ``rec.attempt`` of ``run``'s task ``rec``, as the executor runs it."""
    proc = run.wf.processes[rec.name]
    # its own, or what flowctl resize gave it (run.json's "resized"; a stand-in run may have no meta)
    resized = (getattr(run, "meta", None) or {}).get("resized")
    memory, cpus = process_limits(proc, run.limits, resized)
    asked, _ = asked_limits(proc, resized)
    inputs = [
        X.Mount(run.store.input_path(rec, seq), f"{X.TASK_DIR}/{port.as_name}", True)
        for port, (_, seq) in zip(proc.inputs, rec.inputs)
    ]
    env = dict(proc.env)
    if run.user is not None:
        env.setdefault("HOME", "/tmp")  # a uid the image's passwd may not know: HOME=/ is not writable
    env.update(FLOWD_RUN=run.id, FLOWD_PROCESS=proc.name, FLOWD_TASK=rec.task_id,
               FLOWD_ATTEMPT=str(rec.attempt))
    return X.TaskSpec(
        run_id=run.id, process=proc.name, task_id=rec.task_id, attempt=rec.attempt,
        image=proc.image, lang=proc.lang, script_path=run.store.path("scripts", proc.name),
        workdir=run.store.task_path(rec, "work"), inputs=inputs,
        outputs=[p.as_name for p in proc.outputs], env=env,
        log_path=run.store.log_path(rec, rec.attempt), timeout=proc.timeout or run.limits.default_timeout,
        memory=memory, cpus=cpus, memory_reservation=asked or run.limits.reserved_memory,
        user=run.user, group_add=list(run.group_add),
        pids_limit=run.limits.pids_limit, network=proc.network, spool=run.limits.spool,
        container=proc.container or run.limits.default_container, placement=list(proc.placement),
        # never feed a damaged item to a script (checked by the executor, off the loop)
        verify=[(ch, seq, run.store.input_path(rec, seq)) for ch, seq in rec.inputs],
        values=[(port.as_name, f"item {seq} of channel {ch}", run.store.input_path(rec, seq))
                for port, (ch, seq) in zip(proc.inputs, rec.inputs) if port.value],
        stdout=next((p.as_name for p in proc.outputs if p.source == "stdout"), ""),
    )


def process_limits(proc, limits: Limits, resized: dict | None) -> tuple[int | None, float | None]:
    """(memory, cpus) of ``proc``'s next task: what ``flowctl resize`` gave it
    (``resized``: run.json's process -> {"memory", "cpus"}), else its own, else
    the daemon's default memory."""
    memory, cpus = asked_limits(proc, resized)
    return memory or limits.default_memory, cpus


def asked_limits(proc, resized: dict | None) -> tuple[int | None, float | None]:
    """(memory, cpus) the workflow or a resize asked for ``proc``; None where
    neither did. run.json is flowd's own file; it is read with care all the
    same (a value of another type is ignored)."""
    memory, cpus = proc.memory, proc.cpus
    got = (resized or {}).get(proc.name) if isinstance(resized, dict) else None
    if isinstance(got, dict):
        m, c = got.get("memory"), got.get("cpus")
        if isinstance(m, int) and not isinstance(m, bool) and m > 0:
            memory = m
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0:
            cpus = float(c)
    return memory, cpus


def container_identity(setting: str) -> tuple[str | None, list[str], int]:
    """Config ``container_user`` -> (user for the container, extra groups, work/ mode).

    - ``daemon`` (the default): flowd's own uid and gid. Whatever a script
      writes in /task is flowd's, so flowd can always read and delete it, and
      its task folder is 0700.
    - ``image``: the image's USER (root for most images; with every capability
      dropped it cannot pass file permissions). The container also gets
      flowd's group, and work/ is 02770 (setgid: new files stay in that group),
      so flowd can read and delete what it writes.
    - ``UID[:GID]``: that user; as for ``image`` unless it is flowd's own uid.
    Either way the run's folders are 0700 and flowd's alone, and every item is
    a copy flowd made (TaskStore.collect), never the container's file.
    """
    me, my_gid = os.geteuid(), os.getegid()
    if setting in ("", "daemon"):
        return f"{me}:{my_gid}", [], 0o700
    if setting == "image":
        return None, [str(my_gid)], 0o2770
    uid, _, gid = setting.partition(":")
    if int(uid) == me:
        return setting if gid else f"{uid}:{my_gid}", [], 0o700
    return setting, [str(my_gid)], 0o2770
