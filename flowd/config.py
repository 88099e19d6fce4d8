"""The daemon's configuration: TOML, ``/etc/flowd/flowd.toml`` by default.

Every key, its default and its meaning is in ``KEYS``; ``flowd --print-config``
prints it, and tests/test_service.py keeps systemd/flowd.toml (the packaged
/etc/flowd/flowd.toml) and the key table of docs/operations.md in sync with it.
"""
from __future__ import annotations

import fnmatch
import grp
import os
import re
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError
from .model import CONTAINERS, NETWORKS
from .units import parse_duration, parse_size
from .values import image_reference_problem
from .protocol import DEFAULT_SOCKET

DEFAULT_CONFIG = "/etc/flowd/flowd.toml"
DEFAULT_SPOOL = "/var/spool/flowd"

# key: (default, help)
KEYS: dict[str, tuple[object, str]] = {
    "spool": (DEFAULT_SPOOL, "folder holding incoming/, rejected/ and runs/; one filesystem"),
    "socket": (DEFAULT_SOCKET, "path of the control socket (ipc://)"),
    "socket_group": ("", "group that may use the socket (empty: the daemon's own group)"),
    "socket_mode": ("0660", "file mode of the socket"),
    "executor": ("docker", "where tasks run: \"docker\" (the local engine) or \"swarm\" (one-shot "
                           "jobs on the Docker Swarm this engine manages)"),
    "swarm_probe_image": ("busybox", "executor \"swarm\": the image of the job that checks each node "
                                     "sees the spool (it runs `touch`); it must be on every node or "
                                     "pullable there"),
    "max_containers": (0, "containers running at once, all runs together (0: number of cores)"),
    "pids_limit": (256, "process limit of each container"),
    "default_memory": ("", "memory limit for processes that set none, e.g. \"1g\" (empty: none)"),
    "max_memory": ("8g", "most memory a process may ask for, and the limit of processes that "
                         "set none when default_memory is empty (empty: no limit)"),
    "max_timeout": ("24h", "longest timeout a process may ask for, and the timeout of processes "
                           "that set none (empty: no limit)"),
    "max_output_size": ("", "largest output file a task may write, e.g. \"10g\" (empty: no limit)"),
    "max_split_lines": (10_000_000, "most items one output with split=\"lines\" may give (a file "
                                    "each: this bounds the inodes one task can take)"),
    "container_user": ("daemon", "who containers run as: \"daemon\" (flowd's own uid and gid), "
                                 "\"image\" (the image's USER) or \"UID[:GID]\""),
    "cap_add": ([], "capabilities added back to every container (all are dropped by default)"),
    "allowed_images": ([], "images a workflow may run: names or shell patterns like \"flowd/*\"; "
                           "no tag means :latest (empty: any image)"),
    "allowed_networks": (["none"], "networks a process may ask for: \"none\" (always allowed) "
                                   "and \"bridge\" (Docker's default network)"),
    "default_container": ("fresh", "how processes that set no container= run: \"fresh\" (a new "
                                   "container per task) or \"warm\" (kept containers)"),
    "warm_idle": ("2m", "how long an idle warm container is kept"),
    "warm_tasks": (1000, "tasks one warm container runs before it is replaced (0: no limit)"),
    "warm_read_only": (True, "warm containers get a read-only root file system (their /task and "
                             "/tmp are always writable); false if the image needs to write elsewhere"),
    "max_upload_size": ("64g", "largest file set one flowctl submit or push may send"),
    "min_free_space": ("256m", "free space the spool keeps: below it flowd pauses its runs and "
                               "refuses submissions and pushes, until space is freed"),
    "admin_group": ("", "group whose members may cancel, push to, resize, retry and delete anyone's "
                        "runs, as root may (empty: none; others may change only their own runs)"),
    "keep_finished": ("", "how long a finished run is kept before flowd deletes it, e.g. \"7d\" "
                          "or \"12h\" (empty: kept until `flowctl rm`)"),
    "cache_max_size": ("10g", "room the cache of process@cache=\"yes\" outputs may take, e.g. \"50g\"; "
                              "least recently used entries go first (empty: no bound)"),
    "log_level": ("info", "debug, info, warning or error"),
    "metrics_listen": ("", "serve the metrics at http://HOST:PORT/metrics, e.g. \"127.0.0.1:9464\" "
                           "(empty: not served; flowctl metrics prints them always); needs a restart"),
    "metrics_listen_public": (False, "let metrics_listen be an address that is not loopback "
                                     "(anyone who reaches it reads the metrics)"),
}


