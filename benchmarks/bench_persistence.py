"""Persistence costs: write throughput per ``appendfsync``, snapshot pause, recovery rate.

Design: three measurements of the embedded store (``kvmemo.open_store``), each
against a figure of the same run, so that the ratios travel between
machines even though the absolute numbers do not:

- **Write throughput.** 64 concurrent writer tasks SET 16-byte keys to
  32-byte values (drawn uniformly from ``KEYSPACE`` keys, chosen before the
  clock starts) in a store without persistence, then with ``appendfsync no``,
  ``everysec`` and ``always``, each in a fresh data directory. Rounds
  alternate the modes (memory, no, everysec, always, memory, ...), so that a
  change in the machine's load hits all of them alike; the best round of each
  is kept and divided by the best in-memory round. The least process CPU
  per SET is reported too, with its ratio to the in-memory one: when other
  processes share the cores the wall ratios swing, while the CPU ratio of
  the modes that do not wait on the disk stays steady. The log's own calls are
  counted during the timed part: records per append (the commit batch) and
  records per fsync (the group commit: with ``always`` each shard syncs once
  per batch, so a batch can hold at most the writers waiting on that shard,
  about 64 / shards). The modes run with the default ``fsync_method``,
  ``commitlog``: a round's batches go to their shards' logs unsynced and to
  one commit log frame, synced once (rec/fs counts records per frame).
  ``always`` is also measured with fewer shards, with ``fsync_method="fsync"``
  (each shard's log synced itself: one fsync per shard per round), and with
  ``"syncfs"`` (where the kernel allows it: one ``syncfs`` per round; its
  rec/fs counts records per syncfs).
- **Snapshot pause.** One shard is loaded with ``--keys`` keys (MSET batches
  of 1000), then ``save`` runs while a reader task GETs keys of that shard in
  a loop. Reported: ``last_snapshot_pause_ms`` from ``info persistence`` (the
  copy of the shard's dicts, during which the shard serves nothing), the
  time until the snapshot was durable, and the reader's worst and p99 latency
  during the save against its p99 before (the writer thread shares the GIL).
- **Recovery rate.** A store is started on a directory holding ``--keys``
  keys, once holding only the log (a copy taken before the save) and once
  the snapshot; the time from ``open_store`` to the first command is divided
  into the keys recovered.
- **In-place edits.** ``EDITS`` SETBITs spread over a ``BITMAP_BYTES``
  bitmap (one shard, ``everysec``): the log bytes and the time per edit,
  logged as PATCH records, against the same edits logged as a SET of the
  whole value each (as before PATCH records; ``PATCH_MIN_VALUE`` raised past
  the bitmap for that run), then the bitmap's recovery from that log.

Targets are printed next to the figures and never asserted: a slow machine
or a busy CI runner must not fail the build.

Run: ``python -m benchmarks.bench_persistence [--quick] [--keys N] [--rounds R]
[--ops N] [--shards S]``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

import kvmemo
from kvmemo.persistence import SegmentedLog
from kvmemo.persistence.commitlog import CommitLog, Entry
from kvmemo.persistence.wal import syncfs_supported
from kvmemo.storage import durability, sync_coordinator
from kvmemo.storage.durable_shard import SyncNow

from ._util import Round, best, fmt_rate, fmt_us, load_average, percentile

CONCURRENCY = 64  # writer tasks
KEYSPACE = 100_000  # keys the writers draw from
KEY_FORMAT = b"key:%012d"  # 16 bytes
VALUE_FORMAT = b"val:%028d"  # 32 bytes
WARMUP_OPS = 2_000  # SETs before the clock starts (imports, first segment, caches)
LOAD_BATCH = 1000  # keys per MSET when loading the snapshot shard
READ_PAUSE = 0.0005  # seconds between the reader's GETs during the save
MODES = ("memory", "no", "everysec", "always")
TARGETS = {"everysec": 0.85, "always": 0.3}  # fraction of the in-memory throughput
TARGET_RECOVERY = 300_000  # keys/s
DEFAULT_SHARDS = 16  # the default config's shard count
ALWAYS_SHARDS = (4, 1)  # extra ``always`` measurements with fewer shards
CPU_SHARED = 0.85  # CPU / wall time under which a measurement is flagged as contended
SEED = 2024
BITMAP_BYTES = 1_250_000  # the in-place edits' bitmap (SETBIT at offset 10^7)
EDITS = 200


@attrs.frozen
class Sizes:
    """How much work each measurement does (full run or ``--quick``)."""

    ops: int  # timed SETs per throughput round
    rounds: int
    keys: int  # keys of the snapshot and recovery measurements


FULL = Sizes(ops=60_000, rounds=3, keys=1_000_000)
QUICK = Sizes(ops=10_000, rounds=2, keys=100_000)


# -- counting the log's calls -----------------------------------------------------------------


class LogCalls:
    """Counts log appends, and syncs (``SegmentedLog.sync`` and round ``syncfs`` calls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.appends = 0
        self.syncs = 0

    def reset(self) -> None:
        with self._lock:
            self.appends = self.syncs = 0

    def read(self) -> tuple[int, int]:
        with self._lock:
            return self.appends, self.syncs

    @contextmanager
    def installed(self) -> Iterator[LogCalls]:
        """Wrap the two methods for the duration of the block."""
        append, sync = SegmentedLog.append_encoded, SegmentedLog.sync
        append_uncovered, commit = SegmentedLog.append_uncovered, CommitLog.commit
        group_sync = sync_coordinator.syncfs

        def counted_append(log: SegmentedLog, data: bytes) -> int:
            with self._lock:
                self.appends += 1
            return append(log, data)

        def counted_append_uncovered(
            log: SegmentedLog, data: bytes
        ) -> list[tuple[int, int, bytes]]:
            with self._lock:
                self.appends += 1
            return append_uncovered(log, data)

        def counted_commit(log: CommitLog, entries: Sequence[Entry]) -> None:
            with self._lock:
                self.syncs += 1
            commit(log, entries)

        def counted_sync(log: SegmentedLog) -> None:
            with self._lock:
                self.syncs += 1
            sync(log)

        def counted_syncfs(fd: int) -> None:
            with self._lock:
                self.syncs += 1
            group_sync(fd)

        SegmentedLog.append_encoded = counted_append  # type: ignore[method-assign,assignment]
        SegmentedLog.sync = counted_sync  # type: ignore[method-assign,assignment]
        SegmentedLog.append_uncovered = counted_append_uncovered  # type: ignore[method-assign]
        CommitLog.commit = counted_commit  # type: ignore[method-assign]
        sync_coordinator.syncfs = counted_syncfs
        try:
            yield self
        finally:
            SegmentedLog.append_encoded = append  # type: ignore[method-assign]
            SegmentedLog.sync = sync  # type: ignore[method-assign]
            SegmentedLog.append_uncovered = append_uncovered  # type: ignore[method-assign]
            CommitLog.commit = commit  # type: ignore[method-assign]
            sync_coordinator.syncfs = group_sync


CALLS = LogCalls()


# -- write throughput -------------------------------------------------------------------------


@attrs.frozen
class WriteRound:
    """One timed round of SETs, with the log calls it made."""

    round: Round
    appends: int
    syncs: int


def _plan(ops: int, seed: int) -> list[list[bytes]]:
    """The keys each writer sets, drawn before the clock starts."""
    rng = random.Random(seed)
    per_task = ops // CONCURRENCY
    return [
        [KEY_FORMAT % rng.randrange(KEYSPACE) for _ in range(per_task)] for _ in range(CONCURRENCY)
    ]


async def _write_all(kv: kvmemo.Store, plan: list[list[bytes]]) -> None:
    value = VALUE_FORMAT % 0

    async def writer(keys: list[bytes]) -> None:
        for key in keys:
            await kv.set(key, value)

    async with trio.open_nursery() as nursery:
        for keys in plan:
            nursery.start_soon(writer, keys)


async def _write_round(
    mode: str, shards: int, ops: int, seed: int, method: str = "commitlog"
) -> WriteRound:
    warmup, timed = _plan(WARMUP_OPS, seed), _plan(ops, seed + 1)
    with tempfile.TemporaryDirectory(prefix="kvmemo-bench-") as tmp:
        settings: dict[str, Any] = {"shards": shards}
        if mode != "memory":
            settings.update(data_dir=tmp, appendfsync=mode, fsync_method=method)
        async with kvmemo.open_store(**settings) as kv:
            await _write_all(kv, warmup)
            CALLS.reset()
            started, cpu = time.perf_counter(), time.process_time()
            await _write_all(kv, timed)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
            appends, syncs = CALLS.read()
    done = sum(len(keys) for keys in timed)
    return WriteRound(Round(elapsed, done, cpu=cpu), appends, syncs)


@attrs.frozen
class WriteFigures:
    """A mode's best round (by wall time) and its least CPU per SET over all rounds."""

    best: WriteRound
    cpu_per_op: float  # seconds

    @classmethod
    def of(cls, rounds: Sequence[WriteRound]) -> WriteFigures:
        top = best([r.round for r in rounds])
        chosen = next(r for r in rounds if r.round is top)
        return cls(chosen, min(r.round.cpu / r.round.units for r in rounds))


def measure_writes(sizes: Sizes, shards: int) -> dict[str, WriteFigures]:
    """Figures per mode (and per extra ``always`` shard count), modes alternating."""
    cases = [(mode, shards, "commitlog") for mode in MODES]
    cases.append(("always", shards, "fsync"))
    if syncfs_supported() is None:
        cases.append(("always", shards, "syncfs"))
    cases += [("always", n, "commitlog") for n in ALWAYS_SHARDS if n != shards]
    results: dict[str, list[WriteRound]] = {}
    for r in range(sizes.rounds):
        for mode, n, method in cases:
            if method != "commitlog":
                name = f"{mode}, {method}"
            else:
                name = mode if n == shards else f"{mode}, {n} shard{'s' if n > 1 else ''}"
            results.setdefault(name, []).append(
                trio.run(_write_round, mode, n, sizes.ops, SEED + 100 * r, method)
            )
    return {name: WriteFigures.of(rounds) for name, rounds in results.items()}


# -- snapshot pause and recovery --------------------------------------------------------------


@attrs.frozen
class SnapshotFigures:
    keys: int
    load_seconds: float
    pause_ms: float
    save_seconds: float
    snapshot_bytes: int
    log_bytes: int
    read_p99_before: float
    read_p99_during: float
    read_max_during: float


async def _reader(kv: kvmemo.Store, keys: int, out: list[float], stop: trio.Event) -> None:
    rng = random.Random(SEED)
    while not stop.is_set():
        key = KEY_FORMAT % rng.randrange(keys)
        started = time.perf_counter()
        await kv.get(key)
        out.append(time.perf_counter() - started)
        await trio.sleep(READ_PAUSE)


async def _timed_reads(kv: kvmemo.Store, keys: int, seconds: float) -> list[float]:
    out: list[float] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reader, kv, keys, out, stop)
        await trio.sleep(seconds)
        stop.set()
    return out


