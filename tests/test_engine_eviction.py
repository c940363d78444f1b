"""Memory limit and eviction through the actors: policies, OOM, a flood of writers,
and an eviction-manager that crashes until its supervisor gives up.
"""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing

import kvmemo
from actors import ActorState
from kvmemo.embedded import Store
from kvmemo.engine.engine import EVICTION_MANAGER, EVICTION_SUPERVISOR, shard_name
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import entry_size
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import ShardStore

LIMIT = 64 * 1024


async def all_consistent(kv: Store) -> bool:
    """Every shard's invariants hold and their figures add up to the tracker's."""
    used = 0
    for i in range(kv.engine.config.shards):
        ref = kv.system.ref(shard_name(i))
        if not await ref.ask(Inspect(ShardStore.check_invariants)):
            return False
        used += await ref.ask(Inspect(lambda s: s.used))
    return used == kv.engine.tracker.used


async def fill_until_oom(kv: Store, prefix: str, value: str) -> tuple[int, KVMemoError]:
    """SET new keys until one fails; (how many succeeded, the error)."""
    for i in range(100_000):
        try:
            await kv.set(f"{prefix}{i}", value)
        except KVMemoError as exc:
            return i, exc
    raise AssertionError("the store never refused a write")


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "random", "allkeys-lru"])
async def test_an_evicting_policy_keeps_writes_succeeding_under_the_limit(
    policy: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=LIMIT, eviction_policy=policy) as kv:
        for i in range(2000):
            assert await kv.set(f"key{i}", "v" * 100) == "OK"
            assert kv.engine.tracker.used <= LIMIT
        stats = (await kv.info())["stats"]
        assert stats["evicted_keys"] > 0
        assert await kv.dbsize() == 2000 - stats["evicted_keys"]
        assert await kv.get("key1999") == b"v" * 100  # the newest survives
        assert await all_consistent(kv)


async def test_lru_evicts_the_least_recently_used_keys_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=LIMIT, eviction_policy="lru") as kv:
        size = entry_size(b"key000", b"v" * 100)
        fits = LIMIT // size
        hot = [f"hot{i:03d}" for i in range(10)]
        await kv.mset(dict.fromkeys(hot, "v" * 100))
        for i in range(fits * 3):
            await kv.set(f"key{i:05d}", "v" * 100)
            if i % 20 == 0:
                await kv.mget(*hot)  # touched all along
        assert await kv.exists(*hot) == len(hot)
        assert await kv.exists("key00000", "key00001", "key00002") == 0


async def test_lfu_keeps_the_most_frequently_used_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=LIMIT, eviction_policy="lfu") as kv:
        hot = [f"hot{i}" for i in range(10)]
        await kv.mset(dict.fromkeys(hot, "v" * 100))
        for _ in range(20):
            await kv.mget(*hot)
        for i in range(2000):
            await kv.set(f"key{i}", "v" * 100)
        assert await kv.exists(*hot) == len(hot)


async def test_fifo_evicts_the_oldest_writes_whatever_their_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=LIMIT, eviction_policy="fifo") as kv:
        await kv.set("first", "v" * 100)
        for i in range(2000):
            await kv.set(f"key{i}", "v" * 100)
            await kv.get("first")
        assert await kv.exists("first") == 0


async def test_noeviction_refuses_writes_over_the_limit_with_oom_and_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=LIMIT, eviction_policy="noeviction") as kv:
        written, error = await fill_until_oom(kv, "key", "v" * 100)
        assert error.kind == "OOM"
        assert LIMIT - entry_size(b"key0000", b"v" * 100) < kv.engine.tracker.used <= LIMIT
        assert await kv.dbsize() == written
        assert await kv.exists(f"key{written}") == 0
        # Growing an existing key, INCR and APPEND are writes too.
        for call in (
            kv.set("key0", "v" * 1000),
            kv.append("key1", "more" * 100),
            kv.setrange("key2", 500, "x"),
        ):
            with pytest.raises(KVMemoError) as caught:
                await call
            assert caught.value.kind == "OOM"
        assert await kv.get("key0") == b"v" * 100
        # Reads keep working; a shrinking write and a delete need no room.
        assert await kv.get("key3") == b"v" * 100
        assert await kv.set("key3", "v") == "OK"
        assert await kv.delete("key4", "key5", "key6") == 3
        assert await kv.set("new", "v" * 100) == "OK"
        assert (await kv.info("memory"))["memory"]["oom_refusals"] >= 4
        assert await all_consistent(kv)


