"""What a demanding Redis or Prometheus user looks for, and what it did before:

- ``INFO commandstats`` and ``INFO errorstats`` on the Redis port, in Redis's
  line formats (``cmdstat_get:calls=..,usec=..,usec_per_call=..,
  rejected_calls=..,failed_calls=..``, ``errorstat_ERR:count=..``), counted
  as Redis counts them (a failed call ran and answered an error; a rejected
  one was refused before it ran: arity, NOAUTH, OOM, subscribed mode, an
  error found when MULTI queues it; an unknown command is an error only), and
  ``CONFIG RESETSTAT`` zeroing both: there were no such sections (``INFO
  commandstats`` answered nothing), and ``INFO`` gave every section whatever
  was asked, where Redis's default leaves commandstats out;
- the JSON ``info``'s ``stats`` section: no per-command counts;
- ``/metrics``: ``kvmemo_actor_restarts`` was a gauge, though restarts only
  grow; it is the counter ``kvmemo_actor_restarts_total``;
- no latency of the shards' log syncs (``appendfsync``), nor a count of the
  failed ones: ``kvmemo_fsync_duration_seconds{shard}`` and
  ``kvmemo_fsync_failures_total{shard}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from test_audit_ops_s23 import strict_exposition_problems
from test_engine_failures import wait_restarted
from test_persistence_groupsync import fail_next_sync_of, key_on_shard
from test_redis_differential import REDIS_SERVER, RespConnection, redis_and_kvmemo
from test_resp_server import Client, running

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.node import open_node
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import ErrorReply

TIMEOUT = 30  # seconds per test; real sockets and real time

_CMDSTAT = re.compile(
    r"cmdstat_(\S+):calls=(\d+),usec=(\d+),usec_per_call=(\d+\.\d\d),"
    r"rejected_calls=(\d+),failed_calls=(\d+)"
)
_ERRORSTAT = re.compile(r"errorstat_(\S+):count=(\d+)")


def section_lines(text: bytes | str, title: str) -> list[str]:
    """The lines of INFO's section ``title`` (it must be there), CRLF checked."""
    if isinstance(text, bytes):
        text = text.decode()
    for block in text.split("\r\n\r\n"):
        lines = block.split("\r\n")
        if lines[0] == f"# {title}":
            return [line for line in lines[1:] if line]
    raise AssertionError(f"no section {title!r} in {text!r}")


def commandstats(text: bytes | str) -> dict[str, tuple[int, int, int]]:
    """INFO commandstats as {command: (calls, rejected_calls, failed_calls)}, each
    line checked against Redis's format (usec_per_call is usec / calls, 2 decimals)."""
    out = {}
    for line in section_lines(text, "Commandstats"):
        match = _CMDSTAT.fullmatch(line)
        assert match is not None, line
        name, calls, usec, per_call, rejected, failed = match.groups()
        expected = int(usec) / int(calls) if int(calls) else 0.0
        assert per_call == f"{expected:.2f}", line
        out[name] = (int(calls), int(rejected), int(failed))
    return out


def errorstats(text: bytes | str) -> dict[str, int]:
    out = {}
    for line in section_lines(text, "Errorstats"):
        match = _ERRORSTAT.fullmatch(line)
        assert match is not None, line
        out[match[1]] = int(match[2])
    return out


def stat_field(text: bytes, name: str) -> str:
    found = re.search(rf"^{name}:(.*)\r$", text.decode(), re.MULTILINE)
    assert found is not None, name
    return found[1]


async def info(client: Client, *sections: str) -> bytes:
    reply = await client.call("INFO", *sections)
    assert isinstance(reply, bytes), reply
    return reply


# -- INFO commandstats and errorstats on the Redis port ----------------------------------------


async def test_commandstats_count_calls_failures_and_rejections_as_redis() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SET", "s", "v") == "OK"
            for _ in range(3):
                assert await client.call("GET", "s") == b"v"
            assert isinstance(await client.call("INCR", "s"), ErrorReply)  # ran: failed
            assert isinstance(await client.call("GET"), ErrorReply)  # arity: rejected
            assert isinstance(await client.call("SET", "a", "b", "XX", "NX"), ErrorReply)
            assert isinstance(await client.call("NOSUCH", "x"), ErrorReply)  # no command
            text = await info(client, "commandstats")
    stats = commandstats(text)
    assert stats == {
        "get": (3, 1, 0),
        "set": (2, 0, 1),
        "incr": (1, 0, 1),
    }
    usec = int(re.search(rb"cmdstat_get:calls=3,usec=(\d+),", text)[1])  # type: ignore[index]
    assert usec > 0


