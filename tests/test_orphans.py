"""No worker process outlives its run: finished, failed, coordinator killed, worker stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    PYTHON,
    BackgroundRun,
    alive,
    bump,
    count,
    kill_tree,
    reap_leftover_workers,
    wait_for,
    wait_gone,
    worker_children,
)

from odibi_actor import DAGBuilder, DistributedExecutor, NodeFailedError


def quick(x):
    time.sleep(0.2)
    return x * 3


def broken(x):
    raise RuntimeError("this run fails")


def _assert_no_workers_left(ex):
    assert len(ex.worker_pids) == 2
    assert wait_gone(ex.worker_pids, 5) == [], "worker processes outlived the run"
    assert worker_children(os.getpid()) == []


@pytest.mark.timeout(60)
def test_no_worker_survives_a_finished_run():
    b = DAGBuilder()
    b.add_node("a", quick, inputs=["x"], outputs=["y"])
    b.add_node("b", quick, inputs=["x"], outputs=["z"])
    ex = DistributedExecutor(b.build(), workers=2)
    assert ex.run({"x": 2}) == {"y": 6, "z": 6}
    _assert_no_workers_left(ex)


@pytest.mark.timeout(60)
def test_no_worker_survives_a_failed_run():
    b = DAGBuilder()
    b.add_node("ok", quick, inputs=["x"], outputs=["y"])
    b.add_node("broken", broken, inputs=["x"], outputs=["z"])
    ex = DistributedExecutor(b.build(), workers=2)
    with pytest.raises(NodeFailedError, match="'broken'"):
        ex.run({"x": 2})
    _assert_no_workers_left(ex)


def exits_the_process():
    os._exit(3)


@pytest.mark.timeout(90)
def test_no_worker_survives_a_run_whose_step_kills_its_workers():
    # Each attempt kills its worker, which is respawned; after the second loss the node
    # is a poison task and the run fails. The respawned workers must not outlive it.
    b = DAGBuilder()
    b.add_node("killer", exits_the_process, outputs=["z"])
    ex = DistributedExecutor(b.build(), workers=2, allowed_failures=2)
    with pytest.raises(NodeFailedError) as info:
        ex.run()
    assert info.value.node == "killer"
    assert "PoisonTaskError" in str(info.value) and "'killer'" in str(info.value)
    assert "2 workers" in str(info.value)
    left = reap_leftover_workers()
    assert left == [], "respawned workers outlived the run:\n" + "\n".join(left)


COORDINATOR = """
import sys
import time
from pathlib import Path

from odibi_actor import DAGBuilder, DistributedExecutor


def sleepy(marker):
    Path(marker).write_text("running")
    time.sleep(60)
    return 1


if __name__ == "__main__":
    b = DAGBuilder()
    b.add_node("a", sleepy, inputs=["m1"], outputs=["x"])
    b.add_node("b", sleepy, inputs=["m2"], outputs=["y"])
    DistributedExecutor(b.build(), workers=2).run({"m1": sys.argv[1], "m2": sys.argv[2]})
