"""Eviction policies: which keys a shard gives up first under memory pressure.

Each shard owns one policy instance. A policy is a pure core (no trio, no
actors): it keeps metadata about keys only, never values, and never deletes
anything. The shard reports what happens to its keys through the ``record_*``
methods; the ``EvictionManager`` asks every shard for ``candidates(count)``,
merges them by score and picks the globally lowest; the ``KVEngine`` deletes
the victims, and each shard then calls ``record_remove``.

Design of the scores: the manager compares candidates of *different* shards,
so a score must mean the same thing in every instance of a policy. All
policies therefore read one module-level logical clock, ``_CLOCK``: every
touch of every key in every shard of the process takes the next tick, so
ticks are unique and totally ordered across shards. Scores are plain ints;
lower means "evict first". A score is only comparable with scores of the same
policy.

Semantics shared by all policies (the shard may rely on them):

- ``record_insert`` of a key already tracked counts as an overwrite: an access
  followed by ``record_volatile``.
- ``record_access`` or ``record_volatile`` of an untracked key records it as
  inserted (not volatile for ``record_access``). A policy that lost track of a
  key learns it again the next time the key is touched, instead of never
  offering it for eviction.
- ``record_volatile`` that changes a key's flag refreshes its recency (gaining
  or losing a TTL is a write to the key, as EXPIRE and PERSIST are in Redis)
  but is not an access: LFU frequencies do not change. Setting the flag it
  already has is a no-op. This keeps every ``record_*`` O(1) for the
  ``volatile-*`` variants: a key joining the volatile set goes to the
  most-recent end of the volatile order, never into its middle.
- ``record_remove`` of an untracked key is a no-op.
- ``volatile-X`` offers exactly the volatile keys of the order ``X`` would
  offer, in the same order.

New policies plug in with :func:`register_policy`; :func:`make_policy` builds
one by name (Redis ``allkeys-*`` aliases accepted).

Introspection (``OBJECT FREQ``, ``OBJECT IDLETIME``) reads what a policy keeps
and never changes it: :meth:`EvictionPolicy.last_access` (the tick of a key's
last touch, for policies that keep one), :meth:`EvictionPolicy.frequency`
(LFU's access count) and :class:`TickTimes`, which turns a tick back into a
time without the touches reading any clock.
"""

from __future__ import annotations

import abc
import bisect
import heapq
import itertools
import os
import random
from collections import OrderedDict
from collections.abc import Collection, Container, Iterable, Sequence
from operator import itemgetter
from typing import ClassVar, Self, TypeVar

__all__ = [
    "DEFAULT_POLICY",
    "MARK_INTERVAL",
    "MAX_MARKS",
    "POLICY_NAMES",
    "EvictionPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "NoEvictionPolicy",
    "RandomPolicy",
    "TickTimes",
    "VolatileLFUPolicy",
    "VolatileLRUPolicy",
    "VolatileRandomPolicy",
    "make_policy",
    "register_policy",
]

# The shared logical clock: one tick per touch, process-wide, so that scores of
# different shards (different instances) compare. ``next()`` on a count is
# atomic, and ticks never repeat.
_CLOCK = itertools.count(1)

# LFU score = freq << LFU_TICK_BITS | tick: the frequency dominates, the tick
# breaks ties by recency. 2**64 ticks is centuries at 10**9 touches per second,
# so a tick never spills into the frequency bits.
LFU_TICK_BITS = 64

# Random scores are uniform in [0, 2**RANDOM_SCORE_BITS): the manager's "lowest
# score" then picks uniformly among the candidates it was offered.
RANDOM_SCORE_BITS = 62

DEFAULT_POLICY = "lru"

_by_tick = itemgetter(1)


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


