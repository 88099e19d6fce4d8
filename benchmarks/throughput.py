#!/usr/bin/env python3
"""Throughput: N items through a one-line script: plain docker SDK loops, flowd fresh, warm, swarm.

Everything runs in one process and one run of this script, on the same
machine, so the ratios mean something even on a noisy, shared machine (the
absolute rates do not). Each task copies a small input file to an output
file (``cat in > out``) in flowd/busybox. What is measured:

``baseline``  the best plain way to run the same containers: C threads
              (C = flowd's ``max_containers``), each its own loop of
              create, start, wait, logs, remove through the low-level
              ``APIClient`` (as flowd's executor), with exactly flowd's
              container: the arguments come from flowd's own
              ``dockerspec.create_args`` (task folder, input and script
              bind-mounted, read-only where flowd makes them so, every
              capability dropped, no-new-privileges, pids and memory
              limits, labels, network none, json-file log limits, the
              daemon's uid:gid, the wrapper command). No sleeps, no polling.
``bare``      the same loop with no settings at all (root in the container,
              the two bind mounts it needs, the engine's defaults): what the
              hardening costs. The defaults include a bridged network (a
              veth pair per container), which costs more than flowd's
              ``network none``: bare is usually the slower of the two.
``fresh``     flowd, ``container="fresh"``: the run's own clock, from its
              first claim to its last commit.
``warm``      flowd, ``container="warm"``: the same. It counts as warm only
              if the engine created far fewer containers than tasks (engine
              events); otherwise, or if the run does not finish, it prints
              ``warm: not available (...)`` and goes on.
``latency``   a ``mode="service"`` run of the same process with
              ``container="warm"``: items pushed one at a time (flowctl's
              client library, as ``flowctl push``, in this process), each
              timed from the push's answer (the item is durable) to its
              output item appearing in the result channel's folder (seen
              with inotify). flowd moves an output into its channel only
              after the task's COMMIT is written and fsynced, so that is the
              commit, seen without asking the daemon (a poll over the socket
              would add its own turns of flowd's loop). p50 and p99 after
              one warm-up push. ``fresh`` is measured too (fewer pushes),
              for comparison.

``swarm``     (``--executor swarm``) flowd with ``executor = "swarm"``: the
              same workflow, each task a one-shot Swarm job (a service), on
              the Swarm this engine manages; measured as ``fresh``, in the
              same rounds (the order alternates), and printed against
              ``fresh`` (local fresh containers) and ``baseline``. A run
              that made fewer services than items (the manager's service
              events) stops the script; one that made more (Swarm's
              constraint enforcer took a task off an over-committed node and
              flowd ran it again) names them and goes on. ``--placement``
              gives the process Swarm constraints (e.g. ``node.role==manager``
              keeps the tasks off other nodes; the local engine ignores it).
              ``latency`` then times
              pushes to a service run on Swarm and, for comparison, on
              local fresh containers (``--fresh-pushes`` each).

              The engine must be a Swarm manager. If it is in no swarm, the
              script makes a one-node swarm (``docker swarm init
              --advertise-addr 127.0.0.1``) and leaves it again at the end,
              also on failure, Ctrl-C or SIGTERM (and removes the
              docker_gwbridge network init made); a Swarm worker is refused.
              Swarm reserves each task's memory limit, and flowd's limit for
              a process that sets none is max_memory (8 GiB): a node would
              place only RAM / 8 GiB tasks at once. So with ``--executor
              swarm`` every flowd run, and the baseline's containers, get
              ``default_memory = 256m``.

flowd runs as the tests run it (tests/daemon_fixtures.py): as the non-root
system user ``flowd-test`` in the docker group, umask 0027, made on first
use; its containers run as that uid:gid. The baseline's containers run as
the same uid:gid. ``--daemon-user ""`` runs flowd as the caller instead (as
root, permission bits are not checked: not what a real flowd meets).

    sudo .venv/bin/python benchmarks/throughput.py [--items 200] [--concurrency N]
        [--rounds 2] [--modes baseline,bare,fresh,warm,latency] [--pushes 200]
        [--executor docker|swarm] [--fresh-pushes 20] [--placement CONSTRAINTS]

With ``--executor swarm`` the default modes are baseline,fresh,swarm,latency.

Rates are items/s, the best of ``--rounds`` rounds (the spread is printed
too); the rounds alternate the order of the modes. Env: FLOWD_BENCH_DIR (a
folder the engine sees as this host does; default REPO/.bench-tmp),
FLOWD_BENCH_DAEMON (a script run instead of ``-m flowd``, with the same
arguments: a profiling wrapper).
"""
from __future__ import annotations

