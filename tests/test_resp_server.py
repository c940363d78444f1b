"""The Redis-protocol port (kvmemo.server.resp_server) over real sockets.

Every test starts a store and ``serve_resp`` on 127.0.0.1, port 0, inside the
test, and talks raw RESP through trio streams (or redis-py, in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import redis
import redis.asyncio
import redis.exceptions
import trio
import trio.lowlevel
from command_suite import SUITE, SuiteCase

from kvmemo.api import Arg, Commands, encode_arg
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.errors import UnavailableError
from kvmemo.node import open_node
from kvmemo.server import resp_server
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import (
    NEED_DATA,
    ErrorReply,
    RespReplyParser,
    Set,
    Verbatim,
    encode_command,
)
from kvmemo.server.resp_server import RespLimits, serve_resp
from kvmemo.storage.shard import Inspect

TIMEOUT = 30  # seconds per test; real sockets and real time
DEFAULT_LIMITS = RespLimits()


@attrs.frozen
class Running:
    engine: KVEngine
    host: str
    port: int


@asynccontextmanager
async def running(
    *,
    tokens: frozenset[str] = frozenset(),
    limits: RespLimits = DEFAULT_LIMITS,
    **settings: Any,
) -> AsyncIterator[Running]:
    """A store plus its Redis port, stopped at the end of the block."""
    settings.setdefault("shards", 4)
    async with trio.open_nursery() as nursery:
        engine = KVEngine(StoreConfig(**settings))
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        host, port = await nursery.start(
            partial(serve_resp, engine, port=0, tokens=tokens, limits=limits)
        )
        try:
            yield Running(engine, host, port)
        finally:
            nursery.cancel_scope.cancel()


class Client:
    """A raw RESP client on a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = RespReplyParser()

    @classmethod
    async def connect(cls, server: Running) -> Client:
        return cls(await trio.open_tcp_stream(server.host, server.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self) -> object:
        while True:
            value = self.parser.next_reply()
            if value is not NEED_DATA:
                return value
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.parser.feed(data)

    async def replies(self, n: int) -> list[object]:
        return [await self.reply() for _ in range(n)]

    async def call(self, *args: bytes | str | int) -> object:
        await self.send(encode_command(*args))
        return await self.reply()

    async def raw(self, data: bytes, size: int) -> bytes:
        """Send ``data``; return exactly the next ``size`` bytes (no parsing)."""
        await self.send(data)
        out = b""
        while len(out) < size:
            chunk = await self.stream.receive_some(size - len(out))
            if not chunk:
                break
            out += chunk
        return out

    async def closed(self) -> bool:
        """Read until the server closes; True once it has (EOF or reset)."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


async def wait_until_down(engine: KVEngine, name: str) -> None:
    """Wait for a killed actor to be seen down (the kill lands at its next checkpoint)."""
    # No event to wait on from outside the actor runtime: poll.
    while any(a["name"] == name and a["state"] == "running" for a in engine.actors()):  # noqa: ASYNC110
        await trio.sleep(0.001)


async def client_count(client: Client) -> int:
    listing = await client.call("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return len(listing.splitlines())


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_bulk_len", -1, "max_bulk_len must be >= 0, got -1"),
        ("max_args", 0, "max_args must be >= 1, got 0"),
        ("max_output_buffer", 0, "max_output_buffer must be >= 1, got 0"),
        ("max_clients", 0, "max_clients must be >= 1, got 0"),
        ("output_timeout", 0, "output_timeout must be > 0, got 0"),
        ("idle_timeout", -1, "idle_timeout must be >= 0, got -1"),
    ],
)
def test_resp_limits_refuse_out_of_range_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        RespLimits(**{field: value})


async def test_serve_resp_reports_the_bound_port_and_stops_when_cancelled() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            assert server.host == "127.0.0.1"
            assert server.port > 0
            client = await Client.connect(server)
            assert await client.call("PING") == "PONG"
        # The block cancelled the server: the port is closed.
        with pytest.raises(OSError, match="onnect"):
            await trio.open_tcp_stream(server.host, server.port)


# -- pipelining and inline requests ------------------------------------------------------


async def test_pipelined_commands_are_answered_in_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            batch = b"".join(
                [
                    encode_command("SET", "a", "1"),
                    encode_command("GET", "a"),
                    encode_command("INCR", "a"),
                    encode_command("PING"),
                    encode_command("GET", "missing"),
                    encode_command("NOSUCH"),
                    encode_command("MSET", "b", "x", "c", "y"),
                    encode_command("MGET", "a", "b", "c", "d"),
                    encode_command("DEL", "a", "b"),
                    encode_command("ECHO", "hi"),
                ]
            )
            await client.send(batch)
            assert await client.replies(10) == [
                "OK",
                b"1",
                2,
                "PONG",
                None,
                ErrorReply("ERR unknown command 'NOSUCH', with args beginning with: "),
                "OK",
                [b"2", b"x", b"y", None],
                2,
                b"hi",
            ]


async def test_pipelined_writes_to_one_key_take_effect_in_sending_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            n = 500
            batch = b"".join(encode_command("INCR", "counter") for _ in range(n))
            batch += encode_command("APPEND", "log", "a") + encode_command("APPEND", "log", "b")
            batch += encode_command("GET", "counter") + encode_command("GET", "log")
            await client.send(batch)
            replies = await client.replies(n + 4)
            assert replies[:n] == list(range(1, n + 1))
            assert replies[n:] == [1, 2, str(n).encode(), b"ab"]


async def test_a_pipeline_split_at_any_byte_gets_the_same_replies() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            batch = encode_command("SET", "k", "value") + b"GET k\r\n" + encode_command("GET", "k")
            for i in range(len(batch)):
                await client.send(batch[i : i + 1])
                await trio.lowlevel.checkpoint()
            assert await client.replies(3) == ["OK", b"value", b"value"]


async def test_inline_commands_are_split_like_redis() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.send(
                b"PING\r\nSET greeting \"hello world\"\r\nGET greeting\nset 'q' 'it''s'\r\n"
            )
            assert await client.replies(3) == ["PONG", "OK", b"hello world"]
            assert await client.reply() == ErrorReply(
                "ERR Protocol error: unbalanced quotes in request"
            )
            assert await client.closed()


async def test_ping_in_resp2_is_a_simple_string_and_echoes_a_message_as_bulk() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.raw(b"PING\r\n", 7) == b"+PONG\r\n"
            assert await client.raw(b"PING hi\r\n", 8) == b"$2\r\nhi\r\n"


# -- Redis's error replies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (["GET"], "ERR wrong number of arguments for 'get' command"),
        (["get", "a", "b"], "ERR wrong number of arguments for 'get' command"),
        (["PING", "a", "b"], "ERR wrong number of arguments for 'ping' command"),
        (["SET", "k", "v", "XX", "NX"], "ERR syntax error"),
        (["SET", "k", "v", "EX", "0"], "ERR invalid expire time in 'set' command"),
        (["INCRBY", "k", "x"], "ERR value is not an integer or out of range"),
        (["SET", "k", "v", "EX", "ten"], "ERR value is not an integer or out of range"),
        (["FOO"], "ERR unknown command 'FOO', with args beginning with: "),
        (["foo", "a", "b c"], "ERR unknown command 'foo', with args beginning with: 'a' 'b c' "),
        (
            ["AUTH", "pw"],
            "ERR AUTH <password> called without any password configured for the default user."
            " Are you sure your configuration is correct?",
        ),
        (
            ["AUTH", "someone", "pw"],
            "WRONGPASS invalid username-password pair or user is disabled.",
        ),
        (["AUTH", "a", "b", "c"], "ERR syntax error"),
        (["SELECT", "1"], "ERR DB index is out of range"),
        (["SELECT", "x"], "ERR value is not an integer or out of range"),
        (["HELLO", "4"], "NOPROTO unsupported protocol version"),
        (["HELLO", "x"], "ERR Protocol version is not an integer or out of range"),
        (["HELLO", "3", "BOGUS"], "ERR Syntax error in HELLO option 'BOGUS'"),
        (["CLIENT", "FOO"], "ERR unknown subcommand 'FOO'. Try CLIENT HELP."),
        (["CLIENT", "SETNAME"], "ERR wrong number of arguments for 'client|setname' command"),
        (
            ["CLIENT", "SETNAME", "a b"],
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ),
        (
            ["CONFIG", "SET", "nosuch", "1"],
            "ERR Unknown option or number of arguments for CONFIG SET - 'nosuch'",
        ),
        (
            ["CONFIG", "SET", "maxmemory", "lots"],
            "ERR CONFIG SET failed (possibly related to argument 'maxmemory')"
            " - argument must be a memory value",
        ),
        (
            ["CONFIG", "SET", "port", "1"],
            "ERR CONFIG SET failed (possibly related to argument 'port')"
            " - can't set immutable config",
        ),
        (["COMMAND", "GETKEYS", "nosuch", "x"], "ERR Invalid command specified"),
        (["COMMAND", "GETKEYS", "ping", "x"], "ERR The command has no key arguments"),
        (["DEBUG", "KILL", "shard-0"], "ERR unknown command 'debug.kill' (chaos is not enabled)"),
        (["SAVE"], "ERR persistence is not enabled on this server"),
    ],
)
async def test_errors_are_worded_as_redis_words_them(command: list[str], error: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call(*command) == ErrorReply(error)
            assert await client.call("PING") == "PONG"  # the connection stays usable


async def test_a_write_over_maxmemory_gets_redis_oom_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(eviction_policy="noeviction", oom_wait=0.01) as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "SET", "maxmemory", "2000") == "OK"
            assert server.engine.tracker.maxmemory == 2000
            assert await client.call("SET", "big", b"x" * 5000) == ErrorReply(
                "OOM command not allowed when used memory > 'maxmemory'."
            )
            assert await client.call("GET", "big") is None
            assert await client.call("SET", "small", "x") == "OK"


async def test_a_value_over_max_value_size_is_an_err_and_nothing_is_stored() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(max_value_size=10) as server:
            client = await Client.connect(server)
            reply = await client.call("SET", "k", b"x" * 11)
            assert reply == ErrorReply("ERR value of 11 bytes is over max_value_size (10)")
            assert await client.call("EXISTS", "k") == 0


async def test_a_restarting_shard_answers_tryagain_and_applies_nothing() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(shards=1, restart_backoff=5.0, restart_backoff_max=5.0) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"
            server.engine.kill_actor("shard-0")
            await wait_until_down(server.engine, "shard-0")
            reply = await client.call("SET", "k", "w")
            assert isinstance(reply, ErrorReply)
            assert re.fullmatch(
                r"TRYAGAIN shard-0 is restarting; nothing was applied, retry after \d+ ms",
                reply.message,
            ), reply.message


# -- authentication ------------------------------------------------------------------------


async def test_until_authenticated_only_auth_hello_and_quit_are_served() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"s3cret", "other"})) as server:
            client = await Client.connect(server)
            noauth = ErrorReply("NOAUTH Authentication required.")
            wrongpass = ErrorReply("WRONGPASS invalid username-password pair or user is disabled.")
            for command in (["GET", "k"], ["PING"], ["CLIENT", "ID"], ["INFO"], ["SELECT", "0"]):
                assert await client.call(*command) == noauth
            # As in Redis, unknown commands and arity are checked before authentication.
            assert await client.call("NOSUCH") == ErrorReply(
                "ERR unknown command 'NOSUCH', with args beginning with: "
            )
            assert await client.call("GET") == ErrorReply(
                "ERR wrong number of arguments for 'get' command"
            )
            assert await client.call("AUTH", "wrong") == wrongpass
            assert await client.call("AUTH", "nobody", "s3cret") == wrongpass
            assert await client.call("HELLO", "3") == ErrorReply(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise"
                " the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the"
                " client and select the RESP protocol version at the same time"
            )
            assert await client.call("GET", "k") == noauth
            assert await client.call("AUTH", "s3cret") == "OK"
            assert await client.call("SET", "k", "v") == "OK"
            # A failed AUTH later does not take the authentication back.
            assert await client.call("AUTH", "wrong") == wrongpass
            assert await client.call("GET", "k") == b"v"
            assert await client.call("RESET") == "RESET"
            assert await client.call("GET", "k") == noauth
            assert await client.call("AUTH", "default", "other") == "OK"
            assert await client.call("GET", "k") == b"v"


async def test_hello_auth_authenticates_and_switches_protocol_at_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"s3cret"})) as server:
            client = await Client.connect(server)
            assert await client.call("HELLO", "3", "AUTH", "default", "bad") == ErrorReply(
                "WRONGPASS invalid username-password pair or user is disabled."
            )
            hello = await client.call("HELLO", "3", "AUTH", "default", "s3cret", "SETNAME", "me")
            assert isinstance(hello, dict)
            assert hello[b"proto"] == 3
            assert await client.call("CLIENT", "GETNAME") == b"me"
            assert await client.raw(encode_command("GET", "nothing"), 3) == b"_\r\n"


async def test_quit_is_answered_then_the_connection_closes_even_unauthenticated() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"s3cret"})) as server:
            client = await Client.connect(server)
            await client.send(encode_command("QUIT") + encode_command("PING"))
            assert await client.reply() == "OK"
            assert await client.closed()


async def test_an_unauthenticated_client_may_not_send_big_requests() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"s3cret"})) as server:
            client = await Client.connect(server)
            assert await client.call("MSET", *["k"] * 11) == ErrorReply(
                "ERR Protocol error: unauthenticated multibulk length"
            )
            assert await client.closed()
            client = await Client.connect(server)
            assert await client.call("AUTH", b"x" * 20000) == ErrorReply(
                "ERR Protocol error: unauthenticated bulk length"
            )
            assert await client.closed()


# -- HELLO and RESP3 -----------------------------------------------------------------------


async def test_hello_3_switches_to_resp3_replies() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.raw(encode_command("GET", "nothing"), 5) == b"$-1\r\n"
            hello = await client.call("HELLO", "3")
            client_id = await client.call("CLIENT", "ID")
            assert hello == {
                b"server": b"redis",
                b"version": b"7.2.0-kvmemo",
                b"proto": 3,
                b"id": client_id,
                b"mode": b"standalone",
                b"role": b"master",
                b"modules": [],
            }
            assert await client.raw(encode_command("GET", "nothing"), 3) == b"_\r\n"
            assert await client.raw(encode_command("MGET", "x", "y"), 10) == b"*2\r\n_\r\n_\r\n"
            expected = b"%1\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
            config = await client.raw(encode_command("CONFIG", "GET", "appendonly"), len(expected))
            assert config == expected
            info = await client.call("INFO", "replication")
            assert isinstance(info, Verbatim)
            assert info.fmt == "txt"
            assert "role:master\r\n" in info.text
            assert await client.call("COMMAND", "INFO", "get") == [
                [
                    b"get",
                    2,
                    Set(["readonly", "fast"]),
                    1,
                    1,
                    1,
                    Set(["@read", "@string", "@fast"]),
                    Set([]),  # tips, key specs, subcommands: RESP3 sets, as Redis's
                    Set(
                        [
                            {
                                b"flags": Set(["RO", "access"]),
                                b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
                                b"find_keys": {
                                    b"type": b"range",
                                    b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0},
                                },
                            }
                        ]
                    ),
                    Set([]),
                ]
            ]
            # HELLO with no version answers in the current protocol; HELLO 2 goes back.
            assert (await client.call("HELLO"))[b"proto"] == 3  # type: ignore[index]
            hello2 = await client.call("HELLO", "2")  # answered in RESP2: a flat array
            assert isinstance(hello2, list)
            assert hello2[hello2.index(b"proto") + 1] == 2
            assert await client.raw(encode_command("GET", "nothing"), 5) == b"$-1\r\n"


# -- connection commands ----------------------------------------------------------------


async def test_client_subcommands_describe_the_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            a = await Client.connect(server)
            b = await Client.connect(server)
            a_id = await a.call("CLIENT", "ID")
            b_id = await b.call("CLIENT", "ID")
            assert isinstance(a_id, int)
            assert isinstance(b_id, int)
            assert a_id != b_id
            assert await a.call("CLIENT", "GETNAME") is None
            assert await a.call("CLIENT", "SETNAME", "alpha") == "OK"
            assert await a.call("CLIENT", "GETNAME") == b"alpha"
            assert await a.call("CLIENT", "SETINFO", "LIB-NAME", "redis-py") == "OK"
            assert await a.call("CLIENT", "SETINFO", "lib-ver", "5.0") == "OK"
            assert await a.call("CLIENT", "SETINFO", "color", "red") == ErrorReply(
                "ERR Unrecognized option 'color'"
            )
            info = await a.call("CLIENT", "INFO")
            assert isinstance(info, bytes)
            fields = dict(f.split(b"=", 1) for f in info.split())
            assert fields[b"id"] == str(a_id).encode()
            assert fields[b"name"] == b"alpha"
            assert fields[b"lib-name"] == b"redis-py"
            assert fields[b"lib-ver"] == b"5.0"
            assert fields[b"resp"] == b"2"
            assert fields[b"cmd"] == b"client|info"
            listing = await b.call("CLIENT", "LIST")
            assert isinstance(listing, bytes)
            ids = {int(line.split()[0].split(b"=")[1]) for line in listing.splitlines()}
            assert ids == {a_id, b_id}
            only = await b.call("CLIENT", "LIST", "ID", str(b_id))
            assert isinstance(only, bytes)
            assert len(only.splitlines()) == 1
            assert await b.call("CLIENT", "LIST", "TYPE", "pubsub") == b""


async def test_select_0_is_accepted_and_dbsize_flushdb_time_run_through_the_table() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SELECT", "0") == "OK"
            assert await client.call("MSET", "a", "1", "b", "2", "c", "3") == "OK"
            assert await client.call("DBSIZE") == 3
            assert await client.call("FLUSHDB") == "OK"
            assert await client.call("DBSIZE") == 0
            seconds, micros = await client.call("TIME")  # type: ignore[misc]
            assert int(seconds) > 1_600_000_000
            assert 0 <= int(micros) < 1_000_000


async def test_command_reports_the_table_for_redis_cli_and_cluster_clients() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            count = await client.call("COMMAND", "COUNT")
            everything = await client.call("COMMAND")
            names = await client.call("COMMAND", "LIST")
            assert isinstance(everything, list)
            assert isinstance(names, list)
            # COMMAND LIST also names the subcommands of the table's containers
            # (``object|encoding``), as Redis 7's does; COUNT and COMMAND do not.
            commands = [name for name in names if b"|" not in name]
            assert count == len(everything) == len(commands)
            assert {b"object|encoding", b"memory|usage"} <= set(names) - set(commands)
            assert {b"get", b"set", b"mset", b"hello", b"client", b"config"} <= set(names)
            # The JSON-RPC spellings (command.list, debug.actors) are not Redis commands.
            assert not [name for name in names if b"." in name]
            entries = {entry[0]: entry for entry in everything}
            assert entries[b"mset"][1:6] == [-3, ["write", "denyoom"], 1, -1, 2]
            assert entries[b"hello"][1] == -1
            assert await client.call("COMMAND", "INFO", "get", "nosuch") == [
                entries[b"get"],
                None,
            ]
            docs = await client.call("COMMAND", "DOCS", "set", "nosuch")
            assert docs == [
                b"set",
                [b"summary", b"set a value, with expiry and conditions", b"since", b"1.0.0",
                 b"group", b"string"],
            ]  # fmt: skip
            assert await client.call("COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2") == [
                b"a",
                b"b",
            ]
            assert await client.call("COMMAND", "GETKEYS", "GET") == ErrorReply(
                "ERR wrong number of arguments for 'command|getkeys' command"
            )
            assert await client.call("COMMAND", "GETKEYS", "GET", "a", "b") == ErrorReply(
                "ERR Invalid number of arguments specified for command"
            )


async def test_config_set_that_fails_half_way_undoes_what_it_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The values are checked first; one that still fails when applied (the
    # shards did not take the policy) undoes the pairs before it, as Redis.
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory="1MiB", eviction_policy="lfu") as server:
            client = await Client.connect(server)

            async def unavailable(name: str) -> None:
                raise UnavailableError("shard-0 is restarting")

            monkeypatch.setattr(server.engine, "set_eviction_policy", unavailable)
            reply = await client.call(
                "CONFIG", "SET", "maxmemory", "5mb", "maxmemory-policy", "allkeys-lru"
            )
            assert reply == ErrorReply(
                "ERR CONFIG SET failed (possibly related to argument 'maxmemory-policy')"
                " - shard-0 is restarting"
            )
            assert server.engine.tracker.maxmemory == 1024 * 1024
            assert await client.call("CONFIG", "GET", "maxmemory-policy") == [
                b"maxmemory-policy",
                b"allkeys-lfu",
            ]
            await client.aclose()


async def test_config_get_matches_globs_and_set_maxmemory_changes_the_limit() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory="1MiB", eviction_policy="lfu") as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "GET", "save") == [b"save", b""]
            assert await client.call("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
            got = await client.call("CONFIG", "GET", "MAXMEMORY*")
            assert isinstance(got, list)
            assert dict(zip(got[::2], got[1::2], strict=True)) == {
                b"maxmemory": b"1048576",
                b"maxmemory-policy": b"allkeys-lfu",
                b"maxmemory-samples": b"16",
            }
            assert await client.call("CONFIG", "GET", "port", "nosuch") == [
                b"port",
                str(server.port).encode(),
            ]
            assert await client.call("CONFIG", "SET", "maxmemory", "2mb") == "OK"
            assert server.engine.tracker.maxmemory == 2 * 1024 * 1024
            assert await client.call("CONFIG", "GET", "maxmemory") == [b"maxmemory", b"2097152"]
            assert await client.call("CONFIG", "SET", "maxmemory-policy", "allkeys-lfu") == "OK"
            assert await client.call("CONFIG", "SET", "save", "") == "OK"
            # A name without its value: Redis's "syntax error".
            assert await client.call("CONFIG", "SET", "maxmemory", "1", "save") == ErrorReply(
                "ERR syntax error"
            )


async def test_info_is_redis_text_with_the_sections_tools_read() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory="64MiB") as server:
            client = await Client.connect(server)
            empty = await client.call("INFO", "keyspace")
            assert empty == b"# Keyspace\r\n"  # Redis lists no database while it is empty
            await client.call("MSET", "a", "1", "b", "2")
            await client.call("SET", "c", "3", "EX", "100")
            info = await client.call("INFO")
            assert isinstance(info, bytes)
            text = info.decode()
            assert text.startswith("# Server\r\nredis_version:7.2.0-kvmemo\r\n")
            assert text.endswith("\r\n")
            assert "\n" not in text.replace("\r\n", "")
            headers = re.findall(r"^# (\w+)\r$", text, re.MULTILINE)
            assert headers == [
                "Server", "Clients", "Memory", "Persistence", "Stats", "Replication", "CPU",
                "Errorstats", "Actors", "Keyspace",
            ]  # fmt: skip
            fields = dict(
                line.split(":", 1) for line in text.split("\r\n") if line and line[0] != "#"
            )
            assert fields["role"] == "master"
            assert fields["connected_clients"] == "1"
            assert fields["maxmemory"] == str(64 * 1024 * 1024)
            assert fields["maxmemory_policy"] == "allkeys-lru"
            assert int(fields["used_memory"]) > 0
            assert fields["tcp_port"] == str(server.port)
            assert fields["db0"] == "keys=3,expires=1,avg_ttl=0"
            assert fields["shard-0"].startswith("state=running,restarts=0,")
            # Sections by name, case-insensitive, several at once; unknown ones are ignored.
            some = await client.call("INFO", "CLIENTS", "memory", "nosuch")
            assert isinstance(some, bytes)
            assert re.findall(rb"^# (\w+)\r$", some, re.MULTILINE) == [b"Clients", b"Memory"]
            assert await client.call("INFO", "nosuch") == b""


async def test_debug_actors_lists_every_actor() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(shards=2) as server:
            client = await Client.connect(server)
            await client.call("HELLO", "3")
            actors = await client.call("DEBUG", "ACTORS")
            assert isinstance(actors, list)
            names = {a[b"name"] for a in actors}
            assert {b"shard-0", b"shard-1", b"ttl-manager", b"eviction-manager"} <= names
            assert all(a[b"state"] == b"running" for a in actors)


# -- limits ---------------------------------------------------------------------------------


async def test_a_bulk_over_max_bulk_len_is_refused_and_the_connection_closed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(max_bulk_len=1024)) as server:
            client = await Client.connect(server)
            await client.send(
                encode_command("SET", "before", "1") + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n"
            )
            assert await client.reply() == "OK"
            assert await client.reply() == ErrorReply("ERR Protocol error: invalid bulk length")
            assert await client.closed()
            other = await Client.connect(server)
            assert await other.call("GET", "before") == b"1"
            assert await other.call("EXISTS", "k") == 0


async def test_a_client_over_the_query_buffer_limit_is_closed_without_a_reply() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(max_query_buffer=4096)) as server:
            client = await Client.connect(server)
            await client.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10000\r\n")
            for _ in range(10):
                try:
                    await client.send(b"x" * 1000)
                except trio.BrokenResourceError:
                    break
            assert await client.closed()
            assert client.parser.next_reply() is NEED_DATA  # nothing was answered
            other = await Client.connect(server)
            assert await other.call("EXISTS", "k") == 0


async def test_an_inline_request_over_max_inline_len_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(max_inline_len=100)) as server:
            client = await Client.connect(server)
            await client.send(b"SET k " + b"v" * 200 + b"\r\n")
            assert await client.reply() == ErrorReply("ERR Protocol error: too big inline request")
            assert await client.closed()


async def test_a_client_that_does_not_read_is_disconnected_past_the_output_limit() -> None:
    limits = RespLimits(max_output_buffer=256 * 1024, output_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            other = await Client.connect(server)
            value = b"v" * (64 * 1024)
            assert await other.call("SET", "big", value) == "OK"
            slow = await Client.connect(server)
            requests = 2000  # 128 MiB of replies: far more than socket buffers hold
            await slow.send(b"GET big\r\n" * requests)
            # The other client keeps working while the slow one is over its limit.
            deadline = trio.current_time() + TIMEOUT / 2
            while await client_count(other) > 1:
                assert await other.call("INCR", "n") >= 1
                assert trio.current_time() < deadline, "the slow reader was never dropped"
                await trio.sleep(0.05)
            assert await other.call("GET", "big") == value
            received = 0
            try:
                while data := await slow.stream.receive_some(1 << 20):
                    received += len(data)
            except trio.BrokenResourceError:
                pass
            assert received < requests * len(value)


async def test_a_big_reply_is_sent_whole_even_over_the_output_limit() -> None:
    limits = RespLimits(max_output_buffer=64 * 1024, output_timeout=0.5)
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            client = await Client.connect(server)
            value = b"x" * (1024 * 1024)
            assert await client.call("SET", "big", value) == "OK"
            await client.send(encode_command("GET", "big") * 3)
            assert await client.replies(3) == [value] * 3


async def test_over_max_clients_a_connection_is_told_and_closed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(max_clients=2)) as server:
            a = await Client.connect(server)
            b = await Client.connect(server)
            assert await a.call("PING") == "PONG"
            assert await b.call("PING") == "PONG"
            c = await Client.connect(server)
            assert await c.reply() == ErrorReply("ERR max number of clients reached")
            assert await c.closed()
            await b.aclose()
            while True:  # b's slot frees once the server has seen it go
                d = await Client.connect(server)
                reply = await d.call("PING")
                if reply == "PONG":
                    break
                await trio.sleep(0.01)
            info = await a.call("INFO", "stats")
            assert isinstance(info, bytes)
            assert re.search(rb"rejected_connections:[1-9]", info)


async def test_an_idle_client_is_closed_after_the_idle_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(idle_timeout=0.3)) as server:
            idle = await Client.connect(server)
            busy = await Client.connect(server)
            assert await idle.call("PING") == "PONG"
            started = trio.current_time()
            while trio.current_time() - started < 0.6:
                assert await busy.call("PING") == "PONG"
                await trio.sleep(0.05)
            assert await idle.closed()
            assert await busy.call("PING") == "PONG"


# -- isolation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"*abc\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\r\nGET\r\n", "ERR Protocol error: expected '$', got 'G'"),
        (b"*1\r\n$-5\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*2000000\r\n", "ERR Protocol error: invalid multibulk length"),
    ],
)
async def test_a_malformed_client_never_affects_another_client_or_the_data(
    garbage: bytes, error: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            good = await Client.connect(server)
            assert await good.call("SET", "k", "v") == "OK"
            bad = await Client.connect(server)
            await bad.send(encode_command("SET", "k2", "v2") + garbage + encode_command("DEL", "k"))
            assert await bad.reply() == "OK"
            assert await bad.reply() == ErrorReply(error)
            assert await bad.closed()
            assert await good.call("MGET", "k", "k2") == [b"v", b"v2"]
            assert await client_count(good) == 1


async def test_a_crashing_connection_ends_alone_and_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(conn: object, argv: object) -> object:
        raise RuntimeError("a bug")

    original = resp_server._CONNECTION_COMMANDS["client"]
    monkeypatch.setitem(
        resp_server._CONNECTION_COMMANDS, "client", attrs.evolve(original, handler=boom)
    )
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            good = await Client.connect(server)
            assert await good.call("SET", "k", "v") == "OK"
            bad = await Client.connect(server)
            with caplog.at_level(logging.ERROR, logger="kvmemo.server.resp_server"):
                await bad.send(encode_command("CLIENT", "ID"))
                assert await bad.closed()
            assert any("crashed" in r.getMessage() and r.exc_info for r in caplog.records)
            assert await good.call("GET", "k") == b"v"
            again = await Client.connect(server)
            assert await again.call("GET", "k") == b"v"


# -- redis-py -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_sync_client_works_in_resp2_and_resp3(protocol: int) -> None:
    def session(port: int) -> None:
        r = redis.Redis(port=port, protocol=protocol, password="pw", client_name="suite")
        try:
            assert r.ping() is True
            assert r.set("k", "v", ex=100) is True
            assert r.get("k") == b"v"
            assert 0 < r.ttl("k") <= 100
            assert r.incr("n") == 1
            assert r.mset({"a": "1", "b": "2"}) is True
            assert r.mget("a", "b", "zz") == [b"1", b"2", None]
            assert r.delete("a", "b") == 2
            assert r.client_getname() in ("suite", b"suite")  # redis-py decodes it in RESP2
            assert r.dbsize() == 2
            info = r.info()
            assert info["role"] == "master"
            assert info["redis_version"] == "7.2.0-kvmemo"
            assert r.info("keyspace")["db0"]["keys"] == 2
            assert r.config_get("maxmemory") == {b"maxmemory": b"0"} or r.config_get(
                "maxmemory"
            ) == {"maxmemory": "0"}
            pipe = r.pipeline(transaction=False)
            for i in range(100):
                pipe.set(f"p{i}", i)
            pipe.get("p99")
            assert pipe.execute()[-1] == b"99"
            with pytest.raises(redis.exceptions.ResponseError, match="wrong number of arguments"):
                r.execute_command("GET")
            bad = redis.Redis(port=port, protocol=protocol, password="nope")
            with pytest.raises(redis.exceptions.AuthenticationError):
                bad.ping()
        finally:
            r.close()

    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"pw"})) as server:
            await trio.to_thread.run_sync(session, server.port)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_asyncio_client_works_in_resp2_and_resp3(protocol: int) -> None:
    async def session(port: int) -> None:
        r = redis.asyncio.Redis(port=port, protocol=protocol)
        try:
            assert await r.ping() is True
            assert await r.set("k", "v") is True
            assert await r.get("k") == b"v"
            assert await r.getdel("k") == b"v"
            assert await r.exists("k") == 0
            async with r.pipeline(transaction=False) as pipe:
                for _ in range(200):
                    pipe.incr("counter")
                results = await pipe.execute()
            assert results == list(range(1, 201))
            assert [k async for k in r.scan_iter(match="count*")] == [b"counter"]
        finally:
            await r.aclose()

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            await trio.to_thread.run_sync(lambda: asyncio.run(session(server.port)))


# -- the command suite over redis-py -------------------------------------------------------


class RespCommandError(Exception):
    """A Redis error reply, with the protocol's ``kind`` derived from its code and text."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


_NOT_INTEGER = re.compile(
    r"is not an integer or out of range|is not a valid float|would overflow|out of range"
    r"|NaN or Infinity"
)


def error_kind(exc: redis.exceptions.RedisError) -> str:
    """The protocol's error kind for a Redis error reply, as a client would derive it."""
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "NOAUTH"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, redis.exceptions.TryAgainError):
        return "UNAVAILABLE"
    message = str(exc)
    if message.startswith("wrong number of arguments"):
        return "ARITY"
    if message.startswith("unknown command"):
        return "UNKNOWN_METHOD"
    if message.startswith("WRONGTYPE"):
        return "WRONGTYPE"
    if message.startswith("timeout:"):
        return "TIMEOUT"
    if message.startswith("internal error:"):
        return "INTERNAL"
    if "persistence is not enabled" in message:
        return "DISABLED"
    if re.search(r"over (the limit|max_\w+_size)", message):
        return "TOO_LARGE"
    if _NOT_INTEGER.search(message):
        return "NOT_INTEGER"
    return "SYNTAX"


