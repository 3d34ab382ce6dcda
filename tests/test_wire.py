"""The wire format, and that peers survive whatever garbage reaches their sockets."""

from __future__ import annotations

import os
import random
import subprocess
import time

import cloudpickle
import msgpack
import numpy as np
import pytest
import structlog
import structlog.testing
import zmq
from conftest import PYTHON, BackgroundRun, coordinator_sockets, wait_for, wait_gone

from odibi_actor import DAGBuilder, DistributedExecutor
from odibi_actor import _wire as wire
from odibi_actor._wire import MalformedMessage, decode, encode, pack, unpack


# --- roundtrips --------------------------------------------------------------------------
def test_header_only_roundtrip():
    frames = encode({"t": wire.BYE, "returned": [[1, 2]], "done": True})
    assert len(frames) == 1
    header, values = decode(frames)
    assert header["t"] == "bye" and header["returned"] == [[1, 2]] and header["done"] is True
    assert header["v"] == wire.PROTOCOL_VERSION
    assert values == []


def test_values_roundtrip():
    originals = [1, "text", {"k": [1, 2.5, None]}, b"\x00\xff" * 100, (1, (2, 3))]
    frames = encode({"t": wire.RESULTS, "ok": []}, [pack(v) for v in originals])
    assert len(frames) == 2  # header + joined in-band pickles, no out-of-band buffers
    header, values = decode(frames)
    assert header["lens"] == [len(pack(v).data) for v in originals]
    assert [unpack(p) for p in values] == originals
    # as if it crossed a socket: plain bytes frames
    _, again = decode([bytes(f) for f in frames])
    assert [unpack(p) for p in again] == originals


def test_numpy_array_travels_out_of_band_without_a_copy():
    arr = np.arange(100_000, dtype=np.float64)
    other = np.ones((50, 40), dtype=np.int32)
    frames = encode({"t": wire.TASKS}, [pack(arr), pack("small"), pack(other)])
    header, values = decode(frames)
    assert header["nbufs"] == [1, 0, 1]
    assert len(frames) == 4
    # the buffer frames are the arrays' own memory, not copies
    assert isinstance(frames[2], memoryview)
    assert np.shares_memory(np.asarray(frames[2]), arr)
    assert np.shares_memory(np.asarray(frames[3]), other)
    assert frames[2].nbytes == arr.nbytes
    assert len(frames[1]) < 1000  # the 800 kB of data is not in the in-band pickle
    out = unpack(values[0])
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, arr)  # decoding did not copy either
    assert unpack(values[1]) == "small"
    np.testing.assert_array_equal(unpack(values[2]), other)
    # and through bytes, as after a real socket
    _, again = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(unpack(again[0]), arr)
    assert unpack(again[2]).shape == (50, 40)


def test_packed_nbytes_counts_buffers():
    arr = np.zeros(1000, dtype=np.uint8)
    p = pack(arr)
    assert p.nbytes == len(p.data) + 1000


# --- malformed input ---------------------------------------------------------------------
def _valid_frames():
    return encode({"t": wire.RESULTS, "ok": []}, [pack(b"abc"), pack(np.arange(4)), pack(7)])


def _hdr(**fields):
    return msgpack.packb(fields)


MALFORMED = {
    "empty": [],
    "garbage": [b"\xc1\xc1 this is not msgpack"],
    "empty frame": [b""],
    "trailing bytes": [_hdr(v=1, t="bye") + b"xx"],
    "not a map": [msgpack.packb([1, "bye"])],
    "no version": [_hdr(t="bye")],
    "wrong version": [_hdr(v=2, t="bye")],
    "version as string": [_hdr(v="1", t="bye")],
    "no type": [_hdr(v=1)],
    "unknown type": [_hdr(v=1, t="launch_missiles")],
    "type is a list": [_hdr(v=1, t=["bye"])],
    "type is a map": [_hdr(v=1, t={"bye": 1})],
    "too few frames": _valid_frames()[:-1],
    "too many frames": [*_valid_frames(), b"extra"],
    "truncated payload": [
        _valid_frames()[0],
        bytes(_valid_frames()[1])[:-3],
        *_valid_frames()[2:],
    ],
    "payload too long": [_valid_frames()[0], bytes(_valid_frames()[1]) + b"!", _valid_frames()[2]],
    "lens without nbufs": [_hdr(v=1, t="results", lens=[3]), b"abc"],
    "lens longer than nbufs": [_hdr(v=1, t="results", lens=[1, 2], nbufs=[0]), b"abc"],
    "lens not a list": [_hdr(v=1, t="results", lens=3, nbufs=[0]), b"abc"],
    "lens of strings": [_hdr(v=1, t="results", lens=["3"], nbufs=[0]), b"abc"],
    "nbufs of strings": [_hdr(v=1, t="results", lens=[3], nbufs=["0"]), b"abc"],
    "negative length": [_hdr(v=1, t="results", lens=[-1, 4], nbufs=[0, 0]), b"abc"],
    "negative buffer count": [_hdr(v=1, t="results", lens=[2, 1], nbufs=[-1, 1]), b"abc"],
    "frame is not bytes": [None],
}


