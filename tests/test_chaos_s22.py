"""``kvmemo chaos`` as a fresh user meets it (round 22).

- against a server started without ``--chaos`` it fails at once, before any
  load, and a run whose kills all fail never reads as a pass;
- a run's keys hold a random run id, so the keys an earlier run left (or a
  user's) neither count as violations nor get overwritten, and the checker
  is sound when told what the store held before the run;
- the progress bar is drawn only when stderr is a terminal (or ``--progress``).

Runs against a server are in-process nodes on 127.0.0.1, port 0, and last
about a second; the checker's rules are checked on crafted histories.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from test_chaos_history import op
from test_cli import run_main

from kvmemo import cli
from kvmemo.chaos import (
    ChaosSetupError,
    counter_violations,
    kill_problems,
    restart_room_note,
    run_embedded,
    run_remote,
    summarize,
)
from kvmemo.chaos.history import check
from kvmemo.chaos.workload import KillLog, Recorder, WorkloadConfig, killer, worker
from kvmemo.client import connect
from kvmemo.config import StoreConfig
from kvmemo.errors import UnknownCommandError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TIMEOUT = 60  # seconds; every test finishes far sooner


@asynccontextmanager
async def node(*, chaos: bool) -> AsyncIterator[Node]:
    async with open_node(
        StoreConfig(shards=4, chaos=chaos, max_restarts=1000),
        ServerConfig(port=0, resp=False),
    ) as n:
        yield n


async def chaos_cli(argv: list[str]) -> int:
    code: int = await trio.to_thread.run_sync(cli.main, ["chaos", *argv])
    return code


async def everything(url: str) -> dict[str, str]:
    async with connect(url) as kv:
        keys = sorted(await kv.execute("keys", "*"))
        values = await kv.execute("mget", *keys) if keys else []
    return {k.decode(): v.decode() for k, v in zip(keys, values, strict=True)}


# -- 1. a server without --chaos, kills that fail --------------------------------------------


async def test_chaos_against_a_server_without_chaos_fails_before_any_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node(chaos=False) as n:
            start = trio.current_time()
            code = await chaos_cli(["--url", n.url, "--duration", "2", "--no-progress"])
            elapsed = trio.current_time() - start
            left = await everything(n.url)
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        f"kvmemo: error: the server at {n.url} was not started with --chaos (it refuses"
        " debug.kill): restart it with `kvmemo serve --chaos`, or give --kill-rate 0\n"
    )
    assert left == {}  # no load ran: not one key was written
    assert elapsed < 2  # it did not wait out the run's duration


async def test_a_run_without_kills_against_a_server_without_chaos_is_allowed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # --kill-rate 0 asks for no kill: the kill API is not needed (and a zero
    # rate no longer crashes the killer with a ZeroDivisionError).
    with trio.fail_after(TIMEOUT):
        async with node(chaos=False) as n:
            code = await chaos_cli(["--url", n.url, "--duration", "0.5", "--kill-rate", "0"])
            left = await everything(n.url)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert out.splitlines()[-1] == "result: pass"
    assert "note:" not in out  # no advice on the restart intensity of a run without kills
    assert left == {}  # the run's keys were deleted


async def test_kill_attempts_that_fail_are_counted_by_kind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def refuse(name: str) -> bool:
        raise UnknownCommandError("unknown command 'debug.kill' (chaos is not enabled)")

    log = KillLog()
    with trio.fail_after(TIMEOUT):
        await killer(refuse, ["shard-0"], 5.0, 1.0, 5.0, random.Random(1), log, trio.current_time)
    assert log.kills == []
    assert log.attempts == sum(log.failures.values()) > 0
    assert set(log.failures) == {"UNKNOWN_METHOD"}
    assert log.first_failure["UNKNOWN_METHOD"] == (
        "unknown command 'debug.kill' (chaos is not enabled)"
    )


async def test_a_run_with_a_kill_rate_always_tries_to_kill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A short chaos phase at a low rate: the first kill comes by its middle.
    for seed in range(20):
        log = KillLog()
        killed: list[str] = []
        t = trio.current_time()
        rng = random.Random(seed)
        await killer(killed.append, ["shard-0"], 0.1, t, t + 1.0, rng, log, trio.current_time)
        assert log.attempts >= 1, seed
        assert log.actor_kills == len(killed) >= 1


def test_a_run_that_killed_nothing_never_reads_as_a_pass() -> None:
    log = KillLog()
    log.attempts = 3
    log.failed(UnknownCommandError("unknown command 'debug.kill'"))
    log.failed(UnknownCommandError("unknown command 'debug.kill'"))
    log.failed(ConnectionResetError("reset by peer"))
    report = summarize([], log, 0, [], shards=4, chaos_start=0.0, duration=2.0)
    report = attrs.evolve(report, problems=kill_problems(log, 2.0))
    assert report.violations == []
    assert not report.passed
    assert report.kill_failures == {"UNKNOWN_METHOD": 2, "ConnectionResetError": 1}
    text = report.render()
    assert "failed kill attempts: 3 {'UNKNOWN_METHOD': 2, 'ConnectionResetError': 1}" in text
    assert text.splitlines()[-1] == (
        "result: FAIL: kills were asked for (2/s) but no actor was killed: every kill attempt"
        " failed (2 x UNKNOWN_METHOD: unknown command 'debug.kill'; 1 x ConnectionResetError:"
        " reset by peer)"
    )
    assert report.to_json()["passed"] is False
    # Without a kill rate, no kill is no problem; with one kill, neither.
    assert kill_problems(KillLog(), 0.0) == []
    one = KillLog(kills=[(1.0, "shard-1")], attempts=2)
    one.failed(ConnectionResetError("reset"))
    assert kill_problems(one, 2.0) == []
    assert kill_problems(KillLog(), 2.0) == [
        "kills were asked for (2/s) but no actor was killed:"
        " no kill was attempted (the run ended first)"
    ]


def test_the_restart_room_note_counts_only_the_seconds_of_kills() -> None:
    # 2 kills/s for a 1.6 s chaos phase: at most a handful of restarts.
    assert restart_room_note(2.0, 20, 10.0, chaos_seconds=1.6) is None
    assert restart_room_note(2.0, 20, 10.0, chaos_seconds=24.0) is not None


# -- 2. the run's keys, and a store that is not empty ----------------------------------------


class _Recording:
    """A target that answers every command plausibly and remembers the keys."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    async def execute(self, name: str, *args: Any) -> Any:
        if name in ("mset",):
            self.keys.update(args[::2])
        elif name in ("mget",):
            self.keys.update(args)
            return [None] * len(args)
        else:
            self.keys.add(args[0])
        return {"incr": 1, "pexpire": 0}.get(name)


