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


class SyncJournal(Actor):
    """A group-commit actor whose commit runs synchronously unless told to defer."""

    group_commit = True
    expected_errors = (KeyError,)

    def __init__(self, gate: dict[str, Any], log: list[Any]) -> None:
        self.gate = gate
        self.log = log
        self.pending: list[Any] = []

    def handle_nowait(self, message: Any) -> Any:
        if message == "missing":
            raise KeyError(message)
        self.pending.append(message)
        return message

    async def handle(self, message: Any) -> Any:
        return self.handle_nowait(message)

    def commit_nowait(self) -> Any:
        if self.gate.get("defer"):
            return DEFER
        self.pending, batch = [], self.pending
        if self.gate.get("fail"):
            return OSError("disk")
        self.log.append(batch)
        return None

    async def commit(self) -> BaseException | None:
        self.gate["in_commit"].set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def _sync_root(gate: dict[str, Any], log: list[Any]) -> Supervisor:
    return Supervisor("root", [ChildSpec("j", start=lambda ctx: SyncJournal(gate, log))])


async def _outcomes(slots: list[Any]) -> list[Any]:
    out: list[Any] = []
    for slot in slots:
        try:
            out.append(("ok", await slot.wait()))
        except ActorCrashed as exc:
            out.append(("crashed", exc.handler_started))
        except (OSError, KeyError) as exc:
            out.append((type(exc).__name__,))
    return out


async def test_commit_nowait_delivers_or_fails_the_batch_without_commit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate: dict[str, Any] = {"in_commit": trio.Event()}
    log: list[Any] = []
    async with open_actor_system(_sync_root(gate, log)) as system:
        ref = system.ref("j")
        slots = [ref.ask_nowait(m) for m in ("a", "missing", "b")]
        assert await _outcomes(slots) == [("ok", "a"), ("KeyError",), ("ok", "b")]
        assert log == [["a", "b"]]
        gate["fail"] = True
        slots = [ref.ask_nowait(m) for m in ("c", "missing", "d")]
        assert await _outcomes(slots) == [("OSError",), ("KeyError",), ("OSError",)]
        assert not gate["in_commit"].is_set()  # the async commit never ran


async def test_a_kill_during_a_deferred_commit_fails_the_batch_as_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate: dict[str, Any] = {"in_commit": trio.Event(), "defer": True}
    async with open_actor_system(_sync_root(gate, [])) as system:
        ref = system.ref("j")
        slots = [ref.ask_nowait(m) for m in ("a", "missing", "b")]
        await gate["in_commit"].wait()
        system.kill("j")
        assert await _outcomes(slots) == [("crashed", True)] * 3


async def test_a_fault_after_a_delivered_batch_fails_only_its_message_as_not_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate: dict[str, Any] = {"in_commit": trio.Event()}
    async with open_actor_system(_sync_root(gate, [])) as system:
        ref = system.ref("j")
        assert await ref.ask("a") == "a"
        system.inject_fault("j")
        slots = [ref.ask_nowait(m) for m in ("b", "c")]
        assert await _outcomes(slots) == [("crashed", False), ("ok", "c")]
