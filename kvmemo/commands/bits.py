"""Bit and string-comparison commands: GETBIT, SETBIT, BITCOUNT, BITPOS, BITFIELD,
BITFIELD_RO, BITOP, LCS, RANDOMKEY.

Registered in the one command table (:mod:`kvmemo.commands.table`) by
importing this module; the semantics and error wording are Redis's.
"""

from __future__ import annotations

import enum
import itertools
import random
from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import CommandSyntaxError, NotIntegerError, TooLargeError
from ..persistence import Op, encode_fields, encode_set
from ..storage.store import NeedMemory, ShardStore
from . import ops
from .args import SYNTAX, parse_int, upper
from .replies import FieldList
from .table import LCS_MAX_CELLS, LCS_MAX_LENGTH, ParseContext, command

KEY1 = (1, 1, 1)
KEY2 = (1, 2, 1)
NOKEYS = (0, 0, 0)
DEST_THEN_KEYS = (2, -1, 1)  # BITOP: the operation, then the destination and the sources

MAX_BIT_OFFSET = (1 << 32) - 1  # Redis: (offset >> 3) < proto-max-bulk-len (512 MiB)
BIT_OFFSET_ERROR = "bit offset is not an integer or out of range"
BIT_VALUE_ERROR = "bit is not an integer or out of range"

# LCS bounds (Redis caps the table at proto-max-bulk-len bytes instead):
# ParseContext's, from StoreConfig. The table is computed bit-parallel (one
# Python big-int row per byte of the first string), so cells are cheap; the
# Python-level loops run len(a) + len(b) times.
LCS_TOO_LARGE = "LCS input too large"
LCS_LEN_AND_IDX = "If you want both the length and indexes, please just use IDX."


def _bit_offset(raw: bytes) -> int:
    try:
        offset = parse_int(raw)
    except NotIntegerError:
        raise NotIntegerError(BIT_OFFSET_ERROR) from None
    if not 0 <= offset <= MAX_BIT_OFFSET:
        raise NotIntegerError(BIT_OFFSET_ERROR)
    return offset


def _clamped(start: int, end: int, total: int) -> tuple[int, int]:
    """Redis's conversion of an inclusive range of ``total`` units (bytes or bits):
    negative indexes count from the end, both are clamped into the value; the
    range is empty when the start is past the end."""
    if start < 0:
        start = max(0, total + start)
    if end < 0:
        end = max(0, total + end)
    return start, min(end, total - 1)


# -- GETBIT / SETBIT / BITCOUNT ---------------------------------------------------------


class GetBit(ops.ShardOp):
    __slots__ = ("offset",)

    def __init__(self, key: bytes, offset: int) -> None:
        self.key = key
        self.offset = offset

    def apply(self, store: ShardStore, now: float) -> int:
        value = store.peek(self.key, now)
        byte = self.offset >> 3
        if value is None or byte >= len(value):
            return 0
        return (value[byte] >> (7 - (self.offset & 7))) & 1


class SetBit(ops.ShardOp):
    """SETBIT: grows the value with zero bytes, keeps the TTL, returns the old bit."""

    __slots__ = ("bit", "max_size", "offset")
    write = True

    def __init__(self, key: bytes, offset: int, bit: int, max_size: int) -> None:
        self.key = key
        self.offset = offset
        self.bit = bit
        self.max_size = max_size

    def apply(self, store: ShardStore, now: float) -> int:
        old = store.peek(self.key, now) or b""
        byte = self.offset >> 3
        if byte >= len(old) and byte + 1 > self.max_size:
            raise TooLargeError(ops.STRING_TOO_LONG)
        current = old[byte] if byte < len(old) else 0
        shift = 7 - (self.offset & 7)
        previous = (current >> shift) & 1
        changed = current | (1 << shift) if self.bit else current & ~(1 << shift) & 0xFF
        # The new value in one copy of the old (a bitmap may be megabytes: a
        # bytearray of it and bytes of that were two copies, each an allocation
        # the kernel zero-fills).
        with memoryview(old) as view:
            if byte < len(old):
                new = b"".join((view[:byte], changed.to_bytes(1, "big"), view[byte + 1 :]))
            else:
                new = b"".join((view, bytes(byte - len(old)), changed.to_bytes(1, "big")))
        # Like Redis, the key is written (created if absent) even when no bit changes.
        edit = (byte, changed.to_bytes(1, "big"))
        store.put(self.key, new, now, expires_at=None, keep_ttl=True, edit=edit)
        return previous


