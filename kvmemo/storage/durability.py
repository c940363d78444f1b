"""A shard's durability: the effects it journals and the log they go to.

Design: a shard's store records the *effect* of every write in its
:class:`Journal` (a SET with the full value and an absolute expiry in Unix
milliseconds, a DEL, an EXPIRE, a FLUSH), synchronously, in the same
checkpoint-free section as the change itself. The shard actor commits the
journal once per drained batch of messages (group commit): one append to
its :class:`~kvmemo.persistence.SegmentedLog`, then, with
``appendfsync always``, one fsync in a worker thread before any reply of
the batch is delivered (with ``always`` the append and the fsync both run
in the store's sync round, see :class:`LogBatch`). ``everysec`` syncs from
a background loop at least once a second; ``no`` leaves syncing to the OS.

Expiry is journalled as an absolute time, so replay is deterministic and a
key that expired while the server was down is not loaded. Lazy and active
expiry deletions are not journalled (the absolute expiry says it all);
evictions and deletions are.

:class:`ShardDurability` belongs to the shard's lasting state (like the
store), so a restarted shard keeps appending to the same log.
"""

from __future__ import annotations

import enum
import threading
import time
from pathlib import Path

import trio

from ..errors import TooLargeError
from ..persistence import AppendFsync, Op, SegmentedLog, encode_fields, encode_set
from ..persistence.records import (
    MAX_PAYLOAD,
    MIN_PAYLOAD,
    encode_base,
    encode_group,
    encode_patch,
    encode_txn,
    group_contents,
    record_crc,
)
from .sync_coordinator import CommitWrite

GROUP_OVERHEAD = MIN_PAYLOAD  # a GROUP record's payload beyond the records it holds
# An in-place edit (SETBIT, SETRANGE, APPEND, BITFIELD) is logged as a PATCH
# of the bytes it changed when its value is at least this long and the edit
# at most a quarter of it; else as a SET of the whole value, self-contained
# (see kvmemo.persistence.records), which costs no more.
PATCH_MIN_VALUE = 256  # bytes
# Keys a journal keeps the base of (see Journal.bases): past it, the oldest
# goes, and its next edit is logged whole. Bounds the memory bases cost (about
# 140 bytes each, not counted in maxmemory: at most 140 KiB a shard) whatever
# the number of keys edited or created by edits.
BASES_MAX = 1024

# Appended to the error of a shard that owes a re-save (see ShardDurability).
RESAVE_NOTE = "; a sync failed: a snapshot will re-save what the log held"


def wall_offset() -> float:
    """Unix time minus trio time: adds to a trio deadline to make it a Unix time.

    Raises:
        RuntimeError: outside a trio run.
    """
    return time.time() - trio.current_time()


def record_too_large(exc: ValueError) -> TooLargeError:
    """The error of a write whose log record could not be encoded (``exc`` says why)."""
    return TooLargeError(f"the write does not fit one log record: {exc}")


