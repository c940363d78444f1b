"""Protocol 1.4 over WebSocket: ``subscribe``, ``psubscribe``, ``unsubscribe``, ``punsubscribe``.

Raw JSON-RPC against a real in-process server (127.0.0.1, port 0): reply
and push shapes, order (a subscription's reply before its messages, no
message of a channel after the reply that left it, publish order per
channel), NOAUTH, errors, batches; the Python client's subscription against
the embedded store's (one scenario, both APIs); a slow reader closed alone
with 1008; subscriptions gone with the session.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio.testing
from test_client import TEST_TIMEOUT, kv, node  # noqa: F401 - fixtures
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import kvmemo
from kvmemo.client import Client, DisconnectedError, connect
from kvmemo.config import StoreConfig
from kvmemo.engine.pubsub import MESSAGE_OVERHEAD, Message
from kvmemo.errors import KVMemoError, OverloadedError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig


class Raw:
    """JSON-RPC by hand on one WebSocket session; pushes are kept apart from responses."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.pushes: list[dict[str, Any]] = []

    async def send(self, document: object) -> None:
        await self.ws.send_message(json.dumps(document))

    async def receive(self) -> Any:
        return json.loads(await self.ws.get_message())

    async def call(self, method: str, params: object) -> dict[str, Any]:
        """One request; the pushes that come before its response go to ``pushes``."""
        self.next_id += 1
        await self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.receive()
            if "id" in message:
                assert message["id"] == self.next_id
                return dict(message)
            self.pushes.append(message)

    async def result(self, method: str, *params: object) -> Any:
        response = await self.call(method, list(params))
        assert "error" not in response, response
        return response["result"]


def push(channel: str, data: str, pattern: str | None = None) -> dict[str, Any]:
    if pattern is None:
        return {"jsonrpc": "2.0", "method": "message", "params": [channel, data]}
    return {"jsonrpc": "2.0", "method": "pmessage", "params": [pattern, channel, data]}


@pytest.fixture
async def raw(node: Node) -> AsyncIterator[Raw]:  # noqa: F811 - the imported fixture
    async with open_websocket_url(node.url) as ws:
        yield Raw(ws)


async def publish(node: Node, channel: bytes, data: bytes) -> int:  # noqa: F811
    """PUBLISH from the embedded side (the engine's command path)."""
    receivers: int = await node.engine.execute("publish", [channel, data])
    return receivers


# -- the wire ----------------------------------------------------------------------------


