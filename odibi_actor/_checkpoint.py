"""Checkpoints, result blobs and the write-ahead journal: the data side of resuming a run.

Everything here is pure and synchronous; storage (local disk, Azure blobs) belongs to the
caller. Only :class:`Journal` touches a file, and only a local one.

What is stored, and why:

- **Results** are stored once each, under their content hash (:func:`result_key`), so an
  output produced twice is written once. A result blob (:func:`encode_result`) is
  self-describing and carries a checksum, or an HMAC with a cluster secret, which
  :func:`decode_result` checks before handing anything back: a torn or tampered blob is
  refused before anyone could unpickle it (nothing here unpickles at all).
- **Small results** (at most :data:`INLINE_MAX` bytes, no out-of-band buffers) are the
  exception: they ride inline in the record of the node that made them. An object per
  ten-byte result would cost a request and a file each, far more than its bytes; the
  Ray object store inlines small objects for the same reason.
- **Checkpoints** (:func:`encode_checkpoint`) are msgpack: format name and version, run
  id, DAG fingerprint and, per node, state, attempts, duration, output content hashes,
  lineage fingerprint and any inline results, all under a checksum or HMAC. Node records
  are encoded once, when they complete; the journal and every later snapshot carry those
  bytes as they are, so a snapshot is a join, not a re-encode of every node.
  :func:`pick_latest` takes the newest one that decodes and falls back past corrupt ones
  with a warning, never a traceback.
- **The journal** (:class:`Journal`) gets every completion the moment it happens, as one
  local ``write``: a kill -9 of the coordinator loses no finished node. A new snapshot
  makes it redundant, so it is truncated after each snapshot is safely stored.

Another DAG versus a changed DAG (:func:`check_compatible`):

- A checkpoint belongs to one run; another run id is always refused.
- The same DAG fingerprint: everything done is reused.
- A different DAG fingerprint is a *changed* DAG, resumed node by node, as long as the
  checkpoint shares at least one node name with it. Per node, :func:`reusable_nodes`
  reuses exactly the done nodes whose lineage fingerprint is unchanged; a lineage
  fingerprint folds in every ancestor, so a changed node and all its descendants run again
  while siblings and ancestors do not.
- It is *another* DAG, refused with both fingerprints shown, when not one node name is
  shared (nothing could be reused, so it is a mistake, not an edit), when the caller does
  not pass the node names, or when it asks for ``strict=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from ._fingerprint import _bytes_view, content_hash, is_content_hash
from ._logging import get_logger
from ._state import State
from ._wire import Packed
from .errors import OdibiError

_packb = msgpack.packb

log = get_logger("odibi_actor.checkpoint")

FORMAT = "odibi-checkpoint"
VERSION = 2  # 2 added inline results; version 1 checkpoints are read as well
READABLE_VERSIONS = (1, 2)
INLINE_MAX = 1024  # bytes: results this small are kept in their node's record
CHECKPOINT_MAGIC = b"ODIBICK1"
RESULT_MAGIC = b"ODIBIRS1"
JOURNAL_MAGIC = b"ODIBIJ1\n"
ALG_CHECKSUM = "blake2b"
ALG_HMAC = "hmac-sha256"
DONE = State.DONE.value
_DIGEST_SIZE = 32


class IntegrityError(OdibiError, ValueError):
    """A stored blob failed its checks; the message says which, never the blob's bytes."""


class CheckpointCorrupt(IntegrityError):
    """A checkpoint is truncated, garbled, tampered, unsigned when it must be, or of an
    unknown format or version."""


class ResultCorrupt(IntegrityError):
    """A result blob is truncated, garbled, tampered or unsigned when it must be."""


class CheckpointMismatch(OdibiError, ValueError):
    """A sound checkpoint that belongs to another run or another DAG."""


