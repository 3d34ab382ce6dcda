"""DAG validation: everything malformed is refused before any step runs, naming the culprit."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from odibi_actor import (
    CycleError,
    DAGBuilder,
    DAGExecutor,
    DAGNode,
    DAGValidationError,
    DistributedExecutor,
    MissingInputError,
    NodeFailedError,
    build_dag,
)


def ident(x):
    return x


def one():
    return 1


def inc(x):
    return x + 1


def add(a, b):
    return a + b


# --- cycles ------------------------------------------------------------------------------
def test_two_node_cycle_names_the_path():
    b = DAGBuilder()
    b.add_node("a", ident, inputs=["y"], outputs=["x"])
    b.add_node("b", ident, inputs=["x"], outputs=["y"])
    with pytest.raises(CycleError) as info:
        b.build()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b"} and len(cycle) == 3
    assert " -> ".join(cycle) in str(info.value)
    assert re.search(r"\b(a -> b -> a|b -> a -> b)\b", str(info.value))
    assert isinstance(info.value, DAGValidationError)


def test_three_node_cycle_follows_the_data_flow():
    # a feeds b (x), b feeds c (y), c feeds a (z): the reported path follows those edges
    b = DAGBuilder()
    b.add_node("a", ident, inputs=["z"], outputs=["x"])
    b.add_node("b", ident, inputs=["x"], outputs=["y"])
    b.add_node("c", ident, inputs=["y"], outputs=["z"])
    b.add_node("outside", one, outputs=["w"])  # not part of the cycle, must not be named
    with pytest.raises(CycleError) as info:
        b.build()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1] and len(cycle) == 4
    assert "outside" not in cycle
    feeds = {("a", "b"), ("b", "c"), ("c", "a")}
    assert all(edge in feeds for edge in itertools.pairwise(cycle)), cycle
    assert "DAG has a cycle: " + " -> ".join(cycle) in str(info.value)


def test_self_cycle():
    b = DAGBuilder()
    b.add_node("loop", ident, inputs=["x"], outputs=["x"])
    with pytest.raises(CycleError) as info:
        b.build()
    assert info.value.cycle == ["loop", "loop"]
    assert "loop -> loop" in str(info.value)


# --- clashes and bad arguments -----------------------------------------------------------
def test_duplicate_node_name_in_builder():
    b = DAGBuilder().add_node("dup", one, outputs=["x"])
    with pytest.raises(DAGValidationError, match="duplicate node name 'dup'"):
        b.add_node("dup", one, outputs=["y"])


def test_duplicate_node_name_in_build_dag():
    nodes = [DAGNode("dup", one, outputs=("x",)), DAGNode("dup", one, outputs=("y",))]
    with pytest.raises(DAGValidationError, match="duplicate node name 'dup'"):
        build_dag(nodes)


def test_two_producers_of_one_output():
    b = DAGBuilder()
    b.add_node("first", one, outputs=["shared"])
    b.add_node("second", one, outputs=["shared"])
    with pytest.raises(DAGValidationError) as info:
        b.build()
    msg = str(info.value)
    assert "'shared'" in msg and "'first'" in msg and "'second'" in msg


def test_one_node_listing_an_output_twice():
    with pytest.raises(DAGValidationError, match=r"node 'n'.*'x' twice"):
        DAGBuilder().add_node("n", one, outputs=["x", "x"])


@pytest.mark.parametrize("fn", [None, 42, "not a function", [one]])
def test_non_callable_fn(fn):
    with pytest.raises(DAGValidationError, match="node 'bad': fn must be callable"):
        DAGBuilder().add_node("bad", fn, outputs=["x"])


@pytest.mark.parametrize("field", ["outputs", "inputs"])
def test_bare_string_instead_of_a_list(field):
    with pytest.raises(DAGValidationError, match=rf"node 'n': {field} must be a list.*'data'"):
        DAGBuilder().add_node("n", ident, **{field: "data"})


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_node_name(name):
    with pytest.raises(DAGValidationError, match="node name"):
        DAGBuilder().add_node(name, one)


@pytest.mark.parametrize("retries", [-1, 1.5, "2", None, True])
def test_bad_retries(retries):
    with pytest.raises(DAGValidationError, match=r"node 'n': retries must be an int >= 0"):
        DAGBuilder().add_node("n", one, retries=retries)


@pytest.mark.parametrize("timeout", [0, -1, -0.5, True, float("nan")])
def test_bad_timeout_numbers(timeout):
    with pytest.raises(DAGValidationError, match=r"node 'n': timeout must be > 0"):
        DAGBuilder().add_node("n", one, timeout=timeout)


@pytest.mark.parametrize("timeout", ["5", [1]])
def test_bad_timeout_types(timeout):
    # a non-number is as invalid as a negative number: same error class, node named
    with pytest.raises(DAGValidationError, match=r"node 'n': timeout"):
        DAGBuilder().add_node("n", one, timeout=timeout)


@pytest.mark.parametrize("delay", [-0.1, "1", None])
def test_bad_retry_delay(delay):
    with pytest.raises(DAGValidationError, match=r"node 'n': retry_delay"):
        DAGBuilder().add_node("n", one, retry_delay=delay)


def test_good_arguments_are_kept():
    b = DAGBuilder().add_node("n", inc, inputs=["a"], outputs=["b"], retries=2, timeout=1.5)
    node = b.build()["n"]
    assert (node.retries, node.timeout, node.inputs, node.outputs) == (2, 1.5, ("a",), ("b",))


def test_executor_rejects_something_that_is_not_a_dag():
    with pytest.raises(DAGValidationError, match=r"DAGBuilder\.build"):
        DAGExecutor([DAGNode("n", one)])


# --- missing inputs ----------------------------------------------------------------------
def _missing_input_dag(ran: list[str]) -> DAGBuilder:
    def root():
        ran.append("root")
        return 1

    def needs(a, b):
        ran.append("needs")
        return a + b

    b = DAGBuilder()
    b.add_node("root", root, outputs=["a"])
    b.add_node("needs", needs, inputs=["a", "nowhere"], outputs=["c"])
    return b


def test_missing_input_is_raised_before_any_node_runs():
    ran: list[str] = []
    ex = DAGExecutor(_missing_input_dag(ran).build())
    with pytest.raises(MissingInputError) as info:
        ex.run()
    assert "'nowhere'" in str(info.value) and "'needs'" in str(info.value)
    assert ran == []
    # supplying it makes the same DAG run
    assert ex.run({"nowhere": 10}) == {"a": 1, "c": 11}
    assert ran == ["root", "needs"]


def write_marker(path):
    Path(path).write_text("ran")
    return 1


def test_missing_input_distributed_starts_no_worker(tmp_path):
    marker = tmp_path / "ran"
    b = DAGBuilder()
    b.add_node("root", write_marker, inputs=["path"], outputs=["a"])
    b.add_node("needs", add, inputs=["a", "ghost"], outputs=["c"])
    ex = DistributedExecutor(b.build(), workers=2)
    with pytest.raises(MissingInputError, match=r"'ghost'.*'needs'"):
        ex.run({"path": str(marker)})
    assert not marker.exists()
    assert ex.worker_pids == []


# --- run-time return shapes --------------------------------------------------------------
def _run_single(fn, outputs):
    b = DAGBuilder().add_node("shape", fn, outputs=outputs)
    return DAGExecutor(b.build(), workers=1).run()


def test_single_output_takes_any_value_as_is():
    assert _run_single(lambda: (1, 2, 3), ["only"]) == {"only": (1, 2, 3)}
    assert _run_single(lambda: {"k": 1}, ["only"]) == {"only": {"k": 1}}


def test_two_outputs_from_a_three_tuple_fails_naming_the_node():
    with pytest.raises(NodeFailedError) as info:
        _run_single(lambda: (1, 2, 3), ["a", "b"])
    assert info.value.node == "shape"
    assert "BadReturnError" in str(info.value)
    assert "node 'shape' declares 2 outputs" in str(info.value)
    assert "tuple of 3" in str(info.value)


def test_two_outputs_from_a_scalar_fails():
    with pytest.raises(NodeFailedError, match="node 'shape' declares 2 outputs"):
        _run_single(lambda: 5, ["a", "b"])


def test_dict_with_wrong_keys_fails_naming_node_and_keys():
    with pytest.raises(NodeFailedError) as info:
        _run_single(lambda: {"a": 1, "zzz": 2}, ["a", "b"])
    msg = str(info.value)
    assert info.value.node == "shape"
    assert "dict whose keys do not match" in msg
    assert "missing ['b']" in msg and "unexpected ['zzz']" in msg


def test_dict_with_the_right_keys_and_tuple_both_work():
    assert _run_single(lambda: {"b": 2, "a": 1}, ["a", "b"]) == {"a": 1, "b": 2}
    assert _run_single(lambda: [1, 2], ["a", "b"]) == {"a": 1, "b": 2}


def test_no_outputs_ignores_the_return_value():
    assert _run_single(lambda: "ignored", []) == {}


# --- structure ---------------------------------------------------------------------------
def diamond() -> dict[str, DAGNode]:
    b = DAGBuilder()
    b.add_node("top", one, outputs=["t"])
    b.add_node("left", inc, inputs=["t"], outputs=["l"])
    b.add_node("right", inc, inputs=["t"], outputs=["r"])
    b.add_node("bottom", add, inputs=["l", "r"], outputs=["out"])
    return b.build()


def test_diamond_wiring_and_levels():
    nodes = diamond()
    assert nodes["top"].dependencies == set()
    assert nodes["top"].dependents == {"left", "right"}
    assert nodes["left"].dependencies == {"top"} and nodes["left"].dependents == {"bottom"}
    assert nodes["right"].dependencies == {"top"} and nodes["right"].dependents == {"bottom"}
    assert nodes["bottom"].dependencies == {"left", "right"}
    assert nodes["bottom"].dependents == set()
    assert {n: nodes[n].level for n in nodes} == {"top": 0, "left": 1, "right": 1, "bottom": 2}
    order = list(nodes)
    assert order.index("top") < order.index("left") < order.index("bottom")
    assert order.index("right") < order.index("bottom")


def test_level_is_the_longest_path():
    b = DAGBuilder()
    b.add_node("a", one, outputs=["x"])
    b.add_node("b", inc, inputs=["x"], outputs=["y"])
    b.add_node("c", inc, inputs=["y"], outputs=["z"])
    b.add_node("short", add, inputs=["x", "z"], outputs=["w"])  # a->short and a->b->c->short
    assert b.build()["short"].level == 3


def test_build_returns_fresh_copies():
    b = DAGBuilder()
    b.add_node("a", one, outputs=["x"])
    b.add_node("b", inc, inputs=["x"], outputs=["y"])
    first, second = b.build(), b.build()
    assert first["a"] is not second["a"]
    assert first["a"].dependents == {"b"} and second["a"].dependents == {"b"}
    rebuilt = build_dag(first.values())
    assert rebuilt["a"].dependents == {"b"}  # wiring is not doubled up or lost


def test_diamond_runs_on_threads():
    assert DAGExecutor(diamond()).run() == {"t": 1, "l": 2, "r": 2, "out": 4}


def test_to_mermaid():
    b = DAGBuilder()
    b.add_node("top", one, outputs=["t"])
    b.add_node("left", inc, inputs=["t"], outputs=["l"])
    b.add_node("right", inc, inputs=["t"], outputs=["r"])
    b.add_node("bottom", add, inputs=["l", "r", "ext"], outputs=["out"])
    text = b.to_mermaid()
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    ids = {}
    for line in lines[1:]:
        m = re.fullmatch(r'\s+(n\d+)\["([^"]+)"\]', line)
        if m:
            ids[m.group(2)] = m.group(1)
    assert set(ids) == {"top", "left", "right", "bottom"}
    edges = set()
    for line in lines[1:]:
        m = re.fullmatch(r"\s+(n\d+) -->\|([^|]+)\| (n\d+)", line)
        if m:
            edges.add((m.group(1), m.group(2), m.group(3)))
    assert edges == {
        (ids["top"], "t", ids["left"]),
        (ids["top"], "t", ids["right"]),
        (ids["left"], "l", ids["bottom"]),
        (ids["right"], "r", ids["bottom"]),
    }


# --- scale -------------------------------------------------------------------------------
N_CHAIN = 100_000


@pytest.mark.timeout(240)
def test_hundred_thousand_node_chain_builds_and_runs_on_threads():
    b = DAGBuilder()
    b.add_node("n0", inc, inputs=["d0"], outputs=["d1"])
    for i in range(1, N_CHAIN):
        b.add_node(f"n{i}", inc, inputs=[f"d{i}"], outputs=[f"d{i + 1}"])
    nodes = b.build()
    assert len(nodes) == N_CHAIN
    assert nodes["n0"].level == 0
    assert nodes[f"n{N_CHAIN - 1}"].level == N_CHAIN - 1
    assert max(n.level for n in nodes.values()) == N_CHAIN - 1
    assert nodes["n500"].dependencies == {"n499"}
    ex = DAGExecutor(nodes, workers=2)
    out = ex.run({"d0": 0})
    assert out[f"d{N_CHAIN}"] == N_CHAIN
    assert len(out) == N_CHAIN
    assert ex.metrics.node_count == N_CHAIN
    assert all(m.status == "done" for m in ex.metrics.nodes.values())
