"""Review of the PATCH record (in-place edits logged as the bytes they changed).

A PATCH, unlike every other record, applies to the value the log already
holds for its key: it names its *base* (the CRC of the record that gave the
key the value it edits, a base SET or a PATCH, and that value's length), and
replay applies it only to that value (``Chains``). So it is only right where
the log holds that base; these tests hunt for the places it does not (a
multi-shard round's redo, a batch the log dropped, a failed sync, a tail lost
to a power loss), and for damage to a PATCH that the decoder could take for a
torn tail.
"""

from __future__ import annotations

import errno
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_persistence_intents import K0, K1  # a key of shard 0, one of shard 1

import kvmemo
from kvmemo.commands.bits import BitField, FieldAction, FieldOp, Overflow, SetBit
from kvmemo.commands.ops import Append, SetRange
from kvmemo.engine.engine import shard_name
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence import AppendFsync
from kvmemo.persistence.intents import read_intents
from kvmemo.persistence.records import (
    Chains,
    Corrupt,
    Op,
    Scanner,
    Torn,
    decode_stream,
    encode_base,
    encode_fields,
    encode_group,
    encode_patch,
    encode_set,
    record_crc,
    replay,
)
from kvmemo.persistence.recovery import recover
from kvmemo.persistence.wal import SegmentedLog
from kvmemo.storage.durability import ShardDurability
from kvmemo.storage.shard import Barrier, Hold
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
BIG = b"a" * 1000  # long enough that an edit of it is a PATCH
PATCH_HEAD = 20  # a PATCH's value opens with: offset u64, base CRC u32, base length u64


def raw_records(data: bytes) -> list[bytes]:
    """The encoded records of ``data``, whole, in order (``data`` holds no damage)."""
    scanner = Scanner(data)
    records, start = [], 0
    for _ in scanner:
        records.append(data[start : scanner.end])
        start = scanner.end
    assert scanner.problem is None, scanner.problem
    return records


def kind(record: bytes) -> str:
    """What one encoded record is: ``PATCH``, ``base SET`` (a SET of version 2), ``SET``, ..."""
    if record[5] == Op.SET:
        return "base SET" if record[4] == 2 else "SET"
    return Op(record[5]).name


def based(key: bytes, offset: int, data: bytes, base: bytes, length: int = len(BIG)) -> bytes:
    """A PATCH of ``key`` naming the record ``base`` (which gave the key ``length`` bytes)."""
    return encode_patch(key, offset, data, (record_crc(base), length))


# -- a multi-shard transaction's intent ---------------------------------------------------------


