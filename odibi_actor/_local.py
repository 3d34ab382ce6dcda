"""Local worker subprocesses: spawned for a run, watched, and always reaped.

Each worker also arranges to die with this process (PR_SET_PDEATHSIG plus a parent-pid
check), so even a kill -9 of the coordinator leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import anyio
from anyio.abc import Process, TaskGroup

from ._logging import get_logger
from .errors import OdibiError

log = get_logger("odibi_actor.local")

INSIDE_WORKER = "ODIBI_INSIDE_WORKER"  # set in local workers' environment


def check_not_inside_worker() -> None:
    """Refuse to spawn workers from a worker: an import-time run would recurse forever."""
    if os.environ.get(INSIDE_WORKER):
        raise OdibiError(
            "a step (or a module a worker imported) started local worker processes from"
            " inside a worker; guard the script's run with `if __name__ == '__main__':`,"
            " or use backend='threads' inside steps"
        )


def _child_env() -> dict[str, str]:
    """Workers import step functions by reference: give them our import path."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env[INSIDE_WORKER] = "1"
    return env


class LocalWorkers:
    """``async with LocalWorkers(...)`` keeps ``n`` workers alive, and none after."""

    def __init__(
        self,
        n: int,
        address: str,
        nthreads: int = 1,
        on_exit: Callable[[str, int, bool], None] | None = None,
        log_level: str = "warning",
        max_respawns: int | None = None,
        keep_data: bool = True,
    ) -> None:
        self.n, self.address, self.nthreads = n, address, nthreads
        self.keep_data = keep_data
        self.data_paths: list[str] = []  # ipc socket files of workers' data sockets
        self.on_exit = on_exit
        self.log_level = log_level
        self.respawns_left = 2 * n if max_respawns is None else max_respawns
        self.procs: dict[str, Process] = {}
        self._tg: TaskGroup | None = None
        self._closing = False
        self._seq = 0

    async def __aenter__(self) -> LocalWorkers:
        check_not_inside_worker()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for _ in range(self.n):
            await self._spawn()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        # told to leave, workers go within the grace; on an error nobody told them
        grace = 3.0 if exc[0] is None else 0.0
        with anyio.CancelScope(shield=True):
            await self.stop(grace=grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    def retire(self) -> None:
        """The workers are being told to leave: from now on an exit is no crash."""
        self._closing = True

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    async def _spawn(self) -> None:
        if self._closing:
            return
        name = f"local-{self._seq}"
        self._seq += 1
        cmd = [
            sys.executable,
            "-m",
            "odibi_actor.worker",
            self.address,
            "--nthreads",
            str(self.nthreads),
            "--name",
            name,
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.log_level,
            "--data-listen",
            self._data_listen(name),
        ]
        proc = await anyio.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=_child_env()
        )
        self.procs[name] = proc
        if self._closing:  # stop() began while we were starting it: it sees it in procs
            proc.kill()
        assert self._tg is not None
        self._tg.start_soon(self._watch, name, proc)

    def _data_listen(self, name: str) -> str:
        """Next to the coordinator's ipc socket, named after it: reaped with it even when
        the worker is killed."""
        if not self.keep_data:
            return "off"
        if self.address.startswith("ipc://") and self.address.endswith(".sock"):
            path = f"{self.address[len('ipc://') : -len('.sock')]}-{name}.sock"
            self.data_paths.append(path)
            return f"ipc://{path}"
        return "auto"

    async def _watch(self, name: str, proc: Process) -> None:
        code = await proc.wait()
        self.procs.pop(name, None)
        if self._closing:
            return
        respawn = self.respawns_left > 0
        log.warning("local worker exited", worker=name, exit_code=code, respawning=respawn)
        if self.on_exit is not None:
            self.on_exit(name, code, respawn or bool(self.procs))
        if respawn and not self._closing:
            self.respawns_left -= 1
            await self._spawn()

    def kill(self, name: str) -> None:
        """SIGKILL one worker (evicted as hung); its watcher respawns it."""
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self, grace: float) -> None:
        """Wait ``grace`` seconds for workers told to leave, then terminate, then kill."""
        self._closing = True
        procs = list(self.procs.values())
        with anyio.move_on_after(grace):
            for p in procs:
                await p.wait()
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.returncode is None]
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
            with anyio.move_on_after(wait):
                for p in alive:
                    await p.wait()
        self.procs.clear()
        for path in self.data_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
