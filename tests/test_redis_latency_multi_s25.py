"""INFO latencystats, and MULTI over maxmemory, as a demanding Redis user expects (round 25).

- **INFO latencystats.** Redis 7 gives each command's latency percentiles
  (``latency_percentiles_usec_get:p50=5.023,p99=6.015,p99.9=6.015``) in
  ``INFO latencystats`` (and ``INFO all`` / ``everything``, not ``INFO`` nor
  ``INFO default``), chosen by ``latency-tracking-info-percentiles`` and
  switched by ``latency-tracking`` (CONFIG GET/SET), emptied by ``CONFIG
  RESETSTAT``. KVMemo had no such section (``INFO latencystats`` answered
  nothing) and CONFIG knew neither parameter, though the engine keeps a
  latency histogram per command. Now the section reads those histograms:
  each value is the upper bound of the bucket holding the percentile's rank
  (HdrHistogram's rule, over KVMemo's 1-2-5 buckets: precise to a bucket, not
  to Redis's 2 significant digits). Compared with a real ``redis-server`` by
  shape (sections, line format, percentile names, which commands appear),
  and CONFIG's replies byte for byte.
- **MULTI over maxmemory.** Redis's ``processCommand`` refuses every command
  a client in MULTI sends while used memory is over ``maxmemory`` and
  eviction cannot end it (``-OOM ...``, and EXEC then answers ``EXECABORT``),
  but EXEC, DISCARD, QUIT and RESET; and it refuses an EXEC whose
  transaction queued a ``denyoom`` command when memory is over at EXEC's
  time (``EXECABORT Transaction discarded because of: OOM ...``). KVMemo
  queued them all and ran them at EXEC (the reads, DELs and EXPIREs ran,
  the writes got OOM in their places). Checked against a real
  ``redis-server`` with ``maxmemory 1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import trio
from test_redis_differential import (
    REDIS_SERVER,
    Pair,
    Tree,
    _connect,
    _text_of,
    redis_and_kvmemo,
    run_same_steps,
)
from test_redis_limits_s25 import resp_port
from test_resp_server import Client, running

from kvmemo.commands.longdouble import parse_double
from kvmemo.errors import NotIntegerError
from kvmemo.observability.metrics import BucketCounts, MetricsRegistry
from kvmemo.server.resp import ErrorReply
from kvmemo.server.resp_server import RespLimits, RespSettings

TIMEOUT = 30  # seconds per test; real sockets and real time

OOM = ErrorReply("OOM command not allowed when used memory > 'maxmemory'.")
EXECABORT = ErrorReply("EXECABORT Transaction discarded because of previous errors.")
EXECABORT_OOM = ErrorReply(
    "EXECABORT Transaction discarded because of: OOM command not allowed when used memory"
    " > 'maxmemory'."
)
_LATENCY_LINE = re.compile(r"latency_percentiles_usec_(\S+):(.*)")
_PERCENTILE = re.compile(r"p(-?[0-9]+(?:\.[0-9]*[1-9])?)=([0-9]+\.[0-9]{3})")


# -- percentiles from buckets: the pure core ------------------------------------------------


def _counts(*counts: int) -> BucketCounts:
    return BucketCounts((1.0, 2.0, 5.0, 10.0), counts)


def test_a_percentile_is_the_upper_bound_of_the_bucket_holding_its_rank_as_hdr() -> None:
    # 90 observations <= 1, 9 in (2, 5], 1 in (5, 10]: HdrHistogram's rank is
    # int(p / 100 * total + 0.5), at least 1, found in the cumulative counts.
    counts = _counts(90, 0, 9, 1, 0)
    assert counts.total == 100
    assert counts.value_at_percentile(50) == 1.0
    assert counts.value_at_percentile(90) == 1.0
    assert counts.value_at_percentile(90.6) == 5.0  # rank 91
    assert counts.value_at_percentile(99) == 5.0  # rank 99
    assert counts.value_at_percentile(99.5) == 10.0  # rank 100 (99.5 + 0.5)
    assert counts.value_at_percentile(99.9) == 10.0
    assert counts.value_at_percentile(100) == 10.0
    assert counts.value_at_percentile(250) == 10.0  # over 100 reads as 100
    assert counts.value_at_percentile(0.0001) == 1.0  # rank at least 1


def test_percentile_zero_is_the_lower_bound_and_past_the_last_bound_is_the_last_bound() -> None:
    assert _counts(0, 0, 3, 0, 0).value_at_percentile(0) == 2.0  # the bucket (2, 5]
    assert _counts(4, 0, 0, 0, 0).value_at_percentile(0) == 0.0  # the first bucket's: 0
    overflow = _counts(0, 0, 0, 0, 7)  # every observation above 10
    assert overflow.value_at_percentile(50) == 10.0
    assert overflow.value_at_percentile(0) == 10.0
    assert math.isnan(_counts(0, 0, 0, 0, 0).value_at_percentile(50))


def test_bucket_counts_of_one_histogram_subtract_and_add() -> None:
    hist = MetricsRegistry().histogram("lat", "latency", buckets=(1.0, 2.0))
    hist.observe(0.5)
    base = hist.bucket_counts()
    hist.observe(1.5)
    hist.observe(3.0)
    later = hist.bucket_counts()
    assert later.since(base) == BucketCounts((1.0, 2.0), (0, 1, 1))
    assert later.since(None) is later
    assert later.since(base).plus(base) == later
    assert base.plus(None) is base
    other = BucketCounts((1.0, 5.0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"^bucket counts of histograms with other buckets"):
        later.since(other)


def test_parse_double_reads_what_redis_string2d_reads() -> None:
    # Checked on redis-server 7.0 with CONFIG SET latency-tracking-info-percentiles.
    assert parse_double(b"50") == 50.0
    assert parse_double(b"5e1") == 50.0
    assert parse_double(b"0x10") == 16.0
    assert parse_double(b"0x1.8p1") == 3.0
    assert parse_double(b".5") == parse_double(b"5e-1") == 0.5
    assert parse_double(b"5.") == parse_double(b"+5") == 5.0
    assert parse_double(b"1e-320") == 1e-320  # a subnormal: kept
    assert math.copysign(1.0, parse_double(b"-0")) == -1.0
    assert parse_double(b"inf") == parse_double(b"Infinity") == math.inf
    for refused in (b"", b" 5", b"5 ", b"nan", b"abc", b"50,99", b"1e-400", b"1e400", b"0x"):
        with pytest.raises(NotIntegerError):
            parse_double(refused)


# -- INFO latencystats on KVMemo's Redis port --------------------------------------------------


def _lines(text: object, title: str) -> list[str] | None:
    """The lines of INFO's section ``title``; None when it is not there."""
    assert isinstance(text, bytes), text
    for block in text.decode().split("\r\n\r\n"):
        lines = block.split("\r\n")
        if lines[0] == f"# {title}":
            return [line for line in lines[1:] if line]
    return None


