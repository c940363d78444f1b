"""MSET and MSETNX are atomic across shards: no reader ever sees part of one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_persistence_groupsync import fail_next_sync_of

import kvmemo
from actors import ActorState, ActorSystem, EventKind
from kvmemo.commands import ops
from kvmemo.embedded import Store
from kvmemo.engine.engine import shard_name
from kvmemo.errors import KVMemoError
from kvmemo.storage.shard import Barrier, Hold, Inspect
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def spread_keys(kv: Store, per_shard: int, prefix: str = "k") -> list[str]:
    """Keys covering every shard, ``per_shard`` on each."""
    slots = kv.engine.slots
    buckets: dict[int, list[str]] = {i: [] for i in range(slots.shards)}
    i = 0
    while any(len(b) < per_shard for b in buckets.values()):
        name = f"{prefix}{i}"
        bucket = buckets[slots.shard_of(name.encode())]
        if len(bucket) < per_shard:
            bucket.append(name)
        i += 1
    return [name for bucket in buckets.values() for name in bucket]


def key_on(kv: Store, shard: int, prefix: str) -> str:
    i = 0
    while kv.engine.slots.shard_of(f"{prefix}{i}".encode()) != shard:
        i += 1
    return f"{prefix}{i}"


def keep_busy(kv: Store, shard: int, holds: int) -> None:
    """Queue ``holds`` holds of a round never decided on ``shard``: each keeps it
    busy for ``hold_timeout``, then aborts (giving back what it reserved)."""
    ref = kv.system.ref(shard_name(shard))
    for _ in range(holds):
        part = ops.MSet([(b"zz", b"1")], only_new=False).part([0])
        ref.tell_nowait(Hold(Barrier(2), 0, part))


async def wait_running(system: ActorSystem, name: str) -> None:
    """Wait until the actor ``name`` is running (again), by its lifecycle events."""
    async with system.events.subscribe() as events:
        if system.state(name) is ActorState.RUNNING:
            return
        async for event in events:
            if event.actor == name and event.kind in (EventKind.STARTED, EventKind.RESTARTED):
                return


async def test_concurrent_msets_are_each_seen_whole_by_every_mget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        names = spread_keys(kv, 3)
        await kv.mset(dict.fromkeys(names, "w0-0"))
        torn: list[list[bytes | None]] = []
        reads = 0

        async def writer(w: int) -> None:
            for n in range(40):
                await kv.mset(dict.fromkeys(names, f"w{w}-{n}"))

        async def reader() -> None:
            nonlocal reads
            for _ in range(60):
                values = await kv.mget(*names)
                reads += 1
                if len(set(values)) != 1:
                    torn.append(values)

        async with trio.open_nursery() as nursery:
            for w in range(3):
                nursery.start_soon(writer, w)
            for _ in range(4):
                nursery.start_soon(reader)
        assert torn == []
        assert reads == 240
        assert len(set(await kv.mget(*names))) == 1


async def test_of_two_racing_msetnx_on_overlapping_keys_exactly_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        for round_ in range(20):
            names = spread_keys(kv, 2, prefix=f"r{round_}:")
            first, second = names[:5], names[3:]
            results: dict[str, int] = {}

            async def attempt(label: str, keys: list[str]) -> None:
                results[label] = await kv.msetnx(dict.fromkeys(keys, label))  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, "a", first)
                nursery.start_soon(attempt, "b", second)
            assert sorted(results.values()) == [0, 1]
            winner = "a" if results["a"] else "b"
            won = first if winner == "a" else second
            lost = set(second if winner == "a" else first) - set(won)
            assert await kv.mget(*won) == [winner.encode()] * len(won)
            assert await kv.exists(*lost) == 0


# -- a property: random interleavings --------------------------------------------------------

READER_OPS = st.lists(
    st.tuples(st.sampled_from(["mget", "get"]), st.integers(0, 7), st.integers(0, 3)),
    min_size=1,
    max_size=15,
)


@settings(DETERMINISTIC, max_examples=30)
@given(
    shards=st.sampled_from([2, 3, 5]),
    writes=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    readers=st.lists(READER_OPS, min_size=1, max_size=4),
    msetnx_first=st.booleans(),
)
def test_random_interleavings_of_mset_and_reads_never_observe_a_torn_mset(
    shards: int,
    writes: list[int],
    readers: list[list[tuple[str, int, int]]],
    msetnx_first: bool,
) -> None:
    """One writer MSETs version n to every key (pausing for the drawn number of
    scheduler passes); readers MGET all keys or GET one. Every MGET sees one
    version; every reader sees versions that never go back; an MSETNX on a
    second group of keys is seen all-or-nothing.
    """

    async def scenario() -> None:
        async with kvmemo.open_store(shards=shards) as kv:
            names = [f"key{i}" for i in range(8)]
            group = [f"nx{i}" for i in range(6)]
            failures: list[str] = []

            async def pause(n: int) -> None:
                for _ in range(n):
                    await trio.lowlevel.checkpoint()

            async def writer() -> None:
                if msetnx_first:
                    await kv.msetnx(dict.fromkeys(group, "nx"))
                for version, gap in enumerate(writes, start=1):
                    await kv.mset(dict.fromkeys(names, str(version)))
                    await pause(gap)
                if not msetnx_first:
                    await kv.msetnx(dict.fromkeys(group, "nx"))

            async def reader(ops: list[tuple[str, int, int]]) -> None:
                last = 0
                for op, n, gap in ops:
                    if op == "mget":
                        values = await kv.mget(*names)
                        if len(set(values)) != 1:
                            failures.append(f"torn MGET {values}")
                        seen = await kv.mget(*group)
                        if len(set(seen)) != 1:
                            failures.append(f"torn MSETNX {seen}")
                        value = values[0]
                    else:
                        value = await kv.get(names[n])
                    version = 0 if value is None else int(value)
                    if version < last:
                        failures.append(f"went back from {last} to {version}")
                    last = version
                    await pause(gap)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                for ops in readers:
                    nursery.start_soon(reader, ops)
            assert failures == []
            assert await kv.mget(*names) == [str(len(writes)).encode()] * len(names)
            assert await kv.mget(*group) == [b"nx"] * len(group)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# -- failures inside an atomic write ---------------------------------------------------------


async def test_an_mset_over_the_memory_limit_applies_on_no_shard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, maxmemory=20_000, eviction_policy="noeviction") as kv:
        names = spread_keys(kv, 2)
        await kv.mset(dict.fromkeys(names, "old"))
        used = kv.engine.tracker.used
        big = {name: ("x" * 4000 if i == 0 else "new") for i, name in enumerate(names)}
        big.update({f"extra{i}": "x" * 4000 for i in range(4)})
        with pytest.raises(KVMemoError) as caught:
            await kv.mset(big)
        assert caught.value.kind == "OOM"
        assert await kv.mget(*names) == [b"old"] * len(names)
        assert await kv.exists(*(f"extra{i}" for i in range(4))) == 0
        assert kv.engine.tracker.used == used


async def test_an_mset_touching_a_restarting_shard_is_unavailable_and_applies_nowhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=3, restart_backoff=0.5, restart_backoff_max=1.0) as kv:
        names = spread_keys(kv, 2)
        await kv.mset(dict.fromkeys(names, "old"))
        kv.kill_actor(shard_name(2))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KVMemoError) as caught:
            await kv.mset(dict.fromkeys(names, "new"))
        assert caught.value.kind == "UNAVAILABLE"
        assert caught.value.data["retry_after_ms"] > 0
        await wait_running(kv.system, shard_name(2))
        assert await kv.mget(*names) == [b"old"] * len(names)


async def test_an_mset_aborted_because_a_shard_held_too_long_is_not_reported_as_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every shard would vote yes, but one comes back only after the others'
    hold timed out: the write is aborted everywhere, and the caller must hear
    so (TIMEOUT, not applied), not "OK", and at once, not when the slow shard
    finally answers.
    """
    async with kvmemo.open_store(shards=2, hold_timeout=0.5) as kv:
        a, b = key_on(kv, 0, "a"), key_on(kv, 1, "b")
        await kv.mset({a: "old", b: "old"})
        # Keep shard 1 busy for two hold timeouts: two holds of a round that
        # is never decided (each waits hold_timeout, then aborts).
        keep_busy(kv, 1, 2)
        started = trio.current_time()
        with pytest.raises(KVMemoError) as caught:
            await kv.mset({a: "new", b: "new"})
        assert caught.value.kind == "TIMEOUT"
        assert caught.value.data["applied"] is False
        assert trio.current_time() - started < 0.6  # shard 0's hold timeout, not shard 1's delay
        assert await kv.mget(a, b) == [b"old", b"old"]
        assert await kv.exists("zz") == 0
        for i in range(2):
            ref = kv.system.ref(shard_name(i))
            assert await ref.ask(Inspect(ShardStore.check_invariants))
        assert kv.engine.tracker.used == sum(
            [await kv.system.ref(shard_name(i)).ask(Inspect(lambda s: s.used)) for i in range(2)]
        )


