"""Protocol 1.2 over WebSocket: ``transaction``, ``watch``, ``unwatch``.

Through the Python client and as raw JSON-RPC against a real in-process
server (127.0.0.1, port 0).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from test_client import TEST_TIMEOUT, kv, node  # noqa: F401 - fixtures
from test_engine_transaction import watched_keys
from trio_websocket import open_websocket_url

from kvmemo.client import Client, connect
from kvmemo.errors import KVMemoError
from kvmemo.node import Node


class Raw:
    """JSON-RPC by hand on one WebSocket session."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, params: object) -> dict[str, Any]:
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        await self.ws.send_message(json.dumps(request))
        response: dict[str, Any] = json.loads(await self.ws.get_message())
        assert response["id"] == self.next_id
        return response


@pytest.fixture
async def raw(node: Node) -> AsyncIterator[Raw]:  # noqa: F811 - the imported fixture
    async with open_websocket_url(node.url) as ws:
        yield Raw(ws)


async def test_a_transaction_answers_each_call_in_place_errors_included(
    kv: Client,  # noqa: F811
) -> None:
    await kv.set("text", "abc")
    results = await kv.transaction(
        ("SET", "a", "1"), ("INCR", "a"), ("INCR", "text"), ("MGET", "a", "text"), ("PING",)
    )
    assert results is not None
    assert results[:2] == ["OK", 2]
    assert isinstance(results[2], KVMemoError)
    assert results[2].kind == "NOT_INTEGER"
    assert results[3:] == [[b"2", b"abc"], "PONG"]


async def test_a_transaction_refused_as_a_whole_runs_nothing(kv: Client) -> None:  # noqa: F811
    with pytest.raises(KVMemoError) as caught:
        await kv.transaction(("SET", "a", "1"), ("NOSUCH",))
    assert caught.value.kind == "UNKNOWN_METHOD"
    assert caught.value.data["index"] == 1
    with pytest.raises(KVMemoError) as caught:
        await kv.transaction(("SET", "a", "1"), ("SET", "b"))
    assert caught.value.kind == "ARITY"
    assert caught.value.data["index"] == 1
    with pytest.raises(KVMemoError) as caught:
        await kv.transaction(("SET", "a", "1"), ("AUTH", "x"))
    assert caught.value.kind == "UNKNOWN_METHOD"
    assert await kv.get("a") is None


async def test_watch_makes_a_transaction_null_when_another_session_writes(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    async with connect(node.url) as other:
        await kv.set("balance", "100")
        async with kv.watch("balance"):
            balance = int(await kv.get("balance") or 0)
            await other.set("balance", "50")
            assert await kv.transaction(("SET", "balance", str(balance - 10))) is None
        assert await kv.get("balance") == b"50"
        async with kv.watch("balance"):
            balance = int(await kv.get("balance") or 0)
            assert await kv.transaction(("SET", "balance", str(balance - 10))) == ["OK"]
        assert await kv.get("balance") == b"40"
    assert await watched_keys(node.engine) == 0


async def test_raw_requests_malformed_transactions_and_the_method_list(raw: Raw) -> None:
    bad = await raw.call("transaction", ["set"])
    assert bad["error"]["data"]["kind"] == "INVALID_REQUEST"
    assert bad["error"]["message"] == "params[0] must be an array [method, param, ...]"
    bad = await raw.call("transaction", [[1, "k"]])
    assert bad["error"]["data"]["kind"] == "INVALID_REQUEST"
    bad = await raw.call("transaction", [["set", "k", {"no": "objects"}]])
    assert bad["error"]["data"]["kind"] == "INVALID_REQUEST"
    assert (await raw.call("watch", []))["error"]["data"]["kind"] == "ARITY"
    assert (await raw.call("unwatch", ["x"]))["error"]["data"]["kind"] == "ARITY"
    empty = await raw.call("transaction", [])
    assert empty["result"] == []
    methods = (await raw.call("command.list", []))["result"]
    assert {"transaction", "watch", "unwatch", "get", "set"} <= set(methods)
    assert (await raw.call("get", ["k"]))["result"] is None  # the session lives on


async def test_a_closed_session_gives_its_watches_back(node: Node) -> None:  # noqa: F811
    async with open_websocket_url(node.url) as ws:
        session = Raw(ws)
        assert (await session.call("watch", ["a", "b", "c"]))["result"] == "OK"
        assert await watched_keys(node.engine) == 3
    await trio.testing.wait_all_tasks_blocked()  # the server saw it all (loopback, in-process)
    assert await watched_keys(node.engine) == 0


async def test_a_transaction_is_ordered_with_the_sessions_other_requests(raw: Raw) -> None:
    """Sent back to back without waiting: a set before it, the transaction, a get after it."""
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "set", "params": ["n", "10"]},
        {"jsonrpc": "2.0", "id": 2, "method": "transaction", "params": [["incr", "n"]] * 2},
        {"jsonrpc": "2.0", "id": 3, "method": "get", "params": ["n"]},
    ]
    for request in requests:
        await raw.ws.send_message(json.dumps(request))
    responses = [json.loads(await raw.ws.get_message()) for _ in requests]
    results = {r["id"]: r["result"] for r in responses}
    assert results == {1: "OK", 2: [11, 12], 3: "12"}


