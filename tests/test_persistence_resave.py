"""A failed fsync is made good by a snapshot (the re-save), not by the next fsync.

Why: after an ``fsync`` error Linux may drop the dirty pages it could not
write and report success to the next ``fsync`` ("fsyncgate"). A log segment
whose sync failed may therefore have lost bytes that writes acknowledged
(``everysec``), or that a multi-shard round's mark needs (``always``), even
though every later sync succeeds. The shard's memory still holds all of it,
so the shard owes a *re-save*: a snapshot started after the failure, which
makes the doubtful segment unnecessary. Until that snapshot is written the
shard reports ``failing`` health, and the marks that waited for the failed
sync keep their intents.

The store tests make one real ``os.fsync`` of a shard's log segment fail
(EIO) and let the real log handle it. To show what a crash would have
found, the data directory is copied at the end, and the segment whose sync
failed, if it is still there, has its bytes zeroed in the copy (what a
dropped page cache looks like after a power loss): a store opened on the
copy must still hold every acknowledged write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from test_engine_atomic import wait_running
from test_persistence_groupsync import hold_a_round, key_on_shard

import kvmemo
from actors import ActorCrashed
from kvmemo.errors import KVMemoError
from kvmemo.persistence import AppendFsync
from kvmemo.storage import durable_shard
from kvmemo.storage.durability import RESAVE_NOTE, Health, ShardDurability
from kvmemo.storage.durable_shard import SyncNow

SHARDS = 2
KEYS = 20  # acknowledged writes on the shard whose sync fails
FAST_INTERVAL = 0.01  # seconds between the background loop's checks, in these tests
WAIT = 20  # seconds a test waits at most for the re-save (a broken one must not hang)
NEEDS_PROC_FD = pytest.mark.skipif(
    not os.path.exists("/proc/self/fd"),
    reason="needs /proc/self/fd to tell a log segment's descriptor",
)


# -- the bookkeeping ----------------------------------------------------------------------


def durability(tmp_path: Path) -> ShardDurability:
    return ShardDurability(
        tmp_path, AppendFsync.ALWAYS, segment_bytes=1 << 20, snapshot_bytes=1 << 30
    )


def eio(path: str = "wal-00000001.log") -> OSError:
    return OSError(errno.EIO, "Input/output error", path)


def test_a_failed_sync_keeps_its_marks_unsettled_and_the_shard_failing_until_a_resave(
    tmp_path: Path,
) -> None:
    dur = durability(tmp_path)
    dur.appends = 3
    dur.unsynced_marks = [(7, 2), (9, 3)]
    dur.sync_failed(eio())
    assert dur.resave_pending
    assert dur.unsettled() == 7
    assert dur.health is Health.FAILING
    assert dur.error is not None
    assert dur.error.endswith(RESAVE_NOTE)

    # A later sync succeeds: it proves nothing about the failed one's bytes.
    dur.synced(dur.appends, time.time())
    assert (dur.health, dur.unsettled(), dur.resave_pending) == (Health.FAILING, 7, True)

    dur.resaved(dur.sync_failures)
    assert (dur.health, dur.error, dur.unsettled(), dur.resave_pending) == (
        Health.OK,
        None,
        0,
        False,
    )
    assert dur.info()["resave_pending"] is False


def test_a_snapshot_started_before_a_failure_does_not_cover_it(tmp_path: Path) -> None:
    dur = durability(tmp_path)
    dur.unsynced_marks = [(4, 1)]
    dur.sync_failed(eio())
    started_with = dur.sync_failures  # a snapshot starts here...
    dur.unsynced_marks = [(5, 2)]
    dur.sync_failed(eio("wal-00000002.log"))  # ...and a sync fails while it is written
    dur.resaved(started_with)
    assert dur.resave_pending
    assert dur.unsettled() == 5  # round 4 is in the snapshot; round 5 is not
    assert dur.health is Health.FAILING
    dur.resaved(started_with)  # the same snapshot again: nothing changes
    assert dur.unsettled() == 5
    dur.resaved(dur.sync_failures)
    assert (dur.resave_pending, dur.unsettled(), dur.health) == (False, 0, Health.OK)


def test_with_appendfsync_no_an_append_does_not_clear_an_owed_resave(tmp_path: Path) -> None:
    dur = ShardDurability(tmp_path, AppendFsync.NO, segment_bytes=1 << 20, snapshot_bytes=1 << 30)
    dur.sync_failed(eio())
    dur.appended(10, journal=False)
    assert dur.health is Health.FAILING


# -- a store whose log sync fails once ------------------------------------------------------


class FailOnce:
    """``os.fsync`` that fails once (EIO) for a log segment of one shard."""

    def __init__(self, shard_dir: str) -> None:
        self.pattern = f"/{shard_dir}/wal-"  # in the path of the descriptor to fail
        self.armed = False
        self.failed_path: Path | None = None
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        if self.armed:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if self.pattern in path:
                self.armed = False
                self.failed_path = Path(path)
                raise OSError(errno.EIO, "Input/output error")
        self._real(fd)


@pytest.fixture
def fail_once(monkeypatch: pytest.MonkeyPatch) -> FailOnce:
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell a log segment's descriptor")
    fake = FailOnce("shard-0")
    monkeypatch.setattr(os, "fsync", fake)
    monkeypatch.setattr(durable_shard, "SYNC_INTERVAL", FAST_INTERVAL)
    return fake


def resave_event(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """An event set once a re-save settled every failed sync of some shard."""
    event = trio.Event()
    real = ShardDurability.resaved

    def resaved(self: ShardDurability, failures: int) -> None:
        real(self, failures)
        if self.sync_failures and not self.resave_pending:
            event.set()

    monkeypatch.setattr(ShardDurability, "resaved", resaved)
    return event


def crash_copy(data_dir: Path, failed: Path | None, into: Path) -> Path:
    """The data directory as a crash would leave it, had the kernel dropped the failed pages."""
    shutil.copytree(data_dir, into)
    if failed is not None:
        copy = into / failed.relative_to(data_dir)
        if copy.exists():
            copy.write_bytes(bytes(copy.stat().st_size))
    return into


# With the commit log (the default fsync_method) a failed commit leaves no doubt
# and owes no re-save: see test_persistence_commitlog.
@pytest.mark.parametrize(("mode", "method"), [("everysec", "fsync"), ("always", "fsync")])
async def test_a_failed_log_sync_is_resaved_by_a_snapshot_and_nothing_acknowledged_is_lost(
    tmp_path: Path, fail_once: FailOnce, monkeypatch: pytest.MonkeyPatch, mode: str, method: str
) -> None:
    data_dir = tmp_path / "data"
    resaved = resave_event(monkeypatch)
    acknowledged: dict[bytes, bytes] = {}
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(
            shards=SHARDS, data_dir=str(data_dir), appendfsync=mode, fsync_method=method
        ) as kv:
            keys = [key_on_shard(kv, 0, prefix=f"k{i}") for i in range(KEYS)]
            if mode == "everysec":
                for key in keys:
                    await kv.set(key, b"v:" + key)  # acknowledged once appended
                    acknowledged[key] = b"v:" + key
                fail_once.armed = True
                with pytest.raises(KVMemoError) as failed:
                    await kv.system.ref("shard-0").ask(SyncNow())
                assert failed.value.kind == "IO"
            else:
                for key in keys[:-1]:
                    await kv.set(key, b"v:" + key)  # acknowledged once synced
                    acknowledged[key] = b"v:" + key
                fail_once.armed = True
                with pytest.raises(KVMemoError) as failed:
                    await kv.set(keys[-1], b"doubtful")
                assert failed.value.kind == "IO"
            assert fail_once.failed_path is not None
            info = (await kv.info("persistence"))["persistence"]
            assert info["failing_shards"] == ["shard-0"]
            [shard0] = [s for s in info["shards"] if s["shard"] == "shard-0"]
            assert shard0["resave_pending"] is True
            assert RESAVE_NOTE in shard0["error"]

            await kv.set(keys[0], b"after")  # the log works again: writes are acknowledged
            acknowledged[keys[0]] = b"after"
            await resaved.wait()  # the background loop asked for the snapshot, it is written

            info = (await kv.info("persistence"))["persistence"]
            assert (info["health"], info["failing_shards"]) == ("ok", [])
            assert not fail_once.failed_path.exists()  # covered by the snapshot, removed
            crashed = crash_copy(data_dir, fail_once.failed_path, tmp_path / "crashed")
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(crashed)) as kv:
        keys = sorted(acknowledged)
        assert await kv.mget(*keys) == [acknowledged[k] for k in keys]


# -- a shard killed while its failing sync runs; a disk that keeps failing ----------------------


class BlockThenFail:
    """``os.fsync`` that, once armed, holds shard-0's next segment fsync, then fails it (EIO)."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        if self.armed and "/shard-0/wal-" in os.readlink(f"/proc/self/fd/{fd}"):
            self.armed = False
            self.entered.set()
            self.release.wait(WAIT)
            raise OSError(errno.EIO, "Input/output error")
        self._real(fd)


