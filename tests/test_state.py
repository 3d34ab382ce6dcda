"""RunState, driven directly: every transition without sockets, threads or clocks."""

from __future__ import annotations

import random

import pytest

from odibi_actor import DAGBuilder, RunState, State
from odibi_actor._state import Failed, Retry, backoff_delay


def f(*args):
    return None


def diamond(retries: int = 0, retry_delay: float = 0.1):
    b = DAGBuilder()
    b.add_node("top", f, outputs=["t"], retries=retries, retry_delay=retry_delay)
    b.add_node("left", f, inputs=["t"], outputs=["l"], retries=retries, retry_delay=retry_delay)
    b.add_node("right", f, inputs=["t"], outputs=["r"], retries=retries, retry_delay=retry_delay)
    b.add_node("bottom", f, inputs=["l", "r"], outputs=["o"])
    return b.build()


def fan(n: int, retries: int = 0):
    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"r{i}", f, outputs=[f"o{i}"], retries=retries)
    return b.build()


# --- readiness ---------------------------------------------------------------------------
def test_diamond_readiness_order():
    s = RunState(diamond())
    assert s.total == 4 and s.ready_count == 1
    assert s.status("bottom").state is State.WAITING and s.status("bottom").missing == 2
    assert s.take(10) == [("top", 1)]
    assert s.take(10) == []  # nothing else is ready while top runs
    assert s.status("top").state is State.RUNNING and s.running == 1
    assert sorted(s.complete("top", 1)) == ["left", "right"]
    assert s.status("left").state is State.READY
    taken = s.take(10)
    assert sorted(taken) == [("left", 1), ("right", 1)]
    assert s.complete("left", 1) == []  # bottom still misses right
    assert s.status("bottom").state is State.WAITING and s.status("bottom").missing == 1
    assert s.take(10) == []
    assert s.complete("right", 1) == ["bottom"]
    assert s.take(10) == [("bottom", 1)]
    assert not s.finished
    assert s.complete("bottom", 1) == []
    assert s.done == 4 and s.running == 0 and s.finished
    assert all(s.status(n).state is State.DONE for n in ("top", "left", "right", "bottom"))


def test_take_respects_the_limit():
    s = RunState(fan(10))
    assert s.ready_count == 10
    first = s.take(3)
    assert len(first) == 3 and s.running == 3 and s.ready_count == 7
    assert s.take(0) == []
    second = s.take(4)
    assert len(second) == 4 and s.running == 7
    rest = s.take(100)
    assert len(rest) == 3
    names = [n for n, _ in first + second + rest]
    assert sorted(names) == sorted(f"r{i}" for i in range(10))  # each handed out once
    assert s.take(100) == []


def test_already_done_nodes():
    s = RunState(diamond(), done=["top", "left"])
    assert s.done == 2
    assert s.take(10) == [("right", 1)]
    assert s.complete("right", 1) == ["bottom"]


# --- stale and duplicate events ----------------------------------------------------------
def test_complete_twice_or_stale_is_ignored_and_not_counted():
    s = RunState(fan(2))
    s.take(2)
    assert s.complete("r0", 1) == []
    assert s.done == 1 and s.running == 1
    assert s.complete("r0", 1) is None  # duplicate
    assert s.complete("r1", 2) is None  # attempt 2 was never handed out
    assert s.complete("nope", 1) is None  # not a node
    assert s.done == 1 and s.running == 1
    assert s.complete("r1", 1) == []
    assert s.done == 2 and s.running == 0 and s.finished


def test_stale_attempt_after_retry_is_ignored():
    s = RunState(fan(1, retries=1))
    s.take(1)
    assert isinstance(s.fail("r0", 1, "E: x", "tb", now=0.0), Retry)
    assert s.complete("r0", 1) is None  # attempt 1 reports late: it is no longer current
    assert s.fail("r0", 1, "E", "", now=0.0) is None
    s.release_retries(now=100.0)
    assert s.take(1) == [("r0", 2)]
    assert s.complete("r0", 1) is None
    assert s.done == 0 and s.running == 1
    assert s.complete("r0", 2) == []
    assert s.done == 1


