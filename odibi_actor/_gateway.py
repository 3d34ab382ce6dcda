"""The client gateway actor: the coordinator's front door for clients, and its run registry.

Clients submit DAGs, poll status and events, and long-poll results over a ROUTER socket.
Each run gets its own scheduler actor, supervised here: a crashing scheduler fails its run,
never the coordinator. A run belongs to the coordinator, not to a connection, so it goes on
when its client disconnects, and any client can reattach to it by run id.

The coordinator never unpickles user data: functions arrive as specs and datasets as
pickled bytes, which it only forwards.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import zmq
import zmq.asyncio

from . import _wire as wire
from ._dag import DAGBuilder, DAGNode, check_inputs
from ._kernel import Actor, ActorRef
from ._logging import get_logger
from ._messages import Abort
from ._pool import AddRun, PoolRun, PoolStatus, RemoveRun
from ._scheduler import Hooks, Progress, RunResult, Scheduler
from .errors import NodeFailedError, OdibiError
from .metrics import MetricsManager

log = get_logger("odibi_actor.gateway")

MAX_EVENTS = 100_000  # per run; older events are dropped, the cursor says so
MAX_RESULT_WAIT = 30.0
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RunCancelled(OdibiError):
    """The run was cancelled by a client."""


class CoordinatorShuttingDown(OdibiError):
    """The coordinator is draining and accepts no new runs."""


def _fn_spec(node: str, spec: Any) -> tuple[str, Any]:
    if isinstance(spec, list | tuple) and len(spec) == 2:
        kind, body = spec
        if (kind == "ref" and isinstance(body, str)) or (kind == "val" and isinstance(body, bytes)):
            return kind, body
    raise ValueError(f"node {node!r}: bad function spec")


def _remote_step(*_: Any) -> Any:
    raise RuntimeError("steps of a submitted run execute on workers, never on the coordinator")


class EventLog:
    """An odibi_core-style ``events`` object that keeps a bounded, cursor-addressed log."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.first = 0  # cursor of items[0]

    def emit(self, event: str, **fields: Any) -> None:
        step = fields.get("step")
        item: dict[str, Any] = {"event": event, "time": time.time()}
        if step is not None:
            item["node"] = step.name
        for key in ("attempt", "duration", "status", "error"):
            if fields.get(key) is not None:
                item[key] = fields[key]
        if len(self.items) == self.items.maxlen:
            self.first += 1
        self.items.append(item)

    def since(self, cursor: int) -> tuple[list[dict[str, Any]], int]:
        start = max(0, cursor - self.first)
        items = list(self.items)[start:]
        return items, self.first + len(self.items)


@dataclass(eq=False)
class RunRecord:
    run_id: str
    nodes: dict[str, DAGNode]
    data: dict[str, Any]
    initial: set[str]
    result: RunResult
    metrics: MetricsManager
    events: EventLog
    scheduler: ActorRef[Any] | None = None
    progress: Progress | None = None
    submitted: float = field(default_factory=time.time)
    finished_at: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def state(self, workers: int) -> str:
        if self.result.finished.is_set():
            err = self.result.error
            if err is None:
                return "done"
            return "cancelled" if isinstance(err, RunCancelled) else "failed"
        p = self.progress
        if workers == 0 and (p is None or p.running == 0):
            return "waiting"  # for a worker to connect
        return "running"

    def describe(self, workers: int) -> dict[str, Any]:
        p = self.progress or Progress(len(self.nodes), 0, 0, 0, 0)
        out = {
            "run": self.run_id,
            "state": self.state(workers),
            "total": p.total,
            "done": p.done,
            "running": p.running,
            "failed": p.failed,
            "ready": p.ready,
            "submitted": self.submitted,
            "finished": self.finished_at,
        }
        if self.result.error is not None:
            out["error"] = str(self.result.error)
        return out


@dataclass(slots=True)
class _Incoming:
    frames: list[Any]


@dataclass(slots=True)
class _Finished:
    run_id: str


@dataclass(slots=True)
class Drain:
    """Stop accepting runs (SIGTERM)."""


@dataclass(slots=True)
class ActiveRuns:
    """Ask: how many runs are still going."""


