"""DUMP and RESTORE: Redis's serialized form of a string value, both ways.

Migration tools (``redis-cli --pipe`` scripts, redis-shake, RIOT) move keys
between servers with ``DUMP key`` on one and ``RESTORE key ttl payload`` on
the other. Registered in the one command table
(:mod:`kvmemo.commands.table`) by importing this module.

Design. The payload is Redis's (``cluster.c`` ``createDumpPayload`` and
``verifyDumpPayload``, ``rdb.c``), restricted to the one type KVMemo holds::

    object type (1 byte: 0, a string)
    the value, RDB string encoding (below)
    RDB version (2 bytes, little-endian: 10, what Redis 7.0 writes)
    CRC-64/Jones of every byte before it (8 bytes, little-endian)

An RDB string is a *length* then that many bytes, or an *encoded* value. The
first byte's top two bits choose: ``00`` a 6-bit length, ``01`` a 14-bit
one (big-endian, with the next byte), ``10`` then ``0x80``: a 32-bit
big-endian length, ``0x81``: a 64-bit one; ``11``: encoded, the low six bits
naming how: 0, 1, 2 an 8, 16 or 32-bit little-endian signed integer (the
value is its decimal text), 3 an LZF-compressed string (compressed length,
uncompressed length, the compressed bytes).

- DUMP writes what Redis writes for the same bytes, except compression:
  the canonical decimal text of an integer that fits in 32 bits (at most 11
  bytes, as Redis's ``rdbTryIntegerEncoding`` requires) as that integer, any
  other value as a plain string, the shortest length form. Redis compresses
  a value over 20 bytes when LZF saves space; KVMemo never does (there is no
  compressor here), so its payloads of such values are longer than Redis's
  but load the same in Redis. Values of at most 20 bytes, or that LZF cannot
  shrink, get Redis's exact bytes.
- RESTORE accepts every string payload Redis 7.0 writes, and reads every
  string the way Redis 7.0 reads it: any RDB version up to 10, any length
  form (a 32-bit length for a 3-byte value included), the integer encodings
  and LZF. It checks, in Redis's order: the size (at least the 10 bytes of
  the footer), the version, the CRC (``ERR DUMP payload version or checksum
  are wrong``), then the object (``ERR Bad data format``: a type other than
  string, Redis's other types included, an unknown encoding, a length past
  the object's end, LZF data that does not decompress to exactly its
  declared length). Where Redis 7.0 is lax, KVMemo is strict, as no payload
  Redis writes needs it: the object must end exactly where the footer
  begins (Redis reads an object on into the footer's bytes, or ignores bytes
  left before it), and LZF input must not be empty (its decompression reads
  past the input in Redis). The tests hold both readings equal otherwise.
- No declared length allocates anything before it is checked: a plain
  string's against the bytes left in the payload, an LZF string's
  uncompressed length against the store's ``max_value_size`` (``TOO_LARGE``)
  and its compressed length against the payload. So a payload of 20 bytes
  claiming 2**63 bytes costs 20 bytes of work.

Costs: the CRC runs in C (anycrc, gigabytes per second); LZF is
decompressed in Python a token at a time (a literal run or a back reference
of up to 264 bytes, each one slice). Both happen where the command is parsed
or answered, in the one trio thread, so the RESTORE of a Redis payload that
compresses many megabytes stalls the node while it decompresses (measured:
about 37 MB of text-like value per second, 190 MB/s for a run of one byte),
as a Redis RESTORE of it stalls Redis, at C speed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import overload

import anycrc
import attrs

from ..errors import BusyKeyError, CommandSyntaxError, KVMemoError, TooLargeError
from ..eviction.memory import TTL_OVERHEAD
from ..storage.store import NeedMemory, ShardStore
from . import ops
from .args import MAX_EXPIRE_MS, NO_EXPIRY, SYNTAX, Expiry, ExpiryMode, parse_int, upper
from .table import KEY1, ParseContext, command, no_touch_variant

RDB_VERSION = 10  # what Redis 7.0 writes; a payload of a later version is refused
RDB_TYPE_STRING = 0  # the object type byte of a string
FOOTER_SIZE = 10  # bytes: the 2-byte RDB version and the 8-byte CRC-64

# The first byte of an RDB length (rdb.h).
LEN_6BIT = 0
LEN_14BIT = 1
LEN_32BIT = 0x80
LEN_64BIT = 0x81
LEN_ENCODED = 3  # the top two bits: an encoded value follows, its kind in the low six
ENC_INT8 = 0
ENC_INT16 = 1
ENC_INT32 = 2
ENC_LZF = 3
INT_ENCODING_MAX_LEN = 11  # bytes; Redis tries the integer encodings on values this short

# Redis's replies, word for word (cluster.c, server.c).
BAD_PAYLOAD = "DUMP payload version or checksum are wrong"
BAD_FORMAT = "Bad data format"
BUSYKEY = "Target key name already exists."
BAD_TTL = "Invalid TTL value, must be >= 0"
BAD_IDLETIME = "Invalid IDLETIME value, must be >= 0"
BAD_FREQ = "Invalid FREQ value, must be >= 0 and <= 255"
FREQ_MAX = 255  # Redis's LFU counter is 8 bits


# -- CRC-64/Jones ------------------------------------------------------------------------
#
# Redis's crc64 (crc64.c): the Jones polynomial 0xad93d23594c935a9, reflected
# input and output, initial value 0, no final XOR; crc64(b"123456789") is
# 0xe9c6d914c4b8d9ca. anycrc's catalogue names it CRC64-REDIS; the tests hold
# it to a table-driven reference.

_CRC64 = anycrc.Model("CRC64-REDIS")


def crc64(data: bytes | memoryview, crc: int = 0) -> int:
    """Redis's CRC-64 of ``data``, continuing from ``crc`` (0 to start)."""
    return int(_CRC64.calc(data, crc))