async def _snapshot(keys: int, data_dir: Path, log_copy: Path) -> SnapshotFigures:
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
        started = time.perf_counter()
        for first in range(0, keys, LOAD_BATCH):
            batch = range(first, min(keys, first + LOAD_BATCH))
            await kv.mset([(KEY_FORMAT % i, VALUE_FORMAT % i) for i in batch])
        await kv.system.ref("shard-0").ask(SyncNow())
        load_seconds = time.perf_counter() - started
        shard_dir = data_dir / "shard-0"
        log_bytes = sum(p.stat().st_size for p in shard_dir.glob("wal-*.log"))
        await trio.to_thread.run_sync(shutil.copytree, data_dir, log_copy)
        before = await _timed_reads(kv, keys, 0.3)
        during: list[float] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reader, kv, keys, during, stop)
            started = time.perf_counter()
            await kv.execute("save")
            save_seconds = time.perf_counter() - started
            stop.set()
        info = (await kv.info("persistence"))["persistence"]
        snapshot_bytes = sum(p.stat().st_size for p in shard_dir.glob("snap-*.kvs"))
    return SnapshotFigures(
        keys,
        load_seconds,
        float(info["last_snapshot_pause_ms"]),
        save_seconds,
        snapshot_bytes,
        log_bytes,
        percentile(before, 0.99),
        percentile(during, 0.99),
        max(during, default=float("nan")),
    )


