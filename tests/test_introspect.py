"""OBJECT, MEMORY and LASTSAVE: the cores (ticks back to times, peak memory) and the store.

The cores are tested synchronously with explicit times; the store through the
embedded API under a :class:`trio.testing.MockClock` (time moves only when a
test jumps it, so idle times are exact), and once over the WebSocket port.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

import kvmemo
from kvmemo.commands import introspect
from kvmemo.commands.introspect import (
    LFU_NOT_SELECTED,
    LFU_SELECTED,
    MALLOC_STATS,
    MEMORY_HELP,
    OBJECT_HELP,
    ObjectEncoding,
    ObjectFreq,
    ObjectIdleTime,
    ObjectRefcount,
    string_encoding,
)
from kvmemo.commands.table import COMMANDS, lookup, table_arity_ok
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import shard_name
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import MemoryTracker, entry_size
from kvmemo.eviction.policies import (
    MARK_INTERVAL,
    MAX_MARKS,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    NoEvictionPolicy,
    RandomPolicy,
    TickTimes,
    VolatileLFUPolicy,
    VolatileLRUPolicy,
    make_policy,
)
from kvmemo.node import open_node
from kvmemo.server.config import ServerConfig
from kvmemo.storage.shard import ExpireDue, Inspect
from kvmemo.storage.store import ShardStore

TIMEOUT = 30  # seconds per test that runs a node on the real clock
SWEEP = 0.1  # seconds: the default ttl_tick, the period of the sweeps that mark times


# -- OBJECT ENCODING's rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoding"),
    [
        (b"0", b"int"),
        (b"123", b"int"),
        (b"-1", b"int"),
        (b"9223372036854775807", b"int"),
        (b"-9223372036854775808", b"int"),  # 20 bytes: still tried
        (b"9223372036854775808", b"embstr"),  # past int64
        (b"-9223372036854775809", b"embstr"),
        (b"-0", b"embstr"),
        (b"00", b"embstr"),
        (b"01", b"embstr"),
        (b"+1", b"embstr"),
        (b" 1", b"embstr"),
        (b"1 ", b"embstr"),
        (b"1.5", b"embstr"),
        (b"-", b"embstr"),
        (b"", b"embstr"),
        ("١٢".encode(), b"embstr"),  # Arabic-Indic digits are not string2l's
        (b"a" * 44, b"embstr"),
        (b"a" * 45, b"raw"),
        (b"1" * 45, b"raw"),
    ],
)
def test_string_encoding_follows_redis_try_object_encoding(value: bytes, encoding: bytes) -> None:
    assert string_encoding(value) == encoding


# -- TickTimes: ticks back to times -------------------------------------------------------


def test_tick_times_marks_at_most_once_per_interval() -> None:
    times = TickTimes()
    assert times.time_of(5) is None  # nothing marked yet
    assert times.mark(10.0)
    assert not times.mark(10.0 + MARK_INTERVAL / 2)
    assert times.mark(10.0 + MARK_INTERVAL)
    assert len(times) == 2
    assert times.consistent()


def test_tick_times_reads_a_touch_as_of_the_last_mark_before_it() -> None:
    policy = LRUPolicy()
    times = TickTimes()
    policy.record_insert(b"early", volatile=False)  # before any mark
    times.mark(0.0)
    policy.record_insert(b"a", volatile=False)
    times.mark(5.0)
    policy.record_insert(b"b", volatile=False)
    policy.record_access(b"a")  # a touch moves "a" past the mark of 5.0
    times.mark(9.0)

    def when(key: bytes) -> float | None:
        tick = policy.last_access(key)
        assert tick is not None
        return times.time_of(tick)

    assert when(b"a") == 5.0
    assert when(b"b") == 5.0
    assert when(b"early") == 0.0  # older than every mark: as of the oldest one


@settings(max_examples=60)
@given(steps=st.lists(st.tuples(st.floats(0, 30), st.booleans()), min_size=1, max_size=60))
def test_idle_time_is_never_less_than_true_and_at_most_one_mark_spacing_more(
    steps: list[tuple[float, bool]],
) -> None:
    """Sweeps every SWEEP seconds mark the times; touches read no clock."""
    policy = LRUPolicy()
    times = TickTimes()
    now = 0.0
    touched_at = 0.0
    times.mark(now)
    policy.record_insert(b"k", volatile=False)
    for advance, touch in steps:
        end = now + advance
        while now + SWEEP <= end:  # the sweeps in between
            now += SWEEP
            times.mark(now)
        now = end
        if touch:
            policy.record_access(b"k")
            touched_at = now
        tick = policy.last_access(b"k")
        assert tick is not None
        when = times.time_of(tick)
        assert when is not None
        true_idle = now - touched_at
        assert when <= touched_at  # never less idle than true
        assert now - when <= true_idle + MARK_INTERVAL + SWEEP + 1e-9


def test_tick_times_thins_old_marks_keeping_the_error_relative() -> None:
    policy = LRUPolicy()
    times = TickTimes()
    touches: dict[bytes, float] = {}
    now = 0.0
    while now < 50_000:
        times.mark(now)
        if int(now) % 97 == 0:
            key = str(now).encode()
            policy.record_insert(key, volatile=False)
            touches[key] = now
        now += 1.0
    assert len(times) == MAX_MARKS
    assert times.consistent()
    assert times.time_of(0) == 0.0  # the oldest mark stays
    for key, touched in touches.items():
        tick = policy.last_access(key)
        assert tick is not None
        when = times.time_of(tick)
        assert when is not None
        true_idle = now - touched
        estimate = now - when
        assert true_idle <= estimate <= true_idle + max(2 * MARK_INTERVAL, 0.07 * true_idle)


def test_tick_times_consistency_check_catches_damage() -> None:
    times = TickTimes()
    times.mark(1.0)
    times.mark(2.0)
    assert times.consistent()
    times._times.reverse()
    assert not times.consistent()


# -- what the policies keep ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [LRUPolicy, VolatileLRUPolicy, LFUPolicy, VolatileLFUPolicy])
def test_recency_policies_give_the_tick_of_the_last_touch(cls: type[Any]) -> None:
    policy = cls()
    policy.record_insert(b"a", volatile=False)
    policy.record_insert(b"b", volatile=True)
    first = policy.last_access(b"a")
    policy.record_access(b"a")
    assert policy.last_access(b"a") > first > 0
    assert policy.last_access(b"b") is not None
    assert policy.last_access(b"missing") is None
    assert cls.keeps_access_ticks


@pytest.mark.parametrize("cls", [FIFOPolicy, RandomPolicy, NoEvictionPolicy])
def test_other_policies_keep_no_access_ticks(cls: type[Any]) -> None:
    policy = cls()
    policy.record_insert(b"a", volatile=False)
    assert not cls.keeps_access_ticks
    assert not cls.lfu
    assert policy.last_access(b"a") is None
    assert policy.frequency(b"a") is None


def test_lfu_frequency_counts_every_access_from_one() -> None:
    policy = LFUPolicy()
    policy.record_insert(b"a", volatile=False)
    assert policy.frequency(b"a") == 1
    for _ in range(4):
        policy.record_access(b"a")
    assert policy.frequency(b"a") == 5
    policy.record_volatile(b"a", True)  # a TTL change is not an access
    assert policy.frequency(b"a") == 5
    policy.record_insert(b"a", volatile=True)  # an overwrite is one
    assert policy.frequency(b"a") == 6
    assert policy.frequency(b"missing") is None
    assert LFUPolicy.lfu
    assert VolatileLFUPolicy.lfu
    assert not LRUPolicy.lfu


# -- MemoryTracker's peak ------------------------------------------------------------------


def test_tracker_peak_is_the_highest_usage_ever_reached() -> None:
    tracker = MemoryTracker(0, 2)
    assert tracker.peak == 0
    assert tracker.try_reserve(0, 100)
    assert tracker.try_reserve(1, 50)
    assert tracker.peak == 150  # the present, never recorded yet
    tracker.release(0, 100)
    assert tracker.peak == 150
    assert tracker.try_reserve(1, -30)  # a shrinking write
    assert tracker.used == 20
    assert tracker.peak == 150
    assert tracker.try_reserve(0, 200)
    assert tracker.peak == 220
    tracker.reset_shard(0, 0)
    assert (tracker.used, tracker.peak) == (20, 220)


def test_tracker_peak_ignores_refused_reservations() -> None:
    tracker = MemoryTracker(100, 1)
    assert tracker.try_reserve(0, 90)
    assert not tracker.try_reserve(0, 20)
    assert tracker.peak == 90


# -- the store: per-key reads that touch nothing ----------------------------------------------


def store_with(policy_name: str = "lru") -> ShardStore:
    return ShardStore(0, make_policy(policy_name), MemoryTracker(0, 1))


def test_entry_bytes_is_what_the_tracker_holds_for_the_key() -> None:
    store = store_with()
    store.put(b"a", b"x" * 100, 0.0, expires_at=None)
    store.put(b"b", b"y", 0.0, expires_at=50.0)
    store.put_plain(b"c", b"12345", 0.0)
    sizes = [store.entry_bytes(k, 1.0) for k in (b"a", b"b", b"c")]
    assert sizes[0] == entry_size(b"a", b"x" * 100) + LRUPolicy.key_overhead
    assert sizes[1] == entry_size(b"b", b"y", has_ttl=True) + LRUPolicy.key_overhead
    assert sum(s for s in sizes if s is not None) == store.used == store.tracker.used
    assert store.entry_bytes(b"missing", 1.0) is None
    assert store.entry_bytes(b"b", 60.0) is None  # past its expiry: gone, as any read
    assert b"b" not in store.data


def test_object_reads_do_not_touch_the_lru_order() -> None:
    store = store_with("lru")
    for key in (b"a", b"b", b"c"):
        store.put_plain(key, b"v", 0.0)
    store.mark_time(0.0)
    ticks = {k: store.policy.last_access(k) for k in (b"a", b"b", b"c")}
    for op in (ObjectEncoding, ObjectRefcount, ObjectIdleTime):
        op(b"a").apply(store, 1.0)
    with pytest.raises(KVMemoError):
        ObjectFreq(b"a").apply(store, 1.0)
    assert [k for _, k in store.policy.candidates(3)] == [b"a", b"b", b"c"]
    assert {k: store.policy.last_access(k) for k in ticks} == ticks
    store.get(b"a", 1.0)  # a real access does move it (the check above would see it)
    assert [k for _, k in store.policy.candidates(3)] == [b"b", b"c", b"a"]


def test_expiry_sweep_marks_the_times() -> None:
    store = store_with()
    ExpireDue(100).apply(store, 3.0)
    ExpireDue(100).apply(store, 3.5)
    ExpireDue(100).apply(store, 4.0)
    assert store.tick_times.time_of(1 << 62) == 4.0
    assert len(store.tick_times) == 2


def test_invariants_check_the_tick_times_and_repair_keeps_them() -> None:
    store = store_with()
    store.put_plain(b"a", b"v", 0.0)
    store.mark_time(7.0)
    assert store.check_invariants()
    fresh = store.repaired(make_policy("lru"))
    assert fresh.tick_times is store.tick_times
    assert fresh.started_at == store.started_at
    store.tick_times._ticks.append(0)  # lengths differ: damaged
    assert not store.check_invariants()


# -- the store through the engine --------------------------------------------------------------


@pytest.fixture
async def kv(mock_clock: trio.testing.MockClock) -> AsyncIterator[kvmemo.Store]:
    """A store on a clock that moves only when a test jumps it."""
    async with kvmemo.open_store(shards=4) as store:
        yield store


async def advance(clock: trio.testing.MockClock, seconds: float) -> None:
    """Move the clock on and let the sweeps due by then run (they mark the times)."""
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def error_of(kv: kvmemo.Store, *call: Any) -> KVMemoError:
    with pytest.raises(KVMemoError) as info:
        await kv.execute(*call)
    return info.value


async def on_shard_of(kv: kvmemo.Store, key: bytes, fn: Callable[[ShardStore], Any]) -> Any:
    shard = kv.engine.slots.shard_of(key)
    return await kv.system.ref(shard_name(shard)).ask(Inspect(fn))


async def test_object_encoding_and_refcount(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "s", "abc", "i", "-42", "long", "x" * 45)
    assert await kv.execute("object", "encoding", "s") == b"embstr"
    assert await kv.execute("OBJECT", "Encoding", "i") == b"int"
    assert await kv.execute("object", "encoding", "long") == b"raw"
    assert await kv.execute("object", "encoding", "nokey") is None
    assert await kv.execute("object", "refcount", "i") == 1
    assert await kv.execute("object", "refcount", "nokey") is None
    assert await kv.execute("object", "help") == OBJECT_HELP


async def test_typed_methods_of_the_embedded_api(
    kv: kvmemo.Store, mock_clock: trio.testing.MockClock
) -> None:
    await kv.execute("mset", "i", "12", "s", "x" * 50)
    assert await kv.object_encoding("i") == b"int"
    assert await kv.object_encoding("s") == b"raw"
    assert await kv.object_encoding("nokey") is None
    assert await kv.object_refcount("i") == 1
    await advance(mock_clock, 7)
    assert await kv.object_idletime("s") == 7
    with pytest.raises(KVMemoError) as info:
        await kv.object_freq("s")
    assert info.value.kind == "DISABLED"
    usage = await kv.memory_usage("s")
    assert usage == await kv.memory_usage("s", samples=0)
    assert usage is not None
    assert (
        usage + (await kv.memory_usage("i") or 0)
        == (await kv.info("memory"))["memory"]["used_memory"]
    )
    stats = await kv.memory_stats()
    assert stats["keys.count"] == 2
    assert stats["dataset.bytes"] == stats["total.allocated"] <= stats["peak.allocated"]
    assert isinstance(await kv.lastsave(), int)


async def test_idletime_counts_seconds_since_the_last_access(
    kv: kvmemo.Store, mock_clock: trio.testing.MockClock
) -> None:
    await kv.execute("set", "k", "v")
    await advance(mock_clock, 10)
    assert await kv.execute("object", "idletime", "k") == 10
    assert await kv.execute("object", "idletime", "k") == 10  # OBJECT touched nothing
    assert await kv.execute("object", "encoding", "k") == b"embstr"
    assert await kv.execute("memory", "usage", "k") is not None
    assert await kv.execute("object", "idletime", "k") == 10
    assert await kv.get("k") == b"v"  # an access
    await advance(mock_clock, 0.5)
    assert await kv.execute("object", "idletime", "k") == 0
    await advance(mock_clock, 5)
    assert await kv.execute("object", "idletime", "k") == 5
    await kv.execute("mget", "k", "other")
    assert await kv.execute("object", "idletime", "k") == 0
    await advance(mock_clock, 3600)
    await kv.execute("set", "k", "w")  # an overwrite is an access too
    await kv.execute("set", "quiet", "v")
    await advance(mock_clock, 60)
    assert await kv.execute("object", "idletime", "k") == 60
    assert await kv.execute("object", "idletime", "nokey") is None


async def test_freq_grows_with_accesses_under_lfu(mock_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=4, eviction_policy="lfu") as kv:
        await kv.execute("set", "k", "v")
        assert await kv.execute("object", "freq", "k") == 1
        for _ in range(3):
            await kv.get("k")
        await kv.execute("mget", "k", "k")
        assert await kv.execute("object", "freq", "k") == 6
        assert await kv.execute("object", "freq", "k") == 6  # OBJECT is no access
        await kv.execute("set", "k", "w")
        assert await kv.execute("object", "freq", "k") == 7
        assert await kv.execute("object", "freq", "nokey") is None
        err = await error_of(kv, "object", "idletime", "k")
        assert (err.kind, err.message) == ("DISABLED", LFU_SELECTED)
        assert await kv.execute("object", "idletime", "nokey") is None  # nil before the error


@pytest.mark.parametrize("policy", ["fifo", "random", "volatile-random", "noeviction"])
async def test_policies_without_access_times_refuse_idletime(
    mock_clock: trio.testing.MockClock, policy: str
) -> None:
    async with kvmemo.open_store(shards=2, eviction_policy=policy) as kv:
        await kv.execute("set", "k", "v")
        err = await error_of(kv, "object", "idletime", "k")
        assert err.kind == "DISABLED"
        assert err.message == introspect.NO_ACCESS_TIMES.format(policy=policy)
        err = await error_of(kv, "object", "freq", "k")
        assert (err.kind, err.message) == ("DISABLED", LFU_NOT_SELECTED)
        assert await kv.execute("object", "idletime", "nokey") is None
        assert await kv.execute("object", "freq", "nokey") is None


async def test_idletime_follows_a_policy_switch(
    kv: kvmemo.Store, mock_clock: trio.testing.MockClock
) -> None:
    await kv.execute("set", "k", "v")
    await kv.engine.set_eviction_policy("allkeys-lfu")
    assert await kv.execute("object", "freq", "k") == 1
    await kv.engine.set_eviction_policy("volatile-lru")
    await advance(mock_clock, 4)
    assert await kv.execute("object", "idletime", "k") == 4


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "noeviction"])
async def test_memory_usage_sums_to_used_memory(
    mock_clock: trio.testing.MockClock, policy: str
) -> None:
    async with kvmemo.open_store(shards=4, eviction_policy=policy) as kv:
        keys = [f"key:{i}" for i in range(40)]
        for i, key in enumerate(keys):
            if i % 3:
                await kv.execute("set", key, "v" * i)
            else:
                await kv.execute("set", key, str(i), "EX", "1000")
        await kv.execute("append", "key:1", "more")
        usages = [await kv.execute("memory", "usage", key) for key in keys]
        info = await kv.execute("info", "memory")
        assert sum(usages) == info["memory"]["used_memory"]
        one = await on_shard_of(
            kv, b"key:3", lambda s: s.entry_size(b"key:3", s.data[b"key:3"], has_ttl=True)
        )
        assert usages[3] == one
        assert await kv.execute("memory", "usage", "key:3", "SAMPLES", "0") == one
        assert await kv.execute("memory", "usage", "key:3", "samples", "5", "SAMPLES", "9") == one
        assert await kv.execute("memory", "usage", "nokey") is None


async def test_memory_usage_of_an_expired_key_is_nil(
    kv: kvmemo.Store, mock_clock: trio.testing.MockClock
) -> None:
    await kv.execute("set", "k", "v", "PX", "100")
    assert await kv.execute("memory", "usage", "k") is not None
    mock_clock.jump(1)
    assert await kv.execute("memory", "usage", "k") is None
    assert await kv.execute("object", "encoding", "k") is None


async def test_memory_stats_doctor_and_fixed_replies(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "a", "1", "b", "x" * 500, "c", "")
    stats = await kv.execute("memory", "stats")
    assert stats[::2] == [
        b"peak.allocated",
        b"total.allocated",
        b"keys.count",
        b"keys.bytes-per-key",
        b"dataset.bytes",
    ]
    figures = dict(zip(stats[::2], stats[1::2], strict=True))
    used = (await kv.execute("info", "memory"))["memory"]["used_memory"]
    assert figures[b"total.allocated"] == figures[b"dataset.bytes"] == used
    assert figures[b"keys.count"] == 3 == await kv.execute("dbsize")
    assert figures[b"keys.bytes-per-key"] == used // 3
    assert figures[b"peak.allocated"] == used
    await kv.execute("del", "b")
    after = dict(zip(*[iter(await kv.execute("memory", "stats"))] * 2, strict=True))
    assert after[b"total.allocated"] < used == after[b"peak.allocated"]
    doctor = await kv.execute("memory", "doctor")
    assert isinstance(doctor, bytes)
    assert b"no allocator statistics" in doctor
    assert f"for 2 keys (peak {used})".encode() in doctor
    assert await kv.execute("memory", "purge") == "OK"
    assert await kv.execute("memory", "malloc-stats") == MALLOC_STATS
    assert await kv.execute("memory", "help") == MEMORY_HELP
    await kv.execute("flushall")
    empty = dict(zip(*[iter(await kv.execute("memory", "stats"))] * 2, strict=True))
    assert empty[b"keys.count"] == empty[b"keys.bytes-per-key"] == 0


async def test_fixed_replies_need_no_shard(autojump_clock: trio.testing.MockClock) -> None:
    """HELP, PURGE and MALLOC-STATS read nothing: they answer while any shard restarts."""
    fixed = [
        (("object", "help"), OBJECT_HELP),
        (("memory", "help"), MEMORY_HELP),
        (("memory", "purge"), "OK"),
        (("memory", "malloc-stats"), MALLOC_STATS),
    ]
    async with kvmemo.open_store(shards=2, restart_backoff=5, restart_backoff_max=5) as kv:
        for shard in range(2):
            assert kv.kill_actor(shard_name(shard))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KVMemoError) as down:
            await kv.execute("object", "encoding", "k")
        assert down.value.kind == "UNAVAILABLE"  # the shards really are down
        for call, reply in fixed:
            assert await kv.execute(*call) == reply
        results = await kv.engine.execute_many(
            [(c[0], [a.encode() for a in c[1:]]) for c, _ in fixed]
        )
        assert results == [reply for _, reply in fixed]
    async with kvmemo.open_store(shards=2) as kv:
        answers = await kv.transaction(("set", "k", "v"), *[call for call, _ in fixed])
        assert answers == ["OK", *[reply for _, reply in fixed]]


async def test_lastsave_without_persistence_is_the_start_time() -> None:
    before = int(time.time())
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2) as kv:
            after = int(time.time())
            assert before <= await kv.execute("lastsave") <= after
            err = await error_of(kv, "lastsave", "x")
            assert err.kind == "ARITY"


async def test_lastsave_is_the_last_snapshot_of_every_shard(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=3, data_dir=str(tmp_path)) as kv:
            started = await kv.execute("lastsave")
            assert started <= int(time.time())
            assert (await kv.execute("info", "persistence"))["persistence"]["last_save"] is None
            await kv.execute("set", "k", "v")
            before = time.time()
            assert await kv.execute("save") == "OK"
            last_save = (await kv.execute("info", "persistence"))["persistence"]["last_save"]
            assert last_save >= before
            assert await kv.execute("lastsave") == int(last_save)


NOT_INT = "value is not an integer or out of range"


def arity(name: str) -> str:
    return f"wrong number of arguments for '{name}' command"


ERRORS: list[tuple[tuple[str, ...], str, str]] = [
    (("object",), "ARITY", arity("object")),
    (("object", "encoding"), "ARITY", arity("object|encoding")),
    (("object", "encoding", "a", "b"), "ARITY", arity("object|encoding")),
    (("object", "help", "x"), "ARITY", arity("object|help")),
    (("object", "nosuch", "a"), "UNKNOWN_METHOD", "unknown subcommand 'nosuch'. Try OBJECT HELP."),
    (("Object", "Nosuch"), "UNKNOWN_METHOD", "unknown subcommand 'Nosuch'. Try OBJECT HELP."),
    (("object", "freq", "a"), "DISABLED", LFU_NOT_SELECTED),
    (("memory",), "ARITY", arity("memory")),
    (("memory", "usage"), "ARITY", arity("memory|usage")),
    (("memory", "stats", "x"), "ARITY", arity("memory|stats")),
    (("memory", "doctor", "x"), "ARITY", arity("memory|doctor")),
    (("memory", "usage", "a", "samples"), "SYNTAX", "syntax error"),
    (("memory", "usage", "a", "samples", "-1"), "SYNTAX", "syntax error"),
    (("memory", "usage", "a", "foo"), "SYNTAX", "syntax error"),
    (("memory", "usage", "a", "samples", "x"), "NOT_INTEGER", NOT_INT),
    (("memory", "usage", "nokey", "samples", "1.5"), "NOT_INTEGER", NOT_INT),
    (("memory", "nosuch"), "UNKNOWN_METHOD", "unknown subcommand 'nosuch'. Try MEMORY HELP."),
    (("lastsave", "x"), "ARITY", arity("lastsave")),
]


async def keyspace(kv: kvmemo.Store) -> list[Any]:
    """The ``{t}`` shard's entries and expiry times as stored, and the tracked bytes."""
    shard = await on_shard_of(kv, b"{t}", lambda s: (dict(s.data), dict(s.expires), s.used))
    return [shard, (await kv.execute("info", "memory"))["memory"]["used_memory"]]


