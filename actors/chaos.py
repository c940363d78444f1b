"""A chaos monkey: kill random actors of a system at a given rate.

Kills arrive as a Poisson process (exponential gaps with mean ``1 / rate``),
each on a target chosen uniformly among those running at that moment, for
``duration`` seconds. Seed ``rng`` for a replayable schedule.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs
import trio

from .actor import ActorState
from .system import ActorSystem


@attrs.frozen
class Kill:
    """One kill the monkey did."""

    time: float
    actor: str


@attrs.define
class ChaosMonkey:
    """Kills random actors of ``system``.

    Attributes:
        system: the actor system to harass.
        rate: kills per second (> 0).
        duration: seconds to run.
        targets: the names it may kill (None: every non-supervisor actor), or a
            predicate on names.
        rng: randomness for gaps and choices.
        kills: what it did, in order.
    """

    system: ActorSystem
    rate: float
    duration: float
    targets: Sequence[str] | Callable[[str], bool] | None = None
    rng: random.Random = attrs.field(factory=random.Random)
    kills: list[Kill] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.duration < 0:
            raise ValueError(f"duration must be >= 0, got {self.duration}")

    def _candidates(self) -> list[str]:
        names = self.system.names(supervisors=False)
        if self.targets is None:
            chosen = names
        elif callable(self.targets):
            chosen = [n for n in names if self.targets(n)]
        else:
            wanted = set(self.targets)
            chosen = [n for n in names if n in wanted]
        return [n for n in chosen if self.system.state(n) is ActorState.RUNNING]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Kill actors until ``duration`` has passed."""
        task_status.started()
        end = trio.current_time() + self.duration
        while True:
            gap = self.rng.expovariate(self.rate)
            if trio.current_time() + gap > end:
                await trio.sleep_until(end)
                return
            await trio.sleep(gap)
            candidates = self._candidates()
            if candidates:
                name = self.rng.choice(candidates)
                if self.system.kill(name):
                    self.kills.append(Kill(trio.current_time(), name))
