"""Runtime configuration on the Redis port as Redis users expect it (round 24).

- ``CONFIG SET timeout N`` changes the idle timeout of the Redis port while it
  runs, for the clients already open too (Redis checks every client's last
  interaction periodically, so a lower timeout closes those already silent
  for longer, a higher one or 0 spares those the old one would have closed);
  subscribed clients and clients held by CLIENT PAUSE are never idle, as in
  Redis. The WebSocket port's own ``--idle-timeout`` is not changed by it.
- ``CONFIG SET maxclients N`` limits the connections accepted from then on;
  those open stay open, as in Redis.
- Both are checked as Redis checks them, word for word (against a real
  ``redis-server`` when one is installed), and all or nothing.
- ``CONFIG REWRITE`` on a node started with ``--config FILE`` names the file
  and says why KVMemo does not rewrite it (the file is untouched).

Time is trio's MockClock (autojump): a client "silent for 100 s" costs nothing
and no test waits on the wall clock for an effect.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from test_cli import resolved
from test_redis_differential import (
    REDIS_SERVER,
    Pair,
    _connect,
    redis_and_kvmemo,
    run_same_steps,
)
from test_resp_server import Client, running
from trio_websocket import open_websocket_url

from kvmemo.node import open_node
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import ErrorReply, Push
from kvmemo.server.resp_server import RespLimits

TIMEOUT = 60  # seconds of virtual time per test (a hang is a failure, not a wait)
# How late the idle sweep may close a client past its timeout: the sweep's
# period (resp_server.IDLE_SWEEP_PERIOD), plus the virtual time the clock may
# jump while a test's own replies travel.
LATE = 1.0 + 0.5


def _failed(name: str, reason: str) -> ErrorReply:
    return ErrorReply(f"ERR CONFIG SET failed (possibly related to argument '{name}') - {reason}")


async def _config(client: Client, name: str) -> bytes:
    reply = await client.call("CONFIG", "GET", name)
    if isinstance(reply, list):  # RESP2: the flat pairs
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    assert isinstance(reply, dict), reply
    value = reply[name.encode()]
    assert isinstance(value, bytes)
    return value


async def _closed_at(client: Client) -> float:
    """Wait until the server closes ``client``; the (virtual) time it was seen closed."""
    assert await client.closed()
    return trio.current_time()


# -- CONFIG SET timeout ---------------------------------------------------------------------


async def test_config_set_timeout_closes_a_client_already_idle_for_longer_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT * 10):
        async with running() as server:  # no idle timeout at start
            idle = await Client.connect(server)
            assert await idle.call("PING") == "PONG"
            await trio.sleep(100)  # virtual: silent for 100 s, never closed
            admin = await Client.connect(server)
            assert await admin.call("CONFIG", "SET", "timeout", "10") == "OK"
            changed = trio.current_time()
            assert await _closed_at(idle) - changed < 0.5  # the next pass is the change's
            assert await admin.call("PING") == "PONG"  # it was not idle
            assert await _config(admin, "timeout") == b"10"


async def test_config_set_timeout_reaches_a_client_that_waits_without_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            waiting = await Client.connect(server)
            assert await waiting.call("PING") == "PONG"
            last = trio.current_time()
            await trio.sleep(5)
            admin = await Client.connect(server)
            assert await admin.call("CONFIG", "SET", "timeout", "10") == "OK"
            await admin.aclose()
            silent = await _closed_at(waiting) - last
            assert 10 - 0.5 <= silent <= 10 + LATE, silent


async def test_raising_the_timeout_spares_a_client_past_the_old_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT * 10):
        async with running(limits=RespLimits(idle_timeout=5)) as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "SET", "timeout", "100") == "OK"
            await trio.sleep(50)  # ten times the old timeout
            assert await client.call("PING") == "PONG"
            last = trio.current_time()
            silent = await _closed_at(client) - last
            assert 100 - 0.5 <= silent <= 100 + LATE, silent


async def test_timeout_0_spares_every_client_even_one_already_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT * 100):
        async with running(limits=RespLimits(idle_timeout=5)) as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "SET", "timeout", "0") == "OK"
            await trio.sleep(1000)
            assert await client.call("PING") == "PONG"
            assert await _config(client, "timeout") == b"0"


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_subscribed_client_is_not_closed_as_idle(
    autojump_clock: trio.testing.MockClock, protocol: int
) -> None:
    """Redis's clientsCronHandleTimeout spares pub/sub clients (RESP2 and RESP3 alike)."""
    with trio.fail_after(TIMEOUT * 10):
        async with running(limits=RespLimits(idle_timeout=1)) as server:
            listener = await Client.connect(server)
            if protocol == 3:
                assert isinstance(await listener.call("HELLO", "3"), dict)
            await listener.call("SUBSCRIBE", "news")
            await trio.sleep(100)
            publisher = await Client.connect(server)
            assert await publisher.call("PUBLISH", "news", "hello") == 1
            message = await listener.reply()
            items = list(message.items) if isinstance(message, Push) else message
            assert items == [b"message", b"news", b"hello"]
            # Once it listens to nothing, it is an ordinary client again.
            await listener.call("UNSUBSCRIBE")
            last = trio.current_time()
            silent = await _closed_at(listener) - last
            assert silent <= 1 + LATE, silent


