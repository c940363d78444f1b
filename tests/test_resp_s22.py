"""The Redis port, session 22: CLIENT PAUSE / UNPAUSE, CLIENT NO-TOUCH, the
subcommands of the connection containers in COMMAND INFO / DOCS, and CLIENT INFO
run inside EXEC.

What Redis does was read off redis-server 7.0.15 (Debian's), and for what it
lacks (NO-TOUCH, SETINFO: 7.2) off Redis 7.2's documentation and source:

1. ``CLIENT PAUSE timeout [WRITE|ALL]`` holds back the commands of every client
   (the caller's later ones too; its PAUSE is answered): ALL every command,
   CLIENT UNPAUSE included; WRITE the write and publishing commands, a write
   queued in MULTI, and an EXEC whose transaction queued one; reads go on. A
   held command waits with the client's later commands behind it and runs
   when the pause ends; errors found before it runs (unknown command, arity,
   NOAUTH) are answered at once. Over a running pause the later end and the
   stricter mode win. A held client shows ``flags=b``, ``cmd=`` the held
   command, and counts in INFO's ``blocked_clients``. Was: "unknown
   subcommand 'PAUSE'".
2. ``CLIENT NO-TOUCH ON``: the client's reads leave OBJECT IDLETIME / FREQ as
   they were, TOUCH still touches; RESET turns it off. Was: accepted, ignored.
3. COMMAND INFO of CLIENT, CONFIG, COMMAND, ACL, LATENCY, SLOWLOG lists their
   subcommands (tenth field), COMMAND DOCS gives a ``subcommands`` map, COMMAND
   LIST names them (``client|info``). Was: none.
4. CLIENT INFO inside EXEC: ``flags=x``, ``multi=`` the number of queued
   commands, ``cmd=exec``. Was: ``multi=-1``, no ``x``, ``cmd=client|info``.

Tests on a KVMemo port alone use trio's autojump clock (a pause of seconds
takes none); those against redis-server (skipped when it is missing) use
real time, with lower bounds only (a held reply never comes early).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from test_redis_differential import (
    REDIS_SERVER,
    Pair,
    RespConnection,
    _as_map,
    _client_fields,
    _connect,
    _plain,
    _read_reply,
    _text_of,
    case,
    redis_and_kvmemo,
    run_same_steps,
)
from test_resp_server import Client, running

from kvmemo.server.resp import ErrorReply, encode_command

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

TIMEOUT = 30  # seconds per test (virtual under the autojump clock)


# -- helpers ---------------------------------------------------------------------------------


async def connect(server: Any, n: int) -> list[Client]:
    """``n`` new clients of ``server``."""
    return [await Client.connect(server) for _ in range(n)]


async def nothing_within(client: Client, seconds: float) -> bool:
    """True if no reply comes to ``client`` within ``seconds`` (a held command)."""
    with trio.move_on_after(seconds):
        await client.reply()
        return False
    return True


def _field(info: object, name: bytes) -> bytes:
    assert isinstance(info, bytes), info
    return dict(f.split(b"=", 1) for f in info.split())[name]


def _info_value(info: object, name: str) -> str:
    assert isinstance(info, bytes), info
    for line in info.decode().split("\r\n"):
        key, _, value = line.partition(":")
        if key == name:
            return value
    raise AssertionError(f"no {name} in INFO")


def _client_line(listing: object, client_id: int) -> bytes:
    assert isinstance(listing, bytes), listing
    for line in listing.splitlines():
        if _field(line, b"id") == str(client_id).encode():
            return line
    raise AssertionError(f"client {client_id} not listed")


# -- 1. CLIENT PAUSE / UNPAUSE on KVMemo's port (virtual time) --------------------------------


async def test_pause_write_holds_writes_in_order_while_reads_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Before: CLIENT PAUSE was an unknown subcommand. Now a write waits out the
    pause with the client's later commands behind it, then all run in order."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, writer, reader = await connect(server, 3)
            writer_id = await writer.call("CLIENT", "ID")
            assert isinstance(writer_id, int)
            assert await reader.call("SET", "k", "0") == "OK"
            start = trio.current_time()
            assert await admin.call("CLIENT", "PAUSE", "5000", "WRITE") == "OK"
            pipeline = [("GET", "k"), ("INCR", "k"), ("GET", "k"), ("PUBLISH", "c", "m")]
            await writer.send(b"".join(encode_command(*argv) for argv in pipeline))
            assert await writer.reply() == b"0"  # the read before the write
            assert await nothing_within(writer, 1)  # INCR held, and the GET after it
            # Other clients' reads flow, and see the write not applied.
            assert await reader.call("GET", "k") == b"0"
            assert await reader.call("MGET", "k", "x") == [b"0", None]
            assert trio.current_time() - start < 2
            held = _client_line(await reader.call("CLIENT", "LIST"), writer_id)
            assert (_field(held, b"flags"), _field(held, b"cmd")) == (b"b", b"incr")
            assert _info_value(await reader.call("INFO", "clients"), "blocked_clients") == "1"
            # A PUBLISH is held too (one of Redis's may-replicate commands).
            await reader.send(encode_command("PUBLISH", "c", "n"))
            assert await nothing_within(reader, 1)
            assert await writer.replies(3) == [1, b"1", 0]  # at the pause's end, in order
            assert await reader.reply() == 0
            assert trio.current_time() - start >= 5
            assert _info_value(await admin.call("INFO", "clients"), "blocked_clients") == "0"
            assert _field(await writer.call("CLIENT", "INFO"), b"flags") == b"N"


async def test_unpause_releases_the_held_commands_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, writer = await connect(server, 2)
            start = trio.current_time()
            assert await admin.call("CLIENT", "PAUSE", "60000", "WRITE") == "OK"
            await writer.send(encode_command("SET", "k", "v") + encode_command("GET", "k"))
            assert await nothing_within(writer, 1)
            assert await admin.call("CLIENT", "UNPAUSE") == "OK"
            assert await writer.replies(2) == ["OK", b"v"]
            assert trio.current_time() - start < 60
            # Nothing held any more: a write runs at once.
            assert await writer.call("SET", "k", "w") == "OK"
            assert await admin.call("CLIENT", "UNPAUSE") == "OK"  # with no pause: OK


async def test_pause_all_holds_every_command_of_every_client_the_caller_included(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Redis 7.0.15: under ALL the pausing client's own PING, and another client's
    CLIENT UNPAUSE, wait for the timeout; errors found before a command runs
    (unknown command, arity, unknown subcommand) are answered at once."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, other = await connect(server, 2)
            start = trio.current_time()
            await admin.send(encode_command("CLIENT", "PAUSE", "3000") + encode_command("PING"))
            assert await admin.reply() == "OK"  # PAUSE itself answers at once
            assert await nothing_within(admin, 1)  # its PING after it is held
            assert await other.call("NOSUCH") == ErrorReply(
                "ERR unknown command 'NOSUCH', with args beginning with: "
            )
            assert await other.call("GET") == ErrorReply(
                "ERR wrong number of arguments for 'get' command"
            )
            assert await other.call("CLIENT", "PAUSE") == ErrorReply(
                "ERR wrong number of arguments for 'client|pause' command"
            )
            await other.send(encode_command("CLIENT", "UNPAUSE"))
            assert await nothing_within(other, 1)  # held as well: the pause runs out
            assert await admin.reply() == "PONG"
            assert await other.reply() == "OK"
            assert trio.current_time() - start >= 3


async def test_a_later_pause_keeps_the_later_end_and_the_stricter_mode(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Redis's pauseClients: WRITE for 10 s then ALL for 1 s is ALL for 10 s; a
    shorter pause after a longer one does not shorten it."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, reader = await connect(server, 2)
            start = trio.current_time()
            assert await admin.call("CLIENT", "PAUSE", "10000", "WRITE") == "OK"
            assert await admin.call("CLIENT", "PAUSE", "1000", "ALL") == "OK"
            assert await reader.call("GET", "k") is None  # a read held by ALL: 10 s
            assert trio.current_time() - start >= 10
            start = trio.current_time()
            assert await admin.call("CLIENT", "PAUSE", "10000", "WRITE") == "OK"
            assert await admin.call("CLIENT", "PAUSE", "10", "WRITE") == "OK"
            assert await reader.call("GET", "k") is None  # reads flow under WRITE
            assert await reader.call("SET", "k", "v") == "OK"
            assert trio.current_time() - start >= 10
            # 0 pauses nothing.
            start = trio.current_time()
            assert await admin.call("CLIENT", "PAUSE", "0") == "OK"
            assert await reader.call("SET", "k", "w") == "OK"
            assert trio.current_time() - start < 1


async def test_pause_write_and_transactions(autojump_clock: trio.testing.MockClock) -> None:
    """Redis 7.0.15: under WRITE a write is held as it is queued in MULTI; a
    transaction of reads runs; EXEC of a transaction that queued a write (before
    the pause) is held; a CLIENT PAUSE inside a transaction holds none of it."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, client = await connect(server, 2)
            assert await client.call("SET", "k", "v") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "k", "queued-before") == "QUEUED"
            assert await admin.call("CLIENT", "PAUSE", "5000", "WRITE") == "OK"
            await client.send(encode_command("EXEC"))
            assert await nothing_within(client, 1)
            assert await client.reply() == ["OK"]  # at the end of the pause
            assert await admin.call("CLIENT", "PAUSE", "5000", "WRITE") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("GET", "k") == "QUEUED"
            assert await client.call("PING") == "QUEUED"
            assert await client.call("EXEC") == [b"queued-before", "PONG"]
            assert await client.call("MULTI") == "OK"
            await client.send(encode_command("SET", "k", "x"))
            assert await nothing_within(client, 1)  # queueing a write is held
            assert await client.reply() == "QUEUED"
            assert await client.call("EXEC") == ["OK"]
            # CLIENT PAUSE inside MULTI: the commands after it in EXEC still run.
            assert await client.call("MULTI") == "OK"
            for argv in (
                ("SET", "a", "1"),
                ("CLIENT", "PAUSE", "5000", "WRITE"),
                ("SET", "b", "2"),
            ):
                assert await client.call(*argv) == "QUEUED"
            start = trio.current_time()
            assert await client.call("EXEC") == ["OK", "OK", "OK"]
            assert await admin.call("MGET", "a", "b") == [b"1", b"2"]
            assert await client.call("SET", "c", "3") == "OK"  # the pause holds after EXEC
            assert trio.current_time() - start >= 5


