"""Actors, their references and their context.

An actor is a trio task with a mailbox. It owns its state; nothing outside
touches it; the only way in is a message through an :class:`ActorRef`.

- ``tell`` queues a message and does not wait for a result.
- ``ask`` queues a message and waits for the reply, which travels back
  through a one-shot :class:`~actors.reply.ReplySlot` (no task, no channel).

The runtime calls :meth:`Actor.handle` for one message at a time, in mailbox
order, and drains every queued message per wake-up, so per-message scheduling
cost is paid once per batch. An actor whose messages mostly need no ``await``
also defines :meth:`Actor.handle_nowait`, a plain call the runtime tries first
(no coroutine per message); it answers :data:`DEFER` for the others.
A ``group_commit`` actor's replies of one batch wait for :meth:`Actor.commit`
(e.g. a log written once for the batch); :meth:`Actor.commit_nowait` is its
plain-call form, tried first in the same way.
A handler that raises one of the actor's ``expected_errors`` answers its
asker with that error and the actor lives on; any other exception is a
crash: the asker of that message gets
:class:`~actors.errors.ActorCrashed` at once and the supervisor decides what
happens next. Messages queued behind it stay in the mailbox, which belongs to
the supervisor's child spec, for the next incarnation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import trio

from .errors import ActorStopped, AskTimeout, MailboxFull
from .reply import ReplySlot

if TYPE_CHECKING:
    from ._cell import ChildCell
    from .system import ActorSystem


class _Defer:
    """The type of :data:`DEFER` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFER"


DEFER: Any = _Defer()
"""Returned by :meth:`Actor.handle_nowait`: "this message needs :meth:`Actor.handle`"."""


