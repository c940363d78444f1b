"""Settings of the server layer: listeners, security and per-session limits."""

from __future__ import annotations

import attrs

DEFAULT_PORT = 7070
DEFAULT_RESP_PORT = 6380


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be in 0..65535, got {value}")


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
        max_sessions: concurrent sessions (over it: close 1008).
        handshake_timeout: seconds to complete the HTTP/WebSocket handshake.
        idle_timeout: seconds without a message before a session is closed
            (1008); 0 disables it.
        shutdown_grace: seconds in-flight requests get on SIGINT/SIGTERM.
        max_http_head: bytes of an HTTP request head.
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
    max_sessions: int = attrs.field(default=10_000, validator=_at_least_one)
    handshake_timeout: float = attrs.field(default=10.0, validator=_non_negative)
    idle_timeout: float = attrs.field(default=0.0, validator=_non_negative)
    shutdown_grace: float = attrs.field(default=5.0, validator=_non_negative)
    max_http_head: int = attrs.field(default=16 * 1024, validator=_at_least_one)

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
