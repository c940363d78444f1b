"""Recovery of one shard at start: its newest valid snapshot, then its log.

Design. The state of a shard is its newest valid snapshot plus every record
of the log segments that snapshot does not cover, replayed in order
(segment number, then offset). Records are absolute effects (see
:mod:`.records`), so replay needs no clock; expiry is applied once at the end
(``now_ms``), because a later record may still change the expiry of a key an
earlier one made expired-looking.

What recovery does about damage:

- A **torn tail** (a record cut short at the end of a segment: a crash during
  an append; the record was never acknowledged) is truncated in place, with
  a warning. Recovery repairs this without being asked: it loses nothing.
  So is a tail of nothing but zero bytes: a power loss after the file's
  size reached the disk and before its data did (acknowledged bytes are
  durable, in the segment or in the commit log, whose redo ran first); and,
  where the commit log tells how far a segment's acknowledged bytes go, any
  damage past that (an append whose pages were written back in part).
  After such a cut, a later segment's *head mark* (the newest round mark,
  repeated at the head of a segment when it starts) is trusted only if the
  round it names was marked in what was replayed: the power loss may have
  kept the head mark and lost the tail holding that round's part.
- A ``PATCH`` (an in-place edit, see :mod:`.records`) whose *base* is not
  the value replay gives its key (the record that gave the key the value
  it edits was lost, or a later one that changed it was) is skipped, with
  a warning, and so is every later ``PATCH`` of its key until the key is
  written whole (see :class:`~.records.Chains`): applied, it would make a
  value the key never held. This needs no damage to see: a power loss that
  cleanly lost the tail of a segment other than the last (``everysec``),
  or a batch the log dropped, shows only here. What the skipped edits
  changed was then in the same lost second (``everysec``) or after a loss.
- A **corrupt record** (CRC mismatch, garbage, impossible lengths) stops the
  start with :class:`CorruptLog`, naming the file and offset, unless
  ``repair`` is given: then the records before the damage are kept, the rest
  of that segment is moved aside to ``<segment>.corrupt-<offset>`` (nothing
  is ever deleted), and the later segments are replayed. Keeping later
  segments is sound because every record but a ``PATCH`` is self-contained:
  a ``SET`` carries the full value and absolute expiry, so no later record
  depends on a lost one; a later ``PATCH`` whose base was lost is skipped,
  as above (and so after a missing segment, or the lost entries of a
  damaged snapshot). The state is then the true
  state minus the lost records' effects (a lost ``DEL`` lets an old value
  reappear; an ``EXPIRE`` of a key whose ``SET`` was lost does nothing).
  Records after the damage *in the same segment* are not searched for:
  once a length is damaged there is no trustworthy record boundary, and a
  value may contain bytes that look like records; they stay in the
  ``.corrupt`` file for an operator.
- A **damaged snapshot** is skipped for an older valid one (or none) when the
  log segments that one needs are all still there: nothing is lost, so a
  warning says so and no repair is needed. Otherwise it stops the start with
  :class:`~.snapshot.CorruptSnapshot`, unless ``repair``: then its entries
  before the damage are loaded and the file is moved aside.
- A **missing segment** (a gap in the numbers after the snapshot) stops the
  start with :class:`CorruptLog`, unless ``repair``: then the segments
  present are replayed.

After a repair that lost a snapshot's or a missing segment's part, and
after skipping a ``PATCH``, recovery writes a fresh snapshot of what it
recovered, covering every segment, and deletes those segments, so that the
next start needs no repair and applies no ``PATCH`` skipped. No segment is
truncated first (a start cut off before the snapshot is written must find
the same loss again), and the newest round mark goes first to a segment of
its own (a start cut off after it must not redo the rounds the deleted
segments marked).

A **newer format version** (a snapshot, or a whole record whose CRC holds,
anywhere in a segment: see :mod:`.records`) is not damage: it stops the
start with :class:`~.records.NewerVersion`, with or without ``repair``, and
the file is neither truncated nor moved aside (an older build started on a
newer one's data must not throw any of it away).

Changes last. :func:`recover` can leave the changes it makes to files (a
truncation, a repair, a temporary file removed) to its caller
(``changes``), to be made once every file the start reads has been read: a
store's start reads every shard and then the intent log, and a newer
version (or damage without ``repair``) found in any of them must stop it
before any file is changed. A repair's snapshot replaces a shard's segments
and with them its round marks (:mod:`.intents`): made at a start that then
stops, the next start would redo the rounds still in the intent log over
that shard's later writes.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from .records import (
    Chains,
    Corrupt,
    Newer,
    Op,
    PersistenceError,
    Scanner,
    Torn,
    encode_txn,
    replay,
    txid_of,
)
from .snapshot import (
    TEMP_SUFFIX,
    CorruptSnapshot,
    list_snapshots,
    load_snapshot_into,
    snapshot_name,
    write_snapshot,
)
from .wal import fsync_directory, list_segments, segment_name, write_all

Changes = list[Callable[[], None]]
"""File changes :func:`recover` found to make, in order (see "Changes last" above)."""


class CorruptLog(PersistenceError):
    """A log segment is damaged at ``offset`` (or missing, at offset 0).

    Attributes:
        path: the segment file.
        offset: the byte offset of the first damaged record.
        reason: what is wrong there.
    """

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(
            f"{path}: corrupt write-ahead log at offset {offset}: {reason} "
            "(start with --repair, or open_store(repair=True), to keep the records before it"
            " and move the rest aside)"
        )
        self.path = path
        self.offset = offset
        self.reason = reason


@attrs.frozen
class Recovered:
    """The state of one shard rebuilt from disk.

    Attributes:
        data: key -> value of every live key.
        expires: key -> absolute expiry (Unix ms) of the live keys that have one.
        warnings: what recovery found and did, one sentence each, for the log.
        last_segment: the highest segment number in use (by a segment or a
            snapshot); a new :class:`~.wal.SegmentedLog` starts after it.
        records_replayed: log records applied.
        snapshot_entries: entries loaded from the snapshot.
        expired_dropped: keys not loaded because they expired at ``now_ms``.
        snapshot: the snapshot loaded, or None.
        marks: the ``TXN`` marks of the log replayed: txid -> committed
            (multi-shard rounds this shard resolved, see :mod:`.intents`).
        last_txid: the newest txid marked (0 if none).

    Invariants: every key of ``expires`` is in ``data``, and its expiry is
    after ``now_ms``.
    """

    data: dict[bytes, bytes]
    expires: dict[bytes, int]
    warnings: list[str]
    last_segment: int
    records_replayed: int
    snapshot_entries: int
    expired_dropped: int
    snapshot: Path | None
    marks: dict[int, bool] = attrs.field(factory=dict)
    last_txid: int = 0


@attrs.define
class _Base:
    """The snapshot recovery starts from (covers 0 and no path: none)."""

    covers: int
    path: Path | None
    data: dict[bytes, bytes]
    expires: dict[bytes, int]
    count: int


def _missing(present: set[int], first: int, last: int) -> list[int]:
    return [n for n in range(first, last + 1) if n not in present]


def _choose_base(
    directory: Path, present: set[int], repair: bool, warnings: list[str], changes: Changes
) -> tuple[_Base, bool]:
    """The snapshot to start from, and whether a repair lost part of one.

    Tries the snapshots newest first; an older one (or none) replaces a
    damaged newer one only if the segments between them are all present.
    """
    damaged: tuple[CorruptSnapshot, _Base] | None = None
    chosen = _Base(0, None, {}, {}, 0)
    for covers, path in reversed(list_snapshots(directory)):
        candidate = _Base(covers, path, {}, {}, 0)
        try:
            candidate.count = load_snapshot_into(path, candidate.data, candidate.expires)
        except CorruptSnapshot as exc:
            if damaged is None:
                damaged = (exc, candidate)
            warnings.append(str(exc))
            continue
        chosen = candidate
        break
    if damaged is None:
        return chosen, False
    error, partial = damaged
    gap = _missing(present, chosen.covers + 1, partial.covers)
    if not gap:
        source = chosen.path.name if chosen.path is not None else "no snapshot"
        warnings.append(f"recovering from {source} and the log instead: nothing is lost")
        return chosen, False
    if not repair:
        raise error
    assert partial.path is not None
    aside = partial.path.with_name(f"{partial.path.name}.corrupt-{error.offset}")
    changes.append(functools.partial(os.replace, partial.path, aside))
    partial.count = len(partial.data)
    warnings.append(
        f"repair: kept the {partial.count} entries of {partial.path.name} before offset "
        f"{error.offset} and moved the file to {aside.name}"
    )
    partial.path = None
    return partial, True


def _remove_temp_files(directory: Path, warnings: list[str], changes: Changes) -> None:
    for path in directory.iterdir():
        if path.name.startswith("snap-") and path.name.endswith(TEMP_SUFFIX):
            changes.append(functools.partial(path.unlink, missing_ok=True))
            warnings.append(f"removed {path.name}, a snapshot a crash left unfinished")


def _replay_segment(
    path: Path,
    data: dict[bytes, bytes],
    expires: dict[bytes, int],
    repair: bool,
    warnings: list[str],
    marks: dict[int, bool],
    changes: Changes,
    cuts: list[tuple[Path, int]],
    acked_end: int | None = None,
    after_cut: bool = False,
    chains: Chains | None = None,
) -> tuple[int, bool]:
    """Apply the records of segment ``path``; deal with a damaged tail.

    The truncation that cuts it off goes to ``cuts`` (see :func:`recover`:
    not made when a rebase deletes the segment), a repair's copy of the
    bytes moved aside to ``changes``. ``acked_end``: where the segment's
    acknowledged bytes end, if known (see :func:`recover`). ``after_cut``:
    an earlier segment lost its tail; a head mark (a ``TXN`` record opening
    the segment) of a round no replayed record marked is then not trusted
    (see the module docstring). ``chains``: the bases of the PATCHes
    to apply (see :class:`~.records.Chains`), from the segments before.

    Returns:
        The records applied, and whether the segment's tail was cut off.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return 0, False
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            start = _untrusted_head(buf, marks) if after_cut else 0
            if start:
                warnings.append(
                    f"{path}: ignored its head mark: the round it names was in an earlier "
                    "segment's tail, lost to a power loss"
                )
            result = replay(buf, data, expires, marks=marks, start=start, chains=chains)
            problem = result.problem
            # Nothing but zero bytes from the damage on: a power loss after the
            # file's size reached the disk and before its data did (an
            # append that was never acknowledged, or it would be durable).
            zeros = isinstance(problem, Corrupt) and not buf[problem.offset :].strip(b"\0")
            remainder = buf[result.end :] if isinstance(problem, Corrupt) and repair else b""
    if problem is None:
        return result.count, False
    if isinstance(problem, Newer):
        raise problem.error(path)  # before any truncation or repair: nothing is changed
    offset = problem.offset
    if isinstance(problem, Corrupt) and acked_end is not None and offset >= acked_end:
        cuts.append((path, offset))
        warnings.append(
            f"{path}: truncated {size - offset} bytes from offset {offset} ({problem.reason}): "
            f"past the last acknowledged byte ({acked_end}), left by a power loss"
        )
        return result.count, True
    if zeros:
        cuts.append((path, offset))
        warnings.append(
            f"{path}: truncated {size - offset} zero bytes at offset {offset} (the end of an "
            "append cut off by a power loss)"
        )
        return result.count, True
    if isinstance(problem, Torn):
        cuts.append((path, offset))
        warnings.append(
            f"{path}: truncated a torn record at offset {offset} ({size - offset} bytes, "
            "left by a crash during an append)"
        )
        return result.count, True
    if not repair:
        raise CorruptLog(path, offset, problem.reason)
    aside = path.with_name(f"{path.name}.corrupt-{offset}")
    changes.append(functools.partial(_write_aside, aside, remainder))
    cuts.append((path, offset))
    warnings.append(
        f"repair: {path}: {problem.reason} at offset {offset}; kept the {result.count} records "
        f"before it and moved the remaining {size - offset} bytes to {aside.name}"
    )
    return result.count, True


