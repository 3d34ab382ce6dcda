"""Cluster mode end to end: a real odibi-coordinator with real odibi-worker processes.

Most tests share one coordinator with two single-thread workers, ``alpha`` and ``beta``;
tests that stop, restart or starve a coordinator get their own. Step functions live at
module level, so workers import them by reference (this file is on their PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from clusterkit import Cluster, free_port, run_module

from odibi_actor import DAGBuilder, DistributedExecutor, NodeFailedError, OdibiError
from odibi_actor.client import Client, CoordinatorError, RunFailed

WORKERS = ("alpha", "beta")
TERMINAL = ("done", "failed", "cancelled")


# --- step functions (imported by reference on the workers) --------------------------------
def square(n: int) -> int:
    return n * n


def split(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return arr[arr % 2 == 0], arr[arr % 2 == 1]


def total(sq: int, evens: np.ndarray, odds: np.ndarray) -> int:
    return int(sq + evens.sum() + odds.sum())


def label(t: int, tag: str) -> str:
    return f"{tag}:{t}"


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def nap_inc(prev: int, seconds: float) -> int:
    time.sleep(seconds)
    return prev + 1


def explode(x: int) -> int:
    raise ValueError(f"boom-{x}: the input was rejected")


def never(x: int) -> int:  # pragma: no cover - must never run
    return x


# --- DAGs ---------------------------------------------------------------------------------
def diamond() -> DAGBuilder:
    b = DAGBuilder()
    b.add_node("square", square, inputs=["n"], outputs=["sq"])
    b.add_node("split", split, inputs=["arr"], outputs=["evens", "odds"])
    b.add_node("total", total, inputs=["sq", "evens", "odds"], outputs=["total"])
    b.add_node("label", label, inputs=["total", "tag"], outputs=["label"])
    return b


def diamond_data(n: int = 10, tag: str = "t") -> dict[str, Any]:
    return {"n": n, "arr": np.arange(n), "tag": tag}


def diamond_expected(n: int = 10, tag: str = "t") -> dict[str, Any]:
    arr = np.arange(n)
    t = n * n + int(arr.sum())
    return {
        "sq": n * n,
        "evens": arr[arr % 2 == 0],
        "odds": arr[arr % 2 == 1],
        "total": t,
        "label": f"{tag}:{t}",
    }


def check_diamond(out: dict[str, Any], n: int = 10, tag: str = "t") -> None:
    exp = diamond_expected(n, tag)
    assert set(out) == set(exp), f"outputs {sorted(out)} (initial data must not come back)"
    for key in ("sq", "total", "label"):
        assert out[key] == exp[key], key
    for key in ("evens", "odds"):
        np.testing.assert_array_equal(out[key], exp[key])


def naps(count: int, prefix: str = "nap") -> DAGBuilder:
    """``count`` independent nodes, each sleeping ``delay`` seconds."""
    b = DAGBuilder()
    for i in range(count):
        b.add_node(f"{prefix}{i}", nap, inputs=["delay"], outputs=[f"{prefix}_out{i}"])
    return b


def chain(length: int) -> DAGBuilder:
    """c0 -> c1 -> ... -> c{length}; every link sleeps ``delay`` and adds one."""
    b = DAGBuilder()
    for i in range(1, length + 1):
        b.add_node(f"link{i}", nap_inc, inputs=[f"c{i - 1}", "delay"], outputs=[f"c{i}"])
    return b


# --- helpers ------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def new_cluster(tmp_path: Any, *coordinator_args: str) -> Cluster:
    c = Cluster(free_port(), coordinator_args=coordinator_args)
    c.log_dir = str(tmp_path)
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator, two single-thread workers, shared by the tests that only submit."""
    c = new_cluster(tmp_path_factory.mktemp("shared-cluster"), "--heartbeat-timeout", "2")
    try:
        c.start_coordinator()
        for name in WORKERS:
            c.start_worker(name, "--nthreads", "1")
        c.wait_for_workers(len(WORKERS))
        yield c
    finally:
        c.close()


