"""A task attempt as a one-shot Docker Swarm job: its service's name, labels
and hardened spec, and how a job task's end reads (no docker import here:
the spec is the engine API's own JSON, so docker-py 5.0.3 and 7.x send it
as it is).

The job: ``mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions":
1}}`` with restart condition ``none`` (docker-py 5.0.3 has no job mode in
``ServiceMode``; the raw mode works on both). Never updated or scaled (that
reruns a job, Moby #44312): a new attempt is a new service.

What is the same as a local container (``flowd.executor.dockerspec``): the
command (the wrapper and the OOM check), the user, the extra groups, the
working folder, the environment, every capability dropped and only the
config's ``cap_add`` given back (``CapabilityDrop``/``CapabilityAdd``: engine
API 1.41, Docker 20.10), the pids limit (``Resources.Limits.Pids``: API
1.41), memory and cpus (as limits *and* reservations, so Swarm places a task
only where it has room), the task's folder, script and inputs as the only
mounts (bind mounts: the spool is at the same path on every node), the
labels, a bounded json-file log, no privileged mode (a service cannot ask
for it), and SIGKILL as the stop signal (a kill or a timeout stops at once,
as ``docker kill`` does locally).

What Swarm cannot carry on engine API 1.41 (Docker 20.10, these machines):

- **no network** (``network="none"``, the default): a service cannot use
  the ``none`` network ("could not find the corresponding predefined swarm
  network: network none not found", Moby #44403, #42204; checked here), and
  a service with no network is put on the engine's default bridge. So a
  Swarm task has the bridge network (it can reach the host and, with a
  route out, the world), as ``network="bridge"`` does locally. An internal
  swarm-scoped bridge network is no way out: its task still had a default
  route and reached the host's docker0 address (checked).

- ``no-new-privileges`` and extra ``security_opt`` (seccomp or AppArmor
  profiles): ``ContainerSpec.Privileges.NoNewPrivileges``/``Seccomp``/
  ``AppArmor`` came with API 1.44 (Docker 25). On 20.10 set
  ``"no-new-privileges": true`` in each node's /etc/docker/daemon.json (the
  engine then applies it to every container, Swarm's too). Without it a
  setuid file in the image still runs with its owner's uid, but with no
  capabilities (the bounding set is empty).
- no swap (``memswap_limit`` = memory): a service has no swap setting; the
  engine's default applies (as much swap as memory, where the node has swap).
- the engine's own ``docker-init`` is not needed (a fresh task runs the
  wrapper as pid 1, as locally).
"""
from __future__ import annotations

import hashlib
import re

from ..textsafe import for_log
from . import container as C
from .base import TASK_DIR, TaskSpec
from .dockerspec import ENGINE_LOG_FACTOR, command

LABEL_KIND = C.LABEL_PREFIX + "kind"  # "job" on a flowd Swarm service
NAME_MAX = 63  # Swarm service names are DNS labels

# Task states (Status.State) after which nothing more happens to a job's task.
ENDED = ("complete", "failed", "rejected", "shutdown", "orphaned", "remove")
# States of a task that is on a node (NodeID set) and has not ended.
ON_NODE = ("assigned", "accepted", "preparing", "ready", "starting", "running")
# A node's Status.State when the manager has no word from it (``down``: no
# heartbeat for ~15 s with the default 5 s heartbeat period, checked here).
NODE_SILENT = ("down", "unknown", "disconnected")


def service_name(spec: TaskSpec) -> str:
    """``flowd-RUN-TASK-aN``: one service per attempt (a retry never reuses a
    job). Anything outside [A-Za-z0-9-] becomes '-'; a name over 63 bytes
    keeps its start and gets a hash of the whole."""
    raw = f"flowd-{spec.run_id}-{spec.task_id}-a{spec.attempt}"
    name = re.sub(r"[^A-Za-z0-9-]", "-", raw)
    if len(name) > NAME_MAX:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:12]
        name = name[: NAME_MAX - 13].rstrip("-") + "-" + digest
    return name


