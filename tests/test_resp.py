"""Tests of the RESP codec (kvmemo.server.resp): requests, replies, client side."""

from __future__ import annotations

import math
import string
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmemo.server.resp import (
    NEED_DATA,
    NULL_ARRAY,
    Command,
    ErrorReply,
    NullArray,
    ProtocolError,
    Push,
    ReplyProtocolError,
    RespParser,
    RespReplyParser,
    Set,
    Verbatim,
    encode_command,
    encode_reply,
)

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=200)

Event = Command | ProtocolError


def drain(parser: RespParser) -> list[Event]:
    """Every event available now, ending at the first error if any."""
    events: list[Event] = []
    while True:
        event = parser.next_event()
        if event is None:
            return events
        events.append(event)
        if isinstance(event, ProtocolError):
            return events


def parse(data: bytes, **limits: int) -> list[Event]:
    parser = RespParser(**limits)
    parser.feed(data)
    return drain(parser)


def parse_chunks(chunks: list[bytes], **limits: int) -> tuple[list[Event], int]:
    parser = RespParser(**limits)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        events.extend(drain(parser))
        if parser.failed:
            break
    return events, parser.buffered


def byte_at_a_time(data: bytes, **limits: int) -> list[Event]:
    return parse_chunks([data[i : i + 1] for i in range(len(data))], **limits)[0]


def cmd(*args: bytes) -> Command:
    return Command(args)


def err(message: str) -> ProtocolError:
    return ProtocolError(message)


# --------------------------------------------------------------------------
# Request parser: multibulk
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "events"),
    [
        (b"*1\r\n$4\r\nPING\r\n", [cmd(b"PING")]),
        (b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n", [cmd(b"GET", b"a")]),
        (
            b"*3\r\n$3\r\nset\r\n$0\r\n\r\n$4\r\n\r\n\x00\xff\r\n",
            [cmd(b"set", b"", b"\r\n\x00\xff")],
        ),
        (b"*0\r\n*1\r\n$1\r\nA\r\n", [cmd(b"A")]),
        (b"*-1\r\n*-5\r\n*1\r\n$1\r\nB\r\n", [cmd(b"B")]),
        (b"*0\r\n", []),
        (b"*1\r\n$4\r\nPI", []),
        # Like Redis, the two bytes after a count line's CR or after a bulk are skipped unread.
        (b"*1\rX$4\r\nPINGxx*1\r\n$1\r\nC\r\n", [cmd(b"PING"), cmd(b"C")]),
    ],
)
def test_multibulk_requests_parse_as_redis_does(data: bytes, events: list[Event]) -> None:
    assert parse(data) == events
    assert byte_at_a_time(data) == events


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*abc\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1x\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*01\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*+1\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*-0\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"* 1\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\n$4\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*9223372036854775808\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1048577\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\r\n$-1\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$abc\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$04\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$18446744073709551616\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\n$536870913\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*1\r\nx\r\n", "ERR Protocol error: expected '$', got 'x'"),
        (b"*2\r\n$1\r\na\r\n:1\r\n", "ERR Protocol error: expected '$', got ':'"),
        (b"*1\r\n\r\n", "ERR Protocol error: expected '$', got ' '"),
        (b"*1\r\n\n\r\n", "ERR Protocol error: expected '$', got ' '"),
        (b"*1\r\n\xff\r\n", "ERR Protocol error: expected '$', got '\udcff'"),
    ],
)
def test_bad_multibulk_fails_with_redis_wording(data: bytes, message: str) -> None:
    assert parse(data) == [err(message)]
    assert byte_at_a_time(data) == [err(message)]


def test_non_ascii_byte_in_error_goes_back_to_the_client_raw() -> None:
    [error] = parse(b"*1\r\n\xff\r\n")
    assert isinstance(error, ProtocolError)
    assert encode_reply(ErrorReply(error.message)) == (
        b"-ERR Protocol error: expected '$', got '\xff'\r\n"
    )