async def test_errors_change_nothing(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "{t}a", "1", "{t}b", "2")
    await kv.execute("set", "{t}c", "3", "EX", "100")
    for key in ("{t}a", "{t}b", "{t}c"):
        await kv.get(key)
    before = await keyspace(kv)

    async def lru_order() -> list[bytes]:
        return await on_shard_of(kv, b"{t}a", lambda s: [k for _, k in s.policy.candidates(3)])

    assert await lru_order() == [b"{t}a", b"{t}b", b"{t}c"]
    for call, kind, message in ERRORS:
        args = [b"{t}a" if a == "a" else a for a in call]
        err = await error_of(kv, *args)
        assert (err.kind, err.message) == (kind, message), call
    assert await lru_order() == [b"{t}a", b"{t}b", b"{t}c"]  # a touch of a would move it last
    assert await keyspace(kv) == before


async def test_object_calls_leave_the_lru_order_alone(kv: kvmemo.Store) -> None:
    await kv.execute("set", "{t}a", "1")
    await kv.execute("set", "{t}b", "2")
    for sub in ("encoding", "refcount", "idletime"):
        await kv.execute("object", sub, "{t}a")
    await kv.execute("memory", "usage", "{t}a")
    with pytest.raises(KVMemoError):
        await kv.execute("object", "freq", "{t}a")
    order = await on_shard_of(kv, b"{t}a", lambda s: [k for _, k in s.policy.candidates(2)])
    assert order == [b"{t}a", b"{t}b"]
    await kv.get("{t}a")
    order = await on_shard_of(kv, b"{t}a", lambda s: [k for _, k in s.policy.candidates(2)])
    assert order == [b"{t}b", b"{t}a"]


