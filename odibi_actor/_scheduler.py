"""The scheduler actor: drives :class:`RunState`, holds the datasets, feeds a dispatcher.

It hands out work only against credit the dispatcher granted, so queues stay bounded
however large the DAG, and it dispatches a node the moment its inputs exist.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ._dag import DAGNode
from ._durable import CACHE_WORKER, CacheMiss, RunDurability
from ._holdings import Holdings
from ._kernel import Actor, ActorRef
from ._logging import get_logger
from ._messages import (
    Abort,
    Credit,
    DataLost,
    Dispatch,
    DropData,
    Outcomes,
    RetryDue,
    Returned,
    TaskSpec,
)
from ._state import Failed, Retry, RunState
from .errors import NodeFailedError
from .metrics import MetricsManager

log = get_logger("odibi_actor.scheduler")


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for progress displays."""

    total: int
    done: int
    running: int
    failed: int
    ready: int


class RunResult:
    """Where the scheduler leaves its verdict; the executor waits on ``finished``."""

    def __init__(self) -> None:
        self.finished = anyio.Event()
        self.error: BaseException | None = None


@dataclass(slots=True)
class JournalDue:
    """Scheduler -> itself: journal the completions taken so far.

    Sent to its own mailbox, so the dispatch those completions made possible reaches the
    workers first and the hashing and journaling overlap with their work."""


