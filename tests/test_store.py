"""ShardStore, the pure core of a shard: data, expiry, accounting, scans (synchronous)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmemo.commands import ops
from kvmemo.eviction.memory import MemoryTracker, entry_size
from kvmemo.eviction.policies import POLICY_NAMES, make_policy
from kvmemo.storage.store import SCAN_SNAPSHOTS, NeedMemory, ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_store(maxmemory: int = 0, policy: str = "lru") -> ShardStore:
    return ShardStore(0, make_policy(policy), MemoryTracker(maxmemory, 1))


def assert_consistent(store: ShardStore) -> None:
    assert store.check_invariants()
    assert store.tracker.used == store.used == store.tracker.shard_used(0)


# -- reading and writing ----------------------------------------------------------------


def test_put_then_get_returns_the_value_and_accounts_its_size() -> None:
    store = make_store()
    assert store.get(b"k", 0.0) is None
    store.put(b"k", b"v", 0.0, expires_at=None)
    assert store.get(b"k", 0.0) == b"v"
    assert store.used == store.entry_size(b"k", b"v") == entry_size(b"k", b"v") + 75  # lru
    store.put(b"k", b"longer value", 0.0, expires_at=5.0)
    assert store.used == store.entry_size(b"k", b"longer value", has_ttl=True)
    assert_consistent(store)


def test_an_entry_is_live_until_just_before_its_expiry() -> None:
    store = make_store()
    store.put(b"k", b"v", 0.0, expires_at=10.0)
    assert store.peek(b"k", 9.999) == b"v"
    assert store.live_count(9.999) == 1
    assert store.peek(b"k", 10.0) is None  # due exactly at its time, as Redis
    assert b"k" not in store.data


def test_an_expired_entry_is_never_returned_and_is_removed_by_the_read() -> None:
    store = make_store()
    store.put(b"gone", b"v", 0.0, expires_at=1.0)
    store.put(b"live", b"v", 0.0, expires_at=None)
    for read in (store.get, store.peek, store.peek_raw):
        assert read(b"gone", 2.0) is None
    assert not store.contains(b"gone", 2.0)
    assert list(store.live_keys(2.0)) == [b"live"]
    assert store.live_count(2.0) == 1
    assert b"gone" not in store.data
    assert store.expired_count == 1
    assert_consistent(store)


def test_counts_and_key_lists_skip_expired_entries_not_yet_removed() -> None:
    store = make_store()
    store.put(b"a", b"v", 0.0, expires_at=1.0)
    store.put(b"b", b"v", 0.0, expires_at=5.0)
    store.put(b"c", b"v", 0.0, expires_at=None)
    assert store.live_count(2.0) == 2
    assert store.volatile_count(2.0) == 1
    assert sorted(store.live_keys(2.0)) == [b"b", b"c"]
    assert store.delete(b"a", 2.0) is False  # an expired key is not "removed" by DEL


def test_keep_ttl_keeps_a_live_expiry_but_not_an_expired_one() -> None:
    store = make_store()
    store.put(b"k", b"v", 0.0, expires_at=10.0)
    store.put(b"k", b"w", 1.0, expires_at=None, keep_ttl=True)
    assert store.expiry_of(b"k") == 10.0
    store.put(b"k", b"x", 11.0, expires_at=None, keep_ttl=True)
    assert store.peek(b"k", 11.0) == b"x"
    assert store.expiry_of(b"k") is None
    assert_consistent(store)


def test_a_write_the_tracker_refuses_changes_nothing() -> None:
    store = make_store(maxmemory=make_store().entry_size(b"a", b"1") + 10)
    store.put(b"a", b"1", 0.0, expires_at=None)
    before = (dict(store.data), store.used, store.tracker.used)
    with pytest.raises(NeedMemory) as caught:
        store.put(b"b", b"2", 0.0, expires_at=None)
    assert caught.value.nbytes == store.entry_size(b"b", b"2")
    with pytest.raises(NeedMemory):
        # An expiry costs bytes too (SET EX); EXPIRE's set_expiry is never refused (see
        # test_redis_limits_s25: Redis does not flag it denyoom).
        store.put(b"a", b"1", 0.0, expires_at=5.0)
    assert (dict(store.data), store.used, store.tracker.used) == before
    assert store.expiry_of(b"a") is None
    assert store.tracker.refused == 2
    # A write that shrinks the entry needs no room.
    store.put(b"a", b"", 0.0, expires_at=None)
    assert_consistent(store)


def test_set_expiry_adds_and_removes_the_ttl_overhead() -> None:
    store = make_store()
    store.put(b"k", b"v", 0.0, expires_at=None)
    assert store.set_expiry(b"k", 5.0) is True
    assert store.used == store.entry_size(b"k", b"v", has_ttl=True)
    assert store.set_expiry(b"k", 5.0) is False
    assert store.set_expiry(b"k", 7.0) is True
    assert store.ttl_index.entries() == [(7.0, b"k")]
    assert store.set_expiry(b"k", None) is True
    assert store.used == store.entry_size(b"k", b"v")
    assert len(store.ttl_index) == 0
    assert_consistent(store)


def test_put_delta_reserved_up_front_matches_uncharged_puts_exactly() -> None:
    store = make_store()
    store.put(b"ttl", b"old value", 0.0, expires_at=100.0)
    store.put(b"plain", b"x", 0.0, expires_at=None)
    store.put(b"expired", b"x" * 50, 0.0, expires_at=1.0)
    items = [(b"ttl", b"n"), (b"new", b"abc"), (b"new", b"abcdef"), (b"expired", b"e")]
    delta = store.put_delta(items, 2.0)
    assert store.tracker.try_reserve(0, delta)
    for key, value in items:
        store.put(key, value, 2.0, expires_at=None, charge=False)
    assert_consistent(store)
    assert store.used == sum(store.entry_size(k, v) for k, v in store.data.items())


_KEYS = st.sampled_from([b"a", b"b", b"c", b"dd", b"e" * 20])
_VALUES = st.binary(max_size=40)


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    before=st.lists(st.tuples(_KEYS, _VALUES, st.sampled_from([None, 1.0, 100.0])), max_size=8),
    items=st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=8),
)
def test_put_many_leaves_the_store_exactly_as_puts_one_by_one(
    policy: str,
    before: list[tuple[bytes, bytes, float | None]],
    items: list[tuple[bytes, bytes]],
) -> None:
    """MSET's fast path (put_delta, then put_many) equals uncharged puts in order.

    Keys with a live expiry, an expired one (1.0 < now) and none, repeated
    keys within one write, every policy: same data, expiries, used bytes and
    eviction order.
    """
    fast, slow = make_store(policy=policy), make_store(policy=policy)
    for store in (fast, slow):
        for key, value, expires_at in before:
            store.put(key, value, 0.0, expires_at=expires_at)
    delta = fast.put_delta(items, 2.0)
    assert fast.tracker.try_reserve(0, delta)
    fast.put_many(items, 2.0)
    assert slow.tracker.try_reserve(0, slow.put_delta(items, 2.0))
    for key, value in items:
        slow.put(key, value, 2.0, expires_at=None, charge=False)
    assert fast.data == slow.data
    assert fast.expires == slow.expires
    assert fast.used == slow.used == fast.tracker.used
    # ticks come from one global clock: compare the keys' order (a random policy draws
    # its candidates from a shared generator, whose state depends on what ran before)
    if not policy.endswith("random"):
        assert [k for _, k in fast.policy.candidates(10)] == [
            k for _, k in slow.policy.candidates(10)
        ]
    assert_consistent(fast)


@DETERMINISTIC
@given(
    policy=st.sampled_from(POLICY_NAMES),
    before=st.lists(st.tuples(_KEYS, _VALUES, st.sampled_from([None, 1.0, 100.0])), max_size=8),
    writes=st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=8),
    maxmemory=st.sampled_from([0, 900, 1500]),
)
def test_put_plain_is_put_without_expiry(
    policy: str,
    before: list[tuple[bytes, bytes, float | None]],
    writes: list[tuple[bytes, bytes]],
    maxmemory: int,
) -> None:
    """The plain SET's path equals put(expires_at=None): state, bytes, refusals, order."""
    fast, slow = make_store(maxmemory, policy), make_store(maxmemory, policy)
    for store in (fast, slow):
        for key, value, expires_at in before:
            try:
                store.put(key, value, 0.0, expires_at=expires_at)
            except NeedMemory:
                pass

    def refusal(write: Callable[[], None]) -> int | None:
        try:
            write()
        except NeedMemory as exc:
            return exc.nbytes
        return None

    for key, value in writes:
        assert refusal(functools.partial(fast.put_plain, key, value, 2.0)) == refusal(
            functools.partial(slow.put, key, value, 2.0, expires_at=None)
        )
    assert fast.data == slow.data
    assert fast.expires == slow.expires
    assert fast.used == slow.used == fast.tracker.used
    assert fast.tracker.refused == slow.tracker.refused
    if not policy.endswith("random"):
        assert [k for _, k in fast.policy.candidates(10)] == [
            k for _, k in slow.policy.candidates(10)
        ]
    assert_consistent(fast)


