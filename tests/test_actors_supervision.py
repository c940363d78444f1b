"""Supervision: strategies, restart types, intensity and escalation, backoff,
ordered start and reverse-ordered, time-bounded shutdown.

Every test runs on trio's ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture), so restart delays and timeouts are measured
exactly and cost no real time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import (
    Actor,
    ActorContext,
    ActorCrashed,
    ActorRef,
    ActorState,
    ActorStopped,
    ActorSystem,
    Backoff,
    ChildSpec,
    EventKind,
    Intensity,
    RestartType,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    open_actor_system,
)

NO_JITTER = Backoff(initial=0.01, maximum=1.0, factor=2.0, jitter=0.0, reset_after=1000.0)
LENIENT = Intensity(max_restarts=1000, period=1.0)


# -- a scriptable actor -------------------------------------------------------------


@attrs.frozen
class Echo:
    value: Any


@attrs.frozen
class Fail:
    error: Exception


@attrs.frozen
class Hold:
    """Block the handler until ``release`` is set, then reply ``value``."""

    release: trio.Event
    value: Any = None


@attrs.frozen
class StopSelf:
    value: Any = None


class Journal:
    """What every incarnation of every worker did, in order; outlives incarnations."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int]] = []

    def add(self, what: str, ctx: ActorContext) -> None:
        self.entries.append((what, ctx.name, ctx.incarnation))

    def of(self, what: str) -> list[tuple[str, int]]:
        return [(name, inc) for w, name, inc in self.entries if w == what]


class Worker(Actor):
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def on_start(self) -> None:
        self.journal.add("start", self.ctx)

    async def on_stop(self) -> None:
        self.journal.add("stop", self.ctx)

    async def handle(self, message: Any) -> Any:
        self.journal.add("handle", self.ctx)
        if isinstance(message, Echo):
            return message.value
        if isinstance(message, Fail):
            raise message.error
        if isinstance(message, Hold):
            try:
                await message.release.wait()
            finally:
                if not message.release.is_set():
                    self.journal.add("interrupted", self.ctx)
            return message.value
        if isinstance(message, StopSelf):
            self.ctx.stop()
            return message.value
        raise AssertionError(f"unexpected message {message!r}")


def worker(journal: Journal) -> Callable[[ActorContext], Actor]:
    return lambda ctx: Worker(journal)


def specs(journal: Journal, *names: str, **kwargs: Any) -> list[ChildSpec]:
    return [ChildSpec(name, worker(journal), **kwargs) for name in names]


async def wait_for(system: ActorSystem, actor: str, kind: EventKind, count: int = 1) -> float:
    """Wait until ``actor`` has had ``count`` events of ``kind``; return the time of the last."""
    async with system.events.subscribe() as stream:
        while system.events.count(actor, kind) < count:
            await stream.receive()
    return [e.time for e in system.events.history if e.actor == actor and e.kind is kind][-1]


def restarts(system: ActorSystem) -> dict[str, int]:
    return {info.name: info.restarts for info in system.actors()}


async def capture(ref: ActorRef, message: Any, into: list[outcome.Outcome[Any]]) -> None:
    into.append(await outcome.acapture(ref.ask, message))


async def ask_queued(
    nursery: trio.Nursery, ref: ActorRef, message: Any, into: list[outcome.Outcome[Any]]
) -> None:
    """Ask in a task of ``nursery``; return once the message is queued (asks keep their order)."""
    nursery.start_soon(capture, ref, message, into)
    await trio.testing.wait_all_tasks_blocked()


# -- strategies ------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_failed_child(autojump_clock: Any) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "a", "b", "c"), backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        assert system.kill("b")
        await wait_for(system, "b", EventKind.RESTARTED)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.of("start") == [("a", 1), ("b", 1), ("c", 1), ("b", 2)]
        assert restarts(system) == {"a": 0, "b": 1, "c": 0}
        assert await system.ref("b").ask(Echo("after")) == "after"