def test_limits_at_their_edge_are_accepted() -> None:
    assert parse(b"*1048576\r\n") == []
    assert parse(b"*1\r\n$536870912\r\n") == []
    assert parse(b"*1\r\n$3\r\nabc\r\n", max_bulk_len=3) == [cmd(b"abc")]
    assert parse(b"*1\r\n$4\r\n", max_bulk_len=3) == [
        err("ERR Protocol error: invalid bulk length")
    ]
    assert parse(b"*2\r\n", max_args=2) == []
    assert parse(b"*3\r\n", max_args=2) == [err("ERR Protocol error: invalid multibulk length")]


def test_bad_bulk_header_is_reported_only_once_its_line_is_complete() -> None:
    assert parse(b"*1\r\nx") == []
    assert parse(b"*1\r\nx\r") == []
    assert parse(b"*1\r\n$-1\r") == []


@pytest.mark.parametrize(
    ("prefix", "line_start", "message"),
    [
        (b"*", 0, "ERR Protocol error: too big mbulk count string"),
        (b"*1\r\n$", 4, "ERR Protocol error: too big bulk count string"),
        (b"*1\r\n", 4, "ERR Protocol error: too big bulk count string"),
    ],
)
def test_count_line_longer_than_inline_limit_is_too_big(
    prefix: bytes, line_start: int, message: str
) -> None:
    # The line, from its '*' or '$', may hold 64 KiB before its CR, as in Redis.
    large = prefix + b"0" * (64 * 1024 - (len(prefix) - line_start))
    assert parse(large) == []
    assert parse(large + b"0") == [err(message)]
    assert parse(large + b"\r") == []
    [bad_length] = parse(large + b"\r\n")
    assert isinstance(bad_length, ProtocolError)
    assert "too big" not in bad_length.message


def test_too_big_line_is_decided_the_same_however_it_arrives() -> None:
    data = b"*" + b"1" * 40 + b"\r\n"
    expected = [err("ERR Protocol error: too big mbulk count string")]
    assert parse(data, max_inline_len=32) == expected
    assert byte_at_a_time(data, max_inline_len=32) == expected


# --------------------------------------------------------------------------
# Request parser: inline
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"PING\n", [b"PING"]),
        (b"PING\r\n", [b"PING"]),
        (b" PING\t\r\n", [b"PING"]),
        (b"set  k\tv\n", [b"set", b"k", b"v"]),
        (b'set k "hello world"\n', [b"set", b"k", b"hello world"]),
        (b"set k 'hello world'\n", [b"set", b"k", b"hello world"]),
        (b'set k ""\n', [b"set", b"k", b""]),
        (b"echo ''\n", [b"echo", b""]),
        (b'echo "\\x41\\x4a\\xff"\n', [b"echo", b"AJ\xff"]),
        (b'echo "\\xZZ"\n', [b"echo", b"xZZ"]),
        (b'echo "\\x4"\n', [b"echo", b"x4"]),
        (b'echo "a\\nb\\r\\t\\b\\a\\\\\\"\\q"\n', [b"echo", b'a\nb\r\t\b\x07\\"q']),
        (b"echo 'it\\'s'\n", [b"echo", b"it's"]),
        (b"echo 'a\\nb\"c'\n", [b"echo", b'a\\nb"c']),
        (b'echo a"b c"\n', [b"echo", b"ab c"]),
        (b"echo a'b c'\n", [b"echo", b"ab c"]),
        (b'echo "a"\t"b"\n', [b"echo", b"a", b"b"]),
        (b'echo "a"\x0b"b"\n', [b"echo", b"a", b"b"]),
        (b"echo a\x0bb \x0bc\n", [b"echo", b"a\x0bb", b"c"]),
        (b"echo a\x00b\n", [b"echo", b"a\x00b"]),
        (b"\xcf\x80 \xff\n", [b"\xcf\x80", b"\xff"]),
    ],
)
def test_inline_request_splits_as_sdssplitargs(line: bytes, args: list[bytes]) -> None:
    assert parse(line) == [Command(tuple(args))]
    assert byte_at_a_time(line) == [Command(tuple(args))]


