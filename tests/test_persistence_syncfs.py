"""``fsync_method="syncfs"``: a sync round writes every batch, then syncs each file system once.

These tests check what the round does (which calls, in which order, what
each request is told) and the store's bookkeeping around it; that
``syncfs(2)`` makes the data durable is the kernel's contract (Linux 5.8+
also reports write-back errors through it), which a test here cannot crash
a machine to check.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_persistence_groupsync import coordinator_of, hold_a_round, key_on_shard, writer

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.persistence import SegmentedLog
from kvmemo.persistence import wal as wal_module
from kvmemo.persistence.records import encode_set
from kvmemo.storage import sync_coordinator
from kvmemo.storage.durability import LogBatch
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
    with pytest.raises(ValueError, match=r"^method must be fsync or syncfs, got 'fdatasync'$"):
        SyncCoordinator(method="fdatasync")
    with pytest.raises(ValueError, match=r"^fsync_method must be fsync or syncfs, got 'sync'$"):
        StoreConfig(fsync_method="sync")
    assert StoreConfig().fsync_method == "fsync"


def test_syncfs_is_refused_before_linux_5_8(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()
    old = os.uname_result((real.sysname, real.nodename, "5.4.0-150-generic", *real[3:]))
    monkeypatch.setattr(os, "uname", lambda: old)
    message = r"^syncfs needs Linux 5.8 or later \(errors are not reported before\), got 5.4.0"
    with pytest.raises(ValueError, match=message):
        StoreConfig(fsync_method="syncfs")
    with pytest.raises(OSError, match="syncfs needs Linux 5.8"):
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
            write = writer(kv, keys, outcomes)
            async with trio.open_nursery() as nursery:
                gate = await hold_a_round(coord, nursery)
                for shard in range(4):
                    nursery.start_soon(write, shard)
                await trio.testing.wait_all_tasks_blocked()
                assert coord.statistics().gathering == 4  # the next round holds all four
                gate.release.set()
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

    assert resolved([], {}).store.fsync_method == "fsync"
    assert resolved(["--fsync-method", "syncfs"], {}).store.fsync_method == "syncfs"
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
