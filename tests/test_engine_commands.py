"""Engine behaviour beyond the command suite: size limits, batches, the embedded API."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.api import encode_arg, encode_args
from kvmemo.commands import ops
from kvmemo.commands.args import Clock
from kvmemo.commands.table import ParseContext, parse
from kvmemo.embedded import Store
from kvmemo.engine.engine import EVICTION_MANAGER, TTL_MANAGER, shard_name
from kvmemo.errors import KVMemoError
from kvmemo.storage.shard import Barrier, Hold, Inspect
from kvmemo.storage.store import ShardStore


def key_on(kv: Store, shard: int, prefix: str) -> str:
    i = 0
    while kv.engine.slots.shard_of(f"{prefix}{i}".encode()) != shard:
        i += 1
    return f"{prefix}{i}"


async def test_keys_and_values_over_their_limits_are_too_large_and_change_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, max_key_size=8, max_value_size=16) as kv:
        assert await kv.set("k" * 8, "v" * 16) == "OK"
        for call in (
            lambda: kv.set("k" * 9, "v"),
            lambda: kv.set("k", "v" * 17),
            lambda: kv.get("k" * 9),
            lambda: kv.mset({"a": "v", "b": "v" * 17}),
            lambda: kv.delete("a", "k" * 9),
        ):
            with pytest.raises(KVMemoError) as caught:
                await call()
            assert caught.value.kind == "TOO_LARGE"
        assert await kv.exists("a", "k") == 0


async def test_append_and_setrange_cannot_grow_a_value_past_max_value_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, max_value_size=16) as kv:
        await kv.set("k", "v" * 10)
        assert await kv.append("k", "x" * 6) == 16
        for call in (
            lambda: kv.append("k", "x"),
            lambda: kv.setrange("k", 10, "y" * 7),
            lambda: kv.setrange("new", 16, "y"),
        ):
            with pytest.raises(KVMemoError) as caught:
                await call()
            assert caught.value.kind == "TOO_LARGE"
        assert await kv.get("k") == b"v" * 10 + b"x" * 6
        assert await kv.exists("new") == 0
        assert await kv.setrange("k", 15, "z") == 16


async def test_execute_many_answers_each_call_in_order_with_its_own_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        results = await kv.execute_many(
            ("set", "a", "1"),
            ("incr", "a"),
            ("get", "a"),
            ("get", "missing"),
            ("incr", "b"),
            ("nosuchcommand",),
            ("mset", "a", "10", "b", "20"),
            ("incrby", "a", "x"),
            ("mget", "a", "b"),
            ("set", "c", "v", "KEEPTTL", "EX", "1"),
            ("del", "a", "b"),
            ("exists", "a", "b"),
        )
        kinds = [r.kind if isinstance(r, KVMemoError) else None for r in results]
        assert kinds == [None] * 5 + ["UNKNOWN_METHOD", None, "NOT_INTEGER", None, "SYNTAX"] + [
            None,
            None,
        ]
        values = [None if isinstance(r, KVMemoError) else r for r in results]
        assert values == ["OK", 2, b"2", None, 1, None, "OK", None, [b"10", b"20"], None, 2, 0]


async def test_a_batch_whose_shard_times_out_keeps_the_answers_that_did_arrive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A GET that answered None must stay None when another call of the batch
    times out: None is a result, not "no answer yet"."""
    async with kvmemo.open_store(shards=2, request_timeout=0.5, hold_timeout=2.0) as kv:
        missing, stuck = key_on(kv, 0, "m"), key_on(kv, 1, "s")
        await kv.set(stuck, "v")
        await kv.set("present", "p")
        ref = kv.system.ref(shard_name(1))
        # Shard 1 holds for an atomic write whose other half never comes.
        part = ops.MSet([(stuck.encode(), b"x")], only_new=False).part([0])
        held = ref.ask_nowait(Hold(Barrier(2), 0, part))
        await trio.testing.wait_all_tasks_blocked()
        results = await kv.execute_many(("get", missing), ("get", stuck))
        assert results[0] is None
        assert isinstance(results[1], KVMemoError)
        assert results[1].kind == "TIMEOUT"
        assert results[1].data["applied"] is None
        assert await held.wait() is not None  # the hold gave up and aborted
        assert await kv.get(stuck) == b"v"
        assert await ref.ask(Inspect(ShardStore.check_invariants))


async def test_the_embedded_api_lists_and_kills_actors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=3) as kv:
        names = {a["name"] for a in kv.actors()}
        assert {shard_name(i) for i in range(3)} | {TTL_MANAGER, EVICTION_MANAGER} <= names
        for actor in kv.actors():
            assert actor["state"] == "running"
            assert actor["restarts"] == 0
        await kv.set("k", "v")
        assert kv.kill_actor(shard_name(0)) is True
        await trio.sleep(0.1)
        assert {a["name"]: a["restarts"] for a in kv.actors()}[shard_name(0)] == 1
        with pytest.raises(KVMemoError) as caught:
            kv.kill_actor("nobody")
        assert caught.value.kind == "SYNTAX"
        assert await kv.get("k") == b"v"


