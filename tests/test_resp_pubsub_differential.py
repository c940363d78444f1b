"""Pub/sub on the Redis port against a real ``redis-server`` (Debian's 7.0), byte for byte.

Uses the servers and the raw connections of :mod:`test_redis_differential`
(Redis as a subprocess, KVMemo's port in a thread; every read bounded).

Each :class:`Flow` runs on both servers with two connections per server: a
subscriber (RESP2, or RESP3 after ``HELLO 3``) and a publisher (RESP2). A
publisher step sends one command and reads its one reply. Subscriber steps
are sent without reading (pub/sub answers several frames per command); the
subscriber's output is read whenever a publisher step comes and at the end,
by sending ``PING`` with a marker and reading every frame up to the marker's
reply (``pong`` + marker in RESP2 subscribed mode, the marker otherwise): so
each publish happens after the subscriber's previous commands ran, on both
servers. The two servers' transcripts (the subscriber's output between
syncs, the publisher's replies) must be the same bytes. A flow ends with
``RESET`` on its subscriber (synchronous on both: no subscription outlives
its flow).

Not compared here: which of two patterns matching one channel delivers
first (Redis 7.0 keeps patterns in a hash table; KVMemo in subscription
order), so no flow publishes on a channel two patterns match. The documented
differences (SUBSCRIBE inside MULTI, sharded pub/sub) are in
``test_redis_differential.DELIBERATE``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import attrs
import pytest
from test_redis_differential import (  # the servers and the raw connections
    RespConnection,
    _read_reply,
    normalised,
    redis_and_kvmemo,
)

from kvmemo.server.resp import encode_command

MARKER = b"sync-marker"

Argv = tuple[str | bytes, ...]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """Redis and KVMemo's Redis port, both stopped at the end of the module."""
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis-pubsub")) as ports:
        yield ports


@attrs.frozen
class Flow:
    """Steps ``(who, argv)``, ``who`` being ``"sub"`` or ``"pub"``; run in each protocol."""

    id: str
    steps: tuple[tuple[str, Argv], ...]
    protocols: tuple[int, ...] = (2, 3)
    xfail: str | None = None


def flow(id: str, *lines: str | tuple[str, Argv], protocols: tuple[int, ...] = (2, 3)) -> Flow:
    """A flow from ``"sub: SUBSCRIBE a b"`` lines (split on spaces) or ``(who, argv)`` pairs."""
    steps: list[tuple[str, Argv]] = [("pub", ("FLUSHALL",))]
    for line in lines:
        if isinstance(line, str):
            who, _, command = line.partition(": ")
            steps.append((who, tuple(command.split())))
        else:
            steps.append(line)
    return Flow(id, tuple(steps), protocols)