def _latency(text: object) -> dict[str, str]:
    """INFO latencystats as {command: its percentiles' text}."""
    lines = _lines(text, "Latencystats")
    assert lines is not None, text
    out = {}
    for line in lines:
        match = _LATENCY_LINE.fullmatch(line)
        assert match is not None, line
        out[match[1]] = match[2]
    return out


async def _set_ok(client: Client, *args: str) -> None:
    assert await client.call("CONFIG", "SET", *args) == "OK"


async def test_info_latencystats_gives_each_percentile_as_its_bucket_bound_in_usec() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "RESETSTAT") == "OK"
            # 90 calls within 5 us, 9 within 20 us, 1 within 0.5 s (the
            # engine's buckets: 1-2-5 steps, in seconds).
            for seconds, times in ((3e-6, 90), (15e-6, 9), (0.3, 1)):
                for _ in range(times):
                    server.engine.record_call("lastsave", seconds)
            stats = _latency(await client.call("INFO", "latencystats"))
            assert stats["lastsave"] == "p50=5.000,p99=20.000,p99.9=500000.000"
            await _set_ok(client, "latency-tracking-info-percentiles", "0 90 99.99 100")
            stats = _latency(await client.call("INFO", "latencystats"))
            assert stats["lastsave"] == "p0=0.000,p90=5.000,p99.99=500000.000,p100=500000.000"


