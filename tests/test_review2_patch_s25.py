"""Second review of the PATCH record: what recovery does once it has skipped one.

A PATCH applies only to its *base* (the value the record it names gave its
key, see ``Chains``); recovery skips one whose base is not the value replayed
(records before it were lost: a power loss's tail, a repair's), and writes a
snapshot of what it recovered (the *rebase*) so that the next start does not
apply the PATCHes skipped. These tests cut a start off (a kill -9, a full
disk) in the middle of the file changes that follow, and repair the log with
PATCHes after the damage.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
from test_persistence_intents import K0, K1, write_intents  # a key of shard 0, one of shard 1
from test_review_patch_s25 import kind, raw_records

import kvmemo
import kvmemo.persistence.recovery as recovery
import kvmemo.storage.durable_shard as durable_shard
from kvmemo.persistence.records import (
    Op,
    Record,
    decode_stream,
    encode_base,
    encode_fields,
    encode_group,
    encode_patch,
    encode_set,
    encode_txn,
    record_crc,
)
from kvmemo.persistence.recovery import CorruptLog, recover
from kvmemo.persistence.snapshot import write_snapshot
from kvmemo.storage.slots import SlotMap

BIG = b"a" * 1000  # long enough that an edit of it is a PATCH
# A second key of shard 0 (of a 2-shard store), for the PATCH.
P0 = next(k for k in (b"p%d" % i for i in range(1000)) if SlotMap(2).shard_of(k) == 0)


class Killed(BaseException):
    """A kill -9 of the process, at the point that raises it."""


def based(key: bytes, offset: int, data: bytes, base: bytes, length: int = len(BIG)) -> bytes:
    """A PATCH of ``key`` naming the record ``base`` (which gave the key ``length`` bytes)."""
    return encode_patch(key, offset, data, (record_crc(base), length))


def lost_tail_then_patch(directory: Path, key: bytes = b"k", head: bytes = b"") -> None:
    """Segment 1: ``key`` := BIG (a base SET), then an APPEND ``xx`` (a PATCH of it)
    whose data a power loss lost (its size reached the disk: zeros); segment 2:
    the APPEND ``yy`` after it, a PATCH naming the lost one."""
    directory.mkdir(parents=True, exist_ok=True)
    base = encode_base(key, BIG, None)
    lost = based(key, 1000, b"xx", base)
    (directory / "wal-00000001.log").write_bytes(head + base + bytes(len(lost)))
    (directory / "wal-00000002.log").write_bytes(based(key, 1002, b"yy", lost, 1002))


# -- a start cut off before its rebase is written ---------------------------------------------


def _killed(*_: object, **__: object) -> None:
    raise Killed


def _disk_full(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("cut_off", [_killed, _disk_full], ids=["kill", "disk-full"])
def test_a_start_cut_off_before_its_rebase_skips_the_same_patches_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_off: object
) -> None:
    """Was: the file changes truncated segment 1's lost tail first, then wrote the
    rebase. A start killed in between (or whose snapshot found the disk full) left
    a segment 1 that ends cleanly, and the next start, seeing no loss, applied
    segment 2's PATCH to the value without the lost APPEND: ``a*1000 + "\\0\\0yy"``,
    a value k never held, without a warning. Now nothing is truncated before the
    rebase (which deletes the segments): the next start finds the same loss (and
    the PATCH's base, lost, would not be the value replayed in any case)."""
    lost_tail_then_patch(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(recovery, "write_snapshot", cut_off)
        with pytest.raises((Killed, OSError)):
            recover(tmp_path, now_ms=0)
    again = recover(tmp_path, now_ms=0)
    assert again.data == {b"k": BIG}  # was BIG + b"\0\0yy"
    assert any("skipped 1 PATCH record(s)" in w for w in again.warnings)
    # Written this time: the third start replays a snapshot, nothing skipped.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap-00000002.kvs"]
    third = recover(tmp_path, now_ms=0)
    assert (third.data, third.warnings) == ({b"k": BIG}, [])


# -- the round marks of the segments a rebase deletes ------------------------------------------


def shard_0_after_round_7(data_dir: Path, *, missing_segment: bool) -> None:
    """Round 7 (intent retained) set K0 and K1 to ``t7``; shard 0 then SET K0 ``after``
    (acknowledged), and a rebase follows: a PATCH skipped after a power loss, or
    (``missing_segment``) a repair of a missing segment."""
    shard_0, shard_1 = data_dir / "shard-0", data_dir / "shard-1"
    round_7 = encode_set(K0, b"t7") + encode_txn(7, True) + encode_set(K0, b"after")
    if missing_segment:
        shard_0.mkdir(parents=True)
        (shard_0 / "wal-00000001.log").write_bytes(round_7)
        (shard_0 / "wal-00000003.log").write_bytes(encode_set(P0, BIG))
    else:
        lost_tail_then_patch(shard_0, P0, head=round_7)
    shard_1.mkdir(parents=True)
    (shard_1 / "wal-00000001.log").write_bytes(encode_set(K1, b"t7") + encode_txn(7, True))
    write_intents(data_dir, (7, [(0, encode_set(K0, b"t7")), (1, encode_set(K1, b"t7"))]))


@pytest.mark.parametrize("missing_segment", [False, True], ids=["skipped-patch", "repair"])
@pytest.mark.parametrize("killed_in", ["rebase", "redo"])
async def test_a_start_killed_after_its_rebase_does_not_redo_a_round_over_later_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing_segment: bool, killed_in: str
) -> None:
    """Was: the rebase's snapshot replaced shard 0's segments, and with them its
    mark of round 7; the intent of round 7 is dropped only later in the start, and
    the mark is written again only when the shard's log opens. A start killed in
    between (here: after the rebase's snapshot, before the segments are deleted; or
    once the files are changed, before the intents are redone) left a shard that
    marked no round: the next start redid round 7 on it, over the acknowledged
    ``SET K0 after`` (K0 read ``t7``). Now the rebase writes the newest mark to a
    segment of its own first."""
    shard_0_after_round_7(tmp_path, missing_segment=missing_segment)
    with monkeypatch.context() as patched:
        if killed_in == "rebase":
            real = recovery.write_snapshot

            def killed_once_written(*args: object, **kwargs: object) -> Path:
                real(*args, **kwargs)  # type: ignore[arg-type]
                raise Killed

            patched.setattr(recovery, "write_snapshot", killed_once_written)
        else:
            patched.setattr(durable_shard, "_redo_intents", _killed)
        with trio.fail_after(30), pytest.raises(Killed):
            async with kvmemo.open_store(shards=2, data_dir=str(tmp_path), repair=True):
                pass
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path), repair=True) as kv:
            assert await kv.get(K0) == b"after"  # was b"t7"
            assert await kv.get(K1) == b"t7"
            assert await kv.get(P0) == BIG