class BitCount(ops.ShardOp):
    """BITCOUNT with an optional inclusive range, in bytes or (``bit_mode``) bits."""

    __slots__ = ("bit_mode", "end", "start")

    def __init__(self, key: bytes, start: int | None, end: int, bit_mode: bool) -> None:
        self.key = key
        self.start = start  # None: the whole value
        self.end = end
        self.bit_mode = bit_mode

    def apply(self, store: ShardStore, now: float) -> int:
        value = store.peek(self.key, now)
        if value is None:
            return 0
        if self.start is None:
            return int.from_bytes(value, "big").bit_count()
        total = len(value) * 8 if self.bit_mode else len(value)
        start, end = self.start, self.end
        # Redis's conversion, quirks included (e.g. -100 -50 on a short value counts index 0).
        if start < 0 and end < 0 and start > end:
            return 0
        start, end = _clamped(start, end, total)
        if start > end:
            return 0
        if not self.bit_mode:
            return int.from_bytes(value[start : end + 1], "big").bit_count()
        chunk = value[start >> 3 : (end >> 3) + 1]
        bits = int.from_bytes(chunk, "big")
        width = len(chunk) * 8
        # Keep bits start..end: drop (start & 7) leading bits and 7 - (end & 7) trailing ones.
        bits &= (1 << (width - (start & 7))) - 1
        bits >>= 7 - (end & 7)
        return bits.bit_count()


@command("getbit", 3, "readonly fast", KEY1, "the bit at an offset of a value", "1.1")
def _getbit(args: Sequence[bytes], ctx: ParseContext) -> GetBit:
    return GetBit(args[0], _bit_offset(args[1]))


@command("setbit", 4, "write", KEY1, "set or clear the bit at an offset of a value", "1.1")
def _setbit(args: Sequence[bytes], ctx: ParseContext) -> SetBit:
    offset = _bit_offset(args[1])
    try:
        bit = parse_int(args[2])
    except NotIntegerError:
        raise NotIntegerError(BIT_VALUE_ERROR) from None
    if bit not in (0, 1):
        raise NotIntegerError(BIT_VALUE_ERROR)
    return SetBit(args[0], offset, bit, ctx.max_value_size)


@command("bitcount", -2, "readonly", KEY1, "count the set bits of a value or a range", "1.1")
def _bitcount(args: Sequence[bytes], ctx: ParseContext) -> BitCount:
    # Arguments are checked even when the key does not exist (Redis 7.2 and later).
    if len(args) == 1:
        return BitCount(args[0], None, 0, False)
    if len(args) not in (3, 4):
        raise CommandSyntaxError(SYNTAX)
    start = parse_int(args[1])
    end = parse_int(args[2])
    bit_mode = len(args) == 4 and _unit_is_bit(args[3])
    return BitCount(args[0], start, end, bit_mode)


def _unit_is_bit(raw: bytes) -> bool:
    """A range's unit (BITCOUNT, BITPOS): True for BIT, False for BYTE, else a syntax error."""
    unit = upper(raw)
    if unit == b"BIT":
        return True
    if unit != b"BYTE":
        raise CommandSyntaxError(SYNTAX)
    return False


# -- BITPOS ---------------------------------------------------------------------------

BIT_ARGUMENT_ERROR = "The bit argument must be 1 or 0."


class BitPos(ops.ShardOp):
    """BITPOS: the first bit equal to ``bit`` in a value or an inclusive range of it.

    As Redis: a missing key is an endless run of zero bits (0 for a clear
    bit, -1 for a set one); an empty range is -1; looking for a clear bit
    without an explicit ``end``, a value of ones answers the position just
    past the range (the value is taken as zero-padded on the right), while
    with ``end`` given the range alone counts (-1).
    """

    __slots__ = ("bit", "bit_mode", "end", "start")

    def __init__(
        self, key: bytes, bit: int, start: int | None, end: int | None, bit_mode: bool
    ) -> None:
        self.key = key
        self.bit = bit
        self.start = start  # None: the whole value
        self.end = end  # None: to the end of the value (never in bit mode)
        self.bit_mode = bit_mode

    def apply(self, store: ShardStore, now: float) -> int:
        value = store.peek(self.key, now)
        if value is None:
            return -1 if self.bit else 0
        total = len(value) * 8 if self.bit_mode else len(value)
        start = 0 if self.start is None else self.start
        end = total - 1 if self.end is None else self.end
        # Redis's conversion (without BITCOUNT's quirk for two negative indexes).
        start, end = _clamped(start, end, total)
        if start > end:
            return -1
        if not self.bit_mode:
            start, end = start * 8, end * 8 + 7  # the range in bits
        found = first_bit(value, start, end, self.bit)
        if found >= 0 or self.bit or self.end is not None:
            return found
        return end + 1  # no clear bit: the first one past the value's end


BITPOS_CHUNK = 64 * 1024  # bytes a run of uninteresting bytes is skipped by, per slice


