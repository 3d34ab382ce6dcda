"""The ``odibi`` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from ._logging import configure_logging, get_logger
from ._scheduler import Progress as RunProgress
from ._target import load_target
from .errors import DAGValidationError, NodeFailedError, OdibiError
from .executor import DistributedExecutor
from .metrics import MetricsManager

DEFAULT_CACHE = "file://" + os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "odibi-actor"
)
SUMMARY_ROWS = 40  # larger runs show the slowest nodes only

EPILOG = """\
examples:
  odibi run odibi_actor.examples.flights --out flights_out
  odibi run my_pipeline.py --workers 4
  odibi run my_pipeline.py --backend threads      # in-process, for debugging
  odibi graph odibi_actor.examples.flights         # Mermaid flowchart of the DAG

A pipeline is a module path or a .py file that defines dag() returning
DAGBuilder().build() (or a DAGBuilder), and optionally initial_data() returning a dict.
--out DIR sets the initial dataset "out_dir".
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odibi",
        description="Run DAGs of Python pipeline steps in parallel on worker processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"odibi-actor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a pipeline",
        description="Run a pipeline and print a summary. Exit code 0 on success, 1 if a node"
        " failed, 2 if the pipeline is invalid.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="TARGET", help="module path or .py file with dag()")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (or threads) to start (default: CPU count)",
    )
    run.add_argument(
        "--nthreads", type=int, default=1, help="threads per worker process (default: 1)"
    )
    run.add_argument(
        "--backend",
        choices=["processes", "threads"],
        default="processes",
        help="processes: local odibi-worker subprocesses over ZeroMQ (default);"
        " threads: in this process",
    )
    run.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="run on an existing coordinator (its --client-listen address) instead of"
        " starting local workers",
    )
    _curve_args(run)
    run.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help='directory for outputs; sets the initial dataset "out_dir"',
    )
    run.add_argument(
        "--checkpoint",
        metavar="URL",
        default=None,
        help="record progress to file:///path or az://container/prefix so a crashed run"
        " can be resumed",
    )
    run.add_argument("--run-id", default=None, help="name of this run (needed to --resume)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="reuse every node the checkpointed run --run-id finished; run the rest",
    )
    run.add_argument(
        "--cache",
        metavar="URL",
        default=DEFAULT_CACHE,
        help=f"result cache across runs (default: {DEFAULT_CACHE})",
    )
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    run.add_argument(
        "--cache-ttl",
        type=float,
        default=None,
        metavar="S",
        help="ignore cache entries older than S seconds",
    )
    run.add_argument(
        "--secret-env",
        metavar="VAR",
        default="ODIBI_SECRET",
        help="environment variable holding a cluster secret that signs checkpoints and"
        " cached results (HMAC); unsigned or tampered blobs are refused (default:"
        " ODIBI_SECRET, unset means checksums only)",
    )
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--log-json", action="store_true", help="log JSON lines to stderr")
    run.add_argument(
        "--log-level", default="warning", help="debug, info, warning or error (default: warning)"
    )

    graph = sub.add_parser("graph", help="print the DAG as a Mermaid flowchart")
    graph.add_argument("target", metavar="TARGET", help="module path or .py file with dag()")

    cache = sub.add_parser("cache", help="manage the result cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    purge = cache_sub.add_parser("purge", help="delete cache entries (all, or old ones)")
    purge.add_argument(
        "--cache",
        metavar="URL",
        default=DEFAULT_CACHE,
        help=f"the cache (default: {DEFAULT_CACHE})",
    )
    purge.add_argument(
        "--older-than",
        metavar="AGE",
        default=None,
        help="only entries older than AGE: seconds, or with a unit: 90s, 30m, 12h, 7d",
    )

    status = sub.add_parser(
        "status",
        help="show a coordinator's workers and runs",
        description="Print the workers (host, slots, busy, last heartbeat) and runs"
        " (progress) of a running odibi-coordinator.",
    )
    status.add_argument(
        "--address",
        required=True,
        metavar="ADDR",
        help="the coordinator's client address, e.g. tcp://127.0.0.1:5556",
    )
    _curve_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")

    keygen = sub.add_parser(
        "keygen",
        help="create a CurveZMQ keypair",
        description="Create NAME.key (public: copy it to the coordinator's authorised keys"
        " directory, or, for the server's key, to workers and clients) and NAME.key_secret"
        " (keep it private) in DIR.",
    )
    keygen.add_argument("name", metavar="NAME", help="key name, e.g. server, worker-1, alice")
    keygen.add_argument("--dir", default="keys", help="directory for the keys (default: keys)")
    return p


def _curve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=None,
        help="your CurveZMQ secret key file, when the coordinator uses CurveZMQ",
    )
    p.add_argument(
        "--server-key",
        metavar="FILE",
        default=None,
        help="the coordinator's public key file (server.key)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    err = Console(stderr=True)
    try:
        if args.command == "graph":
            from ._dag import to_mermaid

            print(to_mermaid(load_target(args.target).nodes))
            return 0
        if args.command == "status":
            return _status(args, console)
        if args.command == "cache":
            return _cache_purge(args, console)
        if args.command == "keygen":
            from ._security import keygen

            public, secret = keygen(args.dir, args.name)
            print(f"public key: {public}\nsecret key: {secret} (keep it private)")
            return 0
        return _run(args, console, err)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        return 143 if _terminated else 130
    except DAGValidationError as exc:
        err.print(f"[red]invalid pipeline:[/red] {exc}", markup=True, highlight=False)
        return 2
    except NodeFailedError as exc:
        err.print(f"[red]run failed:[/red] {exc}", highlight=False)
        return 1
    except (OdibiError, ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2


_terminated = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so workers are stopped and temporary files removed."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, console: Console, err: Console) -> int:
    configure_logging(json=args.log_json, level=args.log_level)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    pipeline = load_target(args.target)
    data = dict(pipeline.initial_data)
    if args.out is not None:
        data["out_dir"] = os.path.abspath(args.out)
    show = not args.no_progress
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        transient=False,
    )
    task = bar.add_task(pipeline.name, total=len(pipeline.nodes), running=0, failed=0)

    def on_progress(p: RunProgress) -> None:
        bar.update(task, completed=p.done, running=p.running, failed=p.failed)

    executor = DistributedExecutor(
        pipeline.nodes,
        workers=args.workers,
        nthreads=args.nthreads,
        backend=args.backend,
        progress=on_progress,
        address=args.address,
        curve_secret=args.curve_secret,
        server_key=args.server_key,
        checkpoint=args.checkpoint,
        run_id=args.run_id,
        cache=None if args.no_cache or args.address else args.cache,
        cache_ttl=args.cache_ttl,
        secret=os.environ.get(args.secret_env) or None,
    )
    get_logger("odibi_actor.cli").info(
        "run starting", target=args.target, nodes=len(pipeline.nodes), backend=args.backend
    )
    failure: NodeFailedError | None = None
    with bar:
        try:
            executor.run(data, resume=args.resume)
        except NodeFailedError as exc:
            failure = exc
    console.print(summary_table(executor.metrics))
    if failure is not None:
        raise failure
    m = executor.metrics
    console.print(
        f"[green]done[/green]: {m.node_count} nodes in {m.execution_time:.2f}s on"
        f" {m.workers} {'threads' if args.backend == 'threads' else 'workers'}"
        + (f"; outputs in {data['out_dir']}" if "out_dir" in data else "")
    )
    if executor.cache or executor.checkpoint:
        console.print(
            f"cache: {m.cache_hits} hits, {m.cache_misses} misses,"
            f" {_size(m.cache_bytes_read)} read, {_size(m.cache_bytes_written)} written"
            + (f"; resumed: {m.restored} nodes reused" if args.resume else "")
            + (f"; checkpoint run id {executor.run_id}" if executor.checkpoint else "")
        )
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        pass
    raise ValueError(f"--older-than: cannot read {text!r}; use e.g. 3600, 30m, 12h, 7d")


def _cache_purge(args: argparse.Namespace, console: Console) -> int:
    import anyio

    from ._cache import purge
    from .storage import open_storage

    older = _parse_age(args.older_than) if args.older_than else None

    async def go() -> tuple[int, int]:
        async with open_storage(args.cache) as store:
            return await purge(store, older)

    entries, results = anyio.run(go)
    console.print(f"purged {entries} cache entries and {results} results from {args.cache}")
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    import json
    import time

    from .client import Client

    with Client(
        args.address, curve_secret=args.curve_secret, server_key=args.server_key, timeout=10
    ) as client:
        workers, runs = client.workers(), client.runs()
    if args.json:
        print(json.dumps({"workers": workers, "runs": runs}, indent=2))
        return 0
    wt = Table(title=f"{len(workers)} workers")
    for col in ("name", "host", "pid", "slots", "busy", "queued", "last heartbeat"):
        wt.add_column(col)
    for w in workers:
        wt.add_row(
            w["name"],
            w["host"],
            str(w["pid"]),
            str(w["slots"]),
            str(w["busy"]),
            str(w["queued"]),
            f"{w['last_heartbeat']:.1f}s ago",
        )
    rt = Table(title=f"{len(runs)} runs")
    for col in ("run", "state", "progress", "running", "failed", "age"):
        rt.add_column(col)
    now = time.time()
    for r in runs:
        rt.add_row(
            r["run"],
            r["state"],
            f"{r['done']}/{r['total']}",
            str(r["running"]),
            str(r["failed"]),
            f"{now - r['submitted']:.0f}s",
        )
    console.print(wt)
    console.print(rt)
    return 0


def summary_table(m: MetricsManager) -> Table:
    """Per node: status, duration, worker and attempts; the slowest first when large."""
    rows = list(m.nodes.values())
    title = f"{m.node_count} nodes, {m.execution_time:.2f}s"
    if len(rows) > SUMMARY_ROWS:
        rows = sorted(rows, key=lambda r: r.duration, reverse=True)[:SUMMARY_ROWS]
        title += f" (the {SUMMARY_ROWS} slowest shown)"
    table = Table(title=title)
    for col, justify in (
        ("node", "left"),
        ("status", "left"),
        ("duration", "right"),
        ("worker", "left"),
        ("attempts", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    style = {"done": "green", "failed": "red"}
    for r in rows:
        table.add_row(
            r.name,
            f"[{style.get(r.status, 'dim')}]{r.status}[/]",
            f"{r.duration:.3f}s",
            r.worker or "-",
            str(r.attempts),
        )
    return table


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
