"""The record codec: round trips, shape rules, torn versus corrupt, replay."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmemo.persistence import records
from kvmemo.persistence.records import (
    HEADER_SIZE,
    MAX_EXPIRES_MS,
    Corrupt,
    Op,
    Record,
    Torn,
    decode_stream,
    encode,
    encode_fields,
    replay,
)

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SAMPLES = [
    Record(Op.SET, b"k", b"v"),
    Record(Op.SET, b"", b""),
    Record(Op.SET, b"key", b"\x00" * 1000, 0),
    Record(Op.SET, b"key", b"value", MAX_EXPIRES_MS),
    Record(Op.DEL, b"gone"),
    Record(Op.EXPIRE, b"k", expires_ms=1_700_000_000_000),
    Record(Op.EXPIRE, b"k", expires_ms=None),
    Record(Op.FLUSH),
]


def record_strategy() -> st.SearchStrategy[Record]:
    keys = st.binary(max_size=12)
    expiry = st.none() | st.integers(0, 2_000)
    return st.one_of(
        st.builds(Record, st.just(Op.SET), keys, st.binary(max_size=40), expiry),
        st.builds(Record, st.just(Op.DEL), keys),
        st.builds(Record, st.just(Op.EXPIRE), keys, st.just(b""), expiry),
        st.just(Record(Op.FLUSH)),
    )


def model_apply(recs: list[Record], data: dict[bytes, bytes], expires: dict[bytes, int]) -> None:
    """What replaying ``recs`` must do, written independently of the codec."""
    for r in recs:
        if r.op is Op.SET:
            data[r.key] = r.value
            expires.pop(r.key, None)
            if r.expires_ms is not None:
                expires[r.key] = r.expires_ms
        elif r.op is Op.DEL:
            data.pop(r.key, None)
            expires.pop(r.key, None)
        elif r.op is Op.EXPIRE:
            if r.key in data:
                expires.pop(r.key, None)
                if r.expires_ms is not None:
                    expires[r.key] = r.expires_ms
        else:
            data.clear()
            expires.clear()


def offsets(recs: list[Record]) -> list[int]:
    """The start offset of each record, then the end of the last."""
    out = [0]
    for r in recs:
        out.append(out[-1] + len(encode(r)))
    return out


def test_every_op_round_trips_through_encode_and_decode_stream() -> None:
    data = b"".join(encode(r) for r in SAMPLES)
    result = decode_stream(data)
    assert result.records == SAMPLES
    assert result.end == len(data)
    assert result.problem is None


def test_encode_fields_is_encode_of_the_same_record() -> None:
    for r in SAMPLES:
        assert encode_fields(r.op, r.key, r.value, r.expires_ms) == encode(r)


@given(st.binary(max_size=40), st.binary(max_size=300))
def test_encode_set_is_encode_fields_of_a_set_without_expiry(key: bytes, value: bytes) -> None:
    assert records.encode_set(key, value) == encode_fields(Op.SET, key, value)


def test_encode_set_packs_every_shape_as_encode_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cached packers, the field-by-field path past them, and a cache that starts over."""
    monkeypatch.setattr(records, "_SET_PACKERS", {})
    monkeypatch.setattr(records, "_SET_PACKERS_MAX", 3)
    limit = records._SET_PACKED_MAX
    shapes = [(0, 0), (16, 32), (1, limit - 1), (limit, 0), (1, limit), (7, limit + 100)]
    for _ in range(2):
        for klen, vlen in shapes:
            key, value = b"k" * klen, b"v" * vlen
            assert records.encode_set(key, value) == encode_fields(Op.SET, key, value)
            assert len(records._SET_PACKERS) <= 3