def test_flush_removes_everything_and_releases_every_byte() -> None:
    store = make_store()
    for i in range(10):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=5.0 if i % 2 else None)
    assert store.flush() == 10
    assert store.data == {}
    assert len(store.ttl_index) == 0
    assert store.used == store.tracker.used == 0
    assert len(store.policy) == 0
    assert_consistent(store)


# -- active expiry --------------------------------------------------------------------------


def test_expire_due_removes_at_most_budget_keys_and_reports_the_backlog() -> None:
    store = make_store()
    for i in range(25):
        store.put(b"k%02d" % i, b"v", 0.0, expires_at=1.0 + i / 100)
    store.put(b"later", b"v", 0.0, expires_at=100.0)
    assert store.expire_due(5.0, 10) == (10, True)
    assert store.expire_due(5.0, 10) == (10, True)
    assert store.expire_due(5.0, 10) == (5, False)
    assert store.expire_due(5.0, 10) == (0, False)
    assert list(store.data) == [b"later"]
    assert store.expired_count == 25
    assert_consistent(store)


def test_expire_due_trusts_the_entry_not_a_stale_index_pair() -> None:
    store = make_store()
    store.put(b"extended", b"v", 0.0, expires_at=1.0)
    store.set_expiry(b"extended", 50.0)
    store.put(b"deleted", b"v", 0.0, expires_at=1.0)
    store.delete(b"deleted", 0.0)
    # Corrupt the index: stale pairs for a live key and for a missing key.
    store.ttl_index.add(b"extended", 1.0)
    store.ttl_index.add(b"ghost", 1.0)
    assert store.expire_due(2.0, 100) == (0, False)
    assert store.peek(b"extended", 2.0) == b"v"
    assert store.expiry_of(b"extended") == 50.0
    assert_consistent(store)


