"""The pure scheduler, driven step by step in memory (no disk, no Docker)."""
from __future__ import annotations

from helpers import proc, wf

from flowd import scheduler as E


def make(w, **queues):
    eng = E.Scheduler(w)
    seq = 1
    for ch, n in queues.items():
        for _ in range(n):
            eng.add_item(ch, seq)
            seq += 1
    return eng


def finish(eng, claim, outputs=()):
    """Commit ``claim`` with ``outputs``: (channel, seq) each."""
    eng.committed(claim.kind, claim.name, claim.task_id, [(ch, seq, 1) for ch, seq in outputs])


def test_process_ready_only_when_every_input_has_an_item():
    w = wf(channels={"a": [], "b": [], "out": []}, processes=[proc("join", "a b", "out")])
    eng = make(w, a=2)
    assert eng.step() == []
    eng.add_item("b", 10)
    (claim,) = eng.step()
    assert claim.inputs == (("a", 1), ("b", 10))


def test_join_pairs_the_ith_items_fifo():
    w = wf(channels={"a": [], "b": [], "out": []},
           processes=[proc("join", "a b", "out", parallel=5)])
    eng = E.Scheduler(w)
    for s in (1, 2, 3):
        eng.add_item("a", s)
    for s in (4, 5, 6):
        eng.add_item("b", s)
    claims = eng.step()
    assert [c.inputs for c in claims] == [
        (("a", 1), ("b", 4)), (("a", 2), ("b", 5)), (("a", 3), ("b", 6))]


def test_parallel_limits_claims_per_process():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out", parallel=2)])
    eng = make(w, a=5)
    assert len(eng.step()) == 2
    assert eng.step() == []
    claim = next(iter(eng.claimed.values()))
    finish(eng, claim)
    assert len(eng.step()) == 1


def test_global_capacity_is_respected():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out", parallel=10)])
    eng = make(w, a=5)
    assert len(eng.step(capacity=3)) == 3
    assert eng.step(capacity=0) == []


def test_source_process_runs_exactly_once():
    w = wf(channels={"out": []}, processes=[proc("gen", "", "out")])
    eng = E.Scheduler(w)
    (claim,) = eng.step()
    assert claim.inputs == () and claim.task_id == "s1"
    finish(eng, claim, [("out", 1)])
    assert eng.step() == []
    assert eng.state() == E.SUCCEEDED


def test_fan_out_mux_claims_each_item_once_and_targets_get_copies():
    w = wf(channels={"a": [], "b": [], "c": []}, muxes=[("a", "b c")])
    eng = make(w, a=2)
    (claim,) = eng.step()  # one mux task moves both
    assert claim.kind == E.MUX and claim.inputs == (("a", 1), ("a", 2))
    assert eng.step() == []  # each item claimed once
    finish(eng, claim, [("b", 3), ("c", 4), ("b", 5), ("c", 6)])
    assert list(eng.queues["b"]) == [3, 5] and list(eng.queues["c"]) == [4, 6]
    assert eng.state() == E.SUCCEEDED


def test_mux_tasks_hold_at_most_a_batch_and_moves_bound_a_step():
    w = wf(channels={"a": [], "b": []}, muxes=[("a", "b")])
    eng = make(w, a=E.MUX_BATCH * 2 + 1)
    claims = eng.step()
    assert [len(c.inputs) for c in claims] == [E.MUX_BATCH, E.MUX_BATCH, 1]
    assert [seq for c in claims for _, seq in c.inputs] == list(range(1, 2 * E.MUX_BATCH + 2))
    eng = make(w, a=10)
    assert [len(c.inputs) for c in eng.step(moves=4)] == [4]
    assert [len(c.inputs) for c in eng.step(moves=4)] == [4]
    assert [c.inputs for c in eng.step()] == [(("a", 9), ("a", 10))]