# --- checkpoints ---------------------------------------------------------------------------
@dataclass(slots=True)
class NodeRecord:
    """What a checkpoint knows of one node. ``state`` is a :class:`State` value;
    ``outputs`` maps output name to content hash; ``fingerprint`` is the node's lineage
    fingerprint (:func:`dag_fingerprints`) in the run that recorded it; ``inline`` maps
    the content hash of a small output to its pickle bytes."""

    state: str
    attempts: int = 0
    duration: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    inline: dict[str, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class Checkpoint:
    """A run's progress at one moment; ``seq`` orders a run's checkpoints."""

    run_id: str
    dag_fingerprint: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    created: float = 0.0
    seq: int = 0

    def done(self) -> set[str]:
        return {name for name, rec in self.nodes.items() if rec.state == DONE}


def _check_secret(secret: bytes | None) -> None:
    if secret is not None and not secret:
        raise ValueError("the cluster secret must not be empty (pass None for no secret)")


def _mac(magic: bytes, secret: bytes | None) -> Any:
    """The checksum (blake2b) or, with a secret, the HMAC; both cover the magic too, so a
    signed result cannot pass for a checkpoint or the other way round."""
    h = (
        hashlib.blake2b(digest_size=_DIGEST_SIZE)
        if secret is None
        else hmac.new(bytes(secret), digestmod=hashlib.sha256)
    )
    h.update(magic)
    return h


def node_fields(rec: NodeRecord) -> list[Any]:
    """A node's record as stored: a 5-field array, or 6 with inline results."""
    out = [rec.state, rec.attempts, float(rec.duration), rec.outputs, rec.fingerprint]
    if rec.inline:
        out.append(rec.inline)
    return out


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def split_map(encoded: bytes) -> tuple[int, memoryview]:
    """A msgpack-encoded map as (entry count, its key/value pairs without the header)."""
    first, view = encoded[0], memoryview(encoded)
    if first & 0xF0 == 0x80:
        return first & 0x0F, view[1:]
    if first == 0xDE:
        return int.from_bytes(encoded[1:3], "big"), view[3:]
    if first == 0xDF:
        return int.from_bytes(encoded[1:5], "big"), view[5:]
    raise ValueError("not a msgpack map")


def encode_checkpoint(
    cp: Checkpoint,
    secret: bytes | None = None,
    *,
    pairs: tuple[int, Iterable[bytes | memoryview]] | None = None,
) -> bytes:
    """``MAGIC + msgpack({"alg", "sum", "body"})``; ``body`` is the msgpack checkpoint and
    ``sum`` its blake2b checksum, or its HMAC-SHA256 under ``secret``.

    ``pairs``, when given, stands in for ``cp.nodes``: the nodes map already encoded, as
    the count of its entries and chunks of its key/value pairs (see :func:`split_map`),
    so a caller that encoded each node once need not encode it again, and may encode on
    another thread while ``cp.nodes`` changes.
    """
    _check_secret(secret)
    if pairs is None:
        n, chunk = split_map(_packb({n: node_fields(r) for n, r in cp.nodes.items()}))
        pairs = (n, [chunk])
    count, chunks = pairs
    head = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": cp.run_id,
        "dag_fingerprint": cp.dag_fingerprint,
        "created": float(cp.created),
        "seq": int(cp.seq),
    }
    # the body map is spliced by hand so the node records need no re-encoding
    body = b"".join(
        [
            _map_header(len(head) + 1),
            *(_packb(k) + _packb(v) for k, v in head.items()),
            _packb("nodes"),
            _map_header(count),
            *chunks,
        ]
    )
    mac = _mac(CHECKPOINT_MAGIC, secret)
    mac.update(body)
    alg = ALG_CHECKSUM if secret is None else ALG_HMAC
    return CHECKPOINT_MAGIC + _packb({"alg": alg, "sum": mac.digest(), "body": body})


def decode_checkpoint(
    blob: bytes | bytearray | memoryview, secret: bytes | None = None
) -> Checkpoint:
    """Check and parse a checkpoint; anything wrong raises :class:`CheckpointCorrupt`.

    With ``secret`` only a checkpoint signed with it is accepted; without, a signed one is
    refused too, as nothing could vouch for it.
    """
    _check_secret(secret)
    try:
        view = _bytes_view(blob)
    except TypeError:
        raise CheckpointCorrupt(f"checkpoint is not bytes but {type(blob).__name__}") from None
    magic = CHECKPOINT_MAGIC
    if len(view) < len(magic):
        raise CheckpointCorrupt(f"checkpoint truncated: {len(view)} bytes, shorter than a header")
    if view[: len(magic)] != magic:
        raise CheckpointCorrupt("bad magic: not an odibi checkpoint")
    try:
        env = msgpack.unpackb(view[len(magic) :])
    except Exception:
        raise CheckpointCorrupt(
            "checkpoint truncated or garbled: envelope is not msgpack"
        ) from None
    if not isinstance(env, dict):
        raise CheckpointCorrupt("checkpoint garbled: envelope is not a map")
    alg, digest, body = env.get("alg"), env.get("sum"), env.get("body")
    if not (isinstance(alg, str) and isinstance(digest, bytes) and isinstance(body, bytes)):
        raise CheckpointCorrupt("checkpoint garbled: envelope lacks alg, sum or body")
    _verify(alg, digest, body, secret, magic, "checkpoint", CheckpointCorrupt)
    try:
        d = msgpack.unpackb(body)
    except Exception:
        raise CheckpointCorrupt("checkpoint garbled: body is not msgpack") from None
    return _parse_body(d)