def test_expire_due_drops_the_real_pair_when_a_stale_earlier_one_came_first() -> None:
    store = make_store()
    store.put(b"k", b"v", 0.0, expires_at=3.0)
    store.ttl_index.add(b"k", 1.0)  # a stale, earlier pair
    assert store.expire_due(5.0, 1) == (1, False)
    assert b"k" not in store.data
    assert len(store.ttl_index) == 0
    assert store.ttl_index_consistent()
    assert_consistent(store)


def test_reconciliation_rebuilds_an_index_that_lost_and_gained_pairs() -> None:
    store = make_store()
    for i in range(10):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=10.0 + i)
    store.ttl_index.discard(b"k3", 13.0)
    store.ttl_index.discard(b"k7", 17.0)
    store.ttl_index.add(b"k5", 1.0)
    store.ttl_index.add(b"ghost", 2.0)
    assert not store.ttl_index_consistent()
    assert not store.check_invariants()
    assert store.reconcile_ttl_index() is True
    assert store.ttl_index_consistent()
    assert store.reconcile_ttl_index() is False
    assert store.expire_due(100.0, 100) == (10, False)
    assert_consistent(store)


# -- eviction ---------------------------------------------------------------------------------


def test_evict_removes_only_present_keys_and_reports_bytes_freed() -> None:
    store = make_store()
    for key in (b"a", b"b", b"c"):
        store.put(key, b"value", 0.0, expires_at=None)
    store.get(b"a", 0.0)
    candidates = store.eviction_candidates(2)
    assert [key for _, key, _ in candidates] == [b"b", b"c"]
    assert all(size == store.entry_size(b"b", b"value") for _, _, size in candidates)
    assert store.evict([b"b", b"missing"]) == (1, store.entry_size(b"b", b"value"))
    assert store.evicted_count == 1
    assert sorted(store.data) == [b"a", b"c"]
    assert_consistent(store)