def _untrusted_head(buf: mmap.mmap, marks: dict[int, bool]) -> int:
    """The end of the segment's head mark if it names a round no replayed record marked; else 0."""
    scanner = Scanner(buf)
    for op, key, _, _ in scanner:
        if op == Op.TXN and txid_of(key) not in marks:
            return scanner.end
        break
    return 0


def _write_aside(aside: Path, remainder: bytes) -> None:
    """Copy the bytes a repair moves out of a segment (``remainder``) to file ``aside``.

    Before the segment is truncated (or deleted by a rebase), so that they are never lost.
    """
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(remainder)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _rebase(
    directory: Path,
    data: dict[bytes, bytes],
    expires: dict[bytes, int],
    last: int,
    segments: list[tuple[int, Path]],
    head: bytes,
) -> None:
    """Write a snapshot of the recovered state covering ``last``; delete the segments it covers.

    ``head``: the newest round mark replayed (b"" if none), written first as
    segment ``last + 1``, synced: the segments deleted held the shard's
    round marks, and a start cut off before the shard's log opens (and
    repeats the mark at its head) would otherwise find none, and redo the
    rounds still in the intent log over this shard's later writes.
    """
    if head:
        fd = os.open(
            directory / segment_name(last + 1),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o644,
        )
        try:
            write_all(fd, head)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_directory(directory)
    write_snapshot(
        directory, ((key, value, expires.get(key)) for key, value in data.items()), covers=last
    )
    for n, path in segments:
        if n <= last:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    fsync_directory(directory)


