"""Recovery: snapshot plus log, expiry at start, torn tails, corruption, repair."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmemo.persistence.records import Op, Record, encode
from kvmemo.persistence.recovery import CorruptLog, recover
from kvmemo.persistence.snapshot import CorruptSnapshot, load_snapshot, write_snapshot
from kvmemo.persistence.wal import SegmentedLog, segment_name

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
NOW_MS = 1_000


def write_segment(directory: Path, number: int, recs: list[Record]) -> Path:
    path = directory / segment_name(number)
    path.write_bytes(b"".join(encode(r) for r in recs))
    return path


def model(recs: list[Record], now_ms: int = NOW_MS) -> dict[bytes, tuple[bytes, int | None]]:
    """The live entries after ``recs``, written independently of the code under test."""
    state: dict[bytes, tuple[bytes, int | None]] = {}
    for r in recs:
        if r.op is Op.SET:
            state[r.key] = (r.value, r.expires_ms)
        elif r.op is Op.DEL:
            state.pop(r.key, None)
        elif r.op is Op.EXPIRE:
            if r.key in state:
                state[r.key] = (state[r.key][0], r.expires_ms)
        else:
            state.clear()
    return {k: (v, e) for k, (v, e) in state.items() if e is None or e > now_ms}


def entries(directory: Path, repair: bool = False) -> dict[bytes, tuple[bytes, int | None]]:
    got = recover(directory, now_ms=NOW_MS, repair=repair)
    assert set(got.expires) <= set(got.data)
    return {k: (v, got.expires.get(k)) for k, v in got.data.items()}


def test_a_missing_directory_is_an_empty_shard(tmp_path: Path) -> None:
    got = recover(tmp_path / "nothing", now_ms=NOW_MS)
    assert (got.data, got.expires, got.warnings, got.last_segment) == ({}, {}, [], 0)


def test_the_snapshot_then_the_segments_after_it_give_the_final_state(tmp_path: Path) -> None:
    write_segment(tmp_path, 1, [Record(Op.SET, b"stale", b"covered by the snapshot")])
    write_snapshot(tmp_path, [(b"a", b"1", None), (b"b", b"2", 5_000)], covers=1)
    log2 = [
        Record(Op.SET, b"c", b"3"),
        Record(Op.DEL, b"a"),
        Record(Op.EXPIRE, b"b", expires_ms=None),
    ]
    log3 = [Record(Op.SET, b"d", b"4", 9_000), Record(Op.EXPIRE, b"nothing", expires_ms=7)]
    write_segment(tmp_path, 2, log2)
    write_segment(tmp_path, 3, log3)
    got = recover(tmp_path, now_ms=NOW_MS)
    assert got.data == {b"b": b"2", b"c": b"3", b"d": b"4"}
    assert got.expires == {b"d": 9_000}
    assert (got.snapshot_entries, got.records_replayed, got.last_segment) == (2, 5, 3)
    assert got.snapshot == tmp_path / "snap-00000001.kvs"
    assert got.warnings == []


def test_a_flush_clears_everything_before_it(tmp_path: Path) -> None:
    write_snapshot(tmp_path, [(b"a", b"1", 5_000)], covers=0)
    write_segment(tmp_path, 1, [Record(Op.SET, b"b", b"2"), Record(Op.FLUSH)])
    write_segment(tmp_path, 2, [Record(Op.SET, b"c", b"3")])
    assert entries(tmp_path) == {b"c": (b"3", None)}


def test_keys_that_expired_while_the_server_was_down_are_not_loaded(tmp_path: Path) -> None:
    # Expired by now in the snapshot, but a later record moved its expiry on:
    # expiry is applied only once every record is in.
    write_snapshot(tmp_path, [(b"gone", b"x", NOW_MS), (b"moved", b"z", 10)], covers=0)
    write_segment(tmp_path, 1, [Record(Op.EXPIRE, b"moved", expires_ms=NOW_MS + 5)])
    got = recover(tmp_path, now_ms=NOW_MS)
    assert got.data == {b"moved": b"z"}
    assert got.expires == {b"moved": NOW_MS + 5}
    assert got.expired_dropped == 1


def test_a_torn_tail_is_truncated_in_place_with_a_warning(tmp_path: Path) -> None:
    recs = [Record(Op.SET, b"a", b"1"), Record(Op.SET, b"b", b"2")]
    path = write_segment(tmp_path, 1, recs)
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])
    got = recover(tmp_path, now_ms=NOW_MS)
    assert got.data == {b"a": b"1"}
    cut = len(encode(recs[0]))
    assert got.warnings == [
        f"{path}: truncated a torn record at offset {cut} ({len(whole) - 5 - cut} bytes, "
        "left by a crash during an append)"
    ]
    assert path.stat().st_size == cut
    assert recover(tmp_path, now_ms=NOW_MS).warnings == []


def corrupt_second_record(tmp_path: Path) -> tuple[Path, int, list[Record]]:
    recs = [Record(Op.SET, b"a", b"1"), Record(Op.SET, b"b", b"2"), Record(Op.SET, b"c", b"3")]
    path = write_segment(tmp_path, 1, recs)
    offset = len(encode(recs[0]))
    data = bytearray(path.read_bytes())
    data[offset + 15] ^= 0x10
    path.write_bytes(bytes(data))
    write_segment(tmp_path, 2, [Record(Op.SET, b"d", b"4")])
    return path, offset, recs


def test_a_corrupt_record_stops_the_start_naming_the_file_and_offset(tmp_path: Path) -> None:
    path, offset, _ = corrupt_second_record(tmp_path)
    before = sorted(os.listdir(tmp_path))
    message = (
        f"{path}: corrupt write-ahead log at offset {offset}: CRC mismatch (start with --repair, "
        "or open_store(repair=True), to keep the records before it and move the rest aside)"
    )
    with pytest.raises(CorruptLog, match=f"^{re.escape(message)}$") as info:
        recover(tmp_path, now_ms=NOW_MS)
    assert (info.value.path, info.value.offset, info.value.reason) == (path, offset, "CRC mismatch")
    assert sorted(os.listdir(tmp_path)) == before  # nothing touched


def test_repair_moves_the_damaged_rest_aside_and_keeps_later_segments(tmp_path: Path) -> None:
    path, offset, _ = corrupt_second_record(tmp_path)
    damaged = path.read_bytes()
    got = recover(tmp_path, now_ms=NOW_MS, repair=True)
    assert got.data == {b"a": b"1", b"d": b"4"}
    aside = tmp_path / f"wal-00000001.log.corrupt-{offset}"
    assert aside.read_bytes() == damaged[offset:]
    assert path.read_bytes() == damaged[:offset]
    assert got.warnings == [
        f"repair: {path}: CRC mismatch at offset {offset}; kept the 1 records before it and "
        f"moved the remaining {len(damaged) - offset} bytes to {aside.name}"
    ]
    again = recover(tmp_path, now_ms=NOW_MS)  # no repair needed any more
    assert (again.data, again.warnings) == (got.data, [])
    with SegmentedLog(tmp_path) as log:
        assert log.current == 3  # the .corrupt file is not a segment


def test_a_damaged_snapshot_is_replaced_by_an_older_one_when_the_log_is_complete(
    tmp_path: Path,
) -> None:
    write_segment(tmp_path, 1, [Record(Op.SET, b"a", b"1")])
    write_segment(tmp_path, 2, [Record(Op.SET, b"b", b"2")])
    newer = write_snapshot(tmp_path, [(b"a", b"1", None), (b"b", b"2", None)], covers=2)
    newer.write_bytes(newer.read_bytes()[:-1])
    got = recover(tmp_path, now_ms=NOW_MS)
    assert got.data == {b"a": b"1", b"b": b"2"}
    assert got.snapshot is None
    assert got.warnings[-1] == "recovering from no snapshot and the log instead: nothing is lost"
    assert str(newer) in got.warnings[0]


def test_a_damaged_snapshot_whose_segments_are_gone_stops_the_start_unless_repair(
    tmp_path: Path,
) -> None:
    snap = write_snapshot(tmp_path, [(b"a", b"1", None), (b"b", b"2", None)], covers=4)
    write_segment(tmp_path, 5, [Record(Op.SET, b"c", b"3")])
    good = snap.read_bytes()
    snap.write_bytes(good[:-2])
    with pytest.raises(CorruptSnapshot, match=r"snap-00000004\.kvs: corrupt snapshot at offset"):
        recover(tmp_path, now_ms=NOW_MS)
    got = recover(tmp_path, now_ms=NOW_MS, repair=True)
    assert got.data == {b"a": b"1", b"c": b"3"}
    assert got.snapshot == tmp_path / "snap-00000005.kvs"
    offset = len(good) - len(encode(Record(Op.SET, b"b", b"2")))
    assert sorted(os.listdir(tmp_path)) == [
        f"snap-00000004.kvs.corrupt-{offset}",
        "snap-00000005.kvs",
    ]
    assert entries(tmp_path) == {b"a": (b"1", None), b"c": (b"3", None)}  # no repair needed


def test_a_missing_segment_stops_the_start_unless_repair(tmp_path: Path) -> None:
    write_segment(tmp_path, 1, [Record(Op.SET, b"a", b"1")])
    write_segment(tmp_path, 3, [Record(Op.SET, b"c", b"3")])
    with pytest.raises(CorruptLog, match=r"segments 2\.\.2 are missing, and segment 3 needs them"):
        recover(tmp_path, now_ms=NOW_MS)
    got = recover(tmp_path, now_ms=NOW_MS, repair=True)
    assert got.data == {b"a": b"1", b"c": b"3"}
    assert sorted(os.listdir(tmp_path)) == ["snap-00000003.kvs"]
    assert recover(tmp_path, now_ms=NOW_MS).data == got.data
    assert list(load_snapshot(tmp_path / "snap-00000003.kvs")) == [
        (b"a", b"1", None),
        (b"c", b"3", None),
    ]


def test_the_unfinished_temporary_file_of_a_snapshot_is_removed(tmp_path: Path) -> None:
    (tmp_path / "snap-00000002.kvs.tmp").write_bytes(b"half a snapshot")
    got = recover(tmp_path, now_ms=NOW_MS)
    assert got.warnings == ["removed snap-00000002.kvs.tmp, a snapshot a crash left unfinished"]
    assert os.listdir(tmp_path) == []


def test_the_integration_cycle_of_log_snapshot_and_restart_keeps_every_write(
    tmp_path: Path,
) -> None:
    expected: dict[bytes, bytes] = {}
    for restart in range(3):
        state = recover(tmp_path, now_ms=NOW_MS)
        assert state.data == expected
        with SegmentedLog(tmp_path, segment_bytes=200) as log:
            for i in range(10):
                key = b"k%d" % (i % 7)
                log.append([Record(Op.SET, key, b"%d-%d" % (restart, i))])
                expected[key] = b"%d-%d" % (restart, i)
                if i == 5:
                    covered = log.rotate()
                    write_snapshot(
                        tmp_path, [(k, v, None) for k, v in expected.items()], covers=covered
                    )
                    log.remove_through(covered)
            log.sync()
    assert recover(tmp_path, now_ms=NOW_MS).data == expected


# --- properties: random records, random damage ------------------------------------------


def record_strategy() -> st.SearchStrategy[Record]:
    keys = st.sampled_from([b"a", b"b", b"c", b"d", b""])
    expiry = st.none() | st.integers(NOW_MS - 3, NOW_MS + 3)
    return st.one_of(
        st.builds(Record, st.just(Op.SET), keys, st.binary(max_size=20), expiry),
        st.builds(Record, st.just(Op.DEL), keys),
        st.builds(Record, st.just(Op.EXPIRE), keys, st.just(b""), expiry),
        st.just(Record(Op.FLUSH)),
    )


@st.composite
def damaged_log(draw: st.DrawFn) -> tuple[list[list[Record]], int, int, list[int], bytes]:
    """Segments of records; one segment (index) cut at ``cut`` and flipped at ``flips``."""
    segments = draw(st.lists(st.lists(record_strategy(), max_size=6), min_size=1, max_size=4))
    victim = draw(st.integers(0, len(segments) - 1))
    data = bytearray(b"".join(encode(r) for r in segments[victim]))
    # sampled_from spreads the damage evenly over the segment (integers favour 0).
    cut = draw(st.just(len(data)) | st.sampled_from(range(len(data) + 1)))
    del data[cut:]
    flips: list[int] = []
    if data and draw(st.booleans()):
        positions = st.sampled_from(range(len(data)))
        flips = draw(st.lists(positions, min_size=1, max_size=2, unique=True))
        for i in flips:
            data[i] ^= draw(st.integers(1, 255))
    return segments, victim, cut, flips, bytes(data)


def starts_of(recs: list[Record]) -> list[int]:
    out = [0]
    for r in recs:
        out.append(out[-1] + len(encode(r)))
    return out


@settings(DETERMINISTIC, max_examples=150)
@given(damaged_log(), st.booleans())
def test_damaged_logs_recover_every_record_before_the_damage_and_nothing_false(
    case: tuple[list[list[Record]], int, int, list[int], bytes], repair: bool
) -> None:
    segments, victim, cut, flips, damaged = case
    first = min([cut, *flips])
    starts = starts_of(segments[victim])
    intact = sum(1 for end in starts[1:] if end <= first)
    kept = [r for seg in segments[:victim] for r in seg]
    kept += segments[victim][:intact]
    kept += [r for seg in segments[victim + 1 :] for r in seg]
    # The damaged record is complete in the file and flipped: that is corruption.
    must_be_corrupt = bool(flips) and starts[intact + 1] <= len(damaged)
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for number, recs in enumerate(segments, start=1):
            write_segment(directory, number, recs)
        victim_path = directory / segment_name(victim + 1)
        victim_path.write_bytes(damaged)
        error: CorruptLog | None = None
        try:
            got = entries(directory, repair=repair)
        except CorruptLog as exc:
            error = exc
        event("stopped: corrupt" if error is not None else f"recovered, repair={repair}")
        if error is not None:
            assert not repair
            assert (error.path, error.offset) == (victim_path, starts[intact])
            return
        assert not must_be_corrupt or repair
        assert got == model(kept)
        assert victim_path.read_bytes() == damaged[: starts[intact]]
        asides = [p.name for p in directory.iterdir() if ".corrupt-" in p.name]
        event(f"moved aside: {bool(asides)}; kept {'none' if intact == 0 else 'some'}")
        if asides:
            assert repair
            assert asides == [f"{victim_path.name}.corrupt-{starts[intact]}"]
            assert (directory / asides[0]).read_bytes() == damaged[starts[intact] :]
        assert entries(directory) == got  # after recovery, no repair is ever needed


@settings(DETERMINISTIC, max_examples=60)
@given(
    st.lists(
        st.tuples(st.binary(max_size=8), st.binary(max_size=16)),
        max_size=8,
        unique_by=lambda e: e[0],
    ),
    st.data(),
)
def test_a_damaged_snapshot_never_loads_a_false_entry(
    items: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as name:
        path = write_snapshot(Path(name), [(k, v, None) for k, v in items], covers=1)
        content = bytearray(path.read_bytes())
        cut = data.draw(st.integers(0, len(content)))
        del content[cut:]
        if content and data.draw(st.booleans()):
            content[data.draw(st.integers(0, len(content) - 1))] ^= data.draw(st.integers(1, 255))
        damaged = bytes(content) != path.read_bytes()
        path.write_bytes(bytes(content))
        seen: list[tuple[bytes, bytes, int | None]] = []
        try:
            seen.extend(load_snapshot(path))
        except CorruptSnapshot:
            assert damaged
        else:
            assert not damaged
        assert seen == [(k, v, None) for k, v in items][: len(seen)]
