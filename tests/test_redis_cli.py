"""redis-cli against the Redis port: scripted commands and ``--pipe`` mass insertion.

Skipped when ``redis-cli`` is not on PATH (CI installs it: ``redis-tools``).
The server runs in the test's trio loop; redis-cli runs as a subprocess.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.lowlevel

from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.server.resp import encode_command
from kvmemo.server.resp_server import serve_resp

REDIS_CLI = shutil.which("redis-cli")

pytestmark = pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")

TIMEOUT = 60  # seconds per test


@asynccontextmanager
async def redis_port(
    *, tokens: frozenset[str] = frozenset(), policy: str = "lru"
) -> AsyncIterator[int]:
    """A store and its Redis port; yields the port."""
    async with trio.open_nursery() as nursery:
        engine = KVEngine(StoreConfig(shards=4, eviction_policy=policy))
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        _, port = await nursery.start(partial(serve_resp, engine, port=0, tokens=tokens))
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def cli(port: int, *args: str, stdin: bytes = b"", **kwargs: Any) -> str:
    """Run redis-cli (output not to a terminal, so raw replies); its stdout."""
    assert REDIS_CLI is not None
    result = await trio.run_process(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        **kwargs,
    )
    out: bytes = result.stdout
    return out.decode()


async def test_redis_cli_runs_scripted_commands() -> None:
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            assert await cli(port, "SET", "greeting", "hello world") == "OK\n"
            assert await cli(port, "GET", "greeting") == "hello world\n"
            assert await cli(port, "INCRBY", "n", "41") == "41\n"
            assert await cli(port, "MGET", "greeting", "n", "missing") == "hello world\n41\n\n"
            assert await cli(port, "PING") == "PONG\n"
            assert await cli(port, "nosuch", "a") == (
                "ERR unknown command 'nosuch', with args beginning with: 'a' \n\n"
            )
            script = b"SET a 1\nINCR a\nEXPIRE a 100\nTTL a\nDEL a greeting\nDBSIZE\n"
            assert await cli(port, stdin=script) == "OK\n2\n1\n100\n2\n1\n"
            info = await cli(port, "INFO", "server")
            assert "redis_version:7.2.0-kvmemo" in info
            assert await cli(port, "-3", "HELLO", "3") != ""
            assert await cli(port, "-3", "GET", "n") == "41\n"


async def test_redis_cli_authenticates_with_a_token() -> None:
    with trio.fail_after(TIMEOUT):
        async with redis_port(tokens=frozenset({"s3cret"})) as port:
            assert await cli(port, "GET", "k") == "NOAUTH Authentication required.\n\n"
            assert await cli(port, "-a", "s3cret", "--no-auth-warning", "SET", "k", "v") == "OK\n"
            assert await cli(port, "--user", "default", "--pass", "s3cret", "GET", "k") == "v\n"


async def test_redis_cli_pipe_mass_inserts_ten_thousand_keys() -> None:
    n = 10_000
    payload = b"".join(encode_command("SET", f"key:{i}", f"value-{i}") for i in range(n))
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            out = await cli(port, "--pipe", stdin=payload)
            assert re.search(rf"errors: 0, replies: {n}$", out.strip()), out
            assert await cli(port, "DBSIZE") == f"{n}\n"
            assert await cli(port, "GET", "key:0") == "value-0\n"
            assert await cli(port, "GET", f"key:{n - 1}") == f"value-{n - 1}\n"
            assert await cli(port, "MGET", "key:1234", "key:9998") == "value-1234\nvalue-9998\n"
            scanned = await cli(port, "--scan", "--pattern", "key:99??")
            assert sorted(scanned.split()) == [f"key:{i}" for i in range(9900, 10_000)]


async def test_redis_cli_pipe_counts_the_errors_of_bad_commands() -> None:
    payload = (
        encode_command("SET", "a", "1")
        + encode_command("INCR", "a", "extra")
        + encode_command("NOSUCH")
        + encode_command("INCR", "a")
    )
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            out = await cli(port, "--pipe", stdin=payload, check=False)  # exits 1 on errors
            assert re.search(r"errors: 2, replies: 4$", out.strip()), out
            assert await cli(port, "GET", "a") == "2\n"


async def test_redis_cli_stat_and_bigkeys_read_info_and_scan() -> None:
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            await cli(port, "MSET", "small", "x", "large", "x" * 1000)
            bigkeys = await cli(port, "--bigkeys")
            assert "Biggest string found '\"large\"' has 1000 bytes" in bigkeys
            assert "2 strings with 1001 bytes" in bigkeys
            # --stat polls INFO until killed: read its first data line, then stop it.
            assert REDIS_CLI is not None
            args = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), "--stat", "-i", "0.1"]
            proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                seen = b""
                while seen.count(b"\n") < 3:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, seen
                    seen += chunk
            finally:
                proc.kill()
                await proc.wait()
            _, header, first = seen.decode().splitlines()[:3]
            assert header.split() == [
                "keys",
                "mem",
                "clients",
                "blocked",
                "requests",
                "connections",
            ]
            assert first.split()[0] == "2"  # keys, from INFO's db0 line
            assert first.split()[2] == "1"  # connected clients: redis-cli itself


async def test_redis_cli_memkeys_reads_memory_usage() -> None:
    """``--memkeys`` sizes each key with MEMORY USAGE: the bytes the engine tracks for it."""
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            await cli(port, "MSET", "small", "x", "large", "x" * 1000)
            small = int(await cli(port, "MEMORY", "USAGE", "small"))
            large = int(await cli(port, "MEMORY", "USAGE", "large"))
            assert small < 1000 < large
            used = re.search(r"used_memory:(\d+)", await cli(port, "INFO", "memory"))
            assert used is not None
            assert int(used.group(1)) == small + large
            memkeys = await cli(port, "--memkeys")
            assert f"Biggest string found '\"large\"' has {large} bytes" in memkeys
            assert f"2 strings with {small + large} bytes" in memkeys


async def test_redis_cli_hotkeys_reads_object_freq_under_lfu() -> None:
    """``--hotkeys`` ranks keys by OBJECT FREQ, which needs an LFU policy (as in Redis)."""
    with trio.fail_after(TIMEOUT):
        async with redis_port() as port:
            await cli(port, "SET", "k", "v")
            refused = await cli(port, "OBJECT", "FREQ", "k")
            assert "An LFU maxmemory policy is not selected" in refused
        async with redis_port(policy="lfu") as port:
            await cli(port, "MSET", "cold", "x", "hot", "y")
            for _ in range(5):
                await cli(port, "GET", "hot")
            hotkeys = await cli(port, "--hotkeys")
            found = re.findall(r'hot key found with counter: (\d+)\s+keyname: "(\w+)"', hotkeys)
            counts = {name: int(count) for count, name in found}
            assert counts["hot"] > counts["cold"] >= 1, hotkeys
