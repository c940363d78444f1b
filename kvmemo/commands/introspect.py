"""Introspection commands: OBJECT, MEMORY and LASTSAVE, as Redis 7 answers them.

``redis-cli --memkeys`` sends ``MEMORY USAGE`` for each key, ``--hotkeys``
sends ``OBJECT FREQ``; monitoring tools ask ``OBJECT ENCODING``, ``OBJECT
IDLETIME`` and ``LASTSAVE``. Registered in the one command table
(:mod:`kvmemo.commands.table`) by importing this module; OBJECT and MEMORY are
containers (:func:`~kvmemo.commands.table.container`), as in Redis 7.

Every per-key answer is read inside the shard that owns the key (the
:class:`~kvmemo.commands.ops.ShardOp` classes below) and *touches nothing*:
no access is recorded with the eviction policy (Redis: OBJECT does not touch
the key), no entry changes; a key past its expiry is removed, as any read
removes it, and answers nil. Where KVMemo's answer differs from Redis's
because the store differs, the class says how and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import CommandSyntaxError, DisabledError
from ..eviction.policies import EvictionPolicy
from ..storage.store import ShardStore
from . import ops
from .args import SYNTAX, parse_int, upper
from .replies import FieldList
from .table import ParseContext, Parser, command, container, fixed_reply, subcommand

NOKEYS = (0, 0, 0)
SUB_KEY = (2, 2, 1)  # OBJECT ENCODING key: the key is the call's second argument

EMBSTR_SIZE_LIMIT = 44  # bytes; Redis's OBJ_ENCODING_EMBSTR_SIZE_LIMIT
INT_SIZE_LIMIT = 20  # bytes; the longest string Redis's tryObjectEncoding tries as an integer
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# Redis's error texts (object.c), word for word.
LFU_NOT_SELECTED = (
    "An LFU maxmemory policy is not selected, access frequency not tracked. Please note that"
    " when switching between policies at runtime LRU and LFU data will take some time to adjust."
)
LFU_SELECTED = (
    "An LFU maxmemory policy is selected, idle time not tracked. Please note that when"
    " switching between policies at runtime LRU and LFU data will take some time to adjust."
)
# Redis keeps an LRU clock per key under every non-LFU policy; KVMemo's
# fifo, random and noeviction policies keep no access time at all (see ObjectIdleTime).
NO_ACCESS_TIMES = (
    "An LRU maxmemory policy is not selected, idle time not tracked: the '{policy}' policy"
    " keeps no access times. Select allkeys-lru or volatile-lru to track them."
)
# Redis's MEMORY MALLOC-STATS without jemalloc (object.c), which is KVMemo's case.
MALLOC_STATS = b"Stats not supported for the current allocator"


def _is_int_encodable(value: bytes) -> bool:
    """Whether Redis stores ``value`` as an ``int`` object (``tryObjectEncoding``).

    Its rule: at most 20 bytes and ``string2l`` accepts them: an optional
    ``-``, decimal digits, no leading zero (``0`` itself excepted; ``-0`` is
    refused), no space or ``+``, within the signed 64-bit range. That is,
    exactly the canonical decimal spelling of a 64-bit integer.
    """
    if not 0 < len(value) <= INT_SIZE_LIMIT:
        return False
    digits = value[1:] if value[:1] == b"-" else value
    if not (digits.isdigit() and digits.isascii()):
        return False
    if digits[:1] == b"0" and (len(digits) > 1 or len(value) > 1):
        return False  # a leading zero, or "-0"
    return INT64_MIN <= int(value) <= INT64_MAX


def string_encoding(value: bytes) -> bytes:
    """The encoding Redis gives a string written by SET: ``int``, ``embstr`` or ``raw``."""
    if _is_int_encodable(value):
        return b"int"
    return b"embstr" if len(value) <= EMBSTR_SIZE_LIMIT else b"raw"


# -- OBJECT -------------------------------------------------------------------------------


class ObjectEncoding(ops.ShardOp):
    """OBJECT ENCODING: ``int``, ``embstr`` or ``raw`` (nil for a missing key).

    KVMemo stores every value as bytes, so the answer is the encoding Redis
    would give the same bytes written by SET (:func:`string_encoding`). Redis
    also remembers how a value was made: APPEND, SETRANGE, SETBIT, BITOP and
    BITFIELD leave a ``raw`` string there even when short or numeric, INCR an ``int``;
    KVMemo, which keeps no such history, answers by the bytes alone.
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bytes | None:
        value = store.peek(self.key, now)
        return None if value is None else string_encoding(value)


