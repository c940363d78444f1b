"""One WebSocket session: JSON-RPC in, engine calls, responses out.

Design: the session's reader task decodes each message (sans-IO codec) and
dispatches it in arrival order, without waiting for the work: each
message's calls run in a task of the session's nursery, so pipelined
messages proceed concurrently and responses go out as work completes,
matched by id. The reader never blocks on a request (only on sending an
error it answers itself), so a slow key never holds up the others.

Ordering: requests of one session that touch the same key take effect in
sending order. At dispatch the reader records, per key, the completion
event of the last message touching it (``_tails``); a new message's task
first waits for the events of its keys, then runs. A command that reads or
writes the whole keyspace (``flushall``, ``dbsize``, ``keys``, ``scan``), or
that must follow the session's earlier writes (``publish``: whoever it tells
of a write can read it), is a barrier: it waits for everything dispatched
before it, and everything dispatched after it waits for it. Within one message,
:meth:`KVEngine.execute_many` keeps the order per key. Messages on other
keys never wait for each other.

Limits: at most ``max_in_flight`` requests dispatched and not finished
(waiting for their turn counts); more get OVERLOADED, nothing applied.
Batch length in the codec; message size in the WebSocket layer (close
1009); idle timeout (close 1008, only when nothing is in flight).

Output and memory. The problem: a response is only known once computed,
and a peer may send requests faster than it reads their responses (or read
nothing). Redis bounds a client by its ``client-output-buffer-limit`` and
runs its commands one after another; here requests run concurrently, so
the bound is kept in three places:

* The socket. Once the responses not yet taken by the socket pass
  ``max_output_buffer`` bytes (UTF-8 bytes, as sent), the reader takes no
  more messages, and no request starts (a task waits before each engine
  call, :meth:`Session._output_room`), until they are back under it. A
  peer that takes nothing from the socket for ``output_timeout`` seconds
  meanwhile (it does not read its responses, whatever the reader is doing)
  is disconnected, without a close frame (its socket is full, and one could
  land inside a half-written frame), and logged, as the Redis port does
  (and as Redis does past its hard limit).
* The window. The reader dispatches a message only while the unanswered
  messages weigh at most ``pipeline_window`` with it (a request weighs 1,
  so a batch up to the window its length; a longer batch the first chunk
  it computes before it holds the lane, below), or nothing is unanswered;
  else it starts its current group and waits for answers. So the responses
  computed and not yet queued (results, then texts) are those of at most
  ``pipeline_window`` requests, plus the lane's chunk, however many the
  peer sends; the rest stay in the socket (TCP backpressure, no error).
* Batches. A batch's answer is one WebSocket message and cannot be sent in
  parts. A batch up to ``pipeline_window`` runs at once, as pipelined
  requests do, and is never cut (its answer may pass the limit, as one
  big response may). A longer batch runs in chunks (one engine call each,
  in order), one such batch at a time per session (``_lane``): the first
  of ``BATCH_CHUNK`` requests, each next one as many as the room
  left under ``max_output_buffer`` holds at the answer's average response
  size so far, at least ``BATCH_CHUNK`` and at most ``pipeline_window``
  (:meth:`Session._batch_text`). Once the responses it has written pass
  ``max_output_buffer``, its requests not yet started are answered
  ``TOO_LARGE`` (-32004, ``data.applied`` false) and not run, so the
  client can send them again; its notifications still run (nothing is
  sent for them). The first chunk always runs, so a batch whose first
  responses alone are over the limit is answered, as a single request of
  that size is. A batch holding a session method (``auth``, ``watch``,
  ...) runs its calls one by one in the reader; when longer than the
  window it is cut the same way (its first call always runs).

Memory per session, for a peer that reads nothing: ``max_output_buffer`` of
responses waiting, plus what had started before they passed it: the
responses of at most ``pipeline_window`` requests (pipelined, or in
batches up to that length), and one long batch's answer (up to
``max_output_buffer``, plus one chunk of at most ``pipeline_window``
responses, plus its ``TOO_LARGE`` answers). A response is one command's:
an MGET's array, a KEYS's, a transaction's.

Throughput: the reader takes every message already received in one go
(after one await, and while trio-websocket's reader, which hands over one
message per scheduler pass, keeps bringing more: ``DRAIN_IDLE_PASSES``)
and runs the ordinary single requests among them together, one task and
one :meth:`KVEngine.execute_many` per group, so the shards see one batch
per wake-up (a JSON-RPC batch message runs as a group of its own).
Responses are written straight to text by the codec
(:func:`jsonrpc.response_text`), and a writer task sends every response
that is ready in one socket write, framing them itself when that gives the
bytes wsproto would write. Both reach into trio-websocket's connection (its
receive channel, wsproto state and send lock, checked on each use, with a
fallback to the public one-message API), because its public API has
neither a non-blocking receive nor a multi-message send.

Publish/subscribe (version 1.4): ``subscribe``, ``psubscribe``,
``unsubscribe`` and ``punsubscribe`` are session methods, run in the reader
in order with everything else, on the session's own
:class:`~kvmemo.engine.pubsub.Subscriber` of the engine's hub (made on
first use, closed when the session ends however it ends, as its watches
are). The subscribed session keeps running every other method. A *pusher*
task, started in the session's nursery by the first subscription, copies
published messages from the subscriber's bounded outbox into the session's
outbox as JSON-RPC notifications (``message``, ``pmessage``), one batch at a
time: it takes the next batch only once the writer has handed the last one
to the socket (so does the reader, see "Order"). A peer that does not read
therefore leaves its messages in the hub, where ``pubsub_buffer_limit``
bounds them; past it the hub ends the subscriber and the session is closed
with 1008 (other sessions are not affected). A subscribed session is exempt
from the idle timeout, as Redis exempts its pub/sub clients.

Order: a message (a request or a batch) holding a pub/sub method first
queues what the hub has already delivered, then holds the pusher back until
its own answer is queued; so a subscription's response goes out before any
message it brings, and no message of a channel comes after the response to
a request that left it. (A batch's answer is one WebSocket message: what is
published while the batch runs comes after that answer, even on a channel a
later call of the batch leaves.) Messages of one channel go out in publish
order (the hub's outbox and the session's are FIFO).

Errors: a client's bad input becomes an error response; a bug of ours in a
request becomes ``INTERNAL`` for that request and is logged, and the
session lives on. A failure of the session itself ends that session only;
the server catches it.
"""