class Journal:
    """Encoded effects of writes not yet handed to the log.

    ``offset`` converts the store's monotonic times to Unix time (seconds):
    None until the first record of a batch that has an expiry reads it from
    both clocks; the shard resets it to None after each batch (a clock that
    jumps between batches, as trio's MockClock does, is read again).
    ``last_txid`` / ``last_committed``: the newest multi-shard round this
    shard resolved (see :mod:`kvmemo.persistence.intents`), 0 if none;
    ``logged_txid`` / ``logged_committed``: the newest whose mark is in the
    log (appended), which a new segment repeats at its head (:meth:`head`),
    so a log compacted into a snapshot still tells recovery which rounds it
    holds. Not ``last_txid``: a mark still waiting here (a redo, a failed
    batch's round) must not reach the log before its round's records.

    ``gaps`` counts the times the log lost sight of what the memory holds:
    a failed batch's effects dropped (see :meth:`requeue_taken`), a sync
    that failed (the bytes it was to make durable are in doubt); and
    ``gaps_saved`` how many of them a written snapshot (a copy of the memory
    taken after them) has covered. While one is not covered, and while
    ``whole`` is set (a multi-shard round's part, whose records its intent
    holds too), an in-place edit is journalled as a ``SET`` of the whole
    value, never as a ``PATCH`` (:meth:`edit_record`): replay would skip a
    ``PATCH`` whose base the log lost, and the edit, acknowledged, with it.

    ``bases``: per key edited in place, the CRC of the record journalled
    last for it, a base SET or a PATCH, and the value it gave the key (the
    very object the store holds, while it does): what the key's next edit
    names as its base (see :class:`~kvmemo.persistence.records.Chains`,
    which replay keeps the same way). Any other write of the key removes it
    (the store calls :meth:`forget`), and so does a snapshot's copy (a
    snapshot's entries are no PATCH's base); an edit of a key not in it, or
    whose value is no longer that object, is journalled as a base SET. Its
    values are the store's own, so it costs only its entries (about 140
    bytes each, not counted in ``maxmemory``), at most ``BASES_MAX`` (the
    oldest key goes first).
    """

    __slots__ = (
        "bases",
        "carried",
        "gaps",
        "gaps_saved",
        "last_committed",
        "last_txid",
        "logged_committed",
        "logged_txid",
        "marks",
        "offset",
        "own",
        "records",
        "taken",
        "taken_data",
        "whole",
    )

    def __init__(self) -> None:
        self.records: list[bytes] = []
        # Unix time minus trio time, for the expiry of the records of one
        # batch: None until a record needs it (the owner resets it per batch).
        self.offset: float | None = None
        self.last_txid = 0
        self.last_committed = True
        self.logged_txid = 0
        self.logged_committed = True
        # The round marks among ``records`` as (txid, committed, record), and
        # those of the last take with its bytes (until it is written).
        self.marks: list[tuple[int, bool, bytes]] = []
        self.taken: list[tuple[int, bool, bytes]] = []
        self.taken_data = b""
        # Bytes at the front of ``records`` carried over from a failed take,
        # and whether the last take held records of its own batch besides.
        self.carried = 0
        self.own = False
        self.gaps = 0
        self.gaps_saved = 0
        self.whole = False
        self.bases: dict[bytes, tuple[int, bytes]] = {}

    def mark(self, txid: int, committed: bool) -> None:
        """Journal that this shard committed (or aborted) multi-shard round ``txid``."""
        record = encode_txn(txid, committed)
        self.records.append(record)
        self.marks.append((txid, committed, record))
        self.last_txid = txid
        self.last_committed = committed

    def redo(self, rounds: list[tuple[int, bytes]]) -> None:
        """Journal rounds recovery redid (records, then a committed mark each).

        For a redo not yet in the log: the next append logs it first, and
        meanwhile its marks keep the engine's intents. Carried (see ``own``):
        no batch's own, so a read does not fail while the log cannot take it.
        """
        for txid, records in rounds:
            self.records.append(records)
            self.mark(txid, True)
            self.carried += len(records) + len(self.records[-1])

    def written(self) -> list[tuple[int, bool, bytes]]:
        """The last take is in the log: forget its bytes; its marks, for the caller."""
        taken, self.taken, self.taken_data = self.taken, [], b""
        if taken:
            self.logged_txid, self.logged_committed, _ = taken[-1]
        return taken

    def requeue_taken(self, limit: int) -> None:
        """The last take was not written: if it held a round's mark, it goes first in the next.

        Memory holds its effects (their replies failed with ``IO``,
        ``applied`` null), so the log gets them later rather than never: a
        round's part must not go missing from a log that holds its mark, nor
        a round be left unresolved before later writes (recovery would redo
        it after them). Past ``limit`` bytes waiting (a disk failing for
        long), only the marks are kept, not the effects. A batch without a
        round is dropped (as before rounds had marks: its replies said
        ``IO``). The carried bytes are not the next batch's own: a read-only
        batch does not fail for them (see ``own``).
        """
        if not self.taken:
            if self.taken_data:
                self.gaps += 1  # its effects are in memory, not in the log
            self.taken_data = b""  # no round in it: dropped, as any failed batch
            return
        waiting = sum(map(len, self.records))
        if waiting + len(self.taken_data) <= limit:
            carry = [self.taken_data]
        else:
            carry = [record for _, _, record in self.taken]
            self.gaps += 1  # the effects are dropped, their marks kept
        self.records[:0] = carry
        self.carried = sum(map(len, carry))
        self.marks[:0] = self.taken
        self.taken, self.taken_data = [], b""

    def head(self) -> bytes:
        """The mark of the newest round logged, to open a new segment with (b"" if none)."""
        return encode_txn(self.logged_txid, self.logged_committed) if self.logged_txid else b""

    def unix_ms(self, expires_at: float | None) -> int | None:
        """``expires_at`` (trio time) as Unix ms, by the batch's wall-clock offset."""
        if expires_at is None:
            return None
        offset = self.offset
        if offset is None:
            # Read once per batch, at its first expiry (see ``offset``): most
            # batches of plain writes never need the two clocks.
            try:
                offset = self.offset = wall_offset()
            except RuntimeError:
                # Outside a trio run (a store driven directly, as unit tests
                # do): its times are taken as Unix times already.
                offset = self.offset = 0.0
        return round((expires_at + offset) * 1000)

    def set(self, key: bytes, value: bytes, expires_at: float | None) -> None:
        self.records.append(self.set_record(key, value, expires_at))

    def set_record(self, key: bytes, value: bytes, expires_at: float | None) -> bytes:
        """The record :meth:`set` journals, not journalled: a writer encodes it before
        it changes anything, so that a record the log cannot hold is a clean refusal.

        Raises:
            TooLargeError: the key and value are over one record (``MAX_PAYLOAD``);
                the size limits of ``StoreConfig`` keep every write under it.
        """
        try:
            if expires_at is None:
                return encode_set(key, value)
            return encode_fields(Op.SET, key, value, self.unix_ms(expires_at))
        except ValueError as exc:
            raise record_too_large(exc) from None

    def edit_record(
        self,
        key: bytes,
        value: bytes,
        expires_at: float | None,
        offset: int,
        data: bytes,
        old: bytes | None,
    ) -> tuple[bytes, bool]:
        """:meth:`set_record` of ``value`` (with the expiry the key keeps, ``expires_at``),
        made by editing the key's live value ``old`` (None: none): its bytes
        from ``offset`` replaced with ``data``, zero-filled up to ``offset``
        first if shorter.

        A PATCH of the edit, naming its base (see ``bases``), when that is
        much shorter than the value (see ``PATCH_MIN_VALUE``); else a SET of
        the value: a base SET if the next edit may be a PATCH of it, a plain
        one while ``whole`` is set or a gap is not covered (see the class
        docstring). The caller journals the record, then calls
        :meth:`wrote` with the flag returned.

        Returns:
            The record, and whether it is a PATCH's base (a PATCH or a base SET).

        Raises:
            TooLargeError: as :meth:`set_record`.
        """
        if len(value) < PATCH_MIN_VALUE or self.whole or self.gaps != self.gaps_saved:
            return self.set_record(key, value, expires_at), False
        try:
            base = self.bases.get(key)
            if base is None or base[1] is not old or old is None or 4 * len(data) > len(value):
                return encode_base(key, value, self.unix_ms(expires_at)), True
            return encode_patch(key, offset, data, (base[0], len(old))), True
        except ValueError as exc:
            raise record_too_large(exc) from None

    def wrote(self, key: bytes, value: bytes, record: bytes, base: bool) -> None:
        """The store journalled ``record``, which gave ``key`` ``value``.

        ``base``: as :meth:`edit_record` returned; False for any other write.
        """
        bases = self.bases
        if base:
            if len(bases) >= BASES_MAX and key not in bases:
                del bases[next(iter(bases))]  # the oldest: its next edit is a base SET
            bases[key] = (record_crc(record), value)
        elif bases:
            bases.pop(key, None)

    def forget(self, key: bytes) -> None:
        """``key`` was written, removed or renamed: it has no base (see ``bases``)."""
        if self.bases:
            self.bases.pop(key, None)

    def saved(self, gaps: int) -> None:
        """A snapshot of the memory, copied when ``gaps`` gaps had been counted, is written."""
        self.gaps_saved = max(self.gaps_saved, gaps)

    def set_many(self, items: list[tuple[bytes, bytes]], encoded: bytes | None = None) -> None:
        """SETs without expiry of one command (an MSET's part), as one ``GROUP`` record.

        ``encoded``: the pairs already encoded as records, in order (an
        intent made them). Replay applies all of them or, torn by a crash,
        none. A group that would not fit in one record (over
        ``MAX_PAYLOAD``, 2 GiB) is logged as separate records, which a torn
        write may cut between.
        """
        if encoded is None:
            encoded = b"".join([encode_set(k, v) for k, v in items])
        if len(items) > 1 and len(encoded) + GROUP_OVERHEAD <= MAX_PAYLOAD:
            encoded = encode_group(encoded)
        self.records.append(encoded)

    def group_since(self, mark: int) -> None:
        """Make the records journalled since ``mark`` (a ``len(records)``) one ``GROUP`` record.

        For the effects of one command (a RENAME on one shard, a
        transaction's part), so that a torn write brings back all or none of
        them. Nothing changes for fewer than two entries, or past the 2 GiB
        record limit (see :meth:`set_many`). No mark may be among them.
        """
        if len(self.records) - mark < 2:
            return
        # Groups do not nest: a group among them (an MSET step's) is unwrapped.
        data = b"".join([group_contents(e) or e for e in self.records[mark:]])
        if len(data) + GROUP_OVERHEAD <= MAX_PAYLOAD:
            del self.records[mark:]
            self.records.append(encode_group(data))

    def delete(self, key: bytes) -> None:
        self.records.append(encode_fields(Op.DEL, key))

    def expire(self, key: bytes, expires_at: float | None) -> None:
        self.records.append(encode_fields(Op.EXPIRE, key, b"", self.unix_ms(expires_at)))

    def flush(self) -> None:
        self.records.append(encode_fields(Op.FLUSH, b""))

    def take(self) -> bytes:
        """Everything journalled since the last take, as one buffer.

        Until :meth:`written` or :meth:`requeue_taken`, the buffer and its
        marks stay in ``taken_data`` and ``taken``.
        """
        data = b"".join(self.records)
        self.records.clear()
        self.taken, self.marks = self.marks, []
        self.taken_data = data
        self.own = len(data) > self.carried
        self.carried = 0
        return data

    def pending_txid(self) -> int:
        """The oldest round marked here and not yet written (0: none)."""
        if self.taken:
            return self.taken[0][0]
        return self.marks[0][0] if self.marks else 0


