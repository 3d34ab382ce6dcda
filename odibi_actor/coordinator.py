"""The long-lived coordinator: a worker pool and a client gateway on one actor system.

It is the ``odibi-coordinator`` command. Workers connect to ``--listen``, clients to
``--client-listen``. See the README's trust model: it binds loopback unless CurveZMQ is
configured or ``--insecure`` is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import zmq
import zmq.asyncio

from ._gateway import ActiveRuns, Drain, Gateway
from ._kernel import ActorSystem, _first_leaf
from ._logging import configure_logging, get_logger
from ._pool import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, SayGoodbye, WorkerPool
from ._security import SecurityError, is_loopback, server_socket_options, start_authenticator
from .errors import OdibiError

log = get_logger("odibi_actor.coordinator")

DEFAULT_LISTEN = "tcp://127.0.0.1:5555"


@dataclass
class CoordinatorConfig:
    listen: str = DEFAULT_LISTEN
    client_listen: str | None = None  # default: the listen port + 1
    curve_secret: str | None = None
    authorized_keys: str | None = None
    insecure: bool = False
    heartbeat: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    grace: float = 30.0
    max_message_size: int = 4 << 30
    retention: float = 3600.0
    allowed_failures: int = 3

    def client_address(self) -> str:
        if self.client_listen:
            return self.client_listen
        parts = urlsplit(self.listen)
        if parts.scheme != "tcp" or parts.port is None:
            raise OdibiError("--client-listen is required unless --listen is tcp://HOST:PORT")
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{parts.port + 1}"
        return urlunsplit((parts.scheme, netloc, "", "", ""))

    def check(self) -> None:
        """The trust model: no exposed socket without CurveZMQ, unless asked for."""
        if bool(self.curve_secret) != bool(self.authorized_keys):
            raise SecurityError("--curve-secret and --authorized-keys go together")
        exposed = [a for a in (self.listen, self.client_address()) if not is_loopback(a)]
        if exposed and not self.curve_secret and not self.insecure:
            raise SecurityError(
                f"refusing to bind {', '.join(exposed)} without CurveZMQ: anyone who can reach"
                " it could run code on your workers. Create keys with 'odibi keygen --dir KEYS"
                " server' (and one per worker and client), then pass --curve-secret"
                " KEYS/server.key_secret --authorized-keys DIR_OF_CLIENT_PUBLIC_KEYS; or bind"
                " 127.0.0.1; or pass --insecure on a network you trust entirely."
            )


class Coordinator:
    """Owns the sockets and actors; ``serve()`` runs until ``stop()`` (SIGTERM)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        config.check()
        self.config = config
        self._stop = anyio.Event()
        self.ready = anyio.Event()
        self.pool: Any = None
        self.gateway: Any = None

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        cfg = self.config
        ctx = zmq.asyncio.Context()
        auth = None
        options = None
        try:
            if cfg.curve_secret:
                options = server_socket_options(cfg.curve_secret)
                auth = start_authenticator(ctx, cfg.authorized_keys or "")
            async with ActorSystem() as system:
                self.pool = pool = system.spawn(
                    lambda: WorkerPool(
                        cfg.listen,
                        ctx,
                        heartbeat=cfg.heartbeat,
                        heartbeat_timeout=cfg.heartbeat_timeout,
                        configure_socket=options,
                        max_message_size=cfg.max_message_size,
                    ),
                    "pool",
                )
                self.gateway = gateway = system.spawn(
                    lambda: Gateway(
                        cfg.client_address(),
                        ctx,
                        pool,
                        configure_socket=options,
                        max_message_size=cfg.max_message_size,
                        retention=cfg.retention,
                        allowed_failures=cfg.allowed_failures,
                    ),
                    "gateway",
                )
                log.info(
                    "coordinator listening",
                    workers=cfg.listen,
                    clients=cfg.client_address(),
                    curve=bool(cfg.curve_secret),
                )
                self.ready.set()
                await self._stop.wait()
                await self._drain(gateway, pool)
                system.shutdown()
        finally:
            if auth is not None:
                auth.stop()
            ctx.destroy(linger=0)

    async def _drain(self, gateway: Any, pool: Any) -> None:
        gateway.tell(Drain())
        active = await gateway.ask(ActiveRuns(), timeout=5)
        log.info("coordinator stopping", active_runs=active, grace=self.config.grace)
        with anyio.move_on_after(self.config.grace):
            while active:
                await anyio.sleep(0.2)
                active = await gateway.ask(ActiveRuns(), timeout=5)
        if active:
            log.warning("grace period over; abandoning runs", active_runs=active)
        await pool.ask(SayGoodbye(), timeout=5)
        await anyio.sleep(0.1)  # let the goodbyes leave


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="odibi-coordinator",
        description="Run an odibi-actor coordinator: workers connect to --listen, clients"
        " (odibi run --address, odibi status, Client) to --client-listen. SIGTERM stops"
        " accepting runs, lets running ones finish for up to --grace seconds, then exits.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"address workers connect to (default: {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--client-listen",
        default=None,
        help="address clients connect to (default: the --listen port + 1)",
    )
    p.add_argument(
        "--curve-secret",
        metavar="FILE",
        help="the coordinator's CurveZMQ secret key (odibi keygen ... server)",
    )
    p.add_argument(
        "--authorized-keys",
        metavar="DIR",
        help="directory of public keys (*.key) of workers and clients allowed in",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without CurveZMQ (trusted networks only)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=HEARTBEAT_TIMEOUT,
        help=f"seconds of silence before a worker is declared lost"
        f" (default: {HEARTBEAT_TIMEOUT:g})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for running runs (default: 30)",
    )
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=4096,
        help="largest frame accepted from a peer, in MiB (default: 4096)",
    )
    p.add_argument(
        "--allowed-failures",
        type=int,
        default=3,
        help="a task running on this many workers that died is failed as a poison task"
        " (default: 3)",
    )
    p.add_argument(
        "--retention",
        type=float,
        default=3600.0,
        help="seconds a finished run and its outputs stay fetchable (default: 3600)",
    )
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


async def _amain(config: CoordinatorConfig) -> None:
    coordinator = Coordinator(config)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for _ in signals:
                    coordinator.stop()

            tg.start_soon(on_signal)
            await coordinator.serve()
            tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    config = CoordinatorConfig(
        listen=args.listen,
        client_listen=args.client_listen,
        curve_secret=args.curve_secret,
        authorized_keys=args.authorized_keys,
        insecure=args.insecure,
        heartbeat_timeout=args.heartbeat_timeout,
        grace=args.grace,
        max_message_size=args.max_message_mb << 20,
        allowed_failures=args.allowed_failures,
        retention=args.retention,
    )
    try:
        try:
            anyio.run(_amain, config)
        except BaseExceptionGroup as group:  # the signal task group wraps what went wrong
            raise _first_leaf(group) from None
    except OdibiError as exc:
        print(f"odibi-coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    except zmq.ZMQError as exc:
        print(f"odibi-coordinator: cannot bind: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
