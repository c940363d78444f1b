"""The synchronous handler fast path (``Actor.handle_nowait``).

An actor that overrides ``handle_nowait`` must behave exactly as if every
message went through ``handle``: same order, same replies, same treatment of
expected errors, crashes and stops. Messages it answers with ``DEFER`` go
through ``handle`` in their turn.
"""

from __future__ import annotations

from typing import Any

import outcome
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_actors_messaging import NO_JITTER, Echo, Fail, Hold, StopSelf, Worker, ask_queued

from actors import (
    DEFER,
    Actor,
    ActorContext,
    ActorCrashed,
    ChildSpec,
    EventKind,
    Supervisor,
    open_actor_system,
)


class SyncWorker(Worker):
    """``Worker`` with every message but ``Hold`` handled synchronously."""

    def __init__(self, handled: list[tuple[int, Any]], sync: list[Any]) -> None:
        super().__init__(handled)
        self.sync = sync

    def handle_nowait(self, message: Any) -> Any:
        if isinstance(message, Hold):
            return DEFER
        self.sync.append(message)
        self.handled.append((self.ctx.incarnation, message))
        if isinstance(message, Echo):
            return message.value
        if isinstance(message, Fail):
            raise message.error
        if isinstance(message, StopSelf):
            self.ctx.stop()
            return message.value
        raise AssertionError(f"unexpected message {message!r}")


def sync_root(handled: list[tuple[int, Any]], sync: list[Any]) -> Supervisor:
    def start(ctx: ActorContext) -> Actor:
        return SyncWorker(handled, sync)

    return Supervisor("root", [ChildSpec("w", start)], backoff=NO_JITTER)


async def test_sync_and_deferred_messages_keep_mailbox_order(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    sync: list[Any] = []
    async with open_actor_system(sync_root(handled, sync)) as system:
        w = system.ref("w")
        release = trio.Event()
        replies: list[outcome.Outcome[Any]] = []
        async with trio.open_nursery() as nursery:
            await ask_queued(nursery, w, Echo(0), replies)
            await ask_queued(nursery, w, Hold(release, "held"), replies)
            for i in range(1, 4):
                await ask_queued(nursery, w, Echo(i), replies)
            assert [m for _, m in handled] == [Echo(0), Hold(release, "held")]
            release.set()
        assert sorted(map(str, (r.unwrap() for r in replies))) == ["0", "1", "2", "3", "held"]
        assert [m for _, m in handled][2:] == [Echo(1), Echo(2), Echo(3)]
        assert sync == [Echo(0), Echo(1), Echo(2), Echo(3)]  # Hold went through handle


async def test_an_expected_error_of_the_sync_handler_answers_and_the_actor_lives(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(sync_root(handled, [])) as system:
        w = system.ref("w")
        with pytest.raises(KeyError):
            await w.ask(Fail(KeyError("nope")))
        assert await w.ask(Echo(1)) == 1
        assert system.events.count("w", EventKind.RESTARTED) == 0


async def test_a_crash_in_the_sync_handler_fails_its_asker_and_restarts(
    autojump_clock: Any,
) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(sync_root(handled, [])) as system:
        w = system.ref("w")
        replies: list[outcome.Outcome[Any]] = []
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            await ask_queued(nursery, w, Hold(release), replies)
            await ask_queued(nursery, w, Fail(RuntimeError("boom")), replies)
            for i in range(3):
                await ask_queued(nursery, w, Echo(i), replies)
            release.set()
        crashed = [r for r in replies if isinstance(r, outcome.Error)]
        assert len(crashed) == 1
        with pytest.raises(ActorCrashed) as caught:
            crashed[0].unwrap()
        assert caught.value.handler_started
        values = [r.unwrap() for r in replies if isinstance(r, outcome.Value)]
        assert sorted(values, key=str) == [0, 1, 2, None]
        assert [inc for inc, m in handled if isinstance(m, Echo)] == [2, 2, 2]
        assert system.events.count("w", EventKind.RESTARTED) == 1


async def test_a_stop_from_the_sync_handler_stops_after_its_reply(autojump_clock: Any) -> None:
    handled: list[tuple[int, Any]] = []
    async with open_actor_system(sync_root(handled, [])) as system:
        w = system.ref("w")
        assert await w.ask(StopSelf("bye")) == "bye"
        await trio.testing.wait_all_tasks_blocked()
        # A permanent child stopped normally is restarted; the reply came first.
        assert handled == [(1, StopSelf("bye"))]
        assert await w.ask(Echo(7)) == 7


messages = st.lists(
    st.one_of(
        st.integers(0, 100).map(Echo),
        st.sampled_from(["a", "b"]).map(lambda k: Fail(KeyError(k))),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(messages)
def test_the_fast_path_answers_exactly_as_the_async_handler(batch: list[Any]) -> None:
    """Queue the same messages to a ``Worker`` and a ``SyncWorker``: same replies, same order."""

    async def run(sync: bool) -> list[tuple[Any, str]]:
        handled: list[tuple[int, Any]] = []

        def start(ctx: ActorContext) -> Actor:
            return SyncWorker(handled, []) if sync else Worker(handled)

        root = Supervisor("root", [ChildSpec("w", start)], backoff=NO_JITTER)
        async with open_actor_system(root) as system:
            w = system.ref("w")
            slots = [w.ask_nowait(m) for m in batch]  # one drained batch
            out = []
            for slot in slots:
                try:
                    out.append((await slot.wait(), "ok"))
                except KeyError as exc:
                    out.append((exc.args[0], "error"))
            assert [m for _, m in handled] == batch
            return out

    assert trio.run(run, True) == trio.run(run, False)
