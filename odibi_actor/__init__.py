"""odibi-actor: run DAGs of Python pipeline steps in parallel across processes and machines."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._dag import DAGBuilder, DAGNode, build_dag, to_mermaid
    from ._kernel import Actor, ActorRef, ActorSystem, Policy
    from ._scheduler import Progress
    from ._state import RunState, State
    from .client import (
        Client,
        CoordinatorError,
        CoordinatorUnreachable,
        RunFailed,
        RunHandle,
        RunNotFound,
    )
    from .errors import (
        ActorCrashed,
        BadReturnError,
        CycleError,
        DAGValidationError,
        MissingInputError,
        NodeFailedError,
        NodeTimeoutError,
        OdibiError,
        WorkerLostError,
    )
    from .executor import DAGExecutor, DistributedExecutor
    from .metrics import MetricsManager, NodeMetrics

# Imported on first use: a worker process imports this package too, and must not pay
# for the executor, the client and the storage backends it never uses.
_HOMES = {
    "._dag": ["DAGBuilder", "DAGNode", "build_dag", "to_mermaid"],
    "._kernel": ["Actor", "ActorRef", "ActorSystem", "Policy"],
    "._scheduler": ["Progress"],
    "._state": ["RunState", "State"],
    ".client": [
        "Client",
        "CoordinatorError",
        "CoordinatorUnreachable",
        "RunFailed",
        "RunHandle",
        "RunNotFound",
    ],
    ".errors": [
        "ActorCrashed",
        "BadReturnError",
        "CycleError",
        "DAGValidationError",
        "MissingInputError",
        "NodeFailedError",
        "NodeTimeoutError",
        "OdibiError",
        "WorkerLostError",
    ],
    ".executor": ["DAGExecutor", "DistributedExecutor"],
    ".metrics": ["MetricsManager", "NodeMetrics"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorRef",
    "ActorSystem",
    "BadReturnError",
    "Client",
    "CoordinatorError",
    "CoordinatorUnreachable",
    "CycleError",
    "DAGBuilder",
    "DAGExecutor",
    "DAGNode",
    "DAGValidationError",
    "DistributedExecutor",
    "MetricsManager",
    "MissingInputError",
    "NodeFailedError",
    "NodeMetrics",
    "NodeTimeoutError",
    "OdibiError",
    "Policy",
    "Progress",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "RunState",
    "State",
    "WorkerLostError",
    "build_dag",
    "to_mermaid",
]

__version__ = "0.1.0"
