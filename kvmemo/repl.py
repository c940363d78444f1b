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

Without ``--url`` it connects to ``$KVMEMO_URL``, else ``ws://127.0.0.1:7070/ws``
(:mod:`kvmemo.tooling`). Replies go to standard output, a connection that
fails to standard error. ``help`` covers the command table and
:data:`PROMPT_COMMANDS`, the table by which the prompt dispatches its own
words (MULTI, SUBSCRIBE, quit, ...) and the session's methods (WATCH, ...).

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
import enum
import functools
import json
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from .client import Backoff, ConnectionState, DisconnectedError, connect
from .commands.args import arity_ok
from .commands.table import COMMANDS
from .errors import KVMemoError
from .tooling import EXIT_BROKEN_PIPE as EXIT_BROKEN_PIPE  # 141: the output's reader went away
from .tooling import add_url_flag, quiet_on_broken_pipe, url_of

NAME = "cli"
HISTORY_FILE = Path("~/.kvmemo_history")
HISTORY_LENGTH = 1000  # lines kept in the history file

EXIT_OK = 0
EXIT_ERROR = 1  # an error reply (with -c), or the connection failed or was lost
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_BAD_URL = 2  # a malformed --url or KVMEMO_URL

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


class Handler(enum.Enum):
    """Who answers a word of the prompt's own table (:data:`PROMPT_COMMANDS`)."""

    HELP = "help"  # the prompt: this help
    QUIT = "quit"  # the prompt: leave
    TRANSACTION = "transaction"  # the prompt's MULTI/EXEC/DISCARD (:class:`Transaction`)
    SUBSCRIBE = "subscribe"  # the prompt's subscribe mode: messages until Ctrl-C
    SESSION = "session"  # sent to the server: a method of the session, not of the command table
    REFUSED = "refused"  # a protocol method the prompt spells another way


@attrs.frozen
class PromptCommand:
    """A word the prompt knows beside the command table's commands.

    Attributes:
        name: lower-case name.
        usage: its arguments as ``help`` shows them (``""``: none).
        summary: one line for ``help``.
        handler: who answers it (a SESSION word goes to the server as typed).
        arity: Redis arity counting the name (negative: at least ``-arity``);
            the prompt checks it for the words it answers itself, the server
            for SESSION ones.
        since: the protocol version of a method of the server's session.
    """

    name: str
    usage: str
    summary: str
    handler: Handler
    arity: int
    since: str | None = None


def _prompt_commands(*commands: PromptCommand) -> dict[str, PromptCommand]:
    return {command.name: command for command in commands}


# Everything the prompt accepts that the command table (COMMANDS) does not hold:
# the prompt dispatches these words by this table, and ``help`` shows it, so
# the two cannot disagree. (The server's own methods outside the table --
# OWN_METHODS of kvmemo.server.session -- are all here.)
PROMPT_COMMANDS = _prompt_commands(
    PromptCommand("help", "[command]", "describe one command, or list them all", Handler.HELP, -1),
    PromptCommand("quit", "", "leave the prompt (so does Ctrl-D)", Handler.QUIT, 1),
    PromptCommand("exit", "", "leave the prompt (so does Ctrl-D)", Handler.QUIT, 1),
    PromptCommand("multi", "", "queue the commands that follow until EXEC", Handler.TRANSACTION, 1),
    PromptCommand("exec", "", "run the queued commands as one transaction", Handler.TRANSACTION, 1),
    PromptCommand(
        "discard", "", "drop the queued commands and every watch", Handler.TRANSACTION, 1
    ),
    PromptCommand(
        "watch",
        "key [key ...]",
        "make EXEC run nothing, answering (nil), if a key is written first",
        Handler.SESSION,
        -2,
        "1.2",
    ),
    PromptCommand("unwatch", "", "forget every watched key", Handler.SESSION, 1, "1.2"),
    PromptCommand(
        "subscribe",
        "channel [channel ...]",
        "print every message published on the channels, until Ctrl-C",
        Handler.SUBSCRIBE,
        -2,
        "1.4",
    ),
    PromptCommand(
        "psubscribe",
        "pattern [pattern ...]",
        "print every message on channels matching the patterns, until Ctrl-C",
        Handler.SUBSCRIBE,
        -2,
        "1.4",
    ),
    PromptCommand(
        "unsubscribe",
        "[channel ...]",
        "leave channels (at this prompt SUBSCRIBE ends with Ctrl-C)",
        Handler.SESSION,
        -1,
        "1.4",
    ),
    PromptCommand(
        "punsubscribe",
        "[pattern ...]",
        "leave patterns (at this prompt PSUBSCRIBE ends with Ctrl-C)",
        Handler.SESSION,
        -1,
        "1.4",
    ),
    PromptCommand(
        "transaction",
        "",
        "the protocol's transaction: at this prompt, MULTI ... EXEC",
        Handler.REFUSED,
        -1,
        "1.2",
    ),
)


