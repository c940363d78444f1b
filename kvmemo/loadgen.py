"""``kvmemo bench``: a load generator against a running KVMemo server.

Design
------
Problem: measure what a server sustains -- commands and messages per second,
and latency per message -- without the measuring tool becoming the
bottleneck or the noise. On a small machine the client shares the CPU with
the server, so every microsecond the client spends per message is one the
server does not get.

Approach: ``sessions`` WebSocket sessions, each one trio task on a raw
trio-websocket connection (not the high-level client: no futures, no
per-request task), each keeping ``pipeline`` messages in flight. A message
is one JSON-RPC request object (``batch`` 1) or a batch of ``batch``
requests. The session's loop is closed: send ``pipeline`` messages, then for
every response received send one more, so the load is exactly
``sessions * pipeline`` messages in flight and the server is never flooded
beyond it. Ids are the session's message sequence number (batch items:
``seq * batch + i``) and responses are matched by id, in whatever order they
arrive (PROTOCOL.md, "Pipelining").

Requests are cheap to build: each is one f-string (about a microsecond), a
get with probability ``read_ratio`` else a set, on a key drawn uniformly
from ``keys`` (``key:00000042``). Values are ``value_size`` bytes of ASCII,
JSON-encoded once. Before the timed run the key space is written
(``preload``) so gets find their keys.

Timing: all sessions connect (and authenticate, and preload) before the clock
starts. Then ``warmup`` seconds of load are not counted, and the next
``duration`` seconds are the measured window: a message counts when its
response arrives inside the window; its latency is send -> response, per
message, recorded in a :class:`LatencyHistogram` (log buckets, < 1% error).
At the end of the window the sessions stop sending, wait up to
:data:`DRAIN_TIMEOUT` for the responses still owed (those that never come are
counted as ``NO_RESPONSE`` errors), and close.

Errors are counted by kind: the JSON-RPC ``data.kind`` of error responses
(``OVERLOADED``, ``NOAUTH``, ...) and the client's own (``CONNECT``,
``CLOSED``, ``BAD_RESPONSE``, ``NO_RESPONSE``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from .client import check_url, connect_failure
from .tooling import add_url_flag, quiet_on_broken_pipe, url_of

NAME = "bench"

SUBPROTOCOL = "kvmemo.v1"
CONNECT_TIMEOUT = 10.0  # seconds to open (and authenticate) one session
DRAIN_TIMEOUT = 2.0  # seconds to wait for the responses owed at the end of the window
CLOSE_TIMEOUT = 2.0  # seconds for the closing handshake of one session
PROGRESS_INTERVAL = 0.25  # seconds between progress reports (~4 per second)
PRELOAD_BATCH = 1000  # sets per preload message (the server's default max_batch is 10,000)
MAX_MESSAGE_SIZE = 64 * 1024 * 1024  # bytes: the client accepts any response the server sends
KEY_FORMAT = "key:{:08d}"  # key:00000042 (spelled out again in _load, for speed)

# Error kinds of the client itself (the server's come from its ``data.kind``).
CONNECT = "CONNECT"
CLOSED = "CLOSED"
BAD_RESPONSE = "BAD_RESPONSE"
NO_RESPONSE = "NO_RESPONSE"


# ----------------------------------------------------------------------------
# Latency histogram


class LatencyHistogram:
    """Latencies in log-spaced buckets, as HdrHistogram keeps them.

    A value ``v`` (integer nanoseconds) below 256 has its own bucket; above,
    each power of two is split into :data:`SUB_BUCKETS` buckets, so a bucket
    is never wider than 1/128 of its values (quantiles within 0.8%). Recording
    is a few integer operations; memory is a fixed list of ~7,000 counters.
    The exact minimum, maximum and sum are kept besides.
    """

    SUB_BITS = 7
    SUB_BUCKETS = 1 << SUB_BITS  # 128 buckets per power of two
    MAX_BITS = 63  # values up to 2**63 ns

    def __init__(self) -> None:
        self.counts = [0] * ((self.MAX_BITS - self.SUB_BITS + 1) << self.SUB_BITS)
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    @classmethod
    def index(cls, value: int) -> int:
        """The bucket of ``value`` (ns, >= 0)."""
        bits = value.bit_length()
        if bits <= cls.SUB_BITS + 1:
            return value
        shift = bits - cls.SUB_BITS - 1
        return (shift << cls.SUB_BITS) + (value >> shift)

    @classmethod
    def bounds(cls, index: int) -> tuple[int, int]:
        """The values ``[low, high)`` of bucket ``index``."""
        if index < 2 * cls.SUB_BUCKETS:
            return index, index + 1
        shift = (index >> cls.SUB_BITS) - 1
        low = (index - (shift << cls.SUB_BITS)) << shift
        return low, low + (1 << shift)

    def record(self, value: int) -> None:
        """Add one latency of ``value`` nanoseconds (negative counts as 0)."""
        if value < 0:
            value = 0
        self.counts[self.index(value)] += 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def merge(self, other: LatencyHistogram) -> None:
        """Add every value of ``other`` to this histogram."""
        if other.count == 0:
            return
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) in seconds, by rank; NaN when empty.

        The value is the middle of its bucket, clamped to the exact min and max.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                low, high = self.bounds(i)
                middle = (low + high - 1) / 2
                return min(max(middle, self.min), self.max) / 1e9
        return self.max / 1e9  # pragma: no cover - the counts sum to count

    def mean(self) -> float:
        """The mean in seconds; NaN when empty."""
        return self.total / self.count / 1e9 if self.count else math.nan


# ----------------------------------------------------------------------------
# Results


@attrs.frozen
class Latency:
    """Latency per message (send -> response), in seconds."""

    p50: float
    p99: float
    p999: float
    max: float
    mean: float

    @classmethod
    def of(cls, histogram: LatencyHistogram) -> Latency:
        return cls(
            p50=histogram.quantile(0.50),
            p99=histogram.quantile(0.99),
            p999=histogram.quantile(0.999),
            max=histogram.max / 1e9 if histogram.count else math.nan,
            mean=histogram.mean(),
        )


@attrs.frozen
class LoadResult:
    """The figures of one load run.

    Attributes:
        url: the server's session URL.
        sessions, pipeline, batch, keys, read_ratio, value_size: the load's shape.
        connected: sessions that connected and ran.
        duration: seconds of the measured window.
        messages: responses received in the window (one per message sent).
        commands: commands answered in the window (``messages * batch``; an
            error response counts as a command answered).
        errors: error count by kind (JSON-RPC ``data.kind``, or the client's
            ``CONNECT``, ``CLOSED``, ``BAD_RESPONSE``, ``NO_RESPONSE``).
        latency: per message, send -> response, over the window.
        client_cpu: CPU seconds the load generator's process used in the
            window (close to ``duration`` means the client itself is saturated).
        connect_error: why the first session that could not connect could
            not (:func:`kvmemo.client.connect_failure`: ``Connection refused``,
            ``the server answered HTTP 404 ...``,
            ``NOAUTH ...``); None when every session connected.
    """

    url: str
    sessions: int
    pipeline: int
    batch: int
    keys: int
    read_ratio: float
    value_size: int
    connected: int
    duration: float
    messages: int
    commands: int
    errors: dict[str, int]
    latency: Latency
    client_cpu: float
    connect_error: str | None = None

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.duration if self.duration > 0 else 0.0

    @property
    def commands_per_s(self) -> float:
        return self.commands / self.duration if self.duration > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        """The figures as one JSON-ready object (rates per second, latencies in µs)."""

        def us(seconds: float) -> float | None:
            return None if math.isnan(seconds) else round(seconds * 1e6, 1)

        lat = self.latency
        return {
            "url": self.url,
            "sessions": self.sessions,
            "pipeline": self.pipeline,
            "batch": self.batch,
            "keys": self.keys,
            "read_ratio": self.read_ratio,
            "value_size": self.value_size,
            "connected": self.connected,
            "duration_s": round(self.duration, 3),
            "messages": self.messages,
            "commands": self.commands,
            "messages_per_s": round(self.messages_per_s, 1),
            "commands_per_s": round(self.commands_per_s, 1),
            "latency_us": {
                "p50": us(lat.p50),
                "p99": us(lat.p99),
                "p999": us(lat.p999),
                "max": us(lat.max),
                "mean": us(lat.mean),
            },
            "errors": dict(sorted(self.errors.items())),
            "client_cpu_s": round(self.client_cpu, 3),
        }


@attrs.frozen
class Progress:
    """A snapshot while the load runs (counted from the start of the warm-up)."""

    elapsed: float  # seconds since the load started
    total: float  # seconds the load will run (warm-up + duration)
    warming_up: bool
    commands: int  # commands answered so far (warm-up included)
    rate: float  # commands per second over the last interval


# ----------------------------------------------------------------------------
# The load


def _check(name: str, value: float, low: float, high: float = math.inf) -> None:
    if not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _error_text(response: Any) -> str:
    """The first error of a JSON-RPC response (object or array): ``KIND message``."""
    for item in response if isinstance(response, list) else [response]:
        error = item.get("error") if isinstance(item, dict) else None
        if isinstance(error, dict):
            data = error.get("data")
            kind = data.get("kind") if isinstance(data, dict) else None
            return f"{kind or error.get('code')} {error.get('message', '')}".strip()
        if not isinstance(item, dict):
            break
    return f"not a JSON-RPC response: {json.dumps(response)[:80]}"


class _Run:
    """State shared by the sessions of one run (one trio thread: no locks)."""

    def __init__(
        self,
        url: str,
        *,
        sessions: int,
        pipeline: int,
        batch: int,
        keys: int,
        read_ratio: float,
        value_size: int,
        token: str | None,
        preload: bool,
        seed: int | None,
    ) -> None:
        self.url = url
        self.sessions = sessions
        self.pipeline = pipeline
        self.batch = batch
        self.keys = keys
        self.read_ratio = read_ratio
        self.value_size = value_size
        self.token = token
        self.preload = preload
        self.rng = random.Random(seed)
        self.value = json.dumps("v" * value_size)
        self.errors: Counter[str] = Counter()
        self.histogram = LatencyHistogram()
        self.ready = 0
        self.connected = 0
        self.all_ready = trio.Event()
        self.go = trio.Event()
        # Set when ``go`` is set (perf_counter_ns): the window and the end of the load.
        self.window_start = 0
        self.window_end = 0
        self.messages = 0  # responses in the window
        self.answered = 0  # commands answered since go (warm-up included), for progress
        self.connect_error: str | None = None  # why the first failed session failed

    def _failed_to_connect(self, why: str) -> None:
        self.errors[CONNECT] += 1
        if self.connect_error is None:
            self.connect_error = why

    def _mark_ready(self) -> None:
        self.ready += 1
        if self.ready == self.sessions:
            self.all_ready.set()

    async def session(self, index: int) -> None:
        ready = failed = False
        try:
            async with trio.open_nursery() as nursery:
                ws: WebSocketConnection | None = None
                why = f"no WebSocket handshake within {CONNECT_TIMEOUT:g} s"
                with trio.move_on_after(CONNECT_TIMEOUT):
                    try:
                        ws = await connect_websocket_url(
                            nursery,
                            self.url,
                            subprotocols=[SUBPROTOCOL],
                            message_queue_size=self.pipeline + 1,
                            max_message_size=MAX_MESSAGE_SIZE,
                        )
                        failure = await self._setup(ws, index)
                        if failure is not None:
                            ws, why = None, failure
                    except (OSError, ValueError, HandshakeError, ConnectionClosed) as exc:
                        ws, why = None, connect_failure(exc, timeout=CONNECT_TIMEOUT)
                if ws is None:
                    failed = True
                    self._failed_to_connect(why)
                    nursery.cancel_scope.cancel()
                    return
                self.connected += 1
                ready = True
                self._mark_ready()
                try:
                    await self.go.wait()
                    await self._load(ws, random.Random(self.rng.random()))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                        try:
                            await ws.aclose()
                        except (ConnectionClosed, trio.BrokenResourceError):
                            pass
                    nursery.cancel_scope.cancel()
        except* HandshakeError as group:
            # A rejected handshake (an HTTP answer: a wrong path, not a KVMemo
            # server) is raised by the connection's reader task, in this
            # session's nursery, while the connect waits for the handshake.
            if ready:  # cannot happen after the handshake; never swallowed
                raise
            if not failed:  # (else counted already, as a timeout)
                self._failed_to_connect(
                    connect_failure(group.exceptions[0], timeout=CONNECT_TIMEOUT)
                )
        finally:
            if not ready:
                self._mark_ready()

    async def _setup(self, ws: WebSocketConnection, index: int) -> str | None:
        """Authenticate, then write this session's share of the key space.

        Returns:
            None, or why the session cannot run (the server's error).
        """
        if self.token is not None:
            message = json.dumps(
                {"jsonrpc": "2.0", "id": 0, "method": "auth", "params": [self.token]}
            )
            await ws.send_message(message)
            response = json.loads(await ws.get_message())
            if not self._count_errors(response):
                return _error_text(response)
        if not (self.preload and self.read_ratio > 0):
            return None
        value = self.value
        share = range(index, self.keys, self.sessions)
        for start in range(0, len(share), PRELOAD_BATCH):
            items = [
                f'{{"jsonrpc":"2.0","id":{i},"method":"set",'
                f'"params":["{KEY_FORMAT.format(k)}",{value}]}}'
                for i, k in enumerate(share[start : start + PRELOAD_BATCH])
            ]
            await ws.send_message("[" + ",".join(items) + "]")
            response = json.loads(await ws.get_message())
            if not self._count_errors(response):
                return "preloading the key space: " + _error_text(response)
        return None

    def _count_errors(self, response: Any) -> bool:
        """Count the errors of one response (object or array); True when there were none."""
        items = response if isinstance(response, list) else [response]
        ok = True
        for item in items:
            if not isinstance(item, dict):
                self.errors[BAD_RESPONSE] += 1
                ok = False
            elif "error" in item:
                error = item["error"]
                data = error.get("data") if isinstance(error, dict) else None
                kind = data.get("kind") if isinstance(data, dict) else None
                self.errors[str(kind) if kind else BAD_RESPONSE] += 1
                ok = False
        return ok

    async def _load(self, ws: WebSocketConnection, rng: random.Random) -> None:
        """Keep ``pipeline`` messages in flight until the window ends, then drain."""
        batch = self.batch
        keys = self.keys
        read_ratio = self.read_ratio
        value = self.value
        draw = rng.random
        seq = 0
        sent: dict[int, int] = {}  # message seq -> send time (ns)
        histogram = self.histogram
        window_start = self.window_start
        window_end = self.window_end
        now_ns = time.perf_counter_ns
        loads = json.loads

        def request(rid: int) -> str:
            key = int(draw() * keys)
            if draw() < read_ratio:
                return f'{{"jsonrpc":"2.0","id":{rid},"method":"get","params":["key:{key:08d}"]}}'
            return (
                f'{{"jsonrpc":"2.0","id":{rid},"method":"set","params":["key:{key:08d}",{value}]}}'
            )

        async def send_one() -> None:
            nonlocal seq
            seq += 1
            if batch == 1:
                text = request(seq)
            else:
                base = seq * batch
                text = "[" + ",".join([request(base + i) for i in range(batch)]) + "]"
            sent[seq] = now_ns()
            await ws.send_message(text)

        hard_deadline = trio.current_time() + (window_end - now_ns()) / 1e9 + DRAIN_TIMEOUT
        with trio.CancelScope(deadline=hard_deadline):
            try:
                for _ in range(self.pipeline):
                    await send_one()
                while sent:
                    text = await ws.get_message()
                    now = now_ns()
                    try:
                        response = loads(text)
                        first = response[0] if isinstance(response, list) else response
                        key = first["id"] // batch
                        started = sent.pop(key)
                    except (ValueError, TypeError, KeyError, IndexError):
                        # Unmatched (e.g. an error object with "id": null): count it
                        # and keep the pipeline full anyway.
                        self.errors[BAD_RESPONSE] += 1
                        if now < window_end:
                            await send_one()
                        continue
                    if '"error"' in text:
                        self._count_errors(response)
                    elif batch > 1 and len(response) != batch:
                        self.errors[BAD_RESPONSE] += 1
                    self.answered += batch
                    if window_start <= now < window_end:
                        self.messages += 1
                        histogram.record(now - started)
                    if now < window_end:
                        await send_one()
            except ConnectionClosed:
                self.errors[CLOSED] += 1
        if sent:
            self.errors[NO_RESPONSE] += len(sent)

    async def progress(self, report: Callable[[Progress], None], start: int) -> None:
        total = (self.window_end - start) / 1e9
        warmup_end = self.window_start
        last_time, last_count = start, 0
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            now = time.perf_counter_ns()
            count = self.answered
            rate = (count - last_count) / max(1e-9, (now - last_time) / 1e9)
            last_time, last_count = now, count
            report(
                Progress(
                    elapsed=min(total, (now - start) / 1e9),
                    total=total,
                    warming_up=now < warmup_end,
                    commands=count,
                    rate=rate,
                )
            )
            if now >= self.window_end:
                return


async def run_load(
    url: str,
    *,
    sessions: int,
    pipeline: int,
    batch: int,
    keys: int,
    read_ratio: float,
    value_size: int,
    duration: float,
    token: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    warmup: float = 0.0,
    preload: bool = True,
    seed: int | None = None,
) -> LoadResult:
    """Run a load against the server at ``url`` and return its figures.

    Args:
        url: the server's session URL (``ws://host:port/ws``).
        sessions: concurrent WebSocket sessions.
        pipeline: messages in flight per session.
        batch: commands per message (1: single request objects; more: JSON-RPC batches).
        keys: size of the key space (``key:00000000`` ...).
        read_ratio: fraction of gets (0..1); the rest are sets.
        value_size: bytes per value written.
        duration: seconds of the measured window.
        token: sent with ``auth`` first when given.
        progress: called about 4 times a second with a :class:`Progress`.
        warmup: seconds of load before the window, not counted.
        preload: write every key before the load (when there are reads).
        seed: seed of the random request mix (reproducible runs).

    Returns:
        The figures; connection failures and error responses are counted in
        ``errors``, never raised.

    Raises:
        ValueError: an argument out of range.
    """
    _check("sessions", sessions, 1)
    _check("pipeline", pipeline, 1)
    _check("batch", batch, 1)
    _check("keys", keys, 1)
    _check("read_ratio", read_ratio, 0, 1)
    _check("value_size", value_size, 0)
    _check("warmup", warmup, 0)
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    check_url(url)
    run = _Run(
        url,
        sessions=sessions,
        pipeline=pipeline,
        batch=batch,
        keys=keys,
        read_ratio=read_ratio,
        value_size=value_size,
        token=token,
        preload=preload,
        seed=seed,
    )
    cpu_start = cpu_end = 0.0
    async with trio.open_nursery() as nursery:
        for index in range(sessions):
            nursery.start_soon(run.session, index)
        await run.all_ready.wait()
        start = time.perf_counter_ns()
        run.window_start = start + int(warmup * 1e9)
        run.window_end = run.window_start + int(duration * 1e9)
        run.go.set()
        if progress is not None and run.connected:
            nursery.start_soon(run.progress, progress, start)
        if run.connected:
            await trio.sleep(max(0.0, (run.window_start - time.perf_counter_ns()) / 1e9))
            cpu_start = time.process_time()
            await trio.sleep(max(0.0, (run.window_end - time.perf_counter_ns()) / 1e9))
            cpu_end = time.process_time()
    return LoadResult(
        url=url,
        sessions=sessions,
        pipeline=pipeline,
        batch=batch,
        keys=keys,
        read_ratio=read_ratio,
        value_size=value_size,
        connected=run.connected,
        duration=duration if run.connected else 0.0,
        messages=run.messages,
        commands=run.messages * batch,
        errors=dict(run.errors),
        latency=Latency.of(run.histogram),
        client_cpu=cpu_end - cpu_start,
        connect_error=run.connect_error,
    )


# ----------------------------------------------------------------------------
# Command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvmemo bench`` to the command line."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        NAME, help="load-test a running server over WebSocket"
    )
    add_url_flag(parser)
    parser.add_argument("--token", default=None, help="auth token (sent with auth first)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions (4)")
    parser.add_argument("--pipeline", type=int, default=32, help="messages in flight (32)")
    parser.add_argument(
        "--batch", type=int, default=1, help="commands per message; 1 = single requests (1)"
    )
    parser.add_argument("--keys", type=int, default=10_000, help="key space (10000)")
    parser.add_argument(
        "--read-ratio", type=float, default=0.8, help="fraction of gets; rest sets (0.8)"
    )
    parser.add_argument("--value-size", type=int, default=32, help="bytes per value (32)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load not counted (1)")
    parser.add_argument(
        "--no-preload", action="store_true", help="do not write the key space first"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return parser


class ProgressBar:
    """A one-line text bar on ``stream``, rewritten in place."""

    WIDTH = 24  # characters of the bar

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False

    def __call__(self, p: Progress) -> None:
        filled = int(self.WIDTH * p.elapsed / p.total) if p.total > 0 else self.WIDTH
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        label = " warm-up" if p.warming_up else ""
        self.stream.write(
            f"\r[{bar}] {p.elapsed:5.1f}/{p.total:.1f}s {p.commands:>12,} ops "
            f"{p.rate:>10,.0f} ops/s{label}   "
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def format_result(result: LoadResult) -> str:
    """The figures as a few lines of text."""

    def us(seconds: float) -> str:
        return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:,.0f} µs"

    lat = result.latency
    lines = [
        f"url {result.url}: {result.connected}/{result.sessions} sessions, "
        f"pipeline {result.pipeline}, batch {result.batch}, keys {result.keys}, "
        f"read ratio {result.read_ratio}, value {result.value_size} B",
        f"duration    {result.duration:.1f} s",
        f"commands    {result.commands:,} ({result.commands_per_s:,.0f}/s)",
        f"messages    {result.messages:,} ({result.messages_per_s:,.0f}/s)",
        f"latency     p50 {us(lat.p50)}  p99 {us(lat.p99)}  p999 {us(lat.p999)}  "
        f"max {us(lat.max)}  (per message)",
        f"client CPU  {result.client_cpu:.1f} s of {result.duration:.1f} s",
    ]
    if result.errors:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items()))
        lines.append(f"errors      {result.error_count:,}: {kinds}")
    else:
        lines.append("errors      0")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``kvmemo bench``; 0 when commands were answered, 1 when none, 2 on bad flags.

    The URL is ``--url``, else ``KVMEMO_URL``, else the default; one that is
    no WebSocket URL is a bad flag (one error line naming where it came from,
    2); one that no session could connect to is one error line saying why,
    and 1. A reader of the output that went away (``| head``) ends it
    silently with 141.
    """
    return quiet_on_broken_pipe(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        url = url_of(args)
    except ValueError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 2
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if show else None
    try:
        result = trio.run(
            lambda: run_load(
                url,
                sessions=args.sessions,
                pipeline=args.pipeline,
                batch=args.batch,
                keys=args.keys,
                read_ratio=args.read_ratio,
                value_size=args.value_size,
                duration=args.duration,
                token=args.token,
                progress=bar,
                warmup=args.warmup,
                preload=not args.no_preload,
                seed=args.seed,
            )
        )
    except ValueError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if result.connected == 0:
        print(f"kvmemo: error: cannot connect to {url}: {result.connect_error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_result(result))
    return 0 if result.commands else 1


__all__ = [
    "NAME",
    "LatencyHistogram",
    "LoadResult",
    "Progress",
    "ProgressBar",
    "add_parser",
    "format_result",
    "run",
    "run_load",
]