@pytest.mark.parametrize("line", [b"\n", b"\r\n", b" \t\n", b"\x0b\x0c\r\n", b"\r\r\n"])
def test_blank_inline_line_is_ignored(line: bytes) -> None:
    assert parse(line + b"PING\n") == [cmd(b"PING")]


@pytest.mark.parametrize(
    "line",
    [
        b'ECHO "a\n',
        b"ECHO 'a\r\n",
        b'ECHO "a"x\n',
        b"ECHO 'a'x\n",
        b'ECHO "a\\"\n',
        b"ECHO 'a\\'\n",
        b'ECHO "a\\\n',
        b'"\n',
    ],
)
def test_unbalanced_quotes_fail_with_redis_wording(line: bytes) -> None:
    assert parse(line) == [err("ERR Protocol error: unbalanced quotes in request")]


def test_inline_line_longer_than_limit_is_too_big() -> None:
    too_big = [err("ERR Protocol error: too big inline request")]
    assert parse(b"x" * 65536) == []
    assert parse(b"x" * 65537) == too_big
    assert parse(b"x" * 65536 + b"\n") == [cmd(b"x" * 65536)]
    # The CR before the LF is part of the line, as when Redis sees it arrive first.
    assert parse(b"x" * 65536 + b"\r\n") == too_big
    assert byte_at_a_time(b"x" * 64 + b"\r\n", max_inline_len=64) == too_big
    assert byte_at_a_time(b"x" * 63 + b"\r\n", max_inline_len=64) == [cmd(b"x" * 63)]


def test_inline_and_multibulk_requests_mix_in_one_stream() -> None:
    data = b"PING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n\r\nGET k\n"
    expected = [cmd(b"PING"), cmd(b"ECHO", b"hi"), cmd(b"GET", b"k")]
    assert parse(data) == expected
    assert byte_at_a_time(data) == expected


# --------------------------------------------------------------------------
# Request parser: pipelines, buffering, failure
# --------------------------------------------------------------------------


def test_pipeline_of_many_commands_in_one_feed_parses_in_order() -> None:
    commands = [encode_command("SET", f"key:{i}", b"v" * (i % 7)) for i in range(5000)]
    expected = [cmd(b"SET", f"key:{i}".encode(), b"v" * (i % 7)) for i in range(5000)]
    assert parse(b"".join(commands)) == expected


def test_pipeline_split_mid_command_in_large_chunks_parses_in_order() -> None:
    # Chunks of 70001 bytes leave a partial command behind a consumed prefix of
    # more than 64 KiB, so the buffer is compacted between feeds.
    commands = [encode_command("SET", f"key:{i}", b"v" * (i % 50)) for i in range(8000)]
    expected = [cmd(b"SET", f"key:{i}".encode(), b"v" * (i % 50)) for i in range(8000)]
    data = b"".join(commands)
    chunks = [data[i : i + 70001] for i in range(0, len(data), 70001)]
    assert len(chunks) > 3
    assert parse_chunks(chunks) == (expected, 0)


def test_pipeline_fed_one_byte_at_a_time_parses_in_order() -> None:
    data = b"".join(encode_command("INCR", f"n{i}") for i in range(200))
    assert byte_at_a_time(data) == [cmd(b"INCR", f"n{i}".encode()) for i in range(200)]


