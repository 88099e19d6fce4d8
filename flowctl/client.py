"""The flowctl side of the control protocol: one DEALER, one request at a time.

It tells apart the three ways a daemon can be out of reach (docs/flowctl.md, exit
status 3): no socket file (flowd is not running), a socket nobody listens on
(a stale file: flowd died), and a daemon that does not answer in time.

A daemon that stops while a request waits for its answer is seen at once: a
ZeroMQ monitor reports the connection's end, and the call raises
``DaemonStopped`` instead of waiting out its timeout. ``reconnect`` then
waits for a daemon to listen again (a restart), so that a caller whose
request is safe to repeat (``status``) can go on.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import threading
import time

from flowd import protocol as P
from flowd.errors import DaemonUnreachable, FlowError, ProtocolError, UsageError

START_HINT = "start it with `systemctl start flowd`, or run `flowd --socket {path}` in another terminal"
POLL_SLICE = 0.25  # seconds a wait for the daemon polls before Python runs pending signal handlers


# Files of at most BATCH_FILE_BYTES are uploaded many to a request (upload_files):
# at most BATCH_FILES of them, CHUNK bytes and BATCH_PATH_CHARS of paths.
BATCH_FILE_BYTES = 64 * 1024
BATCH_FILES = 500
BATCH_PATH_CHARS = 64 * 1024
UPLOAD_WINDOW = 2  # batches in flight at once


class _LazyZmq:
    """``zmq``, imported at its first use: ``call_once`` (flowctl status) does
    without it, and its import is the biggest part of flowctl's start."""

    def __getattr__(self, name: str):
        import zmq as module

        globals()["zmq"] = module
        return getattr(module, name)


zmq = _LazyZmq()


class NotRunning(DaemonUnreachable):
    """No daemon listens: no socket file, or a file nobody listens on."""


class DaemonStopped(DaemonUnreachable):
    """The daemon closed the connection while a request waited for its answer."""


