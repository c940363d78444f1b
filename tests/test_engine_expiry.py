"""Expiry through the actors: lazy expiry, sweeps under a budget, a corrupted index,
a killed ttl-manager. Time is a MockClock: nothing here waits in real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmemo
from actors import (
    Actor,
    ActorState,
    ActorSystem,
    ChildSpec,
    EventKind,
    Supervisor,
    open_actor_system,
)
from kvmemo.config import StoreConfig
from kvmemo.embedded import Store
from kvmemo.engine.engine import TTL_MANAGER, KVEngine, shard_name
from kvmemo.expiry.ttl_manager import MAX_CATCHUP_SWEEPS, TTLManager
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@asynccontextmanager
async def running(engine: KVEngine) -> AsyncIterator[Store]:
    """Run an engine built by the test (so it can wrap the engine's methods first)."""
    async with trio.open_nursery() as nursery:
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        try:
            yield Store(engine, system, nursery.cancel_scope)
        finally:
            nursery.cancel_scope.cancel()


async def inspect(kv: Store, shard: int, fn: Callable[[ShardStore], Any]) -> Any:
    return await kv.system.ref(shard_name(shard)).ask(Inspect(fn))


async def on_every_shard(kv: Store, fn: Callable[[ShardStore], Any]) -> list[Any]:
    return [await inspect(kv, i, fn) for i in range(kv.engine.config.shards)]


async def wait_running(system: ActorSystem, name: str) -> None:
    """Wait until the actor ``name`` is running (again), by its lifecycle events."""
    async with system.events.subscribe() as events:
        if system.state(name) is ActorState.RUNNING:
            return
        async for event in events:
            if event.actor == name and event.kind in (EventKind.STARTED, EventKind.RESTARTED):
                return


def raw_keys(store: ShardStore) -> set[bytes]:
    return set(store.data)


# -- lazy expiry -------------------------------------------------------------------------


async def test_no_command_serves_a_key_past_its_expiry_before_any_sweep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=3, ttl_tick=1000.0) as kv:
        names = [f"k{i}" for i in range(30)]
        for name in names:
            await kv.set(name, "v", px=100)
        await kv.set("live", "v")
        await trio.sleep(0.05)
        assert await kv.mget(*names[:3]) == [b"v"] * 3
        await trio.sleep(0.06)
        # The manager has not swept (tick 1000 s): the entries are still there...
        present = sum(len(keys) for keys in await on_every_shard(kv, raw_keys))
        assert present == 31
        # ...and no command sees them.
        assert await kv.dbsize() == 1
        assert await kv.keys("*") == [b"live"]
        assert [k async for k in kv.scan_iter()] == [b"live"]
        assert await kv.exists(*names) == 0
        assert await kv.mget(*names) == [None] * 30
        info = await kv.info("keyspace")
        assert info["keyspace"]["keys"] == 1
        assert info["keyspace"]["expires"] == 0


EXPIRY_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 5), st.none() | st.integers(1, 300)),
        st.tuples(st.just("expire"), st.integers(0, 5), st.integers(-50, 300)),
        st.tuples(st.just("persist"), st.integers(0, 5), st.none()),
        st.tuples(st.just("advance"), st.integers(0, 200), st.none()),
        st.tuples(st.just("read"), st.integers(0, 5), st.none()),
    ),
    max_size=40,
)


@settings(DETERMINISTIC, max_examples=40)
@given(ops=EXPIRY_OPS, shards=st.sampled_from([1, 3]), budget=st.sampled_from([1, 1000]))
def test_expiry_is_never_served_and_never_early(
    ops: list[tuple[str, int, int | None]], shards: int, budget: int
) -> None:
    """Against a model in virtual time: a key is served exactly while it is live.

    The clock moves only by the test's jumps, so every command runs at a known
    time; the ttl-manager sweeps meanwhile (tick 50 ms, small budget).
    """

    async def scenario() -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        model: dict[str, tuple[bytes, float | None]] = {}
        async with kvmemo.open_store(shards=shards, ttl_tick=0.05, expiry_budget=budget) as kv:
            for step, (op, n, arg) in enumerate(ops):
                now = trio.current_time()
                key = f"key{n}"
                live = key in model and (model[key][1] is None or model[key][1] > now)  # type: ignore[operator]
                if op == "set":
                    value = b"v%d" % step
                    await kv.set(key, value, px=arg)
                    model[key] = (value, None if arg is None else now + arg / 1000)
                elif op == "expire":
                    assert arg is not None
                    assert await kv.pexpire(key, arg) == int(live)
                    if live:
                        if arg <= 0:
                            del model[key]
                        else:
                            model[key] = (model[key][0], now + arg / 1000)
                elif op == "persist":
                    has_ttl = live and model[key][1] is not None
                    assert await kv.persist(key) == int(has_ttl)
                    if has_ttl:
                        model[key] = (model[key][0], None)
                elif op == "advance":
                    clock.jump(n / 1000)
                    await trio.testing.wait_all_tasks_blocked()  # let the manager sweep
                else:
                    expected = model[key][0] if live else None
                    assert await kv.get(key) == expected
                    deadline = model[key][1] if live else None
                    pttl = (
                        -2
                        if not live
                        else -1
                        if deadline is None
                        else round((deadline - now) * 1000)
                    )
                    assert await kv.pttl(key) == pttl
                now = trio.current_time()
                live_keys = sorted(k for k, (_, t) in model.items() if t is None or t > now)
                assert sorted(await kv.keys("*")) == [k.encode() for k in live_keys]
                assert await kv.dbsize() == len(live_keys)

    trio.run(scenario, clock=trio.testing.MockClock())


