"""odibi-actor: run DAGs of Python pipeline steps in parallel across processes and machines."""

from __future__ import annotations

import structlog as _structlog

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

if not _structlog.is_configured():
    from ._logging import configure_logging as _configure

    _configure(level="warning")  # a library stays quiet unless asked

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