class LocalFileError(FlowError):
    """A local file flowctl was given (push) or writes (pull) is not usable (exit 1)."""

    code = "local_file"


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float = 10.0):
        self.path = P.socket_path(socket_path)
        self.timeout = timeout
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.pending: tuple[str, int] | None = None  # a patient request sent: (its id, daemon pid)
        self.reached = False  # a daemon listened to this client once

    def _connect(self) -> zmq.Socket:
        if self._sock is not None:
            return self._sock
        path, hint = self._check_path()
        self._probe(path, hint)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a send with no live peer fails instead of queueing
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
        # Before connect, so that no event is missed: the end of the connection
        # tells a daemon that stopped from one that is slow.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(P.endpoint(path))
        self._sock = sock
        self.reached = True
        return sock

    def _check_path(self) -> tuple[str, str]:
        """The socket's path and how to start flowd; NotRunning or
        DaemonUnreachable if there is no file or it may not be used."""
        path = self.path
        hint = START_HINT.format(path=path)
        if not os.path.exists(path):
            folder = os.path.dirname(path) or "."
            if os.path.isdir(folder) and not os.access(folder, os.X_OK):
                raise DaemonUnreachable(f"permission denied on {folder}: you may not reach the "
                                        f"socket {path}")
            raise NotRunning(f"flowd is not running: there is no socket at {path} ({hint})")
        if not os.access(path, os.R_OK | os.W_OK):
            raise DaemonUnreachable(
                f"permission denied on {path}: only the socket's group may talk to flowd "
                "(ask an administrator to add you to it, e.g. `adduser $USER flowd`)")
        return path, hint

    def reconnect(self, within: float) -> None:
        """After ``DaemonStopped``: wait up to ``within`` seconds for a daemon
        to listen on the socket again (a restart); ``NotRunning`` if none does."""
        self.close()
        deadline = time.monotonic() + within
        while True:
            try:
                self._connect()
                return
            except NotRunning as e:
                if time.monotonic() >= deadline:
                    raise NotRunning(f"{e}; it did not come back within {within:g}s") from None
            self.close()
            time.sleep(0.2)

    def call(self, cmd: str, args: dict | None = None, payload: bytes | None = None,
             timeout: float | None = None) -> tuple[dict, bytes | None]:
        sock = self._connect()
        req_id = self._send(sock, cmd, args, payload)
        wait = self.timeout if timeout is None else timeout
        reply = self._receive(sock, {req_id}, time.monotonic() + wait)
        if reply is None:
            raise self._no_answer(wait)
        _, result, data = P.decode_reply(reply)
        return result, data

    def call_once(self, cmd: str, args: dict | None = None) -> dict:
        """``call`` for a one-shot request (one message out, one back, within
        ``timeout``), on a connection of its own without ZeroMQ (flowctl/zmtp.py):
        flowctl starts ~20 ms faster. The same errors as ``call``."""
        if self._sock is not None:
            return self.call(cmd, args)[0]
        from . import zmtp

        path, hint = self._check_path()
        conn = self._probe(path, hint, keep=True)
        if conn is None:  # an error the probe does not name: ZeroMQ's call says what it is
            return self.call(cmd, args)[0]
        self.reached = True
        req_id = P.new_id()
        frames = P.encode_request(req_id, cmd, args or {})
        if sum(len(f) for f in frames) > P.MAX_MESSAGE:
            raise ProtocolError(f"message over {P.MAX_MESSAGE} bytes; this is a flowctl bug")
        try:
            reply = zmtp.exchange(conn, frames, time.monotonic() + self.timeout,
                                  lambda r: P.reply_id(r) == req_id)
        except (TimeoutError, BlockingIOError):
            raise self._no_answer(self.timeout) from None
        except (zmtp.Closed, BrokenPipeError, ConnectionResetError):
            raise self._closed() from None
        except zmtp.BadPeer as e:
            raise DaemonUnreachable(f"cannot talk to flowd at {path}: {e}") from None
        finally:
            conn.close()
        return P.decode_reply(reply)[1]

    def call_patiently(self, cmd: str, args: dict, limit: float) -> dict:
        """A request the daemon may take minutes to answer (``submit``): wait
        up to ``limit`` seconds, as long as the daemon (the same process)
        answers a ping every ``timeout`` seconds meanwhile."""
        self.send_patiently(cmd, args)
        return self.await_patiently(cmd, limit)

    def send_patiently(self, cmd: str, args: dict) -> None:
        """Send ``cmd``; from the moment ``pending`` is set it may have gone."""
        sock = self._connect()
        pid = self.call("ping")[0]["pid"]
        req_id = P.new_id()
        self.pending = (req_id, pid)
        self._send(sock, cmd, args, None, req_id)

    def await_patiently(self, cmd: str, limit: float) -> dict:
        """The answer to the ``pending`` request, waiting as ``call_patiently`` says."""
        assert self.pending is not None
        req_id, pid = self.pending
        sock = self._connect()
        check = "see `flowctl status` whether it was done, and try again if not"
        deadline = time.monotonic() + limit
        try:
            while True:
                reply = self._receive(sock, {req_id}, min(deadline, time.monotonic() + self.timeout))
                if reply is None:
                    if time.monotonic() >= deadline:
                        raise self._no_answer(limit)
                    ping_id = self._send(sock, "ping", {}, None)
                    reply = self._receive(sock, {req_id, ping_id}, time.monotonic() + self.timeout)
                    if reply is None:
                        raise self._no_answer(self.timeout)
                    if P.reply_id(reply) == ping_id:
                        if P.decode_reply(reply)[1].get("pid") != pid:
                            raise DaemonUnreachable(
                                f"flowd restarted before it answered {cmd}; {check}")
                        continue
                self.pending = None
                return P.decode_reply(reply)[1]
        except DaemonStopped:
            raise DaemonStopped(f"flowd stopped before it answered {cmd}; {check}") from None

    def _send(self, sock: zmq.Socket, cmd: str, args: dict | None, payload: bytes | None,
              req_id: str | None = None) -> str:
        req_id = req_id or P.new_id()
        frames = P.encode_request(req_id, cmd, args or {}, payload)
        if sum(len(f) for f in frames) > P.MAX_MESSAGE:
            raise ProtocolError(f"message over {P.MAX_MESSAGE} bytes; this is a flowctl bug")
        # A connection that ended before this send (ZeroMQ may have reconnected
        # since) loses nothing of this request: forget its event.
        while self._monitor is not None and self._monitor.poll(0):
            self._monitor.recv_multipart()
        try:
            sock.send_multipart(frames)
        except zmq.Again:  # no live connection (IMMEDIATE) for --timeout seconds
            raise self._stopped_or_slow() from None
        except zmq.ZMQError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise DaemonUnreachable(f"permission denied on {self.path}") from None
            raise DaemonUnreachable(f"cannot reach flowd at {self.path}: {e}") from None
        return req_id

    def _receive(self, sock: zmq.Socket, ids: set[str], deadline: float) -> list[bytes] | None:
        """The first reply to one of ``ids`` before ``deadline``, or None;
        ``DaemonStopped`` as soon as the daemon closes the connection."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # In slices: a Ctrl-C the kernel delivers to one of libzmq's threads does
            # not interrupt this poll, and Python runs its handler only once the
            # poll returns (a Ctrl-C was then noticed only at the timeout).
            ready = dict(poller.poll(int(min(left, POLL_SLICE) * 1000) + 1))
            if sock in ready:
                reply = sock.recv_multipart()
                if P.reply_id(reply) in ids:
                    return reply
                continue  # a late answer to an earlier request
            if self._monitor is not None and self._monitor in ready:
                if _monitor_event(self._monitor.recv_multipart()) == zmq.EVENT_DISCONNECTED:
                    self.close()
                    raise self._closed()

    def _closed(self) -> DaemonStopped:
        return DaemonStopped(f"flowd stopped: it closed the connection on {self.path} "
                             "before it answered")

    def _stopped_or_slow(self) -> DaemonUnreachable:
        """A send that could not go: ``DaemonStopped`` if nothing listens on
        the socket now (no file, or refused), else a slow daemon."""
        ended = not os.path.exists(self.path)
        if not ended:
            try:
                self._probe(self.path, "")
            except NotRunning:
                ended = True
            except DaemonUnreachable:
                pass
        if ended:
            self.close()
            return DaemonStopped(f"flowd stopped: nothing listens on {self.path} any more")
        return self._no_answer(self.timeout)

    def _no_answer(self, wait: float) -> DaemonUnreachable:
        return DaemonUnreachable(
            f"flowd at {self.path} did not answer within {wait:g}s: it is running but busy or "
            "stuck; try again, raise --timeout, or see its log (`journalctl -u flowd`)")

    @staticmethod
    def _probe(path: str, hint: str, keep: bool = False):
        """A plain connect tells a stale socket file (refused) from a live daemon.
        With ``keep``, the connected socket (None if the connect failed otherwise)."""
        import _socket  # the C module alone: socket.py costs ~2 ms more to import on every call

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(2.0)
            s.connect(path)
            if keep:
                s, kept = None, s
                return kept
        except ConnectionRefusedError:
            raise NotRunning(
                f"flowd is not running: nothing listens on {path} (a socket file left by a "
                f"daemon that stopped); {hint}") from None
        except PermissionError:
            raise DaemonUnreachable(f"permission denied on {path}: only the socket's group may "
                                    "talk to flowd") from None
        except OSError:
            pass  # let ZeroMQ have its say
        finally:
            if s is not None:
                s.close()
        return None

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = self._monitor = None

    # -- file transfer ---------------------------------------------------
    def upload(self, files: list[tuple[str, str]]) -> str:
        """Send (name in bundle, local path) pairs in chunks; returns the upload id.

        Small files go many to a request (``upload_files``), and up to
        ``UPLOAD_WINDOW`` such requests are in flight at once: the next batch is
        read here while the daemon writes the last one. Big files go a chunk at
        a time (``upload_chunk``)."""
        sizes = [os.path.getsize(local) for _, local in files]
        upload = self.call("upload_begin", {"size": sum(sizes)})[0]["upload"]
        batch: list[tuple[str, bytes]] = []  # small files, sent many to a request
        batch_bytes = batch_chars = 0
        inflight: list[str] = []  # request ids of batches sent, oldest first
        for (name, local), size in zip(files, sizes):
            if size <= BATCH_FILE_BYTES:
                data = _read_small(local)
                if len(data) <= BATCH_FILE_BYTES:
                    if len(batch) >= BATCH_FILES or batch_bytes + len(data) > P.CHUNK \
                            or batch_chars + len(name) > BATCH_PATH_CHARS:
                        self._upload_files(upload, batch, inflight)
                        batch, batch_bytes, batch_chars = [], 0, 0
                    batch.append((name, data))
                    batch_bytes += len(data)
                    batch_chars += len(name) + 8
                    continue
            with open(local, "rb") as f:
                offset = 0
                while True:
                    chunk = f.read(P.CHUNK)
                    if not chunk and offset:
                        break
                    self.call("upload_chunk", {"upload": upload, "path": name, "offset": offset}, chunk)
                    offset += len(chunk)
                    if not chunk:
                        break
        if batch:
            self._upload_files(upload, batch, inflight)
        while inflight:
            self._answer(inflight.pop(0))
        return upload

    def _upload_files(self, upload: str, batch: list[tuple[str, bytes]], inflight: list[str]) -> None:
        sock = self._connect()
        inflight.append(self._send(sock, "upload_files", {
            "upload": upload, "paths": [n for n, _ in batch], "sizes": [len(d) for _, d in batch]},
            b"".join(d for _, d in batch)))
        while len(inflight) >= UPLOAD_WINDOW:
            self._answer(inflight.pop(0))  # the daemon answers in order

    def _answer(self, req_id: str) -> dict:
        """The answer to request ``req_id``, sent earlier (the error it carries is raised)."""
        reply = self._receive(self._connect(), {req_id}, time.monotonic() + self.timeout)
        if reply is None:
            raise self._no_answer(self.timeout)
        return P.decode_reply(reply)[1]

    def pull(self, run: str, channel: str, out: str):
        """Yield (item, local file) for each item of the channel, oldest first,
        once it is written into ``out``: many small items come in one answer
        (``pull``), bigger ones are read a chunk at a time (``download``). The
        items are those in the channel when the pull began. While a batch of
        small items is written the next one is asked for already."""
        args = {"run": run, "channel": channel, "after": 0, "upto": 0}
        req = self._send(self._connect(), "pull", args, None)
        while True:
            reply = self._receive(self._connect(), {req}, time.monotonic() + self.timeout)
            if reply is None:
                raise self._no_answer(self.timeout)
            _, result, data = P.decode_reply(reply)
            run, items, data = result["run"], result["items"], data or b""
            if items and sum(i["size"] for i in items if i["inline"]) > len(data):
                raise ProtocolError("flowd sent fewer bytes than its pull answer lists; "
                                    "this is a flowd bug")
            more = not result["done"] and bool(items)
            if more:
                args.update(run=run, after=items[-1]["seq"], upto=result["upto"])
                if all(i["inline"] for i in items):  # nothing else to ask meanwhile
                    req = self._send(self._connect(), "pull", args, None)
                    more = False
            at, k = 0, 0
            while k < len(items):
                done = []
                with _signals_held():  # small items: each made whole, or not begun
                    while k < len(items) and items[k]["inline"]:
                        item, size = items[k], items[k]["size"]
                        dest = os.path.join(out, _item_name(item))
                        _write_small(dest, data[at:at + size])
                        at += size
                        k += 1
                        done.append((dict(item, run=run), dest))
                yield from done
                if k < len(items):
                    item = items[k]
                    dest = os.path.join(out, _item_name(item))
                    size = self.download(run, channel, item["seq"], dest)
                    k += 1
                    yield dict(item, run=run, size=size), dest
            if more:
                req = self._send(self._connect(), "pull", args, None)
            elif result["done"] or not items:
                return

    def download(self, run: str, channel: str, seq: int, dest: str) -> int:
        """Write one item to ``dest`` (``_write_new``); returns its size."""
        def fill(f) -> int:
            size = 0
            while True:
                _, data = self.call("read", {"run": run, "channel": channel, "seq": seq,
                                             "offset": size, "length": P.CHUNK})
                if not data:
                    break
                f.write(data)
                size += len(data)
                if len(data) < P.CHUNK:
                    break
            return size

        return _write_new(dest, fill)

    def push(self, run: str, channel: str, src) -> dict:
        """Stream ``src`` (a binary file object) as one new item; durable when this returns."""
        args = {"run": run, "channel": channel}
        size = _regular_size(src)
        if size is not None:
            # declared: flowd checks its free-space floor for the whole item at once
            args["size"] = size
        begin = self.call("push_begin", args)[0]
        offset = 0
        while True:
            want = P.CHUNK if size is None else min(P.CHUNK, size - offset)
            chunk = src.read(want) if want > 0 else b""
            if not chunk:
                break
            self.call("push_chunk", {"push": begin["push"], "offset": offset}, chunk)
            offset += len(chunk)
        return self.call("push_end", {"push": begin["push"], "run": begin["run"],
                                      "channel": channel})[0]

    def copy_log(self, run: str, name: str, offset: int, out) -> int:
        """Write a task log from ``offset`` to ``out``; returns the bytes written."""
        n = 0
        while True:
            _, data = self.call("read_log", {"run": run, "name": name, "offset": offset + n})
            if not data:
                return n
            out.write(data)
            n += len(data)
            if len(data) < P.CHUNK:
                return n


def _read_small(path: str) -> bytes:
    """A small file's bytes (at most BATCH_FILE_BYTES + 1 of them)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return os.read(fd, BATCH_FILE_BYTES + 1)
    finally:
        os.close(fd)


