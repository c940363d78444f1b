"""The WebSocket client: the same :class:`~kvmemo.api.Commands` as the embedded store.

::

    async with kvmemo.client.connect("ws://127.0.0.1:7070/ws") as kv:
        await kv.set("user:1", "alice", ex=60)
        assert await kv.get("user:1") == b"alice"

Design
------
Problem: many tasks of one application share one WebSocket session
(PROTOCOL.md, "Messages"). Each call must get its own answer although the
server answers out of order, and a burst of small calls should not cost one
WebSocket message each.

Approach: pipelining with one-shot slots and a tick-batching sender.

- :meth:`Client.execute` gives every request a fresh integer id, registers a
  :class:`_Slot` (an event plus the raw response) under that id in
  ``_pending``, puts the request into the bounded outbox and parks on the
  slot. Nothing else waits for the answer: callers never block each other.
- The *sender* task takes the first request from the outbox, yields once
  (``trio.lowlevel.checkpoint()``) so every other task runnable in the same
  scheduling tick can enqueue too, then sends everything queued as one
  message: a plain request object for one request, a JSON-RPC batch array for
  several, split every ``max_batch`` requests.
- The *reader* task decodes each incoming message (an object or a batch
  array) and resolves the slot of each response by id. Responses may arrive
  in any order; an id with no slot (its caller was cancelled or timed out) is
  dropped.
- The caller decodes its own response (:func:`decode_result`,
  :func:`error_from_payload`): the work is spread over the callers and each
  one raises its own exception instance.

Cancellation: a caller cancelled before its request was sent removes its slot
and the sender skips the request (it never reaches the server); once sent, a
cancelled request may still take effect, and its answer is dropped.

Connection loss (the peer closes, the network fails, the server breaks the
protocol, or the ``connect`` block ends) fails every pending request with
:class:`DisconnectedError` (``data["applied"]`` is ``None``: the request may
or may not have happened), and every later call raises it at once. Nothing
ever waits for an answer that cannot come.

Results are identical to the embedded store's: JSON strings come back as
``bytes`` (bulk strings), except the protocol's simple-string replies
(``"OK"``, ``"PONG"``, ``type``'s ``"string"``/``"none"``), which stay ``str``.

Publish/subscribe (protocol 1.4): ``async with kv.subscribe("news") as sub``
gives a :class:`Subscription` with the methods of the embedded store's.
The server pushes each message as a JSON-RPC notification (a request object
without ``id``); the reader tells them from responses by that shape and
hands them to the open subscription, which queues them until :meth:`get`
takes them. The reader never waits for the subscriber (it also answers the
other tasks' requests): past ``buffer_limit`` bytes queued (counted as the
server counts its ``pubsub_buffer_limit``) the subscription ends at once --
its queued messages are dropped, :meth:`Subscription.get` raises
:class:`~kvmemo.errors.OverloadedError`, and the client asks the server to
unsubscribe everything; the connection and every other request go on. One
subscription block at a time per client: the session's subscriptions are one
set. A server that finds the client too slow closes the whole connection
(1008): :meth:`Subscription.get` then raises :class:`DisconnectedError` once
the messages received before are taken.

Limits: values travel as JSON text, so a ``bytes`` argument must be valid
UTF-8 (a ``ValueError`` says which one is not), and a stored value that is not
UTF-8 comes back with U+FFFD in place of its bad bytes (the server's mapping).
A message over the server's ``max_message_size`` makes the server close the
connection (1009): keep ``max_batch`` times the request size under it.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, NoReturn

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .api import Arg, Commands, encode_arg
from .engine.pubsub import MESSAGE_OVERHEAD, Message
from .errors import (
    ERROR_KINDS,
    InternalError,
    KVMemoError,
    OverloadedError,
    RequestTimeoutError,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "SUBPROTOCOL",
    "Client",
    "ClientStatistics",
    "DisconnectedError",
    "SUBSCRIPTION_BUFFER_LIMIT",
    "Subscription",
    "connect",
    "decode_result",
    "encode_params",
    "error_class",
    "error_from_payload",
]

SUBPROTOCOL = "kvmemo.v1"

DEFAULT_MAX_BATCH = 1000  # requests per message; the server's default limit is 10_000
OUTBOX_SIZE = 10_000  # requests queued for the sender; more callers wait (backpressure)
CONNECT_TIMEOUT = 10.0  # seconds for the handshake when ``timeout`` is None
DISCONNECT_TIMEOUT = 5.0  # seconds for the closing handshake when the block ends
MAX_MESSAGE_SIZE = 256 * 1024 * 1024  # bytes per received message (``keys *`` can be big)
MAX_EXTRA_KINDS = 64  # error classes made for kinds this version does not know

_JSONRPC = "2.0"
_COMPACT = (",", ":")

# Methods whose "OK" reply is a simple string (``str``), as in the embedded store
# (``rename`` is Redis's; listed for when the server adds it, per PROTOCOL.md 1.1).
_OK_METHODS = frozenset(
    {
        "set",
        "mset",
        "flushall",
        "flushdb",
        "setex",
        "psetex",
        "save",
        "debug.kill",
        "auth",
        "rename",
        "watch",
        "unwatch",
    }
)
UNWATCH_GRACE = 5.0  # seconds a watch block's end waits for its unwatch, even when cancelled
# Bytes of pushed messages a subscription queues (counted as the server's hub
# counts them); the server's default pubsub_buffer_limit.
SUBSCRIPTION_BUFFER_LIMIT = 32 * 1024 * 1024
_PUSH_ARITY = {"message": 2, "pmessage": 3}  # the notifications of protocol 1.4: params
# Methods whose result is not made of bulk strings: passed through as decoded JSON.
_JSON_METHODS = frozenset({"info", "debug.actors", "command.list"})


class DisconnectedError(KVMemoError, ConnectionError):
    """The connection to the server is gone (or could not be opened).

    Raised by every request that was pending when the connection was lost,
    and by every later call. ``data["applied"]`` is ``None`` for a request
    that was pending: it may or may not have taken effect.
    """

    kind: ClassVar[str] = "DISCONNECTED"
    code: ClassVar[int] = 0  # client-side only: never sent on the wire


@attrs.frozen
class ClientStatistics:
    """Counters of one client connection.

    Attributes:
        messages_sent: WebSocket messages sent (one per batch or single request).
        requests_sent: JSON-RPC requests sent (every element of every batch).
        messages_received: WebSocket messages received.
        pending: requests waiting for their answer (queued or sent).
    """

    messages_sent: int
    requests_sent: int
    messages_received: int
    pending: int


# ----------------------------------------------------------------------------
# Pure mapping between command calls and JSON-RPC (no I/O)


def encode_params(args: Sequence[Arg]) -> list[str | int]:
    """The ``params`` array for ``args``, meaning exactly what the embedded store gets.

    Integers stay JSON integers; ``bytes`` are decoded as UTF-8; floats are
    sent as their ``repr`` (as :func:`kvmemo.api.encode_arg` does).

    Raises:
        TypeError: an argument of another type (a ``bool`` included).
        ValueError: a ``bytes`` argument that is not valid UTF-8, or a ``str``
            with a lone surrogate: the JSON protocol carries text only.
    """
    params: list[str | int] = []
    for position, arg in enumerate(args):
        if isinstance(arg, int) and not isinstance(arg, bool):
            params.append(arg)
            continue
        if isinstance(arg, str):
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"argument {position} is not valid Unicode (lone surrogate)"
                ) from None
            params.append(arg)
            continue
        raw = encode_arg(arg)
        try:
            params.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(
                f"argument {position} is not valid UTF-8; the JSON-RPC protocol carries text only"
            ) from None
    return params


def decode_result(method: str, args: Sequence[Arg], result: Any) -> Any:
    """A JSON result as the embedded store returns it.

    Args:
        method: the lower-case method of the request.
        args: the request's arguments (``set ... GET`` and ``ping`` depend on them).
        result: the decoded JSON ``result``.

    Returns:
        Strings as ``bytes`` (also inside arrays), except the simple-string
        replies ``"OK"`` (set without GET, mset, flushall, flushdb, setex,
        psetex, save, debug.kill, auth, rename, watch, unwatch), ``"PONG"`` (ping without a
        message) and ``type``'s reply, which stay ``str``; ``info``,
        ``debug.actors`` and ``command.list`` are returned as decoded.
    """
    if method in _JSON_METHODS:
        return result
    if isinstance(result, str):
        if method == "type":
            return result
        if method == "ping" and not args and result == "PONG":
            return result
        if method in _OK_METHODS and result == "OK" and not _has_get_flag(method, args):
            return result
    return _bulk(result)


def _has_get_flag(method: str, args: Sequence[Arg]) -> bool:
    if method != "set":
        return False
    return any(
        isinstance(arg, str | bytes) and encode_arg(arg).upper() == b"GET" for arg in args[2:]
    )


def _bulk(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return [_bulk(item) for item in value]
    return value


_extra_kinds: dict[str, type[KVMemoError]] = {}


def error_class(kind: str, code: int | None = None) -> type[KVMemoError]:
    """The exception class for an error kind.

    The classes of :data:`kvmemo.errors.ERROR_KINDS` for the kinds they know;
    for any other kind (``PARSE``, ``INVALID_REQUEST``, kinds of a newer
    server) a :class:`KVMemoError` subclass made once per kind, whose
    ``kind`` and ``code`` are those given.
    """
    known = ERROR_KINDS.get(kind) or _extra_kinds.get(kind)
    if known is not None:
        return known
    words = [word for word in re.split(r"[^0-9A-Za-z]+", kind) if word]
    name = "".join(word.capitalize() for word in words) + "Error"
    if not name[0].isalpha():
        name = "Kind" + name
    made = type(
        name,
        (KVMemoError,),
        {
            "kind": kind,
            "code": code if code is not None else InternalError.code,
            "__module__": __name__,
            "__doc__": f"Error kind {kind!r}, which this version of the client does not know.",
        },
    )
    if len(_extra_kinds) < MAX_EXTRA_KINDS:  # a hostile server cannot grow it forever
        _extra_kinds[kind] = made
    return made


def error_from_payload(error: Any) -> KVMemoError:
    """The exception for a JSON-RPC ``error`` object.

    Its class is chosen by ``error.data.kind`` (:func:`error_class`); its
    message is ``error.message``; its ``data`` holds the other fields of
    ``error.data`` (``retry_after_ms``, ``applied``, ...). A malformed object
    gives an :class:`~kvmemo.errors.InternalError`.
    """
    if not isinstance(error, dict):
        return InternalError(f"malformed error object from the server: {error!r}")
    message = error.get("message")
    message = message if isinstance(message, str) else repr(message)
    code = error.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    data = error.get("data")
    extra: dict[str, Any] = dict(data) if isinstance(data, dict) else {}
    kind = extra.pop("kind", None)
    if not isinstance(kind, str) or not kind:
        kind = InternalError.kind
    exc = error_class(kind, code)(message)
    exc.data = extra
    return exc


# ----------------------------------------------------------------------------
# The connection


@attrs.define
class _Slot:
    """Where the reader leaves one request's answer; the caller parks on ``done``.

    Invariant: ``done`` is set exactly when ``response`` or ``lost`` is set.
    """

    done: trio.Event = attrs.Factory(trio.Event)
    response: dict[str, Any] | None = None
    lost: str | None = None


@attrs.frozen
class _Request:
    """One registered request: its id, its slot and the JSON object to send."""

    id: int
    slot: _Slot
    payload: dict[str, Any]


class Client(Commands):
    """A connection to a KVMemo server: one async method per command.

    Made by :func:`connect`. Safe to share between any number of tasks.
    Errors raise subclasses of :class:`kvmemo.KVMemoError` whose ``kind`` is
    the protocol's error kind; a lost connection raises
    :class:`DisconnectedError`.

    Invariant: every id in ``_pending`` belongs to a caller parked on (or
    about to read) its slot; the sender sends only requests whose id is there.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        url: str,
        timeout: float | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.url = url
        self._ws = ws
        self._timeout = timeout
        self._max_batch = max_batch
        self._next_id = 1
        self._pending: dict[int, _Slot] = {}
        self._outbox_in, self._outbox_out = trio.open_memory_channel[dict[str, Any]](OUTBOX_SIZE)
        self._lost: str | None = None
        self._messages_sent = 0
        self._requests_sent = 0
        self._messages_received = 0
        # WATCH belongs to the session, which every task of this client shares:
        # a watch block holds this lock, and only its own task's transactions
        # run meanwhile (another task's would end the watches; it waits).
        self._watch_lock = trio.Lock()
        self._watch_owner: trio.lowlevel.Task | None = None
        self._subscription: Subscription | None = None  # the open subscribe block's

    # -- the Commands interface ---------------------------------------------------------

    async def execute(self, command: str, *args: Arg) -> Any:
        """Run any command by name: ``await kv.execute("SET", "k", "v", "EX", 10)``.

        Raises:
            KVMemoError: the server's error, as the class of its kind.
            RequestTimeoutError: no answer within the client's ``timeout``
                (``data["applied"]`` is ``None``: it may have happened).
            DisconnectedError: the connection is lost.
            TypeError, ValueError: an argument that cannot be sent (nothing is sent).
        """
        method = command.lower()
        params = encode_params(args)
        self._check_open()
        request = self._register(method, params)
        try:
            with trio.fail_after(self._deadline_seconds()):
                await self._enqueue(request)
                await request.slot.done.wait()
        except trio.TooSlowError:
            raise self._timeout_error(repr(method)) from None
        finally:
            self._pending.pop(request.id, None)
        return _unwrap(request.slot, method, args)

    async def transaction(self, *calls: tuple[Arg, ...]) -> list[Any] | None:
        """Run commands as one atomic step (protocol 1.2, Redis's MULTI/EXEC).

        Each call is ``(command, *args)``. No other request runs between
        them and nobody sees part of their effects; a call that fails gives
        its :class:`KVMemoError` in its place and the others still run.

        Returns:
            One result (or error) per call; None when a key this session
            watches (:meth:`watch`) was written since: nothing ran.

        Raises:
            KVMemoError: the transaction was refused as a whole (``data["index"]``
                names the call), or failed as a whole (``UNAVAILABLE``, ``OOM``, ...).
            TypeError, ValueError: a call that cannot be sent (nothing is sent).
        """
        prepared = [(_method_of(call[0]), call[1:]) for call in calls]
        params = [[method, *encode_params(args)] for method, args in prepared]
        self._check_open()
        if self._watch_owner is not None and self._watch_owner is trio.lowlevel.current_task():
            return await self._transaction(prepared, params)
        async with self._watch_lock:  # not while another task's watch block runs
            return await self._transaction(prepared, params)

    async def _transaction(
        self, prepared: list[tuple[str, tuple[Arg, ...]]], params: list[Any]
    ) -> list[Any] | None:
        request = self._register("transaction", params)
        try:
            with trio.fail_after(self._deadline_seconds()):
                await self._enqueue(request)
                await request.slot.done.wait()
        except trio.TooSlowError:
            raise self._timeout_error("a transaction") from None
        finally:
            self._pending.pop(request.id, None)
        answer = _unwrap_raw(request.slot)  # each call's entry is decoded as that call's
        if answer is None:
            return None
        if not isinstance(answer, list) or len(answer) != len(prepared):
            raise InternalError(f"malformed transaction result from the server: {answer!r}")
        return [
            error_from_payload(entry)
            if isinstance(entry, dict)
            else decode_result(method, args, entry)
            for (method, args), entry in zip(prepared, answer, strict=True)
        ]

    @asynccontextmanager
    async def watch(self, *keys: Arg) -> AsyncIterator[Client]:
        """Watch ``keys`` for an optimistic :meth:`transaction`, until the block ends.

        The session watches them (protocol 1.2 ``watch``): a transaction in
        the block returns None, running nothing, if one was written since.
        Watches belong to the session, which all tasks of this client share:
        while the block runs, other tasks' transactions and watch blocks
        wait for it to end (plain commands do not), so call
        :meth:`transaction` from the task that opened the block. A reconnect
        loses the watches (the next transaction then runs unchecked), so
        retry from the read on :class:`DisconnectedError`. ::

            async with kv.watch("balance"):
                balance = int(await kv.get("balance") or 0)
                done = await kv.transaction(("SET", "balance", balance - 10))
        """
        async with self._watch_lock:
            self._watch_owner = trio.lowlevel.current_task()
            try:
                # Inside the try: a watch sent, then cancelled before its answer,
                # is given back too.
                await self.execute("watch", *keys)
                yield self
            except BaseException:
                # Unwinding, maybe cancelled with the connection (whose reader
                # would never take an answer): a notification, no wait. The
                # session runs it before anything sent after it.
                self._watch_owner = None
                if not self.closed:
                    self._notify_nowait("unwatch")
                raise
            else:
                self._watch_owner = None
                await self._unwatch()

    async def _unwatch(self) -> None:
        """End the session's watches, even when cancelled (a lost session has none)."""
        grace = min(self._deadline_seconds(), UNWATCH_GRACE)
        with trio.CancelScope(shield=True), trio.move_on_after(grace):
            try:
                await self.execute("unwatch")
            except KVMemoError:
                pass

    @asynccontextmanager
    async def subscribe(
        self,
        *channels: Arg,
        patterns: Sequence[Arg] = (),
        buffer_limit: int = SUBSCRIPTION_BUFFER_LIMIT,
    ) -> AsyncIterator[Subscription]:
        """Receive what is published on ``channels`` and on channels matching ``patterns``.

        The embedded store's :meth:`~kvmemo.embedded.Store.subscribe` over the
        WebSocket (protocol 1.4)::

            async with kv.subscribe("news", patterns=["chat:*"]) as sub:
                async for message in sub:
                    print(message.channel, message.data)

        Subscriptions end with the block (``unsubscribe`` and
        ``punsubscribe`` are sent, even when cancelled). Messages wait in
        the subscription up to ``buffer_limit`` bytes; past it the
        subscription ends and iterating raises
        :class:`~kvmemo.errors.OverloadedError` (the connection lives on).
        Other tasks' requests go on meanwhile on the same connection.

        Raises:
            RuntimeError: a subscribe block of this client is already open
                (one at a time: the session's subscriptions are one set).
            ValueError: ``buffer_limit`` below 1.
            KVMemoError: the server refused the subscription (``NOAUTH``, say).
            DisconnectedError: the connection is lost.
        """
        if buffer_limit < 1:
            raise ValueError(f"buffer_limit must be >= 1, got {buffer_limit}")
        if self._subscription is not None:
            raise RuntimeError(
                "this client already has an open subscribe block: one at a time per "
                "client (subscribe to more with its subscribe()/psubscribe(), or open "
                "another connection)"
            )
        self._check_open()
        subscription = Subscription(self, buffer_limit)
        self._subscription = subscription
        try:
            if channels:
                await subscription.subscribe(*channels)
            if patterns:
                await subscription.psubscribe(*patterns)
            yield subscription
        except BaseException:
            self._unsubscribe_all_nowait()  # unwinding (maybe cancelled): do not wait
            raise
        else:
            await self._unsubscribe_all()  # the server has left them when the block ends
        finally:
            subscription._close()
            self._subscription = None

    async def _unsubscribe_all(self) -> None:
        """Leave every channel and pattern, waiting for the server's answer (briefly)."""
        if self.closed:
            return
        grace = min(self._deadline_seconds(), UNWATCH_GRACE)
        with trio.CancelScope(shield=True), trio.move_on_after(grace):
            try:
                await self.execute_many(("unsubscribe",), ("punsubscribe",))
            except KVMemoError:
                pass

    def _unsubscribe_all_nowait(self) -> None:
        """Leave every channel and pattern without waiting: two notifications.

        For a block unwinding with an exception, maybe cancelled together
        with its connection, whose reader would never take an answer: it
        ends at once. A message of those channels that comes later is
        dropped by the next block (it takes only its own names).
        """
        if not self.closed:
            self._notify_nowait("unsubscribe")
            self._notify_nowait("punsubscribe")

    async def execute_many(self, *calls: tuple[Arg, ...]) -> list[Any]:
        """Run several commands, sent together; errors are returned, not raised.

        Each call is ``(command, *args)``. The requests travel in one message
        (or several of ``max_batch``) and run concurrently on the server,
        in sending order for the same key.

        Returns:
            One entry per call, in order: its result or its
            :class:`KVMemoError` (a lost connection included).

        Raises:
            TypeError, ValueError: a call that cannot be sent (nothing is sent).
            RequestTimeoutError: not every answer came within ``timeout``.
        """
        prepared = [(_method_of(call[0]), call[1:], encode_params(call[1:])) for call in calls]
        self._check_open()
        registered = [self._register(method, params) for method, _, params in prepared]
        try:
            with trio.fail_after(self._deadline_seconds()):
                for request in registered:
                    await self._enqueue(request)
                for request in registered:
                    await request.slot.done.wait()
        except trio.TooSlowError:
            raise self._timeout_error(f"a batch of {len(calls)} calls") from None
        finally:
            for request in registered:
                self._pending.pop(request.id, None)
        results: list[Any] = []
        for (method, args, _), request in zip(prepared, registered, strict=True):
            try:
                results.append(_unwrap(request.slot, method, args))
            except KVMemoError as exc:
                results.append(exc)
        return results

    async def actors(self) -> list[dict[str, Any]]:
        """Every actor of the server: name, state, restarts, mailbox (``debug.actors``).

        Async here, unlike the embedded store's synchronous ``actors()``: it is
        a round trip.
        """
        result: list[dict[str, Any]] = await self.execute("debug.actors")
        return result

    async def kill_actor(self, name: str) -> bool:
        """Kill a server actor by name (``debug.kill``); its supervisor restarts it.

        Async here, unlike the embedded store's synchronous ``kill_actor``. The
        protocol answers ``"OK"`` whether or not the actor was running, so
        this returns ``True`` whenever the server accepted the command.

        Raises:
            UnknownCommandError: the server was not started with chaos enabled.
            CommandSyntaxError: no actor of that name.
        """
        await self.execute("debug.kill", name)
        return True

    # -- state ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection is lost or closed (every call then raises)."""
        return self._lost is not None

    def statistics(self) -> ClientStatistics:
        """Counters of this connection (messages, requests, pending)."""
        return ClientStatistics(
            messages_sent=self._messages_sent,
            requests_sent=self._requests_sent,
            messages_received=self._messages_received,
            pending=len(self._pending),
        )

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lost is not None:
            raise DisconnectedError(self._lost)

    def _deadline_seconds(self) -> float:
        return self._timeout if self._timeout is not None else math.inf

    def _timeout_error(self, what: str) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"no answer to {what} within {self._timeout} s (client timeout)", applied=None
        )

    def _register(self, method: str, params: list[Any]) -> _Request:
        """A fresh id and slot for one request. Synchronous: no checkpoint.

        On a connection already lost (a caller checkpointed since its
        ``_check_open``, waiting for the watch lock, say) the slot is failed
        at once: ``_lose`` has run, and would never fail it.
        """
        request_id = self._next_id
        self._next_id += 1
        slot = _Slot()
        if self._lost is not None:
            slot.lost = self._lost
            slot.done.set()
        self._pending[request_id] = slot
        payload = {"jsonrpc": _JSONRPC, "id": request_id, "method": method, "params": params}
        return _Request(request_id, slot, payload)

    def _notify_nowait(self, method: str) -> None:
        """Queue a notification (no answer) with no params, if the outbox has room."""
        if self._lost is None:
            try:
                self._outbox_in.send_nowait({"jsonrpc": _JSONRPC, "method": method, "params": []})
            except trio.WouldBlock:
                pass  # the subscribe block's end says it again

    async def _enqueue(self, request: _Request) -> None:
        try:
            self._outbox_in.send_nowait(request.payload)
        except trio.WouldBlock:
            await self._outbox_in.send(request.payload)  # backpressure: the outbox is full

    def _lose(self, reason: str) -> None:
        """Mark the connection lost and fail every pending request. Synchronous."""
        if self._lost is None:
            self._lost = reason
        for slot in self._pending.values():
            if not slot.done.is_set():
                slot.lost = self._lost
                slot.done.set()
        if self._subscription is not None:
            self._subscription._lose(self._lost)

    async def abort(self) -> None:
        """Drop the connection now (chaos tooling): pending requests fail with
        :class:`DisconnectedError`, as on any lost connection (they may or may
        not have been applied)."""
        self._lose(f"the connection to {self.url} was dropped")
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            await self._ws.aclose(1001, "dropped by the client")

    async def _send_loop(self) -> None:
        """The sender task: one message per tick's worth of requests (see the design)."""
        while True:
            first = await self._outbox_out.receive()
            await trio.lowlevel.checkpoint()  # let the other tasks of this tick enqueue
            queued = [first]
            while len(queued) < self._max_batch:
                try:
                    queued.append(self._outbox_out.receive_nowait())
                except trio.WouldBlock:
                    break
            # Requests whose caller still waits, and notifications (no id).
            live = [r for r in queued if "id" not in r or r["id"] in self._pending]
            if not live or self._lost is not None:
                continue
            document: Any = live[0] if len(live) == 1 else live
            text = json.dumps(document, separators=_COMPACT, ensure_ascii=False)
            try:
                await self._ws.send_message(text)
            except ConnectionClosed as exc:
                self._lose(_closed_reason(self.url, exc))
                return
            self._messages_sent += 1
            self._requests_sent += len(live)

    async def _read_loop(self) -> None:
        """The reader task: resolve slots by id until the connection ends."""
        while True:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed as exc:
                self._lose(_closed_reason(self.url, exc))
                return
            self._messages_received += 1
            problem = self._on_message(message)
            if problem is not None:
                self._lose(f"connection to {self.url} closed: {problem}")
                await self._ws.aclose(1002, "protocol error")
                return

    def _on_message(self, message: str | bytes) -> str | None:
        """Resolve the slots answered by one message; the problem, if it breaks the protocol.

        Synchronous: slots are resolved atomically with respect to cancellation.
        """
        if isinstance(message, bytes):
            return "the server sent a binary message"
        try:
            document = json.loads(message)
        except ValueError:
            return "the server sent a message that is not JSON"
        responses = document if isinstance(document, list) else [document]
        for response in responses:
            if not isinstance(response, dict):
                return "the server sent a response that is not an object"
            if "method" in response and "id" not in response:
                problem = self._on_push(response)  # a notification (protocol 1.4)
                if problem is not None:
                    return problem
                continue
            request_id = response.get("id")
            if request_id is None:
                # An error the server could not attach to a request (a whole
                # batch refused, say): its requests would never be answered.
                error = error_from_payload(response.get("error"))
                return f"the server refused a message: {error.kind} {error.message}"
            slot = self._pending.get(request_id) if isinstance(request_id, int) else None
            if slot is None or slot.done.is_set():
                continue  # its caller was cancelled or timed out
            slot.response = response
            slot.done.set()
        return None

    def _on_push(self, push: dict[str, Any]) -> str | None:
        """Hand a pushed message to the open subscription; the problem, if it is malformed.

        Notifications of methods this version does not know are ignored (a
        later protocol may add some). Without an open subscribe block the
        message is dropped (nobody listens: a subscription made with
        ``execute``, say).
        """
        method = push.get("method")
        arity = _PUSH_ARITY.get(method) if isinstance(method, str) else None
        if arity is None:
            return None
        params = push.get("params")
        if (
            not isinstance(params, list)
            or len(params) != arity
            or not all(isinstance(p, str) for p in params)
        ):
            return f"the server sent a malformed {method!r} notification"
        subscription = self._subscription
        if subscription is not None:
            raw = [p.encode("utf-8", "surrogatepass") for p in params]
            if arity == 2:
                subscription._deliver(Message(raw[0], raw[1]))
            else:
                subscription._deliver(Message(raw[1], raw[2], raw[0]))
        return None


