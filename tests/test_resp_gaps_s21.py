"""Redis port gaps closed: sharded pub/sub, BGREWRITEAOF, ACL WHOAMI, LATENCY.

Each test states, in its docstring, the reply a real ``redis-server`` 7.0.15
(Debian's, ``--save '' --appendonly no``, not cluster mode) gave to the
same commands; the test itself needs no ``redis-server``: it checks KVMemo
against those observed bytes. The hub's shard channels are also tested as a
pure core (no event loop), the Redis port over real sockets on 127.0.0.1
(:func:`test_resp_server.running`), redis-py's sharded API in a thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
from test_bgsave import gate  # noqa: F401 - a fixture: snapshot writes wait on it
from test_persistence_s21 import fail_snapshots
from test_resp_pubsub import small_window_client
from test_resp_server import Client, Running, running

import kvmemo
from kvmemo.commands.table import COMMANDS
from kvmemo.engine.pubsub import Message, PubSubHub
from kvmemo.errors import KVMemoError, OverloadedError, TooLargeError
from kvmemo.server.resp import ErrorReply, Push, Verbatim, encode_command
from kvmemo.storage.slots import key_slot

TIMEOUT = 30  # seconds per test; real sockets and real time

PUBSUB_ONLY = (
    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET"
    " are allowed in this context"
)


def push(*items: bytes | int | None, resp3: bool = False) -> bytes:
    """One pub/sub frame as Redis writes it (RESP2 array, RESP3 push)."""
    out = [(b">" if resp3 else b"*") + b"%d\r\n" % len(items)]
    for item in items:
        if item is None:
            out.append(b"_\r\n" if resp3 else b"$-1\r\n")
        elif isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


async def expect(client: Client, expected: bytes, *commands: tuple[str | bytes, ...]) -> None:
    """Send ``commands`` (pipelined); the next bytes read are exactly ``expected``."""
    request = b"".join(encode_command(*argv) for argv in commands)
    assert await client.raw(request, len(expected)) == expected


async def nothing_more(client: Client) -> None:
    """Nothing else was written before a PING's reply (RESP2, not subscribed)."""
    await expect(client, b"+PONG\r\n", ("PING",))


# -- the hub's shard channels (pure core) ---------------------------------------------------------


def test_shard_channels_are_a_namespace_apart_from_channels_and_patterns() -> None:
    """Redis: after SUBSCRIBE a, PSUBSCRIBE a*, SSUBSCRIBE a on one client,
    ``PUBLISH a x`` answers 2 (``message`` and ``pmessage``, no ``smessage``) and
    ``SPUBLISH a y`` answers 1 (one ``smessage``)."""
    hub = PubSubHub()
    sub = hub.subscriber()
    assert sub.subscribe([b"a"]) == [(b"a", 1)]
    assert sub.psubscribe([b"a*"]) == [(b"a*", 2)]
    assert sub.ssubscribe([b"a"]) == [(b"a", 1)]  # shard channels counted apart
    assert hub.publish(b"a", b"x") == 2
    assert hub.spublish(b"a", b"y") == 1
    assert [(m.kind, m.channel, m.data) for m in sub.take()] == [
        ("message", b"a", b"x"),
        ("pmessage", b"a", b"x"),
        ("smessage", b"a", b"y"),
    ]
    assert hub.spublish(b"ab", b"z") == 0  # a pattern never matches a shard channel
    assert hub.channels() == [b"a"]
    assert hub.shardchannels() == [b"a"]
    assert hub.shardnumsub([b"a", b"b"]) == [(b"a", 1), (b"b", 0)]
    assert hub.numsub([b"a"]) == [(b"a", 1)]
    assert hub.stats()["pubsubshard_channels"] == 1
    assert Message(b"a", b"y", shard=True).kind == "smessage"


def test_shard_confirmations_count_shard_channels_only() -> None:
    """Redis: SSUBSCRIBE a b -> counts 1, 2; then SUBSCRIBE x -> 1 (shard channels not
    counted); SUNSUBSCRIBE -> ``b 1``... down to 0, then ``sunsubscribe nil 0``."""
    hub = PubSubHub()
    sub = hub.subscriber()
    assert sub.ssubscribe([b"a", b"b", b"a"]) == [(b"a", 1), (b"b", 2), (b"a", 2)]
    assert sub.subscribe([b"x"]) == [(b"x", 1)]
    assert (sub.count, sub.shard_count, sub.total) == (1, 2, 3)
    assert sub.change("sunsubscribe", [b"a", b"zz"]) == [(b"a", 1), (b"zz", 1)]
    assert sub.sunsubscribe() == [(b"b", 0)]
    assert sub.sunsubscribe() == [(None, 0)]
    assert hub.shardchannels() == []
    assert sub.unsubscribe() == [(b"x", 0)]


def test_shard_channels_count_against_max_subscriptions() -> None:
    """Like SUBSCRIBE past pubsub_max_subscriptions: the whole SSUBSCRIBE is refused and
    nothing changes (Redis has no such bound; KVMemo's covers every kind)."""
    hub = PubSubHub(max_subscriptions=2)
    sub = hub.subscriber()
    sub.subscribe([b"a"])
    sub.ssubscribe([b"s"])
    with pytest.raises(TooLargeError, match=r"pubsub_max_subscriptions \(2\)"):
        sub.ssubscribe([b"t"])
    with pytest.raises(TooLargeError):
        sub.psubscribe([b"p*"])
    assert (sub.total, hub.shardchannels()) == (2, [b"s"])


