"""BITPOS, BITFIELD, BITFIELD_RO and BITOP: Redis's semantics, BITOP atomic across shards.

The replies' bytes are compared with a real ``redis-server`` in
``tests/test_redis_differential.py``; here: the cores against naive bit-by-bit
models (hypothesis), the overflow rules case by case (each expectation read
off Redis 7.0), the size limit, errors that change nothing, BITOP across
shards under concurrent readers and writers, in a transaction, and with
persistence across a reopen.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_engine_atomic import key_on

import kvmemo
from kvmemo.commands import bits, ops
from kvmemo.commands.bits import (
    BitField,
    BitFieldGet,
    BitOperation,
    BitPos,
    FieldAction,
    FieldOp,
    Overflow,
    bitop,
    fit_field,
    read_field,
    write_field,
)
from kvmemo.commands.table import COMMANDS, ParseContext
from kvmemo.engine.engine import shard_name
from kvmemo.errors import CommandSyntaxError, KVMemoError, NotIntegerError, TooLargeError
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.storage.shard import Inspect
from kvmemo.storage.store import ShardStore

TEST_TIMEOUT = 30  # seconds for any one test


def new_store() -> ShardStore:
    return ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))


def parse(name: str, *args: bytes | str, max_value_size: int = 1 << 20) -> Any:
    """The operation ``name args`` parses into (errors raised as the table raises them)."""
    ctx = ParseContext(lambda: pytest.fail("no clock needed"), max_value_size)
    raw = [a.encode() if isinstance(a, str) else a for a in args]
    return COMMANDS[name].parse(raw, ctx)


def bit_at(value: bytes, i: int) -> int:
    return (value[i >> 3] >> (7 - (i & 7))) & 1 if i >> 3 < len(value) else 0


# -- bitfields against a bit-by-bit model ---------------------------------------------------


@given(
    value=st.binary(max_size=12),
    offset=st.integers(0, 100),
    bits=st.integers(1, 64),
    signed=st.booleans(),
    new=st.integers(-(1 << 64), 1 << 64),
)
def test_fields_read_and_write_bit_by_bit_as_redis_does(
    value: bytes, offset: int, bits: int, signed: bool, new: int
) -> None:
    """Redis's get/setUnsignedBitfield walk bit by bit, MSB first; zero past the end."""
    expected = 0
    for i in range(offset, offset + bits):
        expected = expected << 1 | bit_at(value, i)
    if signed and expected >> (bits - 1):
        expected -= 1 << bits
    assert read_field(value, offset, bits, signed) == expected
    size = max(len(value), (offset + bits + 7) // 8)
    buf = bytearray(value.ljust(size, b"\0"))
    write_field(buf, offset, bits, new)
    for i in range(size * 8):
        inside = offset <= i < offset + bits
        want = (new >> (offset + bits - 1 - i)) & 1 if inside else bit_at(value, i)
        assert bit_at(bytes(buf), i) == want, i


def field(action: FieldAction, kind: str, value: int, overflow: Overflow) -> FieldOp:
    return FieldOp(action, kind[0] == "i", int(kind[1:]), 0, value, overflow)


SET, INCRBY = FieldAction.SET, FieldAction.INCRBY
WRAP, SAT, FAIL = Overflow.WRAP, Overflow.SAT, Overflow.FAIL


@pytest.mark.parametrize(
    ("action", "kind", "target", "overflow", "stored"),
    [
        # In range: stored as it is, whatever the policy.
        (INCRBY, "u8", 255, FAIL, 255),
        (SET, "i8", -128, FAIL, -128),
        # Unsigned INCRBY: past the maximum, below zero.
        (INCRBY, "u8", 256, WRAP, 0),
        (INCRBY, "u8", 556, SAT, 255),
        (INCRBY, "u8", 256, FAIL, None),
        (INCRBY, "u8", -1, WRAP, 255),
        (INCRBY, "u8", -300, SAT, 0),
        (INCRBY, "u8", -1, FAIL, None),
        (INCRBY, "u63", -1, WRAP, (1 << 63) - 1),
        # Unsigned SET takes its value as a uint64: a negative one is over the maximum.
        (SET, "u8", -5, SAT, 255),
        (SET, "u8", -5, WRAP, 251),
        (SET, "u2", 5, WRAP, 1),
        (SET, "u2", 5, SAT, 3),
        (SET, "u2", 4, FAIL, None),
        (SET, "u63", -1, FAIL, None),
        (SET, "u1", 2, FAIL, None),
        # Signed: two's complement wrap, saturation at either end.
        (SET, "i2", 5, WRAP, 1),
        (SET, "i2", -5, WRAP, -1),
        (SET, "i2", 5, SAT, 1),
        (SET, "i2", -5, SAT, -2),
        (SET, "i8", -500, SAT, -128),
        (SET, "i1", 1, FAIL, None),
        (SET, "i1", -1, FAIL, -1),
        (INCRBY, "i64", (1 << 63), WRAP, -(1 << 63)),
        (INCRBY, "i64", -(1 << 63) - 1, WRAP, (1 << 63) - 1),
        (INCRBY, "i64", -(1 << 63) - 1, SAT, -(1 << 63)),
        (INCRBY, "i64", (1 << 64) - 2, SAT, (1 << 63) - 1),
        (INCRBY, "i64", -(1 << 63) - 1, FAIL, None),
    ],
)
def test_overflow_policies_store_what_redis_stores(
    action: FieldAction, kind: str, target: int, overflow: Overflow, stored: int | None
) -> None:
    """Each row read off Redis 7.0 (``BITFIELD k OVERFLOW ... SET|INCRBY ...``)."""
    assert fit_field(field(action, kind, 0, overflow), target) == stored


def run(op: ops.ShardOp, store: ShardStore, now: float = 0.0) -> Any:
    return op.apply(store, now)


def test_bitfield_runs_its_subcommands_in_order_on_one_copy() -> None:
    store = new_store()
    op = parse("bitfield", "k", "SET", "u8", "0", "255", "GET", "u8", "0", "GET", "i8", "0",
               "GET", "u4", "4", "GET", "i4", "4")  # fmt: skip
    assert run(op, store) == [0, 255, -1, 15, -1]
    op = parse("bitfield", "k", "OVERFLOW", "FAIL", "INCRBY", "u8", "0", "1",
               "INCRBY", "u8", "0", "-1", "OVERFLOW", "WRAP", "INCRBY", "u8", "0", "-1",
               "OVERFLOW", "SAT", "INCRBY", "u8", "0", "-300")  # fmt: skip
    assert run(op, store) == [None, 254, 253, 0]
    assert store.get(b"k", 0.0) == b"\x00"


def test_bitfield_hash_offsets_count_fields_of_their_width() -> None:
    store = new_store()
    assert run(parse("bitfield", "k", "SET", "u8", "#3", "7"), store) == [0]
    assert store.get(b"k", 0.0) == b"\x00\x00\x00\x07"
    assert run(parse("bitfield_ro", "k", "GET", "i16", "#1", "GET", "u8", "24"), store) == [7, 7]


def test_a_failed_write_still_creates_and_grows_the_key_as_redis_does() -> None:
    """Redis makes room for every write before running any (``lookupStringForBitCommand``)."""
    store = new_store()
    assert run(parse("bitfield", "n", "OVERFLOW", "FAIL", "SET", "u2", "100", "8"), store) == [None]
    assert store.get(b"n", 0.0) == bytes(13)
    assert run(parse("bitfield", "n", "GET", "u8", "0"), store) == [0]
    assert run(parse("bitfield", "nokey", "GET", "u8", "0"), store) == [0]
    assert store.get(b"nokey", 0.0) is None  # GETs alone never create the key


def test_bitfield_keeps_the_ttl_and_leaves_an_unchanged_value_unwritten() -> None:
    store = new_store()
    store.put(b"t", b"abc", 0.0, expires_at=100.0)
    assert run(parse("bitfield", "t", "SET", "u8", "0", "65"), store) == [97]
    assert store.get(b"t", 0.0) == b"Abc"
    assert store.expiry_of(b"t") == 100.0
    version = store.watch(b"t")
    assert run(parse("bitfield", "t", "OVERFLOW", "FAIL", "INCRBY", "u8", "0", "-66"), store) == [
        None
    ]
    assert store.watch_count(b"t") == version  # nothing changed, nothing written


def test_bitfield_growth_over_max_value_size_is_refused_and_changes_nothing() -> None:
    store = new_store()
    store.put(b"k", b"ab", 0.0, expires_at=None)
    op = parse("bitfield", "k", "SET", "u8", "0", "1", "SET", "u8", "24", "1", max_value_size=3)
    with pytest.raises(TooLargeError, match=r"^string exceeds maximum allowed size"):
        run(op, store)
    assert store.get(b"k", 0.0) == b"ab"
    # Within the value as it is, the limit does not matter (as SETBIT).
    store.put(b"big", b"abcd", 0.0, expires_at=None)
    op = parse("bitfield", "big", "SET", "u8", "#3", "65", max_value_size=3)
    assert run(op, store) == [ord("d")]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("k", "FOO"), CommandSyntaxError, "syntax error"),
        (("k", "GET", "u8"), CommandSyntaxError, "syntax error"),
        (("k", "SET", "u8", "0"), CommandSyntaxError, "syntax error"),
        (("k", "OVERFLOW"), CommandSyntaxError, "syntax error"),
        (("k", "OVERFLOW", "foo"), CommandSyntaxError, "Invalid OVERFLOW type specified"),
        (("k", "GET", "u64", "0"), CommandSyntaxError, bits.BITFIELD_TYPE_ERROR),
        (("k", "GET", "i65", "0"), CommandSyntaxError, bits.BITFIELD_TYPE_ERROR),
        (("k", "GET", "I8", "0"), CommandSyntaxError, bits.BITFIELD_TYPE_ERROR),
        (("k", "GET", "i08", "0"), CommandSyntaxError, bits.BITFIELD_TYPE_ERROR),
        (("k", "GET", "i8", "-1"), NotIntegerError, bits.BIT_OFFSET_ERROR),
        (("k", "GET", "i8", "#"), NotIntegerError, bits.BIT_OFFSET_ERROR),
        (("k", "GET", "i8", "4294967296"), NotIntegerError, bits.BIT_OFFSET_ERROR),
        (("k", "GET", "i64", "#67108864"), NotIntegerError, bits.BIT_OFFSET_ERROR),
        (("k", "SET", "i8", "0", "1.5"), NotIntegerError, "value is not an integer"),
        (("k", "SET", "u8", "0", "1", "GET", "u8", "x"), NotIntegerError, bits.BIT_OFFSET_ERROR),
    ],
)
def test_a_bad_subcommand_anywhere_refuses_the_whole_call(
    args: tuple[str, ...], error: type[KVMemoError], message: str
) -> None:
    with pytest.raises(error, match="^" + message.replace(".", r"\.")):
        parse("bitfield", *args)


