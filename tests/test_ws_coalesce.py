"""WebSocket sessions share the server's coalescer: single-key requests of many sessions, one round.

Every test opens a whole node in-process (``open_node``, port 0, no Redis
port) and talks to it with trio-websocket, under ``trio.fail_after``. The
interleavings are made with events, never with sleeps: an engine stand-in
holds the first rounds until released, and a gate in front of the
coalescer releases the sessions' submissions all in one scheduler pass.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from kvmemo.config import StoreConfig
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig
from kvmemo.server.session import Session

TIMEOUT = 10  # seconds; every test finishes far sooner on a healthy server

Calls = list[tuple[str, tuple[bytes, ...]]]


@asynccontextmanager
async def node() -> AsyncIterator[Node]:
    async with open_node(StoreConfig(shards=4), ServerConfig(port=0, resp=False)) as running:
        yield running


def req(rid: int | str, method: str, *params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)}


async def send(ws: WebSocketConnection, document: Any) -> None:
    await ws.send_message(json.dumps(document))


async def recv_by_id(ws: WebSocketConnection, count: int) -> dict[Any, Any]:
    """Responses (of single requests and batches) until ``count`` ids came back."""
    out: dict[Any, Any] = {}
    while len(out) < count:
        answer = json.loads(await ws.get_message())
        for response in answer if isinstance(answer, list) else [answer]:
            assert response["id"] not in out, response
            out[response["id"]] = response
    return out


async def closed_with(ws: WebSocketConnection) -> int:
    """Read until the server closes the socket; the close code."""
    while True:
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            reason = exc.reason
            break
    assert reason is not None
    return reason.code


async def connect(n: Node, stack: AsyncExitStack) -> tuple[WebSocketConnection, Session]:
    """A new client connection, and the server's session of it."""
    before = set(n.server.sessions)
    ws = await stack.enter_async_context(open_websocket_url(n.url))
    await trio.testing.wait_all_tasks_blocked()
    (session,) = n.server.sessions - before
    return ws, session


