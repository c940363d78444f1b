"""OTP-style supervisors: a nursery that restarts failed children.

Design: a supervisor starts its children in order, each in its own task of
the supervisor's nursery, each shielded so that only the supervisor (or a
kill) stops it. Every exit comes back to the supervisor's control loop, which
classifies it (normal, crashed, killed) and applies, in this order:

1. the child's restart type (permanent, transient, temporary);
2. restart intensity: more than ``max_restarts`` restarts within ``period``
   seconds and the supervisor gives up: it stops every child (reverse order)
   and fails with :class:`~actors.errors.SupervisorGaveUp`, which its parent
   sees as the supervisor's own crash;
3. the strategy: ``one_for_one`` restarts the child alone, after its backoff,
   in a task of its own so other children's failures are handled meanwhile;
   ``one_for_all`` and ``rest_for_one`` stop the affected children in reverse
   order, wait the backoff, and start them again in order.

Shutdown (the owner cancels the scope around :meth:`Supervisor.run`) stops the
children in reverse start order, each gracefully within its
``shutdown_timeout``. A root supervisor then closes every mailbox, failing the
asks still queued, so no caller is left hanging. A nested supervisor that is
killed, or stopped hard by its parent (a group restart, the parent giving
up), stops its children hard, as one that gives up does: as OTP's ``kill``
reaches the children through their links, not as a shutdown.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from ._cell import ChildCell, ExitReason
from .actor import ActorState
from .errors import SupervisorGaveUp
from .events import EventKind
from .spec import Backoff, ChildSpec, Intensity, Strategy
from .system import ActorSystem

_Exit = tuple[ChildCell, int, ExitReason, BaseException | None]


@attrs.define(eq=False)
class Supervisor:
    """A supervisor of an ordered list of children.

    Attributes:
        name: unique in the actor system (a supervisor is a child too).
        children: the child specs, in start order.
        strategy: which children a failure restarts.
        intensity: when the supervisor gives up.
        backoff: delay before each restart.
        rng: randomness for the backoff jitter (seed it in tests).
    """

    name: str
    children: Sequence[ChildSpec]
    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: Intensity = attrs.field(factory=Intensity)
    backoff: Backoff = attrs.field(factory=Backoff)
    rng: random.Random = attrs.field(factory=random.Random)
    system: ActorSystem | None = attrs.field(default=None, init=False)
    _cells: list[ChildCell] = attrs.field(factory=list, init=False)
    _restart_times: collections.deque[float] = attrs.field(factory=collections.deque, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _exits: trio.MemorySendChannel[_Exit] | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    # The cell this supervisor runs as, when nested (None for a root).
    _own_cell: ChildCell | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        names = [spec.name for spec in self.children]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate child names in {self.name!r}: {', '.join(duplicates)}")

    @property
    def cells(self) -> Sequence[ChildCell]:
        """The children's cells, in start order (empty before the first run)."""
        return self._cells

    # -- running ------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ActorSystem] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run as the root of a new actor system until cancelled or given up.

        ``task_status.started`` reports the :class:`ActorSystem` once every
        child has started, in order. On exit every mailbox is closed.

        Raises:
            SupervisorGaveUp: restart intensity was exceeded.
        """
        system = ActorSystem(self)
        self._attach(system)
        gave_up: SupervisorGaveUp | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(system.deadlines.run)
                try:
                    await self._run(lambda: task_status.started(system))
                except SupervisorGaveUp as exc:
                    gave_up = exc  # raised below, not wrapped in the nursery's group
                nursery.cancel_scope.cancel()
        finally:
            self.close()
        if gave_up is not None:
            raise gave_up

    async def run_as_child(self, cell: ChildCell, report_started: Callable[[], None]) -> None:
        """Run as the child ``cell`` of a parent supervisor (a nested supervisor)."""
        self._attach(cell.system)
        self._own_cell = cell
        await self._run(report_started)

    def _attach(self, system: ActorSystem) -> None:
        if self.system is None:
            # Check every name before taking any: a clash must fail every
            # run, not only the first (a half-registered tree would run
            # actors no reference can reach).
            system.check_new_names([spec.name for spec in self.children])
            self._cells = [ChildCell(spec, system) for spec in self.children]
            for cell in self._cells:
                system.register(cell)
            self.system = system
        elif self.system is not system:
            raise RuntimeError(f"supervisor {self.name!r} already belongs to another actor system")
        for cell in self._cells:
            cell.reopen()

    async def _run(self, report_started: Callable[[], None]) -> None:
        assert self.system is not None
        self._closing = False
        self._restart_times.clear()
        # Unbounded on purpose: every exit is of an incarnation this supervisor
        # started itself, so the queue is bounded by its own restarts (which
        # the intensity limit bounds); a full channel here would kill it.
        send, receive = trio.open_memory_channel[_Exit](math.inf)
        self._exits = send
        gave_up: SupervisorGaveUp | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for cell in self._cells:
                    await nursery.start(self._child_task, cell)
                await trio.lowlevel.checkpoint_if_cancelled()
                report_started()
                gave_up = await self._control_loop(nursery, receive)
            finally:
                self._closing = True
                # Graceful only for a shutdown: given up, killed or stopped
                # hard itself, this supervisor stops its children hard.
                own = self._own_cell
                graceful = gave_up is None and not (own is not None and own.ending_hard)
                with trio.CancelScope(shield=True):
                    for cell in reversed(self._cells):
                        if cell.scope is not None:
                            await cell.stop(graceful=graceful)
                            self.system.events.emit(cell.name, EventKind.STOPPED)
                nursery.cancel_scope.cancel()
        if gave_up is not None:
            self.system.events.emit(self.name, EventKind.GAVE_UP, gave_up)
            raise gave_up

    async def _child_task(self, cell: ChildCell, *, task_status: trio.TaskStatus[None]) -> None:
        incarnation = cell.incarnation + 1
        reason, error = await cell.run(task_status)
        if not self._closing and self._exits is not None:
            self._exits.send_nowait((cell, incarnation, reason, error))

    async def _control_loop(
        self, nursery: trio.Nursery, exits: trio.MemoryReceiveChannel[_Exit]
    ) -> SupervisorGaveUp | None:
        assert self.system is not None
        events = self.system.events
        async for cell, incarnation, reason, error in exits:
            if incarnation != cell.incarnation or incarnation == cell.ignore_exit_of:
                continue  # a stale exit, or one this supervisor caused itself
            if reason is ExitReason.NORMAL:
                events.emit(cell.name, EventKind.STOPPED)
            else:
                events.emit(cell.name, EventKind.CRASHED, error)
            if not cell.restart_wanted(reason):
                cell.close()
                continue
            now = trio.current_time()
            self._restart_times.append(now)
            while self._restart_times and self._restart_times[0] < now - self.intensity.period:
                self._restart_times.popleft()
            if len(self._restart_times) > self.intensity.max_restarts:
                gave_up = SupervisorGaveUp(
                    self.name, cell.name, self.intensity.max_restarts, self.intensity.period
                )
                gave_up.__cause__ = error  # the last failure, for whoever reads the escalation
                return gave_up
            if now - cell.last_start >= self.backoff.reset_after:
                cell.failures = 0
            cell.failures += 1
            delay = self.backoff.delay(cell.failures, self.rng)
            if self.strategy is Strategy.ONE_FOR_ONE:
                group = [cell]
            elif self.strategy is Strategy.ONE_FOR_ALL:
                group = list(self._cells)
            else:
                group = self._cells[self._cells.index(cell) :]
            for member in reversed(group):
                if member is not cell:
                    await member.stop(graceful=False)
            for member in group:
                if member.state is not ActorState.STOPPED:
                    member.state = ActorState.RESTARTING
                    member.restart_at = now + delay
            if self.strategy is Strategy.ONE_FOR_ONE:
                nursery.start_soon(self._restart, group, delay)
            else:
                await self._restart(group, delay)
        return None

    async def _restart(self, group: list[ChildCell], delay: float) -> None:
        await trio.sleep(delay)
        for cell in group:
            if self._closing:
                return
            if cell.state is ActorState.STOPPED:
                continue
            cell.restarts += 1
            await self._start_in(cell)

    async def _start_in(self, cell: ChildCell) -> None:
        # Started from the control loop or a restart task, but owned by the
        # supervisor's nursery: the child outlives the task that started it.
        assert self._nursery is not None
        await self._nursery.start(self._child_task, cell)

    # -- ending for good -------------------------------------------------------------

    def close(self) -> None:
        """Close every child's mailbox for good (the supervisor will not run again)."""
        for cell in self._cells:
            if cell.state is not ActorState.STOPPED:
                cell.close()

    def info(self) -> dict[str, Any]:
        """A JSON-ready description of the supervisor and its children."""
        return {
            "name": self.name,
            "strategy": self.strategy.value,
            "children": [
                {"name": c.name, "state": c.state.value, "restarts": c.restarts}
                for c in self._cells
            ],
        }
