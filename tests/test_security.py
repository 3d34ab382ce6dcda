"""The trust model, tested with real processes and real hostile sockets.

Keys and the loopback rule; a CurveZMQ coordinator on 127.0.0.1 with an authorised worker
and client, and peers that are not authorised (their own keypair, or no Curve at all);
and malformed, truncated and oversize frames sent from raw zmq sockets to both ports.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from clusterkit import Cluster, free_port, run_module

from odibi_actor import DAGBuilder
from odibi_actor import _wire as wire
from odibi_actor._security import keygen
from odibi_actor.client import Client, CoordinatorError


# --- step functions -----------------------------------------------------------------------
def inc(x: int) -> int:
    return x + 1


def slow_inc(x: int, delay: float) -> int:
    time.sleep(delay)
    return x + 1


def add_all(*xs: int) -> int:
    return sum(xs)


def blob(n: int) -> bytes:
    return b"x" * n


def size(b: bytes) -> int:
    return len(b)


def fan_dag(width: int, slow: bool = False) -> DAGBuilder:
    """``width`` parallel increments of x, then their sum."""
    b = DAGBuilder()
    for i in range(width):
        if slow:
            b.add_node(f"inc{i}", slow_inc, inputs=["x", "delay"], outputs=[f"y{i}"])
        else:
            b.add_node(f"inc{i}", inc, inputs=["x"], outputs=[f"y{i}"])
    b.add_node("sum", add_all, inputs=[f"y{i}" for i in range(width)], outputs=["total"])
    return b


def fan_expected(width: int, x: int) -> dict[str, int]:
    out = {f"y{i}": x + 1 for i in range(width)}
    out["total"] = width * (x + 1)
    return out


# --- helpers ------------------------------------------------------------------------------
def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def frames(header: dict[str, Any], values: list[Any] | None = None) -> list[Any]:
    """A well-formed message (protocol version filled in)."""
    return wire.encode(dict(header), [wire.pack(v) for v in values or ()])


def raw(header: Any) -> bytes:
    return msgpack.packb(header)


def dealer(
    ctx: zmq.Context[Any],
    address: str,
    keys: tuple[bytes, bytes] | None = None,
    server_key: bytes | None = None,
) -> zmq.Socket[Any]:
    """A raw DEALER; with ``keys`` (public, secret) it speaks CurveZMQ to ``server_key``."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server_key
    s.connect(address)
    return s


def replies(sock: zmq.Socket[Any], wait: float, until: int | None = None) -> list[list[bytes]]:
    """What ``sock`` receives within ``wait`` seconds (stop early once ``until`` came)."""
    got: list[list[bytes]] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and (until is None or len(got) < until):
        if sock.poll(int(left * 1000) + 1):
            got.append(sock.recv_multipart())
    return got


def answers(c: Client) -> bool:
    try:
        c.workers()
    except CoordinatorError:
        return False
    return True


def count_in_log(cluster: Cluster, text: str) -> int:
    return cluster.log_text("coordinator").count(text)


# --- keys ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_keygen_creates_keys_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    wide = {"COLUMNS": "500"}  # rich wraps long paths at the terminal width
    res = run_module("odibi_actor.cli", "keygen", "alice", "--dir", str(d), env=wide)
    assert res.returncode == 0, res.stderr
    public, secret = d / "alice.key", d / "alice.key_secret"
    assert public.is_file() and secret.is_file(), list(d.iterdir())
    assert str(public) in res.stdout and str(secret) in res.stdout, res.stdout
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600, oct(secret.stat().st_mode)
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert len(pub) == 40 and sec is not None and len(sec) == 40  # z85 Curve25519 keys
    pub_only, no_secret = zmq.auth.load_certificate(str(public))
    assert pub_only == pub and no_secret is None, "the public file must not hold the secret"
    before = (public.read_bytes(), secret.read_bytes())

    again = run_module("odibi_actor.cli", "keygen", "alice", "--dir", str(d))
    assert again.returncode == 2, (again.stdout, again.stderr)
    assert "refusing to overwrite" in again.stderr, again.stderr
    assert (public.read_bytes(), secret.read_bytes()) == before

    other = run_module("odibi_actor.cli", "keygen", "bob", "--dir", str(d))
    assert other.returncode == 0, other.stderr
    assert zmq.auth.load_certificate(str(d / "bob.key"))[0] != pub


