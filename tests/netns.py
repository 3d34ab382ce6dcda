"""Network namespaces as test hosts, and a client agent that runs inside one.

:class:`Hosts` creates one namespace per host plus one holding a bridge; each host gets
a veth pair to the bridge and its own address in a random ``10.213.N.0/24``. Nothing is
routed anywhere else: the root namespace has no address on these links, so all traffic
stays between the namespaces made here. ``close()`` kills what still runs inside them and
deletes them all, and is safe to call on a half-made setup.

The root namespace cannot reach these addresses, so a client has to run inside one of
the namespaces too: :class:`Agent` starts this file there (``python netns.py agent``),
and the test talks to it over stdin/stdout, one JSON object per line.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

VETH = "eth0"  # the interface name inside every host namespace


class NetnsUnavailable(RuntimeError):
    """Namespaces or veth pairs could not be created here."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise NetnsUnavailable(
            f"'ip {' '.join(args)}' failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )


@dataclass
class Host:
    name: str
    ns: str
    addr: str


class Hosts:
    """``with Hosts("c", "w1", "w2") as hosts: hosts["c"].addr ...``"""

    def __init__(self, *names: str) -> None:
        tag = f"odibi-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.subnet = f"10.213.{random.randint(1, 254)}"
        self.bridge_ns = f"{tag}-br"
        self.hosts = {
            name: Host(name, f"{tag}-{name}", f"{self.subnet}.{i + 1}")
            for i, name in enumerate(names)
        }
        self.created: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Hosts:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def create(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the 'ip' command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("creating network namespaces needs root")
        br = self.bridge_ns
        self._add_ns(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            self._add_ns(host.ns)
            port = f"p{i}"
            peer = ("peer", "name", VETH, "netns", host.ns)
            _ip("-n", br, "link", "add", port, "type", "veth", *peer)
            _ip("-n", br, "link", "set", port, "master", "br0")
            _ip("-n", br, "link", "set", port, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", VETH)
            _ip("-n", host.ns, "link", "set", VETH, "up")

    def link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's only link, as if its cable were pulled."""
        _ip("-n", self.hosts[name].ns, "link", "set", VETH, "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.created):
            # whatever still runs in a namespace made here was started by this test
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in proc.stdout.split():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), sig)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


def keygen(directory: str, *names: str) -> None:
    """Keypairs via the ``odibi keygen`` command, as a user would make them."""
    for name in names:
        subprocess.run(
            [sys.executable, "-m", "odibi_actor.cli", "keygen", "--dir", directory, name],
            check=True,
            capture_output=True,
            env=_env(),
        )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p or os.getcwd() for p in sys.path))
    return env


# --- the agent: a client living inside a namespace -----------------------------------------
class Agent:
    """A :class:`odibi_actor.client.Client` in namespace ``ns``, driven over a pipe."""

    def __init__(self, ns: str, address: str, curve_secret: str, server_key: str) -> None:
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "agent",
            address, curve_secret, server_key,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def call(self, op: str, wait: float = 30.0, **args: Any) -> Any:
        """Send one request and return its answer; ``wait`` bounds the wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError(f"agent did not answer {op!r} within {wait:g}s") from None
        if not line:
            raise RuntimeError(f"agent exited (code {self.proc.poll()}) during {op!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class AgentError(RuntimeError):
    """An exception raised in the agent, as ``Type: message``."""


# steps, shipped by value (this file runs as __main__ in the agent)
def step(*inputs: int, seed: int, delay: float) -> int:
    if delay:
        time.sleep(delay)
    return expected_value(seed, inputs)


def expected_value(seed: int, inputs: tuple[int, ...] | list[int]) -> int:
    return seed + sum((i + 1) * 7 * v for i, v in enumerate(inputs))


def layered(layers: int, width: int, delay: float) -> tuple[Any, dict[str, int]]:
    """The DAG (a builder) and every output's expected value."""
    import functools

    from odibi_actor import DAGBuilder

    b = DAGBuilder()
    expected: dict[str, int] = {}
    for layer in range(layers):
        for j in range(width):
            seed = 1000 * layer + j
            ins = [] if layer == 0 else [f"v{layer - 1}_{j}", f"v{layer - 1}_{(j + 1) % width}"]
            fn = functools.partial(step, seed=seed, delay=delay)
            b.add_node(f"n{layer}_{j}", fn, inputs=ins, outputs=[f"v{layer}_{j}"])
            expected[f"v{layer}_{j}"] = expected_value(seed, [expected[i] for i in ins])
    return b, expected


def _agent(address: str, curve_secret: str, server_key: str) -> None:
    from odibi_actor.client import Client

    client = Client(address, curve_secret=curve_secret, server_key=server_key, timeout=10)
    handles: dict[str, Any] = {}

    def handle(req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "workers":
            return client.workers()
        if op == "wait_workers":
            deadline = time.monotonic() + req["timeout"]
            while True:
                with contextlib.suppress(Exception):
                    names = sorted(w["name"] for w in client.workers())
                    if names == sorted(req["names"]):
                        return names
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers {req['names']} did not register")
                time.sleep(0.1)
        if op == "submit":
            dag, _ = layered(req["layers"], req["width"], req["delay"])
            h = client.submit(dag)
            handles[h.run_id] = h
            return h.run_id
        if op == "status":
            return handles[req["run"]].status()
        if op == "result":
            h = handles[req["run"]]
            try:
                out = h.result(timeout=req["timeout"])
                error = None
            except Exception as exc:
                out, error = None, f"{type(exc).__name__}: {exc}"
            m = h.metrics
            nodes = {} if m is None else {n: [x.status, x.worker] for n, x in m.nodes.items()}
            return {"out": out, "error": error, "nodes": nodes}
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": handle(req)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    client.close()


if __name__ == "__main__" and sys.argv[1:2] == ["agent"]:
    _agent(*sys.argv[2:5])