def test_merge_mux_takes_oldest_item_first_across_sources():
    w = wf(channels={"x": [], "y": [], "m": []}, muxes=[("x y", "m")])
    eng = E.Scheduler(w)
    eng.add_item("y", 1)
    eng.add_item("x", 2)
    eng.add_item("y", 3)
    (claim,) = eng.step()
    assert claim.inputs == (("y", 1), ("x", 2), ("y", 3))


def test_released_inputs_go_back_to_the_head_in_order():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out")])
    eng = make(w, a=3)
    (claim,) = eng.step()
    eng.released(claim.kind, claim.name, claim.task_id)
    assert list(eng.queues["a"]) == [1, 2, 3]


def test_failure_under_stop_ends_run_failed_and_claims_nothing_more():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out")])
    eng = make(w, a=3)
    (claim,) = eng.step()
    eng.failed(claim.name, claim.task_id)
    assert eng.step() == []
    assert eng.state() == E.FAILED
    assert list(eng.queues["a"]) == [2, 3]  # unconsumed items are kept


def test_failure_under_continue_goes_on_and_succeeds():
    w = wf(channels={"a": [], "out": []},
           processes=[proc("p", "a", "out", on_failure="continue")])
    eng = make(w, a=2)
    (claim,) = eng.step()
    eng.failed(claim.name, claim.task_id)
    (claim,) = eng.step()
    finish(eng, claim)
    assert eng.state() == E.SUCCEEDED
    assert eng.counts["p"].failed == 1 and eng.counts["p"].done == 1


def test_batch_run_is_running_while_a_task_is_claimed():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out")])
    eng = make(w, a=1)
    eng.step()
    assert eng.state() == E.RUNNING


def test_service_run_stays_open_until_cancelled():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out")], mode="service")
    eng = E.Scheduler(w)
    assert eng.state() == E.RUNNING
    eng.cancel()
    assert eng.state() == E.CANCELLED


def test_cancel_waits_for_claimed_tasks_to_be_released():
    w = wf(channels={"a": [], "out": []}, processes=[proc("p", "a", "out")])
    eng = make(w, a=1)
    (claim,) = eng.step()
    eng.cancel()
    assert eng.state() == E.RUNNING
    eng.released(claim.kind, claim.name, claim.task_id)
    assert eng.state() == E.CANCELLED
    assert list(eng.queues["a"]) == [1]


def test_process_that_can_never_run_does_not_keep_a_batch_run_open():
    w = wf(channels={"a": [], "b": [], "out": []}, processes=[proc("p", "a b", "out")])
    eng = make(w, a=3)
    assert eng.step() == []
    assert eng.state() == E.SUCCEEDED


# -- what happens to a task: every decision is the engine's (microseconds each) -----
def _one(retries=2, on_failure="stop", **queues):
    w = wf(channels={"a": [], "out": []},
           processes=[proc("p", "a", "out", retries=retries, on_failure=on_failure)])
    return make(w, **(queues or {"a": 3}))


def test_a_failed_attempt_is_retried_with_the_next_number_until_retries_run_out():
    eng = _one(retries=2)
    assert eng.on_result("p", 1, E.FAILED_ATTEMPT, stopping=False) == E.Action(E.RETRY, 2)
    assert eng.on_result("p", 2, E.FAILED_ATTEMPT, stopping=False) == E.Action(E.RETRY, 3)
    assert eng.on_result("p", 3, E.FAILED_ATTEMPT, stopping=False) == E.Action(E.DEAD_LETTER)
    assert eng.on_failure("p", 3) == E.Action(E.DEAD_LETTER)  # bad outputs: the same rule



