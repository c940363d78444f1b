"""What each command does to the data: the operations the engine routes.

Each command parses into one operation object of one of these shapes, and
the engine knows only the shapes, never the commands:

- :class:`ShardOp`: one key, one shard; ``apply(store, now)`` runs inside the
  shard actor, synchronously (atomic with respect to cancellation).
- :class:`FanOutOp`: several keys, split per shard, results combined; not
  atomic across shards (DEL, EXISTS, TOUCH, UNLINK), as in Redis Cluster.
- :class:`AtomicOp`: several keys that must change (or be read) together
  across shards (MSET, MSETNX, MGET). Writes run a two-phase protocol: every
  involved shard *prepares* (checks, reserves memory) and holds, the engine
  decides, every shard commits or aborts. Reads run under the engine's
  reader lock, so no reader sees part of a write.
- :class:`KeyspaceOp`: every shard (DBSIZE, KEYS, FLUSHALL).

Results follow the protocol's JSON mapping: ``str`` for simple strings
(``"OK"``), ``bytes`` for bulk strings, ``int``, ``None``, lists of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from ..errors import CommandSyntaxError, KVMemoError, NotIntegerError, TooLargeError
from ..eviction.memory import BYTES_HEADER, ROUND_UP, TTL_OVERHEAD
from ..persistence import Op, encode_fields, encode_set
from ..storage.store import NeedMemory, PutPlan, ShardStore
from .args import INT64_MAX, INT64_MIN, NO_EXPIRY, Clock, Expiry, ExpiryMode, parse_int
from .glob import glob_match, is_match_all
from .longdouble import LongDouble, add, format_human, parse_long_double

OK = "OK"


class ShardOp:
    """An operation on one key, run by the shard that owns it."""

    __slots__ = ("key",)
    write = False

    def __init__(self, key: bytes) -> None:
        self.key = key

    def apply(self, store: ShardStore, now: float) -> Any:
        raise NotImplementedError


class Part:
    """The piece of a multi-shard operation that one shard runs."""

    def apply(self, store: ShardStore, now: float) -> Any:
        raise NotImplementedError


class FanOutOp:
    """A multi-key operation split per shard; results combined, not atomic."""

    write = False

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = tuple(keys)

    def part(self, keys: list[bytes]) -> Part:
        raise NotImplementedError

    def combine(self, results: list[Any], positions: list[list[int]]) -> Any:
        return sum(results)


class AtomicPart:
    """One shard's piece of an atomic write: prepare, then commit or abort.

    ``prepare`` returns a vote: True to go ahead, False when the command's
    condition fails (MSETNX's existing key), or a :class:`NeedMemory`. It
    must leave the store unchanged except for a memory reservation that
    ``commit`` uses and ``abort`` gives back. ``commit`` never fails.
    """

    def prepare(self, store: ShardStore, now: float) -> object:
        raise NotImplementedError

    def commit(self, store: ShardStore, now: float) -> Any:
        raise NotImplementedError

    def abort(self, store: ShardStore) -> None:
        """Give back what ``prepare`` reserved."""

    def effects(self, unix_offset: float) -> bytes | None:
        """The log records ``commit`` will journal, encoded, once ``prepare`` voted yes.

        For the engine's intent of a multi-shard round (see
        :mod:`kvmemo.persistence.intents`); ``unix_offset`` turns the store's
        monotonic expiry times into Unix time. None: not known before the
        commit (the round then has no intent).
        """
        return None


class AtomicOp:
    """A multi-key operation that is all-or-nothing across shards."""

    write = True
    readonly = False

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = tuple(keys)

    def part(self, positions: list[int]) -> AtomicPart:
        raise NotImplementedError

    def read_part(self, positions: list[int]) -> Part:
        raise NotImplementedError

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        raise NotImplementedError


class KeyspaceOp:
    """An operation on every shard, results combined."""

    write = False

    def part(self) -> Part:
        raise NotImplementedError

    def combine(self, results: list[Any]) -> Any:
        raise NotImplementedError


# -- strings ------------------------------------------------------------------------


class Get(ShardOp):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        return store.get(self.key, now)


class PeekGet(ShardOp):
    """GET of a ``CLIENT NO-TOUCH`` client: the value, no access recorded with the policy."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        return store.peek(self.key, now)


