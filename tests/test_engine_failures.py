"""Failure isolation of the shards, under concurrent load (virtual time)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import kvmemo
from actors import ActorState, ActorSystem, EventKind
from kvmemo.embedded import Store
from kvmemo.engine.engine import shard_name
from kvmemo.errors import KVMemoError
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import ShardStore

VICTIM = 1


def keys_on(kv: Store, shard: int, count: int, prefix: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        name = f"{prefix}{i}"
        if kv.engine.slots.shard_of(name.encode()) == shard:
            out.append(name)
        i += 1
    return out


async def wait_restarted(system: ActorSystem, name: str, times: int = 1) -> None:
    """Wait until ``name`` has been restarted ``times`` times in all, by its events."""
    async with system.events.subscribe() as events:
        if system.events.count(name, EventKind.RESTARTED) >= times:
            return
        async for event in events:
            if event.actor == name and event.kind is EventKind.RESTARTED:
                if system.events.count(name, EventKind.RESTARTED) >= times:
                    return


async def test_a_killed_shard_isolates_its_failure_and_loses_no_acknowledged_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(
        shards=4, restart_backoff=0.05, restart_backoff_max=0.2, max_restarts=50
    ) as kv:
        victim = shard_name(VICTIM)
        acked: dict[str, int] = {}
        failures: list[str] = []
        unavailable = 0
        served_during_restart = 0
        done = trio.Event()

        async def client(shard: int, c: int) -> None:
            nonlocal unavailable, served_during_restart
            names = keys_on(kv, shard, 3, f"s{shard}c{c}-")
            n = 0
            while not done.is_set():
                n += 1
                key = names[n % 3]
                try:
                    with trio.fail_after(1.0):  # never hangs (virtual seconds)
                        await kv.set(key, str(n))
                        acked[key] = n
                        value = await kv.get(key)
                        if value != str(n).encode():
                            failures.append(f"{key}: read {value!r} after writing {n}")
                except KVMemoError as exc:
                    if shard != VICTIM or exc.kind != "UNAVAILABLE":
                        failures.append(f"{key}: {exc.kind} {exc}")
                    unavailable += 1
                except trio.TooSlowError:
                    failures.append(f"{key}: hung")
                if shard != VICTIM and kv.system.state(victim) is not ActorState.RUNNING:
                    served_during_restart += 1
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            for shard in range(4):
                for c in range(3):
                    nursery.start_soon(client, shard, c)
            for kill in range(1, 6):
                await trio.sleep(0.1)
                assert kv.kill_actor(victim)
                await wait_restarted(kv.system, victim, kill)
            await trio.sleep(0.05)
            done.set()
        assert failures == []
        assert kv.system.events.count(victim, EventKind.RESTARTED) == 5
        assert unavailable > 0, "the victim's own requests met its restarts"
        assert served_during_restart > 0, "the other shards served meanwhile"
        for key, n in acked.items():
            assert await kv.get(key) == str(n).encode(), key
        ref = kv.system.ref(victim)
        assert await ref.ask(Inspect(ShardStore.check_invariants))


async def test_requests_to_a_restarting_shard_wait_or_are_refused_never_hang(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, restart_backoff=0.3, restart_backoff_max=0.3) as kv:
        (key,) = keys_on(kv, VICTIM, 1, "k")
        (other,) = keys_on(kv, 0, 1, "o")
        await kv.mset({key: "v", other: "w"})
        ref = kv.system.ref(shard_name(VICTIM))
        assert kv.kill_actor(shard_name(VICTIM))
        await trio.testing.wait_all_tasks_blocked()
        assert ref.state is ActorState.RESTARTING
        # A request that reaches the mailbox while the shard is down (one in
        # flight at the kill) waits for the next incarnation: the mailbox
        # survives the restart.
        _, op = kv.engine.parse("get", [key.encode()])
        queued = ref.ask_nowait(op)
        await trio.testing.wait_all_tasks_blocked()
        assert not queued.done
        # A request made while it is down is refused at once, with a hint.
        for call in (
            lambda: kv.get(key),
            lambda: kv.mget(key, other),
            lambda: kv.exists(other, key),
        ):
            with pytest.raises(KVMemoError) as caught:
                await call()
            assert caught.value.kind == "UNAVAILABLE"
            assert 0 < caught.value.data["retry_after_ms"] <= 330  # the backoff, jitter included
        assert await kv.get(other) == b"w"
        with trio.fail_after(1.0):
            assert await queued.wait() == b"v"
        assert ref.state is ActorState.RUNNING
        assert await kv.get(key) == b"v"


async def test_a_multi_key_delete_touching_a_restarting_shard_deletes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, restart_backoff=0.3, restart_backoff_max=0.3) as kv:
        (key,) = keys_on(kv, VICTIM, 1, "k")
        (other,) = keys_on(kv, 0, 1, "o")
        await kv.mset({key: "v", other: "w"})
        kv.kill_actor(shard_name(VICTIM))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KVMemoError) as caught:
            await kv.delete(other, key)
        assert caught.value.kind == "UNAVAILABLE"  # so nothing may have happened
        assert await kv.get(other) == b"w"
        await wait_restarted(kv.system, shard_name(VICTIM))
        assert await kv.delete(other, key) == 2


async def test_a_shard_whose_state_is_corrupt_is_rebuilt_with_its_data_on_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        names = keys_on(kv, VICTIM, 20, "k")
        for i, name in enumerate(names):
            await kv.set(name, str(i), ex=100 if i % 2 else None)
        ref = kv.system.ref(shard_name(VICTIM))

        def corrupt(store: ShardStore) -> None:
            store.used += 12345  # the accounting drifted
            store.ttl_index.clear()  # and the schedule is lost

        await ref.ask(Inspect(corrupt))
        kv.kill_actor(shard_name(VICTIM))
        await wait_restarted(kv.system, shard_name(VICTIM))
        assert kv.system.events.count(shard_name(VICTIM), EventKind.STATE_REBUILT) == 1
        assert await kv.mget(*names) == [str(i).encode() for i in range(20)]
        for i, name in enumerate(names):
            assert (await kv.ttl(name) > 0) if i % 2 else (await kv.ttl(name) == -1)
        assert await ref.ask(Inspect(ShardStore.check_invariants))
        assert kv.engine.tracker.used == sum(
            [await kv.system.ref(shard_name(i)).ask(Inspect(lambda s: s.used)) for i in range(2)]
        )


@pytest.mark.parametrize("policy", ["lru", "noeviction"])
async def test_a_killed_shard_restarts_without_a_needless_rebuild(
    policy: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=2, eviction_policy=policy) as kv:
        names = keys_on(kv, VICTIM, 10, "k")
        await kv.mset(dict.fromkeys(names, "v"))
        kv.kill_actor(shard_name(VICTIM))
        await wait_restarted(kv.system, shard_name(VICTIM))
        assert kv.system.events.count(shard_name(VICTIM), EventKind.STATE_REBUILT) == 0
        assert await kv.mget(*names) == [b"v"] * 10


async def test_a_batch_timing_out_on_one_shard_keeps_the_replies_of_the_others(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # execute_many reads the shards' replies in turn under one timeout; when the
    # first one it waits for is stalled, the others' replies (a SET applied)
    # must not be reported as TIMEOUT.
    from actors import DEFER
    from kvmemo.storage import shard as shard_module

    stalled: set[bytes] = set()
    real_nowait = shard_module.ShardActor.handle_nowait
    real_handle = shard_module.ShardActor.handle

    def stalls(message: object) -> bool:
        return isinstance(message, shard_module.ShardBatch) and any(
            getattr(op, "key", None) in stalled for op in message.ops
        )

    def handle_nowait(self: shard_module.ShardActor, message: object) -> object:
        return DEFER if stalls(message) else real_nowait(self, message)

    async def handle(self: shard_module.ShardActor, message: object) -> object:
        if stalls(message):
            await trio.sleep(60)
        return await real_handle(self, message)

    monkeypatch.setattr(shard_module.ShardActor, "handle_nowait", handle_nowait)
    monkeypatch.setattr(shard_module.ShardActor, "handle", handle)
    async with kvmemo.open_store(shards=4, request_timeout=1.0) as kv:
        slow, fast = key_on(kv, 0), key_on(kv, 3)
        stalled.add(slow)
        slow_result, fast_result = await kv.execute_many(("get", slow), ("set", fast, "1"))
        assert isinstance(slow_result, KVMemoError)
        assert slow_result.kind == "TIMEOUT"
        assert fast_result == "OK"
        assert await kv.get(fast) == b"1"


def key_on(kv: Store, shard: int) -> bytes:
    n = 0
    while kv.engine.slots.shard_of(b"k%d" % n) != shard:
        n += 1
    return b"k%d" % n


async def test_a_client_retrying_on_unavailable_in_a_loop_lets_the_shards_restart() -> None:
    """A multi-shard MGET refused because its shards are down used to raise without a
    checkpoint: a loop retrying on UNAVAILABLE never let trio run the restarts (it spun
    forever). Every refusal now checkpoints, so the loop ends once the shards are back."""
    async with kvmemo.open_store(shards=4) as kv:
        keys = [f"k{i}" for i in range(32)]  # on every shard
        await kv.mset({k: k for k in keys})
        for name in ("shard-0", "shard-1"):
            assert kv.kill_actor(name)
        kinds: set[str] = set()
        with trio.fail_after(10):
            while True:
                try:
                    values = await kv.mget(*keys)
                except KVMemoError as exc:
                    kinds.add(exc.kind)
                    continue
                break
        assert kinds <= {"UNAVAILABLE"}
        assert values == [k.encode() for k in keys]
