"""Key placement: CRC16, hash slots with hash tags, and the slot -> shard map."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmemo.storage.slots import SLOT_COUNT, SlotMap, crc16, key_slot

# Fixed examples, no example database, no timing-based failures: the same
# run every time, however loaded the machine.
DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Shard counts to try: small ones, and the extremes (a map of 16384 shards
# takes ~10 ms to build, so those come from a cache).
SHARD_COUNTS = st.integers(min_value=1, max_value=64) | st.sampled_from([1000, SLOT_COUNT])


@functools.cache
def _cached_slot_map(shards: int) -> SlotMap:
    return SlotMap(shards)


def _bitwise_crc16_xmodem(data: bytes) -> int:
    """The textbook bit-at-a-time CRC16/XMODEM, as an independent reference."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def test_crc16_matches_the_redis_cluster_spec_test_vector() -> None:
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0


@DETERMINISTIC
@given(st.binary(max_size=64))
def test_crc16_agrees_with_a_bitwise_reference(data: bytes) -> None:
    assert crc16(data) == _bitwise_crc16_xmodem(data)


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        (b"foo", 12182),
        (b"bar", 5061),
        (b"hello", 866),
        (b"somekey", 11058),
        (b"", 0),
    ],
)
def test_key_slot_gives_the_slots_redis_cluster_gives(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot


def test_keys_with_the_same_hash_tag_share_a_slot() -> None:
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        (b"foo{}{bar}", b"foo{}{bar}"),  # the first tag is empty: the whole key
        (b"foo{{bar}}zap", b"{bar"),  # from the first '{' to the first '}' after it
        (b"foo{bar}{zap}", b"bar"),  # only the first tag counts
        (b"{user1000}.following", b"user1000"),
        (b"foo{bar", b"foo{bar"),  # no closing brace: the whole key
        (b"foo}bar{", b"foo}bar{"),  # '}' before '{' is no tag
        (b"{}", b"{}"),
        (b"a{b}", b"b"),
    ],
)
def test_key_slot_hashes_only_a_non_empty_first_hash_tag(key: bytes, hashed: bytes) -> None:
    assert key_slot(key) == crc16(hashed) % SLOT_COUNT


@pytest.mark.parametrize("shards", [0, -1])
def test_slot_map_rejects_fewer_than_one_shard(shards: int) -> None:
    with pytest.raises(ValueError, match=rf"^shards must be >= 1, got {shards}$"):
        SlotMap(shards)


def test_slot_map_rejects_more_shards_than_slots() -> None:
    with pytest.raises(ValueError, match=r"^shards must be <= 16384, got 16385$"):
        SlotMap(16385)


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 16, 1000, SLOT_COUNT])
def test_slot_ranges_are_contiguous_ordered_and_cover_every_slot(shards: int) -> None:
    slot_map = SlotMap(shards)
    covered: list[int] = []
    for shard in range(shards):
        slots = slot_map.slots_of(shard)
        assert len(slots) >= 1
        assert all(slot_map.shard_of_slot(slot) == shard for slot in slots)
        covered.extend(slots)
    assert covered == list(range(SLOT_COUNT))
    assert all(
        slot_map.shard_of_slot(slot) == slot * shards // SLOT_COUNT for slot in range(SLOT_COUNT)
    )


def test_slot_ranges_of_three_shards_split_the_slots_evenly() -> None:
    slot_map = SlotMap(3)
    assert [slot_map.slots_of(shard) for shard in range(3)] == [
        range(0, 5462),
        range(5462, 10923),
        range(10923, 16384),
    ]


def test_one_shard_owns_every_key() -> None:
    slot_map = SlotMap(1)
    assert slot_map.shard_of(b"foo") == 0
    assert slot_map.slots_of(0) == range(SLOT_COUNT)


def test_shard_of_routes_through_the_key_slot() -> None:
    slot_map = SlotMap(SLOT_COUNT)  # one slot per shard: shard == slot
    assert slot_map.shard_of(b"foo") == 12182
    assert SlotMap(2).shard_of(b"foo") == 1
    assert SlotMap(2).shard_of(b"hello") == 0


