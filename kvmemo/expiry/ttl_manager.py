"""The TTLManager actor: decides when expired keys are swept.

Design (after Redis's active expiry in ``expire.c``): every ``tick`` seconds
the manager asks the engine to process expired keys with a per-shard
``budget`` (keys per shard per sweep). A shard that still has due keys after
its budget reports a backlog; the manager then sweeps again right away,
yielding to the scheduler between sweeps, at most ``MAX_CATCHUP_SWEEPS``
times, so a mass expiry is worked off over following sweeps without ever
stalling a shard for long. Every ``reconcile_every`` ticks (not sweeps) it also asks for a
TTL-index reconciliation, which repairs an index that drifted from the
entries.

It never deletes a key itself: the engine does, through the shards. While
it is down, expired keys accumulate but are never served (every read checks
the entry's expiry); the restarted manager purges them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from actors import Actor

MAX_CATCHUP_SWEEPS = 10  # extra sweeps per tick while a backlog remains


@attrs.frozen
class SweepNow:
    """Ask for one sweep now; the reply is the number of keys removed."""


class TTLManager(Actor):
    """Schedules expiry sweeps.

    Args:
        sweep: runs one sweep; returns (keys removed, backlog remains).
        reconcile: repairs TTL indexes; returns how many were repaired.
        tick: seconds between sweeps.
        reconcile_every: ticks between reconciliations.
        on_sweep: observer of each sweep's removed count (metrics).
    """

    def __init__(
        self,
        sweep: Callable[[], Awaitable[tuple[int, bool]]],
        reconcile: Callable[[], Awaitable[int]],
        *,
        tick: float,
        reconcile_every: int,
        on_sweep: Callable[[int], None] = lambda removed: None,
    ) -> None:
        self._sweep = sweep
        self._reconcile = reconcile
        self.tick = tick
        self.reconcile_every = reconcile_every
        self._on_sweep = on_sweep
        self.sweeps = 0
        self.ticks = 0

    async def _sweep_once(self) -> tuple[int, bool]:
        removed, backlog = await self._sweep()
        self.sweeps += 1
        self._on_sweep(removed)
        return removed, backlog

    async def background(self) -> None:
        # A restarted manager purges what accumulated while it was down at once.
        removed, backlog = await self._sweep_once()
        while True:
            rounds = 0
            while backlog and rounds < MAX_CATCHUP_SWEEPS:
                await trio.lowlevel.checkpoint()
                _, backlog = await self._sweep_once()
                rounds += 1
            await trio.sleep(self.tick)
            _, backlog = await self._sweep_once()
            # Counted in ticks, not sweeps: catch-up sweeps make the sweep
            # count jump, and a modulus over it could skip every multiple.
            self.ticks += 1
            if self.ticks % self.reconcile_every == 0:
                await self._reconcile()

    async def handle(self, message: Any) -> Any:
        if isinstance(message, SweepNow):
            removed, _ = await self._sweep_once()
            return removed
        raise TypeError(f"ttl-manager got an unknown message {message!r}")
