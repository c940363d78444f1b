"""The command table: every command declared once, for every front end.

A :class:`Command` holds the name, Redis-style arity (counting the name;
negative means "at least"), flags, key positions and the parser that turns
arguments into an operation (:mod:`kvmemo.commands.ops`) or, for commands the
engine answers itself, a :class:`ServerCall`. The WebSocket server, the RESP
server and the embedded API all look commands up here, which is why they
agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..errors import (
    ArityError,
    CommandSyntaxError,
    KVMemoError,
    NotIntegerError,
    UnknownCommandError,
)
from . import ops
from .args import (
    INT64_MAX,
    MAX_EXPIRE_MS,
    NO_EXPIRY,
    SYNTAX,
    Clock,
    Expiry,
    ExpiryMode,
    arity_ok,
    expiry_option,
    pairs,
    parse_int,
    upper,
)
from .longdouble import parse_long_double


@attrs.frozen
class ServerCall:
    """A command the engine answers itself (no key routing)."""

    name: str
    args: tuple[bytes, ...]


@attrs.frozen
class FixedReply(ServerCall):
    """A fixed reply (HELP, PURGE, MALLOC-STATS): the engine answers ``value`` itself.

    It reads no store, so no shard takes part: it answers while any shard
    restarts, and a transaction may hold it (answered when the transaction
    runs).
    """

    value: Any = None


# LCS's default bounds (StoreConfig's lcs_max_cells and lcs_max_length).
LCS_MAX_CELLS = 10**8
LCS_MAX_LENGTH = 200_000


class ParseContext:
    """What a parser may need from the edge: the clock and the size limits.

    The clock is read lazily, on a parser's first use of :attr:`clock`, and
    then kept until :meth:`restart`: only parsers of absolute times (EXAT,
    PXAT, EXPIREAT, PEXPIREAT, EXPIRETIME) need it, and reading both clocks
    costs more than parsing a GET. The engine reuses one context, restarted
    before each command (or each batch, whose absolute times are then all
    converted with one offset), so a parser may keep what :attr:`clock`
    returns but never the context itself.

    Args:
        read_clock: makes a :class:`Clock` of the present moment.
        max_value_size: bytes; the limit of a value a command builds (APPEND,
            SETRANGE, SETBIT, the INCR family).
        lcs_max_cells, lcs_max_length: LCS's bounds on the product and the
            sum of its values' lengths (see ``StoreConfig``).
    """

    __slots__ = ("_clock", "_read_clock", "lcs_max_cells", "lcs_max_length", "max_value_size")

    def __init__(
        self,
        read_clock: Callable[[], Clock],
        max_value_size: int,
        *,
        lcs_max_cells: int = LCS_MAX_CELLS,
        lcs_max_length: int = LCS_MAX_LENGTH,
    ) -> None:
        self._read_clock = read_clock
        self._clock: Clock | None = None
        self.max_value_size = max_value_size
        self.lcs_max_cells = lcs_max_cells
        self.lcs_max_length = lcs_max_length

    @property
    def clock(self) -> Clock:
        """The clock of this command (or batch), read on first use."""
        clock = self._clock
        if clock is None:
            clock = self._clock = self._read_clock()
        return clock

    def restart(self) -> None:
        """Forget the clock: the next command reads the time again."""
        self._clock = None


Parser = Callable[[Sequence[bytes], ParseContext], Any]


@attrs.frozen
class Command:
    """One command's declaration.

    Attributes:
        name: lower-case name (the JSON-RPC method, the RESP command name).
        arity: Redis arity counting the name; negative: at least ``-arity``.
        flags: ``write``, ``readonly``, ``fast``, ``admin``, ``chaos``, ``connection``;
            ``ordered``: keyless, yet it must take effect after everything its
            session sent before it (PUBLISH: a subscriber told of a write can
            read it), so the WebSocket session runs it as a barrier.
        first_key, last_key, key_step: 1-based key positions as Redis's
            COMMAND reports them (last_key -1: through the last argument).
        parse: arguments (without the name) → operation.
        summary: one line for ``command.list`` and COMMAND DOCS.
        since: the protocol version that added it (``"1"``, ``"1.1"``, ... ``"1.4"``).
        subcommands: a container's subcommands (OBJECT, MEMORY), in Redis's
            order; empty for a plain command. A container itself has Redis's
            container arity (-2) and no keys; each subcommand has its own.
    """

    name: str
    arity: int
    flags: frozenset[str]
    first_key: int
    last_key: int
    key_step: int
    parse: Parser
    summary: str
    since: str = "1"
    subcommands: tuple[Subcommand, ...] = ()

    def keys_of(self, args: Sequence[bytes]) -> list[bytes]:
        """The key arguments (args without the name)."""
        if not self.first_key:
            return []
        last = len(args) if self.last_key < 0 else self.last_key
        return list(args[self.first_key - 1 : last : self.key_step])


@attrs.frozen
class Subcommand:
    """One subcommand of a container command, as Redis 7 declares it (``object|encoding``).

    Attributes:
        name: lower-case (``"encoding"``); Redis's full name is ``container|name``.
        arity: Redis arity counting the container's name and this one's
            (``OBJECT ENCODING key``: 3); negative: at least ``-arity``.
        flags: as :class:`Command`'s.
        first_key, last_key, key_step: 1-based key positions in the whole
            call, the container's name being 0 (``OBJECT ENCODING key``: 2, 2, 1).
        parse: the arguments after the subcommand's name → operation.
        summary: one line (COMMAND DOCS).
    """

    name: str
    arity: int
    flags: frozenset[str]
    first_key: int
    last_key: int
    key_step: int
    parse: Parser
    summary: str


def subcommand(
    name: str, arity: int, flags: str, keys: tuple[int, int, int], parse: Parser, summary: str
) -> Subcommand:
    """A :class:`Subcommand` of a container, ``flags`` space-separated."""
    return Subcommand(name, arity, frozenset(flags.split()), *keys, parse=parse, summary=summary)


def fixed_reply(value: Any) -> Parser:
    """The parser of a subcommand that always answers ``value`` (HELP texts and the like)."""

    def parse_fixed(args: Sequence[bytes], ctx: ParseContext) -> FixedReply:
        return FixedReply("reply", (), value)

    return parse_fixed


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    arity: int,
    flags: str,
    keys: tuple[int, int, int],
    summary: str,
    since: str = "1",
) -> Callable[[Parser], Parser]:
    """Declare a command (a decorator on its parser)."""

    def register(parse: Parser) -> Parser:
        COMMANDS[name] = Command(
            name,
            arity,
            frozenset(flags.split()),
            *keys,
            parse=parse,
            summary=summary,
            since=since,
        )
        return parse

    return register


def container(
    name: str,
    flags: str,
    summary: str,
    since: str,
    subcommands: Sequence[Subcommand],
) -> Command:
    """Declare a container command (Redis's OBJECT, MEMORY): ``name sub [args]``.

    The container has Redis's arity -2 and no key positions (Redis's COMMAND
    INFO gives both: the keys are the subcommands'); its parser finds the
    subcommand (any case), checks the subcommand's own arity and hands it
    the remaining arguments. Errors, in Redis's words:
    ``unknown subcommand 'x'. Try NAME HELP.`` (an :class:`UnknownCommandError`,
    as Redis rejects ``name|x`` as an unknown command: a transaction that
    queues it is aborted) and ``wrong number of arguments for 'name|sub'
    command``.
    """
    by_name = {sub.name.encode(): sub for sub in subcommands}
    shout = name.upper()

    def parse_container(args: Sequence[bytes], ctx: ParseContext) -> Any:
        sub = by_name.get(args[0].lower())
        if sub is None:
            shown = args[0][:128].decode("utf-8", "surrogateescape")
            raise UnknownCommandError(f"unknown subcommand '{shown}'. Try {shout} HELP.")
        total = len(args) + 1  # counting the container's name, as Redis does
        if not arity_ok(sub.arity, total):
            raise ArityError(f"wrong number of arguments for '{name}|{sub.name}' command")
        return sub.parse(args[1:], ctx)

    spec = Command(
        name,
        -2,
        frozenset(flags.split()),
        0,
        0,
        0,
        parse=parse_container,
        summary=summary,
        since=since,
        subcommands=tuple(subcommands),
    )
    COMMANDS[name] = spec
    return spec


# -- CLIENT NO-TOUCH: the reads' variants that record no access -------------------------
#
# The reads that record an access with the key's eviction policy (GET, MGET,
# GETEX, DUMP; TOUCH, whose point it is, has none), each with a variant that
# records none, for the Redis port's ``CLIENT NO-TOUCH ON`` clients (Redis 7.2:
# their commands leave a key's LRU/LFU data alone, TOUCH excepted). A variant
# is its command (the same name, arity, flags, keys and summary, so the same
# errors and metrics) with another parser. It is found by its variant name
# only (lookup, parse), never in COMMANDS: no listing shows it and no front
# end takes it from a client. The port maps only a NO-TOUCH client's calls
# through NO_TOUCH, so the other clients' calls cost nothing more.

NO_TOUCH: dict[str, str] = {}
"""Command name -> the name of its variant that records no access (``"get no-touch"``)."""
_VARIANTS: dict[str, Command] = {}


def no_touch_variant(name: str) -> Callable[[Parser], Parser]:
    """Declare the variant of read ``name`` that records no access (a decorator on its parser)."""

    def register(parse: Parser) -> Parser:
        variant = f"{name} no-touch"
        _VARIANTS[variant] = attrs.evolve(COMMANDS[name], parse=parse)
        NO_TOUCH[name] = variant
        return parse

    return register


def variants() -> dict[str, Command]:
    """Every variant by its name (a copy): for the front ends that group commands by shape."""
    return dict(_VARIANTS)


def lookup(name: str) -> Command:
    """The command called ``name`` (case-insensitive), or the variant of that name.

    Raises:
        UnknownCommandError: no such command.
    """
    spec = COMMANDS.get(name) or COMMANDS.get(name.lower()) or _VARIANTS.get(name)
    if spec is None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise UnknownCommandError(f"unknown command '{shown}'")
    return spec


def table_arity_ok(spec: Command, nargs: int, args: Sequence[bytes] | None = None) -> bool:
    """Whether ``nargs`` arguments (the name not counted) meet ``spec``'s table arity.

    Redis's own check, made when a transaction queues a call; a command may
    refuse more counts when it parses (MSET: pairs only), as Redis's does.
    Given the arguments, a container's known subcommand is held to its own
    arity too, as Redis holds ``object|encoding`` to 3.
    """
    total = nargs + 1
    if not arity_ok(spec.arity, total):
        return False
    if args and spec.subcommands:
        wanted = args[0].lower()
        for sub in spec.subcommands:
            if sub.name.encode() == wanted:
                return arity_ok(sub.arity, total)
    return True


def parse(name: str, args: Sequence[bytes], ctx: ParseContext) -> tuple[Command, Any]:
    """Look up, check arity and parse one call.

    Raises:
        KVMemoError: unknown command, wrong arity, bad syntax or argument.
    """
    spec = COMMANDS.get(name) or lookup(name)
    arity = spec.arity
    total = len(args) + 1  # counting the name, as args.arity_ok (inlined: hot path)
    if (total != arity) if arity > 0 else (total < -arity):
        raise ArityError(f"wrong number of arguments for '{spec.name}' command")
    return spec, spec.parse(args, ctx)


NOKEYS = (0, 0, 0)
KEY1 = (1, 1, 1)
ALLKEYS = (1, -1, 1)
PAIRS = (1, -1, 2)


def _server(name: str, max_args: int | None = None) -> Parser:
    def parse_server(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
        if max_args is not None and len(args) > max_args:
            raise ArityError(f"wrong number of arguments for '{name}' command")
        return ServerCall(name, tuple(args))

    return parse_server


# -- connection and server ------------------------------------------------------------

# Arity -1 is "at least none"; PING takes at most one argument (as in Redis).
for _name, _arity, _max_args, _flags, _summary, _since in [
    ("ping", -1, 1, "fast connection", "PONG, or the message", "1"),
    ("echo", 2, None, "fast connection", "the message", "1.1"),
    ("time", 1, None, "fast", "server time as [unix seconds, microseconds]", "1.1"),
    ("info", -1, None, "admin", "server, memory, stats, keyspace, actors, persistence", "1"),
    ("auth", -2, None, "fast connection", "authenticate the session", "1"),
    ("save", 1, None, "admin", "snapshot every shard", "1"),
    ("debug.actors", 1, None, "admin", "every actor: name, state, restarts, mailbox", "1"),
    ("debug.kill", 2, None, "admin chaos", "kill an actor by name (chaos mode only)", "1"),
    ("command.list", 1, None, "connection", "the methods this server has", "1.1"),
]:
    command(_name, _arity, _flags, NOKEYS, _summary, _since)(_server(_name, _max_args))


@command("bgsave", -1, "admin", NOKEYS, "start a snapshot of every shard, answer at once", "1.3")
def _bgsave(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    # Redis: BGSAVE [SCHEDULE]; anything else is a syntax error.
    if len(args) > 1 or (args and upper(args[0]) != b"SCHEDULE"):
        raise CommandSyntaxError(SYNTAX)
    return ServerCall("bgsave", tuple(args))


# Redis's AOF rewrite: KVMemo compacts each shard's log with a snapshot (the engine's).
command(
    "bgrewriteaof",
    1,
    "admin",
    NOKEYS,
    "compact every shard's log with a snapshot, answer at once",
    "1.5",
)(_server("bgrewriteaof"))


@command("dbsize", 1, "readonly fast", NOKEYS, "number of live keys")
def _dbsize(args: Sequence[bytes], ctx: ParseContext) -> ops.DbSize:
    return ops.DbSize()


@command("flushall", -1, "write", NOKEYS, "remove every key")
def _flushall(args: Sequence[bytes], ctx: ParseContext) -> ops.FlushAll:
    if args and (len(args) > 1 or upper(args[0]) not in (b"ASYNC", b"SYNC")):
        raise CommandSyntaxError(SYNTAX)
    return ops.FlushAll()


command("flushdb", -1, "write", NOKEYS, "remove every key (the only database)", "1.1")(_flushall)


@command("keys", 2, "readonly", NOKEYS, "keys matching a glob pattern")
def _keys(args: Sequence[bytes], ctx: ParseContext) -> ops.Keys:
    return ops.Keys(args[0])


@command("scan", -2, "readonly", NOKEYS, "iterate the keys with a cursor")
def _scan(args: Sequence[bytes], ctx: ParseContext) -> ServerCall:
    try:
        cursor = int(args[0])
        if not 0 <= cursor < 1 << 64 or not args[0].isdigit():
            raise ValueError
    except ValueError:
        raise CommandSyntaxError("invalid cursor") from None
    i = 1
    while i < len(args):
        opt = upper(args[i])
        if opt in (b"MATCH", b"COUNT", b"TYPE") and i + 1 < len(args):
            # As Redis: not a number is NOT_INTEGER; zero or negative, a syntax error.
            if opt == b"COUNT" and parse_int(args[i + 1]) < 1:
                raise CommandSyntaxError(SYNTAX)
            i += 2
        else:
            raise CommandSyntaxError(SYNTAX)
    return ServerCall("scan", tuple(args))


# -- strings ----------------------------------------------------------------------------


@command("get", 2, "readonly fast", KEY1, "the value of a key")
def _get(args: Sequence[bytes], ctx: ParseContext) -> ops.Get:
    return ops.Get(args[0])


@no_touch_variant("get")
def _get_no_touch(args: Sequence[bytes], ctx: ParseContext) -> ops.PeekGet:
    return ops.PeekGet(args[0])


_EXPIRY_OPTIONS = frozenset({b"EX", b"PX", b"EXAT", b"PXAT"})


def _parse_string_options(
    args: Sequence[bytes], *, getex: bool
) -> tuple[bytes | None, bytes, frozenset[bytes]]:
    """SET's or GETEX's options, by Redis's ``parseExtendedStringArgumentsOrReply``.

    An option may come again (``EX 1 EX 2``, ``NX NX``, ``GET GET``): the
    last expiry wins and only its value is parsed, later, by the caller.
    What may not be combined: NX with XX, two different expiry options, an
    expiry with KEEPTTL (SET) or PERSIST (GETEX). GETEX takes only the
    expiry options and PERSIST.

    Returns:
        The expiry option (``b"EX"``... or None), its raw value, and the
        other options given (``NX``, ``XX``, ``GET``, ``KEEPTTL``, ``PERSIST``).

    Raises:
        CommandSyntaxError: anything else (Redis's "syntax error").
    """
    expiry: bytes | None = None
    value = b""
    flags: set[bytes] = set()
    i = 0
    while i < len(args):
        opt = upper(args[i])
        if opt in _EXPIRY_OPTIONS:
            if i + 1 < len(args) and expiry in (None, opt) and not flags & {b"KEEPTTL", b"PERSIST"}:
                expiry, value = opt, args[i + 1]
                i += 2
                continue
        elif not getex and (
            (opt == b"NX" and b"XX" not in flags)
            or (opt == b"XX" and b"NX" not in flags)
            or opt == b"GET"
            or (opt == b"KEEPTTL" and expiry is None)
        ):
            flags.add(opt)
            i += 1
            continue
        elif getex and opt == b"PERSIST" and expiry is None:  # PERSIST PERSIST: as Redis
            flags.add(opt)
            i += 1
            continue
        raise CommandSyntaxError(SYNTAX)
    return expiry, value, frozenset(flags)


@command("set", -3, "write", KEY1, "set a value, with expiry and conditions")
def _set(args: Sequence[bytes], ctx: ParseContext) -> ops.Set | ops.PlainSet:
    if len(args) == 2:  # no option: the common case
        return ops.PlainSet(args[0], args[1])
    option, value, flags = _parse_string_options(args[2:], getex=False)
    if option is not None:
        expiry = expiry_option(option, value, ctx, "set")
    elif b"KEEPTTL" in flags:
        expiry = Expiry(ExpiryMode.KEEP)
    else:
        expiry = NO_EXPIRY
    return ops.Set(
        args[0], args[1], expiry, nx=b"NX" in flags, xx=b"XX" in flags, get=b"GET" in flags
    )


@command("setnx", 3, "write fast", KEY1, "set a value if the key is absent", "1.1")
def _setnx(args: Sequence[bytes], ctx: ParseContext) -> Any:
    return _Bool(ops.Set(args[0], args[1], NO_EXPIRY, nx=True, xx=False, get=False))


def _set_with_ttl(option: bytes, name: str) -> Parser:
    """SETEX / PSETEX: ``key ttl value``, the TTL in the unit of ``option``."""

    def parse_set_with_ttl(args: Sequence[bytes], ctx: ParseContext) -> ops.Set:
        expiry = expiry_option(option, args[1], ctx, name)
        return ops.Set(args[0], args[2], expiry, nx=False, xx=False, get=False)

    return parse_set_with_ttl


command("setex", 4, "write", KEY1, "set a value with a TTL in seconds", "1.1")(
    _set_with_ttl(b"EX", "setex")
)
command("psetex", 4, "write", KEY1, "set a value with a TTL in milliseconds", "1.1")(
    _set_with_ttl(b"PX", "psetex")
)


@command("getset", 3, "write fast", KEY1, "set a value, return the old one", "1.1")
def _getset(args: Sequence[bytes], ctx: ParseContext) -> ops.Set:
    return ops.Set(args[0], args[1], NO_EXPIRY, nx=False, xx=False, get=True)


class _Bool(ops.ShardOp):
    """Wraps a conditional SET into SETNX's 1/0 answer."""

    __slots__ = ("inner",)
    write = True

    def __init__(self, inner: ops.Set) -> None:
        self.key = inner.key
        self.inner = inner

    def apply(self, store: Any, now: float) -> int:
        return 1 if self.inner.apply(store, now) == ops.OK else 0


@command("getdel", 2, "write fast", KEY1, "get a value and delete the key")
def _getdel(args: Sequence[bytes], ctx: ParseContext) -> ops.GetDel:
    return ops.GetDel(args[0])


@command("getex", -2, "write fast", KEY1, "get a value and set or clear its expiry")
def _getex(args: Sequence[bytes], ctx: ParseContext) -> ops.GetEx:
    return _getex_op(args, ctx, ops.GetEx)


@no_touch_variant("getex")
def _getex_no_touch(args: Sequence[bytes], ctx: ParseContext) -> ops.GetEx:
    return _getex_op(args, ctx, ops.PeekGetEx)


def _getex_op(args: Sequence[bytes], ctx: ParseContext, kind: type[ops.GetEx]) -> ops.GetEx:
    # As Redis: the options are checked first, the expiry value only once the
    # key is found (GETEX on a missing key answers nil whatever the value).
    option, value, flags = _parse_string_options(args[1:], getex=True)
    if option is None:
        persist = Expiry(ExpiryMode.PERSIST) if flags else NO_EXPIRY
        return kind(args[0], persist)
    try:
        expiry = expiry_option(option, value, ctx, "getex")
    except KVMemoError as exc:
        return kind(args[0], NO_EXPIRY, error=exc)
    return kind(args[0], expiry)


@command("incr", 2, "write fast", KEY1, "add 1 to an integer value")
def _incr(args: Sequence[bytes], ctx: ParseContext) -> ops.IncrBy:
    return ops.IncrBy(args[0], 1, ctx.max_value_size)


@command("decr", 2, "write fast", KEY1, "subtract 1 from an integer value")
def _decr(args: Sequence[bytes], ctx: ParseContext) -> ops.IncrBy:
    return ops.IncrBy(args[0], -1, ctx.max_value_size)


@command("incrby", 3, "write fast", KEY1, "add to an integer value")
def _incrby(args: Sequence[bytes], ctx: ParseContext) -> ops.IncrBy:
    return ops.IncrBy(args[0], parse_int(args[1]), ctx.max_value_size)


@command("decrby", 3, "write fast", KEY1, "subtract from an integer value")
def _decrby(args: Sequence[bytes], ctx: ParseContext) -> ops.IncrBy:
    delta = parse_int(args[1])
    if delta == -(1 << 63):
        raise NotIntegerError("decrement would overflow")
    return ops.IncrBy(args[0], -delta, ctx.max_value_size)


@command("incrbyfloat", 3, "write fast", KEY1, "add a float to a value", "1.1")
def _incrbyfloat(args: Sequence[bytes], ctx: ParseContext) -> ops.IncrByFloat:
    return ops.IncrByFloat(args[0], parse_long_double(args[1]), ctx.max_value_size)


@command("append", 3, "write fast", KEY1, "append to a value")
def _append(args: Sequence[bytes], ctx: ParseContext) -> ops.Append:
    return ops.Append(args[0], args[1], ctx.max_value_size)


@command("strlen", 2, "readonly fast", KEY1, "length of a value in bytes")
def _strlen(args: Sequence[bytes], ctx: ParseContext) -> ops.StrLen:
    return ops.StrLen(args[0])


@command("getrange", 4, "readonly", KEY1, "a substring of a value", "1.1")
def _getrange(args: Sequence[bytes], ctx: ParseContext) -> ops.GetRange:
    return ops.GetRange(args[0], parse_int(args[1]), parse_int(args[2]))


command("substr", 4, "readonly", KEY1, "a substring of a value (old name)", "1.1")(_getrange)


@command("setrange", 4, "write", KEY1, "overwrite part of a value", "1.1")
def _setrange(args: Sequence[bytes], ctx: ParseContext) -> ops.SetRange:
    offset = parse_int(args[1])
    if offset < 0:
        raise NotIntegerError("offset is out of range")
    return ops.SetRange(args[0], offset, args[2], ctx.max_value_size)


@command("type", 2, "readonly fast", KEY1, "the type of a key")
def _type(args: Sequence[bytes], ctx: ParseContext) -> ops.Type:
    return ops.Type(args[0])


@command("mget", -2, "readonly fast", ALLKEYS, "the values of several keys")
def _mget(args: Sequence[bytes], ctx: ParseContext) -> ops.MGet:
    return ops.MGet(args)


@no_touch_variant("mget")
def _mget_no_touch(args: Sequence[bytes], ctx: ParseContext) -> ops.MGet:
    return ops.PeekMGet(args)


@command("mset", -3, "write", PAIRS, "set several keys at once, atomically")
def _mset(args: Sequence[bytes], ctx: ParseContext) -> ops.MSet:
    # pairs(args, "mset") with the keys sliced once (the hot path of MSET).
    if not args or len(args) % 2:
        raise ArityError("wrong number of arguments for 'mset' command")
    keys = args[0::2]
    return ops.MSet(list(zip(keys, args[1::2], strict=True)), only_new=False, keys=keys)


@command("msetnx", -3, "write", PAIRS, "set several keys only if none exists")
def _msetnx(args: Sequence[bytes], ctx: ParseContext) -> ops.MSet:
    return ops.MSet(pairs(args, "msetnx"), only_new=True, keys=args[0::2])


# -- keys and expiry ---------------------------------------------------------------------


@command("del", -2, "write", ALLKEYS, "remove keys")
def _del(args: Sequence[bytes], ctx: ParseContext) -> ops.Del:
    return ops.Del(args)


command("unlink", -2, "write fast", ALLKEYS, "remove keys", "1.1")(_del)


@command("exists", -2, "readonly fast", ALLKEYS, "count existing keys")
def _exists(args: Sequence[bytes], ctx: ParseContext) -> ops.Exists:
    return ops.Exists(args)


@command("touch", -2, "readonly fast", ALLKEYS, "count keys and touch them", "1.1")
def _touch(args: Sequence[bytes], ctx: ParseContext) -> ops.Touch:
    return ops.Touch(args)


_EXPIRE_FLAGS = frozenset({b"NX", b"XX", b"GT", b"LT"})


def _expire_flags(args: Sequence[bytes]) -> frozenset[bytes]:
    """EXPIRE's NX / XX / GT / LT, by Redis's ``parseExtendedExpireArgumentsOrReply``.

    Checked before the time argument, as Redis does: an unknown option is
    named as given (its case kept), the first one in order.
    """
    flags = set()
    for arg in args:
        flag = upper(arg)
        if flag not in _EXPIRE_FLAGS:
            raise CommandSyntaxError(f"Unsupported option {arg.decode('utf-8', 'surrogateescape')}")
        flags.add(flag)
    if b"NX" in flags and flags & {b"XX", b"GT", b"LT"}:
        raise CommandSyntaxError("NX and XX, GT or LT options at the same time are not compatible")
    if {b"GT", b"LT"} <= flags:
        raise CommandSyntaxError("GT and LT options at the same time are not compatible")
    return frozenset(flags)


def _expire_parser(name: str, unit_ms: bool, absolute: bool) -> Parser:
    """EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT, with Redis's ``expireGenericCommand`` bounds.

    Redis refuses a time whose milliseconds overflow a signed 64-bit
    integer: seconds outside ``[-(2**63 - 1) // 1000, (2**63 - 1) // 1000]``
    (C division truncates), or a deadline past ``2**63 - 1`` ms. KVMemo
    keeps its own, lower, upper bound (``MAX_EXPIRE_MS``: deadlines are
    float seconds and the log stores Unix ms below ``2**63``); times in the
    past, however negative, delete the key as in Redis.
    """

    def parse_expire(args: Sequence[bytes], ctx: ParseContext) -> ops.Expire:
        flags = _expire_flags(args[2:])
        amount = parse_int(args[1])
        if not unit_ms and not -(INT64_MAX // 1000) <= amount <= INT64_MAX // 1000:
            raise CommandSyntaxError(f"invalid expire time in '{name}' command")
        limit = MAX_EXPIRE_MS if unit_ms else MAX_EXPIRE_MS // 1000
        if amount > limit:
            raise CommandSyntaxError(f"invalid expire time in '{name}' command")
        seconds = amount / 1000 if unit_ms else float(amount)
        if absolute:
            expiry = Expiry(ExpiryMode.ABSOLUTE, ctx.clock.to_monotonic(seconds))
        else:
            expiry = Expiry(ExpiryMode.RELATIVE, seconds)
        return ops.Expire(args[0], expiry, flags)

    return parse_expire


for _name, _unit_ms, _absolute, _summary in [
    ("expire", False, False, "set a TTL in seconds"),
    ("pexpire", True, False, "set a TTL in milliseconds"),
    ("expireat", False, True, "set an expiry as a Unix time in seconds"),
    ("pexpireat", True, True, "set an expiry as a Unix time in milliseconds"),
]:
    command(_name, -3, "write fast", KEY1, _summary)(_expire_parser(_name, _unit_ms, _absolute))


@command("ttl", 2, "readonly fast", KEY1, "remaining TTL in seconds")
def _ttl(args: Sequence[bytes], ctx: ParseContext) -> ops.Ttl:
    return ops.Ttl(args[0], millis=False)


@command("pttl", 2, "readonly fast", KEY1, "remaining TTL in milliseconds")
def _pttl(args: Sequence[bytes], ctx: ParseContext) -> ops.Ttl:
    return ops.Ttl(args[0], millis=True)


@command("expiretime", 2, "readonly fast", KEY1, "expiry as a Unix time in seconds", "1.1")
def _expiretime(args: Sequence[bytes], ctx: ParseContext) -> ops.ExpireTime:
    return ops.ExpireTime(args[0], False, ctx.clock)


@command("pexpiretime", 2, "readonly fast", KEY1, "expiry as a Unix time in ms", "1.1")
def _pexpiretime(args: Sequence[bytes], ctx: ParseContext) -> ops.ExpireTime:
    return ops.ExpireTime(args[0], True, ctx.clock)


@command("persist", 2, "write fast", KEY1, "remove a key's TTL")
def _persist(args: Sequence[bytes], ctx: ParseContext) -> ops.Persist:
    return ops.Persist(args[0])


# -- moving values between keys ---------------------------------------------------------


@command("rename", 3, "write", (1, 2, 1), "rename a key (atomic across shards)", "1.1")
def _rename(args: Sequence[bytes], ctx: ParseContext) -> ops.Move:
    return ops.Move(args[0], args[1], kind="rename", replace=True)


@command("renamenx", 3, "write fast", (1, 2, 1), "rename a key if the new name is free", "1.1")
def _renamenx(args: Sequence[bytes], ctx: ParseContext) -> ops.Move:
    return ops.Move(args[0], args[1], kind="renamenx", replace=False)


@command("copy", -3, "write", (1, 2, 1), "copy a key's value and expiry to another key", "1.1")
def _copy(args: Sequence[bytes], ctx: ParseContext) -> ops.Move:
    # As Redis's copyCommand: the options first (DB's index an int, then
    # database 0, the only one), then the same key named twice, whether or
    # not it exists.
    replace = False
    i = 2
    while i < len(args):
        opt = upper(args[i])
        if opt == b"REPLACE":
            replace = True
            i += 1
        elif opt == b"DB" and i + 1 < len(args):
            db = parse_int(args[i + 1])
            if not INT32_MIN <= db <= INT32_MAX:
                raise NotIntegerError(
                    f"value is out of range, value must between {INT32_MIN} and {INT32_MAX}"
                )
            if db != 0:
                raise CommandSyntaxError("DB index is out of range")
            i += 2
        else:
            raise CommandSyntaxError(SYNTAX)
    if args[0] == args[1]:
        raise CommandSyntaxError("source and destination objects are the same")
    return ops.Move(args[0], args[1], kind="copy", replace=replace)


INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


# The modules that register more commands (each imports this one).
from . import (  # noqa: E402
    bits,  # noqa: F401 - GETBIT, SETBIT, BITCOUNT, BITPOS, BITFIELD(_RO), BITOP, LCS, RANDOMKEY
    dump,  # noqa: F401 - DUMP, RESTORE
    introspect,  # noqa: F401 - OBJECT, MEMORY, LASTSAVE
    pubsub,  # noqa: F401 - PUBLISH, SPUBLISH, PUBSUB
)