async def test_replies_are_redis_triples_and_pushes_are_notifications(
    node: Node,  # noqa: F811
    raw: Raw,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await raw.result("subscribe", "news", "news", "b") == [
            ["subscribe", "news", 1],
            ["subscribe", "news", 1],  # again is a no-op, answered as Redis does
            ["subscribe", "b", 2],
        ]
        assert await raw.result("psubscribe", "n*") == [["psubscribe", "n*", 3]]
        assert await publish(node, b"news", b"hello") == 2
        # One publish: the channel's own message, then the pattern's; exact text.
        assert await raw.ws.get_message() == (
            '{"jsonrpc":"2.0","method":"message","params":["news","hello"]}'
        )
        assert await raw.receive() == push("news", "hello", "n*")
        # Strings exactly as bulk-string results: UTF-8, bad bytes as U+FFFD.
        odd = "h\u00e9 \u2603 \U0001f600".encode() + b" \xff\xfe"
        await node.engine.execute("set", [b"odd", odd])
        as_result = await raw.result("get", "odd")
        assert await publish(node, b"b", odd) == 1
        assert await raw.receive() == push("b", as_result)
        assert as_result.endswith("\ufffd\ufffd")


async def test_unsubscribe_forms_follow_redis(raw: Raw) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert await raw.result("unsubscribe") == [["unsubscribe", None, 0]]
        assert await raw.result("punsubscribe") == [["punsubscribe", None, 0]]
        await raw.result("subscribe", "a", "b", "c")
        await raw.result("psubscribe", "p*", "q*")
        assert await raw.result("unsubscribe", "b", "zz") == [
            ["unsubscribe", "b", 4],
            ["unsubscribe", "zz", 4],  # not subscribed: the count, unchanged
        ]
        assert await raw.result("unsubscribe") == [["unsubscribe", "a", 3], ["unsubscribe", "c", 2]]
        assert await raw.result("unsubscribe") == [["unsubscribe", None, 2]]
        assert await raw.result("punsubscribe", "q*") == [["punsubscribe", "q*", 1]]
        assert await raw.result("punsubscribe") == [["punsubscribe", "p*", 0]]
        assert raw.pushes == []


async def test_bad_requests_get_errors_and_change_nothing(node: Node, raw: Raw) -> None:  # noqa: F811
    with trio.fail_after(TEST_TIMEOUT):
        for method in ("subscribe", "psubscribe"):
            error = (await raw.call(method, []))["error"]
            assert error["data"]["kind"] == "ARITY"
            assert error["message"] == f"wrong number of arguments for '{method}' command"
        bad = await raw.call("subscribe", [{"no": "objects"}])
        assert bad["error"]["data"]["kind"] == "INVALID_REQUEST"
        case = await raw.call("SUBSCRIBE", ["a"])  # methods are lower case on this port
        assert case["error"]["data"]["kind"] == "UNKNOWN_METHOD"
        in_transaction = await raw.call("transaction", [["subscribe", "a"]])
        assert in_transaction["error"]["data"] == {"kind": "UNKNOWN_METHOD", "index": 0}
        assert node.engine.pubsub.channels() == []
        methods = await raw.result("command.list")
        assert {"subscribe", "unsubscribe", "psubscribe", "punsubscribe", "publish"} <= set(methods)


async def test_a_subscribed_session_runs_every_other_method(node: Node, raw: Raw) -> None:  # noqa: F811
    with trio.fail_after(TEST_TIMEOUT):
        await raw.result("subscribe", "c")
        assert await raw.result("set", "k", "v") == "OK"
        assert await raw.result("get", "k") == "v"
        assert await raw.result("pubsub", "numsub", "c") == ["c", 1]
        assert await raw.result("transaction", ["incr", "n"], ["publish", "c", "in tx"]) == [1, 1]
        assert await raw.result("publish", "c", "mine") == 1  # it hears itself
        while len(raw.pushes) < 2:
            raw.pushes.append(await raw.receive())
        assert raw.pushes == [push("c", "in tx"), push("c", "mine")]


async def test_a_batch_answers_its_subscribe_before_the_message_it_brings(raw: Raw) -> None:
    """The publish in the batch reaches the session before the batch's answer is written."""
    with trio.fail_after(TEST_TIMEOUT):
        await raw.send(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": ["x"]},
                {"jsonrpc": "2.0", "id": 2, "method": "publish", "params": ["x", "m"]},
                {"jsonrpc": "2.0", "method": "psubscribe", "params": ["x*"]},  # notification
                {"jsonrpc": "2.0", "id": 3, "method": "publish", "params": ["xy", "n"]},
                {"jsonrpc": "2.0", "id": 4, "method": "get", "params": ["k"]},
            ]
        )
        answer = await raw.receive()
        assert sorted(answer, key=lambda r: r["id"]) == [
            {"jsonrpc": "2.0", "id": 1, "result": [["subscribe", "x", 1]]},
            {"jsonrpc": "2.0", "id": 2, "result": 1},
            {"jsonrpc": "2.0", "id": 3, "result": 1},
            {"jsonrpc": "2.0", "id": 4, "result": None},
        ]
        assert await raw.receive() == push("x", "m")
        assert await raw.receive() == push("xy", "n", "x*")