def first_bit(value: bytes, start: int, end: int, bit: int, chunk: int = BITPOS_CHUNK) -> int:
    """The position of the first bit equal to ``bit`` among bits ``start..end`` of ``value``.

    Bits are numbered as SETBIT numbers them (most significant first); the
    range is inclusive and within ``value``. Stops at the first match, as
    Redis does: the bytes that cannot hold one (0x00 looking for a 1, 0xff
    looking for a 0) are skipped in slices of ``BITPOS_CHUNK`` bytes by
    ``bytes.lstrip``, so the work is proportional to the bytes before the
    answer and the extra memory to one slice (``chunk`` bytes), whatever
    the value's size.

    Returns:
        The bit position, or -1 when the range holds no such bit.
    """
    first, last = start >> 3, end >> 3
    skip = 0 if bit else 0xFF
    skip_byte = bytes((skip,))
    i = first
    while i <= last:
        byte = value[i]
        if byte == skip and first < i < last:
            # A run of bytes with no such bit, inside the range: skip it.
            while i < last:
                stop = min(last, i + chunk)
                rest = len(value[i:stop].lstrip(skip_byte))
                i = stop - rest
                if rest:
                    break
            continue
        found = byte if bit else byte ^ 0xFF
        if i == first:
            found &= 0xFF >> (start & 7)
        if i == last:
            found &= (0xFF << (7 - (end & 7))) & 0xFF
        if found:
            return i * 8 + 8 - found.bit_length()
        i += 1
    return -1


@command("bitpos", -3, "readonly", KEY1, "the first set or clear bit of a value or a range", "1.3")
def _bitpos(args: Sequence[bytes], ctx: ParseContext) -> BitPos:
    # Arguments are checked even when the key does not exist, in Redis's order
    # (bit, start, unit, end), as Redis 7.2 and later do (7.0 answered first).
    bit = parse_int(args[1])
    if bit not in (0, 1):
        raise NotIntegerError(BIT_ARGUMENT_ERROR)
    if len(args) > 5:
        raise CommandSyntaxError(SYNTAX)
    start = parse_int(args[2]) if len(args) > 2 else None
    bit_mode = len(args) == 5 and _unit_is_bit(args[4])  # Redis's order: the unit before end
    end = parse_int(args[3]) if len(args) > 3 else None
    return BitPos(args[0], bit, start, end, bit_mode)


# -- BITFIELD, BITFIELD_RO ---------------------------------------------------------------
#
# A bitfield is an integer of 1 to 64 bits (signed) or 1 to 63 bits (unsigned) at any bit
# offset, most significant bit first, as SETBIT numbers bits. The subcommands run in order
# on one copy of the value, in one shard step: each sees the ones before it, and the value
# is written once at the end (if any byte changed). A write (SET, INCRBY) first grows the
# value with zero bytes to its farthest bit, even when its overflow policy then refuses it
# (Redis does the same), so that growth obeys max_value_size as SETBIT's does.

BITFIELD_TYPE_ERROR = (
    "Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is."
)
BITFIELD_OVERFLOW_ERROR = "Invalid OVERFLOW type specified"
BITFIELD_RO_ERROR = "BITFIELD_RO only supports the GET subcommand"


class FieldAction(enum.Enum):
    GET = "get"
    SET = "set"
    INCRBY = "incrby"


class Overflow(enum.Enum):
    """What a SET or INCRBY does with a result its field cannot hold."""

    WRAP = "wrap"  # modulo 2**bits (signed: two's complement)
    SAT = "sat"  # the field's minimum or maximum
    FAIL = "fail"  # nothing written; the reply is nil


_OVERFLOWS = {b"WRAP": Overflow.WRAP, b"SAT": Overflow.SAT, b"FAIL": Overflow.FAIL}
_FIELD_ACTIONS = {b"GET": FieldAction.GET, b"SET": FieldAction.SET, b"INCRBY": FieldAction.INCRBY}
_UINT64 = (1 << 64) - 1


@attrs.frozen
class FieldOp:
    """One BITFIELD subcommand; ``value``: SET's value or INCRBY's increment (GET: 0)."""

    action: FieldAction
    signed: bool
    bits: int
    offset: int
    value: int
    overflow: Overflow


def read_field(buf: bytes | bytearray, offset: int, bits: int, signed: bool) -> int:
    """The integer of ``bits`` bits at bit ``offset`` of ``buf`` (zero past its end)."""
    first, last = offset >> 3, (offset + bits - 1) >> 3
    chunk = buf[first : last + 1]
    field = int.from_bytes(chunk, "big") << (8 * (last + 1 - first - len(chunk)))
    field = (field >> (7 - ((offset + bits - 1) & 7))) & ((1 << bits) - 1)
    if signed and field >> (bits - 1):
        field -= 1 << bits
    return field


def write_field(buf: bytearray, offset: int, bits: int, value: int) -> None:
    """Store ``value``'s low ``bits`` bits at bit ``offset`` of ``buf`` (long enough)."""
    first, last = offset >> 3, (offset + bits - 1) >> 3
    shift = 7 - ((offset + bits - 1) & 7)
    mask = ((1 << bits) - 1) << shift
    word = int.from_bytes(buf[first : last + 1], "big")
    word = (word & ~mask) | ((value << shift) & mask)
    buf[first : last + 1] = word.to_bytes(last + 1 - first, "big")


