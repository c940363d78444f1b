"""DUMP and RESTORE: Redis's payload format, both ways, and RESTORE's semantics.

- The codec (:mod:`kvmemo.commands.dump`) synchronously: CRC-64, payloads
  captured from Debian's ``redis-server`` 7.0.15 (kept here as hex, so these
  run without it), LZF, malformed, flipped and truncated payloads, declared
  lengths that must not allocate.
- RESTORE through the embedded store: round trips, BUSYKEY / REPLACE, TTLs
  (relative, ABSTTL, in the past), Redis's order of checks, FREQ, memory
  accounting, a transaction, a restart with ``data_dir``.
- The Redis port in-process: binary payloads over RESP.
- Against a real ``redis-server`` (started on a free loopback port, skipped
  when the binary is missing): its payloads of every string encoding restore
  in KVMemo, KVMemo's restore in Redis, and malformed RESTOREs get Redis's
  answers.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.exceptions
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmemo
from kvmemo.commands.dump import (
    BAD_FORMAT,
    BAD_FREQ,
    BAD_IDLETIME,
    BAD_PAYLOAD,
    BAD_TTL,
    BUSYKEY,
    RDB_VERSION,
    BadFormat,
    RdbReader,
    crc64,
    dump_payload,
    encode_length,
    load_payload,
    lzf_decompress,
)
from kvmemo.commands.table import COMMANDS
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.errors import BusyKeyError, CommandSyntaxError, KVMemoError
from kvmemo.server.resp import NEED_DATA, ErrorReply, RespReplyParser, encode_command
from kvmemo.server.resp_server import serve_resp

TIMEOUT = 30  # seconds per test that runs a store or a server
MAX = 1 << 30  # a max_value_size no test value reaches


def seal(body: bytes, version: int = RDB_VERSION) -> bytes:
    """``body`` with a version and a correct CRC: a payload whose checksum holds."""
    head = body + version.to_bytes(2, "little")
    return head + crc64(head).to_bytes(8, "little")


def syntax_error(payload: bytes, max_size: int = MAX) -> str:
    """The message of the error ``load_payload`` raises (failing the test if it does not)."""
    with pytest.raises(CommandSyntaxError) as caught:
        load_payload(payload, max_size)
    return caught.value.message


# -- the codec ---------------------------------------------------------------------------

# value -> its DUMP payload from redis-server 7.0.15 (Debian), hex.
REDIS_PAYLOADS: dict[bytes, str] = {
    b"": "00000a005d9b5c400f7fa2da",
    b"0": "00c0000a009840a778f8500308",
    b"-128": "00c0800a009966326d2f0c5bd9",
    b"128": "00c180000a00eb7ab3b510cf4b65",
    b"-32768": "00c100800a00b540064753bb1ace",
    b"32768": "00c2008000000a0045d82eedd5bda910",
    b"-2147483648": "00c2000000800a00c74f873e33558187",
    b"2147483648": "000a323134373438333634380a00e7b129a34c1d76ee",
    b"-0": "00022d300a00d5411fd9d6d050cc",
    b"007": "00033030370a007258e27b4c69bad9",
    b"a" * 20: "001461616161616161616161616161616161616161610a0083b46b5e1b11acf1",
    b"-9223372036854775808": "00142d393232333337323033363835343737353830380a00ede2b956eb709e81",
    # LZF: a run (overlapping reference, extended length), a repeated phrase,
    # a reference 256 bytes back.
    b"a" * 21: "00c30615016161e00a000a00fd0cb36807413f68",
    b"a" * 100: "00c3094064016161e057000161610a00e8a3b507b06df271",
    b"hello world, " * 4: "00c315340d68656c6c6f20776f726c642c2068e01b0c012c200a0096ecbccf869c652f",
    bytes(range(256)) * 2: "00c341104200"
    + "".join(f"1f{bytes(range(i, i + 32)).hex()}" for i in range(0, 256, 32))
    + "0000e0f4ff01feff0a00084dd41d67e5d330",
}
REDIS_COMPRESSES = 20  # bytes; Redis tries LZF on longer values


def _reference_crc64(data: bytes) -> int:
    """Redis's crc64 bit by bit from its definition (reflected Jones polynomial)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x95AC9329AC4BC9B5 if crc & 1 else crc >> 1
    return crc


def test_crc64_is_redis_crc64_jones() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    assert crc64(b"") == 0
    rng = random.Random(64)
    for size in (1, 7, 8, 9, 63, 1000):
        data = rng.randbytes(size)
        assert crc64(data) == _reference_crc64(data)
        assert crc64(memoryview(data)) == _reference_crc64(data)
    data = bytes(range(256)) * 3 + b"tail"
    assert crc64(data[100:], crc64(data[:100])) == crc64(data)  # continues


