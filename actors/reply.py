"""A one-shot reply slot: the cheapest way back from an actor to its asker.

Design: an ask must not cost a task or a channel. The asker parks its own task
with ``wait_task_rescheduled``; the actor, when it has the answer, reschedules
that task with the outcome. Setting the slot never blocks and never
checkpoints, so an actor can answer a whole drained batch synchronously.

The slot is its own outcome: it is an :class:`outcome.Outcome` (what
``reschedule`` takes and ``wait_task_rescheduled`` unwraps), so
:meth:`ReplySlot.set` and :meth:`ReplySlot.fail` reschedule the waiter with
the slot itself, whose ``unwrap`` is :meth:`ReplySlot.result`. That saves an
``outcome.Value`` (or ``outcome.Error``) per reply, a measurable share of a
round trip. Unlike ``outcome.Value``, the slot may be unwrapped more than once.

Invariant: a slot is completed at most once; later ``set``/``fail`` calls are
ignored. A waiter cancelled before the reply abandons the slot; the actor's
later reply is dropped, which leaves both sides consistent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import outcome
import trio


class ReplySlot(outcome.Outcome[Any]):
    """One reply, delivered once, to at most one waiting task.

    State: ``_ok`` is None until completed, then True (``_value`` is the
    reply) or False (``_value`` is the error). ``_task`` is the parked waiter,
    if any; it is cleared when rescheduled or when its wait is aborted.

    Parking protocol (what :meth:`wait` does, and what ``ActorRef.ask`` does
    inline for a slot it has just created): set ``_task`` to the current task,
    then ``await trio.lowlevel.wait_task_rescheduled(slot._abort)`` with no
    checkpoint in between.
    """

    __slots__ = ("_ok", "_task", "_value")

    # Identity semantics (Outcome's attrs base compares by contents and is
    # unhashable): slots are dict keys of the ask deadlines.
    __eq__ = object.__eq__
    __hash__ = object.__hash__  # type: ignore[assignment]  # Outcome declares None

    def __init__(self) -> None:
        self._unwrapped = False  # outcome.Outcome's own flag (unused: see unwrap)
        self._ok: bool | None = None
        self._task: trio.lowlevel.Task | None = None
        self._value: Any = None

    @property
    def done(self) -> bool:
        """Whether a value or an error has been delivered."""
        return self._ok is not None

    def set(self, value: Any) -> None:
        """Deliver ``value``; ignored if the slot is already completed."""
        if self._ok is None:
            self._ok = True
            self._value = value
            task = self._task
            if task is not None:
                self._task = None
                _reschedule(task, self)  # the slot is the outcome: see the module docstring

    def fail(self, error: BaseException) -> None:
        """Deliver ``error`` to be raised in the waiter; ignored if already completed."""
        if self._ok is None:
            self._ok = False
            self._value = error
            task = self._task
            if task is not None:
                self._task = None
                _reschedule(task, self)

    def result(self) -> Any:
        """The delivered value (or raise the delivered error); only once ``done``.

        May be called any number of times, before or after :meth:`wait`.
        """
        ok = self._ok
        if ok:
            return self._value
        if ok is None:
            raise RuntimeError("no reply yet")
        raise self._value

    def unwrap(self) -> Any:
        """:meth:`result`: how the rescheduled waiter gets its reply (the outcome protocol)."""
        return self.result()

    def send(self, gen: Generator[Any, Any, object]) -> Any:
        """Send the reply into ``gen`` (or throw the error), as an outcome does."""
        if self._ok:
            return gen.send(self._value)
        return gen.throw(self.result_error())

    async def asend(self, agen: AsyncGenerator[Any, Any]) -> Any:
        """Send the reply into ``agen`` (or throw the error), as an outcome does."""
        if self._ok:
            return await agen.asend(self._value)
        return await agen.athrow(self.result_error())

    def result_error(self) -> BaseException:
        """The delivered error (only once failed)."""
        if self._ok is not False:
            raise RuntimeError("no error was delivered")
        error: BaseException = self._value
        return error

    async def wait(self) -> Any:
        """Wait for the reply and return it (or raise the delivered error).

        Cancellation while waiting abandons the slot and is always safe.
        """
        if self._ok is not None:
            await trio.lowlevel.checkpoint()
            return self.result()
        if self._task is not None:
            raise RuntimeError("a reply slot can have only one waiter")
        self._task = trio.lowlevel.current_task()
        return await _wait_task_rescheduled(self._abort)

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """The abort callback of the parked waiter: forget it, so a later reply is dropped.

        A bound method, not a closure made per wait: it costs less.
        """
        self._task = None
        return _SUCCEEDED


_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_reschedule = trio.lowlevel.reschedule
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