async def test_one_for_one_siblings_keep_serving_during_a_restart_delay(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    slow = Backoff(initial=10.0, maximum=10.0, jitter=0.0)
    root = Supervisor("root", specs(journal, "a", "b"), backoff=slow)
    async with open_actor_system(root) as system:
        killed_at = trio.current_time()
        system.kill("b")
        await trio.testing.wait_all_tasks_blocked()
        b = system.ref("b")
        assert b.state is ActorState.RESTARTING
        assert b.restart_eta() == pytest.approx(killed_at + 10.0)
        assert await system.ref("a").ask(Echo(1)) == 1
        assert trio.current_time() == killed_at  # answered without waiting for b
        assert await b.ask(Echo(2)) == 2  # queued, then answered by b's next incarnation
        assert trio.current_time() == pytest.approx(killed_at + 10.0)


async def test_one_for_all_stops_the_others_in_reverse_order_and_restarts_all_in_order(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor(
        "root", specs(journal, "a", "b", "c", "d"), strategy=Strategy.ONE_FOR_ALL, backoff=NO_JITTER
    )
    async with open_actor_system(root) as system:
        held: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            for name in "acd":
                nursery.start_soon(capture, system.ref(name), Hold(trio.Event()), held)
            await trio.testing.wait_all_tasks_blocked()
            journal.entries.clear()
            system.kill("b")
        await wait_for(system, "d", EventKind.RESTARTED)
        await trio.testing.wait_all_tasks_blocked()
        assert journal.of("interrupted") == [("d", 1), ("c", 1), ("a", 1)]
        assert journal.of("start") == [("a", 2), ("b", 2), ("c", 2), ("d", 2)]
        assert journal.of("stop") == []  # a restart stops siblings hard, not gracefully
        assert restarts(system) == {"a": 1, "b": 1, "c": 1, "d": 1}
        # The asks the siblings were handling fail at once instead of hanging.
        for result in held:
            assert isinstance(result, outcome.Error)
            assert isinstance(result.error, ActorCrashed)
            assert isinstance(result.error.cause, ActorStopped)


async def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor(
        "root",
        specs(journal, "a", "b", "c", "d"),
        strategy=Strategy.REST_FOR_ONE,
        backoff=NO_JITTER,
    )
    async with open_actor_system(root) as system:
        async with trio.open_nursery() as nursery:
            for name in "acd":
                nursery.start_soon(capture, system.ref(name), Hold(trio.Event()), [])
            await trio.testing.wait_all_tasks_blocked()
            journal.entries.clear()
            system.kill("b")
            await wait_for(system, "d", EventKind.RESTARTED)
            await trio.testing.wait_all_tasks_blocked()
            assert journal.of("interrupted") == [("d", 1), ("c", 1)]
            assert journal.of("start") == [("b", 2), ("c", 2), ("d", 2)]
            assert restarts(system) == {"a": 0, "b": 1, "c": 1, "d": 1}
            assert system.state("a") is ActorState.RUNNING
            nursery.cancel_scope.cancel()  # a is still holding its message


# -- restart types ---------------------------------------------------------------------


async def test_permanent_child_is_restarted_even_after_a_normal_stop(autojump_clock: Any) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "p"), backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        p = system.ref("p")
        assert await p.ask(StopSelf("bye")) == "bye"
        await wait_for(system, "p", EventKind.RESTARTED)
        assert system.events.count("p", EventKind.STOPPED) == 1
        assert await p.ask(Echo("again")) == "again"
        assert journal.of("start") == [("p", 1), ("p", 2)]


async def test_transient_child_is_not_restarted_after_a_normal_stop(autojump_clock: Any) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "t", restart=RestartType.TRANSIENT))
    async with open_actor_system(root) as system:
        t = system.ref("t")
        release = trio.Event()
        t.tell_nowait(Hold(release))
        t.tell_nowait(StopSelf())
        queued: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture, t, Echo("queued behind the stop"), queued)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        [result] = queued
        assert isinstance(result, outcome.Error)
        assert isinstance(result.error, ActorStopped)
        await trio.sleep(60)
        assert t.state is ActorState.STOPPED
        assert system.events.count("t", EventKind.STOPPED) == 1
        assert system.events.count("t", EventKind.RESTARTED) == 0
        assert journal.of("start") == [("t", 1)]
        with pytest.raises(ActorStopped):
            t.tell_nowait(Echo(1))
        with pytest.raises(ActorStopped):
            await t.ask(Echo(1))


