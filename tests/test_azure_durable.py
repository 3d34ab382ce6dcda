"""Durable runs against Azure Blob Storage (az://, on Azurite): kill -9 and resume, cache
hits, an outage in the middle of a run, and two processes sharing one cache."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing
from azurite import Azurite, azurite_server
from conftest import PYTHON, BackgroundRun, wait_for
from test_durable import (
    base_env,
    cache_dag,
    check_racers_share_one_cache,
    kill_half_way,
    lines,
    pipeline_names,
    recorded_done,
    resume_and_check,
    run_cached,
    write_pipeline,
)

from odibi_actor import DAGBuilder, DAGExecutor, DistributedExecutor
from odibi_actor._checkpoint import Checkpoint, apply_records, pick_latest, replay
from odibi_actor.storage import open_storage


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    yield from azurite_server()


@pytest.fixture
def az(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh container on the shared Azurite, its credentials in the environment."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    return f"az://dur{uuid.uuid4().hex[:12]}"


async def newest_checkpoint(url: str, run_id: str) -> tuple[Checkpoint | None, set[str]]:
    """The newest good checkpoint of ``run_id`` in the store, and the result hashes there."""
    async with open_storage(url) as store:
        keys = await store.list(f"runs/{run_id}/checkpoints/")
        picked = pick_latest([(k, await store.get(k)) for k in keys])
        results = {k.rsplit("/", 1)[-1] for k in await store.list("results/")}
    return (picked.checkpoint if picked else None), results


# --- kill -9 and resume -------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_az_kill9_mid_run_then_resume_skips_every_finished_node(tmp_path, az, monkeypatch):
    script = write_pipeline(tmp_path)
    marker, journal = tmp_path / "marker", tmp_path / "journal"
    url = f"{az}/checkpoints"
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker))
    cmd = [PYTHON, str(script), url, "az-run", str(journal)]

    before = kill_half_way([*cmd, "record", str(tmp_path / "o1")], env, marker, tmp_path / "log")
    done_before = recorded_done(url, "az-run", journal)
    resume_and_check(cmd, env, tmp_path, monkeypatch, before, done_before)

    cp, _ = anyio.run(newest_checkpoint, url, "az-run")
    assert cp is not None, "the finished run left no checkpoint in Azure"
    assert cp.done() == pipeline_names()


# --- cache ----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_az_second_run_is_all_cache_hits(tmp_path, az):
    marker = tmp_path / "marker"
    nodes = cache_dag(marker)
    cache = f"{az}/cache"
    first, m1 = run_cached(nodes, cache, tmp_path)
    assert (m1.cache_hits, m1.cache_misses) == (0, 6) and m1.cache_bytes_written > 0
    second, m2 = run_cached(nodes, cache, tmp_path)
    assert (m2.cache_hits, m2.cache_misses) == (6, 0) and m2.cache_bytes_read > 0
    assert len(lines(marker)) == 6
    assert second == first
    # a tiny TTL ignores the entries; entries signed with another secret are refused (HMAC)
    _, m3 = run_cached(nodes, cache, tmp_path, cache_ttl=0.000001)
    assert m3.cache_misses == 6
    signed, m4 = run_cached(nodes, f"{az}/signed", tmp_path, secret=b"k")
    _, m5 = run_cached(nodes, f"{az}/signed", tmp_path, secret=b"other")
    assert (m4.cache_misses, m5.cache_hits, m5.cache_misses) == (6, 0, 6)
    assert signed == first


@pytest.mark.timeout(150)
def test_az_two_processes_running_the_same_dag_share_one_cache(tmp_path, az):
    check_racers_share_one_cache(tmp_path, f"{az}/cache")


# --- an outage in the middle of a run -------------------------------------------------------
OUTAGE_NODES = 40


def slow_step(marker: str, sleep: float, name: str, *inputs: Any) -> Any:
    with open(marker, "a") as f:
        f.write(name + "\n")
    time.sleep(sleep)
    out = {"node": name, "sum": sum(i["sum"] for i in inputs) * 3 + len(name)}
    if len(name) % 2:  # half the results too big to ride inline: stored as blobs
        out["pad"] = name * 1000
    return out


def outage_dag(marker: Path, sleep: float = 0.1) -> dict:
    """A binary tree of 40 nodes: n0 reads the seed, n_i reads n_{(i-1)//2}."""
    step = functools.partial(slow_step, str(marker), sleep)
    b = DAGBuilder()
    b.add_node("n0", functools.partial(step, "n0"), ["seed"], ["d0"])
    for i in range(1, OUTAGE_NODES):
        b.add_node(f"n{i}", functools.partial(step, f"n{i}"), [f"d{(i - 1) // 2}"], [f"d{i}"])
    return b.build()


@pytest.mark.timeout(180)
def test_az_outage_mid_run_completes_queues_locally_and_syncs_when_back(tmp_path, monkeypatch):
    """Azurite stops when a third of the nodes are done. The run must still finish, correctly
    and without waiting on the dead store; the journal must hold what was not uploaded; and
    once the store is back, a resume must reuse everything and upload it, so the store alone
    (a resume on another machine) has the whole run. Azurite keeps data in memory, so
    whatever was uploaded before the outage is gone after the restart: only the journal can
    bring the run back.
    """
    problems: list[str] = []
    marker, journal = tmp_path / "marker", tmp_path / "journal"
    data = {"seed": {"sum": 1}}
    expected = DAGExecutor(outage_dag(tmp_path / "ref-marker", 0.0), workers=2).run(data)
    server_iter = azurite_server()
    server = next(server_iter)
    try:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", server.connection_string)
        url = "az://outage/run"
        nodes = outage_dag(marker)
        opts = {"checkpoint": url, "run_id": "out", "journal_dir": str(journal), "workers": 2}
        ex = DistributedExecutor(nodes, **opts)
        with structlog.testing.capture_logs() as logs:
            run = BackgroundRun(ex, data)
            wait_for(lambda: len(lines(marker)) >= OUTAGE_NODES // 3, 60, "a third of the nodes")
            server.stop()
            stopped = time.monotonic()
            wait_for(lambda: len(lines(marker)) >= OUTAGE_NODES or not run.running, 60, "nodes")
            last_started = time.monotonic()
            run.join(120)
        assert run.error is None, repr(run.error)
        assert run.result == expected
        waited = time.monotonic() - last_started
        if waited > 10:
            problems.append(
                f"the run blocked {waited:.1f}s on the dead store after its last node started"
                f" (outage began {last_started - stopped:.1f}s before that)"
            )
        assert not ex.persistence.synced, "the store was down: the run cannot be synced"
        assert any("journal keeps it" in e["event"] for e in logs), logs

        # the journal holds every completion and every result not uploaded
        records = [r for wal in journal.glob("*.wal") for r in replay(wal)]
        journaled = Checkpoint("", "")
        apply_records(journaled, records)
        blobs = {r["h"] for r in records if r.get("t") == "blob"}
        assert set(journaled.nodes) == set(nodes), (
            f"journal lacks {sorted(set(nodes) - set(journaled.nodes))}"
        )
        lacking = {
            name
            for name, rec in journaled.nodes.items()
            for h in rec.outputs.values()
            if h not in blobs and h not in rec.inline
        }
        assert not lacking, f"the journal lacks results of {sorted(lacking)} (never stored)"
        assert blobs, "no result was big enough to be stored as a blob: the test lost its point"

        server.start()  # same port, empty: the emulator kept its data in memory
        n = len(lines(marker))
        ex2 = DistributedExecutor(nodes, **opts)
        assert ex2.run(data, resume=True) == expected
        assert ex2.metrics.restored == OUTAGE_NODES, "the journal must bring back every node"
        assert len(lines(marker)) == n, "nothing may run again"

        cp, results = anyio.run(newest_checkpoint, url, "out")
        if cp is None or cp.done() != set(nodes):
            problems.append(
                "after the store came back, the resume uploaded no checkpoint of the run"
                if cp is None
                else f"the uploaded checkpoint has {len(cp.done())} of {OUTAGE_NODES} nodes done"
            )
        elif not blobs <= results:
            problems.append(f"{len(blobs - results)} results of the run were never uploaded")

        ex3 = DistributedExecutor(nodes, **{**opts, "journal_dir": str(tmp_path / "elsewhere")})
        assert ex3.run(data, resume=True) == expected
        if ex3.metrics.restored != OUTAGE_NODES:
            problems.append(
                f"a resume from the store alone (no journal) reused {ex3.metrics.restored}"
                f" of {OUTAGE_NODES} nodes: the outage lost the run's progress in storage"
            )
    finally:
        server_iter.close()
    assert not problems, "\n".join(problems)