def test_large_bulk_arriving_in_pieces_is_one_argument() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    data = encode_command("SET", "k", value)
    events, buffered = parse_chunks([data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert events == [cmd(b"SET", b"k", value)]
    assert buffered == 0


def test_buffered_counts_unparsed_bytes_and_arguments_already_read() -> None:
    parser = RespParser()
    parser.feed(b"*2\r\n$3\r\nfoo\r\n$3\r\nba")
    assert parser.buffered == len(b"*2\r\n$3\r\nfoo\r\n$3\r\nba")
    assert parser.next_event() is None
    assert parser.buffered == len(b"foo") + len(b"ba")  # the "$3" line is consumed
    parser.feed(b"r\r\n")
    assert parser.next_event() == cmd(b"foo", b"bar")
    assert parser.buffered == 0
    assert parser.next_event() is None


def test_query_buffer_over_limit_closes_without_reply() -> None:
    parser = RespParser(max_buffer=16)
    parser.feed(b"*1\r\n$4\r\nPING\r\n")  # 14 bytes
    parser.feed(b"*1")  # 16 bytes: at the limit
    assert not parser.failed
    parser.feed(b"\r")
    assert parser.failed
    expected = ProtocolError("Closing client that reached max query buffer length", reply=False)
    assert parser.next_event() == expected
    assert parser.buffered == 0


def test_parser_is_dead_after_a_protocol_error() -> None:
    parser = RespParser()
    parser.feed(b"PING\r\n*x\r\n*1\r\n$4\r\nPING\r\n")
    assert parser.next_event() == cmd(b"PING")
    error = parser.next_event()
    assert error == err("ERR Protocol error: invalid multibulk length")
    assert parser.failed
    assert parser.error == error
    parser.feed(b"PING\r\n")
    assert parser.next_event() == error
    assert parser.next_event() == error
    assert parser.buffered == 0


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_bulk_len": -1}, "max_bulk_len must be >= 0, got -1"),
        ({"max_args": 0}, "max_args must be >= 1, got 0"),
        ({"max_inline_len": 0}, "max_inline_len must be >= 1, got 0"),
        ({"max_buffer": 0}, "max_buffer must be >= 1, got 0"),
    ],
)
def test_parser_limits_are_checked(limits: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{message}$"):
        RespParser(**limits)


# --------------------------------------------------------------------------
# Request parser: properties
# --------------------------------------------------------------------------

FRAGMENTS = st.one_of(
    st.sampled_from(
        [b"*", b"$", b"\r\n", b"\r", b"\n", b"0", b"1", b"2", b"3", b"-1", b"12", b" ", b"\t"]
        + [b'"', b"'", b"\\", b"\\x4", b"x", b"GET", b"\x00", b"\xff", b"\x0b"]
    ),
    st.binary(max_size=6),
)
REQUEST_BYTES = st.lists(FRAGMENTS, max_size=40).map(b"".join)
SMALL_LIMITS = {"max_bulk_len": 8, "max_args": 4, "max_inline_len": 12}


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@FAST
@given(data=REQUEST_BYTES, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_arbitrary_bytes_never_raise_and_give_same_events_however_split(
    data: bytes, cuts: list[int]
) -> None:
    for limits in (SMALL_LIMITS, {}):
        whole = parse_chunks([data], **limits)
        assert parse_chunks(split_at(data, cuts), **limits) == whole
        assert byte_at_a_time(data, **limits) == whole[0]
        for event in whole[0]:
            assert isinstance(event, Command | ProtocolError)
            if isinstance(event, Command):
                assert event.args
            else:
                assert event.message.startswith("ERR Protocol error: ")
                assert "\r" not in event.message
                assert "\n" not in event.message


@FAST
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_random_binary_never_raises(data: bytes, cuts: list[int]) -> None:
    events, _ = parse_chunks(split_at(data, cuts), **SMALL_LIMITS)
    assert all(isinstance(e, Command | ProtocolError) for e in events)


ARGS = st.lists(st.binary(max_size=20), min_size=1, max_size=6)


@FAST
@given(commands=st.lists(ARGS, min_size=1, max_size=5), cuts=st.lists(st.integers(min_value=0)))
def test_encoded_commands_parse_back_to_their_args(
    commands: list[list[bytes]], cuts: list[int]
) -> None:
    data = b"".join(encode_command(*args) for args in commands)
    expected = [Command(tuple(args)) for args in commands]
    assert parse_chunks(split_at(data, cuts)) == (expected, 0)


@FAST
@given(args=ARGS)
def test_inline_args_quoted_with_hex_escapes_parse_back(args: list[bytes]) -> None:
    quoted = [b'"' + b"".join(b"\\x%02x" % byte for byte in arg) + b'"' for arg in args]
    assert parse(b" ".join(quoted) + b"\r\n") == [Command(tuple(args))]


# --------------------------------------------------------------------------
# Reply encoder
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "resp2", "resp3"),
    [
        ("OK", b"+OK\r\n", b"+OK\r\n"),
        ("a\r\nb\nc", b"+a  b c\r\n", b"+a  b c\r\n"),
        ("caf\u00e9", b"+caf\xc3\xa9\r\n", b"+caf\xc3\xa9\r\n"),
        (b"", b"$0\r\n\r\n", b"$0\r\n\r\n"),
        (b"a\r\nb", b"$4\r\na\r\nb\r\n", b"$4\r\na\r\nb\r\n"),
        (bytearray(b"xy"), b"$2\r\nxy\r\n", b"$2\r\nxy\r\n"),
        (0, b":0\r\n", b":0\r\n"),
        (-42, b":-42\r\n", b":-42\r\n"),
        (2**63 - 1, b":9223372036854775807\r\n", b":9223372036854775807\r\n"),
        (True, b":1\r\n", b"#t\r\n"),
        (False, b":0\r\n", b"#f\r\n"),
        (None, b"$-1\r\n", b"_\r\n"),
        (NULL_ARRAY, b"*-1\r\n", b"_\r\n"),
        ([], b"*0\r\n", b"*0\r\n"),
        ((b"a", 1, None), b"*3\r\n$1\r\na\r\n:1\r\n$-1\r\n", b"*3\r\n$1\r\na\r\n:1\r\n_\r\n"),
        ([[b"x"], []], b"*2\r\n*1\r\n$1\r\nx\r\n*0\r\n", b"*2\r\n*1\r\n$1\r\nx\r\n*0\r\n"),
        (
            ErrorReply("WRONGTYPE Operation against a key holding the wrong kind of value"),
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ),
        (ErrorReply("ERR bad\r\nline"), b"-ERR bad  line\r\n", b"-ERR bad  line\r\n"),
        (ErrorReply("ERR \udcff"), b"-ERR \xff\r\n", b"-ERR \xff\r\n"),
        ({}, b"*0\r\n", b"%0\r\n"),
        (
            {b"a": 1, "b": [True]},
            b"*4\r\n$1\r\na\r\n:1\r\n+b\r\n*1\r\n:1\r\n",
            b"%2\r\n$1\r\na\r\n:1\r\n+b\r\n*1\r\n#t\r\n",
        ),
        (1.5, b"$3\r\n1.5\r\n", b",1.5\r\n"),
        (Verbatim("hi"), b"$2\r\nhi\r\n", b"=6\r\ntxt:hi\r\n"),
        (Verbatim("# x", "mkd"), b"$3\r\n# x\r\n", b"=7\r\nmkd:# x\r\n"),
        (Set([b"a", 1]), b"*2\r\n$1\r\na\r\n:1\r\n", b"~2\r\n$1\r\na\r\n:1\r\n"),
        (
            Push(["message", b"ch"]),
            b"*2\r\n+message\r\n$2\r\nch\r\n",
            b">2\r\n+message\r\n$2\r\nch\r\n",
        ),
    ],
)
def test_reply_encodes_exactly(value: object, resp2: bytes, resp3: bytes) -> None:
    assert encode_reply(value) == resp2
    assert encode_reply(value, protocol=2) == resp2
    assert encode_reply(value, protocol=3) == resp3


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (float("nan"), "nan"),
        (0.0, "0"),
        (-0.0, "-0"),
        (100.0, "100"),
        (-3.0, "-3"),
        (3.14, "3.14"),
        (0.5, "0.5"),
        (-2.5, "-2.5"),
        (0.001, "0.001"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (1.234567e-5, "1.234567e-5"),
        (123456.789, "123456.789"),
        (2.0**62, "4611686018427387904"),
        (2.0**63, "9223372036854776000"),
        (1.2345678901234567e19, "12345678901234567000"),
        (1e20, "1e+20"),
        (-1e100, "-1e+100"),
        (5e-324, "5e-324"),
    ],
)
def test_double_is_written_as_redis_writes_it(value: float, text: str) -> None:
    assert encode_reply(value, protocol=3) == b"," + text.encode() + b"\r\n"
    assert encode_reply(value) == b"$%d\r\n%s\r\n" % (len(text), text.encode())


