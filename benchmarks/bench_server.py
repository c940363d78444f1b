"""WebSocket server throughput and latency, against an echo floor measured in the same run.

Design: the same load generator (:func:`kvmemo.loadgen.run_load`) runs
against two servers started now, on this machine:

- *KVMemo*: a whole node (``open_node``: default store, WebSocket port only);
- *the echo floor*: a bare trio-websocket server with the same transport
  settings, answering each message with a canned response of the same shape
  (one response object per request, ``"OK"`` for a set, a value of the same
  size for a get). It parses nothing but the ids and method names (one
  regular expression); what it costs is the floor every WebSocket server on
  trio-websocket pays, so the ratio KVMemo / echo says how much the server's
  own work (JSON-RPC, sessions, engine, shards) adds to it.

Each server runs in its own **subprocess**, and the load generator in this
process. On a 2-core machine that gives the server one core of its own and
the client the other, as with a real client on another host; in one process
the client's CPU would be taken from the server's and both figures would
mean less. The server's CPU time per message (from ``/proc``, over the
measured window) and both processes' CPU share are printed too: they show
which side is saturated, and CPU per message (with its inverse, the rate the
server would reach on a core of its own) holds up far better than the rates
when other processes share the machine.

Scenarios (same for both servers): (1) single requests pipelined -- batch 1,
``PIPELINE`` messages in flight on each of ``SESSIONS`` sessions; (2)
JSON-RPC batches of ``BATCH`` commands; (3) ``MANY_SESSIONS`` sessions with
one request in flight each (many browser tabs; informational, no target).
80% gets and 20% sets over a preloaded key space, 32-byte values. Each
measurement has a warm-up that is not counted. Scenarios alternate between
the servers so drift (thermal, noisy neighbours) hits both alike.

Targets are printed next to the figures and never asserted.

Servers listen on 127.0.0.1 on ports the OS picks, and stop by themselves:
on SIGTERM from this process, when this process goes away, or after
``--lifetime`` seconds in any case.

``--profile`` adds a run of both scenarios against a third KVMemo server
running under cProfile (the figures of that run are not reported: cProfile
slows the server down) and prints its hottest functions with their share of
the server's time. cProfile inflates small calls; for a sampling view with
no such bias, attach ``py-spy record -p PID -f raw`` to a server started
with ``--serve kvmemo`` (not a dependency of the project).

Run: ``python -m benchmarks.bench_server [--quick] [--duration S] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from kvmemo.loadgen import LoadResult, Progress, run_load

from ._util import fmt_rate

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 4  # concurrent sessions of the pipelined scenarios
MANY_SESSIONS = 64  # sessions of the many-clients scenario (one request in flight each)
PIPELINE = 32  # messages in flight per session, single requests
BATCH = 100  # commands per message, batch scenario
BATCH_PIPELINE = 4  # messages in flight per session, batch scenario
KEYS = 10_000  # key space (preloaded)
READ_RATIO = 0.8  # fraction of gets
VALUE_SIZE = 32  # bytes per value
WS_QUEUE = 64  # messages trio-websocket buffers per session (as kvmemo.server.app)
MAX_MESSAGE = 16 * 1024 * 1024  # bytes per message (as ServerConfig.max_message_size)
TARGET_SINGLE = 0.8  # single requests pipelined, fraction of the echo floor's messages/s
TARGET_BATCH = 50_000  # JSON-RPC batches of 100, commands/s
STARTUP_TIMEOUT = 30.0  # seconds for a server subprocess to report its URL
STOP_TIMEOUT = 10.0  # seconds for a server subprocess to exit after SIGTERM
PROFILE_TOP = 25  # functions listed by --profile
SATURATED = 0.85  # CPU share of the window above which a process counts as saturated
SEED = 2024


@attrs.frozen
class Scenario:
    name: str
    pipeline: int
    batch: int
    sessions: int = SESSIONS


SCENARIOS = [
    Scenario(f"single requests, pipeline {PIPELINE}", PIPELINE, 1),
    Scenario(f"batches of {BATCH}, pipeline {BATCH_PIPELINE}", BATCH_PIPELINE, BATCH),
    # Many browser tabs, each waiting for its answer before the next request.
    Scenario(f"{MANY_SESSIONS} sessions, one request each", 1, 1, MANY_SESSIONS),
]


@attrs.frozen
class Timing:
    warmup: float
    duration: float
    lifetime: float  # seconds after which a server subprocess exits in any case


FULL = Timing(warmup=2.0, duration=10.0, lifetime=300.0)
QUICK = Timing(warmup=0.5, duration=3.0, lifetime=120.0)


# ----------------------------------------------------------------------------
# The servers (run in subprocesses: ``--serve kvmemo`` / ``--serve echo``)

_REQUEST = re.compile(r'"id":(\d+),"method":"([a-z.]+)"')


_VALUE = json.dumps("v" * VALUE_SIZE)  # the canned value of a get


def echo_response(text: str) -> str:
    """The canned answer to one message: one response per request, by id and method."""
    parts = [
        '{"jsonrpc":"2.0","id":'
        + rid
        + ',"result":'
        + (_VALUE if method == "get" else '"OK"')
        + "}"
        for rid, method in _REQUEST.findall(text)
    ]
    if text.startswith("["):
        return "[" + ",".join(parts) + "]"
    return parts[0] if parts else '{"jsonrpc":"2.0","id":null,"result":null}'


async def _serve_echo(ready: Callable[[str], None], lifetime: float) -> None:
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        offered = request.proposed_subprotocols
        ws = await request.accept(subprotocol="kvmemo.v1" if "kvmemo.v1" in offered else None)
        while True:
            try:
                message = await ws.get_message()
                await ws.send_message(echo_response(message if isinstance(message, str) else ""))
            except ConnectionClosed:
                return

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler,
                "127.0.0.1",
                0,
                None,
                message_queue_size=WS_QUEUE,
                max_message_size=MAX_MESSAGE,
                task_status=task_status,
            )
        )
        ready(f"ws://127.0.0.1:{server.port}/ws")
        await _until_stopped(lifetime)
        nursery.cancel_scope.cancel()


async def _serve_kvmemo(ready: Callable[[str], None], lifetime: float) -> None:
    from kvmemo.config import StoreConfig
    from kvmemo.node import open_node
    from kvmemo.server.config import ServerConfig

    async with open_node(StoreConfig(), ServerConfig(port=0, resp=False)) as node:
        ready(node.url)
        await _until_stopped(lifetime)


async def _until_stopped(lifetime: float) -> None:
    """Return on SIGTERM/SIGINT, when the parent process goes away, or after ``lifetime`` s."""
    parent = os.getppid()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        with trio.move_on_after(lifetime):
            async with trio.open_nursery() as nursery:

                async def watch_parent() -> None:
                    while True:
                        await trio.sleep(0.5)
                        if os.getppid() != parent:
                            nursery.cancel_scope.cancel()

                nursery.start_soon(watch_parent)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()


def serve(kind: str, lifetime: float, profile_out: str | None) -> None:
    """Run one server until stopped; print ``READY <url>`` on stdout when it listens."""

    def ready(url: str) -> None:
        print(f"READY {url}", flush=True)

    profiler = cProfile.Profile() if profile_out else None
    if profiler is not None:
        profiler.enable()
    try:
        if kind == "echo":
            trio.run(_serve_echo, ready, lifetime)
        else:
            trio.run(_serve_kvmemo, ready, lifetime)
    finally:
        if profiler is not None and profile_out:
            profiler.disable()
            profiler.dump_stats(profile_out)


class ServerProcess:
    """A server subprocess: started, its URL read, its CPU time sampled, stopped."""

    def __init__(self, kind: str, lifetime: float, profile_out: str | None = None) -> None:
        command = [sys.executable, "-m", "benchmarks.bench_server", "--serve", kind]
        command += ["--lifetime", str(lifetime)]
        if profile_out:
            command += ["--profile-out", profile_out]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.kind = kind
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("READY "):
                return line.split(None, 1)[1].strip()
        self.stop()
        raise RuntimeError(f"the {self.kind} server did not start (exit {self.proc.poll()})")

    def cpu(self) -> float | None:
        """CPU seconds (user + system) the server has used so far; None off Linux."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ----------------------------------------------------------------------------