@pytest.mark.parametrize("value", sorted(REDIS_PAYLOADS), ids=lambda v: repr(v[:12]))
def test_redis_payloads_restore_to_their_values(value: bytes) -> None:
    assert load_payload(bytes.fromhex(REDIS_PAYLOADS[value]), MAX) == value


@pytest.mark.parametrize(
    "value", sorted(v for v in REDIS_PAYLOADS if len(v) <= REDIS_COMPRESSES), ids=repr
)
def test_dump_is_byte_for_byte_redis_where_redis_does_not_compress(value: bytes) -> None:
    assert dump_payload(value).hex() == REDIS_PAYLOADS[value]


integer_texts = st.integers(-(1 << 64), 1 << 64).map(lambda n: str(n).encode())
long_values = st.integers(0, 1 << 32).map(lambda seed: random.Random(seed).randbytes(20_000))


@settings(max_examples=300)
@given(value=st.one_of(st.binary(max_size=300), integer_texts, long_values))
def test_any_value_round_trips(value: bytes) -> None:
    payload = dump_payload(value)
    assert payload[-10:-8] == b"\x0a\x00"  # RDB version 10, little-endian
    assert load_payload(payload, MAX) == value


def test_lzf_decodes_literals_and_overlapping_references_within_bounds() -> None:
    # "ab", then 5 bytes from 2 back (overlapping: a run), then "c".
    assert lzf_decompress(b"\x01ab\x60\x01\x00c", 8) == b"abababac"
    # Extended length: ctrl 0xe0 (7) + 3 + 2 = 12 bytes from 1 back.
    assert lzf_decompress(b"\x00x\xe0\x03\x00", 13) == b"x" * 13
    for data, out_len in [
        (b"", 0),  # empty input
        (b"\x01a", 2),  # literal run past the input
        (b"\x00a\x20", 4),  # reference without its offset byte
        (b"\x00a\xe0", 9),  # extended reference cut short
        (b"\x00a\x20\x05", 4),  # reference before the start of the output
        (b"\x00a\x20\x00", 3),  # more output than declared
        (b"\x02abc", 2),  # literal run past the declared length
        (b"\x00a\x20\x00", 5),  # less output than declared
    ]:
        with pytest.raises(BadFormat):
            lzf_decompress(data, out_len)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(b"", BAD_PAYLOAD, id="empty"),
        pytest.param(b"\x00" * 9, BAD_PAYLOAD, id="shorter-than-the-footer"),
        pytest.param(seal(b"\x00\x03abc", 11), BAD_PAYLOAD, id="version-11"),
        pytest.param(seal(b"\x00\x03abc")[:-1] + b"\x00", BAD_PAYLOAD, id="wrong-crc"),
        pytest.param(b"\x00\x03abc\x0a\x00" + bytes(8), BAD_PAYLOAD, id="zero-crc"),
        pytest.param(seal(b""), BAD_FORMAT, id="no-object"),
        pytest.param(seal(b"\x05\x03abc"), BAD_FORMAT, id="zset-type"),
        pytest.param(seal(b"\xc8\x03abc"), BAD_FORMAT, id="unknown-type"),
        pytest.param(seal(b"\x00\xc4\x01"), BAD_FORMAT, id="unknown-string-encoding"),
        pytest.param(seal(b"\x00\x82\x00"), BAD_FORMAT, id="unknown-length-encoding"),
        pytest.param(seal(b"\x00\xc0"), BAD_FORMAT, id="int8-cut-short"),
        pytest.param(seal(b"\x00\x04abc"), BAD_FORMAT, id="length-past-the-end"),
        pytest.param(seal(b"\x00\x03abcd"), BAD_FORMAT, id="bytes-after-the-value"),
        pytest.param(seal(b"\x00\xc3\x02\x05\x00a"), BAD_FORMAT, id="lzf-short-output"),
        pytest.param(seal(b"\x00\xc3\x00\x00"), BAD_FORMAT, id="lzf-empty-input"),
    ],
)
def test_malformed_payloads_get_redis_errors(payload: bytes, message: str) -> None:
    assert syntax_error(payload) == message


