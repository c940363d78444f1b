"""The commit log: one file synced per ``appendfsync always`` round instead of every shard log.

Design. With ``appendfsync always`` a write is acknowledged once its record
is on disk. Syncing each shard's own log costs one ``fsync`` per shard per
round: 16 logs took ~1.6 ms of CPU and wall time per round on the
development VM, where appending the same bytes to one more file and syncing
that one took ~0.15 ms. So the store's sync rounds (``fsync_method
"commitlog"``, the default) write each shard's batch to its own log as
before, *without* syncing it, and append one *frame* holding every batch of
the round, with where each went (log directory, segment, offset), to this
log, which alone is synced. A batch is durable once its frame is.

After a power loss the shard logs may lack what the page cache held; the
frames put it back (:func:`redo`), before any shard recovers: each frame's
payloads are written at their place in their segments (where they differ,
and where they do not: after a write-back error the page cache may hold
bytes the disk lost). A log's pieces start where its durable bytes end (see
``SegmentedLog.append_uncovered``): anything appended outside a round (a
segment's head mark, a batch taken back, a snapshot's append) rides in the
next frame, from the current segment or from the end of one rotated since,
so no hole is ever left before a payload. A segment file that no longer
exists was deleted on purpose (a snapshot covered it, or its intents were
settled): its frames are skipped, since a new segment's directory entry is
made durable before any frame names it (``SegmentedLog.sync_created``).

Size. A log's pieces over ``MAX_ENTRY_BYTES`` in one round are synced by
the log's own ``fsync`` instead, and a round's entries are split over
frames of at most ``MAX_FRAME_BYTES`` (all appended, then one sync), so no
length field comes near its 32-bit limit.

Retention (a *checkpoint*). Once the current segment of this log passes
``checkpoint_bytes``, the next round starts a new one, syncs every shard log
segment that the older ones name (by path: a shard may have closed its log
since) and then deletes the older segments. A segment whose sync fails is
never trusted again (a later ``fsync`` may succeed without writing the pages
the failed one lost): its shard is told, owes a re-save, and the older
commit segments stay until the re-save's snapshot has removed that segment.
So, while the disk works, a recovery reads about ``checkpoint_bytes`` (plus
one round's frames) of this log at most.

Format of a frame, little-endian (frames are appended one after the other
to ``commit/commit-NNNNNNNN.log`` under the data directory)::

    offset  size  field
    0       4     CRC32 of bytes 4 to 16 (the header's own)
    4       1     version (FRAME_VERSION)
    5       4     payload length P
    9       4     CRC32 of the payload
    13      4     the frame's number in its segment (0, 1, ...)
    17      P     payload: entry count u32, then per entry: directory name
                  length u16, name (UTF-8, relative to the data directory),
                  segment u64, offset u64, data length u32, data

Damage. The header has its own CRC, so a damaged length is never taken for
a frame cut short. A torn tail is a crash during the last append of a
segment (or a failed append or sync, after which the next frame goes to a
new segment), so none of its batches was acknowledged; it is ignored, with a
warning. It is a frame whose valid header says it goes past the end of its
segment, a frame with a valid header but a damaged payload and only zero
bytes after it, or a damaged header with no whole frame anywhere after it
(its pages may reach the disk in any order): a frame numbered later, of
any version, however many frames the damage spans (see ``_frame_after``).
Any other damage stops the start with
:class:`~.recovery.CorruptLog` naming the file and offset, unless
``repair``: then the frames before it are redone, and that segment and
every later one are moved aside (``.corrupt-<offset>``), with a warning.

Versions. Every later frame version keeps the 17-byte header as it is (the
CRC of bytes 4 to 16 first, the version at offset 4), so a frame whose
header CRC holds and whose version is above :data:`FRAME_VERSION` is known
to come from a newer KVMemo: the start is refused
(:class:`~.records.NewerVersion`), with or without ``repair``, and nothing
of the commit log is redone, ignored as torn, moved aside or deleted. So
is one after damage: after a damaged frame, or in a later segment (a
repair would move them aside).

Threads. :class:`CommitLog` is used by one thread at a time: the sync
coordinator's round (rounds never overlap), and ``close`` once no round
runs; :meth:`CommitLog.take_failure` alone is called from the event loop
(one dict ``pop``, atomic under the GIL). :func:`redo` runs before the
store starts, in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from .records import NewerVersion
from .recovery import CorruptLog
from .wal import SegmentedLog, fsync_directory, list_segments, named, segment_name, write_all

COMMIT_DIR = "commit"  # under the data directory, beside shard-N/ and intents/
CHECKPOINT_BYTES = 16 * 1024 * 1024  # a segment past this size starts a checkpoint
FRAME_VERSION = 1
# header crc32, version, payload length, payload crc32, sequence number in its segment
_HEADER = struct.Struct("<IBIII")
_CRC = struct.Struct("<I")
_FIELDS = struct.Struct("<BIII")  # what the header's CRC covers
_COUNT = struct.Struct("<I")
_NAME = struct.Struct("<H")
_PLACE = struct.Struct("<QQI")  # segment, offset, data length
_SEGMENT_RE = re.compile(r"commit-(\d{8,})\.log")
_WAL_RE = re.compile(r"wal-(\d{8,})\.log")  # a shard log segment's name (wal.segment_name)
# Bytes of one log's pieces in one round, at most; more goes by the log's own
# fsync. Keeps every length field far from its 32-bit limit.
MAX_ENTRY_BYTES = 256 * 1024 * 1024
MAX_FRAME_BYTES = 1024 * 1024 * 1024  # payload of one frame; a round may write several
# Frame numbers after a damaged frame searched for a frame of any version (a
# newer build's): damage spanning more frames hides a newer one. Frames of
# this build's version are found after any number (see _frame_after).
FOLLOW_SPAN = 8
_ZEROS = bytes(64 * 1024)  # compared a chunk at a time to skip a segment's trailing zeros


class CommitLogError(OSError):
    """A frame could not be appended or synced: its round's batches are not durable.

    Their bytes are in their shard logs all the same, and stay *uncovered*
    (``SegmentedLog.cover`` was not called), so the next frame naming each
    log holds them again, in a new segment of the commit log: unlike a
    failed ``fsync`` of a shard's own log, nothing is left in doubt, and no
    re-save is owed.
    """


@attrs.frozen
class Entry:
    """One batch of a frame: ``data`` belongs at ``offset`` of segment ``segment`` of ``log``.

    ``log`` is the log's directory relative to the data directory
    (``shard-3``, ``intents``).
    """

    log: str
    segment: int
    offset: int
    data: bytes


def encode_frame(entries: Sequence[Entry], seq: int = 0) -> bytes:
    """One frame holding ``entries`` (see the module docstring for the layout)."""
    parts = [_COUNT.pack(len(entries))]
    for entry in entries:
        name = entry.log.encode()
        parts += [_NAME.pack(len(name)), name]
        parts += [_PLACE.pack(entry.segment, entry.offset, len(entry.data)), entry.data]
    payload = b"".join(parts)
    fields = _FIELDS.pack(FRAME_VERSION, len(payload), zlib.crc32(payload), seq)
    return b"".join([_CRC.pack(zlib.crc32(fields)), fields, payload])


def _decode_entries(payload: bytes) -> list[Entry] | str:
    """The entries of a frame's payload (its CRC matched), or what is wrong with it."""
    if len(payload) < _COUNT.size:
        return "payload shorter than its entry count"
    (count,) = _COUNT.unpack_from(payload)
    pos = _COUNT.size
    entries = []
    for _ in range(count):
        if pos + _NAME.size > len(payload):
            return "entry past the end of the payload"
        (length,) = _NAME.unpack_from(payload, pos)
        pos += _NAME.size
        name = payload[pos : pos + length]
        pos += length
        if pos + _PLACE.size > len(payload):
            return "entry past the end of the payload"
        segment, offset, size = _PLACE.unpack_from(payload, pos)
        pos += _PLACE.size
        if pos + size > len(payload):
            return "entry data past the end of the payload"
        try:
            log = name.decode()
        except UnicodeDecodeError:
            return "log name is not UTF-8"
        if not log or log.startswith("/") or ".." in Path(log).parts:
            return f"log name {log!r} is not a directory of the data directory"
        entries.append(Entry(log, segment, offset, payload[pos : pos + size]))
        pos += size
    if pos != len(payload):
        return "bytes after the last entry"
    return entries


