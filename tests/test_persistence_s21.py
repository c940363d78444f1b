"""Persistence review s21: newer format versions, each status its own, the LOCK's pid, size 0.

Each test is the regression test of one defect, and failed before its fix:

- a data file written by a *newer* format version (a log record, anywhere in
  a segment; a snapshot's header or one of its records; an intent; a record
  inside a GROUP or an intent; a commit frame) was taken for damage, and
  ``--repair`` moved it aside or truncated it: an older build started on a
  newer one's data threw data away (a newer commit frame at the tail was even
  ignored as torn, without repair, and the commit log deleted). The start is
  now refused, with or without repair, naming the file and both versions,
  and nothing changes. A byte flip in a version field still fails the CRC
  and is damage as before;
- a failed snapshot turned the log's status (``health``; the Redis port's
  ``aof_last_write_status``) to failing/``err``; it now shows in the
  snapshot's own status (``last_snapshot_status``; ``rdb_last_bgsave_status``)
  and ``/healthz`` still reports it;
- on a read-only directory the holder of ``LOCK`` cannot write its pid, and a
  second store's refusal named the stale pid of an older run;
- ``--snapshot-log-size 0`` snapshotted a shard after every batch; it now
  means "no snapshot by log size" (as Redis's ``auto-aof-rewrite-percentage 0``).
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import (  # the same in-process helpers
    keep_logging,  # noqa: F401 - a fixture, used by name
    resolved,
    run_main,
)
from test_persistence_disk import remount, tmpfs  # noqa: F401 - tmpfs: a fixture
from test_persistence_review import snapshot_of
from test_resp_server import Client, running

import kvmemo
from kvmemo.errors import KVMemoError
from kvmemo.persistence import commitlog, layout
from kvmemo.persistence.commitlog import Entry, encode_frame, read_frames
from kvmemo.persistence.intents import INTENT_DIR, read_intents
from kvmemo.persistence.layout import DirectoryInUse, lock_directory, release_directory
from kvmemo.persistence.records import (
    FORMAT_VERSION,
    Corrupt,
    Newer,
    NewerVersion,
    Op,
    Record,
    Torn,
    decode_stream,
    encode,
    encode_fields,
    encode_intent,
    encode_set,
    replay,
)
from kvmemo.persistence.recovery import CorruptLog, recover
from kvmemo.persistence.snapshot import (
    SNAPSHOT_VERSION,
    CorruptSnapshot,
    load_snapshot,
    write_snapshot,
)
from kvmemo.persistence.wal import segment_name
from kvmemo.server.app import Server
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import ErrorReply
from kvmemo.settings import SETTINGS
from kvmemo.storage import durable_shard

TIMEOUT = 30  # seconds per test
NOW_MS = 1_700_000_000_000
NEWER = FORMAT_VERSION + 1
DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- helpers -----------------------------------------------------------------------------------


def newer_record(version: int = NEWER, op: int = 42, payload: bytes = b"from the future") -> bytes:
    """A whole record of a newer format version, its CRC right.

    Only the first 10 bytes keep their meaning across versions (CRC, version,
    a byte, payload length): the op and the payload's layout are the newer
    build's own, so they are nothing this build knows.
    """
    body = bytes([version, op]) + len(payload).to_bytes(4, "little") + payload
    return zlib.crc32(body).to_bytes(4, "little") + body


def sets(n: int, prefix: bytes = b"k") -> bytes:
    return b"".join(encode_set(prefix + b"%d" % i, b"value-%d" % i) for i in range(n))


def newer_message(path: Path, version: int, offset: int, kind: str, supported: int) -> str:
    at = f" at offset {offset}" if offset else ""
    return (
        f"{path}: written by a newer KVMemo ({kind} format version {version}{at}; "
        f"this build reads up to {supported}); refusing to start"
    )


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def refused_both_ways(directory: Path, expected: str) -> None:
    """``recover`` refuses ``directory`` with and without repair, and changes nothing."""
    before = files(directory)
    for repair in (False, True):
        with pytest.raises(NewerVersion) as caught:
            recover(directory, now_ms=NOW_MS, repair=repair)
        assert str(caught.value) == expected
        assert files(directory) == before, f"repair={repair} changed the directory"


def retag_snapshot(path: Path, version: int) -> None:
    """Give snapshot ``path`` another format version, its header CRC made right again."""
    data = bytearray(path.read_bytes())
    data[8] = version
    data[28:32] = zlib.crc32(bytes(data[:28])).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def newer_frame(entries: list[Entry], version: int = commitlog.FRAME_VERSION + 1) -> bytes:
    """A commit frame of a newer version: its header's CRC (bytes 4 to 16) right."""
    frame = bytearray(encode_frame(entries))
    frame[4] = version
    frame[0:4] = zlib.crc32(bytes(frame[4:17])).to_bytes(4, "little")
    return bytes(frame)