@pytest.mark.parametrize(
    ("body", "value"),
    [
        pytest.param(b"\x00\x03abc", b"abc", id="6-bit"),
        pytest.param(b"\x00\x40\x03abc", b"abc", id="14-bit-not-shortest"),
        pytest.param(b"\x00\x80\x00\x00\x00\x03abc", b"abc", id="32-bit"),
        pytest.param(b"\x00\x81" + (3).to_bytes(8, "big") + b"abc", b"abc", id="64-bit"),
        pytest.param(b"\x00\xc2\x01\x00\x00\x80", b"-2147483647", id="int32"),
        pytest.param(b"\x00\xc1\xff\xff", b"-1", id="int16-not-shortest"),
    ],
)
def test_every_length_form_redis_loads_is_accepted(body: bytes, value: bytes) -> None:
    assert load_payload(seal(body), MAX) == value
    assert load_payload(seal(body, 9), MAX) == value  # an older RDB version is fine


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(b"\x00\x81" + (1 << 62).to_bytes(8, "big") + b"abc", BAD_FORMAT, id="plain"),
        pytest.param(
            b"\x00\xc3\x02\x81" + (1 << 62).to_bytes(8, "big") + b"\x00a", "TOO_LARGE", id="lzf"
        ),
        pytest.param(
            b"\x00\xc3\x81" + (1 << 62).to_bytes(8, "big") + b"\x05\x00a", BAD_FORMAT, id="clen"
        ),
        pytest.param(b"\x00\xc3\x02\x44\x00\x00a", "TOO_LARGE", id="lzf-over-max-value-size"),
    ],
)
def test_a_huge_declared_length_allocates_nothing(body: bytes, error: str) -> None:
    payload = seal(body)
    tracemalloc.start()
    try:
        with pytest.raises(KVMemoError) as caught:
            load_payload(payload, 1000)  # max_value_size 1000; 0x400 = 1024 is over it
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    exc = caught.value
    assert (exc.kind if error == "TOO_LARGE" else exc.message) == error


corpus = st.one_of(
    st.sampled_from([bytes.fromhex(p) for p in REDIS_PAYLOADS.values()]),
    st.binary(max_size=200).map(dump_payload),
)


@settings(max_examples=400)
@given(payload=corpus, data=st.data())
def test_flipped_or_truncated_payloads_always_get_the_checksum_error(
    payload: bytes, data: st.DataObject
) -> None:
    """A CRC-64 catches any burst of up to 64 bits: no flip or cut ever loads."""
    if data.draw(st.booleans(), label="flip"):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        mask = data.draw(st.integers(1, 255), label="mask")
        broken = payload[:at] + bytes((payload[at] ^ mask,)) + payload[at + 1 :]
    else:
        broken = payload[: data.draw(st.integers(0, len(payload) - 1), label="cut")]
    assert syntax_error(broken) == BAD_PAYLOAD


# -- the embedded store ----------------------------------------------------------------


async def failure(call: Any) -> KVMemoError:
    """The error an awaited call raises (failing the test if it succeeds)."""
    try:
        result = await call
    except KVMemoError as exc:
        return exc
    raise AssertionError(f"expected an error, got {result!r}")


async def test_restore_of_a_dump_round_trips_values_and_ttls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    values = [b"", b"0", b"-129", b"4294967296", b"\x00\xff" * 40, "h\u00e9".encode(), b"x" * 5000]
    async with kvmemo.open_store(shards=4) as kv:
        for i, value in enumerate(values):
            await kv.set(f"src{i}", value, px=60_000 if i % 2 else None)
            payload = await kv.dump(f"src{i}")
            assert payload is not None
            assert await kv.restore(f"dst{i}", 0, payload) == "OK"
            assert await kv.get(f"dst{i}") == value
            assert await kv.pttl(f"dst{i}") == -1  # TTL 0: none, whatever the source had
        assert await kv.dump("nosuch") is None
        await kv.set("short", "v", px=100)
        autojump_clock.jump(0.2)
        assert await kv.dump("short") is None  # expired: never returned


async def test_busykey_without_replace_and_replace_overwrites_value_and_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    payload = dump_payload(b"new")
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("k", "old", ex=100)
        exc = await failure(kv.restore("k", 0, payload))
        assert isinstance(exc, BusyKeyError)
        assert (exc.kind, exc.message) == ("SYNTAX", BUSYKEY)
        assert (await kv.get("k"), await kv.ttl("k")) == (b"old", 100)
        assert await kv.restore("k", 0, payload, replace=True) == "OK"
        assert (await kv.get("k"), await kv.ttl("k")) == (b"new", -1)
        assert await kv.restore("k", 5000, payload, replace=True) == "OK"
        assert await kv.pttl("k") == 5000
        autojump_clock.jump(5.001)
        assert await kv.get("k") is None
        # An expired key is no obstacle.
        assert await kv.restore("k", 0, payload) == "OK"


async def test_absttl_sets_a_unix_deadline_and_one_in_the_past_creates_nothing() -> None:
    payload = dump_payload(b"v")
    now_ms = int(time.time() * 1000)
    async with kvmemo.open_store(shards=2) as kv:
        assert await kv.restore("a", now_ms + 100_000, payload, absttl=True) == "OK"
        assert abs(await kv.pexpiretime("a") - (now_ms + 100_000)) <= 2  # ms rounding, twice
        # Past: OK, nothing created (as Redis: verified against redis-server below).
        assert await kv.restore("b", now_ms - 1000, payload, absttl=True) == "OK"
        assert await kv.exists("b") == 0
        # Past, over a live key: BUSYKEY first; with REPLACE the key is deleted.
        await kv.set("c", "old")
        assert isinstance(await failure(kv.restore("c", 1, payload, absttl=True)), BusyKeyError)
        assert await kv.restore("c", 1, payload, absttl=True, replace=True) == "OK"
        assert await kv.exists("c") == 0
        assert await kv.restore("d", 0, payload, absttl=True) == "OK"  # 0: no expiry
        assert await kv.pttl("d") == -1


