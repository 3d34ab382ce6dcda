"""Checkpoints, result blobs, the journal and fingerprints: the data side of resuming runs."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import structlog.testing
from conftest import PYTHON, load_module

from odibi_actor import DAGBuilder
from odibi_actor._checkpoint import (
    CHECKPOINT_MAGIC,
    JOURNAL_MAGIC,
    Checkpoint,
    CheckpointCorrupt,
    CheckpointMismatch,
    Journal,
    NodeRecord,
    ResultCorrupt,
    apply_records,
    check_compatible,
    completion_record,
    decode_checkpoint,
    decode_result,
    encode_checkpoint,
    encode_result,
    parse_snapshot_key,
    pick_latest,
    prune,
    replay,
    result_key,
    reusable_nodes,
    snapshot_key,
)
from odibi_actor._dag import DAGNode
from odibi_actor._fingerprint import (
    cache_key,
    content_hash,
    dag_fingerprint,
    dag_fingerprints,
    function_fingerprint,
    node_fingerprint,
    node_fingerprints,
)
from odibi_actor._wire import Packed, decode, encode, pack, unpack
from odibi_actor.errors import CycleError, DAGValidationError

SECRET = b"cluster-secret-for-tests"
H1 = "1" * 64
H2 = "2" * 64


# --- helpers -------------------------------------------------------------------------------
def sample_checkpoint(seq: int = 3, run_id: str = "run-1") -> Checkpoint:
    return Checkpoint(
        run_id=run_id,
        dag_fingerprint="d" * 64,
        nodes={
            "load": NodeRecord("done", 1, 0.25, {"raw": H1}, "a" * 64),
            "clean": NodeRecord("done", 2, 1.5, {"rows": H2, "bad": H1}, "b" * 64),
            "report ü": NodeRecord("waiting", 0, 0.0, {}, "c" * 64),
        },
        created=1_700_000_000.5,
        seq=seq,
    )


def signed_by_checksum(body: dict[str, Any]) -> bytes:
    """A checkpoint with a valid checksum around an arbitrary body (the documented format)."""
    raw = msgpack.packb(body)
    digest = hashlib.blake2b(CHECKPOINT_MAGIC + raw, digest_size=32).digest()
    return CHECKPOINT_MAGIC + msgpack.packb({"alg": "blake2b", "sum": digest, "body": raw})


def good_body() -> dict[str, Any]:
    return {
        "format": "odibi-checkpoint",
        "version": 1,
        "run_id": "r",
        "dag_fingerprint": "f" * 64,
        "created": 1.0,
        "seq": 1,
        "nodes": {"a": ["done", 1, 0.5, {"x": H1}, "fp"]},
    }


def flipped(blob: bytes, i: int) -> bytes:
    b = bytearray(blob)
    b[i] ^= 0xFF
    return bytes(b)


def step(x: Any) -> Any:
    return x


def other_step(x: Any) -> Any:
    return [x, x]


def join2(a: Any, b: Any) -> Any:
    return (a, b)


def scaled(x: Any, scale: int = 1) -> Any:
    return x * scale


def apply_fn(fn: Any, x: Any) -> Any:
    return fn(x)


def make_adder(n: int) -> Any:
    def add(x: Any) -> Any:
        return x + n

    return add


# --- content hashes ------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_content_hash_equal_for_equal_values_and_different_otherwise():
    assert content_hash(pack({"a": [1, 2], "b": "x"})) == content_hash(
        pack({"a": [1, 2], "b": "x"})
    )
    assert content_hash(pack({"a": [1, 2]})) != content_hash(pack({"a": [1, 3]}))
    assert content_hash(pack(1)) != content_hash(pack(1.0))
    h = content_hash(pack(None))
    assert len(h) == 64 and int(h, 16) >= 0


@pytest.mark.timeout(30)
def test_content_hash_of_numpy_arrays_travelling_out_of_band():
    a = np.arange(100_000, dtype=np.float64)
    pa = pack({"arr": a, "k": 1})
    assert pa.buffers, "numpy should travel out-of-band with pickle 5"
    assert content_hash(pa) == content_hash(pack({"arr": a.copy(), "k": 1}))
    b = a.copy()
    b[77_777] += 1.0
    assert content_hash(pa) != content_hash(pack({"arr": b, "k": 1}))
    assert content_hash(pa) != content_hash(pack({"arr": a.astype(np.float32), "k": 1}))
    # the same value after a trip over the wire (memoryviews into frames) hashes the same
    _, values = decode(encode({"t": "results"}, [pa]))
    assert content_hash(values[0]) == content_hash(pa)


@pytest.mark.timeout(30)
def test_content_hash_frames_lengths_so_splits_do_not_collide():
    variants = [
        Packed(b"abc", []),
        Packed(b"ab", [memoryview(b"c")]),
        Packed(b"a", [memoryview(b"bc")]),
        Packed(b"a", [memoryview(b"b"), memoryview(b"c")]),
        Packed(b"a", [memoryview(b"bc"), memoryview(b"")]),
        Packed(b"", [memoryview(b"abc")]),
    ]
    assert len({content_hash(p) for p in variants}) == len(variants)
    # a buffer viewed with another item format hashes as its bytes
    arr = np.arange(8, dtype=np.int64)
    assert content_hash(Packed(b"", [memoryview(arr)])) == content_hash(
        Packed(b"", [memoryview(arr.tobytes())])
    )


# --- function fingerprints -----------------------------------------------------------------
STEP_V1 = """
def transform(x):
    return x + 1
