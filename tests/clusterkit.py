"""Real coordinator and worker processes for cluster tests, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from odibi_actor.client import Client


def free_port() -> int:
    """A TCP port whose successor is free too (the client address is listen port + 1)."""
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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p or os.getcwd() for p in sys.path))
    return env


@dataclass
class Cluster:
    """A coordinator on loopback plus named workers, each a real process."""

    port: int
    host: str = "127.0.0.1"
    coordinator_args: Sequence[str] = ()
    worker_args: Sequence[str] = ()
    netns: str | None = None  # run the coordinator inside this network namespace
    coordinator: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: str | None = None

    @property
    def listen(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def client_address(self) -> str:
        return f"tcp://{self.host}:{self.port + 1}"

    def _popen(self, cmd: list[str], name: str, netns: str | None) -> subprocess.Popen[bytes]:
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        out: Any = subprocess.DEVNULL
        if self.log_dir:
            out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
        return subprocess.Popen(
            cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_coordinator(self, *extra: str) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "odibi_actor.coordinator",
            "--listen",
            self.listen,
            "--log-level",
            "debug",
            *self.coordinator_args,
            *extra,
        ]
        self.coordinator = self._popen(cmd, "coordinator", self.netns)
        return self.coordinator

    def start_worker(
        self, name: str, *extra: str, netns: str | None = None, address: str | None = None
    ) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "odibi_actor.worker",
            address or self.listen,
            "--name",
            name,
            "--log-level",
            "debug",
            *self.worker_args,
            *extra,
        ]
        proc = self.workers[name] = self._popen(cmd, name, netns)
        return proc

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", 10)
        return Client(self.client_address, **kwargs)

    def wait_for_workers(self, n: int, timeout: float = 20.0, **client_kwargs: Any) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self.client(**client_kwargs) as c:
            while True:
                try:
                    workers = c.workers()
                except Exception:
                    workers = []
                if len(workers) >= n:
                    return workers
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(workers)} of {n} workers registered")
                time.sleep(0.1)

    def kill_coordinator(self, sig: int = signal.SIGKILL) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            os.killpg(self.coordinator.pid, sig)
            self.coordinator.wait(10)

    def close(self) -> None:
        procs = [*self.workers.values(), *([self.coordinator] if self.coordinator else [])]
        for p in procs:
            if p.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, sig)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    # --- helpers for assertions ------------------------------------------------------------
    def log_tail(self, *names: str, lines: int = 30) -> str:
        """The last ``lines`` of each named log (default: all), for assertion messages."""
        if not self.log_dir:
            return "(no log_dir set)"
        if not names:
            names = tuple(sorted(f[:-4] for f in os.listdir(self.log_dir) if f.endswith(".log")))
        out = []
        for name in names:
            path = os.path.join(self.log_dir, f"{name}.log")
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError as exc:
                text = f"(unreadable: {exc})"
            tail = "\n".join(strip_ansi(text).splitlines()[-lines:])
            out.append(f"----- {name}.log (last {lines} lines) -----\n{tail}")
        return "\n".join(out)

    def log_text(self, name: str) -> str:
        """A whole log, ANSI colours stripped ("" if missing)."""
        if not self.log_dir:
            return ""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
                return strip_ansi(f.read().decode("utf-8", "replace"))
        except OSError:
            return ""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def env() -> dict[str, str]:
    """The environment cluster processes get: this interpreter's sys.path as PYTHONPATH."""
    return _env()


def run_module(
    module: str, *args: str, timeout: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module args...`` to completion, capturing text stdout and stderr."""
    extra_env = kwargs.pop("env", None) or {}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**_env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