def test_an_smessage_past_the_buffer_limit_ends_the_subscriber() -> None:
    """pubsub_buffer_limit covers shard messages: past it the subscriber is ended and
    leaves its shard channels (Redis closes the client at its pubsub output limit)."""
    hub = PubSubHub(limit=200)
    sub = hub.subscriber()
    sub.ssubscribe([b"s"])
    assert hub.spublish(b"s", b"x" * 100) == 1
    assert hub.spublish(b"s", b"x" * 100) == 1  # counted, as Redis counts a dropped client
    assert sub.overflowed
    assert hub.shardnumsub([b"s"]) == [(b"s", 0)]
    assert hub.stats()["pubsub_overflows"] == 1
    with pytest.raises(OverloadedError):
        sub.take()


def test_closing_a_subscriber_leaves_its_shard_channels() -> None:
    hub = PubSubHub()
    sub = hub.subscriber()
    sub.ssubscribe([b"s", b"t"])
    sub.close()
    assert hub.shardchannels() == []
    other = hub.subscriber()
    other.ssubscribe([b"u"])
    hub.close()
    assert hub.shardchannels() == []


# -- sharded pub/sub on the Redis port --------------------------------------------------------


async def test_ssubscribe_and_spublish_in_resp2_byte_for_byte() -> None:
    """Redis (RESP2): ``SSUBSCRIBE a b`` -> ``*3 $10 ssubscribe $1 a :1`` and ``... b :2``;
    ``PUBLISH a hi`` -> ``:0`` and nothing reaches the shard subscriber; ``SPUBLISH a hi``
    -> ``:1`` and ``*3 $8 smessage $1 a $2 hi``; ``SPUBLISH x hi`` -> ``:0``;
    ``PUBSUB SHARDCHANNELS a*`` -> ``*1 $1 a``; ``PUBSUB SHARDNUMSUB a b x c`` ->
    ``a 1 b 1 x 0 c 0``; ``PUBSUB NUMSUB a`` -> ``a 0``; ``SUNSUBSCRIBE a`` ->
    ``sunsubscribe a :1``; ``SUNSUBSCRIBE`` -> ``sunsubscribe b :0``, again ->
    ``sunsubscribe $-1 :0``; ``SUNSUBSCRIBE zz`` -> ``sunsubscribe zz :0``."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            pub = await Client.connect(server)
            await expect(
                sub,
                push(b"ssubscribe", b"a", 1) + push(b"ssubscribe", b"b", 2),
                ("SSUBSCRIBE", "a", "b"),
            )
            await expect(pub, b":0\r\n", ("PUBLISH", "a", "hi"))
            await expect(pub, b":1\r\n", ("SPUBLISH", "a", "hi"))
            await expect(sub, push(b"smessage", b"a", b"hi"))  # and no message before it
            await expect(pub, b":0\r\n", ("SPUBLISH", "x", "hi"))
            await expect(pub, b"*1\r\n$1\r\na\r\n", ("PUBSUB", "SHARDCHANNELS", "a*"))
            await expect(
                pub,
                b"*8\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:1\r\n$1\r\nx\r\n:0\r\n$1\r\nc\r\n:0\r\n",
                ("PUBSUB", "SHARDNUMSUB", "a", "b", "x", "c"),
            )
            await expect(pub, b"*2\r\n$1\r\na\r\n:0\r\n", ("PUBSUB", "NUMSUB", "a"))
            await expect(sub, push(b"sunsubscribe", b"a", 1), ("SUNSUBSCRIBE", "a"))
            await expect(sub, push(b"sunsubscribe", b"b", 0), ("SUNSUBSCRIBE",))
            await expect(sub, push(b"sunsubscribe", None, 0), ("SUNSUBSCRIBE",))
            await expect(sub, push(b"sunsubscribe", b"zz", 0), ("SUNSUBSCRIBE", "zz"))
            await nothing_more(sub)  # out of subscribed mode again


async def test_resp3_pushes_and_an_own_spublish_comes_before_its_count() -> None:
    """Redis (RESP3, after HELLO 3): ``SSUBSCRIBE a b`` -> ``>3 ssubscribe a :1``,
    ``>3 ssubscribe b :2``; ``SPUBLISH a m1`` from the same client -> ``>3 smessage a m1``
    then ``:1``; ``GET k`` -> ``_``; ``PING`` -> ``+PONG``; ``SUNSUBSCRIBE b a`` pushes
    ``b :1`` and ``a :0``; ``SUNSUBSCRIBE`` then -> ``>3 sunsubscribe _ :0``."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert isinstance(await client.call("HELLO", "3"), dict)
            await expect(
                client,
                push(b"ssubscribe", b"a", 1, resp3=True) + push(b"ssubscribe", b"b", 2, resp3=True),
                ("SSUBSCRIBE", "a", "b"),
            )
            await expect(
                client,
                push(b"smessage", b"a", b"m1", resp3=True) + b":1\r\n",
                ("SPUBLISH", "a", "m1"),
            )
            await expect(client, b"_\r\n", ("GET", "k"))
            await expect(client, b"+PONG\r\n", ("PING",))
            await expect(
                client,
                push(b"sunsubscribe", b"b", 1, resp3=True)
                + push(b"sunsubscribe", b"a", 0, resp3=True),
                ("SUNSUBSCRIBE", "b", "a"),
            )
            await expect(client, push(b"sunsubscribe", None, 0, resp3=True), ("SUNSUBSCRIBE",))