@pytest.mark.parametrize("how", ["crash", "kill"])
async def test_transient_child_is_restarted_after_an_abnormal_exit(
    autojump_clock: Any, how: str
) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "t", restart=RestartType.TRANSIENT), backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        t = system.ref("t")
        if how == "crash":
            with pytest.raises(ActorCrashed):
                await t.ask(Fail(RuntimeError("boom")))
        else:
            assert system.kill("t")
        await wait_for(system, "t", EventKind.RESTARTED)
        assert await t.ask(Echo("back")) == "back"
        assert journal.of("start") == [("t", 1), ("t", 2)]


@pytest.mark.parametrize("how", ["crash", "kill", "normal stop"])
async def test_temporary_child_is_never_restarted_and_its_queued_asks_fail_stopped(
    autojump_clock: Any, how: str
) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "tmp", restart=RestartType.TEMPORARY))
    async with open_actor_system(root) as system:
        tmp = system.ref("tmp")
        release = trio.Event()
        first: list[outcome.Outcome[Any]] = []
        queued: list[outcome.Outcome[Any]] = []
        message = {"crash": Fail(RuntimeError("boom")), "normal stop": StopSelf("done")}.get(
            how, Hold(trio.Event())
        )
        async with trio.open_nursery() as nursery:
            await ask_queued(nursery, tmp, Hold(release, "first"), [])
            await ask_queued(nursery, tmp, message, first)
            for i in range(3):
                await ask_queued(nursery, tmp, Echo(i), queued)
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            if how == "kill":
                assert system.kill("tmp")
        await trio.sleep(60)  # far beyond any restart delay
        assert tmp.state is ActorState.STOPPED
        assert journal.of("start") == [("tmp", 1)]
        if how == "normal stop":
            assert first[0].unwrap() == "done"
        else:
            assert isinstance(first[0], outcome.Error)
            assert isinstance(first[0].error, ActorCrashed)
        assert len(queued) == 3
        for result in queued:
            assert isinstance(result, outcome.Error)
            assert isinstance(result.error, ActorStopped)
        with pytest.raises(ActorStopped):
            await tmp.ask(Echo("late"))


# -- intensity and escalation ------------------------------------------------------------


async def test_root_that_exceeds_its_intensity_gives_up_and_run_raises(autojump_clock: Any) -> None:
    journal = Journal()
    root = Supervisor(
        "root", specs(journal, "a", "b"), intensity=Intensity(2, 10.0), backoff=NO_JITTER
    )
    gave_up: list[SupervisorGaveUp] = []

    async def run_root(*, task_status: trio.TaskStatus[ActorSystem]) -> None:
        with pytest.raises(SupervisorGaveUp) as info:
            await root.run(task_status=task_status)
        gave_up.append(info.value)

    async with trio.open_nursery() as nursery:
        system: ActorSystem = await nursery.start(run_root)
        pending: list[outcome.Outcome[Any]] = []
        for n in range(1, 3):
            system.kill("b")
            await wait_for(system, "b", EventKind.RESTARTED, n)
        nursery.start_soon(capture, system.ref("a"), Hold(trio.Event()), pending)
        await trio.testing.wait_all_tasks_blocked()
        system.kill("b")  # the third restart within 10 s is one too many
    [error] = gave_up
    assert (error.supervisor, error.child, error.restarts, error.period) == ("root", "b", 2, 10.0)
    assert system.events.count("root", EventKind.GAVE_UP) == 1
    assert system.state("a") is ActorState.STOPPED
    assert system.state("b") is ActorState.STOPPED
    assert journal.of("stop") == []  # giving up stops children hard
    [held] = pending
    assert isinstance(held, outcome.Error)
    assert isinstance(held.error, ActorCrashed)
    with pytest.raises(ActorStopped):
        await system.ref("a").ask(Echo(1))