@pytest.mark.parametrize("slot", [-1, SLOT_COUNT])
def test_shard_of_slot_rejects_a_slot_out_of_range(slot: int) -> None:
    with pytest.raises(ValueError, match=rf"^slot must be >= 0 and < 16384, got {slot}$"):
        SlotMap(4).shard_of_slot(slot)


@pytest.mark.parametrize("shard", [-1, 4])
def test_slots_of_rejects_a_shard_out_of_range(shard: int) -> None:
    with pytest.raises(ValueError, match=rf"^shard must be >= 0 and < 4, got {shard}$"):
        SlotMap(4).slots_of(shard)


def test_slot_maps_are_equal_values_by_shard_count() -> None:
    assert SlotMap(4) == SlotMap(4)
    assert SlotMap(4) != SlotMap(5)
    assert hash(SlotMap(4)) == hash(SlotMap(4))
    assert repr(SlotMap(4)) == "SlotMap(shards=4)"
    with pytest.raises(AttributeError):
        SlotMap(4).shards = 5  # type: ignore[misc]


def test_group_by_shard_keeps_input_positions_per_shard_in_ascending_shard_order() -> None:
    slot_map = SlotMap(2)
    keys = [b"foo", b"hello", b"{foo}x", b"bar", b"{hello}y"]
    # foo -> 12182 -> shard 1; hello -> 866 -> 0; bar -> 5061 -> 0
    groups = slot_map.group_by_shard(keys)
    assert groups == {0: [1, 3, 4], 1: [0, 2]}
    assert list(groups) == [0, 1]


def test_group_by_shard_of_no_keys_is_empty() -> None:
    assert SlotMap(4).group_by_shard([]) == {}


def test_group_by_shard_accepts_any_iterable_and_keeps_duplicates() -> None:
    groups = SlotMap(4).group_by_shard(iter([b"k", b"k"]))
    assert list(groups.values()) == [[0, 1]]


@DETERMINISTIC
@given(key=st.binary(max_size=40), shards=SHARD_COUNTS)
def test_every_key_maps_to_a_valid_shard_stably(key: bytes, shards: int) -> None:
    slot_map = _cached_slot_map(shards)
    shard = slot_map.shard_of(key)
    assert shard in range(shards)
    assert key_slot(key) in range(SLOT_COUNT)
    assert key_slot(key) in slot_map.slots_of(shard)
    assert shard == key_slot(key) * shards // SLOT_COUNT
    # Stable: the same key (even as a new object) gives the same shard again.
    assert slot_map.shard_of(bytes(bytearray(key))) == shard
    if shards <= 64:  # and so does a map built afresh
        assert SlotMap(shards).shard_of(key) == shard


@DETERMINISTIC
@given(
    tag=st.binary(min_size=1, max_size=12).filter(lambda tag: b"}" not in tag),
    prefixes=st.lists(st.binary(max_size=8).filter(lambda p: b"{" not in p), min_size=2),
    suffix=st.binary(max_size=8),
    shards=SHARD_COUNTS,
)
def test_keys_with_the_same_tag_land_on_the_same_shard(
    tag: bytes, prefixes: list[bytes], suffix: bytes, shards: int
) -> None:
    slot_map = _cached_slot_map(shards)
    keys = [prefix + b"{" + tag + b"}" + suffix for prefix in prefixes]
    assert {slot_map.shard_of(key) for key in keys} == {slot_map.shard_of(tag)}
    assert len(slot_map.group_by_shard(keys)) == 1


@DETERMINISTIC
@given(keys=st.lists(st.binary(max_size=12), max_size=30), shards=SHARD_COUNTS)
def test_group_by_shard_partitions_the_positions(keys: list[bytes], shards: int) -> None:
    slot_map = _cached_slot_map(shards)
    groups = slot_map.group_by_shard(keys)
    assert sorted(p for positions in groups.values() for p in positions) == list(range(len(keys)))
    assert list(groups) == sorted(groups)
    for shard, positions in groups.items():
        assert positions == sorted(positions)
        assert all(slot_map.shard_of(keys[p]) == shard for p in positions)
