"""Executors: the public way to run a DAG, in threads or on worker processes.

Both drive the same scheduler actor; only the dispatcher behind it differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import zmq
import zmq.asyncio

from ._dag import BuiltDAG, DAGBuilder, DAGNode, build_dag, check_inputs
from ._dataplane import KEEP_FROM, Ref, fetch_all
from ._durable import RunDurability
from ._functions import FnSpec, describe
from ._kernel import ActorSystem
from ._localcluster import HostedCluster, LocalCluster
from ._logging import get_logger
from ._messages import DataLost
from ._persist import Persistence
from ._pool import AddRun, PoolRun, RemoveRun
from ._scheduler import Hooks, Progress, RunResult, Scheduler
from ._threads import ThreadDispatcher
from ._wire import Packed, pack, unpack
from .errors import DAGValidationError, OdibiError, WorkerLostError
from .metrics import MetricsManager

log = get_logger("odibi_actor.executor")

BACKENDS = ("threads", "processes")


class DAGExecutor:
    """Run a DAG; ``backend="threads"`` (the default here) runs steps in this process.

    ``context``, ``tracker`` and ``events`` are the odibi_core hooks: ``tracker`` gets
    ``start_step(name, level)`` / ``end_step(name, status, error)`` and ``events`` gets
    ``emit(event, **fields)``. ``progress`` is called with a :class:`Progress` snapshot
    after each batch of scheduling events.

    With the processes backend, an output whose pickle is at least ``keep_from`` bytes
    (1 MiB) stays on the worker that made it; workers that need it fetch it from there,
    and only the outputs ``run()`` returns come back to this process. ``keep_from=None``
    sends every output through this process, as do runs with a checkpoint or a cache
    (they record every output's bytes).
    """

    default_backend = "threads"

    def __init__(
        self,
        nodes: Mapping[str, DAGNode] | DAGBuilder,
        context: Any = None,
        tracker: Any = None,
        events: Any = None,
        *,
        backend: str | None = None,
        max_workers: int | None = None,
        workers: int | None = None,
        nthreads: int = 1,
        allowed_failures: int = 3,
        progress: Callable[[Progress], None] | None = None,
        address: str | None = None,
        curve_secret: str | None = None,
        server_key: str | None = None,
        timeout: float | None = None,
        checkpoint: str | None = None,
        run_id: str | None = None,
        cache: str | None = None,
        cache_ttl: float | None = None,
        secret: bytes | str | None = None,
        journal_dir: str | None = None,
        keep_from: int | None = KEEP_FROM,
    ) -> None:
        if isinstance(nodes, DAGBuilder):
            self.nodes = nodes.build()
        elif isinstance(nodes, BuiltDAG):
            self.nodes = nodes
        elif isinstance(nodes, Mapping):
            self.nodes = build_dag(nodes.values())
        else:
            raise DAGValidationError(
                f"expected the dict returned by DAGBuilder.build(), got {type(nodes).__name__}"
            )
        backend = backend or self.default_backend
        if backend == "ray":
            log.warning("backend='ray' is not supported; using 'processes'")
            backend = "processes"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        count = workers if workers is not None else max_workers
        if count is not None and (isinstance(count, bool) or int(count) < 1):
            raise ValueError(f"workers must be at least 1, got {count!r}")
        if nthreads < 1:
            raise ValueError(f"nthreads must be at least 1, got {nthreads!r}")
        if keep_from is not None and (type(keep_from) is not int or keep_from < 0):
            raise ValueError(f"keep_from must be a number of bytes >= 0 or None, got {keep_from!r}")
        self.keep_from = keep_from
        self._requested: list[str] | None = None
        self.backend = backend
        self.workers = int(count) if count is not None else (os.cpu_count() or 1)
        self.nthreads = nthreads
        if allowed_failures < 0:
            raise ValueError(f"allowed_failures must be >= 0, got {allowed_failures}")
        self.allowed_failures = allowed_failures
        self.context = context
        self.hooks = Hooks(tracker, events, progress)
        self.metrics = MetricsManager(node_count=len(self.nodes), backend=backend)
        self.worker_pids: list[int] = []
        # an existing coordinator's client address: run there instead of on local workers
        self.address = address
        self.curve = (curve_secret, server_key)
        self.timeout = timeout
        self.run_id: str | None = run_id
        # durable state: checkpoints to resume from, and a result cache across runs
        self.checkpoint, self.cache, self.cache_ttl = checkpoint, cache, cache_ttl
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.journal_dir = journal_dir
        self.persistence: Persistence | None = None
        self._hosted: HostedCluster | None = None  # warm workers, between start() and close()

    # --- warm workers --------------------------------------------------------------------
    def start(self) -> None:
        """Start the local worker processes now and keep them for every run until
        :meth:`close`, as a Dask ``LocalCluster`` does: runs then pay no start-up, and
        what a step imported stays imported. ``with executor:`` does both.

        Nothing to do for the threads backend or a remote ``address``. Progress and
        ``events`` callbacks of warm runs are called on the workers' host thread.
        """
        if self.backend != "processes" or self.address is not None:
            return
        if self._hosted is not None and self._hosted.alive:
            return
        hosted = HostedCluster(self.workers, self.nthreads, keep_data=self.keep_from is not None)
        hosted.start()
        self._hosted = hosted
        self.worker_pids = hosted.cluster.local.pids

    def close(self) -> None:
        """Stop the workers :meth:`start` kept (waiting for them); idempotent."""
        hosted, self._hosted = self._hosted, None
        if hosted is not None:
            hosted.close()

    def __enter__(self) -> DAGExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> DAGExecutor:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.close)

    # --- public API ----------------------------------------------------------------------
    def run(
        self,
        initial_data: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        outputs: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Run to the end and return the datasets named in ``outputs`` (default: every
        dataset the nodes produced). Asking only for what you need saves bringing big
        intermediate results back to this process, and lets workers free them early.

        With ``checkpoint`` and ``run_id`` set, ``resume=True`` reuses every node the
        checkpointed run finished (and whose code and inputs did not change).
        """
        call = functools.partial(self.arun, initial_data, resume=resume, outputs=outputs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return anyio.run(call)
        # Called from inside an event loop (a notebook): run on a thread of our own.
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = anyio.run(call)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=target, name="odibi-run")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    # odibi_core called it execute()
    execute = run

    async def arun(
        self,
        initial_data: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        outputs: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """:meth:`run`, awaitable."""
        data = dict(initial_data or {})
        check_inputs(self.nodes, data)
        wanted = self._wanted(outputs)
        self._requested = wanted
        self.metrics = MetricsManager(node_count=len(self.nodes), backend=self.backend)
        result = RunResult()
        self._emit("pipeline_start", nodes=len(self.nodes))
        t0 = time.perf_counter()
        try:
            if self.address is not None:
                try:
                    out = await self._run_remote(data)
                    if wanted is not None:
                        out = {k: out[k] for k in wanted}
                except BaseException as exc:
                    self._emit("pipeline_error", error=exc)
                    raise
                self._emit("pipeline_complete", duration=time.perf_counter() - t0)
                return out
            if self.backend == "processes":
                for key, value in list(data.items()):
                    data[key] = _pack_initial(key, value)
            with _long_lived_objects_frozen():
                if self.backend == "threads":
                    self.metrics.workers = self.workers * self.nthreads
                    async with self._persistence(data, resume) as persist:
                        await self._run_threads(data, result, persist)
                else:
                    self.metrics.workers = self.workers
                    try:
                        await self._run_processes(data, result, resume)
                    except BaseExceptionGroup as group:  # the cluster's task group wrapped it
                        error = _only_error(group)
                        if error is group:
                            raise
                        raise error from None
        finally:
            self.metrics.execution_time = time.perf_counter() - t0
        if result.error is not None:
            self._emit("pipeline_error", error=result.error)
            raise result.error
        out = {k: v for k, v in data.items() if k not in (initial_data or {})}
        if wanted is not None:
            out = {k: out[k] for k in wanted}
        if self.backend == "processes":
            out = {k: _materialize(k, v) for k, v in out.items()}
        self._emit("pipeline_complete", duration=self.metrics.execution_time)
        return out

    def _wanted(self, outputs: Iterable[str] | None) -> list[str] | None:
        if outputs is None:
            return None
        if isinstance(outputs, str):
            raise TypeError(f"outputs must be a list of dataset names, not the string {outputs!r}")
        wanted = list(dict.fromkeys(outputs))
        produced = {o for node in self.nodes.values() for o in node.outputs}
        unknown = [o for o in wanted if o not in produced]
        if unknown:
            known = sorted(produced)
            raise ValueError(
                f"outputs {unknown} are not produced by any node of this DAG"
                f" (it produces {known[:20]}{'...' if len(known) > 20 else ''})"
            )
        return wanted

    # --- durable state -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _persistence(
        self, data: dict[str, Any], resume: bool
    ) -> AsyncIterator[tuple[Persistence, RunDurability] | None]:
        persist = await self._open_persistence(data, resume)
        try:
            yield persist
        finally:
            if persist is not None:
                await persist[0].close()

    async def _open_persistence(
        self, data: dict[str, Any], resume: bool
    ) -> tuple[Persistence, RunDurability] | None:
        if not (self.checkpoint or self.cache):
            if resume:
                raise ValueError("resume=True needs checkpoint=URL and run_id=...")
            return None
        uncached = frozenset(n.name for n in self.nodes.values() if not n.cache)
        persist = Persistence(
            self.nodes,
            checkpoint=self.checkpoint,
            run_id=self.run_id,
            resume=resume,
            cache=self.cache,
            cache_ttl=self.cache_ttl,
            uncached=uncached,
            secret=self.secret,
            journal_dir=self.journal_dir,
        )
        self.persistence = persist
        self.run_id = persist.run_id
        durable = await persist.open(data, packed=self.backend == "processes")
        self.metrics.restored = len(persist.restored)
        return persist, durable

    def _make_scheduler(
        self,
        data: dict[str, Any],
        result: RunResult,
        dispatcher: Callable[[], Any],
        run_id: str,
        persist: tuple[Persistence, RunDurability] | None,
    ) -> Scheduler:
        durable = persist[1] if persist else None
        restored = persist[0].restored if persist else ()
        return Scheduler(
            self.nodes,
            data,
            dispatcher,
            self.metrics,
            result,
            self.hooks,
            self.allowed_failures,
            run_id,
            durable,
            restored,
            self._requested,
        )

    async def _finish(self, persist: tuple[Persistence, RunDurability] | None) -> None:
        if persist is not None:
            await persist[0].finish()

    # --- backends ------------------------------------------------------------------------
    async def _run_remote(self, data: dict[str, Any]) -> dict[str, Any]:
        from .client import Client

        client = Client(self.address or "", curve_secret=self.curve[0], server_key=self.curve[1])
        try:
            handle = await anyio.to_thread.run_sync(client.submit, self.nodes, data)
            self.run_id = handle.run_id
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while True:
                status = await anyio.to_thread.run_sync(handle.status)
                if self.hooks.progress is not None:
                    snap = Progress(
                        status["total"],
                        status["done"],
                        status["running"],
                        status["failed"],
                        status["ready"],
                    )
                    self.hooks.call("progress", self.hooks.progress, snap)
                if status["state"] in ("done", "failed", "cancelled"):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"run {handle.run_id} did not finish within {self.timeout:g}s;"
                        " it goes on on the coordinator: Client.attach() picks it up"
                    )
                await anyio.sleep(0.25)
            try:
                return await anyio.to_thread.run_sync(handle.result)
            finally:
                if handle.metrics is not None:
                    self.metrics = handle.metrics
        finally:
            client.close()

    async def _run_threads(
        self,
        data: dict[str, Any],
        result: RunResult,
        persist: tuple[Persistence, RunDurability] | None,
    ) -> None:
        refs: dict[str, Any] = {}
        async with ActorSystem() as system:
            refs["scheduler"] = system.spawn(
                lambda: self._make_scheduler(
                    data, result, lambda: refs["threads"], self.run_id or "", persist
                ),
                "scheduler",
            )
            if persist is not None:
                persist[0].spawn(system, lambda: refs["scheduler"], persist[1], self.metrics)
            refs["threads"] = system.spawn(
                lambda: ThreadDispatcher(self.workers * self.nthreads, refs["scheduler"]), "threads"
            )
            await result.finished.wait()
            await self._finish(persist)
            system.shutdown()

    async def _run_processes(self, data: dict[str, Any], result: RunResult, resume: bool) -> None:
        if self._hosted is not None:  # warm workers, kept between runs on their own loop
            await self._hosted.run(
                lambda cluster: self._run_on(cluster, data, result, resume, warm=True)
            )
            return
        cluster = LocalCluster(self.workers, self.nthreads, keep_data=self.keep_from is not None)
        self.worker_pids = cluster.local.pids
        async with cluster:
            await self._run_on(cluster, data, result, resume, warm=False)

    async def _run_on(
        self,
        cluster: LocalCluster,
        data: dict[str, Any],
        result: RunResult,
        resume: bool,
        warm: bool,
    ) -> None:
        """One run on ``cluster``'s pool: its own scheduler (and durable state) in an actor
        system of its own, so a warm cluster outlives it untouched."""
        fn_specs = _function_specs(self.nodes)
        run_id = uuid.uuid4().hex[:12]
        pool = cluster.pool
        assert pool is not None
        # a cold cluster's workers are still booting while durable state opens
        async with self._persistence(data, resume) as persist, ActorSystem() as system:
            scheduler = system.spawn(
                lambda: self._make_scheduler(data, result, lambda: pool, run_id, persist),
                "scheduler",
            )
            if persist is not None:
                persist[0].spawn(system, lambda: scheduler, persist[1], self.metrics)
            durable = persist is not None
            # durable runs record every output's bytes: those all come here
            keep = None if durable else self.keep_from
            order = list(self.nodes.values())
            run = PoolRun(run_id, scheduler, order, fn_specs, hash_outputs=durable, keep_from=keep)
            pool.tell(AddRun(run))
            try:
                await result.finished.wait()
                await self._fetch_outputs(cluster.ctx, run_id, data, result, scheduler)
            finally:
                if warm:  # workers cancel what is left of the run and free what they kept
                    pool.tell(RemoveRun(run_id))
            if not warm:
                await cluster.release()
            await self._finish(persist)  # while a cold cluster's workers leave
            system.shutdown()

    async def _fetch_outputs(
        self,
        ctx: zmq.asyncio.Context,
        run_id: str,
        data: dict[str, Any],
        result: RunResult,
        scheduler: Any,
    ) -> None:
        """Bring the outputs ``run()`` returns here from the workers keeping them, each
        straight from its holder, once. One whose holder is gone is made again."""
        wanted = None if self._requested is None else frozenset(self._requested)
        for tries in range(1, self.allowed_failures + 2):  # a fetch, then as many remakes
            if result.error is not None:
                return
            refs = [
                v for k, v in data.items() if type(v) is Ref and (wanted is None or k in wanted)
            ]
            if not refs:
                return
            values, lost = await fetch_all(ctx, run_id, refs)
            data.update(values)
            if not lost:
                return
            if tries > self.allowed_failures:
                break
            by_endpoint: dict[str, list[str]] = {}
            for name, (ref, reason) in lost.items():
                log.warning(
                    "could not fetch an output from the worker holding it; making it again",
                    dataset=name,
                    holder=ref.worker,
                    reason=reason,
                )
                by_endpoint.setdefault(ref.endpoint, []).append(name)
            result.finished = anyio.Event()
            for endpoint, names in by_endpoint.items():
                scheduler.tell(DataLost(endpoint=endpoint, names=names, reason="fetch failed"))
            await result.finished.wait()
        if result.error is None:
            left = sorted(k for k, v in data.items() if type(v) is Ref)
            result.error = WorkerLostError(
                f"could not fetch outputs {left} from the workers holding them"
                f" ({self.allowed_failures + 1} tries)"
            )

    def _emit(self, event: str, **fields: Any) -> None:
        if self.hooks.events is not None:
            self.hooks.call("events.emit", self.hooks.events.emit, event, **fields)