# --- the loopback rule --------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "where",
    ["listen", "client-listen"],
)
def test_non_loopback_bind_without_curve_is_refused(where: str) -> None:
    port = free_port()
    if where == "listen":
        args = ["--listen", f"tcp://0.0.0.0:{port}"]
    else:
        args = [
            "--listen",
            f"tcp://127.0.0.1:{port}",
            "--client-listen",
            f"tcp://0.0.0.0:{port + 1}",
        ]
    res = run_module("odibi_actor.coordinator", *args, timeout=30)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--curve-secret" in res.stderr, res.stderr
    assert "odibi keygen" in res.stderr, res.stderr
    assert "--insecure" in res.stderr, res.stderr
    assert "0.0.0.0" in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_non_loopback_bind_with_insecure_starts(tmp_path: Path) -> None:
    cl = Cluster(free_port(), host="0.0.0.0", log_dir=str(tmp_path))
    try:
        coord = cl.start_coordinator("--insecure")
        local = f"tcp://127.0.0.1:{cl.port}"
        cl.start_worker("lan", address=local)
        with Client(f"tcp://127.0.0.1:{cl.port + 1}", timeout=5) as c:
            wait_until(lambda: answers(c) and c.workers(), 20, "the worker to register")
            out = c.submit(fan_dag(2), {"x": 1}).result(timeout=20)
        assert out == fan_expected(2, 1)
        assert coord.poll() is None
        os.killpg(coord.pid, signal.SIGTERM)
        assert coord.wait(15) == 0, cl.log_tail("coordinator")
    finally:
        cl.close()


@pytest.mark.timeout(60)
def test_curve_secret_without_authorized_keys_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path, "server")
    port = free_port()
    res = run_module(
        "odibi_actor.coordinator",
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--curve-secret",
        str(tmp_path / "server.key_secret"),
        timeout=30,
    )
    assert res.returncode == 2, res.stderr
    assert "--authorized-keys" in res.stderr, res.stderr


# --- a CurveZMQ cluster on loopback -------------------------------------------------------
@dataclass
class CurveSetup:
    cluster: Cluster
    keys: Path  # server, worker, client keypairs
    rogue: Path  # keypairs that are NOT in the authorised directory
    server_public: bytes

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", 10)
        return Client(
            self.cluster.client_address,
            curve_secret=str(self.keys / "client.key_secret"),
            server_key=str(self.keys / "server.key"),
            **kwargs,
        )

    def rogue_keys(self) -> tuple[bytes, bytes]:
        pub, sec = zmq.auth.load_certificate(str(self.rogue / "mallory.key_secret"))
        assert sec is not None
        return pub, sec


@pytest.fixture(scope="module")
def curve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CurveSetup]:
    base = tmp_path_factory.mktemp("curve")
    keys, rogue, authorized = base / "keys", base / "rogue", base / "authorized"
    for name in ("server", "worker", "client"):
        keygen(keys, name)
    for name in ("rogue-worker", "rogue-client", "mallory"):
        keygen(rogue, name)
    authorized.mkdir()
    for name in ("worker", "client"):
        shutil.copy(keys / f"{name}.key", authorized / f"{name}.key")
    cl = Cluster(
        free_port(),
        coordinator_args=(
            "--curve-secret",
            str(keys / "server.key_secret"),
            "--authorized-keys",
            str(authorized),
            "--heartbeat-timeout",
            "2",
        ),
    )
    cl.log_dir = str(base)
    setup = CurveSetup(cl, keys, rogue, zmq.auth.load_certificate(str(keys / "server.key"))[0])
    try:
        cl.start_coordinator()
        server_key = str(keys / "server.key")
        cl.start_worker(
            "good",
            "--nthreads",
            "2",
            "--curve-secret",
            str(keys / "worker.key_secret"),
            "--server-key",
            server_key,
        )
        # a worker with a keypair of its own that nobody authorised
        cl.start_worker(
            "rogue",
            "--nthreads",
            "4",
            "--curve-secret",
            str(rogue / "rogue-worker.key_secret"),
            "--server-key",
            server_key,
        )
        cl.wait_for_workers(1, curve_secret=str(keys / "client.key_secret"), server_key=server_key)
        yield setup
    finally:
        cl.close()