@NEEDS_PROC_FD
async def test_a_shard_killed_while_its_failing_sync_runs_still_owes_the_resave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shard's sync is a follower in a round another request leads; killed
    # while the round runs it, the shard gets Cancelled, not the sync's error.
    fake = BlockThenFail()
    monkeypatch.setattr(os, "fsync", fake)
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(
            shards=SHARDS, data_dir=str(tmp_path), appendfsync="everysec"
        ) as kv:
            assert kv.engine.persistence is not None
            coord = kv.engine.persistence.sync_coordinator
            await kv.set(key_on_shard(kv, 0), b"v")  # the log is dirty: its sync has work
            async with trio.open_nursery() as nursery:
                gate = await hold_a_round(coord, nursery)
                nursery.start_soon(coord.sync, lambda: None)  # leads the next round
                nursery.start_soon(ask_sync_now, kv)  # shard-0's sync follows it
                await trio.testing.wait_all_tasks_blocked()
                assert coord.statistics().gathering == 2
                fake.armed = True
                gate.release.set()
                await trio.to_thread.run_sync(fake.entered.wait, WAIT)
                assert kv.kill_actor("shard-0")  # while its sync runs (and fails)
                fake.release.set()
            await wait_running(kv.system, "shard-0")
            dur = durability_of(kv, 0)
            assert dur.sync_failures == 1
            assert dur.resave_pending or dur.resaved_failures == 1


async def ask_sync_now(kv: kvmemo.Store) -> None:
    with contextlib.suppress(KVMemoError, ActorCrashed):
        await kv.system.ref("shard-0").ask(SyncNow())


def durability_of(kv: kvmemo.Store, shard: int) -> ShardDurability:
    return kv.engine._durabilities[shard]


@NEEDS_PROC_FD
async def test_a_resave_on_a_disk_that_keeps_failing_is_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    real = os.fsync
    broken = False

    def fsync(fd: int) -> None:
        if broken and "/shard-0/wal-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    shard_dir = tmp_path / "shard-0"
    async with kvmemo.open_store(
        shards=SHARDS, data_dir=str(tmp_path), appendfsync="everysec"
    ) as kv:
        await kv.set(key_on_shard(kv, 0), b"v")
        before = len(list(shard_dir.glob("wal-*.log")))
        broken = True
        await trio.sleep(120)  # virtual seconds: once a second, 120 tries and segments
        tried = len(list(shard_dir.glob("wal-*.log"))) - before  # each try rotates once
        assert 3 <= tried <= 9  # after 1, 2, 4, ... 60 s
        assert durability_of(kv, 0).resave_pending
        broken = False