def service_labels(spec: TaskSpec, spool: str) -> dict[str, str]:
    """The container's labels (``container.labels``) and the kind: adopt, remove
    and sweep find a service by them."""
    return {**C.labels(spec, spool), LABEL_KIND: "job"}


def placement(spec: TaskSpec) -> list[str]:
    """The attempt's Swarm constraints (``TaskSpec.placement``; none when the
    seam has no such field yet), e.g. ``node.labels.disk==ssd``."""
    return [c.strip() for c in spec.placement if c.strip()]


def service_args(spec: TaskSpec, *, spool: str, cap_add: list[str], log_limit: int) -> dict:
    """``APIClient.create_service``'s arguments for the attempt: the hardening is here."""
    mounts = [
        _bind(spec.workdir, TASK_DIR, read_only=False),
        _bind(spec.script_path, C.SCRIPT_PATH, read_only=True),
    ] + [_bind(m.source, m.target, read_only=m.read_only) for m in spec.inputs]
    labels = service_labels(spec, spool)
    cspec: dict = {
        "Image": spec.image,
        "Command": command(spec),  # Command replaces the image's entrypoint
        "Dir": TASK_DIR,
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Labels": dict(labels),
        "Mounts": mounts,
        "StopSignal": "SIGKILL",
        "StopGracePeriod": 0,
        "CapabilityDrop": ["ALL"],
    }
    if cap_add:
        cspec["CapabilityAdd"] = list(cap_add)
    if spec.user:
        cspec["User"] = spec.user
    if spec.group_add:
        cspec["Groups"] = list(spec.group_add)
    limits: dict = {"Pids": int(spec.pids_limit)} if spec.pids_limit else {}
    reservations: dict = {}
    if spec.memory:
        limits["MemoryBytes"] = int(spec.memory)
    if spec.memory_reservation:  # what the workflow or default_memory asked: not max_memory's cap
        reservations["MemoryBytes"] = int(min(spec.memory_reservation, spec.memory or spec.memory_reservation))
    if spec.cpus:
        limits["NanoCPUs"] = reservations["NanoCPUs"] = int(spec.cpus * 1e9)
    half = max(ENGINE_LOG_FACTOR * log_limit // 2, 4096)
    template: dict = {
        "ContainerSpec": cspec,
        "Resources": {"Limits": limits, "Reservations": reservations},
        "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        "LogDriver": {"Name": "json-file", "Options": {"max-size": str(half), "max-file": "2"}},
    }
    if spec.network == "bridge":
        template["Networks"] = [{"Target": "bridge"}]
    # network "none": no Networks, which is the engine's default bridge (see the docstring)
    constraints = placement(spec)
    if constraints:
        template["Placement"] = {"Constraints": constraints}
    return dict(
        task_template=template,
        name=service_name(spec),
        labels=labels,
        mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
    )


def _bind(source: str, target: str, *, read_only: bool) -> dict:
    return {"Type": "bind", "Source": source, "Target": target, "ReadOnly": read_only}


def latest_task(tasks: list[dict]) -> dict | None:
    """The job's task that counts: the newest one (a job with restart ``none``
    has one; after a node's loss Swarm may have made another)."""
    if not tasks:
        return None
    return max(tasks, key=lambda t: (t.get("Version") or {}).get("Index", 0))


NONZERO_EXIT = "task: non-zero exit ("  # swarmkit's Err for a container that exited non-zero


def task_status(task: dict) -> tuple[str, int | None, str, str]:
    """(state, exit code, error, container id) of a Swarm task. The exit code
    is None unless the container really exited: ``complete``, or ``failed``
    with swarmkit's "task: non-zero exit (N)". A task whose container went
    away (its engine restarted: "No such container: ...") is also ``failed``
    with a stale ExitCode of 0, which must not read as a success."""
    status = task.get("Status") or {}
    cstatus = status.get("ContainerStatus") or {}
    code = cstatus.get("ExitCode")
    state, err = str(status.get("State") or ""), str(status.get("Err") or "")
    exited = state == "complete" or (state == "failed" and err.startswith(NONZERO_EXIT))
    return (state, code if exited and isinstance(code, int) else None, err,
            str(cstatus.get("ContainerID") or ""))


def rejection(spec: TaskSpec, err: str, node: str) -> str:
    """The words of a rejected task: it never ran (e.g. the node lacks the image)."""
    err, node = for_log(err[:300]), for_log(node[:64])
    where = f" on node {node}" if node else ""
    if "no such image" in err.lower() or "pull access denied" in err.lower() or "not found" in err.lower():
        return (f"image {spec.image} is not{where or ' on the node Swarm chose'} and could not be pulled "
                f"({err}); load it there (docker save | docker load) or push it to a registry")
    return f"Swarm rejected the task{where}: {err or 'no reason given'} (image {spec.image})"


# -- the node under a running job task ----------------------------------------------------------
#
# What Swarm does (Docker 20.10.24, checked on a two-node swarm on one machine):
#
# - a node drained (``docker node update --availability drain``) keeps
#   running a *job*'s task to its end (60 s watched: task ``running``, desired
#   ``complete``, no new task); only replicated and global services' tasks are
#   moved. So flowd moves it: the service is removed (SIGKILL) and the attempt
#   reported MISSING, which the daemon starts again (a new service that Swarm
#   places on an active node).
# - a node lost (its engine and everything it runs killed): the manager marks
#   it ``down`` ~15 s later; its job task stays ``running`` (desired
#   ``complete``) for as long as watched (100 s; swarmkit marks such tasks
#   ``orphaned`` only after 24 h) and no new task is made. So flowd gives the
#   node ``NODE_LOST_AFTER`` seconds more, then removes the service and
#   reports MISSING.
# - a node's engine that comes back before that (a quick restart) reports its
#   task ``failed`` with exit status 255 (the shim was killed), which reads
#   exactly as a script's ``exit 255`` (desired ``shutdown`` both): that is a
#   failed attempt (retried as the process's ``retries`` allow).

# - a running task can also be ``rejected`` with "assigned node no longer
#   meets constraints" (Swarm's constraint enforcer, after a node update; seen
#   here while another node's labels changed and the task's node was killed):
#   it did not fail, so it is MISSING too.
MOVED_OFF = "no longer meets constraints"

NODE_LOST_AFTER = 15.0  # seconds a node may stay silent (after Swarm calls it down) before its tasks run again


def node_trouble(node: dict | None) -> str:
    """Why a task on ``node`` (``inspect_node``'s answer; None: no such node)
    should not stay there: "gone", "drain", "silent", or "" (it may)."""
    if node is None:
        return "gone"
    if str((node.get("Spec") or {}).get("Availability") or "") == "drain":
        return "drain"
    if str((node.get("Status") or {}).get("State") or "") in NODE_SILENT:
        return "silent"
    return ""


def node_label(node: dict | None, node_id: str) -> str:
    """A node's name for a message: its hostname and id (several nodes may share a hostname)."""
    host = str(((node or {}).get("Description") or {}).get("Hostname") or "")
    short = for_log(node_id[:12])
    return f"{for_log(host[:64])} ({short})" if host else short


def node_verdict(trouble: str, name: str, silent_for: float | None, *, lost_after: float | None = None) -> str:
    """The words of an attempt that runs again because of its node, or "" when
    it stays: ``silent_for`` seconds the node has been silent (None: not);
    ``lost_after`` default NODE_LOST_AFTER."""
    if lost_after is None:
        lost_after = NODE_LOST_AFTER
    if trouble == "drain":
        return f"node {name} was drained: the task runs again on another node"
    if trouble == "gone":
        return f"node {name} left the swarm: the task runs again on another node"
    if trouble == "silent" and silent_for is not None and silent_for >= lost_after:
        return (f"node {name} is down (no word from it for {silent_for:.0f} s after Swarm called it down): "
                "the task runs again on another node")
    return ""
