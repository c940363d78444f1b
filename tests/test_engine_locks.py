"""The engine's readers-writer lock (multi-shard atomicity)."""

from __future__ import annotations

import trio
import trio.testing

from kvmemo.engine.locks import RWLock


async def test_a_cancelled_acquire_never_leaves_the_lock_held() -> None:
    lock = RWLock()
    for write in (True, False):
        with trio.CancelScope() as scope:
            scope.cancel()
            await lock.acquire(write=write)
        assert scope.cancelled_caught
        assert not lock.writer
        assert lock.readers == 0
    await lock.acquire(write=True)  # still free for the next one
    lock.release(write=True)


async def test_readers_share_and_a_writer_is_alone() -> None:
    lock = RWLock()
    await lock.acquire(write=False)
    await lock.acquire(write=False)
    assert lock.readers == 2
    got: list[str] = []

    async def writer() -> None:
        await lock.acquire(write=True)
        got.append("writer")
        lock.release(write=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        lock.release(write=False)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        lock.release(write=False)
    assert got == ["writer"]


async def test_waiters_are_served_in_arrival_order_so_writers_do_not_starve() -> None:
    lock = RWLock()
    order: list[str] = []

    async def take(name: str, write: bool) -> None:
        await lock.acquire(write=write)
        order.append(name)
        await trio.lowlevel.checkpoint()
        lock.release(write=write)

    await lock.acquire(write=False)
    async with trio.open_nursery() as nursery:
        for name, write in [("w1", True), ("r1", False), ("r2", False), ("w2", True)]:
            nursery.start_soon(take, name, write)
            await trio.testing.wait_all_tasks_blocked()
        lock.release(write=False)
    assert order[0] == "w1"
    assert set(order[1:3]) == {"r1", "r2"}
    assert order[3] == "w2"


async def test_a_queued_waiter_cancelled_lets_the_others_through() -> None:
    lock = RWLock()
    await lock.acquire(write=False)
    got: list[str] = []
    writer_scope = trio.CancelScope()

    async def writer() -> None:
        with writer_scope:
            await lock.acquire(write=True)
            got.append("writer")
            lock.release(write=True)

    async def reader() -> None:
        await lock.acquire(write=False)
        got.append("reader")
        lock.release(write=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # behind the queued writer (FIFO)
        writer_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["reader"]
        lock.release(write=False)
    assert not lock.writer
    assert lock.readers == 0