import argparse
import ctypes
import grp
import io
import itertools
import os
import pwd
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from xml.sax.saxutils import quoteattr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import docker  # noqa: E402

from flowctl.client import Client  # noqa: E402
from flowd.config import load as load_config  # noqa: E402
from flowd.executor.base import Mount, TaskSpec  # noqa: E402
from flowd.executor.dockerspec import create_args  # noqa: E402

IMAGE = "flowd/busybox:latest"
SCRIPT = "cat in > out"
MODES = ("baseline", "bare", "fresh", "warm", "swarm", "latency")
BATCH = ("baseline", "bare", "fresh", "warm", "swarm")
SWARM_MEMORY = "256m"  # default_memory with --executor swarm (see the docstring)
LOG_LIMIT = 10 * 1024 * 1024  # DockerExecutor's default log_limit
DAEMON_UMASK = 0o027  # systemd/flowd.service
PREFIX = f"flowd-bench-{os.getpid()}"


class NotAvailable(Exception):
    """A warm run that did not finish, or did not run warm."""


# -- the plain loops -----------------------------------------------------------------
class Identity:
    """Who flowd (and so its containers) runs as: uid, gid, supplementary groups."""

    def __init__(self, name: str):
        self.name = name
        if name:
            pw = pwd.getpwnam(name)
            self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
            self.groups = os.getgrouplist(name, pw.pw_gid)
        else:
            self.uid, self.gid, self.home = os.geteuid(), os.getegid(), os.environ.get("HOME", "/")
            self.groups = os.getgroups()


def _prepare(root: str, i: int, who: Identity) -> dict:
    """A task's files as flowd lays them out: work/ (0700, the daemon's), the input
    item and the script (read-only mounts)."""
    task = os.path.join(root, f"t{i}")
    work = os.path.join(task, "work")
    os.makedirs(work, mode=0o700)
    inp = os.path.join(task, "in")
    with open(inp, "w") as f:
        f.write(f"item {i}\n")
    os.chmod(inp, 0o440)
    for p in (task, work, inp):
        os.chown(p, who.uid, who.gid)
    return {"task": task, "work": work, "in": inp, "log": os.path.join(task, "log")}


def _spec(root: str, i: int, paths: dict, script: str, who: Identity, cfg) -> TaskSpec:
    """The TaskSpec flowd's Run._spec makes for this task (same fields, same defaults)."""
    run_id = f"bench{os.getpid()}"
    return TaskSpec(
        run_id=run_id, process="copy", task_id=str(i), attempt=1, image=IMAGE, lang="sh",
        script_path=script, workdir=paths["work"],
        inputs=[Mount(paths["in"], "/task/in", True)], outputs=["out"],
        env={"HOME": "/tmp", "FLOWD_RUN": run_id, "FLOWD_PROCESS": "copy",
             "FLOWD_TASK": str(i), "FLOWD_ATTEMPT": "1"},
        log_path=paths["log"], timeout=cfg.max_timeout, memory=cfg.memory_for_unset,
        cpus=None, pids_limit=cfg.pids_limit, network="none", spool=root,
        user=f"{who.uid}:{who.gid}", group_add=[])


def flowd_config(concurrency: int, executor: str) -> str:
    """The flowd.toml of every flowd run (and the baseline's limits) of this benchmark."""
    text = f'max_containers = {concurrency}\nmin_free_space = "0"\n'
    if executor == "swarm":
        text += f'default_memory = "{SWARM_MEMORY}"\n'
    return text


