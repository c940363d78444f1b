"""In-place edits of long values are logged as PATCH records: the size of the edit.

Was: SETBIT, SETRANGE, APPEND and BITFIELD logged a SET of the whole new
value. 200 SETBITs on a 1.25 MB bitmap wrote 251 MB of log (and the snapshots
the log size set off), at about 4 ms each; Redis's AOF logs the command, a few
dozen bytes. A PATCH (format version 2) sets the bytes the edit changed.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmemo
from kvmemo.commands.bits import SetBit
from kvmemo.commands.ops import Append, SetRange
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence.records import (
    FORMAT_VERSION,
    Chains,
    Corrupt,
    Op,
    Record,
    decode_stream,
    encode_base,
    encode_fields,
    encode_group,
    encode_patch,
    encode_set,
    record_crc,
    replay,
)
from kvmemo.storage.durability import PATCH_MIN_VALUE, ShardDurability
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def log_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("wal-*.log"))


# -- the codec ---------------------------------------------------------------------------------


def chain(
    key: bytes, value: bytes, *edits: tuple[int, bytes], expires_ms: int | None = None
) -> list[bytes]:
    """A base SET of ``key`` := ``value``, then a PATCH per edit, each naming the one before."""
    records = [encode_base(key, value, expires_ms)]
    length = len(value)
    for offset, data in edits:
        records.append(encode_patch(key, offset, data, (record_crc(records[-1]), length)))
        length = max(length, offset + len(data))
    return records


def replayed_log(log: bytes, values: dict[bytes, bytes] | None = None) -> tuple[Any, Chains]:
    chains = Chains()
    result = replay(log, {} if values is None else values, {}, chains=chains)
    assert result.problem is None
    return result, chains


def test_patches_and_base_sets_are_version_2_and_every_other_record_stays_version_1() -> None:
    # A log without in-place edits stays readable by a build of version 1;
    # one with them is refused by it as newer, never repaired away.
    assert FORMAT_VERSION == 2
    base, patch = chain(b"k", b"abc", (1, b"x"))
    assert (base[4], patch[4]) == (2, 2)
    assert decode_stream(base).records == [Record(Op.SET, b"k", b"abc")]  # a SET in every way
    for record in (
        encode_set(b"k", b"v"),
        encode_fields(Op.SET, b"k", b"v", 5),
        encode_fields(Op.DEL, b"k"),
        encode_fields(Op.EXPIRE, b"k", b"", 5),
        encode_group(encode_set(b"a", b"1") + encode_set(b"b", b"2")),
    ):
        assert record[4] == 1


@pytest.mark.parametrize(
    ("before", "offset", "data", "after"),
    [
        (b"abcdef", 2, b"XY", b"abXYef"),  # inside
        (b"abc", 2, b"XYZ", b"abXYZ"),  # past the end: grows
        (b"abc", 5, b"X", b"abc\x00\x00X"),  # zero-filled up to the offset
        (b"abc", 3, b"", b"abc"),
    ],
)
def test_a_patch_replays_as_setrange_does(
    before: bytes, offset: int, data: bytes, after: bytes
) -> None:
    log = b"".join(chain(b"k", before, (offset, data), expires_ms=77))
    values: dict[bytes, bytes] = {}
    expires: dict[bytes, int] = {}
    chains = Chains()
    result = replay(log, values, expires, chains=chains)
    assert result.problem is None
    assert result.count == 2
    assert values == {b"k": after}
    assert type(values[b"k"]) is bytes  # not the bytearray replay edits
    assert expires == {b"k": 77}  # the PATCH keeps the expiry
    # Replayed again, the PATCH's base is not the value: skipped.
    assert replay(log[len(chain(b"k", before)[0]) :], values, expires, chains=chains).count == 1
    assert chains.skipped == 1
    assert values == {b"k": after}


def test_a_chain_of_patches_applies_in_order_and_keeps_the_expiry() -> None:
    records = chain(b"k", b"0123456789", (0, b"A"), (9, b"Z"), (10, b"!"))
    records.insert(2, encode_fields(Op.EXPIRE, b"k", b"", 9))  # changes no value
    values: dict[bytes, bytes] = {}
    expires: dict[bytes, int] = {}
    chains = Chains()
    assert replay(b"".join(records), values, expires, chains=chains).problem is None
    assert values == {b"k": b"A12345678Z!"}
    assert expires == {b"k": 9}
    assert chains.skipped == 0
    assert chains.bases == {b"k": record_crc(records[-1])}


def test_without_chains_a_patch_is_refused() -> None:
    # A snapshot's or an intent's records are whole: a PATCH there is damage.
    log = b"".join(chain(b"k", b"abc", (0, b"x")))
    values: dict[bytes, bytes] = {}
    result = replay(log, values, {})
    assert result.problem is not None
    assert result.problem.offset == len(chain(b"k", b"abc")[0])
    assert "a PATCH record where only whole records may be" in str(result.problem)
    assert values == {b"k": b"abc"}


def test_a_patch_inside_a_group_is_damage() -> None:
    base, patch = chain(b"k", b"abc", (0, b"x"))
    log = base + encode_group(patch + encode_set(b"j", b"1"))
    values: dict[bytes, bytes] = {}
    result = replay(log, values, {}, chains=Chains())
    assert isinstance(result.problem, Corrupt)
    assert result.problem.reason == "a PATCH record inside a GROUP record"
    assert values == {b"k": b"abc"}  # nothing of the group


BASE = b"b" * 300


@pytest.mark.parametrize(
    ("between", "applies"),
    [
        ([], True),
        ([encode_fields(Op.EXPIRE, b"k", b"", 9)], True),  # no change of the value
        ([encode_set(b"j", b"other")], True),  # another key
        ([encode_set(b"k", BASE)], False),  # a plain SET, even of the same value
        ([encode_fields(Op.DEL, b"k")], False),
        ([encode_fields(Op.FLUSH, b"")], False),
        ([encode_group(encode_set(b"k", BASE) + encode_set(b"j", b"1"))], False),
        ([encode_fields(Op.DEL, b"k"), encode_base(b"k", b"c" * 300, None)], False),  # a new base
        # The same base again: the same record, so the same CRC and the same value.
        ([encode_fields(Op.DEL, b"k"), encode_base(b"k", BASE, None)], True),
    ],
)
def test_a_patch_applies_only_to_the_value_its_base_gave(
    between: list[bytes], applies: bool
) -> None:
    base, patch = chain(b"k", BASE, (0, b"X"))
    values: dict[bytes, bytes] = {}
    result, chains = replayed_log(b"".join([base, *between, patch]), values)
    assert chains.skipped == (0 if applies else 1)
    assert result.count == len(between) + 2  # a skipped PATCH is read, not damage
    if applies:
        assert values[b"k"] == b"X" + BASE[1:]
    else:  # the value the records before it gave, never one with the edit
        assert values.get(b"k", b"")[:1] != b"X"


def test_a_patch_of_a_value_of_another_length_or_of_no_key_is_skipped() -> None:
    base = encode_base(b"k", BASE, None)
    wrong_length = encode_patch(b"k", 0, b"X", (record_crc(base), len(BASE) + 1))
    no_key = encode_patch(b"n", 0, b"X", (record_crc(base), len(BASE)))
    values: dict[bytes, bytes] = {}
    _, chains = replayed_log(base + wrong_length + no_key, values)
    assert chains.skipped == 2
    assert values == {b"k": BASE}


def test_after_a_skipped_patch_its_key_skips_every_later_one_until_a_new_base() -> None:
    records = chain(b"k", BASE, (0, b"1"), (1, b"2"), (2, b"3"))
    del records[1]  # lost
    fresh = chain(b"k", b"new" * 100, (0, b"N"))
    values: dict[bytes, bytes] = {}
    _, chains = replayed_log(b"".join(records + fresh), values)
    assert chains.skipped == 2
    assert values == {b"k": b"N" + (b"new" * 100)[1:]}


def test_every_damaged_byte_of_a_patch_is_caught() -> None:
    prefix = encode_set(b"k", b"v")
    patch = encode_patch(b"key", 1000, b"edit", (12345, 2000))
    for i in range(len(patch)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(patch)
            damaged[i] ^= mask
            values: dict[bytes, bytes] = {}
            result = replay(prefix + bytes(damaged), values, {}, chains=Chains())
            assert result.count == 1, (i, mask)  # the SET before, nothing of the PATCH
            assert values == {b"k": b"v"}, (i, mask)
            assert result.problem is not None
            assert result.problem.offset == len(prefix)


HEAD = 20  # a PATCH's value: offset u64, base CRC u32, base length u64


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            (Op.PATCH, b"k", bytes(HEAD - 1), None),
            "a PATCH record has a 20-byte head and no expiry",
        ),
        ((Op.PATCH, b"k", bytes(HEAD), 5), "a PATCH record has a 20-byte head and no expiry"),
        (
            (Op.PATCH, b"k", (1 << 40).to_bytes(8, "little") + bytes(12) + b"x", None),
            f"a PATCH record ending at byte {(1 << 40) + 1} of its value, past {1 << 31}",
        ),
        (
            (Op.PATCH, b"k", bytes(12) + (1 << 40).to_bytes(8, "little"), None),
            f"a PATCH record of a base of {1 << 40} bytes, past {1 << 31}",
        ),
    ],
)
def test_a_patch_of_an_impossible_shape_is_refused(fields: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        encode_fields(*fields)


def test_a_version_1_patch_is_damage() -> None:
    record = bytearray(encode_patch(b"k", 0, b"x", (1, 300)))
    record[4] = 1  # and the CRC made to match: only a bug would write it
    record[:4] = zlib.crc32(record[4:]).to_bytes(4, "little")
    result = decode_stream(bytes(record))
    assert result.problem == Corrupt(0, "unknown op 8")


# -- the store's journal -----------------------------------------------------------------------


def journalled_store() -> ShardStore:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    store.durability = ShardDurability(
        Path("/nonexistent"),
        kvmemo.persistence.AppendFsync.EVERYSEC,
        segment_bytes=1 << 20,
        snapshot_bytes=0,
    )
    store.journal = store.durability.journal
    return store


def replayed(store: ShardStore) -> dict[bytes, bytes]:
    assert store.journal is not None
    values: dict[bytes, bytes] = {}
    chains = Chains()
    assert replay(b"".join(store.journal.records), values, {}, chains=chains).problem is None
    assert chains.skipped == 0
    return values


def kinds_of(store: ShardStore) -> list[str]:
    """Each journalled record as "SET" (version 1), "BASE" (a base SET) or its op's name."""
    assert store.journal is not None
    out = []
    for record in store.journal.records:
        (got,) = decode_stream(record).records
        out.append("BASE" if got.op == Op.SET and record[4] == 2 else got.op.name)
    return out


