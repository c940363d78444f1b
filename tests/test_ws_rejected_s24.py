"""The WebSocket port's own refusals count as rejected calls in commandstats.

Was: a call refused before it reached the engine (NOAUTH before ``auth``,
OVERLOADED past ``--max-in-flight``) counted nowhere, so INFO commandstats
(and ``info``'s ``stats.commands``) showed fewer rejected calls than clients
got; the Redis port counted its own.
"""

from __future__ import annotations

import trio
from test_server_protocol import node, recv, req, result, send
from trio_websocket import open_websocket_url

from kvmemo.node import Node

TIMEOUT = 30  # seconds for a whole test


def rejected(n: Node) -> dict[str, int]:
    stats = n.engine.command_stats()
    return {name: c.rejected for name, c in stats.items() if c.rejected}


async def test_calls_refused_before_auth_are_rejected_calls() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(tokens=frozenset({"s3cret"})) as n, open_websocket_url(n.url) as ws:
            await send(ws, [req(1, "get", "k"), req(2, "set", "k", "v"), req(3, "nosuch")])
            answers = await recv(ws)
            assert sorted(r["error"]["data"]["kind"] for r in answers if "error" in r)[:2] == [
                "NOAUTH",
                "NOAUTH",
            ]
            assert rejected(n) == {"get": 1, "set": 1}  # an unknown method is no command
            assert await result(ws, "auth", "s3cret") == "OK"
            assert await result(ws, "get", "k") is None  # the refused SET applied nothing
            assert rejected(n) == {"get": 1, "set": 1}


async def test_calls_refused_as_overloaded_are_rejected_calls() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_in_flight=2) as n, open_websocket_url(n.url) as ws:
            await send(ws, [req(i, "set", f"k{i}", "v") for i in range(3)])
            answer = await recv(ws)
            assert [r["error"]["data"]["kind"] for r in answer] == ["OVERLOADED"] * 3
            assert rejected(n) == {"set": 3}
