"""The segmented write-ahead log: numbering, batches, rotation, threads, disk errors."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmemo.persistence import wal
from kvmemo.persistence.records import Op, Record, encode
from kvmemo.persistence.recovery import recover
from kvmemo.persistence.snapshot import write_snapshot
from kvmemo.persistence.wal import LogFailedError, SegmentedLog

NOW_MS = 1_700_000_000_000


def sets(start: int, count: int, value: bytes = b"v" * 20) -> list[Record]:
    return [Record(Op.SET, b"key-%d" % i, value) for i in range(start, start + count)]


def names(log: SegmentedLog) -> list[str]:
    return [p.name for p in log.segments()]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_new_log_starts_a_segment_after_every_segment_and_snapshot(tmp_path: Path) -> None:
    with SegmentedLog(tmp_path / "shard") as log:
        assert names(log) == ["wal-00000001.log"]
    with SegmentedLog(tmp_path / "shard") as log:
        assert names(log) == ["wal-00000001.log", "wal-00000002.log"]
    for name in ("wal-00000001.log", "wal-00000002.log"):
        (tmp_path / "shard" / name).unlink()
    write_snapshot(tmp_path / "shard", [], covers=9)
    with SegmentedLog(tmp_path / "shard") as log:
        # Segment 1 would be taken for one the snapshot covers, and skipped.
        assert log.current == 10


def test_appended_batches_are_read_back_by_recovery(tmp_path: Path) -> None:
    with SegmentedLog(tmp_path) as log:
        written = log.append(sets(0, 3)) + log.append([Record(Op.DEL, b"key-1")])
        assert log.append([]) == 0
        assert written == log.size() == (tmp_path / "wal-00000001.log").stat().st_size
        log.sync()
    assert recover(tmp_path, now_ms=NOW_MS).data == {b"key-0": b"v" * 20, b"key-2": b"v" * 20}


def test_an_append_past_segment_bytes_starts_a_new_segment(tmp_path: Path) -> None:
    with SegmentedLog(tmp_path, segment_bytes=100) as log:
        for i in range(5):
            log.append(sets(i, 1))  # 55 bytes each
        assert names(log) == ["wal-00000001.log", "wal-00000002.log", "wal-00000003.log"]
        log.sync()
    assert len(recover(tmp_path, now_ms=NOW_MS).data) == 5


def test_rotate_and_remove_through_drop_the_segments_a_snapshot_covers(tmp_path: Path) -> None:
    with SegmentedLog(tmp_path) as log:
        log.append(sets(0, 2))
        assert log.rotate() == 1
        log.append(sets(2, 2))
        assert log.rotate() == 2
        log.append(sets(4, 2))
        log.sync()
        state = recover(tmp_path, now_ms=NOW_MS)
        write_snapshot(tmp_path, [(k, v, None) for k, v in state.data.items()], covers=3)
        before = log.size()
        log.remove_through(2)
        assert names(log) == ["wal-00000003.log"]
        assert log.size() == before - 2 * len(b"".join(encode(r) for r in sets(0, 2)))
        with pytest.raises(ValueError, match=r"^number must be < the current segment 3, got 3$"):
            log.remove_through(3)


def test_arguments_and_a_closed_log_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^segment_bytes must be >= 1, got 0$"):
        SegmentedLog(tmp_path, segment_bytes=0)
    log = SegmentedLog(tmp_path)
    with pytest.raises(ValueError, match=r"^a DEL record has no value and no expiry$"):
        log.append([*sets(0, 1), Record(Op.DEL, b"k", b"v")])
    assert log.size() == 0  # nothing of the batch was written
    log.close()
    log.close()
    for call in (lambda: log.append(sets(0, 1)), log.sync, log.rotate):
        with pytest.raises(ValueError, match=r"^I/O operation on a closed log$"):
            call()


def test_sync_makes_retired_segments_and_the_directory_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    with SegmentedLog(tmp_path) as log:
        log.sync()
        log.append(sets(0, 1))
        log.rotate()
        log.append(sets(1, 1))
        monkeypatch.setattr(os, "fsync", recording_fsync)
        log.sync()  # the closed segment, the current one, the directory (a new entry)
        assert len(synced) == 3
        log.sync()  # only the current one now
        assert len(synced) == 4


def test_concurrent_sync_in_a_thread_loses_nothing_and_leaks_no_descriptor(
    tmp_path: Path,
) -> None:
    fds_before = open_fds()
    log = SegmentedLog(tmp_path, segment_bytes=4_000)
    stop = threading.Event()
    failures: list[BaseException] = []

    def syncer() -> None:
        while not stop.is_set():
            try:
                log.sync()
            except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
                failures.append(exc)
                return

    thread = threading.Thread(target=syncer)
    thread.start()
    model: dict[bytes, bytes] = {}
    try:
        for i in range(1_500):
            batch = sets(i, 1, b"%d" % i)
            log.append(batch)
            model[batch[0].key] = batch[0].value
            if i % 400 == 399:
                covered = log.rotate()
                write_snapshot(tmp_path, [(k, v, None) for k, v in model.items()], covers=covered)
                log.remove_through(covered)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    log.sync()
    log.close()
    assert open_fds() == fds_before
    assert recover(tmp_path, now_ms=NOW_MS).data == model


def test_a_failed_sync_is_named_then_the_log_continues_in_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, "Input/output error")]

    def failing_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    with SegmentedLog(tmp_path) as log:
        log.append(sets(0, 1))
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(
            OSError, match=r"^\[Errno 5\] Input/output error: '.*wal-00000001\.log'$"
        ):
            log.sync()
        # A second fsync might report success for pages the kernel dropped: refuse it.
        with pytest.raises(LogFailedError, match=r"segment wal-00000001\.log failed earlier"):
            log.sync()
        log.append(sets(1, 1))
        assert log.current == 2
        log.sync()
    assert len(recover(tmp_path, now_ms=NOW_MS).data) == 2


def test_a_failed_append_is_truncated_back_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_all = wal.write_all

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with SegmentedLog(tmp_path) as log:
        log.append(sets(0, 2))
        size = log.size()
        monkeypatch.setattr(wal, "write_all", half_then_full)
        with pytest.raises(
            OSError, match=r"^\[Errno 28\] No space left on device: '.*wal-00000001\.log'$"
        ):
            log.append(sets(2, 3))
        assert (tmp_path / "wal-00000001.log").stat().st_size == log.size() == size
        monkeypatch.setattr(wal, "write_all", real_write_all)
        log.append(sets(5, 1))
        assert log.current == 1
        log.sync()
    state = recover(tmp_path, now_ms=NOW_MS)
    assert sorted(state.data) == [b"key-0", b"key-1", b"key-5"]
    assert state.warnings == []


def test_an_append_whose_truncation_fails_too_leaves_a_torn_tail_and_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def part_then_error(fd: int, data: bytes) -> None:
        os.write(fd, data[:7])
        raise OSError(errno.EIO, "Input/output error")

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with SegmentedLog(tmp_path) as log:
        log.append(sets(0, 1))
        with monkeypatch.context() as patch:
            patch.setattr(wal, "write_all", part_then_error)
            patch.setattr(os, "ftruncate", no_truncate)
            with pytest.raises(OSError, match=r"Input/output error") as info:
                log.append(sets(1, 1))
        assert any("truncating the segment back" in note for note in info.value.__notes__)
        log.append(sets(2, 1))  # never after the partial record: in a new segment
        assert log.current == 2
        log.sync()
    state = recover(tmp_path, now_ms=NOW_MS)
    assert sorted(state.data) == [b"key-0", b"key-2"]
    assert len(state.warnings) == 1
    assert "wal-00000001.log: truncated a torn record at offset 52" in state.warnings[0]


DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pathlib import Path
    from kvmemo.persistence import Op, Record, SegmentedLog, write_snapshot

    directory = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write raises EFBIG
    log = SegmentedLog(directory)
    path = log.segments()[-1]
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    acked = 0
    while True:
        batch = [Record(Op.SET, b"key-%d" % (acked + i), b"v" * 50) for i in range(3)]
        before = path.stat().st_size
        try:
            log.append(batch)
            log.sync()
        except OSError as exc:
            append_error = (exc.errno, str(exc))
            break
        acked += len(batch)
    after = path.stat().st_size
    try:
        write_snapshot(directory, [(b"k%d" % i, b"v" * 100, None) for i in range(100)], covers=0)
        snapshot_error = None
    except OSError as exc:
        snapshot_error = (exc.errno, str(exc))
    log.close()
    print(json.dumps(dict(acked=acked, before=before, after=after,
                          append_error=append_error, snapshot_error=snapshot_error)))
    """
)


