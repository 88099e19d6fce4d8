"""A warm container's resident agent and its host-side folder (stdlib only).

A warm container runs a small POSIX-sh loop (``agent_command``), under the
engine's init (docker-init reaps orphans), that needs nothing from the image
but ``/bin/sh``. It talks to flowd through its *slot*, a folder of the
spool (``SPOOL/pool/<container>/``) made here:

- ``task/`` is bind-mounted read-write at ``/task``, ``tmp/`` at ``/tmp``:
  flowd empties both in place between tasks and copies the next task's
  inputs into ``task/`` (a bind mount cannot be swapped for another folder).
- ``ctl/`` is bind-mounted read-only at ``/.flowd/ctl``: three FIFOs (``in``
  wakes the agent, ``out`` carries its replies, ``log`` the task's stdout and
  stderr) and two files flowd rewrites before each task: ``task`` (``seq=N``,
  the task's number in this container) and ``env`` (``export NAME='value'``
  lines: the ``FLOWD_*`` variables and the process's ``env``). A script
  cannot change these (read-only mount); a FIFO stays writable there, and
  what a script could do with that is bounded below.

The protocol, one task at a time: flowd writes ``task`` and ``env``, then a
line to ``in``. The agent sources ``task``; a ``seq`` it has already run is
ignored (so a script that writes to ``in`` cannot make it run anything
twice). It runs the wrapper (the same one a fresh container runs) in a
subshell with ``env`` sourced, stdin from /dev/null, stdout and stderr to
``log`` and its own descriptors closed; waits for it; kills every other
process in the container (``kill -9`` of each pid in /proc but init's and
its own, three rounds: a background child, a ``setsid`` daemon, all go); and
answers ``done SEQ STATUS KILLED OOM_BEFORE OOM_AFTER`` on ``out``, the last
two being the cgroup's ``oom_kill`` counter around the task. A script could
write a forged answer to ``out`` while it still runs; flowd does not trust
an answer alone: it then counts the container's processes itself, from the
host's cgroup files (``WarmSlot.procs_path``), and retires a container in
which anything but init and the agent is left.
"""
from __future__ import annotations

import errno
import os
import re
import select
import stat

from ..reaper import remove_tree
from .base import TASK_DIR, TaskSpec
from .container import sh_quote, wrapper

CTL_DIR = "/.flowd/ctl"
MAX_LINE = 256  # an answer line is far shorter; more is a protocol error
_DONE_RE = re.compile(r"^done ([0-9]{1,12}) ([0-9]{1,3}) ([0-9]{1,9}) ([0-9]{1,19}) ([0-9]{1,19})$")
_READY_RE = re.compile(r"^ready [0-9]{1,10}$")

_OOM_COUNT = (
    "oomn() { n=0; for f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do "
    "[ -r $f ] || continue; while read -r ok ov; do [ \"$ok\" = oom_kill ] && n=$ov; done < $f; done; }; "
)


def agent_command(spec: TaskSpec) -> list[str]:
    """The warm container's command: the agent loop around ``spec``'s wrapper."""
    ctl = CTL_DIR
    loop = (
        f"exec 3<{ctl}/in 4>{ctl}/out || exit 126; "
        + _OOM_COUNT
        + "last=; echo \"ready $$\" >&4; "
        "while read -r line <&3; do "
        f"seq=; . {ctl}/task; "
        "[ -n \"$seq\" ] && [ \"$seq\" != \"$last\" ] || continue; last=$seq; "
        "oomn; o1=$n; "
        f"( exec 3<&- 4<&-; . {ctl}/env; {wrapper(spec)} ) </dev/null >{ctl}/log 2>&1 & "
        "wait $!; rc=$?; k=0; "
        "for r in 1 2 3; do for p in /proc/[0-9]*; do p=${p#/proc/}; "
        "[ \"$p\" = 1 ] || [ \"$p\" = $$ ] || { kill -9 \"$p\" 2>/dev/null && k=$((k+1)); }; "
        "done; done; "
        "oomn; echo \"done $seq $rc $k $o1 $n\" >&4; "
        "done"
    )
    return ["/bin/sh", "-c", loop]


def parse_done(line: str, seq: int) -> tuple[int, int, bool] | None:
    """An answer for task ``seq``: (exit status, processes killed, OOM), or None."""
    m = _DONE_RE.match(line)
    if m is None or int(m.group(1)) != seq:
        return None
    return int(m.group(2)), int(m.group(3)), int(m.group(5)) > int(m.group(4))


def is_ready(line: str) -> bool:
    return _READY_RE.match(line) is not None


def env_file(env: dict[str, str]) -> bytes:
    """``export NAME='value'`` lines (names are checked at submission; NUL cannot be in a
    value: ``env`` comes from XML, and value inputs are refused with one by
    flowd.channelvalues). Single quotes: the agent's ``.`` reads every byte of a
    value literally, whatever it holds (``$(...)``, quotes, newlines)."""
    return "".join(f"export {k}={sh_quote(v)}\n" for k, v in env.items()).encode()