async def test_errorstats_count_each_error_reply_by_its_code() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.call("SET", "k", "text")
            payload = await client.call("DUMP", "k")
            assert isinstance(payload, bytes)
            errors = [
                await client.call("INCR", "k"),  # ERR (not an integer)
                await client.call("GET"),  # ERR (arity)
                await client.call("NOSUCH"),  # ERR (unknown command)
                await client.call("RESTORE", "k", "0", payload),  # BUSYKEY
            ]
            assert await client.call("MULTI") == "OK"
            errors.append(await client.call("GET"))  # ERR, and EXEC aborts
            errors.append(await client.call("EXEC"))  # EXECABORT
            assert all(isinstance(e, ErrorReply) for e in errors), errors
            text = await info(client)
    assert errorstats(text) == {"ERR": 4, "BUSYKEY": 1, "EXECABORT": 1}
    assert stat_field(text, "total_error_replies") == "6"
    assert b"# Commandstats" not in text  # the default INFO leaves it out, as Redis


async def test_errors_inside_exec_count_for_their_command_not_for_exec() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.call("SET", "k", "text")
            assert await client.call("MULTI") == "OK"
            assert await client.call("INCR", "k") == "QUEUED"
            assert await client.call("CLIENT", "LIST", "x") == "QUEUED"
            assert await client.call("GET", "k") == "QUEUED"
            replies = await client.call("EXEC")
            assert isinstance(replies, list)
            assert [type(r) for r in replies] == [ErrorReply, ErrorReply, bytes]
            text = await info(client, "commandstats", "errorstats")
    assert commandstats(text) == {
        "set": (1, 0, 0),
        "multi": (1, 0, 0),
        "exec": (1, 0, 0),  # it ran its commands: not failed (Redis's count)
        "incr": (1, 0, 1),
        "client|list": (1, 0, 1),
        "get": (1, 0, 0),
    }
    assert errorstats(text) == {"ERR": 2}


async def test_connection_commands_count_under_redis_names_subcommands_included() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("PING") == "PONG"
            assert isinstance(await client.call("PING", "a", "b"), ErrorReply)  # ran: failed
            assert await client.call("CLIENT", "GETNAME") is None
            assert isinstance(await client.call("CLIENT", "NOSUCH"), ErrorReply)  # no command
            assert isinstance(await client.call("CLIENT", "GETNAME", "x"), ErrorReply)
            assert isinstance(await client.call("ECHO"), ErrorReply)  # arity: rejected
            assert isinstance(await client.call("EXEC"), ErrorReply)  # without MULTI: failed
            text = await info(client, "commandstats")
    assert commandstats(text) == {
        "ping": (2, 0, 1),
        "client|getname": (1, 1, 0),
        "echo": (0, 1, 0),
        "exec": (1, 0, 1),
    }


async def test_noauth_and_subscribed_mode_refusals_are_rejected_calls() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"secret"})) as server:
            client = await Client.connect(server)
            assert await client.call("GET", "k") == ErrorReply("NOAUTH Authentication required.")
            assert isinstance(await client.call("CLIENT", "LIST"), ErrorReply)
            assert await client.call("AUTH", "secret") == "OK"
            subscriber = await Client.connect(server)
            assert await subscriber.call("AUTH", "secret") == "OK"
            assert isinstance(await subscriber.call("SUBSCRIBE", "c"), list)
            assert isinstance(await subscriber.call("GET", "k"), ErrorReply)  # RESP2 mode
            text = await info(client, "commandstats", "errorstats")
    stats = commandstats(text)
    assert stats["get"] == (0, 2, 0)
    assert stats["client|list"] == (0, 1, 0)
    assert stats["subscribe"] == (1, 0, 0)
    assert errorstats(text) == {"NOAUTH": 2, "ERR": 1}