@pytest.fixture
def alive(cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, checked to be up before and after a test."""
    assert cluster.coordinator is not None and cluster.coordinator.poll() is None, (
        cluster.log_tail()
    )
    yield cluster
    assert cluster.coordinator.poll() is None, "coordinator died:\n" + cluster.log_tail()


# --- submit, result, status, events -------------------------------------------------------
@pytest.mark.timeout(30)
def test_submit_result_returns_every_output(alive: Cluster) -> None:
    with alive.client() as c:
        handle = c.submit(diamond(), diamond_data())
        out = handle.result(timeout=15)
    check_diamond(out)
    assert handle.metrics is not None
    assert handle.metrics.node_count == 4
    for name in ("square", "split", "total", "label"):
        m = handle.metrics.nodes[name]
        assert m.status == "done" and m.attempts == 1, m
        assert m.worker in WORKERS, m


@pytest.mark.timeout(30)
def test_status_fields(alive: Cluster) -> None:
    before = time.time()
    with alive.client() as c:
        handle = c.submit(diamond(), diamond_data())
        running = handle.status()
        handle.result(timeout=15)
        st = handle.status()
    for s in (running, st):
        for key in ("run", "state", "total", "done", "running", "failed", "ready", "submitted"):
            assert key in s, (key, s)
        assert s["run"] == handle.run_id
        assert s["total"] == 4
    assert running["state"] in ("running", "done"), running
    assert st["state"] == "done"
    assert (st["done"], st["running"], st["failed"]) == (4, 0, 0), st
    assert before - 1 <= st["submitted"] <= st["finished"] <= time.time() + 1, st
    assert "error" not in st


@pytest.mark.timeout(30)
def test_events_yield_step_complete_for_every_node(alive: Cluster) -> None:
    with alive.client() as c:
        handle = c.submit(diamond(), diamond_data())
        events = list(handle.events(poll=0.05))  # ends by itself once the run is over
    completed = [e["node"] for e in events if e["event"] == "step_complete"]
    started = [e["node"] for e in events if e["event"] == "step_start"]
    assert sorted(completed) == ["label", "split", "square", "total"], events
    assert sorted(started) == sorted(completed), events
    for e in events:
        assert isinstance(e["time"], float)
    # a node's completion comes after its start, and after its dependencies completed
    order = [(e["event"], e["node"]) for e in events]
    assert order.index(("step_complete", "total")) < order.index(("step_start", "label"))
    assert order.index(("step_complete", "square")) < order.index(("step_start", "total"))


@pytest.mark.timeout(30)
async def test_handle_is_awaitable(alive: Cluster) -> None:
    with alive.client() as c:
        handle = c.submit(chain(2), {"c0": 40, "delay": 0.15})
        ticks = 0

        async def ticker() -> None:  # the event loop keeps running while we wait
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        try:
            out = await handle
        finally:
            tick_task.cancel()
    assert out == {"c1": 41, "c2": 42}
    assert handle.metrics is not None and handle.metrics.node_count == 2
    assert ticks >= 3, "await handle blocked the event loop"


@pytest.mark.timeout(30)
def test_workers_and_runs_report_cluster_state(alive: Cluster) -> None:
    with alive.client() as c:
        handle = c.submit(diamond(), diamond_data())
        handle.result(timeout=15)
        workers = c.workers()
        runs = c.runs()
    by_name = {w["name"]: w for w in workers}
    assert set(by_name) == set(WORKERS), workers
    for name, w in by_name.items():
        assert w["slots"] == 1, w
        assert w["host"] == socket.gethostname(), w
        assert w["pid"] == alive.workers[name].pid, w
        assert 0 <= w["busy"] <= w["slots"], w
        assert 0 <= w["last_heartbeat"] < 3.0, w  # heartbeats flow while idle
    mine = [r for r in runs if r["run"] == handle.run_id]
    assert len(mine) == 1, runs
    assert mine[0]["state"] == "done" and mine[0]["done"] == mine[0]["total"] == 4, mine


# --- a run belongs to the coordinator, not to a connection --------------------------------
@pytest.mark.timeout(30)
def test_run_survives_its_client_and_attach_returns_outputs(alive: Cluster) -> None:
    c1 = alive.client()
    handle = c1.submit(chain(5), {"c0": 100, "delay": 0.25})
    run_id = handle.run_id
    c1.close()  # the client goes away right after submitting
    with alive.client() as c2:
        st = c2.attach(run_id).status()
        assert st["state"] in ("waiting", "running"), st  # not finished at disconnect
        assert st["done"] < 5, st
        again = c2.attach(run_id)
        assert again.run_id == run_id and again.total == 5
        out = again.result(timeout=20)
    assert out == {"c1": 101, "c2": 102, "c3": 103, "c4": 104, "c5": 105}


@pytest.mark.timeout(30)
def test_attach_unknown_run_is_an_error(alive: Cluster) -> None:
    with alive.client() as c, pytest.raises(CoordinatorError, match="no-such-run"):
        c.attach("no-such-run")


# --- fairness -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_small_run_is_not_starved_by_a_big_one(alive: Cluster) -> None:
    with alive.client() as c, alive.client() as c2:
        big = c.submit(naps(60, "big"), {"delay": 0.2})  # ~6 s on 2 single-thread workers
        try:
            wait_until(lambda: big.status()["done"] >= 2, 10, "the big run to get going")
            t0 = time.monotonic()
            small = c2.submit(naps(3, "small"), {"delay": 0.05})
            out = small.result(timeout=10)
            took = time.monotonic() - t0
            big_st = big.status()
            assert sorted(out) == ["small_out0", "small_out1", "small_out2"]
            assert big_st["state"] == "running" and big_st["done"] < big_st["total"], (
                f"the small run finished only when the big one was done ({big_st});"
                f" small took {took:.2f}s"
            )
            assert took < 3.0, f"small run took {took:.2f}s while big was at {big_st}"
        finally:
            big.cancel()


# --- no workers ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_waits_for_workers_then_completes(tmp_path: Any) -> None:
    cl = new_cluster(tmp_path, "--heartbeat-timeout", "2")
    try:
        cl.start_coordinator()
        with cl.client() as c:
            wait_until(lambda: _answers(c), 15, "the coordinator to answer")
            assert c.workers() == []
            handle = c.submit(diamond(), diamond_data(5, "late"))
            st = handle.status()
            assert st["state"] == "waiting", st
            assert [r["state"] for r in c.runs() if r["run"] == handle.run_id] == ["waiting"]
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                handle.result(timeout=1)
            assert time.monotonic() - t0 < 5
            assert handle.status()["state"] == "waiting"  # still there, still waiting
            # the executor's client-side timeout, too
            ex = DistributedExecutor(diamond(), address=cl.client_address, timeout=1)
            with pytest.raises(TimeoutError):
                ex.run(diamond_data())

            cl.start_worker("latecomer", "--nthreads", "3")
            out = handle.result(timeout=20)
            check_diamond(out, 5, "late")
            (w,) = c.workers()
            assert w["name"] == "latecomer" and w["slots"] == 3, w
    finally:
        cl.close()


def _answers(c: Client) -> bool:
    try:
        c.workers()
    except CoordinatorError:
        return False
    return True


# --- cancel -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_cancel_ends_a_long_run(alive: Cluster) -> None:
    with alive.client() as c:
        handle = c.submit(chain(20), {"c0": 0, "delay": 0.3})  # ~6 s if left alone
        wait_until(lambda: handle.status()["running"] >= 1, 10, "the first link to run")
        handle.cancel()
        st = wait_until(
            lambda: (s := handle.status())["state"] in TERMINAL and s, 10, "the run to end"
        )
        assert st["state"] == "cancelled", st
        assert st["done"] < st["total"], st
        with pytest.raises(OdibiError, match="cancel"):
            handle.result(timeout=10)
        events = list(handle.events(poll=0.05))  # terminates on a cancelled run too
        assert all(e["node"] != "link20" for e in events)
        handle.cancel()  # cancelling an ended run is harmless
        assert handle.status()["state"] == "cancelled"
        # the workers are free again
        out = c.submit(diamond(), diamond_data()).result(timeout=15)
    check_diamond(out)


# --- failures -----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_node_failure_carries_remote_traceback(alive: Cluster) -> None:
    b = DAGBuilder()
    b.add_node("fine", square, inputs=["n"], outputs=["sq"])
    b.add_node("bad", explode, inputs=["sq"], outputs=["never_in"], retries=1, retry_delay=0.01)
    b.add_node("after", never, inputs=["never_in"], outputs=["never_out"])
    with alive.client() as c:
        handle = c.submit(b, {"n": 3})
        with pytest.raises(NodeFailedError) as info:
            handle.result(timeout=15)
        st = handle.status()
    err = info.value
    assert err.node == "bad"
    assert err.attempts == 2
    assert "ValueError" in err.error and "boom-9" in err.error, err.error
    assert "Traceback (most recent call last)" in err.traceback, err.traceback
    assert "explode" in err.traceback and "boom-9" in err.traceback, err.traceback
    assert "test_cluster.py" in err.traceback, err.traceback
    assert err.worker in WORKERS
    assert "Remote traceback" in str(err)
    assert st["state"] == "failed" and "bad" in st.get("error", ""), st
    assert handle.metrics is not None
    assert handle.metrics.nodes["fine"].status == "done"
    assert handle.metrics.nodes["bad"].status == "failed"
    assert handle.metrics.nodes["after"].status == "pending"


# --- several clients ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_two_clients_in_two_threads(alive: Cluster) -> None:
    barrier = threading.Barrier(2)
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        try:
            with alive.client() as c:
                barrier.wait(10)
                handles = [
                    c.submit(diamond(), diamond_data(10 + i + k, f"c{i}k{k}")) for k in (0, 1)
                ]
                results[i] = [(h.run_id, h.result(timeout=20)) for h in handles]
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    ids = set()
    for i in (0, 1):
        got = results.get(i)
        assert isinstance(got, list), f"client {i}: {got!r}\n{alive.log_tail('coordinator')}"
        for k, (run_id, out) in enumerate(got):
            check_diamond(out, 10 + i + k, f"c{i}k{k}")
            ids.add(run_id)
    assert len(ids) == 4


@pytest.mark.timeout(30)
async def test_one_clients_handles_awaited_together(alive: Cluster) -> None:
    """Awaiting a long run must not hold back a short run's result on the same client."""
    with alive.client() as c, alive.client() as other:
        big = c.submit(chain(8), {"c0": 0, "delay": 0.4})  # ~3.2 s
        small = c.submit(diamond(), diamond_data(4, "small"))
        big_wait = asyncio.ensure_future(big)
        try:
            await asyncio.sleep(0.3)  # big's result() is now waiting on the coordinator
            t0 = time.monotonic()
            out = await small
            took = time.monotonic() - t0
            big_state = other.attach(big.run_id).status()["state"]
            check_diamond(out, 4, "small")
            assert took < 1.5, (
                f"the small run's result took {took:.2f}s (big run: {big_state}): result()"
                " of one handle blocks every other request of the same Client"
            )
        finally:
            other.attach(big.run_id).cancel()
            with contextlib.suppress(Exception):
                await big_wait


# --- DistributedExecutor and the CLI ------------------------------------------------------
@pytest.mark.timeout(30)
def test_distributed_executor_on_an_existing_coordinator(alive: Cluster) -> None:
    seen: list[Any] = []
    ex = DistributedExecutor(diamond(), address=alive.client_address, progress=seen.append)
    out = ex.run(diamond_data(6, "ex"))
    check_diamond(out, 6, "ex")
    m = ex.metrics
    assert m.node_count == 4
    assert m.backend == "cluster"
    assert m.execution_time > 0
    assert m.workers == len(WORKERS)
    assert set(m.nodes) == {"square", "split", "total", "label"}
    for nm in m.nodes.values():
        assert nm.status == "done" and nm.attempts == 1 and nm.worker in WORKERS, nm
    assert m.get_summary()["nodes_done"] == 4
    assert ex.worker_pids == []  # nothing was spawned locally
    assert seen and seen[-1].done == seen[-1].total == 4
    with alive.client() as c:
        assert ex.run_id in {r["run"] for r in c.runs()}


@pytest.mark.timeout(30)
def test_distributed_executor_failure_raises_node_failed(alive: Cluster) -> None:
    b = DAGBuilder()
    b.add_node("bad", explode, inputs=["n"], outputs=["x"])
    ex = DistributedExecutor(b, address=alive.client_address)
    with pytest.raises(NodeFailedError, match="boom-5") as info:
        ex.run({"n": 5})
    assert "explode" in info.value.traceback
    assert ex.metrics.nodes["bad"].status == "failed"


@pytest.mark.timeout(30)
def test_distributed_executor_remote_run_tells_observers_it_ended(
    alive: Cluster, events: Any
) -> None:
    """An ``events`` observer sees pipeline_start and then pipeline_complete (or _error)."""
    ex = DistributedExecutor(diamond(), events=events, address=alive.client_address)
    check_diamond(ex.run(diamond_data()))
    names = events.names()
    assert names[0] == "pipeline_start", names
    assert "pipeline_complete" in names, f"a remote run never reports its end: {names}"

    b = DAGBuilder()
    b.add_node("bad", explode, inputs=["n"], outputs=["x"])
    events.events.clear()
    with pytest.raises(NodeFailedError):
        DistributedExecutor(b, events=events, address=alive.client_address).run({"n": 1})
    assert "pipeline_error" in events.names(), events.names()


PIPELINE = textwrap.dedent(
    """
    import os

    from odibi_actor import DAGBuilder


    def double(x):
        return x * 2


    def write(out_dir, y):
        path = os.path.join(out_dir, "y.txt")
        with open(path, "w") as f:
            f.write(f"{y} from pid {os.getpid()}")
        return path


    def dag():
        b = DAGBuilder()
        b.add_node("double", double, inputs=["x"], outputs=["y"])
        b.add_node("write", write, inputs=["out_dir", "y"], outputs=["path"])
        return b


    def initial_data():
        return {"x": 21}
    """
)


@pytest.mark.timeout(60)
def test_cli_run_and_status_with_address(alive: Cluster, tmp_path: Any) -> None:
    target = tmp_path / "tiny_pipeline.py"
    target.write_text(PIPELINE)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with alive.client() as c:
        before = {r["run"] for r in c.runs()}
    wide = {"COLUMNS": "200"}
    run = run_module(
        "odibi_actor.cli",
        "run",
        str(target),
        "--address",
        alive.client_address,
        "--no-progress",
        "--out",
        str(out_dir),
        env=wide,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "done" in run.stdout, run.stdout
    assert "double" in run.stdout and "write" in run.stdout, run.stdout
    assert any(w in run.stdout for w in WORKERS), run.stdout  # the summary's worker column
    text = (out_dir / "y.txt").read_text()
    assert text.startswith("42 from pid "), text
    pid = int(text.rsplit(" ", 1)[1])
    assert pid in {p.pid for p in alive.workers.values()}, "the step ran outside the cluster"

    with alive.client() as c:
        new = [r for r in c.runs() if r["run"] not in before]
    assert len(new) == 1, new
    run_id = new[0]["run"]

    status = run_module("odibi_actor.cli", "status", "--address", alive.client_address, env=wide)
    assert status.returncode == 0, status.stderr
    for name in WORKERS:
        assert name in status.stdout, status.stdout
    assert run_id in status.stdout, status.stdout
    assert "2/2" in status.stdout, status.stdout
    for column in ("host", "slots", "busy", "last heartbeat", "progress"):
        assert column in status.stdout, status.stdout

    js = run_module(
        "odibi_actor.cli", "status", "--address", alive.client_address, "--json", env=wide
    )
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert {w["name"] for w in doc["workers"]} == set(WORKERS)
    assert {r["run"]: r["state"] for r in doc["runs"]}[run_id] == "done"


# --- worker liveness ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_frozen_worker_is_evicted_and_its_tasks_run_elsewhere(tmp_path: Any) -> None:
    cl = new_cluster(tmp_path, "--heartbeat-timeout", "2")
    try:
        cl.start_coordinator()
        doomed = cl.start_worker("doomed")
        cl.start_worker("survivor")
        cl.wait_for_workers(2)
        with cl.client() as c:
            handle = c.submit(naps(6, "job"), {"delay": 0.4})
            wait_until(
                lambda: any(w["name"] == "doomed" and w["busy"] for w in c.workers()),
                10,
                "the doomed worker to be busy",
            )
            os.killpg(doomed.pid, signal.SIGSTOP)  # alive but silent: only heartbeats tell
            t0 = time.monotonic()
            names = wait_until(
                lambda: (n := [w["name"] for w in c.workers()]) == ["survivor"] and n,
                10,
                "the frozen worker to be evicted",
            )
            assert names == ["survivor"]
            assert time.monotonic() - t0 < 5, "eviction took longer than --heartbeat-timeout"
            out = handle.result(timeout=30)
        assert sorted(out) == [f"job_out{i}" for i in range(6)], cl.log_tail()
        assert handle.metrics is not None
        workers = {m.worker for m in handle.metrics.nodes.values()}
        assert "survivor" in workers, handle.metrics
        assert "evicting" in cl.log_text("coordinator"), cl.log_tail("coordinator")
    finally:
        cl.close()


# --- coordinator shutdown -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sigterm_lets_running_work_finish_refuses_new_runs_and_exits_0(tmp_path: Any) -> None:
    cl = new_cluster(tmp_path, "--heartbeat-timeout", "2", "--grace", "20")
    try:
        coord = cl.start_coordinator()
        cl.start_worker("solo", "--nthreads", "2")
        cl.wait_for_workers(1)
        box: dict[str, Any] = {}
        with cl.client() as c:
            handle = c.submit(naps(4, "slow"), {"delay": 1.0})  # two rounds of 1 s

            def fetch() -> None:
                with cl.client() as rc:
                    try:
                        box["out"] = rc.attach(handle.run_id).result(timeout=30)
                    except BaseException as exc:
                        box["error"] = exc
                box["at"] = time.monotonic()

            fetcher = threading.Thread(target=fetch)
            fetcher.start()
            wait_until(lambda: handle.status()["running"] >= 1, 10, "tasks to be running")
            os.killpg(coord.pid, signal.SIGTERM)
            time.sleep(0.5)
            assert coord.poll() is None, "exited before its run finished:\n" + cl.log_tail()
            with pytest.raises(CoordinatorError, match="shutting down"):
                c.submit(diamond(), diamond_data())
            fetcher.join(30)
        assert "out" in box, f"{box!r}\n{cl.log_tail()}"
        assert sorted(box["out"]) == [f"slow_out{i}" for i in range(4)]
        assert all(v == 1.0 for v in box["out"].values())
        code = coord.wait(20)
        exited = time.monotonic()
        assert code == 0, cl.log_tail("coordinator")
        assert exited >= box["at"] - 0.5
    finally:
        cl.close()


@pytest.mark.timeout(60)
def test_sigterm_grace_period_bounds_the_wait(tmp_path: Any) -> None:
    cl = new_cluster(tmp_path, "--heartbeat-timeout", "2", "--grace", "1")
    try:
        coord = cl.start_coordinator()
        cl.start_worker("solo")
        cl.wait_for_workers(1)
        with cl.client() as c:
            handle = c.submit(naps(1, "forever"), {"delay": 60.0})
            wait_until(lambda: handle.status()["running"] >= 1, 10, "the task to run")
        t0 = time.monotonic()
        os.killpg(coord.pid, signal.SIGTERM)
        code = coord.wait(15)
        took = time.monotonic() - t0
        assert code == 0, cl.log_tail("coordinator")
        assert took < 8, f"took {took:.1f}s with --grace 1"
    finally:
        cl.close()


@pytest.mark.timeout(40)
def test_result_on_a_run_the_coordinator_forgot_raises_promptly(tmp_path: Any) -> None:
    """After a coordinator restart the run is gone: result() must say so, not spin."""
    cl = new_cluster(tmp_path, "--heartbeat-timeout", "2")
    try:
        cl.start_coordinator()
        with cl.client(timeout=2) as c:
            wait_until(lambda: _answers(c), 15, "the coordinator to answer")
            handle = c.submit(diamond(), diamond_data())  # no workers: it waits
            cl.kill_coordinator()
            cl.start_coordinator()
            wait_until(lambda: _answers(c), 15, "the new coordinator to answer")
            t0 = time.monotonic()
            with pytest.raises((CoordinatorError, RunFailed)) as info:
                handle.result(timeout=5)
            took = time.monotonic() - t0
        assert handle.run_id in str(info.value)
        assert took < 3, (
            f"result() kept re-asking for {took:.1f}s about a run the coordinator says it"
            " does not know (with timeout=None it never returns)"
        )
    finally:
        cl.close()
