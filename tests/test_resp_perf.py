"""The Redis port's fast paths give exactly what the general paths give.

The front end has shortcuts for what pipelines and ``redis-benchmark`` send
most (kvmemo.server.resp and kvmemo.server.resp_server): per-parser fast
tables and a split walk in the request parser, batch reply encoding, a lone
data command going straight to the engine, early replies merged into the
engine's. Each test here holds a shortcut to the reference it replaces:
the state machine, :func:`encode_reply`, the batch path, Redis's order.
"""

from __future__ import annotations

from unittest import mock

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_resp_server import Client, running

from kvmemo.server import resp_server
from kvmemo.server.resp import (
    Command,
    ErrorReply,
    NullArray,
    ProtocolError,
    RespParser,
    Set,
    encode_command,
    encode_replies,
    encode_reply,
)

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=200)
TIMEOUT = 30  # seconds per network test; real sockets and real time

Event = Command | ProtocolError


# -- the request parser: fast tables and the split walk ------------------------------------


def _events(chunks: list[bytes], *, batched: bool, **limits: int) -> tuple[list[Event], int]:
    parser = RespParser(**limits)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        if batched:
            commands, error = parser.next_commands()
            events += [Command(args) for args in commands]
            if error is not None:
                events.append(error)
        else:
            while (event := parser.next_event()) is not None:
                events.append(event)
                if isinstance(event, ProtocolError):
                    break
        if parser.failed:
            break
    return events, parser.buffered


def _state_machine(chunks: list[bytes], **limits: int) -> tuple[list[Event], int]:
    with mock.patch.object(RespParser, "_fast", return_value=None):
        return _events(chunks, batched=False, **limits)


# Limits around the fast tables' edges: lines of 1 to 5 bytes ("*1" .. "$1024"),
# counts and lengths just under and over what a request below uses.
EDGE_LIMITS: list[dict[str, int]] = [
    {},
    {"max_inline_len": 2},
    {"max_inline_len": 3},
    {"max_inline_len": 4},
    {"max_inline_len": 5},
    {"max_args": 2},
    {"max_args": 5},
    {"max_bulk_len": 3},
    {"max_bulk_len": 1023, "max_args": 1023},
    {"max_args": 6, "max_bulk_len": 10, "max_inline_len": 3},
]

REQUEST = st.lists(st.binary(max_size=12), min_size=1, max_size=9).map(
    lambda args: encode_command(*args)
)
STREAM = st.lists(
    st.one_of(
        REQUEST,
        st.sampled_from(
            [
                b"PING\r\n",
                b"*0\r\n",
                b"*3\r\n$1\r\na\r\n",  # unfinished
                b"*2\r\n$01\r\na\r\n$1\r\nb\r\n",  # not canonical: the state machine refuses it
                b"*1\r\n$4\r\nab\r\n\r\n",  # a value holding CRLF
                b"*1\r\n$1024\r\n" + b"x" * 1024 + b"\r\n",
            ]
        ),
    ),
    max_size=8,
).map(b"".join)


@FAST
@given(data=STREAM, cut=st.integers(min_value=0, max_value=200))
def test_fast_tables_and_split_walk_read_what_the_state_machine_reads(
    data: bytes, cut: int
) -> None:
    for limits in EDGE_LIMITS:
        for chunks in ([data], [data[:cut], data[cut:]]):
            expected = _state_machine(chunks, **limits)
            assert _events(chunks, batched=True, **limits) == expected
            assert _events(chunks, batched=False, **limits) == expected


def test_a_long_request_is_checked_in_one_comparison_and_still_refused_when_wrong() -> None:
    args = [b"MSET"] + [b"k%d" % i for i in range(20)]
    good = encode_command(*args)
    bad = good.replace(b"$3\r\nk10\r\n", b"$3\r\nk1\r\n\r\n")  # declared 3, sent 2 + CRLF
    for data in (good * 3, good + bad + good):
        assert _events([data], batched=True) == _state_machine([data])
    events, _ = _events([good * 3], batched=True)
    assert events == [Command(tuple(args))] * 3


# -- replies: encode_replies ---------------------------------------------------------------

VALUES = st.recursive(
    st.one_of(
        st.binary(max_size=8),
        st.none(),
        st.sampled_from(["OK", "PONG", "QUEUED", "other", "with\r\nbreaks"]),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=-3, max_value=1025),
        st.booleans(),
        st.floats(allow_nan=False),
        st.builds(ErrorReply, st.text(max_size=8)),
        st.just(NullArray()),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.builds(Set, st.lists(inner))),
    max_leaves=6,
)


@FAST
@given(values=st.lists(VALUES, max_size=10))
def test_encode_replies_gives_what_encode_reply_gives(values: list[object]) -> None:
    for protocol in (2, 3):
        expected = [encode_reply(v, protocol=protocol) for v in values]
        assert encode_replies(values, protocol=protocol) == expected


class _Failure(Exception):
    """Stands for a server's own error object in a batch of results."""


