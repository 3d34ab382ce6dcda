"""Load test: one coordinator and many worker processes on loopback, one large DAG.

Starts ``odibi-coordinator`` and ``--workers`` ``odibi-worker`` processes on 127.0.0.1,
submits a layered DAG (``--layers`` x ``--width`` nodes, each reading two nodes of the
previous layer; trivial tasks), waits for the result and checks every output against
values computed here. Meanwhile the coordinator's RSS is sampled every 0.1 s. Prints the
peak RSS, the run time and tasks/s, then stops every process it started.

    PYTHONPATH=. python scripts/load_cluster.py [--workers 16] [--layers 20] [--width 1000]
                                                [--runs 1] [--nthreads 1] [--json]

``--json`` also prints the report as one JSON line (last line of output). Exit status 0
only if the run completed, every output was right and no process was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
MOD = 1_000_003


def root(s: int) -> int:
    return (3 * s + 1) % MOD


def combine(a: int, b: int) -> int:
    return (a + 2 * b + 1) % MOD  # not symmetric: swapped inputs would show


def build(layers: int, width: int, fns: Any) -> tuple[Any, dict[str, int], dict[str, int]]:
    from odibi_actor import DAGBuilder

    b = DAGBuilder()
    initial = {f"s{j}": j for j in range(width)}
    expected: dict[str, int] = {}
    for j in range(width):
        b.add_node(f"n0_{j}", fns.root, inputs=[f"s{j}"], outputs=[f"d0_{j}"])
        expected[f"d0_{j}"] = root(j)
    for layer in range(1, layers):
        for j in range(width):
            a, c = f"d{layer - 1}_{j}", f"d{layer - 1}_{(j + 1) % width}"
            b.add_node(f"n{layer}_{j}", fns.combine, inputs=[a, c], outputs=[f"d{layer}_{j}"])
            expected[f"d{layer}_{j}"] = combine(expected[a], expected[c])
    return b, initial, expected


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class RssSampler(threading.Thread):
    """Peak resident set size of one process, sampled every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.samples += 1
            self.halt.wait(self.every)

    def stop(self) -> int:
        self.halt.set()
        self.join(5)
        return self.peak


def stop_all(procs: list[subprocess.Popen[bytes]], coordinator: subprocess.Popen[bytes]) -> int:
    """SIGTERM workers (they leave), then the coordinator; SIGKILL stragglers.

    Returns how many processes (or children of theirs) are still alive afterwards.
    """
    tree: list[psutil.Process] = []
    for p in [*procs, coordinator]:
        with contextlib.suppress(psutil.Error):
            ps = psutil.Process(p.pid)
            tree += [ps, *ps.children(recursive=True)]
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    if coordinator.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(coordinator.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            coordinator.wait(10)
    for p in [*procs, coordinator]:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
    for ps in tree:
        with contextlib.suppress(psutil.Error):
            if ps.is_running() and ps.status() != psutil.STATUS_ZOMBIE:
                ps.kill()
    time.sleep(0.2)
    alive = 0
    for ps in tree:
        with contextlib.suppress(psutil.Error):
            if ps.is_running() and ps.status() != psutil.STATUS_ZOMBIE:
                alive += 1
    return alive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--nthreads", type=int, default=1, help="threads per worker (default: 1)")
    p.add_argument("--runs", type=int, default=1, help="submit the DAG this many times, in turn")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the report as a JSON line too")
    p.add_argument("--log-dir", default=None, help="keep coordinator and worker logs here")
    args = p.parse_args(argv)

    # step functions by import reference: workers import this file as a module
    sys.path.insert(0, str(HERE))
    import load_cluster as fns

    from odibi_actor.client import Client

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([str(HERE), *(q or os.getcwd() for q in sys.path)])
    )
    port = free_port()
    listen = f"tcp://127.0.0.1:{port}"

    def spawn(cmd: list[str], name: str) -> subprocess.Popen[bytes]:
        out: Any = subprocess.DEVNULL
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            out = open(os.path.join(args.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", *cmd],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    t_start = time.perf_counter()
    coordinator = spawn(
        ["odibi_actor.coordinator", "--listen", listen, "--log-level", "warning"], "coordinator"
    )
    workers: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"workers": args.workers, "verified": False}
    sampler = RssSampler(coordinator.pid)
    sampler.start()
    try:
        for i in range(args.workers):
            workers.append(
                spawn(
                    [
                        "odibi_actor.worker",
                        listen,
                        "--name",
                        f"load-{i}",
                        "--nthreads",
                        str(args.nthreads),
                        "--log-level",
                        "warning",
                    ],
                    f"worker-{i}",
                )
            )
        dag, initial, expected = build(args.layers, args.width, fns)
        nodes = dag.build()
        report["nodes"] = len(nodes)
        with Client(f"tcp://127.0.0.1:{port + 1}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    if len(client.workers()) >= args.workers:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("workers did not all register within 120s")
                for w in [coordinator, *workers]:
                    if w.poll() is not None:
                        raise SystemExit(f"process {w.args} exited with {w.returncode}")
                time.sleep(0.2)
            report["startup_s"] = round(time.perf_counter() - t_start, 2)
            report["rss_before_mb"] = round(sampler.proc.memory_info().rss / 2**20, 1)
            verified = True
            for i in range(args.runs):
                t0 = time.perf_counter()
                handle = client.submit(nodes, initial)
                submit_s = time.perf_counter() - t0
                out = handle.result(timeout=args.timeout)
                wall = time.perf_counter() - t0
                wrong = [k for k, v in expected.items() if out.get(k) != v]
                verified = verified and not wrong and len(out) == len(expected)
                if wrong:
                    report["wrong"] = wrong[:10]
                del out
                rss = sampler.proc.memory_info().rss / 2**20
                if args.runs > 1:
                    print(
                        f"run {i + 1}: {wall:.2f}s, peak RSS so far {sampler.peak / 2**20:.1f} MB,"
                        f" RSS after {rss:.1f} MB",
                        flush=True,
                    )
                report.setdefault("rss_after_runs_mb", []).append(round(rss, 1))
        report["submit_s"] = round(submit_s, 2)
        report["run_s"] = round(wall, 2)
        report["tasks_per_s"] = round(len(nodes) / wall)
        m = handle.metrics
        if m is not None:
            report["coordinator_run_s"] = round(m.execution_time, 2)
            report["workers_used"] = len({nm.worker for nm in m.nodes.values()})
            report["nodes_done"] = m.get_summary()["nodes_done"]
        report["verified"] = verified
    finally:
        report["peak_rss_mb"] = round(sampler.stop() / 2**20, 1)
        report["rss_samples"] = sampler.samples
        report["leftover_processes"] = stop_all(workers, coordinator)

    print(
        f"{report.get('nodes', 0)} nodes x {args.runs} run(s) on {args.workers} workers:"
        f" {'verified' if report['verified'] else 'NOT VERIFIED'},"
        f" run {report.get('run_s', '-')}s, {report.get('tasks_per_s', '-')} tasks/s"
        f" (workers up in {report.get('startup_s', '-')}s, submit {report.get('submit_s', '-')}s)"
    )
    print(
        f"coordinator peak RSS {report['peak_rss_mb']} MB"
        f" (idle {report.get('rss_before_mb', '-')} MB, {report['rss_samples']} samples);"
        f" leftover processes: {report['leftover_processes']}"
    )
    if args.json:
        print(json.dumps(report))
    return 0 if report["verified"] and report["leftover_processes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
