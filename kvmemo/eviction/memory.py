"""Memory accounting: every write reserves its bytes, every removal releases them.

Design: one ``MemoryTracker`` per store, shared by the shards of one process.
All of them run on one trio thread and call it only from synchronous sections
(no checkpoint between the check and the update), so a reservation is atomic
without a lock. Usage is kept per shard as well, so a shard whose state is
rebuilt can set its own figure without touching the others.

Entry sizes are estimates of what CPython really allocates for one entry, the
constants calibrated against ``tracemalloc`` (see ``tests/test_memory.py``,
which holds the estimate within ±20 % of measured growth):

- ``ENTRY_OVERHEAD``: a ``bytes`` key and a ``bytes`` value object headers
  and their slot in the shard's dict;
- ``TTL_OVERHEAD``: a float, a slot in the expiry dict and an entry in the
  ``TTLIndex`` (a tuple in a sorted list);
- the eviction policy's bookkeeping per key, which differs from policy to
  policy (``EvictionPolicy.key_overhead``, calibrated with each policy):
  the store adds it to :func:`entry_size` (``ShardStore.entry_size``).

Calibration (CPython 3.11, 64-bit; a ``ShardStore``; 16-byte keys; bytes of
traced growth per entry). The store alone (``noeviction``, which keeps no
bookkeeping) measures 150 B at 10^5 entries of 16 B values, hence
``ENTRY_OVERHEAD``. Each policy's bookkeeping alone, recorded for 10^4 /
10^5 / 10^6 keys: ``lru`` 57 / 80 / 70 B (a dict of key -> tick), ``lfu``
132 / 186 / 161 B, ``fifo`` 103 / 133 / 119 B, ``random`` 65 / 88 / 78 B.
With the default ``lru`` the whole entry measured:

    entries         5e3   2e4  4.5e4    1e5  1.7e5  2.5e5
    16 B values     184   185    243    231    188    210
    + a TTL         303   304    390    372    308    341

The figures swing with the fill ratio of the dicts (they double when 2/3
full), so the constants aim at the middle of the swing, not at one size:
for ``lru`` the estimate (225 B, 355 B with a TTL) stays within ±15 % of
every figure above; ``tests/test_memory.py`` holds every policy within
±20 % at 10^5 entries.

Invariant: ``used == sum(shard usage)``, and when ``maxmemory`` is set,
``used <= maxmemory`` after any successful :meth:`MemoryTracker.try_reserve`.
Only two reservations go past the limit, for what Redis never refuses for
memory (commands not flagged ``denyoom``), each by at most one
maximum-size entry: :meth:`MemoryTracker.reserve`, for RENAME's and
RENAMENX's target (one entry in flight, freed again by the source's
deletion), and :meth:`MemoryTracker.overdraw`, for a key's first expiry
(``TTL_OVERHEAD``, for as long as the key keeps it), granted while ``used``
stays within ``overdraft`` (one maximum-size entry, set by the engine) of
the limit and refused past it. So ``used`` exceeds ``maxmemory`` by one
maximum-size entry at most, two for as long as a RENAME is in flight over
an overdraft in use; every write that adds bytes is refused while ``used``
is over the limit.

``peak`` is the highest ``used`` ever reached (for ``MEMORY STATS``): it is
recorded where usage *falls* (a release, a shrinking write, a reset), never
on the growing path, so a write that adds bytes pays nothing for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

BYTES_HEADER = 33  # sys.getsizeof(b"") on 64-bit CPython
ENTRY_OVERHEAD = 88  # bytes per entry beyond key and value payloads, policy aside (calibrated)
TTL_OVERHEAD = 130  # extra bytes per entry that has an expiry (calibrated)


# pymalloc hands out blocks in 16-byte steps (large objects are rounded too):
# a bytes object of n bytes takes (BYTES_HEADER + n + 15) & ~15. Folded into
# two constants so that the hot path makes as few int objects as possible (public:
# ShardStore inlines the formula in its MSET path, see ShardStore.put_delta).
ROUND_UP = BYTES_HEADER + 15
ENTRY_BASE = ENTRY_OVERHEAD - 2 * BYTES_HEADER  # the headers are in ENTRY_OVERHEAD already


def entry_size(key: bytes, value: bytes, *, has_ttl: bool = False) -> int:
    """Estimated bytes one entry costs in memory, including bookkeeping."""
    size = ENTRY_BASE + ((len(key) + ROUND_UP) & ~15) + ((len(value) + ROUND_UP) & ~15)
    return size + TTL_OVERHEAD if has_ttl else size


def entry_size_bound(key_length: int, value_length: int) -> int:
    """:func:`entry_size` of a key and value of these lengths, with an expiry."""
    return (
        ENTRY_BASE
        + ((key_length + ROUND_UP) & ~15)
        + ((value_length + ROUND_UP) & ~15)
        + TTL_OVERHEAD
    )


def entries_size(data: Mapping[bytes, bytes], with_ttl: int) -> int:
    """The sum of :func:`entry_size` over ``data``, ``with_ttl`` of its entries having a TTL.

    For recovery's millions of entries: the lengths are counted in C
    (``Counter``) and each distinct length is rounded once, instead of one
    Python call per entry.
    """
    total = len(data) * ENTRY_BASE + with_ttl * TTL_OVERHEAD
    for lengths in (Counter(map(len, data.keys())), Counter(map(len, data.values()))):
        for length, count in lengths.items():
            total += count * ((length + ROUND_UP) & ~15)
    return total


class MemoryTracker:
    """Tracked usage of a store against its limit.

    Args:
        maxmemory: the hard limit in bytes; 0 means no limit.
        shards: how many shards report to it.
        watermark: the fraction of ``maxmemory`` above which eviction is woken.
        target: the fraction eviction brings usage back down to.
    """

    def __init__(
        self, maxmemory: int, shards: int, *, watermark: float = 0.95, target: float = 0.9
    ) -> None:
        if maxmemory < 0:
            raise ValueError(f"maxmemory must be >= 0, got {maxmemory}")
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if not 0 < target <= watermark <= 1:
            raise ValueError(
                f"need 0 < target <= watermark <= 1, got target={target} watermark={watermark}"
            )
        self.maxmemory = maxmemory
        self.watermark = watermark
        self.target = target
        self.wake_at = self._wake_at()
        self.used = 0
        # The highest ``used`` seen before a fall (see ``peak``): usage only
        # falls in try_reserve (nbytes <= 0), release and reset_shard, each of
        # which records the value it leaves first.
        self._peak = 0
        self._per_shard = [0] * shards
        self.refused = 0  # reservations refused at the hard limit
        # Bytes past maxmemory that overdraw() may grant (see the module docstring).
        self.overdraft = 0

    def set_limit(self, maxmemory: int) -> None:
        """Change the hard limit (CONFIG SET maxmemory); usage is untouched."""
        if maxmemory < 0:
            raise ValueError(f"maxmemory must be >= 0, got {maxmemory}")
        self.maxmemory = maxmemory
        self.wake_at = self._wake_at()

    def _wake_at(self) -> float:
        """``used`` from which eviction should run: the watermark's bytes (inf without a limit)."""
        return self.watermark * self.maxmemory if self.maxmemory else float("inf")

    def try_reserve(self, shard: int, nbytes: int) -> bool:
        """Account ``nbytes`` more for ``shard`` unless that would cross the limit.

        A negative ``nbytes`` (a write that shrinks an entry) always succeeds.
        """
        if nbytes > 0:
            if self.maxmemory and self.used + nbytes > self.maxmemory:
                self.refused += 1
                return False
        elif self.used > self._peak:  # usage falls (or stays): remember the top first
            self._peak = self.used
        self.used += nbytes
        self._per_shard[shard] += nbytes
        return True

    def overdraw(self, shard: int, nbytes: int) -> bool:
        """:meth:`try_reserve` of ``nbytes`` (> 0) with ``overdraft`` bytes past the limit.

        For a key's first expiry: EXPIRE and its kin, GETEX, which Redis
        never refuses for memory. Granted past ``maxmemory`` (a client that
        gives a key a timeout at the limit means to free it), but never by
        more than ``overdraft``: ``OOM`` then, as for any write.
        """
        if self.maxmemory and self.used + nbytes > self.maxmemory + self.overdraft:
            self.refused += 1
            return False
        self.used += nbytes
        self._per_shard[shard] += nbytes
        return True

    def reserve(self, shard: int, nbytes: int) -> None:
        """Account ``nbytes`` more for ``shard`` whatever the limit (``nbytes`` >= 0).

        For a write that frees as much as it takes, whose bytes are charged
        before the others are released (RENAME, RENAMENX, which Redis never
        refuses for memory: the target is written before the source's shard
        deletes it; the excess is bounded by that one entry).
        """
        self.used += nbytes
        self._per_shard[shard] += nbytes

    def release(self, shard: int, nbytes: int) -> None:
        """Account ``nbytes`` less for ``shard`` (an entry left)."""
        if self.used > self._peak:
            self._peak = self.used
        self.used -= nbytes
        self._per_shard[shard] -= nbytes

    def reset_shard(self, shard: int, nbytes: int) -> None:
        """Set ``shard``'s usage outright (after its state was rebuilt)."""
        if self.used > self._peak:
            self._peak = self.used
        self.used += nbytes - self._per_shard[shard]
        self._per_shard[shard] = nbytes

    @property
    def peak(self) -> int:
        """The highest tracked usage reached so far (Redis's ``peak.allocated``)."""
        return max(self._peak, self.used)

    def shard_used(self, shard: int) -> int:
        """Bytes tracked for one shard."""
        return self._per_shard[shard]

    def fits(self, nbytes: int) -> bool:
        """Whether reserving ``nbytes`` more would succeed now."""
        return nbytes <= 0 or not self.maxmemory or self.used + nbytes <= self.maxmemory

    @property
    def over_limit(self) -> bool:
        """Whether usage is past the hard limit (``used > maxmemory``; never without one).

        Redis's ``getMaxmemoryState`` test: its processCommand refuses
        commands queued in MULTI, and an EXEC holding a ``denyoom`` one,
        while this holds and eviction cannot end it.
        """
        return bool(self.maxmemory) and self.used > self.maxmemory

    @property
    def over_watermark(self) -> bool:
        """Whether eviction should run now (``used`` reached ``wake_at``)."""
        return self.used >= self.wake_at

    def excess(self) -> int:
        """Bytes to free to get back down to the target fraction (0 if none)."""
        if not self.maxmemory:
            return 0
        return max(0, self.used - int(self.target * self.maxmemory))
