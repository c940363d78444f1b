"""Pub/sub on the Redis port: SUBSCRIBE, UNSUBSCRIBE, PSUBSCRIBE, PUNSUBSCRIBE.

Raw RESP2 and RESP3 shapes, redis-py's pubsub (sync and asyncio, in a thread),
``redis-cli subscribe`` as a subprocess, and the limits: a slow reader's
backlog waits in the hub's bounded outbox and an overflow closes that
connection alone; a connection's end, however it ends, leaves its channels.
Each test starts a store and its Redis port on 127.0.0.1, port 0
(:func:`test_resp_server.running`). Byte-for-byte agreement with a real
``redis-server`` is in ``test_resp_pubsub_differential.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_resp_server import Client, running

from kvmemo.server.resp import ErrorReply, Push, encode_command
from kvmemo.server.resp_server import PUSH_WINDOW, RespLimits

TIMEOUT = 30  # seconds per test; real sockets and real time
REDIS_CLI = shutil.which("redis-cli")

PUBSUB_ONLY = (
    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET"
    " are allowed in this context"
)


async def numsub(client: Client, channel: str) -> int:
    reply = await client.call("PUBSUB", "NUMSUB", channel)
    assert isinstance(reply, list)
    count = reply[1]
    assert isinstance(count, int)
    return count


async def wait_numsub(client: Client, channel: str, expected: int) -> None:
    """Ask until the count is ``expected``: each round trip lets the server see a close."""
    while await numsub(client, channel) != expected:
        await trio.lowlevel.checkpoint()


async def small_window_client(host: str, port: int) -> Client:
    """A client whose socket receives little before the server must wait (4 KiB)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    await sock.connect((host, port))
    return Client(trio.SocketStream(sock))


def kernel_send_buffer_max() -> int:
    """Most bytes the kernel may hold for one TCP socket's sends (tcp_wmem's max, doubled)."""
    try:
        return 2 * int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 16 * 1024 * 1024


def pusher_tasks() -> int:
    """How many connection pushers run in this trio run (found by their task names)."""
    found = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task.name.endswith("._pusher"):
            found += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


# -- replies, RESP2 ------------------------------------------------------------------------


async def test_resp2_confirmations_messages_and_the_subscribed_mode() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            pub = await Client.connect(server)
            await sub.send(encode_command("SUBSCRIBE", "a", "b", "a"))
            assert await sub.replies(3) == [
                [b"subscribe", b"a", 1],
                [b"subscribe", b"b", 2],
                [b"subscribe", b"a", 2],
            ]
            assert await sub.call("PSUBSCRIBE", "a*") == [b"psubscribe", b"a*", 3]
            assert await pub.call("PUBLISH", "a", "hi") == 2  # the channel and the pattern
            assert await pub.call("PUBLISH", "zz", "no") == 0
            assert await sub.replies(2) == [
                [b"message", b"a", b"hi"],
                [b"pmessage", b"a*", b"a", b"hi"],
            ]
            # Only (P)(UN)SUBSCRIBE, PING, QUIT and RESET, as Redis.
            assert await sub.call("PING") == [b"pong", b""]
            assert await sub.call("PING", "x") == [b"pong", b"x"]
            assert await sub.call("GET", "k") == ErrorReply(PUBSUB_ONLY.format("get"))
            assert await sub.call("CLIENT", "ID") == ErrorReply(PUBSUB_ONLY.format("client|id"))
            assert await sub.call("PUBSUB", "NUMPAT") == ErrorReply(
                PUBSUB_ONLY.format("pubsub|numpat")
            )
            assert await sub.call("HELLO", "3") == ErrorReply(PUBSUB_ONLY.format("hello"))
            assert await sub.call("NOSUCH") == ErrorReply(
                "ERR unknown command 'NOSUCH', with args beginning with: "
            )
            await sub.send(encode_command("UNSUBSCRIBE"))
            assert await sub.replies(2) == [[b"unsubscribe", b"a", 2], [b"unsubscribe", b"b", 1]]
            assert await sub.call("PUNSUBSCRIBE") == [b"punsubscribe", b"a*", 0]
            # Count 0: out of subscribed mode; nothing left to leave answers nil.
            assert await sub.call("UNSUBSCRIBE") == [b"unsubscribe", None, 0]
            assert await sub.call("SET", "k", "v") == "OK"
            assert await sub.call("PING") == "PONG"