@pytest.mark.timeout(60)
def test_curve_authorised_worker_and_client_run_a_dag(curve: CurveSetup) -> None:
    time.sleep(1.0)  # give the rogue worker every chance to (fail to) register
    with curve.client() as c:
        workers = c.workers()
        assert [w["name"] for w in workers] == ["good"], workers
        handle = c.submit(fan_dag(12), {"x": 41})
        out = handle.result(timeout=30)
        assert out == fan_expected(12, 41)
        assert handle.metrics is not None
        placed = {name: m.worker for name, m in handle.metrics.nodes.items()}
        assert set(placed.values()) == {"good"}, placed
        assert [w["name"] for w in c.workers()] == ["good"]
    rogue = curve.cluster.workers["rogue"]
    assert rogue.poll() is None, "the rogue worker should still be knocking"
    assert "registered" not in curve.cluster.log_text("rogue"), curve.cluster.log_tail("rogue")
    log = curve.cluster.log_text("coordinator")
    assert "worker=good" in log and "worker=rogue" not in log, curve.cluster.log_tail()


@pytest.mark.timeout(60)
def test_curve_unauthorised_clients_get_no_answer(curve: CurveSetup) -> None:
    with curve.client() as good:
        run_id = good.submit(fan_dag(2), {"x": 0}).run_id
        good.attach(run_id).result(timeout=20)
        known = {r["run"] for r in good.runs()}
    rogue_args = {
        "curve_secret": str(curve.rogue / "rogue-client.key_secret"),
        "server_key": str(curve.keys / "server.key"),
    }
    for kwargs in (rogue_args, {}):  # its own keypair; and no Curve at all
        with Client(curve.cluster.client_address, timeout=0.3, **kwargs) as c:
            with pytest.raises(CoordinatorError, match="did not answer"):
                c.workers()
            with pytest.raises(CoordinatorError, match="did not answer"):
                c.runs()
            with pytest.raises(CoordinatorError, match="did not answer"):
                c.attach(run_id)  # cannot read a run's status...
            with pytest.raises(CoordinatorError, match="did not answer"):
                c.submit(fan_dag(1), {"x": 0}, run_id=f"intruder-{len(kwargs)}")
    with curve.client() as good:
        after = {r["run"] for r in good.runs()}
        assert after == known, after - known  # ...nor submit
        assert good.attach(run_id).status()["state"] == "done"