def fit_field(op: FieldOp, target: int) -> int | None:
    """What a SET or INCRBY stores for ``target`` under ``op.overflow``; None: FAIL refused.

    As Redis's ``check(Un)signedBitfieldOverflow``: INCRBY's target is the
    exact sum. SET on an unsigned field takes its value as a 64-bit
    unsigned integer, so a negative value is over the maximum (SAT stores
    the maximum, WRAP its low bits). One deliberate difference: Redis
    computes ``max - value`` in uint64, which wraps for a signed SET within
    ``2**63 - max`` of INT64_MIN, so its SAT stores the *maximum* there;
    here every value below the range saturates to the minimum (listed in
    the differential test's ``DELIBERATE``).
    """
    bits = op.bits
    if op.signed:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
        if op.action is FieldAction.SET:
            target &= _UINT64
    if low <= target <= high:
        return target
    if op.overflow is Overflow.FAIL:
        return None
    if op.overflow is Overflow.SAT:
        return high if target > high else low
    wrapped = target & ((1 << bits) - 1)
    return wrapped - (1 << bits) if op.signed and wrapped > high else wrapped


class BitField(ops.ShardOp):
    """BITFIELD with at least one SET or INCRBY: the replies of every subcommand, in order.

    Keeps the key's TTL. Raises TOO_LARGE, changing nothing, when growing
    the value to the farthest bit written would pass ``max_size`` (Redis 7.0
    checks no size here and grows a value a few bytes past its 512 MiB
    limit; KVMemo holds BITFIELD to the limit SETBIT and SETRANGE obey).
    """

    __slots__ = ("fields", "first", "max_size", "size")
    write = True

    def __init__(self, key: bytes, fields: Sequence[FieldOp], max_size: int) -> None:
        self.key = key
        self.fields = tuple(fields)
        self.max_size = max_size
        writes = [f for f in fields if f.action is not FieldAction.GET]
        # Bytes the value must have for the farthest bit a SET or INCRBY reaches,
        # and the first byte one may change: no byte outside them changes.
        self.size = max(((f.offset + f.bits - 1) >> 3) + 1 for f in writes)
        self.first = min(f.offset >> 3 for f in writes)

    def apply(self, store: ShardStore, now: float) -> list[int | None]:
        old = store.peek(self.key, now)
        base = old or b""
        if self.size > len(base) and self.size > self.max_size:
            raise TooLargeError(ops.STRING_TOO_LONG)
        buf = bytearray(base)
        if self.size > len(buf):
            buf.extend(bytes(self.size - len(buf)))
        replies: list[int | None] = []
        for f in self.fields:
            current = read_field(buf, f.offset, f.bits, f.signed)
            if f.action is FieldAction.GET:
                replies.append(current)
                continue
            target = f.value if f.action is FieldAction.SET else current + f.value
            stored = fit_field(f, target)
            if stored is None:
                replies.append(None)
                continue
            write_field(buf, f.offset, f.bits, stored)
            replies.append(current if f.action is FieldAction.SET else stored)
        new = bytes(buf)
        if new != old:  # created (even if every write failed), grown, or changed
            edit = (self.first, new[self.first : self.size])
            store.put(self.key, new, now, expires_at=None, keep_ttl=True, edit=edit)
        return replies


class BitFieldGet(ops.ShardOp):
    """BITFIELD_RO, or BITFIELD with GETs only: reads, never creates the key."""

    __slots__ = ("fields",)

    def __init__(self, key: bytes, fields: Sequence[FieldOp]) -> None:
        self.key = key
        self.fields = tuple(fields)

    def apply(self, store: ShardStore, now: float) -> list[int]:
        value = store.peek(self.key, now) or b""
        return [read_field(value, f.offset, f.bits, f.signed) for f in self.fields]


def _field_type(raw: bytes) -> tuple[bool, int]:
    """``i1``..``i64`` or ``u1``..``u63``: (signed, bits)."""
    sign = raw[:1]
    if sign not in (b"i", b"u"):
        raise CommandSyntaxError(BITFIELD_TYPE_ERROR)
    try:
        bits = parse_int(raw[1:])
    except NotIntegerError:
        raise CommandSyntaxError(BITFIELD_TYPE_ERROR) from None
    if not 1 <= bits <= (64 if sign == b"i" else 63):
        raise CommandSyntaxError(BITFIELD_TYPE_ERROR)
    return sign == b"i", bits


