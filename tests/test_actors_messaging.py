"""Messaging: mailboxes that survive restarts, ask/tell semantics, timeouts,
backpressure, cancellation of an asker, and asks that never hang.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing

from actors import (
    Actor,
    ActorContext,
    ActorCrashed,
    ActorKilled,
    ActorRef,
    ActorState,
    ActorStopped,
    AskTimeout,
    Backoff,
    ChildSpec,
    EventKind,
    MailboxFull,
    RestartType,
    Supervisor,
    UnknownActor,
    open_actor_system,
)

NO_JITTER = Backoff(initial=0.01, maximum=1.0, jitter=0.0, reset_after=1000.0)


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


class Worker(Actor):
    """Records every message it handles as ``(incarnation, message)``."""

    expected_errors = (LookupError,)

    def __init__(self, handled: list[tuple[int, Any]]) -> None:
        self.handled = handled

    async def handle(self, message: Any) -> Any:
        self.handled.append((self.ctx.incarnation, message))
        if isinstance(message, Echo):
            return message.value
        if isinstance(message, Fail):
            raise message.error
        if isinstance(message, Hold):
            await message.release.wait()
            return message.value
        if isinstance(message, StopSelf):
            self.ctx.stop()
            return message.value
        raise AssertionError(f"unexpected message {message!r}")


def worker(handled: list[tuple[int, Any]]) -> Callable[[ActorContext], Actor]:
    return lambda ctx: Worker(handled)


def one(handled: list[tuple[int, Any]], **kwargs: Any) -> Supervisor:
    """A root supervising a single worker named ``w``."""
    return Supervisor("root", [ChildSpec("w", worker(handled), **kwargs)], backoff=NO_JITTER)


async def capture(ref: ActorRef, message: Any, into: list[outcome.Outcome[Any]]) -> None:
    into.append(await outcome.acapture(ref.ask, message))


async def ask_queued(
    nursery: trio.Nursery, ref: ActorRef, message: Any, into: list[outcome.Outcome[Any]]
) -> None:
    """Ask in a task of ``nursery``; return once the message is queued (asks keep their order)."""
    nursery.start_soon(capture, ref, message, into)
    await trio.testing.wait_all_tasks_blocked()


# -- mailboxes survive restarts --------------------------------------------------------------


async def test_messages_queued_behind_a_crash_go_to_the_restarted_actor_in_order(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        w = system.ref("w")
        release = trio.Event()
        w.tell_nowait(Hold(release))
        w.tell_nowait(Fail(RuntimeError("boom")))
        replies: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            for i in range(5):
                await ask_queued(nursery, w, Echo(i), replies)
            for i in range(5, 10):
                w.tell_nowait(Echo(i))
            release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(r.unwrap() for r in replies) == list(range(5))  # each asker got its own
        assert [m.value for inc, m in handled if inc == 2] == list(range(10))
        assert system.events.count("w", EventKind.RESTARTED) == 1
        assert w.mailbox_depth == 0


async def test_asker_of_the_crashing_message_gets_actor_crashed_with_its_cause_at_once(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    slow_restart = Backoff(initial=30.0, maximum=30.0, jitter=0.0)
    root = Supervisor("root", [ChildSpec("w", worker(handled))], backoff=slow_restart)
    async with open_actor_system(root) as system:
        w = system.ref("w")
        cause = RuntimeError("boom")
        asked_at = trio.current_time()
        with pytest.raises(ActorCrashed) as info:
            await w.ask(Fail(cause))
        assert trio.current_time() == asked_at  # not after the 30 s restart delay
        assert info.value.cause is cause
        assert info.value.actor == "w"
        assert info.value.handler_started is True
        await trio.testing.wait_all_tasks_blocked()
        assert w.state is ActorState.RESTARTING
        [crash] = [e for e in system.events.history if e.kind is EventKind.CRASHED]
        assert (crash.actor, crash.error) == ("w", cause)


async def test_expected_error_reaches_the_asker_without_a_crash(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        w = system.ref("w")
        error = KeyError("missing")
        with pytest.raises(KeyError) as info:
            await w.ask(Fail(error))
        assert info.value is error
        w.tell_nowait(Fail(KeyError("told, nobody to answer")))
        assert await w.ask(Echo("still here")) == "still here"
        assert [inc for inc, _ in handled] == [1, 1, 1]
        assert system.events.count("w", EventKind.CRASHED) == 0
        assert system.events.count("w", EventKind.RESTARTED) == 0


async def test_a_reference_stays_valid_across_restarts(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        before = system.ref("w")
        system.kill("w")
        await trio.testing.wait_all_tasks_blocked()
        after = system.ref("w")
        assert before == after
        assert hash(before) == hash(after)
        assert await before.ask(Echo("same")) == "same"
        assert handled == [(2, Echo("same"))]
        assert before.name == "w"


# -- timeouts and backpressure ------------------------------------------------------------


async def test_ask_timeout_raises_ask_timeout_and_the_message_still_takes_effect(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        w = system.ref("w")
        release = trio.Event()
        w.tell_nowait(Hold(release))
        asked_at = trio.current_time()
        with pytest.raises(AskTimeout) as info:
            await w.ask(Echo("late"), timeout=2.5)
        assert trio.current_time() == pytest.approx(asked_at + 2.5)
        assert (info.value.actor, info.value.timeout) == ("w", 2.5)
        release.set()
        assert await w.ask(Echo("next"), timeout=1.0) == "next"
        assert [m for _, m in handled][1:] == [Echo("late"), Echo("next")]


async def test_ask_timeout_also_bounds_the_wait_for_room_in_a_full_mailbox(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled, mailbox_capacity=1)) as system:
        w = system.ref("w")
        release = trio.Event()
        w.tell_nowait(Hold(release))
        await trio.testing.wait_all_tasks_blocked()
        w.tell_nowait(Echo("fills the mailbox"))
        asked_at = trio.current_time()
        with pytest.raises(AskTimeout):
            await w.ask(Echo("no room"), timeout=4.0)
        assert trio.current_time() == pytest.approx(asked_at + 4.0)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert Echo("no room") not in [m for _, m in handled]  # it was never queued


async def test_tell_nowait_on_a_full_mailbox_raises_mailbox_full_and_queues_nothing(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled, mailbox_capacity=2)) as system:
        w = system.ref("w")
        release = trio.Event()
        w.tell_nowait(Hold(release))
        await trio.testing.wait_all_tasks_blocked()  # taken: the mailbox is empty again
        w.tell_nowait(Echo(1))
        w.tell_nowait(Echo(2))
        with pytest.raises(MailboxFull) as info:
            w.tell_nowait(Echo(3))
        assert (info.value.actor, info.value.capacity) == ("w", 2)
        assert w.mailbox_depth == 2
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [m for _, m in handled] == [Hold(release), Echo(1), Echo(2)]


async def test_tell_and_ask_wait_for_room_in_a_full_mailbox(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled, mailbox_capacity=1)) as system:
        w = system.ref("w")
        release = trio.Event()
        w.tell_nowait(Hold(release))
        await trio.testing.wait_all_tasks_blocked()
        w.tell_nowait(Echo("queued"))
        replies: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.tell, Echo("told"))
            await trio.testing.wait_all_tasks_blocked()
            await ask_queued(nursery, w, Echo("asked"), replies)
            assert handled == [(1, Hold(release))]  # both wait for room
            release.set()
        assert [r.unwrap() for r in replies] == ["asked"]
        assert [m for _, m in handled] == [
            Hold(release),
            Echo("queued"),
            Echo("told"),
            Echo("asked"),
        ]


async def test_ask_nowait_fans_out_without_a_task_per_request(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    root = Supervisor(
        "root", [ChildSpec(n, worker(handled), mailbox_capacity=1) for n in ("a", "b", "c")]
    )
    async with open_actor_system(root) as system:
        refs = [system.ref(n) for n in ("a", "b", "c")]
        slots = [ref.ask_nowait(Echo(ref.name)) for ref in refs]
        assert not any(slot.done for slot in slots)
        assert [await slot.wait() for slot in slots] == ["a", "b", "c"]
        release = trio.Event()
        refs[0].tell_nowait(Hold(release))
        await trio.testing.wait_all_tasks_blocked()
        refs[0].tell_nowait(Echo("fills the mailbox"))
        with pytest.raises(MailboxFull):
            refs[0].ask_nowait(Echo("no room"))
        with trio.move_on_after(1.0) as waited:
            await refs[0].ask_start(Echo("waits for room"))
        assert waited.cancelled_caught  # ask_start waits for room...
        release.set()
        slot = await refs[0].ask_start(Echo("room now"))  # ...and queues once there is
        assert await slot.wait() == "room now"
        assert Echo("no room") not in [m for _, m in handled]


async def test_a_reply_slot_can_be_read_after_it_was_awaited(autojump_clock: Any) -> None:
    async with open_actor_system(one([])) as system:
        slot = system.ref("w").ask_nowait(Echo("v"))
        assert await slot.wait() == "v"
        assert slot.done
        assert slot.result() == "v"
        assert slot.result() == "v"


async def test_ask_nowait_on_a_stopped_actor_raises_actor_stopped(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled, restart=RestartType.TEMPORARY)) as system:
        w = system.ref("w")
        await w.ask(StopSelf())
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ActorStopped):
            w.ask_nowait(Echo(1))
        with pytest.raises(ActorStopped):
            await w.ask_start(Echo(1))


# -- cancellation of an asker ------------------------------------------------------------


@pytest.mark.parametrize("where", ["queued", "being handled"])
async def test_ask_cancelled_by_its_caller_leaves_mailbox_and_actor_consistent(
    autojump_clock: Any, where: str
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        w = system.ref("w")
        release = trio.Event()
        if where == "queued":
            w.tell_nowait(Hold(release))
            abandoned: Any = Echo("abandoned")
        else:
            abandoned = Hold(release, "abandoned")
        later: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(1.0) as scope:
                await w.ask(abandoned)
            assert scope.cancelled_caught
            for i in range(3):
                await ask_queued(nursery, w, Echo(i), later)
            release.set()
        assert sorted(r.unwrap() for r in later) == [0, 1, 2]  # the dropped reply went nowhere
        assert [m for _, m in handled][-4:] == [abandoned, Echo(0), Echo(1), Echo(2)]
        assert system.events.count("w", EventKind.CRASHED) == 0
        assert w.mailbox_depth == 0


# -- an ask never hangs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "end", "in_flight_cause", "queued_answered"),
    [
        (RestartType.PERMANENT, "crash", RuntimeError, True),
        (RestartType.PERMANENT, "kill", ActorKilled, True),
        (RestartType.TRANSIENT, "stop", None, False),
        (RestartType.TEMPORARY, "crash", RuntimeError, False),
        (RestartType.TEMPORARY, "kill", ActorKilled, False),
        (RestartType.PERMANENT, "shutdown", ActorStopped, False),
    ],
)
async def test_ask_never_hangs_whether_its_target_crashes_is_killed_or_stops(
    autojump_clock: Any,
    restart: RestartType,
    end: str,
    in_flight_cause: type[BaseException] | None,
    queued_answered: bool,
) -> None:
    handled: list[tuple[int, Any]] = []
    in_flight: list[outcome.Outcome[Any]] = []
    queued: list[outcome.Outcome[Any]] = []
    first = {"crash": Fail(RuntimeError("boom")), "stop": StopSelf("stopping")}.get(
        end, Hold(trio.Event())
    )
    root = one(handled, restart=restart, shutdown_timeout=1.0)
    with trio.fail_after(60.0):
        async with trio.open_nursery() as askers:  # the askers outlive the actor system
            async with open_actor_system(root) as system:
                w = system.ref("w")
                await ask_queued(askers, w, first, in_flight)
                await ask_queued(askers, w, Echo("queued"), queued)
                if end == "kill":
                    assert system.kill("w")
                await trio.sleep(1.0)  # past any restart delay
    [first_result] = in_flight
    [queued_result] = queued
    if in_flight_cause is None:
        assert first_result.unwrap() == "stopping"
    else:
        assert isinstance(first_result, outcome.Error)
        assert isinstance(first_result.error, ActorCrashed)
        assert isinstance(first_result.error.cause, in_flight_cause)
    if queued_answered:
        assert queued_result.unwrap() == "queued"
        assert handled[-1] == (2, Echo("queued"))
    else:
        assert isinstance(queued_result, outcome.Error)
        assert isinstance(queued_result.error, ActorStopped)
        assert Echo("queued") not in [m for _, m in handled]


async def test_ask_waiting_for_room_fails_stopped_when_its_target_stops_for_good(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    root = one(handled, restart=RestartType.TEMPORARY, mailbox_capacity=1)
    results: list[outcome.Outcome[Any]] = []
    with trio.fail_after(60.0):
        async with open_actor_system(root) as system:
            w = system.ref("w")
            w.tell_nowait(Hold(trio.Event()))
            await trio.testing.wait_all_tasks_blocked()
            w.tell_nowait(Echo("fills the mailbox"))
            async with trio.open_nursery() as nursery:
                await ask_queued(nursery, w, Echo("waits for room"), results)
                assert system.kill("w")
    [result] = results
    assert isinstance(result, outcome.Error)
    assert isinstance(result.error, ActorStopped)


async def test_asks_and_tells_after_the_system_ended_raise_actor_stopped(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(one(handled)) as system:
        w = system.ref("w")
    assert w.state is ActorState.STOPPED
    with pytest.raises(ActorStopped):
        await w.ask(Echo(1))
    with pytest.raises(ActorStopped):
        await w.tell(Echo(1))
    with pytest.raises(ActorStopped):
        w.tell_nowait(Echo(1))


async def test_unknown_names_raise_unknown_actor(autojump_clock: Any) -> None:
    async with open_actor_system(one([])) as system:
        with pytest.raises(UnknownActor, match=r"^no actor named 'nope'$"):
            system.ref("nope")
        with pytest.raises(LookupError):
            system.kill("nope")
        with pytest.raises(UnknownActor):
            system.inject_fault("nope")


# -- an actor's background loop ------------------------------------------------------------


class Ticker(Actor):
    """Counts ticks in a background loop; crashes it on request."""

    def __init__(self, ticks: list[int], error: Exception) -> None:
        self.ticks = ticks
        self.error = error
        self.broken = trio.Event()

    async def background(self) -> None:
        while True:
            with trio.move_on_after(1.0):
                await self.broken.wait()
            if self.broken.is_set():
                raise self.error
            self.ticks.append(self.ctx.incarnation)

    async def handle(self, message: Any) -> Any:
        if message == "break":
            self.broken.set()
        return len(self.ticks)


async def test_a_background_loop_runs_beside_the_mailbox_and_its_crash_restarts_the_actor(
    autojump_clock: Any,
) -> None:
    ticks: list[int] = []
    root = Supervisor(
        "root", [ChildSpec("t", lambda ctx: Ticker(ticks, RuntimeError("tick")))], backoff=NO_JITTER
    )
    async with open_actor_system(root) as system:
        t = system.ref("t")
        await trio.sleep(3.5)
        assert await t.ask("count") == 3
        await t.ask("break")
        await trio.sleep(2.5)
        assert ticks == [1, 1, 1, 2, 2]
        assert system.events.count("t", EventKind.CRASHED) == 1


async def test_a_crash_beside_a_background_loop_reports_the_error_itself(
    autojump_clock: Any,
) -> None:
    cause = RuntimeError("tick")
    root = Supervisor("root", [ChildSpec("t", lambda ctx: Ticker([], cause))], backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        await system.ref("t").ask("break")
        await trio.sleep(0.5)
        [crash] = [e for e in system.events.history if e.kind is EventKind.CRASHED]
        assert crash.error is cause
