"""The fast paths of a multi-shard MSET keep its exact effects.

A grouped MSET round hashes each key once into its shard (``SlotMap.shards_of``),
sorts the round's pairs by shard (each shard's share a slice), prepares each
share with one lookup per key (``plan_put_many``) that the commit reuses, and
holds every shard but the first to prepare without a cancel scope of its own.
These tests hold each shortcut to the path it replaces: the shard of every
key, the pairs of every part, the store a commit leaves, and the bounds and
shielding of a hold.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import _KEYS, _VALUES

import kvmemo
from actors import ActorState, EventKind, ReplySlot
from kvmemo.commands import ops
from kvmemo.engine.engine import shard_name
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import POLICY_NAMES, make_policy
from kvmemo.storage.durability import Journal
from kvmemo.storage.shard import ABORTED, Barrier, Hold, Inspect, PartSlot
from kvmemo.storage.slots import SlotMap
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_store(policy: str = "lru") -> ShardStore:
    return ShardStore(0, make_policy(policy), MemoryTracker(0, 1))


def assert_same_store(fast: ShardStore, slow: ShardStore, policy: str) -> None:
    """The two stores hold the same entries in the same order, with the same expiries,
    accounting, journal records and eviction order (a random policy's order is not compared)."""
    assert fast.data == slow.data
    assert list(fast.data) == list(slow.data)  # insertion order too
    assert fast.expires == slow.expires
    assert fast.used == slow.used == fast.tracker.used
    assert (fast.journal is None) == (slow.journal is None)
    if fast.journal is not None and slow.journal is not None:
        assert fast.journal.records == slow.journal.records
    if not policy.endswith("random"):
        assert [k for _, k in fast.policy.candidates(10)] == [
            k for _, k in slow.policy.candidates(10)
        ]
    assert fast.check_invariants()


# -- routing: the shard of each key ------------------------------------------------------

_KEY_BYTES = st.sampled_from([b"{", b"}", b"a", b"b", b"user", b"1", b"{x}", b"\x00", b"\xff"])
_ROUTED_KEYS = st.lists(st.lists(_KEY_BYTES, max_size=6).map(b"".join), min_size=1, max_size=12)


@DETERMINISTIC
@given(shards=st.sampled_from([1, 2, 3, 16, 100, 16384]), keys=_ROUTED_KEYS)
def test_the_shard_of_each_key_is_the_slot_maps_for_any_key(shards: int, keys: list[bytes]) -> None:
    """With or without hash tags (braces anywhere, empty tags, nested ones)."""
    slots = SlotMap(shards)
    assert slots.shards_of(keys) == [slots.shard_of(key) for key in keys]


# -- a part's pairs ----------------------------------------------------------------------


@DETERMINISTIC
@given(data=st.data(), size=st.integers(1, 12))
def test_a_part_holds_the_pairs_at_its_positions_whether_a_run_or_not(
    data: st.DataObject, size: int
) -> None:
    items = [(b"k%d" % i, b"v%d" % i) for i in range(size)]
    op = ops.MSet(items, only_new=False)
    chosen = data.draw(st.sets(st.integers(0, size - 1), min_size=1))
    positions = sorted(chosen)
    part = op.part(positions)
    assert isinstance(part, ops._MSetPart)
    assert part.items == [items[i] for i in positions]


# -- the store a planned commit leaves ---------------------------------------------------


# From test_store's own put_many property (the one this extends): the keys and values; a
# store's entries before (no expiry, one past at the writes' time 2.0, one live), and the pairs.
BEFORE = st.lists(st.tuples(_KEYS, _VALUES, st.sampled_from([None, 1.0, 100.0])), max_size=8)
ITEMS = st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=8)


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    before=BEFORE,
    items=ITEMS,
    watched=st.sets(_KEYS, max_size=3),
    journalled=st.booleans(),
    every_key_first=st.booleans(),
)
def test_a_planned_put_many_leaves_the_store_exactly_as_puts_one_by_one(
    policy: str,
    before: list[tuple[bytes, bytes, float | None]],
    items: list[tuple[bytes, bytes]],
    watched: set[bytes],
    journalled: bool,
    every_key_first: bool,
) -> None:
    """plan_put_many then put_many(plan) equals put_delta then uncharged puts in order.

    New and existing keys, repeated keys, keys with a live or a past expiry
    (which take the unplanned path), watched keys, a journal, every policy:
    same reservation, data, expiries, used bytes, watch versions, journal
    records and eviction order. ``every_key_first``: every key is written
    first without an expiry (so that most writes overwrite).
    """
    if every_key_first:
        before = [(key, b"first", None) for key in (b"a", b"b", b"c", b"dd", b"e" * 20)] + before
    fast, slow = make_store(policy), make_store(policy)
    for store in (fast, slow):
        for key, value, expires_at in before:
            store.put(key, value, 0.0, expires_at=expires_at)
        for key in sorted(watched):
            store.watch(key)
        if journalled:
            store.journal = Journal()
    versions = {key: fast.watch(key) for key in watched}  # a second watcher: its version
    plan = fast.plan_put_many(items, 2.0)
    delta = slow.put_delta(items, 2.0)
    assert plan.delta == delta
    assert fast.tracker.try_reserve(0, plan.delta)
    fast.put_many(items, 2.0, None, plan)
    assert slow.tracker.try_reserve(0, delta)
    slow.put_many(items, 2.0)
    assert_same_store(fast, slow, policy)
    for key in watched:
        changed = fast.watch(key) != versions[key]
        assert changed == any(k == key for k, _ in items)