async def test_unsubscribing_a_connection_that_never_subscribed_answers_counts_of_zero() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.send(encode_command("UNSUBSCRIBE", "a", "b"))
            assert await client.replies(2) == [[b"unsubscribe", b"a", 0], [b"unsubscribe", b"b", 0]]
            assert await client.call("PUNSUBSCRIBE") == [b"punsubscribe", None, 0]
            assert await client.call("GET", "k") is None  # never in subscribed mode
            assert pusher_tasks() == 0  # nothing subscribed: no pusher


# -- replies, RESP3 ------------------------------------------------------------------------


async def test_resp3_pushes_and_every_command_while_subscribed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.call("HELLO", "3")
            # One pipeline: the confirmation, then the connection's own message,
            # then PUBLISH's count (Redis writes the message during the publish).
            await client.send(
                encode_command("SUBSCRIBE", "c")
                + encode_command("PUBLISH", "c", "x")
                + encode_command("SET", "k", "v")
                + encode_command("GET", "k")
                + encode_command("PING")
                + encode_command("UNSUBSCRIBE")
                + encode_command("UNSUBSCRIBE")
            )
            assert await client.replies(8) == [
                Push([b"subscribe", b"c", 1]),
                Push([b"message", b"c", b"x"]),
                1,
                "OK",
                b"v",
                "PONG",
                Push([b"unsubscribe", b"c", 0]),
                Push([b"unsubscribe", None, 0]),
            ]


async def test_hello_2_while_subscribed_in_resp3_enters_the_subscribed_mode() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await client.call("HELLO", "3")
            assert await client.call("PSUBSCRIBE", "p*") == Push([b"psubscribe", b"p*", 1])
            assert isinstance(await client.call("HELLO", "2"), list)
            assert await client.call("GET", "k") == ErrorReply(PUBSUB_ONLY.format("get"))


# -- order ---------------------------------------------------------------------------------


@settings(derandomize=True, database=None, max_examples=15, deadline=None)
@given(count=st.integers(1, 40), split=st.integers(0, 40))
def test_the_confirmation_comes_first_and_messages_in_publish_order(count: int, split: int) -> None:
    """A publisher sends ``count`` messages; the subscriber subscribes after
    ``split`` of them were sent (in one pipeline, unawaited): it gets its
    confirmation, then a suffix of the messages, in publish order, ending
    with the last (published once its subscription was confirmed)."""

    split = min(split, count)

    async def scenario() -> None:
        with trio.fail_after(TIMEOUT):
            async with running() as server:
                sub = await Client.connect(server)
                pub = await Client.connect(server)
                await pub.send(
                    b"".join(encode_command("PUBLISH", "c", str(i)) for i in range(split))
                )
                await sub.send(encode_command("SUBSCRIBE", "c"))
                await pub.send(
                    b"".join(encode_command("PUBLISH", "c", str(i)) for i in range(split, count))
                )
                await pub.replies(count)
                assert await sub.reply() == [b"subscribe", b"c", 1]
                assert await pub.call("PUBLISH", "c", "last") == 1
                got = []
                while True:
                    message = await sub.reply()
                    assert isinstance(message, list)
                    assert message[:2] == [b"message", b"c"]
                    if message[2] == b"last":
                        break
                    got.append(int(message[2]))
                assert got == list(range(count - len(got), count))

    trio.run(scenario)


