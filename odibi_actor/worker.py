"""The worker process: a DEALER socket in front of a :class:`TaskRunner`.

The network loop only moves bytes; user code runs on the runner's threads, so a long
CPU-bound step never stops the worker from answering. It follows the ZeroMQ guide's
Paranoid Pirate pattern: heartbeats both ways when idle, any traffic counts as one, and a
coordinator that falls silent is reconnected to with exponential backoff. Work the runner
holds survives a reconnect; work of runs the coordinator no longer knows is dropped.
Big outputs stay here and are served to peers from a data socket (see ``_dataplane.py``).
It is the ``odibi-worker`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from . import _wire as wire
from ._dataplane import (
    FETCH_TIMEOUT,
    FetchError,
    LocalStore,
    PeerServer,
    bind_address,
    fetch,
    fetch_timeout,
    readonly,
)
from ._functions import load
from ._logging import configure_logging, get_logger
from ._runner import Outcome, Task, TaskRunner

log = get_logger("odibi_actor.worker")

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 6.0


class _NodeInfo:
    __slots__ = ("error", "fn", "name", "outputs", "timeout")

    def __init__(
        self, name: str, fn: Any, outputs: tuple[str, ...], timeout: float | None, error: str | None
    ) -> None:
        self.name, self.fn, self.outputs, self.timeout, self.error = (
            name,
            fn,
            outputs,
            timeout,
            error,
        )


# a busy worker (more tasks running or queued) that has fewer than COALESCE_BELOW finished
# ones to report waits COALESCE_FOR seconds once, so they leave in one message, not several
COALESCE_BELOW = 16
COALESCE_FOR = 0.001


class _Waiting:
    """A task whose inputs are being fetched from the workers that hold them."""

    __slots__ = ("active", "missing", "task")

    def __init__(self, task: Task, missing: int) -> None:
        self.task, self.missing, self.active = task, missing, True


class _SessionEnded(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Worker:
    """One worker: registers, receives task batches, returns outcome batches."""

    def __init__(
        self,
        address: str,
        nthreads: int = 1,
        name: str | None = None,
        *,
        heartbeat: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        exit_with_coordinator: bool = False,
        max_backoff: float = 30.0,
        configure_socket: Callable[[zmq.Socket[Any]], None] | None = None,
        data_listen: str | None = "auto",
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.address = address
        self.nthreads = nthreads
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.exit_with_coordinator = exit_with_coordinator
        self.max_backoff = max_backoff
        self._configure_socket = configure_socket
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._draining = False
        self._fns: dict[str, dict[int, Callable[..., Any] | Exception]] = {}
        self._runs: dict[str, dict[int, _NodeInfo]] = {}
        self._last_recv = self._last_send = 0.0
        self._welcomed = False
        self._ever_welcomed = False
        self.sessions = 0
        self._max_frame: int | None = None  # the coordinator's frame size limit
        self.runner: TaskRunner | None = None
        # the data plane: outputs kept here, the socket peers fetch them from
        self.data_listen = data_listen
        self.fetch_timeout = fetch_timeout
        self.store = LocalStore()
        self.peer: PeerServer | None = None
        self._keep_from: dict[str, int] = {}  # run -> outputs this big stay here
        self._waiting: set[_Waiting] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle -----------------------------------------------------------------------
    async def serve(self) -> None:
        """Register, work, and re-register whenever the coordinator is lost, until stopped."""
        loop = asyncio.get_running_loop()
        self.runner = TaskRunner(
            self.nthreads, notify=lambda: loop.call_soon_threadsafe(self._wake.set)
        )
        backoff = 0.25
        serving = None
        bind = bind_address(self.data_listen, self.address)
        try:
            if bind is not None:
                self.peer = PeerServer(self._ctx, self.store, bind, name=self.name)
                serving = asyncio.create_task(self.peer.serve())
            while not self._stopped.is_set():
                reason = await self._session()
                if self._stopped.is_set():
                    break
                if reason == "bye" and self.exit_with_coordinator:
                    log.info("coordinator said goodbye; exiting")
                    break
                if reason in ("reset", "welcomed-then-lost"):
                    backoff = 0.25
                if reason != "reset":
                    delay = backoff * random.uniform(0.5, 1.0)
                    hint = None
                    if reason == "lost":  # not even welcomed in this session
                        hint = (
                            "is the coordinator running at this address, and with CurveZMQ,"
                            " is this worker's public key authorised and --server-key right?"
                        )
                    # a local worker's parent may still be opening its durable state
                    quiet = self.exit_with_coordinator and not self._ever_welcomed
                    (log.info if quiet else log.warning)(
                        "coordinator not answering; reconnecting",
                        reason=reason,
                        address=self.address,
                        retry_in=round(delay, 2),
                        hint=hint,
                    )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._stopped.wait()
                    backoff = min(self.max_backoff, backoff * 2)
        finally:
            if serving is not None:
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
            self.store.clear()  # removes its shared-memory files too
            if self.peer is not None:
                self.peer.close()
            self.runner.close()
            self._ctx.destroy(linger=0)

    def drain(self) -> None:
        """SIGTERM: hand back unstarted tasks, finish running ones, then stop."""
        if self._draining or self.runner is None:
            return
        self._draining = True
        returned = self.runner.take_unstarted() + self._take_waiting()
        log.info("worker draining", returned=len(returned), running=self.runner.in_flight)
        if self._sock is None or not self._welcomed:
            self._stopped.set()  # no coordinator to hand anything back to: just stop
            return
        self._spawn(self._send_bye(returned))
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()

    async def _session(self) -> str:
        """One connection to the coordinator; returns why it ended."""
        self.sessions += 1
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.name}/{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        # a local worker often boots before its coordinator binds: retry the connect soon,
        # not after ZeroMQ's default 100 ms, backing off to a second for a distant one
        sock.setsockopt(zmq.RECONNECT_IVL, 5)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._configure_socket is not None:
            self._configure_socket(sock)
        sock.connect(self.address)
        self._sock = sock
        self._welcomed = False
        self._last_recv = time.monotonic()
        # a new session is a new identity: the coordinator counts what the old one held as
        # lost, and nobody will ask for it again
        self.store.clear()
        hello: dict[str, Any] = {
            "t": wire.HELLO,
            "name": self.name,
            "nthreads": self.nthreads,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if self.peer is not None:
            hello["data"] = self.peer.endpoint
        try:
            await self._send(hello)
            tasks = [
                asyncio.create_task(self._read()),
                asyncio.create_task(self._send_outcomes()),
                asyncio.create_task(self._heartbeat()),
                asyncio.create_task(self._stopped.wait()),
            ]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            while pending:  # a task may swallow a cancellation (see _send): cancel it again
                for t in pending:
                    t.cancel()
                _, pending = await asyncio.wait(pending, timeout=1.0)
            for t in done:
                exc = t.exception()
                if isinstance(exc, _SessionEnded):
                    if exc.reason == "lost" and self._welcomed:
                        return "welcomed-then-lost"
                    return exc.reason
                if exc is not None:
                    raise exc
            return "stopped"
        finally:
            self._sock = None
            sock.close(linger=0)

    # --- sending -------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        # the loop keeps only weak references to tasks: hold them until they end, or one
        # waiting on a socket may be collected mid-way and its tasks never run
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed", error=repr(task.exception()))

    async def _send(self, header: dict[str, Any], values: list[wire.Packed] | None = None) -> None:
        if self._sock is None:
            return
        self._last_send = time.monotonic()
        send = self._sock.send_multipart(wire.encode(header, values or ()), copy=False)
        # a send blocks while no connection is up (refused keys, dead peer): bound it. Not
        # with wait_for, which on Python 3.11 can swallow a cancellation that lands as the
        # send completes, and so keep a finished session's sender alive for good
        try:
            async with asyncio.timeout(self.heartbeat_timeout):
                await send
        except TimeoutError:
            raise _SessionEnded("lost") from None

    async def _send_bye(self, returned: list[Task], done: bool = False) -> None:
        await self._send(
            {
                "t": wire.BYE,
                "returned": [[t.run, t.tid, t.attempt] for t in returned],
                "done": done,
            }
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            now = time.monotonic()
            if now - self._last_recv > self.heartbeat_timeout:
                raise _SessionEnded("lost")
            if now - self._last_send >= self.heartbeat:
                await self._send({"t": wire.HEARTBEAT})

    async def _send_outcomes(self) -> None:
        runner = self.runner
        assert runner is not None
        while True:
            await self._wake.wait()
            if runner.in_flight > runner.ready_count and runner.ready_count < COALESCE_BELOW:
                # more is running: let a few more finish and report them in one message
                # (a ms of delay on a busy worker; an idle one reports at once)
                await asyncio.sleep(COALESCE_FOR)
            self._wake.clear()
            await self._report(runner)
            if self._draining and runner.in_flight == 0 and not self._waiting:
                await self._send_bye([], done=True)
                self._stopped.set()
                return

    async def _report(self, runner: TaskRunner) -> None:
        """Send what started and what finished. A call of its own, so that the outcomes
        (kept values among them) are let go once sent, not held until the next batch."""
        if runner.started:
            started: dict[str, list[Any]] = {}
            while runner.started:
                t = runner.started.popleft()
                started.setdefault(t.run, []).append((t.tid, t.attempt))
            for run, tids in started.items():
                await self._send({"t": wire.STARTED, "run": run, "tasks": tids})
        by_run: dict[str, list[Outcome]] = {}
        for o in runner.take_outcomes():
            by_run.setdefault(o.run, []).append(o)
        for run, batch in by_run.items():
            await self._send_batch(run, batch)

    async def _send_batch(self, run: str, outcomes: list[Outcome]) -> None:
        """Send outcomes, never a frame over the coordinator's limit: it would drop it."""
        limit = self._max_frame
        ok: list[Any] = []
        err: list[Any] = []
        values: list[wire.Packed] = []
        inband = 0
        for o in outcomes:
            vals: tuple[wire.Packed, ...] = o.values or ()
            kept = None
            if o.error is None:
                kept, vals = self._keep(run, o.tid, vals)
            if o.error is None and limit is not None:
                size = sum(len(v.data) for v in vals)
                biggest = max([size, *(b.nbytes for v in vals for b in v.buffers)], default=0)
                if biggest > limit:
                    o = Outcome(
                        o.tid,
                        o.attempt,
                        o.duration,
                        run=o.run,
                        error=(
                            f"ValueError: an output is {biggest:,} bytes, over the coordinator's"
                            f" message limit of {limit:,} bytes (see odibi-coordinator"
                            " --max-message-mb)"
                        ),
                    )
                elif inband + size > limit and (ok or err):
                    await self._send({"t": wire.RESULTS, "run": run, "ok": ok, "err": err}, values)
                    ok, err, values, inband = [], [], [], 0
                if o.error is None:
                    inband += size
            if o.error is None:
                entry: list[Any] = [o.tid, o.attempt, o.duration]
                if o.hashes or kept:
                    entry.append(o.hashes)
                if kept:
                    entry.append(kept)
                ok.append(entry)
                values.extend(vals)
            else:
                err.append((o.tid, o.attempt, o.duration, o.error, o.traceback))
        await self._send({"t": wire.RESULTS, "run": run, "ok": ok, "err": err}, values)

    def _keep(
        self, run: str, tid: int, values: tuple[wire.Packed, ...]
    ) -> tuple[list[int | None] | None, tuple[wire.Packed, ...]]:
        """Keep the run's big outputs here; returns per output its size if kept (None if
        it travels inline), and the values that travel inline."""
        limit = self._keep_from.get(run)
        info = self._runs.get(run, {}).get(tid)
        if limit is None or self.peer is None or info is None:
            return None, values
        kept: list[int | None] = []
        inline = []
        for name, value in zip(info.outputs, values, strict=True):
            if value.nbytes >= limit:
                self.store.put(run, name, value)
                kept.append(value.nbytes)
            else:
                kept.append(None)
                inline.append(value)
        if len(inline) == len(values):
            return None, values
        return kept, tuple(inline)

    # --- inputs held by workers ---------------------------------------------------------
    def _resolve(self, run: str, task: Task, refs: list[Any]) -> dict[str, list[Any]] | None:
        """Fill ``task.args`` with the kept inputs this worker holds (no copy); return the
        ones to fetch, by holder: ``{endpoint: [(name, nbytes, arg index)]}``.

        Returns None if an input said to be here is not (the run lost it).
        """
        remote: dict[str, list[Any]] = {}
        args = task.args
        assert isinstance(args, list)
        for argi, name, endpoint, nbytes in refs:
            if self.peer is not None and endpoint == self.peer.endpoint:
                value = self.store.get(run, name)
                if value is None:
                    self._spawn(
                        self._report_lost(
                            run, [(task, endpoint, [name])], "this worker no longer holds it"
                        )
                    )
                    return None
                args[argi] = readonly(value)
            else:
                remote.setdefault(str(endpoint), []).append((str(name), int(nbytes), argi))
        return remote

    async def _fetch_inputs(
        self, run: str, endpoint: str, wanted: dict[str, list[tuple[_Waiting, int]]], nbytes: int
    ) -> None:
        """One request for everything this batch needs from one holder; tasks whose
        inputs are all here go to the runner, the others are reported as lost input."""
        try:
            got, missing = await fetch(
                self._ctx,
                endpoint,
                run,
                list(wanted),
                timeout=fetch_timeout(nbytes, self.fetch_timeout),
                shm=endpoint.startswith("ipc://"),  # the holder is on this host
            )
            reason = "the holder no longer has it"
        except FetchError as exc:
            got, missing, reason = {}, list(wanted), str(exc)
        except Exception as exc:  # whatever it is, the tasks must not wait forever
            got, missing, reason = {}, list(wanted), f"fetch failed: {exc!r}"
        assert self.runner is not None
        for name, value in got.items():
            for w, argi in wanted.get(name, ()):
                if w.active:
                    w.task.args[argi] = readonly(value)  # type: ignore[index]
                    w.missing -= 1
                    if w.missing == 0:
                        w.active = False
                        self._waiting.discard(w)
                        self.runner.submit([w.task])
        lost: dict[_Waiting, list[str]] = {}
        for name in missing:
            for w, _ in wanted.get(name, ()):
                if w.active:
                    lost.setdefault(w, []).append(name)
        for w in lost:
            w.active = False
            self._waiting.discard(w)
        if lost:
            await self._report_lost(
                run, [(w.task, endpoint, names) for w, names in lost.items()], reason
            )

    async def _report_lost(
        self, run: str, lost: list[tuple[Task, str, list[str]]], reason: str
    ) -> None:
        for task, endpoint, names in lost:
            log.warning(
                "could not get a task's input from the worker holding it",
                node=task.node,
                datasets=names,
                holder=endpoint,
                reason=reason,
            )
        entries = [[t.tid, t.attempt, endpoint, names, reason] for t, endpoint, names in lost]
        await self._send({"t": wire.RESULTS, "run": run, "ok": [], "err": [], "lost": entries})

    def _take_waiting(self, which: Callable[[Task], bool] | None = None) -> list[Task]:
        """Remove tasks still waiting for inputs (all, or those ``which`` picks)."""
        out = []
        for w in list(self._waiting):
            if which is None or which(w.task):
                w.active = False
                self._waiting.discard(w)
                out.append(w.task)
        return out

    # --- receiving -----------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self._last_recv = time.monotonic()
            try:
                header, values = wire.decode(frames)
                self._handle(header, values)
            except _SessionEnded:
                raise
            except wire.MalformedMessage as exc:
                log.warning("dropped malformed message", error=str(exc))
            except Exception as exc:
                log.warning("dropped message that could not be handled", error=repr(exc))

    def _handle(self, header: dict[str, Any], values: list[wire.Packed]) -> None:
        kind = header["t"]
        if kind == wire.TASKS:
            self._on_tasks(header, values)
        elif kind == wire.HEARTBEAT:
            pass
        elif kind == wire.WELCOME:
            self._welcomed = self._ever_welcomed = True
            limit = header.get("max_frame", -1)
            self._max_frame = limit if type(limit) is int and limit > 0 else None
            self._keep_runs({str(r) for r in header.get("runs", [])})
            log.info("registered", address=self.address, nthreads=self.nthreads)
        elif kind == wire.CANCEL:
            self._drop_runs({str(r) for r in header.get("runs", [])})
        elif kind == wire.DROP:
            self.store.drop(str(header["run"]), [str(n) for n in header["names"]])
        elif kind == wire.RESET:
            # we were evicted (or it restarted): what we queued has gone to others already
            dropped = self.runner.take_unstarted() if self.runner is not None else []
            dropped += self._take_waiting()
            log.warning(
                "coordinator does not know this worker; registering again",
                dropped_queued=len(dropped),
            )
            raise _SessionEnded("reset")
        elif kind == wire.BYE:
            raise _SessionEnded("bye")
        else:
            log.warning("dropped unexpected message", type=kind)

    def _keep_runs(self, alive: set[str]) -> None:
        known = set(self._runs) | set(self._fns) | self.store.runs
        self._drop_runs(known - alive, keep_queued_of=alive)

    def _drop_runs(self, runs: set[str], keep_queued_of: set[str] | None = None) -> None:
        if self.runner is not None:
            if keep_queued_of is not None:
                which: Callable[[Task], bool] = lambda t: t.run not in keep_queued_of  # noqa: E731
            else:
                which = lambda t: t.run in runs  # noqa: E731
            dropped = self.runner.take_unstarted(which) + self._take_waiting(which)
            if dropped:
                log.info("dropped queued tasks of finished runs", tasks=len(dropped))
        self.store.drop_runs(runs)
        for run in runs:
            self._runs.pop(run, None)
            self._fns.pop(run, None)
            self._keep_from.pop(run, None)

    def _on_tasks(self, header: dict[str, Any], values: list[wire.Packed]) -> None:
        run = str(header["run"])
        fns = self._fns.setdefault(run, {})
        for fid, spec in header.get("fns", {}).items():
            try:
                fns[int(fid)] = load(tuple(spec))
            except Exception as exc:
                fns[int(fid)] = exc
        nodes = self._runs.setdefault(run, {})
        for nid, (name, fid, outputs, timeout) in header.get("nodes", {}).items():
            fn = fns.get(fid)
            error = None
            if fn is None:
                error = f"function {fid} was never sent to this worker"
            elif isinstance(fn, Exception):
                error = f"{type(fn).__name__}: {fn}"
            nodes[int(nid)] = _NodeInfo(name, fn, tuple(outputs), timeout, error)
        keep = header.get("keep")
        if type(keep) is int and keep >= 0:
            self._keep_from[run] = keep
        tasks, failed, pos = [], [], 0
        fetches: dict[str, dict[str, list[tuple[_Waiting, int]]]] = {}  # endpoint -> name
        sizes: dict[str, int] = {}
        for tid, attempt, nargs, *rest in header["tasks"]:
            args: list[Any] = values[pos : pos + nargs]
            pos += nargs
            refs = rest[0] if rest else ()
            if refs:  # inputs kept on workers: the values carry the others, in order
                inline = iter(args)
                held = {r[0] for r in refs}
                args = [None if i in held else next(inline) for i in range(nargs + len(refs))]
            info = nodes.get(tid)
            if info is None or info.error is not None:
                error = info.error if info else f"node {tid} was never described to this worker"
                failed.append(Outcome(tid, attempt, 0.0, error=error, run=run))
                continue
            tasks.append(
                Task(
                    tid,
                    attempt,
                    info.name,
                    info.fn,
                    args,
                    info.outputs,
                    info.timeout,
                    packed=True,
                    run=run,
                    hash_outputs=bool(header.get("hash")),
                )
            )
            if refs:
                remote = self._resolve(run, tasks[-1], refs)
                if remote is None:
                    tasks.pop()
                elif remote:
                    w = _Waiting(tasks.pop(), sum(len(v) for v in remote.values()))
                    self._waiting.add(w)
                    for endpoint, items in remote.items():
                        wanted = fetches.setdefault(endpoint, {})
                        for name, nbytes, argi in items:
                            if name not in wanted:
                                sizes[endpoint] = sizes.get(endpoint, 0) + nbytes
                            wanted.setdefault(name, []).append((w, argi))
        assert self.runner is not None
        if self._draining:
            self._spawn(self._send_bye(tasks + self._take_waiting()))
            return
        for endpoint, wanted in fetches.items():
            self._spawn(self._fetch_inputs(run, endpoint, wanted, sizes[endpoint]))
        self.runner.submit(tasks)
        if failed:
            self._spawn(self._send_batch(run, failed))