async def test_checks_run_in_redis_order_and_a_refused_restore_changes_nothing() -> None:
    good = dump_payload(b"v")
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("live", "old")
        cases: list[tuple[tuple[Any, ...], str, str]] = [
            # Options first, at parse time, even over a live key.
            (("live", 0, good, "BOGUS"), "SYNTAX", "syntax error"),
            (("live", 0, good, "IDLETIME", -1), "SYNTAX", BAD_IDLETIME),
            (
                ("live", 0, good, "IDLETIME", "x"),
                "NOT_INTEGER",
                "value is not an integer or out of range",
            ),
            (("live", 0, good, "FREQ", 256), "SYNTAX", BAD_FREQ),
            (("live", 0, good, "FREQ", 1, "IDLETIME", 1), "SYNTAX", "syntax error"),
            (("live", 0, good, "IDLETIME"), "SYNTAX", "syntax error"),
            # Then the key, before the TTL and the payload.
            (("live", "x", b"junk"), "SYNTAX", BUSYKEY),
            (("live", -1, b"junk"), "SYNTAX", BUSYKEY),
            # Then the TTL, then the payload.
            (("new", "x", b"junk"), "NOT_INTEGER", "value is not an integer or out of range"),
            (("new", -1, b"junk"), "SYNTAX", BAD_TTL),
            (("new", 0, b"junk"), "SYNTAX", BAD_PAYLOAD),
            (("new", 0, seal(b"\x05\x03abc")), "SYNTAX", BAD_FORMAT),
            (("live", 0, b"junk", "REPLACE"), "SYNTAX", BAD_PAYLOAD),
            (("new", 1 << 62, good), "SYNTAX", "invalid expire time in 'restore' command"),
        ]
        used = (await kv.info("memory"))["memory"]["used_memory"]
        for args, kind, message in cases:
            exc = await failure(kv.execute("RESTORE", *args))
            assert (exc.kind, exc.message) == (kind, message), args
        arity = await failure(kv.execute("RESTORE", "k", 0))
        assert arity.kind == "ARITY"
        assert await kv.keys("*") == [b"live"]
        assert await kv.get("live") == b"old"
        assert (await kv.info("memory"))["memory"]["used_memory"] == used


async def test_freq_sets_the_lfu_count_and_idletime_the_lru_idle_time() -> None:
    payload = dump_payload(b"v")
    async with kvmemo.open_store(shards=2, eviction_policy="allkeys-lfu") as kv:
        assert await kv.restore("f7", 0, payload, freq=7) == "OK"
        assert await kv.object_freq("f7") == 7
        assert await kv.restore("f0", 0, payload, freq=0) == "OK"
        assert await kv.object_freq("f0") == 0  # as Redis (a plain insert counts 1)
        assert await kv.restore("plain", 0, payload) == "OK"
        assert await kv.object_freq("plain") == 1
        for _ in range(5):
            await kv.get("plain")
        assert await kv.restore("plain", 0, payload, replace=True) == "OK"
        assert await kv.object_freq("plain") == 1  # a new object: the count starts again
        assert await kv.restore("idle", 0, payload, idletime=1000) == "OK"
        assert await kv.get("idle") == b"v"
    async with kvmemo.open_store(shards=2, eviction_policy="lru") as kv:
        assert await kv.restore("k", 0, payload, freq=9, replace=True) == "OK"  # ignored
        assert await kv.restore("j", 0, payload, idletime=50) == "OK"
        assert await kv.object_idletime("j") == 50  # as Redis: see commands.dump


async def test_restore_is_charged_to_the_memory_tracker_like_set() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        for value in (b"12", b"y" * 300):
            await kv.set("{t}set", value, px=90_000)
            assert await kv.restore("{t}rst", 90_000, dump_payload(value)) == "OK"
            assert await kv.memory_usage("{t}rst") == await kv.memory_usage("{t}set")
            await kv.delete("{t}set", "{t}rst")
        assert (await kv.info("memory"))["memory"]["used_memory"] == 0
    async with kvmemo.open_store(shards=1, maxmemory=4096, eviction_policy="noeviction") as kv:
        exc = await failure(kv.restore("big", 0, dump_payload(b"z" * 8000)))
        assert exc.kind == "OOM"
        assert await kv.exists("big") == 0
        assert (await kv.info("memory"))["memory"]["used_memory"] == 0


