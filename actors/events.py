"""Lifecycle events of actors and supervisors, as a stream and as counters.

Every lifecycle change (started, crashed with what, restarted, state rebuilt,
gave up, stopped) is recorded here by the runtime. Readers never slow the
runtime down: a subscriber whose buffer is full loses events (counted in
``dropped``) instead of blocking the supervisor.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

HISTORY_SIZE = 10_000  # events kept for late readers; old ones fall off
SUBSCRIBER_BUFFER = 1_000  # events a slow subscriber may lag behind before losing some


class EventKind(enum.Enum):
    """What happened to an actor."""

    STARTED = "started"
    CRASHED = "crashed"
    RESTARTED = "restarted"
    STATE_REBUILT = "state_rebuilt"
    GAVE_UP = "gave_up"
    STOPPED = "stopped"


@attrs.frozen
class LifecycleEvent:
    """One lifecycle change.

    Attributes:
        time: ``trio.current_time()`` when it happened.
        actor: the actor's (or supervisor's) name.
        kind: what happened.
        error: the exception behind a crash or a give-up, else None.
    """

    time: float
    actor: str
    kind: EventKind
    error: BaseException | None = None


@attrs.define
class _Subscriber:
    send: trio.MemorySendChannel[LifecycleEvent]
    dropped: int = 0


@attrs.define
class EventLog:
    """The record of lifecycle events of one actor system.

    Invariant: ``counters[name][kind]`` equals the number of events of that
    kind ever emitted for that actor, whatever the history kept.
    """

    history: collections.deque[LifecycleEvent] = attrs.field(
        factory=lambda: collections.deque(maxlen=HISTORY_SIZE)
    )
    counters: dict[str, collections.Counter[EventKind]] = attrs.field(factory=dict)
    _subscribers: list[_Subscriber] = attrs.field(factory=list)

    def emit(self, actor: str, kind: EventKind, error: BaseException | None = None) -> None:
        """Record an event and hand it to every subscriber, never blocking."""
        event = LifecycleEvent(trio.current_time(), actor, kind, error)
        self.history.append(event)
        self.counters.setdefault(actor, collections.Counter())[kind] += 1
        for sub in self._subscribers:
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the subscriber is leaving; it wants no more events

    def count(self, actor: str, kind: EventKind) -> int:
        """How many events of ``kind`` happened to ``actor``."""
        return self.counters.get(actor, collections.Counter())[kind]

    @asynccontextmanager
    async def subscribe(
        self, capacity: int = SUBSCRIBER_BUFFER
    ) -> AsyncIterator[trio.MemoryReceiveChannel[LifecycleEvent]]:
        """Receive every event emitted while the context is open."""
        send, receive = trio.open_memory_channel[LifecycleEvent](capacity)
        sub = _Subscriber(send)
        self._subscribers.append(sub)
        try:
            yield receive
        finally:
            # Unsubscribe first, then close: emit never sees a closed channel.
            self._subscribers.remove(sub)
            send.close()
            receive.close()
