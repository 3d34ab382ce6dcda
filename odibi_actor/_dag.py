"""The DAG model: nodes, their wiring, and validation before anything runs."""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CycleError, DAGValidationError, MissingInputError


@dataclass(eq=False, slots=True)
class DAGNode:
    """One step of a pipeline: ``fn(*inputs)`` produces ``outputs``.

    ``dependencies`` and ``dependents`` are node names; ``level`` is the length of the
    longest path from a root, kept for display and odibi_core compatibility only: the
    scheduler never waits for a level to finish.
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    retries: int = 0
    timeout: float | None = None
    retry_delay: float = 0.1
    cache: bool = True  # may be answered from the result cache
    dependencies: set[str] = field(default_factory=set)
    dependents: set[str] = field(default_factory=set)
    level: int = 0

    def __repr__(self) -> str:
        return (
            f"DAGNode({self.name!r}, inputs={list(self.inputs)}, outputs={list(self.outputs)},"
            f" level={self.level})"
        )


# what a builder's own nodes hold until build() wires fresh copies: one shared empty set,
# not two new ones per node (41 MB at 100,000 nodes)
_UNWIRED: Any = frozenset()


class DAGBuilder:
    """Collects nodes with :meth:`add_node`; :meth:`build` wires and validates them."""

    def __init__(self) -> None:
        self._nodes: dict[str, DAGNode] = {}

    def add_node(
        self,
        name: str,
        fn: Callable[..., Any],
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        retries: int = 0,
        timeout: float | None = None,
        retry_delay: float = 0.1,
        cache: bool = True,
    ) -> DAGBuilder:
        """Add a step. ``retries`` extra attempts back off from ``retry_delay`` seconds;
        ``cache=False`` keeps it from being answered from the result cache (side effects)."""
        if not isinstance(name, str) or not name:
            raise DAGValidationError(f"node name must be a non-empty string, got {name!r}")
        if name in self._nodes:
            raise DAGValidationError(f"duplicate node name {name!r}")
        if not callable(fn):
            raise DAGValidationError(
                f"node {name!r}: fn must be callable, got {type(fn).__name__} {fn!r:.80}"
            )
        ins = _names(name, "inputs", inputs)
        outs = _names(name, "outputs", outputs)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise DAGValidationError(f"node {name!r}: retries must be an int >= 0, got {retries!r}")
        if timeout is not None and not (_is_number(timeout) and timeout > 0):
            raise DAGValidationError(f"node {name!r}: timeout must be > 0 seconds, got {timeout!r}")
        if not (_is_number(retry_delay) and retry_delay >= 0):
            raise DAGValidationError(
                f"node {name!r}: retry_delay must be >= 0 seconds, got {retry_delay!r}"
            )
        self._nodes[name] = DAGNode(
            name,
            fn,
            ins,
            outs,
            retries,
            timeout,
            float(retry_delay),
            bool(cache),
            _UNWIRED,
            _UNWIRED,  # build() wires fresh copies
        )
        return self

    def build(self) -> BuiltDAG:
        """Wire dependencies, check for cycles and clashes, and assign levels."""
        return build_dag(self._nodes.values())

    def to_mermaid(self) -> str:
        return to_mermaid(self.build())


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _names(node: str, what: str, values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise DAGValidationError(
            f"node {node!r}: {what} must be a list of names, got the string {values!r}"
        )
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v:
            raise DAGValidationError(f"node {node!r}: {what} must be non-empty strings, got {v!r}")
    seen: set[str] = set()
    for v in out:
        if v in seen:
            raise DAGValidationError(f"node {node!r}: {what} lists {v!r} twice")
        seen.add(v)
    return out


class BuiltDAG(dict[str, DAGNode]):
    """What :func:`build_dag` returns: validated, wired, in topological order, read-only.

    Executors take it as it is; any other mapping of nodes they build again, which for a
    100,000-node DAG costs seconds and a second copy of every node. Its nodes are not to
    be edited either: change the builder and build again.
    """

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a built DAG is read-only: add nodes to the DAGBuilder and build() again")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (dict(self),))


def _rebuilt(items: dict[str, DAGNode]) -> BuiltDAG:
    built = BuiltDAG()
    dict.update(built, items)
    return built


def build_dag(nodes: Iterable[DAGNode]) -> BuiltDAG:
    """Return fresh, wired copies of ``nodes`` keyed by name, in topological order."""
    fresh: dict[str, DAGNode] = {}
    producer: dict[str, str] = {}
    for n in nodes:
        if n.name in fresh:
            raise DAGValidationError(f"duplicate node name {n.name!r}")
        fresh[n.name] = DAGNode(
            n.name,
            n.fn,
            tuple(n.inputs),
            tuple(n.outputs),
            n.retries,
            n.timeout,
            n.retry_delay,
            n.cache,
        )
        for out in n.outputs:
            other = producer.setdefault(out, n.name)
            if other != n.name:
                raise DAGValidationError(
                    f"output {out!r} is produced by two nodes: {other!r} and {n.name!r}"
                )
    for node in fresh.values():
        for inp in node.inputs:
            src = producer.get(inp)
            if src is not None:
                node.dependencies.add(src)
                fresh[src].dependents.add(node.name)
    sorter = graphlib.TopologicalSorter({name: n.dependencies for name, n in fresh.items()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        raise CycleError(list(exc.args[1])) from None
    for name in order:
        node = fresh[name]
        node.level = 1 + max((fresh[d].level for d in node.dependencies), default=-1)
    return _rebuilt({name: fresh[name] for name in order})


def external_inputs(nodes: Mapping[str, DAGNode]) -> dict[str, list[str]]:
    """Inputs no node produces, mapped to the nodes that need them."""
    produced = {out for n in nodes.values() for out in n.outputs}
    needed: dict[str, list[str]] = {}
    for n in nodes.values():
        for inp in n.inputs:
            if inp not in produced:
                needed.setdefault(inp, []).append(n.name)
    return needed


def check_inputs(nodes: Mapping[str, DAGNode], supplied: Iterable[str]) -> None:
    """Raise :class:`MissingInputError` naming every input nobody provides."""
    have = set(supplied)
    produced = {out: n.name for n in nodes.values() for out in n.outputs}
    clashes = [f"{k!r} (produced by {produced[k]!r})" for k in have if k in produced]
    if clashes:
        raise DAGValidationError(
            "initial data may not name a dataset a node produces, or the node's output would"
            " be lost: " + ", ".join(sorted(clashes))
        )
    missing = {k: v for k, v in external_inputs(nodes).items() if k not in have}
    if missing:
        parts = [
            f"{inp!r} (needed by {', '.join(map(repr, users))})" for inp, users in missing.items()
        ]
        raise MissingInputError(
            "inputs neither produced by a node nor given as initial data: " + "; ".join(parts)
        )


def to_mermaid(nodes: Mapping[str, DAGNode]) -> str:
    """Render the DAG as a Mermaid flowchart, edges labelled by dataset."""
    ids = {name: f"n{i}" for i, name in enumerate(nodes)}
    lines = ["flowchart TD"]
    for name in nodes:
        label = name.replace('"', "'")
        lines.append(f'    {ids[name]}["{label}"]')
    producer = {out: n.name for n in nodes.values() for out in n.outputs}
    for node in nodes.values():
        for inp in node.inputs:
            src = producer.get(inp)
            label = inp.replace('"', "'").replace("|", "/")
            if src is not None:
                lines.append(f"    {ids[src]} -->|{label}| {ids[node.name]}")
    return "\n".join(lines)