def test_bitfield_ro_takes_gets_only_and_checks_every_subcommand_first() -> None:
    with pytest.raises(CommandSyntaxError, match=r"^BITFIELD_RO only supports the GET subcommand$"):
        parse("bitfield_ro", "k", "GET", "u8", "0", "INCRBY", "u8", "0", "1")
    with pytest.raises(NotIntegerError, match=r"^value is not an integer"):
        parse("bitfield_ro", "k", "SET", "u8", "0", "x")  # as Redis: the value's error first
    assert isinstance(parse("bitfield_ro", "k", "OVERFLOW", "FAIL"), BitFieldGet)
    assert isinstance(parse("bitfield", "k", "GET", "u8", "0"), BitFieldGet)
    assert isinstance(parse("bitfield", "k", "INCRBY", "u8", "0", "1"), BitField)
    assert not BitFieldGet.write
    assert BitField.write


# -- BITPOS against a bit-by-bit model -------------------------------------------------------


def bitpos_model(
    value: bytes | None, bit: int, start: int | None, end: int | None, bit_mode: bool
) -> int:
    """Redis's ``bitposCommand`` read as a specification, one bit at a time."""
    if value is None:
        return -1 if bit else 0
    total = len(value) * (8 if bit_mode else 1)
    lo = 0 if start is None else start
    hi = total - 1 if end is None else end
    lo = max(0, total + lo) if lo < 0 else lo
    hi = max(0, total + hi) if hi < 0 else hi
    hi = min(hi, total - 1)
    if lo > hi:
        return -1
    first, last = (lo, hi) if bit_mode else (lo * 8, hi * 8 + 7)
    for i in range(first, last + 1):
        if bit_at(value, i) == bit:
            return i
    return last + 1 if bit == 0 and end is None else -1


