"""SCAN always ends, however many iterations run at once and whatever happens to a shard.

Each shard keeps at most ``scan_snapshots`` snapshots; an iteration whose
snapshot is pushed out starts its shard over once, then goes on in stateless
hash order (see the design comment of ``ShardStore.scan``). These tests run
more interleaved iterations than the limit, with writes and deletes between
their calls, and check that each ends within the bound and returns every key
present for its whole run.
"""

from __future__ import annotations

import math
import zlib

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_failures import wait_restarted
from test_resp_server import Client, running

import kvmemo
from kvmemo.embedded import Store
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.server.resp import ErrorReply
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import (
    SCAN_BEGIN,
    SCAN_HASH_ORDER,
    SCAN_HASH_STEPS,
    ShardStore,
    scan_position_valid,
)

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
POOL = [b"key%02d" % i for i in range(40)]  # every key the tests write


def cursor_of(shard: int, field: int, tag: int) -> int:
    """A SCAN cursor: shard | field << 14 | tag << 46."""
    return shard | field << 14 | tag << 46


def tag_of(cursor: int) -> int:
    return cursor >> 46


def most_calls(keys_per_shard: int, count: int, shards: int = 1) -> int:
    """The bound: per shard, two snapshot walks (the first cut short) and a hash-order pass."""
    return shards * (2 * max(1, math.ceil(keys_per_shard / count)) + SCAN_HASH_STEPS)


@attrs.define
class Iteration:
    """One client's SCAN iteration, and what it must see."""

    started: bool = False
    done: bool = False
    calls: int = 0
    position: tuple[int, int] = (SCAN_BEGIN, 0)  # a shard's (tag, field), or a cursor
    seen: set[bytes] = attrs.Factory(set)
    present: set[bytes] = attrs.Factory(set)  # there at the start, not deleted since


def new_store(limit: int) -> ShardStore:
    return ShardStore(0, make_policy("lru"), MemoryTracker(0, 1), scan_snapshots=limit)


# -- the pure core: one shard --------------------------------------------------------------------


def test_two_alternating_scans_on_one_snapshot_both_end() -> None:
    """The livelock: each call pushed the other's snapshot out and started over, forever."""
    store = new_store(1)
    for key in POOL[:20]:
        store.put(key, b"v", 0.0, expires_at=None)
    iterations = [Iteration(), Iteration()]
    bound = most_calls(20, 5)
    while not all(it.done for it in iterations):
        for it in iterations:
            if not it.done:
                tag, field, keys = store.scan(*it.position, 5, 0.0)
                it.position, it.calls, it.done = (tag, field), it.calls + 1, field == 0
                it.seen.update(keys)
                assert it.calls <= bound
    assert all(it.seen == set(POOL[:20]) for it in iterations)
    assert store.scan_snapshot_keys() == 0


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 4)),
        st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, len(POOL) - 1)),
    ),
    max_size=120,
)


@settings(DETERMINISTIC, max_examples=200)
@given(
    limit=st.sampled_from([1, 2]),
    scanners=st.integers(3, 5),
    count=st.sampled_from([1, 2, 5, 50]),
    initial=st.integers(0, len(POOL)),
    actions=ACTIONS,
)
def test_more_interleaved_scans_than_snapshots_end_within_the_bound_and_miss_nothing(
    limit: int, scanners: int, count: int, initial: int, actions: list[tuple[str, int]]
) -> None:
    store = new_store(limit)
    for key in POOL[:initial]:
        store.put(key, b"v", 0.0, expires_at=None)
    iterations = [Iteration() for _ in range(scanners)]
    bound = most_calls(len(POOL), count)

    def step(it: Iteration) -> None:
        if not it.started:
            it.started, it.present = True, set(store.data)
        tag, field, keys = store.scan(*it.position, count, 0.0)
        it.position, it.calls, it.done = (tag, field), it.calls + 1, field == 0
        it.seen.update(keys)
        assert it.calls <= bound, "SCAN did not end within the bound"

    for action, n in actions:
        if action == "step":
            if not iterations[n % scanners].done:
                step(iterations[n % scanners])
        elif action == "put":
            store.put(POOL[n], b"v", 0.0, expires_at=None)
        else:
            store.delete(POOL[n], 0.0)
            for it in iterations:
                it.present.discard(POOL[n])
    while not all(it.done for it in iterations):  # the rest, still interleaved
        for it in iterations:
            if not it.done:
                step(it)
    for it in iterations:
        assert it.present <= it.seen
        assert it.seen <= set(POOL)
    assert store.scan_snapshot_keys() <= limit * len(POOL)


