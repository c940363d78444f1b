"""The WebSocket client's reconnection (``connect(..., reconnect=...)``).

Against a real in-process node on 127.0.0.1. A connection is lost in three
ways: the node is stopped and started again on the same port (a server
restart: its data is gone), the server closes the client's session (the data
stays), or a TCP relay in front of the node cuts every connection (it can
also hold the server's replies back, so that a request is applied but
unanswered when the connection goes: in flight, deterministically).

Waiting for a network effect (a socket seen closed, a request reaching the
server through the relay) polls under the test's ``trio.fail_after``; every
other wait is on an event or ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from kvmemo import repl
from kvmemo.client import (
    Backoff,
    Client,
    ConnectionState,
    DisconnectedError,
    connect,
)
from kvmemo.config import StoreConfig
from kvmemo.engine.pubsub import Message
from kvmemo.errors import KVMemoError, NoAuthError, RequestTimeoutError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 30  # seconds for a whole test, node starts included
POLL = 0.005  # seconds between looks at a network effect
PROMPT = 1.0  # seconds: "at once" for leaving a client block
# Quick retries, so that a reconnection after a restart takes milliseconds.
FAST = Backoff(initial_delay=0.01, max_delay=0.05, jitter=0.0)


async def _eventually(predicate: Callable[[], bool]) -> None:
    """Wait for a network effect, looking every POLL seconds (bounded by the test)."""
    while not predicate():  # noqa: ASYNC110 - a socket seen closed has no event to wait on
        await trio.sleep(POLL)


async def _applied(node: Node, key: bytes, value: bytes) -> None:
    """Wait until ``key`` holds ``value`` on the node: a request that crossed the network."""
    while await node.engine.execute("get", [key]) != value:  # noqa: ASYNC110 - as above
        await trio.sleep(POLL)


@attrs.define
class Restartable:
    """A node that the test stops and starts again, always on the same port."""

    nursery: trio.Nursery
    port: int = 0
    node: Node | None = None
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event | None = None

    async def start(self, tokens: frozenset[str] = frozenset()) -> Node:
        config = ServerConfig(host="127.0.0.1", port=self.port, resp=False, tokens=tokens)
        node: Node = await self.nursery.start(self._run, config)
        self.node = node
        assert node.server.bound is not None
        self.port = node.server.bound[1]
        return node

    async def _run(self, config: ServerConfig, *, task_status: trio.TaskStatus[Node]) -> None:
        self._scope = trio.CancelScope()
        self._stopped = stopped = trio.Event()
        try:
            with self._scope:
                async with open_node(StoreConfig(shards=2), config) as node:
                    task_status.started(node)
                    await trio.sleep_forever()
        finally:
            stopped.set()

    async def stop(self) -> None:
        """Stop the node: every session's socket is closed, the port is free."""
        assert self._scope is not None
        assert self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()
        self.node = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
async def server() -> AsyncIterator[Restartable]:
    async with trio.open_nursery() as nursery:
        restartable = Restartable(nursery)
        await restartable.start()
        yield restartable
        nursery.cancel_scope.cancel()


