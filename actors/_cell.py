"""The runtime's record of one supervised child: mailbox, state, incarnations.

A cell belongs to its supervisor's child spec and lives as long as the actor
system: the mailbox and the state that outlives incarnations live here, so a
restart keeps every queued message and the state survives its task.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .actor import DEFER, Actor, ActorContext, ActorState
from .errors import ActorCrashed, ActorKilled, ActorStopped
from .events import EventKind
from .reply import ReplySlot
from .spec import ChildSpec, RestartType

if TYPE_CHECKING:
    from .system import ActorSystem

Envelope = tuple[Any, ReplySlot | None]
"""A queued message and, for an ask, the slot its reply goes to."""


class StopSignal:
    """Queued behind every pending message to stop one incarnation gracefully.

    It names its incarnation: a signal left queued after that incarnation
    ended some other way (a crash, the shutdown timeout) is skipped by the
    next one instead of stopping it.
    """

    __slots__ = ("incarnation",)

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation


def _unwrap(exc: Exception) -> Exception:
    """The error itself when a one-task nursery wrapped it in a group."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    return exc


class ExitReason(enum.Enum):
    """How an incarnation ended."""

    NORMAL = "normal"  # the actor stopped itself, or finished a graceful stop
    CRASHED = "crashed"  # an exception escaped
    KILLED = "killed"  # killed through the chaos API
    STOPPED = "stopped"  # cancelled by its supervisor (restart of a group or shutdown)


