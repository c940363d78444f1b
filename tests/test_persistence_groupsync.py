"""Cross-shard group commit: the sync rounds shared by the shards of one store.

Determinism: a round is held in its worker thread by a *gate* (a call that
blocks on a ``threading.Event``); the test waits for the gate's thread to
enter (``trio.to_thread.run_sync(entered.wait)``, an effect, not a delay),
files more requests, waits until every task is blocked, checks what is
gathering, then opens the gate.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import kvmemo
from actors import EventKind
from kvmemo.errors import KVMemoError
from kvmemo.persistence import SegmentedLog, recover
from kvmemo.storage.sync_coordinator import SyncCoordinator, _run_round

GATE_TIMEOUT = 10.0  # seconds a gate waits at most (a failing test must not hang)


class Gate:
    """A call that holds its round's worker thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        self.release.wait(GATE_TIMEOUT)

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait, GATE_TIMEOUT)
        assert self.entered.is_set()


def recorder(ran: list[str], name: str, error: OSError | None = None) -> Callable[[], None]:
    def call() -> None:
        ran.append(name)
        if error is not None:
            raise error

    return call


async def hold_a_round(coord: SyncCoordinator, nursery: trio.Nursery) -> Gate:
    """Start a round that runs only the gate, and wait until it is in its thread."""
    gate = Gate()
    nursery.start_soon(coord.sync, gate)
    await gate.wait_entered()
    return gate


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^gather_passes must be >= 0, got -1$"):
        SyncCoordinator(gather_passes=-1)
    with pytest.raises(ValueError, match=r"^width must be >= 1, got 0$"):
        SyncCoordinator(width=0)


def test_a_round_over_several_lanes_gives_each_call_its_own_outcome_in_order() -> None:
    ran: list[str] = []
    boom = OSError(errno.EIO, "Input/output error")
    calls = [recorder(ran, str(i), boom if i in (2, 5) else None) for i in range(7)]
    errors = _run_round(calls, 3)
    assert errors == [None, None, boom, None, None, boom, None]
    assert sorted(ran) == [str(i) for i in range(7)]