async def test_resp2_subscribed_mode_holds_with_only_shard_channels() -> None:
    """Redis (RESP2), a client with only ``SSUBSCRIBE q``: ``GET k`` and ``SPUBLISH a z`` are
    refused ("Can't execute 'get': only (P|S)SUBSCRIBE / ... allowed in this context");
    ``PING`` -> ``*2 pong ""``; ``UNSUBSCRIBE`` -> ``unsubscribe $-1 :0`` and the client
    stays in subscribed mode; ``SUNSUBSCRIBE`` -> ``sunsubscribe q :0``; ``GET k`` ->
    ``$-1``. Before this change SSUBSCRIBE was an unknown command."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SSUBSCRIBE", "q") == [b"ssubscribe", b"q", 1]
            assert await client.call("GET", "k") == ErrorReply(PUBSUB_ONLY.format("get"))
            assert await client.call("SPUBLISH", "a", "z") == ErrorReply(
                PUBSUB_ONLY.format("spublish")
            )
            assert await client.call("PUBSUB", "SHARDNUMSUB") == ErrorReply(
                PUBSUB_ONLY.format("pubsub|shardnumsub")
            )
            assert await client.call("PING") == [b"pong", b""]
            await expect(client, push(b"unsubscribe", None, 0), ("UNSUBSCRIBE",))
            assert await client.call("GET", "k") == ErrorReply(PUBSUB_ONLY.format("get"))
            await expect(client, push(b"sunsubscribe", b"q", 0), ("SUNSUBSCRIBE",))
            assert await client.call("GET", "k") is None


async def test_one_ssubscribe_may_name_channels_of_different_slots() -> None:
    """Redis outside cluster mode accepts ``SSUBSCRIBE a b`` (slots 15495 and 3300)
    with no CROSSSLOT error; KVMemo is one node holding every slot, so it does too."""
    assert key_slot(b"a") != key_slot(b"b")
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await expect(
                client,
                push(b"ssubscribe", b"a", 1) + push(b"ssubscribe", b"b", 2),
                ("SSUBSCRIBE", "a", "b"),
            )


async def test_client_list_info_and_stats_count_shard_channels() -> None:
    """Redis: a client after SSUBSCRIBE a b, SUBSCRIBE x, PSUBSCRIBE p* shows
    ``flags=P ... sub=1 psub=1 ssub=2`` in CLIENT LIST; with only shard channels,
    ``flags=P sub=0 psub=0 ssub=2``; INFO stats has ``pubsubshard_channels:``.
    Before: ``ssub=0`` always."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            admin = await Client.connect(server)
            await sub.call("HELLO", "3")  # CLIENT INFO of its own, below
            assert await sub.call("SSUBSCRIBE", "a", "b") == Push([b"ssubscribe", b"a", 1])
            assert await sub.reply() == Push([b"ssubscribe", b"b", 2])
            info = await sub.call("CLIENT", "INFO")
            assert isinstance(info, Verbatim)
            assert " flags=P " in info.text
            assert " sub=0 psub=0 ssub=2 " in info.text
            assert await sub.call("SUBSCRIBE", "x") == Push([b"subscribe", b"x", 1])
            assert await sub.call("PSUBSCRIBE", "p*") == Push([b"psubscribe", b"p*", 2])
            listing = await admin.call("CLIENT", "LIST", "TYPE", "pubsub")
            assert isinstance(listing, bytes)
            assert b" flags=P db=0 sub=1 psub=1 ssub=2 multi=-1 " in listing
            stats = await admin.call("INFO", "stats")
            assert isinstance(stats, bytes)
            assert b"\r\npubsub_channels:1\r\npubsub_patterns:1\r\npubsubshard_channels:2\r\n" in (
                stats
            )


