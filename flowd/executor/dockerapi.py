"""The Docker engine as the executor reaches it: one connection, one error boundary.

Every SDK call goes through ``EngineLink.call``, the one place where docker,
requests and urllib3 errors become ``flowd.errors``: ``EngineUnavailable``
(cannot reach the engine; this also reports ``EngineState(up=False)`` once and
starts a watcher that pings every ``ping_interval`` seconds until the engine
answers, then reports ``EngineState(up=True)``), ``ImageUnavailable``,
``NotFound`` (no such container) and ``EngineError`` (the engine refused).
Also here: reading Docker's times and the machine's boot time.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

import docker
import docker.errors
import docker.utils
import requests.exceptions

from ..errors import EngineError, EngineUnavailable, FlowError, ImageUnavailable, NotFound
from .base import EngineState
from .container import LABEL_RUN, LABEL_SPOOL, LABEL_TASK

log = logging.getLogger("flowd.executor.docker")

IMAGE_CHECK_TTL = 30.0  # seconds an image found present is not looked up again


class _WaitTimedOut(Exception):
    """The read timeout of a ``wait`` call ran out (not an engine failure)."""


class EngineLink:
    """The executor's connection to the engine (made lazily), its outages and the
    container operations every job uses. ``owner`` is the DockerExecutor (its
    ``_report``, ``ping_interval`` and ``max_workers``)."""

    def __init__(self, owner, client: Any = None, health: Callable[[Any], object] | None = None):
        """``health(api)`` tells the engine is back after an outage (default:
        ``api.ping()``; the Swarm executor also needs the swarm to answer)."""
        self.owner = owner
        self.health = health or (lambda api: api.ping())
        self.own_client = client is None
        self._api = None if client is None else getattr(client, "api", client)
        self._client = client
        self.lock = threading.Lock()
        self.engine_up = True
        self.watcher: threading.Thread | None = None
        self.closed = False
        self.stop = threading.Event()  # set by close()
        self.up = threading.Event()  # set while the engine is (thought) up
        self.up.set()
        self.image_seen: dict[str, float] = {}  # image -> when inspect last found it

    def close(self) -> bool:
        """Stop: wake what waits for the engine; False if closed already."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
        self.stop.set()
        self.up.set()  # wake jobs waiting for the engine: they see closed
        if self.own_client and self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        return True

    @property
    def api(self):
        """The low-level client, made on first use (may raise EngineUnavailable)."""
        api = self._api
        if api is not None:
            return api
        if self.closed:
            raise EngineUnavailable("the executor is closed")
        with self.lock:
            if self._api is not None:
                return self._api
            try:
                client = docker.from_env(version="auto", max_pool_size=2 * self.owner.max_workers + 16)
            except Exception as e:  # noqa: BLE001 - translated right here
                err = _translate(e)
            else:
                self._client, self._api = client, client.api
                return self._api
        if isinstance(err, EngineUnavailable):
            self.lost(str(err))
        raise err

    def call(self, fn: Callable, *args, expect_timeout: bool = False, **kwargs):
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
            self.lost(str(err))
        raise err

    def iterate(self, stream, *, quiet_ends: bool = False):
        """A stream's chunks, its errors translated as ``call``'s. ``quiet_ends``:
        the client's read timeout ends it (a followed log whose task is quiet:
        not an engine outage)."""
        it = iter(stream)
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - translated in _call
                if quiet_ends and _is_read_timeout(e):
                    return
                self.call(_reraise, e)
            yield chunk

    def state(self, cid: str) -> dict:
        return self.call(self.api.inspect_container, cid).get("State") or {}

    def find(self, run_id: str, task_id: str, spool: str | None) -> list[dict]:
        labels = [f"{LABEL_RUN}={run_id}", f"{LABEL_TASK}={task_id}"]
        if spool is not None:
            labels.append(f"{LABEL_SPOOL}={spool}")
        return self.call(self.api.containers, all=True, filters={"label": labels})

    def kill_container(self, cid: str) -> None:
        try:
            self.call(self.api.kill, cid)
        except NotFound:
            pass
        except EngineUnavailable:
            raise
        except EngineError as e:
            if "is not running" not in str(e):
                raise

    def remove_by_name(self, name: str) -> None:
        try:
            self.call(self.api.remove_container, name, force=True, v=True)
        except NotFound:
            pass
        except EngineUnavailable:
            raise
        except EngineError as e:
            if "already in progress" not in str(e):
                raise

    def quiet_remove(self, cid: str) -> None:
        try:
            self.call(self.api.remove_container, cid, force=True, v=True)
        except NotFound:
            pass
        except FlowError as e:
            log.warning("could not remove container %s: %s", cid[:12], e)

    def ensure_image(self, image: str) -> None:
        """The image is here (looked up at most every IMAGE_CHECK_TTL s), or pulled."""
        seen = self.image_seen.get(image)
        if seen is not None and time.monotonic() - seen < IMAGE_CHECK_TTL:
            return  # looked up lately: one engine call less per task
        try:
            self.call(self.api.inspect_image, image)
            self.image_seen[image] = time.monotonic()
            return
        except ImageUnavailable:
            pass
        repo, tag = docker.utils.parse_repository_tag(image)
        reason = ""
        try:
            for event in self.call(self.api.pull, repo, tag=tag or "latest", stream=True, decode=True):
                if isinstance(event, dict) and event.get("error"):
                    reason = str(event["error"]).strip()
            self.call(self.api.inspect_image, image)
            self.image_seen[image] = time.monotonic()
        except EngineUnavailable:
            raise
        except FlowError as e:
            reason = reason or str(e)
            raise ImageUnavailable(
                f"image {image} is not present and could not be pulled: {reason}"
            ) from None

    def image_id(self, image: str, *, pull: bool) -> str | None:
        """The id of the image ``image`` names here (``pull``: pulled first if it
        is missing, as a start would); None when it is not here."""
        try:
            got = self.call(self.api.inspect_image, image)  # one engine call when it is here
        except ImageUnavailable:
            if not pull:
                return None
            self.ensure_image(image)
            got = self.call(self.api.inspect_image, image)
        ident = got.get("Id") if isinstance(got, dict) else None
        return ident if isinstance(ident, str) else None

    def oom_marked(self, cid: str) -> bool:
        """Did the container's shell see the kernel's oom_kill counter move?"""
        from .dockerspec import OOM_MARK

        try:
            tail = self.call(self.api.logs, cid, stdout=False, stderr=True, tail=5)
        except NotFound:
            return False
        return OOM_MARK.encode() in tail

    # -- engine outages ------------------------------------------------------------
    def lost(self, message: str) -> None:
        with self.lock:
            if not self.engine_up or self.closed:
                return
            self.engine_up = False
            self.up.clear()
            self.watcher = threading.Thread(
                target=self._watch, name="flowd-docker-ping", daemon=True
            )
            self.watcher.start()
        self.owner._report(EngineState(up=False, message=message))

    def _watch(self) -> None:
        while not self.stop.wait(self.owner.ping_interval):
            try:
                api = self._api
                if api is None:
                    api = self.api  # try to make the client
                self.health(api)
            except Exception:  # noqa: BLE001 - still down; keep pinging
                continue
            with self.lock:
                self.engine_up = True
                self.up.set()
            self.owner._report(EngineState(up=True, message="engine is back"))
            return

    def wait_up(self) -> bool:
        """Block until the engine answers again; False once closed."""
        self.up.wait()
        return not self.closed


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
            if "not a swarm manager" in _explain(e).lower():
                return EngineUnavailable(
                    "the Docker engine is not a Swarm manager (now): tasks wait; executor = \"swarm\" "
                    "needs flowd's engine to be a manager (`docker swarm init`, or join it as one), "
                    "or set executor = \"docker\"")
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
    """A 5xx saying dockerd cannot reach containerd (it is restarting), or
    that this Swarm manager has no leader (its managers lost their quorum:
    nothing can be scheduled until enough of them are back) or is no manager."""
    status = getattr(e, "status_code", None)
    text = _explain(e).lower()
    if not status or status < 500:
        return False
    if "containerd" in text and ("connection refused" in text or "dial" in text or "unavailable" in text):
        return True
    # "not a swarm manager": also what a manager's engine says while it stops or
    # starts (its swarm part goes first and comes last): wait for it, as for an
    # engine that left the swarm or never joined one (status says so).
    return ("does not have a leader" in text or "no elected cluster leader" in text
            or "not a swarm manager" in text)


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


# -- Docker's times ------------------------------------------------------------------
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
