"""The front door: one TCP port for WebSocket sessions and plain HTTP.

Each connection's request head is read here (bounded in size and time:
``max_http_head``, ``handshake_timeout``). A WebSocket upgrade to ``/ws``
goes to trio-websocket (the bytes already read are replayed to it), after
the Origin and token checks (403 when refused); ``GET``/``HEAD`` of
``/healthz``, ``/metrics`` and the web console (``/`` and ``/static/...``)
are answered directly, each response closing its connection. The server
knows the engine only through its command interface, never the shards.

The server runs as the ``server`` actor, the last child of the root
supervisor: it starts after the engine's actors (so it can attach the
engine) and stops first. Its port is bound before the actor starts (see
``open_node``) and kept across the actor's restarts. Sessions live in the
server's nursery; a session's crash is logged and ends that session only.
:meth:`Server.drain` is the graceful shutdown: no new connections, every
session finishes what is in flight, then is closed with 1001.

Stopping on a client's request (Redis's ``SHUTDOWN``): the node's owner
(``kvmemo serve``) sets :attr:`Server.on_stop`; a listener of the server
layer asks through :meth:`Server.request_stop`, which the node hands it
(``serve_resp(shutdown=...)``). Without an owner's callback the request is
refused: an embedded or test node is stopped by whoever opened it, not by a
client.

Garbage collection: the first server started in a process tunes CPython's
collector for serving (:func:`tune_gc`): a full collection, then
``gc.freeze()`` so that the start-up objects (modules, the command table,
the actors) are never scanned again, and a young-generation threshold of
``GC_GEN0_THRESHOLD`` allocations instead of CPython's 700. A request
allocates many short-lived containers (parsed JSON, calls, results) that
reference counting frees; with the default threshold the collector still
ran about every 700 of them and took ~4% of the server's CPU under the
server benchmark, ~0.5% after tuning. Cost: up to that many young objects
in cycles wait longer to be freed (a few MB at most).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import attrs
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from actors import Actor, ActorState

from ..engine.engine import KVEngine
from ..observability.metrics import MetricsRegistry
from . import http
from .config import ServerConfig
from .session import Session, check_token

log = logging.getLogger("kvmemo.server")

SUBPROTOCOL = "kvmemo.v1"
WS_QUEUE = 64  # messages trio-websocket buffers per session before backpressure
LINGER = 1.0  # seconds an HTTP connection drains the client's leftovers after the answer
LINGER_BYTES = 256 * 1024  # at most this many leftover bytes are read and dropped
GC_GEN0_THRESHOLD = 20_000  # allocations between young collections (CPython: 700)
# accept(2) errors of an overloaded system (out of descriptors or memory): retried.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1  # seconds between accept attempts while one of them lasts
_TEXT = "text/plain; charset=utf-8"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``inner``."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            if max_bytes is None:
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


_gc_tuned = False


def tune_gc() -> None:
    """Tune the garbage collector for serving, once per process (see the module doc).

    Leaves a collector that is disabled, or whose young threshold is
    already higher, as it is (but still freezes the start-up objects).
    """
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 and gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


@attrs.frozen
class StopRequest:
    """A client's request to stop the whole node (Redis's ``SHUTDOWN``).

    Attributes:
        save: whether the final snapshot is wanted (False: ``NOSAVE``). The
            write-ahead logs are kept either way, so nothing acknowledged is
            lost when it is skipped.
        origin: who asked, for the log (``RESP client id=3 addr=...``).
    """

    save: bool
    origin: str


StopHandler = Callable[[StopRequest], bool]
"""Takes a stop request; True if the node will stop, False if it refuses (no owner)."""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _static_files() -> dict[str, bytes]:
    folder = resources.files("kvmemo.server") / "static"
    files = {}
    for entry in folder.iterdir():
        if entry.is_file():
            files[entry.name] = entry.read_bytes()
    return files


class Server:
    """The WebSocket/HTTP server of one node.

    Args:
        engine: the engine every session calls.
        config: listeners, security and limits.
        metrics: where the server records its counters (the engine's by default).
    """

    def __init__(
        self, engine: KVEngine, config: ServerConfig, metrics: MetricsRegistry | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics if metrics is not None else engine.metrics
        self.sessions: set[Session] = set()
        self.listeners: list[trio.SocketListener] = []
        self.bound: tuple[str, int] | None = None
        self._next_id = 1
        self._draining = False
        self.ready = trio.Event()  # set once every listener started the first time (or failed)
        self.start_error: OSError | None = None
        # The owner's stop callback (kvmemo serve's); None: stop requests are refused.
        self.on_stop: Callable[[StopRequest], None] | None = None
        self.stop_requested: StopRequest | None = None  # the first one accepted
        self._static = _static_files()
        self._ssl = self._ssl_context()
        m = self.metrics
        self.messages_in = m.counter("kvmemo_ws_messages_received_total", "WebSocket messages in")
        self.messages_out = m.counter("kvmemo_ws_messages_sent_total", "WebSocket messages out")
        m.gauge("kvmemo_ws_sessions", "Open WebSocket sessions").set_function(
            lambda: float(len(self.sessions))
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls:
            return None
        cert, key = self.config.tls_cert, self.config.tls_key
        assert cert is not None
        assert key is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(cert, key)
        except OSError as exc:  # ssl.SSLError too
            why = exc.strerror or getattr(exc, "reason", None) or str(exc)
            raise OSError(
                exc.errno, f"cannot load TLS certificate {cert} and key {key}: {why}"
            ) from None
        return ctx

    @property
    def scheme(self) -> str:
        return "wss" if self.config.tls else "ws"

    @property
    def url(self) -> str:
        """The session URL, with the real port once bound."""
        return f"{self.scheme}://{self.authority}/ws"

    @property
    def authority(self) -> str:
        """``host:port`` as it appears in a URL (an IPv6 address in brackets)."""
        assert self.bound is not None
        host, port = self.bound
        return f"{_url_host(host)}:{port}"

    async def bind(self) -> None:
        """Open the listening sockets unless they are open (port 0 picks a free
        port, kept across restarts of the server actor).

        Raises:
            OSError: the address cannot be bound (in use, not local, ...).
        """
        if self.listeners:
            return
        host = self.config.host
        port = self.bound[1] if self.bound is not None else self.config.port
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise OSError(exc.errno, f"cannot listen on {_url_host(host)}:{port}: {why}") from None
        if port == 0 and len(listeners) > 1:
            # Each address got its own free port: keep one, so the port is one.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.listeners = list(listeners)
        sockname = self.listeners[0].socket.getsockname()
        self.bound = (host, int(sockname[1]))

    def report_started(self, error: OSError | None) -> None:
        """Record how the first start of every listener went (later ones are ignored)."""
        if not self.ready.is_set():
            self.start_error = error
            self.ready.set()

    def allowed_origins(self) -> frozenset[str]:
        if self.config.allowed_origins:
            return self.config.allowed_origins
        assert self.bound is not None
        host, port = self.bound
        scheme = "https" if self.config.tls else "http"
        loopback = ("127.0.0.1", "localhost", "::1")
        names = {host, *loopback} if host in loopback else {host}
        return frozenset(f"{scheme}://{_url_host(name)}:{port}" for name in names)

    def request_stop(self, request: StopRequest) -> bool:
        """Ask the node's owner to stop the node (gracefully, as on SIGTERM).

        Returns True when the owner takes the request (the first one is
        passed on; later ones, while the node stops, are accepted and
        dropped), False when the node has no owner's callback (an embedded
        or test node): nothing happens then. Synchronous: the caller answers
        its client knowing the outcome.
        """
        if self.on_stop is None:
            return False
        if self.stop_requested is None:
            self.stop_requested = request
            log.info("stop requested by %s (save=%s)", request.origin, request.save)
            self.on_stop(request)
        return True

    # -- serving ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled; each one in its own task."""
        await self.bind()
        tune_gc()
        try:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
        finally:
            listeners, self.listeners = self.listeners, []
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept until the listener is closed (drain, shutdown).

        Running out of file descriptors or memory (``EMFILE``, ``ENFILE``,
        ``ENOMEM``, ``ENOBUFS``) is logged and retried after
        ``ACCEPT_RETRY`` seconds, as :func:`trio.serve_listeners` (the Redis
        port's) does: the port keeps serving once connections are closed.
        """
        async with listener:
            while not self._draining:
                try:
                    stream: trio.abc.Stream = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        log.exception("the WebSocket/HTTP port stops accepting")
                        return
                    log.error(
                        "accept failed: %s; retrying in %s s",
                        exc.strerror or errno.errorcode.get(exc.errno or 0, exc),
                        ACCEPT_RETRY,
                    )
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if self._ssl is not None:
                    stream = trio.SSLStream(stream, self._ssl, server_side=True)
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        try:
            await self._handle(stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ssl.SSLError,
            trio_websocket.ConnectionClosed,
        ):
            pass  # the peer went away or spoke nonsense: nothing to report
        except Exception:  # a connection's bug ends that connection only (logged)
            log.exception("connection failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _reply(self, stream: trio.abc.Stream, response: bytes) -> None:
        """Send a whole HTTP response, then close gently: half-close and drop
        what the client still sends (a body, the rest of a head), so that
        closing with unread bytes does not reset the connection before the
        client has read the response."""
        await stream.send_all(response)
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return  # TLS: the client waits for our close, lingering would only delay it
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            dropped = 0
            while dropped < LINGER_BYTES:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                dropped += len(chunk)

    async def _read_head(self, stream: trio.abc.Stream) -> bytes | None:
        data = b""
        limit = self.config.max_http_head
        with trio.move_on_after(self.config.handshake_timeout or float("inf")):
            while http.HEAD_END not in data:
                if len(data) > limit:
                    await self._reply(stream, http.response(431, b"request head too large\n"))
                    return None
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                data += chunk
            return data
        return None

    async def _handle(self, stream: trio.abc.Stream) -> None:
        data = await self._read_head(stream)
        if data is None:
            return
        end = data.index(http.HEAD_END) + len(http.HEAD_END)
        try:
            head = http.parse_head(data[:end])
        except http.BadRequest as exc:
            await self._reply(stream, http.response(400, f"bad request: {exc}\n".encode()))
            return
        if head.path == "/ws":
            if head.is_websocket:
                await self._websocket(ReplayStream(stream, data), head)
                return
            upgrade = [("Upgrade", "websocket")]
            await self._reply(stream, http.response(426, b"use a WebSocket here\n", extra=upgrade))
            return
        if head.method not in ("GET", "HEAD"):
            await self._reply(stream, http.response(405, b"method not allowed\n"))
            return
        status, body, ctype = self._http_get(head)
        extra = None
        if status == 401:
            extra = [("WWW-Authenticate", 'Bearer realm="kvmemo"')]
        if head.path.startswith("/static/"):
            # A page of an allowed origin may import the client module (a
            # cross-origin module script needs CORS), as it may open /ws.
            extra = [("Vary", "Origin")]
            origin = head.headers.get("origin")
            if status == 200 and origin is not None and origin in self.allowed_origins():
                extra.append(("Access-Control-Allow-Origin", origin))
        await self._reply(
            stream,
            http.response(status, body, ctype, extra, head_only=head.method == "HEAD"),
        )

    def _http_get(self, head: http.RequestHead) -> tuple[int, bytes, str]:
        path = head.path
        if path == "/healthz":
            return self._healthz()
        if path == "/metrics":
            if not self._metrics_allowed(head):
                return 401, b"a token is required: Authorization: Bearer TOKEN\n", _TEXT
            self.engine.refresh_actor_metrics()
            body = self.metrics.render_prometheus().encode()
            return 200, body, "text/plain; version=0.0.4; charset=utf-8"
        if path in ("/", "/index.html"):
            return 200, self._static["index.html"], STATIC_TYPES[".html"]
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            content = self._static.get(name)
            if content is not None and "/" not in name:
                ext = name[name.rfind(".") :]
                return 200, content, STATIC_TYPES.get(ext, "application/octet-stream")
        return 404, b"not found\n", _TEXT

    def _metrics_allowed(self, head: http.RequestHead) -> bool:
        """Whether ``/metrics`` may be read: always without tokens, else with one.

        The token comes as ``Authorization: Bearer TOKEN`` (what Prometheus's
        ``authorization`` scrape setting sends) or ``?token=TOKEN``, as for
        ``/ws``. ``/healthz`` stays open: a load balancer's probe carries no
        token, and it tells only whether the node is healthy.
        """
        tokens = self.config.tokens
        if not tokens:
            return True
        token = head.query.get("token")
        scheme, _, credentials = head.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
        return token is not None and check_token(token, tokens)

    def _healthz(self) -> tuple[int, bytes, str]:
        system = self.engine.system
        down = []
        total = 0
        if system is not None:
            for info in system.actors():
                total += 1
                if info.state is not ActorState.RUNNING:
                    down.append(info.name)
        # Writes that are not being made durable (disk full, read-only) make
        # the node unhealthy too, though every actor runs.
        persistence = self.engine.persistence_problems()
        healthy = not down and not persistence and system is not None
        status = "ok" if healthy else "degraded"
        body = json.dumps(
            {"status": status, "actors": total, "down": down, "persistence": persistence}
        ).encode()
        return (200 if healthy else 503), body, "application/json"

    async def _websocket(self, stream: trio.abc.Stream, head: http.RequestHead) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(cfg.handshake_timeout or float("inf")) as handshake:
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, WS_QUEUE, cfg.max_message_size
                )
            if handshake.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            origin = head.headers.get("origin")
            if origin is not None and origin not in self.allowed_origins():
                await request.reject(403, body=b"origin not allowed\n")
                nursery.cancel_scope.cancel()
                return
            token = head.query.get("token")
            if token is not None and cfg.tokens and not check_token(token, cfg.tokens):
                await request.reject(403, body=b"invalid token\n")
                nursery.cancel_scope.cancel()
                return
            offered = request.proposed_subprotocols
            subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
            ws = await request.accept(subprotocol=subprotocol)
            if self._draining:
                await ws.aclose(1001, "server shutting down")
                nursery.cancel_scope.cancel()
                return
            if len(self.sessions) >= cfg.max_sessions:
                await ws.aclose(1008, "too many sessions")
                nursery.cancel_scope.cancel()
                return
            authed = not cfg.tokens or token is not None
            session = Session(self, ws, self._next_id, authed)
            self._next_id += 1
            self.sessions.add(session)
            try:
                await session.run()
            except Exception:  # a session's bug ends that session only (logged)
                log.exception("session %d failed", session.id)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose(1011, "internal error")
            finally:
                self.sessions.discard(session)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ws.aclose(1000 if not self._draining else 1001, None)
            nursery.cancel_scope.cancel()

    async def drain(self) -> None:
        """Graceful shutdown: stop accepting, let in-flight requests finish
        (within ``shutdown_grace``), close every session with 1001."""
        self._draining = True
        for listener in self.listeners:
            await listener.aclose()
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions):
                nursery.start_soon(session.drain, self.config.shutdown_grace)


class ServerActor(Actor):
    """Runs the server as a supervised child; a restart rebinds the same port.

    ``extra`` are further listeners of the server layer (the Redis port):
    ``nursery.start``-able functions run beside the WebSocket server.
    """

    def __init__(self, server: Server, extra: Iterable[Any] = ()) -> None:
        self.server = server
        self.extra = list(extra)

    async def on_start(self) -> None:
        self.server.engine.attach(self.ctx.system)
        self.server._draining = False
        await self.server.bind()  # already bound by open_node on the first start

    async def background(self) -> None:
        server = self.server
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                for start in self.extra:
                    await nursery.start(start)
            except OSError as exc:  # an extra port cannot be bound: a crash, reported first
                server.report_started(exc)
                raise
            server.report_started(None)

    async def handle(self, message: Any) -> Any:
        if message == "drain":
            await self.server.drain()
            return "OK"
        raise TypeError(f"server got an unknown message {message!r}")


__all__ = [
    "GC_GEN0_THRESHOLD",
    "ReplayStream",
    "Server",
    "ServerActor",
    "StopHandler",
    "StopRequest",
    "WebSocketConnection",
    "tune_gc",
]