# -- writing -------------------------------------------------------------------------------


def encode_length(length: int) -> bytes:
    """An RDB length in its shortest form (``rdbSaveLen``)."""
    if length < 1 << 6:
        return bytes((length,))
    if length < 1 << 14:
        return bytes((0x40 | length >> 8, length & 0xFF))
    if length < 1 << 32:
        return bytes((LEN_32BIT,)) + length.to_bytes(4, "big")
    return bytes((LEN_64BIT,)) + length.to_bytes(8, "big")


def encode_string(value: bytes) -> bytes:
    """``value`` as an RDB string: an 8/16/32-bit integer when Redis would write one, else plain.

    Redis's rule (``rdbTryIntegerEncoding``): at most 11 bytes that are the
    canonical decimal text of an integer (no sign but ``-``, no leading zero,
    no ``-0``) within 32 bits.
    """
    return _int_encoding(value) or encode_length(len(value)) + value


def _int_encoding(value: bytes) -> bytes | None:
    """``value``'s RDB integer encoding, or None when Redis would write it plain."""
    if 0 < len(value) <= INT_ENCODING_MAX_LEN:
        try:
            number = parse_int(value)
        except KVMemoError:
            number = None
        if number is not None and str(number).encode() == value:
            if -(1 << 7) <= number < 1 << 7:
                return struct.pack("<Bb", 0xC0 | ENC_INT8, number)
            if -(1 << 15) <= number < 1 << 15:
                return struct.pack("<Bh", 0xC0 | ENC_INT16, number)
            if -(1 << 31) <= number < 1 << 31:
                return struct.pack("<Bi", 0xC0 | ENC_INT32, number)
    return None