async def test_restarts_spread_wider_than_the_period_never_exhaust_intensity(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "a"), intensity=Intensity(1, 5.0), backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        for n in range(1, 6):
            system.kill("a")
            await wait_for(system, "a", EventKind.RESTARTED, n)
            await trio.sleep(6.0)
        assert system.events.count("root", EventKind.GAVE_UP) == 0
        assert await system.ref("a").ask(Echo("alive")) == "alive"


async def test_nested_supervisor_that_gives_up_is_restarted_by_its_parent(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    inner = Supervisor(
        "inner", specs(journal, "x", "y"), intensity=Intensity(0, 10.0), backoff=NO_JITTER
    )
    root = Supervisor(
        "root", [ChildSpec.for_supervisor(inner), *specs(journal, "z")], backoff=NO_JITTER
    )
    async with open_actor_system(root) as system:
        system.kill("y")  # inner allows no restart at all: it gives up at once
        await wait_for(system, "inner", EventKind.RESTARTED)
        await trio.testing.wait_all_tasks_blocked()
        assert system.events.count("inner", EventKind.GAVE_UP) == 1
        [crash] = [
            e for e in system.events.history if e.actor == "inner" and e.kind is EventKind.CRASHED
        ]
        assert isinstance(crash.error, SupervisorGaveUp)
        assert crash.error.child == "y"
        # The whole subtree came back, the sibling of the subtree never went down.
        assert journal.of("start") == [("x", 1), ("y", 1), ("z", 1), ("x", 2), ("y", 2)]
        assert await system.ref("x").ask(Echo("x")) == "x"
        assert await system.ref("y").ask(Echo("y")) == "y"
        assert system.events.count("root", EventKind.GAVE_UP) == 0


async def test_escalation_reaches_the_root_which_gives_up(autojump_clock: Any) -> None:
    journal = Journal()
    inner = Supervisor("inner", specs(journal, "x"), intensity=Intensity(0, 10.0))
    root = Supervisor(
        "root", [ChildSpec.for_supervisor(inner)], intensity=Intensity(1, 10.0), backoff=NO_JITTER
    )
    raised: list[SupervisorGaveUp] = []

    async def run_root(*, task_status: trio.TaskStatus[ActorSystem]) -> None:
        with pytest.raises(SupervisorGaveUp) as info:
            await root.run(task_status=task_status)
        raised.append(info.value)

    async with trio.open_nursery() as nursery:
        system: ActorSystem = await nursery.start(run_root)
        system.kill("x")
        await wait_for(system, "inner", EventKind.RESTARTED)
        system.kill("x")
    [error] = raised
    assert (error.supervisor, error.child) == ("root", "inner")
    assert system.events.count("inner", EventKind.GAVE_UP) == 2
    assert system.events.count("root", EventKind.GAVE_UP) == 1
    assert system.state("x") is ActorState.STOPPED


# -- backoff ---------------------------------------------------------------------------


async def restart_delays(root: Supervisor, name: str, kills: int) -> list[float]:
    """Kill ``name`` each time it (re)starts; return each crash-to-restart delay."""
    delays = []
    async with open_actor_system(root) as system:
        for n in range(1, kills + 1):
            killed_at = trio.current_time()
            assert system.kill(name)
            restarted_at = await wait_for(system, name, EventKind.RESTARTED, n)
            delays.append(restarted_at - killed_at)
    return delays


async def test_restart_delay_grows_exponentially_and_is_capped(autojump_clock: Any) -> None:
    backoff = Backoff(initial=0.5, maximum=4.0, factor=2.0, jitter=0.0, reset_after=100.0)
    root = Supervisor("root", specs(Journal(), "a"), intensity=LENIENT, backoff=backoff)
    delays = await restart_delays(root, "a", 7)
    assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0])


