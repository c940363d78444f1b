"""A WebSocket client made of raw bytes, for tests of peers that misbehave.

A real client library reads what the server sends; these helpers let a test
hand-craft frames and decide when (if ever) to read.
"""

from __future__ import annotations

import base64
import socket
import struct

import trio


def client_frame(text: str) -> bytes:
    """One masked text frame, as a client sends it (any length)."""
    payload = text.encode()
    mask = b"\x11\x22\x33\x44"
    size = len(payload)
    if size < 126:
        header = bytes((0x81, 0x80 | size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
    whole = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(size, "big")
    return header + mask + masked


async def raw_session(port: int, rcvbuf: int | None = None) -> trio.SocketStream:
    """A WebSocket handshake on 127.0.0.1:``port``, and nothing read after its head.

    ``rcvbuf``: the socket's receive buffer in bytes (small: a slow link).
    """
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(b"0123456789abcdef").decode()
    await stream.send_all(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)  # the handshake only, nothing after
    assert head.startswith(b"HTTP/1.1 101")
    return stream
