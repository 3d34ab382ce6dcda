"""scripts/launch_cluster.sh against a real sshd on loopback and a real coordinator.

The sshd (see tests/sshd.py) runs on a free port of 127.0.0.1 with keys generated for the
test. Workers are started through it as ``python -m odibi_actor.worker`` with this
interpreter and this checkout on PYTHONPATH, since an ssh session has a minimal PATH.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from sshd import Sshd, missing_tools, start_sshd

import odibi_actor
from odibi_actor.client import Client

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "launch_cluster.sh"
PACKAGE_ROOT = Path(odibi_actor.__file__).resolve().parent.parent


def _python_module(module: str) -> str:
    """Shell text running ``module`` with this interpreter and this checkout of odibi_actor."""
    return f"PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))} {shlex.quote(sys.executable)} -m {module}"


def _free_port_pair() -> int:
    """A port whose successor is free too (the coordinator's client port is listen + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    problem = missing_tools()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Launcher:
    """Runs launch_cluster.sh with a private state dir, hosts file and coordinator port."""

    sshd: Sshd
    tmp: Path
    port: int
    env: dict[str, str]

    @property
    def hosts(self) -> Path:
        return self.tmp / "hosts"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def coordinator(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def write_hosts(self, text: str) -> None:
        self.hosts.write_text(text)

    def run(self, action: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), action],
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pid_from(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text().split()[0])

    def workers(self, name: str | None = None) -> list[psutil.Process]:
        """Live worker processes of this test's coordinator address (optionally by name)."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or "odibi_actor.worker" not in cmd:
                continue
            if self.coordinator not in cmd:
                continue
            if name is not None and _flag(cmd, "--name") != name:
                continue
            found.append(proc)
        return found

    def cleanup(self) -> None:
        """Stop whatever the test left running: via the script, then by pid file."""
        with contextlib.suppress(Exception):
            self.run("stop", timeout=60, ODIBI_STOP_TIMEOUT="5")
        with contextlib.suppress(Exception):
            for pidfile in self.state.glob("*.pid"):
                with contextlib.suppress(Exception):
                    _kill(int(pidfile.read_text().split()[0]))
        with contextlib.suppress(Exception):
            for proc in self.workers():
                _kill(proc.pid)


def _flag(cmd: list[str], flag: str) -> str | None:
    with contextlib.suppress(ValueError, IndexError):
        return cmd[cmd.index(flag) + 1]
    return None


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` if it is one of ours (an odibi or python process), and reap it."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if "odibi" in " ".join(proc.cmdline()) or "python" in proc.name():
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


def _row(output: str, name: str) -> list[str]:
    """The report line of process ``name`` (second column), split into words."""
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == name:
            return words
    raise AssertionError(f"no line for {name} in:\n{output}")


def _registered(address: str, name: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    with Client(address, timeout=10) as client:
        while True:
            with contextlib.suppress(Exception):
                for worker in client.workers():
                    if worker["name"] == name:
                        return worker
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {name} never registered with the coordinator")
            time.sleep(0.2)


@pytest.fixture
def launcher(sshd: Sshd, tmp_path: Path) -> Iterator[Launcher]:
    port = _free_port_pair()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "ODIBI_HOSTS": str(tmp_path / "hosts"),
        "ODIBI_STATE_DIR": str(tmp_path / "state"),
        "ODIBI_COORDINATOR": f"tcp://127.0.0.1:{port}",
        "ODIBI_SSH": sshd.ssh_text(connect_timeout=3),
        "ODIBI_REMOTE_WORKER": _python_module("odibi_actor.worker"),
        "ODIBI_COORDINATOR_CMD": _python_module("odibi_actor.coordinator"),
        "ODIBI_CLI": _python_module("odibi_actor.cli"),
        "ODIBI_WORKER_ARGS": "--log-level info",
        "ODIBI_START_WAIT": "1.5",
        "ODIBI_STOP_TIMEOUT": "20",
    }
    launch = Launcher(sshd=sshd, tmp=tmp_path, port=port, env=env)
    try:
        yield launch
    finally:
        launch.cleanup()


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.timeout(180)
def test_start_status_stop_round_trip(launcher: Launcher) -> None:
    launcher.write_hosts("# the test machine, over ssh\n\n127.0.0.1 2   # two slots\n")

    started = launcher.run("start")
    assert started.returncode == 0, _explain(started)
    assert _row(started.stdout, "coordinator")[2] == "started", started.stdout
    assert _row(started.stdout, "127.0.0.1-1")[2] == "started", started.stdout

    # A real worker process, with the slot count as --nthreads, detached from ssh.
    (worker,) = launcher.workers("127.0.0.1-1")
    assert _flag(worker.cmdline(), "--nthreads") == "2"
    assert worker.pid == launcher.pid_from("worker-127.0.0.1-1")
    coordinator = psutil.Process(launcher.pid_from("coordinator"))
    assert "odibi_actor.coordinator" in coordinator.cmdline()

    # ... and it registered with the coordinator that start launched.
    client_address = f"tcp://127.0.0.1:{launcher.port + 1}"
    info = _registered(client_address, "127.0.0.1-1")
    assert info["slots"] == 2

    status = launcher.run("status")
    assert status.returncode == 0, _explain(status)
    assert _row(status.stdout, "coordinator")[2] == "running"
    row = " ".join(_row(status.stdout, "127.0.0.1-1"))
    assert f"running pid {worker.pid}, registered" in row, status.stdout

    # start again: nothing new is started.
    again = launcher.run("start")
    assert again.returncode == 0, _explain(again)
    assert "already running" in " ".join(_row(again.stdout, "127.0.0.1-1")), again.stdout
    assert "already running" in " ".join(_row(again.stdout, "coordinator")), again.stdout
    assert [p.pid for p in launcher.workers("127.0.0.1-1")] == [worker.pid]
    assert launcher.pid_from("coordinator") == coordinator.pid

    stopped = launcher.run("stop")
    assert stopped.returncode == 0, _explain(stopped)
    assert _row(stopped.stdout, "127.0.0.1-1")[2] == "stopped", stopped.stdout
    assert _row(stopped.stdout, "coordinator")[2] == "stopped", stopped.stdout
    assert launcher.workers() == []
    assert not coordinator.is_running() or coordinator.status() == psutil.STATUS_ZOMBIE
    assert not list(launcher.state.glob("*.pid"))

    after = launcher.run("status")
    assert after.returncode == 1, _explain(after)
    assert _row(after.stdout, "127.0.0.1-1")[2] == "stopped"
    assert _row(after.stdout, "coordinator")[2] == "stopped"

    # Stopping a stopped cluster is fine.
    twice = launcher.run("stop")
    assert twice.returncode == 0, _explain(twice)
    assert "not running" in " ".join(_row(twice.stdout, "127.0.0.1-1"))


@pytest.mark.timeout(120)
def test_host_listed_twice_gets_two_named_workers(launcher: Launcher) -> None:
    launcher.write_hosts("127.0.0.1\n127.0.0.1 3\n")
    started = launcher.run("start")
    assert started.returncode == 0, _explain(started)
    first, second = launcher.workers("127.0.0.1-1"), launcher.workers("127.0.0.1-2")
    assert len(first) == 1 and len(second) == 1
    assert _flag(first[0].cmdline(), "--nthreads") is None  # no slot count: worker default
    assert _flag(second[0].cmdline(), "--nthreads") == "3"
    stopped = launcher.run("stop")
    assert stopped.returncode == 0, _explain(stopped)
    assert launcher.workers() == []


@pytest.mark.timeout(120)
def test_unreachable_hosts_fail_without_hanging(launcher: Launcher) -> None:
    # sshd listens on 127.0.0.1 only, so its port on 127.0.0.2 refuses connections; on
    # 127.0.0.3 a socket accepts TCP (the kernel does) but never speaks: ssh must give up
    # after ConnectTimeout, not hang.
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.3", launcher.sshd.port))
        silent.listen(8)
        launcher.write_hosts("127.0.0.1\n127.0.0.2 2\n127.0.0.3   # answers TCP, never ssh\n")
        t0 = time.monotonic()
        started = launcher.run("start", timeout=60)
        elapsed = time.monotonic() - t0
        assert started.returncode == 1, _explain(started)
        assert elapsed < 30, f"start took {elapsed:.1f}s"
        assert _row(started.stdout, "127.0.0.1-1")[2] == "started", started.stdout
        refused = " ".join(_row(started.stdout, "127.0.0.2-1"))
        assert "FAILED unreachable" in refused and "refused" in refused, started.stdout
        silent_row = " ".join(_row(started.stdout, "127.0.0.3-1"))
        assert "FAILED unreachable" in silent_row and "timed out" in silent_row, started.stdout

        status = launcher.run("status", timeout=60)
        assert status.returncode == 1, _explain(status)
        assert _row(status.stdout, "127.0.0.1-1")[2] == "running"
        assert _row(status.stdout, "127.0.0.2-1")[2] == "unreachable"
        assert _row(status.stdout, "127.0.0.3-1")[2] == "unreachable"

        stopped = launcher.run("stop", timeout=60)
        assert stopped.returncode == 1, _explain(stopped)  # two hosts could not be reached
        assert _row(stopped.stdout, "127.0.0.1-1")[2] == "stopped"
        assert _row(stopped.stdout, "127.0.0.2-1")[2] == "FAILED"
        assert _row(stopped.stdout, "coordinator")[2] == "stopped"
        assert launcher.workers() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("# ok\n127.0.0.1 2\n\nworker-b two\n", 4, "slot count 'two'"),
        ("127.0.0.1 0\n", 1, "slot count '0'"),
        ("127.0.0.1 2 extra\n", 1, "expected 'host [slots]'"),
        ("# a comment\n-oProxyCommand=evil\n", 2, "is not a host name"),
    ],
)
def test_malformed_hosts_line_names_file_and_line(
    launcher: Launcher, text: str, line: int, why: str
) -> None:
    launcher.write_hosts(text)
    for action in ("start", "status", "stop"):
        result = launcher.run(action)
        assert result.returncode == 2, _explain(result)
        assert f"{launcher.hosts}:{line}:" in result.stderr, result.stderr
        assert why in result.stderr, result.stderr
    assert not launcher.state.exists()  # nothing was started


@pytest.mark.timeout(60)
def test_missing_or_empty_hosts_file(launcher: Launcher) -> None:
    missing = launcher.run("start")
    assert missing.returncode == 2, _explain(missing)
    assert f"hosts file {launcher.hosts} not found" in missing.stderr
    launcher.write_hosts("# nothing but comments\n\n   # and blanks\n")
    empty = launcher.run("status")
    assert empty.returncode == 2, _explain(empty)
    assert "lists no hosts" in empty.stderr


@pytest.mark.timeout(120)
def test_worker_exiting_at_once_is_failed_with_its_log(launcher: Launcher) -> None:
    launcher.write_hosts("127.0.0.1 2\n")
    # A generous wait: on a loaded machine, importing the worker alone can take seconds.
    started = launcher.run("start", ODIBI_WORKER_ARGS="--no-such-flag", ODIBI_START_WAIT="8")
    assert started.returncode == 1, _explain(started)
    assert "FAILED" in _row(started.stdout, "127.0.0.1-1"), started.stdout
    assert "exited at once with status 2" in started.stdout
    assert "unrecognized arguments: --no-such-flag" in started.stdout  # the log's tail
    assert not (launcher.state / "worker-127.0.0.1-1.pid").exists()
    assert launcher.workers() == []


@pytest.mark.timeout(120)
def test_dead_worker_shows_as_stopped_and_start_replaces_it(launcher: Launcher) -> None:
    launcher.write_hosts("127.0.0.1\n")
    assert launcher.run("start").returncode == 0
    (worker,) = launcher.workers("127.0.0.1-1")
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    status = launcher.run("status")
    assert status.returncode == 1, _explain(status)
    assert _row(status.stdout, "127.0.0.1-1")[2] == "stopped"
    assert "exited unexpectedly" in status.stdout
    restarted = launcher.run("start")
    assert restarted.returncode == 0, _explain(restarted)
    assert _row(restarted.stdout, "127.0.0.1-1")[2] == "started"
    (replacement,) = launcher.workers("127.0.0.1-1")
    assert replacement.pid != worker.pid


@pytest.mark.timeout(120)
def test_stop_kills_a_worker_that_ignores_sigterm(launcher: Launcher) -> None:
    stubborn = (
        f"{shlex.quote(sys.executable)} -c "
        + shlex.quote(
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
        )
        + " odibi_actor.worker"  # a marker in its command line, for Launcher.workers()
    )
    launcher.write_hosts("127.0.0.1\n")
    started = launcher.run("start", ODIBI_REMOTE_WORKER=stubborn, ODIBI_WORKER_ARGS="")
    assert started.returncode == 0, _explain(started)
    pid = launcher.pid_from("worker-127.0.0.1-1")
    stopped = launcher.run("stop", ODIBI_STOP_TIMEOUT="1")
    assert stopped.returncode == 0, _explain(stopped)
    assert _row(stopped.stdout, "127.0.0.1-1")[2] == "killed", stopped.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(150)
def test_curve_keys_as_in_the_readme(launcher: Launcher) -> None:
    keys, authorized = launcher.tmp / "keys", launcher.tmp / "authorized"
    authorized.mkdir()
    for name in ("server", "worker", "admin"):
        subprocess.run(
            [sys.executable, "-m", "odibi_actor.cli", "keygen", "--dir", str(keys), name],
            check=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        )
    for name in ("worker", "admin"):
        (authorized / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    launcher.write_hosts("127.0.0.1 1\n")
    curve = {
        "ODIBI_COORDINATOR_ARGS": f"--curve-secret {keys}/server.key_secret"
        f" --authorized-keys {authorized}",
        "ODIBI_WORKER_ARGS": f"--curve-secret {keys}/worker.key_secret"
        f" --server-key {keys}/server.key",
        "ODIBI_CLI_ARGS": f"--curve-secret {keys}/admin.key_secret --server-key {keys}/server.key",
    }
    started = launcher.run("start", **curve)
    assert started.returncode == 0, _explain(started)
    # status asks the coordinator (odibi status, with the admin keys) who registered.
    deadline = time.monotonic() + 20
    while True:
        status = launcher.run("status", **curve)
        if "pid" in (row := " ".join(_row(status.stdout, "127.0.0.1-1"))) and row.endswith(
            ", registered"
        ):
            break
        assert time.monotonic() < deadline, _explain(status)
        time.sleep(0.5)
    assert status.returncode == 0, _explain(status)
    assert "reports 1 registered workers" in status.stdout
    assert launcher.run("stop", **curve).returncode == 0


@pytest.mark.timeout(30)
def test_help_documents_every_setting() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0
    for var in (
        "ODIBI_HOSTS",
        "ODIBI_COORDINATOR",
        "ODIBI_LISTEN",
        "ODIBI_CLIENT_LISTEN",
        "ODIBI_STATE_DIR",
        "ODIBI_SSH",
        "ODIBI_REMOTE_WORKER",
        "ODIBI_COORDINATOR_CMD",
        "ODIBI_COORDINATOR_ARGS",
        "ODIBI_WORKER_ARGS",
    ):
        assert var in result.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "restart"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown action 'restart'" in bad.stderr
