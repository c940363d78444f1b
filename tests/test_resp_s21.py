"""Redis port, compared with redis-server 7.0.15: inline requests before AUTH,
subcommand case, the CLIENT subcommands, and what a client that does not read
makes the server hold.

Each test's docstring states what redis-server answered when it was compared
by hand; the tests themselves need no redis-server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from test_resp_pubsub import small_window_client
from test_resp_server import TIMEOUT, Client, running

from kvmemo.server import resp_server
from kvmemo.server.resp import (
    Command,
    ErrorReply,
    InlineArgs,
    RespParser,
    Set,
    encode_command,
)
from kvmemo.server.resp_server import PIPELINE_CHUNK, RespLimits

TOKENS = frozenset({"s3cret"})
NOAUTH = ErrorReply("NOAUTH Authentication required.")
UNAUTH_MBULK = ErrorReply("ERR Protocol error: unauthenticated multibulk length")


# -- 1. inline requests before AUTH ----------------------------------------------------------


def test_the_parser_marks_inline_requests_and_only_them() -> None:
    parser = RespParser()
    parser.feed(b"SET a b c d e f g h i j k\r\n" + encode_command("GET", "a") + b"PING\r\n")
    commands, error = parser.next_commands()
    assert error is None
    assert commands == [
        (b"SET", *(c.encode() for c in "abcdefghijk")),
        (b"GET", b"a"),
        (b"PING",),
    ]
    assert [type(c) is InlineArgs for c in commands] == [True, False, True]
    parser.feed(b"ECHO x\r\n" + encode_command("ECHO", "y"))
    first, second = parser.next_event(), parser.next_event()
    assert isinstance(first, Command)
    assert isinstance(second, Command)
    assert first.inline
    assert not second.inline


async def test_an_inline_request_of_many_arguments_before_auth_gets_the_command_checks() -> None:
    """Redis checks its limits on unauthenticated requests (10 arguments, 16 KiB each)
    in processMultibulkBuffer only. redis-server 7.0.15 with requirepass, to inline
    requests before AUTH: ``SET a b c d e f g h i j k`` -> NOAUTH (connection open),
    ``GET x`` x100 -> wrong number of arguments, ``FOO a ... k`` -> unknown command,
    ``AUTH`` <20000 bytes> -> WRONGPASS, ``AUTH a ... k`` -> syntax error; then
    ``AUTH <password>`` works. KVMemo closed the connection with "unauthenticated
    multibulk (or bulk) length" before."""
    with trio.fail_after(TIMEOUT):
        async with running(tokens=TOKENS) as server:
            client = await Client.connect(server)
            await client.send(b"SET a b c d e f g h i j k\r\nPING\r\n")
            assert await client.replies(2) == [NOAUTH, NOAUTH]
            await client.send(b"GET" + b" x" * 100 + b"\r\n")
            assert await client.reply() == ErrorReply(
                "ERR wrong number of arguments for 'get' command"
            )
            await client.send(b"FOO a b c d e f g h i j k\r\n")
            assert await client.reply() == ErrorReply(
                "ERR unknown command 'FOO', with args beginning with: "
                "'a' 'b' 'c' 'd' 'e' 'f' 'g' 'h' 'i' 'j' 'k' "
            )
            await client.send(b"AUTH " + b"x" * 20000 + b"\r\n")
            assert await client.reply() == ErrorReply(
                "WRONGPASS invalid username-password pair or user is disabled."
            )
            await client.send(b"AUTH a b c d e f g h i j k\r\n")
            assert await client.reply() == ErrorReply("ERR syntax error")
            await client.send(b"AUTH s3cret\r\nMSET a 1 b 2 c 3 d 4 e 5 f 6\r\nGET f\r\n")
            assert await client.replies(3) == ["OK", "OK", b"6"]


async def test_a_multibulk_request_of_many_arguments_before_auth_still_closes() -> None:
    """redis-server 7.0.15: ``PING`` inline, then an 11-argument multibulk request,
    before AUTH -> NOAUTH, then "unauthenticated multibulk length" and the close."""
    with trio.fail_after(TIMEOUT):
        async with running(tokens=TOKENS) as server:
            client = await Client.connect(server)
            await client.send(b"PING\r\n" + encode_command("MSET", *["k"] * 10))
            assert await client.replies(2) == [NOAUTH, UNAUTH_MBULK]
            assert await client.closed()


# -- 2. subcommands in any case ----------------------------------------------------------------

