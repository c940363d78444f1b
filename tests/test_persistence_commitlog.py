"""The commit log of ``appendfsync always`` (``fsync_method="commitlog"``, the default).

A round appends each shard's batch to its own log without syncing it, and
one frame of all of them to the commit log, which alone is synced. These
tests simulate the power loss the design is for: shard log segments losing
what only the page cache held (truncated, zeroed), and check that recovery
puts every acknowledged byte back; and that a damaged commit log never
loads a damaged frame, never crashes recovery, and keeps every frame before
the damage.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

import kvmemo
from kvmemo.commands import ops
from kvmemo.commands.args import NO_EXPIRY
from kvmemo.errors import KVMemoError
from kvmemo.persistence import CorruptLog, SegmentedLog, commitlog, encode_set, recover
from kvmemo.persistence.commitlog import (
    COMMIT_DIR,
    CommitLog,
    Entry,
    drop,
    encode_frame,
    list_commit_segments,
    read_frames,
    redo,
)
from kvmemo.persistence.records import encode_txn
from kvmemo.persistence.wal import segment_name
from kvmemo.storage import durable_shard, sync_coordinator
from kvmemo.storage.durability import LogBatch
from kvmemo.storage.durable_shard import Save
from kvmemo.storage.sync_coordinator import SyncCoordinator

WAIT = 30  # seconds, a bound on every test's real I/O

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def records(shard: int, start: int, count: int) -> bytes:
    """``count`` encoded SET records for ``shard``."""
    return b"".join(
        encode_set(b"k%d-%d" % (shard, i), b"v" * (i % 7)) for i in range(start, start + count)
    )


def wal_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.glob("shard-*/wal-*.log"))


def redo_all(data_dir: Path, *, repair: bool = False) -> list[str]:
    """Recovery's two steps around the shards' own: redo, then drop the commit log."""
    redone = redo(data_dir, repair=repair)
    return redone.warnings + drop(data_dir, redone)


def lose_page_cache(data_dir: Path) -> None:
    """What a power loss could leave if nothing of the shard logs had been written back."""
    for path in wal_files(data_dir):
        os.truncate(path, 0)


async def commit_batches(data_dir: Path, batches: list[tuple[int, bytes]]) -> dict[Path, bytes]:
    """Write ``(shard, data)`` batches through ``commitlog`` rounds; each segment's bytes after."""
    coord = SyncCoordinator(method="commitlog", directory=data_dir)
    logs = {}
    try:
        for shard, data in batches:
            if shard not in logs:
                logs[shard] = SegmentedLog(data_dir / f"shard-{shard}")
            await coord.sync(LogBatch(logs[shard], data))
        return {path: path.read_bytes() for path in wal_files(data_dir)}
    finally:
        coord.close()
        for log in logs.values():
            log.close()


# -- the frame format ------------------------------------------------------------------------


def test_a_frame_holds_its_entries(tmp_path: Path) -> None:
    entries = [
        Entry("shard-0", 1, 0, b"abc"),
        Entry("shard-12", 7, 99, b""),
        Entry("intents", 3, 5, b"x"),
    ]
    (tmp_path / COMMIT_DIR).mkdir()
    (tmp_path / COMMIT_DIR / "commit-00000001.log").write_bytes(
        encode_frame(entries) + encode_frame(entries[:1], 1)
    )
    scan = read_frames(tmp_path)
    assert scan.frames == [entries, entries[:1]]
    assert scan.warnings == []


