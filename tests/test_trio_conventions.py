"""The embedded API keeps trio's conventions: every async call is a checkpoint.

As trio's own primitives: a call in a cancelled scope raises ``Cancelled``
and does nothing; every call lets other tasks run (a schedule point), so a
loop of calls never starves the rest of the program; a message waiting in a
subscription stays there when ``get`` is cancelled. Also: ``Store.aclose``
waits for the store to stop, a transaction's OOM is the public
``OutOfMemoryError``, and a ``Watch`` refuses once its block has ended.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.embedded import Store, Subscription
from kvmemo.errors import DisabledError, OutOfMemoryError, UnavailableError

Call = Callable[[Store], Awaitable[Any]]

# One call for every public async method of Store (test_every_async_method_is_listed
# keeps this table whole): each must pass trio.testing.assert_checkpoints.
STORE_CALLS: dict[str, Call] = {
    "append": lambda kv: kv.append("k", "v"),
    "bitfield": lambda kv: kv.bitfield("b", "GET", "u8", 0),
    "bitfield_ro": lambda kv: kv.bitfield_ro("b", "GET", "u8", 0),
    "bitop": lambda kv: kv.bitop("AND", "{b}d", "{b}s"),
    "bitpos": lambda kv: kv.bitpos("b", 1),
    "dbsize": lambda kv: kv.dbsize(),
    "decr": lambda kv: kv.decr("n"),
    "decrby": lambda kv: kv.decrby("n", 2),
    "delete": lambda kv: kv.delete("k"),
    "dump": lambda kv: kv.dump("k"),
    "echo": lambda kv: kv.echo("hello"),
    "execute": lambda kv: kv.execute("PING"),
    "execute_many": lambda kv: kv.execute_many(("PUBLISH", "c", "m"), ("PING",)),
    "exists": lambda kv: kv.exists("k"),
    "expire": lambda kv: kv.expire("k", 10),
    "expireat": lambda kv: kv.expireat("k", 2_000_000_000),
    "expiretime": lambda kv: kv.expiretime("k"),
    "flushall": lambda kv: kv.flushall(),
    "flushdb": lambda kv: kv.flushdb(),
    "get": lambda kv: kv.get("k"),
    "getdel": lambda kv: kv.getdel("k"),
    "getex": lambda kv: kv.getex("k"),
    "getrange": lambda kv: kv.getrange("k", 0, -1),
    "getset": lambda kv: kv.getset("k", "v"),
    "incr": lambda kv: kv.incr("n"),
    "incrby": lambda kv: kv.incrby("n", 2),
    "incrbyfloat": lambda kv: kv.incrbyfloat("f", 1.5),
    "info": lambda kv: kv.info("server"),
    "keys": lambda kv: kv.keys(),
    "lastsave": lambda kv: kv.lastsave(),
    "memory_stats": lambda kv: kv.memory_stats(),
    "memory_usage": lambda kv: kv.memory_usage("k"),
    "mget": lambda kv: kv.mget("a", "b"),
    "mset": lambda kv: kv.mset({"a": "1", "b": "2"}),
    "msetnx": lambda kv: kv.msetnx({"x1": "1", "x2": "2"}),
    "object_encoding": lambda kv: kv.object_encoding("k"),
    "object_freq": lambda kv: _disabled(kv.object_freq("k")),  # not under an LRU policy
    "object_idletime": lambda kv: kv.object_idletime("k"),
    "object_refcount": lambda kv: kv.object_refcount("k"),
    "persist": lambda kv: kv.persist("k"),
    "pexpire": lambda kv: kv.pexpire("k", 10_000),
    "pexpireat": lambda kv: kv.pexpireat("k", 2_000_000_000_000),
    "pexpiretime": lambda kv: kv.pexpiretime("k"),
    "ping": lambda kv: kv.ping(),
    "psetex": lambda kv: kv.psetex("k", 10_000, "v"),
    "pttl": lambda kv: kv.pttl("k"),
    "publish": lambda kv: kv.publish("c", "m"),
    "pubsub_channels": lambda kv: kv.pubsub_channels(),
    "pubsub_numpat": lambda kv: kv.pubsub_numpat(),
    "pubsub_numsub": lambda kv: kv.pubsub_numsub("c"),
    "restore": lambda kv: _restore(kv),
    "scan": lambda kv: kv.scan(0),
    "scan_iter": lambda kv: _drain(kv.scan_iter()),
    "set": lambda kv: kv.set("k", "v"),
    "setex": lambda kv: kv.setex("k", 10, "v"),
    "setnx": lambda kv: kv.setnx("k", "v"),
    "setrange": lambda kv: kv.setrange("k", 1, "x"),
    "strlen": lambda kv: kv.strlen("k"),
    "substr": lambda kv: kv.substr("k", 0, -1),
    "time": lambda kv: kv.time(),
    "touch": lambda kv: kv.touch("k"),
    "transaction": lambda kv: kv.transaction(("PING",), ("PUBLISH", "c", "m")),
    "ttl": lambda kv: kv.ttl("k"),
    "type": lambda kv: kv.type("k"),
    "unlink": lambda kv: kv.unlink("k"),
    # The context managers and the store's own lifecycle.
    "watch": lambda kv: _enter(kv.watch("k")),
    "watch_no_keys": lambda kv: _enter(kv.watch()),
    "watch_transaction": lambda kv: _watch_transaction(kv),
    "subscribe": lambda kv: _enter(kv.subscribe("c")),
    "subscribe_nothing": lambda kv: _enter(kv.subscribe()),
    "aclose": lambda kv: kv.aclose(),
}

# The other entries of STORE_CALLS, for each public async method they test.
EXTRA_CALLS = {
    "watch_no_keys",
    "watch_transaction",
    "subscribe_nothing",
}


_PAYLOAD: dict[str, bytes] = {}  # "k": DUMP of the value set by _open's store


async def _restore(kv: Store) -> Any:
    return await kv.restore("dst", 0, _PAYLOAD["k"], replace=True)


async def _setup(kv: Store) -> None:
    await kv.set("k", "value")
    payload = await kv.dump("k")
    assert payload is not None
    _PAYLOAD["k"] = payload


async def _disabled(call: Awaitable[Any]) -> None:
    with pytest.raises(DisabledError):
        await call


async def _drain(it: Any) -> list[Any]:
    return [x async for x in it]


async def _enter(manager: Any) -> None:
    async with manager:
        pass


async def _watch_transaction(kv: Store) -> Any:
    async with kv.watch("k") as w:
        with trio.testing.assert_checkpoints():
            return await w.transaction(("PING",))


def _public_async(cls: type) -> set[str]:
    names = set()
    for name, member in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if name in ("get", "set") and cls is Store:  # plain functions returning a coroutine
            names.add(name)
        elif inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            names.add(name)
        elif hasattr(member, "__wrapped__") and inspect.isasyncgenfunction(member.__wrapped__):
            names.add(name)  # an @asynccontextmanager (watch, subscribe)
    return names


def test_every_async_method_is_listed() -> None:
    assert _public_async(Store) == set(STORE_CALLS) - EXTRA_CALLS
    assert _public_async(Subscription) == set(SUBSCRIPTION_CALLS) - {"iterate"}


@pytest.mark.parametrize("name", sorted(STORE_CALLS))
async def test_every_store_method_is_a_checkpoint(name: str) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await _setup(kv)
        with trio.testing.assert_checkpoints():
            await STORE_CALLS[name](kv)


@pytest.mark.parametrize(
    "name", sorted(set(STORE_CALLS) - {"aclose", "watch_transaction", "scan_iter"})
)
async def test_every_store_method_in_a_cancelled_scope_raises_cancelled(name: str) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await _setup(kv)
        with trio.CancelScope() as cs:
            cs.cancel()
            await STORE_CALLS[name](kv)
            pytest.fail(f"{name} returned in a cancelled scope")
        assert cs.cancelled_caught
        assert await kv.get("k") == b"value"  # nothing was done


SUBSCRIPTION_CALLS: dict[str, Callable[[Subscription], Awaitable[Any]]] = {
    "subscribe": lambda sub: sub.subscribe("d"),
    "psubscribe": lambda sub: sub.psubscribe("p*"),
    "unsubscribe": lambda sub: sub.unsubscribe("c"),
    "punsubscribe": lambda sub: sub.punsubscribe(),
    "get": lambda sub: sub.get(),
    "iterate": lambda sub: sub.__anext__(),
}


@pytest.mark.parametrize("name", sorted(SUBSCRIPTION_CALLS))
async def test_every_subscription_method_is_a_checkpoint(name: str) -> None:
    async with kvmemo.open_store(shards=2) as kv, kv.subscribe("c") as sub:
        await kv.publish("c", "waiting")  # get: a message already there
        with trio.testing.assert_checkpoints():
            await SUBSCRIPTION_CALLS[name](sub)


@pytest.mark.parametrize("name", ["subscribe", "psubscribe", "unsubscribe", "punsubscribe"])
async def test_subscription_change_in_a_cancelled_scope_changes_nothing(name: str) -> None:
    async with kvmemo.open_store(shards=2) as kv, kv.subscribe("c", patterns=["q*"]) as sub:
        with trio.CancelScope() as cs:
            cs.cancel()
            await SUBSCRIPTION_CALLS[name](sub)
        assert cs.cancelled_caught
        assert (sub.channels, sub.patterns) == ([b"c"], [b"q*"])


@pytest.mark.parametrize("how", ["get", "iterate"])
async def test_cancelled_get_keeps_the_waiting_message(how: str) -> None:
    async with kvmemo.open_store(shards=2) as kv, kv.subscribe("c") as sub:
        await kv.publish("c", "m1")
        with trio.CancelScope() as cs:
            cs.cancel()
            await SUBSCRIPTION_CALLS[how](sub)
            pytest.fail("get returned in a cancelled scope")
        assert cs.cancelled_caught
        message = await sub.get()
        assert message.data == b"m1"


async def test_publish_loop_lets_the_subscriber_keep_up() -> None:
    received = 0
    ticks = 0
    count = 5000
    async with kvmemo.open_store(shards=2, pubsub_buffer_limit="1MiB") as kv:
        async with trio.open_nursery() as nursery, kv.subscribe("c") as sub:

            async def subscriber() -> None:
                nonlocal received
                async for _ in sub:
                    received += 1
                    if received == count:
                        return

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(subscriber)
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()  # both started (the ticker never blocks)
            for _ in range(count):
                await kv.publish("c", b"x" * 1000)  # 5 MB in all: 5x the buffer limit
            with trio.fail_after(5):
                while received < count:
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    assert received == count
    assert ticks >= count // 2


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda kv: kv.set("k", "new"), id="set"),
        pytest.param(lambda kv: kv.set("k", "new", ex=100), id="set-ex"),
        pytest.param(lambda kv: kv.incr("n"), id="incr"),
        pytest.param(lambda kv: kv.delete("k"), id="delete"),
        pytest.param(lambda kv: kv.flushall(), id="flushall"),
        pytest.param(lambda kv: kv.mset({"k": "new", "n": "7"}), id="mset"),
        pytest.param(lambda kv: kv.execute_many(("SET", "k", "new"), ("INCR", "n")), id="many"),
        pytest.param(lambda kv: kv.transaction(("SET", "k", "new")), id="transaction"),
        pytest.param(lambda kv: kv.execute("SET", "k", "new"), id="execute"),
    ],
)
async def test_write_in_a_cancelled_scope_is_not_applied(write: Call) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.mset({"k": "old", "n": "1"})
        with trio.move_on_after(0) as cs:
            await write(kv)
        assert cs.cancelled_caught
        assert await kv.mget("k", "n") == [b"old", b"1"]
        # Not queued either: what the store does next sees nothing of it.
        await trio.testing.wait_all_tasks_blocked()
        assert await kv.mget("k", "n") == [b"old", b"1"]


async def test_get_fast_path_in_a_cancelled_scope_raises() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "v")
        with trio.CancelScope() as cs:
            cs.cancel()
            await kv.get("k")
        assert cs.cancelled_caught


async def test_aclose_returns_once_the_data_directory_is_released(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        store = await kvmemo.serve(nursery, shards=2, data_dir=str(tmp_path))
        await store.set("k", "v")
        await store.aclose()
        assert all(actor["state"] != "running" for actor in store.actors())
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.get("k") == b"v"
        await store.aclose()  # idempotent
        with pytest.raises(UnavailableError):
            await store.get("k")


async def test_store_of_serve_is_an_async_context_manager(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with await kvmemo.serve(nursery, shards=2, data_dir=str(tmp_path)) as store:
            await store.set("k", "v")
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.get("k") == b"v"


async def test_aclose_in_the_open_store_block(tmp_path: Path) -> None:
    async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
        await kv.set("k", "v")
        await kv.aclose()
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as again:
            assert await again.get("k") == b"v"
        await kv.aclose()


async def _fill(kv: Store) -> bytes:
    big = b"x" * 50_000
    for i in range(100):
        try:
            await kv.set(f"fill:{i}", big)
        except OutOfMemoryError:
            return big
    pytest.fail("maxmemory never reached")


async def test_transaction_oom_is_the_public_error() -> None:
    async with kvmemo.open_store(maxmemory="1MiB", eviction_policy="noeviction") as kv:
        big = await _fill(kv)
        results = await kv.transaction(("SET", "t1", big), ("PING",))
        assert type(results[0]) is OutOfMemoryError
        assert results[0].kind == "OOM"
        assert results[0].data["maxmemory"] == 1 << 20
        assert results[0].data["used"] > 0
        assert results[1] == "PONG"
        (many,) = await kv.execute_many(("SET", "t1", big))
        assert type(many) is OutOfMemoryError
        assert many.message == results[0].message
        assert await kv.exists("t1") == 0


async def test_watch_after_its_block_raises() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        async with kv.watch("k") as w:
            pass
        with pytest.raises(RuntimeError, match=r"^this watch's block has ended$"):
            await w.transaction(("SET", "k", "v"))
        assert await kv.exists("k") == 0


async def test_second_transaction_of_a_watch_runs_unwatched_as_redis() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        async with kv.watch("k") as w:
            assert await w.transaction(("SET", "k", "1")) == ["OK"]
            await kv.set("k", "changed")  # would abort a watched transaction
            assert await w.transaction(("GET", "k")) == [b"changed"]


async def test_aborted_watch_transaction_unwatches_as_redis() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        async with kv.watch("k") as w:
            await kv.set("k", "changed")
            assert await w.transaction(("SET", "k", "1")) is None
            assert await w.transaction(("SET", "k", "2")) == ["OK"]
        assert await kv.get("k") == b"2"


async def test_cancelled_watch_transaction_keeps_the_watch() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        async with kv.watch("k") as w:
            with trio.CancelScope() as cs:
                cs.cancel()
                await w.transaction(("SET", "k", "1"))
            assert cs.cancelled_caught
            await kv.set("k", "changed")
            assert await w.transaction(("SET", "k", "1")) is None
        assert await kv.get("k") == b"changed"


async def test_calls_right_after_close_are_refused_with_no_checkpoint_between() -> None:
    # Was: until the actors had stopped (a checkpoint or more later), the fast
    # paths still served the store: get, set (a write!) and execute succeeded.
    async with trio.open_nursery() as nursery:
        kv = await kvmemo.serve(nursery, shards=2)
        await kv.set("a", "1")
        kv.close()
        for call in (
            lambda: kv.get("a"),
            lambda: kv.set("a", "2"),
            lambda: kv.execute("get", "a"),
            lambda: kv.mget("a"),
        ):
            with pytest.raises(kvmemo.UnavailableError, match="^the store is closed$"):
                await call()
        results = await kv.execute_many(("get", "a"))
        assert isinstance(results[0], kvmemo.UnavailableError)