@attrs.frozen
class Frames:
    """What :func:`read_frames` found: the valid frames in order, and the warnings.

    ``damaged``: with ``repair``, the segment where damage stopped the
    reading, and the offset of the damage (that segment and every later one
    are to be moved aside, not deleted).
    """

    frames: list[list[Entry]]
    warnings: list[str]
    damaged: tuple[Path, int] | None = None


def list_commit_segments(data_dir: Path) -> list[tuple[int, Path]]:
    """The commit log's segments as ``(number, path)``, oldest first."""
    directory = data_dir / COMMIT_DIR
    if not directory.is_dir():
        return []
    return list_segments(directory, _SEGMENT_RE)


def _frame_at(data: bytes, pos: int, damaged: int, seq: int) -> int | None:
    """The version of the whole frame at ``pos``, if it can follow the damaged frame ``seq``.

    Whole: its header and payload CRCs hold and it ends within ``data``. Its
    number must be later than ``seq``, by no more frames than fit between
    (a damage may span several frames: a lost sector holds many small ones).
    """
    if pos <= damaged or pos + _HEADER.size > len(data):
        return None
    crc, version, length, payload_crc, number = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if (
        version >= FRAME_VERSION
        and seq < number
        and (number - seq) * _HEADER.size <= pos - damaged  # any version's frame has one
        and end <= len(data)
        and zlib.crc32(data[pos + 4 : pos + _HEADER.size]) == crc
        and zlib.crc32(data[pos + _HEADER.size : end]) == payload_crc
    ):
        return int(version)
    return None