"""
STEP_V2 = """
def transform(x):
    return x + 2
"""


@pytest.mark.timeout(30)
def test_function_fingerprint_changes_when_the_source_changes(tmp_path):
    paths = []
    for i, src in enumerate([STEP_V1, STEP_V2, STEP_V1]):
        d = tmp_path / f"v{i}"
        d.mkdir()
        (d / "ckfp_transform.py").write_text(src)
        paths.append(d / "ckfp_transform.py")
    # same module name and qualname each time: only the source differs
    v1, v2, v1_again = (load_module(p, "ckfp_transform").transform for p in paths)
    assert function_fingerprint(v1) != function_fingerprint(v2)
    assert function_fingerprint(v1) == function_fingerprint(v1_again)


HELPER_MODULE = """
import threading
import structlog
log = structlog.get_logger("ckfp")
lock = threading.Lock()
LIMIT = {limit}
def helper(x):
    return x * {factor}
def step(xs):
    log.info("step")
    with lock:
        return [helper(v) for v in xs if v < LIMIT]
"""


@pytest.mark.timeout(30)
def test_function_fingerprint_follows_helpers_and_constants(tmp_path):
    fps = []
    for i, (limit, factor) in enumerate([(5, 2), (6, 2), (5, 3), (5, 2)]):
        d = tmp_path / f"v{i}"
        d.mkdir()
        (d / "ckfp_helpers.py").write_text(HELPER_MODULE.format(limit=limit, factor=factor))
        with structlog.testing.capture_logs() as logs:
            fps.append(
                function_fingerprint(load_module(d / "ckfp_helpers.py", "ckfp_helpers").step)
            )
        assert logs == []  # a logger or a lock among the globals is not a reason to give up
    assert fps[0] == fps[3]
    assert len({fps[0], fps[1], fps[2]}) == 3


@pytest.mark.timeout(30)
def test_function_fingerprint_covers_parameters_closures_and_nested_functions():
    fp = function_fingerprint
    assert fp(functools.partial(scaled, scale=2)) == fp(functools.partial(scaled, scale=2))
    assert fp(functools.partial(scaled, scale=2)) != fp(functools.partial(scaled, scale=3))
    assert fp(functools.partial(scaled, 2)) != fp(functools.partial(scaled, scale=2))
    assert fp(functools.partial(scaled, scale=2)) != fp(scaled)
    assert fp(make_adder(1)) == fp(make_adder(1))
    assert fp(make_adder(1)) != fp(make_adder(2))
    arr = np.arange(10.0)
    assert fp(functools.partial(scaled, arr)) == fp(functools.partial(scaled, arr.copy()))
    assert fp(functools.partial(scaled, arr)) != fp(functools.partial(scaled, arr + 1))
    # a function passed as a parameter counts by its code, not only its name
    assert fp(functools.partial(apply_fn, make_adder(1))) != fp(
        functools.partial(apply_fn, make_adder(2))
    )
    assert fp(step) != fp(other_step)


class Scale:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: Any) -> Any:
        return x * self.k

    def apply(self, x: Any) -> Any:
        return x * self.k


@pytest.mark.timeout(30)
def test_function_fingerprint_of_odd_callables_is_stable_and_never_raises():
    lock = threading.Lock()

    def holds_a_lock(x: Any) -> Any:  # a closure over something nothing can pickle
        with lock:
            return x

    def recursive(n: int) -> int:  # refers to itself through its closure cell
        return 1 if n <= 0 else recursive(n - 1)

    weird = [
        len,
        str.upper,
        np.add,
        Scale,
        Scale(2),
        Scale(2).apply,
        lambda x: x,
        holds_a_lock,
        recursive,
        functools.partial(functools.partial(scaled, 1)),
    ]
    with structlog.testing.capture_logs() as logs:
        for fn in weird:
            first = function_fingerprint(fn)
            assert len(first) == 64 and first == function_fingerprint(fn)
    assert function_fingerprint(Scale(2)) != function_fingerprint(Scale(3))
    assert function_fingerprint(Scale(2).apply) != function_fingerprint(Scale(3).apply)
    assert [e for e in logs if e["event"] == "fingerprint_unstable"], logs


@pytest.mark.timeout(30)
def test_unstable_fingerprint_differs_in_another_process(tmp_path):
    mod = tmp_path / "ckfp_unstable.py"
    mod.write_text(
        textwrap.dedent(
            """
            import threading
            _lock = threading.Lock()
            def make():
                lock = _lock
                def guarded(x):
                    with lock:
                        return x
                return guarded
            """
        )
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ckfp_unstable as m;"
        "from odibi_actor._fingerprint import function_fingerprint as f; print(f(m.make()))"
    )
    runs = [
        subprocess.run(
            [PYTHON, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.strip() != runs[1].stdout.strip()


STABLE_MODULE = """
import functools

