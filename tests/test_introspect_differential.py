"""OBJECT, MEMORY and LASTSAVE on KVMemo's Redis port against a real ``redis-server``.

Uses the servers, connections and comparison of :mod:`test_redis_differential`
(Debian's redis-server 7.0 as a subprocess, KVMemo's port in a thread), in
RESP2 and RESP3:

- :data:`CASES` must answer byte for byte alike: encodings of values written
  by SET, REFCOUNT of unshared values, every error (arity of the containers
  and of their subcommands, unknown subcommands, SAMPLES, the LFU errors),
  nil for missing keys, inside MULTI too.
- Replies whose values are each server's own are compared by shape
  (:func:`test_values_of_their_own_have_redis_shapes`): MEMORY USAGE's
  bytes, IDLETIME, LASTSAVE, FREQ's count, the HELP texts, MEMORY STATS'
  fields (a subset of Redis's, in its order), DOCTOR and MALLOC-STATS.
- :data:`DIFFERENCES`: documented differences, each with both exact replies.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import attrs
import pytest
from test_redis_differential import (  # the servers and how replies are compared
    Case,
    Pair,
    Tree,
    _as_map,
    _case_params,
    _connect,
    _plain,
    case,
    config_restored,
    is_nil,
    pair,
    run_same,
    run_same_steps,
    servers,
)

__all__ = ["pair", "servers"]  # fixtures, used by name

ENCODED_VALUES = [
    "0", "123", "-1", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
    "-9223372036854775809", "-0", "00", "01", "+1", "\\s1", "1\\s", "1.5", "-", "''", "abc",
    "\\0", "a" * 44, "a" * 45, "1" * 45, "12345678901234567890",
]  # fmt: skip

CASES: list[Case] = [
    case(
        f"encoding-of-{i}",
        f"SET v {value}",
        "OBJECT ENCODING v",
        "OBJECT encoding v",
    )
    for i, value in enumerate(ENCODED_VALUES)
] + [
    case(
        "encodings-by-other-writes",
        "MSET m1 5 m2 abc",
        "OBJECT ENCODING m1",
        "OBJECT ENCODING m2",
        "GETSET g 77777",
        "OBJECT ENCODING g",
        "SETEX e 100 abc",
        "OBJECT ENCODING e",
        "APPEND fresh 42",  # APPEND on a missing key is a SET
        "OBJECT ENCODING fresh",
        "INCR i",
        "INCRBY i 100000",
        "OBJECT ENCODING i",
    ),
    case(
        "refcount-of-unshared-values",
        "SET s abc",
        "SET big 12345678901",
        "SET neg -5",
        "OBJECT REFCOUNT s",
        "OBJECT REFCOUNT big",
        "OBJECT REFCOUNT neg",
        "OBJECT REFCOUNT nokey",
    ),
    case(
        "missing-keys-are-nil",
        "OBJECT ENCODING nokey",
        "OBJECT FREQ nokey",
        "OBJECT IDLETIME nokey",
        "MEMORY USAGE nokey",
        "MEMORY USAGE nokey SAMPLES 0",
        "MEMORY USAGE nokey samples 5 SAMPLES 7",
    ),
    case(
        "container-and-subcommand-arity",
        "OBJECT",
        "OBJECT ENCODING",
        "OBJECT ENCODING a b",
        "OBJECT REFCOUNT",
        "OBJECT FREQ a b",
        "OBJECT IDLETIME",
        "OBJECT HELP x",
        "MEMORY",
        "MEMORY USAGE",
        "MEMORY STATS x",
        "MEMORY DOCTOR x",
        "MEMORY PURGE x",
        "MEMORY MALLOC-STATS x",
        "MEMORY HELP x",
        "LASTSAVE x",
    ),
    case(
        "unknown-subcommands",
        "OBJECT foo",
        "object Foo k",
        "MEMORY usages k",
        "MEMORY ''",
        "OBJECT " + "x" * 200,
    ),
    case(
        "memory-usage-options",
        "SET k v",
        "MEMORY USAGE k SAMPLES",
        "MEMORY USAGE k SAMPLES -1",
        "MEMORY USAGE k SAMPLES x",
        "MEMORY USAGE k SAMPLES 1.5",
        "MEMORY USAGE k SAMPLES 9223372036854775808",
        "MEMORY USAGE k foo",
        "MEMORY USAGE k SAMPLES 1 foo",
        "MEMORY USAGE nokey SAMPLES x",
        "MEMORY USAGE nokey foo",
    ),
    case(
        "freq-without-an-lfu-policy",
        "SET k v",
        "OBJECT FREQ k",
        "GET k",
    ),
    case("memory-purge", "MEMORY PURGE", "memory purge"),
    case(
        "in-a-transaction",
        "SET k v",
        "MULTI",
        "OBJECT ENCODING k",
        "OBJECT FREQ k",
        "MEMORY USAGE k SAMPLES x",
        "MEMORY USAGE nokey",
        "OBJECT REFCOUNT k",
        "EXEC",
    ),
    case(
        "unknown-subcommand-aborts-a-transaction",
        "MULTI",
        "OBJECT foo k",
        "SET k v",
        "EXEC",
        "EXISTS k",
    ),
    case(
        "subcommand-arity-aborts-a-transaction",
        "MULTI",
        "OBJECT ENCODING",
        "SET k v",
        "EXEC",
        "EXISTS k",
    ),
]


# Each case on new connections: one that fails inside MULTI leaves no
# transaction open on a connection the next case would use.


@pytest.mark.parametrize("edge", _case_params(2, CASES))
def test_introspection_answers_as_redis(servers: tuple[int, int], edge: Case) -> None:
    for fresh in _connect(servers, 2):
        run_same(fresh, edge.commands, exact_time=edge.exact_time)


@pytest.mark.parametrize("edge", _case_params(3, CASES))
def test_introspection_answers_as_redis_in_resp3(servers: tuple[int, int], edge: Case) -> None:
    for fresh in _connect(servers, 3):
        run_same(fresh, edge.commands, exact_time=edge.exact_time)


@pytest.mark.parametrize("policy", ["allkeys-lfu", "volatile-lfu"])
def test_lfu_errors_and_nils_answer_as_redis(pair: Pair, policy: str) -> None:
    pair.flush()
    with config_restored(pair):
        run_same_steps(
            pair,
            [
                ("CONFIG", "SET", "maxmemory-policy", policy),
                ("SET", "k", "v"),
                ("OBJECT", "IDLETIME", "k"),
                ("OBJECT", "IDLETIME", "nokey"),
                ("OBJECT", "FREQ", "nokey"),
                ("OBJECT", "ENCODING", "k"),
            ],
        )
        r, k = pair.both("OBJECT", "FREQ", "k")
        assert r[1][0] == k[1][0] == ":"
        assert k[1][1] == 1  # KVMemo's exact count (Redis: its log counter, 5 at first)


# -- by shape ------------------------------------------------------------------------------


def _is_int(tree: Tree) -> bool:
    return tree[0] == ":"


def _lines(tree: Tree) -> list[bytes]:
    assert tree[0] == "*", tree
    assert all(item[0] == "+" for item in tree[1]), tree
    return [item[1] for item in tree[1]]


def _stats(tree: Tree, protocol: int) -> list[tuple[bytes, str]]:
    """MEMORY STATS as (field, reply type) pairs; RESP3: a map, RESP2: a flat array."""
    assert tree[0] == ("%" if protocol == 3 else "*"), tree
    items = tree[1]
    return [(key[1], value[0]) for key, value in zip(items[::2], items[1::2], strict=True)]


@pytest.mark.parametrize("protocol", [2, 3])
def test_values_of_their_own_have_redis_shapes(servers: tuple[int, int], protocol: int) -> None:
    for both in _connect(servers, protocol):
        both.flush()
        assert both.both("SET", "k", "x" * 100)[0][0] == b"+OK\r\n"

        r, k = both.both("MEMORY", "USAGE", "k")
        assert _is_int(r[1])
        assert _is_int(k[1])
        assert k[1][1] > 100

        r, k = both.both("OBJECT", "IDLETIME", "k")
        assert _is_int(r[1])
        assert _is_int(k[1])
        assert 0 <= k[1][1] <= 2

        r, k = both.both("LASTSAVE")
        now = time.time()
        for reply in (r, k):
            assert _is_int(reply[1])
            assert now - 3600 < reply[1][1] <= now + 1

        for container in ("OBJECT", "MEMORY"):
            r, k = both.both(container, "HELP")
            redis_lines, kvmemo_lines = _lines(r[1]), _lines(k[1])
            assert len(redis_lines) == len(kvmemo_lines)
            headers = [line for line in redis_lines if not line.startswith(b" ")]
            assert headers == [line for line in kvmemo_lines if not line.startswith(b" ")]

        r, k = both.both("MEMORY", "STATS")
        redis_fields, kvmemo_fields = _stats(r[1], protocol), _stats(k[1], protocol)
        names = [name for name, _ in redis_fields]
        assert [f for f in redis_fields if f[0] in dict(kvmemo_fields)] == kvmemo_fields
        assert sorted(kvmemo_fields, key=lambda f: names.index(f[0])) == kvmemo_fields
        assert [name for name, _ in kvmemo_fields] == [
            b"peak.allocated",
            b"total.allocated",
            b"keys.count",
            b"keys.bytes-per-key",
            b"dataset.bytes",
        ]
        stats = _as_map(_plain(k[1]))
        assert stats[b"keys.count"] == 1
        assert stats[b"total.allocated"] == k_usage(both)

        for sub in ("DOCTOR", "MALLOC-STATS"):
            r, k = both.both("MEMORY", sub)
            assert k[1][0] == "$"
            assert not is_nil(k[1])
            assert k[1][1]
            assert r[1][0] == ("=" if protocol == 3 else "$")  # RESP3: see DIFFERENCES


def k_usage(both: Pair) -> int:
    reply = both.kvmemo.call("MEMORY", "USAGE", "k")[1]
    assert reply[0] == ":"
    value: int = reply[1]
    return value


def test_memory_usage_sums_to_used_memory_on_the_port(pair: Pair) -> None:
    pair.flush()
    keys = [f"key:{i}" for i in range(20)]
    for i, key in enumerate(keys):
        pair.kvmemo.call("SET", key, "v" * i * 7)
    total = sum(pair.kvmemo.call("MEMORY", "USAGE", key)[1][1] for key in keys)
    info = pair.kvmemo.call("INFO", "memory")[1][1].decode()
    assert f"used_memory:{total}\r\n" in info


# -- COMMAND INFO / DOCS of the containers ------------------------------------------------


NAMES = ("object", "memory", "lastsave")


def _info(pair: Pair) -> tuple[list[Any], list[Any]]:
    r, k = pair.both("COMMAND", "INFO", *NAMES)
    return _plain(r[1]), _plain(k[1])


def test_command_info_agrees_on_names_arity_and_keys(pair: Pair) -> None:
    for ri, ki in zip(*_info(pair), strict=True):
        assert [ki[i] for i in (0, 1, 3, 4, 5)] == [ri[i] for i in (0, 1, 3, 4, 5)]
        assert not ki[8]  # a container's keys are its subcommands'
        assert not ri[8]


def test_command_info_lists_the_subcommands_as_redis(pair: Pair) -> None:
    for ri, ki in zip(*_info(pair), strict=True):
        assert sorted(sub[0] for sub in ki[9]) == sorted(sub[0] for sub in ri[9])


def test_command_docs_agree_on_the_group_of_memory_and_lastsave(pair: Pair) -> None:
    r, k = pair.both("COMMAND", "DOCS", "memory", "lastsave")
    rdocs, kdocs = _plain(r[1]), _plain(k[1])
    assert kdocs[::2] == rdocs[::2] == [b"memory", b"lastsave"]
    for rdoc, kdoc in zip(rdocs[1::2], kdocs[1::2], strict=True):
        assert _as_map(kdoc)[b"group"] == _as_map(rdoc)[b"group"] == b"server"


def test_command_docs_file_object_under_generic(pair: Pair) -> None:
    r, k = pair.both("COMMAND", "DOCS", "object")
    assert _as_map(_plain(k[1])[1])[b"group"] == _as_map(_plain(r[1])[1])[b"group"]


# -- documented differences ----------------------------------------------------------------


@attrs.frozen
class Difference:
    """After ``setup`` (replies compared as they are), ``argv``'s replies differ exactly so."""

    id: str
    reason: str
    setup: tuple[tuple[str, ...], ...]
    argv: tuple[str, ...]
    redis: bytes
    kvmemo: bytes
    protocol: int = 2
    config: tuple[str, ...] = ()  # a CONFIG SET before the setup (put back after)


