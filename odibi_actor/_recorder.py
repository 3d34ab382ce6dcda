"""Recording a run's progress durably without ever slowing the run.

Two parts, both on the run's event loop:

- :class:`Ledger` takes every completion synchronously, from the scheduler's durability
  hook, and appends it to the local write-ahead journal at once (one local ``write`` per
  scheduler event, which a kill -9 of the coordinator cannot undo), together with any
  output not yet in storage. Per node it is an append, not worth a message hop each.
- :class:`Recorder`, an actor, syncs the ledger to storage: snapshots and result uploads,
  every ``interval`` seconds (5), or sooner once ``every`` completions (10,000) wait, and
  at the end of the run. While the store is down it backs off and retries, and the
  journal keeps everything.

The interval bounds what a lost machine costs; the count bounds the journal. A snapshot
holds every node, so the count grows with the run (a quarter of the nodes done so far,
when that is more than ``every``): snapshots then cost O(1) per completion in all, not
O(nodes). The journal covers whatever a snapshot does not yet hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import msgpack

from ._checkpoint import (
    DONE,
    INLINE_MAX,
    Checkpoint,
    Journal,
    encode_checkpoint,
    encode_result,
    node_fields,
    nodes_record,
    parse_snapshot_key,
    prune,
    result_key,
    snapshot_key,
    split_map,
)
from ._fingerprint import content_hash, small_content_hash
from ._kernel import Actor
from ._logging import get_logger
from ._wire import Packed, pack
from .storage import Storage, StorageError

log = get_logger("odibi_actor.recorder")

BLOB_RECORD = "blob"  # journal record of a result not yet uploaded

# (node, attempt, duration, output names, their values (Packed, or plain objects from the
# threads backend), their content hashes where already known, else None)
Completion = tuple[str, int, float, Sequence[str], Sequence[Any], Sequence[str | None] | None]


class Ledger:
    """What a run finished, journaled the moment the scheduler learns of it.

    Each scheduler event's completions are msgpack-encoded once, as a map of node name to
    record; the journal gets that map, and snapshots splice the maps' pairs together
    (:func:`encode_checkpoint` with ``pairs``) rather than encode every node again.
    """

    def __init__(
        self,
        journal_path: str,
        checkpoint: Checkpoint,
        fingerprints: Mapping[str, str],
        *,
        secret: bytes | None = None,
        every: int = 10_000,
        pending: dict[str, bytes] | None = None,
        unsynced: int = 0,
    ) -> None:
        self.journal_path = journal_path
        self.fingerprints = fingerprints
        self.secret = secret
        self.every = every
        self.journal = Journal.open(journal_path)
        self._packer = msgpack.Packer()
        # the checkpoint's nodes, as encoded maps; a name recorded twice is in a later one
        self.maps: list[bytes] = []
        self.count = 0  # entries in self.maps
        if checkpoint.nodes:
            self._add(self._packer.pack({n: node_fields(r) for n, r in checkpoint.nodes.items()}))
        # content hash -> result blob not yet uploaded (a resume may hand some over)
        self.pending: dict[str, bytes] = dict(pending or {})
        self.uploaded: set[str] = set()
        self.appended = 0  # journal records since it was last truncated
        self.unsynced = unsynced  # completions since the last stored snapshot
        self._told = False  # record() reported the batch due, and no sync took it yet

    def record(self, done: list[Completion]) -> bool:
        """Journal these completions; returns whether a snapshot is due.

        One pass per completion, straight to its stored record: outputs are hashed here
        unless known, small ones ride inline, the others become result blobs (journaled
        too, until uploaded)."""
        records: list[dict[str, Any]] = []
        nodes: dict[str, list[Any]] = {}
        fingerprints, pending, uploaded = self.fingerprints, self.pending, self.uploaded
        for name, attempt, duration, outputs, values, known in done:
            hashes: dict[str, str] = {}
            inline: dict[str, Any] | None = None
            for i, output in enumerate(outputs):
                value = values[i]
                if type(value) is not Packed:
                    value = pack(value)
                h = known[i] if known else None
                if not value.buffers and len(value.data) <= INLINE_MAX:
                    data = value.data
                    h = h or small_content_hash(data)
                    if inline is None:
                        inline = {}
                    inline[h] = data
                else:
                    h = h or content_hash(value)
                    if h not in uploaded and h not in pending:
                        blob = pending[h] = encode_result(value, self.secret)
                        records.append({"t": BLOB_RECORD, "h": h, "b": blob})
                hashes[output] = h
            rec = [DONE, attempt, duration, hashes, fingerprints.get(name, "")]
            if inline:
                rec.append(inline)
            nodes[name] = rec
        encoded = self._packer.pack(nodes)
        records.append(nodes_record(encoded, self.secret))
        self.journal.append_many(records)
        self.maps.append(encoded)
        self.count += len(nodes)
        self.appended += len(records)
        self.unsynced += len(done)
        if self._told or not self.due():
            return False
        self._told = True  # once per batch, however long the sync takes to start
        return True

    def _add(self, encoded_map: bytes) -> None:
        self.maps.append(encoded_map)
        self.count += split_map(encoded_map)[0]

    def snapshot(self, head: Checkpoint) -> Callable[[], bytes]:
        """A function encoding a snapshot of what is recorded now, for another thread."""
        maps, count, secret = list(self.maps), self.count, self.secret
        self._told = False

        def encode() -> bytes:
            pairs = [split_map(m)[1] for m in maps]
            return encode_checkpoint(head, secret, pairs=(count, pairs))

        return encode

    def due(self) -> bool:
        return self.unsynced >= max(self.every, self.count // 4)

    def clean(self) -> bool:
        return not self.unsynced and not self.pending

    def close(self) -> None:
        self.journal.close()


@dataclass(slots=True)
class SyncDue:
    """Tell: a batch is full; sync now rather than at the next interval."""


@dataclass(slots=True)
class Flush:
    """Ask: sync everything now (end of run); answers whether the store has it all."""

    timeout: float = 30.0


class Recorder(Actor):
    def __init__(
        self,
        store: Storage,
        ledger: Ledger,
        checkpoint: Checkpoint,
        *,
        interval: float = 5.0,
        keep: int = 3,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.cp = checkpoint
        self.interval, self.keep = interval, keep
        self.bytes_written = 0
        self._wake = anyio.Event()
        self._synced = anyio.Event()
        self._store_down = False
        self._flushing = False

    async def on_start(self) -> None:
        self.start_task(self._syncer, name="recorder-sync")

    async def on_message(self, message: Any) -> Any:
        if isinstance(message, SyncDue):
            self._wake.set()
        elif isinstance(message, Flush):
            return await self._flush(message.timeout)
        return None

    async def _flush(self, timeout: float) -> bool:
        """Final sync; on a dead store the journal keeps it and a resume will upload it."""
        if self.ledger.clean():
            return True
        self._synced = anyio.Event()
        self._flushing = True
        self._wake.set()
        deadline = anyio.current_time() + timeout
        try:
            while not self._synced.is_set() and anyio.current_time() < deadline:
                if self._store_down:  # never hold the run's end hostage to a dead store
                    deadline = min(deadline, anyio.current_time() + 5.0)
                with anyio.move_on_after(0.1):
                    await self._synced.wait()
        finally:
            self._flushing = False
        done = self.ledger.clean()
        if not done:
            log.warning(
                "checkpoint not synced to storage in time; the local journal keeps"
                " it for the next resume",
                journal=self.ledger.journal_path,
            )
        return done

    async def _syncer(self) -> None:
        backoff = 0.5
        while True:
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            if self.ledger.clean():
                self._synced.set()
                continue
            try:
                await self._sync_once()
            except StorageError as exc:
                if not self._store_down:
                    log.warning(
                        "storage unavailable; checkpoints queue in the local journal",
                        error=str(exc),
                    )
                self._store_down = True
                await anyio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                self._wake.set()
                continue
            if self._store_down:
                log.info("storage is back; checkpoints synced")
            self._store_down = False
            backoff = 0.5
            if self.ledger.clean():
                self._synced.set()
            elif self._flushing or self.ledger.due():
                self._wake.set()  # the run is ending, or a batch is full: go again now

    async def _sync_once(self) -> None:
        ledger = self.ledger
        # results first: a snapshot must never name a result the store does not have
        limit = anyio.Semaphore(64)  # uploads overlap: each one mostly waits on I/O

        failed: list[StorageError] = []

        async def upload(h: str, blob: bytes) -> None:
            try:
                async with limit:
                    if await self.store.put_if_absent(result_key(h), blob):
                        self.bytes_written += len(blob)
            except StorageError as exc:
                failed.append(exc)
                return
            ledger.uploaded.add(h)
            ledger.pending.pop(h, None)

        # the snapshot holds what is recorded now, and the uploads are of what it names:
        # nodes finishing during the uploads wait for the next snapshot
        appended, unsynced = ledger.appended, ledger.unsynced
        cp = self.cp
        cp.seq += 1
        cp.created = time.time()
        head = Checkpoint(cp.run_id, cp.dag_fingerprint, {}, cp.created, cp.seq)
        encode = ledger.snapshot(head)
        async with anyio.create_task_group() as tg:
            for h, blob in list(ledger.pending.items()):
                tg.start_soon(upload, h, blob)
        if failed:
            raise failed[0]
        # joining and hashing megabytes of records must not stall the run's event loop
        blob = await anyio.to_thread.run_sync(encode)
        await self.store.put(snapshot_key(cp.run_id, cp.seq), blob)
        self.bytes_written += len(blob)
        ledger.unsynced -= unsynced
        if ledger.appended == appended and not ledger.pending:
            ledger.journal.truncate()  # nothing came while we uploaded: the store has all
            ledger.appended = 0
        await self._prune()

    async def _prune(self) -> None:
        prefix = snapshot_key(self.cp.run_id, 0).rsplit("/", 1)[0] + "/"
        keys = []
        for key in await self.store.list(prefix):
            parsed = parse_snapshot_key(key)
            if parsed is not None:
                keys.append((key, parsed[1]))
        for key in prune(keys, self.keep):
            await self.store.delete(key)


def restore_journal(records: list[dict[str, Any]]) -> dict[str, bytes]:
    """Result blobs the journal holds (outputs of a run killed before uploading them)."""
    return {r["h"]: r["b"] for r in records if r.get("t") == BLOB_RECORD and "h" in r}