def test_a_full_disk_raises_efbig_and_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    # RLIMIT_FSIZE in a child process: "file too large" at 4 KiB, root included.
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["append_error"][0] == errno.EFBIG
    assert report["append_error"][1].endswith(
        "File too large: '%s'" % (tmp_path / "wal-00000001.log")
    )
    assert report["after"] == report["before"]  # the partial batch was cut off
    assert report["snapshot_error"][0] == errno.EFBIG
    assert "snap-00000000.kvs.tmp" in report["snapshot_error"][1]
    assert sorted(os.listdir(tmp_path)) == ["wal-00000001.log"]  # no temporary file left
    state = recover(tmp_path, now_ms=NOW_MS)
    assert state.warnings == []
    assert sorted(state.data) == sorted(b"key-%d" % i for i in range(report["acked"]))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root and CAP_SYS_ADMIN; skipped without)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_full_and_then_read_only_filesystem_raise_and_keep_every_record(
    small_tmpfs: Path,
) -> None:
    shard = small_tmpfs / "shard"
    acked = 0
    with SegmentedLog(shard) as log:
        path = log.segments()[-1]
        while True:
            before = path.stat().st_size
            try:
                log.append(sets(acked, 10, b"v" * 200))
                log.sync()
            except OSError as exc:
                error = exc
                break
            acked += 10
        assert error.errno == errno.ENOSPC
        assert str(error) == f"[Errno 28] No space left on device: '{path}'"
        assert path.stat().st_size == before
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(OSError, match=r"Read-only file system") as info:
        SegmentedLog(shard)
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError, match=r"Read-only file system"):
        write_snapshot(shard, [(b"k", b"v", None)], covers=1)
    state = recover(shard, now_ms=NOW_MS)  # reading needs no write
    assert len(state.data) == acked > 0


