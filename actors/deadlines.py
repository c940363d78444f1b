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

Registration is on the path of every ask with a timeout, so it is kept to
a dict store: each FIFO carries the clock reader its deadlines are read
with (``now() + offset == trio.current_time()``, see :func:`clock_reader`:
under trio's ``SystemClock`` that is ``time.perf_counter`` and the clock's
offset, a C call instead of a Python method), and ``ActorRef.ask`` inlines
the store into a FIFO that is not empty (see :meth:`Deadlines.add`).
Deadlines are exactly ``trio.current_time() + timeout``, as the sweeper
reads the time, under any clock.

Invariants:

- Within one FIFO, deadlines never decrease in insertion order (one timeout
  value, a monotonic clock), so its head is its earliest deadline.
- Every non-empty FIFO's head is no earlier than ``_sleeping_until``, or
  ``_wake`` is set. Hence only an insert into an EMPTY FIFO can need to
  wake the sweeper: an insert into a non-empty one lands behind its head.
  (Strictly, only a new FIFO's first deadline can: each later one is no
  earlier than the FIFO's first, or than the head the sweeper last saw in
  it. The inline path keeps to the simpler rule; the test costs nothing.)
- Every pending entry's slot is not yet done, or is about to be unregistered
  by its asker; a slot is failed at most once (slots ignore a second
  completion anyway).

Ownership: the sweeper alone removes FIFOs (empty ones) and entries whose
deadline passed (failing their slots); askers insert (through
:meth:`Deadlines.add` or the inline path in ``ActorRef.ask``) and pop their
own slot; nothing else writes here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from time import perf_counter
from typing import Any

import trio

from .errors import AskTimeout
from .reply import ReplySlot

Fifo = dict[ReplySlot, tuple[float, str]]
"""Pending slots of one timeout value, in deadline order: slot -> ``(deadline, actor)``."""

ClockReader = tuple[Callable[[], float], float]
"""``(now, offset)``: ``now() + offset`` is the run's ``trio.current_time()``."""


def clock_reader(clock: trio.abc.Clock) -> ClockReader:
    """The cheapest exact reader of ``clock``: ``now() + offset == clock.current_time()``.

    trio's ``SystemClock.current_time`` is ``self.offset + perf_counter()``
    (a Python method): for that clock, ``(time.perf_counter, clock.offset)``
    gives the very same float (IEEE addition is commutative) with one C call.
    It is recognised by its class name and package, a float ``offset``, and
    a reading that falls between two of the clock's own; anything else (a
    ``MockClock``, a subclass, a future trio whose clock differs) is read
    through its ``current_time`` with offset 0.0 (``x + 0.0 == x``).
    """
    cls = type(clock)
    offset = getattr(clock, "offset", None)
    if (
        cls.__name__ == "SystemClock"
        and cls.__module__.split(".", 1)[0] == "trio"
        and type(offset) is float
    ):
        before = clock.current_time()
        mine = perf_counter() + offset
        after = clock.current_time()
        if before <= mine <= after:
            return perf_counter, offset
    return clock.current_time, 0.0


class Deadlines:
    """Pending ask deadlines of one actor system.

    ``_fifos`` maps a timeout value to ``(fifo, now, offset)``: the FIFO of
    its pending slots (a plain dict keeps insertion order, which is deadline
    order within one timeout value) and the clock reader its deadlines are
    computed with, ``now() + offset + timeout`` (see :func:`clock_reader`).
    ``ActorRef.ask`` reads ``_fifos`` directly (its inlined fast path).
    """

    def __init__(self) -> None:
        self._fifos: dict[float, tuple[Fifo, Callable[[], float], float]] = {}
        self._wake = trio.Event()
        self._sleeping_until = math.inf
        # Until the sweeper runs and picks the run's clock reader, FIFOs are
        # opened reading trio.current_time: the same times, only slower.
        self._clock: ClockReader = (trio.current_time, 0.0)

    def add(self, slot: ReplySlot, timeout: float, actor: str) -> dict[ReplySlot, Any]:
        """Fail ``slot`` with ``AskTimeout`` if it is still pending ``timeout`` seconds from now.

        The deadline is ``trio.current_time() + timeout``, exactly.
        ``ActorRef.ask`` inlines this for a FIFO that is not empty (the
        common case): ``fifo[slot] = (now() + offset + timeout, actor)``;
        this method is its path for a new or empty FIFO, which may need to
        wake the sweeper.

        Returns:
            The FIFO the slot went into: the asker forgets the slot with
            ``fifo.pop(slot, None)`` once its reply came (what :meth:`discard`
            does, without the lookup).
        """
        entry = self._fifos.get(timeout)
        if entry is None:
            now, offset = self._clock
            fifo: Fifo = {}
            self._fifos[timeout] = (fifo, now, offset)
        else:
            fifo, now, offset = entry
        deadline = now() + offset + timeout
        if not fifo and deadline < self._sleeping_until:
            self._wake.set()
        fifo[slot] = (deadline, actor)
        return fifo

    def discard(self, slot: ReplySlot, timeout: float) -> None:
        """Forget ``slot`` (its reply came)."""
        entry = self._fifos.get(timeout)
        if entry is not None:
            entry[0].pop(slot, None)

    def __len__(self) -> int:
        return sum(len(fifo) for fifo, _, _ in self._fifos.values())

    def _expire(self, now: float) -> float:
        """Fail every overdue slot and drop empty FIFOs; return the next deadline (inf if none)."""
        earliest = math.inf
        emptied: list[float] = []
        for timeout, (fifo, _, _) in self._fifos.items():
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
        self._clock = clock_reader(trio.lowlevel.current_clock())
        task_status.started()
        while True:
            target = self._expire(trio.current_time())
            self._wake = trio.Event()
            self._sleeping_until = target
            with trio.move_on_at(target):
                await self._wake.wait()
