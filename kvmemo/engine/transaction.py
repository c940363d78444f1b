"""Transactions (MULTI/EXEC): several commands as one atomic step across shards.

Design. A transaction is planned into one list of *steps* per shard, each
step a piece of one command that touches only that shard's keys, in the
order of the commands. The engine holds every shard involved, with the hold
of MSET (two phases, under its writer lock), and on the decision each shard
runs its steps in order, synchronously, inside its own actor: nothing
outside an actor touches its state. Then the engine puts each command's
pieces together (``combine``) into its result.

Why per-shard order is enough: every step depends only on the state of its
own shard, so running each shard's steps in command order gives exactly the
results of running the commands one after the other; and since no shard
serves anything else between the hold and its steps, no other client sees
part of the transaction, nor slips a command into it. Commands that move
data *between* shards (RENAME, RENAMENX and COPY whose keys live on two
shards, MSETNX whose condition spans shards) have no such piece, so a
transaction refuses them when it is queued: keep their keys on one shard
with a ``{hash tag}``, as Redis Cluster asks (its ``CROSSSLOT``).

Errors, as in Redis: a command that fails while the transaction runs (a
wrong type of argument, ``NOT_INTEGER``, ``OOM``) gives its error in its
place, and the other commands still run; nothing is rolled back. A write
that needs memory does not evict while the shards are held (the eviction
manager would wait for them): the engine makes room before it holds, and a
write that still does not fit gets ``OOM``. A multi-shard MSET is the one
exception, because it must stay all-or-nothing: its bytes are reserved in
the prepare phase (exact when nothing before it writes on that shard, else
an upper bound), so it never fails half-way. Checks at queue time are
Redis's: an unknown command or a wrong number of arguments discards the
transaction; any other error of a command is given in its place.

WATCH. A shard's store gives each watched key a version that changes with
every write to it (:meth:`ShardStore.watch`; versions are unique in the
process, so one never recurs); a transaction carries the versions its
client saw at WATCH time, and a shard on which one moved votes against it:
nothing runs and EXEC answers nil.

Atomic in memory, not across a crash: each shard writes its part to its own
log, so a crash between two shards' writes can leave an unacknowledged
transaction in part on disk (as for a multi-shard MSET).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..commands import ops
from ..commands.table import FixedReply, ServerCall
from ..errors import CommandSyntaxError, KVMemoError, OutOfMemoryError
from ..eviction.memory import MemoryTracker
from ..storage.store import NeedMemory, ShardStore

SERVER_CALLS = frozenset(
    {
        "ping",
        "echo",
        "time",
        "publish",
        "spublish",
        "pubsub|channels",
        "pubsub|numsub",
        "pubsub|numpat",
        "pubsub|shardchannels",
        "pubsub|shardnumsub",
    }
)
"""Engine-answered commands a transaction may hold (answered when it runs)."""

WATCH_CHANGED = "watch-changed"
"""The vote of a shard on which a watched key was written since WATCH."""


class Step:
    """One command's piece on one shard: ``run`` gives its result or raises a client error."""

    __slots__ = ()
    write = True  # whether it may change the store

    def run(self, store: ShardStore, now: float) -> Any:
        raise NotImplementedError


class ApplyStep(Step):
    """A single-key operation or a plain part (DEL, EXISTS, MGET, KEYS, ... on this shard)."""

    __slots__ = ("target", "write")

    def __init__(self, target: ops.ShardOp | ops.Part) -> None:
        self.target = target
        # Whether it may write: a part does not say, so it may.
        self.write: bool = getattr(target, "write", True)

    def run(self, store: ShardStore, now: float) -> Any:
        return self.target.apply(store, now)


class LocalAtomicStep(Step):
    """A multi-key write whose keys are all on this shard: prepare and decide here.

    MSETNX, RENAME, RENAMENX, COPY and BITOP, with all their keys on one
    shard. What the engine does across shards (read the sources, ask every shard, decide),
    one shard does alone, in one synchronous step.
    """

    __slots__ = ("op",)

    def __init__(self, op: ops.AtomicOp) -> None:
        self.op = op

    def run(self, store: ShardStore, now: float) -> Any:
        op = self.op
        positions = list(range(len(op.keys)))
        if isinstance(op, ops.Move):
            entry = ops.PeekEntry(op.src).apply(store, now)
            answer = op.sources_read([entry], [positions])
            if answer is not ops.NO_ANSWER:
                return answer
        part = op.part(positions)
        vote = part.prepare(store, now)
        if vote is True:
            part.commit(store, now)
            return op.combine([None], [positions], True)
        part.abort(store)
        if isinstance(vote, NeedMemory):
            raise vote
        return op.combine([None], [positions], False)