class PlainSet(ShardOp):
    """SET without options (the commonest write): no condition, no expiry, "OK".

    The same effect as ``Set(key, value, NO_EXPIRY, nx=False, xx=False,
    get=False)`` without its option fields and branches (a test holds them
    equal).
    """

    __slots__ = ("value",)
    write = True

    def __init__(self, key: bytes, value: bytes) -> None:
        self.key = key
        self.value = value

    def apply(self, store: ShardStore, now: float) -> str:
        store.put_plain(self.key, self.value, now)
        return OK


class Set(ShardOp):
    __slots__ = ("expiry", "get", "nx", "value", "xx")
    write = True

    def __init__(
        self, key: bytes, value: bytes, expiry: Expiry, *, nx: bool, xx: bool, get: bool
    ) -> None:
        self.key = key
        self.value = value
        self.expiry = expiry
        self.nx = nx
        self.xx = xx
        self.get = get

    def apply(self, store: ShardStore, now: float) -> Any:
        if self.nx or self.xx or self.get:
            old = store.peek(self.key, now)
            if (self.nx and old is not None) or (self.xx and old is None):
                return old if self.get else None
        else:
            old = None  # not needed: put replaces any old entry (an expired one included)
        expiry = self.expiry
        if expiry is NO_EXPIRY:  # the plain SET: no deadline to compute
            store.put_plain(self.key, self.value, now)
            return old if self.get else OK
        mode = expiry.mode
        deadline = expiry.deadline(now)
        if deadline is not None and deadline <= now:
            # An absolute time already past: set-then-expire, i.e. the key is gone.
            store.delete(self.key, now)
        else:
            store.put(
                self.key, self.value, now, expires_at=deadline, keep_ttl=mode is ExpiryMode.KEEP
            )
        return old if self.get else OK


class GetDel(ShardOp):
    __slots__ = ()
    write = True

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        value = store.peek(self.key, now)
        if value is not None:
            store.delete(self.key, now)
        return value


class GetEx(ShardOp):
    """GETEX. ``error``: the expiry value was bad, which Redis reports only for a live key.

    ``touch``: whether the read records an access with the policy (False for a
    ``CLIENT NO-TOUCH`` client's, :class:`PeekGetEx`).
    """

    __slots__ = ("error", "expiry")
    write = True
    touch = True

    def __init__(self, key: bytes, expiry: Expiry, *, error: KVMemoError | None = None) -> None:
        self.key = key
        self.expiry = expiry
        self.error = error

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        value = store.get(self.key, now) if self.touch else store.peek(self.key, now)
        if value is None:
            return None
        if self.error is not None:
            raise self.error
        mode = self.expiry.mode
        if mode is ExpiryMode.PERSIST:
            store.set_expiry(self.key, None)
        elif mode is not ExpiryMode.NONE:
            deadline = self.expiry.deadline(now)
            assert deadline is not None
            if deadline <= now:
                store.delete(self.key, now)
            else:
                store.set_expiry(self.key, deadline)
        return value


class PeekGetEx(GetEx):
    """GETEX of a ``CLIENT NO-TOUCH`` client: no access recorded with the policy."""

    __slots__ = ()
    touch = False


def _current_int(store: ShardStore, key: bytes, now: float) -> int:
    value = store.peek(key, now)
    if value is None:
        return 0
    return parse_int(value)


STRING_TOO_LONG = "string exceeds maximum allowed size (proto-max-bulk-len)"


class IncrBy(ShardOp):
    """INCR, DECR, INCRBY, DECRBY. ``limit``: ``max_value_size`` (the result
    is a value the command builds, as APPEND's: over it, TOO_LARGE)."""

    __slots__ = ("delta", "limit")
    write = True

    def __init__(self, key: bytes, delta: int, limit: int) -> None:
        self.key = key
        self.delta = delta
        self.limit = limit

    def apply(self, store: ShardStore, now: float) -> int:
        current = _current_int(store, self.key, now)
        result = current + self.delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise NotIntegerError("increment or decrement would overflow")
        text = str(result).encode()
        if len(text) > self.limit:
            raise TooLargeError(STRING_TOO_LONG)
        store.put(self.key, text, now, expires_at=None, keep_ttl=True)
        return result


class IncrByFloat(ShardOp):
    """INCRBYFLOAT, in x87 ``long double`` as Redis computes it (:mod:`.longdouble`).

    Sums go up to about 1.19e4932 (past the ``double`` range, as Redis's);
    past that, or an infinite operand, is ``increment would produce NaN or
    Infinity`` and changes nothing.
    """

    __slots__ = ("delta", "limit")
    write = True

    def __init__(self, key: bytes, delta: LongDouble, limit: int) -> None:
        self.key = key
        self.delta = delta
        self.limit = limit  # max_value_size, as IncrBy's

    def apply(self, store: ShardStore, now: float) -> bytes:
        raw = store.peek(self.key, now)
        current: LongDouble = Fraction(0) if raw is None else parse_long_double(raw)
        text = format_human(add(current, self.delta))
        if len(text) > self.limit:
            raise TooLargeError(STRING_TOO_LONG)
        store.put(self.key, text, now, expires_at=None, keep_ttl=True)
        return text


