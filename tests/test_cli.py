"""``kvmemo serve``: its configuration, its first line, its logs, its shutdown.

Configuration precedence is tested in-process through ``resolve_all``;
everything that is about the process (stdout, stderr, exit code, signals)
runs ``python -m kvmemo serve --port 0 --no-resp`` as a subprocess, with
real time but under bounds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from kvmemo.cli import build_parser, main
from kvmemo.server.config import RespLimits
from kvmemo.settings import resolve_all

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20  # seconds for a subprocess to print its first line
EXIT_TIMEOUT = 10  # seconds for a subprocess to exit after a signal
FIRST_LINE = re.compile(r"^KVMemo listening on ws://127\.0\.0\.1:(\d+)/ws$")


def env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: no KVMEMO_* from outside, plus ``extra``."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    out.update(extra)
    return out


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmemo", "serve", *args]


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait for ``process`` to exit: its exit code, and the rest of its piped output.

    For a process whose pipes were read with ``readline()``: not
    ``communicate(timeout=...)``, which reads the raw descriptors and so loses
    what the text wrapper had buffered already (lines that came in the same
    read as the one returned). Killed if it outlives ``timeout`` seconds.
    """
    pipes = (process.stdout, process.stderr)
    with ThreadPoolExecutor(max_workers=2) as pool:
        reads = [pool.submit(p.read) if p and not p.closed else None for p in pipes]
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # ends the reads too, or leaving the pool would wait on them
            raise
        out, err = (r.result() if r is not None else "" for r in reads)
    return code, out, err


# -- configuration, in-process ---------------------------------------------------------------


def resolved(argv: list[str], environ: dict[str, str] | None = None) -> Any:
    return resolve_all(build_parser().parse_args(["serve", *argv]), environ or {})


def test_defaults_of_serve() -> None:
    r = resolved([])
    assert (r.server.host, r.server.port, r.server.resp_port) == ("127.0.0.1", 7070, 6380)
    assert r.store.maxmemory == 256 * 1024 * 1024
    assert r.log_level == "info"


def test_toml_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text(
        'shards = 3\nlog_level = "warning"\n'
        '[store]\neviction-policy = "lfu"\nmaxmemory = "1MiB"\n'
        "[limits]\nmax_batch = 4\nidle_timeout = 2.5\n"
        '[server]\nauth_token = ["a", "b"]\n'
    )
    r = resolved(["--config", str(config)])
    assert (r.store.shards, r.store.eviction_policy, r.store.maxmemory) == (3, "lfu", 1024**2)
    assert (r.server.max_batch, r.server.idle_timeout) == (4, 2.5)
    assert r.server.tokens == frozenset({"a", "b"})
    assert r.log_level == "warning"
    environ = {"KVMEMO_EVICTION_POLICY": "fifo", "KVMEMO_MAX_BATCH": "6", "KVMEMO_CHAOS": "yes"}
    r = resolved(["--config", str(config)], environ)
    assert (r.store.shards, r.store.eviction_policy, r.server.max_batch) == (3, "fifo", 6)
    assert r.store.chaos is True
    r = resolved(["--config", str(config), "--eviction-policy", "random", "--shards", "5"], environ)
    assert (r.store.shards, r.store.eviction_policy, r.server.max_batch) == (5, "random", 6)
    r = resolved([], {"KVMEMO_CONFIG": str(config)})
    assert r.store.shards == 3


def test_the_scan_snapshot_limit_is_a_setting() -> None:
    assert resolved([], {}).store.scan_snapshots == 64
    assert resolved(["--scan-snapshots", "8"], {}).store.scan_snapshots == 8
    assert resolved([], {"KVMEMO_SCAN_SNAPSHOTS": "3"}).store.scan_snapshots == 3


def test_the_pubsub_buffer_limit_is_a_setting() -> None:
    assert resolved([], {}).store.pubsub_buffer_limit == 32 << 20
    assert resolved(["--pubsub-buffer-limit", "1MiB"], {}).store.pubsub_buffer_limit == 1 << 20
    assert resolved([], {"KVMEMO_PUBSUB_BUFFER_LIMIT": "4096"}).store.pubsub_buffer_limit == 4096
    assert resolved([], {}).store.pubsub_max_subscriptions == 100_000
    assert resolved(["--pubsub-max-subscriptions", "5"], {}).store.pubsub_max_subscriptions == 5