class ObjectRefcount(ops.ShardOp):
    """OBJECT REFCOUNT: 1 for an existing key (nil for a missing one).

    Always 1 because KVMemo shares no value objects between keys: each
    entry owns its value (Redis shares the integers 0-9999 when no LRU/LFU
    limit is set and answers 2147483647 for them; KVMemo has no such pool).
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> int | None:
        return None if store.peek(self.key, now) is None else 1


class ObjectFreq(ops.ShardOp):
    """OBJECT FREQ: the LFU policy's access count for the key (nil for a missing key).

    Only under an LFU policy (``lfu`` / ``allkeys-lfu``, ``volatile-lfu``);
    otherwise Redis's error (a :class:`DisabledError`). The figure is the
    policy's real counter: every access in this shard since insertion (1 at
    insertion), exact and without decay, not Redis's logarithmic 0-255
    counter; ``redis-cli --hotkeys`` ranks by it all the same.
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> int | None:
        if store.peek(self.key, now) is None:
            return None
        policy = store.policy
        if not policy.lfu:
            raise DisabledError(LFU_NOT_SELECTED)
        freq = policy.frequency(self.key)
        return 0 if freq is None else freq


class ObjectIdleTime(ops.ShardOp):
    """OBJECT IDLETIME: whole seconds since the key's last access (nil for a missing key).

    Under an LRU policy (``lru`` / ``allkeys-lru``, ``volatile-lru``, whose
    bookkeeping holds each key's last-touch tick) the tick is turned back into
    a time with the shard's marks (:class:`~kvmemo.eviction.policies.TickTimes`,
    taken by the periodic expiry sweep, at most once a second): the answer is
    never less than the true idle time and exceeds it by at most the spacing
    of the marks (about 1 s, more for a key idle a long time), as Redis's own
    1 s LRU clock rounds. Before the first sweep (which runs as the node
    starts) it is 0. A policy switch, or a shard rebuilt after corruption,
    counts as a touch of every key (the new policy learns them afresh). A
    key restored with ``IDLETIME`` and untouched since reads its own time
    (``EvictionPolicy.aged_since``), exactly, as Redis answers it.

    Under an LFU policy: Redis's error. Under ``fifo``, ``random``,
    ``volatile-random`` and ``noeviction``, which keep no access time (Redis
    keeps an LRU clock in every object; KVMemo keeps per-key metadata lean and
    its touches read no clock), an error saying so rather than a made-up
    figure; both are :class:`DisabledError`.
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> int | None:
        if store.peek(self.key, now) is None:
            return None
        policy: EvictionPolicy = store.policy
        if policy.lfu:
            raise DisabledError(LFU_SELECTED)
        if not policy.keeps_access_ticks:
            raise DisabledError(NO_ACCESS_TIMES.format(policy=policy.name))
        since = policy.aged_since(self.key)
        if since is not None:
            # Restored with IDLETIME and untouched since: its own time, to
            # the ms (so that IDLETIME 1000 reads 1000 at once, not 999.999...).
            return max(0, int(round(now - since, 3)))
        tick = policy.last_access(self.key)
        # An untracked key (the policy learns it at its next touch) reads as
        # older than every mark.
        when = store.tick_times.time_of(0 if tick is None else tick)
        return 0 if when is None else max(0, int(now - when))


OBJECT_HELP = [
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return the kind of internal representation used in order to store the value",
    "    associated with a <key>.",
    "FREQ <key>",
    "    Return the access frequency index of the <key>: under an LFU policy, KVMemo's",
    "    exact count of the key's accesses since it was stored (1 at insertion).",
    "IDLETIME <key>",
    "    Return the idle time of the <key>, that is the approximated number of",
    "    seconds elapsed since the last access to the key.",
    "REFCOUNT <key>",
    "    Return the number of references of the value associated with the specified",
    "    <key>.",
    "HELP",
    "    Prints this help.",
]


def _on_key(op: type[ops.ShardOp]) -> Parser:
    def parse_key(args: Sequence[bytes], ctx: ParseContext) -> ops.ShardOp:
        return op(args[0])

    return parse_key


# "readonly" (a read of the keyspace): on the WebSocket port a keyless
# readonly command waits for what the session sent before it, so OBJECT and
# MEMORY USAGE see the session's earlier writes to their key.
container(
    "object",
    "readonly",
    "inspect the internals of a key's value (subcommands)",
    "1.3",
    [
        subcommand(
            "encoding", 3, "readonly", SUB_KEY, _on_key(ObjectEncoding), "a value's encoding"
        ),
        subcommand("freq", 3, "readonly", SUB_KEY, _on_key(ObjectFreq), "a key's LFU access count"),
        subcommand("help", 2, "", NOKEYS, fixed_reply(OBJECT_HELP), "show helpful text"),
        subcommand(
            "idletime", 3, "readonly", SUB_KEY, _on_key(ObjectIdleTime), "seconds since access"
        ),
        subcommand(
            "refcount", 3, "readonly", SUB_KEY, _on_key(ObjectRefcount), "a value's references"
        ),
    ],
)


# -- MEMORY -------------------------------------------------------------------------------


class MemoryUsage(ops.ShardOp):
    """MEMORY USAGE: the bytes the engine tracks for the key (nil for a missing key).

    Exactly what the key adds to the :class:`~kvmemo.eviction.memory.MemoryTracker`
    (``ShardStore.entry_bytes``): the estimate of its key, value, TTL and
    eviction bookkeeping that ``maxmemory`` and eviction count, so the
    answers over all keys sum to ``used_memory``. SAMPLES is parsed and
    checked as Redis does and has no effect (strings have no nested values).
    Unlike Redis, a key past its expiry but not yet reclaimed answers nil.
    """

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> int | None:
        return store.entry_bytes(self.key, now)


def _memory_usage(args: Sequence[bytes], ctx: ParseContext) -> MemoryUsage:
    # As Redis's memoryCommand: every option is checked before the key is
    # looked up; SAMPLES takes a count >= 0 (0: all).
    i = 1
    while i < len(args):
        if upper(args[i]) == b"SAMPLES" and i + 1 < len(args):
            if parse_int(args[i + 1]) < 0:
                raise CommandSyntaxError(SYNTAX)
            i += 2
        else:
            raise CommandSyntaxError(SYNTAX)
    return MemoryUsage(args[0])


@attrs.frozen
class MemoryFigures:
    """One shard's view of memory: its live keys and the (shared) tracker's figures."""

    keys: int
    used: int
    peak: int
    maxmemory: int
    over_watermark: bool
    policy: str


class _FiguresPart(ops.Part):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> MemoryFigures:
        tracker = store.tracker
        return MemoryFigures(
            store.live_count(now),
            tracker.used,
            tracker.peak,
            tracker.maxmemory,
            tracker.over_watermark,
            store.policy.name,
        )


def _totals(results: list[MemoryFigures]) -> tuple[int, MemoryFigures]:
    """Live keys over all shards, and the tracker's figures as the last shard read them."""
    return sum(r.keys for r in results), results[-1]


