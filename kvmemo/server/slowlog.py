"""The slow log of the Redis port: Redis's ``SLOWLOG``, as a plain synchronous core.

Design
------
Problem: ``SLOWLOG GET`` must show the commands that took longer than
``slowlog-log-slower-than`` microseconds, in Redis's entry format, without
costing the hot path anything measurable when nothing is slow.

Approach: the server times each engine call (see
:mod:`kvmemo.server.resp_server`) and compares the elapsed nanoseconds with
:attr:`SlowLog.threshold_ns`, the one comparison per command (or per batch)
made when nothing is slow. A disabled log (a negative threshold, or a
maximum length of 0) has an unreachable threshold, so the same comparison
never succeeds; only a slow call builds an entry (:meth:`SlowLog.record`).

Entries are Redis's (``slowlog.c``): id, Unix time in seconds, duration in
microseconds, the arguments (at most ``MAX_ARGS``: past that the last one says
``... (N more arguments)``; each argument over ``MAX_ARG_BYTES`` bytes is cut
there and followed by ``... (N more bytes)``), the client's ``addr:port`` and
its name. Newest first. As in Redis, lowering ``slowlog-max-len`` trims the
log at the next entry, not at once.

Memory: at most ``max_len`` entries of at most ``MAX_ARGS`` arguments of at
most ``MAX_ARG_BYTES`` + a few bytes each.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Final

__all__ = [
    "DEFAULT_MAX_LEN",
    "DEFAULT_SLOWER_THAN",
    "MAX_ARGS",
    "MAX_ARG_BYTES",
    "SlowEntry",
    "SlowLog",
    "entry_args",
]

DEFAULT_SLOWER_THAN: Final = 10_000  # µs: Redis's slowlog-log-slower-than
DEFAULT_MAX_LEN: Final = 128  # entries: Redis's slowlog-max-len
MAX_ARGS: Final = 32  # arguments kept per entry (Redis's SLOWLOG_ENTRY_MAX_ARGC)
MAX_ARG_BYTES: Final = 128  # bytes kept per argument (Redis's SLOWLOG_ENTRY_MAX_STRING)
LLONG_MAX: Final = (1 << 63) - 1  # the largest value either setting takes, as Redis
NEVER: Final = 1 << 80  # ns: a threshold no measured duration reaches (the log is off)

SlowEntry = tuple[int, int, int, list[bytes], bytes, bytes]
"""``(id, unix time s, duration µs, arguments, b"addr:port", client name)``: one
``SLOWLOG GET`` element, in its order."""


def entry_args(argv: Sequence[bytes], more_commands: int = 0) -> list[bytes]:
    """The arguments of an entry, cut as Redis cuts them.

    Args:
        argv: the command, its name first, as the client sent it.
        more_commands: how many further commands ran in the same timed
            batch (ours: a batch is timed as a whole); when not 0, the
            last argument says ``... (N more commands in this batch)`` and
            the command keeps one argument fewer, so the entry still holds
            at most ``MAX_ARGS``.
    """
    room = MAX_ARGS - 1 if more_commands else MAX_ARGS
    out = [arg if len(arg) <= MAX_ARG_BYTES else _cut(arg) for arg in argv[:room]]
    if len(argv) > room:
        out[-1] = b"... (%d more arguments)" % (len(argv) - room + 1)
    if more_commands:
        out.append(b"... (%d more commands in this batch)" % more_commands)
    return out


def _cut(arg: bytes) -> bytes:
    return arg[:MAX_ARG_BYTES] + b"... (%d more bytes)" % (len(arg) - MAX_ARG_BYTES)


class SlowLog:
    """The entries and the two settings of one Redis port's slow log.

    Invariants: ``threshold_ns`` is ``slower_than * 1000`` while the log is
    on (``slower_than >= 0`` and ``max_len > 0``) and :data:`NEVER` while it
    is off; ``entries`` holds the newest first, ids decreasing; ``next_id``
    is one more than the newest id ever given (RESET does not rewind it).
    """

    __slots__ = ("_max_len", "_slower_than", "entries", "next_id", "threshold_ns")

    def __init__(
        self, slower_than: int = DEFAULT_SLOWER_THAN, max_len: int = DEFAULT_MAX_LEN
    ) -> None:
        self.entries: deque[SlowEntry] = deque()
        self.next_id = 0
        self.threshold_ns = NEVER
        self._slower_than = 0
        self._max_len = 0
        self.configure(slower_than=slower_than, max_len=max_len)

    @property
    def slower_than(self) -> int:
        """``slowlog-log-slower-than``, µs: negative disables, 0 logs every call."""
        return self._slower_than

    @property
    def max_len(self) -> int:
        """``slowlog-max-len``: the most entries kept (0 keeps none)."""
        return self._max_len

    def configure(self, *, slower_than: int | None = None, max_len: int | None = None) -> None:
        """Change either setting (checked as Redis's CONFIG SET checks them).

        Raises:
            ValueError: ``slower_than`` below -1, ``max_len`` below 0, either
                above ``LLONG_MAX``. Nothing changed then.
        """
        if slower_than is not None and not -1 <= slower_than <= LLONG_MAX:
            raise ValueError(f"slower_than must be between -1 and {LLONG_MAX}, got {slower_than}")
        if max_len is not None and not 0 <= max_len <= LLONG_MAX:
            raise ValueError(f"max_len must be between 0 and {LLONG_MAX}, got {max_len}")
        if slower_than is not None:
            self._slower_than = slower_than
        if max_len is not None:
            self._max_len = max_len
        on = self._slower_than >= 0 and self._max_len > 0
        self.threshold_ns = self._slower_than * 1000 if on else NEVER

    def record(
        self,
        duration_ns: int,
        argv: Sequence[bytes],
        client: bytes,
        name: bytes,
        now: float,
        *,
        more_commands: int = 0,
    ) -> None:
        """Add an entry for a call that took ``duration_ns`` (the caller compared it
        with ``threshold_ns`` already), then trim to ``max_len``, as Redis.

        Args:
            now: wall-clock time (``time.time()``), the entry's Unix time.
            more_commands: see :func:`entry_args`.
        """
        entry = (
            self.next_id,
            int(now),
            duration_ns // 1000,
            entry_args(argv, more_commands),
            client,
            name,
        )
        self.next_id += 1
        entries = self.entries
        entries.appendleft(entry)
        while len(entries) > self._max_len:
            entries.pop()

    def get(self, count: int = 10) -> list[SlowEntry]:
        """The ``count`` newest entries (-1: all), newest first."""
        if count < 0:
            return list(self.entries)
        return list(islice(self.entries, count))

    def reset(self) -> None:
        """Forget every entry (ids go on from where they were, as Redis's)."""
        self.entries.clear()