class Append(ShardOp):
    """APPEND; the result may not grow past ``max_size`` (TOO_LARGE, nothing changed)."""

    __slots__ = ("max_size", "value")
    write = True

    def __init__(self, key: bytes, value: bytes, max_size: int) -> None:
        self.key = key
        self.value = value
        self.max_size = max_size

    def apply(self, store: ShardStore, now: float) -> int:
        old = store.peek(self.key, now)
        if old is not None and len(old) + len(self.value) > self.max_size:
            raise TooLargeError(STRING_TOO_LONG)
        new = self.value if old is None else old + self.value
        edit = (0 if old is None else len(old), self.value)
        store.put(self.key, new, now, expires_at=None, keep_ttl=True, edit=edit)
        return len(new)


class StrLen(ShardOp):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> int:
        value = store.peek(self.key, now)
        return 0 if value is None else len(value)


class Type(ShardOp):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> str:
        return "string" if store.contains(self.key, now) else "none"


class GetRange(ShardOp):
    __slots__ = ("end", "start")

    def __init__(self, key: bytes, start: int, end: int) -> None:
        self.key = key
        self.start = start
        self.end = end

    def apply(self, store: ShardStore, now: float) -> bytes:
        value = store.peek(self.key, now) or b""
        n = len(value)
        start, end = self.start, self.end
        if start < 0 and end < 0 and start > end:
            return b""
        if start < 0:
            start = max(0, n + start)
        if end < 0:
            end = max(0, n + end)
        end = min(end, n - 1)
        if start > end or n == 0:
            return b""
        return value[start : end + 1]


class SetRange(ShardOp):
    __slots__ = ("max_size", "offset", "value")
    write = True

    def __init__(self, key: bytes, offset: int, value: bytes, max_size: int) -> None:
        self.key = key
        self.offset = offset
        self.value = value
        self.max_size = max_size

    def apply(self, store: ShardStore, now: float) -> int:
        old = store.peek(self.key, now)
        if not self.value:
            return 0 if old is None else len(old)
        if self.offset + len(self.value) > self.max_size:
            raise TooLargeError(STRING_TOO_LONG)
        base = old or b""
        offset, end = self.offset, self.offset + len(self.value)
        # The new value in one copy of the old (slices and concatenations of
        # a long value were three; see SetBit).
        with memoryview(base) as view:
            if len(base) < offset:
                new = b"".join((view, bytes(offset - len(base)), self.value))
            else:
                new = b"".join((view[:offset], self.value, view[end:]))
        edit = (offset, self.value)
        store.put(self.key, new, now, expires_at=None, keep_ttl=True, edit=edit)
        return len(new)


# -- expiry ----------------------------------------------------------------------------


# Redis keeps deadlines in whole Unix milliseconds, so GT and LT see two equal
# deadlines as equal. Ours are monotonic floats converted from Unix time with a
# clock read per command: two conversions of one Unix millisecond differ by
# the clocks' jitter (microseconds), never by half a millisecond.
SAME_MILLISECOND = 0.0005  # seconds: deadlines closer than this are one Redis ms


class Expire(ShardOp):
    """EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT with NX / XX / GT / LT.

    GT and LT compare deadlines as Redis's whole milliseconds
    (:data:`SAME_MILLISECOND`): ``EXPIREAT k t GT`` is refused when ``k``
    expires at ``t`` already.
    """

    __slots__ = ("conditions", "expiry")
    write = True

    def __init__(self, key: bytes, expiry: Expiry, conditions: frozenset[bytes]) -> None:
        self.key = key
        self.expiry = expiry
        self.conditions = conditions

    def apply(self, store: ShardStore, now: float) -> int:
        if not store.contains(self.key, now):
            return 0
        current = store.expiry_of(self.key)  # None: no TTL, i.e. infinite
        new = self.expiry.deadline(now)
        assert new is not None
        cond = self.conditions
        if cond:
            if b"NX" in cond and current is not None:
                return 0
            if b"XX" in cond and current is None:
                return 0
            if b"GT" in cond and (current is None or new - current < SAME_MILLISECOND):
                return 0
            if b"LT" in cond and current is not None and current - new < SAME_MILLISECOND:
                return 0
        if new <= now:
            store.delete(self.key, now)
            return 1
        store.set_expiry(self.key, new)
        return 1