class Health(enum.Enum):
    """Whether the shard's writes are being made durable."""

    OK = "ok"
    FAILING = "failing"  # the last append or sync failed, or a failed sync awaits its re-save


class SnapshotStatus(enum.Enum):
    """How the shard's last snapshot went (Redis's ``rdb_last_bgsave_status`` words)."""

    OK = "ok"
    ERR = "err"


class ShardDurability:
    """The log, policy and health of one shard's persistence.

    Invariants: ``dirty`` is True when bytes were appended since the
    start of the last successful sync (appends made while a background sync
    runs are not covered by it); ``appends`` counts the successful appends;
    ``unsynced_marks`` holds (txid, append number) of the round marks
    appended with ``always`` and not yet synced (with ``everysec`` and
    ``no`` a mark counts once written: the engine keeps a round's intent
    until every shard it names has its mark there, see :meth:`unsettled`);
    ``unsaved`` is the bytes appended since the last snapshot's rotation (the
    log's size when opened, at first); ``error`` holds the last failure
    while ``health`` is FAILING.

    ``health`` is the log's alone (its appends and syncs: whether writes are
    being made durable); a snapshot's outcome has its own status
    (``snapshot_status``, None before the first snapshot tried, and
    ``snapshot_error`` while it is ERR), as Redis keeps
    ``rdb_last_bgsave_status`` apart from ``aof_last_write_status``. A
    failed snapshot loses nothing the log holds. A snapshot written whose
    covered log segments could not be deleted is a good snapshot (recovery
    never reads a segment a snapshot covers): the segments left are
    counted apart (``leftover_segments``, ``leftover_error``) and their
    removal is tried again (see ``DurableShardActor``).

    A failed sync (:meth:`sync_failed`) leaves the log's unsynced bytes in
    doubt: after an ``fsync`` error Linux may drop the dirty pages and report
    success to the next ``fsync``, so a later successful sync proves nothing
    about them. Such a shard owes a *re-save*: a snapshot taken after the
    failure, which holds what the memory holds and makes the doubtful
    segments unnecessary. ``sync_failures`` counts the failed syncs and
    ``resaved_failures`` how many of them a written snapshot has covered;
    while a re-save is owed (:attr:`resave_pending`) the health stays
    FAILING, and the round marks that were waiting for the failed sync
    (``suspect_marks``: txid and failure number) stay unsettled, so the
    engine keeps their intents.
    """

    def __init__(
        self,
        directory: Path,
        fsync: AppendFsync,
        *,
        segment_bytes: int,
        snapshot_bytes: int,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.snapshot_bytes = snapshot_bytes
        self.journal = Journal()
        self.log: SegmentedLog | None = None
        self.dirty = False
        self.appends = 0
        self.unsaved = 0
        self.health = Health.OK
        self.error: str | None = None
        self.last_sync = time.time()
        self.last_save: float | None = None
        self.last_snapshot_pause_ms: float | None = None
        self.saving = False
        self.unsynced_marks: list[tuple[int, int]] = []
        self.sync_failures = 0
        self.resaved_failures = 0
        self.suspect_marks: list[tuple[int, int]] = []
        self.snapshot_status: SnapshotStatus | None = None
        self.snapshot_error: str | None = None
        self.covered_through = 0  # the newest segment a written snapshot covers
        self.leftover_segments = 0  # segments up to it still on disk, not yet removed
        self.leftover_error: str | None = None  # why they could not be removed

    @property
    def resave_pending(self) -> bool:
        """Whether a sync failed since the start of the last snapshot written."""
        return self.sync_failures > self.resaved_failures

    def unsettled(self) -> int:
        """The oldest round whose mark is not yet durable here (0: none).

        Read by the engine (an observability figure this shard's actor
        maintains) to know which intents it may drop.
        """
        pending = [t for t, _ in self.unsynced_marks]
        pending += [t for t, _ in self.suspect_marks]
        first = self.journal.pending_txid()
        if first:
            pending.append(first)
        return min(pending, default=0)

    def open(self) -> None:
        """Open the log for appending (after recovery ran), unless it is open.

        Raises:
            OSError: the directory or a new segment cannot be created
                (read-only file system, permissions, disk full).
        """
        if self.log is None:
            self.log = SegmentedLog(self.directory, segment_bytes=self.segment_bytes)
            self.unsaved = self.log.size()

    def append(self) -> int:
        """Append the journal to the log (buffered, no sync); bytes written.

        Opens the log first if it is not open (it could not be at start: a
        read-only directory), so that writes resume once the directory is
        usable again. The records of a failed batch (their replies fail with
        ``IO``, ``applied`` null) go back first in the journal, so the log
        gets what the memory holds once it can (see :meth:`Journal.requeue_taken`).

        Raises:
            OSError: the write failed, or the log could not be opened (disk
                full, read-only, ...).
        """
        journal = self.journal
        log = self.log
        if not (
            journal.marks
            or journal.carried
            or journal.taken
            or log is None
            or self.health is Health.FAILING
        ):
            # The common batch, with what take, appended and written would do
            # inlined: no round mark to track and nothing carried, so a
            # failed write drops the batch as requeue would (its replies fail).
            records = journal.records
            if not records:
                journal.own = False  # as take: nothing of this batch was in it
                return 0
            data = b"".join(records)
            records.clear()
            journal.own = True
            try:
                log.append_encoded(data)
            except BaseException:
                journal.gaps += 1  # dropped, as requeue_taken drops it
                raise
            size = len(data)
            self.dirty = True
            self.appends += 1
            self.unsaved += size
            return size
        data = journal.take()
        if not data:
            return 0
        try:
            self.open()
            assert self.log is not None
            self.log.append_encoded(data)
        except BaseException:
            self.requeue()
            raise
        self.appended(len(data))
        return len(data)

    def appended(self, size: int, *, journal: bool = True) -> None:
        """Count a batch of ``size`` bytes appended to the log (here or by a :class:`LogBatch`).

        The batch is the journal's last take: its round marks are now written
        (durable enough with ``everysec`` and ``no``; with ``always`` once a
        sync covers them, see :meth:`synced`).
        """
        self.dirty = True
        self.appends += 1
        self.unsaved += size
        if (
            self.fsync is AppendFsync.NO
            and self.health is Health.FAILING
            and not self.resave_pending
        ):
            # Nothing ever syncs with ``no``: a successful append is the recovery.
            self.health = Health.OK
            self.error = None
        if not journal:
            return  # bytes of the shard's own (a head mark), not the journal's take
        taken = self.journal.written()
        if taken and self.fsync is AppendFsync.ALWAYS:
            self.unsynced_marks += [(txid, self.appends) for txid, _, _ in taken]

    def requeue(self) -> None:
        """The journal's last take was not appended: it goes first in the next append."""
        self.journal.requeue_taken(self.segment_bytes)

    def synced(self, appends: int, started: float) -> None:
        """A sync succeeded that began at Unix time ``started``, after ``appends`` appends.

        Appends made while it ran are not covered by it: the log stays dirty.
        """
        self.dirty = self.appends != appends
        self.last_sync = started
        if self.unsynced_marks:
            self.unsynced_marks = [(t, n) for t, n in self.unsynced_marks if n > appends]
        if not self.resave_pending:
            self.health = Health.OK
            self.error = None

    def failed(self, exc: OSError) -> None:
        """Record a failure (health FAILING, ``error`` naming the cause and the file)."""
        self.health = Health.FAILING
        self.error = f"{exc.strerror or exc}: {exc.filename or self.directory}"
        if self.resave_pending:
            self.error += RESAVE_NOTE

    def sync_failed(self, exc: OSError) -> None:
        """A sync failed: what it was to make durable is in doubt until a re-save.

        The marks that waited for it become suspect (see the class docstring).
        """
        self.sync_failures += 1
        self.journal.gaps += 1  # the log may have lost what the memory holds
        number = self.sync_failures
        self.suspect_marks += [(t, number) for t, _ in self.unsynced_marks]
        self.unsynced_marks = []
        self.failed(exc)

    def resaved(self, failures: int) -> None:
        """A snapshot started after ``failures`` failed syncs is written, and synced.

        It holds everything those syncs were to make durable: their suspect
        marks are settled, and if no sync failed since it started, the
        shard is healthy again (the snapshot's own writes and sync worked).
        """
        if failures <= self.resaved_failures:
            return
        self.resaved_failures = failures
        self.suspect_marks = [(t, n) for t, n in self.suspect_marks if n > failures]
        if not self.resave_pending:
            self.health = Health.OK
            self.error = None

    def snapshot_written(self) -> None:
        """The last snapshot tried is written (its status OK; the log's health is not touched)."""
        self.snapshot_status = SnapshotStatus.OK
        self.snapshot_error = None

    def snapshot_failed(self, reason: str) -> None:
        """The last snapshot tried failed, for ``reason`` (its status ERR, until one is written).

        The log's health is not touched: a failure of the log itself (an
        append or sync the snapshot made) is recorded by :meth:`failed` or
        :meth:`sync_failed` as well.
        """
        self.snapshot_status = SnapshotStatus.ERR
        self.snapshot_error = reason

    def leftover(self, count: int, error: OSError | None) -> None:
        """``count`` segments a written snapshot covers are still on disk; ``error``: why.

        Neither the log's health nor the snapshot's status changes: the
        data is in the snapshot, and the next removal tries again.
        """
        self.leftover_segments = count
        if count == 0:
            self.leftover_error = None
        elif error is not None:
            self.leftover_error = f"{error.strerror or error}: {error.filename or self.directory}"

    def log_size(self) -> int:
        return 0 if self.log is None else self.log.size()

    def sync_lag(self) -> float:
        """Seconds since the log was last known durable (0 when nothing is pending)."""
        return round(time.time() - self.last_sync, 3) if self.dirty else 0.0

    def info(self) -> dict[str, object]:
        return {
            "health": self.health.value,
            "error": self.error,
            "log_bytes": self.log_size(),
            "sync_lag_seconds": self.sync_lag(),
            "last_save": self.last_save,
            "last_snapshot_pause_ms": self.last_snapshot_pause_ms,
            "resave_pending": self.resave_pending,
            "last_snapshot_status": (
                None if self.snapshot_status is None else self.snapshot_status.value
            ),
            "snapshot_error": self.snapshot_error,
            "leftover_segments": self.leftover_segments,
            "leftover_error": self.leftover_error,
        }


class LogBatch(CommitWrite):
    """One batch's append and sync as one call, for a sync round's worker thread.

    With ``appendfsync always`` the shard hands its journal to the store's
    sync round instead of appending it from the event loop: an ``os.write``
    to a log on a journalling file system may block while another log's
    fsync commits the journal (~60 µs measured on ext4, each one delaying
    the shard's joining the round). Calling the batch appends ``data`` to
    ``log`` and syncs it; ``appended`` tells, afterwards, whether the append
    took place (the sync may still have failed).

    A shard killed while its batch is still gathering withdraws it from the
    round; it then calls :meth:`take_back`, which appends the batch from the
    event loop unless a worker thread has already started it, so that the
    log always holds what the shard's memory holds (as an append without a
    sync: a ``kill -9`` may lose it, and its writers were never answered).

    Invariant: a shard has at most one batch in flight (it waits for its
    round), so the appends to one log keep the order of its batches; the
    append runs exactly once, in the round's thread or in :meth:`take_back`
    (``_claim`` decides which, under a lock).
    """

    __slots__ = ("_claim", "_claimed", "appended", "data", "error", "log", "synced")

    def __init__(self, log: SegmentedLog, data: bytes) -> None:
        self.log = log
        self.data = data
        self.appended = False
        self.synced = False
        self.error: OSError | None = None  # what the round's append or sync raised
        self._claim = threading.Lock()
        self._claimed = False

    def _take(self) -> bool:
        """Claim the append for the caller; False if it was claimed already."""
        with self._claim:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def write(self) -> SegmentedLog | None:
        """Append (in a round's thread); the log to sync, or None if taken back already.

        Calling the batch appends, then syncs (:class:`LogWrite`).

        Raises:
            OSError: the append failed (``appended`` stays False).
            ValueError: the log was closed meanwhile (its shard was rebuilt).
        """
        if not self._take():
            return None
        try:
            self.log.append_encoded(self.data)
        except OSError as exc:
            self.error = exc
            raise
        self.appended = True
        return self.log

    def write_uncovered(self) -> tuple[SegmentedLog, list[tuple[int, int, bytes]]] | None:
        """Append (in a ``commitlog`` round's thread); what the commit log must hold.

        See :meth:`CommitWrite.write_uncovered` and :meth:`write`.
        """
        if not self._take():
            return None
        try:
            pieces = self.log.append_uncovered(self.data)
        except OSError as exc:
            self.error = exc
            raise
        self.appended = True
        return self.log, pieces

    def done(self, error: OSError | None) -> None:
        if error is None:
            self.synced = True
        else:
            self.error = error

    def take_back(self) -> bool:
        """Append the batch here, without a sync, unless a round started it; True if appended.

        Raises:
            OSError: the append failed.
            ValueError: the log is closed.
        """
        if not self._take():
            return False
        self.log.append_encoded(self.data)
        self.appended = True
        return True