class EvictionPolicy(abc.ABC):
    """Metadata about one shard's keys, ranking them for eviction.

    Subclasses set ``name`` (the registry name) and may set ``volatile_only``
    (candidates only among keys that have a TTL). Every ``record_*`` method is
    O(1) and synchronous, so a shard updates its policy in the same
    checkpoint-free section as its dict.

    Invariant: ``len(policy)`` is the number of keys recorded and not removed;
    ``candidates`` returns only such keys (for ``volatile_only`` policies, only
    those last recorded as volatile).
    """

    name: ClassVar[str]
    volatile_only: ClassVar[bool] = False
    key_overhead: ClassVar[int] = 0
    """Bytes of bookkeeping per key, calibrated against ``tracemalloc`` (see
    :mod:`kvmemo.eviction.memory`); the store counts them in every entry's size."""
    lfu: ClassVar[bool] = False
    """Ranks by access frequency (Redis's ``MAXMEMORY_FLAG_LFU``): ``OBJECT FREQ``
    answers with :meth:`frequency`, ``OBJECT IDLETIME`` refuses, as in Redis."""
    keeps_access_ticks: ClassVar[bool] = False
    """:meth:`last_access` gives the tick of each key's last touch (LRU, LFU);
    policies that keep no such tick (FIFO's tick is the insertion's; random and
    noeviction keep none) leave it False and answer None."""

    @classmethod
    def create(cls, *, rng: random.Random | None = None) -> Self:
        """Build an instance for :func:`make_policy`.

        Args:
            rng: a random source; policies that need none ignore it.
        """
        return cls()

    @abc.abstractmethod
    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        """A new key was stored; ``volatile`` tells whether it has a TTL."""

    @abc.abstractmethod
    def record_access(self, key: bytes) -> None:
        """An existing key was read or overwritten."""

    @abc.abstractmethod
    def record_volatile(self, key: bytes, volatile: bool) -> None:
        """The key gained (``True``) or lost (``False``) a TTL."""

    def record_writes(self, keys: Sequence[bytes], olds: Sequence[bytes | None]) -> None:
        """Keys written in order without a TTL: each is an insert where its old value is None.

        Exactly ``record_insert(key, volatile=False)`` for each key whose old
        value is None and ``record_access(key)`` for each other one, in order
        (a policy may record them all in one call: MSET's commit writes many).
        """
        for key, old in zip(keys, olds, strict=True):
            if old is None:
                self.record_insert(key, volatile=False)
            else:
                self.record_access(key)

    def record_loaded(self, keys: Iterable[bytes], volatile: Container[bytes]) -> None:
        """Keys of a recovered shard, recorded into this policy, just cleared.

        As ``record_insert(key, volatile=key in volatile)`` for each key, with
        one liberty: the keys were all stored at one moment, so a policy may
        give them their places in any order (LRU puts the persistent keys
        before the volatile ones). A policy may override it to record them
        all in one call: recovery loads millions.
        """
        for key in keys:
            self.record_insert(key, volatile=key in volatile)

    @abc.abstractmethod
    def record_remove(self, key: bytes) -> None:
        """The key left the shard; no error if it is not tracked."""

    @abc.abstractmethod
    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        """Up to ``count`` eviction candidates, best victim first.

        Args:
            count: the most candidates wanted.

        Returns:
            ``(score, key)`` pairs sorted by ascending score; a lower score
            means evict first, comparably across instances of the policy.

        Raises:
            ValueError: ``count`` is negative.
        """

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget every key (the shard was flushed)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of keys tracked, volatile or not."""

    def last_access(self, key: bytes) -> int | None:
        """The tick of ``key``'s last touch (read only: nothing is recorded).

        Returns:
            The tick, or None when the policy keeps no access ticks
            (:attr:`keeps_access_ticks` is False) or does not track ``key``.
        """
        return None

    def frequency(self, key: bytes) -> int | None:
        """How many times ``key`` was touched, for an :attr:`lfu` policy (read only).

        Returns:
            The count (1 at insertion, or what :meth:`record_frequency` set),
            or None when the policy counts no accesses or does not track ``key``.
        """
        return None

    def record_aged(self, key: bytes, *, volatile: bool, tick: int, since: float) -> None:
        """``key``, just stored, was last touched at ``tick``, time ``since``.

        For RESTORE ... IDLETIME; call after the key's insert. ``tick`` is a
        tick no later than the touches made after ``since`` (see
        :meth:`TickTimes.tick_at`), ``since`` an opaque time the policy gives
        back (:meth:`aged_since`). A policy that keeps no access times (and
        LFU, as Redis's) ignores it: the key stays as its insert recorded it.
        """
        return None

    def aged_since(self, key: bytes) -> float | None:
        """The ``since`` of :meth:`record_aged` while ``key`` is untouched since, else None."""
        return None

    def record_frequency(self, key: bytes, freq: int, *, volatile: bool) -> None:
        """``key``, just stored, has been touched ``freq`` times (>= 0; RESTORE ... FREQ).

        Call after the key's insert. Only an :attr:`lfu` policy counts
        touches; the others ignore it, as Redis does.
        """
        return None


class NoEvictionPolicy(EvictionPolicy):
    """Never evict: track nothing and offer no candidates.

    The engine then answers a write past ``maxmemory`` with ``OOM``.
    """

    name = "noeviction"

    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        pass

    def record_access(self, key: bytes) -> None:
        pass

    def record_volatile(self, key: bytes, volatile: bool) -> None:
        pass

    def record_remove(self, key: bytes) -> None:
        pass

    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        _check_count(count)
        return []

    def clear(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


class _Front:
    """The oldest entries of one LRU partition, as its last front scan saw them.

    Invariant: an entry ``(key, tick)`` that is still current (the partition
    maps ``key`` to ``tick``) precedes every live key of the partition that is
    not a current entry here. A key touched or inserted since the scan took a
    newer tick than any key had then, and the keys past the scanned prefix were
    newer already; an entry that is not current never becomes current again
    (ticks are unique), so it can be dropped for good.
    """

    __slots__ = ("entries", "start")

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, int]] = []
        self.start = 0  # entries before it are not current


class LRUPolicy(EvictionPolicy):
    """Exact least-recently-used order; score = tick of the last touch.

    Design: two plain dict partitions, key -> tick of last touch, one for keys
    without a TTL and one for volatile keys. A dict keeps insertion order, so
    each partition is in increasing tick order when a touch pops the key and
    inserts it again at the end: two O(1) dict operations, cheaper in time and
    in memory than an ``OrderedDict`` (whose ``move_to_end`` also keeps a
    linked-list node per key: ~50 B more per key, ~30 % slower per touch).
    ``volatile-lru`` reads the volatile partition's front; ``lru`` merges the
    two fronts by tick. Keeping the partitions disjoint (rather than one order
    plus a filter) means a ``volatile-lru`` shard full of persistent keys
    never scans them.

    Holes: a popped key leaves a hole in its dict's entry array until the dict
    is next resized (CPython compacts then, after up to about three times as
    many appends as live keys), and iteration from the front steps over holes;
    evictions pop the front, so holes gather there. Two measures keep
    ``candidates`` O(count) amortised:

    - each partition keeps a :class:`_Front`, the oldest ``count +
      FRONT_SPARE`` entries its last scan saw. ``candidates`` serves the
      current ones (checked with one dict lookup each) and scans the dict
      again only when fewer than ``count`` are left;
    - a rebuild (a copy, O(len)) removes every hole, and copying a key costs
      about what stepping over ``COPY_COST`` holes does, so the ski-rental
      rule applies: ``_holes`` counts pops since the last rebuild (an upper
      bound of the holes a scan meets), each scan adds it to ``_scan_debt``,
      and once that debt exceeds what a rebuild costs, the next scan rebuilds
      first. A store that never evicts never copies; touches only count.

    Aged keys (:meth:`record_aged`: RESTORE ... IDLETIME) were last touched
    in the past, so their place is inside an order that only appends: they
    wait in ``_aged`` instead, key -> (seq, tick, since, volatile), ranked by
    a heap per partition of (tick, seq, key) until their next touch moves
    them to the end of a partition like any key. The heaps are pruned
    lazily: an entry whose seq is not its key's current one is stale, dropped
    when it reaches the top, and the heaps are rebuilt once stale entries
    outnumber live ones (plus ``COMPACT_SLACK``). A store that restores no
    aged key pays one empty-dict check on the rare paths (a key not found in
    either partition) and nothing else. An aged key's own bookkeeping (its
    entry and heap item, about 150 B more) is not in ``key_overhead``.

    Invariant: every tracked key is in exactly one partition or in ``_aged``
    (with a live entry in the heap of its volatility), and the ticks of each
    partition increase from front to back.
    """

    name = "lru"
    key_overhead = 75  # a dict slot and an int tick per key (10^4-10^6 keys)
    keeps_access_ticks = True

    FRONT_SPARE: ClassVar[int] = 128  # entries a front scan keeps beyond the count asked for
    COPY_COST: ClassVar[int] = 32  # holes a scan steps over in the time a rebuild copies a key
    COMPACT_SLACK: ClassVar[int] = 1024  # keys; a rebuild is worth at least this many copies

    def __init__(self) -> None:
        self._persistent: dict[bytes, int] = {}
        self._volatile: dict[bytes, int] = {}
        self._persistent_front = _Front()
        self._volatile_front = _Front()
        self._holes = 0  # pops since the partitions were last rebuilt
        self._scan_debt = 0  # sum of _holes over the scans since then
        # Keys placed in the past by record_aged, untouched since (see the class docstring).
        self._aged: dict[bytes, tuple[int, int, float, bool]] = {}  # (seq, tick, since, volatile)
        self._aged_heaps: tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]] = (
            [],  # persistent: (tick, seq, key)
            [],  # volatile
        )
        self._aged_seq = 0

    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        # A re-insert is an access plus a flag change: both move the key to
        # the most-recent end, so one pop and one insert do both.
        if self._persistent.pop(key, None) is not None or self._volatile.pop(key, None) is not None:
            self._holes += 1
        elif self._aged:
            self._pop_aged(key)
        (self._volatile if volatile else self._persistent)[key] = next(_CLOCK)

    def record_access(self, key: bytes) -> None:
        order = self._persistent
        if order.pop(key, None) is not None:
            self._holes += 1
        elif self._volatile.pop(key, None) is not None:
            self._holes += 1
            order = self._volatile
        elif self._aged and self._pop_aged(key):
            order = self._volatile
        order[key] = next(_CLOCK)

    def record_aged(self, key: bytes, *, volatile: bool, tick: int, since: float) -> None:
        if self._persistent.pop(key, None) is not None or self._volatile.pop(key, None) is not None:
            self._holes += 1
        self._aged_seq = seq = self._aged_seq + 1
        self._aged[key] = (seq, tick, since, volatile)  # an entry it replaces goes stale
        heapq.heappush(self._aged_heaps[volatile], (tick, seq, key))
        self._prune_aged()

    def aged_since(self, key: bytes) -> float | None:
        entry = self._aged.get(key)
        return None if entry is None else entry[2]

    def _pop_aged(self, key: bytes) -> bool | None:
        """Forget ``key``'s aged entry: its volatility, or None when it had none."""
        entry = self._aged.pop(key, None)
        if entry is None:
            return None
        self._prune_aged()
        return entry[3]

    def _prune_aged(self) -> None:
        """Rebuild the aged heaps once their stale entries outnumber the live ones."""
        heaps = self._aged_heaps
        if len(heaps[0]) + len(heaps[1]) <= 2 * len(self._aged) + self.COMPACT_SLACK:
            return
        rebuilt: tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]] = ([], [])
        for key, (seq, tick, _, volatile) in self._aged.items():
            rebuilt[volatile].append((tick, seq, key))
        for heap in rebuilt:
            heapq.heapify(heap)
        self._aged_heaps = rebuilt

    def _oldest_aged(self, volatile: bool, count: int) -> list[tuple[int, bytes]]:
        """The ``count`` oldest aged ``(tick, key)`` of one volatility, oldest first.

        O((count + stale entries met) * log n): the live entries popped are
        pushed back, the stale ones dropped for good.
        """
        heap = self._aged_heaps[volatile]
        aged = self._aged
        taken: list[tuple[int, int, bytes]] = []
        while heap and len(taken) < count:
            item = heapq.heappop(heap)
            entry = aged.get(item[2])
            if entry is not None and entry[0] == item[1]:
                taken.append(item)
        for item in taken:
            heapq.heappush(heap, item)
        return [(tick, key) for tick, _, key in taken]

    def record_writes(self, keys: Sequence[bytes], olds: Sequence[bytes | None]) -> None:
        # record_insert(key, volatile=False) or record_access(key) for each
        # key, inlined (one call for an MSET share instead of one per key):
        # both pop the key from its partition; an insert (or an access of an
        # untracked key) puts it at the end of the persistent one, an access
        # of a volatile key back at the end of the volatile one.
        persistent = self._persistent
        volatile = self._volatile
        aged = self._aged
        pop = persistent.pop
        clock = _CLOCK
        holes = 0
        for key, old in zip(keys, olds, strict=True):
            if pop(key, None) is not None:
                holes += 1
            elif volatile and volatile.pop(key, None) is not None:
                holes += 1
                if old is not None:
                    volatile[key] = next(clock)
                    continue
            elif aged and self._pop_aged(key) and old is not None:
                volatile[key] = next(clock)  # an aged volatile key, overwritten: stays volatile
                continue
            persistent[key] = next(clock)
        self._holes += holes

    def record_loaded(self, keys: Iterable[bytes], volatile: Container[bytes]) -> None:
        # Each partition is filled by one C-level pass (zip with the clock:
        # increasing ticks, in the keys' order; keys first, so that the clock
        # is not advanced past the last key), persistent keys first.
        assert not self, "record_loaded needs a cleared policy"
        clock = _CLOCK
        if not volatile:
            self._persistent.update(zip(keys, clock, strict=False))
            return
        keys = keys if isinstance(keys, Collection) else list(keys)
        persistent = itertools.filterfalse(volatile.__contains__, keys)
        self._persistent.update(zip(persistent, clock, strict=False))
        self._volatile.update(zip(filter(volatile.__contains__, keys), clock, strict=False))

    def record_volatile(self, key: bytes, volatile: bool) -> None:
        src, dst = (
            (self._persistent, self._volatile) if volatile else (self._volatile, self._persistent)
        )
        if key in dst:
            return
        if src.pop(key, None) is not None:
            self._holes += 1
        elif self._aged:
            entry = self._aged.get(key)
            if entry is not None and entry[3] == volatile:
                return  # the flag it has: a no-op
            self._pop_aged(key)
        dst[key] = next(_CLOCK)

    def record_remove(self, key: bytes) -> None:
        if self._persistent.pop(key, None) is not None or self._volatile.pop(key, None) is not None:
            self._holes += 1
        elif self._aged:
            self._pop_aged(key)

    def last_access(self, key: bytes) -> int | None:
        tick = self._persistent.get(key)
        if tick is None:
            tick = self._volatile.get(key)
            if tick is None and self._aged:
                entry = self._aged.get(key)
                tick = None if entry is None else entry[1]
        return tick

    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        _check_count(count)
        if not count:
            return []
        volatile = self._oldest(False, count) if self._volatile else []
        aged = self._aged
        if aged:
            volatile = list(
                itertools.islice(heapq.merge(self._oldest_aged(True, count), volatile), count)
            )
        if self.volatile_only:
            return volatile
        persistent = self._oldest(True, count) if self._persistent else []
        if aged:
            persistent = list(
                itertools.islice(heapq.merge(self._oldest_aged(False, count), persistent), count)
            )
        if not volatile:
            return persistent
        return list(itertools.islice(heapq.merge(persistent, volatile), count))

    def _oldest(self, persistent: bool, count: int) -> list[tuple[int, bytes]]:
        """The ``count`` oldest ``(tick, key)`` of one partition, oldest first."""
        order = self._persistent if persistent else self._volatile
        front = self._persistent_front if persistent else self._volatile_front
        get = order.get
        entries = front.entries
        n = len(entries)
        i = front.start
        while i < n and get(entries[i][0]) != entries[i][1]:
            i += 1
        front.start = i
        out: list[tuple[int, bytes]] = []
        while i < n:
            key, tick = entries[i]
            if get(key) == tick:
                out.append((tick, key))
                if len(out) == count:
                    return out
            i += 1
        if len(out) == len(order):
            return out  # every key of the partition
        # Too few left: scan the front again (rebuilding first when the scans
        # so far stepped over more holes than a rebuild would copy keys).
        self._scan_debt += self._holes
        if self._scan_debt > self.COPY_COST * (len(self) + self.COMPACT_SLACK):
            self._compact()
            order = self._persistent if persistent else self._volatile
        front.entries = entries = list(itertools.islice(order.items(), count + self.FRONT_SPARE))
        front.start = 0
        return [(tick, key) for key, tick in entries[:count]]

    def _compact(self) -> None:
        """Rebuild both partitions without holes (same keys, same order)."""
        self._persistent = dict(self._persistent)
        self._volatile = dict(self._volatile)
        self._holes = self._scan_debt = 0

    def clear(self) -> None:
        self._persistent.clear()
        self._volatile.clear()
        self._persistent_front = _Front()
        self._volatile_front = _Front()
        self._holes = self._scan_debt = 0
        self._aged.clear()
        self._aged_heaps = ([], [])

    def __len__(self) -> int:
        return len(self._persistent) + len(self._volatile) + len(self._aged)


