"""The data plane: big outputs stay on the worker that made them; peers fetch them directly.

A worker keeps each output whose pickle is at least the run's threshold (``KEEP_FROM``,
1 MiB, by default) in a per-run :class:`LocalStore` and reports a small :class:`Ref`
instead of the bytes. The coordinator forwards references, never the data; a worker whose
task needs a dataset another worker holds asks that worker's data socket for it
(:func:`fetch`), and the holder answers from its store (:class:`PeerServer`). Frames are
received with ``copy=False``, so out-of-band buffers are the zmq frames' own memory: the
only copy per hop is the kernel's. Between workers on one host, big buffers do not cross
the socket at all: the holder writes each into shared memory once (:mod:`._shm`) and the
asker maps it. An input held by the consumer's own worker is passed by reference, without
any copy.

Kept datasets are passed to steps read-only (as Ray does): several consumers may read
the same memory, and one must not change what the others see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import _shm
from . import _wire as wire
from ._logging import get_logger
from ._release import big, release
from ._wire import Packed

log = get_logger("odibi_actor.dataplane")

KEEP_FROM = 1 << 20  # outputs whose pickle is at least this many bytes stay on the worker
FETCH_TIMEOUT = 30.0  # seconds a holder has to answer a fetch, plus one per FETCH_RATE bytes
FETCH_RATE = 100e6
CONNECT_TIMEOUT = 5.0  # seconds to reach a holder's data socket at all
HEARTBEAT_MS = 1000  # ZMTP heartbeats on a fetch: a holder that stops answering is dropped
HEARTBEAT_TIMEOUT_MS = 5000
# connected means the holder's zmq answered the handshake: a stopped process never does
_CONNECTED = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
MAX_NAMES = 100_000  # datasets one fetch may ask for


@dataclass(frozen=True, slots=True)
class Ref:
    """Where a kept dataset lives. The coordinator holds this instead of the bytes."""

    name: str  # the dataset
    owner: bytes  # the holder's identity at the pool (one per connection session)
    endpoint: str  # the holder's data socket
    nbytes: int
    worker: str = ""  # the holder's name, for messages
    hash: str | None = None  # content hash, when the holder computed one


class FetchError(Exception):
    """A holder could not be reached or did not answer in time."""


def readonly(p: Packed) -> Packed:
    """The same bytes, read-only: consumers sharing a kept value must not change it."""
    return Packed(p.data, [b.toreadonly() for b in p.buffers])


def fetch_timeout(nbytes: int, base: float = FETCH_TIMEOUT) -> float:
    """How long a holder may take to send ``nbytes``: generous, since it only bounds a
    holder that is alive but not answering (a dead one is noticed at once)."""
    return base + nbytes / FETCH_RATE


# where a shared value's big buffers are: [[buffer index, path, nbytes], ...]
Shared = list[list[Any]]


class LocalStore:
    """A worker's kept outputs, by run and dataset name. Touched only on its event loop."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Packed]] = {}
        self._shared: dict[tuple[str, str], Shared] = {}  # values also in shared memory
        self._sharing: dict[tuple[str, str], asyncio.Future[None]] = {}  # being written
        self.nbytes = 0

    def put(self, run: str, name: str, value: Packed) -> None:
        held = self._runs.setdefault(run, {})
        old = held.get(name)
        if old is not None:
            self.nbytes -= old.nbytes
            self._unshare(run, name)
        held[name] = value
        self.nbytes += value.nbytes

    def get(self, run: str, name: str) -> Packed | None:
        return self._runs.get(run, {}).get(name)

    async def share(self, run: str, name: str) -> tuple[Packed, Shared] | None:
        """The value for a peer on this host: its big buffers in shared memory (written
        once, on threads, then read from there here too), the rest to send as usual.
        None if the value is not (or no longer) here. Concurrent asks for one value wait
        for the same write."""
        key = (run, name)
        while True:
            value = self.get(run, name)
            if value is None:
                return None
            shared = self._shared.get(key)
            if shared is not None:
                break
            pending = self._sharing.get(key)
            if pending is None:
                pending = self._sharing[key] = asyncio.ensure_future(self._write(key, value))
                pending.add_done_callback(lambda _: self._sharing.pop(key, None))
            await asyncio.shield(pending)  # then look again: it may be gone or replaced
        moved = {entry[0] for entry in shared}
        rest = [b for i, b in enumerate(value.buffers) if i not in moved]
        return Packed(value.data, rest), shared

    async def _write(self, key: tuple[str, str], value: Packed) -> None:
        large = [i for i, b in enumerate(value.buffers) if b.nbytes >= _shm.SHM_FROM]
        try:
            written = await asyncio.gather(
                *(asyncio.to_thread(_shm.write, value.buffers[i]) for i in large)
            )
        except Exception as exc:  # /dev/shm full, say: the socket still works
            log.warning("cannot use shared memory; sending through the socket", error=repr(exc))
            written, large = [], []
        if self.get(*key) is not value:  # dropped or replaced meanwhile
            _shm.remove(path for path, _ in written)
            return
        if written:
            buffers = list(value.buffers)
            for i, (_, view) in zip(large, written, strict=True):
                buffers[i] = view  # the private copy goes once nothing else reads it
            self._runs[key[0]][key[1]] = Packed(value.data, buffers)
        self._shared[key] = [
            [i, path, view.nbytes] for i, (path, view) in zip(large, written, strict=True)
        ]

    def _unshare(self, run: str, name: str) -> None:
        shared = self._shared.pop((run, name), None)
        if shared:
            _shm.remove(entry[1] for entry in shared)

    def drop(self, run: str, names: Iterable[str]) -> None:
        held = self._runs.get(run)
        if held is None:
            return
        released = []
        for name in names:
            value = held.pop(name, None)
            if value is not None:
                self.nbytes -= value.nbytes
                self._unshare(run, name)
                released.append(value)
        value = None  # the last reference goes with the list
        if big(released):
            release(released)

    def drop_runs(self, runs: Iterable[str]) -> None:
        for run in runs:
            self.drop(run, list(self._runs.get(run, ())))
            self._runs.pop(run, None)

    def clear(self) -> None:
        self.drop_runs(list(self._runs))
        self.nbytes = 0

    @property
    def runs(self) -> set[str]:
        return set(self._runs)

    def __len__(self) -> int:
        return sum(len(h) for h in self._runs.values())