# Commands whose reply is a simple string (when it is not nil or a bulk): redis-py
# returns simple and bulk strings alike as bytes, so the adapter names them.
_STATUS = frozenset(
    {"set", "setex", "psetex", "mset", "flushall", "flushdb", "type", "ping", "rename"}
)


def _as_protocol_result(command: str, args: list[bytes], result: Any) -> Any:
    name = command.lower()
    if name == "command.list":
        return [n.decode() for n in result]
    if name not in _STATUS or not isinstance(result, bytes):
        return result
    if name == "set" and any(a.upper() == b"GET" for a in args[2:]):
        return result
    if name == "ping" and args:
        return result
    return result.decode()


class RedisPyKV(Commands):
    """:class:`kvmemo.api.Commands` over redis-py: ``call`` runs one command in a thread."""

    def __init__(self, call: Callable[[str, list[bytes]], Any]) -> None:
        self._call = call

    async def execute(self, command: str, *args: Arg) -> Any:
        argv = [encode_arg(a) for a in args]
        try:
            result = await trio.to_thread.run_sync(self._call, command, argv)
        except redis.exceptions.ResponseError as exc:
            raise RespCommandError(error_kind(exc), str(exc)) from None
        except redis.exceptions.AuthenticationError as exc:
            raise RespCommandError("NOAUTH", str(exc)) from None
        return _as_protocol_result(command, argv, result)


