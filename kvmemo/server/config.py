"""Settings of the server layer: listeners, security and per-session limits."""

from __future__ import annotations

import attrs

DEFAULT_PORT = 7070
DEFAULT_RESP_PORT = 6380


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be in 0..65535, got {value}")


def _check_min(name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@attrs.frozen
class RespLimits:
    """Limits of the Redis port; each going over is handled as Redis does.

    Attributes:
        max_bulk_len: longest argument in bytes (``proto-max-bulk-len``);
            longer gets ``invalid bulk length`` and a close.
        max_args: most arguments in one request.
        max_inline_len: longest inline request in bytes.
        max_query_buffer: most unparsed input bytes held for one client
            (``client-query-buffer-limit``); more closes it without a reply.
        max_output_buffer: most reply bytes pending for one client before it
            must read some; see :attr:`output_timeout`.
        output_timeout: seconds a client over ``max_output_buffer`` may go
            without reading anything before it is disconnected.
        max_clients: most connections at once (``maxclients``); one more gets
            ``-ERR max number of clients reached`` and is closed. ``CONFIG SET
            maxclients`` changes it while the port runs (for the connections
            accepted after; those open stay open, as in Redis).
        idle_timeout: seconds without traffic before a client is closed
            (Redis's ``timeout``); 0 means never. A client waiting for its
            next request is closed once it was silent this long; one that is
            subscribed, paused or running a command is not (as Redis exempts
            pub/sub and blocked clients). ``CONFIG SET timeout`` changes it
            while the port runs, for the clients already open too.
        max_transaction_commands: most commands one MULTI may queue; one more
            gets an error and EXEC then answers ``EXECABORT`` (an EXEC holds
            its shards while all of them run).
    """

    max_bulk_len: int = 512 * 1024 * 1024
    max_args: int = 1024 * 1024
    max_inline_len: int = 64 * 1024
    max_query_buffer: int = 1024 * 1024 * 1024
    max_output_buffer: int = 64 * 1024 * 1024
    output_timeout: float = 10.0
    max_clients: int = 10_000
    idle_timeout: float = 0.0
    max_transaction_commands: int = 100_000

    def __attrs_post_init__(self) -> None:
        _check_min("max_bulk_len", self.max_bulk_len, 0)
        for name in (
            "max_args",
            "max_inline_len",
            "max_query_buffer",
            "max_output_buffer",
            "max_transaction_commands",
        ):
            _check_min(name, getattr(self, name), 1)
        _check_min("max_clients", self.max_clients, 1)
        if not self.output_timeout > 0:
            raise ValueError(f"output_timeout must be > 0, got {self.output_timeout}")
        _check_min("idle_timeout", self.idle_timeout, 0)


@attrs.frozen
class ServerConfig:
    """The WebSocket/HTTP front door and the Redis-protocol port.

    Attributes:
        host: address to bind (loopback by default).
        port: WebSocket + HTTP port (0 picks a free one).
        resp_port: Redis-protocol port (0 picks a free one); ``resp`` False turns it off.
        tls_cert, tls_key: PEM files; when both are given the ports speak TLS.
        tokens: accepted auth tokens; empty means no authentication.
        allowed_origins: browser origins allowed to open a session; empty
            means the server's own HTTP origin only. Requests without an
            Origin header (non-browser clients) are always accepted.
        max_message_size: bytes per WebSocket message (over it: close 1009).
        max_batch: requests per JSON-RPC batch (over it: TOO_LARGE).
        max_in_flight: requests one session may have running (over it: OVERLOADED).
        pipeline_window: requests one session may have unanswered before its
            reader takes no more messages until some are answered
            (backpressure, no error; a batch longer than this counts 128
            and runs in chunks of at most this many): with
            ``max_output_buffer`` it bounds the responses the session can
            make the server hold.
        max_sessions: concurrent sessions (over it: close 1008).
        handshake_timeout: seconds to complete the HTTP/WebSocket handshake.
        idle_timeout: seconds without a message before a session is closed
            (1008); 0 disables it.
        shutdown_grace: seconds in-flight requests get on SIGINT/SIGTERM.
        max_http_head: bytes of an HTTP request head.
        max_output_buffer: bytes of responses a session may have waiting for
            its socket; past it the session reads no more requests and
            starts none until they are under it again. Also the most the
            answer of a batch longer than ``pipeline_window`` may hold before
            its requests not yet started are answered TOO_LARGE (see the
            session module, "Output and memory").
        output_timeout: seconds a session past ``max_output_buffer`` may go
            without its peer reading anything before it is disconnected.
        resp_limits: the limits of the Redis-protocol port.
        config_file: the TOML file the settings were read from (``--config``
            or ``KVMEMO_CONFIG``), as an absolute path; None without one. Only
            named (INFO's ``config_file``, ``CONFIG REWRITE``'s answer): it is
            read once, at start, and never written.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    resp: bool = True
    resp_port: int = attrs.field(default=DEFAULT_RESP_PORT, validator=_port)
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    max_message_size: int = attrs.field(default=16 * 1024 * 1024, validator=_at_least_one)
    max_batch: int = attrs.field(default=10_000, validator=_at_least_one)
    max_in_flight: int = attrs.field(default=100_000, validator=_at_least_one)
    pipeline_window: int = attrs.field(default=1024, validator=_at_least_one)
    max_sessions: int = attrs.field(default=10_000, validator=_at_least_one)
    handshake_timeout: float = attrs.field(default=10.0, validator=_non_negative)
    idle_timeout: float = attrs.field(default=0.0, validator=_non_negative)
    shutdown_grace: float = attrs.field(default=5.0, validator=_non_negative)
    max_http_head: int = attrs.field(default=16 * 1024, validator=_at_least_one)
    max_output_buffer: int = attrs.field(default=64 * 1024 * 1024, validator=_at_least_one)
    output_timeout: float = attrs.field(default=10.0, validator=_positive)
    resp_limits: RespLimits = attrs.field(factory=RespLimits)
    config_file: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.resp and self.port == self.resp_port != 0:
            raise ValueError(f"port and resp_port must differ, got {self.port} for both")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
