"""Fuzzing: no command, however malformed, crashes an actor, hangs, or loses data.

The product rule (PROTOCOL.md, "Errors"; ARCHITECTURE.md, "Failure isolation"):
bad input gets a clear error and changes nothing else: never a crash, a hang,
a closed session for another client, or lost data. Commit 8346e40 fixed one
case that broke it (a value the size limits allowed but one log record could
not hold crashed its shard mid-write); this module hunts for more.

Two fronts:

- **The embedded store.** Hypothesis draws a store configuration (1, 3 or 16
  shards; no limit or a small ``maxmemory`` under every eviction policy; tiny
  or roomy ``max_key_size`` / ``max_value_size``; 1, 2 or 64 SCAN snapshots;
  persistence off, or on in a temporary directory with each ``appendfsync``,
  sometimes with the log's record limit lowered to 4 KiB as
  ``tests/test_persistence_limits.py`` does, so that record-limit paths are
  reachable without gigabytes) and a sequence of steps: one ``execute``, one
  ``execute_many``, one ``transaction``, a ``watch`` block, or (persistence
  off) a jump of the clock. Calls come in the shape of their command with
  wrong numbers and options, or free-form: names from the command table plus
  unknown names and odd spellings; wrong arity, option keywords anywhere,
  numbers at the edges, keys with and without ``{hash tags}`` (so multi-key
  commands cross shards), values up to 4 KiB, SCAN cursors a SCAN returned.
  After every step: each result is of a documented type or a
  :class:`kvmemo.KVMemoError` of an expected kind (never ``INTERNAL``,
  ``UNAVAILABLE``, ``TIMEOUT``: those mean a crash or a hang), every actor
  runs with no restart and no lifecycle event records a crash; with no
  memory limit, a single command refused for its input (arity, syntax, not
  an integer, too large, unknown) left the keyspace as it was, and no key or
  value is over its size limit. At the end ``info`` works; without
  persistence a FLUSHALL brings ``used_memory`` back to 0; with it, closing
  and reopening the store on its directory gives back exactly the keyspace
  it had (keys, values, TTL presence; keys about to expire aside).
- **The Redis port.** Random byte streams (RESP fragments, requests cut
  anywhere, noise) and random pipelines of framed commands (data commands as
  above; CONFIG, CLIENT, HELLO, COMMAND, MULTI/EXEC, WATCH, DEBUG ...) go to
  the port over real sockets, with and without AUTH, with default and with
  small limits. Each framed command gets its reply, unless one before it
  closed the connection (QUIT, a protocol error) or the parser refused it
  outright; a byte stream followed by end of input gets replies that parse,
  then a close, never a hang; no connection task crashes (the server logs
  that at ERROR); no actor crashes; a client busy all along and a watching
  client checked after each exchange keep working.

What the fuzzing found (the INCR family building values over
``max_value_size``; with persistence on, such a value over one log record
crashed its shard) is fixed and kept below as explicit tests. Everything is
deterministic (``derandomize``, no example database) and bounded in time
(``trio.fail_after`` around every step).
"""

from __future__ import annotations

import logging
import string
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmemo
from kvmemo.api import encode_arg
from kvmemo.commands.args import INT64_MAX, MAX_EXPIRE_MS
from kvmemo.commands.dump import dump_payload
from kvmemo.commands.table import COMMANDS, Command
from kvmemo.config import StoreConfig
from kvmemo.engine import engine as engine_module
from kvmemo.engine.engine import KVEngine
from kvmemo.errors import ERROR_KINDS, KVMemoError
from kvmemo.eviction.policies import POLICY_NAMES
from kvmemo.persistence import records
from kvmemo.server.resp import (
    NEED_DATA,
    ErrorReply,
    RespReplyParser,
    encode_command,
)
from kvmemo.server.resp_server import RespLimits, serve_resp
from kvmemo.storage import durability

STEP_TIMEOUT = 10.0  # seconds for one step; the engine's request_timeout is 5
EXAMPLE_TIMEOUT = 60.0  # seconds for one whole example (a hang fails, never blocks CI)
SHORT_TTL_MS = 60_000  # keys expiring sooner may go while we compare: not compared
SMALL_RECORD = 4096  # the lowered log record limit (bytes), as test_persistence_limits

# Error kinds a bad command may get on an idle, healthy store. Not INTERNAL (a
# bug), not UNAVAILABLE (an actor is down: it crashed), not TIMEOUT (a hang),
# not IO (the temporary directory does not fail), not OVERLOADED / NOAUTH.
EXPECTED_KINDS = frozenset(
    {"ARITY", "SYNTAX", "UNKNOWN_METHOD", "NOT_INTEGER", "OOM", "TOO_LARGE", "DISABLED"}
)
# Refused for its input alone: such a command must have changed nothing.
INPUT_KINDS = frozenset({"ARITY", "SYNTAX", "UNKNOWN_METHOD", "NOT_INTEGER", "TOO_LARGE"})


# -- what a command may be given --------------------------------------------------------

