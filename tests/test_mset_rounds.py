"""The multi-shard MSET fast paths under adversarial cases: holds, routing, the store plan.

Holds: a round's parked shards are released by every way a round can end
(the engine's decision, the timed shard's timeout, a caller's cancellation,
a store closed mid-round); routing: grouped rounds keep the last value of a
key, hash tags included; store plan: a share's prepare and commit leave the
store exactly as the unplanned path, MSETNX's expiry removals included; and
under kills, no MGET sees part of an MSET.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mset_speed_paths import BEFORE, ITEMS, assert_same_store, make_store

import kvmemo
from actors import ReplySlot
from kvmemo.commands import ops
from kvmemo.embedded import Store
from kvmemo.engine.engine import shard_name
from kvmemo.errors import KVMemoError
from kvmemo.eviction.policies import POLICY_NAMES
from kvmemo.storage.durability import Journal
from kvmemo.storage.shard import ABORTED, Barrier, Hold, Inspect, PartSlot
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)


def keys_on(kv: Store, shard: int, count: int, prefix: bytes = b"k") -> list[bytes]:
    found: list[bytes] = []
    i = 0
    while len(found) < count:
        key = prefix + b"%d" % i
        if kv.engine.slots.shard_of(key) == shard:
            found.append(key)
        i += 1
    return found


def send_hold(kv: Store, shard: int, barrier: Barrier, index: int, key: bytes) -> ReplySlot:
    part = ops.MSet([(key, b"held")], only_new=False).part([0])
    return kv.system.ref(shard_name(shard)).ask_nowait(
        Hold(barrier, index, part), PartSlot(barrier)
    )


async def used_of(kv: Store, shard: int) -> Any:
    return await kv.system.ref(shard_name(shard)).ask(Inspect(lambda s: s.used))


# -- holds: every way a round ends releases its parked shards ----------------------------


async def close_while_parked(tmp_path: Path, persistence: bool, hold: float) -> None:
    """A round nobody decides (its third hold never sent): the store's close cancels
    every shard; the parked one cannot be cancelled, so the close waits for the timed
    shard's deadline, and no longer."""
    settings_: dict[str, Any] = {"shards": 3, "hold_timeout": hold}
    if persistence:
        settings_["data_dir"] = str(tmp_path)
    with trio.fail_after(hold + 5):
        async with kvmemo.open_store(**settings_) as kv:
            (a,), (b,) = keys_on(kv, 0, 1), keys_on(kv, 1, 1)
            barrier = Barrier(3)
            first = send_hold(kv, 0, barrier, 0, a)
            await trio.testing.wait_all_tasks_blocked()
            second = send_hold(kv, 1, barrier, 1, b)
            await trio.testing.wait_all_tasks_blocked()
            assert barrier.timed
            assert len(barrier.parked) == 1
            started = trio.current_time()
        closed = trio.current_time() - started
    assert barrier.decided.is_set()
    assert not barrier.commit
    assert closed <= hold + (0.2 if persistence else 0.01)
    for slot in (first, second):
        assert slot.done
        if not persistence:  # a durable shard's reply waits for its batch's commit
            assert slot.result() is ABORTED


async def test_closing_the_store_while_a_round_parks_a_shard_ends_by_the_timed_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    await close_while_parked(tmp_path, False, 3.0)


async def test_closing_a_durable_store_while_a_round_parks_a_shard_ends_by_the_timed_deadline(
    tmp_path: Path,
) -> None:
    """Real time: recovery runs in threads, which an autojump clock would outrun."""
    await close_while_parked(tmp_path, True, 0.3)


async def test_a_caller_cancelled_mid_round_releases_its_parked_shards_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shard 2 is busy (a hold nobody decides, for 5 s); an MSET over shards 0, 1, 2
    holds 0 (timed) and parks 1. Cancelling the caller decides the round (abort)
    in _hold_all's finally: shards 0 and 1 serve again at once, not after 5 s."""
    async with kvmemo.open_store(shards=3, hold_timeout=5.0) as kv:
        a, b, c = (keys_on(kv, s, 1, b"m")[0] for s in range(3))
        await kv.mset({a.decode(): "old", b.decode(): "old", c.decode(): "old"})
        busy = Barrier(2)
        send_hold(kv, 2, busy, 0, b"zz")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.5) as scope:
            await kv.mset({a.decode(): "new", b.decode(): "new", c.decode(): "new"})
        assert scope.cancelled_caught
        cancelled = trio.current_time()
        with trio.fail_after(0.01):
            assert await kv.system.ref(shard_name(0)).ask(Inspect(lambda s: s.data.get(a)))
            assert await kv.system.ref(shard_name(1)).ask(Inspect(lambda s: s.data.get(b)))
        assert trio.current_time() - cancelled < 0.01
        busy.decide(False)
        assert await kv.mget(a, b, c) == [b"old"] * 3
        for s in range(3):
            assert await kv.system.ref(shard_name(s)).ask(Inspect(ShardStore.check_invariants))
        assert kv.engine.tracker.used == sum([await used_of(kv, s) for s in range(3)])