def _arguments(arity: int) -> str:
    count = abs(arity) - 1
    text = f"{count} argument{'s' if count != 1 else ''}"
    return f"at least {text}" if arity < 0 else f"exactly {text}"


def help_text(topic: str | None = None) -> str:
    """The text of ``help`` (``topic``: one command's name, any case).

    Covers every word the prompt accepts: the command table's commands and
    :data:`PROMPT_COMMANDS` (the prompt's own words and the server's
    session methods).
    """
    if topic is not None:
        word = topic.lower()
        own = PROMPT_COMMANDS.get(word)
        if own is not None:
            usage = f" {own.usage}" if own.usage else ""
            where = (
                "the server (a session method)" if own.handler is Handler.SESSION else "this prompt"
            )
            lines = [f"{own.name.upper()}{usage}: {own.summary}", f"  answered by: {where}"]
            if own.since is not None:
                lines.append(f"  since: protocol {own.since}")
            return "\n".join(lines)
        spec = COMMANDS.get(word)
        if spec is None:
            return f"no command named {topic!r}; type help for the list"
        flags = ", ".join(sorted(spec.flags))
        return (
            f"{spec.name.upper()}: {spec.summary}\n"
            f"  arguments: {_arguments(spec.arity)}\n"
            f"  flags: {flags}\n  since: protocol {spec.since}"
        )
    own_lines = [
        (f"{c.name.upper()} {c.usage}".rstrip(), c.summary) for c in PROMPT_COMMANDS.values()
    ]
    table_lines = [(name.upper(), COMMANDS[name].summary) for name in sorted(COMMANDS)]
    lines = [
        'Type a command as in redis-cli:  SET greeting "hello world" EX 60',
        "Quote arguments with spaces (\"...\" with \\n \\t \\xHH escapes, '...' literal).",
        "help <command> describes one command; quit, exit or Ctrl-D leaves.",
        "MULTI queues commands until EXEC runs them as one transaction (DISCARD drops them);",
        "WATCH key ... before MULTI makes EXEC answer (nil) if one of the keys changed.",
        "",
        "The prompt's and the session's commands:",
    ]
    lines += _columns(own_lines)
    lines += ["", "Commands:"]
    lines += _columns(table_lines)
    return "\n".join(lines)


def _columns(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(left) for left, _ in rows)
    return [f"  {left.ljust(width)}  {right}" for left, right in rows]


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
        if word in PROMPT_COMMANDS:  # a session method: no call of a transaction
            self.dirty = True
            return LineResult(
                f"(error) SYNTAX {word.upper()} inside MULTI is not allowed", failed=True
            )
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

    The words of :data:`PROMPT_COMMANDS` are dispatched by that table:
    ``help [command]``, ``quit`` and ``exit`` are answered here; with a
    ``transaction``, so are MULTI, EXEC and DISCARD (and commands between
    MULTI and EXEC are queued). SUBSCRIBE and PSUBSCRIBE are the callers'
    (:func:`subscribe_mode`, which prints until Ctrl-C); here they are
    refused. Anything else is a command and its arguments, for the server.

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
    own = PROMPT_COMMANDS.get(word)
    if own is not None and own.handler is not Handler.SESSION:
        answer = _answer_here(own, tokens, transaction)
        if answer is not None:
            return answer
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


def _answer_here(
    own: PromptCommand, tokens: list[bytes], transaction: Transaction | None
) -> LineResult | None:
    """The answer to a word the prompt answers itself; None for MULTI, EXEC and
    DISCARD at the interactive prompt (the ``transaction``'s to answer)."""
    queuing = transaction is not None and transaction.queued is not None
    if not arity_ok(own.arity, len(tokens)):
        if transaction is not None and queuing:
            transaction.dirty = True
        return LineResult(
            f"(error) ARITY wrong number of arguments for '{own.name}' command", failed=True
        )
    if own.handler is Handler.QUIT:
        return LineResult(None, quit=True)
    if own.handler is Handler.HELP:
        topic = tokens[1].decode("utf-8", "replace") if len(tokens) > 1 else None
        return LineResult(help_text(topic))
    if own.handler is Handler.TRANSACTION:
        if transaction is None:
            return LineResult(
                f"(error) SYNTAX {own.name.upper()} works at the interactive prompt (kvmemo cli)",
                failed=True,
            )
        return None
    if transaction is not None and queuing:
        transaction.dirty = True
        return LineResult(
            f"(error) SYNTAX {own.name.upper()} inside MULTI is not allowed", failed=True
        )
    if own.handler is Handler.SUBSCRIBE:
        return LineResult(
            f"(error) SYNTAX {own.name.upper()} prints messages until Ctrl-C: type it at the "
            "prompt or give it to -c",
            failed=True,
        )
    return LineResult(
        f"(error) SYNTAX {own.name.upper()} takes arrays of calls; at this prompt type MULTI, "
        "the commands, then EXEC",
        failed=True,
    )


