"""DistributedExecutor end to end: real odibi-worker processes over ZeroMQ, no mocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog.testing
from conftest import PYTHON, RecordingEvents, RecordingTracker, bump, count, wait_gone

from odibi_actor import (
    DAGBuilder,
    DAGExecutor,
    DistributedExecutor,
    NodeFailedError,
    OdibiError,
)
from odibi_actor._functions import describe
from odibi_actor.metrics import MetricsManager

WORKER_ID = re.compile(r"local-\d+")


# --- step functions (module level: workers import them by reference) --------------------
def double(x):
    return 2 * x


def add(a, b):
    return a + b


def pair(x):
    return x, x * 10


def bounds(x):
    return {"hi": x + 1, "lo": x - 1}


def make_array(n):
    return np.arange(n, dtype=np.float64)


def scale(arr):
    assert isinstance(arr, np.ndarray)
    return arr * 2.0


def array_stats(arr):
    return {"sum": float(arr.sum()), "len": int(arr.shape[0]), "dtype": str(arr.dtype)}


def napping(x):
    time.sleep(0.3)
    return x


def whoami():
    return os.getpid()


def total(*values):
    return sum(values)


# --- one run of a DAG that exercises most features, shared by several tests -------------
N_ARRAY = 100_000


def kitchen_sink_nodes():
    offset = 100

    def add_offset(x):  # a closure: travels by value
        return x + offset

    b = DAGBuilder()
    b.add_node("src", lambda seed: seed + 1, inputs=["seed"], outputs=["a"])  # a lambda
    b.add_node("left", double, inputs=["a"], outputs=["b"])
    b.add_node("right", add_offset, inputs=["a"], outputs=["c"])
    b.add_node("join", add, inputs=["b", "c"], outputs=["d"])
    b.add_node("tup", pair, inputs=["d"], outputs=["t1", "t2"])
    b.add_node("dct", bounds, inputs=["d"], outputs=["lo", "hi"])
    b.add_node("arr", make_array, inputs=["n"], outputs=["arr"])
    b.add_node("arr2", scale, inputs=["arr"], outputs=["arr2"])
    b.add_node("stats", array_stats, inputs=["arr2"], outputs=["stats"])
    b.add_node("nap", napping, inputs=["d"], outputs=["napped"])
    return b.build()


KITCHEN_INPUT = {"seed": 4, "n": N_ARRAY}
KITCHEN_EXPECTED = {
    "a": 5,
    "b": 10,
    "c": 105,
    "d": 115,
    "t1": 115,
    "t2": 1150,
    "lo": 114,
    "hi": 116,
    "napped": 115,
    "stats": {"sum": float(N_ARRAY * (N_ARRAY - 1)), "len": N_ARRAY, "dtype": "float64"},
}


def check_kitchen_output(out):
    assert set(out) == {*KITCHEN_EXPECTED, "arr", "arr2"}
    for key, value in KITCHEN_EXPECTED.items():
        assert out[key] == value, key
    np.testing.assert_array_equal(out["arr"], np.arange(N_ARRAY, dtype=np.float64))
    np.testing.assert_array_equal(out["arr2"], np.arange(N_ARRAY, dtype=np.float64) * 2)


@pytest.fixture(scope="module")
def kitchen():
    nodes = kitchen_sink_nodes()
    events, tracker = RecordingEvents(), RecordingTracker()
    ex = DistributedExecutor(nodes, workers=2, events=events, tracker=tracker)
    t0 = time.perf_counter()
    out = ex.run(KITCHEN_INPUT)
    return {
        "nodes": nodes,
        "ex": ex,
        "out": out,
        "events": events,
        "tracker": tracker,
        "wall": time.perf_counter() - t0,
    }


def test_diamond_and_everything_else_give_the_right_results(kitchen):
    check_kitchen_output(kitchen["out"])
    assert kitchen["ex"].backend == "processes"


def test_lambda_and_closure_travel_by_value(kitchen):
    nodes = kitchen["nodes"]
    assert describe(nodes["src"].fn)[0] == "val"
    assert describe(nodes["right"].fn)[0] == "val"
    assert describe(nodes["left"].fn) == ("ref", f"{__name__}:double")
    assert kitchen["out"]["a"] == 5 and kitchen["out"]["c"] == 105
    for name in ("src", "right"):
        assert WORKER_ID.fullmatch(kitchen["ex"].metrics.nodes[name].worker)


def test_multi_output_by_tuple_and_by_dict(kitchen):
    out = kitchen["out"]
    assert (out["t1"], out["t2"]) == (115, 1150)
    assert (out["lo"], out["hi"]) == (114, 116)


def test_numpy_arrays_flow_between_nodes(kitchen):
    out = kitchen["out"]
    assert isinstance(out["arr2"], np.ndarray) and out["arr2"].dtype == np.float64
    assert out["arr2"].shape == (N_ARRAY,)
    assert out["stats"]["sum"] == float(N_ARRAY * (N_ARRAY - 1))


def test_metrics(kitchen):
    ex, nodes = kitchen["ex"], kitchen["nodes"]
    m = ex.metrics
    assert 0 < m.execution_time <= kitchen["wall"]
    assert m.node_count == len(nodes) == 10
    assert m.backend == "processes" and m.workers == 2
    assert set(m.nodes) == set(nodes)
    for name, nm in m.nodes.items():
        assert nm.status == "done", name
        assert nm.attempts == 1, name
        assert nm.duration >= 0, name
        assert WORKER_ID.fullmatch(nm.worker or ""), (name, nm.worker)
    assert 0.3 <= m.nodes["nap"].duration < 5  # the step's own time, measured in the worker
    summary = m.get_summary()
    assert summary["nodes_done"] == 10 and summary["nodes_failed"] == 0
    assert summary["retries"] == 0
    assert m.to_dict()["nodes"]["nap"]["status"] == "done"
    # what a coordinator sends a client, through msgpack as on the wire
    back = MetricsManager.from_wire(msgpack.unpackb(msgpack.packb(m.to_wire())))
    assert back.to_dict() == m.to_dict()
    assert MetricsManager.from_wire(m.to_dict()).to_dict() == m.to_dict()


def test_events_and_tracker_are_called(kitchen):
    events, tracker, nodes = kitchen["events"], kitchen["tracker"], kitchen["nodes"]
    names = events.names()
    assert names[0] == "pipeline_start" and names[-1] == "pipeline_complete"
    assert events.of("pipeline_start")[0]["nodes"] == 10
    assert events.of("pipeline_complete")[0]["duration"] > 0
    started = [f["step"].name for f in events.of("step_start")]
    completed = [f["step"].name for f in events.of("step_complete")]
    assert sorted(started) == sorted(nodes) and sorted(completed) == sorted(nodes)
    assert all(f["attempt"] == 1 for f in events.of("step_start"))
    assert all(f["status"] == "success" and f["error"] is None for f in events.of("step_complete"))
    assert "step_error" not in names and "pipeline_error" not in names
    # every step starts before it completes, and after what it depends on completed
    pos_start = {f["step"].name: i for i, (n, f) in enumerate(events.events) if n == "step_start"}
    pos_end = {f["step"].name: i for i, (n, f) in enumerate(events.events) if n == "step_complete"}
    for name, node in nodes.items():
        assert pos_start[name] < pos_end[name]
        for dep in node.dependencies:
            assert pos_end[dep] < pos_start[name], (dep, name)
    assert sorted(tracker.started) == sorted((n, node.level) for n, node in nodes.items())
    assert sorted(tracker.ended) == sorted((n, "success", None) for n in nodes)


def test_threads_and_processes_backends_agree(kitchen):
    threads = DAGExecutor(kitchen_sink_nodes(), backend="threads", workers=2)
    assert threads.backend == "threads"
    out = threads.run(KITCHEN_INPUT)
    check_kitchen_output(out)
    assert set(out) == set(kitchen["out"])
    for key in out:
        np.testing.assert_equal(out[key], kitchen["out"][key])
    assert threads.metrics.nodes["nap"].worker == "local"


# --- shapes of DAGs ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_fan_out_of_fifty():
    b = DAGBuilder()
    b.add_node("root", double, inputs=["x"], outputs=["r"])
    for i in range(50):
        b.add_node(f"leaf{i}", add, inputs=["r", f"k{i}"], outputs=[f"y{i}"])
    b.add_node("gather", total, inputs=[f"y{i}" for i in range(50)], outputs=["sum"])
    ex = DistributedExecutor(b.build(), workers=2)
    out = ex.run({"x": 3, **{f"k{i}": i for i in range(50)}})
    assert out["r"] == 6
    assert [out[f"y{i}"] for i in range(50)] == [6 + i for i in range(50)]
    assert out["sum"] == 50 * 6 + sum(range(50))
    assert all(m.status == "done" for m in ex.metrics.nodes.values())


def timed_nap(x):
    start = time.time()
    time.sleep(1.0)
    return (start, time.time(), os.getpid())


def warm_up():
    time.sleep(1.0)  # time for both workers to have registered
    return 0


@pytest.mark.timeout(60)
def test_independent_slow_nodes_run_in_parallel_on_two_workers():
    b = DAGBuilder()
    b.add_node("warm", warm_up, outputs=["w"])
    b.add_node("p", timed_nap, inputs=["w"], outputs=["p_span"])
    b.add_node("q", timed_nap, inputs=["w"], outputs=["q_span"])
    ex = DistributedExecutor(b.build(), workers=2)
    out = ex.run()
    (p0, p1, p_pid), (q0, q1, q_pid) = out["p_span"], out["q_span"]
    workers = {n: m.worker for n, m in ex.metrics.nodes.items()}
    # two idle one-thread workers and two ready one-second steps: they must overlap
    assert max(p0, q0) < min(p1, q1), (
        f"p and q ran one after the other on {workers} (pids {p_pid}, {q_pid})"
    )


# --- retries and failures ----------------------------------------------------------------
def fails_twice(counter):
    n = bump(counter)
    if n <= 2:
        raise RuntimeError(f"transient failure number {n}")
    return f"ok on attempt {n}"


@pytest.mark.timeout(60)
def test_retries_until_success(tmp_path):
    counter = tmp_path / "attempts"
    tracker = RecordingTracker()
    b = DAGBuilder()
    b.add_node("flaky", fails_twice, inputs=["counter"], outputs=["v"], retries=2, retry_delay=0.01)
    b.add_node("after", str.upper, inputs=["v"], outputs=["w"])
    ex = DistributedExecutor(b.build(), workers=2, tracker=tracker)
    out = ex.run({"counter": str(counter)})
    assert out == {"v": "ok on attempt 3", "w": "OK ON ATTEMPT 3"}
    assert count(counter) == 3
    assert ex.metrics.nodes["flaky"].attempts == 3
    assert ex.metrics.nodes["flaky"].status == "done"
    assert ex.metrics.get_summary()["retries"] == 2
    flaky_ends = [(status, err) for name, status, err in tracker.ended if name == "flaky"]
    assert [s for s, _ in flaky_ends] == ["retry", "retry", "success"]
    assert "transient failure number 1" in flaky_ends[0][1]


def always_fails(x):
    raise ValueError(f"cannot handle {x!r}")


@pytest.mark.timeout(60)
def test_a_node_that_always_fails(tmp_path):
    events = RecordingEvents()
    b = DAGBuilder()
    b.add_node("doomed", always_fails, inputs=["x"], outputs=["y"], retries=1, retry_delay=0.01)
    b.add_node("downstream", double, inputs=["y"], outputs=["z"])
    ex = DistributedExecutor(b.build(), workers=2, events=events)
    with pytest.raises(NodeFailedError) as info:
        ex.run({"x": 42})
    err = info.value
    msg = str(err)
    assert err.node == "doomed" and err.attempts == 2
    assert "node 'doomed' failed after 2 attempts" in msg
    assert "ValueError: cannot handle 42" in msg
    assert "Remote traceback" in msg
    assert "always_fails" in msg and "raise ValueError" in msg
    assert "always_fails" in err.traceback
    assert WORKER_ID.fullmatch(err.worker or "")
    assert ex.metrics.nodes["doomed"].status == "failed"
    assert ex.metrics.nodes["doomed"].attempts == 2
    assert ex.metrics.nodes["downstream"].status == "pending"
    assert "pipeline_error" in events.names() and "pipeline_complete" not in events.names()
    assert [f["status"] for f in events.of("step_error")] == ["retry", "failed"]
    assert not [f for f in events.of("step_start") if f["step"].name == "downstream"]


def slow_sibling(started, done):
    Path(started).write_text("started")
    time.sleep(1.0)
    Path(done).write_text("done")
    return "sibling result"


def fail_while_sibling_runs(started, done):
    deadline = time.time() + 10
    while not os.path.exists(started) and time.time() < deadline:
        time.sleep(0.01)
    state = "running" if os.path.exists(started) and not os.path.exists(done) else "not running"
    raise RuntimeError(f"failing while the sibling is {state}")


def after_sibling(value, marker):
    Path(marker).write_text("should never run")
    return value


@pytest.mark.timeout(60)
def test_a_running_branch_finishes_after_another_fails(tmp_path):
    started, done, marker = (str(tmp_path / n) for n in ("started", "done", "after"))
    b = DAGBuilder()
    b.add_node("sibling", slow_sibling, inputs=["started", "done"], outputs=["s"])
    b.add_node("failing", fail_while_sibling_runs, inputs=["started", "done"], outputs=["f"])
    b.add_node("after", after_sibling, inputs=["s", "marker"], outputs=["a"])
    # two threads per worker: the two roots run at once wherever they are placed
    ex = DistributedExecutor(b.build(), workers=2, nthreads=2)
    with pytest.raises(NodeFailedError, match="failing while the sibling is running") as info:
        ex.run({"started": started, "done": done, "marker": marker})
    assert info.value.node == "failing"
    assert Path(done).read_text() == "done"  # the sibling was allowed to finish
    assert ex.metrics.nodes["sibling"].status == "done"
    assert not Path(marker).exists()  # but nothing new was started after the failure
    assert ex.metrics.nodes["after"].status == "pending"


def sleeps_long():
    time.sleep(30)
    return "too late"


@pytest.mark.timeout(60)
def test_per_node_timeout_fails_the_run_quickly():
    b = DAGBuilder()
    b.add_node("sleepy", sleeps_long, outputs=["z"], timeout=0.5)
    ex = DistributedExecutor(b.build(), workers=2)
    t0 = time.monotonic()
    with pytest.raises(NodeFailedError) as info:
        ex.run()
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert info.value.node == "sleepy"
    assert "node 'sleepy'" in msg and "timeout" in msg
    assert "NodeTimeoutError" in msg and "0.5s" in msg
    assert elapsed < 10, f"took {elapsed:.1f}s"
    # the abandoned step thread does not keep its worker alive
    assert wait_gone(ex.worker_pids, 5) == []


# --- functions from elsewhere ------------------------------------------------------------
SCRIPT = """
import json
import os

