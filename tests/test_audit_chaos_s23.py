"""Chaos audit, session 23: what broke when actors were killed under load, pinned.

Each test reproduces one failure found by killing actors (shards with
persistence on, supervisors, ...) while commands ran, deterministically:
the moment of the kill is held by an event (a gated snapshot writer, a gated
sync), never by a sleep.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_actors_supervision import NO_JITTER, Echo, Journal, specs, wait_for
from test_bgsave import finish_bgsave
from test_engine_atomic import wait_running

import kvmemo
from actors import (
    ActorKilled,
    ChildSpec,
    EventKind,
    Supervisor,
    SupervisorGaveUp,
    open_actor_system,
)
from kvmemo.errors import KVMemoError
from kvmemo.storage import durable_shard
from kvmemo.storage.durable_shard import DurableShardActor

TIMEOUT = 10  # seconds: a bound, never reached when the code is right
ANSWER = 5  # seconds within which a ticket must be answered once its shard is down


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Snapshot writes wait until ``release`` is set; ``entered`` tells one started."""
    entered, release = threading.Event(), threading.Event()
    write: Callable[..., Any] = durable_shard.write_snapshot

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(TIMEOUT)
        return write(*args, **kwargs)

    monkeypatch.setattr(durable_shard, "write_snapshot", gated)
    yield entered, release
    release.set()


async def test_a_snapshot_queued_on_a_killed_shard_fails_instead_of_staying_in_progress(
    tmp_path: Path, gate: tuple[threading.Event, threading.Event]
) -> None:
    # Before: the second snapshot waited in the killed incarnation's queue,
    # which died with it; its ticket was never answered, so BGSAVE stayed "in
    # progress" forever and refused every SAVE and BGSAVE after it.
    entered, release = gate
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=1, data_dir=str(tmp_path)) as kv:
            await kv.set("k", "v")
            assert await kv.execute("bgsave") == "Background saving started"
            await trio.to_thread.run_sync(entered.wait, TIMEOUT)  # the first one is writing
            assert await kv.execute("bgsave", "schedule") == "Background saving scheduled"
            assert kv.kill_actor("shard-0")
            release.set()  # the first snapshot completes (a thread is not cancelled)
            with trio.fail_after(ANSWER):
                await finish_bgsave(kv)
            [ticket] = kv.engine._bgsave
            assert ticket.error is not None
            assert "stopped before writing its snapshot" in str(ticket.error)
            await wait_running(kv.system, "shard-0")
            persistence = (await kv.info("persistence"))["persistence"]
            assert persistence["bgsave_in_progress"] is False
            assert persistence["last_bgsave_status"] == "err"
            # The restarted shard snapshots again, and that one is written.
            assert await kv.execute("save") == "OK"
            assert await kv.execute("bgsave") == "Background saving started"
            await finish_bgsave(kv)
            persistence = (await kv.info("persistence"))["persistence"]
            assert persistence["last_bgsave_status"] == "ok"
        async with kvmemo.open_store(shards=1, data_dir=str(tmp_path)) as kv:
            assert await kv.get("k") == b"v"


async def test_a_snapshot_cut_off_by_a_kill_is_not_reported_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the writer, killed while it synced the log ahead of the
    # snapshot, answered the ticket in a ``finally`` without an error: BGSAVE
    # reported "ok" (and SAVE "OK") for a snapshot never written.
    entered, release = trio.Event(), trio.Event()
    armed = False
    sync = DurableShardActor._sync

    async def gated_sync(self: DurableShardActor) -> Any:
        if armed:
            entered.set()
            await release.wait()  # cancelled by the kill
        return await sync(self)

    monkeypatch.setattr(DurableShardActor, "_sync", gated_sync)
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(
            shards=1, data_dir=str(tmp_path), appendfsync="everysec"
        ) as kv:
            await kv.set("k", "v")
            armed = True
            assert await kv.execute("bgsave") == "Background saving started"
            await entered.wait()  # the writer waits for its sync
            assert kv.kill_actor("shard-0")
            with trio.fail_after(ANSWER):
                await finish_bgsave(kv)
            [ticket] = kv.engine._bgsave
            assert ticket.error is not None
            persistence = (await kv.info("persistence"))["persistence"]
            assert persistence["last_bgsave_status"] == "err"
            armed = False
            release.set()
            await wait_running(kv.system, "shard-0")
            assert await kv.execute("save") == "OK"
            persistence = (await kv.info("persistence"))["persistence"]
            assert persistence["last_bgsave_status"] is not None


async def test_a_save_waiting_on_a_killed_shard_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: SAVE answered "OK" for the snapshot its shard's kill cut off
    # (or, when the snapshot was still queued, waited until the request
    # timeout); now it fails at once with IO, not applied.
    entered = trio.Event()
    armed = False
    sync = DurableShardActor._sync

    async def gated_sync(self: DurableShardActor) -> Any:
        if armed:
            entered.set()
            await trio.sleep_forever()  # cancelled by the kill
        return await sync(self)

    monkeypatch.setattr(DurableShardActor, "_sync", gated_sync)
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(
            shards=1, data_dir=str(tmp_path), appendfsync="everysec", request_timeout=60.0
        ) as kv:
            await kv.set("k", "v")
            armed = True
            outcome: list[BaseException | str] = []

            async def save() -> None:
                try:
                    outcome.append(await kv.execute("save"))
                except KVMemoError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(save)
                await entered.wait()
                armed = False
                assert kv.kill_actor("shard-0")
                with trio.fail_after(ANSWER):
                    while not outcome:
                        await trio.lowlevel.checkpoint()
            [error] = outcome
            assert isinstance(error, KVMemoError)
            assert (error.kind, error.data["applied"]) == ("IO", False)
            assert "stopped before writing its snapshot" in error.message