async def _recover(data_dir: Path, keys: int) -> float:
    """Seconds from ``open_store`` to the first command answered, on ``data_dir``."""
    started = time.perf_counter()
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
        found = await kv.dbsize()
        elapsed = time.perf_counter() - started
    if found != keys:
        raise RuntimeError(f"recovered {found} keys from {data_dir}, expected {keys}")
    return elapsed


# -- in-place edits ---------------------------------------------------------------------------


@attrs.frozen
class EditFigures:
    log_bytes: int  # added by the edits
    seconds: float  # per edit
    recovery: float  # seconds, open_store until the first reply


async def _edits(data_dir: Path, whole: bool) -> EditFigures:
    """``EDITS`` SETBITs on a ``BITMAP_BYTES`` bitmap; ``whole``: logged as whole SETs."""
    saved = durability.PATCH_MIN_VALUE
    if whole:
        durability.PATCH_MIN_VALUE = 1 << 62  # no value is long enough: every edit whole
    try:
        async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
            await kv.execute("SETBIT", "bitmap", str(8 * BITMAP_BYTES - 1), "1")
            created = _log_bytes(data_dir)
            step = (8 * BITMAP_BYTES - 1) // EDITS
            started = time.perf_counter()
            for i in range(EDITS):
                await kv.execute("SETBIT", "bitmap", str(i * step), "1")
            seconds = (time.perf_counter() - started) / EDITS
            grown = _log_bytes(data_dir) - created
            value = await kv.get("bitmap")
            kv.engine.skip_final_snapshot()  # recovery replays the edits
    finally:
        durability.PATCH_MIN_VALUE = saved
    started = time.perf_counter()
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir)) as kv:
        if await kv.get("bitmap") != value:
            raise RuntimeError("the bitmap recovered is not the one written")
        recovery = time.perf_counter() - started
    return EditFigures(grown, seconds, recovery)


