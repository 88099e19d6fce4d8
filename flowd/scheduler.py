"""The scheduler decides; it does no I/O (stdlib only).

It holds a picture of one run: each channel's queue of item numbers (SEQ,
FIFO), the tasks that are claimed, and per-process counts. ``step`` returns
what to claim next; the caller (``flowd.run.Run``) does the claiming through
the store and the executor, then reports back with ``committed``,
``released`` or ``failed``. What happens to a task after that is decided
here too (``on_resume``, ``on_result``, ``on_failure`` return an ``Action``:
start, adopt, collect, retry, dead-letter, release, park, quarantine), and
so is the stop rule (``failed`` and ``cancel`` say when the run stops). Unit
tests drive it directly, in microseconds.

Rules (docs/format.md, "Semantics"):

- a process task is ready when every input channel holds an item; it takes
  the head item of each (FIFO pairing: the i-th items meet);
- a process with no inputs runs exactly once per run;
- at most ``parallel`` tasks of a process are claimed at once, and the caller
  passes how many containers the daemon may still start (its global cap);
- a mux moves every item of its ``from`` channels, oldest first (lowest
  SEQ, which is global to the run, so a merge keeps arrival order), up to
  ``MUX_BATCH`` items per mux task; ``step`` may bound the items it moves at
  once, so that a caller with a loop to keep responsive moves a
  100,000-item channel in slices;
- a batch run ends when nothing is claimed and nothing is ready.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .model import Workflow
from .seqqueue import SeqQueue

# Run states (docs/format.md)
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

PROCESS = "process"
MUX = "mux"

# Items one mux task moves at most: the task's fsyncs are paid once for them all.
MUX_BATCH = 64


@dataclass(frozen=True)
class Claim:
    """Take these items and start a task (a container, or a mux move)."""

    kind: str  # PROCESS or MUX
    name: str
    task_id: str
    inputs: tuple[tuple[str, int], ...]  # (channel, seq) in input order


# What the caller does with a task (the scheduler decides, ``Run`` carries it out)
START = "start"  # start the attempt ``Action.attempt`` (a fresh claim, or the same attempt again)
ADOPT = "adopt"  # after a restart: find the attempt's container and wait for it
COLLECT = "collect"  # it succeeded: collect its outputs and commit
RETRY = "retry"  # it failed: give it an empty work folder, start ``Action.attempt``
DEAD_LETTER = "dead_letter"  # it failed for good: keep its inputs and reason under failed/
RELEASE = "release"  # put its inputs back (it was stopped, or never started while stopping)
PARK = "park"  # the container engine is away: start it again when it is back
QUARANTINE = "quarantine"  # an input is damaged: set it aside, put the others back

# How an attempt ended, as the scheduler needs to know it (``Run`` maps executor results)
OK = "ok"  # exit status 0
FAILED_ATTEMPT = "failed"  # any other end the script is to blame for (status, timeout, OOM, bad output)
ENGINE_AWAY = "engine_away"  # could not run for a reason that is not the script's
DAMAGED_INPUT = "damaged"  # not started: an input failed its checksum
NO_CONTAINER = "missing"  # adopt found no container: it never ran (or it is not trusted)


@dataclass(frozen=True)
class Action:
    kind: str  # one of the action constants above
    attempt: int = 0  # for START, ADOPT and RETRY
    kill: bool = False  # ADOPT: kill it at once (the run is stopping)


@dataclass
class ProcessCounts:
    done: int = 0
    running: int = 0  # claimed, container starting, running or retrying
    failed: int = 0


@dataclass
class Scheduler:
    wf: Workflow
    queues: dict[str, SeqQueue] = field(default_factory=dict)  # each sorted, oldest first (compact)
    fired: set[str] = field(default_factory=set)
    stopping: bool = False  # a task failed under on-failure="stop", or cancel
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.load({ch: self.queues.get(ch, ()) for ch in self.wf.channels})
        self.counts = {p: ProcessCounts() for p in self.wf.processes}
        self.claimed: dict[tuple[str, str, str], Claim] = {}
        self.failed_stop = False
        self._mux_by_name = {m.name: m for m in self.wf.muxes}

    # -- start-up --------------------------------------------------------
    def load(self, queues: dict[str, object]) -> None:
        """Set channels' queues (item numbers in any order)."""
        for ch, seqs in queues.items():
            self.queues[ch] = seqs if isinstance(seqs, SeqQueue) else SeqQueue(seqs)

    def adopt(self, claim: Claim) -> None:
        """A task found claimed at start-up (its inputs are not in the queues)."""
        self.claimed[(claim.kind, claim.name, claim.task_id)] = claim
        if claim.kind == PROCESS:
            self.counts[claim.name].running += 1
            if not claim.inputs:
                self.fired.add(claim.name)

    def count_failed(self, process: str, on_failure: str | None = None) -> None:
        """A dead letter found at start-up."""
        if process in self.counts:
            self.counts[process].failed += 1
            if (on_failure or self.wf.processes[process].on_failure) == "stop":
                self.failed_stop = True
                self.stopping = True

    # -- deciding ----------------------------------------------------------
    def step(self, capacity: int | None = None, moves: int | None = None) -> list[Claim]:
        """What to claim now. ``capacity``: containers the caller may still
        start; ``moves``: items muxes may move at most (``None``: all)."""
        if self.stopping:
            return []
        claims: list[Claim] = []
        for mux in self.wf.muxes:
            while moves is None or moves > 0:
                batch: list[tuple[str, int]] = []  # oldest first, across its sources
                while len(batch) < MUX_BATCH and (moves is None or moves > 0):
                    heads = [(q[0], ch) for ch in mux.sources if (q := self.queues[ch])]
                    if not heads:
                        break
                    seq, ch = min(heads)
                    self.queues[ch].popleft()
                    batch.append((ch, seq))
                    moves = None if moves is None else moves - 1
                if not batch:
                    break
                claims.append(self._claim(MUX, mux.name, str(batch[0][1]), tuple(batch)))
        for proc in self.wf.processes.values():
            counts = self.counts[proc.name]
            if not proc.inputs:
                if proc.name in self.fired or (capacity is not None and capacity <= 0):
                    continue
                self.fired.add(proc.name)
                claims.append(self._claim(PROCESS, proc.name, source_task_id(self.wf, proc.name), ()))
                capacity = None if capacity is None else capacity - 1
                continue
            queues = [self.queues[port.channel] for port in proc.inputs]
            while counts.running < proc.parallel and all(queues):
                if capacity is not None and capacity <= 0:
                    break
                inputs = tuple((port.channel, q.popleft()) for port, q in zip(proc.inputs, queues))
                claims.append(self._claim(PROCESS, proc.name, str(inputs[0][1]), inputs))
                capacity = None if capacity is None else capacity - 1
        return claims

    def _claim(self, kind: str, name: str, task_id: str, inputs) -> Claim:
        claim = Claim(kind, name, task_id, tuple(inputs))
        self.claimed[(kind, name, task_id)] = claim
        if kind == PROCESS:
            self.counts[name].running += 1
        return claim

    # -- results -----------------------------------------------------------
    def _unclaim(self, kind: str, name: str, task_id: str) -> Claim:
        claim = self.claimed.pop((kind, name, task_id))
        if kind == PROCESS:
            self.counts[name].running -= 1
        return claim

    def committed(self, kind: str, name: str, task_id: str, outputs: list[tuple[str, int, int]]) -> None:
        """The task's outputs are in their channels: (channel, first SEQ, count) each."""
        self._unclaim(kind, name, task_id)
        if kind == PROCESS:
            self.counts[name].done += 1
        for ch, first, count in outputs:
            self.add_items(ch, first, count)

    def add_item(self, channel: str, seq: int) -> None:
        self.queues[channel].insort(seq)

    def add_items(self, channel: str, first: int, count: int) -> None:
        """``count`` new items numbered from ``first`` on (a split output): one
        run in the channel's queue, O(1) past its last item."""
        self.queues[channel].extend_range(first, count)

    def released(self, kind: str, name: str, task_id: str, skip: frozenset[int] = frozenset()) -> None:
        """The task's inputs went back to their channels, in their old places
        (but those in ``skip``: quarantined as damaged)."""
        claim = self._unclaim(kind, name, task_id)
        for ch, seq in claim.inputs:
            if seq not in skip:
                self.add_item(ch, seq)
        if kind == PROCESS and not claim.inputs:
            self.fired.discard(name)

    def failed(self, name: str, task_id: str) -> bool:
        """Retries are exhausted; the task is a dead letter now. True when the
        run must now stop its other tasks (on-failure="stop")."""
        self._unclaim(PROCESS, name, task_id)
        self.counts[name].failed += 1
        if self.wf.processes[name].on_failure == "stop":
            self.failed_stop = True
            self.stopping = True  # from now on nothing is claimed, retried or started
            return True
        return False

    def cancel(self) -> None:
        """The run is cancelled: nothing more is claimed; the caller stops its tasks."""
        self.cancelled = True
        self.stopping = True

    # -- what to do with a task (every decision on a task's life is here) ---------
    def on_resume(self, attempt: int, first: int = 1) -> Action:
        """A process task found claimed at start-up, whose last attempt is ``attempt``
        (0: claimed but never started; ``first``: its first attempt's number, more
        than 1 for a task ``flowctl retry`` gave another round)."""
        if attempt == 0:
            return Action(RELEASE) if self.stopping else Action(START, first)
        return Action(ADOPT, attempt, kill=self.stopping)

    def on_result(self, name: str, attempt: int, outcome: str, *, stopping: bool,
                  first: int = 1) -> Action:
        """An attempt of a task of process ``name`` ended with ``outcome``;
        ``stopping``: a kill was asked for this task (cancel, or a stop)."""
        if stopping:
            return Action(RELEASE)
        if outcome == ENGINE_AWAY:
            return Action(PARK, attempt)
        if outcome == DAMAGED_INPUT:
            return Action(QUARANTINE)
        if outcome == NO_CONTAINER:
            return Action(START, attempt)  # it never ran: the same attempt again
        if outcome == OK:
            return Action(COLLECT)
        return self.on_failure(name, attempt, first)

    def on_failure(self, name: str, attempt: int, first: int = 1) -> Action:
        """Attempt ``attempt`` failed (its script, or its outputs): retry or give up.
        Attempt numbers go on across a ``flowctl retry`` (its logs are kept), and
        each round has the process's ``retries``: it counts from ``first``."""
        if attempt - first + 1 <= self.wf.processes[name].retries and not self.stopping:
            return Action(RETRY, attempt + 1)
        return Action(DEAD_LETTER)

    # -- state -------------------------------------------------------------
    def has_ready(self) -> bool:
        for mux in self.wf.muxes:
            if any(self.queues[ch] for ch in mux.sources):
                return True
        for proc in self.wf.processes.values():
            if not proc.inputs:
                if proc.name not in self.fired:
                    return True
            elif all(self.queues[p.channel] for p in proc.inputs):
                return True
        return False

    def state(self) -> str:
        if self.claimed:
            return RUNNING
        if self.cancelled:
            return CANCELLED
        if self.failed_stop:
            return FAILED
        if self.wf.mode == "service" or self.has_ready():
            return RUNNING
        return SUCCEEDED

    def depth(self, channel: str) -> int:
        return len(self.queues[channel])


def source_task_id(wf, process: str) -> str:
    """The task id of a process without inputs (it runs once per run).

    Other process tasks are named by their first input's item number, which
    is unique in the run; a source has none, so it is ``s1``, ``s2``... by
    its place among the workflow's sources. Unique in the run: it is a key in
    the scheduler, the store, the executor, container names, logs and FLOWD_TASK.
    """
    k = 0
    for p in wf.processes.values():
        if not p.inputs:
            k += 1
            if p.name == process:
                return f"s{k}"
    raise KeyError(process)