indexes = st.one_of(st.integers(-30, 30), st.sampled_from([-(1 << 63), (1 << 63) - 1]))


@given(
    value=st.one_of(st.none(), st.binary(max_size=6), st.sampled_from([b"\xff" * 3, b"\0" * 3])),
    bit=st.sampled_from([0, 1]),
    bounds=st.one_of(
        st.just((None, None, False)),
        st.tuples(indexes, st.none(), st.just(False)),
        st.tuples(indexes, indexes, st.booleans()),
    ),
)
def test_bitpos_finds_what_a_bit_by_bit_scan_finds(
    value: bytes | None, bit: int, bounds: tuple[int | None, int | None, bool]
) -> None:
    store = new_store()
    if value is not None:
        store.put(b"k", value, 0.0, expires_at=None)
    start, end, bit_mode = bounds
    got = run(BitPos(b"k", bit, start, end, bit_mode), store)
    assert got == bitpos_model(value, bit, start, end, bit_mode)


@pytest.mark.parametrize(
    ("value", "args", "expected"),
    [
        # Each read off Redis 7.0.
        (b"\xff\xf0\x00", ("0",), 12),
        (b"\xff\xff", ("0",), 16),  # no end given: zero-padded on the right
        (b"\xff\xff", ("0", "1"), 16),
        (b"\xff\xff", ("0", "0", "-1"), -1),  # end given: the range alone
        (b"\xff\xff", ("0", "2"), -1),  # an empty range
        (b"", ("0",), -1),
        (b"\xff\xff", ("1", "-100", "-50"), 0),  # no BITCOUNT quirk for two negatives
        (b"\x00\xff\x00\xff\x00", ("0", "-3", "-1", "BIT"), 37),
        (b"\x00\xff\x00\xff\x00", ("1", "9", "20", "bit"), 9),
        (b"\x00\x00\x00", ("0", "0", "9223372036854775807", "BIT"), 0),
    ],
)
def test_bitpos_edge_cases_answer_as_redis(
    value: bytes, args: tuple[str, ...], expected: int
) -> None:
    store = new_store()
    store.put(b"k", value, 0.0, expires_at=None)
    assert run(parse("bitpos", "k", *args), store) == expected


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("2",), NotIntegerError, "The bit argument must be 1 or 0."),
        (("-1",), NotIntegerError, "The bit argument must be 1 or 0."),
        (("01",), NotIntegerError, "value is not an integer or out of range"),
        (("1", "x"), NotIntegerError, "value is not an integer or out of range"),
        (("1", "0", "1", "FOO"), CommandSyntaxError, "syntax error"),
        (("1", "0", "x", "FOO"), CommandSyntaxError, "syntax error"),  # the unit first
        (("1", "0", "1", "BIT", "x"), CommandSyntaxError, "syntax error"),
        (("1", "0", "BIT"), NotIntegerError, "value is not an integer or out of range"),
    ],
)
def test_bitpos_checks_its_arguments_even_on_a_missing_key(
    args: tuple[str, ...], error: type[KVMemoError], message: str
) -> None:
    """Redis 7.2's order (7.0 answered a missing key before reading the range)."""
    with pytest.raises(error, match="^" + message.replace(".", r"\.") + "$"):
        parse("bitpos", "nokey", *args)


