"""Edge cases of durable runs (checkpoint format 2, the ledger, the recorder, lazy logging).

Tests marked "BUG" fail on the code they were written against; the others guard behaviour
that held and that no other test covers.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest
import structlog.testing
from conftest import PYTHON, alive
from test_durable import (
    PIPELINE,
    base_env,
    kill_half_way,
    lines,
    recorded_done,
    resume_and_check,
    write_pipeline,
)

from odibi_actor import DAGBuilder, DAGExecutor, DistributedExecutor
from odibi_actor._checkpoint import (
    DONE,
    INLINE_MAX,
    Checkpoint,
    Journal,
    apply_records,
    decode_checkpoint,
    encode_checkpoint,
    encode_result,
    node_fields,
    nodes_record,
    replay,
    result_key,
)
from odibi_actor._fingerprint import content_hash
from odibi_actor._persist import ResumeError
from odibi_actor._recorder import BLOB_RECORD, Ledger, Recorder
from odibi_actor._wire import Packed, pack
from odibi_actor.storage import _MEMORY, _MEMORY_LOCK, MemoryStorage, open_storage


# --- helpers ---------------------------------------------------------------------------------
def _mark(marker: str, name: str) -> None:
    with open(marker, "a") as f:
        f.write(name + "\n")


def bytes_pickling_to(size: int) -> bytes:
    """A bytes value whose protocol-5 pickle is exactly ``size`` bytes long."""
    for k in range(size):
        if len(pickle.dumps(b"x" * k, protocol=5)) == size:
            return b"x" * k
    raise AssertionError(size)


def exact(marker: str, name: str, size: int, x: Any) -> bytes:
    _mark(marker, name)
    return bytes_pickling_to(size)


def const(marker: str, name: str, value: Any, x: Any) -> Any:
    _mark(marker, name)
    return value


def small_array(marker: str, x: Any) -> np.ndarray:
    _mark(marker, "small_np")
    return np.arange(4, dtype=np.int32)  # tiny, but its data travels out of band


def multi(marker: str, x: Any) -> tuple[Any, ...]:
    _mark(marker, "multi")
    return (1, b"z" * 70_000, np.zeros(3), None)  # inline, worker-hashed blob, buffers, None


def summary(marker: str, *values: Any) -> str:
    _mark(marker, "summary")
    return repr([type(v).__name__ for v in values])


def mixed_dag(marker: Path) -> dict:
    m = str(marker)
    b = DAGBuilder()
    b.add_node(
        "e1024", functools.partial(exact, m, "e1024", INLINE_MAX), inputs=["x"], outputs=["o1024"]
    )
    b.add_node(
        "e1025",
        functools.partial(exact, m, "e1025", INLINE_MAX + 1),
        inputs=["x"],
        outputs=["o1025"],
    )
    b.add_node("none", functools.partial(const, m, "none", None), inputs=["x"], outputs=["on"])
    b.add_node("small_np", functools.partial(small_array, m), inputs=["x"], outputs=["onp"])
    b.add_node(
        "big", functools.partial(const, m, "big", b"y" * 100_000), inputs=["x"], outputs=["obig"]
    )
    # two outputs of one node with one content hash, and the same value from another node
    b.add_node(
        "twin", functools.partial(const, m, "twin", (7, 7)), inputs=["x"], outputs=["ta", "tb"]
    )
    b.add_node("dup", functools.partial(const, m, "dup", 7), inputs=["x"], outputs=["od"])
    b.add_node(
        "dupbig",
        functools.partial(const, m, "dupbig", b"y" * 100_000),
        inputs=["x"],
        outputs=["odb"],
    )
    b.add_node("multi", functools.partial(multi, m), inputs=["x"], outputs=["m1", "m2", "m3", "m4"])
    ins = ["o1024", "o1025", "on", "onp", "obig", "ta", "tb", "od", "odb", "m1", "m2", "m3", "m4"]
    b.add_node("summary", functools.partial(summary, m), inputs=ins, outputs=["s"])
    return b.build()


MIXED_NODES = 10


def plain(out: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("ndarray", v.dtype.str, v.tolist()) if isinstance(v, np.ndarray) else v
        for k, v in out.items()
    }


def block_store(root: Path) -> None:
    """Make a file store fail every write (its top-level folders are files)."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "results"):
        (root / sub).write_bytes(b"")


