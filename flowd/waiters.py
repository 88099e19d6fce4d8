"""The ``status --wait`` requests waiting for their run to end: bounded and in a heap."""
from __future__ import annotations

import heapq
from dataclasses import dataclass

WAITERS_PER_PEER = 16  # status --wait requests one client may have waiting
MAX_WAITERS = 4096  # all clients together


@dataclass(eq=False)
class Waiter:
    """A ``status --wait`` request waiting for its run to end."""

    run_id: str
    peer: bytes
    req_id: str
    seq: int
    live: bool = True


class Waiters:
    """The waiting ``status`` requests: a heap by deadline, at most ``per_peer``
    per client and ``total`` in all (beyond that the oldest are answered at
    once, with the run as it is: a client asks again). libzmq as packaged
    does not tell a ROUTER when a peer goes (ZMQ_ROUTER_NOTIFY is a draft
    option, refused by both pyzmq 24's and today's), so the caps and the
    deadline (at most protocol.MAX_WAIT) are the bound on a gone client's."""

    def __init__(self, per_peer: int, total: int):
        self.per_peer, self.total = per_peer, total
        self.heap: list[tuple[float, int, Waiter]] = []
        self.by_peer: dict[bytes, dict[int, Waiter]] = {}  # in arrival order
        self.by_run: dict[str, dict[int, Waiter]] = {}
        self.live = 0
        self._seq = 0

    def __len__(self) -> int:
        return self.live

    def add(self, deadline: float, run_id: str, peer: bytes, req_id: str) -> list[Waiter]:
        """Queue a waiter; returns those it pushes out (to be answered now)."""
        self._seq += 1
        w = Waiter(run_id, peer, req_id, self._seq)
        heapq.heappush(self.heap, (deadline, w.seq, w))
        self.by_peer.setdefault(peer, {})[w.seq] = w
        self.by_run.setdefault(run_id, {})[w.seq] = w
        self.live += 1
        out = []
        mine = self.by_peer[peer]
        while len(mine) > self.per_peer:
            out.append(self._drop(next(iter(mine.values()))))
        while self.live > self.total:
            out.append(self._drop(self._pop_live()))
        self._compact()
        return out

    def next_deadline(self) -> float:
        return self.heap[0][0] if self.heap else float("inf")

    def due(self, now: float, ended) -> list[Waiter]:
        """Those whose run ``ended(run_id)`` and those whose deadline passed."""
        out = []
        for run_id in [r for r in self.by_run if ended(r)]:
            out += [self._drop(w) for w in list(self.by_run[run_id].values())]
        while self.heap and self.heap[0][0] <= now:
            w = heapq.heappop(self.heap)[2]
            if w.live:
                out.append(self._drop(w))
        self._compact()
        return out

    def _pop_live(self) -> Waiter:
        while True:
            w = heapq.heappop(self.heap)[2]
            if w.live:
                return w

    def _drop(self, w: Waiter) -> Waiter:
        w.live = False
        self.live -= 1
        for index, key in ((self.by_peer, w.peer), (self.by_run, w.run_id)):
            entries = index[key]
            del entries[w.seq]
            if not entries:
                del index[key]
        return w

    def _compact(self) -> None:
        """Entries answered early stay in the heap until popped: rebuilt when
        they outnumber the live ones, so the heap stays O(live)."""
        if len(self.heap) > 2 * self.live + 64:
            self.heap = [e for e in self.heap if e[2].live]
            heapq.heapify(self.heap)