# -- BITOP's result ----------------------------------------------------------------------------


@given(values=st.lists(st.one_of(st.none(), st.binary(max_size=5)), min_size=1, max_size=4))
def test_bitop_works_byte_by_byte_on_zero_padded_values(values: list[bytes | None]) -> None:
    length = max((len(v) for v in values if v), default=0)
    padded = [(v or b"").ljust(length, b"\0") for v in values]
    for operation, fn in [
        (BitOperation.AND, operator.and_),
        (BitOperation.OR, operator.or_),
        (BitOperation.XOR, operator.xor),
    ]:
        want = bytearray(padded[0])
        for other in padded[1:]:
            want = bytearray(fn(x, y) for x, y in zip(want, other, strict=True))
        assert bitop(operation, values) == bytes(want), operation
    assert bitop(BitOperation.NOT, values[:1]) == bytes(255 - b for b in values[0] or b"")


def test_bitop_parses_as_redis_does() -> None:
    with pytest.raises(CommandSyntaxError, match=r"^syntax error$"):
        parse("bitop", "DIFF", "d", "a")
    with pytest.raises(CommandSyntaxError, match=r"^BITOP NOT must be called with a single"):
        parse("bitop", "not", "d", "a", "b")
    op = parse("bitop", "xOr", "d", "a", "b")
    assert (op.operation, op.keys) == (BitOperation.XOR, (b"d", b"a", b"b"))
    assert COMMANDS["bitop"].keys_of([b"AND", b"d", b"a", b"b"]) == [b"d", b"a", b"b"]