from odibi_actor import DAGBuilder, DistributedExecutor


def square(x):
    return x * x


def plus(a, b):
    return a + b


def where():
    return os.getpid()


if __name__ == "__main__":
    b = DAGBuilder()
    b.add_node("square", square, inputs=["x"], outputs=["y"])
    b.add_node("plus", plus, inputs=["x", "y"], outputs=["z"])
    b.add_node("where", where, outputs=["pid"])
    ex = DistributedExecutor(b.build(), workers=2)
    out = ex.run({"x": 7})
    workers = sorted({m.worker for m in ex.metrics.nodes.values()})
    print(json.dumps({"out": out, "me": os.getpid(), "workers": workers}))
"""


@pytest.mark.timeout(90)
def test_functions_defined_in_main_work(tmp_path):
    script = tmp_path / "pipeline.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [PYTHON, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=80
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"]["y"] == 49 and result["out"]["z"] == 56
    assert result["out"]["pid"] != result["me"]  # it ran in a worker process
    assert all(WORKER_ID.fullmatch(w) for w in result["workers"])


# --- what cannot travel ------------------------------------------------------------------
def test_unpicklable_initial_data_names_the_key():
    b = DAGBuilder().add_node("uses", double, inputs=["fine", "the_lock"], outputs=["out"])
    ex = DistributedExecutor(b.build(), workers=2)
    with pytest.raises(OdibiError) as info:
        ex.run({"fine": 1, "the_lock": threading.Lock()})
    assert "initial data 'the_lock' cannot be pickled" in str(info.value)
    assert "'fine'" not in str(info.value)
    assert ex.worker_pids == []  # refused before any worker was started


def returns_a_lock():
    return threading.Lock()


@pytest.mark.timeout(60)
def test_unpicklable_step_output_names_node_and_output():
    b = DAGBuilder()
    b.add_node("locker", returns_a_lock, outputs=["the_lock"])
    ex = DistributedExecutor(b.build(), workers=2)
    with pytest.raises(NodeFailedError) as info:
        ex.run()
    assert info.value.node == "locker"
    assert "output 'the_lock' of node 'locker' cannot be pickled" in str(info.value)


# --- backends ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ray_backend_warns_and_falls_back_to_processes():
    b = DAGBuilder().add_node("whoami", whoami, outputs=["pid"])
    with structlog.testing.capture_logs() as logs:
        ex = DAGExecutor(b.build(), backend="ray", workers=2)
    assert ex.backend == "processes"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("ray" in e["event"] for e in warnings), logs
    out = ex.run()
    assert out["pid"] != os.getpid()
    assert WORKER_ID.fullmatch(ex.metrics.nodes["whoami"].worker)


def test_unknown_backend_is_refused():
    b = DAGBuilder().add_node("n", whoami, outputs=["pid"])
    with pytest.raises(ValueError, match="backend must be one of"):
        DAGExecutor(b.build(), backend="dask")


@pytest.mark.timeout(60)
def test_a_short_run_does_not_linger_on_shutdown():
    # A one-step DAG is done well before a second worker has even registered; shutting
    # down must not wait a grace period for a worker that was never told to leave.
    # (abs: a step the worker need not import a test module for, so the run is quick)
    b = DAGBuilder().add_node("one", abs, inputs=["x"], outputs=["y"])
    ex = DistributedExecutor(b.build(), workers=2)
    t0 = time.monotonic()
    assert ex.run({"x": -1}) == {"y": 1}
    elapsed = time.monotonic() - t0
    assert elapsed < 2.5, f"a trivial run took {elapsed:.1f}s"


# --- the threads backend's own paths -----------------------------------------------------
def test_threads_backend_enforces_timeouts():
    b = DAGBuilder()
    b.add_node("stuck", time.sleep, inputs=["secs"], outputs=["never"], timeout=0.2)
    ex = DAGExecutor(b.build(), workers=1)
    t0 = time.monotonic()
    with pytest.raises(NodeFailedError, match=r"node 'stuck'.*timeout of 0\.2s"):
        ex.run({"secs": 5})
    assert time.monotonic() - t0 < 3


async def test_run_called_inside_an_event_loop():
    # a notebook calls run() while its own loop runs: the run goes on a thread of its own
    b = DAGBuilder().add_node("dbl", double, inputs=["x"], outputs=["y"])
    assert DAGExecutor(b.build()).run({"x": 21}) == {"y": 42}


def test_progress_callback_sees_the_run_finish():
    seen = []
    b = DAGBuilder()
    b.add_node("a", double, inputs=["x"], outputs=["y"])
    b.add_node("b", double, inputs=["y"], outputs=["z"])
    DAGExecutor(b.build(), progress=seen.append).run({"x": 1})
    assert seen, "progress was never called"
    last = seen[-1]
    assert (last.total, last.done, last.running, last.failed) == (2, 2, 0, 0)
    assert all(p.done <= p.total for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
