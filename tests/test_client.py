"""The WebSocket client (``kvmemo.client``) against a real in-process server.

The shared command suite runs against the client exactly as against the
embedded store; the client-specific tests prove pipelining, tick batching,
matching by id in any order, the mapping of errors, and that a lost
connection fails pending requests instead of hanging them. Tests that need a
misbehaving server (answers out of order, silence, a dropped connection) use a
small scripted WebSocket server on 127.0.0.1, port 0.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from command_suite import SUITE, SuiteCase
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import kvmemo
from kvmemo.client import (
    Client,
    DisconnectedError,
    connect,
    decode_result,
    encode_params,
    error_class,
    error_from_payload,
)
from kvmemo.config import StoreConfig
from kvmemo.errors import (
    ArityError,
    KVMemoError,
    NoAuthError,
    NotIntegerError,
    RequestTimeoutError,
    UnavailableError,
    UnknownCommandError,
)
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 30  # seconds for a whole test, node start included

# Cases of the suite that the JSON protocol cannot carry: values that are not
# UTF-8 (PROTOCOL.md maps keys and values to JSON strings).
_NOT_UTF8 = "JSON-RPC v1 carries text only: a value that is not UTF-8 cannot be sent"
NOT_UTF8_CASES: dict[str, str] = {
    "echo_returns_its_argument": _NOT_UTF8,  # echo(b"\x00\xff")
    "set_then_get_round_trips_any_bytes": _NOT_UTF8,  # set(k, b"\x00\r\n\xff")
}


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(
            StoreConfig(shards=4), ServerConfig(host="127.0.0.1", port=0, resp=False)
        ) as running:
            yield running


@pytest.fixture
async def kv(node: Node) -> AsyncIterator[Client]:
    async with connect(node.url) as client:
        yield client


def _messages_in(node: Node) -> float:
    return node.server.messages_in.value


# -- the shared command suite -----------------------------------------------------------


@pytest.mark.parametrize("suite_case", SUITE, ids=[c.name for c in SUITE])
async def test_command_suite(suite_case: SuiteCase, kv: Client) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        if suite_case.name not in NOT_UTF8_CASES:
            await suite_case.run(kv)
            return
        # Runs until its first non-UTF-8 value, which the client must refuse clearly.
        with pytest.raises(ValueError, match=r"^argument \d+ is not valid UTF-8; "):
            await suite_case.run(kv)
    pytest.xfail(NOT_UTF8_CASES[suite_case.name])


# -- results are the embedded store's ------------------------------------------------------


PARITY_CALLS: list[tuple[Any, ...]] = [
    ("set", "k", "v"),
    ("set", "k", "w", "GET"),
    ("set", "k", "OK", "GET"),
    ("get", "k"),
    ("set", "k", "x", "NX"),
    ("ping",),
    ("ping", "PONG"),
    ("echo", "OK"),
    ("type", "k"),
    ("type", "missing"),
    ("mset", "a", "1", "b", "2"),
    ("msetnx", "a", "1", "c", "3"),
    ("mget", "a", "b", "missing"),
    ("incr", "a"),
    ("incrbyfloat", "a", 0.5),
    ("setex", "e", 100, "v"),
    ("psetex", "p", 100_000, "v"),
    ("ttl", "e"),
    ("getrange", "k", 0, 1),
    ("del", "a", "b", "missing"),
    ("exists", "k", "k"),
    ("keys", "k*"),
    ("flushdb",),
    ("dbsize",),
    ("flushall",),
    ("scan", "0"),
]


async def test_results_are_identical_to_the_embedded_stores(kv: Client) -> None:
    async with kvmemo.open_store(shards=4) as store:
        for call in PARITY_CALLS:
            embedded = await store.execute(*call)
            remote = await kv.execute(*call)
            assert remote == embedded, call
            assert type(remote) is type(embedded), call


async def test_time_is_a_list_of_bytes(kv: Client) -> None:
    seconds, micros = await kv.time()
    assert isinstance(seconds, bytes)
    assert isinstance(micros, bytes)


# -- pipelining and batching -------------------------------------------------------------


async def test_a_thousand_concurrent_gets_from_fifty_tasks_are_all_answered_correctly(
    kv: Client,
) -> None:
    values = {f"key:{i}": f"value:{i}" for i in range(1000)}
    assert await kv.mset(list(values.items())) == "OK"
    answers: dict[str, bytes | None] = {}

    async def get(key: str) -> None:
        answers[key] = await kv.get(key)

    async def worker(first: int) -> None:
        async with trio.open_nursery() as inner:
            for i in range(first, first + 20):
                inner.start_soon(get, f"key:{i}")

    before = kv.statistics()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(worker, task * 20)
    after = kv.statistics()
    assert answers == {key: value.encode() for key, value in values.items()}
    assert after.requests_sent - before.requests_sent == 1000
    assert after.messages_sent - before.messages_sent < 1000  # they were batched
    assert after.pending == 0


async def test_requests_issued_in_the_same_tick_travel_in_one_message(
    node: Node, kv: Client
) -> None:
    await kv.set("k", "v")
    before_server = _messages_in(node)
    before_client = kv.statistics().messages_sent
    results: list[bytes | None] = []

    async def get() -> None:
        results.append(await kv.get("k"))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(get)
    assert results == [b"v"] * 100
    assert _messages_in(node) - before_server == 1
    assert kv.statistics().messages_sent - before_client == 1


async def test_a_tick_of_requests_is_split_at_max_batch(node: Node) -> None:
    async with connect(node.url, max_batch=10) as kv:
        before = _messages_in(node)
        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(kv.set, f"k{i}", i)
        assert _messages_in(node) - before == 3
        assert await kv.mget(*[f"k{i}" for i in range(25)]) == [str(i).encode() for i in range(25)]


async def test_sequential_requests_are_sent_one_message_each(node: Node, kv: Client) -> None:
    before = _messages_in(node)
    for i in range(5):
        await kv.set("k", i)
    assert _messages_in(node) - before == 5
    assert await kv.get("k") == b"4"


async def test_execute_many_sends_one_message_and_returns_errors(node: Node, kv: Client) -> None:
    before = _messages_in(node)
    results = await kv.execute_many(("set", "n", "1"), ("incr", "n"), ("incr", "nope", "x"))
    assert _messages_in(node) - before == 1
    assert results[:2] == ["OK", 2]
    assert isinstance(results[2], ArityError)


async def test_an_empty_call_is_an_unknown_command_as_in_the_embedded_store(kv: Client) -> None:
    # Was an IndexError before anything was sent; the embedded store's rule.
    results = await kv.execute_many(("set", "a", "1"), (), (b"GET", "a"))
    assert results[0] == "OK"
    assert isinstance(results[1], UnknownCommandError)
    assert results[2] == b"1"
    with pytest.raises(UnknownCommandError) as caught:
        await kv.transaction(("set", "a", "2"), ())
    assert caught.value.data["index"] == 1
    assert await kv.get("a") == b"1"  # refused whole: nothing ran


# -- a scripted server ----------------------------------------------------------------------

Script = Callable[[WebSocketConnection, list[Any]], Awaitable[None]]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Start a WebSocket server whose session runs a script; returns its URL.

    The script gets the connection and a list where it records what it receives.
    """
    async with trio.open_nursery() as nursery:

        async def start(script: Script) -> str:
            received: list[Any] = []

            async def handler(request: WebSocketRequest) -> None:
                ws = await request.accept(subprotocol="kvmemo.v1")
                try:
                    await script(ws, received)
                except ConnectionClosed:
                    pass  # the client went away: the script ends with it

            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            return f"ws://127.0.0.1:{server.port}/ws"

        yield start
        nursery.cancel_scope.cancel()