@contextlib.contextmanager
def writes_denied(directory: Path) -> Iterator[None]:
    """Make ``directory`` read-only for this process, root included.

    chmod alone does not stop root (CAP_DAC_OVERRIDE), so as root the
    effective uid is switched to ``nobody`` for the duration (the real and
    saved uids stay root, so it can be switched back).
    """
    os.chmod(directory, 0o555)
    try:
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                yield
            finally:
                os.seteuid(0)
        else:
            yield
    finally:
        os.chmod(directory, 0o755)


def test_a_read_only_directory_raises_permission_errors_and_keeps_every_record() -> None:
    directory = Path(tempfile.mkdtemp(prefix="kvmemo-ro-"))  # reachable by nobody
    try:
        log = SegmentedLog(directory)
        log.append(sets(0, 2))
        log.sync()
        with writes_denied(directory):
            with pytest.raises(PermissionError, match=r"wal-00000002\.log'$"):
                log.rotate()
            log.append(sets(2, 1))  # the open segment stays writable
            log.sync()
            with pytest.raises(PermissionError, match=r"wal-00000002\.log'$"):
                SegmentedLog(directory)
            with pytest.raises(PermissionError, match=r"snap-00000001\.kvs\.tmp'$"):
                write_snapshot(directory, [(b"k", b"v", None)], covers=1)
            state = recover(directory, now_ms=NOW_MS)
        log.close()
        assert os.listdir(directory) == ["wal-00000001.log"]
        assert sorted(state.data) == [b"key-0", b"key-1", b"key-2"]
    finally:
        shutil.rmtree(directory)


def test_write_all_finishes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write may take only part of the buffer: write_all goes on until it is all out."""
    real_write = os.write
    calls: list[int] = []

    def at_most_three(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(wal.os, "write", at_most_three)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        wal.write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
    assert calls == [10, 7, 4, 1]
