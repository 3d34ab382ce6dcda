"""Setting up a run's durable state: load what a resume can reuse, start the recorder and
the cache, and flush at the end. The executor calls this; the scheduler never sees storage.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from ._cache import Cache, Drain
from ._checkpoint import (
    Checkpoint,
    CheckpointMismatch,
    IntegrityError,
    ResultCorrupt,
    apply_records,
    check_compatible,
    decode_result,
    parse_snapshot_key,
    pick_latest,
    replay,
    result_key,
    reusable_nodes,
    snapshot_key,
)
from ._dag import DAGNode
from ._durable import RunDurability
from ._fingerprint import (
    combine_fingerprints,
    content_hash,
    dag_fingerprints,
    node_fingerprints,
)
from ._kernel import ActorRef, ActorSystem
from ._logging import get_logger
from ._recorder import Flush, Ledger, Recorder, restore_journal
from ._wire import Packed, pack
from .errors import OdibiError
from .metrics import MetricsManager
from .storage import Storage, StorageError, open_storage

log = get_logger("odibi_actor.persist")

DEFAULT_JOURNAL_DIR = os.path.join(
    os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
    "odibi-actor",
    "journal",
)


# seconds opening a run waits for a store that neither answers nor fails (a network that
# drops packets): after that it goes on as if the store were down
STORE_PATIENCE = 15.0


class ResumeError(OdibiError):
    """A checkpoint cannot be resumed: another DAG, or unreadable storage."""


class Persistence:
    """Checkpointing (``checkpoint`` URL) and/or caching (``cache`` URL) for one run."""

    def __init__(
        self,
        nodes: Mapping[str, DAGNode],
        *,
        checkpoint: str | None,
        run_id: str | None,
        resume: bool,
        cache: str | None,
        cache_ttl: float | None,
        uncached: frozenset[str],
        secret: bytes | None,
        journal_dir: str | None = None,
        every: int = 10_000,
        interval: float = 5.0,
        keep: int = 3,
    ) -> None:
        if resume and not checkpoint:
            raise ValueError("resume needs a checkpoint URL (checkpoint=... / --checkpoint)")
        if resume and not run_id:
            raise ValueError("resume needs the run id of the run to resume (--run-id)")
        self.nodes = nodes
        self.checkpoint_url, self.cache_url = checkpoint, cache
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.resume = resume
        self.cache_ttl, self.uncached, self.secret = cache_ttl, uncached, secret
        self.every, self.interval, self.keep = every, interval, keep
        tag = hashlib.blake2b((checkpoint or "").encode(), digest_size=4).hexdigest()
        self.journal_path = str(
            Path(journal_dir or DEFAULT_JOURNAL_DIR) / f"{self.run_id}-{tag}.wal"
        )
        self.store: Storage | None = None
        self.cache_store: Storage | None = None
        self.ledger: Ledger | None = None
        self.recorder: ActorRef[Any] | None = None
        self.cache: ActorRef[Any] | None = None
        self.restored: set[str] = set()
        self.pending_uploads: dict[str, bytes] = {}  # result blobs only the journal holds
        self.journal_only = 0  # node records a resume found in the journal
        self.resume_seconds = 0.0
        self.synced = True

    async def open(self, data: dict[str, Any], packed: bool) -> RunDurability:
        """Open the stores and, on resume, put the reusable outputs into ``data``."""
        self.packed = packed
        initial = {k: v if isinstance(v, Packed) else pack(v) for k, v in data.items()}
        external = {k: content_hash(v) for k, v in initial.items()}
        own = node_fingerprints(self.nodes) if self.cache_url else {}  # for cache keys
        lineage = dag_fingerprints(self.nodes, external)
        durable = RunDurability(own, uncached=self.uncached, hashes=dict(external))
        self.lineage = lineage
        self.checkpoint = Checkpoint(self.run_id, combine_fingerprints(lineage))
        if self.checkpoint_url:
            self.store = _open(self.checkpoint_url)
            if self.resume:
                t0 = anyio.current_time()
                await self._load(data, durable, packed)
                self.resume_seconds = anyio.current_time() - t0
            else:  # a fresh run under an old run id replaces that run's checkpoints
                if os.path.exists(self.journal_path):
                    os.unlink(self.journal_path)
                await self._discard_old_snapshots()
        if self.cache_url:
            self.cache_store = (
                self.store if self.cache_url == self.checkpoint_url else _open(self.cache_url)
            )
        return durable

    async def _discard_old_snapshots(self) -> None:
        assert self.store is not None
        prefix = snapshot_key(self.run_id, 0).rsplit("/", 1)[0] + "/"
        try:
            with anyio.fail_after(STORE_PATIENCE):
                for key in await self.store.list(prefix):
                    await self.store.delete(key)
        except (StorageError, TimeoutError) as exc:
            log.warning(
                "cannot clear the earlier checkpoints of this run id",
                error=str(exc) or f"no answer within {STORE_PATIENCE:g}s",
            )

    async def _load(self, data: dict[str, Any], durable: RunDurability, packed: bool) -> None:
        assert self.store is not None
        store = self.store
        prefix = snapshot_key(self.run_id, 0).rsplit("/", 1)[0] + "/"
        try:
            with anyio.fail_after(STORE_PATIENCE):
                keys = await store.list(prefix)
                blobs = [(k, await store.get(k)) for k in keys]
        except (StorageError, TimeoutError) as exc:
            log.warning(
                "cannot read checkpoints; resuming from the local journal only",
                error=str(exc) or f"no answer within {STORE_PATIENCE:g}s",
            )
            keys, blobs = [], []
        picked = pick_latest(blobs, self.secret)
        cp = picked.checkpoint if picked is not None else Checkpoint(self.run_id, "")
        # new snapshots go after every existing one, even those we could not use
        seqs = [p[1] for p in map(parse_snapshot_key, keys) if p is not None]
        self.checkpoint.seq = max([cp.seq, *seqs])
        records = replay(self.journal_path) if os.path.exists(self.journal_path) else []
        # what only the journal knew must reach the store, even if nothing runs again
        self.journal_only = apply_records(cp, records, self.secret)
        journal_blobs = restore_journal(records)
        if not cp.nodes:
            log.warning("nothing to resume for this run id; running everything", run_id=self.run_id)
            return
        if not cp.dag_fingerprint:  # journal only: which DAG wrote it is not known, so
            cp.dag_fingerprint = "unknown (journal only)"  # judge it node by node
        try:
            check_compatible(cp, self.checkpoint.dag_fingerprint, self.run_id, self.nodes)
        except CheckpointMismatch as exc:
            raise ResumeError(str(exc)) from None
        reusable = reusable_nodes(cp, self.lineage)
        sem = anyio.Semaphore(32)
        restored: dict[str, Packed] = {}
        missing: set[str] = set()

        users: dict[str, list[str]] = {}  # content hash -> nodes whose output it is
        for name in reusable:
            for h in cp.nodes[name].outputs.values():
                users.setdefault(h, []).append(name)
        by_hash: dict[str, Packed] = {}

        inline = {h: data for name in reusable for h, data in cp.nodes[name].inline.items()}

        async def fetch(h: str) -> None:
            async with sem:
                try:
                    if h in inline:
                        by_hash[h] = _inline_result(inline[h], h)
                        return
                    blob = journal_blobs.get(h) or await store.get(result_key(h))
                    by_hash[h] = decode_result(blob, self.secret, expected_hash=h)
                except (StorageError, IntegrityError) as exc:
                    log.warning(
                        "a stored output is unusable; its nodes and their descendants run again",
                        nodes=users[h][:5],
                        error=str(exc),
                    )
                    missing.update(users[h])

        async with anyio.create_task_group() as tg:
            for h in users:  # each distinct result is fetched once
                tg.start_soon(fetch, h)
        # what was made from a lost output runs again too: the node that lost it may make
        # something else this time, and restored descendants would disagree with it
        missing = _with_descendants(missing, self.nodes)
        for name in reusable - missing:
            for output, h in cp.nodes[name].outputs.items():
                restored[output] = by_hash[h]
        reusable -= missing
        for name in reusable:
            for output, h in cp.nodes[name].outputs.items():
                if h in journal_blobs:  # only the journal had it: the store must get it too
                    self.pending_uploads[h] = journal_blobs[h]
                value = restored[output]
                data[output] = value if packed else _unpack(value)
                durable.hashes[output] = h
        self.restored = reusable
        self.checkpoint.nodes = {n: cp.nodes[n] for n in reusable}
        log.info(
            "resuming",
            run_id=self.run_id,
            reused=len(reusable),
            rerun=len(self.nodes) - len(reusable),
        )

    def spawn(
        self,
        system: ActorSystem,
        scheduler: Callable[[], ActorRef[Any]],
        durable: RunDurability,
        metrics: MetricsManager,
    ) -> None:
        """Start the recorder and cache actors for this run."""
        if self.store is not None:
            store, cp, path = self.store, self.checkpoint, self.journal_path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.ledger = durable.ledger = Ledger(
                path,
                cp,
                self.lineage,
                secret=self.secret,
                every=self.every,
                pending=self.pending_uploads,
                unsynced=self.journal_only,
            )
            ledger = self.ledger
            self.recorder = durable.recorder = system.spawn(
                lambda: Recorder(store, ledger, cp, interval=self.interval, keep=self.keep),
                "recorder",
            )
        if self.cache_store is not None:
            cache_store = self.cache_store
            self.cache = durable.cache = system.spawn(
                lambda: Cache(
                    cache_store,
                    scheduler,
                    metrics,
                    ttl=self.cache_ttl,
                    secret=self.secret,
                    packed=self.packed,
                ),
                "cache",
            )

    async def finish(self, timeout: float = 30.0) -> None:
        """Sync the last completions (on success and on failure alike)."""
        if self.cache is not None:
            await self.cache.ask(Drain(timeout), timeout=timeout + 5)
        if self.recorder is not None:
            self.synced = await self.recorder.ask(Flush(timeout), timeout=timeout + 5)

    async def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        for store in {id(s): s for s in (self.store, self.cache_store) if s}.values():
            try:
                await store.close()
            except Exception as exc:  # closing must not hide the run's own outcome
                log.debug("closing storage failed", error=repr(exc))


def _open(url: str) -> Storage:
    """Stores a run uses fail fast: a dead endpoint must not stall it for minutes (the
    Azure SDK's default retries take over a minute); the recorder retries on its own."""
    if str(url).startswith("az://"):
        from azure.storage.blob.aio import LinearRetry  # storage's default backs off 15 s

        retry = LinearRetry(backoff=1, random_jitter_range=1, retry_total=1)
        return open_storage(url, retry_policy=retry, connection_timeout=5, read_timeout=60)
    return open_storage(url)


def _inline_result(data: bytes, h: str) -> Packed:
    """A result kept in its node's record; the checkpoint's checksum already covers it,
    the content hash check catches a record pointing at the wrong bytes."""
    p = Packed(data, [])
    if content_hash(p) != h:
        raise ResultCorrupt("inline result does not match its content hash")
    return p


def _unpack(value: Packed) -> Any:
    from ._wire import unpack

    return unpack(value)


def _with_descendants(names: set[str], nodes: Mapping[str, DAGNode]) -> set[str]:
    out, todo = set(names), list(names)
    while todo:
        for child in nodes[todo.pop()].dependents:
            if child not in out:
                out.add(child)
                todo.append(child)
    return out