class ReservedMSetStep(Step):
    """This shard's pairs of a multi-shard MSET, its bytes reserved by the prepare phase.

    :meth:`bound` is at least what the pairs can add, whatever the store
    holds when they run (every key new); :class:`TxnPart` reserves it in the
    prepare phase, and the step turns that reservation into the exact one
    (:meth:`ShardStore.put_delta`) and writes. So it never fails, and the
    MSET is whole on every shard or on none.
    """

    __slots__ = ("items", "reserved")

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self.items = items
        self.reserved = 0

    def bound(self, store: ShardStore, now: float, *, exact: bool) -> int:
        """Bytes to reserve: what the pairs add to the store as it is now (``exact``,
        when no earlier step of the transaction writes on this shard), else
        what they can add at most, whatever the earlier steps did (every key new)."""
        if exact:
            return max(0, store.put_delta(self.items, now))  # a shrink is settled by run
        return sum(store.entry_size(k, v) for k, v in self.items)

    def run(self, store: ShardStore, now: float) -> Any:
        delta = store.put_delta(self.items, now)
        store.tracker.release(store.shard_id, self.reserved - delta)
        self.reserved = 0
        store.put_many(self.items, now)
        return ops.OK


class TxnPart(ops.AtomicPart):
    """One shard's share of a transaction: its steps and the watched keys it checks.

    ``prepare`` checks the watched keys' versions (one that moved votes
    :data:`WATCH_CHANGED`; an entry past its expiry is removed first, so an
    expiry counts as a change, as in Redis) and reserves the bytes of every
    :class:`ReservedMSetStep` (``wanted``: what it asked for, granted or
    not); ``commit`` runs the steps in order, at the time ``prepare`` saw
    (what it checked and reserved holds then), and returns their results, a
    client error in the place of a step that failed (each reserved MSET
    step turns its reservation into the exact one); ``abort`` gives the
    reservation back.
    """

    def __init__(self, steps: list[Step], watches: Sequence[tuple[bytes, int]]) -> None:
        self.steps = steps
        self.watches = watches
        self.reserved: list[ReservedMSetStep] = []
        self.wanted = 0
        self.prepared_at = 0.0

    def prepare(self, store: ShardStore, now: float) -> object:
        self.prepared_at = now
        for key, seen in self.watches:
            store.peek(key, now)
            if store.watch_count(key) != seen:
                return WATCH_CHANGED
        msets: list[tuple[ReservedMSetStep, int]] = []
        written = False  # by an earlier step: the store may differ when this one runs
        for step in self.steps:
            if type(step) is ReservedMSetStep:
                msets.append((step, step.bound(store, now, exact=not written)))
            written = written or step.write
        if msets:
            self.wanted = total = sum(bound for _, bound in msets)
            if not store.tracker.try_reserve(store.shard_id, total):
                return NeedMemory(total)
            for step, bound in msets:
                step.reserved = bound
            self.reserved = [step for step, _ in msets]
        return True

    def commit(self, store: ShardStore, now: float) -> list[Any]:
        self.reserved = []  # each ReservedMSetStep settles its own share
        at = self.prepared_at
        results: list[Any] = []
        with store.one_record():  # this shard's part: all of it, or none, after a crash
            for step in self.steps:
                try:
                    result = step.run(store, at)
                except NeedMemory:
                    # The shard's internal "make room and ask again": nothing
                    # can be evicted while the shards are held, so it is the
                    # caller's OOM, the public error execute_many gives.
                    result = out_of_memory(store.tracker)
                except KVMemoError as exc:
                    result = exc
                else:
                    if isinstance(result, NeedMemory):  # a step may return it too
                        result = out_of_memory(store.tracker)
                results.append(result)
        return results

    def abort(self, store: ShardStore) -> None:
        for step in self.reserved:
            store.tracker.release(store.shard_id, step.reserved)
            step.reserved = 0
        self.reserved = []


def out_of_memory(tracker: MemoryTracker) -> OutOfMemoryError:
    """The public ``OOM`` of a write that found no room, with the tracker's figures.

    ``data``: ``used`` and ``maxmemory`` (bytes) when it was refused.
    """
    return OutOfMemoryError(
        "command not allowed when used memory > 'maxmemory'",
        used=tracker.used,
        maxmemory=tracker.maxmemory,
    )


def cross_shard_refusal(op: object, shards: int) -> CommandSyntaxError | None:
    """Why ``op`` (on keys spanning ``shards`` shards) cannot be in a transaction, or None."""
    if isinstance(op, ServerCall):
        if op.name in SERVER_CALLS or type(op) is FixedReply:
            return None
        return CommandSyntaxError(f"'{op.name}' is not allowed in a transaction")
    if shards <= 1 or not isinstance(op, ops.AtomicOp) or op.readonly:
        return None
    if isinstance(op, ops.MSet) and not op.only_new:
        return None
    name = op.kind.upper() if isinstance(op, ops.ReadThenWrite) else "MSETNX"
    return CommandSyntaxError(
        f"{name} in a transaction needs all its keys on one shard"
        " (give them one {hash tag}, as Redis Cluster asks)"
    )


