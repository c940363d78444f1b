"""TTLIndex: the per-shard schedule of expiries (a schedule, not the truth)."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmemo.expiry.ttl_index import TTLIndex

# Fixed examples, no example database, no timing-based failures: the same
# run every time, however loaded the machine.
DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _index(*pairs: tuple[bytes, float]) -> TTLIndex:
    index = TTLIndex()
    for key, expires_at in pairs:
        index.add(key, expires_at)
    return index


def test_a_new_index_is_empty() -> None:
    index = TTLIndex()
    assert len(index) == 0
    assert index.next_deadline() is None
    assert index.due_count(1e9) == 0
    assert index.pop_due(1e9, 10) == []
    assert index.entries() == []


def test_pop_due_returns_due_keys_earliest_first_and_removes_them() -> None:
    index = _index((b"c", 3.0), (b"a", 1.0), (b"late", 10.0), (b"b", 2.0))
    assert index.pop_due(5.0, 100) == [b"a", b"b", b"c"]
    assert index.entries() == [(10.0, b"late")]
    assert index.pop_due(5.0, 100) == []


def test_a_key_expiring_exactly_now_is_due() -> None:
    index = _index((b"k", 5.0))
    assert index.due_count(math.nextafter(5.0, 0.0)) == 0
    assert index.pop_due(math.nextafter(5.0, 0.0), 1) == []
    assert index.due_count(5.0) == 1
    assert index.pop_due(5.0, 1) == [b"k"]


def test_pop_due_takes_at_most_budget_keys_per_call() -> None:
    index = _index(*((b"k%04d" % n, 1.0) for n in range(1000)))
    first = index.pop_due(2.0, 200)
    assert len(first) == 200
    assert len(index) == 800
    assert index.due_count(2.0) == 800
    drained = [first]
    while batch := index.pop_due(2.0, 200):
        drained.append(batch)
    assert [len(batch) for batch in drained] == [200] * 5
    assert sorted(key for batch in drained for key in batch) == [b"k%04d" % n for n in range(1000)]


@pytest.mark.parametrize("budget", [0, -3])
def test_pop_due_rejects_a_budget_below_one(budget: int) -> None:
    index = _index((b"k", 1.0))
    with pytest.raises(ValueError, match=rf"^budget must be >= 1, got {budget}$"):
        index.pop_due(2.0, budget)
    assert len(index) == 1


def test_colliding_timestamps_keep_one_entry_per_key_ordered_by_key() -> None:
    index = _index((b"b", 1.0), (b"a", 1.0), (b"c", 1.0))
    assert index.entries() == [(1.0, b"a"), (1.0, b"b"), (1.0, b"c")]
    index.discard(b"b", 1.0)
    assert index.entries() == [(1.0, b"a"), (1.0, b"c")]


def test_adding_the_same_pair_twice_keeps_one_entry() -> None:
    index = _index((b"k", 1.0), (b"k", 1.0))
    assert len(index) == 1
    index.discard(b"k", 1.0)
    assert len(index) == 0


def test_discarding_an_absent_pair_is_a_no_op() -> None:
    index = _index((b"k", 1.0))
    index.discard(b"k", 2.0)
    index.discard(b"other", 1.0)
    assert index.entries() == [(1.0, b"k")]


def test_a_changed_ttl_without_discard_leaves_a_stale_entry_that_rebuild_repairs() -> None:
    index = _index((b"k", 1.0))
    index.add(b"k", 50.0)  # the shard forgot to discard the old pair
    assert index.entries() == [(1.0, b"k"), (50.0, b"k")]
    assert index.pop_due(2.0, 10) == [b"k"]  # a stale candidate: the shard's entry decides
    index.add(b"gone", 3.0)
    index.rebuild({b"k": 50.0, b"new": 7.0})
    assert index.entries() == [(7.0, b"new"), (50.0, b"k")]


def test_next_deadline_is_the_earliest_expiry() -> None:
    index = _index((b"b", 4.5), (b"a", 2.25))
    assert index.next_deadline() == 2.25
    index.pop_due(3.0, 10)
    assert index.next_deadline() == 4.5


def test_contains_checks_expires_at_and_key_pairs() -> None:
    index = _index((b"k", 1.5))
    assert (1.5, b"k") in index
    assert (2.0, b"k") not in index
    assert (1.5, b"other") not in index
    assert b"k" not in index
    assert (1.5, "k") not in index
    assert ("1.5", b"k") not in index
    assert (1.5, b"k", 0) not in index


def test_infinite_expiry_is_never_due_before_the_end_of_time() -> None:
    index = _index((b"forever", math.inf), (b"soon", 1.0))
    assert index.pop_due(1e300, 10) == [b"soon"]
    assert index.due_count(1e308) == 0
    assert index.due_count(math.inf) == 1


def test_nothing_is_due_at_nan() -> None:
    index = _index((b"k", 1.0))
    assert index.due_count(math.nan) == 0
    assert index.pop_due(math.nan, 10) == []


def test_add_rejects_a_nan_expiry() -> None:
    index = TTLIndex()
    with pytest.raises(ValueError, match=r"^expires_at must not be NaN, got nan$"):
        index.add(b"k", math.nan)
    assert len(index) == 0


def test_rebuild_with_a_nan_expiry_leaves_the_index_unchanged() -> None:
    index = _index((b"k", 1.0))
    with pytest.raises(ValueError, match=r"^expires_at must not be NaN, got nan$"):
        index.rebuild({b"a": 2.0, b"b": math.nan})
    assert index.entries() == [(1.0, b"k")]


def test_clear_removes_everything() -> None:
    index = _index((b"a", 1.0), (b"b", 2.0))
    index.clear()
    assert len(index) == 0
    assert index.next_deadline() is None


def test_entries_is_a_copy() -> None:
    index = _index((b"a", 1.0))
    entries = index.entries()
    entries.clear()
    assert len(index) == 1


# -- model-based property ---------------------------------------------------------


@attrs.frozen
class Add:
    key: bytes
    expires_at: float


@attrs.frozen
class Discard:
    key: bytes
    expires_at: float


@attrs.frozen
class PopDue:
    now: float
    budget: int


@attrs.frozen
class Rebuild:
    expires: dict[bytes, float]


_KEYS = st.sampled_from([b"", b"a", b"b", b"c", b"k1", b"k2"])
_TIMES = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0, math.inf])  # collisions likely
_OPS = st.one_of(
    st.builds(Add, _KEYS, _TIMES),
    st.builds(Discard, _KEYS, _TIMES),
    st.builds(PopDue, _TIMES, st.integers(min_value=1, max_value=4)),
    st.builds(Rebuild, st.dictionaries(_KEYS, _TIMES, max_size=4)),
)


@DETERMINISTIC
@given(st.lists(_OPS, max_size=40))
def test_index_behaves_like_a_naive_sorted_set_of_pairs(
    ops: list[Add | Discard | PopDue | Rebuild],
) -> None:
    index = TTLIndex()
    model: set[tuple[float, bytes]] = set()
    for op in ops:
        match op:
            case Add(key, expires_at):
                index.add(key, expires_at)
                model.add((expires_at, key))
            case Discard(key, expires_at):
                index.discard(key, expires_at)
                model.discard((expires_at, key))
            case PopDue(now, budget):
                due = sorted(pair for pair in model if pair[0] <= now)[:budget]
                assert index.pop_due(now, budget) == [key for _, key in due]
                model.difference_update(due)
            case Rebuild(expires):
                index.rebuild(expires)
                model = {(expires_at, key) for key, expires_at in expires.items()}
        assert index.entries() == sorted(model)
        assert len(index) == len(model)
        assert index.next_deadline() == min((t for t, _ in model), default=None)
        for now in (0.0, 1.0, 2.5, math.inf):
            assert index.due_count(now) == sum(1 for t, _ in model if t <= now)
        assert all(pair in index for pair in model)