class DistributedExecutor(DAGExecutor):
    """Run a DAG on worker processes over ZeroMQ; ``workers`` defaults to the CPU count."""

    default_backend = "processes"


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the garbage collector off what lives as long as the run: the DAG and the
    initial data. Otherwise every full collection during the run walks all of it again;
    on a 100,000-node DAG that is a pause of a tenth of a second or more each time."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _function_specs(nodes: Mapping[str, DAGNode]) -> list[FnSpec]:
    """Describe every node's function up front, so a bad one fails naming its node."""
    specs: dict[int, FnSpec] = {}
    out = []
    for node in nodes.values():
        spec = specs.get(id(node.fn))
        if spec is None:
            try:
                spec = specs[id(node.fn)] = describe(node.fn)
            except Exception as exc:
                raise DAGValidationError(
                    f"node {node.name!r}: its function cannot be sent to worker processes"
                    f" ({exc!r}); use backend='threads' or make it importable or picklable"
                ) from None
        out.append(spec)
    return out


def _only_error(group: BaseExceptionGroup) -> BaseException:
    """What a task group wrapped when it was one error (a bad URL, say): callers catch
    ``ValueError``, not an ``ExceptionGroup`` of one."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _pack_initial(key: str, value: Any) -> Packed:
    try:
        return pack(value)
    except Exception as exc:
        raise OdibiError(
            f"initial data {key!r} cannot be pickled for worker processes: {exc!r}"
        ) from None


def _materialize(key: str, value: Any) -> Any:
    if not isinstance(value, Packed):
        return value
    try:
        return unpack(value)
    except Exception as exc:
        raise OdibiError(f"dataset {key!r} could not be unpickled here: {exc!r}") from exc