def test_supervision_eviction_and_hold_limits_are_settings() -> None:
    r = resolved(
        ["--max-restarts", "500", "--restart-period", "2.5", "--hold-timeout", "0.25"],
        {"KVMEMO_RESTART_BACKOFF": "0.01", "KVMEMO_RESTART_BACKOFF_MAX": "0.5"},
    )
    assert (r.store.max_restarts, r.store.restart_period, r.store.hold_timeout) == (500, 2.5, 0.25)
    assert (r.store.restart_backoff, r.store.restart_backoff_max) == (0.01, 0.5)
    r = resolved(
        ["--eviction-watermark", "0.8", "--eviction-target", "0.7", "--oom-wait-ms", "20"],
        {"KVMEMO_EVICTION_SAMPLE": "4", "KVMEMO_RECONCILE_EVERY": "10"},
    )
    store = r.store
    assert (store.eviction_watermark, store.eviction_target, store.oom_wait) == (0.8, 0.7, 0.02)
    assert (store.eviction_sample, store.reconcile_every) == (4, 10)
    assert resolved(["--max-http-head", "4KiB"]).server.max_http_head == 4096
    with pytest.raises(ValueError, match="max_restarts"):
        resolved(["--max-restarts", "0"])


def test_the_redis_ports_limits_are_settings(tmp_path: Path) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text('[limits]\nresp_max_bulk_len = "1MiB"\nresp_max_clients = 7\n')
    r = resolved(
        ["--config", str(config), "--resp-max-transaction-commands", "50"],
        {"KVMEMO_RESP_IDLE_TIMEOUT": "30"},
    )
    limits = r.server.resp_limits
    assert (limits.max_bulk_len, limits.max_clients) == (1024**2, 7)
    assert (limits.max_transaction_commands, limits.idle_timeout) == (50, 30.0)
    assert resolved([]).server.resp_limits == RespLimits()
    with pytest.raises(ValueError, match=r"^resp_max_clients must be >= 1, got 0$"):
        resolved(["--resp-max-clients", "0"])


def test_repeatable_flags_and_lists_from_the_environment() -> None:
    r = resolved(["--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example"])
    assert r.server.allowed_origins == frozenset({"https://a.example", "https://b.example"})
    r = resolved([], {"KVMEMO_AUTH_TOKEN": "x, y"})
    assert r.server.tokens == frozenset({"x", "y"})
    assert resolved(["--no-resp"], {"KVMEMO_RESP": "true"}).server.resp is False
    assert resolved([], {"KVMEMO_RESP": "off"}).server.resp is False


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "message"),
    [
        (["--shards", "0"], {}, None, r"^shards must be >= 1, got 0$"),
        (["--shards", "many"], {}, None, r"^invalid --shards: expected an integer, got 'many'$"),
        (["--maxmemory", "lots"], {}, None, r"^invalid --maxmemory: maxmemory must be a size"),
        (["--eviction-policy", "nope"], {}, None, r"nope"),
        ([], {"KVMEMO_PORT": "70000"}, None, r"^port must be in 0\.\.65535, got 70000$"),
        ([], {"KVMEMO_IDLE_TIMEOUT": "nan"}, None, r"^invalid KVMEMO_IDLE_TIMEOUT: "),
        ([], {}, "shards = true\n", r"kvmemo\.toml: shards: expected an integer, got True$"),
        ([], {}, "shards = 1.5\n", r"expected an integer, got 1\.5$"),
        ([], {}, "shardz = 1\n", r"unknown setting 'shardz' \(did you mean 'shards'\?\)$"),
        (
            [],
            {},
            "[store]\nport = 1\nshardz = 2\n",
            r"unknown setting 'store\.shardz' \(did you mean 'shards'\?\)$",
        ),
        ([], {}, "[nonsense]\nport = 1\n", r"unknown table \[nonsense\]$"),
        ([], {}, "shards = \n", r"is not valid TOML"),
        (["--log-level", "loud"], {}, None, r"^invalid --log-level: expected one of debug"),
        (["--tls-cert", "c.pem"], {}, None, r"^tls_cert and tls_key must be given together$"),
    ],
)
def test_bad_configuration_is_refused_with_a_message_naming_it(
    tmp_path: Path, argv: list[str], environ: dict[str, str], toml: str | None, message: str
) -> None:
    if toml is not None:
        config = tmp_path / "kvmemo.toml"
        config.write_text(toml)
        argv = [*argv, "--config", str(config)]
    with pytest.raises(ValueError, match=message):
        resolved(argv, environ)


