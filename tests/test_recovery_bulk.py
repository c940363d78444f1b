"""Recovery's bulk paths agree with the per-entry ones they replace.

- ``replay`` tries the shape of the last SET it accepted on the next record
  (one ``Struct`` call for every field); whatever the bytes, it must apply
  and refuse exactly what the record decoder does, including runs of
  same-shaped records with damage among them.
- ``ShardStore.load`` records the keys in the policy with one
  ``record_loaded`` call and sizes them with ``entries_size``: the same
  keys, partitions and bytes as ``record_insert`` and ``entry_size`` per key.
"""

from __future__ import annotations

import zlib

import hypothesis.strategies as st
from hypothesis import given, settings
from test_persistence_records import DETERMINISTIC, model_apply

from kvmemo.eviction import policies
from kvmemo.eviction.memory import MemoryTracker, entries_size, entry_size
from kvmemo.eviction.policies import POLICY_NAMES, make_policy
from kvmemo.persistence.records import Op, Record, decode_stream, encode, replay
from kvmemo.storage.store import ShardStore


@st.composite
def same_shaped_stream(draw: st.DrawFn) -> bytes:
    """Runs of SET records of a few shapes (the replay's fast path), then damage."""
    shapes = draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=1, max_size=3))
    recs: list[Record] = []
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.integers(0, 9))
        klen, vlen = draw(st.sampled_from(shapes))
        key = draw(st.binary(min_size=klen, max_size=klen))
        if kind == 0:
            recs.append(Record(Op.DEL, key))
        elif kind == 1:
            recs.append(Record(Op.EXPIRE, key, b"", draw(st.none() | st.integers(0, 99))))
        else:
            value = draw(st.binary(min_size=vlen, max_size=vlen))
            expiry = draw(st.none() | st.integers(0, 2**63 - 1))
            recs.append(Record(Op.SET, key, value, expiry))
    data = bytearray(b"".join(encode(r) for r in recs))
    del data[draw(st.just(len(data)) | st.integers(0, len(data))) :]
    if data:
        for i in draw(st.lists(st.integers(0, len(data) - 1), max_size=3, unique=True)):
            data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


@settings(DETERMINISTIC, max_examples=400)
@given(same_shaped_stream(), st.booleans())
def test_replay_of_same_shaped_records_applies_exactly_what_the_decoder_returns(
    data: bytes, prefill: bool
) -> None:
    decoded = decode_stream(data)
    state: dict[bytes, bytes] = {b"old": b"x"} if prefill else {}
    expires: dict[bytes, int] = {b"old": 7} if prefill else {}
    want_state, want_expires = dict(state), dict(expires)
    model_apply(decoded.records, want_state, want_expires)
    result = replay(data, state, expires)
    assert (state, expires) == (want_state, want_expires)
    assert (result.count, result.end, result.problem) == (
        len(decoded.records),
        decoded.end,
        decoded.problem,
    )


def test_a_record_that_breaks_the_run_is_judged_by_the_general_path() -> None:
    # Ten SETs of one shape, then one whose value length field disagrees
    # with its payload length (its CRC made valid): the fast path must not
    # take it, and the decoder's verdict (damage at its offset) stands.
    recs = [Record(Op.SET, b"k%d" % i, b"v%d" % i) for i in range(10)]
    good = b"".join(encode(r) for r in recs)
    bad = bytearray(encode(Record(Op.SET, b"k0", b"v0")))
    bad[4 + 6 + 4 + 2] += 1  # the value length (crc, version, op, plen, klen, key)
    bad[:4] = zlib.crc32(bytes(bad[4:])).to_bytes(4, "little")
    data = good + bytes(bad) + encode(Record(Op.SET, b"k1", b"zz"))
    state: dict[bytes, bytes] = {}
    result = replay(data, state, {})
    assert result.count == 10
    assert result.end == len(good)
    assert result.problem == decode_stream(data).problem
    assert result.problem is not None
    assert state == {r.key: r.value for r in recs}


@settings(DETERMINISTIC, max_examples=100)
@given(
    st.dictionaries(st.binary(max_size=20), st.binary(max_size=300), max_size=40),
    st.data(),
)
def test_entries_size_is_the_sum_of_entry_size(
    data: dict[bytes, bytes], draw: st.DataObject
) -> None:
    with_ttl = set(draw.draw(st.sets(st.sampled_from(sorted(data))) if data else st.just(set())))
    want = sum(entry_size(k, v, has_ttl=k in with_ttl) for k, v in data.items())
    assert entries_size(data, len(with_ttl)) == want


@settings(DETERMINISTIC, max_examples=60)
@given(
    st.sampled_from(sorted(POLICY_NAMES)),
    st.dictionaries(st.binary(max_size=6), st.binary(max_size=50), max_size=30),
    st.data(),
)
def test_load_records_and_sizes_like_one_insert_per_key(
    policy: str, data: dict[bytes, bytes], draw: st.DataObject
) -> None:
    volatile = draw.draw(st.sets(st.sampled_from(sorted(data)))) if data else set()
    expires = {k: 1e9 for k in volatile}
    store = ShardStore(0, make_policy(policy), MemoryTracker(0, 1))
    store.put(b"stale", b"gone", 0.0, expires_at=None)  # load replaces whatever was there
    store.load(data, expires)
    assert store.check_invariants()
    assert store.used == sum(store.entry_size(k, v, has_ttl=k in volatile) for k, v in data.items())
    # The policy tracks the keys as one insert per key would have.
    one_by_one = make_policy(policy)
    for key in data:
        one_by_one.record_insert(key, volatile=key in volatile)
    assert len(store.policy) == len(one_by_one)
    got = {k for _, k in store.policy.candidates(len(data) + 1)}
    want = {k for _, k in one_by_one.candidates(len(data) + 1)}
    assert got == want


def test_lru_load_gives_increasing_ticks_per_partition_and_takes_no_spare_tick() -> None:
    policy = policies.LRUPolicy()
    keys = [b"p1", b"v1", b"p2", b"v2", b"p3"]
    volatile = {b"v1", b"v2"}
    before = next(policies._CLOCK)
    policy.record_loaded(keys, volatile)
    after = next(policies._CLOCK)
    assert after - before == len(keys) + 1  # one tick per key, none lost to zip
    persistent = [policy.last_access(k) for k in (b"p1", b"p2", b"p3")]
    volatiles = [policy.last_access(k) for k in (b"v1", b"v2")]
    assert all(t is not None for t in persistent + volatiles)
    assert persistent == sorted(persistent)
    assert volatiles == sorted(volatiles)
    # volatile-lru offers exactly the volatile ones, oldest first.
    vpolicy = policies.VolatileLRUPolicy()
    vpolicy.record_loaded(iter(keys), volatile)  # any iterable
    assert [k for _, k in vpolicy.candidates(5)] == [b"v1", b"v2"]
    assert [k for _, k in policy.candidates(5)] == [b"p1", b"p2", b"p3", b"v1", b"v2"]
