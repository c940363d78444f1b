"""Review of the background reopen of a shard's log (stop 23): what it writes, and when."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_engine_atomic import wait_running
from test_persistence_disk import remount, tmpfs  # noqa: F401 (fixture)
from test_persistence_intents import K0, K1, ROUND_7, crash_state, rebuilt_after_round_7
from test_persistence_s23 import _health, _until_healthy

import kvmemo
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence import encode_set
from kvmemo.persistence.records import encode_intent, encode_txn
from kvmemo.storage.durable_shard import (
    DurableShardActor,
    PersistenceConfig,
    durable_state_factory,
    recover_store,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run idles 10 ms (fsync threads need real moments)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_a_reopened_log_heads_with_no_mark_of_a_round_still_waiting_in_the_journal(
    tmpfs: Path,  # noqa: F811
    clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash just after the reopen (head synced, the redo not yet appended) keeps the round.

    Read-only at start, shard 0 redoes its part of round 7 in memory only (its
    journal holds the records, then the mark). Before, the reopen wrote that
    mark at the head of the new segment, ahead of the records: a crash there
    left a log saying round 7 was in it, so recovery did not redo it.
    """
    data_dir = tmpfs / "data"
    crash_state(
        data_dir,
        shard0=b"",  # its part of round 7 never reached its log
        shard1=encode_set(K1, b"new") + encode_txn(7, True),
        intents=encode_intent(7, ROUND_7),
    )
    crashed = tmpfs.parent / "crashed"
    opened = DurableShardActor._open_log
    reopened = trio.Event()

    async def open_then_crash(self: DurableShardActor) -> bool:
        done = await opened(self)
        if done and self.store.shard_id == 0 and not crashed.exists():
            shutil.copytree(data_dir, crashed)  # the files a crash right here leaves
            reopened.set()
        return done

    monkeypatch.setattr(DurableShardActor, "_open_log", open_then_crash)
    await remount(tmpfs, "ro")
    try:
        # No expiry sweep: the sweep's message to shard 0 would have its
        # mailbox append the journal (opening the log) before the background loop tries.
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), ttl_tick=3600) as kv:
            await remount(tmpfs, "rw")
            with trio.fail_after(5):  # no message meanwhile: only the background loop opens
                await reopened.wait()
            await _until_healthy(kv)
            assert await kv.get(K0) == b"new"  # redone in memory
    finally:
        await remount(tmpfs, "rw")
    assert crashed.exists()
    monkeypatch.undo()
    async with kvmemo.open_store(shards=2, data_dir=str(crashed)) as kv:
        assert await kv.mget(K0, K1) == [b"new", b"new"]


async def test_a_shard_whose_head_mark_could_not_be_written_at_start_recovers_without_a_write(
    tmpfs: Path,  # noqa: F811
    clock: trio.testing.MockClock,
) -> None:
    """Full at start: the log opened (an empty segment needs no space), its head mark did not.

    Before, the log stayed open with its health failing and the background
    loop retried only a log that was not open: an idle shard stayed failing
    (/healthz 503) however long after space was freed.
    """
    data_dir = tmpfs / "data"
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        await kv.mset({K0: b"a", K1: b"b"})  # a multi-shard round: each log holds its mark
    ballast = tmpfs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, bytes(4096))
    os.close(fd)
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        assert await _health(kv) == ("failing", ["shard-0", "shard-1"])
        ballast.unlink()
        await _until_healthy(kv)
        await kv.set(K0, b"c")
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        assert await kv.mget(K0, K1) == [b"c", b"b"]


async def test_a_rebuilt_shard_heads_its_new_segment_with_its_logs_mark_not_its_redos(
    tmp_path: Path,
) -> None:
    """on_start's rebuild: the redo waits in the journal, so its mark may not head the log.

    Before, the new segment opened with round 7's mark (synced) while round
    7's records waited for the shard's next batch: a crash meanwhile left a
    log claiming round 7, which recovery then did not redo.
    """
    store, config = rebuilt_after_round_7(tmp_path)
    await recover_store(store, config, repair=True)
    assert store.journal is not None
    assert store.journal.last_txid == 7  # resolved here: the redo waits in the journal
    assert store.journal.head() == b""  # the log holds no mark yet
    store.journal.take()
    assert store.durability is not None
    store.durability.appended(len(store.journal.taken_data))  # the redo reaches the log
    assert store.journal.head() == encode_txn(7, True)