class ChildCell:
    """One supervised child: its mailbox, its lifecycle and its lasting state.

    Invariants: at most one incarnation runs at a time (``scope`` is set while
    it runs); ``current`` is the reply slot of the message being handled, so a
    crash can fail exactly that ask; a closed cell (``STOPPED``) has a closed
    mailbox and no queued message left.
    """

    def __init__(self, spec: ChildSpec, system: ActorSystem) -> None:
        self.spec = spec
        self.name = spec.name
        self.system = system
        self.capacity = spec.mailbox_capacity
        self.send: trio.MemorySendChannel[Envelope]
        self.receive: trio.MemoryReceiveChannel[Envelope]
        self.send, self.receive = trio.open_memory_channel[Envelope](self.capacity)
        self.state = ActorState.STARTING
        self.incarnation = 0
        self.restarts = 0
        self.failures = 0  # consecutive failures, for backoff
        self.last_start = 0.0
        self.restart_at: float | None = None
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()
        self.kill_requested = False
        self.stop_requested = False
        self.hard_stop = False  # stopped by its supervisor without a graceful stop
        self.ignore_exit_of = 0  # incarnation whose exit the supervisor caused itself
        self.fault: BaseException | None = None
        self.current: ReplySlot | None = None
        self.held: list[tuple[ReplySlot, Any, bool]] = []  # group commit: (slot, value, ok)
        self.handler_started = False
        self.heir_state: Any = None
        self._has_state = False
        # Monitors of the running incarnation: key -> (callback, argument),
        # each called once when it ends (see ActorRef.monitor).
        self.monitors: dict[int, tuple[Callable[[Any], None], Any]] = {}
        self._next_monitor = 0

    def monitor(self, callback: Callable[[Any], None], arg: Any) -> int:
        """Call ``callback(arg)`` once the running incarnation ends; a key for :meth:`demonitor`.

        Called at once (and 0 returned) when no incarnation is running.
        """
        if self.state is not ActorState.RUNNING:
            callback(arg)
            return 0
        self._next_monitor += 1
        self.monitors[self._next_monitor] = (callback, arg)
        return self._next_monitor

    def demonitor(self, key: int) -> None:
        """Forget a monitor (one that already fired, or key 0, is ignored)."""
        self.monitors.pop(key, None)

    @property
    def is_supervisor(self) -> bool:
        return self.spec.supervisor is not None

    @property
    def ending_hard(self) -> bool:
        """Whether the running incarnation is being ended without a graceful stop.

        A kill, or a stop with ``graceful=False`` (a restart of its group, its
        supervisor giving up). A supervisor ending so stops its own children
        the same way, as OTP's ``kill`` reaches them through their links: a
        killed storage supervisor must not make every shard write a final
        snapshot, one after the other, before any of them restarts.
        """
        return self.kill_requested or self.hard_stop

    def mailbox_depth(self) -> int:
        return self.receive.statistics().current_buffer_used

    def restart_wanted(self, reason: ExitReason) -> bool:
        """Whether the spec's restart type asks for a restart after ``reason``."""
        restart = self.spec.restart
        if restart is RestartType.PERMANENT:
            return True
        if restart is RestartType.TRANSIENT:
            return reason in (ExitReason.CRASHED, ExitReason.KILLED)
        return False

    # -- running one incarnation ------------------------------------------------

    async def run(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> tuple[ExitReason, BaseException | None]:
        """Run one incarnation to its end and say how it ended; never raises.

        Only the supervisor stops a child: the incarnation runs in a shielded
        scope that the supervisor (or a kill) cancels explicitly.
        """
        self.incarnation += 1
        self.last_start = trio.current_time()  # an attempt, successful or not (backoff)
        self.kill_requested = False
        self.stop_requested = False
        self.hard_stop = False
        self.done = trio.Event()
        reason = ExitReason.NORMAL
        error: BaseException | None = None
        started = False

        def report_started() -> None:
            nonlocal started
            started = True
            # Shielded from here on: only the supervisor (or a kill) stops a
            # running child. Not before: a start cancelled from outside must
            # be able to end the child, or the cancelled start would wait.
            scope.shield = True
            self.state = ActorState.RUNNING
            self.restart_at = None
            first = self.incarnation == 1
            self.system.events.emit(self.name, EventKind.STARTED if first else EventKind.RESTARTED)
            task_status.started()

        try:
            with trio.CancelScope() as scope:
                self.scope = scope
                try:
                    if self.spec.supervisor is not None:
                        await self.spec.supervisor.run_as_child(self, report_started)
                    else:
                        await self._run_actor(report_started)
                except Exception as exc:  # noqa: BLE001 - the supervisor classifies every exit
                    reason, error = ExitReason.CRASHED, _unwrap(exc)
            if scope.cancelled_caught:
                if self.kill_requested:
                    reason, error = ExitReason.KILLED, ActorKilled(f"{self.name} was killed")
                else:
                    reason = ExitReason.STOPPED
        finally:
            self.scope = None
            if self.state in (ActorState.RUNNING, ActorState.STARTING):
                self.state = ActorState.DOWN
            current = self.current
            cause = error if error is not None else ActorStopped(self.name)
            if current is not None:
                self.current = None
                current.fail(ActorCrashed(self.name, cause, handler_started=self.handler_started))
            held, self.held = self.held, []
            for slot, _, _ in held:  # handled, but never committed: may or may not last
                slot.fail(ActorCrashed(self.name, cause, handler_started=True))
            monitors, self.monitors = self.monitors, {}
            for callback, arg in monitors.values():
                callback(arg)
            if not started:
                task_status.started()
            self.done.set()
        return reason, error

    async def _run_actor(self, report_started: Any) -> None:
        assert self.spec.start is not None
        self._prepare_state()
        ctx = ActorContext(self.name, self.system, self.heir_state, self.incarnation, self)
        actor = self.spec.start(ctx)
        actor.ctx = ctx
        await actor.on_start()
        # A start cancelled meanwhile (the supervisor is shutting down) must
        # end here, before the child shields itself from outside cancellation.
        await trio.lowlevel.checkpoint_if_cancelled()
        report_started()
        if type(actor).background is Actor.background:
            graceful = await self._serve(actor)
        else:
            graceful = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(actor.background)
                graceful = await self._serve(actor)
                nursery.cancel_scope.cancel()
        if graceful:
            await actor.on_stop()

    def _prepare_state(self) -> None:
        hooks = self.spec.state
        if hooks is None:
            return
        if not self._has_state:
            self.heir_state = hooks.initial()
            self._has_state = True
            return
        try:
            trusted = bool(hooks.check(self.heir_state))
        except Exception:  # noqa: BLE001 - a failing check is a rejection, not a crash
            trusted = False
        if not trusted:
            self.heir_state = hooks.rebuild(self.heir_state)
            self.system.events.emit(self.name, EventKind.STATE_REBUILT)

    async def _serve(self, actor: Actor) -> bool:
        """The mailbox loop: handle messages in order, draining per wake-up.

        Returns True for a graceful stop (the stop signal was reached), False
        when the actor stopped itself.
        """
        if actor.group_commit:
            return await self._serve_group_commit(actor)
        receive = self.receive
        handle = actor.handle
        # The synchronous handler, when the actor has one (see Actor.handle_nowait).
        handle_nowait = (
            actor.handle_nowait if type(actor).handle_nowait is not Actor.handle_nowait else None
        )
        expected = actor.expected_errors
        # Hot loop: per message, one attribute write (``current``, the slot a
        # crash must fail; a slot left there after its reply is ignored by a
        # late fail) and two reads (``fault``, ``stop_requested``).
        self.handler_started = True
        while True:
            message, reply = await receive.receive()
            while True:
                if type(message) is StopSignal:
                    if message.incarnation == self.incarnation:
                        return True
                    try:  # a stale signal of an earlier incarnation: skip it
                        message, reply = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    continue
                self.current = reply
                if self.fault is not None:
                    fault, self.fault = self.fault, None
                    self.handler_started = False  # the message had no effect
                    raise fault
                try:
                    if handle_nowait is None:
                        result = await handle(message)
                    else:
                        result = handle_nowait(message)
                        if result is DEFER:
                            result = await handle(message)
                except expected as exc:
                    if reply is not None:
                        reply.fail(exc)
                else:
                    if reply is not None:
                        reply.set(result)
                if self.stop_requested:
                    return False
                try:
                    message, reply = receive.receive_nowait()
                except trio.WouldBlock:
                    break

    async def _serve_group_commit(self, actor: Actor) -> bool:
        """The mailbox loop of a ``group_commit`` actor.

        Same order and drain as :meth:`_serve`, but the replies of one
        drained batch are held until ``actor.commit()`` has made the batch
        durable; then they are delivered together (or failed together).
        """
        receive = self.receive
        handle = actor.handle
        handle_nowait = (
            actor.handle_nowait if type(actor).handle_nowait is not Actor.handle_nowait else None
        )
        expected = actor.expected_errors
        held = self.held
        commit_nowait = (
            actor.commit_nowait if type(actor).commit_nowait is not Actor.commit_nowait else None
        )
        # As in _serve, ``current`` stays on the last slot handled: a crash
        # fails it as started (it is held, handled), then the held slots.
        self.handler_started = True
        while True:
            message, reply = await receive.receive()
            graceful: bool | None = None
            while True:
                if type(message) is StopSignal:
                    if message.incarnation == self.incarnation:
                        graceful = True
                        break
                else:
                    self.current = reply
                    fault = self.fault
                    if fault is not None:
                        self.fault = None
                        self.handler_started = False  # the message had no effect
                        raise fault
                    try:
                        if handle_nowait is None:
                            result = await handle(message)
                        else:
                            result = handle_nowait(message)
                            if result is DEFER:
                                result = await handle(message)
                    except expected as exc:
                        if reply is not None:
                            held.append((reply, exc, False))
                    else:
                        if reply is not None:
                            held.append((reply, result, True))
                    if self.stop_requested:
                        graceful = False
                        break
                try:
                    message, reply = receive.receive_nowait()
                except trio.WouldBlock:
                    break
            error = DEFER if commit_nowait is None else commit_nowait()
            if error is DEFER:
                error = await actor.commit()
            batch = held[:]
            held.clear()
            for slot, value, ok in batch:
                if not ok:
                    slot.fail(value)
                elif error is not None:
                    slot.fail(error)
                else:
                    slot.set(value)
            if graceful is not None:
                return graceful

    # -- control from the supervisor and the chaos API ----------------------------

    def kill(self) -> bool:
        """Kill the running incarnation now; False if it is not running."""
        if self.scope is None:
            return False
        self.kill_requested = True
        self.scope.cancel()
        return True

    async def stop(self, *, graceful: bool) -> None:
        """Stop the running incarnation (if any) and wait until it has ended.

        A graceful stop lets an actor handle what is already queued and run
        ``on_stop``, within ``shutdown_timeout``; then it is cancelled.
        """
        scope = self.scope
        if scope is None:
            return
        self.ignore_exit_of = self.incarnation
        if not graceful:
            self.hard_stop = True
        if graceful and not self.is_supervisor:
            scope.deadline = min(scope.deadline, trio.current_time() + self.spec.shutdown_timeout)
            try:
                self.send.send_nowait((StopSignal(self.incarnation), None))
            except (trio.WouldBlock, trio.ClosedResourceError):
                scope.cancel()
        else:
            scope.cancel()
        await self.done.wait()

    def close(self) -> None:
        """Stop for good: close the mailbox and fail every queued ask."""
        self.state = ActorState.STOPPED
        self.restart_at = None
        if self.spec.supervisor is not None:
            self.spec.supervisor.close()
        self.send.close()
        while True:
            try:
                _, reply = self.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if reply is not None:
                reply.fail(ActorStopped(self.name))

    def reopen(self) -> None:
        """Give a closed cell a fresh mailbox before its supervisor runs again."""
        if self.state is ActorState.STOPPED:
            self.send, self.receive = trio.open_memory_channel[Envelope](self.capacity)
            self.state = ActorState.STARTING
