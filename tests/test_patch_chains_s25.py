"""Each PATCH names its base, so recovery never applies one to another value.

Was (the PATCH design before it landed): recovery skipped a PATCH only after
a loss it could see (a cut tail, a repair), for keys not written whole
since. Two losses left nothing to see, and a PATCH then made a value its key
never held:

1. ``everysec``: a power loss can lose the tail of a segment other than the
   last *cleanly* (its size on disk never grew), while a later segment's
   PATCH of the same key reached the disk.
2. An edit journalled as a PATCH before a failed sync dropped records it
   was made after.

Now a PATCH carries its base's record CRC and length, and replay applies it
only when they are those of the value it holds (see ``records.Chains``).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from test_patch_records import journalled_store

import kvmemo
from kvmemo.commands.bits import SetBit
from kvmemo.commands.ops import Append
from kvmemo.persistence.records import (
    Chains,
    Corrupt,
    Op,
    Scanner,
    encode_base,
    encode_fields,
    encode_patch,
    encode_set,
    intent_sections,
    record_crc,
    replay,
)
from kvmemo.persistence.recovery import recover
from kvmemo.storage import durability

BIG = b"v" * 1000


def patch_after(record: bytes, key: bytes, offset: int, data: bytes, length: int) -> bytes:
    return encode_patch(key, offset, data, (record_crc(record), length))


def test_a_clean_loss_of_an_earlier_segments_tail_skips_the_later_patches_it_breaks(
    tmp_path: Path,
) -> None:
    k_base = encode_base(b"k", BIG, None)
    j_base = encode_base(b"j", BIG, None)
    k_lost = patch_after(k_base, b"k", 1000, b"xx", 1000)  # an APPEND, lost cleanly
    (tmp_path / "wal-00000001.log").write_bytes(k_base + j_base)  # no damage to see
    (tmp_path / "wal-00000002.log").write_bytes(
        patch_after(k_lost, b"k", 1002, b"yy", 1002)  # made after the lost one: skipped
        + patch_after(j_base, b"j", 0, b"J", 1000)  # j's base is intact: applied
    )
    recovered = recover(tmp_path, now_ms=0)
    # Never b"v" * 1000 + b"\0\0yy", a value k never held.
    assert recovered.data == {b"k": BIG, b"j": b"J" + BIG[1:]}
    assert any("skipped 1 PATCH record(s)" in w for w in recovered.warnings)
    # A snapshot of that state covers the skipped record: the next start agrees, silently.
    again = recover(tmp_path, now_ms=0)
    assert again.data == recovered.data
    assert again.warnings == []


def test_a_lost_base_skips_its_patches_whatever_the_key_held_before(tmp_path: Path) -> None:
    old = encode_set(b"k", BIG)
    lost_base = encode_base(b"k", b"n" * 1000, None)
    (tmp_path / "wal-00000001.log").write_bytes(old)
    (tmp_path / "wal-00000002.log").write_bytes(patch_after(lost_base, b"k", 0, b"N", 1000))
    recovered = recover(tmp_path, now_ms=0)
    assert recovered.data == {b"k": BIG}  # not b"N" + b"v" * 999


def test_a_patch_journalled_after_records_the_log_lost_is_skipped_not_misapplied() -> None:
    # Whatever drops records between an edit's base and the edit (a batch
    # the log never took, a sync that lost them), the edit is not applied
    # to the older value: the records it was made after are not its base.
    store = journalled_store()
    journal = store.journal
    assert journal is not None
    Append(b"k", BIG, 1 << 20).apply(store, 0.0)  # a base SET
    kept = list(journal.records)
    Append(b"k", b"xx", 1 << 20).apply(store, 0.0)
    journal.records[len(kept) :] = []  # dropped, the gap not reported (a bug, or a disk)
    Append(b"k", b"yy", 1 << 20).apply(store, 0.0)
    values: dict[bytes, bytes] = {}
    chains = Chains()
    assert replay(b"".join(journal.records), values, {}, chains=chains).problem is None
    assert chains.skipped == 1
    assert values == {b"k": BIG}
    assert store.data[b"k"] == BIG + b"xxyy"


def records_of(segment: Path) -> list[tuple[int, int, bytes]]:
    """(version, op, key) of each record of ``segment``."""
    data = segment.read_bytes()
    out = []
    pos = 0
    for op, key, _, _ in Scanner(data):
        out.append((data[pos + 4], op, key))
        pos += 10 + int.from_bytes(data[pos + 6 : pos + 10], "little")
    return out


async def test_a_snapshot_copy_makes_each_keys_next_edit_a_base_set(tmp_path: Path) -> None:
    async with kvmemo.open_store(shards=1, data_dir=tmp_path) as kv:
        await kv.execute("SETBIT", "bm", "8000", "1")
        await kv.execute("SETBIT", "bm", "1", "1")
        await kv.execute("SAVE")
        await kv.execute("SETBIT", "bm", "2", "1")
        await kv.execute("SETBIT", "bm", "3", "1")
        kv.engine.skip_final_snapshot()
    (segment,) = sorted((tmp_path / "shard-0").glob("wal-*.log"))
    # The snapshot's entries are no PATCH's base: the first edit after it is a
    # base SET (a SET of version 2), the next a PATCH naming it.
    assert records_of(segment) == [(2, Op.SET, b"bm"), (2, Op.PATCH, b"bm")]
    async with kvmemo.open_store(shards=1, data_dir=tmp_path) as kv:
        assert await kv.execute("BITCOUNT", "bm") == 4


def test_an_edit_of_a_base_whose_object_was_replaced_is_a_base_set() -> None:
    store = journalled_store()
    journal = store.journal
    assert journal is not None
    SetBit(b"k", 8000, 1, 1 << 20).apply(store, 0.0)
    journal.bases[b"k"] = (journal.bases[b"k"][0], b"another object")
    SetBit(b"k", 1, 1, 1 << 20).apply(store, 0.0)
    assert [r[4] for r in journal.records] == [2, 2]
    assert [next(iter(Scanner(r)))[0] for r in journal.records] == [1, 1]  # two SETs


def test_an_intent_holding_a_patch_is_skipped_with_a_warning_not_a_crash() -> None:
    # A round's part is whole records (its redo may run after any of the
    # shard's records): a PATCH in one is refused when the intent is read,
    # instead of failing the redo's replay with an AssertionError at start.
    base = encode_base(b"k", BIG, None)
    records = patch_after(base, b"k", 0, b"X", 1000)
    value = struct.pack("<II", 0, len(records)) + records  # one section: shard 0's
    with pytest.raises(ValueError, match="^a PATCH record in an intent section$"):
        intent_sections(value)


def test_the_journal_keeps_the_bases_of_at_most_bases_max_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each costs about 100 bytes outside maxmemory: a bounded number, the
    # oldest going first (its next edit is a base SET again, and correct).
    monkeypatch.setattr(durability, "BASES_MAX", 3)
    store = journalled_store()
    journal = store.journal
    assert journal is not None
    for key in (b"a", b"b", b"c", b"d"):
        Append(key, BIG, 1 << 20).apply(store, 0.0)
    assert list(journal.bases) == [b"b", b"c", b"d"]
    Append(b"a", b"x", 1 << 20).apply(store, 0.0)  # a base SET: a's base was dropped
    Append(b"c", b"x", 1 << 20).apply(store, 0.0)  # a PATCH
    assert [r[4] for r in journal.records[-2:]] == [2, 2]
    assert [next(iter(Scanner(r)))[0] for r in journal.records[-2:]] == [Op.SET, Op.PATCH]
    assert list(journal.bases) == [b"c", b"d", b"a"]
    values: dict[bytes, bytes] = {}
    chains = Chains()
    assert replay(b"".join(journal.records), values, {}, chains=chains).problem is None
    assert (values, chains.skipped) == (store.data, 0)


def test_a_version_2_record_of_another_op_is_damage() -> None:
    # Version 2 is a SET (a base SET) or a PATCH, and nothing else.
    record = bytearray(encode_fields(Op.DEL, b"k"))
    record[4] = 2  # and the CRC made to match: only a bug would write it
    record[:4] = zlib.crc32(record[4:]).to_bytes(4, "little")
    values = {b"k": b"v"}
    result = replay(bytes(record), values, {}, chains=Chains())
    assert result.problem == Corrupt(0, "unknown op 2")
    assert values == {b"k": b"v"}
