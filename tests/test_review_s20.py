"""Review of the WebSocket session's output limit, open_store's exceptions and close().

Adversarial tests by a second reviewer of ba66d93, 697eebf and 625ebd0; each
failed before the fixes that followed them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from ws_raw import client_frame, raw_session

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.errors import KVMemoError, UnavailableError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 20  # seconds per test


def _request(rid: int, method: str, *params: str) -> bytes:
    return client_frame(
        json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)})
    )


def _slow_link(session: Any) -> None:
    """Shrink the server's send buffer for ``session``: a slow link, the writer waits."""
    replay: Any = session.ws._stream  # app.ReplayStream around the TCP stream
    replay._inner.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)


@asynccontextmanager
async def _slow_session(
    max_output_buffer: int, output_timeout: float
) -> AsyncIterator[tuple[Node, trio.SocketStream, Any]]:
    """A node with these output limits, and one raw session to it over a slow link."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        resp=False,
        max_output_buffer=max_output_buffer,
        output_timeout=output_timeout,
    )
    async with open_node(StoreConfig(shards=2), config) as running:
        assert running.server.bound is not None
        stream = await raw_session(running.server.bound[1], 8192)
        await trio.testing.wait_all_tasks_blocked()
        (session,) = running.server.sessions
        _slow_link(session)
        yield running, stream, session


class _Frames:
    """Server frames parsed from a byte stream: (opcode, payload)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out: list[tuple[int, bytes]] = []
        while len(self.buffer) >= 2:
            opcode = self.buffer[0] & 0x0F
            size = self.buffer[1] & 0x7F
            at = 2
            if size == 126:
                if len(self.buffer) < 4:
                    break
                size = struct.unpack("!H", self.buffer[2:4])[0]
                at = 4
            elif size == 127:
                if len(self.buffer) < 10:
                    break
                size = struct.unpack("!Q", self.buffer[2:10])[0]
                at = 10
            if len(self.buffer) < at + size:
                break
            out.append((opcode, bytes(self.buffer[at : at + size])))
            del self.buffer[: at + size]
        return out


async def test_a_slow_peer_that_keeps_reading_is_not_disconnected() -> None:
    """Was (fixed): a peer reading steadily, but less than 1 MiB per ``output_timeout``, is dropped.

    ``_send_many`` reports progress only when a whole ``WRITE_PIECE`` (1 MiB)
    piece has gone into the socket, so ``_wait_for_room`` sees "nothing read"
    although the peer reads every few milliseconds. The docs (session module,
    ServerConfig, README) promise a disconnect only for a peer that "takes
    nothing from the socket for output_timeout". With the defaults that is any
    client slower than ~100 KiB/s once it is 64 MiB behind; here, scaled down:
    a 64 KiB limit, 0.5 s, a peer reading 16 KiB every 10 ms (~1.6 MB/s).
    """
    value = "v" * (256 * 1024)
    gets = 8  # 2 MiB of responses: two 1 MiB pieces
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 0.5) as (running, stream, session):
            frames = _Frames()
            await stream.send_all(_request(1, "set", "big", value))
            received: list[tuple[int, bytes]] = []
            while not received:
                received += frames.feed(await stream.receive_some(65536))
            assert json.loads(received[0][1])["result"] == "OK"
            await stream.send_all(b"".join(_request(10 + i, "get", "big") for i in range(gets)))
            got: list[tuple[int, bytes]] = []
            got += frames.feed(await stream.receive_some(1))  # the writer has begun
            # One more request: the reader loops round and finds the outbox over the limit.
            await stream.send_all(_request(99, "dbsize"))
            while len(got) < gets + 1:
                data = await stream.receive_some(16384)
                if not data:
                    break
                got += frames.feed(data)
                await trio.sleep(0.01)  # the peer's pace (a slow link), not a wait for an effect
            await stream.aclose()
            opcodes = [opcode for opcode, _ in got]
            assert 8 not in opcodes, f"closed by the server: {got[-1][1][2:]!r}"
            assert opcodes == [1] * (gets + 1)


