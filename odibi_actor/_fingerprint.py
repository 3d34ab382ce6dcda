"""Content hashes of results and fingerprints of the code that produced them.

Two questions are answered here, both without running anything:

- *Is this the same value?* :func:`content_hash` hashes a pickled value (in-band bytes plus
  its out-of-band buffers) so results can be stored once under their hash.
- *Would this node compute the same thing?* :func:`node_fingerprint` hashes a node's
  function (identity and source, bound parameters) and its wiring; :func:`dag_fingerprints`
  folds every node's dependencies into it (a Merkle "lineage" hash), so changing one node
  changes exactly that node's and its descendants' fingerprints.

Fingerprints err on the side of "changed": when a function cannot be described stably, the
node gets a fingerprint that differs in every process, so it runs again rather than reuse a
result computed by other code. A spurious rerun costs time; a false match costs correctness.

Known limits of "identity and source": of the code a step calls, only helper functions and
plain constants it names as module globals are followed (not methods, classes or
libraries), and source is read from disk (``inspect``), so editing a file after it was
imported is seen as a change of the running code.
"""

from __future__ import annotations

import functools
import graphlib
import hashlib
import inspect
import os
import pickle
import re
import struct
import threading
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cloudpickle
import msgpack

from ._dag import DAGNode
from ._logging import get_logger
from ._wire import Packed
from .errors import CycleError, DAGValidationError

log = get_logger("odibi_actor.fingerprint")

_LEN = struct.Struct("<Q")
_TWO_LENS = struct.Struct("<QQ")
_PACKED_HASH = hashlib.blake2b(digest_size=32, person=b"odibi-packed-v1")  # copied per use
_local = threading.local()  # a msgpack Packer is not thread-safe; one per thread is cheap
# Differs in every process: a fingerprint built on it never matches a stored one.
_PROCESS_MARKER = os.urandom(16).hex()
_warned_unstable: set[str] = set()