class VolatileLRUPolicy(LRUPolicy):
    """LRU among keys that have a TTL only (Redis ``volatile-lru``)."""

    name = "volatile-lru"
    volatile_only = True


class FIFOPolicy(EvictionPolicy):
    """First in, first out: the oldest insertion goes first; score = insert tick.

    Design: one ``OrderedDict`` key -> insert tick, appended on insert and never
    reordered: accesses, overwrites and TTL changes leave the order alone.
    There is no ``volatile-fifo``: keeping a volatile sub-order at insertion
    positions would need an ordered insert, not O(1).

    Invariant: ticks increase from front to back.
    """

    name = "fifo"
    key_overhead = 125  # measured 103-133 B per key (10^4-10^6 keys)

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, int] = OrderedDict()

    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        if key not in self._order:
            self._order[key] = next(_CLOCK)

    def record_access(self, key: bytes) -> None:
        if key not in self._order:
            self._order[key] = next(_CLOCK)

    def record_volatile(self, key: bytes, volatile: bool) -> None:
        if key not in self._order:
            self._order[key] = next(_CLOCK)

    def record_remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        _check_count(count)
        return [(tick, key) for key, tick in itertools.islice(self._order.items(), count)]

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)


class _FreqBucket:
    """The keys touched exactly ``freq`` times: a node of LFU's bucket list.

    Each partition maps key -> tick of its last touch, in increasing tick order.
    """

    __slots__ = ("freq", "next", "persistent", "prev", "volatile")

    def __init__(self, freq: int, prev: _FreqBucket | None, next: _FreqBucket | None) -> None:
        self.freq = freq
        self.prev = prev
        self.next = next
        self.persistent: OrderedDict[bytes, int] = OrderedDict()
        self.volatile: OrderedDict[bytes, int] = OrderedDict()


