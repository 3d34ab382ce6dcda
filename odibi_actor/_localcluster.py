"""Local worker processes and the pool they talk to, for one run or kept between runs.

By default a run brings its workers up and down around itself (:class:`LocalCluster`),
so nothing outlives it. :class:`HostedCluster` keeps the same parts on a thread and event
loop of their own between runs, as a Dask ``LocalCluster`` or ``ray.init()`` does: a run
then pays no worker start-up, and its workers have already imported what earlier runs
needed. Runs are actors of their own either way; only the pool and the workers are shared.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import zmq
import zmq.asyncio

from . import _shm
from ._kernel import ActorRef, ActorSystem
from ._local import LocalWorkers, sweep_stale_sockets
from ._pool import PoolStatus, SayGoodbye, WorkerExited, WorkerPool
from .errors import OdibiError

T = TypeVar("T")


class LocalCluster:
    """``async with LocalCluster(n) as cluster``: ``n`` local workers, a pool bound to an
    ipc socket they connect to, and the actor system the pool runs in."""

    def __init__(self, workers: int, nthreads: int = 1, keep_data: bool = True) -> None:
        self.workers, self.nthreads, self.keep_data = workers, nthreads, keep_data
        self.path = os.path.join(
            tempfile.gettempdir(), f"odibi-{os.getpid()}-{uuid.uuid4().hex[:12]}.sock"
        )
        self.address = f"ipc://{self.path}"
        self.ctx = zmq.asyncio.Context()
        self.local = LocalWorkers(
            workers, self.address, nthreads, on_exit=self._on_exit, keep_data=keep_data
        )
        self.pool: ActorRef[Any] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._released = False

    async def __aenter__(self) -> LocalCluster:
        sweep_stale_sockets()  # of local runs killed before they could clean up
        _shm.sweep_stale()  # and the shared memory of their workers
        try:
            # workers boot in the background (the zygote's imports are the slow part) and
            # connect once the pool binds
            await self._stack.enter_async_context(self.local)
            system = await self._stack.enter_async_context(ActorSystem())
            self.system = system
            address, ctx, local = self.address, self.ctx, self.local
            self.pool = system.spawn(lambda: WorkerPool(address, ctx, on_evict=local.kill), "pool")
        except BaseException:
            await self._close(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        if exc[0] is None:
            try:
                await self.release()
                await self.local.stop(grace=3.0)  # the pool still says bye to late joiners
            except BaseException as error:  # a dead pool, say: still tear everything down
                await self._close(type(error), error, error.__traceback__)
                raise
            self.system.shutdown()
        return await self._close(*exc)

    async def _close(self, *exc: Any) -> bool | None:
        try:
            return await self._stack.__aexit__(*exc)
        finally:
            self.ctx.destroy(linger=0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def connected(self, timeout: float) -> int:
        """Wait (up to ``timeout`` s) until every worker has registered; how many have."""
        assert self.pool is not None
        with anyio.move_on_after(timeout):
            while len(await self.pool.ask(PoolStatus())) < self.workers:
                await anyio.sleep(0.005)
        return len(await self.pool.ask(PoolStatus()))

    async def release(self) -> None:
        """Tell the workers to leave (once): they go while the caller finishes up."""
        if self._released or self.pool is None:
            return
        self._released = True
        self.local.retire()
        await self.pool.ask(SayGoodbye(), timeout=5)

    def _on_exit(self, name: str, code: int, more: bool) -> None:
        if self.pool is not None:  # a worker that died before the pool started was never in it
            self.pool.tell(WorkerExited(name, code, more))


class HostedCluster:
    """A :class:`LocalCluster` on a thread of its own, kept until :meth:`close`.

    :meth:`run` hands a coroutine function the cluster and runs it on the cluster's loop,
    inside the cluster's task group: if the pool crashes, runs in flight end with the error
    instead of waiting forever. The workers die with this process whatever happens
    (``PR_SET_PDEATHSIG``), so a program that never calls :meth:`close` leaves none behind.
    """

    connect_timeout = 30.0  # seconds start() waits for the workers to register

    def __init__(self, workers: int, nthreads: int = 1, keep_data: bool = True) -> None:
        self.cluster = LocalCluster(workers, nthreads, keep_data)
        self._thread = threading.Thread(target=self._main, name="odibi-local-cluster", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: Any = None
        self._stop: anyio.Event | None = None
        self._error: BaseException | None = None
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        atexit.register(self.close)  # workers told bye, socket files removed
        if self._error is not None:
            raise OdibiError(f"cannot start local workers: {self._error!r}") from self._error

    @property
    def alive(self) -> bool:
        return self._loop is not None and not self._closed

    def _main(self) -> None:
        try:
            anyio.run(self._host)
        except BaseException as exc:
            self._error = exc
        finally:
            self._closed = True
            self._ready.set()

    async def _host(self) -> None:
        async with self.cluster, anyio.create_task_group() as tg:
            self._tg, self._stop = tg, anyio.Event()
            self._loop = asyncio.get_running_loop()
            await self.cluster.connected(self.connect_timeout)  # warm means ready to run
            self._ready.set()
            await self._stop.wait()
            tg.cancel_scope.cancel()  # runs still going when the executor closes end here

    async def run(self, fn: Callable[[LocalCluster], Awaitable[T]]) -> T:
        """``await fn(cluster)`` on the cluster's loop, from any other event loop."""
        loop = self._loop
        if loop is None or self._closed:
            raise self._gone()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        scope = anyio.CancelScope()

        async def call() -> None:
            if not done.set_running_or_notify_cancel():
                return  # the caller gave up before it began
            try:
                with scope:
                    done.set_result(await fn(self.cluster))
                    return
                done.set_exception(OdibiError("the run was cancelled"))
            except Exception as exc:
                done.set_exception(exc)
            except BaseException:  # the cluster is going down
                done.set_exception(self._gone())
                raise

        def begin() -> None:
            if self._closed or self._tg is None:
                done.set_exception(self._gone())
            else:
                self._tg.start_soon(call)

        loop.call_soon_threadsafe(begin)
        try:
            return await asyncio.wrap_future(done)
        except BaseException:
            if done.running():  # we were cancelled mid-run: stop it, let it clean up
                loop.call_soon_threadsafe(scope.cancel)
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    while not done.done():
                        await anyio.sleep(0.01)
            raise

    def _gone(self) -> OdibiError:
        why = "closed" if self._error is None else repr(self._error)
        return OdibiError(f"the executor's local workers are gone ({why})")

    def close(self, timeout: float = 15.0) -> None:
        """Stop the runs still going, then the workers (bye, SIGTERM, SIGKILL); waits."""
        atexit.unregister(self.close)
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # its loop has already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