def _digest(kind: str, *parts: str | bytes) -> str:
    """blake2b-256 hex over the parts as one msgpack array: msgpack frames every part with
    its length and type, so no two part lists collide by splitting, in one C call."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(unicode_errors="surrogatepass")
    return hashlib.blake2b(
        packer.pack([kind, *parts]), digest_size=32, person=b"odibi-fp-v1"
    ).hexdigest()


# --- values --------------------------------------------------------------------------------
def content_hash(p: Packed) -> str:
    """blake2b-256 hex of a pickled value: in-band bytes and every out-of-band buffer.

    Lengths are framed (number of buffers, then each length before its bytes), so moving
    bytes between the pickle and a buffer, or between buffers, changes the hash. Buffers are
    hashed in place through memoryviews, never copied (hashlib drops the GIL while it
    works). Equal hashes mean equal pickles: a value pickled in-band and the same value with
    out-of-band buffers hash differently, which only costs a duplicate stored copy.
    """
    h = _PACKED_HASH.copy()
    data = p.data if type(p.data) is bytes else _bytes_view(p.data)
    h.update(_TWO_LENS.pack(len(data), len(p.buffers)))
    h.update(data)
    for buf in p.buffers:
        view = _bytes_view(buf)
        h.update(_LEN.pack(view.nbytes))
        h.update(view)
    return h.hexdigest()


def small_content_hash(data: bytes | memoryview) -> str:
    """:func:`content_hash` of a pickle with no out-of-band buffers, in one call: the
    checkpoint hashes thousands of tiny results per second this way."""
    h = _PACKED_HASH.copy()
    h.update(_TWO_LENS.pack(len(data), 0) + data)
    return h.hexdigest()


_CONTENT_HASH = re.compile(r"[0-9a-f]{64}")


def is_content_hash(value: object) -> bool:
    """Whether ``value`` looks like a :func:`content_hash`: such values become storage
    keys, so anything else must never pass for one."""
    return isinstance(value, str) and _CONTENT_HASH.fullmatch(value) is not None


def _bytes_view(buf: Any) -> memoryview:
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not view.c_contiguous:  # never produced by pickle 5 or the wire; copy to be safe
        return memoryview(view.tobytes())
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --- functions -----------------------------------------------------------------------------
def function_fingerprint(fn: Callable[..., Any]) -> str:
    """Stable hex fingerprint of a step function's identity, source and bound parameters.

    - plain functions and lambdas: module + qualname, source text, defaults, closure
      cell values (pickled; nested functions by their own fingerprint), and the module
      constants and helper functions the code reads by name;
    - ``functools.partial``: the wrapped function's fingerprint plus its args and keywords;
    - bound methods: the function plus the pickled instance; callable objects: their class
      source plus the pickled instance;
    - anything without source (builtins, REPL code): the cloudpickle bytes.

    Never raises. When nothing above works (unpicklable closure values, say) it returns a
    hash of the qualname, a marker that is random per process and the object's id, so the
    node is treated as changed by every other process (and every other function object),
    and logs a warning once per qualname.
    """
    return _Fingerprinter().function(fn)


def _unstable(fn: Any, reason: str) -> str:
    name = _identity(fn)
    if name not in _warned_unstable:
        _warned_unstable.add(name)
        log.warning("fingerprint_unstable", function=name, reason=reason[:200])
    # id(fn): two such functions alive in one process never match each other either
    return _digest("unstable", name, _PROCESS_MARKER, str(id(fn)))


def _identity(fn: Any) -> str:
    try:
        module = getattr(fn, "__module__", None) or "?"
        qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"{module}:{qualname}"
    except Exception:
        return "?:?"


def _source(obj: Any) -> str | None:
    """Source of a code object or class; cached, as ``inspect`` tokenizes the file."""
    # Equal code objects from different files compare equal: key by file too.
    return _cached_source(obj, getattr(obj, "co_filename", None))


@functools.lru_cache(maxsize=4096)
def _cached_source(obj: Any, filename: str | None) -> str | None:
    try:
        return inspect.getsource(obj)
    except Exception:
        return None


def _fp_ref(fingerprint: str) -> str:
    """Stand-in for a function inside a pickled parameter; never actually called."""
    return fingerprint


class _HashWriter:
    """A file for ``pickle.Pickler`` that hashes what it is given instead of keeping it."""

    def __init__(self) -> None:
        self.h = hashlib.blake2b(digest_size=32, person=b"odibi-value-v1")

    def write(self, b: Any) -> int:
        self.h.update(b)
        return len(b)


class _Fingerprinter:
    """One fingerprinting pass; memoizes per function object (a 100,000-node DAG of one
    function reads its source once) and breaks cycles of functions that refer to themselves.
    """

    def __init__(self) -> None:
        self.memo: dict[int, str] = {}
        self.keep: list[Any] = []  # keeps memoized objects alive so their ids stay theirs
        self.active: set[int] = set()

    def function(self, fn: Any) -> str:
        key = id(fn)
        fp = self.memo.get(key)
        if fp is not None:
            return fp
        if key in self.active:  # fn reaches itself through its closure or parameters
            return _digest("cycle", _identity(fn))
        self.active.add(key)
        try:
            fp = self._compute(fn)
        except Exception as exc:  # RecursionError included: never raise, rerun instead
            fp = _unstable(fn, f"{type(exc).__name__}: {exc}")
        finally:
            self.active.discard(key)
        self.memo[key] = fp
        self.keep.append(fn)
        return fp

    def _compute(self, fn: Any) -> str:
        ident = _identity(fn)
        if isinstance(fn, functools.partial):
            return _digest(
                "partial", self.function(fn.func), self.value(fn.args), self.value(fn.keywords)
            )
        if isinstance(fn, types.MethodType):
            return _digest("method", self.function(fn.__func__), self.value(fn.__self__))
        if isinstance(fn, types.FunctionType):
            src = _source(fn.__code__)  # the code object: not unwrapped to a __wrapped__
            if src is not None:
                try:
                    params = self.value(
                        (fn.__defaults__, fn.__kwdefaults__, _cells(fn), self._globals(fn))
                    )
                except Exception:
                    params = None  # unpicklable closure values: try the whole function
                if params is not None:
                    return _digest("function", ident, src, params)
            return _digest("pickled", ident, _cloudpickle_hash(fn))
        if isinstance(fn, type):
            src = _source(fn)
            if src is not None:
                return _digest("class", ident, src)
            return _digest("pickled", ident, _cloudpickle_hash(fn))
        if isinstance(fn, types.BuiltinFunctionType | types.BuiltinMethodType):
            return _digest("pickled", ident, _cloudpickle_hash(fn))
        if callable(fn) and isinstance(type(fn).__call__, types.FunctionType):
            # an instance of a class defining __call__: its class source and its state
            return _digest("callable", self.function(type(fn)), self.value(fn))
        return _digest("pickled", ident, _cloudpickle_hash(fn))

    def _globals(self, fn: types.FunctionType) -> list[tuple[str, Any]]:
        """Module-level names ``fn``'s code reads that hold plain constants or Python
        functions: a changed ``LIMIT = 5`` or helper counts as a change of the step. Other
        globals (modules, classes, loggers, clients) are left out, as they say nothing
        stable and are often unpicklable."""
        names: set[str] = set()
        codes = [fn.__code__]
        while codes:  # nested code objects: inner functions, comprehensions, lambdas
            code = codes.pop()
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        g = fn.__globals__
        out: list[tuple[str, Any]] = []
        for name in sorted(names):
            if name not in g:
                continue
            v = g[name]
            if isinstance(v, types.FunctionType | functools.partial):
                out.append((name, self.function(v)))
            elif _plain(v):
                out.append((name, v))
        return out

    def value(self, obj: Any) -> str:
        """Hash of a parameter value: pickle 5, functions inside replaced by fingerprints."""
        writer = _HashWriter()
        try:
            _ValuePickler(writer, self).dump(obj)
        except Exception:
            return _cloudpickle_hash(obj)  # raises if that fails too: caller falls back
        return writer.h.hexdigest()


class _ValuePickler(pickle.Pickler):
    """Pickle 5 that writes functions as their fingerprint: their code, not their name."""

    def __init__(self, file: _HashWriter, fingerprinter: _Fingerprinter) -> None:
        super().__init__(file, protocol=5)
        self.fingerprinter = fingerprinter

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType | functools.partial | types.MethodType):
            return _fp_ref, (self.fingerprinter.function(obj),)
        return NotImplemented


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)


def _plain(v: Any, depth: int = 0) -> bool:
    """An immutable constant whose pickle says everything about it."""
    if isinstance(v, _PLAIN_TYPES):
        return True
    if isinstance(v, tuple | frozenset) and depth < 3 and len(v) <= 10_000:
        return all(_plain(x, depth + 1) for x in v)
    return False


class _Empty:
    """An empty closure cell (a variable assigned after the function was defined)."""

    def __reduce__(self) -> str:
        return "_EMPTY"


_EMPTY = _Empty()


def _cells(fn: types.FunctionType) -> tuple[Any, ...]:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:
            out.append(_EMPTY)
    return tuple(out)


def _cloudpickle_hash(obj: Any) -> str:
    return hashlib.blake2b(cloudpickle.dumps(obj, protocol=5), digest_size=32).hexdigest()


# --- nodes and DAGs ------------------------------------------------------------------------
def node_fingerprint(node: DAGNode) -> str:
    """Fingerprint of what a node computes: its function plus input and output names in
    order. ``retries``, ``timeout`` and ``retry_delay`` are left out: they change how a node
    is run, not what it returns. The node's name is left out too: records are matched by
    name anyway, and a renamed node is simply a new one.
    """
    return _node_fp(node, _Fingerprinter())


def _node_fp(node: DAGNode, fper: _Fingerprinter) -> str:
    return _digest(
        "node",
        fper.function(node.fn),
        str(len(node.inputs)),
        *node.inputs,
        str(len(node.outputs)),
        *node.outputs,
    )


def node_fingerprints(nodes: Mapping[str, DAGNode] | Iterable[DAGNode]) -> dict[str, str]:
    """:func:`node_fingerprint` of every node in one pass (each function is read once):
    what :func:`cache_key` wants."""
    items = nodes.values() if isinstance(nodes, Mapping) else nodes
    fper = _Fingerprinter()
    return {n.name: _node_fp(n, fper) for n in items}


def dag_fingerprints(
    nodes: Mapping[str, DAGNode] | Iterable[DAGNode],
    external: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Lineage fingerprint of every node: what :func:`node_fingerprint` covers (function,
    input and output names) plus, per input in declared order, the lineage fingerprint of
    the node producing it (a Merkle hash over the DAG), in one digest per node.

    A node's lineage therefore changes exactly when it or any ancestor changes, so "what
    must run again" is a plain per-node comparison. ``external`` optionally maps inputs no
    node produces (initial data) to their content hashes, so changed initial data counts as
    a change too; without it only their names count. Computed in topological order with
    no recursion, so 100,000-node chains work. Raises :class:`CycleError` on a cycle.
    """
    items = list(nodes.values()) if isinstance(nodes, Mapping) else list(nodes)
    by_name: dict[str, DAGNode] = {}
    producer: dict[str, str] = {}
    for n in items:
        if n.name in by_name:
            raise DAGValidationError(f"duplicate node name {n.name!r}")
        by_name[n.name] = n
        for out in n.outputs:
            other = producer.setdefault(out, n.name)
            if other != n.name:
                raise DAGValidationError(
                    f"output {out!r} is produced by two nodes: {other!r} and {n.name!r}"
                )
    ext = external or {}
    fper = _Fingerprinter()
    lineage: dict[str, str] = {}

    pack = msgpack.Packer(unicode_errors="surrogatepass").pack
    copy = hashlib.blake2b(digest_size=32, person=b"odibi-lineage-v2").copy
    memo = fper.memo  # function fingerprints by id(fn): most nodes share a function
    function = fper.function

    def walk(order: Iterable[DAGNode]) -> bool:
        # per node, one msgpack array: function, then per input its name, whether a node
        # makes it, and that node's lineage or the data's content hash, then the outputs
        for node in order:
            fn = node.fn
            fields: list[Any] = [memo.get(id(fn)) or function(fn), len(node.inputs)]
            for inp in node.inputs:
                src = producer.get(inp)
                if src is None:
                    fields += (inp, False, ext.get(inp, ""))
                else:
                    up = lineage.get(src)
                    if up is None:
                        return False  # not in topological order
                    fields += (inp, True, up)
            fields += node.outputs
            h = copy()
            h.update(pack(fields))
            lineage[node.name] = h.hexdigest()
        return True

    # a built DAG comes in topological order already: one pass, no sort
    if not walk(items):
        walk(by_name[name] for name in _topological(by_name, producer))
    return {n.name: lineage[n.name] for n in items}


