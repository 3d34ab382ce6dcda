"""Fork local workers from one process that has already imported them.

Starting a worker interpreter costs about 100 ms of CPU, mostly imports (asyncio, ZeroMQ);
N workers on a machine with fewer cores than N pay that N times over before the first task
runs. The zygote pays it once and forks every worker from there, as multiprocessing's
forkserver does, but under this package's process rules: it dies with its parent, reports
every worker's exit, and kills whatever is left when its parent closes its stdin.

Protocol: the parent writes one JSON line per worker to start (``{"argv": [...]}``) on the
zygote's stdin; the zygote answers on the reply pipe with ``{"pid": n}`` per request, in
order, and ``{"exit": pid, "code": c}`` whenever a worker ends (``c`` as ``Popen``'s
``returncode``: negative for a signal). Only Linux uses it (see :func:`supported`).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import sys


def supported() -> bool:
    """Fork without exec is safe here: Linux, and a fork start is possible at all."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _look_like_a_worker(argv: list[str]) -> None:
    """ps, psutil and whoever looks for workers by command line see what a spawned worker
    shows, not the zygote's command line."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(" ".join([sys.executable, "-m", "odibi_actor.worker", *argv]))


def main() -> None:
    reply_fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    from . import worker  # the imports every worker needs, paid once for all of them

    worker._die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the workers and parent
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    sel = selectors.DefaultSelector()
    stdin = sys.stdin.fileno()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: set[int] = set()
    buffered = b""

    def reply(message: dict[str, int]) -> None:
        os.write(reply_fd, json.dumps(message).encode() + b"\n")

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def fork(argv: list[str]) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: shed the zygote's plumbing, then be a worker for good
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)  # as if spawned
                sel.close()
                for fd in (reply_fd, wake_r, wake_w):
                    os.close(fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, stdin)
                os.close(devnull)
                _look_like_a_worker(argv)
                worker.main(argv)  # ends the process itself
            finally:
                os._exit(1)
        return pid

    try:
        while True:
            for key, _ in sel.select():
                if key.fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    reap()
                    continue
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return  # the parent is done with us
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    if line.strip():
                        pid = fork([str(a) for a in json.loads(line)["argv"]])
                        children.add(pid)
                        reply({"pid": pid})
            reap()  # a SIGCHLD can land between the select and the handler's write
    finally:
        for pid in children:  # the parent gave up on them: never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
    os._exit(0)  # tearing down the imported modules would cost the parent's wait ~50 ms
