"""Errors of the actor runtime.

They say whose fault a failure is: the caller's (:class:`MailboxFull`,
:class:`AskTimeout`), the target's (:class:`ActorCrashed`), or the lifecycle's
(:class:`ActorStopped`, :class:`SupervisorGaveUp`).
"""

from __future__ import annotations


class ActorError(Exception):
    """Base class of every error the actor runtime raises to its callers."""


class ActorCrashed(ActorError):
    """The actor crashed (or was killed) while handling this very message.

    Attributes:
        actor: the name of the actor.
        cause: the exception that ended the incarnation (:class:`ActorKilled`
            for a kill, :class:`InjectedFault` for a chaos fault).
        handler_started: ``False`` when the message's handler never ran (an
            injected fault fires before it), so the message had no effect.
    """

    def __init__(self, actor: str, cause: BaseException, *, handler_started: bool) -> None:
        super().__init__(f"actor {actor!r} crashed handling the message: {cause!r}")
        self.actor = actor
        self.cause = cause
        self.handler_started = handler_started


class ActorStopped(ActorError):
    """The actor is stopped for good: its mailbox takes no more messages."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor!r} is stopped")
        self.actor = actor


class MailboxFull(ActorError):
    """``tell_nowait`` found the bounded mailbox full; the message was not queued."""

    def __init__(self, actor: str, capacity: int) -> None:
        super().__init__(f"mailbox of actor {actor!r} is full ({capacity} messages)")
        self.actor = actor
        self.capacity = capacity


class AskTimeout(ActorError):
    """No reply came within the ask's timeout.

    The message may still be handled later (it stays queued): the caller can
    not tell whether it took effect.
    """

    def __init__(self, actor: str, timeout: float) -> None:
        super().__init__(f"actor {actor!r} did not reply within {timeout} s")
        self.actor = actor
        self.timeout = timeout


class UnknownActor(ActorError, LookupError):
    """No actor of that name is registered in the system."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"no actor named {actor!r}")
        self.actor = actor


class SupervisorGaveUp(ActorError):
    """Restart intensity was exceeded: the supervisor stopped its children and failed.

    Its parent sees this as the supervisor's own crash (escalation).
    """

    def __init__(self, supervisor: str, child: str, restarts: int, period: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: more than {restarts} restarts"
            f" within {period} s (last failing child {child!r})"
        )
        self.supervisor = supervisor
        self.child = child
        self.restarts = restarts
        self.period = period


class ActorKilled(Exception):
    """The cause recorded when an actor was killed through the chaos API."""


class InjectedFault(Exception):
    """The default fault raised by ``inject_fault`` before an actor's next message."""