class MemoryStats(ops.KeyspaceOp):
    """MEMORY STATS: Redis's field names that KVMemo can fill honestly (a map in RESP3).

    - ``peak.allocated``: the highest tracked usage so far (``MemoryTracker.peak``);
    - ``total.allocated``: the tracked usage, the figure INFO's ``used_memory``
      gives and ``maxmemory`` limits: KVMemo's estimate of its entries, not
      the process's allocations (CPython's allocator keeps no such count);
    - ``keys.count``: live keys;
    - ``keys.bytes-per-key``: ``total.allocated // keys.count`` (0 with no key);
    - ``dataset.bytes``: the same tracked usage: it is all entries.

    Omitted, because KVMemo measures none of them (a made-up 0 would
    mislead): ``startup.allocated``, ``replication.backlog``,
    ``clients.slaves``, ``clients.normal``, ``cluster.links``,
    ``aof.buffer``, ``lua.caches``, ``functions.caches``, ``db.0``,
    ``overhead.total``, ``dataset.percentage``, ``peak.percentage`` and the
    ``allocator*``, ``rss-overhead.*`` and ``fragmentation*`` fields.
    """

    def part(self) -> ops.Part:
        return _FiguresPart()

    def combine(self, results: list[Any]) -> FieldList:
        keys, figures = _totals(results)
        used = figures.used
        return FieldList(
            [
                b"peak.allocated",
                max(figures.peak, used),
                b"total.allocated",
                used,
                b"keys.count",
                keys,
                b"keys.bytes-per-key",
                used // keys if keys else 0,
                b"dataset.bytes",
                used,
            ]
        )