import numpy as np


def step(x, scale=2):
    return x * scale


def make_adder(n):
    def add(x):
        return x + n

    return add


double = lambda x: x * 2  # noqa: E731


class Scaler:
    def __init__(self, k):
        self.k = {"k": k, "names": ["a", "b"]}

    def __call__(self, x):
        return x * self.k["k"]

    def apply(self, x):
        return x * self.k["k"]


def callables():
    return {
        "step": step,
        "partial": functools.partial(step, scale=3),
        "partial_array": functools.partial(step, np.arange(5.0)),
        "closure": make_adder(7),
        "lambda": double,
        "instance": Scaler(4),
        "method": Scaler(5).apply,
        "builtin": len,
    }


def nodes():
    from odibi_actor import DAGBuilder

    b = DAGBuilder()
    b.add_node("a", step, inputs=["x"], outputs=["y"])
    b.add_node("b", make_adder(1), inputs=["y"], outputs=["z"])
    b.add_node("c", functools.partial(step, scale=5), inputs=["y", "z"], outputs=["w"])
    return b.build()
"""

STABLE_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import ckfp_stable as m
from odibi_actor._fingerprint import dag_fingerprint, dag_fingerprints, function_fingerprint
out = {k: function_fingerprint(v) for k, v in m.callables().items()}
out["lineage"] = dag_fingerprints(m.nodes(), {"x": "e" * 64})
out["dag"] = dag_fingerprint(m.nodes(), {"x": "e" * 64})
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_fingerprints_are_stable_across_processes(tmp_path):
    (tmp_path / "ckfp_stable.py").write_text(STABLE_MODULE)
    results = []
    for seed in ("1", "2"):  # different string hashing in each child
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run(
            [PYTHON, "-c", STABLE_SCRIPT, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        results.append(json.loads(r.stdout))
    sys.path.insert(0, str(tmp_path))
    try:
        import ckfp_stable as m  # type: ignore[import-not-found]

        here = {k: function_fingerprint(v) for k, v in m.callables().items()}
        here["lineage"] = dag_fingerprints(m.nodes(), {"x": "e" * 64})
        here["dag"] = dag_fingerprint(m.nodes(), {"x": "e" * 64})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ckfp_stable", None)
    assert results[0] == results[1] == here
    assert len(set(here) - {"lineage"}) == len({v for k, v in here.items() if k != "lineage"})


# --- node and lineage fingerprints ---------------------------------------------------------
def diamondish(b_fn: Any = step, **b_opts: Any) -> dict[str, DAGNode]:
    """x -> a -> b -> d, a -> c (b's sibling), b -> e, d+c -> f; plus an unrelated root r."""
    g = DAGBuilder()
    g.add_node("a", step, inputs=["x"], outputs=["A"])
    g.add_node("b", b_fn, inputs=["A"], outputs=["B"], **b_opts)
    g.add_node("c", step, inputs=["A"], outputs=["C"])
    g.add_node("d", step, inputs=["B"], outputs=["D"])
    g.add_node("e", step, inputs=["B"], outputs=["E"])
    g.add_node("f", join2, inputs=["D", "C"], outputs=["F"])
    g.add_node("r", step, inputs=["y"], outputs=["R"])
    return g.build()


@pytest.mark.timeout(30)
def test_changing_one_node_changes_it_and_its_descendants_only():
    before = dag_fingerprints(diamondish())
    after = dag_fingerprints(diamondish(other_step))
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"b", "d", "e", "f"}
    assert dag_fingerprint(diamondish()) != dag_fingerprint(diamondish(other_step))
    assert dag_fingerprint(diamondish()) == dag_fingerprint(diamondish())