async def test_an_mset_whose_shard_is_killed_with_its_hold_queued_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The killed shard would prepare only after its restart backoff: the MSET
    gets UNAVAILABLE (nothing applied) at once instead of holding the other
    shards, and the writer lock, until then."""
    async with kvmemo.open_store(
        shards=2, hold_timeout=5.0, restart_backoff=1.0, restart_backoff_max=1.0
    ) as kv:
        a, b = key_on(kv, 0, "a"), key_on(kv, 1, "b")
        await kv.mset({a: "old", b: "old"})
        outcome: dict[str, Any] = {}

        async def mset() -> None:
            try:
                outcome["result"] = await kv.mset({a: "new", b: "new"})
            except KVMemoError as exc:
                outcome["error"] = exc
            outcome["at"] = trio.current_time()

        # Hold the engine's transaction lock as a reader would, so that the
        # MSET passes its shard check, then waits; kill shard 1 meanwhile.
        lock = kv.engine._txn_lock
        await lock.acquire(write=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mset)
            await trio.testing.wait_all_tasks_blocked()
            kv.kill_actor(shard_name(1))
            await trio.testing.wait_all_tasks_blocked()
            released = trio.current_time()
            lock.release(write=False)
        assert "result" not in outcome, f"a refused MSET answered {outcome.get('result')!r}"
        assert outcome["error"].kind == "UNAVAILABLE"
        assert outcome["at"] - released < 0.1  # not the 1 s restart, nor the 5 s hold
        await wait_running(kv.system, shard_name(1))
        assert await kv.mget(a, b) == [b"old", b"old"]
        for i in range(2):
            ref = kv.system.ref(shard_name(i))
            assert await ref.ask(Inspect(ShardStore.check_invariants))


async def test_concurrent_msets_are_grouped_and_each_stays_atomic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import kvmemo

    async with kvmemo.open_store(shards=8) as kv:
        groups = [[f"g{g}:{i}" for i in range(6)] for g in range(20)]
        seen: list[list[bytes | None]] = []

        async def writer(g: int) -> None:
            for round_ in range(10):
                await kv.mset({k: f"{g}-{round_}" for k in groups[g]})

        async def reader() -> None:
            for _ in range(200):
                for keys in groups[:5]:
                    seen.append(await kv.mget(*keys))

        async with trio.open_nursery() as nursery:
            for g in range(20):
                nursery.start_soon(writer, g)
            nursery.start_soon(reader)
        for values in seen:
            assert len(set(values)) == 1, values  # never two different MSETs in one group
        for g, keys in enumerate(groups):
            assert await kv.mget(*keys) == [f"{g}-9".encode()] * 6
        assert not kv.engine._mset_leading
        assert not kv.engine._mset_waiting


async def test_a_waiting_mset_cancelled_by_its_caller_does_not_stall_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import kvmemo

    async with kvmemo.open_store(shards=8) as kv:

        async def mset(g: int) -> None:
            await kv.mset({f"c{g}:{i}": str(g) for i in range(4)})

        async with trio.open_nursery() as nursery:
            for g in range(10):
                nursery.start_soon(mset, g)
            await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await mset(99)
            assert await kv.get("c99:0") == b"99"
        assert not kv.engine._mset_leading


async def test_msets_waiting_behind_a_stuck_round_time_out_and_the_lead_is_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A round stuck past request_timeout: its leader and every MSET waiting
    for the next round get TIMEOUT at their deadline (waiters through the ask
    deadlines, not a cancel scope each), and the next MSET leads a round of
    its own instead of waiting forever for a lead nobody passed on."""
    import kvmemo

    async with kvmemo.open_store(shards=4, request_timeout=1.0) as kv:
        outcomes: dict[int, str] = {}

        async def mset(g: int) -> None:
            try:
                await kv.mset({f"t{g}:{i}": str(g) for i in range(4)})
            except KVMemoError as exc:
                outcomes[g] = f"{exc.kind} {exc.data['applied']}"
            else:
                outcomes[g] = "OK"

        lock = kv.engine._txn_lock
        await lock.acquire(write=False)  # the first round waits for the writer lock
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for g in range(5):  # all at the same instant: the same deadline
                nursery.start_soon(mset, g)
            await trio.testing.wait_all_tasks_blocked()
            assert len(kv.engine._mset_waiting) == 4  # one leads, four wait
        assert trio.current_time() - started == pytest.approx(1.0)
        # The leader's round was cut (applied: unknown); a waiter gets TIMEOUT from
        # its own deadline (unknown) or, found late by the next leader, not applied.
        assert all(outcomes[g] in ("TIMEOUT None", "TIMEOUT False") for g in range(5))
        lock.release(write=False)
        assert not kv.engine._mset_leading
        assert not kv.engine._mset_waiting
        with trio.fail_after(0.5):
            await mset(9)
        assert outcomes[9] == "OK"
        assert await kv.get("t9:0") == b"9"
        assert await kv.exists(*(f"t{g}:0" for g in range(5))) == 0  # none was applied


