"""An MSET or MSETNX whose keys all live on one shard is one message to that shard.

The shard applies it in one step (``ops.LocalMSet``), so it is atomic for
every reader without the two-phase hold, the writer lock or a grouped round.
These tests hold it to the hold's effect (a property test against
``_MSetPart``'s prepare and commit), to atomicity under concurrent readers
and writers of both kinds, and to the behaviour the hold path had: MSETNX's
condition, memory limits, pipelines and persistence.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from test_mget_fastpath import DETERMINISTIC, KEYS, NOW, QUERY_KEYS, _build, _state, _writes

import kvmemo
from kvmemo.commands import ops
from kvmemo.errors import KVMemoError
from kvmemo.eviction.policies import POLICY_NAMES
from kvmemo.storage.store import NeedMemory

TAG = "{t}"  # keys sharing it live on one shard


def tagged(*names: str) -> list[str]:
    return [f"{TAG}{name}" for name in names]


async def three_one_shard_writes(kv: kvmemo.Store) -> None:
    """An MSET, an MSETNX that applies and one that does not, all on one shard."""
    assert await kv.mset(dict.fromkeys(tagged("a", "b", "c"), "1")) == "OK"
    assert await kv.msetnx(dict.fromkeys(tagged("d", "e"), "2")) == 1
    assert await kv.msetnx(dict.fromkeys(tagged("e", "f"), "3")) == 0


# The values of tagged a..f after three_one_shard_writes.
AFTER_THREE = [b"1", b"1", b"1", b"2", b"2", None]


# -- the op against the hold's prepare and commit ------------------------------------------


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    writes=_writes,
    pairs=st.lists(
        st.tuples(st.sampled_from(QUERY_KEYS), st.binary(max_size=6)), min_size=1, max_size=8
    ),
    only_new=st.booleans(),
    watched=st.lists(st.integers(0, len(KEYS) - 1), max_size=3, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_local_mset_has_the_effect_of_a_hold_prepared_and_committed_at_once(
    policy: str,
    writes: list[Any],
    pairs: list[tuple[bytes, bytes]],
    only_new: bool,
    watched: list[int],
    seed: int,
) -> None:
    held, versions_a = _build(policy, writes, watched, seed)
    local, versions_b = _build(policy, writes, watched, seed)

    part = ops.MSet(pairs, only_new=only_new).part(list(range(len(pairs))))
    vote = part.prepare(held, NOW)
    assert not isinstance(vote, NeedMemory)  # no limit in these stores
    if vote is True:
        part.commit(held, NOW)
        expected: Any = 1 if only_new else "OK"
    else:
        part.abort(held)
        expected = 0

    assert ops.LocalMSet(pairs, only_new).apply(local, NOW) == expected
    assert _state(local, watched, versions_b) == _state(held, watched, versions_a)
    assert local.check_invariants()


def test_a_local_mset_over_the_limit_raises_need_memory_and_changes_nothing() -> None:
    store, _ = _build("noeviction", [(0, b"v", None)], [], 1)
    store.tracker.set_limit(store.tracker.used + 100)
    before = _state(store, [], [])
    with pytest.raises(NeedMemory):
        ops.LocalMSet([(b"k1", b"x" * 200), (b"k2", b"y")], False).apply(store, NOW)
    assert _state(store, [], []) == before


# -- through the engine --------------------------------------------------------------------


async def test_a_one_shard_mset_does_not_wait_for_the_writer_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Multi-shard writes queue for the writer lock; a one-shard MSET needs none of it."""
    async with kvmemo.open_store(shards=4, request_timeout=1.0) as kv:
        lock = kv.engine._txn_lock
        await lock.acquire(write=False)  # a multi-shard reader in progress
        try:
            with trio.fail_after(0.01):
                await three_one_shard_writes(kv)
        finally:
            lock.release(write=False)
        assert await kv.mget(*tagged("a", "b", "c", "d", "e", "f")) == AFTER_THREE


