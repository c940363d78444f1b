"""GETBIT, SETBIT, BITCOUNT, LCS and RANDOMKEY against the embedded store."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import kvmemo
import kvmemo.commands.bits  # registers the commands
from kvmemo.commands.bits import lcs
from kvmemo.errors import KVMemoError


@pytest.fixture
async def kv(autojump_clock: trio.testing.MockClock) -> AsyncIterator[kvmemo.Store]:
    async with kvmemo.open_store(shards=4, maxmemory="64MiB") as store:
        yield store


async def error_of(kv: kvmemo.Store, *call: Any) -> KVMemoError:
    with pytest.raises(KVMemoError) as info:
        await kv.execute(*call)
    return info.value


# -- GETBIT / SETBIT ---------------------------------------------------------------------


async def test_setbit_getbit_basics(kv: kvmemo.Store) -> None:
    assert await kv.execute("getbit", "k", "0") == 0
    assert await kv.execute("exists", "k") == 0
    assert await kv.execute("setbit", "k", "7", "1") == 0
    assert await kv.execute("get", "k") == b"\x01"
    assert await kv.execute("getbit", "k", "7") == 1
    assert await kv.execute("getbit", "k", "6") == 0
    assert await kv.execute("getbit", "k", "100") == 0  # past the end
    assert await kv.execute("setbit", "k", "7", "1") == 1
    assert await kv.execute("setbit", "k", "7", "0") == 1
    assert await kv.execute("get", "k") == b"\x00"
    assert await kv.execute("setbit", "k", "0", "1") == 0
    assert await kv.execute("get", "k") == b"\x80"


async def test_setbit_grows_with_zero_bytes(kv: kvmemo.Store) -> None:
    await kv.execute("set", "k", "a")  # 0x61
    assert await kv.execute("setbit", "k", "33", "1") == 0
    assert await kv.execute("get", "k") == b"a\x00\x00\x00\x40"
    assert await kv.execute("getbit", "k", "1") == 1  # 0x61 = 0110 0001
    assert await kv.execute("getbit", "k", "2") == 1
    assert await kv.execute("getbit", "k", "0") == 0


async def test_setbit_zero_on_missing_key_creates_it(kv: kvmemo.Store) -> None:
    assert await kv.execute("setbit", "k", "17", "0") == 0
    assert await kv.execute("get", "k") == b"\x00\x00\x00"


async def test_setbit_keeps_ttl(kv: kvmemo.Store) -> None:
    await kv.execute("set", "k", "x", "EX", "100")
    await kv.execute("setbit", "k", "40", "1")
    assert await kv.execute("ttl", "k") == 100


@pytest.mark.parametrize("offset", ["-1", "4294967296", "x", "1.5", "", "01"])
async def test_bit_offset_errors(kv: kvmemo.Store, offset: str) -> None:
    for call in (("getbit", "k", offset), ("setbit", "k", offset, "1")):
        err = await error_of(kv, *call)
        assert err.kind == "NOT_INTEGER"
        assert err.message == "bit offset is not an integer or out of range"


async def test_bit_offset_max(kv: kvmemo.Store) -> None:
    assert await kv.execute("getbit", "k", "4294967295") == 0


@pytest.mark.parametrize("bit", ["2", "-1", "x", "", "1.0"])
async def test_setbit_value_errors(kv: kvmemo.Store, bit: str) -> None:
    err = await error_of(kv, "setbit", "k", "0", bit)
    assert err.kind == "NOT_INTEGER"
    assert err.message == "bit is not an integer or out of range"
    assert await kv.execute("exists", "k") == 0


async def test_setbit_offset_checked_before_value(kv: kvmemo.Store) -> None:
    err = await error_of(kv, "setbit", "k", "-1", "5")
    assert err.message == "bit offset is not an integer or out of range"


async def test_setbit_respects_max_value_size(autojump_clock: trio.testing.MockClock) -> None:
    async with kvmemo.open_store(shards=2, max_value_size=16) as kv:
        assert await kv.execute("setbit", "k", str(16 * 8 - 1), "1") == 0  # 16 bytes: fits
        err = await error_of(kv, "setbit", "k", str(16 * 8), "1")
        assert err.kind == "TOO_LARGE"
        assert await kv.execute("strlen", "k") == 16
        assert await kv.execute("setbit", "k", "0", "1") == 0  # inside: fine


@pytest.mark.parametrize(
    "call",
    [("getbit", "k"), ("getbit", "k", "1", "2"), ("setbit", "k", "1"), ("bitcount",)],
)
async def test_arity(kv: kvmemo.Store, call: tuple[str, ...]) -> None:
    assert (await error_of(kv, *call)).kind == "ARITY"


# -- BITCOUNT ------------------------------------------------------------------------------


async def test_bitcount_whole(kv: kvmemo.Store) -> None:
    assert await kv.execute("bitcount", "k") == 0
    await kv.execute("set", "k", "foobar")
    assert await kv.execute("bitcount", "k") == 26


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # Redis's documentation examples ("foobar").
        (("0", "0"), 4),
        (("1", "1"), 6),
        (("1", "1", "BYTE"), 6),
        (("5", "30", "BIT"), 17),
        (("5", "30", "bit"), 17),
        # Negative indexes, as GETRANGE.
        (("-1", "-1"), 4),  # 'r' = 0x72
        (("-2", "-1"), 7),
        (("0", "-1"), 26),
        (("-100", "100"), 26),
        (("2", "1"), 0),
        (("-1", "-2"), 0),
        (("100", "200"), 0),
        (("6", "6"), 0),
        # Redis's quirk: both ends before the start clamp to index 0.
        (("-100", "-50"), 4),
        # BIT mode.
        (("0", "-1", "BIT"), 26),
        (("-1", "-1", "BIT"), 0),  # last bit of 'r' (0111 0010)
        (("-2", "-2", "BIT"), 1),
        (("0", "7", "BIT"), 4),
        (("1", "2", "BIT"), 2),  # 'f' = 0110 0110
        (("3", "3", "BIT"), 0),
        (("7", "9", "BIT"), 1),  # 0 | 01 ('o' = 0110 1111)
        (("47", "1000", "BIT"), 0),
        (("40", "1000", "BIT"), 4),
    ],
)
async def test_bitcount_ranges(kv: kvmemo.Store, args: tuple[str, ...], expected: int) -> None:
    await kv.execute("set", "k", "foobar")
    assert await kv.execute("bitcount", "k", *args) == expected


async def test_bitcount_matches_bitwise_reference(kv: kvmemo.Store) -> None:
    rng = random.Random(7)
    value = bytes(rng.randrange(256) for _ in range(9))
    await kv.execute("set", "k", value)
    bits = "".join(f"{c:08b}" for c in value)
    total = len(bits)
    for _ in range(200):
        start, end = rng.randrange(-80, 80), rng.randrange(-80, 80)
        if start < 0 and end < 0 and start > end:
            expected = 0
        else:
            s = max(0, total + start) if start < 0 else start
            e = min(max(0, total + end) if end < 0 else end, total - 1)
            expected = bits[s : e + 1].count("1") if s <= e else 0
        got = await kv.execute("bitcount", "k", str(start), str(end), "BIT")
        assert got == expected, (start, end)


async def test_bitcount_empty_value(kv: kvmemo.Store) -> None:
    await kv.execute("set", "k", "")
    assert await kv.execute("bitcount", "k", "0", "-1") == 0
    assert await kv.execute("bitcount", "k", "0", "-1", "BIT") == 0


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (("0",), "SYNTAX"),
        (("0", "1", "BITS"), "SYNTAX"),
        (("0", "1", "BIT", "x"), "SYNTAX"),
        (("a", "1"), "NOT_INTEGER"),
        (("0", "1.5"), "NOT_INTEGER"),
    ],
)
async def test_bitcount_errors_even_on_missing_key(
    kv: kvmemo.Store, args: tuple[str, ...], kind: str
) -> None:
    assert (await error_of(kv, "bitcount", "nokey", *args)).kind == kind


# -- LCS -------------------------------------------------------------------------------------


def redis_lcs(a: bytes, b: bytes, minmatchlen: int = 0, withmatchlen: bool = False) -> Any:
    """A direct port of Redis's lcsCommand (t_string.c): (len, string, ranges)."""
    n, m = len(a), len(b)
    t = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if a[i - 1] == b[j - 1]:
                t[i][j] = t[i - 1][j - 1] + 1
            else:
                t[i][j] = max(t[i - 1][j], t[i][j - 1])
    idx = t[n][m]
    out = bytearray(idx)
    ranges: list[Any] = []
    a_start, a_end, b_start, b_end = n, 0, 0, 0
    i, j = n, m
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
            i -= 1
            j -= 1
        else:
            if t[i - 1][j] > t[i][j - 1]:
                i -= 1
            else:
                j -= 1
            if a_start != n:
                emit = True
        match_len = a_end - a_start + 1
        if emit:
            if minmatchlen == 0 or match_len >= minmatchlen:
                entry: list[Any] = [[a_start, a_end], [b_start, b_end]]
                if withmatchlen:
                    entry.append(match_len)
                ranges.append(entry)
            a_start = n
    return t[n][m], bytes(out), ranges