# -- 1. a newer format version is refused, never repaired ----------------------------------------


def test_a_whole_record_of_a_newer_version_is_newer_not_corrupt_and_not_torn() -> None:
    prefix = sets(3)
    result = decode_stream(prefix + newer_record() + sets(2, b"after"))
    assert result.problem == Newer.at(len(prefix), NEWER)
    assert isinstance(result.problem, Corrupt)  # to a reader that looks no further
    assert len(result.records) == 3
    assert result.end == len(prefix)
    data: dict[bytes, bytes] = {}
    got = replay(prefix + newer_record(), data, {})
    assert (got.count, got.problem) == (3, Newer.at(len(prefix), NEWER))


def test_a_byte_flipped_anywhere_in_a_newer_record_is_damage_not_newer() -> None:
    # The CRC decides: a damaged newer record, or a damaged version field of
    # a current one, is corrupt (repair may move it aside), never "newer".
    prefix = sets(2)
    for victim in (newer_record(), encode(Record(Op.SET, b"key", b"value", 42))):
        for i in range(len(victim)):
            for mask in (0x01, 0x02, 0x03, 0x80, 0xFF):
                damaged = bytearray(victim)
                damaged[i] ^= mask
                problem = decode_stream(prefix + bytes(damaged)).problem
                assert isinstance(problem, Corrupt), (victim, i, mask)
                assert not isinstance(problem, Newer), (victim, i, mask)
    # Every value of a current record's version byte, the CRC left as it was.
    for version in range(256):
        record = bytearray(encode_set(b"k", b"v"))
        if version == record[4]:
            continue
        record[4] = version
        problem = decode_stream(bytes(record)).problem
        assert isinstance(problem, Corrupt), version
        assert not isinstance(problem, Newer), version


def test_a_torn_record_of_an_unknown_version_stays_corrupt() -> None:
    # Its CRC cannot be checked: it is not known to be newer (the rule as before).
    torn = newer_record()[:-3]
    problem = decode_stream(sets(1) + torn).problem
    assert isinstance(problem, Corrupt)
    assert not isinstance(problem, Newer | Torn)


@st.composite
def log_with_a_newer_record(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """Current records, one newer record, more records; (data, its offset, records before)."""
    before = draw(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=24)), max_size=8))
    after = draw(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=24)), max_size=4))
    version = draw(st.integers(NEWER, 255))
    payload = draw(st.binary(max_size=40))
    head = b"".join(encode_set(k, v) for k, v in before)
    data = head + newer_record(version, draw(st.integers(0, 255)), payload)
    data += b"".join(encode_set(k, v) for k, v in after)
    return data, len(head), len(before)


@settings(DETERMINISTIC, max_examples=150)
@given(log_with_a_newer_record())
def test_a_newer_record_anywhere_stops_decode_and_replay_exactly_there(
    case: tuple[bytes, int, int],
) -> None:
    data, offset, count = case
    result = decode_stream(data)
    assert isinstance(result.problem, Newer)
    assert result.problem.offset == offset
    assert (len(result.records), result.end) == (count, offset)
    replayed = replay(data, {}, {})
    assert (replayed.count, replayed.end, replayed.problem) == (count, offset, result.problem)