def test_a_rebase_without_round_marks_writes_no_head_segment(tmp_path: Path) -> None:
    lost_tail_then_patch(tmp_path)
    recovered = recover(tmp_path, now_ms=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap-00000002.kvs"]
    assert recovered.last_segment == 2


def test_a_rebase_keeps_the_newest_round_mark_in_a_segment_after_its_snapshot(
    tmp_path: Path,
) -> None:
    marks = encode_txn(3, True) + encode_txn(5, False)
    lost_tail_then_patch(tmp_path, head=marks)
    recovered = recover(tmp_path, now_ms=0)
    assert (recovered.marks, recovered.last_segment) == ({3: True, 5: False}, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap-00000002.kvs", "wal-00000003.log"]
    assert (tmp_path / "wal-00000003.log").read_bytes() == encode_txn(5, False)
    again = recover(tmp_path, now_ms=0)
    assert (again.data, again.marks, again.warnings) == ({b"k": BIG}, {5: False}, [])


# -- a repair: records moved aside, a segment missing, a damaged snapshot ----------------------


def damaged_snapshot(directory: Path) -> None:
    """A snapshot covering segment 1 (which is gone) whose entry of k is damaged."""
    write_snapshot(directory, [(b"a", b"1", None), (b"k", BIG + b"xx", None)], covers=1)
    path = directory / "snap-00000001.kvs"
    data = bytearray(path.read_bytes())
    data[data.rindex(BIG) + 10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["moved-aside", "missing-segment", "damaged-snapshot"])
def test_under_repair_a_patch_after_lost_records_is_skipped(tmp_path: Path, damage: str) -> None:
    """Was: a repair kept the later segments' PATCHes and applied them to the value
    the lost records left (README: "applies to the value those left"): with the
    APPEND ``xx`` moved aside, the APPEND ``yy`` after it made ``a*1000 +
    "\\0\\0yy"``; with k's snapshot entry lost, ``"\\0"*1002 + "yy"``: values k
    never held. Now they are skipped: their base (the APPEND ``xx``'s PATCH) is
    not the value replayed (a key written whole since still takes its PATCHes),
    and the rebase keeps the next start from applying them."""
    base_k = encode_base(b"k", BIG, None)
    xx = based(b"k", 1000, b"xx", base_k)
    base_n = encode_base(b"n", BIG, None)
    later = (
        based(b"k", 1002, b"yy", xx, 1002)
        + base_n
        + based(b"n", 0, b"N", base_n)  # n written whole since: applied
    )
    if damage == "moved-aside":
        damaged = bytearray(xx)
        damaged[-1] ^= 0xFF  # CRC mismatch: damage, not a torn tail
        (tmp_path / "wal-00000001.log").write_bytes(
            base_k + bytes(damaged) + encode_set(b"z", b"1")
        )
        (tmp_path / "wal-00000002.log").write_bytes(later)
        want = {b"k": BIG}
    elif damage == "missing-segment":
        (tmp_path / "wal-00000001.log").write_bytes(base_k)
        # wal-00000002.log, holding the APPEND xx, is gone
        (tmp_path / "wal-00000003.log").write_bytes(later)
        want = {b"k": BIG}
    else:
        # Segment 1 (covered: gone) held base_k and xx; the writer would name no
        # record before a snapshot's copy (its next edit is a base SET), so this
        # PATCH is skipped after any snapshot, damaged or not.
        damaged_snapshot(tmp_path)
        (tmp_path / "wal-00000002.log").write_bytes(later)
        want = {b"a": b"1"}  # k's entry lost with the damage
    recovered = recover(tmp_path, now_ms=0, repair=True)
    assert recovered.data == {**want, b"n": b"N" + BIG[1:]}  # k was BIG (or \0...) + yy
    assert any("skipped 1 PATCH record(s)" in w for w in recovered.warnings)
    assert not list(tmp_path.glob("wal-*.log"))  # the rebase replaced them
    again = recover(tmp_path, now_ms=0)
    assert (again.data, again.warnings) == (recovered.data, [])


def test_a_patch_whose_base_the_repair_kept_applies(tmp_path: Path) -> None:
    """More precise than the guard this replaced (which skipped a PATCH of any key
    not written whole since the damage): a PATCH whose base is before the records
    moved aside, and no lost record touched its key, applies; no rebase is
    needed."""
    base_k = encode_base(b"k", BIG, None)
    damaged = bytearray(encode_set(b"z", b"1"))
    damaged[-1] ^= 0xFF
    (tmp_path / "wal-00000001.log").write_bytes(base_k + bytes(damaged))
    (tmp_path / "wal-00000002.log").write_bytes(based(b"k", 1000, b"yy", base_k))
    recovered = recover(tmp_path, now_ms=0, repair=True)
    assert recovered.data == {b"k": BIG + b"yy"}
    assert not any("skipped" in w for w in recovered.warnings)
    assert sorted(p.name for p in tmp_path.glob("wal-*.log")) == [
        "wal-00000001.log",
        "wal-00000002.log",
    ]


def test_a_repair_keeps_the_bytes_it_moves_aside_though_the_rebase_deletes_the_segment(
    tmp_path: Path,
) -> None:
    base = encode_base(b"k", BIG, None)
    xx = based(b"k", 1000, b"xx", base)
    damaged = bytearray(xx)
    damaged[-1] ^= 0xFF
    tail = bytes(damaged) + encode_set(b"z", b"1")
    (tmp_path / "wal-00000001.log").write_bytes(base + tail)
    (tmp_path / "wal-00000002.log").write_bytes(based(b"k", 1002, b"yy", xx, 1002))
    recovered = recover(tmp_path, now_ms=0, repair=True)
    assert any("skipped 1 PATCH record(s)" in w for w in recovered.warnings)  # so a rebase
    aside = tmp_path / f"wal-00000001.log.corrupt-{len(base)}"
    assert aside.read_bytes() == tail
    assert not list(tmp_path.glob("wal-*.log"))


# -- a transaction's part: all of it or none ---------------------------------------------------


def logged_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("shard-*/wal-*.log")))