class Relay:
    """A TCP relay in front of a node: ``hold`` keeps the server's bytes back,
    ``cut`` closes every connection at once (the client sees it lost)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()  # listening already: connections wait in the backlog
        await trio.serve_listeners(self._relay, listeners)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def hold(self) -> None:
        self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            self.connections += 1
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, False)
                        nursery.start_soon(self._pump, upstream, client, True)
                finally:
                    await upstream.aclose()
            finally:
                self._scopes.discard(scope)
                await client.aclose()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, held: bool) -> None:
        try:
            while data := await source.receive_some(65536):
                if held:
                    await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await sink.aclose()  # one side ended: end the other (the nursery's other pump follows)
        await source.aclose()


async def _kill_sessions(node: Node) -> None:
    """The server closes every WebSocket session (its data stays)."""
    for session in list(node.server.sessions):
        await session.ws.aclose(1001, "killed by the test")


async def _publish(node: Node, channel: bytes, data: bytes) -> int:
    receivers: int = await node.engine.execute("publish", [channel, data])
    return receivers


# -- Backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum() -> None:
    policy = Backoff(initial_delay=0.1, max_delay=1.0, factor=2.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay(10_000) == 1.0  # no overflow for a long outage


def test_backoff_jitter_spreads_within_its_fraction_and_never_past_the_maximum() -> None:
    policy = Backoff(initial_delay=1.0, max_delay=10.0, factor=2.0, jitter=0.25)
    assert policy.delay(1, lambda: 0.0) == pytest.approx(0.75)
    assert policy.delay(1, lambda: 0.5) == pytest.approx(1.0)
    assert policy.delay(1, lambda: 0.999999) == pytest.approx(1.25, rel=1e-5)
    assert policy.delay(20, lambda: 0.999999) == 10.0
    assert policy.delay(20, lambda: 0.0) == pytest.approx(7.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"initial_delay": 0}, r"^initial_delay must be > 0 and finite, got 0$"),
        (
            {"initial_delay": 1.0, "max_delay": 0.5},
            r"^max_delay must be finite and >= initial_delay \(1.0\), got 0.5$",
        ),
        ({"max_delay": float("inf")}, r"^max_delay must be finite and >= initial_delay"),
        ({"factor": 0.5}, r"^factor must be >= 1 and finite, got 0.5$"),
        ({"jitter": 1.0}, r"^jitter must be in \[0, 1\), got 1.0$"),
        ({"jitter": -0.1}, r"^jitter must be in \[0, 1\), got -0.1$"),
        ({"max_attempts": 0}, r"^max_attempts must be an int >= 1 or None, got 0$"),
        ({"max_attempts": True}, r"^max_attempts must be an int >= 1 or None, got True$"),
    ],
)
def test_backoff_refuses_values_out_of_range(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**fields)


async def test_connect_refuses_a_reconnect_that_is_not_a_bool_or_a_backoff() -> None:
    with pytest.raises(TypeError, match=r"^reconnect must be a bool or a Backoff, got 3$"):
        async with connect("ws://127.0.0.1:1/ws", reconnect=3):  # type: ignore[arg-type]
            pass


# -- off by default ------------------------------------------------------------------------------


async def test_without_reconnect_a_lost_connection_closes_the_client(
    server: Restartable,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url) as kv:
            assert kv.state is ConnectionState.OPEN
            assert await kv.set("k", "v") == "OK"
            assert server.node is not None
            await _kill_sessions(server.node)
            await _eventually(lambda: kv.closed)
            assert kv.state.value == "closed"
            with pytest.raises(DisconnectedError, match=r"close code 1001"):
                await kv.get("k")
            with pytest.raises(DisconnectedError):
                await kv.wait_connected()


# -- subscriptions ---------------------------------------------------------------------------


async def test_a_subscribe_block_receives_messages_published_after_the_server_restarts(
    server: Restartable,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            connect(server.url, reconnect=FAST) as kv,
            kv.subscribe("news", patterns=["chat:*"]) as sub,
        ):
            assert server.node is not None
            assert await _publish(server.node, b"news", b"before") == 1
            assert await sub.get() == Message(b"news", b"before")

            await server.stop()
            await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
            node = await server.start()
            await kv.wait_connected()  # resubscribed before it counts as connected
            assert kv.statistics().reconnects == 1

            assert await _publish(node, b"news", b"after") == 1
            assert await _publish(node, b"chat:1", b"hi") == 1
            assert await sub.get() == Message(b"news", b"after")
            assert await sub.get() == Message(b"chat:1", b"hi", b"chat:*")
            assert sub.channels == [b"news"]
            assert sub.patterns == [b"chat:*"]
            # The block's own changes go on working on the new session.
            assert await sub.subscribe("sport") == 3
            assert await _publish(node, b"sport", b"goal") == 1
            assert await sub.get() == Message(b"sport", b"goal")
        # The block's end left every channel on the new session too.
        assert await node.engine.execute("pubsub", [b"numsub", b"news", b"sport"]) == [
            b"news",
            0,
            b"sport",
            0,
        ]


async def test_a_subscribe_block_survives_a_session_the_server_closes(
    server: Restartable,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        node = server.node
        assert node is not None
        async with connect(server.url, reconnect=FAST) as kv, kv.subscribe("c") as sub:
            await _kill_sessions(node)
            await _eventually(lambda: kv.state is not ConnectionState.OPEN)
            await kv.wait_connected()
            assert await _publish(node, b"c", b"again") == 1
            assert await sub.get() == Message(b"c", b"again")


# -- requests across a reconnection ----------------------------------------------------------------


async def test_a_call_in_flight_when_the_connection_drops_fails_and_is_never_replayed(
    server: Restartable,
) -> None:
    node = server.node
    assert node is not None
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = Relay(server.port)
            await nursery.start(relay.serve)
            async with connect(relay.url, reconnect=FAST) as kv:
                assert await kv.ping() == "PONG"
                relay.hold()  # the server's answers stay in the relay
                failed = trio.Event()
                caught: list[BaseException] = []

                async def incr_once() -> None:
                    try:
                        await kv.incr("n")
                    except DisconnectedError as exc:
                        caught.append(exc)
                    failed.set()

                nursery.start_soon(incr_once)
                # Applied by the server, its answer held back: in flight.
                await _applied(node, b"n", b"1")
                relay.cut()
                relay.release()
                await failed.wait()
                assert len(caught) == 1
                error = caught[0]
                assert isinstance(error, KVMemoError)
                assert error.kind == "DISCONNECTED"
                assert error.data == {"applied": None}

                await kv.wait_connected()
                assert kv.statistics().reconnects == 1
                # Not replayed on the new connection: still applied once.
                assert await kv.get("n") == b"1"
                assert await kv.incr("n") == 2
                assert kv.statistics().pending == 0
            assert relay.connections == 2
            nursery.cancel_scope.cancel()


async def test_calls_made_while_reconnecting_wait_and_run_once_reconnected(
    server: Restartable,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, reconnect=FAST) as kv:
            await server.stop()
            await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
            results: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    results.append(await kv.incr("n"))

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                assert results == []  # waiting for the connection, not failed
                assert kv.statistics().pending == 1
                await server.start()
            assert results == [1]  # sent once, on the new connection
            assert await kv.get("n") == b"1"


async def test_a_call_cancelled_while_reconnecting_is_never_sent(server: Restartable) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, reconnect=FAST) as kv:
            await server.stop()
            await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kv.incr, "n")
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert kv.statistics().pending == 0
            await server.start()
            await kv.wait_connected()
            assert await kv.get("n") is None  # the cancelled incr never reached the server
            assert kv.state is ConnectionState.OPEN


async def test_a_call_waiting_for_a_reconnection_times_out_as_not_applied(
    server: Restartable,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, timeout=0.2, reconnect=FAST) as kv:
            await server.stop()
            await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
            with pytest.raises(RequestTimeoutError, match=r"it was not sent") as caught:
                await kv.incr("n")
            assert caught.value.data == {"applied": False}
            assert kv.statistics().pending == 0
            await server.start()
            await kv.wait_connected()
            assert await kv.get("n") is None


async def test_exhausted_attempts_close_the_client_with_a_clear_error(
    server: Restartable,
) -> None:
    policy = Backoff(initial_delay=0.01, max_delay=0.02, jitter=0.0, max_attempts=3)
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, reconnect=policy) as kv, kv.subscribe("c") as sub:
            outcome: list[BaseException] = []
            async with trio.open_nursery() as nursery:

                async def waiting_call() -> None:
                    try:
                        await kv.get("k")
                    except DisconnectedError as exc:
                        outcome.append(exc)

                await server.stop()
                await _eventually(lambda: kv.state is not ConnectionState.OPEN)
                nursery.start_soon(waiting_call)
                with pytest.raises(DisconnectedError, match=r"after 3 attempts") as gave_up:
                    await kv.wait_connected()
            assert str(gave_up.value).startswith(f"gave up reconnecting to {server.url}")
            assert "cannot connect" in str(gave_up.value)
            assert len(outcome) == 1
            assert "gave up reconnecting" in str(outcome[0])
            assert kv.closed
            assert kv.state is ConnectionState.CLOSED
            with pytest.raises(DisconnectedError, match=r"^gave up reconnecting"):
                await kv.get("k")
            with pytest.raises(DisconnectedError, match=r"^gave up reconnecting"):
                await sub.get()


async def test_calls_held_back_by_a_full_outbox_fail_when_the_client_gives_up(
    server: Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure while reconnecting: a caller waiting for room is woken by the end."""
    monkeypatch.setattr("kvmemo.client.OUTBOX_SIZE", 1)
    policy = Backoff(initial_delay=0.01, max_delay=0.02, jitter=0.0, max_attempts=2)
    outcome: list[BaseException] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, reconnect=policy) as kv:
            await server.stop()
            await _eventually(lambda: kv.state is not ConnectionState.OPEN)
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    try:
                        await kv.set(f"k{i}", "v")
                    except DisconnectedError as exc:
                        outcome.append(exc)

                for i in range(3):  # one in the outbox, two waiting for room
                    nursery.start_soon(call, i)
    assert len(outcome) == 3
    assert all("gave up reconnecting" in str(exc) for exc in outcome)