def test_an_edit_of_a_long_live_value_is_journalled_as_a_patch_of_a_base_set() -> None:
    store = journalled_store()
    store.put(b"k", bytes(1000), 0.0, expires_at=None)
    SetBit(b"k", 8 * 999 + 7, 1, 1 << 20).apply(store, 0.0)  # the first edit: its base
    SetRange(b"k", 500, b"abc", 1 << 20).apply(store, 0.0)
    Append(b"k", b"tail", 1 << 20).apply(store, 0.0)
    assert kinds_of(store) == ["SET", "BASE", "PATCH", "PATCH"]
    assert replayed(store) == {b"k": store.data[b"k"]}
    assert sum(map(len, store.journal.records[2:])) < 200  # type: ignore[union-attr]


def test_any_other_write_of_the_key_makes_its_next_edit_a_base_set_again() -> None:
    store = journalled_store()
    store.put(b"k", bytes(1000), 0.0, expires_at=None)
    SetBit(b"k", 1, 1, 1 << 20).apply(store, 0.0)
    SetBit(b"k", 2, 1, 1 << 20).apply(store, 0.0)
    store.put_plain(b"k", bytes(999), 0.0)  # a plain write
    SetBit(b"k", 3, 1, 1 << 20).apply(store, 0.0)
    store.delete(b"k", 0.0)
    store.put(b"k", bytes(500), 0.0, expires_at=None)
    SetBit(b"k", 4, 1, 1 << 20).apply(store, 0.0)
    SetBit(b"k", 5, 1, 1 << 20).apply(store, 0.0)
    assert kinds_of(store) == [
        "SET", "BASE", "PATCH", "SET", "BASE", "DEL", "SET", "BASE", "PATCH"
    ]  # fmt: skip
    assert replayed(store) == {b"k": store.data[b"k"]}


