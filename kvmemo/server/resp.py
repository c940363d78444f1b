"""RESP, the Redis serialization protocol: requests in, replies out. Sans-IO.

This module is the codec of the Redis port (PROTOCOL.md, "Transport"). Like
h11's ``Connection`` it never touches a socket, trio or the engine: the server
feeds it the bytes it received and writes the bytes it is given.

* :class:`RespParser` turns request bytes into :class:`Command` and
  :class:`ProtocolError` events, accepting what Redis accepts (multibulk and
  inline requests) and failing with Redis's own error wording.
* :func:`encode_reply` (and :func:`encode_replies`, for a pipeline's worth)
  turns a Python value into a RESP2 or RESP3 reply, with
  marker types (:class:`ErrorReply`, :class:`NullArray`, :class:`Verbatim`,
  :class:`Set`, :class:`Push`) for the forms that plain Python values cannot
  say.
* :func:`encode_command` and :class:`RespReplyParser` are the client side, for
  tests, benchmarks and tools.

Text (``str``) goes on the wire as UTF-8. A lone surrogate U+DC80..U+DCFF
stands for the raw byte 0x80..0xFF (Python's ``surrogateescape``), so that a
message built from ``arg.decode("utf-8", "surrogateescape")`` goes back out
byte for byte, as Redis echoes the client's bytes; any other lone surrogate is
sent as ``?``. The reply parser decodes text the same way.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from ..commands.replies import FieldList

__all__ = [
    "NEED_DATA",
    "NULL_ARRAY",
    "Command",
    "ErrorReply",
    "InlineArgs",
    "NeedData",
    "NullArray",
    "ProtocolError",
    "Push",
    "ReplyProtocolError",
    "RespParser",
    "RespReplyParser",
    "Set",
    "Verbatim",
    "encode_command",
    "encode_push",
    "encode_replies",
    "encode_reply",
]


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------


def _encode_text(text: str) -> bytes:
    """UTF-8, with surrogateescape'd raw bytes restored (see the module doc)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _one_line(text: str) -> str:
    """A simple string or error may not hold CR or LF: Redis writes spaces instead."""
    return text.replace("\r", " ").replace("\n", " ")


# A Redis integer as ``string2ll`` accepts it: no sign but "-", no leading
# zeros, no "-0", at most 20 characters, within a signed 64-bit integer.
_LL_RE: Final = re.compile(rb"-?[1-9][0-9]*|0")
_LL_MIN: Final = -(2**63)
_LL_MAX: Final = 2**63 - 1


def _string2ll(data: bytes) -> int | None:
    """Parse ``data`` as Redis's ``string2ll`` does; ``None`` if it would refuse it."""
    if not 0 < len(data) < 21 or _LL_RE.fullmatch(data) is None:
        return None
    value = int(data)
    if not _LL_MIN <= value <= _LL_MAX:
        return None
    return value


# --------------------------------------------------------------------------
# Request events
# --------------------------------------------------------------------------


class InlineArgs(tuple[bytes, ...]):
    """The arguments of an inline request (a line typed as in telnet): a plain
    tuple of them, whose type says how they came.

    Redis holds the two forms of request to different limits: the limits on
    the requests of an unauthenticated client (10 arguments, 16 KiB each)
    are checked in ``processMultibulkBuffer`` only, so an inline request of
    any number of arguments, within ``PROTO_INLINE_MAX_SIZE``, reaches the
    command checks (unknown command, arity, ``NOAUTH``). A server tells the
    forms apart by this type.
    """

    __slots__ = ()


@attrs.frozen
class Command:
    """One complete request.

    Attributes:
        args: the arguments as sent; ``args[0]`` is the command name, in the
            client's spelling (not case-folded). Never empty. An
            :class:`InlineArgs` for an inline request.
    """

    args: tuple[bytes, ...]

    @property
    def inline(self) -> bool:
        """Whether the request was an inline one (not a multibulk one)."""
        return type(self.args) is InlineArgs


@attrs.frozen
class ProtocolError:
    """The client broke the protocol; the parser is dead from here on.

    Redis answers with ``message`` and then closes the connection, and so
    should the server.

    Attributes:
        message: the error in Redis's wording, code word first
            (``"ERR Protocol error: invalid bulk length"``), ready for
            ``encode_reply(ErrorReply(message))``.
        reply: whether Redis sends ``message`` before closing. ``False`` for
            the query buffer limit, where Redis closes without a word and
            only logs ``message``.
    """

    message: str
    reply: bool = True


_ERR_MBULK_LEN: Final = "ERR Protocol error: invalid multibulk length"
_ERR_BULK_LEN: Final = "ERR Protocol error: invalid bulk length"
_ERR_INLINE_TOO_BIG: Final = "ERR Protocol error: too big inline request"
_ERR_MBULK_TOO_BIG: Final = "ERR Protocol error: too big mbulk count string"
_ERR_BULK_TOO_BIG: Final = "ERR Protocol error: too big bulk count string"
_ERR_QUOTES: Final = "ERR Protocol error: unbalanced quotes in request"
_ERR_QUERY_BUFFER: Final = "Closing client that reached max query buffer length"


def _expected_dollar(byte: int) -> str:
    got = _one_line(_decode_text(bytes([byte])))
    return f"ERR Protocol error: expected '$', got '{got}'"


# --------------------------------------------------------------------------
# Inline requests: Redis's sdssplitargs
# --------------------------------------------------------------------------

