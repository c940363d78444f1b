"""Persistence when the disk fails: full, read-only, or holding a corrupt log.

Design. Disk full and read-only are real file-system conditions, not mocks:
a small tmpfs (``TMPFS_SIZE``) is mounted for each test (root only; the
test is skipped with the reason when ``mount`` is refused). An embedded
store (``appendfsync always``) runs on it:

- **full**: writes are made until the tmpfs is full. Every write refused
  fails with the ``IO`` kind, a message naming the cause and the segment,
  and ``applied`` null; reads keep working; ``info persistence`` reports the
  failing health and the error; once space is freed, writes resume and the
  health is ``ok`` again. After a restart every acknowledged write is there.
- **read-only**: the tmpfs is remounted read-only (possible only because a
  stopped store closes its files) and a store started on it: it serves what
  it recovered, refuses writes with ``IO``, reports the failure, and resumes
  once the file system is writable again; nothing acknowledged is lost.

A corrupt log is written with the persistence layer itself (the records a
server writes), a byte flipped inside a record before the tail, and
``python -m kvmemo serve --dir`` is started on it: it must stop at start
with one line naming the file and the offset, and start with ``--repair``,
keeping the records before the damage; a key that expired while the server
was down is not loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import kvmemo
from kvmemo.client import connect
from kvmemo.commands.ops import PlainSet
from kvmemo.errors import KVMemoError
from kvmemo.persistence import AppendFsync, Op, Record, SegmentedLog, encode, wal
from kvmemo.storage.durability import Health, ShardDurability
from kvmemo.storage.durable_shard import Save, SyncNow

ROOT = Path(__file__).resolve().parents[1]
TMPFS_SIZE = 256 * 1024  # bytes of the small file system
BALLAST = 64 * 1024  # bytes of a file deleted to free space once the disk is full
VALUE_SIZE = 200  # bytes per value: about 1200 writes fill the tmpfs
FULL_STREAK = 20  # consecutive refused writes that show the disk is full for every shard
MAX_WRITES = 10_000  # a bound on the filling loop
START_TIMEOUT = 20  # seconds for a server to start or to fail
STOP_TIMEOUT = 10  # seconds for a server to stop after SIGTERM
FIRST_LINE = re.compile(r"^KVMemo listening on (ws://127\.0\.0\.1:\d+/ws)$")


# -- a small file system ----------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of ``TMPFS_SIZE`` bytes, unmounted at the end."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(
            ["umount", str(mount_point)], capture_output=True, check=False, timeout=10
        )
        if unmounted.returncode != 0:  # something still holds a file: detach it anyway
            subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=10)


async def remount(mount_point: Path, mode: str) -> None:
    """Remount the tmpfs ``ro`` or ``rw``."""
    await trio.run_process(["mount", "-o", f"remount,{mode}", str(mount_point)])


def key_on_shard(kv: kvmemo.Store, shard: int, prefix: str) -> bytes:
    """The first key ``prefix-N`` that the store places on ``shard``."""
    n = 0
    while kv.engine.slots.shard_of(f"{prefix}-{n}".encode()) != shard:
        n += 1
    return f"{prefix}-{n}".encode()


async def persistence(kv: kvmemo.Store) -> dict[str, object]:
    info: dict[str, object] = (await kv.info("persistence"))["persistence"]
    return info


def value_of(i: int) -> bytes:
    return b"%06d" % i + b"v" * (VALUE_SIZE - 6)


async def test_a_full_disk_fails_writes_with_io_keeps_reads_and_loses_nothing_acknowledged(
    tmpfs: Path,
) -> None:
    data_dir = tmpfs / "data"
    ballast = tmpfs / "ballast"
    ballast.write_bytes(bytes(BALLAST))
    acked: dict[bytes, bytes] = {}
    refused: dict[bytes, bytes] = {}
    errors: list[KVMemoError] = []
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync="always") as kv:
            streak = 0
            for i in range(MAX_WRITES):
                key, value = b"k%06d" % i, value_of(i)
                try:
                    await kv.set(key, value)
                except KVMemoError as exc:
                    errors.append(exc)
                    refused[key] = value
                    streak += 1
                    if streak == FULL_STREAK:
                        break
                else:
                    acked[key] = value
                    streak = 0
            assert streak == FULL_STREAK, "the disk never filled up"
            assert acked, "nothing was written before the disk was full"
            for error in errors:
                assert error.kind == "IO"
                assert error.data["applied"] is None
                # The shard's log, or the commit log whose frame holds it.
                assert re.fullmatch(
                    r"could not make the write durable: No space left on device: "
                    + re.escape(str(data_dir))
                    + r"/(shard-[01]/wal|commit/commit)-\d{8}\.log",
                    str(error),
                ), str(error)

            # Reads keep working, the failure is reported, SAVE fails cleanly.
            assert await kv.mget(*acked) == list(acked.values())
            info = await persistence(kv)
            assert info["health"] == "failing"
            assert info["failing_shards"]
            assert any("No space left on device" in str(e) for e in info["errors"])  # type: ignore[attr-defined]
            with pytest.raises(KVMemoError) as save_error:
                await kv.execute("save")
            assert save_error.value.kind == "IO"
            assert "No space left on device" in str(save_error.value)
            assert not list(data_dir.glob("*/*.tmp")), "a failed snapshot left its temporary file"

            # Space comes back: writes resume on every shard and the health recovers.
            ballast.unlink()
            for shard in range(2):
                key = key_on_shard(kv, shard, "after")
                await kv.set(key, b"resumed")
                acked[key] = b"resumed"
            info = await persistence(kv)
            assert info["health"] == "ok", info
            assert info["errors"] == []

        async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
            assert await kv.mget(*acked) == list(acked.values())
            present = set(await kv.keys("*"))
    assert set(acked) <= present
    # A refused write may or may not have lasted (``applied`` null), but only as written.
    assert present - set(acked) <= set(refused)


async def test_a_read_only_directory_fails_writes_with_io_keeps_reads_and_loses_nothing(
    tmpfs: Path,
) -> None:
    data_dir = tmpfs / "data"
    acked = {b"k%04d" % i: value_of(i) for i in range(200)}
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync="always") as kv:
            await kv.mset(dict(list(acked.items())[:100]))
            for key, value in list(acked.items())[100:]:
                await kv.set(key, value)

        # Only possible because the stopped store closed every file it had open.
        await remount(tmpfs, "ro")
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync="always") as kv:
            assert await kv.mget(*acked) == list(acked.values())
            for shard in range(2):
                with pytest.raises(KVMemoError) as write_error:
                    await kv.set(key_on_shard(kv, shard, "refused"), b"x")
                assert write_error.value.kind == "IO"
                assert write_error.value.data["applied"] is None
                assert re.fullmatch(
                    r"could not make the write durable: Read-only file system: "
                    + re.escape(str(data_dir / f"shard-{shard}"))
                    + r"/wal-\d{8}\.log",
                    str(write_error.value),
                ), str(write_error.value)
            assert await kv.mget(*acked) == list(acked.values())
            info = await persistence(kv)
            assert info["health"] == "failing"
            assert info["failing_shards"] == ["shard-0", "shard-1"]
            assert all("Read-only file system" in str(e) for e in info["errors"])  # type: ignore[attr-defined]
            with pytest.raises(KVMemoError) as save_error:
                await kv.execute("save")
            assert save_error.value.kind == "IO"

            # Writable again: the next write opens the log and succeeds.
            await remount(tmpfs, "rw")
            for shard in range(2):
                key = key_on_shard(kv, shard, "after")
                await kv.set(key, b"resumed")
                acked[key] = b"resumed"
            assert (await persistence(kv))["health"] == "ok"

        async with kvmemo.open_store(shards=2, data_dir=str(data_dir)) as kv:
            assert await kv.mget(*acked) == list(acked.values())
            present = set(await kv.keys("*"))
    refused = {key_on_shard(kv, shard, "refused") for shard in range(2)}
    assert set(acked) <= present
    assert present - set(acked) <= refused


# -- the health of a shard's log --------------------------------------------------------------


def test_a_sync_leaves_the_log_dirty_when_a_batch_was_appended_during_it(tmp_path: Path) -> None:
    dur = ShardDurability(
        tmp_path, AppendFsync.EVERYSEC, segment_bytes=1 << 20, snapshot_bytes=1 << 20
    )
    dur.open()
    assert dur.log is not None
    try:
        dur.journal.set(b"a", b"1", None)
        dur.append()
        appends, started = dur.appends, time.time()  # a background sync starts here...
        dur.journal.set(b"b", b"2", None)
        dur.append()  # ...and this batch is appended while it runs
        dur.log.sync()
        dur.synced(appends, started)
        assert dur.dirty, "the batch appended during the sync is not durable yet"
        assert dur.sync_lag() >= 0
        dur.synced(dur.appends, time.time())
        assert not dur.dirty
        assert dur.sync_lag() == 0.0
    finally:
        dur.log.close()


def test_with_appendfsync_no_a_successful_append_clears_a_failure(tmp_path: Path) -> None:
    dur = ShardDurability(tmp_path, AppendFsync.NO, segment_bytes=1 << 20, snapshot_bytes=1 << 20)
    dur.open()
    assert dur.log is not None
    try:
        dur.failed(OSError(28, "No space left on device", str(tmp_path / "wal-00000001.log")))
        assert dur.health is Health.FAILING
        dur.journal.set(b"a", b"1", None)
        dur.append()
        assert (dur.health, dur.error) == (Health.OK, None)
    finally:
        dur.log.close()


class FailingFsync:
    """``os.fsync`` for a test: EIO while ``on``, or for the next ``count`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.count = 0
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if self.on or self.count:
            self.count = max(0, self.count - 1)
            raise OSError(errno.EIO, "Input/output error (injected)")
        self._real(fd)


async def _kind_of(slot: Any) -> str:
    """ "OK" when the shard's reply in ``slot`` succeeded, else its error's kind."""
    try:
        await slot.wait()
    except KVMemoError as exc:
        return exc.kind
    return "OK"


@contextlib.asynccontextmanager
async def _warm_always_store(data_dir: Path) -> AsyncIterator[kvmemo.Store]:
    """One shard, ``always`` synced by plain ``fsync``, one write made durable already."""
    async with kvmemo.open_store(
        shards=1, data_dir=str(data_dir), appendfsync="always", fsync_method="fsync"
    ) as kv:
        assert await kv.set("warm", "1") == "OK"
        yield kv


async def _set_then_save_in_one_batch(kv: kvmemo.Store) -> tuple[str, str]:
    """A SET and a Save queued together on shard 0 (one batch): each one's outcome."""
    ref = kv.engine._shards[0]
    set_slot = ref.ask_nowait(PlainSet(b"x", b"1"))
    save_slot = ref.ask_nowait(Save())
    outcomes = [await _kind_of(set_slot)]
    try:  # the Save's reply is held with the batch's, and fails with them
        ticket = await save_slot.wait()
        await ticket.wait()
        outcomes.append("OK")
    except KVMemoError as exc:
        outcomes.append(exc.kind)
    return outcomes[0], outcomes[1]


async def test_a_set_whose_record_a_save_appended_fails_when_that_sync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``always``: the Save appended the SET's record; the commit's sync of it failed."""
    fsync = FailingFsync(monkeypatch)
    async with _warm_always_store(tmp_path) as kv:
        fsync.on = True
        set_outcome, _ = await _set_then_save_in_one_batch(kv)
        fsync.on = False
        assert set_outcome == "IO"


async def test_a_set_whose_record_a_save_appended_fails_when_a_sync_in_between_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``always``: a sync between the Save and the commit failed; the commit's own succeeded."""
    fsync = FailingFsync(monkeypatch)
    async with _warm_always_store(tmp_path) as kv:
        fsync.count = 1  # the SyncNow's: the only one to cover a's record
        ref = kv.engine._shards[0]
        slots = [ref.ask_nowait(m) for m in (PlainSet(b"a", b"1"), Save(), SyncNow())]
        slots.append(ref.ask_nowait(PlainSet(b"b", b"1")))
        got = [await _kind_of(slots[i]) for i in (0, 2, 3)]
        assert got == ["IO", "IO", "IO"]  # a's record may be lost; b shares the batch


@pytest.mark.parametrize("appendfsync", ["always", "everysec", "no"])
async def test_a_set_whose_record_a_failed_save_append_dropped_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, appendfsync: str
) -> None:
    """The Save's append of the batch failed (a full disk): the SET's reply says so."""
    failing = False
    real_write_all = wal.write_all

    def write_all(fd: int, data: bytes) -> None:
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        real_write_all(fd, data)

    monkeypatch.setattr(wal, "write_all", write_all)
    async with kvmemo.open_store(shards=1, data_dir=str(tmp_path), appendfsync=appendfsync) as kv:
        assert await kv.set("warm", "1") == "OK"
        failing = True
        assert await _set_then_save_in_one_batch(kv) == ("IO", "IO")
        failing = False
        assert await kv.set("after", "1") == "OK"  # the disk has room again


# -- a corrupt log ----------------------------------------------------------------------------

SOON_MS = 300  # the expiry of a key that expires while the server is down, from now
KEPT = 40  # records k00..k39 come before the damaged one


def write_corrupt_log(data_dir: Path) -> tuple[Path, int, int]:
    """A one-shard log with a byte flipped inside record ``k40``, before the tail.

    Records: ``k00``..``k29``, ``soon`` (expires in ``SOON_MS``), ``later``
    (in an hour), ``k30``..``k49``, each appended as its own batch.

    Returns:
        The segment, the offset of the damaged record, and the Unix ms at
        which ``soon`` expires.
    """
    now_ms = int(time.time() * 1000)
    soon_ms = now_ms + SOON_MS
    records = [Record(Op.SET, b"k%02d" % i, b"value-%02d" % i) for i in range(30)]
    records += [
        Record(Op.SET, b"soon", b"gone", soon_ms),
        Record(Op.SET, b"later", b"kept", now_ms + 3_600_000),
    ]
    records += [Record(Op.SET, b"k%02d" % i, b"value-%02d" % i) for i in range(30, 50)]
    with SegmentedLog(data_dir / "shard-0") as log:
        for record in records:
            log.append([record])
        log.sync()
        segment = log.path(log.current)
    damaged = next(i for i, r in enumerate(records) if r.key == b"k%02d" % KEPT)
    offset = sum(len(encode(r)) for r in records[:damaged])
    data = bytearray(segment.read_bytes())
    data[offset + len(encode(records[damaged])) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    return segment, offset, soon_ms


def serve_command(data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kvmemo",
        "serve",
        "--port",
        "0",
        "--no-resp",
        "--shards",
        "1",
        "--dir",
        str(data_dir),
        *extra,
    ]


def env() -> dict[str, str]:
    """The environment of a server: no KVMEMO_* from outside, this checkout first."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


@pytest.fixture
def corrupt(tmp_path: Path) -> tuple[Path, Path, int, int]:
    """(data dir, damaged segment, offset of the damage, expiry of ``soon``)."""
    data_dir = tmp_path / "data"
    return (data_dir, *write_corrupt_log(data_dir))


def start_on_corrupt_log(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(data_dir),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=env(),
        check=False,
    )


def test_a_corrupt_log_stops_serve_at_start_with_one_line_naming_file_and_offset(
    corrupt: tuple[Path, Path, int, int],
) -> None:
    data_dir, segment, offset, _ = corrupt
    before = segment.read_bytes()
    done = start_on_corrupt_log(data_dir)
    assert done.returncode != 0
    assert done.stdout == "", "the server must not start listening"
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{segment}: corrupt write-ahead log at offset {offset}: CRC mismatch" in lines[0]
    assert segment.read_bytes() == before, "a refused start must not change the log"
    assert not list(segment.parent.glob("*.corrupt-*"))


def test_a_corrupt_log_is_reported_as_a_clean_start_error(
    corrupt: tuple[Path, Path, int, int],
) -> None:
    data_dir, segment, offset, _ = corrupt
    done = start_on_corrupt_log(data_dir)
    assert done.returncode == 2
    assert done.stderr.startswith(f"kvmemo: error: {segment}: corrupt write-ahead log at offset")
    assert f"offset {offset}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_repair_starts_keeps_the_valid_records_and_drops_keys_expired_while_down(
    corrupt: tuple[Path, Path, int, int], tmp_path: Path
) -> None:
    data_dir, segment, offset, soon_ms = corrupt
    # The server is down while ``soon`` expires.
    await trio.sleep(max(0.0, (soon_ms + 50) / 1000 - time.time()))
    log = tmp_path / "repair.log"
    with log.open("wb") as stderr:  # a local file, opened once: no need for a thread
        process = await trio.lowlevel.open_process(
            serve_command(data_dir, "--repair"),
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env(),
        )
    try:
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in data:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"exited before its first line: {log.read_text()}"
                data += chunk
        match = FIRST_LINE.match(data.partition(b"\n")[0].decode())
        assert match, data
        with trio.fail_after(STOP_TIMEOUT):
            async with connect(match[1]) as client:
                kept = [b"k%02d" % i for i in range(KEPT)]
                assert await client.mget(*kept) == [b"value-%02d" % i for i in range(KEPT)]
                assert await client.get(f"k{KEPT:02d}") is None  # after the damage: set aside
                assert await client.get("soon") is None
                assert await client.get("later") == b"kept"
                assert 3500 < await client.ttl("later") <= 3600
                assert await client.dbsize() == KEPT + 1
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines()]
    # ``soon`` was a valid record before the damage, but expired: it was never loaded.
    assert f"recovered {KEPT + 1} keys from {data_dir}" in messages, messages
    assert any(
        m.startswith(f"shard-0: repair: {segment}: CRC mismatch at offset {offset}; ")
        for m in messages
    ), messages
    assert (segment.parent / f"{segment.name}.corrupt-{offset}").exists()


def test_healthz_reports_a_shard_whose_writes_are_not_durable(tmp_path: Path) -> None:
    from kvmemo.config import StoreConfig
    from kvmemo.engine.engine import KVEngine
    from kvmemo.server.app import Server
    from kvmemo.server.config import ServerConfig
    from kvmemo.storage.durability import Health

    async def main() -> tuple[int, dict[str, object]]:
        engine = KVEngine(StoreConfig(shards=2, data_dir=str(tmp_path)))
        await engine.prepare()
        server = Server(engine, ServerConfig(port=0, resp=False))
        engine._durabilities[1].failed(OSError(28, "No space left on device", "wal-1.log"))
        assert engine._durabilities[1].health is Health.FAILING
        status, body, _ = server._healthz()
        return status, json.loads(body)

    status, body = trio.run(main)
    assert status == 503
    assert body["persistence"] == ["shard-1: No space left on device: wal-1.log"]


async def test_a_snapshot_whose_sync_fails_reports_the_failure_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot's head-mark sync failed: SAVE fails with IO, and the shard's error
    names the failure once (it used to be recorded twice, the message nested in itself)."""
    fsync = FailingFsync(monkeypatch)
    async with kvmemo.open_store(
        shards=1, data_dir=str(tmp_path), appendfsync="everysec", fsync_method="fsync"
    ) as kv:
        assert await kv.set("a", "1") == "OK"  # appended, not synced yet
        fsync.on = True
        with pytest.raises(KVMemoError) as caught:
            await kv.execute("SAVE")
        assert caught.value.kind == "IO"
        fsync.on = False
        section = (await kv.info("persistence"))["persistence"]
        assert section["health"] == "failing"
        [error] = section["errors"]
        assert error.count("Input/output error (injected)") == 1, error
        assert error.count("a snapshot will re-save") == 1, error