# -- redis-py --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_pubsub_get_message_and_listen(protocol: int) -> None:
    def session(port: int) -> list[Any]:
        seen: list[Any] = []
        r = redis.Redis(port=port, protocol=protocol)
        p = r.pubsub()
        try:
            p.subscribe("news")
            p.psubscribe("n*")
            seen.append(p.get_message(timeout=5))
            seen.append(p.get_message(timeout=5))
            seen.append(r.publish("news", "hello"))
            seen.append(p.get_message(timeout=5))
            seen.append(p.get_message(timeout=5))
            seen.append(r.pubsub_numpat())
            r.publish("nope", "stop")
            for message in p.listen():
                seen.append((message["type"], message["channel"], message["data"]))
                if message["data"] == b"stop":
                    break
            p.unsubscribe()
            p.punsubscribe()
            seen.append(p.get_message(timeout=5))
            seen.append(p.get_message(timeout=5))
        finally:
            p.close()
            r.close()
        return seen

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            seen = await trio.to_thread.run_sync(session, server.port)
            assert seen == [
                {"type": "subscribe", "pattern": None, "channel": b"news", "data": 1},
                {"type": "psubscribe", "pattern": None, "channel": b"n*", "data": 2},
                2,
                {"type": "message", "pattern": None, "channel": b"news", "data": b"hello"},
                {"type": "pmessage", "pattern": b"n*", "channel": b"news", "data": b"hello"},
                1,
                ("pmessage", b"nope", b"stop"),
                {"type": "unsubscribe", "pattern": None, "channel": b"news", "data": 1},
                {"type": "punsubscribe", "pattern": None, "channel": b"n*", "data": 0},
            ]
            client = await Client.connect(server)
            await wait_numsub(client, "news", 0)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_asyncio_pubsub(protocol: int) -> None:
    async def session(port: int) -> list[Any]:
        r = redis.asyncio.Redis(port=port, protocol=protocol)
        seen: list[Any] = []
        try:
            async with r.pubsub() as p:
                await p.subscribe("a")
                seen.append(await p.get_message(timeout=5))
                seen.append(await r.publish("a", "x"))
                seen.append(await p.get_message(timeout=5))
                await p.ping()
                seen.append(await p.get_message(timeout=5))
        finally:
            await r.aclose()
        return seen

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            seen = await trio.to_thread.run_sync(lambda: asyncio.run(session(server.port)))
            assert seen == [
                {"type": "subscribe", "pattern": None, "channel": b"a", "data": 1},
                1,
                {"type": "message", "pattern": None, "channel": b"a", "data": b"x"},
                # redis-py's PING of a pubsub connection, as it reads Redis's answer
                {"type": "pong", "pattern": None, "channel": None, "data": b""},
            ]


# -- redis-cli -------------------------------------------------------------------------------


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")
async def test_redis_cli_subscribe_prints_a_published_message() -> None:
    assert REDIS_CLI is not None
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            pub = await Client.connect(server)
            async with trio.open_nursery() as nursery:
                command = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(server.port), "subscribe", "ch"]
                process = await nursery.start(
                    partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
                )
                try:
                    out = b""
                    assert process.stdout is not None
                    while b"subscribe\nch\n1\n" not in out:
                        out += await process.stdout.receive_some(4096)
                    assert await pub.call("PUBLISH", "ch", "hello there") == 1
                    while b"message\nch\nhello there\n" not in out:
                        chunk = await process.stdout.receive_some(4096)
                        assert chunk, out
                        out += chunk
                finally:
                    process.kill()
            await wait_numsub(pub, "ch", 0)


# -- ends and limits -------------------------------------------------------------------------


async def test_a_closed_or_killed_connection_leaves_its_channels_and_its_pusher_ends() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin = await Client.connect(server)
            gone = await Client.connect(server)
            assert await gone.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            killed = await Client.connect(server)
            killed_id = await killed.call("CLIENT", "ID")
            assert await killed.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            assert await numsub(admin, "c") == 2
            assert pusher_tasks() == 2
            await gone.aclose()
            await wait_numsub(admin, "c", 1)
            assert await admin.call("CLIENT", "KILL", "ID", killed_id) == 1
            await wait_numsub(admin, "c", 0)
            assert await killed.closed()
            while pusher_tasks():  # the connections' nurseries finish their tasks
                await trio.lowlevel.checkpoint()
            assert await admin.call("PUBSUB", "CHANNELS") == []