class Hooks:
    """The odibi_core ``tracker`` and ``events`` objects, and a progress callback.

    Each is optional and called defensively: a broken observer must not break a run.
    """

    def __init__(
        self,
        tracker: Any = None,
        events: Any = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.tracker, self.events, self.progress = tracker, events, progress
        self.per_node = tracker is not None or events is not None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("observer raised; ignoring", hook=what, error=repr(exc))

    def started(self, node: DAGNode, attempt: int) -> None:
        if self.tracker is not None and hasattr(self.tracker, "start_step"):
            self.call("tracker.start_step", self.tracker.start_step, node.name, node.level)
        if self.events is not None:
            self.call("events.emit", self.events.emit, "step_start", step=node, attempt=attempt)

    def ended(self, node: DAGNode, status: str, duration: float, error: str | None) -> None:
        if self.tracker is not None and hasattr(self.tracker, "end_step"):
            self.call("tracker.end_step", self.tracker.end_step, node.name, status, error)
        if self.events is not None:
            name = {"success": "step_complete"}.get(status, "step_error")
            self.call(
                "events.emit",
                self.events.emit,
                name,
                step=node,
                duration=duration,
                status=status,
                error=error,
            )


class Scheduler(Actor):
    def __init__(
        self,
        nodes: Mapping[str, DAGNode],
        data: dict[str, Any],
        dispatcher: Callable[[], ActorRef[Any]],
        metrics: MetricsManager,
        result: RunResult,
        hooks: Hooks,
        allowed_failures: int = 3,
        run_id: str = "",
        durable: RunDurability | None = None,
        restored: Iterable[str] = (),
        requested: Iterable[str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.durable = durable
        self.nodes = nodes
        self.names = list(nodes)
        self.order = [nodes[n] for n in self.names]
        self.data = data
        self._dispatcher = dispatcher
        self.metrics = metrics
        self.result = result
        self.hooks = hooks
        self.allowed_failures = allowed_failures
        self.restored = set(restored)  # done in an earlier run (resume)
        self.state = RunState(nodes, done=self.restored)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.credit = 0
        # tasks the cache could not answer: they need worker slots, which sending them to
        # the cache did not take
        self._missed: deque[TaskSpec] = deque()
        self._timer_armed_for: float | None = None
        self._journal_told = False
        self.failed_workers: dict[str, str | None] = {}
        # datasets kept on workers; with ``requested`` outputs, what may be freed early
        self.holdings = Holdings(
            nodes,
            data,
            self.state,
            None if requested is None else frozenset(requested),
            may_drop=durable is None,
        )

    async def on_start(self) -> None:
        self._t0 = time.perf_counter()
        self.dispatcher = self._dispatcher()
        for name in self.names:
            self.metrics.node(name)
        for name in self.restored:
            self.metrics.node(name).status = "restored"
        if self.durable is not None:
            self.durable.hash_inputs(self.data)
        self._check_finished()

    async def on_message(self, message: Any) -> None:
        if isinstance(message, Outcomes):
            self.metrics.result_batches += 1
            self._on_outcomes(message.outcomes)
        elif isinstance(message, Credit):
            self.credit += message.n
        elif isinstance(message, Returned):
            self._on_returned(message)
        elif isinstance(message, DataLost):
            self._on_data_lost(message)
        elif isinstance(message, RetryDue):
            self._timer_armed_for = None
            self.state.release_retries(time.monotonic())
        elif isinstance(message, CacheMiss):
            self.metrics.cache_misses += len(message.specs)
            self._missed.extend(message.specs)  # they go to workers as credit allows
        elif isinstance(message, JournalDue):
            self._journal_told = False
            self._flush_durable()
            return
        elif isinstance(message, Abort):
            self._flush_durable()
            self.state.cancel()
            if self.result.error is None:
                self.result.error = message.error
            self.result.finished.set()  # running attempts can no longer report back
            return
        else:
            log.warning("scheduler dropped unknown message", type=type(message).__name__)
            return
        self._dispatch()
        if self.durable is not None and self.durable.unflushed and not self._journal_told:
            self._journal_told = True
            self.ref.tell(JournalDue())
        self._arm_retry_timer()
        if self.hooks.progress is not None:
            self.hooks.call("progress", self.hooks.progress, self.snapshot())
        self._check_finished()

    def snapshot(self) -> Progress:
        st = self.state
        failed = 1 if st.failure is not None else 0
        return Progress(st.total, st.done, st.running, failed, st.ready_count)

    def _dispatch(self) -> None:
        if self.credit <= 0:
            return
        # first what the cache could not answer (it waited longest), then new ready nodes
        missed = [self._missed.popleft() for _ in range(min(self.credit, len(self._missed)))]
        self.credit -= len(missed)
        taken = self.state.take(self.credit) if self.credit > 0 else []
        self.credit -= len(taken)
        data, index, nodes, hooks = self.data, self.index, self.nodes, self.hooks
        specs = []
        for name, attempt in taken:
            node = nodes[name]
            specs.append(TaskSpec(index[name], attempt, node, [data[i] for i in node.inputs]))
            if hooks.per_node:
                hooks.started(node, attempt)
        if self.durable is not None and specs:
            direct = self.durable.split(self.run_id, specs)
            self.credit += len(specs) - len(direct)  # the cache does not use worker slots
            specs = direct
        if missed:
            specs = missed + specs
        if specs:
            self.metrics.dispatches += 1
            self.dispatcher.tell(Dispatch(self.run_id, specs))

    def _on_outcomes(self, outcomes: list[Any]) -> None:
        state, order, data, metrics = self.state, self.order, self.data, self.metrics
        now = time.monotonic()
        for o in outcomes:
            node = order[o.tid]
            if o.error is None:
                if state.complete(node.name, o.attempt) is None:
                    continue  # a late or duplicate result: the attempt is no longer current
                for key, value in zip(node.outputs, o.values or (), strict=True):
                    data[key] = value
                freed = self.holdings.done(node)
                if freed:
                    self.dispatcher.tell(DropData(self.run_id, freed))
                m = metrics.node(node.name)
                m.status, m.duration, m.attempts, m.worker = "done", o.duration, o.attempt, o.worker
                if self.durable is not None:
                    cached = o.worker == CACHE_WORKER
                    m.cached = cached
                    metrics.cache_hits += cached
                    self.durable.completed(
                        node, o.tid, o.attempt, o.duration, o.values or (), cached, o.hashes
                    )
                if self.hooks.per_node:
                    self.hooks.ended(node, "success", o.duration, None)
                continue
            verdict = state.fail(node.name, o.attempt, o.error, o.traceback, now)
            if verdict is None:
                continue
            m = metrics.node(node.name)
            m.duration, m.attempts, m.worker = o.duration, o.attempt, o.worker
            if isinstance(verdict, Retry):
                log.info(
                    "node failed, will retry",
                    node=node.name,
                    attempt=o.attempt,
                    error=o.error,
                    retry_in=round(verdict.at - now, 3),
                )
                if self.hooks.per_node:
                    self.hooks.ended(node, "retry", o.duration, o.error)
            else:
                self._on_failed(verdict, o.worker)

    def _on_failed(self, failure: Failed, worker: str | None) -> None:
        m = self.metrics.node(failure.node)
        m.status, m.attempts = "failed", failure.attempts
        self.failed_workers[failure.node] = worker
        log.error("node failed", node=failure.node, attempts=failure.attempts, error=failure.error)
        if self.hooks.per_node:
            self.hooks.ended(self.nodes[failure.node], "failed", m.duration, failure.error)

    def _on_returned(self, message: Returned) -> None:
        for tid, attempt in message.attempts:
            name = self.names[tid]
            if not message.lost:
                self.state.requeue(name, attempt)
                continue
            verdict = self.state.lose(name, attempt, message.reason, self.allowed_failures)
            if isinstance(verdict, Failed):
                self._on_failed(verdict, None)

    def _flush_durable(self) -> None:
        if self.durable is not None:
            self.durable.flush()

    def _on_data_lost(self, message: DataLost) -> None:
        """Datasets kept on a worker are gone: run their producers again, then whatever
        could not get them (counted like an attempt whose worker died)."""
        gone = self.holdings.lost(message)
        rerun = self.state.reopen(self.holdings.to_rerun(gone)) if gone else []
        for tid, _ in message.attempts:
            log.warning(
                "node could not get its input; running the input's producer again",
                node=self.names[tid],
                datasets=message.names,
                rerun=rerun,
                reason=message.reason,
            )
        if rerun and not message.attempts:
            log.warning(
                "datasets lost with the worker that held them; running their producers again",
                datasets=gone,
                rerun=rerun,
                reason=message.reason,
            )
        for name in rerun:
            self.metrics.node(name).status = "lost"
        if message.attempts:
            self._on_returned(Returned(message.attempts, lost=True, reason=message.reason))

    def _arm_retry_timer(self) -> None:
        at = self.state.next_retry_at()
        if at is None or (self._timer_armed_for is not None and self._timer_armed_for <= at):
            return
        self._timer_armed_for = at
        ref = self.ref

        async def wake() -> None:
            await anyio.sleep(max(0.0, at - time.monotonic()))
            ref.tell(RetryDue())

        self.start_task(wake)

    def _check_finished(self) -> None:
        st = self.state
        if not st.finished or self.result.finished.is_set():
            return
        if st.failure is not None and self.result.error is None:
            f = st.failure
            self.result.error = NodeFailedError(
                f.node, f.attempts, f.error, f.traceback, self.failed_workers.get(f.node)
            )
        self._flush_durable()  # everything taken is journaled before the verdict
        self.metrics.execution_time = time.perf_counter() - self._t0
        self.metrics.kept_outputs = self.holdings.kept
        self.metrics.kept_bytes = self.holdings.kept_bytes
        self.result.finished.set()