async def test_introspection_runs_in_a_transaction(kv: kvmemo.Store) -> None:
    await kv.execute("set", "k", "12")
    results = await kv.transaction(
        ("object", "encoding", "k"),
        ("object", "refcount", "k"),
        ("memory", "usage", "k"),
        ("object", "help"),
        ("memory", "stats"),
        ("lastsave",),
        ("object", "freq", "k"),
    )
    assert results[:2] == [b"int", 1]
    assert results[2] == await kv.execute("memory", "usage", "k")
    assert results[3] == OBJECT_HELP
    assert results[4][4:6] == [b"keys.count", 1]
    assert isinstance(results[5], int)
    assert isinstance(results[6], KVMemoError)
    assert results[6].kind == "DISABLED"
    with pytest.raises(KVMemoError) as info:
        await kv.transaction(("set", "k", "1"), ("object", "nosuch", "k"))
    assert info.value.kind == "UNKNOWN_METHOD"
    assert info.value.data["index"] == 1
    assert await kv.execute("get", "k") == b"12"  # refused as a whole


def test_the_table_declares_containers_as_redis_does() -> None:
    for name in ("object", "memory"):
        spec = lookup(name)
        assert (spec.arity, spec.first_key, spec.last_key, spec.key_step) == (-2, 0, 0, 0)
        assert spec.since == "1.3"
    subs = {s.name: s for s in COMMANDS["object"].subcommands}
    assert sorted(subs) == ["encoding", "freq", "help", "idletime", "refcount"]
    assert (subs["encoding"].arity, subs["encoding"].first_key) == (3, 2)
    usage = {s.name: s for s in COMMANDS["memory"].subcommands}["usage"]
    assert (usage.arity, usage.first_key, usage.last_key, usage.key_step) == (-3, 2, 2, 1)
    assert COMMANDS["lastsave"].arity == 1
    # A transaction's queue-time check holds a known subcommand to its own arity.
    assert table_arity_ok(COMMANDS["object"], 1)
    assert not table_arity_ok(COMMANDS["object"], 1, [b"ENCODING"])
    assert table_arity_ok(COMMANDS["object"], 2, [b"encoding", b"k"])
    assert not table_arity_ok(COMMANDS["object"], 0, [])
    assert table_arity_ok(COMMANDS["memory"], 4, [b"usage", b"k", b"SAMPLES", b"1"])
    assert table_arity_ok(COMMANDS["object"], 1, [b"nosuch"])  # refused when parsed


