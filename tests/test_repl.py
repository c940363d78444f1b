"""``kvmemo cli``: the tokenizer and formatter as pure functions, then end to end."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

import kvmemo.client
from kvmemo import repl
from kvmemo.config import StoreConfig
from kvmemo.errors import CommandSyntaxError, NotIntegerError
from kvmemo.node import Node, open_node
from kvmemo.server.config import ServerConfig

TEST_TIMEOUT = 30  # seconds for a whole test, node start included

# -- tokenize --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        ("SET k v EX 10", [b"SET", b"k", b"v", b"EX", b"10"]),
        ("  get   k  ", [b"get", b"k"]),
        ("\tget\tk", [b"get", b"k"]),
        ("", []),
        ("   ", []),
        ('set k "hello world"', [b"set", b"k", b"hello world"]),
        ("set k 'hello world'", [b"set", b"k", b"hello world"]),
        ('set k ""', [b"set", b"k", b""]),
        ("set k ''", [b"set", b"k", b""]),
        ('set k "a\\nb\\tc\\r\\a\\b"', [b"set", b"k", b"a\nb\tc\r\a\b"]),
        ('set k "quote \\" and \\\\"', [b"set", b"k", b'quote " and \\']),
        ('set k "\\x00\\xff\\x41"', [b"set", b"k", b"\x00\xffA"]),
        ('set k "\\xZZ"', [b"set", b"k", b"xZZ"]),
        ('set k "\\q"', [b"set", b"k", b"q"]),
        ("set k 'it\\'s'", [b"set", b"k", b"it's"]),
        ("set k 'raw \\n \"x\"'", [b"set", b"k", b'raw \\n "x"']),
        ("set k a\\nb", [b"set", b"k", b"a\\nb"]),
        ('set key"with space" v', [b"set", b"keywith space", b"v"]),
        ("set 'a'\"b\"c v", [b"set", b"abc", b"v"]),
        ("set k ключ✓", [b"set", b"k", "ключ✓".encode()]),
    ],
)
def test_tokenize_follows_redis_cli_quoting(line: str, tokens: list[bytes]) -> None:
    assert repl.tokenize(line) == tokens


@pytest.mark.parametrize("line", ['set k "open', "set k 'open", 'set k "ends with \\"'])
def test_tokenize_refuses_unbalanced_quotes(line: str) -> None:
    with pytest.raises(ValueError, match=r"^unbalanced quotes$"):
        repl.tokenize(line)


# -- format_reply ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (b"value", '"value"'),
        (b"", '""'),
        (b'say "hi"\n\\', '"say \\"hi\\"\\n\\\\"'),
        (b"\x00\x01\xff", '"\\x00\\x01\\xff"'),
        ("ключ".encode(), '"ключ"'),
        ("OK", "OK"),
        ("PONG", "PONG"),
        ("none", "none"),
        (1, "(integer) 1"),
        (-2, "(integer) -2"),
        (None, "(nil)"),
        (1.5, "(double) 1.5"),
        (True, "(true)"),
        ([], "(empty array)"),
        ([b"a", None, 3], '1) "a"\n2) (nil)\n3) (integer) 3'),
        ([b"0", [b"k1", b"k2"]], '1) "0"\n2) 1) "k1"\n   2) "k2"'),
        ({"name": b"x", "n": 1}, '1# "name" => "x"\n2# "n" => (integer) 1'),
    ],
)
def test_format_reply_prints_like_redis_cli(value: object, text: str) -> None:
    assert repl.format_reply(value) == text


def test_format_reply_right_aligns_indexes_of_long_arrays() -> None:
    lines = repl.format_reply([str(i).encode() for i in range(10)]).split("\n")
    assert lines[0] == ' 1) "0"'
    assert lines[9] == '10) "9"'


def test_format_reply_indents_nested_arrays_under_wide_indexes() -> None:
    value: list[object] = [b"x"] * 9 + [[b"a", b"b"]]
    assert repl.format_reply(value).split("\n")[-2:] == ['10) 1) "a"', '    2) "b"']


def test_format_reply_shows_info_as_sections_of_fields() -> None:
    info = {"server": {"version": "0.1.0", "shards": 4}, "keyspace": {"shards": [1, 2]}}
    assert repl.format_reply(info, "INFO") == (
        "# server\nversion:0.1.0\nshards:4\n\n# keyspace\nshards:[1,2]"
    )


def test_format_reply_quotes_the_strings_of_debug_actors() -> None:
    actors = [{"name": "shard-0", "restarts": 0}]
    assert repl.format_reply(actors, "debug.actors") == (
        '1) 1# "name" => "shard-0"\n   2# "restarts" => (integer) 0'
    )


def test_format_error_shows_kind_and_message() -> None:
    assert repl.format_error(NotIntegerError("value is not an integer")) == (
        "(error) NOT_INTEGER value is not an integer"
    )
    assert repl.format_error(CommandSyntaxError("syntax error")) == "(error) SYNTAX syntax error"


def test_prompt_shows_host_and_port() -> None:
    assert repl.prompt_for("ws://127.0.0.1:7070/ws") == "127.0.0.1:7070> "


def test_help_describes_one_command() -> None:
    text = repl.help_text("get")
    assert text.startswith("GET: ")
    assert "exactly 1 argument\n" in text
    assert "at least 2 arguments" in repl.help_text("SET")
    assert repl.help_text("nope") == "no command named 'nope'; type help for the list"
    assert "MSETNX" in repl.help_text()


# -- the subcommand --------------------------------------------------------------------------


def test_add_parser_defines_the_flags() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    repl.add_parser(sub)
    args = parser.parse_args(["cli", "-c", "GET k", "--token", "t"])
    assert (args.url, args.token, args.one_command) == ("ws://127.0.0.1:7070/ws", "t", "GET k")
    args = parser.parse_args(["cli", "--command", "PING", "--url", "ws://h:1/ws"])
    assert (args.url, args.token, args.one_command) == ("ws://h:1/ws", None, "PING")


def test_the_kvmemo_command_line_runs_cli_with_c() -> None:
    from kvmemo.cli import build_parser

    args = build_parser().parse_args(["cli", "-c", "GET k"])
    assert args.command == "cli"  # the subcommand's name is not overwritten
    assert args.one_command == "GET k"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_node(StoreConfig(shards=2), ServerConfig(port=0, resp=False)) as running:
            yield running


def _args(node: Node, command: str | None) -> argparse.Namespace:
    return argparse.Namespace(url=node.url, token=None, one_command=command)


async def test_one_command_with_c_prints_its_reply_and_exits_zero(node: Node) -> None:
    out: list[str] = []
    assert await repl.main_async(_args(node, 'SET greeting "hello world"'), write=out.append) == 0
    assert await repl.main_async(_args(node, "GET greeting"), write=out.append) == 0
    assert await repl.main_async(_args(node, "MGET greeting nothing"), write=out.append) == 0
    assert out == ["OK", '"hello world"', '1) "hello world"\n2) (nil)']


async def test_an_error_reply_with_c_is_printed_and_exits_one(node: Node) -> None:
    out: list[str] = []
    assert await repl.main_async(_args(node, "SET n abc"), write=out.append) == 0
    assert await repl.main_async(_args(node, "INCR n"), write=out.append) == 1
    assert out[-1] == "(error) NOT_INTEGER value is not an integer or out of range"


async def test_the_prompt_runs_lines_until_quit(node: Node) -> None:
    lines = iter(["", "set k 1", "incr k", "help get", "exit", "never read"])
    prompts: list[str] = []
    out: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    status = await repl.main_async(_args(node, None), read_line=read_line, write=out.append)
    assert status == 0
    assert out[:2] == ["OK", "(integer) 2"]
    assert out[2].startswith("GET: ")
    assert len(out) == 3
    assert prompts == [repl.prompt_for(node.url)] * 5


async def test_the_prompt_ends_at_end_of_input(node: Node) -> None:
    def read_line(prompt: str) -> str:
        raise EOFError

    out: list[str] = []
    assert await repl.main_async(_args(node, None), read_line=read_line, write=out.append) == 0
    assert out == [""]  # the prompt's line is ended


async def test_piped_input_runs_without_prompt(node: Node) -> None:
    lines = iter(["set k v", "get k"])
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out: list[str] = []
    status = await repl.main_async(
        _args(node, None), read_line=read_line, write=out.append, show_prompt=False
    )
    assert status == 0
    assert out == ["OK", '"v"']
    assert prompts == ["", "", ""]


async def test_a_server_that_cannot_be_reached_is_reported() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    url = f"ws://127.0.0.1:{port}/ws"
    out: list[str] = []
    args = argparse.Namespace(url=url, token=None, one_command="PING")
    with trio.fail_after(TEST_TIMEOUT):
        assert await repl.main_async(args, write=out.append) == 1
    assert out[0].startswith(f"(error) DISCONNECTED cannot connect to {url}: ")


async def test_the_prompt_keeps_history_in_the_given_file(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readline = pytest.importorskip("readline")
    history = tmp_path / "history"
    saved: list[str] = []
    monkeypatch.setattr(readline, "write_history_file", lambda path: saved.append(str(path)))
    monkeypatch.setattr(readline, "read_history_file", lambda path: None)
    lines = iter(["ping", "quit"])

    def read_line(prompt: str) -> str:
        return next(lines)

    out: list[str] = []
    status = await repl.main_async(
        _args(node, None), read_line=read_line, write=out.append, history=history
    )
    assert status == 0
    assert out == ["PONG"]
    assert saved == [str(history)]


async def test_multi_queues_lines_and_exec_prints_each_reply_in_place(node: Node) -> None:
    lines = iter(
        [
            "set text abc",
            "multi",
            "set a 1",
            "incr a",
            "incr text",
            "exec",
            "exec",
            "multi",
            "set a 2",
            "discard",
            "get a",
            "quit",
        ]
    )
    prompts: list[str] = []
    out: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    assert await repl.main_async(_args(node, None), read_line=read_line, write=out.append) == 0
    assert out == [
        "OK",
        "OK",
        "QUEUED",
        "QUEUED",
        "QUEUED",
        "1) OK\n2) (integer) 2\n3) (error) NOT_INTEGER value is not an integer or out of range",
        "(error) SYNTAX EXEC without MULTI",
        "OK",
        "QUEUED",
        "OK",
        '"2"',  # the discarded SET never ran
    ]
    base = repl.prompt_for(node.url)
    tx = base[:-2] + "(TX)> "
    assert prompts == [base, base, tx, tx, tx, tx, base, base, tx, tx, base, base]


async def test_watch_at_the_prompt_makes_exec_nil_when_another_client_writes(node: Node) -> None:
    async with kvmemo.client.connect(node.url) as other:
        lines = iter(["watch w", "multi", "set w mine", "exec", "get w", "quit"])
        out: list[str] = []

        async def run() -> int:
            def read_line(prompt: str) -> str:
                line = next(lines)
                if line == "exec":
                    trio.from_thread.run(other.set, "w", "theirs")
                return line

            return await repl.main_async(_args(node, None), read_line=read_line, write=out.append)

        assert await run() == 0
    assert out == ["OK", "OK", "QUEUED", "(nil)", '"theirs"']


async def test_the_prompt_refuses_bad_lines_in_multi_and_queues_unwatch(node: Node) -> None:
    slots = node.engine.slots
    other = next(
        f"b{i}" for i in range(100) if slots.shard_of(f"b{i}".encode()) != slots.shard_of(b"a")
    )
    lines = iter(
        [
            "multi",
            "get",
            "nosuch k",
            "set a 1",
            "exec",
            "multi",
            "unwatch",
            "set a 2",
            "exec",
            "multi",
            f"rename a {other}",
            "exec",
            "quit",
        ]
    )
    out: list[str] = []
    status = await repl.main_async(
        _args(node, None), read_line=lambda prompt: next(lines), write=out.append
    )
    assert status == 0
    assert out[:5] == [
        "OK",
        "(error) ARITY wrong number of arguments for 'get' command",
        "(error) UNKNOWN_METHOD unknown command 'nosuch'",
        "QUEUED",
        "(error) EXECABORT Transaction discarded because of previous errors.",
    ]
    assert out[5:9] == ["OK", "QUEUED", "QUEUED", "1) OK\n2) OK"]
    assert out[9:11] == ["OK", "QUEUED"]
    assert out[11].startswith("(error) SYNTAX RENAME in a transaction needs all its keys")
    assert out[11].endswith("(command 1)")


async def test_multi_with_c_says_it_needs_the_prompt(node: Node) -> None:
    out: list[str] = []
    assert await repl.main_async(_args(node, "MULTI"), write=out.append) == 1
    assert out == ["(error) SYNTAX MULTI works at the interactive prompt (kvmemo cli)"]


async def test_subscribe_with_c_prints_confirmations_then_messages_as_redis_cli(
    node: Node,
) -> None:
    out: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            args = _args(node, "SUBSCRIBE news alerts")
            nursery.start_soon(partial(repl.main_async, args, write=out.append))
            while node.engine.pubsub.numsub([b"alerts"]) != [(b"alerts", 1)]:
                await trio.testing.wait_all_tasks_blocked()
            assert await node.engine.execute("publish", [b"news", b"hello world"]) == 1
            while len(out) < 4:
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # Ctrl-C
    assert out == [
        "Reading messages... (press Ctrl-C to quit)",
        '1) "subscribe"\n2) "news"\n3) (integer) 1',
        '1) "subscribe"\n2) "alerts"\n3) (integer) 2',
        '1) "message"\n2) "news"\n3) "hello world"',
    ]
    with trio.fail_after(10):  # the session leaves its channels as it ends
        while node.engine.pubsub.numsub([b"news"]) != [(b"news", 0)]:
            await trio.testing.wait_all_tasks_blocked()


async def test_psubscribe_at_the_prompt_enters_the_subscribe_mode(node: Node) -> None:
    lines = iter(["set k 1", "PSUBSCRIBE n*"])
    out: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    repl.main_async,
                    _args(node, None),
                    read_line=lambda _: next(lines),
                    write=out.append,
                )
            )
            while node.engine.pubsub.numpat() != 1:
                await trio.testing.wait_all_tasks_blocked()
            assert await node.engine.execute("publish", [b"news", b"x"]) == 1
            while len(out) < 4:
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert out[0] == "OK"
    assert out[3] == '1) "pmessage"\n2) "n*"\n3) "news"\n4) "x"'


async def test_subscribe_without_a_channel_is_an_arity_error(node: Node) -> None:
    out: list[str] = []
    assert await repl.main_async(_args(node, "subscribe"), write=out.append) == 1
    assert out == ["(error) ARITY wrong number of arguments for 'subscribe' command"]