async def test_latencystats_lists_the_calls_that_succeeded_since_resetstat() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"
            assert await client.call("CONFIG", "RESETSTAT") == "OK"
            assert await client.call("GET", "k") == b"v"
            assert isinstance(await client.call("INCR", "k"), ErrorReply)  # failed: not timed
            assert isinstance(await client.call("GET"), ErrorReply)  # rejected: never ran
            stats = _latency(await client.call("INFO", "latencystats"))
            # CONFIG RESETSTAT is timed after it ran, as Redis times it.
            assert sorted(stats) == ["config|resetstat", "get"]
            for text in stats.values():
                labels = [m[1] for m in _PERCENTILE.finditer(text)]
                assert labels == ["50", "99", "99.9"], text


async def test_info_gives_latencystats_for_all_everything_and_its_name_only() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("PING") == "PONG"
            for sections in ((), ("default",), ("server", "stats")):
                assert _lines(await client.call("INFO", *sections), "Latencystats") is None
            for sections in (("all",), ("everything",), ("LATENCYSTATS",), ("latencystats",)):
                assert "ping" in _latency(await client.call("INFO", *sections))
            text = await client.call("INFO", "everything")
            assert isinstance(text, bytes)
            titles = re.findall(rb"^# (\w+)\r$", text, re.MULTILINE)
            assert titles.index(b"Errorstats") + 1 == titles.index(b"Latencystats")


async def test_latency_tracking_off_shows_nothing_and_what_ran_meanwhile_never_shows() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "RESETSTAT") == "OK"
            assert await client.call("SET", "k", "v") == "OK"
            await _set_ok(client, "latency-tracking", "NO")
            assert await client.call("CONFIG", "GET", "latency-tracking") == [
                b"latency-tracking",
                b"no",
            ]
            assert await client.call("INFO", "latencystats") == b"# Latencystats\r\n"
            assert await client.call("GET", "k") == b"v"
            assert await client.call("CONFIG", "RESETSTAT") == "OK"  # while off
            assert await client.call("DEL", "k") == 1
            await _set_ok(client, "latency-tracking", "yes")
            stats = _latency(await client.call("INFO", "latencystats"))
            # The SET was before the reset, GET and DEL while off; the CONFIG
            # SET that turned it on is timed once it ran, as in Redis.
            assert sorted(stats) == ["config|set"]
            assert await client.call("GET", "k") is None
            assert sorted(_latency(await client.call("INFO", "latencystats"))) == [
                "config|set",
                "get",
                "info",
            ]


_PERCENTILES_REASON = "latency-tracking-info-percentiles parameters should sit between [0.0,100.0]"


def _config_failed(name: str, reason: str) -> ErrorReply:
    return ErrorReply(f"ERR CONFIG SET failed (possibly related to argument '{name}') - {reason}")


