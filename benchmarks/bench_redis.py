"""KVMemo's Redis-protocol port against a real Redis, both driven by ``redis-benchmark``.

Design: the same load, from the same tool, hits two servers started now on
this machine, so the ratio KVMemo / Redis means something on any machine
(absolute numbers do not travel):

- *KVMemo*: ``python -m kvmemo serve --port 0 --resp-port 0 --shards 16`` (a
  subprocess; the ports are read from its first two stdout lines);
- *Redis*: ``redis-server`` on loopback, a free port, ``--save "" --appendonly
  no`` (nothing written to disk, as KVMemo).

``redis-benchmark -t TEST -c 50 -P P -r 100000 -n N --csv`` runs once per test
(SET, GET, INCR, MSET of 10 keys) and pipeline depth (``-P 1``, ``-P 16``), the
two servers alternating which goes first so drift hits both alike. ``-r``
spreads the keys over 100,000 names (KVMemo's shards are used as they would
be, not one hot key). MSET gets a tenth of the requests (each writes 10 keys).
Each server has a short warm-up first (not counted).

Reported per test: requests/s of each server and their ratio, and each
server's CPU time per request (from ``/proc``, over the run). On a small
machine the client and the two servers share the cores, so the CPU ratio
(Redis's CPU per request over KVMemo's) holds up better than the rate ratio
when other processes are busy; both are printed.

Targets (printed, never asserted: speed never fails the run): ``-P 16``
GET / SET at least 0.1 of Redis's rate; ``-P 1`` (50 clients) at least 0.25.

Skipped, with a message, when ``redis-server`` or ``redis-benchmark`` is not
installed (Debian: ``apt-get install -y redis-server redis-tools``).

On a shared machine single runs are noisy (Redis's own rate moves by half
between runs); ``--rounds N`` runs every pair N times, alternating the order
each time, and reports each server's median rate and its CPU time over all
rounds (total CPU / total requests).

Run: ``python -m benchmarks.bench_redis [--quick] [--rounds N]``; the full run
(three rounds) takes about half a minute on 2 cores, ``--quick`` (one) about 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ._util import fmt_rate, load_average

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TESTS = ("set", "get", "incr", "mset")
PIPELINES = (1, 16)
CLIENTS = 50
KEYSPACE = 100_000  # redis-benchmark -r
MSET_SHARE = 10  # MSET runs N / MSET_SHARE requests (each writes 10 keys)
REQUESTS = {1: 20_000, 16: 60_000}  # -n per test, by pipeline depth
QUICK_REQUESTS = {1: 4_000, 16: 12_000}
WARMUP_REQUESTS = 2_000
# Rounds of the full run: a single run moves by a third from one try to the next on a
# shared 2-core machine; the median of three, in alternating order, moves much less.
ROUNDS = 3
SHARDS = 16
START_TIMEOUT = 20.0  # seconds for a server to come up
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
RUN_TIMEOUT = 300.0  # seconds for one redis-benchmark run
TARGETS = {(16, "SET"): 0.10, (16, "GET"): 0.10} | {(1, t.upper()): 0.25 for t in TESTS}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server subprocess, leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def cpu(self) -> float | None:
        """User + system CPU seconds of the process so far (None off Linux)."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, reap the leader."""
        _stop(self.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


def _read_lines(stdout: IO[bytes], count: int, timeout: float) -> list[str]:
    """The first ``count`` lines of a pipe, within ``timeout`` seconds."""
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while len(lines) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"no startup line within {timeout:.0f} s (got {lines})")
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"exited before starting (got {lines})")
            buffer += chunk
            while b"\n" in buffer and len(lines) < count:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode().strip())
    return lines


