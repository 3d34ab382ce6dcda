"""Loading a pipeline for the CLI from a module path or a ``.py`` file.

A pipeline module exposes ``dag``: a DAGBuilder, the dict ``build()`` returns, or a
zero-argument function returning either; and optionally ``initial_data``: a dict or a
zero-argument function returning one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._dag import DAGBuilder, DAGNode, build_dag
from ._functions import ship_by_value
from .errors import OdibiError


class TargetError(OdibiError):
    """The CLI target cannot be loaded or does not expose a pipeline."""


@dataclass
class Pipeline:
    name: str
    nodes: dict[str, DAGNode]
    initial_data: dict[str, Any]


def load_target(target: str) -> Pipeline:
    module = _import(target)
    dag = getattr(module, "dag", None)
    if dag is None:
        raise TargetError(
            f"{target!r} has no 'dag': define dag() returning DAGBuilder().build(), or a"
            " module-level DAGBuilder named dag"
        )
    try:
        value = dag() if callable(dag) and not isinstance(dag, DAGBuilder) else dag
        if isinstance(value, DAGBuilder):
            nodes = value.build()
        elif isinstance(value, dict):
            nodes = build_dag(value.values())
        else:
            raise TargetError(
                f"{target}.dag gave a {type(value).__name__}; expected a DAGBuilder or the"
                " dict DAGBuilder.build() returns"
            )
        init = getattr(module, "initial_data", None)
        data = init() if callable(init) else dict(init or {})
    except OdibiError:
        raise
    except Exception as exc:
        raise TargetError(f"building the pipeline in {target!r} failed: {exc!r}") from exc
    if not isinstance(data, dict):
        raise TargetError(f"{target}.initial_data must be a dict, got {type(data).__name__}")
    return Pipeline(target, nodes, data)


def _import(target: str) -> ModuleType:
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise TargetError(f"pipeline file not found: {target}")
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # so the file can import its neighbours
        name = "odibi_target_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot load {target} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise TargetError(f"importing {target} failed: {exc!r}") from exc
        ship_by_value(module)  # workers cannot import a file by this made-up name
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise TargetError(
                f"no module named {target!r}; give an importable module path or a .py file"
            ) from None
        raise TargetError(f"importing {target} failed: {exc!r}") from exc
    except Exception as exc:
        raise TargetError(f"importing {target} failed: {exc!r}") from exc
