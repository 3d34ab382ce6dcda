"""Shared memory for big buffers between workers on one host.

A buffer sent through a local socket is copied into the kernel and out again, in chunks,
into fresh pages of the receiver: about 1 GB/s here. A holder asked by a peer on its own
host instead writes each big buffer once into a file under ``/dev/shm`` and from then on
reads the mapping itself (its private copy can go); peers map the file read-only. No
bytes cross a socket, and every reader on the host shares the same pages.

Files are named ``odibi-<pid>-<random>.shm`` after the process that wrote them, readable by
its user only, removed when it drops the dataset, and swept after a crash, like the ipc
socket files.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterable

SHM_FROM = 1 << 20  # buffers at least this big go through shared memory on one host

_NAME = re.compile(r"odibi-(\d+)-[0-9a-f]{32}\.shm")


def directory() -> str:
    """``/dev/shm`` (memory, not disk) where there is one, else the temp directory."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def write(buffer: memoryview) -> tuple[str, memoryview]:
    """Copy ``buffer`` into a new file; returns its path and a read-only mapping of it."""
    view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
    path = os.path.join(directory(), f"odibi-{os.getpid()}-{uuid.uuid4().hex}.shm")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])
        mapped = mmap.mmap(fd, view.nbytes, prot=mmap.PROT_READ)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path, memoryview(mapped)


def attach(path: str, nbytes: int) -> memoryview:
    """Map a file a peer wrote, read-only. Only our own files, by place and name: a peer's
    message must not make us map anything else."""
    if os.path.dirname(path) != directory() or not _NAME.fullmatch(os.path.basename(path)):
        raise ValueError(f"not a shared-memory file of ours: {path!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(f"{path} holds {size} bytes, expected {nbytes}")
        return memoryview(mmap.mmap(fd, nbytes, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def remove(paths: Iterable[str]) -> None:
    """Unlink files; mappings of them stay valid until their last reader lets go."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def sweep_stale(where: str | None = None) -> int:
    """Remove our files whose writer is gone (killed with -9); returns how many."""
    from ._local import remove_orphans

    return remove_orphans(where or directory(), _NAME, stat.S_ISREG)