NO_HISTORY = (
    "KVMemo answers OBJECT ENCODING from the bytes alone (kvmemo.commands.introspect."
    "ObjectEncoding); Redis also remembers how the value was made"
)
DIFFERENCES = [
    Difference(
        "encoding-after-append",
        NO_HISTORY,
        (("SET", "a", "abc"), ("APPEND", "a", "def")),
        ("OBJECT", "ENCODING", "a"),
        b"$3\r\nraw\r\n",
        b"$6\r\nembstr\r\n",
    ),
    Difference(
        "encoding-after-setrange",
        NO_HISTORY,
        (("SETRANGE", "s", "0", "hi"),),
        ("OBJECT", "ENCODING", "s"),
        b"$3\r\nraw\r\n",
        b"$6\r\nembstr\r\n",
    ),
    Difference(
        "encoding-after-setbit",
        NO_HISTORY,
        (("SETBIT", "b", "1", "1"),),
        ("OBJECT", "ENCODING", "b"),
        b"$3\r\nraw\r\n",
        b"$6\r\nembstr\r\n",
    ),
    Difference(
        "encoding-after-incrbyfloat",
        NO_HISTORY,
        (("INCRBYFLOAT", "f", "1.5"), ("INCRBYFLOAT", "f", "1.5")),
        ("OBJECT", "ENCODING", "f"),
        b"$6\r\nembstr\r\n",
        b"$3\r\nint\r\n",
    ),
    Difference(
        "refcount-of-a-shared-integer",
        "Redis shares the integers 0-9999 without an LRU/LFU limit; KVMemo shares no values",
        (("SET", "n", "12"),),
        ("OBJECT", "REFCOUNT", "n"),
        b":2147483647\r\n",
        b":1\r\n",
    ),
    Difference(
        "idletime-under-a-policy-keeping-no-access-times",
        "KVMemo's random policies (and fifo, noeviction) keep no access time: an error,"
        " not a guess",
        (("SET", "k", "v"),),
        ("OBJECT", "IDLETIME", "k"),
        b":0\r\n",
        b"-ERR An LRU maxmemory policy is not selected, idle time not tracked: the 'random'"
        b" policy keeps no access times. Select allkeys-lru or volatile-lru to track them.\r\n",
        config=("maxmemory-policy", "allkeys-random"),
    ),
    Difference(
        "doctor-is-not-a-verbatim-string-in-resp3",
        "a command's result has no verbatim-string marker (kvmemo.commands.replies has FieldList"
        " only): RESP3 gets a bulk string",
        (),
        ("MEMORY", "MALLOC-STATS"),
        b"=",  # Redis's reply starts so (jemalloc's report follows)
        b"$45\r\nStats not supported for the current allocator\r\n",
        protocol=3,
    ),
]


@pytest.mark.parametrize("difference", [pytest.param(d, id=d.id) for d in DIFFERENCES])
def test_documented_differences(servers: tuple[int, int], difference: Difference) -> None:
    for fresh in _connect(servers, difference.protocol):
        fresh.flush()
        with contextlib.ExitStack() as stack:
            if difference.config:
                stack.enter_context(config_restored(fresh))
                run_same_steps(fresh, [("CONFIG", "SET", *difference.config)])
            run_same_steps(fresh, difference.setup)
            r, k = fresh.both(*difference.argv)
            if difference.redis == b"=":
                assert r[0].startswith(b"="), r[0][:40]
            else:
                assert r[0] == difference.redis, difference.reason
            assert k[0] == difference.kvmemo, difference.reason
