"""The worker process: a DEALER socket in front of a :class:`TaskRunner`.

The network loop only moves bytes; user code runs on the runner's threads, so a long
CPU-bound step never stops the worker from answering. It follows the ZeroMQ guide's
Paranoid Pirate pattern: heartbeats both ways when idle, any traffic counts as one, and a
coordinator that falls silent is reconnected to with exponential backoff. Work the runner
holds survives a reconnect; work of runs the coordinator no longer knows is dropped.
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

    # --- lifecycle -----------------------------------------------------------------------
    async def serve(self) -> None:
        """Register, work, and re-register whenever the coordinator is lost, until stopped."""
        loop = asyncio.get_running_loop()
        self.runner = TaskRunner(
            self.nthreads, notify=lambda: loop.call_soon_threadsafe(self._wake.set)
        )
        backoff = 0.25
        try:
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
                        await asyncio.wait_for(self._stopped.wait(), delay)
                    backoff = min(self.max_backoff, backoff * 2)
        finally:
            self.runner.close()
            self._ctx.destroy(linger=0)

    def drain(self) -> None:
        """SIGTERM: hand back unstarted tasks, finish running ones, then stop."""
        if self._draining or self.runner is None:
            return
        self._draining = True
        returned = self.runner.take_unstarted()
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
        try:
            await self._send(
                {
                    "t": wire.HELLO,
                    "name": self.name,
                    "nthreads": self.nthreads,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                }
            )
            tasks = [
                asyncio.create_task(self._read()),
                asyncio.create_task(self._send_outcomes()),
                asyncio.create_task(self._heartbeat()),
                asyncio.create_task(self._stopped.wait()),
            ]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
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
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _send(self, header: dict[str, Any], values: list[wire.Packed] | None = None) -> None:
        if self._sock is None:
            return
        self._last_send = time.monotonic()
        send = self._sock.send_multipart(wire.encode(header, values or ()), copy=False)
        try:  # a send blocks while no connection is up (refused keys, dead peer): bound it
            await asyncio.wait_for(send, self.heartbeat_timeout)
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
            if runner.started:
                started: dict[str, list[Any]] = {}
                while runner.started:
                    t = runner.started.popleft()
                    started.setdefault(t.run, []).append((t.tid, t.attempt))
                for run, tids in started.items():
                    await self._send({"t": wire.STARTED, "run": run, "tasks": tids})
            outcomes = runner.take_outcomes()
            if outcomes:
                by_run: dict[str, list[Outcome]] = {}
                for o in outcomes:
                    by_run.setdefault(o.run, []).append(o)
                for run, batch in by_run.items():
                    await self._send_batch(run, batch)
            if self._draining and runner.in_flight == 0:
                await self._send_bye([], done=True)
                self._stopped.set()
                return

    async def _send_batch(self, run: str, outcomes: list[Outcome]) -> None:
        """Send outcomes, never a frame over the coordinator's limit: it would drop it."""
        limit = self._max_frame
        ok: list[Any] = []
        err: list[Any] = []
        values: list[wire.Packed] = []
        inband = 0
        for o in outcomes:
            if o.error is None and limit is not None:
                vals = o.values or ()
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
                ok.append((o.tid, o.attempt, o.duration, *((o.hashes,) if o.hashes else ())))
                values.extend(o.values or ())
            else:
                err.append((o.tid, o.attempt, o.duration, o.error, o.traceback))
        await self._send({"t": wire.RESULTS, "run": run, "ok": ok, "err": err}, values)

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
        elif kind == wire.RESET:
            # we were evicted (or it restarted): what we queued has gone to others already
            dropped = self.runner.take_unstarted() if self.runner is not None else []
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
        self._drop_runs((set(self._runs) | set(self._fns)) - alive, keep_queued_of=alive)

    def _drop_runs(self, runs: set[str], keep_queued_of: set[str] | None = None) -> None:
        if self.runner is not None:
            if keep_queued_of is not None:
                dropped = self.runner.take_unstarted(lambda t: t.run not in keep_queued_of)
            else:
                dropped = self.runner.take_unstarted(lambda t: t.run in runs)
            if dropped:
                log.info("dropped queued tasks of finished runs", tasks=len(dropped))
        for run in runs:
            self._runs.pop(run, None)
            self._fns.pop(run, None)

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
        tasks, failed, pos = [], [], 0
        for tid, attempt, nargs in header["tasks"]:
            args = values[pos : pos + nargs]
            pos += nargs
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
        assert self.runner is not None
        if self._draining:
            self._spawn(self._send_bye(tasks))
            return
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
