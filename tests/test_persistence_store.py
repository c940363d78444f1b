"""Persistence through the store: writes survive a restart, SAVE, rebuilds from disk."""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import kvmemo
from actors import EventKind
from kvmemo.errors import KVMemoError
from kvmemo.persistence.records import Op, decode_stream
from kvmemo.persistence.wal import list_segments
from kvmemo.storage.shard import Inspect


async def test_acknowledged_writes_survive_a_restart_with_appendfsync_always(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync="always") as kv:
            await kv.mset({f"k{i}": f"v{i}" for i in range(200)})
            await kv.set("ttl", "x", ex=3600)
            await kv.incr("counter")
            await kv.incr("counter")
            await kv.delete("k0")
            await kv.append("k1", "+more")
            await kv.expire("k2", -1)  # in the past: deleted
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
            assert await kv.get("k0") is None
            assert await kv.get("k1") == b"v1+more"
            assert await kv.get("k2") is None
            assert await kv.get("k199") == b"v199"
            assert await kv.get("counter") == b"2"
            assert 3500 < await kv.ttl("ttl") <= 3600
            assert await kv.dbsize() == 200  # 200 - k0 - k2 + ttl + counter


async def test_save_writes_a_snapshot_per_shard_and_compacts_the_log(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            for i in range(100):
                await kv.set(f"key{i}", "x" * 50)
            assert await kv.execute("save") == "OK"
            info = (await kv.info("persistence"))["persistence"]
            assert info["enabled"] is True
            assert info["last_save"] is not None
            assert info["health"] == "ok"
            await kv.set("after-save", "1")
        for shard in ("shard-0", "shard-1"):
            assert list((tmp_path / shard).glob("snap-*.kvs")), "a snapshot per shard"
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.dbsize() == 101
            assert await kv.get("key42") == b"x" * 50
            assert await kv.get("after-save") == b"1"


async def test_save_without_persistence_is_disabled() -> None:
    async with kvmemo.open_store(shards=1) as kv:
        with pytest.raises(kvmemo.KVMemoError) as err:
            await kv.execute("save")
        assert err.value.kind == "DISABLED"


async def test_a_shard_whose_state_is_corrupt_reloads_from_disk_while_others_serve(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync="always") as kv:
            for i in range(100):
                await kv.set(f"key{i}", f"value{i}")
            shard = kv.engine.slots.shard_of(b"key7")
            ref = kv.system.ref(f"shard-{shard}")

            def corrupt(store: object) -> None:
                store.data[b"key7"] = "not bytes"  # type: ignore[attr-defined]

            await ref.ask(Inspect(corrupt))
            other = next(
                f"key{i}"
                for i in range(100)
                if kv.engine.slots.shard_of(f"key{i}".encode()) != shard
            )
            async with kv.system.events.subscribe() as events:
                kv.kill_actor(f"shard-{shard}")
                # The other shards serve while this one reloads its own files.
                assert await kv.get(other) is not None
                async for event in events:
                    if event.actor == f"shard-{shard}" and event.kind is EventKind.RESTARTED:
                        break
            for i in range(100):
                assert await kv.get(f"key{i}") == f"value{i}".encode()
            assert kv.system.events.count(f"shard-{shard}", EventKind.STATE_REBUILT) == 1


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_a_transactions_writes_survive_a_restart(tmp_path: Path, appendfsync: str) -> None:
    """Every kind of step a transaction runs is journalled, as the same command alone is."""
    keys = {f"m{i}": f"v{i}" for i in range(12)}  # an MSET over every shard
    with trio.fail_after(30):
        async with kvmemo.open_store(
            shards=4, data_dir=str(tmp_path), appendfsync=appendfsync
        ) as kv:
            await kv.set("gone", "x")
            await kv.set("{t}src", "moved", ex=3600)
            async with kv.watch("counter") as w:
                results = await w.transaction(
                    ("MSET", *[x for kv_ in keys.items() for x in kv_]),
                    ("INCR", "counter"),
                    ("INCRBY", "counter", "4"),
                    ("DEL", "gone"),
                    ("RENAME", "{t}src", "{t}dst"),
                    ("SET", "ttl", "x", "EX", "3600"),
                    ("APPEND", "m0", "+"),
                    ("EXPIRE", "m1", "-1"),  # in the past: deleted
                )
            assert results == ["OK", 1, 5, 1, "OK", "OK", 3, 1]
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
            assert await kv.mget("m0", "m1", "m11") == [b"v0+", None, b"v11"]
            assert await kv.get("counter") == b"5"
            assert await kv.mget("gone", "{t}src", "{t}dst") == [None, None, b"moved"]
            assert 3500 < await kv.ttl("{t}dst") <= 3600
            assert 3500 < await kv.ttl("ttl") <= 3600
            assert await kv.dbsize() == 11 + 3  # m0, m2..m11; counter, {t}dst, ttl


def _logged_expiries(data_dir: Path) -> dict[bytes, int | None]:
    """Each key's expiry (Unix ms) in the last SET record of it in the shard logs."""
    out: dict[bytes, int | None] = {}
    for shard in sorted(data_dir.glob("shard-*")):
        for _, path in list_segments(shard):
            for record in decode_stream(path.read_bytes()).records:
                inner = [record]
                if record.op is Op.GROUP:
                    inner = decode_stream(record.value).records
                for r in inner:
                    if r.op is Op.SET:
                        out[r.key] = r.expires_ms
    return out


@pytest.mark.parametrize("appendfsync", ["everysec", "no", "always"])
async def test_a_clock_jump_between_batches_does_not_shift_the_logged_expiry(
    tmp_path: Path, mock_clock: trio.testing.MockClock, appendfsync: str
) -> None:
    """The wall-clock offset of a batch is read for that batch, not kept from the last."""
    async with kvmemo.open_store(shards=1, data_dir=str(tmp_path), appendfsync=appendfsync) as kv:
        assert await kv.set("a", "1") == "OK"
        mock_clock.jump(1000)
        async with trio.open_nursery() as nursery:  # a plain SET, then SET EX, in one batch
            nursery.start_soon(kv.set, "p", "1")
            nursery.start_soon(functools.partial(kv.set, "b", "2", ex=100))
        b_ms = time.time() * 1000 + 100_000
        mock_clock.jump(500)
        assert await kv.set("c", "3", ex=100) == "OK"
        c_ms = time.time() * 1000 + 100_000
        logged = _logged_expiries(tmp_path)
        assert logged[b"p"] is None
        b, c = logged[b"b"], logged[b"c"]
        assert b is not None
        assert abs(b - b_ms) < 2000
        assert c is not None
        assert abs(c - c_ms) < 2000
        assert await kv.ttl("c") == 100


async def test_a_write_held_by_a_commit_when_its_shard_is_killed_says_it_may_have_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 1's sync round blocks; shard 0's batch waits for the next round, held; shard 0
    is killed: its write fails with INTERNAL, ``applied`` null, and a message that names
    the kill (not a crash)."""
    entered, release = threading.Event(), threading.Event()
    blocking = False
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if blocking:
            entered.set()
            release.wait(10)
        real_fsync(fd)

    def key_on(kv: kvmemo.Store, shard: int) -> bytes:
        return next(
            k for k in (b"k%d" % n for n in range(1000)) if kv.engine.slots.shard_of(k) == shard
        )

    monkeypatch.setattr(os, "fsync", fsync)
    async with kvmemo.open_store(
        shards=2, data_dir=str(tmp_path), appendfsync="always", fsync_method="fsync"
    ) as kv:
        k0, k1 = key_on(kv, 0), key_on(kv, 1)
        assert await kv.set(k0, "warm") == "OK"
        blocking = True
        errors: list[KVMemoError] = []

        async def writer(key: bytes) -> None:
            try:
                await kv.set(key, "1")
            except KVMemoError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, k1)
            assert await trio.to_thread.run_sync(entered.wait, 10)  # shard 1's round syncs
            nursery.start_soon(writer, k0)
            await trio.testing.wait_all_tasks_blocked()  # shard 0's request gathers, held
            assert kv.kill_actor("shard-0")
            await trio.testing.wait_all_tasks_blocked()
            blocking = False
            release.set()
        assert [e.kind for e in errors] == ["INTERNAL"]
        assert errors[0].data["applied"] is None
        assert "shard-0 was killed while handling the command" in str(errors[0])
        assert await kv.get(k1) == b"1"  # shard 1's round went on
