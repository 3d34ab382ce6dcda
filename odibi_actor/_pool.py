"""The worker pool actor: owns the ROUTER socket, the registered workers and dispatch.

Flow control is credit-based: each run's scheduler is granted as many tasks as the
workers have room for, a worker's room adapting to how long tasks take, so trivial tasks
travel in large batches and long ones are not hoarded by one worker. Runs are served
round-robin when workers free up, so a big run cannot starve a small one.

Liveness follows the ZeroMQ guide's Paranoid Pirate pattern: any message from a worker
counts as a heartbeat, the pool heartbeats idle workers, and a worker silent for
``heartbeat_timeout`` is evicted and its tasks go elsewhere. Every dispatch carries its
attempt number, so a late answer from an evicted worker is ignored by the run's state.

Data locality: a task whose inputs are kept on workers (``_dataplane.Ref``) goes to the
worker holding most of their bytes if it has room, else anywhere. A worker the pool
forgets takes what it kept with it: the run's scheduler hears so before anything else.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import zmq
import zmq.asyncio

from . import _wire as wire
from ._dag import DAGNode
from ._dataplane import Ref
from ._fingerprint import is_content_hash
from ._functions import FnSpec
from ._kernel import Actor, ActorRef
from ._logging import get_logger
from ._messages import (
    Abort,
    Credit,
    DataLost,
    Dispatch,
    DropData,
    Outcomes,
    Returned,
    TaskSpec,
)
from ._runner import Outcome
from .errors import WorkerLostError

log = get_logger("odibi_actor.pool")

MIN_PREFETCH, MAX_PREFETCH = 2, 128
TARGET_QUEUE_SECONDS = 0.02  # keep about this much work queued on each worker thread
# a tasks message costs both ends about this much CPU; a batch of tasks shorter than it
# does not go out alone to an idle worker when one worker can take a worthwhile batch
MESSAGE_SECONDS = 0.001
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 6.0


@dataclass(eq=False)
class WorkerState:
    identity: bytes
    name: str
    nthreads: int
    host: str = ""
    pid: int = 0
    endpoint: str = ""  # its data socket, if it keeps big outputs
    inflight: dict[tuple[str, int], int] = field(default_factory=dict)  # (run, tid) -> attempt
    known: set[tuple[str, str, int]] = field(default_factory=set)  # (run, "f"|"n", id)
    leaving: bool = False
    target: int = 0
    last_seen: float = 0.0
    last_sent: float = 0.0
    joined: float = field(default_factory=time.time)

    def free(self) -> int:
        return 0 if self.leaving else max(0, self.target - len(self.inflight))


@dataclass(eq=False)
class PoolRun:
    """What the pool knows of one run: enough to describe and route its tasks."""

    run_id: str
    scheduler: ActorRef[Any]
    order: Sequence[DAGNode]
    fn_specs: Sequence[FnSpec]
    backlog: deque[TaskSpec] = field(default_factory=deque)
    inflight: int = 0
    outstanding: int = 0  # credit granted and not yet used
    node_fid: list[int] = field(default_factory=list)
    fns: dict[int, FnSpec] = field(default_factory=dict)
    deadlines: dict[int, tuple[int, float]] = field(default_factory=dict)  # tid -> attempt, t
    hash_outputs: bool = False  # workers send outputs' content hashes (durable runs)
    keep_from: int | None = None  # outputs this big stay on their worker; None: all inline
    kept_any: bool = False  # a worker kept an output: tasks may have inputs on workers
    homed: dict[bytes, deque[TaskSpec]] = field(default_factory=dict)  # by holder of inputs

    def __post_init__(self) -> None:
        # number functions by spec: one shared by many nodes crosses the wire once
        ids: dict[Any, int] = {}
        for spec in self.fn_specs:
            key = (spec[0], bytes(spec[1]) if isinstance(spec[1], bytes | bytearray) else spec[1])
            fid = ids.setdefault(key, len(ids))
            self.node_fid.append(fid)
            self.fns.setdefault(fid, spec)


@dataclass(slots=True)
class AddRun:
    run: PoolRun


@dataclass(slots=True)
class RemoveRun:
    run_id: str


@dataclass(slots=True)
class WorkerExited:
    """Nanny -> pool: a local worker process ended; ``more`` if others live or come."""

    name: str
    code: int
    more: bool


@dataclass(slots=True)
class PoolStatus:
    """Ask: a list of worker descriptions for status displays."""


@dataclass(slots=True)
class SayGoodbye:
    """Ask: tell every worker we are going away."""


@dataclass(slots=True)
class _Incoming:
    frames: list[Any]


class _Tick:
    pass


_TICK = _Tick()


def _int(value: Any) -> int:
    if type(value) is not int:
        raise wire.MalformedMessage(f"expected an integer, got {value!r:.40}")
    return value


def _seconds(value: Any) -> float:
    if not isinstance(value, int | float) or not 0 <= value < 1e9:  # also refuses NaN
        raise wire.MalformedMessage(f"bad duration {value!r:.40}")
    return float(value)


def _hashes(value: Any, n: int) -> tuple[str | None, ...]:
    """Content hashes a worker computed (None where it left it to us); they become
    storage keys, so check them."""
    if not (isinstance(value, list | tuple) and len(value) == n) or not all(
        h is None or is_content_hash(h) for h in value
    ):
        raise wire.MalformedMessage("result hashes are not a content hash or nil per output")
    return tuple(value)


def _endpoint(value: Any) -> str:
    if value is None:
        return ""
    if not (
        isinstance(value, str) and len(value) < 1000 and value.startswith(("ipc://", "tcp://"))
    ):
        raise wire.MalformedMessage(f"bad data endpoint {value!r:.60}")
    return value


def _kept(value: Any, n: int) -> list[int | None] | None:
    """Per output: its size if its worker kept it, None if its bytes came along."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == n) or not all(
        k is None or (type(k) is int and k >= 0) for k in value
    ):
        raise wire.MalformedMessage("kept outputs are not a size or nil per output")
    return value


