"""Messages between the coordinator's actors. Each carries a batch, never one task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._dag import DAGNode
from ._runner import Outcome


@dataclass(slots=True)
class TaskSpec:
    """One attempt of one node, with its input values (objects or Packed)."""

    tid: int
    attempt: int
    node: DAGNode
    args: list[Any]


@dataclass(slots=True)
class Credit:
    """Dispatcher -> scheduler: room for ``n`` more tasks (credit-based flow control)."""

    n: int


@dataclass(slots=True)
class Dispatch:
    """Scheduler -> dispatcher: run these attempts of run ``run_id``."""

    run_id: str
    tasks: list[TaskSpec]


@dataclass(slots=True)
class Outcomes:
    """Dispatcher -> scheduler: these attempts finished, well or badly."""

    outcomes: list[Outcome]


@dataclass(slots=True)
class Returned:
    """Dispatcher -> scheduler: attempts that never ran to an end and go back to ready.

    ``lost`` marks attempts whose worker died while running them: these count towards
    the node's allowed failures, so a task that kills every worker is not retried forever.
    """

    attempts: list[tuple[int, int]]
    lost: bool
    reason: str = ""


@dataclass(slots=True)
class Abort:
    """Anyone -> scheduler: the run cannot go on (e.g. no worker can be started)."""

    error: BaseException


@dataclass(slots=True)
class RetryDue:
    """Timer -> scheduler: a backoff may have passed."""


@dataclass(slots=True)
class DataLost:
    """Dispatcher -> scheduler: datasets kept on a worker can no longer be had.

    Either everything ``owner`` held (it died, left, or was evicted), or the ``names`` a
    consumer failed to fetch from the data socket at ``endpoint``. ``attempts`` are those
    consumers' attempts: they ended without running and count like attempts whose worker
    died. Executors also send it when fetching a run's outputs at the end failed.
    """

    owner: bytes | None = None
    endpoint: str | None = None
    names: list[str] | None = None
    attempts: list[tuple[int, int]] = field(default_factory=list)
    reason: str = ""


@dataclass(slots=True)
class DropData:
    """Scheduler -> dispatcher: nobody needs these kept datasets any more; free them."""

    run_id: str
    refs: list[Any]  # _dataplane.Ref