class LFUPolicy(EvictionPolicy):
    """Exact least-frequently-used order, ties broken by least recent touch.

    Design: the O(1) LFU of Shah, Mitra and Matani (2010). A doubly linked list
    of frequency buckets in increasing ``freq``, only non-empty buckets linked;
    ``_where`` maps each key to its bucket. An access moves the key from bucket
    ``f`` to bucket ``f + 1``, which is ``f``'s successor or is created right
    after it, and unlinks ``f`` if it empties: O(1), no search. The head is the
    minimum frequency. Inside a bucket, keys sit in order of their last touch
    (two partitions, persistent and volatile, as in :class:`LRUPolicy`), so
    the walk from the head yields candidates in score order,
    ``score = freq << LFU_TICK_BITS | tick``.

    Frequencies count accesses in this shard since insertion (1 on insert, or
    what :meth:`record_frequency` set: RESTORE ... FREQ, 0 included) and
    never decay: a key that was hot long ago stays protected. Cost of
    ``candidates``: O(count) for ``lfu``; ``volatile-lfu`` also steps over
    buckets holding no volatile key, at most the number of distinct
    frequencies (which is below sqrt(2 * accesses)).

    Invariant: every tracked key is in exactly one partition of exactly one
    bucket, ``_where[key]`` is that bucket, and every linked bucket is
    non-empty, with ``freq`` strictly increasing from ``_head``.
    """

    name = "lfu"
    key_overhead = 170  # measured 132-186 B per key (10^4-10^6 keys)
    lfu = True
    keeps_access_ticks = True

    def __init__(self) -> None:
        self._head: _FreqBucket | None = None
        self._where: dict[bytes, _FreqBucket] = {}

    def _unlink_if_empty(self, bucket: _FreqBucket) -> None:
        if bucket.persistent or bucket.volatile:
            return
        if bucket.prev is None:
            self._head = bucket.next
        else:
            bucket.prev.next = bucket.next
        if bucket.next is not None:
            bucket.next.prev = bucket.prev

    def _insert_new(self, key: bytes, volatile: bool) -> None:
        head = self._head
        if head is not None and head.freq == 0:  # keys restored with FREQ 0 come first
            self._place(key, volatile, 1)
            return
        if head is None or head.freq != 1:
            head = _FreqBucket(1, None, head)
            if head.next is not None:
                head.next.prev = head
            self._head = head
        (head.volatile if volatile else head.persistent)[key] = next(_CLOCK)
        self._where[key] = head

    def _place(self, key: bytes, volatile: bool, freq: int) -> None:
        """Put untracked ``key`` in the bucket of ``freq``, linked in order if new.

        O(buckets before it): for the rare paths (RESTORE ... FREQ, and an
        insert while a bucket of 0 leads).
        """
        prev, bucket = None, self._head
        while bucket is not None and bucket.freq < freq:
            prev, bucket = bucket, bucket.next
        if bucket is None or bucket.freq != freq:
            bucket = _FreqBucket(freq, prev, bucket)
            if bucket.next is not None:
                bucket.next.prev = bucket
            if prev is None:
                self._head = bucket
            else:
                prev.next = bucket
        (bucket.volatile if volatile else bucket.persistent)[key] = next(_CLOCK)
        self._where[key] = bucket

    def record_frequency(self, key: bytes, freq: int, *, volatile: bool) -> None:
        # A new object to Redis: its count starts again, at ``freq``, touched now.
        self.record_remove(key)
        self._place(key, volatile, freq)

    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        if key in self._where:
            self.record_access(key)
            self.record_volatile(key, volatile)
        else:
            self._insert_new(key, volatile)

    def record_access(self, key: bytes) -> None:
        bucket = self._where.get(key)
        if bucket is None:
            self._insert_new(key, False)
            return
        volatile = key in bucket.volatile
        del (bucket.volatile if volatile else bucket.persistent)[key]
        succ = bucket.next
        if succ is None or succ.freq != bucket.freq + 1:
            succ = _FreqBucket(bucket.freq + 1, bucket, bucket.next)
            if bucket.next is not None:
                bucket.next.prev = succ
            bucket.next = succ
        (succ.volatile if volatile else succ.persistent)[key] = next(_CLOCK)
        self._where[key] = succ
        self._unlink_if_empty(bucket)

    def record_volatile(self, key: bytes, volatile: bool) -> None:
        bucket = self._where.get(key)
        if bucket is None:
            self._insert_new(key, volatile)
            return
        if volatile:
            src, dst = bucket.persistent, bucket.volatile
        else:
            src, dst = bucket.volatile, bucket.persistent
        if key in dst:
            return
        del src[key]
        dst[key] = next(_CLOCK)

    def record_remove(self, key: bytes) -> None:
        bucket = self._where.pop(key, None)
        if bucket is None:
            return
        if bucket.persistent.pop(key, None) is None:
            del bucket.volatile[key]
        self._unlink_if_empty(bucket)

    def last_access(self, key: bytes) -> int | None:
        bucket = self._where.get(key)
        if bucket is None:
            return None
        tick = bucket.persistent.get(key)
        return tick if tick is not None else bucket.volatile.get(key)

    def frequency(self, key: bytes) -> int | None:
        bucket = self._where.get(key)
        return None if bucket is None else bucket.freq

    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        _check_count(count)
        out: list[tuple[int, bytes]] = []
        bucket = self._head
        while bucket is not None and len(out) < count:
            persistent, volatile = bucket.persistent, bucket.volatile
            items: Iterable[tuple[bytes, int]]
            if self.volatile_only:
                items = volatile.items()
            elif not volatile:
                items = persistent.items()
            else:
                items = heapq.merge(persistent.items(), volatile.items(), key=_by_tick)
            base = bucket.freq << LFU_TICK_BITS
            wanted = count - len(out)
            out.extend((base | tick, key) for key, tick in itertools.islice(items, wanted))
            bucket = bucket.next
        return out

    def clear(self) -> None:
        self._head = None
        self._where.clear()

    def __len__(self) -> int:
        return len(self._where)