async def test_debug_kill_needs_chaos_mode(autojump_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        with pytest.raises(KVMemoError) as caught:
            await kv.execute("debug.kill", shard_name(0))
        assert caught.value.kind == "UNKNOWN_METHOD"
    async with kvmemo.open_store(shards=2, chaos=True) as kv:
        assert await kv.execute("debug.kill", TTL_MANAGER) == "OK"
        await trio.sleep(0.1)
        restarts = {a["name"]: a["restarts"] for a in kv.actors()}
        assert restarts[TTL_MANAGER] == 1


async def test_info_counts_keys_expiries_and_memory(autojump_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=4, maxmemory="1MiB") as kv:
        await kv.mset({f"k{i}": "v" for i in range(10)})
        await kv.expire("k0", 100)
        info = await kv.info()
        assert info["keyspace"]["keys"] == 10
        assert info["keyspace"]["expires"] == 1
        assert sum(info["keyspace"]["shards"]) == 10
        assert info["memory"]["maxmemory"] == 1024 * 1024
        assert info["memory"]["used_memory"] == kv.engine.tracker.used > 0
        assert info["server"]["shards"] == 4
        assert await kv.info("nosuchsection") == {}


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(b"\x00", b"\x00"), ("é", "é".encode()), (42, b"42"), (-1, b"-1"), (1.5, b"1.5")],
)
def test_arguments_encode_as_bytes(value: bytes | str | int | float, encoded: bytes) -> None:
    assert encode_arg(value) == encoded


def test_a_bool_argument_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^a command argument cannot be a bool, got True$"):
        encode_arg(True)
    with pytest.raises(TypeError, match=r"^a command argument cannot be a bool, got True$"):
        encode_args((b"k", True))


def test_arguments_already_bytes_are_passed_on_as_they_are() -> None:
    args = (b"k", b"v")
    assert encode_args(args) is args
    assert encode_args((b"k", "v", 1)) == [b"k", b"v", b"1"]


def test_the_clock_is_read_only_by_absolute_times_and_once_until_restarted() -> None:
    reads: list[Clock] = []

    def read_clock() -> Clock:
        reads.append(Clock(100.0 + len(reads), 1_000_000.0))
        return reads[-1]

    ctx = ParseContext(read_clock, 1024)
    parse("get", [b"k"], ctx)
    parse("set", [b"k", b"v", b"EX", b"10"], ctx)
    assert reads == []
    _, first = parse("set", [b"k", b"v", b"EXAT", b"1000010"], ctx)
    _, second = parse("pexpireat", [b"k", b"1000020000"], ctx)
    assert len(reads) == 1  # one offset for every absolute time until a restart
    assert (first.expiry.value, second.expiry.value) == (110.0, 120.0)
    ctx.restart()
    _, third = parse("expireat", [b"k", b"1000010"], ctx)
    assert len(reads) == 2
    assert third.expiry.value == 111.0


async def test_a_batch_over_the_memory_limit_evicts_or_refuses_call_by_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = 32 * 1024
    async with kvmemo.open_store(shards=2, maxmemory=limit, eviction_policy="lru") as kv:
        calls = [("set", f"k{i}", "v" * 500) for i in range(200)]
        results = await kv.execute_many(*calls)
        assert results == ["OK"] * 200
        assert kv.engine.tracker.used <= limit
        assert 0 < await kv.dbsize() < 200
    # One shard, so that the batch runs in order (shards run their parts concurrently).
    async with kvmemo.open_store(shards=1, maxmemory=limit, eviction_policy="noeviction") as kv:
        calls = [("set", f"k{i}", "v" * 500) for i in range(200)]
        calls.insert(150, ("set", "k0", "small"))  # shrinks an entry: needs no room
        calls.insert(151, ("get", "k0"))
        results = await kv.execute_many(*calls)
        kinds = [r.kind if isinstance(r, KVMemoError) else r for r in results]
        first_oom = kinds.index("OOM")
        assert kinds[:first_oom] == ["OK"] * first_oom
        assert kinds[150:152] == ["OK", b"small"]
        assert set(kinds[first_oom:150]) == {"OOM"}
        assert kv.engine.tracker.used <= limit


