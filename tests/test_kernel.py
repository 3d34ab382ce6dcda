"""The actor kernel: ordering, ask/tell, supervision, and nobody waiting on a dead actor."""

from __future__ import annotations

import anyio
import pytest

from odibi_actor import Actor, ActorCrashed, ActorSystem, Policy


class Counter(Actor):
    """Read-modify-write across an await: any interleaving of messages loses updates."""

    instances = 0

    def __init__(self) -> None:
        Counter.instances += 1
        self.value = 0
        self.seen: list[object] = []
        self.active = 0
        self.max_active = 0

    async def on_message(self, message):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            kind, arg = message
            if kind == "add":
                current = self.value
                await anyio.sleep(0.001)  # give any other message every chance to cut in
                self.value = current + arg
                return self.value
            if kind == "log":
                self.seen.append(arg)
                await anyio.sleep(0)
                return None
            if kind == "get":
                return {"value": self.value, "seen": list(self.seen), "max": self.max_active}
            if kind == "boom":
                raise ValueError(f"boom: {arg}")
            raise AssertionError(f"unexpected {message!r}")
        finally:
            self.active -= 1


async def test_concurrent_asks_never_interleave():
    with anyio.fail_after(10):
        async with ActorSystem() as system:
            ref = system.spawn(Counter, name="counter")
            answers: list[int] = []

            async def one() -> None:
                answers.append(await ref.ask(("add", 1)))

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
            state = await ref.ask(("get", None))
    assert state["value"] == 50  # no lost update
    assert sorted(answers) == list(range(1, 51))  # each ask saw its own handler's result
    assert state["max"] == 1  # one message at a time


async def test_tells_are_handled_in_order():
    with anyio.fail_after(10):
        async with ActorSystem() as system:
            ref = system.spawn(Counter, name="counter")
            for i in range(200):
                ref.tell(("log", i))
            state = await ref.ask(("get", None))  # queued after every tell
    assert state["seen"] == list(range(200))


async def test_ask_returns_the_value_and_propagates_the_exception():
    with anyio.fail_after(10):
        async with ActorSystem() as system:
            ref = system.spawn(Counter, name="counter", policy=Policy(restart=True))
            assert await ref.ask(("add", 5)) == 5
            with pytest.raises(ValueError, match="boom: bad input"):
                await ref.ask(("boom", "bad input"))


async def test_restart_policy_gives_fresh_state_and_keeps_processing():
    Counter.instances = 0
    with anyio.fail_after(10):
        async with ActorSystem() as system:
            ref = system.spawn(Counter, name="counter", policy=Policy(restart=True))
            await ref.ask(("add", 7))
            ref.tell(("log", "before"))
            ref.tell(("boom", "told"))  # crash on a tell: nobody is told, the actor restarts
            ref.tell(("log", "after"))  # queued behind the crash: handled by the new instance
            state = await ref.ask(("get", None))
            assert await ref.ask(("add", 1)) == 1
    assert state["value"] == 0  # fresh state
    assert state["seen"] == ["after"]
    assert Counter.instances == 2


async def test_restart_limit_escalates():
    with anyio.fail_after(10), pytest.raises(ActorCrashed, match="'flaky'"):
        async with ActorSystem() as system:
            ref = system.spawn(Counter, name="flaky", policy=Policy(restart=True, max_restarts=2))
            for i in range(5):
                ref.tell(("boom", i))
            await anyio.sleep_forever()


async def test_start_task_crash_counts_as_an_actor_crash():
    class Background(Actor):
        async def on_start(self):
            async def fail():
                await anyio.sleep(0.01)
                raise RuntimeError("background died")

            self.start_task(fail)

        async def on_message(self, message):
            return message

    with anyio.fail_after(10), pytest.raises(ActorCrashed, match=r"'bg'.*background died"):
        async with ActorSystem() as system:
            system.spawn(Background, name="bg")
            await anyio.sleep_forever()


async def test_default_policy_crash_takes_the_system_down():
    stopped: list[str] = []

    class Crashy(Actor):
        async def on_message(self, message):
            raise KeyError(message)

        async def on_stop(self):
            stopped.append("crashy")

    class Bystander(Actor):
        async def on_message(self, message):
            return message

        async def on_stop(self):
            stopped.append("bystander")

    with anyio.fail_after(10):
        with pytest.raises(ActorCrashed) as info:
            async with ActorSystem() as system:
                system.spawn(Bystander, name="bystander")
                ref = system.spawn(Crashy, name="crashy")
                ref.tell("the key")
                await anyio.sleep_forever()  # must be cancelled, not hang
    assert "'crashy'" in str(info.value)
    assert "KeyError" in str(info.value)
    assert sorted(stopped) == ["bystander", "crashy"]  # on_stop ran for both