def logged_records(data_dir: Path) -> list[Record]:
    return decode_stream(logged_bytes(data_dir)).records


async def test_a_transaction_on_one_shard_logs_its_edit_whole_in_its_group(
    tmp_path: Path,
) -> None:
    """Was: a MULTI on one shard is one GROUP, and the edits in it were PATCHes. Now
    no PATCH is ever in a GROUP (replay refuses one as damage, see the next test):
    the edit is a SET of the whole value, though the key had a base; and, a grouped
    SET being no PATCH's base, the key's next edit is a base SET, the one after a
    PATCH again."""
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set(b"{t}k", BIG)
            await kv.execute("APPEND", b"{t}k", b"ww")  # a base SET
            await kv.transaction(("SET", b"{t}a", b"1"), ("APPEND", b"{t}k", b"yy"))
            await kv.execute("APPEND", b"{t}k", b"zz")
            await kv.execute("APPEND", b"{t}k", b"qq")
            served = await kv.get(b"{t}k")
            kv.engine.skip_final_snapshot()
    records = logged_records(tmp_path)
    group = next(r for r in records if r.op == Op.GROUP)
    inside = decode_stream(group.value).records
    assert [(r.op, r.key, r.value) for r in inside] == [
        (Op.SET, b"{t}a", b"1"),
        (Op.SET, b"{t}k", BIG + b"wwyy"),
    ]
    assert [kind(r) for r in raw_records(group.value)] == ["SET", "SET"]
    assert [kind(r) for r in raw_records(logged_bytes(tmp_path)) if b"{t}k" in r] == [
        "SET",  # SET k
        "base SET",  # APPEND ww
        "GROUP",  # the transaction
        "base SET",  # APPEND zz: a grouped SET is no base
        "PATCH",  # APPEND qq
    ]
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.get(b"{t}k") == served == BIG + b"wwyyzzqq"


