"""RENAME, RENAMENX and COPY: Redis semantics, atomic across shards."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_engine_atomic import keep_busy, key_on, wait_running

import kvmemo
from kvmemo.commands import ops
from kvmemo.errors import KVMemoError


def two_keys_on_different_shards(kv: kvmemo.Store) -> tuple[str, str]:
    shard_of = kv.engine.slots.shard_of
    src = "src"
    dst = next(f"dst{i}" for i in range(100) if shard_of(f"dst{i}".encode()) != shard_of(b"src"))
    return src, dst


async def test_rename_moves_value_and_ttl_across_shards() -> None:
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "v", ex=100)
        await kv.set(dst, "old")
        assert await kv.execute("rename", src, dst) == "OK"
        assert await kv.get(src) is None
        assert await kv.get(dst) == b"v"
        assert 0 < await kv.ttl(dst) <= 100


async def test_rename_of_a_missing_key_is_an_error_and_changes_nothing() -> None:
    async with kvmemo.open_store(shards=4) as kv:
        await kv.set("other", "x")
        with pytest.raises(kvmemo.KVMemoError, match="^no such key$"):
            await kv.execute("rename", "missing", "other")
        assert await kv.get("other") == b"x"


async def test_renamenx_only_to_a_free_name() -> None:
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.mset({src: "a", dst: "b"})
        assert await kv.execute("renamenx", src, dst) == 0
        assert await kv.mget(src, dst) == [b"a", b"b"]
        await kv.delete(dst)
        assert await kv.execute("renamenx", src, dst) == 1
        assert await kv.mget(src, dst) == [None, b"a"]
        assert await kv.execute("renamenx", dst, dst) == 0


async def test_copy_with_and_without_replace() -> None:
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "a", px=100_000)
        await kv.set(dst, "b")
        assert await kv.execute("copy", src, dst) == 0
        assert await kv.execute("copy", src, dst, "REPLACE") == 1
        assert await kv.mget(src, dst) == [b"a", b"a"]
        assert await kv.pttl(dst) > 0
        assert await kv.execute("copy", "missing", dst) == 0
        with pytest.raises(kvmemo.KVMemoError) as same:
            await kv.execute("copy", src, src)
        assert same.value.kind == "SYNTAX"
        with pytest.raises(kvmemo.KVMemoError) as db:
            await kv.execute("copy", src, dst, "DB", 1)
        assert db.value.kind == "SYNTAX"


async def test_rename_to_itself_is_ok_when_the_key_exists() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "v")
        assert await kv.execute("rename", "k", "k") == "OK"
        assert await kv.get("k") == b"v"


async def test_no_reader_sees_a_rename_half_done() -> None:
    # Readers MGET both names while a writer renames back and forth: exactly
    # one of the two names holds the value at every read.
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "v")
        seen: list[list[bytes | None]] = []
        done = False

        async def writer() -> None:
            nonlocal done
            for i in range(200):
                a, b = (src, dst) if i % 2 == 0 else (dst, src)
                await kv.execute("rename", a, b)
            done = True

        async def reader() -> None:
            while not done:
                seen.append(await kv.mget(src, dst))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(reader)
        assert seen
        assert all(sorted(v is None for v in pair) == [False, True] for pair in seen), seen[:5]


@pytest.mark.parametrize("kind", ["rename", "copy"])
def test_a_target_that_expires_while_its_shard_holds_is_accounted_once(kind: str) -> None:
    """The reservation nets out the target's old value as prepare saw it; the
    commit must apply at that time, or the expiry releases the old bytes again."""
    from kvmemo.eviction.memory import MemoryTracker
    from kvmemo.eviction.policies import make_policy
    from kvmemo.storage.store import ShardStore

    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    store.put(b"src", b"new value", 0.0, expires_at=None)
    store.put(b"dst", b"old value, longer", 0.0, expires_at=1.0)  # due at t=1
    move = ops.Move(b"src", b"dst", kind=kind, replace=True)
    assert move.sources_read([(b"new value", None)], [[0, 1]]) is ops.NO_ANSWER
    part = move.part([0, 1])  # both keys on this shard
    assert part.prepare(store, 0.5) is True  # before the target's expiry...
    part.commit(store, 2.0)  # ...decided after it
    assert store.check_invariants()
    assert (
        store.tracker.used
        == store.used
        == sum(store.entry_size(k, v, has_ttl=k in store.expires) for k, v in store.data.items())
    )
    assert store.get(b"dst", 2.0) == b"new value"


async def test_a_retried_rename_leaves_no_stale_part_that_could_crash_a_shard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A RENAME whose source changed under it retries with the source read again
    (here: gone). A part of the aborted round, still queued on a busy target
    shard, must prepare and abort with the entry of its own round, not crash."""
    async with kvmemo.open_store(shards=2, hold_timeout=0.5) as kv:
        src, dst = key_on(kv, 0, "src"), key_on(kv, 1, "dst")
        await kv.set(src, "v")

        keep_busy(kv, 0, 1)  # the source's shard: 0.5 s
        keep_busy(kv, 1, 3)  # the target's shard: 1.5 s, past the source's hold timeout
        outcome: dict[str, object] = {}

        async def rename() -> None:
            try:
                outcome["result"] = await kv.execute("RENAME", src, dst)
            except KVMemoError as exc:
                outcome["error"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rename)
            await trio.testing.wait_all_tasks_blocked()  # its read of the source is queued
            nursery.start_soon(kv.delete, src)  # then the source goes: CHANGED, retry
        error = outcome["error"]
        assert isinstance(error, KVMemoError)
        assert error.kind == "SYNTAX"  # no such key, on the retry
        await trio.sleep(2)  # the busy target takes the stale part
        restarts = [(a["name"], a["restarts"]) for a in kv.actors() if a["name"][:6] == "shard-"]
        assert restarts == [("shard-0", 0), ("shard-1", 0)]
        assert await kv.exists(src, dst, "zz") == 0