# --- retries and failure -----------------------------------------------------------------
def test_fail_with_retries_left_gives_retry_then_ready_again():
    s = RunState(fan(1, retries=2))
    assert s.take(1) == [("r0", 1)]
    verdict = s.fail("r0", 1, "ValueError: x", "Traceback...", now=10.0)
    assert isinstance(verdict, Retry)
    assert verdict.node == "r0" and verdict.attempt == 1
    assert 10.0 + 0.05 <= verdict.at <= 10.0 + 0.1  # base 0.1, first retry, jitter 0.5..1
    st = s.status("r0")
    assert st.state is State.BACKOFF and st.error == "ValueError: x"
    assert s.running == 0 and not s.finished and not s.stopping
    assert s.next_retry_at() == verdict.at
    assert s.take(1) == []  # backing off is not ready
    assert s.release_retries(now=verdict.at - 0.001) == []
    assert s.release_retries(now=verdict.at) == ["r0"]
    assert s.status("r0").state is State.READY
    assert s.next_retry_at() is None
    assert s.take(1) == [("r0", 2)]
    second = s.fail("r0", 2, "ValueError: y", "", now=20.0)
    assert isinstance(second, Retry)
    assert 20.0 + 0.1 <= second.at <= 20.0 + 0.2  # the backoff doubled
    s.release_retries(now=second.at)
    assert s.take(1) == [("r0", 3)]
    last = s.fail("r0", 3, "ValueError: z", "tb3", now=30.0)
    assert last == Failed("r0", 3, "ValueError: z", "tb3")


def test_zero_delay_retry_is_due_at_once():
    b = DAGBuilder().add_node("z", f, retries=1, retry_delay=0)
    s2 = RunState(b.build())
    s2.take(1)
    v2 = s2.fail("z", 1, "E", "", now=5.0)
    assert isinstance(v2, Retry) and v2.at == 5.0
    assert s2.release_retries(now=5.0) == ["z"]


def test_last_failure_stops_the_run_but_running_branches_finish():
    s = RunState(fan(3))
    assert len(s.take(3)) == 3
    verdict = s.fail("r0", 1, "KeyError: 'k'", "tb", now=0.0)
    assert verdict == Failed("r0", 1, "KeyError: 'k'", "tb")
    assert s.failure == verdict
    assert s.status("r0").state is State.FAILED
    assert s.stopping
    assert not s.finished  # r1 and r2 still run
    assert s.complete("r1", 1) == []  # a running branch still completes
    assert s.status("r1").state is State.DONE and s.done == 1
    assert not s.finished
    assert s.complete("r2", 1) == []
    assert s.finished and s.running == 0


def test_stopping_blocks_take_even_for_newly_ready_nodes():
    s = RunState(diamond())
    s.take(1)
    s.complete("top", 1)
    s.take(2)
    assert isinstance(s.fail("left", 1, "E", "", now=0.0), Failed)
    assert s.complete("right", 1) == []  # bottom still waits on the failed left
    assert s.take(10) == []
    assert s.finished


def test_no_retry_once_stopping():
    b = DAGBuilder()
    b.add_node("bad", f, outputs=["x"])
    b.add_node("flaky", f, outputs=["y"], retries=5)
    s = RunState(b.build())
    s.take(2)
    assert isinstance(s.fail("bad", 1, "E1", "", now=0.0), Failed)
    later = s.fail("flaky", 1, "E2", "", now=0.0)
    assert isinstance(later, Failed)  # no point retrying: the run is over
    assert s.failure.node == "bad"  # the first failure is the run's failure
    assert s.next_retry_at() is None
    assert s.finished


def test_finished_semantics():
    s = RunState(fan(2))
    assert not s.finished
    s.take(1)
    assert not s.finished
    s.complete("r0", 1)
    assert not s.finished  # r1 never ran
    s.take(1)
    s.complete("r1", 1)
    assert s.finished
    empty = RunState({})
    assert empty.finished and empty.total == 0


def test_cancel_stops_and_finishes_when_drained():
    s = RunState(fan(3))
    s.take(1)
    s.cancel()
    assert s.stopping and s.cancelled
    assert s.take(5) == []
    assert not s.finished
    s.complete("r0", 1)
    assert s.finished and s.failure is None