async def test_requests_filed_during_a_round_are_synced_together_in_the_next_round() -> None:
    coord = SyncCoordinator()
    ran: list[str] = []
    with trio.fail_after(GATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            gate = await hold_a_round(coord, nursery)
            for name in ("a", "b", "c"):
                nursery.start_soon(coord.sync, recorder(ran, name))
            await trio.testing.wait_all_tasks_blocked()
            stats = coord.statistics()
            assert (stats.gathering, stats.leading, ran) == (3, True, [])
            gate.release.set()
    stats = coord.statistics()
    assert sorted(ran) == ["a", "b", "c"]
    assert (stats.rounds, stats.requests) == (2, 4)  # the gate's round, then one for all three
    assert (stats.gathering, stats.leading) == (0, False)


async def test_an_error_of_one_request_fails_that_request_only() -> None:
    coord = SyncCoordinator()
    ran: list[str] = []
    outcomes: dict[str, str] = {}
    full = OSError(errno.ENOSPC, "No space left on device")

    async def request(name: str, error: OSError | None = None) -> None:
        try:
            await coord.sync(recorder(ran, name, error))
        except OSError as exc:
            outcomes[name] = exc.strerror or ""
        else:
            outcomes[name] = "ok"

    with trio.fail_after(GATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            gate = await hold_a_round(coord, nursery)
            nursery.start_soon(request, "shard-0")
            nursery.start_soon(request, "shard-1", full)
            nursery.start_soon(request, "shard-2")
            await trio.testing.wait_all_tasks_blocked()
            gate.release.set()
    assert outcomes == {"shard-0": "ok", "shard-1": "No space left on device", "shard-2": "ok"}
    assert sorted(ran) == ["shard-0", "shard-1", "shard-2"]
    assert coord.statistics().rounds == 2


async def test_a_requester_cancelled_while_gathering_withdraws_its_call() -> None:
    coord = SyncCoordinator()
    ran: list[str] = []
    cancelled = trio.CancelScope()

    async def withdrawn() -> None:
        with cancelled:
            await coord.sync(recorder(ran, "withdrawn"))

    with trio.fail_after(GATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            gate = await hold_a_round(coord, nursery)
            nursery.start_soon(withdrawn)  # the oldest: it would lead the next round
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(coord.sync, recorder(ran, "kept"))
            await trio.testing.wait_all_tasks_blocked()
            assert coord.statistics().gathering == 2
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert coord.statistics().gathering == 1
            gate.release.set()
    assert cancelled.cancelled_caught
    assert ran == ["kept"]  # the next oldest led the round instead
    stats = coord.statistics()
    assert (stats.rounds, stats.requests, stats.gathering, stats.leading) == (2, 2, 0, False)


async def test_a_leader_cancelled_mid_round_still_answers_its_round_and_hands_over() -> None:
    coord = SyncCoordinator(gather_passes=0, width=1)  # one lane: the gate blocks the round
    ran: list[str] = []
    leader_gate = Gate()
    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await coord.sync(leader_gate)
            ran.append("leader answered")  # its cancellation comes at its next checkpoint

    with trio.fail_after(GATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            first = await hold_a_round(coord, nursery)
            nursery.start_soon(leader)  # the oldest gathering: it leads the next round
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(coord.sync, recorder(ran, "same round"))
            await trio.testing.wait_all_tasks_blocked()
            first.release.set()
            await leader_gate.wait_entered()
            nursery.start_soon(coord.sync, recorder(ran, "next round"))
            await trio.testing.wait_all_tasks_blocked()
            leader_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # The round is shielded: the leader waits for its thread, the
            # request after it keeps gathering.
            assert ran == []
            assert coord.statistics().gathering == 1
            leader_gate.release.set()
    assert ran == ["same round", "leader answered", "next round"]
    stats = coord.statistics()
    assert (stats.rounds, stats.requests, stats.gathering, stats.leading) == (3, 4, 0, False)


async def test_a_follower_cancelled_while_its_round_runs_leaves_only_after_the_round() -> None:
    coord = SyncCoordinator(gather_passes=0, width=1)  # one lane: the gate blocks the round
    ran: list[str] = []
    leader_gate = Gate()
    follower_scope = trio.CancelScope()
    seen: list[str] = []

    async def follower() -> None:
        with follower_scope:
            try:
                await coord.sync(recorder(ran, "follower"))
            except trio.Cancelled:
                seen.append(f"cancelled after {ran}")
                raise
            seen.append("returned")  # not reached: the cancellation is taken on return

    with trio.fail_after(GATE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            first = await hold_a_round(coord, nursery)
            nursery.start_soon(coord.sync, leader_gate)  # the oldest: it leads the next round
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            first.release.set()
            await leader_gate.wait_entered()  # the round holding the follower's call runs
            follower_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # Its call is in the running round: the follower stays until the round ends.
            assert seen == []
            assert coord.statistics().leading
            leader_gate.release.set()
    assert follower_scope.cancelled_caught
    assert seen == ["cancelled after ['follower']"]  # its call ran before it left
    stats = coord.statistics()
    assert (stats.rounds, stats.requests, stats.gathering, stats.leading) == (2, 3, 0, False)


async def test_a_leader_cancelled_before_taking_its_round_runs_nothing_and_leaves_it_idle() -> None:
    coord = SyncCoordinator()
    ran: list[str] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await coord.sync(recorder(ran, "never"))
    assert scope.cancelled_caught
    stats = coord.statistics()
    assert (ran, stats.rounds, stats.gathering, stats.leading) == ([], 0, 0, False)
    await coord.sync(recorder(ran, "later"))
    assert ran == ["later"]


# -- in a store -------------------------------------------------------------------------------


def key_on_shard(kv: kvmemo.Store, shard: int, prefix: str = "k") -> bytes:
    n = 0
    while kv.engine.slots.shard_of(f"{prefix}-{n}".encode()) != shard:
        n += 1
    return f"{prefix}-{n}".encode()


def writer(
    kv: kvmemo.Store, keys: list[bytes], outcomes: dict[int, str]
) -> Callable[[int], Awaitable[None]]:
    """``write(shard)``: SET that shard's key to b"v"; record "ok" or "KIND applied"."""

    async def write(shard: int) -> None:
        try:
            await kv.set(keys[shard], b"v")
        except KVMemoError as exc:
            outcomes[shard] = f"{exc.kind} {exc.data['applied']}"
        else:
            outcomes[shard] = "ok"

    return write


def fail_next_sync_of(monkeypatch: pytest.MonkeyPatch, shard_dir: str) -> set[str]:
    """Make the next ``SegmentedLog.sync`` of ``shard_dir``'s log fail with EIO.

    Returns the set of directory names still to fail (empty once it has failed).
    """
    real_sync = SegmentedLog.sync
    failing = {shard_dir}

    def sync(log: SegmentedLog) -> None:
        if log.directory.name in failing:
            failing.discard(log.directory.name)
            raise OSError(errno.EIO, "Input/output error", str(log.path(log.current)))
        real_sync(log)

    monkeypatch.setattr(SegmentedLog, "sync", sync)
    return failing


async def write_each_shard_in_one_round(
    kv: kvmemo.Store, coord: SyncCoordinator, write: Callable[[int], Awaitable[None]]
) -> None:
    """``write(shard)`` for the 4 shards of ``kv``, their batches gathered into one sync round."""
    async with trio.open_nursery() as nursery:
        gate = await hold_a_round(coord, nursery)
        for shard in range(4):
            nursery.start_soon(write, shard)
        await trio.testing.wait_all_tasks_blocked()
        assert coord.statistics().gathering == 4  # the next round holds all four
        gate.release.set()


def coordinator_of(kv: kvmemo.Store) -> SyncCoordinator:
    assert kv.engine.persistence is not None
    return kv.engine.persistence.sync_coordinator


def count_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


async def test_writes_to_every_shard_are_made_durable_in_one_round(tmp_path: Path) -> None:
    data_dir = str(tmp_path)
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=data_dir, appendfsync="always") as kv:
            coord = coordinator_of(kv)
            keys = [key_on_shard(kv, shard) for shard in range(4)]
            before = coord.statistics()
            async with trio.open_nursery() as nursery:
                gate = await hold_a_round(coord, nursery)
                for key in keys:
                    nursery.start_soon(kv.set, key, b"v:" + key)
                await trio.testing.wait_all_tasks_blocked()
                assert coord.statistics().gathering == 4  # one batch per shard, waiting
                gate.release.set()
            after = coord.statistics()
            # The gate's round, then one round for the four shards' batches.
            assert (after.rounds - before.rounds, after.requests - before.requests) == (2, 5)
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*keys) == [b"v:" + key for key in keys]


async def test_a_failed_sync_of_one_shard_fails_only_that_shards_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_next_sync_of(monkeypatch, "shard-1")
    data_dir = str(tmp_path)
    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        # Each log synced itself: the commit log (the default) fails a round
        # as a whole, see test_persistence_commitlog.
        async with kvmemo.open_store(
            shards=4, data_dir=data_dir, appendfsync="always", fsync_method="fsync"
        ) as kv:
            coord = coordinator_of(kv)
            keys = [key_on_shard(kv, shard) for shard in range(4)]
            await write_each_shard_in_one_round(kv, coord, writer(kv, keys, outcomes))
            assert outcomes == {0: "ok", 1: "IO None", 2: "ok", 3: "ok"}
            info = (await kv.info("persistence"))["persistence"]
            assert info["failing_shards"] == ["shard-1"]
            await kv.set(keys[1], b"again")  # the next batch goes to a new segment
            # Still failing: the failed sync's bytes are in doubt until a
            # snapshot re-saves them (see test_persistence_resave).
            assert (await kv.info("persistence"))["persistence"]["health"] == "failing"
            assert await kv.execute("save") == "OK"
            assert (await kv.info("persistence"))["persistence"]["health"] == "ok"
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*keys) == [b"v", b"again", b"v", b"v"]


async def test_a_shard_killed_while_its_batch_waits_fails_that_batch_and_restarts(
    tmp_path: Path,
) -> None:
    data_dir = str(tmp_path)
    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=data_dir, appendfsync="always") as kv:
            coord = coordinator_of(kv)
            keys = [key_on_shard(kv, shard) for shard in range(4)]
            write = writer(kv, keys, outcomes)

            async with kv.system.events.subscribe() as events:
                async with trio.open_nursery() as nursery:
                    gate = await hold_a_round(coord, nursery)
                    for shard in range(4):
                        nursery.start_soon(write, shard)
                    await trio.testing.wait_all_tasks_blocked()
                    assert coord.statistics().gathering == 4
                    assert kv.kill_actor("shard-2")
                    await trio.testing.wait_all_tasks_blocked()
                    assert coord.statistics().gathering == 3  # its batch withdrew
                    gate.release.set()
                async for event in events:
                    if event.actor == "shard-2" and event.kind is EventKind.RESTARTED:
                        break
            assert outcomes[2] == "INTERNAL None"  # may or may not last
            assert {s: outcomes[s] for s in (0, 1, 3)} == {0: "ok", 1: "ok", 3: "ok"}
            # The withdrawn batch is in memory, so it went to the log too (unsynced),
            # where a crash of the whole process would find what the shard served.
            assert await kv.get(keys[2]) == b"v"
            on_disk = recover(tmp_path / "shard-2", now_ms=int(time.time() * 1000))
            assert on_disk.data.get(keys[2]) == b"v"
            await kv.set(keys[2], b"after")  # the restarted shard syncs in later rounds
            stats = coord.statistics()
            assert (stats.gathering, stats.leading) == (0, False)
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*keys) == [b"v", b"v", b"after", b"v"]


