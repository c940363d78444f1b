"""``fsync_method="syncfs"``: a sync round writes every batch, then syncs each file system once.

These tests check what the round does (which calls, in which order, what
each request is told) and the store's bookkeeping around it; that
``syncfs(2)`` makes the data durable is the kernel's contract (Linux 5.17+
also reports write-back errors through it), which a test here cannot crash
a machine to check.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_persistence_groupsync import (
    coordinator_of,
    key_on_shard,
    write_each_shard_in_one_round,
    writer,
)

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.persistence import SegmentedLog
from kvmemo.persistence import wal as wal_module
from kvmemo.persistence.records import encode_set
from kvmemo.storage import sync_coordinator
from kvmemo.storage.durability import LogBatch
from kvmemo.storage.durable_shard import _RecordedSync
from kvmemo.storage.sync_coordinator import LogWrite, SyncCoordinator, _syncfs_round

pytestmark = pytest.mark.skipif(
    wal_module.syncfs_supported() is not None, reason="syncfs cannot be used here"
)


class Append(LogWrite):
    """Appends ``data`` to ``log``; records what the round told it."""

    def __init__(self, log: SegmentedLog, data: bytes = b"", fail: OSError | None = None):
        self.log = log
        self.data = data
        self.fail = fail
        self.outcome: list[OSError | None] = []

    def write(self) -> SegmentedLog:
        if self.fail is not None:
            raise self.fail
        if self.data:
            self.log.append_encoded(self.data)
        return self.log

    def done(self, error: OSError | None) -> None:
        self.outcome.append(error)


@pytest.fixture
def syncfs_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors each ``syncfs`` of a round was given (the real call still runs)."""
    calls: list[int] = []
    real = sync_coordinator.syncfs

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(sync_coordinator, "syncfs", counted)
    return calls


def record(n: int) -> bytes:
    return encode_set(b"k%d" % n, b"v")


def test_a_round_writes_every_log_then_syncs_their_file_system_once(
    tmp_path: Path, syncfs_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = [SegmentedLog(tmp_path / f"log-{i}") for i in range(3)]
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    ran: list[str] = []
    calls: list[Any] = [Append(logs[0], record(0)), Append(logs[1], record(1))]
    calls += [lambda: ran.append("plain"), Append(logs[0], record(2)), Append(logs[2])]
    try:
        assert _syncfs_round(calls) == [None] * 5
        assert len(syncfs_calls) == 1  # one file system: one syncfs for the three logs
        assert fsyncs == []  # and no fsync at all, the new segments' directories included
        assert ran == ["plain"]
        assert [c.outcome for c in calls if isinstance(c, Append)] == [[None]] * 4
        # The same log twice in the round: synced once, and its sync lock was
        # released (a second begin would have deadlocked the round).
        for log in logs:
            log.finish_sync(log.begin_sync(), None)
    finally:
        for log in logs:
            log.close()


def test_a_failed_syncfs_fails_every_log_of_its_round_and_names_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sync_coordinator, "syncfs", failing)
    logs = [SegmentedLog(tmp_path / f"log-{i}") for i in range(2)]
    refused = OSError(errno.ENOSPC, "No space left on device")
    calls = [Append(logs[0], record(0)), Append(logs[1], record(1)), Append(logs[1], fail=refused)]
    try:
        errors = _syncfs_round(calls)
        assert errors[2] is refused  # its write failed: only its own error
        for i in (0, 1):
            error = errors[i]
            assert isinstance(error, OSError)
            assert error.errno == errno.EIO
            assert f"log-{i}" in str(error)  # named after its own log
            assert calls[i].outcome == [error]
        assert calls[2].outcome == [refused]
        for log in logs:  # failed, as after an fsync error: the next append starts anew
            with pytest.raises(wal_module.LogFailedError):
                log.sync()
    finally:
        for log in logs:
            log.close()