async def test_restart_delay_starts_over_after_a_stable_run(autojump_clock: Any) -> None:
    backoff = Backoff(initial=1.0, maximum=64.0, factor=3.0, jitter=0.0, reset_after=20.0)
    root = Supervisor("root", specs(Journal(), "a"), intensity=LENIENT, backoff=backoff)
    delays = []
    async with open_actor_system(root) as system:
        for n, stable_for in enumerate([0.0, 0.0, 0.0, 20.0, 0.0], start=1):
            await trio.sleep(stable_for)
            killed_at = trio.current_time()
            system.kill("a")
            delays.append(await wait_for(system, "a", EventKind.RESTARTED, n) - killed_at)
    assert delays == pytest.approx([1.0, 3.0, 9.0, 1.0, 3.0])


async def test_jittered_restart_delays_stay_within_bounds_and_replay_with_the_seed(
    autojump_clock: Any,
) -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.25, reset_after=1000.0)
    runs = []
    for _ in range(2):
        root = Supervisor(
            "root", specs(Journal(), "a"), intensity=LENIENT, backoff=backoff, rng=random.Random(42)
        )
        runs.append(await restart_delays(root, "a", 7))
    delays = runs[0]
    assert runs[1] == pytest.approx(delays)  # the same seed replays the same schedule
    for n, delay in enumerate(delays, start=1):
        base = min(8.0, 2.0 ** (n - 1))
        assert base * 0.75 <= delay <= base * 1.25, (n, delay)
    assert any(abs(delay - min(8.0, 2.0 ** (n - 1))) > 1e-3 for n, delay in enumerate(delays, 1))


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.0, 10.0),
    spread=st.floats(1.0, 100.0),
    factor=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 0.99),
    failures=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_backoff_delay_is_the_capped_exponential_within_its_jitter(
    initial: float, spread: float, factor: float, jitter: float, failures: int, seed: int
) -> None:
    backoff = Backoff(initial=initial, maximum=initial * spread, factor=factor, jitter=jitter)
    base = min(backoff.maximum, initial * factor ** (failures - 1))
    delay = backoff.delay(failures, random.Random(seed))
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9
    assert delay <= backoff.maximum * (1 + jitter) + 1e-9


class FailsToRestart(Actor):
    """Starts once, then every later incarnation fails in ``on_start``."""

    def __init__(self, attempts: list[float]) -> None:
        self.attempts = attempts

    async def on_start(self) -> None:
        self.attempts.append(trio.current_time())
        if self.ctx.incarnation > 1:
            raise RuntimeError("cannot start")

    async def handle(self, message: Any) -> Any:
        return message


async def test_backoff_grows_for_a_child_that_keeps_failing_in_on_start(
    autojump_clock: Any,
) -> None:
    attempts: list[float] = []
    backoff = Backoff(initial=1.0, maximum=100.0, factor=2.0, jitter=0.0, reset_after=5.0)
    root = Supervisor(
        "root",
        [ChildSpec("f", lambda ctx: FailsToRestart(attempts))],
        intensity=Intensity(4, 1000.0),
        backoff=backoff,
    )

    async def run_root(*, task_status: trio.TaskStatus[ActorSystem]) -> None:
        with pytest.raises(SupervisorGaveUp):
            await root.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        system: ActorSystem = await nursery.start(run_root)
        await trio.sleep(10.0)  # a stable first run: the first failure starts from initial
        system.kill("f")
    gaps = [b - a for a, b in zip(attempts[1:], attempts[2:], strict=False)]
    assert attempts[1] == pytest.approx(11.0)
    assert gaps == pytest.approx([2.0, 4.0, 8.0])