def test_a_newer_record_after_current_ones_refuses_recovery_even_with_repair(
    tmp_path: Path,
) -> None:
    # Was: "unknown format version 2" (CorruptLog); with repair the rest of
    # the segment was moved aside to .corrupt-<offset> and the segment cut.
    shard = tmp_path / "shard-0"
    shard.mkdir()
    (shard / segment_name(1)).write_bytes(sets(5))
    head = sets(4, b"s2-")
    segment = shard / segment_name(2)
    segment.write_bytes(head + newer_record() + sets(3, b"late-"))
    refused_both_ways(shard, newer_message(segment, NEWER, len(head), "record", FORMAT_VERSION))


def test_a_segment_that_opens_with_a_newer_record_is_refused(tmp_path: Path) -> None:
    segment = tmp_path / segment_name(1)
    segment.write_bytes(newer_record() + newer_record(payload=b"x" * 100))
    refused_both_ways(tmp_path, newer_message(segment, NEWER, 0, "record", FORMAT_VERSION))


def test_a_damaged_version_byte_is_still_repaired_as_damage(tmp_path: Path) -> None:
    head = sets(3)
    damaged = bytearray(encode_set(b"victim", b"v"))
    damaged[4] = NEWER  # looks newer, but the CRC says it is not
    segment = tmp_path / segment_name(1)
    segment.write_bytes(head + bytes(damaged) + sets(2, b"after"))
    with pytest.raises(CorruptLog):
        recover(tmp_path, now_ms=NOW_MS)
    got = recover(tmp_path, now_ms=NOW_MS, repair=True)
    assert len(got.data) == 3
    assert (tmp_path / f"{segment.name}.corrupt-{len(head)}").exists()


def test_a_group_holding_a_newer_record_is_refused_not_repaired(tmp_path: Path) -> None:
    head = sets(2)
    group = encode_fields(Op.GROUP, b"", encode_set(b"a", b"1") + newer_record())
    segment = tmp_path / segment_name(1)
    segment.write_bytes(head + group)
    refused_both_ways(tmp_path, newer_message(segment, NEWER, len(head), "record", FORMAT_VERSION))


def test_a_snapshot_of_a_newer_version_is_refused_not_moved_aside(tmp_path: Path) -> None:
    # Was: CorruptSnapshot; with its segments gone, repair moved it aside and
    # wrote an empty snapshot over every key it held.
    path = write_snapshot(tmp_path, [(b"k%d" % i, b"v", None) for i in range(10)], covers=4)
    retag_snapshot(path, SNAPSHOT_VERSION + 1)
    (tmp_path / segment_name(5)).write_bytes(sets(2))
    refused_both_ways(
        tmp_path, newer_message(path, SNAPSHOT_VERSION + 1, 0, "snapshot", SNAPSHOT_VERSION)
    )
    with pytest.raises(NewerVersion):
        list(load_snapshot(path))


def test_a_snapshot_whose_header_version_is_damaged_is_still_corrupt(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, [(b"k", b"v", None)], covers=1)
    data = bytearray(path.read_bytes())
    data[8] = SNAPSHOT_VERSION + 1  # the header CRC no longer holds
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match="header CRC mismatch"):
        list(load_snapshot(path))


def test_a_snapshot_holding_a_newer_record_later_on_is_refused(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, [(b"k%d" % i, b"v", None) for i in range(3)], covers=2)
    data = path.read_bytes()
    offset = len(data)
    # One more entry, of a newer record format; the count says 4.
    data = data[:20] + (4).to_bytes(8, "little") + data[28:] + newer_record()
    path.write_bytes(data)
    retag_snapshot(path, SNAPSHOT_VERSION)  # the header CRC over the new count
    refused_both_ways(tmp_path, newer_message(path, NEWER, offset, "record", FORMAT_VERSION))


def write_intents(data_dir: Path, data: bytes) -> Path:
    directory = data_dir / INTENT_DIR
    directory.mkdir(parents=True)
    path = directory / segment_name(1)
    path.write_bytes(data)
    return path


