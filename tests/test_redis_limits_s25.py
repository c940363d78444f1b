"""Limits a demanding Redis user relies on (round 25).

- **Memory.** Redis refuses only the commands it flags ``denyoom`` when used
  memory is over ``maxmemory`` (server.c's ``processCommand``); the others run
  whatever the memory: EXPIRE and its kin, GETEX, PERSIST, RENAME, RENAMENX,
  DEL, UNLINK, GETDEL, TOUCH, FLUSHDB. KVMemo refused a key's first TTL under
  ``noeviction`` at the limit (its ``TTL_OVERHEAD`` bytes did not fit), and
  RENAMENX too: a client's ``SET`` then ``EXPIRE`` left a key that never
  leaves. Now those bytes are reserved past the limit, every write that adds
  bytes stays refused until usage is back under it, and the expiry gives them
  back. Checked against a real ``redis-server`` with ``maxmemory 1``.
- **Open files.** Redis keeps ``maxclients`` within ``ulimit -n`` less 32
  (``adjustOpenFilesLimit``): lowered at start with a warning, refused by
  ``CONFIG SET`` with ``try with N`` (config.c's ``updateMaxclients``).
  KVMemo promised 10,000 clients whatever its limit. The limit is set in the
  subprocesses (``RLIMIT_NOFILE``) or injected (:class:`OpenFiles`), never
  this machine's.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_cli import EXIT_TIMEOUT, START_TIMEOUT, env, serve_command
from test_redis_differential import (
    FAR_FUTURE,
    REDIS_SERVER,
    Pair,
    _connect,
    redis_and_kvmemo,
    run_same_steps,
)
from test_resp_server import Client
from test_store import assert_consistent, make_store

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import KVEngine
from kvmemo.errors import KVMemoError
from kvmemo.eviction.memory import TTL_OVERHEAD, entry_size, entry_size_bound
from kvmemo.server.openfiles import RESERVED_FDS, OpenFiles, reserved_fds
from kvmemo.server.resp import ErrorReply
from kvmemo.server.resp_server import RespLimits, RespSettings, serve_resp
from kvmemo.storage.store import NeedMemory

TIMEOUT = 60  # seconds (virtual time in the autojump tests)

# -- memory: what Redis never refuses --------------------------------------------------------


async def _fill(kv: Any) -> int:
    """SET 16-byte values until OOM; how many keys it took (k0, k1, ...)."""
    count = 0
    while True:
        try:
            await kv.set(f"k{count}", "x" * 16)
        except kvmemo.OutOfMemoryError:
            return count
        count += 1


# Each command not flagged denyoom in Redis 7 (COMMAND INFO), on a store at its
# limit, with the result it gives there (as it would anywhere).
NOT_DENYOOM = [
    (("expire", "k1", 100), 1),
    (("pexpire", "k1", 100_000), 1),
    (("expireat", "k1", FAR_FUTURE), 1),
    (("pexpireat", "k1", FAR_FUTURE * 1000), 1),
    (("getex", "k1", "EX", 100), b"x" * 16),
    (("getex", "k1", "PERSIST"), b"x" * 16),
    (("persist", "k1"), 0),
    (("renamenx", "k1", "fresh"), 1),
    (("rename", "k1", "fresh"), "OK"),
    (("del", "k1"), 1),
    (("unlink", "k1"), 1),
    (("getdel", "k1"), b"x" * 16),
    (("touch", "k1"), 1),
    (("flushdb",), "OK"),
]


@pytest.mark.parametrize(
    ("call", "result"), [pytest.param(c, r, id=" ".join(map(str, c[:4]))) for c, r in NOT_DENYOOM]
)
async def test_commands_redis_does_not_flag_denyoom_run_at_the_limit_under_noeviction(
    call: tuple[Any, ...], result: object, autojump_clock: trio.testing.MockClock
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=20_000, eviction_policy="noeviction") as kv:
        assert await _fill(kv) > 2
        assert await kv.execute(*call) == result
        if call[0] != "flushdb":
            with pytest.raises(KVMemoError) as refused:  # a denyoom write is still refused
                await kv.set("big", "x" * 1000)
            assert refused.value.kind == "OOM"


async def test_a_first_ttl_past_the_limit_is_granted_and_its_bytes_come_back_when_it_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=20_000, eviction_policy="noeviction") as kv:
        tracker = kv.engine.tracker
        keys = await _fill(kv)
        before = tracker.used
        assert before <= tracker.maxmemory
        for i in range(10):  # the SET-then-EXPIRE of a cache, ten times at the limit
            assert await kv.execute("expire", f"k{i}", 5) == 1
        assert tracker.used == before + 10 * TTL_OVERHEAD > tracker.maxmemory
        assert tracker.refused == 1  # _fill's last SET only: no TTL was refused
        with pytest.raises(KVMemoError) as refused:  # over the limit: writes that add bytes wait
            await kv.set("new", "v")
        assert refused.value.kind == "OOM"
        assert await kv.set("k20", "y" * 16) == "OK"  # a write that adds nothing still runs
        await trio.sleep(6)  # virtual: the keys expire (and the sweep removes them)
        assert await kv.dbsize() == keys - 10
        assert tracker.used == before - 10 * entry_size(b"k0", b"x" * 16) < tracker.maxmemory
        assert await kv.set("new", "v") == "OK"


async def test_a_batch_and_a_transaction_of_first_ttls_at_the_limit_all_succeed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=1, maxmemory=20_000, eviction_policy="noeviction") as kv:
        await _fill(kv)
        results = await kv.execute_many(*[("expire", f"k{i}", 100) for i in range(8)])
        assert results == [1] * 8
        assert await kv.transaction(("pexpire", "k8", 100_000), ("getex", "k9", "PX", 5000)) == [
            1,
            b"x" * 16,
        ]
        assert [await kv.ttl(f"k{i}") for i in (0, 7, 8)] == [100, 100, 100]


async def test_an_evicting_policy_brings_usage_back_under_the_limit_after_a_ttl_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with kvmemo.open_store(shards=2, maxmemory=20_000, eviction_policy="volatile-lru") as kv:
        tracker = kv.engine.tracker
        await _fill(kv)  # nothing volatile: nothing to evict, OOM
        for i in range(20):
            assert await kv.execute("expire", f"k{i}", 1000) == 1
        assert tracker.used > tracker.maxmemory
        assert await kv.set("after", "v") == "OK"  # evicts volatile keys to make room
        assert tracker.used <= tracker.maxmemory


def test_the_store_reserves_a_first_expiry_past_the_limit_and_releases_it() -> None:
    store = make_store(maxmemory=make_store().entry_size(b"a", b"1") + 10)
    store.tracker.overdraft = TTL_OVERHEAD  # the engine's is one maximum-size entry
    store.put(b"a", b"1", 0.0, expires_at=None)
    before = store.tracker.used
    assert store.set_expiry(b"a", 5.0) is True  # was NeedMemory
    assert store.tracker.used == before + TTL_OVERHEAD > store.tracker.maxmemory
    assert store.tracker.refused == 0
    assert_consistent(store)
    assert store.set_expiry(b"a", None) is True
    assert store.tracker.used == before
    assert_consistent(store)


def test_first_expiries_past_the_limit_stop_at_the_overdraft() -> None:
    # Granted past maxmemory, but never by more than one maximum-size entry
    # (the engine's overdraft): the memory bound of the issue holds.
    store = make_store(maxmemory=10 * make_store().entry_size(b"a0", b"1") + 10)
    keys = [b"a%d" % i for i in range(10)]
    for key in keys:
        store.put(key, b"1", 0.0, expires_at=None)
    store.tracker.overdraft = 3 * TTL_OVERHEAD + 5
    for key in keys[:3]:
        assert store.set_expiry(key, 5.0) is True
    before = (store.tracker.used, store.expiry_of(keys[3]))
    with pytest.raises(NeedMemory):
        store.set_expiry(keys[3], 5.0)
    assert (store.tracker.used, store.expiry_of(keys[3])) == before
    assert store.tracker.used <= store.tracker.maxmemory + store.tracker.overdraft
    assert_consistent(store)


async def test_the_engine_overdraft_is_one_maximum_size_entry() -> None:
    async with kvmemo.open_store(
        shards=1, maxmemory=1_000_000, max_key_size=100, max_value_size=1000
    ) as kv:
        assert kv.engine.tracker.overdraft == entry_size_bound(100, 1000)


# Over maxmemory (1 byte) in both: Redis runs what is not denyoom, refuses the rest.
OVER_MAXMEMORY = [
    ("FLUSHALL",),
    ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
    *[("SET", f"k{i}", "v") for i in range(10)],
    ("CONFIG", "SET", "maxmemory", "1"),
    ("SET", "new", "v"),
    ("EXPIRE", "k1", "100"),
    ("PEXPIRE", "k2", "100000"),
    ("EXPIREAT", "k3", str(FAR_FUTURE)),
    ("PEXPIREAT", "k4", str(FAR_FUTURE * 1000)),
    ("GETEX", "k5", "EX", "100"),
    ("PERSIST", "k1"),
    ("TTL", "k1"),
    ("RENAMENX", "k6", "k6b"),
    ("RENAME", "k7", "k7b"),
    ("COPY", "k8", "k8c"),
    ("INCR", "n"),
    ("APPEND", "k9", "x" * 100),
    ("SETEX", "k9", "100", "v"),
    ("TOUCH", "k2", "k3"),
    ("GETDEL", "k3"),
    ("DEL", "k4"),
    ("UNLINK", "k5"),
    ("EXISTS", "k1", "k6b", "k7b", "k8c"),
    ("FLUSHDB",),
    ("CONFIG", "SET", "maxmemory", "0"),
    ("SET", "new", "v"),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A RESP2 connection to a real ``redis-server`` and one to KVMemo's Redis port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with redis_and_kvmemo(tmp_path_factory.mktemp("redis")) as ports:
        yield from _connect(ports, 2)


def test_over_maxmemory_redis_and_kvmemo_refuse_the_same_commands(pair: Pair) -> None:
    run_same_steps(pair, OVER_MAXMEMORY)


# -- open files: maxclients within ulimit -n --------------------------------------------------


@asynccontextmanager
async def resp_port(settings: RespSettings) -> AsyncIterator[tuple[RespSettings, int]]:
    """A store and its Redis port started with ``settings``; the settings and the port."""
    async with trio.open_nursery() as nursery:
        engine = KVEngine(StoreConfig(shards=2))
        system = await nursery.start(engine.supervisor().run)
        engine.attach(system)
        _, port = await nursery.start(partial(serve_resp, engine, port=0, settings=settings))
        try:
            yield settings, port
        finally:
            nursery.cancel_scope.cancel()


def _failed(reason: str) -> ErrorReply:
    return ErrorReply(
        f"ERR CONFIG SET failed (possibly related to argument 'maxclients') - {reason}"
    )


def _try_with(n: int) -> ErrorReply:
    return _failed(
        f"The operating system is not able to handle the specified number of clients, try with {n}"
    )


async def _config_get(client: Client, name: str) -> bytes:
    reply = await client.call("CONFIG", "GET", name)
    assert isinstance(reply, list), reply
    return bytes(reply[1])


async def test_maxclients_above_the_open_file_budget_is_lowered_at_start_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = RespSettings(RespLimits(max_clients=10_000), open_files=OpenFiles(32, lambda: 128))
    with trio.fail_after(TIMEOUT):
        async with resp_port(settings) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            assert await _config_get(client, "maxclients") == b"96"
            info = await client.call("INFO", "clients")
            assert isinstance(info, bytes)
            assert b"\r\nmaxclients:96\r\n" in info
    assert settings.limits.max_clients == 96
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "maxclients lowered from 10000 to 96: the open-file limit (ulimit -n) is 128 and 32"
        " descriptors are kept for the process; for 10000 Redis clients raise it to at least"
        " 10032, plus --max-sessions for the WebSocket port's connections, which use the same"
        " descriptors (KVMemo does not raise it itself)"
    ]


async def test_maxclients_within_the_budget_or_without_a_limit_is_kept_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for read_limit in (lambda: 1032, lambda: None):
        settings = RespSettings(RespLimits(max_clients=1000), open_files=OpenFiles(32, read_limit))
        with trio.fail_after(TIMEOUT):
            async with resp_port(settings) as (_, port):
                client = Client(await trio.open_tcp_stream("127.0.0.1", port))
                assert await _config_get(client, "maxclients") == b"1000"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


async def test_config_set_maxclients_past_the_open_file_limit_fails_as_in_redis() -> None:
    limit = [128]
    settings = RespSettings(RespLimits(max_clients=50), open_files=OpenFiles(32, lambda: limit[0]))
    with trio.fail_after(TIMEOUT):
        async with resp_port(settings) as (_, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            assert await client.call("CONFIG", "SET", "maxclients", "97") == _try_with(96)
            assert await _config_get(client, "maxclients") == b"50"
            assert await client.call("CONFIG", "SET", "maxclients", "96") == "OK"
            # All or nothing: the timeout given with a refused maxclients is not applied.
            reply = await client.call("CONFIG", "SET", "timeout", "5", "maxclients", "4294967295")
            assert reply == _try_with(96)
            assert await _config_get(client, "timeout") == b"0"
            assert await _config_get(client, "maxclients") == b"96"
            limit[0] = 1032  # raised while it runs (prlimit --pid): read again at each CONFIG SET
            assert await client.call("CONFIG", "SET", "maxclients", "1000") == "OK"
            limit[0] = 20
            assert await client.call("CONFIG", "SET", "maxclients", "1") == _try_with(0)
            assert await _config_get(client, "maxclients") == b"1000"


async def test_a_budget_that_leaves_no_client_refuses_to_start() -> None:
    settings = RespSettings(RespLimits(), open_files=OpenFiles(32, lambda: 32))
    engine = KVEngine(StoreConfig(shards=1))  # never attached: refused before anything runs
    with pytest.raises(OSError, match=r"^\[Errno 24\] the open-file limit \(ulimit -n\) of 32 "):
        await serve_resp(engine, port=0, settings=settings)
    assert settings.limits.max_clients == 10_000


def test_persistence_keeps_descriptors_for_each_shard() -> None:
    assert reserved_fds(16, persistent=False) == RESERVED_FDS == 32
    assert reserved_fds(16, persistent=True) == 32 + 3 * 16


# -- the process: kvmemo serve (and redis-server) under a low RLIMIT_NOFILE --------------------


def _nofile(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A preexec_fn giving the child a soft open-file limit of ``soft`` (hard kept unless given)."""

    def apply() -> None:
        _, current = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, current if hard is None else hard))

    return apply