def test_the_checkpoint_size_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^checkpoint_bytes must be >= 1, got 0$"):
        CommitLog(tmp_path, checkpoint_bytes=0)


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
    zero_tail=st.booleans(),
)
def test_damage_never_loads_a_damaged_frame_and_keeps_every_frame_before_it(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    cut: float,
    flips: list[tuple[float, int]],
    zero_tail: bool,
) -> None:
    data_dir = tmp_path_factory.mktemp("commit")
    frames = [[Entry("shard-0", 1, i * 1000, bytes([i]) * n)] for i, n in enumerate(sizes)]
    encoded = [encode_frame(f, i) for i, f in enumerate(frames)]
    whole = b"".join(encoded)
    damaged = bytearray(whole[: int(len(whole) * cut)])
    for where, mask in flips:
        if damaged:
            damaged[int(where * (len(damaged) - 1))] ^= mask
    if zero_tail:
        damaged += bytes(50)
    (data_dir / COMMIT_DIR).mkdir()
    (data_dir / COMMIT_DIR / "commit-00000001.log").write_bytes(bytes(damaged))
    first_damage = next(
        (i for i in range(min(len(whole), len(damaged))) if whole[i] != damaged[i]),
        min(len(whole), len(damaged)),
    )
    intact = 0  # frames wholly before the first damaged byte
    end = 0
    for frame in encoded:
        end += len(frame)
        if end > first_damage:
            break
        intact += 1
    scans = [read_frames(data_dir, repair=True)]
    try:
        scans.append(read_frames(data_dir))
    except CorruptLog as exc:
        where = exc.path
        assert where == data_dir / COMMIT_DIR / "commit-00000001.log"
    for scan in scans:
        # Never a damaged frame: every frame loaded is one written, in order.
        assert scan.frames == frames[: len(scan.frames)]
        assert len(scan.frames) >= intact


def test_a_torn_tail_is_ignored_and_damage_before_it_stops_the_start(tmp_path: Path) -> None:
    one, two = (
        encode_frame([Entry("shard-0", 1, 0, b"a")]),
        encode_frame([Entry("shard-0", 1, 1, b"b")], 1),
    )
    directory = tmp_path / COMMIT_DIR
    directory.mkdir()
    path = directory / "commit-00000001.log"
    path.write_bytes(one + two[:-3])
    scan = read_frames(tmp_path)
    assert len(scan.frames) == 1
    assert "ignored a torn commit frame at offset" in scan.warnings[0]
    bad = bytearray(one + two)
    bad[6] ^= 0xFF  # inside the first frame, a whole frame follows
    path.write_bytes(bytes(bad))
    with pytest.raises(
        CorruptLog, match=r"commit-00000001\.log: corrupt write-ahead log at offset 0"
    ):
        read_frames(tmp_path)
    scan = read_frames(tmp_path, repair=True)
    assert scan.frames == []
    assert "repair moves it and every later commit segment aside" in scan.warnings[0]


# -- redo after a power loss ----------------------------------------------------------------------


async def test_redo_puts_back_what_the_shard_logs_lost(tmp_path: Path) -> None:
    batches = [(s % 3, records(s % 3, 10 * s, 1 + s % 4)) for s in range(12)]
    with trio.fail_after(WAIT):
        written = await commit_batches(tmp_path, batches)
    assert len(list_commit_segments(tmp_path)) == 1
    lose_page_cache(tmp_path)
    warnings = redo_all(tmp_path)
    assert {path: path.read_bytes() for path in wal_files(tmp_path)} == written
    assert sum("acknowledged bytes from the commit log" in w for w in warnings) == 3
    assert list_commit_segments(tmp_path) == []  # redone, synced, dropped


