"""State that outlives a task, lifecycle events, chaos, and cancellation of a tree."""

from __future__ import annotations

import random
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorCrashed,
    ActorKilled,
    ActorState,
    ActorSystem,
    Backoff,
    ChaosMonkey,
    ChildSpec,
    EventKind,
    InjectedFault,
    Intensity,
    Kill,
    RestartType,
    StateHooks,
    Supervisor,
    open_actor_system,
)

NO_JITTER = Backoff(initial=0.01, maximum=1.0, jitter=0.0, reset_after=1000.0)
LENIENT = Intensity(max_restarts=100_000, period=1.0)


@attrs.frozen
class Hold:
    release: trio.Event


async def wait_for(system: ActorSystem, actor: str, kind: EventKind, count: int = 1) -> None:
    """Wait until ``actor`` has had ``count`` events of ``kind``."""
    async with system.events.subscribe() as stream:
        while system.events.count(actor, kind) < count:
            await stream.receive()


async def capture(coro: Any, into: list[outcome.Outcome[Any]]) -> None:
    into.append(await outcome.acapture(lambda: coro))


class Counter(Actor):
    """Keeps its count in the state that outlives incarnations."""

    def __init__(self, handled: list[tuple[int, Any]] | None = None) -> None:
        self.handled = handled if handled is not None else []

    async def handle(self, message: Any) -> Any:
        self.handled.append((self.ctx.incarnation, message))
        state = self.ctx.state
        if message == "incr":
            state["n"] += 1
            return state["n"]
        if message == "corrupt":
            state["n"] = -1
            raise RuntimeError("corrupted")
        if message == "stop":
            self.ctx.stop()
            return None
        if isinstance(message, Hold):
            await message.release.wait()
            return None
        return state


@attrs.define
class Hooks:
    """StateHooks whose calls are recorded."""

    calls: list[tuple[str, Any]] = attrs.field(factory=list)
    check_raises: bool = False

    def initial(self) -> dict[str, Any]:
        self.calls.append(("initial", None))
        return {"n": 0}

    def check(self, state: dict[str, Any]) -> bool:
        self.calls.append(("check", dict(state)))
        if self.check_raises:
            raise ValueError("cannot even look at it")
        return bool(state["n"] >= 0)

    def rebuild(self, state: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("rebuild", dict(state)))
        return {"n": 100, "rebuilt_from": dict(state)}

    def spec(self, name: str = "c") -> ChildSpec:
        return ChildSpec(
            name,
            lambda ctx: Counter(),
            state=StateHooks(self.initial, self.check, self.rebuild),
        )


# -- state that outlives the task --------------------------------------------------------


async def test_state_is_handed_over_to_the_next_incarnation_when_the_check_accepts_it(
    autojump_clock: Any,
) -> None:
    hooks = Hooks()
    async with open_actor_system(Supervisor("root", [hooks.spec()], backoff=NO_JITTER)) as system:
        c = system.ref("c")
        first_state = await c.ask("get")
        for _ in range(3):
            await c.ask("incr")
        system.kill("c")
        assert await c.ask("get") is first_state
        assert await c.ask("incr") == 4
        assert hooks.calls == [("initial", None), ("check", {"n": 3})]
        assert system.events.count("c", EventKind.STATE_REBUILT) == 0
        assert system.events.count("c", EventKind.RESTARTED) == 1


@pytest.mark.parametrize("check_raises", [False, True])
async def test_state_is_rebuilt_when_the_check_rejects_it(
    autojump_clock: Any, check_raises: bool
) -> None:
    hooks = Hooks(check_raises=check_raises)
    async with open_actor_system(Supervisor("root", [hooks.spec()], backoff=NO_JITTER)) as system:
        c = system.ref("c")
        await c.ask("incr")
        with pytest.raises(ActorCrashed):
            await c.ask("corrupt")
        assert await c.ask("get") == {"n": 100, "rebuilt_from": {"n": -1}}
        assert hooks.calls == [("initial", None), ("check", {"n": -1}), ("rebuild", {"n": -1})]
        kinds = [e.kind for e in system.events.history if e.actor == "c"]
        assert kinds == [
            EventKind.STARTED,
            EventKind.CRASHED,
            EventKind.STATE_REBUILT,
            EventKind.RESTARTED,
        ]