FLOWS: list[Flow] = [
    flow(
        "subscribe-publish-unsubscribe",
        "sub: SUBSCRIBE a b a",
        "pub: PUBLISH a m1",
        "pub: PUBLISH b m2",
        "pub: PUBLISH c m3",
        "pub: PUBSUB NUMSUB a b c",
        "sub: UNSUBSCRIBE a nope",
        "pub: PUBLISH a m4",
        "pub: PUBLISH b m5",
        "sub: UNSUBSCRIBE",
        "sub: UNSUBSCRIBE",
        "sub: GET k",
        "pub: PUBSUB CHANNELS",
    ),
    flow(
        "patterns",
        "sub: PSUBSCRIBE n* ?x [ab]c",
        "sub: SUBSCRIBE news",
        "pub: PUBLISH news hi",
        "pub: PUBLISH ac x",
        "pub: PUBLISH zx y",
        "pub: PUBLISH nothing-here-matches-x z",
        "pub: PUBSUB NUMPAT",
        "sub: PUNSUBSCRIBE n* nope",
        "pub: PUBLISH news again",
        "sub: PUNSUBSCRIBE",
        "sub: UNSUBSCRIBE news",
        "pub: PUBSUB NUMPAT",
    ),
    flow(
        "unsubscribe-with-nothing-subscribed",
        "sub: UNSUBSCRIBE",
        "sub: PUNSUBSCRIBE",
        "sub: UNSUBSCRIBE a b",
        "sub: PUNSUBSCRIBE p",
        "sub: GET k",
    ),
    flow(
        "subscribed-mode-commands",
        "sub: SUBSCRIBE a",
        "sub: PING",
        "sub: PING hi",
        "sub: PING a b",
        "sub: GET k",
        "sub: SET k v",
        "sub: GET",
        "sub: NOSUCH x",
        "sub: ECHO hi",
        "sub: PUBLISH a x",
        "sub: PUBSUB NUMPAT",
        "sub: PUBSUB NUMPAT x",
        "sub: PUBSUB FOO",
        "sub: CLIENT FOO",
        "sub: CLIENT SETNAME x y",
        "sub: CONFIG GET maxmemory",
        "sub: SELECT 0",
        "sub: WATCH k",
        "sub: UNWATCH",
        "sub: SUBSCRIBE",
        "sub: PSUBSCRIBE",
        "pub: GET k",
    ),
    flow(
        "reset-leaves-everything",
        "sub: SUBSCRIBE a",
        "sub: PSUBSCRIBE b*",
        "pub: PUBLISH a before",
        "sub: RESET",
        "pub: PUBLISH a after",
        "pub: PUBLISH bb after",
        "pub: PUBSUB NUMSUB a",
        "pub: PUBSUB NUMPAT",
        "sub: GET k",
        "sub: SUBSCRIBE a",
        "pub: PUBLISH a again",
    ),
    flow(
        "quit-closes-and-leaves",
        "sub: SUBSCRIBE a",
        "sub: QUIT",
        "pub: PUBSUB NUMSUB a",
        "pub: PUBLISH a nobody",
    ),
    flow(
        "client-reply-skip-is-spent-on-subscribe",
        "sub: CLIENT REPLY SKIP",
        "sub: SUBSCRIBE a",
        "sub: PING",
        "pub: PUBLISH a m",
        "sub: PING x",
    ),
    flow(
        "binary-channels-and-payloads",
        ("sub", ("SUBSCRIBE", b"\x00\xff ch\r\n", b"")),
        ("pub", ("PUBLISH", b"\x00\xff ch\r\n", b"a\r\nb\x00")),
        ("pub", ("PUBLISH", b"", b"empty channel")),
        ("pub", ("PUBLISH", b"\x00\xff ch\r\n", b"x" * 100_000)),
    ),
    flow(
        "own-publish-in-one-pipeline",
        "sub: SUBSCRIBE c",
        "sub: PUBLISH c x",
        "sub: PSUBSCRIBE c?",
        "sub: PUBLISH c y",
        "sub: PUBLISH cz y",
        "sub: SET k v",
        "sub: UNSUBSCRIBE c",
        "sub: PUBLISH c z",
        protocols=(3,),
    ),
    flow(
        "client-reply-off-keeps-pushes",
        "sub: SUBSCRIBE a",
        "sub: CLIENT REPLY OFF",
        "sub: PUBLISH a z",
        "sub: SUBSCRIBE b",
        "sub: CLIENT REPLY ON",
        "sub: PUBLISH a y",
        protocols=(3,),
    ),
    flow("pubsub-numsub-in-resp3", "sub: PUBSUB NUMSUB a b", protocols=(3,)),
]


def _is_marker(tree: tuple[str, object]) -> bool:
    if tree == ("$", MARKER):
        return True
    kind, items = tree
    return kind == "*" and items == [("$", b"pong"), ("$", MARKER)]


def _sync(sub: RespConnection) -> bytes:
    """Everything the subscriber was sent up to the reply of a marker PING."""
    raws: list[bytes] = []
    try:
        sub.sock.sendall(encode_command("PING", MARKER))
        while True:
            raw, tree = _read_reply(sub.stream)
            if _is_marker(tree):
                return b"".join(raws)
            raws.append(raw)
    except (EOFError, ConnectionError):
        return b"".join(raws) + b"<closed>"


