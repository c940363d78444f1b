"""Publish/subscribe: channels, patterns, shard channels, and a bounded outbox per subscriber.

Design. A message published on a channel goes to every subscriber of that
channel and of every pattern matching it at the moment of the publish, as in
Redis: fire and forget, nothing is kept for later subscribers, and pub/sub is
apart from the keyspace (no shard takes part, and a database flush does not
touch it). *Shard channels* (Redis 7's sharded pub/sub: SSUBSCRIBE,
SPUBLISH) are a namespace of their own beside the channels: a message
published there reaches the subscribers of that shard channel only (no
ordinary subscriber of the same name, no pattern), as on one Redis Cluster
node. KVMemo is one node, so every shard channel is on it: channels of any
hash slots may be mixed in one subscriber, as Redis allows outside cluster
mode. :meth:`PubSubHub.publish` is synchronous: it appends the message
to each receiver's outbox and wakes the receiver; the front end that owns a
:class:`Subscriber` (a Redis connection, a WebSocket session, an embedded
subscriber) takes the messages out and writes them in its own task. A slow
receiver therefore never slows a publisher or the other receivers.

Limits. A subscriber's outbox holds at most ``limit`` bytes (each message
counts its channel, pattern and payload bytes plus :data:`MESSAGE_OVERHEAD`),
together with what its owner took out and has not delivered yet, counted as
the owner encodes it (:meth:`Subscriber.hold`: a WebSocket session holds a
taken batch as JSON text until its socket took it). A publish that would
pass it *overflows* the subscriber instead: its queued
messages are dropped, it leaves every channel and pattern at once, and its
owner ends it (the Redis port and the WebSocket server close the
connection, as Redis closes a client past ``client-output-buffer-limit
pubsub``; the embedded subscriber raises :class:`~kvmemo.errors.OverloadedError`).
Nothing else is affected: the publisher's count includes it, as Redis's does.
A subscriber has at most ``max_subscriptions`` channels, patterns and shard
channels together (about 400 bytes each); a subscribe past it is refused whole
(:class:`~kvmemo.errors.TooLargeError`), changing nothing.

Order. Messages published on one channel reach each of its subscribers in
publish order (the outbox is FIFO and the publish synchronous). A subscriber
of a channel and of a pattern matching it gets the message twice, once as
``message`` and once as ``pmessage``, as in Redis.

Ownership. The engine owns the hub (``KVEngine.pubsub``); no task, no I/O.
A subscriber belongs to the front end that made it (:meth:`PubSubHub.subscriber`),
which must :meth:`~Subscriber.close` it when its client goes (a subscriber
its owner closed is in no channel and its outbox is empty).

End. When the store closes, the engine closes the hub (:meth:`PubSubHub.close`):
every subscriber still open leaves its channels and is ended, so a task
waiting for its next message gets what was queued, then ``EndOfChannel``,
instead of waiting forever; a new subscriber is refused (UNAVAILABLE).

Invariants: ``hub._channels[c]`` holds exactly the open subscribers whose
``channels`` contain ``c``, and no entry is empty (likewise for patterns,
and ``hub._matchers`` has exactly the keys of ``hub._patterns``); a
subscriber's ``_bytes`` is the sum of its queued messages' sizes, and
``_bytes + _held`` never exceeds its limit; its ``count`` never exceeds the
hub's ``max_subscriptions``; its ``_ready`` event is set whenever it has
queued messages or is ended (closed or overflowed). The same holds for
``hub._shard_channels`` and the subscribers' ``shard_channels``, and its
``total`` never exceeds the hub's ``max_subscriptions``.
"""

from __future__ import annotations

import enum
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

import attrs
import trio

from ..commands.glob import compile_glob, glob_match
from ..errors import OverloadedError, TooLargeError, UnavailableError

MESSAGE_OVERHEAD = 64  # bytes counted per queued message besides its byte strings
DEFAULT_LIMIT = 32 * 1024 * 1024  # bytes: Redis's hard client-output-buffer-limit for pubsub
DEFAULT_MAX_SUBSCRIPTIONS = 100_000  # channels, patterns and shard channels per subscriber


class _Kind(enum.Enum):
    """What a subscription names: a channel, a glob pattern, or a shard channel."""

    CHANNEL = "channel"
    PATTERN = "pattern"
    SHARD = "shard"