async def test_a_client_held_by_client_pause_is_not_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A held client waits for the server, not the other way round (Redis: blocked)."""
    with trio.fail_after(TIMEOUT * 10):
        async with running(limits=RespLimits(idle_timeout=2)) as server:
            held = await Client.connect(server)
            assert await held.call("SET", "k", "v") == "OK"
            pauser = await Client.connect(server)
            assert await pauser.call("CLIENT", "PAUSE", "30000", "ALL") == "OK"
            started = trio.current_time()
            assert await held.call("GET", "k") == b"v"  # after the pause, 30 s later
            assert trio.current_time() - started >= 30 - 0.5
            assert await held.call("PING") == "PONG"


async def test_config_set_timeout_leaves_the_websocket_ports_idle_timeout_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = ServerConfig(port=0, resp_port=0)  # --idle-timeout 0: sessions never idle out
    with trio.fail_after(TIMEOUT * 10):
        async with open_node(server_config=config) as node:
            assert node.resp_bound is not None
            host, port = node.resp_bound
            admin = Client(await trio.open_tcp_stream(host, port))
            async with open_websocket_url(node.url) as ws:
                assert await admin.call("CONFIG", "SET", "timeout", "1") == "OK"
                await trio.sleep(100)
                await ws.send_message('{"jsonrpc": "2.0", "id": 1, "method": "ping"}')
                assert '"PONG"' in await ws.get_message()
            assert await admin.closed()  # the Redis port's own client did idle out


async def test_config_get_timeout_shows_a_fraction_given_at_start() -> None:
    """``--resp-idle-timeout 0.5`` is not "0" (never) in CONFIG GET."""
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(idle_timeout=0.5)) as server:
            client = await Client.connect(server)
            assert await _config(client, "timeout") == b"0.5"


# -- CONFIG SET maxclients ------------------------------------------------------------------


async def test_config_set_maxclients_limits_new_connections_and_keeps_the_open_ones() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            a = await Client.connect(server)
            b = await Client.connect(server)
            assert await b.call("PING") == "PONG"
            assert await a.call("CONFIG", "SET", "maxclients", "1") == "OK"  # below 2 open
            assert await a.call("PING") == "PONG"
            assert await b.call("PING") == "PONG"
            assert await _config(a, "maxclients") == b"1"
            info = await a.call("INFO", "clients")
            assert isinstance(info, bytes)
            assert re.search(rb"\r\nmaxclients:1\r\n", info), info
            refused = await Client.connect(server)
            assert await refused.reply() == ErrorReply("ERR max number of clients reached")
            assert await refused.closed()
            assert await a.call("CONFIG", "SET", "maxclients", "3") == "OK"
            c = await Client.connect(server)
            assert await c.call("PING") == "PONG"
            assert await _config(c, "maxclients") == b"3"


# -- checked as Redis checks them -----------------------------------------------------------

# Redis 7's answers (live against redis-server 7.0.15, and its config.c ranges:
# timeout 0..INT_MAX, maxclients 1..UINT_MAX, both parsed by string2ll).
NOT_INTEGER = "argument couldn't be parsed into an integer"
TIMEOUT_RANGE = "argument must be between 0 and 2147483647 inclusive"
MAXCLIENTS_RANGE = "argument must be between 1 and 4294967295 inclusive"
BAD_VALUES = [
    ("timeout", "-1", TIMEOUT_RANGE),
    ("timeout", "2147483648", TIMEOUT_RANGE),
    ("timeout", "abc", NOT_INTEGER),
    ("timeout", "1.5", NOT_INTEGER),
    ("timeout", "", NOT_INTEGER),
    ("timeout", "+5", NOT_INTEGER),
    ("timeout", " 5", NOT_INTEGER),
    ("timeout", "007", NOT_INTEGER),
    ("timeout", "-0", NOT_INTEGER),
    ("timeout", "10s", NOT_INTEGER),
    ("timeout", "99999999999999999999", NOT_INTEGER),
    ("maxclients", "0", MAXCLIENTS_RANGE),
    ("maxclients", "-1", MAXCLIENTS_RANGE),
    ("maxclients", "4294967296", MAXCLIENTS_RANGE),
    ("maxclients", "abc", NOT_INTEGER),
    ("maxclients", "1.5", NOT_INTEGER),
]


@pytest.mark.parametrize(("name", "value", "reason"), BAD_VALUES)
async def test_a_bad_timeout_or_maxclients_gets_redis_error_and_changes_nothing(
    name: str, value: str, reason: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(idle_timeout=7, max_clients=9)) as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "SET", name.upper(), value) == _failed(name, reason)
            assert await _config(client, "timeout") == b"7"
            assert await _config(client, "maxclients") == b"9"


async def test_config_set_applies_timeout_and_maxclients_all_or_nothing() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            reply = await client.call("CONFIG", "SET", "timeout", "5", "maxclients", "0")
            assert reply == _failed("maxclients", MAXCLIENTS_RANGE)
            assert await _config(client, "timeout") == b"0"
            reply = await client.call(
                "CONFIG", "SET", "timeout", "5", "maxclients", "20", "maxmemory-policy", "bogus"
            )
            assert isinstance(reply, ErrorReply)
            assert (await _config(client, "timeout"), await _config(client, "maxclients")) == (
                b"0",
                b"10000",
            )
            reply = await client.call("CONFIG", "SET", "timeout", "5", "maxclients", "20")
            assert reply == "OK"
            assert (await _config(client, "timeout"), await _config(client, "maxclients")) == (
                b"5",
                b"20",
            )


REDIS_SEQUENCE = [
    *[("CONFIG", "SET", name, value) for name, value, _ in BAD_VALUES],
    ("CONFIG", "SET", "timeout", "5", "maxclients", "0"),
    ("CONFIG", "GET", "timeout"),
    ("CONFIG", "SET", "timeout", "2147483647"),
    ("CONFIG", "SET", "timeout", "10", "maxclients", "20"),
    ("CONFIG", "GET", "timeout"),
    ("CONFIG", "GET", "maxclients"),
    ("CONFIG", "SET", "maxclients", "4294967295"),
    ("CONFIG", "GET", "maxclients"),
    ("CONFIG", "SET", "timeout", "0", "maxclients", "10000"),
    ("CONFIG", "GET", "timeout"),
    ("CONFIG", "GET", "maxclients"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A RESP2 connection to a real ``redis-server`` and one to KVMemo's Redis port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis")) as ports:
        yield from _connect(ports, 2)


def test_config_set_timeout_and_maxclients_answer_as_redis_byte_for_byte(pair: Pair) -> None:
    run_same_steps(pair, REDIS_SEQUENCE)


# -- CONFIG REWRITE -------------------------------------------------------------------------


async def test_config_rewrite_without_a_config_file_answers_as_redis() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "REWRITE") == ErrorReply(
                "ERR The server is running without a config file"
            )
            info = await client.call("INFO", "server")
            assert isinstance(info, bytes)
            assert b"\r\nconfig_file:\r\n" in info


async def test_config_rewrite_names_the_config_file_and_leaves_it_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = "# kept as written\nshards = 2\n[limits]\nresp_idle_timeout = 30  # seconds\n"
    (tmp_path / "kvmemo.toml").write_text(text)
    settings = resolved(["--config", "kvmemo.toml", "--port", "0", "--resp-port", "0"])
    path = str(tmp_path / "kvmemo.toml")
    assert settings.server.config_file == path  # relative as given, named absolute
    with trio.fail_after(TIMEOUT):
        async with open_node(settings.store, settings.server) as node:
            assert node.resp_bound is not None
            client = Client(await trio.open_tcp_stream(*node.resp_bound))
            assert await _config(client, "timeout") == b"30"
            assert await client.call("CONFIG", "SET", "timeout", "60") == "OK"
            assert await client.call("CONFIG", "REWRITE") == ErrorReply(
                f"ERR CONFIG REWRITE is not supported: the config file '{path}' is TOML that"
                " KVMemo reads at start and never writes (a rewrite would lose its comments"
                " and layout, and flags and KVMEMO_* variables override it); put the settings"
                " changed by CONFIG SET in it yourself"
            )
            info = await client.call("INFO", "server")
            assert isinstance(info, bytes)
            assert f"\r\nconfig_file:{path}\r\n".encode() in info
            await client.aclose()
    assert await trio.Path(tmp_path / "kvmemo.toml").read_text() == text
    assert [p.name for p in await trio.Path(tmp_path).iterdir()] == ["kvmemo.toml"]


def test_a_node_without_a_config_file_names_none() -> None:
    settings = resolved(["--port", "0"])
    assert settings.server.config_file is None