def test_a_result_over_max_value_size_is_refused_before_anything_is_held() -> None:
    op = parse("bitop", "OR", "d", "a", "b", max_value_size=3)
    with pytest.raises(TooLargeError, match=r"^string exceeds maximum allowed size"):
        op.sources_read([[4, 1]], [[0, 1, 2]])  # the read step gives lengths
    assert op.round is None


def test_a_source_grown_past_the_read_votes_changed_and_reserves_nothing() -> None:
    """The destination reserved for the longest value read: a longer one means read again."""
    store = new_store()
    store.put(b"a", b"\x0f\x0f", 0.0, expires_at=None)
    op = parse("bitop", "NOT", "d", "a")
    op.sources_read([[len(store.peek(b"a", 0.0) or b"")]], [[0, 1]])
    store.put(b"a", b"\x0f" * 20, 0.0, expires_at=None)  # past the 2-byte value's size step
    used = store.tracker.used
    part = op.part([0, 1])
    assert part.prepare(store, 0.0) is ops.CHANGED
    part.abort(store)
    assert store.get(b"d", 0.0) is None
    assert store.tracker.used == used
    assert store.check_invariants()


def test_a_source_changed_within_the_read_length_is_taken_as_prepare_finds_it() -> None:
    store = new_store()
    store.put(b"a", b"\x0f\x0f", 0.0, expires_at=None)
    store.put(b"d", b"a much longer old value", 0.0, expires_at=5.0)
    op = parse("bitop", "NOT", "d", "a")
    op.sources_read([[len(store.peek(b"a", 0.0) or b"")]], [[0, 1]])
    store.put(b"a", b"\xf0", 0.0, expires_at=None)  # shorter, different
    part = op.part([0, 1])
    assert part.prepare(store, 1.0) is True
    part.commit(store, 1.0)
    assert op.combine([None], [[0, 1]], True) == 1
    assert store.get(b"d", 1.0) == b"\x0f"
    assert store.expiry_of(b"d") is None
    assert store.check_invariants()  # the reservation for the bound became the exact one


# -- BITOP through the engine --------------------------------------------------------------------


def keys_on_shards(kv: kvmemo.Store, *prefixes: str) -> list[str]:
    """One key per prefix, each on its own shard (0, 1, 2, ...)."""
    return [key_on(kv, shard, prefix) for shard, prefix in enumerate(prefixes)]