# -- active expiry -----------------------------------------------------------------------


async def test_a_sweep_removes_at_most_the_budget_per_shard_and_reports_a_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, ttl_tick=1000.0, expiry_budget=10) as kv:
        await kv.mset({f"p{i}": "v" for i in range(5)})
        for i in range(60):
            await kv.set(f"k{i}", "v", px=100)
        await trio.sleep(0.2)
        per_shard = [len(keys) - 0 for keys in await on_every_shard(kv, raw_keys)]
        assert sum(per_shard) == 65
        total = 0
        sweeps = 0
        while True:
            removed, backlog = await kv.engine.process_expired()
            assert removed <= 10 * 2
            total += removed
            sweeps += 1
            if not backlog:
                break
        assert total == 60
        assert sweeps >= 3
        assert sum(len(keys) for keys in await on_every_shard(kv, raw_keys)) == 5
        assert (await kv.info("stats"))["stats"]["expired_keys"] == 60


async def test_the_ttl_manager_works_a_backlog_off_over_following_ticks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = 5
    engine = KVEngine(StoreConfig(shards=1, ttl_tick=0.1, expiry_budget=budget))
    sweeps: list[tuple[float, int]] = []
    sweep = engine.process_expired
    all_gone = trio.Event()

    async def recording_sweep() -> tuple[int, bool]:
        removed, backlog = await sweep()
        sweeps.append((trio.current_time(), removed))
        if sum(n for _, n in sweeps) == 300:
            all_gone.set()
        return removed, backlog

    engine.process_expired = recording_sweep  # type: ignore[method-assign]
    async with running(engine) as kv:
        for i in range(300):
            await kv.set(f"k{i}", "v", px=50)
        await all_gone.wait()
        assert await kv.dbsize() == 0
    assert max(removed for _, removed in sweeps) <= budget
    per_tick: dict[float, int] = {}
    for at, removed in sweeps:
        per_tick[at] = per_tick.get(at, 0) + removed
    busy_ticks = [n for n in per_tick.values() if n]
    assert max(busy_ticks) <= budget * (1 + MAX_CATCHUP_SWEEPS)
    assert len(busy_ticks) >= 300 // (budget * (1 + MAX_CATCHUP_SWEEPS))


