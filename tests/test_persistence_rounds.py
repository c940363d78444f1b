"""The sync round's hand-off (``_in_thread``) and parked requesters, under cancellation and kills.

Each requester must get exactly one outcome, a call must never run twice, a
requester must never leave while its call runs in a worker thread, and no
task may be left parked. The random schedules run under
``trio.testing.MockClock(autojump_threshold=0)``: the clock jumps to the next
cancellation whenever every task is blocked, so cancellations land while a
round's thread runs, as well as while requests gather.
"""

from __future__ import annotations

import errno
import functools
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from kvmemo.storage import sync_coordinator
from kvmemo.storage.sync_coordinator import SyncCoordinator

KILL_ROUNDS = 12  # kills (two shards each) while a round runs
RUN_TIMEOUT = 60.0  # real seconds a whole random run may take (it runs in a thread)


class Call:
    """A call that records how often it started and finished, and when."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.started += 1
        try:
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
        finally:
            with self.lock:
                self.finished += 1


def run_bounded(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging) if it does not end in time."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT)
    assert not thread.is_alive(), "the run hung (a task left parked?)"
    if failure:
        raise failure[0]
    return result[0]


async def random_schedule(seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    coord = SyncCoordinator(gather_passes=rng.choice([0, 1, 3]), width=rng.choice([1, 2, 4]))
    count = 80
    calls = [Call(fail=rng.random() < 0.1) for _ in range(count)]
    outcomes: dict[int, list[str]] = {i: [] for i in range(count)}
    scopes = [trio.CancelScope() for _ in range(count)]
    starts = [rng.choice([0.0, 0.0, 0.001, 0.002, 0.005]) for _ in range(count)]
    # None: never cancelled; a float: a deadline (virtual seconds); an int: cancelled
    # by another task after that many checkpoints.
    cancels: list[float | int | None] = [
        rng.choice([None, None, rng.random() * 0.01, rng.randrange(0, 4)]) for _ in range(count)
    ]

    async def requester(i: int) -> None:
        await trio.sleep(starts[i])
        scope = scopes[i]
        cancel = cancels[i]
        if isinstance(cancel, float):
            scope.deadline = trio.current_time() + cancel
        call = calls[i]
        with scope:
            try:
                await coord.sync(call)
            except OSError:
                outcomes[i].append("error")
            except trio.Cancelled:
                outcomes[i].append("cancelled")
                raise
            else:
                outcomes[i].append("ok")
            finally:
                # Never leaves while its call runs in a worker thread.
                with call.lock:
                    assert call.started == call.finished, f"requester {i} outran its call"

    async def canceller(i: int, passes: int) -> None:
        await trio.sleep(starts[i])
        for _ in range(passes):
            await trio.lowlevel.checkpoint()
        scopes[i].cancel()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(requester, i)
            cancel = cancels[i]
            if isinstance(cancel, int):
                nursery.start_soon(canceller, i, cancel)
    ran = 0
    for i, call in enumerate(calls):
        assert call.started == call.finished <= 1, f"call {i} ran {call.started} times"
        assert len(outcomes[i]) == 1, f"requester {i} got {outcomes[i]}"
        outcome = outcomes[i][0]
        if outcome == "ok":
            assert call.started == 1
            assert not call.fail
        elif outcome == "error":
            assert call.started == 1
            assert call.fail
        ran += call.started
    stats = coord.statistics()
    assert (stats.gathering, stats.leading) == (0, False)
    assert stats.requests == ran  # every request taken by a round ran exactly once
    # A later round still works (the coordinator was left consistent).
    later = Call(fail=False)
    await coord.sync(later)
    assert later.finished == 1
    tally = {"ok": 0, "error": 0, "cancelled": 0}
    for outcome_list in outcomes.values():
        tally[outcome_list[0]] += 1
    return tally


@pytest.mark.parametrize("seed", range(12))
def test_random_cancellations_give_every_requester_one_outcome(seed: int) -> None:
    tally = run_bounded(
        lambda: trio.run(random_schedule, seed, clock=trio.testing.MockClock(autojump_threshold=0))
    )
    assert sum(tally.values()) == 80


def test_random_cancellations_hit_every_stage() -> None:
    """Across the seeds, some requesters are cancelled and some complete (the runs bite)."""
    total = {"ok": 0, "error": 0, "cancelled": 0}
    for seed in range(12, 16):
        tally = run_bounded(
            functools.partial(
                trio.run, random_schedule, seed, clock=trio.testing.MockClock(autojump_threshold=0)
            )
        )
        for key, value in tally.items():
            total[key] += value
    assert total["ok"] > 0
    assert total["error"] > 0
    assert total["cancelled"] > 0


async def test_a_round_whose_thread_cannot_start_fails_every_requester_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sync() documents RoundIncompleteError for a round whose thread did not start.

    The followers get it; the leader must get it too (a shard catches
    RoundIncompleteError and OSError only, see DurableShardActor._append_durably).
    """

    def cannot_start(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    coord = SyncCoordinator()
    calls = [Call(fail=False) for _ in range(3)]
    outcomes: dict[int, str] = {}

    async def requester(i: int) -> None:
        try:
            await coord.sync(calls[i])
        except Exception as exc:  # noqa: BLE001 - recorded
            outcomes[i] = type(exc).__name__
        else:
            outcomes[i] = "ok"

    with trio.fail_after(10):
        monkeypatch.setattr(trio.lowlevel, "start_thread_soon", cannot_start)
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(requester, i)
        monkeypatch.undo()
        assert [c.started for c in calls] == [0, 0, 0]
        stats = coord.statistics()
        assert (stats.rounds, stats.gathering, stats.leading) == (1, 0, False)
        assert outcomes == {i: "RoundIncompleteError" for i in range(3)}
        later = Call(fail=False)
        await coord.sync(later)
        assert later.finished == 1


KI_SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, trio, trio.testing
    from kvmemo.storage.sync_coordinator import SyncCoordinator

    ROLE = {role!r}
    events = []

    def interrupting():
        events.append("call started")
        os.kill(os.getpid(), signal.SIGINT)  # delivered to trio's main task meanwhile
        # Give the main thread time to take the signal before the call ends
        # (the assertion below does not depend on it).
        threading.Event().wait(0.2)
        events.append("call finished")

    async def main():
        coord = SyncCoordinator(gather_passes=0, width=1)
        if ROLE == "leader":
            await coord.sync(interrupting)
        else:
            gate_entered, release = threading.Event(), threading.Event()
            def gate():
                gate_entered.set()
                release.wait(10)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(coord.sync, gate)
                await trio.to_thread.run_sync(gate_entered.wait, 10)
                # Another requester files first (it leads the next round), then
                # the main task: the next round holds its call as a follower.
                nursery.start_soon(coord.sync, lambda: None)
                await trio.testing.wait_all_tasks_blocked()
                async def release_soon():
                    await trio.testing.wait_all_tasks_blocked()
                    release.set()
                nursery.start_soon(release_soon)
                await coord.sync(interrupting)
        events.append("returned")

    try:
        trio.run(main)
    except* KeyboardInterrupt:  # the follower's comes through the nursery, in a group
        events.append("KeyboardInterrupt")
    print(events)
    """
)


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_keyboard_interrupt_during_a_round_comes_after_the_call(role: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KI_SCRIPT.format(role=role)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    events = result.stdout.strip()
    assert events.startswith("['call started', 'call finished'"), events
    assert events.endswith("'KeyboardInterrupt']"), events


# -- in a store: kills under an ``always`` load while rounds run --------------------------------


async def test_shards_killed_while_rounds_run_never_outrun_their_calls(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvmemo
    from actors import EventKind
    from kvmemo.errors import KVMemoError
    from kvmemo.storage.durable_shard import DurableShardActor

    running: set[int] = set()  # ids of the calls a round's thread holds right now
    lock = threading.Lock()
    violations: list[str] = []

    def tracked(real: Callable[..., Any]) -> Callable[..., Any]:
        def run(calls: Any, *args: Any) -> Any:
            with lock:
                running.update(id(c) for c in calls)
            try:
                return real(calls, *args)
            finally:
                with lock:
                    running.difference_update(id(c) for c in calls)

        return run

    for name in ("_run_round", "_commit_round", "_syncfs_round"):
        monkeypatch.setattr(sync_coordinator, name, tracked(getattr(sync_coordinator, name)))
    real_record = DurableShardActor._record_killed_batch

    def record(self: DurableShardActor, batch: Any, started: float) -> None:
        with lock:
            if id(batch) in running:
                violations.append("a killed shard recorded its batch while a round ran it")
        real_record(self, batch, started)

    monkeypatch.setattr(DurableShardActor, "_record_killed_batch", record)

    data_dir = str(tmp_path)
    writers, per_writer = 16, 25
    acked: dict[int, int] = {}  # writer -> its last value answered "ok"
    rng = random.Random(7)
    kills = 0
    with trio.fail_after(90):
        async with kvmemo.open_store(shards=4, data_dir=data_dir, appendfsync="always") as kv:
            coord = kv.engine.persistence.sync_coordinator  # type: ignore[union-attr]
            done = trio.Event()

            async def write(w: int) -> None:
                n = 0
                while not done.is_set() or n < per_writer:
                    n += 1
                    try:
                        await kv.set(f"w{w}".encode(), str(n).encode())
                    except KVMemoError:
                        continue  # killed or restarting: may or may not last
                    acked[w] = n

            async def killer() -> None:
                nonlocal kills
                async with kv.system.events.subscribe() as events:
                    for _ in range(KILL_ROUNDS):
                        while not coord.statistics().leading:
                            await trio.lowlevel.checkpoint()
                        # Two shards at once: one may lead the round, the other's
                        # batch is then often held by it (a follower in the round).
                        shards = {f"shard-{s}" for s in rng.sample(range(4), 2)}
                        killed = {shard for shard in shards if kv.kill_actor(shard)}
                        kills += len(killed)
                        async for event in events:
                            if event.kind is EventKind.RESTARTED:
                                killed.discard(event.actor)
                                if not killed:
                                    break

            async with trio.open_nursery() as nursery:
                for w in range(writers):
                    nursery.start_soon(write, w)
                await killer()
                done.set()  # the writers finish their last writes
            stats = coord.statistics()
            assert (stats.gathering, stats.leading) == (0, False)
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            for w, n in acked.items():
                value = await kv.get(f"w{w}".encode())
                assert value is not None, (w, n)
                assert int(value) >= n, (w, n, value)
    assert violations == []
    assert kills == 2 * KILL_ROUNDS
    assert len(acked) == writers


async def test_a_round_whose_thread_cannot_start_fails_every_shards_batch_with_io(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leading shard's batch fails as its followers' do (IO), without a crash-restart."""
    import kvmemo
    from actors import EventKind
    from kvmemo.errors import KVMemoError

    real_start = trio.lowlevel.start_thread_soon
    failures = [1]

    def fail_one_round(fn: Any, deliver: Any, name: str | None = None) -> None:
        if failures and name == "kvmemo sync round":
            failures.pop()
            raise RuntimeError("can't start new thread")
        real_start(fn, deliver, name)

    outcomes: dict[int, str] = {}
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path), appendfsync="always") as kv:
            keys = []
            for shard in range(4):
                n = 0
                while kv.engine.slots.shard_of(f"k-{n}".encode()) != shard:
                    n += 1
                keys.append(f"k-{n}".encode())
            await trio.testing.wait_all_tasks_blocked()

            async def write(shard: int) -> None:
                try:
                    await kv.set(keys[shard], b"v")
                except KVMemoError as exc:
                    outcomes[shard] = exc.kind
                else:
                    outcomes[shard] = "ok"

            monkeypatch.setattr(trio.lowlevel, "start_thread_soon", fail_one_round)
            async with trio.open_nursery() as nursery:
                for shard in range(4):
                    nursery.start_soon(write, shard)
            monkeypatch.undo()
            assert not failures  # the round's thread did not start
            assert outcomes == dict.fromkeys(range(4), "IO")
            restarts = [kv.system.events.count(f"shard-{s}", EventKind.RESTARTED) for s in range(4)]
            assert restarts == [0, 0, 0, 0]
