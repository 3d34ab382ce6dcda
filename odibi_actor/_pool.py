"""The worker pool actor: owns the ROUTER socket, the registered workers and dispatch.

Flow control is credit-based: the pool grants the scheduler exactly as many tasks as its
workers have room for, each worker's room adapting to how long tasks take, so trivial
tasks travel in large batches and long ones are not hoarded by one worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq
import zmq.asyncio

from . import _wire as wire
from ._dag import DAGNode
from ._functions import FnSpec
from ._kernel import Actor, ActorRef
from ._messages import Abort, Credit, Dispatch, Outcomes, Returned, TaskSpec
from ._runner import Outcome
from .errors import WorkerLostError

log = structlog.get_logger("odibi_actor.pool")

MIN_PREFETCH, MAX_PREFETCH = 2, 128
TARGET_QUEUE_SECONDS = 0.02  # keep about this much work queued on each worker thread


@dataclass(eq=False)
class WorkerState:
    identity: bytes
    name: str
    nthreads: int
    host: str = ""
    pid: int = 0
    inflight: dict[int, int] = field(default_factory=dict)  # tid -> attempt
    known_fns: set[int] = field(default_factory=set)
    known_nodes: set[int] = field(default_factory=set)
    leaving: bool = False
    target: int = 0

    def free(self) -> int:
        return 0 if self.leaving else max(0, self.target - len(self.inflight))


@dataclass(slots=True)
class _Incoming:
    frames: list[Any]


@dataclass(slots=True)
class WorkerExited:
    """Nanny -> pool: a local worker process ended; ``more`` if others live or come."""

    name: str
    code: int
    more: bool


def _key(spec: FnSpec) -> Any:
    return (spec[0], bytes(spec[1]) if isinstance(spec[1], bytes | bytearray) else spec[1])


class WorkerPool(Actor):
    def __init__(
        self,
        nodes: Mapping[str, DAGNode],
        scheduler: ActorRef[Any],
        address: str,
        run_id: str,
        ctx: zmq.asyncio.Context,
        fn_specs: list[FnSpec],
    ) -> None:
        self.order = list(nodes.values())
        self.scheduler = scheduler
        self.address = address
        self.run_id = run_id
        self.ctx = ctx
        self.workers: dict[bytes, WorkerState] = {}
        self.backlog: deque[TaskSpec] = deque()
        self.outstanding = 0  # credit granted to the scheduler and not yet used
        self.avg_duration: float | None = None
        # functions are numbered by their spec, so a function shared by many nodes
        # crosses the wire once per worker
        fids: dict[Any, int] = {}
        self.node_fid = [fids.setdefault(_key(s), len(fids)) for s in fn_specs]
        self.fn_specs = {fid: fn_specs[i] for i, fid in enumerate(self.node_fid)}
        self.dropped = 0

    async def on_start(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.start_task(self._read, name="pool-reader")

    async def on_stop(self) -> None:
        for w in list(self.workers.values()):
            await self._send(w, {"t": wire.BYE})
        self.sock.close(linger=500)

    async def _read(self) -> None:
        recv, tell = self.sock.recv_multipart, self.ref.tell
        while True:
            tell(_Incoming(await recv(copy=False)))

    async def on_message(self, message: Any) -> None:
        if isinstance(message, _Incoming):
            await self._on_incoming(message.frames)
        elif isinstance(message, Dispatch):
            self.outstanding = max(0, self.outstanding - len(message.tasks))
            self.backlog.extend(message.tasks)
        elif isinstance(message, WorkerExited):
            self._on_exited(message)
        else:
            log.warning("pool dropped unknown message", type=type(message).__name__)
            return
        await self._place()
        self._grant()

    # --- incoming ------------------------------------------------------------------------
    async def _on_incoming(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        try:
            header, values = wire.decode(frames[1:])
            kind = header["t"]
            worker = self.workers.get(identity)
            if kind == wire.HELLO:
                self._register(identity, header)
            elif worker is None:
                raise wire.MalformedMessage(f"{kind!r} from an unregistered peer")
            elif kind == wire.RESULTS:
                self._on_results(worker, header, values)
            elif kind == wire.BYE:
                self._on_bye(worker, header)
            else:
                raise wire.MalformedMessage(f"unexpected {kind!r} from a worker")
        except (wire.MalformedMessage, KeyError, TypeError, ValueError) as exc:
            self.dropped += 1
            log.warning("dropped bad message", peer=identity[:64], error=str(exc))

    def _register(self, identity: bytes, header: dict[str, Any]) -> None:
        nthreads = int(header["nthreads"])
        if nthreads < 1:
            raise wire.MalformedMessage(f"bad nthreads {nthreads!r}")
        w = WorkerState(
            identity,
            str(header["name"]),
            nthreads,
            str(header.get("host", "")),
            int(header.get("pid", 0)),
        )
        w.target = nthreads * self._prefetch()
        self.workers[identity] = w
        log.debug("worker joined", worker=w.name, nthreads=nthreads)

    def _on_results(self, w: WorkerState, header: dict[str, Any], values: list[Any]) -> None:
        order, inflight = self.order, w.inflight
        outcomes: list[Outcome] = []
        pos = 0
        total = 0.0
        for tid, attempt, duration in header["ok"]:
            n = len(order[tid].outputs)
            outcomes.append(
                Outcome(tid, attempt, duration, tuple(values[pos : pos + n]), worker=w.name)
            )
            pos += n
            total += duration
            if inflight.get(tid) == attempt:
                del inflight[tid]
        if pos != len(values):
            raise wire.MalformedMessage("result values do not match the nodes' outputs")
        for tid, attempt, duration, error, tb in header["err"]:
            outcomes.append(
                Outcome(tid, attempt, duration, error=str(error), traceback=str(tb), worker=w.name)
            )
            if inflight.get(tid) == attempt:
                del inflight[tid]
        if header["ok"]:
            self._learn(total / len(header["ok"]))
        if outcomes:
            self.scheduler.tell(Outcomes(outcomes))

    def _on_bye(self, w: WorkerState, header: dict[str, Any]) -> None:
        w.leaving = True
        returned = [(int(t), int(a)) for t, a in header.get("returned", [])]
        for tid, attempt in returned:
            if w.inflight.get(tid) == attempt:
                del w.inflight[tid]
        if returned:
            self.scheduler.tell(Returned(returned, lost=False, reason=f"{w.name} is leaving"))
        if header.get("done"):
            self._forget(w, f"worker {w.name} left")

    def _on_exited(self, msg: WorkerExited) -> None:
        for w in list(self.workers.values()):
            if w.name == msg.name:
                self._forget(w, f"worker {w.name} exited with code {msg.code}")
        if not msg.more:
            self.scheduler.tell(
                Abort(
                    WorkerLostError(
                        f"every local worker process has exited (last: {msg.name},"
                        f" code {msg.code});"
                        " see the worker output above"
                    )
                )
            )

    def _forget(self, w: WorkerState, reason: str) -> None:
        self.workers.pop(w.identity, None)
        lost = list(w.inflight.items())
        if lost:
            log.warning("worker lost with tasks in flight", worker=w.name, tasks=len(lost))
            self.scheduler.tell(Returned(lost, lost=True, reason=reason))

    # --- outgoing ------------------------------------------------------------------------
    def _prefetch(self) -> int:
        if self.avg_duration is None:
            return MIN_PREFETCH
        want = int(TARGET_QUEUE_SECONDS / max(self.avg_duration, 1e-6)) + 1
        return max(MIN_PREFETCH, min(MAX_PREFETCH, want))

    def _learn(self, duration: float) -> None:
        self.avg_duration = (
            duration if self.avg_duration is None else 0.8 * self.avg_duration + 0.2 * duration
        )
        per_thread = self._prefetch()
        for w in self.workers.values():
            w.target = w.nthreads * per_thread

    def _grant(self) -> None:
        room = sum(w.free() for w in self.workers.values())
        free = room - len(self.backlog) - self.outstanding
        if free > 0:
            self.outstanding += free
            self.scheduler.tell(Credit(free))

    async def _place(self) -> None:
        if not self.backlog:
            return
        workers = [w for w in self.workers.values() if w.free() > 0]
        batches: dict[bytes, list[TaskSpec]] = {}
        while self.backlog and workers:
            w = max(workers, key=WorkerState.free)
            take = min(w.free(), len(self.backlog))
            batch = batches.setdefault(w.identity, [])
            for _ in range(take):
                spec = self.backlog.popleft()
                w.inflight[spec.tid] = spec.attempt
                batch.append(spec)
            workers = [x for x in workers if x.free() > 0]
        for identity, batch in batches.items():
            await self._send_tasks(self.workers[identity], batch)

    async def _send_tasks(self, w: WorkerState, batch: list[TaskSpec]) -> None:
        fns: dict[int, Any] = {}
        nodes: dict[int, Any] = {}
        tasks, values = [], []
        for spec in batch:
            if spec.tid not in w.known_nodes:
                node = spec.node
                fid = self.node_fid[spec.tid]
                if fid not in w.known_fns:
                    fns[fid] = self.fn_specs[fid]
                    w.known_fns.add(fid)
                nodes[spec.tid] = (node.name, fid, node.outputs, node.timeout)
                w.known_nodes.add(spec.tid)
            tasks.append((spec.tid, spec.attempt, len(spec.args)))
            values.extend(spec.args)
        header = {"t": wire.TASKS, "run": self.run_id, "tasks": tasks}
        if fns:
            header["fns"] = fns
        if nodes:
            header["nodes"] = nodes
        await self._send(w, header, values)

    async def _send(self, w: WorkerState, header: dict[str, Any], values: Any = ()) -> None:
        try:
            await self.sock.send_multipart([w.identity, *wire.encode(header, values)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            log.warning("worker unreachable", worker=w.name, error=str(exc))
            self._forget(w, f"worker {w.name} unreachable")
