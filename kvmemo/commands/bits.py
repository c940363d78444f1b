"""Bit and string-comparison commands: GETBIT, SETBIT, BITCOUNT, LCS, RANDOMKEY.

Registered in the one command table (:mod:`kvmemo.commands.table`) by
importing this module; the semantics and error wording are Redis's.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

from ..errors import CommandSyntaxError, NotIntegerError, TooLargeError
from ..storage.store import ShardStore
from . import ops
from .args import SYNTAX, parse_int, upper
from .replies import FieldList
from .table import ParseContext, command

KEY1 = (1, 1, 1)
KEY2 = (1, 2, 1)
NOKEYS = (0, 0, 0)

MAX_BIT_OFFSET = (1 << 32) - 1  # Redis: (offset >> 3) < proto-max-bulk-len (512 MiB)
BIT_OFFSET_ERROR = "bit offset is not an integer or out of range"
BIT_VALUE_ERROR = "bit is not an integer or out of range"

# LCS bounds (Redis caps the table at proto-max-bulk-len bytes instead). The
# table is computed bit-parallel (one Python big-int row per byte of the first
# string), so cells are cheap; the Python-level loops run len(a) + len(b) times.
LCS_MAX_CELLS = 10**8
LCS_MAX_LENGTH = 200_000
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
        buf = bytearray(old)
        if byte >= len(buf):
            buf.extend(bytes(byte + 1 - len(buf)))
        shift = 7 - (self.offset & 7)
        previous = (buf[byte] >> shift) & 1
        if self.bit:
            buf[byte] |= 1 << shift
        else:
            buf[byte] &= ~(1 << shift) & 0xFF
        # Like Redis, the key is written (created if absent) even when no bit changes.
        store.put(self.key, bytes(buf), now, expires_at=None, keep_ttl=True)
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
        if start < 0:
            start = max(0, total + start)
        if end < 0:
            end = max(0, total + end)
        end = min(end, total - 1)
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
    bit_mode = False
    if len(args) == 4:
        unit = upper(args[3])
        if unit == b"BIT":
            bit_mode = True
        elif unit != b"BYTE":
            raise CommandSyntaxError(SYNTAX)
    return BitCount(args[0], start, end, bit_mode)


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
    a: bytes, b: bytes, *, want_string: bool, minmatchlen: int, withmatchlen: bool
) -> tuple[int, bytes, list[list[Any]]]:
    """The LCS length, string and match ranges, walked back exactly as Redis does.

    Ranges (``[[a_start, a_end], [b_start, b_end](, length)]``) come last match
    first, as Redis emits them; the string and ranges are only computed when
    ``want_string`` (LEN alone needs neither).
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return 0, b"", []
    if n * m > LCS_MAX_CELLS or n + m > LCS_MAX_LENGTH:
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
    ) -> None:
        super().__init__(keys)
        self.get_len = get_len
        self.get_idx = get_idx
        self.minmatchlen = minmatchlen
        self.withmatchlen = withmatchlen

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        a, b = (v or b"" for v in super().combine(results, positions, committed))
        length, string, ranges = lcs(
            a,
            b,
            want_string=self.get_idx or not self.get_len,
            minmatchlen=self.minmatchlen,
            withmatchlen=self.withmatchlen,
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