from __future__ import annotations

import hmac
import logging
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import TextMessage

from ..commands.table import COMMANDS
from ..engine.pubsub import Message, Subscriber
from ..errors import (
    ArityError,
    InternalError,
    KVMemoError,
    NoAuthError,
    OverloadedError,
    TooLargeError,
    UnavailableError,
    UnknownCommandError,
)
from . import jsonrpc

if TYPE_CHECKING:
    from ..engine.engine import KVEngine
    from .app import Server

log = logging.getLogger("kvmemo.session")

# Version 1.2 methods that are not commands of the table (the session keeps their state).
TRANSACTION_METHODS = frozenset({"transaction", "watch", "unwatch"})
# Version 1.4 methods that are not commands of the table (the session's subscriber).
PUBSUB_METHODS = frozenset({"subscribe", "unsubscribe", "psubscribe", "punsubscribe"})
# This port's methods that are not commands of the table.
OWN_METHODS = TRANSACTION_METHODS | PUBSUB_METHODS
# Answered by the session itself, in order with everything else it was sent.
SESSION_METHODS = frozenset({"auth", "command.list"}) | OWN_METHODS
# Keyless commands with these flags are barriers: they touch every key, or
# (``ordered``: PUBLISH) must come after everything the session sent before.
KEYSPACE_FLAGS = frozenset({"readonly", "write", "ordered"})
DRAIN_RETRY_MS = 1000  # retry_after_ms told to requests arriving during a shutdown
CLOSE_TIMEOUT = 1.0  # seconds the peer gets to answer our close frame
DRAIN_MAX = 256  # messages the reader takes in one go
# trio-websocket's reader task hands over one message per scheduler pass (it
# yields after each), and one more pass when it receives bytes. The reader
# gives it up to this many passes that bring nothing before it stops taking
# messages: groups then hold what arrived together (a few messages, not one),
# which roughly halved server CPU per message for pipelined single requests.
DRAIN_IDLE_PASSES = 2  # scheduler passes
WRITE_PIECE = 64 * 1024  # bytes per socket write of a long answer, so progress shows
# A batch longer than pipeline_window runs in chunks (one engine call each,
# in order), the first of this many requests (the blind guess: nothing is
# known yet of its responses' sizes), each next sized to the room left under
# the output limit (up to pipeline_window), only once the last is encoded:
# what a batch holds beyond its answer is one chunk's results. The Redis
# port's PIPELINE_CHUNK is 128 too; fixed chunks of 128 here halved the
# throughput of a 5,000-SET batch with appendfsync always (a sync per
# engine call), and chunking batches of 200 cost a quarter of their CPU.
BATCH_CHUNK: Final = 128  # requests


def _is_method(name: str) -> bool:
    """Whether ``name`` is a method of this port."""
    return name in COMMANDS or name in OWN_METHODS


def _is_transaction_method(name: str) -> bool:
    """Whether ``name`` may be a call of a transaction."""
    return name in COMMANDS and name not in SESSION_METHODS


def _receive_nowait(ws: WebSocketConnection) -> str | bytes | None:
    """A message already received, without waiting; None if there is none."""
    channel = getattr(ws, "_recv_channel", None)
    if channel is None:
        return None
    try:
        message: str | bytes = channel.receive_nowait()
    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        return None
    return message


def _text_frame_header(size: int) -> bytes:
    """The header of one final, unmasked text frame of ``size`` payload bytes (RFC 6455 5.2)."""
    if size <= 125:
        return _SMALL_TEXT_HEADERS[size]
    if size <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, size)
    return struct.pack("!BBQ", 0x81, 127, size)


_SMALL_TEXT_HEADERS: Final = tuple(bytes((0x81, size)) for size in range(126))


def _frames_writable(conn: WSConnection) -> bool:
    """Whether text frames may be written here, byte for byte as wsproto would write them.

    True while the connection is open, has no extension (trio-websocket
    accepts none: no permessage-deflate) and is not in the middle of a
    fragmented message; then wsproto writes each message as one final
    unmasked frame whose payload is the text's UTF-8, and keeps no state
    for it.
    """
    connection = getattr(conn, "connection", None)
    proto = getattr(connection, "_proto", None)
    return (
        connection is not None
        and connection.state is ConnectionState.OPEN
        and getattr(proto, "extensions", None) == []
        and getattr(proto, "_outbound_opcode", False) is None
    )


def _text_frames(texts: list[str]) -> bytes:
    """Each text as one WebSocket text frame of a server, all in one buffer."""
    parts: list[bytes] = []
    header = _text_frame_header
    for text in texts:
        payload = text.encode("utf-8")
        parts.append(header(len(payload)))
        parts.append(payload)
    return b"".join(parts)