@pytest.mark.timeout(60)
def test_curve_raw_unauthorised_sockets_cannot_register_submit_read_or_disturb(
    curve: CurveSetup,
) -> None:
    cl = curve.cluster
    ctx = zmq.Context()
    socks: list[zmq.Socket[Any]] = []
    try:
        with curve.client() as good:
            handle = good.submit(fan_dag(4, slow=True), {"x": 10, "delay": 0.5})
            wait_until(lambda: handle.status()["running"] >= 1, 10, "the run to start")
            run_id = handle.run_id
            for keys in (curve.rogue_keys(), None):  # own unauthorised keypair; no Curve
                server = curve.server_public if keys else None
                w = dealer(ctx, cl.listen, keys, server)
                c = dealer(ctx, cl.client_address, keys, server)
                socks += [w, c]
                w.send_multipart(
                    frames({"t": wire.HELLO, "name": "mallory", "nthreads": 8, "pid": 1})
                )
                w.send_multipart(frames({"t": wire.HEARTBEAT}))
                # claim results for the real run's tasks, with wrong values
                w.send_multipart(
                    frames(
                        {"t": wire.RESULTS, "run": run_id, "ok": [[0, 1, 0.1]], "err": []},
                        [-999],
                    )
                )
                w.send_multipart(frames({"t": wire.BYE, "returned": [], "done": True}))
                base = {"run": run_id, "req": 7}
                c.send_multipart(frames({"t": wire.WORKERS, "req": 1}))
                c.send_multipart(frames({"t": wire.RUNS, "req": 2}))
                c.send_multipart(frames({"t": wire.STATUS, **base}))
                c.send_multipart(frames({"t": wire.EVENTS, "since": 0, **base}))
                c.send_multipart(frames({"t": wire.RESULT, "wait": 0, **base}))
                c.send_multipart(frames({"t": wire.CANCEL_RUN, **base}))
                c.send_multipart(
                    frames(
                        {
                            "t": wire.SUBMIT,
                            "run": "evil-run",
                            "req": 9,
                            "nodes": [["evil", [], ["evil"], 0, None, 0.1]],
                            "fns": [["ref", "os:getpid"]],
                            "keys": [],
                        }
                    )
                )
            for s in socks:
                got = replies(s, 0.7)
                assert got == [], f"an unauthorised socket got an answer: {got[:3]}"
            out = handle.result(timeout=30)
            assert out == fan_expected(4, 10), out  # not cancelled, no forged values
            assert handle.status()["state"] == "done"
            assert {m.worker for m in handle.metrics.nodes.values()} == {"good"}
            assert "evil-run" not in {r["run"] for r in good.runs()}
            assert [w["name"] for w in good.workers()] == ["good"]
        assert cl.coordinator is not None and cl.coordinator.poll() is None
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.destroy(linger=0)


# --- malformed, truncated and oversize frames ---------------------------------------------
HELLO_OK = {"v": 1, "t": wire.HELLO, "name": "x", "nthreads": 1}

# Each is dropped and counted by the pool ("dropped bad message").
BAD_FOR_WORKER_PORT: list[list[bytes]] = [
    [b""],  # empty frame
    [b"\xc1\xc1\xc1 not msgpack"],  # 0xc1 is never valid msgpack
    [raw([1, 2, 3])],  # header not a map
    [raw("hello")],
    [raw({**HELLO_OK, "v": 99})],  # other protocol version
    [raw({"t": wire.HELLO, "name": "x", "nthreads": 1})],  # no version
    [raw({"v": 1, "t": "bogus"})],  # unknown type
    [raw({"v": 1, "t": ["hello"]})],  # unhashable type
    [raw(HELLO_OK)[:9]],  # truncated header
    [raw({**HELLO_OK, "lens": [5], "nbufs": [1]}), b"12345"],  # a buffer frame missing
    [raw({**HELLO_OK, "lens": [100], "nbufs": [0]}), b"short"],  # payload shorter than said
    [raw({**HELLO_OK, "lens": 5, "nbufs": 0})],  # layout of the wrong type
    [raw({**HELLO_OK, "nthreads": "many"})],
    [raw({**HELLO_OK, "nthreads": 0})],
    [raw({**HELLO_OK, "nthreads": 10**9})],
    [raw({"v": 1, "t": wire.HELLO, "name": "x"})],  # no nthreads
]

SUBMIT_OK = {
    "v": 1,
    "t": wire.SUBMIT,
    "req": 1,
    "nodes": [["a", [], ["a"], 0, None, 0.1]],
    "fns": [["ref", "os:getpid"]],
    "keys": [],
}

# Each is dropped and counted by the gateway ("dropped bad client message").
BAD_FOR_CLIENT_PORT: list[list[bytes]] = [
    [b""],
    [b"\xc1\xc1\xc1 not msgpack"],
    [raw([1, 2, 3])],
    [raw({"v": 99, "t": wire.WORKERS, "req": 1})],
    [raw({"v": 1, "t": "bogus", "req": 1})],
    [raw({"v": 1, "t": ["submit"], "req": 1})],  # unhashable type
    [raw({"v": 1, "t": wire.HELLO, "name": "x", "nthreads": 1})],  # a worker's message
    [raw(SUBMIT_OK)[:11]],  # truncated
    [raw({**SUBMIT_OK, "keys": ["k"]})],  # a key without its value
    [raw({**SUBMIT_OK, "keys": ["k"], "lens": [4], "nbufs": [0]}), b"xy"],  # short payload
    [raw({**SUBMIT_OK, "fns": []})],  # nodes and functions disagree
]