def test_an_edit_of_a_value_its_base_no_longer_holds_is_a_base_set() -> None:
    # Whatever path replaced the value (one a future change forgets to
    # report), the journal checks that the live value is its base's object.
    store = journalled_store()
    store.put(b"k", bytes(1000), 0.0, expires_at=None)
    SetBit(b"k", 1, 1, 1 << 20).apply(store, 0.0)
    store.data[b"k"] = bytes(bytearray(store.data[b"k"]))  # equal bytes, another object
    SetBit(b"k", 2, 1, 1 << 20).apply(store, 0.0)
    assert kinds_of(store) == ["SET", "BASE", "BASE"]


def test_edits_in_one_record_are_whole_and_their_keys_lose_their_bases() -> None:
    store = journalled_store()
    store.put(b"k", bytes(1000), 0.0, expires_at=None)
    SetBit(b"k", 1, 1, 1 << 20).apply(store, 0.0)
    assert store.journal is not None
    with store.one_record():
        SetBit(b"k", 2, 1, 1 << 20).apply(store, 0.0)
        store.put(b"j", b"x", 0.0, expires_at=None)
    assert not store.journal.whole
    SetBit(b"k", 3, 1, 1 << 20).apply(store, 0.0)
    assert kinds_of(store) == ["SET", "BASE", "GROUP", "BASE"]
    assert replayed(store) == {b"k": store.data[b"k"], b"j": b"x"}