async def test_no_task_outlives_the_store_and_the_coordinator_is_left_idle(
    tmp_path: Path,
) -> None:
    before = count_tasks()
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync="always") as kv:
            coord = coordinator_of(kv)
            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(kv.set, f"key{i}", b"v")
    assert count_tasks() == before
    stats = coord.statistics()
    assert stats.requests >= 4
    assert (stats.gathering, stats.leading) == (0, False)


async def test_with_always_a_write_batched_with_a_save_is_synced_before_its_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Save drained in the same batch as a write appends the write for the
    snapshot's rotation; the write must still be on disk before it is answered."""
    from kvmemo.commands import ops
    from kvmemo.commands.args import NO_EXPIRY
    from kvmemo.storage.durable_shard import Save

    syncs: list[int] = []
    real_sync = SegmentedLog.sync

    def counting_sync(log: SegmentedLog) -> None:
        real_sync(log)
        syncs.append(1)

    monkeypatch.setattr(SegmentedLog, "sync", counting_sync)
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=1, data_dir=str(tmp_path), appendfsync="always") as kv:
            ref = kv.system.ref("shard-0")
            await trio.testing.wait_all_tasks_blocked()
            syncs.clear()
            write = ref.ask_nowait(ops.Set(b"k", b"v", NO_EXPIRY, nx=False, xx=False, get=False))
            save = ref.ask_nowait(Save())
            assert await write.wait() == "OK"
            assert syncs, "the write was answered before any sync of its log"
            await (await save.wait()).wait()