class WarmSlot:
    """The host folder of one warm container (see the module docstring)."""

    def __init__(self, root: str, shared: bool):
        """``shared``: the container runs as another uid with flowd's group (config
        container_user image or UID): folders 02770/02750 and FIFOs 0660, else 0700/0600."""
        self.root = root
        self.task = os.path.join(root, "task")
        self.tmp = os.path.join(root, "tmp")
        self.ctl = os.path.join(root, "ctl")
        self.shared = shared
        self.in_w = self.out_r = self.log_r = -1
        self.procs_path: str | None = None  # the container's cgroup.procs on the host, if found

    def create(self) -> None:
        rw, ro, fifo = (0o2770, 0o2750, 0o660) if self.shared else (0o700, 0o700, 0o600)
        os.mkdir(self.root, 0o700)
        for path, mode in ((self.task, rw), (self.tmp, rw), (self.ctl, ro)):
            os.mkdir(path)
            os.chmod(path, mode)  # not through the umask
        for name in ("in", "out", "log"):
            os.mkfifo(os.path.join(self.ctl, name))
            os.chmod(os.path.join(self.ctl, name), fifo)
        self.write_ctl("task", b"seq=\n")
        self.write_ctl("env", b"")
        # flowd's ends: none of these opens blocks (O_RDWR on a FIFO never does;
        # O_RDONLY|O_NONBLOCK neither), and holding "in" open read-write means the
        # agent never sees an end of file on it.
        self.in_w = os.open(os.path.join(self.ctl, "in"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.out_r = os.open(os.path.join(self.ctl, "out"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.log_r = os.open(os.path.join(self.ctl, "log"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def write_ctl(self, name: str, data: bytes) -> None:
        """Replace ctl/NAME (a new file renamed over it: the agent reads whole files)."""
        tmp = os.path.join(self.ctl, "." + name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640 if self.shared else 0o600)
        try:
            view = memoryview(data)
            while view:  # the env file may hold value inputs of 128 KiB each
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.ctl, name))

    def put_inputs(self, spec: TaskSpec) -> None:
        """Copy the task's inputs into task/ (each one flowd's own checked item).

        A copy, not a link: the container's user may be flowd's own, and a
        hard link would let a script write into the channel's item.
        """
        mode = 0o640 if self.shared else 0o600
        for m in spec.inputs:
            name = m.target[len(TASK_DIR) + 1:] if m.target.startswith(TASK_DIR + "/") else None
            if not name or "/" in name:
                raise ValueError(f"input target {m.target!r} is not a file in {TASK_DIR}")
            src = os.open(m.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                dst = os.open(os.path.join(self.task, name),
                              os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                try:
                    _copy(src, dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)

    def take_outputs(self, spec: TaskSpec) -> None:
        """Move all the task left in task/ into its work/ folder, where
        flowd.collect checks and copies the declared outputs exactly as a
        fresh task's (a fresh task's work/ is its /task too).

        Everything, not just the outputs: a hard link to another file the
        task made then still shows two links, and collect refuses it as it
        does for fresh. A rename never follows a link: a symbolic link stays
        one, and collect refuses it. Nothing of the container is still
        running (the agent killed it all and flowd counted), so nothing
        writes behind it.
        """
        for name in os.listdir(self.task):
            try:
                os.rename(os.path.join(self.task, name), os.path.join(spec.workdir, name))
            except FileNotFoundError:
                continue

    def empty(self) -> list[str]:
        """Empty task/ and tmp/ in place; what could not be deleted (then retire)."""
        problems: list[str] = []
        for folder in (self.task, self.tmp):
            try:
                names = os.listdir(folder)
            except OSError as e:
                problems.append(f"{folder}: {e.strerror}")
                continue
            for name in names:
                problems += remove_tree(os.path.join(folder, name))
        return problems

    def read(self, fd: int, limit: int = 65536) -> bytes | None:
        """What a FIFO holds now: bytes, b"" when no writer is left, None when none yet."""
        try:
            return os.read(fd, limit)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return None
            raise

    def reopen_log(self) -> None:
        """A new read end for the log FIFO before each task: poll() then says
        POLLHUP once this task's writers are gone, not an earlier task's.
        (The new end is open before the old one closes, so a writer always
        finds a reader and never blocks.)"""
        fd = os.open(os.path.join(self.ctl, "log"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        old, self.log_r = self.log_r, fd
        if old >= 0:
            os.close(old)

    def usable(self) -> bool:
        """An idle container can take a task: its agent is there (its end of
        ``out`` is open: not after a dockerd restart, an OOM while idle, a
        ``docker kill``) and ``out`` holds nothing nobody asked for."""
        p = select.poll()
        p.register(self.out_r, select.POLLIN)
        return not p.poll(0)  # POLLHUP: the agent is gone; POLLIN: stray words

    def wake(self) -> None:
        os.write(self.in_w, b"go\n")

    def find_cgroup(self, pid: int) -> None:
        """Where the host lists this container's processes (cgroup v1 pids or v2)."""
        self.procs_path = cgroup_procs_path(pid)

    def processes(self) -> int | None:
        """How many processes the container has, from the host's cgroup file (None: unknown)."""
        if self.procs_path is None:
            return None
        try:
            with open(self.procs_path, "rb") as f:
                return sum(1 for line in f.read(1 << 20).split() if line.isdigit())
        except OSError:
            return None

    def close(self) -> None:
        for fd in (self.in_w, self.out_r, self.log_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.in_w = self.out_r = self.log_r = -1


def cgroup_procs_path(pid: int) -> str | None:
    """The host's ``cgroup.procs`` file of the cgroup process ``pid`` is in."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "pids":  # v1: the pids hierarchy lists every process
            candidate = os.path.join("/sys/fs/cgroup/pids", path.lstrip("/"), "cgroup.procs")
        elif controllers == "" and line.startswith("0::"):  # v2
            candidate = os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.procs")
        else:
            continue
        if os.path.exists(candidate):
            return candidate
    return None


def _copy(src: int, dst: int) -> None:
    st = os.fstat(src)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("an input is not a regular file")
    left = st.st_size
    while left > 0:
        try:
            n = os.copy_file_range(src, dst, min(left, 1 << 30))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _plain_copy(src, dst, left)
        if n == 0:
            break
        left -= n


def _plain_copy(src: int, dst: int, left: int) -> int:
    done = 0
    while done < left:
        chunk = os.read(src, min(left - done, 1 << 20))
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        done += len(chunk)
    return done
