"""Transactions (MULTI/EXEC) and WATCH in the engine and the embedded API.

A transaction runs its commands as one step across shards: nobody sees part
of it, nobody slips a command between its commands, a failing command gives
its error in place while the others run, and WATCH aborts it when a watched
key changed. Time is a MockClock.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from test_engine_atomic import keep_busy, key_on, spread_keys, wait_running

import kvmemo
from kvmemo.engine.engine import KVEngine, shard_name
from kvmemo.errors import KVMemoError
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import ShardStore


async def watched_keys(engine: KVEngine) -> int:
    """Keys some client watches, over every shard (read inside each shard)."""
    total = 0
    assert engine.system is not None
    for i in range(engine.config.shards):
        ref = engine.system.ref(shard_name(i))
        total += await ref.ask(Inspect(lambda store: store.watched_keys))
    return total


async def test_a_transaction_runs_every_command_in_order_and_answers_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        names = spread_keys(kv, 2)
        results = await kv.transaction(
            ("SET", "counter", "1"),
            ("INCR", "counter"),
            ("GET", "counter"),
            ("MSET", *[x for name in names for x in (name, "v")]),
            ("MGET", "counter", *names),
            ("DEL", *names[:3]),
            ("EXISTS", *names),
            ("PING",),
            ("ECHO", "hi"),
            ("DBSIZE",),
            ("RENAME", "{t}a", "{t}b"),
        )
        assert results[:10] == [
            "OK",
            2,
            b"2",
            "OK",
            [b"2"] + [b"v"] * len(names),
            3,
            len(names) - 3,
            "PONG",
            b"hi",
            1 + len(names) - 3,
        ]
        assert isinstance(results[10], KVMemoError)  # no such key: its error, in its place
        assert results[10].kind == "SYNTAX"


async def test_a_failing_command_gives_its_error_in_place_and_the_others_still_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("text", "abc")
        results = await kv.transaction(
            ("SET", "a", "1"), ("INCR", "text"), ("SET", "b", "2"), ("SET", "c", "1", "XX", "NX")
        )
        assert results[0] == "OK"
        assert results[2] == "OK"
        assert isinstance(results[1], KVMemoError)
        assert results[1].kind == "NOT_INTEGER"
        assert isinstance(results[3], KVMemoError)
        assert results[3].kind == "SYNTAX"
        assert await kv.mget("a", "b", "text", "c") == [b"1", b"2", b"abc", None]


async def test_no_reader_ever_sees_part_of_a_transaction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """MGETs and pairs of single-key GETs, racing transactions that write every shard."""
    async with kvmemo.open_store(shards=4) as kv:
        names = spread_keys(kv, 2)
        await kv.mset(dict.fromkeys(names, "0"))
        torn: list[Any] = []

        async def writer() -> None:
            for n in range(1, 60):
                await kv.transaction(*[("SET", name, str(n)) for name in names])

        async def mget_reader() -> None:
            for _ in range(80):
                values = await kv.mget(*names)
                if len(set(values)) != 1:
                    torn.append(values)

        async def get_reader() -> None:
            # Linearizable: once the first key shows a transaction, the last shows it too.
            for _ in range(80):
                first = int(await kv.get(names[0]) or 0)
                last = int(await kv.get(names[-1]) or 0)
                if last < first:
                    torn.append((first, last))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(mget_reader)
            nursery.start_soon(get_reader)
        assert torn == []
        assert await kv.mget(*names) == [b"59"] * len(names)


async def test_no_other_command_runs_between_a_transactions_commands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("n", "0")
        seen: list[tuple[bytes, int]] = []

        async def incrementer() -> None:
            for _ in range(200):
                await kv.incr("n")

        async def reader() -> None:
            for _ in range(50):
                got, after = await kv.transaction(("GET", "n"), ("INCR", "n"))
                seen.append((got, after))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(incrementer)
            nursery.start_soon(reader)
        assert all(after == int(got) + 1 for got, after in seen)
        assert await kv.get("n") == b"650"


async def test_moves_and_msetnx_across_shards_are_refused_but_work_on_one_shard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        a, b = key_on(kv, 0, "a"), key_on(kv, 1, "b")
        engine = kv.engine
        for call in (("rename", a, b), ("copy", a, b), ("msetnx", a, "1", b, "2")):
            name, *args = call
            with pytest.raises(KVMemoError, match="needs all its keys on one shard") as caught:
                engine.check_transaction_call(name, [x.encode() for x in args])
            assert caught.value.kind == "SYNTAX"
        with pytest.raises(KVMemoError, match="not allowed in a transaction"):
            engine.check_transaction_call("save", [])
        engine.check_transaction_call("mset", [a.encode(), b"1", b"2", b"2"])  # across: fine
        await kv.set("{u}src", "v", ex=100)
        results = await kv.transaction(
            ("RENAME", "{u}src", "{u}dst"),
            ("COPY", "{u}dst", "{u}copy"),
            ("MSETNX", "{u}dst", "x", "{u}new", "y"),
            ("MSETNX", "{u}n1", "x", "{u}n2", "y"),
            ("TTL", "{u}copy"),
        )
        assert results == ["OK", 1, 0, 1, 100]
        assert await kv.mget("{u}src", "{u}dst", "{u}new", "{u}n2") == [None, b"v", None, b"y"]
        # Through the API, a refused call refuses the whole (EXECABORT), naming it.
        with pytest.raises(KVMemoError, match="needs all its keys on one shard") as caught:
            await kv.transaction(("SET", "{u}new", "z"), ("RENAME", a, b))
        assert caught.value.data["index"] == 1
        assert await kv.get("{u}new") is None
        # The engine itself, given an unchecked call, refuses it in its place.
        answer = await engine.execute_transaction([("rename", [a.encode(), b.encode()])])
        assert answer is not None
        assert isinstance(answer[0], KVMemoError)


async def test_a_multi_shard_mset_in_a_transaction_that_does_not_fit_runs_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=20_000, eviction_policy="noeviction") as kv:
        names = spread_keys(kv, 2)
        await kv.mset(dict.fromkeys(names, "old"))
        used = kv.engine.tracker.used
        with pytest.raises(KVMemoError) as caught:
            await kv.transaction(
                ("SET", "solo", "1"), ("MSET", *[x for n in names for x in (n, "x" * 4000)])
            )
        assert caught.value.kind == "OOM"
        assert await kv.mget(*names, "solo") == [b"old"] * len(names) + [None]
        assert kv.engine.tracker.used == used
        # A write that does not fit, alone, gets OOM in its place; the rest runs.
        results = await kv.transaction(("SET", "big", "x" * 30_000), ("SET", "small", "1"))
        assert isinstance(results[0], KVMemoError)
        assert results[0].kind == "OOM"
        assert results[1] == "OK"
        assert kv.engine.tracker.used <= 20_000


async def test_a_transaction_touching_a_restarting_shard_is_unavailable_and_runs_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=3, restart_backoff=0.5, restart_backoff_max=1.0) as kv:
        names = spread_keys(kv, 1)
        kv.kill_actor(shard_name(2))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KVMemoError) as caught:
            await kv.transaction(*[("SET", name, "new") for name in names])
        assert caught.value.kind == "UNAVAILABLE"
        await wait_running(kv.system, shard_name(2))
        assert await kv.mget(*names) == [None] * len(names)


@pytest.mark.parametrize(
    "change",
    [
        ("SET", "k", "same"),
        ("DEL", "k"),
        ("EXPIRE", "k", "100"),
        ("APPEND", "k", "x"),
        ("FLUSHALL",),
        ("RENAME", "k", "k2"),
        ("MSET", "j", "1", "k", "2", "l", "3"),
    ],
)
async def test_a_watched_key_written_by_anyone_aborts_the_transaction(
    autojump_clock: trio.testing.MockClock, change: tuple[str, ...]
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("k", "same")
        async with kv.watch("k", "other") as w:
            await kv.execute(*change)
            assert await w.transaction(("SET", "other", "1")) is None
        assert await kv.get("other") is None
        assert await watched_keys(kv.engine) == 0


async def test_an_untouched_watch_lets_the_first_transaction_run_and_ends_the_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("balance", "100")
        await kv.set("unrelated", "x")
        async with kv.watch("balance", "missing") as w:
            balance = int(await kv.get("balance") or 0)
            await kv.set("unrelated", "y")  # another key: no effect
            assert await w.transaction(("SET", "balance", str(balance - 10))) == ["OK"]
            # As Redis's EXEC, the first transaction ended the watch: a second
            # one in the block runs unwatched (test_trio_conventions has more).
            assert await w.transaction(("SET", "balance", "80")) == ["OK"]
        assert await kv.get("balance") == b"80"


async def test_an_expiry_of_a_watched_key_aborts_the_transaction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, ttl_tick=1000.0) as kv:
        await kv.set("session", "s", px=500)
        async with kv.watch("session") as w:
            await trio.sleep(1)  # MockClock: past the expiry, no sweep has run
            assert await w.transaction(("SET", "x", "1")) is None
        async with kv.watch("session") as w:  # absent at WATCH and still absent: no change
            assert await w.transaction(("SET", "x", "1")) == ["OK"]


async def test_watchers_of_one_key_are_counted_and_every_watch_is_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        async with kv.watch("k") as first:
            async with kv.watch("k", "j") as second:
                assert await watched_keys(kv.engine) == 2
                assert await second.transaction(("SET", "k", "2")) == ["OK"]
            assert await watched_keys(kv.engine) == 1
            assert await first.transaction(("GET", "k")) is None  # the other's write counts
        assert await watched_keys(kv.engine) == 0
        with trio.move_on_after(1) as scope:
            async with kv.watch("k"):
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert await watched_keys(kv.engine) == 0  # cancelled: given back all the same


async def test_watch_survives_a_shard_restart_and_a_rebuild_aborts_safely(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, restart_backoff=0.1) as kv:
        await kv.set("k", "v")
        async with kv.watch("k") as w:
            shard = kv.engine.slots.shard_of(b"k")
            kv.kill_actor(shard_name(shard))
            await trio.testing.wait_all_tasks_blocked()  # the kill lands
            await wait_running(kv.system, shard_name(shard))
            assert await w.transaction(("SET", "k", "2")) == ["OK"]  # kept: no write since

        async with kv.watch("k") as w:
            ref = kv.system.ref(shard_name(shard))

            def corrupt(store: ShardStore) -> None:
                store.used = -1  # fails the invariant check: rebuilt on restart

            await ref.ask(Inspect(corrupt))
            kv.kill_actor(shard_name(shard))
            await trio.testing.wait_all_tasks_blocked()
            await wait_running(kv.system, shard_name(shard))
            assert await w.transaction(("SET", "k", "3")) is None  # rebuilt: counts lost
        assert await kv.get("k") == b"2"


async def test_a_watch_entry_made_anew_never_matches_a_version_seen_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The entry of a key can go (its last watcher left) and come back (a new
    watcher); a write in between must still abort the first watcher."""
    async with kvmemo.open_store(shards=2) as kv:
        engine = kv.engine
        first = await engine.watch([b"k"])
        await kv.set("k", "written")
        engine.unwatch(first)  # as a spare unwatch would: the entry goes
        later = await engine.watch([b"k"])  # made anew
        assert await engine.execute_transaction([("set", [b"k", b"mine"])], first) is None
        assert await engine.execute_transaction([("get", [b"k"])], later) == [b"written"]
        engine.unwatch(later)
        assert await watched_keys(engine) == 0