async def test_execute_and_execute_many_count_latency_and_errors_alike(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        latency = kv.engine._latency
        errors = kv.engine._errors
        await kv.set("a", "1")
        await kv.execute_many(
            ("set", "b", "2"),
            ("SET", "c", "3"),
            ("mget", "a", "b"),
            ("incr", "a"),
            ("set", "d", "x"),
            ("incr", "d"),  # NOT_INTEGER inside a shard batch
            ("get",),  # ARITY at parse time
            ("mset", "a"),  # ARITY of an atomic command
        )
        assert latency.labels("set").count == 4
        assert latency.labels("mget").count == 1
        assert latency.labels("incr").count == 1
        assert errors.labels("NOT_INTEGER").value == 1
        assert errors.labels("ARITY").value == 2


async def test_an_error_escaping_the_store_block_reaches_the_caller_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:

    async def increment_text() -> None:
        async with kvmemo.open_store(shards=2) as kv:
            await kv.set("k", "text")
            await kv.incr("k")

    with pytest.raises(KVMemoError) as caught:
        await increment_text()
    assert caught.value.kind == "NOT_INTEGER"
    with pytest.raises(LookupError, match=r"^mine$"):
        async with kvmemo.open_store(shards=2):
            raise LookupError("mine")


async def test_the_get_and_set_fast_paths_answer_count_and_refuse_as_execute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, max_key_size=8, max_value_size=16) as kv:
        engine = kv.engine
        latency = engine._latency
        errors = engine._errors
        assert await kv.set("a", 1) == await kv.execute("set", "b", 1) == "OK"
        assert await kv.get("a") == await kv.execute("get", "b") == b"1"
        assert await kv.get(b"missing") is await kv.execute("get", "missing") is None
        await kv.set("t", "v", ex=10)  # with an option: the generic path
        assert await kv.ttl("t") == 10
        assert await kv.set("t", "w") == "OK"  # the fast path drops the TTL, as SET does
        assert await kv.ttl("t") == -1
        assert latency.labels("set").count == 4
        assert latency.labels("get").count == 4
        for fast, generic in (
            (lambda: kv.get("k" * 9), lambda: kv.execute("get", "k" * 9)),
            (lambda: kv.set("k" * 9, "v"), lambda: kv.execute("set", "k" * 9, "v")),
            (lambda: kv.set("k", "v" * 17), lambda: kv.execute("set", "k", "v" * 17)),
        ):
            with pytest.raises(KVMemoError) as by_fast:
                await fast()
            with pytest.raises(KVMemoError) as by_generic:
                await generic()
            assert (by_fast.value.kind, str(by_fast.value)) == (
                by_generic.value.kind,
                str(by_generic.value),
            )
        assert errors.labels("TOO_LARGE").value == 6
        assert await kv.exists("k") == 0


async def test_option_less_get_and_set_never_go_through_execute(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with kvmemo.open_store(shards=2) as kv:

        async def no_execute(name: str, args: object) -> object:
            raise AssertionError(f"{name} went through execute")

        monkeypatch.setattr(kv.engine, "execute", no_execute)
        assert await kv.set("k", "v") == "OK"
        assert await kv.get("k") == b"v"
        with pytest.raises(AssertionError, match="set went through execute"):
            await kv.set("k", "v", nx=True)  # an option: the general path


async def test_get_and_set_are_awaitables_that_check_argument_types_at_the_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        # They return the engine's coroutine (one frame fewer per call): a
        # wrong type is refused before any coroutine exists, so nothing is
        # left un-awaited and nothing is written.
        bad: list[tuple[Any, tuple[Any, ...]]] = [
            (kv.get, (True,)),
            (kv.set, ("k", True)),
            (kv.set, (None, "v")),
        ]
        for method, args in bad:
            with pytest.raises(TypeError, match=r"^a command argument"):
                method(*args)
        pending = kv.set("k", "v")
        assert await kv.get("k") is None  # nothing runs before the await
        assert await pending == "OK"
        assert await kv.get("k") == b"v"
        assert await kv.set("k", "w", get=True) == b"v"  # an option: the general path
        assert await kv.dbsize() == 1


async def test_info_memory_counts_the_keys_held_by_open_scans_up_to_the_setting() -> None:
    async with kvmemo.open_store(shards=1, scan_snapshots=2) as kv:
        await kv.mset({f"k{i}": "v" for i in range(30)})
        assert (await kv.info("memory"))["memory"]["scan_snapshot_keys"] == 0
        cursors = []
        for _ in range(3):  # three open scans; the shard remembers two
            cursor, keys = await kv.scan(0, count=5)
            assert cursor != 0
            assert len(keys) == 5
            cursors.append(cursor)
        assert (await kv.info("memory"))["memory"]["scan_snapshot_keys"] == 60
        seen: set[bytes] = set()
        cursor = cursors[0]  # its snapshot was dropped: it starts over, missing nothing
        while cursor:
            cursor, keys = await kv.scan(cursor, count=7)
            seen.update(keys)
        assert seen == {f"k{i}".encode() for i in range(30)}
        assert (await kv.info("memory"))["memory"]["scan_snapshot_keys"] == 30