async def test_no_message_of_a_channel_comes_after_the_reply_that_left_it(
    node: Node,  # noqa: F811
    raw: Raw,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await raw.result("subscribe", "c")
        hub = node.engine.pubsub
        for i in range(50):  # synchronous: all in the hub before the session runs again
            assert hub.publish(b"c", b"%d" % i) == 1
        await raw.result("unsubscribe", "c")
        assert raw.pushes == [push("c", str(i)) for i in range(50)]
        assert await publish(node, b"c", b"late") == 0
        assert await raw.result("ping") == "PONG"
        assert raw.pushes == [push("c", str(i)) for i in range(50)]


async def test_messages_from_another_session_arrive_in_publish_order(
    raw: Raw,
    kv: Client,  # noqa: F811
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await raw.result("subscribe", "c", "d")
        count = 300
        async with trio.open_nursery() as nursery:
            for channel in ("c", "d"):  # two publishers at once, pipelined

                async def publisher(channel: str = channel) -> None:
                    for i in range(count):
                        assert await kv.execute("publish", channel, str(i)) == 1

                nursery.start_soon(publisher)
        received: dict[str, list[str]] = {"c": [], "d": []}
        for _ in range(2 * count):
            message = await raw.receive()
            assert message["method"] == "message"
            channel, data = message["params"]
            received[channel].append(data)
        assert received == {
            "c": [str(i) for i in range(count)],
            "d": [str(i) for i in range(count)],
        }


async def test_an_unauthenticated_session_gets_noauth() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, resp=False, tokens=frozenset({"s3cret"}))
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=1), config) as running:
            async with open_websocket_url(running.url) as ws:
                session = Raw(ws)
                for method in ("subscribe", "psubscribe", "unsubscribe", "punsubscribe"):
                    error = (await session.call(method, ["c"]))["error"]
                    assert error["data"]["kind"] == "NOAUTH", method
                assert running.engine.pubsub.channels() == []
                assert await session.result("auth", "s3cret") == "OK"
                assert await session.result("subscribe", "c") == [["subscribe", "c", 1]]
                assert await publish(running, b"c", b"hi") == 1
                assert await session.receive() == push("c", "hi")


async def test_a_closed_session_leaves_every_channel_and_pattern(node: Node) -> None:  # noqa: F811
    hub = node.engine.pubsub
    with trio.fail_after(TEST_TIMEOUT):
        async with open_websocket_url(node.url) as ws:
            session = Raw(ws)
            await session.result("subscribe", "a", "b")
            await session.result("psubscribe", "p*")
            assert hub.numsub([b"a", b"b"]) == [(b"a", 1), (b"b", 1)]
            assert hub.numpat() == 1
        await trio.testing.wait_all_tasks_blocked()  # the server saw it all (loopback, in-process)
        assert hub.numsub([b"a", b"b"]) == [(b"a", 0), (b"b", 0)]
        assert hub.numpat() == 0
        # A session that vanishes without a close handshake leaves them too.
        async with open_websocket_url(node.url) as ws:
            await Raw(ws).result("subscribe", "a")
            assert hub.numsub([b"a"]) == [(b"a", 1)]
            await ws._stream.aclose()  # the TCP connection, under trio-websocket's feet
        await trio.testing.wait_all_tasks_blocked()
        assert hub.numsub([b"a"]) == [(b"a", 0)]
        assert hub.stats()["pubsub_channels"] == 0


async def test_a_subscribed_session_is_exempt_from_the_idle_timeout() -> None:
    """As Redis exempts pub/sub clients from ``timeout``; an idle plain session is closed."""
    config = ServerConfig(host="127.0.0.1", port=0, resp=False, idle_timeout=0.3)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=1), config) as running:
            async with (
                open_websocket_url(running.url) as listening,
                open_websocket_url(running.url) as idle,
            ):
                listener = Raw(listening)
                await listener.result("subscribe", "c")
                assert await Raw(idle).result("ping") == "PONG"  # idle from now on
                with pytest.raises(ConnectionClosed) as closed:
                    await idle.get_message()
                assert closed.value.reason.code == 1008
                # The listener has been idle longer, and is still served.
                assert await publish(running, b"c", b"still here") == 1
                assert await listener.receive() == push("c", "still here")