def _field_offset(raw: bytes, bits: int) -> int:
    """A bit offset, or ``#n``: the ``n``-th field of this width (``n * bits``)."""
    scaled = raw[:1] == b"#"
    try:
        offset = parse_int(raw[1:] if scaled else raw)
    except NotIntegerError:
        raise NotIntegerError(BIT_OFFSET_ERROR) from None
    if scaled:
        offset *= bits
    if not 0 <= offset <= MAX_BIT_OFFSET:
        raise NotIntegerError(BIT_OFFSET_ERROR)
    return offset


def parse_bitfield(
    args: Sequence[bytes], *, max_size: int, readonly: bool
) -> BitField | BitFieldGet:
    """BITFIELD's (``readonly``: BITFIELD_RO's) subcommands, checked in order as Redis does.

    Every subcommand is checked before anything runs, so a bad one changes
    nothing. OVERFLOW applies to the SETs and INCRBYs after it.

    Raises:
        CommandSyntaxError: an unknown subcommand or one short of arguments,
            a bad type or OVERFLOW kind; BITFIELD_RO given a SET or INCRBY
            (checked after every subcommand, as Redis does).
        NotIntegerError: a bad offset or value.
    """
    fields: list[FieldOp] = []
    overflow = Overflow.WRAP
    i = 1
    while i < len(args):
        name = upper(args[i])
        remaining = len(args) - i - 1
        if name == b"OVERFLOW" and remaining >= 1:
            kind = _OVERFLOWS.get(upper(args[i + 1]))
            if kind is None:
                raise CommandSyntaxError(BITFIELD_OVERFLOW_ERROR)
            overflow = kind
            i += 2
            continue
        action = _FIELD_ACTIONS.get(name)
        if action is None or remaining < (2 if action is FieldAction.GET else 3):
            raise CommandSyntaxError(SYNTAX)
        signed, bits = _field_type(args[i + 1])
        offset = _field_offset(args[i + 2], bits)
        value = 0 if action is FieldAction.GET else parse_int(args[i + 3])
        fields.append(FieldOp(action, signed, bits, offset, value, overflow))
        i += 3 if action is FieldAction.GET else 4
    if all(f.action is FieldAction.GET for f in fields):
        return BitFieldGet(args[0], fields)
    if readonly:
        raise CommandSyntaxError(BITFIELD_RO_ERROR)
    return BitField(args[0], fields, max_size)


@command("bitfield", -2, "write", KEY1, "get, set and increment integers of any width", "1.3")
def _bitfield(args: Sequence[bytes], ctx: ParseContext) -> BitField | BitFieldGet:
    return parse_bitfield(args, max_size=ctx.max_value_size, readonly=False)


@command("bitfield_ro", -2, "readonly fast", KEY1, "BITFIELD with GET subcommands only", "1.3")
def _bitfield_ro(args: Sequence[bytes], ctx: ParseContext) -> BitField | BitFieldGet:
    return parse_bitfield(args, max_size=ctx.max_value_size, readonly=True)


# -- BITOP ------------------------------------------------------------------------------


class BitOperation(enum.Enum):
    AND = "and"
    OR = "or"
    XOR = "xor"
    NOT = "not"


_BIT_OPERATIONS = {b"AND": BitOperation.AND, b"OR": BitOperation.OR,
                   b"XOR": BitOperation.XOR, b"NOT": BitOperation.NOT}  # fmt: skip
_INVERT = bytes(255 - b for b in range(256))  # a translate table: every bit flipped
BITOP_NOT_ERROR = "BITOP NOT must be called with a single source key."


def bitop(operation: BitOperation, values: Sequence[bytes | None]) -> bytes:
    """BITOP's result: as long as the longest value, shorter ones zero-padded on the right.

    None (a missing key) is an empty value; NOT takes exactly one value.
    Computed on Python integers (one C-speed pass per value).
    """
    length = max((len(v) for v in values if v), default=0)
    if not length:
        return b""
    if operation is BitOperation.NOT:
        (value,) = values
        assert value is not None  # non-empty, as length says
        return value.translate(_INVERT)
    acc = -1 if operation is BitOperation.AND else 0
    for value in values:
        value = value or b""
        word = int.from_bytes(value, "big") << (8 * (length - len(value)))
        if operation is BitOperation.AND:
            acc &= word
        elif operation is BitOperation.OR:
            acc |= word
        else:
            acc ^= word
    return acc.to_bytes(length, "big")


class _PeekLengths(ops.Part):
    """The lengths of some keys' live values (0 for a missing key).

    Lengths, not the values: step 1 of a BITOP needs only the longest one,
    and holding the values would keep a big source alive in the engine
    (deleted meanwhile, say) until the BITOP ends.
    """

    __slots__ = ("keys",)

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def apply(self, store: ShardStore, now: float) -> list[int]:
        return [len(store.peek(key, now) or b"") for key in self.keys]


