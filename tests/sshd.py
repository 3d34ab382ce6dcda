"""A throwaway OpenSSH server on loopback for tests that drive real ssh sessions.

:func:`start_sshd` generates a host key, a client key authorised for the current user and
a config in a temporary directory, then runs ``/usr/sbin/sshd -D -e`` on a free port of
127.0.0.1 only. :meth:`Sshd.stop` ends it. Debian's ``openssh-server`` provides sshd;
``scripts/test.sh`` installs it. It must run as root (sshd's privilege separation).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
MISSING = (
    "{what} is missing: the launch_cluster tests need a real OpenSSH server and client. "
    "Run scripts/test.sh as root (it installs Debian's openssh-server), or "
    "apt-get install openssh-server."
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_tools() -> str | None:
    """A message naming what is missing to run :func:`start_sshd`, or None."""
    if not os.access(SSHD, os.X_OK):
        return MISSING.format(what=str(SSHD))
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return MISSING.format(what=tool)
    return None


@dataclass
class Sshd:
    port: int
    directory: Path
    client_key: Path
    process: subprocess.Popen[bytes]
    log: Path
    user: str = field(default_factory=lambda: _user())

    def ssh_command(self, port: int | None = None, connect_timeout: int = 5) -> list[str]:
        """ssh options that log in to this server non-interactively (``port`` overrides)."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port if port is None else port),
            "-l",
            self.user,
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]

    def ssh_text(self, port: int | None = None, connect_timeout: int = 5) -> str:
        return shlex.join(self.ssh_command(port, connect_timeout))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "odibi-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )


def start_sshd(directory: Path, startup_timeout: float = 15.0) -> Sshd:
    """Start sshd on a free loopback port, configured entirely from files in ``directory``."""
    problem = missing_tools()
    if problem is not None:
        raise RuntimeError(problem)
    directory.mkdir(parents=True, exist_ok=True)
    host_key = directory / "ssh_host_ed25519_key"
    client_key = directory / "client_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = directory / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "UseDNS no",
                "X11Forwarding no",
                "AllowTcpForwarding no",
                "PrintMotd no",
                "MaxStartups 50:30:100",
                "LogLevel INFO",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    log = directory / "sshd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Sshd(port=port, directory=directory, client_key=client_key, process=process, log=log)
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited at once ({process.returncode}):\n{server.log_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            break
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd did not listen on port {port}:\n{server.log_text()}")
        time.sleep(0.1)
    # One real login proves the keys and config work before any test relies on them.
    probe = subprocess.run(
        [*server.ssh_command(), "127.0.0.1", "echo", "ssh-ok"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0 or "ssh-ok" not in probe.stdout:
        server.stop()
        raise RuntimeError(
            f"cannot log in to the test sshd (exit {probe.returncode}): {probe.stderr}\n"
            f"sshd log:\n{server.log_text()}"
        )
    return server
