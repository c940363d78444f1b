"""The Redis port as a demanding client meets it: regressions of an adversarial review.

Each test starts a store and ``serve_resp`` on 127.0.0.1, port 0, inside the
test, and talks raw RESP through trio streams. What each guards against is
stated in its docstring, with Redis 7's own reply where it is the reference.
"""

from __future__ import annotations

import tracemalloc

import trio
from test_resp_server import Client, running  # the same store and raw client

from kvmemo.server.resp import (
    ErrorReply,
    RespParser,
    encode_command,
)
from kvmemo.server.resp_server import RespLimits

TIMEOUT = 30  # seconds per test; real sockets and real time


# -- output memory: a few request bytes must not make a batch of huge replies at once -----


async def test_a_pipeline_of_big_replies_holds_no_more_than_the_output_limit() -> None:
    """Was: the replies of one read were all encoded before the first was staged.

    50 pipelined ``GET big`` (450 request bytes, one read) of a 1 MiB value
    made 50 MiB of encoded replies at once, whatever ``max_output_buffer``
    (64 KiB here): the module's promise, "at most max_output_buffer plus one
    reply of output" per connection, did not hold, and a 64 KiB read of GETs
    of a 10 MiB value asked for 30 GB. Now such a batch is encoded one reply
    at a time as room is made, and every reply still arrives, whole and in order.
    """
    limits = RespLimits(max_output_buffer=64 * 1024, output_timeout=10)
    value = b"v" * (1024 * 1024)
    count = 50
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "big", value) == "OK"
            expected = (b"$%d\r\n%b\r\n" % (len(value), value)) * count + b"+PONG\r\n"
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                await client.send(encode_command("GET", "big") * count + b"PING\r\n")
                received = bytearray()
                while len(received) < len(expected):
                    data = await client.stream.receive_some(1 << 20)
                    assert data, "the server closed the connection"
                    received += data
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert received == expected
            # The received copy (51 MiB here) is freed and re-made in pieces:
            # count only what the server could hold, well under 50 replies.
            assert peak - len(received) < 16 * 1024 * 1024, peak


async def test_replies_made_one_at_a_time_keep_their_places_and_client_reply() -> None:
    """The one-reply-at-a-time path gives exactly the replies of the batched one:
    errors and PING answered in place, CLIENT REPLY SKIP spent on the next command."""
    limits = RespLimits(max_output_buffer=4096, output_timeout=10)
    value = b"x" * 3000
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "big", value) == "OK"
            await client.send(
                b"CLIENT REPLY SKIP\r\n"
                b"GET big\r\n"  # skipped
                b"GET big\r\nPING\r\nNOSUCH a\r\nGET big\r\nGET\r\nGET nokey\r\nGET big\r\n"
                b"PING last\r\n"
            )
            assert await client.replies(8) == [
                value,
                "PONG",
                ErrorReply("ERR unknown command 'NOSUCH', with args beginning with: 'a' "),
                value,
                ErrorReply("ERR wrong number of arguments for 'get' command"),
                None,
                value,
                b"last",
            ]
            # CLIENT REPLY OFF drops them all, ON answers again.
            await client.send(b"CLIENT REPLY OFF\r\nGET big\r\nGET big\r\nPING\r\n")
            assert await client.call("CLIENT", "REPLY", "ON") == "OK"
            assert await client.call("GET", "big") == value


# -- a refused EXEC: Redis's rejectCommand --------------------------------------------------


async def test_exec_refused_in_resp2_subscribed_mode_aborts_and_drops_the_watches() -> None:
    """Was: ``-ERR Can't execute 'exec' ...``, and the WATCH survived it.

    Redis 7 (rejectCommand) answers a refused EXEC with EXECABORT and the
    reason, and discards the transaction and every watch: after it, a
    transaction runs even if the key once watched was written meanwhile.
    """
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            other = await Client.connect(server)
            await client.send(b"WATCH wk\r\nSUBSCRIBE ch\r\nEXEC\r\nUNSUBSCRIBE\r\n")
            assert await client.replies(4) == [
                "OK",
                [b"subscribe", b"ch", 1],
                ErrorReply(
                    "EXECABORT Transaction discarded because of: Can't execute 'exec': only"
                    " (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in"
                    " this context"
                ),
                [b"unsubscribe", b"ch", 0],
            ]
            assert await other.call("SET", "wk", "1") == "OK"
            await client.send(b"MULTI\r\nPING\r\nEXEC\r\n")
            assert await client.replies(3) == ["OK", "QUEUED", ["PONG"]]


async def test_exec_refused_before_auth_answers_execabort() -> None:
    """Was: ``-NOAUTH Authentication required.``; Redis 7 answers
    ``-EXECABORT Transaction discarded because of: NOAUTH Authentication required.``
    (the transaction left by RESET's logout is gone either way)."""
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"sekret"})) as server:
            client = await Client.connect(server)
            await client.send(b"AUTH sekret\r\nMULTI\r\nSET a 1\r\nRESET\r\nEXEC\r\nGET a\r\n")
            assert await client.replies(6) == [
                "OK",
                "OK",
                "QUEUED",
                "RESET",
                ErrorReply(
                    "EXECABORT Transaction discarded because of: NOAUTH Authentication required."
                ),
                ErrorReply("NOAUTH Authentication required."),
            ]
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of: NOAUTH Authentication required."
            )
            assert await client.call("AUTH", "sekret") == "OK"
            assert await client.call("EXEC") == ErrorReply("ERR EXEC without MULTI")
            assert await client.call("GET", "a") is None


# -- unauthenticated clients: Redis's limits while the request is read -----------------------