# -- watch blocks --------------------------------------------------------------------------------


async def test_a_watch_block_whose_connection_is_lost_fails_instead_of_running_unchecked(
    server: Restartable,
) -> None:
    node = server.node
    assert node is not None
    with trio.fail_after(TEST_TIMEOUT):
        async with connect(server.url, reconnect=FAST) as kv:
            await kv.set("balance", "100")

            async def withdraw_across_a_lost_connection() -> None:
                async with kv.watch("balance"):
                    balance = int(await kv.get("balance") or 0)
                    await _kill_sessions(node)
                    await _eventually(lambda: kv.state is not ConnectionState.OPEN)
                    await kv.wait_connected()  # reconnected: yet the watches are gone
                    await kv.transaction(("SET", "balance", str(balance - 10)))

            with pytest.raises(DisconnectedError, match=r"watches of this watch block") as lost:
                await withdraw_across_a_lost_connection()
            assert lost.value.data == {"applied": False}
            assert await kv.get("balance") == b"100"  # the transaction never ran
            # The next watch block works on the new session.
            async with kv.watch("balance"):
                balance = int(await kv.get("balance") or 0)
                assert await kv.transaction(("SET", "balance", str(balance - 10))) == ["OK"]
            assert await kv.get("balance") == b"90"


# -- closing -------------------------------------------------------------------------------------


