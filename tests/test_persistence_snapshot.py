"""Snapshots: atomic writes, validation of every byte, choosing the newest valid one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmemo.persistence import snapshot as snapshot_module
from kvmemo.persistence.records import Op, Record, encode
from kvmemo.persistence.snapshot import (
    SNAPSHOT_HEADER_SIZE,
    CorruptSnapshot,
    list_snapshots,
    load_snapshot,
    load_snapshot_into,
    newest_snapshot,
    write_snapshot,
)

ENTRIES = [
    (b"a", b"1", None),
    (b"b", b"2" * 300, 1_700_000_000_000),
    (b"", b"", 0),
]


def test_a_snapshot_round_trips_its_entries_and_is_named_by_what_it_covers(
    tmp_path: Path,
) -> None:
    path = write_snapshot(tmp_path, ENTRIES, covers=7)
    assert path == tmp_path / "snap-00000007.kvs"
    assert list(load_snapshot(path)) == ENTRIES
    assert sorted(os.listdir(tmp_path)) == ["snap-00000007.kvs"]  # no temporary file left


def test_load_snapshot_into_fills_data_and_expires_like_the_store(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, ENTRIES, covers=1)
    data: dict[bytes, bytes] = {}
    expires: dict[bytes, int] = {}
    assert load_snapshot_into(path, data, expires) == 3
    assert data == {b"a": b"1", b"b": b"2" * 300, b"": b""}
    assert expires == {b"b": 1_700_000_000_000, b"": 0}


def test_an_empty_snapshot_is_valid(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, [], covers=0)
    assert list(load_snapshot(path)) == []
    assert newest_snapshot(tmp_path) == (path, 0)


def test_a_large_snapshot_is_written_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot_module, "WRITE_CHUNK", 64)
    entries = [(b"k%d" % i, b"v" * i, None) for i in range(100)]
    assert list(load_snapshot(write_snapshot(tmp_path, entries, covers=3))) == entries


def test_a_new_snapshot_deletes_the_older_ones(tmp_path: Path) -> None:
    write_snapshot(tmp_path, ENTRIES, covers=1)
    write_snapshot(tmp_path, ENTRIES, covers=2)
    newest = write_snapshot(tmp_path, ENTRIES[:1], covers=2)  # rewrite of the same point
    assert [p for _, p in list_snapshots(tmp_path)] == [newest]
    assert list(load_snapshot(newest)) == ENTRIES[:1]


def test_covers_must_not_be_negative_nor_older_than_the_newest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^covers must be >= 0, got -1$"):
        write_snapshot(tmp_path, [], covers=-1)
    write_snapshot(tmp_path, [], covers=5)
    with pytest.raises(ValueError, match=r"^covers must be >= 5 \(the newest snapshot's\), got 4$"):
        write_snapshot(tmp_path, [], covers=4)


def test_an_invalid_entry_leaves_no_file_and_the_old_snapshot_intact(tmp_path: Path) -> None:
    old = write_snapshot(tmp_path, ENTRIES, covers=1)
    with pytest.raises(ValueError, match=r"^expires_ms must be in \[0, 2\*\*63\), got -5$"):
        write_snapshot(tmp_path, [(b"k", b"v", -5)], covers=2)
    assert os.listdir(tmp_path) == [old.name]
    assert list(load_snapshot(old)) == ENTRIES


def test_a_write_error_is_named_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_snapshot(tmp_path, ENTRIES, covers=1)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=r"No space left on device: '.*snap-00000002\.kvs\.tmp'$"):
        write_snapshot(tmp_path, ENTRIES, covers=2)
    assert os.listdir(tmp_path) == [old.name]


def corrupt_cases(path: Path) -> list[tuple[str, bytes, int, str]]:
    good = path.read_bytes()
    first_end = SNAPSHOT_HEADER_SIZE + len(encode(Record(Op.SET, b"a", b"1")))
    flipped_record = bytearray(good)
    flipped_record[first_end + 20] ^= 0x40
    flipped_header = bytearray(good)
    flipped_header[10] ^= 0x01  # a padding byte: the header CRC still covers it
    extra = encode(Record(Op.SET, b"x", b"y"))
    last_start = len(good) - len(encode(Record(Op.SET, b"", b"", 0)))
    return [
        ("empty", b"", 0, "0 bytes, shorter than the 32-byte header"),
        ("short header", good[:20], 0, "20 bytes, shorter than the 32-byte header"),
        ("bad magic", b"X" + good[1:], 0, "bad magic b'XVMSNAP\\x00'"),
        ("header flip", bytes(flipped_header), 0, "header CRC mismatch"),
        ("record flip", bytes(flipped_record), first_end, "CRC mismatch"),
        ("cut in a record", good[:-3], last_start, "truncated inside a record"),
        (
            "cut at a boundary",
            good[:first_end],
            first_end,
            "the file ends after 1 entries, the header says 3",
        ),
        ("extra record", good + extra, len(good), "more entries than the 3 the header says"),
        (
            "a DEL record",
            good + encode(Record(Op.DEL, b"a")),
            len(good),
            "a DEL record where only SET records may be",
        ),
    ]


def test_every_kind_of_damage_is_reported_with_file_and_offset(tmp_path: Path) -> None:
    good = write_snapshot(tmp_path, ENTRIES, covers=1)
    for name, content, offset, reason in corrupt_cases(good):
        path = tmp_path / "damaged" / good.name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        for load in (lambda p: list(load_snapshot(p)), lambda p: load_snapshot_into(p, {}, {})):
            with pytest.raises(CorruptSnapshot) as info:
                load(path)
            assert (info.value.offset, info.value.reason) == (offset, reason), name
            assert str(info.value) == f"{path}: corrupt snapshot at offset {offset}: {reason}"


def test_a_renamed_snapshot_is_corrupt_because_its_header_says_what_it_covers(
    tmp_path: Path,
) -> None:
    good = write_snapshot(tmp_path, ENTRIES, covers=1)
    moved = good.rename(tmp_path / "snap-00000002.kvs")
    with pytest.raises(CorruptSnapshot, match=r"header says it covers segment 1$"):
        list(load_snapshot(moved))


def test_the_entries_before_the_damage_are_yielded_then_the_error(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, ENTRIES, covers=1)
    path.write_bytes(path.read_bytes()[:-3])
    seen: list[tuple[bytes, bytes, int | None]] = []
    with pytest.raises(CorruptSnapshot):
        seen.extend(load_snapshot(path))  # keeps what came before the error
    assert seen == ENTRIES[:2]


def test_abandoning_load_snapshot_early_releases_the_file(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, ENTRIES, covers=1)
    entries = load_snapshot(path)
    assert next(entries) == ENTRIES[0]
    entries.close()  # would raise BufferError if the mapping were still exported


def test_newest_snapshot_skips_damaged_ones(tmp_path: Path) -> None:
    assert newest_snapshot(tmp_path) is None
    older = write_snapshot(tmp_path, ENTRIES, covers=1)
    kept = older.read_bytes()
    newer = write_snapshot(tmp_path, ENTRIES, covers=2)
    older.write_bytes(kept)  # as if the crash came before the old one was deleted
    assert newest_snapshot(tmp_path) == (newer, 2)
    newer.write_bytes(newer.read_bytes()[:-1])
    assert newest_snapshot(tmp_path) == (older, 1)