def test_encode_set_rejects_a_payload_over_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_PAYLOAD", 100)
    monkeypatch.setattr(records, "_SET_PACKED_MAX", 0)  # every shape through the checked path
    assert records.encode_set(b"k" * 40, b"v" * 43) == encode(Record(Op.SET, b"k" * 40, b"v" * 43))
    with pytest.raises(ValueError, match=r"^record payload must be <= 100 bytes, got 101$"):
        records.encode_set(b"k" * 40, b"v" * 44)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (Record(Op.DEL, b"k", b"v"), r"^a DEL record has no value and no expiry$"),
        (Record(Op.DEL, b"k", expires_ms=5), r"^a DEL record has no value and no expiry$"),
        (Record(Op.EXPIRE, b"k", b"v", 5), r"^an EXPIRE record has no value$"),
        (Record(Op.FLUSH, b"k"), r"^a FLUSH record has no key, value nor expiry$"),
        (Record(Op.SET, b"k", b"v", -1), r"^expires_ms must be in \[0, 2\*\*63\), got -1$"),
        (
            Record(Op.SET, b"k", b"v", 1 << 63),
            r"^expires_ms must be in \[0, 2\*\*63\), got 9223372036854775808$",
        ),
    ],
)
def test_encode_rejects_records_that_break_a_shape_rule(record: Record, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(record)


def test_encode_rejects_a_payload_over_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_PAYLOAD", 100)
    encode(Record(Op.SET, b"k" * 40, b"v" * 43))  # exactly 100
    with pytest.raises(ValueError, match=r"^record payload must be <= 100 bytes, got 101$"):
        encode(Record(Op.SET, b"k" * 40, b"v" * 44))


def test_a_cut_anywhere_inside_the_last_record_is_torn_at_its_start() -> None:
    data = b"".join(encode(r) for r in SAMPLES)
    starts = offsets(SAMPLES)
    for cut in range(len(data)):
        result = decode_stream(data[:cut])
        whole = max(i for i, start in enumerate(starts) if start <= cut)
        assert result.records == SAMPLES[:whole]
        assert result.end == starts[whole]
        assert result.problem == (None if cut == starts[whole] else Torn(starts[whole]))


@pytest.mark.parametrize("last", [False, True])
def test_a_flipped_byte_anywhere_in_a_record_is_corrupt_never_torn(last: bool) -> None:
    # The damaged record is the last one too: then a damaged length field
    # could pass for a torn tail, were lengths not checked against each other.
    first, second = encode(Record(Op.SET, b"key", b"value", 42)), encode(Record(Op.DEL, b"k"))
    victim, prefix = (second, first) if last else (first, b"")
    rest = b"" if last else second
    for i in range(len(victim)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(victim)
            damaged[i] ^= mask
            result = decode_stream(prefix + bytes(damaged) + rest)
            assert isinstance(result.problem, Corrupt), (i, mask, result)
            assert result.problem.offset == len(prefix)
            assert len(result.records) == (1 if last else 0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes(40), "unknown format version 0"),
        (b"\x00\x00\x00\x00\x03\x01", "unknown format version 3"),
        (b"\x00\x00\x00\x00\x01\x09", "unknown op 9"),
        (b"\x00\x00\x00\x00\x01\x08", "unknown op 8"),  # a PATCH is version 2's
        (b"\x00\x00\x00\x00\x02\x09", "unknown op 9"),
        (b"\x00" * 4 + b"\x01\x01" + (5).to_bytes(4, "little"), "impossible payload length 5"),
    ],
)
def test_bytes_that_cannot_begin_a_record_are_corrupt_with_a_reason(
    data: bytes, reason: str
) -> None:
    prefix = encode(Record(Op.SET, b"k", b"v"))
    result = decode_stream(prefix + data)
    assert result.problem == Corrupt(len(prefix), reason)
    assert result.records == [Record(Op.SET, b"k", b"v")]


def test_a_length_larger_than_the_maximum_is_corrupt_not_torn() -> None:
    header = b"\x00" * 4 + b"\x01\x01" + (records.MAX_PAYLOAD + 1).to_bytes(4, "little")
    assert decode_stream(header).problem == Corrupt(
        0, f"impossible payload length {records.MAX_PAYLOAD + 1}"
    )


