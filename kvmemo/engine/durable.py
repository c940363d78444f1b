"""The engine's side of persistence: recovery before start, SAVE, and its report.

The engine still owns no data: it asks each shard actor to snapshot itself
(:class:`~kvmemo.storage.durable_shard.Save`) and waits for every shard's
ticket; it gathers each shard's figures for ``info persistence``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs

from actors import ActorCrashed, ActorRef, ActorState, ActorStopped, AskTimeout

from ..config import StoreConfig
from ..errors import DisabledError, PersistenceIOError, UnavailableError
from ..eviction.memory import MemoryTracker
from ..eviction.policies import make_policy
from ..persistence import AppendFsync
from ..persistence.intents import IntentLog
from ..persistence.layout import check_shard_count, lock_directory, release_directory
from ..storage.durable_shard import (
    PersistenceConfig,
    PersistenceInfo,
    Save,
    SaveTicket,
    prepare_stores,
)
from ..storage.store import ShardStore
from ..storage.sync_coordinator import SyncCoordinator

log = logging.getLogger("kvmemo.persistence")


def persistence_config(config: StoreConfig) -> PersistenceConfig | None:
    """The persistence settings of a store, or None when persistence is off."""
    if config.data_dir is None:
        return None
    return PersistenceConfig(
        Path(config.data_dir),
        AppendFsync(config.appendfsync),
        repair=config.repair,
        snapshot_bytes=config.snapshot_log_bytes,
        sync_coordinator=SyncCoordinator(
            method=config.fsync_method, directory=Path(config.data_dir)
        ),
    )


def claim_directory(directory: Path, shards: int) -> int | None:
    """Lock the data directory and check its shard count (blocking); the lock's descriptor.

    None: the directory cannot hold a lock file (read-only, full); it is
    served unlocked. The caller closes the descriptor once the store stopped.

    Raises:
        DirectoryInUse: another store holds it.
        ShardCountMismatch: it was written with another number of shards
            (the lock is released again).
    """
    fd = lock_directory(directory)
    try:
        check_shard_count(directory, shards)
    except BaseException:
        if fd is not None:
            release_directory(fd)
        raise
    return fd


async def recover_all(
    config: StoreConfig, persistence: PersistenceConfig, tracker: MemoryTracker
) -> tuple[dict[int, ShardStore], IntentLog]:
    """Rebuild every shard from disk before the tree starts (logs each warning).

    Returns the recovered stores and the open intent log, which the caller
    owns (and closes).
    """
    stores, warnings, intents = await prepare_stores(
        config.shards,
        tracker,
        lambda: make_policy(config.eviction_policy),
        persistence,
        scan_snapshots=config.scan_snapshots,
    )
    for warning in warnings:
        log.warning("%s", warning)
    keys = sum(len(s.data) for s in stores.values())
    log.info("recovered %d keys from %s", keys, persistence.directory)
    return stores, intents


BGSAVE_IN_PROGRESS = "Background save already in progress"
# Redis's words for BGREWRITEAOF, and for a BGSAVE while a rewrite runs.
REWRITE_IN_PROGRESS = "Background append only file rewriting already in progress"
BGSAVE_WHILE_REWRITING = (
    "Another child process is active (AOF?): can't BGSAVE right now."
    " Use BGSAVE SCHEDULE in order to schedule a BGSAVE whenever possible."
)


@attrs.define
class Rewrite:
    """The last BGREWRITEAOF: KVMemo's AOF rewrite is a snapshot of every shard.

    Redis rewrites its append-only file to compact it; a KVMemo shard's log
    is compacted by a snapshot (the segments it covers are removed), so
    BGREWRITEAOF asks every shard for one, as BGSAVE does, and keeps its
    own tickets and status (Redis's ``aof_rewrite_in_progress``,
    ``aof_rewrite_scheduled``, ``aof_last_bgrewrite_status``, apart from
    the RDB's). Started while a BGSAVE runs, its snapshots queue behind the
    BGSAVE's in each shard and it is *scheduled* (Redis starts the rewrite
    once the BGSAVE's child is done) until every one of those is durable.

    Invariant: ``after`` is empty or the BGSAVE tickets that were running
    when ``tickets`` were asked for.
    """

    tickets: list[SaveTicket] = attrs.Factory(list)
    after: list[SaveTicket] = attrs.Factory(list)
    previous_status: str | None = None  # the outcome of the one before, if it finished

    @property
    def scheduled(self) -> bool:
        """Asked for, waiting behind a BGSAVE's snapshots."""
        return saves_running(self.tickets) and saves_running(self.after)

    @property
    def in_progress(self) -> bool:
        """Being written (and no longer waiting behind a BGSAVE)."""
        return saves_running(self.tickets) and not saves_running(self.after)

    @property
    def status(self) -> str | None:
        """The last finished rewrite's outcome (``"ok"``, ``"err"``), None before any."""
        return saves_status(self.tickets) or self.previous_status

    def started(self, tickets: list[SaveTicket], after: list[SaveTicket]) -> None:
        """Record a new rewrite's tickets (queued behind ``after``, if running)."""
        self.previous_status = self.status
        self.tickets = tickets
        self.after = after if saves_running(after) else []


async def start_saves(
    shards: list[ActorRef], persistence: PersistenceConfig | None, timeout: float
) -> list[SaveTicket]:
    """Ask every shard for a snapshot; its ticket each (the snapshots are being written).

    A shard writes its snapshot in its background writer: the ask returns as
    soon as the shard has copied its dicts (its pause), and the ticket
    completes once the file is durable.

    Raises:
        DisabledError: persistence is off.
        UnavailableError: a shard is restarting (the shards asked before it
            write their snapshots all the same).
        PersistenceIOError: a shard crashed or did not answer in time.
    """
    if persistence is None:
        raise DisabledError("persistence is not enabled on this server")
    tickets = []
    for ref in shards:
        if ref.state is not ActorState.RUNNING:
            raise UnavailableError(f"{ref.name} is restarting", retry_after_ms=100)
        try:
            tickets.append(await ref.ask(Save(), timeout=timeout))
        except (ActorCrashed, ActorStopped, AskTimeout) as exc:
            raise PersistenceIOError(
                f"{ref.name} could not snapshot: {exc}", applied=False
            ) from None
    return tickets


def saves_running(tickets: list[SaveTicket]) -> bool:
    """Whether any of a BGSAVE's snapshots is still being written."""
    return any(not ticket.done.is_set() for ticket in tickets)


def saves_status(tickets: list[SaveTicket]) -> str | None:
    """A finished BGSAVE's outcome: ``"ok"``, ``"err"`` (a snapshot failed), None (none yet)."""
    if not tickets or saves_running(tickets):
        return None
    return "err" if any(ticket.error is not None for ticket in tickets) else "ok"


async def save(
    shards: list[ActorRef], persistence: PersistenceConfig | None, timeout: float
) -> str:
    """SAVE: a snapshot of every shard; "OK" once all are durable.

    Raises:
        DisabledError: persistence is off.
        UnavailableError: a shard is restarting.
        PersistenceIOError: a snapshot could not be written.
    """
    tickets = await start_saves(shards, persistence, timeout)
    # Wait for every shard before reporting a failure: a SAVE that returns
    # leaves no snapshot being written behind it.
    failures: list[PersistenceIOError] = []
    for ticket in tickets:
        try:
            await ticket.wait()
        except PersistenceIOError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
    return "OK"


async def info(
    shards: list[ActorRef],
    persistence: PersistenceConfig | None,
    timeout: float,
    intents: IntentLog | None = None,
    bgsave: list[SaveTicket] | None = None,
    rewrite: Rewrite | None = None,
) -> dict[str, Any]:
    """The ``persistence`` section of ``info``.

    ``intents``: the engine's intent log, for its figures (its size, the
    newest txid, and the shard parts recovery redid at start). ``bgsave``:
    the tickets of the last BGSAVE (none yet: an empty list); ``rewrite``:
    the last BGREWRITEAOF.
    """
    bgsave = bgsave or []
    rewrite = rewrite or Rewrite()
    if persistence is None:
        return {"enabled": False}
    per_shard = []
    for ref in shards:
        if ref.state is not ActorState.RUNNING:
            per_shard.append({"shard": ref.name, "health": "restarting"})
            continue
        try:
            figures = await ref.ask(PersistenceInfo(), timeout=timeout)
        except (ActorCrashed, ActorStopped, AskTimeout):
            per_shard.append({"shard": ref.name, "health": "restarting"})
            continue
        per_shard.append({"shard": ref.name, **figures})
    saves = [s["last_save"] for s in per_shard if s.get("last_save")]
    commit_log = persistence.sync_coordinator.commit_log
    # ``health`` is the logs' (their appends and syncs) and nothing else; the
    # snapshots have their own status, as Redis keeps rdb_last_bgsave_status
    # apart from aof_last_write_status.
    failing = [s["shard"] for s in per_shard if s.get("health") == "failing"]
    statuses = {s.get("last_snapshot_status") for s in per_shard}
    snapshot_status = "err" if "err" in statuses else "ok" if "ok" in statuses else None
    return {
        "enabled": True,
        "dir": str(persistence.directory),
        "appendfsync": persistence.appendfsync.value,
        "health": "failing" if failing else "ok",
        "failing_shards": failing,
        "errors": [s["error"] for s in per_shard if s.get("error")],
        "log_bytes": sum(int(s.get("log_bytes") or 0) for s in per_shard),
        "sync_lag_seconds": max(
            (float(s.get("sync_lag_seconds") or 0) for s in per_shard), default=0.0
        ),
        "last_save": min(saves) if len(saves) == len(per_shard) and saves else None,
        "last_snapshot_pause_ms": max(
            (
                float(s["last_snapshot_pause_ms"])
                for s in per_shard
                if s.get("last_snapshot_pause_ms") is not None
            ),
            default=None,
        ),
        "intent_log_bytes": intents.size() if intents is not None else 0,
        "commit_log_bytes": commit_log.size() if commit_log is not None else 0,
        "last_txid": intents.last_txid if intents is not None else 0,
        "intents_redone_at_start": intents.redone if intents is not None else 0,
        "bgsave_in_progress": saves_running(bgsave),
        "last_bgsave_status": saves_status(bgsave),
        "bgrewriteaof_in_progress": rewrite.in_progress,
        "bgrewriteaof_scheduled": rewrite.scheduled,
        "last_bgrewriteaof_status": rewrite.status,
        "last_snapshot_status": snapshot_status,
        "snapshot_errors": [
            f"{s['shard']}: {s['snapshot_error']}" for s in per_shard if s.get("snapshot_error")
        ],
        # Log segments a written snapshot covers that could not be removed
        # (retried): no failure of the snapshot, nor of the log.
        "leftover_segments": sum(int(s.get("leftover_segments") or 0) for s in per_shard),
        "leftover_errors": [
            f"{s['shard']}: {s['leftover_error']}" for s in per_shard if s.get("leftover_error")
        ],
        "shards": per_shard,
    }
