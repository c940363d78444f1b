"""The ask fast path: a reply slot parked on directly and rescheduled as its own
outcome, ask deadlines that leave nothing behind, group-commit replies delivered once.
"""

from __future__ import annotations

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
    """A system running one :class:`Worker` ``w``, recording into ``handled``."""
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