def test_reply_of_unknown_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^cannot encode object as a RESP reply$"):
        encode_reply(object())
    with pytest.raises(TypeError, match=r"^cannot encode set as a RESP reply$"):
        encode_reply([{1, 2}])


def test_reply_protocol_must_be_2_or_3() -> None:
    with pytest.raises(ValueError, match=r"^protocol must be 2 or 3, got 1$"):
        encode_reply(None, protocol=1)


@pytest.mark.parametrize("fmt", ["tx", "text", "t:x", "t\u00e9x"])
def test_verbatim_format_must_be_three_ascii_characters(fmt: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^Verbatim fmt must be 3 ASCII characters other than ':', got '{fmt}'$",
    ):
        Verbatim("x", fmt)


def test_encode_command_writes_a_multibulk() -> None:
    assert encode_command("SET", b"k\x00", 15, -1) == (
        b"*4\r\n$3\r\nSET\r\n$2\r\nk\x00\r\n$2\r\n15\r\n$2\r\n-1\r\n"
    )
    assert encode_command("\u00e9") == b"*1\r\n$2\r\n\xc3\xa9\r\n"


def test_encode_command_refuses_no_args_and_other_types() -> None:
    with pytest.raises(ValueError, match=r"^a command needs at least one argument$"):
        encode_command()
    with pytest.raises(TypeError, match=r"^command arguments must be bytes, str or int, got bool$"):
        encode_command("SET", "k", True)
    with pytest.raises(
        TypeError, match=r"^command arguments must be bytes, str or int, got float$"
    ):
        encode_command("SET", "k", 1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Reply parser
# --------------------------------------------------------------------------


def replies(data: bytes) -> list[object]:
    parser = RespReplyParser()
    parser.feed(data)
    out: list[object] = []
    while (reply := parser.next_reply()) is not NEED_DATA:
        out.append(reply)
    return out


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"+OK\r\n", "OK"),
        (b"-ERR no\r\n", ErrorReply("ERR no")),
        (b":-7\r\n", -7),
        (b"$3\r\na\r\n\r\n", b"a\r\n"),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"_\r\n", None),
        (b"*2\r\n:1\r\n*0\r\n", [1, []]),
        (b"%1\r\n+k\r\n#f\r\n", {"k": False}),
        (b"%1\r\n*1\r\n:1\r\n:2\r\n", {(1,): 2}),
        (b",3.25\r\n", 3.25),
        (b",-inf\r\n", float("-inf")),
        (b"(123456789012345678901234567890\r\n", 123456789012345678901234567890),
        (b"!9\r\nSYNTAX no\r\n", ErrorReply("SYNTAX no")),
        (b"=8\r\nmkd:# hi\r\n", Verbatim("# hi", "mkd")),
        (b"~1\r\n:1\r\n", Set([1])),
        (b">2\r\n+message\r\n$1\r\nx\r\n", Push(["message", b"x"])),
        (b"|1\r\n+ttl\r\n:3\r\n:42\r\n", 42),
        (b"*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n", [1, 2]),
        (b"+caf\xc3\xa9 \xff\r\n", "caf\u00e9 \udcff"),
    ],
)
def test_reply_parser_decodes_every_form(data: bytes, value: object) -> None:
    assert replies(data) == [value]
    parser = RespReplyParser()
    for i in range(len(data)):
        assert parser.next_reply() is NEED_DATA
        parser.feed(data[i : i + 1])
    assert parser.next_reply() == value
    assert parser.next_reply() is NEED_DATA