def test_a_newer_intent_record_is_refused_not_skipped(tmp_path: Path) -> None:
    # Was: a warning ("the rest of this segment is ignored"), then the start
    # dropped the intent log, rounds and all.
    first = encode_intent(1, [(0, encode_set(b"a", b"1"))])
    path = write_intents(tmp_path, first + newer_record())
    with pytest.raises(NewerVersion) as caught:
        read_intents(tmp_path)
    assert str(caught.value) == newer_message(path, NEWER, len(first), "record", FORMAT_VERSION)


def test_an_intent_holding_a_newer_record_is_refused_not_skipped(tmp_path: Path) -> None:
    first = encode_intent(1, [(0, encode_set(b"a", b"1"))])
    second = encode_intent(2, [(0, encode_set(b"b", b"2")), (1, newer_record())])
    path = write_intents(tmp_path, first + second)
    with pytest.raises(NewerVersion) as caught:
        read_intents(tmp_path)
    assert str(caught.value) == newer_message(path, NEWER, len(first), "record", FORMAT_VERSION)


def test_a_newer_commit_frame_is_refused_not_ignored_as_torn(tmp_path: Path) -> None:
    # Was: "a torn commit frame ... ignored", with or without repair, and the
    # commit log deleted once the shards had recovered.
    directory = tmp_path / commitlog.COMMIT_DIR
    directory.mkdir()
    first = encode_frame([Entry("shard-0", 1, 0, sets(1))])
    path = directory / "commit-00000001.log"
    path.write_bytes(first + newer_frame([Entry("shard-0", 1, 50, sets(1, b"n"))], 7))
    before = files(tmp_path)
    for repair in (False, True):
        with pytest.raises(NewerVersion) as caught:
            read_frames(tmp_path, repair=repair)
        assert str(caught.value) == newer_message(
            path, 7, len(first), "commit frame", commitlog.FRAME_VERSION
        )
        with pytest.raises(NewerVersion):
            commitlog.redo(tmp_path, repair=repair)
        assert files(tmp_path) == before


async def test_a_store_refuses_a_newer_commit_log_with_repair_and_changes_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
            await kv.mset({b"k%d" % i: b"v%d" % i for i in range(20)})
    directory = data_dir / commitlog.COMMIT_DIR
    directory.mkdir(exist_ok=True)
    path = directory / "commit-00000009.log"
    path.write_bytes(newer_frame([Entry("shard-0", 99, 0, sets(1))]))
    before = snapshot_of(data_dir)
    for repair in (False, True):
        with pytest.raises(NewerVersion) as caught:
            async with kvmemo.open_store(shards=2, data_dir=str(data_dir), repair=repair):
                pass
        assert str(caught.value) == newer_message(
            path, commitlog.FRAME_VERSION + 1, 0, "commit frame", commitlog.FRAME_VERSION
        )
        assert snapshot_of(data_dir) == before
    # The newer build's file taken away, the data is all there.
    path.unlink()
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        assert await kv.dbsize() == 20


@pytest.mark.usefixtures("keep_logging")
def test_serve_with_repair_on_a_newer_log_is_one_error_line_naming_both_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    shard = data_dir / "shard-0"
    shard.mkdir(parents=True)
    head = sets(10)
    segment = shard / segment_name(1)
    segment.write_bytes(head + newer_record())
    before = snapshot_of(data_dir)
    argv = ["serve", "--port", "0", "--no-resp", "--shards", "1", "--dir", str(data_dir)]
    for extra in ([], ["--repair"]):
        code, out, err = run_main([*argv, *extra], capsys)
        assert (code, out) == (2, "")
        assert err == (
            "kvmemo: error: "
            + newer_message(segment, NEWER, len(head), "record", FORMAT_VERSION)
            + "\n"
        )
        assert snapshot_of(data_dir) == before
        assert not list(shard.glob("*.corrupt-*"))


# -- 2. a failed snapshot shows in its own status, not the log's ---------------------------------