async def test_closing_the_client_during_the_backoff_returns_at_once(
    server: Restartable,
) -> None:
    slow = Backoff(initial_delay=60.0, max_delay=60.0, jitter=0.0)
    outcome: list[BaseException] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def waiting_call(kv: Client) -> None:
                try:
                    await kv.get("k")
                except DisconnectedError as exc:
                    outcome.append(exc)

            async with connect(server.url, reconnect=slow) as kv:
                await server.stop()
                await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
                nursery.start_soon(waiting_call, kv)
                await trio.testing.wait_all_tasks_blocked()
                left = trio.current_time()
            assert trio.current_time() - left < PROMPT
        assert len(outcome) == 1
        assert str(outcome[0]).endswith("was closed")
        assert kv.closed


async def test_closing_the_client_during_a_dial_returns_at_once(server: Restartable) -> None:
    """The port answers TCP but never the WebSocket handshake: the dial hangs until closed."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with connect(server.url, reconnect=FAST) as kv:
                await server.stop()
                dialled = trio.Event()

                async def black_hole(stream: trio.SocketStream) -> None:
                    dialled.set()
                    await trio.sleep_forever()

                listeners = await trio.open_tcp_listeners(server.port, host="127.0.0.1")
                nursery.start_soon(trio.serve_listeners, black_hole, listeners)
                await dialled.wait()
                assert kv.state is ConnectionState.RECONNECTING
                left = trio.current_time()
            assert trio.current_time() - left < PROMPT
            assert kv.state.value == "closed"
            nursery.cancel_scope.cancel()


# -- authentication --------------------------------------------------------------------------


async def test_the_token_is_sent_again_on_every_reconnection() -> None:
    tokens = frozenset({"s3cret"})
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery)
            await server.start(tokens)
            async with connect(server.url, token="s3cret", reconnect=FAST) as kv:
                assert await kv.set("k", "v") == "OK"
                await server.stop()
                await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
                await server.start(tokens)
                await kv.wait_connected()
                assert await kv.set("k", "again") == "OK"  # NOAUTH without the token

                # A server that no longer takes the token: closed for good.
                await server.stop()
                await _eventually(lambda: kv.state is ConnectionState.RECONNECTING)
                await server.start(frozenset({"other"}))
                with pytest.raises(DisconnectedError, match=r"refused the token") as refused:
                    await kv.wait_connected()
                assert "invalid token" in str(refused.value)
                assert kv.state is ConnectionState.CLOSED
            # The first connection is not retried: a wrong token fails connect() at once.
            with pytest.raises(NoAuthError, match=r"^invalid token$"):
                async with connect(server.url, token="s3cret", reconnect=FAST):
                    pass
            nursery.cancel_scope.cancel()


async def test_the_first_connection_is_not_retried(server: Restartable) -> None:
    await server.stop()
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(DisconnectedError, match=r"^cannot connect"):
        async with connect(server.url, reconnect=FAST):
            pass


# -- kvmemo cli ---------------------------------------------------------------------------------


def _prompt_args(url: str) -> argparse.Namespace:
    return argparse.Namespace(url=url, token=None, one_command=None)


async def _prompt(
    server: Restartable, lines: list[str], *, show_prompt: bool = True
) -> tuple[int, list[str]]:
    """Run ``kvmemo cli`` on ``lines``: "restart" and "stop" act on the server between two.

    Returns the exit status and what was printed.
    """
    script = iter(lines)
    out: list[str] = []

    def read_line(prompt: str) -> str:
        line = next(script, None)
        if line is None:
            raise EOFError
        if line in ("restart", "stop"):  # the server goes away between two commands
            trio.from_thread.run(server.stop)
            if line == "restart":
                trio.from_thread.run(server.start)
            return next(script)
        return line

    with trio.fail_after(TEST_TIMEOUT):
        status = await repl.main_async(
            _prompt_args(server.url), read_line=read_line, write=out.append, show_prompt=show_prompt
        )
    return status, out


async def test_the_cli_prompt_goes_on_after_the_server_restarts(
    server: Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repl, "CLI_RECONNECT", FAST)
    status, out = await _prompt(server, ["SET a 1", "restart", "SET b 2", "GET b"])
    assert (status, out) == (0, ["OK", "OK", '"2"', ""])


async def test_the_cli_prompt_ends_once_reconnecting_gives_up(
    server: Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repl, "CLI_RECONNECT", attrs.evolve(FAST, max_attempts=2))
    status, out = await _prompt(server, ["SET a 1", "stop", "GET a"])
    assert status == 1
    assert out[0] == "OK"
    assert "gave up reconnecting" in out[1]


async def test_piped_input_still_ends_when_the_connection_is_lost(server: Restartable) -> None:
    status, out = await _prompt(server, ["SET a 1", "stop", "GET a"], show_prompt=False)
    assert status == 1
    assert out[0] == "OK"
    assert "DISCONNECTED" in out[1]
