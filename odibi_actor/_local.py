"""Local worker subprocesses: spawned for a run, watched, and always reaped.

On Linux the workers are forked from a zygote (:mod:`._zygote`) that imported the worker
once, so N workers boot for the price of one interpreter; elsewhere, or if the zygote
cannot start, each is its own interpreter. Either way each worker arranges to die with its
parent (PR_SET_PDEATHSIG plus a parent-pid check), and the zygote with this process, so
even a kill -9 of the coordinator leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.abc import Process, TaskGroup

from . import _zygote
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


_SOCKET_NAME = re.compile(r"odibi-(\d+)-[\w.-]+\.sock")


def sweep_stale_sockets(directory: str | None = None) -> int:
    """Remove ipc socket files of local runs whose process is gone (killed with -9, so it
    could not remove them itself); returns how many. Only our own sockets, by name."""
    return remove_orphans(directory or tempfile.gettempdir(), _SOCKET_NAME, stat.S_ISSOCK)


def remove_orphans(directory: str, name: re.Pattern[str], kind: Callable[[int], bool]) -> int:
    """Remove this user's files in ``directory`` whose name matches ``name`` (its first
    group the pid of the process that made them), of ``kind`` (a ``stat.S_IS*`` test),
    and whose process is gone; returns how many."""
    removed = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            m = name.fullmatch(entry.name)
            if m is None or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if kind(st.st_mode) and st.st_uid == os.getuid():
                    os.unlink(entry.path)
                    removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _child_env() -> dict[str, str]:
    """Workers import step functions by reference: give them our import path."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env[INSIDE_WORKER] = "1"
    return env


class _Proc(Protocol):
    """What LocalWorkers needs of a worker process: a spawned one or a forked one."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class _Forked:
    """A worker the zygote forked: signalled directly, its exit reported by the zygote."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = anyio.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet, so the pid is still this worker's
            with contextlib.suppress(ProcessLookupError):  # it exited; the zygote will say
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Zygote:
    """The parent's side of :mod:`._zygote`: ask for workers, hear of their exits."""

    def __init__(self, proc: Process, replies: int) -> None:
        self.proc, self._replies = proc, replies
        self._waiting: deque[tuple[anyio.Event, list[_Forked]]] = deque()
        self._workers: dict[int, _Forked] = {}
        self.alive = True

    @classmethod
    async def start(cls, env: dict[str, str]) -> _Zygote:
        r, w = os.pipe()
        try:
            proc = await anyio.open_process(
                [sys.executable, "-m", "odibi_actor._zygote", str(w), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=None,
                stderr=None,
                env=env,
                pass_fds=(w,),
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        return cls(proc, r)

    async def fork(self, argv: list[str]) -> _Forked:
        if not self.alive or self.proc.stdin is None:
            raise OSError("the zygote is gone")
        got: list[_Forked] = []
        ready = anyio.Event()
        self._waiting.append((ready, got))
        await self.proc.stdin.send(json.dumps({"argv": argv}).encode() + b"\n")
        await ready.wait()
        if not got:
            raise OSError("the zygote exited before forking the worker")
        return got[0]

    async def listen(self) -> None:
        """Read replies until the zygote is gone; then every worker counts as ended (they
        die with it) and nobody waits for a fork that will never come."""
        buffered = b""
        try:
            while True:
                await anyio.wait_readable(self._replies)
                try:
                    chunk = os.read(self._replies, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    self._on_reply(json.loads(line))
        except (OSError, ValueError, KeyError, IndexError) as exc:  # a broken zygote
            log.warning("lost the zygote; spawning workers one by one", error=repr(exc))
        finally:
            self.alive = False
            while self._waiting:
                self._waiting.popleft()[0].set()
            for forked in self._workers.values():
                if forked.returncode is None:
                    forked.ended(-signal.SIGKILL)

    def _on_reply(self, reply: dict[str, int]) -> None:
        if "pid" in reply:
            ready, got = self._waiting.popleft()
            forked = self._workers[reply["pid"]] = _Forked(reply["pid"])
            got.append(forked)
            ready.set()
        elif "exit" in reply:
            forked = self._workers.pop(reply["exit"], None)  # type: ignore[assignment]
            if forked is not None:
                forked.ended(reply["code"])

    async def close(self) -> None:
        """Closing its stdin tells it to go; it kills any worker still there first."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                await self.proc.stdin.aclose()
        with anyio.move_on_after(5.0):
            await self.proc.wait()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        os.close(self._replies)


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
        self.procs: dict[str, _Proc] = {}
        self.pids: list[int] = []  # every worker started, in order, filled as they start
        self._booted = anyio.Event()  # the first n have started (or failed to)
        self._zygote: _Zygote | None = None
        self._tg: TaskGroup | None = None
        self._closing = False
        self._seq = 0

    async def __aenter__(self) -> LocalWorkers:
        check_not_inside_worker()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if _zygote.supported():
            try:
                self._zygote = await _Zygote.start(_child_env())
            except OSError as exc:
                log.info("cannot start the zygote; spawning workers one by one", error=str(exc))
            else:
                self._tg.start_soon(self._zygote.listen)
        # in the background: the zygote's imports take ~100 ms, which the caller spends
        # opening durable state and starting its actors; workers connect when it binds
        self._tg.start_soon(self._boot)
        return self

    async def _boot(self) -> None:
        try:
            for _ in range(self.n):
                await self._spawn()
        finally:
            self._booted.set()

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        # told to leave, workers go within the grace; on an error nobody told them
        grace = 3.0 if exc[0] is None else 0.0
        with anyio.CancelScope(shield=True):
            await self.stop(grace=grace)
            if self._zygote is not None:
                await self._zygote.close()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    def retire(self) -> None:
        """The workers are being told to leave: from now on an exit is no crash."""
        self._closing = True

    async def _spawn(self) -> None:
        if self._closing:
            return
        name = f"local-{self._seq}"
        self._seq += 1
        args = [
            self.address,
            "--nthreads",
            str(self.nthreads),
            "--name",
            name,
            "--log-level",
            self.log_level,
            "--data-listen",
            self._data_listen(name),
        ]
        proc: _Proc | None = None
        zygote = self._zygote
        if zygote is not None and zygote.alive:
            try:
                proc = await zygote.fork([*args, "--parent-pid", str(zygote.proc.pid)])
            except OSError as exc:
                log.warning("zygote gone; spawning workers one by one", error=str(exc))
        if proc is None:
            cmd = [sys.executable, "-m", "odibi_actor.worker", *args]
            proc = await anyio.open_process(
                [*cmd, "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=_child_env(),
            )
        self.procs[name] = proc
        self.pids.append(proc.pid)
        if self._closing:  # stop() began while we were starting it: it sees it in procs
            with contextlib.suppress(ProcessLookupError):
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

    async def _watch(self, name: str, proc: _Proc) -> None:
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
        with anyio.move_on_after(grace):
            await self._booted.wait()  # a worker still starting is in procs after this
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
