"""The command suite: Redis semantics of every command, for any front end.

Each case is a plain ``async def case(kv)`` taking an object with the typed
methods of :class:`kvmemo.api.Commands` and ``execute(name, *args)``: the
embedded store, the WebSocket client, a Redis-protocol client adapter. The
same cases run against each of them, which is how we know they agree.

Rules the cases follow so that they hold over a real network:

- No mock clock, no time travel. Expiry is checked through TTL values and
  through EXPIRE/SET with a time in the past (which delete at once); one case
  uses ``PX 1`` and a short sleep, the only way to observe lazy expiry from
  outside (a runner may give it a mock clock; real time works too).
- Keys carry a fresh random prefix, so cases can share a store. A case that
  needs the whole keyspace (``FLUSHALL``, ``DBSIZE``) is marked
  ``exclusive``: run it only on a store nobody else uses.
- Errors are compared by their ``kind`` attribute (the protocol's stable
  name), never by message or class: see :func:`assert_error`.
- Results follow the protocol's mapping as :class:`kvmemo.api.Commands`
  documents it: simple strings as ``str`` (``"OK"``), bulk strings as
  ``bytes``, integers as ``int``, nil as ``None``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from kvmemo.api import Commands

OK = "OK"
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
FAR_FUTURE = 33177117420  # a Unix time in the year 3021 (Redis's EXPIRETIME example)

Case = Callable[[Commands], Awaitable[None]]


@attrs.frozen
class SuiteCase:
    """One case of the suite.

    Attributes:
        name: the function's name (a test id).
        run: the case itself.
        exclusive: it needs a store nobody else uses (it flushes or counts all keys).
    """

    name: str
    run: Case
    exclusive: bool = False


SUITE: list[SuiteCase] = []


def case(*, exclusive: bool = False) -> Callable[[Case], Case]:
    """Register a function as a case of the suite."""

    def register(fn: Case) -> Case:
        SUITE.append(SuiteCase(fn.__name__, fn, exclusive))
        return fn

    return register


async def assert_error(kind: str, awaitable: Awaitable[Any]) -> BaseException:
    """Await ``awaitable`` and check that it raises an error of the given ``kind``.

    Any exception with a ``kind`` attribute qualifies (``KVMemoError`` or a
    client's own error class); an exception without one propagates.

    Returns:
        The exception, for further checks.
    """
    try:
        result = await awaitable
    except Exception as exc:
        if getattr(exc, "kind", None) is None:
            raise
        error: BaseException = exc
    else:
        raise AssertionError(f"expected a {kind} error, got the result {result!r}")
    actual = getattr(error, "kind", None)
    assert actual == kind, f"expected a {kind} error, got {actual}: {error}"
    return error


def keys(*names: str) -> list[str]:
    """Fresh, unique key names (one random prefix per call)."""
    prefix = f"suite:{uuid.uuid4().hex[:12]}:"
    return [prefix + name for name in names]


def prefix_of(key: str) -> str:
    """The random prefix of a key made by :func:`keys` (for MATCH and KEYS)."""
    return key[: key.rindex(":") + 1]


# -- connection and server --------------------------------------------------------------


@case()
async def ping_answers_pong_or_the_message(kv: Commands) -> None:
    assert await kv.ping() == "PONG"
    assert await kv.ping("hello") == b"hello"
    assert await kv.execute("PING") == "PONG"
    await assert_error("ARITY", kv.execute("ping", "a", "b"))


@case()
async def echo_returns_its_argument(kv: Commands) -> None:
    assert await kv.echo("hello world") == b"hello world"
    assert await kv.echo(b"\x00\xff") == b"\x00\xff"
    await assert_error("ARITY", kv.execute("echo"))
    await assert_error("ARITY", kv.execute("echo", "a", "b"))


@case()
async def time_is_unix_seconds_and_microseconds(kv: Commands) -> None:
    seconds, micros = await kv.time()
    assert isinstance(seconds, bytes)
    assert isinstance(micros, bytes)
    assert abs(int(seconds) - time.time()) < 3600
    assert 0 <= int(micros) < 1_000_000
    await assert_error("ARITY", kv.execute("time", "x"))


@case()
async def an_unknown_command_is_unknown_method(kv: Commands) -> None:
    await assert_error("UNKNOWN_METHOD", kv.execute("nosuchcommand"))
    await assert_error("UNKNOWN_METHOD", kv.execute("nosuchcommand", "k", "v"))


@case()
async def command_names_are_case_insensitive(kv: Commands) -> None:
    (k,) = keys("k")
    assert await kv.execute("SET", k, "v", "EX", "10") == OK
    assert await kv.execute("Get", k) == b"v"
    assert await kv.execute("ttl", k) == 10


@case()
async def a_wrong_argument_count_is_an_arity_error(kv: Commands) -> None:
    (k,) = keys("k")
    for name, args in [
        ("get", []),
        ("get", [k, k]),
        ("set", [k]),
        ("getdel", []),
        ("getex", []),
        ("del", []),
        ("unlink", []),
        ("exists", []),
        ("touch", []),
        ("mget", []),
        ("mset", [k]),
        ("mset", [k, "v", k]),
        ("msetnx", [k]),
        ("incr", []),
        ("incrby", [k]),
        ("decrby", [k, "1", "2"]),
        ("append", [k]),
        ("strlen", []),
        ("expire", [k]),
        ("pexpireat", [k]),
        ("ttl", []),
        ("persist", [k, k]),
        ("type", []),
        ("keys", []),
        ("scan", []),
        ("dbsize", ["x"]),
        ("setnx", [k]),
        ("setex", [k, "10"]),
        ("getrange", [k, "0"]),
        ("setrange", [k, "0"]),
    ]:
        await assert_error("ARITY", kv.execute(name, *args))
    assert await kv.exists(k) == 0  # no failed call created the key


@case()
async def info_reports_the_protocol_sections(kv: Commands) -> None:
    info = await kv.info()
    for section in ("server", "memory", "stats", "keyspace", "actors", "persistence"):
        assert section in info
    only = await kv.info("keyspace")
    assert set(only) == {"keyspace"}


@case()
async def debug_actors_lists_every_actor(kv: Commands) -> None:
    actors = await kv.execute("debug.actors")
    assert actors, "a node has actors"
    for actor in actors:
        assert set(actor) >= {"name", "state", "restarts", "mailbox"}
    names = {a["name"] for a in actors}
    assert "ttl-manager" in names
    assert "eviction-manager" in names


@case()
async def command_list_names_every_v1_command(kv: Commands) -> None:
    names = set(await kv.execute("command.list"))
    v1 = {
        "ping", "get", "set", "getdel", "getex", "del", "exists", "expire", "pexpire",
        "expireat", "pexpireat", "ttl", "pttl", "persist", "incr", "decr", "incrby",
        "decrby", "append", "strlen", "mget", "mset", "msetnx", "type", "dbsize", "scan",
        "keys", "flushall", "info", "auth", "save", "debug.actors",
    }  # fmt: skip
    assert v1 <= names


@case()
async def save_snapshots_or_reports_persistence_disabled(kv: Commands) -> None:
    try:
        result = await kv.execute("save")
    except Exception as exc:
        if getattr(exc, "kind", None) is None:
            raise
        result = getattr(exc, "kind", None)
    assert result in (OK, "DISABLED")


# -- GET and SET -------------------------------------------------------------------------


@case()
async def set_then_get_round_trips_any_bytes(kv: Commands) -> None:
    k, empty, binary, text = keys("k", "empty", "binary", "text")
    assert await kv.get(k) is None
    assert await kv.set(k, "v1") == OK
    assert await kv.get(k) == b"v1"
    assert await kv.set(k, "v2") == OK
    assert await kv.get(k) == b"v2"
    assert await kv.set(empty, "") == OK
    assert await kv.get(empty) == b""
    assert await kv.exists(empty) == 1
    assert await kv.set(binary, b"\x00\r\n\xff") == OK
    assert await kv.get(binary) == b"\x00\r\n\xff"
    assert await kv.set(text, "ключ ✓") == OK
    assert await kv.get(text) == "ключ ✓".encode()
    assert await kv.execute("set", k, 42) == OK
    assert await kv.get(k) == b"42"


@case()
async def set_nx_and_xx_apply_only_when_their_condition_holds(kv: Commands) -> None:
    k, other = keys("k", "other")
    assert await kv.set(k, "a", xx=True) is None
    assert await kv.exists(k) == 0
    assert await kv.set(k, "a", nx=True) == OK
    assert await kv.set(k, "b", nx=True) is None
    assert await kv.get(k) == b"a"
    assert await kv.set(k, "c", xx=True) == OK
    assert await kv.get(k) == b"c"
    assert await kv.execute("set", other, "x", "nx") == OK  # options are case-insensitive
    await assert_error("SYNTAX", kv.execute("set", k, "d", "NX", "XX"))
    await assert_error("SYNTAX", kv.execute("set", k, "d", "XX", "NX"))
    assert await kv.get(k) == b"c"


@case()
async def set_get_returns_the_old_value(kv: Commands) -> None:
    (k,) = keys("k")
    assert await kv.set(k, "a", get=True) is None
    assert await kv.get(k) == b"a"
    assert await kv.set(k, "b", get=True) == b"a"
    assert await kv.get(k) == b"b"
    # NX + GET: not set because the key exists, the old value comes back.
    assert await kv.set(k, "c", nx=True, get=True) == b"b"
    assert await kv.get(k) == b"b"
    (missing,) = keys("missing")
    assert await kv.set(missing, "x", xx=True, get=True) is None
    assert await kv.exists(missing) == 0


@case()
async def set_expiry_options_set_the_ttl(kv: Commands) -> None:
    ex, px, exat, pxat = keys("ex", "px", "exat", "pxat")
    assert await kv.set(ex, "v", ex=100) == OK
    assert 99 <= await kv.ttl(ex) <= 100
    assert await kv.set(px, "v", px=100_000) == OK
    assert 99_000 <= await kv.pttl(px) <= 100_000
    assert 99 <= await kv.ttl(px) <= 100
    now = int(time.time())
    assert await kv.set(exat, "v", exat=now + 1000) == OK
    assert 990 <= await kv.ttl(exat) <= 1000
    assert await kv.set(pxat, "v", pxat=(now + 1000) * 1000) == OK
    assert 990 <= await kv.ttl(pxat) <= 1000
    assert await kv.get(pxat) == b"v"


@case()
async def a_successful_set_discards_the_old_ttl_unless_keepttl(kv: Commands) -> None:
    k, nx = keys("k", "nx")
    await kv.set(k, "a", ex=100)
    assert await kv.set(k, "b") == OK
    assert await kv.ttl(k) == -1
    await kv.set(k, "c", ex=100)
    assert await kv.set(k, "d", keepttl=True) == OK
    assert await kv.get(k) == b"d"
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.set(k, "e", xx=True, keepttl=True) == OK
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.set(k, "f", xx=True) == OK
    assert await kv.ttl(k) == -1
    # KEEPTTL on a key without TTL keeps "no TTL"; a failed NX keeps the TTL.
    assert await kv.set(k, "g", keepttl=True) == OK
    assert await kv.ttl(k) == -1
    await kv.set(nx, "a", ex=100)
    assert await kv.set(nx, "b", nx=True) is None
    assert 99 <= await kv.ttl(nx) <= 100
    # GETSET is a SET: it discards the TTL too.
    assert await kv.getset(nx, "c") == b"a"
    assert await kv.ttl(nx) == -1


@case()
async def set_with_conflicting_or_bad_options_is_an_error_and_changes_nothing(
    kv: Commands,
) -> None:
    (k,) = keys("k")
    await kv.set(k, "old", ex=100)
    for args in [
        ["KEEPTTL", "EX", "10"],
        ["EX", "10", "KEEPTTL"],
        ["EX", "10", "PX", "10000"],
        ["PX", "10", "EXAT", "10"],
        ["EXAT", "10", "PXAT", "10"],
        ["EX", "10", "EX", "10", "KEEPTTL"],
        ["NX", "XX"],
        ["EX"],
        ["PX"],
        ["BOGUS"],
        ["EX", "10", "BOGUS"],
    ]:
        await assert_error("SYNTAX", kv.execute("set", k, "new", *args))
    for bad_time in ["0", "-1"]:
        for option in ["EX", "PX", "EXAT", "PXAT"]:
            await assert_error("SYNTAX", kv.execute("set", k, "new", option, bad_time))
    for not_an_int in ["abc", "1.5", "", " 1"]:
        await assert_error("NOT_INTEGER", kv.execute("set", k, "new", "EX", not_an_int))
    assert await kv.get(k) == b"old"
    assert 99 <= await kv.ttl(k) <= 100


@case()
async def set_with_an_absolute_time_in_the_past_deletes_the_key(kv: Commands) -> None:
    a, b, c = keys("a", "b", "c")
    await kv.set(a, "old")
    assert await kv.set(a, "new", exat=1) == OK
    assert await kv.get(a) is None
    assert await kv.exists(a) == 0
    await kv.set(b, "old")
    assert await kv.set(b, "new", pxat=1000, get=True) == b"old"
    assert await kv.exists(b) == 0
    assert await kv.set(c, "new", exat=1) == OK
    assert await kv.exists(c) == 0


@case()
async def setnx_setex_psetex_and_getset(kv: Commands) -> None:
    a, b, c, d = keys("a", "b", "c", "d")
    assert await kv.setnx(a, "1") == 1
    assert await kv.setnx(a, "2") == 0
    assert await kv.get(a) == b"1"
    assert await kv.setex(b, 100, "v") == OK
    assert await kv.get(b) == b"v"
    assert 99 <= await kv.ttl(b) <= 100
    assert await kv.psetex(c, 100_000, "v") == OK
    assert 99_000 <= await kv.pttl(c) <= 100_000
    for name in ("setex", "psetex"):
        await assert_error("SYNTAX", kv.execute(name, d, "0", "v"))
        await assert_error("SYNTAX", kv.execute(name, d, "-5", "v"))
        await assert_error("NOT_INTEGER", kv.execute(name, d, "ten", "v"))
    assert await kv.exists(d) == 0
    assert await kv.getset(d, "first") is None
    assert await kv.getset(d, "second") == b"first"
    assert await kv.get(d) == b"second"


@case()
async def getdel_returns_the_value_and_removes_the_key(kv: Commands) -> None:
    (k,) = keys("k")
    assert await kv.getdel(k) is None
    await kv.set(k, "v", ex=100)
    assert await kv.getdel(k) == b"v"
    assert await kv.get(k) is None
    assert await kv.ttl(k) == -2
    assert await kv.getdel(k) is None


@case()
async def getex_reads_and_sets_or_clears_the_ttl(kv: Commands) -> None:
    (k,) = keys("k")
    assert await kv.getex(k) is None
    assert await kv.getex(k, ex=10) is None
    assert await kv.exists(k) == 0
    await kv.set(k, "v")
    assert await kv.getex(k) == b"v"
    assert await kv.ttl(k) == -1
    assert await kv.getex(k, ex=100) == b"v"
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.getex(k) == b"v"  # no option: the TTL stays
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.getex(k, px=200_000) == b"v"
    assert 199 <= await kv.ttl(k) <= 200
    now = int(time.time())
    assert await kv.getex(k, exat=now + 1000) == b"v"
    assert 990 <= await kv.ttl(k) <= 1000
    assert await kv.getex(k, pxat=(now + 2000) * 1000) == b"v"
    assert 1990 <= await kv.ttl(k) <= 2000
    assert await kv.getex(k, persist=True) == b"v"
    assert await kv.ttl(k) == -1


@case()
async def getex_with_bad_options_is_an_error_and_changes_nothing(kv: Commands) -> None:
    (k,) = keys("k")
    await kv.set(k, "v", ex=100)
    for args in [
        ["EX", "10", "PX", "10"],
        ["PERSIST", "EX", "10"],
        ["EX", "10", "PERSIST"],
        ["KEEPTTL"],
        ["BOGUS"],
        ["EX"],
        ["EX", "0"],
        ["PX", "-1"],
    ]:
        await assert_error("SYNTAX", kv.execute("getex", k, *args))
    await assert_error("NOT_INTEGER", kv.execute("getex", k, "EX", "soon"))
    assert 99 <= await kv.ttl(k) <= 100


@case()
async def getex_with_a_time_in_the_past_returns_the_value_and_deletes(kv: Commands) -> None:
    (k,) = keys("k")
    await kv.set(k, "v")
    assert await kv.getex(k, exat=1) == b"v"
    assert await kv.exists(k) == 0


# -- integers and floats --------------------------------------------------------------------


@case()
async def incr_family_counts_from_zero_in_signed_64_bits(kv: Commands) -> None:
    k, other = keys("k", "other")
    assert await kv.incr(k) == 1
    assert await kv.incr(k) == 2
    assert await kv.incrby(k, 10) == 12
    assert await kv.decr(k) == 11
    assert await kv.decrby(k, 20) == -9
    assert await kv.incrby(k, -1) == -10
    assert await kv.get(k) == b"-10"
    assert await kv.decr(other) == -1
    await kv.set(k, "41")
    assert await kv.incr(k) == 42
    await kv.set(k, "-0")  # not a canonical integer for Redis
    await assert_error("NOT_INTEGER", kv.incr(k))
    await kv.set(k, "0")
    assert await kv.incrby(k, INT64_MAX) == INT64_MAX
    await kv.set(k, "0")
    assert await kv.incrby(k, INT64_MIN) == INT64_MIN
    await kv.set(k, "0")
    assert await kv.decrby(k, -INT64_MAX) == INT64_MAX


@case()
async def incr_on_a_non_integer_value_is_not_integer_and_changes_nothing(kv: Commands) -> None:
    (k,) = keys("k")
    for bad in ["abc", "1.5", " 1", "1 ", "01", "+1", "", "1e3", "12345678901234567890"]:
        await kv.set(k, bad, ex=100)
        for call in (kv.incr(k), kv.decr(k), kv.incrby(k, 5), kv.decrby(k, 5)):
            await assert_error("NOT_INTEGER", call)
        assert await kv.get(k) == bad.encode()
        assert 99 <= await kv.ttl(k) <= 100


@case()
async def incrby_with_a_non_integer_delta_is_not_integer(kv: Commands) -> None:
    (k,) = keys("k")
    for bad in ["abc", "1.5", "", "9223372036854775808", "-9223372036854775809"]:
        await assert_error("NOT_INTEGER", kv.execute("incrby", k, bad))
        await assert_error("NOT_INTEGER", kv.execute("decrby", k, bad))
    assert await kv.exists(k) == 0


@case()
async def incr_overflow_is_not_integer_and_changes_nothing(kv: Commands) -> None:
    (k,) = keys("k")
    await kv.set(k, str(INT64_MAX))
    await assert_error("NOT_INTEGER", kv.incr(k))
    await assert_error("NOT_INTEGER", kv.incrby(k, 1))
    await assert_error("NOT_INTEGER", kv.decrby(k, -1))
    assert await kv.get(k) == str(INT64_MAX).encode()
    await kv.set(k, str(INT64_MIN))
    await assert_error("NOT_INTEGER", kv.decr(k))
    await assert_error("NOT_INTEGER", kv.decrby(k, 1))
    await assert_error("NOT_INTEGER", kv.incrby(k, -1))
    assert await kv.get(k) == str(INT64_MIN).encode()
    await kv.set(k, "1")
    await assert_error("NOT_INTEGER", kv.incrby(k, INT64_MAX))
    await assert_error("NOT_INTEGER", kv.decrby(k, INT64_MIN))  # -INT64_MIN overflows itself
    await kv.set(k, "0")
    await assert_error("NOT_INTEGER", kv.decrby(k, INT64_MIN))
    assert await kv.get(k) == b"0"


@case()
async def incr_keeps_the_ttl(kv: Commands) -> None:
    (k,) = keys("k")
    await kv.set(k, "5", ex=100)
    assert await kv.incr(k) == 6
    assert await kv.incrby(k, 4) == 10
    assert 99 <= await kv.ttl(k) <= 100


@case()
async def incrbyfloat_adds_and_formats_as_redis(kv: Commands) -> None:
    k, n, e = keys("k", "n", "e")
    await kv.set(k, "10.50")
    assert await kv.incrbyfloat(k, 0.1) == b"10.6"
    assert await kv.execute("incrbyfloat", k, "-5") == b"5.6"
    assert await kv.get(k) == b"5.6"
    await kv.set(e, "5.0e3")
    assert await kv.execute("incrbyfloat", e, "2.0e2") == b"5200"
    assert await kv.execute("incrbyfloat", n, "3") == b"3"
    assert await kv.execute("incrbyfloat", n, "1.5") == b"4.5"
    await kv.set(n, "7", ex=100)
    assert await kv.execute("incrbyfloat", n, "0.5") == b"7.5"
    assert 99 <= await kv.ttl(n) <= 100


@case()
async def incrbyfloat_rejects_non_numbers_and_infinity(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    await kv.set(k, "abc")
    await assert_error("NOT_INTEGER", kv.execute("incrbyfloat", k, "1"))
    assert await kv.get(k) == b"abc"
    for bad in ["abc", "", "nan", "inf", "-inf", " 1"]:
        await assert_error("NOT_INTEGER", kv.execute("incrbyfloat", missing, bad))
    # As Redis, in long double: past the double range, up to about 1.19e4932.
    await kv.set(k, "1e4932")
    await assert_error("NOT_INTEGER", kv.execute("incrbyfloat", k, "1e4932"))
    assert await kv.get(k) == b"1e4932"
    assert await kv.exists(missing) == 0


# -- other string commands -----------------------------------------------------------------


@case()
async def append_creates_or_extends_and_returns_the_length(kv: Commands) -> None:
    (k,) = keys("k")
    assert await kv.append(k, "Hello") == 5
    assert await kv.append(k, " World") == 11
    assert await kv.get(k) == b"Hello World"
    assert await kv.append(k, "") == 11
    await kv.expire(k, 100)
    assert await kv.append(k, "!") == 12
    assert 99 <= await kv.ttl(k) <= 100


@case()
async def strlen_counts_bytes(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    assert await kv.strlen(missing) == 0
    await kv.set(k, "héllo")
    assert await kv.strlen(k) == 6
    await kv.set(k, "")
    assert await kv.strlen(k) == 0


@case()
async def getrange_and_substr_clamp_like_redis(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    await kv.set(k, "This is a string")
    assert await kv.getrange(k, 0, 3) == b"This"
    assert await kv.getrange(k, -3, -1) == b"ing"
    assert await kv.getrange(k, 0, -1) == b"This is a string"
    assert await kv.getrange(k, 10, 100) == b"string"
    assert await kv.getrange(k, 5, 3) == b""
    assert await kv.getrange(k, -1, -5) == b""
    assert await kv.getrange(k, -100, 3) == b"This"
    assert await kv.getrange(k, 100, 200) == b""
    assert await kv.getrange(missing, 0, -1) == b""
    assert await kv.substr(k, 0, 3) == b"This"
    assert await kv.execute("substr", k, -3, -1) == b"ing"
    await assert_error("NOT_INTEGER", kv.execute("getrange", k, "a", "3"))


@case()
async def setrange_overwrites_and_pads_with_zero_bytes(kv: Commands) -> None:
    a, b, c = keys("a", "b", "c")
    await kv.set(a, "Hello World")
    assert await kv.setrange(a, 6, "Redis") == 11
    assert await kv.get(a) == b"Hello Redis"
    assert await kv.setrange(b, 6, "Redis") == 11
    assert await kv.get(b) == b"\x00" * 6 + b"Redis"
    assert await kv.setrange(a, 20, "!") == 21
    assert await kv.get(a) == b"Hello Redis" + b"\x00" * 9 + b"!"
    assert await kv.setrange(c, 5, "") == 0
    assert await kv.exists(c) == 0
    assert await kv.setrange(a, 100, "") == 21
    await assert_error("NOT_INTEGER", kv.setrange(a, -1, "x"))
    await kv.expire(a, 100)
    assert await kv.setrange(a, 0, "J") == 21
    assert 99 <= await kv.ttl(a) <= 100


@case()
async def type_is_string_or_none(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    await kv.set(k, "v")
    assert await kv.type(k) == "string"
    assert await kv.type(missing) == "none"


# -- multi-key -------------------------------------------------------------------------------


@case()
async def mget_returns_values_in_argument_order(kv: Commands) -> None:
    names = keys(*(f"k{i}" for i in range(20)))
    (missing,) = keys("missing")
    for i, k in enumerate(names):
        await kv.set(k, f"v{i}")
    assert await kv.mget(*names) == [f"v{i}".encode() for i in range(20)]
    assert await kv.mget(names[3], missing, names[3], names[0]) == [b"v3", None, b"v3", b"v0"]


@case()
async def mset_sets_every_pair_and_discards_ttls(kv: Commands) -> None:
    names = keys(*(f"k{i}" for i in range(20)))
    await kv.set(names[0], "old", ex=100)
    assert await kv.mset({k: f"v{i}" for i, k in enumerate(names)}) == OK
    assert await kv.mget(*names) == [f"v{i}".encode() for i in range(20)]
    assert await kv.ttl(names[0]) == -1
    # A key named twice: the last value wins, as in Redis.
    assert await kv.execute("mset", names[1], "first", names[1], "last") == OK
    assert await kv.get(names[1]) == b"last"


@case()
async def msetnx_sets_all_or_none(kv: Commands) -> None:
    k1, k2, k3 = keys("key1", "key2", "key3")
    assert await kv.msetnx({k1: "Hello", k2: "there"}) == 1
    assert await kv.msetnx({k2: "new", k3: "world"}) == 0
    assert await kv.mget(k1, k2, k3) == [b"Hello", b"there", None]
    await assert_error("ARITY", kv.execute("msetnx", k3, "a", k2))
    assert await kv.exists(k3) == 0


@case()
async def del_and_unlink_count_removed_keys(kv: Commands) -> None:
    a, b, c, missing = keys("a", "b", "c", "missing")
    await kv.mset({a: "1", b: "2", c: "3"})
    assert await kv.delete(a, missing) == 1
    assert await kv.delete(a) == 0
    assert await kv.delete(b, b) == 1  # a key named twice is removed once
    assert await kv.unlink(c, missing) == 1
    assert await kv.exists(a, b, c) == 0


@case()
async def exists_counts_a_key_named_twice_twice(kv: Commands) -> None:
    a, b, missing = keys("a", "b", "missing")
    await kv.mset({a: "1", b: "2"})
    assert await kv.exists(a) == 1
    assert await kv.exists(missing) == 0
    assert await kv.exists(a, b, missing) == 2
    assert await kv.exists(a, a, a) == 3


@case()
async def touch_counts_existing_keys(kv: Commands) -> None:
    a, b, missing = keys("a", "b", "missing")
    await kv.mset({a: "1", b: "2"})
    assert await kv.touch(a, b, missing) == 2
    assert await kv.get(a) == b"1"


# -- expiry --------------------------------------------------------------------------------


@case()
async def ttl_and_pttl_say_missing_or_persistent(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    assert await kv.ttl(missing) == -2
    assert await kv.pttl(missing) == -2
    await kv.set(k, "v")
    assert await kv.ttl(k) == -1
    assert await kv.pttl(k) == -1


@case()
async def expire_and_pexpire_set_a_relative_ttl(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    assert await kv.expire(missing, 100) == 0
    assert await kv.exists(missing) == 0
    await kv.set(k, "v")
    assert await kv.expire(k, 100) == 1
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.pexpire(k, 200_000) == 1
    assert 199_000 <= await kv.pttl(k) <= 200_000
    assert await kv.expire(k, 300) == 1  # a later EXPIRE replaces the TTL
    assert 299 <= await kv.ttl(k) <= 300
    assert await kv.get(k) == b"v"


@case()
async def expireat_and_expiretime_agree(kv: Commands) -> None:
    k, p, missing = keys("k", "p", "missing")
    assert await kv.expiretime(missing) == -2
    assert await kv.pexpiretime(missing) == -2
    await kv.set(k, "Hello")
    assert await kv.expiretime(k) == -1
    assert await kv.pexpiretime(k) == -1
    assert await kv.expireat(k, FAR_FUTURE) == 1
    assert await kv.expiretime(k) in (FAR_FUTURE - 1, FAR_FUTURE)
    assert abs(await kv.pexpiretime(k) - FAR_FUTURE * 1000) <= 1
    await kv.set(p, "v")
    at_ms = (int(time.time()) + 1000) * 1000 + 123
    assert await kv.pexpireat(p, at_ms) == 1
    assert abs(await kv.pexpiretime(p) - at_ms) <= 1
    assert 990 <= await kv.ttl(p) <= 1001


@case()
async def expire_with_a_time_in_the_past_deletes_the_key(kv: Commands) -> None:
    names = keys("a", "b", "c", "d", "e", "f")
    for k in names:
        await kv.set(k, "v", ex=100)
    a, b, c, d, e, f = names
    assert await kv.expire(a, -1) == 1
    assert await kv.expire(b, 0) == 1
    assert await kv.pexpire(c, 0) == 1
    assert await kv.expireat(d, 1) == 1
    assert await kv.pexpireat(e, 1000) == 1
    assert await kv.pexpire(f, -5000) == 1
    for k in names:
        assert await kv.get(k) is None
        assert await kv.ttl(k) == -2
    assert await kv.exists(*names) == 0
    assert await kv.expire(a, -1) == 0  # it is gone: nothing to expire


@case()
async def expire_nx_and_xx_look_at_whether_a_ttl_exists(kv: Commands) -> None:
    (k,) = keys("k")
    await kv.set(k, "v")
    assert await kv.expire(k, 100, "XX") == 0
    assert await kv.ttl(k) == -1
    assert await kv.expire(k, 100, "NX") == 1
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.expire(k, 200, "NX") == 0
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.expire(k, 200, "XX") == 1
    assert 199 <= await kv.ttl(k) <= 200
    assert await kv.execute("expire", k, 300, "xx") == 1  # options are case-insensitive


@case()
async def expire_gt_and_lt_treat_no_ttl_as_infinite(kv: Commands) -> None:
    k, p = keys("k", "p")
    await kv.set(k, "v")
    assert await kv.expire(k, 100, "GT") == 0  # nothing is greater than infinite
    assert await kv.ttl(k) == -1
    assert await kv.expire(k, 100, "LT") == 1  # anything is less than infinite
    assert 99 <= await kv.ttl(k) <= 100
    assert await kv.expire(k, 50, "GT") == 0
    assert await kv.expire(k, 200, "GT") == 1
    assert 199 <= await kv.ttl(k) <= 200
    assert await kv.expire(k, 300, "LT") == 0
    assert await kv.expire(k, 150, "LT") == 1
    assert 149 <= await kv.ttl(k) <= 150
    assert await kv.execute("expire", k, 500, "XX", "GT") == 1
    assert 499 <= await kv.ttl(k) <= 500
    assert await kv.pexpire(k, 400_000, "GT") == 0
    assert await kv.pexpire(k, 400_000, "LT") == 1
    # A past time: GT fails (no deletion); LT succeeds and deletes.
    await kv.set(p, "v", ex=100)
    assert await kv.expire(p, -1, "GT") == 0
    assert await kv.get(p) == b"v"
    assert await kv.expire(p, -1, "LT") == 1
    assert await kv.exists(p) == 0


@case()
async def expire_with_conflicting_or_bad_options_is_an_error_and_changes_nothing(
    kv: Commands,
) -> None:
    (k,) = keys("k")
    await kv.set(k, "v", ex=100)
    for name in ("expire", "pexpire", "expireat", "pexpireat"):
        for options in (["NX", "XX"], ["NX", "GT"], ["NX", "LT"], ["GT", "LT"], ["XX", "GT", "LT"]):
            await assert_error("SYNTAX", kv.execute(name, k, "1000", *options))
        await assert_error("SYNTAX", kv.execute(name, k, "1000", "BOGUS"))
        await assert_error("NOT_INTEGER", kv.execute(name, k, "soon"))
        await assert_error("NOT_INTEGER", kv.execute(name, k, "1.5"))
    await assert_error("SYNTAX", kv.execute("expire", k, str(INT64_MAX)))
    await assert_error("NOT_INTEGER", kv.execute("expire", k, str(INT64_MAX) + "0"))
    assert await kv.get(k) == b"v"
    assert 99 <= await kv.ttl(k) <= 100


@case()
async def persist_removes_a_ttl(kv: Commands) -> None:
    k, missing = keys("k", "missing")
    assert await kv.persist(missing) == 0
    await kv.set(k, "Hello")
    assert await kv.persist(k) == 0
    assert await kv.expire(k, 10) == 1
    assert 9 <= await kv.ttl(k) <= 10
    assert await kv.persist(k) == 1
    assert await kv.ttl(k) == -1
    assert await kv.get(k) == b"Hello"


@case()
async def expired_keys_are_never_served(kv: Commands) -> None:
    """The one case that waits: ``PX 1``, then every read path must miss the keys."""
    live, *names = keys("live", *(f"k{i}" for i in range(12)))
    await kv.set(live, "alive")
    for k in names:
        await kv.set(k, "stale", px=1)
    await trio.sleep(0.05)
    k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11 = names
    assert await kv.get(k0) is None
    assert await kv.mget(k1, live) == [None, b"alive"]
    assert await kv.exists(k2, live) == 1
    assert await kv.ttl(k3) == -2
    assert await kv.pttl(k3) == -2
    assert await kv.type(k4) == "none"
    assert await kv.strlen(k4) == 0
    assert await kv.getdel(k5) is None
    assert await kv.incr(k6) == 1  # counts from zero, not from the stale value
    assert await kv.ttl(k6) == -1  # and the stale TTL is not kept
    assert await kv.append(k7, "x") == 1
    assert await kv.set(k8, "new", keepttl=True) == OK
    assert await kv.ttl(k8) == -1
    assert await kv.setnx(k9, "new") == 1
    assert await kv.msetnx({k10: "new"}) == 1
    assert await kv.getrange(k11, 0, -1) == b""
    assert await kv.expire(k11, 100) == 0
    assert await kv.persist(k11) == 0
    assert await kv.getex(k11) is None
    assert await kv.touch(k11) == 0
    assert await kv.delete(k11) == 0
    prefix = prefix_of(k0)
    assert set(await kv.keys(prefix + "*")) == {k.encode() for k in (live, k6, k7, k8, k9, k10)}
    assert {key async for key in kv.scan_iter(match=prefix + "*")} == {
        k.encode() for k in (live, k6, k7, k8, k9, k10)
    }


# -- keyspace ------------------------------------------------------------------------------


@case()
async def keys_matches_redis_glob_patterns(kv: Commands) -> None:
    names = keys("hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo", "firstname", "age")
    p = prefix_of(names[0])
    await kv.mset({k: "v" for k in names})

    async def matching(pattern: str) -> set[str]:
        return {k.decode()[len(p) :] for k in await kv.keys(p + pattern)}

    assert await matching("h?llo") == {"hello", "hallo", "hxllo", "h*llo"}
    assert await matching("h*llo") == {"hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo"}
    assert await matching("h[ae]llo") == {"hello", "hallo"}
    assert await matching("h[^e]llo") == {"hallo", "hxllo", "h*llo"}
    assert await matching("h[a-b]llo") == {"hallo"}
    assert await matching("h\\*llo") == {"h*llo"}
    assert await matching("*name*") == {"firstname"}
    assert await matching("a??") == {"age"}
    assert await matching("*") == {k[len(p) :] for k in names}
    assert await matching("nothing*") == set()


@case()
async def scan_returns_every_key_and_ends_with_cursor_zero(kv: Commands) -> None:
    names = keys(*(f"k{i}" for i in range(150)))
    p = prefix_of(names[0])
    await kv.mset({k: "v" for k in names})
    seen: list[bytes] = []
    cursor, calls = 0, 0
    while True:
        cursor, found = await kv.scan(cursor, match=p + "*", count=7)
        seen.extend(found)
        calls += 1
        assert calls < 10_000, "SCAN must terminate"
        if cursor == 0:
            break
    assert set(seen) == {k.encode() for k in names}
    # The raw reply: [cursor as a decimal string, [keys]].
    raw_cursor, raw_keys = await kv.execute("scan", "0", "MATCH", p + "k1?", "COUNT", "1000")
    assert int(raw_cursor) >= 0
    assert set(raw_keys) <= {f"{p}k1{i}".encode() for i in range(10)}


@case()
async def scan_returns_every_key_present_for_the_whole_iteration(kv: Commands) -> None:
    stable = keys(*(f"stable{i}" for i in range(100)))
    p = prefix_of(stable[0])
    churn = [f"{p}churn{i}" for i in range(400)]
    await kv.mset({k: "v" for k in stable + churn[:100]})
    seen: set[bytes] = set()
    cursor, step = 0, 0
    while True:
        cursor, found = await kv.scan(cursor, match=p + "*", count=5)
        seen.update(found)
        # Between steps: delete some churn keys, add others.
        await kv.delete(churn[step % 100])
        await kv.set(churn[100 + step % 300], "v")
        step += 1
        if cursor == 0:
            break
    assert {k.encode() for k in stable} <= seen
    assert seen <= {k.encode() for k in stable + churn}


@case()
async def scan_with_bad_arguments_is_an_error(kv: Commands) -> None:
    await assert_error("SYNTAX", kv.execute("scan", "abc"))
    await assert_error("SYNTAX", kv.execute("scan", "-1"))
    await assert_error("SYNTAX", kv.execute("scan", "0", "COUNT", "0"))
    await assert_error("SYNTAX", kv.execute("scan", "0", "COUNT", "-1"))
    await assert_error("NOT_INTEGER", kv.execute("scan", "0", "COUNT", "many"))
    await assert_error("SYNTAX", kv.execute("scan", "0", "MATCH"))
    await assert_error("SYNTAX", kv.execute("scan", "0", "BOGUS", "x"))


@case(exclusive=True)
async def dbsize_counts_live_keys(kv: Commands) -> None:
    assert await kv.flushall() == OK
    assert await kv.dbsize() == 0
    a, b, c = keys("a", "b", "c")
    await kv.mset({a: "1", b: "2", c: "3"})
    assert await kv.dbsize() == 3
    await kv.delete(a)
    assert await kv.dbsize() == 2
    await kv.expire(b, -1)
    assert await kv.dbsize() == 1
    await assert_error("ARITY", kv.execute("dbsize", "x"))


@case(exclusive=True)
async def flushall_and_flushdb_remove_every_key(kv: Commands) -> None:
    names = keys(*(f"k{i}" for i in range(50)))
    await kv.mset({k: "v" for k in names})
    await kv.expire(names[0], 100)
    assert await kv.flushall() == OK
    assert await kv.dbsize() == 0
    assert await kv.keys("*") == []
    assert await kv.get(names[0]) is None
    await kv.mset({k: "v" for k in names})
    assert await kv.flushdb() == OK
    assert await kv.dbsize() == 0
    await kv.set(names[0], "v")
    assert await kv.execute("flushall", "ASYNC") == OK
    assert await kv.execute("flushall", "sync") == OK
    assert await kv.dbsize() == 0
    await kv.set(names[0], "v")
    await assert_error("SYNTAX", kv.execute("flushall", "BOGUS"))
    await assert_error("SYNTAX", kv.execute("flushall", "ASYNC", "SYNC"))
    assert await kv.dbsize() == 1


@case(exclusive=True)
async def keys_star_and_a_full_scan_see_the_whole_keyspace(kv: Commands) -> None:
    await kv.flushall()
    names = keys(*(f"k{i}" for i in range(30)))
    await kv.mset({k: "v" for k in names})
    assert sorted(await kv.keys("*")) == sorted(k.encode() for k in names)
    assert sorted([k async for k in kv.scan_iter()]) == sorted(k.encode() for k in names)
    assert sorted([k async for k in kv.scan_iter(count=1)]) == sorted(k.encode() for k in names)


@case()
async def rename_renamenx_and_copy_move_values_with_their_ttl(kv: Commands) -> None:
    src, dst, other = keys("src", "dst", "other")
    await kv.set(src, "v", ex=100)
    assert await kv.execute("rename", src, dst) == "OK"
    assert await kv.get(src) is None
    assert await kv.get(dst) == b"v"
    assert 0 < await kv.ttl(dst) <= 100
    await assert_error("SYNTAX", kv.execute("rename", src, dst))  # no such key
    await kv.set(other, "o")
    assert await kv.execute("renamenx", dst, other) == 0
    assert await kv.execute("copy", dst, other) == 0
    assert await kv.execute("copy", dst, other, "REPLACE") == 1
    assert await kv.mget(dst, other) == [b"v", b"v"]
    assert await kv.execute("renamenx", dst, src) == 1
    assert await kv.mget(src, dst) == [b"v", None]


@case()
async def bit_commands_and_lcs_follow_redis(kv: Commands) -> None:
    bits, a, b = keys("bits", "a", "b")
    assert await kv.execute("setbit", bits, 7, 1) == 0
    assert await kv.execute("setbit", bits, 7, 1) == 1
    assert await kv.get(bits) == b"\x01"
    assert await kv.execute("getbit", bits, 7) == 1
    assert await kv.execute("getbit", bits, 100) == 0
    assert await kv.execute("bitcount", bits) == 1
    await assert_error("NOT_INTEGER", kv.execute("setbit", bits, 0, 2))
    await kv.mset({a: "ohmytext", b: "mynewtext"})
    assert await kv.execute("lcs", a, b) == b"mytext"
    assert await kv.execute("lcs", a, b, "LEN") == 6
    assert await kv.execute("randomkey") is not None
