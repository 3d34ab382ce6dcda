"""The worker process: a DEALER socket in front of a :class:`TaskRunner`.

The network loop only moves bytes; user code runs on the runner's threads, so a long
CPU-bound step never stops the worker from answering. It is the ``odibi-worker`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio

from . import _wire as wire
from ._functions import load
from ._logging import configure_logging
from ._runner import Outcome, Task, TaskRunner

log = structlog.get_logger("odibi_actor.worker")


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


class Worker:
    """One worker: registers, receives task batches, returns outcome batches."""

    def __init__(self, address: str, nthreads: int = 1, name: str | None = None) -> None:
        self.address = address
        self.nthreads = nthreads
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, f"{self.name}/{uuid.uuid4().hex[:8]}".encode())
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._draining = False
        self._runs: dict[str, dict[int, _NodeInfo]] = {}
        self._fns: dict[str, dict[int, Callable[..., Any] | Exception]] = {}
        self.runner: TaskRunner | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.runner = TaskRunner(
            self.nthreads, notify=lambda: loop.call_soon_threadsafe(self._wake.set)
        )
        self._sock.connect(self.address)
        await self._send(
            {
                "t": wire.HELLO,
                "name": self.name,
                "nthreads": self.nthreads,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )
        log.info("worker registered", name=self.name, address=self.address, nthreads=self.nthreads)
        reader = asyncio.create_task(self._read())
        sender = asyncio.create_task(self._send_outcomes())
        await self._stop.wait()
        reader.cancel()
        sender.cancel()
        self._sock.close(linger=1000)
        self._ctx.term()

    def drain(self) -> None:
        """SIGTERM: hand back unstarted tasks, finish running ones, then stop."""
        if self._draining or self.runner is None:
            return
        self._draining = True
        returned = self.runner.take_unstarted()
        log.info("worker draining", returned=len(returned), running=self.runner.in_flight)
        asyncio.get_running_loop().create_task(
            self._send({"t": wire.BYE, "returned": [[t.tid, t.attempt] for t in returned]})
        )
        self._wake.set()

    async def _send(self, header: dict[str, Any], values: list[wire.Packed] | None = None) -> None:
        await self._sock.send_multipart(wire.encode(header, values or ()), copy=False)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                header, values = wire.decode(frames)
                self._handle(header, values)
            except wire.MalformedMessage as exc:
                log.warning("dropped malformed message", error=str(exc))
            except Exception as exc:
                log.warning("dropped message that could not be handled", error=repr(exc))

    def _handle(self, header: dict[str, Any], values: list[wire.Packed]) -> None:
        kind = header["t"]
        if kind == wire.BYE:
            log.info("coordinator said goodbye")
            self._stop.set()
            return
        if kind != wire.TASKS:
            log.warning("dropped unexpected message", type=kind)
            return
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
            if isinstance(fn, Exception) or fn is None:
                error = f"ImportError: {fn}" if fn is not None else f"unknown function {fid}"
            nodes[int(nid)] = _NodeInfo(name, fn, tuple(outputs), timeout, error)
        tasks, failed, pos = [], [], 0
        for tid, attempt, nargs in header["tasks"]:
            args = values[pos : pos + nargs]
            pos += nargs
            info = nodes.get(tid)
            if info is None or info.error is not None:
                error = info.error if info else f"node {tid} was never described to this worker"
                failed.append(Outcome(tid, attempt, 0.0, error=error))
                continue
            tasks.append(
                Task(
                    tid, attempt, info.name, info.fn, args, info.outputs, info.timeout, packed=True
                )
            )
        assert self.runner is not None
        if self._draining:
            asyncio.get_running_loop().create_task(
                self._send({"t": wire.BYE, "returned": [[t.tid, t.attempt] for t in tasks]})
            )
            return
        self.runner.submit(tasks)
        if failed:
            asyncio.get_running_loop().create_task(self._send_batch(failed))

    async def _send_outcomes(self) -> None:
        assert self.runner is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            outcomes = self.runner.take_outcomes()
            if outcomes:
                await self._send_batch(outcomes)
            if self._draining and self.runner.in_flight == 0:
                await self._send({"t": wire.BYE, "returned": [], "done": True})
                self._stop.set()
                return

    async def _send_batch(self, outcomes: list[Outcome]) -> None:
        ok, err, values = [], [], []
        for o in outcomes:
            if o.error is None:
                ok.append((o.tid, o.attempt, o.duration))
                values.extend(o.values or ())
            else:
                err.append((o.tid, o.attempt, o.duration, o.error, o.traceback))
        await self._send({"t": wire.RESULTS, "ok": ok, "err": err}, values)


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
    worker = Worker(args.address, nthreads=args.nthreads, name=args.name)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.drain)
    loop.add_signal_handler(signal.SIGINT, worker.drain)
    if args.parent_pid:
        watcher = asyncio.create_task(_watch_parent(args.parent_pid))
    await worker.serve()
    if args.parent_pid:
        watcher.cancel()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odibi-worker",
        description="Run an odibi-actor worker: connect to a coordinator and execute the"
        " pipeline steps it sends. SIGTERM hands back queued work, finishes running steps,"
        " then exits.",
    )
    p.add_argument("address", help="coordinator address, e.g. tcp://10.0.0.5:5555 or ipc:///tmp/x")
    p.add_argument(
        "--nthreads", type=int, default=1, help="steps run at once in this process (default: 1)"
    )
    p.add_argument(
        "--name", default=None, help="worker name shown in logs and metrics (default: HOST-PID)"
    )
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.nthreads < 1:
        build_parser().error("--nthreads must be at least 1")
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    configure_logging(json=args.log_json, level=args.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_amain(args))
    os._exit(0)  # abandoned (timed-out) step threads must not keep the process alive


if __name__ == "__main__":
    main()