# -- a peer that does not read ------------------------------------------------------------


async def test_a_slow_reader_is_closed_with_1008_and_nobody_else_is_affected() -> None:
    limit = 64 * 1024
    payload = b"x" * 8192
    store = StoreConfig(shards=1, pubsub_buffer_limit=limit)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_node(store, ServerConfig(host="127.0.0.1", port=0, resp=False)) as running,
            # message_queue_size=1: once a message waits, the client stops reading its socket.
            open_websocket_url(running.url, message_queue_size=1) as slow_ws,
            connect(running.url) as fast,
            fast.subscribe("c") as fast_sub,
        ):
            hub = running.engine.pubsub
            slow = Raw(slow_ws)
            await slow.result("subscribe", "c")
            received: list[bytes] = []

            async def consume() -> None:
                async for message in fast_sub:
                    received.append(message.data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                published = 0
                while hub.overflows == 0:
                    assert published < 10_000, "the slow session never overflowed"
                    assert await publish(running, b"c", payload + b"%d" % published) == 2
                    published += 1
                    await trio.testing.wait_all_tasks_blocked()  # the server did all it could
                    # Never more in the session's own outbox than what the hub allows.
                    for session in running.server.sessions:
                        assert session._outbox_bytes <= 2 * limit
                assert hub.numsub([b"c"]) == [(b"c", 1)]  # the fast one only
                assert hub.publish(b"c", b"after") == 1
                await trio.testing.wait_all_tasks_blocked()
                assert received == [payload + b"%d" % i for i in range(published)] + [b"after"]
                nursery.cancel_scope.cancel()
            # The slow session, reading again: what was in the socket, then the close.
            got = 0
            while True:
                try:
                    message = await slow.receive()
                except ConnectionClosed as exc:
                    closed = exc.reason
                    break
                assert message == push("c", (payload + b"%d" % got).decode())
                got += 1
            print(f"published {published}, the slow reader got {got}")
            assert closed.code == 1008
            assert "pub/sub output buffer limit" in (closed.reason or "")
            assert 0 < got < published
            assert await fast.ping() == "PONG"  # the other connection is untouched
            assert running.engine.pubsub.stats()["pubsub_overflows"] == 1


# -- the Python client ----------------------------------------------------------------------


async def test_the_client_subscription_mirrors_the_embedded_one(node: Node) -> None:  # noqa: F811
    """One scenario, run against the embedded store and against the WebSocket client."""

    async def scenario(
        subscribe: Callable[..., AbstractAsyncContextManager[Any]],
        publish: Callable[[str, str], Awaitable[Any]],
    ) -> list[object]:
        seen: list[object] = []
        async with subscribe("news", patterns=["n*"]) as sub:
            seen += [sub.channels, sub.patterns]
            seen.append(await publish("news", "hello"))
            seen += [await sub.get(), await sub.get()]
            seen.append(await sub.subscribe("more", "news"))
            seen.append(await sub.psubscribe("m?re"))
            seen.append(await publish("more", "x"))
            seen += [await sub.get(), await sub.get()]
            seen.append(await sub.unsubscribe("news"))
            seen.append(await sub.unsubscribe())
            seen.append(await sub.unsubscribe())
            seen.append(await sub.punsubscribe("n*"))
            seen += [sub.channels, sub.patterns]
            seen.append(await sub.subscribe())
            seen.append(await publish("news", "unheard"))
        seen.append(await publish("more", "unheard"))
        return seen

    expected: list[object] = [
        [b"news"],
        [b"n*"],
        2,
        Message(b"news", b"hello"),
        Message(b"news", b"hello", b"n*"),
        3,
        4,
        2,
        Message(b"more", b"x"),
        Message(b"more", b"x", b"m?re"),
        3,
        2,
        2,
        1,
        [],
        [b"m?re"],
        1,
        0,
        0,
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=2) as store:
            assert await scenario(store.subscribe, lambda c, m: store.execute("publish", c, m)) == (
                expected
            )
        async with connect(node.url) as client, connect(node.url) as other:
            assert await scenario(
                client.subscribe, lambda c, m: other.execute("publish", c, m)
            ) == (expected)
            assert await other.execute("pubsub", "numsub", "news", "more") == [
                b"news",
                0,
                b"more",
                0,
            ]


async def test_the_client_iterates_publishes_and_keeps_serving_other_tasks(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with kv.subscribe("c") as sub:
            with pytest.raises(RuntimeError, match="one at a time"):
                async with kv.subscribe("d"):
                    pass  # pragma: no cover - never entered
            received: list[Message] = []

            async def listen() -> None:
                async for message in sub:
                    received.append(message)
                    if len(received) == 100:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                for i in range(100):  # from the same client, while it listens
                    assert await kv.execute("publish", "c", i) == 1
                    assert await kv.incr("n") == i + 1
            assert [m.data for m in received] == [b"%d" % i for i in range(100)]
            assert {m.channel for m in received} == {b"c"}
        assert node.engine.pubsub.numsub([b"c"]) == [(b"c", 0)]
        with pytest.raises(trio.EndOfChannel):
            await sub.get()  # the block has ended
        async with kv.subscribe("d") as again:  # a new block once the last one ended
            assert again.channels == [b"d"]
            # A late message of the last block's channel (its unsubscribe timed out,
            # say) is not this block's: dropped; its own channel's messages come.
            again._deliver(Message(b"c", b"late"))
            again._deliver(Message(b"d", b"mine"))
            again._deliver(Message(b"d", b"no pattern here", b"d*"))
            assert await again.get() == Message(b"d", b"mine")
            assert again._bytes == 0


async def test_the_client_side_buffer_limit_ends_the_subscription_not_the_connection(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    size = MESSAGE_OVERHEAD + len(b"c") + 10
    hub = node.engine.pubsub
    with trio.fail_after(TEST_TIMEOUT):
        async with kv.subscribe("c", patterns=["p*"], buffer_limit=3 * size) as sub:
            for i in range(3):
                hub.publish(b"c", b"%010d" % i)
            await trio.testing.wait_all_tasks_blocked()  # delivered to the client (loopback)
            assert await sub.get() == Message(b"c", b"%010d" % 0)  # under the limit: kept
            for i in range(3, 5):
                hub.publish(b"c", b"%010d" % i)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OverloadedError, match="client side"):
                await sub.get()
            with pytest.raises(KVMemoError) as again:
                await sub.get()
            assert again.value.kind == "OVERLOADED"
            assert sub.channels == sub.patterns == []
            assert await sub.subscribe("c") == 0  # ended stays ended, as the embedded one
            # The client told the server to stop sending; the connection goes on.
            assert await kv.ping() == "PONG"
            assert hub.numsub([b"c"]) == [(b"c", 0)]
            assert hub.numpat() == 0
            assert await kv.set("k", "v") == "OK"


async def test_a_lost_connection_ends_the_subscription_after_what_was_received(
    node: Node,  # noqa: F811
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(node.url) as client, client.subscribe("c") as sub:
            assert await publish(node, b"c", b"before") == 1
            await trio.testing.wait_all_tasks_blocked()
            await client.abort()
            assert await sub.get() == Message(b"c", b"before")
            with pytest.raises(DisconnectedError):
                await sub.get()
            with pytest.raises(DisconnectedError):
                await sub.subscribe("d")


def test_publish_is_a_barrier_of_its_session() -> None:
    """A pipelined ``set`` then ``publish``: the publish waits for the set, as in Redis's
    one-connection order, so a subscriber told of a write can read it (the session's
    per-key order alone would not hold a keyless command back)."""
    from kvmemo.server.jsonrpc import Call
    from kvmemo.server.session import _keys_of

    def call(method: str, *args: bytes) -> Call:
        return Call(id=1, method=method, args=list(args), notification=False, index=0)

    assert _keys_of([call("publish", b"ch", b"k changed")]) == (set(), True)
    assert _keys_of([call("pubsub", b"numpat")]) == (set(), False)
    assert _keys_of([call("set", b"k", b"v")]) == ({b"k"}, False)


async def test_a_peer_reset_while_its_reader_waits_for_pushes_ends_the_session() -> None:
    """The reader waits for a batch of pushes to be written (an unsubscribe must come
    after them) when the peer resets: the broken writer wakes it, the session ends and
    leaves its channels (it stayed forever, still subscribed, before the fix)."""
    import socket
    import struct

    from trio_websocket import wrap_client_stream

    store = StoreConfig(shards=1, pubsub_buffer_limit=256 * 1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(store, ServerConfig(host="127.0.0.1", port=0, resp=False)) as running:
            port = running.server.listeners[0].socket.getsockname()[1]
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            async with trio.open_nursery() as client_nursery:
                ws = await wrap_client_stream(
                    client_nursery, trio.SocketStream(sock), "127.0.0.1", "/ws"
                )
                subscribe = {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": ["c"]}
                await ws.send_message(json.dumps(subscribe))
                assert json.loads(await ws.get_message())["id"] == 1
                # The client reads no more: the pushes fill the socket buffers.
                for _ in range(64):  # 16 MiB
                    assert await publish(running, b"c", b"x" * (256 * 1024)) == 1
                    await trio.testing.wait_all_tasks_blocked()
                (session,) = running.server.sessions
                assert session._written_total < session._push_target  # the writer is stuck
                leave = {"jsonrpc": "2.0", "id": 2, "method": "unsubscribe", "params": []}
                await ws.send_message(json.dumps(leave))
                await trio.testing.wait_all_tasks_blocked()
                assert session._push_holds == 1  # the reader waits for the pushes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client_nursery.cancel_scope.cancel()
                sock.close()
            await session._ended.wait()
            assert session not in running.server.sessions
            assert running.engine.pubsub.numsub([b"c"]) == [(b"c", 0)]


async def test_messages_keep_flowing_while_a_subscribe_waits_for_an_earlier_request() -> None:
    """A ``subscribe`` queued behind a slow request holds the pushes back only once it
    runs: a subscriber that reads promptly is not dropped as a slow one meanwhile."""
    store = StoreConfig(shards=1, pubsub_buffer_limit=64 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(store, ServerConfig(host="127.0.0.1", port=0, resp=False)) as running:
            engine = running.engine
            original = engine.execute_many
            release = trio.Event()

            async def execute_many(calls: Any) -> list[Any]:
                if any(args and args[0] == b"slow" for _, args in calls):
                    await release.wait()  # a slow shard (restarting, holding, ...)
                return await original(calls)

            engine.execute_many = execute_many  # type: ignore[method-assign]
            pushed: list[str] = []
            async with open_websocket_url(running.url) as ws:
                raw = Raw(ws)

                async def read() -> None:
                    while True:
                        try:
                            message = await raw.receive()
                        except ConnectionClosed:  # the test closes it
                            return
                        if "id" not in message:
                            pushed.append(message["params"][1])

                assert await raw.result("subscribe", "c") == [["subscribe", "c", 1]]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    await raw.send({"jsonrpc": "2.0", "id": 2, "method": "get", "params": ["slow"]})
                    await raw.send(
                        {"jsonrpc": "2.0", "id": 3, "method": "subscribe", "params": ["d"]}
                    )
                    await trio.testing.wait_all_tasks_blocked()
                    for i in range(100):  # 100 KB in all, past the 64 KiB limit
                        assert await publish(running, b"c", b"m%04d" % i + b"x" * 1000) == 1
                        await trio.testing.wait_all_tasks_blocked()  # the reader takes them
                    assert engine.pubsub.overflows == 0
                    assert len(pushed) == 100
                    release.set()
                    await trio.testing.wait_all_tasks_blocked()
                    await ws.aclose()