async def _send_many(
    ws: WebSocketConnection, texts: list[str], progress: Callable[[int], None]
) -> None:
    """Send several text messages with one socket write (one message each).

    The frames are written here rather than by wsproto when
    :func:`_frames_writable` says that gives the same bytes (it saves
    wsproto's per-message work), else by wsproto. ``texts`` is emptied once
    framed, so that a socket that does not take the bytes holds them once,
    not twice. ``progress(n)`` is called each time the socket took a piece
    of ``n`` bytes (at most ``WRITE_PIECE``, or one message).
    """
    conn = getattr(ws, "_wsproto", None)
    lock = getattr(ws, "_stream_lock", None)
    stream = getattr(ws, "_stream", None)
    if conn is None or lock is None or stream is None:
        for text in texts:
            await ws.send_message(text)
            progress(_utf8_length(text))
        return
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    if _frames_writable(conn):
        data = _text_frames(texts)
    else:
        data = b"".join(conn.send(TextMessage(data=text)) for text in texts)
    texts.clear()
    async with lock:
        try:
            if len(data) <= WRITE_PIECE:
                await stream.send_all(data)
                progress(len(data))
            else:
                view = memoryview(data)
                for start in range(0, len(data), WRITE_PIECE):
                    piece = view[start : start + WRITE_PIECE]
                    await stream.send_all(piece)
                    progress(len(piece))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            abort = getattr(ws, "_abort_web_socket", None)
            if abort is not None:
                await abort()
            raise ConnectionClosed(ws.closed) from None


def _utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (``isascii`` is O(1): no encoding for the usual text)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


async def _abort(ws: WebSocketConnection) -> None:
    """Drop the connection without a close frame (the peer sees 1006)."""
    stream = getattr(ws, "_stream", None)
    if stream is not None:
        await trio.aclose_forcefully(stream)
    abort = getattr(ws, "_abort_web_socket", None)
    if abort is not None:
        await abort()