def _nonzero_end(data: bytes) -> int:
    """``len(data)`` less the zero bytes it ends with (no frame's header lies among them)."""
    end = len(data)
    while end >= len(_ZEROS) and data[end - len(_ZEROS) : end] == _ZEROS:
        end -= len(_ZEROS)
    last = data[max(0, end - len(_ZEROS)) : end]
    return end - (len(last) - len(last.rstrip(b"\0")))


def _frame_after(data: bytes, damaged: int, seq: int) -> tuple[int, int] | None:
    """``(offset, version)`` of the first whole frame after frame ``seq``, damaged at ``damaged``.

    None: nothing after it is a frame, so it is the segment's torn last one.
    Candidates are the offsets holding this build's version byte (any later
    frame number), and those holding one of the next ``FOLLOW_SPAN`` frame
    numbers (any version: a newer build's frame is found too), each checked
    by :func:`_frame_at`. Bytes of the damaged frame's payload (a stored
    value may hold anything) pass for a whole frame, both CRCs holding, only
    if put there on purpose. The trailing zeros of the segment are skipped.
    The search costs a CRC of a header or less per candidate and
    ``FOLLOW_SPAN`` passes of ``bytes.find``: a damage path, run once.
    """
    limit = _nonzero_end(data)
    found = []
    version = bytes([FRAME_VERSION])
    at = data.find(version, damaged + 5, limit)
    while at >= 0:
        got = _frame_at(data, at - 4, damaged, seq)
        if got is not None:
            found.append((at - 4, got))
            break
        at = data.find(version, at + 1, limit)
    stop = min(len(data), limit + _HEADER.size - 4)  # a header's version byte is before limit
    for number in range(seq + 1, seq + 1 + FOLLOW_SPAN):
        needle = _COUNT.pack(number)
        at = data.find(needle, damaged + _HEADER.size - 4, stop)
        while at >= 0:
            got = _frame_at(data, at - (_HEADER.size - 4), damaged, seq)
            if got is not None:
                found.append((at - (_HEADER.size - 4), got))
                break
            at = data.find(needle, at + 1, stop)
    return min(found, default=None)


def _newer_frame(data: bytes, pos: int) -> tuple[int, int] | None:
    """``(offset, version)`` of a frame of a newer version among the frames from ``pos`` on.

    The frames are walked by their headers' lengths, up to the first header
    whose CRC fails (nothing after it is known to be a frame).
    """
    while pos + _HEADER.size <= len(data):
        crc, version, length, _, _ = _HEADER.unpack_from(data, pos)
        if zlib.crc32(data[pos + 4 : pos + _HEADER.size]) != crc:
            return None
        if version > FRAME_VERSION:
            return pos, int(version)
        pos += _HEADER.size + length
    return None