async def test_a_source_shard_killed_while_the_read_is_queued_gives_unavailable_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read step gives up when the source's shard goes down with the read queued
    (a read has no effect): the writer lock is not held until the restart, and the
    read is not left for the next incarnation. Nothing changed; a retry works."""
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "v")
        source_shard = kv.engine.slots.shard_of(src.encode())
        original = ops.Move.source_part
        killed = []

        def kill_then_read(op: ops.Move, positions: list[int]) -> ops.ShardOp | None:
            part = original(op, positions)
            if part is not None and not killed:  # the read is queued just after this
                killed.append(kv.kill_actor(f"shard-{source_shard}"))
            return part

        monkeypatch.setattr(ops.Move, "source_part", kill_then_read)
        with pytest.raises(KVMemoError) as info:
            await kv.execute("rename", src, dst)
        assert info.value.kind == "UNAVAILABLE"
        assert killed
        monkeypatch.undo()
        with trio.fail_after(10):
            await wait_running(kv.system, f"shard-{source_shard}")
        assert await kv.get(src) == b"v"
        assert await kv.get(dst) is None
        assert await kv.execute("rename", src, dst) == "OK"
        assert await kv.get(dst) == b"v"


WRITERS = 8


async def test_rename_and_copy_are_not_starved_by_a_writer_to_the_source() -> None:
    """A writer SETs the source in a loop (values of the same length): each RENAME or COPY
    moves one of its values, whole, and never gives up with TIMEOUT (before, the source
    shard voted CHANGED whenever the value was not the very object read, so a busy
    writer made it read again until MOVE_RETRIES ran out)."""
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        written = [f"value-{i:06d}".encode() for i in range(4000)]
        await kv.set(src, written[0])
        done = False
        moved: list[bytes | None] = []

        async def writer() -> None:
            # Several tasks, so that a SET is queued on the source's shard
            # between almost every read step and its hold.
            async with trio.open_nursery() as writers:
                for w in range(WRITERS):
                    writers.start_soon(write_some, written[w::WRITERS])
            nonlocal done
            done = True

        async def write_some(values: list[bytes]) -> None:
            for value in values:
                await kv.set(src, value)

        async def mover() -> None:
            renamed = f"{{{dst}}}:renamed"
            while not done:
                if await kv.execute("copy", src, dst, "REPLACE") == 1:
                    moved.append(await kv.get(dst))
                if await kv.exists(src):  # the writer may not have set it again yet
                    assert await kv.execute("rename", src, renamed) == "OK"
                    moved.append(await kv.get(renamed))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(mover)
        assert moved
        assert set(moved) <= set(written)