# The measurements


@attrs.frozen
class Measurement:
    server: str
    scenario: Scenario
    result: LoadResult
    server_cpu_per_message: float | None  # seconds of server CPU per message in the window
    server_busy: float | None  # fraction of the window the server was on a CPU

    @property
    def capacity(self) -> float | None:
        """Messages/s the server would serve on one core of its own (1 / CPU per message)."""
        cpu = self.server_cpu_per_message
        return 1 / cpu if cpu else None

    @property
    def client_busy(self) -> float | None:
        r = self.result
        return r.client_cpu / r.duration if r.duration else None


class _CpuProbe:
    """Samples the server's CPU time over the measured window, through progress reports."""

    def __init__(self, server: ServerProcess, batch: int) -> None:
        self.server = server
        self.batch = batch
        self.first: tuple[float, int, float] | None = None  # (cpu, commands, elapsed)
        self.last: tuple[float, int, float] | None = None

    def __call__(self, p: Progress) -> None:
        cpu = self.server.cpu()
        if cpu is None or p.warming_up:
            return
        if self.first is None:
            self.first = (cpu, p.commands, p.elapsed)
        else:
            self.last = (cpu, p.commands, p.elapsed)

    def figures(self) -> tuple[float | None, float | None]:
        """(server CPU seconds per message, server busy fraction) over the sampled window."""
        if self.first is None or self.last is None:
            return None, None
        cpu = self.last[0] - self.first[0]
        messages = (self.last[1] - self.first[1]) / self.batch
        wall = self.last[2] - self.first[2]
        return (cpu / messages if messages > 0 else None), (cpu / wall if wall > 0 else None)


