"""Several connections' pipelines, run as one engine call.

Design. ``KVEngine.execute_many`` groups a batch's single-key commands per
shard, one message per shard. A pipeline of 16 commands from one connection
touches about ten of 16 shards: one or two commands per message, so the
per-message cost (a send, a wake-up, a reply, the batch's own bookkeeping)
dominated a pipelined GET. Connections served in the same scheduler pass
(epoll hands the server many ready sockets at once) therefore submit their
batches to one :class:`Coalescer`: the first becomes the *leader*, yields
once so that the others of the pass join, then runs every batch gathered as
one ``execute_many`` and hands each its own results. Batches that arrive
while a round runs gather for the next one; the leader promotes the oldest
of them when it is done, so no task leads forever.

Order. Each connection submits one batch at a time and waits for it, so its
commands keep their order; the union is the batches in arrival order, and
``execute_many`` keeps the order of commands per key. Commands of
different connections have no order to keep.

Cancellation. A round, once taken, runs to its end shielded (the engine
bounds it with ``request_timeout``): its leader's cancellation (a
connection closing) must not interrupt other connections' commands; it is
delivered afterwards. A waiter cancelled before its batch was taken
withdraws it (nothing of it runs); one cancelled while its batch runs
abandons its results (the commands may have run, as with any cancelled
request).

Ownership: one coalescer per Redis port (the server state owns it); it owns
no task: rounds run in their leader's task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ..engine.engine import KVEngine

MAX_ROUND_CALLS = 4096  # commands per round; a round past it leaves the rest for the next


@attrs.define(eq=False)
class _Batch:
    """One connection's commands, and their results once its round ran."""

    calls: Sequence[tuple[str, Sequence[bytes]]]
    done: trio.Event = attrs.Factory(trio.Event)
    lead: bool = False  # promoted: run the next round
    results: list[Any] | None = None


class Coalescer:
    """Runs the ``execute_many`` batches submitted in one scheduler pass as one.

    Invariant: ``_leading`` is True from the moment a task claims a round
    until that round's results are handed out; when it is False and batches
    are waiting, the oldest one has been told to lead.
    """

    def __init__(self, engine: KVEngine, *, max_round_calls: int = MAX_ROUND_CALLS) -> None:
        self._engine = engine
        self._max = max_round_calls
        self._waiting: list[_Batch] = []
        self._leading = False
        self.rounds = 0  # rounds run (for tests and statistics)

    async def execute_many(self, calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        """``engine.execute_many(calls)``, run in a round with other connections' batches."""
        batch = _Batch(calls)
        self._waiting.append(batch)
        try:
            while batch.results is None:
                if not self._leading:
                    await self._lead(batch)
                    continue
                await batch.done.wait()
                if batch.lead and batch.results is None:
                    batch.lead = False
                    batch.done = trio.Event()
        except BaseException:
            if batch in self._waiting:  # not taken: nothing of it runs
                self._waiting.remove(batch)
            self._promote()
            raise
        return batch.results

    async def _lead(self, own: _Batch) -> None:
        """Claim the next round, let the pass's batches join, run it, hand out results."""
        self._leading = True
        taken: list[_Batch] = []
        try:
            await trio.lowlevel.checkpoint()  # the other connections of this pass submit
            size = 0
            while self._waiting and (not taken or size + len(self._waiting[0].calls) <= self._max):
                batch = self._waiting.pop(0)
                taken.append(batch)
                size += len(batch.calls)
            if own not in taken:  # cancelled meanwhile, or the round is full before it
                return
            union = [call for batch in taken for call in batch.calls]
            with trio.CancelScope(shield=True):
                results = await self._engine.execute_many(union)
            self.rounds += 1
            start = 0
            for batch in taken:
                end = start + len(batch.calls)
                batch.results = results[start:end]
                start = end
                batch.done.set()
            taken = []
        finally:
            # Batches taken but not answered (the engine call raised): their
            # waiters get the error too, as their own call would have.
            for batch in taken:
                if batch.results is None:
                    self._waiting.insert(0, batch)
            self._leading = False
            self._promote()

    def _promote(self) -> None:
        """If no round is claimed and batches wait, tell the oldest to lead."""
        if not self._leading and self._waiting:
            oldest = self._waiting[0]
            oldest.lead = True
            oldest.done.set()