# -- the process -----------------------------------------------------------------------------


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """``main`` sets up the root logger for the process; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``kvmemo.cli.main`` in-process: exit code, stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else -1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "toml"),
    [
        (["--shards", "0"], None),
        (["--maxmemory", "lots"], None),
        (["--eviction-policy", "nope"], None),
        (["--no-such-flag"], None),
        (["--max-batch"], None),
        ([], "shardz = 4\n"),
        ([], "shards = [\n"),
        ([], "shards = 4\nshards = 5\n"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], None),
    ],
)
@pytest.mark.usefixtures("keep_logging")
def test_bad_configuration_prints_one_error_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], toml: str | None
) -> None:
    if toml is not None:
        (tmp_path / "kvmemo.toml").write_text(toml)
        args = [*args, "--config", str(tmp_path / "kvmemo.toml")]
    code, out, err = run_main(["serve", "--port", "0", "--no-resp", *args], capsys)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvmemo: error: ")


@pytest.mark.usefixtures("keep_logging")
def test_a_port_in_use_prints_one_error_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_main(["serve", "--port", str(port), "--no-resp"], capsys)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvmemo: error: ")
    assert f"cannot listen on 127.0.0.1:{port}: " in lines[0]


def test_the_process_exits_2_with_one_error_line_on_bad_configuration() -> None:
    done = subprocess.run(
        serve_command("--port", "0", "--no-resp", "--shards", "0"),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == "kvmemo: error: shards must be >= 1, got 0\n"


@attrs.define
class Running:
    process: trio.Process
    first_line: str
    port: int
    stdout_rest: bytes = b""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[int, list[str]]:
        """Send ``signum``; the exit code and the stderr lines."""
        self.process.send_signal(signum)
        return await self.finish()

    async def finish(self) -> tuple[int, list[str]]:
        assert self.process.stderr is not None
        err = b""
        with trio.fail_after(EXIT_TIMEOUT):
            while chunk := await self.process.stderr.receive_some(65536):
                err += chunk
            code = await self.process.wait()
        return code, err.decode().splitlines()


@asynccontextmanager
async def serve(*args: str, environ: dict[str, str] | None = None) -> AsyncIterator[Running]:
    process = await trio.lowlevel.open_process(
        serve_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ if environ is not None else env(),
    )
    try:
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in data:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"exited before its first line: {process.returncode}"
                data += chunk
        line, _, rest = data.partition(b"\n")
        first = line.decode()
        match = FIRST_LINE.match(first)
        assert match, first
        yield Running(process, first, int(match[1]), rest)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def rpc(ws: WebSocketConnection, rid: Any, method: str, *params: Any) -> None:
    request = {"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)}
    await ws.send_message(json.dumps(request))


async def test_first_line_names_the_real_port_and_port_0_picks_a_free_one() -> None:
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve("--port", "0", "--no-resp", "--shards", "2") as server:
            assert server.port != 0
            async with open_websocket_url(server.url) as ws:
                await rpc(ws, 1, "ping")
                assert json.loads(await ws.get_message())["result"] == "PONG"
            code, _ = await server.stop()
            assert code == 0


HAS_RESP = importlib.util.find_spec("kvmemo.server.resp_server") is not None


@pytest.mark.skipif(not HAS_RESP, reason="no Redis port in this build")
async def test_second_line_names_the_redis_port() -> None:
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve("--port", "0", "--resp-port", "0", "--shards", "2") as server:
            assert server.process.stdout is not None
            data = server.stdout_rest
            while b"\n" not in data:
                data += await server.process.stdout.receive_some(4096)
            line = data.partition(b"\n")[0].decode()
            match = re.fullmatch(r"KVMemo listening on redis://127\.0\.0\.1:(\d+)", line)
            assert match, line
            stream = await trio.open_tcp_stream("127.0.0.1", int(match[1]))
            await stream.send_all(b"PING\r\n")
            assert await stream.receive_some(100) == b"+PONG\r\n"
            await stream.aclose()
            code, _ = await server.stop()
            assert code == 0


@pytest.mark.skipif(not HAS_RESP, reason="no Redis port in this build")
@pytest.mark.usefixtures("keep_logging")
def test_a_redis_port_in_use_prints_one_error_line_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_main(["serve", "--port", "0", "--resp-port", str(port)], capsys)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert f"cannot listen on 127.0.0.1:{port}: " in lines[0]


async def test_toml_environment_and_flags_reach_the_running_server(tmp_path: Path) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_text('shards = 3\n[limits]\nmax_batch = 4\n[store]\neviction_policy = "lfu"\n')
    environ = env(KVMEMO_MAX_BATCH="6", KVMEMO_EVICTION_POLICY="fifo")
    args = ("--port", "0", "--no-resp", "--config", str(config), "--eviction-policy", "random")
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve(*args, environ=environ) as server:
            async with open_websocket_url(server.url) as ws:
                await rpc(ws, 1, "info")
                info = json.loads(await ws.get_message())["result"]
                assert info["server"]["shards"] == 3  # TOML
                assert info["memory"]["maxmemory_policy"] == "random"  # flag over environment
                assert info["memory"]["maxmemory"] == 256 * 1024 * 1024  # serve's default
                batch = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(6)]
                await ws.send_message(json.dumps(batch))
                assert len(json.loads(await ws.get_message())) == 6  # environment over TOML
                await ws.send_message(json.dumps([*batch, batch[0]]))
                assert json.loads(await ws.get_message())["error"]["data"]["kind"] == "TOO_LARGE"
            code, _ = await server.stop()
            assert code == 0


async def test_logs_are_json_lines_on_stderr() -> None:
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve("--port", "0", "--no-resp", "--shards", "2", "--log-level", "debug") as s:
            code, lines = await s.stop()
    assert code == 0
    assert lines, "no logs at all"
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    messages = [e["msg"] for e in entries]
    assert any(m.startswith("started: ws://127.0.0.1:") for m in messages)
    assert any("SIGTERM" in m for m in messages)
    assert messages[-1] == "stopped"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_in_flight_requests_finish_then_closes_sessions_with_1001(
    signum: int,
) -> None:
    messages, per_message = 4, 5_000
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve("--port", "0", "--no-resp", "--shards", "2") as server:
            async with (
                open_websocket_url(server.url) as idle,
                open_websocket_url(server.url, max_message_size=16 * 1024 * 1024) as ws,
            ):
                await rpc(idle, 1, "ping")
                await idle.get_message()
                # Same key: the four batches run one after another.
                for m in range(messages):
                    batch = [
                        {"jsonrpc": "2.0", "id": f"{m}:{i}", "method": "incr", "params": ["n"]}
                        for i in range(per_message)
                    ]
                    await ws.send_message(json.dumps(batch))
                await rpc(ws, "ping", "ping")
                answers: list[Any] = []
                while True:  # the ping comes back while the batches are still running
                    answer = json.loads(await ws.get_message())
                    if isinstance(answer, dict) and answer["id"] == "ping":
                        break
                    answers.append(answer)
                assert len(answers) < messages  # so some were in flight at the signal
                server.process.send_signal(signum)
                code = None
                while True:
                    try:
                        answers.append(json.loads(await ws.get_message()))
                    except ConnectionClosed as exc:
                        code = exc.reason.code if exc.reason is not None else None
                        break
                assert code == 1001
                assert len(answers) == messages
                results = sorted(r["result"] for batch in answers for r in batch)
                assert results == list(range(1, messages * per_message + 1))
                idle_code = None
                try:
                    await idle.get_message()
                except ConnectionClosed as exc:
                    idle_code = exc.reason.code if exc.reason is not None else None
                assert idle_code == 1001
            exit_code, lines = await server.finish()
            assert exit_code == 0, lines


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_serve_without_flags_binds_127_0_0_1_port_7070() -> None:
    if not _port_free(7070):
        pytest.skip("127.0.0.1:7070 is busy")
    args: list[str] = []
    if not HAS_RESP or not _port_free(6380):
        args = ["--no-resp"]  # the Redis port is someone else's business here
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with serve(*args) as server:
            assert server.first_line == "KVMemo listening on ws://127.0.0.1:7070/ws"
            code, _ = await server.stop(signal.SIGINT)
            assert code == 0
