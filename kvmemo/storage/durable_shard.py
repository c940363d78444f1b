"""Shards with persistence: group commit, background sync, snapshots, recovery.

Design (see :mod:`kvmemo.storage.durability` for the journal):

- **Group commit.** :class:`DurableShardActor` is a ``group_commit`` actor:
  the runtime holds the replies of each drained batch until :meth:`commit`
  has appended the batch's journal to the log and, with ``appendfsync
  always``, synced it once in a worker thread. A failed append or sync
  fails that batch's replies with ``IO`` (``applied`` null: the change is
  in memory but may not be on disk); reads keep working.
- **Across shards.** The shards of one store sync through one
  :class:`~.sync_coordinator.SyncCoordinator` (held by their shared
  :class:`PersistenceConfig`): the logs of every shard waiting at the same
  time are synced in one round, in one worker-thread hand-off, and each
  shard gets its own log's outcome (an error on one log fails only that
  shard's batch). With 64 writers over 16 shards this turns 16 hand-offs of
  ~3 records each into about one per round.
- **Gathering a batch.** With ``always``, the writers answered by a commit
  can only send their next write once they run; if the shard drained its
  mailbox first, they would miss the next batch and wait a whole extra
  fsync, splitting the writers into two alternating halves. So the first
  message handled after such a commit yields once (one scheduler pass,
  ~6 µs, before any state is touched) and the writers just answered join
  the batch being drained: batches approach the number of writers waiting
  on the shard (64 writers over 4 shards: ~14 records per fsync instead of
  ~11).
- **A log that cannot be opened** (a read-only or full directory at start)
  does not stop the shard: it serves reads, reports the failure in ``info
  persistence``, and fails every write with ``IO``; each commit, and the
  background loop each second, tries to open the log again, so writes
  resume, and an idle shard's health clears, once the directory is usable.
- **everysec / no.** A background loop syncs a dirty log at least once a
  second (``everysec``); ``no`` leaves it to the OS.
- **Snapshots without a global pause.** ``Save`` rotates the log, copies the
  shard's two dicts (the only pause, measured and reported) and hands the
  copy to the shard's background writer; the snapshot is written, synced
  and renamed in a worker thread while the shard keeps serving, then the
  log segments it covers are removed. Only this shard pauses, only for the
  copy. Triggered by the ``save`` command, by log size, and on graceful stop.
- **Sync metrics.** Each sync of a shard's log, the commit's of an
  ``always`` batch and every other (``everysec``'s, a snapshot's), is timed
  around its wait for the sync round, from the event loop (the round's
  worker thread records nothing), into ``kvmemo_fsync_duration_seconds
  {shard}``; a failed one also counts in ``kvmemo_fsync_failures_total
  {shard}`` (:class:`SyncMetrics`). Observation only: no sync does anything
  else for it.
- **Recovery.** Before the tree starts, every shard's directory is
  recovered in a worker thread (newest valid snapshot, then the log); a
  restarted shard whose in-memory state fails its invariant check reloads
  from its own directory in ``on_start``, in a worker thread, while the
  other shards serve.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from actors import DEFER, ActorContext, ActorState, ActorStopped, MailboxFull

from ..errors import PersistenceIOError
from ..eviction.memory import MemoryTracker
from ..eviction.policies import EvictionPolicy
from ..observability.metrics import Counter, Histogram, MetricsRegistry
from ..persistence import AppendFsync, Recovered, SegmentedLog, recover, write_snapshot
from ..persistence.commitlog import CommitLogError
from ..persistence.commitlog import drop as drop_commit_log
from ..persistence.commitlog import redo as redo_commit_log
from ..persistence.intents import (
    IntentLog,
    IntentScan,
    ShardMarks,
    plan_redo,
    read_intents,
    redo_records,
    write_redo,
)
from ..persistence.records import replay
from ..persistence.recovery import Changes, make_changes
from .durability import Health, LogBatch, ShardDurability, wall_offset
from .shard import Hold, ShardActor
from .store import SCAN_SNAPSHOTS, ShardStore
from .sync_coordinator import LogWrite, RoundIncompleteError, SyncCoordinator

log = logging.getLogger("kvmemo.persistence")

SYNC_INTERVAL = 1.0  # seconds between background syncs of a dirty log (everysec)
# A re-save that failed (the disk still failing) is tried again after twice as long
# each time, up to this: every try rotates the log and copies the shard.
RESAVE_BACKOFF_MAX = 60.0  # seconds
SNAPSHOT_QUEUE = 2  # snapshots a shard may have waiting for its writer
FSYNC_SECONDS = "kvmemo_fsync_duration_seconds"
FSYNC_FAILURES = "kvmemo_fsync_failures_total"
_perf_counter = time.perf_counter


@attrs.frozen
class SyncMetrics:
    """Where the shards of one store record their log syncs, by shard.

    ``seconds``: how long each sync of a shard's log took, from the shard's
    request to its outcome (its wait for the sync round included: what a
    write under ``appendfsync always`` waits for; with ``always`` the
    batch's append is in it too), failed ones included. ``failures``: the
    syncs of a shard's log that failed (the append of an ``always`` batch
    included, and a commit log checkpoint that could not sync the log).
    Recording is observation only: it never changes what a sync does.
    """

    seconds: Histogram
    failures: Counter

    @classmethod
    def register(cls, registry: MetricsRegistry, shards: int) -> SyncMetrics:
        """Register (or find) the two families in ``registry``, each shard's series at 0."""
        seconds = registry.histogram(
            FSYNC_SECONDS,
            "Time to make a shard's log durable (its fsync, in a sync round), failed syncs too",
            ["shard"],
        )
        failures = registry.counter(FSYNC_FAILURES, "Syncs of a shard's log that failed", ["shard"])
        for shard in range(shards):
            seconds.labels(str(shard))
            failures.labels(str(shard))
        return cls(seconds, failures)