async def test_reset_and_a_closed_connection_leave_the_shard_channels() -> None:
    """Redis: ``SSUBSCRIBE r`` then ``RESET`` -> ``+RESET`` (no confirmation) and
    ``PUBSUB SHARDNUMSUB r`` -> ``r 0``."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            admin = await Client.connect(server)
            await expect(
                sub, push(b"ssubscribe", b"r", 1) + b"+RESET\r\n", ("SSUBSCRIBE", "r"), ("RESET",)
            )
            assert await admin.call("PUBSUB", "SHARDNUMSUB", "r") == [b"r", 0]
            assert await sub.call("SSUBSCRIBE", "s") == [b"ssubscribe", b"s", 1]
            assert await admin.call("PUBSUB", "SHARDNUMSUB", "s") == [b"s", 1]
            await sub.aclose()
            while await admin.call("PUBSUB", "SHARDNUMSUB", "s") != [b"s", 0]:
                await trio.lowlevel.checkpoint()  # each round trip lets the server see the close


async def test_inside_multi_ssubscribe_is_refused_by_exec_and_spublish_runs() -> None:
    """Redis: ``MULTI``, ``SSUBSCRIBE z`` -> ``+QUEUED``, ``GET k`` -> ``+QUEUED``, ``EXEC`` ->
    ``*2 -ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING client $-1``; ``MULTI``,
    ``SPUBLISH z q``, ``PUBSUB SHARDNUMSUB z``, ``PUBSUB SHARDCHANNELS``, ``EXEC`` ->
    ``*3 :0 *2 z :0 *0``. (Redis queues SUNSUBSCRIBE and runs it inside EXEC, which
    miscounts EXEC's array with several channels: KVMemo refuses it there, as it
    refuses UNSUBSCRIBE.) Before: SSUBSCRIBE and SPUBLISH were unknown commands."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await expect(
                client,
                b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
                b"*2\r\n-ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING client\r\n$-1\r\n",
                ("MULTI",),
                ("SSUBSCRIBE", "z"),
                ("GET", "k"),
                ("EXEC",),
            )
            await expect(
                client,
                b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n:0\r\n*2\r\n$1\r\nz\r\n:0\r\n*0\r\n",
                ("MULTI",),
                ("SPUBLISH", "z", "q"),
                ("PUBSUB", "SHARDNUMSUB", "z"),
                ("PUBSUB", "SHARDCHANNELS"),
                ("EXEC",),
            )
            await expect(
                client,
                b"+OK\r\n-ERR Command not allowed inside a transaction\r\n"
                b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                ("MULTI",),
                ("SUNSUBSCRIBE", "z"),
                ("EXEC",),
            )
            await nothing_more(client)  # never subscribed


async def test_sharded_pubsub_argument_errors_are_redis_words() -> None:
    """Redis: ``SSUBSCRIBE`` -> ``-ERR wrong number of arguments for 'ssubscribe' command``;
    ``SPUBLISH x`` -> same for 'spublish'; ``PUBSUB SHARDCHANNELS x y`` -> ``-ERR unknown
    subcommand or wrong number of arguments for 'shardchannels'. Try PUBSUB HELP.``;
    ``PUBSUB SHARDNUMSUB`` -> ``*0``; ``PUBSUB SHARDCHANNELS`` (nothing active) -> ``*0``;
    ``PUBSUB HELP`` has 14 lines, SHARDCHANNELS and SHARDNUMSUB among them."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("SSUBSCRIBE") == ErrorReply(
                "ERR wrong number of arguments for 'ssubscribe' command"
            )
            assert await client.call("SPUBLISH", "x") == ErrorReply(
                "ERR wrong number of arguments for 'spublish' command"
            )
            assert await client.call("PUBSUB", "SHARDCHANNELS", "x", "y") == ErrorReply(
                "ERR unknown subcommand or wrong number of arguments for 'shardchannels'."
                " Try PUBSUB HELP."
            )
            assert await client.call("PUBSUB", "SHARDNUMSUB") == []
            assert await client.call("PUBSUB", "shardchannels") == []
            help_lines = await client.call("PUBSUB", "HELP")
            assert isinstance(help_lines, list)
            assert len(help_lines) == 14
            assert help_lines[8:12] == [
                "SHARDCHANNELS [<pattern>]",
                "    Return the currently active shard level channels matching a <pattern>"
                " (default: '*').",
                "SHARDNUMSUB [<shardchannel> ...]",
                "    Return the number of subscribers for the specified shard level channel(s)",
            ]


async def test_ssubscribe_past_max_subscriptions_is_an_error_and_changes_nothing() -> None:
    """KVMemo's own bound (Redis has none): refused whole, as SUBSCRIBE past it is."""
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_max_subscriptions=2) as server:
            client = await Client.connect(server)
            assert await client.call("SUBSCRIBE", "a") == [b"subscribe", b"a", 1]
            reply = await client.call("SSUBSCRIBE", "s", "t")
            assert isinstance(reply, ErrorReply)
            assert "pubsub_max_subscriptions (2)" in reply.message
            assert await client.call("SSUBSCRIBE", "s") == [b"ssubscribe", b"s", 1]
            admin = await Client.connect(server)
            assert await admin.call("PUBSUB", "SHARDNUMSUB", "s", "t") == [b"s", 1, b"t", 0]


async def test_a_first_refused_ssubscribe_leaves_the_connection_unsubscribed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_max_subscriptions=1) as server:
            client = await Client.connect(server)
            assert isinstance(await client.call("SSUBSCRIBE", "s", "t"), ErrorReply)
            assert await client.call("GET", "k") is None  # not in subscribed mode


