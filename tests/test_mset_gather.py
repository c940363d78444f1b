"""Grouped MSET rounds gather the callers the last round answered.

Under concurrency the callers a round answered come back with their next
MSET within two scheduler passes. A leader that took its round at once held
its own MSET alone every other round (trio runs a pass in either order), and
made everyone else wait for that round. These tests count the rounds, and
check that a leader cancelled while it gathers leaves the lead to the others.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.engine.engine import KVEngine

WRITERS = 20
MSETS_EACH = 10


@pytest.fixture
def round_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of MSETs of every grouped round, in order."""
    sizes: list[int] = []
    original = KVEngine._mset_round

    async def counted(self: KVEngine, msets: list[Any]) -> Any:
        sizes.append(len(msets))
        return await original(self, msets)

    monkeypatch.setattr(KVEngine, "_mset_round", counted)
    return sizes


def spanning(kv: kvmemo.Store, tag: str) -> dict[str, str]:
    """Four keys on more than one shard, their value ``tag``."""
    keys = [f"{tag}:{i}" for i in range(4)]
    assert len({kv.engine.slots.shard_of(k.encode()) for k in keys}) > 1
    return dict.fromkeys(keys, tag)


async def test_concurrent_writers_share_full_rounds(round_sizes: list[int]) -> None:
    async with kvmemo.open_store(shards=4) as kv:

        async def writer(w: int) -> None:
            for n in range(MSETS_EACH):
                await kv.mset(spanning(kv, f"w{w}n{n}"))

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(writer, w)
        assert sum(round_sizes) == WRITERS * MSETS_EACH
        # The first caller leads alone (nothing ran before it), the others
        # gather behind it; from then on every writer is in every round.
        assert len(round_sizes) <= MSETS_EACH + 2, round_sizes
        assert round_sizes.count(1) <= 1, round_sizes
        for w in range(WRITERS):
            assert await kv.get(f"w{w}n{MSETS_EACH - 1}:0") == f"w{w}n{MSETS_EACH - 1}".encode()


async def test_a_lone_writer_takes_its_round_at_once(round_sizes: list[int]) -> None:
    async with kvmemo.open_store(shards=4) as kv:
        for n in range(5):
            await kv.mset(spanning(kv, f"n{n}"))
        assert round_sizes == [1] * 5
        assert kv.engine._mset_last_round == 1  # no reason to gather next time


async def test_a_leader_cancelled_while_it_gathers_leaves_the_lead(
    autojump_clock: trio.testing.MockClock, round_sizes: list[int]
) -> None:
    async with kvmemo.open_store(shards=4, request_timeout=1.0) as kv:
        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(kv.mset, spanning(kv, f"w{w}"))
        assert kv.engine._mset_last_round > 1  # the next leader gathers first

        with trio.CancelScope() as scope:
            scope.cancel()  # lands at its first checkpoint: the gather
            await kv.mset(spanning(kv, "cancelled"))
        assert scope.cancelled_caught
        assert not kv.engine._mset_leading
        assert kv.engine._mset_waiting == []

        with trio.fail_after(0.5):  # not stalled behind a lead nobody holds
            assert await kv.mset(spanning(kv, "after")) == "OK"
        assert await kv.get("cancelled:0") is None
        assert await kv.get("after:0") == b"after"
