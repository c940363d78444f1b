"""Properties of the actor runtime under random crashes and kills, and argument checks.

The property test drives one actor from several senders with thousands of
messages while crash messages and kills land at random moments, and checks
that no queued message is lost, none is handled twice, each sender's order is
kept across restarts, and every message that did not complete was reported.
"""

from __future__ import annotations

import random
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
    ActorCrashed,
    ActorKilled,
    ActorStopped,
    Backoff,
    ChaosMonkey,
    ChildSpec,
    EventKind,
    Intensity,
    Strategy,
    Supervisor,
    open_actor_system,
)

TICK = 0.001  # seconds of (mock) work per message, so kills land mid-handler


@attrs.frozen
class Msg:
    sender: int
    seq: int
    crash: bool
    ask: bool


@attrs.frozen
class Flush:
    pass


class Boom(Exception):
    def __init__(self, message: Msg) -> None:
        super().__init__(message)
        self.message = message


@attrs.define
class Log:
    started: list[tuple[int, int]] = attrs.field(factory=list)
    done: list[tuple[int, int]] = attrs.field(factory=list)


class Sink(Actor):
    def __init__(self, log: Log) -> None:
        self.log = log

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Flush):
            return None
        key = (message.sender, message.seq)
        self.log.started.append(key)
        if message.crash:
            raise Boom(message)
        await trio.sleep(TICK)
        self.log.done.append(key)
        return key


class Idle(Actor):
    async def handle(self, message: Any) -> Any:
        return message


@attrs.frozen
class Scenario:
    strategy: Strategy
    plans: list[list[tuple[bool, bool]]]  # per sender, per message: (crash, ask)
    kills: list[tuple[float, str]]  # (gap before the kill, target)
    seed: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    ask_ratio = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    plans = []
    for _ in range(draw(st.integers(2, 4))):
        count = draw(st.integers(200, 900))
        crashes = draw(st.sets(st.integers(0, count - 1), max_size=6))
        plans.append([(i in crashes, rng.random() < ask_ratio) for i in range(count)])
    kills = draw(
        st.lists(
            st.tuples(st.floats(0.0002, 0.08), st.sampled_from(["sink", "sink", "other"])),
            max_size=40,
        )
    )
    return Scenario(draw(st.sampled_from(Strategy)), plans, kills, seed)


async def run_scenario(scenario: Scenario) -> None:
    log = Log()
    root = Supervisor(
        "root",
        [
            ChildSpec("other", lambda ctx: Idle()),
            ChildSpec("sink", lambda ctx: Sink(log), mailbox_capacity=16),
        ],
        strategy=scenario.strategy,
        intensity=Intensity(max_restarts=1_000_000, period=1.0),
        backoff=Backoff(initial=0.0005, maximum=0.002, jitter=0.5),
        rng=random.Random(scenario.seed),
    )
    answers: dict[tuple[int, int], Any] = {}
    crashed: dict[tuple[int, int], ActorCrashed] = {}
    effective_kills = 0
    with trio.fail_after(10_000):
        async with open_actor_system(root) as system:
            sink = system.ref("sink")

            async def send_all(sender: int, plan: list[tuple[bool, bool]]) -> None:
                for seq, (crash, ask) in enumerate(plan):
                    message = Msg(sender, seq, crash, ask)
                    if not ask:
                        await sink.tell(message)
                        continue
                    try:
                        answers[(sender, seq)] = await sink.ask(message)
                    except ActorCrashed as error:
                        crashed[(sender, seq)] = error

            async def kill_all() -> None:
                nonlocal effective_kills
                for gap, target in scenario.kills:
                    await trio.sleep(gap)
                    effective_kills += system.kill(target)

            async with trio.open_nursery() as nursery:
                for sender, plan in enumerate(scenario.plans):
                    nursery.start_soon(send_all, sender, plan)
                nursery.start_soon(kill_all)
            await trio.sleep(1.0)  # every pending restart is done
            await sink.ask(Flush())  # FIFO: everything told before it was handled
            events = list(system.events.history)

    crash_messages = {
        (sender, seq)
        for sender, plan in enumerate(scenario.plans)
        for seq, (crash, _) in enumerate(plan)
        if crash
    }
    # No queued message lost, none handled twice, each sender's order kept.
    for sender, plan in enumerate(scenario.plans):
        assert [seq for s, seq in log.started if s == sender] == list(range(len(plan)))
    # What did not complete was a crash message or the message a kill interrupted.
    unfinished = set(log.started) - set(log.done)
    assert crash_messages <= unfinished
    interrupted = unfinished - crash_messages
    assert len(interrupted) <= effective_kills
    # Every crash was reported: crash messages by their own error, kills as kills.
    crashes = [e.error for e in events if e.actor == "sink" and e.kind is EventKind.CRASHED]
    reported = {(e.message.sender, e.message.seq) for e in crashes if isinstance(e, Boom)}
    assert reported == crash_messages
    assert sum(isinstance(e, ActorKilled) for e in crashes) <= effective_kills
    # Every asker got its own answer, or ActorCrashed for the message that failed.
    for key, value in answers.items():
        assert value == key
        assert key in log.done
    for key, error in crashed.items():
        assert key in unfinished
        if key in crash_messages:
            assert isinstance(error.cause, Boom)
            assert error.cause.message.seq == key[1]
            assert error.handler_started
        else:
            assert isinstance(error.cause, ActorKilled | ActorStopped)
    asked = {
        (sender, seq)
        for sender, plan in enumerate(scenario.plans)
        for seq, (_, ask) in enumerate(plan)
        if ask
    }
    assert set(answers) | set(crashed) == asked