class VolatileLFUPolicy(LFUPolicy):
    """LFU among keys that have a TTL only (Redis ``volatile-lfu``)."""

    name = "volatile-lfu"
    volatile_only = True


class _IndexedSet:
    """A set with O(1) add, discard and access by position (for random choice).

    Invariant: ``self._index[k] == i`` if and only if ``self._keys[i] == k``.
    """

    __slots__ = ("_index", "_keys")

    def __init__(self) -> None:
        self._keys: list[bytes] = []
        self._index: dict[bytes, int] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> bytes:
        return self._keys[i]

    def add(self, key: bytes) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)

    def discard(self, key: bytes) -> bool:
        """Remove ``key`` if present (swap with the last, pop); return whether it was."""
        i = self._index.pop(key, None)
        if i is None:
            return False
        last = self._keys.pop()
        if last != key:
            self._keys[i] = last
            self._index[last] = i
        return True

    def clear(self) -> None:
        self._keys.clear()
        self._index.clear()


class RandomPolicy(EvictionPolicy):
    """Uniformly random victims; score = a fresh random number per candidate.

    Design: two indexed sets (persistent and volatile keys), each a list plus a
    key -> position map with swap-remove, so record_* is O(1) and
    ``candidates(count)`` draws ``count`` distinct positions with
    ``Random.sample`` over a ``range`` in O(count). Scores are independent
    uniform draws, so the manager's lowest-score pick across shards is uniform
    among the candidates it gathered (not among all keys: a small shard offers
    as many candidates as a big one).

    Invariant: every tracked key is in exactly one of the two sets.
    """

    name = "random"
    key_overhead = 83  # measured 65-88 B per key (10^4-10^6 keys)

    def __init__(self, rng: random.Random | None = None) -> None:
        """Start empty.

        Args:
            rng: the random source; seed it for reproducible victims. Default:
                a ``random.Random`` seeded from ``os.urandom``.
        """
        self._rng = rng if rng is not None else random.Random(os.urandom(32))
        self._persistent = _IndexedSet()
        self._volatile = _IndexedSet()

    @classmethod
    def create(cls, *, rng: random.Random | None = None) -> Self:
        return cls(rng)

    def record_insert(self, key: bytes, *, volatile: bool) -> None:
        self.record_volatile(key, volatile)

    def record_access(self, key: bytes) -> None:
        if key not in self._volatile:
            self._persistent.add(key)

    def record_volatile(self, key: bytes, volatile: bool) -> None:
        src, dst = (
            (self._persistent, self._volatile) if volatile else (self._volatile, self._persistent)
        )
        src.discard(key)
        dst.add(key)

    def record_remove(self, key: bytes) -> None:
        if not self._persistent.discard(key):
            self._volatile.discard(key)

    def candidates(self, count: int) -> list[tuple[int, bytes]]:
        _check_count(count)
        rng = self._rng
        volatile = self._volatile
        if self.volatile_only:
            picks = rng.sample(range(len(volatile)), min(count, len(volatile)))
            keys = [volatile[i] for i in picks]
        else:
            persistent = self._persistent
            n = len(persistent)
            total = n + len(volatile)
            picks = rng.sample(range(total), min(count, total))
            keys = [persistent[i] if i < n else volatile[i - n] for i in picks]
        return sorted((rng.getrandbits(RANDOM_SCORE_BITS), key) for key in keys)

    def clear(self) -> None:
        self._persistent.clear()
        self._volatile.clear()

    def __len__(self) -> int:
        return len(self._persistent) + len(self._volatile)