async def test_closing_the_store_with_an_engine_round_stuck_behind_a_busy_shard_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller lives outside the store: the round's shards 0 (timed) and 1
    (parked) hold, shard 2 is busy with a hold nobody decides. Closing the store
    must end (bounded by the hold timeouts) and the caller must get an answer."""
    outcome: dict[str, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            async with kvmemo.open_store(shards=3, hold_timeout=5.0) as kv:
                a, b, c = (keys_on(kv, s, 1, b"m")[0] for s in range(3))
                send_hold(kv, 2, Barrier(2), 0, b"zz")
                await trio.testing.wait_all_tasks_blocked()

                async def mset() -> None:
                    try:
                        outcome["result"] = await kv.mset(
                            {a.decode(): "new", b.decode(): "new", c.decode(): "new"}
                        )
                    except KVMemoError as exc:
                        outcome["error"] = exc.kind

                outer.start_soon(mset)
                await trio.testing.wait_all_tasks_blocked()
                assert kv.engine._mset_leading
    assert "result" not in outcome
    assert outcome["error"] in ("UNAVAILABLE", "TIMEOUT")


# -- routing: a grouped round keeps the last value of each key, hash tags included ---------


async def test_a_grouped_round_over_hash_tagged_and_repeated_keys_keeps_each_last_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=5) as kv:
        keys = [b"{t}a", b"{t}b", b"a{", b"}{b}x", b"{}c", b"{{u}}", b"plain", b"x{y}z", b"q"]
        rng = random.Random(3)
        writes: list[list[tuple[bytes, bytes]]] = []
        for n in range(8):
            chosen = [rng.choice(keys) for _ in range(6)]
            writes.append([(k, b"w%d-%d" % (n, i)) for i, k in enumerate(chosen)])
        # Every write spans several shards (the grouped path), or pad it so.
        spread = [keys_on(kv, s, 1, b"pad")[0] for s in range(5)]
        for n, pairs in enumerate(writes):
            pairs += [(k, b"p%d" % n) for k in spread]
        expected: dict[bytes, bytes] = {}
        for pairs in writes:
            expected.update(pairs)
        results: list[Any] = []

        async def writer(pairs: list[tuple[bytes, bytes]]) -> None:
            op = ops.MSet(pairs, only_new=False)
            results.append(await kv.engine._run(op))

        async with trio.open_nursery() as nursery:
            for pairs in writes:
                nursery.start_soon(writer, pairs)
                await trio.lowlevel.checkpoint()  # arrival order
        assert results == [ops.OK] * len(writes)
        assert kv.engine._mset_last_round > 1  # they were grouped
        got = await kv.mget(*expected)
        assert dict(zip(expected, got, strict=True)) == expected


# -- the store a share's prepare and commit leave ----------------------------------------


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    before=BEFORE,
    items=ITEMS,
    only_new=st.booleans(),
    journalled=st.booleans(),
)
def test_a_shares_prepare_and_commit_leave_the_store_as_the_unplanned_path(
    policy: str,
    before: list[tuple[bytes, bytes, float | None]],
    items: list[tuple[bytes, bytes]],
    only_new: bool,
    journalled: bool,
) -> None:
    """_MSetPart.prepare/commit (with its plan; MSETNX's liveness check may remove
    expired keys first) against the reference: the same check, put_delta, reserve,
    then put_many without a plan. A commit at a later time than prepare (the shard
    held meanwhile) applies at prepare's time in both."""
    fast, slow = make_store(policy), make_store(policy)
    for store in (fast, slow):
        for key, value, expires_at in before:
            store.put(key, value, 0.0, expires_at=expires_at)
        if journalled:
            store.journal = Journal()
    part = ops.MSet(items, only_new=only_new).part(list(range(len(items))))
    vote = part.prepare(fast, 2.0)
    if only_new and any(slow.contains(k, 2.0) for k, _ in items):
        expected_vote: object = False
    else:
        delta = slow.put_delta(items, 2.0)
        assert slow.tracker.try_reserve(0, delta)
        slow.put_many(items, 2.0)
        expected_vote = True
    assert vote == expected_vote
    if vote is True:
        part.commit(fast, 50.0)  # later than prepare: expiries at 1.0 and 100.0 straddle
    assert_same_store(fast, slow, policy)
    assert slow.used == slow.tracker.used
    assert fast.expired_count == slow.expired_count