@asynccontextmanager
async def sync_redis_py(
    port: int, protocol: int
) -> AsyncIterator[Callable[[str, list[bytes]], Any]]:
    client = redis.Redis(port=port, protocol=protocol, decode_responses=False)
    client.response_callbacks.clear()  # raw replies: the suite checks the protocol's values
    try:
        yield lambda command, args: client.execute_command(command, *args)
    finally:
        await trio.to_thread.run_sync(client.close)


@asynccontextmanager
async def asyncio_redis_py(
    port: int, protocol: int
) -> AsyncIterator[Callable[[str, list[bytes]], Any]]:
    """redis.asyncio on an event loop of its own, in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def make() -> redis.asyncio.Redis:
        client = redis.asyncio.Redis(port=port, protocol=protocol, decode_responses=False)
        client.response_callbacks.clear()
        return client

    client = await trio.to_thread.run_sync(run, make())
    try:
        yield lambda command, args: run(client.execute_command(command, *args))
    finally:
        await trio.to_thread.run_sync(run, client.aclose())
        loop.call_soon_threadsafe(loop.stop)
        await trio.to_thread.run_sync(thread.join)
        loop.close()


# The suite's cases that hold for the WebSocket/JSON mapping but not for Redis's
# own replies, which the Redis port gives on purpose (PROTOCOL.md, "Transport").
RESP_DIFFERENT = {
    "info_reports_the_protocol_sections": "INFO on the Redis port is Redis's text format",
    "debug_actors_lists_every_actor": "the Redis port lists actors as DEBUG ACTORS maps",
}

CLIENTS = {"sync": sync_redis_py, "asyncio": asyncio_redis_py}


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
async def test_command_suite_over_redis_py(case: SuiteCase, protocol: int, client: str) -> None:
    if case.name in RESP_DIFFERENT:
        pytest.skip(RESP_DIFFERENT[case.name])
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory="64MiB") as server:
            connect = CLIENTS[client]
            async with connect(server.port, protocol) as call:
                await case.run(RedisPyKV(call))


async def test_config_set_maxmemory_policy_switches_every_shard_at_runtime() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(maxmemory="64MiB") as server:
            client = await Client.connect(server)
            for i in range(200):
                assert await client.call("SET", f"k{i}", "v") == "OK"
            assert await client.call("EXPIRE", "k0", "100") == 1
            used_lru = server.engine.tracker.used
            assert await client.call("CONFIG", "SET", "maxmemory-policy", "allkeys-lfu") == "OK"
            assert await client.call("CONFIG", "GET", "maxmemory-policy") == [
                b"maxmemory-policy",
                b"allkeys-lfu",
            ]
            assert server.engine.eviction_policy == "lfu"
            info = await client.call("INFO", "memory")  # RESP2: a bulk string
            assert isinstance(info, bytes)
            assert b"maxmemory_policy:allkeys-lfu\r\n" in info
            # Every shard ranks its keys with the new policy and counts its bookkeeping.
            stores = [
                await server.engine.system.ref(f"shard-{i}").ask(Inspect(lambda s: s))
                for i in range(4)
            ]
            assert all(type(s.policy).name == "lfu" for s in stores)
            assert all(len(s.policy) == len(s.data) for s in stores)
            assert all(s.check_invariants() for s in stores)
            assert server.engine.tracker.used == sum(s.used for s in stores) > used_lru
            assert await client.call("CONFIG", "SET", "maxmemory-policy", "volatile-lru") == "OK"
            stores = [
                await server.engine.system.ref(f"shard-{i}").ask(Inspect(lambda s: s))
                for i in range(4)
            ]
            assert sum(len(s.policy) for s in stores) == 200  # volatile-lru tracks every key
            assert all(s.check_invariants() for s in stores)
            refused = await client.call("CONFIG", "SET", "maxmemory-policy", "most-recent")
            assert isinstance(refused, ErrorReply)
            assert refused.message.startswith(
                "ERR CONFIG SET failed (possibly related to argument 'maxmemory-policy') -"
                " argument(s) must be one of the following: allkeys-lfu, allkeys-lru,"
            )
            assert server.engine.eviction_policy == "volatile-lru"  # unchanged by the refusal
            assert await client.call("GET", "k1") == b"v"


async def test_config_reports_persistence_and_keeps_it_fixed(tmp_path: Any) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path), appendfsync="always") as server:
            client = await Client.connect(server)
            got = await client.call("CONFIG", "GET", "append*")
            assert isinstance(got, list)
            assert dict(zip(got[::2], got[1::2], strict=True)) == {
                b"appendonly": b"yes",
                b"appendfsync": b"always",
            }
            assert await client.call("CONFIG", "GET", "dir") == [b"dir", str(tmp_path).encode()]
            assert await client.call("CONFIG", "SET", "appendonly", "yes") == "OK"
            assert await client.call("CONFIG", "SET", "appendfsync", "no") == ErrorReply(
                "ERR CONFIG SET failed (possibly related to argument 'appendfsync')"
                " - persistence settings are fixed at start (--dir, --appendfsync)"
            )


async def test_a_nodes_configured_limits_reach_its_redis_port() -> None:
    """ServerConfig.resp_limits (the resp_* settings) is what the listener enforces."""
    config = ServerConfig(
        host="127.0.0.1", port=0, resp_port=0, resp_limits=RespLimits(max_clients=1)
    )
    with trio.fail_after(TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as node:
            assert node.resp_bound is not None
            host, port = node.resp_bound
            first = Client(await trio.open_tcp_stream(host, port))
            assert await first.call("PING") == "PONG"
            second = Client(await trio.open_tcp_stream(host, port))
            assert await second.reply() == ErrorReply("ERR max number of clients reached")
            await second.aclose()
            await first.aclose()
