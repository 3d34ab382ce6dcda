"""A small actor kernel on anyio: mailboxes, tell/ask, and supervision.

An actor handles one message at a time, so its state needs no locks. Actors live in the
system's task group; when one crashes, its :class:`Policy` decides: restart it from its
factory with a fresh state (keeping its mailbox), or escalate, which cancels the whole
system and surfaces :class:`ActorCrashed`. Escalation is the default: an actor never
dies silently and nothing waits forever on a dead one. The kernel knows nothing of DAGs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._logging import get_logger
from .errors import ActorCrashed, OdibiError

log = get_logger("odibi_actor.kernel")

A = TypeVar("A", bound="Actor")


@dataclass(frozen=True, slots=True)
class Policy:
    """What to do when an actor raises: restart up to ``max_restarts`` per ``window``."""

    restart: bool = False
    max_restarts: int = 3
    window: float = 60.0


ESCALATE = Policy()
RESTART = Policy(restart=True)


class _Reply:
    """A one-shot slot an ``ask`` waits on."""

    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.value, self.error = value, error
            self.event.set()


_STOP = object()


class ActorRef(Generic[A]):
    """The only handle other code holds on an actor: it can send, never touch state."""

    __slots__ = ("_send", "name")

    def __init__(self, name: str, send: MemoryObjectSendStream[tuple[Any, _Reply | None]]) -> None:
        self.name = name
        self._send = send

    def tell(self, message: Any) -> None:
        """Fire and forget. Never blocks; a message to a stopped actor is dropped."""
        try:
            self._send.send_nowait((message, None))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("message to stopped actor dropped", actor=self.name)

    async def ask(self, message: Any, timeout: float | None = None) -> Any:
        """Send and wait for the handler's return value (or its exception)."""
        reply = _Reply()
        try:
            self._send.send_nowait((message, reply))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorCrashed(f"actor {self.name!r} is not running") from None
        with anyio.fail_after(timeout):
            await reply.event.wait()
        if reply.error is not None:
            raise reply.error
        return reply.value

    def stop(self) -> None:
        """Ask the actor to finish the messages already queued, then stop."""
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait((_STOP, None))

    def __repr__(self) -> str:
        return f"<ActorRef {self.name}>"


class Actor:
    """Subclass and implement :meth:`on_message`; its return value answers an ``ask``."""

    ref: ActorRef[Any]
    system: ActorSystem

    async def on_start(self) -> None:
        """Called before the first message, after every restart too."""

    async def on_message(self, message: Any) -> Any:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Called whenever the actor stops: cleanly, cancelled or crashed. Release here."""

    def start_task(self, fn: Callable[[], Awaitable[Any]], name: str | None = None) -> None:
        """Run ``fn`` beside the mailbox loop; if it raises, the actor has crashed."""
        self._task_group.start_soon(fn, name=name)

    _task_group: TaskGroup


class ActorSystem:
    """Owns the task group every actor runs in. Use as ``async with ActorSystem() as s``."""

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._refs: list[ActorRef[Any]] = []

    async def __aenter__(self) -> ActorSystem:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        if exc[0] is None:
            self.shutdown()
        try:
            return await self._tg.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # surface our own clear errors, not a group wrapping them
            for kind in (ActorCrashed, OdibiError):
                found = group.subgroup(kind)
                if found is not None:
                    raise _first_leaf(found) from None
            raise

    def spawn(
        self,
        factory: Callable[[], A],
        name: str | None = None,
        policy: Policy = ESCALATE,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> ActorRef[A]:
        """Start an actor made by ``factory`` (called again on each restart).

        When it crashes with no restart left, ``on_crash`` (its supervisor's handler) is
        called with the error; without one, the crash escalates and the system goes down.
        """
        if self._tg is None:
            raise RuntimeError("ActorSystem is not running; use 'async with'")
        send, receive = anyio.create_memory_object_stream[tuple[Any, _Reply | None]](math.inf)
        actor_name = name or getattr(factory, "__name__", "actor")
        ref: ActorRef[A] = ActorRef(actor_name, send)
        self._refs.append(ref)
        self._tg.start_soon(
            self._supervise, factory, ref, receive, policy, on_crash, name=actor_name
        )
        return ref

    def shutdown(self) -> None:
        """Cancel every actor now."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _supervise(
        self,
        factory: Callable[[], A],
        ref: ActorRef[A],
        mailbox: MemoryObjectReceiveStream[tuple[Any, _Reply | None]],
        policy: Policy,
        on_crash: Callable[[BaseException], None] | None,
    ) -> None:
        restarts: list[float] = []
        try:
            while True:
                actor = factory()
                actor.ref, actor.system = ref, self
                try:
                    await self._run(actor, mailbox)
                    return
                except Exception as exc:
                    exc = _first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < policy.window]
                    if policy.restart and len(restarts) < policy.max_restarts:
                        restarts.append(now)
                        log.warning("actor crashed, restarting", actor=ref.name, error=repr(exc))
                        continue
                    crash = ActorCrashed(
                        f"actor {ref.name!r} crashed with no restart left: {exc!r}"
                    )
                    if on_crash is None:
                        raise crash from exc
                    crash.__cause__ = exc
                    log.error(
                        "actor crashed; its supervisor handles it", actor=ref.name, error=repr(exc)
                    )
                    on_crash(crash)
                    return
        finally:
            # whatever ended the actor, nobody may wait forever on an answer from it
            ref._send.close()
            _fail_pending(mailbox, ref.name)
            mailbox.close()

    @staticmethod
    async def _run(actor: Actor, mailbox: MemoryObjectReceiveStream[Any]) -> None:
        async with anyio.create_task_group() as tg:
            actor._task_group = tg
            try:
                await actor.on_start()
                async for message, reply in mailbox:
                    if message is _STOP:
                        break
                    try:
                        result = await actor.on_message(message)
                    except Exception as exc:
                        if reply is not None:
                            reply.set(error=exc)
                        raise
                    except BaseException:  # cancelled mid-message: the asker must not hang
                        if reply is not None:
                            reply.set(
                                error=ActorCrashed(
                                    f"actor {actor.ref.name!r} stopped before answering"
                                )
                            )
                        raise
                    if reply is not None:
                        reply.set(result)
            finally:
                with anyio.CancelScope(shield=True):
                    await actor.on_stop()
            tg.cancel_scope.cancel()


def _fail_pending(mailbox: MemoryObjectReceiveStream[Any], name: str) -> None:
    """Answer every queued ask of a dead actor so no caller waits forever."""
    while True:
        try:
            _, reply = mailbox.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return
        if reply is not None:
            reply.set(error=ActorCrashed(f"actor {name!r} crashed before answering"))


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
