"""Durable runs end to end, on local disk (file://): checkpoints, kill -9 and resume, changed
and foreign DAGs, corrupt checkpoints, history, the result cache, HMAC signing, the CLI.

The kill -9 tests run a pipeline script in a subprocess (its step functions travel by value),
kill the coordinator half way, and resume it. What "finished before the kill" means is read
from what the killed run left behind: its local write-ahead journal and any snapshot in the
store. A node in there must not run again; a node that was running at the kill may.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import signal
import subprocess
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest
import structlog.testing
from conftest import PYTHON, kill_tree, load_module, wait_for, wait_gone, worker_children

import odibi_actor.executor as executor_module
from odibi_actor import DAGBuilder, DAGExecutor, DistributedExecutor
from odibi_actor._cache import entry_key
from odibi_actor._checkpoint import (
    Checkpoint,
    apply_records,
    decode_checkpoint,
    decode_result,
    encode_result,
    pick_latest,
    replay,
)
from odibi_actor._fingerprint import content_hash
from odibi_actor._persist import Persistence, ResumeError
from odibi_actor._wire import Packed, pack
from odibi_actor.errors import NodeFailedError
from odibi_actor.storage import open_storage

TESTS = Path(__file__).resolve().parent

# --- the pipeline the kill tests run ---------------------------------------------------------
# 30 nodes: src, then 14 layers of 2 (each node reads both nodes of the layer before), then
# sink. Every execution appends the node's name to $ODIBI_TEST_MARKER and sleeps 0.1-0.2 s
# (times $ODIBI_TEST_SLEEP_SCALE). Run as a script it is the Python API; `odibi run` loads it
# as a CLI target.
PIPELINE = """
import functools
import json
import os
import pickle
import sys
import time

from odibi_actor import DAGBuilder, DistributedExecutor

WIDTH, DEPTH = 2, 14


def step(name, *inputs):
    with open(os.environ["ODIBI_TEST_MARKER"], "a") as f:
        f.write(name + "\\n")
    scale = float(os.environ.get("ODIBI_TEST_SLEEP_SCALE", "1"))
    time.sleep(scale * (0.1 + (sum(map(ord, name)) % 11) / 100))
    total = sum(v for _, v in inputs)
    value = (name, (total * 31 + sum(map(ord, name))) % 1_000_003)
    if name == "sink" and os.environ.get("ODIBI_TEST_RESULT"):
        with open(os.environ["ODIBI_TEST_RESULT"], "w") as f:
            json.dump({"inputs": [list(i) for i in inputs], "value": list(value)}, f)
    return value


def dag():
    b = DAGBuilder()
    b.add_node("src", functools.partial(step, "src"), inputs=["seed"], outputs=["d_src"])
    prev = ["d_src"]
    for k in range(DEPTH):
        cur = []
        for j in range(WIDTH):
            name = f"n{k}_{j}"
            b.add_node(name, functools.partial(step, name), inputs=prev, outputs=["d_" + name])
            cur.append("d_" + name)
        prev = cur
    b.add_node("sink", functools.partial(step, "sink"), inputs=prev, outputs=["d_sink"])
    return b.build()


def initial_data():
    return {"seed": ("seed", 5)}


if __name__ == "__main__":
    url, run_id, journal_dir, mode, out = sys.argv[1:6]
    ex = DistributedExecutor(
        dag(), workers=2, checkpoint=url, run_id=run_id, journal_dir=journal_dir
    )
    result = ex.run(initial_data(), resume=mode == "resume")
    with open(out, "wb") as f:
        pickle.dump({"out": result, "restored": ex.metrics.restored}, f)
