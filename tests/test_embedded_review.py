"""The embedded API as a trio application sees it: errors, cancellation, close, batches."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.errors import UnavailableError, UnknownCommandError

CLOSED = r"^the store is closed$"


async def test_a_keyboard_interrupt_in_the_block_reaches_the_caller_as_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Not a BaseExceptionGroup around it: ``except KeyboardInterrupt`` must
    # still catch a Ctrl-C that arrives while the block runs.

    async def interrupted() -> None:
        async with kvmemo.open_store(shards=2) as kv:
            await kv.set("a", "1")
            raise KeyboardInterrupt

    with trio.fail_after(5), pytest.raises(KeyboardInterrupt):
        await interrupted()


async def test_an_enclosing_cancellation_reaches_the_caller_as_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[type[BaseException]] = []
    with trio.fail_after(5), trio.CancelScope() as scope:
        try:
            async with kvmemo.open_store(shards=2) as kv:
                await kv.set("a", "1")
                scope.cancel()
                await trio.sleep_forever()
        except BaseException as exc:
            seen.append(type(exc))
            raise
    assert scope.cancelled_caught
    assert seen == [trio.Cancelled]


async def test_an_error_of_the_block_during_a_cancellation_is_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Without the store, the ValueError replaces the Cancelled and leaves the
    # cancelled scope; the store's own Cancelled tasks must not let that
    # scope swallow it.

    async def failing_cleanup() -> None:
        with trio.move_on_after(1):
            async with kvmemo.open_store(shards=2):
                try:
                    await trio.sleep_forever()
                finally:
                    raise ValueError("cleanup failed")

    with trio.fail_after(5), pytest.raises(ValueError, match="cleanup failed"):
        await failing_cleanup()


async def test_close_in_the_block_stops_the_store_and_not_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    steps: list[str] = []
    with trio.fail_after(5):
        async with kvmemo.open_store(shards=2) as kv:
            await kv.set("a", "1")
            kv.close()
            await trio.testing.wait_all_tasks_blocked()  # the actors stop
            steps.append("after close")
            assert {a["state"] for a in kv.actors()} == {"stopped"}
            with pytest.raises(UnavailableError, match=CLOSED):
                await kv.get("a")
            with pytest.raises(UnavailableError, match=CLOSED):
                await kv.mset({"a": "1", "b": "2"})
            await trio.sleep(1)  # the block's own checkpoints are not cancelled
            steps.append("end of block")
            kv.close()  # twice: nothing more happens
    assert steps == ["after close", "end of block"]


async def test_close_ends_a_subscription_read_in_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    with trio.fail_after(5):
        async with kvmemo.open_store(shards=2) as kv, trio.open_nursery() as nursery:

            async def listen(*, task_status: trio.TaskStatus[None]) -> None:
                async with kv.subscribe("ch") as sub:
                    task_status.started()
                    async for message in sub:
                        received.append(message.data)

            await nursery.start(listen)
            assert await kv.publish("ch", "one") == 1
            kv.close()  # the listener reads what was queued, then its loop ends
    assert received == [b"one"]


async def test_batches_and_transactions_take_bytes_names_as_the_client_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        results = await kv.execute_many((b"SET", "a", "1"), (b"incr", "a"), (b"get", "a"))
        assert results == ["OK", 2, b"2"]
        assert await kv.transaction((b"INCR", "a"), (b"GET", "a")) == [3, b"3"]
        async with kv.watch("a") as w:
            assert await w.transaction((b"SET", "a", "4")) == ["OK"]
        assert await kv.get("a") == b"4"


async def test_an_empty_call_is_an_unknown_command_not_an_index_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        results = await kv.execute_many(("set", "a", "1"), (), ("get", "a"))
        assert results[0] == "OK"
        assert isinstance(results[1], UnknownCommandError)
        assert results[2] == b"1"
        with pytest.raises(UnknownCommandError) as caught:
            await kv.transaction(("set", "a", "2"), ())
        assert caught.value.data["index"] == 1
        assert await kv.get("a") == b"1"  # refused whole: nothing ran


async def test_a_config_and_settings_together_are_refused_not_half_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = kvmemo.StoreConfig(shards=2)
    with pytest.raises(TypeError, match=r"not both \(got config and shards\)"):
        async with kvmemo.open_store(config, shards=8):
            pass  # pragma: no cover - refused before the block
    async with trio.open_nursery() as nursery:
        with pytest.raises(TypeError, match="not both"):
            await kvmemo.serve(nursery, config, maxmemory="1MiB")
        assert not nursery.child_tasks  # nothing started
    async with kvmemo.open_store(config) as kv:
        assert (await kv.info("server"))["server"]["shards"] == 2


async def test_mset_refuses_items_that_are_not_pairs_and_sets_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Was: the items were flattened as they came, so [("a", "1", "b"), ("c",)]
    # set a=1 and b=c, and the string "ab" set a=b.
    async with kvmemo.open_store(shards=2) as kv:
        bad: list[object] = [[("a", "1", "b"), ("c",)], "ab", b"ab", [1, 2], [("a", "1"), ("b",)]]
        for items in bad:
            for method in (kv.mset, kv.msetnx):
                with pytest.raises(TypeError, match=r"^msetn?x?: expected "):
                    await method(items)  # type: ignore[arg-type]
        assert await kv.dbsize() == 0
        assert await kv.mset([["a", "1"], ("b", "2")]) == "OK"  # lists are pairs too
        assert await kv.msetnx({"c": "3"}) == 1
        assert await kv.mget("a", "b", "c") == [b"1", b"2", b"3"]
