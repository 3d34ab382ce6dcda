"""Throughput of the engine on a layered DAG of trivial tasks.

10 layers of 1,000 nodes; each node reads two nodes of the previous layer. Prints tasks
per second for the processes backend (and, with --compare-threads, the threads backend
measured in the same invocation).

    python scripts/bench.py [--layers 10] [--width 1000] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from odibi_actor import DAGBuilder, DistributedExecutor


def seed() -> int:
    return 1


def combine(a: int, b: int) -> int:
    return a + b


def layered_dag(layers: int, width: int) -> DAGBuilder:
    b = DAGBuilder()
    for i in range(width):
        b.add_node(f"n0_{i}", seed, outputs=[f"d0_{i}"])
    for layer in range(1, layers):
        for i in range(width):
            a, c = f"d{layer - 1}_{i}", f"d{layer - 1}_{(i + 1) % width}"
            b.add_node(f"n{layer}_{i}", combine, inputs=[a, c], outputs=[f"d{layer}_{i}"])
    return b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    nodes = layered_dag(args.layers, args.width).build()
    n = len(nodes)
    rates = []
    for _ in range(args.repeat):
        ex = DistributedExecutor(nodes, workers=args.workers)
        t0 = time.perf_counter()
        out = ex.run()
        wall = time.perf_counter() - t0
        assert len(out) == n
        rates.append(n / wall)
        print(
            f"{n} nodes on {args.workers} workers: {wall:.2f}s wall, {n / wall:,.0f} tasks/s"
            f" (run only: {n / ex.metrics.execution_time:,.0f} tasks/s)"
        )
    print(f"best: {max(rates):,.0f} tasks/s")


if __name__ == "__main__":
    main()
