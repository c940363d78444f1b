"""The WebSocket port against PROTOCOL.md, over real sockets on 127.0.0.1.

Every test opens a whole node in-process (``open_node``, port 0, no Redis
port) and talks to it with trio-websocket, under ``trio.fail_after``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from kvmemo.commands.table import COMMANDS
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import shard_name
from kvmemo.node import Node, open_node
from kvmemo.server import session
from kvmemo.server.config import ServerConfig

TIMEOUT = 10  # seconds; every test finishes far sooner on a healthy server


@asynccontextmanager
async def node(store: StoreConfig | None = None, **server: Any) -> AsyncIterator[Node]:
    store = store if store is not None else StoreConfig(shards=4)
    async with open_node(store, ServerConfig(port=0, resp=False, **server)) as running:
        yield running


def req(rid: int | str | None, method: str, *params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)}


def note(method: str, *params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": list(params)}


async def send(ws: WebSocketConnection, document: Any) -> None:
    await ws.send_message(json.dumps(document))


async def recv(ws: WebSocketConnection) -> Any:
    return json.loads(await ws.get_message())


async def call(ws: WebSocketConnection, method: str, *params: Any) -> dict[str, Any]:
    """One request, its response (nothing else may be in flight)."""
    await send(ws, req(1, method, *params))
    response: dict[str, Any] = await recv(ws)
    assert response["id"] == 1
    return response


async def result(ws: WebSocketConnection, method: str, *params: Any) -> Any:
    response = await call(ws, method, *params)
    assert "error" not in response, response
    return response["result"]


async def error(ws: WebSocketConnection, method: str, *params: Any) -> dict[str, Any]:
    response = await call(ws, method, *params)
    assert "result" not in response, response
    err: dict[str, Any] = response["error"]
    return err


async def recv_by_id(ws: WebSocketConnection, count: int) -> dict[Any, Any]:
    """Responses (of single requests and batches) until ``count`` ids came back."""
    out: dict[Any, Any] = {}
    while len(out) < count:
        answer = await recv(ws)
        for response in answer if isinstance(answer, list) else [answer]:
            assert response["id"] not in out, response
            out[response["id"]] = response
    return out


async def assert_quiet(ws: WebSocketConnection, seconds: float = 0.05) -> None:
    with trio.move_on_after(seconds):
        message = await ws.get_message()
        raise AssertionError(f"unexpected message {message!r}")


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


def key_on_shard(node: Node, shard: int, prefix: str = "k") -> str:
    for i in range(10_000):
        key = f"{prefix}{i}"
        if node.engine.slots.shard_of(key.encode()) == shard:
            return key
    raise AssertionError("no key found")


# -- messages --------------------------------------------------------------------------------


async def test_every_command_of_version_1_answers_as_the_table_says() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            now = int(time.time())
            steps: list[tuple[tuple[Any, ...], Any]] = [
                (("ping",), "PONG"),
                (("ping", "hello"), "hello"),
                (("set", "user:1", "alice"), "OK"),
                (("get", "user:1"), "alice"),
                (("get", "missing"), None),
                (("set", "user:1", "bob", "NX"), None),
                (("set", "user:1", "carol", "XX", "GET"), "alice"),
                (("set", "nokey", "x", "XX"), None),
                (("getdel", "user:1"), "carol"),
                (("getdel", "user:1"), None),
                (("set", "t", "v", "EX", 100), "OK"),
                (("getex", "t", "PERSIST"), "v"),
                (("ttl", "t"), -1),
                (("getex", "t", "EX", "50"), "v"),
                (("ttl", "t"), 50),
                (("ttl", "missing"), -2),
                (("pttl", "missing"), -2),
                (("persist", "t"), 1),
                (("persist", "t"), 0),
                (("expire", "t", 100), 1),
                (("expire", "t", 100, "NX"), 0),
                (("pexpire", "t", 100_000, "XX"), 1),
                (("expireat", "t", now + 1000), 1),
                (("pexpireat", "t", (now + 999) * 1000, "GT"), 0),
                (("pexpireat", "t", (now + 999) * 1000, "LT"), 1),
                (("expire", "missing", 10), 0),
                (("incr", "n"), 1),
                (("decr", "n"), 0),
                (("incrby", "n", 10), 10),
                (("decrby", "n", "3"), 7),
                (("append", "s", "ab"), 2),
                (("append", "s", "cé"), 5),
                (("strlen", "s"), 5),
                (("strlen", "missing"), 0),
                (("mget", "n", "missing", "s"), ["7", None, "abcé"]),
                (("mset", "x", "1", "y", "2"), "OK"),
                (("msetnx", "x", "9", "z", "3"), 0),
                (("get", "z"), None),
                (("msetnx", "z", "3", "w", "4"), 1),
                (("exists", "x", "x", "missing"), 2),
                (("del", "w", "missing"), 1),
                (("type", "x"), "string"),
                (("type", "missing"), "none"),
                (("dbsize",), 6),
                (("keys", "[xy]"), None),  # checked below
                (("flushall",), "OK"),
                (("dbsize",), 0),
            ]
            for params, expected in steps:
                got = await result(ws, *params)
                if params[0] == "keys":
                    assert sorted(got) == ["x", "y"]
                elif params[0] == "ttl" and expected == 50:
                    assert got in (49, 50)
                else:
                    assert got == expected, params


async def test_scan_returns_every_key_and_ends_at_cursor_zero() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            keys = {f"key:{i}" for i in range(50)}
            await send(ws, [req(i, "set", k, "v") for i, k in enumerate(keys)])
            assert len(await recv(ws)) == 50
            cursor, seen = "0", set()
            for _ in range(100):
                cursor, found = await result(ws, "scan", cursor, "COUNT", 7)
                seen.update(found)
                if cursor == "0":
                    break
            assert cursor == "0"
            assert seen == keys
            _, matched = await result(ws, "scan", "0", "MATCH", "key:1*", "COUNT", 1000)
            assert set(matched) == {k for k in keys if k.startswith("key:1")}


async def test_info_and_admin_methods_answer_in_protocol_shapes() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            info = await result(ws, "info")
            assert set(info) >= {"server", "memory", "stats", "keyspace", "actors", "persistence"}
            assert set(await result(ws, "info", "memory")) == {"memory"}
            actors = await result(ws, "debug.actors")
            assert {"shard-0", "ttl-manager", "eviction-manager", "server"} <= {
                a["name"] for a in actors
            }
            for actor in actors:
                assert set(actor) == {"name", "state", "restarts", "mailbox"}
            methods = await result(ws, "command.list")
            assert set(methods) == set(COMMANDS) | {
                "transaction",
                "watch",
                "unwatch",
                "subscribe",
                "unsubscribe",
                "psubscribe",
                "punsubscribe",
            }
            err = await error(ws, "save")
            assert (err["code"], err["data"]["kind"]) == (-32007, "DISABLED")
            err = await error(ws, "debug.kill", "shard-0")
            assert (err["code"], err["data"]["kind"]) == (-32601, "UNKNOWN_METHOD")


async def test_integer_and_string_ids_are_echoed() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await send(ws, req("abc-é", "ping"))
            assert await recv(ws) == {"jsonrpc": "2.0", "id": "abc-é", "result": "PONG"}
            await send(ws, req(2**40, "ping"))
            assert (await recv(ws))["id"] == 2**40


async def test_batch_answers_requests_with_an_id_only_and_runs_notifications() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await send(
                ws,
                [
                    req(1, "set", "a", "1"),
                    note("set", "b", "2"),
                    req("x", "get", "a"),
                    req(3, "nope"),
                    note("nope"),
                ],
            )
            answer = await recv(ws)
            assert isinstance(answer, list)
            by_id = {r["id"]: r for r in answer}
            assert set(by_id) == {1, "x", 3}
            assert by_id[1]["result"] == "OK"
            assert by_id["x"]["result"] == "1"
            assert by_id[3]["error"]["code"] == -32601
            assert await result(ws, "get", "b") == "2"
            # A batch of notifications only is answered with nothing at all.
            await send(ws, [note("set", "c", "3"), note("incr", "d")])
            assert await result(ws, "mget", "c", "d") == ["3", "1"]
            await assert_quiet(ws)


async def test_notification_is_executed_and_never_answered() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await send(ws, note("set", "k", "v"))
            await send(ws, note("get", "nope", "too", "many"))  # even an error is silent
            await send(ws, note("unknown-method"))
            assert await result(ws, "get", "k") == "v"
            await assert_quiet(ws)


async def test_empty_batch_gets_one_invalid_request_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await ws.send_message("[]")
            answer = await recv(ws)
            assert answer["id"] is None
            assert answer["error"]["code"] == -32600
            assert answer["error"]["data"]["kind"] == "INVALID_REQUEST"


@pytest.mark.parametrize("text", ["{", "not json", '{"jsonrpc": "2.0", "id": 1, "method": NaN}'])
async def test_parse_error_has_a_null_id(text: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await ws.send_message(text)
            answer = await recv(ws)
            assert answer["id"] is None
            assert answer["error"]["code"] == -32700
            assert answer["error"]["data"]["kind"] == "PARSE"
            assert await result(ws, "ping") == "PONG"


@pytest.mark.parametrize(
    ("document", "answered_id"),
    [
        ({"jsonrpc": "1.0", "id": 5, "method": "ping"}, 5),
        ({"jsonrpc": "2.0", "id": 5, "method": 7}, 5),
        ({"jsonrpc": "2.0", "id": 5, "method": "get", "params": "k"}, 5),
        ({"jsonrpc": "2.0", "id": 5, "method": "get", "params": {"key": "k"}}, 5),
        ({"jsonrpc": "2.0", "id": 5, "method": "get", "params": [["k"]]}, 5),
        ({"jsonrpc": "2.0", "id": 5, "method": "get", "params": [True]}, 5),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, None),
        ({"jsonrpc": "2.0", "id": [1], "method": "ping"}, None),
        (42, None),
        ("ping", None),
    ],
)
async def test_malformed_request_gets_invalid_request(document: Any, answered_id: Any) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await send(ws, document)
            answer = await recv(ws)
            assert answer["id"] == answered_id
            assert answer["error"]["code"] == -32600
            assert answer["error"]["data"]["kind"] == "INVALID_REQUEST"


async def test_binary_message_gets_invalid_request_and_the_session_stays_open() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await ws.send_message(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}')
            answer = await recv(ws)
            assert answer["id"] is None
            assert answer["error"]["code"] == -32600
            assert await result(ws, "ping") == "PONG"


async def test_unknown_method_gets_minus_32601() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            for method in ("nope", "GET", "debug.nothing"):
                err = await error(ws, method, "k")
                assert (err["code"], err["data"]["kind"]) == (-32601, "UNKNOWN_METHOD")


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        (("get",), "ARITY"),
        (("get", "a", "b"), "ARITY"),
        (("set", "k"), "ARITY"),
        (("dbsize", "x"), "ARITY"),
        (("set", "k", "v", "FOO"), "SYNTAX"),
        (("set", "k", "v", "NX", "XX"), "SYNTAX"),
        (("set", "k", "v", "EX", 1, "PX", 1000), "SYNTAX"),
        (("expire", "k", 10, "NX", "XX"), "SYNTAX"),
        (("scan", "0", "COUNT"), "SYNTAX"),
    ],
)
async def test_arity_and_syntax_errors_are_minus_32602_with_kind(
    params: tuple[Any, ...], kind: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            err = await error(ws, *params)
            assert (err["code"], err["data"]["kind"]) == (-32602, kind)
            assert await result(ws, "get", "k") is None  # nothing was applied


async def test_not_integer_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            await result(ws, "set", "k", "abc")
            for params in (("incr", "k"), ("incrby", "n", "x"), ("expire", "k", "soon")):
                err = await error(ws, *params)
                assert (err["code"], err["data"]["kind"]) == (-32000, "NOT_INTEGER")
            await result(ws, "set", "big", str(2**63 - 1))
            err = await error(ws, "incr", "big")
            assert err["data"]["kind"] == "NOT_INTEGER"
            assert await result(ws, "get", "big") == str(2**63 - 1)


async def test_out_of_memory_error_when_nothing_can_be_evicted() -> None:
    store = StoreConfig(shards=2, maxmemory=20_000, eviction_policy="noeviction")
    with trio.fail_after(TIMEOUT):
        async with node(store) as n, open_websocket_url(n.url) as ws:
            err = await error(ws, "set", "big", "x" * 50_000)
            assert (err["code"], err["data"]["kind"]) == (-32002, "OOM")
            assert await result(ws, "get", "big") is None


async def test_unavailable_while_the_owning_shard_restarts() -> None:
    store = StoreConfig(shards=2, restart_backoff=30, restart_backoff_max=30)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n, open_websocket_url(n.url) as ws:
            down = key_on_shard(n, 0)
            up = key_on_shard(n, 1)
            assert n.system.kill(shard_name(0))
            err = await error(ws, "set", down, "v")
            assert (err["code"], err["data"]["kind"]) == (-32003, "UNAVAILABLE")
            assert err["data"]["retry_after_ms"] > 0
            assert await result(ws, "set", up, "v") == "OK"


async def test_timeout_error_says_whether_the_request_was_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shard holds the request until the test lets it go, so the request
    # certainly times out (a reply that came in time would be the answer).
    from actors import DEFER
    from kvmemo.storage import shard as shard_module

    release = trio.Event()
    real_nowait = shard_module.ShardActor.handle_nowait
    real_handle = shard_module.ShardActor.handle

    def handle_nowait(self: shard_module.ShardActor, message: object) -> object:
        if isinstance(message, shard_module.ShardBatch):
            return DEFER
        return real_nowait(self, message)

    async def handle(self: shard_module.ShardActor, message: object) -> object:
        if isinstance(message, shard_module.ShardBatch):
            await release.wait()
        return await real_handle(self, message)

    monkeypatch.setattr(shard_module.ShardActor, "handle_nowait", handle_nowait)
    monkeypatch.setattr(shard_module.ShardActor, "handle", handle)
    store = StoreConfig(shards=2, request_timeout=0.01)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n, open_websocket_url(n.url) as ws:
            err = await error(ws, "get", "k")
            release.set()
            assert (err["code"], err["data"]["kind"]) == (-32006, "TIMEOUT")
            assert err["data"]["applied"] in (False, None)


async def test_a_bug_becomes_internal_error_and_the_session_stays_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            real = n.engine.execute_many

            async def broken(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                if calls[0][0] == "strlen":
                    raise RuntimeError("a bug")
                return await real(calls)

            monkeypatch.setattr(n.engine, "execute_many", broken)
            err = await error(ws, "strlen", "k")
            assert (err["code"], err["data"]["kind"]) == (-32603, "INTERNAL")
            monkeypatch.setattr(n.engine, "execute_many", unencodable)
            err = await error(ws, "get", "k")
            assert (err["code"], err["data"]["kind"]) == (-32603, "INTERNAL")
            monkeypatch.setattr(n.engine, "execute_many", broken)
            assert await result(ws, "set", "k", "v") == "OK"
            assert await result(ws, "get", "k") == "v"


async def unencodable(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
    return [object() for _ in calls]


async def test_drain_finishes_in_flight_requests_refuses_new_ones_and_closes_with_1001(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            gate = trio.Event()
            real = n.engine.execute_many

            async def held(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                await gate.wait()
                return await real(calls)

            monkeypatch.setattr(n.engine, "execute_many", held)
            await send(ws, req(1, "set", "k", "v"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(n.server.drain)
                await trio.testing.wait_all_tasks_blocked()
                await send(ws, req(2, "set", "late", "v"))
                refused = await recv(ws)
                assert refused["id"] == 2
                assert refused["error"]["data"]["kind"] == "UNAVAILABLE"
                gate.set()
                assert await recv(ws) == {"jsonrpc": "2.0", "id": 1, "result": "OK"}
                assert await closed_with(ws) == 1001
            assert await n.engine.execute("mget", [b"k", b"late"]) == [b"v", None]


@pytest.mark.parametrize("offered", [["kvmemo.v1"], ["other", "kvmemo.v1"]])
async def test_subprotocol_kvmemo_v1_is_negotiated(offered: list[str]) -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url, subprotocols=offered) as ws:
            assert ws.subprotocol == "kvmemo.v1"
            assert await result(ws, "ping") == "PONG"


async def test_no_subprotocol_gets_version_1_too() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            assert ws.subprotocol is None
            assert await result(ws, "set", "k", "v") == "OK"


# -- pipelining and ordering -----------------------------------------------------------------


async def test_pipelined_messages_are_all_answered_and_matched_by_id() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            count = 300
            for i in range(count):
                await send(ws, req(i, "set", f"k{i}", f"v{i}"))
            answers = await recv_by_id(ws, count)
            assert set(answers) == set(range(count))
            assert all(a["result"] == "OK" for a in answers.values())
            for i in range(count):
                await send(ws, req(f"g{i}", "get", f"k{i}"))
            answers = await recv_by_id(ws, count)
            assert {rid: a["result"] for rid, a in answers.items()} == {
                f"g{i}": f"v{i}" for i in range(count)
            }


async def test_pipelined_incr_on_one_key_take_effect_in_sending_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            count = 500
            for i in range(1, count + 1):
                await send(ws, req(i, "incr", "counter"))
            answers = await recv_by_id(ws, count)
            # Request i is the i-th increment: it must see exactly i.
            assert {rid: a["result"] for rid, a in answers.items()} == {
                i: i for i in range(1, count + 1)
            }
            assert await result(ws, "get", "counter") == str(count)


async def test_pipelined_set_then_get_always_sees_the_set() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            rounds = 250
            for i in range(rounds):
                await send(ws, req(f"s{i}", "set", "k", f"v{i}"))
                await send(ws, req(f"g{i}", "get", "k"))
                await send(ws, [req(f"bs{i}", "append", "log", f"{i},"), req(f"bg{i}", "get", "x")])
            answers = await recv_by_id(ws, 4 * rounds)
            for i in range(rounds):
                assert answers[f"g{i}"]["result"] == f"v{i}"
            log = await result(ws, "get", "log")
            assert log == "".join(f"{i}," for i in range(rounds))


async def test_keyspace_writes_are_ordered_with_keyed_requests() -> None:
    with trio.fail_after(TIMEOUT):
        async with node() as n, open_websocket_url(n.url) as ws:
            for i in range(50):
                await send(ws, req(f"a{i}", "set", "k", "before"))
                await send(ws, req(f"f{i}", "flushall"))
                await send(ws, req(f"b{i}", "get", "k"))
                await send(ws, req(f"c{i}", "set", "k", "after"))
                await send(ws, req(f"d{i}", "dbsize"))
                await send(ws, req(f"e{i}", "get", "k"))
            answers = await recv_by_id(ws, 6 * 50)
            for i in range(50):
                assert answers[f"b{i}"]["result"] is None
                assert answers[f"d{i}"]["result"] == 1
                assert answers[f"e{i}"]["result"] == "after"


OPS = st.sampled_from(["set", "append", "incr", "del", "get", "getdel", "strlen", "flushall"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(OPS, st.sampled_from(["a", "b", "{t}c", "{t}d"]), st.integers(0, 99)),
        min_size=1,
        max_size=60,
    )
)
async def test_pipelined_requests_match_a_sequential_model(
    script: list[tuple[str, str, int]],
) -> None:
    model: dict[str, str] = {}
    expected: list[Any] = []
    messages: list[dict[str, Any]] = []
    for i, (op, key, number) in enumerate(script):
        old = model.get(key)
        if op == "set":
            model[key] = str(number)
            messages.append(req(i, "set", key, str(number)))
            expected.append("OK")
        elif op == "append":
            model[key] = (old or "") + str(number)
            messages.append(req(i, "append", key, str(number)))
            expected.append(len(model[key]))
        elif op == "incr":
            if old is not None and not old.lstrip("-").isdigit():
                expected.append("NOT_INTEGER")
            else:
                model[key] = str(int(old or "0") + 1)
                expected.append(int(model[key]))
            messages.append(req(i, "incr", key))
        elif op == "del":
            expected.append(1 if model.pop(key, None) is not None else 0)
            messages.append(req(i, "del", key))
        elif op == "get":
            expected.append(old)
            messages.append(req(i, "get", key))
        elif op == "getdel":
            expected.append(model.pop(key, None))
            messages.append(req(i, "getdel", key))
        elif op == "strlen":
            expected.append(len(old or ""))
            messages.append(req(i, "strlen", key))
        else:
            model.clear()
            expected.append("OK")
            messages.append(req(i, "flushall"))
    with trio.fail_after(TIMEOUT):
        async with node(StoreConfig(shards=3)) as n, open_websocket_url(n.url) as ws:
            for message in messages:
                await send(ws, message)
            answers = await recv_by_id(ws, len(messages))
    for i, want in enumerate(expected):
        got = answers[i]
        if want == "NOT_INTEGER":
            assert got["error"]["data"]["kind"] == "NOT_INTEGER", (i, script)
        else:
            assert got.get("result") == want, (i, script, got)


# -- limits ----------------------------------------------------------------------------------


async def test_overloaded_when_in_flight_exceeds_the_limit_and_nothing_is_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_in_flight=3) as n, open_websocket_url(n.url) as ws:
            gate = trio.Event()
            real = n.engine.execute_many

            async def held(calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
                await gate.wait()
                return await real(calls)

            monkeypatch.setattr(n.engine, "execute_many", held)
            for i in range(3):
                await send(ws, req(i, "set", f"k{i}", "v"))
            await send(ws, req(3, "set", "over", "v"))
            await send(ws, [req(4, "set", "over2", "v"), req(5, "set", "over3", "v")])
            refused = await recv(ws)
            assert refused["id"] == 3
            assert (refused["error"]["code"], refused["error"]["data"]["kind"]) == (
                -32005,
                "OVERLOADED",
            )
            batch = await recv(ws)
            assert {r["id"] for r in batch} == {4, 5}
            assert all(r["error"]["data"]["kind"] == "OVERLOADED" for r in batch)
            gate.set()
            answers = await recv_by_id(ws, 3)
            assert all(answers[i]["result"] == "OK" for i in range(3))
            assert await result(ws, "mget", "over", "over2", "over3") == [None, None, None]


async def test_a_batch_longer_than_max_in_flight_is_refused_whole() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_in_flight=2) as n, open_websocket_url(n.url) as ws:
            await send(ws, [req(i, "set", f"k{i}", "v") for i in range(3)])
            answer = await recv(ws)
            assert [r["error"]["data"]["kind"] for r in answer] == ["OVERLOADED"] * 3
            assert await result(ws, "dbsize") == 0


async def test_message_over_max_message_size_closes_with_1009() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_message_size=1024) as n:
            async with open_websocket_url(n.url) as ws:
                assert await result(ws, "set", "k", "x" * 900) == "OK"
                await send(ws, req(2, "set", "k", "y" * 2000))
                assert await closed_with(ws) == 1009
            async with open_websocket_url(n.url) as ws2:  # nothing else is affected
                assert await result(ws2, "get", "k") == "x" * 900


async def test_batch_over_max_batch_is_too_large_and_nothing_runs() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_batch=3) as n, open_websocket_url(n.url) as ws:
            await send(ws, [req(i, "set", f"k{i}", "v") for i in range(4)])
            answer = await recv(ws)
            assert answer["id"] is None
            assert (answer["error"]["code"], answer["error"]["data"]["kind"]) == (
                -32004,
                "TOO_LARGE",
            )
            assert await result(ws, "dbsize") == 0
            await send(ws, [req(i, "set", f"k{i}", "v") for i in range(3)])
            assert len(await recv(ws)) == 3


async def test_key_or_value_over_its_limit_is_too_large() -> None:
    store = StoreConfig(shards=2, max_key_size=16, max_value_size=64)
    with trio.fail_after(TIMEOUT):
        async with node(store) as n, open_websocket_url(n.url) as ws:
            for params in (
                ("set", "k" * 17, "v"),
                ("set", "k", "v" * 65),
                ("mset", "a", "v", "b" * 17, "v"),
                ("append", "k", "v" * 65),
                ("get", "k" * 17),
            ):
                err = await error(ws, *params)
                assert (err["code"], err["data"]["kind"]) == (-32004, "TOO_LARGE"), params
            assert await result(ws, "dbsize") == 0
            assert await result(ws, "set", "k" * 16, "v" * 64) == "OK"


async def test_sessions_over_max_sessions_are_closed_with_1008() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(max_sessions=2) as n:
            async with open_websocket_url(n.url) as ws1, open_websocket_url(n.url) as ws2:
                async with open_websocket_url(n.url) as ws3:
                    assert await closed_with(ws3) == 1008
                assert await result(ws1, "ping") == "PONG"
                assert await result(ws2, "ping") == "PONG"
            # Once they are gone there is room again.
            for _ in range(100):
                if not n.server.sessions:
                    break
                await trio.sleep(0.01)
            async with open_websocket_url(n.url) as ws4:
                assert await result(ws4, "ping") == "PONG"


async def test_half_a_request_head_is_disconnected_after_the_handshake_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(handshake_timeout=0.2) as n:
            host, port = n.server.bound or ("", 0)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
            started = trio.current_time()
            with trio.fail_after(2):
                data = await stream.receive_some(4096)
            assert data == b""
            assert trio.current_time() - started >= 0.15
            await stream.aclose()
            async with open_websocket_url(n.url) as ws:
                assert await result(ws, "ping") == "PONG"


async def test_websocket_handshake_not_completed_in_time_is_disconnected() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(handshake_timeout=0.2) as n:
            host, port = n.server.bound or ("", 0)
            stream = await trio.open_tcp_stream(host, port)
            # A request head but never an end to it: trickle one header a time.
            await stream.send_all(b"GET /ws HTTP/1.1\r\n")
            closed = False
            with trio.fail_after(2):
                for _ in range(40):
                    try:
                        await stream.send_all(b"X-Slow: 1\r\n")
                    except trio.BrokenResourceError:
                        closed = True
                        break
                    await trio.sleep(0.05)
            assert closed or await stream.receive_some(4096) == b""


async def test_silent_session_is_closed_with_1008_after_the_idle_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with node(idle_timeout=0.2) as n, open_websocket_url(n.url) as ws:
            assert await result(ws, "ping") == "PONG"
            started = trio.current_time()
            assert await closed_with(ws) == 1008
            assert trio.current_time() - started >= 0.15


# -- hostile input ---------------------------------------------------------------------------

SENTINEL = "sentinel\x00§"  # the strategies below never produce a "§"

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_characters="§"), max_size=20),
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
PARAM = st.one_of(
    st.text(st.characters(blacklist_characters="§"), max_size=12),
    st.integers(-(2**65), 2**65),
    st.sampled_from(["EX", "PX", "NX", "XX", "GET", "KEEPTTL", "MATCH", "COUNT", "0", "-1"]),
    JSON,
)
METHOD = st.sampled_from(sorted(set(COMMANDS) - {"flushall", "flushdb", "debug.kill"})) | st.text(
    max_size=10
)
REQUEST = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0"]), "method": METHOD},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=5), st.none(), JSON),
        "params": st.lists(PARAM, max_size=6) | JSON,
    },
)
MESSAGE = st.one_of(
    # No lone surrogates: a WebSocket text frame is UTF-8, so no client can send one.
    st.text(st.characters(blacklist_characters="§", blacklist_categories=["Cs"]), max_size=60),
    REQUEST.map(json.dumps),
    st.lists(REQUEST, min_size=0, max_size=5).map(json.dumps),
    JSON.map(json.dumps),
    st.binary(max_size=20),
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(MESSAGE, min_size=1, max_size=15))
async def test_hostile_messages_never_close_the_session_nor_touch_others(
    messages: list[str | bytes],
) -> None:
    with trio.fail_after(TIMEOUT):
        async with node(StoreConfig(shards=2)) as n:
            async with open_websocket_url(n.url) as bystander, open_websocket_url(n.url) as ws:
                assert await result(bystander, "set", SENTINEL, "safe") == "OK"
                for message in messages:
                    await ws.send_message(message)
                # Every reply so far is a JSON-RPC response; then the session still works.
                await send(ws, req("final-ping", "ping"))
                while True:
                    answer = await recv(ws)
                    for item in answer if isinstance(answer, list) else [answer]:
                        assert item["jsonrpc"] == "2.0"
                        assert ("result" in item) != ("error" in item)
                        if "error" in item:
                            assert item["error"]["code"] != -32603, item
                    if isinstance(answer, dict) and answer.get("id") == "final-ping":
                        assert answer["result"] == "PONG"
                        break
                assert await result(bystander, "get", SENTINEL) == "safe"
                assert await result(bystander, "ping") == "PONG"


# -- the session's own framing of responses ----------------------------------------------


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(
        st.text(max_size=40)
        | st.integers(0, 70_000).map(lambda n: "x" * n)
        | st.sampled_from(["a" * 125, "a" * 126, "é" * 63, "a" * 65_535, "😀" * 16_384]),
        min_size=1,
        max_size=4,
    )
)
def test_session_writes_text_frames_byte_for_byte_as_wsproto(texts: list[str]) -> None:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert isinstance(next(server.events()), Request)
    server.send(AcceptConnection())
    assert session._frames_writable(server)
    expected = b"".join(server.send(TextMessage(data=text)) for text in texts)
    assert session._text_frames(texts) == expected
    server.send(CloseConnection(code=1000))
    assert not session._frames_writable(server)
