"""KVEngine: routes every command to the shards that own its keys.

The engine owns no data. It parses a call through the command table, checks
the size limits, routes the operation by hash slot to the owning shard actor
(or fans it out, or runs the two-phase protocol for atomic multi-shard
writes), translates actor failures into the protocol's errors, and executes
what the TTLManager and the EvictionManager decide (sweeps, victims).

Errors the caller sees, and when:
- ``UNAVAILABLE`` (nothing applied): the owning shard is restarting, or its
  handler never started (an injected fault). A multi-key command checks
  every shard it needs before it sends anything.
- ``TIMEOUT`` with ``applied`` null: no answer within ``request_timeout``;
  the operation may still take effect. With ``applied`` false: an atomic
  multi-shard write was aborted everywhere because a shard held its part
  longer than ``hold_timeout`` waiting for another.
- ``OOM``: a write over ``maxmemory`` after eviction had ``oom_wait`` seconds
  (and ``MAKE_ROOM_ROUNDS`` rounds) to make room; at once when eviction
  freed nothing (``noeviction``, or the eviction manager is down).
- ``INTERNAL`` with ``applied`` null: a shard crashed inside the handler (a bug).
- ``UNAVAILABLE`` "the store is closed": the store stopped, for good (no
  ``retry_after_ms``: no retry helps), whether the call came after the stop or
  was still waiting for its shards when the stop began.

A call from outside the trio run the store runs in (a store kept in a global
and called from a second ``trio.run``, or from another thread) raises
``RuntimeError`` before it touches anything: trio's channels and tasks belong
to one run, and a message sent from another would wake the shard's task from
the wrong run (trio fails on an ``AssertionError`` halfway, having already
taken the shard off its mailbox: the store would hang). Design: the run's
``TrioToken`` is taken once, at :meth:`KVEngine.attach`; every entry point
compares ``current_trio_token()`` with it by identity before anything else
(about 0.1 us, against about 30 us for a whole embedded GET).
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from actors import (
    ActorContext,
    ActorCrashed,
    ActorKilled,
    ActorRef,
    ActorState,
    ActorStopped,
    ActorSystem,
    AskTimeout,
    Backoff,
    ChildSpec,
    Intensity,
    MailboxFull,
    ReplySlot,
    RestartType,
    StateHooks,
    Strategy,
    Supervisor,
)

from .._version import __version__
from ..commands import ops
from ..commands.args import Clock
from ..commands.table import (
    COMMANDS,
    Command,
    FixedReply,
    ParseContext,
    ServerCall,
    lookup,
    parse,
    table_arity_ok,
)
from ..config import StoreConfig
from ..errors import (
    ArityError,
    CommandSyntaxError,
    DisabledError,
    InternalError,
    KVMemoError,
    OutOfMemoryError,
    PersistenceIOError,
    RequestTimeoutError,
    TooLargeError,
    UnavailableError,
    UnknownCommandError,
)
from ..eviction.manager import Candidate, EvictionManager, EvictNow, Wake
from ..eviction.memory import MemoryTracker, entry_size_bound
from ..eviction.policies import EvictionPolicy, NoEvictionPolicy, make_policy
from ..expiry.ttl_manager import TTLManager
from ..observability.metrics import BucketCounts, MetricsRegistry
from ..persistence import AppendFsync
from ..persistence.intents import IntentLog
from ..persistence.layout import release_directory
from ..persistence.records import MAX_PAYLOAD, intent_payload
from ..persistence.wal import SegmentedLog
from ..storage.durability import Health, ShardDurability, SnapshotStatus
from ..storage.durable_shard import (
    DurableShardActor,
    SaveTicket,
    SyncMetrics,
    durable_state_factory,
)
from ..storage.shard import (
    ABORTED,
    Barrier,
    Candidates,
    Evict,
    ExpireDue,
    Hold,
    PartSlot,
    Reconcile,
    ShardActor,
    ShardBatch,
    Stats,
    SwitchPolicy,
    shard_state_factory,
)
from ..storage.slots import SlotMap
from ..storage.store import (
    SCAN_BEGIN,
    SCAN_FIELD_BITS,
    NeedMemory,
    ShardStore,
    scan_position_valid,
)
from ..storage.sync_coordinator import LogWrite
from . import durable
from .locks import RWLock
from .pubsub import PubSubHub
from .transaction import (
    WATCH_CHANGED,
    Plan,
    TxnPart,
    UnwatchKeys,
    WatchKeys,
    cross_shard_refusal,
    out_of_memory,
)

TTL_MANAGER = "ttl-manager"
EVICTION_MANAGER = "eviction-manager"
STORAGE_SUPERVISOR = "storage"
EVICTION_SUPERVISOR = "eviction"
SCAN_DEFAULT_COUNT = 10  # keys per SCAN call when COUNT is not given (as Redis)
# A SCAN cursor: shard (14 bits: up to 16384 shards) | field << 14 | tag << 46.
_SCAN_SHARD_BITS = 14
_SCAN_SHARD_MASK = (1 << _SCAN_SHARD_BITS) - 1
WAKE_INTERVAL = 0.001  # seconds; at most one eviction wake-up per interval
MAKE_ROOM_ROUNDS = 8  # evict-and-retry rounds one write may take (within oom_wait) before OOM
OOM_MESSAGE = "command not allowed when used memory > 'maxmemory'"
MOVE_RETRIES = 16  # times RENAME/COPY/BITOP reread sources written under them before giving up
# Under concurrency an MSET leader yields two scheduler passes, then while the last
# one brought new MSETs, at most this many in all, before it takes its round (see
# _grouped_mset).
MSET_GATHER_PASSES = 4
_CLOCK_READ_GAP = 50e-6  # seconds: a pair of clock reads this close is kept at once
_LATE = "the command did not finish in time"
FOREIGN_RUN = (
    "this store runs in another trio run (or thread): call it from the trio run that"
    " opened it (open one store per trio.run)"
)
NOT_STARTED = "the store has not started: attach() it to its running actor system first"
# Error kinds that refuse a call before it runs, nothing applied: Redis's
# rejected_calls (its processCommand's rejectCommand: arity, NOAUTH, OOM of a
# denyoom command, a cluster TRYAGAIN; ours adds the size limits and
# OVERLOADED). Any other error of a command counts as a failed call (Redis's
# failed_calls: the command ran and answered an error): SYNTAX, NOT_INTEGER,
# WRONGTYPE, TIMEOUT, IO, ...
REJECTED_KINDS = frozenset({"ARITY", "NOAUTH", "OOM", "UNAVAILABLE", "OVERLOADED", "TOO_LARGE"})


@attrs.frozen
class CommandStats:
    """One command's counts (INFO commandstats; ``info`` stats' ``commands``).

    Attributes:
        calls: calls that ran: those that succeeded and those that failed
            (Redis's ``calls``; rejected calls never ran, so are not in it).
        seconds: the time of the calls that succeeded (a failed call's is
            not measured).
        failed: calls that ran and answered an error.
        rejected: calls refused before they ran.
    """

    calls: int
    seconds: float
    failed: int
    rejected: int

    def since(self, base: CommandStats | None) -> CommandStats:
        """The counts made after ``base`` (an earlier read of the same command's)."""
        if base is None:
            return self
        return CommandStats(
            self.calls - base.calls,
            self.seconds - base.seconds,
            self.failed - base.failed,
            self.rejected - base.rejected,
        )

    def fields(self) -> dict[str, int | float]:
        """Redis's commandstats fields: calls, usec, usec_per_call, rejected_calls, failed_calls.

        ``usec`` is ``seconds`` in whole microseconds; ``usec_per_call`` is
        ``usec / calls`` (0 without calls), as Redis computes it.
        """
        usec = max(0, round(self.seconds * 1e6))
        return {
            "calls": self.calls,
            "usec": usec,
            "usec_per_call": usec / self.calls if self.calls else 0.0,
            "rejected_calls": self.rejected,
            "failed_calls": self.failed,
        }


async def _checkpoint() -> None:
    """A checkpoint before UNAVAILABLE is raised to the caller.

    A command refused because its shard is down can be refused without ever
    reaching a checkpoint (the shard's state is read synchronously), and a
    caller that retries in a loop would then never let trio run anything
    else, the shard's restart included. Trio's rule is that every async call
    checkpoints; a refusal is the rare path, so it pays for it.
    """
    await trio.lowlevel.checkpoint()


_LEAD = object()  # the reply that makes a waiting MSET lead the next round
_PENDING: Any = object()  # execute_many: a call not answered yet (None is a result)
_FEW_ARGS = 3  # parse: up to this many arguments, lengths are checked by a loop
_RUNNING = ActorState.RUNNING
_current_time = trio.current_time
# Trio's checkpoint convention, as its own primitives keep it: every async entry
# point first checks for cancellation (so that a call made in a cancelled scope
# raises Cancelled and does nothing), then has a schedule point (waiting for a
# shard is one; a reply the engine gives itself needs cancel_shielded_checkpoint).
# The check costs a coroutine await (~0.3 us, 1% of a GET); the public
# alternative, ``current_effective_deadline() == -inf``, costs ~1.2 us.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_current_token = trio.lowlevel.current_trio_token
# A closed engine's token: no caller's is it (see KVEngine.stop_accepting).
_CLOSED_TOKEN: Any = object()
_GET = COMMANDS["get"]
_SET = COMMANDS["set"]
_perf_counter = time.perf_counter
_first = operator.itemgetter(0)


def shard_name(i: int) -> str:
    return f"shard-{i}"


class KVEngine:
    """Routes commands to shard actors and runs expiry and eviction.

    Build it, run :meth:`supervisor` (or the ``kvmemo.open_store`` helper),
    then :meth:`attach` the running actor system before executing commands.

    Args:
        config: the store's configuration (validated).
        metrics: where to record; a fresh registry by default.
    """

    def __init__(self, config: StoreConfig, metrics: MetricsRegistry | None = None) -> None:
        self.config = config
        # Pub/sub (PUBLISH, PUBSUB; the front ends' subscribers): apart from the keyspace.
        self.pubsub = PubSubHub(config.pubsub_buffer_limit, config.pubsub_max_subscriptions)
        self.slots = SlotMap(config.shards)
        self.tracker = MemoryTracker(
            config.maxmemory,
            config.shards,
            watermark=config.eviction_watermark,
            target=config.eviction_target,
        )
        # What a first expiry may take past the limit: one maximum-size entry.
        self.tracker.overdraft = entry_size_bound(config.max_key_size, config.max_value_size)
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        self.system: ActorSystem | None = None
        self._shards: list[ActorRef] = []
        self._eviction: ActorRef | None = None
        self._txn_lock = RWLock()
        self._mset_waiting: list[tuple[ops.MSet, ReplySlot, float]] = []  # (op, slot, deadline)
        self._mset_last_round = 0  # MSETs in the last round taken (see _grouped_mset)
        self._mset_leading = False
        # UNWATCH messages a full mailbox refused: sent again with the next (un)watch.
        self._unwatch_backlog: list[tuple[int, list[bytes]]] = []
        self.persistence = durable.persistence_config(config)
        self._prepared: dict[int, ShardStore] = {}  # recovered stores, taken at first start
        self._closed = False  # set by stop_accepting() or close(), for good
        # The trio run the store runs in (set by attach): see check_run.
        self._token: trio.lowlevel.TrioToken | None = None
        # The intent log of multi-shard rounds (persistence on, after prepare),
        # written under the writer lock, and the last txid given.
        self._intents: IntentLog | None = None
        self._txid = 0
        self._durabilities: list[ShardDurability] = []
        self._dir_lock: int | None = None  # the data directory's lock (prepare to close)
        self._last_wake = -1.0
        self._started_at = time.time()
        # The tickets of the last BGSAVE (see _bgsave_start); none before one.
        self._bgsave: list[SaveTicket] = []
        self._rewrite = durable.Rewrite()  # the last BGREWRITEAOF (see _bgrewriteaof_start)
        # Reused by every parse, restarted per command or batch (see ParseContext).
        self._parse_context = ParseContext(
            self._read_clock,
            config.max_value_size,
            lcs_max_cells=config.lcs_max_cells,
            lcs_max_length=config.lcs_max_length,
        )
        self._policy_name = type(make_policy(config.eviction_policy)).name
        self._small_size_limit = min(config.max_key_size, config.max_value_size)
        self._init_metrics()

    # -- the supervision tree ---------------------------------------------------------

    def child_specs(self) -> list[ChildSpec]:
        """The engine's subtree: storage supervisor, ttl-manager, eviction supervisor."""
        cfg = self.config
        backoff = Backoff(initial=cfg.restart_backoff, maximum=cfg.restart_backoff_max)
        intensity = Intensity(cfg.max_restarts, cfg.restart_period)
        shard_specs = []
        persistence = self.persistence
        sync_metrics = self._sync_metrics

        def start_shard(ctx: ActorContext) -> ShardActor:
            if persistence is not None:
                return DurableShardActor(ctx, cfg.hold_timeout, persistence, sync_metrics)
            return ShardActor(ctx, cfg.hold_timeout)

        policy = self._make_policy  # the current policy (CONFIG SET may change it)
        for i in range(cfg.shards):
            if persistence is not None:
                hooks = durable_state_factory(
                    i,
                    self.tracker,
                    policy,
                    persistence,
                    self._prepared,
                    scan_snapshots=cfg.scan_snapshots,
                )
            else:
                hooks = shard_state_factory(
                    i, self.tracker, policy, scan_snapshots=cfg.scan_snapshots
                )
            shard_specs.append(
                ChildSpec(
                    shard_name(i),
                    start=start_shard,
                    mailbox_capacity=cfg.mailbox_capacity,
                    state=StateHooks(*hooks),
                )
            )
        storage = Supervisor(
            STORAGE_SUPERVISOR, shard_specs, Strategy.ONE_FOR_ONE, intensity, backoff
        )
        ttl = ChildSpec(
            TTL_MANAGER,
            start=lambda ctx: TTLManager(
                self.process_expired,
                self.reconcile_ttl,
                tick=cfg.ttl_tick,
                reconcile_every=cfg.reconcile_every,
                on_sweep=self._expired_sweep.observe,
            ),
        )
        eviction = Supervisor(
            EVICTION_SUPERVISOR,
            [
                ChildSpec(
                    EVICTION_MANAGER,
                    start=lambda ctx: EvictionManager(
                        self.tracker,
                        self.gather_candidates,
                        self.evict,
                        sample=cfg.eviction_sample,
                        on_cycle=self._record_eviction,
                    ),
                )
            ],
            Strategy.ONE_FOR_ONE,
            Intensity(5, 10.0),
            backoff,
        )
        # The eviction subtree is temporary: once it gives up, the engine
        # bypasses eviction (writes past maxmemory get OOM) instead of taking
        # the whole node down with it.
        return [
            ChildSpec.for_supervisor(storage),
            ttl,
            ChildSpec.for_supervisor(eviction, restart=RestartType.TEMPORARY),
        ]

    def supervisor(self, extra: Sequence[ChildSpec] = ()) -> Supervisor:
        """The root supervisor of a node running this engine (plus ``extra`` children)."""
        cfg = self.config
        return Supervisor(
            "root",
            [*self.child_specs(), *extra],
            Strategy.ONE_FOR_ONE,
            Intensity(cfg.max_restarts, cfg.restart_period),
            Backoff(initial=cfg.restart_backoff, maximum=cfg.restart_backoff_max),
        )

    async def prepare(self) -> None:
        """Recover every shard from disk, when persistence is on (before the tree starts).

        Raises:
            CorruptLog, CorruptSnapshot: damage without ``repair``; the message
                names the file and the offset.
            NewerVersion: a newer KVMemo wrote a data file in a format
                version this build cannot read (with ``repair`` too; nothing
                is changed in that file).
            DirectoryInUse: another store has the data directory open (see
                :mod:`kvmemo.persistence.layout`); it stays locked until
                :meth:`close`.
            ShardCountMismatch: the directory was written with another
                number of shards.
            OSError: the data directory cannot be used: it is not a directory,
                or it does not exist and cannot be created. (One that exists
                but cannot be written is served: writes get ``IO`` until it
                can, reads keep working.)
        """
        if self.persistence is not None:
            directory = self.persistence.directory
            try:
                await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
            except OSError as exc:  # FileExistsError: a file of that name
                why = "Not a directory" if isinstance(exc, FileExistsError) else exc.strerror
                raise OSError(exc.errno, f"cannot use data directory {directory}: {why}") from None
            self._dir_lock = await trio.to_thread.run_sync(
                durable.claim_directory, directory, self.config.shards
            )
            try:
                self._prepared, self._intents = await durable.recover_all(
                    self.config, self.persistence, self.tracker
                )
            except BaseException:
                self._release_directory()
                raise
            self._txid = self._intents.last_txid
            self._durabilities = [
                s.durability for s in self._prepared.values() if s.durability is not None
            ]

    @property
    def eviction_policy(self) -> str:
        """The eviction policy the shards use now (the configured one, or the last set)."""
        return self._policy_name

    def _make_policy(self) -> EvictionPolicy:
        return make_policy(self._policy_name)

    async def set_eviction_policy(self, name: str) -> None:
        """Switch every shard to the eviction policy ``name`` (a Redis alias too).

        Each shard re-ranks its keys with the new policy in one step (its
        keys in insertion order; the old policy's history is not carried
        over) and recounts its memory with the new policy's bookkeeping, so
        usage may jump (past ``maxmemory`` even: eviction is woken). A
        shard restarting meanwhile gets the new policy when it handles the
        switch, which waits in its mailbox; a shard rebuilt from scratch
        starts with it.

        Raises:
            ValueError: unknown policy (the message names the known ones).
            KVMemoError: a shard did not answer (``UNAVAILABLE``, ``TIMEOUT``).
        """
        chosen = type(make_policy(name)).name
        self._policy_name = chosen
        make = self._make_policy
        timeout = self.config.request_timeout
        with trio.move_on_after(timeout):
            slots = [(ref, await self._send(ref, SwitchPolicy(make))) for ref in self._shards]
            for ref, slot in slots:
                try:
                    await slot.wait()
                except (ActorCrashed, ActorStopped) as exc:
                    raise self._translate(exc, ref) from None
            # A policy with more bookkeeping per key can take usage past the
            # watermark, or past maxmemory itself: eviction brings it back.
            self._maybe_wake_eviction()
            return
        raise RequestTimeoutError("a shard did not switch its policy in time", applied=None)

    def skip_final_snapshot(self) -> None:
        """Make the shards' graceful stop skip its snapshot (Redis's ``SHUTDOWN NOSAVE``).

        Their logs are still synced, so the next start replays everything
        acknowledged; a no-op without persistence.
        """
        if self.persistence is not None:
            self.persistence.stop.snapshot = False

    def persistence_problems(self) -> list[str]:
        """Shards whose writes are not being made durable, or whose last snapshot
        failed, with the error (for /healthz).

        Reads each shard's durability health and snapshot status,
        observability figures its actor maintains; nothing here changes them.
        A failed snapshot loses nothing the log holds, but the log then grows
        until one is written, so it counts as a problem until then.
        """
        problems = []
        for i, d in enumerate(self._durabilities):
            if d.health is not Health.OK:
                problems.append(f"shard-{i}: {d.error}")
            if d.snapshot_status is SnapshotStatus.ERR:
                problems.append(f"shard-{i}: snapshot failed: {d.snapshot_error}")
        return problems

    def attach(self, system: ActorSystem) -> None:
        """Bind to the running actor system (after the supervisor started).

        Called in the trio run the system runs in: the engine serves calls
        from that run only (see :meth:`check_run`).
        """
        self._token = _current_token()
        self.system = system
        self._shards = [system.ref(shard_name(i)) for i in range(self.config.shards)]
        self._deadlines = system.deadlines
        self._eviction = system.ref(EVICTION_MANAGER)

    # -- metrics ----------------------------------------------------------------------

    def _init_metrics(self) -> None:
        m = self.metrics
        self._latency = m.histogram(
            "kvmemo_command_duration_seconds",
            "Latency of the calls that succeeded, by command (the engine's, and the Redis"
            " port's own: PING, CLIENT, EXEC, ...)",
            ["command"],
        )
        self._latency_by_name = {name: self._latency.labels(name) for name in COMMANDS}
        self._get_latency = self._latency_by_name["get"]
        self._set_latency = self._latency_by_name["set"]
        self._errors = m.counter("kvmemo_command_errors_total", "Commands failed", ["kind"])
        # Children made on first use: only the commands that ever failed show.
        self._failed = m.counter(
            "kvmemo_command_failed_total",
            "Calls that ran and answered an error, by command (Redis's failed_calls)",
            ["command"],
        )
        self._rejected = m.counter(
            "kvmemo_command_rejected_total",
            "Calls refused before they ran (arity, NOAUTH, OOM, UNAVAILABLE, TOO_LARGE),"
            " by command (Redis's rejected_calls)",
            ["command"],
        )
        transactions = m.counter(
            "kvmemo_transactions_total",
            "Transactions (MULTI/EXEC) by outcome: run, watch (a watched key changed), failed",
            ["outcome"],
        )
        self._txn_outcome = {o: transactions.labels(o) for o in ("run", "watch", "failed")}
        count_buckets = (0, 1, 10, 100, 1000, 10_000, 100_000)
        self._expired_sweep = m.histogram(
            "kvmemo_expired_keys_per_sweep",
            "Keys removed by each expiry sweep",
            (),
            buckets=count_buckets[1:],
        )
        self._evicted_keys = m.counter("kvmemo_evicted_keys_total", "Keys evicted")
        self._freed_cycle = m.histogram(
            "kvmemo_eviction_freed_bytes_per_cycle",
            "Bytes freed by each eviction cycle",
            (),
            buckets=(1024, 16 * 1024, 256 * 1024, 4 * 1024**2, 64 * 1024**2, 1024**3),
        )
        m.gauge("kvmemo_memory_used_bytes", "Tracked memory use").set_function(
            lambda: float(self.tracker.used)
        )
        m.gauge("kvmemo_memory_max_bytes", "maxmemory (0: no limit)").set_function(
            lambda: float(self.tracker.maxmemory)
        )
        self._restarts = m.counter(
            "kvmemo_actor_restarts_total", "Restarts per actor, since the start", ["actor"]
        )
        self._mailbox_gauge = m.gauge(
            "kvmemo_actor_mailbox_depth", "Messages queued per actor", ["actor"]
        )
        # The shards' log syncs (persistence on): latency and failures per shard.
        self._sync_metrics = (
            SyncMetrics.register(m, self.config.shards) if self.persistence is not None else None
        )

    def refresh_actor_metrics(self) -> None:
        """Bring restart counts and mailbox depths up to date (for a scrape, ``info``).

        A restart count only grows (the supervisor's count per child, kept
        across its restarts), so it is a counter: it is advanced by what the
        count grew since the last refresh, and never goes down.
        """
        if self.system is None:
            return
        for info in self.system.actors():
            restarts = self._restarts.labels(info.name)
            if info.restarts > restarts.value:
                restarts.inc(info.restarts - restarts.value)
            self._mailbox_gauge.labels(info.name).set(info.mailbox)

    def _count_failure(self, name: str, kind: str) -> None:
        """Count a call of ``name`` (any spelling) that ended with an error of ``kind``.

        Rejected (:data:`REJECTED_KINDS`: refused before it ran) or failed
        (it ran and answered the error), as Redis's commandstats count them.
        A name that is no command is not counted (its error kind is). The
        error path only: a lookup and a child's dict lookup.
        """
        try:
            command = lookup(name).name
        except UnknownCommandError:
            return
        family = self._rejected if kind in REJECTED_KINDS else self._failed
        family.labels(command).inc()

    def count_rejected(self, name: str) -> None:
        """Count a call a front end refused before it reached the engine.

        The Redis port's own refusals (wrong number of arguments, NOAUTH, a
        command not allowed in subscribed mode, an error found when MULTI
        queues it), so that ``rejected_calls`` counts them as Redis does.

        Args:
            name: a command of the table, or one of the front end's own
                (``client|list``): a bounded set of names.
        """
        self._rejected.labels(name).inc()

    def record_call(self, name: str, seconds: float, *, failed: bool = False) -> None:
        """Count a call a front end ran itself (the Redis port's PING, CLIENT, EXEC, ...).

        As the engine counts its own: a success in the command's latency
        histogram, a failure (an error reply) in ``kvmemo_command_failed_total``.

        Args:
            name: the front end's name for it (``ping``, ``client|list``): a
                bounded set of names.
            seconds: how long it took.
            failed: it answered an error.
        """
        if failed:
            self._failed.labels(name).inc()
            return
        hist = self._latency_by_name.get(name)
        if hist is None:
            hist = self._latency_by_name[name] = self._latency.labels(name)
        hist.observe(seconds)

    def command_stats(self) -> dict[str, CommandStats]:
        """Every command's counts since the start, by name (Redis's commandstats).

        Store-wide: the calls of every front end (both ports, the embedded
        API), and the Redis port's own commands (see :meth:`record_call`).
        Only commands with a call, a failure or a rejection are listed.
        """
        failed = {values[0]: int(c.value) for values, c in self._failed.children()}
        rejected = {values[0]: int(c.value) for values, c in self._rejected.children()}
        out: dict[str, CommandStats] = {}
        for (name,), hist in self._latency.children():
            ok = hist.count
            f, r = failed.pop(name, 0), rejected.pop(name, 0)
            if ok or f or r:
                out[name] = CommandStats(ok + f, hist.sum if ok else 0.0, f, r)
        for name in failed.keys() | rejected.keys():  # no latency child (yet)
            f, r = failed.get(name, 0), rejected.get(name, 0)
            if f or r:
                out[name] = CommandStats(f, 0.0, f, r)
        return out

    def command_latencies(self) -> dict[str, BucketCounts]:
        """Every command's latency histogram, frozen, by name (Redis's latencystats).

        The calls counted in :meth:`command_stats`' time: those that
        succeeded, of every front end, and the Redis port's own commands (a
        failed call's time is not measured). Only commands with at least one
        such call are listed; the buckets are the ``kvmemo_command_duration_seconds``
        histograms' (:data:`~kvmemo.observability.metrics.DEFAULT_LATENCY_BUCKETS`).
        """
        return {
            name: hist.bucket_counts() for (name,), hist in self._latency.children() if hist.count
        }

    def _record_eviction(self, keys: int, freed: int) -> None:
        self._evicted_keys.inc(keys)
        self._freed_cycle.observe(freed)

    # -- executing commands ----------------------------------------------------------------

    def _read_clock(self) -> Clock:
        """The two clocks of a command, read as close together as they can be.

        A reading is off by the time between its two reads, and a thread
        switch or the OS's preemption between them costs milliseconds under
        load: an EXPIREAT read back with PEXPIRETIME would then be off by as
        much. So the wall clock is read between two reads of trio's, up to
        three times, and the tightest pair kept (at its midpoint). Under a
        MockClock trio's time stands still: one try.
        """
        best = math.inf
        mono = wall = 0.0
        for _ in range(3):
            before = trio.current_time()
            unix = time.time()
            after = trio.current_time()
            gap = after - before
            if gap < best:
                best, mono, wall = gap, (before + after) / 2, unix
            if gap <= _CLOCK_READ_GAP:
                break
        return Clock(mono, wall)

    def _check_sizes(self, spec: Command, args: Sequence[bytes]) -> None:
        """Refuse an argument over the size limits (after the fast check of :meth:`parse`)."""
        cfg = self.config
        limit = max(cfg.max_key_size, cfg.max_value_size)
        for arg in args:
            if len(arg) > limit:
                raise TooLargeError(f"argument of {len(arg)} bytes is over the limit")
        if spec.first_key:
            for key in spec.keys_of(args):
                if len(key) > cfg.max_key_size:
                    raise TooLargeError(
                        f"key of {len(key)} bytes is over max_key_size ({cfg.max_key_size})"
                    )
        if cfg.max_value_size < limit:
            keys = set(map(id, spec.keys_of(args)))
            for arg in args:
                if id(arg) not in keys and len(arg) > cfg.max_value_size:
                    raise TooLargeError(
                        f"value of {len(arg)} bytes is over max_value_size ({cfg.max_value_size})"
                    )

    def parse(self, name: str, args: Sequence[bytes]) -> tuple[Command, Any]:
        """Parse and validate one call (no I/O), with a clock of its own."""
        self._parse_context.restart()
        return self._parse(name, args)

    def _parse(self, name: str, args: Sequence[bytes]) -> tuple[Command, Any]:
        """Parse and validate one call with the current parse context (a batch's)."""
        spec, op = parse(name, args, self._parse_context)
        # One cheap pass over the lengths: an argument within the smaller limit
        # is within both, so only a long argument needs the checks per role.
        # (A loop is the cheapest for a few arguments, sum(map(...)) for many.)
        limit = self._small_size_limit
        if len(args) <= _FEW_ARGS:
            for arg in args:
                if len(arg) > limit:
                    self._check_sizes(spec, args)
                    break
        elif sum(map(len, args)) > limit:
            self._check_sizes(spec, args)
        return spec, op

    async def execute(self, name: str, args: Sequence[bytes]) -> Any:
        """Run one command by name and return its protocol result.

        A checkpoint, as every async entry point of the engine: in a cancelled
        scope it raises ``trio.Cancelled`` and runs nothing; cancelled while
        it waits, the command may or may not have been applied.

        Raises:
            KVMemoError: the protocol error for whatever went wrong.
        """
        started = _perf_counter()
        try:
            if _current_token() is not self._token:
                raise self._outside_run()
            await _checkpoint_if_cancelled()  # cancelled: raises, and nothing is done
            self._parse_context.restart()
            spec, op = self._parse(name, args)
            if isinstance(op, ops.ShardOp):
                result = await self._run_single(op)  # waits for its shard: a schedule point
            else:
                result = await self._run(op)
                if isinstance(op, ServerCall):
                    # PING, ECHO, PUBLISH, ... are answered without waiting:
                    # a schedule point all the same, so that a loop of them
                    # lets other tasks (a subscriber) run.
                    await _cancel_shielded_checkpoint()
        except KVMemoError as exc:
            self._errors.labels(exc.kind).inc()
            self._count_failure(name, exc.kind)
            if exc.kind == "UNAVAILABLE":
                await _checkpoint()  # see _checkpoint: a refusal must not starve the restart
                if self._closed and exc.data:  # a shard stopped under the call (see _closing)
                    raise _store_closed() from None
            raise
        hist = self._latency_by_name.get(spec.name)
        if hist is not None:
            hist.observe(_perf_counter() - started)
        return result

    # The embedded API's fast paths: the two commands an application calls
    # most, without the command table's name lookup and option parsing. Same
    # result, errors and metrics as ``execute("get", [key])`` and
    # ``execute("set", [key, value])``; a test holds them equal.

    async def get(self, key: bytes) -> bytes | None:
        """GET ``key``: its value, or None."""
        started = _perf_counter()
        try:
            if _current_token() is not self._token:
                raise self._outside_run()
            await _checkpoint_if_cancelled()  # cancelled: raises, nothing asked
            if len(key) > self._small_size_limit:
                self._check_sizes(_GET, (key,))
            # _run_single inlined (one coroutine frame less on every call and
            # resume); a read never needs memory.
            index = self.slots.shard_of(key)
            ref = self._shards[index]
            if ref.state is not _RUNNING:
                ref = self._shard_for(index)  # raises UNAVAILABLE
            try:
                result: bytes | None = await ref.ask(
                    ops.Get(key), timeout=self.config.request_timeout
                )
            except (ActorCrashed, ActorStopped, AskTimeout) as exc:
                raise self._translate(exc, ref) from None
        except KVMemoError as exc:
            self._errors.labels(exc.kind).inc()
            self._count_failure("get", exc.kind)
            if exc.kind == "UNAVAILABLE":
                await _checkpoint()  # see _checkpoint: a refusal must not starve the restart
                if self._closed and exc.data:  # a shard stopped under the call (see _closing)
                    raise _store_closed() from None
            raise
        self._get_latency.observe(_perf_counter() - started)
        return result

    async def set(self, key: bytes, value: bytes) -> Any:
        """SET ``key`` to ``value`` without options (drops any TTL): "OK"."""
        started = _perf_counter()
        try:
            if _current_token() is not self._token:
                raise self._outside_run()
            await _checkpoint_if_cancelled()  # cancelled: raises, nothing written
            limit = self._small_size_limit
            if len(key) > limit or len(value) > limit:
                self._check_sizes(_SET, (key, value))
            # _run_single inlined, as in get (the repetition is the point: one
            # coroutine frame less per call); a write that needs memory
            # (rare) makes room in _write_after_room, as there.
            op = ops.PlainSet(key, value)
            index = self.slots.shard_of(key)
            ref = self._shards[index]
            if ref.state is not _RUNNING:
                ref = self._shard_for(index)  # raises UNAVAILABLE
            try:
                result = await ref.ask(op, timeout=self.config.request_timeout)
            except NeedMemory as exc:
                result = await self._write_after_room(ref, op, exc.nbytes)
            except (ActorCrashed, ActorStopped, AskTimeout) as exc:
                raise self._translate(exc, ref) from None
            self._maybe_wake_eviction()
        except KVMemoError as exc:
            self._errors.labels(exc.kind).inc()
            self._count_failure("set", exc.kind)
            if exc.kind == "UNAVAILABLE":
                await _checkpoint()  # see _checkpoint: a refusal must not starve the restart
                if self._closed and exc.data:  # a shard stopped under the call (see _closing)
                    raise _store_closed() from None
            raise
        self._set_latency.observe(_perf_counter() - started)
        return result

    async def execute_many(self, calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        """Run several commands, grouping single-key ones per shard.

        Commands take effect in the order given for each key (a multi-key
        command waits for what came before it). Returns one entry per call:
        its result, or the :class:`KVMemoError` it failed with. Each call is
        counted in the metrics as :meth:`execute` counts it: an error by
        kind, a success in its command's latency (from the start of the
        batch to the end of the part that ran it).
        """
        if self._closed:  # each call gets "the store is closed", none runs
            await trio.lowlevel.checkpoint()
            refused: list[Any] = [_store_closed() for _ in calls]
            if refused:
                self._errors.labels("UNAVAILABLE").inc(len(refused))
                for name, _ in calls:
                    self._count_failure(name, "UNAVAILABLE")
            return refused
        if _current_token() is not self._token:
            raise self._outside_run()
        await _checkpoint_if_cancelled()  # cancelled: raises, and nothing runs
        waited = False  # a schedule point was had (a shard was waited for)
        started = _perf_counter()
        results: list[Any] = [_PENDING] * len(calls)
        names: list[str | None] = [None] * len(calls)
        finished = [started] * len(calls)
        segment: list[tuple[int, Any]] = []

        async def run_segment() -> None:
            nonlocal waited
            if await self._run_segment(segment, results):
                waited = True
            now = _perf_counter()
            for i, _ in segment:
                finished[i] = now

        self._parse_context.restart()  # one clock per batch (up to its first wait)
        parse_call = self._parse
        for i, (name, args) in enumerate(calls):
            try:
                spec, op = parse_call(name, args)
            except KVMemoError as exc:
                results[i] = exc
                continue
            names[i] = spec.name
            if isinstance(op, ops.ShardOp):
                segment.append((i, op))
                continue
            if type(op) is ops.MSet:
                shards = op.shards = self.slots.shards_of(op.keys)
                if shards.count(shards[0]) == len(shards):
                    segment.append((i, op.local()))  # one shard's message (see _run)
                    continue
            if segment:
                await run_segment()
                segment = []
            try:
                results[i] = await self._run(op)
                waited = waited or not isinstance(op, ServerCall)
            except KVMemoError as exc:
                results[i] = exc
            finished[i] = _perf_counter()
            self._parse_context.restart()  # time passed: the calls after read it again
        if segment:
            await run_segment()
        if not waited:
            # Only calls the engine answers itself (PUBLISH, PING), or calls
            # refused at once: still a schedule point (see execute).
            await _cancel_shielded_checkpoint()
        # Latencies: a run of calls of one command that ended together (a
        # pipeline of GETs: one segment) is one observe_many.
        latency_of = self._latency_by_name
        run_name = ""
        run_end = started
        run_length = 0
        closed = self._closed
        for i, result in enumerate(results):
            if isinstance(result, KVMemoError):
                if closed:
                    results[i] = self._closing(result)
                self._errors.labels(result.kind).inc()
                self._count_failure(names[i] or calls[i][0], result.kind)
                continue
            command = names[i]
            assert command is not None  # it parsed, or it would be an error
            end = finished[i]
            if command == run_name and end == run_end:
                run_length += 1
                continue
            if run_length:
                latency_of[run_name].observe_many(run_end - started, run_length)
            run_name, run_end, run_length = command, end, 1
        if run_length:
            latency_of[run_name].observe_many(run_end - started, run_length)
        return results

    async def _run(self, op: Any) -> Any:
        if isinstance(op, ops.ShardOp):
            return await self._run_single(op)
        if self._closed:
            # Every multi-shard, keyspace and server call: a shard that is
            # not running says so on its own (_shard_for), but INFO, DBSIZE
            # and the like would answer from nothing.
            raise _store_closed()
        groups = None
        if type(op) is ops.MSet and not op.grouped:
            shards = op.shards
            if shards is None:
                shards = op.shards = self.slots.shards_of(op.keys)
            if shards.count(shards[0]) == len(shards):
                # One shard applies it in one step: atomic without a hold, the
                # writer lock or a round (see ops.LocalMSet).
                return await self._run_single(op.local())
            if not op.only_new:
                refs = self._shards
                for shard in set(shards):
                    if refs[shard].state is not _RUNNING:
                        self._shard_for(shard)  # raises UNAVAILABLE before it waits for a round
                return await self._grouped_mset(op)  # bounds its own time
            groups = op.groups = self.slots.group_by_shard(op.keys)
        with trio.move_on_after(self.config.request_timeout):
            if isinstance(op, ops.FanOutOp):
                return await self._run_fanout(op)
            if isinstance(op, ops.AtomicOp):
                return await self._run_atomic(op, groups)
            if isinstance(op, ops.KeyspaceOp):
                return await self._run_keyspace(op)
            if isinstance(op, ServerCall):
                return await self._run_server(op)
            raise InternalError(f"no route for {type(op).__name__}")
        raise RequestTimeoutError("the command did not finish in time", applied=None)

    @property
    def closed(self) -> bool:
        """Whether the store has stopped (or is stopping): every call is refused as closed."""
        return self._closed

    def check_run(self) -> None:
        """Check that the caller runs in the store's trio run (a closed store passes).

        Every entry point checks this before it touches anything (the hot
        paths inline it); the synchronous ones that act on actors (a kill, a
        close, a subscription) call this.

        Raises:
            RuntimeError: the store is open and the caller is in another trio
                run, in none (another thread, asyncio), or the store has not
                started. Nothing was changed.
        """
        if self._closed:
            return
        try:
            token = _current_token()
        except RuntimeError:  # not in a trio run at all
            token = None
        if token is None or token is not self._token:
            raise self._outside_run()

    def _outside_run(self) -> Exception:
        """The error of a call made outside the store's trio run (the rare path of every entry).

        A closed store refuses as closed, wherever the call comes from (no
        run can use it again); an open one with ``RuntimeError``.
        """
        if self._closed:
            return _store_closed()
        return RuntimeError(NOT_STARTED if self._token is None else FOREIGN_RUN)

    def _closing(self, exc: KVMemoError) -> KVMemoError:
        """``exc``, or "the store is closed" for a shard's UNAVAILABLE once the store is closed.

        A call still waiting for its shards as the store stops sees them stop
        (``shard-N is stopped``, or ``is restarting`` for a message its shard
        never handled) with a ``retry_after_ms``: a retry that can never
        succeed. The caller hears what happened instead: the store closed.
        """
        if self._closed and exc.kind == "UNAVAILABLE" and exc.data:
            return _store_closed()
        return exc

    def _shard_for(self, index: int) -> ActorRef:
        """The running shard ``index``.

        Raises:
            UnavailableError: it is not running (restarting, or stopped), or
                the store is closed.
        """
        ref = self._shards[index]
        if ref.state is not ActorState.RUNNING:
            raise _store_closed() if self._closed else _unavailable(ref)
        return ref

    def _translate(self, exc: Exception, ref: ActorRef) -> KVMemoError:
        if isinstance(exc, KVMemoError):
            return exc
        if isinstance(exc, ActorCrashed):
            if not exc.handler_started:
                return UnavailableError(f"{ref.name} is restarting", retry_after_ms=10)
            if isinstance(exc.cause, ActorKilled):  # a chaos kill, not a bug of the shard
                return InternalError(
                    f"{ref.name} was killed while handling the command; "
                    "it may or may not have been applied",
                    applied=None,
                )
            if isinstance(exc.cause, ActorStopped):  # stopped by its supervisor, not a crash
                return InternalError(
                    f"{ref.name} was stopped while handling the command; "
                    "it may or may not have been applied",
                    applied=None,
                )
            return InternalError(f"{ref.name} crashed handling the command", applied=None)
        if isinstance(exc, ActorStopped):
            return UnavailableError(f"{ref.name} is stopped", retry_after_ms=1000)
        if isinstance(exc, AskTimeout):
            return RequestTimeoutError("the command did not finish in time", applied=None)
        return InternalError(f"unexpected failure: {exc!r}", applied=None)

    async def _run_single(self, op: ops.ShardOp) -> Any:
        index = self.slots.shard_of(op.key)
        ref = self._shards[index]
        if ref.state is not _RUNNING:
            ref = self._shard_for(index)  # raises UNAVAILABLE
        try:
            result = await ref.ask(op, timeout=self.config.request_timeout)
        except NeedMemory as exc:
            result = await self._write_after_room(ref, op, exc.nbytes)
        except (ActorCrashed, ActorStopped, AskTimeout) as exc:
            raise self._translate(exc, ref) from None
        if op.write:
            self._maybe_wake_eviction()
        return result

    async def _write_after_room(self, ref: ActorRef, op: ops.ShardOp, nbytes: int) -> Any:
        """A write its shard refused for want of ``nbytes``: make room, then ask again.

        Repeats while the shard still refuses and room can be made (one
        budget for the whole write); OOM once it cannot.
        """
        timeout = self.config.request_timeout
        budget = _RoomBudget()
        while True:
            if not await self._make_room(nbytes, budget):
                raise out_of_memory(self.tracker)
            try:
                return await ref.ask(op, timeout=timeout)
            except NeedMemory as exc:
                nbytes = exc.nbytes
            except (ActorCrashed, ActorStopped, AskTimeout) as exc:
                raise self._translate(exc, ref) from None

    async def _run_segment(self, segment: list[tuple[int, Any]], results: list[Any]) -> bool:
        """Run single-key operations grouped per shard, in order per shard.

        Returns:
            Whether a shard was sent a part (and so waited for: a schedule
            point); False when every shard refused at once.
        """
        groups: dict[int, list[tuple[int, Any]]] = {}
        shard_of = self.slots.shard_of
        for item in segment:
            shard = shard_of(item[1].key)
            group = groups.get(shard)
            if group is None:
                groups[shard] = [item]
            else:
                group.append(item)
        pending: list[tuple[ActorRef, list[tuple[int, Any]], ShardBatch, ReplySlot]] = []
        with trio.move_on_after(self.config.request_timeout):
            for shard, items in groups.items():
                batch = ShardBatch([op for _, op in items])
                try:
                    ref = self._shard_for(shard)
                    slot = await self._send(ref, batch)
                except KVMemoError as exc:
                    for i, _ in items:
                        results[i] = exc
                    continue
                pending.append((ref, items, batch, slot))
            for ref, items, batch, slot in pending:
                await self._finish_batch(ref, items, batch, slot, results)
            self._maybe_wake_eviction()  # a no-op unless over the watermark: no write check
            return bool(pending)
        # Timed out, waiting for some shard: the replies that came meanwhile
        # from the others are still theirs (a write there was applied), not
        # TIMEOUT. What a shard had not answered may or may not have run.
        for ref, items, batch, slot in pending:
            if not slot.done:
                continue
            try:
                answers = slot.result()
            except (ActorCrashed, ActorStopped) as exc:
                answers = [self._translate(exc, ref)] * len(items)
            except PersistenceIOError as exc:  # the batch's commit failed (see _finish_batch)
                answers = _uncommitted_answers(items, batch.answers, exc)
            for (i, _), answer in zip(items, answers, strict=False):
                if results[i] is _PENDING and not isinstance(answer, NeedMemory):
                    results[i] = answer
        for i, _ in segment:
            if results[i] is _PENDING:
                results[i] = RequestTimeoutError("the command did not finish in time", applied=None)
        return True

    # The batch paths send every part first, then read the replies with
    # ``slot.result() if slot.done else await slot.wait()``: a reply already
    # delivered is read at once, because waiting on it would still cost a
    # scheduler pass (~3.5 µs) for nothing. The batch still checkpoints: a
    # reply comes only after the caller yielded (waiting, or in a send).

    async def _send(self, ref: ActorRef, message: Any, slot: ReplySlot | None = None) -> ReplySlot:
        try:
            return ref.ask_nowait(message, slot)
        except MailboxFull:
            return await ref.ask_start(message, slot)
        except ActorStopped as exc:
            raise self._translate(exc, ref) from None

    async def _finish_batch(
        self,
        ref: ActorRef,
        items: list[tuple[int, Any]],
        batch: ShardBatch,
        slot: ReplySlot,
        results: list[Any],
    ) -> None:
        budget: _RoomBudget | None = None  # of the operation at the head of ``items``
        while True:
            try:
                answers = slot.result() if slot.done else await slot.wait()
            except (ActorCrashed, ActorStopped) as exc:
                error = self._translate(exc, ref)
                for i, _ in items:
                    results[i] = error
                return
            except PersistenceIOError as exc:
                # The shard could not make the batch's writes durable (a full
                # or failing disk) and failed the whole reply; what each
                # operation did is still on the message (ShardBatch.answers):
                # see _uncommitted_answers. A NeedMemory that stopped the
                # batch is handled below, as in any batch.
                answers = _uncommitted_answers(items, batch.answers, exc)
            for (i, _), answer in zip(items, answers, strict=False):
                results[i] = answer
            done = len(answers)
            if done == len(items) and not isinstance(answers[-1], NeedMemory):
                break
            # A write needed memory: make room, then resubmit it and the rest in order.
            last = answers[-1]
            assert isinstance(last, NeedMemory)
            # Not its answer: it is resent (or gets OOM) below. Left pending,
            # a timeout meanwhile makes it TIMEOUT (the resend may yet run),
            # never the NeedMemory of its first try (OOM: certainly not applied).
            results[items[done - 1][0]] = _PENDING
            if done > 1 or budget is None:
                budget = _RoomBudget()  # a later operation than last time: a fresh budget
            if await self._make_room(last.nbytes, budget):
                items = items[done - 1 :]
            else:
                results[items[done - 1][0]] = out_of_memory(self.tracker)
                items = items[done:]
                budget = None
            if not items:
                break
            batch = ShardBatch([op for _, op in items])
            try:
                slot = await self._send(ref, batch)
            except KVMemoError as error:  # the shard went down meanwhile
                for i, _ in items:
                    results[i] = error
                return

    async def _run_fanout(self, op: ops.FanOutOp) -> Any:
        groups = self.slots.group_by_shard(op.keys)
        # Every shard is checked before any part is sent, so that a restarting
        # shard fails the command (UNAVAILABLE) before anything was applied.
        refs = [(self._shard_for(shard), where) for shard, where in groups.items()]
        parts = []
        for ref, where in refs:
            parts.append((ref, where, await self._send(ref, op.part([op.keys[i] for i in where]))))
        results = []
        for ref, _, slot in parts:
            try:
                results.append(slot.result() if slot.done else await slot.wait())
            except (ActorCrashed, ActorStopped) as exc:
                raise self._translate(exc, ref) from None
        return op.combine(results, [where for _, where, _ in parts])

    async def _run_atomic(
        self,
        op: ops.AtomicOp,
        groups: dict[int, list[int]] | None = None,
        failed: dict[int, KVMemoError] | None = None,
    ) -> Any:
        """Run a multi-key atomic command; ``groups``: its keys' positions per shard, if known.

        ``failed``: filled as :meth:`_hold_all` fills it, when the write
        committed and some of its shards failed after the decision.
        """
        if groups is None:
            groups = self.slots.group_by_shard(op.keys)
        if op.readonly:
            if len(groups) == 1:
                # One shard, one message: its mailbox orders the read against
                # every part of a write, so no reader lock is needed. This is
                # _read_parts for one part, without its lists and coroutine
                # frame (about 1 µs a call): same message, same replies, same
                # UNAVAILABLE at once if the shard goes down before answering.
                ((shard, where),) = groups.items()
                ref = self._shard_for(shard)
                part = op.read_part(where)
                try:
                    slot = ref.ask_nowait(part)
                except (MailboxFull, ActorStopped):
                    slot = await self._send(ref, part)  # waits for room, or UNAVAILABLE
                try:
                    if slot.done:
                        result = slot.result()
                    else:
                        key = ref.monitor(_fail_unanswered, (ref, slot))
                        try:
                            result = await slot.wait()
                        finally:
                            ref.demonitor(key)
                except (ActorCrashed, ActorStopped) as exc:
                    raise self._translate(exc, ref) from None
                return op.combine([result], [where], True)
            shards = sorted(groups)
            # Every shard is checked before the lock is taken or a part sent.
            refs = [self._shard_for(s) for s in shards]
            positions = [groups[s] for s in shards]
            await self._txn_lock.acquire(write=False)
            try:
                return await self._read_parts(op, refs, positions)
            finally:
                self._txn_lock.release(write=False)
        shards = sorted(groups)
        refs = [self._shard_for(s) for s in shards]
        positions = [groups[s] for s in shards]
        budget = _RoomBudget()
        retries = 0
        while True:
            await self._txn_lock.acquire(write=True)
            try:
                if isinstance(op, ops.ReadThenWrite):
                    answer = await self._read_sources(op, refs, positions)
                    if answer is not ops.NO_ANSWER:
                        return answer
                committed, votes, results = await self._two_phase(
                    op, refs, positions, shards, failed
                )
            finally:
                self._txn_lock.release(write=True)
            if ops.CHANGED in votes:
                # A source was written between our read and the hold: read again.
                retries += 1
                if retries > MOVE_RETRIES:
                    raise RequestTimeoutError(
                        "the source kept changing; nothing was applied", applied=False
                    )
                continue
            need = [v for v in votes if isinstance(v, NeedMemory)]
            if need:
                if not await self._make_room(sum(v.nbytes for v in need), budget):
                    raise out_of_memory(self.tracker)
                continue
            if not committed and all(v is True or v is None for v in votes):
                # No shard refused, yet the write was aborted: a shard's hold
                # timed out before the last one prepared (which may not have
                # voted yet: the round ends at the decision). Nothing was applied.
                raise RequestTimeoutError(
                    "the atomic write was aborted: a shard did not prepare in time",
                    applied=False,
                )
            self._maybe_wake_eviction()
            return op.combine(results, positions, committed)

    async def _grouped_mset(self, op: ops.MSet) -> Any:
        """Run concurrent multi-shard MSETs together, one two-phase round for many.

        Design: a multi-shard MSET costs one hold per shard, and MSETs are
        serialised by the writer lock, so under concurrency they queue. While
        one round runs, arriving MSETs wait in ``_mset_waiting``; the next
        round applies all of them as one atomic write, in arrival order (a
        later MSET's value wins for a key both set). Each MSET stays atomic
        (every reader sees all of a round or none of it). One task leads
        the rounds; when its own MSET is done it promotes the next waiter,
        so no leader serves others forever.

        Time: ``request_timeout`` from the call bounds it, as ``_run`` bounds
        the other commands; a waiting MSET's slot is registered with the
        actor system's ask deadlines (no cancel scope per MSET: at several µs
        each, a tenth of a grouped MSET's cost), a leader's rounds run under
        one cancel scope with the same deadline.
        """
        timeout = self.config.request_timeout
        deadline = _current_time() + timeout
        slot = ReplySlot()
        entry = (op, slot, deadline)
        self._mset_waiting.append(entry)
        if self._mset_leading:
            pending = self._deadlines.add(slot, timeout, "mset")
            try:
                result = await slot.wait()
            except BaseException as exc:
                # Timed out or cancelled while waiting: leave the queue, so no
                # leader hands this entry the lead it could not take (in a
                # round already, it may still be applied).
                if entry in self._mset_waiting:
                    self._mset_waiting.remove(entry)
                if slot.done and _holds_lead(slot):
                    self._promote_mset_leader()  # promoted as it left: pass the lead on
                if isinstance(exc, AskTimeout):
                    raise RequestTimeoutError(
                        "the command did not finish in time", applied=None
                    ) from None
                raise
            finally:
                pending.pop(slot, None)
            if result is not _LEAD:
                return result
            gather = True
        else:
            gather = self._mset_last_round > 1
        self._mset_leading = True
        own: tuple[bool, Any] | None = None
        try:
            if gather:
                # Under concurrency (this leader was promoted, or the last round
                # held several MSETs), the callers the last round answered come
                # back with their next MSET in the same scheduler pass or the
                # next. Taken at once, the round would hold this MSET alone and
                # make them wait a whole round: half the rounds were of one
                # MSET. So yield at least two passes (the woken callers may run
                # before or after this task in the first: trio runs a pass in
                # either order), then while the last one brought new MSETs, at
                # most MSET_GATHER_PASSES (Cancelled here: nothing taken yet).
                try:
                    for passes in range(1, MSET_GATHER_PASSES + 1):
                        waiting = len(self._mset_waiting)
                        await trio.lowlevel.checkpoint()
                        if passes >= 2 and len(self._mset_waiting) == waiting:
                            break
                except BaseException:
                    # Our entry is still queued: take it out, or the promotion
                    # below would hand the lead to this task, which is leaving.
                    self._mset_waiting.remove(entry)
                    raise
            batch = self._take_mset_batch(slot)
            self._mset_last_round = len(batch)
            # The round may run until the latest deadline among its MSETs: a
            # waiter is bounded by its own deadline (the ask deadlines), and the
            # leader, which carries the others, answers its own once the round
            # is over (at most that long).
            until = max(d for _, _, d in batch)
            outcomes: list[tuple[bool, Any]] | None = None
            # Shielded when the round carries other callers' MSETs: the
            # leader's own cancellation must not cut it off (they would fail
            # as interrupted, their scopes never cancelled); it is delivered
            # at the leader's next checkpoint, after the round (bounded by
            # ``until``), as to any call cancelled in flight that may have
            # applied. A round of the leader's MSET alone is cancelled at once
            # (its holds released: nobody else waits for it).
            with trio.CancelScope(deadline=until, shield=len(batch) > 1):
                try:
                    outcomes = await self._mset_round([o for o, _, _ in batch])
                except BaseException:
                    lost = RequestTimeoutError("the MSET was interrupted", applied=None)
                    for _, s, _ in batch:
                        if s is not slot:
                            s.fail(lost)
                    raise
            if outcomes is None:
                raise RequestTimeoutError("the command did not finish in time", applied=None)
            for (_, s, _), outcome in zip(batch, outcomes, strict=True):
                if s is slot:
                    own = outcome
                elif outcome[0]:
                    s.set(outcome[1])
                else:
                    s.fail(outcome[1])
        finally:
            self._promote_mset_leader()
        assert own is not None  # the leader's MSET is always in its round
        ok, value = own
        if not ok:
            raise value
        return value

    def _take_mset_batch(self, own: ReplySlot) -> list[tuple[ops.MSet, ReplySlot, float]]:
        """The MSETs of the next round: the leader's own and every waiter still in time.

        A waiter that left (its slot is done: cancelled, or failed by its
        deadline) is dropped; one whose deadline passed but whose slot the
        sweeper has not failed yet gets ``TIMEOUT`` here, not applied.
        """
        now = _current_time()
        batch = []
        for entry in self._mset_waiting:
            _, waiter, deadline = entry
            if waiter is own:
                batch.append(entry)
            elif waiter.done:
                continue
            elif deadline <= now:
                waiter.fail(RequestTimeoutError(_LATE, applied=False))
            else:
                batch.append(entry)
        self._mset_waiting = []
        return batch

    def _promote_mset_leader(self) -> None:
        """Hand the lead to the oldest MSET still waiting in time, or end the leadership.

        A waiter whose slot is done already (it left) is dropped from the
        queue; one past its deadline gets ``TIMEOUT`` (not applied) instead of
        a lead it would have no time to use.
        """
        waiting = self._mset_waiting
        now = _current_time()
        while waiting:
            _, slot, deadline = waiting[0]
            if not slot.done:
                if deadline > now:
                    slot.set(_LEAD)  # the next waiter leads the next round
                    return
                slot.fail(RequestTimeoutError(_LATE, applied=False))
            del waiting[0]
        self._mset_leading = False

    async def _mset_round(self, msets: list[ops.MSet]) -> list[tuple[bool, Any]]:
        """Apply MSETs as one atomic write; (ok, result or error) for each.

        When the union does not fit in memory, each MSET gets its own try
        (alone it may fit), so grouping never makes a write fail that would
        have succeeded by itself.
        """
        # The union, its pairs sorted by shard (each MSET's keys were hashed
        # once, see _run): in arrival order within a shard, so a later MSET's
        # value still wins for a key both set; each shard's share is then one
        # run of positions, which MSet.part takes as a slice.
        touched: set[int] = set()
        for o in msets:
            assert o.shards is not None
            touched.update(o.shards)
        buckets: dict[int, list[tuple[bytes, bytes]]] = {s: [] for s in sorted(touched)}
        for o in msets:
            assert o.shards is not None
            for pair, shard in zip(o.items, o.shards, strict=True):
                buckets[shard].append(pair)
        items: list[tuple[bytes, bytes]] = []
        groups: dict[int, list[int]] = {}
        for shard, bucket in buckets.items():  # the fixed hold order
            start = len(items)
            items += bucket
            groups[shard] = list(range(start, len(items)))
        combined = ops.MSet(items, only_new=False, keys=tuple(map(_first, items)))
        combined.grouped = True
        failed: dict[int, KVMemoError] = {}
        try:
            return [(True, await self._run_atomic(combined, groups, failed))] * len(msets)
        except KVMemoError as exc:
            if failed:
                # The round committed, then these shards failed (a kill during
                # the group commit's sync): an MSET that touches none of them
                # was applied whole, and made durable, by its own shards.
                outcomes: list[tuple[bool, Any]] = []
                for o in msets:
                    assert o.shards is not None
                    lost = next((failed[s] for s in o.shards if s in failed), None)
                    outcomes.append((True, ops.OK) if lost is None else (False, lost))
                return outcomes
            # Alone, an MSET may fit in memory, or not touch the shard that is
            # down or crashed: each gets its own try, but only when the round
            # certainly applied nothing (a retry must not write over a later
            # acknowledged write).
            retry = isinstance(exc, (OutOfMemoryError, UnavailableError)) or (
                exc.data.get("applied", True) is False
            )
            if len(msets) == 1 or not retry:
                return [(False, exc)] * len(msets)
        outcomes = []
        for op in msets:
            op.grouped = True
            try:
                outcomes.append((True, await self._run_atomic(op, op.groups)))
            except KVMemoError as exc:
                outcomes.append((False, exc))
        return outcomes

    async def _read_sources(
        self, op: ops.ReadThenWrite, refs: list[ActorRef], positions: list[list[int]]
    ) -> Any:
        """Step 1 of a :class:`ops.ReadThenWrite` (the caller holds the writer lock).

        Sends each shard that holds sources its read, all before any answer
        is awaited, and hands the answers to ``op.sources_read``.

        Returns:
            ``ops.NO_ANSWER`` (the write goes ahead), or the command's answer.

        Raises:
            KVMemoError: the command's own error (RENAME of a missing key,
                BITOP over the size limit), or UNAVAILABLE: a shard went down
                before it answered (a read has no effect: it gives up at once
                rather than keep the writer lock until the restart).
        """
        asked: list[tuple[ActorRef, ReplySlot] | None] = []
        for ref, where in zip(refs, positions, strict=True):
            part = op.source_part(where)
            asked.append(None if part is None else (ref, await self._send(ref, part)))
        return op.sources_read(await self._gather_reads(asked), positions)

    async def _gather_reads(self, asked: Sequence[tuple[ActorRef, ReplySlot] | None]) -> list[Any]:
        """The answers of reads already queued, in order (None where nothing was asked).

        The caller holds the engine's reader or writer lock. A shard killed
        with a read queued would answer only after its restart, and
        meanwhile every writer (and every reader behind one) would wait on
        the lock; a read has no effect, so it gives up instead: a shard
        that goes down before it answers fails the read with UNAVAILABLE at
        once.
        """
        results: list[Any] = []
        for item in asked:
            if item is None:
                results.append(None)
                continue
            ref, slot = item
            try:
                if slot.done:
                    results.append(slot.result())
                    continue
                key = ref.monitor(_fail_unanswered, (ref, slot))
                try:
                    results.append(await slot.wait())
                finally:
                    ref.demonitor(key)
            except (ActorCrashed, ActorStopped) as exc:
                raise self._translate(exc, ref) from None
        return results

    async def _read_parts(
        self, op: ops.AtomicOp, refs: list[ActorRef], positions: list[list[int]]
    ) -> Any:
        """Send one read part per shard (``refs[i]`` reads ``positions[i]``), then combine.

        One message per shard, all sent before any reply is awaited; a
        several-shard caller holds the reader lock around this, so no
        atomic write is seen in part. A shard that goes down before it
        answers fails the read with UNAVAILABLE at once.
        """
        slots = []
        for ref, where in zip(refs, positions, strict=True):
            part = op.read_part(where)
            try:
                slots.append(ref.ask_nowait(part))  # _send's common case, without its coroutine
            except (MailboxFull, ActorStopped):
                slots.append(await self._send(ref, part))  # waits for room, or UNAVAILABLE
        results = await self._gather_reads(list(zip(refs, slots, strict=True)))
        return op.combine(results, positions, True)

    async def _two_phase(
        self,
        op: ops.AtomicOp,
        refs: list[ActorRef],
        positions: list[list[int]],
        shards: list[int],
        failed: dict[int, KVMemoError] | None = None,
    ) -> tuple[bool, list[object], list[Any]]:
        """Prepare on every shard (each holds), decide, commit or abort everywhere."""
        return await self._hold_all(refs, [op.part(where) for where in positions], shards, failed)

    async def _hold_all(
        self,
        refs: list[ActorRef],
        parts: list[ops.AtomicPart],
        shards: list[int] | None = None,
        failed: dict[int, KVMemoError] | None = None,
    ) -> tuple[bool, list[object], list[Any]]:
        """Prepare ``parts[i]`` on ``refs[i]`` (each holds), decide, commit or abort everywhere.

        With persistence on, ``shards`` (the shard number of each part) given
        and several shards involved, the round's intent is written before a
        commit is decided (see :meth:`_write_intent`).

        Returns (committed, each shard's vote, each shard's commit result
        (None where aborted)). The caller holds the writer lock.

        A shard can fail after a commit was decided (killed, or crashed,
        during its commit or its group commit's sync): the first such error
        is raised, and with ``failed`` and ``shards`` given, ``failed`` maps
        each shard that failed so to its error. The other shards' parts were
        applied, and made durable as their replies are: a caller that ran
        several commands in one round tells them apart by it.

        Raises:
            PersistenceIOError: the intent could not be written (aborted).
            KVMemoError: a shard failed (see above).
        """
        barrier = Barrier(len(refs))
        slots: list[ReplySlot] = []
        commit = False
        monitors: list[tuple[ActorRef, int]] = []
        try:
            for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
                hold = Hold(barrier, i, part)
                try:  # _send's common case, without its coroutine
                    slot = ref.ask_nowait(hold, PartSlot(barrier))
                except (MailboxFull, ActorStopped):
                    slot = await self._send(ref, hold, PartSlot(barrier))  # room, or UNAVAILABLE
                slots.append(slot)
                # A shard killed with this hold queued would prepare only after
                # its restart backoff, while the others hold and the writer lock
                # is kept: every multi-shard command would stall. Its end fails
                # the round at once instead (UNAVAILABLE, nothing applied).
                monitors.append((ref, ref.monitor(barrier.went_down, i)))
            await barrier.ready.wait()
            ready = not barrier.failed and all(v is True for v in barrier.votes)
            if (
                ready
                and shards is not None
                and len(parts) > 1
                and self._intents is not None
                and not barrier.decided.is_set()  # a shard's hold timed out: aborted already
            ):
                await self._write_intent(barrier, shards, parts)  # sets barrier.txid, or defers
            commit = ready
        finally:
            for ref, key in monitors:
                ref.demonitor(key)
            # Whatever happened (a failure, a cancellation), the held shards
            # must not wait for a decision that never comes.
            commit = barrier.decide(commit)
            if barrier.txid and not commit:
                self._intent_aborted(barrier.txid)
        if barrier.logged is not None:
            assert shards is not None
            await self._write_deferred_intent(barrier, shards, commit)
        elif barrier.txid and not commit:
            await self._sync_intents()
        votes = list(barrier.votes)
        results = []
        error: KVMemoError | None = None
        for i, (ref, slot) in enumerate(zip(refs, slots, strict=True)):
            if not commit and not slot.done:
                # Aborted: its reply says nothing more (it gives back what it
                # reserved by itself), and a shard killed with the hold queued
                # answers only after its restart. The writer lock is not kept
                # for that.
                continue
            try:
                result = slot.result() if slot.done else await slot.wait()
            except (ActorCrashed, ActorStopped, KVMemoError) as exc:
                translated = self._translate(exc, ref)
                error = error or translated
                if commit and failed is not None and shards is not None:
                    failed[shards[i]] = translated
                continue
            results.append(None if result is ABORTED else result)
        if error is None and barrier.down is not None:
            error = _unavailable(refs[barrier.down])
        if error is not None:
            if not commit and error.data.get("applied", False) is None:
                # Aborted everywhere: whatever the failure, nothing was applied
                # (so a caller may retry a part of it, see _mset_round).
                error.data["applied"] = False
            raise error
        return commit, votes, results

    async def _write_intent(
        self, barrier: Barrier, shards: list[int], parts: list[ops.AtomicPart]
    ) -> None:
        """Write the intent of a prepared multi-shard round, before its commit is decided.

        Every shard voted yes and holds, so each part's effects are known
        now. The intent holds them all (see :mod:`kvmemo.persistence.intents`):
        written from the event loop with ``everysec`` / ``no``, as the shards'
        appends are (no checkpoint until the decision), and written and synced
        in the store's next sync round with ``always``, shielded (a round's
        intent, once started, is finished). ``barrier.txid`` is set once the
        intent is written, so that each shard marks its resolution.

        A round whose parts cannot give their effects before they run (a
        transaction: its effects depend on its steps) is *deferred* instead
        (:meth:`Barrier.defer`): its intent is written once every shard has
        committed, before any shard journals its part
        (:meth:`_write_deferred_intent`).

        Raises:
            PersistenceIOError: the intent could not be written; the caller aborts.
            TooLargeError: the intent would not fit in one record (nothing
                written; the caller aborts).
        """
        offset = time.time() - _current_time()  # monotonic -> Unix seconds
        sections: list[tuple[int, bytes]] = []
        for shard, part in zip(shards, parts, strict=True):
            effects = part.effects(offset)
            if effects is None:
                barrier.defer()
                return
            if effects:
                sections.append((shard, effects))
        if len(sections) < 2:
            return  # one shard writes (a COPY): one GROUP record in its own log, if several
        if intent_payload(sections) > MAX_PAYLOAD:
            # Refused before anything is written, so nothing was applied (an
            # MSET round retries each of its MSETs alone, see _mset_round).
            raise TooLargeError(
                f"the write's effects are over the intent log's record limit ({MAX_PAYLOAD} bytes)",
                applied=False,
            )
        txid = self._txid = self._txid + 1
        # Set before the write: a shard whose hold times out meanwhile (an
        # abort) marks it in its log, which recovery reads before any redo.
        barrier.txid = txid
        try:
            await self._append_intent(txid, sections)
        except (OSError, ValueError) as exc:
            # It may be on disk in part or whole: the caller records the abort
            # (unsynced, as the shards' abort marks are; applied: maybe).
            raise PersistenceIOError(
                f"could not write the multi-shard write's intent: {exc}", applied=None
            ) from exc

    async def _append_intent(self, txid: int, sections: list[tuple[int, bytes]]) -> None:
        """Write an intent: from the event loop, or (``always``) written and synced in
        the store's next sync round, shielded (an intent once started is finished).

        Raises:
            OSError, ValueError: the write or the sync failed.
        """
        log, persistence = self._intents, self.persistence
        assert log is not None
        assert persistence is not None
        settled = self._settled_txid()
        if persistence.appendfsync is AppendFsync.ALWAYS:
            with trio.CancelScope(shield=True):
                await persistence.sync_coordinator.sync(
                    _IntentWrite(log, lambda: log.append(txid, sections, settled))
                )
        else:
            log.append(txid, sections, settled)

    def _settled_txid(self) -> int:
        """The newest txid up to which every round is marked durably in every shard it names.

        Each shard reports its oldest mark not yet durable
        (``ShardDurability.unsettled``); intents up to the one before the
        oldest of those may go (a shard restarting meanwhile keeps its
        journal, so its marks stay reported).
        """
        pending = [t for t in (d.unsettled() for d in self._durabilities) if t]
        return min(pending) - 1 if pending else self._txid

    async def _write_deferred_intent(
        self, barrier: Barrier, shards: list[int], commit: bool
    ) -> None:
        """The third phase of a deferred round: every shard committed; write the intent; release.

        Shielded and bounded: the shards hold until ``barrier.logged`` is set,
        which happens whatever becomes of the write (a failed write costs
        only this round's crash-atomicity: the shards journal their parts
        anyway, as their memory holds them). An aborted round just releases.
        """
        assert barrier.logged is not None
        assert barrier.applied is not None
        assert barrier.effects is not None
        try:
            if not commit:
                return
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.config.hold_timeout):
                    await barrier.applied.wait()
                if not barrier.applied.is_set():
                    return  # a shard did not commit in time: release the others
                sections = [
                    (shard, records)
                    for shard, records in zip(shards, barrier.effects, strict=True)
                    if records
                ]
                if len(sections) < 2:
                    return  # one shard wrote: its part is one GROUP record in its log
                if intent_payload(sections) > MAX_PAYLOAD:
                    # Applied already, so not refused: each shard journals its
                    # part (one GROUP record each, when it fits), without a
                    # round mark; a crash could keep some parts and not others.
                    durable.log.warning(
                        "a transaction's effects (%d bytes) are over the intent log's record"
                        " limit: logged per shard, without crash atomicity across shards",
                        sum(len(records) for _, records in sections),
                    )
                    return
                txid = self._txid = self._txid + 1
                # Set before the write: a shard whose wait for ``logged``
                # times out meanwhile journals its part with its mark.
                barrier.txid = txid
                with contextlib.suppress(OSError, ValueError):  # parts journalled without one
                    await self._append_intent(txid, sections)
        finally:
            barrier.logged.set()

    def _intent_aborted(self, txid: int) -> None:
        """Record that round ``txid``, whose intent was written, was aborted (no checkpoint).

        With ``always`` the caller then syncs it (:meth:`_sync_intents`)
        before it answers: a round aborted after its intent was durable (a
        shard's hold timed out during the intent's sync) must not be redone.
        """
        if self._intents is None:
            return  # closed meanwhile (the store stopped)
        with contextlib.suppress(OSError, ValueError):  # the shards' abort marks still say it
            self._intents.append(txid, [], self._settled_txid())

    async def _sync_intents(self) -> None:
        """With ``always``, make the intent log durable (shielded; errors only logged)."""
        intents, persistence = self._intents, self.persistence
        if intents is None or persistence is None:
            return
        if persistence.appendfsync is not AppendFsync.ALWAYS:
            return
        with trio.CancelScope(shield=True), contextlib.suppress(OSError, ValueError):
            await persistence.sync_coordinator.sync(_IntentWrite(intents))

    def stop_accepting(self) -> None:
        """Refuse every command from now on as "the store is closed": the store is stopping.

        Called as the tree is told to stop, so that the calls made while it
        stops are not told that a shard "is restarting"; :meth:`close`
        releases the rest once it has stopped. Calls already running finish
        or fail as the shards stop.

        The run's token is dropped too: the entry points' one identity check
        (see the module docstring) then fails for every caller and goes to
        :meth:`_outside_run`, which answers "the store is closed", so the
        fast paths refuse at once at no cost of their own.
        """
        self._closed = True
        self._token = _CLOSED_TOKEN

    def close(self) -> None:
        """Release what the engine holds open (shard, intent, commit logs); after the tree stopped.

        From then on every command is refused with UNAVAILABLE "the store is
        closed" (a closed store never comes back). Idempotent.

        A shard's graceful stop closes its log (``on_stop``); one stopped hard
        (its supervisor gave up or was killed, or its stop outran
        ``shutdown_timeout``) leaves it open: it is closed here, whatever
        ran the tree (``open_store``, ``serve``, ``open_node``), or one
        descriptor per shard would leak at each such stop. No sync: what was
        appended is in the OS's hands, as after a kill. No shard task is left
        to use the logs (a running sync or snapshot thread is always waited for).
        """
        self._closed = True
        self._token = _CLOSED_TOKEN  # see stop_accepting
        for durability in self._durabilities:
            log, durability.log = durability.log, None
            if log is not None:
                log.close()
        self.pubsub.close()  # subscribers waiting for a message get EndOfChannel
        if self._intents is not None:
            self._intents.close()
            self._intents = None
        if self.persistence is not None:
            self.persistence.sync_coordinator.close()
        self._release_directory()

    def _release_directory(self) -> None:
        fd, self._dir_lock = self._dir_lock, None
        if fd is not None:
            release_directory(fd)  # releases the directory's lock

    # -- transactions (MULTI/EXEC) and WATCH ------------------------------------------------

    def check_transaction_call(self, name: str, args: Sequence[bytes]) -> None:
        """Check a call as a transaction queues it, as Redis does: it exists, its
        number of arguments, and (ours) whether a transaction may hold it.

        Any other error of the call (a bad option, a value that is not an
        integer, a size over a limit) is not raised here: as in Redis, EXEC
        gives it in the call's place and runs the others.

        Raises:
            UnknownCommandError, ArityError, CommandSyntaxError: the
                transaction must be discarded (Redis's EXECABORT).
        """
        self._parse_context.restart()
        try:
            _, op = self._parse(name, args)
        except UnknownCommandError:
            raise
        except ArityError:
            if table_arity_ok(lookup(name), len(args), args):
                # The table's count holds and the command's own check refused
                # (MSET's pairs, PING's one message): Redis queues such a call
                # and EXEC answers the error in its place.
                return
            raise
        except KVMemoError:
            return  # answered in its place when the transaction runs
        spans = 1
        if isinstance(op, ops.AtomicOp) and not op.readonly:
            spans = len(self.slots.group_by_shard(op.keys))
        refusal = cross_shard_refusal(op, spans)
        if refusal is not None:
            raise refusal

    def check_transaction(self, calls: Sequence[tuple[str, Sequence[bytes]]]) -> None:
        """:meth:`check_transaction_call` for each of ``calls``, as EXEC would find them.

        Raises:
            KVMemoError: the first call that refuses the whole transaction,
                with ``data["index"]`` its position.
        """
        for index, (name, args) in enumerate(calls):
            try:
                self.check_transaction_call(name, args)
            except KVMemoError as exc:
                exc.data["index"] = index
                raise

    async def execute_transaction(
        self,
        calls: Sequence[tuple[str, Sequence[bytes]]],
        watches: Sequence[tuple[int, bytes, int]] = (),
    ) -> list[Any] | None:
        """Run ``calls`` as one atomic step (MULTI/EXEC): a result or error for each.

        No other command runs between them on any shard they touch, and no
        client sees some of their effects without the others (see
        :mod:`.transaction`). A call that fails gives its error in its place
        and the others still run (Redis's rule). ``watches`` are what
        :meth:`watch` returned: if any of those keys was written since,
        nothing runs and the answer is None.

        Raises:
            UnavailableError: a shard involved is restarting; nothing ran.
            OutOfMemoryError: a multi-shard MSET in it does not fit; nothing ran.
            RequestTimeoutError: no answer within ``request_timeout``.
        """
        if self._closed:  # one of server calls only would touch no shard
            raise _store_closed()
        if _current_token() is not self._token:
            raise self._outside_run()
        await _checkpoint_if_cancelled()  # cancelled: raises, and nothing runs
        started = _perf_counter()
        self._parse_context.restart()
        plan = Plan(len(calls))
        names: list[str | None] = [None] * len(calls)
        group_by_shard = self.slots.group_by_shard
        shard_of = self.slots.shard_of
        for i, (name, args) in enumerate(calls):
            try:
                spec, op = self._parse(name, args)
            except KVMemoError as exc:
                plan.fail(i, exc)
                continue
            names[i] = spec.name
            plan.add(i, op, args, group_by_shard, shard_of, self.config.shards)
        checks: dict[int, list[tuple[bytes, int]]] = {}
        for shard, key, count in watches:
            checks.setdefault(shard, []).append((key, count))
        shards = sorted(set(plan.steps) | set(checks))
        answers: dict[int, list[Any]] = {}
        if shards:
            try:
                held = await self._hold_transaction(plan, shards, checks)
            except KVMemoError as exc:
                self._txn_outcome["failed"].inc()
                closing = self._closing(exc)
                if closing is not exc:
                    raise closing from None
                raise
            if held is None:
                self._txn_outcome["watch"].inc()
                return None
            answers = held
        self._txn_outcome["run"].inc()
        results = plan.results(answers)
        for i, call in plan.server_calls.items():
            results[i] = await self._run_server(call)
        if not shards:
            await (
                _cancel_shielded_checkpoint()
            )  # no shard waited for: a schedule point all the same
        self._maybe_wake_eviction()
        elapsed = _perf_counter() - started
        for i, result in enumerate(results):
            if isinstance(result, KVMemoError):
                results[i] = self._closing(result)
                self._errors.labels(result.kind).inc()
                self._count_failure(names[i] or calls[i][0], result.kind)
                continue
            hist = self._latency_by_name.get(names[i] or "")
            if hist is not None:
                hist.observe(elapsed)
        return results

    async def _hold_transaction(
        self, plan: Plan, shards: list[int], checks: dict[int, list[tuple[bytes, int]]]
    ) -> dict[int, list[Any]] | None:
        """Hold ``shards`` and run their steps; each shard's answers, or None (WATCH)."""
        refs = [self._shard_for(shard) for shard in shards]  # UNAVAILABLE: nothing ran
        # Writes on two shards or more need an intent to stay whole across a crash.
        writers = sum(any(step.write for step in plan.steps.get(shard, ())) for shard in shards)
        writing = shards if writers > 1 else None
        budget = _RoomBudget()
        with trio.move_on_after(self.config.request_timeout):
            if plan.writes and not self.tracker.fits(plan.size):
                # Best effort: eviction cannot run on held shards, so make room first.
                await self._make_room(plan.size, budget)
            while True:
                parts: list[ops.AtomicPart] = [
                    TxnPart(plan.steps.get(shard, []), checks.get(shard, ())) for shard in shards
                ]
                await self._txn_lock.acquire(write=True)
                try:
                    committed, votes, answers = await self._hold_all(refs, parts, writing)
                finally:
                    self._txn_lock.release(write=True)
                if WATCH_CHANGED in votes:
                    return None
                if any(isinstance(v, NeedMemory) for v in votes):
                    # Room for every shard's share: the shards that did reserve
                    # gave theirs back with the abort, and need it again.
                    wanted = sum(part.wanted for part in parts if isinstance(part, TxnPart))
                    if not await self._make_room(wanted, budget):
                        raise out_of_memory(self.tracker)
                    continue
                if not committed:
                    raise RequestTimeoutError(
                        "the transaction was aborted: a shard did not prepare in time",
                        applied=False,
                    )
                return dict(zip(shards, answers, strict=True))
        raise RequestTimeoutError("the transaction did not finish in time", applied=None)

    async def watch(self, keys: Sequence[bytes]) -> list[tuple[int, bytes, int]]:
        """WATCH ``keys``: (shard, key, write count) for each, to give :meth:`execute_transaction`.

        Each key stays watched (its shard counts writes to it) until
        :meth:`unwatch` is given what this returned.

        Raises:
            UnavailableError: a shard is restarting; nothing is watched.
            RuntimeError: the call comes from another trio run (see :meth:`check_run`).
        """
        if _current_token() is not self._token:
            raise self._outside_run()
        await _checkpoint_if_cancelled()  # cancelled: raises, and nothing is watched
        if not keys:
            await (
                _cancel_shielded_checkpoint()
            )  # no shard to wait for: a schedule point all the same
        self._send_unwatch_backlog()
        out: list[tuple[int, bytes, int]] = []
        try:
            with trio.move_on_after(self.config.request_timeout) as scope:
                for shard, where in self.slots.group_by_shard(keys).items():
                    ref = self._shard_for(shard)
                    part = [keys[i] for i in where]
                    slot = await self._send(ref, WatchKeys(part))  # raises: not queued
                    try:
                        versions = slot.result() if slot.done else await slot.wait()
                    except BaseException as exc:
                        # Queued, so it may run (or have run): an unwatch queued
                        # after it undoes it, in mailbox order. Not when it never
                        # ran: a spare unwatch would take another client's watch.
                        never = isinstance(exc, ActorStopped) or (
                            isinstance(exc, ActorCrashed) and not exc.handler_started
                        )
                        if not never:
                            self._unwatch_backlog.append((shard, part))
                        if isinstance(exc, (ActorCrashed, ActorStopped)):
                            raise self._translate(exc, ref) from None
                        raise
                    out.extend((shard, key, v) for key, v in zip(part, versions, strict=True))
            if scope.cancelled_caught:
                raise RequestTimeoutError("WATCH did not finish in time", applied=False)
        except BaseException as exc:
            self.unwatch(out)
            if isinstance(exc, KVMemoError) and self._closing(exc) is not exc:
                raise self._closing(exc) from None
            raise
        return out

    def unwatch(self, watches: Sequence[tuple[int, bytes, int]]) -> None:
        """Stop watching what :meth:`watch` returned (no wait: for cleanup paths too)."""
        by_shard: dict[int, list[bytes]] = {}
        for shard, key, _ in watches:
            by_shard.setdefault(shard, []).append(key)
        self._unwatch_backlog.extend(by_shard.items())
        self._send_unwatch_backlog()

    def _send_unwatch_backlog(self) -> None:
        kept = []
        for shard, keys in self._unwatch_backlog:
            try:
                self._shards[shard].tell_nowait(UnwatchKeys(keys))
            except (MailboxFull, ActorStopped):
                kept.append((shard, keys))
        self._unwatch_backlog = kept

    async def _run_keyspace(self, op: ops.KeyspaceOp) -> Any:
        slots = []
        for i in range(self.config.shards):
            ref = self._shard_for(i)
            slots.append((ref, await self._send(ref, op.part())))
        results = []
        for ref, slot in slots:
            try:
                results.append(slot.result() if slot.done else await slot.wait())
            except (ActorCrashed, ActorStopped) as exc:
                raise self._translate(exc, ref) from None
        if op.write:
            self._maybe_wake_eviction()
        return op.combine(results)

    # -- commands the engine answers itself ---------------------------------------------------

    async def _run_server(self, call: ServerCall) -> Any:
        if type(call) is FixedReply:
            return call.value
        name, args = call.name, call.args
        if name == "publish":
            return self.pubsub.publish(args[0], args[1])
        if name == "pubsub|channels":
            return self.pubsub.channels(args[0] if args else None)
        if name == "pubsub|numsub":
            return [x for pair in self.pubsub.numsub(args) for x in pair]  # an array in RESP3 too
        if name == "pubsub|numpat":
            return self.pubsub.numpat()
        if name == "spublish":
            return self.pubsub.spublish(args[0], args[1])
        if name == "pubsub|shardchannels":
            return self.pubsub.shardchannels(args[0] if args else None)
        if name == "pubsub|shardnumsub":
            return [x for pair in self.pubsub.shardnumsub(args) for x in pair]  # idem
        if name == "ping":
            return args[0] if args else "PONG"
        if name == "echo":
            return args[0]
        if name == "time":
            now = time.time()
            return [str(int(now)).encode(), str(int(now % 1 * 1_000_000)).encode()]
        if name == "info":
            section = args[0].decode("utf-8", "replace").lower() if args else None
            return await self.info(section)
        if name == "scan":
            return await self._scan(args)
        if name == "save":
            if durable.saves_running(self._bgsave):
                raise CommandSyntaxError(durable.BGSAVE_IN_PROGRESS)  # as Redis's SAVE
            return await durable.save(self._shards, self.persistence, self.config.request_timeout)
        if name == "bgsave":
            return await self._bgsave_start(scheduled=bool(args))
        if name == "bgrewriteaof":
            return await self._bgrewriteaof_start()
        if name == "debug.actors":
            return self.actors()
        if name == "debug.kill":
            if not self.config.chaos:
                raise UnknownCommandError("unknown command 'debug.kill' (chaos is not enabled)")
            self.kill_actor(args[0].decode("utf-8", "replace"))
            return ops.OK
        if name == "command.list":
            return sorted(COMMANDS)
        if name == "auth":
            raise CommandSyntaxError("AUTH called without any password configured")
        raise UnknownCommandError(f"unknown command '{name}'")

    async def _bgsave_start(self, *, scheduled: bool) -> str:
        """BGSAVE [SCHEDULE]: start a snapshot of every shard and answer at once.

        The shards write their snapshots in their own background writers
        (as for SAVE, whose wait is the only difference); the engine keeps
        the tickets, so ``info persistence`` reports ``bgsave_in_progress``
        and the outcome. While one runs, a plain BGSAVE (and SAVE) is refused
        with Redis's error; BGSAVE SCHEDULE queues the next snapshot behind
        the running one in each shard (a shard queues a few, see
        ``durable_shard.SNAPSHOT_QUEUE``) and answers as Redis does.

        Raises:
            DisabledError: persistence is off.
            CommandSyntaxError: a BGSAVE is in progress (without SCHEDULE).
            UnavailableError, PersistenceIOError: as :func:`durable.start_saves`.
        """
        if self.persistence is None:
            raise DisabledError("persistence is not enabled on this server")
        running = durable.saves_running(self._bgsave)
        if running and not scheduled:
            raise CommandSyntaxError(durable.BGSAVE_IN_PROGRESS)
        # A BGREWRITEAOF being written is Redis's other child: BGSAVE waits for
        # it only when told to (SCHEDULE); its snapshots then queue behind.
        rewriting = self._rewrite.in_progress
        if rewriting and not scheduled:
            raise CommandSyntaxError(durable.BGSAVE_WHILE_REWRITING)
        tickets = await durable.start_saves(
            self._shards, self.persistence, self.config.request_timeout
        )
        self._bgsave = tickets
        if running or rewriting:
            return "Background saving scheduled"
        return "Background saving started"

    async def _bgrewriteaof_start(self) -> str:
        """BGREWRITEAOF: compact every shard's log with a snapshot; answer at once.

        KVMemo's log plays the AOF's part and a snapshot compacts it (see
        :class:`durable.Rewrite`), so this is BGSAVE's work under Redis's
        rules for an AOF rewrite: refused while one is being written
        (``REWRITE_IN_PROGRESS``); while a BGSAVE runs, its snapshots queue
        behind the BGSAVE's and it answers *scheduled*, as Redis does (a
        second one meanwhile also answers *scheduled* and asks for nothing
        more).

        Raises:
            DisabledError: persistence is off: there is no log to compact.
            CommandSyntaxError: a rewrite is being written.
            UnavailableError, PersistenceIOError: as :func:`durable.start_saves`.
        """
        if self.persistence is None:
            raise DisabledError("persistence is not enabled on this server")
        rewrite = self._rewrite
        if rewrite.in_progress:
            raise CommandSyntaxError(durable.REWRITE_IN_PROGRESS)
        if rewrite.scheduled:
            return "Background append only file rewriting scheduled"
        behind = self._bgsave if durable.saves_running(self._bgsave) else []
        tickets = await durable.start_saves(
            self._shards, self.persistence, self.config.request_timeout
        )
        rewrite.started(tickets, behind)
        if behind:
            return "Background append only file rewriting scheduled"
        return "Background append only file rewriting started"

    async def _scan(self, args: tuple[bytes, ...]) -> list[Any]:
        """One SCAN call: walk the shards in order from the cursor's position.

        The cursor is ``shard | field << 14 | tag << 46`` (an unsigned 64-bit
        integer, as Redis clients expect), (tag, field) being the position on
        that shard (see :meth:`ShardStore.scan`); 0 begins and ends a full
        iteration. Shards are asked one step at a time until COUNT keys are
        found or the last shard is done, so each step is one short message.

        Raises:
            CommandSyntaxError: ``invalid cursor``, for a cursor this server
                could not have returned (its shard number is past the last
                shard, or its position is malformed).
        """
        cursor = int(args[0])
        count = SCAN_DEFAULT_COUNT
        pattern: bytes | None = None
        type_filter: bytes | None = None
        for i in range(1, len(args), 2):
            opt = args[i].upper()
            if opt == b"COUNT":
                count = int(args[i + 1])
            elif opt == b"MATCH":
                pattern = None if args[i + 1] == b"*" else args[i + 1]
            else:
                type_filter = args[i + 1].lower()
        shard = cursor & _SCAN_SHARD_MASK
        offset = (cursor >> _SCAN_SHARD_BITS) & ((1 << SCAN_FIELD_BITS) - 1)
        scan_id = cursor >> (_SCAN_SHARD_BITS + SCAN_FIELD_BITS)
        if shard >= self.config.shards or not scan_position_valid(scan_id, offset):
            raise CommandSyntaxError("invalid cursor")
        keys: list[bytes] = []
        while True:
            ref = self._shard_for(shard)
            try:
                scan_id, offset, found = await ref.ask(
                    ops.ScanStep(scan_id, offset, count, pattern),
                    timeout=self.config.request_timeout,
                )
            except (ActorCrashed, ActorStopped, AskTimeout) as exc:
                raise self._translate(exc, ref) from None
            keys.extend(found)
            if offset == 0:
                shard += 1
                scan_id = SCAN_BEGIN
                if shard >= self.config.shards:
                    next_cursor = 0
                    break
            if len(keys) >= count:
                next_cursor = (
                    shard
                    | offset << _SCAN_SHARD_BITS
                    | scan_id << (_SCAN_SHARD_BITS + SCAN_FIELD_BITS)
                )
                break
        if type_filter is not None and type_filter != b"string":
            keys = []
        return [str(next_cursor).encode(), keys]

    def actors(self) -> list[dict[str, Any]]:
        """Every actor: name, state, restarts, mailbox depth."""
        if self.system is None:
            return []
        return [
            {"name": a.name, "state": a.state.value, "restarts": a.restarts, "mailbox": a.mailbox}
            for a in self.system.actors()
        ]

    def kill_actor(self, name: str) -> bool:
        """Kill an actor by name (chaos); False if it was not running.

        Raises:
            CommandSyntaxError: no such actor.
            RuntimeError: the call comes from another trio run (see :meth:`check_run`).
        """
        self.check_run()
        assert self.system is not None
        if name not in self.system.names():
            raise CommandSyntaxError(f"no actor named {name!r}")
        return self.system.kill(name)

    async def info(self, section: str | None = None) -> dict[str, Any]:
        """The ``info`` sections as a JSON-ready dict (one section, or all)."""
        stats = await self._shard_stats()
        keys = sum(s["keys"] for s in stats)
        self.refresh_actor_metrics()  # the restart and mailbox gauges, as a scrape reads them
        sections: dict[str, Any] = {
            "server": {
                "version": __version__,
                "process_id": os.getpid(),
                "uptime_in_seconds": int(time.time() - self._started_at),
                "shards": self.config.shards,
                # The supervisors' restart intensity (what a chaos run must stay under).
                "max_restarts": self.config.max_restarts,
                "restart_period": self.config.restart_period,
            },
            "memory": {
                "used_memory": self.tracker.used,
                "used_memory_peak": self.tracker.peak,
                "maxmemory": self.tracker.maxmemory,
                "maxmemory_policy": self._policy_name,
                "eviction_watermark": self.config.eviction_watermark,
                "oom_refusals": self.tracker.refused,
                # Open SCAN iterations' key references (8 bytes each), outside
                # used_memory: bounded by scan_snapshots per shard.
                "scan_snapshot_keys": sum(s["scan_snapshot_keys"] for s in stats),
            },
            "stats": {
                "expired_keys": sum(s["expired_keys"] for s in stats),
                "evicted_keys": sum(s["evicted_keys"] for s in stats),
                "eviction_manager_running": self._eviction_running(),
                **self.pubsub.stats(),
                # Per command: calls, usec, usec_per_call, rejected_calls,
                # failed_calls (Redis's INFO commandstats), since the start.
                "commands": {
                    name: counts.fields() for name, counts in sorted(self.command_stats().items())
                },
                "metrics": self.metrics.to_dict(),
            },
            "keyspace": {
                "keys": keys,
                "expires": sum(s["expires"] for s in stats),
                "shards": [s["keys"] for s in stats],
            },
            "actors": self.actors(),
            "persistence": await durable.info(
                self._shards,
                self.persistence,
                self.config.request_timeout,
                self._intents,
                self._bgsave,
                self._rewrite,
            ),
        }
        if section is None or section in ("all", "everything", "default"):
            return sections
        if section not in sections:
            return {}
        return {section: sections[section]}

    async def _shard_stats(self) -> list[dict[str, int]]:
        out = []
        for ref in self._shards:
            empty = {
                "keys": 0,
                "expires": 0,
                "expired_keys": 0,
                "evicted_keys": 0,
                "scan_snapshot_keys": 0,
            }
            if ref.state is not ActorState.RUNNING:
                out.append(empty)
                continue
            try:
                out.append(await ref.ask(Stats(), timeout=self.config.request_timeout))
            except (ActorCrashed, ActorStopped, AskTimeout):
                out.append(empty)
        return out

    # -- expiry and eviction, as the managers decide -------------------------------------------

    async def process_expired(self) -> tuple[int, bool]:
        """One expiry sweep over every running shard; (removed, backlog remains).

        Each tick also sends again the unwatches a full mailbox refused.
        """
        if self._unwatch_backlog:
            self._send_unwatch_backlog()
        message = ExpireDue(self.config.expiry_budget)
        slots = []
        for ref in self._shards:
            if ref.state is ActorState.RUNNING:
                try:
                    slots.append(ref.ask_nowait(message))
                except (MailboxFull, ActorStopped):
                    continue
        removed = 0
        backlog = False
        for slot in slots:
            try:
                n, more = slot.result() if slot.done else await slot.wait()
            except (ActorCrashed, ActorStopped, PersistenceIOError):
                # IO: the sweep ran, but a write of its batch could not be
                # logged and the shard failed every reply of the batch (see
                # _finish_batch); how many it removed is not known.
                continue
            removed += n
            backlog = backlog or more
        return removed, backlog

    async def reconcile_ttl(self) -> int:
        """Repair drifted TTL indexes; return how many shards needed it."""
        repaired = 0
        for ref in self._shards:
            if ref.state is ActorState.RUNNING:
                try:
                    repaired += bool(
                        await ref.ask(Reconcile(), timeout=self.config.request_timeout)
                    )
                except (ActorCrashed, ActorStopped, AskTimeout, PersistenceIOError):
                    continue  # IO: as in process_expired
        return repaired

    async def gather_candidates(self, sample: int) -> list[Candidate]:
        """Eviction candidates of every running shard, tagged with their shard."""
        message = Candidates(sample)
        slots = []
        for i, ref in enumerate(self._shards):
            if ref.state is ActorState.RUNNING:
                try:
                    slots.append((i, ref.ask_nowait(message)))
                except (MailboxFull, ActorStopped):
                    continue
        out: list[Candidate] = []
        for i, slot in slots:
            try:
                found = slot.result() if slot.done else await slot.wait()
            except (ActorCrashed, ActorStopped, PersistenceIOError):
                continue  # IO: as in process_expired (its candidates went with the reply)
            out.extend((score, i, key, size) for score, key, size in found)
        return out

    async def evict(self, victims: list[Candidate]) -> int:
        """Delete the chosen victims in their shards; return bytes freed."""
        by_shard: dict[int, list[bytes]] = {}
        for _, shard, key, _ in victims:
            by_shard.setdefault(shard, []).append(key)
        freed = 0
        for shard, keys in by_shard.items():
            ref = self._shards[shard]
            try:
                _, nbytes = await ref.ask(Evict(keys), timeout=self.config.request_timeout)
            except (ActorCrashed, ActorStopped, AskTimeout, PersistenceIOError):
                # IO: the victims are gone from memory (their deletes wait in
                # the journal for the disk): how many bytes that freed is not
                # known, so this round counts none; a writer that waits for
                # room sees the tracker (see _make_room).
                continue
            freed += nbytes
        return freed

    def _eviction_running(self) -> bool:
        return self._eviction is not None and self._eviction.state is ActorState.RUNNING

    def _maybe_wake_eviction(self) -> None:
        if self.tracker.used < self.tracker.wake_at or not self._eviction_running():
            return
        now = trio.current_time()
        if now - self._last_wake < WAKE_INTERVAL:
            return
        self._last_wake = now
        assert self._eviction is not None
        try:
            self._eviction.tell_nowait(Wake())
        except (MailboxFull, ActorStopped):
            pass

    async def out_of_memory(self) -> bool:
        """Whether usage stays over ``maxmemory`` once eviction had its chance.

        Redis's ``performEvictions() == EVICT_FAIL``, which its
        ``processCommand`` asks before it queues a command in MULTI, or runs
        an EXEC that queued a ``denyoom`` one: under ``noeviction``, or with
        the eviction manager down, the answer is at once the tracker's
        :attr:`~kvmemo.eviction.memory.MemoryTracker.over_limit`; under an
        evicting policy, eviction is asked to bring usage under the limit
        first, as a write that needs memory asks it (:meth:`_make_room`:
        at most ``MAKE_ROOM_ROUNDS`` rounds within ``oom_wait``), and the
        answer is whether usage is still over the limit. Unlike Redis, whose
        used memory includes the process's own, only the tracked bytes
        count: evicting every key always ends it.

        Raises:
            RuntimeError: the call comes from another trio run (see :meth:`check_run`).
        """
        if _current_token() is not self._token:
            raise self._outside_run()
        await _checkpoint_if_cancelled()  # cancelled: raises, and nothing is evicted
        tracker = self.tracker
        if not tracker.over_limit:
            await _cancel_shielded_checkpoint()  # nothing to wait for: a schedule point
            return False
        if self._policy_name == NoEvictionPolicy.name or not self._eviction_running():
            await _cancel_shielded_checkpoint()
            return True
        budget = _RoomBudget()
        # One byte more than fits while over: _make_room says no once a round frees nothing.
        while tracker.over_limit and await self._make_room(1, budget):
            pass
        return tracker.over_limit

    async def _make_room(self, nbytes: int, budget: _RoomBudget) -> bool:
        """Ask eviction for ``nbytes``; tell whether retrying the write may succeed.

        A write that needs memory may evict and retry up to ``MAKE_ROOM_ROUNDS``
        times within ``oom_wait`` seconds in all: concurrent writers can take
        the room one round made, so one round is not enough under a flood.
        The answer is no (the write gets OOM) once the budget is spent, or when
        eviction freed nothing (it is down, or has nothing to evict) and the
        bytes still do not fit.
        """
        now = trio.current_time()
        if budget.deadline is None:
            budget.deadline = now + self.config.oom_wait
        budget.rounds += 1
        if budget.rounds > MAKE_ROOM_ROUNDS or now >= budget.deadline:
            return False
        freed = 0
        if self._eviction is not None and self._eviction_running():
            try:
                freed = await self._eviction.ask(EvictNow(nbytes), timeout=budget.deadline - now)
            except (ActorCrashed, ActorStopped, AskTimeout):
                freed = 0
        return freed > 0 or self.tracker.fits(nbytes)


def _fail_unanswered(arg: tuple[ActorRef, ReplySlot]) -> None:
    """Monitor callback: a shard went down before answering a read; UNAVAILABLE for it."""
    ref, slot = arg
    slot.fail(_unavailable(ref))  # ignored when the reply came first


def _uncommitted_answers(
    items: list[tuple[int, Any]], answers: list[Any], error: PersistenceIOError
) -> list[Any]:
    """The results of a batch that ran but whose writes could not be logged (``error``).

    ``answers``: what each operation of ``items`` did, in order (a prefix
    of them when a :class:`NeedMemory` stopped the batch). A write that did
    something gets ``error`` (IO: in memory, but maybe not in the log, so
    applied is unknown); a write that failed on its own (a NeedMemory
    included) changed nothing and keeps its own error; a read keeps what it
    read, in its place in the batch (an earlier write of the batch
    included, as any later read would see it).
    """
    return [
        error if op.write and not isinstance(answer, KVMemoError) else answer
        for (_, op), answer in zip(items, answers, strict=False)
    ]


def _unavailable(ref: ActorRef) -> UnavailableError:
    """UNAVAILABLE for a shard that is not running, with its expected restart."""
    if ref.state is ActorState.STOPPED:  # its supervisor ended (or the store is closing)
        return UnavailableError(f"{ref.name} is stopped", retry_after_ms=1000)
    eta = ref.restart_eta()
    retry = 10 if eta is None else max(1, round((eta - trio.current_time()) * 1000))
    return UnavailableError(f"{ref.name} is restarting", retry_after_ms=retry)


def _store_closed() -> UnavailableError:
    """UNAVAILABLE for a call to a store whose block has ended: no retry will help."""
    return UnavailableError("the store is closed")


class _RoomBudget:
    """How much evict-and-retry one write has used (see ``KVEngine._make_room``)."""

    __slots__ = ("deadline", "rounds")

    def __init__(self) -> None:
        self.rounds = 0
        self.deadline: float | None = None


def _holds_lead(slot: ReplySlot) -> bool:
    """Whether a completed slot was handed the MSET lead."""
    try:
        return slot.result() is _LEAD
    except Exception:  # noqa: BLE001 - failed: no lead
        return False


class _IntentWrite(LogWrite):
    """A sync round's call for the intent log: ``append`` (if any), then the log's sync.

    A :class:`LogWrite`, so that a ``syncfs`` round syncs the intent log
    with the shards' logs instead of by a ``fsync`` of its own. Its outcome
    reaches the requester as the round's error for it; ``done`` keeps nothing.
    """

    __slots__ = ("_append", "_intents")

    def __init__(self, intents: IntentLog, append: Callable[[], None] | None = None) -> None:
        self._intents = intents
        self._append = append

    def write(self) -> SegmentedLog | None:
        if self._append is not None:
            self._append()
        return self._intents.segments

    def done(self, error: OSError | None) -> None:
        pass
