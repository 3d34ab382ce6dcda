"""Chaos on real processes: kill -9, SIGSTOP/SIGCONT, a restarted coordinator, poison
tasks and node timeouts.

Every DAG here is checked value by value: each node computes a number from its inputs
that the test computes independently, so a wrong, missing or duplicated result shows.
Each step also appends ``NAME PID TIME`` to a log file every time it *starts*, which tells
how often a node really executed and where, independently of what the coordinator reports.
Some tests speak the worker protocol themselves (:class:`FakeWorker`) to make races that
real processes hit only by chance happen every time.

The coordinator runs with ``--heartbeat-timeout 2``; the workers keep their defaults.
The load test runs ``scripts/load_cluster.py`` (16 workers, a 20,000-node DAG).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from clusterkit import Cluster, free_port

from odibi_actor import DAGBuilder, DistributedExecutor, NodeFailedError
from odibi_actor import _wire as wire
from odibi_actor.client import Client

HB_TIMEOUT = 2.0  # the coordinator's --heartbeat-timeout in these tests
ROOT = Path(__file__).resolve().parent.parent


# --- steps (imported by the workers from this module) --------------------------------------
def step(*inputs: int, name: str, log: str, delay: float, seed: int) -> int:
    """Log the start, sleep, and return a value that depends on the node and its inputs."""
    with open(log, "a") as f:
        f.write(f"{name} {os.getpid()} {time.time():.3f}\n")
    if delay:
        time.sleep(delay)
    return expected_value(seed, inputs)


def expected_value(seed: int, inputs: tuple[int, ...] | list[int]) -> int:
    # not symmetric in its inputs, so swapped or repeated inputs change the result
    return seed + sum((i + 1) * 7 * v for i, v in enumerate(inputs))


def suicide() -> int:
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)
    return 0  # never reached


def constant(i: int) -> int:
    return 3 * i + 1


def sleep_for(seconds: float) -> int:
    time.sleep(seconds)
    return 1


def sleep_long() -> int:
    time.sleep(30)
    return 1


# --- DAGs ------------------------------------------------------------------------------
def layered(
    layers: int, width: int, log: Path, delay: float, prefix: str = "n"
) -> tuple[DAGBuilder, dict[str, int]]:
    """``layers`` x ``width`` nodes, each reading two nodes of the previous layer.

    Returns the builder and every output's expected value, computed here.
    """
    b = DAGBuilder()
    expected: dict[str, int] = {}
    for layer in range(layers):
        for j in range(width):
            name = f"{prefix}{layer}_{j}"
            seed = 1000 * layer + j
            ins = (
                []
                if layer == 0
                else [f"{prefix}{layer - 1}_{j}.out", f"{prefix}{layer - 1}_{(j + 1) % width}.out"]
            )
            fn = functools.partial(step, name=name, log=str(log), delay=delay, seed=seed)
            b.add_node(name, fn, inputs=ins, outputs=[f"{name}.out"])
            expected[f"{name}.out"] = expected_value(seed, [expected[i] for i in ins])
    return b, expected


def executions(log: Path) -> collections.Counter[str]:
    """How many times each node started, from the steps' own log."""
    if not log.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in log.read_text().splitlines() if line)


def starts_by_pid(log: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = collections.defaultdict(set)
    if log.exists():
        for line in log.read_text().splitlines():
            name, pid, _ = line.split()
            out[name].add(int(pid))
    return out


def busy_with_fresh_task(log: Path, pid: int, within: float = 0.15) -> bool:
    """True if process ``pid`` started a step less than ``within`` seconds ago: it is
    certainly still inside that step (they sleep much longer)."""
    if not log.exists():
        return False
    now = time.time()
    for line in log.read_text().splitlines():
        _, p, at = line.split()
        if int(p) == pid and now - float(at) < within:
            return True
    return False


# --- helpers ---------------------------------------------------------------------------
def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def worker_names(client: Client) -> set[str]:
    try:
        return {w["name"] for w in client.workers()}
    except Exception:
        return set()


def worker_entry(client: Client, name: str) -> dict[str, Any] | None:
    return next((w for w in client.workers() if w["name"] == name), None)


def check_outputs(out: dict[str, Any], expected: dict[str, int]) -> None:
    missing, extra = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (out[k], v) for k, v in expected.items() if out[k] != v}
    assert not wrong, f"wrong values (got, want): {dict(list(wrong.items())[:5])}"