async def test_reset_and_quit_leave_every_subscription() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin = await Client.connect(server)
            client = await Client.connect(server)
            await client.send(encode_command("SUBSCRIBE", "a", "b"))
            await client.replies(2)
            assert await client.call("PSUBSCRIBE", "p*") == [b"psubscribe", b"p*", 3]
            assert await client.call("RESET") == "RESET"
            assert await numsub(admin, "a") == 0
            assert await admin.call("PUBSUB", "NUMPAT") == 0
            assert await client.call("GET", "k") is None  # out of subscribed mode
            assert await client.call("SUBSCRIBE", "a") == [b"subscribe", b"a", 1]
            assert await client.call("QUIT") == "OK"
            assert await client.closed()
            await wait_numsub(admin, "a", 0)


async def test_a_subscribe_past_the_subscription_bound_is_refused_whole() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_max_subscriptions=2) as server:
            client = await Client.connect(server)
            assert await client.call("SUBSCRIBE", "a") == [b"subscribe", b"a", 1]
            reply = await client.call("PSUBSCRIBE", "p*", "q*")
            assert isinstance(reply, ErrorReply)
            assert "pubsub_max_subscriptions (2)" in str(reply)
            assert await client.call("PSUBSCRIBE", "p*") == [b"psubscribe", b"p*", 2]
            assert await client.call("PING") == [b"pong", b""]  # still in subscribed mode


async def test_subscribe_inside_multi_is_refused_and_discards_the_transaction() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("MULTI") == "OK"
            for argv in (("SUBSCRIBE", "a"), ("PSUBSCRIBE", "a*"), ("UNSUBSCRIBE",)):
                assert await client.call(*argv) == ErrorReply(
                    "ERR Command not allowed inside a transaction"
                )
            assert await client.call("EXEC") == ErrorReply(
                "EXECABORT Transaction discarded because of previous errors."
            )
            assert await numsub(client, "a") == 0


async def test_a_slow_reader_backlog_waits_in_the_outbox_and_arrives_whole() -> None:
    """A subscriber that does not read: the port takes messages from the hub's
    outbox only while less than PUSH_WINDOW is pending, so the backlog grows
    in the outbox (bounded by pubsub_buffer_limit), not in the connection's
    output; once it reads, every message arrives, in order."""
    payload = b"x" * 8192
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_buffer_limit=64 * 1024 * 1024) as server:
            slow = await small_window_client(server.host, server.port)
            assert await slow.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            pub = await Client.connect(server)
            kernel = kernel_send_buffer_max() + 4096  # in flight: the server's and ours
            sent = 0
            backlog = 0
            while backlog < 1024 * 1024:  # until a MiB waits in the outbox
                assert await pub.call("PUBLISH", "c", payload) == 1
                sent += 1
                listing = await pub.call("CLIENT", "LIST", "TYPE", "pubsub")
                assert isinstance(listing, bytes)
                omem = int(listing.split(b" omem=")[1].split(b" ")[0])
                assert omem < PUSH_WINDOW + 2 * len(payload)
                stats = server.engine.pubsub.stats()
                assert stats["pubsub_overflows"] == 0
                backlog = sent * len(payload) - omem - kernel
            for i in range(sent):
                message = await slow.reply()
                assert message == [b"message", b"c", payload], i
            assert await slow.call("UNSUBSCRIBE") == [b"unsubscribe", b"c", 0]


async def test_an_overflowing_subscriber_is_closed_and_the_others_are_not() -> None:
    payload = b"y" * 4096
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_buffer_limit=64 * 1024) as server:
            slow = await small_window_client(server.host, server.port)
            assert await slow.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            fast = await Client.connect(server)
            assert await fast.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            pub = await Client.connect(server)
            sent = 0
            while await numsub(pub, "c") == 2:  # until the hub drops the slow one
                assert await pub.call("PUBLISH", "c", payload) == 2
                sent += 1
                assert await fast.reply() == [b"message", b"c", payload]
            assert server.engine.pubsub.stats()["pubsub_overflows"] == 1
            assert await slow.closed()
            assert await pub.call("PUBLISH", "c", "after") == 1
            assert await fast.reply() == [b"message", b"c", b"after"]
            info = await pub.call("INFO", "stats")
            assert isinstance(info, bytes)
            assert b"\r\npubsub_channels:1\r\npubsub_patterns:0\r\n" in info
            assert sent * len(payload) > 64 * 1024