async def test_a_slow_shard_subscriber_past_the_buffer_limit_is_closed_alone() -> None:
    """pubsub_buffer_limit covers smessages as messages: past it the reader that does not
    read is disconnected (Redis's client-output-buffer-limit pubsub), the others not."""
    payload = b"y" * 4096
    with trio.fail_after(TIMEOUT):
        async with running(pubsub_buffer_limit=64 * 1024) as server:
            slow = await small_window_client(server.host, server.port)
            assert await slow.call("SSUBSCRIBE", "c") == [b"ssubscribe", b"c", 1]
            fast = await Client.connect(server)
            assert await fast.call("SSUBSCRIBE", "c") == [b"ssubscribe", b"c", 1]
            pub = await Client.connect(server)
            while await pub.call("PUBSUB", "SHARDNUMSUB", "c") == [b"c", 2]:
                assert await pub.call("SPUBLISH", "c", payload) == 2
                assert await fast.reply() == [b"smessage", b"c", payload]
            assert server.engine.pubsub.stats()["pubsub_overflows"] == 1
            assert await slow.closed()
            assert await pub.call("SPUBLISH", "c", "after") == 1
            assert await fast.reply() == [b"smessage", b"c", b"after"]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_redis_py_sharded_pubsub(protocol: int) -> None:
    """redis-py 8.1 against Redis 7.0 (both protocols) gave exactly the list asserted here:
    ssubscribe confirmations 1 and 2, ``spublish`` 1, ``publish`` 0, one ``smessage``,
    ``pubsub_shardchannels`` [news, sport], ``pubsub_shardnumsub`` [(news, 1), (x, 0)],
    and a ``sunsubscribe`` confirmation with count 1."""

    def session(port: int) -> list[Any]:
        r = redis.Redis(port=port, protocol=protocol)
        p = r.pubsub()
        try:
            p.ssubscribe("news", "sport")
            seen: list[Any] = [p.get_sharded_message(timeout=5), p.get_sharded_message(timeout=5)]
            seen.append(r.spublish("news", "hi"))
            seen.append(r.publish("news", "no"))
            seen.append(p.get_sharded_message(timeout=5))
            seen.append(sorted(r.pubsub_shardchannels()))
            seen.append(r.pubsub_shardnumsub("news", "x"))
            p.sunsubscribe("news")
            seen.append(p.get_sharded_message(timeout=5))
        finally:
            p.close()
            r.close()
        return seen

    with trio.fail_after(TIMEOUT):
        async with running() as server:
            seen = await trio.to_thread.run_sync(session, server.port)
    assert seen == [
        {"type": "ssubscribe", "pattern": None, "channel": b"news", "data": 1},
        {"type": "ssubscribe", "pattern": None, "channel": b"sport", "data": 2},
        1,
        0,
        {"type": "smessage", "pattern": None, "channel": b"news", "data": b"hi"},
        [b"news", b"sport"],
        [(b"news", 1), (b"x", 0)],
        {"type": "sunsubscribe", "pattern": None, "channel": b"news", "data": 1},
    ]


async def test_spublish_over_the_embedded_api_reaches_the_redis_ports_shard_subscribers() -> None:
    """One hub: the table's ``spublish`` (embedded, WebSocket) reaches SSUBSCRIBE clients."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            sub = await Client.connect(server)
            assert await sub.call("SSUBSCRIBE", "s") == [b"ssubscribe", b"s", 1]
            assert await server.engine.execute("spublish", [b"s", b"hello"]) == 1
            assert await sub.reply() == [b"smessage", b"s", b"hello"]
            assert await server.engine.execute("publish", [b"s", b"no"]) == 0


# -- COMMAND's view of the new commands ---------------------------------------------------------

NEW_COMMANDS = [b"acl", b"bgrewriteaof", b"latency", b"spublish", b"ssubscribe", b"sunsubscribe"]


async def test_the_new_commands_are_in_command_list_count_info_and_docs() -> None:
    """Redis's COMMAND INFO: ``ssubscribe -2 [pubsub noscript loading stale] 1 -1 1
    [@pubsub @slow]`` and ``sunsubscribe -1 ...`` with one key spec whose flags are
    ``[not_key]`` (index 1, range lastkey -1); ``spublish 3 [pubsub loading stale fast]
    1 1 1 [@pubsub @fast]``, key spec ``[not_key]`` lastkey 0; ``bgrewriteaof 1 [admin
    noscript ...] 0 0 0``; ``acl -2``, ``latency -2`` (containers); ``COMMAND GETKEYS
    spublish a b`` and ``... ssubscribe a b`` -> ``-ERR The command has no key arguments``;
    COMMAND DOCS: ssubscribe since 7.0.0 group pubsub, acl since 6.0.0 and latency since
    2.8.13 group server, bgrewriteaof group server."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            names = await client.call("COMMAND", "LIST")
            assert isinstance(names, list)
            assert set(NEW_COMMANDS) <= set(names)
            assert {b"pubsub|shardchannels", b"pubsub|shardnumsub"} <= set(names)
            assert await client.call("COMMAND", "COUNT") == len([n for n in names if b"|" not in n])
            infos = await client.call("COMMAND", "INFO", "ssubscribe", "sunsubscribe", "spublish")
            assert isinstance(infos, list)

            # RESP2: maps as flat arrays, flags and categories as simple strings.
            def spec(lastkey: int) -> list[object]:
                return [
                    b"flags",
                    ["not_key"],
                    b"begin_search",
                    [b"type", b"index", b"spec", [b"index", 1]],
                    b"find_keys",
                    [b"type", b"range", b"spec", [b"lastkey", lastkey, b"keystep", 1, b"limit", 0]],
                ]

            flags = ["pubsub", "noscript", "loading", "stale"]
            slow = ["@pubsub", "@slow"]
            assert infos[0][:9] == [b"ssubscribe", -2, flags, 1, -1, 1, slow, [], [spec(-1)]]
            assert infos[1][:9] == [b"sunsubscribe", -1, flags, 1, -1, 1, slow, [], [spec(-1)]]
            fast = ["pubsub", "loading", "stale", "fast"]
            assert infos[2][:9] == [
                b"spublish",
                3,
                fast,
                1,
                1,
                1,
                ["@pubsub", "@fast"],
                [],
                [spec(0)],
            ]
            for argv in (("spublish", "a", "b"), ("ssubscribe", "a", "b")):
                assert await client.call("COMMAND", "GETKEYS", *argv) == ErrorReply(
                    "ERR The command has no key arguments"
                )
            infos = await client.call("COMMAND", "INFO", "bgrewriteaof", "acl", "latency")
            assert isinstance(infos, list)
            assert [info[:6] for info in infos] == [
                [b"bgrewriteaof", 1, ["admin", "noscript"], 0, 0, 0],
                # Containers, as Redis 7 lists them: no flags of their own (their
                # subcommands have them: tests/test_resp_s22.py).
                [b"acl", -2, [], 0, 0, 0],
                [b"latency", -2, [], 0, 0, 0],
            ]
            docs = await client.call("COMMAND", "DOCS", *(n.decode() for n in NEW_COMMANDS))
            assert isinstance(docs, list)
            got = {
                name: dict(zip(doc[::2], doc[1::2], strict=True))
                for name, doc in zip(docs[::2], docs[1::2], strict=True)
            }
            assert {name: (d[b"group"], d[b"since"]) for name, d in got.items()} == {
                b"acl": (b"server", b"6.0.0"),
                b"bgrewriteaof": (b"server", b"1.5.0"),  # KVMemo's protocol version
                b"latency": (b"server", b"2.8.13"),
                b"spublish": (b"pubsub", b"1.5.0"),
                b"ssubscribe": (b"pubsub", b"7.0.0"),
                b"sunsubscribe": (b"pubsub", b"7.0.0"),
            }
            pubsub = await client.call("COMMAND", "LIST", "FILTERBY", "ACLCAT", "pubsub")
            assert isinstance(pubsub, list)
            assert {b"ssubscribe", b"sunsubscribe", b"spublish"} <= set(pubsub)