class Ttl(ShardOp):
    __slots__ = ("millis",)

    def __init__(self, key: bytes, millis: bool) -> None:
        self.key = key
        self.millis = millis

    def apply(self, store: ShardStore, now: float) -> int:
        if not store.contains(self.key, now):
            return -2
        exp = store.expiry_of(self.key)
        if exp is None:
            return -1
        remaining_ms = max(0, round((exp - now) * 1000))
        return remaining_ms if self.millis else (remaining_ms + 500) // 1000


class ExpireTime(ShardOp):
    __slots__ = ("clock", "millis")

    def __init__(self, key: bytes, millis: bool, clock: Clock) -> None:
        self.key = key
        self.millis = millis
        self.clock = clock

    def apply(self, store: ShardStore, now: float) -> int:
        if not store.contains(self.key, now):
            return -2
        exp = store.expiry_of(self.key)
        if exp is None:
            return -1
        # Redis keeps whole Unix milliseconds and rounds them to the nearest
        # second; the round trip through the monotonic clock is only off by
        # clock jitter (microseconds), which the rounding to ms removes.
        unix_ms = round(self.clock.to_unix(exp) * 1000)
        return unix_ms if self.millis else (unix_ms + 500) // 1000


class Persist(ShardOp):
    __slots__ = ()
    write = True

    def apply(self, store: ShardStore, now: float) -> int:
        if not store.contains(self.key, now) or store.expiry_of(self.key) is None:
            return 0
        store.set_expiry(self.key, None)
        return 1


# -- multi-key -------------------------------------------------------------------------


class _KeysPart(Part):
    __slots__ = ("fn", "keys")

    def __init__(self, keys: list[bytes], fn: Any) -> None:
        self.keys = keys
        self.fn = fn

    def apply(self, store: ShardStore, now: float) -> Any:
        return self.fn(store, self.keys, now)


def _delete_keys(store: ShardStore, keys: list[bytes], now: float) -> int:
    if len(keys) < 2:
        return sum(store.delete(k, now) for k in keys)
    with store.one_record():  # this shard's DELs: all of them, or none, after a crash
        return sum(store.delete(k, now) for k in keys)


def _count_live(store: ShardStore, keys: list[bytes], now: float) -> int:
    return sum(store.contains(k, now) for k in keys)


def _touch_keys(store: ShardStore, keys: list[bytes], now: float) -> int:
    return sum(store.get(k, now) is not None for k in keys)


class Del(FanOutOp):
    write = True

    def part(self, keys: list[bytes]) -> Part:
        return _KeysPart(keys, _delete_keys)


class Exists(FanOutOp):
    def part(self, keys: list[bytes]) -> Part:
        return _KeysPart(keys, _count_live)


class Touch(FanOutOp):
    def part(self, keys: list[bytes]) -> Part:
        return _KeysPart(keys, _touch_keys)


class _MSetPart(AtomicPart):
    """One shard's pairs of an MSET or MSETNX.

    ``commit`` applies the pairs at the time ``prepare`` saw, not at the
    (later) time of the decision: the reservation was computed from the
    entries live at that time, and an entry that expired while the shard
    held would otherwise be released twice (once by the expiry, once as the
    overwritten value the reservation already netted out).
    """

    def __init__(self, items: list[tuple[bytes, bytes]], only_new: bool) -> None:
        self.items = items
        self.only_new = only_new
        self.reserved = 0
        self.prepared_at = 0.0
        self.encoded: bytes | None = None  # the pairs as log records, once effects() ran
        self.plan: PutPlan | None = None  # what prepare saw of the store (see commit)

    def prepare(self, store: ShardStore, now: float) -> object:
        if self.only_new and any(store.contains(k, now) for k, _ in self.items):
            return False
        plan = store.plan_put_many(self.items, now)
        delta = plan.delta
        if not store.tracker.try_reserve(store.shard_id, delta):
            return NeedMemory(delta)
        self.reserved = delta
        self.prepared_at = now
        self.plan = plan
        return True

    def commit(self, store: ShardStore, now: float) -> None:
        # The shard held (no other message ran) since prepare: the store is as
        # prepare saw it, so applying at prepare's time matches the reservation,
        # and prepare's plan (its lookups) still holds. The records the intent
        # encoded are journalled as they are.
        store.put_many(self.items, self.prepared_at, self.encoded, self.plan)
        self.reserved = 0
        self.encoded = None
        self.plan = None

    def abort(self, store: ShardStore) -> None:
        self.plan = None
        if self.reserved:
            store.tracker.release(store.shard_id, self.reserved)
            self.reserved = 0

    def effects(self, unix_offset: float) -> bytes:
        # put_many: each pair a SET without expiry, in order (a later pair wins).
        self.encoded = b"".join([encode_set(k, v) for k, v in self.items])
        return self.encoded