async def test_latency_tracking_info_percentiles_are_checked_and_written_as_redis() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)

            async def percentiles() -> bytes:
                reply = await client.call("CONFIG", "GET", "latency-tracking-info-percentiles")
                assert isinstance(reply, list), reply
                return bytes(reply[1])

            assert await percentiles() == b"50 99 99.9"
            for given, shown in (
                ("12.3456789012345 0x10 1e1", b"12.345679 16 10"),
                ("99.9999999 0.0001 -0", b"100 0.0001 -0"),
                ("", b""),
                ("50 50", b"50 50"),
            ):
                await _set_ok(client, "latency-tracking-info-percentiles", given)
                assert await percentiles() == shown
            assert await client.call("PING") == "PONG"
            stats = _latency(await client.call("INFO", "latencystats"))
            assert _labels(stats["ping"]) == ["50", "50"]  # named twice, given twice
            invalid = "Invalid latency-tracking-info-percentiles parameters"
            for given, reason in (
                ("101", _PERCENTILES_REASON),
                ("-1", _PERCENTILES_REASON),
                ("inf", _PERCENTILES_REASON),
                ("abc", invalid),
                ("nan", invalid),
                ("50,99", invalid),
                ("  50   99 ", invalid),
                ("50 ", invalid),
                ("1e400", invalid),
            ):
                reply = await client.call(
                    "CONFIG", "SET", "latency-tracking-info-percentiles", given
                )
                assert reply == _config_failed("latency-tracking-info-percentiles", reason), given
                assert await percentiles() == b"50 50"  # nothing changed
            reply = await client.call("CONFIG", "SET", "latency-tracking", "maybe")
            assert reply == _config_failed("latency-tracking", "argument must be 'yes' or 'no'")
            # All or nothing: a bad value leaves the good one before it unapplied.
            reply = await client.call(
                "CONFIG",
                "SET",
                "latency-tracking-info-percentiles",
                "90",
                "latency-tracking",
                "1",
            )
            assert reply == _config_failed("latency-tracking", "argument must be 'yes' or 'no'")
            assert await percentiles() == b"50 50"
            assert await client.call("CONFIG", "GET", "latency-tracking*") == [
                b"latency-tracking",
                b"yes",
                b"latency-tracking-info-percentiles",
                b"50 50",
            ]


async def test_latency_settings_outlive_a_restart_of_the_port() -> None:
    settings = RespSettings(RespLimits())
    with trio.fail_after(TIMEOUT):
        async with resp_port(settings) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            await _set_ok(client, "latency-tracking-info-percentiles", "75")
            await _set_ok(client, "latency-tracking", "no")
        assert settings.latency_percentiles == (75.0,)
        assert settings.latency_tracking is False
        async with resp_port(settings) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            assert await client.call("SET", "k", "v") == "OK"
            assert await client.call("INFO", "latencystats") == b"# Latencystats\r\n"
            await _set_ok(client, "latency-tracking", "yes")
            stats = _latency(await client.call("INFO", "latencystats"))
            assert sorted(stats) == ["config|set"]  # the SET ran while it was off
            assert stats["config|set"].startswith("p75=")


# -- MULTI over maxmemory on KVMemo's Redis port ----------------------------------------------


async def _fill_then_limit(client: Client, policy: str = "noeviction") -> None:
    await _set_ok(client, "maxmemory-policy", policy)
    for i in range(10):
        assert await client.call("SET", f"k{i}", "v") == "OK"
    await _set_ok(client, "maxmemory", "1")


async def test_over_maxmemory_multi_refuses_every_command_but_exec_discard_and_reset() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await _fill_then_limit(client)
            assert await client.call("MULTI") == "OK"
            for call in (
                ("SET", "new", "v"),
                ("GET", "k1"),  # not a write
                ("DEL", "k2"),  # a write Redis does not flag denyoom
                ("EXPIRE", "k3", "100"),
                ("PING",),
                ("CLIENT", "GETNAME"),
                ("MULTI",),
                ("WATCH", "k1"),
                ("SUBSCRIBE", "c"),
            ):
                assert await client.call(*call) == OOM, call
            assert await client.call("SHUTDOWN") == ErrorReply(
                "ERR Command not allowed inside a transaction"
            )
            assert await client.call("EXEC") == EXECABORT
            assert await client.call("EXISTS", "k2", "new") == 1  # nothing ran
            assert await client.call("TTL", "k3") == -1
            assert await client.call("MULTI") == "OK"
            assert await client.call("DISCARD") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("RESET") == "RESET"
            assert await client.call("MULTI") == "OK"
            assert await client.call("EXEC") == []  # nothing queued: nothing denyoom
            text = await client.call("INFO", "commandstats")
            assert isinstance(text, bytes)
            assert b"cmdstat_get:calls=0,usec=0,usec_per_call=0.00,rejected_calls=1," in text
            await _set_ok(client, "maxmemory", "0")
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "new", "v") == "QUEUED"
            assert await client.call("EXEC") == ["OK"]