async def test_bitop_across_shards_writes_the_destination_and_drops_its_ttl() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            a, b, d = keys_on_shards(kv, "a", "b", "d")
            await kv.mset({a: b"\xff\x0f", b: b"\xf0"})
            await kv.set(d, "old", ex=100)
            assert await kv.bitop("AND", d, a, b) == 2
            assert await kv.get(d) == b"\xf0\x00"
            assert await kv.ttl(d) == -1
            assert await kv.bitop("XOR", d, a, b, "missing") == 2
            assert await kv.get(d) == b"\x0f\x0f"
            assert await kv.bitop("NOT", a, a) == 2  # the destination among the sources
            assert await kv.get(a) == b"\x00\xf0"
            assert await kv.bitop("OR", d, "missing", "missing2") == 0
            assert await kv.exists(d) == 0  # an empty result deletes the destination
            assert await kv.bitop("OR", d, "missing") == 0  # and no destination is fine


@pytest.mark.parametrize(
    ("written", "reads"),
    # Within the size step of the length read (16-byte steps): taken as is; past it: read again.
    [(b"\xf0", 1), (b"\xf0\xf0", 1), (b"\xf0" * 20, 2)],
)
async def test_a_source_written_between_the_read_and_the_hold_is_the_one_used(
    monkeypatch: pytest.MonkeyPatch, written: bytes, reads: int
) -> None:
    """A SET reaches the source's shard after BITOP read it, before its hold: the
    result is computed from the new value (a longer one makes BITOP read again,
    as its destination reserved memory for the length read)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            a, b, d = keys_on_shards(kv, "a", "b", "d")
            await kv.mset({a: b"\x0f", b: b"\xff"})
            original = bits.BitOp.sources_read
            count = 0

            def racing(op: bits.BitOp, results: list[Any], positions: list[list[int]]) -> Any:
                nonlocal count
                count += 1
                answer = original(op, results, positions)
                if count == 1:  # queued on a's shard before the engine sends its hold
                    ref = kv.system.ref(shard_name(0))
                    ref.tell_nowait(ops.PlainSet(a.encode(), written))
                return answer

            monkeypatch.setattr(bits.BitOp, "sources_read", racing)
            assert await kv.bitop("AND", d, a, b) == len(written)
            assert count == reads
            assert await kv.get(d) == b"\xf0".ljust(len(written), b"\0")


async def test_no_bitop_result_mixes_two_states_of_its_sources() -> None:
    """A writer sets ``a`` then ``b`` (single-key SETs) to step ``i``: the states
    that exist are (i, i) and (i + 1, i). ``BITOP OR`` keeps a's step in the first
    byte and b's in the second, so any other pair in the destination is a result
    computed from a mix, which no reader (nor BITOP's own caller) may see."""
    steps = 120
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            a, b, d = keys_on_shards(kv, "a", "b", "d")
            await kv.mset({a: b"\x00\x00", b: b"\x00\x00"})
            seen: list[bytes | None] = []
            done = False

            async def writer() -> None:
                nonlocal done
                for i in range(1, steps):
                    await kv.set(a, bytes([i, 0]))
                    await kv.set(b, bytes([0, i]))
                done = True

            async def combiner() -> None:
                while not done:
                    assert await kv.bitop("OR", d, a, b) == 2
                    seen.append(await kv.get(d))

            async def reader() -> None:
                while not done:
                    seen.append(await kv.get(d))
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(combiner)
                nursery.start_soon(reader)
            results = [v for v in seen if v is not None]
            assert len(results) > 20
            torn = [v for v in results if v[0] - v[1] not in (0, 1)]
            assert not torn, torn[:5]


async def test_bitop_keeps_memory_accounting_exact() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            a, b, d = keys_on_shards(kv, "a", "b", "d")
            await kv.mset({a: b"x" * 100, b: b"y" * 10})
            await kv.set(d, "short", ex=100)
            assert await kv.bitop("OR", d, a, b) == 100
            assert await kv.bitop("AND", d, "missing") == 0
            assert await kv.bitop("XOR", d, b) == 10
            for shard in range(4):
                ref = kv.system.ref(shard_name(shard))
                assert await ref.ask(Inspect(lambda s: s.check_invariants()))
            await kv.flushall()
            assert (await kv.info("memory"))["memory"]["used_memory"] == 0


async def test_bitop_in_a_transaction_on_one_shard_and_refused_across_shards() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            await kv.mset({"{t}a": b"\xff\x0f", "{t}b": b"\xf0"})
            await kv.set("{t}d", "old", ex=100)
            results = await kv.transaction(
                ("BITOP", "AND", "{t}d", "{t}a", "{t}b"),
                ("GET", "{t}d"),
                ("TTL", "{t}d"),
                ("BITOP", "OR", "{t}d", "{t}missing"),
                ("EXISTS", "{t}d"),
                ("BITOP", "NOT", "{t}d", "{t}a", "{t}b"),
            )
            assert results[:5] == [2, b"\xf0\x00", -1, 0, 0]
            assert isinstance(results[5], CommandSyntaxError)
            a, b, d = keys_on_shards(kv, "a", "b", "d")
            with pytest.raises(KVMemoError, match="needs all its keys on one shard") as refused:
                await kv.transaction(("BITOP", "AND", d, a, b))
            assert refused.value.kind == "SYNTAX"


async def test_typed_methods_of_the_embedded_api() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4) as kv:
            assert await kv.bitfield("k", "SET", "u8", 0, 255, "INCRBY", "i5", "#2", 3) == [0, 3]
            assert await kv.get("k") == b"\xff\x06"
            assert await kv.bitfield_ro("k", "GET", "u8", 0, "GET", "i5", "#2") == [255, 3]
            assert await kv.bitfield("k", "OVERFLOW", "FAIL", "INCRBY", "u8", 0, 1) == [None]
            assert await kv.bitpos("k", 0) == 8
            assert await kv.bitpos("k", 1, 1) == 13
            assert await kv.bitpos("k", 0, 0, 0) == -1
            assert await kv.bitpos("k", 0, 5, 9, unit="BIT") == 8
            assert await kv.bitop("NOT", "n", "k") == 2
            assert await kv.get("n") == b"\x00\xf9"
            with pytest.raises(ValueError, match=r"^bitpos: end needs start$"):
                await kv.bitpos("k", 1, end=3)
            with pytest.raises(ValueError, match=r"^bitpos: unit needs start and end$"):
                await kv.bitpos("k", 1, 0, unit="BIT")


