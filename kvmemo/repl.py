"""``kvmemo cli``: an interactive prompt against a running server, like redis-cli.

::

    $ kvmemo cli --url ws://127.0.0.1:7070/ws
    127.0.0.1:7070> SET greeting "hello world" EX 60
    OK
    127.0.0.1:7070> GET greeting
    "hello world"
    127.0.0.1:7070> MGET greeting nothing
    1) "hello world"
    2) (nil)

    $ kvmemo cli -c "INCR visits"
    (integer) 1

The parts are pure functions, tested without a server or an event loop:
:func:`tokenize` (a line into arguments) and :func:`format_reply` /
:func:`format_error` (a result into redis-cli's text). :func:`main_async` glues
them to the :mod:`kvmemo.client` connection; it is what :func:`run` runs, and
what a test already inside trio awaits directly.

Input is read in a worker thread (``trio.to_thread.run_sync``) so the trio
loop, and the client's reader and sender tasks, keep running meanwhile.
History is kept with ``readline`` in ``~/.kvmemo_history`` when readline is
available (best effort: an unreadable or unwritable file is ignored).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from .client import Backoff, ConnectionState, DisconnectedError, check_url, connect
from .commands.table import COMMANDS
from .errors import KVMemoError

NAME = "cli"
DEFAULT_URL = "ws://127.0.0.1:7070/ws"
HISTORY_FILE = Path("~/.kvmemo_history")
HISTORY_LENGTH = 1000  # lines kept in the history file

EXIT_OK = 0
EXIT_ERROR = 1  # an error reply (with -c), or the connection failed or was lost
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

QUIT_WORDS = frozenset({"quit", "exit"})

# Where -c/--command is stored: ``kvmemo``'s own parser keeps the subcommand's
# name in ``args.command``, so the one-shot line needs another attribute.
COMMAND_DEST = "one_command"

Reader = Callable[[str], str]
"""Reads one line after showing a prompt (``input``); raises EOFError at the end."""

Writer = Callable[[str], None]
"""Writes one block of output (a newline is added)."""


# ----------------------------------------------------------------------------
# Parsing a line

_WHITESPACE = " \t\r\n"
_DOUBLE_QUOTE_ESCAPES = {
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "b": b"\b",
    "a": b"\a",
    "\\": b"\\",
    '"': b'"',
}
_HEX = "0123456789abcdefABCDEF"


def tokenize(line: str) -> list[bytes]:
    """Split a command line into arguments, as redis-cli reads them.

    Rules (redis-cli's, with shell-like concatenation):

    - Arguments are separated by spaces or tabs.
    - ``"..."`` takes the text literally except for backslash escapes:
      ``\\n \\r \\t \\b \\a \\\\ \\"`` and ``\\xHH`` (one byte); a backslash
      before any other character stands for that character.
    - ``'...'`` takes the text literally; only ``\\'`` is an escape.
    - Unquoted text is literal, backslashes included.
    - Quoted and unquoted parts that touch form one argument
      (``key"with space"`` is ``key with space``); ``""`` is an empty argument.

    Returns:
        The arguments as bytes (text UTF-8 encoded; ``\\xHH`` as the byte itself).

    Raises:
        ValueError: a quote is not closed (``"unbalanced quotes"``).
    """
    tokens: list[bytes] = []
    current = bytearray()
    in_token = False
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if char in _WHITESPACE:
            if in_token:
                tokens.append(bytes(current))
                current.clear()
                in_token = False
            i += 1
        elif char == '"':
            in_token = True
            i = _double_quoted(line, i + 1, current)
        elif char == "'":
            in_token = True
            i = _single_quoted(line, i + 1, current)
        else:
            in_token = True
            current += char.encode("utf-8", "surrogateescape")
            i += 1
    if in_token:
        tokens.append(bytes(current))
    return tokens


def _double_quoted(line: str, i: int, out: bytearray) -> int:
    """Read a ``"..."`` part starting after its quote; the index after the closing one."""
    n = len(line)
    while i < n:
        char = line[i]
        if char == '"':
            return i + 1
        if char == "\\" and i + 1 < n:
            escaped = line[i + 1]
            hex_digits = line[i + 2 : i + 4]
            if escaped == "x" and len(hex_digits) == 2 and all(c in _HEX for c in hex_digits):
                out.append(int(hex_digits, 16))
                i += 4
                continue
            out += _DOUBLE_QUOTE_ESCAPES.get(escaped) or escaped.encode("utf-8", "surrogateescape")
            i += 2
            continue
        out += char.encode("utf-8", "surrogateescape")
        i += 1
    raise ValueError("unbalanced quotes")


def _single_quoted(line: str, i: int, out: bytearray) -> int:
    """Read a ``'...'`` part starting after its quote; the index after the closing one."""
    n = len(line)
    while i < n:
        char = line[i]
        if char == "'":
            return i + 1
        if char == "\\" and line[i + 1 : i + 2] == "'":
            out += b"'"
            i += 2
            continue
        out += char.encode("utf-8", "surrogateescape")
        i += 1
    raise ValueError("unbalanced quotes")


# ----------------------------------------------------------------------------
# Formatting a reply

_BYTE_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\a": "\\a",
    "\b": "\\b",
}


def quote(value: bytes) -> str:
    """A bulk string as redis-cli shows it: in double quotes, escaped.

    Backslash, double quote and the usual control characters get their
    backslash escape; other control characters and bytes that are not UTF-8
    become ``\\xHH``. Printable non-ASCII text is shown as itself (redis-cli
    would show its bytes as ``\\xHH``).
    """
    out = ['"']
    for char in value.decode("utf-8", "surrogateescape"):
        escape = _BYTE_ESCAPES.get(char)
        if escape is not None:
            out.append(escape)
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    out.append('"')
    return "".join(out)


def format_reply(value: Any, command: str | None = None) -> str:
    """A command's result as redis-cli prints it.

    Args:
        value: the result, as :meth:`kvmemo.api.Commands.execute` returns it.
        command: the command's name, for the replies shown their own way
            (``info`` as ``# section`` and ``field:value`` lines).

    Returns:
        ``"value"`` for a bulk string, ``OK`` for a simple string,
        ``(integer) 1``, ``(nil)``, ``(double) 1.5``, ``(true)``/``(false)``,
        ``1) ...`` lines for an array (nested arrays indented, ``(empty
        array)`` when empty) and ``1# "field" => value`` lines for a map.
    """
    name = command.lower() if command is not None else None
    if name == "info" and isinstance(value, dict):
        return format_info(value)
    if name in ("debug.actors", "command.list"):
        value = _strings_as_bulk(value)
    return _format(value)


def format_error(error: KVMemoError) -> str:
    """An error reply as the prompt prints it: ``(error) KIND message``."""
    return f"(error) {error.kind} {error.message}"


def format_info(info: dict[str, Any]) -> str:
    """``info`` as Redis's INFO text: a ``# section`` line, then ``field:value`` lines.

    Values that are themselves objects or arrays are written as compact JSON.
    """
    blocks = []
    for section, fields in info.items():
        lines = [f"# {section}"]
        if isinstance(fields, dict):
            lines += [f"{field}:{_info_value(value)}" for field, value in fields.items()]
        else:
            lines.append(_info_value(fields))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _info_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _strings_as_bulk(value: Any) -> Any:
    """Strings inside JSON results (``debug.actors``) shown quoted, as bulk strings."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_strings_as_bulk(item) for item in value]
    if isinstance(value, dict):
        return {key: _strings_as_bulk(item) for key, item in value.items()}
    return value


def _format(value: Any) -> str:
    if value is None:
        return "(nil)"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "(true)" if value else "(false)"
    if isinstance(value, int):
        return f"(integer) {value}"
    if isinstance(value, float):
        return f"(double) {value!r}"
    if isinstance(value, bytes):
        return quote(value)
    if isinstance(value, str):
        return value  # a simple string: OK, PONG, string, none
    if isinstance(value, list | tuple):
        if not value:
            return "(empty array)"
        return _numbered([(f"{i})", _format(item)) for i, item in enumerate(value, 1)])
    if isinstance(value, dict):
        if not value:
            return "(empty hash)"
        return _numbered(
            [
                (f"{i}#", f"{_format_key(key)} => {_format(item)}")
                for i, (key, item) in enumerate(value.items(), 1)
            ]
        )
    return repr(value)


def _format_key(key: Any) -> str:
    if isinstance(key, str):
        return quote(key.encode("utf-8", "surrogateescape"))
    return _format(key)


def _numbered(items: list[tuple[str, str]]) -> str:
    """``1) first`` lines, numbers right-aligned, continuation lines indented under the text."""
    width = max(len(label) for label, _ in items)
    lines = []
    for label, text in items:
        prefix = label.rjust(width) + " "
        first, *rest = text.split("\n")
        lines.append(prefix + first)
        lines += [" " * len(prefix) + line for line in rest]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# One line


@attrs.frozen
class LineResult:
    """What running one input line gave.

    Attributes:
        output: the text to print (``None``: print nothing, as for an empty line).
        failed: the reply was an error.
        quit: the line asked to leave (``quit``, ``exit``).
    """

    output: str | None
    failed: bool = False
    quit: bool = False


def help_text(topic: str | None = None) -> str:
    """The text of ``help`` (``topic``: one command's name)."""
    if topic is not None:
        spec = COMMANDS.get(topic.lower())
        if spec is None:
            return f"no command named {topic!r}; type help for the list"
        count = abs(spec.arity) - 1
        arity = f"{count} argument{'s' if count != 1 else ''}"
        arity = f"at least {arity}" if spec.arity < 0 else f"exactly {arity}"
        flags = ", ".join(sorted(spec.flags))
        return (
            f"{spec.name.upper()}: {spec.summary}\n"
            f"  arguments: {arity}\n  flags: {flags}\n  since: protocol {spec.since}"
        )
    names = sorted(COMMANDS)
    width = max(len(name) for name in names)
    lines = [
        'Type a command as in redis-cli:  SET greeting "hello world" EX 60',
        "Quote arguments with spaces (\"...\" with \\n \\t \\xHH escapes, '...' literal).",
        "help <command> describes one command; quit, exit or Ctrl-D leaves.",
        "MULTI queues commands until EXEC runs them as one transaction (DISCARD drops them);",
        "WATCH key ... before MULTI makes EXEC answer (nil) if one of the keys changed.",
        "",
    ]
    lines += [f"  {name.upper().ljust(width)}  {COMMANDS[name].summary}" for name in names]
    return "\n".join(lines)


class Transaction:
    """The prompt's MULTI: commands queued here, sent as one ``transaction`` at EXEC.

    ``queued`` is None outside MULTI. As redis-cli does against Redis, the
    prompt answers ``QUEUED`` to each command and prints EXEC's replies as a
    numbered list, errors in their places. A line that names no command, or
    gives it a wrong number of arguments, is refused at once and discards
    the transaction at EXEC (``EXECABORT``). WATCH and UNWATCH go to the
    server (protocol 1.2), which keeps the session's watches; UNWATCH inside
    MULTI is queued and answers ``OK`` in its place, as in Redis (EXEC ends
    every watch anyway).
    """

    def __init__(self) -> None:
        self.queued: list[tuple[bytes, ...] | None] | None = None  # None: a queued UNWATCH
        self.dirty = False

    async def handle(self, kv: Any, word: str, tokens: list[bytes]) -> LineResult | None:
        """The result of a transaction line, or None when ``word`` is an ordinary command."""
        if word == "multi" and len(tokens) == 1:
            if self.queued is not None:
                return LineResult("(error) SYNTAX MULTI calls can not be nested", failed=True)
            self.queued = []
            self.dirty = False
            return LineResult("OK")
        if word == "discard" and len(tokens) == 1:
            if self.queued is None:
                return LineResult("(error) SYNTAX DISCARD without MULTI", failed=True)
            self.queued = None
            await kv.execute("unwatch")
            return LineResult("OK")
        if word == "exec" and len(tokens) == 1:
            if self.queued is None:
                return LineResult("(error) SYNTAX EXEC without MULTI", failed=True)
            return await self._exec(kv)
        if self.queued is None:
            return None
        if word == "watch":
            return LineResult("(error) SYNTAX WATCH inside MULTI is not allowed", failed=True)
        if word == "unwatch" and len(tokens) == 1:
            self.queued.append(None)
            return LineResult("QUEUED")
        spec = COMMANDS.get(word)
        if spec is None or word in _SESSION_WORDS:
            self.dirty = True
            return LineResult(f"(error) UNKNOWN_METHOD unknown command '{word}'", failed=True)
        if not (len(tokens) == spec.arity if spec.arity > 0 else len(tokens) >= -spec.arity):
            self.dirty = True
            return LineResult(
                f"(error) ARITY wrong number of arguments for '{word}' command", failed=True
            )
        self.queued.append(tuple(tokens))
        return LineResult("QUEUED")

    async def _exec(self, kv: Any) -> LineResult:
        queued, self.queued = self.queued, None
        assert queued is not None
        if self.dirty:
            await kv.execute("unwatch")
            return LineResult(
                "(error) EXECABORT Transaction discarded because of previous errors.", failed=True
            )
        calls = [
            (call[0].decode("utf-8", "replace"), *call[1:]) for call in queued if call is not None
        ]
        try:
            results = await kv.transaction(*calls)
        except KVMemoError as exc:
            index = exc.data.get("index")
            where = f" (command {index + 1})" if isinstance(index, int) else ""
            return LineResult(format_error(exc) + where, failed=True)
        if results is None:
            return LineResult("(nil)")  # a watched key changed: nothing ran
        answers = iter(results)
        replies = ["OK" if call is None else _format_result(next(answers)) for call in queued]
        if not replies:
            return LineResult("(empty array)")
        return LineResult(_numbered([(f"{i})", r) for i, r in enumerate(replies, 1)]))

    @property
    def prompt_suffix(self) -> str:
        """``(TX)`` while commands are being queued, as redis-cli shows it."""
        return "(TX)" if self.queued is not None else ""


# Session methods of the server: not commands a transaction may hold.
_SESSION_WORDS = frozenset({"auth", "command.list"})


def _format_result(result: Any) -> str:
    if isinstance(result, KVMemoError):
        return format_error(result)
    return _format(result)


async def execute_line(kv: Any, line: str, transaction: Transaction | None = None) -> LineResult:
    """Run one input line against ``kv`` (a :class:`kvmemo.api.Commands`).

    ``help [command]``, ``quit`` and ``exit`` are answered here; with a
    ``transaction``, so are MULTI, EXEC and DISCARD (and commands between
    MULTI and EXEC are queued); anything else is a command and its arguments.

    Raises:
        DisconnectedError: the connection is lost (the prompt cannot go on).
    """
    try:
        tokens = tokenize(line)
    except ValueError as exc:
        return LineResult(f"(error) SYNTAX {exc}", failed=True)
    if not tokens:
        return LineResult(None)
    name = tokens[0].decode("utf-8", "replace")
    word = name.lower()
    if word in QUIT_WORDS and len(tokens) == 1:
        return LineResult(None, quit=True)
    if word == "help":
        topic = tokens[1].decode("utf-8", "replace") if len(tokens) > 1 else None
        return LineResult(help_text(topic))
    if transaction is None and word in ("multi", "exec", "discard"):
        return LineResult(
            f"(error) SYNTAX {word.upper()} works at the interactive prompt (kvmemo cli)",
            failed=True,
        )
    try:
        if transaction is not None:
            answered = await transaction.handle(kv, word, tokens)
            if answered is not None:
                return answered
        result = await kv.execute(name, *tokens[1:])
    except DisconnectedError:
        raise
    except KVMemoError as exc:
        return LineResult(format_error(exc), failed=True)
    except ValueError as exc:  # an argument the protocol cannot carry (not UTF-8)
        return LineResult(f"(error) SYNTAX {exc}", failed=True)
    return LineResult(format_reply(result, word))


SUBSCRIBE_WORDS = frozenset({"subscribe", "psubscribe"})


async def subscribe_mode(kv: Any, word: str, tokens: list[bytes], write: Writer) -> int:
    """SUBSCRIBE / PSUBSCRIBE as redis-cli runs them: print each confirmation, then
    every message, until interrupted (Ctrl-C) or the connection is lost.

    Returns:
        The exit status when it ends by itself: 1 (arity, refusal, lost connection).
    """
    names = tokens[1:]
    if not names:
        write(f"(error) ARITY wrong number of arguments for '{word}' command")
        return EXIT_ERROR
    write("Reading messages... (press Ctrl-C to quit)")
    try:
        async with kv.subscribe() as sub:
            add = sub.psubscribe if word == "psubscribe" else sub.subscribe
            for name in names:  # one confirmation each, as Redis sends them
                write(_format([word.encode(), name, await add(name)]))
            async for message in sub:
                if message.pattern is None:
                    write(_format([b"message", message.channel, message.data]))
                else:
                    write(_format([b"pmessage", message.pattern, message.channel, message.data]))
    except KVMemoError as exc:  # refused (a limit, NOAUTH), or the connection is lost
        write(format_error(exc))
    return EXIT_ERROR


# How the interactive prompt reconnects after a lost connection: about 20 s of
# tries, then the prompt ends (exit status 1).
CLI_RECONNECT = Backoff(initial_delay=0.1, max_delay=2.0, max_attempts=15)

# ----------------------------------------------------------------------------
# The prompt


def prompt_for(url: str) -> str:
    """The prompt, ``host:port> ``, as redis-cli shows it."""
    netloc = urllib.parse.urlsplit(url).netloc
    return f"{netloc or url}> "


async def interact(
    kv: Any, *, prompt: str, read_line: Reader, write: Writer, reconnecting: bool = False
) -> int:
    """Read, run and print lines until ``quit``, ``exit`` or end of input.

    Lines are read in a worker thread so the event loop keeps running.
    ``reconnecting``: ``kv`` is a client that reconnects (see
    :data:`CLI_RECONNECT`); a command lost with its connection is reported
    and the prompt goes on, until the client gives up.

    Returns:
        The exit status: 0, or 1 when the connection was lost (for good).
    """
    transaction = Transaction()
    while True:
        shown = prompt[:-2] + transaction.prompt_suffix + "> " if prompt else ""
        try:
            line = await trio.to_thread.run_sync(read_line, shown, abandon_on_cancel=True)
        except EOFError:  # Ctrl-D (or the end of piped input)
            if prompt:
                write("")  # end the prompt's line
            return EXIT_OK
        words = line.split(maxsplit=1)
        if words and words[0].lower() in SUBSCRIBE_WORDS and transaction.queued is None:
            try:
                tokens = tokenize(line)
            except ValueError as exc:
                write(f"(error) SYNTAX {exc}")
                continue
            return await subscribe_mode(kv, words[0].lower(), tokens, write)
        try:
            result = await execute_line(kv, line, transaction)
        except DisconnectedError as exc:
            write(format_error(exc))
            if reconnecting and kv.state is not ConnectionState.CLOSED:
                continue  # the next command waits for the connection
            return EXIT_ERROR
        if result.output is not None:
            write(result.output)
        if result.quit:
            return EXIT_OK


def _open_history(path: Path) -> Callable[[], None]:
    """Load the readline history (best effort); returns the function that saves it."""
    try:
        import readline
    except ImportError:  # no readline on this platform: no history
        return lambda: None
    file = path.expanduser()
    try:
        readline.read_history_file(file)
    except OSError:
        pass  # first run, or an unreadable file: start empty
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            readline.write_history_file(file)
        except OSError:
            pass  # best effort: a read-only home loses the history, not the session

    return save


def _print(text: str) -> None:
    print(text, flush=True)


async def main_async(
    args: argparse.Namespace,
    *,
    read_line: Reader = input,
    write: Writer = _print,
    history: Path | None = None,
    show_prompt: bool = True,
) -> int:
    """The ``cli`` subcommand inside a running trio loop.

    Args:
        args: ``url``, ``token`` and ``one_command`` (the ``-c`` line, or
            ``None`` for the interactive prompt), as :func:`add_parser` defines them.
        read_line: reads a line after a prompt (``input``).
        write: prints a block of output.
        history: the readline history file of the interactive prompt
            (``None``: no history).
        show_prompt: show the ``host:port>`` prompt (not when input is piped).

    Returns:
        The exit status: 0; 1 for an error reply to ``-c``, a connection
        that could not be opened or was lost.
    """
    line = getattr(args, COMMAND_DEST)
    # Only a person at the prompt waits for a reconnection (as redis-cli does);
    # a script, -c or piped input, fails at once.
    reconnect: Backoff | bool = CLI_RECONNECT if line is None and show_prompt else False
    try:
        async with connect(args.url, token=args.token, reconnect=reconnect) as kv:
            words = line.split(maxsplit=1) if line is not None else []
            if words and words[0].lower() in SUBSCRIBE_WORDS:
                try:
                    tokens = tokenize(line)
                except ValueError as exc:
                    write(f"(error) SYNTAX {exc}")
                    return EXIT_ERROR
                return await subscribe_mode(kv, words[0].lower(), tokens, write)
            if line is not None:
                result = await execute_line(kv, line)
                if result.output is not None:
                    write(result.output)
                return EXIT_ERROR if result.failed else EXIT_OK
            save_history = _open_history(history) if history is not None else None
            try:
                prompt = prompt_for(args.url) if show_prompt else ""
                return await interact(
                    kv,
                    prompt=prompt,
                    read_line=read_line,
                    write=write,
                    reconnecting=reconnect is not False,
                )
            finally:
                if save_history is not None:
                    save_history()
    except KVMemoError as exc:  # could not connect, or the token was refused
        write(format_error(exc))
        return EXIT_ERROR


# ----------------------------------------------------------------------------
# The subcommand


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kvmemo cli`` to the command line's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        NAME,
        help="interactive prompt against a running server (like redis-cli)",
        description="Send commands to a running KVMemo server over its WebSocket port.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"session URL (default {DEFAULT_URL})")
    parser.add_argument("--token", default=None, help="auth token, sent before anything else")
    parser.add_argument(
        "-c",
        "--command",
        dest=COMMAND_DEST,
        default=None,
        metavar="LINE",
        help='run one command and exit, e.g. -c "SET k v EX 10"',
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``kvmemo cli``; returns the process exit status (2: a malformed ``--url``)."""
    try:
        check_url(args.url, "--url")
    except ValueError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 2
    tty = getattr(args, COMMAND_DEST) is None and sys.stdin.isatty()
    main = functools.partial(
        main_async, args, history=HISTORY_FILE if tty else None, show_prompt=tty
    )
    try:
        status: int = trio.run(main)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    return status