@pytest.mark.timeout(30)
def test_retries_and_timeouts_do_not_change_fingerprints():
    base = dag_fingerprints(diamondish())
    assert dag_fingerprints(diamondish(retries=3, timeout=5.0, retry_delay=2.0)) == base
    node = diamondish()["b"]
    assert node_fingerprint(node) == node_fingerprint(diamondish(retries=9)["b"])


@pytest.mark.timeout(30)
def test_wiring_and_initial_data_are_part_of_the_lineage():
    base = diamondish()
    fps = dag_fingerprints(base)
    # the same function reading other inputs, or writing other outputs, is another node
    a = base["a"]
    assert node_fingerprint(a) != node_fingerprint(DAGNode("a", step, ("y",), ("A",)))
    assert node_fingerprint(a) != node_fingerprint(DAGNode("a", step, ("x",), ("A2",)))
    # changed initial data changes exactly its consumers and their descendants
    with_x = dag_fingerprints(base, {"x": H1, "y": H2})
    other_x = dag_fingerprints(base, {"x": H2, "y": H2})
    assert {n for n in fps if with_x[n] != other_x[n]} == {"a", "b", "c", "d", "e", "f"}
    # node_fingerprints is node_fingerprint for every node
    assert node_fingerprints(base) == {name: node_fingerprint(n) for name, n in base.items()}
    # unbuilt nodes (dependencies not wired) get the same fingerprints
    raw = [DAGNode(n.name, n.fn, n.inputs, n.outputs) for n in base.values()]
    assert dag_fingerprints(list(reversed(raw))) == fps


@pytest.mark.timeout(30)
def test_dag_fingerprints_refuse_cycles_and_clashes():
    loop = [DAGNode("p", step, ("b",), ("a",)), DAGNode("q", step, ("a",), ("b",))]
    with pytest.raises(CycleError):
        dag_fingerprints(loop)
    clash = [DAGNode("p", step, (), ("a",)), DAGNode("q", step, (), ("a",))]
    with pytest.raises(DAGValidationError, match="produced by two nodes"):
        dag_fingerprints(clash)


@pytest.mark.timeout(120)
def test_100k_node_chain_without_recursion():
    n = 100_000
    nodes = [DAGNode(f"n{i}", step, (f"d{i - 1}",) if i else ("x",), (f"d{i}",)) for i in range(n)]
    fps = dag_fingerprints(nodes)
    assert len(fps) == n and len(set(fps.values())) == n
    assert len(dag_fingerprint(nodes)) == 64


@pytest.mark.timeout(30)
def test_cache_key():
    fp = node_fingerprint(diamondish()["f"])
    assert cache_key(fp, [H1, H2]) == cache_key(fp, [H1, H2])
    assert cache_key(fp, [H1, H2]) != cache_key(fp, [H2, H1])
    assert cache_key(fp, [H1]) != cache_key(fp, [H1, H2])
    assert cache_key(fp, [H1 + H2]) != cache_key(fp, [H1, H2])
    assert cache_key(node_fingerprint(diamondish()["a"]), [H1]) != cache_key(fp, [H1])


