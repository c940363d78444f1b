"""The per-shard schedule of key expiries.

Design
------
Problem: each shard must find the keys whose time is up without scanning all
of its keys, and a mass expiry must not stall it: work per sweep is bounded.

Approach: a ``SortedList`` of ``(expires_at, key)`` pairs, earliest first.
The pair, not the timestamp alone, is the element, because float timestamps
collide (many keys set in one batch share an ``expires_at``); the key breaks
the tie, so equal pairs are the same entry. Adding or discarding an entry is
O(log n); ``pop_due(now, budget)`` takes at most ``budget`` entries off the
front, so one sweep costs O(budget * log n) whatever the backlog.

Times are monotonic seconds (``trio.current_time()``), always passed in by the
caller as ``now`` or ``expires_at``; the index never reads a clock.

Staleness: the index is a *schedule, not the truth*. The shard's entry (its
``expires_at``) decides whether a key expires. The index may hold stale pairs:
a key whose expiry changed or was removed while its old pair stayed, or a key
that no longer exists. A stale pair costs one wasted check when it comes due:
the shard compares it with the entry and ignores it. What the index must not
miss is a live expiry; when it may have (after a crash, a bug, or a failed
update), reconciliation calls ``rebuild`` with the shard's expiries, which
replaces the whole content. Until then lazy expiry on access still keeps an
expired key from ever being served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sortedcontainers import SortedList  # type: ignore[import-untyped]

__all__ = ["TTLIndex"]


def _check_expires_at(expires_at: float) -> None:
    # NaN compares false with everything and would corrupt the sort order.
    if math.isnan(expires_at):
        raise ValueError(f"expires_at must not be NaN, got {expires_at}")


class TTLIndex:
    """The schedule of expiries of one shard: ``(expires_at, key)`` pairs, earliest first.

    The index is a schedule, not the truth: the shard's entry decides whether
    a key has expired. The index may hold stale entries (an old expiry of a key
    whose TTL changed, a key since deleted) and a key may appear in several
    pairs; whoever pops a key checks it against the shard's entry.
    Reconciliation (``rebuild`` from the shard's expiries) repairs it.

    Invariant: every element is a ``(expires_at, key)`` pair with a non-NaN
    float ``expires_at`` and a ``bytes`` key, held once, in ascending order.
    Intended invariant, restored by ``rebuild``: every key of the shard with an
    expiry has its pair here.

    Every method is synchronous and does its whole change before returning,
    so an actor calling it is never left with a half-made change.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries = SortedList()

    def __len__(self) -> int:
        """The number of ``(expires_at, key)`` pairs, stale ones included."""
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        """Tell whether the ``(expires_at, key)`` pair ``item`` is scheduled."""
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], int | float)
            and isinstance(item[1], bytes)
        ):
            return False
        return item in self._entries

    def __repr__(self) -> str:
        return f"<TTLIndex entries={len(self._entries)} next={self.next_deadline()}>"

    def add(self, key: bytes, expires_at: float) -> None:
        """Schedule ``key`` to expire at ``expires_at``; adding a pair twice keeps one.

        A previous pair of the same key is not touched: the caller discards
        it (or leaves it stale, which is harmless).

        Args:
            key: the key.
            expires_at: monotonic seconds (``inf`` is allowed and never due).

        Raises:
            ValueError: if ``expires_at`` is NaN.
        """
        _check_expires_at(expires_at)
        pair = (expires_at, key)
        if pair not in self._entries:
            self._entries.add(pair)

    def discard(self, key: bytes, expires_at: float) -> None:
        """Unschedule the pair ``(expires_at, key)``; do nothing if it is absent."""
        self._entries.discard((expires_at, key))

    def pop_due(self, now: float, budget: int) -> list[bytes]:
        """Remove and return the keys of at most ``budget`` due pairs, earliest first.

        A pair is due when ``expires_at <= now``. The keys are candidates: the
        caller expires one only if the shard's entry says so.

        Args:
            now: the current monotonic time, in seconds.
            budget: the most pairs to take, >= 1 (bounds the work of one sweep).

        Returns:
            The keys of the removed pairs, in ``(expires_at, key)`` order; a
            key appears once per due pair it had.

        Raises:
            ValueError: if ``budget`` is below 1.
        """
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        count = min(budget, self._due_end(now))
        if count == 0:
            return []
        entries = self._entries
        keys: list[bytes] = [key for _, key in entries.islice(0, count)]
        del entries[:count]
        return keys

    def next_deadline(self) -> float | None:
        """The earliest ``expires_at`` scheduled, or None if the index is empty."""
        if not self._entries:
            return None
        deadline: float = self._entries[0][0]
        return deadline

    def due_count(self, now: float) -> int:
        """The number of pairs with ``expires_at <= now`` (O(log n))."""
        return self._due_end(now)

    def rebuild(self, expires: Mapping[bytes, float]) -> None:
        """Replace the whole content with one pair per key of ``expires``.

        This is reconciliation: ``expires`` is the source of truth (the shard's
        keys that have an expiry), and every stale pair is dropped.

        Args:
            expires: key -> expires_at, monotonic seconds.

        Raises:
            ValueError: if an ``expires_at`` is NaN; the index is then unchanged.
        """
        pairs = [(expires_at, key) for key, expires_at in expires.items()]
        for expires_at, _ in pairs:
            _check_expires_at(expires_at)
        self._entries = SortedList(pairs)

    def clear(self) -> None:
        """Remove every pair."""
        self._entries.clear()

    def entries(self) -> list[tuple[float, bytes]]:
        """A copy of every ``(expires_at, key)`` pair, in order (for checks and tests)."""
        return list(self._entries)

    def _due_end(self, now: float) -> int:
        """The number of leading pairs with ``expires_at <= now``."""
        if math.isnan(now):
            return 0  # nothing is due at an undefined time
        if now == math.inf:
            return len(self._entries)
        # (next float above now, b"") sorts after every (t <= now, key) pair
        # and before every (t > now, key) pair: b"" is the smallest key.
        end: int = self._entries.bisect_left((math.nextafter(now, math.inf), b""))
        return end