def _refuse_newer(path: Path, data: bytes, resume: int | None, later: list[Path]) -> None:
    """Raise :class:`NewerVersion` for a frame of a newer version after damage in ``path``.

    ``resume``: where the frames after the damage start, if known; ``later``:
    the later segments. Damage does not make a newer build's frames damage:
    they are refused, with or without repair, and none is moved aside.
    """
    places = [(path, data, resume)] + [(p, p.read_bytes(), 0) for p in later]
    for where, contents, start in places:
        if start is not None and (newer := _newer_frame(contents, start)) is not None:
            offset, version = newer
            raise NewerVersion(where, version, FRAME_VERSION, offset=offset, kind="commit frame")


def read_frames(data_dir: Path, *, repair: bool = False) -> Frames:
    """Every valid frame of the commit log, oldest first (see the module docstring).

    Raises:
        CorruptLog: damage before the tail, without ``repair``.
        NewerVersion: a frame of a newer version (with ``repair`` too).
        OSError: a segment cannot be read.
    """
    segments = list_commit_segments(data_dir)
    frames: list[list[Entry]] = []
    warnings: list[str] = []
    for index, (_, path) in enumerate(segments):
        data = path.read_bytes()
        pos = 0
        seq = 0  # the number the next frame of this segment must carry
        while pos < len(data):
            problem = None
            end = len(data)
            if pos + _HEADER.size > len(data):
                problem = "frame header cut short"
            else:
                crc, version, length, payload_crc, number = _HEADER.unpack_from(data, pos)
                if zlib.crc32(data[pos + 4 : pos + _HEADER.size]) != crc:
                    problem = "header CRC mismatch"
                    end = len(data) + 1  # torn only if nothing but zeros follows
                elif version > FRAME_VERSION:  # a valid header: not damage, not torn
                    raise NewerVersion(
                        path, version, FRAME_VERSION, offset=pos, kind="commit frame"
                    )
                elif version != FRAME_VERSION:
                    problem = f"unknown frame version {version}"
                    end = len(data) + 1
                elif number != seq:
                    problem = f"frame number {number} where {seq} was due"
                    end = pos  # a valid frame out of place: damage, never torn
                else:
                    end = pos + _HEADER.size + length
                    if end > len(data):
                        problem = "frame cut short"
                    elif zlib.crc32(data[pos + _HEADER.size : end]) != payload_crc:
                        problem = "payload CRC mismatch"
            if problem is None:
                entries = _decode_entries(data[pos + _HEADER.size : end])
                if isinstance(entries, str):
                    problem = entries  # a valid CRC over an invalid layout: not torn
                    end = pos  # (whatever follows: this frame is not zeros)
                else:
                    frames.append(entries)
                    pos = end
                    seq += 1
                    continue
            resume: int | None = None  # where the frames after the damage start, if known
            if problem in ("frame header cut short", "frame cut short"):
                torn = True
            elif end <= len(data):  # a valid header: torn if only zeros follow the frame
                torn = not data[end:].strip(b"\0")
                resume = pos  # its header is valid: the walk starts with it
            else:
                # A damaged header: a crash tears the last frame only, so it
                # is torn unless a whole frame follows it somewhere (its
                # number later than this one's; a newer build's is refused).
                after = _frame_after(data, pos, seq)
                torn = after is None
                if after is not None:
                    resume = after[0]
            if not torn:
                _refuse_newer(path, data, resume, [p for _, p in segments[index + 1 :]])
            if torn:
                warnings.append(
                    f"{path}: ignored a torn commit frame at offset {pos} ({problem}); "
                    "it was never acknowledged"
                )
                break
            if not repair:
                raise CorruptLog(path, pos, problem)
            warnings.append(
                f"{path}: corrupt commit frame at offset {pos} ({problem}); "
                "repair moves it and every later commit segment aside"
            )
            return Frames(frames, warnings, (path, pos))
    return Frames(frames, warnings)


