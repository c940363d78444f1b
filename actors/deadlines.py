"""Ask deadlines without a cancel scope per ask.

Design: a trio cancel scope costs about 11 µs per ask, half the cost of the
whole round trip. Instead, an ask with a timeout registers its reply slot
here; one sweeper task per actor system fails the slots whose deadline
passed (the asker then raises ``AskTimeout``) and the asker unregisters its
slot when the reply comes first. Registering and unregistering are O(1).

Slots are kept in one FIFO per timeout value (usually a handful of values),
so each FIFO is in deadline order and the sweeper only ever looks at the
heads. The sweeper sleeps until the earliest head and is woken when an
earlier deadline arrives. It drops the FIFOs it finds empty, so timeouts
computed per call (a remaining budget: a new value each time) leave nothing
behind; an asker still holding a dropped FIFO only pops from it.

Invariant: every pending entry's slot is not yet done, or is about to be
unregistered by its asker; a slot is failed at most once (slots ignore a
second completion anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import trio

from .errors import AskTimeout
from .reply import ReplySlot


class Deadlines:
    """Pending ask deadlines of one actor system.

    Each FIFO maps a pending slot to ``(deadline, actor)``; a plain dict keeps
    insertion order, which is deadline order within one timeout value.
    """

    def __init__(self) -> None:
        self._fifos: dict[float, dict[ReplySlot, tuple[float, str]]] = {}
        self._wake = trio.Event()
        self._sleeping_until = math.inf
        # The run's clock, read directly (the sweeper sets it once it runs);
        # trio.current_time reads the same clock through two more calls.
        self._now: Callable[[], float] = trio.current_time

    def add(self, slot: ReplySlot, timeout: float, actor: str) -> dict[ReplySlot, Any]:
        """Fail ``slot`` with ``AskTimeout`` if it is still pending ``timeout`` seconds from now.

        Returns:
            The FIFO the slot went into: the asker forgets the slot with
            ``fifo.pop(slot, None)`` once its reply came (what :meth:`discard`
            does, without the lookup).
        """
        deadline = self._now() + timeout
        fifo = self._fifos.get(timeout)
        if fifo is None:
            fifo = self._fifos[timeout] = {}
        fifo[slot] = (deadline, actor)
        if deadline < self._sleeping_until:
            self._wake.set()
        return fifo

    def discard(self, slot: ReplySlot, timeout: float) -> None:
        """Forget ``slot`` (its reply came)."""
        fifo = self._fifos.get(timeout)
        if fifo is not None:
            fifo.pop(slot, None)

    def __len__(self) -> int:
        return sum(len(f) for f in self._fifos.values())

    def _expire(self, now: float) -> float:
        """Fail every overdue slot and drop empty FIFOs; return the next deadline (inf if none)."""
        earliest = math.inf
        emptied: list[float] = []
        for timeout, fifo in self._fifos.items():
            while fifo:
                slot, (deadline, actor) = next(iter(fifo.items()))
                if deadline > now:
                    earliest = min(earliest, deadline)
                    break
                del fifo[slot]
                slot.fail(AskTimeout(actor, timeout))
            else:
                emptied.append(timeout)
        for timeout in emptied:
            del self._fifos[timeout]
        return earliest

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sweeper; runs for the life of the actor system."""
        self._now = trio.lowlevel.current_clock().current_time
        task_status.started()
        while True:
            target = self._expire(trio.current_time())
            self._wake = trio.Event()
            self._sleeping_until = target
            with trio.move_on_at(target):
                await self._wake.wait()