async def test_one_shard_msets_are_seen_whole_beside_multi_shard_msets_on_the_same_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Writers of both kinds set the tagged keys to one value per command;
    readers (one-shard MGET, multi-shard MGET, transactions) never see two."""
    async with kvmemo.open_store(shards=4) as kv:
        local_keys = tagged("a", "b", "c", "d")
        other_shard = next(
            f"o{i}"
            for i in range(100)
            if kv.engine.slots.shard_of(f"o{i}".encode())
            != kv.engine.slots.shard_of(local_keys[0].encode())
        )
        await kv.mset(dict.fromkeys(local_keys, "start"))
        torn: list[Any] = []
        reads = 0

        async def local_writer(w: int) -> None:
            for n in range(30):
                await kv.mset(dict.fromkeys(local_keys, f"L{w}-{n}"))

        async def spanning_writer(w: int) -> None:
            for n in range(30):
                await kv.mset(dict.fromkeys([*local_keys, other_shard], f"S{w}-{n}"))

        async def reader(kind: int) -> None:
            nonlocal reads
            for _ in range(40):
                if kind == 0:
                    values = await kv.mget(*local_keys)
                elif kind == 1:
                    values = (await kv.mget(other_shard, *local_keys))[1:]
                else:
                    values = await kv.transaction(*(("get", k) for k in local_keys))
                reads += 1
                if len(set(values)) != 1:
                    torn.append(values)

        async with trio.open_nursery() as nursery:
            for w in range(2):
                nursery.start_soon(local_writer, w)
                nursery.start_soon(spanning_writer, w)
            for kind in range(3):
                nursery.start_soon(reader, kind)
        assert torn == []
        assert reads == 120
        assert len(set(await kv.mget(*local_keys))) == 1


async def test_a_one_shard_msetnx_sees_expired_keys_as_absent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        a, b = tagged("a", "b")
        await kv.set(a, "old", px=100)
        assert await kv.msetnx({a: "1", b: "1"}) == 0
        assert await kv.get(b) is None  # nothing applied
        await trio.sleep(0.2)
        assert await kv.msetnx({a: "2", b: "2"}) == 1
        assert await kv.mget(a, b) == [b"2", b"2"]
        assert await kv.ttl(a) == -1  # a new key, no TTL


async def test_a_one_shard_mset_over_the_limit_is_oom_and_applies_nothing() -> None:
    async with kvmemo.open_store(shards=4, maxmemory=20_000, eviction_policy="noeviction") as kv:
        await kv.set(TAG + "keep", "v")
        used = (await kv.info("memory"))["memory"]["used_memory"]
        with pytest.raises(KVMemoError) as caught:
            await kv.mset({f"{TAG}big{i}": "x" * 4000 for i in range(8)})
        assert caught.value.kind == "OOM"
        assert await kv.exists(*(f"{TAG}big{i}" for i in range(8))) == 0
        assert (await kv.info("memory"))["memory"]["used_memory"] == used
        # A smaller one still fits.
        assert await kv.mset({f"{TAG}small{i}": "x" for i in range(3)}) == "OK"


async def test_a_one_shard_mset_makes_room_by_eviction() -> None:
    async with kvmemo.open_store(shards=4, maxmemory=40_000, eviction_policy="lru") as kv:
        rng = random.Random(7)
        for n in range(40):
            await kv.mset({f"{TAG}{n}:{i}": "x" * rng.randrange(100, 800) for i in range(5)})
        memory = (await kv.info("memory"))["memory"]
        assert memory["used_memory"] <= 40_000 + 1000  # the limit, give or take an entry
        assert await kv.mget(*(f"{TAG}39:{i}" for i in range(5))) != [None] * 5
        assert (await kv.info("stats"))["stats"]["evicted_keys"] > 0


async def test_a_pipeline_keeps_its_order_around_one_shard_msets() -> None:
    async with kvmemo.open_store(shards=4) as kv:
        a, b = tagged("a", "b")
        results = await kv.execute_many(
            ("set", a, "x"),
            ("mset", a, "y", b, "z"),
            ("get", a),
            ("msetnx", b, "q", TAG + "c", "q"),
            ("get", b),
            ("mset", a),  # wrong arity: an error in its place, the rest run
            ("mget", a, b),
        )
        assert results[:5] == ["OK", "OK", b"y", 0, b"z"]
        assert isinstance(results[5], KVMemoError)
        assert results[5].kind == "ARITY"
        assert results[6] == [b"y", b"z"]
        metrics = (await kv.info("stats"))["stats"]["metrics"]
        latency = metrics["kvmemo_command_duration_seconds"]
        assert latency["mset"]["count"] == 1  # the one that ran; the wrong one is an error
        assert latency["msetnx"]["count"] == 1


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_one_shard_msets_survive_a_restart(tmp_path: Path, appendfsync: str) -> None:
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync=appendfsync) as kv:
        await three_one_shard_writes(kv)
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync=appendfsync) as kv:
        assert await kv.mget(*tagged("a", "b", "c", "d", "e", "f")) == AFTER_THREE