def start_kvmemo() -> Server:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmemo",
            "serve",
            "--host",
            HOST,
            "--port",
            "0",
            "--resp-port",
            "0",
            "--shards",
            str(SHARDS),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        resp_line = _read_lines(proc.stdout, 2, START_TIMEOUT)[1]
        prefix = "KVMemo listening on redis://"
        if not resp_line.startswith(prefix):
            raise RuntimeError(f"unexpected line {resp_line!r}")
        return Server("KVMemo", proc, int(resp_line.rpartition(":")[2]))
    except BaseException:
        _stop(proc)
        raise


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(binary: str, workdir: str) -> Server:
    """``redis-server`` on a free loopback port, persistence off; retried on a port race."""
    for attempt in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                workdir,
                "--loglevel",
                "warning",
                "--logfile",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _ping(port):
                return Server("Redis", proc, port)
            time.sleep(0.05)
        _stop(proc)
        if attempt == 2:
            raise RuntimeError(f"redis-server did not start (exit status {proc.returncode})")
    raise AssertionError("unreachable")


# -- measuring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    server: str
    test: str  # SET, GET, INCR, MSET
    pipeline: int
    requests: int
    rps: float
    p50_ms: float
    cpu: float | None  # server CPU seconds over the run

    @property
    def cpu_per_request(self) -> float | None:
        return self.cpu / self.requests if self.cpu is not None else None


def combine(results: Sequence[Result]) -> Result:
    """Several runs of one test on one server as one: median rate and p50, total CPU."""
    first = results[0]
    cpus = [r.cpu for r in results]
    return Result(
        first.server,
        first.test,
        first.pipeline,
        sum(r.requests for r in results),
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        None if None in cpus else sum(c for c in cpus if c is not None),
    )


def parse_csv(text: str) -> dict[str, tuple[float, float]]:
    """redis-benchmark ``--csv`` output: test name (first word) -> (rps, p50 ms)."""
    rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ValueError(f"not redis-benchmark CSV output: {text[:200]!r}")
    header = rows[0]
    p50 = header.index("p50_latency_ms") if "p50_latency_ms" in header else None
    return {
        row[0].split()[0].upper(): (float(row[1]), float(row[p50]) if p50 is not None else 0.0)
        for row in rows[1:]
    }


def redis_benchmark(binary: str, server: Server, test: str, pipeline: int, requests: int) -> Result:
    """One ``redis-benchmark`` run of one test; its rate and the server's CPU time."""
    command = [
        binary,
        "-h",
        HOST,
        "-p",
        str(server.port),
        "-t",
        test,
        "-c",
        str(CLIENTS),
        "-P",
        str(pipeline),
        "-n",
        str(requests),
        "-r",
        str(KEYSPACE),
        "--csv",
    ]
    before = server.cpu()
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    after = server.cpu()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    figures = parse_csv(done.stdout)
    name = test.upper()
    if name not in figures:
        raise RuntimeError(f"no {name} line in redis-benchmark's output: {done.stdout!r}")
    rps, p50 = figures[name]
    cpu = after - before if before is not None and after is not None else None
    return Result(server.name, name, pipeline, requests, rps, p50, cpu)


# -- reporting ----------------------------------------------------------------------------


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


HEADER = (
    f"{'test':<6} {'-P':>3} {'Redis rps':>10} {'KVMemo rps':>10} {'ratio':>6} {'target':>7}"
    f" {'Redis CPU/req':>14} {'KVMemo CPU/req':>15} {'CPU ratio':>9}  p50 ms R/K"
)


def row(redis: Result, kv: Result) -> str:
    ratio = kv.rps / redis.rps if redis.rps else None
    target = TARGETS.get((kv.pipeline, kv.test))
    verdict = ""
    if target is not None and ratio is not None:
        verdict = "met" if ratio >= target else "BELOW"
    target_text = f">={target:.2f}" if target is not None else ""
    cpu_ratio = _ratio(redis.cpu_per_request, kv.cpu_per_request)
    return (
        f"{kv.test:<6} {kv.pipeline:>3} {fmt_rate(redis.rps):>10} {fmt_rate(kv.rps):>10}"
        f" {_fmt_ratio(ratio):>6} {target_text:>7} {_us(redis.cpu_per_request) + ' us':>14}"
        f" {_us(kv.cpu_per_request) + ' us':>15} {_fmt_ratio(cpu_ratio):>9}"
        f"  {redis.p50_ms:.2f}/{kv.p50_ms:.2f} {verdict}"
    )