"""


@pytest.mark.timeout(60)
def test_no_worker_survives_a_killed_coordinator(tmp_path):
    script = tmp_path / "coordinator.py"
    script.write_text(textwrap.dedent(COORDINATOR))
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    coordinator = subprocess.Popen([PYTHON, str(script), str(m1), str(m2)], cwd=tmp_path)
    try:
        workers = wait_for(
            lambda: len(worker_children(coordinator.pid)) == 2 and worker_children(coordinator.pid),
            30,
            "two worker processes under the coordinator",
        )
        wait_for(lambda: m1.exists() or m2.exists(), 30, "a step to be running")
        pids = [w.pid for w in workers]
        assert all(alive(p) for p in pids)
        coordinator.send_signal(signal.SIGKILL)
        assert coordinator.wait(timeout=10) == -signal.SIGKILL
        left = wait_gone(pids, 5)
        assert left == [], f"workers {left} outlived their killed coordinator"
    finally:
        kill_tree(coordinator)


def tracked_run(n: int, log_dir: Path) -> tuple[DistributedExecutor, BackgroundRun]:
    """n independent tracked steps on 2 local workers, running in the background."""
    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"step{i}", tracked_step, inputs=[f"i{i}", "log_dir"], outputs=[f"sq{i}"])
    ex = DistributedExecutor(b.build(), workers=2)
    return ex, BackgroundRun(ex, {"log_dir": str(log_dir), **{f"i{i}": i for i in range(n)}})


def tracked_step(i, log_dir):
    """Records its pid when it starts and counts how often it ran to the end."""
    Path(log_dir, f"start-{i}-{os.getpid()}").touch()
    time.sleep(0.6)
    bump(Path(log_dir, f"done-{i}"))
    return i * i


@pytest.mark.timeout(90)
def test_sigterm_of_a_worker_mid_run_loses_no_work(tmp_path):
    n = 8
    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"step{i}", tracked_step, inputs=[f"i{i}", "log_dir"], outputs=[f"sq{i}"])
    b.add_node("sum", lambda *xs: sum(xs), inputs=[f"sq{i}" for i in range(n)], outputs=["total"])
    ex = DistributedExecutor(b.build(), workers=2)
    run = BackgroundRun(ex, {"log_dir": str(tmp_path), **{f"i{i}": i for i in range(n)}})

    def a_step_running():
        pids = set(ex.worker_pids)
        for f in tmp_path.glob("start-*"):
            step, pid = f.name.split("-")[1:]
            if int(pid) in pids and not (tmp_path / f"done-{step}").exists():
                return int(step), int(pid)
        return None

    step, victim = wait_for(a_step_running, 30, "a step running on a worker")
    os.kill(victim, signal.SIGTERM)
    run.join(60)
    assert run.error is None, repr(run.error)
    assert run.result["total"] == sum(i * i for i in range(n))
    assert [run.result[f"sq{i}"] for i in range(n)] == [i * i for i in range(n)]
    # the step that was running on the stopped worker was finished there, not redone
    assert (tmp_path / f"start-{step}-{victim}").exists()
    for i in range(n):
        assert count(tmp_path / f"done-{i}") == 1, f"step{i} ran to the end more than once"
        assert len(list(tmp_path.glob(f"start-{i}-*"))) == 1, f"step{i} was started twice"
    # the stopped worker really left, and someone else did the remaining steps
    assert not alive(victim)
    assert ex.metrics.nodes[f"step{step}"].status == "done"
    victim_name = ex.metrics.nodes[f"step{step}"].worker
    others = {m.worker for m in ex.metrics.nodes.values()} - {victim_name}
    assert others, "no other worker took over"
    assert wait_gone([p.pid for p in worker_children(os.getpid())], 5) == []


@pytest.mark.timeout(60)
def test_sigkill_of_a_worker_mid_run_is_recovered(tmp_path):
    n = 6
    ex, run = tracked_run(n, tmp_path)

    def a_step_running():
        pids = set(ex.worker_pids)
        for f in tmp_path.glob("start-*"):
            step, pid = f.name.split("-")[1:]
            if int(pid) in pids and not (tmp_path / f"done-{step}").exists():
                return int(step), int(pid)
        return None

    step, victim = wait_for(a_step_running, 30, "a step running on a worker")
    psutil.Process(victim).kill()
    run.join(60)
    assert run.error is None, repr(run.error)
    assert run.result == {f"sq{i}": i * i for i in range(n)}
    # the killed attempt never finished; the step was run again elsewhere, once
    assert count(tmp_path / f"done-{step}") == 1
    assert len(list(tmp_path.glob(f"start-{step}-*"))) == 2
    assert ex.metrics.nodes[f"step{step}"].attempts == 2
    assert wait_gone([p.pid for p in worker_children(os.getpid())], 5) == []


def hold_until_released(release):
    Path(release + ".started").touch()
    deadline = time.time() + 20
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.01)
    return "held"


def fails_on_first_run(counter):
    n = bump(counter)
    if n == 1:
        raise RuntimeError("the first real run fails")
    return n


@pytest.mark.timeout(60)
def test_a_task_handed_back_by_a_stopping_worker_keeps_its_retries(tmp_path):
    # One worker, one thread: "hold" runs, "flaky" waits in the worker's queue. SIGTERM
    # hands "flaky" back unstarted; it then fails on its first real run and, having
    # retries=1 and no failure yet, must be retried rather than fail the run.
    release, counter = str(tmp_path / "release"), str(tmp_path / "counter")
    b = DAGBuilder()
    b.add_node("hold", hold_until_released, inputs=["release"], outputs=["a"])
    b.add_node("flaky", fails_on_first_run, inputs=["counter"], outputs=["b"], retries=1)
    ex = DistributedExecutor(b.build(), workers=1)
    run = BackgroundRun(ex, {"release": release, "counter": counter})
    wait_for(lambda: os.path.exists(release + ".started"), 30, "'hold' to start")
    (victim,) = ex.worker_pids
    os.kill(victim, signal.SIGTERM)
    time.sleep(0.3)  # let the worker hand back what it has not started
    Path(release).touch()
    run.join(60)
    assert count(counter) >= 1, "flaky never ran"
    assert run.error is None, repr(run.error)
    assert run.result == {"a": "held", "b": 2}
    assert not alive(victim)


def whoami(x, log_dir):
    """Where a step ran: its pid, its parent, and the command line ps shows for it."""
    Path(log_dir, f"start-{x}-{os.getpid()}").touch()
    time.sleep(0.3)
    return os.getpid(), os.getppid(), " ".join(psutil.Process().cmdline())


@pytest.mark.timeout(60)
def test_local_workers_fork_from_one_zygote_and_look_like_workers(tmp_path):
    b = DAGBuilder()
    for i in range(4):
        b.add_node(f"n{i}", whoami, inputs=[f"i{i}", "log_dir"], outputs=[f"o{i}"])
    ex = DistributedExecutor(b.build(), workers=2)
    out = ex.run({"log_dir": str(tmp_path), **{f"i{i}": i for i in range(4)}})
    pids = {pid for pid, _, _ in out.values()}
    parents = {ppid for _, ppid, _ in out.values()}
    assert pids <= set(ex.worker_pids) and len(pids) == 2, out
    assert len(parents) == 1 and os.getpid() not in parents, "not forked from one zygote"
    for _, _, cmdline in out.values():
        assert "odibi_actor.worker" in cmdline and "--parent-pid" in cmdline, cmdline
    assert not alive(parents.pop()), "the zygote outlived the run"
    _assert_no_workers_left(ex)


@pytest.mark.timeout(90)
def test_a_killed_zygote_costs_its_workers_not_the_run(tmp_path):
    """Its workers die with it; their tasks are lost and rerun on workers spawned one by
    one, and nothing is left behind."""
    n = 6
    ex, run = tracked_run(n, tmp_path)
    wait_for(lambda: list(tmp_path.glob("start-*")), 30, "a step running on a worker")
    zygotes = [
        p
        for p in psutil.Process().children(recursive=True)
        if "odibi_actor._zygote" in " ".join(p.cmdline())
    ]
    assert len(zygotes) == 1, zygotes
    forked = [p.pid for p in zygotes[0].children()]
    zygotes[0].kill()
    run.join(60)
    assert run.error is None, repr(run.error)
    assert run.result == {f"sq{i}": i * i for i in range(n)}
    assert wait_gone(forked, 5) == [], "forked workers outlived their zygote"
    finishers = {m.worker for m in ex.metrics.nodes.values()}
    assert finishers - {"local-0", "local-1"}, f"no respawned worker finished a step: {finishers}"
    assert wait_gone([p.pid for p in worker_children(os.getpid())], 5) == []


def _unix_socket_file(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, as after a kill -9


def test_socket_files_of_killed_runs_are_swept(tmp_path):
    from odibi_actor._local import sweep_stale_sockets

    gone = subprocess.Popen([PYTHON, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"odibi-{gone.pid}-abc123.sock"
    stale_data = tmp_path / f"odibi-{gone.pid}-abc123-local-0.sock"
    mine = tmp_path / f"odibi-{os.getpid()}-def456.sock"
    not_a_socket = tmp_path / f"odibi-{gone.pid}-notes.sock"
    for path in (stale, stale_data, mine):
        _unix_socket_file(path)
    not_a_socket.write_text("keep me")
    assert sweep_stale_sockets(str(tmp_path)) == 2
    assert not stale.exists() and not stale_data.exists()
    assert mine.exists() and not_a_socket.exists()
