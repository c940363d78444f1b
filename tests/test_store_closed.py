"""A store whose block has ended: every call is refused clearly, nothing waits forever."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.embedded import Store
from kvmemo.errors import UnavailableError

CLOSED = r"^the store is closed$"


def _calls(kv: Store) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    async def watch() -> None:
        async with kv.watch("a"):
            pass

    async def subscribe() -> None:
        async with kv.subscribe("ch"):
            pass

    return [
        ("get", lambda: kv.get("a")),
        ("set", lambda: kv.set("a", "2")),
        ("set ex", lambda: kv.set("a", "2", ex=5)),
        ("execute get", lambda: kv.execute("get", "a")),
        ("incr", lambda: kv.incr("n")),
        ("mget", lambda: kv.mget("a", "b")),
        ("mset", lambda: kv.mset({"a": "1", "b": "2"})),
        ("msetnx", lambda: kv.msetnx({"x": "1", "y": "2"})),
        ("dbsize", kv.dbsize),
        ("info", kv.info),
        ("scan", lambda: kv.scan(0)),
        ("keys", lambda: kv.keys("*")),
        ("flushall", kv.flushall),
        ("rename", lambda: kv.execute("rename", "a", "z")),
        ("publish", lambda: kv.publish("ch", "m")),
        ("transaction", lambda: kv.transaction(("set", "a", "3"))),
        ("watch", watch),
        ("subscribe", subscribe),
    ]


async def test_every_call_after_the_block_is_refused_as_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("a", "1")
    for name, call in _calls(kv):
        with trio.fail_after(5), pytest.raises(UnavailableError, match=CLOSED) as caught:
            await call()
        assert caught.value.kind == "UNAVAILABLE", name
        assert "retry_after_ms" not in caught.value.data, name  # a retry never helps
    results = await kv.execute_many(("get", "a"), ("set", "b", "1"), ("dbsize",))
    assert [str(r) for r in results] == ["the store is closed"] * 3
    assert all(isinstance(r, UnavailableError) for r in results)


async def test_a_store_stopped_by_close_refuses_as_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        kv = await kvmemo.serve(nursery, shards=2)
        await kv.set("a", "1")
        kv.close()
    with pytest.raises(UnavailableError, match=CLOSED):
        await kv.get("a")
    with pytest.raises(UnavailableError, match=CLOSED):
        await kv.info()


async def test_a_listener_outside_the_block_gets_its_messages_then_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    subscribed = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async with kvmemo.open_store(shards=2) as kv:

                async def listen() -> None:
                    async with kv.subscribe("ch") as sub:
                        subscribed.set()
                        async for message in sub:
                            received.append(message.data)

                nursery.start_soon(listen)
                await subscribed.wait()
                assert await kv.publish("ch", "one") == 1
                assert await kv.publish("ch", "two") == 1
            # The store is closed; the listener had not read yet (it never
            # ran since the publishes): it reads both, then its loop ends.
    assert received == [b"one", b"two"]


async def test_a_subscriber_waiting_on_a_closed_store_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        kv = await kvmemo.serve(nursery, shards=2)
        hub = kv.engine.pubsub
        subscriber = hub.subscriber()
        subscriber.subscribe([b"ch"])
        idle = hub.subscriber()  # no subscription at all: waits just the same

        async def wait_for(sub: Any) -> None:
            with trio.fail_after(5):
                await sub.wait()
                with pytest.raises(trio.EndOfChannel):
                    await sub.get()

        nursery.start_soon(wait_for, subscriber)
        nursery.start_soon(wait_for, idle)
        await trio.testing.wait_all_tasks_blocked()
        kv.close()
    assert hub.channels() == []
    assert hub.closed
    subscriber.close()  # the owner's close after the hub's: still fine
    assert subscriber.count == 0