# -- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_a_consistent_store_passes_its_invariant_check_with_every_policy(policy: str) -> None:
    store = make_store(policy=policy)
    for i in range(20):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=5.0 if i % 3 else None)
    store.delete(b"k4", 0.0)
    assert store.check_invariants()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.data.__setitem__(b"sneaky", b"v"),
        lambda s: s.data.__setitem__(b"k1", "not bytes"),
        lambda s: s.expires.__setitem__(b"missing", 5.0),
        lambda s: setattr(s, "used", s.used + 1),
        lambda s: s.ttl_index.add(b"k1", 99.0),
        lambda s: s.policy.record_remove(b"k1"),
    ],
    ids=["untracked-key", "wrong-type", "expiry-without-key", "used", "index", "policy"],
)
def test_the_invariant_check_rejects_a_corrupted_store(corrupt: object) -> None:
    store = make_store()
    for i in range(5):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=5.0 if i % 2 else None)
    assert store.check_invariants()
    corrupt(store)  # type: ignore[operator]
    assert not store.check_invariants()


def test_repaired_keeps_every_trustworthy_entry_and_fixes_the_accounting() -> None:
    store = make_store()
    for i in range(6):
        store.put(b"k%d" % i, b"v%d" % i, 0.0, expires_at=5.0 + i if i % 2 else None)
    store.data[b"bad"] = "not bytes"  # type: ignore[assignment]
    store.used += 1000
    store.ttl_index.clear()
    fresh = store.repaired(make_policy("lru"))
    assert fresh.data == {b"k%d" % i: b"v%d" % i for i in range(6)}
    assert fresh.expires == {b"k1": 6.0, b"k3": 8.0, b"k5": 10.0}
    assert_consistent(fresh)


# -- atomic multi-shard writes (the shard's side) ----------------------------------------------


def test_mset_commit_after_an_entry_expired_during_the_hold_keeps_accounting_exact() -> None:
    store = make_store()
    store.put(b"k", b"old value", 0.0, expires_at=2.0)
    part = ops.MSet([(b"k", b"new"), (b"j", b"x")], only_new=False).part([0, 1])
    assert part.prepare(store, 1.0) is True  # k is live at prepare time
    part.commit(store, 3.0)  # the decision came after k's expiry
    assert store.peek(b"k", 3.0) == b"new"
    assert store.peek(b"j", 3.0) == b"x"
    assert store.expiry_of(b"k") is None
    assert_consistent(store)


def test_an_aborted_mset_gives_back_its_reservation() -> None:
    store = make_store(maxmemory=10_000)
    part = ops.MSet([(b"a", b"1"), (b"b", b"2")], only_new=False).part([0, 1])
    assert part.prepare(store, 0.0) is True
    assert store.tracker.used > 0
    part.abort(store)
    assert store.tracker.used == 0
    assert store.data == {}


def test_an_mset_part_over_the_limit_votes_need_memory_and_reserves_nothing() -> None:
    store = make_store(maxmemory=100)
    part = ops.MSet([(b"a", b"x" * 200)], only_new=False).part([0])
    vote = part.prepare(store, 0.0)
    assert isinstance(vote, NeedMemory)
    assert store.tracker.used == 0


def test_an_msetnx_part_votes_no_when_a_key_is_live() -> None:
    store = make_store()
    store.put(b"a", b"1", 0.0, expires_at=5.0)
    msetnx = ops.MSet([(b"a", b"2"), (b"b", b"2")], only_new=True)
    assert msetnx.part([0, 1]).prepare(store, 1.0) is False
    assert msetnx.part([0, 1]).prepare(store, 6.0) is True  # a is expired by then


# -- SCAN ----------------------------------------------------------------------------------------


def scan_all(store: ShardStore, count: int, now: float, between: object = None) -> list[bytes]:
    seen: list[bytes] = []
    scan_id, offset = 0, 0
    while True:
        scan_id, offset, keys = store.scan(scan_id, offset, count, now)
        seen.extend(keys)
        if offset == 0:
            return seen
        if callable(between):
            between()


