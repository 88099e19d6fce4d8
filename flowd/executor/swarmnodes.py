"""The cluster's nodes (``executor = "swarm"``): who they are, and whether
each one sees the spool.

A thread polls the manager's node list every ``POLL`` seconds (off the
daemon's loop: ``status`` reads a snapshot). A node that is ready and active
is probed when it is first seen and again whenever it comes back (ready after
down, active after a drain or a pause): a tiny one-shot job pinned to it
(``node.id==ID``) runs as flowd's own uid:gid with a folder just made under
``SPOOL/probe/`` bind-mounted at ``/probe``, and creates a file there. The
node sees the spool when flowd then sees that file:

- the folder is missing on the node: Swarm rejects the task ("bind source
  path does not exist"): the node does not see SPOOL at all;
- the job completes but flowd sees no file: the node's SPOOL is another file
  system (a local folder, not the shared one);
- the job fails (``touch: Permission denied``): flowd's uid cannot write
  there from that node (NFS ``root_squash``, other uids on the node);
- the probe image is not on the node, or the job does not end within
  ``PROBE_TIMEOUT``: unknown; logged, and the node is not kept off (a task
  placed there fails with a message naming the node and the image).

A node whose check failed is kept off: ``avoid()`` gives ``node.id!=ID``
constraints the executor adds to every task. Its reason is in ``flowctl
status`` and in the log. A node's name (its hostname) is chosen by whoever
runs it: bounded and escaped before it is logged or shown.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass

from ..errors import EngineUnavailable, FlowError
from ..textsafe import for_log
from .container import LABEL_SPOOL
from .swarmspec import ENDED, LABEL_KIND, latest_task, task_status

log = logging.getLogger("flowd.executor.swarm")

POLL = 15.0  # seconds between two looks at the node list
PROBE_TIMEOUT = 60.0  # seconds a probe job may take (an image pull included)
PROBE_POLL = 0.25
NAME_MAX = 64
MiB = 1024 * 1024

OK, NO, UNKNOWN, CHECKING = "ok", "no", "unknown", "checking"


@dataclass
class Node:
    id: str
    name: str = ""
    role: str = ""
    state: str = ""  # Status.State: ready, down, unknown, disconnected
    availability: str = ""  # Spec.Availability: active, pause, drain
    addr: str = ""
    spool: str = CHECKING  # OK, NO, UNKNOWN, CHECKING
    why: str = ""
    probed_at: float | None = None

    @property
    def usable(self) -> bool:
        return self.state == "ready" and self.availability == "active"

    def view(self, tasks: int) -> dict:
        return {"id": self.id[:12], "name": self.name, "role": self.role, "state": self.state,
                "availability": self.availability, "addr": self.addr, "spool": self.spool,
                "why": self.why, "tasks": tasks}


class SwarmNodes:
    """The node list and the spool probes of one Swarm executor (``link``
    is its EngineLink; ``spool`` the folder every node must see)."""

    def __init__(self, link, spool: str, probe_image: str, *, poll: float = POLL,
                 probe_timeout: float = PROBE_TIMEOUT):
        self.link = link
        self.spool = spool
        self.probe_image = probe_image
        self.poll = poll
        self.probe_timeout = probe_timeout
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self._message = ""  # why the node list cannot be read now ("" when it can)
        self._thread: threading.Thread | None = None

    # -- what the executor and status read (any thread) ----------------------------
    def start(self) -> None:
        if self._thread is None and self.spool:
            self._thread = threading.Thread(target=self._loop, name="flowd-swarm-nodes", daemon=True)
            self._thread.start()

    def avoid(self) -> list[str]:
        """Constraints that keep tasks off the nodes that cannot see the spool."""
        with self._lock:
            return [f"node.id!={n.id}" for n in self._nodes.values() if n.spool == NO]

    def name(self, node_id: str) -> str:
        """A node's name for status and messages: its hostname (with its id
        when another node has the same hostname), or its id."""
        with self._lock:
            n = self._nodes.get(node_id)
            if n is None or not n.name:
                return node_id[:12]
            shared = sum(1 for m in self._nodes.values() if m.name == n.name) > 1
        return f"{n.name} ({node_id[:12]})" if shared else n.name

    def snapshot(self, tasks_on: dict[str, int]) -> dict:
        """``{"nodes": [...], "message": str}`` for ``flowctl status``;
        ``tasks_on`` maps node ids to the tasks running there."""
        with self._lock:
            nodes = sorted(self._nodes.values(), key=lambda n: (n.role != "manager", n.name, n.id))
            return {"nodes": [n.view(tasks_on.get(n.id, 0)) for n in nodes], "message": self._message}

    # -- the thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        self._clean_probes()
        while not self.link.closed:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise
                log.exception("swarm node check failed")
            self.link.stop.wait(self.poll)

    def refresh(self) -> None:
        """Read the node list once; probe the nodes that are new or came back."""
        try:
            listed = self.link.call(self.link.api.nodes)
        except EngineUnavailable as e:
            self._set_message(f"the Swarm manager cannot be reached: {e}")
            return
        except FlowError as e:
            self._set_message(f"the Swarm manager cannot list its nodes: {str(e)[:300]}")
            return
        self._set_message("")
        due = []
        with self._lock:
            seen = set()
            for raw in listed:
                n = _node_of(raw)
                if not n.id:
                    continue
                seen.add(n.id)
                old = self._nodes.get(n.id)
                if old is not None:
                    n.spool, n.why, n.probed_at = old.spool, old.why, old.probed_at
                came_back = old is None or (n.usable and not old.usable)
                if n.usable and (came_back or n.spool == CHECKING):
                    n.spool, n.why = CHECKING, ""
                    due.append(n.id)
                self._nodes[n.id] = n
            for gone in set(self._nodes) - seen:
                del self._nodes[gone]
        for node_id in due:
            if self.link.closed:
                return
            spool, why = self.probe(node_id)
            with self._lock:
                n = self._nodes.get(node_id)
                if n is None:
                    continue
                n.spool, n.why, n.probed_at = spool, why, time.time()
                name = for_log(n.name)
            if spool == OK:
                log.info("swarm node %s (%s) sees the spool %s", name, node_id[:12], self.spool)
            elif spool == NO:
                log.warning("swarm node %s (%s) cannot be used: %s; its tasks go to other nodes",
                            name, node_id[:12], for_log(why))
            else:
                log.warning("swarm node %s (%s): the spool check did not finish: %s",
                            name, node_id[:12], for_log(why))

    def _set_message(self, text: str) -> None:
        with self._lock:
            if text and text != self._message:
                log.warning("%s", for_log(text))
            self._message = text

    # -- the probe ---------------------------------------------------------------------
    def probe(self, node_id: str) -> tuple[str, str]:
        """(OK|NO|UNKNOWN, why) for one node."""
        token = secrets.token_hex(8)
        folder = os.path.join(self.spool, "probe", token)
        try:
            os.makedirs(folder, mode=0o700)
        except OSError as e:
            return UNKNOWN, f"cannot make {folder}: {e.strerror}"
        sid = None
        try:
            sid = self._create(node_id, token, folder)
            state, code, err = self._wait(sid)
            seen = os.path.exists(os.path.join(folder, "seen"))
        except EngineUnavailable as e:
            return UNKNOWN, f"the engine went away during the check: {e}"
        except FlowError as e:
            return UNKNOWN, f"the probe job could not be made: {str(e)[:300]}"
        finally:
            if sid is not None:
                self._remove(sid)
            shutil.rmtree(folder, ignore_errors=True)
        return verdict(state, code, err, seen, spool=self.spool, image=self.probe_image,
                       timeout=self.probe_timeout)

    def _create(self, node_id: str, token: str, folder: str) -> str:
        labels = {LABEL_SPOOL: self.spool, LABEL_KIND: "probe"}
        template = {
            "ContainerSpec": {
                "Image": self.probe_image,
                "Command": ["touch", "/probe/seen"],
                "User": f"{os.getuid()}:{os.getgid()}",
                "Labels": dict(labels),
                "Mounts": [{"Type": "bind", "Source": folder, "Target": "/probe", "ReadOnly": False}],
                "CapabilityDrop": ["ALL"],
                "StopSignal": "SIGKILL",
            },
            "Resources": {"Limits": {"MemoryBytes": 32 * MiB, "Pids": 16}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={node_id}"]},
        }
        made = self.link.call(self.link.api.create_service, task_template=template,
                              name=f"flowd-probe-{node_id[:12]}-{token[:8]}", labels=labels,
                              mode={"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}})
        return made["ID"]

    def _wait(self, sid: str) -> tuple[str, int | None, str]:
        deadline = time.monotonic() + self.probe_timeout
        while time.monotonic() < deadline and not self.link.closed:
            task = latest_task(self.link.call(self.link.api.tasks, filters={"service": sid}))
            if task is not None:
                state, code, err, _ = task_status(task)
                if state in ENDED:
                    return state, code, err
            self.link.stop.wait(PROBE_POLL)
        return "timeout", None, ""

    def _remove(self, sid: str) -> None:
        try:
            self.link.call(self.link.api.remove_service, sid)
        except FlowError:
            pass  # swept with the spool's services (label io.flowd.kind=probe)

    def _clean_probes(self) -> None:
        """Probe folders a killed flowd left behind."""
        shutil.rmtree(os.path.join(self.spool, "probe"), ignore_errors=True)


def verdict(state: str, code: int | None, err: str, seen: bool, *, spool: str, image: str,
            timeout: float) -> tuple[str, str]:
    """What a probe job's end says about its node (see the module's docstring)."""
    err = for_log(err[:300])
    if state == "complete" and seen:
        return OK, ""
    if state == "complete":
        return NO, (f"its {spool} is not the shared one: a file the probe wrote there did not appear "
                    "here (mount the shared spool at the same path on every node)")
    low = err.lower()
    if "bind source path does not exist" in low or "no such file or directory" in low and "mount" in low:
        return NO, f"it does not see the spool {spool} ({err}); mount it there at the same path"
    if "no such image" in low or "pull access denied" in low or "not found" in low:
        return UNKNOWN, (f"the probe image {image} is not on the node ({err}); load it there or set "
                         "swarm_probe_image to an image every node has")
    if state == "failed" and code is not None:
        return NO, (f"flowd's uid {os.getuid()} cannot write into {spool} from it (the probe exited "
                    f"{code}); give that uid write access there (NFS: no root_squash problem, same uids)")
    if state == "timeout":
        return UNKNOWN, f"the probe job did not end within {timeout:g} s"
    return UNKNOWN, f"the probe job ended {state or 'unknown'}: {err or 'no reason given'}"


def _node_of(raw: dict) -> Node:
    desc, spec, status = raw.get("Description") or {}, raw.get("Spec") or {}, raw.get("Status") or {}
    return Node(id=str(raw.get("ID") or ""), name=str(desc.get("Hostname") or "")[:NAME_MAX],
                role=str(spec.get("Role") or "")[:16], state=str(status.get("State") or "")[:16],
                availability=str(spec.get("Availability") or "")[:16],
                addr=str(status.get("Addr") or "")[:64])