def run_flow(port: int, protocol: int, steps: Sequence[tuple[str, Argv]]) -> list[bytes]:
    """The transcript of ``steps`` on one server (see the module docstring)."""
    transcript: list[bytes] = []
    sub = RespConnection(port, protocol)
    pub = RespConnection(port)
    try:
        unread = False
        for who, argv in steps:
            if who == "pub":
                if unread:
                    transcript.append(b"sub> " + _sync(sub))
                    unread = False
                transcript.append(b"pub> " + pub.call(*argv)[0])
            else:
                assert who == "sub", who
                with contextlib.suppress(ConnectionError):
                    sub.sock.sendall(encode_command(*argv))
                unread = True
        if unread:
            transcript.append(b"sub> " + _sync(sub))
        with contextlib.suppress(ConnectionError):
            sub.call("RESET")  # synchronous on both: nothing subscribed after the flow
    finally:
        sub.close()
        pub.close()
    return transcript


def _params() -> list[object]:
    params = []
    for f in FLOWS:
        marks = [pytest.mark.xfail(strict=True, reason=f.xfail)] if f.xfail else []
        for protocol in f.protocols:
            params.append(pytest.param(f, protocol, id=f"{f.id}-resp{protocol}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "protocol"), _params())
def test_pubsub_flows_answer_as_redis(servers: tuple[int, int], case: Flow, protocol: int) -> None:
    redis_port, kvmemo_port = servers
    expected = run_flow(redis_port, protocol, case.steps)
    got = run_flow(kvmemo_port, protocol, case.steps)
    assert got == expected


@pytest.mark.parametrize("protocol", [2, 3])
def test_client_info_list_and_kill_of_a_subscriber_answer_as_redis(
    servers: tuple[int, int], protocol: int
) -> None:
    """CLIENT INFO / LIST compared field by field (``sub``, ``psub``, ``flags``,
    ``cmd``, ``resp`` ... as :func:`test_redis_differential.normalised` keeps them)."""
    results = []
    for port in servers:
        sub = RespConnection(port, protocol)
        admin = RespConnection(port)
        try:
            sub.sock.sendall(encode_command("SUBSCRIBE", "a", "b"))
            confirmations = [_read_reply(sub.stream)[0] for _ in range(2)]
            confirmations.append(sub.call("PSUBSCRIBE", "p*")[0])
            info: object = None
            if protocol == 3:  # RESP2 refuses it while subscribed (the flows check that)
                argv = ("CLIENT", "INFO")
                info = normalised(argv, sub.call(*argv))
            argv = ("CLIENT", "LIST", "TYPE", "pubsub")
            listed = normalised(argv, admin.call(*argv))
            normal = admin.call("CLIENT", "LIST", "TYPE", "normal")[0].count(b"\n")
            killed = admin.call("CLIENT", "KILL", "TYPE", "pubsub")[0]
            after = admin.call("CLIENT", "LIST", "TYPE", "pubsub")[0]
            numsub = admin.call("PUBSUB", "NUMSUB", "a")[0]
            results.append((confirmations, info, listed, normal, killed, after, numsub))
        finally:
            sub.close()
            admin.close()
    assert results[1] == results[0]


def test_info_counts_channels_and_patterns_as_redis(servers: tuple[int, int]) -> None:
    results = []
    for port in servers:
        sub = RespConnection(port)
        admin = RespConnection(port)
        try:
            sub.sock.sendall(
                encode_command("SUBSCRIBE", "a", "b") + encode_command("PSUBSCRIBE", "p*")
            )
            for _ in range(3):
                _read_reply(sub.stream)
            _, tree = admin.call("INFO", "stats")
            text = tree[1]
            assert isinstance(text, bytes)
            lines = [line for line in text.split(b"\r\n") if line.startswith(b"pubsub_")]
            results.append([line for line in lines if not line.startswith(b"pubsubshard")])
            sub.call("RESET")
        finally:
            sub.close()
            admin.close()
    assert results[0] == [b"pubsub_channels:2", b"pubsub_patterns:1"]
    assert results[1] == results[0]