class MSet(AtomicOp):
    """MSET and MSETNX: every pair or none, as one atomic step for every reader."""

    def __init__(
        self,
        items: list[tuple[bytes, bytes]],
        *,
        only_new: bool,
        keys: Sequence[bytes] | None = None,
    ) -> None:
        """``keys``: the keys of ``items`` in order, when the caller has them already."""
        super().__init__([k for k, _ in items] if keys is None else keys)
        self.items = items
        self.only_new = only_new
        self.grouped = False  # already the engine's union of several MSETs
        # The engine's shard -> positions of the keys, once computed (MSETNX).
        self.groups: dict[int, list[int]] | None = None
        # The engine's shard of each key, in order, once computed (kept so
        # that grouping several MSETs into a round does not hash every key
        # again, see KVEngine._mset_round).
        self.shards: list[int] | None = None

    def part(self, positions: list[int]) -> AtomicPart:
        """The pairs at ``positions`` (increasing, as every grouping gives them).

        Increasing positions that span exactly their own count are one run
        (``first .. last``): a slice, with no per-pair work (each shard's
        share of an MSET round is one, see ``KVEngine._mset_round``).
        """
        if positions and positions[-1] - positions[0] + 1 == len(positions):
            return _MSetPart(self.items[positions[0] : positions[-1] + 1], self.only_new)
        return _MSetPart([self.items[i] for i in positions], self.only_new)

    def local(self) -> LocalMSet:
        """The same command as one shard's message, for keys that all live on one shard."""
        return LocalMSet(self.items, self.only_new)

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        if self.only_new:
            return 1 if committed else 0
        return OK


class LocalMSet(ShardOp):
    """MSET or MSETNX whose keys all live on one shard: one message, no hold.

    The shard applies it in one handler call, which has no checkpoint: every
    reader (an MGET's part on this shard included) sees all of its pairs or
    none, which is what the two-phase hold gives a multi-shard MSET. The
    effect is that of :class:`_MSetPart`'s prepare then commit at the same
    instant; ``key`` (the first pair's) routes it to its shard.
    """

    __slots__ = ("items", "only_new")
    write = True

    def __init__(self, items: list[tuple[bytes, bytes]], only_new: bool) -> None:
        self.key = items[0][0]
        self.items = items
        self.only_new = only_new

    def apply(self, store: ShardStore, now: float) -> Any:
        """Set every pair (MSETNX: unless one key is live): "OK", or MSETNX's 1 / 0.

        Raises:
            NeedMemory: the tracker refused the bytes; nothing changed.
        """
        part = _MSetPart(self.items, self.only_new)  # its prepare and commit, at one instant
        vote = part.prepare(store, now)
        if vote is False:
            return 0
        if isinstance(vote, NeedMemory):
            raise vote
        part.commit(store, now)
        return 1 if self.only_new else OK


class _MGetPart(Part):
    """One shard's keys of an MGET: the values of ``keys[i]`` for ``i`` in ``positions``.

    Holds the command's whole key tuple and this shard's positions rather
    than a list of its keys: the shard reads them through one ``map``, with
    no list built per part.
    """

    __slots__ = ("keys", "positions")

    def __init__(self, keys: tuple[bytes, ...], positions: list[int]) -> None:
        self.keys = keys
        self.positions = positions

    def apply(self, store: ShardStore, now: float) -> list[bytes | None]:
        return store.get_many(map(self.keys.__getitem__, self.positions), now)


