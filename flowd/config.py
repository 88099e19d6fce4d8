"""The daemon's configuration: TOML, ``/etc/flowd/flowd.toml`` by default.

Every key, its default and its meaning is in ``KEYS``; docs/config.md and
``flowd --print-config`` come from the same table, so they cannot drift.
"""
from __future__ import annotations

import grp
import os
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError
from .model import parse_size
from .protocol import DEFAULT_SOCKET

DEFAULT_CONFIG = "/etc/flowd/flowd.toml"
DEFAULT_SPOOL = "/var/spool/flowd"

# key: (default, help)
KEYS: dict[str, tuple[object, str]] = {
    "spool": (DEFAULT_SPOOL, "folder holding incoming/, rejected/ and runs/; one filesystem"),
    "socket": (DEFAULT_SOCKET, "path of the control socket (ipc://)"),
    "socket_group": ("", "group that may use the socket (empty: the daemon's own group)"),
    "socket_mode": ("0660", "file mode of the socket"),
    "max_containers": (0, "containers running at once, all runs together (0: number of cores)"),
    "pids_limit": (256, "process limit of each container"),
    "default_memory": ("", "memory limit for processes that set none, e.g. \"1g\" (empty: none)"),
    "max_output_size": ("", "largest output file a task may write, e.g. \"10g\" (empty: no limit)"),
    "cap_add": ([], "capabilities added back to every container (all are dropped by default)"),
    "log_level": ("info", "debug, info, warning or error"),
}


@dataclass
class Config:
    spool: str = DEFAULT_SPOOL
    socket: str = DEFAULT_SOCKET
    socket_group: str = ""
    socket_mode: int = 0o660
    max_containers: int = 0
    pids_limit: int = 256
    default_memory: int | None = None
    max_output_size: int | None = None
    cap_add: list[str] = field(default_factory=list)
    log_level: str = "info"
    source: str | None = None  # the file it came from

    @property
    def container_cap(self) -> int:
        return self.max_containers or (os.cpu_count() or 1)

    def socket_gid(self) -> int | None:
        if not self.socket_group:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise UsageError(f"{self.source}: socket_group: no group named "
                             f"{self.socket_group!r} on this machine") from None


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
            raise UsageError(f"{path}: {key} = {value!r} should be a {type(default).__name__} "
                             f"like {default!r}")
        try:
            if key == "socket_mode":
                value = int(value, 8)
            elif key in ("default_memory", "max_output_size"):
                value = parse_size(value) if value else None
            elif key in ("max_containers", "pids_limit") and value < 0:
                raise ValueError("must be 0 or more")
            elif key == "log_level" and value not in ("debug", "info", "warning", "error"):
                raise ValueError("must be debug, info, warning or error")
        except ValueError as e:
            raise UsageError(f"{path}: {key} = {value!r}: {e}") from None
        setattr(cfg, key, value)
    return cfg
