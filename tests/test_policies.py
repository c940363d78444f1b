"""Eviction policies: scripted orders, the registry, and model-based properties."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmemo.eviction import policies
from kvmemo.eviction.policies import (
    POLICY_NAMES,
    EvictionPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    NoEvictionPolicy,
    make_policy,
    register_policy,
)

TRACKING_POLICIES = [name for name in POLICY_NAMES if name != "noeviction"]


def victims(policy: EvictionPolicy, count: int = 100) -> list[bytes]:
    return [key for _, key in policy.candidates(count)]


# --- Scripted orders ----------------------------------------------------------


def test_lru_evicts_least_recently_used_first() -> None:
    lru = make_policy("lru")
    for key in (b"a", b"b", b"c", b"d"):
        lru.record_insert(key, volatile=False)
    lru.record_access(b"a")
    lru.record_access(b"c")
    assert victims(lru) == [b"b", b"d", b"a", b"c"]
    assert victims(lru, 2) == [b"b", b"d"]


def test_lru_orders_volatile_and_persistent_keys_together() -> None:
    lru = make_policy("lru")
    lru.record_insert(b"v1", volatile=True)
    lru.record_insert(b"p1", volatile=False)
    lru.record_insert(b"v2", volatile=True)
    lru.record_access(b"v1")
    assert victims(lru) == [b"p1", b"v2", b"v1"]


def test_lfu_evicts_least_frequently_used_with_least_recent_first_on_ties() -> None:
    lfu = make_policy("lfu")
    for key in (b"a", b"b", b"c", b"d"):
        lfu.record_insert(key, volatile=False)
    lfu.record_access(b"a")
    lfu.record_access(b"a")  # a: 3
    lfu.record_access(b"d")  # d: 2
    lfu.record_access(b"b")  # b: 2, touched after d
    assert victims(lfu) == [b"c", b"d", b"b", b"a"]


def test_lfu_score_puts_any_lower_frequency_first_whatever_the_recency() -> None:
    lfu = make_policy("lfu")
    lfu.record_insert(b"old", volatile=False)
    lfu.record_access(b"old")  # freq 2, earlier tick
    lfu.record_insert(b"new", volatile=False)  # freq 1, later tick
    (s_new, k_new), (s_old, k_old) = lfu.candidates(2)
    assert (k_new, k_old) == (b"new", b"old")
    assert s_new < s_old
    assert s_new >> policies.LFU_TICK_BITS == 1
    assert s_old >> policies.LFU_TICK_BITS == 2


def test_fifo_ignores_accesses_overwrites_and_ttl_changes() -> None:
    fifo = make_policy("fifo")
    for key in (b"a", b"b", b"c"):
        fifo.record_insert(key, volatile=False)
    fifo.record_access(b"a")
    fifo.record_insert(b"a", volatile=True)
    fifo.record_volatile(b"b", True)
    assert victims(fifo) == [b"a", b"b", b"c"]


@pytest.mark.parametrize("name", ["volatile-lru", "volatile-lfu", "volatile-random"])
def test_volatile_policies_offer_only_keys_with_a_ttl(name: str) -> None:
    policy = make_policy(name, rng=random.Random(1))
    policy.record_insert(b"p1", volatile=False)
    policy.record_insert(b"v1", volatile=True)
    policy.record_insert(b"p2", volatile=False)
    policy.record_insert(b"v2", volatile=False)
    policy.record_volatile(b"v2", True)
    policy.record_volatile(b"v1", False)
    policy.record_volatile(b"p2", True)
    policy.record_volatile(b"p2", False)
    assert len(policy) == 4
    assert sorted(victims(policy)) == [b"v2"]


def test_volatile_lru_orders_volatile_keys_by_recency() -> None:
    policy = make_policy("volatile-lru")
    for key in (b"a", b"b", b"c"):
        policy.record_insert(key, volatile=True)
    policy.record_insert(b"p", volatile=False)
    policy.record_access(b"a")
    assert victims(policy) == [b"b", b"c", b"a"]


def test_gaining_a_ttl_refreshes_recency_but_not_frequency() -> None:
    lfu = make_policy("lfu")
    lfu.record_insert(b"a", volatile=False)
    lfu.record_insert(b"b", volatile=False)
    lfu.record_access(b"b")
    lfu.record_volatile(b"a", True)  # a stays at freq 1, becomes most recent there
    lfu.record_insert(b"c", volatile=False)
    assert victims(lfu) == [b"a", b"c", b"b"]
    lru = make_policy("lru")
    lru.record_insert(b"a", volatile=False)
    lru.record_insert(b"b", volatile=False)
    lru.record_volatile(b"a", True)
    assert victims(lru) == [b"b", b"a"]
    lru.record_volatile(b"a", True)  # unchanged flag: no refresh
    lru.record_access(b"b")
    assert victims(lru) == [b"a", b"b"]


def test_random_with_the_same_seed_picks_the_same_victims() -> None:
    def run(seed: int) -> list[list[tuple[int, bytes]]]:
        policy = make_policy("random", rng=random.Random(seed))
        for i in range(50):
            policy.record_insert(b"k%d" % i, volatile=i % 2 == 0)
        return [policy.candidates(3) for _ in range(10)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_random_returns_only_tracked_keys_sorted_by_score() -> None:
    policy = make_policy("random", rng=random.Random(3))
    tracked = {b"k%d" % i for i in range(20)}
    for key in tracked:
        policy.record_insert(key, volatile=False)
    for key in list(tracked)[:5]:
        policy.record_remove(key)
        tracked.discard(key)
    for _ in range(50):
        found = policy.candidates(4)
        assert len({key for _, key in found}) == 4
        assert {key for _, key in found} <= tracked
        assert [score for score, _ in found] == sorted(score for score, _ in found)
    assert sorted(victims(policy, 100)) == sorted(tracked)


def test_random_victims_are_roughly_uniform() -> None:
    policy = make_policy("random", rng=random.Random(11))
    keys = [b"a", b"b", b"c", b"d"]
    for key in keys:
        policy.record_insert(key, volatile=key in (b"a", b"c"))
    picks = Counter(victims(policy, 1)[0] for _ in range(4000))
    assert set(picks) == set(keys)
    assert all(850 < n < 1150 for n in picks.values())


def test_noeviction_tracks_nothing_and_offers_no_candidates() -> None:
    policy = make_policy("noeviction")
    policy.record_insert(b"a", volatile=True)
    policy.record_access(b"a")
    policy.record_volatile(b"a", False)
    assert policy.candidates(10) == []
    assert len(policy) == 0
    assert isinstance(policy, NoEvictionPolicy)


@pytest.mark.parametrize("name", TRACKING_POLICIES)
def test_removed_key_is_never_a_candidate_again(name: str) -> None:
    policy = make_policy(name, rng=random.Random(0))
    for key in (b"a", b"b", b"c"):
        policy.record_insert(key, volatile=True)
    policy.record_remove(b"a")
    policy.record_remove(b"a")
    policy.record_remove(b"never-seen")
    assert len(policy) == 2
    assert sorted(victims(policy)) == [b"b", b"c"]


@pytest.mark.parametrize("name", TRACKING_POLICIES)
def test_clear_forgets_every_key(name: str) -> None:
    policy = make_policy(name, rng=random.Random(0))
    for key in (b"a", b"b"):
        policy.record_insert(key, volatile=True)
    policy.clear()
    assert len(policy) == 0
    assert policy.candidates(5) == []
    policy.record_insert(b"c", volatile=True)
    assert victims(policy) == [b"c"]


@pytest.mark.parametrize("name", TRACKING_POLICIES)
def test_touching_an_untracked_key_starts_tracking_it(name: str) -> None:
    policy = make_policy(name, rng=random.Random(0))
    policy.record_access(b"a")
    policy.record_volatile(b"b", True)
    assert len(policy) == 2
    expected = [b"b"] if policy.volatile_only else [b"a", b"b"]
    assert sorted(victims(policy)) == expected


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_negative_count_is_rejected(name: str) -> None:
    policy = make_policy(name)
    with pytest.raises(ValueError, match=r"^count must be >= 0, got -1$"):
        policy.candidates(-1)
    assert policy.candidates(0) == []


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo"])
def test_scores_of_different_shards_merge_into_one_global_order(name: str) -> None:
    shards = [make_policy(name), make_policy(name)]
    single = make_policy(name)
    rng = random.Random(5)
    keys = [b"k%d" % i for i in range(12)]
    for key in keys:
        shards[key[-1] % 2].record_insert(key, volatile=False)
        single.record_insert(key, volatile=False)
    for _ in range(60):
        key = rng.choice(keys)
        shards[key[-1] % 2].record_access(key)
        single.record_access(key)
    merged = sorted(shards[0].candidates(12) + shards[1].candidates(12))
    assert [key for _, key in merged] == victims(single)


@pytest.mark.parametrize("name", ["lru", "volatile-lru"])
def test_lru_stays_exact_through_front_rescans_and_rebuilds(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small constants, so that a few thousand operations go through many
    # front rescans and partition rebuilds (the hole bookkeeping).
    monkeypatch.setattr(LRUPolicy, "FRONT_SPARE", 3)
    monkeypatch.setattr(LRUPolicy, "COPY_COST", 2)
    monkeypatch.setattr(LRUPolicy, "COMPACT_SLACK", 4)
    policy = make_policy(name)
    rebuilds = 0
    rebuild = policy._compact  # type: ignore[attr-defined]

    def counted() -> None:
        nonlocal rebuilds
        rebuilds += 1
        rebuild()

    monkeypatch.setattr(policy, "_compact", counted)
    reference: dict[bytes, bool] = {}  # key -> volatile, in least-recent-first order
    rng = random.Random(9)
    keys = [b"k%d" % i for i in range(300)]
    for _ in range(20_000):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.35:
            volatile = rng.random() < 0.5
            policy.record_insert(key, volatile=volatile)
            reference.pop(key, None)
            reference[key] = volatile
        elif roll < 0.7:
            policy.record_access(key)
            volatile = reference.pop(key, False)
            reference[key] = volatile
        elif roll < 0.8:
            volatile = rng.random() < 0.5
            policy.record_volatile(key, volatile)
            if reference.get(key) is not volatile:
                reference.pop(key, None)
                reference[key] = volatile
        else:  # evict the best candidates, as the eviction manager does
            count = rng.randrange(1, 6)
            eligible = [k for k, v in reference.items() if v or not policy.volatile_only]
            found = [k for _, k in policy.candidates(count)]
            assert found == eligible[:count]
            for k in found[: rng.randrange(len(found) + 1)]:
                policy.record_remove(k)
                del reference[k]
    assert len(policy) == len(reference)
    assert rebuilds > 10


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_record_writes_is_an_insert_or_an_access_per_key(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # record_writes (MSET's commit records a whole share in one call) against
    # record_insert / record_access key by key: the same candidates, scores
    # (ticks), access ticks and frequencies, from states holding persistent,
    # volatile and untracked keys, with shares mixing new and old keys. Each
    # step runs on both policies from the same position of the tick clock.
    rng = random.Random(11)
    keys = [b"w%d" % i for i in range(40)]
    batched = make_policy(name, rng=random.Random(3))
    single = make_policy(name, rng=random.Random(3))
    base = 1 << 40

    def both(step: Callable[[EvictionPolicy], None]) -> None:
        nonlocal base
        for policy in (batched, single):
            monkeypatch.setattr(policies, "_CLOCK", itertools.count(base))
            step(policy)
        base += 1000

    def writes(share: list[bytes], olds: list[bytes | None]) -> Callable[[EvictionPolicy], None]:
        def step(policy: EvictionPolicy) -> None:
            if policy is batched:
                policy.record_writes(share, olds)
                return
            for key, old in zip(share, olds, strict=True):
                if old is None:
                    policy.record_insert(key, volatile=False)
                else:
                    policy.record_access(key)

        return step

    for _ in range(400):
        roll = rng.random()
        key = rng.choice(keys)
        volatile = rng.random() < 0.5
        if roll < 0.2:
            both(lambda p, k=key, v=volatile: p.record_insert(k, volatile=v))
        elif roll < 0.3:
            both(lambda p, k=key, v=volatile: p.record_volatile(k, v))
        elif roll < 0.4:
            both(lambda p, k=key: p.record_remove(k))
        else:
            share = rng.sample(keys, rng.randrange(1, 12))
            both(writes(share, [None if rng.random() < 0.4 else b"old" for _ in share]))
        assert batched.candidates(100) == single.candidates(100)
        assert len(batched) == len(single)
        for k in keys:
            assert batched.last_access(k) == single.last_access(k)
            assert batched.frequency(k) == single.frequency(k)


# --- Registry -----------------------------------------------------------------


def test_policy_names_lists_every_canonical_policy() -> None:
    assert POLICY_NAMES == (
        "lru",
        "lfu",
        "fifo",
        "random",
        "noeviction",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
    )
    assert policies.DEFAULT_POLICY in POLICY_NAMES


@pytest.mark.parametrize(
    ("alias", "cls"),
    [
        ("allkeys-lru", LRUPolicy),
        ("allkeys-lfu", LFUPolicy),
        ("ALLKEYS-RANDOM", policies.RandomPolicy),
    ],
)
def test_make_policy_accepts_redis_aliases(alias: str, cls: type[EvictionPolicy]) -> None:
    assert type(make_policy(alias)) is cls


def test_every_make_policy_call_builds_a_fresh_instance() -> None:
    assert make_policy("fifo") is not make_policy("fifo")
    assert type(make_policy("FIFO")) is FIFOPolicy


def test_make_policy_rejects_an_unknown_name_listing_the_choices() -> None:
    expected = (
        r"^unknown eviction policy 'mru'; expected one of lru, lfu, fifo, random, "
        r"noeviction, volatile-lru, volatile-lfu, volatile-random "
        r"\(or Redis's allkeys-lru, allkeys-lfu, allkeys-random\)$"
    )
    with pytest.raises(ValueError, match=expected):
        make_policy("mru")


def test_register_policy_plugs_in_a_new_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))
    monkeypatch.setattr(policies, "POLICY_NAMES", policies.POLICY_NAMES)

    @register_policy
    class MRUPolicy(LRUPolicy):
        name = "mru"

        def candidates(self, count: int) -> list[tuple[int, bytes]]:
            return super().candidates(len(self))[::-1][:count]

    assert policies.POLICY_NAMES[-1] == "mru"
    policy = make_policy("mru")
    policy.record_insert(b"a", volatile=False)
    policy.record_insert(b"b", volatile=False)
    assert victims(policy, 1) == [b"b"]


def test_register_policy_rejects_a_taken_name() -> None:
    class Duplicate(LRUPolicy):
        name = "lfu"

    with pytest.raises(ValueError, match=r"^eviction policy 'lfu' is already registered$"):
        register_policy(Duplicate)

    class Alias(LRUPolicy):
        name = "allkeys-lru"

    with pytest.raises(ValueError, match=r"^eviction policy 'allkeys-lru' is already registered$"):
        register_policy(Alias)


def test_register_policy_rejects_an_uppercase_name() -> None:
    class Shouty(LRUPolicy):
        name = "Shouty"

    with pytest.raises(ValueError, match=r"^eviction policy name must be lowercase, got 'Shouty'$"):
        register_policy(Shouty)


# --- Model-based properties ---------------------------------------------------


@dataclass
class _Entry:
    volatile: bool
    freq: int
    last: int
    inserted: int


class _NaiveModel:
    """The documented semantics, written the slow obvious way."""

    def __init__(self) -> None:
        self.entries: dict[bytes, _Entry] = {}
        self.clock = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def insert(self, key: bytes, volatile: bool) -> None:
        if key in self.entries:
            self.access(key)
            self.set_volatile(key, volatile)
        else:
            t = self._tick()
            self.entries[key] = _Entry(volatile, 1, t, t)

    def access(self, key: bytes) -> None:
        if key not in self.entries:
            self.insert(key, False)
        else:
            entry = self.entries[key]
            entry.freq += 1
            entry.last = self._tick()

    def set_volatile(self, key: bytes, volatile: bool) -> None:
        if key not in self.entries:
            self.insert(key, volatile)
        elif self.entries[key].volatile != volatile:
            self.entries[key].volatile = volatile
            self.entries[key].last = self._tick()

    def remove(self, key: bytes) -> None:
        self.entries.pop(key, None)

    def order(self, kind: str, volatile_only: bool) -> list[bytes]:
        items = [(k, e) for k, e in self.entries.items() if e.volatile or not volatile_only]
        if kind == "lru":
            items.sort(key=lambda ke: ke[1].last)
        elif kind == "lfu":
            items.sort(key=lambda ke: (ke[1].freq, ke[1].last))
        else:
            items.sort(key=lambda ke: ke[1].inserted)
        return [k for k, _ in items]


_KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])


def _machine_for(policy_name: str) -> type[RuleBasedStateMachine]:
    class PolicyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.policy = make_policy(policy_name, rng=random.Random(0))
            self.model = _NaiveModel()

        @rule(key=_KEYS, volatile=st.booleans())
        def insert(self, key: bytes, volatile: bool) -> None:
            self.policy.record_insert(key, volatile=volatile)
            self.model.insert(key, volatile)

        @precondition(lambda self: bool(self.model.entries))
        @rule(data=st.data())
        def access_tracked(self, data: st.DataObject) -> None:
            key = data.draw(st.sampled_from(sorted(self.model.entries)))
            self.policy.record_access(key)
            self.model.access(key)

        @rule(key=_KEYS)
        def access_any(self, key: bytes) -> None:
            self.policy.record_access(key)
            self.model.access(key)

        @rule(key=_KEYS, volatile=st.booleans())
        def set_volatile(self, key: bytes, volatile: bool) -> None:
            self.policy.record_volatile(key, volatile)
            self.model.set_volatile(key, volatile)

        @rule(key=_KEYS)
        def remove(self, key: bytes) -> None:
            self.policy.record_remove(key)
            self.model.remove(key)

        @rule()
        def evict_best(self) -> None:
            found = self.policy.candidates(1)
            if found:
                key = found[0][1]
                self.policy.record_remove(key)
                if policy_name != "noeviction":
                    self.model.remove(key)

        @rule()
        def clear(self) -> None:
            self.policy.clear()
            self.model.entries.clear()

        @invariant()
        def candidates_match_the_model(self) -> None:
            policy, model = self.policy, self.model
            if policy_name == "noeviction":
                assert len(policy) == 0
                assert policy.candidates(10) == []
                return
            assert len(policy) == len(model.entries)
            eligible = model.order(policy_name.removeprefix("volatile-"), policy.volatile_only)
            for count in range(len(eligible) + 2):
                found = policy.candidates(count)
                scores = [score for score, _ in found]
                assert scores == sorted(scores)
                keys = [key for _, key in found]
                if policy_name.endswith("random"):
                    assert len(keys) == min(count, len(eligible))
                    assert len(set(keys)) == len(keys)
                    assert set(keys) <= set(eligible)
                else:
                    assert keys == eligible[:count]
                    assert len(set(scores)) == len(scores)

    PolicyMachine.__name__ = f"{policy_name.title().replace('-', '')}Machine"
    return PolicyMachine


_MACHINE_SETTINGS = settings(
    max_examples=25, stateful_step_count=20, derandomize=True, database=None, deadline=None
)

TestLRUMachine = _machine_for("lru").TestCase
TestLFUMachine = _machine_for("lfu").TestCase
TestFIFOMachine = _machine_for("fifo").TestCase
TestRandomMachine = _machine_for("random").TestCase
TestNoEvictionMachine = _machine_for("noeviction").TestCase
TestVolatileLRUMachine = _machine_for("volatile-lru").TestCase
TestVolatileLFUMachine = _machine_for("volatile-lfu").TestCase
TestVolatileRandomMachine = _machine_for("volatile-random").TestCase
for _case in (
    TestLRUMachine,
    TestLFUMachine,
    TestFIFOMachine,
    TestRandomMachine,
    TestNoEvictionMachine,
    TestVolatileLRUMachine,
    TestVolatileLFUMachine,
    TestVolatileRandomMachine,
):
    _case.settings = _MACHINE_SETTINGS
del _case