async def test_a_write_refused_for_memory_is_a_rejected_call_and_an_oom_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory=1, eviction_policy="noeviction") as server:
            client = await Client.connect(server)
            reply = await client.call("SET", "k", "v")
            assert isinstance(reply, ErrorReply)
            assert reply.message.startswith("OOM ")
            text = await info(client, "commandstats", "errorstats")
    assert commandstats(text) == {"set": (0, 1, 0)}
    assert errorstats(text) == {"OOM": 1}


async def test_info_default_leaves_out_commandstats_and_all_gives_it() -> None:
    def titles(text: bytes) -> list[str]:
        return re.findall(r"^# (\w+)\r$", text.decode(), re.MULTILINE)

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            everything = [
                "Server", "Clients", "Memory", "Persistence", "Stats", "Replication",
                "CPU", "Commandstats", "Errorstats", "Latencystats", "Actors", "Keyspace",
            ]  # fmt: skip
            default = [t for t in everything if t not in ("Commandstats", "Latencystats")]
            assert titles(await info(client)) == default
            assert titles(await info(client, "default")) == default
            assert titles(await info(client, "all")) == everything
            assert titles(await info(client, "EVERYTHING")) == everything
            assert titles(await info(client, "errorstats")) == ["Errorstats"]
            assert titles(await info(client, "server", "commandstats")) == [
                "Server",
                "Commandstats",
            ]
            assert titles(await info(client, "default", "commandstats")) == [
                t for t in everything if t != "Latencystats"
            ]


async def test_config_resetstat_zeroes_commandstats_and_errorstats() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.call("SET", "k", "text")
            await client.call("INCR", "k")
            await client.call("GET")
            before = await info(client, "commandstats", "errorstats")
            assert commandstats(before)["incr"] == (1, 0, 1)
            assert await client.call("CONFIG", "RESETSTAT") == "OK"
            text = await info(client, "commandstats", "errorstats", "stats")
            # As Redis: only the RESETSTAT itself, counted once it ran.
            assert commandstats(text) == {"config|resetstat": (1, 0, 0)}
            assert errorstats(text) == {}
            assert stat_field(text, "total_error_replies") == "0"
            await client.call("INCR", "k")
            after = commandstats(await info(client, "commandstats"))
            assert after["incr"] == (1, 0, 1)
            assert after["info"] == (1, 0, 0)
            # The engine's counters are Prometheus counters: they never go back.
            prometheus = server.engine.metrics.render_prometheus()
    assert 'kvmemo_command_failed_total{command="incr"} 2\n' in prometheus
    assert 'kvmemo_command_rejected_total{command="get"} 1\n' in prometheus
    assert strict_exposition_problems(prometheus) == []


# -- against a real redis-server ---------------------------------------------------------------

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

# The same commands on both servers, from a fresh connection after CONFIG RESETSTAT.
_SEQUENCE: list[tuple[str, ...]] = [
    ("SET", "s", "v"),
    ("GET", "s"),
    ("GET", "s"),
    ("GET", "s"),
    ("INCR", "s"),
    ("GET",),
    ("NOSUCH", "a", "b"),
    ("SET", "a", "b", "c", "d", "XX", "NX"),
    ("MGET",),
    ("CLIENT", "NOSUCH"),
    ("CLIENT", "LIST", "a"),
    ("CLIENT", "GETNAME"),
    ("PING",),
    ("PING", "a", "b"),
    ("MULTI",),
    ("GET",),
    ("SET", "a", "b"),
    ("EXEC",),
    ("MULTI",),
    ("INCR", "s"),
    ("GET", "s"),
    ("EXEC",),
    ("EXEC",),
    ("DISCARD",),
    ("ECHO",),
    ("CONFIG", "GET", "maxmemory"),
    ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("SET", "z", "1"),
    ("CONFIG", "SET", "maxmemory", "0"),
]


def _run_on(port: int, sequence: Sequence[tuple[str, ...]], *, reset: bool = True) -> str:
    """``sequence`` on one connection to ``port`` (after CONFIG RESETSTAT, with
    ``reset``), then its INFO commandstats and errorstats, header line cut."""
    conn = RespConnection(port)
    try:
        if reset:
            assert conn.call("CONFIG", "RESETSTAT")[0] == b"+OK\r\n"
        for argv in sequence:
            conn.call(*argv)
        raw, _ = conn.call("INFO", "commandstats", "errorstats")
    finally:
        conn.close()
    return raw.split(b"\r\n", 1)[1].decode()