CASE_CALLS: list[list[str]] = [
    ["PUBSUB", "CHANNELS"],
    ["PUBSUB", "NUMSUB", "a"],
    ["PUBSUB", "NUMPAT"],
    ["PUBSUB", "HELP"],
    ["CLIENT", "GETNAME"],
    ["CLIENT", "NO-EVICT", "OFF"],
    ["CLIENT", "TRACKING", "OFF"],
    ["CLIENT", "TRACKINGINFO"],
    ["CLIENT", "GETREDIR"],
    ["CLIENT", "CACHING", "YES"],
    ["CLIENT", "UNBLOCK", "1", "TIMEOUT"],
    ["CLIENT", "HELP"],
    ["CONFIG", "GET", "maxmemory"],
    ["CONFIG", "HELP"],
    ["COMMAND", "COUNT"],
    ["COMMAND", "INFO", "get"],
    ["COMMAND", "GETKEYS", "get", "a"],
    ["OBJECT", "ENCODING", "k"],
    ["OBJECT", "HELP"],
    ["MEMORY", "USAGE", "k"],
    ["MEMORY", "HELP"],
    ["SLOWLOG", "LEN"],
    ["SLOWLOG", "HELP"],
    ["DEBUG", "HELP"],
]


def _spellings(word: str) -> list[str]:
    return [word.upper(), word.lower(), word[:1].lower() + word[1:].upper()]


