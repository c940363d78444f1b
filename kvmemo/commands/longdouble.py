"""INCRBYFLOAT's numbers as Redis computes them: x87 ``long double``, exactly.

Redis reads INCRBYFLOAT's operands with ``strtold``, adds them in ``long
double`` and writes the sum with ``"%.17Lf"`` (trailing zeros dropped;
``ld2string``'s ``LD_STR_HUMAN``). On x86-64, where Redis is built for the
servers people run, ``long double`` is the 80-bit extended format: a 64-bit
significand, normal exponents down to -16382, subnormals down to 2**-16445,
largest finite value (2**64 - 1) * 2**16320 (about 1.19e4932). Python has no
such type, so this module computes with exact rationals
(:class:`fractions.Fraction`) and rounds them to that format the way the FPU
does (to nearest, ties to even): ``10.5 + 0.1`` then gives Redis's ``10.6``,
``10.6 - 5000`` its ``-4989.39999999999999991`` and ``0.1 + 0.2`` its ``0.3``,
which a Python ``float`` does not.

What ``string2ld`` accepts is emulated too: glibc's ``strtold`` grammar in
the C locale (decimal, hexadecimal with an optional binary exponent,
``inf``/``infinity``), the whole argument consumed (a NUL byte included), no
leading space, no NaN, no overflow, and no underflow
to zero. ``inf`` itself is a valid operand: the sum is then infinite, which
INCRBYFLOAT refuses with its own error, as Redis does. :func:`parse_double`
reads the same grammar as Redis's ``string2d`` (``strtod``: the range of a
``double``, rounded once), for the settings Redis reads that way.

Costs: parsing and formatting are linear in the number's digits (at most
:data:`MAX_CHARS`), so a few microseconds for everyday values and a
fraction of a millisecond at the extremes of the range.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Final

from ..errors import NotIntegerError

LongDouble = Fraction | float
"""A finite value as an exact :class:`Fraction`, or ``float('inf')`` / ``float('-inf')``."""

SIGNIFICAND_BITS: Final = 64
MIN_QUANTUM_EXP: Final = -16445  # the smallest subnormal is 2**-16445
MAX_EXP: Final = 16383  # the largest finite value is below 2**16384
LARGEST: Final = Fraction((1 << SIGNIFICAND_BITS) - 1) * (1 << (MAX_EXP - SIGNIFICAND_BITS + 1))
MAX_CHARS: Final = 5 * 1024  # Redis's MAX_LONG_DOUBLE_CHARS: longer arguments are refused
FORMAT_DIGITS: Final = 17  # "%.17Lf"

NOT_A_FLOAT: Final = "value is not a valid float"
NAN_OR_INFINITY: Final = "increment would produce NaN or Infinity"

_DECIMAL = re.compile(rb"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?")
_HEX = re.compile(rb"([+-]?)0[xX]([0-9a-fA-F]*)(?:\.([0-9a-fA-F]*))?(?:[pP]([+-]?[0-9]+))?")
_INFINITY = re.compile(rb"([+-]?)(?:inf|infinity)", re.IGNORECASE)

_INF = float("inf")

# Python refuses int <-> decimal string conversions past 4300 digits (a guard
# against quadratic work); a long double has up to 4933 integer digits and
# an argument up to MAX_CHARS, so longer ones are converted in chunks.
_CHUNK: Final = 4000
_CHUNK_POWER: Final = 10**_CHUNK  # computed once: ~20 µs each time otherwise


def _int_of(digits: bytes) -> int:
    """A string of decimal digits as an int, whatever its length."""
    n = 0
    for i in range(0, len(digits), _CHUNK):
        chunk = digits[i : i + _CHUNK]
        n = n * 10 ** len(chunk) + int(chunk)
    return n


def _exponent_of(exp: bytes) -> int:
    """An exponent field (optional sign, decimal digits, possibly thousands of them) as an int."""
    if exp[:1] in (b"+", b"-"):
        magnitude = _int_of(exp[1:])
        return -magnitude if exp[:1] == b"-" else magnitude
    return _int_of(exp)


def _digits_of(n: int) -> str:
    """A non-negative int in decimal, whatever its length."""
    if n < _CHUNK_POWER:
        return str(n)
    high, low = divmod(n, _CHUNK_POWER)
    return _digits_of(high) + str(low).zfill(_CHUNK)


def round_to_long_double(value: Fraction) -> LongDouble:
    """``value`` rounded to the nearest 80-bit ``long double`` (ties to even).

    Returns ``±inf`` when the rounded magnitude is past :data:`LARGEST`, and
    ``Fraction(0)`` when it is below half the smallest subnormal.
    """
    num, den = value.numerator, value.denominator
    if num == 0:
        return Fraction(0)
    negative = num < 0
    num = -num if negative else num
    # k = floor(log2(num / den)).
    k = num.bit_length() - den.bit_length()
    if (num < den << k) if k >= 0 else (num << -k < den):
        k -= 1
    q = max(k - (SIGNIFICAND_BITS - 1), MIN_QUANTUM_EXP)  # the exponent of one ulp
    n, d = (num, den << q) if q >= 0 else (num << -q, den)
    m, r = divmod(n, d)
    if 2 * r > d or (2 * r == d and m & 1):
        m += 1
    rounded = Fraction(m << q) if q >= 0 else Fraction(m, 1 << -q)
    if rounded > LARGEST:
        return -_INF if negative else _INF
    return -rounded if negative else rounded


def _decimal(sign: bytes, whole: bytes, frac: bytes, exp: bytes) -> Fraction | None:
    """The exact value of a decimal literal; None when ``strtold`` over- or underflows."""
    digits = (whole + frac).lstrip(b"0")
    if not digits:
        return Fraction(0)
    exponent = _exponent_of(exp or b"0") - len(frac)
    magnitude = len(digits) - 1 + exponent  # floor(log10(value))
    if magnitude > 4933 or magnitude < -4952:  # past LARGEST, or under half a subnormal
        return None
    mantissa = _int_of(digits)
    value = (
        Fraction(mantissa * 10**exponent) if exponent >= 0 else Fraction(mantissa, 10**-exponent)
    )
    return -value if sign == b"-" else value


def _hexadecimal(sign: bytes, whole: bytes, frac: bytes, exp: bytes) -> Fraction | None:
    """The exact value of a hexadecimal literal; None when ``strtold`` over- or underflows."""
    digits = (whole + frac).lstrip(b"0")
    if not digits:
        return Fraction(0)
    mantissa = int(digits, 16)
    exponent = _exponent_of(exp or b"0") - 4 * len(frac)
    magnitude = mantissa.bit_length() - 1 + exponent  # floor(log2(value))
    if magnitude > MAX_EXP or magnitude < MIN_QUANTUM_EXP - 2:
        return None
    value = Fraction(mantissa << exponent) if exponent >= 0 else Fraction(mantissa, 1 << -exponent)
    return -value if sign == b"-" else value


def parse_long_double(raw: bytes) -> LongDouble:
    """An operand as Redis's ``string2ld`` reads it (see the module docstring).

    Raises:
        NotIntegerError: ``value is not a valid float`` for anything
            ``string2ld`` refuses: empty, too long, a leading space, not all
            consumed, NaN, out of range or rounded to zero from non-zero.
    """
    if not raw or len(raw) >= MAX_CHARS:
        raise NotIntegerError(NOT_A_FLOAT)
    text = raw  # all of it must be read: a NUL byte is not (Redis checks eptr - buf == slen)
    if text[:1].isspace():  # C isspace: space, \t, \n, \v, \f, \r
        raise NotIntegerError(NOT_A_FLOAT)
    value: Fraction | None
    match = _DECIMAL.fullmatch(text)
    if match is not None and (match[2] or match[3]):
        value = _decimal(match[1], match[2], match[3] or b"", match[4] or b"")
    elif (match := _HEX.fullmatch(text)) is not None and (match[2] or match[3]):
        value = _hexadecimal(match[1], match[2], match[3] or b"", match[4] or b"")
    elif (match := _INFINITY.fullmatch(text)) is not None:
        return -_INF if match[1] == b"-" else _INF
    else:
        raise NotIntegerError(NOT_A_FLOAT)
    if value is None:
        raise NotIntegerError(NOT_A_FLOAT)
    rounded = round_to_long_double(value)
    if isinstance(rounded, float) or (rounded == 0 and value != 0):
        raise NotIntegerError(NOT_A_FLOAT)  # strtold's ERANGE: overflow, or underflow to zero
    return rounded


def parse_double(raw: bytes) -> float:
    """An argument as Redis's ``string2d`` reads it: ``strtod``'s grammar (that of
    :func:`parse_long_double`), the exact value rounded once to a ``double``.

    As ``string2d``: no leading space, all of it consumed, no NaN, no
    overflow and no underflow to zero (a subnormal is kept); ``inf`` is a
    value. Redis 7 reads ``latency-tracking-info-percentiles`` so.

    Raises:
        NotIntegerError: ``value is not a valid float`` for anything
            ``string2d`` refuses.
    """
    if not raw or raw[:1].isspace():
        raise NotIntegerError(NOT_A_FLOAT)
    value: Fraction | None
    match = _DECIMAL.fullmatch(raw)
    if match is not None and (match[2] or match[3]):
        value = _decimal(match[1], match[2], match[3] or b"", match[4] or b"")
    elif (match := _HEX.fullmatch(raw)) is not None and (match[2] or match[3]):
        value = _hexadecimal(match[1], match[2], match[3] or b"", match[4] or b"")
    elif (match := _INFINITY.fullmatch(raw)) is not None:
        return -_INF if match[1] == b"-" else _INF
    else:
        raise NotIntegerError(NOT_A_FLOAT)
    if value is None:  # far past a long double's range, so past a double's too
        raise NotIntegerError(NOT_A_FLOAT)
    try:
        rounded = float(value)  # correctly rounded, ties to even, as strtod
    except OverflowError:
        raise NotIntegerError(NOT_A_FLOAT) from None
    if rounded == 0 and value != 0:
        raise NotIntegerError(NOT_A_FLOAT)  # strtod's ERANGE: underflow to zero
    if rounded == 0 and raw[:1] == b"-":
        return -0.0  # strtod keeps the sign of a zero
    return rounded


def add(a: LongDouble, b: LongDouble) -> Fraction:
    """``a + b`` in ``long double``: the exact sum, rounded once (an infinity stays one).

    Raises:
        NotIntegerError: ``increment would produce NaN or Infinity``, when
            the sum is infinite (an operand was, or it overflowed) or NaN.
    """
    if isinstance(a, float) or isinstance(b, float):
        raise NotIntegerError(NAN_OR_INFINITY)
    total = round_to_long_double(a + b)
    if isinstance(total, float):
        raise NotIntegerError(NAN_OR_INFINITY)
    return total


def format_human(value: Fraction) -> bytes:
    """``value`` as ``ld2string(..., LD_STR_HUMAN)`` writes it.

    ``"%.17Lf"`` (the exact binary value rounded to 17 decimals, ties to
    even, as glibc's printf), trailing zeros and a trailing point removed,
    and ``"-0"`` written ``"0"``.
    """
    negative = value < 0
    scaled = abs(value) * 10**FORMAT_DIGITS
    n, r = divmod(scaled.numerator, scaled.denominator)
    if 2 * r > scaled.denominator or (2 * r == scaled.denominator and n & 1):
        n += 1
    whole, frac = divmod(n, 10**FORMAT_DIGITS)
    sign = "-" if negative else ""
    text = f"{sign}{_digits_of(whole)}.{frac:0{FORMAT_DIGITS}d}".rstrip("0").rstrip(".")
    return b"0" if text == "-0" else text.encode("ascii")