class MemoryDoctor(ops.KeyspaceOp):
    """MEMORY DOCTOR: what KVMemo knows, in a few honest lines (a bulk string).

    Redis's doctor reads its allocator's fragmentation and RSS figures;
    KVMemo has only its tracked estimate, so it says so and reports that.
    """

    def part(self) -> ops.Part:
        return _FiguresPart()

    def combine(self, results: list[Any]) -> bytes:
        keys, f = _totals(results)
        limit = f"maxmemory {f.maxmemory} bytes" if f.maxmemory else "no maxmemory limit"
        lines = [
            "KVMemo tracks memory as an estimate per entry and has no allocator statistics,"
            " so it cannot look for fragmentation or RSS issues.",
            f"Tracked: {f.used} bytes for {keys} keys (peak {max(f.peak, f.used)}), {limit},"
            f" eviction policy {f.policy}.",
        ]
        if f.over_watermark:
            lines.append(
                "Usage is at or above the eviction watermark: the eviction policy is freeing keys."
            )
        return "\n".join(lines).encode() + b"\n"


MEMORY_HELP = [
    "MEMORY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "DOCTOR",
    "    Return memory problems reports.",
    "MALLOC-STATS",
    "    Return internal statistics report from the memory allocator.",
    "PURGE",
    "    Attempt to purge dirty pages for reclamation by the allocator.",
    "STATS",
    "    Return information about the memory usage of the server.",
    "USAGE <key> [SAMPLES <count>]",
    "    Return memory in bytes used by <key> and its value, as KVMemo tracks it.",
    "    SAMPLES is accepted and has no effect (values are strings).",
    "HELP",
    "    Prints this help.",
]


def _keyspace(op: type[ops.KeyspaceOp]) -> Parser:
    def parse_keyspace(args: Sequence[bytes], ctx: ParseContext) -> ops.KeyspaceOp:
        return op()

    return parse_keyspace


container(
    "memory",
    "readonly",
    "memory figures of a key or of the server (subcommands)",
    "1.3",
    [
        subcommand(
            "doctor", 2, "", NOKEYS, _keyspace(MemoryDoctor), "what KVMemo knows of its memory"
        ),
        subcommand("help", 2, "", NOKEYS, fixed_reply(MEMORY_HELP), "show helpful text"),
        # CPython's allocator has neither statistics to print nor a purge.
        subcommand(
            "malloc-stats", 2, "", NOKEYS, fixed_reply(MALLOC_STATS), "allocator statistics"
        ),
        subcommand(
            "purge", 2, "", NOKEYS, fixed_reply(ops.OK), "purge the allocator (does nothing)"
        ),
        subcommand("stats", 2, "", NOKEYS, _keyspace(MemoryStats), "memory figures of the server"),
        subcommand("usage", -3, "readonly", SUB_KEY, _memory_usage, "bytes tracked for a key"),
    ],
)


# -- LASTSAVE -----------------------------------------------------------------------------


class _SavesPart(ops.Part):
    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> tuple[float | None, float]:
        durability = store.durability
        last = durability.last_save if durability is not None else None
        return last, store.started_at


class LastSave(ops.KeyspaceOp):
    """LASTSAVE: Unix seconds of the last snapshot of *every* shard.

    With persistence on and every shard snapshotted since start: the oldest
    shard's last successful snapshot, i.e. the time by which all data was
    saved; ``info persistence`` reports the same figure as ``last_save``.
    Before that, or with persistence off: when the shards' data began (the
    node's start; ``ShardStore.started_at``), as Redis answers its start
    time, counting data loaded at start as saved.
    """

    def part(self) -> ops.Part:
        return _SavesPart()

    def combine(self, results: list[Any]) -> int:
        saves = [last for last, _ in results]
        if saves and all(last is not None for last in saves):
            return int(min(s for s in saves if s is not None))
        return int(min(started for _, started in results))


@command("lastsave", 1, "admin fast", NOKEYS, "Unix time of the last snapshot of all shards", "1.3")
def _lastsave(args: Sequence[bytes], ctx: ParseContext) -> LastSave:
    return LastSave()