async def test_redo_changes_nothing_after_a_process_crash(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        written = await commit_batches(tmp_path, [(0, records(0, 0, 3)), (1, records(1, 0, 2))])
    assert redo_all(tmp_path) == []
    assert {path: path.read_bytes() for path in wal_files(tmp_path)} == written


async def test_bytes_appended_outside_the_commit_log_go_in_the_next_frame(tmp_path: Path) -> None:
    # A segment's head mark, or a batch a killed shard took back, is appended
    # without a round: the next round's frame carries it, so no hole is left.
    log = SegmentedLog(tmp_path / "shard-0")
    coord = SyncCoordinator(method="commitlog", directory=tmp_path)
    head = records(0, 100, 1)
    try:
        with trio.fail_after(WAIT):
            await coord.sync(LogBatch(log, records(0, 0, 2)))
            log.append_encoded(head)
            await coord.sync(LogBatch(log, records(0, 2, 2)))
            written = log.path(log.current).read_bytes()
    finally:
        coord.close()
        log.close()
    frames = read_frames(tmp_path).frames
    assert [e.data for [e] in frames] == [records(0, 0, 2), head + records(0, 2, 2)]
    path = wal_files(tmp_path)[0]
    path.write_bytes(bytes(len(written)))  # zeroed pages: the size survived, the data not
    redo_all(tmp_path)
    assert path.read_bytes() == written


async def test_a_segment_deleted_since_is_not_brought_back(tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        await commit_batches(tmp_path, [(0, records(0, 0, 1)), (1, records(1, 0, 1))])
    [first, second] = wal_files(tmp_path)
    first.unlink()  # a snapshot covered it, say
    os.truncate(second, 0)
    redo_all(tmp_path)
    assert wal_files(tmp_path) == [second]
    assert second.read_bytes() == records(1, 0, 1)


@SETTINGS
@given(
    plan=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5)), min_size=1, max_size=10),
    losses=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.booleans()), max_size=4),
)
def test_any_loss_of_unsynced_shard_bytes_is_redone_exactly(
    tmp_path_factory: pytest.TempPathFactory,
    plan: list[tuple[int, int]],
    losses: list[tuple[float, float, bool]],
) -> None:
    data_dir = tmp_path_factory.mktemp("loss")
    batches = [(shard, records(shard, 10 * i, n)) for i, (shard, n) in enumerate(plan)]
    written = trio.run(commit_batches, data_dir, batches)
    paths = sorted(written)
    for where, size, truncate in losses:
        path = paths[int(where * (len(paths) - 1))]
        data = bytearray(path.read_bytes())
        at = int(size * len(data))
        if truncate:
            path.write_bytes(bytes(data[:at]))
        else:
            data[at : at + 37] = bytes(len(data[at : at + 37]))
            path.write_bytes(bytes(data))
    redo_all(data_dir)
    assert {path: path.read_bytes() for path in paths} == written


# -- checkpoints -----------------------------------------------------------------------------------


async def test_a_checkpoint_syncs_the_shard_logs_then_drops_the_older_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    coord = SyncCoordinator(method="commitlog", directory=tmp_path, checkpoint_bytes=300)
    logs = [SegmentedLog(tmp_path / f"shard-{s}") for s in range(2)]
    try:
        with trio.fail_after(WAIT):
            for i in range(8):
                await coord.sync(LogBatch(logs[i % 2], records(i % 2, i, 2)))
        commit_log = coord.commit_log
        assert commit_log is not None
        assert commit_log.checkpoints >= 1
        assert commit_log.frames == 8 + commit_log.checkpoints  # and one marker frame each
        segments = list_commit_segments(tmp_path)
        assert [n for n, _ in segments] == [max(n for n, _ in segments)]  # only the newest
        for log in logs:
            assert str(log.path(log.current)) in synced  # synced by the checkpoint
        # What the dropped segments held is in the shard logs, durably: a loss
        # now takes only what the newest segment holds again.
        written = {path: path.read_bytes() for path in wal_files(tmp_path)}
    finally:
        coord.close()
        for log in logs:
            log.close()
    redo_all(tmp_path)
    assert {path: path.read_bytes() for path in wal_files(tmp_path)} == written


def fail_fsync_once(
    monkeypatch: pytest.MonkeyPatch, where: str = "/commit/", *, armed: bool = False
) -> list[bool]:
    """Make the next ``os.fsync`` of a file whose path holds ``where`` fail (EIO) once armed.

    Returns the switch: ``armed[0]`` (cleared once it has failed).
    """
    real = os.fsync
    switch = [armed]

    def fsync(fd: int) -> None:
        if switch[0] and where in os.readlink(f"/proc/self/fd/{fd}"):
            switch[0] = False
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return switch