class MGet(AtomicOp):
    """MGET: read under the engine's reader lock, so no MSET is seen in part."""

    write = False
    readonly = True

    def read_part(self, positions: list[int]) -> Part:
        return _MGetPart(self.keys, positions)

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        """Put each part's values back in argument order: one value per key.

        Args:
            results: each part's values, as :meth:`ShardStore.get_many` gave them.
            positions: ``positions[j]``, the argument positions ``results[j]``
                answers, one per value, ascending (as
                ``SlotMap.group_by_shard`` gives them); together, every
                position once.
            committed: unused (a read always completes).

        Returns:
            The value (or None) of each key, in argument order. A single part
            covering every key holds its values in argument order already
            (its positions are ``0 .. n-1``, ascending), so its list is
            returned as it is, not copied.

        Raises:
            ValueError: a part gave a different number of values than it has
                positions (a bug, never a client's error).
        """
        n = len(self.keys)
        if len(results) == 1 and len(positions[0]) == n:
            values: list[bytes | None] = results[0]
            if len(values) != n:
                raise ValueError(f"part gave {len(values)} values for {n} keys")
            return values
        out: list[bytes | None] = [None] * n
        for values, where in zip(results, positions, strict=True):
            for i, value in zip(where, values, strict=True):
                out[i] = value
        return out


class _MPeekPart(_MGetPart):
    """One shard's keys of a ``CLIENT NO-TOUCH`` client's MGET: no access recorded."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> list[bytes | None]:
        peek = store.peek
        return [peek(self.keys[i], now) for i in self.positions]


class PeekMGet(MGet):
    """MGET of a ``CLIENT NO-TOUCH`` client: as :class:`MGet`, no access recorded."""

    def read_part(self, positions: list[int]) -> Part:
        return _MPeekPart(self.keys, positions)


# -- keyspace -------------------------------------------------------------------------


class _FnPart(Part):
    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def apply(self, store: ShardStore, now: float) -> Any:
        return self.fn(store, now)


class DbSize(KeyspaceOp):
    def part(self) -> Part:
        return _FnPart(lambda store, now: store.live_count(now))

    def combine(self, results: list[Any]) -> int:
        return sum(results)


class Keys(KeyspaceOp):
    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern

    def part(self) -> Part:
        pattern = self.pattern
        match_all = is_match_all(pattern)

        def matching(store: ShardStore, now: float) -> list[bytes]:
            return [k for k in store.live_keys(now) if match_all or glob_match(pattern, k)]

        return _FnPart(matching)

    def combine(self, results: list[Any]) -> list[bytes]:
        return [k for keys in results for k in keys]


class FlushAll(KeyspaceOp):
    write = True

    def part(self) -> Part:
        return _FnPart(lambda store, now: store.flush())

    def combine(self, results: list[Any]) -> str:
        return OK


class ScanStep(Part):
    """One SCAN call's work on one shard."""

    __slots__ = ("count", "offset", "pattern", "scan_id")

    def __init__(self, scan_id: int, offset: int, count: int, pattern: bytes | None) -> None:
        self.scan_id = scan_id
        self.offset = offset
        self.count = count
        self.pattern = pattern

    def apply(self, store: ShardStore, now: float) -> tuple[int, int, list[bytes]]:
        scan_id, offset, keys = store.scan(self.scan_id, self.offset, self.count, now)
        pattern = self.pattern
        if pattern is not None:
            keys = [k for k in keys if glob_match(pattern, k)]
        return scan_id, offset, keys


# -- writes computed from keys read first (RENAME, RENAMENX, COPY, BITOP) --------------

CHANGED = "changed"
"""The vote of a source whose value changed since the engine read it: retry."""

RETRY_HEADROOM_MIN = 256  # bytes of headroom a source gets on the first reread
RETRY_HEADROOM_MAX = 1 << 20  # bytes; the headroom doubles up to max(this, 4 x the length)


def retry_bound(length: int, attempt: int) -> int:
    """The value length a read-then-write reserves for, on its ``attempt``-th read (from 1).

    At first, the length read. A source that outgrew its reservation makes
    the engine read it again; from then on the reservation gets headroom
    that doubles with each attempt (a commit trims it to the exact size),
    so a source that keeps growing (APPEND in a loop) cannot keep the
    command reading until it gives up.
    """
    if attempt <= 1:
        return length
    headroom = max(RETRY_HEADROOM_MIN, length) << min(attempt - 2, 24)
    return length + min(headroom, max(RETRY_HEADROOM_MAX, 4 * length))


def value_capacity(length: int) -> int:
    """The longest value whose bytes object costs what one of ``length`` bytes does.

    Sizes grow in 16-byte steps (:mod:`kvmemo.eviction.memory`): a source
    that grew within its step costs nothing more than what was reserved.
    """
    return ((length + ROUND_UP) & ~15) - BYTES_HEADER


NO_ANSWER = object()
"""What :meth:`ReadThenWrite.sources_read` returns when the write goes ahead."""