@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_messages_raise_malformed_message(frames):
    with pytest.raises(MalformedMessage):
        decode(frames)


def test_malformed_message_is_a_value_error():
    assert issubclass(MalformedMessage, ValueError)


def test_fuzzed_frames_never_raise_anything_but_malformed_message():
    rng = random.Random(20240601)
    base = [bytes(f) for f in _valid_frames()]
    outcomes = {"ok": 0, "malformed": 0}
    for _ in range(3000):
        frames = list(base)
        i = rng.randrange(len(frames))
        blob = bytearray(frames[i])
        op = rng.randrange(3)
        if op == 0 and blob:
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif op == 1:
            del blob[rng.randrange(len(blob) + 1) :]
        else:
            blob[rng.randrange(len(blob) + 1) : 0] = rng.randbytes(rng.randrange(1, 5))
        frames[i] = bytes(blob)
        if rng.random() < 0.1:
            del frames[rng.randrange(len(frames))]
        try:
            decode(frames)
            outcomes["ok"] += 1
        except MalformedMessage:
            outcomes["malformed"] += 1
    assert outcomes["malformed"] > 500  # the fuzzing did hit the checks


# --- a real worker process against our own ROUTER socket ---------------------------------
def _recv(sock: zmq.Socket, timeout: float = 15.0) -> list[bytes]:
    """The next message that is not a heartbeat (those come whenever a side is idle)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        frames = sock.recv_multipart()
        try:
            if decode(frames[-1:])[0]["t"] == wire.HEARTBEAT:
                continue
        except MalformedMessage:
            pass
        return frames
    pytest.fail(f"no message within {timeout}s")


@pytest.mark.timeout(60)
def test_worker_drops_malformed_messages_and_keeps_serving(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/w.sock"
    router.bind(address)
    proc = subprocess.Popen(
        # --parent-pid makes it a local worker, which exits when the coordinator says bye
        [
            PYTHON,
            "-m",
            "odibi_actor.worker",
            address,
            "--name",
            "probe",
            "--log-level",
            "error",
            "--parent-pid",
            str(os.getpid()),
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        identity, *frames = _recv(router)
        hello, _ = decode(frames)
        assert hello["t"] == wire.HELLO
        assert hello["name"] == "probe" and hello["pid"] == proc.pid and hello["nthreads"] == 1

        def send(frames):
            router.send_multipart([identity, *frames])

        send([b"total garbage"])
        send([_hdr(v=99, t="tasks", run="r", tasks=[])])
        send([_hdr(v=1, t="explode")])
        send([_hdr(v=1, t=["tasks"])])
        send([_hdr(v=1, t="tasks")])  # no run, no tasks
        send([_hdr(v=1, t="tasks", run="r", tasks=[[0, 1, 1]], lens=[5], nbufs=[0])])
        send(encode({"t": wire.TASKS, "run": "r", "tasks": "nonsense"}))
        send(encode({"t": wire.HELLO, "name": "confused"}))
        time.sleep(0.2)
        assert proc.poll() is None, "the worker died on a malformed message"
        while router.poll(100):  # nothing but heartbeats may come back
            _, *answer = router.recv_multipart()
            assert decode(answer)[0]["t"] == wire.HEARTBEAT, "the worker answered garbage"

        # now a valid batch: a by-reference function, a by-value lambda with two outputs,
        # a function that cannot be imported, and a node the worker never heard of
        header = {
            "t": wire.TASKS,
            "run": "run-1",
            "fns": {
                0: ("ref", "math:hypot"),
                1: ("val", cloudpickle.dumps(lambda a: (a * 2, a * 3))),
                2: ("ref", "no_such_module_xyz:fn"),
            },
            "nodes": {
                0: ("hyp", 0, ["h"], None),
                1: ("lam", 1, ["double", "triple"], None),
                2: ("broken", 2, ["b"], None),
            },
            "tasks": [(0, 1, 2), (1, 3, 1), (2, 1, 0), (7, 1, 0)],
        }
        send(encode(header, [pack(3.0), pack(4.0), pack(10)]))
        ok: dict[int, tuple] = {}
        err: dict[int, tuple] = {}
        deadline = time.monotonic() + 15
        while len(ok) + len(err) < 4 and time.monotonic() < deadline:
            ident, *frames = _recv(router)
            assert ident == identity
            res, values = decode(frames)
            assert res["t"] == wire.RESULTS
            assert res["run"] == "run-1"
            pos = 0
            for tid, attempt, duration in res["ok"]:
                n = {0: 1, 1: 2}[tid]
                ok[tid] = (attempt, [unpack(v) for v in values[pos : pos + n]])
                assert duration >= 0
                pos += n
            assert pos == len(values)
            for tid, attempt, _duration, error, tb in res["err"]:
                err[tid] = (attempt, error, tb)
        assert ok == {0: (1, [5.0]), 1: (3, [20, 30])}
        assert set(err) == {2, 7}
        assert "no_such_module_xyz" in err[2][1]
        assert "never described" in err[7][1]

        # a later batch reuses the functions it already has
        send(
            encode({"t": wire.TASKS, "run": "run-1", "tasks": [(0, 2, 2)]}, [pack(5.0), pack(12.0)])
        )
        _, *frames = _recv(router)
        res, values = decode(frames)
        assert [tuple(x[:2]) for x in res["ok"]] == [(0, 2)]
        assert unpack(values[0]) == 13.0

        send(encode({"t": wire.BYE}))
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        router.close()
        ctx.destroy(linger=0)


# --- the coordinator's socket during a real run ------------------------------------------
def slow_inc(x):
    time.sleep(0.25)
    return x + 1


def _chain(n: int):
    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"s{i}", slow_inc, inputs=[f"x{i}"], outputs=[f"x{i + 1}"])
    return b.build()


def _connect_to_running_coordinator(ctx: zmq.Context) -> zmq.Socket:
    address = wait_for(coordinator_sockets, 20, "the coordinator socket")[0]
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


@pytest.mark.timeout(60)
def test_coordinator_drops_malformed_messages_during_a_run():
    ex = DistributedExecutor(_chain(8), workers=2)
    ctx = zmq.Context()
    bad_messages = (
        [b"garbage"],
        [b"\x00" * 64],
        [_hdr(v=7, t="hello", name="x", nthreads=1)],
        [_hdr(v=1, t="oops")],
        [_hdr(v=1, t=["hello"])],
        encode({"t": wire.RESULTS, "ok": [[0, 1, 0.1]], "err": []}, [pack(99)]),
        encode({"t": wire.BYE, "returned": [[0, 1]], "done": True}),
        encode({"t": wire.HELLO, "name": "zero", "nthreads": 0}),  # refused
        encode({"t": wire.HELLO, "nthreads": 1}),  # no name: refused
        [*encode({"t": wire.RESULTS, "ok": []}, [pack(1)]), b"extra frame"],
    )
    try:
        with structlog.testing.capture_logs() as logs:
            run = BackgroundRun(ex, {"x0": 0})
            rogue = _connect_to_running_coordinator(ctx)
            for frames in bad_messages:
                rogue.send_multipart(frames)
            run.join(60)
        assert run.error is None, repr(run.error)
        assert run.result["x8"] == 8
        # every one that does not parse was dropped; the rest came from a peer that never
        # registered, which is only told to register (reset), never acted on
        dropped = [e for e in logs if e["event"] == "dropped bad message"]
        assert len(dropped) == len(bad_messages) - 2, dropped
        answers = []
        while rogue.poll(200):
            answers.append(decode(rogue.recv_multipart())[0]["t"])
        assert answers == [wire.RESET], answers
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ok", "err"])
def test_coordinator_survives_results_for_unknown_nodes(kind):
    # A registered worker (say, another version of it) reports a node id this run does
    # not have: the message must be dropped, not take the run down.
    ex = DistributedExecutor(_chain(8), workers=2)
    run = BackgroundRun(ex, {"x0": 0})
    ctx = zmq.Context()
    try:
        rogue = _connect_to_running_coordinator(ctx)
        rogue.send_multipart(encode({"t": wire.HELLO, "name": "rogue", "nthreads": 1}))
        if kind == "ok":
            bad = encode({"t": wire.RESULTS, "ok": [[999, 1, 0.01]], "err": []}, [pack(1)])
        else:
            bad = encode({"t": wire.RESULTS, "ok": [], "err": [[999, 1, 0.01, "E: x", ""]]})
        rogue.send_multipart(bad)
        rogue.send_multipart(encode({"t": wire.BYE, "returned": [], "done": True}))
        run.join(60)
        assert run.error is None, repr(run.error)
        assert run.result["x8"] == 8
        rogue.close()
    finally:
        run.join(60)
        ctx.destroy(linger=0)
    assert wait_gone(ex.worker_pids, 5) == []