def test_a_group_holding_a_patch_is_damage_never_applied_in_part(tmp_path: Path) -> None:
    """Replaces "a group holding a PATCH to skip is skipped whole" (after a lost
    tail, the guard skipped such a group, a transaction's part, rather than apply
    it without its PATCH). No writer puts a PATCH in a GROUP now, so one there is
    damage: the start is refused, and a repair moves the group aside with the rest
    of its segment (never a = the group's value with k lacking its APPEND)."""
    base_k = encode_base(b"k", BIG, None)
    (tmp_path / "wal-00000001.log").write_bytes(base_k)
    group = encode_group(encode_set(b"a", b"b" * 300) + based(b"k", 1000, b"yy", base_k))
    segment_2 = tmp_path / "wal-00000002.log"
    segment_2.write_bytes(encode_set(b"a", BIG) + group + encode_set(b"z", b"1"))
    with pytest.raises(CorruptLog) as refused:
        recover(tmp_path, now_ms=0)
    assert (refused.value.path, refused.value.offset) == (segment_2, len(encode_set(b"a", BIG)))
    assert refused.value.reason == "a PATCH record inside a GROUP record"
    recovered = recover(tmp_path, now_ms=0, repair=True)
    assert recovered.data == {b"k": BIG, b"a": BIG}  # nothing of the group, nor after it
    aside = tmp_path / f"wal-00000002.log.corrupt-{len(encode_set(b'a', BIG))}"
    assert aside.read_bytes() == group + encode_set(b"z", b"1")
    assert recover(tmp_path, now_ms=0).data == recovered.data


def test_a_patch_after_a_flush_of_its_base_is_skipped(tmp_path: Path) -> None:
    """Replaces "a FLUSH after a skipped group makes every key known again" (a
    guard's rule): a FLUSH ends every key's chain, so a PATCH after it naming a
    base from before it is skipped, with a warning and a rebase (it made
    ``"\\0"*n + edit`` of the absent key); a base SET after the FLUSH starts a
    new chain, whose PATCHes apply."""
    base_k = encode_base(b"k", BIG, None)
    base_a = encode_base(b"a", BIG, None)
    (tmp_path / "wal-00000001.log").write_bytes(base_k + encode_fields(Op.FLUSH, b""))
    (tmp_path / "wal-00000002.log").write_bytes(
        based(b"k", 0, b"K", base_k) + base_a + based(b"a", 0, b"A", base_a)
    )
    recovered = recover(tmp_path, now_ms=0)
    assert recovered.data == {b"a": b"A" + BIG[1:]}
    assert any("skipped 1 PATCH record(s)" in w for w in recovered.warnings)
    assert recover(tmp_path, now_ms=0).data == recovered.data