def _die_with_parent(parent_pid: int) -> None:
    """Local workers must never outlive the coordinator that spawned them."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before we could ask to follow it


async def _watch_parent(parent_pid: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("coordinator process is gone; exiting")
            os._exit(0)


async def _amain(args: argparse.Namespace) -> None:
    from ._security import client_socket_options

    worker = Worker(
        args.address,
        nthreads=args.nthreads,
        name=args.name,
        heartbeat_timeout=args.heartbeat_timeout,
        exit_with_coordinator=bool(args.parent_pid),
        configure_socket=client_socket_options(args.curve_secret, args.server_key),
        data_listen=args.data_listen,
        fetch_timeout=args.fetch_timeout,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.drain)
    loop.add_signal_handler(signal.SIGINT, worker.drain)
    watcher = asyncio.create_task(_watch_parent(args.parent_pid)) if args.parent_pid else None
    await worker.serve()
    if watcher is not None:
        watcher.cancel()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odibi-worker",
        description="Run an odibi-actor worker: connect to a coordinator and execute the"
        " pipeline steps it sends. It heartbeats, and reconnects with backoff when the"
        " coordinator goes away. SIGTERM hands back queued work, finishes running steps,"
        " then exits.",
    )
    p.add_argument("address", help="coordinator address, e.g. tcp://10.0.0.5:5555")
    p.add_argument(
        "--nthreads", type=int, default=1, help="steps run at once in this process (default: 1)"
    )
    p.add_argument(
        "--name", default=None, help="worker name shown in status and metrics (default: HOST-PID)"
    )
    p.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=None,
        help="this worker's CurveZMQ secret key file (from 'odibi keygen'); needed when the"
        " coordinator uses CurveZMQ",
    )
    p.add_argument(
        "--server-key",
        metavar="FILE",
        default=None,
        help="the coordinator's public key file (server.key)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=HEARTBEAT_TIMEOUT,
        help=f"seconds of coordinator silence before reconnecting (default: {HEARTBEAT_TIMEOUT:g})",
    )
    p.add_argument(
        "--data-listen",
        default="auto",
        metavar="ADDR",
        help="where this worker's data socket binds, for peers to fetch the big outputs it"
        " keeps: 'auto' (default: an ipc:// path for a local coordinator, 127.0.0.1 for a"
        " loopback one, none otherwise), 'off', or an endpoint such as tcp://10.0.0.7:*"
        " (not encrypted: a trusted network only)",
    )
    p.add_argument(
        "--fetch-timeout",
        type=float,
        default=FETCH_TIMEOUT,
        help="seconds a peer holding an input may take to answer, plus one per 100 MB"
        f" (default: {FETCH_TIMEOUT:g})",
    )
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nthreads < 1:
        parser.error("--nthreads must be at least 1")
    if bool(args.curve_secret) != bool(args.server_key):
        parser.error("--curve-secret and --server-key go together")
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        asyncio.run(_amain(args))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a bad key file, say: one clear line, not a traceback
        print(f"odibi-worker: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)  # abandoned (timed-out) step threads must not keep the process alive


if __name__ == "__main__":
    main()
