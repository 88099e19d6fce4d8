"""Run task attempts in Docker containers: the only module importing ``docker``.

Works with the docker SDK 5.0.3 (Debian bookworm) and 7.x; it uses only the
low-level ``APIClient`` calls both have.

Threads. The caller's thread never talks to the engine: ``start``,
``adopt``, ``kill``, ``remove`` and ``sweep`` queue a job and return a
``concurrent.futures.Future`` that completes when that job is done (the daemon
may ignore it; tests wait on it). Jobs run on three lanes of *daemon* worker
threads, so a wait on a container that runs for hours never holds up
``close()`` or the interpreter's exit (``ThreadPoolExecutor`` joins its
workers at exit):

- ``starts`` (4 threads): remove a leftover, ensure/pull the image, create
  and start; then hand the container to the waits lane.
- ``waits`` (``max_workers`` threads): one blocking ``wait`` per running
  container (``adopt`` runs here too, since it may wait for the engine).
- ``ops`` (2 threads): kill, remove, sweep; never stuck behind a pull.

Results go to ``report`` as ``TaskResult``; engine outages as ``EngineState``.

Errors. Every SDK call goes through ``_call``, the one boundary where docker,
requests and urllib3 errors become ``flowd.errors``: ``EngineUnavailable``
(cannot reach the engine; this also reports ``EngineState(up=False)`` once and
starts a watcher that pings every ``ping_interval`` seconds until the engine
answers, then reports ``EngineState(up=True)``), ``ImageUnavailable``,
``NotFound`` (no such container) and ``EngineError`` (the engine refused).

Removal. A container is always removed with its anonymous volumes (an
image that declares a VOLUME would otherwise leak one per task).

Logs. Containers log with the ``json-file`` driver rotated at
``ENGINE_LOG_FACTOR * log_limit / 2`` bytes, two files, so a chatty task can
never fill the engine's disk. The engine's JSON costs about 70 bytes per
line on top of the output, so it keeps ``ENGINE_LOG_FACTOR`` times the room
flowd promises. The log written to ``spec.log_path`` is the *tail* of
stdout+stderr (interleaved as written): the last ``log_limit`` bytes of what
the engine kept (all of them unless the output is mostly lines of under ~25
bytes), streamed in chunks; it is fsynced and renamed into place. While the
container runs, one thread per task follows its log into
``live_log_path(spec.log_path)`` (the first ``log_limit`` bytes), for
``flowctl logs --follow``; the final log starts with the same bytes unless
the output was over ``log_limit``.

OOM. A task is ``OOM`` only on exit 137 with the engine's OOMKilled flag (it
is container-wide and sticky) or, since that flag is lost now and then on
cgroup v1, with the line the container's shell prints after the script when
its cgroup's ``oom_kill`` counter moved (see ``_OOM_CHECK``).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import docker
import docker.errors
import docker.types
import docker.utils
import requests.exceptions

from .. import units
from ..errors import (
    EngineError,
    EngineUnavailable,
    FlowError,
    ImageUnavailable,
    NotFound,
)
from .base import (
    DAMAGED,
    ERROR,
    EXITED,
    KILLED,
    LABEL_ATTEMPT,
    LABEL_RUN,
    LABEL_SPOOL,
    LABEL_TASK,
    MISSING,
    OOM,
    SCRIPT_PATH,
    TASK_DIR,
    TIMEOUT,
    EngineState,
    Executor,
    Report,
    TaskResult,
    TaskSpec,
    check_inputs,
    live_log_path,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
STARTS_LANE = 4
OPS_LANE = 2
_RUNNING_STATES = ("running", "paused", "restarting")

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


ENGINE_LOG_FACTOR = 4  # the engine keeps this many times log_limit of JSON log (see Logs)
IMAGE_CHECK_TTL = 30.0  # seconds an image found present is not looked up again


class _WaitTimedOut(Exception):
    """The read timeout of a ``wait`` call ran out (not an engine failure)."""


class DockerExecutor(Executor):
    ping_interval = 2.0  # seconds between pings while the engine is down

    def __init__(
        self,
        report: Report,
        *,
        spool: str = "",
        max_workers: int = 64,
        cap_add: list[str] | None = None,
        security_opt: list[str] | None = None,
        log_limit: int = 10 * MiB,
        client: Any = None,
    ):
        """
        ``spool``: default spool label (a ``TaskSpec`` with its own wins).
        ``max_workers``: containers waited on at once (more are queued; their
        timeouts still count from their start).
        ``cap_add``: capabilities given back after ``cap_drop=["ALL"]``.
        ``security_opt``: extra options after ``no-new-privileges`` (e.g. a
        seccomp or AppArmor profile).
        ``log_limit``: bytes of log kept per task (the tail).
        ``client``: a ``docker.DockerClient`` (or ``APIClient``) to use;
        default: ``docker.from_env()``, made lazily on first use so that
        building an executor never blocks or fails when the engine is down.
        """
        super().__init__(report)
        self.spool = spool
        self.max_workers = max_workers
        self.cap_add = list(cap_add or [])
        self.security_opt = ["no-new-privileges"] + list(security_opt or [])
        self.log_limit = log_limit
        self._own_client = client is None
        self._api = None if client is None else getattr(client, "api", client)
        self._client = client
        self._lock = threading.Lock()  # guards the fields below
        self._tasks: dict[tuple[str, str], _Task] = {}
        self._kills: set[tuple[str, str]] = set()
        self._engine_up = True
        self._watcher: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()  # set by close()
        self._up = threading.Event()  # set while the engine is (thought) up
        self._up.set()
        self._image_seen: dict[str, float] = {}  # image -> when inspect last found it
        self._starts = _Lane("flowd-docker-start", STARTS_LANE)
        self._waits = _Lane("flowd-docker-wait", max_workers)
        self._ops = _Lane("flowd-docker-ops", OPS_LANE)
        self._follows = _Lane("flowd-docker-logs", max_workers)

    # -- the Executor interface ---------------------------------------------
    def start(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = _Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
            self._kills.discard(spec.key)
        return self._starts.submit(self._start_job, t)

    def adopt(self, spec: TaskSpec) -> concurrent.futures.Future:
        t = _Task(spec)
        with self._lock:
            self._tasks[spec.key] = t
        return self._waits.submit(self._adopt_job, t)

    def kill(self, run_id: str, task_id: str) -> concurrent.futures.Future:
        key = (run_id, task_id)
        with self._lock:
            self._kills.add(key)
            t = self._tasks.get(key)
            cid = t.container_id if t is not None else None
            spool = self._spool(t.spec) if t is not None else self.spool
        return self._ops.submit(self._kill_job, key, cid, spool)

    def remove(self, spec: TaskSpec) -> concurrent.futures.Future:
        with self._lock:
            self._kills.discard(spec.key)
        return self._ops.submit(self._remove_job, spec)

    def sweep(self, spool: str, keep: set[tuple[str, str]]) -> concurrent.futures.Future:
        return self._ops.submit(self._sweep_job, spool, set(keep))

    def close(self) -> None:
        """Stop the threads; containers keep running (``adopt`` finds them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._up.set()  # wake jobs waiting for the engine: they see _closed
        for lane in (self._starts, self._waits, self._ops, self._follows):
            lane.close()
        if self._own_client and self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # -- jobs: start --------------------------------------------------------
    def _start_job(self, t: _Task) -> None:
        spec = t.spec
        damaged = check_inputs(spec)  # here, not in the loop: it reads every input whole
        if damaged is not None:
            self._result(t, DAMAGED, **damaged)
            return
        try:
            # No removal of a leftover container up front: create() meets a
            # name conflict only in the rare case there is one, and handles it.
            self._ensure_image(spec.image)
            if self._kill_requested(spec):
                self._result(t, KILLED, message="killed before it started")
                return
            try:
                t.container_id = self._create(spec)
            except ImageUnavailable:  # removed since we last looked: pull it again
                self._image_seen.pop(spec.image, None)
                self._ensure_image(spec.image)
                t.container_id = self._create(spec)
            try:
                self._call(self.api.start, t.container_id)
            except EngineUnavailable:
                raise
            except FlowError:
                self._quiet_remove(t.container_id)
                raise
            deadline = None if spec.timeout is None else time.time() + spec.timeout
        except EngineUnavailable as e:
            self._result(t, ERROR, message=f"engine unavailable: {e}", retryable=True)
            return
        except ImageUnavailable as e:
            self._result(t, ERROR, message=str(e))
            return
        except FlowError as e:
            self._result(t, ERROR, message=f"could not start the container: {e}")
            return
        if self._kill_requested(spec):  # a kill that came in while we started it
            try:
                self._kill_container(t.container_id)
            except FlowError:
                pass  # the wait below meets the same trouble and handles it
        self._follow(t)
        self._waits.submit(self._wait_job, t, deadline)

    def _ensure_image(self, image: str) -> None:
        seen = self._image_seen.get(image)
        if seen is not None and time.monotonic() - seen < IMAGE_CHECK_TTL:
            return  # looked up lately: one engine call less per task
        try:
            self._call(self.api.inspect_image, image)
            self._image_seen[image] = time.monotonic()
            return
        except ImageUnavailable:
            pass
        repo, tag = docker.utils.parse_repository_tag(image)
        reason = ""
        try:
            for event in self._call(self.api.pull, repo, tag=tag or "latest", stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    reason = str(event["error"]).strip()
            self._call(self.api.inspect_image, image)
            self._image_seen[image] = time.monotonic()
        except EngineUnavailable:
            raise
        except FlowError as e:
            reason = reason or str(e)
            raise ImageUnavailable(
                f"image {image} is not present and could not be pulled: {reason}"
            ) from None

    def _create(self, spec: TaskSpec) -> str:
        kwargs = self._call(self._create_args, spec)
        for n in range(3):
            try:
                return self._call(self.api.create_container, **kwargs)["Id"]
            except EngineError as e:
                # The name is still taken: a removal still in progress.
                if n == 2 or "is already in use" not in str(e):
                    raise
                self._remove_by_name(spec.container_name)
                self._stop.wait(0.2 * (n + 1))
        raise AssertionError("not reached")

    def _create_args(self, spec: TaskSpec) -> dict:
        """create_container's arguments: the hardened defaults are all here."""
        mounts = [
            docker.types.Mount(TASK_DIR, spec.workdir, type="bind", read_only=False),
            docker.types.Mount(SCRIPT_PATH, spec.script_path, type="bind", read_only=True),
        ] + [
            docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
            for m in spec.inputs
        ]
        limits: dict[str, Any] = {}
        if spec.memory:
            limits["mem_limit"] = int(spec.memory)
            limits["memswap_limit"] = int(spec.memory)  # the same: no swap
        if spec.cpus:
            limits["nano_cpus"] = int(spec.cpus * 1e9)
        half = max(ENGINE_LOG_FACTOR * self.log_limit // 2, 4096)
        host_config = self.api.create_host_config(
            mounts=mounts,
            privileged=False,
            security_opt=list(self.security_opt),
            cap_drop=["ALL"],
            cap_add=list(self.cap_add) or None,
            network_mode="bridge" if spec.network == "bridge" else "none",
            pids_limit=spec.pids_limit,
            group_add=list(spec.group_add) or None,
            log_config=docker.types.LogConfig(
                type="json-file", config={"max-size": str(half), "max-file": "2"}
            ),
            **limits,
        )
        labels = dict(spec.labels)
        labels[LABEL_SPOOL] = self._spool(spec)
        return dict(
            image=spec.image,
            command=_command(spec),
            entrypoint=[""],  # the image's entrypoint would wrap our command
            name=spec.container_name,
            labels=labels,
            working_dir=TASK_DIR,
            environment=dict(spec.env),
            user=spec.user or "",  # "": the image's USER
            host_config=host_config,
            use_config_proxy=False,  # no proxy variables from ~/.docker/config.json
        )

    # -- jobs: wait and finish -----------------------------------------------
    def _wait_job(self, t: _Task, deadline: float | None) -> None:
        cid = t.container_id
        while not self._closed:
            try:
                if deadline is not None and time.time() >= deadline:
                    state = self._state(cid)
                    if state.get("Status") in _RUNNING_STATES:
                        t.timed_out = True
                        self._kill_container(cid)
                        self._call(self.api.wait, cid, timeout=60, expect_timeout=True)
                else:
                    remaining = None if deadline is None else max(deadline - time.time(), 0.05)
                    self._call(self.api.wait, cid, timeout=remaining, expect_timeout=True)
                info = self._call(self.api.inspect_container, cid)
                if info["State"].get("Status") in _RUNNING_STATES:
                    continue  # restarted under us (should not happen): wait again
                self._finish(t, info)
                return
            except _WaitTimedOut:
                continue  # the deadline check above decides
            except EngineUnavailable:
                t.engine_lost = True
                if not self._await_engine():
                    return
            except NotFound:
                self._result(t, MISSING, message="the container was removed while it ran")
                return
            except FlowError as e:
                self._result(t, ERROR, message=f"lost the container: {e}")
                return

    def _finish(self, t: _Task, info: dict) -> None:
        spec = t.spec
        state = info.get("State") or {}
        code = state.get("ExitCode")
        started = _parse_time(state.get("StartedAt"))
        finished = _parse_time(state.get("FinishedAt"))
        if started is not None and finished is not None and finished < started:
            # dockerd stamps StartedAt after runc has started the process; a
            # process that exits at once can have a FinishedAt a bit earlier.
            started = finished
        note = ""
        t.finished = True  # before the live log goes: see _follow_job
        if spec.log_path:
            try:
                self._save_log(info["Id"], spec.log_path)
            except OSError as e:
                note = f" (log not saved: {e.strerror or e})"
            _unlink(live_log_path(spec.log_path))
        if self._kill_requested(spec) and code != 0:
            status, message = KILLED, "killed on request"
        elif t.timed_out and code != 0:
            took = units.duration(spec.timeout or 0, exact=True)
            status, message = TIMEOUT, f"timed out after {took}"
        elif t.engine_lost and code in (137, 143) and not state.get("OOMKilled"):
            # Without live-restore a dockerd restart kills every container (SIGTERM,
            # then SIGKILL): not the script's failure. Run it again, same attempt.
            self._result(t, ERROR, exit_code=code, retryable=True,
                         message=f"engine unavailable: the engine restarted and stopped the "
                                 f"container (exit status {code})")
            return
        elif code == 137 and (state.get("OOMKilled") or self._oom_marked(info["Id"])):
            limit = f" (limit {units.size(spec.memory, trim=True)})" if spec.memory else ""
            status, message = OOM, f"killed: out of memory{limit}"
        else:
            status, message = EXITED, f"exit status {code}"
            if state.get("Error"):
                message += f": {state['Error']}"
        self._result(t, status, exit_code=code, message=message + note,
                     started_at=started, finished_at=finished)

    def _oom_marked(self, cid: str) -> bool:
        """Did the container's shell see the kernel's oom_kill counter move?"""
        try:
            tail = self._call(self.api.logs, cid, stdout=False, stderr=True, tail=5)
        except NotFound:
            return False
        return OOM_MARK.encode() in tail

    def _save_log(self, cid: str, path: str) -> None:
        part = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".part")
        stream = self._call(self.api.logs, cid, stdout=True, stderr=True, stream=True, follow=False)
        try:
            with open(part, "w+b") as f:
                self._copy_tail(stream, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
        except BaseException:
            _unlink(part)
            raise
        finally:
            _close_quietly(stream)

    def _copy_tail(self, stream, f) -> None:
        """Write the last ``log_limit`` bytes of a log stream to ``f`` (empty, w+b).

        The file is cut back to its last ``log_limit`` bytes whenever it grows
        past twice that, so the work is linear and the file stays small.
        """
        limit = self.log_limit
        size = 0
        for chunk in self._iterate(stream):
            f.write(chunk)
            size += len(chunk)
            if size > 2 * limit:
                size = _keep_tail(f, size, limit)
        if size > limit:
            _keep_tail(f, size, limit)

    def _copy_log(self, stream, f, stop: Callable[[], bool] | None = None) -> None:
        """Write a log stream's chunks to ``f`` up to ``log_limit`` bytes (or
        until ``stop()``), each flushed when ``stop`` is given (a live log)."""
        written = 0
        for chunk in self._iterate(stream):
            if stop is not None and stop():
                return
            chunk = chunk[: self.log_limit - written]
            f.write(chunk)
            written += len(chunk)
            if stop is not None:
                f.flush()
            if written >= self.log_limit:
                return

    # -- jobs: the live log ---------------------------------------------------------
    def _follow(self, t: _Task) -> None:
        if t.spec.log_path and t.container_id is not None:
            self._follows.submit(self._follow_job, t)

    def _follow_job(self, t: _Task) -> None:
        """Copy the running container's log into the live file as it comes.

        Best effort: the final log (``_save_log``) is the record. The live file
        is (re)written from the start, so an adopted task's is whole again.
        """
        live = live_log_path(t.spec.log_path)
        try:
            stream = self._call(self.api.logs, t.container_id, stdout=True, stderr=True,
                                stream=True, follow=True)
        except FlowError:
            return
        try:
            with open(live, "wb") as f:
                if t.finished:  # _finish ran while we opened it: leave nothing behind
                    _unlink(live)
                    return
                self._copy_log(stream, f, stop=lambda: t.finished or self._closed)
        except (OSError, FlowError):
            return  # the final log still comes from the engine
        finally:
            _close_quietly(stream)

    # -- jobs: adopt ------------------------------------------------------------
    def _adopt_job(self, t: _Task) -> None:
        spec = t.spec
        while True:
            try:
                found = self._find(spec.run_id, spec.task_id, self._spool(spec))
                break
            except EngineUnavailable:
                if not self._await_engine():
                    return
            except FlowError as e:
                self._result(t, ERROR, message=str(e))
                return
        mine = None
        for c in found:
            if mine is None and (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                mine = c
            else:
                self._quiet_remove(c["Id"])  # another attempt's: not ours
        if mine is None:
            self._result(t, MISSING, message=f"no container for attempt {spec.attempt}")
            return
        t.container_id = mine["Id"]
        deadline = None
        if mine.get("State") == "created":  # made but never started: it did not run
            self._quiet_remove(t.container_id)
            self._result(t, MISSING, message="the container was created but never started")
            return
        if mine.get("State") == "exited" and _boot_time() is not None:
            try:
                finished = _parse_time(self._state(t.container_id).get("FinishedAt"))
            except FlowError:
                finished = None
            if finished is not None and finished < _boot_time():
                # It ended before this machine booted: what it wrote may never have
                # reached the disk. Do not trust it: run the attempt again.
                self._quiet_remove(t.container_id)
                self._result(t, MISSING, message="the container ended before the machine "
                                                 "restarted; its outputs are not trusted")
                return
        if mine.get("State") in _RUNNING_STATES:
            if spec.timeout is not None:
                try:
                    state = self._state(t.container_id)
                except FlowError:
                    state = {}  # _wait_job meets the same trouble and handles it
                started = _parse_time(state.get("StartedAt")) or time.time()
                deadline = started + spec.timeout
            if self._kill_requested(spec):
                self._ops.submit(self._kill_job, spec.key, t.container_id, self._spool(spec))
            self._follow(t)
        # An exited container's wait returns at once; _wait_job then reports it.
        self._wait_job(t, deadline)

    # -- jobs: kill, remove, sweep ---------------------------------------------
    def _kill_job(self, key: tuple[str, str], cid: str | None, spool: str) -> None:
        try:
            if cid is not None:
                self._kill_container(cid)
            else:  # not started by us yet, or never adopted: find it
                for c in self._find(key[0], key[1], spool):
                    if c.get("State") in _RUNNING_STATES:
                        self._kill_container(c["Id"])
        except FlowError as e:
            log.warning("could not kill task %s/%s: %s", key[0], key[1], e)

    def _remove_job(self, spec: TaskSpec) -> None:
        try:
            for c in self._find(spec.run_id, spec.task_id, self._spool(spec)):
                if (c.get("Labels") or {}).get(LABEL_ATTEMPT) == str(spec.attempt):
                    self._quiet_remove(c["Id"])
        except FlowError as e:
            log.warning("could not remove the container of %s/%s: %s", spec.run_id, spec.task_id, e)

    def _sweep_job(self, spool: str, keep: set[tuple[str, str]]) -> None:
        try:
            found = self._call(self.api.containers, all=True,
                               filters={"label": [f"{LABEL_SPOOL}={spool}"]})
        except FlowError as e:
            log.warning("sweep of spool %r failed: %s", spool, e)
            return
        for c in found:
            labels = c.get("Labels") or {}
            if (labels.get(LABEL_RUN), labels.get(LABEL_TASK)) not in keep:
                self._quiet_remove(c["Id"])

    # -- helpers on the engine ---------------------------------------------------
    @property
    def api(self):
        """The low-level client, made on first use (may raise EngineUnavailable)."""
        api = self._api
        if api is not None:
            return api
        if self._closed:
            raise EngineUnavailable("the executor is closed")
        with self._lock:
            if self._api is not None:
                return self._api
            try:
                client = docker.from_env(version="auto", max_pool_size=2 * self.max_workers + 16)
            except Exception as e:  # noqa: BLE001 - translated right here
                err = _translate(e)
            else:
                self._client, self._api = client, client.api
                return self._api
        if isinstance(err, EngineUnavailable):
            self._engine_lost(str(err))
        raise err

    def _call(self, fn: Callable, *args, expect_timeout: bool = False, **kwargs):
        """The one boundary: run an SDK call, translating every failure."""
        try:
            return fn(*args, **kwargs)
        except FlowError:
            raise
        except Exception as e:  # noqa: BLE001 - translated right here
            if expect_timeout and _is_read_timeout(e):
                raise _WaitTimedOut() from None
            err = _translate(e)
        if isinstance(err, EngineUnavailable):
            self._engine_lost(str(err))
        raise err

    def _iterate(self, stream):
        it = iter(stream)
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - translated in _call
                self._call(_reraise, e)
            yield chunk

    def _state(self, cid: str) -> dict:
        return self._call(self.api.inspect_container, cid).get("State") or {}

    def _find(self, run_id: str, task_id: str, spool: str | None) -> list[dict]:
        labels = [f"{LABEL_RUN}={run_id}", f"{LABEL_TASK}={task_id}"]
        if spool is not None:
            labels.append(f"{LABEL_SPOOL}={spool}")
        return self._call(self.api.containers, all=True, filters={"label": labels})

    def _kill_container(self, cid: str) -> None:
        try:
            self._call(self.api.kill, cid)
        except NotFound:
            pass
        except EngineUnavailable:
            raise
        except EngineError as e:
            if "is not running" not in str(e):
                raise

    def _remove_by_name(self, name: str) -> None:
        try:
            self._call(self.api.remove_container, name, force=True, v=True)
        except NotFound:
            pass
        except EngineUnavailable:
            raise
        except EngineError as e:
            if "already in progress" not in str(e):
                raise

    def _quiet_remove(self, cid: str) -> None:
        try:
            self._call(self.api.remove_container, cid, force=True, v=True)
        except NotFound:
            pass
        except FlowError as e:
            log.warning("could not remove container %s: %s", cid[:12], e)

    # -- engine outages ------------------------------------------------------------
    def _engine_lost(self, message: str) -> None:
        with self._lock:
            if not self._engine_up or self._closed:
                return
            self._engine_up = False
            self._up.clear()
            self._watcher = threading.Thread(
                target=self._watch_engine, name="flowd-docker-ping", daemon=True
            )
            self._watcher.start()
        self._report(EngineState(up=False, message=message))

    def _watch_engine(self) -> None:
        while not self._stop.wait(self.ping_interval):
            try:
                api = self._api
                if api is None:
                    api = self.api  # try to make the client
                api.ping()
            except Exception:  # noqa: BLE001 - still down; keep pinging
                continue
            with self._lock:
                self._engine_up = True
                self._up.set()
            self._report(EngineState(up=True, message="engine is back"))
            return

    def _await_engine(self) -> bool:
        """Block until the engine answers again; False once closed."""
        self._up.wait()
        return not self._closed

    # -- reporting ---------------------------------------------------------------------
    def _kill_requested(self, spec: TaskSpec) -> bool:
        with self._lock:
            return spec.key in self._kills

    def _spool(self, spec: TaskSpec) -> str:
        return spec.spool or self.spool

    def _result(self, t: _Task, status: str, **fields) -> None:
        with self._lock:
            if t.reported:
                return
            t.reported = True
            if self._tasks.get(t.spec.key) is t:
                del self._tasks[t.spec.key]
                self._kills.discard(t.spec.key)
        self._report(TaskResult(t.spec.run_id, t.spec.task_id, t.spec.attempt, status, **fields))

    def _report(self, event: object) -> None:
        if self._closed:
            return
        try:
            self.report(event)
        except Exception:  # noqa: BLE001 - a broken callback must not kill our threads
            log.exception("report callback failed for %r", event)


@dataclass(eq=False)
class _Task:
    spec: TaskSpec
    container_id: str | None = None
    timed_out: bool = False
    reported: bool = False
    engine_lost: bool = False  # the engine went away while we waited
    finished: bool = False  # _finish began: the live log is done with


def _keep_tail(f, size: int, limit: int) -> int:
    """Keep only the last ``limit`` of the ``size`` bytes written to ``f``; the new size."""
    f.flush()
    f.seek(size - limit)
    tail = f.read(limit)
    f.seek(0)
    f.write(tail)
    f.truncate(len(tail))
    return len(tail)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _close_quietly(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


class _Lane:
    """A bounded set of daemon worker threads fed by one queue."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = max(1, size)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                fut.set_exception(RuntimeError("executor is closed"))
                return fut
            self._queue.put((fut, fn, args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                th = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                      daemon=True)
                self._threads.append(th)
                th.start()
        return fut

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - kept in the future
                    log.exception("%s job %s failed", self.name, getattr(fn, "__name__", fn))
                    fut.set_exception(e)
            self._idle.release()


def _command(spec: TaskSpec) -> list[str]:
    """spec.command(), run in a subshell and followed by the OOM check."""
    cmd = spec.command()
    if cmd[:2] != ["/bin/sh", "-c"] or len(cmd) != 3:
        return cmd
    return ["/bin/sh", "-c", f"( {cmd[2]} ); rc=$?; {_OOM_CHECK}exit $rc"]


# -- translation of SDK errors: the one place that knows their shapes ----------------
def _translate(e: BaseException) -> FlowError:
    if isinstance(e, FlowError):
        return e
    if isinstance(e, docker.errors.ImageNotFound):
        return ImageUnavailable(f"no such image: {_explain(e)}")
    if isinstance(e, docker.errors.NotFound):
        return NotFound(f"no such container: {_explain(e)}")
    if isinstance(e, docker.errors.APIError):
        if _unreachable_api_error(e):
            return EngineUnavailable(f"the Docker engine cannot run containers: {_explain(e)}")
        return EngineError(f"the Docker engine refused: {_explain(e)}")
    if _is_read_timeout(e):
        return EngineUnavailable("the Docker engine did not answer in time")
    if isinstance(e, (requests.exceptions.RequestException, ConnectionError)):
        return EngineUnavailable(f"cannot reach the Docker engine: {_root_cause(e)}")
    if isinstance(e, docker.errors.DockerException):
        cause = e.__cause__ or e.__context__
        if isinstance(cause, (requests.exceptions.RequestException, ConnectionError)):
            return EngineUnavailable(f"cannot reach the Docker engine: {_root_cause(cause)}")
        return EngineError(f"Docker client error: {e}")
    return EngineError(f"unexpected error talking to Docker: {type(e).__name__}: {e}")


def _explain(e) -> str:
    text = getattr(e, "explanation", None) or str(e)
    return str(text).strip()


def _unreachable_api_error(e) -> bool:
    """A 5xx saying dockerd cannot reach containerd (it is restarting)."""
    status = getattr(e, "status_code", None)
    text = _explain(e).lower()
    return bool(status and status >= 500 and "containerd" in text and (
        "connection refused" in text or "dial" in text or "unavailable" in text))


def _is_read_timeout(e: BaseException) -> bool:
    if isinstance(e, requests.exceptions.Timeout):
        return True
    # Over a unix socket the SDK raises ConnectionError(ReadTimeoutError(...)).
    if isinstance(e, requests.exceptions.ConnectionError):
        inner = e.args[0] if e.args else None
        return type(inner).__name__ in ("ReadTimeoutError", "ConnectTimeoutError")
    return False


def _root_cause(e: BaseException) -> str:
    """The innermost error's words: 'No such file or directory', not a repr chain."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = next((a for a in e.args if isinstance(a, BaseException)), None)
        if inner is None and isinstance(getattr(e, "reason", None), BaseException):
            inner = e.reason
        if inner is None:
            inner = e.__cause__
        if inner is None:
            break
        e = inner
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _reraise(e: BaseException):
    raise e


# -- human words ------------------------------------------------------------------------
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def _boot_time() -> float | None:
    """When this machine booted (epoch seconds), from /proc/stat's btime."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _parse_time(text: str | None) -> float | None:
    """Docker's RFC 3339 time with nanoseconds, as epoch seconds (None if unset)."""
    if not text or text.startswith("0001-"):
        return None
    m = _TIME_RE.match(text)
    if not m:
        return None
    base, frac, zone = m.groups()
    dt = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S")
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    else:
        offset = 0
    seconds = dt.replace(tzinfo=timezone.utc).timestamp() - offset
    if frac:
        seconds += int(frac[:9].ljust(9, "0")) / 1e9
    return seconds