def measure(server: ServerProcess, scenario: Scenario, timing: Timing) -> Measurement:
    probe = _CpuProbe(server, scenario.batch)
    result = trio.run(
        lambda: run_load(
            server.url,
            sessions=scenario.sessions,
            pipeline=scenario.pipeline,
            batch=scenario.batch,
            keys=KEYS,
            read_ratio=READ_RATIO,
            value_size=VALUE_SIZE,
            duration=timing.duration,
            warmup=timing.warmup,
            progress=probe,
            seed=SEED,
        )
    )
    return Measurement(server.kind, scenario, result, *probe.figures())


def _us(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e6:,.0f}"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


HEADER = (
    f"{'scenario':<30} {'server':<7} {'msgs/s':>7} {'cmds/s':>7} {'p50 µs':>8} "
    f"{'p99 µs':>9} {'p999 µs':>9} {'srv µs/msg':>10} {'srv cap/s':>9} {'srv busy':>8} "
    f"{'cli busy':>8} {'errors':>6}"
)


LEGEND = (
    "srv µs/msg: server CPU per message; srv cap/s: 1 / that, the messages/s the server "
    "would serve on a core of its own;\nsrv busy, cli busy: CPU share of the measured window "
    "used by the server and by the load generator; latencies per message"
)


def _row(m: Measurement) -> str:
    r = m.result
    capacity = fmt_rate(m.capacity) if m.capacity else "-"
    return (
        f"{m.scenario.name:<30} {m.server:<7} {fmt_rate(r.messages_per_s):>7} "
        f"{fmt_rate(r.commands_per_s):>7} {_us(r.latency.p50):>8} {_us(r.latency.p99):>9} "
        f"{_us(r.latency.p999):>9} {_us(m.server_cpu_per_message):>10} {capacity:>9} "
        f"{_pct(m.server_busy):>8} {_pct(m.client_busy):>8} {r.error_count:>6}"
    )


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def _summary(results: dict[tuple[str, str], Measurement]) -> list[str]:
    single, batch, many = SCENARIOS
    lines = []
    echo_s, kv_s = results[("echo", single.name)], results[("kvmemo", single.name)]
    ratio = _ratio(kv_s.result.messages_per_s, echo_s.result.messages_per_s)
    met = "met" if ratio >= TARGET_SINGLE else "NOT met"
    lines.append(
        f"single requests pipelined: KVMemo {fmt_rate(kv_s.result.messages_per_s)} msgs/s = "
        f"{ratio:.2f} x echo floor {fmt_rate(echo_s.result.messages_per_s)} msgs/s "
        f"(target >= {TARGET_SINGLE}: {met}); by server CPU per message "
        f"{_ratio(kv_s.capacity, echo_s.capacity):.2f} x "
        f"({_us(kv_s.server_cpu_per_message)} vs {_us(echo_s.server_cpu_per_message)} µs)"
    )
    echo_b, kv_b = results[("echo", batch.name)], results[("kvmemo", batch.name)]
    kv_rate = kv_b.result.commands_per_s
    met = "met" if kv_rate >= TARGET_BATCH else "NOT met"
    cap = fmt_rate(kv_b.capacity * BATCH) if kv_b.capacity else "-"
    lines.append(
        f"JSON-RPC batches of {BATCH}: KVMemo {fmt_rate(kv_rate)} cmds/s "
        f"(target >= {fmt_rate(TARGET_BATCH)}: {met}; {cap} cmds/s on a core of its own, "
        f"{_us(kv_b.server_cpu_per_message and kv_b.server_cpu_per_message / BATCH)} µs/cmd) = "
        f"{_ratio(kv_rate, echo_b.result.commands_per_s):.2f} x echo floor "
        f"{fmt_rate(echo_b.result.commands_per_s)} cmds/s"
    )
    echo_m, kv_m = results[("echo", many.name)], results[("kvmemo", many.name)]
    lines.append(
        f"{many.sessions} sessions with one request in flight each (informational): KVMemo "
        f"{fmt_rate(kv_m.result.messages_per_s)} msgs/s = "
        f"{_ratio(kv_m.result.messages_per_s, echo_m.result.messages_per_s):.2f} x echo floor "
        f"{fmt_rate(echo_m.result.messages_per_s)} msgs/s; by server CPU per message "
        f"{_ratio(kv_m.capacity, echo_m.capacity):.2f} x "
        f"({_us(kv_m.server_cpu_per_message)} vs {_us(echo_m.server_cpu_per_message)} µs)"
    )
    starved = [
        f"{server}/{name.split(',')[0]}"
        for (server, name), m in results.items()
        if max(m.server_busy or 1.0, m.client_busy or 1.0) < SATURATED
    ]
    if starved:
        where = "every run" if len(starved) == len(results) else ", ".join(starved)
        lines.append(
            f"note: in {where} neither the server nor the load generator was busy "
            f">= {SATURATED:.0%} of the time: other processes had the CPUs, so the rates "
            "above are low and noisy; compare server CPU per message ('srv µs/msg', "
            "'srv cap/s'), which holds up better"
        )
    errors = {
        f"{server}/{name}": m.result.errors
        for (server, name), m in results.items()
        if m.result.errors
    }
    if errors:
        lines.append(f"errors: {errors}")
    return lines