def _monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ monitor message (its first frame: a 16-bit
    event, then a 32-bit value). zmq.utils.monitor does this too, but importing
    it imports asyncio: a fifth of flowctl's start-up."""
    return int.from_bytes(frames[0][:2], sys.byteorder) if frames and len(frames[0]) >= 2 else 0


def _copy(src, dst) -> None:
    while True:
        data = src.read(P.CHUNK)
        if not data:
            return
        dst.write(data)


def _item_name(item: dict) -> str:
    name = item.get("name")
    if not isinstance(name, str) or not name or "/" in name or "\0" in name \
            or name in (".", ".."):
        raise FlowError(f"flowd gave the item {item.get('seq')!r} the name {name!r}, which is "
                        "not a plain file name; this is a flowd bug")
    return name


_TMPFILE_LINKS = True  # an unnamed file can be linked in (O_TMPFILE and /proc): not known to fail


def _write_new(dest: str, fill):
    """Write a file at ``dest`` whole or not at all: ``fill(f)`` writes it.

    The file is made unnamed in ``dest``'s folder (O_TMPFILE) and linked in
    once complete, so a pull that stops half-way, however it stops (Ctrl-C,
    the daemon gone, a kill), leaves no partial file behind. Where the
    filesystem has no O_TMPFILE (or it cannot be linked in through /proc)
    it is written as ``dest.HEX.part`` and renamed, and the ``.part`` is removed
    on any error, Ctrl-C, or SIGTERM/SIGHUP (``flowctl pull`` makes those an
    interruption); only a kill -9 then can leave one.

    ``--out`` may be a shared folder, so nothing there is followed: a name
    is only ever made new (link(2), or O_CREAT|O_EXCL|O_NOFOLLOW, under a
    random ``dest.HEX.part``: whatever someone put there is never opened), and
    a symbolic link at ``dest`` is refused (a link or rename replaces a name,
    never writes through one). An existing ``dest`` is replaced by a rename.
    Returns what ``fill`` returned.
    """
    global _TMPFILE_LINKS
    folder = os.path.dirname(dest) or "."
    cloexec = getattr(os, "O_CLOEXEC", 0)
    if not _TMPFILE_LINKS or not hasattr(os, "O_TMPFILE"):
        return _write_part(dest, fill)
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | cloexec, 0o666)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise LocalFileError(f"cannot write in {folder}: {e.strerror}") from None
        _TMPFILE_LINKS = False
        return _write_part(dest, fill)
    with os.fdopen(fd, "w+b") as f:
        result = fill(f)
        f.flush()
        _refuse_link(dest)
        try:
            try:
                os.link(f"/proc/self/fd/{fd}", dest, follow_symlinks=True)
            except FileExistsError:  # replace the old file: a new random name, renamed over it
                _link_over(f"/proc/self/fd/{fd}", dest)
        except LocalFileError:
            raise
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EOPNOTSUPP):
                raise LocalFileError(f"cannot write {dest}: {e.strerror}") from None
            # No link from /proc here (some sandboxes, no /proc): NAME.part from now on.
            _TMPFILE_LINKS = False
            f.seek(0)
            _write_part(dest, lambda part: _copy(f, part))
    return result