async def test_exec_is_refused_when_memory_went_over_after_a_denyoom_command_was_queued() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            admin = await Client.connect(server)
            await _fill_then_limit(admin)
            await _set_ok(admin, "maxmemory", "0")
            assert await client.call("WATCH", "k1") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "x", "1") == "QUEUED"
            assert await client.call("GET", "k1") == "QUEUED"
            await _set_ok(admin, "maxmemory", "1")
            assert await client.call("EXEC") == EXECABORT_OOM
            assert await client.call("EXEC") == ErrorReply("ERR EXEC without MULTI")
            assert await client.call("GET", "x") is None
            # The watches went with the transaction, as Redis's discardTransaction.
            assert await admin.call("DEL", "k1") == 1
            assert await client.call("MULTI") == "OK"
            assert await client.call("EXEC") == []
            # A transaction of commands not flagged denyoom runs over the limit.
            await _set_ok(admin, "maxmemory", "0")
            assert await client.call("MULTI") == "OK"
            assert await client.call("GET", "k2") == "QUEUED"
            assert await client.call("DEL", "k2") == "QUEUED"
            await _set_ok(admin, "maxmemory", "1")
            assert await client.call("EXEC") == [b"v", 1]


async def test_over_maxmemory_an_evicting_policy_evicts_before_multi_queues() -> None:
    with trio.fail_after(TIMEOUT):
        # oom_wait: the time eviction has (real time here), ample on a loaded machine.
        async with running(oom_wait=TIMEOUT / 3) as server:
            client = await Client.connect(server)
            await _set_ok(client, "maxmemory-policy", "allkeys-lru")
            for i in range(50):
                assert await client.call("SET", f"k{i}", "x" * 1000) == "OK"
            used = server.engine.tracker.used
            await _set_ok(client, "maxmemory", str(used // 2))
            assert server.engine.tracker.over_limit
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "new", "v") == "QUEUED"
            assert not server.engine.tracker.over_limit  # evicted at queue time
            assert await client.call("EXEC") == ["OK"]
            dbsize = await client.call("DBSIZE")
            assert isinstance(dbsize, int)
            assert dbsize < 50
            # Nothing to evict (volatile-lru, no key with a TTL): OOM, as Redis.
            await _set_ok(client, "maxmemory-policy", "volatile-lru", "maxmemory", "1")
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "new", "v") == OOM
            assert await client.call("EXEC") == EXECABORT


# -- against a real redis-server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """The ports of a real ``redis-server`` and of KVMemo's Redis port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis")) as both:
        yield both


@pytest.fixture
def pair(ports: tuple[int, int]) -> Iterator[Pair]:
    yield from _connect(ports, 2)


@pytest.fixture
def admin(ports: tuple[int, int]) -> Iterator[Pair]:
    """A second connection to each server (CONFIG SET while the first is in MULTI)."""
    yield from _connect(ports, 2)


def _info_latency(pair: Pair, *sections: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each server's INFO latencystats lines as {command: percentiles' text}, each
    line in Redis's format."""
    out = []
    for conn in (pair.redis, pair.kvmemo):
        raw = _text_of(conn.call("INFO", *sections)[1]).encode()
        out.append(_latency(raw))
    return out[0], out[1]