def test_encode_replies_converts_only_values_that_are_not_plain() -> None:
    seen: list[object] = []

    def convert(value: object) -> object:
        seen.append(value)
        return ErrorReply(f"ERR {value}") if isinstance(value, _Failure) else value

    failure = _Failure("boom")
    values: list[object] = [b"v", None, "OK", 7, "text", 99999, failure, [b"x"], True]
    assert encode_replies(values, convert=convert) == [
        b"$1\r\nv\r\n",
        b"$-1\r\n",
        b"+OK\r\n",
        b":7\r\n",
        b"+text\r\n",
        b":99999\r\n",
        b"-ERR boom\r\n",
        b"*1\r\n$1\r\nx\r\n",
        b":1\r\n",
    ]
    assert seen == [failure, [b"x"], True]


def test_encode_replies_refuses_an_unknown_protocol() -> None:
    with pytest.raises(ValueError, match=r"^protocol must be 2 or 3, got 4$"):
        encode_replies([b"x"], protocol=4)


# -- the server: lone commands, batches, early replies ------------------------------------


def test_merge_puts_each_early_reply_at_its_place() -> None:
    merge = resp_server._merge
    assert merge([b"a", b"b"], [(0, b"0"), (2, b"2"), (4, b"4")]) == [
        b"0",
        b"a",
        b"2",
        b"b",
        b"4",
    ]
    assert merge([b"a"], [(1, b"1"), (2, b"2")]) == [b"a", b"1", b"2"]
    assert merge([b"a", b"b"], []) == [b"a", b"b"]


def _arity(name: str) -> ErrorReply:
    return ErrorReply(f"ERR wrong number of arguments for '{name}' command")


UNKNOWN = ErrorReply("ERR unknown command 'NOSUCH', with args beginning with: ")
NOAUTH = ErrorReply("NOAUTH Authentication required.")
NOT_INTEGER = ErrorReply("ERR value is not an integer or out of range")


async def test_early_replies_and_engine_results_keep_the_order_of_the_requests() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            requests = [
                ("NOSUCH",),  # an early reply first
                ("SET", "a", "1"),
                ("GeT",),  # a spelling not seen yet, wrong arity
                ("GET", "a"),
                ("GeT",),  # the same, now remembered
                ("PING",),
                ("INCR", "a"),
                ("GET",),
                ("NOSUCH",),  # and last
            ]
            await client.stream.send_all(b"".join(encode_command(*r) for r in requests))
            expected = [UNKNOWN, "OK", _arity("get"), b"1", _arity("get"), "PONG", 2]
            expected += [_arity("get"), UNKNOWN]
            assert await client.replies(len(requests)) == expected
            # Only early replies: no engine call at all.
            await client.stream.send_all(encode_command("PING") + encode_command("NOSUCH"))
            assert await client.replies(2) == ["PONG", UNKNOWN]


async def test_a_lone_command_and_the_same_in_a_pipeline_get_the_same_replies() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            requests: list[tuple[str, ...]] = [
                ("SET", "n", "abc"),
                ("INCR", "n"),  # an engine error
                ("GET", "n"),
                ("GET", "missing"),
                ("SET", "c", "41"),
                ("INCR", "c"),
                ("MGET", "n", "c", "missing"),
                ("GET",),  # wrong arity
            ]
            lone = [await client.call(*r) for r in requests]
            await client.stream.send_all(b"".join(encode_command(*r) for r in requests))
            piped = await client.replies(len(requests))
            assert lone == ["OK", NOT_INTEGER, b"abc", None, "OK", 42, [b"abc", b"42", None]] + [
                _arity("get")
            ]
            assert piped == ["OK", NOT_INTEGER, b"abc", None, "OK", 42, [b"abc", b"42", None]] + [
                _arity("get")
            ]


async def test_a_pipeline_authenticating_midway_is_refused_before_and_served_after() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(tokens=frozenset({"pw"})) as server:
            client = await Client.connect(server)
            requests = [
                ("SET", "k", "v"),
                ("GET",),  # arity comes before authentication, as in Redis
                ("AUTH", "pw"),
                ("SET", "k", "v"),
                ("GET", "k"),
            ]
            await client.stream.send_all(b"".join(encode_command(*r) for r in requests))
            assert await client.replies(5) == [NOAUTH, _arity("get"), "OK", "OK", b"v"]


async def test_every_command_is_counted_once_in_total_commands_processed() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            assert await client.call("CONFIG", "RESETSTAT") == "OK"  # counted, then reset
            assert await client.call("GET", "k") is None  # 1: a lone command
            batch = [("SET", "k", "v"), ("NOSUCH",), ("GET", "k"), ("PING",)]
            await client.stream.send_all(b"".join(encode_command(*r) for r in batch))
            assert await client.replies(4) == ["OK", UNKNOWN, b"v", "PONG"]  # 2 to 5
            info = await client.call("INFO", "stats")  # 6
            assert isinstance(info, bytes)
            assert b"total_commands_processed:6\r\n" in info


async def test_client_list_reports_the_last_command_of_a_pipeline() -> None:
    with trio.fail_after(TIMEOUT):
        async with running() as server:
            client = await Client.connect(server)
            other = await Client.connect(server)
            client_id = await client.call("CLIENT", "ID")
            batch = encode_command("SET", "k", "v") + encode_command("GET", "k")
            await client.stream.send_all(batch)
            assert await client.replies(2) == ["OK", b"v"]
            listing = await other.call("CLIENT", "LIST")
            assert isinstance(listing, bytes)
            (line,) = [x for x in listing.decode().splitlines() if x.startswith(f"id={client_id} ")]
            assert " cmd=get " in line
            assert " qbuf=0 " in line
