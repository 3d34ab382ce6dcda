"""Shared helpers: process checks, observers, and running an executor in the background."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

PYTHON = sys.executable


def load_module(path: Path, name: str) -> types.ModuleType:
    """Import the file at ``path`` as module ``name`` (a step module a test wrote)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WORKER_MARK = "odibi_actor.worker"


# --- processes ---------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every pid to end; return the ones still alive."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def worker_children(pid: int) -> list[psutil.Process]:
    """Live odibi worker processes below ``pid``."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if WORKER_MARK in " ".join(k.cmdline()) and alive(k.pid):
                out.append(k)
        except psutil.Error:
            continue
    return out


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``cond`` until truthy; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Clean up after a test that started a coordinator process (only what it started)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    if proc.poll() is None:
        proc.kill()
    for p in kids:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# --- coordinator socket ------------------------------------------------------------------
def coordinator_sockets() -> list[str]:
    """ipc addresses of runs this process coordinates right now."""
    pattern = os.path.join(tempfile.gettempdir(), f"odibi-{os.getpid()}-*.sock")
    return ["ipc://" + p for p in glob.glob(pattern)]


# --- background runs ---------------------------------------------------------------------
class BackgroundRun:
    """``executor.run(data)`` on a thread, so a test can act while it runs."""

    def __init__(self, executor: Any, data: Mapping[str, Any] | None = None) -> None:
        self.executor = executor
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed: float | None = None
        self._thread = threading.Thread(target=self._target, args=(data,), daemon=True)
        self._thread.start()

    def _target(self, data: Mapping[str, Any] | None) -> None:
        try:
            self.result = self.executor.run(data)
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self.started

    def join(self, timeout: float) -> BackgroundRun:
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"run did not finish within {timeout}s")
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


# --- files as cross-process counters -----------------------------------------------------
def bump(path: str | os.PathLike[str]) -> int:
    """Append one line to ``path`` and return how many lines it now has (1 = first call)."""
    with open(path, "a") as f:
        f.write("x\n")
    return count(path)


def count(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    return len(p.read_text().splitlines()) if p.exists() else 0


# --- observers ---------------------------------------------------------------------------
class RecordingEvents:
    """An odibi_core style EventEmitter that remembers every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def emit(self, name: str, **fields: Any) -> None:
        with self._lock:
            self.events.append((name, fields))

    def names(self) -> list[str]:
        return [n for n, _ in self.events]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [f for n, f in self.events if n == name]


class RecordingTracker:
    """An odibi_core style tracker: start_step(name, level) and end_step(name, status, error)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.ended: list[tuple[str, str, str | None]] = []

    def start_step(self, name: str, level: int) -> None:
        self.started.append((name, level))

    def end_step(self, name: str, status: str, error: str | None = None) -> None:
        self.ended.append((name, status, error))


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


@pytest.fixture
def tracker() -> RecordingTracker:
    return RecordingTracker()


def reap_leftover_workers(timeout: float = 5.0) -> list[str]:
    """Wait for local workers (spawned by an executor) below this one to end; kill and
    describe any that don't. Daemon workers a cluster fixture keeps on purpose are left."""
    local = []
    for p in worker_children(os.getpid()):
        with contextlib.suppress(psutil.Error):
            if "--parent-pid" in " ".join(p.cmdline()).split():
                local.append(p.pid)
    left = wait_gone(local, timeout)
    details = []
    for pid in left:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            details.append(f"{pid}: {' '.join(proc.cmdline())}")
            proc.kill()  # so the next tests start clean
    return details


@pytest.fixture(autouse=True)
def no_worker_outlives_the_test():
    """Every test: worker processes this process started must be gone once it ends."""
    yield
    left = reap_leftover_workers()
    if left:
        pytest.fail("worker processes outlived the test:\n" + "\n".join(left))