# -- ordered start, reverse-ordered and bounded shutdown ---------------------------------


class Observer(Actor):
    """On start, asks every elder sibling and records what it saw."""

    def __init__(self, elders: list[str], seen: dict[str, list[tuple[str, ActorState, Any]]]):
        self.elders = elders
        self.seen = seen

    async def on_start(self) -> None:
        system = self.ctx.system
        self.seen[self.ctx.name] = [
            (e, system.state(e), await system.ref(e).ask(Echo(e))) for e in self.elders
        ]

    async def handle(self, message: Any) -> Any:
        assert isinstance(message, Echo)
        return message.value


async def test_children_start_in_order_each_seeing_its_elders_running(autojump_clock: Any) -> None:
    seen: dict[str, list[tuple[str, ActorState, Any]]] = {}
    names = ["a", "b", "c"]

    def observer(elders: list[str]) -> Callable[[ActorContext], Actor]:
        return lambda ctx: Observer(elders, seen)

    children = [ChildSpec(name, observer(names[:i])) for i, name in enumerate(names)]
    async with open_actor_system(Supervisor("root", children)) as system:
        assert all(system.state(n) is ActorState.RUNNING for n in names)
    running = ActorState.RUNNING
    assert seen == {
        "a": [],
        "b": [("a", running, "a")],
        "c": [("a", running, "a"), ("b", running, "b")],
    }


