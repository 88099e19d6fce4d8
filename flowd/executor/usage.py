"""What one task attempt used, for its trace record (``flowctl trace``): peak
memory and cpu seconds from the container's cgroup on this host, bytes into
and out of ``/task``, and the node (stdlib only).

A container's cgroup goes when the container stops, before anyone can read
it, so ``Sampler`` reads the cgroup files of the containers that run now from
the host every ``Sampler.interval`` seconds (plain file reads: no engine call)
and keeps the last figures it read:

- peak memory: the cgroup's high-water mark (v1 ``memory.max_usage_in_bytes``,
  v2 ``memory.peak``, or the highest ``memory.current`` sampled), page cache
  included, as the kernel counts it against the limit;
- cpu seconds: the cgroup's cpu time (v1 ``cpuacct.usage``, v2 ``cpu.stat``
  ``usage_usec``), user and system.

A fresh container's figures are those of its last sample: what the task did
in its last ``interval`` seconds is missed, and a task that ends before its
first sample has none (empty in the trace). A warm container outlives its task,
so it is read once more at the task's end: its cpu seconds are the cgroup's
count at the end less its count at the start (exact), and its peak memory is
the container's high-water mark so far (a flowd daemon that is not root cannot
reset it), which may be an earlier task's in the same container.

Nothing is read when the engine's cgroups are not visible here (a remote
engine, another cgroup layout): the figures are then empty.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from .base import EXITED, TaskSpec

CGROUP = "/sys/fs/cgroup"
# (memory folder, cpu folder) of a container, {id} its full id: cgroupfs and systemd drivers, v1 and v2
_V1 = [("memory/docker/{id}", "cpuacct/docker/{id}"),
       ("memory/system.slice/docker-{id}.scope", "cpuacct/system.slice/docker-{id}.scope"),
       ("memory/docker/{id}", "cpu,cpuacct/docker/{id}")]
_V2 = ["docker/{id}", "system.slice/docker-{id}.scope"]
MAX_BYTES_WALK = 10000  # files of an output folder counted at most


@dataclass
class Usage:
    peak_memory: int | None = None  # bytes
    cpu_ns: int | None = None  # nanoseconds of cpu since the watch began (or the container's)
    cpu_base: int = 0


def cgroup_files(cid: str, root: str = CGROUP) -> tuple[str, str, str] | None:
    """(version, memory file, cpu file) of container ``cid`` on this host, or None."""
    if not cid or not cid.isalnum():
        return None
    for mem, cpu in _V1:
        m = os.path.join(root, mem.format(id=cid), "memory.max_usage_in_bytes")
        c = os.path.join(root, cpu.format(id=cid), "cpuacct.usage")
        if os.path.exists(m) and os.path.exists(c):
            return ("v1", m, c)
    for folder in _V2:
        d = os.path.join(root, folder.format(id=cid))
        if os.path.exists(os.path.join(d, "cpu.stat")):
            peak = os.path.join(d, "memory.peak")
            return ("v2", peak if os.path.exists(peak) else os.path.join(d, "memory.current"),
                    os.path.join(d, "cpu.stat"))
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    try:
        return int(data.split()[0]) if data.split() else None
    except ValueError:
        return None


def _read_cpu(version: str, path: str) -> int | None:
    if version == "v1":
        return _read_int(path)
    try:
        with open(path, "rb") as f:
            for line in f.read(4096).splitlines():
                k, _, v = line.partition(b" ")
                if k == b"usage_usec" and v.strip().isdigit():
                    return int(v) * 1000
    except OSError:
        return None
    return None


class Watch:
    def __init__(self, cid: str, delta: bool):
        self.cid = cid
        self.files = cgroup_files(cid)
        self.usage = Usage()
        self.lock = threading.Lock()
        self.sample()
        if delta and self.usage.cpu_ns is not None:
            self.usage.cpu_base = self.usage.cpu_ns

    def sample(self) -> bool:
        """Read the cgroup once; False when it is gone (or was never found)."""
        if self.files is None:
            self.files = cgroup_files(self.cid)  # a container just started may not have it yet
            if self.files is None:
                return False
        version, mem_path, cpu_path = self.files
        mem = _read_int(mem_path)
        cpu = _read_cpu(version, cpu_path)
        if mem is None and cpu is None:
            return False
        with self.lock:
            u = self.usage
            if mem is not None:
                u.peak_memory = mem if u.peak_memory is None else max(u.peak_memory, mem)
            if cpu is not None:
                u.cpu_ns = cpu
        return True

    def fields(self) -> dict:
        with self.lock:
            u = self.usage
            cpu = None if u.cpu_ns is None else round(max(u.cpu_ns - u.cpu_base, 0) / 1e9, 6)
            return {"peak_memory": u.peak_memory, "cpu_seconds": cpu}


class Sampler:
    """Samples the cgroups of the containers it watches, on one thread of its own
    that runs while there is something to watch."""

    interval = 0.2  # seconds

    def __init__(self):
        self._lock = threading.Lock()
        self._watches: dict[int, Watch] = {}  # id(record) -> its watch
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def watch(self, record, cid: str | None, *, delta: bool = False) -> None:
        """Start sampling ``cid`` for ``record`` (a container.Task); ``delta``:
        count the cpu from now (a warm container that ran other tasks)."""
        if not cid:
            return
        w = Watch(cid, delta)
        with self._lock:
            self._watches[id(record)] = w
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="flowd-usage", daemon=True)
                self._thread.start()

    def done(self, record) -> dict:
        """Stop sampling for ``record``; its figures (one last read first: a
        container that still runs gives its exact count)."""
        with self._lock:
            w = self._watches.pop(id(record), None)
        if w is None:
            return {}
        w.sample()
        return w.fields()

    def _loop(self) -> None:
        while True:
            with self._lock:
                watches = list(self._watches.values())
                if not watches:
                    self._thread = None
                    return
            for w in watches:
                w.sample()
            self._wake.wait(self.interval)


def _size(path: str) -> int:
    """Bytes of the file at ``path`` (a folder: its files, up to MAX_BYTES_WALK; links not followed)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    total = n = 0
    for folder, _, names in os.walk(path):
        for name in names:
            n += 1
            if n > MAX_BYTES_WALK:
                return total
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def task_bytes(spec: TaskSpec, status: str, exit_code: int | None) -> dict:
    """Bytes put into /task (the inputs) and, after a success, taken out of it
    (the declared outputs in the task's work folder)."""
    out: dict = {"bytes_in": sum(_size(m.source) for m in spec.inputs)}
    if status == EXITED and exit_code == 0 and spec.workdir:
        out["bytes_out"] = sum(_size(os.path.join(spec.workdir, name)) for name in spec.outputs)
    return out


_HOST = ""


def host_name() -> str:
    """This machine's hostname (where a local engine runs its containers)."""
    global _HOST
    if not _HOST:
        _HOST = socket.gethostname()
    return _HOST


def attempt_fields(sampler: Sampler, record, status: str, exit_code: int | None, node: str) -> dict:
    """The usage fields of a ``TaskResult`` for ``record`` (a container.Task or
    swarm.Job): its figures (``finish`` read them, or the sampler's last), bytes, node."""
    try:
        out = getattr(record, "usage_fields", None)
        if out is None:
            out = sampler.done(record)
        out = dict(out)
        out.update(task_bytes(record.spec, status, exit_code))
        out["node"] = node
        return out
    except Exception:  # noqa: BLE001 - statistics: never in the way of a result
        return {}


def finish(sampler: Sampler, record) -> None:
    """Read ``record``'s figures now (its container still runs: a warm one)."""
    record.usage_fields = sampler.done(record)