class ReadThenWrite(AtomicOp):
    """An atomic write whose effect is computed from keys it reads first.

    RENAME, RENAMENX, COPY (the source's value and expiry) and BITOP (its
    sources' values). Atomic across shards like MSET, in steps that the
    engine runs holding its writer lock throughout (so no other multi-key
    write runs between them, and no multi-shard reader sees part of one):

    1. **read**: each shard that holds sources gets ``source_part(positions)``
       (a shard that holds none gets nothing), all sent before any answer is
       awaited; ``sources_read`` gets the answers and keeps what the write
       needs, or gives an early answer (the write is not made);
    2. **two-phase write**: each source's shard, when it prepares, hands
       over its sources as they are then (into the round the parts share)
       and holds until the decision; it votes :data:`CHANGED` only if a
       source now costs more than what step 1 read, as that bounds the
       memory the target reserved (RENAME, COPY: a longer value, a TTL
       gained, or the source gone; BITOP: a longer value); the targets'
       shards reserve memory; the engine commits or aborts everywhere, and
       a target's commit writes what was handed over;
    3. after a :data:`CHANGED` vote the engine starts again at step 1 (at
       most ``MOVE_RETRIES`` times, then ``TIMEOUT``, nothing applied).

    Invariant: a commit writes what is computed from the sources as they
    were while every shard held, i.e. at one instant; a concurrent writer to
    a source can make the command read again, never make its effect a mix.

    A transaction whose keys all live on one shard runs prepare and commit
    in one step, without step 1 (``LocalAtomicStep``): it reads a Move's
    source itself, while a BITOP part reads its sources from the store.
    """

    kind: str
    """The command's name, lower case (for messages about it)."""

    def source_part(self, positions: list[int]) -> ShardOp | Part | None:
        """The read that one shard (holding ``keys[i]`` for ``i`` in ``positions``) runs, if any."""
        raise NotImplementedError

    def sources_read(self, results: list[Any], positions: list[list[int]]) -> Any:
        """Keep what step 1 read; :data:`NO_ANSWER`, or the command's answer without a write.

        Args:
            results: per shard, the answer of its :meth:`source_part` (None
                where it had none).
            positions: per shard, the key positions it holds (as for :meth:`part`).

        Raises:
            KVMemoError: the command fails (nothing was written).
        """
        raise NotImplementedError


