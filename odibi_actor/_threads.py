"""The in-process dispatcher: a :class:`TaskRunner` behind an actor, for DAGExecutor.

Values stay Python objects, nothing is pickled; handy for debugging and small jobs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._kernel import Actor, ActorRef
from ._messages import Credit, Dispatch, Outcomes
from ._runner import Task, TaskRunner


class _Drain:
    """Runner -> actor: outcomes are waiting in the outbox."""


class ThreadDispatcher(Actor):
    def __init__(self, nthreads: int, scheduler: ActorRef[Any]) -> None:
        self.nthreads = nthreads
        self.scheduler = scheduler

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        ref = self.ref
        drain = _Drain()
        self.runner = TaskRunner(
            self.nthreads, notify=lambda: loop.call_soon_threadsafe(ref.tell, drain)
        )
        self.scheduler.tell(Credit(self.nthreads))

    async def on_stop(self) -> None:
        self.runner.close()

    async def on_message(self, message: Any) -> None:
        if isinstance(message, Dispatch):
            self.runner.submit(
                Task(
                    t.tid, t.attempt, t.node.name, t.node.fn, t.args, t.node.outputs, t.node.timeout
                )
                for t in message.tasks
            )
        elif isinstance(message, _Drain):
            outcomes = self.runner.take_outcomes()
            if outcomes:
                for o in outcomes:
                    o.worker = "local"
                self.scheduler.tell(Outcomes(outcomes))
                self.scheduler.tell(Credit(len(outcomes)))
