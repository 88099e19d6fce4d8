"""A second Docker engine on this machine, joined to the main engine's swarm
as a worker: a two-node swarm on one machine (../shared DESIGN.md, "Docker
Swarm (checked on these machines)").

``SecondEngine`` brings it up and puts everything back, even when a step
fails half-way:

- its own bridge ``docker1`` (made first, with an address from another /16:
  with ``--bridge none`` a second engine deletes the first one's docker0);
- ``dockerd --data-root ROOT/data --exec-root /run/docker2 --pidfile
  /run/docker2.pid -H unix:///run/docker2.sock --bridge docker1
  --iptables=false --ip-masq=false``, its containers under the cgroup parent
  ``docker2-flowdtest`` (it starts its own containerd under the exec root);
- its own ``docker_gwbridge`` network made before it joins, on a bridge named
  ``docker_gwbr2`` (a worker that joins makes ``docker_gwbridge``; left to
  itself it would take the main engine's bridge of that name and delete it
  when it leaves);
- the test images loaded into it (``docker save | docker -H ... load``);
- ``swarm join`` as a worker on 127.0.0.2 (``--advertise-addr``,
  ``--listen-addr``, ``--data-path-addr``) to the manager at 127.0.0.1:2377
  with the manager's worker token, and a node label.

``close`` (also after a failed start): the worker leaves, its node is removed
on the manager (``docker node rm --force``), the engine (its containerd, the
shims and the containers) is stopped, mounts under its folders are undone,
the bridges are deleted and its folders removed. ``kill_machine`` is kill -9 of
the engine and everything it runs (a machine lost); ``restart`` brings the
engine back on the same data (it rejoins the swarm by itself).

Both nodes have this machine's hostname: tell them apart by node id.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid

from daemon_fixtures import wait_until

SOCK = "/run/docker2.sock"
HOST = "unix://" + SOCK
EXEC_ROOT = "/run/docker2"
PIDFILE = "/run/docker2.pid"
BRIDGE = "docker1"
BRIDGE_ADDR = "10.199.0.1/16"  # another /16 than docker0 (172.17) and docker_gwbridge (172.18)
GW_BRIDGE = "docker_gwbr2"  # at most 15 characters (IFNAMSIZ)
GW_SUBNET = "10.198.0.0/16"
CGROUP_PARENT = "docker2-flowdtest"
ADDR = "127.0.0.2"
MANAGER = "127.0.0.1:2377"
UP_WAIT = 120  # seconds for the engine to answer, or the node to be ready

# dockerd runs under this small reaper (a child subreaper): processes it leaves
# behind when it is killed (its containerd, the shims) are reaped here, not
# left as zombies under a pid 1 that does not reap (this machine's), where
# the next dockerd would take the dead containerd's pid for a live one and
# wait for it in vain (checked). SIGTERM goes on to dockerd. It exits when
# dockerd and everything left behind are gone.
REAPER = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
sys.exit(1 if code else 0)
"""


def run(*cmd: str, check: bool = True, input: bytes | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, input=input, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                           f"{res.stderr.decode(errors='replace').strip()[-800:]}")
    return res