def _topological(by_name: Mapping[str, DAGNode], producer: Mapping[str, str]) -> list[str]:
    """Kahn's algorithm: no recursion, O(nodes + edges). graphlib only names a cycle."""
    deps = {name: {producer[i] for i in n.inputs if i in producer} for name, n in by_name.items()}
    children: dict[str, list[str]] = {name: [] for name in by_name}
    missing = {}
    for name, ds in deps.items():
        missing[name] = len(ds)
        for d in ds:
            children[d].append(name)
    order = [name for name, k in missing.items() if k == 0]
    for name in order:  # grows while it is walked
        for child in children[name]:
            missing[child] -= 1
            if missing[child] == 0:
                order.append(child)
    if len(order) != len(by_name):
        try:
            graphlib.TopologicalSorter(deps).prepare()
        except graphlib.CycleError as exc:
            raise CycleError(list(exc.args[1])) from None
        raise CycleError(sorted(set(by_name) - set(order)))  # pragma: no cover
    return order


def combine_fingerprints(fingerprints: Mapping[str, str]) -> str:
    """One fingerprint for a whole DAG from its per-node ones (sorted by name)."""
    packed = msgpack.packb(sorted(fingerprints.items()), unicode_errors="surrogatepass")
    return hashlib.blake2b(packed, digest_size=32, person=b"odibi-dag-v2").hexdigest()


def dag_fingerprint(
    nodes: Mapping[str, DAGNode] | Iterable[DAGNode],
    external: Mapping[str, str] | None = None,
) -> str:
    """Fingerprint of the whole DAG: equal exactly when every lineage fingerprint is."""
    return combine_fingerprints(dag_fingerprints(nodes, external))


def cache_key(node_fp: str, input_hashes: Sequence[str]) -> str:
    """Key of a cached result: the node's own fingerprint (not its lineage: the inputs'
    content hashes already say everything about upstream) plus its inputs' content hashes,
    in the node's input order.
    """
    return _digest("cache", node_fp, str(len(input_hashes)), *input_hashes)