class _BitOpRound:
    """What one two-phase round of a BITOP shares between its shards' parts.

    ``bound``: the length of the longest source value the engine read
    (step 1), which bounds the result's: the destination reserves memory
    for that length. ``values``: each source's value as its shard's prepare found it
    (by key position; position 0, the destination, unused). The destination's
    commit computes the result from them: every shard voted, so every source
    is filled in, and each was held unchanged from its prepare to the
    decision, so together they are the sources' state at one instant.
    """

    __slots__ = ("bound", "values")

    def __init__(self, keys: int, bound: int) -> None:
        self.bound = bound
        self.values: list[bytes | None] = [None] * keys


class BitOp(ops.ReadThenWrite):
    """BITOP: ``keys[0]`` (the destination) set to the operation over ``keys[1:]``.

    Atomic across shards (:class:`ops.ReadThenWrite`): step 1 reads the
    sources for the result's length (TOO_LARGE over ``max_size``, nothing
    written); in the two-phase round each source's shard hands over its
    value as it is when it prepares (voting CHANGED only if it grew past
    that length), the destination's shard reserves memory for the length,
    and its commit computes and writes the result. A concurrent writer to a
    source thus never makes the result a mix, and only a value that keeps
    growing makes BITOP read again. As Redis: the destination loses any
    TTL, an empty result deletes it, and the answer is the result's length.
    """

    kind = "bitop"

    def __init__(self, operation: BitOperation, keys: Sequence[bytes], max_size: int) -> None:
        super().__init__(keys)
        self.operation = operation
        self.max_size = max_size
        self.round: _BitOpRound | None = None  # the round the next parts belong to
        self.reads = 0  # times the sources were read (step 1): the retries' headroom
        self.length: int | None = None  # the result's length, once committed

    def source_part(self, positions: list[int]) -> ops.Part | None:
        sources = [self.keys[i] for i in positions if i]
        return _PeekLengths(sources) if sources else None

    def sources_read(self, results: list[Any], positions: list[list[int]]) -> Any:
        self.round = self.new_round([n for read in results if read for n in read])
        return ops.NO_ANSWER

    def new_round(self, lengths: Sequence[int]) -> _BitOpRound:
        """A round bounded by the longest of the sources' ``lengths``.

        Raises:
            TooLargeError: a result that long would be over ``max_size``.
        """
        longest = max(lengths, default=0)
        if longest > self.max_size:
            raise TooLargeError(ops.STRING_TOO_LONG)
        self.reads += 1
        bound = min(ops.retry_bound(longest, self.reads), self.max_size)
        return _BitOpRound(len(self.keys), bound)

    def part(self, positions: list[int]) -> ops.AtomicPart:
        return _BitOpPart(self, positions)

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> int:
        assert self.length is not None  # set by the destination's commit
        return self.length


class _BitOpPart(ops.AtomicPart):
    """One shard's share of a BITOP: hand over its sources, write (or delete) the destination.

    ``commit`` applies at the time ``prepare`` saw, as the other atomic
    parts do (the reservation nets out the destination's old value as it
    was then), and turns the reservation for the bound into the exact one.
    """

    def __init__(self, op: BitOp, positions: list[int]) -> None:
        self.op = op
        # This round's shared state, fixed now: a retry makes a new one, while
        # a part of an aborted round may still be queued on a busy shard.
        # None: no read step ran (a transaction's step, every key on this shard).
        self.round = op.round
        self.sources = [i for i in positions if i]
        self.dst = op.keys[0] if 0 in positions else None
        self.old_size = 0  # the destination's entry size when prepared (0: absent)
        self.reserved = 0
        self.prepared_at = 0.0
        self._result: bytes | None = None

    def prepare(self, store: ShardStore, now: float) -> object:
        op = self.op
        if self.round is None:
            # Every key is on this shard and nothing runs between this and commit.
            values = [store.peek(key, now) for key in op.keys[1:]]
            self.round = op.new_round([len(v or b"") for v in values])  # TOO_LARGE: raised
            self.round.values[1:] = values
        rnd = self.round
        bound = rnd.bound
        # A result (as long as the longest source) within the bound's size step
        # costs what was reserved; with nothing reserved (every source empty), none may grow.
        capacity = ops.value_capacity(bound) if bound else 0
        for i in self.sources:
            value = store.peek(op.keys[i], now)
            if value is not None and len(value) > capacity:
                return ops.CHANGED  # longer than the reservation allows: read again
            rnd.values[i] = value
        dst = self.dst
        if dst is not None:
            old = store.peek_raw(dst, now)
            if old is not None:
                self.old_size = store.entry_size(dst, old, has_ttl=store.expiry_of(dst) is not None)
            if bound:
                delta = store.entry_size_of(dst, bound) - self.old_size
                if not store.tracker.try_reserve(store.shard_id, delta):
                    return NeedMemory(delta)
                self.reserved = delta
        self.prepared_at = now
        return True

    def result(self) -> bytes:
        """The destination's new value (once every shard prepared)."""
        if self._result is None:
            assert self.round is not None
            self._result = bitop(self.op.operation, self.round.values[1:])
        return self._result

    def commit(self, store: ShardStore, now: float) -> None:
        # The shard held since prepare: the store is as prepare saw it.
        dst = self.dst
        if dst is None:
            return
        result = self.result()
        self.op.length = len(result)
        exact = store.entry_size(dst, result) - self.old_size if result else 0
        store.tracker.release(store.shard_id, self.reserved - exact)
        self.reserved = 0
        if result:
            store.put(dst, result, self.prepared_at, expires_at=None, charge=False)
        elif self.old_size:
            store.delete(dst, self.prepared_at)

    def abort(self, store: ShardStore) -> None:
        if self.reserved:
            store.tracker.release(store.shard_id, self.reserved)
            self.reserved = 0

    def effects(self, unix_offset: float) -> bytes:
        # As commit journals them: the destination's SET (no expiry) or DEL.
        if self.dst is None:
            return b""
        result = self.result()
        if result:
            return encode_set(self.dst, result)
        return encode_fields(Op.DEL, self.dst) if self.old_size else b""


