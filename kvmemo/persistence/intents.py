"""The intent log: multi-shard writes that stay whole across a crash (redo).

Design (``docs/design-atomic-durability.md``). Each shard logs its own part
of a multi-shard write (an MSET over several shards, a RENAME or COPY
between shards, a transaction writing on several shards) at the end of its
own batch, so a crash between two shards' appends would leave the write in
part on disk. The engine therefore writes one ``INTENT`` record per
multi-shard round, holding every shard's effect records, before any shard
logs its part (and, with ``appendfsync always``, syncs it first): for MSET,
RENAME and COPY before it decides to commit; for a transaction, whose
effects are known only once its steps ran, after the shards ran them and
while they still hold (a *deferred* round, see
:class:`~kvmemo.storage.shard.Barrier`). Each shard then marks its
resolution of the round in its own log (a ``TXN`` record after its part:
committed or aborted).

Recovery redoes what the crash cut off: for every intent, every shard it
names whose log ends before that round (its last ``TXN`` mark is older)
gets the intent's records for it, unless some shard marked the round
aborted or the intent log says so. Why a redo at the end of a shard's log
is in order: a shard appends its batches in order, whole or torn at the
tail, so a log without the round's mark ends before the round: nothing it
holds was written after it. Why the intent must come first: no shard logs
its part (nor lets anyone read it, for a deferred round) before the intent
was written; a round whose intent is missing is on no shard's disk.

Rounds are serialised by the engine's writer lock and a round's parts are
in their shards' logs (written, or synced with ``always``) before the next
round starts, so only the newest round can ever need a redo: the log keeps
small segments and drops the older ones as it rotates. The redo is written
to the shard's directory as a new log segment before the store starts, and
the old intent segments are removed after that, so a second crash finds the
redone parts in the shards' logs.

What it promises: a process crash (``kill -9``) never leaves a multi-shard
write in part, in every ``appendfsync`` mode. A power loss keeps it whole
with ``always`` (the intent is synced before the decision, and each part
before its reply); with ``everysec`` and ``no`` a power loss may lose the
last second of writes, and of a multi-shard write some of its parts.

Ownership: the engine owns the :class:`IntentLog` (it writes under its
writer lock); recovery (:func:`read_intents`, :func:`plan_redo`,
:func:`write_redo`) runs before any shard starts. Blocking calls: run them
in a worker thread, or (``append`` without a sync) from the event loop as
the shards' appends are.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import attrs

from .records import (
    Corrupt,
    Op,
    Scanner,
    Torn,
    encode_intent,
    encode_txn,
    intent_sections,
    replay,
    txid_of,
)
from .snapshot import list_snapshots
from .wal import SegmentedLog, fsync_directory, list_segments, segment_name

INTENT_DIR = "intents"  # under the data directory, beside shard-N/
ROTATE_BYTES = 1 << 20  # an intent segment past this size is replaced by a new one


@attrs.define
class IntentScan:
    """What :func:`read_intents` found.

    Attributes:
        intents: txid -> shard -> that shard's effect records; an empty
            dict for a round the engine recorded as aborted.
        last_txid: the highest txid in the log (0 if none).
        warnings: damage found and skipped, one sentence each.
    """

    intents: dict[int, dict[int, bytes]] = attrs.field(factory=dict)
    last_txid: int = 0
    warnings: list[str] = attrs.field(factory=list)


def read_intents(data_dir: Path) -> IntentScan:
    """Read every intent of ``data_dir``'s intent log (blocking).

    A torn or damaged record ends its segment's scan with a warning: a torn
    one was never decided (the decision comes after the write), a damaged
    one cannot be trusted; neither is redone. Never raises on any bytes.

    Raises:
        OSError: a segment cannot be read.
    """
    scan = IntentScan()
    directory = data_dir / INTENT_DIR
    if not directory.is_dir():
        return scan
    for _, path in list_segments(directory):
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                continue
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                scanner = Scanner(buf)
                for op, key, value, _ in scanner:
                    if op != Op.INTENT:
                        scan.warnings.append(f"{path}: a {Op(op).name} record skipped")
                        continue
                    txid = txid_of(key)
                    try:
                        scan.intents[txid] = intent_sections(value)
                    except ValueError as exc:
                        scan.warnings.append(f"{path}: intent {txid} skipped: {exc}")
                        continue
                    scan.last_txid = max(scan.last_txid, txid)
                problem = scanner.problem
        if isinstance(problem, Torn):
            scan.warnings.append(
                f"{path}: a torn intent at offset {problem.offset} (a crash during its write; "
                "that round was never decided)"
            )
        elif isinstance(problem, Corrupt):
            scan.warnings.append(
                f"{path}: damaged intent log at offset {problem.offset}: {problem.reason}; "
                "the rest of this segment is ignored"
            )
    return scan


@attrs.frozen
class ShardMarks:
    """A recovered shard's ``TXN`` marks: txid -> committed, and the newest txid."""

    marks: dict[int, bool]
    last_txid: int