def test_short_values_stay_whole_sets() -> None:
    store = journalled_store()
    store.put(b"short", b"x" * (PATCH_MIN_VALUE - 2), 0.0, expires_at=None)
    SetBit(b"short", 0, 1, 1 << 20).apply(store, 0.0)
    SetBit(b"short", 1, 1, 1 << 20).apply(store, 0.0)
    store.put(b"long", bytes(1000), 0.0, expires_at=None)
    SetRange(b"long", 0, b"y", 1 << 20).apply(store, 0.0)
    SetRange(b"long", 0, b"y" * 300, 1 << 20).apply(store, 0.0)  # over a quarter of it
    assert kinds_of(store) == ["SET", "SET", "SET", "SET", "BASE", "BASE"]
    assert replayed(store) == {b"short": store.data[b"short"], b"long": store.data[b"long"]}


def test_an_edit_of_an_expired_value_is_a_whole_set_of_the_new_one() -> None:
    # The edit is relative to nothing then: a PATCH would replay onto the
    # expired value, which the log still holds.
    store = journalled_store()
    store.put(b"k", b"o" * 1000, 0.0, expires_at=5.0)
    SetRange(b"k", 10, b"new", 1 << 20).apply(store, 0.0)
    SetRange(b"k", 10, b"new", 1 << 20).apply(store, 6.0)
    assert store.data[b"k"] == bytes(10) + b"new"
    assert kinds_of(store) == ["SET", "BASE", "SET"]  # short: a plain SET
    assert replayed(store)[b"k"] == bytes(10) + b"new"


def test_an_edit_that_creates_its_key_is_a_base_set() -> None:
    store = journalled_store()
    SetBit(b"bm", 8 * 999, 1, 1 << 20).apply(store, 0.0)
    SetBit(b"bm", 1, 1, 1 << 20).apply(store, 0.0)
    Append(b"log", b"x" * 300, 1 << 20).apply(store, 0.0)
    Append(b"log", b"y", 1 << 20).apply(store, 0.0)
    assert kinds_of(store) == ["BASE", "PATCH", "BASE", "PATCH"]
    assert replayed(store) == store.data


# -- a store, closed and opened again ----------------------------------------------------------

KEYS = [b"{t}a", b"{t}b", b"{u}c"]  # {t} and {u}: two shards of two


