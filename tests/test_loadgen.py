"""``kvmemo bench`` (kvmemo.loadgen): short runs against an in-process node.

No speed is asserted: only that the load really reaches the server, that
every message is counted and answered, and that the figures are consistent.
"""

from __future__ import annotations

import json
import math
import random
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from kvmemo import cli
from kvmemo.config import StoreConfig
from kvmemo.loadgen import LatencyHistogram, LoadResult, Progress, run_load
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TIMEOUT = 20  # seconds; every test finishes far sooner


@asynccontextmanager
async def node(**server: Any) -> AsyncIterator[Node]:
    async with open_node(StoreConfig(shards=4), ServerConfig(port=0, resp=False, **server)) as n:
        yield n


def load(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        sessions=2,
        pipeline=4,
        batch=1,
        keys=100,
        read_ratio=0.5,
        value_size=16,
        duration=0.3,
        seed=1,
    )
    args.update(overrides)
    return args


def assert_sane(result: LoadResult) -> None:
    assert result.connected == result.sessions
    assert result.messages > 0
    assert result.commands == result.messages * result.batch
    assert result.messages_per_s == pytest.approx(result.messages / result.duration)
    lat = result.latency
    assert 0 < lat.p50 <= lat.p99 <= lat.p999 <= lat.max
    assert 0 < lat.mean <= lat.max
    assert lat.max < result.duration + 5  # a latency is at most the run plus the drain time
    assert 0 <= result.client_cpu


async def test_run_load_counts_single_requests_without_errors() -> None:
    reports: list[Progress] = []
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            result = await run_load(
                n.url, **load(duration=1.0, warmup=0.2), progress=reports.append
            )
    assert result.errors == {}
    assert result.duration == 1.0
    assert_sane(result)
    assert reports, "progress is reported while the load runs"
    assert reports[-1].commands >= result.commands  # warm-up and drain included
    assert any(not r.warming_up for r in reports)
    assert all(0 <= r.elapsed <= r.total for r in reports)
    document = result.to_json()
    assert json.loads(json.dumps(document)) == document
    assert document["messages"] == result.messages
    assert document["latency_us"]["p50"] == round(result.latency.p50 * 1e6, 1)


async def test_run_load_batches_count_every_command_and_write_the_server() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            # A longer window: batches of 10 on a loaded machine need it to see any reply.
            result = await run_load(n.url, **load(batch=10, read_ratio=0.0, duration=1.0))
            stored = await n.engine.execute("dbsize", ())
    assert result.errors == {}
    assert_sane(result)
    assert result.commands == 10 * result.messages
    assert 0 < stored <= 100  # the sets landed, within the key space


async def test_run_load_preloads_the_key_space_for_reads() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            result = await run_load(n.url, **load(keys=250, read_ratio=1.0))
            stored = await n.engine.execute("dbsize", ())
    assert result.errors == {}
    assert stored == 250


async def test_run_load_authenticates_with_a_token() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=frozenset({"s3cret"})) as n:
            good = await run_load(n.url, **load(), token="s3cret")
            bad = await run_load(n.url, **load(), token="wrong")
    assert good.errors == {}
    assert_sane(good)
    assert bad.connected == 0
    assert bad.messages == 0
    assert bad.errors["NOAUTH"] == 2
    assert bad.errors["CONNECT"] == 2


async def test_run_load_counts_refused_connections_as_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        result = await run_load(f"ws://127.0.0.1:{port}/ws", **load())
    assert result.errors == {"CONNECT": 2}
    assert result.connected == 0
    assert result.messages == result.commands == 0
    assert math.isnan(result.latency.p50)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("sessions", 0, "sessions must be >= 1, got 0"),
        ("pipeline", 0, "pipeline must be >= 1, got 0"),
        ("batch", 0, "batch must be >= 1, got 0"),
        ("keys", 0, "keys must be >= 1, got 0"),
        ("read_ratio", 1.5, "read_ratio must be in [0, 1], got 1.5"),
        ("value_size", -1, "value_size must be >= 0, got -1"),
        ("duration", 0, "duration must be > 0, got 0"),
    ],
)
async def test_run_load_rejects_bad_arguments(name: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        await run_load("ws://127.0.0.1:1/ws", **load(**{name: value}))


async def test_kvmemo_bench_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n:
            argv = ["bench", "--url", n.url, "--sessions", "1", "--duration", "0.3"]
            argv += ["--warmup", "0", "--keys", "50", "--batch", "5", "--json", "--no-progress"]
            code = await trio.to_thread.run_sync(cli.main, argv)
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["commands"] == 5 * document["messages"] > 0
    assert document["errors"] == {}


def test_histogram_buckets_hold_their_values() -> None:
    rng = random.Random(7)
    for value in [0, 1, 255, 256, 257, 511, 512, 10**6, 2**40 + 12345] + [
        rng.randrange(10**10) for _ in range(1000)
    ]:
        low, high = LatencyHistogram.bounds(LatencyHistogram.index(value))
        assert low <= value < high
        assert high - low <= max(1, low / 128)


def test_histogram_quantiles_are_within_one_percent_of_exact_ones() -> None:
    rng = random.Random(11)
    values = [int(rng.lognormvariate(12, 1.5)) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for v in values:
        histogram.record(v)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[math.ceil(q * len(ordered)) - 1] / 1e9
        assert histogram.quantile(q) == pytest.approx(exact, rel=0.01)
    assert histogram.quantile(1.0) == max(values) / 1e9
    assert histogram.mean() == pytest.approx(sum(values) / len(values) / 1e9)
    merged = LatencyHistogram()
    merged.merge(histogram)
    assert merged.count == len(values)
    assert merged.quantile(0.99) == histogram.quantile(0.99)


def test_empty_histogram_has_no_quantiles() -> None:
    histogram = LatencyHistogram()
    assert math.isnan(histogram.quantile(0.5))
    assert math.isnan(histogram.mean())