def plan_redo(
    scan: IntentScan, shards: dict[int, ShardMarks]
) -> dict[int, list[tuple[int, bytes]]]:
    """Which rounds each shard must redo: shard -> [(txid, effect records)], oldest first.

    A round is redone on every shard it names whose log ends before it
    (``txid > last_txid``), unless it was aborted: the intent log recorded
    the abort, or a shard marked it aborted. A shard the intent names but
    that recovery does not know (another shard count) is left out.
    """
    redo: dict[int, list[tuple[int, bytes]]] = {}
    for txid in sorted(scan.intents):
        sections = scan.intents[txid]
        if not sections:
            continue  # the engine recorded the abort
        if any(shards[s].marks.get(txid) is False for s in sections if s in shards):
            continue  # a shard aborted it: the decision was abort
        for shard, records in sections.items():
            known = shards.get(shard)
            if known is not None and txid > known.last_txid:
                redo.setdefault(shard, []).append((txid, records))
    return redo


def write_redo(
    shard_dir: Path,
    rounds: list[tuple[int, bytes]],
    data: dict[bytes, bytes],
    expires: dict[bytes, int],
) -> int:
    """Apply ``rounds`` to a recovered shard and log them as a new segment (blocking).

    The segment (numbered after every segment and snapshot in ``shard_dir``)
    holds each round's records followed by its ``TXN`` mark, and is synced
    with its directory before this returns, so the redo survives a second
    crash. Returns the records applied.

    Raises:
        OSError: the segment cannot be written or synced (the rounds are
            applied to ``data`` and ``expires`` even then).
    """
    buffer = b"".join(records + encode_txn(txid, True) for txid, records in rounds)
    result = replay(buffer, data, expires)
    assert result.problem is None, result.problem  # whole records, checked when read
    # Applied first: if the segment cannot be written, the redo still holds
    # in memory, and the intent (still the newest) asks for it next start.
    shard_dir.mkdir(parents=True, exist_ok=True)
    numbers = [n for n, _ in list_segments(shard_dir)]
    numbers += [covers for covers, _ in list_snapshots(shard_dir)]
    path = shard_dir / segment_name(max(numbers, default=0) + 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(buffer)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(shard_dir)
    return result.count


class IntentLog:
    """The store's intent log, for the engine to write under its writer lock.

    The log opens on first use (a new segment after those on disk), and
    again after a failure to open (a read-only or full directory at start:
    multi-shard writes then fail, as the shards' writes do, until it can).
    Call :meth:`drop_older` once recovery has redone what the older segments
    asked for.

    Invariant: every segment but the current one holds only rounds that
    ended (their parts are in their shards' logs), so rotating may remove
    them.
    """

    def __init__(self, data_dir: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self._directory = data_dir / INTENT_DIR
        self._rotate_bytes = rotate_bytes
        self._log: SegmentedLog | None = None
        self.last_txid = 0  # of the last intent appended, or the floor recovery set

    def _open(self) -> SegmentedLog:
        if self._log is None:
            self._log = SegmentedLog(self._directory, segment_bytes=self._rotate_bytes)
        return self._log

    def drop_older(self) -> None:
        """Remove every segment before the current one (recovery is done with them).

        Raises:
            OSError: the log cannot be opened, or a segment cannot be removed.
        """
        log = self._open()
        if log.current > 1:
            log.remove_through(log.current - 1)
        fsync_directory(log.directory)

    def append(self, txid: int, sections: list[tuple[int, bytes]]) -> None:
        """Write round ``txid``'s intent (not synced); an empty ``sections``: its abort.

        Before the write, a full segment is replaced by a new one and the
        older ones are removed (their rounds have ended).

        Raises:
            OSError: the log cannot be opened, or the write failed (nothing
                of the intent counts).
            ValueError: the log is closed, or the intent is too large.
        """
        log = self._open()
        if log.size() >= self._rotate_bytes:
            log.remove_through(log.rotate())
        log.append_encoded(encode_intent(txid, sections))
        self.last_txid = max(self.last_txid, txid)

    def sync(self) -> None:
        """Make every intent written so far durable (``os.fsync``; blocking).

        Raises:
            OSError: the sync failed.
        """
        if self._log is not None:
            self._log.sync()

    def close(self) -> None:
        """Close the log's descriptors (idempotent)."""
        if self._log is not None:
            self._log.close()
            self._log = None
