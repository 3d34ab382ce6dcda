"""Shipping step functions to workers: by import reference when possible, else by value.

A function travels once per run and worker, never per task. By-reference keeps the wire
small and lets a worker use its own installed code; by-value (cloudpickle) covers lambdas,
closures, ``__main__`` and pipeline files that workers cannot import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import cloudpickle

_BY_VALUE: set[str] = set()

FnSpec = tuple[str, Any]  # ("ref", "module:qualname") or ("val", cloudpickle bytes)


def ship_by_value(module: ModuleType) -> None:
    """Send functions of ``module`` by value: workers cannot import it (a loaded file)."""
    _BY_VALUE.add(module.__name__)
    cloudpickle.register_pickle_by_value(module)


def describe(fn: Callable[..., Any]) -> FnSpec:
    """How to send ``fn``: its import path when that resolves to ``fn`` itself."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (
        isinstance(module, str)
        and isinstance(qualname, str)
        and module != "__main__"
        and module.partition(".")[0] not in _BY_VALUE
        and module not in _BY_VALUE
        and "<" not in qualname
    ):
        try:
            if _resolve(module, qualname) is fn:
                return ("ref", f"{module}:{qualname}")
        except Exception:
            pass
    return ("val", cloudpickle.dumps(fn))


def load(spec: FnSpec) -> Callable[..., Any]:
    """Turn a spec back into a callable; raises with the function's name on failure."""
    kind, body = spec
    if kind == "ref":
        module, _, qualname = body.partition(":")
        try:
            return _resolve(module, qualname)
        except Exception as exc:
            raise ImportError(
                f"cannot import step function {body!r} on this worker: {exc!r}"
            ) from None
    if kind == "val":
        return cloudpickle.loads(body)
    raise ValueError(f"unknown function spec kind {kind!r}")


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