async def test_a_bad_option_fails_in_place_and_an_oversized_transaction_is_refused_unread(
    raw: Raw,
) -> None:
    mixed = await raw.call("transaction", [["set", "k", "v", "EX", "abc"], ["set", "j", "1"]])
    failed, ok = mixed["result"]
    assert failed["data"]["kind"] == "NOT_INTEGER"
    assert ok == "OK"
    # Over max_batch (10,000): refused on its length, with its id; no call is read,
    # so even calls that are not arrays give TOO_LARGE, not INVALID_REQUEST.
    huge = await raw.call("transaction", [1] * 10_001)
    assert huge["error"]["data"]["kind"] == "TOO_LARGE"
    assert huge["id"] == raw.next_id


async def test_a_watch_block_keeps_its_watches_from_the_clients_other_tasks(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    """Watches belong to the session: another task's transaction must not end them."""
    async with connect(node.url) as other:
        await kv.set("bal", "100")
        other_done = trio.Event()
        outcome: dict[str, Any] = {}

        async def unrelated() -> None:
            outcome["hits"] = await kv.transaction(("INCR", "hits"))
            other_done.set()

        async with trio.open_nursery() as nursery:
            async with kv.watch("bal"):
                balance = int(await kv.get("bal") or 0)
                nursery.start_soon(unrelated)
                await trio.testing.wait_all_tasks_blocked()  # it waits for this block
                assert not other_done.is_set()
                await other.set("bal", "500")
                outcome["mine"] = await kv.transaction(("SET", "bal", str(balance - 10)))
        assert outcome == {"mine": None, "hits": [1]}
        assert await kv.get("bal") == b"500"


async def test_a_watch_cancelled_at_once_leaves_nothing_watched(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    for delay in (0, 0.0001, 0.001):
        with trio.move_on_after(delay):
            async with kv.watch("k"):
                await trio.sleep_forever()
    assert await kv.transaction(("SET", "k", "v")) == ["OK"]  # no stale watch
    await trio.testing.wait_all_tasks_blocked()  # the server saw it all (loopback, in-process)
    assert await watched_keys(node.engine) == 0


async def test_a_watch_block_left_by_an_exception_leaves_nothing_watched(
    node: Node,  # noqa: F811
    kv: Client,  # noqa: F811
) -> None:
    """Unwinding, the block gives its watch back without waiting for an answer (its
    reader may be cancelled with it); the session runs that before what follows."""
    with pytest.raises(ValueError, match="changed my mind"):
        async with kv.watch("k"):
            raise ValueError("changed my mind")
    await node.engine.execute("set", [b"k", b"by another session"])
    assert await kv.transaction(("SET", "k", "v")) == ["OK"]  # not aborted: k is unwatched
    await trio.testing.wait_all_tasks_blocked()
    assert await watched_keys(node.engine) == 0