class Subscription:
    """One :meth:`Client.subscribe` block: its channels, patterns and messages.

    The methods of the embedded :class:`kvmemo.embedded.Subscription`: the
    (un)subscribe methods answer Redis's subscription count after the change
    (a round trip each), :meth:`get` and ``async for`` give
    :class:`kvmemo.Message` s. Iterate it, or call :meth:`get`, from one task
    at a time.

    Invariant: ``_bytes`` is the sum of the sizes of the queued messages
    and never exceeds ``limit``; ``_ready`` is set whenever a message is
    queued or the subscription is ended (overflowed, lost or closed).
    """

    def __init__(self, client: Client, limit: int) -> None:
        self._client = client
        self.limit = limit
        self._channels: dict[bytes, None] = {}  # in subscription order
        self._patterns: dict[bytes, None] = {}
        self._queue: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._ready = trio.Event()
        self._overflowed = False
        self._lost: str | None = None
        self._closed = False

    @property
    def channels(self) -> list[bytes]:
        """The channels subscribed, in subscription order."""
        return list(self._channels)

    @property
    def patterns(self) -> list[bytes]:
        """The patterns subscribed, in subscription order."""
        return list(self._patterns)

    async def subscribe(self, *channels: Arg) -> int:
        """Subscribe to more channels; the subscription count after it."""
        return await self._change("subscribe", channels)

    async def psubscribe(self, *patterns: Arg) -> int:
        """Subscribe to more glob patterns (KEYS syntax); the subscription count after it."""
        return await self._change("psubscribe", patterns)

    async def unsubscribe(self, *channels: Arg) -> int:
        """Leave ``channels`` (every channel if none named); the subscription count after it."""
        return await self._change("unsubscribe", channels)

    async def punsubscribe(self, *patterns: Arg) -> int:
        """Leave ``patterns`` (every pattern if none named); the subscription count after it."""
        return await self._change("punsubscribe", patterns)

    async def _change(self, method: str, names: tuple[Arg, ...]) -> int:
        """Send one pub/sub method and follow its replies; the count after it.

        An ended subscription (past its buffer limit, or its block over)
        stays ended, as the embedded one does: nothing is sent and the
        answer is 0.

        Raises:
            KVMemoError: the server's error; DisconnectedError as any request.
        """
        if self._overflowed or self._closed:
            return 0
        if not names and method in ("subscribe", "psubscribe"):
            return len(self._channels) + len(self._patterns)  # as the embedded one: nothing to do
        own = self._patterns if method.startswith("p") else self._channels
        added: list[bytes] = []
        if not method.endswith("unsubscribe"):
            # Listened to from now: the server answers before it pushes any
            # message of these, and the reader may take the message before
            # this task resumes. (A message of a name not here is dropped: a
            # late one of a block that could not unsubscribe in time.)
            added = [n for n in map(encode_arg, names) if n not in own]
            own.update(dict.fromkeys(added))
        try:
            replies = await self._client.execute(method, *names)
        except BaseException:
            for name in added:
                own.pop(name, None)
            raise
        if self._overflowed or self._closed:
            return 0  # ended meanwhile: the server is told to leave everything
        count: int | None = None
        for reply in replies if isinstance(replies, list) else [None]:
            if not (
                isinstance(reply, list)
                and len(reply) == 3
                and isinstance(reply[1], bytes | None)
                and type(reply[2]) is int
            ):
                raise InternalError(f"malformed {method} result from the server: {replies!r}")
            left, count = reply[1], reply[2]
            if left is not None:
                if method.endswith("unsubscribe"):
                    own.pop(left, None)
                else:
                    own[left] = None
        if count is None:
            raise InternalError(f"malformed {method} result from the server: {replies!r}")
        return count

    async def get(self) -> Message:
        """The next message, waiting for one.

        Raises:
            OverloadedError: messages came faster than they were taken, past
                ``buffer_limit``: the subscription ended (the connection did not).
            DisconnectedError: the connection is lost and every message
                received before has been taken.
            trio.EndOfChannel: the subscription's block has ended.
        """
        while True:
            if self._overflowed:
                raise self._overflow_error()
            if self._queue:
                message, size = self._queue.popleft()
                self._bytes -= size
                if not self._queue and not self._ended:
                    self._ready = trio.Event()
                return message
            if self._lost is not None:
                raise DisconnectedError(self._lost)
            if self._closed:
                raise trio.EndOfChannel
            await self._ready.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    # -- the client's side (synchronous) ----------------------------------------------------

    @property
    def _ended(self) -> bool:
        return self._overflowed or self._closed or self._lost is not None

    def _deliver(self, message: Message) -> None:
        if self._ended:
            return
        if message.pattern is None:
            if message.channel not in self._channels:
                return  # a late message of a channel this block does not listen to
        elif message.pattern not in self._patterns:
            return
        size = MESSAGE_OVERHEAD + len(message.channel) + len(message.data)
        if message.pattern is not None:
            size += len(message.pattern)
        if self._bytes + size > self.limit:
            # Ended, as the server's hub ends a subscriber past its limit; the
            # server is told to stop sending (notifications: no answer awaited).
            self._overflowed = True
            self._queue.clear()
            self._bytes = 0
            self._channels.clear()
            self._patterns.clear()
            self._ready.set()
            self._client._notify_nowait("unsubscribe")
            self._client._notify_nowait("punsubscribe")
            return
        self._queue.append((message, size))
        self._bytes += size
        self._ready.set()

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
        self._ready.set()

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._bytes = 0
        self._channels.clear()
        self._patterns.clear()
        self._ready.set()

    def _overflow_error(self) -> OverloadedError:
        return OverloadedError(
            f"subscription buffer limit reached ({self.limit} bytes, client side): "
            "the subscription ended; messages were lost"
        )


