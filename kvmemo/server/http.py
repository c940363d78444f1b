"""The plain-HTTP side of the front door: request heads in, responses out.

Sans-IO helpers over h11 (already a dependency of trio-websocket via
wsproto): the server reads a request head from the socket, this module parses
it and formats responses; the socket stays the server's business.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import attrs
import h11

HEAD_END = b"\r\n\r\n"


@attrs.frozen
class RequestHead:
    """A parsed HTTP request line and headers.

    Attributes:
        method: e.g. ``"GET"``.
        path: the path without the query.
        query: decoded query parameters (first value of each).
        headers: lower-cased names to values (last one wins).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def is_websocket(self) -> bool:
        upgrade = self.headers.get("upgrade", "").lower()
        connection = self.headers.get("connection", "").lower()
        return upgrade == "websocket" and "upgrade" in connection


class BadRequest(Exception):
    """The client sent something that is not an HTTP/1.1 request head."""


def parse_head(data: bytes) -> RequestHead:
    """Parse the bytes up to and including the blank line that ends the head.

    Raises:
        BadRequest: not a valid request head.
    """
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(data)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(event, h11.Request):
        raise BadRequest("incomplete request head")
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return RequestHead(event.method.decode("ascii"), parts.path or "/", query, headers)


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
    *,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection.

    With ``head_only`` (the answer to ``HEAD``) the headers describe ``body``
    but the body itself is not sent.
    """
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
    ]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
