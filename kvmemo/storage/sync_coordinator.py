"""Cross-shard group commit: one worker-thread round makes every waiting shard's batch durable.

Design. With ``appendfsync always`` each shard writes a drained batch to its
own log and must have it on disk before it replies (group commit, see
:mod:`.durable_shard`). Synced shard by shard, every batch cost its own
``trio.to_thread.run_sync`` hand-off: with 64 writers over 16 shards, about
3 records per hand-off, and the thread dispatch and GIL hand-overs, not the
disk, dominated the cost of a write (~136 µs of CPU per SET against ~12 µs
in memory). The shards of one store therefore share a
:class:`SyncCoordinator` that works in *rounds*:

- A shard files a request, a synchronous call (its batch's append and
  fsync, :class:`~.durability.LogBatch`, or a bare ``SegmentedLog.sync``),
  and waits. Requests filed while a round runs gather for the next round.
- Leader/follower, no task of its own: a requester that finds no round
  claimed becomes the *leader*. It yields while the last scheduler pass
  brought new requests (at most ``GATHER_PASSES`` passes, so that the shards
  answered by the previous round join this one), takes every request
  gathered and runs their calls in ONE worker thread (one hand-off to
  trio's thread cache, see ``_in_thread``), which spreads them over ``SYNC_WIDTH``
  lanes (helper threads from trio's thread cache, joined before the round
  returns) because the file system merges the journal commits of
  concurrent fsyncs. The leader then hands each request its own outcome
  and, if requests gathered meanwhile, promotes the oldest one's task to
  lead the next round. One round runs at a time; the next one gathers
  while it runs.
- Each request has its own outcome: an error raised by one call (a disk
  error on one shard's log) goes to that request's task alone, and the
  round carries on with the other calls: one shard's trouble does not stop
  the others.

fsync, not fdatasync: for an append the file size changes, so fdatasync
must commit the same journal transaction as fsync; measured on ext4 the two
cost the same, and the log keeps ``os.fsync`` (:mod:`kvmemo.persistence.wal`).

``syncfs`` rounds (``method="syncfs"``, opt-in). One ``fsync`` per log per
round costs each log its own journal commit and device-cache flush: 16 logs
over 4 threads took ~1.8 ms of wall time and as much CPU on the development
VM, where one ``syncfs(2)`` after the same 16 appends took ~0.4 ms and 0.16
ms of CPU. In a syncfs round, a call that is a :class:`LogWrite` is split:
every such call's write runs first (in the round's thread), then each file
system the logs are on gets one ``syncfs``, and each call gets the outcome of
its file system's. ``syncfs`` reports a write-back error once per open file
description, so each log's own descriptors are then checked
(``sync_file_range``, no device flush), as its ``fsync`` would have told it.
The price: ``syncfs`` makes *everything* written to that file system
durable, other programs' files included, so a busy neighbour makes rounds
slower; and an error of the syncfs itself cannot be told apart per log, so
every log of that file system is treated as failed (each owes a re-save).
Other calls run as they are, in the round's thread.

``commitlog`` rounds (``method="commitlog"``, the store's default): every
:class:`CommitWrite` (a shard's batch) is appended to its own log without a
sync, and one frame of all of them goes to the store's commit log, which
alone is synced (see :mod:`kvmemo.persistence.commitlog`); other calls run
as they are. One ``fsync`` per round instead of one per shard.

Who owns what. The coordinator owns no task and no thread: a round runs in
its leader's task, which waits for it, and its helper threads are joined
before it returns, so nothing outlives the shards that use it (the store's
nursery owns every task involved; a closed store has no round running and
nothing gathering). The shards of one store share it through their
:class:`~.durable_shard.PersistenceConfig`.

Cancellation. A round, once its leader has taken the requests, runs to its
end: the worker-thread call is shielded, so a leader cancelled (killed,
restarted, shut down) meanwhile still hands every request its outcome,
promotes the next leader and returns its own outcome; its cancellation is
delivered at its next checkpoint. A shard's kill waits at most for one
round, as it waited for its own fsync before. A
requester cancelled while its request is gathering withdraws it (its call
never runs; if that leaves requests gathering and no round claimed, the
oldest is promoted); one cancelled while its request is in the running round
stays parked until that round ends (the cancellation cannot abort its wait;
its call has then run: the caller reads what happened from the call itself)
and then takes its cancellation.

Invariants (at every checkpoint): a request not yet done is either in
``_gathering`` or in the running round's batch; ``_leading`` is True from
the moment a leader claims the next round until that round's outcomes are
handed out; when ``_leading`` is False and requests are gathering, the
oldest one's task has been rescheduled, or is running (it is about to lead).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from ..persistence.commitlog import (
    CHECKPOINT_BYTES,
    MAX_ENTRY_BYTES,
    CommitLog,
    CommitLogError,
    Entry,
)
from ..persistence.wal import SegmentedLog, SyncPlan, check_written, syncfs, syncfs_supported

# A new leader yields while the last scheduler pass brought new requests, at most
# this many passes: the shards answered by the previous round need about two
# passes (their writers run, then the shards do) to file their next batch.
GATHER_PASSES = 2  # scheduler passes
FSYNC = "fsync"  # a round syncs each log (spread over SYNC_WIDTH threads)
SYNCFS = "syncfs"  # a round writes every LogWrite, then one syncfs per file system
COMMITLOG = "commitlog"  # a round writes every CommitWrite, then syncs one commit log frame
METHODS = (FSYNC, SYNCFS, COMMITLOG)
# Threads a round's calls are spread over. A journalling file system merges
# the commits of concurrent fsyncs: 16 logs took ~2.5-3 ms synced one after
# the other and ~1.1 ms over 4 threads on the development disk (ext4); more
# threads gained nothing and cost more CPU.
SYNC_WIDTH = 4  # threads per round

_T = TypeVar("_T")


class _Request:
    """One requester's call in a round and, once done, its outcome.

    The requester parks its own task on the request (``task``) instead of
    waiting on a ``trio.Event``: a wake is one ``reschedule``, and there is
    one request per shard per round, so every ``always`` write pays a share
    of it. ``_wake`` reschedules the parked task, if any; a requester not
    parked re-reads the coordinator's state before it parks again, so no
    wake is lost. ``cancelled``: a cancellation arrived while the running
    round held the request (the requester stays parked until the round
    ends, then takes it).
    """

    __slots__ = ("call", "cancelled", "coordinator", "done", "error", "task")

    def __init__(self, coordinator: SyncCoordinator, call: Callable[[], object]) -> None:
        self.coordinator = coordinator
        self.call = call
        self.task: trio.lowlevel.Task | None = None
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """A cancellation reached the parked requester."""
        coordinator = self.coordinator
        if self in coordinator._gathering:
            # Not taken by a round yet: withdraw it (its call never runs).
            self.task = None
            coordinator._withdraw(self)
            return _SUCCEEDED
        # In the running round: its call may be running in a worker thread
        # now. Stay parked until the round ends, so that the caller's end (a
        # shard's kill or restart) never outruns its own call; the requester
        # takes the cancellation then (see SyncCoordinator.sync).
        self.cancelled = True
        return _FAILED


def _wake(request: _Request) -> None:
    """Reschedule the request's parked task, if it is parked."""
    task = request.task
    if task is not None:
        request.task = None
        _reschedule(task)


