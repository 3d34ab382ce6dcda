"""The wire format between coordinator and workers.

Frame 0 is a msgpack header carrying the protocol version and message type. Data travels
as pickle protocol 5: the in-band pickles of a message are joined into frame 1 (their
lengths are in the header) and out-of-band buffers follow as frames of their own, so
numpy and pandas buffers cross the socket without another copy.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# worker <-> coordinator message types
HELLO = "hello"  # worker: I am here, with this many threads
WELCOME = "welcome"  # coordinator: registered; these runs are alive; heartbeat interval
TASKS = "tasks"  # coordinator: a batch of one run's tasks, plus functions not sent before
STARTED = "started"  # worker: these timed tasks began (for the coordinator's deadline)
RESULTS = "results"  # worker: a batch of one run's outcomes
CANCEL = "cancel"  # coordinator: drop queued work of these runs
HEARTBEAT = "hb"  # either way, only when nothing else was sent lately
RESET = "reset"  # coordinator: I do not know you (evicted, or I restarted): register again
BYE = "bye"  # worker: leaving, handing back unstarted tasks; coordinator: going away
DROP = "drop"  # coordinator: forget these kept datasets of a run

# peer <-> worker data socket (see _dataplane.py)
FETCH = "fetch"  # a worker or the coordinator: send me these kept datasets of a run
DATA = "data"  # holder: the datasets it has, and the names it does not have

# client <-> coordinator: every request carries "req", echoed by its answer
SUBMIT = "submit"  # nodes, function specs and initial data -> run id
STATUS = "status"  # one run's progress
RESULT = "result"  # long-poll a run's outcome and outputs
EVENTS = "events"  # a run's node events since a cursor
CANCEL_RUN = "cancel_run"
WORKERS = "workers"
RUNS = "runs"
OK = "ok"
ERROR = "error"

KNOWN_TYPES = frozenset(
    {HELLO, WELCOME, TASKS, STARTED, RESULTS, CANCEL, HEARTBEAT, RESET, BYE, DROP, FETCH, DATA}
    | {SUBMIT, STATUS, RESULT, EVENTS, CANCEL_RUN, WORKERS, RUNS, OK, ERROR}
)


class MalformedMessage(ValueError):
    """A frame sequence that is not a valid message; logged and dropped, never fatal."""


@dataclass(slots=True)
class Packed:
    """One pickled value: in-band bytes plus its out-of-band buffers."""

    data: memoryview | bytes
    buffers: list[memoryview]

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.nbytes for b in self.buffers)


def pack(value: Any) -> Packed:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return Packed(data, [b.raw() for b in buffers])


def unpack(p: Packed) -> Any:
    return pickle.loads(p.data, buffers=p.buffers)


def encode(header: dict[str, Any], values: Sequence[Packed] = ()) -> list[Any]:
    """Frames for ``header`` plus ``values``; the header gains the layout it needs."""
    header["v"] = PROTOCOL_VERSION
    if not values:
        return [msgpack.packb(header)]
    header["lens"] = [len(p.data) for p in values]
    header["nbufs"] = [len(p.buffers) for p in values]
    frames: list[Any] = [msgpack.packb(header), b"".join([p.data for p in values])]
    for p in values:
        frames.extend(p.buffers)
    return frames


def decode(frames: Sequence[Any]) -> tuple[dict[str, Any], list[Packed]]:
    """Parse frames (bytes or zmq.Frame); raise :class:`MalformedMessage` on anything off."""
    if not frames:
        raise MalformedMessage("empty message")
    try:
        header = msgpack.unpackb(_view(frames[0]), strict_map_key=False)
    except Exception as exc:
        raise MalformedMessage(f"undecodable header: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a map")
    if header.get("v") != PROTOCOL_VERSION:
        raise MalformedMessage(f"unsupported protocol version {header.get('v')!r}")
    kind = header.get("t")
    if not isinstance(kind, str) or kind not in KNOWN_TYPES:
        raise MalformedMessage(f"unknown message type {kind!r}")
    lens, nbufs = header.get("lens", []), header.get("nbufs", [])
    if not lens:
        if len(frames) != 1:
            raise MalformedMessage("frames without a payload layout in the header")
        return header, []
    if not (_counts(lens) and _counts(nbufs)):
        raise MalformedMessage("payload layout must be lists of non-negative integers")
    try:
        if len(lens) != len(nbufs) or len(frames) != 2 + sum(nbufs):
            raise MalformedMessage("frame count does not match the header")
        blob = _view(frames[1])
        if sum(lens) != len(blob):
            raise MalformedMessage("payload length does not match the header")
        values, pos, nxt = [], 0, 2
        for n, nb in zip(lens, nbufs, strict=True):
            bufs = [_view(f) for f in frames[nxt : nxt + nb]]
            values.append(Packed(blob[pos : pos + n], bufs))
            pos += n
            nxt += nb
    except MalformedMessage:
        raise
    except Exception as exc:
        raise MalformedMessage(f"bad payload layout: {exc!r}") from None
    return header, values


def _counts(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)
