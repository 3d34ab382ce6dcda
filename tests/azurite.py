"""Azurite, Microsoft's open-source Azure Storage emulator, for the ``az://`` storage tests.

``scripts/test.sh`` installs the pinned version into the ignored folder ``.azurite/`` with npm.
:class:`Azurite` runs ``azurite-blob`` on a free loopback port, in memory, in a scratch
working directory, and can :meth:`~Azurite.stop` and :meth:`~Azurite.start` again on the same
port (for outage tests). A missing Azurite fails the test with instructions: the Azure tests
are never skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

VERSION = "3.35.0"
REPO = Path(__file__).resolve().parent.parent
LOCAL_BIN = REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# The emulator's well-known account key, published in Azurite's README; not a secret, but the
# tests treat it as one to check that it never shows in errors or logs.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
MISSING = (
    "azurite-blob (Azurite {version}) is not installed: the az:// storage tests run against it. "
    "Run bash scripts/test.sh, or: npm install --prefix .azurite azurite@{version}"
)


def find_azurite() -> str | None:
    """The repo-local azurite-blob, else one on PATH, else None."""
    if os.access(LOCAL_BIN, os.X_OK):
        return str(LOCAL_BIN)
    return shutil.which("azurite-blob")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Azurite:
    """One ``azurite-blob`` process on 127.0.0.1; data lives in memory and dies with it."""

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0) -> None:
        binary = find_azurite()
        if binary is None:
            raise RuntimeError(MISSING.format(version=VERSION))
        self.binary = binary
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="odibi-azurite-"))
        self.log = self.directory / "azurite.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    def start(self) -> Azurite:
        """Start the emulator and wait until its port accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return self
        # In memory; --location is refused with --inMemoryPersistence, so the scratch directory is
        # the working directory instead: nothing lands in the repo.
        cmd = [
            self.binary,
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--skipApiVersionCheck",
            "--inMemoryPersistence",
            "--disableTelemetry",  # the machine has no network to send it to anyway
            "--silent",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                cmd, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + self.startup_timeout
        while not _accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"azurite-blob did not start on port {self.port}:\n{self.log_text()[-2000:]}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the emulator (its in-memory data is lost) and wait until the port is closed."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def azurite_server() -> Iterator[Azurite]:
    """Body of a pytest fixture: a running Azurite, stopped afterwards. Fails (never skips)
    when Azurite is not installed."""
    try:
        server = Azurite()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()
