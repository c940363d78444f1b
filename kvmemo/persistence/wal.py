"""The write-ahead log of one shard: append-only segment files (synchronous, no trio).

Design. A shard's log is a sequence of segment files ``wal-00000001.log``,
``wal-00000002.log``, ... in the shard's data directory, each a plain
concatenation of encoded records (:mod:`.records`). Only the newest segment,
the *current* one, is written, through a file descriptor opened ``O_APPEND``.
A snapshot covering segment N makes every segment <= N redundant, and
:meth:`SegmentedLog.remove_through` deletes them. Segment numbers only grow,
across restarts too: a new log starts after the highest number in use by a
segment *or a snapshot*, so no segment written later can ever be mistaken for
one a snapshot already covers.

Durability is split in two calls so that the integration can group commits:
:meth:`SegmentedLog.append` writes a batch with ``os.write`` (into the page
cache: fast, called from the event loop) and :meth:`SegmentedLog.sync` makes
every batch appended before it durable with ``os.fsync`` (slow, called from a
worker thread). With ``appendfsync always`` a batch is acknowledged after the
``sync`` that follows its ``append``; with ``everysec`` a timer syncs once a
second and batches are acknowledged after their append; with ``no`` the
kernel decides (see :class:`AppendFsync`).

Failures. A failed append (disk full, file too large, I/O error) truncates
the segment back to its size before the batch, so the log never holds part
of a batch followed by later records, and re-raises the ``OSError`` with the
segment's path in it. A failed sync raises too, and from then on the segment
is not trusted: after an ``fsync`` error Linux may drop the dirty pages and
report success to the next ``fsync``, so the next append starts a new segment
instead of writing after data that may be gone (and :meth:`sync` refuses with
:class:`LogFailedError` until then). Records acknowledged before the failure
stay in their segments; the integration should write a snapshot soon after,
so that the suspect segment is no longer needed. The same happens when an
append fails and its truncation fails too.

Threads. ``rotate``, ``remove_through`` and ``close`` are called from one
thread (the event loop); ``append`` from the event loop, or (``appendfsync
always``: the store's sync round appends and syncs a batch together) from a
worker thread while the event loop does not append; ``sync`` from one worker
thread at a time.
``os.write`` on an ``O_APPEND`` descriptor and ``os.fsync`` on the same
descriptor may run concurrently (the kernel serialises them on the inode);
``sync`` makes durable at least every record whose ``append`` returned before
``sync`` was called. A short lock guards the Python state; a second lock is
held by ``sync`` for its whole run, and a descriptor is only ever closed by a
holder of that second lock, so ``rotate`` and ``remove_through`` never close a
descriptor a running ``fsync`` uses (they hand it over to the next ``sync``
or to ``close``).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .records import Record, encode
from .snapshot import list_snapshots

SEGMENT_BYTES = 64 * 1024 * 1024  # bytes in a segment before the next append rotates
_SEGMENT_RE = re.compile(r"wal-(\d{8,})\.log")


class AppendFsync(enum.Enum):
    """When the integration calls :meth:`SegmentedLog.sync` (``appendfsync`` option).

    - ``ALWAYS``: after each batch's append, before acknowledging it (group
      commit: one fsync per batch). Nothing acknowledged is ever lost.
    - ``EVERYSEC``: once a second; acknowledge after the append. A crash of
      the machine loses at most about a second of writes; a crash of the
      process alone loses nothing (the page cache survives it).
    - ``NO``: never; the kernel writes back when it likes.
    """

    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


class LogFailedError(OSError):
    """A sync failed earlier and the segment is no longer trusted; see the module docstring."""


def segment_name(number: int) -> str:
    """The file name of segment ``number`` (``wal-00000001.log``)."""
    return f"wal-{number:08d}.log"


def list_segments(
    directory: Path, pattern: re.Pattern[str] = _SEGMENT_RE
) -> list[tuple[int, Path]]:
    """The segments of ``directory`` as ``(number, path)``, oldest first.

    Files with other names (``.corrupt-*`` leftovers, snapshots) are ignored.
    ``pattern``: what a segment's name matches, its number as group 1 (the
    shard logs' by default; the commit log has its own).
    """
    found = []
    for path in directory.iterdir():
        match = pattern.fullmatch(path.name)
        if match is not None:
            found.append((int(match.group(1)), path))
    found.sort()
    return found


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (created, renamed files) durable.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        raise named(err, directory) from err
    finally:
        os.close(fd)


def named(err: OSError, path: Path) -> OSError:
    """``err`` again, as the same ``OSError`` subclass, with ``path`` in its message."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, err.strerror, str(path))


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short).

    Raises:
        OSError: a write failed; part of ``data`` may have been written.
    """
    written = os.write(fd, data)
    if written == len(data):
        return  # the usual case: no view to make
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


class SyncPlan:
    """What one sync of a :class:`SegmentedLog` makes durable (see :meth:`SegmentedLog.begin_sync`).

    ``retired``: (number, descriptor) of segments rotated out since the last
    sync; ``fd`` and ``number``: the current segment; ``dir_dirty``: a
    segment was created, so the directory entry must be made durable too.
    """

    __slots__ = ("dir_dirty", "fd", "number", "retired", "size")

    def __init__(
        self, retired: list[tuple[int, int]], fd: int, number: int, dir_dirty: bool, size: int
    ) -> None:
        self.retired = retired
        self.fd = fd
        self.number = number
        self.dir_dirty = dir_dirty
        self.size = size  # bytes of the current segment the sync covers


_libc: ctypes.CDLL | None = None


def syncfs_supported() -> str | None:
    """None if :func:`syncfs` can be used here; else why not.

    ``syncfs`` reports write-back errors since Linux 5.8, and the file
    system's own sync errors (a failed journal commit or cache flush) only
    since 5.17; before, such a failure would go unnoticed, so older kernels
    are refused.
    """
    global _libc
    if sys.platform != "linux":
        return f"syncfs needs Linux, not {sys.platform}"
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if match is None or (int(match[1]), int(match[2])) < (5, 17):
        release = os.uname().release
        return f"syncfs needs Linux 5.17 or later (errors are not reported before), got {release}"
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syncfs.argtypes = [ctypes.c_int]
            libc.sync_file_range.argtypes = [
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError):
            return "the C library has no syncfs or sync_file_range"
        _libc = libc
    return None


def syncfs(fd: int) -> None:
    """Make everything written to the file system holding ``fd`` durable (``syncfs(2)``).

    One call syncs every dirty file of that file system, data and metadata
    (directory entries included), and flushes the device cache, as an
    ``fsync`` of each would; an error may belong to any file on it.

    Raises:
        OSError: the sync failed (or :func:`syncfs_supported` refused).
    """
    libc = _libc if _libc is not None else _checked_libc()
    if libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_SYNC_FILE_RANGE_WAIT_AFTER = 4  # <linux/fs.h>


def _checked_libc() -> ctypes.CDLL:
    """The C library, once :func:`syncfs_supported` said yes (it sets ``_libc`` then).

    Raises:
        OSError: it said no.
    """
    why = syncfs_supported()
    if why is not None:
        raise OSError(errno.ENOSYS, why)
    assert _libc is not None
    return _libc


def check_written(fd: int) -> None:
    """Raise the write-back error of ``fd``'s file not yet reported through ``fd``, if any.

    After a :func:`syncfs`: syncfs reports a write-back error once per open
    file *description* (its own error cursor), so a log whose pages failed
    must hear it through its own descriptor, as ``fsync`` would tell it.
    ``sync_file_range(WAIT_AFTER)`` waits for write-back in flight, then
    checks and advances the descriptor's cursor; it flushes no device cache.

    Raises:
        OSError: the error (or :func:`syncfs_supported` refused).
    """
    libc = _libc if _libc is not None else _checked_libc()
    if libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _pread_exact(fd: int, start: int, end: int, path: Path) -> bytes:
    """Bytes ``start`` to ``end`` of the file open as ``fd``.

    Raises:
        OSError: the read failed or came back short.
    """
    data = os.pread(fd, end - start, start)
    if len(data) != end - start:
        raise OSError(errno.EIO, "short read of the log's own bytes", str(path))
    return data


def _read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of the file at ``path``.

    Raises:
        FileNotFoundError: no such file.
        OSError: the read failed or came back short.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread_exact(fd, start, end, path)
    finally:
        os.close(fd)


def _close_quietly(fd: int) -> None:
    # A descriptor is closed only after its fsync succeeded or once its data
    # no longer matters; a close error tells nothing more about the data.
    with contextlib.suppress(OSError):
        os.close(fd)


class SegmentedLog:
    """The append-only log of one shard, as numbered segment files.

    Opening the log creates the directory if needed and a new, empty segment
    numbered after every segment and snapshot already there; recovery
    (:func:`~.recovery.recover`) must have run before, since appends never go
    after old records.

    Args:
        directory: the shard's data directory.
        segment_bytes: size past which the next append starts a new segment.

    Raises:
        ValueError: ``segment_bytes`` < 1.
        OSError: the directory or the segment cannot be created.

    Invariants: the current segment is the highest-numbered one; its size is
    ``self._size`` and every byte of it belongs to a complete record of a
    completed ``append`` (unless the log is failed); ``self._sizes`` has an
    entry for every segment on disk this log knows of.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, got {segment_bytes}")
        self._directory = directory
        self._segment_bytes = segment_bytes
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(directory.parent)
        self._sizes: dict[int, int] = {n: p.stat().st_size for n, p in list_segments(directory)}
        last = max([0, *self._sizes, *(covers for covers, _ in list_snapshots(directory))])
        self._lock = threading.Lock()  # guards the state below; held briefly
        self._sync_lock = threading.Lock()  # held by sync() and close(); only holders close fds
        self._retired: list[tuple[int, int]] = []  # (number, fd) of closed segments to fsync
        self._abandoned: list[int] = []  # fds to close without fsync (their segment is gone)
        self._dir_dirty = True  # a segment was created since the directory was last synced
        self._failed: OSError | None = None
        self._closed = False
        self._number = last + 1
        self._fd = self._create(self._number)
        self._size = 0
        self._covered = 0  # bytes of the current segment durable, or held by a commit log
        # Rotated segments whose end is neither durable nor in a commit log:
        # number -> (start, end) of those bytes (see append_uncovered).
        self._uncovered: dict[int, tuple[int, int]] = {}
        # Segments an own sync of this log failed to make durable: a later
        # fsync may succeed without writing what was lost, so a commit log
        # must not trust one of them until a snapshot removed it.
        self.failed_syncs: set[int] = set()
        self._sizes[self._number] = 0

    @property
    def directory(self) -> Path:
        """The shard's data directory."""
        return self._directory

    @property
    def current(self) -> int:
        """The number of the segment appends go to."""
        return self._number

    def path(self, number: int) -> Path:
        """The path of segment ``number``."""
        return self._directory / segment_name(number)

    def _create(self, number: int) -> int:
        # Readable too: a commit log's payload may need bytes already appended
        # (see append_uncovered).
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        return os.open(self.path(number), flags, 0o644)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed log")

    def append(self, records: Sequence[Record]) -> int:
        """Write ``records`` at the end of the current segment, as one batch.

        Not durable until the next :meth:`sync`. If the current segment has
        reached ``segment_bytes``, or the log has failed, a new segment is
        started first.

        Returns:
            The number of bytes written (0 for no records).

        Raises:
            ValueError: a record breaks a shape rule (nothing written), or
                the log is closed.
            OSError: the write failed (the segment is truncated back to its
                size before the batch when possible; see the module docstring)
                or a new segment could not be created.
        """
        return self.append_encoded(b"".join([encode(record) for record in records]))

    def append_encoded(self, data: bytes) -> int:
        """:meth:`append` for records already encoded (``records.encode_fields``).

        ``data`` must be whole encoded records; they are written as one batch.
        """
        if not data:
            return 0
        with self._lock:
            self._append_locked(data)
        return len(data)

    def append_uncovered(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """:meth:`append_encoded`; then what a commit log must hold to make it durable.

        Returns ``(segment, start, payload)`` pieces, oldest first: every
        byte of this log from ``start`` on in ``segment`` that is neither
        known durable (a :meth:`sync` covered it) nor given to the commit log
        before (:meth:`cover`). The last piece ends with the batch, preceded
        by anything appended outside the commit log since (a segment's head
        mark, a batch taken back, a snapshot's append); the others are such
        bytes left at the end of segments rotated since (a snapshot rotates
        right after its append). A commit log that holds the pieces can
        rewrite the segments from ``start`` after a power loss
        (:mod:`.commitlog`), since every byte before ``start`` is durable or
        held by an older frame. ``data`` must not be empty.
        """
        with self._lock:
            self._check_open()
            if self._failed is not None or self._size >= self._segment_bytes:
                self._rotate_locked()  # as _append_locked would, before the gaps are read
            # Read before the append: if this fails, nothing was appended.
            pieces = []
            for number, (start, end) in sorted(self._uncovered.items()):
                try:
                    pieces.append((number, start, _read_range(self.path(number), start, end)))
                except FileNotFoundError:
                    del self._uncovered[number]  # removed: a snapshot covers it
            start = min(self._covered, self._size)
            gap = b""
            if start < self._size:
                gap = _pread_exact(self._fd, start, self._size, self.path(self._number))
            number, before = self._append_locked(data)
            assert before == start + len(gap)
            pieces.append((number, start, gap + data if gap else data))
            return pieces

    def cover(self, pieces: Sequence[tuple[int, int]]) -> None:
        """The bytes of each ``(segment, end)`` up to ``end`` are durable in a commit log."""
        with self._lock:
            for number, end in pieces:
                if number == self._number:
                    self._covered = max(self._covered, end)
                elif number in self._uncovered and end >= self._uncovered[number][1]:
                    del self._uncovered[number]

    def _append_locked(self, data: bytes) -> tuple[int, int]:
        """Append ``data`` (held lock); (segment number, offset) of the batch."""
        self._check_open()
        if self._failed is not None or self._size >= self._segment_bytes:
            self._rotate_locked()
        fd = self._fd
        before = self._size
        try:
            write_all(fd, data)
        except OSError as exc:
            error = named(exc, self.path(self._number))
            self._truncate_back(fd, before, error)
            if error is exc:
                raise
            raise error from exc
        except BaseException:
            self._truncate_back(fd, before, None)
            raise
        self._size = before + len(data)
        self._sizes[self._number] = self._size
        return self._number, before

    def failed_segments(self) -> frozenset[int]:
        """The segments an own sync of this log failed to make durable (see ``failed_syncs``)."""
        with self._lock:
            return frozenset(self.failed_syncs)

    def sync_created(self) -> None:
        """Make the directory entries of segments created since the last sync durable.

        With a commit log (:mod:`.commitlog`) a segment's bytes are made
        durable by the commit log, but its file must exist after a power
        loss for the redo to find it: so a round syncs the directory of a
        log that created a segment before it acknowledges anything written
        there. A no-op when no segment was created.

        Raises:
            OSError: the directory could not be synced (it stays to be synced).
        """
        with self._lock:
            if not self._dir_dirty:
                return
            self._dir_dirty = False
        try:
            fsync_directory(self._directory)
        except BaseException:
            with self._lock:
                self._dir_dirty = True
            raise

    def _truncate_back(self, fd: int, size: int, error: OSError | None) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError as err:
            # Part of the batch stays at the end of the segment: a torn tail
            # that recovery cuts off. Nothing may be written after it.
            self._failed = named(err, self.path(self._number))
            if error is not None:
                error.add_note(f"truncating the segment back to {size} bytes failed too: {err}")

    def sync(self) -> None:
        """Make every record appended before this call durable (``os.fsync``).

        Syncs the segments retired by :meth:`rotate` since the last sync, the
        current segment, and the directory if a segment was created.

        Raises:
            LogFailedError: an earlier sync failed and nothing was appended
                since (the next append starts a new segment).
            OSError: an fsync failed; the log is failed from now on.
            ValueError: the log is closed.
        """
        plan = self.begin_sync()
        current = plan.number  # the segment being synced, to name it in an error
        error: OSError | None = None
        try:
            for n, old in plan.retired:
                current = n
                os.fsync(old)
            current = plan.number
            os.fsync(plan.fd)
            if plan.dir_dirty:
                fsync_directory(self._directory)
        except OSError as err:
            error = err
        except BaseException:
            self.finish_sync(plan, None, interrupted=True)  # not failed, not synced either
            raise
        failure = self.finish_sync(plan, error, current)
        if failure is not None:
            if failure is error:
                raise failure
            raise failure from error

    def begin_sync(self) -> SyncPlan:
        """Take what a sync must make durable; the caller syncs it, then calls :meth:`finish_sync`.

        :meth:`sync` is the two with ``os.fsync`` in between; a store's sync
        round may instead make many logs durable with one ``syncfs`` (see
        :func:`syncfs`). Until :meth:`finish_sync`, this log's sync lock is
        held: the plan's descriptors stay open, and no other sync of this log
        (in any thread) may begin; the caller must call :meth:`finish_sync`
        exactly once, from the same thread.

        Raises:
            LogFailedError: an earlier sync failed and nothing was appended since.
            ValueError: the log is closed.
        """
        self._sync_lock.acquire()
        try:
            with self._lock:
                self._check_open()
                if self._failed is not None:
                    failed = self._failed
                    raise LogFailedError(
                        failed.errno if failed.errno is not None else errno.EIO,
                        f"segment {segment_name(self._number)} failed earlier ({failed}); "
                        "append to continue in a new segment",
                    )
                retired, self._retired = self._retired, []
                abandoned, self._abandoned = self._abandoned, []
                plan = SyncPlan(retired, self._fd, self._number, self._dir_dirty, self._size)
                self._dir_dirty = False
            for old in abandoned:
                _close_quietly(old)
        except BaseException:
            self._sync_lock.release()
            raise
        return plan

    def finish_sync(
        self,
        plan: SyncPlan,
        error: OSError | None,
        segment: int | None = None,
        *,
        interrupted: bool = False,
    ) -> OSError | None:
        """End the sync of ``plan``, which failed with ``error`` (None: it is durable).

        A failure fails the log (see the module docstring); it is returned
        with the path of ``segment`` (default: the plan's current segment)
        in it, and the segments it was to sync are remembered
        (:attr:`failed_syncs`). ``interrupted``: the sync never ran (neither
        durable nor failed). Closes the retired segments' descriptors and
        releases the sync lock :meth:`begin_sync` took.
        """
        try:
            if interrupted:
                return None
            if error is None:
                with self._lock:
                    if plan.number == self._number and plan.size > self._covered:
                        self._covered = plan.size
                    for number, _ in plan.retired:
                        self._uncovered.pop(number, None)  # synced whole
                return None
            failure = named(error, self.path(plan.number if segment is None else segment))
            with self._lock:
                self._failed = failure
                self._dir_dirty = self._dir_dirty or plan.dir_dirty
                self.failed_syncs.update([plan.number, *(n for n, _ in plan.retired)])
            return failure
        finally:
            for _, old in plan.retired:
                _close_quietly(old)
            self._sync_lock.release()

    def device(self, plan: SyncPlan) -> int:
        """The file system (``st_dev``) of the log's segments, for grouping syncs.

        Raises:
            OSError: the descriptor cannot be queried.
        """
        return os.fstat(plan.fd).st_dev

    def rotate(self) -> int:
        """Start a new segment; later appends go to it.

        The closed segment stays on disk and is synced by the next
        :meth:`sync`. Use before a snapshot: the snapshot covers the
        returned number, then :meth:`remove_through` it.

        Returns:
            The number of the segment just closed.

        Raises:
            OSError: the new segment cannot be created (nothing changed).
            ValueError: the log is closed.
        """
        with self._lock:
            self._check_open()
            return self._rotate_locked()

    def _rotate_locked(self) -> int:
        closed = self._number
        if self._covered < self._size:
            # Neither synced nor in a commit log: the next piece list holds them.
            self._uncovered[closed] = (self._covered, self._size)
        fd = self._create(closed + 1)
        self._retired.append((closed, self._fd))
        self._fd, self._number, self._size, self._covered = fd, closed + 1, 0, 0
        self._sizes[self._number] = 0
        self._dir_dirty = True
        self._failed = None
        return closed

    def segments(self) -> list[Path]:
        """The paths of every segment on disk, oldest first (the current one last)."""
        with self._lock:
            return [self.path(n) for n in sorted(self._sizes)]

    def size(self) -> int:
        """Bytes in all segments (as appended; a failed append counts nothing)."""
        with self._lock:
            return sum(self._sizes.values())

    def count_through(self, number: int) -> int:
        """How many segments numbered <= ``number`` are on disk (as far as this log knows)."""
        with self._lock:
            return sum(1 for n in self._sizes if n <= number)

    def remove_through(self, number: int) -> None:
        """Delete every segment numbered <= ``number`` (a snapshot covers them).

        Raises:
            ValueError: ``number`` is the current segment or later, or the
                log is closed.
            OSError: a segment cannot be deleted (the first such error; every
                other segment that could be deleted is gone: one undeletable
                segment does not keep the later ones).
        """
        with self._lock:
            self._check_open()
            if number >= self._number:
                raise ValueError(
                    f"number must be < the current segment {self._number}, got {number}"
                )
            error: OSError | None = None
            for n in sorted(k for k in self._sizes if k <= number):
                # Covered: its bytes (synced or not) no longer matter, even
                # while it cannot be deleted (it then stays in _sizes, counted
                # as left over, and is tried again by the next call).
                self._uncovered.pop(n, None)
                self.failed_syncs.discard(n)
                try:
                    os.unlink(self.path(n))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    error = error or exc
                    continue
                del self._sizes[n]
            keep = []
            for n, fd in self._retired:
                if n <= number:
                    self._abandoned.append(fd)
                else:
                    keep.append((n, fd))
            self._retired = keep
            if self._abandoned and self._sync_lock.acquire(blocking=False):
                try:
                    for fd in self._abandoned:
                        _close_quietly(fd)
                    self._abandoned.clear()
                finally:
                    self._sync_lock.release()
            if error is not None:
                raise error

    def close(self) -> None:
        """Close every descriptor, without syncing (call :meth:`sync` first).

        Waits for a running :meth:`sync`. Idempotent.
        """
        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in [self._fd, *(fd for _, fd in self._retired), *self._abandoned]:
                _close_quietly(fd)
            self._retired.clear()
            self._abandoned.clear()

    def __enter__(self) -> SegmentedLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
