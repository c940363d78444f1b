"""RENAME, RENAMENX and COPY: Redis semantics, atomic across shards."""

from __future__ import annotations

import contextlib
from typing import Any

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


def _two_stores(maxmemory: int = 0) -> tuple[Any, Any, Any]:
    from kvmemo.eviction.memory import MemoryTracker
    from kvmemo.eviction.policies import make_policy
    from kvmemo.storage.durability import Journal
    from kvmemo.storage.store import ShardStore

    tracker = MemoryTracker(maxmemory, 2)
    source, target = (ShardStore(i, make_policy("lru"), tracker) for i in (0, 1))
    for store in (source, target):
        store.journal = Journal()
    return tracker, source, target


def _exact(store: Any) -> int:
    return sum(store.entry_size(k, v, has_ttl=k in store.expires) for k, v in store.data.items())


@pytest.mark.parametrize("kind", ["rename", "copy"])
@pytest.mark.parametrize("source_first", [True, False])
@pytest.mark.parametrize(
    ("change", "moves"),
    [
        ("none", True),
        ("shorter", True),
        ("persist", True),
        ("new ttl", True),
        ("grown within its size step", True),
        ("grown past its size step", False),
        ("deleted", False),
    ],
)
def test_the_source_is_taken_as_its_shard_finds_it_at_prepare(
    kind: str, source_first: bool, change: str, moves: bool
) -> None:
    """Whatever was written to the source between the read (step 1) and its shard's
    prepare: the target gets exactly the entry the source's shard holds then (the
    shard holds it to the decision; RENAME deletes that very entry), or the source
    votes CHANGED when it now costs more than the target reserved (or is gone).
    Memory is exact after the commit or abort, and the journals hold what effects()
    says (what an intent record would hold)."""
    tracker, source, target = _two_stores()
    source.put(b"src", b"v" * 10, 0.0, expires_at=50.0)
    target.put(b"dst", b"old target value", 0.0, expires_at=9.0)
    move = ops.Move(b"src", b"dst", kind=kind, replace=True)
    entry = ops.PeekEntry(b"src").apply(source, 0.0)
    assert move.sources_read([entry, None], [[0], [1]]) is ops.NO_ANSWER
    if change == "shorter":
        source.put(b"src", b"w", 0.0, expires_at=60.0)
    elif change == "persist":
        source.set_expiry(b"src", None)
    elif change == "new ttl":
        source.put(b"src", b"x" * 10, 0.0, expires_at=70.0)
    elif change == "grown within its size step":
        source.put(b"src", b"y" * 15, 0.0, expires_at=50.0)
    elif change == "grown past its size step":
        source.put(b"src", b"z" * 16, 0.0, expires_at=50.0)
    elif change == "deleted":
        source.delete(b"src", 0.0)
    held = (source.peek(b"src", 1.0), source.expiry_of(b"src"))
    for store in (source, target):
        store.journal.records.clear()
    parts = [(move.part([0]), source), (move.part([1]), target)]
    if not source_first:
        parts.reverse()
    votes = [part.prepare(store, 1.0) for part, store in parts]
    if not moves:
        assert ops.CHANGED in votes
        for part, store in parts:
            part.abort(store)
        assert target.peek(b"dst", 1.0) == b"old target value"
    else:
        assert votes == [True, True]
        effects = b"".join(
            part.effects(0.0) for part, _ in sorted(parts, key=lambda p: p[1] is source)
        )
        for part, store in parts:
            part.commit(store, 1.0)
        assert (target.peek(b"dst", 1.0), target.expiry_of(b"dst")) == held
        assert (source.peek(b"src", 1.0) is None) == (kind == "rename")
        assert b"".join(target.journal.records + source.journal.records) == effects
    for store in (source, target):
        assert store.check_invariants()
        assert tracker.shard_used(store.shard_id) == store.used == _exact(store)
    assert tracker.used == source.used + target.used


async def test_rename_never_loses_an_update_made_between_its_read_and_its_hold() -> None:
    """One writer SETs (XX) whichever of two keys exists, while movers RENAME the value
    back and forth and COPY it away: after each acknowledged SET, exactly one of the
    two keys holds exactly that value (a RENAME that wrote the value it read in step 1
    while deleting a newer one would lose the update)."""
    async with kvmemo.open_store(shards=4) as kv:
        a, b = two_keys_on_different_shards(kv)
        await kv.set(a, "v-0")
        done = False

        async def writer() -> None:
            nonlocal done
            for i in range(1, 800):
                value = f"v-{i}".encode()
                while True:  # a RENAME may move the key between our two tries
                    if await kv.set(a, value, xx=True) == "OK":
                        break
                    if await kv.set(b, value, xx=True) == "OK":
                        break
                seen = await kv.mget(a, b)
                assert sorted(v is None for v in seen) == [False, True], seen
                assert value in seen, (value, seen)
            done = True

        async def mover(src: str, dst: str) -> None:
            while not done:
                with contextlib.suppress(KVMemoError):  # no such key: the other mover won
                    await kv.execute("rename", src, dst)
                with contextlib.suppress(KVMemoError):
                    await kv.execute("copy", dst, "copied", "REPLACE")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(mover, a, b)
                nursery.start_soon(mover, b, a)


async def test_a_source_that_keeps_growing_does_not_starve_copy_or_rename() -> None:
    """16 tasks APPEND to the source while COPY and RENAME run: a reread gives the
    target's reservation headroom (doubling per attempt, trimmed at commit), so no
    call gives up with TIMEOUT, and memory is exact afterwards."""
    async with kvmemo.open_store(shards=4) as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "x")
        done = False

        async def appender() -> None:
            for _ in range(150):
                await kv.execute("append", src, "y")

        async def mover() -> None:
            renamed = f"{{{dst}}}:renamed"
            while not done:
                assert await kv.execute("copy", src, dst, "REPLACE") == 1
            assert await kv.execute("rename", src, renamed) == "OK"
            assert await kv.strlen(renamed) == 1 + 16 * 150

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mover)
                async with trio.open_nursery() as appenders:
                    for _ in range(16):
                        appenders.start_soon(appender)
                done = True
        memory = (await kv.info("memory"))["memory"]["used_memory"]
        usages = [await kv.memory_usage(k) for k in await kv.keys("*")]
        assert memory == sum(u for u in usages if u is not None)


async def test_rename_is_never_refused_for_memory() -> None:
    """Redis's RENAME is not denyoom: it frees what it takes. Under noeviction with the
    store almost full, RENAME (even with the target on another shard, written before
    the source's shard deletes it) succeeds, where COPY gets OOM."""
    async with kvmemo.open_store(shards=4, maxmemory=4000, eviction_policy="noeviction") as kv:
        src, dst = two_keys_on_different_shards(kv)
        await kv.set(src, "v" * 2200)
        with pytest.raises(KVMemoError) as info:
            await kv.execute("copy", src, dst)
        assert info.value.kind == "OOM"
        before = (await kv.info("memory"))["memory"]["used_memory"]
        assert await kv.execute("rename", src, dst) == "OK"
        assert await kv.get(dst) == b"v" * 2200
        after = (await kv.info("memory"))["memory"]["used_memory"]
        assert abs(after - before) <= 16  # the keys' lengths may differ by a size step
