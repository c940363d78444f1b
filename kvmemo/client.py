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
protocol) fails every request in flight with :class:`DisconnectedError`
(``data["applied"]`` is ``None``: the request may or may not have happened).
Without ``reconnect`` (the default) the client is then closed for good: every
pending and later call raises it at once, as when the ``connect`` block ends.
Nothing ever waits for an answer that cannot come.

Reconnection (opt-in: ``connect(url, reconnect=True)`` or a :class:`Backoff`)
follows the browser client's (``kvmemo.js``):

- One *connection* task per client (``_run``, in the client's own nursery)
  owns the WebSocket: it dials, sends ``auth`` with the token, subscribes
  again to the channels and patterns of the open subscribe block, and only
  then lets queued requests go (state ``OPEN``). When the connection is lost
  it waits ``Backoff.delay(n)`` before attempt ``n`` (1, 2, ...; back to 1
  after a connection that opened) and dials again, up to
  ``Backoff.max_attempts`` attempts in a row (then the client closes for
  good: every waiting and later call raises :class:`DisconnectedError`
  saying so).
- Delivery stays at most once: a request sent on the lost connection fails
  with :class:`DisconnectedError` and is never sent again (a write may have
  happened). A request not sent yet (queued, or made while reconnecting)
  waits and leaves on the next connection, within the client's ``timeout``
  (past it, :class:`~kvmemo.errors.RequestTimeoutError` with ``applied``
  ``False``).
- Subscriptions survive (the same block goes on receiving); messages
  published while no connection was open are lost, as pub/sub keeps nothing
  (Redis's behaviour too). Watches do not: a watch block whose connection was
  lost fails at its next call (its ``transaction`` would run unchecked).
- A token refused on a reconnection closes the client for good (a wrong
  token stays wrong). The first connection is not retried: ``connect`` raises
  at once, so a wrong URL or a server that is down fails fast.
- Leaving the ``connect`` block stops a backoff wait or a dial at once; an
  open connection is closed with the closing handshake (at most
  ``DISCONNECT_TIMEOUT``).

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
the messages received before are taken -- unless the client reconnects,
which subscribes again (the messages published meanwhile are lost).

Limits: values travel as JSON text, so a ``bytes`` argument must be valid
UTF-8 (a ``ValueError`` says which one is not), and a stored value that is not
UTF-8 comes back with U+FFFD in place of its bad bytes (the server's mapping).
A message over the server's ``max_message_size`` makes the server close the
connection (1009): keep ``max_batch`` times the request size under it.
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import re
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, NoReturn

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
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
    NoAuthError,
    OverloadedError,
    RequestTimeoutError,
    TooLargeError,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_URL",
    "SUBPROTOCOL",
    "URL_VARIABLE",
    "Backoff",
    "Client",
    "ClientStatistics",
    "ConnectionState",
    "DisconnectedError",
    "SUBSCRIPTION_BUFFER_LIMIT",
    "Subscription",
    "check_url",
    "connect",
    "connect_failure",
    "decode_result",
    "encode_params",
    "error_class",
    "error_from_payload",
    "session_url",
]

SUBPROTOCOL = "kvmemo.v1"
DEFAULT_URL = "ws://127.0.0.1:7070/ws"  # the server's default WebSocket port and path
URL_VARIABLE = "KVMEMO_URL"  # the environment variable of the tools' default URL

DEFAULT_MAX_BATCH = 1000  # requests per message; the server's default limit is 10_000
OUTBOX_SIZE = 10_000  # requests queued for the sender; more callers wait (backpressure)
CONNECT_TIMEOUT = 10.0  # seconds for the handshake (and auth, resubscribe) when ``timeout`` is None
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

    Raised by every request that was in flight when the connection was lost
    (``data["applied"]`` is ``None``: it may or may not have taken effect;
    it is never sent again), and by every call once the client is closed for
    good: the ``connect`` block ended, the connection was lost without
    ``reconnect``, or the reconnection attempts ran out. Also raised by a
    call of a watch block whose connection was lost (``applied`` ``False``:
    nothing was sent).
    """

    kind: ClassVar[str] = "DISCONNECTED"
    code: ClassVar[int] = 0  # client-side only: never sent on the wire


class ConnectionState(enum.Enum):
    """Where a :class:`Client` stands (``client.state``)."""

    CONNECTING = "connecting"  # the first connection is being opened (inside ``connect``)
    OPEN = "open"  # connected (authenticated, resubscribed): requests are sent as made
    RECONNECTING = "reconnecting"  # lost; waiting out the backoff or dialling again
    CLOSED = "closed"  # for good: every call raises DisconnectedError


@attrs.frozen
class Backoff:
    """How a client reconnects: ``connect(url, reconnect=Backoff(...))``.

    Attempt ``n`` (1 for the first after a loss; back to 1 once a connection
    opens) waits ``min(max_delay, initial_delay * factor ** (n - 1))``
    seconds, spread by ``±jitter`` (a fraction: 0.2 is ±20 %) so that many
    clients cut by one server restart do not come back in lock step, and
    never more than ``max_delay``. The defaults are the browser client's.

    Attributes:
        initial_delay: seconds before the first attempt; > 0, so that a server
            that refuses at once is never dialled in a busy loop.
        max_delay: the longest wait between attempts, seconds (>= initial_delay).
        factor: growth of the delay per attempt (>= 1).
        jitter: the spread, in [0, 1).
        max_attempts: attempts in a row before the client closes for good
            (every waiting and later call then raises :class:`DisconnectedError`);
            ``None``: unbounded (calls are then bounded by the client's
            ``timeout`` only).

    Raises:
        ValueError: a value out of its range (the message names it).
    """

    initial_delay: float = 0.1
    max_delay: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.initial_delay) and self.initial_delay > 0):
            raise ValueError(f"initial_delay must be > 0 and finite, got {self.initial_delay}")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.initial_delay):
            raise ValueError(
                f"max_delay must be finite and >= initial_delay ({self.initial_delay}), "
                f"got {self.max_delay}"
            )
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be >= 1 and finite, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ValueError(f"max_attempts must be an int >= 1 or None, got {self.max_attempts}")

    def delay(self, attempt: int, uniform: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt`` (1, 2, ...): in (0, max_delay].

        Args:
            attempt: the attempt's number, from 1.
            uniform: a source of numbers in [0, 1) for the jitter.
        """
        exponent = max(0, attempt - 1)
        try:
            base = min(self.max_delay, self.initial_delay * self.factor**exponent)
        except OverflowError:
            base = self.max_delay
        spread = base * self.jitter * (2 * uniform() - 1)
        return min(self.max_delay, base + spread)


@attrs.frozen
class ClientStatistics:
    """Counters of one client (over all its connections).

    Attributes:
        messages_sent: WebSocket messages sent (one per batch or single request).
        requests_sent: JSON-RPC requests sent (every element of every batch).
        messages_received: WebSocket messages received.
        pending: requests waiting for their answer (queued or sent).
        reconnects: connections opened after the first one.
    """

    messages_sent: int
    requests_sent: int
    messages_received: int
    pending: int
    reconnects: int = 0


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
    ``sent`` is set just before the request is handed to a socket, and a
    request whose ``sent`` is set is never handed to another (at most once).
    ``bound`` marks a request of a watch block: it belongs to the connection
    that holds the watches and fails with it, sent or not.
    """

    done: trio.Event = attrs.Factory(trio.Event)
    response: dict[str, Any] | None = None
    lost: str | None = None
    sent: bool = False
    bound: bool = False


@attrs.define(eq=False)
class _Link:
    """One WebSocket connection of a client, from dialling to its end.

    Invariant: ``ended`` is set once, when the connection is lost (``reason``
    says why) or the client closes; ``opened`` is set once the connection
    was authenticated and resubscribed, and requests could be sent on it.
    """

    ws: WebSocketConnection | None = None
    ended: trio.Event = attrs.Factory(trio.Event)
    reason: str | None = None
    opened: bool = False
    close_code: int | None = None  # to close with after a protocol error (1002)
    # The batches sent on it that may still be unanswered, oldest first (see
    # Client._refused_batch); pruned as their requests are answered.
    batches: deque[list[_Request]] = attrs.Factory(deque)


@attrs.frozen(eq=False)
class _Request:
    """One request to send: its id and slot (None for a notification) and its JSON.

    A notification with a ``link`` is sent on that connection only (it is
    about that session's state); otherwise on whichever is open.
    """

    id: int | None
    slot: _Slot | None
    payload: dict[str, Any]
    link: _Link | None = None


class Client(Commands):
    """A connection to a KVMemo server: one async method per command.

    Made by :func:`connect`. Safe to share between any number of tasks.
    Errors raise subclasses of :class:`kvmemo.KVMemoError` whose ``kind`` is
    the protocol's error kind; a lost connection raises
    :class:`DisconnectedError` (see the module's design for what
    ``reconnect`` changes).

    Invariant: every id in ``_pending`` belongs to a caller parked on (or
    about to read) its slot, or to the connection task (``auth``,
    resubscription); the sender sends only requests whose id is there and
    whose slot is not done. Requests wait in the outbox, then in ``_staged``
    (taken by a sender, not yet handed to a socket), and survive a lost
    connection there.
    """

    def __init__(
        self,
        *,
        url: str,
        timeout: float | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        token: str | None = None,
        reconnect: Backoff | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._max_batch = max_batch
        self._token = token
        self._backoff = reconnect
        self._next_id = 1
        self._pending: dict[int, _Slot] = {}
        self._outbox_in, self._outbox_out = trio.open_memory_channel[_Request](OUTBOX_SIZE)
        # Taken from the outbox by a sender, not handed to a socket yet: a
        # lost connection leaves them for the next one (at most max_batch).
        self._staged: deque[_Request] = deque()
        self._lost: str | None = None  # set once: closed for good, and why
        self._state = ConnectionState.CONNECTING
        self._link: _Link | None = None  # the open connection, if any
        self._connected = trio.Event()  # set while OPEN, and once closed for good
        self._closing = trio.Event()  # set once closed for good: the connection task ends
        self._dial_scope: trio.CancelScope | None = None  # a dial or handshake in progress
        self._connections = 0
        self._messages_sent = 0
        self._requests_sent = 0
        self._messages_received = 0
        # WATCH belongs to the session, which every task of this client shares:
        # a watch block holds this lock, and only its own task's transactions
        # run meanwhile (another task's would end the watches; it waits).
        self._watch_lock = trio.Lock()
        self._watch_owner: trio.lowlevel.Task | None = None
        self._watch_lost: str | None = None  # the open watch block's connection was lost
        self._subscription: Subscription | None = None  # the open subscribe block's

    # -- the Commands interface ---------------------------------------------------------

    async def execute(self, command: str, *args: Arg) -> Any:
        """Run any command by name: ``await kv.execute("SET", "k", "v", "EX", 10)``.

        While the client reconnects, the call waits for the connection
        (within ``timeout``); it is sent once, never again after a loss.

        Raises:
            KVMemoError: the server's error, as the class of its kind.
            RequestTimeoutError: no answer within the client's ``timeout``
                (``data["applied"]`` is ``None``: it may have happened;
                ``False`` when it was never sent, waiting for a reconnection).
            DisconnectedError: the connection was lost with the request in
                flight, or the client is closed for good.
            TypeError, ValueError: an argument that cannot be sent (nothing is sent).
        """
        method = command.lower()
        params = encode_params(args)
        self._check_open()
        request = self._register(method, params)
        slot = await self._round_trip(request, repr(method))
        return _unwrap(slot, method, args)

    async def _round_trip(self, request: _Request, what: str) -> _Slot:
        """Queue one registered request and wait for its slot (within ``timeout``)."""
        assert request.slot is not None
        assert request.id is not None
        try:
            with trio.fail_after(self._deadline_seconds()):
                await self._enqueue(request)
                await request.slot.done.wait()
        except trio.TooSlowError:
            raise self._timeout_error(what, [request.slot]) from None
        finally:
            self._pending.pop(request.id, None)
        return request.slot

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
            DisconnectedError: as :meth:`execute`; also in a watch block whose
                connection was lost (nothing is sent: it would run unchecked).
            TypeError, ValueError: a call that cannot be sent (nothing is sent).
        """
        prepared = [_split_call(call) for call in calls]
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
        slot = await self._round_trip(request, "a transaction")
        answer = _unwrap_raw(slot)  # each call's entry is decoded as that call's
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
        :meth:`transaction` from the task that opened the block.

        A lost connection loses the watches (a transaction on a new session
        would run unchecked): every request of the block in flight or queued
        then fails with :class:`DisconnectedError`, and so does every later
        call the block's task makes before the block ends, even once the
        client has reconnected. Retry the whole block on it. ::

            async with kv.watch("balance"):
                balance = int(await kv.get("balance") or 0)
                done = await kv.transaction(("SET", "balance", balance - 10))
        """
        async with self._watch_lock:
            self._watch_owner = trio.lowlevel.current_task()
            self._watch_lost = None
            try:
                # Inside the try: a watch sent, then cancelled before its answer,
                # is given back too.
                await self.execute("watch", *keys)
                yield self
            except BaseException:
                # Unwinding, maybe cancelled with the connection (whose reader
                # would never take an answer): a notification, no wait. The
                # session runs it before anything sent after it; a lost
                # session has no watches to give back.
                lost, self._watch_owner, self._watch_lost = self._watch_lost, None, None
                if lost is None:
                    self._notify_nowait("unwatch")
                raise
            else:
                lost, self._watch_owner, self._watch_lost = self._watch_lost, None, None
                if lost is None:
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

        With ``reconnect``, the block survives a lost connection: the client
        subscribes again to its channels and patterns on the new connection
        before sending anything else, and messages go on arriving in the same
        block. Messages published while no connection was open are lost (as
        in Redis, pub/sub keeps nothing); a change (``sub.subscribe(...)``,
        ...) in flight at the loss raises :class:`DisconnectedError` and may
        be repeated. Iterating raises :class:`DisconnectedError` once the
        client is closed for good, or if the server refuses the new
        subscription.

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
        """Leave every channel and pattern, waiting for the server's answer (briefly).

        Nothing to do without an open connection: the session that had them
        is gone, and the next one is not given them (or is told to leave
        them if it was being resubscribed; see ``_prepare``).
        """
        if self._state is not ConnectionState.OPEN:
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
            DisconnectedError: the client is closed for good, or the calls
                are made in a watch block whose connection was lost (nothing
                is sent).
        """
        prepared = [(*split, encode_params(split[1])) for split in map(_split_call, calls)]
        self._check_open()
        registered = [self._register(method, params) for method, _, params in prepared]
        slots = [request.slot for request in registered if request.slot is not None]
        try:
            with trio.fail_after(self._deadline_seconds()):
                for request in registered:
                    await self._enqueue(request)
                for slot in slots:
                    await slot.done.wait()
        except trio.TooSlowError:
            raise self._timeout_error(f"a batch of {len(calls)} calls", slots) from None
        finally:
            for request in registered:
                if request.id is not None:
                    self._pending.pop(request.id, None)
        results: list[Any] = []
        for (method, args, _), slot in zip(prepared, slots, strict=True):
            try:
                results.append(_unwrap(slot, method, args))
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
        """Whether the client is closed for good (every call then raises).

        Not while it reconnects: see :attr:`state`.
        """
        return self._lost is not None

    @property
    def state(self) -> ConnectionState:
        """Open, reconnecting or closed (:class:`ConnectionState`)."""
        return self._state

    async def wait_connected(self) -> None:
        """Return once the client has an open connection: at once when it has.

        After a reconnection the connection is open once ``auth`` and the
        resubscription are done, so a message published after this returns
        reaches the open subscribe block.

        Raises:
            DisconnectedError: the client is closed for good (now or meanwhile).
        """
        while True:
            if self._lost is not None:
                raise DisconnectedError(self._lost)
            if self._state is ConnectionState.OPEN:
                return
            await self._connected.wait()

    def statistics(self) -> ClientStatistics:
        """Counters of this client (messages, requests, pending, reconnects)."""
        return ClientStatistics(
            messages_sent=self._messages_sent,
            requests_sent=self._requests_sent,
            messages_received=self._messages_received,
            pending=len(self._pending),
            reconnects=max(0, self._connections - 1),
        )

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        """Raise if no call may be made now: closed, or in a watch block whose session is gone."""
        if self._lost is not None:
            raise DisconnectedError(self._lost)
        if self._watch_lost is not None and self._watch_owner is trio.lowlevel.current_task():
            raise DisconnectedError(self._watch_lost_message(), applied=False)

    def _watch_lost_message(self) -> str:
        return (
            f"{self._watch_lost}: the watches of this watch block went with that session; "
            "nothing was sent (run the block again)"
        )

    def _deadline_seconds(self) -> float:
        return self._timeout if self._timeout is not None else math.inf

    def _open_timeout(self) -> float:
        """Seconds for opening one connection: the handshake, ``auth``, the resubscription."""
        return self._timeout if self._timeout is not None else CONNECT_TIMEOUT

    def _timeout_error(self, what: str, slots: Sequence[_Slot]) -> RequestTimeoutError:
        """The timeout of a call whose ``slots`` are not all answered (under ``timeout``)."""
        if any(slot.sent for slot in slots):
            return RequestTimeoutError(
                f"no answer to {what} within {self._timeout} s (client timeout)", applied=None
            )
        why = " (no connection: reconnecting)" if self._state is not ConnectionState.OPEN else ""
        return RequestTimeoutError(
            f"no answer to {what} within {self._timeout} s (client timeout): it was not sent{why}",
            applied=False,
        )

    def _register(self, method: str, params: list[Any]) -> _Request:
        """A fresh id and slot for one request. Synchronous: no checkpoint.

        On a client already closed (a caller checkpointed since its
        ``_check_open``, waiting for the watch lock, say) the slot is failed
        at once: ``_lose`` has run, and would never fail it. A request of the
        task of an open watch block is bound to the block's connection.
        """
        request_id = self._next_id
        self._next_id += 1
        slot = _Slot()
        if self._watch_owner is not None and self._watch_owner is trio.lowlevel.current_task():
            slot.bound = True
            if self._watch_lost is not None:
                slot.lost = self._watch_lost_message()
                slot.done.set()
        if self._lost is not None:
            slot.lost = self._lost
            slot.done.set()
        self._pending[request_id] = slot
        payload = {"jsonrpc": _JSONRPC, "id": request_id, "method": method, "params": params}
        return _Request(request_id, slot, payload)

    def _notify_nowait(self, method: str) -> None:
        """Queue a notification (no answer, no params) about the open session's state.

        Only with an open connection, and sent on that one only (a later
        session does not have the state it is about); dropped if the outbox
        has no room (a subscribe block's end says it again).
        """
        link = self._link
        if link is None or self._state is not ConnectionState.OPEN:
            return
        payload = {"jsonrpc": _JSONRPC, "method": method, "params": []}
        try:
            self._outbox_in.send_nowait(_Request(None, None, payload, link))
        except trio.WouldBlock:
            pass

    async def _enqueue(self, request: _Request) -> None:
        """Put a request in the outbox, waiting for room (backpressure).

        On a closed client (the outbox closed by ``_lose``, waking a caller
        that waits for room) it returns at once: ``_lose`` has failed the
        request's slot, or does before anyone looks at it.
        """
        try:
            try:
                self._outbox_in.send_nowait(request)
            except trio.WouldBlock:
                await self._outbox_in.send(request)  # backpressure: the outbox is full
        except trio.ClosedResourceError:
            if request.slot is not None and not request.slot.done.is_set():
                request.slot.lost = self._lost or f"the client of {self.url} was closed"
                request.slot.done.set()

    def _lose(self, reason: str) -> None:
        """Close the client for good and fail every pending request. Synchronous.

        Idempotent (the first reason stays). Ends the connection task: an
        open connection is closed with the closing handshake, a dial in
        progress is cancelled, a backoff wait ends.
        """
        if self._lost is None:
            self._lost = reason
        self._state = ConnectionState.CLOSED
        for slot in self._pending.values():
            if not slot.done.is_set():
                slot.lost = self._lost
                slot.done.set()
        if self._subscription is not None:
            self._subscription._lose(self._lost)
        self._outbox_in.close()  # wakes callers waiting for room (a full outbox, reconnecting)
        self._closing.set()
        self._connected.set()  # wakes wait_connected, which raises
        if self._link is not None:
            self._link.ended.set()
        if self._dial_scope is not None:
            self._dial_scope.cancel()

    def _drop(self, link: _Link, reason: str) -> None:
        """``link`` is lost: fail what it carried; reconnect, or close. Synchronous.

        Fails every request handed to that socket (``sent``: never sent
        again) and, when the connection had opened, every request of the
        watch block (its watches are gone). Requests not sent yet stay
        queued for the next connection. Without ``reconnect`` an opened
        connection's loss closes the client (``_lose``). Idempotent.
        """
        if link.ended.is_set():
            return
        link.reason = reason
        link.ended.set()
        if not link.opened:
            for slot in self._pending.values():  # auth, resubscription
                if slot.sent and not slot.done.is_set():
                    slot.lost = reason
                    slot.done.set()
            return
        if self._backoff is None:
            self._lose(reason)
            return
        for slot in self._pending.values():
            if (slot.sent or slot.bound) and not slot.done.is_set():
                slot.lost = reason
                slot.done.set()
        if self._watch_owner is not None:
            self._watch_lost = reason
        if self._link is link:
            self._link = None
        if self._lost is None:
            self._state = ConnectionState.RECONNECTING
            self._connected = trio.Event()

    async def abort(self) -> None:
        """Drop the connection now, as a network failure would (chaos tooling).

        Requests in flight fail with :class:`DisconnectedError` (they may or
        may not have been applied). Without ``reconnect`` the client is then
        closed; with it, it reconnects (a subscribe block survives, a watch
        block fails).
        """
        link = self._link
        if link is None or link.ws is None:
            return
        self._drop(link, f"the connection to {self.url} was dropped")
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            await link.ws.aclose(1001, "dropped by the client")

    # -- the connection task ------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection open until the client closes (see the module's design).

        ``task_status.started()`` once the first connection is open; before
        that its failure is raised (:class:`DisconnectedError`, the token's
        :class:`~kvmemo.errors.NoAuthError`, ``ValueError`` for a bad URL).
        """
        status: trio.TaskStatus[None] | None = task_status
        failures = 0  # attempts in a row that did not open a connection
        reason = ""
        while True:
            if status is None:  # a connection was lost (or an attempt failed)
                policy = self._backoff
                if policy is None or self._lost is not None:
                    return
                failures += 1
                if policy.max_attempts is not None and failures > policy.max_attempts:
                    self._lose(
                        f"gave up reconnecting to {self.url} after {policy.max_attempts} "
                        f"attempts ({reason})"
                    )
                    return
                with trio.move_on_after(policy.delay(failures)):
                    await self._closing.wait()
                if self._lost is not None:
                    return
            opened, reason = await self._connect_once(status)
            status = None
            if opened:
                failures = 0

    async def _connect_once(self, status: trio.TaskStatus[None] | None) -> tuple[bool, str]:
        """Dial, authenticate, resubscribe, serve until the connection ends.

        Returns whether it opened, and why it ended. With ``status`` (the
        first connection) a failure before it opened is raised instead.
        """
        link = _Link()
        failure: KVMemoError | None = None
        try:
            with trio.CancelScope() as dial:
                self._dial_scope = dial
                async with open_websocket_url(
                    self.url,
                    subprotocols=[SUBPROTOCOL],
                    max_message_size=MAX_MESSAGE_SIZE,
                    connect_timeout=self._open_timeout(),
                    disconnect_timeout=DISCONNECT_TIMEOUT,
                ) as ws:
                    link.ws = ws
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_loop, link)
                        failure = await self._prepare(link)
                        if failure is None and not link.ended.is_set():
                            self._dial_scope = None  # open: closing now waits for the handshake
                            self._open(link)
                            if status is not None:
                                status.started()
                            nursery.start_soon(self._send_loop, link)
                            await link.ended.wait()
                        nursery.cancel_scope.cancel()
                    if link.close_code is not None:
                        with trio.move_on_after(DISCONNECT_TIMEOUT):
                            await ws.aclose(link.close_code, "protocol error")
        except (HandshakeError, ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            # (Only a HandshakeError is documented; a stream broken in the
            # middle of the handshake is a failed attempt all the same.)
            if not link.opened:  # else the closing handshake timed out: closed all the same
                why = connect_failure(exc, timeout=self._open_timeout())
                failure = DisconnectedError(f"cannot connect to {self.url}: {why}")
        finally:
            self._dial_scope = None
        if link.opened:
            return True, link.reason or f"the connection to {self.url} ended"
        if failure is None:
            failure = DisconnectedError(link.reason or f"the connection to {self.url} ended")
        if status is not None:
            raise failure
        if isinstance(failure, NoAuthError):  # a wrong token stays wrong
            self._lose(f"the server at {self.url} refused the token on reconnecting: {failure}")
        return False, str(failure)

    async def _prepare(self, link: _Link) -> KVMemoError | None:
        """Authenticate and resubscribe a new connection; the failure, if any.

        Within ``_open_timeout()``. A refused resubscription ends the
        subscription (it raises :class:`DisconnectedError` saying why), not
        the connection. If the subscribe block ended meanwhile, the new
        session is told to leave what it was given.
        """
        with trio.move_on_after(self._open_timeout()):
            if self._token is not None:
                (slot,) = await self._direct(link, [("auth", [self._token])])
                try:
                    _unwrap_raw(slot)
                except KVMemoError as exc:
                    return exc
            subscription = self._subscription
            if subscription is None or subscription._ended:
                return None
            calls: list[tuple[str, list[Any]]] = []
            if subscription._channels:
                calls.append(("subscribe", encode_params(list(subscription._channels))))
            if subscription._patterns:
                calls.append(("psubscribe", encode_params(list(subscription._patterns))))
            for slot in await self._direct(link, calls):
                if slot.lost is not None:
                    return DisconnectedError(slot.lost)
                try:
                    _unwrap_raw(slot)
                except KVMemoError as exc:
                    subscription._lose(
                        f"the server refused to subscribe again after reconnecting to "
                        f"{self.url}: {exc.kind} {exc}"
                    )
            if self._subscription is not subscription or subscription._ended:
                await self._direct(link, [("unsubscribe", []), ("punsubscribe", [])], notify=True)
            return None
        return DisconnectedError(
            f"no answer from {self.url} to auth or subscribe within "
            f"{self._open_timeout()} s of connecting"
        )

    async def _direct(
        self, link: _Link, calls: list[tuple[str, list[Any]]], *, notify: bool = False
    ) -> list[_Slot]:
        """Send ``calls`` on ``link`` at once, before the outbox; their answered slots.

        For the connection task only. A slot is failed (``lost``) if the
        connection is lost first. ``notify``: notifications, nothing awaited.
        """
        if not calls or link.ws is None:
            return []
        requests: list[_Request] = []
        payloads: list[dict[str, Any]] = []
        for method, params in calls:
            if notify:
                payloads.append({"jsonrpc": _JSONRPC, "method": method, "params": params})
                continue
            request = self._register(method, params)
            assert request.slot is not None
            request.slot.sent = True
            requests.append(request)
            payloads.append(request.payload)
        slots = [request.slot for request in requests if request.slot is not None]
        document: Any = payloads[0] if len(payloads) == 1 else payloads
        try:
            try:
                await link.ws.send_message(_dumps(document))
            except ConnectionClosed as exc:
                self._drop(link, _closed_reason(self.url, exc))
            else:
                self._messages_sent += 1
                self._requests_sent += len(payloads)
            for slot in slots:
                await slot.done.wait()
        finally:
            for request in requests:
                if request.id is not None:
                    self._pending.pop(request.id, None)
        return slots

    def _open(self, link: _Link) -> None:
        """The connection is ready: requests go. Synchronous."""
        link.opened = True
        self._link = link
        self._connections += 1
        self._state = ConnectionState.OPEN
        self._connected.set()

    def _sendable(self, request: _Request, link: _Link) -> bool:
        if request.slot is None:
            return request.link is None or request.link is link
        return request.id in self._pending and not request.slot.done.is_set()

    async def _send_loop(self, link: _Link) -> None:
        """The sender task of one connection: one message per tick's worth of requests.

        Requests are staged (``_staged``) before the tick's yield, so a
        connection lost meanwhile leaves them to the next one; a request is
        marked ``sent`` just before its message is handed to the socket.
        """
        staged = self._staged
        while True:
            if not staged:
                try:
                    staged.append(await self._outbox_out.receive())
                except trio.EndOfChannel:
                    return  # the client is closed (``_lose``)
            await trio.lowlevel.checkpoint()  # let the other tasks of this tick enqueue
            while len(staged) < self._max_batch:
                try:
                    staged.append(self._outbox_out.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    # EndOfChannel: closed during the checkpoint; _lose failed
                    # every request and ended the link (checked next).
                    break
            if link.ended.is_set() or link.ws is None:
                return  # what is staged waits for the next connection
            live: list[_Request] = []
            while staged and len(live) < self._max_batch:
                request = staged.popleft()
                if self._sendable(request, link):
                    live.append(request)
            if not live:
                continue
            for request in live:
                if request.slot is not None:
                    request.slot.sent = True
            document: Any = live[0].payload if len(live) == 1 else [r.payload for r in live]
            if len(live) > 1:
                _track_batch(link.batches, live)
            try:
                await link.ws.send_message(_dumps(document))
            except ConnectionClosed as exc:
                self._drop(link, _closed_reason(self.url, exc))
                return
            self._messages_sent += 1
            self._requests_sent += len(live)

    async def _read_loop(self, link: _Link) -> None:
        """The reader task of one connection: resolve slots by id until it ends."""
        assert link.ws is not None
        while True:
            try:
                message = await link.ws.get_message()
            except ConnectionClosed as exc:
                self._drop(link, _closed_reason(self.url, exc))
                return
            self._messages_received += 1
            problem = self._on_message(message, link)
            if problem is not None:
                link.close_code = 1002
                self._drop(link, f"connection to {self.url} closed: {problem}")
                return

    def _on_message(self, message: str | bytes, link: _Link) -> str | None:
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
                if self._refused_batch(link, response):
                    continue
                # An error the server could not attach to a request: its
                # requests would never be answered.
                error = error_from_payload(response.get("error"))
                return f"the server refused a message: {error.kind} {error.message}"
            slot = self._pending.get(request_id) if isinstance(request_id, int) else None
            if slot is None or slot.done.is_set():
                continue  # its caller was cancelled or timed out
            slot.response = response
            slot.done.set()
        return None

    def _refused_batch(self, link: _Link, response: dict[str, Any]) -> bool:
        """Fail the calls of the batch an id-less ``TOO_LARGE`` answers; whether it did.

        The server refuses a batch over its ``max_batch`` whole (none of its
        calls ran) with one error whose ``data.length`` is the batch's length
        (docs/protocol.md): it answers the oldest batch of that length still
        unanswered, whose calls fail with that error; the connection and the
        other calls go on. ``max_batch`` above the server's is the cause.
        """
        error = response.get("error")
        if not isinstance(error, dict) or error.get("code") != TooLargeError.code:
            return False
        data = error.get("data")
        length = data.get("length") if isinstance(data, dict) else None
        if not isinstance(length, int):
            return False
        for batch in link.batches:
            if len(batch) == length and all(_unanswered(r) for r in batch):
                link.batches.remove(batch)
                for request in batch:
                    if request.slot is not None:
                        request.slot.response = {
                            "jsonrpc": _JSONRPC,
                            "id": request.id,
                            "error": error,
                        }
                        request.slot.done.set()
                return True
        return False

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


def _unanswered(request: _Request) -> bool:
    return request.slot is not None and not request.slot.done.is_set()


def _track_batch(batches: deque[list[_Request]], batch: list[_Request]) -> None:
    """Remember a batch sent, first forgetting the oldest ones fully answered."""
    while batches and not any(_unanswered(r) for r in batches[0]):
        batches.popleft()
    batches.append(batch)


class Subscription:
    """One :meth:`Client.subscribe` block: its channels, patterns and messages.

    The methods of the embedded :class:`kvmemo.embedded.Subscription`: the
    (un)subscribe methods answer Redis's subscription count after the change
    (a round trip each), :meth:`get` and ``async for`` give
    :class:`kvmemo.Message` s. Iterate it, or call :meth:`get`, from one task
    at a time. With ``reconnect`` it outlives a lost connection: its channels
    and patterns are subscribed again on the next one (messages published in
    between are lost).

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
        if self._lost is not None:  # closed for good, or not subscribed again after a reconnect
            raise DisconnectedError(self._lost)
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
            DisconnectedError: the client is closed for good (the connection
                lost without ``reconnect``, or its attempts ran out), or the
                server refused to subscribe again after a reconnection; and
                every message received before has been taken.
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


def _split_call(call: tuple[Arg, ...]) -> tuple[str, tuple[Arg, ...]]:
    """(method, arguments) of one call of a batch or a transaction.

    An empty call names no command: it is sent as the method ``""``, which
    the server answers as any unknown one (``UNKNOWN_METHOD`` in its place),
    as the embedded store does.
    """
    if not call:
        return "", ()
    return _method_of(call[0]), call[1:]


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


def _dumps(document: Any) -> str:
    return json.dumps(document, separators=_COMPACT, ensure_ascii=False)


def _closed_reason(url: str, exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return f"connection to {url} lost"
    detail = f" ({reason.reason})" if reason.reason else ""
    return f"connection to {url} lost: close code {reason.code} {reason.name}{detail}"


def connect_failure(exc: BaseException, *, timeout: float | None = None) -> str:
    """Why a WebSocket connection could not be opened, in a few words for people.

    The one translation of a failed dial for every tool (``kvmemo cli``,
    ``bench``, ``chaos``) and for :func:`connect`'s :class:`DisconnectedError`
    (``cannot connect to URL: <this>``):

    - an HTTP answer instead of the handshake (a page, a wrong path):
      ``the server answered HTTP 200, not a WebSocket handshake (is the path /ws?)``;
      a 403 (a refused ``Origin`` or ``?token=``) says so with the server's
      one-line reason: ``the server refused the WebSocket handshake: HTTP 403 (invalid token)``;
    - a socket error, wherever trio and trio-websocket wrapped it (a
      ``HandshakeError`` caused by ``OSError("all attempts to connect ...
      failed")`` caused by a group of the real errors): the first one's
      ``strerror``, as ``Connection refused`` or ``Name or service not known``;
    - no handshake in time: ``no WebSocket handshake within 10 s``;
    - a connection closed during the handshake: ``the connection was closed (...)``.

    Args:
        exc: what the dial raised.
        timeout: the handshake's deadline in seconds, named by a timeout.
    """
    if isinstance(exc, ConnectionRejected):
        return _rejection(exc)
    if isinstance(exc, ConnectionTimeout):
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return f"no WebSocket handshake{within}"
    if isinstance(exc, ConnectionClosed):
        return f"the connection was closed ({exc.reason})"
    for error in _causes(exc):
        if isinstance(error, OSError):
            if error.errno is not None and error.errno > 0:  # "Connection refused"
                return os.strerror(error.errno)
            if error.strerror:  # a gaierror's "Name or service not known"
                return error.strerror
    for error in _causes(exc):
        if str(error):
            return str(error)
    return type(exc).__name__


REJECTION_REASON_LIMIT = 200  # characters of an HTTP refusal's body quoted as its reason


def _rejection(exc: ConnectionRejected) -> str:
    """An HTTP answer to the handshake, for people (never its headers or its page)."""
    if exc.status_code != 403:
        return (
            f"the server answered HTTP {exc.status_code}, not a WebSocket handshake"
            " (is the path /ws?)"
        )
    text = (exc.body or b"").decode("utf-8", "replace").strip()
    shown = len(text) <= REJECTION_REASON_LIMIT and text.isprintable()
    reason = f" ({text})" if text and shown else ""
    return f"the server refused the WebSocket handshake: HTTP 403{reason}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from, and the members of any group, depth first."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        nested: list[BaseException] = []
        if isinstance(error, BaseExceptionGroup):
            nested += error.exceptions
        if error.__cause__ is not None:
            nested.append(error.__cause__)
        stack += reversed(nested)


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
    reconnect: bool | Backoff = False,
) -> AsyncIterator[Client]:
    """Connect to a server for the duration of the block.

    Args:
        url: the session URL, ``ws://host:port/ws`` (``wss://`` for TLS).
        token: sent with ``auth`` before anything else when given, on every
            connection.
        timeout: seconds for the handshake and for each request's answer
            (a late request raises :class:`~kvmemo.errors.RequestTimeoutError`);
            a request made while the client reconnects waits for the
            connection within it too. ``None``: no request deadline, and
            ``CONNECT_TIMEOUT`` for opening a connection (handshake, auth,
            resubscription).
        max_batch: the most requests sent in one message; keep it at or under
            the server's ``max_batch``.
        reconnect: off by default: a lost connection closes the client, every
            pending and later call raising :class:`DisconnectedError`. ``True``
            (the :class:`Backoff` defaults: 0.1 s doubling to 5 s, ±20 %,
            unbounded attempts) or a :class:`Backoff`: the client reconnects
            after a lost connection, resubscribes, and fails only the
            requests that were in flight (see the module's design). The
            first connection is not retried.

    Yields:
        The :class:`Client`, shared safely by any number of tasks. Leaving the
        block closes it (a reconnection in progress stops at once).

    Raises:
        ValueError: ``max_batch`` below 1, ``timeout`` not positive, or a bad URL.
        TypeError: ``reconnect`` neither a bool nor a :class:`Backoff`.
        DisconnectedError: the connection could not be opened; its message
            says why (``cannot connect to URL: Connection refused``; see
            :func:`connect_failure`).
        NoAuthError: the token was refused.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if isinstance(reconnect, Backoff):
        backoff: Backoff | None = reconnect
    elif isinstance(reconnect, bool):
        backoff = Backoff() if reconnect else None
    else:
        raise TypeError(f"reconnect must be a bool or a Backoff, got {reconnect!r}")
    client = Client(url=url, timeout=timeout, max_batch=max_batch, token=token, reconnect=backoff)
    try:
        async with trio.open_nursery() as nursery:
            # The connection task lives in the client's own nursery; the first
            # connection's failure comes out of start() as itself.
            await nursery.start(client._run)
            try:
                yield client
            finally:
                # Ends the connection task by itself: an open connection is
                # closed with the closing handshake, a backoff or dial stops now.
                client._lose(f"the client of {url} was closed")
    except BaseExceptionGroup as group:
        # The connection task never raises once started, so the group holds
        # the block's own exception (or start()'s): give it back unwrapped.
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise


def session_url(
    url: str | None = None, *, environ: Mapping[str, str] | None = None, flag: str = "--url"
) -> str:
    """The session URL a tool connects to: ``url``, else ``$KVMEMO_URL``, else the default.

    An explicit URL (a ``--url`` flag) wins over the environment variable
    :data:`URL_VARIABLE`, which wins over :data:`DEFAULT_URL`. A variable
    that is set is used even when empty (an empty one is refused: a script's
    unset ``$URL`` should not silently reach the default server).

    Args:
        url: the URL given explicitly, or None.
        environ: the environment (``os.environ``).
        flag: how the explicit URL is named in an error (``--url``).

    Raises:
        ValueError: the URL chosen is not one a connection could be made to
            (:func:`check_url`); the message names where it came from
            (``flag`` or ``KVMEMO_URL``).
    """
    if url is not None:
        check_url(url, flag)
        return url
    environ = os.environ if environ is None else environ
    from_environment = environ.get(URL_VARIABLE)
    if from_environment is None:
        return DEFAULT_URL
    check_url(from_environment, URL_VARIABLE)
    return from_environment


def check_url(url: str, name: str = "url") -> None:
    """Refuse a session URL no connection could be made to, before trying.

    Raises:
        ValueError: not ``ws://`` or ``wss://``, no host, or a port that is no
            number in 1..65535; the message names ``name`` (``--url`` on the
            command line) and the URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not url.startswith(("ws://", "wss://")):
        raise ValueError(f"{name} must be a ws:// or wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"{name} has no host, got {url!r}")
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        port = 0
    if port == 0:  # ":0" or a bad one: nothing listens there
        raise ValueError(f"{name} has a bad port, got {url!r}")
