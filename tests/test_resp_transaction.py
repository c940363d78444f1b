"""MULTI, EXEC, DISCARD, WATCH and UNWATCH on the Redis port, raw and through redis-py.

redis-py's ``pipeline()`` is transactional by default (MULTI ... EXEC), and
its ``transaction()`` helper retries on WATCH conflicts: both must work
unmodified. Real sockets; every test is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import pytest
import redis
import redis.exceptions
import trio
import trio.testing
from test_engine_transaction import watched_keys
from test_resp_server import TIMEOUT, Client, running

from kvmemo.server.resp import ErrorReply
from kvmemo.server.resp_server import RespLimits


async def test_multi_queues_and_exec_answers_every_command_in_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "a", "1") == "QUEUED"
            assert await client.call("INCR", "a") == "QUEUED"
            assert await client.call("PING") == "QUEUED"
            assert await client.call("MGET", "a", "b") == "QUEUED"
            assert await client.call("DISCARD") == "OK"
            assert await client.call("GET", "a") is None  # discarded: nothing ran
            assert await client.call("MULTI") == "OK"
            for call in (("SET", "a", "1"), ("INCR", "a"), ("PING",), ("MGET", "a", "b")):
                assert await client.call(*call) == "QUEUED"
            observer = await Client.connect(server)
            listing = await observer.call("CLIENT", "LIST")
            assert isinstance(listing, bytes)
            mine = next(line for line in listing.splitlines() if b"cmd=mget" in line)
            assert b" flags=x " in mine
            assert b" multi=4 " in mine
            await observer.aclose()
            assert await client.call("EXEC") == ["OK", 2, "PONG", [b"2", None]]
            await client.aclose()


async def test_connection_commands_in_multi_are_queued_and_answered_in_place() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("WATCH", "w") == "OK"
            assert await client.call("MULTI") == "OK"
            assert await client.call("CLIENT", "SETNAME", "queued") == "QUEUED"
            assert await client.call("SET", "a", "1") == "QUEUED"
            assert await client.call("UNWATCH") == "QUEUED"
            assert await client.call("SELECT", "0") == "QUEUED"
            assert await client.call("CLIENT", "GETNAME") == "QUEUED"
            assert await client.call("EXEC") == ["OK", "OK", "OK", "OK", b"queued"]
            # AUTH and HELLO are refused inside MULTI, and the transaction is discarded.
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "a", "2") == "QUEUED"
            assert await client.call("HELLO", "3") == ErrorReply(
                "ERR Command not allowed inside a transaction"
            )
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            # So is a connection command with the wrong number of arguments,
            # at queue time; EXEC's own is refused at once (Redis's
            # rejectCommand), leaving MULTI with nothing run.
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "a", "3") == "QUEUED"
            assert await client.call("ECHO") == ErrorReply(
                "ERR wrong number of arguments for 'echo' command"
            )
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "a", "3") == "QUEUED"
            assert await client.call("EXEC", "extra") == ErrorReply(
                "EXECABORT Transaction discarded because of: wrong number of arguments"
                " for 'exec' command"
            )
            assert await client.call("EXEC") == ErrorReply("ERR EXEC without MULTI")
            # CLIENT REPLY too (in Redis it leaves EXEC's array short of replies).
            assert await client.call("MULTI") == "OK"
            assert await client.call("CLIENT", "REPLY", "OFF") == ErrorReply(
                "ERR Command not allowed inside a transaction"
            )
            assert await client.call("CLIENT", "SETNAME", "n") == "QUEUED"
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            assert await client.call("CLIENT", "GETNAME") != b"n"  # nothing of it ran
            assert await client.call("GET", "a") == b"1"
            await client.aclose()


async def test_a_transaction_holds_at_most_max_transaction_commands() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(limits=RespLimits(max_transaction_commands=3)) as server:
            client = await Client.connect(server)
            assert await client.call("MULTI") == "OK"
            for i in range(3):
                assert await client.call("SET", f"k{i}", "v") == "QUEUED"
            assert await client.call("PING") == ErrorReply(
                "ERR a transaction holds at most 3 commands (max_transaction_commands)"
            )
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            assert await client.call("EXISTS", "k0") == 0
            await client.aclose()
    with pytest.raises(ValueError, match="max_transaction_commands"):
        RespLimits(max_transaction_commands=0)


async def test_a_pipelined_transaction_is_one_reply_per_request() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.send(
                b"SET before 1\r\nMULTI\r\nINCR before\r\nGET before\r\nEXEC\r\nGET before\r\n"
            )
            assert await client.replies(6) == ["OK", "OK", "QUEUED", "QUEUED", [2, b"2"], b"2"]
            await client.aclose()


async def test_errors_while_queueing_discard_the_transaction_with_execabort() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            for bad, error in (
                (("SET", "k"), "ERR wrong number of arguments for 'set' command"),
                (("NOSUCH", "x"), None),
            ):
                assert await client.call("MULTI") == "OK"
                assert await client.call("SET", "k", "v") == "QUEUED"
                reply = await client.call(*bad)
                assert isinstance(reply, ErrorReply)
                if error is not None:
                    assert reply == ErrorReply(error)
                assert await client.call("EXEC") == ErrorReply(
                    "EXECABORT Transaction discarded because of previous errors."
                )
                assert await client.call("GET", "k") is None
            # A bad option is not a queueing error: EXEC gives it in place, as Redis.
            assert await client.call("MULTI") == "OK"
            assert await client.call("SET", "k", "v", "EX", "nope") == "QUEUED"
            assert await client.call("SET", "j", "1") == "QUEUED"
            assert await client.call("EXEC") == [
                ErrorReply("ERR value is not an integer or out of range"),
                "OK",
            ]
            await client.aclose()


async def test_transaction_commands_out_of_place_are_errors() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("EXEC") == ErrorReply("ERR EXEC without MULTI")
            assert await client.call("DISCARD") == ErrorReply("ERR DISCARD without MULTI")
            assert await client.call("MULTI") == "OK"
            assert await client.call("MULTI") == ErrorReply("ERR MULTI calls can not be nested")
            assert await client.call("WATCH", "k") == ErrorReply(
                "ERR WATCH inside MULTI is not allowed"
            )
            assert await client.call("SET", "k", "v") == "QUEUED"
            assert await client.call("EXEC") == ["OK"]
            # A cross-shard move is refused when queued: its keys need one shard.
            a, b = "a0", "b0"
            while server.engine.slots.shard_of(a.encode()) == server.engine.slots.shard_of(
                b.encode()
            ):
                b += "x"
            assert await client.call("MULTI") == "OK"
            reply = await client.call("RENAME", a, b)
            assert isinstance(reply, ErrorReply)
            assert "needs all its keys on one shard" in reply.message
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            await client.aclose()


async def test_watch_aborts_exec_with_a_null_array_when_another_client_writes() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            first = await Client.connect(server)
            second = await Client.connect(server)
            assert await first.call("WATCH", "k", "k") == "OK"
            assert await second.call("SET", "k", "theirs") == "OK"
            assert await first.call("MULTI") == "OK"
            assert await first.call("SET", "k", "mine") == "QUEUED"
            await first.send(b"EXEC\r\n")
            assert await first.raw(b"", 5) == b"*-1\r\n"
            assert await first.call("GET", "k") == b"theirs"
            # The watch ended with EXEC: the next transaction runs.
            assert await first.call("MULTI") == "OK"
            assert await first.call("SET", "k", "mine") == "QUEUED"
            assert await first.call("EXEC") == ["OK"]
            # UNWATCH forgets a watch; a closed client gives its watches back.
            assert await first.call("WATCH", "k") == "OK"
            assert await first.call("UNWATCH") == "OK"
            assert await second.call("SET", "k", "again") == "OK"
            assert await first.call("MULTI") == "OK"
            assert await first.call("GET", "k") == "QUEUED"
            assert await first.call("EXEC") == [b"again"]
            assert await first.call("WATCH", "k", "j") == "OK"
            await first.aclose()
            await trio.testing.wait_all_tasks_blocked()  # the close reached the server
            assert await watched_keys(server.engine) == 0
            await second.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_transactional_pipelines_and_watch_work_unmodified(protocol: int) -> None:
    def session(port: int) -> None:
        r = redis.Redis(port=port, protocol=protocol)
        other = redis.Redis(port=port, protocol=protocol)
        try:
            pipe = r.pipeline()  # transaction=True: MULTI ... EXEC
            pipe.set("a", 1).incr("a").get("a").mset({"x": 1, "y": 2}).mget("x", "y")
            assert pipe.execute() == [True, 2, b"2", True, [b"1", b"2"]]

            def add_ten(p: redis.client.Pipeline) -> None:
                value = int(p.get("a") or 0)
                p.multi()
                p.set("a", value + 10)

            assert r.transaction(add_ten, "a") == [True]
            assert r.get("a") == b"12"
            with r.pipeline() as p:
                p.watch("a")
                other.set("a", 100)
                p.multi()
                p.set("a", 1)
                with pytest.raises(redis.exceptions.WatchError):
                    p.execute()
            assert r.get("a") == b"100"
            pipe = r.pipeline()
            pipe.set("t", "text").incr("t").get("t")
            results = pipe.execute(raise_on_error=False)
            assert results[0] is True
            assert results[2] == b"text"
            assert isinstance(results[1], redis.exceptions.ResponseError)
        finally:
            r.close()
            other.close()

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            await trio.to_thread.run_sync(session, server.port)
