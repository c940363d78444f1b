"""The data of one shard: a pure, synchronous core (no trio, no actors).

Design: lean per-entry metadata, as ARCHITECTURE.md's measured costs ask.
Values live in one plain dict ``data`` (key → value bytes); expiry times only
for keys that have one, in ``expires`` (key → trio-monotonic seconds), as
Redis keeps its ``expires`` dict; eviction order in the policy. Entry sizes
are not stored: :meth:`ShardStore.entry_size` recomputes them from the key,
the value and the policy's bookkeeping per key, so adding and removing always
agree.

Every method that changes state runs without a checkpoint (the shard actor
calls them from its message handler), so a mutation is atomic with respect to
cancellation: it happens whole or not at all.

Invariants (checked by :meth:`ShardStore.check_invariants`):
- every key in ``expires`` is in ``data``;
- ``TTLIndex`` holds exactly one entry ``(expires[k], k)`` per key with an
  expiry (after reconciliation; between, it may hold stale entries and the
  entry in ``expires`` decides);
- ``used`` equals the sum of entry sizes, and equals the tracker's usage for
  this shard;
- the policy tracks exactly the keys of ``data`` (``noeviction`` tracks none);
- ``tick_times`` is consistent (see ``TickTimes``): its marks turn the
  policy's ticks back into times for ``OBJECT IDLETIME``; the periodic expiry
  sweep adds them (:meth:`ShardStore.mark_time`), never a read or a write.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import random
import time
import zlib
from collections.abc import Iterable, Iterator

import attrs

from ..errors import OutOfMemoryError
from ..eviction.memory import ENTRY_BASE, ROUND_UP, MemoryTracker, entries_size
from ..eviction.memory import entry_size as _entry_size
from ..eviction.policies import EvictionPolicy, NoEvictionPolicy, TickTimes
from ..expiry.ttl_index import TTLIndex
from ..persistence.records import encode_set
from .durability import Journal, ShardDurability, record_too_large

SCAN_SNAPSHOTS = 64  # open SCAN iterations remembered per shard, by default (see scan)
# A SCAN position on one shard is (tag, field), see ShardStore.scan. Tags:
SCAN_TAG_BITS = 18  # bits of a tag (the cursor's top bits)
SCAN_FIELD_BITS = 32  # bits of a field: a snapshot offset, or a hash-order start
SCAN_BEGIN = 0  # tag: begin this shard (field 0)
SCAN_HASH_ORDER = 1  # tag: stateless hash order, field = the next hash to return (>= 1)
# Every other tag names a snapshot: ``id << 1 | retaken`` with id in 1.._SCAN_IDS.
_SCAN_IDS = (1 << (SCAN_TAG_BITS - 1)) - 1
SCAN_HASH_STEPS = 16  # most calls a shard takes in hash order: each covers >= 1/16 of it
_HASH_END = 1 << 32  # crc32 values are below this
_SCAN_ID_SOURCE = random.Random()  # seeded from the OS: first ids differ between runs
# Versions of watched keys, process-wide and only ever growing: a version a
# watcher saw is never given again, even to an entry made anew (its last
# watcher left, or the store was rebuilt), so no write can go unseen.
_WATCH_VERSIONS = itertools.count(1)
_first = operator.itemgetter(0)


class PutPlan:
    """What :meth:`ShardStore.plan_put_many` saw of some pairs, for :meth:`ShardStore.put_many`.

    ``delta``: the bytes the pairs add (:meth:`ShardStore.put_delta`).
    ``olds``: the value each key held (None: absent), when every key is
    distinct and none has an expiry, so that the writes need no lookup of
    their own; else None. Valid while nothing else ran on the store.
    """

    __slots__ = ("delta", "keys", "olds")

    def __init__(self, delta: int, keys: list[bytes], olds: list[bytes | None] | None) -> None:
        self.delta = delta
        self.keys = keys
        self.olds = olds


class NeedMemory(OutOfMemoryError):
    """A write needs ``nbytes`` the tracker refused; nothing was changed.

    The engine answers it by waking eviction and retrying once; only then
    does the caller see ``OOM``.
    """

    def __init__(self, nbytes: int) -> None:
        super().__init__("command not allowed when used memory > 'maxmemory'", needed=nbytes)
        self.nbytes = nbytes


class ShardStore:
    """The entries of one shard and their bookkeeping.

    Args:
        shard_id: this shard's number (its row in the tracker).
        policy: the shard's eviction policy (owned by this store from now on).
        tracker: the store-wide memory tracker (shared, synchronous).
        scan_snapshots: open SCAN iterations remembered (see :meth:`scan`).
        started_at: Unix time this shard's data began (``LASTSAVE``'s answer
            before any snapshot, as Redis counts its data saved at start);
            default: now. A repaired store keeps its predecessor's.
    """

    def __init__(
        self,
        shard_id: int,
        policy: EvictionPolicy,
        tracker: MemoryTracker,
        *,
        scan_snapshots: int = SCAN_SNAPSHOTS,
        started_at: float | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.started_at = time.time() if started_at is None else started_at
        self.scan_snapshots = scan_snapshots
        self.policy = policy
        self._key_overhead = policy.key_overhead
        self.tracker = tracker
        self.data: dict[bytes, bytes] = {}
        self.expires: dict[bytes, float] = {}
        self.ttl_index = TTLIndex()
        self.used = 0
        self.expired_count = 0  # keys removed because they expired (lazily or actively)
        self.evicted_count = 0
        self._scans: collections.OrderedDict[int, _ScanSnapshot] = collections.OrderedDict()
        self._next_scan = _SCAN_ID_SOURCE.randint(1, _SCAN_IDS)  # see _open_scan
        # Persistence (None when off): effects of writes are journalled here.
        self.durability: ShardDurability | None = None
        self.journal: Journal | None = None
        self.needs_recovery = False  # set by a rebuild that must reload from disk
        # WATCH: key -> [watchers, version], for watched keys only (see watch()).
        self._watched: dict[bytes, list[int]] = {}
        # When the policy's ticks were current (OBJECT IDLETIME; see mark_time).
        self.tick_times = TickTimes()

    def entry_size(self, key: bytes, value: bytes, *, has_ttl: bool = False) -> int:
        """Estimated bytes of one entry of this store, its policy's bookkeeping included."""
        return _entry_size(key, value, has_ttl=has_ttl) + self._key_overhead

    def entry_size_of(self, key: bytes, value_length: int) -> int:
        """:meth:`entry_size` of ``key`` with a value of ``value_length`` bytes, no TTL."""
        return (
            ENTRY_BASE
            + self._key_overhead
            + ((len(key) + ROUND_UP) & ~15)
            + ((value_length + ROUND_UP) & ~15)
        )

    # -- reading --------------------------------------------------------------------

    def _expired(self, key: bytes, now: float) -> bool:
        """Remove ``key`` if it is past its expiry; True if it was."""
        exp = self.expires.get(key)
        if exp is not None and exp <= now:
            self._remove(key)
            self.expired_count += 1
            return True
        return False

    def get(self, key: bytes, now: float) -> bytes | None:
        """The live value of ``key`` (touching it for eviction), or None."""
        value = self.data.get(key)
        if value is None or (key in self.expires and self._expired(key, now)):
            return None
        self.policy.record_access(key)
        return value

    def get_many(self, keys: Iterable[bytes], now: float) -> list[bytes | None]:
        """The live value of each of ``keys``, in order (None where missing): MGET's read.

        Exactly :meth:`get` called once per key, in order, in one synchronous
        step (atomic with respect to cancellation), without a method call per
        key: a key past its expiry is removed (and counted in
        ``expired_count``) and gives None; a live key's access is recorded
        with the policy, once per occurrence, in order. Watched keys and the
        journal see what :meth:`get` would show them: only the removals.

        Args:
            keys: the keys, in the order wanted (duplicates allowed); iterated once.
            now: trio-monotonic seconds, for expiry.

        Returns:
            One entry per key: its value, or None.
        """
        # Bound once: _expired mutates ``expires`` in place (never rebinds it),
        # and nothing here switches the policy.
        data_get = self.data.get
        expires = self.expires
        record_access = self.policy.record_access
        values: list[bytes | None] = []
        append = values.append
        for key in keys:
            value = data_get(key)
            if value is not None:
                if key in expires and self._expired(key, now):
                    value = None
                else:
                    record_access(key)
            append(value)
        return values

    def peek(self, key: bytes, now: float) -> bytes | None:
        """Like :meth:`get` but without touching the eviction order."""
        value = self.data.get(key)
        if value is None or (key in self.expires and self._expired(key, now)):
            return None
        return value

    def entry_bytes(self, key: bytes, now: float) -> int | None:
        """The bytes tracked for live ``key`` (``MEMORY USAGE``), or None if it is missing.

        Exactly what the key adds to ``used`` and to the tracker: its
        :meth:`entry_size`, the policy's bookkeeping and any TTL included.
        Read only, like :meth:`peek` (an entry past its expiry is removed).
        """
        value = self.peek(key, now)
        if value is None:
            return None
        return self.entry_size(key, value, has_ttl=key in self.expires)

    def mark_time(self, now: float) -> None:
        """Mark the policy clock's present tick as current at ``now`` (at most once a second).

        Called by the periodic expiry sweep (the shard's ``ExpireDue``), so that
        ``OBJECT IDLETIME`` can turn a key's last-touch tick back into a time
        while no read or write ever reads a clock (see ``TickTimes``).
        """
        self.tick_times.mark(now)

    def contains(self, key: bytes, now: float) -> bool:
        """Whether ``key`` is live."""
        return self.peek(key, now) is not None

    def expiry_of(self, key: bytes) -> float | None:
        """The expiry of a live key (call after a read that checked liveness)."""
        return self.expires.get(key)

    def live_count(self, now: float) -> int:
        """Live keys: all keys minus those past their expiry not yet removed."""
        stale = sum(1 for t in self.expires.values() if t <= now)
        return len(self.data) - stale

    def volatile_count(self, now: float) -> int:
        """Live keys that have an expiry."""
        return sum(1 for t in self.expires.values() if t > now)

    def live_keys(self, now: float) -> Iterator[bytes]:
        """Every live key (a snapshot list is taken first; safe to mutate after)."""
        expires = self.expires
        for key in list(self.data):
            exp = expires.get(key)
            if exp is None or exp > now:
                yield key

    # -- writing ----------------------------------------------------------------------

    def put(
        self,
        key: bytes,
        value: bytes,
        now: float,
        *,
        expires_at: float | None,
        keep_ttl: bool = False,
        charge: bool = True,
        edit: tuple[int, bytes] | None = None,
    ) -> None:
        """Store ``value`` under ``key``, replacing any old entry.

        Args:
            expires_at: the new expiry (trio-monotonic seconds) or None for none.
            keep_ttl: keep the old entry's expiry instead (``expires_at`` ignored).
            charge: reserve the bytes with the tracker; False when the caller
                already reserved exactly :meth:`put_delta` for this write.
            edit: ``(offset, data)``, with ``keep_ttl``: ``value`` is the live
                value's bytes from ``offset`` replaced with ``data`` (the value
                zero-filled up to ``offset`` first if shorter; with no live
                value, of an empty one). The journal may then hold the edit
                instead of the value (a PATCH, see :meth:`Journal.edit_record`).
                The caller vouches for the equation.

        Raises:
            NeedMemory: the tracker refused the extra bytes; nothing changed.
        """
        old = self.data.get(key)
        old_exp = self.expires.get(key)
        if old is not None and old_exp is not None and old_exp <= now:
            # An expired entry is not an old value: it goes first (no KEEPTTL of it).
            self._remove(key)
            self.expired_count += 1
            old, old_exp = None, None
        if keep_ttl:
            expires_at = old_exp
        # Encoded before anything changes: a record the log cannot hold refuses
        # the write (TooLargeError) instead of failing half-way through it.
        journal = self.journal
        base = False  # the record is a base SET or a PATCH (see Journal.bases)
        if journal is None:
            record = b""
        elif edit is not None and keep_ttl:
            record, base = journal.edit_record(key, value, expires_at, edit[0], edit[1], old)
        else:
            record = journal.set_record(key, value, expires_at)
        # The policy's bookkeeping per key (entry_size) cancels out on an overwrite.
        delta = _entry_size(key, value, has_ttl=expires_at is not None)
        if old is not None:
            delta -= _entry_size(key, old, has_ttl=old_exp is not None)
        else:
            delta += self._key_overhead
        if charge and not self.tracker.try_reserve(self.shard_id, delta):
            raise NeedMemory(delta)
        self.used += delta
        self.data[key] = value
        if self._watched:
            self._touch(key)
        if old is None:
            self.policy.record_insert(key, volatile=expires_at is not None)
        else:
            self.policy.record_access(key)
            if (old_exp is None) != (expires_at is None):
                self.policy.record_volatile(key, expires_at is not None)
        if old_exp != expires_at:
            if old_exp is not None:
                self.ttl_index.discard(key, old_exp)
                del self.expires[key]
            if expires_at is not None:
                self.expires[key] = expires_at
                self.ttl_index.add(key, expires_at)
        if journal is not None:
            journal.records.append(record)
            if base or journal.bases:
                journal.wrote(key, value, record, base)

    def put_plain(self, key: bytes, value: bytes, now: float) -> None:
        """:meth:`put` without expiry, charged: the plain SET, the commonest write.

        A key with no expiry entry takes an inlined path (put's expiry
        branches and two entry_size calls were a sixth of a pipelined SET's
        shard time); any other key goes through :meth:`put`, so the two agree
        by construction (a property test holds them equal).

        Raises:
            NeedMemory: the tracker refused the extra bytes; nothing changed.
        """
        if self.expires and key in self.expires:
            self.put(key, value, now, expires_at=None)
            return
        journal = self.journal
        if journal is None:
            record = b""
        else:  # journal.set_record(key, value, None), inlined
            try:
                record = encode_set(key, value)
            except ValueError as exc:
                raise record_too_large(exc) from None
        old = self.data.get(key)
        if old is None:
            delta = (
                ENTRY_BASE
                + self._key_overhead
                + ((len(key) + ROUND_UP) & ~15)
                + ((len(value) + ROUND_UP) & ~15)
            )
        else:
            delta = ((len(value) + ROUND_UP) & ~15) - ((len(old) + ROUND_UP) & ~15)
        if not self.tracker.try_reserve(self.shard_id, delta):
            raise NeedMemory(delta)
        self.used += delta
        self.data[key] = value
        if self._watched:
            self._touch(key)
        if old is None:
            self.policy.record_insert(key, volatile=False)
        else:
            self.policy.record_access(key)
        if journal is not None:
            journal.records.append(record)
            if journal.bases:
                journal.bases.pop(key, None)  # journal.forget(key), inlined

    def put_delta(self, items: list[tuple[bytes, bytes]], now: float) -> int:
        """Bytes that :meth:`put_many` of ``items`` (without expiry) would add.

        Hot path of MSET's prepare: :func:`entry_size` is inlined (one call
        fewer per key); :meth:`check_invariants` and the store tests hold it
        to the same sizes as :meth:`put`.
        """
        data = self.data
        expires = self.expires
        overhead = self._key_overhead + ENTRY_BASE
        pending: dict[bytes, int] = {}
        delta = 0
        for key, value in items:
            old_size = pending.get(key)
            if old_size is None:
                old = data.get(key)
                if old is None:
                    old_size = 0
                else:
                    exp = expires.get(key) if expires else None
                    if exp is None:
                        old_size = (
                            overhead + ((len(key) + ROUND_UP) & ~15) + ((len(old) + ROUND_UP) & ~15)
                        )
                    elif exp <= now:
                        old_size = 0  # expired: put_many removes it first
                    else:
                        old_size = self.entry_size(key, old, has_ttl=True)
            new_size = overhead + ((len(key) + ROUND_UP) & ~15) + ((len(value) + ROUND_UP) & ~15)
            delta += new_size - old_size
            pending[key] = new_size
        return delta

    def plan_put_many(self, items: list[tuple[bytes, bytes]], now: float) -> PutPlan:
        """:meth:`put_delta` of ``items``, with the old values :meth:`put_many` then uses.

        MSET's prepare (the shard then holds until its commit): one lookup
        per key, here, instead of one here and one in the commit. Pairs
        whose keys repeat, or where a key has an expiry (live or past), take
        :meth:`put_delta` and the commit's own lookups (``olds`` None).
        """
        keys = list(map(_first, items))
        expires = self.expires
        if len(set(keys)) != len(keys) or (expires and any(map(expires.__contains__, keys))):
            return PutPlan(self.put_delta(items, now), keys, None)
        olds = list(map(self.data.get, keys))
        new_overhead = self._key_overhead + ENTRY_BASE
        delta = 0
        for (key, value), old in zip(items, olds, strict=True):
            if old is None:
                delta += (
                    new_overhead + ((len(key) + ROUND_UP) & ~15) + ((len(value) + ROUND_UP) & ~15)
                )
            else:
                delta += ((len(value) + ROUND_UP) & ~15) - ((len(old) + ROUND_UP) & ~15)
        return PutPlan(delta, keys, olds)

    @contextlib.contextmanager
    def one_record(self) -> Iterator[None]:
        """Journal what the block writes as one ``GROUP`` record (see ``Journal.group_since``).

        For the effects of one command, so that a torn write brings back all
        or none of them. The block must have no checkpoint (nothing else may
        journal meanwhile); if it raises, what it journalled stays as it is.
        """
        journal = self.journal
        if journal is None:
            yield
            return
        mark = len(journal.records)
        # No PATCH in a GROUP (see kvmemo.persistence.records.Chains): the
        # block's edits are journalled whole.
        whole, journal.whole = journal.whole, True
        try:
            yield
        finally:
            journal.whole = whole
        journal.group_since(mark)

    def put_many(
        self,
        items: list[tuple[bytes, bytes]],
        now: float,
        encoded: bytes | None = None,
        plan: PutPlan | None = None,
    ) -> None:
        """:meth:`put` each pair in order, without expiry, the bytes reserved already.

        The caller reserved exactly :meth:`put_delta` of ``items`` at ``now``
        with the tracker (MSET's prepare), and nothing ran on this store since.
        A key without an expiry, the common case, takes an inlined path (MSET
        of 10 keys spent half its shard time in per-key calls); any other key
        goes through :meth:`put`, so the two agree by construction.

        Several pairs are journalled as one ``GROUP`` record
        (:meth:`Journal.set_many`), so a crash never leaves part of them in
        the log. ``encoded``: the pairs already encoded as log records, in
        order (a multi-shard MSET's intent made them), used instead of
        encoding each pair again. ``plan``: what :meth:`plan_put_many` of
        ``items`` saw, nothing having run on this store since; with its old
        values the pairs are written with one ``dict.update``, and the
        policy is told of each key in order, as the one-by-one path does.
        """
        own = self.journal
        if own is not None and (encoded is not None or len(items) > 1):
            self.journal = None  # no checkpoint until it is back
            try:
                self.put_many(items, now, plan=plan)
            finally:
                self.journal = own
            own.set_many(items, encoded)
            if own.bases:
                for key, _ in items:
                    own.bases.pop(key, None)  # a grouped SET is no PATCH's base
            return
        if plan is not None and plan.olds is not None and own is None:
            self.data.update(items)
            keys = plan.keys
            watched = self._watched
            if watched:
                for key in keys:
                    if key in watched:
                        self._touch(key)
            self.policy.record_writes(keys, plan.olds)
            self.used += plan.delta
            return
        data = self.data
        expires = self.expires
        record_insert = self.policy.record_insert
        record_access = self.policy.record_access
        journal = self.journal
        watched = self._watched
        new_overhead = self._key_overhead + ENTRY_BASE
        delta = 0
        for key, value in items:
            if expires and key in expires:
                self.used += delta
                delta = 0
                self.put(key, value, now, expires_at=None, charge=False)
                continue
            old = data.get(key)
            data[key] = value
            if watched and key in watched:
                self._touch(key)
            if old is None:
                delta += (
                    new_overhead + ((len(key) + ROUND_UP) & ~15) + ((len(value) + ROUND_UP) & ~15)
                )
                record_insert(key, volatile=False)
            else:
                delta += ((len(value) + ROUND_UP) & ~15) - ((len(old) + ROUND_UP) & ~15)
                record_access(key)
            if journal is not None:
                journal.set(key, value, None)
                journal.forget(key)
        self.used += delta

    def peek_raw(self, key: bytes, now: float) -> bytes | None:
        """The live value of ``key`` without removing an expired entry."""
        value = self.data.get(key)
        if value is None:
            return None
        exp = self.expires.get(key)
        if exp is not None and exp <= now:
            return None
        return value

    def set_expiry(self, key: bytes, expires_at: float | None) -> bool:
        """Give a live ``key`` a new expiry (None removes it).

        Redis never refuses the commands that call it for memory (EXPIRE and
        its kin, GETEX, PERSIST: not ``denyoom``): a key's first expiry costs
        ``TTL_OVERHEAD`` bytes, granted past ``maxmemory`` within the
        tracker's overdraft (:meth:`MemoryTracker.overdraw`: one
        maximum-size entry). Refusing it at the limit would keep for ever a
        key its client meant to free; granted, the bytes come back when the
        key expires.

        Raises:
            NeedMemory: the overdraft is spent too; nothing changed.
        """
        value = self.data[key]
        old_exp = self.expires.get(key)
        if old_exp == expires_at:
            return False
        if (old_exp is None) != (expires_at is None):
            delta = self.entry_size(key, value, has_ttl=expires_at is not None) - self.entry_size(
                key, value, has_ttl=old_exp is not None
            )
            if delta > 0:
                if not self.tracker.overdraw(self.shard_id, delta):
                    raise NeedMemory(delta)
            else:
                self.tracker.release(self.shard_id, -delta)
            self.used += delta
            self.policy.record_volatile(key, expires_at is not None)
        if old_exp is not None:
            self.ttl_index.discard(key, old_exp)
            del self.expires[key]
        if expires_at is not None:
            self.expires[key] = expires_at
            self.ttl_index.add(key, expires_at)
        if self._watched:
            self._touch(key)
        journal = self.journal
        if journal is not None:
            journal.expire(key, expires_at)
        return True

    def delete(self, key: bytes, now: float) -> bool:
        """Remove ``key``; True if a live key was removed."""
        if key not in self.data:
            return False
        if self._expired(key, now):
            return False
        self._remove(key)
        journal = self.journal
        if journal is not None:
            journal.delete(key)
        return True

    def _remove(self, key: bytes) -> int:
        """Remove an entry that is present, live or not; return the bytes freed."""
        value = self.data.pop(key)
        exp = self.expires.pop(key, None)
        if exp is not None:
            self.ttl_index.discard(key, exp)
        journal = self.journal
        if journal is not None and journal.bases:
            journal.bases.pop(key, None)  # journal.forget(key), inlined
        size = self.entry_size(key, value, has_ttl=exp is not None)
        self.used -= size
        self.tracker.release(self.shard_id, size)
        self.policy.record_remove(key)
        if self._watched:
            self._touch(key)
        return size

    # -- WATCH -----------------------------------------------------------------------

    def watch(self, key: bytes) -> int:
        """Watch ``key`` for one more watcher; its version now.

        A watched key gets a new version with every change to it (a write, a
        delete, an expiry, an eviction, a flush), as Redis's WATCH sees
        them; versions are unique in the process, so a version seen once
        means "unchanged" only while the entry lives. Each ``watch`` needs
        one :meth:`unwatch`; the entry is kept while anyone watches.
        """
        entry = self._watched.get(key)
        if entry is None:
            self._watched[key] = entry = [0, next(_WATCH_VERSIONS)]
        entry[0] += 1
        return entry[1]

    def unwatch(self, key: bytes) -> None:
        """One watcher of ``key`` fewer (a key not watched is ignored)."""
        entry = self._watched.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._watched[key]

    def watch_count(self, key: bytes) -> int | None:
        """The version of a watched ``key``, or None when nobody watches it."""
        entry = self._watched.get(key)
        return None if entry is None else entry[1]

    @property
    def watched_keys(self) -> int:
        """How many keys are watched (for ``info``)."""
        return len(self._watched)

    def _touch(self, key: bytes) -> None:
        entry = self._watched.get(key)
        if entry is not None:
            entry[1] = next(_WATCH_VERSIONS)

    def _touch_all(self) -> None:
        for entry in self._watched.values():
            entry[1] = next(_WATCH_VERSIONS)

    def flush(self) -> int:
        """Remove every entry; return how many there were."""
        count = len(self.data)
        self.data.clear()
        self.expires.clear()
        self.ttl_index.clear()
        self.policy.clear()
        self.tracker.release(self.shard_id, self.used)
        self.used = 0
        self._scans.clear()
        self._touch_all()
        journal = self.journal
        if journal is not None:
            journal.flush()
            journal.bases.clear()
        return count

    # -- expiry and eviction -------------------------------------------------------------

    def expire_due(self, now: float, budget: int) -> tuple[int, bool]:
        """Remove up to ``budget`` keys whose expiry has passed.

        The index is only a schedule: a popped key is removed only if its
        entry really is past its expiry (the entry is the source of truth).

        Returns:
            (keys removed, whether more are due: a backlog for the next tick).
        """
        removed = 0
        for key in self.ttl_index.pop_due(now, budget):
            exp = self.expires.get(key)
            if exp is not None and exp <= now:
                # _remove also drops the real index entry (the popped pair may
                # have been a stale one).
                self._remove(key)
                removed += 1
        self.expired_count += removed
        return removed, self.ttl_index.due_count(now) > 0

    def eviction_candidates(self, count: int) -> list[tuple[int, bytes, int]]:
        """The policy's best ``count`` victims as (score, key, bytes it would free)."""
        out = []
        for score, key in self.policy.candidates(count):
            value = self.data.get(key)
            if value is not None:
                out.append((score, key, self.entry_size(key, value, has_ttl=key in self.expires)))
        return out

    def evict(self, keys: list[bytes]) -> tuple[int, int]:
        """Evict the given keys that are still present; return (keys, bytes) freed.

        Only keys the current policy may evict go: victims picked under an
        earlier policy (the policy was switched between the choice and the
        eviction) are skipped when the policy now is ``noeviction``, or a
        ``volatile-*`` one and the key has no TTL.
        """
        policy = self.policy
        if isinstance(policy, NoEvictionPolicy):
            return 0, 0
        volatile_only = policy.volatile_only
        expires = self.expires
        count = freed = 0
        journal = self.journal
        for key in keys:
            if key in self.data and (not volatile_only or key in expires):
                freed += self._remove(key)
                count += 1
                if journal is not None:
                    journal.delete(key)
        self.evicted_count += count
        return count, freed

    # -- iteration ------------------------------------------------------------------------

    # SCAN design. Problem: a cursor must lead every iteration to its end,
    # returning each key present for its whole run at least once, however many
    # clients scan at once and whatever is written meanwhile, in bounded memory
    # and without a long pause of the shard. Approach, per shard:
    #
    # - Fast path: the first call takes a snapshot of the key list (a C-speed
    #   copy) and later calls walk it by offset, COUNT keys a call. Position
    #   (tag, field) = (the snapshot's tag, the offset it expects next).
    # - At most ``scan_snapshots`` snapshots live; a new one pushes out the
    #   least recently continued. A call whose snapshot is gone (pushed out,
    #   the shard rebuilt, the server restarted, or the cursor replayed: the
    #   offset must be the one the snapshot expects) takes a fresh one *once*
    #   and starts this shard over (keys repeat, none is missed); its tag
    #   records that it did (``retaken``).
    # - Pushed out a second time, it goes on in stateless *hash order*: each
    #   call returns the live keys whose ``zlib.crc32`` lies in
    #   [field, field + stride), field starting at 0, and the cursor carries
    #   the next start. The stride is sized to return about
    #   max(COUNT, keys / SCAN_HASH_STEPS) keys, so it is at least 2**32 /
    #   SCAN_HASH_STEPS: at most SCAN_HASH_STEPS calls per shard, whatever the
    #   writes or the hash spread. A range never splits keys of equal hash,
    #   and crc32 does not depend on PYTHONHASHSEED, so such a cursor needs no
    #   state at all and survives restarts. Each such call costs O(shard keys).
    #
    # So an iteration makes at most (snapshot length / COUNT + 1) calls twice,
    # plus SCAN_HASH_STEPS, per shard; no scanner can keep another from ending.
    # Memory: snapshots hold 8 bytes per key, at most scan_snapshots of them.

    def scan(
        self, scan_id: int, offset: int, count: int, now: float
    ) -> tuple[int, int, list[bytes]]:
        """Continue (or, with ``scan_id`` :data:`SCAN_BEGIN`, begin) a SCAN of this shard.

        Every key present for the whole iteration is returned at least once;
        keys no longer live are skipped. See the design comment above for how
        a position is continued when its snapshot is gone. Runs without a
        checkpoint (the shard's state changes atomically).

        Args:
            scan_id: the position's tag (:data:`SCAN_BEGIN`,
                :data:`SCAN_HASH_ORDER`, or one this method returned).
            offset: the position's field (0 with :data:`SCAN_BEGIN`).
            count: keys wanted (a hint, >= 1): a snapshot call returns at most
                this many, a hash-order call about max(count, keys /
                :data:`SCAN_HASH_STEPS`).
            now: the current time (expired keys are not returned).

        Returns:
            (tag, field, keys) of the next position; field 0 when this shard
            is done. A snapshot position whose snapshot is gone, or expects
            another offset, starts this shard over (or goes on in hash
            order): keys repeat, none is missed. A stale cursor (from before
            a restart, or left unfinished while 2**17 newer snapshots were
            opened on this shard, so that its id is in use again) could, by a
            rare chance, name a live snapshot at the very offset it expects,
            and walk it from there (see :meth:`_open_scan`).
        """
        if scan_id == SCAN_HASH_ORDER:
            return self._scan_hash_order(offset, count, now)
        retaken = False
        snapshot = self._scans.get(scan_id) if scan_id > SCAN_HASH_ORDER else None
        if snapshot is not None and snapshot.offset == offset:
            self._scans.move_to_end(scan_id)
        else:
            if scan_id > SCAN_HASH_ORDER:
                # Its snapshot is gone (or this cursor is not the one it expects).
                if scan_id & 1:
                    return self._scan_hash_order(0, count, now)  # gone a second time
                retaken = True
            if len(self.data) >= 1 << SCAN_FIELD_BITS:
                return self._scan_hash_order(0, count, now)  # offsets would not fit
            scan_id = self._open_scan(retaken)
            snapshot = _ScanSnapshot(list(self.data))
            self._scans[scan_id] = snapshot
        walked = snapshot.keys
        start = snapshot.offset
        end = min(len(walked), start + max(count, 1))
        keys = [k for k in walked[start:end] if self.contains(k, now)]
        if end >= len(walked):
            del self._scans[scan_id]
            return scan_id, 0, keys
        snapshot.offset = end
        return scan_id, end, keys

    def _open_scan(self, retaken: bool) -> int:
        """Make room for one more snapshot and return a tag no live snapshot has.

        Ids count up from a random start (so a cursor from before a restart
        is unlikely to name a new snapshot; if it does, the offset check of
        :meth:`scan` usually tells). The number of live snapshots stays below
        the number of ids, so a free one is always found.
        """
        scans = self._scans
        while len(scans) >= min(self.scan_snapshots, _SCAN_IDS - 1):
            scans.popitem(last=False)
        ident = self._next_scan
        while ident << 1 in scans or ident << 1 | 1 in scans:
            ident = ident % _SCAN_IDS + 1
        self._next_scan = ident % _SCAN_IDS + 1
        return ident << 1 | retaken

    def _scan_hash_order(self, start: int, count: int, now: float) -> tuple[int, int, list[bytes]]:
        """One stateless hash-order call: live keys with crc32 in [start, stop).

        The stride makes the call return about max(count, keys /
        SCAN_HASH_STEPS) keys if the hashes are spread evenly, and is never
        below 2**32 / SCAN_HASH_STEPS. O(keys of this shard).
        """
        n = len(self.data)
        want = max(count, 1, -(-n // SCAN_HASH_STEPS))
        stop = _HASH_END if want >= n else min(_HASH_END, start + -(-(want << 32) // n))
        crc32 = zlib.crc32
        found = [k for k in self.data if start <= crc32(k) < stop]
        keys = [k for k in found if self.contains(k, now)]
        return SCAN_HASH_ORDER, (0 if stop >= _HASH_END else stop), keys

    def scan_snapshot_keys(self) -> int:
        """Key references held by the open SCAN snapshots of this shard."""
        return sum(len(s.keys) for s in self._scans.values())

    # -- integrity --------------------------------------------------------------------------

    def check_invariants(self) -> bool:
        """Whether the state can be trusted (run before a restart reuses it)."""
        data, expires = self.data, self.expires
        if not isinstance(data, dict) or not isinstance(expires, dict):
            return False
        total = 0
        for key, value in data.items():
            if type(key) is not bytes or type(value) is not bytes:
                return False
            total += self.entry_size(key, value, has_ttl=key in expires)
        if total != self.used or self.tracker.shard_used(self.shard_id) != self.used:
            return False
        if any(key not in data or type(t) is not float for key, t in expires.items()):
            return False
        if len(self.policy) != len(data) and not isinstance(self.policy, NoEvictionPolicy):
            return False  # noeviction tracks no key at all
        if not isinstance(self.tick_times, TickTimes) or not self.tick_times.consistent():
            return False
        return self.ttl_index_consistent()

    def ttl_index_consistent(self) -> bool:
        """Whether the TTL index holds exactly one entry per key with an expiry."""
        if len(self.ttl_index) != len(self.expires):
            return False
        return all((t, k) in self.ttl_index for k, t in self.expires.items())

    def reconcile_ttl_index(self) -> bool:
        """Rebuild the TTL index from ``expires`` if it drifted; True if it was repaired."""
        if self.ttl_index_consistent():
            return False
        self.ttl_index.rebuild(self.expires)
        return True

    def switch_policy(self, policy: EvictionPolicy) -> None:
        """Rank the keys with ``policy`` from now on (``CONFIG SET maxmemory-policy``).

        The new policy learns every key in the order the store holds them
        (insertion order), without the old policy's history; the entries'
        estimated sizes change by the difference in bookkeeping per key, and
        the tracker's figure with them. O(keys), in one synchronous step.
        """
        expires = self.expires
        for key in self.data:
            policy.record_insert(key, volatile=key in expires)
        self.used += (policy.key_overhead - self._key_overhead) * len(self.data)
        self.policy = policy
        self._key_overhead = policy.key_overhead
        self.tracker.reset_shard(self.shard_id, self.used)

    def repaired(self, policy: EvictionPolicy) -> ShardStore:
        """A new, consistent store holding every trustworthy entry of this one.

        Used when :meth:`check_invariants` rejects the state after a crash:
        entries of the wrong type are dropped, sizes recomputed, and the TTL
        index, the policy and the tracker's figure rebuilt from the entries.
        """
        started_at = self.started_at if type(self.started_at) is float else None
        fresh = ShardStore(
            self.shard_id,
            policy,
            self.tracker,
            scan_snapshots=self.scan_snapshots,
            started_at=started_at,
        )
        data = self.data if isinstance(self.data, dict) else {}
        expires = self.expires if isinstance(self.expires, dict) else {}
        total = 0
        for key, value in list(data.items()):
            if type(key) is not bytes or type(value) is not bytes:
                continue
            exp = expires.get(key)
            if exp is not None and type(exp) is not float:
                exp = None
            fresh.data[key] = value
            if exp is not None:
                fresh.expires[key] = exp
            policy.record_insert(key, volatile=exp is not None)
            total += fresh.entry_size(key, value, has_ttl=exp is not None)
        fresh.ttl_index.rebuild(fresh.expires)
        if isinstance(self.tick_times, TickTimes) and self.tick_times.consistent():
            fresh.tick_times = self.tick_times  # the keys' new ticks read as of the repair
        fresh.used = total
        fresh.expired_count = self.expired_count
        fresh.evicted_count = self.evicted_count
        fresh.durability = self.durability
        fresh.journal = self.journal
        if self.journal is not None:
            self.journal.bases.clear()  # the values kept are no PATCH's bases
        self.tracker.reset_shard(self.shard_id, total)
        return fresh

    def load(self, data: dict[bytes, bytes], expires: dict[bytes, float]) -> None:
        """Replace the whole content with recovered entries (not journalled).

        Args:
            data: key -> value.
            expires: key -> trio-monotonic expiry, for keys of ``data`` that have one.
        """
        self.data.clear()
        self.expires.clear()
        self.policy.clear()
        self._scans.clear()
        self._touch_all()
        if self.journal is not None:
            self.journal.bases.clear()  # recovered values are no PATCH's bases
        self.data.update(data)
        self.expires.update(expires)
        # In bulk (recovery loads millions of entries): as record_insert and
        # entry_size for each entry, in C-level passes where it can.
        self.policy.record_loaded(data, expires)
        with_ttl = sum(map(data.__contains__, expires)) if expires else 0
        total = entries_size(data, with_ttl) + len(data) * self._key_overhead
        self.ttl_index.rebuild(self.expires)
        self.used = total
        self.tracker.reset_shard(self.shard_id, total)


@attrs.define
class _ScanSnapshot:
    """The key list one SCAN iteration walks on one shard, and where it is."""

    keys: list[bytes]
    offset: int = 0  # the next position to return, the one the cursor must name


def scan_position_valid(tag: int, field: int) -> bool:
    """Whether (tag, field) is a position :meth:`ShardStore.scan` could have returned.

    Checks the form only (whether a snapshot still lives is the shard's
    business): a begin position has field 0, every other one a field in
    1..2**SCAN_FIELD_BITS - 1, and a tag fits in SCAN_TAG_BITS.
    """
    if not (0 <= tag < 1 << SCAN_TAG_BITS and 0 <= field < 1 << SCAN_FIELD_BITS):
        return False
    return field == 0 if tag == SCAN_BEGIN else field != 0