@settings(max_examples=10, deadline=None)
@given(scenarios())
def test_random_crashes_and_kills_lose_no_queued_message_and_keep_sender_order(
    scenario: Scenario,
) -> None:
    trio.run(run_scenario, scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_chaos_monkey_under_load_loses_no_queued_message(autojump_clock: Any) -> None:
    log = Log()
    root = Supervisor(
        "root",
        [ChildSpec("sink", lambda ctx: Sink(log), mailbox_capacity=8)],
        intensity=Intensity(max_restarts=100_000, period=1.0),
        backoff=Backoff(initial=0.001, maximum=0.001, jitter=0.0),
    )
    async with open_actor_system(root) as system:
        sink = system.ref("sink")
        monkey = ChaosMonkey(system, rate=20.0, duration=2.0, rng=random.Random(5))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monkey.run)
            for seq in range(3000):
                await sink.tell(Msg(0, seq, crash=False, ask=False))
        await trio.sleep(1.0)
        await sink.ask(Flush())
    assert len(monkey.kills) > 20
    assert [seq for _, seq in log.started] == list(range(3000))
    assert len(set(log.started) - set(log.done)) <= len(monkey.kills)


# -- arguments are checked early, with exact messages ----------------------------------------


def _start(ctx: Any) -> Actor:
    return Idle()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Intensity(max_restarts=-1), r"^max_restarts must be >= 0, got -1$"),
        (lambda: Intensity(period=0), r"^period must be > 0, got 0$"),
        (lambda: Backoff(initial=-1.0), r"^initial must be >= 0, got -1.0$"),
        (lambda: Backoff(initial=2.0, maximum=1.0), r"^maximum must be >= initial, got 1.0$"),
        (lambda: Backoff(factor=0.5), r"^factor must be >= 1, got 0.5$"),
        (lambda: Backoff(jitter=1.0), r"^jitter must be in \[0, 1\), got 1.0$"),
        (lambda: ChildSpec(""), r"^name must not be empty$"),
        (lambda: ChildSpec("c"), r"^child 'c' needs exactly one of start or supervisor$"),
        (
            lambda: ChildSpec("c", _start, supervisor=Supervisor("s", [])),
            r"^child 'c' needs exactly one of start or supervisor$",
        ),
        (
            lambda: ChildSpec("c", _start, mailbox_capacity=0),
            r"^mailbox_capacity must be >= 1, got 0$",
        ),
        (
            lambda: ChildSpec("c", _start, shutdown_timeout=-1),
            r"^shutdown_timeout must be >= 0, got -1$",
        ),
        (
            lambda: Supervisor("s", [ChildSpec("a", _start), ChildSpec("a", _start)]),
            r"^duplicate child names in 's': a$",
        ),
        (
            lambda: ChaosMonkey(None, rate=0, duration=1),  # type: ignore[arg-type]
            r"^rate must be > 0, got 0$",
        ),
        (
            lambda: ChaosMonkey(None, rate=1, duration=-1),  # type: ignore[arg-type]
            r"^duration must be >= 0, got -1$",
        ),
    ],
)
def test_bad_arguments_are_rejected_with_exact_messages(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def leaves(error: BaseException) -> list[BaseException]:
    """Every exception in a tree of groups, with the causes of each."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


async def test_a_duplicate_name_in_a_nested_supervisor_stops_the_tree_from_running(
    autojump_clock: Any,
) -> None:
    inner = Supervisor("inner", [ChildSpec("solo", _start), ChildSpec("a", _start)])
    root = Supervisor("root", [ChildSpec("a", _start), ChildSpec.for_supervisor(inner)])
    with trio.move_on_after(10.0):
        result = await outcome.acapture(root.run)
    assert root.system is not None
    assert isinstance(result, outcome.Error), root.system.info()
    assert any(
        isinstance(leaf, ValueError) and str(leaf) == "an actor named 'a' already exists"
        for leaf in leaves(result.error)
    )