async def test_command_list_has_the_new_methods(kv: kvmemo.Store) -> None:
    assert {"object", "memory", "lastsave"} <= set(await kv.execute("command.list"))


# -- over the WebSocket port -----------------------------------------------------------------


async def test_json_rpc_methods_answer_in_protocol_shapes() -> None:
    with trio.fail_after(TIMEOUT):
        config = StoreConfig(shards=4)
        async with open_node(config, ServerConfig(port=0, resp=False)) as node:
            async with open_websocket_url(node.url) as ws:
                # Pipelined without waiting: OBJECT waits for the session's earlier SET.
                for rid, call in enumerate(
                    [
                        ["set", "k", "hello"],
                        ["object", "encoding", "k"],
                        ["memory", "usage", "k"],
                        ["memory", "stats"],
                        ["object", "freq", "k"],
                        ["object", "nosuch"],
                        ["lastsave"],
                    ]
                ):
                    message = {"jsonrpc": "2.0", "id": rid, "method": call[0], "params": call[1:]}
                    await ws.send_message(json.dumps(message))
                answers: dict[int, Any] = {}
                while len(answers) < 7:
                    answer = json.loads(await ws.get_message())
                    answers[answer["id"]] = answer
                assert answers[1]["result"] == "embstr"
                assert isinstance(answers[2]["result"], int)
                assert answers[2]["result"] > 0
                stats = answers[3]["result"]
                assert stats[0::2][:3] == ["peak.allocated", "total.allocated", "keys.count"]
                assert stats[5] == 1
                assert answers[4]["error"]["data"]["kind"] == "DISABLED"
                assert answers[5]["error"]["code"] == -32601
                assert isinstance(answers[6]["result"], int)