async def test_an_unauthenticated_client_is_refused_while_its_big_request_is_read() -> None:
    """Was: checked only once the request was whole, so before AUTH a client could
    make the server hold a 512 MiB argument (1 GiB of query buffer) per
    connection, the memory exhaustion Redis's limits exist to prevent
    (CVE-2021-32675). Now refused at the length line, as Redis refuses it."""
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"sekret"})) as server:
            for request, message in (
                (b"*2\r\n$3\r\nGET\r\n$536870912\r\n", "unauthenticated bulk length"),
                (b"*2\r\n$3\r\nGET\r\n$16385\r\n" + b"x" * 100, "unauthenticated bulk length"),
                (b"*11\r\n", "unauthenticated multibulk length"),
                (b"*1000000\r\n$3\r\nSET\r\n", "unauthenticated multibulk length"),
            ):
                client = await Client.connect(server)
                await client.send(request)
                assert await client.reply() == ErrorReply(f"ERR Protocol error: {message}")
                assert await client.stream.receive_some(100) == b""
            # Within the limits an unfinished request is waited for; AUTH lifts them.
            client = await Client.connect(server)
            await client.send(b"*2\r\n$4\r\nAUTH\r\n$16384\r\n" + b"x" * 100)
            await client.send(b"x" * (16384 - 100) + b"\r\n")
            assert await client.reply() == ErrorReply(
                "WRONGPASS invalid username-password pair or user is disabled."
            )
            big = b"v" * (1024 * 1024)
            await client.send(
                b"AUTH sekret\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % len(big) + big[:1000]
            )
            assert await client.reply() == "OK"
            await client.send(big[1000:] + b"\r\n")
            assert await client.reply() == "OK"
            assert await client.call("STRLEN", "k") == len(big)


def test_the_parser_reports_the_request_it_is_reading() -> None:
    """``RespParser.reading``: (argument count, length of the argument being read)."""
    parser = RespParser()
    assert parser.reading == (0, 0)
    for data, expected in (
        (b"*3\r\n", (3, 0)),
        (b"$3\r\nSET\r\n", (3, 0)),
        (b"$1\r\n", (3, 1)),
        (b"k\r\n$20000\r\nabc", (3, 20000)),
    ):
        parser.feed(data)
        assert parser.next_commands() == ([], None)
        assert parser.reading == expected
    parser.feed(b"x" * 19997 + b"\r\nPING")
    commands, error = parser.next_commands()
    assert error is None
    assert [c[:2] for c in commands] == [(b"SET", b"k")]
    assert parser.reading == (0, 0)  # an inline request in progress counts nothing


async def test_client_reply_skip_before_reset_skips_the_reset_reply() -> None:
    """Was: ``+RESET`` sent after CLIENT REPLY SKIP. Redis 7 skips RESET's reply
    (SKIP applies to the next command; RESET clears what comes after), while
    after CLIENT REPLY OFF, which RESET turns on again, ``+RESET`` is sent."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.send(b"CLIENT REPLY SKIP\r\nRESET\r\nPING one\r\nPING two\r\n")
            assert await client.replies(2) == [b"one", b"two"]
            await client.send(b"CLIENT REPLY OFF\r\nPING a\r\nRESET\r\nPING b\r\n")
            assert await client.replies(2) == ["RESET", b"b"]
            await client.send(b"CLIENT REPLY OFF\r\nCLIENT REPLY SKIP\r\nRESET\r\nPING c\r\n")
            assert await client.replies(2) == ["RESET", b"c"]


# -- MULTI: a container's bad subcommand is refused when queued, as Redis does -------------


async def test_a_bad_subcommand_in_multi_aborts_the_transaction() -> None:
    """Was: ``CLIENT SETNAME`` (no name), ``CONFIG NOSUCH``, ``SLOWLOG LEN x`` ...
    were QUEUED, and EXEC then ran the transaction's other commands, answering
    the error in place. Redis refuses them at once (its command lookup knows
    subcommands and their arity) and EXEC aborts: nothing runs."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            for request, error in (
                (b"CLIENT NOSUCH", "ERR unknown subcommand 'NOSUCH'. Try CLIENT HELP."),
                (b"CLIENT SETNAME", "ERR wrong number of arguments for 'client|setname' command"),
                (b"CONFIG NOSUCH x", "ERR unknown subcommand 'NOSUCH'. Try CONFIG HELP."),
                (b"config get", "ERR wrong number of arguments for 'config|get' command"),
                (b"SLOWLOG LEN x", "ERR wrong number of arguments for 'slowlog|len' command"),
                (b"COMMAND COUNT x", "ERR wrong number of arguments for 'command|count' command"),
            ):
                await client.send(b"MULTI\r\nSET a 1\r\n" + request + b"\r\nEXEC\r\nEXISTS a\r\n")
                assert await client.replies(5) == [
                    "OK",
                    "QUEUED",
                    ErrorReply(error),
                    ErrorReply("EXECABORT Transaction discarded because of previous errors."),
                    0,
                ], request
                # Outside MULTI: the same error, as before.
                assert await client.call(*request.split()) == ErrorReply(error)
            # A bare COMMAND (its subcommand is optional) is queued as before.
            await client.send(b"MULTI\r\nCOMMAND\r\nDISCARD\r\n")
            assert await client.replies(3) == ["OK", "QUEUED", "OK"]
            # A valid subcommand is still queued and answered in its place.
            await client.send(b"MULTI\r\nSET a 1\r\nCLIENT SETNAME n\r\nCLIENT GETNAME\r\nEXEC\r\n")
            assert await client.replies(5) == [
                "OK",
                "QUEUED",
                "QUEUED",
                "QUEUED",
                ["OK", "OK", b"n"],
            ]