async def test_what_a_held_client_sends_meanwhile_runs_after_the_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The socket of a held client is still read (as Redis reads it): what it
    sends while held is kept and runs after the held command, in order."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, writer = await connect(server, 2)
            assert await admin.call("CLIENT", "PAUSE", "5000", "WRITE") == "OK"
            await writer.send(encode_command("SET", "k", "1"))
            assert await nothing_within(writer, 1)
            await writer.send(encode_command("INCR", "k"))
            await writer.send(encode_command("GET", "k")[:5])  # half a request
            assert await nothing_within(writer, 1)
            await writer.send(encode_command("GET", "k")[5:])
            assert await writer.replies(3) == ["OK", 2, b"2"]


async def test_a_client_that_leaves_while_held_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As Redis frees a paused client that disconnects: it is gone from CLIENT LIST
    and blocked_clients at once, and its held commands never run."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, leaver, killed = await connect(server, 3)
            killed_id = await killed.call("CLIENT", "ID")
            assert await admin.call("CLIENT", "PAUSE", "60000", "WRITE") == "OK"
            await leaver.send(encode_command("SET", "gone", "1"))
            await killed.send(encode_command("SET", "killed", "1"))
            assert await nothing_within(admin, 1)
            assert _info_value(await admin.call("INFO", "clients"), "blocked_clients") == "2"
            await leaver.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert await admin.call("CLIENT", "KILL", "ID", str(killed_id)) == 1
            assert await killed.closed()
            info = await admin.call("INFO", "clients")
            assert _info_value(info, "blocked_clients") == "0"
            assert _info_value(info, "connected_clients") == "1"
            assert await admin.call("CLIENT", "UNPAUSE") == "OK"
            assert await admin.call("EXISTS", "gone", "killed") == 0