def _method_of(name: Arg) -> str:
    """A command name as a method: lower case; ``bytes`` decoded, not repr'd."""
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace").lower()
    return str(name).lower()


def _unwrap(slot: _Slot, method: str, args: Sequence[Arg]) -> Any:
    return decode_result(method, args, _unwrap_raw(slot))


def _unwrap_raw(slot: _Slot) -> Any:
    """The JSON result of an answered request, as decoded; its error raised."""
    if slot.lost is not None:
        raise DisconnectedError(slot.lost, applied=None)
    response = slot.response
    assert response is not None
    if "error" in response:
        raise error_from_payload(response["error"])
    return response.get("result")


def _closed_reason(url: str, exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return f"connection to {url} lost"
    detail = f" ({reason.reason})" if reason.reason else ""
    return f"connection to {url} lost: close code {reason.code} {reason.name}{detail}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    cause = exc.__cause__
    if not text and cause is not None:
        text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return text or type(exc).__name__


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again, keeping its own ``__context__`` (not the group's)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    timeout: float | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> AsyncIterator[Client]:
    """Connect to a server for the duration of the block.

    Args:
        url: the session URL, ``ws://host:port/ws`` (``wss://`` for TLS).
        token: sent with ``auth`` before anything else when given.
        timeout: seconds for the handshake and for each request's answer
            (a late request raises :class:`~kvmemo.errors.RequestTimeoutError`
            with ``applied`` ``None``); ``None``: no request deadline and a
            handshake deadline of ``CONNECT_TIMEOUT``.
        max_batch: the most requests sent in one message; keep it at or under
            the server's ``max_batch``.

    Yields:
        The :class:`Client`, shared safely by any number of tasks.

    Raises:
        ValueError: ``max_batch`` below 1, ``timeout`` not positive, or a bad URL.
        DisconnectedError: the connection could not be opened.
        NoAuthError: the token was refused.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    opened = False
    try:
        async with open_websocket_url(
            url,
            subprotocols=[SUBPROTOCOL],
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=timeout if timeout is not None else CONNECT_TIMEOUT,
            disconnect_timeout=DISCONNECT_TIMEOUT,
        ) as ws:
            opened = True
            client = Client(ws, url=url, timeout=timeout, max_batch=max_batch)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._read_loop)
                    nursery.start_soon(client._send_loop)
                    try:
                        if token is not None:
                            await client.execute("auth", token)
                        yield client
                    finally:
                        client._lose(f"the client of {url} was closed")
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader and sender never raise, so the group holds the
                # block's own exception: give it back unwrapped.
                if len(group.exceptions) == 1:
                    _reraise(group.exceptions[0])
                raise
    except HandshakeError as exc:
        if opened:
            raise
        raise DisconnectedError(f"cannot connect to {url}: {_describe(exc)}") from None
