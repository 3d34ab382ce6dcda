"""The Python client of a coordinator: submit DAGs, follow them, fetch their results.

Requests follow the ZeroMQ guide's Lazy Pirate pattern: each carries an id, an answer is
awaited for a bounded time, and a socket that timed out is replaced so a late answer
cannot be mistaken for the next one. Submissions carry a client-made run id, so
resubmitting after a lost answer never starts a run twice.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import zmq

from . import _wire as wire
from ._dag import DAGBuilder, DAGNode, build_dag
from ._functions import describe
from ._security import client_socket_options
from ._wire import Packed, pack, unpack
from .errors import DAGValidationError, NodeFailedError, OdibiError
from .metrics import MetricsManager


class CoordinatorError(OdibiError):
    """The coordinator refused a request or could not be reached."""


class CoordinatorUnreachable(CoordinatorError):
    """No answer within the timeout: the coordinator is down, restarting or unreachable."""


class RunNotFound(CoordinatorError, KeyError):
    """The coordinator does not know this run (never submitted there, or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "run not found"


class RunFailed(OdibiError):
    """A run ended without its outputs for a reason other than a failing node."""


class Client:
    """A connection to ``odibi-coordinator``'s client address (``--client-listen``)."""

    def __init__(
        self,
        address: str,
        *,
        curve_secret: str | None = None,
        server_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._options = client_socket_options(curve_secret, server_key)
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sock: zmq.Socket[Any] | None = None

    # --- public --------------------------------------------------------------------------
    def submit(
        self,
        nodes: Mapping[str, DAGNode] | DAGBuilder,
        initial_data: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> RunHandle:
        """Send a DAG to run on the cluster; returns at once with a :class:`RunHandle`."""
        built = nodes.build() if isinstance(nodes, DAGBuilder) else build_dag(nodes.values())
        desc, specs = [], []
        for node in built.values():
            try:
                specs.append(describe(node.fn))
            except Exception as exc:
                raise DAGValidationError(
                    f"node {node.name!r}: its function cannot be sent to workers ({exc!r})"
                ) from None
            desc.append(
                (node.name, node.inputs, node.outputs, node.retries, node.timeout, node.retry_delay)
            )
        keys, values = [], []
        for key, value in (initial_data or {}).items():
            try:
                values.append(pack(value))
            except Exception as exc:
                raise OdibiError(f"initial data {key!r} cannot be pickled: {exc!r}") from None
            keys.append(key)
        run = run_id or uuid.uuid4().hex[:12]
        header = {"t": wire.SUBMIT, "run": run, "nodes": desc, "fns": specs, "keys": keys}
        reply, _ = self._request(header, values, retries=2)
        return RunHandle(self, str(reply["run"]), len(built))

    def attach(self, run_id: str) -> RunHandle:
        """A handle on a run submitted earlier, by this or any client."""
        status = self._request({"t": wire.STATUS, "run": run_id})[0]["status"]
        return RunHandle(self, run_id, int(status["total"]))

    def workers(self) -> list[dict[str, Any]]:
        return list(self._request({"t": wire.WORKERS})[0]["workers"])

    def runs(self) -> list[dict[str, Any]]:
        return list(self._request({"t": wire.RUNS})[0]["runs"])

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------
    def _new_socket(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self._options is not None:
                self._options(sock)
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise CoordinatorError(
                f"bad coordinator address {self.address!r} ({exc}); expected tcp://HOST:PORT,"
                " the coordinator's --client-listen address"
            ) from None
        return sock

    def _request(
        self,
        header: dict[str, Any],
        values: list[Packed] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        sock: zmq.Socket[Any] | None = None,
    ) -> tuple[dict[str, Any], list[Packed]]:
        """One request on the shared socket, or on ``sock`` (a long poll's own socket)."""
        limit = self.timeout if timeout is None else timeout
        for _ in range(retries + 1):
            if sock is not None:  # the caller replaces its socket when this fails
                reply = self._exchange(sock, header, values, limit)
                if reply is not None:
                    return reply
                break
            with self._lock:
                if self._sock is None:
                    self._sock = self._new_socket()
                reply = self._exchange(self._sock, header, values, limit)
                if reply is not None:
                    return reply
                self._sock.close(linger=0)
                self._sock = None
        raise CoordinatorUnreachable(
            f"coordinator at {self.address} did not answer within {limit:g}s"
            " (is odibi-coordinator running, and is this its --client-listen address?)"
        )

    def _exchange(
        self,
        sock: zmq.Socket[Any],
        header: dict[str, Any],
        values: list[Packed] | None,
        limit: float,
    ) -> tuple[dict[str, Any], list[Packed]] | None:
        req = next(self._ids)
        sock.send_multipart(wire.encode({**header, "req": req}, values or ()), copy=False)
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            frames = sock.recv_multipart(copy=False)
            try:
                reply, out = wire.decode(frames)
            except wire.MalformedMessage:
                continue
            if reply.get("req") != req:
                continue  # a late answer to an earlier request
            if reply["t"] == wire.ERROR:
                raise _remote_error(reply)
            return reply, out
        return None


def _remote_error(reply: dict[str, Any]) -> OdibiError:
    kind, message = reply.get("kind", "Error"), reply.get("error", "")
    if kind in ("DAGValidationError", "CycleError", "MissingInputError"):
        return DAGValidationError(message)
    if kind == "KeyError":
        return RunNotFound(message.strip("\"'"))
    return CoordinatorError(f"{kind}: {message}")


class RunHandle:
    """A run on the cluster: poll it, follow its events, wait for its result, or cancel it.

    ``await handle`` waits for the result without blocking the event loop.
    """

    def __init__(self, client: Client, run_id: str, total: int) -> None:
        self.client = client
        self.run_id = run_id
        self.total = total
        self.metrics: MetricsManager | None = None

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id}>"

    def status(self) -> dict[str, Any]:
        """``state`` (waiting, running, done, failed, cancelled) and node counts."""
        return dict(self.client._request({"t": wire.STATUS, "run": self.run_id})[0]["status"])

    def cancel(self) -> None:
        self.client._request({"t": wire.CANCEL_RUN, "run": self.run_id})

    def events(self, poll: float = 0.2) -> Iterator[dict[str, Any]]:
        """Node events (step_start, step_complete, step_error) until the run ends."""
        cursor = 0
        while True:
            reply, _ = self.client._request({"t": wire.EVENTS, "run": self.run_id, "since": cursor})
            yield from reply["events"]
            cursor = int(reply["next"])
            if reply["state"] in ("done", "failed", "cancelled") and not reply["events"]:
                return
            if not reply["events"]:
                time.sleep(poll)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the run and return its outputs; raise its error if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.client._new_socket()  # long polls must not hold up other requests
        backoff = 0.25
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"run {self.run_id} did not finish within {timeout:g}s")
                wait = 10.0 if left is None else min(10.0, left)
                try:
                    reply, values = self.client._request(
                        {"t": wire.RESULT, "run": self.run_id, "wait": wait},
                        timeout=wait + min(self.client.timeout, 5.0),
                        retries=0,
                        sock=sock,
                    )
                except CoordinatorUnreachable:
                    # down or restarting: keep waiting, without hammering it
                    sock.close(linger=0)
                    time.sleep(backoff if left is None else min(backoff, max(0.0, left)))
                    backoff = min(5.0, backoff * 2)
                    sock = self.client._new_socket()
                    continue
                backoff = 0.25
                if reply["state"] != "running":
                    break
        finally:
            sock.close(linger=0)
        self.metrics = MetricsManager.from_wire(reply.get("metrics") or {})
        if reply["state"] == "done":
            return {k: unpack(v) for k, v in zip(reply["keys"], values, strict=True)}
        raise _run_error(self.run_id, reply["error"])

    def __await__(self) -> Generator[Any, None, dict[str, Any]]:
        import anyio.to_thread

        return anyio.to_thread.run_sync(self.result).__await__()


def _run_error(run_id: str, info: dict[str, Any]) -> OdibiError:
    if info.get("kind") == "NodeFailedError":
        return NodeFailedError(
            info["node"],
            int(info["attempts"]),
            info["error"],
            info.get("traceback") or "",
            info.get("worker"),
        )
    return RunFailed(f"run {run_id}: {info.get('message', info)}")
