"""Persistence, stop 23: a shard whose log could not open recovers without a write."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from test_persistence_disk import key_on_shard, remount, tmpfs  # noqa: F401 (fixture)

import kvmemo
from kvmemo.errors import KVMemoError
from kvmemo.storage.durable_shard import SYNC_INTERVAL


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run idles 10 ms (fsync threads need real moments)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def _health(kv: kvmemo.Store) -> tuple[str, list[str]]:
    info = (await kv.info("persistence"))["persistence"]
    return info["health"], info["failing_shards"]


async def _until_healthy(kv: kvmemo.Store) -> None:
    """A few of the background loop's seconds (virtual), until the health is ok."""
    for _ in range(5):
        await trio.sleep(SYNC_INTERVAL)
        if (await _health(kv))[0] == "ok":
            return
    raise AssertionError(f"still {await _health(kv)} after 5 s")


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
async def test_an_idle_shard_recovers_once_its_directory_is_writable_again(
    tmpfs: Path,  # noqa: F811
    appendfsync: str,
    clock: trio.testing.MockClock,
) -> None:
    """Read-only at start, writable later: /healthz said 503 until each shard got a write."""
    data_dir = tmpfs / "data"
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync=appendfsync) as kv:
        await kv.set("kept", "1")
    await remount(tmpfs, "ro")
    try:
        async with kvmemo.open_store(
            shards=2, data_dir=str(data_dir), appendfsync=appendfsync
        ) as kv:
            assert await _health(kv) == ("failing", ["shard-0", "shard-1"])
            await remount(tmpfs, "rw")
            await _until_healthy(kv)  # no write: the background loop's tries
            assert await kv.get("kept") == b"1"
            await kv.set("after", "2")  # writes work again, and last
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
            assert await kv.mget("kept", "after") == [b"1", b"2"]
    finally:
        await remount(tmpfs, "rw")


async def test_a_write_refused_while_read_only_reaches_the_log_once_writable(
    tmpfs: Path,  # noqa: F811
    clock: trio.testing.MockClock,
) -> None:
    """The refused write (IO, applied: None) is in memory: the reopened log gets it."""
    data_dir = tmpfs / "data"
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
        await kv.set("kept", "1")
    await remount(tmpfs, "ro")
    try:
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
            with pytest.raises(KVMemoError) as refused:
                await kv.mset({"a": "x", "b": "y"})  # one shard: one batch
            assert refused.value.kind == "IO"
            await remount(tmpfs, "rw")
            await _until_healthy(kv)
            memory = await kv.mget("a", "b")
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
            assert await kv.mget("a", "b") == memory
            assert await kv.get("kept") == b"1"
    finally:
        await remount(tmpfs, "rw")
