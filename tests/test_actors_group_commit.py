"""Group commit: replies of a drained batch wait for the actor's commit."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    DEFER,
    Actor,
    ActorContext,
    ActorCrashed,
    ChildSpec,
    Supervisor,
    open_actor_system,
)


class Journal(Actor):
    group_commit = True
    expected_errors = (KeyError,)

    def __init__(self, log: list[Any], fail: list[BaseException]) -> None:
        self.log = log
        self.fail = fail
        self.pending: list[Any] = []

    async def handle(self, message: Any) -> Any:
        if message == "missing":
            raise KeyError(message)
        if message == "crash":
            raise RuntimeError("boom")
        self.pending.append(message)
        return message

    async def commit(self) -> BaseException | None:
        self.log.append(list(self.pending))
        self.pending.clear()
        await trio.sleep(0.01)  # a sync to disk
        return self.fail.pop() if self.fail else None


class SyncJournal(Journal):
    """The same journal with the synchronous fast path (``handle_nowait``):
    its replies must be held for the commit all the same."""

    def handle_nowait(self, message: Any) -> Any:
        if message == "crash":
            return DEFER  # through handle, which crashes
        if message == "missing":
            raise KeyError(message)
        self.pending.append(message)
        return message


@pytest.fixture(params=[Journal, SyncJournal], ids=["async", "sync"])
def journal_class(request: pytest.FixtureRequest) -> type[Journal]:
    cls: type[Journal] = request.param
    return cls


def journal_system(
    log: list[Any], fail: list[BaseException], cls: type[Journal] = Journal
) -> Supervisor:
    def start(ctx: ActorContext) -> Actor:
        return cls(log, fail)

    return Supervisor("root", [ChildSpec("journal", start=start)])


async def test_replies_of_one_drained_batch_are_delivered_after_one_commit(
    autojump_clock: trio.testing.MockClock, journal_class: type[Journal]
) -> None:
    log: list[Any] = []
    async with open_actor_system(journal_system(log, [], journal_class)) as system:
        ref = system.ref("journal")
        slots = [ref.ask_nowait(i) for i in range(5)]
        assert not any(s.done for s in slots)
        results = [await s.wait() for s in slots]
    assert results == [0, 1, 2, 3, 4]
    assert log[0] == [0, 1, 2, 3, 4]  # one commit for the whole batch


async def test_a_failed_commit_fails_the_successful_replies_of_its_batch_only(
    autojump_clock: trio.testing.MockClock, journal_class: type[Journal]
) -> None:
    log: list[Any] = []
    root = journal_system(log, [OSError("disk full")], journal_class)
    async with open_actor_system(root) as system:
        ref = system.ref("journal")
        slots = [ref.ask_nowait(m) for m in ("a", "missing", "b")]
        outcomes = []
        for slot in slots:
            try:
                outcomes.append(await slot.wait())
            except (OSError, KeyError) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes == ["OSError", "KeyError", "OSError"]
        assert await ref.ask("c") == "c"  # the actor lives on


async def test_a_crash_fails_held_replies_instead_of_leaving_them_hanging(
    autojump_clock: trio.testing.MockClock, journal_class: type[Journal]
) -> None:
    log: list[Any] = []
    async with open_actor_system(journal_system(log, [], journal_class)) as system:
        ref = system.ref("journal")
        slots = [ref.ask_nowait(m) for m in ("a", "crash", "b")]
        with trio.fail_after(5):
            with pytest.raises(ActorCrashed) as first:
                await slots[0].wait()
            assert first.value.handler_started
            with pytest.raises(ActorCrashed):
                await slots[1].wait()
            assert await slots[2].wait() == "b"  # queued behind: handled after the restart