def test_hash_order_calls_return_max_of_count_and_a_share_of_the_shard() -> None:
    store = new_store(1)
    keys = [b"h%04d" % i for i in range(1600)]
    for key in keys:
        store.put(key, b"v", 0.0, expires_at=None)
    seen: list[bytes] = []
    field, calls, sizes = 0, 0, []
    while True:  # COUNT 1: about 1600 / SCAN_HASH_STEPS keys a call
        tag, field, found = store.scan(SCAN_HASH_ORDER, field, 1, 0.0)
        assert tag == SCAN_HASH_ORDER
        seen += found
        sizes.append(len(found))
        calls += 1
        if field == 0:
            break
    assert calls == SCAN_HASH_STEPS
    assert sorted(seen) == keys  # each key once: the ranges do not overlap
    assert all(50 <= size <= 150 for size in sizes)  # about 100 each (crc32 spreads them)
    # A COUNT of the shard's size or more ends it in one call.
    tag, field, found = store.scan(SCAN_HASH_ORDER, 0, 1600, 0.0)
    assert (tag, field, sorted(found)) == (SCAN_HASH_ORDER, 0, keys)
    assert store.scan_snapshot_keys() == 0  # hash order holds nothing


def test_a_replayed_cursor_starts_its_shard_over_instead_of_skipping() -> None:
    store = new_store(4)
    for key in POOL[:10]:
        store.put(key, b"v", 0.0, expires_at=None)
    tag, field, first = store.scan(SCAN_BEGIN, 0, 3, 0.0)
    store.scan(tag, field, 3, 0.0)  # the snapshot moves on to offset 6
    again_tag, _, again = store.scan(tag, field, 3, 0.0)  # the reply was lost: sent again
    assert again_tag != tag
    assert again == first  # a new snapshot, walked from its start
    # A made-up snapshot tag is no one's: it starts over too.
    assert store.scan(1234 << 1, 7, 100, 0.0)[1:] == (0, POOL[:10])
    assert store.scan(SCAN_BEGIN, 99, 100, 0.0)[1:] == (0, POOL[:10])


def test_cursor_positions_the_store_never_returns_are_refused_by_form() -> None:
    assert scan_position_valid(SCAN_BEGIN, 0)
    assert not scan_position_valid(SCAN_BEGIN, 5)
    assert scan_position_valid(SCAN_HASH_ORDER, 1)
    assert not scan_position_valid(SCAN_HASH_ORDER, 0)
    assert scan_position_valid(7, 3)
    assert not scan_position_valid(7, 0)
    assert not scan_position_valid(1 << 18, 3)
    assert not scan_position_valid(7, 1 << 32)


# -- the engine: several shards --------------------------------------------------------------------


@settings(DETERMINISTIC, max_examples=25)
@given(
    shards=st.sampled_from([1, 3]),
    limit=st.sampled_from([1, 2]),
    scanners=st.integers(3, 4),
    count=st.sampled_from([1, 4, 30]),
    actions=ACTIONS,
)
def test_interleaved_scans_through_the_engine_end_within_the_bound_and_miss_nothing(
    shards: int, limit: int, scanners: int, count: int, actions: list[tuple[str, int]]
) -> None:
    async def scenario() -> None:
        async with kvmemo.open_store(shards=shards, scan_snapshots=limit) as kv:
            await kv.mset({key: b"v" for key in POOL[::2]})
            iterations = [Iteration() for _ in range(scanners)]
            bound = most_calls(len(POOL), count, shards)
            live = set(POOL[::2])

            async def step(it: Iteration) -> None:
                if not it.started:
                    it.started, it.present = True, set(live)
                cursor, keys = await kv.scan(it.position[0], count=count)
                it.position, it.calls, it.done = (cursor, 0), it.calls + 1, cursor == 0
                it.seen.update(keys)
                assert it.calls <= bound, "SCAN did not end within the bound"

            for action, n in actions:
                if action == "step":
                    if not iterations[n % scanners].done:
                        await step(iterations[n % scanners])
                elif action == "put":
                    await kv.set(POOL[n], "v")
                    live.add(POOL[n])
                else:
                    await kv.delete(POOL[n])
                    live.discard(POOL[n])
                    for it in iterations:
                        it.present.discard(POOL[n])
            while not all(it.done for it in iterations):
                for it in iterations:
                    if not it.done:
                        await step(it)
            for it in iterations:
                assert it.present <= it.seen <= set(POOL)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def push_out_twice(kv: Store, count: int) -> int:
    """A cursor on shard 0 (of a 1-snapshot store) that went on in hash order."""
    cursor, _ = await kv.scan(0, count=count)
    for _ in range(2):
        await kv.scan(0, count=count)  # another client's snapshot pushes this one out
        cursor, _ = await kv.scan(cursor, count=count)
    assert tag_of(cursor) == SCAN_HASH_ORDER
    return cursor


async def finish(
    kv: Store, cursor: int, count: int, *, match: str | None = None, shards: int = 1
) -> set[bytes]:
    """The keys of the rest of an iteration, which must end within the bound."""
    seen: set[bytes] = set()
    for _ in range(most_calls(len(POOL), count, shards)):
        cursor, keys = await kv.scan(cursor, count=count, match=match)
        seen.update(keys)
        if cursor == 0:
            return seen
    raise AssertionError("SCAN did not end within the bound")