async def test_shutdown_runs_on_stop_in_reverse_order_after_queued_messages(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor("root", specs(journal, "a", "b", "c"))
    async with open_actor_system(root) as system:
        for name in "abc":
            for i in range(3):
                system.ref(name).tell_nowait(Echo(i))
        journal.entries.clear()
    assert journal.of("stop") == [("c", 1), ("b", 1), ("a", 1)]
    for name in "abc":
        mine = [what for what, actor, _ in journal.entries if actor == name]
        assert mine == ["handle", "handle", "handle", "stop"]
    stopped = [e.actor for e in system.events.history if e.kind is EventKind.STOPPED]
    assert stopped == ["c", "b", "a"]
    assert all(system.state(n) is ActorState.STOPPED for n in "abc")


class HangsOnStop(Worker):
    async def on_stop(self) -> None:
        self.journal.add("stopping", self.ctx)
        await trio.sleep_forever()


async def test_shutdown_cancels_an_actor_whose_on_stop_hangs_after_its_timeout(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor(
        "root",
        [
            ChildSpec("a", worker(journal)),
            ChildSpec("b", lambda ctx: HangsOnStop(journal), shutdown_timeout=3.0),
        ],
    )
    async with open_actor_system(root) as system:
        began = trio.current_time()
    stopped = {e.actor: e.time for e in system.events.history if e.kind is EventKind.STOPPED}
    assert stopped == {"b": pytest.approx(began + 3.0), "a": pytest.approx(began + 3.0)}
    assert trio.current_time() == pytest.approx(began + 3.0)
    assert journal.of("stopping") == [("b", 1)]
    assert journal.of("stop") == [("a", 1)]  # the next sibling still stops gracefully


# -- regressions: runtime bugs these tests found ----------------------------------------------


class SlowStart(Actor):
    async def on_start(self) -> None:
        await trio.sleep(10.0)

    async def handle(self, message: Any) -> Any:
        return message


async def test_cancelling_the_root_while_a_child_starts_does_not_hang(autojump_clock: Any) -> None:
    root = Supervisor("root", [ChildSpec("slow", lambda ctx: SlowStart())])
    owner = trio.CancelScope()
    finished = trio.Event()

    async def own_root() -> None:
        with owner:
            await root.run()
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(own_root)
        await trio.sleep(1.0)  # "slow" is inside on_start
        owner.cancel()
        with trio.move_on_after(100.0):
            await finished.wait()
        ended_in_time = finished.is_set()
        if not ended_in_time:
            assert root.system is not None
            root.system.kill("slow")  # unstick the runtime so the test can end
    assert ended_in_time


async def shutdown_as_a_restart_fires() -> bool:
    """Leave the system at the very instant a restart fires; return whether it hung."""
    root = Supervisor(
        "root",
        [ChildSpec("c", worker(Journal()))],
        backoff=Backoff(initial=5.0, maximum=5.0, jitter=0.0),
    )
    finished = trio.Event()

    async def own_root() -> None:
        async with open_actor_system(root) as system:
            system.kill("c")
            await trio.sleep(5.0)  # wakes in the same scheduler pass as the restart
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(own_root)
        with trio.move_on_after(100.0):
            await finished.wait()
        hung = not finished.is_set()
        if hung:
            assert root.system is not None
            root.system.kill("c")  # unstick the runtime so the run can end
    return hung


def test_shutting_down_as_a_restart_fires_never_hangs() -> None:
    # Which of the two tasks woken at that instant runs first is up to trio's
    # scheduler, so the race is run many times (each run takes ~2 ms).
    runs = [
        trio.run(shutdown_as_a_restart_fires, clock=trio.testing.MockClock(autojump_threshold=0))
        for _ in range(60)
    ]
    assert sum(runs) == 0


class FailsSecondStart(Worker):
    async def on_start(self) -> None:
        await super().on_start()
        if self.ctx.incarnation == 2:
            raise RuntimeError("second start fails")


async def test_one_for_all_survives_every_child_failing_during_a_restart(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    root = Supervisor(
        "root",
        [ChildSpec(n, lambda ctx: FailsSecondStart(journal)) for n in "abc"],
        strategy=Strategy.ONE_FOR_ALL,
        intensity=LENIENT,
        backoff=NO_JITTER,
    )
    async with open_actor_system(root) as system:
        system.kill("a")
        await trio.sleep(1.0)
        assert [(n, inc) for n, inc in journal.of("start") if inc == 3] == [
            ("a", 3),
            ("b", 3),
            ("c", 3),
        ]
        assert await system.ref("c").ask(Echo("ok")) == "ok"


class SlowHandler(Worker):
    async def handle(self, message: Any) -> Any:
        self.journal.add("handle", self.ctx)
        await trio.sleep(10.0)
        return message


async def test_killing_a_nested_supervisor_does_not_stop_its_transient_child_for_good(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    inner = Supervisor(
        "inner",
        [
            ChildSpec(
                "w",
                lambda ctx: SlowHandler(journal),
                restart=RestartType.TRANSIENT,
                shutdown_timeout=1.0,
            )
        ],
        backoff=NO_JITTER,
    )
    root = Supervisor("root", [ChildSpec.for_supervisor(inner)], backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        w = system.ref("w")
        for i in range(3):
            w.tell_nowait(i)
        await trio.sleep(1.0)
        assert system.kill("inner")
        await trio.sleep(100.0)  # the restarted w works off what is left of its mailbox
        assert system.events.count("inner", EventKind.RESTARTED) == 1
        assert w.state is ActorState.RUNNING
        assert journal.of("stop") == []


async def test_children_of_a_supervisor_that_gave_up_are_reported_down_not_running(
    autojump_clock: Any,
) -> None:
    journal = Journal()
    inner = Supervisor("inner", specs(journal, "x", "y"), intensity=Intensity(0, 10.0))
    root = Supervisor(
        "root",
        [ChildSpec.for_supervisor(inner)],
        backoff=Backoff(initial=50.0, maximum=50.0, jitter=0.0),
    )
    async with open_actor_system(root) as system:
        system.kill("y")
        await trio.sleep(1.0)  # inner gave up; its restart is 49 s away
        assert system.state("inner") is ActorState.RESTARTING
        assert system.state("x") is ActorState.DOWN
        assert system.state("y") is ActorState.DOWN
        assert system.kill("x") is False