async def test_a_failed_commit_fails_the_round_and_the_next_goes_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = fail_fsync_once(monkeypatch)
    log = SegmentedLog(tmp_path / "shard-0")
    coord = SyncCoordinator(method="commitlog", directory=tmp_path)
    try:
        with trio.fail_after(WAIT):
            await coord.sync(LogBatch(log, records(0, 0, 1)))
            fail[0] = True
            batch = LogBatch(log, records(0, 1, 1))
            with pytest.raises(OSError, match="Input/output error") as failed:
                await coord.sync(batch)
            assert "commit-00000001.log" in str(failed.value)
            assert (batch.appended, batch.synced) == (True, False)
            await coord.sync(LogBatch(log, records(0, 2, 1)))
    finally:
        coord.close()
        log.close()
    # The failed frame was cut back; the next frame carries the failed batch's
    # bytes again (they were never covered), in a new segment.
    frames = read_frames(tmp_path).frames
    assert [e.data for [e] in frames] == [records(0, 0, 1), records(0, 1, 2)]
    assert [n for n, _ in list_commit_segments(tmp_path)] == [1, 2]


# -- the store -----------------------------------------------------------------------------------


def key_on_shard(kv: kvmemo.Store, shard: int, prefix: str) -> bytes:
    n = 0
    while kv.engine.slots.shard_of(f"{prefix}-{n}".encode()) != shard:
        n += 1
    return f"{prefix}-{n}".encode()


async def test_a_store_loses_nothing_acknowledged_when_the_shard_logs_lose_their_pages(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    acknowledged: dict[bytes, bytes] = {}
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=4, data_dir=str(data_dir), appendfsync="always") as kv:
            async with trio.open_nursery() as nursery:
                for w in range(8):

                    async def write(w: int = w) -> None:
                        for i in range(25):
                            key, value = b"w%d-%d" % (w, i), b"v%d" % i
                            await kv.set(key, value)
                            acknowledged[key] = value

                    nursery.start_soon(write)
            await kv.mset([(b"m-%d" % i, b"x") for i in range(20)])  # a multi-shard write
            acknowledged.update({b"m-%d" % i: b"x" for i in range(20)})
            # The directory as a power loss would leave it, had no shard log
            # page been written back: a copy taken now, shard logs emptied.
            crashed = Path(shutil.copytree(data_dir, tmp_path / "crashed"))
            control = Path(shutil.copytree(data_dir, tmp_path / "control"))
    lose_page_cache(crashed)
    lose_page_cache(control)
    shutil.rmtree(control / COMMIT_DIR)
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=4, data_dir=str(crashed)) as kv:
            keys = sorted(acknowledged)
            assert await kv.mget(*keys) == [acknowledged[k] for k in keys]
        # Without the commit log the same loss loses writes: the test is not vacuous.
        async with kvmemo.open_store(shards=4, data_dir=str(control)) as kv:
            keys = sorted(acknowledged)
            assert await kv.mget(*keys) != [acknowledged[k] for k in keys]


async def test_a_store_whose_commit_log_fails_reports_io_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = fail_fsync_once(monkeypatch)
    data_dir = tmp_path / "data"
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=2, data_dir=str(data_dir), appendfsync="always") as kv:
            key = key_on_shard(kv, 1, "k")
            await kv.set(b"before", b"1")
            fail[0] = True
            with pytest.raises(KVMemoError) as failed:
                await kv.set(key, b"doubtful")
            assert failed.value.kind == "IO"
            info = (await kv.info("persistence"))["persistence"]
            assert info["failing_shards"] == ["shard-1"]
            [shard1] = [s for s in info["shards"] if s["shard"] == "shard-1"]
            assert shard1["resave_pending"] is False  # nothing in doubt, see CommitLogError
            after = key_on_shard(kv, 1, "after")
            await kv.set(after, b"2")  # the next frame, in a new segment, holds both
            assert (await kv.info("persistence"))["persistence"]["health"] == "ok"
            assert [n for n, _ in list_commit_segments(data_dir)] == [1, 2]
            frames = read_frames(data_dir).frames
            assert b"doubtful" in frames[-1][0].data
            crashed = Path(shutil.copytree(data_dir, tmp_path / "crashed"))
    lose_page_cache(crashed)
    async with kvmemo.open_store(shards=2, data_dir=str(crashed)) as kv:
        assert await kv.mget(b"before", key, after) == [b"1", b"doubtful", b"2"]