def _log_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.rglob("wal-*.log"))


# -- the report -------------------------------------------------------------------------------


def _write_row(name: str, figures: WriteFigures, memory: WriteFigures) -> str:
    r = figures.best
    ratio = r.round.rate / memory.best.round.rate
    cpu_ratio = memory.cpu_per_op / figures.cpu_per_op
    mode = name.split(",")[0]
    target = TARGETS.get(mode) if name == mode else None
    target_col = f">= {target:.2f} {'met' if ratio >= target else 'MISSED'}" if target else ""
    records = r.round.units  # one record per SET
    per_append = f"{records / r.appends:.1f}" if r.appends else "-"
    per_sync = f"{records / r.syncs:.1f}" if r.syncs else "-"
    share = f"{r.round.cpu_share:.0%}"
    return (
        f"{name:<18} {fmt_rate(r.round.rate):>7} {ratio:>6.3f} {share:>5} "
        f"{fmt_us(figures.cpu_per_op):>7} {cpu_ratio:>6.3f} "
        f"{per_append:>7} {per_sync:>7}  {target_col}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_persistence",
        description="Write throughput per appendfsync against the in-memory store, the "
        "snapshot pause of one shard, and the recovery rate.",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (~20 s)")
    parser.add_argument(
        "--keys",
        type=int,
        default=None,
        help=f"keys of the snapshot shard and of recovery ({FULL.keys:,}; quick {QUICK.keys:,})",
    )
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds per mode")
    parser.add_argument("--ops", type=int, default=None, help="timed SETs per round")
    parser.add_argument(
        "--shards", type=int, default=DEFAULT_SHARDS, help="shards of the throughput store"
    )
    args = parser.parse_args(argv)
    for name in ("keys", "rounds", "ops", "shards"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.ops is not None and args.ops < CONCURRENCY:
        parser.error(f"--ops must be >= {CONCURRENCY}, got {args.ops}")
    return args


def _timed(what: str, fn: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = fn()
    print(f"  ({what}: {time.perf_counter() - started:.1f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    """Measure throughput per mode, then the snapshot pause, then recovery; print tables."""
    args = _parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = attrs.evolve(
        sizes,
        rounds=args.rounds if args.rounds is not None else sizes.rounds,
        ops=args.ops if args.ops is not None else sizes.ops,
        keys=args.keys if args.keys is not None else sizes.keys,
    )
    run_started = time.perf_counter()
    print(
        f"embedded store, {args.shards} shards, {CONCURRENCY} writer tasks, SET of 16 B keys "
        f"(from {KEYSPACE:,}) to 32 B values; {sizes.ops:,} SETs per round, best of "
        f"{sizes.rounds} (modes alternate);\nload average {load_average()}"
    )
    with CALLS.installed():
        writes = _timed("throughput", lambda: measure_writes(sizes, args.shards))
    memory = writes["memory"]
    header = (
        f"{'appendfsync':<18} {'SET/s':>7} {'ratio':>6} {'cpu':>5} {'µs/SET':>7} {'ratio':>6} "
        f"{'rec/app':>7} {'rec/fs':>7}  target (wall ratio)"
    )
    print(header)
    print("-" * len(header))
    for name, r in writes.items():
        print(_write_row(name, r, memory))
    print(
        "ratio: SET/s over the in-memory SET/s (wall, best round); cpu: CPU / wall time of "
        "that round;\nµs/SET: least process CPU per SET over the rounds, and its ratio (the "
        "in-memory µs/SET over it: steady\nwhen other processes share the cores); rec/app, "
        "rec/fs: log records per append (commit batch) and per fsync"
    )
    shared = sum(
        1
        for name, f in writes.items()
        if f.best.round.cpu_share < CPU_SHARED and "always" not in name
    )
    if shared:
        print(
            f"note: besides always (which waits on fsync), {shared} of the rows ran below "
            f"{CPU_SHARED:.0%} CPU: the cores were shared, the wall ratios are noisy"
        )

    with tempfile.TemporaryDirectory(prefix="kvmemo-bench-") as tmp:
        data_dir, log_copy = Path(tmp) / "data", Path(tmp) / "log-only"
        snap = _timed("snapshot", lambda: trio.run(_snapshot, sizes.keys, data_dir, log_copy))
        from_log = _timed("recovery", lambda: trio.run(_recover, log_copy, sizes.keys))
        from_snapshot = trio.run(_recover, data_dir, sizes.keys)
    print(
        f"\nsnapshot of one shard holding {snap.keys:,} keys (loaded in "
        f"{snap.load_seconds:.1f} s, log {snap.log_bytes / 1e6:.1f} MB):\n"
        f"  pause of the shard (last_snapshot_pause_ms): {snap.pause_ms:8.1f} ms\n"
        f"  save until durable:                          {snap.save_seconds * 1000:8.1f} ms "
        f"({snap.snapshot_bytes / 1e6:.1f} MB)\n"
        f"  GET latency on that shard, p99 before / p99 during / max during the save: "
        f"{fmt_us(snap.read_p99_before)} / {fmt_us(snap.read_p99_during)} / "
        f"{fmt_us(snap.read_max_during)} µs"
    )
    print(f"\nrecovery of {sizes.keys:,} keys, open_store until the first reply:")
    for name, seconds in (("log only", from_log), ("snapshot", from_snapshot)):
        rate = sizes.keys / seconds
        verdict = "met" if rate >= TARGET_RECOVERY else "MISSED"
        print(
            f"  {name:<9} {seconds:6.2f} s  {fmt_rate(rate):>7} keys/s  "
            f">= {fmt_rate(TARGET_RECOVERY)} {verdict}"
        )

    with tempfile.TemporaryDirectory(prefix="kvmemo-bench-") as tmp:
        patched = _timed("edits", lambda: trio.run(_edits, Path(tmp) / "patch", False))
        whole = trio.run(_edits, Path(tmp) / "whole", True)
    print(
        f"\n{EDITS} SETBITs on a {BITMAP_BYTES / 1e6:.2f} MB bitmap (everysec), logged as "
        "PATCH records against whole SETs (as before):"
    )
    for name, f in (("PATCH", patched), ("whole SET", whole)):
        print(
            f"  {name:<9} log {f.log_bytes / EDITS:>11,.0f} B/edit  {f.seconds * 1e6:>7.0f} µs/edit"
            f"  recovery {f.recovery * 1000:6.1f} ms"
        )
    print(
        f"  ratio     log {whole.log_bytes / patched.log_bytes:,.0f}x smaller, "
        f"{whole.seconds / patched.seconds:.1f}x faster per edit"
    )
    print(f"\ntotal {time.perf_counter() - run_started:.1f} s, load average {load_average()}")


if __name__ == "__main__":
    main()
