"""Config reload: SIGHUP (``systemctl reload flowd``) re-reads the config file."""
from __future__ import annotations

import logging

from .config import DEFAULT_CONFIG, KEYS, Config, load
from .errors import FlowError

log = logging.getLogger("flowd")


def reload(d) -> None:
    """SIGHUP (``systemctl reload flowd``): re-read the config file, apply what can change live.

    Live: max_containers, pids_limit, default_memory, max_memory and
    max_timeout (their defaults for containers started, their caps for
    workflows submitted from now on), max_output_size and max_split_lines
    (runs opened from now on), container_user and cap_add (containers started from now on),
    allowed_images and allowed_networks (workflows submitted from now on),
    max_upload_size (uploads begun from now on), min_free_space and
    log_level. spool,
    socket, socket_group and socket_mode need a restart: a change is logged,
    not applied. An invalid file changes nothing. Options given on the command
    line (--spool, --socket, --log-level) keep winning over the file.
    Runs and containers are not touched.
    """
    path = d.cfg.source or DEFAULT_CONFIG
    d.notifier.send("RELOADING=1", f"STATUS=reloading {path}")
    try:
        new = load(path, required=d.cfg.source is not None)
        new.socket_gid()  # a group that does not exist would stop the next start
    except FlowError as e:
        log.error("reload: %s; the configuration in use is unchanged", e)
        d.notifier.send("READY=1", f"STATUS={d.status_line()}")
        return
    old = d.cfg
    before = {k: getattr(old, k) for k in KEYS}
    # a key whose value differs from what the file said was set on the command line
    from_file = Config()
    for key, value in old.file_values.items():
        setattr(from_file, key, value)
    pinned = {k for k in ("spool", "socket", "log_level") if getattr(old, k) != getattr(from_file, k)}
    for key in ("spool", "socket", "socket_group", "socket_mode", "executor", "swarm_probe_image",
                "metrics_listen", "metrics_listen_public"):
        if getattr(new, key) != getattr(from_file, key) and key not in pinned:
            log.warning("reload: %s changed in %s; it takes effect only when flowd restarts "
                        "(systemctl restart flowd; a new spool also needs ReadWritePaths=)", key, path)
    live = ("max_containers", "pids_limit", "default_memory", "max_memory", "max_timeout",
            "max_output_size", "max_split_lines", "container_user", "cap_add", "default_container",
            "warm_idle", "warm_tasks", "warm_read_only", "allowed_images",
            "allowed_networks", "max_upload_size", "min_free_space", "log_level", "keep_finished",
            "cache_max_size")
    for key in live:
        if key not in pinned:
            setattr(old, key, getattr(new, key))
    old.file_values = new.file_values
    old.source = new.source or old.source
    d.limits.pids_limit = old.pids_limit
    d.limits.default_memory = old.memory_for_unset
    d.limits.reserved_memory = old.default_memory
    d.limits.default_timeout = old.max_timeout
    d.limits.container_user = old.container_user
    d.limits.default_container = old.default_container
    d.limits.max_output_bytes = old.max_output_size
    d.limits.max_split_items = old.max_split_lines
    if d.executor is not None:
        d.executor.reconfigure(old.executor_settings())
    if d.cache is not None:
        d.cache.max_size = old.cache_max_size
        d.cache.evict()
    logging.getLogger().setLevel(getattr(logging, old.log_level.upper()))
    changed = [k for k in live if getattr(old, k) != before[k]]
    log.info("reload: configuration re-read from %s; %s", path,
             "changed: " + ", ".join(f"{k}={getattr(old, k)!r}" for k in changed) if changed
             else "no live setting changed")
    d.notifier.send("READY=1", f"STATUS={d.status_line()}")