@attrs.frozen
class Redone:
    """What :func:`redo` did, for the shards' recovery and for :func:`drop`.

    ``acked``: for every shard log segment the commit log names, where its
    acknowledged bytes end as far as the commit log knows (the end of its
    last payload, or the size a checkpoint synced): damage at or past it
    is a torn tail (see ``recovery.recover``). ``damaged``: as in
    :class:`Frames`.
    """

    warnings: list[str]
    acked: dict[Path, int]
    damaged: tuple[Path, int] | None = None

    def acked_in(self, directory: Path) -> dict[int, int]:
        """``acked`` of the segments in ``directory``, by segment number."""
        found = {}
        for path, end in self.acked.items():
            if path.parent == directory:
                match = _WAL_RE.fullmatch(path.name)
                if match is not None:
                    found[int(match.group(1))] = end
        return found


def redo(data_dir: Path, *, repair: bool = False) -> Redone:
    """Put every batch of the commit log back in its shard log segment.

    Blocking: run it before any shard recovers, and :func:`drop` once they
    have. Each entry's bytes are written at their place in their segment,
    even where the segment holds them already (after a write-back error the
    page cache may hold bytes the disk lost, and only a new write makes the
    next ``fsync`` write them); every segment named is then synced. A second
    crash meanwhile redoes it all again.

    Raises:
        CorruptLog, NewerVersion: see :func:`read_frames` (nothing is written then).
        OSError: a segment could not be read, written or synced (the commit
            log is kept, for the next start).
    """
    scan = read_frames(data_dir, repair=repair)
    warnings = list(scan.warnings)
    fds: dict[Path, int] = {}
    mended: dict[Path, int] = {}  # path -> bytes found different, rewritten
    acked: dict[Path, int] = {}
    try:
        for frame in scan.frames:
            for entry in frame:
                path = data_dir / entry.log / segment_name(entry.segment)
                # Known even for a file gone: later segments are then newer
                # than every one named (see recovery.recover's ``acked``).
                acked[path] = max(acked.get(path, 0), entry.offset + len(entry.data))
                fd = fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # deleted on purpose: covered by a snapshot, or settled
                    fds[path] = fd
                if not entry.data:
                    continue  # a checkpoint's marker: synced up to offset
                held = os.pread(fd, len(entry.data), entry.offset)
                view = memoryview(entry.data)
                at = entry.offset
                while view:
                    written = os.pwrite(fd, view, at)
                    view, at = view[written:], at + written
                if held != entry.data:
                    mended[path] = mended.get(path, 0) + len(entry.data)
        for path, fd in fds.items():
            try:
                os.fsync(fd)
            except OSError as exc:
                raise named(exc, path) from exc
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    for path, size in mended.items():
        warnings.append(f"{path}: rewrote {size} acknowledged bytes from the commit log")
    return Redone(warnings, acked, scan.damaged)


def drop(data_dir: Path, redone: Redone) -> list[str]:
    """Delete the commit log that :func:`redo` redid, once the shards have recovered.

    After a repair, the damaged segment and every later one are moved aside
    instead. If they cannot be (a read-only directory), they stay, for the
    commit log's first checkpoint to delete. Returns the warnings.
    """
    warnings = []
    try:
        segments = list_commit_segments(data_dir)
        suffix = None  # once set, this and every later segment go aside
        for _, path in segments:
            if redone.damaged is not None and path == redone.damaged[0]:
                suffix = f".corrupt-{redone.damaged[1]}"
            if suffix is not None:
                target = path.with_name(path.name + suffix)
                path.rename(target)
                warnings.append(f"{path}: moved aside to {target.name}")
            else:
                path.unlink()
        if segments:
            fsync_directory(data_dir / COMMIT_DIR)
    except OSError as exc:
        warnings.append(f"could not delete the redone commit log: {exc}")
    return warnings