def unblock_store(root: Path) -> None:
    for sub in ("runs", "results"):
        p = root / sub
        if p.is_file():
            p.unlink()


def store_keys(url: str) -> list[str]:
    async def go() -> list[str]:
        async with open_storage(url) as s:
            return await s.list("")

    return anyio.run(go)


def newest_snapshot(url: str, run_id: str, secret: bytes | None = None) -> Checkpoint:
    async def go() -> Checkpoint:
        async with open_storage(url) as s:
            keys = await s.list(f"runs/{run_id}/checkpoints/")
            assert keys, "no snapshot in the store"
            return decode_checkpoint(await s.get(keys[-1]), secret)

    return anyio.run(go)


# --- inline and blob results: boundaries, numpy, None, twins, duplicates ----------------------
@pytest.mark.timeout(120)
def test_mixed_outputs_resume_from_the_journal_alone_then_from_the_store_alone(tmp_path):
    marker = tmp_path / "marker"
    reference = plain(DAGExecutor(mixed_dag(tmp_path / "ref-marker"), workers=2).run({"x": 1}))
    store = tmp_path / "store"
    url = store.as_uri()
    opts = {"workers": 2, "checkpoint": url, "run_id": "mixed"}

    # 1. the store is down for the whole run: only the local journal gets the results
    block_store(store)
    with structlog.testing.capture_logs():
        first = DistributedExecutor(mixed_dag(marker), **opts, journal_dir=str(tmp_path / "j"))
        out1 = first.run({"x": 1})
    assert plain(out1) == reference
    assert len(lines(marker)) == MIXED_NODES
    unblock_store(store)
    assert store_keys(url) == []

    # 2. resume from the journal alone: nothing runs, the store gets everything
    second = DistributedExecutor(mixed_dag(marker), **opts, journal_dir=str(tmp_path / "j"))
    assert plain(second.run({"x": 1}, resume=True)) == reference
    assert second.metrics.restored == MIXED_NODES
    assert len(lines(marker)) == MIXED_NODES, "a node recorded in the journal ran again"

    # what went inline and what went to the store, at the 1 KiB boundary
    cp = newest_snapshot(url, "mixed")
    results = {k.rsplit("/", 1)[-1] for k in store_keys(url) if k.startswith("results/")}
    inline = {n: set(r.inline) for n, r in cp.nodes.items()}
    assert inline["e1024"] == {cp.nodes["e1024"].outputs["o1024"]}
    assert cp.nodes["e1025"].outputs["o1025"] in results and not inline["e1025"]
    assert cp.nodes["small_np"].outputs["onp"] in results and not inline["small_np"]
    assert cp.nodes["twin"].outputs["ta"] == cp.nodes["twin"].outputs["tb"]
    assert cp.nodes["twin"].outputs["ta"] == cp.nodes["dup"].outputs["od"]
    assert cp.nodes["big"].outputs["obig"] == cp.nodes["dupbig"].outputs["odb"]

    # 3. resume from the store alone (another machine: an empty journal directory)
    third = DistributedExecutor(mixed_dag(marker), **opts, journal_dir=str(tmp_path / "j2"))
    assert plain(third.run({"x": 1}, resume=True)) == reference
    assert third.metrics.restored == MIXED_NODES
    assert len(lines(marker)) == MIXED_NODES


# --- BUG: a resume that runs nothing never gives the store the journal's records -------------
def chain3(marker: Path) -> dict:
    m = str(marker)
    b = DAGBuilder()
    b.add_node("a", functools.partial(const, m, "a", 1), inputs=["x"], outputs=["da"])
    b.add_node("b", functools.partial(const, m, "b", 2), inputs=["da"], outputs=["db"])
    b.add_node("c", functools.partial(const, m, "c", 3), inputs=["db"], outputs=["dc"])
    return b.build()


