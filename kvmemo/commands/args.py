"""Argument parsing shared by the commands, with Redis's exact rules and wording."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import attrs

from ..errors import ArityError, CommandSyntaxError, NotIntegerError

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# Redis refuses expiry arguments whose millisecond form would overflow.
MAX_EXPIRE_MS = INT64_MAX // 2


def parse_int(raw: bytes, *, what: str = "value") -> int:
    """Parse a signed 64-bit integer exactly as Redis's ``string2ll`` does.

    No sign but ``-``, no spaces, no leading zeros, at most 20 characters.

    Raises:
        NotIntegerError: anything else, or out of the 64-bit range.
    """
    n = len(raw)
    if 0 < n <= 20:
        start = 1 if raw[0:1] == b"-" else 0
        digits = raw[start:]
        if digits.isdigit() and digits.isascii() and (digits[0:1] != b"0" or digits == b"0"):
            if not (start and digits == b"0"):
                value = int(raw)
                if INT64_MIN <= value <= INT64_MAX:
                    return value
    raise NotIntegerError(f"{what} is not an integer or out of range")


def parse_count(raw: bytes) -> int:
    """A non-negative integer argument such as SCAN's COUNT."""
    value = parse_int(raw)
    if value < 0:
        raise NotIntegerError("value is out of range, must be positive")
    return value


def arity_ok(arity: int, total: int) -> bool:
    """Whether ``total`` words (the command's name counted) meet Redis ``arity``:
    exactly ``arity`` if it is positive, else at least ``-arity``."""
    return total == arity if arity > 0 else total >= -arity


class ExpiryMode(enum.Enum):
    """How an expiry argument was given."""

    NONE = "none"  # no expiry option: the key loses any TTL (SET) or keeps it (GETEX)
    RELATIVE = "relative"  # EX/PX: seconds from now
    ABSOLUTE = "absolute"  # EXAT/PXAT: trio-monotonic deadline, converted at the edge
    KEEP = "keep"  # SET ... KEEPTTL
    PERSIST = "persist"  # GETEX ... PERSIST


@attrs.frozen
class Expiry:
    """A parsed expiry option; ``value`` in seconds (relative) or monotonic time (absolute)."""

    mode: ExpiryMode = ExpiryMode.NONE
    value: float = 0.0

    def deadline(self, now: float) -> float | None:
        """The monotonic deadline this option sets, or None for no expiry."""
        if self.mode is ExpiryMode.RELATIVE:
            return now + self.value
        if self.mode is ExpiryMode.ABSOLUTE:
            return self.value
        return None


NO_EXPIRY = Expiry()


class Clock:
    """Converts wall-clock (Unix) times to the monotonic time the store uses.

    Created at the edge: the offset is read once per command, so a command's
    absolute times are all converted consistently (STYLE.md rule 9).
    """

    __slots__ = ("mono_now", "wall_now")

    def __init__(self, mono_now: float, wall_now: float) -> None:
        self.mono_now = mono_now
        self.wall_now = wall_now

    def to_monotonic(self, unix_seconds: float) -> float:
        return unix_seconds - self.wall_now + self.mono_now

    def to_unix(self, monotonic: float) -> float:
        return monotonic - self.mono_now + self.wall_now


def parse_expire_value(raw: bytes, unit_ms: bool, command: str) -> int:
    """An EX/PX/EXAT/PXAT argument: a positive integer, in range."""
    value = parse_int(raw)
    limit = MAX_EXPIRE_MS if unit_ms else MAX_EXPIRE_MS // 1000
    if value <= 0 or value > limit:
        raise CommandSyntaxError(f"invalid expire time in '{command}' command")
    return value


class ClockSource(Protocol):
    """Where a parser gets its :class:`Clock` (read only when needed)."""

    @property
    def clock(self) -> Clock: ...


def expiry_option(opt: bytes, raw: bytes, source: ClockSource, command: str) -> Expiry:
    """Build an :class:`Expiry` from one of EX, PX, EXAT, PXAT and its argument.

    Only EXAT and PXAT read ``source.clock``.
    """
    if opt == b"EX":
        return Expiry(ExpiryMode.RELATIVE, parse_expire_value(raw, False, command))
    if opt == b"PX":
        return Expiry(ExpiryMode.RELATIVE, parse_expire_value(raw, True, command) / 1000)
    if opt == b"EXAT":
        unix = parse_expire_value(raw, False, command)
        return Expiry(ExpiryMode.ABSOLUTE, source.clock.to_monotonic(unix))
    unix_ms = parse_expire_value(raw, True, command)
    return Expiry(ExpiryMode.ABSOLUTE, source.clock.to_monotonic(unix_ms / 1000))


def upper(arg: bytes) -> bytes:
    """An option keyword, case-insensitively."""
    return arg.upper()


def pairs(args: Sequence[bytes], name: str) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of MSET-like commands; an odd count is an arity error."""
    if not args or len(args) % 2:
        raise ArityError(f"wrong number of arguments for '{name}' command")
    return list(zip(args[0::2], args[1::2], strict=True))


SYNTAX = "syntax error"