_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_FAILED = trio.lowlevel.Abort.FAILED
_reschedule = trio.lowlevel.reschedule
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled


class RoundIncompleteError(RuntimeError):
    """The round holding this request could not run to its end (a bug or an interrupt)."""


@attrs.frozen
class SyncStatistics:
    """What the coordinator did so far (for benchmarks and tests).

    Attributes:
        rounds: rounds run (worker-thread hand-offs).
        requests: requests that ran in a round.
        gathering: requests waiting for the next round now.
        leading: whether a round is claimed or running now.
    """

    rounds: int
    requests: int
    gathering: int
    leading: bool


class LogWrite:
    """A round's call that writes to a log, then needs that log synced.

    Calling it does both with the log's own ``fsync`` (:meth:`SegmentedLog.sync`);
    a ``syncfs`` round calls :meth:`write`, syncs the file systems of all the
    round's logs at once, then calls :meth:`done`. Subclasses define
    :meth:`write` and :meth:`done`; both run in the round's thread.
    """

    __slots__ = ()

    def write(self) -> SegmentedLog | None:
        """Do everything before the sync; the log to sync (None: nothing done, nothing to sync).

        A call whose write returns None is not told anything (:meth:`done`
        is not called): it did nothing (a batch its shard took back).

        Raises:
            Exception: the write failed (the sync does not happen).
        """
        raise NotImplementedError

    def done(self, error: OSError | None) -> None:
        """The sync's outcome: None once durable, else its error."""
        raise NotImplementedError

    def __call__(self) -> None:
        log = self.write()
        if log is None:
            return
        try:
            log.sync()
        except OSError as exc:
            self.done(exc)
            raise
        self.done(None)