async def test_errors_change_nothing() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4, max_value_size=8) as kv:
            await kv.mset({"a": b"\x01", "d": b"keep"})
            calls: list[tuple[str, ...]] = [
                ("bitop", "NOT", "d", "a", "a"),
                ("bitop", "NAND", "d", "a"),
                ("bitfield", "d", "SET", "u8", "0", "1", "GET", "u8", "#x"),
                ("bitfield", "d", "SET", "u8", "0", "1", "SET", "u8", "#8", "1"),  # too large
                ("bitfield_ro", "d", "SET", "u8", "0", "1"),
                ("bitpos", "d", "2"),
            ]
            for call in calls:
                with pytest.raises(KVMemoError):
                    await kv.execute(*call)
            assert await kv.mget("a", "d") == [b"\x01", b"keep"]
            assert await kv.dbsize() == 2


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_bitop_results_survive_a_reopen(tmp_path: Path, appendfsync: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(
            shards=4, data_dir=str(tmp_path), appendfsync=appendfsync
        ) as kv:
            a, b, d, e = keys_on_shards(kv, "a", "b", "d", "e")
            await kv.mset({a: b"\xff\x0f", b: b"\xf0"})
            await kv.set(d, "old", ex=3600)
            await kv.set(e, "doomed")
            assert await kv.bitop("XOR", d, a, b) == 2
            assert await kv.bitop("AND", e, "missing", "missing2") == 0
            assert await kv.bitfield("bf", "SET", "u8", "#2", 65) == [0]
            await kv.set("{t}d", "x", ex=3600)
            await kv.set("{t}a", b"\x0f")
            assert await kv.transaction(("BITOP", "NOT", "{t}d", "{t}a")) == [1]
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
            assert await kv.get(d) == b"\x0f\x0f"
            assert await kv.ttl(d) == -1
            assert await kv.exists(e) == 0
            assert await kv.get("bf") == b"\x00\x00A"
            assert await kv.get("{t}d") == b"\xf0"
            assert await kv.ttl("{t}d") == -1


async def test_the_commands_are_json_rpc_methods_too() -> None:
    """Through the one table: the WebSocket server and its client know them unchanged."""
    from kvmemo.client import connect
    from kvmemo.config import StoreConfig
    from kvmemo.node import open_node
    from kvmemo.server.config import ServerConfig

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_node(
                StoreConfig(shards=4), ServerConfig(host="127.0.0.1", port=0, resp=False)
            ) as node,
            connect(node.url) as client,
        ):
            assert {"bitpos", "bitop", "bitfield", "bitfield_ro"} <= set(
                await client.execute("command.list")
            )
            assert await client.bitfield("k", "SET", "u8", 0, 65, "OVERFLOW", "FAIL",
                                         "INCRBY", "u8", 0, 255) == [0, None]  # fmt: skip
            assert await client.bitfield_ro("k", "GET", "u8", 0) == [65]
            assert await client.bitpos("k", 1) == 1
            assert await client.bitop("OR", "d", "k", "nokey") == 1
            assert await client.get("d") == b"A"
            with pytest.raises(CommandSyntaxError, match=r"^BITFIELD_RO only supports"):
                await client.bitfield_ro("k", "SET", "u8", 0, 1)