class ActorState(enum.Enum):
    """Where an actor is in its lifecycle."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # down, a restart is scheduled
    DOWN = "down"  # not running, no restart scheduled (its supervisor stopped or gave up)
    STOPPED = "stopped"  # for good: its mailbox is closed


@attrs.frozen
class ActorInfo:
    """A snapshot of one actor, for observability and chaos tests."""

    name: str
    state: ActorState
    restarts: int
    mailbox: int
    supervisor: bool = False


class Actor:
    """Base class of every actor: override :meth:`handle`.

    Subclasses may also override :meth:`on_start` (runs before the actor is
    reported started; supervisors start children in order, so a later sibling
    can rely on an earlier one being ready), :meth:`on_stop` (runs on a graceful
    stop) and :meth:`background` (a loop run beside the mailbox for this
    incarnation, e.g. a timer; its crash is the actor's crash).

    ``self.ctx`` is set by the runtime before :meth:`on_start`.
    """

    expected_errors: ClassVar[tuple[type[Exception], ...]] = ()
    """Errors that are an answer, not a crash: raised by ``handle`` they go to the asker."""

    group_commit: ClassVar[bool] = False
    """When True, replies of each drained batch are held until :meth:`commit` returns
    (e.g. a write-ahead log synced once for the whole batch)."""

    ctx: ActorContext

    async def on_start(self) -> None:
        """Prepare the incarnation; an exception here is a crash."""

    async def on_stop(self) -> None:
        """Clean up on a graceful stop (not on a crash or a kill)."""

    async def handle(self, message: Any) -> Any:
        """Handle one message and return the reply (ignored for ``tell``)."""
        raise NotImplementedError

    def handle_nowait(self, message: Any) -> Any:
        """Optionally handle ``message`` synchronously; :data:`DEFER` if it cannot.

        The fast path: most messages of a typical actor need no ``await``, and
        a plain call costs less than creating and running a coroutine. When
        a subclass overrides this method, the runtime calls it first for
        every message and awaits :meth:`handle` only for those it answers
        with :data:`DEFER`. Both must agree: the reply and the effect of a
        message must not depend on which of the two ran it, and a subclass
        that overrides :meth:`handle` must override this too (or both go
        through :meth:`handle` by returning :data:`DEFER`). Errors work as in
        :meth:`handle`; a ``group_commit`` actor's replies are held for
        :meth:`commit` whichever of the two produced them.
        """
        return DEFER

    async def background(self) -> None:
        """Optional concurrent loop of this incarnation; by default none runs."""

    def commit_nowait(self) -> Any:
        """Optionally :meth:`commit` synchronously; :data:`DEFER` if it cannot.

        As :meth:`handle_nowait` is to :meth:`handle`: when a subclass
        overrides it, the runtime calls it first after each batch and awaits
        :meth:`commit` only when it answers :data:`DEFER`. Both must agree.
        """
        return DEFER

    async def commit(self) -> BaseException | None:
        """Make the batch just handled durable (``group_commit`` actors only).

        Returns:
            None to deliver the batch's replies; an exception to fail every
            successful reply of the batch with it instead (the actor lives on).
        """
        return None


@attrs.define
class ActorContext:
    """What the runtime gives an actor incarnation.

    Attributes:
        name: the actor's registered name.
        system: the actor system, for looking up peers.
        state: the state that outlives incarnations (None when the child spec
            keeps none); already checked, or rebuilt, before ``on_start``.
        incarnation: 1 for the first start, +1 per restart.
    """

    name: str
    system: ActorSystem
    state: Any
    incarnation: int
    _cell: ChildCell

    @property
    def self_ref(self) -> ActorRef:
        """A reference to this actor."""
        return ActorRef(self._cell)

    def stop(self) -> None:
        """Stop normally once the current message is handled.

        A transient child that stops this way is not restarted.
        """
        self._cell.stop_requested = True


class ActorRef:
    """The only handle on an actor that the rest of the program gets.

    A reference stays valid across restarts: it points at the mailbox, which
    belongs to the child spec, not at an incarnation.
    """

    __slots__ = ("_cell",)

    def __init__(self, cell: ChildCell) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        """The actor's registered name."""
        return self._cell.name

    @property
    def state(self) -> ActorState:
        """The actor's current lifecycle state."""
        return self._cell.state

    @property
    def mailbox_depth(self) -> int:
        """Messages queued and not yet taken by the actor."""
        return self._cell.mailbox_depth()

    def restart_eta(self) -> float | None:
        """``trio.current_time()`` at which a pending restart is due, else None."""
        return self._cell.restart_at

    def monitor(self, callback: Callable[[Any], None], arg: Any = None) -> int:
        """Call ``callback(arg)`` once the running incarnation ends, as Erlang's monitor.

        It ends by a crash, a kill or a stop; the callback runs synchronously
        in the actor's cell as the incarnation is torn down (after the reply
        of the message being handled was failed), and must not raise. If no
        incarnation is running, it is called at once. For a caller waiting
        on the actor's progress that must not wait for a restart (messages
        queued in the mailbox are kept for the next incarnation).

        Returns:
            A key for :meth:`demonitor` (0 when the callback already ran).
        """
        return self._cell.monitor(callback, arg)

    def demonitor(self, key: int) -> None:
        """Forget a monitor; a key that fired already (or 0) is ignored."""
        self._cell.demonitor(key)

    def tell_nowait(self, message: Any) -> None:
        """Queue ``message`` without waiting.

        Raises:
            MailboxFull: the bounded mailbox is full; nothing was queued.
            ActorStopped: the actor is stopped for good.
        """
        try:
            self._cell.send.send_nowait((message, None))
        except trio.WouldBlock:
            raise MailboxFull(self._cell.name, self._cell.capacity) from None
        except trio.ClosedResourceError:
            raise ActorStopped(self._cell.name) from None

    async def tell(self, message: Any) -> None:
        """Queue ``message``, waiting for room in the mailbox (backpressure).

        Raises:
            ActorStopped: the actor is stopped for good.
        """
        try:
            await self._cell.send.send((message, None))
        except trio.ClosedResourceError:
            raise ActorStopped(self._cell.name) from None

    def ask_nowait(self, message: Any, slot: ReplySlot | None = None) -> ReplySlot:
        """Queue ``message`` and return the slot its reply will arrive in.

        For fanning one request out to several actors without a task each:
        queue to all, then ``await slot.wait()`` on each.

        Raises:
            MailboxFull: the mailbox is full; nothing was queued.
            ActorStopped: the actor is stopped for good.
        """
        if slot is None:
            slot = ReplySlot()
        try:
            self._cell.send.send_nowait((message, slot))
        except trio.WouldBlock:
            raise MailboxFull(self._cell.name, self._cell.capacity) from None
        except trio.ClosedResourceError:
            raise ActorStopped(self._cell.name) from None
        return slot

    async def ask_start(self, message: Any, slot: ReplySlot | None = None) -> ReplySlot:
        """Like :meth:`ask_nowait`, but wait for room in a full mailbox."""
        if slot is None:
            slot = ReplySlot()
        try:
            await self._cell.send.send((message, slot))
        except trio.ClosedResourceError:
            raise ActorStopped(self._cell.name) from None
        return slot

    async def ask(self, message: Any, *, timeout: float | None = None) -> Any:
        """Send ``message`` and wait for its reply.

        Args:
            message: the message (a frozen attrs object by convention).
            timeout: seconds to wait for room in the mailbox and for the reply;
                None waits as long as the actor lives.

        Returns:
            What the actor's handler returned.

        Raises:
            ActorCrashed: the actor crashed or was killed handling this message.
            ActorStopped: the actor is (or became) stopped for good.
            AskTimeout: no reply in time; the message may still take effect.
            Exception: an error of the actor's ``expected_errors``.
        """
        slot = ReplySlot()
        cell = self._cell
        try:
            cell.send.send_nowait((message, slot))
        except trio.WouldBlock:
            pass
        except trio.ClosedResourceError:
            raise ActorStopped(cell.name) from None
        else:
            # Fast path: park on the slot directly, as ``slot.wait()`` would
            # (see ReplySlot's parking protocol), without its coroutine frame
            # on every suspend and resume. The slot was just queued and nothing
            # checkpointed since, so no reply can be there yet.
            slot._task = _current_task()
            if timeout is None:
                return await _wait_task_rescheduled(slot._abort)
            # Register the deadline as Deadlines.add would, inlined: into a
            # FIFO that is not empty, a deadline lands behind its head and
            # never needs to wake the sweeper (see actors.deadlines).
            try:
                pending, now, offset = cell.system.deadlines._fifos[timeout]
            except KeyError:
                pending = cell.system.deadlines.add(slot, timeout, cell.name)
            else:
                if pending:
                    pending[slot] = (now() + offset + timeout, cell.name)
                else:
                    pending = cell.system.deadlines.add(slot, timeout, cell.name)
            try:
                return await _wait_task_rescheduled(slot._abort)
            finally:
                pending.pop(slot, None)
        # Slow path: the mailbox is full, wait for room under the same deadline.
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            try:
                await cell.send.send((message, slot))
            except trio.ClosedResourceError:
                raise ActorStopped(cell.name) from None
            return await slot.wait()
        raise AskTimeout(cell.name, timeout if timeout is not None else float("inf"))

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.name} {self._cell.state.value}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other._cell is self._cell

    def __hash__(self) -> int:
        return id(self._cell)


_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