async def test_the_mset_lead_skips_waiters_that_left_or_ran_out_of_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter whose slot is done (it left) cannot lead; one past its deadline
    gets TIMEOUT, not applied, instead of a lead it has no time to use; the
    lead goes to the next waiter in time, or leadership ends."""
    import kvmemo
    from actors import ReplySlot
    from kvmemo.commands import ops
    from kvmemo.engine.engine import _LEAD

    async with kvmemo.open_store(shards=2) as kv:
        engine = kv.engine
        now = trio.current_time()
        left, late, waiting = ReplySlot(), ReplySlot(), ReplySlot()
        left.fail(RuntimeError("its deadline"))
        op = ops.MSet([(b"k", b"v")], only_new=False)
        engine._mset_leading = True
        engine._mset_waiting = [(op, left, now + 5), (op, late, now), (op, waiting, now + 5)]
        engine._promote_mset_leader()
        with pytest.raises(KVMemoError) as caught:
            late.result()
        assert (caught.value.kind, caught.value.data["applied"]) == ("TIMEOUT", False)
        assert waiting.done
        assert waiting.result() is _LEAD
        assert engine._mset_waiting == [(op, waiting, now + 5)]
        assert engine._mset_leading
        engine._mset_waiting = [(op, left, now + 5)]
        engine._promote_mset_leader()
        assert engine._mset_waiting == []
        assert not engine._mset_leading


async def test_a_waiting_mset_keeps_its_own_deadline_whoever_leads_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """L leads a round stuck until t=1.2; W (deadline 1.0) and X (deadline 1.5)
    wait. At t=1.0 L and W time out; X, with time left, leads its own round
    and succeeds once the round can run, instead of failing with L's round."""
    import kvmemo

    async with kvmemo.open_store(shards=4, request_timeout=1.0) as kv:
        outcomes: dict[str, str] = {}

        async def mset(name: str) -> None:
            try:
                await kv.mset({f"{name}:{i}": name for i in range(4)})
            except KVMemoError as exc:
                outcomes[name] = f"{exc.kind} {exc.data['applied']}"
            else:
                outcomes[name] = "OK"

        lock = kv.engine._txn_lock
        await lock.acquire(write=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mset, "L")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(mset, "W")
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.5)
            nursery.start_soon(mset, "X")
            await trio.sleep(0.7)  # t = 1.2
            lock.release(write=False)
        assert outcomes["L"] == "TIMEOUT None"  # its round was cut at its deadline
        assert outcomes["W"].startswith("TIMEOUT")
        assert outcomes["X"] == "OK"
        assert await kv.get("X:0") == b"X"
        assert await kv.exists("W:0") == 0