# Answered with an error (or ignored), never fatal.
ODD_FOR_CLIENT_PORT: list[list[bytes]] = [
    [raw({**SUBMIT_OK, "nodes": ["garbage"]})],
    [raw({**SUBMIT_OK, "nodes": [["a", 5, ["a"], 0, None, 0.1]]})],
    [raw({**SUBMIT_OK, "nodes": [["a", [], ["a"], "x", None, 0.1]]})],
    [raw({**SUBMIT_OK, "fns": [["exec", "rm -rf /"]]})],
    [raw({**SUBMIT_OK, "run": "../../etc/passwd"})],
    [
        raw(
            {
                **SUBMIT_OK,
                "run": "cyc",
                "nodes": [["a", ["b"], ["a"], 0, None, 0.1], ["b", ["a"], ["b"], 0, None, 0.1]],
                "fns": [["ref", "os:getpid"], ["ref", "os:getpid"]],
            }
        )
    ],
    [raw({"v": 1, "t": wire.STATUS, "req": 1, "run": "nope"})],
    [raw({"v": 1, "t": wire.RESULT, "req": 1, "run": "nope", "wait": "soon"})],
    [raw({"v": 1, "t": wire.EVENTS, "req": 1, "run": "nope", "since": "x"})],
    [raw({"v": 1, "t": wire.CANCEL_RUN, "req": 1})],
]

OVERSIZE = 2 << 20  # 2 MiB against --max-message-mb 1


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Cluster]:
    """A loopback coordinator without Curve, 1 MiB message limit, and one worker."""
    cl = Cluster(
        free_port(), coordinator_args=("--max-message-mb", "1", "--heartbeat-timeout", "2")
    )
    cl.log_dir = str(tmp_path)
    try:
        cl.start_coordinator()
        cl.start_worker("steady")
        cl.wait_for_workers(1)
        yield cl
    finally:
        cl.close()


def assert_serves(cl: Cluster, workers: int = 1, x: int = 5) -> None:
    """The coordinator is alive, workers can still join, and it runs a DAG correctly."""
    assert cl.coordinator is not None
    assert cl.coordinator.poll() is None, "coordinator died:\n" + cl.log_tail("coordinator")
    name = f"fresh{len(cl.workers)}"
    cl.start_worker(name)
    try:
        cl.wait_for_workers(workers + 1, timeout=6)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: a new worker cannot join\n{cl.log_tail()}") from None
    with cl.client() as c:
        handle = c.submit(fan_dag(6), {"x": x})
        try:
            out = handle.result(timeout=15)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{cl.log_tail()}") from None
        assert out == fan_expected(6, x)
        assert {w["name"] for w in c.workers()} >= {name}
    assert cl.coordinator.poll() is None