def _verify(
    alg: str,
    digest: Any,
    body: Any,
    secret: bytes | None,
    magic: bytes,
    what: str,
    error: type[IntegrityError],
) -> None:
    if secret is not None and alg != ALG_HMAC:
        raise error(f"{what} is not signed, but a cluster secret is set: refusing it")
    if secret is None and alg == ALG_HMAC:
        raise error(f"{what} is signed (HMAC) but no cluster secret was given to verify it")
    if alg not in (ALG_CHECKSUM, ALG_HMAC):
        raise error(f"{what} uses an unknown checksum algorithm")
    mac = _mac(magic, secret)
    mac.update(body)
    if not hmac.compare_digest(mac.digest(), digest):
        if secret is None:
            raise error(f"{what} checksum mismatch: the blob is corrupt or truncated")
        raise error(f"{what} HMAC mismatch: tampered, corrupt, or signed with another secret")


def _want(d: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise CheckpointCorrupt(f"{where} is missing field {key!r}")
    value = d[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise CheckpointCorrupt(f"{where} field {key!r} has type {type(value).__name__}")
    return value


def _parse_body(d: Any) -> Checkpoint:
    if not isinstance(d, dict):
        raise CheckpointCorrupt("checkpoint garbled: body is not a map")
    if d.get("format") != FORMAT:
        raise CheckpointCorrupt(f"not an odibi checkpoint: format name is not {FORMAT!r}")
    version = d.get("version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        shown = version if type(version) is int else "unreadable"
        raise CheckpointCorrupt(
            f"unsupported checkpoint version {shown} (this build reads version {VERSION})"
        )
    run_id = _want(d, "run_id", str, "checkpoint")
    dag_fp = _want(d, "dag_fingerprint", str, "checkpoint")
    created = _want(d, "created", (int, float), "checkpoint")
    seq = _want(d, "seq", int, "checkpoint")
    raw_nodes = _want(d, "nodes", dict, "checkpoint")
    nodes = {}
    for name, raw in raw_nodes.items():
        nodes[name] = _parse_node(name, raw)
    return Checkpoint(run_id, dag_fp, nodes, float(created), seq)


def _parse_node(name: Any, raw: Any) -> NodeRecord:
    where = f"checkpoint node {str(name)[:60]!r}"
    if not isinstance(name, str):
        raise CheckpointCorrupt("checkpoint garbled: a node name is not a string")
    if not (isinstance(raw, list | tuple) and len(raw) in (5, 6)):
        raise CheckpointCorrupt(f"{where} is not a 5-field record")
    state, attempts, duration, outputs, fp = raw[:5]
    inline = raw[5] if len(raw) == 6 else {}
    if not isinstance(state, str):
        raise CheckpointCorrupt(f"{where}: state is not a string")
    if type(attempts) is not int or attempts < 0:
        raise CheckpointCorrupt(f"{where}: attempts is not a count")
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        raise CheckpointCorrupt(f"{where}: duration is not a number")
    if not isinstance(fp, str):
        raise CheckpointCorrupt(f"{where}: fingerprint is not a string")
    if not isinstance(outputs, dict) or not all(
        isinstance(k, str) and is_content_hash(v) for k, v in outputs.items()
    ):
        # hashes become storage keys: anything but 64 hex digits could point elsewhere
        raise CheckpointCorrupt(f"{where}: outputs are not name -> content hash")
    if not isinstance(inline, dict) or not all(
        isinstance(v, bytes) and k in outputs.values() for k, v in inline.items()
    ):
        raise CheckpointCorrupt(f"{where}: inline results are not output hash -> bytes")
    return NodeRecord(state, attempts, float(duration), dict(outputs), fp, inline)


def _short(fp: str) -> str:
    return fp[:12] + "..." if len(fp) > 12 else fp


def check_compatible(
    cp: Checkpoint,
    dag_fingerprint: str,
    run_id: str,
    names: Iterable[str] | None = None,
    *,
    strict: bool = False,
) -> str:
    """Refuse a checkpoint of another run or another DAG with :class:`CheckpointMismatch`.

    Returns ``"same"`` (identical DAG) or ``"changed"`` (resume per node with
    :func:`reusable_nodes`). ``names`` are this DAG's node names; without them, or with
    ``strict``, any fingerprint difference counts as another DAG. See the module docstring.
    """
    if cp.run_id != run_id:
        raise CheckpointMismatch(f"checkpoint belongs to run {cp.run_id!r}, not to run {run_id!r}")
    if cp.dag_fingerprint == dag_fingerprint:
        return "same"
    fps = f"checkpoint {_short(cp.dag_fingerprint)}, this DAG {_short(dag_fingerprint)}"
    if strict or names is None:
        raise CheckpointMismatch(
            f"checkpoint of run {run_id!r} is of another DAG ({fps}); refusing to resume it"
        )
    current = set(names)
    if not current & cp.nodes.keys():
        raise CheckpointMismatch(
            f"checkpoint of run {run_id!r} is of another DAG ({fps}): none of its"
            f" {len(cp.nodes)} nodes is among this DAG's {len(current)}; refusing to resume it"
        )
    return "changed"


def reusable_nodes(cp: Checkpoint, fingerprints: Mapping[str, str]) -> set[str]:
    """Done nodes whose lineage fingerprint is unchanged: their stored outputs stand.

    ``fingerprints`` are this DAG's lineage fingerprints (:func:`dag_fingerprints`). A
    changed node, and through the lineage hash every descendant of it, is left out, as is a
    node no longer in the DAG. Whether each output is still in storage is the caller's
    check.
    """
    return {
        name
        for name, rec in cp.nodes.items()
        if rec.state == DONE and rec.fingerprint and fingerprints.get(name) == rec.fingerprint
    }


# --- journal records -----------------------------------------------------------------------
def completion_record(name: str, rec: NodeRecord, secret: bytes | None = None) -> dict[str, Any]:
    """The journal entry for one node's new record (usually: it completed)."""
    return nodes_record(_packb({name: node_fields(rec)}), secret)


def nodes_record(encoded_map: bytes, secret: bytes | None = None) -> dict[str, Any]:
    """The journal entry for nodes' new records: a msgpack map of name -> record, with an
    HMAC under a cluster secret (records may carry inline results: pickles)."""
    if secret is None:
        return {"t": "nodes", "m": encoded_map}
    return {"t": "nodes", "m": encoded_map, "mac": _journal_mac(encoded_map, secret)}


def _journal_mac(encoded_map: Any, secret: bytes) -> bytes:
    mac = hmac.new(bytes(secret), b"odibi-journal-nodes", hashlib.sha256)
    mac.update(encoded_map)
    return mac.digest()


def apply_records(
    cp: Checkpoint, records: Iterable[Mapping[str, Any]], secret: bytes | None = None
) -> int:
    """Replay journal entries onto the last snapshot, in order; returns how many applied.

    Entries are whole records, so applying one the snapshot already holds changes nothing:
    a journal not yet truncated after a snapshot is harmless. Bad entries are skipped, and
    with a cluster secret so is every entry without a valid HMAC.
    """
    applied = skipped = 0
    for r in records:
        if not isinstance(r, Mapping):
            continue
        if r.get("t") == "node":  # one node per record, as written before "nodes"
            if secret is not None:  # never signed, and may carry an inline pickle
                skipped += 1
                continue
            pairs: Iterable[tuple[Any, Any]] = [(r.get("node"), r.get("rec"))]
        elif r.get("t") == "nodes":
            if secret is not None:
                mac, m = r.get("mac"), r.get("m")
                if not (
                    isinstance(mac, bytes)
                    and isinstance(m, bytes)
                    and hmac.compare_digest(mac, _journal_mac(m, secret))
                ):
                    skipped += 1
                    continue
            try:
                pairs = msgpack.unpackb(r.get("m")).items()
            except Exception:
                skipped += 1
                continue
        else:
            continue
        for name, raw in pairs:
            try:
                cp.nodes[name] = _parse_node(name, raw)
            except (CheckpointCorrupt, TypeError):
                skipped += 1
                continue
            applied += 1
    if skipped:
        log.warning("journal_records_skipped", skipped=skipped, applied=applied)
    return applied


# --- result blobs --------------------------------------------------------------------------
# magic, algorithm (0 checksum, 1 hmac), 3 pad bytes, buffer count, in-band length;
# then one u64 length per buffer, the in-band bytes, each buffer (64-byte aligned in the
# blob, zero padding before it) and the 32-byte checksum or HMAC of everything before it.
_RESULT_HEAD = struct.Struct("<8sB3xIQ")
_ALIGN = 64
_ALG_CODES = {ALG_CHECKSUM: 0, ALG_HMAC: 1}
_ALG_NAMES = {v: k for k, v in _ALG_CODES.items()}


def encode_result(p: Packed, secret: bytes | None = None) -> bytes:
    """One stored result: layout header, pickle bytes, out-of-band buffers, checksum/HMAC.

    Buffers start 64-byte aligned within the blob, so arrays decoded from it are aligned
    too. The only copy is the final join.
    """
    _check_secret(secret)
    data = _bytes_view(p.data)
    bufs = [_bytes_view(b) for b in p.buffers]
    alg = ALG_CHECKSUM if secret is None else ALG_HMAC
    head = _RESULT_HEAD.pack(RESULT_MAGIC, _ALG_CODES[alg], len(bufs), data.nbytes)
    head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
    parts: list[Any] = [head, data]
    pos = len(head) + data.nbytes
    for b in bufs:
        pad = -pos % _ALIGN
        if pad:
            parts.append(bytes(pad))
        parts.append(b)
        pos += pad + b.nbytes
    mac = _mac(b"", secret)  # the magic is the first bytes of the blob already
    for part in parts:
        mac.update(part)
    parts.append(mac.digest())
    return b"".join(parts)


def decode_result(
    blob: bytes | bytearray | memoryview,
    secret: bytes | None = None,
    expected_hash: str | None = None,
) -> Packed:
    """Check a result blob and return its :class:`Packed`, as views into ``blob`` (no copy).

    Raises :class:`ResultCorrupt` before returning anything when the layout, the checksum
    or HMAC, or (if given) ``expected_hash``, the content hash it is stored under, does not
    hold. Never unpickles.
    """
    _check_secret(secret)
    try:
        view = _bytes_view(blob)
    except TypeError:
        raise ResultCorrupt(f"result is not bytes but {type(blob).__name__}") from None
    n = len(view)
    fixed = _RESULT_HEAD.size
    if n < len(RESULT_MAGIC) and RESULT_MAGIC.startswith(view):
        raise ResultCorrupt(f"result truncated: {n} bytes, shorter than a header")
    if view[: len(RESULT_MAGIC)] != RESULT_MAGIC:
        raise ResultCorrupt("bad magic: not an odibi result blob")
    if n < fixed + _DIGEST_SIZE:
        raise ResultCorrupt(f"result truncated: {n} bytes, shorter than a header")
    _, code, nbufs, dlen = _RESULT_HEAD.unpack_from(view)
    alg = _ALG_NAMES.get(code, "unknown")
    if nbufs > (n - fixed - _DIGEST_SIZE) // 8:
        raise ResultCorrupt("result truncated or garbled: more buffers declared than fit")
    lens = struct.unpack_from(f"<{nbufs}Q", view, fixed)
    pos = fixed + 8 * nbufs
    data_at = pos
    pos += dlen
    spans = []
    for length in lens:
        pos += -pos % _ALIGN
        spans.append((pos, pos + length))
        pos += length
    if pos + _DIGEST_SIZE != n:
        raise ResultCorrupt(
            f"result truncated or garbled: layout says {pos + _DIGEST_SIZE} bytes, blob has {n}"
        )
    _verify(
        alg,
        view[n - _DIGEST_SIZE :],
        view[: n - _DIGEST_SIZE],
        secret,
        b"",
        "result",
        ResultCorrupt,
    )
    p = Packed(view[data_at : data_at + dlen], [view[a:b] for a, b in spans])
    if expected_hash is not None and content_hash(p) != expected_hash:
        raise ResultCorrupt(
            f"result content hash mismatch: stored under {_short(expected_hash)},"
            " holds another value"
        )
    return p


# --- storage keys and retention ------------------------------------------------------------
_SNAPSHOT_KEY = re.compile(r"runs/(?P<run>[^/]+)/checkpoints/(?P<seq>[0-9]{12,})\.ckpt")


def _check_run_id(run_id: str) -> None:
    if (
        not isinstance(run_id, str)
        or not run_id
        or run_id in (".", "..")
        or any(c in run_id for c in "/\\")
        or not run_id.isprintable()
    ):
        raise ValueError(f"run id {run_id!r} cannot name a storage path")


def snapshot_key(run_id: str, seq: int) -> str:
    """``runs/<run_id>/checkpoints/<seq:012d>.ckpt``: zero-padded, so keys sort by seq."""
    _check_run_id(run_id)
    if type(seq) is not int or seq < 0:
        raise ValueError(f"checkpoint seq must be an int >= 0, got {seq!r}")
    return f"runs/{run_id}/checkpoints/{seq:012d}.ckpt"


def parse_snapshot_key(key: str) -> tuple[str, int] | None:
    """``(run_id, seq)`` of a :func:`snapshot_key`, or ``None`` for any other key."""
    m = _SNAPSHOT_KEY.fullmatch(key)
    return (m["run"], int(m["seq"])) if m else None


def result_key(content: str) -> str:
    """``results/<hash[:2]>/<hash>``: fanned out so no one directory holds every result."""
    if not is_content_hash(content):
        raise ValueError(f"not a content hash: {str(content)[:80]!r}")
    return f"results/{content[:2]}/{content}"


def prune(keys_with_seq: list[tuple[str, int]], keep: int) -> list[str]:
    """Checkpoint keys to delete so only the newest ``keep`` (>= 1) remain, oldest first.
    The newest is never among them."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (the newest checkpoint stays), got {keep!r}")
    best: dict[str, int] = {}
    for key, seq in keys_with_seq:
        best[key] = max(seq, best.get(key, seq))
    newest_first = sorted(best.items(), key=lambda ks: (ks[1], ks[0]), reverse=True)
    return [key for key, _ in reversed(newest_first[keep:])]


class Picked(NamedTuple):
    """The checkpoint :func:`pick_latest` chose, and the newer keys it had to skip."""

    key: str
    checkpoint: Checkpoint
    skipped: list[str]


BlobSource = bytes | bytearray | memoryview | Callable[[], bytes]


def pick_latest(
    blobs: Iterable[tuple[str, BlobSource]], secret: bytes | None = None
) -> Picked | None:
    """The newest checkpoint that decodes, trying newest first; ``None`` if none does.

    Each value is the blob or a zero-argument callable fetching it, so older checkpoints
    are only fetched when newer ones fail. A corrupt or unreadable one, or one whose run id
    or seq disagrees with its key (a copied-over blob), is skipped with a warning.
    """
    entries = list(blobs)

    def order(entry: tuple[str, Any]) -> tuple[int, str]:
        parsed = parse_snapshot_key(entry[0])
        return (parsed[1] if parsed else -1, entry[0])

    skipped: list[str] = []
    for key, source in sorted(entries, key=order, reverse=True):
        try:
            blob = source() if callable(source) else source
        except Exception as exc:
            log.warning(
                "checkpoint unreadable, falling back to the previous one",
                key=key,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            skipped.append(key)
            continue
        try:
            cp = decode_checkpoint(blob, secret)
            parsed = parse_snapshot_key(key)
            if parsed is not None and parsed != (cp.run_id, cp.seq):
                raise CheckpointCorrupt("its run id and seq disagree with its key")
        except CheckpointCorrupt as exc:
            log.warning(
                "checkpoint corrupt, falling back to the previous one", key=key, reason=str(exc)
            )
            skipped.append(key)
            continue
        return Picked(key, cp, skipped)
    return None


# --- the write-ahead journal ---------------------------------------------------------------
_RECORD_HEAD = struct.Struct("<II")  # payload length, crc32 of (length bytes + payload)
_U32 = struct.Struct("<I")


class Journal:
    """A local append-only file of msgpack records, one ``write`` system call each.

    Not fsynced per record, on purpose: what must survive is a kill -9 of the coordinator,
    and a written page sits in the OS page cache, which outlives the process; an fsync
    would cost milliseconds per completion on a real disk. A crash of the whole machine is
    covered by the snapshot cadence instead (snapshots go to durable storage), and
    :meth:`sync` is there for a caller that wants a barrier. One process writes a file;
    threads of it may share the journal.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._packer = msgpack.Packer()  # reused: a fresh one per record costs 3x the time
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Journal:
        """Open for appending, creating it if needed. A torn last record (the process died
        mid-write) is cut off first, so new records never land behind garbage; a file that
        is not a journal raises ``ValueError`` rather than being overwritten."""
        spath = os.fspath(path)
        fd = os.open(spath, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            data = _read_fd(fd)
            if len(data) < len(JOURNAL_MAGIC) and JOURNAL_MAGIC.startswith(data):
                os.ftruncate(fd, 0)  # empty, or a torn header: start afresh
                _write_all(fd, JOURNAL_MAGIC)
            elif not data.startswith(JOURNAL_MAGIC):
                raise ValueError(f"{spath} exists and is not an odibi journal")
            else:
                records, end, problem = _parse_journal(data)
                if problem is not None:
                    _warn_torn(spath, end, len(records), len(data) - end, problem)
                    os.ftruncate(fd, end)
        except BaseException:
            os.close(fd)
            raise
        return cls(spath, fd)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record. When this returns it survives a kill -9 of this process."""
        self.append_many([record])

    def append_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write several records with one system call; each is framed as by :meth:`append`."""
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")
        with self._lock:  # the packer is not thread-safe; writes stay whole records
            frames = []
            for record in records:
                payload = self._packer.pack(record)
                crc = zlib.crc32(payload, zlib.crc32(_U32.pack(len(payload))))
                frames.append(_RECORD_HEAD.pack(len(payload), crc))
                frames.append(payload)
            _write_all(self._fd, b"".join(frames))

    def sync(self) -> None:
        """fsync: make what was appended survive a machine crash too."""
        if self._fd is not None:
            os.fsync(self._fd)

    def truncate(self) -> None:
        """Drop every record; call once a snapshot holding them is safely stored."""
        if self._fd is None:
            raise ValueError(f"journal {self.path} is closed")
        os.ftruncate(self._fd, len(JOURNAL_MAGIC))

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @staticmethod
    def replay(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """The module's :func:`replay`, reachable from the class."""
        return replay(path)


def replay(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every intact record of a journal, in order; ``[]`` if there is none.

    Stops at the first bad record (torn by a kill mid-write, or damaged) with a warning:
    framing after it cannot be trusted.
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    if not data.startswith(JOURNAL_MAGIC):
        if data and not JOURNAL_MAGIC.startswith(data):
            log.warning("not an odibi journal, ignoring it", path=spath)
        return []
    records, end, problem = _parse_journal(data)
    if problem is not None:
        _warn_torn(spath, end, len(records), len(data) - end, problem)
    return records


def _parse_journal(data: bytes) -> tuple[list[dict[str, Any]], int, str | None]:
    """Records, the offset after the last good one, and what stopped the scan (or None)."""
    view = memoryview(data)
    n, pos = len(data), len(JOURNAL_MAGIC)
    head = _RECORD_HEAD.size
    out: list[dict[str, Any]] = []
    unpack = msgpack.unpackb
    while pos < n:
        if n - pos < head:
            return out, pos, "torn record header"
        length, crc = _RECORD_HEAD.unpack_from(data, pos)
        end = pos + head + length
        if end > n:
            return out, pos, "torn record"
        payload = view[pos + head : end]
        if zlib.crc32(payload, zlib.crc32(view[pos : pos + 4])) != crc:
            return out, pos, "record checksum mismatch"
        try:
            rec = unpack(payload)
        except Exception:
            return out, pos, "record is not msgpack"
        if not isinstance(rec, dict):
            return out, pos, "record is not a map"
        out.append(rec)
        pos = end
    return out, pos, None


def _warn_torn(path: str, offset: int, kept: int, dropped: int, reason: str) -> None:
    log.warning(
        "journal has a bad record; keeping the records before it",
        path=path,
        reason=reason,
        offset=offset,
        kept=kept,
        dropped_bytes=dropped,
    )


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
