"""The Shard actor: a thin trio wrapper around one :class:`ShardStore`.

The store is the actor's state that outlives its task (see
``actors.StateHooks``): a killed or crashed shard comes back with its data,
after :meth:`ShardStore.check_invariants` accepted it, or with a repaired
copy when it did not.

Every message has ``apply(store, now)``, run synchronously, so the shard's
mailbox is its lock and each message's effect is atomic with respect to
cancellation. The one exception is :class:`Hold`, the shard's side of an
atomic multi-shard write: prepare, wait (shielded, bounded) for the engine's
decision, then commit or abort; other shards keep serving meanwhile.

A round's holds share one deadline: the first shard to prepare waits under
a cancel scope of ``hold_timeout`` (shielded, with its own deadline), and
when that passes it decides the round (abort) for every shard; the others,
which prepared later and so would time out later, wait for the decision
without a scope of their own (a cancel scope costs about 5 µs; a round of
an MSET burst holds every shard).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from actors import DEFER, Actor, ActorContext, ReplySlot

from ..errors import KVMemoError
from ..eviction.memory import MemoryTracker
from ..eviction.policies import EvictionPolicy
from .durability import Journal
from .store import SCAN_SNAPSHOTS, NeedMemory, ShardStore

_reschedule = trio.lowlevel.reschedule
_FAILED = trio.lowlevel.Abort.FAILED


def _cannot_abort(raise_cancel: Any) -> trio.lowlevel.Abort:
    """A held shard's wait cannot be cancelled (see :meth:`Barrier.park`)."""
    return _FAILED