def _requests_of(message: str | bytes) -> list[dict[str, Any]]:
    document = json.loads(message)
    return document if isinstance(document, list) else [document]


async def test_responses_in_reverse_order_reach_their_own_callers(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def reverse(ws: WebSocketConnection, received: list[Any]) -> None:
        requests = _requests_of(await ws.get_message())
        for request in reversed(requests):  # one message each, last request first
            answer = {"jsonrpc": "2.0", "id": request["id"], "result": request["params"][0]}
            await ws.send_message(json.dumps(answer))
        await trio.sleep_forever()

    url = await scripted(reverse)
    results: dict[int, bytes | None] = {}

    async def get(i: int) -> None:
        results[i] = await client.get(f"key-{i}")

    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as client, trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(get, i)
    assert results == {i: f"key-{i}".encode() for i in range(20)}


async def test_a_shuffled_batch_answer_is_matched_by_id(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def shuffle(ws: WebSocketConnection, received: list[Any]) -> None:
        requests = _requests_of(await ws.get_message())
        answers = [{"jsonrpc": "2.0", "id": r["id"], "result": r["params"][1]} for r in requests]
        await ws.send_message(json.dumps(answers[1::2] + answers[0::2]))
        await trio.sleep_forever()

    url = await scripted(shuffle)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as kv:
            results = await kv.execute_many(*[("incrby", "k", i) for i in range(9)])
    assert results == list(range(9))


async def test_a_lost_connection_fails_every_pending_request(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def hang_up(ws: WebSocketConnection, received: list[Any]) -> None:
        received.extend(_requests_of(await ws.get_message()))
        await ws.aclose(1011, "going away")

    url = await scripted(hang_up)
    errors: list[BaseException] = []

    async def get(i: int) -> None:
        try:
            await client.get(f"k{i}")
        except DisconnectedError as exc:
            errors.append(exc)

    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as client:
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(get, i)
            assert len(errors) == 10
            assert client.closed
            with pytest.raises(DisconnectedError, match=r"close code 1011"):
                await client.get("later")
    for error in errors:
        assert isinstance(error, ConnectionError)
        assert isinstance(error, KVMemoError)
        assert error.kind == "DISCONNECTED"
        assert error.data == {"applied": None}
    assert client.statistics().pending == 0


async def test_a_transaction_waiting_for_a_watch_block_fails_when_the_connection_is_lost(
    node: Node,
) -> None:
    """It checked the connection, then waited on the watch lock; the loss came meanwhile."""
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(node.url) as client:
            outcome: list[BaseException] = []

            async def other_task() -> None:
                try:
                    await client.transaction(("SET", "b", "1"))
                except DisconnectedError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                async with client.watch("a"):
                    nursery.start_soon(other_task)
                    await trio.testing.wait_all_tasks_blocked()  # it waits for the watch block
                    await client.abort()
            assert len(outcome) == 1
            assert outcome[0].data == {"applied": None}


async def test_a_server_that_goes_away_fails_calls_instead_of_hanging() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def run_node(*, task_status: trio.TaskStatus[Node]) -> None:
                async with open_node(StoreConfig(shards=2), ServerConfig(port=0, resp=False)) as n:
                    task_status.started(n)
                    await trio.sleep_forever()

            node_scope = trio.CancelScope()

            async def run_node_in_scope(*, task_status: trio.TaskStatus[Node]) -> None:
                with node_scope:
                    await run_node(task_status=task_status)

            node: Node = await nursery.start(run_node_in_scope)
            async with connect(node.url) as kv:
                assert await kv.set("k", "v") == "OK"
                node_scope.cancel()
                lost: DisconnectedError | None = None
                for _ in range(100):  # the first calls may still find the socket open
                    try:
                        await kv.get("k")
                    except DisconnectedError as exc:
                        lost = exc
                        break
                    await trio.sleep(0.01)
                assert lost is not None, "calls kept succeeding after the server went away"
                assert kv.closed


async def test_a_request_cancelled_before_it_is_sent_never_reaches_the_server(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def echo_and_record(ws: WebSocketConnection, received: list[Any]) -> None:
        while True:
            for request in _requests_of(await ws.get_message()):
                received.append(request)
                answer = {"jsonrpc": "2.0", "id": request["id"], "result": None}
                await ws.send_message(json.dumps(answer))

    received: list[Any] = []

    async def record(ws: WebSocketConnection, _: list[Any]) -> None:
        await echo_and_record(ws, received)

    url = await scripted(record)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as kv:
            with trio.CancelScope() as scope:
                scope.cancel()
                await kv.get("cancelled")
            assert await kv.get("sent") is None
            assert kv.statistics().pending == 0
    assert [r["params"] for r in received] == [["sent"]]


async def test_no_answer_within_the_timeout_raises_request_timeout(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def silent(ws: WebSocketConnection, received: list[Any]) -> None:
        while True:
            received.append(await ws.get_message())

    url = await scripted(silent)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url, timeout=0.2) as kv:
            with pytest.raises(RequestTimeoutError) as caught:
                await kv.get("k")
            assert caught.value.kind == "TIMEOUT"
            assert caught.value.data == {"applied": None}
            assert kv.statistics().pending == 0
            assert not kv.closed


async def test_an_error_without_an_id_closes_the_connection_with_a_clear_error(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    async def refuse(ws: WebSocketConnection, received: list[Any]) -> None:
        await ws.get_message()
        error = {"code": -32004, "message": "batch too long", "data": {"kind": "TOO_LARGE"}}
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": None, "error": error}))
        await trio.sleep_forever()

    url = await scripted(refuse)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as kv:
            with pytest.raises(DisconnectedError, match=r"refused a message: TOO_LARGE"):
                await kv.get("k")


# -- errors --------------------------------------------------------------------------------


async def test_server_errors_raise_the_class_of_their_kind(kv: Client) -> None:
    await kv.set("text", "abc")
    with pytest.raises(NotIntegerError) as not_integer:
        await kv.incr("text")
    assert not_integer.value.kind == "NOT_INTEGER"
    assert not_integer.value.message == "value is not an integer or out of range"
    with pytest.raises(ArityError) as arity:
        await kv.execute("get")
    assert arity.value.kind == "ARITY"
    with pytest.raises(UnknownCommandError) as unknown:
        await kv.execute("frobnicate")
    assert unknown.value.kind == "UNKNOWN_METHOD"


async def test_error_data_and_unknown_kinds_are_kept(
    scripted: Callable[[Script], Awaitable[str]],
) -> None:
    errors = {
        "a": {"code": -32003, "message": "restarting", "data": {"kind": "UNAVAILABLE"}},
        "b": {"code": -32099, "message": "new", "data": {"kind": "FROBNICATED", "x": 1}},
    }
    errors["a"]["data"]["retry_after_ms"] = 50  # type: ignore[index]

    async def fail(ws: WebSocketConnection, received: list[Any]) -> None:
        while True:
            for request in _requests_of(await ws.get_message()):
                error = errors[request["params"][0]]
                await ws.send_message(
                    json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error})
                )

    url = await scripted(fail)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(url) as kv:
            with pytest.raises(UnavailableError) as unavailable:
                await kv.get("a")
            with pytest.raises(KVMemoError) as unknown:
                await kv.get("b")
    assert unavailable.value.data == {"retry_after_ms": 50}
    assert unknown.value.kind == "FROBNICATED"
    assert unknown.value.code == -32099
    assert unknown.value.data == {"x": 1}
    assert type(unknown.value) is error_class("FROBNICATED")


def test_error_from_payload_maps_every_known_kind_to_its_class() -> None:
    for kind, cls in kvmemo.errors.ERROR_KINDS.items():
        error = error_from_payload({"code": cls.code, "message": "m", "data": {"kind": kind}})
        assert type(error) is cls
        assert error.message == "m"
        assert error.data == {}


def test_protocol_level_kinds_get_their_own_classes() -> None:
    parse = error_from_payload({"code": -32700, "message": "bad", "data": {"kind": "PARSE"}})
    assert isinstance(parse, KVMemoError)
    assert parse.kind == "PARSE"
    assert parse.code == -32700
    assert type(parse).__name__ == "ParseError"
    invalid = error_class("INVALID_REQUEST", -32600)
    assert invalid.__name__ == "InvalidRequestError"
    assert error_class("INVALID_REQUEST") is invalid


def test_a_malformed_error_object_is_an_internal_error() -> None:
    assert error_from_payload("oops").kind == "INTERNAL"
    assert error_from_payload({"message": "no data"}).kind == "INTERNAL"


# -- the pure mapping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "result", "expected"),
    [
        ("get", ("k",), "v", b"v"),
        ("get", ("k",), None, None),
        ("set", ("k", "v"), "OK", "OK"),
        ("set", ("k", "v", "GET"), "OK", b"OK"),
        ("set", ("k", "v", "get"), None, None),
        ("mset", ("k", "v"), "OK", "OK"),
        ("flushall", (), "OK", "OK"),
        ("flushdb", (), "OK", "OK"),
        ("setex", ("k", 1, "v"), "OK", "OK"),
        ("psetex", ("k", 1, "v"), "OK", "OK"),
        ("save", (), "OK", "OK"),
        ("debug.kill", ("shard-0",), "OK", "OK"),
        ("ping", (), "PONG", "PONG"),
        ("ping", ("PONG",), "PONG", b"PONG"),
        ("echo", ("OK",), "OK", b"OK"),
        ("type", ("k",), "string", "string"),
        ("type", ("k",), "none", "none"),
        ("mget", ("a", "b"), ["1", None], [b"1", None]),
        ("scan", ("0",), ["0", ["a", "b"]], [b"0", [b"a", b"b"]]),
        ("time", (), ["1", "2"], [b"1", b"2"]),
        ("incr", ("k",), 3, 3),
        ("info", (), {"server": {"version": "1"}}, {"server": {"version": "1"}}),
        ("debug.actors", (), [{"name": "a"}], [{"name": "a"}]),
        ("command.list", (), ["get", "set"], ["get", "set"]),
    ],
)
def test_decode_result_follows_the_embedded_stores_types(
    method: str, args: tuple[Any, ...], result: Any, expected: Any
) -> None:
    decoded = decode_result(method, args, result)
    assert decoded == expected
    assert type(decoded) is type(expected)


def test_encode_params_keeps_integers_and_sends_text() -> None:
    assert encode_params(["k", b"v", 10, 1.5, "é"]) == ["k", "v", 10, "1.5", "é"]


def test_encode_params_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(
        ValueError,
        match=r"^argument 1 is not valid UTF-8; the JSON-RPC protocol carries text only$",
    ):
        encode_params(["k", b"\xff"])


def test_encode_params_refuses_a_bool() -> None:
    with pytest.raises(TypeError, match=r"^a command argument cannot be a bool, got True$"):
        encode_params([True])


# -- connecting ----------------------------------------------------------------------------


async def test_a_token_is_sent_first() -> None:
    config = ServerConfig(port=0, resp=False, tokens=frozenset({"s3cret"}))
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=2), config) as node:
            async with connect(node.url, token="s3cret") as kv:
                assert await kv.set("k", "v") == "OK"
            async with connect(node.url) as kv:
                with pytest.raises(NoAuthError):
                    await kv.get("k")
            with pytest.raises(NoAuthError, match=r"^invalid token$"):
                async with connect(node.url, token="wrong"):
                    pass