def fail_snapshots(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Make every snapshot write fail with ENOSPC (the log keeps working); a switch."""
    real = write_snapshot
    failing = [True]

    def write(directory: Path, *args: Any, **kwargs: Any) -> Path:
        if failing[0]:
            temp = directory / "snap-00000009.kvs.tmp"
            raise OSError(errno.ENOSPC, "No space left on device", str(temp))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(durable_shard, "write_snapshot", write)
    return lambda on: failing.__setitem__(0, on)


async def test_a_failed_snapshot_leaves_the_log_status_ok_and_shows_in_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = fail_snapshots(monkeypatch)
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set(b"k", b"v")
            section = (await kv.info("persistence"))["persistence"]
            assert section.get("last_snapshot_status") is None  # none tried yet
            with pytest.raises(KVMemoError) as caught:
                await kv.execute("save")
            assert caught.value.kind == "IO"
            section = (await kv.info("persistence"))["persistence"]
            # Was: health "failing", both shards failing, their errors the snapshot's.
            assert (section["health"], section["failing_shards"], section["errors"]) == (
                "ok",
                [],
                [],
            )
            assert section["last_snapshot_status"] == "err"
            assert section["snapshot_errors"] == [
                f"shard-{i}: No space left on device: {tmp_path}/shard-{i}/snap-00000009.kvs.tmp"
                for i in range(2)
            ]
            shard = section["shards"][0]
            assert (shard["health"], shard["last_snapshot_status"]) == ("ok", "err")
            # The log still takes writes, and /healthz still reports the snapshot.
            assert await kv.set(b"k2", b"v2") == "OK"
            status, body, _ = Server(kv.engine, ServerConfig(port=0, resp=False))._healthz()
            assert status == 503
            assert json.loads(body)["persistence"] == [
                f"shard-{i}: snapshot failed: No space left on device: "
                f"{tmp_path}/shard-{i}/snap-00000009.kvs.tmp"
                for i in range(2)
            ]
            switch(False)
            assert await kv.execute("save") == "OK"
            section = (await kv.info("persistence"))["persistence"]
            assert (section["last_snapshot_status"], section["snapshot_errors"]) == ("ok", [])
            status, body, _ = Server(kv.engine, ServerConfig(port=0, resp=False))._healthz()
            assert (status, json.loads(body)["persistence"]) == (200, [])


async def test_info_persistence_on_the_redis_port_keeps_each_status_to_its_own_mechanism(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = fail_snapshots(monkeypatch)
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path), shards=2) as server:
            client = await Client.connect(server)

            async def fields() -> dict[str, str]:
                text = await client.call("INFO", "persistence")
                assert isinstance(text, bytes)
                lines = text.decode().splitlines()[1:]
                return dict(line.split(":", 1) for line in lines if line)

            assert await client.call("SET", "k", "v") == "OK"
            reply = await client.call("SAVE")
            assert isinstance(reply, ErrorReply)
            got = await fields()
            # Was: aof_last_write_status:err (and rdb_last_bgsave_status:ok).
            assert (got["aof_last_write_status"], got["rdb_last_bgsave_status"]) == ("ok", "err")
            assert await client.call("SET", "k2", "v2") == "OK"
            switch(False)
            assert await client.call("SAVE") == "OK"
            got = await fields()
            assert (got["aof_last_write_status"], got["rdb_last_bgsave_status"]) == ("ok", "ok")


# -- 3. the LOCK's pid is the holder's, or said to be unknown ------------------------------------


def read_only_lock(monkeypatch: pytest.MonkeyPatch, lock: Path) -> None:
    """Opening ``lock`` for writing fails as on a read-only file system."""
    real = os.open

    def fake(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == lock and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


STALE_PID = 2_000_000_000  # an older run's, long gone (beyond any pid_max)


def test_a_read_only_lock_names_its_real_holder_not_an_older_runs_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "LOCK"
    lock.write_text(f"{STALE_PID}\n")  # left by an older run
    read_only_lock(monkeypatch, lock)
    holder = lock_directory(tmp_path)
    assert holder is not None
    try:
        assert lock.read_text() == f"{STALE_PID}\n"  # the holder could not write its pid
        with pytest.raises(DirectoryInUse) as caught:
            lock_directory(tmp_path)
        # Was: "(process 2000000000)", an older run's.
        assert str(caught.value) == (
            f"{tmp_path}: the data directory is in use by another KVMemo store "
            f"(process {os.getpid()}); two stores on one directory would damage it"
        )
        # Where the kernel's lock table cannot be read: the pid is unknown, said so.
        monkeypatch.setattr(layout, "PROC_LOCKS", tmp_path / "no-such-table")
        with pytest.raises(DirectoryInUse) as caught:
            lock_directory(tmp_path)
        assert str(caught.value) == (
            f"{tmp_path}: the data directory is in use by another KVMemo store (process id "
            "unknown: LOCK cannot be written here, so it may name an older run's); two stores "
            "on one directory would damage it"
        )
    finally:
        release_directory(holder)


def test_a_writable_lock_names_the_pid_its_holder_wrote(tmp_path: Path) -> None:
    (tmp_path / "LOCK").write_text(f"{STALE_PID}\n")
    holder = lock_directory(tmp_path)
    assert holder is not None
    try:
        assert (tmp_path / "LOCK").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DirectoryInUse, match=rf"\(process {os.getpid()}\);"):
            lock_directory(tmp_path)
    finally:
        release_directory(holder)


async def test_on_a_read_only_file_system_a_second_store_names_the_real_holder(
    tmpfs: Path,  # noqa: F811 - the fixture
) -> None:
    data_dir = tmpfs / "data"
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
            await kv.set(b"k", b"v")
        (data_dir / "LOCK").write_text(f"{STALE_PID}\n")
        await remount(tmpfs, "ro")
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
            assert await kv.get(b"k") == b"v"
            with pytest.raises(DirectoryInUse) as caught:
                async with kvmemo.open_store(shards=1, data_dir=str(data_dir)):
                    pass
            assert f"(process {os.getpid()})" in str(caught.value)
            assert str(STALE_PID) not in str(caught.value)


# -- 4. --snapshot-log-size 0: no snapshot by log size ---------------------------------------------


async def test_snapshot_log_size_zero_turns_snapshots_by_log_size_off(tmp_path: Path) -> None:
    # Was: every batch that wrote anything started a snapshot of its shard.
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=1, data_dir=str(tmp_path), snapshot_log_bytes=0) as kv:
            dur = kv.engine._durabilities[0]
            for i in range(20):
                await kv.set(b"k%d" % i, b"v" * 100)
            assert (dur.saving, dur.last_snapshot_pause_ms, dur.last_save) == (False, None, None)
            assert not list((tmp_path / "shard-0").glob("snap-*"))
            assert (await kv.info("persistence"))["persistence"]["log_bytes"] > 2000
            assert await kv.execute("save") == "OK"  # SAVE still snapshots
            assert dur.last_save is not None
        async with kvmemo.open_store(shards=1, data_dir=str(tmp_path), snapshot_log_bytes=1) as kv:
            dur = kv.engine._durabilities[0]
            await kv.set(b"after", b"x")
            assert dur.last_snapshot_pause_ms is not None  # any positive size: by log size


def test_snapshot_log_size_zero_is_accepted_and_documented_from_every_source(
    tmp_path: Path,
) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text("[persistence]\nsnapshot_log_size = 0\n")
    assert resolved(["--snapshot-log-size", "0"]).store.snapshot_log_bytes == 0
    assert resolved([], {"KVMEMO_SNAPSHOT_LOG_SIZE": "0"}).store.snapshot_log_bytes == 0
    assert resolved(["--config", str(config)]).store.snapshot_log_bytes == 0
    [setting] = [s for s in SETTINGS if s.name == "snapshot_log_size"]
    assert "0: never by size" in setting.help
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "`0` turns these automatic snapshots off" in readme