def command() -> st.SearchStrategy[list[bytes]]:
    key = st.sampled_from(KEYS)
    small = st.integers(0, 2000)
    data = st.binary(min_size=0, max_size=12)
    return st.one_of(
        st.tuples(st.just(b"SET"), key, st.integers(0, 1500).map(lambda n: b"v" * n)),
        st.tuples(
            st.just(b"SETBIT"),
            key,
            small.map(lambda n: b"%d" % (n * 5)),
            st.sampled_from([b"0", b"1"]),
        ),
        st.tuples(st.just(b"SETRANGE"), key, small.map(lambda n: b"%d" % n), data),
        st.tuples(st.just(b"APPEND"), key, data),
        st.tuples(
            st.just(b"BITFIELD"),
            key,
            st.just(b"OVERFLOW"),
            st.sampled_from([b"WRAP", b"SAT", b"FAIL"]),
            st.just(b"INCRBY"),
            st.sampled_from([b"i8", b"u4", b"u16"]),
            small.map(lambda n: b"%d" % (n * 3)),
            st.integers(-300, 300).map(lambda n: b"%d" % n),
        ),
        st.tuples(st.just(b"DEL"), key),
        st.tuples(st.just(b"EXPIRE"), key, st.just(b"100000")),
        st.tuples(st.just(b"PERSIST"), key),
        st.tuples(st.just(b"RENAME"), st.just(b"{t}a"), st.just(b"{t}b")),
        st.tuples(st.just(b"SAVE")),
    ).map(list)


async def state(kv: kvmemo.Store, keys: list[bytes] = KEYS) -> dict[bytes, tuple[bytes, bool]]:
    """Each key's value, and whether it has a TTL."""
    out = {}
    for key in keys:
        value = await kv.execute("GET", key)
        if value is not None:
            out[key] = (value, await kv.execute("TTL", key) > 0)
    return out


async def run_and_reopen(directory: str, script: list[list[bytes]], transaction: bool) -> None:
    async with kvmemo.open_store(shards=2, data_dir=directory) as kv:
        # Long values to edit, so that most edits are PATCHes.
        await kv.mset({b"{t}a": b"a" * 1000, b"{u}c": b"c" * 600})
        if transaction:
            calls = [(c[0].decode(), *c[1:]) for c in script if c[0] != b"SAVE"]
            for result in await kv.transaction(*calls):
                if isinstance(result, kvmemo.KVMemoError):
                    assert str(result) == "no such key", result
        else:
            for name, *args in script:
                if name == b"RENAME" and await kv.execute("EXISTS", args[0]) == 0:
                    continue  # "no such key", nothing changed
                await kv.execute(name.decode(), *args)
        before = await state(kv)
        kv.engine.skip_final_snapshot()  # the log replays: the PATCHes are read back
    warned = Warned()
    logging.getLogger("kvmemo.persistence").addHandler(warned)
    try:
        async with kvmemo.open_store(shards=2, data_dir=directory) as kv:
            assert await state(kv) == before
    finally:
        logging.getLogger("kvmemo.persistence").removeHandler(warned)
    assert warned.messages == []  # nothing lost, so no PATCH skipped: each found its base


class Warned(logging.Handler):
    """Collects the warnings of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@settings(DETERMINISTIC, max_examples=60)
@given(st.lists(command(), min_size=1, max_size=30), st.booleans())
def test_what_a_store_held_is_what_it_holds_after_a_restart(
    script: list[list[bytes]], transaction: bool
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        trio.run(run_and_reopen, directory, script, transaction)


async def test_a_bitmap_log_grows_by_the_edits_not_by_the_value(tmp_path: Path) -> None:
    async with kvmemo.open_store(shards=1, data_dir=tmp_path) as kv:
        await kv.execute("SETBIT", "bm", "10000000", "1")  # 1.25 MB, one SET
        after_create = log_bytes(tmp_path)
        for i in range(200):
            await kv.execute("SETBIT", "bm", str(i * 49_979), "1")
        await kv.execute("APPEND", "bm", "tail")
        await kv.execute("SETRANGE", "bm", "5", "range")
        grown = log_bytes(tmp_path) - after_create
        value = await kv.get("bm")
        kv.engine.skip_final_snapshot()
    assert grown < 202 * 64, grown  # a few dozen bytes per edit (was 1.25 MB each)
    async with kvmemo.open_store(shards=1, data_dir=tmp_path) as kv:
        assert await kv.get("bm") == value
        assert await kv.execute("GETBIT", "bm", str(199 * 49_979)) == 1