class CommitWrite(LogWrite):
    """A :class:`LogWrite` whose bytes a commit log can hold (``commitlog`` rounds).

    A ``commitlog`` round calls :meth:`write_uncovered` instead of
    :meth:`write`, puts what it returns in the round's commit log frame,
    syncs that frame alone, then calls :meth:`done` with its outcome.
    """

    __slots__ = ()

    def write_uncovered(self) -> tuple[SegmentedLog, list[tuple[int, int, bytes]]] | None:
        """Append; ``(log, pieces)`` for the commit log (see
        ``SegmentedLog.append_uncovered``), or None: nothing done, nothing to tell.

        Raises:
            Exception: the write failed.
        """
        raise NotImplementedError


def _sync_own(
    index: int, call: LogWrite, log: SegmentedLog, errors: list[BaseException | None]
) -> None:
    """Make ``call``'s bytes durable with its log's own ``fsync``; tell it the outcome."""
    try:
        log.sync()
    except OSError as exc:
        errors[index] = exc
        call.done(exc)
    else:
        call.done(None)


def _commit_round(
    calls: Sequence[Callable[[], object]], commit_log: Callable[[], CommitLog]
) -> list[BaseException | None]:
    """Run a ``commitlog`` round (see :mod:`kvmemo.persistence.commitlog`); each call's error.

    Every :class:`CommitWrite` appends to its own log (no sync), then one
    frame holding all their pieces is appended to the commit log and
    synced; each gets that outcome. Other calls run as they are (their own
    ``fsync``). A call whose pieces are over ``MAX_ENTRY_BYTES`` (or whose
    log is outside the data directory) is synced by its log's own
    ``fsync``; so is every call when the commit log cannot be opened or
    cannot start a new segment (a round never fails for want of the commit
    log alone). The commit log is opened only by a round with a CommitWrite.
    """
    errors: list[BaseException | None] = [None] * len(calls)
    log: CommitLog | None = None
    if any(isinstance(call, CommitWrite) for call in calls):
        with contextlib.suppress(OSError):
            log = commit_log()
    if log is None:
        return _run_calls(calls)
    waiting: list[tuple[int, CommitWrite, SegmentedLog, list[tuple[int, int]]]] = []
    entries: list[Entry] = []
    for i, call in enumerate(calls):
        try:
            if not isinstance(call, CommitWrite):
                call()
                continue
            got = call.write_uncovered()
            if got is None:
                continue  # nothing was written: nothing to tell (as in LogWrite.__call__)
            target, pieces = got
            name = log.name_of(target.directory)
            if name is not None:
                log.watch(name, target)
            if name is None or sum(len(p) for _, _, p in pieces) > MAX_ENTRY_BYTES:
                _sync_own(i, call, target, errors)
                continue
            try:
                target.sync_created()  # the segment must exist for the redo to find it
            except OSError as exc:
                call.done(exc)
                raise
        except Exception as exc:  # noqa: BLE001 - handed to its own requester
            errors[i] = exc
            continue
        waiting.append((i, call, target, [(n, start + len(p)) for n, start, p in pieces]))
        entries += [Entry(name, n, start, p) for n, start, p in pieces]
    if not waiting:
        return errors
    error: OSError | None = None
    try:
        log.commit(entries)
    except CommitLogError as exc:
        error = exc
    except OSError:  # no new segment could be started: each log's own fsync instead
        for i, call, target, _ in waiting:
            _sync_own(i, call, target, errors)
        return errors
    for i, call, target, ends in waiting:
        if error is None:
            target.cover(ends)
        errors[i] = error
        call.done(error)
    return errors