def record_engine(
    n: Node, monkeypatch: pytest.MonkeyPatch, *, hold: int = 0, gate: trio.Event | None = None
) -> list[Calls]:
    """Record every ``engine.execute_many`` call; the first ``hold`` wait for ``gate``."""
    seen: list[Calls] = []
    real = n.engine.execute_many

    async def recording(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        seen.append([(name, tuple(args)) for name, args in calls])
        if gate is not None and len(seen) <= hold:
            await gate.wait()
        return await real(calls)

    monkeypatch.setattr(n.engine, "execute_many", recording)
    return seen


def gate_submissions(n: Node, monkeypatch: pytest.MonkeyPatch, go: trio.Event) -> list[Calls]:
    """Hold every batch before the coalescer until ``go``: set, it releases all in one pass."""
    arrived: list[Calls] = []
    real = n.server.coalescer.execute_many

    async def gated(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        arrived.append([(name, tuple(args)) for name, args in calls])
        await go.wait()
        return await real(calls)

    monkeypatch.setattr(n.server.coalescer, "execute_many", gated)
    return arrived


def command_counts(n: Node) -> tuple[dict[str, int], dict[str, int]]:
    """(successes per command in the latency histograms, errors per kind)."""
    metrics = n.engine.metrics.to_dict()
    latency: Any = metrics["kvmemo_command_duration_seconds"]
    errors: Any = metrics["kvmemo_command_errors_total"]
    return {name: h["count"] for name, h in latency.items()}, dict(errors)


async def test_single_key_requests_of_sessions_in_one_pass_run_as_one_engine_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, AsyncExitStack() as stack:
            clients = [(await connect(n, stack))[0] for _ in range(4)]
            seen = record_engine(n, monkeypatch)
            go = trio.Event()
            arrived = gate_submissions(n, monkeypatch, go)
            rounds = n.server.coalescer.rounds
            ok_before, errors_before = command_counts(n)
            for i, ws in enumerate(clients):
                if i % 2:  # a single request
                    await send(ws, req(f"s{i}", "set", f"k{i}", f"v{i}"))
                else:  # a batch of single-key commands, one of them failing
                    await send(
                        ws,
                        [
                            req(f"s{i}", "set", f"k{i}", f"v{i}"),
                            req(f"g{i}", "get", f"k{i}"),
                            req(f"i{i}", "incr", f"k{i}"),
                        ],
                    )
            await trio.testing.wait_all_tasks_blocked()
            assert len(arrived) == 4  # every session's group waits at the gate
            go.set()  # all four submit in one scheduler pass
            answers = [await recv_by_id(ws, 3 if i % 2 == 0 else 1) for i, ws in enumerate(clients)]

            assert n.server.coalescer.rounds == rounds + 1
            (union,) = seen  # one engine call, every session's commands in it
            assert sorted(union) == sorted(call for batch in arrived for call in batch)
            for i, answer in enumerate(answers):
                assert answer[f"s{i}"]["result"] == "OK"
                if i % 2 == 0:
                    assert answer[f"g{i}"]["result"] == f"v{i}"
                    assert answer[f"i{i}"]["error"]["data"]["kind"] == "NOT_INTEGER"
            # Each call counted once, as its own execute_many would have counted it.
            ok_after, errors_after = command_counts(n)
            assert ok_after["set"] - ok_before["set"] == 4
            assert ok_after["get"] - ok_before["get"] == 2
            assert ok_after["incr"] == ok_before["incr"]
            assert errors_after["NOT_INTEGER"] - errors_before.get("NOT_INTEGER", 0) == 2


async def test_a_sessions_writes_to_one_key_keep_their_order_around_a_multi_key_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            gate = trio.Event()
            seen = record_engine(n, monkeypatch, hold=1, gate=gate)
            rounds = n.server.coalescer.rounds
            try:
                await send(ws, [req(1, "set", "k", "1"), req(2, "append", "k", "2")])  # held
                await send(ws, req(3, "mset", "k", "x", "j", "y"))  # multi-key: not coalesced
                await send(ws, [req(4, "append", "k", "3"), req(5, "get", "k")])
                await send(ws, req(6, "get", "k"))
                await trio.testing.wait_all_tasks_blocked()
                assert len(seen) == 1  # the rest waits for the held round: nothing overtook it
            finally:
                gate.set()
            answers = await recv_by_id(ws, 6)
            assert {rid: a["result"] for rid, a in answers.items()} == {
                1: "OK",
                2: 2,
                3: "OK",
                4: 2,
                5: "x3",
                6: "x3",
            }
            assert [[name for name, _ in calls] for calls in seen] == [
                ["set", "append"],
                ["mset"],
                ["append", "get"],
                ["get"],
            ]
            assert n.server.coalescer.rounds == rounds + 3  # every group but the mset's


@pytest.mark.parametrize("victim", ["leader", "follower"])
async def test_a_session_closing_while_its_batch_runs_leaves_the_others_answered(
    monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, AsyncExitStack() as stack:
            connected = [await connect(n, stack) for _ in range(3)]
            gate = trio.Event()
            seen = record_engine(n, monkeypatch, hold=1, gate=gate)
            go = trio.Event()
            gate_submissions(n, monkeypatch, go)
            try:
                for i, (ws, _) in enumerate(connected):
                    await send(ws, req(i, "incr", f"c{i}"))
                await trio.testing.wait_all_tasks_blocked()
                go.set()
                await trio.testing.wait_all_tasks_blocked()
                (union,) = seen  # one round, held; its leader's batch comes first
                order = [int(args[0][1:]) for _, args in union]
                doomed = order[0] if victim == "leader" else order[1]
                ws, session = connected[doomed]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.drain, 0)  # no grace: its tasks are cancelled
                    await trio.testing.wait_all_tasks_blocked()
                    gate.set()  # the shielded round goes on to its end
                    assert await closed_with(ws) == 1001
            finally:
                gate.set()
            for i, (other, _) in enumerate(connected):
                if i != doomed:
                    assert (await recv_by_id(other, 1))[i]["result"] == 1
            # The closed session's increment ran with the round (its result was dropped).
            values = await n.engine.execute("mget", [b"c0", b"c1", b"c2"])
            assert values == [b"1", b"1", b"1"]
            assert n.server.coalescer._waiting == []
            assert not n.server.coalescer._leading


async def test_a_session_closing_while_its_batch_gathers_withdraws_it_and_others_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, AsyncExitStack() as stack:
            (first, _), (doomed, session), (other, _) = [await connect(n, stack) for _ in range(3)]
            gate = trio.Event()
            seen = record_engine(n, monkeypatch, hold=1, gate=gate)
            try:
                await send(first, req(1, "set", "a", "1"))
                await trio.testing.wait_all_tasks_blocked()  # its round runs, held
                await send(doomed, req(2, "set", "b", "2"))
                await send(other, req(3, "set", "c", "3"))
                await trio.testing.wait_all_tasks_blocked()
                assert len(n.server.coalescer._waiting) == 2  # both gather for the next round
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.drain, 0)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(n.server.coalescer._waiting) == 1  # withdrawn
                    gate.set()
                    assert await closed_with(doomed) == 1001
            finally:
                gate.set()
            assert (await recv_by_id(first, 1))[1]["result"] == "OK"
            assert (await recv_by_id(other, 1))[3]["result"] == "OK"
            assert [[args[0] for _, args in calls] for calls in seen] == [[b"a"], [b"c"]]
            assert await n.engine.execute("mget", [b"a", b"b", b"c"]) == [b"1", None, b"3"]
            assert n.server.coalescer._waiting == []
            assert not n.server.coalescer._leading


async def test_a_bug_in_a_shared_round_is_internal_for_its_sessions_and_runs_nothing_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, AsyncExitStack() as stack:
            clients = [(await connect(n, stack))[0] for _ in range(3)]
            real = n.engine.execute_many
            rounds: list[int] = []

            async def broken(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                rounds.append(len(calls))
                await real(calls)  # applied, then a bug
                raise RuntimeError("a bug after the commands ran")

            monkeypatch.setattr(n.engine, "execute_many", broken)
            go = trio.Event()
            gate_submissions(n, monkeypatch, go)
            for i, ws in enumerate(clients):
                await send(ws, req(i, "incr", "counter"))
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            for i, ws in enumerate(clients):
                error = (await recv_by_id(ws, 1))[i]["error"]
                assert (error["code"], error["data"]["kind"]) == (-32603, "INTERNAL")
            assert rounds == [3]  # one round; no batch of it ran again
            monkeypatch.setattr(n.engine, "execute_many", real)
            assert await n.engine.execute("get", [b"counter"]) == b"3"
            await send(clients[0], req(9, "get", "counter"))  # the sessions live on
            assert (await recv_by_id(clients[0], 1))[9]["result"] == "3"