def check_metrics(handle: Any, n: int) -> None:
    m = handle.metrics
    assert m is not None
    assert m.node_count == n
    statuses = collections.Counter(nm.status for nm in m.nodes.values())
    assert statuses == {"done": n}, statuses
    assert m.get_summary()["nodes_done"] == n


def completions(handle: Any) -> collections.Counter[str]:
    """How many times the coordinator accepted a result for each node (its event log)."""
    return collections.Counter(
        e["node"] for e in handle.events(poll=0.05) if e["event"] == "step_complete"
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(
        free_port(),
        coordinator_args=("--heartbeat-timeout", str(HB_TIMEOUT)),
        log_dir=str(tmp_path),
    )
    try:
        yield c
    finally:
        c.close()


def start(cluster: Cluster, *names: str, **kwargs: Any) -> None:
    cluster.start_coordinator()
    for name in names:
        cluster.start_worker(name, **kwargs)
    cluster.wait_for_workers(len(names))


# --- kill -9 ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_kill9_worker_mid_run_results_complete_and_correct(cluster: Cluster, tmp_path: Path):
    log = tmp_path / "steps.log"
    start(cluster, "w1", "w2", "w3")
    dag, expected = layered(4, 12, log, delay=0.5)
    victim = cluster.workers["w2"]
    with cluster.client() as c:
        handle = c.submit(dag)
        # wait until the victim is inside a step and holds another one queued
        wait_until(
            lambda: (
                (worker_entry(c, "w2") or {}).get("queued", 0) >= 2
                and busy_with_fresh_task(log, victim.pid)
            ),
            15,
            "w2 to hold tasks",
        )
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(5)
        # the dead worker leaves the pool within the heartbeat timeout (and a tick)
        wait_until(lambda: "w2" not in worker_names(c), HB_TIMEOUT + 2, "w2 to be dropped")
        dropped_after = time.monotonic() - killed_at
        assert handle.status()["state"] == "running", "the run ended before w2 was dropped"
        out = handle.result(timeout=60)
        check_outputs(out, expected)
        check_metrics(handle, len(expected))
        assert completions(handle) == {n: 1 for n in executions(log)}
        assert worker_names(c) == {"w1", "w3"}
    print(f"killed worker dropped after {dropped_after:.2f}s")
    # w2 was killed while running a task: that node ran again on another worker
    by_pid = starts_by_pid(log)
    rerun = [n for n, pids in by_pid.items() if victim.pid in pids and len(pids) > 1]
    assert rerun, "no task of the killed worker was run again elsewhere"
    assert all(handle.metrics.nodes[n].worker != "w2" for n in rerun)


# --- SIGSTOP / SIGCONT ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sigstop_worker_is_evicted_rerun_elsewhere_and_rejoins(cluster: Cluster, tmp_path: Path):
    log = tmp_path / "steps.log"
    start(cluster, "w1", "w2", "w3")
    dag, expected = layered(6, 12, log, delay=0.5)
    hung = cluster.workers["w2"]
    with cluster.client() as c:
        handle = c.submit(dag)
        wait_until(
            lambda: (
                (worker_entry(c, "w2") or {}).get("queued", 0) >= 2
                and busy_with_fresh_task(log, hung.pid)
            ),
            15,
            "w2 to hold tasks",
        )
        os.kill(hung.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            # socket open, no heartbeats: evicted after the heartbeat timeout
            wait_until(lambda: "w2" not in worker_names(c), HB_TIMEOUT + 4, "w2 to be evicted")
            evicted_after = time.monotonic() - stopped_at
            print(f"stopped worker evicted after {evicted_after:.2f}s")
            assert evicted_after >= HB_TIMEOUT - 0.5, f"evicted too early ({evicted_after:.1f}s)"
            started_by_hung = {n for n, pids in starts_by_pid(log).items() if hung.pid in pids}
            # the task it froze in runs again on another worker
            wait_until(
                lambda: any(starts_by_pid(log)[n] - {hung.pid} for n in started_by_hung),
                10,
                f"one of w2's tasks {sorted(started_by_hung)} to run elsewhere",
            )
            assert handle.status()["state"] == "running", "the run ended before the test resumed w2"
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        # it comes back by itself: same process, registered again
        wait_until(lambda: "w2" in worker_names(c), 15, "w2 to register again")
        entry = worker_entry(c, "w2")
        assert entry is not None and entry["pid"] == hung.pid
        out = handle.result(timeout=90)
        check_outputs(out, expected)
        check_metrics(handle, len(expected))
        # the coordinator accepted exactly one result per node, late answers included
        done = completions(handle)
        assert set(done) == {n.removesuffix(".out") for n in expected}
        assert set(done.values()) == {1}, {n: k for n, k in done.items() if k != 1}
        assert hung.poll() is None, "the resumed worker died"
    # w2 froze inside a step, which ran again elsewhere; resumed, w2 finished its stale
    # copy too. So some node executed twice, yet every output and done-count above is exact.
    counts = executions(log)
    assert set(counts) == {n.removesuffix(".out") for n in expected}
    assert max(counts.values()) >= 2
    assert any(counts[n] >= 2 for n in started_by_hung)


# --- coordinator restart ----------------------------------------------------------------
@pytest.mark.timeout(90)
def test_restarted_coordinator_workers_come_back_by_themselves(cluster: Cluster, tmp_path: Path):
    log = tmp_path / "steps.log"
    start(cluster, "w1", "w2")
    pids = {name: p.pid for name, p in cluster.workers.items()}
    dag, expected = layered(2, 4, log, delay=0.0)
    with cluster.client() as c:
        check_outputs(c.submit(dag).result(timeout=30), expected)
    cluster.kill_coordinator()
    time.sleep(0.5)
    cluster.start_coordinator()
    restarted = time.monotonic()
    with cluster.client() as c:
        wait_until(lambda: worker_names(c) == {"w1", "w2"}, 15, "both workers to re-register")
        rejoined_after = time.monotonic() - restarted
        print(f"workers re-registered {rejoined_after:.2f}s after the coordinator restarted")
        by_name = {w["name"]: w["pid"] for w in c.workers()}
        assert by_name == pids, "not the same worker processes"
        assert all(p.poll() is None for p in cluster.workers.values())
        dag2, expected2 = layered(3, 8, log, delay=0.05, prefix="m")
        handle = c.submit(dag2)
        check_outputs(handle.result(timeout=30), expected2)
        check_metrics(handle, len(expected2))
        used = {nm.worker for nm in handle.metrics.nodes.values()}
        assert used <= {"w1", "w2"} and used, used
    assert rejoined_after < 10, f"workers took {rejoined_after:.1f}s to come back"


@pytest.mark.timeout(90)
def test_new_coordinator_gets_no_work_of_the_old_ones_runs(cluster: Cluster, tmp_path: Path):
    """Queued tasks of a run only the dead coordinator knew are dropped, not executed."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    long = 5.0
    start(cluster, "w1", "w2")
    old = DAGBuilder()
    for i in range(8):
        fn = functools.partial(step, name=f"old{i}", log=str(old_log), delay=long, seed=i)
        old.add_node(f"old{i}", fn, outputs=[f"old{i}.out"])
    with cluster.client() as c:
        # a quick run first: the pool queues tasks ahead only once it knows how long they take.
        # 10 ms each, not 0: an estimate far below a message's cost (~1 ms) makes the pool
        # feed one worker all 8 tasks in one message, leaving the other idle
        warm, warm_expected = layered(1, 4, tmp_path / "warm.log", delay=0.01, prefix="warm")
        check_outputs(c.submit(warm).result(timeout=30), warm_expected)
        c.submit(old)
        # each worker (one thread) runs one old task and holds more queued
        wait_until(
            lambda: (
                len(executions(old_log)) == 2
                and all(w["queued"] >= 2 for w in c.workers())
                and len(c.workers()) == 2
            ),
            10,
            "both workers to run one old task and queue another",
        )
    first_started = time.monotonic()
    cluster.kill_coordinator()
    cluster.start_coordinator()
    dag, expected = layered(2, 4, new_log, delay=0.05)
    with cluster.client() as c:
        wait_until(lambda: worker_names(c) == {"w1", "w2"}, 10, "workers to re-register")
        t0 = time.monotonic()
        handle = c.submit(dag)
        check_outputs(handle.result(timeout=30), expected)
        new_run_took = time.monotonic() - t0
        check_metrics(handle, len(expected))
    # wait past the moment the queued old tasks would have started and finished
    time.sleep(max(0.0, first_started + long + 1.5 - time.monotonic()))
    started = executions(old_log)
    assert sum(started.values()) == 2, (
        f"old run's queued tasks executed after the coordinator changed: {dict(started)}"
    )
    # the new run waited at most for the one old task each worker was already running
    assert new_run_took < long + 2, f"new run took {new_run_took:.1f}s"


@pytest.mark.timeout(90)
def test_coordinator_stall_does_not_evict_healthy_workers(cluster: Cluster, tmp_path: Path):
    """The coordinator itself freezes (SIGSTOP: a VM pause, a long GC) for longer than the
    heartbeat timeout, three times, while one long task runs. The workers kept sending
    heartbeats the whole time; they sit unread in the coordinator's socket. Nobody died,
    so the task must not be re-run, and above all not failed as a poison task."""
    log = tmp_path / "steps.log"
    start(cluster, "w1", "w2")
    b = DAGBuilder()
    b.add_node(
        "long",
        functools.partial(step, name="long", log=str(log), delay=10.0, seed=7),
        outputs=["x"],
    )
    coordinator = cluster.coordinator
    assert coordinator is not None
    with cluster.client() as c:
        handle = c.submit(b)
        wait_until(lambda: executions(log)["long"] == 1, 10, "the long task to start")
        for _ in range(3):
            os.kill(coordinator.pid, signal.SIGSTOP)
            time.sleep(HB_TIMEOUT + 0.8)
            os.kill(coordinator.pid, signal.SIGCONT)
            time.sleep(1.0)
        try:
            out = handle.result(timeout=40)
        except NodeFailedError as exc:
            pytest.fail(f"a coordinator stall failed a healthy task: {exc}")
    assert out == {"x": 7}
    assert executions(log)["long"] == 1, (
        f"the long task ran {executions(log)['long']} times: healthy workers were evicted"
        " after the coordinator's own stall"
    )


# --- poison task ------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_poison_task_fails_with_clear_error_not_retried_forever(tmp_path: Path):
    b = DAGBuilder()
    b.add_node("poison_pill", suicide, outputs=["p"])
    for i in range(6):
        b.add_node(f"ok{i}", functools.partial(constant, i), outputs=[f"ok{i}"])
    ex = DistributedExecutor(b, workers=2)
    t0 = time.monotonic()
    with pytest.raises(NodeFailedError) as info:
        ex.run()
    took = time.monotonic() - t0
    msg = str(info.value)
    assert "PoisonTaskError" in msg and "'poison_pill'" in msg, msg
    assert info.value.node == "poison_pill"
    assert took < 45, f"poison task took {took:.1f}s to fail"
    statuses = {n: m.status for n, m in ex.metrics.nodes.items()}
    assert statuses.pop("poison_pill") == "failed"
    assert statuses == {f"ok{i}": "done" for i in range(6)}, statuses


# --- node timeouts ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_node_timeout_enforced_on_the_worker(cluster: Cluster, tmp_path: Path):
    start(cluster, "w1")
    b = DAGBuilder()
    b.add_node("sleepy", sleep_long, outputs=["s"], timeout=0.5)
    b.add_node("fine", functools.partial(constant, 2), outputs=["f"])
    with cluster.client() as c:
        t0 = time.monotonic()
        handle = c.submit(b)
        with pytest.raises(NodeFailedError) as info:
            handle.result(timeout=30)
        took = time.monotonic() - t0
    msg = str(info.value)
    assert info.value.node == "sleepy"
    assert "NodeTimeoutError" in msg and "'sleepy'" in msg, msg
    assert "ran longer than its timeout" in msg, "expected the worker's own watchdog"
    assert "checked by the coordinator" not in msg
    assert took < 10, f"timeout reported after {took:.1f}s"
    assert handle.metrics is not None and handle.metrics.nodes["fine"].status == "done"


class FakeWorker(threading.Thread):
    """A protocol-level worker in a thread: registers and heartbeats like a real one, and
    does with the tasks it gets whatever ``on_tasks`` says (``send`` sends a message)."""

    def __init__(self, address: str, on_tasks: Callable[[FakeWorker, dict[str, Any]], None]):
        super().__init__(daemon=True)
        self.address = address
        self.on_tasks = on_tasks
        self.received: list[dict[str, Any]] = []
        self.tasks: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.silent = threading.Event()  # stop heartbeating (look hung)
        self.ctx = zmq.Context()
        self.sock: zmq.Socket[Any] | None = None
        self.lock = threading.Lock()
        self.identity = b""
        self._connect()

    def _connect(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close(linger=0)
            self.sock = self.ctx.socket(zmq.DEALER)
            self.identity = f"fake/{time.monotonic_ns()}".encode()
            self.sock.setsockopt(zmq.IDENTITY, self.identity)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.address)
        self.send({"t": wire.HELLO, "name": "fake", "nthreads": 1, "pid": 1, "host": "fake"})

    def reconnect(self) -> None:
        """A new session (new identity), as a real worker does after a RESET."""
        self._connect()

    def send(self, header: dict[str, Any], values: list[Any] = ()) -> None:  # type: ignore[assignment]
        with self.lock:
            assert self.sock is not None
            self.sock.send_multipart(wire.encode(dict(header), [wire.pack(v) for v in values]))

    def run(self) -> None:
        last = 0.0
        while not self.halt.is_set():
            with self.lock:
                sock = self.sock
                assert sock is not None
                frames = sock.recv_multipart() if sock.poll(50) else None
            if frames is not None:
                header, _ = wire.decode(frames)
                self.received.append(header)
                if header["t"] == wire.TASKS:
                    self.tasks.append(header)
                    self.on_tasks(self, header)
            if not self.silent.is_set() and time.monotonic() - last > 0.3:
                self.send({"t": wire.HEARTBEAT})
                last = time.monotonic()

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()


@pytest.mark.timeout(60)
def test_node_timeout_checked_by_the_coordinator(cluster: Cluster):
    """A worker that reports a timed task started, keeps heartbeating, and never answers
    (its watchdog is broken) is caught by the coordinator's own deadline check."""

    def started_only(fake: FakeWorker, header: dict[str, Any]) -> None:
        fake.send(
            {"t": wire.STARTED, "run": header["run"], "tasks": [t[:2] for t in header["tasks"]]}
        )

    cluster.start_coordinator()
    fake = FakeWorker(cluster.listen, started_only)
    fake.start()
    try:
        cluster.wait_for_workers(1)
        b = DAGBuilder()
        b.add_node("stuck", sleep_long, outputs=["s"], timeout=0.5)
        with cluster.client() as c:
            t0 = time.monotonic()
            handle = c.submit(b)
            with pytest.raises(NodeFailedError) as info:
                handle.result(timeout=30)
            took = time.monotonic() - t0
            assert worker_names(c) == {"fake"}, "the fake worker was evicted, not timed out"
        msg = str(info.value)
        assert "NodeTimeoutError" in msg and "'stuck'" in msg, msg
        assert "checked by the coordinator" in msg, msg
        # deadline = timeout + heartbeat timeout after the start, checked every half beat
        assert 0.5 + HB_TIMEOUT - 0.2 < took < 0.5 + HB_TIMEOUT + 3, took
    finally:
        fake.close()


@pytest.mark.timeout(60)
def test_late_and_duplicate_results_are_ignored(cluster: Cluster):
    """Attempt ids at the protocol level: a result for an attempt of an evicted worker,
    and a second result for an attempt already done, change nothing."""

    cluster.start_coordinator()
    fake = FakeWorker(cluster.listen, lambda fake, header: None)
    fake.start()
    try:
        cluster.wait_for_workers(1)
        b = DAGBuilder()
        b.add_node("only", functools.partial(constant, 5), outputs=["x"])
        with cluster.client() as c:
            handle = c.submit(b)
            first = wait_until(lambda: list(fake.tasks), 10, "the first attempt")[0]
            tid, attempt1, _ = first["tasks"][0]
            run = first["run"]
            fake.silent.set()  # hang: no heartbeats, no answer
            wait_until(lambda: not worker_names(c), HB_TIMEOUT + 4, "the fake to be evicted")
            fake.silent.clear()
            fake.reconnect()  # registers again under a new identity
            second = wait_until(lambda: fake.tasks[1:], 10, "the task to be dispatched again")[0]
            tid2, attempt2, _ = second["tasks"][0]
            assert (tid2, run) == (tid, second["run"]) and attempt2 > attempt1
            # the late answer to the lost attempt, with a wrong value: ignored
            fake.send(
                {"t": wire.RESULTS, "run": run, "ok": [[tid, attempt1, 0.01]], "err": []}, [666]
            )
            time.sleep(0.5)
            assert handle.status()["state"] == "running"
            # the current attempt's answer, then a duplicate of it with another value
            for value in (16, 777):
                fake.send(
                    {"t": wire.RESULTS, "run": run, "ok": [[tid, attempt2, 0.01]], "err": []},
                    [value],
                )
            assert handle.result(timeout=10) == {"x": 16}
            assert completions(handle) == {"only": 1}
            assert handle.metrics is not None and handle.metrics.nodes["only"].attempts == attempt2
    finally:
        fake.close()


@pytest.mark.timeout(60)
def test_stale_result_does_not_cancel_the_coordinators_deadline(cluster: Cluster):
    """Worker A runs attempt 1 of a timed node, hangs and is evicted; B gets attempt 2,
    reports it started, then hangs inside it (keeps heartbeating, never answers). A comes
    back and delivers its late attempt-1 result. That stale result is ignored for the
    outcome, and it must not disarm the coordinator's deadline for attempt 2 either."""

    def started_only(fake: FakeWorker, header: dict[str, Any]) -> None:
        fake.send(
            {"t": wire.STARTED, "run": header["run"], "tasks": [t[:2] for t in header["tasks"]]}
        )

    cluster.start_coordinator()
    a = FakeWorker(cluster.listen, started_only)
    a.start()
    b: FakeWorker | None = None
    try:
        cluster.wait_for_workers(1)
        dag = DAGBuilder()
        dag.add_node("stuck", sleep_long, outputs=["s"], timeout=1.0)
        with cluster.client() as c:
            handle = c.submit(dag)
            first = wait_until(lambda: list(a.tasks), 10, "attempt 1 on A")[0]
            tid, attempt1, _ = first["tasks"][0]
            a.silent.set()
            wait_until(lambda: not worker_names(c), HB_TIMEOUT + 4, "A to be evicted")
            b = FakeWorker(cluster.listen, started_only)
            b.start()
            wait_until(lambda: list(b.tasks), 10, "attempt 2 on B")
            started_b = time.monotonic()
            a.silent.clear()
            a.reconnect()
            wait_until(lambda: len(worker_names(c)) == 1 and len(c.workers()) == 2, 10, "A back")
            a.send(
                {"t": wire.RESULTS, "run": first["run"], "ok": [[tid, attempt1, 3.0]], "err": []},
                [42],
            )
            with pytest.raises(NodeFailedError) as info:
                handle.result(timeout=1.0 + HB_TIMEOUT + 8)
            took = time.monotonic() - started_b
        assert "checked by the coordinator" in str(info.value), str(info.value)
        assert took < 1.0 + HB_TIMEOUT + 3, took
    finally:
        a.close()
        if b is not None:
            b.close()


@pytest.mark.timeout(60)
def test_result_of_a_run_the_restarted_coordinator_never_knew(cluster: Cluster):
    """The coordinator died with the run and came back empty: RunHandle.result() should
    say so promptly, not keep asking until its timeout (or forever, without one)."""
    start(cluster, "w1")
    b = DAGBuilder()
    b.add_node("slow", functools.partial(sleep_for, 3.0), outputs=["x"])
    with cluster.client() as c:
        handle = c.submit(b)
        time.sleep(0.5)
        cluster.kill_coordinator()
        cluster.start_coordinator()
        cluster.wait_for_workers(1)
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            handle.result(timeout=10)
        took = time.monotonic() - t0
        requests = next(c._ids)
    assert handle.run_id in str(info.value)
    assert took < 3, f"result() kept polling an unknown run for {took:.1f}s ({requests} requests)"


@pytest.mark.timeout(60)
def test_worker_reconnects_with_exponential_backoff(cluster: Cluster, tmp_path: Path):
    """With the coordinator gone, each reconnect waits about twice as long as the one
    before (full jitter: every second wait at least doubles); once a coordinator is back,
    the worker registers by itself."""
    cluster.start_coordinator()
    cluster.start_worker("w1", "--heartbeat-timeout", "1")
    cluster.wait_for_workers(1)
    cluster.kill_coordinator()
    time.sleep(9)
    text = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "w1.log").read_text())
    delays = [float(x) for x in re.findall(r"reconnecting.*retry_in=([0-9.]+)", text)]
    assert len(delays) >= 4, delays
    # (retry_in is logged rounded to 0.01s)
    assert all(b >= 2 * a - 0.02 for a, b in zip(delays, delays[2:], strict=False)), delays
    assert delays[3] >= 3.5 * delays[0], delays
    cluster.start_coordinator()
    cluster.wait_for_workers(1, timeout=2 * delays[-1] + 5)


# --- load -------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_load_16_workers_20k_nodes_bounded_coordinator_memory():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_cluster.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=580,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["nodes"] == 20_000 and report["workers"] == 16 and report["verified"]
    assert report["peak_rss_mb"] < 500, report
    assert report["leftover_processes"] == 0, report