@pytest.mark.timeout(60)
def test_garbage_truncated_and_oversize_frames_are_dropped(plain: Cluster) -> None:
    cl = plain
    pool_before = count_in_log(cl, "dropped bad message")
    gw_before = count_in_log(cl, "dropped bad client message")
    ctx = zmq.Context()
    try:
        w = dealer(ctx, cl.listen)
        c = dealer(ctx, cl.client_address)
        for msg in BAD_FOR_WORKER_PORT:
            w.send_multipart(msg)
        for msg in BAD_FOR_CLIENT_PORT:
            c.send_multipart(msg)
        odd = dealer(ctx, cl.client_address)
        for msg in ODD_FOR_CLIENT_PORT:
            odd.send_multipart(msg)
        answered = replies(odd, 10, until=len(ODD_FOR_CLIENT_PORT))
        assert len(answered) == len(ODD_FOR_CLIENT_PORT), answered
        for reply in answered:
            header, _ = wire.decode(reply)
            assert header["t"] == wire.ERROR, header  # an error answer, nothing else
        # a registered peer that then misbehaves
        r = dealer(ctx, cl.listen)
        r.send_multipart(frames({"t": wire.HELLO, "name": "odd", "nthreads": 1}))
        assert r.poll(5000), "no welcome"
        assert wire.decode(r.recv_multipart())[0]["t"] == wire.WELCOME
        r.send_multipart(frames({"t": wire.RESULTS, "run": "no-such-run", "ok": [], "err": []}))
        r.send_multipart(frames({"t": wire.STARTED, "run": "no-such-run", "tasks": [[0, 1]]}))
        r.send_multipart(frames({"t": wire.SUBMIT, "run": "x"}))  # wrong port's message
        r.send_multipart(frames({"t": wire.BYE, "returned": [["x"]], "done": False}))
        r.send_multipart(frames({"t": wire.BYE, "returned": [], "done": True}))
        # oversize: libzmq drops the frame (and the connection) before the coordinator sees it
        big = os.urandom(OVERSIZE)
        for s in (w, c):
            s.send_multipart([raw({"v": 1, "t": wire.HEARTBEAT}), big])
            s.send_multipart([big])
        assert replies(c, 0.3) == []  # dropped frames get no answer

        want_pool = pool_before + len(BAD_FOR_WORKER_PORT) + 2  # + SUBMIT and bad BYE
        want_gw = gw_before + len(BAD_FOR_CLIENT_PORT)
        wait_until(
            lambda: (
                count_in_log(cl, "dropped bad message") >= want_pool
                and count_in_log(cl, "dropped bad client message") >= want_gw
            ),
            10,
            f"{want_pool} dropped worker-port and {want_gw} client-port messages in the log"
            f" (now {count_in_log(cl, 'dropped bad message')} and"
            f" {count_in_log(cl, 'dropped bad client message')})\n{cl.log_tail('coordinator')}",
        )
        # the limit holds for a real client too: 2 MiB of initial data never arrives...
        b = DAGBuilder()
        b.add_node("size", size, inputs=["data"], outputs=["n"])
        with cl.client(timeout=0.5) as big_client, pytest.raises(CoordinatorError):
            big_client.submit(b, {"data": b"y" * OVERSIZE}, run_id="oversize")
        # ...while 512 KiB is fine
        with cl.client() as ok_client:
            half = ok_client.submit(b, {"data": b"y" * (512 << 10)}, run_id="undersize")
            assert half.result(timeout=15) == {"n": 512 << 10}
        assert_serves(cl)
        with cl.client() as good:
            runs = {r["run"] for r in good.runs()}
            assert "oversize" not in runs
            assert "../../etc/passwd" not in runs
            names = {w["name"] for w in good.workers()}
            assert "odd" not in names and "x" not in names, names
        for s in (w, c, r, odd):
            s.close(linger=0)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
def test_a_malformed_submit_leaves_no_run_behind(plain: Cluster) -> None:
    """A SUBMIT the coordinator answers with an error must not register a zombie run."""
    cl = plain
    ctx = zmq.Context()
    try:
        c = dealer(ctx, cl.client_address)
        for run_id, spec in (("zombie-list", ["ref", ["x"]]), ("zombie-dict", ["val", {}])):
            c.send_multipart(raw_submit(run_id, spec))
            got = replies(c, 1.0)
            assert len(got) == 1 and wire.decode(got[0])[0]["t"] == wire.ERROR, got
        c.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    with cl.client() as good:
        runs = {r["run"]: r["state"] for r in good.runs()}
    assert "zombie-list" not in runs and "zombie-dict" not in runs, (
        f"rejected submissions are still listed as runs: {runs}"
    )


def raw_submit(run_id: str, spec: Any) -> list[bytes]:
    return [raw({**SUBMIT_OK, "run": run_id, "fns": [spec]})]