def subscribe_request(line: str) -> tuple[str, list[bytes]] | None:
    """``(word, tokens)`` when ``line`` is SUBSCRIBE or PSUBSCRIBE (any case) with
    at least one name, else None (without one, :func:`execute_line` answers the
    arity error and the prompt goes on).

    Raises:
        ValueError: such a line whose quotes are not balanced.
    """
    words = line.split(maxsplit=1)
    if not words:
        return None
    own = PROMPT_COMMANDS.get(words[0].lower())
    if own is None or own.handler is not Handler.SUBSCRIBE:
        return None
    tokens = tokenize(line)
    if not arity_ok(own.arity, len(tokens)):
        return None
    return own.name, tokens


async def subscribe_mode(
    kv: Any, word: str, tokens: list[bytes], write: Writer, write_error: Writer | None = None
) -> int:
    """SUBSCRIBE / PSUBSCRIBE as redis-cli runs them: print each confirmation, then
    every message, until interrupted (Ctrl-C) or the connection is lost.

    A lost connection is reported with ``write_error`` (``write`` when None);
    a refusal (a limit, NOAUTH) is a reply, printed with ``write``.

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
    except DisconnectedError as exc:
        (write_error or write)(format_error(exc))
    except KVMemoError as exc:  # refused (a limit, NOAUTH)
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
    kv: Any,
    *,
    prompt: str,
    read_line: Reader,
    write: Writer,
    reconnecting: bool = False,
    write_error: Writer | None = None,
) -> int:
    """Read, run and print lines until ``quit``, ``exit`` or end of input.

    Lines are read in a worker thread so the event loop keeps running.
    ``reconnecting``: ``kv`` is a client that reconnects (see
    :data:`CLI_RECONNECT`); a command lost with its connection is reported
    (with ``write_error``; ``write`` when None) and the prompt goes on,
    until the client gives up.

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
        if transaction.queued is None:
            try:
                request = subscribe_request(line)
            except ValueError as exc:
                write(f"(error) SYNTAX {exc}")
                continue
            if request is not None:
                return await subscribe_mode(kv, *request, write, write_error)
        try:
            result = await execute_line(kv, line, transaction)
        except DisconnectedError as exc:
            (write_error or write)(format_error(exc))
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


def _print_error(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def main_async(
    args: argparse.Namespace,
    *,
    read_line: Reader = input,
    write: Writer = _print,
    history: Path | None = None,
    show_prompt: bool = True,
    write_error: Writer | None = None,
) -> int:
    """The ``cli`` subcommand inside a running trio loop.

    Args:
        args: ``url``, ``token`` and ``one_command`` (the ``-c`` line, or
            ``None`` for the interactive prompt), as :func:`add_parser` defines them.
        read_line: reads a line after a prompt (``input``).
        write: prints a block of output (replies, error replies included).
        history: the readline history file of the interactive prompt
            (``None``: no history).
        show_prompt: show the ``host:port>`` prompt (not when input is piped).
        write_error: prints a failure of the connection itself (cannot
            connect, token refused, connection lost); ``write`` when None.
            :func:`run` gives standard error.

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
            try:
                request = subscribe_request(line) if line is not None else None
            except ValueError as exc:
                write(f"(error) SYNTAX {exc}")
                return EXIT_ERROR
            if request is not None:
                return await subscribe_mode(kv, *request, write, write_error)
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
                    write_error=write_error,
                )
            finally:
                if save_history is not None:
                    save_history()
    except KVMemoError as exc:  # could not connect, the token was refused, or -c lost it
        (write_error or write)(format_error(exc))
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
    add_url_flag(parser)
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
    """Run ``kvmemo cli``; returns the process exit status.

    0, or 1 (an error reply to ``-c``, a connection that failed); 2 for a
    malformed ``--url`` or ``KVMEMO_URL`` (one ``kvmemo: error:`` line on
    standard error); 130 after Ctrl-C; 141, silently, when the reader of the
    output went away (``kvmemo cli -c "KEYS *" | head -5``). Failures of the
    connection are printed on standard error, replies on standard output.
    """
    try:
        url = url_of(args)
    except ValueError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return EXIT_BAD_URL
    args = argparse.Namespace(**{**vars(args), "url": url})
    tty = getattr(args, COMMAND_DEST) is None and sys.stdin.isatty()
    main = functools.partial(
        main_async,
        args,
        history=HISTORY_FILE if tty else None,
        show_prompt=tty,
        write_error=_print_error,
    )

    def session() -> int:
        try:
            status: int = trio.run(main)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        return status

    return quiet_on_broken_pipe(session)
