"""Engine defects found at stop 23 (chaos audit): one caller's cancellation stays its own."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_engine_failures import wait_restarted

import kvmemo
from actors import ActorCrashed, ActorStopped
from kvmemo.engine import engine as engine_module

PASSES = range(14)  # scheduler passes after the leader starts: covers gather, hold, commit


@pytest.mark.parametrize("passes", PASSES)
async def test_cancelling_the_leader_of_a_grouped_mset_round_fails_no_other_mset(
    passes: int,
) -> None:
    """The round runs in its leader's task; the others' MSETs must not fail with it."""
    async with kvmemo.open_store(shards=4) as kv:
        # Concurrent MSETs first, so that the next round gathers (see _grouped_mset).
        async with trio.open_nursery() as warm:
            for _ in range(3):
                warm.start_soon(kv.mset, {"a": "0", "b": "0", "c": "0", "d": "0"})
        scope = trio.CancelScope()
        out: dict[str, object] = {}

        async def leader() -> None:
            with scope:
                out["leader"] = await kv.mset({"a": "1", "b": "1", "c": "1", "d": "1"})

        async def follower() -> None:
            out["follower"] = await kv.mset({"a": "2", "b": "2", "c": "2", "d": "2"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            nursery.start_soon(follower)
            for _ in range(passes + 1):
                await trio.lowlevel.checkpoint()
            scope.cancel()
        assert out["follower"] == "OK"
        values = await kv.mget("a", "b", "c", "d")
        assert len(set(values)) == 1  # each MSET whole: all of one or all of the other
        assert values[0] in (b"1", b"2")


async def test_a_command_cut_off_by_a_stop_of_its_shard_is_not_called_a_crash() -> None:
    """A supervisor that stops a shard hard (gave up, or was killed) is no crash of it."""
    async with kvmemo.open_store(shards=2) as kv:
        ref = kv.system.ref("shard-0")
        stopped = ActorCrashed("shard-0", ActorStopped("shard-0"), handler_started=True)
        error = kv.engine._translate(stopped, ref)
        assert error.kind == "INTERNAL"
        assert error.data["applied"] is None
        assert str(error) == (
            "shard-0 was stopped while handling the command; it may or may not have been applied"
        )


async def test_info_metrics_show_each_actors_restarts_and_mailbox_depth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """They were refreshed only before a /metrics scrape: info showed them empty."""
    async with kvmemo.open_store(shards=2) as kv:
        kv.kill_actor("shard-0")
        await wait_restarted(kv.system, "shard-0")
        metrics = (await kv.info())["stats"]["metrics"]
        assert metrics["kvmemo_actor_restarts_total"]["shard-0"] == 1
        assert metrics["kvmemo_actor_restarts_total"]["shard-1"] == 0
        assert set(metrics["kvmemo_actor_mailbox_depth"]) >= {"shard-0", "shard-1", "ttl-manager"}


async def test_a_commands_clocks_are_read_close_together(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A pause (preemption, under load) while reading the two clocks skewed a command's
    conversion of absolute times by its length: PEXPIRETIME then disagreed with
    PEXPIREAT by milliseconds (a test flaked on it under load)."""
    base = 1_800_000_000.0
    paused = []

    def wall() -> float:
        if not paused:  # the first read is held up 5 ms before it returns
            paused.append(True)
            autojump_clock.jump(0.005)
        return base + trio.current_time()

    async with kvmemo.open_store(shards=1) as kv:
        monkeypatch.setattr(engine_module.time, "time", wall)
        clock = kv.engine._read_clock()
        monkeypatch.undo()
    assert paused
    assert abs((clock.wall_now - clock.mono_now) - base) < 1e-4