async def test_restore_and_dump_run_inside_a_transaction() -> None:
    payload = dump_payload(b"42")
    async with kvmemo.open_store(shards=4) as kv:
        results = await kv.transaction(
            ("restore", "{u}a", 0, payload),
            ("incr", "{u}a"),
            ("restore", "{u}a", 0, payload),
            ("dump", "{u}a"),
        )
        assert results[:2] == ["OK", 43]
        assert isinstance(results[2], BusyKeyError)
        assert results[3] == dump_payload(b"43")


async def test_restored_keys_and_ttls_survive_a_restart(tmp_path: Path) -> None:
    settings_: dict[str, Any] = {"shards": 3, "data_dir": str(tmp_path), "appendfsync": "always"}
    deadline_ms = int(time.time() * 1000) + 3_600_000
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(**settings_) as kv:
            await kv.set("gone", "x")
            assert await kv.restore("plain", 0, dump_payload(b"\x00binary\xff")) == "OK"
            assert await kv.restore("rel", 600_000, dump_payload(b"a" * 100)) == "OK"
            assert await kv.restore("abs", deadline_ms, dump_payload(b"7"), absttl=True) == "OK"
            # ABSTTL in the past over a key, with REPLACE: deleted, and that is logged too.
            assert (
                await kv.restore("gone", 1, dump_payload(b"y"), absttl=True, replace=True) == "OK"
            )
        async with kvmemo.open_store(**settings_) as kv:
            assert await kv.get("plain") == b"\x00binary\xff"
            assert await kv.pttl("plain") == -1
            assert await kv.get("rel") == b"a" * 100
            assert 590_000 < await kv.pttl("rel") <= 600_000
            assert await kv.get("abs") == b"7"
            assert abs(await kv.pexpiretime("abs") - deadline_ms) <= 2  # ms rounding, twice
            assert await kv.exists("gone") == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=corpus, data=st.data())
def test_corrupted_payloads_through_the_store_change_nothing(
    payload: bytes, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(payload) - 1), label="at")
    broken = payload[:at] + bytes((payload[at] ^ 0x40,)) + payload[at + 1 :]

    async def scenario() -> None:
        with trio.fail_after(TIMEOUT):
            async with kvmemo.open_store(shards=2) as kv:
                await kv.set("k", "keep", ex=100)
                used = (await kv.info("memory"))["memory"]["used_memory"]
                exc = await failure(kv.restore("k", 0, broken, replace=True))
                assert (exc.kind, exc.message) == ("SYNTAX", BAD_PAYLOAD)
                assert (await kv.get("k"), await kv.ttl("k")) == (b"keep", 100)
                assert (await kv.info("memory"))["memory"]["used_memory"] == used
                for actor in kv.actors():
                    assert (actor["state"], actor["restarts"]) == ("running", 0), actor

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_table_declares_them_as_redis_does() -> None:
    dump, restore = COMMANDS["dump"], COMMANDS["restore"]
    assert (dump.arity, dump.first_key, dump.last_key, dump.key_step) == (2, 1, 1, 1)
    assert (restore.arity, restore.first_key, restore.last_key, restore.key_step) == (-4, 1, 1, 1)
    assert "readonly" in dump.flags
    assert "write" in restore.flags
    assert dump.since == restore.since == "1.4"


# -- the Redis port, in process --------------------------------------------------------


@asynccontextmanager
async def resp_port(**config: Any) -> AsyncIterator[tuple[str, int]]:
    """A store plus its Redis port on 127.0.0.1, stopped at the end of the block."""
    async with trio.open_nursery() as nursery:
        engine = KVEngine(StoreConfig(**config))
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        host, port = await nursery.start(partial(serve_resp, engine, port=0))
        try:
            yield host, port
        finally:
            nursery.cancel_scope.cancel()