@pytest.mark.timeout(60)
def test_resume_that_reuses_everything_from_the_journal_syncs_it_to_the_store(tmp_path):
    """BUG: every output is small (inline), and the run's records are only in the journal
    (the store was down at the end, or the coordinator was killed after the last node and
    before the final flush). The resume reuses every node, so nothing is unsynced and no
    result is pending: ``Ledger.clean()`` is true and the recorder never writes a snapshot.
    The store never learns of the run; a resume on another machine runs everything again.
    (Before format 2 every restored output from the journal was a pending blob upload,
    which forced the snapshot.)"""
    marker = tmp_path / "marker"
    store = tmp_path / "store"
    url = store.as_uri()
    opts = {"workers": 1, "checkpoint": url, "run_id": "inl"}

    block_store(store)
    with structlog.testing.capture_logs():
        DAGExecutor(chain3(marker), **opts, journal_dir=str(tmp_path / "j")).run({"x": 0})
    unblock_store(store)
    assert len(lines(marker)) == 3

    resumed = DAGExecutor(chain3(marker), **opts, journal_dir=str(tmp_path / "j"))
    assert resumed.run({"x": 0}, resume=True) == {"da": 1, "db": 2, "dc": 3}
    assert resumed.metrics.restored == 3 and len(lines(marker)) == 3

    elsewhere = DAGExecutor(chain3(marker), **opts, journal_dir=str(tmp_path / "other"))
    with structlog.testing.capture_logs():
        assert elsewhere.run({"x": 0}, resume=True) == {"da": 1, "db": 2, "dc": 3}
    assert lines(marker)[3:] == [], "the finished, resumed run was not in the store"
    assert elsewhere.metrics.restored == 3


# --- BUG: a snapshot names results that were still uploading ---------------------------------
class GatedStore(MemoryStorage):
    """A memory store whose result uploads wait until the test opens the gate."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.uploading = anyio.Event()
        self.gate = anyio.Event()

    async def _put_if_absent(self, key: str, data: bytes) -> bool:
        self.uploading.set()
        await self.gate.wait()
        return await super()._put_if_absent(key, data)


def completion(name: str, value: Any) -> tuple:
    p = pack(value)
    return (name, 1, 0.01, ["d_" + name], [p], [content_hash(p)])


@pytest.mark.timeout(30)
def test_snapshot_never_names_a_result_the_store_does_not_have(tmp_path):
    """BUG (_recorder.py Recorder._sync_once): results are uploaded first, but the node
    records are taken for the snapshot *after* the uploads, so a node that completed while
    they were in flight is in the snapshot while its result (pending, not uploaded) is not
    in the store. Lose the journal (the machine) and resume: that output is 'unusable' and
    its node runs again, against the documented rule "a snapshot must never name a result
    the store does not have"."""
    name = f"gated-{os.getpid()}-{id(tmp_path)}"

    async def main() -> tuple[set[str], Checkpoint]:
        cp = Checkpoint("gated", "dag")
        ledger = Ledger(str(tmp_path / "j.wal"), cp, {"a": "fa", "b": "fb"}, every=1)
        store = GatedStore(name)
        recorder = Recorder(store, ledger, cp)
        try:
            ledger.record([completion("a", b"A" * 5000)])
            async with anyio.create_task_group() as tg:
                tg.start_soon(recorder._sync_once)
                await store.uploading.wait()
                ledger.record([completion("b", b"B" * 5000)])  # finishes meanwhile
                store.gate.set()
            keys = set(await store.list(""))
            snaps = sorted(k for k in keys if k.endswith(".ckpt"))
            return keys, decode_checkpoint(await store.get(snaps[-1]))
        finally:
            ledger.close()

    try:
        keys, snap = anyio.run(main)
    finally:
        with _MEMORY_LOCK:
            _MEMORY.pop(name, None)
    missing = sorted(
        n
        for n, rec in snap.nodes.items()
        for h in rec.outputs.values()
        if h not in rec.inline and result_key(h) not in keys
    )
    assert missing == [], f"the snapshot names results the store does not have: {missing}"