class Stall:
    """A part that holds its shard until the test decides: later messages queue behind it."""

    def prepare(self, store: ShardStore, now: float) -> object:
        return True

    def commit(self, store: ShardStore, now: float) -> None:
        return None

    def abort(self, store: ShardStore) -> None:
        return None


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
async def test_a_redone_transaction_part_does_not_depend_on_its_batchs_earlier_writes(
    tmp_path: Path, appendfsync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the intent of a transaction over two shards held the PATCH its APPEND
    journalled. A kill -9 after the intent was written and before shard 0 appended
    its batch (which also held an earlier APPEND of the same key, the PATCH's base)
    redid the PATCH on the value the log held, without that APPEND: ``a*1000 +
    "ww\\0\\0yy"``, a value the key never had (now a PATCH whose base the log lacks
    would be skipped instead: the acknowledged APPEND lost). The round's part is
    journalled whole (a SET, in the intent and the shard's log)."""
    data_dir, crash = tmp_path / "data", tmp_path / "crash"
    batches: list[bytes] = []
    append = SegmentedLog._append_locked

    def killed_before_shard_0_appends(log: SegmentedLog, data: bytes) -> Any:
        if log.directory.name == "shard-0" and b"yy" in data and not batches:
            batches.append(data)
            shutil.copytree(data_dir, crash)  # the files, as a kill -9 now leaves them
        return append(log, data)

    monkeypatch.setattr(SegmentedLog, "_append_locked", killed_before_shard_0_appends)
    with trio.fail_after(30):
        async with kvmemo.open_store(
            shards=2, data_dir=str(data_dir), appendfsync=appendfsync
        ) as kv:
            await kv.set(K0, BIG)
            await kv.execute("APPEND", K0, b"ww")  # a base SET: the next edit may be a PATCH
            blocker = Barrier(1)
            async with trio.open_nursery() as nursery:
                ref = kv.system.ref(shard_name(0))
                nursery.start_soon(ref.ask, Hold(blocker, 0, Stall()))
                await trio.testing.wait_all_tasks_blocked()
                # Both queue behind the stall: one batch of shard 0 holds them.
                nursery.start_soon(kv.execute, "APPEND", K0, b"xx")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(kv.transaction, ("APPEND", K0, b"yy"), ("SET", K1, b"v"))
                await trio.testing.wait_all_tasks_blocked()
                blocker.decide(False)
            assert await kv.get(K0) == BIG + b"wwxxyy"
    assert batches, "shard 0 appended the transaction's part"
    first = raw_records(batches[0])[0]
    assert kind(first) == "PATCH"  # the APPEND xx, in the same batch
    assert decode_stream(first).records[0].value[PATCH_HEAD:] == b"xx"
    (sections,) = read_intents(crash).intents.values()  # the round had an intent
    assert [kind(r) for r in raw_records(sections[0])] == ["SET"]  # whole, no PATCH
    async with kvmemo.open_store(shards=2, data_dir=str(crash)) as kv:
        # The round is redone on shard 0 (its log lacks it) and stands on shard 1.
        assert await kv.get(K1) == b"v"
        assert await kv.get(K0) == BIG + b"wwxxyy"  # was BIG + b"ww\0\0yy"


# -- a batch the log dropped, a sync that failed -------------------------------------------------


async def test_an_edit_after_a_dropped_batch_is_not_logged_as_a_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: an APPEND whose batch could not be appended (a full disk: ``IO``, applied
    null, the memory keeps it) was dropped from the log; the next APPEND, appended,
    was a PATCH at the offset after it: the restart read ``a*1000 + "ww\\0\\0yy"``
    where the store had served ``a*1000 + "wwxxyy"``. A PATCH naming the dropped
    record as its base would now be skipped, and the acknowledged APPEND with it:
    the edits are whole SETs until a snapshot covers the gap, then a base SET,
    then PATCHes again."""
    append = SegmentedLog._append_locked
    failed: list[bytes] = []

    def full_once(log: SegmentedLog, data: bytes) -> Any:
        if log.directory.name == "shard-0" and b"xx" in data and not failed:
            failed.append(data)
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(log, data)

    monkeypatch.setattr(SegmentedLog, "_append_locked", full_once)
    shard_0 = tmp_path / "shard-0"
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set(K0, BIG)
            await kv.execute("APPEND", K0, b"ww")
            assert last_logged(shard_0) == "base SET"
            with pytest.raises(kvmemo.KVMemoError, match="could not make the write durable"):
                await kv.execute("APPEND", K0, b"xx")  # a PATCH, dropped
            assert failed
            assert kind(raw_records(failed[0])[-1]) == "PATCH"
            assert await kv.execute("APPEND", K0, b"yy") == 1006
            assert await kv.get(K0) == BIG + b"wwxxyy"
            assert last_logged(shard_0) == "SET"  # whole: no later PATCH names it
            assert await kv.execute("APPEND", K0, b"vv") == 1008
            assert last_logged(shard_0) == "SET"  # the gap is not covered yet
            await kv.execute("SAVE")  # covers the gap: edits are PATCHes again
            assert await kv.execute("APPEND", K0, b"zz") == 1010
            assert last_logged(shard_0) == "base SET"  # a snapshot's entry is no base
            assert await kv.execute("APPEND", K0, b"qq") == 1012
            assert last_logged(shard_0) == "PATCH"
            served = await kv.get(K0)
            kv.engine.skip_final_snapshot()  # the log alone, as after a kill -9
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.get(K0) == served  # was BIG + b"ww\0\0yy..."


def last_logged(directory: Path) -> str:
    """The kind of the last record of the shard log in ``directory``."""
    segments = sorted(directory.glob("wal-*.log"))
    return kind(raw_records(b"".join(p.read_bytes() for p in segments))[-1])


def durability(tmp_path: Path) -> tuple[ShardStore, ShardDurability]:
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    dur = ShardDurability(tmp_path, AppendFsync.EVERYSEC, segment_bytes=1 << 20, snapshot_bytes=0)
    store.durability, store.journal = dur, dur.journal
    return store, dur


def last_kind(store: ShardStore) -> str:
    assert store.journal is not None
    return kind(raw_records(store.journal.records[-1])[-1])


def journal_replays_to_the_store(store: ShardStore, values: dict[bytes, bytes]) -> None:
    """The records still in ``store``'s journal, replayed onto ``values`` (what the
    log holds before them), give what the store holds, and skip no PATCH."""
    assert store.journal is not None
    chains = Chains()
    result = replay(b"".join(store.journal.records), values, {}, chains=chains)
    assert result.problem is None
    assert chains.skipped == 0
    assert values == store.data


def test_a_failed_sync_makes_edits_whole_until_a_snapshot_taken_after_it_is_written(
    tmp_path: Path,
) -> None:
    """After a failed fsync the log's unsynced bytes may be gone (the pages dropped):
    a PATCH naming a base among them would be skipped, and the edit lost with it."""
    store, dur = durability(tmp_path)
    store.put(b"k", BIG, 0.0, expires_at=None)
    SetBit(b"k", 3, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "base SET"  # the key's first edit
    SetBit(b"k", 4, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "PATCH"
    dur.sync_failed(OSError(errno.EIO, "I/O error"))
    SetBit(b"k", 5, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "SET"
    SetBit(b"k", 6, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "SET"
    copied_at = dur.journal.gaps  # a snapshot's copy, taken now
    dur.journal.bases.clear()  # (as the shard does when it copies)
    dur.journal.saved(copied_at)  # ... written
    SetBit(b"k", 7, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "base SET"
    SetBit(b"k", 8, 1, 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "PATCH"
    journal_replays_to_the_store(store, {})


def test_a_dropped_batch_of_no_round_makes_edits_whole(tmp_path: Path) -> None:
    """The dropped batch held the key's base SET: the next edit must not name it."""
    store, dur = durability(tmp_path)
    store.put(b"k", BIG, 0.0, expires_at=None)
    Append(b"k", b"w", 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "base SET"
    dur.journal.take()
    dur.requeue()  # its append failed: the batch, of no round, is dropped
    Append(b"k", b"x", 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "SET"
    journal_replays_to_the_store(store, {})


def test_a_failed_batch_over_the_carry_limit_drops_its_effects_and_makes_edits_whole(
    tmp_path: Path,
) -> None:
    store, dur = durability(tmp_path)
    store.put(b"k", BIG, 0.0, expires_at=None)
    SetRange(b"k", 0, b"w", 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "base SET"
    dur.journal.mark(7, True)
    dur.journal.take()
    dur.journal.requeue_taken(limit=10)  # only the mark is kept
    SetRange(b"k", 1, b"y", 1 << 20).apply(store, 0.0)
    assert last_kind(store) == "SET"
    journal_replays_to_the_store(store, {})


# -- damage to a PATCH ---------------------------------------------------------------------------


def test_a_patch_whose_damaged_lengths_run_its_key_past_the_end_is_not_a_torn_tail() -> None:
    """Was: damage over a PATCH's payload and key lengths (a burst) that made its
    key run past the end read as a torn tail: recovery cut it off silently, with
    every acknowledged record after it. A SET so damaged is found corrupt by the
    search for a whole record after it; a PATCH is searched for too."""
    before = encode_set(b"a", b"1")
    after = encode_set(b"b", b"2" * 50)
    base = encode_base(b"key", BIG, None)
    for record in (encode_set(b"key", b"x" * 20), based(b"key", 1000, b"edit", base)):
        damaged = bytearray(record)
        # Lengths that agree, for a PATCH too (room for its head): only the search tells.
        struct.pack_into("<II", damaged, 6, 10**6, 10**6 - 17 - PATCH_HEAD)
        values: dict[bytes, bytes] = {}
        result = replay(before + bytes(damaged) + after, values, {}, chains=Chains())
        assert values == {b"a": b"1"}
        assert isinstance(result.problem, Corrupt), (record[5], result.problem)
        assert result.problem.reason.endswith("but a whole record follows")


def test_a_torn_patch_is_still_a_torn_tail() -> None:
    prefix = encode_set(b"a", b"1") + encode_base(b"key", BIG, None)
    patch = based(b"key", 5, b"edit" * 10, encode_base(b"key", BIG, None))
    for cut in range(len(prefix) + len(patch) - 1, len(prefix), -1):
        values: dict[bytes, bytes] = {}
        result = replay((prefix + patch)[:cut], values, {}, chains=Chains())
        assert result.problem == Torn(len(prefix)), cut
        assert values == {b"a": b"1", b"key": BIG}, cut


KEYS = [b"k", b"bits", b"{x}y"]


@st.composite
def chained_log(draw: st.DrawFn) -> tuple[list[bytes], Any]:
    """Records as a writer chains them: each PATCH names its key's last base SET or
    PATCH and that value's length, but the *stale* ones, drawn on purpose, which
    name another (a lost record's). Also the model of their replay: the values,
    and the number of stale PATCHes (``Chains.skipped``)."""
    records: list[bytes] = []
    values: dict[bytes, bytes] = {}
    bases: dict[bytes, int] = {}  # as Chains.bases
    stale = 0
    whole = [st.just("set"), st.just("del"), st.just("expire")]
    for _ in range(draw(st.integers(1, 8))):
        key = draw(st.sampled_from(KEYS))
        step = draw(st.sampled_from(["base", "set", "del", "expire", "flush", "patch", "stale"]))
        if draw(st.integers(0, 5)) == 0:  # a GROUP of whole records (never a PATCH)
            inner = []
            for name in draw(st.lists(st.one_of(whole), min_size=2, max_size=4)):
                key = draw(st.sampled_from(KEYS))
                if name == "set":
                    value = draw(st.binary(max_size=40))
                    inner.append(encode_set(key, value))
                    values[key] = value
                elif name == "del":
                    inner.append(encode_fields(Op.DEL, key))
                    values.pop(key, None)
                else:
                    inner.append(encode_fields(Op.EXPIRE, key, b"", draw(st.integers(0, 10**6))))
                    continue  # an EXPIRE changes no value: the base stands
                bases.pop(key, None)
            records.append(encode_group(b"".join(inner)))
            continue
        if step in ("base", "set"):
            value = draw(st.binary(max_size=40))
            expiry = draw(st.none() | st.integers(0, 10**6))
            if step == "base":
                record = encode_base(key, value, expiry)
                bases[key] = record_crc(record)
            else:
                record = encode_fields(Op.SET, key, value, expiry)
                bases.pop(key, None)
            values[key] = value
        elif step == "del":
            record = encode_fields(Op.DEL, key)
            values.pop(key, None)
            bases.pop(key, None)
        elif step == "expire":
            record = encode_fields(Op.EXPIRE, key, b"", draw(st.none() | st.integers(0, 10**6)))
        elif step == "flush":
            record = encode_fields(Op.FLUSH, b"")
            values.clear()
            bases.clear()
        else:
            offset = draw(st.integers(0, 600))
            data = draw(st.binary(max_size=20))
            old = values.get(key, b"")
            if step == "patch" and key in bases:
                record = encode_patch(key, offset, data, (bases[key], len(old)))
                bases[key] = record_crc(record)
                edited = bytearray(old.ljust(offset, b"\0"))
                edited[offset : offset + len(data)] = data
                values[key] = bytes(edited)
            else:  # its base is not the key's: a wrong CRC, or no base at all
                crc = bases[key] ^ 1 if key in bases else draw(st.integers(0, 2**32 - 1))
                record = encode_patch(key, offset, data, (crc, len(old)))
                bases.pop(key, None)
                stale += 1
        records.append(record)
    return records, (values, stale)


def replayed(log: bytes) -> tuple[dict[bytes, bytes], dict[bytes, int], Any, Chains]:
    values: dict[bytes, bytes] = {}
    expires: dict[bytes, int] = {}
    chains = Chains()
    result = replay(log, values, expires, chains=chains)
    assert all(type(v) is bytes for v in values.values())  # never a bytearray left
    return values, expires, result, chains


@DETERMINISTIC
@given(chained_log())
def test_a_chained_log_applies_every_patch_but_those_whose_base_is_not_the_value(
    log: tuple[list[bytes], Any],
) -> None:
    """Each PATCH naming the record that last gave its key its value applies (after
    any EXPIRE: it changes no value), each other one is skipped, and its key's
    later PATCHes until a base SET."""
    records, (want, stale) = log
    values, _, result, chains = replayed(b"".join(records))
    assert result.problem is None
    assert result.count == len(records)  # a skipped PATCH is counted, as applied ones
    assert (values, chains.skipped) == (want, stale)


@DETERMINISTIC
@given(chained_log(), st.data())
def test_a_flipped_byte_in_a_log_of_patches_keeps_exactly_the_records_before_it(
    log: tuple[list[bytes], Any], data: st.DataObject
) -> None:
    records, _ = log
    index = data.draw(st.integers(0, len(records) - 1))
    record = bytearray(records[index])
    at = data.draw(st.integers(0, len(record) - 1))
    record[at] ^= data.draw(st.integers(1, 255))
    prefix = b"".join(records[:index])
    damaged = prefix + bytes(record) + b"".join(records[index + 1 :])
    values, expires, result, chains = replayed(damaged)
    want_values, want_expires, _, want_chains = replayed(prefix)
    assert (values, expires) == (want_values, want_expires)
    assert (chains.bases, chains.skipped) == (want_chains.bases, want_chains.skipped)
    assert isinstance(result.problem, Corrupt)  # never a torn tail: records follow, or not
    assert result.problem.offset == len(prefix)
    assert result.count == len(decode_stream(prefix).records)


@DETERMINISTIC
@given(chained_log(), st.data())
def test_a_log_of_patches_cut_anywhere_replays_the_whole_records_before_the_cut(
    log: tuple[list[bytes], Any], data: st.DataObject
) -> None:
    records, _ = log
    whole_log = b"".join(records)
    cut = data.draw(st.integers(0, len(whole_log)))
    ends = [sum(map(len, records[: i + 1])) for i in range(len(records))]
    whole = max([e for e in ends if e <= cut], default=0)
    values, expires, result, chains = replayed(whole_log[:cut])
    want_values, want_expires, _, want_chains = replayed(whole_log[:whole])
    assert (values, expires, chains) == (want_values, want_expires, want_chains)
    assert result.problem == (None if whole == cut else Torn(whole))


def test_an_expire_inside_a_group_keeps_its_keys_base() -> None:
    """Was: replay dropped a key from Chains.bases for an EXPIRE inside a GROUP
    (records._apply's general GROUP path), while the writer (Journal.bases)
    kept it: the next PATCH of the key was skipped, and the acknowledged edit
    lost. An EXPIRE changes no value, in a GROUP (a transaction's part: EXPIRE k, SET a)
    as outside it: the writer's next edit of k is a PATCH naming k's base, and
    replay must apply it."""
    base = encode_base(b"k", BIG, None)
    log = (
        base
        + encode_group(encode_fields(Op.EXPIRE, b"k", b"", 10**6) + encode_set(b"a", b"1"))
        + based(b"k", 1000, b"x", base)
    )
    values: dict[bytes, bytes] = {}
    chains = Chains()
    assert replay(log, values, {}, chains=chains).problem is None
    assert (values, chains.skipped) == ({b"k": BIG + b"x", b"a": b"1"}, 0)


async def test_an_edit_after_a_transaction_that_set_its_keys_expiry_survives_a_restart(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set(b"{t}k", BIG)
            await kv.execute("APPEND", b"{t}k", b"w")  # a base SET
            await kv.transaction(("EXPIRE", b"{t}k", 1000), ("SET", b"{t}a", b"1"))
            await kv.execute("APPEND", b"{t}k", b"x")  # a PATCH naming the base SET
            served = await kv.get(b"{t}k")
            kv.engine.skip_final_snapshot()  # the log alone, as after a kill -9
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.get(b"{t}k") == served  # was BIG + b"w": the APPEND x lost


# -- a tail lost to a power loss ----------------------------------------------------------------


def test_after_a_tail_lost_to_a_power_loss_a_later_patch_of_a_lost_base_is_skipped(
    tmp_path: Path,
) -> None:
    """Was: segment 1's last append (an APPEND ``xx`` of k) lost to a power loss
    (``everysec``: its size reached the disk, its data did not), segment 2's PATCH
    (an APPEND ``yy``, written back first) replayed onto the value without it:
    ``a*1000 + "\0\0yy"``, a value k never held. Now a PATCH applies only to its
    base: k's, the lost PATCH, is not the value replayed, so it is skipped (k
    keeps a value it held), and so is k's next one. A key written whole since
    takes its PATCHes; so does one whose base the lost tail did not touch (the
    guard this replaced skipped those too: it knew only that *a* tail was lost);
    a key deleted since (its base gone) does not, nor does one whose value
    changed length since its base."""
    base_k, base_j, base_u, base_w = (
        encode_base(key, BIG, None) for key in (b"k", b"j", b"u", b"w")
    )
    lost = based(b"k", 1000, b"xx", base_k)
    (tmp_path / "wal-00000001.log").write_bytes(
        base_k + base_j + base_u + base_w + bytes(len(lost))
    )
    base_n = encode_base(b"n", BIG, None)
    yy = based(b"k", 1002, b"yy", lost, 1002)
    (tmp_path / "wal-00000002.log").write_bytes(
        yy  # its base was lost: skipped
        + base_n
        + based(b"n", 0, b"N", base_n)  # n written whole since the loss: applied
        + based(b"u", 0, b"U", base_u)  # u's base was not in the lost tail: applied
        + encode_group(encode_fields(Op.DEL, b"j") + encode_set(b"m", b"1"))
        + based(b"j", 3, b"J", base_j)  # j deleted since: skipped (was b"\0\0\0J")
        + based(b"w", 0, b"W", base_w, 999)  # not w's length: skipped
        + based(b"k", 0, b"K", yy, 1004)  # k's chain broken: skipped too
    )
    recovered = recover(tmp_path, now_ms=0)
    assert recovered.data == {
        b"k": BIG,
        b"n": b"N" + BIG[1:],
        b"u": b"U" + BIG[1:],
        b"w": BIG,
        b"m": b"1",
    }
    assert recovered.warnings[-2:] == [
        f"{tmp_path / 'wal-00000002.log'}: skipped 4 PATCH record(s) (in-place edits) whose "
        "base, the value they edited, is not the one replayed: records before them were lost",
        "wrote snap-00000002.kvs of the recovered state and removed the segments it covers,"
        " so the next start replays no skipped PATCH",
    ]
    # Was: the skipped PATCHes stayed in segment 2 and, the loss truncated
    # away, the next start applied them to the value this one served.
    again = recover(tmp_path, now_ms=0)
    assert again.data == recovered.data
    assert not again.warnings


def test_chains_apply_a_patch_only_to_the_value_its_base_gave() -> None:
    """What replaced the guard (``PatchGuard``: keys written whole since a loss):
    each key's chain of bases. A value loaded from elsewhere (a snapshot's entry)
    is no base; a SET of version 1, or grouped, ends the chain, as a DEL and a
    FLUSH do; an EXPIRE does not; a PATCH of the wrong length ends it too."""
    values: dict[bytes, bytes] = {b"k": BIG, b"s": BIG}
    chains = Chains()
    base_k = encode_base(b"k", BIG, None)
    p1 = based(b"k", 0, b"X", base_k)
    p2 = based(b"k", 1000, b"Y", p1)
    base_e = encode_base(b"e", BIG, None)
    base_f = encode_base(b"f", BIG, None)
    log = (
        based(b"s", 0, b"S", encode_base(b"s", BIG, None))  # s from "a snapshot": skipped
        + base_k
        + p1  # applied
        + p2  # applied: k is 1001 bytes
        + based(b"k", 0, b"Z", p2)  # says 1000 bytes: skipped
        + based(b"k", 0, b"W", p2, 1001)  # right, but k's chain is broken: skipped
        + base_e
        + encode_fields(Op.EXPIRE, b"e", b"", 10**6)
        + based(b"e", 0, b"E", base_e)  # an EXPIRE changes no value: applied
        + encode_set(b"e", BIG)
        + based(b"e", 0, b"V", base_e)  # after a SET of version 1: skipped
        + base_f
        + encode_group(encode_set(b"f", BIG) + encode_set(b"q", b"1"))
        + based(b"f", 0, b"G", base_f)  # after a grouped SET: skipped
    )
    result = replay(log, values, {}, chains=chains)
    assert result.problem is None
    assert result.count == 14
    assert values == {
        b"s": BIG,
        b"k": b"X" + BIG[1:] + b"Y",
        b"e": BIG,
        b"f": BIG,
        b"q": b"1",
    }
    assert chains.skipped == 5
    assert chains.bases == {}  # every chain ended, the last one at its skipped PATCH


def test_a_patch_after_a_flush_of_its_base_is_skipped() -> None:
    """Replaces "a FLUSH after a skipped group makes every key known again" (a
    guard's rule): a FLUSH ends every chain. A PATCH after it whose base came
    before it is skipped (it no longer makes ``"\\0"*n + edit`` of an absent key);
    a base SET after it starts a new chain."""
    base_k = encode_base(b"k", BIG, None)
    base_a = encode_base(b"a", BIG, None)
    log = (
        base_k
        + encode_fields(Op.FLUSH, b"")
        + based(b"k", 0, b"K", base_k)  # skipped
        + base_a
        + based(b"a", 0, b"A", base_a)  # applied
    )
    values: dict[bytes, bytes] = {}
    chains = Chains()
    assert replay(log, values, {}, chains=chains).problem is None
    assert values == {b"a": b"A" + BIG[1:]}
    assert chains.skipped == 1
    assert list(chains.bases) == [b"a"]
    # A FLUSH inside a GROUP too (its other records take the general path).
    grouped = encode_group(encode_fields(Op.FLUSH, b"") + encode_set(b"b", b"1"))
    assert replay(base_k + grouped, values, {}, chains=chains).problem is None
    assert chains.bases == {}


def test_a_patch_where_only_whole_records_may_be_is_refused() -> None:
    """Without chains (a snapshot's records, an intent's) a PATCH is refused: its
    base cannot be checked. In a GROUP it is damage, never a group applied in
    part (it replaces "a group holding a PATCH to skip is skipped whole")."""
    base = encode_base(b"k", BIG, None)
    patch = based(b"k", 0, b"K", base)
    values: dict[bytes, bytes] = {}
    result = replay(base + patch, values, {})
    assert isinstance(result.problem, Corrupt)
    assert (result.problem.offset, result.problem.reason) == (
        len(base),
        "a PATCH record where only whole records may be",
    )
    assert values == {b"k": BIG}
    group = encode_group(encode_set(b"a", b"1") + patch)
    for chains in (Chains(), None):
        values = {}
        result = replay(base + group, values, {}, chains=chains)
        assert isinstance(result.problem, Corrupt)
        assert (result.problem.offset, result.problem.reason) == (
            len(base),
            "a PATCH record inside a GROUP record",
        )
        assert values == {b"k": BIG}  # not a = 1: the group is not applied in part


def test_a_torn_tail_of_the_last_segment_skips_nothing(tmp_path: Path) -> None:
    """A kill -9 tears only the last segment: no later PATCH is ever skipped."""
    base = encode_base(b"k", BIG, None)
    (tmp_path / "wal-00000001.log").write_bytes(base)
    first = based(b"k", 0, b"K", base)
    (tmp_path / "wal-00000002.log").write_bytes(first + based(b"k", 1, b"L", first)[:-3])
    recovered = recover(tmp_path, now_ms=0)
    assert recovered.data == {b"k": b"K" + BIG[1:]}
    assert not any("skipped" in w for w in recovered.warnings)
    assert recovered.snapshot is None  # no rebase


# -- what each edit logs is what it did ----------------------------------------------------------


def edit_strategy() -> st.SearchStrategy[Any]:
    key = st.sampled_from([b"k", b"j"])
    big = st.integers(0, 8 * 1400)
    field = st.builds(
        FieldOp,
        st.sampled_from(list(FieldAction)),
        st.booleans(),
        st.integers(1, 16),
        big,
        st.integers(-70000, 70000),
        st.sampled_from(list(Overflow)),
    )
    return st.one_of(
        st.builds(lambda k, o, b: SetBit(k, o, b, 1 << 20), key, big, st.integers(0, 1)),
        st.builds(
            lambda k, o, v: SetRange(k, o, v, 1 << 20),
            key,
            st.integers(0, 1400),
            st.binary(max_size=30),
        ),
        st.builds(lambda k, v: Append(k, v, 1 << 20), key, st.binary(max_size=30)),
        st.builds(
            lambda k, fs: BitField(k, fs, 1 << 20),
            key,
            st.lists(field, min_size=1, max_size=4).filter(
                lambda fs: any(f.action is not FieldAction.GET for f in fs)
            ),
        ),
        st.tuples(st.just("set"), key, st.integers(0, 1200), st.booleans()),
        st.tuples(st.just("tick"), st.integers(1, 30)),
    )


@DETERMINISTIC
@given(st.lists(edit_strategy(), min_size=1, max_size=25))
def test_the_journal_of_any_edits_replays_to_what_the_store_holds(steps: list[Any]) -> None:
    """Growth, offsets past the end, BITFIELD FAIL/WRAP/SAT with fields around the
    write, empty SETRANGE/APPEND, keys with a TTL and keys that expired (the edit
    then applies to nothing): the log's replay is the store, byte for byte, and
    every PATCH in it names its base (none is skipped)."""
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    store.durability = ShardDurability(
        Path("/nonexistent"), AppendFsync.EVERYSEC, segment_bytes=1 << 20, snapshot_bytes=0
    )
    store.journal = store.durability.journal
    now = 1000.0
    for step in steps:
        if isinstance(step, tuple) and step[0] == "tick":
            now += step[1]
        elif isinstance(step, tuple):
            _, key, size, volatile = step
            store.put(key, b"v" * size, now, expires_at=now + 20 if volatile else None)
        else:
            step.apply(store, now)
    values: dict[bytes, bytes] = {}
    expires: dict[bytes, int] = {}
    chains = Chains()
    assert replay(b"".join(store.journal.records), values, expires, chains=chains).problem is None
    assert chains.skipped == 0
    live = {k: v for k, v in values.items() if k not in expires or expires[k] > now * 1000}
    assert live == {k: store.data[k] for k in store.live_keys(now)}
    assert all(type(v) is bytes for v in values.values())