def test_scan_returns_each_key_present_throughout_once_despite_writes() -> None:
    store = make_store()
    stable = [b"s%03d" % i for i in range(100)]
    for key in stable:
        store.put(key, b"v", 0.0, expires_at=None)
    churn = iter(range(1000))

    def write() -> None:
        i = next(churn)
        store.put(b"new%d" % i, b"v", 0.0, expires_at=None)
        store.delete(stable[i % 100] if i % 7 == 0 else b"none", 0.0)

    seen = scan_all(store, 7, 0.0, write)
    deleted = {stable[i % 100] for i in range(next(churn)) if i % 7 == 0}
    assert len(seen) == len(set(seen))
    assert set(stable) - deleted <= set(seen)
    assert set(seen) <= set(stable)  # keys written after the start are not included


def test_scan_skips_keys_that_expired_meanwhile() -> None:
    store = make_store()
    store.put(b"a", b"v", 0.0, expires_at=1.0)
    store.put(b"b", b"v", 0.0, expires_at=None)
    assert scan_all(store, 10, 2.0) == [b"b"]


def test_a_scan_whose_snapshot_was_dropped_starts_over_and_misses_nothing() -> None:
    store = make_store()
    keys = [b"k%03d" % i for i in range(100)]
    for key in keys:
        store.put(key, b"v", 0.0, expires_at=None)
    scan_id, offset, seen = store.scan(0, 0, 50, 0.0)
    assert offset == 50
    for _ in range(SCAN_SNAPSHOTS):  # other clients' scans push this one out
        store.scan(0, 0, 1, 0.0)
    for key in keys[:40]:  # keys before the offset go: positions shift left
        store.delete(key, 0.0)
    while offset:
        scan_id, offset, more = store.scan(scan_id, offset, 50, 0.0)
        seen += more
    assert set(keys[40:]) <= set(seen)


# -- a model-based property --------------------------------------------------------------------

KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
VALUES = st.binary(max_size=40)