class PeekEntry(ShardOp):
    """The live value and expiry of a key, or None (for RENAME and COPY)."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> tuple[bytes, float | None] | None:
        value = store.peek(self.key, now)
        if value is None:
            return None
        return value, store.expiry_of(self.key)


class _MoveRound:
    """What one two-phase round of a move shares between its shards' parts.

    ``bound``: the value length the target reserves memory for (with a TTL,
    whose bytes the commit gives back if the entry has none): the length
    step 1 read, plus headroom on a reread (:func:`retry_bound`). The
    source's shard votes :data:`CHANGED` only if its value now costs more
    (:func:`value_capacity`). ``entry``: the source's
    value and expiry as its shard's prepare found them; its shard holds
    from then to the decision, so the target's commit writes exactly what
    the source's commit deletes (RENAME), whatever was written to the
    source between step 1 and the hold.
    """

    __slots__ = ("bound", "entry")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.entry: tuple[bytes, float | None] | None = None


class _MovePart(AtomicPart):
    """One shard's share of a move: hand over (and, RENAME, delete) the source, write the target.

    ``commit`` applies at the time ``prepare`` saw, as :class:`_MSetPart`
    does: a target that expired while the shard held would otherwise be
    released twice (by the expiry, and as the old value the reservation
    already netted out). The target reserves for the bound and its commit
    turns that into the exact size of the entry handed over.
    """

    def __init__(self, op: Move, source: bool, target: bool) -> None:
        assert op.round is not None  # step 1 (or the local step) read the source first
        self.op = op
        # This round's shared state, fixed now: a retry makes a new one, while
        # a part of an aborted round may still be queued on a busy shard (it
        # then prepares into its own round and aborts on its own).
        self.round = op.round
        self.source = source
        self.target = target
        self.old_size = 0  # the target's entry size when prepared (0: absent)
        self.reserved = 0
        self.prepared_at = 0.0

    def prepare(self, store: ShardStore, now: float) -> object:
        op = self.op
        rnd = self.round
        if self.source:
            value = store.peek(op.src, now)
            if value is None or len(value) > value_capacity(rnd.bound):
                # Deleted (the engine reads again and answers "no such key"), or
                # costlier than what the target reserves for: read again.
                return CHANGED
            rnd.entry = (value, store.expiry_of(op.src))
        if self.target:
            if not op.replace and store.contains(op.dst, now):
                return False
            old = store.peek_raw(op.dst, now)
            if old is not None:
                has_ttl = store.expiry_of(op.dst) is not None
                self.old_size = store.entry_size(op.dst, old, has_ttl=has_ttl)
            delta = store.entry_size_of(op.dst, rnd.bound) + TTL_OVERHEAD - self.old_size
            if op.kind != "copy" and delta > 0:
                # The source's deletion frees about as much: never refused (as in
                # Redis, whose RENAME and RENAMENX are not denyoom); over the limit
                # by one entry at most, until the source's shard commits.
                store.tracker.reserve(store.shard_id, delta)
            elif not store.tracker.try_reserve(store.shard_id, delta):
                return NeedMemory(delta)
            self.reserved = delta
        self.prepared_at = now
        return True

    def commit(self, store: ShardStore, now: float) -> None:
        # The shard held (no other message ran) since prepare: the store is as
        # prepare saw it, so applying at prepare's time matches the reservation.
        # Every shard voted before any commit: the source's entry is in the round.
        op = self.op
        assert self.round.entry is not None
        value, expires_at = self.round.entry
        with store.one_record():  # a RENAME on one shard: its SET and DEL, or neither
            if self.target:
                exact = store.entry_size(op.dst, value, has_ttl=expires_at is not None)
                store.tracker.release(store.shard_id, self.reserved - (exact - self.old_size))
                self.reserved = 0
                store.put(op.dst, value, self.prepared_at, expires_at=expires_at, charge=False)
            if self.source and op.kind != "copy":
                store.delete(op.src, self.prepared_at)

    def abort(self, store: ShardStore) -> None:
        if self.reserved:
            store.tracker.release(store.shard_id, self.reserved)
            self.reserved = 0

    def effects(self, unix_offset: float) -> bytes:
        # As commit journals them: the target's SET (with the source's
        # expiry, absolute), then the source's DEL.
        op = self.op
        assert self.round.entry is not None
        value, expires_at = self.round.entry
        out = []
        if self.target:
            expires_ms = None if expires_at is None else round((expires_at + unix_offset) * 1000)
            out.append(encode_fields(Op.SET, op.dst, value, expires_ms))
        if self.source and op.kind != "copy":
            out.append(encode_fields(Op.DEL, op.src))
        return b"".join(out)


class Move(ReadThenWrite):
    """RENAME, RENAMENX and COPY: atomic across shards like MSET (see :class:`ReadThenWrite`).

    The engine reads the source (:class:`PeekEntry`) under its writer lock,
    for its existence and length; then runs the two-phase write: the
    source's shard hands over its entry as it is when it prepares (a value
    written meanwhile is taken as it is, unless it grew past the length
    read: then the engine reads again) and, for RENAME, deletes it at
    commit; the target's shard checks its condition, reserves memory for
    the length read and writes the entry handed over. No reader sees both
    keys, or neither, and a busy writer to the source cannot starve it.
    """

    def __init__(self, src: bytes, dst: bytes, *, kind: str, replace: bool) -> None:
        super().__init__([src, dst])
        self.src = src
        self.dst = dst
        self.kind = kind  # "rename", "renamenx" or "copy"
        self.replace = replace
        self.round: _MoveRound | None = None  # the round the next parts belong to
        self.reads = 0  # times the source was read (step 1): the retries' headroom

    def part(self, positions: list[int]) -> AtomicPart:
        return _MovePart(self, 0 in positions, 1 in positions)

    def source_part(self, positions: list[int]) -> ShardOp | None:
        return PeekEntry(self.src) if 0 in positions else None

    def sources_read(self, results: list[Any], positions: list[list[int]]) -> Any:
        """Keep the source's length; the answer when it is missing or is the target."""
        entry = next(r for r, where in zip(results, positions, strict=True) if 0 in where)
        if entry is None:
            return self.missing()
        if self.src == self.dst:
            return self.same_key()
        self.reads += 1
        self.round = _MoveRound(retry_bound(len(entry[0]), self.reads))
        return NO_ANSWER

    def missing(self) -> Any:
        """The answer when the source does not exist."""
        if self.kind == "copy":
            return 0
        raise CommandSyntaxError("no such key")

    def same_key(self) -> Any:
        """The answer when source and target are one key (and the source exists)."""
        if self.kind == "copy":
            raise CommandSyntaxError("source and destination objects are the same")
        return OK if self.kind == "rename" else 0

    def combine(self, results: list[Any], positions: list[list[int]], committed: bool) -> Any:
        if self.kind == "rename":
            return OK
        return 1 if committed else 0
