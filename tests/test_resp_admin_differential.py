"""SHUTDOWN, SLOWLOG, CLIENT KILL, ROLE, WAIT, MOVE and SWAPDB against a real ``redis-server``.

Uses the servers, connections and comparison of :mod:`test_redis_differential`
(Debian's redis-server 7.0 as a subprocess, KVMemo's port in a thread), with
one change: Redis runs with ``--databases 1``, as KVMemo has one database, so
MOVE and SWAPDB must answer exactly as that Redis does.

- :data:`CASES`: every reply byte for byte, in RESP2 and RESP3, each case on
  new connections. Only what cannot stop or block either server is sent: the
  SHUTDOWN refusals (never a SHUTDOWN that Redis would carry out), WAIT with
  0 replicas or a short timeout, CLIENT KILL filters that match no client.
- :func:`test_slowlog_entries_have_redis_format`: a named client's SET of a
  long value and MSET of 41 arguments, logged with the threshold at 0, give
  the same entries but for the id, the time, the duration and the port.
- :data:`DIFFERENCES`: documented differences, each with both exact replies.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest
from test_redis_differential import (  # the servers and how replies are compared
    Case,
    Pair,
    _connect,
    _plain,
    case,
    redis_and_kvmemo,
    run_same_steps,
)


@pytest.fixture(scope="module")
def one_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """Redis with ``--databases 1`` and KVMemo's Redis port, stopped at the end of the module."""
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis-1db"), ["--databases", "1"]) as ports:
        yield ports


RESTORE_SLOWLOG = "CONFIG SET slowlog-log-slower-than 10000 slowlog-max-len 128"

CASES: list[Case] = [
    case(
        "move-one-database",
        "SET k v",
        "MOVE k 1",
        "MOVE k 0",
        "MOVE nokey 0",
        "MOVE k -1",
        "MOVE k 15",
        "MOVE k abc",
        "MOVE k 99999999999",
        "MOVE k",
        "GET k",
    ),
    case(
        "swapdb-one-database",
        "SWAPDB 0 0",
        "SWAPDB 0 1",
        "SWAPDB 1 0",
        "SWAPDB -1 0",
        "SWAPDB a 0",
        "SWAPDB 0 a",
        "SWAPDB 99999999999 0",
        "SWAPDB 0",
    ),
    case("move-swapdb-in-multi", "SET k v", "MULTI", "MOVE k 1", "SWAPDB 0 0", "EXEC", "GET k"),
    case("role", "ROLE", "role", "ROLE x"),
    case(
        "wait",
        "SET k v",
        "WAIT 0 0",
        "WAIT 1 1",
        "WAIT -1 0",
        "WAIT x 1",
        "WAIT 1 x",
        "WAIT 0 -1",
        "WAIT 0 1.5",
        "WAIT 0",
        "MULTI",
        "WAIT 0 0",
        "EXEC",
    ),
    case(
        "slowlog-help-len-reset",
        "SLOWLOG RESET",
        "SLOWLOG LEN",
        "SLOWLOG GET",
        "SLOWLOG GET 0",
        "SLOWLOG HELP",
        "slowlog help",
    ),
    case(
        "slowlog-errors",
        "SLOWLOG",
        "SLOWLOG nope",
        "SLOWLOG LEN x",
        "SLOWLOG RESET x",
        "SLOWLOG HELP x",
        "SLOWLOG GET x",
        "SLOWLOG GET -2",
        "SLOWLOG GET 1.5",
        "SLOWLOG GET 99999999999999999999",
        "SLOWLOG GET 1 2",
        "slowlog get 1 2",
    ),
    case(
        "config-slowlog-settings",
        "CONFIG GET slowlog*",
        "CONFIG GET slowlog-max-len",
        "CONFIG SET slowlog-log-slower-than -2",
        "CONFIG SET slowlog-log-slower-than x",
        "CONFIG SET slowlog-log-slower-than 99999999999999999999",
        "CONFIG SET slowlog-max-len -1",
        "CONFIG SET slowlog-max-len 1.5",
        "CONFIG SET slowlog-max-len 5 slowlog-log-slower-than -2",
        "CONFIG GET slowlog*",
        "CONFIG SET slowlog-log-slower-than -1 SLOWLOG-MAX-LEN 7",
        "CONFIG GET slowlog*",
        RESTORE_SLOWLOG,
        "CONFIG GET slowlog*",
    ),
    case(
        "shutdown-refusals",
        "SHUTDOWN bogus",
        "SHUTDOWN NOSAVE SAVE",
        "SHUTDOWN save nosave now",
        "SHUTDOWN ABORT",
        "shutdown abort",
        "SHUTDOWN ABORT NOW",
        "SHUTDOWN NOW ABORT",
        "SHUTDOWN FORCE ABORT",
        "SHUTDOWN NOSAVE NOW FORCE bogus",
    ),
    case("shutdown-in-multi", "SET k 1", "MULTI", "SHUTDOWN", "INCR k", "EXEC", "GET k"),
    case(
        "client-kill-matching-nothing",
        "CLIENT KILL 1.2.3.4:5",
        "CLIENT KILL ID",
        "CLIENT KILL ID 99999999",
        "CLIENT KILL ADDR 1.2.3.4:5",
        "CLIENT KILL LADDR 1.2.3.4:5",
        "CLIENT KILL ADDR 1.2.3.4:5 SKIPME no",
        "CLIENT KILL ID 99999999 USER default",
        "CLIENT KILL TYPE master",
        "CLIENT KILL TYPE pubsub",
        "CLIENT KILL TYPE replica SKIPME yes",
    ),
    case(
        "client-kill-errors",
        "CLIENT KILL",
        "CLIENT KILL ID x",
        "CLIENT KILL ID 0",
        "CLIENT KILL ID -5",
        "CLIENT KILL USER bob",
        "CLIENT KILL USER default SKIPME maybe",
        "CLIENT KILL ID 1 TYPE bogus",
        "CLIENT KILL ID 1 foo bar",
        "CLIENT KILL ID 1 ADDR",
        "CLIENT KILL MAXAGE 5",
        "client kill nosuch 1",
    ),
]


