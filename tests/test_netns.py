"""A real multi-host cluster: coordinator and workers each in their own network namespace.

Three namespaces (``c``, ``w1``, ``w2``) are joined by veth pairs to a bridge in a fourth,
each with its own address in ``10.213.N.0/24``. The coordinator binds its address in
``c`` with CurveZMQ on; the workers connect from ``w1`` and ``w2`` with their own keys; the
client runs inside ``c`` (see ``netns.Agent``), as the root namespace has no route there.
These tests need root and ``ip netns``: where that is not permitted they fail, loudly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import Cluster
from netns import Agent, Hosts, NetnsUnavailable, keygen, layered

HB_TIMEOUT = 2.0
PORT = 5555  # a fresh namespace has nothing bound


def make_keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    keygen(str(d), "server", "w1", "w2", "client", "intruder")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("w1", "w2", "client"):  # not "intruder"
        (authorized / f"{name}.key").write_bytes((d / f"{name}.key").read_bytes())
    return d


@contextlib.contextmanager
def multi_host(tmp_path: Path) -> Iterator[tuple[Hosts, Cluster, Agent]]:
    """Namespaces, keys, a coordinator in ``c``, workers in ``w1``/``w2`` (plus an
    intruder with an unauthorised key in ``w2``) and a client agent in ``c``.

    Used inside the test (not as a fixture) so a machine without ``ip netns`` makes the
    test FAIL, never skip or error out in setup."""
    try:
        hosts = Hosts("c", "w1", "w2").__enter__()
    except NetnsUnavailable as exc:
        pytest.fail(f"cannot build the multi-host test network with 'ip netns': {exc}")
    c = agent = None
    try:
        keys = make_keys(tmp_path)
        c = Cluster(
            PORT,
            host=hosts["c"].addr,
            netns=hosts["c"].ns,
            coordinator_args=(
                "--curve-secret",
                str(keys / "server.key_secret"),
                "--authorized-keys",
                str(tmp_path / "authorized"),
                "--heartbeat-timeout",
                str(HB_TIMEOUT),
            ),
            log_dir=str(tmp_path),
        )
        c.start_coordinator()
        for name in ("w1", "w2", "intruder"):
            ns = hosts["w2" if name == "intruder" else name].ns
            c.start_worker(
                name,
                "--curve-secret",
                str(keys / f"{name}.key_secret"),
                "--server-key",
                str(keys / "server.key"),
                netns=ns,
            )
        agent = Agent(
            hosts["c"].ns,
            c.client_address,
            str(keys / "client.key_secret"),
            str(keys / "server.key"),
        )
        try:
            agent.call("wait_workers", names=["w1", "w2"], timeout=20, wait=30)
        except Exception as exc:
            logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
            pytest.fail(f"workers in other namespaces did not register ({exc}); logs: {logs}")
        yield hosts, c, agent
    finally:
        if agent is not None:
            agent.close()
        if c is not None:
            c.close()
        hosts.close()


def check(result: dict[str, Any], expected: dict[str, int]) -> None:
    assert result["error"] is None, result["error"]
    out = result["out"]
    assert set(out) == set(expected)
    wrong = {k: (out[k], v) for k, v in expected.items() if out[k] != v}
    assert not wrong, wrong
    assert {s for s, _ in result["nodes"].values()} == {"done"}


@pytest.mark.timeout(120)
def test_dag_completes_across_namespaces_with_curve(tmp_path: Path):
    with multi_host(tmp_path) as (_, c, agent):
        dag_across_namespaces(c, agent)


def dag_across_namespaces(c: Cluster, agent: Agent) -> None:
    run = agent.call("submit", layers=4, width=8, delay=0.05)
    result = agent.call("result", run=run, timeout=60, wait=70)
    _, expected = layered(4, 8, 0.05)
    check(result, expected)
    used = {w for _, w in result["nodes"].values()}
    assert used == {"w1", "w2"}, f"both workers should take part, saw {used}"
    # a worker whose key is not authorised never gets in
    workers = agent.call("workers")
    assert sorted(w["name"] for w in workers) == ["w1", "w2"]
    assert c.workers["intruder"].poll() is None, "the intruder worker should still be trying"


@pytest.mark.timeout(150)
def test_cut_link_worker_is_lost_and_run_completes(tmp_path: Path):
    with multi_host(tmp_path) as (hosts, c, agent):
        cut_link(hosts, c, agent)


def cut_link(hosts: Hosts, c: Cluster, agent: Agent) -> None:
    run = agent.call("submit", layers=5, width=8, delay=0.3)
    deadline = time.monotonic() + 15
    while True:
        w2 = next((w for w in agent.call("workers") if w["name"] == "w2"), None)
        if w2 is not None and w2["queued"] >= 1 and agent.call("status", run=run)["done"] >= 2:
            break
        assert time.monotonic() < deadline, "w2 never got tasks"
        time.sleep(0.05)
    hosts.link("w2", up=False)
    cut = time.monotonic()
    while any(w["name"] == "w2" for w in agent.call("workers")):
        assert time.monotonic() - cut < HB_TIMEOUT + 4, "w2 was not declared lost"
        time.sleep(0.1)
    lost_after = time.monotonic() - cut
    assert lost_after >= HB_TIMEOUT - 0.5, f"w2 dropped too early ({lost_after:.1f}s)"
    assert agent.call("status", run=run)["state"] == "running", "run ended before w2 was lost"
    result = agent.call("result", run=run, timeout=60, wait=70)
    _, expected = layered(5, 8, 0.3)
    check(result, expected)
    assert c.workers["w2"].poll() is None  # alive, just cut off
    # the cable goes back in: w2 finds the coordinator again by itself
    hosts.link("w2", up=True)
    restored = time.monotonic()
    agent.call("wait_workers", names=["w1", "w2"], timeout=30, wait=40)
    back_after = time.monotonic() - restored
    print(
        f"w2 declared lost {lost_after:.2f}s after its link went down, back {back_after:.2f}s"
        " after it came up"
    )