# --- BUG: the cache crashes on a node whose outputs are equal ---------------------------------
def pair(x: int) -> tuple[int, int]:
    return (7, 7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_cache_with_a_node_whose_two_outputs_are_equal(tmp_path, checkpoint):
    """BUG (_durable.py RunDurability.completed): outputs are collected per content hash,
    so two equal outputs give 2 hashes but 1 value; Store(key, hashes, values) then makes
    the cache actor crash on zip(strict=True), and with it the whole run (ActorCrashed)."""
    b = DAGBuilder()
    b.add_node("twin", pair, inputs=["x"], outputs=["a", "b"])
    opts: dict[str, Any] = {"workers": 1, "cache": (tmp_path / "cache").as_uri()}
    if checkpoint:
        opts.update(
            checkpoint=(tmp_path / "store").as_uri(), run_id="twin", journal_dir=str(tmp_path / "j")
        )
    assert DAGExecutor(b.build(), **opts).run({"x": 1}) == {"a": 7, "b": 7}
    again = DAGExecutor(b.build(), **opts)
    assert again.run({"x": 1}) == {"a": 7, "b": 7}
    assert again.metrics.cache_hits == 1


# --- BUG (security): inline results in the journal bypass the cluster secret -----------------
def inc(x: int) -> int:
    return x + 1


def dbl(a: int) -> int:
    return a * 2


@pytest.mark.timeout(60)
def test_forged_inline_result_in_the_journal_is_not_unpickled_under_a_secret(tmp_path):
    """BUG: with a cluster secret, result blobs (in the store and in the journal) carry an
    HMAC checked before anything is unpickled, so a journal record could only point at a
    signed result. An inline result in a journal record is checked only against its
    (unkeyed) content hash, which anyone can compute: whoever can append to the journal
    makes the resume unpickle bytes of their choosing (code execution)."""
    secret = b"k" * 32
    url = (tmp_path / "store").as_uri()
    b = DAGBuilder()
    b.add_node("a", inc, inputs=["x"], outputs=["da"])
    b.add_node("b", dbl, inputs=["da"], outputs=["db"])
    nodes = b.build()
    opts = {
        "workers": 1,
        "checkpoint": url,
        "run_id": "sig",
        "secret": secret,
        "journal_dir": str(tmp_path / "j"),
    }
    assert DAGExecutor(nodes, **opts).run({"x": 1}) == {"da": 2, "db": 4}

    fingerprint = newest_snapshot(url, "sig", secret).nodes["a"].fingerprint
    evil = pickle.dumps("forged, never signed", protocol=5)
    h = content_hash(Packed(evil, []))
    (wal,) = (tmp_path / "j").glob("*.wal")
    with Journal.open(wal) as journal:
        journal.append(
            nodes_record(msgpack.packb({"a": [DONE, 1, 0.0, {"da": h}, fingerprint, {h: evil}]}))
        )

    with structlog.testing.capture_logs():
        out = DAGExecutor(nodes, **opts).run({"x": 1}, resume=True)
    assert out == {"da": 2, "db": 4}, f"an unsigned inline result was unpickled: {out}"


# --- corrupt inline results, old journal records ----------------------------------------------
@pytest.mark.timeout(60)
def test_inline_result_not_matching_its_hash_reruns_that_node_and_its_descendants(tmp_path):
    marker = tmp_path / "marker"
    url = (tmp_path / "store").as_uri()
    opts = {"workers": 2, "checkpoint": url, "run_id": "forged", "journal_dir": str(tmp_path / "j")}
    assert DistributedExecutor(chain3(marker), **opts).run({"x": 0}) == {"da": 1, "db": 2, "dc": 3}

    async def forge() -> None:
        async with open_storage(url) as s:
            keys = await s.list("runs/forged/checkpoints/")
            cp = decode_checkpoint(await s.get(keys[-1]))
            (h,) = cp.nodes["b"].inline
            cp.nodes["b"].inline[h] = pickle.dumps(12345, protocol=5)  # checksum recomputed
            await s.put(keys[-1], encode_checkpoint(cp))

    anyio.run(forge)
    ex = DistributedExecutor(chain3(marker), **opts)
    with structlog.testing.capture_logs() as logs:
        assert ex.run({"x": 0}, resume=True) == {"da": 1, "db": 2, "dc": 3}
    assert lines(marker)[3:] == ["b", "c"]
    assert ex.metrics.restored == 1
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any(
        e.get("nodes") == ["b"] and "content hash" in e.get("error", "") for e in warnings
    ), warnings


@pytest.mark.timeout(60)
def test_journal_of_old_node_records_mixed_with_new_nodes_records_resumes(tmp_path):
    """A journal written before format 2 ("node" records, every result a "blob" record),
    continued after the upgrade ("nodes" records): replayed in order, nothing reruns."""
    marker = tmp_path / "marker"
    url = (tmp_path / "store").as_uri()
    store = tmp_path / "store"
    opts = {"workers": 1, "checkpoint": url, "run_id": "old"}
    journal_dir = tmp_path / "j"
    block_store(store)
    with structlog.testing.capture_logs():
        DAGExecutor(mixed_dag(marker), **opts, journal_dir=str(journal_dir)).run({"x": 1})
    unblock_store(store)
    (wal,) = journal_dir.glob("*.wal")
    records = replay(wal)
    rewritten: list[dict[str, Any]] = []
    old_style = 0
    for r in records:
        if r.get("t") != "nodes":
            rewritten.append(r)
            continue
        cp = Checkpoint("", "")
        apply_records(cp, [r])
        for name, rec in cp.nodes.items():
            if old_style % 2 == 0:  # as version 1 wrote it: a 5-field record, blobs apart
                for h, data in rec.inline.items():
                    rewritten.append(
                        {"t": BLOB_RECORD, "h": h, "b": encode_result(Packed(data, []))}
                    )
                rec.inline = {}
                rewritten.append({"t": "node", "node": name, "rec": node_fields(rec)})
            else:
                rewritten.append(nodes_record(msgpack.packb({name: node_fields(rec)})))
            old_style += 1
    wal.unlink()
    with Journal.open(wal) as journal:
        journal.append_many(rewritten)

    n = len(lines(marker))
    ex = DAGExecutor(mixed_dag(marker), **opts, journal_dir=str(journal_dir))
    out = ex.run({"x": 1}, resume=True)
    assert lines(marker)[n:] == []
    assert ex.metrics.restored == MIXED_NODES
    ref = DAGExecutor(mixed_dag(tmp_path / "ref"), workers=1).run({"x": 1})
    assert plain(out) == plain(ref)


# --- kill -9 with a snapshot after every completion -------------------------------------------
SNAPSHOT_OFTEN = """
if __name__ == "__main__":
    import odibi_actor._persist as _persist
    import odibi_actor.executor as _executor

    _executor.Persistence = functools.partial(_persist.Persistence, every=1, interval=0.05)
"""


@pytest.mark.timeout(120)
def test_kill9_between_frequent_snapshots_then_resume(tmp_path, monkeypatch):
    script = write_pipeline(tmp_path)
    script.write_text(PIPELINE.replace('\n\nif __name__ == "__main__":\n', SNAPSHOT_OFTEN, 1))
    marker, journal = tmp_path / "marker", tmp_path / "journal"
    url = (tmp_path / "store").as_uri()
    env = base_env(tmp_path, ODIBI_TEST_MARKER=str(marker))
    cmd = [PYTHON, str(script), url, "often", str(journal)]
    sockets = set(glob.glob(os.path.join(tempfile.gettempdir(), "odibi-*.sock")))
    try:
        before = kill_half_way([*cmd, "record", str(tmp_path / "o1")], env, marker, tmp_path / "l")
    finally:  # a coordinator killed with -9 cannot remove its ipc socket file
        for path in set(glob.glob(os.path.join(tempfile.gettempdir(), "odibi-*.sock"))) - sockets:
            if not alive(int(os.path.basename(path).split("-")[1])):
                with contextlib.suppress(OSError):
                    os.unlink(path)
    done_before = recorded_done(url, "often", journal)
    resume_and_check(cmd, env, tmp_path, monkeypatch, before, done_before)


# --- BUG: local workers spawned before a slow durable open warn about CurveZMQ ---------------
@pytest.mark.timeout(90)
def test_slow_durable_open_does_not_make_local_workers_warn(tmp_path, monkeypatch, capfd):
    """BUG (executor.py _run_processes): local workers are now spawned before durable state
    opens, and the pool binds only after it. When opening takes longer than a worker's
    heartbeat timeout (6 s: a resume fetching many results from Azure, hashing a large
    initial dataset), every worker logs "coordinator not answering; reconnecting" with a
    hint about CurveZMQ keys, although nothing is wrong."""
    import odibi_actor._persist as persist_module
    from odibi_actor.worker import HEARTBEAT_TIMEOUT

    real_open = persist_module.Persistence.open

    async def slow_open(self: Any, data: Any, packed: bool) -> Any:
        await anyio.sleep(HEARTBEAT_TIMEOUT + 3)  # a slow store: longer than the timeout
        return await real_open(self, data, packed)

    monkeypatch.setattr(persist_module.Persistence, "open", slow_open)
    b = DAGBuilder()
    b.add_node("a", inc, inputs=["x"], outputs=["da"])
    ex = DistributedExecutor(
        b.build(),
        workers=2,
        checkpoint=(tmp_path / "s").as_uri(),
        run_id="slow",
        journal_dir=str(tmp_path / "j"),
    )
    assert ex.run({"x": 1}) == {"da": 2}
    err = capfd.readouterr().err
    assert "coordinator not answering" not in err, err[-2000:]


# --- logging --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_import_does_not_touch_structlog_and_user_configuration_is_kept(tmp_path):
    code = """
import logging, sys
import odibi_actor
from odibi_actor import DAGBuilder, DAGExecutor
assert "structlog" not in sys.modules, "importing odibi_actor imported structlog"
import structlog
seen = []
def grab(logger, method, event):
    seen.append((method, event.get("event")))
    raise structlog.DropEvent
structlog.configure(processors=[grab],
                    wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
def bad(x):
    raise ValueError("boom")
b = DAGBuilder()
b.add_node("bad", bad, inputs=["x"], outputs=["y"])
try:
    DAGExecutor(b.build(), workers=1).run({"x": 1})
except Exception as exc:
    print("raised", type(exc).__name__)
assert structlog.get_config()["processors"] == [grab], "our configuration replaced theirs"
assert ("error", "node failed") in seen, seen
print("ok")
"""
    env = base_env(tmp_path)
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["raised", "NodeFailedError", "ok"], proc.stdout
    assert "node failed" not in proc.stderr  # their processor dropped it, ours printed nothing


@pytest.mark.timeout(60)
def test_cli_log_level_info_prints_info_lines(tmp_path):
    target = tmp_path / "tiny_target.py"
    target.write_text(
        "def inc(x):\n    return x + 1\n\n\n"
        "def dag():\n    from odibi_actor import DAGBuilder\n    b = DAGBuilder()\n"
        "    b.add_node('inc', inc, inputs=['x'], outputs=['y'])\n    return b.build()\n\n\n"
        "def initial_data():\n    return {'x': 1}\n"
    )
    env = base_env(tmp_path)
    args = [
        sys.executable,
        "-m",
        "odibi_actor.cli",
        "run",
        str(target),
        "--workers",
        "1",
        "--no-progress",
        "--no-cache",
        "--log-level",
        "info",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run starting" in proc.stderr and "worker joined" in proc.stderr, proc.stderr
    quiet = subprocess.run(args[:-2], capture_output=True, text=True, env=env, timeout=50)
    assert quiet.returncode == 0 and "run starting" not in quiet.stderr
    shutil.rmtree(tmp_path / "xdg-state", ignore_errors=True)


# --- a lost stored output: its node and everything made from it run again ------------------
def fresh_bytes(x: int) -> bytes:
    return os.urandom(4000)  # not deterministic: a rerun makes something else


def first_bytes(blob: bytes) -> bytes:
    return blob[:16]


@pytest.mark.timeout(60)
def test_a_lost_stored_output_reruns_its_node_and_its_descendants(tmp_path):
    """Restoring b's old output beside a's new one would return a result made from data
    that no longer exists: a resume must run b again too."""
    b = DAGBuilder()
    b.add_node("a", fresh_bytes, inputs=["x"], outputs=["blob"])
    b.add_node("b", first_bytes, inputs=["blob"], outputs=["head"])
    b.add_node("c", first_bytes, inputs=["x2"], outputs=["other"])
    store = tmp_path / "store"
    opts: dict[str, Any] = {"checkpoint": store.as_uri(), "run_id": "lost"}
    data = {"x": 1, "x2": b"unrelated input"}
    first = DAGExecutor(b.build(), journal_dir=str(tmp_path / "j1"), **opts).run(data)
    lost = store / result_key(content_hash(pack(first["blob"])))
    assert lost.exists()
    lost.unlink()
    ex = DAGExecutor(b.build(), journal_dir=str(tmp_path / "j2"), **opts)  # another machine
    out = ex.run(data, resume=True)
    assert out["blob"] != first["blob"], "a ran again and made new bytes"
    assert out["head"] == out["blob"][:16], "b's output must come from a's current output"
    assert ex.metrics.restored == 1  # c only


@pytest.mark.timeout(60)
def test_a_journal_only_run_resumed_with_another_dag_is_refused(tmp_path):
    """Killed (here: its store down) before any snapshot, a run is known only from its
    journal, which does not say which DAG wrote it: it is judged node by node, and a DAG
    with none of its nodes is refused as a snapshot of another DAG would be."""
    marker, store = tmp_path / "marker", tmp_path / "store"
    opts: dict[str, Any] = {
        "checkpoint": store.as_uri(),
        "run_id": "j",
        "journal_dir": str(tmp_path / "j"),
    }
    block_store(store)
    with structlog.testing.capture_logs():
        DAGExecutor(chain3(marker), **opts).run({"x": 0})
    unblock_store(store)
    other = DAGBuilder()
    other.add_node("z", functools.partial(const, str(marker), "z", 9), inputs=["x"], outputs=["dz"])
    with pytest.raises(ResumeError, match="another DAG"):
        DAGExecutor(other.build(), **opts).run({"x": 0}, resume=True)
    ex = DAGExecutor(chain3(marker), **opts)
    assert ex.run({"x": 0}, resume=True) == {"da": 1, "db": 2, "dc": 3}
    assert ex.metrics.restored == 3 and lines(marker) == ["a", "b", "c"]


class SilentStore(MemoryStorage):
    """A store whose listing, while ``silent``, neither answers nor fails: a network that
    drops packets."""

    silent = True

    async def _list(self, prefix: str) -> list[str]:
        while self.silent:
            await anyio.sleep(0.01)
        return await super()._list(prefix)


@pytest.mark.timeout(60)
def test_a_store_that_never_answers_does_not_hold_the_run(tmp_path, monkeypatch):
    import odibi_actor._persist as persist_module

    name = f"silent-{os.getpid()}-{id(tmp_path)}"
    monkeypatch.setattr(persist_module, "STORE_PATIENCE", 0.5)
    store = SilentStore(name)
    monkeypatch.setattr(persist_module, "_open", lambda url: store)
    marker = tmp_path / "marker"

    def answer_again(progress: Any) -> None:  # the run began: the store is back
        store.silent = False

    opts: dict[str, Any] = {
        "checkpoint": "memory://silent",
        "run_id": "s",
        "journal_dir": str(tmp_path / "j"),
        "progress": answer_again,
    }
    try:
        with structlog.testing.capture_logs() as logs:
            assert DAGExecutor(chain3(marker), **opts).run({"x": 0}) == {"da": 1, "db": 2, "dc": 3}
            store.silent = True
            ex = DAGExecutor(chain3(marker), **opts)
            assert ex.run({"x": 0}, resume=True) == {"da": 1, "db": 2, "dc": 3}
    finally:
        with _MEMORY_LOCK:
            _MEMORY.pop(name, None)
    # the snapshot emptied the journal and the store says nothing: everything runs again,
    # within the patience, instead of the resume waiting on the store
    assert ex.metrics.restored == 0 and lines(marker) == ["a", "b", "c"] * 2
    said = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert "cannot clear the earlier checkpoints of this run id" in said
    assert "cannot read checkpoints; resuming from the local journal only" in said