CHANNEL: Final = _Kind.CHANNEL
PATTERN: Final = _Kind.PATTERN
SHARD: Final = _Kind.SHARD


@attrs.frozen
class Message:
    """One published message as a subscriber receives it.

    ``pattern`` is the pattern that matched (a ``pmessage``), or None when
    the subscriber is subscribed to ``channel`` itself (a ``message``).
    """

    channel: bytes
    data: bytes
    pattern: bytes | None = None
    shard: bool = False  # published on a shard channel (SPUBLISH): an ``smessage``

    @property
    def kind(self) -> str:
        """``"message"``, ``"pmessage"`` or ``"smessage"``, Redis's name for the delivery."""
        if self.shard:
            return "smessage"
        return "message" if self.pattern is None else "pmessage"


class Subscriber:
    """One receiver's subscriptions and outbox (see the module docstring).

    Made by :meth:`PubSubHub.subscriber`; owned by one front end, which
    reads its messages from one task at a time.
    """

    def __init__(
        self, hub: PubSubHub, limit: int, on_end: Callable[[], None] | None = None
    ) -> None:
        self._hub = hub
        self.limit = limit
        self._on_end = on_end  # called (synchronously, once) when the hub ends it: overflow
        self.channels: dict[bytes, None] = {}  # in subscription order
        self.patterns: dict[bytes, None] = {}
        self.shard_channels: dict[bytes, None] = {}
        self._queue: deque[tuple[Message, int]] = deque()
        self._bytes = 0
        self._held = 0  # taken by the owner, not yet delivered (see hold)
        # Messages ever queued and ever taken (dropped ones count as taken):
        # an owner's mark, to take only those queued before some moment.
        self.delivered = 0
        self.taken = 0
        self._ready = trio.Event()
        self.overflowed = False
        self.closed = False

    @property
    def count(self) -> int:
        """Channels plus patterns subscribed: Redis's subscription count, the one
        (P)(UN)SUBSCRIBE confirmations give (shard channels not counted)."""
        return len(self.channels) + len(self.patterns)

    @property
    def shard_count(self) -> int:
        """Shard channels subscribed: the count S(UN)SUBSCRIBE confirmations give."""
        return len(self.shard_channels)

    @property
    def total(self) -> int:
        """Every subscription of any kind: what ``max_subscriptions`` bounds, and
        whether the subscriber is subscribed at all (Redis's subscribed mode)."""
        return len(self.channels) + len(self.patterns) + len(self.shard_channels)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the messages queued and not yet taken."""
        return self._bytes

    @property
    def ended(self) -> bool:
        """Closed by its owner or overflowed: it receives nothing more."""
        return self.closed or self.overflowed

    # -- subscriptions (Redis's replies: one count per name) -----------------------------

    def subscribe(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """Subscribe to each channel (again is a no-op); (channel, count after it) for each."""
        return self._hub._add(self, channels, CHANNEL)

    def psubscribe(self, patterns: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """Subscribe to each glob pattern (Redis's KEYS syntax); (pattern, count) for each."""
        return self._hub._add(self, patterns, PATTERN)

    def ssubscribe(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """Subscribe to each shard channel; (channel, shard channels after it) for each."""
        return self._hub._add(self, channels, SHARD)

    def unsubscribe(self, channels: Iterable[bytes] = ()) -> list[tuple[bytes | None, int]]:
        """Leave each channel, or every channel when none is named; (channel, count) for each.

        With no channel named and none subscribed: ``[(None, count)]``, as
        Redis answers ``unsubscribe``, nil, count.
        """
        return self._hub._remove(self, channels, CHANNEL)

    def punsubscribe(self, patterns: Iterable[bytes] = ()) -> list[tuple[bytes | None, int]]:
        """:meth:`unsubscribe` for patterns."""
        return self._hub._remove(self, patterns, PATTERN)

    def sunsubscribe(self, channels: Iterable[bytes] = ()) -> list[tuple[bytes | None, int]]:
        """:meth:`unsubscribe` for shard channels; the counts are of shard channels."""
        return self._hub._remove(self, channels, SHARD)

    def change(self, kind: str, names: Iterable[bytes]) -> list[tuple[bytes | None, int]]:
        """The (un)subscribe method named ``kind`` (``"psubscribe"``, ...), for a front end
        that dispatches on a command's name.

        Raises:
            ValueError: ``kind`` is not one of the six.
        """
        if kind == "subscribe":
            return list(self.subscribe(names))
        if kind == "psubscribe":
            return list(self.psubscribe(names))
        if kind == "ssubscribe":
            return list(self.ssubscribe(names))
        if kind == "unsubscribe":
            return self.unsubscribe(names)
        if kind == "punsubscribe":
            return self.punsubscribe(names)
        if kind == "sunsubscribe":
            return self.sunsubscribe(names)
        raise ValueError(f"not a subscription command: {kind!r}")

    # -- the outbox ------------------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        size = MESSAGE_OVERHEAD + len(message.channel) + len(message.data)
        if message.pattern is not None:
            size += len(message.pattern)
        if self._bytes + self._held + size > self.limit:
            self._hub._overflow(self)
            return
        self._queue.append((message, size))
        self._bytes += size
        self.delivered += 1
        self._ready.set()

    def hold(self, nbytes: int) -> bool:
        """Count ``nbytes`` the owner took out and has not delivered yet against the limit.

        Returns False, and overflows the subscriber, when they do not fit
        beside what is queued: the owner then ends it as for any overflow.
        The owner gives them back with :meth:`release` once delivered.
        """
        if self.ended:
            return False
        if self._bytes + self._held + nbytes > self.limit:
            self._hub._overflow(self)
            return False
        self._held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """Give back bytes counted by :meth:`hold`: the owner delivered them."""
        self._held = max(0, self._held - nbytes)

    def take(self) -> list[Message]:
        """Every queued message, oldest first (none: an empty list); never waits.

        Raises:
            OverloadedError: the subscriber overflowed its limit (it is ended).
        """
        if self.overflowed:
            raise self._overflow_error()
        taken = [message for message, _ in self._queue]
        self._queue.clear()
        self._bytes = 0
        self.taken = self.delivered
        if not self.closed and self._ready.is_set():
            self._ready = trio.Event()  # a task waiting on an unset one keeps waiting on it
        return taken

    async def wait(self) -> None:
        """Wait until a message is queued or the subscriber is ended."""
        if not self._queue and not self.ended:
            await self._ready.wait()

    async def get(self) -> Message:
        """The next message, waiting for one.

        Raises:
            OverloadedError: the subscriber overflowed its limit.
            trio.EndOfChannel: the subscriber is closed and nothing is queued.
        """
        while True:
            try:
                return self.get_nowait()
            except trio.WouldBlock:
                await self._ready.wait()

    def get_nowait(self) -> Message:
        """The next message, if one is queued.

        Raises:
            trio.WouldBlock: nothing is queued (and the subscriber is open).
            OverloadedError: the subscriber overflowed its limit.
            trio.EndOfChannel: the subscriber is closed and nothing is queued.
        """
        if self.overflowed:
            raise self._overflow_error()
        if self._queue:
            message, size = self._queue.popleft()
            self._bytes -= size
            self.taken += 1
            if not self._queue and not self.closed and self._ready.is_set():
                self._ready = trio.Event()
            return message
        if self.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def close(self) -> None:
        """Leave every channel and pattern and drop the outbox (idempotent)."""
        if not self.closed:
            self._hub._drop(self)
            self._hub._open.discard(self)
            self.closed = True
        self._queue.clear()  # also what the hub's close left readable
        self._bytes = 0
        self.taken = self.delivered
        self._ready.set()

    def _overflow_error(self) -> OverloadedError:
        return OverloadedError(
            f"pub/sub output buffer limit reached ({self.limit} bytes): "
            "the subscriber was ended; messages were lost"
        )


class PubSubHub:
    """Channels and patterns of one store, and who listens to them.

    Args:
        limit: default outbox limit in bytes of the subscribers it makes.

    Raises:
        ValueError: ``limit`` < 1.
    """

    def __init__(
        self, limit: int = DEFAULT_LIMIT, max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS
    ) -> None:
        if limit < 1:
            raise ValueError(f"pubsub_buffer_limit must be >= 1, got {limit}")
        if max_subscriptions < 1:
            raise ValueError(f"pubsub_max_subscriptions must be >= 1, got {max_subscriptions}")
        self.limit = limit
        self.max_subscriptions = max_subscriptions
        self._channels: dict[bytes, dict[Subscriber, None]] = {}
        self._patterns: dict[bytes, dict[Subscriber, None]] = {}
        self._shard_channels: dict[bytes, dict[Subscriber, None]] = {}
        # Each pattern's matcher, compiled once while it has a subscriber
        # (glob_match's shared cache would thrash past a few hundred patterns).
        self._matchers: dict[bytes, Callable[[bytes], bool]] = {}
        self.messages_published = 0
        self.overflows = 0
        # Every subscriber made and not yet closed, for close(); weakly, so
        # one its owner dropped without closing it is not kept alive here.
        self._open: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self.closed = False

    def subscriber(
        self, limit: int | None = None, on_end: Callable[[], None] | None = None
    ) -> Subscriber:
        """A new subscriber with no subscriptions; its owner must close it.

        ``on_end``: called once, synchronously and inside the publish that
        overflowed it, when the hub ends the subscriber; it must not raise
        or block (set an event, cancel a scope). A task waiting in
        :meth:`Subscriber.wait` is woken anyway; this is for an owner that
        waits on something else (its socket) meanwhile.

        Raises:
            UnavailableError: the hub is closed (the store is).
        """
        if self.closed:
            raise UnavailableError("the store is closed")
        subscriber = Subscriber(self, self.limit if limit is None else limit, on_end)
        self._open.add(subscriber)
        return subscriber

    def close(self) -> None:
        """End every open subscriber and refuse new ones: the store is closing (idempotent).

        Each leaves its channels and patterns and is marked closed; what it
        had queued stays readable, then :meth:`Subscriber.get` raises
        ``EndOfChannel`` and :meth:`Subscriber.wait` returns, so no task
        waits forever on a store that is gone. ``on_end`` is not called: it
        reports an overflow, and nothing was lost.
        """
        self.closed = True
        for subscriber in list(self._open):
            if not subscriber.ended:
                self._drop(subscriber)
                subscriber.closed = True
                subscriber._ready.set()
        self._open.clear()

    def publish(self, channel: bytes, data: bytes) -> int:
        """Deliver ``data`` on ``channel``; the number of receivers (Redis's PUBLISH reply)."""
        self.messages_published += 1
        receivers = 0
        subscribers = self._channels.get(channel)
        if subscribers:
            message = Message(channel, data)
            targets = list(subscribers)  # one may overflow (and leave) during the loop
            for subscriber in targets:
                subscriber._deliver(message)
            receivers += len(targets)
        if self._patterns:
            matchers = self._matchers
            for pattern, matching in list(self._patterns.items()):
                if matchers[pattern](channel):
                    message = Message(channel, data, pattern)
                    targets = list(matching)
                    for subscriber in targets:
                        subscriber._deliver(message)
                    receivers += len(targets)
        return receivers

    def spublish(self, channel: bytes, data: bytes) -> int:
        """Deliver ``data`` on shard channel ``channel`` (an ``smessage``) to its subscribers
        alone; how many (Redis's SPUBLISH reply). Patterns and ordinary channels of the
        same name do not receive it."""
        self.messages_published += 1
        subscribers = self._shard_channels.get(channel)
        if not subscribers:
            return 0
        message = Message(channel, data, shard=True)
        targets = list(subscribers)  # one may overflow (and leave) during the loop
        for subscriber in targets:
            subscriber._deliver(message)
        return len(targets)

    def channels(self, pattern: bytes | None = None) -> list[bytes]:
        """Active channels (one subscriber at least), those matching ``pattern`` if given."""
        if pattern is None:
            return list(self._channels)
        return [c for c in self._channels if glob_match(pattern, c)]

    def numsub(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """(channel, subscribers of the channel itself) for each: PUBSUB NUMSUB."""
        return [(c, len(self._channels.get(c, ()))) for c in channels]

    def numpat(self) -> int:
        """Patterns with a subscriber: PUBSUB NUMPAT."""
        return len(self._patterns)

    def shardchannels(self, pattern: bytes | None = None) -> list[bytes]:
        """Active shard channels, those matching ``pattern`` if given: PUBSUB SHARDCHANNELS."""
        if pattern is None:
            return list(self._shard_channels)
        return [c for c in self._shard_channels if glob_match(pattern, c)]

    def shardnumsub(self, channels: Iterable[bytes]) -> list[tuple[bytes, int]]:
        """(shard channel, its subscribers) for each: PUBSUB SHARDNUMSUB."""
        return [(c, len(self._shard_channels.get(c, ()))) for c in channels]

    def stats(self) -> dict[str, int]:
        """Figures for ``info``: active channels and patterns, totals since the start."""
        return {
            "pubsub_channels": len(self._channels),
            "pubsub_patterns": len(self._patterns),
            "pubsubshard_channels": len(self._shard_channels),  # Redis's INFO name
            "pubsub_messages_published": self.messages_published,
            "pubsub_overflows": self.overflows,
        }

    # -- the subscribers' side ----------------------------------------------------------------

    def _tables(
        self, subscriber: Subscriber, kind: _Kind
    ) -> tuple[dict[bytes, dict[Subscriber, None]], dict[bytes, None]]:
        """The hub's table of ``kind`` and the subscriber's own names of that kind."""
        if kind is PATTERN:
            return self._patterns, subscriber.patterns
        if kind is SHARD:
            return self._shard_channels, subscriber.shard_channels
        return self._channels, subscriber.channels

    @staticmethod
    def _reply_count(subscriber: Subscriber, kind: _Kind) -> int:
        """The count a confirmation of ``kind`` gives, as Redis 7.0 counts: shard
        channels apart, channels and patterns together."""
        return subscriber.shard_count if kind is SHARD else subscriber.count

    def _add(
        self, subscriber: Subscriber, names: Iterable[bytes], kind: _Kind
    ) -> list[tuple[bytes, int]]:
        table, own = self._tables(subscriber, kind)
        names = list(names)
        new = {name for name in names if name not in own}
        if subscriber.total + len(new) > self.max_subscriptions and not subscriber.ended:
            raise TooLargeError(
                f"subscribing to {len(new)} more would pass pubsub_max_subscriptions"
                f" ({self.max_subscriptions}); the subscriber has {subscriber.total}"
            )
        replies = []
        for name in names:
            if not subscriber.ended and name not in own:
                own[name] = None
                members = table.get(name)
                if members is None:
                    members = table[name] = {}
                    if kind is PATTERN:
                        self._matchers[name] = compile_glob(name)
                members[subscriber] = None
            replies.append((name, self._reply_count(subscriber, kind)))
        return replies

    def _remove(
        self, subscriber: Subscriber, names: Iterable[bytes], kind: _Kind
    ) -> list[tuple[bytes | None, int]]:
        table, own = self._tables(subscriber, kind)
        chosen = list(names) or list(own)
        replies: list[tuple[bytes | None, int]] = []
        for name in chosen:
            if own.pop(name, 0) is None:
                self._leave(table, name, subscriber)
            replies.append((name, self._reply_count(subscriber, kind)))
        if not replies:
            replies.append((None, self._reply_count(subscriber, kind)))
        return replies

    def _leave(
        self, table: dict[bytes, dict[Subscriber, None]], name: bytes, sub: Subscriber
    ) -> None:
        members = table.get(name)
        if members is not None:
            members.pop(sub, None)
            if not members:
                del table[name]
                if table is self._patterns:
                    del self._matchers[name]

    def _drop(self, subscriber: Subscriber) -> None:
        for name in subscriber.channels:
            self._leave(self._channels, name, subscriber)
        for name in subscriber.patterns:
            self._leave(self._patterns, name, subscriber)
        for name in subscriber.shard_channels:
            self._leave(self._shard_channels, name, subscriber)
        subscriber.channels.clear()
        subscriber.patterns.clear()
        subscriber.shard_channels.clear()

    def _overflow(self, subscriber: Subscriber) -> None:
        self.overflows += 1
        self._drop(subscriber)
        subscriber.overflowed = True
        subscriber._queue.clear()
        subscriber._bytes = 0
        subscriber.taken = subscriber.delivered
        subscriber._ready.set()
        if subscriber._on_end is not None:
            subscriber._on_end()
