"""One run: ties the scheduler (decisions), the store (disk) and the executor.

The daemon's loop calls ``tick`` after every event and ``on_result`` for
every executor report; nothing here blocks on a container. Stdlib only.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from . import cache as C
from . import offloop, owners, retrying
from . import scheduler as S
from .collect import collected
from .errors import Conflict, DiskFull, NotFound
from .events import QUIET, since
from .executor import base as X
from .fsops import Durable
from .model import Workflow
from .collect import TaskOutputError
from .runfailures import Failures
from .runview import RunView
from .store import RunStore, read_meta
from .storescan import Scan
from .taskstore import TaskRecord, TaskStore
from .taskspec import Limits, container_identity, process_limits, task_spec
from .textsafe import for_log
from .trace import TraceLog

log = logging.getLogger("flowd.run")

# A tick checks the clock (Run.tick_budget) after each scheduler step of at most
# this many items moved by muxes: one mux task's worth.
MOVE_SLICE = S.MUX_BATCH
# A committed task with more output items than this (a split of millions of
# lines) is applied in slices of this many, a slice a tick: each slice durable
# and handed to the scheduler before the next (TaskStore.move_slice).
APPLY_SLICE = 4096


@dataclass
class Active:
    rec: TaskRecord
    spec: X.TaskSpec | None = None
    stopping: bool = False  # kill requested (cancel, or a stop failure elsewhere)
    parked: bool = False  # waiting for the container engine to come back
    started_at: float | None = None
    history: list[str] = field(default_factory=list)
    looking: int = 0  # a cache lookup is under way (its token; flowd/cache.py): no container yet
    cache: C.Answer | None = None  # what the lookup of this attempt found (process@cache)
    collecting: int = 0  # its outputs are being collected off the loop (its token): see _collect_off_loop
    collect_again: bool = False  # that collect met a full disk: collect again once space is freed
    ended: dict | None = None  # the trace record of the attempt being collected (written after)


class Run:
    # A tick gives the loop back after this long: a mux with 100,000 items to
    # move moves them in slices, and the daemon serves its socket in between.
    tick_budget = 0.05  # seconds
    hub = QUIET  # the daemon's event hub (flowd/events.py), set when the daemon holds the run
    cache: C.Cache | None = None  # the daemon's content cache (process@cache); None: tasks just run
    # The daemon's threads for collects that may be long (a split); None: on the loop.
    worker: offloop.OffLoop | None = None

    def __init__(self, root: str, fs: Durable, wf: Workflow, meta: dict, executor: X.Executor,
                 limits: Limits):
        self.root = root
        self.id = meta["id"]
        self.fs = fs
        self.wf = wf
        self.meta = meta
        self.executor = executor
        self.limits = limits
        self.user, self.group_add, work_mode = container_identity(limits.container_user)
        self.store = RunStore(root, fs)
        self.tasks = TaskStore(self.store, max_output_bytes=limits.max_output_bytes,
                               max_split_items=limits.max_split_items, work_mode=work_mode)
        self.sched = S.Scheduler(wf)
        self.active: dict[str, Active] = {}  # task dirname -> Active
        self._committed: list[tuple[TaskRecord, list]] = []  # committed, not yet applied
        self._applying: list[TaskRecord] = []  # committed, big: applied a slice a tick (APPLY_SLICE)
        self._to_store: list[tuple] = []  # committed tasks whose outputs go into the cache, before applying
        self.failures = Failures(self)  # dead letters and quarantine
        self.view = RunView(self)  # what flowctl reads: summary, detail, items, logs
        self.more = False  # the last tick ran out of time with work still ready
        self.resizing: set[str] = set()  # processes whose resize is under way (commands/resize.py)
        self.trace = TraceLog(self)  # a record per ended attempt (flowd/trace.py)

    # -- creation --------------------------------------------------------
    @staticmethod
    def create(runs_dir: str, run_id: str, wf: Workflow, bundle: str, fs: Durable, meta: dict,
               *, stamped: bool = False) -> str:
        """Make the run's folder from a validated bundle, atomically.

        Everything (scripts, initial items, metadata) is built under a hidden
        name and renamed into place last: a crash leaves either no run or the
        whole run. ``bundle`` is moved into the run (same filesystem).
        ``stamped``: its files are items as they are (a taken upload,
        ``Staging.take``), linked into their channels without being read.
        """
        tmp = unfinished_path(runs_dir, run_id)
        fs.rmtree(tmp)
        store = RunStore.layout(tmp, fs, wf.channels)
        fs.rename(bundle, store.path("bundle"), sync=False)  # run.json's write fsyncs the folder
        # Scripts and items are written unsynced, then made durable at once (sync_fs).
        for proc in wf.processes.values():
            fs.write_file(store.path("scripts", proc.name), proc.script.encode(), sync=False)
        for ch in wf.channels.values():
            for item in ch.items:
                if item.file is not None:
                    store.put_initial_file(ch.name, store.path("bundle", item.file), stamped=stamped)
                else:
                    store.put_initial(ch.name, (item.text or "").encode())
        fs.sync_fs(tmp)  # all of the folder, before run.json and the rename make the run live
        fs.write_file(store.path("workflow.json"), json.dumps(wf.without_items().to_dict()).encode(),
                      sync_dir=False)  # the folder is fsynced by run.json's write, next
        meta = initial_meta(meta, run_id, wf)
        store.write_meta(meta)
        final = os.path.join(runs_dir, run_id)
        fs.rename(tmp, final)
        return final

    @classmethod
    def open(cls, root: str, fs: Durable, executor: X.Executor, limits: Limits, *,
             wf: Workflow | None = None, meta: dict | None = None) -> "Run":
        """Load a run from disk and do the store's part of recovery. A run just
        made (``create``) is handed its workflow and run.json as they are in
        memory (``initial_meta``) instead of reading back what was just written."""
        if meta is None:
            meta = read_meta(root)
        if wf is None:
            with open(os.path.join(root, "workflow.json"), "rb") as f:
                wf = Workflow.from_dict(json.load(f))
        run = cls(root, fs, wf.without_items(), meta, executor, limits)  # items are on disk
        retrying.recover(run)  # a retry a crash cut short is finished first (flowd/retrying.py)
        run._load()
        return run

    def _load(self) -> None:
        eng = self.sched
        # A finished run has no task to recover, but a retired task's hidden folder
        # that a power loss brought back after the run ended is removed all the same.
        live = self.tasks.recover_tasks(APPLY_SLICE) if not self.finished else self.tasks.remove_hidden()
        scan = Scan(self.store)
        self.failures.load(scan)
        eng.load(scan.channels(self.wf.channels))
        for process, n in scan.done().items():
            if process in eng.counts:
                eng.counts[process].done = n
        eng.fired |= scan.fired()
        self.failures.count()
        for rec in live:
            eng.adopt(S.Claim(rec.kind, rec.name, rec.task_id, tuple(rec.inputs)))
            if rec.committed:
                self._applying.append(rec)  # a big output an earlier life began to apply
            else:
                self.active[rec.dirname] = Active(rec)
        if self.meta.get("cancel_requested") and not self.finished:
            eng.cancel()

    def resume(self) -> None:
        """After ``open``: take back the claimed tasks (the executor finds containers)."""
        for act in list(self.active.values()):
            rec = act.rec
            if rec.kind == S.MUX:
                self._commit_mux(rec)  # a mux claim is finished the same way every time
                continue
            self._carry_out(act, self.sched.on_resume(rec.attempt, self.first_attempt(rec)))
        self._apply_committed()
        self._check_end()

    # -- properties ------------------------------------------------------
    @property
    def state(self) -> str:
        return self.meta["state"]

    @property
    def finished(self) -> bool:
        return self.meta["state"] in S.FINAL_STATES

    def first_attempt(self, rec: TaskRecord) -> int:
        """The number of a task's first attempt: 1, or for a task ``flowctl retry``
        put back, one more than its last before (flowd/retrying.py), so that no
        attempt's log or trace record is taken for another's."""
        before = self.meta.get(retrying.ATTEMPTS_BEFORE)
        n = before.get(rec.dirname) if isinstance(before, dict) else None
        return n + 1 if isinstance(n, int) and 0 <= n < 1_000_000 else 1

    def running_containers(self) -> int:
        return sum(1 for a in self.active.values() if a.rec.kind == S.PROCESS and not a.parked)

    def running_tasks(self, process: str | None = None, task: str | None = None) -> list[str]:
        """Task ids of the run's process tasks now running (optionally of one process or task)."""
        return [a.rec.task_id for a in self.active.values()
                if a.rec.kind == S.PROCESS and not a.parked and a.spec is not None
                and process in (None, a.rec.name) and task in (None, a.rec.task_id)]

    def keep(self) -> set[tuple[str, str]]:
        return {(self.id, a.rec.task_id) for a in self.active.values() if a.rec.kind == S.PROCESS}

    # -- limits (flowctl resize) -------------------------------------------------
    def limits_of(self, process: str) -> tuple[int | None, float | None]:
        """(memory, cpus) the process's next task gets: a resize's, else its own,
        else the daemon's default memory."""
        return process_limits(self.wf.processes[process], self.limits, self.meta.get("resized"))

    def set_limits(self, process: str, memory: int | None, cpus: float | None, *,
                   live: bool) -> None:
        """New limits for the process, kept in run.json (they outlive a restart).
        ``live``: its running fresh tasks were given them (their specs say so now)."""
        before = self.meta.get("resized")
        self.meta["resized"] = dict(before or {}, **{process: {"memory": memory, "cpus": cpus}})
        try:
            self.store.write_meta(self.meta)
        except BaseException:
            self.meta["resized"] = before  # not saved: not in force either
            if before is None:
                del self.meta["resized"]
            raise
        for act in self.active.values():
            if live and act.rec.kind == S.PROCESS and act.rec.name == process \
                    and act.spec is not None and act.spec.container != "warm":
                act.spec.memory, act.spec.cpus = memory, cpus

    # -- the loop's entry points ------------------------------------------
    def tick(self, capacity: int | None) -> int:
        """Claim and start what is ready; returns how many containers started."""
        self.more = False
        if self.finished:
            return 0
        if self.state == S.QUEUED:
            self._set_state(S.RUNNING, started_at=time.time())
            self.hub.emit("run_started", self.id, workflow=self.wf.name)
        started = 0
        deadline = time.monotonic() + self.tick_budget
        if self._applying:
            self._apply_slices(deadline)
        while True:  # a mux move can make more work ready at once
            claims = self.sched.step(capacity, moves=MOVE_SLICE)
            if not claims:
                break
            recs = self.tasks.claim_many([(c.kind, c.name, c.task_id, list(c.inputs)) for c in claims])
            for rec in recs:
                if rec.kind == S.MUX:
                    self._commit_mux(rec)
                    continue
                act = Active(rec)
                self.active[rec.dirname] = act
                self.start(act, self.first_attempt(rec))
                started += 1
                if capacity is not None:
                    capacity -= 1
            self._apply_committed()  # the moves' outputs, before the next step looks for work
            if time.monotonic() >= deadline:
                self.more = True  # the daemon's loop serves its socket, then ticks again
                break
        self._check_end()
        self.more = (self.more or bool(self._applying)) and not self.finished
        return started

    def _commit_mux(self, rec: TaskRecord) -> None:
        mux = self.sched._mux_by_name[rec.name]
        outputs = self.tasks.commit_mux(rec, mux.targets)
        self.active.pop(rec.dirname, None)
        self._committed.append((rec, outputs))

    def _apply_committed(self) -> None:
        """Apply the tasks committed since the last call, together (their fsyncs
        shared: group commit), then tell the scheduler: their outputs are in
        their channels before anything looks for work there."""
        if not self._committed:
            return
        done, self._committed = self._committed, []
        if self._to_store:  # before the outputs leave out/ for their channels
            stores, self._to_store = self._to_store, []
            try:
                self.cache.store_many(stores)
            except DiskFull as e:
                log.warning("run %s: outputs not kept in the cache: %s", self.id, for_log(e))
        small = []
        for rec, outputs in done:
            if sum(count for _, _, count in outputs) > APPLY_SLICE:
                self._applying.append(rec)  # applied a slice a tick: _apply_slices
            else:
                small.append((rec, outputs))
        self.tasks.apply_many([rec for rec, _ in small])
        for rec, outputs in small:
            self.sched.committed(rec.kind, rec.name, rec.task_id, outputs)

    def _apply_slices(self, deadline: float) -> None:
        """Apply big committed tasks, APPLY_SLICE items at a time, until the
        tick's time is up. Each slice is durable (TaskStore.move_slice) and
        handed to the scheduler at once: the tasks that read a split's lines
        start while its later lines still move. The task leaves the scheduler
        and its folder goes once all have moved."""
        while self._applying:
            rec = self._applying[0]
            if rec.moved == (0, 0):
                self.tasks.begin_apply(rec)
            ranges, done = self.tasks.move_slice(rec, APPLY_SLICE)
            for channel, first, count in ranges:
                self.sched.add_items(channel, first, count)
            if done:
                self.tasks.finish_apply([rec])
                self._applying.pop(0)
                self.sched.committed(rec.kind, rec.name, rec.task_id, [])
            if time.monotonic() >= deadline:
                return

    def start(self, act: Active, attempt: int) -> None:
        rec = act.rec
        if rec.attempt != attempt:
            self.tasks.set_attempt(rec, attempt)
        # An empty work/ for every start: what an earlier start left there (a failed
        # or lost container, a Swarm node cut off that may still write into the old
        # folder, a life before a power loss) is never collected as this one's output.
        # Nor is what a cache hit a crash cut short left in out/ (nothing there is committed).
        self.tasks.empty_work(rec)
        self.tasks.empty_out(rec)
        act.spec = task_spec(self, rec)
        act.parked = False
        act.started_at = time.time()
        act.cache = None
        proc = self.wf.processes[rec.name]
        if proc.cache and self.cache is not None:
            self._look_up(act, proc)  # the container starts, or not, when the answer comes
            return
        self._start_container(act)

    def _start_container(self, act: Active) -> None:
        rec = act.rec
        self.executor.start(act.spec)
        self.hub.emit("task_started", self.id, process=rec.name, task=rec.task_id, attempt=rec.attempt)

    # -- the content cache (process@cache="yes"; flowd/cache.py) ----------------------
    def process_id(self, process: str) -> str:
        """A process across runs, for the cache: ``WORKFLOW/PROCESS``."""
        return f"{self.wf.name}/{process}"

    def _look_up(self, act: Active, proc) -> None:
        """Ask the cache, off the loop, for the task's key and an entry with it."""
        token = next(offloop.tokens)
        act.looking = token
        dirname = act.rec.dirname
        paths = [self.store.input_path(act.rec, seq) for _, seq in act.rec.inputs]
        self.cache.lookup(self.executor, proc, paths,
                          lambda answer: self._cache_answer(dirname, token, answer))

    def _cache_answer(self, dirname: str, token: int, answer: C.Answer) -> None:
        """On the loop: publish the entry's outputs (a hit), or start the container."""
        act = self.active.get(dirname)
        if act is None or act.looking != token:
            return  # released meanwhile (cancel), or a later start asked again
        act.looking = 0
        act.cache = answer
        if act.stopping:
            self._release(act)
            self._check_end()
            return
        cache = self.cache
        if answer.entry is not None and cache.has(answer.key):
            try:
                self._publish_cached(act, answer)
            except (FileNotFoundError, ValueError) as e:  # its files went (by hand): run the task
                log.warning("run %s: task %s: cache entry %s cannot be used (%s); it is removed "
                            "and the task runs", self.id, act.rec.dirname, answer.key[:12], for_log(e))
                self.tasks.empty_out(act.rec)
                cache.remove(answer.key)  # stored again, whole, once the task has run
                act.cache = C.Answer(answer.key, answer.parts, why="its cache entry was broken")
            except DiskFull:
                # Not published: the answer waits, as a result does, until space is freed
                # (Daemon._drain_events defers it); out/ holds nothing of it then.
                self.tasks.empty_out(act.rec)
                act.looking, act.cache = token, None
                raise
            else:
                self._apply_committed()
                self._check_end()
                return
        elif answer.why and answer.key is not None and cache.has(answer.key):
            log.warning("run %s: task %s: %s; the entry is removed and the task runs",
                        self.id, act.rec.dirname, for_log(answer.why))
            cache.remove(answer.key)
        if answer.key is None:
            log.info("run %s: task %s runs without the cache: %s", self.id, act.rec.dirname,
                     for_log(answer.why))
        cache.misses += 1
        self._start_container(act)

    def _publish_cached(self, act: Active, answer: C.Answer) -> None:
        """A hit: the entry's items become this attempt's outputs in out/, and the
        task commits exactly as one whose container ran (no container runs)."""
        rec = act.rec
        proc = self.wf.processes[rec.name]
        outdir = self.store.task_path(rec, "out")
        self.cache.publish(answer.key, outdir, rec.attempt)
        outputs = self.tasks.commit(rec, collected(outdir, rec.attempt,
                                                   [(p.channel, bool(p.split)) for p in proc.outputs]))
        self.trace.cached(act, answer)
        self.hub.emit("task_succeeded", self.id, process=rec.name, task=rec.task_id,
                      attempt=rec.attempt, seconds=since(act.started_at), cached=True)
        del self.active[rec.dirname]
        self._committed.append((rec, outputs))

    def on_result(self, res: X.TaskResult) -> None:
        self.on_results([res])

    def on_results(self, results: list[X.TaskResult]) -> None:
        """Results that came in together: each is carried out in order; the
        successes among them are applied together at the end (group commit).

        A full disk (DiskFull) stops it at the result that met it; the error's
        ``left`` holds that result and those after it, for the caller to keep
        and give again once space is freed (what was done before stays done).
        """
        i = 0
        try:
            for i, res in enumerate(results):
                act = self._active_for(res.task_id)
                if act is None or act.rec.attempt != res.attempt or act.collecting:
                    log.debug("run %s: dropping stale result %s", self.id, res)
                    continue
                action = self.sched.on_result(act.rec.name, act.rec.attempt, _outcome(res),
                                               stopping=act.stopping, first=self.first_attempt(act.rec))
                ended = self.trace.begin(act, res)
                self._carry_out(act, action, res)
                if act.collecting:
                    act.ended = ended  # written once its outputs are collected (_collected)
                else:
                    self.trace.end(ended, act)
        except DiskFull as e:
            e.left = list(results[i:])
            self._apply_committed()
            raise
        self._apply_committed()
        self._check_end()

    def _carry_out(self, act: Active, action: S.Action, res: X.TaskResult | None = None) -> None:
        """Do what the scheduler decided for this task."""
        rec, kind = act.rec, action.kind
        if kind == S.START:
            if res is not None:  # the same attempt again: it never ran, or its node was lost
                log.info("run %s: task %s had no container; starting it again", self.id, rec.dirname)
            self.start(act, action.attempt)
        elif kind == S.ADOPT:
            act.spec = task_spec(self, rec)
            act.stopping = action.kill
            self.executor.adopt(act.spec)
            if action.kill:
                self.executor.kill(self.id, rec.task_id)
        elif kind == S.RELEASE:
            self._release(act)
        elif kind == S.PARK:
            act.parked = True
        elif kind == S.QUARANTINE:
            self.failures.quarantine(act, res.damaged)
        elif kind == S.COLLECT:
            self._succeeded(act, res)
        else:  # RETRY or DEAD_LETTER: a failure the script is to blame for
            self.failures.failed(act, res.message or res.status, action)

    def _active_for(self, task_id: str) -> Active | None:
        for act in self.active.values():
            if act.rec.kind == S.PROCESS and act.rec.task_id == task_id:
                return act
        return None

    def _succeeded(self, act: Active, res: X.TaskResult) -> None:
        rec = act.rec
        proc = self.wf.processes[rec.name]
        outputs = [(p.channel, p.as_name, p.split) for p in proc.outputs]
        if self.worker is not None and any(p.split for p in proc.outputs):
            self._collect_off_loop(act, outputs)  # a split may be millions of files
            return
        try:
            outs = self.tasks.collect(rec, outputs)
        except (TaskOutputError, OSError) as e:
            outs = e
        self._commit_collected(act, outs)

    def _collect_off_loop(self, act: Active, outputs: list[tuple]) -> None:
        """Collect on the worker's thread; ``_collected`` takes the outcome on the
        loop. Meanwhile the task is active (a cancel waits for it) and a second
        result for its attempt is dropped."""
        token = next(offloop.tokens)
        act.collecting = token
        rec, dirname = act.rec, act.rec.dirname
        worker = self.worker
        worker.submit(lambda: self.tasks.collect(rec, outputs, worker.stopping),
                           lambda outcome: self._collected(dirname, token, outputs, outcome))

    def _collected(self, dirname: str, token: int, outputs: list[tuple], outcome) -> None:
        """On the loop: an off-loop collect's outcome (its items, or the error)."""
        act = self.active.get(dirname)
        if act is None or act.collecting != token:
            return
        if isinstance(outcome, DiskFull):
            if act.collect_again:  # called again once space was freed: collect again
                act.collect_again = False
                self._collect_off_loop(act, outputs)
                return
            act.collect_again = True
            raise outcome  # Daemon._drain_events keeps this answer until space is freed
        if not isinstance(outcome, (list, TaskOutputError, OSError)):
            raise outcome  # a bug: logged by the loop; the task stays until a restart
        act.collecting = 0
        ended, act.ended = act.ended, None
        self._commit_collected(act, outcome)
        self.trace.end(ended, act)
        self._apply_committed()
        self._check_end()

    def _commit_collected(self, act: Active, outs) -> None:
        """Commit what the collect gave (its items), or fail the attempt (its error)."""
        rec = act.rec
        proc = self.wf.processes[rec.name]
        if isinstance(outs, TaskOutputError):
            self.failures.failed(act, f"bad output: {outs}")
            return
        if isinstance(outs, OSError):
            self.failures.failed(act, f"could not collect outputs: {for_log(outs)}")
            return
        outputs = self.tasks.commit(rec, outs)
        if act.cache is not None and act.cache.key is not None and self.cache is not None \
                and sum(count for _, _, count in outputs) <= C.MAX_ENTRY_ITEMS:
            meta = {"process": self.process_id(rec.name), "image": proc.image, "run": self.id,
                    "task": rec.task_id, "workflow": self.wf.name,
                    "owner": owners.owner_uid(self.meta)}
            self._to_store.append((act.cache.key, act.cache.parts, meta,
                                   self.store.task_path(rec, "out"), rec.attempt, len(proc.outputs)))
        self.hub.emit("task_succeeded", self.id, process=rec.name, task=rec.task_id,
                      attempt=rec.attempt, seconds=since(act.started_at))
        self.executor.remove(act.spec)
        del self.active[rec.dirname]
        self._committed.append((rec, outputs))  # applied with the others of this batch

    def _release(self, act: Active) -> None:
        rec = act.rec
        if act.spec is not None and not act.looking:  # a lookup under way has no container
            self.executor.remove(act.spec)
        self.tasks.release(rec)
        del self.active[rec.dirname]
        self.sched.released(rec.kind, rec.name, rec.task_id)

    def stop_all(self, why: str) -> None:
        self.meta["message"] = why
        for act in list(self.active.values()):
            if act.rec.kind != S.PROCESS:
                continue
            act.stopping = True
            if act.collecting:
                continue  # its container ended well: what it made is committed once collected
            if act.parked or act.spec is None or act.looking:
                self._release(act)
            else:
                self.executor.kill(self.id, act.rec.task_id)

    def cancel(self) -> None:
        if self.finished:
            raise Conflict(f"run {self.id} is already {self.state}")
        self.meta["cancel_requested"] = True
        self.store.write_meta(self.meta)
        self.sched.cancel()
        self.stop_all("cancelled")
        self._check_end()

    def parked(self) -> bool:
        return any(a.parked for a in self.active.values())

    def engine_back(self) -> None:
        """The container engine is reachable again: restart parked tasks."""
        for act in list(self.active.values()):
            if act.parked:
                self.start(act, act.rec.attempt)

    def _check_end(self) -> None:
        if self.finished:
            return
        state = self.sched.state()
        if state in S.FINAL_STATES:
            self._set_state(state, finished_at=time.time())
            log.info("run %s (%s) %s", self.id, self.wf.name, state)
            self.hub.emit("run_finished", self.id, workflow=self.wf.name, state=state,
                          message=self.meta.get("message", ""))

    def _set_state(self, state: str, **extra) -> None:
        self.meta.update(extra, state=state)
        self.store.write_meta(self.meta)

    # -- pushing -------------------------------------------------------------
    def check_push(self, channel: str) -> None:
        if channel not in self.wf.channels:
            raise NotFound(f"run {self.id} has no channel {channel!r}; it has: "
                           + ", ".join(self.wf.channels))
        if self.finished:
            raise Conflict(f"run {self.id} is {self.state}; items can be pushed only to a "
                           "running run (a service run stays open until cancelled)")

    def push(self, channel: str, path: str, *, stamped: bool = False) -> int:
        """Append the file at ``path`` (same filesystem) as an item; durable on return.
        ``stamped``: its checksum was stamped as it was received (not read again)."""
        self.check_push(channel)
        seq = self.store.put_file(channel, path, stamped=stamped)
        self.sched.add_item(channel, seq)
        self.hub.emit("item_pushed", self.id, channel=channel, item=seq)
        return seq

UNFINISHED = ".new-"  # a run folder being made: removed at start if a crash left it


def unfinished_path(runs_dir: str, run_id: str) -> str:
    """Where ``Run.create`` builds a run before renaming it into place."""
    return os.path.join(runs_dir, UNFINISHED + run_id)


def initial_meta(meta: dict, run_id: str, wf: Workflow) -> dict:
    """run.json of a new run: the submission's fields, its id, name, mode and state."""
    return dict(meta, id=run_id, name=wf.name, mode=wf.mode, state=S.QUEUED,
                submitted_at=meta.get("submitted_at", time.time()))


def _outcome(res: X.TaskResult) -> str:
    """How an attempt ended, in the scheduler's words."""
    if res.retryable:
        return S.ENGINE_AWAY
    if res.status == X.DAMAGED:
        return S.DAMAGED_INPUT
    if res.status == X.MISSING:
        return S.NO_CONTAINER
    return S.OK if res.ok else S.FAILED_ATTEMPT
