"""The embedded store's edges: calls from another trio run, calls caught by a close,
and RESTORE's IDLETIME and FREQ as OBJECT IDLETIME / OBJECT FREQ and eviction see them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_policies import _KEYS, _NaiveModel

import kvmemo
from kvmemo.commands.args import MAX_EXPIRE_MS
from kvmemo.errors import CommandSyntaxError, DisabledError, UnavailableError
from kvmemo.eviction import policies
from kvmemo.eviction.policies import LFUPolicy, LRUPolicy, TickTimes, make_policy

CLOSED = r"^the store is closed$"
FOREIGN = (
    r"^this store runs in another trio run \(or thread\): call it from the trio run that"
    r" opened it \(open one store per trio\.run\)$"
)


# -- a store called from another trio run -------------------------------------------


async def test_a_store_called_from_another_trio_run_raises_and_changes_nothing() -> None:
    with trio.fail_after(20):
        async with kvmemo.open_store(shards=4) as kv:
            await kv.mset({"a": "1", "b": "2"})
            async with kv.subscribe("ch") as sub, kv.watch("a") as watch:
                calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                    ("get", lambda: kv.get("a")),
                    ("set", lambda: kv.set("a", "X")),
                    ("set ex", lambda: kv.set("a", "X", ex=5)),
                    ("execute", lambda: kv.execute("incr", "n")),
                    ("mget", lambda: kv.mget("a", "b")),
                    ("mset", lambda: kv.mset({"a": "X", "b": "Y"})),
                    ("dbsize", kv.dbsize),
                    ("info", kv.info),
                    ("publish", lambda: kv.publish("ch", "m")),
                    ("execute_many", lambda: kv.execute_many(("set", "a", "X"), ("get", "b"))),
                    ("transaction", lambda: kv.transaction(("set", "a", "X"))),
                    ("watch transaction", lambda: watch.transaction(("set", "a", "X"))),
                    ("sub.get", sub.get),
                    ("sub.subscribe", lambda: sub.subscribe("other")),
                ]
                refused: list[str] = []

                async def elsewhere() -> None:
                    for name, call in calls:
                        with pytest.raises(RuntimeError, match=FOREIGN):
                            await call()
                        refused.append(name)
                    with pytest.raises(RuntimeError, match=FOREIGN):
                        async with kv.watch("b"):
                            pass
                    with pytest.raises(RuntimeError, match=FOREIGN):
                        async with kv.subscribe("ch"):
                            pass
                    with pytest.raises(RuntimeError, match=FOREIGN):
                        kv.kill_actor("shard-0")
                    with pytest.raises(RuntimeError, match=FOREIGN):
                        kv.close()

                # A second trio run, in a worker thread of this one, while the store runs.
                await trio.to_thread.run_sync(trio.run, elsewhere)
                assert refused == [name for name, _ in calls]
                # Nothing changed, and the store still works in its own run.
                assert await kv.mget("a", "b", "n") == [b"1", b"2", None]
                assert await kv.dbsize() == 2
                assert sub.channels == [b"ch"]
                assert await kv.publish("ch", "hello") == 1
                assert (await sub.get()).data == b"hello"
                assert await watch.transaction(("set", "a", "3")) == ["OK"]
                assert [a["state"] for a in kv.actors()].count("running") == len(kv.actors())
            assert await kv.get("a") == b"3"


async def test_a_closed_store_called_from_another_trio_run_is_refused_as_closed() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("a", "1")

    async def elsewhere() -> None:
        for call in (lambda: kv.get("a"), lambda: kv.set("a", "2"), kv.dbsize):
            with pytest.raises(UnavailableError, match=CLOSED):
                await call()
        results = await kv.execute_many(("get", "a"), ("dbsize",))
        assert [str(r) for r in results] == ["the store is closed"] * 2
        kv.close()  # closing a closed store: nothing to do, from anywhere

    await trio.to_thread.run_sync(trio.run, elsewhere)


# -- calls waiting on their shards as the store closes ------------------------------


async def test_calls_caught_by_the_close_are_refused_as_closed_with_no_retry_hint() -> None:
    # Calls are started, get one scheduler pass or two (some are answered,
    # some are still queued for their shards), then the store closes: those
    # whose shards stop under them must say that the store closed, as any
    # later call does; "shard-0 is stopped, retry after 1000 ms" (or "is
    # restarting") would send the caller retrying a store that never returns.
    errors: list[BaseException] = []
    with trio.fail_after(30):
        for passes in (1, 2, 3):
            async with trio.open_nursery() as outer:
                kv = await kvmemo.serve(outer, shards=4)
                keys = [f"k{i}" for i in range(20)]
                await kv.mset({key: "1" for key in keys})

                async def call(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
                    try:
                        result = await fn(*args)
                    except UnavailableError as exc:
                        errors.append(exc)
                    else:
                        if isinstance(result, list):
                            errors.extend(r for r in result if isinstance(r, Exception))

                async with trio.open_nursery() as calls:
                    for i, key in enumerate(keys):
                        other = keys[i - 1]
                        calls.start_soon(call, kv.get, key)
                        calls.start_soon(call, kv.set, key, "2")
                        calls.start_soon(call, kv.execute, "incr", key)
                        calls.start_soon(call, kv.mget, key, other)
                        calls.start_soon(call, kv.execute_many, ("get", key), ("set", other, "3"))
                        calls.start_soon(call, kv.transaction, ("set", key, "4"), ("incr", other))
                    for _ in range(passes):
                        await trio.lowlevel.checkpoint()
                    kv.close()
    assert errors
    assert {str(e) for e in errors} == {"the store is closed"}
    assert all(isinstance(e, UnavailableError) and not e.data for e in errors)


# -- RESTORE ... IDLETIME / FREQ ------------------------------------------------------


async def _payload(kv: kvmemo.Store) -> bytes:
    await kv.set("src", "hello")
    payload = await kv.dump("src")
    assert payload is not None
    return payload


@pytest.mark.parametrize("policy", ["lru", "volatile-lru"])
async def test_restore_idletime_is_the_idle_time_object_idletime_reads(
    policy: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=2, eviction_policy=policy) as kv:
        payload = await _payload(kv)
        assert await kv.restore("old", 0, payload, idletime=1000) == "OK"
        assert await kv.restore("older", 60_000, payload, idletime=86_400 * 400) == "OK"
        assert await kv.restore("fresh", 0, payload, idletime=0) == "OK"
        assert await kv.object_idletime("old") == 1000
        assert await kv.object_idletime("older") == 86_400 * 400  # Redis's clock would wrap
        assert await kv.object_idletime("fresh") == 0
        await trio.sleep(5)
        assert await kv.object_idletime("old") == 1005
        # A touch makes it a key like any other; REPLACE without IDLETIME, too.
        assert await kv.get("old") == b"hello"
        assert await kv.object_idletime("old") == 0
        assert await kv.restore("older", 0, payload, replace=True) == "OK"
        assert await kv.object_idletime("older") == 0
        # OBJECT FREQ stays Redis's error under an LRU policy; FREQ is ignored.
        assert await kv.restore("counted", 0, payload, freq=50) == "OK"
        assert await kv.object_idletime("counted") == 0
        with pytest.raises(DisabledError, match=r"^An LFU maxmemory policy is not selected"):
            await kv.object_freq("counted")


@pytest.mark.parametrize("policy", ["lfu", "volatile-lfu"])
async def test_restore_freq_sets_the_count_object_freq_reads_zero_included(policy: str) -> None:
    async with kvmemo.open_store(shards=2, eviction_policy=policy) as kv:
        payload = await _payload(kv)
        for key, freq in (("cold", 0), ("warm", 7), ("hot", 255)):
            assert await kv.restore(key, 0, payload, freq=freq) == "OK"
            assert await kv.object_freq(key) == freq
        await kv.get("cold")
        assert await kv.object_freq("cold") == 1
        # IDLETIME is ignored under LFU (as Redis): a restored key counts 1.
        assert await kv.restore("idle", 0, payload, idletime=1000) == "OK"
        assert await kv.object_freq("idle") == 1


def test_an_aged_key_is_the_first_lru_victim_until_it_is_touched() -> None:
    times = TickTimes()
    times.mark(100.0)
    for name in ("lru", "volatile-lru"):
        policy = make_policy(name)
        for key in (b"a", b"b", b"c"):
            policy.record_insert(key, volatile=True)
        # c, just written, was last touched long ago (RESTORE ... IDLETIME).
        policy.record_aged(b"c", volatile=True, tick=times.tick_at(50.0), since=50.0)
        assert times.tick_at(50.0) == 0 < times.tick_at(100.0)
        assert [key for _, key in policy.candidates(3)] == [b"c", b"a", b"b"]
        assert policy.aged_since(b"c") == 50.0
        assert len(policy) == 3
        policy.record_volatile(b"c", True)  # the flag it has: no change
        assert [key for _, key in policy.candidates(1)] == [b"c"]
        policy.record_access(b"c")
        assert policy.aged_since(b"c") is None
        assert [key for _, key in policy.candidates(3)] == [b"a", b"b", b"c"]


# A model-based check of the aged keys (LRU) and set counts (LFU), on top of the
# naive model of test_policies: marks stand for TickTimes marks, taken in both
# clocks at once, so that a key aged to a mark sorts where the model says.


class _AgedModel(_NaiveModel):
    """The naive model, with keys aged to a mark (their ``last``) until touched."""

    def __init__(self) -> None:
        super().__init__()
        self.aged: set[bytes] = set()

    def touched(self, key: bytes) -> None:
        self.aged.discard(key)

    def age(self, key: bytes, volatile: bool, model_tick: int) -> None:
        entry = self.entries[key]
        entry.volatile = volatile
        entry.last = model_tick
        self.aged.add(key)


def _aged_machine_for(policy_name: str) -> type[RuleBasedStateMachine]:
    lfu = policy_name.endswith("lfu")

    class AgedMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.policy = make_policy(policy_name, rng=random.Random(0))
            self.model = _AgedModel()
            self.marks: list[tuple[int, int]] = []  # (policy tick, model tick)

        def _touch(self, key: bytes) -> None:
            self.model.touched(key)

        @rule(key=_KEYS, volatile=st.booleans())
        def insert(self, key: bytes, volatile: bool) -> None:
            self.policy.record_insert(key, volatile=volatile)
            self.model.insert(key, volatile)
            self._touch(key)

        @rule(key=_KEYS)
        def access(self, key: bytes) -> None:
            self.policy.record_access(key)
            self.model.access(key)
            self._touch(key)

        @rule(key=_KEYS, volatile=st.booleans())
        def set_volatile(self, key: bytes, volatile: bool) -> None:
            entry = self.model.entries.get(key)
            changes = entry is None or entry.volatile != volatile
            self.policy.record_volatile(key, volatile)
            self.model.set_volatile(key, volatile)
            if changes:
                self._touch(key)

        @rule(writes=st.lists(st.tuples(_KEYS, st.booleans()), min_size=1, max_size=4))
        def write_many(self, writes: list[tuple[bytes, bool]]) -> None:
            keys = [key for key, _ in writes]
            self.policy.record_writes(keys, [b"v" if old else None for _, old in writes])
            for key, old in writes:
                if old:
                    self.model.access(key)
                else:
                    self.model.insert(key, False)
                self._touch(key)

        @rule(key=_KEYS)
        def remove(self, key: bytes) -> None:
            self.policy.record_remove(key)
            self.model.remove(key)
            self._touch(key)

        @precondition(lambda self: not lfu)
        @rule(data=st.data(), key=_KEYS, volatile=st.booleans(), new_mark=st.booleans())
        def age(self, data: st.DataObject, key: bytes, volatile: bool, new_mark: bool) -> None:
            if new_mark or not self.marks:
                self.marks.append((next(policies._CLOCK), self.model._tick()))
            if key not in self.model.entries:
                self.policy.record_insert(key, volatile=volatile)
                self.model.insert(key, volatile)
            policy_tick, model_tick = data.draw(st.sampled_from(self.marks))
            entries = self.model.entries
            if any(entries[k].last == model_tick for k in self.model.aged if k != key):
                return  # two keys of one time: their order is not defined
            self.policy.record_aged(key, volatile=volatile, tick=policy_tick, since=0.0)
            self.model.age(key, volatile, model_tick)

        @precondition(lambda self: lfu)
        @rule(key=_KEYS, volatile=st.booleans(), freq=st.integers(0, 4))
        def set_frequency(self, key: bytes, volatile: bool, freq: int) -> None:
            if key not in self.model.entries:
                self.policy.record_insert(key, volatile=volatile)
                self.model.insert(key, volatile)
            self.policy.record_frequency(key, freq, volatile=volatile)
            entry = self.model.entries[key]
            entry.freq, entry.volatile, entry.last = freq, volatile, self.model._tick()

        @rule()
        def evict_best(self) -> None:
            found = self.policy.candidates(1)
            if found:
                self.policy.record_remove(found[0][1])
                self.model.remove(found[0][1])
                self._touch(found[0][1])

        @invariant()
        def candidates_match_the_model(self) -> None:
            policy, model = self.policy, self.model
            assert len(policy) == len(model.entries)
            keys = [k for k, e in model.entries.items() if e.volatile or not policy.volatile_only]
            if lfu:
                keys.sort(key=lambda k: (model.entries[k].freq, model.entries[k].last))
            else:
                keys.sort(key=lambda k: model.entries[k].last)
            for count in range(len(keys) + 2):
                found = policy.candidates(count)
                scores = [score for score, _ in found]
                assert scores == sorted(scores)
                assert [key for _, key in found] == keys[:count]
            for key, entry in model.entries.items():
                if lfu:
                    assert policy.frequency(key) == entry.freq
                else:
                    assert (policy.aged_since(key) is not None) == (key in model.aged)

    AgedMachine.__name__ = f"Aged{policy_name.title().replace('-', '')}Machine"
    return AgedMachine


@pytest.mark.parametrize("policy", ["lru", "volatile-lru", "lfu", "volatile-lfu"])
def test_aged_and_counted_keys_keep_every_policy_order_exact(policy: str) -> None:
    machine = _aged_machine_for(policy)
    machine.TestCase.settings = settings(
        max_examples=60, stateful_step_count=30, derandomize=True, database=None, deadline=None
    )
    machine.TestCase().runTest()


def test_the_aged_heaps_are_rebuilt_once_mostly_stale() -> None:
    policy = LRUPolicy()
    for i in range(3000):
        key = b"k%d" % i
        policy.record_insert(key, volatile=False)
        policy.record_aged(key, volatile=False, tick=0, since=0.0)
        policy.record_access(key)  # its heap entry is stale now
    assert len(policy) == 3000
    assert sum(map(len, policy._aged_heaps)) <= LRUPolicy.COMPACT_SLACK
    assert [key for _, key in policy.candidates(2)] == [b"k0", b"k1"]


def test_lfu_inserts_after_a_bucket_of_zero() -> None:
    policy = LFUPolicy()
    policy.record_insert(b"a", volatile=False)
    policy.record_frequency(b"a", 0, volatile=False)
    policy.record_insert(b"b", volatile=False)
    policy.record_insert(b"c", volatile=False)
    assert [(score >> policies.LFU_TICK_BITS, key) for score, key in policy.candidates(3)] == [
        (0, b"a"),
        (1, b"b"),
        (1, b"c"),
    ]


# -- expiry bounds: what is accepted is stored and logged exactly, the rest refused ----


async def test_the_largest_expiry_times_accepted_survive_the_log_and_the_rest_change_nothing(
    tmp_path: Path,
) -> None:
    top_s = MAX_EXPIRE_MS // 1000
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            accepted: list[tuple[Any, ...]] = [
                ("set", "a", "v", "PX", MAX_EXPIRE_MS),
                ("set", "b", "v", "PXAT", MAX_EXPIRE_MS),
                ("set", "c", "v", "EX", top_s),
                ("set", "d", "v", "EXAT", top_s),
                ("psetex", "e", MAX_EXPIRE_MS, "v"),
                ("setex", "f", top_s, "v"),
            ]
            for name, *args in accepted:
                assert await kv.execute(name, *args) == "OK"
            assert await kv.execute("getex", "a", "PX", MAX_EXPIRE_MS) == b"v"
            assert await kv.pexpire("b", MAX_EXPIRE_MS) == 1
            assert await kv.pexpireat("c", MAX_EXPIRE_MS) == 1
            assert await kv.restore("r", MAX_EXPIRE_MS, await _payload(kv)) == "OK"
            before = {k: await kv.pexpiretime(k) for k in "abcdefr"}
            assert all(0 < t < 2**63 for t in before.values())
            refused: list[tuple[Any, ...]] = [
                ("set", "a", "w", "PX", MAX_EXPIRE_MS + 1),
                ("set", "a", "w", "EXAT", top_s + 1),
                ("setex", "a", 2**63 - 1, "w"),
                ("psetex", "a", 2**63 - 1, "w"),
                ("getex", "a", "PXAT", 2**63 - 1),
                ("expire", "a", 2**63 - 1),
                ("pexpire", "a", MAX_EXPIRE_MS + 1),
                ("expireat", "a", -(2**63)),
                ("pexpireat", "a", 2**63 - 1),
                ("restore", "a", 2**63 - 1, b"", "REPLACE"),
                ("set", "a", "w", "PX", -1),
            ]
            for name, *args in refused:
                with pytest.raises(
                    CommandSyntaxError, match=rf"^invalid expire time in '{name}' command$"
                ):
                    await kv.execute(name, *args)
            assert await kv.get("a") == b"v"
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            after = {k: await kv.pexpiretime(k) for k in "abcdefr"}
        # Deadlines are float seconds of trio time: near 2**62 ms one step of
        # a float is about a second (2**10 ms), so the reload is exact to that.
        assert all(abs(after[k] - before[k]) <= 2**11 for k in before), (before, after)