def _first_bit_model(value: bytes, start: int, end: int, bit: int) -> int:
    for position in range(start, end + 1):
        if (value[position >> 3] >> (7 - (position & 7))) & 1 == bit:
            return position
    return -1


@given(
    st.lists(st.sampled_from([0x00, 0xFF, 0x01, 0x80, 0x7F, 0xFE, 0x10]), min_size=1, max_size=40),
    st.integers(0, 319),
    st.integers(0, 319),
    st.integers(0, 1),
    st.integers(1, 5),
)
def test_first_bit_agrees_with_a_bit_by_bit_scan(
    raw: list[int], start: int, end: int, bit: int, chunk: int
) -> None:
    """Runs of 0x00 / 0xff (skipped in slices of ``chunk`` bytes) and partial edge bytes."""
    value = bytes(raw)
    end = min(end, len(value) * 8 - 1)
    start = min(start, end)
    assert bits.first_bit(value, start, end, bit, chunk) == _first_bit_model(value, start, end, bit)


def test_bitpos_stops_at_the_first_match_without_copying_the_value() -> None:
    """A 32 MiB value whose answer is near its start: the extra memory is one slice at most
    (a conversion of the whole range to one int took ~3x the value, and all of the time)."""
    import tracemalloc

    store = new_store()
    big = b"\x00" * 1000 + b"\x01" + b"\x00" * (32 * 1024 * 1024)
    store.put(b"k", big, 0.0, expires_at=None)
    ones = b"\xff" * (32 * 1024 * 1024)
    store.put(b"o", ones, 0.0, expires_at=None)
    tracemalloc.start()
    try:
        assert bits.BitPos(b"k", 1, None, None, False).apply(store, 0.0) == 1000 * 8 + 7
        assert bits.BitPos(b"k", 0, None, None, False).apply(store, 0.0) == 0
        assert bits.BitPos(b"o", 0, None, None, False).apply(store, 0.0) == len(ones) * 8
        assert bits.BitPos(b"o", 0, 0, -1, False).apply(store, 0.0) == -1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * bits.BITPOS_CHUNK