def bind_address(setting: str | None, coordinator: str) -> str | None:
    """Where a worker's data socket binds; ``None``: no data socket, all data inline.

    ``auto`` picks an ``ipc://`` path in the temp directory for a coordinator reached over
    ipc (local workers) and loopback TCP for a loopback coordinator. A worker talking to a
    coordinator on another host accepts no inbound connection unless told an address, as
    before: the data socket has no CurveZMQ, so it belongs on a trusted network only.
    """
    if setting is None or setting == "off":
        return None
    if setting != "auto":
        return setting
    if coordinator.startswith("ipc://"):
        path = os.path.join(tempfile.gettempdir(), f"odibi-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return f"ipc://{path}-data.sock"
    host = coordinator.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        return "tcp://127.0.0.1:*"
    return None


class PeerServer:
    """A worker's data socket: a ROUTER answering ``fetch`` requests from its store."""

    def __init__(
        self, ctx: zmq.asyncio.Context, store: LocalStore, address: str, *, name: str = ""
    ) -> None:
        self.store = store
        self.name = name
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # requests are small
        self.sock.bind(address)
        self.endpoint = _advertised(self.sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        self.requests = 0  # fetch requests answered
        self.sent = 0  # datasets sent

    async def serve(self) -> None:
        recv = self.sock.recv_multipart
        while True:
            frames = await recv(copy=False)
            try:
                await self._answer(frames)
            except Exception as exc:  # a broken or hostile peer must not stop the server
                log.warning("dropped bad fetch request", worker=self.name, error=repr(exc))

    async def _answer(self, frames: list[Any]) -> None:
        header, _ = wire.decode(frames[1:])
        names = header.get("names")
        if header["t"] != wire.FETCH or not isinstance(names, list) or len(names) > MAX_NAMES:
            raise wire.MalformedMessage("expected a fetch request with a list of names")
        run = str(header.get("run"))
        local = header.get("shm") is True and self.endpoint.startswith("ipc://")
        have, missing, values = [], [], []
        shm: list[list[Any]] = []  # [value index, buffer index, path, nbytes]
        names = [str(n) for n in names]
        if local:  # every value's buffers are written to shared memory at once
            found = await asyncio.gather(*(self.store.share(run, n) for n in names))
        else:
            found = [(v, []) if (v := self.store.get(run, n)) is not None else None for n in names]
        for name, item in zip(names, found, strict=True):
            if item is None:
                missing.append(name)
                continue
            value, shared = item
            shm.extend([len(values), *entry] for entry in shared)
            have.append(name)
            values.append(value)
        self.requests += 1
        self.sent += len(values)
        answer = {"t": wire.DATA, "have": have, "missing": missing}
        if shm:
            answer["shm"] = shm
        reply = wire.encode(answer, values)
        with contextlib.suppress(zmq.ZMQError):  # EHOSTUNREACH: the asker left
            await self.sock.send_multipart([frames[0], *reply], copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://") :])


def _advertised(endpoint: str) -> str:
    """A wildcard bind is no address for peers: name this host instead."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{socket.gethostbyname(socket.gethostname())}:{endpoint[len(wildcard) :]}"
    return endpoint


async def fetch(
    ctx: zmq.Context[Any],
    endpoint: str,
    run: str,
    names: list[str],
    *,
    timeout: float,
    connect_timeout: float = CONNECT_TIMEOUT,
    shm: bool = False,
) -> tuple[dict[str, Packed], list[str]]:
    """Ask the holder at ``endpoint`` for ``names`` in one request; returns what it sent
    and the names it does not hold. Buffers are the received frames' memory, or with
    ``shm`` (the holder is on this host) read-only mappings of the holder's shared memory.

    Runs on a helper thread with a plain (blocking) socket, so the event loop goes on
    meanwhile and no socket churn touches the loop's readers. Raises
    :class:`FetchError` when the holder cannot be reached within ``connect_timeout``,
    drops the connection, or sends nothing within ``timeout``.
    """
    return await asyncio.to_thread(
        fetch_blocking, ctx, endpoint, run, names, timeout, connect_timeout, shm
    )


def fetch_blocking(
    ctx: zmq.Context[Any],
    endpoint: str,
    run: str,
    names: list[str],
    timeout: float,
    connect_timeout: float = CONNECT_TIMEOUT,
    shm: bool = False,
) -> tuple[dict[str, Packed], list[str]]:
    """:func:`fetch`, blocking the calling thread."""
    sync = zmq.Context.shadow(ctx.underlying)
    sock = sync.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    monitor = sock.get_monitor_socket(_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        request = {"t": wire.FETCH, "run": run, "names": names}
        if shm:
            request["shm"] = True
        sock.send_multipart(wire.encode(request))
        frames = _await_reply(sock, monitor, timeout, connect_timeout)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    try:
        header, values = wire.decode(frames)
        have, missing = header["have"], header["missing"]
        if header["t"] != wire.DATA or len(have) != len(values):
            raise wire.MalformedMessage("the answer does not match the request")
        if header.get("shm"):
            values = _attach_shared(values, header["shm"])
        return dict(zip(map(str, have), values, strict=True)), [str(m) for m in missing]
    except Exception as exc:
        raise FetchError(f"bad answer from the holder: {exc}") from None


def _attach_shared(values: list[Packed], shm: Any) -> list[Packed]:
    """Put the holder's shared-memory buffers back in their places among the sent ones."""
    if not isinstance(shm, list):
        raise wire.MalformedMessage("shm must be a list")
    mapped: dict[int, dict[int, memoryview]] = {}
    for entry in shm:
        vi, bi, path, nbytes = entry
        if not (type(vi) is int and type(bi) is int and type(nbytes) is int) or not (
            0 <= vi < len(values) and bi >= 0 and isinstance(path, str)
        ):
            raise wire.MalformedMessage(f"bad shared-memory entry {entry!r:.200}")
        mapped.setdefault(vi, {})[bi] = _shm.attach(path, nbytes)
    out = []
    for vi, value in enumerate(values):
        extra = mapped.get(vi)
        if not extra:
            out.append(value)
            continue
        sent = iter(value.buffers)
        total = len(value.buffers) + len(extra)
        if max(extra) >= total:
            raise wire.MalformedMessage("shared-memory buffer index out of range")
        out.append(
            Packed(value.data, [extra[i] if i in extra else next(sent) for i in range(total)])
        )
    return out


def _await_reply(
    sock: zmq.Socket[Any], monitor: zmq.Socket[Any], timeout: float, connect_timeout: float
) -> list[Any]:
    """The reply's frames; a holder that never completes the handshake (dead, stopped),
    drops the connection, or stays silent past ``timeout`` raises :class:`FetchError`."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    start = time.monotonic()
    deadline, connect_by = start + timeout, start + connect_timeout
    connected = False
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise FetchError(f"the holder did not answer within {timeout:g}s")
        if not connected and now >= connect_by:
            raise FetchError(f"could not connect to the holder within {connect_timeout:g}s")
        until = deadline if connected else min(deadline, connect_by)
        ready = dict(poller.poll(max(1, int((until - now) * 1000))))
        if sock in ready:
            return sock.recv_multipart(copy=False)
        if monitor in ready:
            event = parse_monitor_message(monitor.recv_multipart())["event"]
            if event == _CONNECTED:
                connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                raise FetchError("the holder closed the connection")


async def fetch_all(
    ctx: zmq.Context[Any],
    run: str,
    refs: Iterable[Ref],
    *,
    base_timeout: float = FETCH_TIMEOUT,
) -> tuple[dict[str, Packed], dict[str, tuple[Ref, str]]]:
    """Fetch ``refs`` from their holders: one request per holder, all at once.

    Returns the values by name, and the lost ones by name with the reason.
    """
    by_endpoint: dict[str, list[Ref]] = {}
    for ref in refs:
        by_endpoint.setdefault(ref.endpoint, []).append(ref)

    async def one(endpoint: str, group: list[Ref]) -> tuple[dict[str, Packed], dict[str, Any]]:
        timeout = fetch_timeout(sum(r.nbytes for r in group), base_timeout)
        try:
            got, missing = await fetch(ctx, endpoint, run, [r.name for r in group], timeout=timeout)
        except FetchError as exc:
            return {}, {r.name: (r, str(exc)) for r in group}
        lost = {r.name: (r, "the holder no longer has it") for r in group if r.name in missing}
        return got, lost

    values: dict[str, Packed] = {}
    lost: dict[str, tuple[Ref, str]] = {}
    for got, gone in await asyncio.gather(*(one(e, g) for e, g in by_endpoint.items())):
        values.update(got)
        lost.update(gone)
    return values, lost