def test_reply_parser_decodes_nan() -> None:
    [value] = replies(b",nan\r\n")
    assert isinstance(value, float)
    assert math.isnan(value)


@pytest.mark.parametrize(
    "data",
    [b"?x\r\n", b":1x\r\n", b"#x\r\n", b",abc\r\n", b"$2\r\nabcd", b"=3\r\nabc\r\n", b"*-2\r\n"],
)
def test_reply_parser_refuses_what_is_not_resp(data: bytes) -> None:
    parser = RespReplyParser()
    parser.feed(data)
    with pytest.raises(ReplyProtocolError):
        parser.next_reply()


# --------------------------------------------------------------------------
# Reply round trip
# --------------------------------------------------------------------------

TEXT = st.text(max_size=8)
KEY_TEXT = st.text(alphabet=st.characters(exclude_characters="\r\n"), max_size=6)
SCALARS = st.one_of(
    st.binary(max_size=8),
    TEXT,
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    TEXT.map(ErrorReply),
    st.just(NULL_ARRAY),
    st.builds(Verbatim, TEXT, st.text(alphabet=string.ascii_letters, min_size=3, max_size=3)),
)
KEYS = st.one_of(st.binary(max_size=4), KEY_TEXT, st.integers())
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(KEYS, children, max_size=3),
        st.lists(children, max_size=4).map(Set),
        st.lists(children, max_size=4).map(Push),
    ),
    max_leaves=20,
)