def summary(pairs: Sequence[tuple[Result, Result]]) -> list[str]:
    lines = ["targets (KVMemo rps / Redis rps, informational, never asserted):"]
    for (pipeline, test), target in TARGETS.items():
        for redis, kv in pairs:
            if (kv.pipeline, kv.test) == (pipeline, test):
                ratio = kv.rps / redis.rps if redis.rps else 0.0
                state = "met" if ratio >= target else "not met"
                lines.append(
                    f"  -P {pipeline:<2} {test:<4} {ratio:.2f} (target >= {target:.2f}): {state}"
                )
    return lines


# -- main ---------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_redis",
        description="redis-benchmark against KVMemo's Redis port and a real redis-server.",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (~15 s)")
    parser.add_argument(
        "--requests", type=int, default=None, help="-n for -P 1 (-P 16 runs 3 times as many)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"runs of every test per server; medians are reported (default {ROUNDS}, quick 1)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else ROUNDS
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Start both servers, run every test at both pipeline depths, print ratios and targets."""
    args = _parse_args(argv)
    redis_server = shutil.which("redis-server")
    benchmark = shutil.which("redis-benchmark")
    if redis_server is None or benchmark is None:
        missing = [
            n
            for n, p in (("redis-server", redis_server), ("redis-benchmark", benchmark))
            if p is None
        ]
        print(
            f"skipped: {' and '.join(missing)} not installed"
            " (Debian: apt-get install -y redis-server redis-tools)"
        )
        return
    requests = dict(QUICK_REQUESTS if args.quick else REQUESTS)
    if args.requests is not None:
        requests = {1: args.requests, 16: 3 * args.requests}
    print(
        f"redis-benchmark -c {CLIENTS} -r {KEYSPACE:,}, -P {' and -P '.join(map(str, PIPELINES))},"
        f" -n {requests[1]:,} / {requests[16]:,} per test (MSET a tenth), {args.rounds} round(s);"
        f" KVMemo {SHARDS} shards vs redis-server; load {load_average()}",
        flush=True,
    )
    started = time.perf_counter()
    servers: list[Server] = []
    pairs: list[tuple[Result, Result]] = []
    with tempfile.TemporaryDirectory(prefix="kvmemo-bench-redis-") as workdir:
        try:
            servers.append(start_redis(redis_server, workdir))
            servers.append(start_kvmemo())
            for server in servers:  # warm-up, not counted
                redis_benchmark(benchmark, server, "set", 16, WARMUP_REQUESTS)
                redis_benchmark(benchmark, server, "get", 16, WARMUP_REQUESTS)
            print(HEADER)
            print("-" * len(HEADER), flush=True)
            flip = False
            for pipeline in PIPELINES:
                for test in TESTS:
                    n = requests[pipeline] // (MSET_SHARE if test == "mset" else 1)
                    results: dict[str, list[Result]] = {s.name: [] for s in servers}
                    for _ in range(args.rounds):
                        order = servers[::-1] if flip else servers
                        flip = not flip
                        for server in order:
                            results[server.name].append(
                                redis_benchmark(benchmark, server, test, pipeline, n)
                            )
                    pair = (combine(results["Redis"]), combine(results["KVMemo"]))
                    pairs.append(pair)
                    print(row(*pair), flush=True)
        finally:
            for server in reversed(servers):
                server.stop()
    print(
        "ratio = KVMemo rps / Redis rps; CPU ratio = Redis CPU per request / KVMemo's"
        " (server processes only); p50 in ms, Redis/KVMemo"
    )
    print()
    for line in summary(pairs):
        print(line)
    print(f"load {load_average()} at the end; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