def _labels(text: str) -> list[str]:
    """The percentile names of one latencystats line (``p50=5.023,p99=6.015``), each
    value checked for Redis's ``%.3f``."""
    if not text:
        return []
    parts = text.split(",")
    labels = []
    for part in parts:
        match = _PERCENTILE.fullmatch(part)
        assert match is not None, text
        labels.append(match[1])
    return labels


LATENCY_CONFIG = [
    ("CONFIG", "GET", "latency-tracking"),
    ("CONFIG", "GET", "latency-tracking-info-percentiles"),
    ("CONFIG", "GET", "LATENCY-TRACKING"),
    ("CONFIG", "GET", "latency-tracking*"),
    ("CONFIG", "SET", "latency-tracking", "maybe"),
    ("CONFIG", "SET", "latency-tracking", ""),
    ("CONFIG", "SET", "latency-tracking", "1"),
    ("CONFIG", "SET", "latency-tracking", "YES"),
    ("CONFIG", "GET", "latency-tracking"),
    *[
        step
        for value in (
            "50 99",
            "",
            "0",
            "100.0",
            "101",
            "-1",
            "abc",
            "50.5 99.99 99.999",
            "1e2",
            "99.9999999",
            "  50   99 ",
            "50,99",
            "0.0001",
            "99 50",
            "50 50",
            "nan",
            "inf",
            "-inf",
            "0x10",
            "0x1.8p1",
            "1e-3",
            "1e-400",
            "1e400",
            " ",
            "50 ",
            "12.3456789012345",
            "-0",
            ".5 5.",
        )
        for step in (
            ("CONFIG", "SET", "latency-tracking-info-percentiles", value),
            ("CONFIG", "GET", "latency-tracking-info-percentiles"),
        )
    ],
    ("CONFIG", "SET", "latency-tracking-info-percentiles", "90", "latency-tracking", "x"),
    ("CONFIG", "GET", "latency-tracking-info-percentiles"),
    ("CONFIG", "SET", "latency-tracking-info-percentiles", "50 99 99.9"),
    ("CONFIG", "GET", "latency-tracking-info-percentiles"),
]


def test_latency_config_answers_as_redis(pair: Pair) -> None:
    run_same_steps(pair, LATENCY_CONFIG)


def test_latencystats_sections_and_lines_are_shaped_as_redis(pair: Pair) -> None:
    # Which INFO arguments give the section, and where (INFO's own checks:
    # test_redis_differential.assert_info_alike, through run_same_steps).
    run_same_steps(
        pair,
        [
            ("INFO",),
            ("INFO", "default"),
            ("INFO", "all"),
            ("INFO", "everything"),
            ("INFO", "latencystats"),
            ("INFO", "LatencyStats", "commandstats"),
            ("INFO", "server", "latencystats"),
        ],
    )
    for percentiles, labels in (
        ("50 99 99.9", ["50", "99", "99.9"]),
        ("50.5 99.99 0 100", ["50.5", "99.99", "0", "100"]),
        ("12.3456789012345", ["12.345679"]),
    ):
        run_same_steps(
            pair,
            [
                ("CONFIG", "SET", "latency-tracking-info-percentiles", percentiles),
                ("CONFIG", "RESETSTAT"),
                ("SET", "k", "v"),
                ("GET", "k"),
                ("GET", "nosuch"),
            ],
        )
        redis, kvmemo = _info_latency(pair, "latencystats")
        # The same commands (each timed once it ran: CONFIG RESETSTAT too).
        assert sorted(redis) == sorted(kvmemo) == ["config|resetstat", "get", "set"]
        for stats in (redis, kvmemo):
            for text in stats.values():
                assert _labels(text) == labels, text
    # No percentile: the lines stay, empty after the colon.
    run_same_steps(pair, [("CONFIG", "SET", "latency-tracking-info-percentiles", "")])
    redis, kvmemo = _info_latency(pair, "latencystats")
    assert set(redis.values()) == set(kvmemo.values()) == {""}
    run_same_steps(
        pair,
        [
            ("CONFIG", "SET", "latency-tracking-info-percentiles", "50 99 99.9"),
            ("CONFIG", "SET", "latency-tracking", "no"),
            ("INFO", "latencystats"),
            ("PING",),
        ],
    )
    r, k = pair.both("INFO", "latencystats")
    assert r[0] == k[0] == b"$16\r\n# Latencystats\r\n\r\n"
    run_same_steps(pair, [("CONFIG", "SET", "latency-tracking", "yes")])
    redis, kvmemo = _info_latency(pair, "latencystats")
    # What ran while it was off is left out; the CONFIG SET that turned it on is in.
    assert "ping" not in redis
    assert "ping" not in kvmemo
    assert "config|set" in redis
    assert "config|set" in kvmemo
    assert sorted(kvmemo) == sorted(redis)


