"""Short tasks travel in batches: one scheduler hand-off and one worker message carry many.

Counted, not timed: every message costs both ends CPU, so a trivial task must not cost a
message of its own, whether two workers or many more than the machine's cores run them.
"""

from __future__ import annotations

import os
import time

import pytest

from odibi_actor import DAGBuilder, DistributedExecutor


def plus_one(x):
    return x + 1


def flat(n: int) -> tuple[dict, dict]:
    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"n{i}", plus_one, inputs=["x"], outputs=[f"o{i}"])
    return b.build(), {"x": 1}


def add(a, b):
    return a + b


def layered(layers: int, width: int) -> tuple[dict, dict]:
    """Each node reads two nodes of the layer before, as in scripts/bench.py."""
    b = DAGBuilder()
    for j in range(width):
        b.add_node(f"l0_{j}", plus_one, inputs=["x"], outputs=[f"v0_{j}"])
    for k in range(1, layers):
        for j in range(width):
            ins = [f"v{k - 1}_{j}", f"v{k - 1}_{(j + 1) % width}"]
            b.add_node(f"l{k}_{j}", add, inputs=ins, outputs=[f"v{k}_{j}"])
    return b.build(), {"x": 1}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [2, 8])
@pytest.mark.parametrize("shape", ["flat", "layered"])
def test_short_tasks_travel_many_to_a_message(shape, workers):
    nodes, data = flat(2000) if shape == "flat" else layered(4, 500)
    ex = DistributedExecutor(nodes, workers=workers)
    out = ex.run(data)
    assert len(out) == len(nodes)
    m = ex.metrics
    assert m.dispatches and m.result_batches
    # a task per message would be 2,000 of each; batches of about a millisecond of work
    # (or a worker's queue) hold dozens
    assert len(nodes) / m.dispatches >= 10, f"{m.dispatches} dispatches for {len(nodes)} tasks"
    assert len(nodes) / m.result_batches >= 10, (
        f"{m.result_batches} result messages for {len(nodes)} tasks"
    )


def nap_and_say_where(i):
    time.sleep(1.0)
    return os.getpid()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [2, 4])
def test_long_tasks_are_not_stacked_on_the_first_worker_to_connect(workers):
    """Before any task's duration is known nothing is queued ahead: a worker that connects
    a moment after another still gets one of the long tasks."""
    b = DAGBuilder()
    for i in range(workers):
        b.add_node(f"n{i}", nap_and_say_where, inputs=[f"i{i}"], outputs=[f"o{i}"])
    ex = DistributedExecutor(b.build(), workers=workers)
    out = ex.run({f"i{i}": i for i in range(workers)})
    assert len(set(out.values())) == workers, f"tasks per worker pid: {out}"