def dump_payload(value: bytes) -> bytes:
    """The DUMP payload of a string value (see the module's design comment).

    Built with one copy of ``value`` (the CRC runs over the parts in turn),
    so a DUMP of a big value costs that value's size once more, not thrice.
    """
    small = _int_encoding(value)
    parts = [bytes((RDB_TYPE_STRING,))]
    parts += [small] if small is not None else [encode_length(len(value)), value]
    parts.append(RDB_VERSION.to_bytes(2, "little"))
    crc = 0
    for part in parts:
        crc = crc64(part, crc)
    parts.append(crc.to_bytes(8, "little"))
    return b"".join(parts)


# -- reading -------------------------------------------------------------------------------


class BadFormat(Exception):
    """The payload's object is malformed (becomes ``ERR Bad data format``)."""


def lzf_decompress(data: bytes | memoryview, out_len: int, *, check_only: bool = False) -> bytes:
    """Decompress LZF ``data`` (liblzf's format) into exactly ``out_len`` bytes.

    The format is a sequence of tokens. A control byte below 32 starts a
    literal run of ``ctrl + 1`` bytes copied from the input. Any other is a
    back reference: length ``ctrl >> 5`` (7: plus the next byte) plus 2 bytes,
    copied from ``((ctrl & 31) << 8 | next byte) + 1`` bytes back in the
    output, possibly overlapping what it writes (a run). liblzf checks the
    same bounds (``CHECK_INPUT``); where it would read past its input or
    write past ``out_len`` this raises instead.

    ``check_only``: walk the tokens with the same checks but build nothing
    (returns ``b""``): the validity of a payload whose value is not kept.

    Raises:
        BadFormat: empty input, a token cut short, a reference before the
            start of the output, more output than ``out_len``, or less.
    """
    src = bytes(data)
    n = len(src)
    if n == 0:
        raise BadFormat("empty LZF input")
    out = bytearray()
    produced = 0  # len(out), also when nothing is built
    ip = 0
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            run = ctrl + 1
            if produced + run > out_len or ip + run > n:
                raise BadFormat("LZF literal run out of bounds")
            if not check_only:
                out += src[ip : ip + run]
            produced += run
            ip += run
            continue
        length = ctrl >> 5
        if ip >= n:
            raise BadFormat("LZF back reference cut short")
        if length == 7:
            length += src[ip]
            ip += 1
            if ip >= n:
                raise BadFormat("LZF back reference cut short")
        distance = ((ctrl & 0x1F) << 8 | src[ip]) + 1
        ip += 1
        length += 2
        start = produced - distance
        if produced + length > out_len or start < 0:
            raise BadFormat("LZF back reference out of bounds")
        produced += length
        if check_only:
            continue
        if distance >= length:
            out += out[start : start + length]
        else:  # overlapping: the last `distance` bytes repeat
            pattern = bytes(out[start:])
            out += (pattern * (length // distance + 1))[:length]
    if produced != out_len:
        raise BadFormat("LZF output shorter than declared")
    return bytes(out)


@attrs.frozen
class Lzf:
    """An LZF-compressed string of a payload, kept compressed until the write has room.

    A payload of a few kilobytes can declare a value of hundreds of
    megabytes (a back reference of 3 bytes writes up to 264): RESTORE checks
    the memory the value needs before it builds it (:meth:`Restore.apply`),
    and a pipeline or a transaction holds the payloads, not their values.
    """

    data: bytes
    out_len: int

    def decompress(self) -> bytes:
        """The value. Raises ``CommandSyntaxError`` (``Bad data format``) if malformed."""
        try:
            return lzf_decompress(self.data, self.out_len)
        except BadFormat:
            raise CommandSyntaxError(BAD_FORMAT) from None

    def check(self) -> None:
        """:meth:`decompress`'s checks without building the value."""
        try:
            lzf_decompress(self.data, self.out_len, check_only=True)
        except BadFormat:
            raise CommandSyntaxError(BAD_FORMAT) from None


class RdbReader:
    """Reads an RDB string from a payload's body, checking every length first."""

    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> memoryview:
        if count > len(self.data) - self.pos:
            raise BadFormat("past the end of the payload")
        piece = self.data[self.pos : self.pos + count]
        self.pos += count
        return piece

    def length(self) -> tuple[int, bool]:
        """An RDB length: (length, False), or (encoding kind, True) (``rdbLoadLenByRef``)."""
        first = self.take(1)[0]
        kind = first >> 6
        if kind == LEN_ENCODED:
            return first & 0x3F, True
        if kind == LEN_6BIT:
            return first & 0x3F, False
        if kind == LEN_14BIT:
            return (first & 0x3F) << 8 | self.take(1)[0], False
        if first == LEN_32BIT:
            return int.from_bytes(self.take(4), "big"), False
        if first == LEN_64BIT:
            return int.from_bytes(self.take(8), "big"), False
        raise BadFormat(f"unknown length encoding {first:#x}")

    def string(self, max_size: int, *, lazy: bool = False) -> bytes | Lzf:
        """One RDB string (``rdbGenericLoadStringObject``), at most ``max_size`` bytes.

        ``lazy``: an LZF string comes back as :class:`Lzf`, not decompressed
        (nor checked beyond its lengths).

        Raises:
            BadFormat: malformed.
            TooLargeError: it would be longer than ``max_size``.
        """
        length, encoded = self.length()
        if not encoded:
            value = bytes(self.take(length))  # checked against what is left first
        elif length in (ENC_INT8, ENC_INT16, ENC_INT32):
            size = 1 << length
            value = str(int.from_bytes(self.take(size), "little", signed=True)).encode()
        elif length == ENC_LZF:
            compressed, _ = self.length()
            out_len, _ = self.length()
            if out_len > max_size:
                raise TooLargeError(ops.STRING_TOO_LONG)
            data = self.take(compressed)
            return Lzf(bytes(data), out_len) if lazy else lzf_decompress(data, out_len)
        else:
            raise BadFormat(f"unknown string encoding {length}")
        if len(value) > max_size:
            raise TooLargeError(ops.STRING_TOO_LONG)
        return value


@overload
def load_payload(payload: bytes, max_size: int) -> bytes: ...
@overload
def load_payload(payload: bytes, max_size: int, *, lazy: bool) -> bytes | Lzf: ...
def load_payload(payload: bytes, max_size: int, *, lazy: bool = False) -> bytes | Lzf:
    """The string value a DUMP payload holds (RESTORE's check, in Redis's order).

    Args:
        payload: the serialized value, as DUMP gave it.
        max_size: bytes; the longest value accepted (``max_value_size``).
        lazy: an LZF-compressed value comes back as :class:`Lzf`, its stream
            checked only when it is decompressed (RESTORE's parser).

    Raises:
        CommandSyntaxError: ``DUMP payload version or checksum are wrong`` (too
            short, a version after 10, a wrong CRC), or ``Bad data format``
            (anything but one well-formed string; see the module's comment).
        TooLargeError: the value is longer than ``max_size``.
    """
    view = memoryview(payload)
    if len(view) < FOOTER_SIZE:
        raise CommandSyntaxError(BAD_PAYLOAD)
    footer = len(view) - FOOTER_SIZE
    version = int.from_bytes(view[footer : footer + 2], "little")
    if version > RDB_VERSION:
        raise CommandSyntaxError(BAD_PAYLOAD)
    if crc64(view[: footer + 2]) != int.from_bytes(view[footer + 2 :], "little"):
        raise CommandSyntaxError(BAD_PAYLOAD)
    reader = RdbReader(view[:footer])
    try:
        if reader.take(1)[0] != RDB_TYPE_STRING:
            raise BadFormat("not a string")
        value = reader.string(max_size, lazy=lazy)
        if reader.pos != footer:
            raise BadFormat("bytes after the value")
    except BadFormat:
        raise CommandSyntaxError(BAD_FORMAT) from None
    return value


# -- the commands -------------------------------------------------------------------------


class Dump(ops.ShardOp):
    """DUMP: the key's value serialized as Redis serializes a string, or nil.

    A read that touches the key (Redis's DUMP looks the key up for reading).
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        value = store.get(self.key, now)
        return None if value is None else dump_payload(value)


class PeekDump(ops.ShardOp):
    """DUMP of a ``CLIENT NO-TOUCH`` client: no access recorded with the policy."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        value = store.peek(self.key, now)
        return None if value is None else dump_payload(value)


class Restore(ops.ShardOp):
    """RESTORE: create the key from a payload decoded when the command was parsed.

    Redis's order of checks: the options (at parse time), then, here, the key
    (``BUSYKEY`` unless ``replace``), then the TTL and the payload, whose
    error (``error``, found at parse time) is raised only now, before
    anything changes. A deadline already past (ABSTTL) creates nothing and
    answers OK; with ``replace`` it deletes the key that was there, as Redis
    does. Otherwise the key is written as SET with PXAT writes it
    (``ShardStore.put``: memory reserved with the tracker, the record
    journalled with its deadline in Unix ms), replacing any old value and TTL.

    ``value`` may be an :class:`Lzf` (a compressed payload): it is built
    here, once the tracker has the bytes the value will need (refused:
    ``NeedMemory``, so the engine makes room or answers OOM, nothing built),
    or, for a deadline already past, only checked. So a small payload that
    declares a huge value costs memory only when the value may be kept.

    As Redis's ``objectSetLRUOrLFU``: under an LFU policy, ``freq`` becomes
    the key's access count (0 included; ``idletime`` is ignored); under the
    others, ``idletime`` (seconds) is how long ago the key was last touched
    (``freq`` is ignored): ``OBJECT IDLETIME`` counts from there, and an LRU
    policy ranks it for eviction as touched then (``EvictionPolicy.record_aged``).
    KVMemo's fifo, random and noeviction policies keep no access times, so
    there it changes nothing observable (their ``OBJECT IDLETIME`` is an
    error). Redis's 24-bit LRU clock wraps an idle time past 2**24 s (194
    days); KVMemo keeps it as given.
    """

    __slots__ = ("error", "expiry", "freq", "idletime", "replace", "value")
    write = True

    def __init__(
        self,
        key: bytes,
        value: bytes | Lzf,
        expiry: Expiry,
        *,
        replace: bool,
        freq: int | None = None,
        idletime: int | None = None,
        error: KVMemoError | None = None,
    ) -> None:
        self.key = key
        self.value = value
        self.expiry = expiry
        self.replace = replace
        self.freq = freq
        self.idletime = idletime
        self.error = error

    def apply(self, store: ShardStore, now: float) -> str:
        key = self.key
        if not self.replace and store.contains(key, now):
            raise BusyKeyError(BUSYKEY)
        if self.error is not None:
            raise self.error
        deadline = self.expiry.deadline(now)
        expired = deadline is not None and deadline <= now
        value = self.value
        if type(value) is Lzf:
            # A payload error first, as Redis (and before any room is asked
            # for: a refused RESTORE must not evict), building nothing.
            value.check()
            if not expired:
                _check_room(store, key, value.out_len, deadline is not None, now)
                value = value.decompress()
        if expired:
            if self.replace:
                store.delete(key, now)
            return ops.OK
        assert type(value) is bytes
        store.put(key, value, now, expires_at=deadline)
        policy = store.policy
        volatile = deadline is not None
        if policy.lfu:
            # A new object to Redis: its count starts again, at FREQ if given.
            freq = 1 if self.freq is None else self.freq
            policy.record_frequency(key, freq, volatile=volatile)
        elif self.idletime:  # IDLETIME 0: touched now, as the put recorded it
            since = now - self.idletime
            tick = store.tick_times.tick_at(since)
            policy.record_aged(key, volatile=volatile, tick=tick, since=since)
        return ops.OK

    @property
    def write_bytes(self) -> int:
        """Bytes the write brings (the value as it will be, not its payload): a
        transaction makes this much room before it holds its shards."""
        value = self.value
        return len(self.key) + (value.out_len if isinstance(value, Lzf) else len(value))


def _check_room(store: ShardStore, key: bytes, length: int, has_ttl: bool, now: float) -> None:
    """Raise ``NeedMemory`` unless the tracker has room for ``key`` with a ``length``-byte value.

    What ``store.put`` would charge, netting out a live old value; asked of
    the tracker and given back at once (the caller builds the value and puts
    it with no checkpoint in between, and ``put`` charges it for real).
    """
    delta = store.entry_size_of(key, length) + (TTL_OVERHEAD if has_ttl else 0)
    old = store.peek_raw(key, now)
    if old is not None:
        delta -= store.entry_size(key, old, has_ttl=key in store.expires)
    if delta > 0:
        if not store.tracker.try_reserve(store.shard_id, delta):
            raise NeedMemory(delta)
        store.tracker.release(store.shard_id, delta)


@command("dump", 2, "readonly", KEY1, "a key's value serialized as Redis's DUMP does", "1.4")
def _dump(args: Sequence[bytes], ctx: ParseContext) -> Dump:
    return Dump(args[0])


@no_touch_variant("dump")
def _dump_no_touch(args: Sequence[bytes], ctx: ParseContext) -> PeekDump:
    return PeekDump(args[0])


@command(
    "restore", -4, "write", KEY1, "create a key from a DUMP payload (Redis's or KVMemo's)", "1.4"
)
def _restore(args: Sequence[bytes], ctx: ParseContext) -> Restore:
    # As Redis's restoreCommand: the options first (IDLETIME and FREQ
    # exclude each other: the second is a syntax error), checked here; the
    # key, the TTL and the payload are checked in that order by Restore.
    replace = absttl = False
    idletime: int | None = None
    freq: int | None = None
    i = 3
    while i < len(args):
        opt = upper(args[i])
        more = i + 1 < len(args)
        if opt == b"REPLACE":
            replace = True
        elif opt == b"ABSTTL":
            absttl = True
        elif opt == b"IDLETIME" and more and freq is None:
            idletime = parse_int(args[i + 1])
            if idletime < 0:
                raise CommandSyntaxError(BAD_IDLETIME)
            i += 1
        elif opt == b"FREQ" and more and idletime is None:
            freq = parse_int(args[i + 1])
            if not 0 <= freq <= FREQ_MAX:
                raise CommandSyntaxError(BAD_FREQ)
            i += 1
        else:
            raise CommandSyntaxError(SYNTAX)
        i += 1
    payload = args[2]
    if len(payload) > ctx.max_value_size:  # the engine's own check, before any work
        raise TooLargeError(
            f"value of {len(payload)} bytes is over max_value_size ({ctx.max_value_size})"
        )
    error: KVMemoError | None = None
    value: bytes | Lzf = b""
    expiry = NO_EXPIRY
    try:
        ttl = parse_int(args[1])
        if ttl < 0:
            raise CommandSyntaxError(BAD_TTL)
        if ttl > MAX_EXPIRE_MS:  # KVMemo's bound (see args.MAX_EXPIRE_MS); Redis overflows
            raise CommandSyntaxError("invalid expire time in 'restore' command")
        value = load_payload(payload, ctx.max_value_size, lazy=True)
        if ttl and absttl:
            expiry = Expiry(ExpiryMode.ABSOLUTE, ctx.clock.to_monotonic(ttl / 1000))
        elif ttl:
            expiry = Expiry(ExpiryMode.RELATIVE, ttl / 1000)
    except KVMemoError as exc:
        error = exc
    return Restore(
        args[0], value, expiry, replace=replace, freq=freq, idletime=idletime, error=error
    )
