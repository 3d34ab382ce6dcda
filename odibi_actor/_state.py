"""The run's state machine: no sockets, no awaits, no clocks of its own.

The scheduler actor feeds it events (a task finished, failed, time passed) and acts on
what it returns. Keeping it sans-I/O makes every transition testable directly and keeps
each one O(1) in the size of the DAG, which is what lets 100,000-node runs stay flat.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from ._dag import DAGNode


class State(Enum):
    WAITING = "waiting"  # some dependency is not done yet
    READY = "ready"  # all inputs exist, not handed out
    RUNNING = "running"  # handed out as attempt ``attempt``
    BACKOFF = "backoff"  # failed, waiting to be retried
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class NodeStatus:
    state: State
    missing: int  # dependencies not done yet
    attempt: int = 0  # the attempt currently or last handed out
    lost: int = 0  # attempts whose worker died under them
    failures: int = 0  # attempts that failed (requeued and lost ones do not count)
    error: str | None = None
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """A failed attempt that will be retried once ``at`` has passed."""

    node: str
    attempt: int
    at: float


@dataclass(frozen=True, slots=True)
class Failed:
    """A failed attempt that was the node's last: the run is failing."""

    node: str
    attempts: int
    error: str
    traceback: str


Ignored = None  # an event about an attempt that is no longer current


