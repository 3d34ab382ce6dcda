"""Runs step functions on threads, so the caller's event loop never blocks on user code.

Used by worker processes and by the in-process threads backend alike. Threads pull from
one queue; finished outcomes gather in an outbox and the owner is woken once per batch,
not once per task. A task past its timeout is reported at once and its thread abandoned
(Python cannot kill a thread); a fresh thread takes its slot so capacity is kept.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._calling import call_step
from ._fingerprint import content_hash
from ._release import big, release
from ._wire import Packed, pack, unpack

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Outputs this big are hashed where they were pickled, in parallel and off the
# coordinator's event loop (a 256 MB array takes a quarter second); smaller ones cost the
# coordinator less to hash than the workers to hash and ship.
HASH_HERE_FROM = 64 * 1024


@dataclass(slots=True)
class Task:
    tid: int
    attempt: int
    node: str
    fn: Callable[..., Any]
    args: Sequence[Any]
    outputs: tuple[str, ...]
    timeout: float | None = None
    packed: bool = False  # args arrive as Packed and outputs leave as Packed
    run: str = ""
    hash_outputs: bool = False  # the run records outputs: hash the big ones here


@dataclass(slots=True)
class Outcome:
    tid: int
    attempt: int
    duration: float
    values: tuple[Any, ...] | None = None
    error: str | None = None
    traceback: str = ""
    worker: str | None = field(default=None)
    run: str = ""
    hashes: tuple[str | None, ...] | None = None  # content hashes, where known

    @property
    def ok(self) -> bool:
        return self.error is None


def execute(task: Task) -> Outcome:
    """Run one task; every exception becomes an error outcome naming the node."""
    t0 = time.perf_counter()
    try:
        args = [unpack(a) for a in task.args] if task.packed else task.args
        values = call_step(task.node, task.fn, args, task.outputs)
        hashes = None
        if task.packed:
            values = tuple(
                _pack_output(task, name, v) for name, v in zip(task.outputs, values, strict=True)
            )
            if task.hash_outputs and any(v.nbytes >= HASH_HERE_FROM for v in values):
                hashes = tuple(
                    content_hash(v) if v.nbytes >= HASH_HERE_FROM else None for v in values
                )
        return Outcome(
            task.tid, task.attempt, time.perf_counter() - t0, values, run=task.run, hashes=hashes
        )
    except BaseException as exc:  # a step's SystemExit must not kill the thread either
        return Outcome(
            task.tid,
            task.attempt,
            time.perf_counter() - t0,
            error=f"{type(exc).__name__}: {exc}",
            traceback=user_traceback(exc),
            run=task.run,
        )


def _pack_output(task: Task, name: str, value: Any) -> Packed:
    try:
        return pack(value)
    except Exception as exc:
        raise TypeError(
            f"output {name!r} of node {task.node!r} cannot be pickled"
            f" ({type(value).__name__}): {exc}"
        ) from exc


def user_traceback(exc: BaseException) -> str:
    """The traceback without the engine's own frames on top: users debug their code."""
    tb = exc.__traceback__
    while tb is not None and _is_engine_file(tb.tb_frame.f_code.co_filename) and tb.tb_next:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _is_engine_file(path: str) -> bool:
    return path.startswith(_PACKAGE_DIR) and os.sep + "examples" + os.sep not in path


class TaskRunner:
    """A fixed number of threads executing :class:`Task` objects from a queue."""

    def __init__(self, nthreads: int, notify: Callable[[], None], name: str = "odibi-task") -> None:
        if nthreads < 1:
            raise ValueError(f"nthreads must be >= 1, got {nthreads}")
        self.nthreads = nthreads
        self._notify = notify
        self._name = name
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._outbox: deque[Outcome] = deque()
        self.started: deque[Task] = deque()  # timed tasks a thread has picked up
        self._signalled = False
        self._lock = threading.Lock()
        self._running: dict[int, tuple[Task, float]] = {}  # thread id -> task, started
        self._abandoned: set[int] = set()
        self._watchdog: threading.Thread | None = None
        self._closed = False
        self.in_flight = 0  # submitted, not yet in the outbox
        for _ in range(nthreads):
            self._start_thread()

    def submit(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            self.in_flight += 1
            if task.timeout is not None and self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name=f"{self._name}-watchdog", daemon=True
                )
                self._watchdog.start()
            self._queue.put(task)

    @property
    def ready_count(self) -> int:
        """Outcomes waiting to be taken."""
        return len(self._outbox)

    def take_outcomes(self) -> list[Outcome]:
        """Everything finished so far. Clear the flag first, so no wake-up is lost."""
        self._signalled = False
        out = []
        outbox = self._outbox
        while outbox:
            out.append(outbox.popleft())
        self.in_flight -= len(out)
        return out

    def take_unstarted(self, which: Callable[[Task], bool] | None = None) -> list[Task]:
        """Remove and return tasks no thread has started (all, or those ``which`` picks)."""
        out, keep = [], []
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is None:
                keep.append(task)
            elif which is None or which(task):
                out.append(task)
            else:
                keep.append(task)
        for task in keep:
            self._queue.put(task)
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        """Let threads exit once the queue is empty. They are daemons: exit never waits."""
        self._closed = True
        for _ in range(self.nthreads):
            self._queue.put(None)

    def _start_thread(self) -> None:
        threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _work(self) -> None:
        me = threading.get_ident()
        get, lock, running = self._queue.get, self._lock, self._running
        while True:
            task = get()
            if task is None:
                return
            if task.timeout is not None:
                with lock:
                    running[me] = (task, time.monotonic())
                self.started.append(task)
                self._wake()
            outcome = execute(task)
            if task.timeout is not None:
                with lock:
                    running.pop(me, None)
                    if me in self._abandoned:
                        self._abandoned.discard(me)
                        return  # already reported as timed out; a new thread has our slot
            self._deliver(outcome)
            # let go of the task's inputs now, not when the next task arrives: an idle
            # worker must not hold the last run's big inputs, nor free them on its clock
            if task.packed and big(task.args):
                release([task])
            task = outcome = None

    def _deliver(self, outcome: Outcome) -> None:
        self._outbox.append(outcome)
        self._wake()

    def _wake(self) -> None:
        if not self._signalled:
            self._signalled = True
            self._notify()

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(0.02)
            now = time.monotonic()
            expired = []
            with self._lock:
                for ident, (task, started) in list(self._running.items()):
                    if task.timeout is not None and now - started > task.timeout:
                        del self._running[ident]
                        self._abandoned.add(ident)
                        expired.append((task, now - started))
            for task, elapsed in expired:
                self._start_thread()
                self._deliver(
                    Outcome(
                        task.tid,
                        task.attempt,
                        elapsed,
                        error=f"NodeTimeoutError: node {task.node!r} ran longer than its"
                        f" timeout of {task.timeout:g}s",
                        run=task.run,
                    )
                )