def test_a_crc_valid_record_with_a_bad_shape_is_corrupt() -> None:
    # A DEL with a value: only a bug could write it, and its CRC is right.
    bad = records._VOP_LEN_KLEN.pack(1, Op.DEL, 17 + 1 + 1, 1) + b"k"
    bad += records._U32.pack(1) + b"v" + records._EXPIRY.pack(0, 0)
    data = records._U32.pack(zlib.crc32(bad)) + bad
    assert decode_stream(data).problem == Corrupt(0, "a DEL record has no value and no expiry")


@settings(DETERMINISTIC, max_examples=300)
@given(st.binary(max_size=300))
def test_decode_stream_never_raises_and_only_returns_what_it_can_re_encode(data: bytes) -> None:
    result = decode_stream(data)
    assert 0 <= result.end <= len(data)
    assert (result.problem is None) == (result.end == len(data))
    assert b"".join(encode(r) for r in result.records) == data[: result.end]


@st.composite
def damaged_stream(draw: st.DrawFn) -> tuple[list[Record], bytes, int, bool]:
    """Records, their encoding cut and flipped, the first damaged offset, and if flipped."""
    recs = draw(st.lists(record_strategy(), max_size=12))
    data = bytearray(b"".join(encode(r) for r in recs))
    cut = draw(st.just(len(data)) | st.sampled_from(range(len(data) + 1)))
    del data[cut:]
    flips = []
    if data:
        flips = draw(st.lists(st.sampled_from(range(len(data))), max_size=3, unique=True))
        for i in flips:
            data[i] ^= draw(st.integers(1, 255))
    first = min([cut, *flips])
    return recs, bytes(data), first, bool(flips)


@settings(DETERMINISTIC, max_examples=150)
@given(damaged_stream())
def test_damage_never_yields_a_record_not_written_and_keeps_every_record_before_it(
    case: tuple[list[Record], bytes, int, bool],
) -> None:
    recs, data, first, flipped = case
    result = decode_stream(data)
    starts = offsets(recs)
    intact = sum(1 for end in starts[1:] if end <= first)
    # Every record before the first damaged byte, and nothing from there on:
    # a damaged record never passes (flipped bytes are distinct, so really changed).
    assert result.records == recs[:intact]
    if not flipped:
        expected_end = starts[intact]
        assert result.end == expected_end
        assert result.problem == (None if expected_end == len(data) else Torn(expected_end))
    elif isinstance(result.problem, Torn):
        assert result.end == starts[len(result.records)]


@settings(DETERMINISTIC, max_examples=100)
@given(damaged_stream(), st.booleans())
def test_replay_applies_exactly_the_records_decode_stream_returns(
    case: tuple[list[Record], bytes, int, bool], prefill: bool
) -> None:
    _, data, _, _ = case
    decoded = decode_stream(data)
    data_dict: dict[bytes, bytes] = {b"old": b"x"} if prefill else {}
    expires: dict[bytes, int] = {b"old": 7} if prefill else {}
    want_data, want_expires = dict(data_dict), dict(expires)
    model_apply(decoded.records, want_data, want_expires)
    result = replay(data, data_dict, expires)
    assert (data_dict, expires) == (want_data, want_expires)
    assert (result.count, result.end, result.problem) == (
        len(decoded.records),
        decoded.end,
        decoded.problem,
    )


def test_replay_with_sets_only_refuses_any_other_op_and_stops_there() -> None:
    data = encode(Record(Op.SET, b"a", b"1")) + encode(Record(Op.DEL, b"a"))
    state: dict[bytes, bytes] = {}
    result = replay(data, state, {}, sets_only=True)
    assert state == {b"a": b"1"}
    assert result.count == 1
    assert result.problem == Corrupt(
        len(encode(Record(Op.SET, b"a", b"1"))), "a DEL record where only SET records may be"
    )


def test_replay_starts_at_the_given_offset() -> None:
    data = b"HEAD" + encode(Record(Op.SET, b"a", b"1"))
    state: dict[bytes, bytes] = {}
    assert replay(data, state, {}, start=4).end == len(data)
    assert state == {b"a": b"1"}


def test_header_size_is_ten_bytes() -> None:
    assert HEADER_SIZE == 10
    assert len(encode(Record(Op.FLUSH))) == HEADER_SIZE + records.MIN_PAYLOAD
