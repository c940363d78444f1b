"""Redis glob patterns (``KEYS``, ``SCAN ... MATCH``) on bytes.

Design
------
Problem: match keys against Redis glob patterns with exactly the semantics of
Redis's ``stringmatchlen`` (``src/util.c``): ``*`` (any run of bytes), ``?``
(one byte), ``[abc]``, ``[^abc]``, ranges ``[a-z]`` (a reversed range ``[z-a]``
means ``[a-z]``), ``\\x`` escaping any byte (inside brackets too), and an
unterminated ``[`` that takes the rest of the pattern as its set. A pattern is
matched against every key of a shard, so matching must be fast, must never
raise whatever bytes a client sends, and must never be exponential (Redis once
was: ``*a*a*a*a*a*a*a*a*a*b`` against a long run of ``a``).

Approach: compile each pattern once (``functools.lru_cache``, bounded) to a
``re`` bytes pattern, then ``fullmatch``. Compilation first parses the pattern
into tokens the way ``stringmatchlen`` walks it: ``*``, or a *byte set* (the
set of subject bytes that one position accepts, computed by running Redis's
own per-byte test, case folding and all, over the 256 byte values). Every
non-``*`` token consumes exactly one byte, so the pattern is
``S0 * S1 * ... * Sk`` with fixed-length segments ``Si``. Matching the middle
segments at their *earliest* possible position is always safe (what follows
starts with ``*``, which absorbs any gap), so each ``*Si`` becomes the atomic
group ``(?>.*?Si)``, which never backtracks into an earlier star: matching is
O(len(subject) * len(pattern)). This is the same insight as Redis's
``skipLongerMatches`` fix. The regex is built only from ``\\xHH`` escapes and
fixed syntax, so no pattern byte can make it invalid.

Deliberate differences from Redis, both on inputs of no practical use:

- ``*`` (and ``**``...) matches the empty subject. Redis's loop never runs for
  an empty subject, so ``stringmatchlen("*", "")`` is 0; that is a known Redis
  bug (redis/redis#15643) and its ``KEYS *``/``SCAN`` fast paths hide it.
- Redis gives up (no match) past 1000 nested ``*``; here there is no limit.

Case folding (``nocase``) is ASCII only, like C's ``tolower`` in the "C"
locale. As in Redis, an escaped byte inside brackets is compared case
sensitively even with ``nocase``, and a range's bounds are lowered *after*
being put in order (so ``[Z-a]`` with ``nocase`` matches nothing).

Constants: ``_CACHE_SIZE = 256`` compiled patterns (a client scanning with many
distinct patterns only costs recompilation).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Final

__all__ = ["compile_glob", "glob_match", "is_match_all"]

_CACHE_SIZE: Final = 256  # compiled patterns kept, per (pattern, nocase)

_STAR: Final = b"*"[0]
_QUESTION: Final = b"?"[0]
_OPEN: Final = b"["[0]
_CLOSE: Final = b"]"[0]
_CARET: Final = b"^"[0]
_DASH: Final = b"-"[0]
_BACKSLASH: Final = b"\\"[0]

_ALL_BYTES: Final = frozenset(range(256))

# A token is None for "*", or the set of subject bytes one position accepts.
_Token = frozenset[int] | None


def _lower(byte: int) -> int:
    """ASCII ``tolower``: the only case folding Redis does (C locale)."""
    return byte + 32 if 65 <= byte <= 90 else byte


def _equal_set(byte: int, nocase: bool) -> frozenset[int]:
    """The subject bytes equal to ``byte`` (case-insensitively when ``nocase``)."""
    low = _lower(byte)
    if nocase and 97 <= low <= 122:  # an ASCII letter: both cases
        return frozenset((low, low - 32))
    return frozenset((byte,))


def _range_set(first: int, last: int, nocase: bool) -> frozenset[int]:
    """The subject bytes inside the range ``first-last``, as Redis tests them."""
    start, end = min(first, last), max(first, last)
    if not nocase:
        return frozenset(range(start, end + 1))
    # Redis lowers the bounds after ordering them, and lowers the subject byte.
    start, end = _lower(start), _lower(end)
    return frozenset(b for b in range(256) if start <= _lower(b) <= end)


def _tokenize(pattern: bytes, nocase: bool) -> list[_Token]:
    """Parse ``pattern`` as ``stringmatchlen`` walks it; consecutive stars fold into one."""
    tokens: list[_Token] = []
    n = len(pattern)
    i = 0
    while i < n:
        byte = pattern[i]
        if byte == _STAR:
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
            i += 1
        elif byte == _QUESTION:
            tokens.append(_ALL_BYTES)
            i += 1
        elif byte == _OPEN:
            i += 1
            negate = i < n and pattern[i] == _CARET
            if negate:
                i += 1
            accepted: set[int] = set()
            # Redis's test order: escape, ']', end of pattern, range, literal.
            while i < n:
                byte = pattern[i]
                if byte == _BACKSLASH and n - i >= 2:
                    accepted.add(pattern[i + 1])  # case-sensitive, as in Redis
                    i += 2
                elif byte == _CLOSE:
                    i += 1
                    break
                elif n - i >= 3 and pattern[i + 1] == _DASH:
                    accepted |= _range_set(byte, pattern[i + 2], nocase)
                    i += 3
                else:
                    accepted |= _equal_set(byte, nocase)
                    i += 1
            # Falling out of the loop at i == n is the unterminated '[': the
            # rest of the pattern was the set, as in Redis.
            tokens.append(_ALL_BYTES - accepted if negate else frozenset(accepted))
        elif byte == _BACKSLASH and n - i >= 2:
            tokens.append(_equal_set(pattern[i + 1], nocase))
            i += 2
        else:  # a literal, or a lone trailing backslash (a literal too)
            tokens.append(_equal_set(byte, nocase))
            i += 1
    return tokens


def _byte_class(accepted: frozenset[int]) -> bytes:
    """A regex atom matching exactly one byte of ``accepted``."""
    if len(accepted) == 256:
        return b"."  # with re.DOTALL
    if not accepted:
        return b"(?!)"  # an empty set can match nothing
    if len(accepted) == 1:
        return b"\\x%02x" % next(iter(accepted))
    parts: list[bytes] = []
    ordered = sorted(accepted)
    run_start = previous = ordered[0]
    for byte in [*ordered[1:], -1]:
        if byte != previous + 1:
            if run_start == previous:
                parts.append(b"\\x%02x" % run_start)
            else:
                parts.append(b"\\x%02x-\\x%02x" % (run_start, previous))
            run_start = byte
        previous = byte
    return b"[" + b"".join(parts) + b"]"


def _to_regex(tokens: list[_Token]) -> bytes:
    """Translate tokens to a regex for ``fullmatch`` that never backtracks into a star."""
    atoms: list[list[bytes]] = [[]]  # the atoms of each star-free segment
    for token in tokens:
        if token is None:
            atoms.append([])
        else:
            atoms[-1].append(_byte_class(token))
    segments = [b"".join(segment) for segment in atoms]
    if len(segments) == 1:
        return segments[0]
    first, *middle, last = segments
    parts = [first]
    parts.extend(b"(?>.*?" + segment + b")" for segment in middle if segment)
    parts.append(b".*" + last)
    return b"".join(parts)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(pattern: bytes, nocase: bool) -> Callable[[bytes], re.Match[bytes] | None]:
    regex = _to_regex(_tokenize(pattern, nocase))
    return re.compile(regex, re.DOTALL).fullmatch


def compile_glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A matcher of the Redis glob ``pattern``, compiled now and outside the cache.

    For a caller that keeps many patterns for long (pub/sub's PSUBSCRIBE):
    the shared cache holds :data:`_CACHE_SIZE` patterns, and matching more
    than that in turn would recompile every one on every use.
    """
    fullmatch = re.compile(_to_regex(_tokenize(pattern, False)), re.DOTALL).fullmatch

    def matches(subject: bytes) -> bool:
        return fullmatch(subject) is not None

    return matches


def glob_match(pattern: bytes, subject: bytes, *, nocase: bool = False) -> bool:
    """Tell whether ``subject`` matches the Redis glob ``pattern``.

    Semantics are Redis's ``stringmatchlen`` (see the module docstring for
    the two deliberate differences). Never raises for any pattern bytes, and
    runs in O(len(pattern) * len(subject)) time once the pattern is compiled
    (compiled patterns are cached).

    Args:
        pattern: the glob, e.g. ``b"user:*"``, ``b"h[^e]llo"``, ``b"a\\*b"``.
        subject: the bytes to test, typically a key.
        nocase: fold ASCII case, as ``stringmatchlen(..., nocase=1)``.

    Returns:
        True if the whole of ``subject`` matches ``pattern``.
    """
    return _compile(pattern, nocase)(subject) is not None


def is_match_all(pattern: bytes) -> bool:
    """Tell whether ``pattern`` is ``b"*"``, which callers skip matching for.

    Like Redis's ``KEYS``/``SCAN`` fast path, only the exact pattern ``b"*"``
    counts; ``b"**"`` also matches everything but goes through matching.
    """
    return pattern == b"*"