def make_changes(changes: Changes) -> None:
    """Make the file changes :func:`recover` left in ``changes``, in order (blocking).

    Raises:
        OSError: a change failed (the ones before it are made).
    """
    for change in changes:
        change()
    changes.clear()


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(
    directory: Path,
    *,
    now_ms: int,
    repair: bool = False,
    acked: Mapping[int, int] | None = None,
    changes: Changes | None = None,
) -> Recovered:
    """Rebuild a shard's state from its snapshot and log in ``directory``.

    Blocking (reads every byte of the snapshot and the log): run it in a
    worker thread. Changes files only as the module docstring says (torn
    tails, and with ``repair`` the damaged parts, moved aside).

    Args:
        directory: the shard's data directory (missing: an empty shard).
        now_ms: the current Unix time in ms; keys expired by then are dropped.
        repair: keep every valid record instead of stopping at damage.
        acked: segment number -> where its acknowledged bytes end, as far as
            the commit log knows (:func:`~.commitlog.redo`); damage at or
            past that offset is a torn tail: bytes no acknowledged write
            needs (an append cut off by a power loss, its pages written back
            in any order). A segment numbered after all of them counts as
            acknowledged up to offset 0.
        changes: None: make the changes to files as they are found (a
            shard rebuilt at runtime). A list: append them to it instead, in
            order, for the caller to make (:func:`make_changes`) once every
            file it must read has been read (see "Changes last" above); the
            returned state is the one they lead to, and must not change
            before they are made (a repair's snapshot is written from it).

    Raises:
        CorruptLog: a corrupt record or a missing segment (not with ``repair``).
        CorruptSnapshot: a damaged snapshot that no older one can replace
            (not with ``repair``).
        NewerVersion: a newer format version wrote a snapshot or a record
            (with ``repair`` too; that file is left as it is).
        OSError: a file cannot be read, truncated or written.
    """
    warnings: list[str] = []
    if not directory.exists():
        return Recovered({}, {}, warnings, 0, 0, 0, 0, None)
    found: Changes = []
    _remove_temp_files(directory, warnings, found)
    segments = list_segments(directory)
    present = {n for n, _ in segments}
    base, rebase = _choose_base(directory, present, repair, warnings, found)
    after = [(n, path) for n, path in segments if n > base.covers]
    last = max([base.covers, *present, *(covers for covers, _ in list_snapshots(directory))])
    if after:
        gap = _missing(present, base.covers + 1, after[-1][0])
        if gap:
            where = directory / segment_name(gap[0])
            reason = (
                f"segments {gap[0]}..{gap[-1]} are missing, and segment {after[-1][0]} needs them"
            )
            if not repair:
                raise CorruptLog(where, 0, reason)
            warnings.append(f"repair: {where}: {reason}; replaying the segments present")
            rebase = True
    data, expires = base.data, base.expires
    replayed = 0
    marks: dict[int, bool] = {}
    cut = False
    # A snapshot gives no PATCH's base (the log's writer logs each key's first
    # edit after its snapshot's copy whole): the chains start empty.
    chains = Chains()
    skipped = False  # some were
    cuts: list[tuple[Path, int]] = []  # truncations: made unless a rebase deletes the segments
    newest_named = max(acked, default=None) if acked else None
    for n, path in after:
        end = None if acked is None else acked.get(n)
        if end is None and newest_named is not None and n > newest_named:
            # Started after every segment a frame names: none of its bytes
            # is known acknowledged (a frame would name it; a sync of its
            # own would have kept them whole).
            end = 0
        count, was_cut = _replay_segment(
            path, data, expires, repair, warnings, marks, found, cuts, end, cut, chains
        )
        if chains.skipped:
            warnings.append(
                f"{path}: skipped {chains.skipped} PATCH record(s) (in-place edits) whose "
                "base, the value they edited, is not the one replayed: records before "
                "them were lost"
            )
            chains.skipped = 0
            # Every start would skip them again, and warn: a snapshot of this
            # state covers them.
            rebase = skipped = True
        replayed += count
        cut = cut or was_cut
    expired = [key for key, at in expires.items() if at <= now_ms]
    for key in expired:
        del data[key]
        del expires[key]
    snapshot = base.path
    newest = max(marks, default=0)
    if rebase:
        # No segment is truncated first: the rebase deletes them all, and a
        # start cut off between a truncation and the rebase must find the
        # same loss again (a repair's, for one).
        snapshot = directory / snapshot_name(last)
        head = encode_txn(newest, marks[newest]) if newest else b""
        found.append(functools.partial(_rebase, directory, data, expires, last, segments, head))
        warnings.append(
            f"{'' if skipped and not repair else 'repair: '}wrote {snapshot.name} of the"
            " recovered state and removed the segments it covers, so the next start"
            f" {'replays no skipped PATCH' if skipped and not repair else 'needs no repair'}"
        )
    else:
        found += [functools.partial(_truncate, path, offset) for path, offset in cuts]
    if changes is None:
        make_changes(found)
    else:
        changes += found
    return Recovered(
        data,
        expires,
        warnings,
        last + 1 if rebase and newest else last,  # the rebase's head segment
        replayed,
        base.count,
        len(expired),
        snapshot,
        marks,
        max(marks, default=0),
    )