def engine_loop(kind: str, items: int, concurrency: int, root: str, who: Identity,
                config: str) -> float:
    """items/s of ``concurrency`` threads, each its own create/start/wait/logs/remove loop."""
    path = os.path.join(root, "limits.toml")
    with open(path, "w") as f:
        f.write(config)
    cfg = load_config(path)
    script = os.path.join(root, "script")
    with open(script, "w") as f:
        f.write(SCRIPT + "\n")
    os.chmod(script, 0o444)
    numbers = itertools.count()  # next() is atomic under the GIL: no lock needed
    errors: list[str] = []

    def worker() -> None:
        api = None
        try:
            api = docker.from_env().api  # a client (and connection) of its own per thread
            while True:
                i = next(numbers)
                if i >= items or errors:
                    return
                paths = _prepare(root, i, who)
                if kind == "baseline":
                    spec = _spec(root, i, paths, script, who, cfg)
                    kwargs = create_args(api, spec, spool=root, cap_add=[],
                                         security_opt=["no-new-privileges"], log_limit=LOG_LIMIT)
                    kwargs["name"] = f"{PREFIX}-{i}"
                    timeout = spec.timeout
                else:  # bare: what the copy needs and nothing else
                    kwargs = dict(image=IMAGE, command=["/bin/sh", "-c", "cd /task && " + SCRIPT],
                                  name=f"{PREFIX}-{i}", host_config=api.create_host_config(
                                      binds={paths["work"]: {"bind": "/task", "mode": "rw"},
                                             paths["in"]: {"bind": "/task/in", "mode": "ro"}}))
                    timeout = None
                cid = api.create_container(**kwargs)["Id"]
                api.start(cid)
                code = api.wait(cid, timeout=timeout)["StatusCode"]
                with open(paths["log"], "wb") as f:
                    f.write(api.logs(cid, stdout=True, stderr=True))
                api.remove_container(cid, v=True, force=True)
                if code != 0 or not os.path.exists(os.path.join(paths["work"], "out")):
                    errors.append(f"task {i}: exit status {code}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            if api is not None:
                api.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{kind} loop failed: {errors[:3]}")
    return items / elapsed


# -- flowd ---------------------------------------------------------------------------
def workflow(items: int, concurrency: int, container: str, service: bool, placement: str = "") -> str:
    """The benchmark's workflow; ``placement``: Swarm constraints (the local engine ignores them)."""
    where = f" placement={quoteattr(placement)}" if placement else ""
    lines = "" if service else "\n".join(f"    <item>item {i}\n</item>" for i in range(items))
    mode = ' mode="service"' if service else ""
    return f"""<workflow name="throughput"{mode}>
  <channel name="in">
{lines}
  </channel>
  <channel name="out"/>
  <process name="copy" image="{IMAGE}" parallel="{concurrency}" container="{container}"{where}>
    <input channel="in"/><output channel="out"/>
    <script>{SCRIPT}</script>
  </process>
</workflow>
"""


class Flowd:
    """One flowd daemon on its own spool and socket, started as ``who`` (as the tests do)."""

    def __init__(self, root: str, who: Identity, log_level: str, config: str,
                 executor: str = "docker"):
        """``config``: flowd.toml's text (``flowd_config``); ``executor`` "docker" or "swarm"."""
        self.root, self.who, self.executor = root, who, executor
        self.spool = os.path.join(root, "spool")
        self.sockdir = tempfile.mkdtemp(prefix="flowd-bench-")  # short: socket paths are limited
        self.sock = os.path.join(self.sockdir, "flowd.sock")
        cfg = os.path.join(root, "flowd.toml")
        with open(cfg, "w") as f:
            f.write(config)
            if executor == "swarm":
                f.write('executor = "swarm"\n')
        os.makedirs(self.spool, mode=0o750)
        for d in (self.spool, self.sockdir):
            os.chown(d, who.uid, who.gid)
        os.chmod(self.sockdir, 0o750)
        notify = os.path.join(self.sockdir, "notify")
        self.nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.nsock.bind(notify)
        os.chmod(notify, 0o777)
        env = dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=notify)
        extra: dict = {}
        if who.name:
            env.update(HOME=who.home, USER=who.name, LOGNAME=who.name)
            extra = dict(user=who.uid, group=who.gid, extra_groups=who.groups, umask=DAEMON_UMASK)
        self.log_path = os.path.join(root, "flowd.log")
        self.log = open(self.log_path, "ab")
        program = os.environ.get("FLOWD_BENCH_DAEMON")
        cmd = [sys.executable] + ([program] if program else ["-m", "flowd"])
        self.proc = subprocess.Popen(
            cmd + ["--config", cfg, "--spool", self.spool, "--socket", self.sock,
                   "--log-level", log_level],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, **extra)
        self._ready()
        self.client = Client(self.sock, timeout=60)

    def _ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.nsock.settimeout(1.0)
            try:
                if b"READY=1" in self.nsock.recv(4096):
                    return
            except socket.timeout:
                pass
        raise SystemExit(f"flowd did not start (exit {self.proc.poll()}); see {self.log_path}")

    def submit(self, xml: str) -> str:
        path = os.path.join(self.root, "workflow.xml")
        with open(path, "w") as f:
            f.write(xml)
        up = self.client.upload([("workflow.xml", path)])
        return self.client.call_patiently("submit", {"upload": up, "name": "workflow.xml"},
                                          600)["run"]

    def wait_end(self, run: str, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            detail = self.client.call("status", {"run": run, "wait": max(0.1, min(left, 60))},
                                      timeout=max(0.1, min(left, 60)) + 30)[0]["run"]
            if detail["state"] in ("succeeded", "failed", "cancelled") or left <= 0:
                return detail

    def run_dir(self, run: str) -> str:
        return os.path.join(self.spool, "runs", run)

    def stop(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.nsock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        if self.executor == "swarm":
            remove_services(os.path.realpath(self.spool))
        remove_containers({"label": f"io.flowd.spool={os.path.realpath(self.spool)}"})


def remove_containers(filters: dict) -> None:
    api = docker.from_env().api
    for c in api.containers(all=True, filters=filters):
        try:
            api.remove_container(c["Id"], force=True, v=True)
        except docker.errors.APIError:
            pass


def remove_services(spool: str) -> None:
    """The Swarm services of one spool (only those: others may use this swarm)."""
    api = docker.from_env().api
    try:
        services = api.services(filters={"label": [f"io.flowd.spool={spool}"]})
    except docker.errors.APIError:
        return  # not a manager (any more)
    for svc in services:
        try:
            api.remove_service(svc["ID"])
        except docker.errors.APIError:
            pass


class ServiceCreates:
    """Counts the Swarm services (jobs) made for one run, live: the manager's
    service events, which name each service ``flowd-RUN-TASK-aN``."""

    def __init__(self):
        self.names: list[str] = []
        self._api = docker.from_env().api
        self._events = self._api.events(decode=True, filters={"type": "service", "event": "create"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._events:
                self.names.append(str(((ev.get("Actor") or {}).get("Attributes") or {}).get("name")))
        except Exception:  # noqa: BLE001 - the stream was closed
            pass

    def of(self, run: str) -> list[str]:
        return [n for n in self.names if n.startswith(f"flowd-{run}-")]

    def close(self) -> None:
        try:
            self._events.close()
        except Exception:  # noqa: BLE001
            pass


class Creates:
    """Counts the containers the engine creates for one spool, live (its event stream).

    ``broken`` is set when the stream ends early (the engine restarted)."""

    def __init__(self, spool: str):
        self.count = 0
        self.broken = False
        self._api = docker.from_env().api
        self._events = self._api.events(decode=True, filters={
            "type": "container", "event": "create",
            "label": f"io.flowd.spool={os.path.realpath(spool)}"})
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for _ in self._events:
                self.count += 1
        except Exception:  # noqa: BLE001 - the stream broke
            pass
        self.broken = not self._closed

    def close(self) -> None:
        self._closed = True
        try:
            self._events.close()
        except Exception:  # noqa: BLE001
            pass

    def too_many(self, tasks: int, concurrency: int) -> bool:
        """More than a warm pool would make for ``tasks`` tasks (about one per slot,
        a few replaced): fresh containers. Only ever grows, so it may stop a run early."""
        return self.count > min(tasks // 2, 2 * concurrency + tasks // 10)


def flowd_batch(mode: str, items: int, concurrency: int, root: str, who: Identity,
                log_level: str, limit: float, config: str, placement: str = "") -> tuple[float, dict]:
    """items/s of a batch run (the run's clock), and its detail. ``mode``: fresh,
    warm, or swarm (``executor = "swarm"``, the process ``container="fresh"``)."""
    container = "warm" if mode == "warm" else "fresh"
    executor = "swarm" if mode == "swarm" else "docker"
    services = ServiceCreates() if executor == "swarm" else None
    d = Flowd(root, who, log_level, config, executor)
    creates = Creates(d.spool)
    try:
        run = d.submit(workflow(items, concurrency, container, service=False, placement=placement))
        deadline = time.monotonic() + limit
        while True:  # a second at a time: a warm run that is not warm stops early
            detail = d.wait_end(run, min(deadline, time.monotonic() + 1))
            if detail["state"] != "running" or time.monotonic() >= deadline:
                break
            if container == "warm" and creates.too_many(items, concurrency):
                raise NotAvailable(f"{creates.count} containers made for the first "
                                   f"{detail['tasks_done'] + detail['tasks_running']} tasks: "
                                   "they ran in fresh containers")
        if detail["state"] != "succeeded":
            why = detail.get("message") or detail["state"]
            if detail["state"] == "running":
                why = f"did not finish within {limit:.0f}s ({detail['tasks_done']} of {items} done)"
            if container == "warm":
                raise NotAvailable(why)
            raise SystemExit(f"flowd {mode}: {why}; see {d.log_path}")
        depth = {c["name"]: c["depth"] for c in detail["channels"]}
        if depth.get("out") != items:
            raise SystemExit(f"flowd {mode}: {depth.get('out')} items out of {items}")
        detail["containers_created"] = creates.count
        if services is not None:
            made = services.of(run)
            detail["jobs_created"] = len(made)
            again = sorted({n for n in made if made.count(n) > 1})
            if len(made) < items:
                raise SystemExit(f"flowd swarm: {len(made)} Swarm jobs made for {items} tasks; "
                                 f"see {d.log_path}")
            if len(made) > items:
                print(f"flowd swarm: {len(made)} Swarm jobs made for {items} tasks (made again: "
                      f"{', '.join(again) or 'none'}; other attempts: "
                      f"{', '.join(n for n in made if not n.endswith('-a1')) or 'none'}); "
                      f"flowd's log says why ({d.log_path}: --keep keeps it, --log-level info "
                      "says more)", file=sys.stderr)
        if container == "warm" and creates.broken:
            raise NotAvailable("the engine's event stream broke (an engine restart?): "
                               "cannot tell whether the run was warm; run again")
        if container == "warm" and creates.too_many(items, concurrency):
            raise NotAvailable(f"{creates.count} containers made for {items} tasks: "
                               "they ran in fresh containers")
        return items / detail["elapsed"], detail
    finally:
        creates.close()
        if services is not None:
            services.close()
        d.stop()


# -- latency in service mode ------------------------------------------------------------
_IN_CREATE, _IN_MOVED_TO = 0x100, 0x80


class Inotify:
    """New names in one folder (Linux inotify through libc)."""

    def __init__(self, folder: str):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, folder.encode(),
                                                 _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {folder}")

    def names(self, timeout: float) -> list[str]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data, out, pos = os.read(self.fd, 65536), [], 0
        while pos < len(data):
            _, _, _, length = struct.unpack_from("iIII", data, pos)
            out.append(data[pos + 16:pos + 16 + length].rstrip(b"\0").decode())
            pos += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def service_latency(mode: str, pushes: int, root: str, who: Identity,
                    log_level: str, config: str, placement: str = "") -> list[float]:
    """Seconds from each push's answer to its output in the result channel (after one
    warm-up push). NotAvailable if a push's output does not come within 60 s.
    ``mode``: warm, fresh, or swarm (``executor = "swarm"``, ``container="fresh"``)."""
    container = "warm" if mode == "warm" else "fresh"
    d = Flowd(root, who, log_level, config, "swarm" if mode == "swarm" else "docker")
    try:
        run = d.submit(workflow(0, 1, container, service=True, placement=placement))
        out_dir = os.path.join(d.run_dir(run), "channels", "out")
        deadline = time.monotonic() + 60
        while not os.path.isdir(out_dir):  # the run's folder is renamed into place on submit
            if time.monotonic() > deadline:
                raise SystemExit(f"run {run} has no channel folder {out_dir}")
            time.sleep(0.01)
        watch = Inotify(out_dir)
        creates = Creates(d.spool)
        times = []
        try:
            for k in range(pushes + 1):
                d.client.push(run, "in", io.BytesIO(f"push {k}\n".encode()))
                t0 = time.perf_counter()
                limit = t0 + 60
                while not any(n.isdigit() for n in watch.names(max(0.0, limit - time.perf_counter()))):
                    if time.perf_counter() >= limit:
                        raise NotAvailable(f"push {k}: no output within 60 s")
                if k:
                    times.append(time.perf_counter() - t0)
                if container == "warm" and k >= 2 and creates.too_many(k + 1, 1):
                    raise NotAvailable(f"{creates.count} containers made for {k + 1} pushes: "
                                       "they ran in fresh containers")
        finally:
            creates.close()
            watch.close()
        return times
    finally:
        d.stop()


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# -- the swarm -----------------------------------------------------------------------
def swarm_manager():
    """Make sure this engine is a Swarm manager: (what was found, how to undo it).

    A manager is used as found (the undo is None). An engine in no swarm gets a
    one-node swarm (``docker swarm init --advertise-addr 127.0.0.1``); the undo
    leaves it and removes the docker_gwbridge network init made. A worker, or a
    swarm in any other state, is refused."""
    api = docker.from_env().api
    sw = api.info().get("Swarm") or {}
    state = str(sw.get("LocalNodeState") or "")
    if state == "active":
        if not sw.get("ControlAvailable"):
            raise SystemExit("--executor swarm: this engine is a Swarm worker; run the benchmark on a "
                             "manager (flowd's Swarm executor needs one)")
        nodes = sum(1 for n in api.nodes() if (n.get("Status") or {}).get("State") == "ready")
        return f"the engine's own swarm, used as found ({nodes} ready node(s))", None
    if state != "inactive":
        raise SystemExit(f"--executor swarm: the engine's Swarm state is {state!r}; it must be a "
                         "manager, or in no swarm (then a one-node swarm is made and left)")
    networks = {n["Name"] for n in api.networks()}
    made = subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"--executor swarm: docker swarm init failed: {made.stderr.strip()}")

    def leave() -> None:
        for _ in range(60):
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True)
            now = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                                 capture_output=True, text=True)
            if now.returncode == 0 and now.stdout.strip() == "inactive":
                break
            time.sleep(1)
        else:
            print("could not leave the swarm made for the benchmark: run "
                  "`docker swarm leave --force`", file=sys.stderr)
        if "docker_gwbridge" not in networks:
            subprocess.run(["docker", "network", "rm", "docker_gwbridge"], capture_output=True)

    return "a one-node swarm made for the benchmark (left again at the end)", leave


# -- main ---------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="items per batch run (default 200)")
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2,
                    help="containers at once: flowd's max_containers and the loops' threads "
                         "(default: the number of cores)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each rate is the best (default 2)")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated, of {','.join(MODES)} (default: all but swarm; with "
                         "--executor swarm: baseline,fresh,swarm,latency)")
    ap.add_argument("--executor", choices=("docker", "swarm"), default="docker",
                    help="swarm: also run the workflow on flowd's Swarm executor and print it "
                         "against local fresh containers (the engine must be a Swarm manager, or "
                         "in no swarm: then a one-node swarm is made and left at the end)")
    ap.add_argument("--pushes", type=int, default=200, help="warm pushes for latency (default 200)")
    ap.add_argument("--placement", default="",
                    help='the process\'s placement= (Swarm constraints, e.g. "node.role==manager" to '
                         "keep the tasks on this engine; the local engine ignores it; default none)")
    ap.add_argument("--fresh-pushes", type=int, default=20,
                    help="fresh (and swarm) pushes for latency, for comparison (default 20; 0: none)")
    ap.add_argument("--daemon-user", default="flowd-test" if os.geteuid() == 0 else "",
                    help='user flowd runs as (default flowd-test when run as root; "": this user)')
    ap.add_argument("--log-level", default="warning", help="flowd's --log-level (default warning)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders (spools, logs)")
    args = ap.parse_args()
    if args.modes is None:
        args.modes = ("baseline,fresh,swarm,latency" if args.executor == "swarm"
                      else ",".join(m for m in MODES if m != "swarm"))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or args.items < 1 or args.concurrency < 1 or args.rounds < 1 or args.pushes < 1:
        ap.error(f"unknown mode {bad[0]!r} (modes: {', '.join(MODES)})" if bad else
                 "--items, --concurrency, --rounds and --pushes must be at least 1")
    if ("swarm" in modes) != (args.executor == "swarm"):
        ap.error("mode swarm goes with --executor swarm, and --executor swarm measures mode swarm "
                 "(e.g. --executor swarm --modes fresh,swarm)")
    if args.daemon_user:
        if os.geteuid() != 0:
            ap.error("--daemon-user needs root (run with sudo, or --daemon-user '')")
        try:
            pw = pwd.getpwnam(args.daemon_user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            "--groups", "docker", args.daemon_user], check=True)
            pw = pwd.getpwnam(args.daemon_user)
        if grp.getgrnam("docker").gr_gid not in os.getgrouplist(pw.pw_name, pw.pw_gid):
            ap.error(f"user {args.daemon_user} is not in the docker group (usermod -aG docker ...)")
    who = Identity(args.daemon_user)
    subprocess.run(["bash", os.path.join(REPO, "examples", "build-images")], check=True,
                   stdout=subprocess.DEVNULL)
    base = os.environ.get("FLOWD_BENCH_DIR") or os.path.join(REPO, ".bench-tmp")
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)  # the daemon's user goes through it to its spool
    config = flowd_config(args.concurrency, args.executor)
    rates: dict[str, list[float]] = {m: [] for m in BATCH}
    details: dict[str, dict] = {}
    warm_missing = ""
    t_start = time.monotonic()
    order = [m for m in BATCH if m in modes]
    swarm_note = ""
    leave_swarm = None
    # SIGTERM ends the script through its finally blocks (a swarm made here is left)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.executor == "swarm":
            swarm_note, leave_swarm = swarm_manager()
            print(f"swarm: {swarm_note}", file=sys.stderr)
        for r in range(args.rounds):
            for mode in order if r % 2 == 0 else order[::-1]:
                if mode == "warm" and warm_missing:
                    continue
                root = tempfile.mkdtemp(prefix=f"{mode}-", dir=base)
                os.chmod(root, 0o755)
                try:
                    if mode in ("baseline", "bare"):
                        rates[mode].append(engine_loop(mode, args.items, args.concurrency, root, who,
                                                       config))
                    else:
                        fresh = max(rates["fresh"], default=0.0)
                        slower = 6 if mode == "swarm" else 2  # a Swarm job costs more than a container
                        limit = 60 + (slower * args.items / fresh if fresh else slower * args.items)
                        try:
                            rate, details[mode] = flowd_batch(mode, args.items, args.concurrency,
                                                              root, who, args.log_level, limit, config,
                                                              args.placement)
                            rates[mode].append(rate)
                        except NotAvailable as e:
                            warm_missing = str(e)
                            print(f"round {r + 1} warm: not available ({e})", file=sys.stderr)
                            continue
                finally:
                    if not args.keep:
                        shutil.rmtree(root, ignore_errors=True)
                print(f"round {r + 1} {mode}: {rates[mode][-1]:.2f} items/s", file=sys.stderr)
        latency: dict[str, list[float] | str] = {}
        if "latency" in modes:
            kinds = [("warm", args.pushes), ("fresh", args.fresh_pushes)]
            if args.executor == "swarm":  # warm only when asked for
                kinds = [("swarm", args.fresh_pushes), ("fresh", args.fresh_pushes)] + \
                    ([("warm", args.pushes)] if "warm" in modes else [])
            for kind, n in kinds:
                if n < 1:
                    continue
                if kind == "warm" and warm_missing:
                    latency["warm"] = warm_missing
                    continue
                root = tempfile.mkdtemp(prefix=f"latency-{kind}-", dir=base)
                os.chmod(root, 0o755)
                try:
                    latency[kind] = service_latency(kind, n, root, who, args.log_level, config,
                                                    args.placement)
                except NotAvailable as e:
                    latency[kind] = str(e)
                finally:
                    if not args.keep:
                        shutil.rmtree(root, ignore_errors=True)
    finally:
        remove_containers({"name": PREFIX})
        if leave_swarm is not None:
            leave_swarm()

    print(f"items={args.items} concurrency={args.concurrency} rounds={args.rounds} "
          f"daemon user={who.name or 'this user'} cores={os.cpu_count()} "
          f"({time.monotonic() - t_start:.0f}s)")
    if swarm_note:
        print(f"swarm: {swarm_note}; flowd default_memory = {SWARM_MEMORY} in every run"
              + (f"; placement {args.placement!r}" if args.placement else ""))
        made = details.get("swarm", {}).get("jobs_created")
        if made is not None and made != args.items:
            print(f"swarm: the last swarm round made {made} jobs for {args.items} tasks (see above)")

    def show(name: str, label: str) -> float | None:
        if not rates[name]:
            return None
        vals = ", ".join(f"{v:.2f}" for v in rates[name])
        print(f"{label:<38} {max(rates[name]):7.2f} items/s   (rounds: {vals})")
        return max(rates[name])

    base_rate = show("baseline", "baseline (SDK loop, flowd's settings):")
    bare_rate = show("bare", "bare SDK loop (no settings):")
    fresh_rate = show("fresh", 'flowd container="fresh":')
    warm_rate = show("warm", 'flowd container="warm":')
    swarm_rate = show("swarm", 'flowd executor="swarm":')
    if "warm" in modes and warm_rate is None:
        print(f"warm: not available ({warm_missing})")
    if base_rate and bare_rate:
        print(f"ratio baseline/bare (hardening):        {base_rate / bare_rate:.2f}")
    if base_rate and fresh_rate:
        print(f"ratio fresh/baseline:                   {fresh_rate / base_rate:.2f}   (goal >= 0.9)")
    if warm_rate and fresh_rate:
        print(f"ratio warm/fresh:                       {warm_rate / fresh_rate:.2f}   (goal >= 10)")
    if swarm_rate and fresh_rate:
        print(f"ratio swarm/fresh (local containers):   {swarm_rate / fresh_rate:.2f}")
    if swarm_rate and base_rate:
        print(f"ratio swarm/baseline:                   {swarm_rate / base_rate:.2f}")
    for name in ("fresh", "swarm"):
        if name == "swarm" and rates["swarm"] or name == "fresh" and rates["fresh"] and rates["swarm"]:
            print(f"time per task per slot, {name + ':':<17} {args.concurrency / max(rates[name]):.2f} s "
                  f"(concurrency / best rate)")
    if "latency" in modes:
        for container in ("warm", "fresh", "swarm"):
            got = latency.get(container)
            if isinstance(got, str):
                print(f"latency {container}: not available ({got})")
            elif got:
                print(f"latency {container} (push answered -> output committed, {len(got)} pushes): "
                      f"p50 {statistics.median(got) * 1000:.1f} ms, "
                      f"p99 {percentile(got, 99) * 1000:.1f} ms, max {max(got) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
