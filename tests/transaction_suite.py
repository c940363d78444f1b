"""The transaction suite: MULTI/EXEC and WATCH semantics, for any front door.

Each case is ``async def case(door)``, where a door has:

- ``kv``: plain commands (the :class:`kvmemo.api.Commands` methods and ``execute``);
- ``await door.transaction(*calls)``: one MULTI/EXEC of ``calls`` (tuples
  ``(command, *args)``); a result per call, a failed call's error (an
  exception with a ``kind``) in its place; raises :class:`Refused` when the
  transaction was refused as a whole (nothing ran);
- ``door.watch(*keys)``: an async context manager giving an object with the
  same ``transaction``, which returns None when a watched key changed.

The embedded store, the WebSocket client and redis-py over the Redis port
run the same cases: that is how we know their transactions agree. Keys
carry a random prefix; the store has 4 shards.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from kvmemo.storage.slots import SlotMap

SHARDS = 4  # every door's store


class Refused(Exception):
    """The transaction was refused as a whole: nothing ran."""


Case = Callable[[Any], Awaitable[None]]


@attrs.frozen
class TxnCase:
    name: str
    run: Case


TXN_SUITE: list[TxnCase] = []


def case(fn: Case) -> Case:
    TXN_SUITE.append(TxnCase(fn.__name__, fn))
    return fn


def fresh(name: str) -> str:
    return f"{uuid.uuid4().hex[:8]}:{name}"


def on_other_shards(a: str) -> str:
    """A key on another shard than ``a``."""
    slots = SlotMap(SHARDS)
    i = 0
    while slots.shard_of(f"{a}-{i}".encode()) == slots.shard_of(a.encode()):
        i += 1
    return f"{a}-{i}"


def assert_error(value: object, kind: str) -> None:
    assert isinstance(value, Exception), f"expected a {kind} error, got {value!r}"
    assert getattr(value, "kind", None) == kind, f"expected {kind}, got {value!r}"


@case
async def commands_run_in_order_and_answer_each(door: Any) -> None:
    a = fresh("a")
    results = await door.transaction(("SET", a, "1"), ("INCR", a), ("GET", a), ("PING",))
    assert results == ["OK", 2, b"2", "PONG"]


@case
async def a_failing_command_gives_its_error_in_place_and_the_others_run(door: Any) -> None:
    t, b = fresh("t"), fresh("b")
    await door.kv.set(t, "text")
    results = await door.transaction(("SET", b, "1"), ("INCR", t), ("SET", b, "2"))
    assert results[0] == "OK"
    assert_error(results[1], "NOT_INTEGER")
    assert results[2] == "OK"
    assert await door.kv.get(b) == b"2"


@case
async def a_bad_option_fails_in_place_as_redis_does(door: Any) -> None:
    k, j = fresh("k"), fresh("j")
    results = await door.transaction(("SET", k, "v", "EX", "abc"), ("SET", j, "1"))
    assert_error(results[0], "NOT_INTEGER")
    assert results[1] == "OK"
    assert await door.kv.mget(k, j) == [None, b"1"]


@case
async def a_wrong_number_of_arguments_refuses_the_whole(door: Any) -> None:
    j = fresh("j")
    try:
        await door.transaction(("SET", j, "1"), ("SET", fresh("k")))
    except Refused:
        pass
    else:
        raise AssertionError("a transaction with a wrong arity ran")
    assert await door.kv.get(j) is None


@case
async def a_move_across_shards_refuses_the_whole_and_one_hash_tag_fixes_it(door: Any) -> None:
    a = fresh("a")
    b = on_other_shards(a)
    await door.kv.set(a, "v")
    try:
        await door.transaction(("SET", a, "w"), ("RENAME", a, b))
    except Refused:
        pass
    else:
        raise AssertionError("a cross-shard RENAME ran in a transaction")
    assert await door.kv.mget(a, b) == [b"v", None]
    tag = fresh("{u}")
    src, dst = f"{tag}src", f"{tag}dst"
    results = await door.transaction(("SET", src, "1"), ("RENAME", src, dst), ("GET", dst))
    assert results == ["OK", "OK", b"1"]


@case
async def an_mset_across_shards_is_whole_inside_a_transaction(door: Any) -> None:
    a = fresh("a")
    b = on_other_shards(a)
    results = await door.transaction(("MSET", a, "1", b, "2"), ("MGET", a, b), ("DEL", a, b))
    assert results == ["OK", [b"1", b"2"], 2]


@case
async def a_watched_key_written_meanwhile_makes_the_transaction_run_nothing(door: Any) -> None:
    k, other = fresh("k"), fresh("other")
    await door.kv.set(k, "1")
    async with door.watch(k) as w:
        await door.kv.set(k, "1")  # even the same value: a write
        assert await w.transaction(("SET", other, "x")) is None
    assert await door.kv.get(other) is None
    async with door.watch(k) as w:
        assert await w.transaction(("SET", other, "x")) == ["OK"]
    assert await door.kv.get(other) == b"x"