# --- checkpoints ---------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_checkpoint_roundtrip_plain_and_signed():
    cp = sample_checkpoint()
    assert decode_checkpoint(encode_checkpoint(cp)) == cp
    assert decode_checkpoint(encode_checkpoint(cp, SECRET), SECRET) == cp
    assert decode_checkpoint(memoryview(encode_checkpoint(cp))) == cp
    empty = Checkpoint("r", "f" * 64)
    assert decode_checkpoint(encode_checkpoint(empty)) == empty
    assert cp.done() == {"load", "clean"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret", [None, SECRET])
def test_every_flipped_byte_and_every_truncation_is_detected(secret):
    blob = encode_checkpoint(sample_checkpoint(), secret)
    for i in range(len(blob)):
        with pytest.raises(CheckpointCorrupt):
            decode_checkpoint(flipped(blob, i), secret)
    for n in range(len(blob)):
        with pytest.raises(CheckpointCorrupt):
            decode_checkpoint(blob[:n], secret)
    with pytest.raises(CheckpointCorrupt):
        decode_checkpoint(blob + b"\x00", secret)


@pytest.mark.timeout(30)
def test_corrupt_checkpoint_messages_say_what_and_show_no_bytes():
    blob = encode_checkpoint(sample_checkpoint())
    cases = {
        b"": "truncated",
        b"NOTODIBI" + blob[8:]: "bad magic",
        blob[:8] + b"\xc1\xc1\xc1": "envelope is not msgpack",
        blob[:-5]: "truncated",
        flipped(blob, len(blob) - 10): "checksum mismatch",
        CHECKPOINT_MAGIC + msgpack.packb([1, 2]): "not a map",
        CHECKPOINT_MAGIC + msgpack.packb({"alg": "md5", "sum": b"", "body": b""}): "unknown",
    }
    for bad, words in cases.items():
        with pytest.raises(CheckpointCorrupt, match=words) as info:
            decode_checkpoint(bad)
        assert "\\x" not in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(CheckpointCorrupt, match="not bytes"):
        decode_checkpoint(None)  # type: ignore[arg-type]
    for _ in range(200):  # garbage behind a valid magic
        junk = CHECKPOINT_MAGIC + os.urandom(int.from_bytes(os.urandom(1), "big"))
        with pytest.raises(CheckpointCorrupt):
            decode_checkpoint(junk)


@pytest.mark.timeout(30)
def test_format_version_and_fields_are_checked_after_the_checksum():
    decode_checkpoint(signed_by_checksum(good_body()))  # the helper builds valid blobs
    cases: list[tuple[dict[str, Any], str]] = []
    for key, value, words in [
        ("format", "other-thing", "format name"),
        ("version", 3, "unsupported checkpoint version 3"),
        ("version", "1", "unsupported checkpoint version unreadable"),
        ("run_id", 5, "'run_id' has type int"),
        ("seq", True, "'seq' has type bool"),
        ("nodes", [], "'nodes' has type list"),
    ]:
        cases.append(({**good_body(), key: value}, words))
    for missing in ("run_id", "dag_fingerprint", "created", "seq", "nodes"):
        body = good_body()
        del body[missing]
        cases.append((body, f"missing field {missing!r}"))
    for rec, words in [
        (["done", 1, 0.5, {"x": H1}], "5-field"),
        (["done", -1, 0.5, {"x": H1}, "fp"], "attempts"),
        (["done", 1, "slow", {"x": H1}, "fp"], "duration"),
        (["done", 1, 0.5, {"x": "../../etc/passwd"}, "fp"], "content hash"),
        (["done", 1, 0.5, {"x": H1}, 7], "fingerprint"),
        ([3, 1, 0.5, {"x": H1}, "fp"], "state"),
        (["done", 1, 0.5, {"x": H1}, "fp", {H2: b"\x80"}], "inline"),
        (["done", 1, 0.5, {"x": H1}, "fp", {H1: "not bytes"}], "inline"),
    ]:
        cases.append(({**good_body(), "nodes": {"a": rec}}, words))
    for body, words in cases:
        with pytest.raises(CheckpointCorrupt, match=words):
            decode_checkpoint(signed_by_checksum(body))


@pytest.mark.timeout(30)
def test_hmac_signed_wrong_secret_unsigned_and_tampered_are_refused():
    cp = sample_checkpoint()
    signed = encode_checkpoint(cp, SECRET)
    assert decode_checkpoint(signed, SECRET) == cp
    with pytest.raises(CheckpointCorrupt, match="HMAC mismatch"):
        decode_checkpoint(signed, b"another-secret")
    with pytest.raises(CheckpointCorrupt, match="not signed"):
        decode_checkpoint(encode_checkpoint(cp), SECRET)
    with pytest.raises(CheckpointCorrupt, match="no cluster secret"):
        decode_checkpoint(signed)
    # tamper with the body: keep the HMAC, or downgrade to a fresh plain checksum
    env = msgpack.unpackb(signed[len(CHECKPOINT_MAGIC) :])
    body = msgpack.unpackb(env["body"])
    body["nodes"]["load"][3] = {"raw": H2}
    forged = msgpack.packb(body)
    kept_mac = CHECKPOINT_MAGIC + msgpack.packb({**env, "body": forged})
    with pytest.raises(CheckpointCorrupt, match="HMAC mismatch"):
        decode_checkpoint(kept_mac, SECRET)
    with pytest.raises(CheckpointCorrupt, match="not signed"):
        decode_checkpoint(signed_by_checksum(body), SECRET)
    with pytest.raises(ValueError, match="empty"):
        encode_checkpoint(cp, b"")


@pytest.mark.timeout(30)
def test_check_compatible_tells_another_dag_from_a_changed_one():
    fps = dag_fingerprints(diamondish())
    dag_fp = dag_fingerprint(diamondish())
    cp = Checkpoint(
        "run-1", dag_fp, {n: NodeRecord("done", 1, 0.1, {}, fp) for n, fp in fps.items()}
    )
    assert check_compatible(cp, dag_fp, "run-1") == "same"
    with pytest.raises(CheckpointMismatch, match="belongs to run 'run-1', not to run 'run-2'"):
        check_compatible(cp, dag_fp, "run-2")
    changed_fp = dag_fingerprint(diamondish(other_step))
    assert check_compatible(cp, changed_fp, "run-1", names=fps) == "changed"
    with pytest.raises(CheckpointMismatch, match="another DAG") as info:
        check_compatible(cp, changed_fp, "run-1", names=fps, strict=True)
    assert dag_fp[:12] in str(info.value) and changed_fp[:12] in str(info.value)
    with pytest.raises(CheckpointMismatch, match="another DAG"):
        check_compatible(cp, changed_fp, "run-1")  # no names: nothing says it is an edit
    with pytest.raises(CheckpointMismatch, match="none of its 7 nodes") as info:
        check_compatible(cp, "9" * 64, "run-1", names=["x1", "x2"])
    assert dag_fp[:12] in str(info.value) and "999999999999" in str(info.value)


@pytest.mark.timeout(30)
def test_reusable_nodes_skip_changed_nodes_their_descendants_and_unfinished_ones():
    old = dag_fingerprints(diamondish())
    nodes = {n: NodeRecord("done", 1, 0.1, {"out": H1}, fp) for n, fp in old.items()}
    nodes["r"] = NodeRecord("running", 1, 0.0, {}, old["r"])
    nodes["gone"] = NodeRecord("done", 1, 0.1, {}, "f" * 64)
    cp = Checkpoint("run-1", dag_fingerprint(diamondish()), nodes)
    assert reusable_nodes(cp, old) == {"a", "b", "c", "d", "e", "f"}
    new = dag_fingerprints(diamondish(other_step))
    assert reusable_nodes(cp, new) == {"a", "c"}


@pytest.mark.timeout(30)
def test_journal_records_replay_onto_a_snapshot():
    cp = sample_checkpoint()
    rec = NodeRecord("done", 1, 3.0, {"out": H2}, "e" * 64)
    records = [
        completion_record("report ü", rec),
        completion_record("load", cp.nodes["load"]),  # already in the snapshot: harmless
        {"t": "something-else"},
        {"t": "node", "node": "bad", "rec": ["done"]},
    ]
    with structlog.testing.capture_logs() as logs:
        assert apply_records(cp, records) == 2
    assert cp.nodes["report ü"] == rec and "bad" not in cp.nodes
    assert any(e["event"] == "journal_records_skipped" for e in logs)


# --- result blobs --------------------------------------------------------------------------
def sample_packed() -> Packed:
    return pack({"a": np.arange(16, dtype=np.int64), "b": np.ones(3), "s": "text"})


@pytest.mark.timeout(30)
def test_result_roundtrip_without_copies_and_aligned():
    p = sample_packed()
    for secret in (None, SECRET):
        blob = encode_result(p, secret)
        q = decode_result(blob, secret, expected_hash=content_hash(p))
        assert content_hash(q) == content_hash(p)
        value = unpack(q)
        assert np.array_equal(value["a"], np.arange(16)) and value["s"] == "text"
        for b in [q.data, *q.buffers]:
            assert isinstance(b, memoryview) and b.obj is blob  # views into the blob
        base = np.frombuffer(blob, np.uint8).ctypes.data
        for b in q.buffers:
            assert (np.frombuffer(b, np.uint8).ctypes.data - base) % 64 == 0
    empty = Packed(pickle.dumps(None, protocol=5), [])
    assert unpack(decode_result(encode_result(empty))) is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret", [None, SECRET])
def test_every_flipped_byte_and_truncation_of_a_result_is_refused(secret):
    blob = encode_result(sample_packed(), secret)
    for i in range(len(blob)):
        with pytest.raises(ResultCorrupt):
            decode_result(flipped(blob, i), secret)
    for n in range(len(blob)):
        with pytest.raises(ResultCorrupt):
            decode_result(blob[:n], secret)
    with pytest.raises(ResultCorrupt, match="layout says"):
        decode_result(blob + b"\x00" * 64, secret)
    for _ in range(200):
        junk = b"ODIBIRS1" + os.urandom(int.from_bytes(os.urandom(2), "big") % 2000)
        with pytest.raises(ResultCorrupt):
            decode_result(junk, secret)


class Bomb:
    """Unpickling this writes a file: proof that nothing was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path(self.path).write_text, ("boom",))


@pytest.mark.timeout(30)
def test_results_are_checked_before_anything_could_unpickle_them(tmp_path):
    marker = tmp_path / "exploded"
    p = Packed(pickle.dumps(Bomb(str(marker)), protocol=5), [])
    signed = encode_result(p, SECRET)
    decode_result(signed, SECRET)  # a sound blob: still never unpickled here
    with pytest.raises(ResultCorrupt, match="HMAC mismatch"):
        decode_result(signed, b"wrong secret")
    with pytest.raises(ResultCorrupt, match="not signed"):
        decode_result(encode_result(p), SECRET)
    with pytest.raises(ResultCorrupt, match="no cluster secret"):
        decode_result(signed)
    with pytest.raises(ResultCorrupt, match="HMAC mismatch"):
        decode_result(flipped(signed, 40), SECRET)
    with pytest.raises(ResultCorrupt, match="content hash mismatch"):
        decode_result(signed, SECRET, expected_hash=content_hash(pack(1)))
    with pytest.raises(ResultCorrupt, match="bad magic"):
        decode_result(b"XXXXXXXX" + signed[8:], SECRET)
    assert not marker.exists()


# --- journal -------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_journal_append_replay_reopen_truncate(tmp_path):
    path = tmp_path / "run.wal"
    assert replay(path) == []
    with Journal.open(path) as j:
        for i in range(5):
            j.append({"i": i, "name": f"n{i}", "hashes": [H1]})
    assert [r["i"] for r in replay(path)] == list(range(5))
    j = Journal.open(path)  # appends after what is there
    j.append({"i": 5})
    assert [r["i"] for r in Journal.replay(path)] == list(range(6))
    j.truncate()
    assert replay(path) == []
    j.append({"i": 6})
    j.sync()
    assert replay(path) == [{"i": 6}]
    j.close()
    j.close()
    assert j.closed
    with pytest.raises(ValueError, match="closed"):
        j.append({"i": 7})


@pytest.mark.timeout(30)
def test_journal_tolerates_a_torn_last_record(tmp_path):
    path = tmp_path / "run.wal"
    with Journal.open(path) as j:
        for i in range(10):
            j.append({"i": i, "pad": "x" * 50})
    full = path.read_bytes()
    last_start = len(full) - (len(full) - len(JOURNAL_MAGIC)) // 10
    for cut in range(last_start + 1, len(full)):  # every point inside the last record
        path.write_bytes(full[:cut])
        with structlog.testing.capture_logs() as logs:
            assert [r["i"] for r in replay(path)] == list(range(9))
        assert any("bad record" in e["event"] for e in logs)
    # reopening cuts the torn tail, so new records are not hidden behind it
    with structlog.testing.capture_logs():
        j = Journal.open(path)
    j.append({"i": 10})
    j.close()
    assert [r["i"] for r in replay(path)] == [*range(9), 10]
    # a torn header (killed while creating the file) is an empty journal
    path.write_bytes(JOURNAL_MAGIC[:3])
    assert replay(path) == []
    with Journal.open(path) as j:
        j.append({"i": 0})
    assert replay(path) == [{"i": 0}]


@pytest.mark.timeout(30)
def test_journal_stops_at_a_damaged_record_and_refuses_foreign_files(tmp_path):
    path = tmp_path / "run.wal"
    with Journal.open(path) as j:
        for i in range(3):
            j.append({"i": i})
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x55  # inside the last payload
    path.write_bytes(bytes(data))
    with structlog.testing.capture_logs() as logs:
        assert [r["i"] for r in replay(path)] == [0, 1]
    assert logs and logs[0]["reason"] == "record checksum mismatch"
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my precious notes")
    with structlog.testing.capture_logs():
        assert replay(foreign) == []
    with pytest.raises(ValueError, match="not an odibi journal"):
        Journal.open(foreign)
    assert foreign.read_text() == "my precious notes"


KILLED_WRITER = """
import os, signal, sys
from odibi_actor._checkpoint import Journal
j = Journal.open(sys.argv[1])
for i in range(1000):
    j.append({"node": f"n{i}", "i": i, "outputs": {"out": "%s"}})
os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no atexit
""" % ("a" * 64)


@pytest.mark.timeout(60)
def test_journal_survives_kill_9_of_the_writer(tmp_path):
    path = tmp_path / "run.wal"
    proc = subprocess.run(
        [PYTHON, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    records = replay(path)
    assert [r["i"] for r in records] == list(range(1000))
    assert records[-1]["node"] == "n999"


# --- keys, retention, picking --------------------------------------------------------------
@pytest.mark.timeout(30)
def test_storage_keys():
    assert snapshot_key("run-1", 42) == "runs/run-1/checkpoints/000000000042.ckpt"
    assert parse_snapshot_key(snapshot_key("run-1", 42)) == ("run-1", 42)
    assert parse_snapshot_key("runs/run-1/other/1.ckpt") is None
    keys = [snapshot_key("r", s) for s in (10, 9, 100, 1)]
    assert sorted(keys) == [snapshot_key("r", s) for s in (1, 9, 10, 100)]
    for bad in ("", "..", "a/b", "a\\b", "a\nb"):
        with pytest.raises(ValueError):
            snapshot_key(bad, 1)
    with pytest.raises(ValueError):
        snapshot_key("r", -1)
    h = content_hash(pack(1))
    assert result_key(h) == f"results/{h[:2]}/{h}"
    for bad in ("../../x", "ab", "A" * 64, H1 + "0"):
        with pytest.raises(ValueError):
            result_key(bad)


@pytest.mark.timeout(30)
def test_prune_keeps_the_newest():
    ks = [(f"k{s}", s) for s in (3, 1, 7, 5, 2)]
    assert prune(ks, 2) == ["k1", "k2", "k3"]
    assert prune(ks, 1) == ["k1", "k2", "k3", "k5"]
    assert prune(ks, 5) == [] and prune(ks, 50) == [] and prune([], 1) == []
    assert prune([("only", 0)], 1) == []
    for keep in (0, -1):
        with pytest.raises(ValueError, match=">= 1"):
            prune(ks, keep)
    for n in range(1, 30):
        many = [(f"c{i}", i) for i in range(n)]
        assert f"c{n - 1}" not in prune(many, 1)
        assert len(prune(many, 3)) == max(0, n - 3)


@pytest.mark.timeout(30)
def test_pick_latest_falls_back_past_corrupt_checkpoints_with_a_warning():
    blobs = {s: encode_checkpoint(sample_checkpoint(seq=s)) for s in (1, 2, 3)}
    entries = [(snapshot_key("run-1", s), b) for s, b in blobs.items()]
    picked = pick_latest(entries)
    assert picked is not None and picked.checkpoint.seq == 3 and picked.skipped == []
    entries[2] = (entries[2][0], blobs[3][: len(blobs[3]) // 2])  # newest torn
    with structlog.testing.capture_logs() as logs:
        picked = pick_latest(entries)
    assert picked is not None and picked.checkpoint.seq == 2
    assert picked.key == snapshot_key("run-1", 2) and picked.skipped == [snapshot_key("run-1", 3)]
    [warning] = logs
    assert warning["log_level"] == "warning" and "falling back" in warning["event"]
    assert warning["key"] == snapshot_key("run-1", 3) and "truncated" in warning["reason"]
    with structlog.testing.capture_logs():
        assert pick_latest([(k, b"garbage") for k, _ in entries]) is None
    assert pick_latest([]) is None


@pytest.mark.timeout(30)
def test_pick_latest_fetches_lazily_and_skips_misplaced_or_unreadable_blobs():
    fetched: list[int] = []

    def loader(seq: int) -> Any:
        def load() -> bytes:
            fetched.append(seq)
            if seq == 4:
                raise OSError("network down")
            return encode_checkpoint(sample_checkpoint(seq=seq), SECRET)

        return load

    entries: list[tuple[str, Any]] = [(snapshot_key("run-1", s), loader(s)) for s in range(4)]
    entries.append((snapshot_key("run-1", 4), loader(4)))
    # an older checkpoint copied over a newer key (a rollback) is not taken for it
    entries.append((snapshot_key("run-1", 5), encode_checkpoint(sample_checkpoint(1), SECRET)))
    with structlog.testing.capture_logs() as logs:
        picked = pick_latest(entries, SECRET)
    assert picked is not None and picked.checkpoint.seq == 3
    assert fetched == [4, 3]  # newest first, and nothing older than what was picked
    assert [e["key"] for e in logs] == [snapshot_key("run-1", 5), snapshot_key("run-1", 4)]
    assert "disagree with its key" in logs[0]["reason"]
    with structlog.testing.capture_logs():
        assert pick_latest(entries[:4]) is None  # signed ones without the secret