# Frames that must not take the coordinator down (each reached a crash while testing).
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "port,header",
    [
        pytest.param("worker", {**HELLO_OK, "nthreads": math.inf}, id="hello-nthreads-inf"),
        pytest.param("worker", {**HELLO_OK, "pid": math.inf}, id="hello-pid-inf"),
        pytest.param("worker", {**HELLO_OK, "nthreads": math.nan}, id="hello-nthreads-nan"),
        pytest.param(
            "client",
            {**SUBMIT_OK, "run": "inf", "nodes": [["a", [], ["a"], math.inf, None, 0.1]]},
            id="submit-retries-inf",
        ),
        pytest.param(
            "client",
            {**SUBMIT_OK, "run": "inft", "nodes": [["a", [], ["a"], 0, None, math.inf]]},
            id="submit-retry-delay-inf",
        ),
        pytest.param(
            "client", {"v": 1, "t": wire.EVENTS, "req": 1, "since": math.inf}, id="events-since-inf"
        ),
        pytest.param(
            "client", {"v": 1, "t": wire.RESULT, "req": 1, "wait": math.nan}, id="result-wait-nan"
        ),
    ],
)
def test_hostile_numbers_do_not_crash_the_coordinator(
    plain: Cluster, port: str, header: dict[str, Any]
) -> None:
    cl = plain
    if "run" not in header and port == "client":
        with cl.client() as c:  # aim at a real run
            run = c.submit(fan_dag(1), {"x": 0})
            run.result(timeout=15)
            header = {**header, "run": run.run_id}
    ctx = zmq.Context()
    try:
        s = dealer(ctx, cl.listen if port == "worker" else cl.client_address)
        s.send_multipart([raw(header)])
        replies(s, 0.5)
        s.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    assert_serves(cl)


@pytest.mark.timeout(60)
def test_nan_duration_from_a_registered_peer_does_not_wedge_the_pool(tmp_path: Path) -> None:
    """A peer that registers, takes a task and reports a NaN duration is one bad message."""
    cl = Cluster(free_port(), coordinator_args=("--heartbeat-timeout", "2"))
    cl.log_dir = str(tmp_path)
    ctx = zmq.Context()
    try:
        cl.start_coordinator()
        m = dealer(ctx, cl.listen)
        m.send_multipart(frames({"t": wire.HELLO, "name": "mallory", "nthreads": 1}))
        assert m.poll(15000), "no welcome:\n" + cl.log_tail()
        assert wire.decode(m.recv_multipart())[0]["t"] == wire.WELCOME
        with cl.client() as c:
            first = c.submit(fan_dag(1), {"x": 1})
            header: dict[str, Any] = {}
            deadline = time.monotonic() + 10
            while header.get("t") != wire.TASKS:
                assert m.poll(int(max(0.0, deadline - time.monotonic()) * 1000) + 1), "no task"
                header, _ = wire.decode(m.recv_multipart())
            tid, attempt, _ = header["tasks"][0]
            m.send_multipart(
                frames(
                    {
                        "t": wire.RESULTS,
                        "run": header["run"],
                        "ok": [[tid, attempt, math.nan]],
                        "err": [],
                    },
                    [2],
                )
            )
            time.sleep(0.3)
            m.send_multipart(frames({"t": wire.BYE, "returned": [], "done": True}))
            m.close(linger=0)
            time.sleep(0.3)
            assert_serves(cl, workers=0, x=7)
            first.cancel()
    finally:
        ctx.destroy(linger=0)
        cl.close()


@pytest.mark.timeout(60)
def test_a_step_output_over_the_message_limit_does_not_hang_the_run(plain: Cluster) -> None:
    """The worker's results frame is dropped by the size limit: the run must not wait forever."""
    b = DAGBuilder()
    b.add_node("big", blob, inputs=["n"], outputs=["b"])
    with plain.client() as c:
        handle = c.submit(b, {"n": OVERSIZE})
        try:
            out = handle.result(timeout=6)
        except TimeoutError:
            raise AssertionError(
                f"the run hangs: {handle.status()}; workers: {c.workers()}\n{plain.log_tail()}"
            ) from None
        except Exception as exc:
            assert "big" in str(exc), exc  # failing is fine if it names the node
        else:
            assert len(out["b"]) == OVERSIZE
        handle.cancel()
    assert_serves(plain)