def _home(args: Sequence[Any]) -> bytes | None:
    """The worker holding most bytes of these inputs, if any are kept on workers."""
    held: dict[bytes, int] | None = None
    for a in args:
        if type(a) is Ref:
            if held is None:
                held = {}
            held[a.owner] = held.get(a.owner, 0) + a.nbytes
    if not held:
        return None
    return max(held, key=held.__getitem__)


def _index(tid: Any, order: Sequence[Any]) -> int:
    if type(tid) is not int or not 0 <= tid < len(order):
        raise wire.MalformedMessage(f"no task {tid!r} in this run")
    return tid


class WorkerPool(Actor):
    def __init__(
        self,
        address: str,
        ctx: zmq.asyncio.Context,
        *,
        heartbeat: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        configure_socket: Callable[[zmq.Socket[Any]], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
        max_message_size: int = -1,
    ) -> None:
        self.address = address
        self.ctx = ctx
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self._configure_socket = configure_socket
        self.on_evict = on_evict
        self.max_message_size = max_message_size
        self.workers: dict[bytes, WorkerState] = {}
        self.runs: dict[str, PoolRun] = {}
        self._rr: deque[str] = deque()  # round-robin order of runs with a backlog
        self.avg_duration: float | None = None
        self.epoch = uuid.uuid4().hex[:8]
        self.dropped = 0
        self.closing = False  # said goodbye: late arrivals get a goodbye too
        self._last_tick = time.monotonic()

    async def on_start(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        if self._configure_socket is not None:
            self._configure_socket(self.sock)
        self.sock.bind(self.address)
        self.start_task(self._read, name="pool-reader")
        self.start_task(self._ticker, name="pool-heartbeat")

    async def on_stop(self) -> None:
        self.sock.close(linger=0)

    async def _read(self) -> None:
        recv, tell = self.sock.recv_multipart, self.ref.tell
        while True:
            tell(_Incoming(await recv(copy=False)))

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat / 2)
            self.ref.tell(_TICK)

    async def on_message(self, message: Any) -> Any:
        if isinstance(message, _Incoming):
            await self._on_incoming(message.frames)
        elif isinstance(message, Dispatch):
            run = self.runs.get(message.run_id)
            if run is None:
                return None
            run.outstanding = max(0, run.outstanding - len(message.tasks))
            self._enqueue(run, message.tasks)
        elif isinstance(message, _Tick):
            await self._on_tick()
        elif isinstance(message, AddRun):
            self.runs[message.run.run_id] = message.run
        elif isinstance(message, DropData):
            await self._drop_data(message)
            return None
        elif isinstance(message, RemoveRun):
            await self._remove_run(message.run_id)
        elif isinstance(message, WorkerExited):
            self._on_exited(message)
        elif isinstance(message, PoolStatus):
            return self.status()
        elif isinstance(message, SayGoodbye):
            self.closing = True
            for w in list(self.workers.values()):
                await self._send(w, {"t": wire.BYE})
            return None
        else:
            log.warning("pool dropped unknown message", type=type(message).__name__)
            return None
        await self._place()
        self._grant()
        return None

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "name": w.name,
                "host": w.host,
                "pid": w.pid,
                "slots": w.nthreads,
                "busy": min(len(w.inflight), w.nthreads),
                "queued": len(w.inflight),
                "last_heartbeat": round(now - w.last_seen, 2),
                "leaving": w.leaving,
            }
            for w in self.workers.values()
        ]

    # --- incoming ------------------------------------------------------------------------
    async def _on_incoming(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        try:
            header, values = wire.decode(frames[1:])
            kind = header["t"]
            if kind == wire.HELLO and self.closing:
                await self._send_raw(identity, {"t": wire.BYE})
            elif kind == wire.HELLO:
                await self._register(identity, header)
            elif worker is None:
                if kind != wire.BYE:  # evicted, or we restarted: ask it to register again
                    await self._send_raw(identity, {"t": wire.RESET})
            elif kind == wire.RESULTS:
                self._on_results(worker, header, values)
            elif kind == wire.STARTED:
                self._on_started(w=worker, header=header)
            elif kind == wire.BYE:
                self._on_bye(worker, header)
            elif kind != wire.HEARTBEAT:
                raise wire.MalformedMessage(f"unexpected {kind!r} from a worker")
        except Exception as exc:  # a hostile or broken peer must never take the pool down
            self.dropped += 1
            log.warning("dropped bad message", peer=identity[:64], error=str(exc) or repr(exc))

    async def _register(self, identity: bytes, header: dict[str, Any]) -> None:
        nthreads = header["nthreads"]
        if type(nthreads) is not int or not 1 <= nthreads <= 4096:
            raise wire.MalformedMessage(f"bad nthreads {nthreads!r}")
        now = time.monotonic()
        w = WorkerState(
            identity,
            str(header["name"])[:200],
            nthreads,
            str(header.get("host", ""))[:200],
            _int(header.get("pid", 0)),
            _endpoint(header.get("data")),
            last_seen=now,
        )
        w.target = nthreads * self._prefetch()
        old = self.workers.get(identity)
        if old is not None:
            self._forget(old, f"worker {old.name} registered again")
        self.workers[identity] = w
        await self._send(
            w,
            {
                "t": wire.WELCOME,
                "runs": list(self.runs),
                "epoch": self.epoch,
                "max_frame": self.max_message_size,
            },
        )
        log.info("worker joined", worker=w.name, host=w.host, nthreads=nthreads)

    def _on_results(self, w: WorkerState, header: dict[str, Any], values: list[Any]) -> None:
        run = self.runs.get(str(header["run"]))
        if run is None:
            self.dropped += 1  # a run that ended or that a previous coordinator ran
            return
        order, rid = run.order, run.run_id
        outcomes: list[Outcome] = []
        pos = 0
        total = 0.0
        for tid, attempt, duration, *rest in header["ok"]:
            node = order[_index(tid, order)]
            n = len(node.outputs)
            given = rest[0] if rest else None
            hashes = _hashes(given, n) if given is not None and run.hash_outputs else None
            kept = _kept(rest[1], n) if len(rest) > 1 else None
            if kept is not None and (not w.endpoint or run.keep_from is None):
                raise wire.MalformedMessage("outputs kept where the run keeps none")
            inline = n if kept is None else kept.count(None)
            if pos + inline > len(values):
                raise wire.MalformedMessage("result values do not match the nodes' outputs")
            got: tuple[Any, ...] = tuple(values[pos : pos + inline])
            if kept is not None:
                run.kept_any = True
                it = iter(got)
                got = tuple(
                    next(it)
                    if size is None
                    else Ref(name, w.identity, w.endpoint, size, w.name, hashes and hashes[i])
                    for i, (name, size) in enumerate(zip(node.outputs, kept, strict=True))
                )
            duration = _seconds(duration)
            outcomes.append(
                Outcome(tid, _int(attempt), duration, got, worker=w.name, hashes=hashes)
            )
            pos += inline
            total += duration
        if pos != len(values):
            raise wire.MalformedMessage("result values do not match the nodes' outputs")
        for tid, attempt, duration, error, tb in header["err"]:
            _index(tid, order)
            outcomes.append(
                Outcome(
                    tid,
                    _int(attempt),
                    _seconds(duration),
                    error=str(error)[:100_000],
                    traceback=str(tb)[:100_000],
                    worker=w.name,
                )
            )
        for o in outcomes:
            if w.inflight.get((rid, o.tid)) == o.attempt:
                del w.inflight[(rid, o.tid)]
                run.inflight -= 1
            if run.deadlines.get(o.tid, (None,))[0] == o.attempt:
                del run.deadlines[o.tid]
        if header["ok"]:
            self._learn(total / len(header["ok"]))
        if outcomes:
            run.scheduler.tell(Outcomes(outcomes))
        for tid, attempt, endpoint, names, reason in header.get("lost", ()):
            _index(tid, order)
            if w.inflight.get((rid, tid)) == attempt:
                del w.inflight[(rid, tid)]
                run.inflight -= 1
            if run.deadlines.get(tid, (None,))[0] == attempt:
                del run.deadlines[tid]
            run.scheduler.tell(
                DataLost(
                    endpoint=_endpoint(endpoint),
                    names=[str(n) for n in names],
                    attempts=[(tid, _int(attempt))],
                    reason=f"{w.name} could not get it from {endpoint}: {str(reason)[:1000]}",
                )
            )

    def _on_started(self, w: WorkerState, header: dict[str, Any]) -> None:
        run = self.runs.get(str(header["run"]))
        if run is None:
            return
        now = time.monotonic()
        for tid, attempt in header["tasks"]:
            timeout = run.order[_index(tid, run.order)].timeout
            if timeout is not None and w.inflight.get((run.run_id, tid)) == attempt:
                run.deadlines[tid] = (attempt, now + timeout + self.heartbeat_timeout)

    def _on_bye(self, w: WorkerState, header: dict[str, Any]) -> None:
        w.leaving = True
        by_run: dict[str, list[tuple[int, int]]] = {}
        for run_id, tid, attempt in header.get("returned", []):
            key = (str(run_id), int(tid))
            if w.inflight.get(key) == attempt:
                del w.inflight[key]
                run = self.runs.get(key[0])
                if run is not None:
                    run.inflight -= 1
                    by_run.setdefault(run.run_id, []).append((key[1], int(attempt)))
        for run_id, attempts in by_run.items():
            self.runs[run_id].scheduler.tell(
                Returned(attempts, lost=False, reason=f"{w.name} is leaving")
            )
        if header.get("done"):
            self._forget(w, f"worker {w.name} left")

    def _on_exited(self, msg: WorkerExited) -> None:
        for w in list(self.workers.values()):
            if w.name == msg.name:
                self._forget(w, f"worker {w.name} exited with code {msg.code}")
        if not msg.more:
            error = WorkerLostError(
                f"every local worker process has exited (last: {msg.name}, code {msg.code});"
                " see the worker output above"
            )
            for run in self.runs.values():
                run.scheduler.tell(Abort(error))

    def _forget(self, w: WorkerState, reason: str) -> None:
        if self.workers.get(w.identity) is w:
            del self.workers[w.identity]
        if w.endpoint:  # before the lost attempts: they must not be sent back to fetch it
            for run in self.runs.values():
                if run.keep_from is not None:
                    run.scheduler.tell(DataLost(owner=w.identity, reason=reason))
        by_run: dict[str, list[tuple[int, int]]] = {}
        for (run_id, tid), attempt in w.inflight.items():
            run = self.runs.get(run_id)
            if run is not None:
                run.inflight -= 1
                by_run.setdefault(run_id, []).append((tid, attempt))
        w.inflight.clear()
        for run_id, attempts in by_run.items():
            log.warning("worker lost with tasks in flight", worker=w.name, tasks=len(attempts))
            self.runs[run_id].scheduler.tell(Returned(attempts, lost=True, reason=reason))

    async def _on_tick(self) -> None:
        now = time.monotonic()
        stalled = now - self._last_tick > self.heartbeat
        self._last_tick = now
        if stalled:  # we were frozen (or starved): silence was ours; give everyone time
            for w in self.workers.values():
                w.last_seen = max(w.last_seen, now - self.heartbeat)
        for w in list(self.workers.values()):
            if now - w.last_seen > self.heartbeat_timeout:
                log.warning(
                    "worker missed its heartbeats; evicting",
                    worker=w.name,
                    silent_for=round(now - w.last_seen, 1),
                )
                self._forget(w, f"worker {w.name} stopped answering")
                if self.on_evict is not None:
                    self.on_evict(w.name)
            elif now - w.last_sent >= self.heartbeat:
                await self._send(w, {"t": wire.HEARTBEAT})
        for run in self.runs.values():
            late = [(tid, a) for tid, (a, t) in run.deadlines.items() if t < now]
            if late:
                outcomes = []
                for tid, attempt in late:
                    del run.deadlines[tid]
                    node = run.order[tid]
                    error = (
                        f"NodeTimeoutError: node {node.name!r} did not finish within its"
                        f" timeout of {node.timeout:g}s (checked by the coordinator)"
                    )
                    outcomes.append(Outcome(tid, attempt, float(node.timeout or 0), error=error))
                run.scheduler.tell(Outcomes(outcomes))

    async def _remove_run(self, run_id: str) -> None:
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        for w in list(self.workers.values()):
            stale = [k for k in w.inflight if k[0] == run_id]
            for k in stale:
                del w.inflight[k]
            w.known = {k for k in w.known if k[0] != run_id}
            await self._send(w, {"t": wire.CANCEL, "runs": [run_id]})  # also frees its data

    # --- outgoing ------------------------------------------------------------------------
    def _prefetch(self) -> int:
        if self.avg_duration is None:
            return MIN_PREFETCH
        want = int(TARGET_QUEUE_SECONDS / max(self.avg_duration, 1e-6)) + 1
        return max(MIN_PREFETCH, min(MAX_PREFETCH, want))

    def _least_batch(self) -> int:
        """Tasks worth a message of their own: about MESSAGE_SECONDS of work."""
        if self.avg_duration is None:
            return 1
        return max(1, min(MAX_PREFETCH, int(MESSAGE_SECONDS / max(self.avg_duration, 1e-6))))

    def _learn(self, duration: float) -> None:
        avg = self.avg_duration
        self.avg_duration = duration if avg is None else 0.8 * avg + 0.2 * duration
        per_thread = self._prefetch()
        for w in self.workers.values():
            w.target = w.nthreads * per_thread

    def _grant(self) -> None:
        """Each run may hold as much work as all workers have room for, never more."""
        room = sum(w.target for w in self.workers.values() if not w.leaving)
        for run in self.runs.values():
            want = room - len(run.backlog) - run.inflight - run.outstanding
            if want > 0:
                run.outstanding += want
                run.scheduler.tell(Credit(want))

    def _enqueue(self, run: PoolRun, tasks: list[TaskSpec]) -> None:
        """Into the run's backlog; a task with inputs kept on a live worker waits for that
        worker's room first (O(inputs) per task)."""
        homed, backlog = run.homed, run.backlog
        was_empty = not backlog
        if not run.kept_any:
            backlog.extend(tasks)
        else:
            for spec in tasks:
                home = _home(spec.args)
                if home is not None and home in self.workers:
                    q = homed.get(home)
                    if q is None:
                        q = homed[home] = deque()
                    q.append(spec)
                else:
                    backlog.append(spec)
        if was_empty and backlog:
            self._rr.append(run.run_id)

    def _place_homed(self, batches: dict[tuple[bytes, str], list[TaskSpec]]) -> None:
        """Tasks go to the worker holding most of their input bytes if its queue is short
        (a thread's worth beyond its prefetch at most); the rest join the backlog, to run
        anywhere."""
        for run in self.runs.values():
            if not run.homed:
                continue
            was_empty = not run.backlog
            for home, q in run.homed.items():
                w = self.workers.get(home)
                if w is not None and not w.leaving:
                    # a holder takes them up to a thread's worth beyond its prefetch: its
                    # free slots may just have gone to the backlog, and fetching the
                    # inputs elsewhere costs more than waiting here a little
                    room = w.target + w.nthreads - len(w.inflight)
                    self._assign(w, run, q, min(len(q), room), batches)
                run.backlog.extend(q)
            run.homed.clear()
            if was_empty and run.backlog:
                self._rr.append(run.run_id)

    async def _drop_data(self, message: DropData) -> None:
        by_owner: dict[bytes, list[str]] = {}
        for ref in message.refs:
            by_owner.setdefault(ref.owner, []).append(ref.name)
        for owner, names in by_owner.items():
            w = self.workers.get(owner)
            if w is not None:
                await self._send(w, {"t": wire.DROP, "run": message.run_id, "names": names})

    async def _place(self) -> None:
        """Fill idle threads first, across all workers; only then queue ahead (prefetch).

        Each worker's share is taken from the runs' backlogs in turn, so every run with
        work waiting gets a fair part of the slots that free up. Tasks whose inputs are
        held by a worker go there first, if it has room.
        """
        batches: dict[tuple[bytes, str], list[TaskSpec]] = {}
        self._place_homed(batches)
        if not self._rr and not batches:
            return
        # idle threads first; with tasks shorter than a message costs, each worker fed gets a
        # worthwhile batch (which may leave others idle) rather than one task per thread
        least = self._least_batch()
        workers = [w for w in self.workers.values() if w.free() > 0]
        idle = [(w, w.nthreads - len(w.inflight)) for w in workers]
        self._fill([(w, min(w.free(), max(n, least))) for w, n in idle if n > 0], batches)
        # queue ahead only on workers whose queue drained to half (or that got tasks just
        # now): topped up in one message, not a few tasks per message as results trickle in
        # and nothing queued ahead before a task's duration is known: the first workers to
        # connect would hold long tasks that the ones joining a moment later could run
        fed = {identity for identity, _ in batches}
        workers = [
            w
            for w in workers
            if self.avg_duration is not None
            and w.free() > 0
            and (w.identity in fed or 2 * w.free() >= w.target)
        ]
        while self._rr and workers:
            backlog = sum(len(self.runs[r].backlog) for r in self._rr if r in self.runs)
            share = max(least, -(-backlog // len(workers)))  # spread the rest evenly
            self._fill([(w, min(w.free(), share)) for w in workers], batches)
            workers = [w for w in workers if w.free() > 0]
        for (identity, run_id), batch in batches.items():
            w = self.workers.get(identity)
            if w is not None:
                await self._send_tasks(w, self.runs[run_id], batch)

    def _fill(
        self, slots: list[tuple[WorkerState, int]], batches: dict[tuple[bytes, str], list[TaskSpec]]
    ) -> None:
        """Give each worker up to its number of tasks, taking runs round-robin."""
        for w, free in slots:
            while free > 0 and self._rr:
                run = self.runs.get(self._rr[0])
                if run is None or not run.backlog:
                    self._rr.popleft()
                    continue
                take = min(free, len(run.backlog), max(1, free // len(self._rr)))
                self._assign(w, run, run.backlog, take, batches)
                free -= take
                if run.backlog:
                    self._rr.rotate(-1)
                else:
                    self._rr.popleft()

    @staticmethod
    def _assign(
        w: WorkerState,
        run: PoolRun,
        queue: deque[TaskSpec],
        n: int,
        batches: dict[tuple[bytes, str], list[TaskSpec]],
    ) -> None:
        """Move the first ``n`` tasks of ``queue`` into ``w``'s batch for ``run``."""
        if n <= 0:
            return
        batch = batches.setdefault((w.identity, run.run_id), [])
        inflight, rid = w.inflight, run.run_id
        for _ in range(n):
            spec = queue.popleft()
            inflight[(rid, spec.tid)] = spec.attempt
            batch.append(spec)
        run.inflight += n

    async def _send_tasks(self, w: WorkerState, run: PoolRun, batch: list[TaskSpec]) -> None:
        fns: dict[int, Any] = {}
        nodes: dict[int, Any] = {}
        tasks: list[Any] = []
        values = []
        rid, known = run.run_id, w.known
        kept_any = run.kept_any
        for spec in batch:
            if (rid, "n", spec.tid) not in known:
                node = spec.node
                fid = run.node_fid[spec.tid]
                if (rid, "f", fid) not in known:
                    fns[fid] = run.fns[fid]
                    known.add((rid, "f", fid))
                nodes[spec.tid] = (node.name, fid, node.outputs, node.timeout)
                known.add((rid, "n", spec.tid))
            refs = kept_any and [
                (i, a.name, a.endpoint, a.nbytes) for i, a in enumerate(spec.args) if type(a) is Ref
            ]
            if refs:  # inputs kept on workers travel as references, the others as bytes
                args = [a for a in spec.args if type(a) is not Ref]
                tasks.append((spec.tid, spec.attempt, len(args), refs))
                values.extend(args)
            else:
                tasks.append((spec.tid, spec.attempt, len(spec.args)))
                values.extend(spec.args)
        header: dict[str, Any] = {"t": wire.TASKS, "run": rid, "tasks": tasks}
        if run.hash_outputs:
            header["hash"] = 1
        if run.keep_from is not None and w.endpoint:
            header["keep"] = run.keep_from
        if fns:
            header["fns"] = fns
        if nodes:
            header["nodes"] = nodes
        await self._send(w, header, values)

    async def _send(self, w: WorkerState, header: dict[str, Any], values: Any = ()) -> None:
        w.last_sent = time.monotonic()
        if not await self._send_raw(w.identity, header, values):
            self._forget(w, f"worker {w.name} unreachable")

    async def _send_raw(self, identity: bytes, header: dict[str, Any], values: Any = ()) -> bool:
        try:
            await self.sock.send_multipart([identity, *wire.encode(header, values)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            log.debug("peer unreachable", peer=identity[:64], error=str(exc))
            return False
        return True