def _run_calls(calls: Sequence[Callable[[], object]]) -> list[BaseException | None]:
    """Run every call in order; each one's error, or None."""
    errors: list[BaseException | None] = []
    for call in calls:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - handed to its own requester, raised there
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def _run_round(calls: Sequence[Callable[[], object]], width: int) -> list[BaseException | None]:
    """Run a round's calls on up to ``width`` threads (from the round's worker thread).

    The calls are dealt round-robin into ``width`` lanes; this thread runs the
    first lane and helper threads from trio's thread cache run the others;
    it returns once every lane has finished (no helper's work outlives the
    round). Returns each call's error, or None, in the order of ``calls``.

    Raises:
        RoundIncompleteError: a helper lane failed outside its calls.
    """
    width = max(1, min(width, len(calls)))
    if width == 1:
        return _run_calls(calls)
    lanes = [calls[i::width] for i in range(width)]
    # Each helper's ``outcome.Outcome`` (trio's thread cache delivers one).
    results: list[Any] = [None] * width
    left = width - 1
    lock = threading.Lock()
    finished = threading.Event()

    def deliver(lane: int) -> Callable[[Any], None]:
        def put(result: Any) -> None:
            nonlocal left
            results[lane] = result
            with lock:
                left -= 1
                if left == 0:
                    finished.set()

        return put

    started = 1
    try:
        for lane in range(1, width):
            trio.lowlevel.start_thread_soon(
                functools.partial(_run_calls, lanes[lane]), deliver(lane), "kvmemo sync lane"
            )
            started += 1
    except BaseException as exc:
        # A lane could not start: wait for those that did (no helper's work
        # may outlive the round), then fail the round.
        with lock:
            left -= width - started
            if left == 0:
                finished.set()
        finished.wait()
        raise RoundIncompleteError(f"a sync lane could not start: {exc!r}") from exc
    first = _run_calls(lanes[0])
    finished.wait()
    errors: list[BaseException | None] = [None] * len(calls)
    errors[0::width] = first
    for lane in range(1, width):
        result = results[lane]
        assert result is not None
        try:
            errors[lane::width] = result.unwrap()
        except Exception as exc:
            raise RoundIncompleteError(f"a sync lane failed: {exc!r}") from exc
    return errors


def _syncfs_round(calls: Sequence[Callable[[], object]]) -> list[BaseException | None]:
    """Run a ``syncfs`` round (see the module docstring); each call's error, or None.

    Every :class:`LogWrite` writes first, then the logs are synced one
    ``syncfs`` per file system and each call gets its file system's outcome
    (named after its own log). A log met twice is synced once for both.
    Every log's sync lock taken here is released before this returns; if the
    round is interrupted before its syncs ended, no call is told durable.
    """
    errors: list[BaseException | None] = [None] * len(calls)
    # id(log) -> (log, its plan, its file system, the calls waiting on it)
    planned: dict[int, tuple[SegmentedLog, SyncPlan, int, list[tuple[int, LogWrite]]]] = {}
    outcome: dict[int, OSError | None] = {}  # file system -> its syncfs error, or None
    synced = False
    try:
        for i, call in enumerate(calls):
            if not isinstance(call, LogWrite):
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - handed to its own requester
                    errors[i] = exc
                continue
            try:
                log = call.write()
                if log is None:
                    continue  # nothing was written: nothing to tell (as in LogWrite.__call__)
                entry = planned.get(id(log))
                if entry is None:
                    plan = log.begin_sync()
                    try:
                        device = log.device(plan)
                    except BaseException:
                        log.finish_sync(plan, None, interrupted=True)
                        raise
                    entry = planned[id(log)] = (log, plan, device, [])
            except OSError as exc:
                errors[i] = exc
                call.done(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a closed log (ValueError), ...
                errors[i] = exc
                continue
            entry[3].append((i, call))
        for _, plan, device, _ in planned.values():
            if device not in outcome:
                try:
                    syncfs(plan.fd)
                except OSError as exc:
                    outcome[device] = exc
                else:
                    outcome[device] = None
        # syncfs reports a write-back error once per open file description: a
        # log whose pages failed hears it through its own descriptors only
        # (the syncfs above may have gone through another log's). Each is
        # checked, even after a failed syncfs, so that every error is taken.
        own: dict[int, OSError | None] = {}
        for key, (_, plan, device, _) in planned.items():
            own[key] = outcome[device]
            for fd in (plan.fd, *(old for _, old in plan.retired)):
                try:
                    check_written(fd)
                except OSError as exc:
                    own[key] = own[key] or exc
        synced = True
    finally:
        for key, (log, plan, _, waiting) in planned.items():
            if not synced:
                log.finish_sync(plan, None, interrupted=True)  # release it, tell nobody durable
                continue
            error = log.finish_sync(plan, own[key])
            for i, call in waiting:
                errors[i] = error
                call.done(error)
    return errors


def _incomplete(cause: Exception) -> RoundIncompleteError:
    """A request's outcome when its round could not complete (one per request)."""
    error = RoundIncompleteError(f"the sync round did not complete: {cause!r}")
    error.__cause__ = cause
    return error


def _cannot_abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


async def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn()`` in a thread of trio's thread cache; its result (or raise its error).

    ``trio.to_thread.run_sync`` without what a round does not need: no
    capacity limiter (one round runs at a time), no ``trio.from_thread``
    context, no cancellation (the caller holds a shielded scope, and this
    wait cannot be aborted either: a round, once started, is waited for).
    Its cost is per round, so every ``always`` write pays a share of it.
    The thread hands the outcome back with ``run_sync_soon``, which wakes the
    event loop; the caller's task is parked until then, so the thread never
    outlives it.

    Raises:
        RuntimeError: the thread could not be started (nothing ran).
        Exception: whatever ``fn`` raised.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver, name="kvmemo sync round")
    result: _T = await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
    return result