class WatchKeys:
    """Shard message: watch these keys (one more watcher each); their write counts."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def apply(self, store: ShardStore, now: float) -> list[int]:
        for key in self.keys:
            store.peek(key, now)  # an entry past its expiry goes now: a later expiry is a change
        return [store.watch(key) for key in self.keys]


class UnwatchKeys:
    """Shard message: one watcher fewer for each of these keys."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def apply(self, store: ShardStore, now: float) -> None:
        for key in self.keys:
            store.unwatch(key)


class Plan:
    """A transaction taken apart: each shard's steps, and how each command's pieces combine.

    Built by the engine from the parsed commands (:meth:`add`), in command
    order, so each shard's steps are in command order. ``results`` puts the
    shards' answers back together, one result per command.
    """

    def __init__(self, calls: int) -> None:
        self.steps: dict[int, list[Step]] = {}
        self.writes = False
        self.size = 0  # argument bytes of the writes: a rough bound of what they add
        # Per command: its pieces as (shard, index among that shard's steps), and
        # how to make its result of their answers (or its result already).
        self._pieces: list[list[tuple[int, int]]] = [[] for _ in range(calls)]
        self._finish: list[Callable[[list[Any]], Any] | None] = [None] * calls
        self._done: dict[int, Any] = {}
        self.server_calls: dict[int, ServerCall] = {}

    def fail(self, index: int, error: KVMemoError) -> None:
        self._done[index] = error

    def _step(self, index: int, shard: int, step: Step) -> None:
        steps = self.steps.setdefault(shard, [])
        self._pieces[index].append((shard, len(steps)))
        steps.append(step)

    def add(
        self,
        index: int,
        op: Any,
        args: Sequence[bytes],
        group_by_shard: Callable[[Sequence[bytes]], dict[int, list[int]]],
        shard_of: Callable[[bytes], int],
        shards: int,
    ) -> None:
        """Plan command ``index``; its client error (a refused command) is its result."""
        if getattr(op, "write", False):
            self.writes = True
            # What the write brings: its arguments, or what the op says it
            # will write when that differs (RESTORE of a compressed payload).
            self.size += getattr(op, "write_bytes", None) or sum(map(len, args))
        if isinstance(op, ServerCall):
            refusal = cross_shard_refusal(op, 1)
            if refusal is not None:
                self.fail(index, refusal)
            else:
                self.server_calls[index] = op
            return
        if isinstance(op, ops.ShardOp):
            self._step(index, shard_of(op.key), ApplyStep(op))
            self._finish[index] = _first
            return
        if isinstance(op, ops.KeyspaceOp):
            for shard in range(shards):
                self._step(index, shard, ApplyStep(op.part()))
            self._finish[index] = op.combine
            return
        groups: dict[int, list[int]] = group_by_shard(op.keys)
        positions = list(groups.values())
        if isinstance(op, ops.FanOutOp):
            for shard, where in groups.items():
                self._step(index, shard, ApplyStep(op.part([op.keys[i] for i in where])))
            self._finish[index] = lambda results: op.combine(results, positions)
            return
        assert isinstance(op, ops.AtomicOp)
        if op.readonly:
            for shard, where in groups.items():
                self._step(index, shard, ApplyStep(op.read_part(where)))
            self._finish[index] = lambda results: op.combine(results, positions, True)
            return
        if len(groups) == 1:
            (shard,) = groups
            self._step(index, shard, LocalAtomicStep(op))
            self._finish[index] = _first
            return
        refusal = cross_shard_refusal(op, len(groups))
        if refusal is not None:
            self.fail(index, refusal)
            return
        assert isinstance(op, ops.MSet)
        for shard, where in groups.items():
            self._step(index, shard, ReservedMSetStep([op.items[i] for i in where]))
        self._finish[index] = lambda results: ops.OK

    def results(self, answers: dict[int, list[Any]]) -> list[Any]:
        """Each command's result from each shard's step answers (server calls: None yet)."""
        out: list[Any] = []
        for index, pieces in enumerate(self._pieces):
            if index in self._done:
                out.append(self._done[index])
                continue
            if not pieces:
                out.append(None)  # a server call: the engine answers it
                continue
            found = [answers[shard][i] for shard, i in pieces]
            error = next((r for r in found if isinstance(r, KVMemoError)), None)
            if error is not None:
                out.append(error)
                continue
            finish = self._finish[index]
            assert finish is not None  # a command planned into pieces has one
            try:
                out.append(finish(found))
            except KVMemoError as exc:
                out.append(exc)
        return out


def _first(results: list[Any]) -> Any:
    return results[0]
