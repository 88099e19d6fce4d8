"""Making runs: a submitted workflow (an upload, or a spool drop) checked
against the config and written into a new run folder, off the loop (for a
client's submit and for a drop alike). A crash or a stop meanwhile leaves a ``.new-RUN`` folder,
removed at start."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import protocol as P
from . import units
from .config import Config
from .errors import FlowError, InternalError, Problem, UsageError, WorkflowError
from .run import Run, initial_meta, unfinished_path
from .runids import RunIds
from .textsafe import for_log

log = logging.getLogger("flowd")

class Creator:
    """Makes the daemon's runs (``submit_bundle``); ``d`` is the Daemon."""

    def __init__(self, d):
        self.d = d
        self.ids = RunIds(lambda: set(d.runs) | set(d.creating), d.runs_dir)

    def submit_bundle(self, bundle: str, name: str, user: str = "",
                      reply: tuple[bytes, str] | Callable[[dict | None, BaseException | None], None]
                      | None = None, run_id: str | None = None,
                      uid: int | None = None, stamped: bool = False) -> dict | None:
        """Validate ``bundle/workflow.xml`` and make a run of it; the folder is consumed.

        ``bundle`` must be a folder of the spool's filesystem that only flowd
        writes (an upload, or a drop moved out of incoming/). An invalid
        workflow gives WorkflowError (its problems naming ``name``), or
        UsageError for an image the config does not allow, and the folder is
        removed.

        With ``reply`` (a client's peer and request id), this is done on a
        thread, since 20,000 items take seconds to write: the loop goes on
        serving, and the client gets the run or the error when it is done
        (``_created``). ``reply`` may instead be a callable (the spool intake):
        it is called on the loop with (result, error), the error as raised.
        Without, it is done here: the result is returned, the error raised.

        ``run_id``: the id the run must have (the intake picks it first and
        keeps it in its marker, so that after a crash it can tell whether the
        run was made); by default a new one.

        ``uid``: the submitter's uid (SO_PEERCRED; for a spool drop, the
        dropped file's owner), recorded as the run's owner (``submitted_uid``,
        flowd/owners.py); None: no owner (only root and admins may change it).

        ``stamped``: every file of ``bundle`` has its checksum stamp and item
        mode already (a taken upload, ``Staging.take``): items are linked as
        they are (``Run.create``).
        """
        run_id = run_id or self.new_run_id()
        meta = {"submitted_at": time.time(), "source": name, "submitted_by": user}
        if uid is not None:
            meta["submitted_uid"] = uid
        job = _Creation(run_id, bundle, meta, reply, stamped=stamped)
        self.d.creating[run_id] = job
        if reply is None:
            self._create(job)
            return self._created(job)
        threading.Thread(target=self._create, args=(job,), name=f"flowd-create-{run_id}",
                         daemon=True).start()
        return None  # answered by _created, from the loop

    def _create(self, job: "_Creation") -> None:
        """Validate the workflow and make the run's folder (on a thread for a
        client's submit: parsing 20,000 items takes a fraction of a second,
        writing them seconds). A crash or a stop meanwhile leaves a
        ``.new-RUN`` folder, removed at start."""
        try:
            job.wf, job.warnings = self._validate(job.bundle, job.meta["source"])
            job.path = Run.create(self.d.runs_dir, job.run_id, job.wf, job.bundle, self.d.fs, job.meta,
                                  stamped=job.stamped)
        except Exception as e:  # noqa: BLE001 - answered to the client by _created
            job.error = e
            self.d.fs.rmtree(unfinished_path(self.d.runs_dir, job.run_id))
            self.d.fs.rmtree(job.bundle)
        if job.reply is not None:
            self.d.report(job)

    def _validate(self, bundle: str, name: str) -> tuple:
        """The bundle's workflow and its warnings, or WorkflowError/UsageError."""
        from .parser import load_workflow  # lxml lives only there

        try:
            wf, warnings = load_workflow(os.path.join(bundle, "workflow.xml"))
        except WorkflowError as e:
            for p in e.problems:  # speak of the user's file, not our private copy
                p.file = name
            raise
        cfg = self.d.cfg  # one config, though a reload may replace it meanwhile
        for proc in wf.processes.values():  # the image allowlist (config key allowed_images)
            if not cfg.image_allowed(proc.image):
                raise UsageError(f"process {proc.name!r} uses image {proc.image!r}, which this flowd "
                                 f"does not allow (allowed_images in {cfg.source or 'its config'}: "
                                 f"{', '.join(cfg.allowed_images)})")
        problems = _over_limits(wf, name, cfg)
        if problems:
            raise WorkflowError(problems)
        for w in warnings:  # the user's file, not our private copy, here too
            w.file = name
        return wf, [str(w) for w in warnings]

    def _created(self, job: "_Creation") -> dict | None:
        """In the loop: open the new run, and answer its submitter."""
        self.d.creating.pop(job.run_id, None)
        try:
            return self._answer(job)
        finally:
            job.wf = None  # the model with its items: the run keeps its own, without them
            release_memory()

    def _answer(self, job: "_Creation") -> dict | None:
        if callable(job.reply):  # the intake: it tells the errors apart and logs them
            job.reply(self._opened(job) if job.error is None else None, job.error)
            return None
        if job.reply is None and job.error is not None:
            raise job.error  # the inline caller tells its errors apart
        result = error = None
        if isinstance(job.error, FlowError):
            error = job.error
        elif job.error is not None:
            log.error("could not create run %s", job.run_id, exc_info=job.error)
            error = InternalError()  # the log has the traceback
        else:
            result = self._opened(job)
        if job.reply is None:
            return result
        self.d.control.send(job.reply[0], P.encode_reply(job.reply[1], result, error=error))
        return None

    def _opened(self, job: "_Creation") -> dict:
        """In the loop: open the run just made; what its submitter is told."""
        run = Run.open(job.path, self.d.fs, self.d.executor, self.d.limits, wf=job.wf,
                       meta=initial_meta(job.meta, job.run_id, job.wf))
        self.d.runs[run.id] = run
        self.d.attach(run)
        run.hub.emit("run_submitted", run.id, workflow=job.wf.name, owner=job.meta["submitted_by"] or "?")
        log.info("run %s submitted by %s: workflow %s (%s)", run.id,
                 for_log(job.meta["submitted_by"] or "?"), for_log(job.wf.name),
                 for_log(job.meta["source"]))
        return {"run": run.id, "name": job.wf.name, "warnings": job.warnings}

    def new_run_id(self) -> str:
        """A new run's id (``RunIds.new``: none a spool drop holds shares its prefix)."""
        return self.ids.new()