async def test_lcs_documentation_example(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "key1", "ohmytext", "key2", "mynewtext")
    assert await kv.execute("lcs", "key1", "key2") == b"mytext"
    assert await kv.execute("lcs", "key1", "key2", "LEN") == 6
    assert await kv.execute("lcs", "key1", "key2", "idx") == [
        b"matches",
        [[[4, 7], [5, 8]], [[2, 3], [0, 1]]],
        b"len",
        6,
    ]
    assert await kv.execute("lcs", "key1", "key2", "IDX", "MINMATCHLEN", "4") == [
        b"matches",
        [[[4, 7], [5, 8]]],
        b"len",
        6,
    ]
    assert await kv.execute("lcs", "key1", "key2", "IDX", "MINMATCHLEN", "4", "WITHMATCHLEN") == [
        b"matches",
        [[[4, 7], [5, 8], 4]],
        b"len",
        6,
    ]


async def test_lcs_missing_keys_are_empty(kv: kvmemo.Store) -> None:
    await kv.execute("set", "{t}a", "hello")
    assert await kv.execute("lcs", "{t}a", "nokey") == b""
    assert await kv.execute("lcs", "nokey", "{t}a", "LEN") == 0
    assert await kv.execute("lcs", "x1", "x2", "IDX") == [b"matches", [], b"len", 0]
    assert await kv.execute("lcs", "{t}a", "{t}a") == b"hello"