async def test_messages_arrive_whole_and_in_order_under_a_small_output_limit() -> None:
    """A small output limit and stall timeout (which apply to replies) leave a
    subscriber that reads its messages alone: all arrive, in order."""
    limits = RespLimits(max_output_buffer=1024 * 1024, output_timeout=0.2)
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            sub = await Client.connect(server)
            pub = await Client.connect(server)
            assert await sub.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            for i in range(100):
                assert await pub.call("PUBLISH", "c", str(i)) == 1
            for i in range(100):
                assert await sub.reply() == [b"message", b"c", str(i).encode()]


# -- introspection ----------------------------------------------------------------------------


async def test_client_list_info_and_kill_know_subscribed_clients() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            admin = await Client.connect(server)
            client = await Client.connect(server)
            await client.call("HELLO", "3")
            await client.send(encode_command("SUBSCRIBE", "a", "b"))
            await client.replies(2)
            await client.call("PSUBSCRIBE", "p*")
            info = await client.call("CLIENT", "INFO")
            assert " flags=P db=0 sub=2 psub=1 ssub=0 multi=-1 " in str(info)
            await client.call("MULTI")
            assert " flags=Px " in str(await admin.call("CLIENT", "LIST", "TYPE", "pubsub"))
            await client.call("DISCARD")
            normal = await admin.call("CLIENT", "LIST", "TYPE", "normal")
            assert isinstance(normal, bytes)
            assert len(normal.splitlines()) == 1  # the admin only
            assert b" flags=N db=0 sub=0 psub=0 " in normal
            assert await admin.call("CLIENT", "KILL", "TYPE", "normal") == 0  # SKIPME yes
            assert await admin.call("CLIENT", "KILL", "TYPE", "pubsub") == 1
            assert await client.closed()


async def test_command_info_docs_and_count_list_the_subscribe_commands() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            infos = await client.call("COMMAND", "INFO", "subscribe", "punsubscribe", "publish")
            assert isinstance(infos, list)
            assert infos[0][:7] == [
                b"subscribe",
                -2,
                ["pubsub", "noscript", "loading", "stale"],
                0,
                0,
                0,
                ["@pubsub", "@slow"],
            ]
            assert infos[1][:2] == [b"punsubscribe", -1]
            assert infos[2][2] == ["pubsub", "loading", "stale", "fast"]
            assert infos[2][6] == ["@pubsub", "@fast"]
            docs = await client.call("COMMAND", "DOCS", "psubscribe")
            assert isinstance(docs, list)
            doc = dict(zip(docs[1][::2], docs[1][1::2], strict=True))
            assert doc[b"group"] == b"pubsub"
            assert doc[b"since"] == b"2.0.0"
            names = await client.call("COMMAND", "LIST")
            assert isinstance(names, list)
            for name in (b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe"):
                assert name in names
            count = await client.call("COMMAND", "COUNT")
            assert count == len([n for n in names if b"|" not in n])


# -- from the review of the port's pub/sub ------------------------------------------------------


async def test_resp3_a_message_never_overtakes_an_older_reply() -> None:
    """B increments then publishes the value; A, subscribed in RESP3, reads ``n``: a
    message of value v seen before a GET's reply means the GET ran after it was
    published, so it answers at least v (Redis's order; 1304 of 5000 broke it before)."""
    with trio.fail_after(TIMEOUT):
        async with running(shards=4) as server:
            a = await Client.connect(server)
            await a.call("HELLO", "3")
            assert await a.call("SUBSCRIBE", "ch") == Push([b"subscribe", b"ch", 1])
            b = await Client.connect(server)
            await b.call("SET", "n", "0")
            done = trio.Event()
            violations: list[tuple[int, int]] = []

            async def writer() -> None:
                for i in range(1, 1001):
                    await b.send(encode_command("INCR", "n") + encode_command("PUBLISH", "ch", i))
                    await b.replies(2)
                done.set()

            async def reader() -> None:
                seen = 0
                while not done.is_set():
                    await a.send(encode_command("GET", "n"))
                    while isinstance(reply := await a.reply(), Push):
                        seen = max(seen, int(reply.items[2]))
                    if int(reply) < seen:
                        violations.append((int(reply), seen))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                nursery.start_soon(reader)
            assert violations == []


async def test_nothing_follows_the_ok_of_quit_on_a_subscribed_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            assert await sub.call("SUBSCRIBE", "ch") == [b"subscribe", b"ch", 1]
            stop = trio.Event()

            async def publisher() -> None:
                n = 0
                while not stop.is_set():
                    for _ in range(20):
                        server.engine.pubsub.publish(b"ch", b"m%d" % n + b"x" * 1000)
                        n += 1
                    await trio.lowlevel.checkpoint()

            after_ok = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher)
                assert (await sub.reply())[0] == b"message"  # messages are flowing
                await sub.send(encode_command("QUIT"))
                seen_ok = False
                while True:
                    try:
                        reply = await sub.reply()
                    except (EOFError, trio.BrokenResourceError):
                        break  # closed by the server, after QUIT's reply
                    if reply == "OK":
                        seen_ok = True
                    elif seen_ok:
                        after_ok += 1
                stop.set()
            assert seen_ok
            assert after_ok == 0


