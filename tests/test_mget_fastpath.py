"""MGET's fast path: ShardStore.get_many, MGet's parts and combine, the engine's read paths.

``get_many`` must be exactly ``get`` once per key (values, lazy expiry, the
policy's record of accesses, accounting, watches); the engine's single-shard
and several-shard reads must give what per-key GETs give, and a single-shard
read must still fail at once (UNAVAILABLE) when its shard goes down first.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_atomic import wait_running

import kvmemo
from kvmemo.commands import ops
from kvmemo.embedded import Store
from kvmemo.engine.engine import shard_name
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import LFU_TICK_BITS, POLICY_NAMES, make_policy
from kvmemo.storage.slots import SlotMap
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NOW = 10.0  # the reads' time; entries expire before it (EXPIRED) or after it (LIVE)
EXPIRED = 5.0
LIVE = 20.0
KEYS = [b"k%d" % i for i in range(10)]  # the stored keys come from these
QUERY_KEYS = [*KEYS, b"missing", b""]  # a query also names keys never stored

# One write: key index, value, expiry (None, EXPIRED or LIVE); or an access
# (a GET at time 0) to give the policy a history.
_writes = st.lists(
    st.one_of(
        st.tuples(
            st.integers(0, len(KEYS) - 1),
            st.binary(max_size=6),
            st.sampled_from([None, EXPIRED, LIVE]),
        ),
        st.integers(0, len(KEYS) - 1),
    ),
    max_size=30,
)


def _build(
    policy: str, writes: list[Any], watched: list[int], seed: int
) -> tuple[ShardStore, list[int]]:
    """A store after ``writes`` (all at time 0), with ``watched`` keys watched."""
    store = ShardStore(0, make_policy(policy, rng=random.Random(seed)), MemoryTracker(0, 1))
    for write in writes:
        if isinstance(write, int):
            store.get(KEYS[write], 0.0)
        else:
            index, value, expires_at = write
            store.put(KEYS[index], value, 0.0, expires_at=expires_at)
    versions = [store.watch(KEYS[i]) for i in watched]
    return store, versions


def _state(store: ShardStore, watched: list[int], versions: list[int]) -> dict[str, Any]:
    """Everything a read may change, comparable between two stores.

    Policy scores embed the process-wide tick (LRU, FIFO, LFU's tie-break),
    which differs between two stores; the order of the candidates and, for
    LFU, the frequency (the bits above ``LFU_TICK_BITS``) do not.
    """
    return {
        "data": list(store.data.items()),  # insertion order included
        "expires": list(store.expires.items()),
        "ttl_index": store.ttl_index.entries(),
        "used": store.used,
        "tracked": store.tracker.shard_used(0),
        "expired_count": store.expired_count,
        "policy_len": len(store.policy),
        "policy_order": [
            (score >> LFU_TICK_BITS, key) for score, key in store.policy.candidates(len(KEYS) + 1)
        ],
        "watch_changed": [
            store.watch_count(KEYS[i]) != v for i, v in zip(watched, versions, strict=True)
        ],
    }


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    writes=_writes,
    query=st.lists(st.sampled_from(QUERY_KEYS), max_size=20),
    watched=st.lists(st.integers(0, len(KEYS) - 1), max_size=3, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_get_many_is_get_once_per_key_in_order(
    policy: str, writes: list[Any], query: list[bytes], watched: list[int], seed: int
) -> None:
    one_by_one, versions_a = _build(policy, writes, watched, seed)
    bulk, versions_b = _build(policy, writes, watched, seed)
    assert _state(one_by_one, watched, versions_a) == _state(bulk, watched, versions_b)

    expected = [one_by_one.get(key, NOW) for key in query]
    got = bulk.get_many(iter(query), NOW)  # any iterable, read once

    assert got == expected
    assert _state(bulk, watched, versions_b) == _state(one_by_one, watched, versions_a)
    assert bulk.check_invariants()


def test_get_many_removes_an_expired_key_and_answers_none_for_each_mention() -> None:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    store.put(b"gone", b"x", 0.0, expires_at=EXPIRED)
    store.put(b"live", b"", 0.0, expires_at=LIVE)  # an empty value is a value, not a miss
    assert store.get_many([b"gone", b"live", b"gone", b"nope"], NOW) == [None, b"", None, None]
    assert b"gone" not in store.data
    assert store.expired_count == 1
    assert store.used == store.entry_size(b"live", b"", has_ttl=True)
    assert store.check_invariants()


def test_get_many_moves_each_key_read_to_the_recent_end_of_lru_in_read_order() -> None:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    for key in (b"a", b"b", b"c", b"d"):
        store.put(key, b"v", 0.0, expires_at=None)
    store.get_many([b"c", b"a", b"missing"], NOW)
    assert [key for _, key in store.policy.candidates(4)] == [b"b", b"d", b"c", b"a"]


# -- MGet's parts and combine -----------------------------------------------------------


def test_mget_parts_and_combine_put_the_values_back_in_argument_order() -> None:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    store.put(b"a", b"1", 0.0, expires_at=None)
    store.put(b"c", b"3", 0.0, expires_at=None)
    op = ops.MGet([b"a", b"b", b"c", b"a"])
    positions = [[1, 2], [0, 3]]  # as if on two shards
    results = [op.read_part(where).apply(store, NOW) for where in positions]
    assert results == [[None, b"3"], [b"1", b"1"]]
    assert op.combine(results, positions, True) == [b"1", None, b"3", b"1"]


def test_mget_combine_of_one_part_covering_every_key_is_that_part() -> None:
    op = ops.MGet([b"a", b"b", b"c"])
    values = [b"1", None, b"3"]
    assert op.combine([values], [[0, 1, 2]], True) is values


def test_mget_combine_refuses_a_part_with_the_wrong_number_of_values() -> None:
    op = ops.MGet([b"a", b"b"])
    with pytest.raises(ValueError, match=r"^part gave 1 values for 2 keys$"):
        op.combine([[b"1"]], [[0, 1]], True)
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        op.combine([[b"1"], []], [[0], [1]], True)


# -- routing ----------------------------------------------------------------------------

_tagged_keys = st.lists(
    st.text(alphabet="ab{}", max_size=8).map(str.encode) | st.binary(max_size=6), max_size=40
)


@DETERMINISTIC
@given(keys=_tagged_keys, shards=st.sampled_from([1, 2, 3, 16, 100]))
def test_group_by_shard_places_every_key_as_shard_of_does_hash_tags_included(
    keys: list[bytes], shards: int
) -> None:
    slot_map = SlotMap(shards)
    groups = slot_map.group_by_shard(keys)
    assert list(groups) == sorted(groups)
    assert sorted(p for where in groups.values() for p in where) == list(range(len(keys)))
    for shard, where in groups.items():
        assert where == sorted(where)
        assert all(slot_map.shard_of(keys[p]) == shard for p in where)


# -- through the engine -----------------------------------------------------------------


def _key_on(kv: Store, shard: int, prefix: str) -> bytes:
    i = 0
    while kv.engine.slots.shard_of(f"{prefix}{i}".encode()) != shard:
        i += 1
    return f"{prefix}{i}".encode()


async def test_mget_answers_what_a_get_of_each_key_answers_on_one_shard_and_on_several(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, ttl_tick=1000.0) as kv:
        spread = [_key_on(kv, shard, f"s{shard}-") for shard in range(4)]
        tagged = [b"{user}.a", b"{user}.b", b"{user}.c"]  # one slot, one shard
        for key in [*spread, *tagged]:
            await kv.set(key, b"v:" + key)
        await kv.execute("PEXPIRE", spread[1], 10)
        await kv.execute("PEXPIRE", tagged[1], 10)
        await trio.sleep(1.0)  # both past their expiry; no sweep ran (ttl_tick)
        queries = [
            [spread[0]],
            [b"nope"],
            tagged,
            [tagged[2], tagged[0], tagged[2], b"{user}.nope"],
            [*spread, *tagged, b"nope", spread[0]],
        ]
        for query in queries:
            expected = [await kv.get(key) for key in query]
            assert await kv.mget(*query) == expected
        assert await kv.mget(spread[1], tagged[1]) == [None, None]


@pytest.mark.parametrize("several_shards", [False, True])
async def test_an_mget_whose_shard_crashes_before_reading_fails_unavailable_then_reads_again(
    several_shards: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """The read's message is the one the crash fails: UNAVAILABLE (it had no
    effect), on the one-shard path as on the several-shard one."""
    async with kvmemo.open_store(shards=2) as kv:
        a, b = _key_on(kv, 1, "a"), _key_on(kv, 0 if several_shards else 1, "b")
        await kv.mset({a: b"1", b: b"2"})
        kv.system.inject_fault(shard_name(1))
        with pytest.raises(KVMemoError) as caught:
            await kv.mget(a, b)
        assert caught.value.kind == "UNAVAILABLE"
        await wait_running(kv.system, shard_name(1))
        assert await kv.mget(a, b) == [b"1", b"2"]