class VolatileRandomPolicy(RandomPolicy):
    """Random among keys that have a TTL only (Redis ``volatile-random``)."""

    name = "volatile-random"
    volatile_only = True


# --- Ticks back to times ----------------------------------------------------

# Design. Problem: ``OBJECT IDLETIME`` wants the seconds since a key's last
# touch, but a touch (GET, SET, MGET: ``record_access``) records only a tick
# of ``_CLOCK``, and reading a clock there would tax the hot path. Approach:
# each shard keeps a short list of *marks*, (tick, time) pairs taken at most
# once per MARK_INTERVAL by its periodic expiry sweep (``ExpireDue``, every
# ``ttl_tick``, 0.1 s by default), never by a touch. Ticks are unique and
# increase with time, so a key whose tick lies between two marks was touched
# between their times; its idle time is read as ``now`` minus the time of the
# last mark before its tick, i.e. rounded up to the mark spacing, as Redis's
# own LRU clock (1 s resolution) rounds it.
#
# Staleness tolerated: the answer can exceed the true idle time by the gap
# between two marks: MARK_INTERVAL plus one sweep period while the sweeps run
# (longer if they stop: the TTL manager is down or the shard's mailbox was
# full); it is never less, except for a tick older than the oldest mark (a
# key touched before the first sweep), which reads as idle since that mark.
#
# Memory: at most MAX_MARKS marks per shard. Past it, the interior mark whose
# removal adds the least *relative* error (the merged gap over the age of its
# newer end) goes, so the spacing grows with age, about geometrically: an
# idle time of days reads within about 7 % (5.8 % measured after 2.3 days of
# marks taken each second), a recent one within about a second.

