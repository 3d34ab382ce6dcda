"""The cache actor: a content-addressed cache of node results, across runs.

A node's key is its own fingerprint (function identity and source, parameters, input and
output names) plus the content hashes of its inputs, so an unchanged node with unchanged
inputs is answered from storage instead of running. Results are stored once each under
their content hash, and an entry (key -> output hashes) is written with a conditional put:
two runs computing the same key at the same time cannot corrupt it, the first one wins and
both are right. Blobs carry a checksum, or an HMAC with a cluster secret, checked before
anything is unpickled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgpack

from ._checkpoint import IntegrityError, decode_result, encode_result, result_key
from ._durable import CACHE_WORKER, CacheMiss, Lookup, Store
from ._kernel import Actor, ActorRef
from ._logging import get_logger
from ._messages import Outcomes
from ._runner import Outcome
from ._wire import Packed, unpack
from .metrics import MetricsManager
from .storage import Storage, StorageError

log = get_logger("odibi_actor.cache")


@dataclass(slots=True)
class Drain:
    """Ask: wait until every result handed to the cache is written (end of run)."""

    timeout: float = 30.0


def entry_key(key: str) -> str:
    return f"cache/entries/{key[:2]}/{key}"


def cached_result_key(content: str) -> str:
    """Cache results live apart from checkpoint results, so a purge never breaks a resume."""
    return "cache/" + result_key(content)


class Cache(Actor):
    def __init__(
        self,
        store: Storage,
        scheduler: Callable[[], ActorRef[Any]],
        metrics: MetricsManager,
        *,
        ttl: float | None = None,
        secret: bytes | None = None,
        packed: bool = True,
    ) -> None:
        self.packed = packed  # False for the threads backend, which passes plain objects
        self.store = store
        self._scheduler = scheduler
        self.metrics = metrics
        self.ttl = ttl
        self.secret = secret
        self._warned = False
        self.storing = 0  # Store messages still being written
        self._stored = anyio.Event()

    async def on_message(self, message: Any) -> Any:
        if isinstance(message, Lookup):
            self.start_task(lambda: self._lookup(message))
        elif isinstance(message, Store):
            self.storing += 1
            self.start_task(lambda: self._store(message))
        elif isinstance(message, Drain):
            with anyio.move_on_after(message.timeout):
                while self.storing:
                    await self._stored.wait()
                    self._stored = anyio.Event()
            return self.storing == 0
        return None

    async def _lookup(self, message: Lookup) -> None:
        hits: list[Outcome] = []
        misses = []
        for spec, key in message.items:
            got = await self._get(key)
            if got is None or len(got[0]) != len(spec.node.outputs):
                misses.append(spec)
            else:
                values, hashes = got
                if not self.packed:
                    values = [unpack(v) for v in values]
                hits.append(
                    Outcome(
                        spec.tid,
                        spec.attempt,
                        0.0,
                        tuple(values),
                        worker=CACHE_WORKER,
                        hashes=tuple(hashes),
                    )
                )
        scheduler = self._scheduler()
        if hits:
            scheduler.tell(Outcomes(hits))
        if misses:
            scheduler.tell(CacheMiss(misses))

    async def _get(self, key: str) -> tuple[list[Any], list[str]] | None:
        try:
            ekey = entry_key(key)
            if self.ttl is not None and time.time() - await self.store.modified(ekey) > self.ttl:
                # conditional puts never replace an entry: drop the expired one, so that
                # what this run computes is the fresh entry and the TTL starts again
                with contextlib.suppress(KeyError, StorageError):
                    await self.store.delete(ekey)
                return None
            entry = decode_result(await self.store.get(ekey), self.secret)
            hashes = msgpack.unpackb(entry.data)
            values = []
            for h in hashes:
                blob = await self.store.get(cached_result_key(h))
                self.metrics.cache_bytes_read += len(blob)
                values.append(decode_result(blob, self.secret, expected_hash=h))
            return values, list(hashes)
        except KeyError:
            return None
        except (StorageError, IntegrityError, ValueError) as exc:
            self._warn("cache unreadable; computing instead", exc)
            return None

    async def _store(self, message: Store) -> None:
        try:
            for h, value in zip(message.hashes, message.values, strict=True):
                blob = encode_result(value, self.secret)
                if await self.store.put_if_absent(cached_result_key(h), blob):
                    self.metrics.cache_bytes_written += len(blob)
            entry = encode_result(Packed(msgpack.packb(message.hashes), []), self.secret)
            if await self.store.put_if_absent(entry_key(message.key), entry):
                self.metrics.cache_bytes_written += len(entry)
        except StorageError as exc:
            self._warn("cannot write to the cache; the run goes on without it", exc)
        finally:
            self.storing -= 1
            self._stored.set()

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            log.warning(what, error=str(exc))
            self._warned = True


async def purge(store: Storage, older_than: float | None = None) -> tuple[int, int]:
    """Delete cache entries (older than ``older_than`` seconds, or all) and their results
    no remaining entry uses. Returns (entries, results) deleted."""
    now = time.time()
    entries = await store.list("cache/entries/")
    dropped, kept_hashes, unread = 0, set(), 0
    for key in entries:
        try:
            old = older_than is None or now - await store.modified(key) > older_than
            if old:
                await store.delete(key)
                dropped += 1
                continue
            entry = decode_result(await store.get(key))
            kept_hashes.update(msgpack.unpackb(entry.data))
        except (StorageError, IntegrityError, ValueError):
            unread += 1  # signed with a secret, say: what it uses is not known
    if unread and older_than is not None:
        log.warning(
            "some remaining cache entries could not be read (signed?); keeping every result",
            entries=unread,
        )
        return dropped, 0
    results = 0
    if older_than is None or dropped:
        for key in await store.list("cache/results/"):
            h = key.rsplit("/", 1)[-1]
            if h not in kept_hashes and (
                older_than is None or now - await store.modified(key) > older_than
            ):
                await store.delete(key)
                results += 1
    return dropped, results
