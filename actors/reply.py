"""A one-shot reply slot: the cheapest way back from an actor to its asker.

Design: an ask must not cost a task or a channel. The asker parks its own task
with ``wait_task_rescheduled``; the actor, when it has the answer, reschedules
that task with the outcome. Setting the slot never blocks and never
checkpoints, so an actor can answer a whole drained batch synchronously.

Invariant: a slot is completed at most once; later ``set``/``fail`` calls are
ignored. A waiter cancelled before the reply abandons the slot; the actor's
later reply is dropped, which leaves both sides consistent.
"""

from __future__ import annotations

from typing import Any

import outcome
import trio


class ReplySlot:
    """One reply, delivered once, to at most one waiting task.

    State: ``_ok`` is None until completed, then True (``_value`` is the
    reply) or False (``_value`` is the error). ``_task`` is the parked waiter,
    if any; it is cleared when rescheduled or when its wait is aborted.
    """

    __slots__ = ("_ok", "_task", "_value")

    def __init__(self) -> None:
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
                _reschedule(task, outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        """Deliver ``error`` to be raised in the waiter; ignored if already completed."""
        if self._ok is None:
            self._ok = False
            self._value = error
            task = self._task
            if task is not None:
                self._task = None
                _reschedule(task, outcome.Error(error))

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

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await _wait_task_rescheduled(abort)


_reschedule = trio.lowlevel.reschedule
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
