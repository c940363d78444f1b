"""Persistence as an operator meets it: the data directory's lock and shard count, a full disk.

Design. Each test is the regression test of a defect an operator review
found, run against real files (and, for the full disk, a real small tmpfs,
as in ``test_persistence_disk``; root only, skipped otherwise):

- a directory written with one ``shards`` count, started with another, came
  back with keys missing or unreachable; it is now refused, naming the
  count it was written with, and nothing in it changes;
- two stores on one data directory both wrote to it (each dropped the
  other's intent log at start); the second is now refused while the first
  runs, and the lock goes with the first store (or a failed start);
- on a full disk, a write through the batch path (every Redis-port
  command, and pipelines) escaped the engine as an exception and the Redis
  port closed the connection; it now gets the ``IO`` error (``MISCONF``),
  and the reads batched with it keep their answers;
- a start refused for an ``OSError`` that names a file said only "Is a
  directory", without the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

import pytest
import test_persistence_disk
import trio
from test_cli import (  # the same in-process helpers
    keep_logging,  # noqa: F401 - a fixture, used by name
    run_main,
)
from test_resp_server import Client

import kvmemo
from kvmemo.commands import ops
from kvmemo.config import StoreConfig
from kvmemo.engine.engine import _uncommitted_answers
from kvmemo.errors import NotIntegerError, PersistenceIOError
from kvmemo.node import open_node
from kvmemo.persistence.layout import DirectoryInUse, ShardCountMismatch
from kvmemo.server.config import ServerConfig
from kvmemo.server.resp import ErrorReply
from kvmemo.storage.store import NeedMemory

TIMEOUT = 30  # seconds per test
tmpfs = test_persistence_disk.tmpfs  # the same small disk (a fixture)
VALUE = b"v" * 200
FULL_STREAK = 20  # consecutive refused writes that show the disk is full
MAX_WRITES = 10_000  # a bound on the filling loop


def snapshot_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (but the lock's pid) and its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in ("LOCK", "SHARDS")
    }


# -- the shard count ---------------------------------------------------------------------------


async def test_a_directory_written_with_another_shard_count_is_refused_and_left_intact(
    tmp_path: Path,
) -> None:
    # Was: with 2 shards, 99 of 200 keys came back (shard-2/ and shard-3/
    # were never read); with 8, all 200 were loaded but GET k1 answered nil
    # (k1 was on a shard that no longer owned it).
    data_dir = str(tmp_path / "data")
    keys = {b"k%d" % i: b"v%d" % i for i in range(200)}
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            await kv.mset(keys)
        before = snapshot_of(tmp_path / "data")
        for shards in (2, 8):
            with pytest.raises(ShardCountMismatch) as caught:
                async with kvmemo.open_store(shards=shards, data_dir=data_dir):
                    pass
            assert str(caught.value) == (
                f"{data_dir}: the data directory was written with 4 shards, not {shards}: "
                "start with 4 shards (a key's shard depends on the count, so any other "
                "would lose keys)"
            )
            assert snapshot_of(tmp_path / "data") == before
        async with kvmemo.open_store(shards=4, data_dir=data_dir) as kv:
            assert await kv.mget(*keys) == list(keys.values())


async def test_a_directory_without_data_may_change_its_shard_count(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with trio.fail_after(TIMEOUT):
        for shards in (4, 8, 2):
            async with kvmemo.open_store(shards=shards, data_dir=data_dir) as kv:
                assert await kv.dbsize() == 0
        async with kvmemo.open_store(shards=2, data_dir=data_dir) as kv:
            await kv.set(b"k", b"v")
        with pytest.raises(ShardCountMismatch):
            async with kvmemo.open_store(shards=3, data_dir=data_dir):
                pass


@pytest.mark.usefixtures("keep_logging")
def test_serve_on_a_directory_of_another_shard_count_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"

    async def fill() -> None:
        async with kvmemo.open_store(shards=4, data_dir=str(data_dir)) as kv:
            await kv.set(b"k", b"v")

    trio.run(fill)
    argv = ["serve", "--port", "0", "--no-resp", "--shards", "2", "--dir", str(data_dir)]
    code, out, err = run_main(argv, capsys)
    assert (code, out) == (2, "")
    assert err.startswith(
        f"kvmemo: error: {data_dir}: the data directory was written with 4 shards, not 2"
    )
    assert err.count("\n") == 1


# -- one store per directory -------------------------------------------------------------------


async def test_a_second_store_on_a_directory_in_use_is_refused(tmp_path: Path) -> None:
    # Was: both started and wrote to the same shard logs; the second's start
    # dropped the first's intent log.
    data_dir = str(tmp_path / "data")
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2, data_dir=data_dir) as first:
            await first.set(b"k", b"first")
            before = snapshot_of(tmp_path / "data")
            with pytest.raises(DirectoryInUse) as caught:
                async with kvmemo.open_store(shards=2, data_dir=data_dir):
                    pass
            assert str(caught.value).startswith(
                f"{data_dir}: the data directory is in use by another KVMemo store (process "
            )
            assert snapshot_of(tmp_path / "data") == before
            await first.set(b"k", b"still first")  # the first store is untouched
        # Released with the first store, and by a start that failed.
        with pytest.raises(ShardCountMismatch):
            async with kvmemo.open_store(shards=3, data_dir=data_dir):
                pass
        async with kvmemo.open_store(shards=2, data_dir=data_dir) as second:
            assert await second.get(b"k") == b"still first"


@pytest.mark.usefixtures("keep_logging")
def test_a_second_server_on_a_directory_in_use_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lock of another process: a descriptor of this one holds it (flock
    # locks are per open file, so a store in this process conflicts too).
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        argv = ["serve", "--port", "0", "--no-resp", "--dir", str(data_dir)]
        code, out, err = run_main(argv, capsys)
    finally:
        os.close(fd)
    assert (code, out) == (2, "")
    assert err == (
        f"kvmemo: error: {data_dir}: the data directory is in use by another KVMemo store "
        "(process 4242); two stores on one directory would damage it\n"
    )
    assert sorted(p.name for p in data_dir.iterdir()) == ["LOCK"]  # nothing else written


# -- a full disk through the batch path --------------------------------------------------------


async def test_a_full_disk_fails_batched_writes_with_io_and_keeps_batched_reads(
    tmpfs: Path,
) -> None:
    # Was: on the Redis port every SET on a full disk closed the connection
    # ("RESP connection ... crashed"): the shard failed the batch's reply
    # with IO and _finish_batch let it escape.
    store = StoreConfig(shards=1, data_dir=str(tmpfs / "data"), appendfsync="always")
    server = ServerConfig(host="127.0.0.1", port=0, resp_port=0)
    ballast = tmpfs / "ballast"
    ballast.write_bytes(bytes(64 * 1024))
    with trio.fail_after(TIMEOUT):
        async with open_node(store, server) as node:
            engine = node.engine
            await engine.execute("set", [b"kept", b"there"])
            streak = 0
            for i in range(MAX_WRITES):
                try:
                    await engine.execute("set", [b"k%06d" % i, VALUE])
                except PersistenceIOError:
                    streak += 1
                    if streak == FULL_STREAK:
                        break
                else:
                    streak = 0
            assert streak == FULL_STREAK, "the disk never filled up"
            # A write and reads in one batch of one shard.
            results = await engine.execute_many(
                [("get", [b"kept"]), ("set", [b"new", VALUE]), ("get", [b"kept"])]
            )
            assert results[0] == results[2] == b"there"
            assert isinstance(results[1], PersistenceIOError)
            assert results[1].data["applied"] is None
            # Each read answers what it read in its place in the batch: before
            # the batch's write of its key, the old value (was: IO, as the
            # write, because the reads were asked again after the batch).
            results = await engine.execute_many(
                [("get", [b"kept"]), ("get", [b"new2"]), ("set", [b"new2", VALUE])]
            )
            assert results[0] == b"there"
            assert results[1] is None
            assert isinstance(results[2], PersistenceIOError)
            # A write that fails on its own changed nothing: it keeps its own
            # error (was: IO, applied unknown); a read after a write of the
            # batch sees it (in memory, as every later read does).
            results = await engine.execute_many(
                [("incr", [b"kept"]), ("set", [b"new3", VALUE]), ("get", [b"new3"])]
            )
            assert isinstance(results[0], NotIntegerError)
            assert isinstance(results[1], PersistenceIOError)
            assert results[2] == VALUE
            # The same over the Redis port: errors, and the connection stays.
            assert node.resp_bound is not None
            host, port = node.resp_bound
            client = Client(await trio.open_tcp_stream(host, port))
            reply = await client.call("SET", "new", VALUE)
            assert isinstance(reply, ErrorReply)
            assert reply.message.startswith("MISCONF could not make the write durable: ")
            assert "No space left on device" in reply.message
            assert await client.call("GET", "kept") == b"there"
            assert await client.call("PING") == "PONG"
            # Space again: writes resume on the same connection.
            ballast.unlink()
            assert await client.call("SET", "after", "space") == "OK"
            await client.aclose()


# -- start errors name their file ---------------------------------------------------------------


@pytest.mark.usefixtures("keep_logging")
def test_a_directory_where_a_snapshot_should_be_is_named_in_the_start_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was: "kvmemo: error: Is a directory", naming no file.
    stray = tmp_path / "data" / "shard-0" / "snap-00000009.kvs"
    stray.mkdir(parents=True)
    argv = ["serve", "--port", "0", "--no-resp", "--shards", "1", "--dir", str(tmp_path / "data")]
    code, out, err = run_main(argv, capsys)
    assert (code, out, err) == (2, "", f"kvmemo: error: Is a directory: {stray}\n")


# -- a graceful stop on a full disk -------------------------------------------------------------


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)


async def test_a_stop_that_cannot_write_its_snapshot_says_so(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: the node logged "stopped" and exited 0, saying nothing of it.
    data_dir = str(tmpfs / "data")
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=1, data_dir=data_dir, appendfsync="always") as kv:
            await kv.set(b"k", b"v")
            fill(tmpfs / "ballast")
            caplog.set_level(logging.WARNING, logger="kvmemo.persistence")
        messages = [r.getMessage() for r in caplog.records if r.name == "kvmemo.persistence"]
        assert len(messages) == 1
        assert messages[0].startswith(
            "shard-0: no snapshot at stop (the next start replays the log): snapshot failed: "
        )
        assert "No space left on device" in messages[0]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        (tmpfs / "ballast").unlink()
        async with kvmemo.open_store(shards=1, data_dir=data_dir) as kv:
            assert await kv.get(b"k") == b"v"


def test_a_batch_whose_writes_were_not_logged_answers_each_operation_in_its_place() -> None:
    error = PersistenceIOError("could not make the write durable: disk full")
    refused = NotIntegerError("value is not an integer or out of range")
    items = [
        (0, ops.Get(b"a")),
        (1, ops.PlainSet(b"a", b"1")),
        (2, ops.PlainSet(b"b", b"2")),  # failed on its own (stands for INCR on text)
        (3, ops.Get(b"a")),
        (4, ops.PlainSet(b"c", b"3")),  # stopped the batch: needs memory
        (5, ops.Get(b"c")),  # did not run
    ]
    need = NeedMemory(64)
    answers = [None, "OK", refused, b"1", need]
    # The one that needed memory keeps it: the engine makes room and sends
    # it again with the one after it, which did not run, as in any batch.
    assert _uncommitted_answers(items, answers, error) == [None, error, refused, b"1", need]