def profile(timing: Timing) -> list[str]:
    """Both scenarios against a KVMemo server under cProfile; its hottest functions."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "server.prof")
        server = ServerProcess("kvmemo", timing.lifetime, profile_out=out)
        try:
            for scenario in SCENARIOS:
                measure(server, scenario, timing)
        finally:
            server.stop()
        stats = pstats.Stats(out)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:PROFILE_TOP]
    lines = [
        f"KVMemo server under cProfile (both scenarios; {total:.1f} s profiled), "
        "by own time (tottime):",
        f"{'own %':>6} {'cum %':>6} {'calls':>10}  function",
    ]
    for (filename, line, name), (_cc, calls, tt, ct, _callers) in rows:
        where = filename
        for marker in ("site-packages/", str(ROOT) + "/"):
            if marker in where:
                where = where.split(marker, 1)[1]
        lines.append(f"{tt / total:6.1%} {ct / total:6.1%} {calls:>10}  {where}:{line}({name})")
    return lines


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_server",
        description="KVMemo's WebSocket server against a bare trio-websocket echo floor.",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (~20 s)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    parser.add_argument(
        "--profile", action="store_true", help="also profile the KVMemo server (cProfile)"
    )
    parser.add_argument("--serve", choices=["kvmemo", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=FULL.lifetime, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start both servers, run both scenarios against each, print one table and the targets."""
    args = _parse_args(argv)
    if args.serve:
        serve(args.serve, args.lifetime, args.profile_out)
        return
    timing = QUICK if args.quick else FULL
    if args.duration is not None:
        timing = attrs.evolve(timing, duration=args.duration)
    print(
        f"WebSocket server vs echo floor: {SESSIONS} sessions, {KEYS:,} keys, "
        f"{READ_RATIO:.0%} gets, {VALUE_SIZE} B values; warm-up {timing.warmup} s, "
        f"{timing.duration} s measured per run; servers in subprocesses, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    servers = [ServerProcess("echo", timing.lifetime), ServerProcess("kvmemo", timing.lifetime)]
    results: dict[tuple[str, str], Measurement] = {}
    try:
        for scenario in SCENARIOS:
            for server in servers:
                m = measure(server, scenario, timing)
                results[(server.kind, scenario.name)] = m
                print(_row(m), flush=True)
    finally:
        for server in servers:
            server.stop()
    print(LEGEND)
    print()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for line in _summary(results):
        print(line)
    if args.profile:
        print()
        for line in profile(attrs.evolve(timing, warmup=0.5)):
            print(line)


if __name__ == "__main__":
    main()