_QUOTES_RE: Final = re.compile(rb"[\"']")
# Outside quotes an argument starts at any byte that C's isspace() refuses and
# runs until a space, tab, CR or LF (so a VT or FF inside an argument is kept,
# as in sdssplitargs).
_BARE_ARG_RE: Final = re.compile(rb"[^ \t\r\n\x0b\x0c][^ \t\r\n]*")
_ISSPACE: Final = frozenset(b" \t\r\n\x0b\x0c")
_ARG_END: Final = frozenset(b" \t\r\n")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES: Final = {
    ord("n"): ord("\n"),
    ord("r"): ord("\r"),
    ord("t"): ord("\t"),
    ord("b"): ord("\b"),
    ord("a"): ord("\a"),
}
_BACKSLASH: Final = ord("\\")
_DQUOTE: Final = ord('"')
_SQUOTE: Final = ord("'")


def _split_inline(line: bytes) -> list[bytes] | None:
    """Split an inline request line into arguments as Redis's ``sdssplitargs``.

    Double quotes take the escapes ``\\n \\r \\t \\b \\a \\xHH`` and a backslash
    before any other byte stands for that byte; single quotes take only
    ``\\'``. A quote may open in the middle of an argument, but a closing quote
    must be followed by white space or the end of the line.

    Returns:
        The arguments (possibly empty ones, from ``""``), or ``None`` when
        the quotes are unbalanced. Unlike Redis's C string handling a NUL byte
        is an ordinary byte here.
    """
    if _QUOTES_RE.search(line) is None:
        return _BARE_ARG_RE.findall(line)
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _ISSPACE:
            i += 1
        if i >= n:
            return args
        arg = bytearray()
        in_dq = in_sq = False
        while True:
            if i >= n:
                if in_dq or in_sq:
                    return None
                break
            c = line[i]
            if in_dq:
                if (
                    c == _BACKSLASH
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    arg.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                elif c == _BACKSLASH and i + 1 < n:
                    arg.append(_ESCAPES.get(line[i + 1], line[i + 1]))
                    i += 2
                elif c == _DQUOTE:
                    if i + 1 < n and line[i + 1] not in _ISSPACE:
                        return None
                    i += 1
                    break
                else:
                    arg.append(c)
                    i += 1
            elif in_sq:
                if c == _BACKSLASH and i + 1 < n and line[i + 1] == _SQUOTE:
                    arg.append(_SQUOTE)
                    i += 2
                elif c == _SQUOTE:
                    if i + 1 < n and line[i + 1] not in _ISSPACE:
                        return None
                    i += 1
                    break
                else:
                    arg.append(c)
                    i += 1
            elif c in _ARG_END:
                i += 1
                break
            elif c == _DQUOTE:
                in_dq = True
                i += 1
            elif c == _SQUOTE:
                in_sq = True
                i += 1
            else:
                arg.append(c)
                i += 1
        args.append(bytes(arg))


# --------------------------------------------------------------------------
# Request parser
# --------------------------------------------------------------------------


class _State(enum.Enum):
    IDLE = enum.auto()  # between requests: the next byte decides the kind
    INLINE = enum.auto()  # waiting for the LF that ends an inline line
    COUNT = enum.auto()  # waiting for the "*<count>\r\n" line
    BULK_LEN = enum.auto()  # waiting for a "$<len>\r\n" line
    BULK_DATA = enum.auto()  # waiting for <len> bytes and the 2-byte trailer
    FAILED = enum.auto()  # a ProtocolError was returned; nothing more is parsed


# Consumed bytes at the front of a bytearray buffer are dropped only once they
# are at least this many and at least half the buffer: each compaction then
# moves no more bytes than it frees, so copying costs O(1) per byte received
# however the requests are pipelined or split.
_COMPACT_MIN: Final = 64 * 1024  # bytes

_STAR: Final = ord("*")
_DOLLAR: Final = ord("$")

# The fast path reads the count and bulk-length lines it sees most by one dict
# lookup of the whole line; a line not in these tables is read with
# _string2ll. The keys are exactly the canonical spellings _string2ll accepts,
# so a hit gives what _string2ll would. Sizes: about 100 KiB in all. A parser
# whose limits refuse some of these lines uses copies without them
# (_fast_tables), so a hit is also within its limits.
_FAST_LINES_MAX: Final = 1024  # largest count / bulk length in the tables
_COUNT_LINES: Final = {b"*%d" % n: n for n in range(1, _FAST_LINES_MAX + 1)}
_BULK_LINES: Final = {b"$%d" % n: n for n in range(_FAST_LINES_MAX + 1)}
_NO_LIMIT: Final = 1 << 62  # "as many requests as are complete"
# Up to this many arguments _fast_split checks a request's lengths one by one;
# above, in one comparison of two lists (measured: the crossover is near 4).
_SHORT_REQUEST: Final = 4  # arguments
_LONGEST_FAST_LINE: Final = len(b"$%d" % _FAST_LINES_MAX)  # bytes ("*1024", "$1024")


@functools.lru_cache(maxsize=16)
def _fast_tables(
    max_args: int, max_bulk_len: int, max_inline_len: int
) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """The count and length tables of a parser with these limits (shared, read-only).

    Cached: every connection of a server has the same limits, and a filtered
    copy is about 40 KB.

    A line is kept when the state machine would accept it without an error:
    its value within ``max_args`` or ``max_bulk_len``, and the line no longer
    than ``max_inline_len`` bytes. With limits at least the tables' largest
    values (the defaults), the shared tables themselves.
    """
    if min(max_args, max_bulk_len) >= _FAST_LINES_MAX and max_inline_len >= _LONGEST_FAST_LINE:
        return _COUNT_LINES, _BULK_LINES
    counts = {
        line: n for line, n in _COUNT_LINES.items() if n <= max_args and len(line) <= max_inline_len
    }
    lengths = {
        line: n
        for line, n in _BULK_LINES.items()
        if n <= max_bulk_len and len(line) <= max_inline_len
    }
    return counts, lengths


def _check_limit(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class RespParser:
    """Incremental parser of Redis requests, as Redis's ``processInputBuffer``.

    Feed it bytes as they arrive and call :meth:`next_event` until it returns
    ``None``. A request starting with ``*`` is a multibulk request
    (``*<n>\\r\\n`` then ``n`` times ``$<len>\\r\\n<bytes>\\r\\n``); any other line
    is an inline request split by :func:`_split_inline`.

    Design: the received bytes sit in one buffer with a read offset ``_pos``;
    a request is parsed in place and only its arguments are copied out, so a
    pipeline of many requests costs time linear in its size. The buffer is a
    ``bytes`` object whenever that is cheap (nothing held when bytes arrive:
    the received object itself; or less held than arrives: one join), else a
    ``bytearray`` grown in place (a large bulk arriving in small pieces), so
    copying stays O(1) per byte received either way.

    Two paths read requests. The fast path (:meth:`_fast`) takes, from a
    ``bytes`` buffer, every complete multibulk request that is plainly
    valid. Once per feed, for a pipeline, it splits what is held at every
    CRLF in one call and walks the pieces (:meth:`_fast_split`); then, or
    for one request, it finds each line with ``bytes.find``. Either way a
    count or length line is read by one dict lookup and each argument is
    one slice. At the first thing that is not that (an inline request, an
    incomplete request, anything odd or invalid) it stops without consuming
    it, and the state machine (:meth:`_next_slow`) reads that request
    byte-exactly, errors and limits included; the paths read the same bytes
    the same way (the tests compare them). In the state machine a line
    terminator is searched from ``_scan``, where the last search stopped,
    so a line arriving one byte at a time is scanned once, not once per
    byte.

    What Redis accepts, this accepts, with these deliberate choices:

    * Like Redis it does not check the two bytes after a count line's CR or
      after a bulk argument: they are skipped whatever they are.
    * A "too big" line error is decided by the position of the terminator,
      not by how much happened to be buffered: Redis refuses a line longer
      than ``max_inline_len`` only while its end has not arrived, so its
      answer depends on how TCP split the stream. Here the same bytes give
      the same events however they are split (the query buffer limit aside,
      which is about what is held at once).
    * NUL is an ordinary byte in inline requests (Redis's C strings would
      stop at it).
    * Redis's "unauthenticated multibulk/bulk length" limits belong to the
      server, which knows whether the client has authenticated; it reads
      the request in progress from :attr:`reading`. They apply to multibulk
      requests only, as in Redis: an inline request's arguments come as
      :class:`InlineArgs`, which the server leaves out of them.

    Invariant: ``_scan`` and ``_pos`` are indexes into ``_buf`` with
    ``_pos <= _scan <= len(_buf)``; the bytes before ``_pos`` are consumed.
    """

    def __init__(
        self,
        *,
        max_bulk_len: int = 512 * 1024 * 1024,
        max_args: int = 1024 * 1024,
        max_inline_len: int = 64 * 1024,
        max_buffer: int = 1024 * 1024 * 1024,
    ) -> None:
        """Create a parser with Redis's default limits.

        Args:
            max_bulk_len: longest bulk argument, in bytes (Redis's
                ``proto-max-bulk-len``); longer is "invalid bulk length".
            max_args: most arguments in one multibulk request; more is
                "invalid multibulk length".
            max_inline_len: longest inline request or count line, in bytes
                (Redis's ``PROTO_INLINE_MAX_SIZE``).
            max_buffer: most bytes held at once (Redis's
                ``client-query-buffer-limit``); more fails the parser with a
                :class:`ProtocolError` whose ``reply`` is ``False``.

        Raises:
            ValueError: a limit is out of range.
        """
        _check_limit("max_bulk_len", max_bulk_len, 0)
        _check_limit("max_args", max_args, 1)
        _check_limit("max_inline_len", max_inline_len, 1)
        _check_limit("max_buffer", max_buffer, 1)
        self._max_bulk_len = max_bulk_len
        self._max_args = max_args
        self._max_inline_len = max_inline_len
        self._max_buffer = max_buffer
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0
        self._state = _State.IDLE
        self._args: list[bytes] = []
        self._args_bytes = 0  # bytes in self._args, counted in `buffered`
        self._remaining = 0  # arguments still to read in this multibulk request
        self._bulk_len = 0  # length of the bulk argument being read
        self._error: ProtocolError | None = None
        self._split = False  # whether _fast may split the buffer (once per feed)
        self._counts, self._lengths = _fast_tables(max_args, max_bulk_len, max_inline_len)

    @property
    def failed(self) -> bool:
        """Whether a :class:`ProtocolError` ended parsing."""
        return self._error is not None

    @property
    def error(self) -> ProtocolError | None:
        """The error that ended parsing, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes held: received but not yet returned as a :class:`Command`.

        That includes the arguments already read of an unfinished multibulk
        request, so it is the memory a client makes us hold.
        """
        return len(self._buf) - self._pos + self._args_bytes

    @property
    def reading(self) -> tuple[int, int]:
        """The multibulk request being read, for the limits its caller sets.

        Its argument count and the length of the argument being read (0
        until that argument's length line has arrived); ``(0, 0)`` between
        requests and in an inline one. A server checks the limits Redis sets
        for unauthenticated clients with it, as Redis does while reading.
        """
        state = self._state
        if state is _State.BULK_LEN:
            return len(self._args) + self._remaining, 0
        if state is _State.BULK_DATA:
            return len(self._args) + self._remaining, self._bulk_len
        return 0, 0

    def feed(self, data: bytes) -> None:
        """Add received bytes. Never raises on any input.

        Once the parser has failed, data is dropped. If the bytes held go
        over ``max_buffer`` the parser fails (see :class:`ProtocolError`).
        """
        if self._error is not None or not data:
            return
        self._split = True
        buf, pos = self._buf, self._pos
        held = len(buf) - pos
        if held == 0:
            # The common case: every byte before was consumed. Keep the
            # received object itself (a copy only if it is not bytes).
            self._buf = data if type(data) is bytes else bytes(data)
            self._scan -= pos
            self._pos = 0
        elif held <= len(data):
            # One copy of what is held and the new bytes: at most twice the
            # size of the new bytes.
            self._buf = b"".join((memoryview(buf)[pos:], data))
            self._scan -= pos
            self._pos = 0
        else:
            # More held than arrives (a large bulk in small pieces): grow a
            # bytearray in place instead of copying what is held each time.
            if isinstance(buf, bytes):
                buf = bytearray(memoryview(buf)[pos:])
                self._scan -= pos
                self._pos = 0
                self._buf = buf
            else:
                self._compact(buf)
            buf += data
        if self.buffered > self._max_buffer:
            self._fail(_ERR_QUERY_BUFFER, reply=False)

    def next_commands(self) -> tuple[list[tuple[bytes, ...]], ProtocolError | None]:
        """Parse every complete request fed so far.

        The same requests as calling :meth:`next_event` until it returns
        ``None`` or an error, without a :class:`Command` for each.

        Returns:
            The arguments of each request in order (``args[0]`` the command
            name, never empty; an :class:`InlineArgs` for an inline
            request), and the :class:`ProtocolError` that ended
            parsing after them, if any (again on every later call).
        """
        out: list[tuple[bytes, ...]] = []
        while True:
            if self._state is _State.IDLE and self._error is None:
                self._fast(out, _NO_LIMIT)
                if self._pos >= len(self._buf):  # all taken: what _next_slow would say
                    return out, None
            event = self._next_slow()
            if event is None:
                return out, None
            if isinstance(event, ProtocolError):
                return out, event
            out.append(event.args)

    def next_event(self) -> Command | ProtocolError | None:
        """Parse the next request from the bytes fed so far.

        Returns:
            A :class:`Command`; a :class:`ProtocolError`, again on every later
            call; or ``None`` when more bytes are needed. Empty requests
            (``*0``, ``*-1``, blank inline lines) give no event.
        """
        if self._state is _State.IDLE and self._error is None:
            out: list[tuple[bytes, ...]] = []
            self._fast(out, 1)
            if out:
                return Command(out[0])
        return self._next_slow()

    def _fast(self, out: list[tuple[bytes, ...]], most: int) -> None:
        """Append to ``out`` up to ``most`` plainly valid complete multibulk requests.

        Runs only between requests (state ``IDLE``) on a ``bytes`` buffer.
        Stops, consuming nothing of it, at the first request that is not
        complete, not multibulk, or not read exactly as :meth:`_next_slow`
        would read it without an error: a count not in 1..``max_args``, a
        length line that is not ``$`` and a valid length up to
        ``max_bulk_len``, a line longer than ``max_inline_len``.
        """
        buf = self._buf
        if type(buf) is not bytes:
            return
        if self._split and most > 1:
            self._split = False
            self._fast_split(buf, out)
        pos = self._pos
        size = len(buf)
        if pos >= size:
            return
        find = buf.find
        span = self._max_inline_len + 1  # a line's CR is found within this many bytes
        max_args = self._max_args
        max_bulk = self._max_bulk_len
        counts = self._counts
        lengths = self._lengths
        taken = 0
        while taken < most and pos < size and buf[pos] == _STAR:
            cr = find(b"\r", pos, pos + span)
            if cr < 0 or cr + 2 > size:
                break
            line = buf[pos:cr]
            count = counts.get(line)
            if count is None:  # not in the table: read and check it in full
                count = _string2ll(line[1:])
                if count is None or not 0 < count <= max_args:
                    break
            at = cr + 2
            args: list[bytes] = []
            for _ in range(count):
                cr = find(b"\r", at, at + span)
                if cr < 0:
                    break
                line = buf[at:cr]
                length = lengths.get(line)
                if length is None:  # idem
                    if line[:1] != b"$":
                        break
                    length = _string2ll(line[1:])
                    if length is None or not 0 <= length <= max_bulk:
                        break
                start = cr + 2
                stop = start + length
                if stop + 2 > size:
                    break
                args.append(buf[start:stop])
                at = stop + 2
            else:
                out.append(tuple(args))
                pos = at
                taken += 1
                continue
            break
        self._pos = self._scan = pos

    def _fast_split(self, buf: bytes, out: list[tuple[bytes, ...]]) -> None:
        """The start of :meth:`_fast` for a whole pipeline: one split, then a walk.

        Splits what is held at every CRLF (one C call) and walks the pieces:
        a count or length line must be in the parser's tables (so it holds no
        CR, is within the limits and short enough), and a value piece is the
        argument itself when its length is the one declared (it was then
        followed by CRLF, as the state machine requires). The lengths of a
        request's values are checked against its length lines one by one, or,
        for a long request, in one comparison of two lists. The last piece,
        never followed by CRLF, is not used. Stops at the first request that
        does not fit (a value holding CRLF, a long count or value, an
        incomplete request); ``bytes.find`` takes over from there.
        """
        pos = self._pos
        pieces = (buf[pos:] if pos else buf).split(b"\r\n")
        usable = len(pieces) - 1
        counts = self._counts
        lengths_of = self._lengths.get
        i = 0  # pieces consumed
        while i < usable:
            count = counts.get(pieces[i])
            if count is None:
                break
            end = i + 1 + 2 * count  # the pieces of this request are [i, end)
            if end > usable:
                break
            # A length line not in the table gives None, never equal to a length.
            if count <= _SHORT_REQUEST:
                for j in range(i + 1, end, 2):
                    if lengths_of(pieces[j]) != len(pieces[j + 1]):
                        break
                else:
                    out.append(tuple(pieces[i + 2 : end : 2]))
                    i = end
                    continue
                break
            values = pieces[i + 2 : end : 2]
            if list(map(len, values)) != list(map(lengths_of, pieces[i + 1 : end : 2])):
                break
            out.append(tuple(values))
            i = end
        if i == usable and i:
            # Every piece but the last taken (the common case: whole requests
            # were read): they end where the last piece begins.
            self._pos = self._scan = len(buf) - len(pieces[-1])
        elif i:
            self._pos = self._scan = pos + sum(map(len, pieces[:i])) + 2 * i

    def _next_slow(self) -> Command | ProtocolError | None:
        """The state machine: the next event, one line or bulk at a time (see the class doc)."""
        while True:
            if self._error is not None:
                return self._error
            state = self._state
            buf = self._buf
            if state is _State.IDLE:
                if self._pos >= len(buf):
                    return None
                self._scan = self._pos
                self._state = _State.COUNT if buf[self._pos] == _STAR else _State.INLINE
            elif state is _State.INLINE:
                end = self._find_line(b"\n", _ERR_INLINE_TOO_BIG)
                if end < 0:
                    return self._error
                start = self._pos
                line_end = end - 1 if end > start and buf[end - 1] == 0x0D else end
                args = _split_inline(bytes(buf[start:line_end]))
                if args is None:
                    return self._fail(_ERR_QUOTES)
                self._pos = end + 1
                self._state = _State.IDLE
                if args:
                    return Command(InlineArgs(args))
            elif state is _State.COUNT:
                cr = self._find_crlf(_ERR_MBULK_TOO_BIG)
                if cr < 0:
                    return self._error
                count = _string2ll(bytes(buf[self._pos + 1 : cr]))
                if count is None or count > self._max_args:
                    return self._fail(_ERR_MBULK_LEN)
                self._consume_line(cr)
                if count <= 0:
                    self._state = _State.IDLE
                else:
                    self._remaining = count
                    self._state = _State.BULK_LEN
            elif state is _State.BULK_LEN:
                cr = self._find_crlf(_ERR_BULK_TOO_BIG)
                if cr < 0:
                    return self._error
                first = buf[self._pos]
                if first != _DOLLAR:
                    return self._fail(_expected_dollar(first))
                length = _string2ll(bytes(buf[self._pos + 1 : cr]))
                if length is None or length < 0 or length > self._max_bulk_len:
                    return self._fail(_ERR_BULK_LEN)
                self._consume_line(cr)
                self._bulk_len = length
                self._state = _State.BULK_DATA
            elif state is _State.BULK_DATA:
                start = self._pos
                if len(buf) - start < self._bulk_len + 2:
                    return None
                stop = start + self._bulk_len
                if isinstance(buf, bytes):
                    self._args.append(buf[start:stop])
                else:  # one copy, not a bytearray slice and then bytes
                    self._args.append(bytes(memoryview(buf)[start:stop]))
                self._args_bytes += self._bulk_len
                self._pos = self._scan = start + self._bulk_len + 2
                self._remaining -= 1
                if self._remaining:
                    self._state = _State.BULK_LEN
                else:
                    command = Command(tuple(self._args))
                    self._args = []
                    self._args_bytes = 0
                    self._state = _State.IDLE
                    return command
            else:  # _State.FAILED always has self._error set
                raise AssertionError(f"unreachable parser state {state}")

    # -- helpers -------------------------------------------------------------

    def _fail(self, message: str, *, reply: bool = True) -> ProtocolError:
        error = ProtocolError(message, reply)
        self._error = error
        self._state = _State.FAILED
        self._buf = b""
        self._pos = self._scan = 0
        self._args = []
        self._args_bytes = 0
        return error

    def _find_line(self, terminator: bytes, too_big: str) -> int:
        """Index of the terminator of the line at ``_pos``, or -1 for "not yet".

        Fails the parser (and returns -1) when the line is longer than
        ``max_inline_len`` bytes counting a CR before the terminator; the
        search never looks further than that.
        """
        limit = self._pos + self._max_inline_len + 1
        found = self._buf.find(terminator, self._scan, limit)
        if found >= 0:
            self._scan = found
            return found
        end = len(self._buf)
        if end - self._pos > self._max_inline_len:
            self._fail(too_big)
        else:
            self._scan = end
        return -1

    def _find_crlf(self, too_big: str) -> int:
        """Index of the CR ending the line at ``_pos`` once one more byte is in, else -1."""
        cr = self._find_line(b"\r", too_big)
        if cr < 0 or cr + 2 > len(self._buf):
            return -1
        return cr

    def _consume_line(self, cr: int) -> None:
        self._pos = self._scan = cr + 2

    def _compact(self, buf: bytearray) -> None:
        """Drop the consumed front of ``buf`` (the buffer) when that is worth it."""
        pos = self._pos
        if pos == 0:
            return
        if pos == len(buf):
            buf.clear()
        elif pos >= _COMPACT_MIN and 2 * pos >= len(buf):
            del buf[:pos]
        else:
            return
        self._scan -= pos
        self._pos = 0


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------


@attrs.frozen
class ErrorReply:
    """An error reply, ``-<message>\\r\\n``.

    Attributes:
        message: the whole error, code word first (``"ERR unknown command
            'foo'"``, ``"WRONGTYPE Operation against..."``). CR and LF are
            sent as spaces.
    """

    message: str


@attrs.frozen
class NullArray:
    """The null array: RESP2 ``*-1``, RESP3 ``_`` (e.g. BLPOP's timeout)."""


NULL_ARRAY: Final = NullArray()


@attrs.frozen
class Verbatim:
    """A verbatim string: RESP3 ``=``, RESP2 a bulk string of ``text``.

    Attributes:
        text: the text.
        fmt: its format, exactly three ASCII characters (``txt``, ``mkd``).
    """

    text: str
    fmt: str = attrs.field(default="txt")

    @fmt.validator
    def _check_fmt(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if len(value) != 3 or not value.isascii() or ":" in value:
            raise ValueError(
                f"Verbatim fmt must be 3 ASCII characters other than ':', got {value!r}"
            )


def _to_tuple(items: Iterable[object]) -> tuple[object, ...]:
    return tuple(items)


@attrs.frozen
class Set:
    """A set reply: RESP3 ``~``, RESP2 an array. Items keep their order."""

    items: tuple[object, ...] = attrs.field(converter=_to_tuple)


@attrs.frozen
class Push:
    """An out-of-band push (pub/sub, tracking): RESP3 ``>``, RESP2 an array."""

    items: tuple[object, ...] = attrs.field(converter=_to_tuple)


_LL_HALF: Final = float(2**62)  # (double)(LLONG_MAX / 2), Redis's double2ll bound


def _format_double(value: float) -> str:
    """Write a double as Redis's ``d2string`` does.

    ``nan``, ``inf``, ``-inf``, ``0`` and ``-0``; an integral value within
    +-2**62 as an integer; anything else as ``fpconv_dtoa`` writes the
    shortest round-trip digits (no ``.0``, exponents without padding:
    ``1e-7``, ``1.5e+20``). Redis finds the digits with Grisu2, which in
    rare cases yields more digits than Python's shortest ``repr``.
    """
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    if -_LL_HALF <= value <= _LL_HALF and value.is_integer():
        return str(int(value))
    mantissa, _, exponent = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    k = (int(exponent) if exponent else 0) - len(frac_part)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    return ("-" if value < 0 else "") + _emit_digits(stripped, k)


def _emit_digits(digits: str, k: int) -> str:
    """Lay out ``digits * 10**k`` as fpconv's ``emit_digits``."""
    ndigits = len(digits)
    exp = abs(k + ndigits - 1)
    if k >= 0 and exp < ndigits + 7:
        return digits + "0" * k
    if k < 0 and (k > -7 or exp < 4):
        offset = ndigits + k
        if offset <= 0:
            return "0." + "0" * -offset + digits
        return digits[:offset] + "." + digits[offset:]
    head = digits[0] + ("." + digits[1:] if ndigits > 1 else "")
    return f"{head}e{'-' if k + ndigits - 1 < 0 else '+'}{exp}"


def _check_protocol(protocol: int) -> None:
    if protocol not in (2, 3):
        raise ValueError(f"protocol must be 2 or 3, got {protocol}")


# The replies sent most, ready-made: simple strings by text, small integers by
# value, nil by protocol. Everything else is built by _encode_into.
_SIMPLE_REPLIES: Final = {text: b"+%s\r\n" % text.encode() for text in ("OK", "PONG", "QUEUED")}
_SMALL_INTS: Final = range(-2, 1024)  # TTL's -2/-1, counts, flags
_INT_REPLIES: Final = tuple(b":%d\r\n" % n for n in _SMALL_INTS)
_INT_MIN: Final = _SMALL_INTS.start
_INT_STOP: Final = _SMALL_INTS.stop
_NIL_REPLIES: Final = {2: b"$-1\r\n", 3: b"_\r\n"}


def encode_reply(value: object, *, protocol: int = 2) -> bytes:
    """Encode ``value`` as one RESP reply.

    ===================  =====================  ======================
    value                RESP2                  RESP3
    ===================  =====================  ======================
    ``str``              ``+text`` (CR/LF sent as spaces)
    ``bytes``            ``$len`` bulk string
    ``int``              ``:n``
    ``bool``             ``:1`` / ``:0``        ``#t`` / ``#f``
    ``float``            bulk string            ``,`` double
    ``None``             ``$-1``                ``_``
    ``list``/``tuple``   ``*n`` array
    ``dict``             flat ``*2n`` array     ``%n`` map
    :class:`NullArray`   ``*-1``                ``_``
    :class:`ErrorReply`  ``-message``
    :class:`Verbatim`    bulk string of text    ``=len`` ``fmt:text``
    :class:`Set`         ``*n``                 ``~n``
    :class:`Push`        ``*n``                 ``>n``
    ===================  =====================  ======================

    Floats are written as Redis writes them (:func:`_format_double`), in
    both protocols.

    Args:
        value: the reply, nested as deep as needed.
        protocol: 2 or 3 (after ``HELLO 3``).

    Raises:
        ValueError: ``protocol`` is not 2 or 3.
        TypeError: ``value`` holds something that has no RESP form (a bug
            of the caller, not of the client).
    """
    if protocol == 2 or protocol == 3:
        # The common replies first, without building a list.
        if type(value) is bytes:
            return b"$%d\r\n%b\r\n" % (len(value), value)
        if value is None:
            return _NIL_REPLIES[protocol]
        if type(value) is str:
            simple = _SIMPLE_REPLIES.get(value)
            if simple is not None:
                return simple
        elif type(value) is int:  # not bool
            if value in _SMALL_INTS:
                return _INT_REPLIES[value + 2]
            return b":%d\r\n" % value
    _check_protocol(protocol)
    out: list[bytes] = []
    _encode_into(out, value, protocol == 3)
    return b"".join(out)


def encode_replies(
    values: Iterable[object],
    *,
    protocol: int = 2,
    convert: Callable[[object], object] | None = None,
) -> list[bytes]:
    """Encode each of ``values`` as :func:`encode_reply` does, in order.

    The replies a pipeline gets most (bulk strings, nil, ``OK``, small
    integers) are written inline, without a call per value; the rest go
    through :func:`encode_reply`. The result is the same list as
    ``[encode_reply(v, protocol=protocol) for v in values]``.

    Args:
        values: the replies.
        protocol: 2 or 3.
        convert: applied first to each value that is not ``bytes``,
            ``None``, ``str`` or ``int`` (a server maps its own error
            objects to :class:`ErrorReply` this way).

    Raises:
        ValueError: ``protocol`` is not 2 or 3.
        TypeError: as :func:`encode_reply`.
    """
    _check_protocol(protocol)
    nil = _NIL_REPLIES[protocol]
    simple_replies = _SIMPLE_REPLIES
    int_replies = _INT_REPLIES
    out: list[bytes] = []
    append = out.append
    for value in values:
        if type(value) is bytes:
            append(b"$%d\r\n%b\r\n" % (len(value), value))
        elif value is None:
            append(nil)
        elif type(value) is str and value in simple_replies:
            append(simple_replies[value])
        elif type(value) is int and _INT_MIN <= value < _INT_STOP:
            append(int_replies[value - _INT_MIN])
        else:
            if convert is not None and type(value) is not str and type(value) is not int:
                value = convert(value)
            append(encode_reply(value, protocol=protocol))
    return out


def _encode_into(out: list[bytes], value: object, resp3: bool) -> None:
    # Ordered by frequency; bool before int since bool is an int.
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    elif isinstance(value, str):
        out.append(b"+" + _encode_text(_one_line(value)) + b"\r\n")
    elif value is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(value, bool):
        if resp3:
            out.append(b"#t\r\n" if value else b"#f\r\n")
        else:
            out.append(b":1\r\n" if value else b":0\r\n")
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, list | tuple):
        if resp3 and isinstance(value, FieldList):
            out.append(b"%%%d\r\n" % (len(value) // 2))  # a map: names and values alternate
        else:
            out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode_into(out, item, resp3)
    elif isinstance(value, ErrorReply):
        out.append(b"-" + _encode_text(_one_line(value.message)) + b"\r\n")
    elif isinstance(value, dict):
        if resp3:
            out.append(b"%%%d\r\n" % len(value))
        else:
            out.append(b"*%d\r\n" % (2 * len(value)))
        for key, item in value.items():
            _encode_into(out, key, resp3)
            _encode_into(out, item, resp3)
    elif isinstance(value, float):
        text = _format_double(value).encode("ascii")
        if resp3:
            out.append(b"," + text + b"\r\n")
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(text), text))
    elif isinstance(value, NullArray):
        out.append(b"_\r\n" if resp3 else b"*-1\r\n")
    elif isinstance(value, Set | Push):
        if resp3:
            out.append(b"%s%d\r\n" % (b"~" if isinstance(value, Set) else b">", len(value.items)))
        else:
            out.append(b"*%d\r\n" % len(value.items))
        for item in value.items:
            _encode_into(out, item, resp3)
    elif isinstance(value, Verbatim):
        body = _encode_text(value.text)
        if resp3:
            body = value.fmt.encode("ascii") + b":" + body
            out.append(b"=%d\r\n" % len(body))
        else:
            out.append(b"$%d\r\n" % len(body))
        out.append(body)
        out.append(b"\r\n")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as a RESP reply")


def encode_push(items: Iterable[bytes | int | None], *, protocol: int = 2) -> bytes:
    """A pub/sub push of bulk strings, integers and nils: RESP3 ``>n``, RESP2 ``*n``.

    What :func:`encode_reply` gives for ``Push(items)``, without its general
    dispatch: a published message (``message``, channel, payload) is encoded
    once per receiver, so this is on the path of every delivery.

    Raises:
        ValueError: ``protocol`` is not 2 or 3.
    """
    _check_protocol(protocol)
    out = [b""]
    count = 0
    for item in items:
        count += 1
        if item is None:
            out.append(b"_\r\n" if protocol == 3 else b"$-1\r\n")
        elif isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(item), item))
    out[0] = (b">%d\r\n" if protocol == 3 else b"*%d\r\n") % count
    return b"".join(out)