async def test_a_shard_killed_while_its_batch_is_in_the_running_round_waits_for_the_round(
    tmp_path: Path,
) -> None:
    """The round may be appending and syncing the shard's batch in a worker
    thread: the kill takes effect once the round is over (at most one round),
    never while the thread still writes that shard's log."""
    data_dir = str(tmp_path)
    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=data_dir, appendfsync="always") as kv:
            coord = coordinator_of(kv)
            keys = [key_on_shard(kv, shard) for shard in range(4)]
            write = writer(kv, keys, outcomes)

            async with kv.system.events.subscribe() as events:
                async with trio.open_nursery() as nursery:
                    first = await hold_a_round(coord, nursery)
                    second = Gate()
                    nursery.start_soon(coord.sync, second)
                    for shard in range(4):
                        nursery.start_soon(write, shard)
                    await trio.testing.wait_all_tasks_blocked()
                    assert coord.statistics().gathering == 5
                    first.release.set()
                    await second.wait_entered()  # the next round: the gate and the 4 batches
                    assert coord.statistics().gathering == 0
                    assert kv.kill_actor("shard-2")
                    await trio.testing.wait_all_tasks_blocked()
                    assert 2 not in outcomes  # shard-2 waits for the round it is in
                    assert kv.system.events.count("shard-2", EventKind.RESTARTED) == 0
                    second.release.set()
                async for event in events:
                    if event.actor == "shard-2" and event.kind is EventKind.RESTARTED:
                        break
            assert outcomes[2] == "INTERNAL None"  # may or may not last: it did
            assert {s: outcomes[s] for s in (0, 1, 3)} == {0: "ok", 1: "ok", 3: "ok"}
            assert (await kv.info("persistence"))["persistence"]["health"] == "ok"
        on_disk = recover(tmp_path / "shard-2", now_ms=int(time.time() * 1000))
        assert on_disk.data.get(keys[2]) == b"v"


def test_a_lane_that_cannot_start_fails_the_round_only_after_the_started_lanes_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No helper thread's work may outlive its round, even when the round fails."""
    from kvmemo.storage import sync_coordinator
    from kvmemo.storage.sync_coordinator import RoundIncompleteError

    real_start = trio.lowlevel.start_thread_soon
    starts: list[int] = []

    def start_once(fn: Callable[[], object], deliver: Callable[..., object], name: str) -> None:
        if starts:
            raise RuntimeError("no more threads")
        starts.append(1)
        real_start(fn, deliver, name)

    monkeypatch.setattr(sync_coordinator.trio.lowlevel, "start_thread_soon", start_once)
    events: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(GATE_TIMEOUT)
        events.append("slow lane done")

    errors: list[BaseException] = []

    def run() -> None:
        try:
            _run_round([recorder([], "a"), slow, recorder([], "c")], 3)
        except RoundIncompleteError as exc:
            errors.append(exc)
        events.append("round returned")

    runner = threading.Thread(target=run)
    runner.start()
    assert entered.wait(GATE_TIMEOUT)
    runner.join(0.2)  # the round must still be waiting for its started lane
    release.set()
    runner.join(GATE_TIMEOUT)
    assert events == ["slow lane done", "round returned"]
    assert len(errors) == 1