def _fsync_path(path: Path) -> int | None:
    """``fsync`` the file at ``path``; its size before (what is durable now), or None.

    Any descriptor of a file flushes its pages. A missing file (None) is no
    error: it was deleted on purpose (see the module docstring).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        os.fsync(fd)
    except OSError as exc:
        raise named(exc, path) from exc
    finally:
        os.close(fd)
    return size


class CommitLog:
    """The store's commit log, for its sync rounds (see the module docstring).

    Opening it creates ``commit/`` under ``data_dir`` if needed and a new
    segment numbered after those there (recovery's :func:`redo` has removed
    the old ones; any it could not are removed by the first checkpoint).

    Args:
        data_dir: the store's data directory.
        checkpoint_bytes: segment size past which a round checkpoints.

    Raises:
        ValueError: ``checkpoint_bytes`` < 1.
        OSError: the directory or the segment cannot be created.

    Invariants: every frame in the current segment was appended whole and
    synced, or the segment is failed (``_failed``: the next commit starts a
    new one, so a torn frame is always a segment's last); ``_touched`` holds
    every shard log segment named by a frame on disk that no checkpoint has
    synced since.
    """

    def __init__(self, data_dir: Path, *, checkpoint_bytes: int = CHECKPOINT_BYTES) -> None:
        if checkpoint_bytes < 1:
            raise ValueError(f"checkpoint_bytes must be >= 1, got {checkpoint_bytes}")
        self.data_dir = data_dir
        self.directory = data_dir / COMMIT_DIR
        self._checkpoint_bytes = checkpoint_bytes
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(data_dir)
        numbers = [n for n, _ in list_commit_segments(data_dir)]
        self._number = max(numbers, default=0)
        self._fd = -1
        self._size = 0
        self._failed = False
        self._next_checkpoint = checkpoint_bytes
        self._touched: set[tuple[str, int]] = set()  # (log, segment)
        # Shard log segments a checkpoint failed to sync: their bytes are in
        # doubt (fsyncgate: a retry may succeed without writing them), so the
        # commit segments are kept until each such file is gone (a snapshot
        # covered it). (log, segment) -> the error.
        self._poisoned: dict[tuple[str, int], OSError] = {}
        self._failures: dict[str, OSError] = {}  # log -> error not yet taken by its shard
        self._names: dict[Path, str | None] = {}
        # (log, segment) -> where its bytes are known acknowledged (a frame's
        # end, or a checkpoint's sync), for the markers (see checkpoint).
        self._acked: dict[tuple[str, int], int] = {}
        self._logs: dict[str, SegmentedLog] = {}  # see watch
        self._failed_own: set[tuple[str, int]] = set()  # of logs replaced since
        self._seq = 0
        self._start_segment()
        self.frames = 0  # frames committed (for tests and benchmarks)
        self.checkpoints = 0  # checkpoints completed

    def _start_segment(self) -> None:
        number = self._number + 1
        path = self.directory / f"commit-{number:08d}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._number, self._size, self._failed = fd, number, 0, False
        self._seq = 0  # the number of the segment's next frame
        self._next_checkpoint = self._checkpoint_bytes

    def name_of(self, directory: Path) -> str | None:
        """How a frame names the log in ``directory`` (None: not under the data directory)."""
        try:
            return self._names[directory]
        except KeyError:
            pass
        name = None
        if directory.is_relative_to(self.data_dir) and directory != self.data_dir:
            name = directory.relative_to(self.data_dir).as_posix()
        self._names[directory] = name
        return name

    @property
    def path(self) -> Path:
        """The current segment."""
        return self.directory / f"commit-{self._number:08d}.log"

    def commit(self, entries: Sequence[Entry]) -> None:
        """Append ``entries`` as one frame (or several, each synced) and sync: durable on return.

        A round whose entries pass ``MAX_FRAME_BYTES`` is split over frames,
        each appended and synced before the next, so that a torn frame is
        always a segment's last. Then checkpoints if the segment is large
        enough; a failed checkpoint does not fail the commit (it is retried
        later).

        Raises:
            ValueError: the log is closed.
            CommitLogError: an append or a sync failed (the segment is
                failed: the next commit starts a new one); frames of the
                round synced before it may be redone at recovery (their
                bytes are in their shard logs all the same).
            OSError: a new segment could not be started.
        """
        if self._fd < 0:
            raise ValueError("I/O operation on a closed commit log")
        if self._failed:
            self._start_segment()
        groups: list[list[Entry]] = [[]]
        size = 0
        for entry in entries:
            if groups[-1] and size + len(entry.data) > MAX_FRAME_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += len(entry.data)
        for group in groups:
            self._append(encode_frame(group, self._seq))
        for entry in entries:
            key = (entry.log, entry.segment)
            self._acked[key] = max(self._acked.get(key, 0), entry.offset + len(entry.data))
        self._touched.update([(entry.log, entry.segment) for entry in entries])
        if self._size >= self._next_checkpoint:
            try:
                self.checkpoint()
            except OSError:
                # Kept, and retried after another quarter: the commits are
                # durable all the same (their frames are).
                self._next_checkpoint = self._size + max(1, self._checkpoint_bytes // 4)

    def _append(self, frame: bytes) -> None:
        """Append one encoded frame and sync it (see :meth:`commit` for the errors)."""
        before = self._size
        try:
            write_all(self._fd, frame)
            self._size = before + len(frame)
            os.fsync(self._fd)
        except OSError as exc:
            # A torn or unsynced frame: nothing goes after it in this segment.
            self._failed = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, before)
            failure = named(exc, self.path)
            raise CommitLogError(failure.errno, failure.strerror, failure.filename) from exc
        self._seq += 1
        self.frames += 1

    def checkpoint(self) -> None:
        """Sync every shard log segment named so far, then delete the older segments.

        A segment whose sync fails is *poisoned*: after a write-back error a
        later ``fsync`` may succeed without writing the lost pages, so it is
        never retried. Its log's shard is told (:meth:`take_failure`: it owes
        a re-save), and the older commit segments, which hold its bytes, are
        kept until its file is gone (the re-save's snapshot removes it).
        Before the older segments go, a *marker* frame in the new one records
        how far each live segment is known durable (entries without data), so
        that recovery still tells an unacknowledged torn tail from damage
        (see :class:`Redone`).

        Raises:
            OSError: a segment could not be synced, or a poisoned one is
                still there, or the markers could not be written, or the older
                segments could not be deleted (they are kept).
        """
        self._start_segment()
        # Segments whose own sync failed (a snapshot's, SyncNow's): the shard
        # owes a re-save already; its frames stay until that is written.
        own = set(self._failed_own)
        own.update((name, n) for name, log in self._logs.items() for n in log.failed_segments())
        self._failed_own = own
        for key in own:
            self._poisoned.setdefault(key, OSError(errno.EIO, "an earlier sync failed"))
        touched, self._touched = self._touched, set()
        for name, segment in sorted(touched - set(self._poisoned)):
            try:
                synced = _fsync_path(self.data_dir / name / segment_name(segment))
            except OSError as exc:
                self._poisoned[(name, segment)] = exc
                self._failures.setdefault(name, exc)
            else:
                if synced is not None:
                    key = (name, segment)
                    self._acked[key] = max(self._acked.get(key, 0), synced)
        for key in list(self._acked):
            if not (self.data_dir / key[0] / segment_name(key[1])).exists():
                del self._acked[key]  # covered by a snapshot, or settled
                self._poisoned.pop(key, None)
        for name, segment in list(self._poisoned):
            if not (self.data_dir / name / segment_name(segment)).exists():
                del self._poisoned[(name, segment)]
                self._failed_own.discard((name, segment))
        if self._poisoned:
            raise next(iter(self._poisoned.values()))
        if self._acked:
            markers = [
                Entry(name, seg, end, b"") for (name, seg), end in sorted(self._acked.items())
            ]
            self._append(encode_frame(markers, self._seq))
        for number, path in list_commit_segments(self.data_dir):
            if number < self._number:
                path.unlink()
        fsync_directory(self.directory)
        self.checkpoints += 1

    def watch(self, name: str, log: SegmentedLog) -> None:
        """Know ``log`` as the log ``name``, whose segments' own failed syncs a checkpoint heeds.

        A log replaced under the same name (a shard rebuilt) hands its
        failed segments over.
        """
        old = self._logs.get(name)
        if old is log:
            return
        if old is not None:
            self._failed_own.update((name, n) for n in old.failed_segments())
        self._logs[name] = log

    def take_failure(self, directory: Path) -> OSError | None:
        """The checkpoint error of the log in ``directory`` not yet taken, if any (taken now)."""
        name = self.name_of(directory)
        return None if name is None else self._failures.pop(name, None)

    def size(self) -> int:
        """Bytes in the current segment."""
        return self._size

    def close(self) -> None:
        """Close the segment, without a checkpoint (the next start's redo finds it). Idempotent."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