class RespClient:
    """A raw RESP client on a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = RespReplyParser()

    async def call(self, *args: bytes | str | int) -> object:
        await self.stream.send_all(encode_command(*args))
        while True:
            reply = self.parser.next_reply()
            if reply is not NEED_DATA:
                return reply
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.parser.feed(data)


async def test_the_redis_port_moves_binary_values_with_dump_and_restore() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port(shards=4) as (host, port):
            client = RespClient(await trio.open_tcp_stream(host, port))
            value = bytes(range(256)) * 3
            assert await client.call("SET", "src", value) == "OK"
            payload = await client.call("DUMP", "src")
            assert isinstance(payload, bytes)
            assert payload == dump_payload(value)
            assert await client.call("RESTORE", "dst", 0, payload) == "OK"
            assert await client.call("GET", "dst") == value
            assert await client.call("DUMP", "nosuch") is None
            redis_payload = bytes.fromhex(REDIS_PAYLOADS[b"a" * 100])
            assert await client.call("RESTORE", "lzf", "2000", redis_payload) == "OK"
            assert await client.call("GET", "lzf") == b"a" * 100
            pttl = await client.call("PTTL", "lzf")  # a real server: its clock runs meanwhile
            assert isinstance(pttl, int)
            assert 1000 < pttl <= 2000
            assert await client.call("RESTORE", "x", 0, b"junk") == ErrorReply(f"ERR {BAD_PAYLOAD}")
            await client.stream.aclose()


async def test_the_redis_port_answers_busykey_as_redis() -> None:
    with trio.fail_after(TIMEOUT):
        async with resp_port(shards=2) as (host, port):
            client = RespClient(await trio.open_tcp_stream(host, port))
            await client.call("SET", "k", "v")
            reply = await client.call("RESTORE", "k", 0, dump_payload(b"w"))
            await client.stream.aclose()
            assert reply == ErrorReply(f"BUSYKEY {BUSYKEY}")


# -- against a real redis-server -------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 20.0  # seconds for redis-server to accept connections
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A ``redis-server`` on a free loopback port, no persistence; stopped at the end."""
    assert REDIS_SERVER is not None
    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        ready = False
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # exited: the port was taken meanwhile
            if b"Ready to accept connections" in line:
                ready = True
                break
        if not ready:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            continue
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # never a full pipe
        drain.start()
        client = redis.Redis(port=port, socket_timeout=10)
        try:
            yield client
        finally:
            client.close()
            proc.terminate()
            try:
                proc.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drain.join(START_TIMEOUT)
            proc.stdout.close()
        return
    raise RuntimeError("redis-server did not start")


# Values and the encoding Redis 7.0 gives each in DUMP: (first byte of the value).
ENCODED = {
    b"7": 0xC0,  # int8
    b"-100": 0xC0,
    b"1000": 0xC1,  # int16
    b"-30000": 0xC1,
    b"100000": 0xC2,  # int32
    b"-2147483648": 0xC2,
    b"2147483648": 0x0A,  # past 32 bits: plain, length 10
    b"": 0x00,  # plain, length 0
    b"\x00\x01\xfe\xff binary": 0x0B,  # plain
    b"ab" * 400: 0xC3,  # LZF
    b"lorem ipsum dolor sit amet " * 2000: 0xC3,  # LZF, 54 KB
}


def redis_dumps(client: redis.Redis, values: list[bytes]) -> list[bytes]:
    """Redis's DUMP of each value (SET then DUMP)."""
    out = []
    for value in values:
        client.set("dump:src", value)
        payload = client.dump("dump:src")
        assert isinstance(payload, bytes)
        out.append(payload)
    return out


@needs_redis
async def test_payloads_from_redis_server_restore_in_kvmemo(redis_server: redis.Redis) -> None:
    rng = random.Random(7)
    values = [*ENCODED, bytes(rng.getrandbits(8) for _ in range(3000))]
    payloads = await trio.to_thread.run_sync(redis_dumps, redis_server, values)
    for value, payload in zip(ENCODED, payloads, strict=False):
        assert payload[1] == ENCODED[value], value[:20]
    async with kvmemo.open_store(shards=4) as kv:
        for i, (value, payload) in enumerate(zip(values, payloads, strict=True)):
            assert await kv.restore(f"k{i}", 0, payload) == "OK"
            assert await kv.get(f"k{i}") == value
            if len(value) <= REDIS_COMPRESSES or payload[1] != 0xC3:
                assert await kv.dump(f"k{i}") == payload  # the same bytes back


def redis_restores(client: redis.Redis, payloads: list[bytes]) -> list[tuple[Any, int]]:
    """RESTORE each payload (TTL 60 s) into Redis: each key's value and PTTL."""
    out = []
    for i, payload in enumerate(payloads):
        key = f"restore:{i}"
        client.delete(key)
        client.restore(key, 60_000, payload)
        out.append((client.get(key), client.pttl(key)))
    return out


@needs_redis
async def test_kvmemo_dumps_restore_in_redis_server(redis_server: redis.Redis) -> None:
    values = [*ENCODED, b"x" * 45, b"12345678901", b"-0", b"\xff" * 100_000]
    async with kvmemo.open_store(shards=4) as kv:
        payloads = []
        for i, value in enumerate(values):
            await kv.set(f"k{i}", value)
            payload = await kv.dump(f"k{i}")
            assert payload is not None
            payloads.append(payload)
    restored = await trio.to_thread.run_sync(redis_restores, redis_server, payloads)
    for value, (got, pttl) in zip(values, restored, strict=True):
        assert got == value
        assert 59_000 < pttl <= 60_000