def _write_small(dest: str, data: bytes) -> None:
    """Write a small item (in memory) at ``dest``, with Ctrl-C, SIGTERM and
    SIGHUP held back by the caller: made new under its own name, in one
    write (no temporary name to rename: half the file creations of a pull of
    100,000 items), and removed again if that write fails. A file already at
    ``dest`` is replaced as ``_write_new`` does; a link there is refused."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(dest, flags, 0o666)
    except FileExistsError:
        _write_new(dest, lambda f: f.write(data))
        return
    except OSError as e:
        raise LocalFileError(f"cannot write {dest}: {e.strerror}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException as e:
        os.close(fd)
        _quiet_unlink(dest)  # ours: made by the O_EXCL open above
        if isinstance(e, OSError):
            raise LocalFileError(f"cannot write {dest}: {e.strerror}") from None
        raise
    os.close(fd)


def _link_over(src: str, dest: str) -> None:
    """Link ``src`` in place of the file ``dest``: as a new random
    ``dest.HEX.part`` (someone else's is never touched), renamed over it."""
    for _ in range(100):
        part = f"{dest}.{os.urandom(6).hex()}.part"
        try:
            os.link(src, part, follow_symlinks=True)
            break
        except FileExistsError:
            continue
    else:
        raise LocalFileError(f"cannot find a free temporary name beside {dest}")
    try:
        os.replace(part, dest)
    except BaseException:
        _quiet_unlink(part)  # ours: made by the link above
        raise


def _write_part(dest: str, fill):
    """Write ``dest`` as a new ``dest.HEX.part`` (a random name: one someone
    else put there is never opened), renamed over ``dest`` when whole."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    made = False
    part = dest + ".part"
    try:
        # A Ctrl-C (SIGTERM, SIGHUP) waits until the .part is known to be ours,
        # so that the cleanup below always sees what it must remove.
        with _signals_held():
            for _ in range(100):
                part = f"{dest}.{os.urandom(6).hex()}.part"
                try:
                    fd = os.open(part, flags, 0o666)
                    break
                except FileExistsError:
                    continue  # someone else's: never opened
                except OSError as e:
                    raise LocalFileError(f"cannot write {part}: {e.strerror}") from None
            else:
                raise LocalFileError(f"cannot find a free temporary name beside {dest}")
            made = True
        with os.fdopen(fd, "wb") as f:
            result = fill(f)
        _refuse_link(dest)
        try:
            os.replace(part, dest)
        except OSError as e:
            raise LocalFileError(f"cannot write {dest}: {e.strerror}") from None
    except BaseException:
        if made:
            _quiet_unlink(part)  # ours: made by the O_EXCL open above
        raise
    return result


class _signals_held:
    """Hold SIGINT, SIGTERM and SIGHUP back (on the main thread) for a few
    syscalls: they are delivered when the block ends."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


def _refuse_link(dest: str) -> None:
    if os.path.islink(dest):
        raise LocalFileError(f"{dest} is in the way: {_what_is(dest)}; flowctl does not "
                             "replace a symbolic link (fix: remove it, or pull into "
                             "another --out folder)")


def _quiet_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _regular_size(src) -> int | None:
    """The size of a regular file being pushed (None for a pipe or stdin)."""
    import stat

    try:
        st = os.fstat(src.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        return st.st_size - src.tell()
    except (OSError, ValueError):
        return None


def _what_is(path: str) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return "something that came and went"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a symbolic link to {target}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return "a file (left by an interrupted pull, or someone else's)"
    return "a special file"


def check_out_dir(path: str) -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    return path