def test_the_table_declares_spublish_and_bgrewriteaof_without_keys() -> None:
    """A shard channel routes to no shard (it is not a key of the keyspace)."""
    for name in ("spublish", "bgrewriteaof"):
        assert (COMMANDS[name].first_key, COMMANDS[name].since) == (0, "1.5")
    assert {sub.name for sub in COMMANDS["pubsub"].subcommands} >= {"shardchannels", "shardnumsub"}


# -- ACL --------------------------------------------------------------------------------------


async def test_acl_whoami_users_help_and_unknown_subcommands() -> None:
    """Redis: ``ACL WHOAMI`` -> ``$7 default`` (RESP2 and RESP3); ``ACL USERS`` -> ``*1 $7
    default``; ``ACL WHOAMI x`` -> ``-ERR wrong number of arguments for 'acl|whoami'
    command``; ``ACL`` -> ``-ERR wrong number of arguments for 'acl' command``; ``ACL foo``
    -> ``-ERR unknown subcommand 'foo'. Try ACL HELP.``; ``MULTI``, ``ACL WHOAMI``,
    ``EXEC`` -> ``*1 $7 default``. Before: ``ERR unknown command 'ACL'``."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await expect(client, b"$7\r\ndefault\r\n", ("ACL", "WHOAMI"))
            await expect(client, b"$7\r\ndefault\r\n", ("acl", "whoami"))
            await expect(client, b"*1\r\n$7\r\ndefault\r\n", ("ACL", "USERS"))
            assert await client.call("ACL", "WHOAMI", "x") == ErrorReply(
                "ERR wrong number of arguments for 'acl|whoami' command"
            )
            assert await client.call("ACL") == ErrorReply(
                "ERR wrong number of arguments for 'acl' command"
            )
            for sub in ("foo", "CAT", "SETUSER", "LIST"):
                assert await client.call("ACL", sub) == ErrorReply(
                    f"ERR unknown subcommand '{sub}'. Try ACL HELP."
                )
            help_lines = await client.call("ACL", "HELP")
            assert isinstance(help_lines, list)
            assert help_lines[0] == "ACL <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
            assert "WHOAMI" in help_lines
            assert "    Prints this help." in help_lines
            await expect(
                client,
                b"+OK\r\n+QUEUED\r\n*1\r\n$7\r\ndefault\r\n",
                ("MULTI",),
                ("ACL", "WHOAMI"),
                ("EXEC",),
            )
            assert await client.call("HELLO", "3")
            await expect(client, b"$7\r\ndefault\r\n", ("ACL", "WHOAMI"))


async def test_acl_whoami_needs_authentication_when_a_password_is_set() -> None:
    """Redis with ``--requirepass``: ``ACL WHOAMI`` before AUTH -> ``-NOAUTH Authentication
    required.``; after ``AUTH pw`` -> ``default``."""
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"pw"})) as server:
            client = await Client.connect(server)
            assert await client.call("ACL", "WHOAMI") == ErrorReply(
                "NOAUTH Authentication required."
            )
            assert await client.call("AUTH", "pw") == "OK"
            assert await client.call("ACL", "WHOAMI") == b"default"


# -- LATENCY ----------------------------------------------------------------------------------


async def test_latency_answers_as_redis_with_no_event_recorded() -> None:
    """Redis (latency-monitor-threshold 0, no event): ``LATENCY LATEST`` -> ``*0``;
    ``LATENCY HISTORY command`` -> ``*0``; ``LATENCY RESET`` and ``LATENCY RESET a b`` ->
    ``:0``; ``LATENCY GRAPH command`` -> ``-ERR No samples available for event 'command'``;
    ``LATENCY HISTORY`` -> ``-ERR wrong number of arguments for 'latency|history'
    command``; ``LATENCY`` -> ``... for 'latency' command``; ``LATENCY foo`` -> ``-ERR
    unknown subcommand 'foo'. Try LATENCY HELP.``; ``LATENCY DOCTOR`` -> a bulk string
    (RESP3: verbatim ``=...txt:``) saying latency monitoring is disabled. KVMemo has no
    latency monitor at all, so these answers always hold, and DOCTOR and HELP say so.
    Before: ``ERR unknown command 'LATENCY'``."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            await expect(client, b"*0\r\n", ("LATENCY", "LATEST"))
            await expect(client, b"*0\r\n", ("LATENCY", "HISTORY", "command"))
            await expect(client, b":0\r\n", ("LATENCY", "RESET"))
            await expect(client, b":0\r\n", ("latency", "reset", "a", "b"))
            await expect(
                client,
                b"-ERR No samples available for event 'command'\r\n",
                ("LATENCY", "GRAPH", "command"),
            )
            assert await client.call("LATENCY", "HISTORY") == ErrorReply(
                "ERR wrong number of arguments for 'latency|history' command"
            )
            assert await client.call("LATENCY") == ErrorReply(
                "ERR wrong number of arguments for 'latency' command"
            )
            for sub in ("foo", "HISTOGRAM"):
                assert await client.call("LATENCY", sub) == ErrorReply(
                    f"ERR unknown subcommand '{sub}'. Try LATENCY HELP."
                )
            doctor = await client.call("LATENCY", "DOCTOR")
            assert isinstance(doctor, bytes)
            assert doctor.startswith(b"KVMemo has no latency monitor")
            assert b"/metrics" in doctor
            help_lines = await client.call("LATENCY", "HELP")
            assert isinstance(help_lines, list)
            assert help_lines[:2] == [
                "LATENCY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "DOCTOR",
            ]
            assert any("no latency monitor" in line for line in help_lines)
            assert "HISTOGRAM [COMMAND ...]" not in help_lines
            await client.call("HELLO", "3")
            doctor3 = await client.call("LATENCY", "DOCTOR")
            assert isinstance(doctor3, Verbatim)
            assert doctor3.text == doctor.decode()
            await expect(client, b"*0\r\n", ("LATENCY", "LATEST"))