KEYS: list[Any] = [
    b"a",
    b"b",
    "c",
    b"{t}a",
    b"{t}b",
    "{t}c",
    b"{u}a",
    b"k:1",
    b"",
    b"{}",
    b"{",
    b"}{t}",
    b"\x00\xff",
    "ключ",
    b"K" * 40,  # over the tiny max_key_size
    b"L" * 4063,  # the longest key of the (4063, 16) record-edge setup
]
NUMBERS: list[Any] = [
    0,
    1,
    2,
    -1,
    "10",
    "3600",
    "100000",
    INT64_MAX,
    INT64_MAX + 1,
    -INT64_MAX - 1,
    -INT64_MAX - 2,
    2**64,
    10**30,
    "9" * 300,
    MAX_EXPIRE_MS,
    MAX_EXPIRE_MS + 1,
    MAX_EXPIRE_MS // 1000,
    MAX_EXPIRE_MS // 1000 + 1,
    INT64_MAX // 1000,
    INT64_MAX // 1000 + 1,
    -(INT64_MAX // 1000) - 1,
    2**31 - 1,
    2**31,
    2**32,
    4096,
    65535,
    "1e3",
    "1e100",
    "-1.7e308",
    "0x1p-16445",
    " 1",
    "1 ",
    "+1",
    "0x10",
    "01",
    "-0",
    "",
    "1.5",
    "-1.5",
    "inf",
    "-inf",
    "nan",
    "٣",  # an Arabic-Indic digit: isdigit() in str, not ASCII
    "１",  # a fullwidth digit
    "1\x00",
    0.5,
    float("inf"),
    float("nan"),
    1e308,
    -1e-320,
]
OPTIONS: list[Any] = [
    "EX",
    "px",
    "Exat",
    "PXAT",
    "KEEPTTL",
    "NX",
    "xx",
    "GET",
    "PERSIST",
    "GT",
    "LT",
    "MATCH",
    "COUNT",
    "TYPE",
    "string",
    "*",
    "[",
    "REPLACE",
    "DB",
    "IDX",
    "LEN",
    "WITHMATCHLEN",
    "MINMATCHLEN",
    "BIT",
    "BYTE",
    # BITOP / BITFIELD
    "AND",
    "or",
    "XOR",
    "NOT",
    "SET",
    "INCRBY",
    "OVERFLOW",
    "SAT",
    "FAIL",
    "u8",
    "i64",
    "#2",
    # OBJECT / MEMORY subcommands and options
    "ENCODING",
    "refcount",
    "FREQ",
    "IDLETIME",
    "HELP",
    "USAGE",
    "SAMPLES",
    "STATS",
    "DOCTOR",
    "PURGE",
    "MALLOC-STATS",
    "ASYNC",
    "SYNC",
    "server",
    "memory",
    "stats",
    "keyspace",
    "actors",
    "persistence",
    "everything",
    "shard-0",
    "eviction-manager",
    "ttl-manager",
]
VALUES: list[Any] = [
    b"",
    b"v",
    "0",
    "10",
    "-5",
    str(INT64_MAX),
    str(-INT64_MAX - 1),
    "1.5",
    "1e10",
    "inf",
    b"\x00\xff\x80",
    "ünï",
    b"x" * 100,
    b"y" * 1000,
    b"z" * 4096,
]


@attrs.frozen
class Edge:
    """Stands for the longest key (``what="key"``) or value the store's limits allow.

    Capped at :data:`EDGE_CAP` bytes (the roomy limits are 1 MiB); at the
    lowered record's limits (4063 + 16, 64 + 4015) it is exactly the limit.
    """

    what: str

    def size(self, limit: int) -> int:
        return min(limit, EDGE_CAP)


EDGE_CAP = 4096  # bytes
EDGE_KEY = Edge("key")
EDGE_VALUE = Edge("value")

keys = st.sampled_from([*KEYS, EDGE_KEY, EDGE_KEY])
numbers = st.sampled_from(NUMBERS)
values = st.one_of(st.sampled_from([*VALUES, EDGE_VALUE, EDGE_VALUE]), st.binary(max_size=24))
tokens = st.one_of(
    st.sampled_from(OPTIONS), numbers, keys, values, st.text(string.printable, max_size=6)
)

UNKNOWN_NAMES = ["nosuch", "", " get", "get ", "GET\x00", "ЅET", "multi", "exec", "hello", "."]

# Well-formed shapes, by command: k key, v value, n number, p glob pattern,
# c a SCAN cursor (often one a SCAN returned), d a DUMP payload (of a value, or
# a damaged one), K one or more keys, P one or
# more key/value pairs, o a tail of 0-4 options and numbers (often wrong,
# sometimes right). Commands not listed get only
# the free-form arguments of ``free_calls``.
SHAPES: dict[str, str] = {
    "get": "k",
    "set": "k v o",
    "setnx": "k v",
    "setex": "k n v",
    "psetex": "k n v",
    "getset": "k v",
    "getdel": "k",
    "getex": "k o",
    "incr": "k",
    "decr": "k",
    "incrby": "k n",
    "decrby": "k n",
    "incrbyfloat": "k n",
    "append": "k v",
    "strlen": "k",
    "getrange": "k n n",
    "substr": "k n n",
    "setrange": "k n v",
    "type": "k",
    "mget": "K",
    "mset": "P",
    "msetnx": "P",
    "del": "K",
    "unlink": "K",
    "exists": "K",
    "touch": "K",
    "expire": "k n o",
    "pexpire": "k n o",
    "expireat": "k n o",
    "pexpireat": "k n o",
    "ttl": "k",
    "pttl": "k",
    "expiretime": "k",
    "pexpiretime": "k",
    "persist": "k",
    "rename": "k k",
    "renamenx": "k k",
    "copy": "k k o",
    "getbit": "k n",
    "setbit": "k n n",
    "bitcount": "k o",
    "lcs": "k k o",
    "bitpos": "k n o",
    "bitfield": "k o o o",
    "bitfield_ro": "k o",
    "bitop": "o k K",
    "object": "o k",
    "memory": "o k o",
    "lastsave": "",
    "scan": "c o",
    "keys": "p",
    "flushall": "o",
    "info": "o",
    "ping": "o",
    "echo": "v",
    "dump": "k",
    "restore": "k n d o",
    "publish": "v v",
    "pubsub": "o o",
}
SMALL_NUMBERS = ["0", "1", "5", "100", "-1", "3600", "100000"]
PATTERNS = ["*", "a*", "{t}*", "?", "[a-", "[^a]*", "\\", "*[", "k:*"]

small_numbers = st.one_of(st.sampled_from(SMALL_NUMBERS), numbers)


@attrs.frozen
class Cursor:
    """Stands for the cursor the last SCAN of iteration ``slot`` returned ("0" at first)."""

    slot: int


CURSOR_SLOTS = 3  # SCAN iterations a sequence interleaves
cursors = st.one_of(
    st.sampled_from([Cursor(i) for i in range(CURSOR_SLOTS)]),
    st.sampled_from([Cursor(i) for i in range(CURSOR_SLOTS)]),
    small_numbers,
)
option_tail = st.lists(
    st.one_of(st.sampled_from(OPTIONS), st.sampled_from(SMALL_NUMBERS), numbers), max_size=4
)


@st.composite
def command_names(draw: st.DrawFn) -> str:
    """A name from the command table (any case), or one that is not a command."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(UNKNOWN_NAMES))
    name = draw(st.sampled_from(sorted(COMMANDS)))
    spelling = draw(st.sampled_from(["lower", "upper", "title"]))
    return {"lower": name, "upper": name.upper(), "title": name.title()}[spelling]


@st.composite
def shaped_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    """A call of the shape its command takes, its numbers and options often wrong."""
    name = draw(st.sampled_from(sorted(SHAPES)))
    args: list[Any] = []
    for kind in SHAPES[name].split():
        if kind == "k":
            args.append(draw(keys))
        elif kind == "v":
            args.append(draw(values))
        elif kind == "n":
            args.append(draw(small_numbers))
        elif kind == "d":
            value = draw(values)  # an edge value (a sentinel) dumps as EDGE_CAP bytes
            payload = dump_payload(
                b"V" * EDGE_CAP if isinstance(value, Edge) else encode_arg(value)
            )
            cut = draw(st.integers(0, len(payload)))
            args.append(payload if draw(st.booleans()) else payload[:cut] + payload[cut + 1 :])
        elif kind == "c":
            args.append(draw(cursors))
        elif kind == "p":
            args.append(draw(st.one_of(st.sampled_from(PATTERNS), keys)))
        elif kind == "K":
            args.extend(draw(st.lists(keys, min_size=1, max_size=5)))
        elif kind == "P":
            for key, value in draw(st.lists(st.tuples(keys, values), min_size=1, max_size=4)):
                args += [key, value]
        else:
            args.extend(draw(option_tail))
    return (draw(st.sampled_from([name, name.upper()])), *args)


def is_key_position(spec: Command, position: int) -> bool:
    """Whether argument ``position`` (1-based, the name not counted) is a key of ``spec``."""
    if not spec.first_key or position < spec.first_key:
        return False
    if 0 < spec.last_key < position:
        return False
    return (position - spec.first_key) % spec.key_step == 0


@st.composite
def free_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    """Any name, and arguments near its arity, often wrong.

    The key positions get keys (most of the time), MSET-like commands get
    key/value pairs, and the rest gets anything: options, edge numbers,
    keys, values.
    """
    name = draw(command_names())
    spec = COMMANDS.get(name.lower())
    arity = abs(spec.arity) - 1 if spec is not None else 1
    count = draw(st.one_of(st.just(arity), st.integers(0, arity + 5)))
    args: list[Any] = []
    for i in range(count):
        if spec is not None and is_key_position(spec, i + 1) and draw(st.integers(0, 9)):
            args.append(draw(keys))
        elif spec is not None and spec.key_step == 2 and i % 2:
            args.append(draw(values))
        else:
            args.append(draw(tokens))
    return (name, *args)


calls = st.one_of(shaped_calls(), shaped_calls(), free_calls())


@attrs.frozen
class Step:
    """One step of a sequence.

    ``how``: ``one`` call (``execute``), ``many`` (``execute_many``), ``tx``
    (``transaction``), ``watch`` (``keys`` watched, the first call run by
    itself, then the others as the watch's transaction), or ``jump``: the
    clock moves ``seconds`` on (keys expire, sweeps run; only without
    persistence, whose log keeps Unix times that a mock clock's jump would
    not move).
    """

    how: str
    calls: tuple[tuple[Any, ...], ...]
    seconds: float = 0.0
    keys: tuple[Any, ...] = ()


steps = st.one_of(
    calls.map(lambda c: Step("one", (c,))),
    calls.map(lambda c: Step("one", (c,))),
    calls.map(lambda c: Step("one", (c,))),
    st.lists(calls, min_size=1, max_size=5).map(lambda cs: Step("many", tuple(cs))),
    st.lists(calls, min_size=1, max_size=4).map(lambda cs: Step("tx", tuple(cs))),
    st.builds(
        Step,
        st.just("watch"),
        st.lists(calls, min_size=2, max_size=4).map(tuple),
        keys=st.lists(keys, min_size=1, max_size=3).map(tuple),
    ),
    st.sampled_from([0.05, 1.0, 2.0, 61.0, 3601.0]).map(lambda t: Step("jump", (), t)),
)


@attrs.frozen
class Setup:
    """A store configuration to fuzz (``persistence``: None or the appendfsync)."""

    shards: int
    maxmemory: int
    policy: str
    max_key_size: int
    max_value_size: int
    persistence: str | None
    small_records: bool
    scan_snapshots: int

    def settings(self, data_dir: str | None) -> dict[str, Any]:
        return {
            "scan_snapshots": self.scan_snapshots,
            "shards": self.shards,
            "maxmemory": self.maxmemory,
            "eviction_policy": self.policy,
            "max_key_size": self.max_key_size,
            "max_value_size": self.max_value_size,
            "data_dir": data_dir,
            "appendfsync": self.persistence or "everysec",
        }


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    persistence = draw(st.sampled_from([None, None, "everysec", "always", "no"]))
    small_records = persistence is not None and draw(st.booleans())
    if small_records:
        # Within the lowered record (4079 bytes of key and value), up to its edge.
        key_size, value_size = draw(st.sampled_from([(8, 16), (64, 256), (64, 4015), (4063, 16)]))
    else:
        key_size = draw(st.sampled_from([8, 64, 1 << 20]))
        value_size = draw(st.sampled_from([16, 256, 1 << 20]))
    return Setup(
        shards=draw(st.sampled_from([1, 3, 16])),
        maxmemory=draw(st.sampled_from([0, 0, 4096, 30_000, 300_000])),
        policy=draw(st.sampled_from(sorted(POLICY_NAMES))),
        max_key_size=key_size,
        max_value_size=value_size,
        persistence=persistence,
        small_records=small_records,
        scan_snapshots=draw(st.sampled_from([1, 2, 64])),
    )


@contextmanager
def record_limit(limit: int | None) -> Iterator[None]:
    """Lower the log's record limit for the block (every module that reads it)."""
    if limit is None:
        yield
        return
    modules = (records, engine_module, durability)
    saved = [getattr(m, "MAX_PAYLOAD") for m in modules]  # noqa: B009 - mypy: a re-export
    for module in modules:
        setattr(module, "MAX_PAYLOAD", limit)  # noqa: B010
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            setattr(module, "MAX_PAYLOAD", value)  # noqa: B010


# -- what a result may be ---------------------------------------------------------------


def well_typed(value: object, *, in_dict: bool = False) -> bool:
    """A documented result: None, int, bytes, str, lists of these (INFO's dicts too)."""
    if value is None or isinstance(value, (bytes, str)):
        return True
    if isinstance(value, bool):
        return in_dict  # INFO's flags
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return in_dict  # INFO's fractions and timings
    if isinstance(value, list):
        return all(well_typed(v, in_dict=in_dict) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and well_typed(v, in_dict=True) for k, v in value.items())
    return False


def check_error(call: object, exc: BaseException) -> None:
    """A clear client error of an expected kind: not a bug, a crash or a hang."""
    assert isinstance(exc, KVMemoError), f"{call!r} raised {exc!r}, not a KVMemoError"
    assert exc.kind in EXPECTED_KINDS, f"{call!r} got {exc.kind}: {exc.message} {exc.data}"
    assert isinstance(exc, ERROR_KINDS[exc.kind]), f"{call!r} got {exc!r} for {exc.kind}"
    assert exc.message, f"{call!r} got {exc.kind} without a message"
    assert "crashed" not in exc.message, f"{call!r}: {exc.message}"


def check_result(call: object, result: object) -> None:
    if isinstance(result, BaseException):
        check_error(call, result)
    else:
        assert well_typed(result), f"{call!r} returned {result!r}"


def check_actors(kv: kvmemo.Store, after: object) -> None:
    """Every actor running, none ever restarted, no crash recorded."""
    crashes = [f"{e.actor}: {e.error!r}" for e in kv.system.events.history if e.error is not None]
    assert not crashes, f"after {after!r}: {crashes}"
    for actor in kv.actors():
        assert actor["state"] == "running", f"after {after!r}: {actor}"
        assert actor["restarts"] == 0, f"after {after!r}: {actor}"


# -- the keyspace, as a client sees it ------------------------------------------------


Dump = dict[bytes, tuple[bytes, int]]


async def dump(kv: kvmemo.Store) -> Dump:
    """Every live key with its value and PTTL (-1: no expiry), read in three calls."""
    names = await kv.execute("KEYS", "*")
    assert isinstance(names, list)
    if not names:
        return {}
    found = await kv.execute("MGET", *names)
    ttls = [await kv.execute("PTTL", k) for k in names]
    # A key may expire between the calls: gone then (None, or a PTTL of -2).
    return {
        k: (v, t) for k, v, t in zip(names, found, ttls, strict=True) if v is not None and t != -2
    }


def check_sizes(setup: Setup, keyspace: Dump, after: object) -> None:
    """No key or value over its size limit: a command may not build one either."""
    for key, (value, _) in keyspace.items():
        assert len(key) <= setup.max_key_size, f"after {after!r}: key of {len(key)} bytes"
        assert len(value) <= setup.max_value_size, (
            f"after {after!r}: {key[:40]!r} holds {len(value)} bytes"
            f" (max_value_size {setup.max_value_size}): {value[:40]!r}"
        )


def _short(ttl: int) -> bool:
    return 0 <= ttl < SHORT_TTL_MS


def assert_same_keyspace(before: Dump, after: Dump, what: str) -> None:
    """Same keys, values and TTL presence, keys about to expire aside.

    A key expiring within ``SHORT_TTL_MS`` may be gone from ``after``; one
    that is in ``after`` must have been in ``before`` (nothing invented).
    """
    for key in before.keys() | after.keys():
        if key in before and _short(before[key][1]):
            continue
        if key in after and _short(after[key][1]):
            assert key in before, f"{what}: {key!r} appeared {after[key]}"
            continue
        assert key in before, f"{what}: {key!r} appeared {after[key]}"
        assert key in after, f"{what}: {key!r} was lost {before[key]}"
        (v1, t1), (v2, t2) = before[key], after[key]
        assert v1 == v2, f"{what}: {key!r} was {v1[:40]!r}, now {v2[:40]!r}"
        assert (t1 == -1) == (t2 == -1), f"{what}: {key!r} had pttl {t1}, now {t2}"


async def used_memory(kv: kvmemo.Store) -> int:
    used: int = (await kv.execute("INFO", "memory"))["memory"]["used_memory"]
    return used


async def evicted(kv: kvmemo.Store) -> int:
    stats = (await kv.execute("INFO", "stats"))["stats"]
    count: int = stats["evicted_keys"]
    return count


async def settled_dump(kv: kvmemo.Store) -> Dump:
    """A dump taken while no eviction cycle runs (so it is what the store keeps)."""
    for _ in range(50):
        before = await evicted(kv)
        await trio.testing.wait_all_tasks_blocked()
        keyspace = await dump(kv)
        if await evicted(kv) == before:
            return keyspace
    raise AssertionError("eviction never settled")


# -- the embedded store -----------------------------------------------------------------


@attrs.define
class Runner:
    """Runs the steps of one sequence on one store and checks each.

    ``cursors``: the cursor each SCAN iteration is at (``Cursor`` slots).
    """

    kv: kvmemo.Store
    setup: Setup
    cursors: list[bytes] = attrs.Factory(lambda: [b"0"] * CURSOR_SLOTS)
    previous: object = "opening"

    def resolve(self, call: tuple[Any, ...]) -> tuple[Any, ...]:
        """``call`` with its placeholders (:class:`Cursor`, :class:`Edge`) filled in."""
        return tuple(self.fill(a) for a in call)

    def fill(self, arg: Any) -> Any:
        if isinstance(arg, Cursor):
            return self.cursors[arg.slot]
        if arg == EDGE_KEY:
            return b"L" * EDGE_KEY.size(self.setup.max_key_size)
        if arg == EDGE_VALUE:
            return b"V" * EDGE_VALUE.size(self.setup.max_value_size)
        return arg

    def remember(self, call: tuple[Any, ...], result: object) -> None:
        """Keep the cursor a successful SCAN returned, for its iteration's next call."""
        if str(call[0]).lower() != "scan" or not isinstance(result, list):
            return
        slot = call[1].slot if len(call) > 1 and isinstance(call[1], Cursor) else 0
        self.cursors[slot] = result[0]

    async def watched(self, step: Step, calls: list[tuple[Any, ...]]) -> list[Any]:
        """A ``watch`` step: its results, its transaction's all None when a watch fired."""
        first, *rest = calls
        try:
            async with self.kv.watch(*self.resolve(step.keys)) as watch:
                try:
                    result: Any = await self.kv.execute(*first)
                except KVMemoError as exc:
                    result = exc
                try:
                    done = await watch.transaction(*rest)
                except KVMemoError as exc:  # refused as a whole (EXECABORT)
                    check_error(rest, exc)
                    done = None
        except KVMemoError as exc:  # the watch itself (a key over max_key_size)
            check_error(step.keys, exc)
            return [exc] * len(calls)
        return [result, *(done if done is not None else [None] * len(rest))]

    async def step(self, step: Step) -> None:
        """Run one step and check what it answered and what it left."""
        kv = self.kv
        if step.how == "jump":
            if self.setup.persistence is None:
                clock = trio.lowlevel.current_clock()
                assert isinstance(clock, trio.testing.MockClock)
                clock.jump(step.seconds)
                await trio.testing.wait_all_tasks_blocked()
            return
        calls = [self.resolve(c) for c in step.calls]
        # Without a memory limit nothing is evicted behind our back: a refused
        # command can be checked to have changed nothing.
        before = None
        if self.setup.maxmemory == 0 and step.how == "one":
            before = await dump(kv)
            check_sizes(self.setup, before, self.previous)
        with trio.fail_after(STEP_TIMEOUT):
            if step.how == "one":
                (call,) = calls
                try:
                    result = await kv.execute(*call)
                except KVMemoError as exc:
                    check_error(call, exc)
                    if before is not None and exc.kind in INPUT_KINDS:
                        assert_same_keyspace(before, await dump(kv), f"refused {call!r}")
                    result = exc
                else:
                    check_result(call, result)
                results = [result]
            elif step.how == "many":
                results = await kv.execute_many(*calls)
            elif step.how == "watch":
                results = await self.watched(step, calls)
            else:
                try:
                    results = await kv.transaction(*calls)
                except KVMemoError as exc:  # refused as a whole (EXECABORT)
                    check_error(calls, exc)
                    results = [exc] * len(calls)
            assert len(results) == len(calls), f"{step!r}: {results!r}"
            for call, result, raw in zip(calls, results, step.calls, strict=True):
                check_result(call, result)
                self.remember(raw, result)
        check_actors(kv, step)
        self.previous = step


async def run_sequence(setup: Setup, sequence: Sequence[Step], data_dir: str | None) -> None:
    settings_ = setup.settings(data_dir)
    jumps = sum(step.seconds for step in sequence)  # the clock's jumps are no hang
    with trio.fail_after(EXAMPLE_TIMEOUT + jumps):
        async with kvmemo.open_store(**settings_) as kv:
            runner = Runner(kv, setup)
            for step in sequence:
                await runner.step(step)
            check_sizes(setup, await dump(kv), runner.previous)
            info = await kv.execute("INFO")
            assert isinstance(info, dict), info
            assert info["server"]["shards"] == setup.shards
            check_actors(kv, "INFO")
            if data_dir is None:
                # Nothing a command did left bytes counted for no key.
                assert await kv.execute("FLUSHALL") == "OK"
                assert await used_memory(kv) == 0, f"after {runner.previous!r}"
                return
            before = await settled_dump(kv)
        async with kvmemo.open_store(**settings_) as kv:
            after = await dump(kv)
            check_actors(kv, "reopening")
        assert_same_keyspace(before, after, "after reopening")


def run_embedded(setup: Setup, sequence: Sequence[Step]) -> None:
    limit = SMALL_RECORD if setup.small_records else None
    with record_limit(limit):
        # Real time goes on (rate 1: timeouts work), and jump steps move it.
        clock = trio.testing.MockClock(rate=1.0)
        if setup.persistence is None:
            trio.run(run_sequence, setup, sequence, None, clock=clock)
            return
        with tempfile.TemporaryDirectory(prefix="kvmemo-fuzz-") as data_dir:
            trio.run(run_sequence, setup, sequence, data_dir, clock=clock)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(setups(), st.lists(steps, min_size=3, max_size=30))
def test_no_command_sequence_crashes_an_actor_or_loses_data(
    setup: Setup, sequence: list[Step]
) -> None:
    run_embedded(setup, sequence)


# -- what the fuzzing found, minimised (fixed) ------------------------------------------


@pytest.mark.parametrize(
    ("before", "call"),
    [
        pytest.param(
            # 1e100 is 5 bytes; the sum, written out, is 100.
            (),
            ("INCRBYFLOAT", "f", "1e100"),
            id="incrbyfloat",
        ),
        pytest.param(
            # Two arguments of 16 bytes; the difference is 17.
            ("SET", "f", "-999999999999999"),
            ("DECRBY", "f", "9000000000000000"),
            id="decrby",
        ),
    ],
)
async def test_a_number_built_over_max_value_size_is_refused(
    before: tuple[str, ...], call: tuple[str, ...]
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with kvmemo.open_store(shards=1, max_value_size=16) as kv:
            if before:
                assert await kv.execute(*before) == "OK"
            old = await kv.execute("GET", "f")
            with pytest.raises(KVMemoError) as info:
                await kv.execute(*call)
            assert info.value.kind == "TOO_LARGE"
            assert await kv.execute("GET", "f") == old


async def test_incrbyfloat_at_the_record_limit_does_not_crash_its_shard() -> None:
    # The limits fit one log record exactly (4063 + 16 bytes with the record
    # lowered to 4 KiB); the result does not. The shard's journal used to raise
    # ValueError after its memory had changed: the shard crashed (INTERNAL),
    # its restarted self served the 100-byte value, and a reopen lost it.
    key = b"L" * 4063
    with record_limit(SMALL_RECORD), tempfile.TemporaryDirectory() as data_dir:
        settings_: dict[str, Any] = {
            "shards": 1,
            "data_dir": data_dir,
            "appendfsync": "always",
            "max_key_size": len(key),
            "max_value_size": 16,
        }
        with trio.fail_after(STEP_TIMEOUT):
            async with kvmemo.open_store(**settings_) as kv:
                with pytest.raises(KVMemoError) as info:
                    await kv.execute("INCRBYFLOAT", key, "1e100")
                assert info.value.kind == "TOO_LARGE", info.value
                check_actors(kv, "INCRBYFLOAT")
                assert await kv.execute("EXISTS", key) == 0


# -- the Redis port ---------------------------------------------------------------------

CONNECTION_NAMES = [
    "auth",
    "client",
    "command",
    "config",
    "debug",
    "discard",
    "exec",
    "hello",
    "info",
    "multi",
    "ping",
    "quit",
    "reset",
    "move",
    "role",
    "select",
    "shutdown",
    "slowlog",
    "swapdb",
    "unwatch",
    "wait",
    "watch",
]
SUBCOMMANDS = [
    "LIST",
    "ID",
    "INFO",
    "GETNAME",
    "SETNAME",
    "SETINFO",
    "LIB-NAME",
    "lib-ver",
    "NO-EVICT",
    "ON",
    "TYPE",
    "normal",
    "COUNT",
    "DOCS",
    "GETKEYS",
    "HELP",
    "GET",
    "SET",
    "maxmemory",
    "maxmemory-policy",
    "allkeys-lru",
    "volatile-ttl",
    "noeviction",
    "save",
    "appendonly",
    "RESETSTAT",
    "LEN",
    "RESET",
    "NOSAVE",
    "slowlog-log-slower-than",
    "REWRITE",
    "actors",
    "kill",
    "shard-0",
    "default",
    "s3cret",
    "AUTH",
    "2",
    "3",
    "1mb",
    "-1",
    "0",
]
TOKEN = "s3cret"  # the password of the servers that want AUTH

subcommand_args = st.lists(
    st.one_of(st.sampled_from(SUBCOMMANDS), st.sampled_from(SUBCOMMANDS), tokens), max_size=5
)


@st.composite
def connection_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    """A connection command (CLIENT, CONFIG, HELLO, MULTI, ...) with arguments, often wrong."""
    name = draw(st.sampled_from(CONNECTION_NAMES))
    return (draw(st.sampled_from([name, name.upper()])), *draw(subcommand_args))


CONFIG_VALUES = [
    "0",
    "1",
    "100",
    "1mb",
    "64MiB",
    "-1",
    "abc",
    "99999999999999999999gb",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
    "noeviction",
    "lru",
    "fifo",
    "yes",
    "no",
    "everysec",
    "",
]
CONFIG_NAMES = ["maxmemory", "maxmemory-policy", "save", "appendonly", "appendfsync", "dir", "port"]


@st.composite
def shaped_connection_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    """Connection commands in the shapes their subcommands take, values often wrong."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        pairs = draw(
            st.lists(
                st.tuples(st.sampled_from(CONFIG_NAMES), st.sampled_from(CONFIG_VALUES)),
                min_size=1,
                max_size=2,
            )
        )
        return ("CONFIG", "SET", *[x for pair in pairs for x in pair])
    if kind == 1:
        return ("CONFIG", "GET", draw(st.sampled_from([*CONFIG_NAMES, "*", "max*", "["])))
    if kind == 2:
        version = draw(st.sampled_from(["2", "3", "4", "-1", "x"]))
        extra = draw(
            st.sampled_from(
                [(), ("AUTH", "default", TOKEN), ("AUTH", "nobody", "x"), ("SETNAME", "a b")]
            )
        )
        return ("HELLO", version, *extra)
    if kind == 3:
        inner = draw(calls)
        return ("COMMAND", draw(st.sampled_from(["GETKEYS", "INFO", "DOCS"])), *inner)
    if kind == 4:
        return ("WATCH", *draw(st.lists(keys, min_size=1, max_size=3)))
    if kind == 5:
        return (draw(st.sampled_from(["MULTI", "EXEC", "DISCARD", "UNWATCH", "RESET"])),)
    if kind == 6:
        sub = draw(st.sampled_from(["LIST", "INFO", "ID", "GETNAME", "SETNAME", "SETINFO"]))
        return ("CLIENT", sub, *draw(subcommand_args))
    return ("DEBUG", draw(st.sampled_from(["ACTORS", "KILL", "HELP"])), *draw(subcommand_args))


def encoded(call: tuple[Any, ...]) -> bytes:
    """A call as one RESP request (Cursor placeholders as "0")."""
    return encode_command(*(port_arg(a) for a in call))


def port_arg(arg: Any) -> bytes:
    """An argument as the Redis port gets it: placeholders as "0" and 100 bytes."""
    if isinstance(arg, Cursor):
        return b"0"
    if isinstance(arg, Edge):
        return b"E" * 100
    return encode_arg(arg)


resp_calls = st.one_of(calls, calls, connection_calls(), shaped_connection_calls())

# Pieces of requests, well-formed and not, for the raw byte streams.
FRAGMENTS = [
    b"*",
    b"$",
    b"*1\r\n",
    b"*2\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"$-1\r\n",
    b"$0\r\n\r\n",
    b"$3\r\nGET\r\n",
    b"$4\r\nPING\r\n",
    b"*99999999999\r\n",
    b"$99999999999\r\n",
    b"*1\r\n$-5\r\n",
    b"*1\r\n$1\r\nab\r\n",
    b"*1\r\n*1\r\n$1\r\na\r\n",
    b":1\r\n",
    b"+OK\r\n",
    b"-ERR\r\n",
    b"%1\r\n",
    b"~1\r\n",
    b"_\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b'"',
    b"'",
    b'"\\x41\\xZZ"',
    b"PING",
    b"SET a b",
    b" ",
    b"\t",
    b"*3\r\n$3\r\nset\r\n",
    b"HELLO 3\r\n",
    b"AUTH default s3cret\r\n",
    b"MULTI\r\n",
    b"EXEC\r\n",
    b"QUIT\r\n",
    b"x" * 300,  # over the small inline limit
]


@st.composite
def raw_streams(draw: st.DrawFn) -> bytes:
    """Bytes to send as they are: fragments, requests cut anywhere, noise."""
    pieces: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            pieces.append(draw(st.sampled_from(FRAGMENTS)))
        elif kind == 1:
            request = encoded(draw(resp_calls))
            pieces.append(request[: draw(st.integers(0, len(request)))])
        elif kind == 2:
            pieces.append(encoded(draw(resp_calls)))
        else:
            pieces.append(draw(st.binary(min_size=1, max_size=40)))
    return b"".join(pieces)


@attrs.frozen
class Exchange:
    """One thing the fuzzing client does.

    ``batch``: requests pipelined on the long-lived fuzzing connection (opened
    again when the server closed it). ``raw``: ``data`` as it is on a new
    connection (after AUTH when ``login``), then end of input.
    """

    how: str
    batch: tuple[tuple[Any, ...], ...] = ()
    data: bytes = b""
    login: bool = True


exchanges = st.one_of(
    st.lists(resp_calls, min_size=1, max_size=5).map(lambda b: Exchange("batch", tuple(b))),
    st.lists(resp_calls, min_size=1, max_size=5).map(lambda b: Exchange("batch", tuple(b))),
    st.builds(Exchange, st.just("raw"), data=raw_streams(), login=st.booleans()),
)


@attrs.frozen
class PortSetup:
    """A Redis port to fuzz: whether it wants AUTH, its limits, its store."""

    auth: bool
    small_limits: bool
    shards: int
    maxmemory: int

    def limits(self) -> RespLimits:
        if not self.small_limits:
            return RespLimits()
        return RespLimits(
            max_bulk_len=2048,
            max_args=12,
            max_inline_len=256,
            max_query_buffer=64 * 1024,
            max_transaction_commands=3,
        )


port_setups = st.builds(
    PortSetup,
    auth=st.booleans(),
    small_limits=st.booleans(),
    shards=st.sampled_from([1, 3]),
    maxmemory=st.sampled_from([0, 30_000]),
)


class ErrorLog(logging.Handler):
    """The ERROR records of the server's loggers (a crashed connection task logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.getMessage()} {record.exc_info!r}")


@contextmanager
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(name) for name in ("kvmemo", "actors")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


EOF = ErrorReply("(the server closed the connection)")  # a marker, never on the wire


class RespClient:
    """A raw RESP client: requests out, parsed replies in; :data:`EOF` once closed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = RespReplyParser()

    async def reply(self) -> object:
        while True:
            value = self.parser.next_reply()  # ReplyProtocolError: not RESP, a failure
            if value is not NEED_DATA:
                return value
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return EOF
            self.parser.feed(data)

    async def call(self, *args: Any) -> object:
        await self.stream.send_all(encode_command(*args))
        return await self.reply()


def may_close(call: tuple[Any, ...], reply: object) -> bool:
    """Whether the server may close the connection after answering ``call`` with
    ``reply``: QUIT's OK, or a protocol error (a limit, or an unauthenticated
    client's big request)."""
    if isinstance(reply, ErrorReply) and "Protocol error" in reply.message:
        return True
    return str(call[0]).lower() == "quit" and reply == "OK"


def beyond_a_limit(call: tuple[Any, ...], setup: PortSetup) -> bool:
    """Whether the request parser refuses ``call`` outright: a close, maybe no reply."""
    limits = setup.limits()
    args = [port_arg(a) for a in call]
    return len(args) > limits.max_args or any(len(a) > limits.max_bulk_len for a in args)


@attrs.define
class PortFuzzer:
    """Drives the fuzzing connections and one watching client on a Redis port."""

    engine: KVEngine
    port: int
    setup: PortSetup
    log: ErrorLog
    fuzz: RespClient | None = None
    watcher: RespClient | None = None
    checks: int = 0

    async def connect(self, *, login: bool) -> RespClient:
        client = RespClient(await trio.open_tcp_stream("127.0.0.1", self.port))
        if login and self.setup.auth:
            assert await client.call("AUTH", TOKEN) == "OK"
        return client

    async def run(self, exchange: Exchange) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            if exchange.how == "batch":
                await self.batch(exchange.batch)
            else:
                await self.raw(exchange.data, login=exchange.login)
            await self.check(exchange)

    async def batch(self, batch: tuple[tuple[Any, ...], ...]) -> None:
        """Pipeline ``batch``: a reply to each, until one that may close the connection."""
        if self.fuzz is None:
            self.fuzz = await self.connect(login=True)
        client = self.fuzz
        await client.stream.send_all(b"".join(encoded(c) for c in batch))
        closing = False
        for call in batch:
            reply = await client.reply()
            if reply is EOF:
                assert closing or beyond_a_limit(call, self.setup), (
                    f"closed without answering {call!r} of {batch!r}: {self.log.records}"
                )
                break
            closing = may_close(call, reply)
        else:
            if not closing:
                return
            assert await client.reply() is EOF, f"{batch!r}: still open after its last reply"
        await client.stream.aclose()
        self.fuzz = None

    async def raw(self, data: bytes, *, login: bool) -> None:
        """``data`` on a new connection, then EOF: replies that parse, then a close."""
        client = await self.connect(login=login)
        await client.stream.send_all(data)
        await client.stream.send_eof()
        while await client.reply() is not EOF:
            pass
        await client.stream.aclose()

    async def check(self, what: object) -> None:
        """The other client still works, no actor crashed, no connection task crashed."""
        if self.watcher is None:
            self.watcher = await self.connect(login=True)
        watcher = self.watcher
        self.checks += 1
        assert await watcher.call("PING") == "PONG", f"after {what!r}"
        value = str(self.checks).encode()
        answer = await watcher.call("SET", "watcher:key", value)
        if answer == "OK":
            # None: CONFIG SET maxmemory made the store small, and it was evicted.
            assert await watcher.call("GET", "watcher:key") in (value, None), f"after {what!r}"
        else:  # the same, refused as OOM
            assert isinstance(answer, ErrorReply), f"after {what!r}: {answer!r}"
            assert answer.message.startswith("OOM"), f"after {what!r}: {answer!r}"
        assert not self.log.records, f"after {what!r}: {self.log.records}"
        assert self.engine.system is not None
        crashes = [e for e in self.engine.system.events.history if e.error is not None]
        assert not crashes, f"after {what!r}: {crashes}"
        for actor in self.engine.actors():
            assert actor["state"] == "running", f"after {what!r}: {actor}"
            assert actor["restarts"] == 0, f"after {what!r}: {actor}"


async def fuzz_port(setup: PortSetup, sequence: Sequence[Exchange]) -> None:
    tokens = frozenset({TOKEN}) if setup.auth else frozenset()
    with trio.fail_after(EXAMPLE_TIMEOUT), error_log() as log:
        async with trio.open_nursery() as nursery:
            engine = KVEngine(StoreConfig(shards=setup.shards, maxmemory=setup.maxmemory))
            system = await nursery.start(engine.supervisor().run)
            engine.attach(system)
            _, port = await nursery.start(
                partial(serve_resp, engine, port=0, tokens=tokens, limits=setup.limits())
            )
            fuzzer = PortFuzzer(engine, port, setup, log)
            await fuzzer.check("connecting")
            busy = await fuzzer.connect(login=True)
            nursery.start_soon(traffic, busy)
            for exchange in sequence:
                await fuzzer.run(exchange)
            nursery.cancel_scope.cancel()


async def traffic(client: RespClient) -> None:
    """A client busy all along (its commands share rounds with the fuzzer's): each
    request answered, in order, until the test ends."""
    n = 0
    while True:
        n += 1
        value = str(n).encode()
        answer = await client.call("SET", "busy:key", value)
        if isinstance(answer, ErrorReply):  # CONFIG SET maxmemory made the store small
            assert answer.message.startswith("OOM"), answer
            continue
        assert answer == "OK", answer
        # None: a FLUSHALL, or evicted once CONFIG SET maxmemory made the store small.
        assert await client.call("GET", "busy:key") in (value, None), n


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(port_setups, st.lists(exchanges, min_size=1, max_size=12))
def test_no_request_crashes_the_redis_port_for_another_client(
    setup: PortSetup, sequence: list[Exchange]
) -> None:
    trio.run(fuzz_port, setup, sequence)