def docker1(*args: str, check: bool = True) -> str:
    """``docker ARGS`` on the main engine (the manager); its stdout."""
    return run("docker", *args, check=check).stdout.decode().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SecondEngine:
    def __init__(self, root: str, images: list[str], label: str, value: str = "two"):
        """``root``: a folder for its data and log (removed by ``close``);
        ``images`` to load; node label ``label=value``."""
        self.root = root
        self.data_root = os.path.join(root, "data")
        self.log_path = os.path.join(root, "dockerd.log")
        self.images = images
        self.label, self.value = label, value
        self.node_id = ""
        self.proc: subprocess.Popen | None = None
        self._made_bridge = False
        self._joined = False

    # -- up ------------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True) -> str:
        """``docker -H unix:///run/docker2.sock ARGS``; its stdout."""
        return run("docker", "-H", HOST, *args, check=check).stdout.decode().strip()

    def start(self) -> "SecondEngine":
        """Everything up, or (after putting back what was done) an exception saying what failed."""
        try:
            self._check_free()
            os.makedirs(self.data_root, exist_ok=True)
            run("ip", "link", "add", BRIDGE, "type", "bridge")
            self._made_bridge = True
            run("ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE)
            run("ip", "link", "set", BRIDGE, "up")
            self._start_dockerd()
            self.docker("network", "create", "--driver", "bridge", "--subnet", GW_SUBNET,
                        "--opt", f"com.docker.network.bridge.name={GW_BRIDGE}",
                        "--opt", "com.docker.network.bridge.enable_icc=false",
                        "--opt", "com.docker.network.bridge.enable_ip_masquerade=false",
                        "docker_gwbridge")
            for image in self.images:
                saved = run("docker", "save", image).stdout
                run("docker", "-H", HOST, "load", input=saved)
            token = docker1("swarm", "join-token", "-q", "worker")
            self._joined = True  # from here on, close() leaves and removes the node
            self.docker("swarm", "join", "--token", token, "--advertise-addr", ADDR,
                        "--listen-addr", f"{ADDR}:2377", "--data-path-addr", ADDR, MANAGER)
            self.node_id = self.docker("info", "--format", "{{.Swarm.NodeID}}")
            self.wait_ready()
            docker1("node", "update", "--label-add", f"{self.label}={self.value}", self.node_id)
        except BaseException:
            self.close()
            raise
        return self

    def _check_free(self) -> None:
        if os.path.exists(PIDFILE):
            try:
                pid = int(open(PIDFILE).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise RuntimeError(f"a second dockerd (pid {pid}, {PIDFILE}) is running already; "
                                   "another test session uses it, or an earlier one left it: stop it "
                                   f"(kill {pid}) and remove the {BRIDGE} bridge")
        if os.path.exists(f"/sys/class/net/{BRIDGE}"):
            raise RuntimeError(f"the bridge {BRIDGE} exists already (another session's second engine, "
                               f"or one left behind): `ip link del {BRIDGE}` when no dockerd uses it")

    def _start_dockerd(self) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REAPER, "dockerd", "--data-root", self.data_root, "--exec-root", EXEC_ROOT,
                 "--pidfile", PIDFILE, "-H", HOST, "--bridge", BRIDGE, "--iptables=false",
                 "--ip-masq=false", "--cgroup-parent", CGROUP_PARENT],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or
                   run("docker", "-H", HOST, "version", check=False, timeout=30).returncode == 0,
                   UP_WAIT, "the second dockerd to answer")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the second dockerd exited ({self.proc.returncode}): {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def node(self) -> dict:
        import json
        return json.loads(docker1("node", "inspect", self.node_id))[0]

    def node_state(self) -> tuple[str, str]:
        """(Status.State, Spec.Availability) of the node, as the manager sees it."""
        n = self.node()
        return n["Status"]["State"], n["Spec"]["Availability"]

    def wait_ready(self) -> None:
        wait_until(lambda: self.node_state()[0] == "ready", UP_WAIT, "the second node to be ready")

    def set_availability(self, what: str) -> None:
        docker1("node", "update", "--availability", what, self.node_id)

    # -- a machine lost, and back ---------------------------------------------------------
    def _pids(self) -> set[int]:
        """The engine, its containerd, the shims and everything under them."""
        procs: dict[int, tuple[int, str]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            procs[int(name)] = (ppid, cmd)
        reaper = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
        roots = {pid for pid, (ppid, cmd) in procs.items()
                 if pid != reaper and (ppid == reaper or EXEC_ROOT + "/" in cmd or HOST in cmd)}
        found, grew = set(roots), True
        while grew:
            grew = False
            for pid, (ppid, _) in procs.items():
                if ppid in found and pid not in found:
                    found.add(pid)
                    grew = True
        return found

    def kill_machine(self) -> None:
        """kill -9 of the engine and all it runs, as if the machine were gone (all
        are stopped first, so none can notice the others go)."""
        pids = self._pids()
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc is not None:  # the reaper: gone once it has reaped them all
            self.proc.wait(timeout=60)
        wait_until(lambda: not any(_alive(p) for p in pids), 60, "the killed engine's processes to go")

    def restart(self) -> None:
        """The engine again on the same data: it rejoins the swarm as the same node."""
        self._start_dockerd()
        self.wait_ready()

    # -- down ------------------------------------------------------------------------
    def close(self) -> None:
        """Put everything back; each step runs whatever the others did."""
        errors: list[str] = []

        def step(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - go on putting back, report at the end
                errors.append(f"{what}: {e}")

        engine_up = self.proc is not None and self.proc.poll() is None
        if self._joined and engine_up:
            step("swarm leave", self.docker, "swarm", "leave", "--force")
        if self._joined:
            if not self.node_id:  # join failed half-way: find our node by its address
                step("find the node", self._find_node)
            if self.node_id:
                step("node rm", self._remove_node)
        if engine_up:
            step("stop dockerd", self._stop_dockerd)
        step("kill what is left", self.kill_machine)
        step("unmount", self._unmount)
        for link in (GW_BRIDGE, BRIDGE if self._made_bridge else None):
            if link and os.path.exists(f"/sys/class/net/{link}"):
                step(f"ip link del {link}", run, "ip", "link", "del", link)
        for path in (PIDFILE, SOCK):
            step(f"rm {path}", lambda p: os.path.exists(p) and os.unlink(p), path)
        step("rm exec root", shutil.rmtree, EXEC_ROOT, True)
        step("rm data", shutil.rmtree, self.root, True)
        self._joined = self._made_bridge = False
        if errors:
            raise RuntimeError("the second engine was not put back completely: " + "; ".join(errors))

    def _find_node(self) -> None:
        import json
        for nid in docker1("node", "ls", "-q").split():
            n = json.loads(docker1("node", "inspect", nid))[0]
            if (n.get("Status") or {}).get("Addr") == ADDR:
                self.node_id = nid

    def _remove_node(self) -> None:
        ids = docker1("node", "ls", "-q").split()
        if self.node_id in ids:
            docker1("node", "rm", "--force", self.node_id)

    def _stop_dockerd(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # the reaper sends it on to dockerd
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass  # kill_machine follows

    def _unmount(self) -> None:
        tops = (os.path.realpath(self.root) + "/", EXEC_ROOT + "/")
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].replace("\\040", " ") for line in f]
        for p in sorted((p for p in points if p.startswith(tops)), key=len, reverse=True):
            run("umount", "-l", p, check=False)


def new_label() -> str:
    """A node label key of its own for one test session."""
    return "flowdtest" + uuid.uuid4().hex[:8]