@asynccontextmanager
async def kvmemo_serve(soft: int, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``kvmemo serve`` with a soft open-file limit of ``soft`` (its hard limit as this
    process's: KVMemo does not raise the soft one); the process and its Redis port."""
    process = await trio.lowlevel.open_process(
        serve_command("--port", "0", "--resp-port", "0", "--shards", "2", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
        preexec_fn=_nofile(soft),
    )
    try:
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while data.count(b"\n") < 2:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"exited before its lines: {process.returncode}"
                data += chunk
        second = data.split(b"\n")[1].decode()
        assert second.startswith("KVMemo listening on redis://127.0.0.1:"), second
        yield process, int(second.rsplit(":", 1)[1])
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def _stop(process: trio.Process) -> list[dict[str, Any]]:
    """SIGTERM; the JSON log lines of its stderr."""
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    err = b""
    with trio.fail_after(EXIT_TIMEOUT):
        while chunk := await process.stderr.receive_some(65536):
            err += chunk
        assert await process.wait() == 0
    return [json.loads(line) for line in err.decode().splitlines()]


@pytest.mark.parametrize(("args", "maxclients"), [((), 96), (("--dir", "DIR"), 128 - 32 - 3 * 2)])
async def test_kvmemo_serve_under_a_low_ulimit_lowers_maxclients_and_says_so(
    tmp_path: Path, args: tuple[str, ...], maxclients: int
) -> None:
    args = tuple(str(tmp_path) if a == "DIR" else a for a in args)
    with trio.fail_after(START_TIMEOUT + EXIT_TIMEOUT):
        async with kvmemo_serve(128, *args) as (process, port):
            client = Client(await trio.open_tcp_stream("127.0.0.1", port))
            assert await _config_get(client, "maxclients") == str(maxclients).encode()
            reply = await client.call("CONFIG", "SET", "maxclients", str(maxclients + 1))
            assert reply == _try_with(maxclients)
            assert await client.call("CONFIG", "SET", "maxclients", str(maxclients)) == "OK"
            await client.aclose()
            logs = await _stop(process)
    warnings = [e["msg"] for e in logs if e["level"] == "warning"]
    assert len(warnings) == 1, logs
    assert warnings[0].startswith(f"maxclients lowered from 10000 to {maxclients}: "), warnings


def test_kvmemo_serve_exits_2_when_ulimit_leaves_no_client() -> None:
    done = subprocess.run(
        serve_command("--port", "0", "--resp-port", "0", "--shards", "2"),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=env(),
        preexec_fn=_nofile(32),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        "kvmemo: error: the open-file limit (ulimit -n) of 32 leaves no descriptor for Redis"
        " clients (32 are kept for the process): raise it to at least 10032\n"
    )


@asynccontextmanager
async def redis_serve(soft: int, workdir: Path) -> AsyncIterator[int]:
    """A ``redis-server`` whose open-file limit is ``soft`` (hard too: it cannot raise it)."""
    assert REDIS_SERVER is not None
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await trio.lowlevel.open_process(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        + ["no", "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_nofile(soft, soft),
    )
    try:
        assert process.stdout is not None
        log = b""
        with trio.fail_after(START_TIMEOUT):
            while b"Ready to accept connections" not in log:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, log.decode(errors="replace")
                log += chunk
        yield port
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


CONFIG_STEPS = [
    ("CONFIG", "GET", "maxclients"),
    ("CONFIG", "SET", "maxclients", "97"),
    ("CONFIG", "SET", "timeout", "5", "maxclients", "1000"),
    ("CONFIG", "GET", "timeout"),
    ("CONFIG", "SET", "maxclients", "96"),
    ("CONFIG", "SET", "maxclients", "50"),
    ("CONFIG", "GET", "maxclients"),
    ("CONFIG", "SET", "maxclients", "96"),
]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_maxclients_under_a_low_ulimit_answers_as_redis(tmp_path: Path) -> None:
    with trio.fail_after(2 * START_TIMEOUT + EXIT_TIMEOUT):
        async with redis_serve(128, tmp_path) as redis_port, kvmemo_serve(128) as (process, port):
            redis = Client(await trio.open_tcp_stream("127.0.0.1", redis_port))
            ours = Client(await trio.open_tcp_stream("127.0.0.1", port))
            for step in CONFIG_STEPS:
                assert await ours.call(*step) == await redis.call(*step), step
            await ours.aclose()
            await _stop(process)
