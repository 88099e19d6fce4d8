"""The staging boxes: taking a drop exactly once, its markers, recovery, rejecting (docs/spool.md).

The loop (flowd/intake.py) notices drops (flowd/dropwatch.py); this is what
happens to a drop after that, the protocol that makes it one run or one
rejection whatever the moment of a crash. ``Staging``'s methods run on the
intake's worker thread; they hand back to the loop through ``post``.

Taking a drop (never losing it, never making two runs of it)
    The loop only notices a drop and picks the id its run will have (RUN);
    everything slow (moving, copying up to 1 GiB, the reject and clean-up
    steps) is done by the intake's one worker thread, and validation and run
    creation by ``Creator.submit_bundle`` on its own thread, as for a
    client's ``flowctl submit``. Every change goes through ``Durable`` (the
    daemon's ``fs``), so the crash tests see each step.

    1. ``mkdir staging/ID/d``, then ``rename(incoming/NAME,
       staging/ID/d/NAME)``: first of all, so the user can no longer reach it
       by path. staging/ is the daemon's (0700) and on the spool's
       filesystem. Nothing is opened before this, and nothing of the drop is
       ever opened through a symbolic link.
    2. A private *bundle* staging/ID/bundle/ is built from the drop
       (flowd/dropbundle.py: scratch, rebuilt from the drop after a crash;
       walked with directory fds, never through a link; links, devices,
       other owners' files and drops over the limits are refused).
    3. The marker staging/ID/submitting is written durably, holding RUN;
       then, on the loop, ``submit(bundle, source, user, reply=CALLBACK,
       run_id=RUN)`` (``Creator.submit_bundle``) makes runs/RUN off the loop
       (via runs/.new-RUN, renamed into place last) and calls CALLBACK on the
       loop with (result, error). The original in staging/ID/d/ is untouched.
    4. Success: staging/ID is renamed to staging/.done-ID and removed.
       Failure (WorkflowError, any FlowError, any bug): the marker
       staging/ID/rejecting (the name chosen in rejected/ and the error
       text) is written durably, then ``rejected/NAME.error``, then the
       original is renamed to ``rejected/NAME`` (``NAME.1``, ``NAME.2``... on
       a clash), then staging/ID is retired as above.

    Recovery (start-up takes every staging/ID again, on the worker) is exact:
    a box with ``rejecting`` redoes step 4's rejection with the same name and
    text; one with ``submitting`` holding RUN is just retired if runs/RUN
    exists (the run is whole: it appears by one rename), and otherwise is
    submitted again *as RUN* (the daemon removed any runs/.new-RUN before);
    one without a marker was never submitted and is taken from step 2. So a
    crash at any point makes a drop exactly one run, or one rejection.

    A drop that cannot even be moved out of incoming/ (a folder of another
    user without group write permission, another filesystem) stays there with
    a ``rejected/NAME.error`` saying why; it is tried again once it changes
    (its ctime: e.g. ``chmod g+w``; the loop's watch keeps it aside until then).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import stat
import time
from typing import Callable

from .dropbundle import Refused, user_name
from .errors import FlowError, StorageError, WorkflowError
from .fsops import Durable
from .store import read_meta

log = logging.getLogger("flowd.intake")  # the intake's one logger, whichever module speaks

MARKER = "submitting"  # holds the id the drop's run gets: written before it is submitted
REJECTING = "rejecting"  # {"target", "text"}: written before a drop is moved to rejected/
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")


class Staging:
    """The worker's side of taking a drop: staging/ID from the move to the retirement.

    The intake gives it ``post(fn)`` (run ``fn`` on the loop) and what the loop
    is told: ``on_moved(name, rid)`` (out of incoming/), ``on_stuck(name, key,
    error_path)`` (it cannot be moved out) and ``on_ready(box, name, st, user,
    source, rid)`` (the bundle and marker are made: submit it); and
    ``build(staged, st, bundle, name)`` and ``rename(src, dst)``, the
    intake's, which tests watch.
    """

    def __init__(self, spool: str, fs: Durable, *, post: Callable[[Callable[[], None]], None],
                 on_moved: Callable[..., None], on_stuck: Callable[..., None],
                 on_ready: Callable[..., None], build: Callable[..., None],
                 rename: Callable[[str, str], None]):
        self.incoming = os.path.join(spool, "incoming")
        self.rejected = os.path.join(spool, "rejected")
        self.staging = os.path.join(spool, "staging")
        self.runs_dir = os.path.join(spool, "runs")
        self.fs = fs
        self._post = post
        self._on_moved, self._on_stuck, self._on_ready = on_moved, on_stuck, on_ready
        self._build = build
        self._rename = rename

    # -- taking: steps 1 to 4 ------------------------------------------------------
    def take(self, name: str, st: os.stat_result, key: tuple, rid: str) -> bool:
        """Worker: move the drop into a new staging/ID/d/, then process it."""
        fs = self.fs
        box = os.path.join(self.staging, secrets.token_hex(8))
        fs.mkdir(box, 0o700)
        fs.mkdir(os.path.join(box, "d"), 0o700, sync_parent=False)
        src, dst = os.path.join(self.incoming, name), os.path.join(box, "d", name)
        fs.point("rename", dst)
        try:
            os.rename(src, dst)  # not fs.rename: the errno says what to tell the user
        except OSError as e:
            fs.rmtree(box)  # holds nothing of the user's
            if e.errno != errno.ENOENT:
                error_path = self._cannot_take(name, st, e)
                self._post(lambda: self._on_stuck(name, key, error_path))
            return False
        fs.fsync_dir(os.path.join(box, "d"))
        fs.fsync_dir(self.incoming)
        self._post(lambda: self._on_moved(name, rid))
        return self.process(box, name, rid)

    def _cannot_take(self, name: str, st: os.stat_result, e: OSError) -> str | None:
        """Worker: the drop cannot be moved out of incoming/: say why (its .error path)."""
        user = user_name(st.st_uid)
        lines = [f"{name}: flowd cannot move it out of {self.incoming}: {e.strerror}"]
        if e.errno in (errno.EACCES, errno.EPERM) and stat.S_ISDIR(st.st_mode):
            lines.append(f"{name}: a folder is moved, and moving a folder needs write permission on "
                         "it: make it writable by the flowd group (chmod -R g+w, or write it with "
                         "umask 002); flowd takes it as soon as it changes")
        elif e.errno in (errno.EACCES, errno.EPERM):
            lines.append(f"{name}: incoming/ must be writable by flowd (and, if it is sticky, "
                         "owned by flowd)")
        elif e.errno == errno.EXDEV:
            lines.append(f"{name}: incoming/ must be on the same filesystem as the rest of the spool")
        lines.append(f"The drop is left in {self.incoming}.")
        error_path = None
        try:
            target = self._rejected_name(name)
            error_path = os.path.join(self.rejected, target + ".error")
            self.fs.write_file(error_path, self._error_text(name, user, lines, resubmit=False)
                               .encode("utf-8", "replace"), mode=0o644)
        except (OSError, StorageError) as werr:
            log.error("spool: cannot write %s: %s", error_path, getattr(werr, "strerror", werr))
            error_path = None
        log.error("spool: %s (dropped by %s) cannot be moved out of incoming/: %s; left there%s",
                  show_name(name), user, e.strerror, f", see {error_path}" if error_path else "")
        return error_path

    def process(self, box: str, name: str, rid: str) -> bool:
        """Worker: build the bundle of the drop staged in ``box``, write the
        marker (RUN) and hand it to the loop to submit (True); or reject it."""
        staged = os.path.join(box, "d", name)
        st = os.lstat(staged)
        user = user_name(st.st_uid)
        source = f"{name}/workflow.xml" if stat.S_ISDIR(st.st_mode) else name
        bundle = os.path.join(box, "bundle")
        self.fs.rmtree(bundle)  # a half-built one, from before a crash
        try:
            self._build(staged, st, bundle, name)
        except Refused as r:
            self._reject(box, name, st, user, r.lines)
            return False
        except OSError as e:
            log.error("spool: cannot stage %s: %s", show_name(name), e)
            self._reject(box, name, st, user, [f"{name}: flowd could not stage it: {e.strerror}"])
            return False
        try:
            self.fs.write_file(os.path.join(box, MARKER), f"{rid}\n".encode(), mode=0o600)
        except StorageError as e:  # e.g. the spool is full: taken again at the next start
            log.error("spool: cannot write the marker in %s: %s; %s stays there and is taken "
                      "again when flowd restarts", box, e, show_name(name))
            self.fs.rmtree(bundle)
            return False
        self._post(lambda: self._on_ready(box, name, st, user, source, rid))
        return True

    def finish(self, box: str, name: str, st: os.stat_result, user: str, source: str,
               result: dict | None, error: BaseException | None) -> bool:
        """Worker: the drop became a run (retire its box) or is rejected."""
        if error is None:
            result = result or {}
            log.info("spool: %s dropped by %s became run %s (workflow %s)", show_name(name), user,
                     result.get("run"), result.get("name"))
            for w in result.get("warnings") or ():
                log.warning("spool: %s", w)
            self._discard(box)
            return False
        if isinstance(error, WorkflowError):
            lines = [str(p) for p in error.problems] or [str(error)]
            if not stat.S_ISDIR(st.st_mode) and any("workflow's folder" in p.message
                                                    for p in error.problems):
                lines.append(f"{name}: a workflow file dropped alone brings no other files: "
                             "drop a folder holding workflow.xml and its files")
        elif isinstance(error, FlowError):
            lines = [f"{source}: {line}" for line in str(error).splitlines()]
        else:  # a bug must not lose the drop or stop the daemon
            log.error("spool: internal error while submitting %s", show_name(name), exc_info=error)
            lines = [f"{source}: internal error in flowd: {type(error).__name__}: {error}",
                     "this is a bug in flowd; the daemon's log has the details"]
        self._reject(box, name, st, user, lines)
        return False

    # -- rejecting and retiring (worker) -----------------------------------------------
    def _reject(self, box: str, name: str, st: os.stat_result, user: str,
                lines: list[str]) -> None:
        """The marker ``rejecting`` first (so a crash rejects it once, under the same name)."""
        self.fs.rmtree(os.path.join(box, "bundle"))
        target = self._rejected_name(name)
        text = self._error_text(name, user, lines, resubmit=True, is_dir=stat.S_ISDIR(st.st_mode))
        first = next((line for line in lines if ": error:" in line), lines[0])
        try:
            self.fs.write_file(os.path.join(box, REJECTING), json.dumps(
                {"target": target, "text": text, "first": first, "user": user}).encode(), mode=0o600)
        except StorageError as e:
            log.error("spool: %s (dropped by %s) is rejected (%s) but cannot be moved to %s: %s; "
                      "it is kept in %s and taken again when flowd restarts", show_name(name), user,
                      first, self.rejected, e, box)
            return
        self._rejected(box, name, target, text, first, user)

    def _rejected(self, box: str, name: str, target: str, text: str, first: str,
                  user: str) -> None:
        """NAME.error (atomically), then the drop beside it, then retire the box; redone
        as a whole after a crash."""
        staged = os.path.join(box, "d", name)
        error_path = os.path.join(self.rejected, target + ".error")
        try:
            if os.path.lexists(staged) and os.path.lexists(os.path.join(self.rejected, target)):
                target = self._rejected_name(name)  # someone put a file there meanwhile
                error_path = os.path.join(self.rejected, target + ".error")
            self.fs.write_file(error_path, text.encode("utf-8", "replace"), mode=0o644)
            if os.path.lexists(staged):
                self._rename(staged, os.path.join(self.rejected, target))
        except (OSError, StorageError) as e:
            log.error("spool: %s (dropped by %s) is rejected (%s) but cannot be moved to %s: %s; "
                      "it is kept in %s and taken again when flowd restarts", show_name(name), user,
                      first, self.rejected, getattr(e, "strerror", None) or e, staged)
            return
        log.warning("spool: %s dropped by %s is rejected: %s (see %s)", show_name(name), user,
                    first, error_path)
        self._discard(box)


    # -- names, texts, markers of an older flowd, retiring ---------------------------
    def _rejected_name(self, name: str) -> str:
        base = name
        if len(os.fsencode(base)) > 200:
            base = os.fsdecode(os.fsencode(base)[:200])
        k = 0
        while True:
            cand = base if k == 0 else f"{base}.{k}"
            path = os.path.join(self.rejected, cand)
            if not os.path.lexists(path) and not os.path.lexists(path + ".error"):
                return cand
            k += 1

    def _error_text(self, name: str, user: str, lines: list[str], *, resubmit: bool,
                    is_dir: bool = False) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        out = [f"# flowd did not take {show_name(name)}, dropped by {user} into {self.incoming} "
               f"({when}):"]
        out += [_one_line(line) for line in lines]
        if resubmit:
            what = (f"fix {show_name(name)}/workflow.xml (flowctl validate checks it), then rename the "
                    f"folder into {self.incoming} again (build it under a name starting with "
                    f"\".\" there, e.g. .{show_name(name)}, then mv it to {show_name(name)})"
                    if is_dir else
                    f"fix the file (flowctl validate checks it), then drop it again: write it "
                    f"to {self.incoming}/.{show_name(name)}.part and mv it to {show_name(name)}")
            out.append(f"To resubmit: {what}. This copy stays in {self.rejected} until an "
                       "administrator removes it.")
        return "\n".join(out) + "\n"

    def _already_submitted_legacy(self, box: str, name: str, marker: str) -> bool:
        """A marker of an older flowd (the time it was written, no run id): the
        drop's run, if any, is one of the same source and user submitted after it."""
        try:
            since = float(marker)
            st = os.lstat(os.path.join(box, "d", name))
            names = os.listdir(self.runs_dir)
        except (ValueError, OSError):
            return False
        user = user_name(st.st_uid)
        source = f"{name}/workflow.xml" if stat.S_ISDIR(st.st_mode) else name
        for rid in names:
            try:
                meta = read_meta(os.path.join(self.runs_dir, rid))
            except (OSError, ValueError):
                continue
            if (meta.get("source") == source and meta.get("submitted_by") == user
                    and float(meta.get("submitted_at") or 0) >= since - 1.0):
                log.info("spool: %s had become run %s before flowd stopped", show_name(name), rid)
                return True
        return False

    def _discard(self, box: str) -> None:
        """Retire a box whose drop became a run or was rejected."""
        done = os.path.join(self.staging, ".done-" + os.path.basename(box))
        try:
            self.fs.rename(box, done)
        except StorageError as e:
            log.error("spool: cannot retire %s: %s", box, e)
            return
        self.fs.rmtree(done)

    # -- recovery --------------------------------------------------------------------
    def recover(self, box: str, rid: str) -> bool:
        """Worker: finish what a crash interrupted, exactly as the markers say."""
        if os.path.basename(box).startswith(".done-"):
            self.fs.rmtree(box)
            return False
        try:
            names = os.listdir(os.path.join(box, "d"))
        except FileNotFoundError:
            names = []
        except OSError as e:
            log.error("spool: cannot read %s: %s; left as it is", box, e.strerror)
            return False
        if not names:
            self.fs.rmtree(box)  # nothing of a user's in it
            return False
        if len(names) > 1:
            log.error("spool: %s holds more than one drop; left as it is", box)
            return False
        name = names[0]
        rejecting = _read(os.path.join(box, REJECTING))
        if rejecting is not None:
            try:
                r = json.loads(rejecting)
                args = (str(r["target"]), str(r["text"]), str(r["first"]), str(r["user"]))
            except (ValueError, KeyError, TypeError):
                log.error("spool: %s has an unreadable %s; left as it is", box, REJECTING)
                return False
            log.info("spool: rejecting %s again (flowd stopped while rejecting it)", show_name(name))
            self._rejected(box, name, *args)
            return False
        marker = (_read(os.path.join(box, MARKER)) or "").strip()
        if _RUN_ID.match(marker):
            if os.path.lexists(os.path.join(self.runs_dir, marker)):
                log.info("spool: %s had become run %s before flowd stopped", show_name(name), marker)
                self._discard(box)
                return False
            rid = marker  # never made (runs/.new-RUN was removed at start): made now, as RUN
        elif marker and self._already_submitted_legacy(box, name, marker):
            self._discard(box)
            return False
        log.info("spool: taking %s again (flowd stopped while taking it)", show_name(name))
        return self.process(box, name, rid)



# -- helpers -------------------------------------------------------------------------
def show_name(name: str) -> str:
    """A name safe to print on one line (control characters and bad bytes escaped)."""
    if name.isprintable():
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    return repr(name)[1:-1]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", " / ")


def _read(path: str) -> str | None:
    """A marker's text (None: there is none)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(64 * 1024)
    except FileNotFoundError:
        return None