async def test_close_during_in_flight_calls_refuses_them_cleanly_and_the_block_goes_on(
    tmp_path: Path,
) -> None:
    """close() while writers (single-key, multi-shard MSET, transactions) are in flight.

    Every call either succeeds or raises a KVMemoError (no AttributeError,
    AssertionError, ValueError of a closed file, no hang), the block carries
    on after close(), and a store reopened on the same directory holds every
    multi-shard MSET whole (all of its keys or none).
    """
    data = str(tmp_path / "data")
    outcomes: list[str] = []
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=4, data_dir=data, appendfsync="always") as kv:

            async def writer(n: int) -> None:
                for i in range(10_000):
                    try:
                        if i % 3 == 0:
                            await kv.set(f"s{n}:{i}", "x")
                        elif i % 3 == 1:
                            await kv.execute("mset", f"m{n}:{i}:a", "1", f"m{n}:{i}:b", "1")
                        else:
                            await kv.transaction(("incr", f"t{n}"), ("incr", f"u{n}"))
                    except KVMemoError as exc:
                        outcomes.append(exc.kind)
                        return
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(writer, n)
                for _ in range(50):
                    await trio.lowlevel.checkpoint()
                kv.close()
            # close() is not synchronous: the shards still running answer until they stop.
            while True:
                try:
                    await kv.get("s0:0")
                except UnavailableError as exc:
                    if str(exc) == "the store is closed":
                        break
                await trio.lowlevel.checkpoint()
            with pytest.raises(UnavailableError, match="^the store is closed$"):
                await kv.set("s0:0", "y")
        assert set(outcomes) <= {"UNAVAILABLE", "TIMEOUT", "IO", "INTERNAL"}
        async with kvmemo.open_store(shards=4, data_dir=data) as kv:
            keys = await kv.execute("keys", "m*")
            halves: dict[bytes, int] = {}
            for key in keys:
                halves[key[:-2]] = halves.get(key[:-2], 0) + 1
            assert all(count == 2 for count in halves.values()), halves
            for n in range(8):
                assert await kv.get(f"t{n}") == await kv.get(f"u{n}")


async def test_the_output_limit_counts_bytes_not_characters() -> None:
    """Was (fixed): ``max_output_buffer`` is documented in bytes, but ``_queue`` counts characters.

    ``_outbox_bytes`` / ``_sending_bytes`` add ``len(text)`` of each response
    (JSON written with ``ensure_ascii=False``), so a response of 4-byte UTF-8
    characters weighs a quarter of its size: a session can hold ~4x the limit
    in bytes (the framed UTF-8 the writer holds) before its reader pauses. The
    pusher already counts ``len(t.encode())`` for non-ASCII pushes.

    Here: a 100,000-byte limit, a 160,000-byte response (40,000 characters)
    that the peer does not read; the session must read no further request.
    """
    value = "\U0001f600" * 40_000  # 160,000 bytes of UTF-8
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(100_000, 30) as (running, stream, session):
            await stream.send_all(_request(1, "set", "big", value))
            frames = _Frames()
            received: list[tuple[int, bytes]] = []
            while not received:
                received += frames.feed(await stream.receive_some(65536))
            assert json.loads(received[0][1])["result"] == "OK"
            await stream.send_all(_request(2, "get", "big"))  # not read from now on
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(_request(3, "dbsize"))  # the reader loops round: over the limit
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(_request(4, "set", "marker", "1"))
            await trio.testing.wait_all_tasks_blocked()
            assert running.server.engine is not None
            marker = await running.server.engine.execute("get", [b"marker"])
            await stream.aclose()
            assert marker is None, "the session read on with 160,000 bytes unsent (limit 100,000)"


_LATE_SIGNAL = """
import os, signal, sys
import trio
import kvmemo.cli as cli

async def run_node(resolved, signalled, received):
    await trio.sleep(0)  # the node ran and stopped (its last await)
    os.kill(os.getpid(), signal.SIGTERM)  # a supervisor's follow-up lands now
    return None

cli._run_node = run_node
sys.exit(trio.run(cli._serve, None, True))
"""