def test_a_round_interrupted_before_its_syncs_tells_nobody_durable_and_frees_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sync_coordinator, "syncfs", broken)
    log = SegmentedLog(tmp_path / "log")
    call = Append(log, record(0))
    try:
        with pytest.raises(RuntimeError):
            _syncfs_round([call])
        assert call.outcome == []
        log.sync()  # not left locked, not failed
    finally:
        log.close()


def test_the_method_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"^method must be fsync, syncfs or commitlog, got 'fdatasync'$"
    ):
        SyncCoordinator(method="fdatasync")
    with pytest.raises(ValueError, match=r"^the commitlog method needs the data directory$"):
        SyncCoordinator(method="commitlog")
    with pytest.raises(
        ValueError, match=r"^fsync_method must be commitlog, fsync or syncfs, got 'sync'$"
    ):
        StoreConfig(fsync_method="sync")
    assert StoreConfig().fsync_method == "commitlog"


def test_syncfs_is_refused_before_linux_5_8(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()
    old = os.uname_result((real.sysname, real.nodename, "5.4.0-150-generic", *real[3:]))
    monkeypatch.setattr(os, "uname", lambda: old)
    monkeypatch.setattr(wal_module, "_libc", None)  # as in a process that never checked
    message = r"^syncfs needs Linux 5.17 or later \(errors are not reported before\), got 5.4.0"
    with pytest.raises(ValueError, match=message):
        StoreConfig(fsync_method="syncfs")
    with pytest.raises(OSError, match="syncfs needs Linux 5.17"):
        wal_module.syncfs(0)


async def test_acknowledged_writes_of_a_syncfs_store_are_there_after_a_reopen(
    tmp_path: Path, syncfs_calls: list[int]
) -> None:
    data_dir = str(tmp_path)
    settings = {"shards": 4, "data_dir": data_dir, "appendfsync": "always"}
    async with kvmemo.open_store(**settings, fsync_method="syncfs") as kv:
        assert coordinator_of(kv).method == "syncfs"
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(kv.set, f"k{i}", f"v{i}")
        await kv.mset({f"m{i}": "m" for i in range(20)})  # a multi-shard round: its intent too
        assert await kv.execute("save") == "OK"
        await kv.set("after-save", "x")
        rounds = coordinator_of(kv).statistics().rounds
        assert 0 < len(syncfs_calls) <= rounds
        assert (await kv.info("persistence"))["persistence"]["health"] == "ok"
    async with kvmemo.open_store(**settings) as kv:
        assert await kv.mget(*(f"k{i}" for i in range(200))) == [
            f"v{i}".encode() for i in range(200)
        ]
        assert await kv.mget(*(f"m{i}" for i in range(20))) == [b"m"] * 20
        assert await kv.get("after-save") == b"x"


async def test_a_failed_syncfs_fails_every_batch_of_its_round_and_each_shard_resaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sync_coordinator.syncfs
    failures = [OSError(errno.EIO, "Input/output error")]

    def syncfs(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(sync_coordinator, "syncfs", syncfs)
    data_dir = str(tmp_path)
    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        async with kvmemo.open_store(
            shards=4, data_dir=data_dir, appendfsync="always", fsync_method="syncfs"
        ) as kv:
            coord = coordinator_of(kv)
            keys = [key_on_shard(kv, shard) for shard in range(4)]
            await write_each_shard_in_one_round(kv, coord, writer(kv, keys, outcomes))
            assert outcomes == dict.fromkeys(range(4), "IO None")
            info = (await kv.info("persistence"))["persistence"]
            assert info["failing_shards"] == [f"shard-{i}" for i in range(4)]
            assert all(s["resave_pending"] for s in info["shards"])
            assert await kv.execute("save") == "OK"  # the re-save makes them good
            assert (await kv.info("persistence"))["persistence"]["health"] == "ok"
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*keys) == [b"v"] * 4


def test_the_method_is_a_setting() -> None:
    from test_cli import resolved

    assert resolved([], {}).store.fsync_method == "commitlog"
    assert resolved(["--fsync-method", "syncfs"], {}).store.fsync_method == "syncfs"
    assert resolved(["--fsync-method", "fsync"], {}).store.fsync_method == "fsync"
    assert resolved([], {"KVMEMO_FSYNC_METHOD": "syncfs"}).store.fsync_method == "syncfs"


def test_a_batch_its_shard_took_back_is_not_told_durable_by_the_round(
    tmp_path: Path, syncfs_calls: list[int]
) -> None:
    log = SegmentedLog(tmp_path / "log")
    batch = LogBatch(log, record(0))
    try:
        assert batch.take_back()  # the shard was killed first: appended, not synced
        assert _syncfs_round([batch]) == [None]
        assert (batch.appended, batch.synced, batch.error) == (True, False, None)
        assert syncfs_calls == []  # nothing of the round's own to sync
    finally:
        log.close()


# -- a real write-back failure (root only: an ext4 on a loop device over a small tmpfs) --------


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[tuple[Path, Callable[[bool], None]]]:
    """(a mounted ext4, ``failing(on)``): a full tmpfs under its loop device fails write-back."""
    if os.geteuid() != 0 or not all(map(shutil.which, ("losetup", "mkfs.ext4", "mount"))):
        pytest.skip("needs root, losetup and mkfs.ext4")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(backing))
    except (subprocess.CalledProcessError, OSError):
        pytest.skip("cannot mount a tmpfs here")
    loop = ""
    try:
        _run("truncate", "-s", "64M", str(backing / "disk.img"))
        loop = _run("losetup", "-f", "--show", str(backing / "disk.img"))
        _run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        _run("mount", loop, str(mnt))
    except (subprocess.CalledProcessError, OSError) as exc:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", str(backing)], check=False)
        pytest.skip(f"cannot set up a loop device here: {exc}")
    filler = backing / "filler"

    def failing(on: bool) -> None:
        if not on:
            filler.unlink()
            return
        with open(filler, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()

    try:
        yield mnt, failing
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", "-l", str(backing)], check=False)


def test_a_log_whose_write_back_failed_hears_it_in_a_later_round_through_its_own_descriptor(
    failing_disk: tuple[Path, Callable[[bool], None]],
) -> None:
    # B's pages fail to write back during a round that syncs only A. The
    # next round's syncfs goes through A's new segment, whose descriptor
    # never saw the error: B must still be told, as its own fsync would be.
    mnt, failing = failing_disk
    a, b = SegmentedLog(mnt / "shard-a"), SegmentedLog(mnt / "shard-b")
    try:
        assert _syncfs_round([_RecordedSync(a), _RecordedSync(b)]) == [None, None]
        b.append_encoded(b"".join(encode_set(b"k%d" % i, b"v" * 100) for i in range(5000)))
        a.append_encoded(encode_set(b"a", b"1"))
        failing(True)
        (error,) = _syncfs_round([_RecordedSync(a)])
        assert isinstance(error, OSError)
        failing(False)
        a.append_encoded(encode_set(b"a", b"2"))  # A goes on in a new segment
        told_a, told_b = _RecordedSync(a), _RecordedSync(b)
        result = _syncfs_round([told_a, told_b])
        assert result[0] is None
        assert isinstance(result[1], OSError)
        assert told_b.error is result[1]
        assert "shard-b" in str(told_b.error)
    finally:
        a.close()
        b.close()


async def test_with_syncfs_no_log_of_a_multi_shard_write_is_fsynced_on_its_own(
    tmp_path: Path, syncfs_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The intent log of an MSET's round, like the shards' logs, is synced by the syncfs."""
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    async with kvmemo.open_store(
        shards=4, data_dir=str(tmp_path), appendfsync="always", fsync_method="syncfs"
    ) as kv:
        await kv.mset({f"m{i}": "m" for i in range(20)})  # opens every log, the intents' too
        before = len(syncfs_calls)
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", fsync)
            for n in range(3):
                assert await kv.mset({f"m{i}": str(n) for i in range(20)}) == "OK"
        assert len(syncfs_calls) > before
        assert fsynced == []
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
        assert await kv.mget(*(f"m{i}" for i in range(20))) == [b"2"] * 20