def redis_outcome(client: redis.Redis, args: tuple[Any, ...]) -> tuple[str, Any]:
    """What Redis answers to ``RESTORE *args`` then GET of the key: ("ok", value) or an error."""
    try:
        client.execute_command("RESTORE", *args)  # type: ignore[no-untyped-call]
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if text.startswith("BUSYKEY "):
            return "busykey", text.removeprefix("BUSYKEY ")
        return "error", text
    kind = client.type(args[0])
    if kind not in (b"string", b"none"):
        return "other type", kind  # a payload of another type (KVMemo holds strings only)
    return "ok", (client.get(args[0]), client.pttl(args[0]) > 0)


async def kvmemo_outcome(kv: kvmemo.Store, args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        await kv.execute("RESTORE", *args)
    except BusyKeyError as exc:
        return "busykey", exc.message
    except KVMemoError as exc:
        return "error", exc.message
    return "ok", (await kv.get(args[0]), await kv.pttl(args[0]) > 0)


@needs_redis
async def test_restore_answers_as_redis_server(redis_server: redis.Redis) -> None:
    good = dump_payload(b"v")
    now_ms = int(time.time() * 1000)
    calls: list[tuple[Any, ...]] = [
        ("live", 0, good),
        ("live", "x", b"junk"),
        ("live", 0, good, "BOGUS"),
        ("live", 0, good, "idletime", -1),
        ("live", 0, good, "FREQ", 300),
        ("live", 0, good, "FREQ", 1, "IDLETIME", 1),
        ("live", 0, good, "IDLETIME", 1, "idletime", 2, "replace"),
        ("new", "x", good),
        ("new", -5, good),
        ("new", 0, b"junk"),
        ("new", 0, seal(b"\x00\x03abc", 11)),
        ("new", 0, seal(b"\x00\x03abc", 9)),
        ("new2", 0, seal(b"\xc8\x03abc")),
        ("new2", 0, seal(b"\x00\xc4\x01")),
        ("new2", 0, seal(b"\x00\x81" + (1 << 62).to_bytes(8, "big"))),
        ("past", now_ms - 5000, good, "ABSTTL"),
        ("live", now_ms - 5000, good, "ABSTTL"),
        ("live", now_ms - 5000, good, "ABSTTL", "REPLACE"),
        ("future", now_ms + 60_000, good, "ABSTTL"),
        ("ttl", 60_000, good),
        ("ttl0", 0, good, "ABSTTL"),
    ]

    def on_redis() -> list[tuple[str, Any]]:
        redis_server.flushall()
        redis_server.set("live", "old")
        return [redis_outcome(redis_server, args) for args in calls]

    expected = await trio.to_thread.run_sync(on_redis)
    async with kvmemo.open_store(shards=2) as kv:
        await kv.set("live", "old")
        got = [await kvmemo_outcome(kv, args) for args in calls]
    for args, want, have in zip(calls, expected, got, strict=True):
        assert have == want, args


body_mutations = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=3
)