@dataclass(eq=False)
class _Creation:
    """A run being made (``Creator.submit_bundle``)."""

    run_id: str
    bundle: str
    meta: dict  # run.json's first fields: submitted_at, source, submitted_by
    reply: object  # (peer, request id) to answer, a callable (the intake), or None: made inline
    wf: object = None  # the validated workflow
    warnings: list[str] = field(default_factory=list)
    path: str = ""
    error: BaseException | None = None
    stamped: bool = False  # its files are items as they are (Run.create's stamped)


def release_memory() -> None:
    """Give the memory freed after a run is made back to the system (glibc's
    malloc_trim): parsing and writing 100,000 items on a thread leaves tens of
    MB free in its malloc arena, which would stay in the daemon's RSS."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _over_limits(wf, name: str, cfg: Config) -> list[Problem]:
    """What in ``wf`` asks more than this flowd's config allows
    (allowed_networks, max_memory, max_timeout): one problem per field."""
    where = cfg.source or "flowd's config"
    out = []
    for proc in wf.processes.values():
        if not cfg.network_allowed(proc.network):
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks network=\"{proc.network}\", which this flowd does not "
                f"allow (allowed_networks in {where}: {', '.join(cfg.allowed_networks)})",
                f"leave network= out (no network), or ask the administrator to add "
                f"\"{proc.network}\" to allowed_networks"))
        if proc.memory is not None and cfg.max_memory is not None and proc.memory > cfg.max_memory:
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks memory=\"{units.spell_size(proc.memory)}\", more than this flowd "
                f"allows (max_memory in {where}: {units.spell_size(cfg.max_memory)})",
                f"ask for {units.spell_size(cfg.max_memory)} or less, or ask the administrator to raise "
                "max_memory"))
        if proc.timeout is not None and cfg.max_timeout is not None and proc.timeout > cfg.max_timeout:
            out.append(Problem(
                name, proc.line, "process",
                f"process {proc.name!r} asks timeout=\"{units.spell_duration(proc.timeout)}\", longer than this "
                f"flowd allows (max_timeout in {where}: {units.spell_duration(cfg.max_timeout)})",
                f"ask for {units.spell_duration(cfg.max_timeout)} or less, or ask the administrator to raise "
                "max_timeout"))
    return out