def encode_command(*args: bytes | str | int) -> bytes:
    """Encode a request as a multibulk, as clients send it.

    ``str`` is sent as UTF-8 and ``int`` in decimal.

    Raises:
        ValueError: no arguments.
        TypeError: an argument is not bytes, str or int (``bool`` included).
    """
    if not args:
        raise ValueError("a command needs at least one argument")
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes | bytearray | memoryview):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = _encode_text(arg)
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(
                f"command arguments must be bytes, str or int, got {type(arg).__name__}"
            )
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


# --------------------------------------------------------------------------
# Client-side reply parser
# --------------------------------------------------------------------------


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`RespReplyParser.next_reply` when a reply is incomplete
(``None`` cannot say it: it is the nil reply)."""


class ReplyProtocolError(Exception):
    """The server's bytes are not RESP. The reply parser is unusable afterwards."""


_INT_RE: Final = re.compile(rb"-?[0-9]+")
_AGGREGATES: Final = frozenset(b"*%~>|")


@attrs.define
class _Frame:
    """An aggregate being read: its type byte, item count, and items so far."""

    kind: int
    size: int
    items: list[object]


def _hashable(value: object) -> object:
    """A map key must be hashable: arrays become tuples, maps tuples of pairs."""
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in value.items())
    return value


class RespReplyParser:
    """Incremental parser of RESP2 and RESP3 replies, for tests and tools.

    Replies decode to: ``str`` (simple string), ``bytes`` (bulk string),
    ``int`` (integer, big number), ``None`` (any null), ``list`` (array),
    ``dict`` (map), ``float`` (double), ``bool`` (boolean), and
    :class:`ErrorReply` (error, blob error), :class:`Verbatim`,
    :class:`Set`, :class:`Push`. Attributes (``|``) are read and dropped.

    Nested aggregates are kept on a stack, so a huge array arriving in many
    pieces is read once; a partial line or bulk is left in the buffer.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[_Frame] = []

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        if self._pos and 2 * self._pos >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_reply(self) -> object:
        """The next complete reply, or :data:`NEED_DATA`.

        Raises:
            ReplyProtocolError: the bytes are not RESP.
        """
        while True:
            token = self._read_token()
            if token is NEED_DATA:
                return NEED_DATA
            if isinstance(token, _Frame):
                if token.size > 0:
                    self._stack.append(token)
                    continue
                value = self._finish(token)
            else:
                value = token
            # Hand the value up through every aggregate it completes.
            while True:
                if value is _SKIP:
                    break
                if not self._stack:
                    return value
                top = self._stack[-1]
                top.items.append(value)
                if len(top.items) < top.size:
                    break
                self._stack.pop()
                value = self._finish(top)

    def _finish(self, frame: _Frame) -> object:
        kind, items = frame.kind, frame.items
        if kind == ord("*"):
            return items
        if kind == ord("%"):
            return {_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)}
        if kind == ord("~"):
            return Set(items)
        if kind == ord(">"):
            return Push(items)
        return _SKIP  # an attribute: dropped

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            return None
        line = bytes(self._buf[self._pos + 1 : end])
        self._pos = end + 2
        return line

    def _int(self, data: bytes) -> int:
        if _INT_RE.fullmatch(data) is None:
            raise ReplyProtocolError(f"bad integer {data!r}")
        return int(data)

    def _read_token(self) -> object:
        """One scalar, or a :class:`_Frame` header, or NEED_DATA (nothing consumed)."""
        if self._pos >= len(self._buf):
            return NEED_DATA
        start = self._pos
        kind = self._buf[start]
        line = self._line()
        if line is None:
            return NEED_DATA
        if kind == ord("+"):
            return _decode_text(line)
        if kind == ord("-"):
            return ErrorReply(_decode_text(line))
        if kind in (ord(":"), ord("(")):
            return self._int(line)
        if kind == ord("_"):
            if line:
                raise ReplyProtocolError(f"bad null {line!r}")
            return None
        if kind == ord("#"):
            if line not in (b"t", b"f"):
                raise ReplyProtocolError(f"bad boolean {line!r}")
            return line == b"t"
        if kind == ord(","):
            try:
                return float(line)
            except ValueError:
                raise ReplyProtocolError(f"bad double {line!r}") from None
        if kind in _AGGREGATES:
            size = self._int(line)
            if size < 0:
                if kind != ord("*") or size != -1:
                    raise ReplyProtocolError(f"bad aggregate length {line!r}")
                return None
            if kind in (ord("%"), ord("|")):
                size *= 2
            return _Frame(kind, size, [])
        if kind in (ord("$"), ord("="), ord("!")):
            length = self._int(line)
            if length < 0:
                if kind != ord("$") or length != -1:
                    raise ReplyProtocolError(f"bad blob length {line!r}")
                return None
            body_start = self._pos
            if len(self._buf) - body_start < length + 2:
                self._pos = start
                return NEED_DATA
            body = bytes(self._buf[body_start : body_start + length])
            if self._buf[body_start + length : body_start + length + 2] != b"\r\n":
                raise ReplyProtocolError("blob not followed by CRLF")
            self._pos = body_start + length + 2
            if kind == ord("$"):
                return body
            if kind == ord("!"):
                return ErrorReply(_decode_text(body))
            fmt = body[:3].decode("ascii", "replace")
            if len(body) < 4 or body[3:4] != b":" or not fmt.isascii() or ":" in fmt:
                raise ReplyProtocolError(f"bad verbatim string {body[:8]!r}")
            return Verbatim(_decode_text(body[4:]), fmt)
        raise ReplyProtocolError(f"unknown reply type {bytes([kind])!r}")


class _Skip(enum.Enum):
    SKIP = enum.auto()


_SKIP: Final = _Skip.SKIP
