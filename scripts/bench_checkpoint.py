"""What checkpointing costs, and how fast a resume loads, on the 10,000-node benchmark.

Builds the layered DAG of scripts/bench.py (10 layers of 1,000 trivial nodes, each reading
two nodes of the layer before) and, in one invocation, runs it on 2 local workers
alternately without and with ``checkpoint=file://...`` (a temporary directory), --repeat
times each. Prints tasks/s of every run, the medians and the overhead (median wall time
with checkpoints / without; the target is <= 1.10).

Then it resumes the last finished checkpointed run and times:

- load: open the store, list and decode the newest checkpoint (pick_latest, checksum
  included) and replay the local journal onto it: the part of a resume that reads the
  checkpoint (target < 1 s);
- open: ``Persistence.open(..., resume)``: the load above plus lineage fingerprints of
  every node and restoring every reusable output from the store;
- resume: the whole ``run(resume=True)`` call, wall time (worker start-up included).

    python scripts/bench_checkpoint.py [--layers 10] [--width 1000] [--workers 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from odibi_actor import DistributedExecutor
from odibi_actor._checkpoint import Checkpoint, apply_records, pick_latest, replay, snapshot_key
from odibi_actor._persist import Persistence
from odibi_actor.storage import open_storage

HERE = Path(__file__).resolve().parent


def load_bench() -> Any:
    """scripts/bench.py, imported as ``bench`` so workers can import its step functions."""
    if "bench" in sys.modules:
        return sys.modules["bench"]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def timed_run(nodes: dict, workers: int, **durable: Any) -> tuple[float, float, Any]:
    ex = DistributedExecutor(nodes, workers=workers, **durable)
    t0 = time.perf_counter()
    out = ex.run({})
    wall = time.perf_counter() - t0
    assert len(out) == len(nodes), f"{len(out)} outputs for {len(nodes)} nodes"
    return wall, ex.metrics.execution_time, ex


async def load_checkpoint(url: str, run_id: str, journal_dir: str) -> tuple[float, int]:
    """What a resume does before restoring outputs: open the store, list the run's
    checkpoints, fetch them, decode the newest good one, replay the journal onto it."""
    t0 = time.perf_counter()
    async with open_storage(url) as store:
        keys = await store.list(snapshot_key(run_id, 0).rsplit("/", 1)[0] + "/")
        blobs = [(k, await store.get(k)) for k in keys]  # as Persistence._load does
        picked = pick_latest(blobs)
        cp = picked.checkpoint if picked is not None else Checkpoint(run_id, "")
        for wal in Path(journal_dir).glob(f"{run_id}-*.wal"):
            apply_records(cp, replay(wal))
    return time.perf_counter() - t0, len(cp.done())


async def persistence_open(nodes: dict, url: str, run_id: str, journal_dir: str) -> float:
    persist = Persistence(
        nodes,
        checkpoint=url,
        run_id=run_id,
        resume=True,
        cache=None,
        cache_ttl=None,
        uncached=frozenset(),
        secret=None,
        journal_dir=journal_dir,
    )
    data: dict[str, Any] = {}
    t0 = time.perf_counter()
    await persist.open(data, packed=True)
    took = time.perf_counter() - t0
    await persist.close()
    assert len(persist.restored) == len(nodes), f"restored {len(persist.restored)}"
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    bench = load_bench()
    nodes = bench.layered_dag(args.layers, args.width).build()
    n = len(nodes)
    walls: dict[str, list[float]] = {"plain": [], "checkpoint": []}
    with tempfile.TemporaryDirectory(prefix="odibi-bench-ckpt-") as tmp:
        url = Path(tmp, "store").as_uri()
        journal_dir = os.path.join(tmp, "journal")
        last_run = ""
        for i in range(args.repeat):
            for kind in ("plain", "checkpoint"):
                durable: dict[str, Any] = {}
                if kind == "checkpoint":
                    last_run = f"bench-{i}-{uuid.uuid4().hex[:6]}"
                    durable = {"checkpoint": url, "run_id": last_run, "journal_dir": journal_dir}
                wall, run_only, ex = timed_run(nodes, args.workers, **durable)
                walls[kind].append(wall)
                extra = ""
                if kind == "checkpoint":
                    synced = ex.persistence.synced if ex.persistence else None
                    extra = f", synced={synced}"
                print(
                    f"{kind:>10} run {i + 1}: {n} nodes, {wall:.2f}s wall, {n / wall:,.0f} tasks/s"
                    f" (run only {n / run_only:,.0f} tasks/s{extra})",
                    flush=True,
                )
        med = {k: statistics.median(v) for k, v in walls.items()}
        ratio = med["checkpoint"] / med["plain"]
        print(
            f"median: without {n / med['plain']:,.0f} tasks/s, with checkpoints"
            f" {n / med['checkpoint']:,.0f} tasks/s; overhead {ratio:.3f}x"
            f" ({(ratio - 1) * 100:+.1f}%, target <= +10%)"
        )

        took, done = anyio.run(load_checkpoint, url, last_run, journal_dir)
        print(
            f"resume load (open store, list + decode newest checkpoint, replay journal):"
            f" {took * 1000:.0f} ms for {done} done nodes (target < 1 s)"
        )
        took = anyio.run(persistence_open, nodes, url, last_run, journal_dir)
        print(
            f"Persistence.open(resume=True) incl. lineage fingerprints and restoring outputs:"
            f" {took * 1000:.0f} ms"
        )
        ex = DistributedExecutor(
            nodes, workers=args.workers, checkpoint=url, run_id=last_run, journal_dir=journal_dir
        )
        t0 = time.perf_counter()
        out = ex.run({}, resume=True)
        wall = time.perf_counter() - t0
        assert len(out) == n and ex.metrics.restored == n, ex.metrics.restored
        resume_s = ex.persistence.resume_seconds if ex.persistence else float("nan")
        print(
            f"full run(resume=True): {wall:.2f}s wall, {ex.metrics.restored} nodes reused"
            f" (its own resume phase: {resume_s * 1000:.0f} ms)"
        )


if __name__ == "__main__":
    main()
