"""Durable state for one run: what the scheduler tells the ledger and the cache.

The scheduler stays in charge of the run; this object only answers two questions for it,
synchronously and cheaply: "may this ready node be answered from the cache?" and "what
must be recorded now that this node is done?". The answer to the second is a local
journal append (the ledger); all storage I/O happens in the recorder and cache actors, so
finishing a node never waits on the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._dag import DAGNode
from ._fingerprint import cache_key, content_hash
from ._kernel import ActorRef
from ._messages import TaskSpec
from ._recorder import Completion, Ledger, SyncDue
from ._wire import Packed, pack

CACHE_WORKER = "cache"  # the worker name of an outcome answered from the cache


@dataclass(slots=True)
class Lookup:
    """Scheduler -> cache: answer these attempts from the cache if their key is there."""

    run_id: str
    items: list[tuple[TaskSpec, str]]  # (spec, cache key)


@dataclass(slots=True)
class CacheMiss:
    """Cache -> scheduler: not cached; dispatch them to workers."""

    specs: list[TaskSpec]


@dataclass(slots=True)
class Store:
    """Scheduler -> cache: a computed node's outputs, under its key."""

    key: str
    hashes: list[str]
    values: list[Packed]


@dataclass
class RunDurability:
    """Per-run bookkeeping: content hashes of datasets, cache keys of running attempts."""

    fingerprints: Mapping[str, str]  # node -> lineage fingerprint
    ledger: Ledger | None = None  # journals completions; its recorder syncs them
    recorder: ActorRef[Any] | None = None
    cache: ActorRef[Any] | None = None
    uncached: frozenset[str] = frozenset()  # nodes with cache=False
    hashes: dict[str, str] = field(default_factory=dict)  # dataset -> content hash
    keys: dict[int, str] = field(default_factory=dict)  # tid -> cache key of its attempt
    _done: list[Completion] = field(default_factory=list)

    @property
    def unflushed(self) -> bool:
        """Completions taken but not journaled yet: :meth:`flush` is due."""
        return bool(self._done)

    def hash_inputs(self, data: Mapping[str, Any]) -> None:
        for name, value in data.items():
            if name not in self.hashes:
                self.hashes[name] = content_hash(
                    value if isinstance(value, Packed) else pack(value)
                )

    def split(self, run_id: str, specs: list[TaskSpec]) -> list[TaskSpec]:
        """Send cacheable attempts to the cache; return those that go straight to workers."""
        if self.cache is None:
            return specs
        direct, lookups = [], []
        for spec in specs:
            node = spec.node
            if node.name in self.uncached or not node.outputs:
                direct.append(spec)
                continue
            key = cache_key(self.fingerprints[node.name], [self.hashes[i] for i in node.inputs])
            self.keys[spec.tid] = key
            lookups.append((spec, key))
        if lookups:
            self.cache.tell(Lookup(run_id, lookups))
        return direct

    def completed(
        self,
        node: DAGNode,
        tid: int,
        attempt: int,
        duration: float,
        values: tuple[Any, ...],
        cached: bool,
        known: tuple[str | None, ...] | None = None,
    ) -> None:
        """Hash a finished node's outputs; record it, and cache it if it was computed.

        ``known`` are hashes computed already (None where not): by the worker, for big
        outputs (in parallel, off this event loop), or carried by a cache hit (a value pickled
        twice need not pickle to the same bytes, and keys must not drift).
        """
        if self.ledger is None and self.cache is None:
            return
        if self.cache is None:  # nothing needs the hashes before the ledger hashes them
            self._done.append((node.name, attempt, duration, node.outputs, values, known))
            return
        packed = [v if type(v) is Packed else pack(v) for v in values]  # pickled once
        hashes = [(known[i] if known else None) or content_hash(p) for i, p in enumerate(packed)]
        self.hashes.update(zip(node.outputs, hashes, strict=True))  # dependents' cache keys
        if self.ledger is not None:
            self._done.append((node.name, attempt, duration, node.outputs, packed, hashes))
        key = self.keys.pop(tid, None)
        if key is not None and not cached:
            # per output, in order: equal outputs share a hash but each has its slot
            self.cache.tell(Store(key, hashes, packed))

    def flush(self) -> None:
        """Journal what finished since the last flush: one local append, however many
        nodes; the recorder hears of it only when a snapshot is due.

        The scheduler calls this once the work these completions made ready has gone out,
        so hashing and journaling overlap with the workers running it."""
        if self._done and self.ledger is not None:
            done, self._done = self._done, []
            if self.ledger.record(done) and self.recorder is not None:
                self.recorder.tell(SyncDue())