def grouped_msets(kv: Store) -> dict[str, dict[str, str]]:
    """A (shards 0, 1), B (shards 2, 3) and C (shards 0, 1): B and C can share a round."""
    return {
        "A": {key_on(kv, 0, "a"): "a", key_on(kv, 1, "a"): "a"},
        "B": {key_on(kv, 2, "b"): "b", key_on(kv, 3, "b"): "b"},
        "C": {key_on(kv, 0, "c"): "c", key_on(kv, 1, "c"): "c"},
    }


async def run_b_and_c_in_one_round(
    kv: Store, msets: dict[str, dict[str, str]], before_their_round: Callable[[], None]
) -> dict[str, str]:
    """Run A's round, with B and C queued behind it for the next; each one's kind (or OK).

    ``before_their_round`` runs once B and C are queued, before A's round is let go.
    """
    outcomes: dict[str, str] = {}

    async def mset(name: str) -> None:
        try:
            await kv.mset(msets[name])
        except KVMemoError as exc:
            outcomes[name] = exc.kind
        else:
            outcomes[name] = "OK"

    lock = kv.engine._txn_lock
    await lock.acquire(write=False)  # A's round waits; B and C queue for the next
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mset, "A")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(mset, "B")
        nursery.start_soon(mset, "C")
        await trio.testing.wait_all_tasks_blocked()
        assert len(kv.engine._mset_waiting) == 2  # B and C, for the round after A's
        before_their_round()
        await trio.testing.wait_all_tasks_blocked()
        lock.release(write=False)
    return outcomes