async def test_a_kill_during_the_reopens_head_sync_leaves_no_idle_shard_failing(
    tmpfs: Path,  # noqa: F811
    clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``always``: killed while the background loop synced the new segment's head mark.

    Before, the restarted shard found its log open (so the background loop
    never tried again) and dirty, and with ``always`` nothing syncs an idle
    log: it stayed failing until its next write.
    """
    data_dir = tmpfs / "data"
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync="always") as kv:
        await kv.mset({K0: b"a", K1: b"b"})  # each log holds a round mark: a head is due
    entered, release = trio.Event(), trio.Event()
    armed = False
    sync = DurableShardActor._sync

    async def gated_sync(self: DurableShardActor) -> Any:
        if armed and self.store.shard_id == 0:
            entered.set()
            await release.wait()  # cancelled by the kill
        return await sync(self)

    monkeypatch.setattr(DurableShardActor, "_sync", gated_sync)
    await remount(tmpfs, "ro")
    try:
        async with kvmemo.open_store(
            shards=2, data_dir=str(data_dir), appendfsync="always", ttl_tick=3600
        ) as kv:
            assert await _health(kv) == ("failing", ["shard-0", "shard-1"])
            armed = True
            await remount(tmpfs, "rw")
            with trio.fail_after(5):
                await entered.wait()  # the background loop's reopen syncs the head
            assert kv.kill_actor("shard-0")
            armed = False
            await wait_running(kv.system, "shard-0")
            await _until_healthy(kv)
            assert await kv.get(K0) == b"a"
    finally:
        await remount(tmpfs, "rw")


async def test_reads_work_on_a_read_only_start_that_redid_a_round_in_memory(
    tmpfs: Path,  # noqa: F811
) -> None:
    """The redo waiting in shard 0's journal is not a read's to fail for.

    Before, every batch of shard 0, reads too, failed with IO while the redo
    could not be logged: its bytes counted as the batch's own.
    """
    data_dir = tmpfs / "data"
    crash_state(
        data_dir,
        shard0=b"",
        shard1=encode_set(K1, b"new") + encode_txn(7, True),
        intents=encode_intent(7, ROUND_7),
    )
    await remount(tmpfs, "ro")
    try:
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
            assert await kv.mget(K0, K1) == [b"new", b"new"]
            with pytest.raises(KVMemoError) as refused:
                await kv.set(K0, b"x")
            assert refused.value.kind == "IO"
    finally:
        await remount(tmpfs, "rw")
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        assert (await kv.mget(K0, K1))[1] == b"new"
        assert await kv.get(K0) in (b"new", b"x")  # the refused write: may or may not last


async def test_a_rebuild_forgets_the_carried_bytes_of_the_records_it_dropped(
    tmp_path: Path,
) -> None:
    """A failed round's records carried in the journal, then a rebuild: the count goes too.

    Before, the count outlived the records: the next batch, smaller, was not
    its own (``own`` False), so a failed append of it acknowledged its writes.
    """
    config = PersistenceConfig(tmp_path)
    initial, _, _ = durable_state_factory(
        0, MemoryTracker(0, 1), lambda: make_policy("lru"), config, {}
    )
    store = initial()
    journal = store.journal
    assert journal is not None
    journal.set(b"k", b"v" * 100, None)
    journal.mark(1, True)
    journal.take()
    journal.requeue_taken(1 << 20)  # the batch's append failed: carried to the next
    assert journal.carried > 0
    await recover_store(store, config, repair=True)
    journal.set(b"k", b"w", None)  # the next batch's own write
    journal.take()
    assert journal.own