# -- lifecycle events ------------------------------------------------------------------------


async def test_lifecycle_events_can_be_read_as_a_stream(autojump_clock: Any) -> None:
    root = Supervisor(
        "root",
        [
            ChildSpec("a", lambda ctx: Counter()),
            ChildSpec("b", lambda ctx: Counter(), restart=RestartType.TRANSIENT),
        ],
        backoff=Backoff(initial=2.0, maximum=2.0, jitter=0.0),
    )
    async with open_actor_system(root) as system:
        async with system.events.subscribe() as stream:
            killed_at = trio.current_time()
            system.kill("a")
            await trio.testing.wait_all_tasks_blocked()
            await system.ref("b").ask("stop")
            with trio.fail_after(10.0):
                events = [await stream.receive() for _ in range(3)]
        assert [(e.actor, e.kind) for e in events] == [
            ("a", EventKind.CRASHED),
            ("b", EventKind.STOPPED),
            ("a", EventKind.RESTARTED),
        ]
        assert isinstance(events[0].error, ActorKilled)
        assert events[1].error is None
        assert events[2].time == pytest.approx(killed_at + 2.0)
    history = [(e.actor, e.kind) for e in system.events.history]
    assert history[:2] == [("a", EventKind.STARTED), ("b", EventKind.STARTED)]
    assert history[-1] == ("a", EventKind.STOPPED)  # shutdown


async def test_lifecycle_events_are_counted_per_actor_and_kind(autojump_clock: Any) -> None:
    inner = Supervisor(
        "inner", [ChildSpec("x", lambda ctx: Counter())], intensity=LENIENT, backoff=NO_JITTER
    )
    root = Supervisor(
        "root",
        [ChildSpec.for_supervisor(inner), ChildSpec("y", lambda ctx: Counter())],
        backoff=NO_JITTER,
    )
    async with open_actor_system(root) as system:
        for _ in range(4):
            system.kill("x")
            await trio.sleep(0.5)
        system.kill("inner")
        await trio.sleep(0.5)
        counts = {
            name: {
                k: system.events.count(name, k) for k in EventKind if system.events.count(name, k)
            }
            for name in ("inner", "x", "y")
        }
    assert counts == {
        "inner": {EventKind.STARTED: 1, EventKind.CRASHED: 1, EventKind.RESTARTED: 1},
        # x: four kills, then the stop and restart that came with its supervisor's
        "x": {
            EventKind.STARTED: 1,
            EventKind.CRASHED: 4,
            EventKind.RESTARTED: 5,
            EventKind.STOPPED: 1,
        },
        "y": {EventKind.STARTED: 1},
    }
    assert system.events.count("nobody", EventKind.CRASHED) == 0


async def test_a_slow_subscriber_loses_events_instead_of_blocking_the_runtime(
    autojump_clock: Any,
) -> None:
    root = Supervisor("root", [ChildSpec("a", lambda ctx: Counter())], intensity=LENIENT)
    async with open_actor_system(root) as system:
        async with system.events.subscribe(capacity=2) as stream:
            for n in range(1, 6):
                system.kill("a")
                await wait_for(system, "a", EventKind.RESTARTED, n)
            kinds = [stream.receive_nowait().kind, stream.receive_nowait().kind]
            with pytest.raises(trio.WouldBlock):
                stream.receive_nowait()
            system.kill("a")
            assert (await stream.receive()).kind is EventKind.CRASHED  # it keeps flowing
        assert kinds == [EventKind.CRASHED, EventKind.RESTARTED]
        assert system.events.count("a", EventKind.RESTARTED) == 5


