"""A fresh user's audit of ``kvmemo cli`` (and ``bench``, the client, the unknown-method error).

1. A URL without ``/ws`` is told in one line (not the server's headers and page).
2. Connection refused reads the same in every tool, and the cli prints it on stderr.
3. A reader that goes away (``| head``) ends the tool silently (141), no traceback.
4. ``help`` covers every word the prompt accepts, from the table that dispatches them.
5. ``KVMEMO_URL`` is the tools' default URL; ``--url`` wins; a bad one is a clear error.
6. ``{"method": "GET"}`` is told that methods are lower case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from test_cli import env, run_main
from test_client_reconnect import Restartable
from trio_websocket import ConnectionRejected, open_websocket_url

from kvmemo import cli, client, repl, tooling
from kvmemo.client import DisconnectedError, connect, connect_failure, session_url
from kvmemo.commands.table import COMMANDS
from kvmemo.config import StoreConfig
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig
from kvmemo.server.session import OWN_METHODS

TIMEOUT = 30  # seconds for a test, node start (and a subprocess's start) included
PAGE = "the server answered HTTP 200, not a WebSocket handshake (is the path /ws?)"


@asynccontextmanager
async def node(**server: Any) -> AsyncIterator[Node]:
    with trio.fail_after(TIMEOUT):
        async with open_node(
            StoreConfig(shards=2), ServerConfig(port=0, resp=False, **server)
        ) as n:
            yield n


async def closed_port_url() -> str:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    return f"ws://127.0.0.1:{port}/ws"


async def main_in_thread(argv: list[str]) -> int:
    """``kvmemo.cli.main`` (which runs its own trio loop) from inside a trio test."""
    code: int = await trio.to_thread.run_sync(cli.main, argv)
    return code


# -- 1. a page instead of the session URL ----------------------------------------------------


async def test_connecting_to_a_page_says_the_path_is_wrong_not_what_the_page_holds() -> None:
    # Was: "cannot connect to ...: (200, ((b'content-type', ...), ...), b'<!doctype html>...')".
    async with node() as n:
        url = n.url.removesuffix("ws")
        with pytest.raises(DisconnectedError) as failed:
            async with connect(url):
                pass
    assert str(failed.value) == f"cannot connect to {url}: {PAGE}"


async def test_cli_and_bench_give_the_same_reason_for_a_page(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with node() as n:
        url = n.url.removesuffix("ws")
        cli_code = await main_in_thread(["cli", "--url", url, "-c", "PING"])
        cli_err = capsys.readouterr().err
        bench_code = await main_in_thread(["bench", "--url", url, "--no-progress"])
        bench_err = capsys.readouterr().err
    assert (cli_code, bench_code) == (1, 1)
    assert cli_err == f"(error) DISCONNECTED cannot connect to {url}: {PAGE}\n"
    assert bench_err == f"kvmemo: error: cannot connect to {url}: {PAGE}\n"


async def test_a_refused_handshake_gives_the_servers_one_line_reason() -> None:
    async with node(tokens=frozenset({"s3cret"})) as n:
        url = n.url + "?token=wrong"
        with pytest.raises(DisconnectedError) as failed:
            async with connect(url):
                pass
    assert str(failed.value) == (
        f"cannot connect to {url}: the server refused the WebSocket handshake: "
        "HTTP 403 (invalid token)"
    )


def test_connect_failure_never_shows_headers_or_a_page() -> None:
    page = ConnectionRejected(404, ((b"content-type", b"text/html"),), b"<html>" + b"x" * 4000)
    assert connect_failure(page) == (
        "the server answered HTTP 404, not a WebSocket handshake (is the path /ws?)"
    )
    long_refusal = ConnectionRejected(403, (), b"<html>" + b"x" * 4000)
    assert connect_failure(long_refusal) == "the server refused the WebSocket handshake: HTTP 403"


# -- 2. connection refused -------------------------------------------------------------------


async def test_a_refused_connection_reads_connection_refused() -> None:
    # Was: "cannot connect to ...: OSError: all attempts to connect to 127.0.0.1:N failed".
    url = await closed_port_url()
    with trio.fail_after(TIMEOUT), pytest.raises(DisconnectedError) as failed:
        async with connect(url):
            pass
    assert str(failed.value) == f"cannot connect to {url}: Connection refused"


async def test_cli_prints_a_connection_failure_on_stderr_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Was: on stdout, with trio's "OSError: all attempts to connect ... failed".
    url = await closed_port_url()
    with trio.fail_after(TIMEOUT):
        code = await main_in_thread(["cli", "--url", url, "-c", "PING"])
    captured = capsys.readouterr()
    assert (code, captured.out) == (1, "")
    assert captured.err == f"(error) DISCONNECTED cannot connect to {url}: Connection refused\n"
    with trio.fail_after(TIMEOUT):
        bench = await main_in_thread(["bench", "--url", url, "--no-progress"])
    assert (bench, capsys.readouterr().err) == (
        1,
        f"kvmemo: error: cannot connect to {url}: Connection refused\n",
    )


async def test_cli_keeps_error_replies_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    async with node() as n:
        code = await main_in_thread(["cli", "--url", n.url, "-c", "INCR"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (1, "")
    assert captured.out.startswith("(error) ARITY ")


async def test_a_connection_lost_at_the_prompt_is_reported_on_the_error_writer() -> None:
    out: list[str] = []
    errors: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = Restartable(nursery)
            await server.start()

            def read_line(prompt: str) -> str:
                trio.from_thread.run(server.stop)  # the server goes away before the command
                return "PING"

            args = argparse.Namespace(url=server.url, token=None, one_command=None)
            status = await repl.main_async(
                args,
                read_line=read_line,
                write=out.append,
                write_error=errors.append,
                show_prompt=False,
            )
            nursery.cancel_scope.cancel()
    assert status == 1
    assert out == []
    assert len(errors) == 1
    assert errors[0].startswith("(error) DISCONNECTED ")


# -- 3. a reader that goes away --------------------------------------------------------------


async def run_into_a_closed_pipe(argv: list[str]) -> tuple[int, bytes]:
    """Run ``kvmemo ARGV`` with its stdout a pipe nobody reads: (status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already exited: every write fails (EPIPE)
    try:
        with trio.fail_after(TIMEOUT):
            done = await trio.run_process(
                [sys.executable, "-m", "kvmemo", *argv],
                stdout=write_end,
                capture_stderr=True,
                check=False,
                env=env(),
            )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


async def test_cli_output_into_a_closed_pipe_ends_silently_with_141() -> None:
    # Was: a BrokenPipeError traceback, status 1.
    async with node() as n:
        status, stderr = await run_into_a_closed_pipe(["cli", "--url", n.url, "-c", "DEBUG.ACTORS"])
    assert (status, stderr) == (tooling.EXIT_BROKEN_PIPE, b"")


async def test_bench_output_into_a_closed_pipe_ends_silently_with_141() -> None:
    async with node() as n:
        argv = ["bench", "--url", n.url, "--duration", "0.2", "--warmup", "0", "--sessions", "1"]
        status, stderr = await run_into_a_closed_pipe([*argv, "--keys", "10", "--no-progress"])
    assert (status, stderr) == (141, b"")


def test_quiet_on_broken_pipe_takes_a_group_of_broken_pipes_only() -> None:
    def broken() -> int:
        raise BaseExceptionGroup("nursery", [BrokenPipeError()])

    assert tooling.quiet_on_broken_pipe(broken) == 141

    def other() -> int:
        raise BaseExceptionGroup("nursery", [BrokenPipeError(), KeyError("x")])

    with pytest.raises(BaseExceptionGroup):
        tooling.quiet_on_broken_pipe(other)


# -- 4. help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["SUBSCRIBE", "psubscribe", "MULTI", "exec", "discard", "watch"])
def test_help_describes_the_words_of_the_prompt(word: str) -> None:
    # Was: "no command named 'SUBSCRIBE'; type help for the list".
    text = repl.help_text(word)
    assert text.startswith(word.upper())
    assert "no command named" not in text


def test_help_covers_every_method_of_the_server_and_every_word_of_the_prompt() -> None:
    words = set(COMMANDS) | OWN_METHODS | set(repl.PROMPT_COMMANDS)
    listing = repl.help_text()
    listed = {line.split()[0].lower() for line in listing.splitlines() if line.startswith("  ")}
    assert words <= listed
    for word in words:
        assert not repl.help_text(word).startswith("no command named"), word


def test_the_prompt_table_holds_every_method_outside_the_command_table() -> None:
    # The server's own methods are dispatched (and described) by the prompt's table.
    assert set(OWN_METHODS) <= set(repl.PROMPT_COMMANDS)
    assert not set(repl.PROMPT_COMMANDS) & set(COMMANDS)


async def _prompt_session(typed: list[str]) -> tuple[int, list[str]]:
    """Type ``typed`` at the interactive prompt of a fresh node: (status, lines written)."""
    lines = iter(typed)

    def read_line(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    out: list[str] = []
    async with node() as n:
        args = argparse.Namespace(url=n.url, token=None, one_command=None)
        status = await repl.main_async(
            args, read_line=read_line, write=out.append, show_prompt=False
        )
    return status, out


async def test_subscribe_without_a_channel_at_the_prompt_does_not_end_it() -> None:
    # Was: the arity error ended the prompt with status 1.
    status, out = await _prompt_session(["subscribe", "transaction get k", "ping"])
    assert status == 0
    assert out == [
        "(error) ARITY wrong number of arguments for 'subscribe' command",
        "(error) SYNTAX TRANSACTION takes arrays of calls; at this prompt type MULTI, "
        "the commands, then EXEC",
        "PONG",
    ]


async def test_inside_multi_the_prompts_own_words_are_refused_and_abort_exec() -> None:
    status, out = await _prompt_session(
        ["multi", "subscribe news", "unsubscribe", "set k v", "exec", "get k"]
    )
    assert status == 0
    assert out == [
        "OK",
        "(error) SYNTAX SUBSCRIBE inside MULTI is not allowed",
        "(error) SYNTAX UNSUBSCRIBE inside MULTI is not allowed",
        "QUEUED",
        "(error) EXECABORT Transaction discarded because of previous errors.",
        "(nil)",
    ]


# -- 5. KVMEMO_URL ---------------------------------------------------------------------------


def test_session_url_prefers_the_flag_then_the_environment() -> None:
    assert session_url(environ={}) == client.DEFAULT_URL == "ws://127.0.0.1:7070/ws"
    assert session_url(environ={"KVMEMO_URL": "ws://h:1/ws"}) == "ws://h:1/ws"
    assert session_url("ws://g:2/ws", environ={"KVMEMO_URL": "nonsense"}) == "ws://g:2/ws"
    with pytest.raises(ValueError, match=r"^KVMEMO_URL must be a ws:// or wss:// URL, got ''$"):
        session_url(environ={"KVMEMO_URL": ""})
    with pytest.raises(ValueError, match=r"^--url has no host, got 'ws:///ws'$"):
        session_url("ws:///ws", environ={})


async def test_cli_takes_its_url_from_kvmemo_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: KVMEMO_URL ignored, the cli went to ws://127.0.0.1:7070/ws.
    async with node() as n:
        monkeypatch.setenv("KVMEMO_URL", n.url)
        code = await main_in_thread(["cli", "-c", "DBSIZE"])
    assert (code, capsys.readouterr().out) == (0, "(integer) 0\n")


async def test_an_explicit_url_wins_over_kvmemo_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMEMO_URL", await closed_port_url())
    async with node() as n:
        code = await main_in_thread(["cli", "--url", n.url, "-c", "PING"])
    assert (code, capsys.readouterr().out) == (0, "PONG\n")


async def test_bench_takes_its_url_from_kvmemo_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with node() as n:
        monkeypatch.setenv("KVMEMO_URL", n.url)
        argv = ["bench", "--duration", "0.2", "--warmup", "0", "--sessions", "1", "--keys", "10"]
        code = await main_in_thread([*argv, "--json", "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["url"] == n.url


@pytest.mark.parametrize("tool", ["cli", "bench"])
def test_a_bad_kvmemo_url_is_one_error_line_naming_it(
    tool: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVMEMO_URL", "http://127.0.0.1:7070/ws")
    code, out, err = run_main([tool], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "kvmemo: error: KVMEMO_URL must be a ws:// or wss:// URL, got 'http://127.0.0.1:7070/ws'\n"
    )


def test_a_bad_kvmemo_url_does_not_stop_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMEMO_URL", "nonsense")
    args = cli.build_parser().parse_args(["bench"])
    assert args.url == client.DEFAULT_URL  # the environment is read when the tool runs


# -- 6. methods are lower case ---------------------------------------------------------------


async def test_an_upper_case_method_is_told_methods_are_lower_case() -> None:
    # Was: "unknown method 'GET'", with no hint.
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "GET", "params": ["k"]},
        {"jsonrpc": "2.0", "id": 2, "method": "Subscribe", "params": ["c"]},
        {"jsonrpc": "2.0", "id": 3, "method": "NOPE"},
        {"jsonrpc": "2.0", "id": 4, "method": "transaction", "params": [["SET", "k", "v"]]},
        {"jsonrpc": "2.0", "id": 5, "method": "transaction", "params": [["AUTH", "t"]]},
    ]
    async with node() as n, open_websocket_url(n.url) as ws:
        answers = []
        for request in requests:
            await ws.send_message(json.dumps(request))
            answers.append(json.loads(await ws.get_message())["error"])
    assert [(a["code"], a["data"]["kind"]) for a in answers] == [(-32601, "UNKNOWN_METHOD")] * 5
    assert [a["message"] for a in answers] == [
        "unknown method 'GET' (methods are lower case: 'get')",
        "unknown method 'Subscribe' (methods are lower case: 'subscribe')",
        "unknown method 'NOPE'",
        "unknown method 'SET' in a transaction (methods are lower case: 'set')",
        "unknown method 'AUTH' in a transaction",  # a session method: not in a transaction
    ]
    assert answers[3]["data"]["index"] == 0
