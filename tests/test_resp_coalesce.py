"""The coalescer: several connections' pipelines of one scheduler pass, as one engine call."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

import kvmemo
from kvmemo.server.coalesce import Coalescer, RoundFailedError


@pytest.fixture
async def kv() -> AsyncIterator[kvmemo.Store]:
    async with kvmemo.open_store(shards=4) as store:
        yield store


async def test_batches_of_one_pass_run_as_one_round_each_with_its_own_results(
    kv: kvmemo.Store,
) -> None:
    coalescer = Coalescer(kv.engine)
    out: dict[int, list[object]] = {}

    async def connection(n: int) -> None:
        calls = [("set", [b"k%d" % n, b"v%d" % n]), ("get", [b"k%d" % n]), ("incr", [b"k%d" % n])]
        out[n] = await coalescer.execute_many(calls)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(connection, n)
    assert coalescer.rounds == 1
    for n in range(10):
        ok, value, error = out[n]
        assert (ok, value) == ("OK", b"v%d" % n)
        assert isinstance(error, kvmemo.KVMemoError)
        assert error.kind == "NOT_INTEGER"


async def test_a_round_is_bounded_and_the_rest_runs_in_the_next(kv: kvmemo.Store) -> None:
    coalescer = Coalescer(kv.engine, max_round_calls=5)
    out: dict[int, list[object]] = {}

    async def connection(n: int) -> None:
        out[n] = await coalescer.execute_many([("set", [b"k%d" % n, b"%d" % i]) for i in range(3)])

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(connection, n)
    assert coalescer.rounds == 4  # 3 + 3 > 5: one batch per round
    assert all(results == ["OK"] * 3 for results in out.values())
    assert await kv.mget(*(b"k%d" % n for n in range(4))) == [b"2"] * 4


class HeldEngine:
    """An engine stand-in whose rounds wait for ``release``; it records each round."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.rounds: list[list[tuple[str, object]]] = []

    async def execute_many(self, calls: list[tuple[str, object]]) -> list[object]:
        self.rounds.append(list(calls))
        await self.release.wait()
        return [f"{name} done" for name, _ in calls]


async def test_a_batch_cancelled_before_its_round_runs_nothing() -> None:
    engine = HeldEngine()
    coalescer = Coalescer(engine)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.execute_many, [("first", ())])
        await trio.testing.wait_all_tasks_blocked()  # its round runs, held
        with trio.CancelScope() as scope:
            scope.cancel()  # the second batch is waiting for the next round
            await coalescer.execute_many([("second", ())])
        engine.release.set()
    assert engine.rounds == [[("first", ())]]  # the cancelled batch never ran
    assert coalescer._waiting == []
    assert not coalescer._leading


async def test_a_leader_cancelled_mid_round_still_answers_the_others() -> None:
    engine = HeldEngine()
    coalescer = Coalescer(engine)  # type: ignore[arg-type]
    answers: dict[str, list[object]] = {}
    scopes = {"x": trio.CancelScope(), "y": trio.CancelScope()}

    async def connection(name: str) -> None:
        with scopes[name]:
            answers[name] = await coalescer.execute_many([(name, ())])  # finished, shielded
            await trio.lowlevel.checkpoint()  # where a cancellation is delivered
            answers[name].append("not cancelled")

    with trio.fail_after(5):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection, "x")
                nursery.start_soon(connection, "y")
                await trio.testing.wait_all_tasks_blocked()
                (round_,) = engine.rounds  # one round, both batches (either may lead)
                assert sorted(name for name, _ in round_) == ["x", "y"]
                leader, follower = round_[0][0], round_[1][0]
                scopes[leader].cancel()  # the round is shielded: it goes on
                await trio.testing.wait_all_tasks_blocked()
                engine.release.set()
        finally:
            engine.release.set()  # never leave the shielded round held
    assert answers[leader] == [f"{leader} done"]  # answered, then cancelled
    assert answers[follower] == [f"{follower} done", "not cancelled"]
    assert coalescer._waiting == []
    assert not coalescer._leading


class BrokenEngine:
    """An engine stand-in whose rounds run their calls, then raise (a bug after the fact)."""

    def __init__(self) -> None:
        self.rounds: list[list[str]] = []

    async def execute_many(self, calls: list[tuple[str, object]]) -> list[object]:
        self.rounds.append([name for name, _ in calls])
        raise RuntimeError("a bug after the commands ran")


