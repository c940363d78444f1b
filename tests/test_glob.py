"""Redis glob matching: the semantics of Redis's stringmatchlen, on bytes."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmemo.commands.glob import glob_match, is_match_all

# Fixed examples, no example database, no timing-based failures: the same
# run every time, however loaded the machine.
DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _reference_match(pattern: bytes, subject: bytes, nocase: bool) -> bool:
    """Redis's ``stringmatchlen`` walked step by step, as the oracle.

    It follows the C control flow (pattern and subject cursors, the bracket
    loop's test order, the unterminated '[' stepping back) rather than the
    tokenizer under test. Two differences from the C code, both the ones the
    module documents: an empty subject matches a pattern of stars only
    (redis/redis#15643), and there is no nesting limit.
    """
    if not subject:
        return all(byte == ord("*") for byte in pattern)

    def lower(byte: int) -> int:
        return byte + 32 if ord("A") <= byte <= ord("Z") else byte

    def same(a: int, b: int) -> bool:
        return lower(a) == lower(b) if nocase else a == b

    skip_longer = False
    plen, slen = len(pattern), len(subject)

    def walk(p: int, s: int) -> bool:
        nonlocal skip_longer
        while p < plen and s < slen:
            byte = pattern[p]
            if byte == ord("*"):
                while p + 1 < plen and pattern[p + 1] == ord("*"):
                    p += 1
                if p == plen - 1:
                    return True
                while s < slen:
                    if walk(p + 1, s):
                        return True
                    if skip_longer:
                        return False
                    s += 1
                skip_longer = True
                return False
            if byte == ord("?"):
                pass
            elif byte == ord("["):
                p += 1
                negate = p < plen and pattern[p] == ord("^")
                if negate:
                    p += 1
                matched = False
                while True:
                    if p < plen and pattern[p] == ord("\\") and plen - p >= 2:
                        p += 1
                        if pattern[p] == subject[s]:
                            matched = True
                    elif p < plen and pattern[p] == ord("]"):
                        break
                    elif p >= plen:
                        p -= 1
                        break
                    elif plen - p >= 3 and pattern[p + 1] == ord("-"):
                        start, end = sorted((pattern[p], pattern[p + 2]))
                        c = subject[s]
                        if nocase:
                            start, end, c = lower(start), lower(end), lower(c)
                        p += 2
                        if start <= c <= end:
                            matched = True
                    elif same(pattern[p], subject[s]):
                        matched = True
                    p += 1
                if matched == negate:
                    return False
            else:
                if byte == ord("\\") and plen - p >= 2:
                    p += 1
                if not same(pattern[p], subject[s]):
                    return False
            s += 1
            p += 1
            if s == slen:
                while p < plen and pattern[p] == ord("*"):
                    p += 1
                break
        return p == plen and s == slen

    return walk(0, 0)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        # The examples of the Redis KEYS documentation.
        (b"h?llo", b"hello", True),
        (b"h?llo", b"hallo", True),
        (b"h?llo", b"hxllo", True),
        (b"h?llo", b"hllo", False),
        (b"h*llo", b"hllo", True),
        (b"h*llo", b"heeeello", True),
        (b"h*llo", b"hello!", False),
        (b"h[ae]llo", b"hello", True),
        (b"h[ae]llo", b"hallo", True),
        (b"h[ae]llo", b"hillo", False),
        (b"h[^e]llo", b"hallo", True),
        (b"h[^e]llo", b"hbllo", True),
        (b"h[^e]llo", b"hello", False),
        (b"h[a-b]llo", b"hallo", True),
        (b"h[a-b]llo", b"hbllo", True),
        (b"h[a-b]llo", b"hcllo", False),
        # Escapes, outside and inside brackets.
        (b"h\\*llo", b"h*llo", True),
        (b"h\\*llo", b"hello", False),
        (b"h\\?llo", b"h?llo", True),
        (b"h\\?llo", b"hello", False),
        (b"\\[a]", b"[a]", True),
        (b"\\[a]", b"a", False),
        (b"a\\\\b", b"a\\b", True),
        (b"[\\]]", b"]", True),
        (b"[\\^a]", b"^", True),
        (b"[\\-a]", b"-", True),
        (b"[a\\-c]", b"b", False),  # an escaped '-' makes no range
        (b"\\", b"\\", True),  # a trailing backslash is a literal
        (b"a\\", b"a\\", True),
        (b"[\\", b"\\", True),  # ... inside an unterminated bracket too
        # Stars.
        (b"*", b"anything", True),
        (b"*", b"", True),  # deliberate: Redis says no (redis/redis#15643)
        (b"**", b"", True),
        (b"", b"", True),
        (b"", b"a", False),
        (b"?", b"", False),
        (b"a*", b"a", True),
        (b"*a", b"a", True),
        (b"*a", b"ba", True),
        (b"*a", b"ab", False),
        (b"a**b", b"ab", True),
        (b"a*b*c", b"aXbYc", True),
        (b"a*b*c", b"abcab", False),
        (b"*ab*ab", b"abab", True),
        (b"user:*:name", b"user:42:name", True),
        (b"user:*:name", b"user:42:names", False),
        # Ranges: reversed ranges work, bounds are bytes.
        (b"[z-a]", b"m", True),
        (b"[z-a]", b"A", False),
        (b"[0-9][0-9]", b"42", True),
        (b"[0-9]", b"x", False),
        (b"[a-]", b"_", True),  # Redis reads "a-]" as the range ']'..'a' ...
        (b"[a-]", b"-", False),  # ... and the bracket as unterminated
        (b"[]a]", b"]", False),  # ']' first closes an empty set: then "a]" follows
        (b"[]a]", b"a]", False),
        (b"x[]a]", b"xa]", False),
        (b"[!a]", b"!", True),  # '!' is not negation in Redis, only '^' is
        (b"[^]", b"x", True),  # a negated empty set is any byte
        (b"[]", b"x", False),  # an empty set is no byte
        # An unterminated '[' takes the rest of the pattern as its set.
        (b"a[bc", b"ab", True),
        (b"a[bc", b"ac", True),
        (b"a[bc", b"abc", False),
        (b"a[bc", b"a[", False),
        (b"foo[", b"foo", False),
        (b"foo[", b"foo[", False),
        (b"a[^", b"ax", True),
        (b"a[b-", b"a-", True),
        (b"a[*", b"a*", True),  # a star inside brackets is a literal
        (b"a[*", b"abc", False),
        # Bytes, not text: any byte matches itself or a wildcard.
        (b"\xff*", b"\xff\x00\n", True),
        (b"?", b"\n", True),
        (b"[\x00-\x7f]", b"\x80", False),
    ],
)
def test_glob_matches_as_redis_stringmatchlen(
    pattern: bytes, subject: bytes, expected: bool
) -> None:
    assert glob_match(pattern, subject) is expected
    assert _reference_match(pattern, subject, nocase=False) is expected


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        (b"HELLO", b"hello", True),
        (b"h?LLO", b"HeLlO", True),
        (b"h[A-Z]llo", b"hello", True),
        (b"h[a-z]llo", b"HELLO", True),
        (b"h[E]llo", b"hello", True),
        (b"h[^E]llo", b"hello", False),
        (b"\\A", b"a", True),  # an escape outside brackets folds case ...
        (b"[\\A]", b"a", False),  # ... inside brackets it does not, as in Redis
        (b"[Z-a]", b"m", False),  # bounds lowered after ordering: z..a is empty
        (b"[\xc0]", b"\xe0", False),  # only ASCII letters fold
    ],
)
def test_nocase_folds_ascii_case_as_redis_does(
    pattern: bytes, subject: bytes, expected: bool
) -> None:
    assert glob_match(pattern, subject, nocase=True) is expected
    assert _reference_match(pattern, subject, nocase=True) is expected


def test_case_matters_without_nocase() -> None:
    assert not glob_match(b"HELLO", b"hello")
    assert glob_match(b"[Z-a]", b"_")  # the plain range Z..a holds '_'


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [
        (b"*a*a*a*a*a*a*a*a*a*b", b"a" * 50),
        (b"*a*a*a*a*a*a*a*a*a*b", b"a" * 20_000),
        (b"*a" * 200 + b"*b", b"a" * 5_000),
        (b"*?" * 100 + b"b", b"a" * 5_000),
        (b"*[ab]*[^c]*a*a*a*a*a*a*a*a*c", b"ab" * 5_000),
    ],
)
def test_patterns_that_were_exponential_in_redis_return_quickly(
    pattern: bytes, subject: bytes
) -> None:
    started = time.perf_counter()
    assert not glob_match(pattern, subject)
    assert time.perf_counter() - started < 1.0  # backtracking would take ages


def test_is_match_all_is_true_only_for_a_single_star() -> None:
    assert is_match_all(b"*")
    assert not is_match_all(b"**")
    assert not is_match_all(b"\\*")
    assert not is_match_all(b"")
    assert not is_match_all(b"a*")


# Patterns built mostly from the bytes the syntax cares about; subjects from
# the bytes of their pattern (so that matches are common), a few others, and
# the case-swapped letters.
_SYNTAX = st.sampled_from(list(b"*?[]^-\\aAbz")) | st.integers(0, 255)


@st.composite
def _pattern_and_subject(draw: st.DrawFn) -> tuple[bytes, bytes]:
    pattern = bytes(draw(st.lists(_SYNTAX, max_size=10)))
    alphabet = sorted(set(pattern) | set(pattern.swapcase()) | set(b"aB]"))
    subject = bytes(draw(st.lists(st.sampled_from(alphabet), max_size=7)))
    return pattern, subject


@settings(DETERMINISTIC, max_examples=300)
@given(case=_pattern_and_subject(), nocase=st.booleans())
def test_glob_agrees_with_the_reference_redis_walk(case: tuple[bytes, bytes], nocase: bool) -> None:
    pattern, subject = case
    assert glob_match(pattern, subject, nocase=nocase) is _reference_match(pattern, subject, nocase)


@DETERMINISTIC
@given(pattern=st.binary(max_size=40), subject=st.binary(max_size=40), nocase=st.booleans())
def test_arbitrary_pattern_bytes_never_raise(pattern: bytes, subject: bytes, nocase: bool) -> None:
    assert glob_match(pattern, subject, nocase=nocase) in (True, False)


_PLAIN = st.binary(max_size=20).filter(lambda p: not any(b in p for b in b"*?[\\"))


@DETERMINISTIC
@given(pattern=_PLAIN, subject=st.binary(max_size=20))
def test_a_pattern_without_special_bytes_matches_only_itself(
    pattern: bytes, subject: bytes
) -> None:
    assert glob_match(pattern, pattern)
    assert glob_match(pattern, subject) is (pattern == subject)
    assert glob_match(pattern, subject, nocase=True) is (pattern.lower() == subject.lower())


@DETERMINISTIC
@given(subject=st.binary(max_size=20), other=st.binary(max_size=20))
def test_escaping_every_byte_matches_exactly_that_subject(subject: bytes, other: bytes) -> None:
    pattern = b"".join(b"\\" + bytes([byte]) for byte in subject)
    assert glob_match(pattern, subject)
    assert glob_match(pattern, other) is (other == subject)