class StoreMachine(RuleBasedStateMachine):
    """Random operations against a dict model; accounting and liveness checked after each."""

    def __init__(self) -> None:
        super().__init__()
        self.store = make_store(maxmemory=3000)
        self.model: dict[bytes, tuple[bytes, float | None]] = {}
        self.now = 0.0

    def _live(self, key: bytes) -> bool:
        entry = self.model.get(key)
        return entry is not None and (entry[1] is None or entry[1] > self.now)

    def _forget_expired(self, key: bytes) -> None:
        if key in self.model and not self._live(key):
            del self.model[key]

    @rule(
        key=KEYS,
        value=VALUES,
        ttl=st.none() | st.floats(0.1, 5.0),
        keep=st.booleans(),
    )
    def put(self, key: bytes, value: bytes, ttl: float | None, keep: bool) -> None:
        self._forget_expired(key)
        expires_at = None if ttl is None else self.now + ttl
        try:
            self.store.put(key, value, self.now, expires_at=expires_at, keep_ttl=keep)
        except NeedMemory:
            return
        old = self.model.get(key)
        self.model[key] = (value, (old[1] if old else None) if keep else expires_at)

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        self._forget_expired(key)
        assert self.store.delete(key, self.now) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS, ttl=st.none() | st.floats(0.1, 5.0))
    def set_expiry(self, key: bytes, ttl: float | None) -> None:
        self._forget_expired(key)
        if not self.store.contains(key, self.now):
            return
        expires_at = None if ttl is None else self.now + ttl
        try:
            self.store.set_expiry(key, expires_at)
        except NeedMemory:
            return
        self.model[key] = (self.model[key][0], expires_at)

    @rule(dt=st.floats(0.0, 3.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(budget=st.integers(1, 3))
    def expire_due(self, budget: int) -> None:
        self.store.expire_due(self.now, budget)

    @rule(key=KEYS)
    def evict(self, key: bytes) -> None:
        self.store.evict([key])
        self.model.pop(key, None)

    @rule(key=KEYS)
    def read(self, key: bytes) -> None:
        expected = self.model[key][0] if self._live(key) else None
        assert self.store.get(key, self.now) == expected

    @invariant()
    def accounting_is_exact(self) -> None:
        assert_consistent(self.store)
        assert self.store.tracker.used <= self.store.tracker.maxmemory

    @invariant()
    def liveness_matches_the_model(self) -> None:
        for key in (b"a", b"b", b"c", b"d", b"e"):
            expected = self.model[key][0] if self._live(key) else None
            assert self.store.peek_raw(key, self.now) == expected


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(DETERMINISTIC, max_examples=60, stateful_step_count=40)


@pytest.mark.parametrize("to", ["lfu", "fifo", "random", "noeviction", "volatile-lru"])
def test_switching_the_policy_ranks_every_key_and_recounts_the_bookkeeping(to: str) -> None:
    store = make_store(policy="lru")
    for i in range(50):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=10.0 if i % 2 else None)
    store.switch_policy(make_policy(to))
    assert type(store.policy) is type(make_policy(to))
    assert_consistent(store)
    assert store.used == sum(
        store.entry_size(k, v, has_ttl=k in store.expires) for k, v in store.data.items()
    )
    if to != "noeviction":
        assert {key for _, key in store.policy.candidates(100)} <= set(store.data)
        assert len(store.policy) == len(store.data)


def test_victims_chosen_under_an_earlier_policy_go_only_if_the_current_one_allows() -> None:
    store = make_store(policy="lru")
    store.put(b"plain", b"v", 0.0, expires_at=None)
    store.put(b"volatile", b"v", 0.0, expires_at=10.0)
    victims = [key for _, key, _ in store.eviction_candidates(2)]
    assert sorted(victims) == [b"plain", b"volatile"]
    store.switch_policy(make_policy("noeviction"))
    assert store.evict(victims) == (0, 0)
    store.switch_policy(make_policy("volatile-lru"))
    assert store.evict(victims) == (1, store.entry_size(b"volatile", b"v", has_ttl=True))
    assert set(store.data) == {b"plain"}
    assert_consistent(store)


@DETERMINISTIC
@given(
    before=st.lists(st.tuples(_KEYS, _VALUES, st.sampled_from([None, 1.0, 100.0])), max_size=8),
    writes=st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=8),
)
def test_the_plain_set_op_is_set_without_options(
    before: list[tuple[bytes, bytes, float | None]], writes: list[tuple[bytes, bytes]]
) -> None:
    """ops.PlainSet (SET with no option) answers and writes as ops.Set with none."""
    from kvmemo.commands import ops
    from kvmemo.commands.args import NO_EXPIRY

    fast, slow = make_store(), make_store()
    for store in (fast, slow):
        for key, value, expires_at in before:
            store.put(key, value, 0.0, expires_at=expires_at)
    for key, value in writes:
        plain = ops.PlainSet(key, value).apply(fast, 2.0)
        full = ops.Set(key, value, NO_EXPIRY, nx=False, xx=False, get=False).apply(slow, 2.0)
        assert plain == full == "OK"
    assert (fast.data, fast.expires, fast.used) == (slow.data, slow.expires, slow.used)
    assert_consistent(fast)


def test_the_number_of_scan_snapshots_is_the_stores_setting_and_their_keys_are_counted() -> None:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1), scan_snapshots=2)
    for i in range(10):
        store.put(b"k%d" % i, b"v", 0.0, expires_at=None)
    first, offset, _ = store.scan(0, 0, 3, 0.0)
    assert offset == 3
    assert store.scan_snapshot_keys() == 10
    store.scan(0, 0, 3, 0.0)
    assert store.scan_snapshot_keys() == 20  # two open scans, ten keys each
    store.scan(0, 0, 3, 0.0)  # a third: the least recently continued (the first) goes
    assert store.scan_snapshot_keys() == 20
    again, offset, keys = store.scan(first, 3, 3, 0.0)
    assert again != first  # a fresh snapshot, walked from the start
    assert (offset, keys) == (3, [b"k0", b"k1", b"k2"])
    while offset:
        again, offset, _ = store.scan(again, offset, 3, 0.0)
    assert store.scan_snapshot_keys() == 10  # the finished scan let its snapshot go
    assert store.repaired(make_policy("lru")).scan_snapshots == 2
