"""Exceptions users can catch. Each names the node, input or key at fault."""

from __future__ import annotations


class OdibiError(Exception):
    """Base class of every error odibi-actor raises on purpose."""


class DAGValidationError(OdibiError, ValueError):
    """The DAG is malformed; raised before anything runs."""


class CycleError(DAGValidationError):
    """The DAG has a cycle; ``cycle`` is the path, first node repeated at the end."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__("DAG has a cycle: " + " -> ".join(cycle))


class MissingInputError(DAGValidationError):
    """An input is neither produced by a node nor given as initial data."""


class NodeFailedError(OdibiError):
    """A node failed on its last attempt; carries the remote traceback text."""

    def __init__(
        self, node: str, attempts: int, error: str, traceback: str = "", worker: str | None = None
    ) -> None:
        self.node = node
        self.attempts = attempts
        self.error = error
        self.traceback = traceback
        self.worker = worker
        where = f" on worker {worker}" if worker else ""
        plural = "attempt" if attempts == 1 else "attempts"
        msg = f"node {node!r} failed after {attempts} {plural}{where}: {error}"
        if traceback:
            msg += "\n\nRemote traceback:\n" + traceback.rstrip()
        super().__init__(msg)


class NodeTimeoutError(OdibiError, TimeoutError):
    """An attempt ran past its node's ``timeout``."""


class BadReturnError(OdibiError, TypeError):
    """A node returned a value that does not match its declared outputs."""


class ActorCrashed(OdibiError):
    """An actor died with no policy to restart it; the run is taken down."""


class WorkerLostError(OdibiError):
    """Every worker process exited before the run finished."""