def _params(cases: list[Case]) -> list[object]:
    return [
        pytest.param(c, protocol, id=f"{c.id}-resp{protocol}") for protocol in (2, 3) for c in cases
    ]


@pytest.mark.parametrize(("edge", "protocol"), _params(CASES))
def test_admin_commands_answer_as_redis(one_db: tuple[int, int], edge: Case, protocol: int) -> None:
    for fresh in _connect(one_db, protocol):
        fresh.flush()
        run_same_steps(fresh, edge.commands, exact_time=edge.exact_time)


def _entries(pair: Pair, count: int) -> tuple[list[object], list[object]]:
    r, k = pair.both("SLOWLOG", "GET", str(count))
    return _plain(r[1]), _plain(k[1])


def test_slowlog_entries_have_redis_format(one_db: tuple[int, int]) -> None:
    """The same entries, but for each server's id, time, duration and client port."""
    for fresh in _connect(one_db, 2):
        fresh.flush()
        try:
            run_same_steps(
                fresh,
                [
                    ("CLIENT", "SETNAME", "loader"),
                    ("CONFIG", "SET", "slowlog-log-slower-than", "0"),
                    ("SLOWLOG", "RESET"),
                    ("SET", "k", "x" * 200),
                    ("MSET", *(f"k{i}" for i in range(40))),
                ],
            )
            redis, kvmemo = _entries(fresh, 2)
        finally:
            run_same_steps(fresh, [tuple(RESTORE_SLOWLOG.split()), ("SLOWLOG", "RESET")])
        assert len(redis) == len(kvmemo) == 2
        for r, k in zip(redis, kvmemo, strict=True):
            assert isinstance(r, list)
            assert isinstance(k, list)
            assert len(r) == len(k) == 6
            assert [type(v) for v in k] == [type(v) for v in r]
            assert k[3] == r[3]  # the arguments, cut alike
            assert k[5] == r[5] == b"loader"
            assert k[4].split(b":")[0] == r[4].split(b":")[0] == b"127.0.0.1"
            assert abs(k[1] - r[1]) <= 5  # Unix seconds
        assert redis[0][3][-1] == b"... (10 more arguments)"  # MSET's 41 arguments
        assert redis[1][3][2].endswith(b"... (72 more bytes)")
        assert kvmemo[0][0] > kvmemo[1][0]


# -- deliberate, documented differences ----------------------------------------------------


@attrs.frozen
class Difference:
    """After ``setup`` (the same replies), ``argv`` answers these exact bytes on each server."""

    id: str
    reason: str
    setup: tuple[str, ...]
    argv: str
    redis: bytes
    kvmemo: bytes


NO_WAIT = (
    "Redis blocks WAIT until the timeout (0: forever) when asked for more replicas than"
    " acknowledged; KVMemo never has replicas and answers 0 at once (never a hang)"
)
ENGINE_ONLY = (
    "KVMemo's slow log times engine calls only: connection commands (CLIENT, CONFIG,"
    " SLOWLOG itself) are never logged, and a pipelined batch is one entry"
)

DIFFERENCES = [
    # Redis would take the whole timeout (100 ms) to answer the same 0.
    Difference("wait-more-replicas", NO_WAIT, (), "WAIT 1 100", b":0\r\n", b":0\r\n"),
    Difference(
        "slowlog-connection-commands",
        ENGINE_ONLY,
        ("CONFIG SET slowlog-log-slower-than 0", "SLOWLOG RESET", "PING"),
        "SLOWLOG LEN",
        b":2\r\n",  # SLOWLOG RESET and PING
        b":0\r\n",
    ),
]


@pytest.mark.parametrize("difference", [pytest.param(d, id=d.id) for d in DIFFERENCES])
def test_documented_differences_are_exactly_these(
    one_db: tuple[int, int], difference: Difference
) -> None:
    for fresh in _connect(one_db, 2):
        try:
            run_same_steps(fresh, [tuple(line.split()) for line in difference.setup])
            r, k = fresh.both(*difference.argv.split())
        finally:
            run_same_steps(fresh, [tuple(RESTORE_SLOWLOG.split()), ("SLOWLOG", "RESET")])
        assert (r[0], k[0]) == (difference.redis, difference.kvmemo), difference.reason
