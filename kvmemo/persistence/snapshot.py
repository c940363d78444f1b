"""Snapshots of one shard: every entry at one moment, in one file (synchronous, no trio).

Design. A snapshot is written whole to a temporary file in the shard's
directory, synced, renamed over its final name (atomic on POSIX), and the
directory is synced, so that after a crash there is either the complete new
snapshot or none, never a partial one under the final name. Its name says
which log segments it *covers*: ``snap-00000007.kvs`` holds the effect of
every record of segments 1..7, so recovery loads it and replays only
segments 8 and later. Once it is durable, older snapshots are deleted; the
caller then deletes the covered segments
(:meth:`~.wal.SegmentedLog.remove_through`).

Layout, little-endian::

    offset  size  field
    0       8     magic b"KVMSNAP\\0"
    8       1     snapshot format version (SNAPSHOT_VERSION)
    9       3     zero
    12      8     covers: the highest log segment number it covers
    20      8     entry count
    28      4     CRC32 of bytes 0..27
    32      ...   one SET record per entry (:mod:`.records`), each with its CRC

The entry count is written last (the header is rewritten in place before the
sync), so a snapshot truncated or extended anywhere fails validation even at
a record boundary.

Every later snapshot format version keeps the magic, the version byte at
offset 8 and the CRC at offset 28 of bytes 0..27, so a snapshot of a newer
version is told from a damaged one (its header CRC holds) and refused with
:class:`~.records.NewerVersion`, never skipped, repaired or moved aside; so
is a snapshot holding a record of a newer format version (see :mod:`.records`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

from .records import (
    Corrupt,
    Newer,
    NewerVersion,
    Op,
    PersistenceError,
    Scanner,
    Torn,
    encode_fields,
    replay,
)

SNAPSHOT_MAGIC = b"KVMSNAP\x00"
SNAPSHOT_VERSION = 1
_HEADER = struct.Struct("<8sB3xQQ")  # magic, version, covers, count
_CRC = struct.Struct("<I")
SNAPSHOT_HEADER_SIZE = _HEADER.size + _CRC.size  # 32 bytes
WRITE_CHUNK = 1 << 20  # bytes of encoded entries buffered per os.write
GIL_YIELD_MASK = (1 << 8) - 1  # the writer yields the GIL every 256 entries (~0.2 ms of work)
TEMP_SUFFIX = ".tmp"  # a snapshot being written: ``snap-00000007.kvs.tmp``
_NAME_RE = re.compile(r"snap-(\d{8,})\.kvs")


class CorruptSnapshot(PersistenceError):
    """A snapshot file fails validation at ``offset``.

    Attributes:
        path: the snapshot file.
        offset: the byte offset of the damage (0 for the header).
        reason: what is wrong there.
    """

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt snapshot at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


def snapshot_name(covers: int) -> str:
    """The file name of the snapshot covering segments up to ``covers``."""
    return f"snap-{covers:08d}.kvs"


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """The snapshots of ``directory`` as ``(covers, path)``, oldest first (unvalidated)."""
    found = []
    for path in directory.iterdir():
        match = _NAME_RE.fullmatch(path.name)
        if match is not None:
            found.append((int(match.group(1)), path))
    found.sort()
    return found


# The two file helpers below are also in wal.py, which imports this module
# (for the snapshot names), so this one cannot import them from there.


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(covers: int, count: int) -> bytes:
    head = _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, covers, count)
    return head + _CRC.pack(zlib.crc32(head))


def write_snapshot(
    directory: Path, entries: Iterable[tuple[bytes, bytes, int | None]], *, covers: int
) -> Path:
    """Write a snapshot of ``entries`` covering log segments up to ``covers``.

    ``entries`` must not change while they are iterated (pass a copy taken
    at the moment of the rotation the snapshot covers). Blocking: run it in a
    worker thread.

    Args:
        directory: the shard's data directory.
        entries: ``(key, value, expires_ms)`` of every entry
            (``expires_ms``: absolute Unix ms, or None).
        covers: the number of the last log segment whose effects
            ``entries`` include (0: none).

    Returns:
        The path of the new snapshot, durable when this returns.

    Raises:
        ValueError: ``covers`` < 0 or older than the newest snapshot's, or an
            entry is invalid (nothing changed).
        OSError: writing failed (disk full, permission denied, ...): the
            temporary file is removed and every existing file is intact.
    """
    if covers < 0:
        raise ValueError(f"covers must be >= 0, got {covers}")
    existing = list_snapshots(directory)
    if existing and existing[-1][0] > covers:
        newest = existing[-1][0]
        raise ValueError(f"covers must be >= {newest} (the newest snapshot's), got {covers}")
    final = directory / snapshot_name(covers)
    temp = directory / (final.name + TEMP_SUFFIX)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, bytes(SNAPSHOT_HEADER_SIZE))
            count = 0
            chunk: list[bytes] = []
            buffered = 0
            for key, value, expires_ms in entries:
                record = encode_fields(Op.SET, key, value, expires_ms)
                chunk.append(record)
                buffered += len(record)
                count += 1
                if not count & GIL_YIELD_MASK:
                    # Hand the GIL over now and then: this thread encodes in
                    # Python, and the event loop (serving every shard) would
                    # otherwise get it back only every switch interval (5 ms).
                    time.sleep(0)
                if buffered >= WRITE_CHUNK:
                    _write_all(fd, b"".join(chunk))
                    chunk.clear()
                    buffered = 0
            _write_all(fd, b"".join(chunk))
            header = _header(covers, count)
            if os.pwrite(fd, header, 0) != len(header):
                raise OSError(f"short write of the snapshot header to {temp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(temp)) from exc
        raise
    _fsync_directory(directory)
    for old_covers, path in existing:
        if old_covers < covers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return final


def _check_header(path: Path, data: bytes | mmap.mmap) -> int:
    """Validate the header of snapshot ``path``; return its entry count.

    Raises:
        CorruptSnapshot: the header is damaged.
        NewerVersion: a newer snapshot format version wrote it (its CRC holds).
    """
    if len(data) < SNAPSHOT_HEADER_SIZE:
        raise CorruptSnapshot(
            path, 0, f"{len(data)} bytes, shorter than the {SNAPSHOT_HEADER_SIZE}-byte header"
        )
    magic, version, covers, count = _HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise CorruptSnapshot(path, 0, f"bad magic {magic!r}")
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    if zlib.crc32(data[: _HEADER.size]) != crc:
        raise CorruptSnapshot(path, 0, "header CRC mismatch")
    if version > SNAPSHOT_VERSION:
        raise NewerVersion(path, version, SNAPSHOT_VERSION, kind="snapshot")
    if version != SNAPSHOT_VERSION:
        raise CorruptSnapshot(path, 0, f"unknown snapshot format version {version}")
    match = _NAME_RE.fullmatch(path.name)
    if match is not None and int(match.group(1)) != covers:
        raise CorruptSnapshot(path, 0, f"header says it covers segment {covers}")
    assert isinstance(count, int)
    return count


def _raise_problem(path: Path, problem: Torn | Corrupt | None) -> None:
    """Raise for the problem a scan of snapshot ``path`` ended with, if any."""
    if isinstance(problem, Newer):
        raise problem.error(path)
    if isinstance(problem, Torn):
        raise CorruptSnapshot(path, problem.offset, "truncated inside a record")
    if isinstance(problem, Corrupt):
        raise CorruptSnapshot(path, problem.offset, problem.reason)


def _too_few(path: Path, seen: int, count: int, end: int) -> CorruptSnapshot:
    return CorruptSnapshot(
        path, end, f"the file ends after {seen} entries, the header says {count}"
    )


def _too_many(path: Path, count: int, offset: int) -> CorruptSnapshot:
    return CorruptSnapshot(path, offset, f"more entries than the {count} the header says")


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The contents of ``path``, memory-mapped read-only (``b""`` if empty)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def load_snapshot(path: Path) -> Generator[tuple[bytes, bytes, int | None], None, None]:
    """The entries of snapshot ``path``, as ``(key, value, expires_ms)``.

    Entries are yielded as they are read: the snapshot is valid only if the
    iteration ends without :class:`CorruptSnapshot`; the entries yielded
    before it are the intact ones before the damage.

    Raises:
        CorruptSnapshot: the file fails validation (names the file and offset).
        NewerVersion: a newer format version wrote it (not damage).
        OSError: the file cannot be read.
    """
    with _mapped(path) as data:
        count = _check_header(path, data)
        scanner = Scanner(data, SNAPSHOT_HEADER_SIZE)
        seen = 0
        start = SNAPSHOT_HEADER_SIZE  # of the record being looked at
        with contextlib.closing(iter(scanner)) as fields:
            for op, key, value, expires_ms in fields:
                if op != Op.SET:
                    reason = f"a {Op(op).name} record where only SET records may be"
                    raise CorruptSnapshot(path, start, reason)
                if seen == count:
                    raise _too_many(path, count, start)
                seen += 1
                start = scanner.end
                yield key, value, expires_ms
    _raise_problem(path, scanner.problem)
    if seen < count:
        raise _too_few(path, seen, count, scanner.end)


def load_snapshot_into(path: Path, data: dict[bytes, bytes], expires: dict[bytes, int]) -> int:
    """Load snapshot ``path`` into a shard's ``data`` and ``expires`` (recovery's fast path).

    Returns:
        The number of entries loaded.

    Raises:
        CorruptSnapshot: as :func:`load_snapshot`; the entries before the
            damage are loaded.
        NewerVersion: as :func:`load_snapshot`.
        OSError: the file cannot be read.
    """
    with _mapped(path) as buf:
        count = _check_header(path, buf)
        result = replay(buf, data, expires, start=SNAPSHOT_HEADER_SIZE, sets_only=True)
        if result.count > count:  # find where the extra entries begin (a rare path)
            scanner = Scanner(buf, SNAPSHOT_HEADER_SIZE)
            with contextlib.closing(iter(scanner)) as fields:
                for _ in zip(range(count), fields, strict=False):
                    pass
            raise _too_many(path, count, scanner.end)
    _raise_problem(path, result.problem)
    if result.count < count:
        raise _too_few(path, result.count, count, result.end)
    return result.count


def newest_snapshot(directory: Path) -> tuple[Path, int] | None:
    """The newest snapshot of ``directory`` that passes validation, as ``(path, covers)``.

    Validating means reading each candidate whole (newest first).

    Raises:
        NewerVersion: a newer format version wrote the one to choose.
        OSError: a snapshot cannot be read.
    """
    for covers, path in reversed(list_snapshots(directory)):
        try:
            for _ in load_snapshot(path):
                pass
        except CorruptSnapshot:
            continue
        return path, covers
    return None
