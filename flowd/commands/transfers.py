"""Commands that bring files in: uploads (``flowctl submit`` sends the
workflow and every file it names, in chunks) and pushes (``flowctl push``
appends an item to a channel of a running run). Each upload and push is its
caller's alone, bounded and expiring (flowd/staging.py holds them); the
spool's free-space floor is checked before each begin and each chunk
(flowd/disk.py)."""
from __future__ import annotations

import logging
import time

from .. import owners
from ..errors import StorageError, UsageError
from ..staging import PUSH_FILE
from ..textsafe import for_log

from .runs import find_run

log = logging.getLogger("flowd")


def upload_begin(d, args, payload, **kw):
    size = args["size"]
    if size > d.cfg.max_upload_size:
        raise UsageError(f"upload_begin: argument 'size' is {size} bytes, more than this flowd "
                         f"takes at once ({d.cfg.max_upload_size} bytes: max_upload_size "
                         f"in {d.cfg.source or 'its config'})")
    d.disk.check_space(size + d.staging.pending())
    up = d.staging.begin(args["_caller"].uid, "upload", size, time.monotonic())
    return {"upload": up.id}


def upload_chunk(d, args, payload, **kw):
    up = d.staging.get(args["upload"], args["_caller"].uid, "upload")
    return {"received": _receive(d, up, args["path"], args["offset"], payload)}


def upload_files(d, args, payload, **kw):
    """Many small files of an upload, each whole, in one request: the data
    frame holds them one after another (``sizes``), so a workflow of 100,000
    small items is sent in a few hundred round trips, not 100,000."""
    up = d.staging.get(args["upload"], args["_caller"].uid, "upload")
    paths, sizes, data = args["paths"], args["sizes"], payload or b""
    if len(paths) != len(sizes) or sum(sizes) != len(data):
        raise UsageError(f"upload_files: {len(paths)} paths, {len(sizes)} sizes adding up to "
                         f"{sum(sizes)} bytes, and a data frame of {len(data)} bytes; they must "
                         "agree (one size per path, the files' bytes one after another)")
    if data:
        d.disk.check_space(len(data))
    view, at = memoryview(data), 0
    for rel, size in zip(paths, sizes):
        d.staging.write_whole(up, rel, bytes(view[at:at + size]))
        at += size
    return {"received": at}


def _receive(d, up, rel: str, offset: int, payload: bytes | None) -> int:
    data = payload or b""
    if data:
        d.disk.check_space(len(data))  # the floor, on every chunk
    return d.staging.write(up, rel, offset, data)


def push_begin(d, args, payload, **kw):
    run = find_run(d, args["run"])
    owners.check(run, args["_caller"], d.cfg.admin_group, "push to")  # before any space is used
    run.check_push(args["channel"])
    limit = d.cfg.max_upload_size
    size = args["size"]
    if size is not None and size > limit:
        raise UsageError(f"push_begin: argument 'size' is {size} bytes, more than this flowd "
                         f"takes at once ({limit} bytes: max_upload_size in "
                         f"{d.cfg.source or 'its config'})")
    d.disk.check_space((size or 0) + d.staging.pending())
    up = d.staging.begin(args["_caller"].uid, "push", limit if size is None else size,
                         time.monotonic(), declared=size is not None,
                         run=run.id, channel=args["channel"])
    return {"push": up.id, "run": run.id}


def push_chunk(d, args, payload, **kw):
    up = d.staging.get(args["push"], args["_caller"].uid, "push")
    return {"received": _receive(d, up, PUSH_FILE, args["offset"], payload)}


def push_end(d, args, payload, **kw):
    up = d.staging.get(args["push"], args["_caller"].uid, "push")
    run = find_run(d, args["run"])
    channel = args["channel"]
    if (run.id, channel) != (up.meta["run"], up.meta["channel"]):
        raise UsageError(f"push_end: this push was begun for channel {for_log(up.meta['channel'])} "
                         f"of run {up.meta['run']}, not {for_log(channel)} of {run.id}")
    if up.declared and up.received != up.size:
        raise UsageError(f"push_end: {up.received} bytes were received, {up.size} declared; "
                         "send the rest, or push again")
    try:
        seq = run.push(channel, d.staging.push_item(up), stamped=True)
    except OSError as e:
        raise StorageError(f"cannot store the pushed item: {e.strerror}") from None
    finally:
        d.staging.discard(up)
    log.info("run %s: item %d pushed to %s by %s", run.id, seq, for_log(channel),
             args["_caller"])
    return {"run": run.id, "channel": channel, "seq": seq}
