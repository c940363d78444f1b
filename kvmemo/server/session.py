"""One WebSocket session: JSON-RPC in, engine calls, responses out.

Design: the session's reader task decodes each message (sans-IO codec) and
dispatches it in arrival order; each message's calls then run in a task of
the session's nursery, so pipelined messages proceed concurrently and
responses go out as work completes, matched by id.

Ordering: requests of one session that touch the same key take effect in
sending order. The reader keeps, per key, the completion event of the last
message that touched it, and waits for those events before dispatching a
message on the same keys (a keyless write such as ``flushall`` waits for
everything in flight). Within one message, :meth:`KVEngine.execute_many`
keeps the order per key. Messages on other keys never wait for each other.

Limits: at most ``max_in_flight`` requests running (more get OVERLOADED,
nothing applied); batch length in the codec; message size in the WebSocket
layer (close 1009); idle timeout (close 1008).

A session's failure (a bug) ends that session only; the server catches it.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..commands.table import COMMANDS
from ..errors import KVMemoError, NoAuthError, OverloadedError
from . import jsonrpc

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("kvmemo.session")

SESSION_METHODS = frozenset({"auth"})  # answered by the session itself


class Session:
    """State of one WebSocket session.

    Invariant: ``in_flight`` counts the requests dispatched and not yet
    answered; ``_tails[key]`` is the completion event of the last message
    touching ``key`` that is still running.
    """

    def __init__(self, server: Server, ws: WebSocketConnection, sid: int, authed: bool) -> None:
        self.server = server
        self.ws = ws
        self.id = sid
        self.authed = authed
        self.in_flight = 0
        self.closing = False
        self._tails: dict[bytes, trio.Event] = {}
        self._running: set[trio.Event] = set()
        self._idle = trio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Serve the session until the peer closes it or the server drains it."""
        cfg = self.server.config
        async with trio.open_nursery() as nursery:
            try:
                while not self.closing:
                    if cfg.idle_timeout:
                        with trio.move_on_after(cfg.idle_timeout) as idle:
                            message = await self.ws.get_message()
                        if idle.cancelled_caught:
                            await self.ws.aclose(1008, "idle timeout")
                            break
                    else:
                        message = await self.ws.get_message()
                    self.server.messages_in.inc()
                    await self._dispatch(message, nursery)
            except ConnectionClosed:
                pass
            # Let running requests finish (their replies may still be sent).
            await self._idle.wait()

    async def _dispatch(self, message: str | bytes, nursery: trio.Nursery) -> None:
        if isinstance(message, bytes):
            await self._send([jsonrpc.binary_message_response()], is_batch=False)
            return
        decoded = jsonrpc.decode_message(message, max_batch=self.server.config.max_batch)
        calls = decoded.calls
        if not calls:
            if decoded.errors:
                await self._send(decoded.errors, is_batch=decoded.is_batch)
            return
        if not self.authed or any(c.method in SESSION_METHODS for c in calls):
            # Rare and stateful: handled in the reader, in order.
            await self._run_inline(decoded)
            return
        if self.in_flight + len(calls) > self.server.config.max_in_flight:
            error = OverloadedError(
                f"more than {self.server.config.max_in_flight} requests in flight"
            )
            responses = list(decoded.errors)
            responses += [jsonrpc.error_response(c.id, error) for c in calls if not c.notification]
            await self._send(responses, is_batch=decoded.is_batch)
            return
        keys, barrier = self._keys_of(calls)
        waits = (
            list(self._running) if barrier else [self._tails[k] for k in keys if k in self._tails]
        )
        for event in waits:
            await event.wait()
        done = trio.Event()
        for key in keys:
            self._tails[key] = done
        self._running.add(done)
        self.in_flight += len(calls)
        self._idle = trio.Event()
        nursery.start_soon(self._execute, decoded, keys, done)

    def _keys_of(self, calls: list[jsonrpc.Call]) -> tuple[set[bytes], bool]:
        keys: set[bytes] = set()
        barrier = False
        for call in calls:
            spec = COMMANDS.get(call.method)
            if spec is None:
                continue
            if spec.first_key:
                keys.update(spec.keys_of(call.args))
            elif "write" in spec.flags:
                barrier = True
        return keys, barrier

    async def _execute(self, decoded: jsonrpc.Decoded, keys: set[bytes], done: trio.Event) -> None:
        calls = decoded.calls
        try:
            results = await self.server.engine.execute_many([(c.method, c.args) for c in calls])
        finally:
            self.in_flight -= len(calls)
            done.set()
            self._running.discard(done)
            for key in keys:
                if self._tails.get(key) is done:
                    del self._tails[key]
            if not self._running:
                self._idle.set()
        responses = list(decoded.errors)
        for call, result in zip(calls, results, strict=True):
            if call.notification:
                continue
            responses.append(self._response(call, result))
        await self._send(responses, is_batch=decoded.is_batch)

    @staticmethod
    def _response(call: jsonrpc.Call, result: Any) -> jsonrpc.Response:
        if isinstance(result, KVMemoError):
            return jsonrpc.error_response(call.id, result)
        return jsonrpc.result_response(call.id, result)

    async def _run_inline(self, decoded: jsonrpc.Decoded) -> None:
        responses = list(decoded.errors)
        for call in decoded.calls:
            result: Any
            if call.method == "auth":
                result = self._auth(call.args)
            elif not self.authed:
                result = NoAuthError("authentication required: send auth first")
            else:
                try:
                    result = await self.server.engine.execute(call.method, call.args)
                except KVMemoError as exc:
                    result = exc
            if not call.notification:
                responses.append(self._response(call, result))
        await self._send(responses, is_batch=decoded.is_batch)

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
        text = jsonrpc.encode(responses, is_batch=is_batch)
        if text is None:
            return
        try:
            await self.ws.send_message(text)
        except ConnectionClosed:
            return
        self.server.messages_out.inc()


def check_token(token: str, tokens: frozenset[str]) -> bool:
    """Constant-time comparison against every configured token."""
    ok = False
    for candidate in tokens:
        ok |= hmac.compare_digest(token.encode(), candidate.encode())
    return ok