class Gateway(Actor):
    def __init__(
        self,
        address: str,
        ctx: zmq.asyncio.Context,
        pool: ActorRef[Any],
        *,
        configure_socket: Callable[[zmq.Socket[Any]], None] | None = None,
        max_message_size: int = -1,
        retention: float = 3600.0,
        allowed_failures: int = 3,
    ) -> None:
        self.address = address
        self.ctx = ctx
        self.pool = pool
        self._configure_socket = configure_socket
        self.max_message_size = max_message_size
        self.retention = retention
        self.allowed_failures = allowed_failures
        self.runs: dict[str, RunRecord] = {}
        self.draining = False
        self.dropped = 0

    async def on_start(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        if self._configure_socket is not None:
            self._configure_socket(self.sock)
        self.sock.bind(self.address)
        self.start_task(self._read, name="gateway-reader")
        self.start_task(self._expire, name="gateway-expiry")

    async def on_stop(self) -> None:
        self.sock.close(linger=0)

    async def _read(self) -> None:
        while True:
            self.ref.tell(_Incoming(await self.sock.recv_multipart(copy=False)))

    async def _expire(self) -> None:
        while True:
            await anyio.sleep(min(60.0, self.retention))
            now = time.time()
            for run_id, rec in list(self.runs.items()):
                if rec.finished_at is not None and now - rec.finished_at > self.retention:
                    del self.runs[run_id]

    async def on_message(self, message: Any) -> Any:
        if isinstance(message, _Incoming):
            await self._on_request(message.frames)
        elif isinstance(message, _Finished):
            rec = self.runs.get(message.run_id)
            if rec is not None and rec.finished_at is None:
                rec.finished_at = time.time()
                rec.metrics.execution_time = time.perf_counter() - rec.started
                self.pool.tell(RemoveRun(rec.run_id))
                log.info(
                    "run finished",
                    run=rec.run_id,
                    state=rec.state(1),
                    seconds=round(rec.metrics.execution_time, 3),
                )
        elif isinstance(message, Drain):
            self.draining = True
        elif isinstance(message, ActiveRuns):
            return sum(1 for r in self.runs.values() if not r.result.finished.is_set())
        return None

    # --- requests ------------------------------------------------------------------------
    async def _on_request(self, frames: list[Any]) -> None:
        identity = frames[0].bytes
        req: Any = None
        try:
            header, values = wire.decode(frames[1:])
            req = header.get("req")
            handler = self._handlers().get(header["t"])
            if handler is None:
                raise wire.MalformedMessage(f"unexpected {header['t']!r} from a client")
            await handler(identity, req, header, values)
        except wire.MalformedMessage as exc:
            self.dropped += 1
            log.warning("dropped bad client message", peer=identity[:64], error=str(exc))
        except Exception as exc:  # a bad request gets an answer, never a crashed gateway
            await self._reply_error(identity, req, exc)

    def _handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            wire.SUBMIT: self._submit,
            wire.STATUS: self._status,
            wire.RESULT: self._result,
            wire.EVENTS: self._events,
            wire.CANCEL_RUN: self._cancel,
            wire.WORKERS: self._workers,
            wire.RUNS: self._runs,
        }

    async def _send(self, identity: bytes, header: dict[str, Any], values: Any = ()) -> None:
        try:
            await self.sock.send_multipart([identity, *wire.encode(header, values)], copy=False)
        except zmq.ZMQError as exc:
            log.debug("client unreachable", error=str(exc))

    async def _reply(self, identity: bytes, req: Any, values: Any = (), **fields: Any) -> None:
        await self._send(identity, {"t": wire.OK, "req": req, **fields}, values)

    async def _reply_error(self, identity: bytes, req: Any, exc: BaseException) -> None:
        kind = type(exc).__name__
        await self._send(identity, {"t": wire.ERROR, "req": req, "kind": kind, "error": str(exc)})

    def _record(self, header: dict[str, Any]) -> RunRecord:
        run_id = str(header.get("run", ""))
        rec = self.runs.get(run_id)
        if rec is None:
            raise KeyError(
                f"no run {run_id!r} on this coordinator: never submitted here, lost when the"
                f" coordinator restarted, or finished more than {self.retention:g}s ago"
            )
        return rec

    async def _worker_count(self) -> int:
        return len(await self.pool.ask(PoolStatus(), timeout=5))

    async def _submit(
        self, identity: bytes, req: Any, header: dict[str, Any], values: list[Any]
    ) -> None:
        run_id = str(header.get("run") or uuid.uuid4().hex[:12])
        if not _RUN_ID.match(run_id):
            raise ValueError(f"bad run id {run_id!r}: use 1-64 letters, digits, '_', '.', '-'")
        if run_id in self.runs:  # a resubmission after a lost answer: same run
            await self._reply(identity, req, run=run_id)
            return
        if self.draining:
            raise CoordinatorShuttingDown("the coordinator is shutting down; submit elsewhere")
        entries, specs, keys = header["nodes"], header["fns"], [str(k) for k in header["keys"]]
        if len(keys) != len(values) or len(specs) != len(entries):
            raise wire.MalformedMessage("submit: counts of keys/values or nodes/fns differ")
        builder, spec_of = DAGBuilder(), {}
        # msgpack makes a new str for every occurrence: one object per distinct name (and
        # function spec) instead, or a 100,000-node run holds ~25 MB of copies; and each
        # entry goes once read (popped from the end), not with the whole header
        same: dict[Any, Any] = {}
        one = same.setdefault
        entries.reverse()
        specs.reverse()
        while entries:
            (name, inputs, outputs, retries, timeout, retry_delay), spec = (
                entries.pop(),
                specs.pop(),
            )
            name = one(str(name), str(name))
            if isinstance(inputs, list) and isinstance(outputs, list):
                inputs = [one(i, i) if isinstance(i, str) else i for i in inputs]
                outputs = [one(o, o) if isinstance(o, str) else o for o in outputs]
            builder.add_node(name, _remote_step, inputs, outputs, retries, timeout, retry_delay)
            fn = _fn_spec(name, spec)
            spec_of[name] = one(fn, fn)
        del same, one
        nodes = builder.build()
        check_inputs(nodes, keys)
        data = dict(zip(keys, values, strict=True))
        pool_run_specs = [spec_of[n] for n in nodes]
        workers = await self._worker_count()
        rec = RunRecord(
            run_id,
            nodes,
            data,
            set(keys),
            RunResult(),
            MetricsManager(node_count=len(nodes), backend="cluster"),
            EventLog(),
        )
        rec.metrics.workers = workers
        self.runs[run_id] = rec

        def progress(p: Progress) -> None:
            rec.progress = p

        def crashed(exc: BaseException) -> None:
            if rec.result.error is None:
                rec.result.error = exc
            rec.result.finished.set()

        hooks = Hooks(events=rec.events, progress=progress)
        pool = self.pool
        rec.scheduler = self.system.spawn(
            lambda: Scheduler(
                nodes,
                data,
                lambda: pool,
                rec.metrics,
                rec.result,
                hooks,
                self.allowed_failures,
                run_id,
            ),
            f"scheduler-{run_id}",
            on_crash=crashed,
        )
        self.pool.tell(AddRun(PoolRun(run_id, rec.scheduler, list(nodes.values()), pool_run_specs)))
        ref = self.ref

        async def watch() -> None:
            await rec.result.finished.wait()
            ref.tell(_Finished(run_id))

        self.start_task(watch)
        log.info("run submitted", run=run_id, nodes=len(nodes))
        await self._reply(identity, req, run=run_id)

    async def _status(self, identity: bytes, req: Any, header: dict[str, Any], _: Any) -> None:
        rec = self._record(header)
        await self._reply(identity, req, status=rec.describe(await self._worker_count()))

    async def _result(self, identity: bytes, req: Any, header: dict[str, Any], _: Any) -> None:
        rec = self._record(header)
        wait = min(MAX_RESULT_WAIT, max(0.0, float(header.get("wait", 0))))

        async def answer() -> None:
            with anyio.move_on_after(wait):
                await rec.result.finished.wait()
            await self._send_result(identity, req, rec)

        if rec.result.finished.is_set() or wait == 0:
            await self._send_result(identity, req, rec)
        else:
            self.start_task(answer)

    async def _send_result(self, identity: bytes, req: Any, rec: RunRecord) -> None:
        if not rec.result.finished.is_set():
            await self._reply(identity, req, state="running")
            return
        metrics = rec.metrics.to_wire()
        err = rec.result.error
        if err is None:
            keys = [k for k in rec.data if k not in rec.initial]
            await self._reply(
                identity, req, [rec.data[k] for k in keys], state="done", keys=keys, metrics=metrics
            )
            return
        info: dict[str, Any] = {"kind": type(err).__name__, "message": str(err)}
        if isinstance(err, NodeFailedError):
            info.update(
                node=err.node,
                attempts=err.attempts,
                error=err.error,
                traceback=err.traceback,
                worker=err.worker,
            )
        await self._reply(identity, req, state=rec.state(1), error=info, metrics=metrics)

    async def _events(self, identity: bytes, req: Any, header: dict[str, Any], _: Any) -> None:
        rec = self._record(header)
        # the state first: once it says the run ended, every event is already logged
        state = rec.state(await self._worker_count())
        items, cursor = rec.events.since(int(header.get("since", 0)))
        await self._reply(
            identity,
            req,
            events=items[:10_000],
            next=cursor - max(0, len(items) - 10_000),
            state=state,
        )

    async def _cancel(self, identity: bytes, req: Any, header: dict[str, Any], _: Any) -> None:
        rec = self._record(header)
        if not rec.result.finished.is_set() and rec.scheduler is not None:
            rec.scheduler.tell(Abort(RunCancelled(f"run {rec.run_id!r} was cancelled")))
        await self._reply(identity, req, run=rec.run_id)

    async def _workers(self, identity: bytes, req: Any, _h: Any, _v: Any) -> None:
        await self._reply(identity, req, workers=await self.pool.ask(PoolStatus(), timeout=5))

    async def _runs(self, identity: bytes, req: Any, _h: Any, _v: Any) -> None:
        n = await self._worker_count()
        await self._reply(identity, req, runs=[r.describe(n) for r in self.runs.values()])