@attrs.define
class StopPlan:
    """What a shard's graceful stop does besides making its log durable.

    ``snapshot``: write the final snapshot (the default; Redis's ``SHUTDOWN
    SAVE``). False (``SHUTDOWN NOSAVE``): the log, synced, is the only
    record; the next start replays it, so nothing acknowledged is lost, and
    queued snapshots are dropped (their tickets fail).
    """

    snapshot: bool = True


@attrs.frozen
class PersistenceConfig:
    """Where and how shards persist.

    Attributes:
        directory: the data directory; each shard uses ``shard-N/`` in it.
        appendfsync: ``always``, ``everysec`` or ``no``.
        repair: start despite a corrupt log, keeping every valid record.
        segment_bytes: log segment size.
        snapshot_bytes: log size of a shard that triggers its snapshot (0:
            never by size; ``save``, ``bgsave`` and a graceful stop still do).
        sync_coordinator: runs the log syncs of every shard given this
            config in shared worker-thread rounds (cross-shard group commit,
            see :mod:`.sync_coordinator`). One per config, and one config
            per store (``engine.durable.persistence_config``): the shards of
            one store share it. It owns no task; the engine closes its
            commit log once the shards have stopped (``KVEngine.close``).
        stop: how the shards' graceful stop ends (see :class:`StopPlan`);
            shared like ``sync_coordinator``.
    """

    directory: Path
    appendfsync: AppendFsync = AppendFsync.EVERYSEC
    repair: bool = False
    segment_bytes: int = 64 * 1024 * 1024
    snapshot_bytes: int = 256 * 1024 * 1024
    sync_coordinator: SyncCoordinator = attrs.field(factory=SyncCoordinator, eq=False, repr=False)
    stop: StopPlan = attrs.field(factory=lambda: StopPlan(), eq=False, repr=False)

    def shard_dir(self, shard: int) -> Path:
        return self.directory / f"shard-{shard}"


def _to_monotonic(expires_ms: dict[bytes, int]) -> dict[bytes, float]:
    offset = wall_offset()
    return {k: ms / 1000 - offset for k, ms in expires_ms.items()}


async def recover_store(store: ShardStore, config: PersistenceConfig, *, repair: bool) -> list[str]:
    """Reload ``store`` from its shard directory (in a worker thread), at runtime.

    The rebuild of a shard whose memory could not be trusted: its journal
    lost what it had not appended yet, possibly its part of a multi-shard
    round the other shards hold. So the parts of retained intents its log
    lacks are redone (as at start, :mod:`kvmemo.persistence.intents`): into
    the store, and into its journal, so that its next append logs them
    first; meanwhile their marks keep the intents. The aborts the journal
    had marked but not logged count as the log's: such a round is not redone.

    Returns:
        The warnings.

    Raises:
        CorruptLog, CorruptSnapshot: damage recovery may not skip (without repair).
        OSError: the directory cannot be read.
    """
    shard = store.shard_id
    now_ms = int(time.time() * 1000)
    journal = store.journal
    assert journal is not None
    aborted = {txid: False for txid, committed, _ in journal.marks if not committed}

    def work() -> tuple[Recovered, list[tuple[int, bytes]], list[str]]:
        recovered = recover(config.shard_dir(shard), now_ms=now_ms, repair=repair)
        warnings = list(recovered.warnings)
        scan = read_intents(config.directory)
        marks = ShardMarks({**recovered.marks, **aborted}, recovered.last_txid)
        rounds = plan_redo(scan, {shard: marks}).get(shard, [])
        if rounds:
            replay(redo_records(rounds), recovered.data, recovered.expires)
            _drop_expired(recovered, now_ms)
            txids = ", ".join(str(t) for t, _ in rounds)
            warnings.append(f"redid its part of multi-shard write(s) {txids}")
        return recovered, rounds, warnings

    recovered, rounds, warnings = await trio.to_thread.run_sync(work)
    store.load(recovered.data, _to_monotonic(recovered.expires))
    _take_marks(store, recovered.marks)
    journal.records.clear()
    journal.carried = 0  # of the records dropped: a batch's own would not fail with them
    journal.marks.clear()  # of records the rebuild dropped: resolved above from the log
    journal.redo(rounds)
    return warnings


def _drop_expired(recovered: Recovered, now_ms: int) -> None:
    for key in [k for k, at in recovered.expires.items() if at <= now_ms]:
        del recovered.data[key]
        del recovered.expires[key]


def _take_marks(store: ShardStore, marks: dict[int, bool]) -> None:
    """Set the store's newest round mark to what its log holds (a redo journals newer ones)."""
    journal = store.journal
    if journal is not None:
        journal.last_txid = journal.logged_txid = max(marks, default=0)
        journal.last_committed = journal.logged_committed = marks.get(journal.last_txid, True)