async def test_subscribe_confirmations_obey_the_output_limit() -> None:
    """A client that pipelines SUBSCRIBEs and reads nothing: their confirmations wait
    under the output limit as any reply does (they grew without bound before)."""
    limit = 256 * 1024
    limits = RespLimits(max_output_buffer=limit, output_timeout=30)
    with trio.fail_after(TIMEOUT):
        async with running(limits=limits) as server:
            admin = await Client.connect(server)
            raw = trio.socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await raw.connect((server.host, server.port))
            client = Client(trio.SocketStream(raw))
            assert await client.call("CLIENT", "SETNAME", "flood") == "OK"
            request = encode_command("SUBSCRIBE", *(["x" * 2000] * 5))
            with trio.move_on_after(1):  # the sends block once the server stops reading
                for _ in range(4000):
                    await client.send(request)
            listing = await admin.call("CLIENT", "LIST")
            line = next(x for x in listing.split(b"\n") if b"name=flood " in x)
            omem = int(line.split(b" omem=")[1].split(b" ")[0])
            assert omem <= limit + len(request), omem


async def test_a_refused_first_subscribe_leaves_no_subscriber_nor_pusher() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_max_subscriptions=1) as server:
            client = await Client.connect(server)
            before = pusher_tasks()
            reply = await client.call("SUBSCRIBE", "a", "b")
            assert isinstance(reply, ErrorReply)
            assert pusher_tasks() == before
            assert await client.call("GET", "k") is None  # not in subscribed mode


async def test_a_frame_taken_out_still_counts_until_the_socket_took_it() -> None:
    """A subscriber that reads nothing: what the server holds for it (its unsent output
    plus its outbox) stays within pubsub_buffer_limit and the push window, because a
    staged message keeps counting until the socket took it (about twice the limit
    before). Bytes the kernel took are not the server's: the bound holds either way."""
    limit = 1024 * 1024
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_buffer_limit=limit) as server:
            admin = await Client.connect(server)
            raw = trio.socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await raw.connect((server.host, server.port))
            slow = Client(trio.SocketStream(raw))
            assert await slow.call("CLIENT", "SETNAME", "slow") == "OK"
            assert await slow.call("SUBSCRIBE", "c") == [b"subscribe", b"c", 1]
            hub = server.engine.pubsub
            (subscriber,) = hub._channels[b"c"]
            assert hub.publish(b"c", b"B" * (limit - 1024)) == 1
            await trio.testing.wait_all_tasks_blocked()  # the pusher stages it
            while not hub.overflows:
                listing = await admin.call("CLIENT", "LIST")
                assert isinstance(listing, bytes)
                line = next(x for x in listing.split(b"\n") if b"name=slow " in x)
                omem = int(line.split(b" omem=")[1].split(b" ")[0])
                assert omem + subscriber.pending_bytes <= limit + PUSH_WINDOW, omem
                hub.publish(b"c", b"s" * 4000)
                await trio.testing.wait_all_tasks_blocked()