async def test_a_watch_cancelled_while_its_shard_is_busy_is_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, hold_timeout=1.0) as kv:
        keep_busy(kv, kv.engine.slots.shard_of(b"k"), 1)
        with trio.move_on_after(0.1) as scope:
            async with kv.watch("k"):
                pytest.fail("the watch cannot be answered while the shard is busy")
        assert scope.cancelled_caught
        await trio.sleep(2)  # the shard takes the queued WATCH, then the unwatch after it
        assert await watched_keys(kv.engine) == 0


async def test_a_multi_shard_mset_in_a_transaction_evicts_and_overwrites_like_a_plain_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=60_000, eviction_policy="lru") as kv:
        names = spread_keys(kv, 2)
        for i in range(60):
            await kv.set(f"filler{i}", "x" * 500)
        results = await kv.transaction(("MSET", *[x for n in names for x in (n, "y" * 2000)]))
        assert results == ["OK"]
        assert await kv.mget(*names) == [b"y" * 2000] * len(names)
        assert kv.engine.tracker.used <= 60_000
    async with kvmemo.open_store(shards=4, maxmemory=8_000, eviction_policy="noeviction") as kv:
        names = spread_keys(kv, 2)
        await kv.mset(dict.fromkeys(names, "a" * 500))
        while True:  # fill to the limit
            try:
                await kv.set(f"fill{kv.engine.tracker.used}", "f" * 100)
            except KVMemoError:
                break
        # Same-size values over existing keys add nothing: no OOM, as a plain MSET.
        assert await kv.transaction(("MSET", *[x for n in names for x in (n, "b" * 500)])) == ["OK"]
        assert await kv.mget(*names) == [b"b" * 500] * len(names)
        for i in range(4):
            ref = kv.system.ref(shard_name(i))
            assert await ref.ask(Inspect(ShardStore.check_invariants))


async def test_transactions_are_counted_by_outcome(autojump_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=2, restart_backoff=0.5) as kv:
        await kv.transaction(("SET", "a", "1"))
        async with kv.watch("a") as w:
            await kv.set("a", "2")
            assert await w.transaction(("SET", "a", "3")) is None
        kv.kill_actor(shard_name(kv.engine.slots.shard_of(b"a")))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KVMemoError):
            await kv.transaction(("SET", "a", "4"))
        text = kv.engine.metrics.render_prometheus()
        for outcome in ("run", "watch", "failed"):
            assert f'kvmemo_transactions_total{{outcome="{outcome}"}} 1' in text