@attrs.define
class SaveTicket:
    """The promise of one shard's snapshot; ``wait`` returns when it is durable."""

    done: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None
    pause_ms: float = 0.0
    entries: int = 0

    async def wait(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise self.error


class Save:
    """Snapshot this shard; the reply is a :class:`SaveTicket`."""

    __slots__ = ()


class Resave:
    """Snapshot this shard if it owes a re-save and none is being written; no reply.

    Sent by the shard's own background loop (see ``DurableShardActor.background``).
    """

    __slots__ = ()


RESAVE = Resave()


class SyncNow:
    """Sync the log now (tests and shutdown); reply None, or raise IO."""

    __slots__ = ()


class PersistenceInfo:
    """The shard's persistence figures for ``info persistence``."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> dict[str, object]:
        assert store.durability is not None
        return store.durability.info()


class DurableShardActor(ShardActor):
    """A shard whose acknowledged writes survive a crash of the process."""

    group_commit = True

    def __init__(
        self,
        ctx: ActorContext,
        hold_timeout: float,
        config: PersistenceConfig,
        sync_metrics: SyncMetrics | None = None,
    ) -> None:
        super().__init__(ctx, hold_timeout)
        assert self.store.durability is not None
        self.dur: ShardDurability = self.store.durability
        self.config = config
        # This shard's series (a private registry's when none is given).
        metrics = sync_metrics
        if metrics is None:
            metrics = SyncMetrics.register(MetricsRegistry(), 0)
        self._sync_seconds = metrics.seconds.labels(str(self.store.shard_id))
        self._sync_failures = metrics.failures.labels(str(self.store.shard_id))
        # A semaphore of one, not a trio.Lock: the same exclusion for less
        # (no owner to track and no parking-lot breaker), taken once per
        # ``always`` batch. Held across a sync round only, by this actor's tasks.
        self._sync_lock = trio.Semaphore(1, max_value=1)
        self._self = ctx.self_ref  # for the re-save the background loop asks for
        # The next re-save is tried from _resave_at (trio time); the wait doubles per try.
        self._resave_at = 0.0
        self._resave_wait = SYNC_INTERVAL
        self._gather = False  # the next message handled yields first (group commit)
        self._saved_unsynced = False  # a Save appended this batch's writes without a sync
        self._saved_own = False  # ... and among them writes of this batch's own
        self._saved_failures = 0  # ... and the shard's failed syncs before that append
        # A Save's append of this batch's writes failed: the error their replies get.
        self._batch_error: PersistenceIOError | None = None
        self._jobs_send, self._jobs = trio.open_memory_channel[tuple[Any, SaveTicket]](
            SNAPSHOT_QUEUE
        )
        # Snapshots taken off the queue but not written: the writer's, cut off
        # by a cancellation (a kill, a stop), and those a graceful stop found
        # queued. A graceful stop's own snapshot supersedes them; otherwise
        # this incarnation's end fails them (see _fail_unwritten).
        self._unwritten: list[tuple[Any, SaveTicket]] = []
        self._watching_jobs = False  # _fail_unwritten is registered as a monitor

    async def on_start(self) -> None:
        store = self.store
        dur = self.dur
        if store.needs_recovery:
            # Our memory could not be trusted: reload this shard from disk
            # (in a thread: the other shards keep serving). What the old log
            # holds is made durable first: its unsynced marks count on it.
            if dur.log is not None:
                await self._sync()
                dur.log.close()
                dur.log = None
            await recover_store(store, self.config, repair=True)
            store.needs_recovery = False
        dur.journal.offset = None  # read again at the first expiry (see Journal.offset)
        # A read-only or full directory: serve reads anyway; every write fails
        # with IO until the log can open (commit retries the open, and so does
        # the background loop each second, see _reopen).
        await self._open_log()

    async def _open_log(self) -> bool:
        """Open the log if it is not open; whether it is open now.

        A new segment opens with the newest round mark the log holds (a
        repair may have compacted the marks away), synced; a rebuild's redo
        follows, from the journal, with its own marks (``Journal.head``). A
        failure is recorded (health FAILING, its error).
        """
        dur = self.dur
        opened = dur.log is None
        try:
            dur.open()
        except OSError as exc:
            dur.failed(exc)
            return False
        head = dur.journal.head() if opened else b""
        if head:
            assert dur.log is not None
            try:
                dur.appended(dur.log.append_encoded(head), journal=False)
            except OSError as exc:
                # A full disk (an empty segment needed no space): not left open
                # headless, which no try would mend (they retry a log not open);
                # nothing has seen it. The next try opens a new segment.
                fresh, dur.log = dur.log, None
                fresh.close()
                with contextlib.suppress(OSError):
                    fresh.path(fresh.current).unlink()
                dur.failed(exc)
                return False
            # Durable now: a repair's snapshot may cover every segment that
            # held the marks (see _write), and a rebuild's may soon.
            await self._sync()
        elif dur.health is Health.FAILING and dur.dirty and not dur.resave_pending:
            # Open already, failing, not synced: an earlier incarnation was cut
            # off (a kill) in this sync. Nothing else would sync an idle
            # ``always`` log, nor retry a log that is open: it stayed failing.
            # (Records waiting in the journal: the next batch's commit syncs.)
            if not dur.journal.records:
                await self._sync()
        return True

    async def _reopen(self) -> None:
        """The log could not be opened (read-only or full directory): try again.

        Called each second by the background loop, so that a shard nobody
        writes to recovers once its directory is usable again; before, only
        its next write retried, and its health (``/healthz``: 503) stayed
        failing until then, however long. Opened, with nothing owed (no
        re-save, no failed batch's records waiting in the journal), the
        shard is healthy; records waiting are appended by the mailbox loop
        (sent :class:`Resave` to wake it; it appends at its commit) and made
        durable as any write, which settles the health.
        """
        dur = self.dur
        if not await self._open_log():
            return
        journal = dur.journal
        if journal.records or journal.taken:
            with contextlib.suppress(MailboxFull, ActorStopped):
                self._self.tell_nowait(RESAVE)
        elif not dur.resave_pending and dur.health is Health.FAILING:
            dur.health = Health.OK
            dur.error = None

    def handle_nowait(self, message: Any) -> Any:
        """:meth:`handle` without a coroutine, for every message that needs no await."""
        kind = type(message)
        if kind in _CONTROL or self._gather:  # one test for the common case
            if self._gather:
                return DEFER  # the first message after an ``always`` commit yields first
            if kind is Save:
                return self._start_snapshot()
            if kind is Resave:
                return self._resave()
            return DEFER  # SyncNow, Hold
        return message.apply(self.store, self._now())

    async def handle(self, message: Any) -> Any:
        # Keep in step with handle_nowait (the runtime calls it first).
        if self._gather:
            # The first message after an ``always`` commit: let the writers it
            # answered send their next writes into this batch (see the module
            # docstring). No state has been touched yet.
            self._gather = False
            await trio.lowlevel.checkpoint()
        kind = type(message)
        if kind is Save:
            return self._start_snapshot()
        if kind is Resave:
            return self._resave()
        if kind is SyncNow:
            error = await self._sync()
            if error is not None:
                raise error
            return None
        # ShardActor.handle, inlined (one coroutine less per message on the
        # hot path); keep the two in step.
        if kind is Hold:
            return await self._hold(message)
        return message.apply(self.store, self._now())

    def commit_nowait(self) -> Any:
        """:meth:`commit` without a coroutine: ``everysec`` and ``no`` (DEFER for ``always``).

        Their commit only appends the batch to the log (buffered, a write
        call), which needs no await.
        """
        dur = self.dur
        if dur.fsync is AppendFsync.ALWAYS:
            return DEFER
        dur.journal.offset = None  # read again at the next batch's first expiry
        error, self._batch_error = self._batch_error, None
        try:
            dur.append()
        except OSError as exc:
            dur.failed(exc)
            if dur.journal.own:
                return self._io_error(exc)
            # Only an earlier batch's carried records failed again: this
            # batch wrote nothing (reads keep working on a full disk).
        if dur.snapshot_bytes and dur.unsaved > dur.snapshot_bytes and not dur.saving:
            self._start_snapshot()
        return error

    async def commit(self) -> BaseException | None:
        dur = self.dur
        if dur.fsync is not AppendFsync.ALWAYS:
            result: BaseException | None = self.commit_nowait()
            return result
        dur.journal.offset = None  # read again at the next batch's first expiry
        batch_error, self._batch_error = self._batch_error, None
        written, error = await self._append_durably()
        own = dur.journal.own
        if error is None and self._saved_unsynced:
            # A Save in this batch appended the batch's writes before its
            # rotation, without a sync: they are not durable yet. Its error
            # is theirs when they were this batch's own (not only carried).
            error = await self._sync()
            own = own or self._saved_own
            if error is None and dur.sync_failures > self._saved_failures:
                # A sync that ran in between (a SyncNow, the snapshot writer's,
                # while a Hold waited) failed: the appended records may be
                # lost, and the commit's round, a success, left nothing to sync.
                error = self._io_error(OSError(errno.EIO, "a sync of the log failed"))
        self._saved_unsynced = self._saved_own = False
        if batch_error is not None:
            return batch_error
        if error is not None and own:
            return error
        if dur.snapshot_bytes and dur.unsaved > dur.snapshot_bytes and not dur.saving:
            self._start_snapshot()
        self._gather = written > 0
        return None

    async def _append_durably(self) -> tuple[int, PersistenceIOError | None]:
        """``always``: append the journal and sync it, both in the store's next sync round.

        Returns:
            (bytes of the batch, None) once the batch is durable; (bytes,
            the ``IO`` error to fail the batch with) when the log could not
            be opened, or the append or the sync failed; (0, None) when the
            journal was empty.

        A commit cancelled while its batch waits (a kill) appends the batch
        without a sync if no round has started it (``LogBatch.take_back``),
        so the log keeps what the memory holds; the runtime fails its
        replies as "may or may not last".
        """
        dur = self.dur
        data = dur.journal.take()
        if not data:
            return 0, None
        try:
            dur.open()
        except OSError as exc:
            dur.requeue()
            dur.failed(exc)
            return len(data), self._io_error(exc)
        assert dur.log is not None
        batch = LogBatch(dur.log, data)
        lock = self._sync_lock
        try:
            lock.acquire_nowait()  # the usual case, without a scheduler pass
        except trio.WouldBlock:
            try:
                await lock.acquire()
            except trio.Cancelled:  # killed before the batch was filed
                self._record_killed_batch(batch, time.time())
                raise
        try:
            started = time.time()
            began = _perf_counter()
            try:
                await self.config.sync_coordinator.sync(batch)
            except trio.Cancelled:
                self._record_killed_batch(batch, started)
                raise
            except (OSError, RoundIncompleteError) as exc:
                self._sync_seconds.observe(_perf_counter() - began)
                self._sync_failures.inc()
                # RoundIncompleteError: the round itself failed (a thread did
                # not start); the batch may or may not be in the log.
                error = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
                if batch.appended and isinstance(error, CommitLogError):
                    # Not durable, but not in doubt: the next frame holds it again.
                    dur.appended(len(data))
                    dur.failed(error)
                elif batch.appended:  # the sync failed: the log's unsynced bytes are in doubt
                    dur.appended(len(data))
                    dur.sync_failed(error)
                else:
                    dur.requeue()
                    dur.failed(error)
                return len(data), self._io_error(error)
            self._sync_seconds.observe(_perf_counter() - began)
            dur.appended(len(data))
            dur.synced(dur.appends, started)
        finally:
            lock.release()
        return len(data), None

    def _record_killed_batch(self, batch: LogBatch, started: float) -> None:
        """Bookkeeping of a batch whose commit was killed (no checkpoint).

        Not taken by a round: the log gets it here, unsynced (the memory has
        its effects). Run by the round meanwhile (the coordinator waited for
        it): record what the round did.
        """
        dur = self.dur
        size = len(batch.data)
        try:
            if batch.take_back():
                dur.appended(size)
            elif batch.appended:
                dur.appended(size)
                if batch.synced:
                    dur.synced(dur.appends, started)
            else:
                dur.requeue()
            if batch.error is not None:
                self._sync_failures.inc()
                if (
                    batch.appended
                    and not batch.synced
                    and not isinstance(batch.error, CommitLogError)
                ):
                    dur.sync_failed(batch.error)
                else:
                    dur.failed(batch.error)
        except OSError as exc:  # take_back's append failed
            dur.requeue()
            dur.failed(exc)
        except ValueError:  # the log was closed (a rebuild reopens it)
            dur.requeue()

    async def _sync(self) -> PersistenceIOError | None:
        """Make every append so far durable, in the store's next sync round.

        The round (:class:`~.sync_coordinator.SyncCoordinator`) syncs the
        logs of every shard waiting at that moment in one worker thread; this
        shard gets its own log's outcome. At most one sync of this shard is
        in flight (``_sync_lock``: the mailbox loop and the ``everysec``
        loop both sync), so ``synced`` sees them in order.

        Returns:
            None once durable (or when nothing was pending); the ``IO``
            error to fail the batch with when the sync failed.
        """
        dur = self.dur
        log = dur.log
        if log is None or not dur.dirty:
            return None
        lock = self._sync_lock
        try:
            lock.acquire_nowait()  # the usual case, without a scheduler pass
        except trio.WouldBlock:
            await lock.acquire()
        try:
            appends, started = dur.appends, time.time()
            call = _RecordedSync(log)
            began = _perf_counter()
            try:
                await self.config.sync_coordinator.sync(call)
            except OSError as exc:
                self._sync_seconds.observe(_perf_counter() - began)
                self._sync_failures.inc()
                dur.sync_failed(exc)
                return self._io_error(exc)
            except RoundIncompleteError:
                self._sync_seconds.observe(_perf_counter() - began)
                self._sync_failures.inc()
                raise
            except trio.Cancelled:
                # Killed while the round ran this sync: the coordinator waited
                # for it and raises Cancelled, not its error; a failure must
                # still be owed a re-save (the log forgets it at its next append).
                if call.error is not None:
                    self._sync_failures.inc()
                    dur.sync_failed(call.error)
                raise
            self._sync_seconds.observe(_perf_counter() - began)
            dur.synced(appends, started)
        finally:
            lock.release()
        return None

    def _io_error(self, exc: OSError) -> PersistenceIOError:
        return PersistenceIOError(
            f"could not make the write durable: {self.dur.error or exc}", applied=None
        )

    def _resave(self) -> None:
        """Start the snapshot a failed sync calls for, unless one is being written.

        The next try, should this one fail too, waits twice as long (up to
        ``RESAVE_BACKOFF_MAX``): while the disk keeps failing, each try would
        otherwise rotate the log and copy the shard once a second.
        """
        if self.dur.resave_pending and not self.dur.saving:
            self._resave_at = trio.current_time() + self._resave_wait
            self._resave_wait = min(2 * self._resave_wait, RESAVE_BACKOFF_MAX)
            self._start_snapshot()

    def _start_snapshot(self) -> SaveTicket:
        """Rotate, copy (the only pause), and queue the write; never blocks."""
        ticket = SaveTicket()
        dur = self.dur
        store = self.store
        if dur.log is None:
            why = f": {dur.error}" if dur.error else ""
            ticket.error = PersistenceIOError(f"the log is not open{why}", applied=False)
            dur.snapshot_failed(str(ticket.error))
            ticket.done.set()
            return ticket
        started = time.perf_counter()
        try:
            try:
                written = dur.append()
            except OSError as exc:
                if dur.journal.own:
                    # This batch's writes are not in the log: the commit
                    # fails their replies (the snapshot fails here).
                    self._batch_error = self._io_error(exc)
                raise
            if written and dur.fsync is AppendFsync.ALWAYS:
                if not self._saved_unsynced:
                    self._saved_failures = dur.sync_failures
                self._saved_unsynced = True  # commit syncs before the batch's replies
                self._saved_own = self._saved_own or dur.journal.own
            covers = dur.log.rotate()
            dur.unsaved = 0  # even if the snapshot fails: retried after as many bytes again
            # The new segment opens with the newest round's mark: the
            # snapshot will cover the segment that held it.
            head = dur.journal.head()
            if head:
                dur.appended(dur.log.append_encoded(head), journal=False)
        except OSError as exc:
            dur.failed(exc)  # the log's own append or rotation failed
            ticket.error = self._io_error(exc)
            dur.snapshot_failed(str(dur.error))
            ticket.done.set()
            return ticket
        data = store.data.copy()
        expires = store.expires.copy()
        # The snapshot's entries are no PATCH's base (replay starts its
        # chains empty after a snapshot): each key's next edit is a base SET.
        dur.journal.bases.clear()
        offset = wall_offset()
        ticket.pause_ms = round((time.perf_counter() - started) * 1000, 3)
        ticket.entries = len(data)
        dur.last_snapshot_pause_ms = ticket.pause_ms
        dur.saving = True
        job = (_Job(data, expires, offset, covers, dur.sync_failures, dur.journal.gaps), ticket)
        try:
            self._jobs_send.send_nowait(job)
        except trio.WouldBlock:
            dur.saving = False
            # Refused, not failed (the status stays that of the last one
            # written or tried, as Redis's for a BGSAVE already in progress).
            ticket.error = PersistenceIOError("too many snapshots queued", applied=False)
            ticket.done.set()
            return ticket
        if not self._watching_jobs and self._self.state is ActorState.RUNNING:
            # The queue dies with this incarnation: its end must answer every
            # ticket not written (a SAVE waiting, a BGSAVE in progress forever).
            self._watching_jobs = True
            self._self.monitor(self._fail_unwritten)
        return ticket

    def _fail_unwritten(self, _: object = None) -> None:
        """Monitor of the incarnation: fail the tickets of the snapshots it did not write.

        Killed, crashed or stopped by force, the shard leaves its queued
        snapshots (and the one its writer was cut off in) unwritten: their
        tickets fail, so that a SAVE waiting gets ``IO`` at once and a BGSAVE
        is no longer in progress (it would refuse every SAVE and BGSAVE
        after it). A graceful stop answered them all already (``on_stop``).
        """
        unwritten, self._unwritten = self._unwritten, []
        while True:
            try:
                unwritten.append(self._jobs.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        tickets = [ticket for _, ticket in unwritten if not ticket.done.is_set()]
        if not tickets:
            return
        dur = self.dur
        dur.saving = False  # no writer is left to clear it: the restart may snapshot again
        why = f"shard-{self.store.shard_id} stopped before writing its snapshot"
        dur.snapshot_failed(why)
        for ticket in tickets:
            ticket.error = PersistenceIOError(f"snapshot failed: {why}", applied=False)
            ticket.done.set()

    async def background(self) -> None:
        """The snapshot writer, and a loop once a second: ``everysec``'s sync and the re-save.

        A shard that owes a re-save (a sync failed, see
        :class:`~.durability.ShardDurability`) is sent :class:`Resave` from
        here; a failed try is retried after 1, 2, 4, ... seconds (at most
        ``RESAVE_BACKOFF_MAX``) while the disk keeps failing.
        """
        dur = self.dur
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._snapshot_writer)
            while True:
                await trio.sleep(SYNC_INTERVAL)
                if dur.log is None and dur.health is Health.FAILING:
                    await self._reopen()
                if dur.fsync is AppendFsync.EVERYSEC:
                    await self._sync()
                if dur.leftover_segments and not dur.saving:
                    self._remove_covered()
                failure = self.config.sync_coordinator.checkpoint_failure(dur.directory)
                if failure is not None:
                    # The commit log could not make this log durable: as a
                    # failed sync of its own, its bytes are in doubt until a
                    # re-save (the commit log keeps them meanwhile).
                    self._sync_failures.inc()
                    dur.sync_failed(failure)
                if not dur.resave_pending:
                    self._resave_wait = SYNC_INTERVAL
                elif not dur.saving and trio.current_time() >= self._resave_at:
                    # Through the mailbox: a snapshot's start takes the journal,
                    # which only the mailbox loop may do (a commit may be running).
                    # A full mailbox: the next second asks again (a stopped
                    # one: this loop is about to be cancelled with the shard).
                    with contextlib.suppress(MailboxFull, ActorStopped):
                        self._self.tell_nowait(RESAVE)

    async def _snapshot_writer(self) -> None:
        async for job, ticket in self._jobs:
            await self._write(job, ticket)

    async def _write(self, job: _Job, ticket: SaveTicket) -> None:
        """Write one snapshot in a worker thread, then drop the segments it covers.

        Its outcome is the snapshot's status (``ShardDurability.snapshot_status``);
        only a failed sync of the log changes the log's health.
        """
        dur = self.dur
        finished = False
        try:
            # The new segment's head mark must be durable before the snapshot
            # is: once it is, recovery reads no segment it covers, so without
            # the mark it would redo multi-shard rounds this shard resolved
            # long ago, over newer writes.
            error = await self._sync()
            if error is not None:
                # Recorded already (sync_failed): recording it again as a new
                # failure would nest its message in itself.
                ticket.error = PersistenceIOError(f"snapshot failed: {error}", applied=False)
                dur.snapshot_failed(str(error))
                return
            await trio.to_thread.run_sync(
                lambda: write_snapshot(dur.directory, job.entries(), covers=job.covers)
            )
            dur.last_save = time.time()
            dur.resaved(job.failures)
            dur.journal.saved(job.gaps)
            dur.snapshot_written()
            dur.covered_through = max(dur.covered_through, job.covers)
            self._remove_covered()
            finished = True
        except (OSError, ValueError) as exc:
            # The snapshot's own file: the log, and every write it holds, is intact.
            ticket.error = PersistenceIOError(f"snapshot failed: {exc}", applied=False)
            if isinstance(exc, OSError):
                dur.snapshot_failed(f"{exc.strerror or exc}: {exc.filename or dur.directory}")
            else:
                dur.snapshot_failed(str(exc))
        finally:
            dur.saving = False
            if finished or ticket.error is not None:
                ticket.done.set()
            else:
                # Cancelled (a kill, a stop) before the snapshot was written:
                # not a success. A graceful stop's snapshot supersedes it;
                # any other end of the incarnation fails it (_fail_unwritten).
                self._unwritten.append((job, ticket))

    def _remove_covered(self) -> None:
        """Delete the log segments the written snapshots cover; report those left.

        The snapshot is good whether or not they go (recovery never reads a
        segment a snapshot covers, so none is applied twice): a failure is
        counted apart from its status (``leftover_segments``), logged once,
        and tried again each second (``background``) and by the next snapshot.
        """
        dur = self.dur
        segments = dur.log
        if segments is None or not dur.covered_through:
            return
        error = None
        try:
            segments.remove_through(dur.covered_through)
        except OSError as exc:
            error = exc
        first = dur.leftover_error is None
        dur.leftover(segments.count_through(dur.covered_through), error)
        if error is not None and first:
            log.warning(
                "shard-%d: the snapshot is written, but %d log segment(s) it covers could "
                "not be removed (tried again each second): %s",
                self.store.shard_id,
                dur.leftover_segments,
                dur.leftover_error,
            )

    async def on_stop(self) -> None:
        # Graceful stop: make everything durable, then snapshot (bounded by
        # the child's shutdown timeout; the log alone is enough if cut short),
        # then close the log so that no descriptor outlives the store (a
        # restart opens a new segment in on_start).
        await self.commit()
        await self._sync()
        # Snapshots still queued for the (cancelled) background writer, or
        # cut off in it, are superseded by the last one, which covers more:
        # only it is written. Kept in _unwritten until answered, so that a
        # stop cut short (its timeout) still fails them (_fail_unwritten).
        while True:
            try:
                self._unwritten.append(self._jobs.receive_nowait())
            except trio.WouldBlock:
                break
        if not self.config.stop.snapshot:
            dropped = PersistenceIOError("the server shut down without saving (SHUTDOWN NOSAVE)")
            superseded, self._unwritten = self._unwritten, []
            for _, older in superseded:
                older.error = dropped
                older.done.set()
            self._report_stop()
            await self._close_log()
            return
        ticket = self._start_snapshot()
        if not ticket.done.is_set():
            job, _ = self._jobs.receive_nowait()
            await self._write(job, ticket)
        superseded, self._unwritten = self._unwritten, []
        for _, older in superseded:
            older.error = ticket.error
            older.done.set()
        await self._sync()  # the new segment's head mark, once the snapshot is written
        self._report_stop(ticket.error)
        await self._close_log()

    def _report_stop(self, snapshot_error: BaseException | None = None) -> None:
        """Log what a graceful stop could not do (it is otherwise silent, and exits 0).

        A failed final snapshot loses nothing the log holds: the next start
        replays it. A shard still failing: its last append or sync failed
        (writes refused with ``IO`` are lost with the memory that held them).
        """
        shard = self.store.shard_id
        if snapshot_error is not None:
            log.warning(
                "shard-%d: no snapshot at stop (the next start replays the log): %s",
                shard,
                snapshot_error,
            )
        elif self.dur.health is not Health.OK:
            log.warning("shard-%d: stopped while failing: %s", shard, self.dur.error)

    async def _close_log(self) -> None:
        log, self.dur.log = self.dur.log, None
        if log is not None:
            await trio.to_thread.run_sync(log.close)  # waits for a running sync


class _RecordedSync(LogWrite):
    """``log.sync`` for a sync round, remembering its error for a requester that was killed.

    The coordinator runs the call in a worker thread; a requester cancelled
    meanwhile gets ``Cancelled`` once the round is over, and reads what the
    call did from here (as ``LogBatch`` keeps its own error).
    """

    __slots__ = ("error", "log")

    def __init__(self, log: SegmentedLog) -> None:
        self.log = log
        self.error: OSError | None = None

    def write(self) -> SegmentedLog:
        return self.log  # nothing to write: the appends were made already

    def done(self, error: OSError | None) -> None:
        self.error = error


@attrs.frozen
class _Job:
    data: dict[bytes, bytes]
    expires: dict[bytes, float]
    offset: float
    covers: int
    failures: int  # the shard's failed syncs when the copy was taken (all covered by it)
    gaps: int  # the journal's gaps when the copy was taken (all covered by it)

    def entries(self) -> Iterator[tuple[bytes, bytes, int | None]]:
        expires_get = self.expires.get
        offset = self.offset
        for key, value in self.data.items():
            exp = expires_get(key)
            yield key, value, (None if exp is None else round((exp + offset) * 1000))


def durable_state_factory(
    shard_id: int,
    tracker: MemoryTracker,
    make_policy: Callable[[], EvictionPolicy],
    config: PersistenceConfig,
    prepared: dict[int, ShardStore],
    *,
    scan_snapshots: int = SCAN_SNAPSHOTS,
) -> tuple[Callable[[], ShardStore], Callable[[Any], bool], Callable[[Any], ShardStore]]:
    """The (initial, check, rebuild) hooks of a persistent shard's lasting state.

    ``prepared[shard_id]`` is the store recovery built before the tree started.
    """

    def new_store() -> ShardStore:
        store = ShardStore(shard_id, make_policy(), tracker, scan_snapshots=scan_snapshots)
        store.durability = ShardDurability(
            config.shard_dir(shard_id),
            config.appendfsync,
            segment_bytes=config.segment_bytes,
            snapshot_bytes=config.snapshot_bytes,
        )
        store.journal = store.durability.journal
        return store

    def initial() -> ShardStore:
        store = prepared.pop(shard_id, None)
        return store if store is not None else new_store()

    def check(store: Any) -> bool:
        return isinstance(store, ShardStore) and store.check_invariants()

    def rebuild(store: Any) -> ShardStore:
        fresh = new_store()
        if isinstance(store, ShardStore) and store.durability is not None:
            fresh.durability = store.durability
            fresh.journal = store.durability.journal
            # Effects of an untrusted state: not logged. Their round marks
            # stay reported (the engine keeps those intents) until on_start
            # has redone the rounds from the intents.
            fresh.journal.records.clear()
            fresh.journal.bases.clear()  # of the untrusted state's values
        fresh.needs_recovery = True
        tracker.reset_shard(shard_id, 0)
        return fresh

    return initial, check, rebuild


async def prepare_stores(
    shards: int,
    tracker: MemoryTracker,
    make_policy: Callable[[], EvictionPolicy],
    config: PersistenceConfig,
    *,
    scan_snapshots: int = SCAN_SNAPSHOTS,
) -> tuple[dict[int, ShardStore], list[str], IntentLog]:
    """Recover every shard from disk before the tree starts; (stores, warnings, intent log).

    What a power loss took from the shard logs is put back from the commit
    log before anything is read (:func:`kvmemo.persistence.commitlog.redo`);
    every shard and then the intent log are read before recovery changes any
    file (a truncation, a repair: see ``recovery.recover``'s ``changes``), so
    that a newer format version or damage found in any of them stops the
    start with nothing changed; the multi-shard write a crash cut off is
    redone next (see :func:`_redo_intents`); the intent log returned is
    open, for the engine, which closes it.

    Raises:
        CorruptLog, CorruptSnapshot: damage without ``repair`` (names file and offset).
        NewerVersion: a newer KVMemo wrote a data file (with ``repair`` too).
        OSError: the data directory cannot be used.
    """
    now_ms = int(time.time() * 1000)
    recovered: dict[int, Recovered] = {}
    # What a power loss took from the shard logs, back from the commit log first.
    redone = await trio.to_thread.run_sync(
        functools.partial(redo_commit_log, config.directory, repair=config.repair)
    )
    warnings = [f"commit log: {w}" for w in redone.warnings]
    changes: Changes = []  # to files, made once every file has been read
    for shard in range(shards):
        recovered[shard] = got = await trio.to_thread.run_sync(
            functools.partial(
                recover,
                config.shard_dir(shard),
                now_ms=now_ms,
                repair=config.repair,
                acked=redone.acked_in(config.shard_dir(shard)),
                changes=changes,
            )
        )
        warnings += [f"shard-{shard}: {w}" for w in got.warnings]
    scan = await trio.to_thread.run_sync(read_intents, config.directory)
    await trio.to_thread.run_sync(make_changes, changes)
    unlogged: dict[int, list[tuple[int, bytes]]] = {}
    intents = await trio.to_thread.run_sync(
        lambda: _redo_intents(config, scan, recovered, now_ms, warnings, unlogged)
    )
    # Only now: a crash before this point redoes the commit log again, and
    # its ends still tell the torn tails recovery cut off from damage.
    warnings += [
        f"commit log: {w}"
        for w in await trio.to_thread.run_sync(drop_commit_log, config.directory, redone)
    ]
    stores: dict[int, ShardStore] = {}
    for shard in range(shards):
        make, _, _ = durable_state_factory(
            shard, tracker, make_policy, config, {}, scan_snapshots=scan_snapshots
        )
        store = make()
        store.load(recovered[shard].data, _to_monotonic(recovered[shard].expires))
        redo = unlogged.get(shard, [])  # a redo not logged at start: its marks are not either
        not_logged = {txid for txid, _ in redo}
        _take_marks(store, {t: c for t, c in recovered[shard].marks.items() if t not in not_logged})
        assert store.journal is not None
        store.journal.redo(redo)
        stores[shard] = store
    return stores, warnings, intents


def _redo_intents(
    config: PersistenceConfig,
    scan: IntentScan,
    recovered: dict[int, Recovered],
    now_ms: int,
    warnings: list[str],
    unlogged: dict[int, list[tuple[int, bytes]]],
) -> IntentLog:
    """Redo the multi-shard rounds a crash cut off; open the intent log (blocking).

    Each shard that lacks its part of a retained intent gets it, applied to
    its recovered state and written as a new log segment (synced). Then, if
    every redo is logged, the intent log starts a new segment holding the
    txid reached (so txids keep increasing across restarts) and drops the
    older ones; a redo that could not be logged goes to ``unlogged`` (for
    the shard's journal) and the older segments are kept until it is.
    ``scan``: the intent log as :func:`read_intents` read it.
    """
    warnings += [f"intents: {w}" for w in scan.warnings]
    marks = {s: ShardMarks(r.marks, r.last_txid) for s, r in recovered.items()}
    plan = plan_redo(scan, marks)
    for shard, rounds in plan.items():
        got = recovered[shard]
        txids = ", ".join(str(t) for t, _ in rounds)
        try:
            write_redo(config.shard_dir(shard), rounds, got.data, got.expires)
        except OSError as exc:
            # Applied in memory (write_redo applies first); logged by the
            # shard's first append, and its intents kept until then.
            unlogged[shard] = rounds
            warnings.append(
                f"shard-{shard}: redid its part of multi-shard write(s) {txids} in memory, "
                f"but could not log it yet: {exc}"
            )
        else:
            warnings.append(
                f"shard-{shard}: redid its part of multi-shard write(s) {txids}, cut off by a crash"
            )
        for txid, _ in rounds:
            got.marks[txid] = True
        recovered[shard] = attrs.evolve(got, last_txid=max(got.marks))
        _drop_expired(got, now_ms)
    floor = max([scan.last_txid, *(r.last_txid for r in recovered.values())])
    log = IntentLog(config.directory)
    log.last_txid = floor
    log.redone = sum(len(rounds) for rounds in plan.values())
    try:
        if unlogged:
            log.keep_older(scan.last_txid)
        else:
            if floor:
                log.append(floor, [])  # every round up to it is in its shards' logs
                log.sync()
            log.drop_older()
    except OSError as exc:
        # A read-only or full directory: the store starts anyway (its shards
        # fail writes with IO); multi-shard writes fail until the log opens.
        log.close()
        log.keep_older(scan.last_txid)
        warnings.append(f"intents: the intent log cannot be written: {exc}")
    return log


def health_of(store: ShardStore) -> Health:
    return Health.OK if store.durability is None else store.durability.health


# The messages DurableShardActor.handle_nowait does not pass to the store.
_CONTROL = frozenset({Save, Resave, SyncNow, Hold})