async def test_a_cursor_survives_a_restart_of_its_shard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=1, scan_snapshots=1) as kv:
        await kv.mset({key: b"v" for key in POOL})
        hashing = await push_out_twice(kv, 5)
        walking, first = await kv.scan(0, count=5)
        kv.kill_actor("shard-0")
        await wait_restarted(kv.system, "shard-0")
        ref = kv.system.ref("shard-0")
        assert await ref.ask(Inspect(ShardStore.scan_snapshot_keys)) == len(POOL)  # kept
        assert set(first) | await finish(kv, walking, 5) == set(POOL)
        # Hash order holds no state: it goes on where it was, to the end.
        start = hashing >> 14 & 0xFFFFFFFF
        assert await finish(kv, hashing, 5) == {k for k in POOL if zlib.crc32(k) >= start}


async def test_a_cursor_survives_a_rebuilt_shard_that_lost_its_snapshots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=1, scan_snapshots=4) as kv:
        await kv.mset({key: b"v" for key in POOL})
        cursor, first = await kv.scan(0, count=5)
        ref = kv.system.ref("shard-0")

        def corrupt(store: object) -> None:
            store.used += 1  # type: ignore[attr-defined]  # fails check_invariants

        await ref.ask(Inspect(corrupt))
        kv.kill_actor("shard-0")
        await wait_restarted(kv.system, "shard-0")
        assert await ref.ask(Inspect(ShardStore.scan_snapshot_keys)) == 0  # rebuilt: gone
        assert set(first) | await finish(kv, cursor, 5) == set(POOL)


async def test_a_hash_order_cursor_goes_on_in_another_store_with_the_same_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As after a server restart: crc32 depends neither on the process nor on PYTHONHASHSEED."""
    async with kvmemo.open_store(shards=1, scan_snapshots=1) as kv:
        await kv.mset({key: b"v" for key in POOL})
        cursor = await push_out_twice(kv, 1)
        start = cursor >> 14 & 0xFFFFFFFF
        cursor, seen = await kv.scan(cursor, count=1)  # one hash-order call here
    async with kvmemo.open_store(shards=1, scan_snapshots=1) as kv:
        await kv.mset({key: b"v" for key in POOL})
        rest = await finish(kv, cursor, 1)  # and the rest in a store that shares nothing
    assert set(seen) | rest == {k for k in POOL if zlib.crc32(k) >= start}
    assert not set(seen) & rest


async def test_match_and_count_hold_in_both_modes(autojump_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=2, scan_snapshots=1) as kv:
        await kv.mset({key: b"v" for key in POOL})
        await kv.mset({f"other{i}": "v" for i in range(40)})
        # Snapshot walk: each call but the last returns COUNT keys or more,
        # never twice as many (a call adds one shard step at most COUNT long).
        cursor, sizes = 0, []
        while True:
            cursor, keys = await kv.scan(cursor, count=7)
            sizes.append(len(keys))
            if cursor == 0:
                break
        assert all(7 <= size < 14 for size in sizes[:-1])
        assert sum(sizes) == 80
        # Hash order: MATCH filters, and every matching key comes back.
        cursor = await push_out_twice(kv, 3)
        start = cursor >> 14 & 0xFFFFFFFF
        shard_of = kv.engine.slots.shard_of
        expected = {k for k in POOL[10:20] if shard_of(k) == 1 or zlib.crc32(k) >= start}
        assert await finish(kv, cursor, 3, match="key1?", shards=2) == expected
        assert await finish(kv, 0, 3, match="key1?", shards=2) == set(POOL[10:20])


# -- cursors a client can send -------------------------------------------------------------------


BAD_CURSORS = [
    cursor_of(2, 0, 0),  # no such shard (2 shards)
    cursor_of(16383, 0, 0),
    cursor_of(0, 5, SCAN_BEGIN),  # a begin position carries no field
    cursor_of(1, 0, SCAN_HASH_ORDER),  # hash order never hands out start 0
    cursor_of(0, 0, 77),  # a snapshot position is never at offset 0
    (1 << 64) - 1,
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
async def test_a_cursor_the_server_never_returned_is_an_invalid_cursor(
    autojump_clock: trio.testing.MockClock, cursor: int
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "v")
        with pytest.raises(KVMemoError, match=r"^invalid cursor$") as caught:
            await kv.scan(cursor)
        assert caught.value.kind == "SYNTAX"
        assert await kv.scan(0) == (0, [b"k"])


async def test_a_well_formed_cursor_with_a_forgotten_snapshot_still_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, scan_snapshots=1) as kv:
        await kv.mset({key: b"v" for key in POOL})
        # A snapshot tag no shard gave: shard 0 starts over, shard 1 follows.
        assert await finish(kv, cursor_of(0, 9, 4242 << 1), 4, shards=2) == set(POOL)
        assert await finish(kv, cursor_of(0, 9, 4242 << 1 | 1), 4, shards=2) == set(POOL)


async def test_the_redis_port_answers_err_invalid_cursor() -> None:
    with trio.fail_after(30):
        async with running(shards=2) as server:
            client = await Client.connect(server)
            try:
                for cursor in (str(cursor_of(5, 0, 0)), "18446744073709551615", "-1", "x"):
                    reply = await client.call("SCAN", cursor)
                    assert reply == ErrorReply("ERR invalid cursor"), cursor
                assert await client.call("SCAN", "0") == [b"0", []]
            finally:
                await client.aclose()
