"""Review s21: regression tests for the defects found in 85e08df and 2d8d3b3."""

from __future__ import annotations

import contextlib
import errno
import os
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from test_persistence_disk import key_on_shard

import kvmemo
from actors import EventKind
from kvmemo.commands import ops
from kvmemo.engine.engine import EVICTION_MANAGER, shard_name
from kvmemo.errors import KVMemoError
from kvmemo.persistence.intents import INTENT_DIR
from kvmemo.persistence.records import FORMAT_VERSION, NewerVersion, encode_set
from kvmemo.persistence.recovery import CorruptLog
from kvmemo.persistence.wal import SegmentedLog, segment_name
from kvmemo.storage.shard import Barrier, Hold

BIG = b"x" * 2000
TIMEOUT = 30  # seconds per test


async def test_a_write_resent_after_making_room_then_timed_out_is_a_timeout_not_oom(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batched write that needed memory is resent once room is made; when the
    batch then times out waiting for the shard, the write may yet run (it is in
    the shard's mailbox): it must be TIMEOUT (applied unknown), never the
    NeedMemory of its first try (OOM: certainly not applied)."""
    async with kvmemo.open_store(
        shards=1, maxmemory=64 * 1024, request_timeout=0.5, hold_timeout=2.0
    ) as kv:
        engine = kv.engine
        ref = kv.system.ref(shard_name(0))
        engine.tracker.set_limit(1)  # every new write needs memory
        held: list[object] = []

        async def make_room(nbytes: int, budget: object) -> bool:
            # The shard gets busy (an atomic write whose other half never
            # comes), and room is made: the resend waits behind the hold.
            part = ops.MSet([(b"other", b"x")], only_new=False).part([0])
            held.append(ref.ask_nowait(Hold(Barrier(2), 0, part)))
            engine.tracker.set_limit(64 * 1024)
            return True

        engine._make_room = make_room  # type: ignore[method-assign]
        (result,) = await kv.execute_many(("set", "k", BIG))
        assert isinstance(result, KVMemoError)
        assert result.kind == "TIMEOUT", result
        assert result.data["applied"] is None
        await trio.sleep(3)  # the hold gives up; the resent write runs
        assert await kv.get("k") == BIG


# -- 2d8d3b3: a newer file stops the start only after other files were repaired ----------------


def _newer_record() -> bytes:
    """A whole record of a newer format version, its CRC right (see test_persistence_s21)."""
    body = bytes([FORMAT_VERSION + 1, 42]) + (5).to_bytes(4, "little") + b"newer"
    return zlib.crc32(body).to_bytes(4, "little") + body


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


async def _run(data_dir: Path, body: Callable[[kvmemo.Store], Awaitable[None]]) -> None:
    """One run of a 2-shard store on ``data_dir`` that stops without its final snapshot."""
    async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
        await body(kv)
        kv.engine.skip_final_snapshot()


async def test_a_newer_file_refuses_the_start_before_a_repair_changes_any_other_file(
    tmp_path: Path,
) -> None:
    """Shard 0 needs a repair (a segment is missing), shard 1 holds a record of a
    newer format version: the start is refused with or without --repair, and
    before anything is written. Was: shard 0 was repaired first (its segments
    replaced by a snapshot, which drops its round marks), and then the
    multi-shard write still in the intent log was redone over shard 0's later
    write at the next start: a lost update."""
    data_dir = tmp_path / "data"
    with trio.fail_after(TIMEOUT):
        k0 = k1 = b""

        async def first(kv: kvmemo.Store) -> None:
            nonlocal k0, k1
            k0, k1 = key_on_shard(kv, 0, "a"), key_on_shard(kv, 1, "b")
            await kv.set(k0, b"run1")

        async def second(kv: kvmemo.Store) -> None:
            await kv.set(k0, b"run2")

        async def third(kv: kvmemo.Store) -> None:
            await kv.mset({k0: b"old", k1: b"old"})  # a multi-shard round: an intent
            await kv.set(k0, b"new")

        await _run(data_dir, first)
        await _run(data_dir, second)
        await _run(data_dir, third)
        shard0, shard1 = data_dir / "shard-0", data_dir / "shard-1"
        (shard0 / segment_name(2)).unlink()  # damage a repair can only work around
        last = max(shard1.glob("wal-*.log"))
        size = last.stat().st_size
        with last.open("ab") as file:
            file.write(_newer_record())
        before = _files(data_dir)
        # Without repair, shard 0's damage may be named first; nothing changes either way.
        with pytest.raises((NewerVersion, CorruptLog)):
            async with kvmemo.open_store(shards=2, data_dir=str(data_dir)):
                pass
        assert _files(data_dir) == before
        with pytest.raises(NewerVersion):
            async with kvmemo.open_store(shards=2, data_dir=str(data_dir), repair=True):
                pass
        assert _files(data_dir) == before, "the repair changed files before the refusal"
        # The newer build's record taken away (as if it had never run), the
        # repair goes ahead: shard 0 keeps its last write.
        os.truncate(last, size)
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), repair=True) as kv:
            assert await kv.get(k0) == b"new"
            assert await kv.get(k1) == b"old"


async def test_a_newer_intent_refuses_the_start_before_a_torn_tail_is_cut(tmp_path: Path) -> None:
    """The intent log is read after every shard: a newer record there must stop
    the start before recovery cuts a shard's torn tail (was: cut first)."""
    data_dir = tmp_path / "data"
    with trio.fail_after(TIMEOUT):

        async def some(kv: kvmemo.Store) -> None:
            await kv.set(key_on_shard(kv, 0, "a"), b"v")

        await _run(data_dir, some)
        last = max((data_dir / "shard-0").glob("wal-*.log"))
        with last.open("ab") as file:
            file.write(encode_set(b"torn", b"value")[:-3])  # a crash during an append
        intents = data_dir / INTENT_DIR
        intents.mkdir(exist_ok=True)
        (intents / segment_name(99)).write_bytes(_newer_record())
        before = _files(data_dir)
        for repair in (False, True):
            with pytest.raises(NewerVersion):
                async with kvmemo.open_store(shards=2, data_dir=str(data_dir), repair=repair):
                    pass
            assert _files(data_dir) == before, f"repair={repair}: a file changed"


# -- a full disk must not take the managers down ------------------------------------------------


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every append to a shard log fails as on a full disk (until monkeypatch.undo)."""

    def fail(self: SegmentedLog, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    monkeypatch.setattr(SegmentedLog, "append_encoded", fail)


def _crashes(kv: kvmemo.Store, name: str) -> int:
    return kv.system.events.count(name, EventKind.CRASHED)


async def test_eviction_on_a_full_disk_keeps_the_eviction_manager_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """The shard fails the reply of an eviction's deletes (or of its candidates)
    with IO when its batch cannot be logged: eviction must go on (the keys are
    gone from memory). Was: the eviction manager crashed on it, five times, and
    its temporary subtree gave up: every write got OOM for good, the disk back
    or not. (The clock stands still: a crashed manager stays down.)"""
    async with kvmemo.open_store(
        shards=1, data_dir=str(tmp_path / "data"), maxmemory=200_000
    ) as kv:
        _disk_full(monkeypatch)
        for i in range(3000):
            with contextlib.suppress(KVMemoError):
                await kv.set(b"k%06d" % i, b"v" * 200)
        monkeypatch.undo()  # the disk has room again
        assert _crashes(kv, EVICTION_MANAGER) == 0
        for i in range(3000, 4000):
            assert await kv.set(b"k%06d" % i, b"v" * 200) == "OK"


async def test_an_expiry_sweep_on_a_full_disk_does_not_fail_the_ttl_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """An expiry sweep whose deletes cannot be logged: the shard fails its reply
    with IO. Was: the sweep raised it, and the TTL manager (a permanent child of
    the root, whose restart intensity it spends) crashed on it."""
    async with kvmemo.open_store(shards=1, data_dir=str(tmp_path / "data")) as kv:
        _disk_full(monkeypatch)
        for i in range(100):
            with contextlib.suppress(KVMemoError):
                await kv.execute("set", b"t%d" % i, b"v", "PX", "100")
        mock_clock.jump(1)
        ref = kv.system.ref(shard_name(0))
        # A write in the same drained batch as the sweep: the batch cannot be
        # logged, and the shard fails every reply of it, the sweep's too.
        write = ref.ask_nowait(ops.PlainSet(b"w", b"v"))
        await kv.engine.process_expired()  # what the TTL manager runs each tick
        with pytest.raises(KVMemoError):
            await write.wait()
        write = ref.ask_nowait(ops.PlainSet(b"w", b"v"))
        assert await kv.engine.reconcile_ttl() == 0
        with pytest.raises(KVMemoError):
            await write.wait()
        assert await kv.dbsize() == 1  # the 100 expired all the same (in memory)