@needs_redis
def test_commandstats_and_errorstats_match_a_real_redis_server(tmp_path: Path) -> None:
    with redis_and_kvmemo(tmp_path) as (redis_port, kvmemo_port):
        redis_text = _run_on(redis_port, _SEQUENCE)
        kvmemo_text = _run_on(kvmemo_port, _SEQUENCE)
    assert commandstats(kvmemo_text) == commandstats(redis_text)
    assert errorstats(kvmemo_text) == errorstats(redis_text)
    assert "errorstat_OOM:count=1" in kvmemo_text


@needs_redis
def test_noauth_refusals_match_a_real_redis_server(tmp_path: Path) -> None:
    sequence = [
        ("GET", "k"),  # NOAUTH: rejected
        ("PING",),
        ("AUTH", "pw"),
        ("GET", "k"),
        ("AUTH", "wrong"),
        ("CLIENT", "ID"),
    ]
    # No CONFIG RESETSTAT first: it would be refused too (NOAUTH).
    with redis_and_kvmemo(tmp_path, ("--requirepass", "pw"), frozenset({"pw"})) as ports:
        redis_text, kvmemo_text = (_run_on(port, sequence, reset=False) for port in ports)
    assert commandstats(kvmemo_text) == commandstats(redis_text)
    assert errorstats(kvmemo_text) == errorstats(redis_text)
    assert errorstats(kvmemo_text) == {"NOAUTH": 2, "WRONGPASS": 1}


# -- the JSON info ---------------------------------------------------------------------------


async def test_info_stats_gives_each_commands_calls_and_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "text")
        for _ in range(3):
            assert await kv.get("k") == b"text"
        with pytest.raises(kvmemo.KVMemoError):
            await kv.incr("k")
        with pytest.raises(kvmemo.KVMemoError):
            await kv.execute("get")  # arity: rejected
        results = await kv.execute_many(("incr", "k"), ("get", "k"), ("mset", "a"))
        assert [type(r) for r in results] == [kvmemo.NotIntegerError, bytes, kvmemo.ArityError]
        stats = (await kv.execute("info", "stats"))["stats"]
    commands = stats["commands"]
    assert {
        name: (c["calls"], c["rejected_calls"], c["failed_calls"]) for name, c in commands.items()
    } == {
        "set": (1, 0, 0),
        "get": (4, 1, 0),
        "incr": (2, 0, 2),
        "mset": (0, 1, 0),
    }
    get = commands["get"]
    assert get["usec"] >= 0
    assert get["usec_per_call"] == get["usec"] / 4
    # The rest of the section as before.
    assert {"expired_keys", "evicted_keys", "metrics"} <= set(stats)


# -- Prometheus ------------------------------------------------------------------------------


async def test_actor_restarts_are_a_counter_that_only_grows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        kv.kill_actor("shard-0")
        await wait_restarted(kv.system, "shard-0")
        engine = kv.engine
        engine.refresh_actor_metrics()
        engine.refresh_actor_metrics()  # a second read adds nothing
        text = engine.metrics.render_prometheus()
    assert "# TYPE kvmemo_actor_restarts_total counter\n" in text
    assert 'kvmemo_actor_restarts_total{actor="shard-0"} 1\n' in text
    assert 'kvmemo_actor_restarts_total{actor="shard-1"} 0\n' in text
    assert "kvmemo_actor_restarts{" not in text
    assert strict_exposition_problems(text) == []