def _ticks(n: int) -> Callable[[], float]:
    it = iter(range(n))
    return lambda: float(next(it, n))


async def test_every_key_of_a_run_holds_its_run_id_and_no_hash_tag() -> None:
    a, b = WorkloadConfig(keys=5), WorkloadConfig(keys=5)
    assert a.run_id != b.run_id
    assert set(a.all_keys()).isdisjoint(b.all_keys())
    target = _Recording()
    await worker(0, target, a, Recorder(), random.Random(3), 2000.0, _ticks(4000))
    assert target.keys <= set(a.all_keys())
    assert len(target.keys) == len(a.all_keys())  # every kind of key was used
    assert all(k.startswith(f"chaos:{a.run_id}:") for k in target.keys)
    assert not any("{" in k or "}" in k for k in a.all_keys())
    with pytest.raises(
        ValueError, match=r"^run_id must be 1 to 64 of \[0-9A-Za-z_-\], got '\{x\}'$"
    ):
        WorkloadConfig(run_id="{x}")


def test_the_checker_accepts_the_values_keys_held_before_the_run() -> None:
    initial = {"r": "old", "g:a": "c1-149:a", "gone": "x"}
    history = [
        op(1, "get", ("r",), ("old",), 1.0, 2.0),  # before any write: the old value
        op(2, "get", ("gone",), (None,), 1.0, 2.0),  # it may have had a TTL
        # A group of which one key existed: the state before the run, read whole.
        op(3, "mget", ("g:a", "g:b", "g:c"), ("c1-149:a", None, None), 1.0, 2.0),
        op(4, "set", ("r",), ("c0-1",), 3.0, 4.0),
        op(5, "get", ("r",), ("c0-1",), 5.0, 6.0),
        op(6, "mset", ("g:a", "g:b", "g:c"), ("c0-2:a", "c0-2:b", "c0-2:c"), 3.0, 4.0),
        op(7, "mget", ("g:a", "g:b", "g:c"), ("c0-2:a", "c0-2:b", "c0-2:c"), 5.0, 6.0),
    ]
    assert check(history, initial=initial) == []
    # Without being told, the same history shows phantoms (the old failure mode).
    assert {v.rule for v in check(history)} == {"phantom"}


def test_the_checker_still_finds_real_violations_on_a_store_that_was_not_empty() -> None:
    initial = {"r": "old", "g:a": "x:a", "g:b": "x:b", "g:c": "x:c"}
    write = op(1, "set", ("r",), ("c0-1",), 1.0, 2.0)
    stale = op(2, "get", ("r",), ("old",), 3.0, 4.0)  # overwritten before it began
    assert [v.rule for v in check([write, stale], initial=initial)] == ["stale-read"]
    newer = op(3, "get", ("r",), ("c0-1",), 1.5, 2.5)  # saw the write while it ran
    older = op(4, "get", ("r",), ("old",), 2.6, 2.7)
    older_only = [write, newer, older]
    assert "read-order" in {v.rule for v in check(older_only, initial=initial)}
    mset = op(5, "mset", ("g:a", "g:b", "g:c"), ("c0-2:a", "c0-2:b", "c0-2:c"), 1.0, 2.0)
    torn = op(6, "mget", ("g:a", "g:b", "g:c"), ("x:a", "c0-2:b", "c0-2:c"), 1.5, 2.5)
    assert [v.rule for v in check([mset, torn], initial=initial)] == ["torn-mset"]
    expire = op(7, "expire", ("r",), (None,), 0.1, 0.2, result=1, ttl=0.5)
    late = op(8, "get", ("r",), ("old",), 3.0, 4.0)
    assert [v.rule for v in check([expire, late], initial=initial)] == ["expired-read"]


