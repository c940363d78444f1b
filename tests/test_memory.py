"""MemoryTracker (pure core) and the per-entry estimate, calibrated against tracemalloc."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from kvmemo.eviction.memory import ENTRY_OVERHEAD, TTL_OVERHEAD, MemoryTracker, entry_size
from kvmemo.eviction.policies import POLICY_NAMES, EvictionPolicy, make_policy
from kvmemo.storage.store import ShardStore

# -- the tracker ------------------------------------------------------------------------


def test_reservations_are_refused_past_the_limit_and_counted() -> None:
    tracker = MemoryTracker(1000, 2)
    assert tracker.try_reserve(0, 600)
    assert tracker.try_reserve(1, 400)
    assert not tracker.try_reserve(1, 1)
    assert tracker.refused == 1
    assert (tracker.used, tracker.shard_used(0), tracker.shard_used(1)) == (1000, 600, 400)
    assert tracker.try_reserve(0, -100)  # shrinking always succeeds
    tracker.release(1, 400)
    assert (tracker.used, tracker.shard_used(1)) == (500, 0)


def test_no_limit_means_every_reservation_succeeds() -> None:
    tracker = MemoryTracker(0, 1)
    assert tracker.try_reserve(0, 10**12)
    assert not tracker.over_watermark
    assert tracker.excess() == 0


def test_watermark_and_excess_follow_the_configured_fractions() -> None:
    tracker = MemoryTracker(1000, 1, watermark=0.9, target=0.5)
    tracker.try_reserve(0, 899)
    assert not tracker.over_watermark
    tracker.try_reserve(0, 1)
    assert tracker.over_watermark
    assert tracker.excess() == 400


def test_reset_shard_sets_one_shard_and_keeps_the_total_consistent() -> None:
    tracker = MemoryTracker(0, 3)
    for shard in range(3):
        tracker.try_reserve(shard, 100)
    tracker.reset_shard(1, 40)
    assert tracker.used == 240
    assert [tracker.shard_used(i) for i in range(3)] == [100, 40, 100]


def test_a_lowered_limit_refuses_new_bytes_but_keeps_usage() -> None:
    tracker = MemoryTracker(1000, 1)
    tracker.try_reserve(0, 800)
    tracker.set_limit(500)
    assert tracker.used == 800
    assert not tracker.try_reserve(0, 1)
    assert tracker.try_reserve(0, -400)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((-1, 1), {}, r"^maxmemory must be >= 0, got -1$"),
        ((0, 0), {}, r"^shards must be >= 1, got 0$"),
        (
            (0, 1),
            {"watermark": 0.5, "target": 0.9},
            r"^need 0 < target <= watermark <= 1, got target=0.9 watermark=0.5$",
        ),
    ],
)
def test_bad_tracker_settings_raise_value_error(
    args: tuple[int, int], kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryTracker(*args, **kwargs)


def test_entry_size_grows_with_the_payload_and_the_ttl() -> None:
    small = entry_size(b"k" * 16, b"v" * 16)
    assert small > 32
    assert entry_size(b"k" * 16, b"v" * 16, has_ttl=True) == small + TTL_OVERHEAD
    assert entry_size(b"k" * 16, b"v" * 4096) - small == 4096 - 16 + 0  # 16-byte steps
    assert entry_size(b"", b"") >= ENTRY_OVERHEAD - 2 * 33


# -- calibration against tracemalloc ----------------------------------------------------------

ENTRIES = 100_000
TOLERANCE = 0.20  # the estimate must be within ±20 % of measured growth


def measure(value_size: int, with_ttl: bool, policy: str = "lru") -> tuple[int, int]:
    """Fill a fresh store with ENTRIES entries; (traced growth, tracked usage).

    Keys and values are made inside the traced section, as a request's would
    be: their objects are part of what an entry costs.
    """
    tracker = MemoryTracker(0, 1)
    store = ShardStore(0, make_policy(policy), tracker)
    put = store.put
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(ENTRIES):
            key = i.to_bytes(16, "big")
            value = key[::-1] if value_size == 16 else bytes(value_size)
            put(key, value, 0.0, expires_at=1e6 + i if with_ttl else None)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store.data) == ENTRIES
    return grown, tracker.used


def check_within_tolerance(value_size: int, with_ttl: bool, policy: str) -> None:
    grown, tracked = measure(value_size, with_ttl, policy)
    ratio = tracked / grown
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, (
        f"{policy}, {value_size} B values{' with a TTL' if with_ttl else ''}: tracked"
        f" {tracked / ENTRIES:.0f} B per entry, measured {grown / ENTRIES:.0f} B"
    )


@pytest.mark.parametrize(
    ("value_size", "with_ttl"),
    [(16, False), (16, True), (4096, False)],
    ids=["16B", "16B-ttl", "4KiB"],
)
def test_tracked_usage_is_within_20_percent_of_traced_growth(
    value_size: int, with_ttl: bool
) -> None:
    check_within_tolerance(value_size, with_ttl, "lru")


# One policy per kind of bookkeeping (each volatile-* variant shares its base's).
OTHER_POLICIES = ["noeviction", "lfu", "fifo", "random"]


@pytest.mark.parametrize("policy", OTHER_POLICIES)
def test_every_policy_s_bookkeeping_is_counted_within_20_percent(policy: str) -> None:
    """Each policy keeps different metadata per key; the estimate counts each one's."""
    check_within_tolerance(16, False, policy)


def bookkeeping_of(name: str) -> type:
    """The class right below EvictionPolicy: the one whose metadata a policy keeps."""
    mro = type(make_policy(name)).__mro__
    return mro[mro.index(EvictionPolicy) - 1]


def test_every_policy_is_covered_by_the_calibration() -> None:
    covered = {bookkeeping_of(name) for name in ["lru", *OTHER_POLICIES]}
    assert {bookkeeping_of(name) for name in POLICY_NAMES} == covered