async def test_a_busy_nodes_metrics_still_read_strictly() -> None:
    config = ServerConfig(port=0, resp_port=0)
    with trio.fail_after(TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as node:
            kv = node.engine
            await kv.execute("SET", [b"k", b"v"])
            with pytest.raises(kvmemo.KVMemoError):
                await kv.execute("INCR", [b"k"])
            with pytest.raises(kvmemo.KVMemoError):
                await kv.execute("GET", [])
            kv.record_call("client|list", 0.001)
            kv.refresh_actor_metrics()
            text = kv.metrics.render_prometheus()
    assert strict_exposition_problems(text) == []
    assert 'kvmemo_command_failed_total{command="incr"} 1\n' in text
    assert 'kvmemo_command_rejected_total{command="get"} 1\n' in text
    assert 'kvmemo_command_duration_seconds_count{command="client|list"} 1\n' in text


# -- the shards' log syncs ---------------------------------------------------------------------


def _fsync_samples(text: str, name: str) -> dict[str, float]:
    return {
        m[1]: float(m[2])
        for m in re.finditer(rf'^{name}\{{shard="(\d+)"\}} (\S+)$', text, re.MULTILINE)
    }


@pytest.mark.parametrize("method", ["commitlog", "fsync"])
async def test_each_log_sync_is_timed_per_shard(tmp_path: Path, method: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(
            shards=2, data_dir=str(tmp_path), appendfsync="always", fsync_method=method
        ) as kv:
            text = kv.engine.metrics.render_prometheus()
            start = _fsync_samples(text, "kvmemo_fsync_duration_seconds_count")
            assert start.keys() == {"0", "1"}  # every shard's series, from the start
            for shard in (0, 1):
                for i in range(3):  # one at a time: three batches, three syncs
                    await kv.set(key_on_shard(kv, shard, f"k{i}"), b"v")
            text = kv.engine.metrics.render_prometheus()
    counts = _fsync_samples(text, "kvmemo_fsync_duration_seconds_count")
    sums = _fsync_samples(text, "kvmemo_fsync_duration_seconds_sum")
    for shard in ("0", "1"):
        assert counts[shard] >= start[shard] + 3
        assert sums[shard] > 0
    assert _fsync_samples(text, "kvmemo_fsync_failures_total") == {"0": 0, "1": 0}
    assert "# TYPE kvmemo_fsync_duration_seconds histogram\n" in text
    assert strict_exposition_problems(text) == []


async def test_a_failed_log_sync_is_counted_for_its_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = fail_next_sync_of(monkeypatch, "shard-1")
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(
            shards=2, data_dir=str(tmp_path), appendfsync="always", fsync_method="fsync"
        ) as kv:
            metrics = kv.engine.metrics
            before = _fsync_samples(
                metrics.render_prometheus(), "kvmemo_fsync_duration_seconds_count"
            )
            await kv.set(key_on_shard(kv, 0), b"v")
            with pytest.raises(kvmemo.KVMemoError) as caught:
                await kv.set(key_on_shard(kv, 1), b"v")
            assert caught.value.kind == "IO"
            assert not failing
            text = metrics.render_prometheus()
    assert _fsync_samples(text, "kvmemo_fsync_failures_total") == {"0": 0, "1": 1}
    counts = _fsync_samples(text, "kvmemo_fsync_duration_seconds_count")
    assert counts["1"] == before["1"] + 1  # the failed one is timed too
    assert strict_exposition_problems(text) == []


async def test_a_store_without_persistence_has_no_fsync_metrics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2) as kv:
        text = kv.engine.metrics.render_prometheus()
    assert "kvmemo_fsync" not in text


async def test_the_syncs_of_everysec_and_snapshots_are_timed_and_their_failures_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(
            shards=2, data_dir=str(tmp_path), appendfsync="everysec", fsync_method="fsync"
        ) as kv:
            metrics = kv.engine.metrics
            await kv.set(key_on_shard(kv, 0), b"v")
            await kv.set(key_on_shard(kv, 1), b"v")
            before = _fsync_samples(
                metrics.render_prometheus(), "kvmemo_fsync_duration_seconds_count"
            )
            failing = fail_next_sync_of(monkeypatch, "shard-1")
            # A snapshot syncs the log first (its head mark): shard-1's sync fails.
            with pytest.raises(kvmemo.KVMemoError):
                await kv.execute("save")
            assert not failing
            text = metrics.render_prometheus()
    assert _fsync_samples(text, "kvmemo_fsync_failures_total") == {"0": 0, "1": 1}
    counts = _fsync_samples(text, "kvmemo_fsync_duration_seconds_count")
    assert counts["0"] >= before["0"] + 1
    assert counts["1"] >= before["1"] + 1