def one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def decodes_as(got: object, sent: object, resp3: bool) -> bool:
    """Whether ``got`` is what the reply parser should give for ``sent``."""
    if isinstance(sent, bool):
        return got is sent if resp3 else (type(got) is int and got == int(sent))
    if isinstance(sent, float):
        if resp3:
            return type(got) is float and got == sent
        return type(got) is bytes and float(got) == sent
    if isinstance(sent, int):
        return type(got) is int and got == sent
    if isinstance(sent, bytes):
        return type(got) is bytes and got == sent
    if isinstance(sent, str):
        return type(got) is str and got == one_line(sent)
    if sent is None or isinstance(sent, NullArray):
        return got is None
    if isinstance(sent, ErrorReply):
        return got == ErrorReply(one_line(sent.message))
    if isinstance(sent, Verbatim):
        return got == sent if resp3 else got == sent.text.encode()
    if isinstance(sent, list | tuple):
        return (
            type(got) is list
            and len(got) == len(sent)
            and all(decodes_as(g, s, resp3) for g, s in zip(got, sent, strict=True))
        )
    if isinstance(sent, Set | Push):
        if not resp3:
            return decodes_as(got, sent.items, resp3)
        return type(got) is type(sent) and decodes_as(list(got.items), sent.items, resp3)
    if isinstance(sent, dict):
        if not resp3:
            return decodes_as(got, [x for pair in sent.items() for x in pair], resp3)
        return (
            type(got) is dict
            and got.keys() == sent.keys()
            and all(decodes_as(got[k], v, resp3) for k, v in sent.items())
        )
    raise AssertionError(f"unexpected value {sent!r}")


