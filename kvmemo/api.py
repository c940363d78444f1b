"""One interface, several implementations: the typed command methods.

:class:`Commands` defines one async method per command on top of a single
abstract :meth:`Commands.execute`. The embedded store implements ``execute``
by calling the engine in-process; the WebSocket client by sending JSON-RPC.
The same test suite runs against both, which is how we know they agree.

Arguments may be ``bytes``, ``str`` (UTF-8 encoded) or ``int``; results follow
the protocol's mapping with bulk strings as ``bytes``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

# bool is an int to the type checker and a union cannot exclude a subtype, so
# Arg admits True/False statically; encode_arg refuses them at run time.
Arg = bytes | str | int | float

ExpireCondition = Literal["NX", "XX", "GT", "LT"]
"""EXPIRE's condition: only if no TTL (NX), only if one (XX), a later (GT) or earlier (LT) one."""


def encode_arg(value: Arg) -> bytes:
    """One command argument as bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError(f"a command argument cannot be a bool, got {value!r}")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, float):
        return repr(value).encode("ascii")
    raise TypeError(f"a command argument must be bytes, str, int or float, got {value!r}")


def encode_args(args: Sequence[Arg]) -> Sequence[bytes]:
    """Command arguments as bytes: ``args`` itself when all are bytes already.

    The common case (every argument is ``bytes``) costs one type check per
    argument and no new list.
    """
    for arg in args:
        if arg.__class__ is not bytes:
            return [encode_arg(a) for a in args]
    return args  # type: ignore[return-value]  # every item is bytes: checked above


def _flat_pairs(command: str, mapping: Mapping[Arg, Arg] | Sequence[tuple[Arg, Arg]]) -> list[Arg]:
    """``key1, value1, key2, value2, ...`` of a mapping or a sequence of (key, value) pairs.

    Raises:
        TypeError: an item of the sequence is not a pair (a string, a
            triple): it would shift every key and value after it.
    """
    if isinstance(mapping, Mapping):
        return [x for pair in mapping.items() for x in pair]
    if isinstance(mapping, str | bytes):
        raise TypeError(f"{command}: expected a mapping or (key, value) pairs, got {mapping!r}")
    flat: list[Arg] = []
    for pair in mapping:
        if (
            type(pair) is not tuple
            and (isinstance(pair, str | bytes) or not isinstance(pair, Sequence))
        ) or len(pair) != 2:
            raise TypeError(f"{command}: expected (key, value) pairs, got {pair!r}")
        flat += pair
    return flat


def _expiry_args(ex: int | None, px: int | None, exat: int | None, pxat: int | None) -> list[Arg]:
    out: list[Arg] = []
    for name, value in (("EX", ex), ("PX", px), ("EXAT", exat), ("PXAT", pxat)):
        if value is not None:
            out += [name, value]
    return out


class Commands:
    """Typed async methods for every command; subclasses provide :meth:`execute`.

    Each method is the Redis command of its name, with Redis's replies
    (bulk strings as ``bytes``, ``"OK"`` as ``str``). Errors raise
    :class:`kvmemo.KVMemoError` subclasses (``kvmemo.errors``); besides the
    ones a method names, any call may raise ``UnavailableError`` (its shard
    is restarting, or the store is closed: nothing was applied) or
    ``RequestTimeoutError`` (over ``request_timeout``; ``data["applied"]``),
    and a write ``OutOfMemoryError`` (``maxmemory``, nothing evictable),
    ``TooLargeError`` (a key or value over its limit) or, with persistence,
    ``PersistenceIOError``.
    """

    async def execute(self, command: str, *args: Arg) -> Any:
        """Run any command by name: ``await kv.execute("SET", "k", "v", "EX", 10)``."""
        raise NotImplementedError

    # -- connection and server ---------------------------------------------------------

    async def ping(self, message: Arg | None = None) -> Any:
        """PING: ``"PONG"`` (a ``str``), or ``message`` back as ``bytes`` when given."""
        return await (self.execute("ping") if message is None else self.execute("ping", message))

    async def echo(self, message: Arg) -> bytes:
        """ECHO: ``message`` back, as ``bytes``."""
        result: bytes = await self.execute("echo", message)
        return result

    async def time(self) -> list[bytes]:
        """TIME: ``[unix_seconds, microseconds]`` as ``bytes`` (the wall clock, ``time.time()``)."""
        result: list[bytes] = await self.execute("time")
        return result

    async def info(self, section: str | None = None) -> dict[str, Any]:
        """INFO: ``{section: {field: value}}`` of every section, or of ``section`` only.

        Sections: ``"server"``, ``"memory"``, ``"stats"``, ... (as ``kv.info()`` lists them).
        """
        result: dict[str, Any] = await (
            self.execute("info") if section is None else self.execute("info", section)
        )
        return result

    async def dbsize(self) -> int:
        """DBSIZE: the number of keys, over every shard."""
        result: int = await self.execute("dbsize")
        return result

    async def flushall(self) -> str:
        """FLUSHALL: delete every key of every shard; ``"OK"``."""
        result: str = await self.execute("flushall")
        return result

    async def flushdb(self) -> str:
        """FLUSHDB: as :meth:`flushall` (one database); ``"OK"``."""
        result: str = await self.execute("flushdb")
        return result

    # -- strings -------------------------------------------------------------------------

    async def get(self, key: Arg) -> bytes | None:
        """GET: the value of ``key``, or None if it is missing (or expired)."""
        result: bytes | None = await self.execute("get", key)
        return result

    async def set(
        self,
        key: Arg,
        value: Arg,
        *,
        ex: int | None = None,
        px: int | None = None,
        exat: int | None = None,
        pxat: int | None = None,
        keepttl: bool = False,
        nx: bool = False,
        xx: bool = False,
        get: bool = False,
    ) -> Any:
        """SET ``key`` to ``value``: ``"OK"``, or None when ``nx``/``xx`` is not met.

        With ``get``: the old value (None if there was none) instead of "OK".
        The key's TTL is removed unless ``keepttl``; ``ex``/``px`` (seconds,
        milliseconds from now) or ``exat``/``pxat`` (Unix time, wall clock)
        give it a new one.

        Raises:
            CommandSyntaxError: conflicting options (two expiries, ``nx``
                with ``xx``, ``keepttl`` with an expiry), or an expiry that
                is not positive.
        """
        args: list[Arg] = [key, value, *_expiry_args(ex, px, exat, pxat)]
        for flag, on in (("KEEPTTL", keepttl), ("NX", nx), ("XX", xx), ("GET", get)):
            if on:
                args.append(flag)
        return await self.execute("set", *args)

    async def setnx(self, key: Arg, value: Arg) -> int:
        """SETNX: set ``key`` only if it does not exist; 1 if set, 0 if not."""
        result: int = await self.execute("setnx", key, value)
        return result

    async def setex(self, key: Arg, seconds: int, value: Arg) -> str:
        """SETEX: set ``key`` with a TTL of ``seconds``; ``"OK"``.

        Raises:
            CommandSyntaxError: ``seconds`` is not positive.
        """
        result: str = await self.execute("setex", key, seconds, value)
        return result

    async def psetex(self, key: Arg, milliseconds: int, value: Arg) -> str:
        """PSETEX: set ``key`` with a TTL of ``milliseconds``; ``"OK"``.

        Raises:
            CommandSyntaxError: ``milliseconds`` is not positive.
        """
        result: str = await self.execute("psetex", key, milliseconds, value)
        return result

    async def getset(self, key: Arg, value: Arg) -> bytes | None:
        """GETSET: set ``key`` to ``value`` (its TTL removed); the old value, or None."""
        result: bytes | None = await self.execute("getset", key, value)
        return result

    async def getdel(self, key: Arg) -> bytes | None:
        """GETDEL: the value of ``key`` (None if missing), and delete it."""
        result: bytes | None = await self.execute("getdel", key)
        return result

    async def getex(
        self,
        key: Arg,
        *,
        ex: int | None = None,
        px: int | None = None,
        exat: int | None = None,
        pxat: int | None = None,
        persist: bool = False,
    ) -> bytes | None:
        """GETEX: the value of ``key`` (None if missing), changing its TTL as GET cannot.

        At most one of ``ex``/``px`` (relative: seconds, milliseconds) and
        ``exat``/``pxat`` (Unix time, wall clock), or ``persist`` to remove
        the TTL; none of them: a plain GET.
        """
        args: list[Arg] = [key, *_expiry_args(ex, px, exat, pxat)]
        if persist:
            args.append("PERSIST")
        result: bytes | None = await self.execute("getex", *args)
        return result

    async def incr(self, key: Arg) -> int:
        """INCR: add 1 to the integer at ``key`` (missing: 0); the new value.

        Raises:
            NotIntegerError: the value is not a 64-bit signed integer, or the
                result would overflow (nothing is changed).
        """
        result: int = await self.execute("incr", key)
        return result

    async def decr(self, key: Arg) -> int:
        """DECR: subtract 1, as :meth:`incr` (same errors); the new value."""
        result: int = await self.execute("decr", key)
        return result

    async def incrby(self, key: Arg, delta: int) -> int:
        """INCRBY: add ``delta``, as :meth:`incr` (same errors); the new value."""
        result: int = await self.execute("incrby", key, delta)
        return result

    async def decrby(self, key: Arg, delta: int) -> int:
        """DECRBY: subtract ``delta``, as :meth:`incr` (same errors); the new value."""
        result: int = await self.execute("decrby", key, delta)
        return result

    async def incrbyfloat(self, key: Arg, delta: float) -> bytes:
        """INCRBYFLOAT: add ``delta`` to the number at ``key`` (missing: 0); the new value (bytes).

        Raises:
            NotIntegerError: the value is not a number (kind ``NOT_INTEGER``, as Redis).
        """
        result: bytes = await self.execute("incrbyfloat", key, delta)
        return result

    async def append(self, key: Arg, value: Arg) -> int:
        """APPEND: append ``value`` to the string at ``key`` (missing: empty); the new length."""
        result: int = await self.execute("append", key, value)
        return result

    async def strlen(self, key: Arg) -> int:
        """STRLEN: the length of the value at ``key``, 0 if it is missing."""
        result: int = await self.execute("strlen", key)
        return result

    async def getrange(self, key: Arg, start: int, end: int) -> bytes:
        """GETRANGE: bytes ``start`` to ``end`` (inclusive, negative from the end), or ``b""``."""
        result: bytes = await self.execute("getrange", key, start, end)
        return result

    async def substr(self, key: Arg, start: int, end: int) -> bytes:
        """GETRANGE under its old name."""
        result: bytes = await self.execute("substr", key, start, end)
        return result

    async def setrange(self, key: Arg, offset: int, value: Arg) -> int:
        """SETRANGE: overwrite from byte ``offset`` (zero-padded past the end); the new length.

        Raises:
            TooLargeError: the string would be over ``max_value_size``.
        """
        result: int = await self.execute("setrange", key, offset, value)
        return result

    async def mget(self, *keys: Arg) -> list[bytes | None]:
        """MGET: the value of each key, in order, None for a missing one."""
        result: list[bytes | None] = await self.execute("mget", *keys)
        return result

    async def mset(self, mapping: Mapping[Arg, Arg] | Sequence[tuple[Arg, Arg]]) -> str:
        """MSET: set every key (pairs of a mapping or a sequence); ``"OK"``.

        All or nothing, across shards too: no reader sees some keys set and
        others not. Each key loses its TTL, as with SET.
        """
        result: str = await self.execute("mset", *_flat_pairs("mset", mapping))
        return result

    async def msetnx(self, mapping: Mapping[Arg, Arg] | Sequence[tuple[Arg, Arg]]) -> int:
        """MSETNX: as :meth:`mset`, only if none of the keys exists; 1 if set, 0 if not."""
        result: int = await self.execute("msetnx", *_flat_pairs("msetnx", mapping))
        return result

    # -- bits ------------------------------------------------------------------------------

    async def bitpos(
        self,
        key: Arg,
        bit: int,
        start: int | None = None,
        end: int | None = None,
        *,
        unit: str | None = None,
    ) -> int:
        """BITPOS: the position of the first bit equal to ``bit``, or -1.

        ``start`` and ``end`` (inclusive, negative from the end) count bytes,
        or bits with ``unit="BIT"``; ``end`` needs ``start``, ``unit`` needs ``end``.
        """
        if end is not None and start is None:
            raise ValueError("bitpos: end needs start")
        if unit is not None and end is None:
            raise ValueError("bitpos: unit needs start and end")
        args: list[Arg] = [key, bit]
        args += [a for a in (start, end, unit) if a is not None]
        result: int = await self.execute("bitpos", *args)
        return result

    async def bitop(self, operation: str, destkey: Arg, *keys: Arg) -> int:
        """BITOP AND/OR/XOR/NOT into ``destkey``: the result's length (0 deletes ``destkey``)."""
        result: int = await self.execute("bitop", operation, destkey, *keys)
        return result

    async def bitfield(self, key: Arg, *subcommands: Arg) -> list[int | None]:
        """BITFIELD: ``kv.bitfield("k", "SET", "u8", 0, 255, "INCRBY", "i5", "#1", 3)``.

        One reply per GET, SET or INCRBY, in order; None for a write its
        ``OVERFLOW FAIL`` refused.
        """
        result: list[int | None] = await self.execute("bitfield", key, *subcommands)
        return result

    async def bitfield_ro(self, key: Arg, *subcommands: Arg) -> list[int]:
        """BITFIELD_RO: GET subcommands only (``kv.bitfield_ro("k", "GET", "u8", 0)``)."""
        result: list[int] = await self.execute("bitfield_ro", key, *subcommands)
        return result

    # -- introspection ---------------------------------------------------------------------

    async def object_encoding(self, key: Arg) -> bytes | None:
        """OBJECT ENCODING: ``b"int"``, ``b"embstr"`` or ``b"raw"`` (from the bytes), or None."""
        result: bytes | None = await self.execute("object", "encoding", key)
        return result

    async def object_freq(self, key: Arg) -> int | None:
        """OBJECT FREQ: the key's access count under an LFU policy (else ``DISABLED``), or None."""
        result: int | None = await self.execute("object", "freq", key)
        return result

    async def object_idletime(self, key: Arg) -> int | None:
        """OBJECT IDLETIME: whole seconds since the key's last access (LRU policies), or None."""
        result: int | None = await self.execute("object", "idletime", key)
        return result

    async def object_refcount(self, key: Arg) -> int | None:
        """OBJECT REFCOUNT: 1 for an existing key (KVMemo shares no values), or None."""
        result: int | None = await self.execute("object", "refcount", key)
        return result

    async def memory_usage(self, key: Arg, samples: int | None = None) -> int | None:
        """MEMORY USAGE: the bytes tracked for the key (they sum to ``used_memory``), or None."""
        extra: list[Arg] = [] if samples is None else ["SAMPLES", samples]
        result: int | None = await self.execute("memory", "usage", key, *extra)
        return result

    async def memory_stats(self) -> dict[str, int]:
        """MEMORY STATS as a dict: ``{"peak.allocated": ..., "keys.count": ..., ...}``."""
        flat: list[Any] = await self.execute("memory", "stats")
        return {
            (name.decode() if isinstance(name, bytes) else str(name)): value
            for name, value in zip(flat[::2], flat[1::2], strict=True)
        }

    async def lastsave(self) -> int:
        """LASTSAVE: Unix time of the last snapshot of every shard (or of the start)."""
        result: int = await self.execute("lastsave")
        return result

    # -- pub/sub (subscribing: ``subscribe`` of the embedded store and of the clients) ------

    async def publish(self, channel: Arg, message: Arg) -> int:
        """PUBLISH: post ``message`` on ``channel``; how many subscribers received it."""
        result: int = await self.execute("publish", channel, message)
        return result

    async def pubsub_channels(self, pattern: Arg | None = None) -> list[bytes]:
        """PUBSUB CHANNELS: the channels with a subscriber (matching ``pattern``, if given)."""
        extra: list[Arg] = [] if pattern is None else [pattern]
        result: list[bytes] = await self.execute("pubsub", "channels", *extra)
        return result

    async def pubsub_numsub(self, *channels: Arg) -> dict[bytes, int]:
        """PUBSUB NUMSUB: each channel's subscribers (pattern subscriptions not counted)."""
        flat: list[Any] = await self.execute("pubsub", "numsub", *channels)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def pubsub_numpat(self) -> int:
        """PUBSUB NUMPAT: the patterns with a subscriber."""
        result: int = await self.execute("pubsub", "numpat")
        return result

    # -- serialization (moving keys between servers) ---------------------------------------

    async def dump(self, key: Arg) -> bytes | None:
        """DUMP: the value serialized as Redis 7.0 serializes a string (RDB 10), or None.

        The payload is binary: through the WebSocket client (JSON text) it
        does not survive; use the embedded store or the Redis port.
        """
        result: bytes | None = await self.execute("dump", key)
        return result

    async def restore(
        self,
        key: Arg,
        ttl_ms: int,
        payload: bytes,
        *,
        replace: bool = False,
        absttl: bool = False,
        idletime: int | None = None,
        freq: int | None = None,
    ) -> str:
        """RESTORE a payload of DUMP (KVMemo's or Redis's): "OK".

        Args:
            ttl_ms: 0 for no expiry; else milliseconds from now, or with
                ``absttl`` a Unix time in ms (already past: nothing is created,
                and with ``replace`` the key is deleted).
            replace: overwrite an existing key (else ``BusyKeyError``).
            idletime: seconds since the key's last access, under a non-LFU
                policy (``object_idletime`` counts from there; LRU evicts by it).
            freq: 0-255; the key's access count under an LFU policy.

        Raises:
            BusyKeyError: the key exists and ``replace`` is False.
            CommandSyntaxError: a payload that is not a string of RDB version
                <= 10 with a good checksum, or a bad option.
        """
        args: list[Arg] = [key, ttl_ms, payload]
        if replace:
            args.append("REPLACE")
        if absttl:
            args.append("ABSTTL")
        if idletime is not None:
            args += ["IDLETIME", idletime]
        if freq is not None:
            args += ["FREQ", freq]
        result: str = await self.execute("restore", *args)
        return result

    # -- keys ------------------------------------------------------------------------------

    async def delete(self, *keys: Arg) -> int:
        """DEL (``del`` is a Python keyword): delete ``keys``; how many existed."""
        result: int = await self.execute("del", *keys)
        return result

    async def unlink(self, *keys: Arg) -> int:
        """UNLINK: as :meth:`delete` (nothing is freed in the background); how many existed."""
        result: int = await self.execute("unlink", *keys)
        return result

    async def exists(self, *keys: Arg) -> int:
        """EXISTS: how many of ``keys`` exist (a key named twice counts twice)."""
        result: int = await self.execute("exists", *keys)
        return result

    async def touch(self, *keys: Arg) -> int:
        """TOUCH: mark ``keys`` accessed (LRU/LFU); how many exist."""
        result: int = await self.execute("touch", *keys)
        return result

    async def type(self, key: Arg) -> str:
        """TYPE: ``"string"``, or ``"none"`` for a missing key."""
        result: str = await self.execute("type", key)
        return result

    async def _expire(
        self, command: str, key: Arg, amount: int, condition: ExpireCondition | None
    ) -> int:
        args: list[Arg] = [key, amount] + ([condition] if condition else [])
        result: int = await self.execute(command, *args)
        return result

    async def expire(self, key: Arg, seconds: int, condition: ExpireCondition | None = None) -> int:
        """EXPIRE: give ``key`` a TTL of ``seconds``; 1 if set, 0 if not.

        0 when the key is missing or ``condition`` is not met:
        ``"NX"`` only if it has no TTL, ``"XX"`` only if it has one,
        ``"GT"`` / ``"LT"`` only if the new expiry is later / earlier than
        the current one (no TTL counts as infinite). A time not in the
        future deletes the key (and answers 1).

        Raises:
            CommandSyntaxError: an unknown ``condition``.
        """
        return await self._expire("expire", key, seconds, condition)

    async def pexpire(
        self, key: Arg, milliseconds: int, condition: ExpireCondition | None = None
    ) -> int:
        """PEXPIRE: :meth:`expire` in milliseconds (same ``condition`` values)."""
        return await self._expire("pexpire", key, milliseconds, condition)

    async def expireat(
        self, key: Arg, unix_seconds: int, condition: ExpireCondition | None = None
    ) -> int:
        """EXPIREAT: :meth:`expire` at a Unix time in seconds (wall clock); same ``condition``."""
        return await self._expire("expireat", key, unix_seconds, condition)

    async def pexpireat(
        self, key: Arg, unix_ms: int, condition: ExpireCondition | None = None
    ) -> int:
        """PEXPIREAT: :meth:`expire` at a Unix time in ms (wall clock); same ``condition``."""
        return await self._expire("pexpireat", key, unix_ms, condition)

    async def ttl(self, key: Arg) -> int:
        """TTL: seconds until ``key`` expires; -1 if it has no TTL, -2 if it does not exist."""
        result: int = await self.execute("ttl", key)
        return result

    async def pttl(self, key: Arg) -> int:
        """PTTL: :meth:`ttl` in milliseconds; -1 if no TTL, -2 if it does not exist."""
        result: int = await self.execute("pttl", key)
        return result

    async def expiretime(self, key: Arg) -> int:
        """EXPIRETIME: the Unix time (s, wall clock) ``key`` expires at; -1 no TTL, -2 missing."""
        result: int = await self.execute("expiretime", key)
        return result

    async def pexpiretime(self, key: Arg) -> int:
        """PEXPIRETIME: :meth:`expiretime` in milliseconds; -1 if no TTL, -2 if missing."""
        result: int = await self.execute("pexpiretime", key)
        return result

    async def persist(self, key: Arg) -> int:
        """PERSIST: remove the TTL of ``key``; 1 if it had one, 0 if not (or missing)."""
        result: int = await self.execute("persist", key)
        return result

    async def keys(self, pattern: Arg = "*") -> list[bytes]:
        """KEYS: every key matching the glob ``pattern`` (``*``, ``?``, ``[a-z]``), in no order."""
        result: list[bytes] = await self.execute("keys", pattern)
        return result

    async def scan(
        self, cursor: int | bytes | str = 0, *, match: Arg | None = None, count: int | None = None
    ) -> tuple[int, list[bytes]]:
        """One SCAN step: (next cursor, keys); cursor 0 starts and ends."""
        args: list[Arg] = [cursor if not isinstance(cursor, int) else str(cursor)]
        if match is not None:
            args += ["MATCH", match]
        if count is not None:
            args += ["COUNT", count]
        next_cursor, keys = await self.execute("scan", *args)
        return int(next_cursor), list(keys)

    async def scan_iter(
        self, *, match: Arg | None = None, count: int | None = None
    ) -> AsyncIterator[bytes]:
        """Every key, by SCAN (a key present throughout is yielded at least once)."""
        cursor = 0
        while True:
            cursor, keys = await self.scan(cursor, match=match, count=count)
            for key in keys:
                yield key
            if cursor == 0:
                return