"""
NODES = 30


def pipeline_names() -> set[str]:
    return {"src", "sink"} | {f"n{k}_{j}" for k in range(14) for j in range(2)}


def write_pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline30.py"
    path.write_text(PIPELINE)
    return path


def reference_outputs(script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """What an uninterrupted run computes (in this process, threads, no sleeping)."""
    mod = load_module(script, f"pipeline_ref_{os.getpid()}_{time.monotonic_ns()}")
    monkeypatch.setenv("ODIBI_TEST_MARKER", str(tmp_path / "reference-marker"))
    monkeypatch.setenv("ODIBI_TEST_SLEEP_SCALE", "0")
    monkeypatch.delenv("ODIBI_TEST_RESULT", raising=False)
    out = DAGExecutor(mod.dag(), workers=2).run(mod.initial_data())
    assert len(out) == NODES
    return out


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a subprocess: state, cache and journals under tmp_path, no secret."""
    env = {k: v for k, v in os.environ.items() if k != "ODIBI_SECRET"}
    env.update(
        XDG_STATE_HOME=str(tmp_path / "xdg-state"),
        XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
        COLUMNS="250",  # rich wraps the summary at 80 columns otherwise
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def recorded_done(url: str, run_id: str, journal_dir: Path, secret: bytes | None = None) -> set:
    """Nodes a (killed) run had recorded as finished: newest good snapshot + its journal."""

    async def snapshots() -> list[tuple[str, bytes]]:
        async with open_storage(url) as store:
            keys = await store.list(f"runs/{run_id}/checkpoints/")
            return [(k, await store.get(k)) for k in keys]

    picked = pick_latest(anyio.run(snapshots), secret)
    cp = picked.checkpoint if picked is not None else Checkpoint(run_id, "")
    for wal in sorted(journal_dir.rglob("*.wal")):
        apply_records(cp, replay(wal))
    return cp.done()


def journal_nodes(journal_dir: Path) -> list[str]:
    cp = Checkpoint("", "")
    for wal in sorted(journal_dir.rglob("*.wal")):
        apply_records(cp, replay(wal))
    return list(cp.nodes)


def cli(
    args: list[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "odibi_actor.cli", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def kill_half_way(cmd: list[str], env: dict[str, str], marker: Path, log: Path) -> list[str]:
    """Start ``cmd``; once about half the nodes have started, kill -9 it. Its worker
    processes must die with it. Returns the marker lines written before the kill."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: len(lines(marker)) >= NODES // 2 or proc.poll() is not None,
            60,
            "half the nodes to start",
        )
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
        workers = [p.pid for p in worker_children(proc.pid)]
        assert len(workers) == 2, f"expected 2 local workers, found {workers}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert wait_gone(workers, 10) == [], "workers outlived their killed coordinator"
    finally:
        kill_tree(proc)
    return lines(marker)


def check_resume_after_kill(
    before: list[str], after: list[str], done_before: set[str], restored: int
) -> None:
    """The resumed run ran exactly the nodes the killed one had not recorded, once each."""
    names = pipeline_names()
    assert 10 <= len(done_before) < NODES, f"kill was not half way: {sorted(done_before)}"
    assert done_before <= set(before), "recorded as done but never started?"
    in_flight = set(before) - done_before
    assert len(in_flight) <= 4, f"too many started-but-unrecorded nodes: {sorted(in_flight)}"
    again = sorted(set(after) & done_before)
    assert not again, f"nodes finished before the kill ran again on resume: {again}"
    assert sorted(after) == sorted(names - done_before), "resume must run each other node once"
    assert restored == len(done_before)


def resume_and_check(
    cmd: list[str],
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    before: list[str],
    done_before: set[str],
) -> None:
    """Resume the killed run of write_pipeline's script: it must exit cleanly, run just
    what was not recorded, and produce the uninterrupted run's outputs."""
    script, marker = Path(cmd[1]), Path(env["ODIBI_TEST_MARKER"])
    proc = subprocess.run(
        [*cmd, "resume", str(tmp_path / "o2")], env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = pickle.loads((tmp_path / "o2").read_bytes())
    check_resume_after_kill(before, lines(marker)[len(before) :], done_before, result["restored"])
    assert result["out"] == reference_outputs(script, tmp_path, monkeypatch)


# --- kill -9 of the coordinator, then resume -------------------------------------------------
@pytest.mark.timeout(90)
def test_kill9_mid_run_then_resume_skips_every_finished_node(tmp_path, monkeypatch):
    script = write_pipeline(tmp_path)
    marker, journal = tmp_path / "marker", tmp_path / "journal"
    url = (tmp_path / "store").as_uri()
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker))
    cmd = [PYTHON, str(script), url, "kill-run", str(journal)]

    before = kill_half_way([*cmd, "record", str(tmp_path / "o1")], env, marker, tmp_path / "log1")
    assert not (tmp_path / "o1").exists()
    done_before = recorded_done(url, "kill-run", journal)
    # the journal alone must know them: the default snapshot interval (5 s) had not passed
    assert set(journal_nodes(journal)) == done_before

    proc = subprocess.run(
        [*cmd, "resume", str(tmp_path / "o2")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = pickle.loads((tmp_path / "o2").read_bytes())
    after = lines(marker)[len(before) :]
    check_resume_after_kill(before, after, done_before, result["restored"])
    assert result["out"] == reference_outputs(script, tmp_path, monkeypatch)


@pytest.mark.timeout(90)
def test_cli_kill9_then_resume_reports_reused_nodes(tmp_path, monkeypatch):
    script = write_pipeline(tmp_path)
    marker = tmp_path / "marker"
    url = (tmp_path / "store").as_uri()
    env = base_env(
        tmp_path, ODIBI_TEST_MARKER=str(marker), ODIBI_TEST_RESULT=str(tmp_path / "sink.json")
    )
    args = ["run", str(script), "--checkpoint", url, "--run-id", "cli-run", "--workers", "2"]
    args += ["--no-progress", "--no-cache"]
    cmd = [PYTHON, "-m", "odibi_actor.cli", *args]

    before = kill_half_way(cmd, env, marker, tmp_path / "log1")
    journal = tmp_path / "xdg-state" / "odibi-actor" / "journal"
    assert journal.is_dir(), "the CLI keeps its journal under $XDG_STATE_HOME"
    done_before = recorded_done(url, "cli-run", journal)

    proc = cli([*args, "--resume"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = one_line(proc.stdout)
    assert f"resumed: {len(done_before)} nodes reused" in out, out[-500:]
    assert f"done: {NODES} nodes" in out
    after = lines(marker)[len(before) :]
    check_resume_after_kill(before, after, done_before, len(done_before))

    ref = reference_outputs(script, tmp_path, monkeypatch)
    sink = json.loads((tmp_path / "sink.json").read_text())
    assert sink["inputs"] == [list(ref["d_n13_0"]), list(ref["d_n13_1"])]
    assert sink["value"] == list(ref["d_sink"])


@pytest.mark.timeout(90)
def test_resume_from_the_journal_leaves_the_store_complete(tmp_path, monkeypatch):
    """After kill -9 and a resume that finishes the run, the store alone must hold the run:
    resuming it again from another machine (an empty journal directory) reuses every node."""
    script = write_pipeline(tmp_path)
    marker = tmp_path / "marker"
    url = (tmp_path / "store").as_uri()
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker))
    cmd = [PYTHON, str(script), url, "sync-run"]
    journal = str(tmp_path / "journal")

    kill_half_way([*cmd, journal, "record", str(tmp_path / "o1")], env, marker, tmp_path / "log")
    done_before = recorded_done(url, "sync-run", tmp_path / "journal")
    proc = subprocess.run(
        [*cmd, journal, "resume", str(tmp_path / "o2")], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    async def snapshot_and_results() -> tuple[Checkpoint, set[str]]:
        async with open_storage(url) as store:
            keys = await store.list("runs/sync-run/checkpoints/")
            picked = pick_latest([(k, await store.get(k)) for k in keys])
            assert picked is not None, "no checkpoint in the store after the resumed run"
            results = {k.rsplit("/", 1)[-1] for k in await store.list("results/")}
            return picked.checkpoint, results

    cp, results = anyio.run(snapshot_and_results)
    assert cp.done() == pipeline_names()
    missing = sorted(
        name
        for name, rec in cp.nodes.items()
        for h in rec.outputs.values()
        if h not in results and h not in rec.inline
    )
    assert not missing, (
        f"the newest checkpoint names results the store does not have, of nodes {missing}"
        f" (the {len(done_before)} restored from the journal were: {sorted(done_before)})"
    )

    n = len(lines(marker))
    fresh = str(tmp_path / "other-machine-journal")
    proc = subprocess.run(
        [*cmd, fresh, "resume", str(tmp_path / "o3")], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines(marker)[n:] == [], "a resume of a finished run ran nodes again"
    result = pickle.loads((tmp_path / "o3").read_bytes())
    assert result["restored"] == NODES
    assert result["out"] == reference_outputs(script, tmp_path, monkeypatch)


# --- changed DAG, another DAG ---------------------------------------------------------------
STEPS = """
MARKER = {marker!r}


def _mark(name):
    with open(MARKER, "a") as f:
        f.write(name + "\\n")


def load(x):
    _mark("load")
    return x + 1


def left(a):
    _mark("left")
    return a * 2{tweak}


def scale(a, k):
    _mark("right")
    return a * k


def join(left, right):
    _mark("join")
    return left + right


def tail(j):
    _mark("tail")
    return j - 1


def other(a):
    _mark("other")
    return -a
"""


def steps_dag(mod: types.ModuleType, k: int) -> dict:
    b = DAGBuilder()
    b.add_node("load", mod.load, inputs=["x"], outputs=["a"])
    b.add_node("left", mod.left, inputs=["a"], outputs=["l"])
    b.add_node("right", functools.partial(mod.scale, k=k), inputs=["a"], outputs=["r"])
    b.add_node("join", mod.join, inputs=["l", "r"], outputs=["j"])
    b.add_node("tail", mod.tail, inputs=["j"], outputs=["t"])
    b.add_node("other", mod.other, inputs=["a"], outputs=["o"])
    return b.build()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", ["source", "parameter"])
def test_changed_node_and_its_descendants_run_again_nothing_else(tmp_path, change):
    marker = tmp_path / "marker"
    path = tmp_path / "durable_steps.py"
    path.write_text(STEPS.format(marker=str(marker), tweak=""))
    mod = load_module(path, "durable_steps")
    opts = {
        "checkpoint": (tmp_path / "store").as_uri(),
        "run_id": "changed",
        "journal_dir": str(tmp_path / "journal"),
        "workers": 2,
    }
    first = DAGExecutor(steps_dag(mod, 3), **opts).run({"x": 4})
    assert first == {"a": 5, "l": 10, "r": 15, "j": 25, "t": 24, "o": -5}
    n = len(lines(marker))

    if change == "source":  # same module, same function name, another body
        path.write_text(STEPS.format(marker=str(marker), tweak=" + 100"))
        mod = load_module(path, "durable_steps")
        nodes, rerun = steps_dag(mod, 3), {"left", "join", "tail"}
        expected = {"a": 5, "l": 110, "r": 15, "j": 125, "t": 124, "o": -5}
    else:  # a bound parameter of one node
        nodes, rerun = steps_dag(mod, 7), {"right", "join", "tail"}
        expected = {"a": 5, "l": 10, "r": 35, "j": 45, "t": 44, "o": -5}
    ex = DAGExecutor(nodes, **opts)
    assert ex.run({"x": 4}, resume=True) == expected
    assert sorted(lines(marker)[n:]) == sorted(rerun)
    assert ex.metrics.restored == 6 - len(rerun)
    assert {n for n, m in ex.metrics.nodes.items() if m.status == "restored"} == (
        set(nodes) - rerun
    )


def other_dag() -> dict:
    b = DAGBuilder()
    b.add_node("alpha", abs, inputs=["x"], outputs=["ax"])
    b.add_node("beta", abs, inputs=["ax"], outputs=["bx"])
    return b.build()


@pytest.mark.timeout(60)
def test_resuming_another_dag_is_refused_clearly(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "durable_steps.py"
    path.write_text(STEPS.format(marker=str(marker), tweak=""))
    mod = load_module(path, "durable_steps_other")
    opts = {
        "checkpoint": (tmp_path / "store").as_uri(),
        "run_id": "mine",
        "journal_dir": str(tmp_path / "journal"),
    }
    DAGExecutor(steps_dag(mod, 3), **opts).run({"x": 4})
    n = len(lines(marker))
    with pytest.raises(ResumeError, match="another DAG") as info:
        DAGExecutor(other_dag(), **opts).run({"x": -3}, resume=True)
    assert "mine" in str(info.value)
    assert len(lines(marker)) == n
    # the refused resume changed nothing: the right DAG still resumes in full
    ex = DAGExecutor(steps_dag(mod, 3), **opts)
    assert ex.run({"x": 4}, resume=True)["t"] == 24
    assert ex.metrics.restored == 6 and len(lines(marker)) == n


OTHER_TARGET = """
from odibi_actor import DAGBuilder


def dag():
    b = DAGBuilder()
    b.add_node("alpha", abs, inputs=["x"], outputs=["ax"])
    b.add_node("beta", abs, inputs=["ax"], outputs=["bx"])
    return b


def initial_data():
    return {"x": -3}
"""


@pytest.mark.timeout(60)
def test_cli_resuming_another_dag_exits_2_with_a_clear_message(tmp_path):
    script = write_pipeline(tmp_path)
    other = tmp_path / "other.py"
    other.write_text(OTHER_TARGET)
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(tmp_path / "m"), ODIBI_TEST_SLEEP_SCALE="0")
    url = (tmp_path / "store").as_uri()
    common = ["--checkpoint", url, "--run-id", "shared", "--no-progress", "--no-cache"]
    common += ["--backend", "threads", "--workers", "2"]
    first = cli(["run", str(script), *common], env)
    assert first.returncode == 0, first.stderr[-2000:]
    proc = cli(["run", str(other), *common, "--resume"], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = one_line(proc.stderr)
    assert "another DAG" in err and "Traceback" not in proc.stderr, err


# --- a failed run -------------------------------------------------------------------------
def flaky(marker: str, flag: str, name: str, *inputs: int) -> int:
    with open(marker, "a") as f:
        f.write(name + "\n")
    if name == "b" and os.path.exists(flag):
        raise RuntimeError("b fails while the flag file exists")
    return sum(inputs) + len(name)


@pytest.mark.timeout(60)
def test_failed_run_is_snapshotted_and_resumes_after_the_fix(tmp_path):
    """A run that fails still stores a snapshot (not only the journal); after the cause is
    fixed, a resume runs only what had not finished."""
    marker, flag, store = tmp_path / "marker", tmp_path / "fail", tmp_path / "store"
    flag.touch()
    step = functools.partial(flaky, str(marker), str(flag))
    b = DAGBuilder()
    b.add_node("a", functools.partial(step, "a"), ["x"], ["ya"])
    b.add_node("b", functools.partial(step, "b"), ["ya"], ["yb"])
    b.add_node("c", functools.partial(step, "c"), ["yb"], ["yc"])
    b.add_node("d", functools.partial(step, "d"), ["ya"], ["yd"])
    b.add_node("e", functools.partial(step, "e"), ["yd", "yb"], ["ye"])
    nodes = b.build()
    opts = {"checkpoint": store.as_uri(), "run_id": "fail", "journal_dir": str(tmp_path / "j")}
    with pytest.raises(NodeFailedError, match="'b'"):
        DistributedExecutor(nodes, workers=2, **opts).run({"x": 1})
    (snapshot,) = checkpoint_files(store, "fail")
    done = decode_checkpoint(snapshot.read_bytes()).done()
    assert "a" in done and not done & {"b", "c", "e"}, done
    assert journal_nodes(tmp_path / "j") == [], "the snapshot should have emptied the journal"

    flag.unlink()
    n = len(lines(marker))
    ex = DistributedExecutor(nodes, workers=2, **opts)
    out = ex.run({"x": 1}, resume=True)
    assert sorted(lines(marker)[n:]) == sorted(set(nodes) - done)
    assert ex.metrics.restored == len(done)
    assert out == {"ya": 2, "yb": 3, "yc": 4, "yd": 3, "ye": 7}


# --- corrupt checkpoints, history -----------------------------------------------------------
def snapshot_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot after every completion (the executor exposes no knob for the cadence)."""
    monkeypatch.setattr(
        executor_module, "Persistence", functools.partial(Persistence, every=1, interval=0.05)
    )


def marking(marker: Path) -> Callable[..., Any]:
    def inc(name: str, v: int) -> int:
        with open(marker, "a") as f:
            f.write(name + "\n")
        time.sleep(0.02)
        return v + 1

    return inc


def chain(marker: Path, n: int, prefix: str = "c") -> dict:
    inc = marking(marker)
    b = DAGBuilder()
    prev = "x"
    for i in range(n):
        b.add_node(f"{prefix}{i}", functools.partial(inc, f"{prefix}{i}"), [prev], [f"v{i}"])
        prev = f"v{i}"
    return b.build()


def checkpoint_files(store: Path, run_id: str) -> list[Path]:
    return sorted((store / "runs" / run_id / "checkpoints").glob("*.ckpt"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(
    tmp_path, monkeypatch, damage
):
    snapshot_often(monkeypatch)
    marker, store = tmp_path / "marker", tmp_path / "store"
    opts = {"checkpoint": store.as_uri(), "run_id": "c1", "journal_dir": str(tmp_path / "j")}
    nodes = chain(marker, 8)
    expected = DAGExecutor(nodes, **opts).run({"x": 0})
    assert expected == {f"v{i}": i + 1 for i in range(8)}
    assert journal_nodes(tmp_path / "j") == [], "the final snapshot should empty the journal"
    files = checkpoint_files(store, "c1")
    assert len(files) >= 2, files
    newest, previous = files[-1], files[-2]
    good = decode_checkpoint(previous.read_bytes())
    assert decode_checkpoint(newest.read_bytes()).done() == set(nodes)
    assert good.done() < set(nodes), "need a previous checkpoint with less done"

    blob = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(blob[: len(blob) // 2])
    else:
        b = bytearray(blob)
        for i in range(40, len(b), 97):
            b[i] ^= 0x5A
        newest.write_bytes(bytes(b))
    n = len(lines(marker))
    ex = DAGExecutor(nodes, **opts)
    with structlog.testing.capture_logs() as logs:
        assert ex.run({"x": 0}, resume=True) == expected
    fallbacks = [e for e in logs if "falling back" in e["event"]]
    assert fallbacks, logs
    assert fallbacks[0]["log_level"] == "warning" and newest.name in fallbacks[0]["key"]
    assert "corrupt" in fallbacks[0]["event"]
    assert ex.metrics.restored == len(good.done())
    assert sorted(lines(marker)[n:]) == sorted(set(nodes) - good.done())


@pytest.mark.timeout(60)
def test_cli_corrupt_only_checkpoint_warns_and_reruns_without_a_traceback(tmp_path):
    script = write_pipeline(tmp_path)
    marker = tmp_path / "m"
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker), ODIBI_TEST_SLEEP_SCALE="0")
    store = tmp_path / "store"
    common = ["--checkpoint", store.as_uri(), "--run-id", "bad", "--no-progress", "--no-cache"]
    common += ["--backend", "threads", "--workers", "2"]
    assert cli(["run", str(script), *common], env).returncode == 0
    (only,) = checkpoint_files(store, "bad")
    only.write_bytes(only.read_bytes()[:-7])
    proc = cli(["run", str(script), *common, "--resume"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "checkpoint corrupt" in proc.stderr, proc.stderr
    assert "resumed: 0 nodes reused" in one_line(proc.stdout)
    assert len(lines(marker)) == 2 * NODES


@pytest.mark.timeout(60)
def test_history_keeps_the_last_three_checkpoints_and_the_newest(tmp_path, monkeypatch):
    snapshot_often(monkeypatch)
    store = tmp_path / "store"
    nodes = chain(tmp_path / "marker", 10)
    opts = {"checkpoint": store.as_uri(), "run_id": "h", "journal_dir": str(tmp_path / "j")}
    DAGExecutor(nodes, **opts).run({"x": 0})
    files = checkpoint_files(store, "h")
    seqs = [decode_checkpoint(f.read_bytes()).seq for f in files]
    assert len(files) == 3, [f.name for f in files]
    assert seqs == [seqs[-1] - 2, seqs[-1] - 1, seqs[-1]] and seqs[-1] >= 4, seqs
    assert decode_checkpoint(files[-1].read_bytes()).done() == set(nodes)


@pytest.mark.timeout(60)
def test_fresh_run_under_a_reused_run_id_keeps_its_own_newest_checkpoint(tmp_path, monkeypatch):
    """Recording a new run under a run id that already has checkpoints (no --resume: start
    over) must leave that new run's checkpoint as the newest: never deleted, and the one a
    resume of the run id picks."""
    snapshot_often(monkeypatch)
    store = tmp_path / "store"
    opts = {"checkpoint": store.as_uri(), "run_id": "again", "journal_dir": str(tmp_path / "j")}
    DAGExecutor(chain(tmp_path / "m1", 8, prefix="old"), **opts).run({"x": 0})
    new_nodes = chain(tmp_path / "m2", 3, prefix="new")
    DAGExecutor(new_nodes, **opts).run({"x": 0})
    files = checkpoint_files(store, "again")
    newest = decode_checkpoint(files[-1].read_bytes())
    assert newest.done() == set(new_nodes), (
        f"the newest checkpoint ({files[-1].name}) is the old run's: "
        f"{sorted(newest.done())}; the new run's checkpoints were pruned or shadowed"
    )
    ex = DAGExecutor(new_nodes, **opts)
    ex.run({"x": 0}, resume=True)
    assert ex.metrics.restored == 3


# --- signed checkpoints ---------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_checkpoint_signed_with_one_secret_is_refused_with_another(tmp_path):
    marker, store = tmp_path / "marker", tmp_path / "s"
    nodes = chain(marker, 4)
    opts = {"checkpoint": store.as_uri(), "run_id": "sig", "journal_dir": str(tmp_path)}
    expected = DAGExecutor(nodes, secret=b"k1", **opts).run({"x": 0})
    for secret, reason in [(b"k2", "HMAC mismatch"), (None, "no cluster secret")]:
        n = len(lines(marker))
        ex = DAGExecutor(nodes, secret=secret, **opts)
        with structlog.testing.capture_logs() as logs:
            assert ex.run({"x": 0}, resume=True) == expected
        assert ex.metrics.restored == 0, secret
        assert len(lines(marker)) == n + 4, "every node must run again"
        assert any(reason in str(e.get("reason")) for e in logs), logs
    # Those refused resumes recorded checkpoints of their own (under k2, then unsigned).
    # The one signed with k1 must have survived them: a resume with k1 refuses the two newer
    # ones (the unsigned one: "not signed") and falls back to it.
    files = [f.name for f in checkpoint_files(store, "sig")]
    n = len(lines(marker))
    ex = DAGExecutor(nodes, secret="k1", **opts)  # a str secret is the same secret
    with structlog.testing.capture_logs() as logs:
        assert ex.run({"x": 0}, resume=True) == expected
    assert ex.metrics.restored == 4, (
        f"the checkpoint signed with k1 was lost to the refused resumes (store has {files})"
    )
    assert len(lines(marker)) == n
    assert any("not signed" in str(e.get("reason")) for e in logs), logs


# --- the result cache -----------------------------------------------------------------------
def cache_dag(marker: Path, uncached: str | None = None) -> dict:
    """x -> a -> b -> c <- d <- y, and x -> e -> f: six nodes with dict/bytes outputs; e keeps
    only the parity of x, so f's input can stay the same when x changes."""
    step = marking_values(marker)
    b = DAGBuilder()
    spec = [
        ("a", ["x"], ["ya"]),
        ("b", ["ya"], ["yb"]),
        ("d", ["y"], ["yd"]),
        ("c", ["yb", "yd"], ["yc"]),
        ("e", ["x"], ["ye"]),
        ("f", ["ye"], ["yf"]),
    ]
    for name, ins, outs in spec:
        b.add_node(name, functools.partial(step, name), ins, outs, cache=name != uncached)
    return b.build()


def marking_values(marker: Path) -> Callable[..., Any]:
    def step(name: str, *inputs: Any) -> Any:
        with open(marker, "a") as f:
            f.write(name + "\n")
        if name == "e":  # depends on x's parity only
            return {"parity": inputs[0] % 2}
        if name == "f":
            return {"f": inputs[0]["parity"] * 10, "blob": b"f" * 5000}
        return {
            "node": name,
            "inputs": [repr(i)[:200] for i in inputs],
            "blob": name.encode() * 999,
        }

    return step


BACKENDS = {"processes": DistributedExecutor, "threads": DAGExecutor}


def run_cached(
    nodes: dict, cache: str, tmp_path: Path, backend: str = "processes", data=None, **kw: Any
) -> tuple[dict, Any]:
    ex = BACKENDS[backend](nodes, workers=2, cache=cache, journal_dir=str(tmp_path / "j"), **kw)
    out = ex.run(data if data is not None else {"x": 1, "y": 10})
    return out, ex.metrics


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_second_run_is_all_cache_hits(tmp_path, backend):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker)
    cache = (tmp_path / "cache").as_uri()
    first, m1 = run_cached(nodes, cache, tmp_path, backend)
    assert (m1.cache_hits, m1.cache_misses) == (0, 6)
    assert m1.cache_bytes_written > 6 * 999 and m1.cache_bytes_read == 0
    n = len(lines(marker))
    assert n == 6
    second, m2 = run_cached(nodes, cache, tmp_path, backend)
    assert (m2.cache_hits, m2.cache_misses) == (6, 0)
    assert len(lines(marker)) == n, "a cache hit must not execute the node"
    assert all(m.cached for m in m2.nodes.values())
    assert m2.cache_bytes_read > 6 * 999 and m2.cache_bytes_written == 0
    assert second == first, "outputs restored from the cache differ from computed ones"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
@pytest.mark.parametrize(
    ("kw", "resume", "match"),
    [
        ({"cache": "nope://x"}, False, "unsupported storage URL scheme 'nope'"),
        ({"checkpoint": "s3://b/x", "run_id": "r"}, False, "unsupported storage URL scheme"),
        ({"checkpoint": "file:///tmp/x"}, True, "run id"),
        ({"checkpoint": "file:///tmp/x", "run_id": "a/b"}, False, "run id 'a/b'"),
    ],
    ids=["cache scheme", "checkpoint scheme", "resume without run id", "run id path"],
)
def test_bad_durable_settings_raise_a_plain_value_error(tmp_path, backend, kw, resume, match):
    """Not an ExceptionGroup from the workers' task group: callers catch ValueError."""
    nodes = cache_dag(tmp_path / "marker")
    ex = BACKENDS[backend](nodes, workers=1, journal_dir=str(tmp_path / "j"), **kw)
    with pytest.raises(ValueError, match=match):
        ex.run({"x": 1, "y": 2}, resume=resume)
    assert not (tmp_path / "marker").exists(), "nothing may run"


def nap_and_pass(*xs: Any) -> Any:
    time.sleep(0.01)
    return sum(xs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_fan_out_wider_than_the_workers_misses_the_cache_and_completes(tmp_path, backend):
    """Nodes the cache cannot answer still need worker slots: a fan-out of more ready nodes
    than the workers take at once must neither stall nor overfill them."""
    b = DAGBuilder()
    b.add_node("src", nap_and_pass, inputs=["seed"], outputs=["s"])
    for i in range(40):
        b.add_node(f"n{i}", nap_and_pass, inputs=["s"], outputs=[f"o{i}"])
    b.add_node("final", nap_and_pass, inputs=[f"o{i}" for i in range(40)], outputs=["result"])
    cache = (tmp_path / "cache").as_uri()
    for seed, misses in ((1, 42), (1, 0), (2, 42)):
        out, m = run_cached(b.build(), cache, tmp_path, backend, data={"seed": seed})
        assert out["result"] == 40 * seed
        assert m.cache_misses == misses and m.cache_hits == 42 - misses


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_node_with_cache_false_always_runs(tmp_path, backend):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker, uncached="c")
    cache = (tmp_path / "cache").as_uri()
    first, _ = run_cached(nodes, cache, tmp_path, backend)
    n = len(lines(marker))
    second, m = run_cached(nodes, cache, tmp_path, backend)
    assert lines(marker)[n:] == ["c"]
    assert m.cache_hits == 5 and not m.nodes["c"].cached
    assert second == first


def np_step(marker: str, name: str, *inputs: Any) -> Any:
    with open(marker, "a") as f:
        f.write(name + "\n")
    if name == "make":
        return np.arange(inputs[0], dtype=np.float64) * 1.5, {"n": inputs[0]}
    if name == "half":
        return inputs[0][::2] + inputs[1]["n"]
    return float(inputs[0].sum())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_numpy_outputs_hit_the_cache_all_the_way_down(tmp_path, backend):
    """Arrays travel as out-of-band buffers: a hit restores them, and the nodes reading
    them must hit too (their inputs' content hashes must not change on the way)."""
    marker = tmp_path / "marker"
    step = functools.partial(np_step, str(marker))
    b = DAGBuilder()
    b.add_node("make", functools.partial(step, "make"), ["n"], ["arr", "meta"])
    b.add_node("half", functools.partial(step, "half"), ["arr", "meta"], ["h"])
    b.add_node("total", functools.partial(step, "total"), ["h"], ["t"])
    nodes = b.build()
    cache = (tmp_path / "cache").as_uri()
    first, _ = run_cached(nodes, cache, tmp_path, backend, data={"n": 50_000})
    second, m = run_cached(nodes, cache, tmp_path, backend, data={"n": 50_000})
    assert np.array_equal(second["arr"], first["arr"]) and second["meta"] == {"n": 50_000}
    assert np.array_equal(second["h"], first["h"]) and second["t"] == first["t"]
    assert len(lines(marker)) == 3, f"ran again: {lines(marker)[3:]}"
    assert (m.cache_hits, m.cache_misses) == (3, 0)


@pytest.mark.timeout(60)
def test_cache_ttl_expires_entries(tmp_path):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker)
    cache = (tmp_path / "cache").as_uri()
    first, _ = run_cached(nodes, cache, tmp_path)
    _, m = run_cached(nodes, cache, tmp_path, cache_ttl=3600)
    assert m.cache_hits == 6
    time.sleep(0.01)
    again, m = run_cached(nodes, cache, tmp_path, cache_ttl=0.000001)
    assert (m.cache_hits, m.cache_misses) == (0, 6)
    assert len(lines(marker)) == 12
    assert again == first
    # expired entries are replaced by what the run computed, so the TTL starts again
    time.sleep(2.2)
    _, m = run_cached(nodes, cache, tmp_path, cache_ttl=2)
    assert (m.cache_hits, m.cache_misses) == (0, 6)
    _, m = run_cached(nodes, cache, tmp_path, cache_ttl=2)
    assert (m.cache_hits, m.cache_misses) == (6, 0)


@pytest.mark.timeout(60)
def test_changed_input_data_misses_for_its_consumers_only(tmp_path):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker)
    cache = (tmp_path / "cache").as_uri()
    run_cached(nodes, cache, tmp_path, data={"x": 1, "y": 10})
    n = len(lines(marker))
    # x changes; its parity does not, so e's output (and f's key) stays the same
    out, m = run_cached(nodes, cache, tmp_path, data={"x": 3, "y": 10})
    assert sorted(lines(marker)[n:]) == ["a", "b", "c", "e"]
    assert {name for name, nm in m.nodes.items() if nm.cached} == {"d", "f"}
    assert (m.cache_hits, m.cache_misses) == (2, 4)
    assert out["ya"]["inputs"] == ["3"] and out["yf"]["f"] == 10


@pytest.mark.timeout(60)
def test_purge_keeps_results_that_a_signed_entry_it_cannot_read_may_use(tmp_path):
    """Without the secret, purge cannot read a signed entry, so it cannot know which
    results that entry uses: an old result stays rather than leave a young entry dangling."""
    from odibi_actor._cache import cached_result_key, purge
    from odibi_actor._checkpoint import encode_result
    from odibi_actor.storage import open_storage

    value = pack(b"shared result" * 100)
    h = content_hash(value)
    root = tmp_path / "cache"

    async def main() -> tuple[int, int]:
        async with open_storage(root.as_uri()) as store:
            await store.put(cached_result_key(h), encode_result(value, b"secret"))
            await store.put(entry_key("old"), encode_result(pack(b"x"), b"secret"))
            entry = encode_result(Packed(msgpack.packb([h]), []), b"secret")
            await store.put(entry_key("young"), entry)
            week_ago = time.time() - 7 * 86400
            for key in (cached_result_key(h), entry_key("old")):
                os.utime(root / key, (week_ago, week_ago))
            purged = await purge(store, older_than=86400)
            assert await store.exists(cached_result_key(h))
            assert await store.exists(entry_key("young"))
            return purged

    assert anyio.run(main) == (1, 0)


@pytest.mark.timeout(60)
def test_cache_purge_cli_then_the_next_run_misses(tmp_path):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker)
    cache = (tmp_path / "cache").as_uri()
    env = base_env(tmp_path)
    first, _ = run_cached(nodes, cache, tmp_path)
    proc = cli(["cache", "purge", "--cache", cache, "--older-than", "1d"], env)
    assert proc.returncode == 0, proc.stderr
    assert "purged 0 cache entries and 0 results" in one_line(proc.stdout)
    _, m = run_cached(nodes, cache, tmp_path)
    assert m.cache_hits == 6
    proc = cli(["cache", "purge", "--cache", cache], env)
    assert proc.returncode == 0, proc.stderr
    assert "purged 6 cache entries and 6 results" in one_line(proc.stdout), proc.stdout
    again, m = run_cached(nodes, cache, tmp_path)
    assert (m.cache_hits, m.cache_misses) == (0, 6)
    assert len(lines(marker)) == 12 and again == first
    proc = cli(["cache", "purge", "--cache", cache, "--older-than", "soon"], env)
    assert proc.returncode == 2 and "--older-than" in proc.stderr


CACHE_TARGET = """
import os
from odibi_actor import DAGBuilder


def step(x):
    with open(os.environ["ODIBI_TEST_MARKER"], "a") as f:
        f.write("step\\n")
    return [x] * 1000


def total(xs):
    with open(os.environ["ODIBI_TEST_MARKER"], "a") as f:
        f.write("total\\n")
    return sum(xs)


def dag():
    b = DAGBuilder()
    b.add_node("step", step, inputs=["x"], outputs=["xs"])
    b.add_node("total", total, inputs=["xs"], outputs=["t"])
    return b


initial_data = {"x": 7}
"""


@pytest.mark.timeout(60)
def test_cli_summary_shows_cache_hits_misses_and_bytes(tmp_path):
    target = tmp_path / "cached_target.py"
    target.write_text(CACHE_TARGET)
    marker = tmp_path / "marker"
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker))
    args = ["run", str(target), "--workers", "2", "--no-progress"]
    first = cli(args, env)  # the default cache: $XDG_CACHE_HOME/odibi-actor
    assert first.returncode == 0, first.stderr
    assert "cache: 0 hits, 2 misses, 0 B read, " in one_line(first.stdout), first.stdout
    assert (tmp_path / "xdg-cache" / "odibi-actor" / "cache" / "entries").is_dir()
    second = cli(args, env)
    assert second.returncode == 0, second.stderr
    line = one_line(second.stdout)
    assert "cache: 2 hits, 0 misses, " in line and ", 0 B written" in line, line
    assert " 0 B read" not in line
    assert len(lines(marker)) == 2
    third = cli([*args, "--no-cache"], env)
    assert third.returncode == 0 and "cache:" not in third.stdout
    assert len(lines(marker)) == 4


# --- signed cache entries -------------------------------------------------------------------
class Bomb:
    """Unpickling this writes a file: proof of whether anything was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path(self.path).write_text, ("boom",))


def fan_dag(marker: Path) -> dict:
    step = marking_values(marker)
    b = DAGBuilder()
    for name in ("p", "q", "r"):
        b.add_node(name, functools.partial(step, name), ["x"], [f"y{name}"])
    return b.build()


def forge_cache(cache_dir: Path, bomb: Bomb, secret: bytes | None) -> None:
    """Point every entry at a pickled bomb, stored under its true content hash: a forgery
    as consistent as an attacker without the right secret can make."""
    payload = pack(bomb)
    h = content_hash(payload)
    result = cache_dir / "cache" / "results" / h[:2] / h
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_bytes(encode_result(payload, secret))
    entries = [e for e in (cache_dir / "cache" / "entries").rglob("*") if e.is_file()]
    assert len(entries) == 3
    for entry in entries:
        assert entry.relative_to(cache_dir).as_posix() == entry_key(entry.name)
        entry.write_bytes(encode_result(Packed(msgpack.packb([h]), []), secret))


@pytest.mark.timeout(90)
def test_tampered_cached_results_are_refused_and_recomputed_never_unpickled(tmp_path):
    marker, boom = tmp_path / "marker", tmp_path / "exploded"
    nodes = fan_dag(marker)
    cache_dir = tmp_path / "cache"
    cache = cache_dir.as_uri()
    signed = {"secret": b"k"}
    expected, m = run_cached(nodes, cache, tmp_path, **signed)
    assert m.cache_misses == 3

    results = [p for p in (cache_dir / "cache" / "results").rglob("*") if p.is_file()]
    assert len(results) == 3
    for p in results:  # one flipped byte in the pickled payload of each stored result
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x01
        p.write_bytes(bytes(b))
    with structlog.testing.capture_logs() as logs:
        out, m = run_cached(nodes, cache, tmp_path, **signed)
    assert out == expected and (m.cache_hits, m.cache_misses) == (0, 3)
    assert len(lines(marker)) == 6
    assert any("cache unreadable" in e["event"] for e in logs), logs

    for forger in (None, b"not the cluster secret"):
        forge_cache(cache_dir, Bomb(str(boom)), forger)
        n = len(lines(marker))
        out, m = run_cached(nodes, cache, tmp_path, **signed)
        assert not boom.exists(), "a forged cache blob was unpickled"
        assert out == expected and m.cache_hits == 0
        assert len(lines(marker)) == n + 3

    # control: the same unsigned forgery, read by a run without a secret, goes off. Checksums
    # catch accidents, not attackers: that is what the secret is for.
    forge_cache(cache_dir, Bomb(str(boom)), None)
    run_cached(nodes, cache, tmp_path)
    assert boom.exists(), "the control forgery should have been unpickled without a secret"


# --- two processes, one cache ---------------------------------------------------------------
RACER = """
import functools, hashlib, json, os, sys, time
from odibi_actor import DAGBuilder, DistributedExecutor


def make(name, *inputs):
    time.sleep(0.05)
    h = hashlib.sha256(name.encode())
    for i in inputs:
        h.update(i[:64])
    return h.digest() * 8000  # 256 KB


def dag():
    b = DAGBuilder()
    for i in range(6):
        b.add_node(f"root{i}", functools.partial(make, f"root{i}"), ["seed"], [f"r{i}"])
    for i in range(6):
        ins = [f"r{i}", f"r{(i + 1) % 6}"]
        b.add_node(f"join{i}", functools.partial(make, f"join{i}"), ins, [f"j{i}"])
    return b.build()


if __name__ == "__main__":
    url, out, journal = sys.argv[1:4]
    nodes = dag()
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    time.sleep(max(0.0, start - time.time()))
    ex = DistributedExecutor(nodes, workers=2, cache=url, journal_dir=journal)
    res = ex.run({"seed": b"seed"})
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in res.items()}
    m = ex.metrics
    with open(out, "w") as f:
        json.dump({"out": digests, "hits": m.cache_hits, "misses": m.cache_misses}, f)
