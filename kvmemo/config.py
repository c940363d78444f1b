"""Configuration of a store (and, later, of a server), validated up front.

Every limit of the engine lives here with its default and unit; the README's
configuration table lists the same names. Invalid values raise ``ValueError``
with an exact message (STYLE.md rule 12).
"""

from __future__ import annotations

import re

import attrs

from .commands.table import LCS_MAX_CELLS, LCS_MAX_LENGTH
from .eviction.policies import POLICY_NAMES, make_policy
from .persistence import records
from .persistence.wal import syncfs_supported

_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "gib": 1024**3,
}  # Redis reads "mb" as 1024*1024 and "m" as 10^6; so do we


def parse_size(value: int | str, *, what: str = "maxmemory") -> int:
    """Bytes from an int or a string like ``"64MiB"``, ``"256mb"``, ``"1gb"``, ``"100"``.

    Raises:
        ValueError: negative, or not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size like 64MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return value
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{what} must be a size like 64MiB, got {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


def _policy(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    make_policy(value)  # raises ValueError naming the known policies


def _maxmemory(value: int | str) -> int:
    return parse_size(value, what="maxmemory")


def _max_key_size(value: int | str) -> int:
    return parse_size(value, what="max_key_size")


def _pubsub_limit(value: int | str) -> int:
    size = parse_size(value, what="pubsub_buffer_limit")
    if size < 1:
        raise ValueError(f"pubsub_buffer_limit must be >= 1, got {size}")
    return size


def _max_value_size(value: int | str) -> int:
    return parse_size(value, what="max_value_size")


def _snapshot_bytes(value: int | str) -> int:
    return parse_size(value, what="snapshot_log_bytes")


@attrs.frozen
class StoreConfig:
    """Settings of one store (the engine and its actors).

    Attributes:
        shards: number of shard actors (1..16384).
        maxmemory: hard memory limit in bytes (0: none); strings like "64MiB" accepted.
        eviction_policy: one of ``POLICY_NAMES``.
        eviction_watermark: fraction of maxmemory that wakes eviction.
        eviction_target: fraction of maxmemory eviction frees down to.
        eviction_sample: candidates each shard offers per eviction round.
        oom_wait: seconds a write over the limit waits for eviction before OOM.
        ttl_tick: seconds between active-expiry sweeps.
        expiry_budget: keys each shard may expire per sweep.
        reconcile_every: ttl-manager ticks between TTL-index reconciliations.
        request_timeout: seconds a command may take before TIMEOUT.
        hold_timeout: seconds a shard holds for an atomic multi-shard write.
        mailbox_capacity: bound of each actor's mailbox (messages).
        max_key_size, max_value_size: bytes; bigger arguments get TOO_LARGE.
            With persistence on, their sum must fit one log record (2 GiB
            less 17 bytes), so that every write the limits allow can be logged.
        restart_backoff: first restart delay of a crashed actor (seconds).
        restart_backoff_max: cap of the restart delay (seconds).
        max_restarts, restart_period: a supervisor gives up after more than
            ``max_restarts`` restarts within ``restart_period`` seconds.
        chaos: allow killing actors through commands (``debug.kill``).
        data_dir: the data directory; persistence is off when None.
        appendfsync: ``always`` (acknowledge after fsync, group commit),
            ``everysec`` (fsync at least once a second) or ``no`` (the OS decides).
        repair: start despite a corrupt log, keeping every valid record and
            moving the rest aside.
        snapshot_log_bytes: log size of one shard that triggers its snapshot;
            0: never by size (as Redis's ``auto-aof-rewrite-percentage 0``):
            snapshots are then written by SAVE, BGSAVE and a graceful stop
            only, and the log grows until one is.
        fsync_method: how a sync round of ``appendfsync always`` (and the
            once-a-second sync of ``everysec``) makes the shards' logs
            durable: ``commitlog`` (the default: the round's batches go to
            their logs unsynced and, together, to one commit log frame,
            synced once; see :mod:`kvmemo.persistence.commitlog`),
            ``fsync`` each log, or one ``syncfs`` per file system (Linux
            5.17+; it syncs every file on that file system, and an error
            there fails every shard's batch).
        scan_snapshots: open SCAN iterations each shard remembers (each holds
            a reference per key of the shard, 8 bytes); beyond it the least
            recently continued one starts that shard over at its next call,
            and one pushed out again goes on in stateless hash order (at most
            ``SCAN_HASH_STEPS`` calls for that shard, see ``ShardStore.scan``).
        pubsub_buffer_limit: bytes of published messages a subscriber may
            have waiting (not yet written to it); a publish past it ends the
            subscriber (its connection is closed), as Redis's
            ``client-output-buffer-limit pubsub`` hard limit does.
        pubsub_max_subscriptions: channels, patterns and shard channels one
            subscriber may have together (each costs about 400 bytes, outside
            ``maxmemory``); a subscribe past it is refused with TOO_LARGE.
        lcs_max_cells, lcs_max_length: LCS's bounds: the product and the sum
            of its two values' lengths. LCS runs in the caller's task, without
            a checkpoint: these bound the time it holds the whole trio run (at
            the defaults, up to a few tenths of a second); past either, TOO_LARGE.
    """

    shards: int = attrs.field(default=16, validator=_at_least_one)
    maxmemory: int = attrs.field(default=0, converter=_maxmemory)
    eviction_policy: str = attrs.field(default="lru", validator=_policy)
    eviction_watermark: float = attrs.field(default=0.95, validator=_fraction)
    eviction_target: float = attrs.field(default=0.9, validator=_fraction)
    eviction_sample: int = attrs.field(default=16, validator=_at_least_one)
    oom_wait: float = attrs.field(default=0.05, validator=_positive)
    ttl_tick: float = attrs.field(default=0.1, validator=_positive)
    expiry_budget: int = attrs.field(default=1000, validator=_at_least_one)
    reconcile_every: int = attrs.field(default=600, validator=_at_least_one)
    request_timeout: float = attrs.field(default=5.0, validator=_positive)
    hold_timeout: float = attrs.field(default=1.0, validator=_positive)
    mailbox_capacity: int = attrs.field(default=4096, validator=_at_least_one)
    max_key_size: int = attrs.field(default=512 * 1024 * 1024, converter=_max_key_size)
    max_value_size: int = attrs.field(default=512 * 1024 * 1024, converter=_max_value_size)
    restart_backoff: float = attrs.field(default=0.005, validator=_positive)
    restart_backoff_max: float = attrs.field(default=1.0, validator=_positive)
    max_restarts: int = attrs.field(default=20, validator=_at_least_one)
    restart_period: float = attrs.field(default=10.0, validator=_positive)
    chaos: bool = False
    data_dir: str | None = None
    appendfsync: str = "everysec"
    repair: bool = False
    snapshot_log_bytes: int = attrs.field(default=256 * 1024 * 1024, converter=_snapshot_bytes)
    scan_snapshots: int = attrs.field(default=64, validator=_at_least_one)
    fsync_method: str = "commitlog"
    pubsub_buffer_limit: int = attrs.field(default=32 * 1024 * 1024, converter=_pubsub_limit)
    pubsub_max_subscriptions: int = attrs.field(default=100_000, validator=_at_least_one)
    lcs_max_cells: int = attrs.field(default=LCS_MAX_CELLS, validator=_at_least_one)
    lcs_max_length: int = attrs.field(default=LCS_MAX_LENGTH, validator=_at_least_one)

    def __attrs_post_init__(self) -> None:
        if self.shards > 16384:
            raise ValueError(f"shards must be <= 16384, got {self.shards}")
        if self.eviction_target > self.eviction_watermark:
            raise ValueError(
                "eviction_target must be <= eviction_watermark, got"
                f" {self.eviction_target} > {self.eviction_watermark}"
            )
        if self.appendfsync not in ("always", "everysec", "no"):
            raise ValueError(
                f"appendfsync must be always, everysec or no, got {self.appendfsync!r}"
            )
        if self.fsync_method not in ("commitlog", "fsync", "syncfs"):
            raise ValueError(
                f"fsync_method must be commitlog, fsync or syncfs, got {self.fsync_method!r}"
            )
        if self.fsync_method == "syncfs":
            why = syncfs_supported()
            if why is not None:
                raise ValueError(why)
        if self.data_dir is not None and not self.data_dir:
            raise ValueError("data_dir must not be empty")
        if self.data_dir is not None:
            # The log holds each SET as one record: the largest key with the
            # largest value must fit in one, or such a write could not be logged.
            entry = records.max_entry_bytes()
            if self.max_key_size + self.max_value_size > entry:
                raise ValueError(
                    "max_key_size + max_value_size must be <= "
                    f"{entry} bytes with persistence on (one log record), got "
                    f"{self.max_key_size} + {self.max_value_size}"
                )
        if self.restart_backoff_max < self.restart_backoff:
            raise ValueError(
                "restart_backoff_max must be >= restart_backoff, got"
                f" {self.restart_backoff_max} < {self.restart_backoff}"
            )


__all__ = ["POLICY_NAMES", "StoreConfig", "parse_size"]
