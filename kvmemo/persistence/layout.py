"""The data directory as a whole: one process at a time, one shard count (synchronous).

Design. Two checks run before recovery reads anything (see
``KVEngine.prepare``), each refusing the start with a message an operator
can act on rather than letting the store lose or damage data:

- **One process per directory.** :func:`lock_directory` takes an exclusive
  ``flock`` on ``DIR/LOCK`` (holding the process id, for the message) and
  keeps its descriptor open for the life of the store; a second store on the
  same directory, in this process or another, is refused with
  :class:`DirectoryInUse`, naming the holder's process id when it is known
  (see :func:`lock_directory`). Two writers would each start log segments, drop
  the other's intent log at start and remove segments the other's snapshots
  do not cover. The kernel releases the lock when the descriptor closes, or
  when the process dies (a ``kill -9`` leaves nothing to clean up). A
  directory where the lock file cannot be created (read-only, full) is
  served unlocked: its writes fail with ``IO`` anyway; so is one on a file
  system that has no locks.
- **One shard count.** A key's shard depends on the number of shards, and
  each shard recovers only ``shard-N/``: a directory written with another
  count would come back with keys missing (the shards past the new count are
  never read) or unreachable (found on a shard that no longer owns them).
  :func:`check_shard_count` refuses such a start, naming the count the
  directory was written with (recorded in ``DIR/SHARDS``; for a directory
  from before that file, its highest ``shard-N/`` plus one). A ``shard-N/``
  holding nothing (no snapshot with an entry, no non-empty segment) counts
  as no data, unless the intent or commit log beside the shards holds
  something (recovery applies those to shards by key): only then may the
  count change. A forked child closes its copy of the lock's descriptor
  (a ``flock`` belongs to the open file, which the child shares).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
from pathlib import Path

from .commitlog import COMMIT_DIR
from .intents import INTENT_DIR
from .records import PersistenceError
from .snapshot import SNAPSHOT_HEADER_SIZE
from .wal import fsync_directory

LOCK_NAME = "LOCK"
# Linux's table of the file locks held (holder's pid, device and inode of the
# file): the truth about a LOCK whose file could not be written by its holder.
PROC_LOCKS = Path("/proc/locks")
SHARDS_NAME = "SHARDS"  # the shard count the directory is written with
_SHARD_DIR_RE = re.compile(r"shard-(\d+)")
_DATA_RE = re.compile(r"snap-\d{8,}\.kvs|wal-\d{8,}\.log")
_COUNT = struct.Struct("<Q")  # a snapshot's entry count, at offset 20 of its header
# Logs beside the shards whose records recovery applies to shards by key: a
# multi-shard write's intent, and (appendfsync always) the commit log that
# holds what a power loss left out of the shards' own logs.
_SIDE_LOGS = (
    (INTENT_DIR, re.compile(r"wal-\d{8,}\.log")),
    (COMMIT_DIR, re.compile(r"commit-\d{8,}\.log")),
)
# The lock descriptors this process holds: a forked child closes its copies
# (a flock belongs to the open file, which the child shares; O_CLOEXEC acts
# only at exec), so that a child never keeps a directory locked.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # not LOCK_UN: that would unlock the parent's lock too
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class DirectoryInUse(PersistenceError):
    """Another store (another process, or this one) has the data directory open."""


class ShardCountMismatch(PersistenceError):
    """The data directory was written with another number of shards."""


def _flock_holders(fd: int) -> set[int] | None:
    """The pids holding a ``flock`` on the file open as ``fd``, from :data:`PROC_LOCKS`.

    None when the table cannot be read (not Linux) or names no pid for the
    file (a holder in another pid namespace shows as pid 0).
    """
    try:
        st = os.fstat(fd)
        table = PROC_LOCKS.read_text("ascii", errors="replace")
    except OSError:
        return None
    # e.g. "1: FLOCK  ADVISORY  WRITE 5813 fe:00:2146628 0 EOF" (major:minor in hex)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            with contextlib.suppress(ValueError):
                pids.add(int(fields[4]))
    pids.discard(0)
    return pids or None


def _holder(fd: int, writable: bool) -> str:
    """Who holds the lock on LOCK (open as ``fd``), for the message: `` (process N)`` or why not.

    A holder writes its pid into LOCK whenever it can: if this store could
    open LOCK for writing, so could the holder, and the pid there is its.
    If not (a read-only directory or file), the holder could not write its
    pid either, and LOCK may hold an older run's: the kernel's lock table
    says who holds it, and without that the pid is unknown.
    """
    recorded = None
    with contextlib.suppress(OSError, ValueError):
        recorded = int(os.pread(fd, 32, 0).decode("ascii").strip())
    if writable:
        return "" if recorded is None else f" (process {recorded})"
    holders = _flock_holders(fd)
    if holders is not None:
        pid = recorded if recorded in holders else min(holders)
        return f" (process {pid})"
    return " (process id unknown: LOCK cannot be written here, so it may name an older run's)"


def lock_directory(directory: Path) -> int | None:
    """Lock ``directory`` for this store; the descriptor holding the lock (None: unlockable).

    The caller closes the descriptor (``os.close``) once the store has
    stopped; that releases the lock.

    Raises:
        DirectoryInUse: another store holds the lock (the message names its
            process id when it is known, see :func:`_holder`).
    """
    path = directory / LOCK_NAME
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:  # a read-only directory: an existing lock file still locks
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # cannot be written at all: served unlocked (writes fail with IO)
        writable = False  # nor could a holder write its pid: what LOCK holds may be stale
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd, writable)
        os.close(fd)
        raise DirectoryInUse(
            f"{directory}: the data directory is in use by another KVMemo store{holder}; "
            "two stores on one directory would damage it"
        ) from None
    except OSError:  # a file system without locks (ENOLCK): served unlocked, as before
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # the holder's pid, for the message above
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _HELD.add(fd)
    return fd


def release_directory(fd: int) -> None:
    """Release the lock :func:`lock_directory` returned (close its descriptor)."""
    _HELD.discard(fd)
    os.close(fd)


def _holds_data(shard_dir: Path) -> bool:
    try:
        entries = list(shard_dir.iterdir())
    except NotADirectoryError:
        return True  # not ours to judge: recovery names the problem
    for path in entries:
        if _DATA_RE.fullmatch(path.name):
            try:
                if path.name.startswith("snap-"):
                    with open(path, "rb") as file:
                        head = file.read(SNAPSHOT_HEADER_SIZE)
                    # Its entry count (see .snapshot): an empty one holds nothing.
                    if len(head) < SNAPSHOT_HEADER_SIZE or _COUNT.unpack_from(head, 20)[0]:
                        return True
                elif path.stat().st_size > 0:
                    return True
            except OSError:
                return True  # unreadable: recovery names the problem
    return False


def _side_logs_hold_data(directory: Path) -> bool:
    """Whether an intent or commit log segment holds something (recovery may apply it)."""
    for name, pattern in _SIDE_LOGS:
        try:
            entries = list((directory / name).iterdir())
        except FileNotFoundError:
            continue
        except OSError:
            return True  # unreadable: recovery names the problem
        for path in entries:
            if pattern.fullmatch(path.name):
                try:
                    if path.stat().st_size > 0:
                        return True
                except OSError:
                    return True
    return False


def _recorded_count(directory: Path) -> int | None:
    try:
        text = (directory / SHARDS_NAME).read_text("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardCountMismatch(f"{directory / SHARDS_NAME}: cannot be read: {exc}") from None
    try:
        count = int(text.strip())
    except ValueError:
        count = 0
    if count < 1:
        raise ShardCountMismatch(
            f"{directory / SHARDS_NAME}: not a shard count: {text.strip()[:40]!r}"
        )
    return count


def _record_count(directory: Path, shards: int) -> None:
    """Write ``SHARDS`` (temporary file, fsync, rename, directory fsync); errors ignored.

    A directory that cannot be written is served anyway (writes fail with
    ``IO``); it is recorded at the next start that can.
    """
    temp = directory / f"{SHARDS_NAME}.tmp"
    with contextlib.suppress(OSError):
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{shards}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / SHARDS_NAME)
        fsync_directory(directory)


def check_shard_count(directory: Path, shards: int) -> None:
    """Refuse a directory holding data of another shard count; record ``shards`` in it.

    The count a directory was written with is the one its ``SHARDS`` file
    records; a directory from before that file: its highest ``shard-N/``
    plus one. It matters only if a shard directory holds data: without
    any, the count may change (and the new one is recorded).

    Raises:
        ShardCountMismatch: data of another count, or a ``SHARDS`` file that
            cannot be read.
        OSError: the directory cannot be read.
    """
    present: dict[int, Path] = {}
    for path in directory.iterdir():
        match = _SHARD_DIR_RE.fullmatch(path.name)
        if match is not None:
            present[int(match.group(1))] = path
    recorded = _recorded_count(directory)
    used = [n for n, path in sorted(present.items()) if _holds_data(path)]
    if used or (present and _side_logs_hold_data(directory)):
        written = recorded if recorded is not None else max(present) + 1
        if used:
            written = max(written, used[-1] + 1)
        if written != shards:
            raise ShardCountMismatch(
                f"{directory}: the data directory was written with {written} shards, "
                f"not {shards}: start with {written} shards (a key's shard depends on "
                "the count, so any other would lose keys)"
            )
    if recorded != shards:
        _record_count(directory, shards)