"""


def run_racers(tmp_path: Path, url: str, env: dict[str, str], n: int, tag: str) -> list[dict]:
    """``n`` processes run the racer DAG against ``url``, all starting at the same moment;
    returns their reports (outputs' digests, cache hits and misses)."""
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    procs = []
    for i in range(n):
        with open(tmp_path / f"{tag}{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [PYTHON, str(script), url, str(tmp_path / f"{tag}{i}.json"), str(tmp_path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    text=True,
                )
            )
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        start = time.time() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        for i, p in enumerate(procs):
            p.communicate(timeout=60)
            assert p.returncode == 0, (tmp_path / f"{tag}{i}.log").read_text()[-3000:]
    finally:
        for p in procs:
            kill_tree(p)
    return [json.loads((tmp_path / f"{tag}{i}.json").read_text()) for i in range(n)]


def racer_reference(tmp_path: Path) -> dict[str, str]:
    mod = load_module(tmp_path / "racer.py", f"racer_ref_{time.monotonic_ns()}")
    ref = DAGExecutor(mod.dag(), workers=2).run({"seed": b"seed"})
    return {k: hashlib.sha256(v).hexdigest() for k, v in ref.items()}


def check_cache_intact(url: str, reference: dict[str, str]) -> None:
    async def scan() -> tuple[int, int]:
        async with open_storage(url) as store:
            entries = await store.list("cache/entries/")
            used = set()
            for key in entries:
                hashes = msgpack.unpackb(decode_result(await store.get(key)).data)
                assert len(hashes) == 1
                used.update(hashes)
            for h in used:
                decode_result(await store.get(f"cache/results/{h[:2]}/{h}"), expected_hash=h)
            return len(entries), len(used)

    entries, results = anyio.run(scan)
    assert entries == len(reference) and results == len(reference)


def check_racers_share_one_cache(tmp_path: Path, cache: str) -> None:
    """Two processes run the same cached DAG at once, then a third: every run is right,
    the entries stay intact, and the third is all hits."""
    env = base_env(tmp_path)
    reports = run_racers(tmp_path, cache, env, 2, "race")
    reference = racer_reference(tmp_path)
    for r in reports:
        assert r["out"] == reference
        assert r["hits"] + r["misses"] == 12
    # whether the two runs overlapped depends on scheduling; the put_if_absent race itself
    # is forced deterministically in tests/test_storage.py
    check_cache_intact(cache, reference)
    (third,) = run_racers(tmp_path, cache, env, 1, "third")
    assert third["out"] == reference
    assert (third["hits"], third["misses"]) == (12, 0)


@pytest.mark.timeout(120)
def test_two_processes_running_the_same_dag_share_one_cache(tmp_path):
    check_racers_share_one_cache(tmp_path, (tmp_path / "cache").as_uri())