class SyncCoordinator:
    """Runs the syncs of several shards in shared worker-thread rounds.

    See the module docstring for the design, ownership and cancellation.

    Args:
        gather_passes: at most this many scheduler passes a new leader
            yields, while each brings new requests, before taking the round
            (0: take only what has already gathered).
        width: threads a round's calls are spread over (``fsync`` rounds).
        method: ``fsync`` (each log synced by itself), ``syncfs`` (one
            ``syncfs`` per file system per round; see the module docstring)
            or ``commitlog`` (one commit log frame synced per round, see
            :mod:`kvmemo.persistence.commitlog`).
        directory: the data directory, where a ``commitlog`` round keeps
            the commit log (required by that method).
        checkpoint_bytes: the commit log's checkpoint size.

    Raises:
        ValueError: ``gather_passes`` < 0, ``width`` < 1, an unknown
            ``method``, ``syncfs`` where it cannot be used, or
            ``commitlog`` without a directory.

    The commit log is opened by the first ``commitlog`` round; :meth:`close`
    closes it, once no round runs (the store's shards have stopped).
    """

    def __init__(
        self,
        *,
        gather_passes: int = GATHER_PASSES,
        width: int = SYNC_WIDTH,
        method: str = FSYNC,
        directory: Path | None = None,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
    ) -> None:
        if gather_passes < 0:
            raise ValueError(f"gather_passes must be >= 0, got {gather_passes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if method not in METHODS:
            raise ValueError(f"method must be fsync, syncfs or commitlog, got {method!r}")
        if method == COMMITLOG and directory is None:
            raise ValueError("the commitlog method needs the data directory")
        if method == SYNCFS:
            why = syncfs_supported()
            if why is not None:
                raise ValueError(why)
        self._gather_passes = gather_passes
        self._width = width
        self.method = method
        self._gathering: list[_Request] = []
        self._leading = False
        self._rounds = 0
        self._requests = 0
        self._directory = directory
        self._checkpoint_bytes = checkpoint_bytes
        self.commit_log: CommitLog | None = None  # opened by the first commitlog round
        self._closed = False

    def _commit_log(self) -> CommitLog:
        """The commit log, opened now if not yet (in a round's thread).

        Raises:
            OSError: it cannot be opened (the round falls back to fsync).
        """
        if self.commit_log is None:
            if self._closed:
                raise OSError(errno.EBADF, "the store's commit log is closed")
            assert self._directory is not None
            self.commit_log = CommitLog(self._directory, checkpoint_bytes=self._checkpoint_bytes)
        return self.commit_log

    def checkpoint_failure(self, directory: Path) -> OSError | None:
        """Take the error of a checkpoint that could not sync the log in ``directory``.

        After such an error the bytes of that log are in doubt, as after a
        failed ``fsync`` of its own (see :class:`~.durability.ShardDurability`):
        the shard owes a re-save. Its frames are kept meanwhile (see
        ``CommitLog.checkpoint``). None when there is none (or no commit log).
        """
        log = self.commit_log
        return None if log is None else log.take_failure(directory)

    def close(self) -> None:
        """Close the commit log, for good (no round may be running). Idempotent.

        A later ``commitlog`` round syncs each log with its own ``fsync``.
        """
        self._closed = True
        if self.commit_log is not None:
            self.commit_log.close()
            self.commit_log = None

    def statistics(self) -> SyncStatistics:
        """The counters and the current state."""
        return SyncStatistics(self._rounds, self._requests, len(self._gathering), self._leading)

    async def sync(self, call: Callable[[], object]) -> None:
        """Run ``call`` in the next round's worker thread; return when it has returned.

        Args:
            call: a synchronous function, safe to run in a worker thread
                beside the other requests' calls (``LogBatch``,
                ``SegmentedLog.sync``); its return value is ignored.

        Raises:
            Exception: whatever ``call`` raised (only this requester gets it).
            RoundIncompleteError: the round could not run (its worker thread
                did not start, or was interrupted).
            trio.Cancelled: cancelled before the round holding the request
                ended; the call may or may not have run.
        """
        request = _Request(self, call)
        self._gathering.append(request)
        try:
            while not request.done:
                if not self._leading:
                    await self._lead()
                else:
                    # Parked until the round holding the request ends, or until
                    # it is promoted to lead the next round (see _Request).
                    request.task = _current_task()
                    await _wait_task_rescheduled(request._abort)
        finally:
            if not request.done:
                self._withdraw(request)
        if request.cancelled:
            # Cancelled while the running round held the request: the round
            # has ended, so the cancellation is taken now (still pending in
            # the caller's cancel scope, it is raised by this checkpoint).
            await trio.lowlevel.checkpoint()
        if request.error is not None:
            raise request.error

    async def _lead(self) -> None:
        """Claim the next round, let others join, run it, hand out its outcomes."""
        self._leading = True
        batch: list[_Request] = []
        errors: list[BaseException | None] | None = None
        try:
            # Gather: yield while the last pass brought new requests, at most
            # gather_passes times (may raise Cancelled: nothing taken yet).
            for _ in range(self._gather_passes):
                waiting = len(self._gathering)
                await trio.lowlevel.checkpoint()
                if len(self._gathering) == waiting:
                    break
            batch, self._gathering = self._gathering, []
            # Shielded: once taken, the requests are all answered, even if this
            # leader is cancelled meanwhile (its cancellation comes after).
            with trio.CancelScope(shield=True):
                calls = [r.call for r in batch]
                if self.method == SYNCFS:
                    run = functools.partial(_syncfs_round, calls)
                elif self.method == COMMITLOG:
                    run = functools.partial(_commit_round, calls, self._commit_log)
                else:
                    run = functools.partial(_run_round, calls, self._width)
                try:
                    errors = await _in_thread(run)
                except Exception as exc:  # noqa: BLE001 - every request gets it
                    # The thread did not start (nothing ran), or the round failed
                    # outside its calls: every request, the leader's own included,
                    # gets RoundIncompleteError (a shard handles it as an IO error).
                    errors = [_incomplete(exc) for _ in batch]
        finally:
            # No checkpoint from here on: the hand-out is atomic.
            self._leading = False
            if batch:
                self._rounds += 1
                self._requests += len(batch)
            if errors is None:  # the thread could not start, or failed outside the calls
                errors = [RoundIncompleteError("the sync round did not complete") for _ in batch]
            for request, error in zip(batch, errors, strict=True):
                request.done = True
                request.error = error
                _wake(request)
            self._promote()

    def _withdraw(self, request: _Request) -> None:
        """Forget a request whose requester left before its outcome (no checkpoint)."""
        with contextlib.suppress(ValueError):  # not gathering: it is in the running round
            self._gathering.remove(request)
        self._promote()

    def _promote(self) -> None:
        """If no round is claimed and requests are gathering, wake the oldest to lead."""
        if not self._leading and self._gathering:
            _wake(self._gathering[0])