async def test_lcs_negative_minmatchlen_is_zero(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "a", "abcab", "b", "xabyab")
    expected = await kv.execute("lcs", "a", "b", "IDX")
    assert await kv.execute("lcs", "a", "b", "IDX", "MINMATCHLEN", "-5") == expected


@pytest.mark.parametrize(
    ("opts", "kind"),
    [
        (("LEN", "IDX"), "SYNTAX"),
        (("FOO",), "SYNTAX"),
        (("MINMATCHLEN",), "SYNTAX"),
        (("MINMATCHLEN", "x"), "NOT_INTEGER"),
    ],
)
async def test_lcs_errors(kv: kvmemo.Store, opts: tuple[str, ...], kind: str) -> None:
    assert (await error_of(kv, "lcs", "a", "b", *opts)).kind == kind


async def test_lcs_len_and_idx_message(kv: kvmemo.Store) -> None:
    err = await error_of(kv, "lcs", "a", "b", "IDX", "LEN")
    assert err.message == "If you want both the length and indexes, please just use IDX."


async def test_lcs_arity(kv: kvmemo.Store) -> None:
    assert (await error_of(kv, "lcs", "a")).kind == "ARITY"


async def test_lcs_too_large(kv: kvmemo.Store) -> None:
    await kv.execute("mset", "a", "x" * 20_000, "b", "y" * 20_000)
    err = await error_of(kv, "lcs", "a", "b", "LEN")
    assert err.kind == "TOO_LARGE"
    assert err.message == "LCS input too large"