# -- BGREWRITEAOF -------------------------------------------------------------------------------


async def info_persistence(client: Client) -> dict[str, str]:
    text = await client.call("INFO", "persistence")
    assert isinstance(text, bytes)
    lines = text.decode().splitlines()[1:]
    return dict(line.split(":", 1) for line in lines if line)


def rewrite_fields(fields: dict[str, str]) -> tuple[str, str, str]:
    return (
        fields["aof_rewrite_in_progress"],
        fields["aof_rewrite_scheduled"],
        fields["aof_last_bgrewrite_status"],
    )


async def finish_rewrite(server: Running) -> None:
    for ticket in server.engine._rewrite.tickets:
        await ticket.done.wait()


async def test_bgrewriteaof_without_persistence_is_refused_as_bgsave_is() -> None:
    """Redis with ``--appendonly no`` answers ``+Background append only file rewriting
    started`` (it writes an AOF all the same); KVMemo without a data directory has no log
    to compact and answers as its BGSAVE does: ``-ERR persistence is not enabled on this
    server``; INFO keeps ``aof_rewrite_in_progress:0`` and ``aof_last_bgrewrite_status:ok``
    (Redis's fields, as Redis prints them before any rewrite). ``BGREWRITEAOF x`` ->
    ``-ERR wrong number of arguments for 'bgrewriteaof' command``. Before: unknown
    command."""
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("BGREWRITEAOF") == ErrorReply(
                "ERR persistence is not enabled on this server"
            )
            assert await client.call("BGREWRITEAOF", "x") == ErrorReply(
                "ERR wrong number of arguments for 'bgrewriteaof' command"
            )
            assert rewrite_fields(await info_persistence(client)) == ("0", "0", "ok")
    async with kvmemo.open_store(shards=2) as kv:
        with pytest.raises(KVMemoError) as caught:
            await kv.execute("bgrewriteaof")
        assert caught.value.kind == "DISABLED"