async def test_a_subscriber_that_closed_its_stream_early_never_breaks_the_runtime(
    autojump_clock: Any,
) -> None:
    root = Supervisor("root", [ChildSpec("a", lambda ctx: Counter())], backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        async with system.events.subscribe() as stream:
            await stream.aclose()  # this reader has seen enough
            system.kill("a")
            await wait_for(system, "a", EventKind.RESTARTED)
        assert await system.ref("a").ask("get") is None
        assert system.events.count("a", EventKind.CRASHED) == 1


# -- chaos ---------------------------------------------------------------------------------


async def test_kill_by_name_crashes_the_message_being_handled_and_restarts_the_actor(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    root = Supervisor(
        "root",
        [ChildSpec("c", lambda ctx: Counter(handled))],
        backoff=Backoff(initial=5.0, maximum=5.0, jitter=0.0),
    )
    async with open_actor_system(root) as system:
        c = system.ref("c")
        results: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: capture(c.ask(Hold(trio.Event())), results))
            await trio.testing.wait_all_tasks_blocked()
            assert system.kill("c") is True
        [result] = results
        assert isinstance(result, outcome.Error)
        assert isinstance(result.error, ActorCrashed)
        assert isinstance(result.error.cause, ActorKilled)
        assert result.error.handler_started is True
        await trio.testing.wait_all_tasks_blocked()
        assert c.state is ActorState.RESTARTING
        assert system.kill("c") is False  # nothing runs to kill
        await trio.sleep(5.5)
        assert system.state("c") is ActorState.RUNNING
        assert system.kill("c") is True
        assert system.actors()[0].restarts == 1


@pytest.mark.parametrize("error", [None, OSError("disk on fire")])
async def test_injected_fault_fails_the_next_message_before_its_handler_runs(
    autojump_clock: Any, error: Exception | None
) -> None:
    handled: list[tuple[int, Any]] = []
    state = StateHooks(lambda: {"n": 0}, lambda s: True, lambda s: s)
    root = Supervisor(
        "root", [ChildSpec("c", lambda ctx: Counter(handled), state=state)], backoff=NO_JITTER
    )
    async with open_actor_system(root) as system:
        c = system.ref("c")
        await c.ask("incr")
        system.inject_fault("c", error)
        with pytest.raises(ActorCrashed) as info:
            await c.ask("incr")
        assert info.value.handler_started is False
        if error is None:
            assert isinstance(info.value.cause, InjectedFault)
        else:
            assert info.value.cause is error
        assert await c.ask("incr") == 2  # the faulted message had no effect
        assert handled == [(1, "incr"), (2, "incr")]
        [crash] = [e for e in system.events.history if e.kind is EventKind.CRASHED]
        assert crash.error is info.value.cause


async def run_monkey(
    seed: int, rate: float, duration: float, targets: Any = None
) -> tuple[list[Kill], float, ActorSystem]:
    """Run a monkey over three actors; return its kills, its start time and the system."""
    children = [ChildSpec(n, lambda ctx: Counter()) for n in ("a", "b", "c")]
    quick = Backoff(initial=0.01, maximum=0.01, jitter=0.0)
    root = Supervisor("root", children, intensity=LENIENT, backoff=quick)
    async with open_actor_system(root) as system:
        monkey = ChaosMonkey(system, rate, duration, targets, rng=random.Random(seed))
        began = trio.current_time()
        await monkey.run()
        assert trio.current_time() == pytest.approx(began + duration)
        for name in ("a", "b", "c"):
            assert (await system.ref(name).ask("get")) is None  # all still answer
    return monkey.kills, began, system


async def test_chaos_monkey_kills_at_roughly_its_rate(autojump_clock: Any) -> None:
    rate, duration = 4.0, 50.0  # 200 kills expected, Poisson: standard deviation ~14
    kills, began, system = await run_monkey(7, rate, duration)
    assert 150 <= len(kills) <= 250
    assert all(began < k.time <= began + duration for k in kills)
    assert [k.time for k in kills] == sorted(k.time for k in kills)
    for name in ("a", "b", "c"):
        mine = sum(k.actor == name for k in kills)
        assert mine > 30
        assert system.events.count(name, EventKind.CRASHED) == mine


async def test_chaos_monkey_replays_with_the_same_seed_and_only_kills_its_targets(
    autojump_clock: Any,
) -> None:
    first, began_1, _ = await run_monkey(3, 2.0, 20.0, ["a", "c"])
    second, began_2, _ = await run_monkey(3, 2.0, 20.0, lambda n: n != "b")
    assert first
    assert {k.actor for k in first} == {"a", "c"}
    assert [k.actor for k in first] == [k.actor for k in second]
    assert [k.time - began_1 for k in first] == pytest.approx([k.time - began_2 for k in second])


# -- cancellation ------------------------------------------------------------------------


class Stoppable(Counter):
    def __init__(self, stopped: list[str]) -> None:
        super().__init__()
        self.stopped = stopped

    async def on_stop(self) -> None:
        self.stopped.append(self.ctx.name)

    async def background(self) -> None:
        await trio.sleep_forever()


async def test_cancelling_the_scope_that_owns_the_root_stops_every_actor_and_leaves_no_task(
    autojump_clock: Any,
) -> None:
    def stats() -> int:
        return trio.lowlevel.current_statistics().tasks_living

    stopped: list[str] = []
    inner = Supervisor("inner", [ChildSpec(n, lambda ctx: Stoppable(stopped)) for n in ("x", "y")])
    root = Supervisor(
        "root",
        [
            ChildSpec("a", lambda ctx: Stoppable(stopped)),
            ChildSpec.for_supervisor(inner),
            ChildSpec("busy", lambda ctx: Counter(), shutdown_timeout=2.0),
            ChildSpec("down", lambda ctx: Counter()),
        ],
        backoff=Backoff(initial=100.0, maximum=100.0, jitter=0.0),
    )
    before = stats()
    results: list[outcome.Outcome[Any]] = []
    with trio.fail_after(60.0):
        async with trio.open_nursery() as askers:
            async with trio.open_nursery() as owner:
                system: ActorSystem = await owner.start(root.run)
                busy = system.ref("busy")
                askers.start_soon(capture, busy.ask(Hold(trio.Event())), results)
                system.kill("down")  # a restart is pending when the owner cancels
                await trio.sleep(1.0)
                assert stats() > before + 6
                owner.cancel_scope.cancel()
    assert stats() == before
    assert sorted(stopped) == ["a", "x", "y"]
    assert stopped.index("y") < stopped.index("x") < stopped.index("a")
    assert {info.name: info.state for info in system.actors()} == {
        name: ActorState.STOPPED for name in ("a", "inner", "x", "y", "busy", "down")
    }
    [result] = results
    assert isinstance(result, outcome.Error)
    assert isinstance(result.error, ActorCrashed)  # the busy actor was cancelled on its deadline


# -- monitors ---------------------------------------------------------------------------------


async def test_a_monitor_fires_once_when_the_incarnation_ends_by_kill_or_crash(
    autojump_clock: Any,
) -> None:
    hooks = Hooks()
    async with open_actor_system(Supervisor("root", [hooks.spec()], backoff=NO_JITTER)) as system:
        c = system.ref("c")
        await c.ask("get")
        fired: list[tuple[str, ActorState]] = []

        def note(tag: str) -> None:
            fired.append((tag, c.state))

        c.monitor(note, "kill")
        forgotten = c.monitor(note, "forgotten")
        c.demonitor(forgotten)
        system.kill("c")
        await wait_for(system, "c", EventKind.RESTARTED)
        assert fired == [("kill", ActorState.DOWN)]  # once, as it went down; not the forgotten one
        c.monitor(note, "crash")
        with pytest.raises(ActorCrashed):
            await c.ask("corrupt")
        assert fired[-1] == ("crash", ActorState.DOWN)
        await wait_for(system, "c", EventKind.RESTARTED, 2)
        await c.ask("get")  # the new incarnation keeps no monitor of the old one
        system.kill("c")
        await wait_for(system, "c", EventKind.RESTARTED, 3)
        assert [tag for tag, _ in fired] == ["kill", "crash"]


async def test_a_monitor_of_an_actor_not_running_fires_at_once(autojump_clock: Any) -> None:
    hooks = Hooks()
    spec = attrs.evolve(hooks.spec(), restart=RestartType.TEMPORARY)
    async with open_actor_system(Supervisor("root", [spec], backoff=NO_JITTER)) as system:
        c = system.ref("c")
        await c.ask("stop")
        with trio.fail_after(1):
            while c.state is ActorState.RUNNING:  # noqa: ASYNC110 - stops at its next checkpoint
                await trio.sleep(0.001)
        fired: list[int] = []
        assert c.monitor(fired.append, 7) == 0
        assert fired == [7]
        c.demonitor(0)  # harmless