async def test_lcs_bigger_input(kv: kvmemo.Store) -> None:
    rng = random.Random(3)
    a = bytes(rng.choice(b"ACGT") for _ in range(3000))
    b = bytes(rng.choice(b"ACGT") for _ in range(2500))
    await kv.execute("mset", "a", a, "b", b)
    string = await kv.execute("lcs", "a", "b")
    length = await kv.execute("lcs", "a", "b", "LEN")
    assert len(string) == length > 1500
    it = iter(a)
    assert all(c in it for c in string)  # a subsequence of a
    it = iter(b)
    assert all(c in it for c in string)


@pytest.mark.parametrize("seed", range(300))
def test_lcs_matches_redis_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"ab" if seed % 3 == 0 else b"abcd" if seed % 3 == 1 else bytes(range(256))
    a = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    b = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    minmatch = rng.choice([0, 0, 1, 2, 3])
    withlen = rng.random() < 0.5
    expected = redis_lcs(a, b, minmatch, withlen)
    got = lcs(a, b, want_string=True, minmatchlen=minmatch, withmatchlen=withlen)
    assert got == expected
    assert lcs(a, b, want_string=False, minmatchlen=0, withmatchlen=False)[0] == expected[0]


# -- RANDOMKEY ---------------------------------------------------------------------------------


async def test_randomkey_empty(kv: kvmemo.Store) -> None:
    assert await kv.execute("randomkey") is None


async def test_randomkey_returns_live_keys(kv: kvmemo.Store) -> None:
    keys = {f"k{i}".encode() for i in range(20)}
    await kv.execute("mset", *[x for k in sorted(keys) for x in (k, b"v")])
    seen = {await kv.execute("randomkey") for _ in range(300)}
    assert seen <= keys
    assert len(seen) >= 15  # every shard and most keys come up


async def test_randomkey_skips_expired(
    kv: kvmemo.Store, autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(30):
        await kv.execute("set", f"gone{i}", "v", "PX", "10")
    await kv.execute("set", "stay", "v")
    await trio.sleep(0.1)
    for _ in range(50):
        assert await kv.execute("randomkey") == b"stay"
    for i in range(30):
        await kv.execute("set", f"gone{i}", "v", "PX", "10")
    await trio.sleep(0.1)
    await kv.execute("del", "stay")
    assert await kv.execute("randomkey") is None


async def test_randomkey_mixed_ttls(
    kv: kvmemo.Store, autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(10):
        await kv.execute("set", f"t{i}", "v", "EX", "1000")
        await kv.execute("set", f"p{i}", "v")
    seen = {await kv.execute("randomkey") for _ in range(300)}
    assert len(seen) >= 15


async def test_randomkey_arity(kv: kvmemo.Store) -> None:
    assert (await error_of(kv, "randomkey", "x")).kind == "ARITY"


async def test_commands_are_registered_as_1_1() -> None:
    from kvmemo.commands.table import COMMANDS

    for name in ("getbit", "setbit", "bitcount", "lcs", "randomkey"):
        assert COMMANDS[name].since == "1.1"
    assert "write" in COMMANDS["setbit"].flags
    assert COMMANDS["lcs"].keys_of([b"a", b"b", b"LEN"]) == [b"a", b"b"]