async def test_container_commands_and_their_subcommands_are_case_insensitive() -> None:
    """redis-server 7.0.15 answers ``pubsub channels``, ``Client getname``, ``config
    get ...`` and every other container command and subcommand the same in any case,
    in and out of MULTI. KVMemo already did for the subcommands it had (this guards
    them); the list also covers the CLIENT subcommands added here."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"
            for call in CASE_CALLS:
                answers = [
                    await client.call(name, sub, *call[2:])
                    for name, sub in zip(_spellings(call[0]), _spellings(call[1]), strict=True)
                ]
                assert answers[0] == answers[1] == answers[2], call
                assert not (
                    isinstance(answers[0], ErrorReply) and "unknown" in answers[0].message
                ), call
            assert await client.call("multi") == "OK"
            assert await client.call("pubsub", "numsub", "a") == "QUEUED"
            assert await client.call("Client", "GetName") == "QUEUED"
            assert await client.call("exec") == [[b"a", 0], None]


# -- 3. CLIENT subcommands ---------------------------------------------------------------------


async def test_client_tracking_off_is_accepted_and_on_is_refused_clearly() -> None:
    """redis-server 7.0.15: ``CLIENT TRACKING OFF`` (with any of BCAST, OPTIN, OPTOUT,
    NOLOOP, PREFIX p) -> OK; an unknown option or mode -> syntax error; REDIRECT to
    a missing id -> "The client ID you want redirect to does not exist", two
    REDIRECTs -> "A client can only redirect to a single other client". KVMemo has no
    client-side caching: ON is refused with an error that says so (it was "unknown
    subcommand 'TRACKING'" before, for OFF too)."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            me = await client.call("CLIENT", "ID")
            assert isinstance(me, int)
            assert await client.call("CLIENT", "TRACKING", "OFF") == "OK"
            assert (
                await client.call("client", "tracking", "off", "optin", "optout", "noloop", "bcast")
                == "OK"
            )
            assert await client.call("CLIENT", "TRACKING", "OFF", "PREFIX", "a") == "OK"
            assert await client.call("CLIENT", "TRACKING", "OFF", "REDIRECT", me) == "OK"
            syntax = ErrorReply("ERR syntax error")
            assert await client.call("CLIENT", "TRACKING", "maybe") == syntax
            assert await client.call("CLIENT", "TRACKING", "OFF", "FOO") == syntax
            assert await client.call("CLIENT", "TRACKING", "OFF", "PREFIX") == syntax
            assert await client.call("CLIENT", "TRACKING", "OFF", "REDIRECT", "x") == ErrorReply(
                "ERR value is not an integer or out of range"
            )
            assert await client.call("CLIENT", "TRACKING", "ON", "REDIRECT", 999999) == (
                ErrorReply("ERR The client ID you want redirect to does not exist")
            )
            assert await client.call(
                "CLIENT", "TRACKING", "OFF", "REDIRECT", me, "REDIRECT", me
            ) == ErrorReply("ERR A client can only redirect to a single other client")
            assert await client.call("CLIENT", "TRACKING") == ErrorReply(
                "ERR wrong number of arguments for 'client|tracking' command"
            )
            refused = await client.call("CLIENT", "TRACKING", "ON")
            assert isinstance(refused, ErrorReply)
            assert refused.message.startswith("ERR CLIENT TRACKING ON is not supported")
            assert await client.call("CLIENT", "TRACKINGINFO") == [
                b"flags",
                [b"off"],
                b"redirect",
                -1,
                b"prefixes",
                [],
            ]


async def test_tracking_info_getredir_and_caching_answer_as_for_a_client_not_tracking() -> None:
    """redis-server 7.0.15 to a client not tracking: TRACKINGINFO -> flags [off],
    redirect -1, prefixes [] (RESP3: a map, flags a set); GETREDIR -> -1; CACHING
    YES (or anything) -> "CLIENT CACHING can be called only when the client is in
    tracking mode with OPTIN or OPTOUT mode enabled"; each with its arity error.
    KVMemo answered "unknown subcommand" to all three before."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            info: Any = await client.call("CLIENT", "TRACKINGINFO")
            assert info == [b"flags", [b"off"], b"redirect", -1, b"prefixes", []]
            assert await client.call("CLIENT", "GETREDIR") == -1
            caching = ErrorReply(
                "ERR CLIENT CACHING can be called only when the client is in tracking mode"
                " with OPTIN or OPTOUT mode enabled"
            )
            assert await client.call("CLIENT", "CACHING", "YES") == caching
            assert await client.call("CLIENT", "CACHING", "maybe") == caching
            for call in (("TRACKINGINFO", "x"), ("GETREDIR", "x"), ("CACHING",)):
                assert await client.call("CLIENT", *call) == ErrorReply(
                    f"ERR wrong number of arguments for 'client|{call[0].lower()}' command"
                )
            await client.call("HELLO", "3")
            info = await client.call("CLIENT", "TRACKINGINFO")
            assert info == {b"flags": Set([b"off"]), b"redirect": -1, b"prefixes": []}


async def test_client_unblock_answers_zero_with_redis_checks_of_its_arguments() -> None:
    """redis-server 7.0.15, no client blocked: ``CLIENT UNBLOCK id [TIMEOUT|ERROR]``
    -> 0 for any id; a bad reason -> "CLIENT UNBLOCK reason should be TIMEOUT or
    ERROR" (checked before the id); a bad id -> not an integer; five arguments ->
    "unknown subcommand or wrong number of arguments for 'UNBLOCK'". No KVMemo
    command blocks, so 0 is exact. It was "unknown subcommand" before."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            other = await Client.connect(server)
            other_id = await other.call("CLIENT", "ID")
            assert isinstance(other_id, int)
            assert await client.call("CLIENT", "UNBLOCK", other_id) == 0
            assert await client.call("CLIENT", "UNBLOCK", other_id, "timeout") == 0
            assert await client.call("CLIENT", "UNBLOCK", "-5", "ERROR") == 0
            assert await client.call("CLIENT", "UNBLOCK", "x") == ErrorReply(
                "ERR value is not an integer or out of range"
            )
            assert await client.call("CLIENT", "UNBLOCK", "x", "FOO") == ErrorReply(
                "ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR"
            )
            assert await client.call("CLIENT", "UNBLOCK", "1", "TIMEOUT", "x") == ErrorReply(
                "ERR unknown subcommand or wrong number of arguments for 'UNBLOCK'."
                " Try CLIENT HELP."
            )
            assert await client.call("CLIENT", "UNBLOCK") == ErrorReply(
                "ERR wrong number of arguments for 'client|unblock' command"
            )
            assert await other.call("PING") == "PONG"


def _flags(info: object) -> bytes:
    assert isinstance(info, bytes)
    return dict(f.split(b"=", 1) for f in info.split())[b"flags"]


async def test_client_no_evict_shows_the_e_flag_until_turned_off() -> None:
    """redis-server 7.0.15: after ``CLIENT NO-EVICT ON`` CLIENT INFO shows flags=e (Pxe
    with a subscription, inside MULTI), after OFF flags=N; RESET keeps it. KVMemo
    never evicts a client, so the flag is all there is to keep: it showed N before."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("CLIENT", "NO-EVICT", "on") == "OK"
            assert _flags(await client.call("CLIENT", "INFO")) == b"e"
            assert await client.call("MULTI") == "OK"
            assert await client.call("CLIENT", "INFO") == "QUEUED"
            executed = await client.call("EXEC")
            assert isinstance(executed, list)
            assert _flags(executed[0]) == b"xe"  # inside EXEC: x too, as Redis shows it
            assert await client.call("RESET") == "RESET"
            assert _flags(await client.call("CLIENT", "INFO")) == b"e"
            assert await client.call("CLIENT", "NO-EVICT", "Off") == "OK"
            assert _flags(await client.call("CLIENT", "INFO")) == b"N"
            assert await client.call("CLIENT", "NO-EVICT", "maybe") == ErrorReply(
                "ERR syntax error"
            )


def _help_subcommands(lines: Sequence[object]) -> set[str]:
    names = set()
    for line in lines[1:]:
        assert isinstance(line, str)
        if not line.startswith(" "):
            names.add(line.split()[0].lower())
    return names


async def test_client_help_lists_what_the_server_answers() -> None:
    """redis-server 7.0.15's CLIENT HELP names CACHING, GETREDIR, GETNAME, ID, INFO,
    KILL, LIST, UNPAUSE, PAUSE, REPLY, SETNAME, UNBLOCK, TRACKING, TRACKINGINFO,
    NO-EVICT and HELP. KVMemo's names exactly the subcommands it answers (PAUSE and
    UNPAUSE among them since tests/test_resp_s22.py)."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            lines = await client.call("CLIENT", "HELP")
            assert isinstance(lines, list)
            listed = _help_subcommands(lines)
            handler = resp_server._CONNECTION_COMMANDS["client"].handler
            assert listed == set(resp_server._DISPATCHED[handler])
            assert {"tracking", "trackinginfo", "getredir", "caching", "unblock"} <= listed
            assert {"pause", "unpause"} <= listed