async def test_a_round_whose_engine_call_raises_runs_none_of_its_batches_again() -> None:
    engine = BrokenEngine()
    coalescer = Coalescer(engine)  # type: ignore[arg-type]
    outcomes: dict[str, BaseException] = {}

    async def connection(name: str) -> None:
        try:
            await coalescer.execute_many([(name, ())])
        except (RuntimeError, RoundFailedError) as exc:
            outcomes[name] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(connection, name)
    (round_,) = engine.rounds  # one round; no batch of it ran again
    assert sorted(round_) == ["a", "b", "c"]
    leader = round_[0]
    assert isinstance(outcomes[leader], RuntimeError)  # the leader gets the bug itself
    for name in set(round_) - {leader}:
        assert isinstance(outcomes[name], RoundFailedError)
        assert isinstance(outcomes[name].__cause__, RuntimeError)
    assert coalescer._waiting == []
    assert not coalescer._leading


async def test_a_round_full_before_the_leaders_batch_runs_for_the_others_first() -> None:
    engine = HeldEngine()
    engine.release.set()
    coalescer = Coalescer(engine, max_round_calls=2)  # type: ignore[arg-type]
    out: dict[str, list[object]] = {}

    async def connection(name: str, calls: int) -> None:
        out[name] = await coalescer.execute_many([(name, ())] * calls)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(connection, name, 2)
    assert sorted(out) == ["a", "b", "c"]
    assert all(out[name] == [f"{name} done"] * 2 for name in out)
    assert sorted(r[0][0] for r in engine.rounds) == ["a", "b", "c"]  # each ran once
    assert coalescer._waiting == []
    assert not coalescer._leading


class RandomEngine:
    """An engine stand-in taking random (virtual) time, and failing a tenth of its rounds."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ran: list[tuple[str, object]] = []

    async def execute_many(self, calls: list[tuple[str, object]]) -> list[object]:
        for _ in range(self.rng.randrange(3)):
            await trio.sleep(self.rng.random() * 0.01)
        if self.rng.random() < 0.1:
            raise ValueError("a bug in the engine")
        self.ran.extend(calls)
        return [("ran", call) for call in calls]


@pytest.mark.parametrize("seed", range(60))
async def test_random_submissions_cancellations_and_failures_leave_it_consistent(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Batches arrive at random moments, some are cancelled (gathering, leading,
    # or in a running round), rounds fail and fill up: no batch hangs, no call
    # runs twice, each batch gets its own results, and the coalescer ends idle.
    rng = random.Random(seed)
    engine = RandomEngine(rng)
    coalescer = Coalescer(engine, max_round_calls=rng.choice([1, 2, 3, 5, 100]))  # type: ignore[arg-type]
    outcomes: dict[int, str] = {}
    scopes: list[trio.CancelScope] = []

    async def connection(n: int, scope: trio.CancelScope) -> None:
        calls = [("get", (b"%d-%d" % (n, j),)) for j in range(rng.randrange(1, 4))]
        with scope:
            try:
                results = await coalescer.execute_many(calls)
            except (RoundFailedError, ValueError):
                outcomes[n] = "failed"
                return
            assert results == [("ran", call) for call in calls]
            outcomes[n] = "ok"
        if scope.cancelled_caught:
            outcomes[n] = "cancelled"

    with trio.fail_after(1000):  # virtual seconds
        async with trio.open_nursery() as nursery:
            for n in range(rng.randrange(2, 25)):
                scopes.append(trio.CancelScope())
                nursery.start_soon(connection, n, scopes[-1])
                pause = rng.random()
                if pause < 0.3:
                    await trio.lowlevel.checkpoint()
                elif pause < 0.5:
                    await trio.sleep(rng.random() * 0.01)
                if rng.random() < 0.25:
                    rng.choice(scopes).cancel()
            for _ in range(rng.randrange(3)):
                await trio.sleep(rng.random() * 0.005)
                rng.choice(scopes).cancel()
    assert len(outcomes) == len(scopes)
    assert len(engine.ran) == len(set(engine.ran)), "a call ran twice"
    assert coalescer._waiting == []
    assert not coalescer._leading