MARK_INTERVAL = 1.0  # seconds; least spacing of marks (Redis's LRU clock resolution)
MAX_MARKS = 256  # marks kept per shard (two lists of this length)


class TickTimes:
    """When ticks of the shared clock were current: marks of (tick, time).

    Pure and synchronous; ``now`` is passed in (trio-monotonic seconds).

    Invariant: ``_ticks`` strictly increases, ``_times`` never decreases,
    both have the same length, at most :data:`MAX_MARKS`; a tick ``t`` with
    ``_ticks[i] < t < _ticks[i + 1]`` was taken between ``_times[i]`` and
    ``_times[i + 1]``.
    """

    __slots__ = ("_ticks", "_times")

    def __init__(self) -> None:
        self._ticks: list[int] = []
        self._times: list[float] = []

    def mark(self, now: float) -> bool:
        """Record that the clock's next tick is current at ``now`` (at most once per second).

        Returns:
            Whether a mark was added (False: the last one is under
            :data:`MARK_INTERVAL` old).
        """
        times = self._times
        if times and now - times[-1] < MARK_INTERVAL:
            return False
        self._ticks.append(next(_CLOCK))
        times.append(float(now))
        if len(times) > MAX_MARKS:
            self._thin(now)
        return True

    def _thin(self, now: float) -> None:
        """Drop the interior mark whose removal adds the least relative error.

        Ticks between marks ``i - 1`` and ``i + 1`` then read as of
        ``_times[i - 1]``: off by at most the merged gap, for keys idle at
        least ``now - _times[i + 1]``. O(MAX_MARKS), once per mark.
        """
        times = self._times
        best, best_cost = 1, float("inf")
        for i in range(1, len(times) - 1):
            cost = (times[i + 1] - times[i - 1]) / max(1.0, now - times[i + 1])
            if cost < best_cost:
                best, best_cost = i, cost
        del self._ticks[best]
        del times[best]

    def time_of(self, tick: int) -> float | None:
        """The time of the last mark taken before ``tick`` (the oldest mark if none was).

        Returns:
            A time no later than the touch that took ``tick`` (except for a
            tick older than every mark), or None when nothing was marked yet.
        """
        times = self._times
        if not times:
            return None
        i = bisect.bisect_left(self._ticks, tick)
        return times[i - 1] if i else times[0]

    def tick_at(self, when: float) -> int:
        """A tick for a touch at time ``when`` in the past (RESTORE ... IDLETIME).

        Returns:
            The tick of the last mark taken at or before ``when``: below the
            ticks of every touch after that mark, above those before it (so
            placed within one mark spacing of its time); 0, below every
            tick, when ``when`` is older than every mark.
        """
        i = bisect.bisect_right(self._times, when)
        return self._ticks[i - 1] if i else 0

    def consistent(self) -> bool:
        """Whether the invariant holds (checked before a restarted shard reuses it)."""
        ticks, times = self._ticks, self._times
        if not isinstance(ticks, list) or not isinstance(times, list):
            return False
        if len(ticks) != len(times) or len(ticks) > MAX_MARKS:
            return False
        if any(type(t) is not int for t in ticks) or any(type(t) is not float for t in times):
            return False
        return all(a < b for a, b in itertools.pairwise(ticks)) and all(
            a <= b for a, b in itertools.pairwise(times)
        )

    def __len__(self) -> int:
        return len(self._ticks)


