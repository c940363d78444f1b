"""The ask fast path: a reply slot parked on directly and rescheduled as its own
outcome, ask deadlines that leave nothing behind, group-commit replies delivered once.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from test_actors_messaging import Echo, Fail, Hold

from actors import (
    Actor,
    ActorContext,
    ActorRef,
    ActorSystem,
    AskTimeout,
    ChildSpec,
    ReplySlot,
    Supervisor,
    open_actor_system,
)
from actors.deadlines import Deadlines, clock_reader


class Worker(Actor):
    expected_errors = (LookupError,)

    def __init__(self, handled: list[Any]) -> None:
        self.handled = handled

    async def handle(self, message: Any) -> Any:
        self.handled.append(message)
        if isinstance(message, Echo):
            return message.value
        if isinstance(message, Fail):
            raise message.error
        if isinstance(message, Hold):
            await message.release.wait()
            return message.value
        raise AssertionError(f"unexpected message {message!r}")


class CommitWorker(Worker):
    group_commit = True

    def __init__(self, handled: list[Any], commits: list[int]) -> None:
        super().__init__(handled)
        self.commits = commits

    async def commit(self) -> BaseException | None:
        self.commits.append(len(self.handled))
        return None


def one(factory: Callable[[ActorContext], Actor]) -> Supervisor:
    return Supervisor("root", [ChildSpec("w", factory)])


@asynccontextmanager
async def worker(handled: list[Any]) -> AsyncIterator[tuple[ActorSystem, ActorRef]]:
    """A system running one :class:`Worker` ``w``, recording into ``handled``.

    Bounded: a sweeper left asleep past a deadline fails the test, not hangs it.
    """
    with trio.fail_after(60):
        async with open_actor_system(one(lambda ctx: Worker(handled))) as system:
            yield system, system.ref("w")


async def test_an_exception_object_returned_as_a_reply_is_returned_not_raised(
    autojump_clock: Any,
) -> None:
    handled: list[Any] = []
    async with worker(handled) as (system, w):
        error = KeyError("a value, not an error")
        assert await w.ask(Echo(error)) is error
        assert await w.ask(Echo(error), timeout=1.0) is error
        with pytest.raises(KeyError) as info:
            await w.ask(Fail(KeyError("raised")), timeout=1.0)
        assert info.value.args == ("raised",)
        slot = w.ask_nowait(Echo(error))
        assert await slot.wait() is error
        assert slot.result() is error  # a slot can still be read after it was awaited


async def test_a_cancelled_ask_with_a_timeout_unregisters_its_deadline_and_drops_the_reply(
    autojump_clock: Any,
) -> None:
    handled: list[Any] = []
    async with worker(handled) as (system, w):
        release = trio.Event()
        with trio.move_on_after(1.0) as scope:
            await w.ask(Hold(release, "abandoned"), timeout=10.0)
        assert scope.cancelled_caught
        assert len(system.deadlines) == 0
        release.set()
        assert await w.ask(Echo("next"), timeout=10.0) == "next"  # not the dropped reply
        assert handled[-2:] == [Hold(release, "abandoned"), Echo("next")]
        await trio.sleep(20.0)  # past the abandoned deadline: nothing is failed or woken
        assert len(system.deadlines) == 0


async def test_asks_with_a_new_timeout_each_leave_no_deadline_structure_behind(
    autojump_clock: Any,
) -> None:
    handled: list[Any] = []
    async with worker(handled) as (system, w):
        for i in range(50):
            assert await w.ask(Echo(i), timeout=1.0 + i / 100) == i
        release = trio.Event()
        with pytest.raises(AskTimeout):
            await w.ask(Hold(release), timeout=0.5)
        release.set()
        await trio.sleep(5.0)  # past every deadline: the sweeper ran since
        assert len(system.deadlines) == 0
        # White box: one FIFO per distinct timeout would grow without bound.
        assert system.deadlines._fifos == {}


async def test_a_parked_asker_gets_ask_timeout_and_a_later_reply_is_ignored(
    autojump_clock: Any,
) -> None:
    handled: list[Any] = []
    async with worker(handled) as (system, w):
        release = trio.Event()
        asked_at = trio.current_time()
        with pytest.raises(AskTimeout):
            await w.ask(Hold(release, "late"), timeout=2.0)
        assert trio.current_time() == pytest.approx(asked_at + 2.0)
        release.set()
        await trio.testing.wait_all_tasks_blocked()  # the late reply went to a failed slot
        assert await w.ask(Echo("after")) == "after"


def test_a_reply_slot_completes_once_and_reads_as_its_outcome() -> None:
    slot = ReplySlot()
    with pytest.raises(RuntimeError, match=r"^no reply yet$"):
        slot.result()
    slot.set(1)
    slot.set(2)
    slot.fail(ValueError("ignored"))
    assert slot.done
    assert slot.result() == slot.unwrap() == 1
    failed = ReplySlot()
    failed.fail(ValueError("boom"))
    failed.set(3)
    for _ in range(2):  # any number of reads
        with pytest.raises(ValueError, match=r"^boom$"):
            failed.unwrap()


async def test_group_commit_delivers_each_batch_once_and_keeps_nothing_held(
    autojump_clock: Any,
) -> None:
    handled: list[Any] = []
    commits: list[int] = []
    async with open_actor_system(one(lambda ctx: CommitWorker(handled, commits))) as system:
        w = system.ref("w")
        for batch in range(3):
            slots = [w.ask_nowait(Echo((batch, i))) for i in range(4)]
            assert [await s.wait() for s in slots] == [(batch, i) for i in range(4)]
        assert commits == [4, 8, 12]  # one commit per drained batch
        cell = system._cell("w")
        assert cell.held == []


# -- ask deadlines: the inlined registration, the sweeper's wake-ups, the clock reader ----


@asynccontextmanager
async def workers(*names: str, within: float = 60.0) -> AsyncIterator[ActorSystem]:
    """A system running one :class:`Worker` per name (what each handled is not checked).

    Bounded by ``within`` seconds: a sweeper left asleep past a deadline
    fails the test, not hangs it.
    """
    children = [ChildSpec(n, lambda ctx: Worker([])) for n in names]
    with trio.fail_after(within):
        async with open_actor_system(Supervisor("root", children)) as system:
            yield system


async def test_asks_sharing_a_timeout_fifo_time_out_exactly_and_each_names_its_actor(
    autojump_clock: Any,
) -> None:
    # The first ask opens the FIFO of timeout 3.0 (Deadlines.add); the later
    # ones find it non-empty and register inline (ActorRef.ask), whatever the
    # actor asked: each deadline and each AskTimeout's actor is its own.
    async with workers("a", "b") as system:
        release = trio.Event()
        timed_out: list[tuple[str, float, float]] = []

        async def ask(name: str) -> None:
            asked_at = trio.current_time()
            with pytest.raises(AskTimeout) as info:
                await system.ref(name).ask(Hold(release), timeout=3.0)
            timed_out.append((info.value.actor, info.value.timeout, trio.current_time() - asked_at))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "a")
            await trio.testing.wait_all_tasks_blocked()
            assert [len(fifo) for fifo, _, _ in system.deadlines._fifos.values()] == [1]
            await trio.sleep(1.0)
            nursery.start_soon(ask, "b")
            await trio.sleep(0.5)
            nursery.start_soon(ask, "a")
            await trio.testing.wait_all_tasks_blocked()
            assert [len(fifo) for fifo, _, _ in system.deadlines._fifos.values()] == [3]
        assert [(actor, timeout) for actor, timeout, _ in timed_out] == [
            ("a", 3.0),
            ("b", 3.0),
            ("a", 3.0),
        ]
        assert [waited for _, _, waited in timed_out] == pytest.approx([3.0, 3.0, 3.0])
        release.set()
        await trio.sleep(5.0)
        assert system.deadlines._fifos == {}


async def test_the_sweeper_wakes_for_an_earlier_deadline_even_in_an_emptied_fifo(
    autojump_clock: Any,
) -> None:
    async with workers("held", "quick") as system:
        held = system.ref("held")
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: held.ask(Hold(release), timeout=100.0))
            await trio.testing.wait_all_tasks_blocked()  # the sweeper sleeps until +100
            # A FIFO of timeout 1.0, emptied by its reply (dropped or not yet):
            assert await system.ref("quick").ask(Echo("at once"), timeout=1.0) == "at once"
            for _ in range(2):
                asked_at = trio.current_time()
                with pytest.raises(AskTimeout):
                    await held.ask(Echo("queued behind the held message"), timeout=1.0)
                assert trio.current_time() == pytest.approx(asked_at + 1.0)
            release.set()


async def test_the_sweeper_is_woken_only_by_a_deadline_earlier_than_its_target(
    autojump_clock: Any,
) -> None:
    deadlines = Deadlines()  # no sweeper task: one pass of its loop is done by hand

    def sweep() -> None:
        deadlines._sleeping_until = deadlines._expire(trio.current_time())
        deadlines._wake = trio.Event()

    sweep()
    assert deadlines._sleeping_until == math.inf
    start = trio.current_time()
    first, second, third = ReplySlot(), ReplySlot(), ReplySlot()
    fifo = deadlines.add(first, 1.0, "w")
    assert deadlines._wake.is_set()  # earlier than "never"
    sweep()
    assert deadlines._sleeping_until == start + 1.0
    await trio.sleep(0.5)
    assert deadlines.add(second, 1.0, "w") is fifo
    assert not deadlines._wake.is_set()  # behind the head: the sweeper's target stands
    assert list(fifo.values()) == [(start + 1.0, "w"), (start + 1.5, "w")]
    fifo.pop(first)
    fifo.pop(second)
    assert deadlines.add(third, 1.0, "w") is fifo  # emptied, not yet dropped
    assert not deadlines._wake.is_set()  # later than the target still
    deadlines.add(ReplySlot(), 20.0, "w")  # a new FIFO, later than the target
    assert not deadlines._wake.is_set()
    early = ReplySlot()
    deadlines.add(early, 0.25, "v")  # a new FIFO, earlier than the target
    assert deadlines._wake.is_set()
    sweep()
    assert deadlines._sleeping_until == start + 0.75
    await trio.sleep(0.25)
    sweep()  # fails the overdue slot once, drops its emptied FIFO
    with pytest.raises(AskTimeout) as info:
        early.result()
    assert (info.value.actor, info.value.timeout) == ("v", 0.25)
    assert sorted(deadlines._fifos) == [1.0, 20.0]
    assert deadlines._sleeping_until == start + 1.5
    assert len(deadlines) == 2


async def test_before_the_sweeper_runs_deadlines_read_trio_current_time(
    autojump_clock: Any,
) -> None:
    deadlines = Deadlines()
    assert deadlines._clock == (trio.current_time, 0.0)
    fifo = deadlines.add(ReplySlot(), 2.0, "w")
    assert list(fifo.values()) == [(trio.current_time() + 2.0, "w")]


async def test_under_the_system_clock_deadlines_are_read_fast_and_agree_with_trio() -> None:
    # The real clock (no autojump_clock): asks register perf_counter() +
    # the clock's offset + timeout, which must equal trio.current_time() + timeout.
    async with workers("w", within=10.0) as system:
        assert system.deadlines._clock == (
            time.perf_counter,
            trio.lowlevel.current_clock().offset,  # type: ignore[attr-defined]
        )
        w = system.ref("w")
        release = trio.Event()
        bounds: list[tuple[float, float]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # the first through Deadlines.add, the others inline
                before = trio.current_time()
                nursery.start_soon(lambda: w.ask(Hold(release), timeout=30.0))
                await trio.testing.wait_all_tasks_blocked()
                bounds.append((before + 30.0, trio.current_time() + 30.0))
            ((fifo, _, _),) = system.deadlines._fifos.values()
            deadlines = [deadline for deadline, _ in fifo.values()]
            assert len(deadlines) == 3
            for deadline, (low, high) in zip(deadlines, bounds, strict=True):
                assert low <= deadline <= high
            release.set()
        # Real timeouts, the second through the inline path: never early.
        release = trio.Event()

        async def held_ask() -> None:
            with pytest.raises(AskTimeout):
                await w.ask(Hold(release), timeout=0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held_ask)
            await trio.testing.wait_all_tasks_blocked()
            asked_at = trio.current_time()
            with pytest.raises(AskTimeout):
                await w.ask(Echo("behind the held message"), timeout=0.05)
            assert trio.current_time() >= asked_at + 0.05
        release.set()
        assert await w.ask(Echo("after"), timeout=5.0) == "after"


class SystemClock(trio.abc.Clock):
    """A clock that looks like trio's by name and offset, but is not trio's."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self.offset + time.perf_counter()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - self.current_time()


class DriftingSystemClock(SystemClock):
    def current_time(self) -> float:
        return self.offset + 2 * time.perf_counter()


DriftingSystemClock.__name__ = "SystemClock"
DriftingSystemClock.__module__ = "trio._core._somewhere_new"


async def test_the_fast_clock_reader_is_used_only_for_a_clock_proven_to_be_trios() -> None:
    real = trio.lowlevel.current_clock()
    now, offset = clock_reader(real)
    assert (now, offset) == (time.perf_counter, real.offset)  # type: ignore[attr-defined]
    before = trio.current_time()
    assert before <= now() + offset <= trio.current_time()
    lookalikes = [
        trio.testing.MockClock(rate=1.0),
        SystemClock(1000.0),  # the same reading, but not trio's class
        DriftingSystemClock(1000.0),  # trio's name and package, another reading
    ]
    for clock in lookalikes:
        assert clock_reader(clock) == (clock.current_time, 0.0)