async def test_pending_asks_of_a_crashed_actor_get_an_error():
    gate = anyio.Event()

    class Slow(Actor):
        async def on_message(self, message):
            if message == "crash":
                await gate.wait()
                raise RuntimeError("down")
            return message

    results: dict[str, object] = {}
    holder: dict[str, object] = {}
    up = anyio.Event()

    async def host() -> None:
        try:
            async with ActorSystem() as system:
                holder["ref"] = system.spawn(Slow, name="slow")
                up.set()
                await anyio.sleep_forever()
        except ActorCrashed as exc:
            results["system"] = exc

    async def asker(key: str, message: str) -> None:
        try:
            results[key] = await holder["ref"].ask(message)
        except Exception as exc:
            results[key] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host)
            await up.wait()
            tg.start_soon(asker, "crash", "crash")
            await anyio.sleep(0.05)  # "crash" is now being handled
            tg.start_soon(asker, "p1", "one")
            tg.start_soon(asker, "p2", "two")
            await anyio.sleep(0.05)
            gate.set()
        # after the crash, a fresh ask fails at once
        with pytest.raises(ActorCrashed, match="'slow'"):
            await holder["ref"].ask("late")
    assert isinstance(results["crash"], RuntimeError) and str(results["crash"]) == "down"
    for key in ("p1", "p2"):
        assert isinstance(results[key], ActorCrashed), results[key]
        assert "'slow'" in str(results[key])
    assert isinstance(results["system"], ActorCrashed)


async def test_ask_after_stop_gets_an_error_instead_of_hanging():
    class Echo(Actor):
        async def on_message(self, message):
            return message

    async with ActorSystem() as system:
        ref = system.spawn(Echo, name="echo")
        assert await ref.ask("hi") == "hi"
        ref.stop()
        await anyio.sleep(0.05)  # the actor has stopped
        with anyio.fail_after(5), pytest.raises(ActorCrashed, match="'echo'"):
            await ref.ask("anyone there?")


async def test_ask_queued_behind_a_stop_gets_an_error_instead_of_hanging():
    class Echo(Actor):
        async def on_message(self, message):
            return message

    async with ActorSystem() as system:
        ref = system.spawn(Echo, name="echo")
        assert await ref.ask("hi") == "hi"
        ref.stop()
        # this ask sits in the mailbox behind the stop: it must be answered with an error
        with anyio.fail_after(2), pytest.raises(ActorCrashed, match="'echo'"):
            await ref.ask("queued behind the stop")


async def test_asks_pending_at_shutdown_get_an_error_instead_of_hanging():
    gate = anyio.Event()

    class Busy(Actor):
        async def on_message(self, message):
            if message == "block":
                await gate.wait()
            return message

    results: dict[str, object] = {}
    holder: dict[str, object] = {}
    up, leave = anyio.Event(), anyio.Event()

    async def host() -> None:
        async with ActorSystem() as system:
            holder["ref"] = system.spawn(Busy, name="busy")
            up.set()
            await leave.wait()
        # leaving the block shuts every actor down

    async def asker(key: str, message: str) -> None:
        try:
            with anyio.fail_after(2):
                results[key] = await holder["ref"].ask(message)
        except TimeoutError:
            results[key] = "hung"
        except ActorCrashed as exc:
            results[key] = exc

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host)
            await up.wait()
            tg.start_soon(asker, "running", "block")
            tg.start_soon(asker, "queued", "queued")
            await anyio.sleep(0.05)
            leave.set()
    assert isinstance(results["running"], ActorCrashed), results["running"]
    assert isinstance(results["queued"], ActorCrashed), results["queued"]


async def test_tell_to_a_stopped_actor_is_dropped_quietly():
    class Echo(Actor):
        async def on_message(self, message):
            return message

    with anyio.fail_after(5):
        async with ActorSystem() as system:
            ref = system.spawn(Echo, name="echo")
            ref.stop()
            await anyio.sleep(0.05)
            ref.tell("ignored")  # must not raise


def test_spawn_outside_a_running_system_is_refused():
    with pytest.raises(RuntimeError, match="async with"):
        ActorSystem().spawn(Counter)