def test_after_flowctl_retry_attempts_go_on_from_the_last_with_the_retries_again():
    eng = _one(retries=1)
    # the task failed at attempts 1 and 2; the retry's round starts at 3
    assert eng.on_resume(0, first=3) == E.Action(E.START, 3)
    assert eng.on_result("p", 3, E.FAILED_ATTEMPT, stopping=False, first=3) == E.Action(E.RETRY, 4)
    assert eng.on_result("p", 4, E.FAILED_ATTEMPT, stopping=False, first=3) == E.Action(E.DEAD_LETTER)
    assert eng.on_failure("p", 3, 3) == E.Action(E.RETRY, 4)

def test_each_way_an_attempt_ends_has_its_action():
    eng = _one()
    assert eng.on_result("p", 1, E.OK, stopping=False) == E.Action(E.COLLECT)
    assert eng.on_result("p", 2, E.ENGINE_AWAY, stopping=False) == E.Action(E.PARK, 2)
    assert eng.on_result("p", 1, E.DAMAGED_INPUT, stopping=False) == E.Action(E.QUARANTINE)
    # no container: it never ran, so the same attempt starts again (no retry spent)
    assert eng.on_result("p", 2, E.NO_CONTAINER, stopping=False) == E.Action(E.START, 2)
    # a task asked to stop is released, whatever its container said
    for outcome in (E.OK, E.FAILED_ATTEMPT, E.ENGINE_AWAY, E.DAMAGED_INPUT, E.NO_CONTAINER):
        assert eng.on_result("p", 1, outcome, stopping=True) == E.Action(E.RELEASE)


def test_a_failure_under_stop_stops_the_run_and_nothing_is_retried_after():
    eng = _one(retries=5, on_failure="stop", a=3)
    (first,) = eng.step()  # parallel=1: one task at a time
    assert eng.failed("p", first.task_id) is True  # the caller stops the others now
    assert eng.stopping and eng.step() == []
    # a retry is never started while stopping; the other task dead-letters instead
    assert eng.on_failure("p", 1) == E.Action(E.DEAD_LETTER)


def test_continue_does_not_stop_the_run():
    eng = _one(on_failure="continue", a=2)
    (claim,) = eng.step()
    assert eng.failed("p", claim.task_id) is False
    assert not eng.stopping and len(eng.step()) == 1


def test_resume_starts_never_started_claims_and_adopts_started_ones():
    eng = _one()
    assert eng.on_resume(0) == E.Action(E.START, 1)
    assert eng.on_resume(3) == E.Action(E.ADOPT, 3, kill=False)
    eng.cancel()
    assert eng.stopping  # what a cancel is to the scheduler: claim nothing more
    assert eng.on_resume(0) == E.Action(E.RELEASE)  # cancelled: never start it
    assert eng.on_resume(3) == E.Action(E.ADOPT, 3, kill=True)  # find it, and stop it


def test_a_channel_queue_keeps_fifo_order_through_takes_and_put_backs():
    """SeqQueue (a channel's compact queue) behaves as the sorted deque it replaced."""
    from flowd.seqqueue import COMPACT_AT, SeqQueue

    q = SeqQueue([5, 1, 3])
    assert list(q) == [1, 3, 5] and len(q) == 3 and q[0] == 1 and q[-1] == 5
    assert q.popleft() == 1
    q.insort(1)  # a released item goes back to its old place
    q.insort(4)
    q.append(9)
    assert list(q) == [1, 3, 4, 5, 9] and list(q.after(3)) == [4, 5, 9]
    big = SeqQueue(range(3 * COMPACT_AT, 0, -1))  # given in any order
    taken = [big.popleft() for _ in range(2 * COMPACT_AT)]  # compacts on the way
    assert taken == list(range(1, 2 * COMPACT_AT + 1))
    big.insort(7)
    assert list(big) == [7] + list(range(2 * COMPACT_AT + 1, 3 * COMPACT_AT + 1))
    assert list(big.after(3 * COMPACT_AT - 2)) == [3 * COMPACT_AT - 1, 3 * COMPACT_AT]
    while big:
        big.popleft()
    assert not big and len(big) == 0 and list(big.after(0)) == []