def test_backoff_node_does_not_block_finishing_after_failure():
    b = DAGBuilder()
    b.add_node("a", f, outputs=["x"], retries=3)
    b.add_node("b", f, outputs=["y"])
    s = RunState(b.build())
    s.take(2)
    assert isinstance(s.fail("a", 1, "E", "", now=0.0), Retry)
    assert isinstance(s.fail("b", 1, "E", "", now=0.0), Failed)
    assert s.finished
    s.release_retries(now=1e9)
    assert s.take(5) == []


# --- requeue and lose --------------------------------------------------------------------
def test_requeue_puts_the_attempt_back_first_without_counting_a_failure():
    s = RunState(fan(3))
    taken = s.take(2)
    assert taken == [("r0", 1), ("r1", 1)]
    assert s.requeue("r1", 1) is True
    assert s.running == 1
    assert s.status("r1").state is State.READY and s.status("r1").error is None
    assert s.requeue("r1", 1) is False  # not running any more
    assert s.requeue("r0", 7) is False  # stale attempt
    assert s.take(1) == [("r1", 2)]  # back at the front of the queue, as a new attempt
    assert s.take(1) == [("r2", 1)]


def test_lose_requeues_until_allowed_then_fails_as_poison():
    s = RunState(fan(1))
    s.take(1)
    assert s.lose("r0", 1, "worker local-0 exited with code -9", allowed=3) is True
    assert s.status("r0").lost == 1
    assert s.take(1) == [("r0", 2)]
    assert s.lose("r0", 2, "worker local-1 exited", allowed=3) is True
    assert s.take(1) == [("r0", 3)]
    verdict = s.lose("r0", 3, "worker local-2 exited with code -9", allowed=3)
    assert isinstance(verdict, Failed)
    assert verdict.node == "r0" and verdict.attempts == 3
    assert "PoisonTaskError" in verdict.error
    assert "node 'r0'" in verdict.error
    assert "3 workers" in verdict.error
    assert "worker local-2 exited with code -9" in verdict.error
    assert s.failure == verdict and s.status("r0").state is State.FAILED
    assert s.running == 0 and s.finished


def test_lose_with_one_allowed_fails_at_once_and_stale_is_ignored():
    s = RunState(fan(2))
    s.take(2)
    assert s.lose("r0", 9, "gone", allowed=1) is None  # not the current attempt
    assert s.status("r0").lost == 0
    verdict = s.lose("r0", 1, "gone", allowed=1)
    assert isinstance(verdict, Failed) and "PoisonTaskError" in verdict.error
    assert s.lose("r0", 1, "gone", allowed=1) is None
    assert s.running == 1


def test_requeued_attempt_does_not_use_up_retries():
    # requeue() is "without counting it as a failure": a task a leaving worker handed
    # back unstarted must keep its whole retry budget
    s = RunState(fan(1, retries=1))
    s.take(1)
    assert s.requeue("r0", 1) is True
    assert s.take(1) == [("r0", 2)]
    verdict = s.fail("r0", 2, "ValueError: first real failure", "", now=0.0)
    assert isinstance(verdict, Retry), verdict


# --- backoff -----------------------------------------------------------------------------
def test_backoff_delay_grows_with_jitter_bounds():
    random.seed(1234)
    base = 0.1
    for attempt in range(1, 9):
        full = base * 2 ** (attempt - 1)
        samples = [backoff_delay(base, attempt) for _ in range(300)]
        assert all(0.5 * full <= d <= full for d in samples), attempt
        assert max(samples) - min(samples) > 0.2 * full  # it is jittered, not fixed
    means = [sum(backoff_delay(base, a) for _ in range(200)) / 200 for a in range(1, 6)]
    assert means == sorted(means) and means[-1] > 10 * means[0]


def test_backoff_delay_is_capped():
    for attempt in (12, 20, 60):
        for _ in range(50):
            assert 15.0 <= backoff_delay(1.0, attempt) <= 30.0
    assert backoff_delay(1.0, 20, cap=2.0) <= 2.0


@pytest.mark.parametrize("attempt", [1100, 5000])
def test_backoff_delay_is_capped_for_very_many_attempts(attempt):
    # retries is any int >= 0, so attempts past 1024 are legal: the cap must still hold
    assert 15.0 <= backoff_delay(0.1, attempt) <= 30.0


def test_no_backoff_without_a_base():
    assert backoff_delay(0, 3) == 0.0
    assert backoff_delay(-1, 3) == 0.0