def test_a_value_both_held_before_and_written_by_the_run_is_not_judged() -> None:
    # The earlier run wrote 'c4-191' too: which one a read saw is unknown.
    initial = {"r": "c4-191"}
    history = [
        op(1, "get", ("r",), ("c4-191",), 1.0, 2.0),  # before this run's c4-191 began
        op(2, "set", ("r",), ("c4-191",), 3.0, 4.0),
        op(3, "get", ("r",), ("c4-191",), 5.0, 6.0),
    ]
    assert check(history, initial=initial) == []


def test_counters_count_from_their_value_before_the_run() -> None:
    incrs = [op(i, "incr", ("c",), (None,), i, i + 0.5, result=40 + i) for i in (1, 2)]
    assert counter_violations(incrs, {"c": 42}, {"c": 40}) == []
    (violation,) = counter_violations(incrs, {"c": 2}, {"c": 40})
    assert violation.message == (
        "final value 2, expected 42..42 (40 before the run, 2 acknowledged, 0 unknown increments)"
    )


async def test_a_run_on_a_store_holding_an_earlier_runs_keys_sees_no_violation() -> None:
    # What an earlier run of the old naming left, plus a user's key: a run
    # read them as phantoms and counted them into its counters (and
    # overwrote them).
    leftovers = {f"reg:{i}": f"c1-{100 + i}" for i in range(20)}
    leftovers |= {f"ctr:{i}": "1000" for i in range(4)}
    leftovers |= {f"grp:{g}:{p}": f"c1-149:{p}" for g in range(4) for p in "abc"}
    leftovers["user:1"] = "precious"
    cfg = WorkloadConfig(clients=4, duration=1.0, kill_rate=3.0, seed=12345)
    with trio.fail_after(TIMEOUT):
        async with node(chaos=True) as n:
            async with connect(n.url) as kv:
                await kv.execute("mset", *[x for kv_ in leftovers.items() for x in kv_])
            report = await run_remote(cfg, n.url)
            left = await everything(n.url)
    assert report.violations == [], "\n".join(v.describe() for v in report.violations)
    assert report.operations["ok"] > 50
    assert report.passed
    assert left == leftovers  # nothing of theirs touched, nothing of the run's left
    assert report.keys == f"chaos:{cfg.run_id}:* deleted (--keep-keys keeps them)"


async def test_a_run_refuses_keys_that_exist_and_writes_nothing() -> None:
    cfg = WorkloadConfig(clients=2, duration=1.0, kill_rate=1.0, run_id="fixed")
    with trio.fail_after(TIMEOUT):
        async with node(chaos=True) as n:
            async with connect(n.url) as kv:
                await kv.execute("set", cfg.counter(1), "mine")
            with pytest.raises(ChaosSetupError) as caught:
                await run_remote(cfg, n.url)
            left = await everything(n.url)
    assert str(caught.value) == (
        f"1 keys of this run (chaos:fixed:*) already exist on the server at {n.url};"
        " the run would overwrite them, nothing was written"
    )
    assert left == {"chaos:fixed:ctr:1": "mine"}


async def test_keep_keys_leaves_the_runs_keys_for_inspection(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node(chaos=True) as n:
            argv = ["--url", n.url, "--duration", "1", "--clients", "2", "--keep-keys", "--json"]
            code = await chaos_cli(argv)
            left = await everything(n.url)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    document = json.loads(out)
    assert document["passed"] is True
    prefix = f"chaos:{document['run_id']}:"
    assert document["keys"] == f"{prefix}* kept (--keep-keys)"
    assert left
    assert all(k.startswith(prefix) for k in left)
    assert err == ""  # --json and a stderr that is no terminal: no progress bar


# -- 3. the progress bar --------------------------------------------------------------------


def test_no_progress_bar_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["chaos", "--duration", "0.3", "--clients", "2", "--kill-rate", "5"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, out + err
    assert err == ""
    code, out, err = run_main([*argv, "--progress"], capsys)
    assert code == 0, out + err
    assert err.startswith("\r[")
    assert err.endswith("\n")
    code, out, err = run_main([*argv, "--no-progress"], capsys)
    assert (code, err) == (0, "")


def test_every_flag_of_chaos_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["chaos", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "--seed SEED seed of the workload's random choices (default 0)" in text
    assert (
        "--progress, --no-progress progress bar on stderr (default: when stderr is a"
        " terminal and not --json)"
    ) in text
    assert "--keep-keys with --url: keep the run's keys (chaos:RUN:*) at the end" in text


async def test_an_embedded_run_reports_its_run_id() -> None:
    cfg = WorkloadConfig(clients=2, duration=0.5, kill_rate=4.0)
    with trio.fail_after(TIMEOUT):
        report = await run_embedded(cfg, shards=2)
    assert report.run_id == cfg.run_id
    assert report.passed, report.render()
    assert report.render().splitlines()[-1] == "result: pass"