def test_an_aborted_share_gives_back_its_reservation_and_changes_nothing() -> None:
    store = make_store("allkeys-lru")
    store.put(b"a", b"old", 0.0, expires_at=None)
    used, data = store.used, dict(store.data)
    part = ops.MSet([(b"a", b"x" * 100), (b"b", b"y")], only_new=False).part([0, 1])
    assert part.prepare(store, 1.0) is True
    assert store.tracker.used > used
    part.abort(store)
    assert store.tracker.used == store.used == used
    assert store.data == data


# -- no MGET sees part of an MSET, under kills -------------------------------------------


async def test_msets_and_mgets_under_shard_kills_are_all_or_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    await kills_under_load(tmp_path, False)


async def test_durable_msets_and_mgets_under_shard_kills_are_all_or_nothing(
    tmp_path: Path,
) -> None:
    """Real time (recovery and syncs run in threads)."""
    await kills_under_load(tmp_path, True)


async def kills_under_load(tmp_path: Path, persistence: bool) -> None:
    """Writers set one value on every key of a group spanning 4 shards (grouped
    rounds); readers MGET the group; a killer kills random shards (seeded). Every
    MGET that answers sees one writer's value on every key (or the initial one);
    afterwards (and after a reopen, with persistence) the stores are consistent and
    every group is uniform."""
    settings_: dict[str, Any] = {
        "shards": 4,
        "hold_timeout": 0.5,
        "restart_backoff": 0.002,
        "restart_backoff_max": 0.01,
        "max_restarts": 10_000,
    }
    if persistence:
        settings_["data_dir"] = str(tmp_path)
    rng = random.Random(11)
    seen: list[list[bytes | None]] = []
    errors: dict[str, int] = {}
    counts = {"ok": 0, "kills": 0}
    with trio.fail_after(120):
        async with kvmemo.open_store(**settings_) as kv:
            groups = [
                [k for s in range(4) for k in keys_on(kv, s, 2, b"g%d:" % g)] for g in range(4)
            ]
            for keys in groups:
                await kv.mset({k.decode(): "init" for k in keys})

            async def writer(w: int) -> None:
                for n in range(150):
                    keys = groups[(w + n) % len(groups)]
                    try:
                        await kv.mset({k.decode(): f"w{w}-{n}" for k in keys})
                        counts["ok"] += 1
                    except KVMemoError as exc:
                        errors[exc.kind] = errors.get(exc.kind, 0) + 1
                    await trio.sleep(0.001)

            async def reader(r: int) -> None:
                for n in range(400):
                    try:
                        seen.append(await kv.mget(*groups[(r + n) % len(groups)]))
                    except KVMemoError as exc:
                        errors[exc.kind] = errors.get(exc.kind, 0) + 1
                    await trio.sleep(0.0005)

            async def killer(done: trio.Event) -> None:
                while not done.is_set():
                    await trio.sleep(rng.uniform(0.01, 0.03))
                    if kv.kill_actor(shard_name(rng.randrange(4))):
                        counts["kills"] += 1

            done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer, done)
                async with trio.open_nursery() as work:
                    for w in range(6):
                        work.start_soon(writer, w)
                    for r in range(3):
                        work.start_soon(reader, r)
                done.set()
            for s in range(4):
                with trio.fail_after(5):
                    while True:
                        try:
                            ok = await kv.system.ref(shard_name(s)).ask(
                                Inspect(ShardStore.check_invariants)
                            )
                            break
                        except Exception:  # noqa: BLE001 - restarting: ask again
                            await trio.sleep(0.01)
                assert ok
            final = [await kv.mget(*keys) for keys in groups]
            assert kv.engine.tracker.used == sum([await used_of(kv, s) for s in range(4)])
    for values in seen + final:
        assert len(set(values)) == 1, values
    assert set(errors) <= {"UNAVAILABLE", "TIMEOUT"}, errors
    # The kills happened, under load (real time for the durable run: looser bounds).
    assert counts["kills"] >= (3 if persistence else 10)
    assert counts["ok"] >= (50 if persistence else 200)
    if persistence:
        async with kvmemo.open_store(**settings_) as kv:
            again = [await kv.mget(*keys) for keys in groups]
        assert again == final