async def test_a_server_stopping_while_clients_are_held_stops() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin, writer = await connect(server, 2)
            assert await admin.call("CLIENT", "PAUSE", "600000") == "OK"
            await writer.send(encode_command("SET", "k", "v"))
            await trio.testing.wait_all_tasks_blocked()
        # running() cancelled the port with a client held: nothing hangs.


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (("CLIENT", "PAUSE", "-1"), "ERR timeout is negative"),
        (("CLIENT", "PAUSE", "abc"), "ERR timeout is not an integer or out of range"),
        (("CLIENT", "PAUSE", "1.5"), "ERR timeout is not an integer or out of range"),
        (
            ("CLIENT", "PAUSE", "99999999999999999999"),
            "ERR timeout is not an integer or out of range",
        ),
        # Redis 7.2's check (7.0 overflowed its end time silently: no pause).
        (("CLIENT", "PAUSE", "9223372036854775807"), "ERR timeout is out of range"),
        (("CLIENT", "PAUSE", "100", "foo"), "ERR CLIENT PAUSE mode must be WRITE or ALL"),
        (("CLIENT", "PAUSE", "-1", "foo"), "ERR CLIENT PAUSE mode must be WRITE or ALL"),
        (
            ("CLIENT", "PAUSE", "100", "write", "x"),
            "ERR unknown subcommand or wrong number of arguments for 'PAUSE'. Try CLIENT HELP.",
        ),
        (("CLIENT", "PAUSE"), "ERR wrong number of arguments for 'client|pause' command"),
        (("CLIENT", "UNPAUSE", "x"), "ERR wrong number of arguments for 'client|unpause' command"),
    ],
)
async def test_bad_pause_arguments_get_redis_errors_and_pause_nothing(
    argv: tuple[str, ...], error: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            (client,) = await connect(server, 1)
            assert await client.call(*argv) == ErrorReply(error)
            assert await client.call("SET", "k", "v") == "OK"  # nothing is paused


async def test_client_help_names_pause_and_unpause() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            (client,) = await connect(server, 1)
            lines = await client.call("CLIENT", "HELP")
            assert isinstance(lines, list)
            assert "PAUSE <timeout> [WRITE|ALL]" in lines
            assert "UNPAUSE" in lines
            assert "    Accepted and ignored." not in lines  # NO-TOUCH's old line


# -- 2. CLIENT NO-TOUCH ---------------------------------------------------------------------


async def _freq(client: Client, key: str) -> int:
    value = await client.call("OBJECT", "FREQ", key)
    assert isinstance(value, int), value
    return value


async def test_no_touch_reads_leave_the_lfu_frequency_and_touch_still_counts() -> None:
    """Before: NO-TOUCH ON was accepted and ignored: every GET raised OBJECT FREQ."""
    with trio.fail_after(TIMEOUT):
        async with running(eviction_policy="lfu") as server:
            quiet, normal = await connect(server, 2)
            assert await normal.call("MSET", "k", "v", "j", "w") == "OK"
            assert await quiet.call("CLIENT", "NO-TOUCH", "on") == "OK"
            assert _field(await quiet.call("CLIENT", "INFO"), b"flags") == b"T"
            before = await _freq(quiet, "k")
            # Alone (one request per read), pipelined, in a transaction.
            assert await quiet.call("GET", "k") == b"v"
            assert await quiet.call("MGET", "k", "j", "k") == [b"v", b"w", b"v"]
            assert await quiet.call("GETEX", "k") == b"v"
            assert isinstance(await quiet.call("DUMP", "k"), bytes)
            batch = [("GET", "k"), ("MGET", "k", "j"), ("GETEX", "k"), ("DUMP", "k")]
            await quiet.send(b"".join(encode_command(*argv) for argv in batch))
            assert (await quiet.replies(4))[:3] == [b"v", [b"v", b"w"], b"v"]
            assert await quiet.call("MULTI") == "OK"
            for argv in batch:
                assert await quiet.call(*argv) == "QUEUED"
            assert (await quiet.call("EXEC"))[:3] == [b"v", [b"v", b"w"], b"v"]  # type: ignore[index]
            assert await _freq(quiet, "k") == before
            # TOUCH touches, whatever the mode.
            assert await quiet.call("TOUCH", "k") == 1
            assert await _freq(quiet, "k") == before + 1
            # Another client's reads still count; and OFF again counts.
            assert await normal.call("GET", "k") == b"v"
            assert await _freq(quiet, "k") == before + 2
            assert await quiet.call("CLIENT", "NO-TOUCH", "OFF") == "OK"
            assert await quiet.call("GET", "k") == b"v"
            assert await _freq(quiet, "k") == before + 3


async def test_no_touch_reads_leave_the_lru_idle_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(eviction_policy="lru") as server:
            (client,) = await connect(server, 1)
            assert await client.call("SET", "k", "v") == "OK"
            await trio.sleep(20)  # virtual: the key's idle time grows
            idle = await client.call("OBJECT", "IDLETIME", "k")
            assert isinstance(idle, int)
            assert idle >= 15
            assert await client.call("CLIENT", "NO-TOUCH", "ON") == "OK"
            assert await client.call("GET", "k") == b"v"
            assert await client.call("MGET", "k") == [b"v"]
            assert await client.call("OBJECT", "IDLETIME", "k") == idle
            assert await client.call("TOUCH", "k") == 1
            assert await client.call("OBJECT", "IDLETIME", "k") == 0


async def test_reset_turns_no_touch_off_and_bad_modes_are_refused() -> None:
    """Redis 7.2's RESET clears NO-TOUCH (clearClientConnectionState)."""
    with trio.fail_after(TIMEOUT):
        async with running(eviction_policy="lfu") as server:
            (client,) = await connect(server, 1)
            assert await client.call("CLIENT", "NO-TOUCH", "maybe") == ErrorReply(
                "ERR syntax error"
            )
            assert await client.call("CLIENT", "NO-TOUCH", "on") == "OK"
            assert await client.call("CLIENT", "NO-EVICT", "on") == "OK"
            assert _field(await client.call("CLIENT", "INFO"), b"flags") == b"eT"
            assert await client.call("RESET") == "RESET"
            assert await client.call("SET", "k", "v") == "OK"
            before = await _freq(client, "k")
            assert await client.call("GET", "k") == b"v"
            assert await _freq(client, "k") == before + 1


# -- 3 and 4 on KVMemo's port alone -----------------------------------------------------------


async def test_command_info_docs_and_list_name_the_connection_subcommands() -> None:
    """Before: COMMAND INFO client had an empty tenth field, DOCS no subcommands."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            (client,) = await connect(server, 1)
            (entry,) = await client.call("COMMAND", "INFO", "client")  # type: ignore[misc]
            assert entry[:9] == [b"client", -2, [], 0, 0, 0, ["@slow"], [], []]
            subs = {sub[0]: sub for sub in entry[9]}
            assert subs[b"client|pause"] == [
                b"client|pause", -3, ["admin", "noscript", "loading", "stale"], 0, 0, 0,
                ["@admin", "@slow", "@dangerous", "@connection"], [], [], [],
            ]  # fmt: skip
            assert await client.call("COMMAND", "INFO", "client|pause") == [subs[b"client|pause"]]
            docs = await client.call("COMMAND", "DOCS", "client")
            assert isinstance(docs, list)
            doc = _as_map(docs[1])
            assert set(_as_map(doc[b"subcommands"])) == set(subs)
            names = await client.call("COMMAND", "LIST", "FILTERBY", "PATTERN", "client|*")
            assert isinstance(names, list)
            assert set(names) == set(subs)
            connection = await client.call("COMMAND", "LIST", "FILTERBY", "ACLCAT", "connection")
            assert isinstance(connection, list)
            assert {b"client|no-touch", b"command|docs"} <= set(connection)
            assert b"client" not in connection  # the container itself: @slow only
            # DEBUG is one command in Redis: no subcommands listed.
            (debug,) = await client.call("COMMAND", "INFO", "debug")  # type: ignore[misc]
            assert debug[9] == []


async def test_client_info_inside_exec_shows_the_transaction() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            (client,) = await connect(server, 1)
            assert await client.call("MULTI") == "OK"
            for argv in (("SET", "k", "1"), ("CLIENT", "INFO"), ("CLIENT", "LIST")):
                assert await client.call(*argv) == "QUEUED"
            _, info, listing = await client.call("EXEC")  # type: ignore[misc]
            for line in (info, listing.strip()):
                fields = (_field(line, b"flags"), _field(line, b"multi"), _field(line, b"cmd"))
                assert fields == (b"x", b"3", b"exec")
            after = await client.call("CLIENT", "INFO")
            assert (_field(after, b"flags"), _field(after, b"multi")) == (b"N", b"-1")
            assert _field(after, b"cmd") == b"client|info"


# -- against redis-server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """Redis and KVMemo's Redis port, stopped at the end of the module."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis-s22")) as ports:
        yield ports


PAUSE_ARGUMENTS = case(
    "pause-arguments",
    "CLIENT PAUSE",
    "CLIENT PAUSE -1",
    "CLIENT PAUSE abc",
    "CLIENT PAUSE 1.5",
    "CLIENT PAUSE 99999999999999999999",
    "CLIENT PAUSE 100 foo",
    "CLIENT PAUSE abc foo",
    "CLIENT PAUSE 100 write extra",
    "CLIENT PAUSE 100 WRITE EXTRA",
    "CLIENT UNPAUSE x",
    "CLIENT UNPAUSE",
    "CLIENT PAUSE 0",
    "CLIENT PAUSE 0 write",
    "CLIENT PAUSE 0 ALL",
    "SET k v",
    "MULTI",
    "CLIENT PAUSE 0 WRITE",
    "CLIENT UNPAUSE",
    "EXEC",
    "GET k",
)


@needs_redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_pause_arguments_answer_as_redis(servers: tuple[int, int], protocol: int) -> None:
    for pair in _connect(servers, protocol):
        pair.flush()
        run_same_steps(pair, PAUSE_ARGUMENTS.commands)


def _held(conn: RespConnection, seconds: float) -> bool:
    """True if no reply comes on ``conn`` within ``seconds`` (real time)."""
    conn.sock.settimeout(seconds)
    try:
        conn.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        conn.sock.settimeout(10)
    return False


@needs_redis
def test_pause_write_holds_as_redis_does(servers: tuple[int, int]) -> None:
    """The same replies from both servers, and on both the held ones wait."""
    seen = []
    for port in servers:
        admin, writer, reader = (RespConnection(port) for _ in range(3))
        try:
            assert reader.call("SET", "k", "0")[0] == b"+OK\r\n"
            assert admin.call("CLIENT", "PAUSE", "10000", "WRITE")[0] == b"+OK\r\n"
            writer.sock.sendall(
                b"".join(encode_command(*a) for a in (("GET", "k"), ("INCR", "k"), ("GET", "k")))
            )
            first = _read_reply(writer.stream)[0]
            assert _held(writer, 0.1)
            during = [reader.call("GET", "k")[0], reader.call("EXISTS", "k")[0]]
            listing = _text_of(reader.call("CLIENT", "LIST")[1])
            held = [line for line in listing.splitlines() if "flags=b" in line]
            info = _text_of(reader.call("INFO", "clients")[1])
            blocked = [line for line in info.split("\r\n") if line.startswith("blocked_clients")]
            unpause = admin.call("CLIENT", "UNPAUSE")[0]
            after = [_read_reply(writer.stream)[0] for _ in range(2)]
            seen.append((first, during, [_client_fields(h) for h in held], blocked, unpause, after))
        finally:
            admin.call("CLIENT", "UNPAUSE")
            for conn in (admin, writer, reader):
                conn.close()
    redis, kvmemo = seen
    assert kvmemo == redis
    assert redis[2][0][7:9] == [("flags", "b"), ("db", "0")]  # the held client, flags=b


@needs_redis
def test_pause_all_holds_the_caller_and_unpause_as_redis_does(servers: tuple[int, int]) -> None:
    """Lower bounds only: a held reply never comes before the pause ends."""
    for port in servers:
        admin, other = RespConnection(port), RespConnection(port)
        try:
            start = time.monotonic()
            assert admin.call("CLIENT", "PAUSE", "300", "WRITE")[0] == b"+OK\r\n"
            assert other.call("CLIENT", "PAUSE", "50", "ALL")[0] == b"+OK\r\n"
            assert admin.call("PING")[0] == b"+PONG\r\n"  # ALL, for the WRITE's 300 ms
            assert other.call("CLIENT", "UNPAUSE")[0] == b"+OK\r\n"
            assert time.monotonic() - start >= 0.25, port
        finally:
            admin.close()
            other.close()


def _exec_client_info(pair: Pair) -> list[object]:
    got = []
    for conn in (pair.redis, pair.kvmemo):
        for argv in (("MULTI",), ("SET", "k", "1"), ("CLIENT", "INFO"), ("CLIENT", "LIST")):
            conn.call(*argv)
        _, tree = conn.call("EXEC")
        items = tree[1]
        got.append([_client_fields(_text_of(item).strip()) for item in items[1:]])
    return got


@needs_redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_client_info_inside_exec_answers_as_redis(servers: tuple[int, int], protocol: int) -> None:
    for pair in _connect(servers, protocol):
        redis, kvmemo = _exec_client_info(pair)
        assert kvmemo == redis
        assert dict(redis[0])["multi"] == "3"


CONTAINERS = ("client", "config", "command", "acl", "latency", "slowlog")
# Subcommands KVMemo has and Debian's Redis 7.0 lacks (Redis 7.2's).
ONLY_KVMEMO = {b"client|setinfo", b"client|no-touch"}


@needs_redis
def test_command_info_lists_the_subcommands_as_redis(servers: tuple[int, int]) -> None:
    for pair in _connect(servers, 2):
        r, k = pair.both("COMMAND", "INFO", *CONTAINERS)
        for ri, ki in zip(_plain(r[1]), _plain(k[1]), strict=True):
            name = ki[0]
            # The container's own fields, but the tips (Redis's COMMAND has one).
            assert ki[:7] == ri[:7], name
            assert ki[8] == ri[8] == [], name
            rsubs = {sub[0]: sub for sub in ri[9]}
            ksubs = {sub[0]: sub for sub in ki[9]}
            assert ksubs, name
            assert set(ksubs) - set(rsubs) <= ONLY_KVMEMO, name
            for sub, entry in ksubs.items():
                if sub in rsubs:  # all but the tips
                    assert entry[:7] + entry[8:] == rsubs[sub][:7] + rsubs[sub][8:], sub
        # A subcommand by its full name, and COMMAND LIST's names.
        r, k = pair.both("COMMAND", "INFO", "client|pause", "config|get", "acl|whoami")
        assert [e[:7] for e in _plain(k[1])] == [e[:7] for e in _plain(r[1])]
        r, k = pair.both("COMMAND", "LIST", "FILTERBY", "PATTERN", "c*|*")
        assert set(_plain(k[1])) - set(_plain(r[1])) == ONLY_KVMEMO


@needs_redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_command_docs_give_the_subcommands_as_redis(
    servers: tuple[int, int], protocol: int
) -> None:
    for pair in _connect(servers, protocol):
        r, k = pair.both("COMMAND", "DOCS", *CONTAINERS)
        assert k[1][0] == r[1][0]  # RESP2: a flat array; RESP3: a map
        rdocs, kdocs = _as_map(_plain(r[1])), _as_map(_plain(k[1]))
        assert list(kdocs) == list(rdocs)
        for name, kdoc in kdocs.items():
            rdoc, kmap = _as_map(rdocs[name]), _as_map(kdoc)
            assert set(kmap) <= set(rdoc), name
            assert (kmap[b"group"], kmap[b"since"]) == (rdoc[b"group"], rdoc[b"since"]), name
            rsubs, ksubs = _as_map(rdoc[b"subcommands"]), _as_map(kmap[b"subcommands"])
            assert set(ksubs) - set(rsubs) <= ONLY_KVMEMO, name
            for sub, doc in ksubs.items():
                if sub in rsubs:
                    ksub, rsub = _as_map(doc), _as_map(rsubs[sub])
                    assert set(ksub) <= set(rsub), sub
                    assert (ksub[b"group"], ksub[b"since"]) == (rsub[b"group"], rsub[b"since"])