def _errorstats(conn_reply: tuple[bytes, Tree]) -> dict[str, str]:
    text = _text_of(conn_reply[1])
    return dict(line.split(":", 1) for line in text.split("\r\n") if line.startswith("errorstat_"))


def _rejected(conn_reply: tuple[bytes, Tree]) -> dict[str, int]:
    """INFO commandstats' rejected_calls by command, those above 0."""
    text = _text_of(conn_reply[1])
    found = re.findall(r"^cmdstat_(\S+):.*,rejected_calls=(\d+),", text, re.MULTILINE)
    return {name: int(n) for name, n in found if int(n)}


MULTI_OVER_MAXMEMORY = [
    ("MULTI",),
    ("SET", "new", "v"),
    ("GET", "k1"),
    ("DEL", "k2"),
    ("EXPIRE", "k3", "100"),
    ("INCR", "n"),
    ("PING",),
    ("ECHO", "x"),
    ("CLIENT", "GETNAME"),
    ("CONFIG", "GET", "maxmemory"),
    ("NOSUCH",),  # unknown, arity and no_multi come before the memory check
    ("GET",),
    ("SHUTDOWN",),
    ("MULTI",),  # nested MULTI and WATCH are checked for memory too
    ("WATCH", "k1"),
    ("AUTH", "x"),  # Redis would queue these three: over the limit, OOM
    ("HELLO", "2"),
    ("SUBSCRIBE", "c"),
    ("EXEC",),
    ("EXISTS", "k2", "new"),
    ("TTL", "k3"),
    ("GET", "k1"),  # outside MULTI the memory check is the command's own
    ("MULTI",),
    ("DISCARD",),
    ("MULTI",),
    ("RESET",),
    ("WATCH", "k1"),
    ("MULTI",),
    ("EXEC",),  # nothing queued, nothing denyoom: it runs
    ("UNWATCH",),
]


def test_multi_over_maxmemory_refuses_at_queue_time_as_redis(pair: Pair, admin: Pair) -> None:
    run_same_steps(
        admin,
        [
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory", "0"),
            ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
            *[("SET", f"k{i}", "v") for i in range(10)],
            ("CONFIG", "SET", "maxmemory", "1"),
            ("CONFIG", "RESETSTAT"),
        ],
    )
    try:
        run_same_steps(pair, MULTI_OVER_MAXMEMORY)
        r, k = pair.both("INFO", "errorstats")
        assert (
            _errorstats(r)
            == _errorstats(k)
            == {
                "errorstat_ERR": "count=3",
                "errorstat_EXECABORT": "count=1",
                "errorstat_OOM": "count=14",
            }
        )
        r, k = pair.both("INFO", "commandstats")
        assert _rejected(r) == _rejected(k)
    finally:
        run_same_steps(admin, [("CONFIG", "SET", "maxmemory", "0")])


