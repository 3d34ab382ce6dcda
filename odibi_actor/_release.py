"""Letting go of big values on a thread of their own.

Returning memory to the kernel is not free: ~20-30 ms per 256 MiB here, with the GIL
held. A worker between two runs drops the last run's big values just as the next run's
first task arrives; freed on the event loop or the runner thread, they would delay that
task by ~0.1 s per GB. Freed here, one value at a time, they overlap with it.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from ._wire import Packed

RELEASE_FROM = 16 << 20  # bytes: smaller values are freed where they are dropped

_releaser: concurrent.futures.ThreadPoolExecutor | None = None


def big(values: Any) -> bool:
    """Whether the packed values among ``values`` are worth freeing elsewhere."""
    return sum(v.nbytes for v in values if isinstance(v, Packed)) >= RELEASE_FROM


def release(objects: list[Any]) -> None:
    """Drop ``objects`` on the releaser thread. The caller hands over its last references:
    it must keep none (not even in a local variable) for the freeing to happen there."""
    global _releaser
    if _releaser is None:
        _releaser = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="odibi-release")
    _releaser.submit(_let_go, objects)


def _let_go(objects: list[Any]) -> None:
    while objects:
        objects.pop()
        time.sleep(0)  # between two values, let the thread that is starting a task run