# -- malformed calls never crash a shard ---------------------------------------------------

SUBS = ["ENCODING", "refcount", "Freq", "IDLETIME", "HELP", "USAGE", "SAMPLES", "STATS",
        "DOCTOR", "PURGE", "MALLOC-STATS", "nosuch", ""]  # fmt: skip
ARGS = ["k", "{t}k", "nokey", "0", "-1", "5", "x", "SAMPLES", "9223372036854775808", ""]
EXPECTED_KINDS = {"ARITY", "SYNTAX", "UNKNOWN_METHOD", "NOT_INTEGER", "DISABLED"}


def well_typed(value: object) -> bool:
    if value is None or isinstance(value, (bytes, str, int)):
        return not isinstance(value, bool)
    return isinstance(value, list) and all(well_typed(v) for v in value)


async def outcome(call: Awaitable[Any]) -> Any:
    """What ``call`` returns, or the :class:`KVMemoError` it raises."""
    try:
        return await call
    except KVMemoError as exc:
        return exc


calls = st.lists(
    st.tuples(
        st.sampled_from(["object", "memory", "lastsave", "OBJECT", "Memory"]),
        st.lists(st.one_of(st.sampled_from(SUBS), st.sampled_from(ARGS)), max_size=5),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(["lru", "lfu", "fifo", "random", "noeviction"]), calls=calls)
def test_malformed_introspection_calls_get_clear_errors_and_crash_nothing(
    policy: str, calls: list[tuple[str, list[str]]]
) -> None:
    async def scenario() -> None:
        with trio.fail_after(TIMEOUT):
            async with kvmemo.open_store(shards=3, eviction_policy=policy) as kv:
                await kv.execute("mset", "k", "v", "{t}k", "12")
                before = await kv.execute("memory", "stats")
                for name, args in calls:
                    result = await outcome(kv.execute(name, *args))
                    if isinstance(result, KVMemoError):
                        assert result.kind in EXPECTED_KINDS, (name, args, result)
                        assert result.message
                    else:
                        assert well_typed(result), (name, args, result)
                name, args = calls[0]
                results = await outcome(kv.transaction((name, *args)))
                if isinstance(results, KVMemoError):  # refused as a whole, as EXECABORT
                    assert results.kind in {"ARITY", "UNKNOWN_METHOD"}, results
                else:
                    assert len(results) == 1
                assert await kv.execute("memory", "stats") == before
                for actor in kv.actors():
                    assert (actor["state"], actor["restarts"]) == ("running", 0), actor

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