async def test_connecting_to_a_closed_port_raises_disconnected() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(DisconnectedError, match=r"^cannot connect"):
        async with connect(f"ws://127.0.0.1:{port}/ws"):
            pass


async def test_connect_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match=r"^max_batch must be >= 1, got 0$"):
        async with connect("ws://127.0.0.1:1/ws", max_batch=0):
            pass
    with pytest.raises(ValueError, match=r"^timeout must be > 0, got 0$"):
        async with connect("ws://127.0.0.1:1/ws", timeout=0):
            pass


async def test_an_error_in_the_block_propagates_unwrapped(node: Node) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with connect(node.url):
            raise KeyError("mine")


async def test_calls_after_the_block_raise_disconnected(node: Node) -> None:
    async with connect(node.url) as kv:
        pass
    with pytest.raises(DisconnectedError, match=r"was closed$"):
        await kv.get("k")


# -- chaos API -------------------------------------------------------------------------------


async def test_actors_and_kill_actor_mirror_the_embedded_store() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(
            StoreConfig(shards=2, chaos=True), ServerConfig(port=0, resp=False)
        ) as node:
            async with connect(node.url) as kv:
                names = {actor["name"] for actor in await kv.actors()}
                assert {"shard-0", "shard-1", "ttl-manager"} <= names
                assert await kv.kill_actor("shard-0") is True
                while True:  # the supervisor restarts it
                    shard = {a["name"]: a for a in await kv.actors()}["shard-0"]
                    if shard["restarts"] >= 1 and shard["state"] == "running":
                        break
                    await trio.sleep(0.01)


async def test_kill_actor_needs_chaos_mode(kv: Client) -> None:
    with pytest.raises(UnknownCommandError):
        await kv.kill_actor("shard-0")