def backoff_delay(base: float, failed_attempt: int, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter, so retries of many nodes do not stampede."""
    if base <= 0:
        return 0.0
    exponent = min(failed_attempt - 1, 60)  # 2**60 * any base is past any cap
    return random.uniform(0.5, 1.0) * min(cap, base * 2.0**exponent)


class RunState:
    """Which nodes wait, are ready, run, back off, are done or failed, and which attempt."""

    def __init__(self, nodes: Mapping[str, DAGNode], done: Iterable[str] = ()) -> None:
        self._nodes = nodes
        self._status: dict[str, NodeStatus] = {}
        self._ready: deque[str] = deque()
        self._backoff: list[tuple[float, str, int]] = []
        self.running = 0
        self.done = 0
        self.failure: Failed | None = None
        self.cancelled = False
        self.reopened = False  # some done node had to run again (its output was lost)
        already = set(done)
        for name in nodes:
            if name in already:
                self._status[name] = NodeStatus(State.DONE, 0)
                self.done += 1
        for name, node in nodes.items():
            if name in already:
                continue
            missing = sum(1 for d in node.dependencies if d not in already)
            state = State.WAITING if missing else State.READY
            self._status[name] = NodeStatus(state, missing)
            if not missing:
                self._ready.append(name)

    # --- queries -------------------------------------------------------------------------
    def status(self, name: str) -> NodeStatus:
        return self._status[name]

    @property
    def total(self) -> int:
        return len(self._status)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def finished(self) -> bool:
        """True once nothing more will run: all done, or failed/cancelled and drained."""
        if self.running:
            return False
        return self.done == self.total or self.failure is not None or self.cancelled

    @property
    def stopping(self) -> bool:
        """No new attempts are handed out; running branches are allowed to finish."""
        return self.failure is not None or self.cancelled

    def next_retry_at(self) -> float | None:
        return self._backoff[0][0] if self._backoff else None

    # --- transitions ---------------------------------------------------------------------
    def take(self, limit: int) -> list[tuple[str, int]]:
        """Hand out up to ``limit`` ready nodes as new attempts: ``(name, attempt)``."""
        if self.stopping:
            return []
        out = []
        ready, status = self._ready, self._status
        while ready and len(out) < limit:
            name = ready.popleft()
            st = status[name]
            if st.state is not State.READY:  # left behind when a reopened node made it wait
                continue
            st.state = State.RUNNING
            st.attempt += 1
            out.append((name, st.attempt))
        self.running += len(out)
        return out

    def complete(self, name: str, attempt: int) -> list[str] | None:
        """Record a success. Returns the nodes it made ready, or ``None`` if stale."""
        st = self._status.get(name)
        if st is None or st.state is not State.RUNNING or st.attempt != attempt:
            return Ignored
        st.state = State.DONE
        self.running -= 1
        self.done += 1
        newly = []
        status = self._status
        for child in self._nodes[name].dependents:
            cst = status[child]
            cst.missing -= 1
            if cst.missing == 0 and cst.state is State.WAITING:
                cst.state = State.READY
                newly.append(child)
        self._ready.extend(newly)
        return newly

    def fail(
        self, name: str, attempt: int, error: str, traceback: str, now: float
    ) -> Retry | Failed | None:
        """Record a failed attempt: schedule a retry, or fail the run if it was the last."""
        st = self._status.get(name)
        if st is None or st.state is not State.RUNNING or st.attempt != attempt:
            return Ignored
        self.running -= 1
        st.error, st.traceback = error, traceback
        st.failures += 1
        node = self._nodes[name]
        if st.failures <= node.retries and not self.stopping:
            at = now + backoff_delay(node.retry_delay, attempt)
            st.state = State.BACKOFF
            heapq.heappush(self._backoff, (at, name, attempt))
            return Retry(name, attempt, at)
        st.state = State.FAILED
        outcome = Failed(name, attempt, error, traceback)
        if self.failure is None:
            self.failure = outcome
        return outcome

    def release_retries(self, now: float) -> list[str]:
        """Move nodes whose backoff has passed back to ready."""
        released = []
        while self._backoff and self._backoff[0][0] <= now:
            _, name, _ = heapq.heappop(self._backoff)
            st = self._status[name]
            if st.state is State.BACKOFF and not self._must_wait(name, st):
                st.state = State.READY
                released.append(name)
        self._ready.extend(released)
        return released

    def requeue(self, name: str, attempt: int) -> bool:
        """Put a handed-out attempt back without counting it as a failure (a worker left)."""
        st = self._status.get(name)
        if st is None or st.state is not State.RUNNING or st.attempt != attempt:
            return False
        self.running -= 1
        if not self._must_wait(name, st):
            st.state = State.READY
            self._ready.appendleft(name)
        return True

    def lose(self, name: str, attempt: int, reason: str, allowed: int) -> bool | Failed | None:
        """A worker died running this attempt: requeue it, unless it already killed
        ``allowed`` workers, in which case it is a poison task and fails the run."""
        st = self._status.get(name)
        if st is None or st.state is not State.RUNNING or st.attempt != attempt:
            return Ignored
        st.lost += 1
        if st.lost < allowed:
            return self.requeue(name, attempt)
        self.running -= 1
        st.state = State.FAILED
        error = (
            f"PoisonTaskError: node {name!r} was running on {st.lost} workers that died"
            f" ({reason}); not retrying it again"
        )
        st.error = error
        outcome = Failed(name, attempt, error, "")
        if self.failure is None:
            self.failure = outcome
        return outcome

    def cancel(self) -> None:
        self.cancelled = True

    def reopen(self, names: Iterable[str]) -> list[str]:
        """Done nodes whose outputs were lost must run again: each becomes ready (or waits
        for those of its dependencies reopened with it), and dependents that were ready or
        waiting wait for it again. Returns the nodes reopened (those that were done)."""
        status = self._status
        names = [n for n in dict.fromkeys(names) if status[n].state is State.DONE]
        if not names:
            return []
        self.reopened = True
        for name in names:
            status[name].state = State.WAITING
        self.done -= len(names)
        for name in names:
            st = status[name]
            st.missing = self._missing(name)
            if not st.missing:
                st.state = State.READY
                self._ready.append(name)
        reopened = set(names)
        for name in names:
            for child in self._nodes[name].dependents:
                cst = status[child]
                if child in reopened:
                    continue  # counted above
                if cst.state is State.WAITING:
                    cst.missing += 1
                elif cst.state is State.READY:
                    cst.missing += 1
                    cst.state = State.WAITING  # its entry in the ready queue is skipped
        return names

    def _missing(self, name: str) -> int:
        status = self._status
        return sum(1 for d in self._nodes[name].dependencies if status[d].state is not State.DONE)

    def _must_wait(self, name: str, st: NodeStatus) -> bool:
        """Going back to ready: once done nodes were reopened, a dependency may be missing."""
        if not self.reopened:
            return False
        st.missing = self._missing(name)
        if st.missing:
            st.state = State.WAITING
            return True
        return False