# -- 4. what a client that does not read makes the server hold --------------------------------


def _count_engine_calls(engine: Any, sizes: list[int]) -> None:
    """Record the number of commands of every engine call (batches and lone ones)."""
    execute_many = engine.execute_many
    execute = engine.execute

    async def counting_many(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        sizes.append(len(calls))
        return list(await execute_many(calls))

    async def counting_one(name: str, args: Sequence[bytes]) -> Any:
        sizes.append(1)
        return await execute(name, args)

    engine.execute_many = counting_many
    engine.execute = counting_one


async def test_a_client_that_reads_nothing_holds_at_most_one_chunk_of_results_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipeline of GETRANGEs (each a fresh copy of a 64 KiB value) from a client
    that reads nothing: the results computed and not yet taken by the kernel stay
    within max_output_buffer plus PIPELINE_CHUNK replies. Before, every command of
    a read ran in one engine call first (some 3,800 copies for 64 KiB of requests,
    370 MB for a 100 KB value, whatever the limit). Redis checks its output limit
    after every reply (and closes a client past a configured hard limit)."""
    value = b"v" * (64 * 1024)
    request = b"GETRANGE k 0 -2\r\n"
    count = 1000
    reply_size = len(b"$65535\r\n") + len(value) - 1 + 2
    connections: list[resp_server._Connection] = []
    real_init = resp_server._Connection.__init__

    def recording_init(self: resp_server._Connection, *args: Any) -> None:
        real_init(self, *args)
        connections.append(self)

    monkeypatch.setattr(resp_server._Connection, "__init__", recording_init)
    limits = RespLimits(max_output_buffer=64 * 1024, output_timeout=60)
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            sizes: list[int] = []
            client = await small_window_client(server.host, server.port)
            assert await client.call("SET", "k", value) == "OK"
            _count_engine_calls(server.engine, sizes)
            await client.send(request * count)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            conn = connections[-1]
            computed = sum(sizes)
            taken_by_kernel = conn._sent_total // reply_size
            assert computed < count  # the rest waits for the client to read
            held = computed - taken_by_kernel
            assert held * reply_size <= limits.max_output_buffer + PIPELINE_CHUNK * reply_size
            assert max(sizes) <= PIPELINE_CHUNK
            for _ in range(count):  # nothing lost, in order, once it reads
                assert await client.reply() == value[:-1]
            assert sum(sizes) == count


async def test_a_long_pipeline_runs_in_chunks_and_keeps_its_order_and_errors() -> None:
    """Commands of one read past PIPELINE_CHUNK (data commands and early errors alike)
    are answered in sending order, and no engine call holds more than a chunk."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            sizes: list[int] = []
            _count_engine_calls(server.engine, sizes)
            total = 3 * PIPELINE_CHUNK + 7
            data = b""
            expected: list[object] = []
            for i in range(total):
                if i % 50 == 49:
                    data += encode_command("NOSUCH")
                    expected.append(
                        ErrorReply("ERR unknown command 'NOSUCH', with args beginning with: ")
                    )
                elif i % 2:
                    data += encode_command("INCR", "n")
                    expected.append(sum(1 for j in range(i + 1) if j % 2 and j % 50 != 49))
                else:
                    data += encode_command("PING")
                    expected.append("PONG")
            await client.send(data)
            assert await client.replies(total) == expected
            assert max(sizes) <= PIPELINE_CHUNK