# --- Registry -----------------------------------------------------------------

_REGISTRY: dict[str, type[EvictionPolicy]] = {}

# Redis spells the all-keys policies with a prefix; both spellings are accepted.
_ALIASES: dict[str, str] = {
    "allkeys-lru": "lru",
    "allkeys-lfu": "lfu",
    "allkeys-random": "random",
}

# Canonical names in registration order; grows with register_policy.
POLICY_NAMES: tuple[str, ...] = ()

_P = TypeVar("_P", bound=EvictionPolicy)


def register_policy(cls: type[_P]) -> type[_P]:
    """Make a policy class available to :func:`make_policy` under ``cls.name``.

    Usable as a class decorator. The engine needs no change to use it.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: the name is missing, not lowercase, or already taken
            (by a policy or an alias).
    """
    global POLICY_NAMES
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"eviction policy class {cls.__qualname__} has no name")
    if name != name.lower():
        raise ValueError(f"eviction policy name must be lowercase, got {name!r}")
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"eviction policy {name!r} is already registered")
    _REGISTRY[name] = cls
    POLICY_NAMES = (*POLICY_NAMES, name)
    return cls


for _cls in (
    LRUPolicy,
    LFUPolicy,
    FIFOPolicy,
    RandomPolicy,
    NoEvictionPolicy,
    VolatileLRUPolicy,
    VolatileLFUPolicy,
    VolatileRandomPolicy,
):
    register_policy(_cls)
del _cls


def make_policy(name: str, *, rng: random.Random | None = None) -> EvictionPolicy:
    """Build a fresh policy instance (one per shard) by name.

    Args:
        name: a name of ``POLICY_NAMES`` or a Redis alias (``allkeys-lru``,
            ``allkeys-lfu``, ``allkeys-random``), case-insensitive.
        rng: random source for the random policies (seed it for reproducible
            victims); ignored by the others.

    Raises:
        ValueError: the name is unknown.
    """
    wanted = name.lower()
    cls = _REGISTRY.get(_ALIASES.get(wanted, wanted))
    if cls is None:
        aliases = ", ".join(_ALIASES)
        raise ValueError(
            f"unknown eviction policy {name!r}; expected one of {', '.join(POLICY_NAMES)}"
            f" (or Redis's {aliases})"
        )
    return cls.create(rng=rng)