def test_a_signal_as_the_node_finishes_stopping_changes_nothing() -> None:
    """Was (fixed): a SIGTERM landing after the node's last await kills the process (exit -15).

    ``_serve`` cancels ``_take_signals`` and leaves ``open_signal_receiver``;
    trio then restores the previous handlers (SIG_DFL for SIGTERM, its
    KeyboardInterrupt handler for SIGINT) and *redelivers* every signal still
    pending in the receiver, before ``signal.signal(..., SIG_IGN)`` runs. The
    window holds ``log.info("stopped")``, a blocking write to stderr (a pipe
    to a slow supervisor or journald). Here the signal is sent from inside
    that window by a stand-in for ``_run_node``. Fixed: in ``process`` mode,
    ignore both signals *before* opening the receiver, so that what trio
    restores (and redelivers to) is SIG_IGN.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    process = subprocess.run(
        [sys.executable, "-c", _LATE_SIGNAL],
        capture_output=True,
        text=True,
        env=environ,
        timeout=TEST_TIMEOUT,
        check=False,
    )
    assert process.returncode == 0, (process.returncode, process.stderr[-500:])


async def test_a_transaction_of_server_calls_is_refused_by_a_closed_store() -> None:
    """Was (fixed): a transaction with no keyed call skips the closed check (625ebd0).

    ``execute_transaction`` reaches ``_run_server`` directly when the plan
    touches no shard, so after the block ``transaction(("publish", ...))``
    answers ``[0]`` (and PING, TIME answer too), while ``execute`` and
    ``execute_many`` of the same call, and a keyed transaction, are refused
    with 'the store is closed'. Fixed: ``if self._closed: raise
    _store_closed()`` at the top of ``execute_transaction``.
    """
    with trio.fail_after(TEST_TIMEOUT):
        async with kvmemo.open_store(shards=2) as kv:
            await kv.set("a", "1")
        for call in [("publish", "c", "m"), ("ping",), ("time",)]:
            with pytest.raises(UnavailableError, match="^the store is closed$"):
                await kv.execute(*call)
            with pytest.raises(UnavailableError, match="^the store is closed$"):
                await kv.transaction(call)


async def test_a_subscriber_that_reads_nothing_is_dropped_even_while_it_subscribes() -> None:
    """Was (fixed): a pub/sub method waiting for pushes to be written has no output timeout.

    Pushes over ``max_output_buffer`` are queued while the reader waits in
    ``get_message``; the silent peer then sends ``subscribe``. The reader
    takes it (the limit is checked only before a read) and waits in
    ``_run_inline`` -> ``_wait_pushes_written`` for the socket, with no
    timeout: when publishing stops, the session holds the pushes (over the
    limit) and its socket for ever, which ``output_timeout`` was to end.
    """
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 0.5) as (running, stream, session):
            assert running.server.engine is not None
            engine = running.server.engine
            await stream.send_all(_request(1, "subscribe", "news"))
            frames = _Frames()
            received: list[tuple[int, bytes]] = []
            while not received:
                received += frames.feed(await stream.receive_some(65536))
            # From now on the peer reads nothing.
            for _ in range(32):
                await engine.execute("publish", [b"news", b"x" * 65536])
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(_request(2, "subscribe", "other"))
            with trio.move_on_after(3 * running.server.config.output_timeout + 2):
                await session._ended.wait()
            ended = session._ended.is_set()
            await stream.aclose()
            assert ended, "the session holds its pushes for ever"


async def test_a_peer_that_pipelines_then_goes_silent_is_dropped() -> None:
    """Was (fixed): the output timeout is checked only by the reader, before it reads.

    The peer sends 8 GETs of a 256 KiB value in one write, then neither reads
    nor sends. The reader dispatches them and is back in ``get_message``
    before their responses are queued, so it never sees the outbox over
    the limit, and nothing else looks: the session holds 2 MiB (limit 64 KiB)
    for ever (``idle_timeout`` is 0 by default; when set, its
    ``ws.aclose(1008)`` waits for the stream lock the stuck writer holds).
    """
    with trio.fail_after(TEST_TIMEOUT):
        async with _slow_session(65536, 0.5) as (running, stream, session):
            await stream.send_all(_request(1, "set", "big", "v" * (256 * 1024)))
            frames = _Frames()
            received: list[tuple[int, bytes]] = []
            while not received:
                received += frames.feed(await stream.receive_some(65536))
            await stream.send_all(b"".join(_request(10 + i, "get", "big") for i in range(8)))
            with trio.move_on_after(3 * running.server.config.output_timeout + 2):
                await session._ended.wait()
            ended = session._ended.is_set()
            await stream.aclose()
            assert ended, "the session holds 2 MiB of responses for ever"