@FAST
@given(
    values=st.lists(VALUES, min_size=1, max_size=4),
    protocol=st.sampled_from([2, 3]),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_encoded_replies_parse_back(values: list[object], protocol: int, cuts: list[int]) -> None:
    data = b"".join(encode_reply(v, protocol=protocol) for v in values)
    parser = RespReplyParser()
    got: list[object] = []
    for chunk in split_at(data, cuts):
        parser.feed(chunk)
        while (reply := parser.next_reply()) is not NEED_DATA:
            got.append(reply)
    assert decodes_as(got, values, protocol == 3)


# --------------------------------------------------------------------------
# Request parser: the fast path reads what the state machine reads
# --------------------------------------------------------------------------


def parse_chunks_slow(chunks: list[bytes], **limits: int) -> tuple[list[Event], int]:
    """parse_chunks with the fast path off: the state machine alone."""
    with mock.patch.object(RespParser, "_fast", return_value=None):
        return parse_chunks(chunks, **limits)


def parse_chunks_batched(chunks: list[bytes], **limits: int) -> tuple[list[Event], int]:
    """parse_chunks through next_commands, as the server reads."""
    parser = RespParser(**limits)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        commands, error = parser.next_commands()
        events += [Command(args) for args in commands]
        if error is not None:
            events.append(error)
            break
    return events, parser.buffered


PIPELINES = st.lists(
    st.one_of(
        ARGS.map(lambda args: encode_command(*args)),
        REQUEST_BYTES,
        st.sampled_from(
            [b"PING\r\n", b"*0\r\n", b"*-1\r\n", b"*1\r\n$4\r\nPINGxx", b"*2\r\n$9\r\n"]
        ),
    ),
    max_size=8,
).map(b"".join)


@FAST
@given(data=PIPELINES, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_fast_path_and_next_commands_give_the_state_machines_events(
    data: bytes, cuts: list[int]
) -> None:
    for limits in (
        SMALL_LIMITS,
        {},
        {"max_inline_len": 1},
        {"max_inline_len": 2},
        {"max_args": 1, "max_bulk_len": 0},
    ):
        for chunks in ([data], split_at(data, cuts)):
            expected = parse_chunks_slow(chunks, **limits)
            assert parse_chunks(chunks, **limits) == expected
            assert parse_chunks_batched(chunks, **limits) == expected


def test_fast_path_reads_long_counts_and_lengths_as_the_state_machine() -> None:
    value = b"v" * 5000
    data = encode_command(*([b"k"] * 1500)) + encode_command(b"SET", b"k", value) + b"*1\r\n"
    for chunks in ([data], [data[:7000], data[7000:]]):
        assert parse_chunks(chunks) == parse_chunks_slow(chunks)
        assert parse_chunks_batched(chunks) == parse_chunks_slow(chunks)
    events, buffered = parse_chunks_batched([data])
    assert events == [Command((b"k",) * 1500), cmd(b"SET", b"k", value)]
    assert buffered == 0  # the unfinished request's count line is consumed
    # Over the limits: the same errors from both.
    for limits in ({"max_args": 1499}, {"max_bulk_len": 4999}):
        assert parse_chunks_batched([data], **limits) == parse_chunks_slow([data], **limits)


def test_small_pieces_after_a_large_held_bulk_are_appended_in_place() -> None:
    parser = RespParser()
    data = encode_command(b"SET", b"k", b"x" * 100_000) + encode_command(b"GET", b"k")
    parser.feed(data[:70_000])
    assert parser.next_commands() == ([], None)
    for i in range(70_000, len(data), 1000):
        parser.feed(data[i : i + 1000])
    assert parser.next_commands() == ([(b"SET", b"k", b"x" * 100_000), (b"GET", b"k")], None)
    assert parser.buffered == 0


def test_fast_path_keeps_the_line_limit_of_length_lines() -> None:
    data = b"*1\r\n$10\r\n0123456789\r\n"
    expected = [err("ERR Protocol error: too big bulk count string")]
    assert parse(data, max_inline_len=2) == expected
    assert parse_chunks_batched([data], max_inline_len=2)[0] == expected


PING_THEN_GET = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n"


@pytest.mark.parametrize("cut", range(14, len(PING_THEN_GET)))
def test_a_request_is_taken_only_once_its_last_crlf_has_arrived(cut: int) -> None:
    chunks = [PING_THEN_GET[:cut], PING_THEN_GET[cut:]]
    expected = parse_chunks_slow(chunks)
    assert expected == ([cmd(b"PING"), cmd(b"GET", b"foo")], 0)
    assert parse_chunks_batched(chunks) == expected
    parser = RespParser()
    parser.feed(chunks[0])
    assert parser.next_commands() == ([(b"PING",)], None)