async def kill_until_root_gives_up(kv: kvmemo.Store) -> None:
    """Kill the storage supervisor each time it runs (max_restarts=1): the root gives up."""
    with trio.fail_after(TIMEOUT):
        async with kv.system.events.subscribe() as events:
            assert kv.kill_actor("storage")
            async for event in events:
                if event.actor == "storage" and event.kind is EventKind.RESTARTED:
                    assert kv.kill_actor("storage")


async def test_a_root_supervisor_giving_up_ends_open_store_with_that_error_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Before: the block was cancelled and open_store raised the give-up
    # wrapped in two levels of ExceptionGroup (one per nursery), so that an
    # ``except SupervisorGaveUp`` around the block never caught it.
    reached: list[str] = []
    stores: list[kvmemo.Store] = []

    async def block() -> None:
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path), max_restarts=1) as kv:
            stores.append(kv)
            await kv.set("k", "v")
            try:
                await kill_until_root_gives_up(kv)
            except trio.Cancelled:
                reached.append("cancelled")  # the store failed: its block is cancelled
                raise
            reached.append("not cancelled")

    with pytest.raises(SupervisorGaveUp) as info:
        await block()
    assert reached == ["cancelled"]
    [kv] = stores
    assert info.value.supervisor == "root"
    assert isinstance(info.value.__cause__, ActorKilled)  # the last failure
    assert kv.engine.closed
    with pytest.raises(KVMemoError) as closed:
        await kv.get("k")
    assert closed.value.kind == "UNAVAILABLE"
    # Nothing acknowledged is lost, and the data directory is free again.
    async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
        assert await kv.get("k") == b"v"


async def test_a_root_supervisor_giving_up_fails_serve_nursery_with_that_error_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stores: list[kvmemo.Store] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            stores.append(await kvmemo.serve(nursery, shards=1, max_restarts=1))
            await kill_until_root_gives_up(stores[0])

    with pytest.raises(BaseExceptionGroup) as info:
        await run()
    # The caller's own nursery's group (trio's), holding the give-up itself,
    # not another group around it.
    [error] = info.value.exceptions
    assert isinstance(error, SupervisorGaveUp)
    assert stores[0].engine.closed


async def test_a_killed_nested_supervisor_stops_its_children_hard_not_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Before: killing a nested supervisor stopped its children gracefully,
    # one after the other, each within its shutdown_timeout (a durable
    # shard's graceful stop writes a final snapshot): a kill of the storage
    # supervisor kept the shards down for as long as every snapshot took.
    journal = Journal()
    inner = Supervisor("inner", specs(journal, "x", "y"), backoff=NO_JITTER)
    root = Supervisor("root", [ChildSpec.for_supervisor(inner)], backoff=NO_JITTER)
    async with open_actor_system(root) as system:
        assert await system.ref("x").ask(Echo(1)) == 1
        killed_at = trio.current_time()
        assert system.kill("inner")
        await wait_for(system, "inner", EventKind.RESTARTED)
        assert trio.current_time() - killed_at == pytest.approx(NO_JITTER.initial)
        assert journal.of("stop") == []  # no on_stop: stopped hard, as by a kill
        assert await system.ref("y").ask(Echo(2)) == 2
    # A shutdown still stops them gracefully (on_stop, in reverse order).
    assert journal.of("stop") == [("y", 2), ("x", 2)]


async def test_a_killed_storage_supervisor_restarts_its_shards_without_a_snapshot_each(
    tmp_path: Path,
) -> None:
    # (The real clock: under the mock one, the graceful stops' syncs in
    # worker threads let the clock jump past their shutdown timeout.)
    with trio.fail_after(TIMEOUT):
        await kill_storage_once(tmp_path)
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
        assert await kv.get("k39") == b"v39"


async def kill_storage_once(tmp_path: Path) -> None:
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
        await kv.mset({f"k{i}": f"v{i}" for i in range(40)})
        async with kv.system.events.subscribe() as events:
            assert kv.kill_actor("storage")
            async for event in events:
                if event.actor == "storage" and event.kind is EventKind.RESTARTED:
                    break
        # Stopped hard: no final snapshot.
        assert not await trio.to_thread.run_sync(lambda: list(tmp_path.glob("shard-*/snap-*")))
        assert await kv.mget(*[f"k{i}" for i in range(40)]) == [f"v{i}".encode() for i in range(40)]


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
async def test_a_store_whose_root_gave_up_leaves_no_shard_log_open(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Before: the shards, stopped hard, never closed their logs (a graceful
    # stop does, in on_stop): every give-up leaked one descriptor per shard.
    async def block() -> None:
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), max_restarts=1) as kv:
            await kv.mset({f"k{i}": "v" for i in range(20)})
            await kill_until_root_gives_up(kv)

    before = open_descriptors()
    with pytest.raises(SupervisorGaveUp):
        await block()
    assert open_descriptors() == before
    async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
        assert await kv.get("k19") == b"v"