async def test_a_shard_down_in_a_grouped_round_fails_only_the_msets_that_touch_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4, restart_backoff=30.0, restart_backoff_max=30.0) as kv:
        msets = grouped_msets(kv)
        outcomes = await run_b_and_c_in_one_round(
            kv,
            msets,
            lambda: kv.kill_actor(shard_name(3)),  # after B passed its shard check
        )
        assert outcomes == {"A": "OK", "B": "UNAVAILABLE", "C": "OK"}
        assert await kv.mget(*msets["C"]) == [b"c", b"c"]


def crash_in(monkeypatch: pytest.MonkeyPatch, step: str, key: bytes) -> None:
    """Make ``_MSetPart.<step>`` (prepare or commit) crash its shard for a part holding ``key``."""
    real = getattr(ops._MSetPart, step)

    def crashing(part: ops._MSetPart, store: ShardStore, now: float) -> Any:
        if any(k == key for k, _ in part.items):
            raise RuntimeError("a bug in the shard")
        return real(part, store, now)

    monkeypatch.setattr(ops._MSetPart, step, crashing)


async def test_a_shard_crashing_in_a_grouped_round_fails_only_the_msets_that_touch_it(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # As above, but the shard crashes while it prepares its part (INTERNAL,
    # not UNAVAILABLE): the round aborted everywhere, so C, which does not
    # touch that shard, gets its own try and succeeds.
    async with kvmemo.open_store(shards=4, restart_backoff=30.0, restart_backoff_max=30.0) as kv:
        msets = grouped_msets(kv)
        crash_in(monkeypatch, "prepare", key_on(kv, 3, "b").encode())
        outcomes = await run_b_and_c_in_one_round(kv, msets, lambda: None)
        assert outcomes["A"] == outcomes["C"] == "OK"
        assert outcomes["B"] in ("INTERNAL", "UNAVAILABLE")
        assert await kv.mget(*msets["C"]) == [b"c", b"c"]
        assert await kv.get(key_on(kv, 2, "b")) is None  # B applied nowhere


async def test_a_shard_failing_after_a_grouped_round_committed_fails_only_the_msets_on_it(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The round committed, then the shard crashed in its commit (as a kill
    # during its group commit's sync ends it): B, which touches that shard,
    # gets INTERNAL with applied unknown; C, whose shards both committed, OK.
    async with kvmemo.open_store(shards=4, restart_backoff=30.0, restart_backoff_max=30.0) as kv:
        msets = grouped_msets(kv)
        crash_in(monkeypatch, "commit", key_on(kv, 3, "b").encode())
        outcomes = await run_b_and_c_in_one_round(kv, msets, lambda: None)
        assert outcomes == {"A": "OK", "B": "INTERNAL", "C": "OK"}
        assert await kv.mget(*msets["C"]) == [b"c", b"c"]
        assert await kv.get(key_on(kv, 2, "b")) == b"b"  # committed there


async def test_a_failed_sync_after_a_grouped_round_committed_fails_only_the_msets_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With appendfsync always, shard 3's group commit fails to sync: B gets
    # IO (applied unknown); C was made durable by its own shards, so OK.
    failing = fail_next_sync_of(monkeypatch, shard_name(3))
    data_dir = str(tmp_path)
    with trio.fail_after(30):
        # Each shard's log synced itself: a failed commit log frame fails its
        # round as a whole (see test_persistence_commitlog).
        async with kvmemo.open_store(
            shards=4, data_dir=data_dir, appendfsync="always", fsync_method="fsync"
        ) as kv:
            msets = grouped_msets(kv)
            outcomes = await run_b_and_c_in_one_round(kv, msets, lambda: None)
            assert outcomes == {"A": "OK", "B": "IO", "C": "OK"}
        assert not failing  # the sync did fail
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*msets["A"], *msets["C"]) == [b"a", b"a", b"c", b"c"]


async def test_an_mget_whose_shard_is_killed_with_its_read_queued_does_not_hold_the_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The read gives up (UNAVAILABLE) instead of keeping the reader lock, and
    with it every MSET and every MGET queued behind one, until the restart."""
    async with kvmemo.open_store(shards=2, restart_backoff=1.0, restart_backoff_max=1.0) as kv:
        a, b = key_on(kv, 0, "a"), key_on(kv, 1, "b")
        await kv.mset({a: "old", b: "old"})
        outcome: dict[str, Any] = {}

        async def mget() -> None:
            try:
                outcome["result"] = await kv.mget(a, b)
            except KVMemoError as exc:
                outcome["error"] = exc
            outcome["at"] = trio.current_time()

        lock = kv.engine._txn_lock
        await lock.acquire(write=True)  # the MGET passes its shard check, then waits here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mget)
            await trio.testing.wait_all_tasks_blocked()
            kv.kill_actor(shard_name(1))
            await trio.testing.wait_all_tasks_blocked()
            released = trio.current_time()
            lock.release(write=True)
        assert outcome["error"].kind == "UNAVAILABLE"
        assert outcome["at"] - released < 0.1  # not the 1 s restart
        await wait_running(kv.system, shard_name(1))
        assert await kv.mget(a, b) == [b"old", b"old"]