async def test_bgrewriteaof_compacts_the_logs_and_reports_its_progress(
    tmp_path: Path,
    gate: threading.Event,  # noqa: F811 - the imported fixture
) -> None:
    """Redis (a large dataset, so that the rewrite lasts): ``BGREWRITEAOF`` -> ``+Background
    append only file rewriting started``; again at once -> ``-ERR Background append only
    file rewriting already in progress``; ``BGSAVE`` -> ``-ERR Another child process is
    active (AOF?): can't BGSAVE right now. Use BGSAVE SCHEDULE in order to schedule a BGSAVE
    whenever possible.``; ``BGSAVE SCHEDULE`` -> ``+Background saving scheduled``; INFO
    meanwhile ``aof_rewrite_in_progress:1``, after ``0`` with
    ``aof_last_bgrewrite_status:ok``."""
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path), shards=2) as server:
            client = await Client.connect(server)
            for i in range(20):
                assert await client.call("SET", f"k{i}", "v") == "OK"
            before = await info_persistence(client)
            assert rewrite_fields(before) == ("0", "0", "ok")
            assert int(before["aof_current_size"]) > 0
            assert (
                await client.call("BGREWRITEAOF") == "Background append only file rewriting started"
            )
            assert rewrite_fields(await info_persistence(client)) == ("1", "0", "ok")
            assert await client.call("BGREWRITEAOF") == ErrorReply(
                "ERR Background append only file rewriting already in progress"
            )
            assert await client.call("BGSAVE") == ErrorReply(
                "ERR Another child process is active (AOF?): can't BGSAVE right now."
                " Use BGSAVE SCHEDULE in order to schedule a BGSAVE whenever possible."
            )
            assert await client.call("SET", "late", "x") == "OK"  # the shards keep serving
            gate.set()
            await finish_rewrite(server)
            after = await info_persistence(client)
            assert rewrite_fields(after) == ("0", "0", "ok")
            assert after["rdb_bgsave_in_progress"] == "0"  # BGSAVE was refused, not queued
            # The snapshots cover the logs: only the write made after they copied remains.
            assert 0 < int(after["aof_current_size"]) < int(before["aof_current_size"])
            assert await client.call("BGSAVE", "SCHEDULE") == "Background saving started"
            for ticket in server.engine._bgsave:
                await ticket.done.wait()
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            assert await kv.dbsize() == 21


async def test_bgsave_schedule_during_a_rewrite_is_scheduled(
    tmp_path: Path,
    gate: threading.Event,  # noqa: F811
) -> None:
    """Redis: during a rewrite, ``BGSAVE SCHEDULE`` -> ``+Background saving scheduled``."""
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set("a", "1")
            assert (
                await kv.execute("bgrewriteaof") == "Background append only file rewriting started"
            )
            assert await kv.execute("bgsave", "SCHEDULE") == "Background saving scheduled"
            section = (await kv.info("persistence"))["persistence"]
            assert (section["bgrewriteaof_in_progress"], section["bgsave_in_progress"]) == (
                True,
                True,
            )
            gate.set()
            for ticket in kv.engine._bgsave:
                await ticket.done.wait()
            section = (await kv.info("persistence"))["persistence"]
            assert section["last_bgrewriteaof_status"] == "ok"
            assert section["last_bgsave_status"] == "ok"


async def test_bgrewriteaof_during_a_bgsave_is_scheduled_behind_it(
    tmp_path: Path,
    gate: threading.Event,  # noqa: F811
) -> None:
    """Redis: ``BGSAVE`` -> ``+Background saving started``; ``BGREWRITEAOF`` ->
    ``+Background append only file rewriting scheduled``, and again ->
    ``+Background append only file rewriting scheduled``; INFO meanwhile
    ``rdb_bgsave_in_progress:1 aof_rewrite_in_progress:0 aof_rewrite_scheduled:1``;
    once both ran, ``aof_rewrite_scheduled:0`` and ``aof_last_bgrewrite_status:ok``."""
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path), shards=2) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"
            assert await client.call("BGSAVE") == "Background saving started"
            scheduled = "Background append only file rewriting scheduled"
            assert await client.call("BGREWRITEAOF") == scheduled
            tickets = list(server.engine._rewrite.tickets)
            assert await client.call("BGREWRITEAOF") == scheduled
            assert server.engine._rewrite.tickets == tickets  # nothing more was asked for
            fields = await info_persistence(client)
            assert fields["rdb_bgsave_in_progress"] == "1"
            assert rewrite_fields(fields) == ("0", "1", "ok")
            gate.set()
            await finish_rewrite(server)
            fields = await info_persistence(client)
            assert rewrite_fields(fields) == ("0", "0", "ok")
            assert fields["rdb_bgsave_in_progress"] == "0"


async def test_a_failed_rewrite_shows_in_its_own_status_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Redis keeps ``aof_last_bgrewrite_status`` apart from ``aof_last_write_status``:
    a rewrite whose snapshot fails reports ``err`` there, the log's status stays ``ok``,
    and the next rewrite that succeeds brings it back to ``ok``."""
    switch = fail_snapshots(monkeypatch)
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path), shards=2) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"
            assert (
                await client.call("BGREWRITEAOF") == "Background append only file rewriting started"
            )
            await finish_rewrite(server)
            fields = await info_persistence(client)
            assert rewrite_fields(fields) == ("0", "0", "err")
            assert fields["aof_last_write_status"] == "ok"
            switch(False)
            assert (
                await client.call("BGREWRITEAOF") == "Background append only file rewriting started"
            )
            # While the next one runs, the last finished one's outcome is shown.
            assert (await info_persistence(client))["aof_last_bgrewrite_status"] in ("err", "ok")
            await finish_rewrite(server)
            assert rewrite_fields(await info_persistence(client)) == ("0", "0", "ok")
