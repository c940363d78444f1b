"""The EvictionManager actor: picks victims across shards when memory is short.

Design (after Redis's ``evict.c``, with exact per-shard policies instead of
sampling): when woken, the manager computes how many bytes must go to bring
tracked usage back to the target fraction of ``maxmemory``, gathers the best
``sample`` candidates of every shard's policy (their scores are comparable
across shards), sorts them, and takes the lowest-scored until their sizes
cover the excess. The engine deletes them (the manager suggests, the engine
executes); the bytes freed are recorded per cycle. Rounds repeat until usage
is back under the target or no candidate is left (``noeviction``, or
``volatile-*`` with no volatile key): then writes past the limit get OOM.

If the manager is down, the engine bypasses it: writes proceed until the
hard limit, then fail with OOM. Nothing crashes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from actors import Actor

from .memory import MemoryTracker

MAX_ROUNDS = 64  # candidate rounds per cycle; bounds one cycle's work

Candidate = tuple[int, int, bytes, int]
"""(score, shard, key, bytes freed if evicted); lower score = evict first."""


@attrs.frozen
class Wake:
    """Usage crossed the watermark: run a cycle (no reply needed)."""


@attrs.frozen
class EvictNow:
    """A write needs ``nbytes``: run a cycle now; the reply is the bytes freed."""

    nbytes: int = 0


class EvictionManager(Actor):
    """Decides which keys to evict.

    Args:
        tracker: the store's memory tracker (read-only here).
        gather: candidates of every shard, ``sample`` each.
        evict: deletes the chosen victims; returns bytes freed.
        sample: candidates asked of each shard per round.
        on_cycle: observer of (keys evicted, bytes freed) per cycle (metrics).
    """

    def __init__(
        self,
        tracker: MemoryTracker,
        gather: Callable[[int], Awaitable[list[Candidate]]],
        evict: Callable[[list[Candidate]], Awaitable[int]],
        *,
        sample: int,
        on_cycle: Callable[[int, int], None] = lambda keys, freed: None,
    ) -> None:
        self.tracker = tracker
        self._gather = gather
        self._evict = evict
        self.sample = sample
        self._on_cycle = on_cycle

    async def handle(self, message: Any) -> int:
        if isinstance(message, (Wake, EvictNow)):
            extra = message.nbytes if isinstance(message, EvictNow) else 0
            return await self.cycle(extra)
        raise TypeError(f"eviction-manager got an unknown message {message!r}")

    async def cycle(self, extra: int = 0) -> int:
        """Evict until usage (plus ``extra`` wanted) is back under the target."""
        tracker = self.tracker
        freed_total = 0
        evicted = 0
        for _ in range(MAX_ROUNDS):
            need = tracker.excess()
            if extra and tracker.maxmemory:
                need = max(need, tracker.used + extra - tracker.maxmemory)
            if need <= 0:
                break
            candidates = await self._gather(self.sample)
            if not candidates:
                break
            candidates.sort()
            chosen: list[Candidate] = []
            covered = 0
            for cand in candidates:
                chosen.append(cand)
                covered += cand[3]
                if covered >= need:
                    break
            freed = await self._evict(chosen)
            if freed <= 0:
                break
            freed_total += freed
            evicted += len(chosen)
        if freed_total:
            self._on_cycle(evicted, freed_total)
        return freed_total
