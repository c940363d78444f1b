"""Python client, stop 23: a batch the server refuses as too long fails alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from kvmemo.client import connect
from kvmemo.config import StoreConfig
from kvmemo.errors import KVMemoError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

SERVER_MAX_BATCH = 5


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(30):
        async with open_node(
            StoreConfig(shards=2),
            ServerConfig(host="127.0.0.1", port=0, resp=False, max_batch=SERVER_MAX_BATCH),
        ) as running:
            yield running


async def test_a_batch_over_the_servers_limit_fails_its_calls_and_the_connection_goes_on(
    node: Node,
) -> None:
    # Was: the id-less TOO_LARGE closed the connection ("the server refused a
    # message"): every call in flight failed DISCONNECTED, the client closed.
    async with connect(node.url, max_batch=10) as kv:
        outcomes: dict[int, object] = {}

        async def call(n: int) -> None:
            try:
                outcomes[n] = await kv.set(f"k{n}", str(n))
            except KVMemoError as exc:
                outcomes[n] = exc

        async with trio.open_nursery() as nursery:
            for n in range(8):  # one tick: one batch of 8, over the server's 5
                nursery.start_soon(call, n)
        for n in range(8):
            error = outcomes[n]
            assert isinstance(error, KVMemoError), error
            assert error.kind == "TOO_LARGE"
            assert error.data == {"length": 8, "limit": SERVER_MAX_BATCH}
        assert not kv.closed
        assert await kv.mget(*(f"k{n}" for n in range(8))) == [None] * 8  # none ran
        assert await kv.set("after", "1") == "OK"
        assert await kv.execute_many(*(("GET", f"k{n}") for n in range(4))) == [None] * 4