def test_exec_over_maxmemory_with_a_denyoom_command_queued_is_refused_as_redis(
    pair: Pair, admin: Pair
) -> None:
    def over(limit: str) -> None:
        run_same_steps(admin, [("CONFIG", "SET", "maxmemory", limit)])

    run_same_steps(
        admin,
        [
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory", "0"),
            ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
            *[("SET", f"k{i}", "v") for i in range(10)],
            ("CONFIG", "RESETSTAT"),
        ],
    )
    try:
        run_same_steps(pair, [("WATCH", "k1"), ("MULTI",), ("SET", "x", "1"), ("GET", "k1")])
        over("1")
        run_same_steps(pair, [("EXEC",), ("EXEC",), ("GET", "x")])
        run_same_steps(admin, [("DEL", "k1")])  # the watch went with the transaction
        run_same_steps(pair, [("MULTI",), ("EXEC",)])
        over("0")
        run_same_steps(pair, [("MULTI",), ("GET", "k2"), ("DEL", "k2"), ("APPEND", "k3", "x")])
        over("1")  # APPEND is denyoom: the whole transaction is refused
        run_same_steps(pair, [("EXEC",), ("EXISTS", "k2")])
        over("0")
        run_same_steps(pair, [("MULTI",), ("GET", "k2"), ("DEL", "k2"), ("PERSIST", "k4")])
        over("1")  # none is denyoom: it runs
        run_same_steps(pair, [("EXEC",)])
        over("0")
        # Queued with an error, then over: the memory is checked first (Redis's order).
        run_same_steps(pair, [("MULTI",), ("SET", "z", "1"), ("NOSUCH",)])
        over("1")
        run_same_steps(pair, [("EXEC",)])
        # Each refused EXEC is a rejected call and an EXECABORT error, as in Redis.
        r, k = pair.both("INFO", "errorstats")
        assert (
            _errorstats(r)
            == _errorstats(k)
            == {
                "errorstat_ERR": "count=2",
                "errorstat_EXECABORT": "count=3",
            }
        )
        r, k = pair.both("INFO", "commandstats")
        assert _rejected(r) == _rejected(k) == {"exec": 3}
    finally:
        over("0")


def test_an_evicting_policy_with_nothing_to_evict_refuses_as_redis(pair: Pair, admin: Pair) -> None:
    run_same_steps(
        admin,
        [
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory", "0"),
            ("CONFIG", "SET", "maxmemory-policy", "volatile-lru"),
            *[("SET", f"k{i}", "v") for i in range(10)],  # no TTL: nothing volatile-lru evicts
            ("CONFIG", "SET", "maxmemory", "1"),
        ],
    )
    try:
        run_same_steps(pair, [("MULTI",), ("SET", "a", "b"), ("GET", "k1"), ("EXEC",)])
    finally:
        run_same_steps(
            admin,
            [
                ("CONFIG", "SET", "maxmemory", "0"),
                ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
            ],
        )


def _used_memory(reply: tuple[bytes, Tree]) -> int:
    found = re.search(r"^used_memory:(\d+)\r$", _text_of(reply[1]), re.MULTILINE)
    assert found is not None
    return int(found[1])


def test_an_evicting_policy_that_can_make_room_lets_multi_queue_as_redis(
    pair: Pair, admin: Pair
) -> None:
    run_same_steps(
        admin,
        [
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory", "0"),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            *[("SET", f"k{i}", "x" * 10_000) for i in range(50)],
        ],
    )
    try:
        # Each server over its own usage by some 100 KB: eviction makes room.
        for conn in (admin.redis, admin.kvmemo):
            used = _used_memory(conn.call("INFO", "memory"))
            assert conn.call("CONFIG", "SET", "maxmemory", str(used - 100_000))[0] == b"+OK\r\n"
        run_same_steps(pair, [("MULTI",), ("SET", "a", "b"), ("EXEC",), ("GET", "a")])
        r, k = pair.both("DBSIZE")
        assert r[1][1] < 51
        assert k[1][1] < 51
    finally:
        run_same_steps(
            admin,
            [
                ("CONFIG", "SET", "maxmemory", "0"),
                ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
            ],
        )