# -- regressions found by review -------------------------------------------------------------------


class Durable:
    """A power-loss model: a shard log keeps only what an ``fsync`` made durable.

    Records, for every ``os.fsync``, the file's size at that moment;
    :meth:`crash_copy` copies a data directory and cuts each shard log
    segment in the copy back to its last synced size (0 if never synced).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: dict[str, int] = {}
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isfile(path):
                self.sizes[path] = max(self.sizes.get(path, 0), os.fstat(fd).st_size)

        monkeypatch.setattr(os, "fsync", fsync)

    def crash_copy(self, data_dir: Path, target: Path) -> Path:
        shutil.copytree(data_dir, target)
        for path in wal_files(data_dir):
            copy = target / path.relative_to(data_dir)
            keep = self.sizes.get(str(path), 0)
            if copy.stat().st_size > keep:
                os.truncate(copy, keep)
        return target


def set_op(key: bytes, value: bytes) -> ops.Set:
    return ops.Set(key, value, NO_EXPIRY, nx=False, xx=False, get=False)


@pytest.mark.parametrize("method", ["commitlog", "fsync"])
async def test_a_write_drained_with_a_save_survives_a_power_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # The Save appends the write before it outside any round and rotates; the
    # round for the write after it must make both durable before either is
    # acknowledged, though the snapshot is still being written.
    durable = Durable(monkeypatch)
    release = threading.Event()
    real_write = durable_shard.write_snapshot

    def slow_snapshot(*args: Any, **kwargs: Any) -> Any:
        release.wait(WAIT)  # a big shard: its snapshot takes a while
        return real_write(*args, **kwargs)

    monkeypatch.setattr(durable_shard, "write_snapshot", slow_snapshot)
    data_dir = tmp_path / "data"
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(
            shards=1, data_dir=str(data_dir), appendfsync="always", fsync_method=method
        ) as kv:
            await kv.set(b"warm", b"1")
            ref = kv.system.ref("shard-0")
            await trio.testing.wait_all_tasks_blocked()
            a = ref.ask_nowait(set_op(b"a", b"acked"))  # one batch: a, Save, b
            save = ref.ask_nowait(Save())
            b = ref.ask_nowait(set_op(b"b", b"acked"))
            assert await a.wait() == "OK"
            assert await b.wait() == "OK"
            crashed = durable.crash_copy(data_dir, tmp_path / "crashed")
            release.set()
            await (await save.wait()).wait()
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=1, data_dir=str(crashed)) as kv:
            assert await kv.mget(b"warm", b"a", b"b") == [b"1", b"acked", b"acked"]


async def test_bytes_left_at_the_end_of_a_rotated_segment_go_in_the_next_frame(
    tmp_path: Path,
) -> None:
    coord = SyncCoordinator(method="commitlog", directory=tmp_path)
    log = SegmentedLog(tmp_path / "shard-0")
    taken_back = records(0, 50, 1)
    try:
        with trio.fail_after(WAIT):
            await coord.sync(LogBatch(log, records(0, 0, 1)))
            log.append_encoded(taken_back)  # a killed shard's batch, taken back
            first = log.rotate()  # a snapshot's rotation
            await coord.sync(LogBatch(log, records(0, 1, 1)))
            await coord.sync(LogBatch(log, records(0, 2, 1)))  # nothing retired left over
        written = {path: path.read_bytes() for path in wal_files(tmp_path)}
    finally:
        coord.close()
        log.close()
    frames = read_frames(tmp_path).frames
    assert [(e.segment, e.data) for e in frames[1]] == [
        (first, taken_back),
        (first + 1, records(0, 1, 1)),
    ]
    assert [e.segment for e in frames[2]] == [first + 1]
    lose_page_cache(tmp_path)
    redo_all(tmp_path)
    assert {path: path.read_bytes() for path in wal_files(tmp_path)} == written


async def test_a_checkpoint_that_cannot_sync_a_log_keeps_the_frames_and_owes_a_resave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a write-back error a later fsync may succeed without writing the lost
    # pages: the failed segment is never trusted again, only a snapshot settles it.
    armed = fail_fsync_once(monkeypatch, "/shard-0/wal-", armed=True)
    coord = SyncCoordinator(method="commitlog", directory=tmp_path, checkpoint_bytes=300)
    log = SegmentedLog(tmp_path / "shard-0")
    try:
        with trio.fail_after(WAIT):
            for i in range(12):  # several checkpoints' worth
                await coord.sync(LogBatch(log, records(0, i, 2)))
            assert not armed[0]  # it failed
            assert coord.commit_log is not None
            assert coord.commit_log.checkpoints == 0  # none could drop anything
            assert len(list_commit_segments(tmp_path)) > 1
            error = coord.checkpoint_failure(log.directory)
            assert isinstance(error, OSError)
            assert coord.checkpoint_failure(log.directory) is None  # told once
            # The re-save's snapshot covers the segment: its file goes, and the
            # next checkpoint may drop the frames again.
            covers = log.rotate()
            log.remove_through(covers)
            for i in range(12, 24):
                await coord.sync(LogBatch(log, records(0, i, 2)))
            assert coord.commit_log.checkpoints >= 1
    finally:
        coord.close()
        log.close()


async def test_a_store_is_told_of_a_failed_checkpoint_and_resaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_shard, "SYNC_INTERVAL", 0.01)
    data_dir = tmp_path / "data"
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir), appendfsync="always") as kv:
            await kv.set(b"k", b"v")
            coord = kv.engine.persistence.sync_coordinator  # type: ignore[union-attr]
            assert coord.commit_log is not None
            error = OSError(errno.EIO, "Input/output error")
            coord.commit_log._failures["shard-0"] = error  # as checkpoint() records it
            while coord.commit_log._failures:  # noqa: ASYNC110 - the shard's loop takes it
                await trio.sleep(0.01)
            while (await kv.info("persistence"))["persistence"]["health"] != "ok":  # noqa: ASYNC110
                await trio.sleep(0.01)  # the re-save's snapshot settled it
            assert await kv.get(b"k") == b"v"


async def test_a_batch_too_big_for_a_frame_is_synced_by_its_own_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_coordinator, "MAX_ENTRY_BYTES", 100)
    monkeypatch.setattr(commitlog, "MAX_FRAME_BYTES", 40)  # about one record
    coord = SyncCoordinator(method="commitlog", directory=tmp_path)
    logs = [SegmentedLog(tmp_path / f"shard-{s}") for s in range(3)]
    big = encode_set(b"big", b"x" * 200)
    try:
        with trio.fail_after(WAIT):
            await coord.sync(LogBatch(logs[0], big))  # too big: its own fsync
            assert read_frames(tmp_path).frames == []
            async with trio.open_nursery() as nursery:  # one round, three logs
                for s in range(3):
                    nursery.start_soon(coord.sync, LogBatch(logs[s], records(s, 0, 1)))
            await coord.sync(LogBatch(logs[0], records(0, 1, 1)))  # small again: framed
    finally:
        coord.close()
        for log in logs:
            log.close()
    frames = read_frames(tmp_path).frames
    assert len(frames) == 4  # the round of three was split, one entry per frame
    assert all(sum(len(e.data) for e in frame) <= 40 for frame in frames)
    assert [e.data for f in frames for e in f][-1] == records(0, 1, 1)


async def test_a_closed_coordinator_falls_back_to_fsync_and_everysec_needs_no_commit_log(
    tmp_path: Path,
) -> None:
    coord = SyncCoordinator(method="commitlog", directory=tmp_path)
    log = SegmentedLog(tmp_path / "shard-0")
    try:
        with trio.fail_after(WAIT):
            await coord.sync(log.sync)  # a bare sync (everysec, SyncNow): no commit log
            assert not (tmp_path / COMMIT_DIR).exists()
            coord.close()
            batch = LogBatch(log, records(0, 0, 1))
            await coord.sync(batch)  # after close: the log's own fsync
            assert batch.synced
            assert not (tmp_path / COMMIT_DIR).exists()
    finally:
        log.close()


PAGE = 4096


def write_commit_segment(data_dir: Path, data: bytes) -> Path:
    (data_dir / COMMIT_DIR).mkdir(exist_ok=True)
    path = data_dir / COMMIT_DIR / "commit-00000001.log"
    path.write_bytes(data)
    return path


def test_a_last_frame_whose_header_straddles_a_lost_page_is_torn(tmp_path: Path) -> None:
    overhead = len(encode_frame([Entry("shard-0", 1, 0, b"")]))
    first = encode_frame([Entry("shard-0", 1, 0, b"a" * (PAGE - 6 - overhead))])
    second = encode_frame([Entry("shard-0", 1, len(first), b"b" * 100)], 1)
    write_commit_segment(tmp_path, first + second[:6] + bytes(len(second) - 6))
    scan = read_frames(tmp_path)
    assert (len(scan.frames), len(scan.warnings)) == (1, 1)


def test_a_last_frame_whose_header_page_was_lost_is_torn(tmp_path: Path) -> None:
    first = encode_frame([Entry("shard-0", 1, 0, b"a" * 10)])
    second = encode_frame([Entry("shard-0", 1, 10, b"b" * 3 * PAGE)], 1)
    whole = bytearray(first + second)
    whole[:PAGE] = first + bytes(PAGE - len(first))  # only the page synced before survived
    write_commit_segment(tmp_path, bytes(whole))
    assert len(read_frames(tmp_path).frames) == 1


def test_repair_moves_a_damaged_commit_log_aside(tmp_path: Path) -> None:
    one = encode_frame([Entry("shard-0", 1, 0, b"a")])
    two = encode_frame([Entry("shard-0", 1, 1, b"b")], 1)
    bad = bytearray(one + two)
    bad[6] ^= 0xFF
    path = write_commit_segment(tmp_path, bytes(bad))
    warnings = redo_all(tmp_path, repair=True)
    assert not path.exists()
    assert (tmp_path / COMMIT_DIR / f"{path.name}.corrupt-0").read_bytes() == bytes(bad)
    assert any("moved aside" in w for w in warnings)


def test_a_shard_log_tail_of_zero_bytes_is_cut_off_as_torn(tmp_path: Path) -> None:
    # A power loss after the file's size reached the disk and before its data did.
    log = SegmentedLog(tmp_path / "shard-0")
    log.append_encoded(records(0, 0, 3))
    path = log.path(log.current)
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + bytes(300))
    recovered = recover(tmp_path / "shard-0", now_ms=0)
    assert len(recovered.data) == 3
    assert "zero bytes" in recovered.warnings[0]
    assert path.read_bytes() == whole


@pytest.mark.parametrize("method", ["commitlog", "fsync"])
async def test_a_snapshot_is_never_durable_before_its_segments_head_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # Otherwise a power loss right after the snapshot leaves no mark of the
    # multi-shard rounds it covers, and recovery redoes an old MSET over newer
    # acknowledged writes.
    durable = Durable(monkeypatch)
    data_dir = tmp_path / "data"
    crashed = tmp_path / "crashed"
    real_write = durable_shard.write_snapshot
    one_at_a_time = threading.Lock()

    def write_then_lose_power(*args: Any, **kwargs: Any) -> Any:
        # The copy must be an image of one moment: no other shard's snapshot
        # renames files meanwhile (the lock), and no shard drops covered
        # segments meanwhile (that runs on the event loop, which the copy holds).
        with one_at_a_time:
            path = real_write(*args, **kwargs)
            if not crashed.exists():
                trio.from_thread.run_sync(durable.crash_copy, data_dir, crashed)
        return path

    monkeypatch.setattr(durable_shard, "write_snapshot", write_then_lose_power)
    keys = [b"k%d" % i for i in range(40)]
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(
            shards=2, data_dir=str(data_dir), appendfsync="always", fsync_method=method
        ) as kv:
            await kv.mset([(k, b"old") for k in keys])  # a multi-shard round
            for k in keys:
                await kv.set(k, b"new")
            assert await kv.execute("save") == "OK"
    assert crashed.exists()
    with trio.fail_after(WAIT):
        async with kvmemo.open_store(shards=2, data_dir=str(crashed)) as kv:
            assert await kv.mget(*keys) == [b"new"] * len(keys)


def test_damage_past_the_acknowledged_end_is_a_torn_tail(tmp_path: Path) -> None:
    # An append whose first page reached the disk and not its second: beyond
    # what any frame holds, so never acknowledged.
    log = SegmentedLog(tmp_path / "shard-0")
    acked = records(0, 0, 2)
    log.append_encoded(acked)
    log.append_encoded(encode_set(b"big", b"x" * 6000))
    path = log.path(log.current)
    log.close()
    data = bytearray(path.read_bytes())
    data[4096:] = bytes(len(data) - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog):  # nothing says where acknowledged bytes end
        recover(tmp_path / "shard-0", now_ms=0)
    got = recover(tmp_path / "shard-0", now_ms=0, acked={1: len(acked)})
    assert sorted(got.data) == [b"k0-0", b"k0-1"]
    assert "past the last acknowledged byte" in got.warnings[0]
    # A segment after every one named holds nothing known acknowledged.
    later = tmp_path / "shard-0" / segment_name(2)
    later.write_bytes(bytes(100) + records(0, 5, 1))
    got = recover(tmp_path / "shard-0", now_ms=0, acked={1: len(acked)})
    assert sorted(got.data) == [b"k0-0", b"k0-1"]


def test_a_head_mark_after_a_lost_tail_is_not_trusted(tmp_path: Path) -> None:
    # Round 7's part and mark were in segment 1's tail, lost; segment 2 opens
    # with the head mark repeating "7": trusting it would keep the intent's
    # redo from this shard.
    directory = tmp_path / "shard-0"
    directory.mkdir()
    (directory / segment_name(1)).write_bytes(records(0, 0, 1) + encode_txn(6, True) + bytes(200))
    (directory / segment_name(2)).write_bytes(encode_txn(7, True) + records(0, 1, 1))
    got = recover(directory, now_ms=0, acked={1: len(records(0, 0, 1) + encode_txn(6, True))})
    assert got.marks == {6: True}
    assert any("ignored its head mark" in w for w in got.warnings)
    # Without a lost tail, a head mark is what it says.
    (directory / segment_name(1)).write_bytes(records(0, 0, 1) + encode_txn(7, True))
    (directory / segment_name(2)).write_bytes(encode_txn(7, True) + records(0, 1, 1))
    assert recover(directory, now_ms=0).marks == {7: True}


async def test_a_segment_whose_own_sync_failed_keeps_its_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shard's own fsync took the write-back error; the checkpoint's later
    # fsync of that file would succeed without writing the lost pages.
    coord = SyncCoordinator(method="commitlog", directory=tmp_path, checkpoint_bytes=300)
    log = SegmentedLog(tmp_path / "shard-0")
    try:
        with trio.fail_after(WAIT):
            await coord.sync(LogBatch(log, records(0, 0, 1)))
            fail_fsync_once(monkeypatch, "/shard-0/wal-", armed=True)
            with pytest.raises(OSError, match="Input/output error"):
                await coord.sync(log.sync)  # a snapshot's or SyncNow's own sync
            for i in range(1, 12):
                await coord.sync(LogBatch(log, records(0, i, 2)))
            assert coord.commit_log is not None
            assert coord.commit_log.checkpoints == 0
            assert [n for n, _ in list_commit_segments(tmp_path)][0] == 1  # all kept
    finally:
        coord.close()
        log.close()
