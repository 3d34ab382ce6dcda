"""The data plane: big outputs stay on their worker, peers fetch them, placement follows them.

Real sockets and real worker processes throughout; nothing here measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from odibi_actor import DAGBuilder, DAGExecutor, DistributedExecutor, _shm
from odibi_actor import _wire as wire
from odibi_actor._dag import build_dag
from odibi_actor._dataplane import (
    FetchError,
    LocalStore,
    PeerServer,
    Ref,
    _attach_shared,
    bind_address,
    fetch,
)
from odibi_actor._holdings import Holdings
from odibi_actor._messages import DataLost
from odibi_actor._state import RunState, State
from odibi_actor._wire import pack, unpack

pytestmark = pytest.mark.timeout(90)

MB = 1 << 20


# --- steps (module level: workers import them) ---------------------------------------------
def big(seed: int, mb: int = 4) -> tuple[Any, int, int]:
    """A kept array, plus its address and this worker's pid (both small, inline)."""
    arr = np.full(mb * MB // 8, float(seed))
    return arr, arr.ctypes.data, os.getpid()


def big_slow(seed: int) -> tuple[Any, int, int]:
    time.sleep(0.3)  # long enough that both workers get producers
    return big(seed)


def where(arr: Any, addr: int, pid: int) -> dict[str, Any]:
    """What a consumer sees of an input: the same memory? read-only? which process? a
    mapping of a shared-memory file?"""
    return {
        "same_memory": arr.ctypes.data == addr,
        "writeable": bool(arr.flags.writeable),
        "same_pid": os.getpid() == pid,
        "first": float(arr[0]),
        "mapped": _memory_of(arr),
    }


def _memory_of(arr: Any) -> str:
    """What owns an array's memory, at the bottom of its ``base`` chain."""
    base = arr
    while getattr(base, "base", None) is not None and not isinstance(base, memoryview):
        base = base.base
    return type(getattr(base, "obj", base)).__name__


def add(a: Any, b: Any) -> float:
    return float((a + b).sum())


def gate(seconds: float) -> int:
    time.sleep(seconds)
    return 1


def logged_big(path: str, seed: int) -> Any:
    """A kept output that leaves a line per run in ``path``: pid of the worker."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return np.full(2 * MB // 8, float(seed))


def total(arr: Any, _gate: int) -> float:
    return float(arr.sum())


# --- the fetch protocol, over real sockets in this process ---------------------------------
def _ipc(tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path}/{name}.sock"


async def test_fetch_gets_several_datasets_in_one_request_without_copying(tmp_path):
    ctx = zmq.asyncio.Context()
    store = LocalStore()
    arrays = {f"a{i}": np.arange(MB // 8, dtype=np.float64) + i for i in range(3)}
    for name, arr in arrays.items():
        store.put("run1", name, pack(arr))
    server = PeerServer(ctx, store, _ipc(tmp_path, "holder"))
    serving = asyncio.create_task(server.serve())
    try:
        got, missing = await fetch(
            ctx, server.endpoint, "run1", ["a0", "a1", "a2", "nope"], timeout=30
        )
        assert missing == ["nope"]
        assert server.requests == 1 and server.sent == 3  # one request, one answer
        for name, arr in arrays.items():
            (buf,) = got[name].buffers
            assert isinstance(buf.obj, zmq.Frame)  # the received frame's memory, no copy
            value = unpack(got[name])
            assert np.shares_memory(value, np.frombuffer(buf, dtype=np.float64))
            assert np.array_equal(value, arr)
    finally:
        serving.cancel()
        server.close()
        ctx.destroy(linger=0)
    assert not os.path.exists(server.endpoint[len("ipc://") :])  # the socket file is gone


async def test_fetch_from_a_holder_that_is_gone_fails_quickly(tmp_path):
    ctx = zmq.asyncio.Context()
    try:
        with pytest.raises(FetchError, match="could not connect"):
            await fetch(ctx, _ipc(tmp_path, "nobody"), "r", ["x"], timeout=30, connect_timeout=0.5)
    finally:
        ctx.destroy(linger=0)


async def test_fetch_from_a_holder_that_never_answers_times_out(tmp_path):
    ctx = zmq.asyncio.Context()
    mute = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    mute.bind(_ipc(tmp_path, "mute"))
    try:
        with pytest.raises(FetchError, match=r"did not answer within 0\.5s"):
            await fetch(ctx, _ipc(tmp_path, "mute"), "r", ["x"], timeout=0.5)
    finally:
        mute.close(linger=0)
        ctx.destroy(linger=0)


async def test_peer_server_survives_garbage(tmp_path):
    ctx = zmq.asyncio.Context()
    store = LocalStore()
    store.put("r", "x", pack(b"hello" * 1000))
    server = PeerServer(ctx, store, _ipc(tmp_path, "holder"))
    serving = asyncio.create_task(server.serve())
    rogue = ctx.socket(zmq.DEALER)
    rogue.connect(server.endpoint)
    try:
        await rogue.send_multipart([b"\xc1 not msgpack"])
        await rogue.send_multipart([b"x", b"y", b"z"])
        got, missing = await fetch(ctx, server.endpoint, "r", ["x"], timeout=30)
        assert unpack(got["x"]) == b"hello" * 1000 and not missing
    finally:
        rogue.close(linger=0)
        serving.cancel()
        server.close()
        ctx.destroy(linger=0)


def test_where_a_worker_listens_for_peers():
    assert bind_address("auto", "ipc:///tmp/odibi-1-x.sock").startswith("ipc://")
    assert bind_address("auto", "tcp://127.0.0.1:5555") == "tcp://127.0.0.1:*"
    assert bind_address("auto", "tcp://localhost:5555") == "tcp://127.0.0.1:*"
    assert bind_address("auto", "tcp://10.0.0.5:5555") is None  # no open port unless told
    assert bind_address("tcp://10.0.0.7:*", "tcp://10.0.0.5:5555") == "tcp://10.0.0.7:*"
    assert bind_address("off", "ipc:///tmp/x.sock") is None


async def test_fetch_over_loopback_tcp():
    ctx = zmq.asyncio.Context()
    store = LocalStore()
    store.put("r", "big", pack(np.ones(MB // 8)))
    server = PeerServer(ctx, store, bind_address("auto", "tcp://127.0.0.1:5555") or "")
    serving = asyncio.create_task(server.serve())
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:")  # the port it got, to advertise
        got, _ = await fetch(ctx, server.endpoint, "r", ["big"], timeout=30)
        assert unpack(got["big"]).sum() == MB // 8
    finally:
        serving.cancel()
        server.close()
        ctx.destroy(linger=0)


def test_store_counts_and_drops():
    store = LocalStore()
    store.put("a", "x", pack(bytes(100)))
    store.put("a", "y", pack(bytes(200)))
    store.put("b", "x", pack(bytes(300)))
    assert len(store) == 3 and store.nbytes > 600
    store.drop("a", ["x", "missing"])
    assert store.get("a", "x") is None and store.get("a", "y") is not None
    store.drop_runs(["a"])
    assert store.runs == {"b"}
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


# --- real workers ----------------------------------------------------------------------------
def run_spread(
    dag: Any, data: dict[str, Any], outputs: list[str], producers: list[str], tries: int = 5
) -> tuple[DistributedExecutor, dict[str, Any]]:
    """Run until the producers did not all land on one worker: the first worker to
    register may take every task before the second one is up, which tests nothing."""
    for _ in range(tries):
        ex = DistributedExecutor(dag, workers=2)
        out = ex.run(data, outputs=outputs)
        if len({ex.metrics.nodes[p].worker for p in producers}) > 1:
            return ex, out
    pytest.fail(f"the producers ran on one worker in {tries} runs")


def _pairs(n: int) -> dict[str, Any]:
    b = DAGBuilder()
    for i in range(n):
        outs = [f"arr{i}", f"addr{i}", f"pid{i}"]
        b.add_node(f"make{i}", big_slow, inputs=[f"seed{i}"], outputs=outs)
        b.add_node(f"look{i}", where, inputs=[f"arr{i}", f"addr{i}", f"pid{i}"], outputs=[f"w{i}"])
    return b.build()


def test_a_consumer_runs_where_its_input_is_and_reads_it_in_place():
    n = 4
    seeds = {f"seed{i}": i for i in range(n)}
    wanted = [f"w{i}" for i in range(n)]
    ex, out = run_spread(_pairs(n), seeds, wanted, [f"make{i}" for i in range(n)])
    assert sorted(out) == [f"w{i}" for i in range(n)]
    for i in range(n):
        w = out[f"w{i}"]
        assert ex.metrics.nodes[f"look{i}"].worker == ex.metrics.nodes[f"make{i}"].worker
        assert w["same_pid"] and w["same_memory"], w  # passed by reference: no copy at all
        assert not w["writeable"]  # shared: read-only
        assert w["first"] == float(i)
    assert ex.metrics.kept_outputs == n and ex.metrics.kept_bytes >= n * 4 * MB


def where_all(*triples: Any) -> list[dict[str, Any]]:
    arrays = triples[::3]
    seen = [where(*triples[i : i + 3]) for i in range(0, len(triples), 3)]
    return [*seen, {"total": float(sum(a.sum() for a in arrays))}]


def big_slower(seed: int) -> tuple[Any, int, int]:
    time.sleep(1.0)  # the first worker to register takes two; the other one the third
    return big(seed)


def test_inputs_held_by_another_worker_are_fetched_from_it():
    b = DAGBuilder()
    names = ["x", "y", "z"]
    for i, n in enumerate(names):
        b.add_node(f"make_{n}", big_slower, inputs=[f"s{i}"], outputs=[n, f"{n}a", f"{n}p"])
    ins = [f"{n}{k}" for n in names for k in ("", "a", "p")]
    b.add_node("all", where_all, inputs=ins, outputs=["seen"])
    seeds = {f"s{i}": i + 1 for i in range(3)}
    ex, out = run_spread(b.build(), seeds, ["seen"], [f"make_{n}" for n in names])
    *seen, t = out["seen"]
    assert t["total"] == 6.0 * (4 * MB // 8)
    assert [w["first"] for w in seen] == [1.0, 2.0, 3.0]
    m = ex.metrics.nodes
    here = [w for n, w in zip(names, seen, strict=True) if m[f"make_{n}"].worker == m["all"].worker]
    away = [w for n, w in zip(names, seen, strict=True) if m[f"make_{n}"].worker != m["all"].worker]
    assert len(here) == 2 and len(away) == 1  # placed where most of its input bytes were
    assert all(w["same_pid"] and w["same_memory"] for w in here)
    assert all(not w["same_pid"] and not w["same_memory"] for w in away)
    # from a worker on this host: a mapping of the holder's shared memory, not socket bytes
    assert [w["mapped"] for w in away] == ["mmap"]
    assert not any(w["writeable"] for w in seen)  # kept inputs are read-only
    assert _our_shm_files(ex.worker_pids) == [], "the holders' shared memory outlived the run"


def _our_shm_files(pids: list[int]) -> list[str]:
    return [f for f in os.listdir(_shm.directory()) if any(f"odibi-{p}-" in f for p in pids)]


async def test_a_peer_on_this_host_maps_big_buffers_from_shared_memory(tmp_path):
    ctx = zmq.asyncio.Context()
    store = LocalStore()
    big_arr, small = np.arange(2 * MB // 8, dtype=np.float64), np.arange(10.0)
    store.put("run1", "big", pack(big_arr))
    store.put("run1", "small", pack(small))
    server = PeerServer(ctx, store, _ipc(tmp_path, "holder"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(2):  # the second fetch reuses what the first wrote
            got, _ = await fetch(
                ctx, server.endpoint, "run1", ["big", "small"], timeout=30, shm=True
            )
            (buf,) = got["big"].buffers
            assert isinstance(buf.obj, mmap.mmap) and buf.readonly
            assert np.array_equal(unpack(got["big"]), big_arr)
            assert np.array_equal(unpack(got["small"]), small)  # small: over the socket
        files = _our_shm_files([os.getpid()])
        assert len(files) == 1, files  # written once
        # the holder reads the shared copy itself now; dropping the dataset removes the file
        assert isinstance(store.get("run1", "big").buffers[0].obj, mmap.mmap)
        store.drop_runs(["run1"])
        assert _our_shm_files([os.getpid()]) == []
        # the mapping a reader holds stays valid after the file is gone
        assert np.array_equal(unpack(got["big"]), big_arr)
    finally:
        serving.cancel()
        server.close()
        ctx.destroy(linger=0)


async def test_asks_for_one_value_at_once_share_one_write(monkeypatch):
    writes = []
    write = _shm.write
    monkeypatch.setattr(_shm, "write", lambda buf: writes.append(buf.nbytes) or write(buf))
    store = LocalStore()
    arrays = {f"a{i}": np.full(2 * MB // 8, float(i)) for i in range(3)}
    for name, arr in arrays.items():
        store.put("run1", name, pack(arr))
    try:
        # one request asks for several values, another for one of them meanwhile
        found = await asyncio.gather(
            *(store.share("run1", n) for n in [*arrays, "a0", "a0"]), store.share("run1", "gone")
        )
        *answers, missing = found
        assert missing is None
        paths = [shared[0][1] for _, shared in answers]
        assert paths[3] == paths[4] == paths[0]  # the same file,
        assert len(writes) == len(arrays)  # written once
        assert sorted(_our_shm_files([os.getpid()])) == sorted({os.path.basename(p) for p in paths})
        for name, (_, shared) in zip(arrays, answers, strict=False):
            view = _shm.attach(shared[0][1], shared[0][2])
            assert np.array_equal(np.frombuffer(view, dtype=np.float64), arrays[name])
    finally:
        store.clear()
    assert _our_shm_files([os.getpid()]) == []


async def test_a_value_dropped_while_it_is_written_leaves_no_file():
    store = LocalStore()
    store.put("run1", "big", pack(np.ones(4 * MB // 8)))
    sharing = asyncio.ensure_future(store.share("run1", "big"))
    await asyncio.sleep(0)  # the write has begun on a thread
    store.drop("run1", ["big"])
    assert await sharing is None
    assert _our_shm_files([os.getpid()]) == []


class _Input:
    """Something a step reads, whose lifetime a test can watch."""


@pytest.mark.parametrize("packed", [False, True], ids=["object", "big packed value"])
def test_an_idle_runner_holds_no_inputs_of_its_last_task(packed):
    """A warm worker between runs must not keep its last task's (big) inputs alive, nor
    free them only when the next task arrives (big ones go on a thread of their own)."""
    import threading
    import weakref

    from odibi_actor._runner import Task, TaskRunner

    done = threading.Event()
    runner = TaskRunner(1, done.set)
    try:
        value = np.ones(32 * MB // 8) if packed else _Input()
        gone = weakref.ref(value)
        arg = pack(value) if packed else value
        runner.submit([Task(1, 1, "read", lambda x: 1, [arg], ("out",), packed=packed)])
        del value, arg
        assert done.wait(10)
        (outcome,) = runner.take_outcomes()
        assert outcome.ok
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone() is None
    finally:
        runner.close()


def test_shared_memory_paths_from_a_peer_are_checked():
    with pytest.raises(ValueError, match="not a shared-memory file of ours"):
        _shm.attach("/etc/passwd", 10)
    fake = os.path.join(_shm.directory(), "odibi-1-" + "0" * 32 + ".shm.x")
    with pytest.raises(ValueError, match="not a shared-memory file of ours"):
        _shm.attach(fake, 10)
    with pytest.raises(wire.MalformedMessage):
        _attach_shared([pack(1)], [[5, 0, "x", 1]])


def test_shared_memory_of_a_killed_worker_is_swept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = os.path.join(_shm.directory(), f"odibi-{dead.pid}-{'a' * 32}.shm")
    Path(path).write_bytes(b"x")
    mine, _ = _shm.write(memoryview(b"y" * 10))
    try:
        assert _shm.sweep_stale() >= 1
        assert not os.path.exists(path) and os.path.exists(mine)  # a live writer's stays
    finally:
        _shm.remove([path, mine])


def test_default_run_still_returns_every_dataset_with_its_bytes():
    ex = DistributedExecutor(_pairs(2), workers=2)
    out = ex.run({"seed0": 5, "seed1": 6})
    assert set(out) == {f"{k}{i}" for k in ("arr", "addr", "pid", "w") for i in range(2)}
    assert isinstance(out["arr0"], np.ndarray) and out["arr0"][0] == 5.0
    assert out["arr1"].nbytes == 4 * MB


def test_keep_from_none_sends_everything_through_the_coordinator():
    ex = DistributedExecutor(_pairs(1), workers=1, keep_from=None)
    out = ex.run({"seed0": 3}, outputs=["w0"])
    assert out["w0"]["first"] == 3.0 and not out["w0"]["same_memory"]
    assert ex.metrics.kept_outputs == 0


def test_a_checkpointed_run_keeps_nothing_on_workers(tmp_path):
    ex = DistributedExecutor(_pairs(1), workers=1, checkpoint=f"file://{tmp_path}/ck")
    out = ex.run({"seed0": 3}, outputs=["w0"])
    assert out["w0"]["first"] == 3.0
    assert ex.metrics.kept_outputs == 0  # the recorder needs every output's bytes


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_outputs_names_what_comes_back(backend):
    ex = DAGExecutor(_pairs(1), backend=backend, workers=1)
    assert set(ex.run({"seed0": 1}, outputs=["pid0", "w0"])) == {"pid0", "w0"}
    with pytest.raises(ValueError, match=r"\['nope'\] are not produced"):
        ex.run({"seed0": 1}, outputs=["w0", "nope"])
    with pytest.raises(TypeError, match="not the string"):
        ex.run({"seed0": 1}, outputs="w0")


def _signal_the_holder(
    tmp_path: Path, seed: int, sig: int
) -> tuple[DistributedExecutor, Path, list[int]]:
    """``make`` keeps ``arr`` on its worker; once it is done, ``sig`` goes to that worker
    while a gate (``secs`` in the run's data) holds the consumer back. Returns the executor
    (not run yet), the log of ``make``'s runs (one pid a line) and the pids signalled."""
    log = tmp_path / "made"
    b = DAGBuilder()
    b.add_node("make", lambda: logged_big(str(log), seed), outputs=["arr"])
    b.add_node("gate", gate, inputs=["secs"], outputs=["g"])
    b.add_node("total", total, inputs=["arr", "g"], outputs=["t"])
    signalled: list[int] = []

    def progress(p: Any) -> None:
        if not signalled and ex.metrics.nodes["make"].status == "done":
            pid = int(log.read_text().split()[0])
            os.kill(pid, sig)
            signalled.append(pid)

    ex = DistributedExecutor(b.build(), workers=2, progress=progress)
    return ex, log, signalled


def test_a_dead_holder_takes_its_data_and_the_producer_runs_again(tmp_path, caplog):
    """The holder of ``arr`` is killed after reporting it, before the consumer can run
    (a slow gate holds it back): the producer runs again and the run completes."""
    ex, log, killed = _signal_the_holder(tmp_path, 7, signal.SIGKILL)
    out = ex.run({"secs": 2.0}, outputs=["t"])
    assert out["t"] == 7.0 * (2 * MB // 8)
    runs = log.read_text().split()
    assert len(runs) == 2 and runs[0] == str(killed[0]) and runs[1] != runs[0]
    assert ex.metrics.nodes["make"].attempts == 2


def test_a_holder_that_stops_answering_does_not_hang_its_consumer(tmp_path):
    """SIGSTOP the holder: the consumer's fetch cannot complete (or the worker is evicted
    first); either way the producer runs again elsewhere and the run completes."""
    ex, log, stopped = _signal_the_holder(tmp_path, 3, signal.SIGSTOP)
    try:
        out = ex.run({"secs": 0.5}, outputs=["t"])
    finally:
        for pid in stopped:  # the pool SIGKILLs evicted workers; be sure either way
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert out["t"] == 3.0 * (2 * MB // 8)
    assert len(log.read_text().split()) == 2


# --- sans-I/O: what the scheduler does when data is lost or no longer needed ----------------
def _chain() -> Any:
    b = DAGBuilder()
    b.add_node("a", gate, outputs=["A"])
    b.add_node("b", gate, inputs=["A"], outputs=["B"])
    b.add_node("c", gate, inputs=["B"], outputs=["C"])
    b.add_node("d", gate, inputs=["A"], outputs=["D"])
    return b.build()


class Sim:
    """Drives a RunState and Holdings as the scheduler does: take what is ready, finish
    the named node, store its outputs, free what its completion let go."""

    def __init__(self, requested: set[str] | None = None) -> None:
        self.nodes = build_dag(_chain().values())
        self.state = RunState(self.nodes)
        self.data: dict[str, Any] = {}
        req = None if requested is None else frozenset(requested)
        self.h = Holdings(self.nodes, self.data, self.state, req)
        self.attempts: dict[str, int] = {}

    def finish(self, name: str, owner: bytes | None = b"w1") -> list[str]:
        """``owner`` None: the outputs are small and came to the coordinator inline."""
        self.attempts.update(self.state.take(100))
        assert self.state.complete(name, self.attempts.pop(name)) is not None
        for out in self.nodes[name].outputs:
            self.data[out] = _ref(out, owner) if owner is not None else b"small"
        return [r.name for r in self.h.done(self.nodes[name])]


def _ref(name: str, owner: bytes = b"w1") -> Ref:
    return Ref(name, owner, f"ipc:///tmp/{owner.decode()}", 10 * MB, owner.decode())


def test_reopen_makes_done_nodes_run_again_and_dependents_wait():
    sim = Sim()
    state = sim.state
    sim.finish("a")
    sim.finish("b")  # d is running now
    assert state.status("c").state is State.READY
    # the worker holding A and B is gone: b must run again, and a before it
    gone = sim.h.lost(DataLost(owner=b"w1"))
    assert sorted(gone) == ["A", "B"] and not sim.data
    assert sorted(state.reopen(sim.h.to_rerun(gone))) == ["a", "b"]
    assert state.status("a").state is State.READY
    assert state.status("b").state is State.WAITING
    assert state.status("c").state is State.WAITING  # its stale ready entry is skipped
    assert state.status("d").state is State.RUNNING  # it will fail to fetch A and say so
    assert [n for n, _ in state.take(10)] == ["a"]
    assert state.done == 0 and not state.finished


def test_a_lost_output_that_was_asked_for_is_made_again_with_its_freed_inputs():
    sim = Sim(requested={"C", "D"})
    for name in ("a", "b", "d"):
        sim.finish(name)
    sim.finish("c", owner=b"w2")
    assert sim.state.finished
    gone = sim.h.lost(DataLost(owner=b"w1"))
    assert gone == ["D"]  # A and B were freed once b, c and d were done
    assert sorted(sim.h.to_rerun(gone)) == ["a", "d"]  # d needs A again


def test_small_outputs_are_never_freed_so_a_loss_reruns_no_more_than_it_must():
    sim = Sim(requested={"C", "D"})
    sim.finish("a", owner=None)  # A: small, inline
    for name in ("b", "d"):
        sim.finish(name)
    sim.finish("c", owner=b"w2")
    assert sim.data["A"] == b"small"  # every consumer is done, yet it stays
    gone = sim.h.lost(DataLost(owner=b"w1"))
    assert gone == ["D"]
    assert sim.h.to_rerun(gone) == ["d"]  # not a, whose output is still here


def test_losing_a_worker_whose_data_was_freed_costs_nothing():
    sim = Sim(requested={"C"})
    sim.finish("a")
    sim.finish("b")
    sim.finish("c", owner=b"w2")
    sim.finish("d")
    assert sim.h.lost(DataLost(owner=b"w1")) == []  # A, B, D were freed when done with
    assert sim.state.finished and set(sim.data) == {"C"}


def test_freed_once_every_consumer_is_done_and_never_what_was_asked_for():
    sim = Sim(requested={"B", "C"})
    assert sim.finish("a") == []
    assert sim.finish("b") == []  # A still has d to serve; B was asked for
    assert sim.finish("d") == ["A", "D"]  # D: no consumer, not asked for
    assert sim.finish("c") == []
    assert set(sim.data) == {"B", "C"}


def test_without_requested_outputs_nothing_is_freed():
    sim = Sim()
    for name in ("a", "b", "d", "c"):
        assert sim.finish(name) == []
    assert set(sim.data) == {"A", "B", "C", "D"}


def test_a_failed_fetch_reopens_the_producer_and_requeues_the_consumer_as_waiting():
    sim = Sim()
    state = sim.state
    sim.finish("a")
    sim.attempts.update(state.take(10))  # b and d running, fetching A
    gone = sim.h.lost(DataLost(endpoint="ipc:///tmp/w1", names=["A"]))
    assert gone == ["A"] and state.reopen(sim.h.to_rerun(gone)) == ["a"]
    assert state.lose("b", sim.attempts["b"], "could not fetch A", allowed=3) is True
    assert state.status("b").state is State.WAITING and state.status("b").lost == 1
    assert [n for n, _ in state.take(10)] == ["a"]


def big_logged(path: str, seed: int) -> Any:
    """A kept output, after a second; leaves ``seed pid`` in ``path`` per run."""
    time.sleep(1.0)
    with open(path, "a") as f:
        f.write(f"{seed} {os.getpid()}\n")
    return np.full(4 * MB // 8, float(seed))


def sum_all(*arrays: Any) -> float:
    return float(sum(a.sum() for a in arrays))


def test_a_fetch_from_a_holder_that_does_not_answer_fails_and_the_producer_runs_again(
    tmp_path,
):
    """Three producers on two workers; the consumer goes where two of the arrays are and
    fetches the third from a holder that was just stopped: its fetch fails, the consumer
    attempt counts as lost, the third producer runs again, and the run completes."""
    for _ in range(5):
        log = tmp_path / f"made-{_}"
        b = DAGBuilder()
        for i in range(3):
            b.add_node(f"make{i}", functools.partial(big_logged, str(log), i), outputs=[f"a{i}"])
        b.add_node("all", sum_all, inputs=["a0", "a1", "a2"], outputs=["total"])
        stopped: list[int] = []

        def progress(p: Any, log: Path = log, stopped: list[int] = stopped) -> None:
            if stopped or p.done < 3:
                return
            pids = [line.split()[1] for line in log.read_text().splitlines()]
            alone = [pid for pid in set(pids) if pids.count(pid) == 1]
            if len(alone) == 1:  # the holder of one array, not where the consumer goes
                stopped.append(int(alone[0]))
                os.kill(stopped[0], signal.SIGSTOP)

        ex = DistributedExecutor(b.build(), workers=2, progress=progress)
        try:
            out = ex.run({}, outputs=["total"])
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert out == {"total": 3.0 * (4 * MB // 8)}
        if stopped:
            break
    else:
        pytest.fail("the producers ran on one worker in 5 runs")
    assert ex.metrics.nodes["all"].attempts == 2  # the first could not get its input
    runs = [line.split() for line in log.read_text().splitlines()]
    again = [seed for seed, pid in runs if int(pid) == stopped[0]]
    assert len(again) == 1 and [s for s, _ in runs].count(again[0]) == 2


def first(i: int) -> int:
    return i


def mix(a: int, b: int) -> int:
    return (a * 31 + b) % 1_000_003


def _layered(layers: int, width: int) -> Any:
    b = DAGBuilder()
    for i in range(width):
        b.add_node(f"n0_{i}", functools.partial(first, i), outputs=[f"d0_{i}"])
    for layer in range(1, layers):
        for i in range(width):
            a, c = f"d{layer - 1}_{i}", f"d{layer - 1}_{(i + 1) % width}"
            b.add_node(f"n{layer}_{i}", mix, inputs=[a, c], outputs=[f"d{layer}_{i}"])
    return b.build()


@pytest.mark.parametrize("asked", ["all", "last layer"])
def test_every_output_kept_on_workers_gives_the_same_results(asked):
    """keep_from=0 keeps even tiny outputs: every input is a reference, fetched or local,
    and (asking for the last layer) every other dataset is freed along the way."""
    layers, width = 5, 20
    dag = _layered(layers, width)
    want = None if asked == "all" else [f"d{layers - 1}_{i}" for i in range(width)]
    expected = DAGExecutor(dag, backend="threads").run(outputs=want)
    ex = DistributedExecutor(dag, workers=3, keep_from=0)
    assert ex.run(outputs=want) == expected
    assert ex.metrics.kept_outputs == layers * width


def mix_slowly(a: int, b: int) -> int:
    time.sleep(0.01)
    return mix(a, b)


def test_killing_a_worker_mid_run_loses_its_data_and_the_results_are_still_right():
    """Every output kept (keep_from=0) on three workers; one is killed a third of the way:
    whatever it held is made again, recursively where its inputs are gone too."""
    layers, width = 6, 12
    b = DAGBuilder()
    for i in range(width):
        b.add_node(f"n0_{i}", functools.partial(first, i), outputs=[f"d0_{i}"])
    for layer in range(1, layers):
        for i in range(width):
            a, c = f"d{layer - 1}_{i}", f"d{layer - 1}_{(i + 1) % width}"
            b.add_node(f"n{layer}_{i}", mix_slowly, inputs=[a, c], outputs=[f"d{layer}_{i}"])
    dag = b.build()
    want = [f"d{layers - 1}_{i}" for i in range(width)]
    expected = DAGExecutor(dag, backend="threads").run(outputs=want)
    killed: list[int] = []

    def progress(p: Any) -> None:
        if not killed and p.done >= p.total // 3:
            killed.append(ex.worker_pids[0])
            os.kill(killed[0], signal.SIGKILL)

    ex = DistributedExecutor(dag, workers=3, keep_from=0, progress=progress)
    assert ex.run(outputs=want) == expected
    assert killed
    assert sum(m.attempts for m in ex.metrics.nodes.values()) > len(dag)  # some ran again


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep_from", [MB, None])
def test_allowed_failures_zero_still_returns_kept_outputs(keep_from):
    """The outputs are fetched once even when no remake is allowed."""
    b = DAGBuilder()
    b.add_node("big", big, inputs=["seed"], outputs=["B", "addr", "pid"])
    ex = DistributedExecutor(b.build(), workers=1, allowed_failures=0, keep_from=keep_from)
    out = ex.run({"seed": 3}, outputs=["B"])
    assert out["B"].nbytes == 4 * MB and float(out["B"][0]) == 3.0


def test_allowed_failures_must_not_be_negative():
    with pytest.raises(ValueError, match="allowed_failures"):
        DistributedExecutor({}, allowed_failures=-1)
