"""Warm workers: ``with DistributedExecutor(...) as ex`` keeps one set of worker processes
for every run until it closes, and none after."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import anyio
import psutil
import pytest
from conftest import PYTHON, alive, wait_for, wait_gone, worker_children

from odibi_actor import DAGBuilder, DistributedExecutor, NodeFailedError


def pid_and_double(x):
    return os.getpid(), 2 * x


BIG = 64 * 2**20  # kept on its worker (>= 1 MiB), and freed to the OS when dropped


def big(seed):
    return bytes([seed % 256]) * BIG


def size_of(blob):
    return len(blob), blob[0]


def held(marker, release):
    Path(marker).write_text("running")
    deadline = time.monotonic() + 30
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return 1


def positive(x):
    if x < 0:
        raise ValueError(f"bad input {x}")
    return x


def two_steps():
    b = DAGBuilder()
    b.add_node("a", pid_and_double, inputs=["x"], outputs=["a"])
    b.add_node("b", pid_and_double, inputs=["y"], outputs=["b"])
    return b.build()


def processes_below_us() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if alive(p.pid)]


@pytest.mark.timeout(60)
def test_runs_share_the_same_workers_and_none_is_left_after_close():
    with DistributedExecutor(two_steps(), workers=2) as ex:
        pids = list(ex.worker_pids)
        assert len(pids) == 2 and all(alive(p) for p in pids), "start() waits for its workers"
        seen = set()
        for x in range(4):
            out = ex.run({"x": x, "y": 10 + x})
            assert out["a"][1] == 2 * x and out["b"][1] == 2 * (10 + x)
            seen |= {out["a"][0], out["b"][0]}
            assert all(alive(p) for p in pids), "a warm worker left between runs"
        assert seen <= set(pids), f"steps ran outside the warm workers: {seen} vs {pids}"
        assert len(worker_children(os.getpid())) == 2
    assert wait_gone(pids, 5) == [], "close() left workers behind"
    assert processes_below_us() == [], "close() left a process behind (the zygote?)"


@pytest.mark.timeout(60)
def test_kept_outputs_of_one_run_are_freed_and_the_next_run_is_right():
    b = DAGBuilder()
    for i in range(3):
        b.add_node(f"make{i}", big, inputs=[f"s{i}"], outputs=[f"blob{i}"])
        b.add_node(f"size{i}", size_of, inputs=[f"blob{i}"], outputs=[f"size{i}"])
    # asking for the blobs too keeps them on their holders until the run is over
    wanted = [f"size{i}" for i in range(3)] + [f"blob{i}" for i in range(3)]
    with DistributedExecutor(b.build(), workers=2) as ex:
        for seed in (1, 2, 3, 4):
            out = ex.run({f"s{i}": seed + i for i in range(3)}, outputs=wanted)
            assert [out[f"size{i}"] for i in range(3)] == [(BIG, seed + i) for i in range(3)]
            assert out["blob2"] == big(seed + 2)
            assert ex.metrics.kept_outputs == 3, "big outputs should stay on the workers"
        # each run kept 192 MiB on the workers; had runs not freed theirs, 768 MiB would be
        # there now, at least 384 MiB on one worker
        rss = [psutil.Process(p).memory_info().rss for p in ex.worker_pids]
        assert max(rss) < 330 * 2**20, f"worker RSS {[r >> 20 for r in rss]} MiB"


@pytest.mark.timeout(60)
def test_an_idle_worker_holds_nothing_of_the_last_run():
    """Between runs a warm worker has let go of every big value of the last one: the
    kept output, the outcome that carried it and the task that read it."""
    b = DAGBuilder()
    b.add_node("seed", positive, inputs=["s"], outputs=["seed"])
    b.add_node("make", big, inputs=["seed"], outputs=["blob"])  # the last step, unread
    with DistributedExecutor(b.build(), workers=1) as ex:
        (pid,) = ex.worker_pids
        before = psutil.Process(pid).memory_info().rss
        for seed in (1, 2):
            assert ex.run({"s": seed}, outputs=["seed"])["seed"] == seed
            assert ex.metrics.kept_outputs == 1
        # the 64 MiB blob is freed once its worker is idle, without another task arriving
        deadline = time.monotonic() + 10
        while (rss := psutil.Process(pid).memory_info().rss) > before + BIG // 2:
            assert time.monotonic() < deadline, f"worker RSS +{(rss - before) >> 20} MiB"
            time.sleep(0.05)


@pytest.mark.timeout(90)
def test_a_worker_killed_between_runs_is_replaced():
    with DistributedExecutor(two_steps(), workers=2) as ex:
        assert ex.run({"x": 1, "y": 2})["a"][1] == 2
        victim = ex.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_gone([victim], 5) == []
        wait_for(lambda: len(ex.worker_pids) == 3, 15, "a replacement worker")
        out = ex.run({"x": 3, "y": 4})
        assert out["a"][1] == 6 and out["b"][1] == 8
        assert victim not in {out["a"][0], out["b"][0]}
    assert processes_below_us() == []


@pytest.mark.timeout(60)
def test_a_failed_run_leaves_the_workers_ready_for_the_next():
    b = DAGBuilder()
    b.add_node("checked", positive, inputs=["x"], outputs=["y"])
    with DistributedExecutor(b.build(), workers=2) as ex:
        ex.close()  # close, then start again: a fresh set of workers
        ex.start()
        pids = list(ex.worker_pids)
        with pytest.raises(NodeFailedError, match="'checked'") as info:
            ex.run({"x": -7})
        assert "bad input -7" in str(info.value)
        assert ex.run({"x": 3}) == {"y": 3}
        assert ex.worker_pids == pids
    assert wait_gone(pids, 5) == []


@pytest.mark.timeout(60)
def test_a_cancelled_run_stops_and_the_workers_take_the_next(tmp_path):
    b = DAGBuilder()
    b.add_node("held", held, inputs=["m", "release"], outputs=["z"])
    marker, release = tmp_path / "m", tmp_path / "release"
    data = {"m": str(marker), "release": str(release)}

    async def cancel_once_running(ex: DistributedExecutor) -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ex.arun, data)
            while not marker.exists():
                await anyio.sleep(0.02)
            t0 = time.monotonic()
            tg.cancel_scope.cancel()
        return time.monotonic() - t0

    with DistributedExecutor(b.build(), workers=2) as ex:
        took = anyio.run(cancel_once_running, ex)
        assert took < 11, f"cancelling a warm run took {took:.1f} s"
        release.touch()  # lets the abandoned step end too
        assert ex.run(data) == {"z": 1}
    assert processes_below_us() == []


@pytest.mark.timeout(60)
def test_run_after_close_starts_its_own_workers():
    ex = DistributedExecutor(two_steps(), workers=1)
    with ex:
        warm = list(ex.worker_pids)
        ex.run({"x": 1, "y": 1})
    ex.close()  # idempotent
    out = ex.run({"x": 2, "y": 3})
    assert out["a"][1] == 4 and out["a"][0] not in warm
    assert processes_below_us() == []


@pytest.mark.timeout(60)
def test_checkpointed_runs_resume_on_warm_workers(tmp_path):
    url = (tmp_path / "store").as_uri()
    opts = {"checkpoint": url, "run_id": "warm", "journal_dir": str(tmp_path / "j")}
    with DistributedExecutor(two_steps(), workers=2, **opts) as ex:
        first = ex.run({"x": 1, "y": 2})
        again = ex.run({"x": 1, "y": 2}, resume=True)
        assert ex.metrics.restored == 2
        assert again == first  # the recorded pids too: nothing ran again


@pytest.mark.timeout(60)
def test_the_threads_backend_needs_no_workers():
    with DistributedExecutor(two_steps(), backend="threads") as ex:
        assert ex.worker_pids == []
        assert ex.run({"x": 1, "y": 2})["b"][1] == 4
    assert processes_below_us() == []


WARM_SCRIPT = """
import sys
from odibi_actor import DAGBuilder, DistributedExecutor

def step(x):
    return x + 1

if __name__ == "__main__":
    b = DAGBuilder()
    b.add_node("s", step, inputs=["x"], outputs=["y"])
    ex = DistributedExecutor(b.build(), workers=2)
    ex.start()  # never closed: the process just ends
    print(ex.run({"x": 1})["y"], *ex.worker_pids, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_program_that_never_closes_leaves_no_worker_behind(tmp_path):
    import subprocess

    script = tmp_path / "warm.py"
    script.write_text(textwrap.dedent(WARM_SCRIPT))
    done = subprocess.run(
        [PYTHON, str(script)], capture_output=True, text=True, timeout=45, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    y, *pids = done.stdout.split()
    assert y == "2" and len(pids) == 2
    assert wait_gone([int(p) for p in pids], 10) == [], "warm workers outlived their program"