@dataclass
class Config:
    spool: str = DEFAULT_SPOOL
    socket: str = DEFAULT_SOCKET
    socket_group: str = ""
    socket_mode: int = 0o660
    admin_group: str = ""
    executor: str = "docker"
    swarm_probe_image: str = "busybox"
    max_containers: int = 0
    pids_limit: int = 256
    default_memory: int | None = None
    max_memory: int | None = 8 * 1024 ** 3
    max_timeout: float | None = 24 * 3600.0
    max_output_size: int | None = None
    max_split_lines: int = 10_000_000
    container_user: str = "daemon"
    cap_add: list[str] = field(default_factory=list)
    allowed_images: list[str] = field(default_factory=list)
    allowed_networks: list[str] = field(default_factory=lambda: ["none"])
    default_container: str = "fresh"
    warm_idle: float = 120.0
    warm_tasks: int = 1000
    warm_read_only: bool = True
    max_upload_size: int = 64 * 1024 ** 3
    min_free_space: int = 256 * 1024 * 1024
    log_level: str = "info"
    keep_finished: float | None = None  # seconds; None: forever
    cache_max_size: int | None = 10 * 1024 ** 3  # bytes; None: no bound (flowd/cache.py)
    metrics_listen: str = ""
    metrics_listen_public: bool = False
    source: str | None = None  # the file it came from
    file_values: dict = field(default_factory=dict)  # the keys as the file set them (for reload)

    @property
    def memory_for_unset(self) -> int | None:
        """The memory limit of a process that sets none."""
        return self.default_memory or self.max_memory

    def network_allowed(self, network: str) -> bool:
        return network == "none" or network in self.allowed_networks

    @property
    def container_cap(self) -> int:
        return self.max_containers or (os.cpu_count() or 1)

    def executor_settings(self):
        """What the executor follows (flowd.executor.base.Settings), from this config."""
        from .executor.base import Settings

        return Settings(max_containers=self.container_cap, cap_add=list(self.cap_add),
                        warm_idle=self.warm_idle, warm_tasks=self.warm_tasks,
                        warm_read_only=self.warm_read_only)

    def socket_gid(self) -> int | None:
        if not self.socket_group:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise UsageError(f"{self.source}: socket_group: no group named "
                             f"{self.socket_group!r} on this machine") from None

    def image_allowed(self, image: str) -> bool:
        """Whether ``allowed_images`` lets a process use ``image`` (empty list: any).

        Names compare with the tag made explicit (``busybox`` is
        ``busybox:latest``), so a pattern must match the tag too: ``flowd/*``
        allows every tag of every image under flowd/.
        """
        if not self.allowed_images:
            return True
        name = _with_tag(image)
        return any(fnmatch.fnmatchcase(name, _with_tag(p)) or fnmatch.fnmatchcase(image, p)
                   for p in self.allowed_images)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _with_tag(image: str) -> str:
    """``name`` -> ``name:latest``; a tag or digest already there stays."""
    if "@" in image or ":" in image.rsplit("/", 1)[-1] or image.endswith("*"):
        return image
    return image + ":latest"


def load(path: str | None, *, required: bool = False) -> Config:
    """Read the config; a missing default file means all defaults."""
    cfg = Config()
    path = path or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} does not exist") from None
        return cfg
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    cfg.source = path
    for key, value in data.items():
        if key not in KEYS:
            raise UsageError(f"{path}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
        default = KEYS[key][0]
        if type(value) is not type(default):
            kind = {int: "whole number", str: "string", list: "list", bool: "true or false"}.get(type(default), "value")
            raise UsageError(f"{path}: {key} = {value!r} should be a {kind} like "
                             f"{key} = {toml_value(default)}")
        try:
            if key == "socket_mode":
                value = int(value, 8)
            elif key in ("default_memory", "max_output_size", "max_memory", "cache_max_size"):
                value = parse_size(value) if value else None
            elif key == "max_upload_size":
                value = parse_size(value)
            elif key in ("max_timeout", "keep_finished"):
                value = parse_duration(value) if value else None
            elif key == "warm_idle":
                value = parse_duration(value)
            elif key == "executor" and value not in ("docker", "swarm"):
                raise ValueError('must be "docker" (the local engine) or "swarm" (Docker Swarm jobs)')
            elif key == "swarm_probe_image" and image_reference_problem(value) is not None:
                raise ValueError(f"it is not a Docker image reference: {image_reference_problem(value)}")
            elif key == "default_container" and value not in CONTAINERS:
                raise ValueError(f"must be one of {', '.join(map(repr, CONTAINERS))}")
            elif key == "container_user":
                check_container_user(value)
            elif key == "allowed_networks" and not all(x in NETWORKS for x in value):
                raise ValueError(f"each value must be one of {', '.join(map(repr, NETWORKS))}")
            elif key == "min_free_space":
                value = parse_size(value) if value not in ("", "0") else 0
            elif key in ("max_containers", "pids_limit", "warm_tasks") and value < 0:
                raise ValueError("must be 0 or more")
            elif key == "max_split_lines" and value < 1:
                raise ValueError("must be 1 or more")
            elif key == "admin_group" and value and not _group_exists(value):
                raise ValueError(f"no group named {value!r} on this machine (fix: create it, "
                                 "name another, or leave admin_group empty)")
            elif key == "log_level" and value not in ("debug", "info", "warning", "error"):
                raise ValueError("must be debug, info, warning or error")
            elif key in ("cap_add", "allowed_images") and not all(
                    isinstance(x, str) and x.strip() for x in value):
                raise ValueError("must be a list of non-empty strings")
        except ValueError as e:
            raise UsageError(f"{path}: {key} = {value!r}: {e}") from None
        setattr(cfg, key, value)
        cfg.file_values[key] = value
    if cfg.metrics_listen:
        from .metrics import parse_listen

        try:
            parse_listen(cfg.metrics_listen, cfg.metrics_listen_public)
        except ValueError as e:
            raise UsageError(f"{path}: metrics_listen = {cfg.metrics_listen!r}: {e}") from None
    if cfg.default_memory and cfg.max_memory and cfg.default_memory > cfg.max_memory:
        raise UsageError(f"{path}: default_memory ({cfg.default_memory} bytes) is more than "
                         f"max_memory ({cfg.max_memory} bytes); lower the one or raise the other")
    return cfg


_USER_ID = re.compile(r"^(\d{1,10})(?::(\d{1,10}))?$")


def check_container_user(value: str) -> None:
    """``daemon``, ``image`` or ``UID[:GID]`` (numbers below 2**32 - 1), else ValueError."""
    if value in ("daemon", "image"):
        return
    m = _USER_ID.match(value)
    if not m or any(g is not None and int(g) >= 2 ** 32 - 1 for g in m.groups()):
        raise ValueError('must be "daemon" (flowd\'s own uid), "image" (the image\'s USER) '
                         'or numbers "UID" or "UID:GID", e.g. "1000:1000"')


def toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)