@command("bitop", -4, "write", DEST_THEN_KEYS, "AND, OR, XOR or NOT of values into a key", "1.3")
def _bitop(args: Sequence[bytes], ctx: ParseContext) -> BitOp:
    operation = _BIT_OPERATIONS.get(upper(args[0]))
    if operation is None:
        raise CommandSyntaxError(SYNTAX)
    if operation is BitOperation.NOT and len(args) != 3:
        raise CommandSyntaxError(BITOP_NOT_ERROR)
    return BitOp(operation, args[1:], ctx.max_value_size)


# -- LCS --------------------------------------------------------------------------------


def _lcs_rows(a: bytes, b: bytes) -> list[int]:
    """Bit-parallel LCS rows (Hyyrö's algorithm), one per prefix of ``a``.

    Row ``i`` is an ``len(b)``-bit int whose bit ``k`` is 0 exactly when
    ``LCS(a[:i], b[:k+1]) == LCS(a[:i], b[:k]) + 1``; so
    ``LCS(a[:i], b[:j]) == j - popcount(row_i & (2**j - 1))``.
    """
    full = (1 << len(b)) - 1
    masks: dict[int, int] = {}
    for k, c in enumerate(b):
        masks[c] = masks.get(c, 0) | (1 << k)
    rows = [full]
    v = full
    for c in a:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    return rows


def _lcs_at(row: int, j: int) -> int:
    return j - (row & ((1 << j) - 1)).bit_count()


def lcs(
    a: bytes,
    b: bytes,
    *,
    want_string: bool,
    minmatchlen: int,
    withmatchlen: bool,
    max_cells: int = LCS_MAX_CELLS,
    max_length: int = LCS_MAX_LENGTH,
) -> tuple[int, bytes, list[list[Any]]]:
    """The LCS length, string and match ranges, walked back exactly as Redis does.

    Ranges (``[[a_start, a_end], [b_start, b_end](, length)]``) come last match
    first, as Redis emits them; the string and ranges are only computed when
    ``want_string`` (LEN alone needs neither). Two non-empty values whose
    lengths multiply past ``max_cells`` or add up past ``max_length`` raise
    TooLargeError, before any work.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0, b"", []
    if n * m > max_cells or n + m > max_length:
        raise TooLargeError(LCS_TOO_LARGE)
    rows = _lcs_rows(a, b)
    length = _lcs_at(rows[n], m)
    if not want_string:
        return length, b"", []
    nbytes = (m + 7) // 8

    def as_bytes(row: int) -> bytes:
        return row.to_bytes(nbytes, "little")

    out = bytearray(length)
    idx = length
    ranges: list[list[Any]] = []
    i, j = n, m
    cur = length  # LCS(i, j)
    up = _lcs_at(rows[i - 1], j)  # LCS(i-1, j)
    row_i, row_up = as_bytes(rows[i]), as_bytes(rows[i - 1])
    a_start = n  # n: no range open
    a_end = b_start = b_end = 0
    while i > 0 and j > 0:
        emit = False
        if a[i - 1] == b[j - 1]:
            out[idx - 1] = a[i - 1]
            if a_start == n:
                a_start = a_end = i - 1
                b_start = b_end = j - 1
            elif a_start == i and b_start == j:
                a_start -= 1
                b_start -= 1
            else:
                emit = True
            if a_start == 0 or b_start == 0:
                emit = True
            idx -= 1
            # LCS(i-1, j-1), then move to row i-1.
            cur = up - (not (row_up[(j - 1) >> 3] >> ((j - 1) & 7)) & 1)
            i -= 1
            j -= 1
            if i > 0:
                row_i, row_up = row_up, as_bytes(rows[i - 1])
                up = _lcs_at(rows[i - 1], j)
        else:
            left = cur - (not (row_i[(j - 1) >> 3] >> ((j - 1) & 7)) & 1)  # LCS(i, j-1)
            if up > left:
                i -= 1
                cur = up
                if i > 0:
                    row_i, row_up = row_up, as_bytes(rows[i - 1])
                    up = _lcs_at(rows[i - 1], j)
            else:
                up -= not (row_up[(j - 1) >> 3] >> ((j - 1) & 7)) & 1  # LCS(i-1, j-1)
                cur = left
                j -= 1
            if a_start != n:
                emit = True
        if emit:
            match_len = a_end - a_start + 1
            if minmatchlen == 0 or match_len >= minmatchlen:
                entry: list[Any] = [[a_start, a_end], [b_start, b_end]]
                if withmatchlen:
                    entry.append(match_len)
                ranges.append(entry)
            a_start = n
    return length, bytes(out), ranges


class Lcs(ops.MGet):
    """LCS: both values read under the engine's reader lock, compared in ``combine``."""

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        get_len: bool,
        get_idx: bool,
        minmatchlen: int,
        withmatchlen: bool,
        max_cells: int,
        max_length: int,
    ) -> None:
        super().__init__(keys)
        self.get_len = get_len
        self.get_idx = get_idx
        self.minmatchlen = minmatchlen
        self.withmatchlen = withmatchlen
        self.max_cells = max_cells
        self.max_length = max_length

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        a, b = (v or b"" for v in super().combine(results, positions, committed))
        length, string, ranges = lcs(
            a,
            b,
            want_string=self.get_idx or not self.get_len,
            minmatchlen=self.minmatchlen,
            withmatchlen=self.withmatchlen,
            max_cells=self.max_cells,
            max_length=self.max_length,
        )
        if self.get_idx:
            # Redis replies with bulk strings for the labels (a map in RESP3).
            return FieldList([b"matches", ranges, b"len", length])
        if self.get_len:
            return length
        return string


