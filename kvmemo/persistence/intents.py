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

Retention. A round's parts usually reach their shards' logs before the
next round starts, but not always (a request timeout that stops waiting
for them, a shard killed with its part still in its journal, a batch
appended but not yet synced with ``always``). So an intent is kept until
every shard it names has its mark durably in its own log (written with
``everysec`` and ``no``, synced with ``always``): each shard reports its
oldest mark not yet durable, and a full segment is rotated and every older
segment whose rounds are all settled is removed. Recovery redoes every
intent it finds on every shard whose log ends before it, oldest first; a
shard whose marks a snapshot compacted away keeps its newest mark at the
head of its next segment, so its log still tells which rounds it holds.
The redo is written to the shard's directory as a new log segment before
the store starts, and the old intent segments are removed after that, so a
second crash finds the redone parts in the shards' logs. A shard rebuilt at
runtime (its memory untrusted, its journal dropped) redoes its parts the
same way.

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

import contextlib
import os
from pathlib import Path

import attrs

from .records import (
    Corrupt,
    Newer,
    NewerVersion,
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
from .wal import SegmentedLog, fsync_directory, list_segments, segment_name, write_all

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
    one cannot be trusted; neither is redone. A record of a newer format
    version (its CRC holds: see :mod:`.records`) is not damage: it stops the
    start, since skipping it would lose a round the recovery after it drops
    the log of. May run while the engine writes the log (a shard's
    rebuild): a segment removed meanwhile held only settled rounds.

    Raises:
        NewerVersion: a newer format version wrote a record (or a record
            inside an intent).
        OSError: a segment cannot be read.
    """
    scan = IntentScan()
    directory = data_dir / INTENT_DIR
    if not directory.is_dir():
        return scan
    for _, path in list_segments(directory):
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            continue  # removed meanwhile by the engine: its rounds had settled
        with file:
            # Read, not mapped: the engine may truncate a segment it is
            # writing (a failed append), which a mapping would turn into SIGBUS.
            scanner = Scanner(file.read())
        start = 0  # of the record being looked at
        for op, key, value, _ in scanner:
            if op != Op.INTENT:
                scan.warnings.append(f"{path}: a {Op(op).name} record skipped")
                start = scanner.end
                continue
            txid = txid_of(key)
            try:
                scan.intents[txid] = intent_sections(value)
            except NewerVersion as exc:
                raise NewerVersion(path, exc.version, exc.supported, offset=start) from None
            except ValueError as exc:
                scan.warnings.append(f"{path}: intent {txid} skipped: {exc}")
                start = scanner.end
                continue
            scan.last_txid = max(scan.last_txid, txid)
            start = scanner.end
        problem = scanner.problem
        if isinstance(problem, Newer):
            raise problem.error(path)
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
    (``txid > last_txid``: the shard's marks only ever increase), unless it
    was aborted: the intent log recorded the abort, or a shard marked it
    aborted. A shard the intent names but that recovery does not know
    (another shard count) is left out.
    """
    redo: dict[int, list[tuple[int, bytes]]] = {}
    for txid in sorted(scan.intents):
        sections = scan.intents[txid]
        if not sections:
            continue  # the engine recorded the abort (or a floor)
        if any(shards[s].marks.get(txid) is False for s in sections if s in shards):
            continue  # a shard aborted it: the decision was abort
        for shard, records in sections.items():
            known = shards.get(shard)
            if known is not None and txid > known.last_txid:
                redo.setdefault(shard, []).append((txid, records))
    return redo


def redo_records(rounds: list[tuple[int, bytes]]) -> bytes:
    """Each round's records followed by its committed ``TXN`` mark, as one buffer."""
    return b"".join(records + encode_txn(txid, True) for txid, records in rounds)


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
    buffer = redo_records(rounds)
    result = replay(buffer, data, expires)
    assert result.problem is None, result.problem  # whole records, checked when read
    # Applied first: if the segment cannot be written, the redo still holds
    # in memory (the caller has the shard's journal log it, and keeps the intents).
    shard_dir.mkdir(parents=True, exist_ok=True)
    numbers = [n for n, _ in list_segments(shard_dir)]
    numbers += [covers for covers, _ in list_snapshots(shard_dir)]
    path = shard_dir / segment_name(max(numbers, default=0) + 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, buffer)
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
    Recovery calls :meth:`drop_older` once every round of the older
    segments is in its shards' logs, or :meth:`keep_older` when one is not.

    Retention: an intent may go once every shard it names has its mark
    durably in its own log (``settled``, which the engine computes from the
    shards); a full segment is rotated and every older segment whose
    rounds are all settled is removed. Invariant: ``_max[n]`` is the newest
    txid of segment ``n``, for every segment of this log still on disk.
    """

    def __init__(self, data_dir: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self._directory = data_dir / INTENT_DIR
        self._rotate_bytes = rotate_bytes
        self._log: SegmentedLog | None = None
        self._max: dict[int, int] = {}
        self._older = 0  # newest txid of the segments recovery kept (0: none kept)
        self._current_bytes = 0  # written to the current segment
        self.last_txid = 0  # of the last intent appended, or the floor recovery set
        self.redone = 0  # shard parts recovery redid at start (for ``info persistence``)

    def _open(self) -> SegmentedLog:
        if self._log is None:
            # Rotation is ours (see append): the log itself never rotates by size.
            self._log = SegmentedLog(self._directory, segment_bytes=1 << 62)
            if self._older:
                self._max.update(dict.fromkeys(range(1, self._log.current), self._older))
        return self._log

    def drop_older(self) -> None:
        """Remove every segment before the current one (recovery is done with them).

        Raises:
            OSError: the log cannot be opened, or a segment cannot be removed.
        """
        log = self._open()
        if log.current > 1:
            log.remove_through(log.current - 1)
        for n in [n for n in self._max if n < log.current]:
            del self._max[n]
        fsync_directory(log.directory)

    def keep_older(self, newest: int) -> None:
        """Keep the segments on disk (up to txid ``newest``) until those rounds settle."""
        self._older = newest
        if self._log is not None:
            self._max.update(dict.fromkeys(range(1, self._log.current), newest))

    def append(self, txid: int, sections: list[tuple[int, bytes]], settled: int = 0) -> None:
        """Write round ``txid``'s intent (not synced); an empty ``sections``: its abort.

        Before the write, a full segment is replaced by a new one, and the
        older segments whose rounds are all settled (txid <= ``settled``)
        are removed.

        Raises:
            OSError: the log cannot be opened, or the write failed (nothing
                of the intent counts).
            ValueError: the log is closed, or the intent is too large.
        """
        log = self._open()
        if self._max.get(log.current, 0) and self._current_bytes >= self._rotate_bytes:
            log.rotate()
            self._current_bytes = 0
            done = [n for n, newest in self._max.items() if newest <= settled]
            # Segments go oldest first: up to the first one still needed.
            through = 0
            for n in sorted(self._max):
                if n not in done or n >= log.current:
                    break
                through = n
            if through:
                # Best effort: a segment that cannot go now goes at a later rotation.
                with contextlib.suppress(OSError):
                    log.remove_through(through)
                    for n in [n for n in self._max if n <= through]:
                        del self._max[n]
        self._current_bytes += log.append_encoded(encode_intent(txid, sections))
        self._max[log.current] = max(self._max.get(log.current, 0), txid)
        self.last_txid = max(self.last_txid, txid)

    def size(self) -> int:
        """Bytes of the intent segments on disk (0 while the log is not open)."""
        return 0 if self._log is None else self._log.size()

    def sync(self) -> None:
        """Make every intent written so far durable (``os.fsync``; blocking).

        Raises:
            OSError: the sync failed.
        """
        if self._log is not None:
            self._log.sync()

    @property
    def segments(self) -> SegmentedLog | None:
        """The log the intents are written to (None until the first is), for a sync round."""
        return self._log

    def close(self) -> None:
        """Close the log's descriptors (idempotent)."""
        if self._log is not None:
            self._log.close()
            self._log = None