class Barrier:
    """Coordinates the shards of one atomic multi-shard write.

    Invariants: ``decided`` is set exactly once, by the engine (after every
    shard arrived, or one failed) or by a shard whose hold timed out (an
    abort); a shard commits only if the decision is ``commit``; ``ready`` is
    set once every shard arrived, one failed, or the decision was made.
    ``timed`` is set by the first shard to prepare, which waits with the
    round's deadline; every shard ``parked`` (a later one, without a deadline
    of its own) is rescheduled by the decision, and only by it.

    A *deferred* round (:meth:`defer`: a transaction, whose effects are known
    only once its steps ran) has a third phase: each shard commits, hands
    the records its commit journalled to ``effects`` and holds on until
    ``logged`` is set (the engine wrote the intent, with them); only then do
    the records go back to its journal. ``applied`` is set once every shard
    handed its records.
    """

    __slots__ = (
        "applied",
        "arrived",
        "commit",
        "decided",
        "down",
        "effects",
        "failed",
        "handed",
        "logged",
        "n",
        "parked",
        "ready",
        "timed",
        "txid",
        "votes",
    )

    def __init__(self, n: int) -> None:
        self.n = n
        # The round's txid once the engine wrote its intent (0: no intent);
        # set before the decision (after it, before ``logged``, when
        # deferred), read by each shard after it.
        self.txid = 0
        self.effects: list[bytes] | None = None  # per shard, when deferred
        self.handed = 0
        self.applied: trio.Event | None = None
        self.logged: trio.Event | None = None
        self.votes: list[object] = [None] * n
        self.arrived = 0
        self.failed = False
        self.commit = False
        self.ready = trio.Event()  # every shard prepared, or one failed
        self.decided = trio.Event()
        self.down: int | None = None  # a shard that went down before it prepared
        self.timed = False  # a shard holds with the round's deadline (see ShardActor._hold)
        self.parked: list[trio.lowlevel.Task] = []  # shards waiting for the decision

    def defer(self) -> None:
        """Make this a deferred round (before the decision; see the class docstring)."""
        self.effects = [b""] * self.n
        self.applied = trio.Event()
        self.logged = trio.Event()

    def hand(self, index: int, records: bytes) -> None:
        """Shard ``index`` committed; ``records`` are what its commit journalled."""
        assert self.effects is not None
        assert self.applied is not None
        self.effects[index] = records
        self.handed += 1
        if self.handed == self.n:
            self.applied.set()

    def arrive(self, index: int, vote: object) -> None:
        self.votes[index] = vote
        self.arrived += 1
        if self.arrived == self.n:
            self.ready.set()

    def fail(self) -> None:
        self.failed = True
        self.ready.set()

    def went_down(self, index: int) -> None:
        """Monitor callback: shard ``index`` ended; if it had not prepared, the round fails."""
        if self.votes[index] is None and not self.ready.is_set():
            self.down = index
            self.fail()

    def decide(self, commit: bool) -> bool:
        """Record the decision unless one was made; return the decision in force.

        A decision also sets ``ready``: once a shard's hold timed out (an
        abort), the engine has nothing left to wait for.
        """
        if not self.decided.is_set():
            self.commit = commit and not self.failed
            self.decided.set()
            self.ready.set()
            parked = self.parked
            if parked:
                self.parked = []
                for task in parked:
                    _reschedule(task)
        return self.commit

    async def park(self) -> None:
        """Wait for the decision, uncancellably.

        For a shard that prepared after the ``timed`` one: as shielded as a
        shielded scope (a cancellation is delivered at the next checkpoint
        after the decision), and as bounded, by the timed shard's deadline,
        which comes first. No wait at all once the decision is made.
        """
        if self.decided.is_set():
            return
        self.parked.append(trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(_cannot_abort)


class PartSlot(ReplySlot):
    """A reply slot that tells the barrier when its shard failed before arriving."""

    __slots__ = ("barrier",)

    def __init__(self, barrier: Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self.barrier.fail()


class Hold:
    """Prepare ``part`` on this shard, hold until decided, then commit or abort."""

    __slots__ = ("barrier", "index", "part")

    def __init__(self, barrier: Barrier, index: int, part: Any) -> None:
        self.barrier = barrier
        self.index = index
        self.part = part


ABORTED = object()
"""The reply of a shard whose part of an atomic write was aborted."""


class ShardBatch:
    """Several single-key operations for one shard, applied in order.

    An operation's client error becomes its result; a :class:`NeedMemory`
    stops the batch there, so that the engine can make room and resubmit the
    rest in order (requests on one key take effect in sending order).

    ``answers`` is the list :meth:`apply` returns, kept on the message: when
    the shard then fails the whole reply (a durable shard that could not
    log the batch's writes), the engine, which holds the message, still
    learns what each operation did (see ``KVEngine._finish_batch``).
    """

    __slots__ = ("answers", "ops")

    def __init__(self, ops: list[Any]) -> None:
        self.ops = ops
        self.answers: list[Any] = []

    def apply(self, store: ShardStore, now: float) -> list[Any]:
        results: list[Any] = []
        self.answers = results
        for op in self.ops:
            try:
                results.append(op.apply(store, now))
            except NeedMemory as exc:
                results.append(exc)
                break
            except KVMemoError as exc:
                results.append(exc)
        return results


class SwitchPolicy:
    """Rank this shard's keys with a new eviction policy (see ``ShardStore.switch_policy``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], EvictionPolicy]) -> None:
        self.make = make

    def apply(self, store: ShardStore, now: float) -> None:
        store.switch_policy(self.make())


class ExpireDue:
    """Active expiry: remove up to ``budget`` due keys; reply (removed, backlog).

    Sent to every shard on each TTL-manager tick, so it also marks the time
    of the policy clock (``ShardStore.mark_time``, at most once a second):
    the marks ``OBJECT IDLETIME`` reads, taken here so that no read or write
    reads a clock for them.
    """

    __slots__ = ("budget",)

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def apply(self, store: ShardStore, now: float) -> tuple[int, bool]:
        store.mark_time(now)
        return store.expire_due(now, self.budget)


class Candidates:
    """Eviction candidates from the shard's policy: [(score, key, bytes)]."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count

    def apply(self, store: ShardStore, now: float) -> list[tuple[int, bytes, int]]:
        return store.eviction_candidates(self.count)


class Evict:
    """Delete these victims if still present; reply (keys, bytes) freed."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def apply(self, store: ShardStore, now: float) -> tuple[int, int]:
        return store.evict(self.keys)


class Reconcile:
    """Repair the TTL index from the entries if it drifted; reply whether it did."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> bool:
        return store.reconcile_ttl_index()


class Stats:
    """Counters of the shard for ``info``."""

    __slots__ = ()

    def apply(self, store: ShardStore, now: float) -> dict[str, int]:
        return {
            "keys": store.live_count(now),
            "expires": store.volatile_count(now),
            "used_memory": store.used,
            "expired_keys": store.expired_count,
            "evicted_keys": store.evicted_count,
            "ttl_index": len(store.ttl_index),
            "scan_snapshot_keys": store.scan_snapshot_keys(),
        }


class Inspect:
    """Run ``fn(store)`` inside the shard (tests and chaos tooling only)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[ShardStore], Any]) -> None:
        self.fn = fn

    def apply(self, store: ShardStore, now: float) -> Any:
        return self.fn(store)


class ShardActor(Actor):
    """Owns one shard's store; serves one message at a time."""

    expected_errors = (KVMemoError,)

    def __init__(self, ctx: ActorContext, hold_timeout: float) -> None:
        self.store: ShardStore = ctx.state
        self.hold_timeout = hold_timeout
        # The run's clock, read directly: ``trio.current_time()`` finds it
        # through the runner on every call, and it cannot change during a run
        # (an actor is built inside the run, once per incarnation).
        self._now = trio.lowlevel.current_clock().current_time
        # A first mark of the policy clock as the shard (re)starts, before any
        # command: keys written before the first expiry sweep then read their
        # idle time from here, not from that sweep (see ExpireDue).
        self.store.mark_time(self._now())

    async def handle(self, message: Any) -> Any:
        if type(message) is Hold:
            return await self._hold(message)
        return message.apply(self.store, self._now())

    def handle_nowait(self, message: Any) -> Any:
        """Every message but :class:`Hold` runs synchronously (the runtime's fast path)."""
        if type(message) is Hold:
            return DEFER
        return message.apply(self.store, self._now())

    async def _hold(self, message: Hold) -> Any:
        store = self.store
        part = message.part
        barrier = message.barrier
        barrier.arrive(message.index, part.prepare(store, self._now()))
        # Shielded (a kill waits for the decision, at most hold_timeout) and
        # bounded: the first shard to prepare waits in one scope with the
        # hold's own deadline (a shield does not stop a scope's own
        # deadline), and its timeout decides the round for all (see the
        # module docstring); the others park. What follows has no
        # checkpoint, so a kill cannot land between the decision and the
        # commit.
        if not barrier.decided.is_set():
            if barrier.timed:
                await barrier.park()
            else:
                barrier.timed = True
                with trio.CancelScope(shield=True, relative_deadline=self.hold_timeout):
                    await barrier.decided.wait()
        # A round with an intent (persistence on) is marked in this shard's
        # log after its part, committed or aborted: recovery reads the marks
        # against the intent log (kvmemo.persistence.intents).
        journal = store.journal
        if barrier.decide(False):
            if barrier.logged is not None and journal is not None:
                return await self._commit_deferred(message, journal)
            result = part.commit(store, self._now())
            if barrier.txid and journal is not None:
                journal.mark(barrier.txid, True)
            return result
        part.abort(store)
        if barrier.txid and journal is not None:
            journal.mark(barrier.txid, False)
        return ABORTED

    async def _commit_deferred(self, message: Hold, journal: Journal) -> Any:
        """Commit a deferred round's part; journal it only once the intent is written.

        The shard keeps holding (nothing else runs on it, so nobody reads
        the part before its intent is durable, and no later write gets
        journalled before it), shielded and without a deadline of its own:
        the engine sets ``logged`` whatever happens once it decided commit
        (its own wait is bounded, and shielded), and a part journalled
        before its intent is durable could be left alone by a crash.
        """
        barrier = message.barrier
        assert barrier.logged is not None
        before = len(journal.records)
        # Self-contained records (no PATCH): a redo applies them at the end
        # of the shard's log, which may lack this batch's earlier writes,
        # the ones the part's edits were made after.
        whole, journal.whole = journal.whole, True
        try:
            result = message.part.commit(self.store, self._now())
        finally:
            journal.whole = whole
        records = journal.records[before:]
        del journal.records[before:]
        barrier.hand(message.index, b"".join(records))
        with trio.CancelScope(shield=True):
            await barrier.logged.wait()
        journal.records.extend(records)
        if barrier.txid:
            journal.mark(barrier.txid, True)
        return result


def shard_state_factory(
    shard_id: int,
    tracker: MemoryTracker,
    make_policy: Callable[[], EvictionPolicy],
    *,
    scan_snapshots: int = SCAN_SNAPSHOTS,
) -> tuple[Callable[[], ShardStore], Callable[[Any], bool], Callable[[Any], ShardStore]]:
    """The (initial, check, rebuild) hooks of one shard's lasting state."""

    def initial() -> ShardStore:
        return ShardStore(shard_id, make_policy(), tracker, scan_snapshots=scan_snapshots)

    def check(store: Any) -> bool:
        return isinstance(store, ShardStore) and store.check_invariants()

    def rebuild(store: Any) -> ShardStore:
        if isinstance(store, ShardStore):
            return store.repaired(make_policy())
        tracker.reset_shard(shard_id, 0)
        return initial()

    return initial, check, rebuild