@command("lcs", -3, "readonly", KEY2, "longest common subsequence of two values", "1.1")
def _lcs(args: Sequence[bytes], ctx: ParseContext) -> Lcs:
    get_len = get_idx = withmatchlen = False
    minmatchlen = 0
    i = 2
    while i < len(args):
        opt = upper(args[i])
        if opt == b"IDX":
            get_idx = True
        elif opt == b"LEN":
            get_len = True
        elif opt == b"WITHMATCHLEN":
            withmatchlen = True
        elif opt == b"MINMATCHLEN" and i + 1 < len(args):
            minmatchlen = max(0, parse_int(args[i + 1]))
            i += 1
        else:
            raise CommandSyntaxError(SYNTAX)
        i += 1
    if get_idx and get_len:
        raise CommandSyntaxError(LCS_LEN_AND_IDX)
    return Lcs(
        args[:2],
        get_len=get_len,
        get_idx=get_idx,
        minmatchlen=minmatchlen,
        withmatchlen=withmatchlen,
        max_cells=ctx.lcs_max_cells,
        max_length=ctx.lcs_max_length,
    )


# -- RANDOMKEY --------------------------------------------------------------------------


def _random_live_key(store: ShardStore, now: float) -> tuple[int, bytes | None]:
    """This shard's live count and one of its live keys chosen uniformly (or None).

    Picks a random position and walks the dict from there (wrapping around),
    skipping expired entries: O(n) in the worst case, as a dict has no random
    access, but no copy of the keys is made (``islice`` skips in C).
    """
    count = store.live_count(now)
    data = store.data
    if count <= 0 or not data:
        return max(count, 0), None
    expires = store.expires
    if not expires:  # every key is live: the position is uniform
        i = random.randrange(len(data))
        return count, next(itertools.islice(data, i, None))
    live = count / len(data)
    if live >= 0.5:  # mostly live: a few random probes almost always hit
        for _ in range(16):
            i = random.randrange(len(data))
            key = next(itertools.islice(data, i, None))
            exp = expires.get(key)
            if exp is None or exp > now:
                return count, key
    keys = list(store.live_keys(now))
    return len(keys), (random.choice(keys) if keys else None)


class _RandomKeyPart(ops.Part):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> tuple[int, bytes | None]:
        return _random_live_key(store, now)


class RandomKey(ops.KeyspaceOp):
    def part(self) -> ops.Part:
        return _RandomKeyPart()

    def combine(self, results: list[Any]) -> bytes | None:
        candidates: list[tuple[int, bytes]] = [
            (count, key) for count, key in results if key is not None and count > 0
        ]
        if not candidates:
            return None
        return random.choices(candidates, weights=[c for c, _ in candidates])[0][1]


@command("randomkey", 1, "readonly", NOKEYS, "a random live key, or nil", "1.1")
def _randomkey(args: Sequence[bytes], ctx: ParseContext) -> RandomKey:
    return RandomKey()
