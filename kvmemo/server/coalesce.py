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

What may be coalesced (:data:`COALESCED`): batches
whose commands all act on one key (``first_key == last_key == 1`` in the
command table: GET, SET, INCR, ...). The engine runs those as shard
operations, grouped per shard, so a round of many batches is one message
per shard. A multi-key or keyspace command in a union would split it: the
engine runs such a command by itself, after everything before it and
before everything after it, so it would serialise the other batches of
the round behind it; batches holding one run by themselves.

Order. Each submitter waits for its batch before it submits anything that
must come after it (a connection submits one batch at a time), so its
commands keep their order; the union is the batches in arrival order, and
``execute_many`` keeps the order of commands per key. Batches in a round
together have no order to keep between them.

Coupling. A round's batches are answered together, when its slowest shard
has answered: a connection whose batch shares a round with a request to a
stalled shard (restarting, or holding for an atomic write) waits for it,
within ``request_timeout``. The Redis port accepts that for the pipelined
throughput rounds give; the WebSocket sessions do not use a coalescer (it
measured no gain for them, and it would couple browser sessions).

Cancellation. A round, once taken, runs to its end shielded (the engine
bounds it with ``request_timeout``): its leader's cancellation (a
connection closing) must not interrupt other connections' commands; it is
delivered afterwards. A waiter cancelled before its batch was taken
withdraws it (nothing of it runs); one cancelled while its batch runs
abandons its results (the commands may have run, as with any cancelled
request).

Results, errors and metrics. Each batch gets what its own
``execute_many`` would have given: one entry per call, its result or its
:class:`~kvmemo.errors.KVMemoError`; the engine counts every call of the
round once, as it counts a call of any batch (errors by kind, successes in
the command's latency histogram). Time is the round's: its single-key
part is bounded by ``request_timeout`` as a whole (as a batch's is), and
a coalesced call's latency is measured from the start of its round, so
both leave out the wait to join a round (one scheduler pass, or the rest
of a round already running, itself bounded). If the engine call itself
raises (a bug: the engine answers errors in results), nothing tells which
calls ran, so none is run again: the leader gets the exception and every
other batch of the round :class:`RoundFailedError`.

Ownership: one coalescer per Redis port, owned by its server state
(``resp_server._Server.coalescer``). It owns no task: rounds run in their
leader's task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs
import trio

from ..commands.table import COMMANDS, variants
from ..engine.engine import KVEngine

MAX_ROUND_CALLS = 4096  # commands per round; a round past it leaves the rest for the next

# The commands a coalesced batch may hold: those on exactly one key (and
# their CLIENT NO-TOUCH variants, by their variant names).
COALESCED: Final = frozenset(
    name
    for name, spec in (*COMMANDS.items(), *variants().items())
    if spec.first_key == spec.last_key == 1
)


class RoundFailedError(Exception):
    """The engine call of the round a batch ran in raised (a bug; its leader got the exception).

    Some of the batch's commands may have run, as with any failed call.
    """


@attrs.define(eq=False)
class _Batch:
    """One connection's commands, and their results once its round ran."""

    calls: Sequence[tuple[str, Sequence[bytes]]]
    done: trio.Event = attrs.Factory(trio.Event)
    lead: bool = False  # promoted: run the next round
    results: list[Any] | None = None
    failure: BaseException | None = None  # what its round's engine call raised


class Coalescer:
    """Runs the ``execute_many`` batches submitted in one scheduler pass as one.

    Invariant: ``_leading`` is True from the moment a task claims a round
    until that round's results (or failure) are handed out; when it is
    False and batches are waiting, the oldest one has been told to lead. A
    batch is in ``_waiting`` from its submission until a round takes it or
    its waiter withdraws it.
    """

    def __init__(self, engine: KVEngine, *, max_round_calls: int = MAX_ROUND_CALLS) -> None:
        self._engine = engine
        self._max = max_round_calls
        self._waiting: list[_Batch] = []
        self._leading = False
        self.rounds = 0  # rounds run (for tests and statistics)

    async def execute_many(self, calls: Sequence[tuple[str, Sequence[bytes]]]) -> list[Any]:
        """``engine.execute_many(calls)``, run in a round with other connections' batches.

        Raises:
            RoundFailedError: the engine call of the round raised, in another
                batch's task (which got the exception itself).
        """
        batch = _Batch(calls)
        self._waiting.append(batch)
        try:
            while batch.results is None:
                if batch.failure is not None:
                    raise RoundFailedError("the engine call of this round failed") from (
                        batch.failure
                    )
                if not self._leading:
                    await self._lead(batch)
                    continue
                await batch.done.wait()
                if batch.lead and batch.results is None and batch.failure is None:
                    batch.lead = False
                    batch.done = trio.Event()
        except BaseException:
            if batch in self._waiting:  # not taken: nothing of it runs
                self._waiting.remove(batch)
            self._promote()
            raise
        return batch.results

    async def _lead(self, own: _Batch) -> None:
        """Claim the next round, let the pass's batches join, run it, hand out results.

        The round takes the oldest batches waiting, up to ``max_round_calls``
        (at least one). That is ``own`` and those after it, unless batches
        promoted before it are still waiting: then ``own`` may not fit, and
        the round runs for them while ``own`` waits for the next one.

        Raises:
            BaseException: what the round's engine call raised (the round's
                other batches are told, and get :class:`RoundFailedError`).
        """
        self._leading = True
        try:
            await trio.lowlevel.checkpoint()  # the other connections of this pass submit
            taken: list[_Batch] = []
            size = 0
            while self._waiting and (not taken or size + len(self._waiting[0].calls) <= self._max):
                batch = self._waiting.pop(0)
                taken.append(batch)
                size += len(batch.calls)
            union = [call for batch in taken for call in batch.calls]
            with trio.CancelScope(shield=True):
                try:
                    results = await self._engine.execute_many(union)
                except BaseException as exc:
                    for batch in taken:
                        batch.failure = exc
                        batch.done.set()
                    raise
            self.rounds += 1
            start = 0
            for batch in taken:
                end = start + len(batch.calls)
                batch.results = results[start:end]
                start = end
                batch.done.set()
        finally:
            self._leading = False
            self._promote()

    def _promote(self) -> None:
        """If no round is claimed and batches wait, tell the oldest to lead."""
        if not self._leading and self._waiting:
            oldest = self._waiting[0]
            oldest.lead = True
            oldest.done.set()