async def test_reconciliation_runs_every_reconcile_every_ticks_even_with_a_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Catch-up sweeps must not make the reconciliation schedule skip its turns."""
    reconciled: list[float] = []

    async def always_behind() -> tuple[int, bool]:
        await trio.lowlevel.checkpoint()
        return 1, True

    async def reconcile() -> int:
        reconciled.append(trio.current_time())
        return 0

    def start(ctx: Any) -> Actor:
        return TTLManager(always_behind, reconcile, tick=0.1, reconcile_every=11)

    root = Supervisor("root", [ChildSpec("ttl", start=start)])
    async with open_actor_system(root):
        started = trio.current_time()
        await trio.sleep(3.35)
    ticks = [round((t - started) / 0.1) for t in reconciled]
    assert ticks == [11, 22, 33]


async def test_a_corrupted_ttl_index_loses_no_live_key_serves_no_expired_one_and_is_repaired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(
        shards=2, ttl_tick=0.1, reconcile_every=5, expiry_budget=100
    ) as kv:
        long = [f"long{i}" for i in range(40)]
        short = [f"short{i}" for i in range(40)]
        unread = [f"unread{i}" for i in range(40)]
        plain = [f"plain{i}" for i in range(40)]
        for name in long:
            await kv.set(name, name, ex=100)
        for name in short + unread:
            await kv.set(name, name, px=200)
        await kv.mset({name: name for name in plain})
        now = trio.current_time()

        def corrupt(store: ShardStore) -> None:
            for key, at in list(store.expires.items())[::2]:
                store.ttl_index.discard(key, at)  # lose half the schedule
            for key in list(store.data)[::3]:
                store.ttl_index.add(key, now + 0.05)  # stale pairs, due soon
            store.ttl_index.add(b"ghost", now + 0.05)

        await on_every_shard(kv, corrupt)
        assert not any(await on_every_shard(kv, ShardStore.ttl_index_consistent))

        failures: list[str] = []

        async def reader() -> None:
            while trio.current_time() < now + 1.0:
                t = trio.current_time()
                for name in long + plain:
                    if await kv.get(name) != name.encode():
                        failures.append(f"{name} lost at {t - now:.3f}")
                for name in short:
                    value = await kv.get(name)
                    if value is not None and t >= now + 0.2:
                        failures.append(f"{name} served after its expiry")
                await trio.sleep(0.01)

        async def writer() -> None:
            for i in range(200):
                await kv.set(f"other{i % 20}", str(i), px=30)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert failures == []
        # The ttl-manager reconciled (every 5 ticks) and then swept what the
        # lost schedule had hidden: the unread short keys are gone for good.
        assert all(await on_every_shard(kv, ShardStore.ttl_index_consistent))
        present = set().union(*await on_every_shard(kv, raw_keys))
        assert not present & {name.encode() for name in short + unread}
        for name in long:
            assert 98 <= await kv.ttl(name) <= 100
        for name in plain:
            assert await kv.ttl(name) == -1
        assert all(await on_every_shard(kv, ShardStore.check_invariants))


async def test_reconcile_ttl_reports_the_shards_it_repaired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=3, ttl_tick=1000.0) as kv:
        for i in range(30):
            await kv.set(f"k{i}", "v", ex=100)
        assert await kv.engine.reconcile_ttl() == 0
        await inspect(kv, 1, lambda s: s.ttl_index.clear())
        assert await kv.engine.reconcile_ttl() == 1
        assert all(await on_every_shard(kv, ShardStore.ttl_index_consistent))


# -- a killed ttl-manager ------------------------------------------------------------------


async def test_while_the_ttl_manager_is_down_expired_keys_are_never_served_then_purged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(
        shards=2, ttl_tick=0.05, restart_backoff=0.5, restart_backoff_max=1.0
    ) as kv:
        read = [f"read{i}" for i in range(30)]
        unread = [f"unread{i}" for i in range(30)]
        plain = [f"plain{i}" for i in range(30)]
        for name in read + unread:
            await kv.set(name, "v", px=100)
        await kv.mset({name: name for name in plain})
        assert kv.kill_actor(TTL_MANAGER)
        await trio.testing.wait_all_tasks_blocked()
        assert kv.system.state(TTL_MANAGER) is ActorState.RESTARTING
        start = trio.current_time()
        failures: list[str] = []

        async def load() -> None:
            # Reads and writes keep going the whole time, on every shard.
            while kv.system.state(TTL_MANAGER) is not ActorState.RUNNING:
                for name in read:
                    if await kv.get(name) is not None and trio.current_time() >= start + 0.1:
                        failures.append(f"{name} served")
                for name in plain:
                    if await kv.get(name) != name.encode():
                        failures.append(f"{name} lost")
                await kv.set("counter", str(trio.current_time()))
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await trio.sleep(0.3)
            # Down and expired: the unread keys are still stored, yet invisible.
            assert kv.system.state(TTL_MANAGER) is ActorState.RESTARTING
            stored = set().union(*await on_every_shard(kv, raw_keys))
            assert {name.encode() for name in unread} <= stored
            assert await kv.exists(*unread) == 0
            assert await kv.dbsize() == len(plain) + 1
        assert failures == []
        assert kv.system.events.count(TTL_MANAGER, EventKind.RESTARTED) == 1
        # The restarted manager purged them at once, without any read.
        await trio.testing.wait_all_tasks_blocked()
        stored = set().union(*await on_every_shard(kv, raw_keys))
        assert stored == {name.encode() for name in plain} | {b"counter"}


@pytest.mark.parametrize("fault", ["kill", "inject"])
async def test_a_crashing_ttl_manager_takes_nothing_else_down(
    fault: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=2, ttl_tick=0.05) as kv:
        for i in range(20):
            await kv.set(f"k{i}", "v", px=100)
        for _ in range(3):
            await wait_running(kv.system, TTL_MANAGER)
            if fault == "kill":
                kv.kill_actor(TTL_MANAGER)
            else:
                kv.system.inject_fault(TTL_MANAGER)
                await kv.system.ref(TTL_MANAGER).tell(object())
            await trio.sleep(0.06)
        await wait_running(kv.system, TTL_MANAGER)
        await trio.sleep(0.2)
        assert await kv.dbsize() == 0
        assert all(a["state"] == "running" for a in kv.actors())
        assert sum(len(keys) for keys in await on_every_shard(kv, raw_keys)) == 0
