"""What an operator meets: settings named as given, a port that survives
running out of descriptors, a peer that never reads, the tools' bad flags.

Each test is the regression test of one defect found by reviewing
``kvmemo serve`` and its tools as a new user and an operator would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_cli import (  # the same in-process helpers
    finish,
    keep_logging,  # noqa: F401 - a fixture, used by name
    resolved,
    run_main,
)
from trio_websocket import open_websocket_url
from ws_raw import client_frame, raw_session

from kvmemo.config import StoreConfig
from kvmemo.node import open_node
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 20  # seconds per test


# -- configuration errors name the setting as the operator gave it -----------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Was "idle_timeout must be >= 0": the WebSocket setting's name.
        (["--resp-idle-timeout", "-1"], r"^resp_idle_timeout must be >= 0, got -1\.0$"),
        (["--resp-max-clients", "0"], r"^resp_max_clients must be >= 1, got 0$"),
        (["--dir", ""], r"^dir must not be empty$"),
        # Was "ttl_tick must be > 0, got 0.0" / "oom_wait ... got -0.001": seconds.
        (["--ttl-tick-ms", "0"], r"^invalid --ttl-tick-ms: expected a positive number of milli"),
        (["--oom-wait-ms", "-1"], r"^invalid --oom-wait-ms: .* got '-1'$"),
        (["--idle-timeout", "-1"], r"^idle_timeout must be >= 0, got -1\.0$"),
        (["--max-output-buffer", "0"], r"^max_output_buffer must be >= 1, got 0$"),
        (["--output-timeout", "0"], r"^output_timeout must be > 0, got 0\.0$"),
    ],
)
def test_a_bad_value_is_refused_naming_its_own_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolved(argv)


def test_the_two_ports_must_differ() -> None:
    # Was: "cannot listen on 127.0.0.1:N: Address already in use", about the node's own port.
    with pytest.raises(ValueError, match=r"^port and resp_port must differ, got 7000 for both$"):
        resolved(["--port", "7000", "--resp-port", "7000"])
    assert resolved(["--port", "7000", "--resp-port", "7000", "--no-resp"]).server.port == 7000
    assert resolved(["--port", "0", "--resp-port", "0"]).server.resp_port == 0


def test_a_config_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "kvmemo.toml"
    config.write_bytes(b"\xff\xfeshards = 4\n")
    with pytest.raises(ValueError, match=r"kvmemo\.toml is not valid TOML: not UTF-8"):
        resolved(["--config", str(config)])


@pytest.mark.parametrize("value", ["5", "[1]", '["a", {x = 1}]'])
def test_tokens_and_origins_in_a_config_file_must_be_strings(tmp_path: Path, value: str) -> None:
    config = tmp_path / "kvmemo.toml"
    for name in ("auth_token", "allowed_origin"):
        config.write_text(f"{name} = {value}\n")
        with pytest.raises(ValueError, match=rf"{name}: expected a string, got "):
            resolved(["--config", str(config)])
    config.write_text('auth_token = ["a", "b,c"]\n')
    # An item is one token, comma included (it was split; see test_config_s21.py).
    assert resolved(["--config", str(config)]).server.tokens == frozenset({"a", "b,c"})


def test_the_output_limit_of_a_session_is_a_setting() -> None:
    r = resolved([])
    assert (r.server.max_output_buffer, r.server.output_timeout) == (64 * 1024 * 1024, 10.0)
    r = resolved(["--max-output-buffer", "1MiB"], {"KVMEMO_OUTPUT_TIMEOUT": "2.5"})
    assert (r.server.max_output_buffer, r.server.output_timeout) == (1024 * 1024, 2.5)


@pytest.mark.usefixtures("keep_logging")
def test_a_port_in_use_is_one_line_without_errno(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_main(["serve", "--port", str(port), "--no-resp"], capsys)
    assert (code, out) == (2, "")
    assert err == f"kvmemo: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# -- the tools' bad flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["chaos", "--kill-rate", "-1"], 2, "kvmemo: error: --kill-rate must be >= 0, got -1\n"),
        (["chaos", "--shards", "0"], 2, "kvmemo: error: --shards must be >= 1, got 0\n"),
        (["chaos", "--keys", "0"], 2, "kvmemo: error: --keys must be >= 1, got 0\n"),
        (
            ["chaos", "--url", "bogus", "--duration", "1"],
            2,
            "kvmemo: error: --url must be a ws:// or wss:// URL, got 'bogus'\n",
        ),
        (
            ["cli", "--url", "http://127.0.0.1:1/", "-c", "PING"],
            2,
            "kvmemo: error: --url must be a ws:// or wss:// URL, got 'http://127.0.0.1:1/'\n",
        ),
        # The same check as kvmemo bench's (was: a traceback from urllib).
        (
            ["cli", "--url", "ws://127.0.0.1:99999/ws", "-c", "PING"],
            2,
            "kvmemo: error: --url has a bad port, got 'ws://127.0.0.1:99999/ws'\n",
        ),
        (
            ["chaos", "--url", "ws://127.0.0.1:x/ws", "--duration", "1"],
            2,
            "kvmemo: error: --url has a bad port, got 'ws://127.0.0.1:x/ws'\n",
        ),
    ],
)
def test_a_tools_bad_flag_is_one_error_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    got, out, err = run_main([*argv, "--no-progress"] if argv[0] == "chaos" else argv, capsys)
    assert (got, out, err) == (code, "", message)


# -- the WebSocket/HTTP port keeps accepting when descriptors run out --------------------


async def http_status(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[0]


async def test_running_out_of_descriptors_does_not_close_the_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: the accept loop returned on any OSError, closing the port for good
    # (connections refused) while the process went on running.
    failures = 3
    accept = trio.SocketListener.accept

    async def failing_accept(self: trio.SocketListener) -> trio.SocketStream:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", failing_accept)
    config = ServerConfig(host="127.0.0.1", port=0, resp=False)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=1), config) as running:
            assert running.server.bound is not None
            port = running.server.bound[1]
            assert await http_status(port, "/healthz") == b"HTTP/1.1 200 OK"
            assert failures == 0
            assert await http_status(port, "/healthz") == b"HTTP/1.1 200 OK"


# -- a peer that never reads its responses ------------------------------------------------


async def test_a_peer_that_never_reads_is_disconnected_and_others_are_served() -> None:
    # Was: the session stopped reading past a fixed 64 MiB (not a setting) and
    # then held its memory (one pass of requests' responses on top) forever.
    value = "v" * 65536
    config = ServerConfig(
        host="127.0.0.1", port=0, resp=False, max_output_buffer=65536, output_timeout=0.5
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_node(StoreConfig(shards=2), config) as running,
            open_websocket_url(running.url) as other,
        ):
            await other.send_message(
                json.dumps({"jsonrpc": "2.0", "id": 1, "method": "set", "params": ["big", value]})
            )
            assert json.loads(await other.get_message())["result"] == "OK"
            assert running.server.bound is not None
            port = running.server.bound[1]
            sessions = set(running.server.sessions)  # the other one
            silent = await raw_session(port)
            request = client_frame('{"jsonrpc":"2.0","id":2,"method":"get","params":["big"]}')
            async with trio.open_nursery() as nursery:

                async def flood() -> None:
                    try:
                        while True:  # blocks once the server stops reading
                            await silent.send_all(request * 16)
                    except trio.BrokenResourceError:
                        pass  # dropped by the server

                nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked()
                silent_sessions = [s for s in running.server.sessions if s not in sessions]
                assert len(silent_sessions) == 1
                await silent_sessions[0]._ended.wait()
                nursery.cancel_scope.cancel()
            await silent.aclose()
            assert silent_sessions[0] not in running.server.sessions
            # The other session, its data and the server are untouched.
            await other.send_message(
                json.dumps({"jsonrpc": "2.0", "id": 3, "method": "get", "params": ["big"]})
            )
            assert json.loads(await other.get_message())["result"] == value


# -- a data directory that cannot be one ---------------------------------------------------


async def test_a_data_directory_that_is_a_file_refuses_to_start(tmp_path: Path) -> None:
    # Was: the node started, every write answered IO ("Not a directory") for good.
    (tmp_path / "file").write_bytes(b"")
    config = ServerConfig(host="127.0.0.1", port=0, resp=False)
    for directory in (tmp_path / "file", tmp_path / "file" / "data"):
        store = StoreConfig(shards=1, data_dir=str(directory))
        with (
            trio.fail_after(TEST_TIMEOUT),
            pytest.raises(OSError, match=r"^\[Errno \d+\] cannot use data directory ") as caught,
        ):
            async with open_node(store, config):
                pytest.fail("the node started")
        assert caught.value.strerror == f"cannot use data directory {directory}: Not a directory"
    store = StoreConfig(shards=1, data_dir=str(tmp_path / "new" / "data"))
    async with open_node(store, config):
        assert (tmp_path / "new" / "data").is_dir()  # a missing one is made, as before


@pytest.mark.usefixtures("keep_logging")
def test_serve_with_a_file_as_data_directory_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_bytes(b"")
    argv = ["serve", "--port", "0", "--no-resp", "--dir", str(tmp_path / "file")]
    code, out, err = run_main(argv, capsys)
    assert (code, out) == (2, "")
    assert err == f"kvmemo: error: cannot use data directory {tmp_path / 'file'}: Not a directory\n"


# -- a second signal while the node stops ---------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_shutdown_changes_nothing(tmp_path: Path, second: int) -> None:
    # Was: the second signal was redelivered once the node had stopped: a
    # KeyboardInterrupt traceback (exit -2) or a death by SIGTERM (exit -15).
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "kvmemo", "serve", "--port", "0", "--resp-port", "0"]
    command += ["--shards", "2", "--dir", str(tmp_path / "data")]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("KVMemo listening on ws://")
        assert process.stdout.readline().startswith("KVMemo listening on redis://")
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        first_lines = []
        if second == signal.SIGINT:  # the same signal twice at once would be taken as one
            while "shutting down" not in (line := process.stderr.readline()):
                assert line, "the process ended without shutting down"
                first_lines.append(line)
            first_lines.append(line)
        process.send_signal(second)  # the node is still stopping
        code, out, err = finish(process, TEST_TIMEOUT)
        err = "".join(first_lines) + err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert code == 0, err
    assert "Traceback" not in err
    messages = [json.loads(line)["msg"] for line in err.splitlines()]
    assert "SIGINT: shutting down" in messages
    assert messages[-1] == "stopped"
