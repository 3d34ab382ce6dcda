"""The step calling convention: inputs go in positionally, outputs come back by shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import BadReturnError


def call_step(
    node: str, fn: Callable[..., Any], args: Sequence[Any], outputs: Sequence[str]
) -> tuple[Any, ...]:
    """Call ``fn(*args)`` and return one value per declared output, in order."""
    return split_outputs(node, outputs, fn(*args))


def split_outputs(node: str, outputs: Sequence[str], value: Any) -> tuple[Any, ...]:
    """One output: the value itself. Several: a tuple/list or a dict keyed by output name."""
    n = len(outputs)
    if n == 0:
        return ()
    if n == 1:
        return (value,)
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != set(outputs):
            missing = [o for o in outputs if o not in keys]
            extra = sorted(map(str, keys - set(outputs)))
            raise BadReturnError(
                f"node {node!r} returned a dict whose keys do not match its outputs"
                f" {list(outputs)}: missing {missing}, unexpected {extra}"
            )
        return tuple(value[o] for o in outputs)
    if isinstance(value, tuple | list):
        if len(value) != n:
            raise BadReturnError(
                f"node {node!r} declares {n} outputs {list(outputs)} but returned"
                f" a {type(value).__name__} of {len(value)}"
            )
        return tuple(value)
    raise BadReturnError(
        f"node {node!r} declares {n} outputs {list(outputs)} but returned a single"
        f" {type(value).__name__}; return a tuple or a dict keyed by output name"
    )