@pytest.mark.parametrize("policy", ["lru", "random", "noeviction"])
async def test_a_flood_of_concurrent_writes_never_takes_usage_past_the_limit(
    policy: str, autojump_clock: trio.testing.MockClock
) -> None:
    biggest = 2000
    max_entry = entry_size(b"w00-000", b"x" * biggest, has_ttl=True)
    async with kvmemo.open_store(shards=4, maxmemory=LIMIT, eviction_policy=policy) as kv:
        tracker = kv.engine.tracker
        peak = 0
        outcomes: dict[str, int] = {}

        async def writer(w: int) -> None:
            nonlocal peak
            rng = random.Random(w)
            for n in range(30):
                key = f"w{w:02d}-{n % 10:03d}"
                value = "x" * rng.randrange(1, biggest)
                try:
                    if n % 3 == 0:
                        await kv.set(key, value, px=rng.randrange(1, 500))
                    elif n % 3 == 1:
                        await kv.mset({key: value, f"{key}m": value[: biggest // 4]})
                    else:
                        await kv.append(key, value[:100])
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except KVMemoError as exc:
                    outcomes[exc.kind] = outcomes.get(exc.kind, 0) + 1
                peak = max(peak, tracker.used)
                assert tracker.used <= LIMIT + max_entry

        async with trio.open_nursery() as nursery:
            for w in range(25):
                nursery.start_soon(writer, w)
        assert set(outcomes) <= {"ok", "OOM"}
        total = sum(outcomes.values())
        if policy == "noeviction":
            assert outcomes["OOM"] > total // 2
        else:
            # Eviction keeps up: a write gets OOM only when the others took the
            # room its rounds of eviction made, all MAKE_ROOM_ROUNDS times.
            assert outcomes.get("OOM", 0) <= total * 0.05, outcomes
        assert peak <= LIMIT + max_entry
        assert await all_consistent(kv)


async def test_a_crash_looping_eviction_manager_leaves_writes_working_up_to_the_hard_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Kill the eviction-manager until its supervisor gives up; under load,
    nothing else goes down, writes continue until maxmemory, then OOM."""
    async with kvmemo.open_store(shards=4, maxmemory=LIMIT, eviction_policy="lru") as kv:
        errors: list[str] = []
        done = trio.Event()

        async def load(w: int) -> None:
            n = 0
            while not done.is_set():
                try:
                    await kv.set(f"w{w}-{n % 50}", "v" * 50)
                    await kv.get(f"w{w}-{(n * 7) % 50}")
                except KVMemoError as exc:
                    errors.append(exc.kind)
                n += 1
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(load, w)
            kills = 0
            while kv.system.state(EVICTION_SUPERVISOR) is not ActorState.STOPPED:
                if kv.system.state(EVICTION_MANAGER) is ActorState.RUNNING:
                    kv.kill_actor(EVICTION_MANAGER)
                    kills += 1
                await trio.sleep(0.002)
                assert kills < 50, "the eviction supervisor never gave up"
            await trio.sleep(0.1)
            done.set()
        assert errors == []  # the load stayed under the limit: nothing failed
        assert kv.system.state(EVICTION_MANAGER) is ActorState.STOPPED
        others = [
            a for a in kv.actors() if a["name"] not in (EVICTION_MANAGER, EVICTION_SUPERVISOR)
        ]
        assert all(a["state"] == "running" for a in others), others
        assert (await kv.info("stats"))["stats"]["eviction_manager_running"] is False

        # Without eviction, writes fill memory up to the hard limit, then get OOM.
        written, error = await fill_until_oom(kv, "fill", "v" * 200)
        assert error.kind == "OOM"
        assert written > 0
        assert LIMIT - entry_size(b"fill0000", b"v" * 200) < kv.engine.tracker.used <= LIMIT
        assert await kv.get("fill0") == b"v" * 200  # nothing was evicted
        assert await kv.delete("fill0") == 1
        assert await kv.set("fill0", "v") == "OK"
        assert await all_consistent(kv)


async def test_faults_injected_into_the_eviction_manager_are_contained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=LIMIT, eviction_policy="lru") as kv:
        kinds: set[str] = set()
        n = 0
        while kv.system.state(EVICTION_SUPERVISOR) is not ActorState.STOPPED:
            if kv.system.state(EVICTION_MANAGER) is ActorState.RUNNING:
                kv.system.inject_fault(EVICTION_MANAGER)
            for _ in range(40):  # enough writes to wake eviction at the watermark
                try:
                    await kv.set(f"key{n}", "v" * 200)
                except KVMemoError as exc:
                    kinds.add(exc.kind)
                n += 1
            await trio.sleep(0.05)  # virtual time: lets the supervisor restart it
            assert n < 10_000, "the eviction supervisor never gave up"
        # The supervisor gave up; the store carried on, within its limit.
        assert kinds <= {"OOM"}
        assert kv.engine.tracker.used <= LIMIT
        assert await kv.get(f"key{n - 1}") in (b"v" * 200, None)
        assert all(
            a["state"] == "running"
            for a in kv.actors()
            if a["name"] not in (EVICTION_MANAGER, EVICTION_SUPERVISOR)
        )


@pytest.mark.parametrize("path", ["execute", "fast path"])
async def test_a_set_refused_for_memory_is_refused_once_by_either_path(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    # The embedded set's fast path and execute("set") make the same one try:
    # the shard refuses, no room can be made, OOM (one refusal counted).
    async with kvmemo.open_store(shards=1, maxmemory=LIMIT, eviction_policy="noeviction") as kv:
        await fill_until_oom(kv, "key", "v" * 100)
        before = (await kv.info("memory"))["memory"]["oom_refusals"]
        write = kv.set if path == "fast path" else functools.partial(kv.execute, "set")
        with pytest.raises(KVMemoError) as refused:
            await write(b"big", b"y" * 4000)
        assert refused.value.kind == "OOM"
        assert (await kv.info("memory"))["memory"]["oom_refusals"] == before + 1