class Session:
    """State of one WebSocket session.

    Invariants: ``in_flight`` counts the requests dispatched and not yet
    finished, ``_weight`` their messages' weight (:meth:`_weight_of`), which
    the reader keeps within ``pipeline_window`` unless one message alone is
    over it; ``_lane`` is held by the batch running in chunks, if any;
    ``_tails[key]`` is the completion event of the last message touching
    ``key`` that is still unfinished; ``_barrier`` is that of the
    last keyspace-wide message, or None; ``_active`` counts the request
    tasks not yet done (their responses queued), plus one while the reader
    holds messages it took and has not dispatched yet, and ``_idle`` is set
    whenever it is zero. ``_outbox_bytes`` counts the UTF-8 bytes of the
    texts in ``_outbox``, ``_sending_bytes`` those the writer is handing to
    the socket and the socket has not taken yet; ``_outbox_space`` is clear
    only while their sum may be over ``max_output_buffer`` (then the reader
    waits, and the output watchdog watches the socket's progress).
    ``_writing`` is true while the writer is in a socket write: a writer
    cancelled there left a frame half-written. ``_queued_total`` and
    ``_written_total`` count the texts ever queued and ever handed to the
    socket; ``_push_holds`` counts the messages holding a pub/sub method
    being answered (the pusher waits while it is not zero). At most one
    batch of pushes is outside the hub and not yet written: nobody takes
    from the subscriber while ``_written_total < _push_target``.
    """

    def __init__(self, server: Server, ws: WebSocketConnection, sid: int, authed: bool) -> None:
        self.server = server
        self.ws = ws
        self.id = sid
        self.authed = authed
        self.in_flight = 0
        self._weight = 0  # of the messages dispatched and unanswered (see the class docstring)
        self._lane = trio.Lock()  # held by the batch running in chunks (one at a time)
        self._window = server.config.pipeline_window
        self._chunk = min(BATCH_CHUNK, self._window)  # a long batch's first chunk
        self.closing = False
        self._tails: dict[bytes, trio.Event] = {}
        self._barrier: trio.Event | None = None
        self._running: set[trio.Event] = set()
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._reader = trio.CancelScope()  # the read loop's; drain cancels it
        self._close: tuple[int, str] | None = None  # (code, reason) the session closes with
        self._ended = trio.Event()
        self._outbox: list[str] = []  # responses not yet handed to the socket
        self._outbox_bytes = 0
        self._sending_bytes = 0  # of the responses the writer is handing to the socket
        self._progress = 0  # socket writes done; a stalled peer leaves it unchanged
        self._writing = False
        self._stalled = False  # the watchdog dropped a peer that reads nothing
        self._over_limit = trio.Event()  # set when _outbox_space is cleared
        self._outbox_ready = trio.Event()
        self._outbox_space = trio.Event()
        self._outbox_space.set()
        self._flushed = trio.Event()
        self._flushed.set()
        self._broken = False
        self._group: list[_Unit] = []  # ordinary messages of the current read, not started yet
        self.watches: list[tuple[int, bytes, int]] = []  # WATCH (version 1.2): the engine's counts
        self._queued_total = 0
        self._written_total = 0
        self._written = trio.Event()  # set (and replaced) after each socket write
        self._answered = trio.Event()  # set (and replaced) when dispatched requests finish
        self._nursery: trio.Nursery | None = None  # the session's, while it runs
        self.subscriber: Subscriber | None = None  # pub/sub (version 1.4), made on first use
        self._pushing = False  # the pusher task was started
        self._push_holds = 0
        self._push_released = trio.Event()
        self._push_target = 0  # _queued_total after the last batch of pushes
        self._push_held = 0  # bytes of that batch counted against the subscriber (hold)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until the peer closes it, it idles out, or the server drains it.

        The session closes its own socket when it is drained: trio-websocket
        completes a close handshake only while the connection's reader task
        runs, and that task ends with the session. Its watches and its
        subscriptions end with it.
        """
        try:
            await self._run()
        finally:
            self.end_watches()
            self.end_subscriptions()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._output_watchdog)
            with self._reader:
                try:
                    await self._read_loop(nursery)
                except ConnectionClosed:
                    pass
                if self._close is None:
                    # The peer left: let dispatched requests finish (replies may
                    # fail). In the reader's scope: a peer that left without
                    # reading is cut short by the output watchdog.
                    await self.wait_idle()
            if not self._stalled:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._flushed.wait()
            nursery.cancel_scope.cancel()  # drained: the grace is over for the rest
        if self._stalled or self._writing:
            # A peer that reads nothing, or a frame left half-written by the
            # cancelled writer: a close frame cannot be delivered whole.
            await _abort(self.ws)
        elif self._close is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.ws.aclose(*self._close)
        self._ended.set()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        idle_timeout = self.server.config.idle_timeout
        ws = self.ws
        while True:
            if not self._outbox_space.is_set():
                await self._outbox_space.wait()  # the peer is slow to read its responses
            if idle_timeout:
                with trio.move_on_after(idle_timeout) as idle:
                    message = await ws.get_message()
                if idle.cancelled_caught:
                    if self._active or self.subscribed:
                        continue  # not idle: requests are still running, or it listens
                    await ws.aclose(1008, "idle timeout")
                    return
            else:
                message = await ws.get_message()
            # The messages taken count as in flight until dispatched (a drain
            # waits for them); each is refused if the drain began before it
            # was taken, as if it had been dispatched at once.
            self._task_started()
            try:
                taken = [(message, self.closing)]
                empty_passes = 0
                while len(taken) < DRAIN_MAX:
                    more = _receive_nowait(ws)
                    if more is None:
                        if empty_passes == DRAIN_IDLE_PASSES:
                            break
                        empty_passes += 1
                        await trio.lowlevel.checkpoint()  # the connection's reader may hand more
                        continue
                    empty_passes = 0
                    taken.append((more, self.closing))
                self.server.messages_in.inc(len(taken))
                for message, closing in taken:
                    await self._dispatch(message, nursery, closing=closing)
                self._flush_group(nursery)
            finally:
                self._task_done()

    async def _output_watchdog(self) -> None:
        """Drop the peer when it takes nothing for ``output_timeout`` while over the limit.

        Runs beside the writer, whatever the reader waits on (room in the
        outbox, pushes to be written, the next message): the session's
        memory stays bounded by a peer that stops reading. Costs nothing
        while under the limit (it waits for ``_over_limit``).
        """
        timeout = self.server.config.output_timeout
        while True:
            await self._over_limit.wait()
            while not self._outbox_space.is_set():
                progress = self._progress
                with trio.move_on_after(timeout):
                    await self._outbox_space.wait()
                if self._outbox_space.is_set() or self._progress != progress:
                    continue
                log.warning(
                    "session %d: %d response bytes unsent (limit %d) and nothing read for"
                    " %.1f s: closing it",
                    self.id,
                    self._outbox_bytes + self._sending_bytes,
                    self.server.config.max_output_buffer,
                    timeout,
                )
                if self._close is None:
                    self._close = (1008, "output buffer limit reached")
                self._stalled = True
                self._reader.cancel()
                return
            self._over_limit = trio.Event()

    def _made_progress(self, nbytes: int) -> None:
        """The socket took ``nbytes`` of what the writer hands it: room may be back."""
        self._progress += 1
        self._sending_bytes = max(0, self._sending_bytes - nbytes)
        if (
            not self._outbox_space.is_set()
            and self._outbox_bytes + self._sending_bytes <= self.server.config.max_output_buffer
        ):
            self._outbox_space.set()

    async def wait_idle(self) -> None:
        """Wait until every dispatched request has finished and been answered."""
        while self._active:
            await self._idle.wait()

    async def drain(self, grace: float) -> None:
        """Graceful close: refuse new requests, let those in flight finish
        (within ``grace`` seconds), then close the socket with 1001."""
        self.closing = True
        with trio.move_on_after(grace):
            await self.wait_idle()
        self._close = (1001, "server shutting down")
        self._reader.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ended.wait()

    def _task_started(self) -> None:
        if self._active == 0:
            self._idle = trio.Event()
        self._active += 1

    def _task_done(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    # -- dispatch -----------------------------------------------------------------------

    async def _dispatch(
        self, message: str | bytes, nursery: trio.Nursery, *, closing: bool
    ) -> None:
        """Handle one message: ordinary ones join the current group (run later, together).

        ``closing``: whether the session was draining when the message was taken.
        Waits first for room (see the module docstring, "Output and memory").
        """
        await self._room(nursery, 0)
        if isinstance(message, bytes):
            await self._send([jsonrpc.binary_message_response()], is_batch=False)
            return
        decoded = jsonrpc.decode_message(message, max_batch=self.server.config.max_batch)
        calls: list[jsonrpc.Call] = []
        errors = list(decoded.errors)
        for call in decoded.calls:
            if call.method in COMMANDS or call.method in OWN_METHODS:
                calls.append(call)
            elif not call.notification:
                # Method names are lower case and case-sensitive on this port
                # (the engine itself also accepts Redis's any-case names).
                unknown = UnknownCommandError(
                    jsonrpc.unknown_method_message(call.method, _is_method)
                )
                errors.append(jsonrpc.error_response(call.id, unknown))
        if not calls:
            await self._send(errors, is_batch=decoded.is_batch)
            return
        if closing:
            refused = UnavailableError("the server is shutting down", retry_after_ms=DRAIN_RETRY_MS)
            await self._refuse(calls, errors, refused, is_batch=decoded.is_batch)
            return
        if not self.authed or any(c.method in SESSION_METHODS for c in calls):
            # Rare and stateful: handled in the reader, in order, after the rest.
            self._flush_group(nursery)
            await self._run_inline(calls, errors, is_batch=decoded.is_batch)
            return
        weight = self._weight_of(len(calls))
        await self._room(nursery, weight)
        limit = self.server.config.max_in_flight
        if self.in_flight + len(calls) > limit:
            overloaded = OverloadedError(f"more than {limit} requests in flight")
            await self._refuse(calls, errors, overloaded, is_batch=decoded.is_batch)
            return
        self.in_flight += len(calls)  # counted now: the limit sees the whole group
        self._weight += weight
        if decoded.is_batch:
            # A batch is already a group: it runs on its own, so that quick
            # requests around it are not held back by its work.
            self._flush_group(nursery)
            self._group.append(_Unit(calls, errors, decoded.is_batch))
            self._flush_group(nursery)
            return
        self._group.append(_Unit(calls, errors, decoded.is_batch))

    def _weight_of(self, count: int) -> int:
        """A message's share of ``pipeline_window``: the results it computes at once.

        A request each; a batch longer than the window, which runs in chunks
        in the lane, the size of its first chunk.
        """
        return count if count <= self._window else self._chunk

    async def _room(self, nursery: trio.Nursery, weight: int) -> None:
        """Wait until a message of this weight may be dispatched (0: a message run inline).

        That is, once the responses not yet taken by the socket are within
        ``max_output_buffer``, and the weight of the messages unanswered
        leaves room for this one in ``pipeline_window`` (or nothing is
        unanswered). Waiting for the window starts the current group first
        (its requests are unanswered too).
        """
        window = self._window
        while True:
            if not self._outbox_space.is_set():
                await self._outbox_space.wait()  # the output watchdog ends a peer that stalls
            elif weight and self._weight and self._weight + weight > window:
                self._flush_group(nursery)
                await self._answered.wait()
            else:
                return

    async def _output_room(self) -> None:
        """Wait until the responses not yet taken by the socket are within ``max_output_buffer``.

        A request task waits here before each engine call: nothing starts
        while the session is over its output limit. Ends when the writer
        makes room or breaks; the output watchdog cancels a stalled peer's
        wait (see :meth:`_run`).
        """
        while not self._outbox_space.is_set():
            await self._outbox_space.wait()

    def _flush_group(self, nursery: trio.Nursery) -> None:
        """Start one task running the calls of the grouped messages, in order."""
        units, self._group = self._group, []
        if not units:
            return
        calls = [c for unit in units for c in unit.calls]
        weight = sum(self._weight_of(len(unit.calls)) for unit in units)
        keys, barrier = _keys_of(calls)
        if barrier:
            waits = list(self._running)
        else:
            waits = [self._tails[k] for k in keys if k in self._tails]
            if self._barrier is not None:
                waits.append(self._barrier)
        done = trio.Event()
        for key in keys:
            self._tails[key] = done
        if barrier:
            self._barrier = done
        self._running.add(done)
        self._task_started()
        nursery.start_soon(self._execute, units, calls, weight, keys, waits, done)

    async def _refuse(
        self,
        calls: list[jsonrpc.Call],
        errors: list[jsonrpc.Response],
        error: KVMemoError,
        *,
        is_batch: bool,
    ) -> None:
        """Answer every call of a message with ``error``, none run (shutting down,
        OVERLOADED): each is a rejected call in commandstats, as the Redis port
        counts its own refusals."""
        _count_rejected(self.server.engine, calls)
        responses = errors + [
            jsonrpc.error_response(c.id, error) for c in calls if not c.notification
        ]
        await self._send(responses, is_batch=is_batch)

    async def _execute(
        self,
        units: list[_Unit],
        calls: list[jsonrpc.Call],
        weight: int,
        keys: set[bytes],
        waits: list[trio.Event],
        done: trio.Event,
    ) -> None:
        try:
            try:
                for event in waits:
                    await event.wait()
                if len(calls) > self._window:  # a long batch (it runs alone)
                    async with self._lane:
                        messages = [await self._batch_text(units[0])]
                else:
                    await self._output_room()
                    messages = self._texts(units, await self._results(calls))
            finally:
                self._finished(len(calls), weight, keys, done)
            self._queue(messages)
        finally:
            self._task_done()

    async def _results(self, calls: list[jsonrpc.Call]) -> list[Any]:
        """The engine's result (or error) for each call, in order."""
        try:
            return await self.server.engine.execute_many([(c.method, c.args) for c in calls])
        except Exception:  # a bug of ours: INTERNAL for these requests only (logged)
            log.exception("session %d: request failed", self.id)
            return [
                InternalError("internal error; see the server log", applied=None) for _ in calls
            ]

    def _texts(self, units: list[_Unit], results: list[Any]) -> list[str | None]:
        """The answer message of each unit, from the results of all their calls."""
        messages: list[str | None] = []
        start = 0
        response_text = self._response_text
        for unit in units:
            end = start + len(unit.calls)
            texts = [jsonrpc.text_of(error) for error in unit.errors]
            texts += [
                response_text(call, res)
                for call, res in zip(unit.calls, results[start:end], strict=True)
                if not call.notification
            ]
            start = end
            messages.append(jsonrpc.encode_texts(texts, is_batch=unit.is_batch))
        return messages

    async def _batch_text(self, unit: _Unit) -> str | None:
        """Run a batch longer than ``pipeline_window`` in chunks, in order; its answer message.

        The first chunk is ``_chunk`` requests; each next one as many as
        the room left under ``max_output_buffer`` holds at the answer's
        average response size so far, at least ``_chunk`` and at most
        ``pipeline_window``: big responses are computed a few at a time,
        small ones in a few engine calls (each engine call of durable writes
        waits for its own sync). Once the responses written pass
        ``max_output_buffer``, the requests not started are answered
        ``TOO_LARGE`` and not run; notifications still run (nothing is ever
        sent for them). The first chunk always runs. Holds at most the
        answer so far plus one chunk's results. Each chunk starts only
        within the output limit (:meth:`_output_room`); the caller holds
        ``_lane``, so one batch at a time builds a long answer.
        """
        limit = self.server.config.max_output_buffer
        window = self._window
        texts = [jsonrpc.text_of(error) for error in unit.errors]
        size = sum(map(_utf8_length, texts))
        answered = 0
        response_text = self._response_text
        calls = unit.calls
        start, count = 0, self._chunk
        while start < len(calls):
            chunk = calls[start : start + count]
            await self._output_room()
            if start and size > limit:
                cut = _cut_error(limit)
                texts += [jsonrpc.error_text(c.id, cut) for c in chunk if not c.notification]
                notes = [c for c in chunk if c.notification]
                if notes:
                    await self._results(notes)
            else:
                results = await self._results(chunk)
                for call, result in zip(chunk, results, strict=True):
                    if not call.notification:
                        text = response_text(call, result)
                        texts.append(text)
                        size += _utf8_length(text)
                        answered += 1
                del results
            start += len(chunk)
            count = window
            if answered and size <= limit:
                count = min(count, max(self._chunk, (limit - size) * answered // size))
        return jsonrpc.encode_texts(texts, is_batch=True)

    def _finished(self, count: int, weight: int, keys: set[bytes], done: trio.Event) -> None:
        self.in_flight -= count
        self._weight -= weight
        self._answered.set()
        self._answered = trio.Event()
        done.set()
        self._running.discard(done)
        for key in keys:
            if self._tails.get(key) is done:
                del self._tails[key]
        if self._barrier is done:
            self._barrier = None

    def _response_text(self, call: jsonrpc.Call, result: Any) -> str:
        """The text of the response to ``call``: :meth:`_response`, written directly."""
        try:
            if isinstance(result, KVMemoError):
                return jsonrpc.error_text(call.id, result)
            return jsonrpc.response_text(call.id, result)
        except (TypeError, ValueError):  # a result JSON cannot hold: our bug
            log.exception("session %d: cannot encode the result of %s", self.id, call.method)
            bug = InternalError("internal error; see the server log", applied=None)
            return jsonrpc.error_text(call.id, bug)

    async def _run_inline(
        self, calls: list[jsonrpc.Call], errors: list[jsonrpc.Response], *, is_batch: bool
    ) -> None:
        self._task_started()
        # A pub/sub method's response goes out before the messages it brings:
        # the pusher holds back until this message's answer is queued (only
        # from then: while earlier requests run, messages keep flowing).
        hold = any(call.method in PUBSUB_METHODS for call in calls)
        held = False
        try:
            # Keep the per-key order: everything dispatched before runs first.
            for event in list(self._running):
                await event.wait()
            if hold:
                self._push_holds += 1
                held = True
            if hold and self.subscriber is not None:
                # What was published before goes out before (once the last batch is out).
                await self._wait_pushes_written(self.subscriber)
                self._push_now(self.subscriber)
            texts = await self._inline_texts(calls, errors)
            self._queue([jsonrpc.encode_texts(texts, is_batch=is_batch)])
            await trio.lowlevel.checkpoint()
        finally:
            if held:
                self._push_holds -= 1
                if not self._push_holds:
                    self._push_released.set()
                    self._push_released = trio.Event()
            self._task_done()

    async def _inline_texts(
        self, calls: list[jsonrpc.Call], errors: list[jsonrpc.Response]
    ) -> list[str]:
        """Run the calls one by one; the texts of the responses to send.

        As for a batch (:meth:`_batch_text`), in a batch longer than
        ``pipeline_window``: once the responses pass ``max_output_buffer``,
        the requests left are answered ``TOO_LARGE`` and not run;
        notifications still run. The first call always runs.
        """
        limit = self.server.config.max_output_buffer if len(calls) > self._window else None
        texts = [jsonrpc.text_of(error) for error in errors]
        size = sum(map(_utf8_length, texts))
        for index, call in enumerate(calls):
            result: Any
            if limit is not None and index and size > limit and not call.notification:
                texts.append(jsonrpc.error_text(call.id, _cut_error(limit)))
                continue
            if call.method == "auth":
                result = self._auth(call.args)
            elif not self.authed:
                result = NoAuthError("authentication required: send auth first")
                _count_rejected(self.server.engine, (call,))
            elif call.method in TRANSACTION_METHODS:
                result = await self._transaction_method(call)
            elif call.method in PUBSUB_METHODS:
                result = self._pubsub_method(call)
            elif call.method == "command.list" and not call.args:
                # The table's commands, and this port's own methods.
                result = sorted(set(COMMANDS) | OWN_METHODS)
            else:
                try:
                    result = await self.server.engine.execute(call.method, call.args)
                except KVMemoError as exc:
                    result = exc
                except Exception:  # a bug of ours: INTERNAL for this request only (logged)
                    log.exception("session %d: request failed", self.id)
                    result = InternalError("internal error; see the server log", applied=None)
            if not call.notification:
                text = self._response_text(call, result)
                texts.append(text)
                size += _utf8_length(text)
        return texts

    async def _transaction_method(self, call: jsonrpc.Call) -> Any:
        """``transaction``, ``watch`` or ``unwatch`` (version 1.2): the result, or the error."""
        engine = self.server.engine
        try:
            if call.method == "watch":
                if not call.args:
                    raise ArityError("wrong number of arguments for 'watch' command")
                seen = {key for _, key, _ in self.watches}
                fresh = list(dict.fromkeys(k for k in call.args if k not in seen))
                if fresh:
                    self.watches.extend(await engine.watch(fresh))
                return "OK"
            if call.method == "unwatch":
                if call.args:
                    raise ArityError("wrong number of arguments for 'unwatch' command")
                self.end_watches()
                return "OK"
            assert call.calls is not None
            watches, self.watches = self.watches, []
            try:
                return await self._run_transaction(call.calls, watches)
            finally:
                if watches:
                    engine.unwatch(watches)
        except KVMemoError as exc:
            return exc
        except Exception:  # a bug of ours: INTERNAL for this request only (logged)
            log.exception("session %d: %s failed", self.id, call.method)
            return InternalError("internal error; see the server log", applied=None)

    async def _run_transaction(
        self,
        calls: tuple[tuple[str, tuple[bytes, ...]], ...],
        watches: list[tuple[int, bytes, int]],
    ) -> Any:
        """Check every call (a refused one refuses the whole), run them, answer in place.

        The codec refused a transaction over ``max_batch`` calls already.
        """
        engine = self.server.engine
        for index, (method, _) in enumerate(calls):
            if method not in COMMANDS or method in SESSION_METHODS:
                raise UnknownCommandError(
                    jsonrpc.unknown_method_message(
                        method, _is_transaction_method, " in a transaction"
                    ),
                    index=index,
                )
        engine.check_transaction(calls)
        results = await engine.execute_transaction(calls, watches)
        if results is None:
            return None  # a watched key was written: nothing ran
        return [jsonrpc.error_object(r) if isinstance(r, KVMemoError) else r for r in results]

    def end_watches(self) -> None:
        """Stop watching (synchronous: safe when the session is closing)."""
        if self.watches:
            self.server.engine.unwatch(self.watches)
            self.watches = []

    # -- publish/subscribe (version 1.4) ---------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Whether the session is subscribed to a channel or a pattern."""
        return self.subscriber is not None and self.subscriber.count > 0

    def _pubsub_method(self, call: jsonrpc.Call) -> Any:
        """A pub/sub method: one ``[kind, name, count]`` per name (Redis's replies), or the error.

        Synchronous. The message holding it holds the pusher back (see the
        module docstring, "Order").
        """
        method = call.method
        if method in ("subscribe", "psubscribe") and not call.args:
            return ArityError(f"wrong number of arguments for '{method}' command")
        subscriber = self.subscriber
        if subscriber is None:
            subscriber = self.subscriber = self.server.engine.pubsub.subscriber(
                on_end=self._subscriber_ended
            )
        try:
            replies = subscriber.change(method, call.args)
        except KVMemoError as exc:  # past pubsub_max_subscriptions: nothing changed
            return exc
        if subscriber.count and not self._pushing:
            assert self._nursery is not None  # pub/sub methods run in the reader, in _run
            self._pushing = True
            self._nursery.start_soon(self._pusher, subscriber)
        return [[method, name, count] for name, count in replies]

    def _subscriber_ended(self) -> None:
        """The hub's ``on_end`` (an overflow): wake whoever waits for pushes to be written."""
        self._written.set()
        self._written = trio.Event()

    def _push_now(self, subscriber: Subscriber) -> None:
        """Queue every message the hub has delivered to ``subscriber``, as notifications.

        Nothing when the subscriber is ended. Callers first wait for the last
        batch to be written (:meth:`_wait_pushes_written`). Called by the
        reader too (before answering a pub/sub method), while the pusher may
        be parked in :meth:`Subscriber.wait` (which a take never strands).
        """
        if subscriber.pending_bytes and not subscriber.ended:
            texts = [_push_text(message) for message in subscriber.take()]
            # Counted against the subscriber's limit as written until the
            # socket took them (JSON may be several times the raw bytes).
            size = sum(map(_utf8_length, texts))
            if not subscriber.hold(size):
                return  # overflowed: the pusher closes the session
            self._push_held += size
            self._queue(list[str | None](texts))
            self._push_target = self._queued_total

    async def _wait_pushes_written(self, subscriber: Subscriber) -> None:
        """Wait until the last batch of pushes is in the socket (or the subscriber is ended).

        Backpressure: meanwhile the next messages stay in the hub, bounded
        by its limit. An overflow ends the wait at once: the hub's ``on_end``
        hook sets ``_written`` (:meth:`_subscriber_ended`).
        """
        while self._written_total < self._push_target and not self._broken and not subscriber.ended:
            await self._written.wait()

    async def _pusher(self, subscriber: Subscriber) -> None:
        """Copy published messages into the outbox, no faster than the socket takes them.

        Ends when the subscriber is closed (the session ends) or overflowed
        (then it closes the session with 1008).
        """
        while True:
            await subscriber.wait()
            if subscriber.overflowed:
                self._pubsub_overflowed(subscriber)
                return
            if subscriber.closed:
                return
            if self._push_holds:  # a pub/sub method is being answered
                await self._push_released.wait()
            elif self._written_total < self._push_target and not self._broken:
                await self._wait_pushes_written(subscriber)
            else:
                self._push_now(subscriber)

    def _pubsub_overflowed(self, subscriber: Subscriber) -> None:
        """The hub ended the subscriber (a peer slower than its messages): close with 1008."""
        log.warning(
            "session %d: pub/sub output buffer limit (%d bytes) reached: closing it",
            self.id,
            subscriber.limit,
        )
        if self._close is None:
            self._close = (1008, f"pub/sub output buffer limit reached ({subscriber.limit} bytes)")
        self._reader.cancel()

    def end_subscriptions(self) -> None:
        """Leave every channel and pattern (synchronous: safe when the session is closing)."""
        if self.subscriber is not None:
            self.subscriber.close()

    def _auth(self, args: tuple[bytes, ...]) -> Any:
        tokens = self.server.config.tokens
        if not tokens:
            return NoAuthError("AUTH called without any token configured")
        token = args[-1].decode("utf-8", "replace") if args else ""
        if len(args) in (1, 2) and check_token(token, tokens):
            self.authed = True
            return "OK"
        return NoAuthError("invalid token")

    async def _send(self, responses: list[jsonrpc.Response], *, is_batch: bool) -> None:
        """Queue one response message for the writer (never blocks on the socket)."""
        self._queue([jsonrpc.encode(responses, is_batch=is_batch)])
        await trio.lowlevel.checkpoint()

    def _queue(self, texts: list[str | None]) -> None:
        """Queue response messages for the writer, in order; None is nothing to send."""
        if self._broken:
            return
        queued = False
        for text in texts:
            if text is not None:
                self._outbox.append(text)
                self._outbox_bytes += _utf8_length(text)
                self._queued_total += 1
                queued = True
        if queued:
            self._flushed = trio.Event() if self._flushed.is_set() else self._flushed
            self._outbox_ready.set()
            pending = self._outbox_bytes + self._sending_bytes
            if pending > self.server.config.max_output_buffer and self._outbox_space.is_set():
                self._outbox_space = trio.Event()
                self._over_limit.set()

    async def _writer(self) -> None:
        """Send every queued response, as many per socket write as are ready."""
        while True:
            await self._outbox_ready.wait()
            await trio.lowlevel.checkpoint()  # let the responses ready now join this write
            texts, self._outbox = self._outbox, []
            self._sending_bytes, self._outbox_bytes = self._outbox_bytes, 0
            self._outbox_ready = trio.Event()
            count = len(texts)
            try:
                # Empties texts once framed (memory).
                self._writing = True
                await _send_many(self.ws, texts, self._made_progress)
                self._writing = False  # (left true by a cancellation: see _run)
            except ConnectionClosed:
                self._writing = False
                # Broken: wake whoever waits on the writer (a reader paused for
                # room or for pushes to be written); they see _broken and stop.
                self._broken = True
                self._flushed.set()
                self._outbox_space.set()
                self._written.set()
                self._written = trio.Event()
                self.end_subscriptions()  # nothing can reach the peer any more
                return
            self._sending_bytes = 0
            if self._outbox_bytes <= self.server.config.max_output_buffer:
                self._outbox_space.set()
            self.server.messages_out.inc(count)
            self._written_total += count
            if self._push_held and self._written_total >= self._push_target:
                assert self.subscriber is not None
                self.subscriber.release(self._push_held)  # delivered: no longer counted
                self._push_held = 0
            self._written.set()
            self._written = trio.Event()
            if not self._outbox:
                self._flushed.set()


def _cut_error(limit: int) -> TooLargeError:
    """The answer to a request of a batch left out once the batch's response passed ``limit``."""
    return TooLargeError(
        f"batch response over the output limit ({limit} bytes) before this request: not run",
        applied=False,
    )


def _push_text(message: Message) -> str:
    """The notification pushing one published message (version 1.4)."""
    if message.pattern is None:
        return jsonrpc.notification_text("message", (message.channel, message.data))
    return jsonrpc.notification_text("pmessage", (message.pattern, message.channel, message.data))


class _Unit:
    """One message's share of a group: its calls, its early errors, its shape."""

    __slots__ = ("calls", "errors", "is_batch")

    def __init__(
        self, calls: list[jsonrpc.Call], errors: list[jsonrpc.Response], is_batch: bool
    ) -> None:
        self.calls = calls
        self.errors = errors
        self.is_batch = is_batch


def _keys_of(calls: list[jsonrpc.Call]) -> tuple[set[bytes], bool]:
    """The keys a message touches, and whether it touches the whole keyspace."""
    keys: set[bytes] = set()
    barrier = False
    for call in calls:
        spec = COMMANDS[call.method]
        if spec.first_key:
            keys.update(spec.keys_of(call.args))
        elif spec.flags & KEYSPACE_FLAGS:
            barrier = True
    return keys, barrier


def check_token(token: str, tokens: frozenset[str]) -> bool:
    """Constant-time comparison against every configured token."""
    ok = False
    for candidate in tokens:
        ok |= hmac.compare_digest(token.encode(), candidate.encode())
    return ok


def _count_rejected(engine: KVEngine, calls: Iterable[jsonrpc.Call]) -> None:
    """Count the calls of commands among ``calls`` as rejected (INFO commandstats'
    ``rejected_calls``): refused before they reached the engine. Other methods
    (the session's own, unknown ones) are not commands: not counted."""
    for call in calls:
        if call.method in COMMANDS:
            engine.count_rejected(call.method)
