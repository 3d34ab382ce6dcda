"""The recorder actor: makes a run's progress durable without ever slowing the run.

Every completion goes to the local write-ahead journal at once (one local append, which a
kill -9 of the coordinator cannot undo), together with any output not yet in storage.
Snapshots and result uploads are batched, every ``every`` completions or ``interval``
seconds and at the end of the run, by a syncer task; while the store is down it backs off
and retries, and the journal keeps everything meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from ._checkpoint import (
    DONE,
    Checkpoint,
    Journal,
    NodeRecord,
    completion_record,
    encode_checkpoint,
    encode_result,
    parse_snapshot_key,
    prune,
    result_key,
    snapshot_key,
)
from ._durable import Completed
from ._kernel import Actor
from .storage import Storage, StorageError

log = structlog.get_logger("odibi_actor.recorder")

BLOB_RECORD = "blob"  # journal record of a result not yet uploaded


@dataclass(slots=True)
class Flush:
    """Ask: sync everything now (end of run); answers whether the store has it all."""

    timeout: float = 30.0


class Recorder(Actor):
    def __init__(
        self,
        store: Storage,
        checkpoint: Checkpoint,
        fingerprints: Mapping[str, str],
        journal_path: str,
        *,
        secret: bytes | None = None,
        every: int = 1000,
        interval: float = 5.0,
        keep: int = 3,
        uploaded: set[str] | None = None,
        pending: dict[str, bytes] | None = None,
    ) -> None:
        self.store = store
        self.cp = checkpoint
        self.fingerprints = fingerprints
        self.journal_path = journal_path
        self.secret = secret
        self.every, self.interval, self.keep = every, interval, keep
        # content hash -> result blob not yet uploaded (a resume may hand some over)
        self.pending: dict[str, bytes] = dict(pending or {})
        self.uploaded: set[str] = uploaded if uploaded is not None else set()
        self.appended = 0  # journal records since it was last truncated
        self.unsynced = 0  # completions since the last stored snapshot
        self.bytes_written = 0
        self._wake = anyio.Event()
        self._synced = anyio.Event()
        self._store_down = False
        self._flushing = False

    async def on_start(self) -> None:
        self.journal = Journal.open(self.journal_path)
        self.start_task(self._syncer, name="recorder-sync")

    async def on_stop(self) -> None:
        self.journal.close()

    async def on_message(self, message: Any) -> Any:
        if isinstance(message, Completed):
            self._record(message)
        elif isinstance(message, Flush):
            return await self._flush(message.timeout)
        return None

    def _record(self, message: Completed) -> None:
        journal = self.journal
        for name, attempt, duration, hashes, packed in message.items:
            rec = NodeRecord(DONE, attempt, duration, hashes, self.fingerprints.get(name, ""))
            self.cp.nodes[name] = rec
            for h, value in packed.items():
                if h not in self.uploaded and h not in self.pending:
                    blob = self.pending[h] = encode_result(value, self.secret)
                    journal.append({"t": BLOB_RECORD, "h": h, "b": blob})
                    self.appended += 1
            journal.append(completion_record(name, rec))
            self.appended += 1
        self.unsynced += len(message.items)
        if self.unsynced >= self.every:
            self._wake.set()

    async def _flush(self, timeout: float) -> bool:
        """Final sync; on a dead store the journal keeps it and a resume will upload it."""
        if not self.unsynced and not self.pending:
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
        done = not self.unsynced and not self.pending
        if not done:
            log.warning(
                "checkpoint not synced to storage in time; the local journal keeps"
                " it for the next resume",
                journal=self.journal_path,
            )
        return done

    async def _syncer(self) -> None:
        backoff = 0.5
        while True:
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            if not self.unsynced and not self.pending:
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
            if not self.unsynced and not self.pending:
                self._synced.set()
            elif self._flushing or self.unsynced >= self.every:
                self._wake.set()  # the run is ending, or a batch is full: go again now

    async def _sync_once(self) -> None:
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
            self.uploaded.add(h)
            self.pending.pop(h, None)

        async with anyio.create_task_group() as tg:
            for h, blob in list(self.pending.items()):
                tg.start_soon(upload, h, blob)
        if failed:
            raise failed[0]
        appended, unsynced = self.appended, self.unsynced
        self.cp.seq += 1
        self.cp.created = time.time()
        blob = encode_checkpoint(self.cp, self.secret)
        await self.store.put(snapshot_key(self.cp.run_id, self.cp.seq), blob)
        self.bytes_written += len(blob)
        self.unsynced -= unsynced
        if self.appended == appended and not self.pending:
            self.journal.truncate()  # nothing arrived while we uploaded: all of it is stored
            self.appended = 0
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