def mutate(body: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(body)
    for at, byte in changes:
        out[at % len(out)] = byte
    return bytes(out if cut is None else out[: cut % (len(out) + 1)])


@needs_redis
@settings(max_examples=300, deadline=None)
@given(
    value=st.sampled_from(sorted(REDIS_PAYLOADS)),
    changes=body_mutations,
    cut=st.none() | st.integers(0, 1 << 16),
)
def test_a_body_with_a_good_checksum_never_restores_what_redis_would_not(
    redis_server: redis.Redis, value: bytes, changes: list[tuple[int, int]], cut: int | None
) -> None:
    """Bytes changed under a recomputed CRC exercise the parser itself.

    Wherever KVMemo restores a value, Redis restores the same one. Wherever
    it refuses, its reason is one of Redis's (or ``TOO_LARGE``), and where
    Redis, laxer, restores a string anyway, reading the payload as Redis does
    (the object may run on into the footer or stop before it) gives Redis's
    value and does not end where the footer begins: KVMemo's refusal is its
    strictness about the object's extent (or LZF of an empty string, which
    Redis never writes), never a different reading.
    """
    body = bytes.fromhex(REDIS_PAYLOADS[value])[:-10]
    payload = seal(mutate(body, changes, cut))
    refusal: KVMemoError | None = None
    try:
        mine: bytes | None = load_payload(payload, MAX)
    except KVMemoError as exc:
        refusal, mine = exc, None
    outcome = redis_outcome(redis_server, ("mutated", 0, payload, "REPLACE"))
    if refusal is None:
        assert outcome == ("ok", (mine, False))
        return
    assert refusal.kind == "TOO_LARGE" or refusal.message == BAD_FORMAT, refusal
    if outcome[0] == "error":
        assert outcome[1] == BAD_FORMAT
    elif outcome[0] == "ok":
        lax = RdbReader(memoryview(payload))  # the whole payload, footer included
        assert lax.take(1)[0] == 0
        try:
            assert lax.string(MAX) == outcome[1][0]
            assert lax.pos != len(payload) - 10
        except BadFormat:
            # LZF declaring 0 bytes: Redis's decompression fails, returning the
            # 0 bytes it was asked for, and Redis stores an empty string.
            lzf = RdbReader(memoryview(payload)[1:])
            assert lzf.length() == (3, True)
            lzf.length()
            assert lzf.length()[0] == 0  # Redis takes an "encoded" length's low 6 bits too
            assert outcome[1][0] == b""


# -- payloads that declare more than they carry (LZF) ----------------------------------------


def lzf_run(out_len: int) -> bytes:
    """LZF data of ``out_len`` bytes ``a``: a literal, then back references of 264 bytes
    (3 bytes of input each: about 88 times smaller than the value)."""
    data = bytearray(b"\x00a")
    left = out_len - 1
    while left >= 264:
        data += b"\xe0\xff\x00"  # length 7 + 255 + 2, distance 1
        left -= 264
    while left:
        n = min(left, 8)
        data += bytes((n - 1,)) + b"a" * n if n < 3 else bytes(((n - 2) << 5, 0))
        left -= n
    return bytes(data)


def lzf_payload(out_len: int, data: bytes | None = None) -> bytes:
    data = lzf_run(out_len) if data is None else data
    return seal(b"\x00\xc3" + encode_length(len(data)) + encode_length(out_len) + data)


async def test_a_payload_is_decompressed_only_when_its_value_has_room() -> None:
    """A 23 KB payload declaring a 2 MB value under a 1 MB limit: OOM, and the value is
    never built (it was, at parse time, before the limit was looked at)."""
    payload = lzf_payload(2_000_000)
    assert len(payload) < 25_000
    async with kvmemo.open_store(shards=1, maxmemory=1_000_000, eviction_policy="noeviction") as kv:
        tracemalloc.start()
        try:
            with pytest.raises(KVMemoError) as refused:
                await kv.restore("k", 0, payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert refused.value.kind == "OOM"
        assert peak < 1_000_000, peak  # the payload's copies, not the 2 MB value
        assert await kv.exists("k") == 0
        # With room, the same kind of payload restores its value.
        assert await kv.restore("k", 0, lzf_payload(100_000)) == "OK"
        assert await kv.get("k") == b"a" * 100_000


async def test_an_expired_restore_checks_its_compressed_payload_without_building_it() -> None:
    async with kvmemo.open_store(shards=1) as kv:
        await kv.set("k", "old")
        past = int(time.time() * 1000) - 10_000
        assert await kv.restore("k", past, lzf_payload(10_000), replace=True, absttl=True) == "OK"
        assert await kv.exists("k") == 0  # deleted, as Redis does with REPLACE
        broken = lzf_payload(10_000, data=b"\x00a\xe0\xff\x05")  # a reference before the start
        with pytest.raises(CommandSyntaxError, match="Bad data format"):
            await kv.restore("k", past, broken, absttl=True)
        with pytest.raises(CommandSyntaxError, match="Bad data format"):
            await kv.restore("k", 0, broken)
        assert await kv.exists("k") == 0


async def test_a_transaction_makes_room_for_the_value_not_the_payload() -> None:
    """Under allkeys-lru a transaction evicts before it holds its shards: for the size
    the RESTORE will write (400 KB), not its 4.6 KB payload."""
    value = 400_000
    for payload in (dump_payload(b"a" * value), lzf_payload(value)):
        async with kvmemo.open_store(
            shards=1, maxmemory=1_000_000, eviction_policy="allkeys-lru"
        ) as kv:
            for i in range(95):
                await kv.set(f"f{i}", b"y" * 10_000)
            assert await kv.transaction(("restore", "r", 0, payload)) == ["OK"]
            assert await kv.strlen("r") == value


def test_dump_builds_its_payload_with_one_copy_of_the_value() -> None:
    value = b"v" * (8 << 20)
    tracemalloc.start()
    try:
        payload = dump_payload(value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert load_payload(payload, MAX) == value
    assert peak < len(value) * 1.2, peak  # the payload itself, no intermediate copies


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
async def test_a_corrupt_compressed_payload_is_refused_before_any_room_is_made(
    policy: str,
) -> None:
    """A good CRC over a broken LZF stream that declares a big value: ``Bad data
    format``, as Redis answers, and nothing evicted (it asked for room first before)."""
    broken = b"\x00a\xe0\xff\x05"  # a back reference before the start
    async with kvmemo.open_store(shards=1, maxmemory=1_000_000, eviction_policy=policy) as kv:
        for i in range(90):
            await kv.set(f"f{i}", b"y" * 10_000)
        with pytest.raises(CommandSyntaxError, match="Bad data format"):
            await kv.restore("r", 0, lzf_payload(500_000, data=broken))
        assert await kv.dbsize() == 90