def test_a_plan_skips_the_lookups_only_for_distinct_keys_without_expiry() -> None:
    store = make_store()
    store.put(b"plain", b"x", 0.0, expires_at=None)
    store.put(b"ttl", b"y", 0.0, expires_at=100.0)
    assert store.plan_put_many([(b"plain", b"1"), (b"new", b"2")], 1.0).olds == [b"x", None]
    assert store.plan_put_many([(b"plain", b"1"), (b"plain", b"2")], 1.0).olds is None
    assert store.plan_put_many([(b"plain", b"1"), (b"ttl", b"2")], 1.0).olds is None


# -- holds: one deadline per round, every shard shielded ---------------------------------


def keys_on(kv: kvmemo.Store, shard: int, count: int) -> list[bytes]:
    found: list[bytes] = []
    i = 0
    while len(found) < count:
        key = b"k%d" % i
        if kv.engine.slots.shard_of(key) == shard:
            found.append(key)
        i += 1
    return found


def send_hold(kv: kvmemo.Store, shard: int, barrier: Barrier, index: int, key: bytes) -> ReplySlot:
    part = ops.MSet([(key, b"new")], only_new=False).part([0])
    return kv.system.ref(shard_name(shard)).ask_nowait(
        Hold(barrier, index, part), PartSlot(barrier)
    )


async def used_of(kv: kvmemo.Store, shard: int) -> Any:
    return await kv.system.ref(shard_name(shard)).ask(Inspect(lambda s: s.used))


async def test_a_round_never_decided_releases_every_shard_at_the_first_ones_hold_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first shard to prepare holds with the deadline; a shard that prepared later
    (parked, no deadline of its own) is released by that shard's abort, not before,
    and gives back what it reserved."""
    async with kvmemo.open_store(shards=3, hold_timeout=0.5) as kv:
        (a,), (b,) = keys_on(kv, 0, 1), keys_on(kv, 1, 1)
        used = [await used_of(kv, 0), await used_of(kv, 1)]
        barrier = Barrier(3)  # the third shard never gets its hold: never decided
        started = trio.current_time()
        first = send_hold(kv, 0, barrier, 0, a)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.2)
        second = send_hold(kv, 1, barrier, 1, b)
        await trio.testing.wait_all_tasks_blocked()
        assert await second.wait() is ABORTED
        assert 0.5 <= trio.current_time() - started < 0.6  # the first one's deadline
        assert first.done
        assert first.result() is ABORTED
        assert barrier.decided.is_set()
        assert not barrier.commit
        assert [await used_of(kv, 0), await used_of(kv, 1)] == used
        assert await kv.mget(a, b) == [None, None]


@pytest.mark.parametrize("killed", [0, 1], ids=["timed", "parked"])
async def test_a_shard_killed_while_it_holds_waits_for_the_decision_and_commits(
    autojump_clock: trio.testing.MockClock, killed: int
) -> None:
    """A kill lands only after the decision, on the shard that waits with the deadline
    and on a parked one alike: the round commits on both shards, and is acknowledged."""
    async with kvmemo.open_store(shards=2, hold_timeout=5.0) as kv:
        (a,), (b,) = keys_on(kv, 0, 1), keys_on(kv, 1, 1)
        barrier = Barrier(2)
        slots = [send_hold(kv, 0, barrier, 0, a)]
        await trio.testing.wait_all_tasks_blocked()
        slots.append(send_hold(kv, 1, barrier, 1, b))
        await barrier.ready.wait()
        name = shard_name(killed)
        async with kv.system.events.subscribe() as events:
            assert kv.system.kill(name)
            await trio.sleep(1.0)  # time passes: both still hold, killed or not
            assert not slots[0].done
            assert not slots[1].done
            assert barrier.decide(True)
            assert [await slot.wait() for slot in slots] == [None, None]
            with trio.fail_after(10):
                async for event in events:  # the kill landed after the commit
                    if event.actor == name and event.kind is EventKind.RESTARTED:
                        break
        assert kv.system.state(name) is ActorState.RUNNING
        assert await kv.mget(a, b) == [b"new", b"new"]


async def test_a_grouped_round_with_repeated_keys_applies_the_last_value_of_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Concurrent MSETs over shared keys, in one round: sorted by shard, the pairs of a
    key keep their arrival order, so the last MSET's value wins, as it would alone."""
    async with kvmemo.open_store(shards=4) as kv:
        keys = [key for shard in range(4) for key in keys_on(kv, shard, 2)]
        results: list[Any] = []

        async def writer(n: int) -> None:
            results.append(await kv.mset({key.decode(): f"w{n}" for key in keys}))

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(writer, n)
                await trio.lowlevel.checkpoint()  # arrival order: 0, 1, ..., 5
        assert results == ["OK"] * 6
        assert set(await kv.mget(*keys)) == {b"w5"}
        for shard in range(4):
            assert await kv.system.ref(shard_name(shard)).ask(Inspect(ShardStore.check_invariants))
        assert kv.engine.tracker.used == sum([await used_of(kv, s) for s in range(4)])
