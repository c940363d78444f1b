"""The embedded store: KVMemo inside a trio application, no server needed.

::

    async with kvmemo.open_store(shards=16, maxmemory="64MiB") as kv:
        await kv.set("user:1", "alice", ex=60)
        assert await kv.get("user:1") == b"alice"

``open_store`` starts the engine's supervision tree (shards, ttl-manager,
eviction-manager) in a nursery it owns and stops it on exit: every actor
ends with the block. ``serve(nursery, ...)`` is the form for callers that
own their nursery.
"""

from __future__ import annotations

import difflib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import attrs
import trio

from actors import ActorSystem, SupervisorGaveUp

from .api import Arg, Commands, encode_arg, encode_args
from .config import StoreConfig
from .engine.engine import KVEngine
from .engine.pubsub import Message, Subscriber
from .settings import SETTINGS


class Store(Commands):
    """A running embedded store: one async method per command.

    Errors raise subclasses of :class:`kvmemo.KVMemoError` whose ``kind`` is
    the protocol's error kind.

    A store belongs to the trio run that opened it: called from another
    (a second ``trio.run``, another thread, asyncio), it raises
    ``RuntimeError`` and changes nothing; once closed, it refuses every call
    as closed (``UnavailableError``), from any run.

    Every async method is a trio checkpoint, as trio's own primitives are:
    called in a cancelled scope it raises ``trio.Cancelled`` and does
    nothing; it always lets other tasks run (a loop of ``publish`` does not
    starve a subscriber). A call cancelled while it waits may or may not
    have been applied, as any request whose answer never came.

    A store of :func:`serve` is an async context manager (trio's
    ``AsyncResource``): ``async with await kvmemo.serve(nursery) as kv:``
    ends with :meth:`aclose`.
    """

    def __init__(
        self,
        engine: KVEngine,
        system: ActorSystem,
        scope: trio.CancelScope,
        stopped: trio.Event | None = None,
    ) -> None:
        self.engine = engine
        self.system = system
        self._scope = scope
        # Set once the tree has stopped and the engine released what it held.
        self._stopped = stopped if stopped is not None else trio.Event()

    async def execute(self, command: str, *args: Arg) -> Any:
        return await self.engine.execute(command, encode_args(args))

    # get and set are plain functions that return the engine's coroutine:
    # ``await kv.get(k)`` then runs one coroutine frame fewer on every call
    # and every resume (a tenth of a single-key call's overhead over a bare
    # trio ask). Awaited, they behave as the ``async def`` methods they
    # override; an argument of the wrong type raises TypeError at the call.

    def get(self, key: Arg) -> Coroutine[Any, Any, bytes | None]:
        """GET: the value of ``key``, or None if it is missing (or expired).

        (Through the engine's fast path: no command-table parse.)
        """
        return self.engine.get(key if key.__class__ is bytes else encode_arg(key))

    def set(
        self,
        key: Arg,
        value: Arg,
        *,
        ex: int | None = None,
        px: int | None = None,
        exat: int | None = None,
        pxat: int | None = None,
        keepttl: bool = False,
        nx: bool = False,
        xx: bool = False,
        get: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """SET ``key`` to ``value``: "OK", or None when ``nx``/``xx`` is not met.

        With ``get``: the old value (or None) instead of "OK". The key's TTL is
        dropped unless ``keepttl``; ``ex``/``px``/``exat``/``pxat`` set a new
        one (at most one of them). Without options the call takes the
        engine's fast path (no command-table parse).

        Raises:
            CommandSyntaxError: options that conflict, or an expiry <= 0.
            OutOfMemoryError: over ``maxmemory`` and nothing could be evicted.
        """
        if ex is px is exat is pxat is None and not (keepttl or nx or xx or get):
            return self.engine.set(
                key if key.__class__ is bytes else encode_arg(key),
                value if value.__class__ is bytes else encode_arg(value),
            )
        return super().set(
            key, value, ex=ex, px=px, exat=exat, pxat=pxat, keepttl=keepttl, nx=nx, xx=xx, get=get
        )

    async def execute_many(self, *calls: tuple[Arg, ...]) -> list[Any]:
        """Run several commands grouped per shard; errors are returned, not raised."""
        return await self.engine.execute_many([_call(c) for c in calls])

    async def transaction(self, *calls: tuple[Arg, ...]) -> list[Any]:
        """Run commands as one atomic step, as MULTI/EXEC does: a result for each.

        No other command runs between them, and nobody sees some of their
        effects without the others. A command that fails gives its error (a
        :class:`kvmemo.KVMemoError`) in its place and the others still run,
        as in Redis; RENAME, RENAMENX, COPY and MSETNX need their keys on
        one shard (a ``{hash tag}``). ::

            await kv.transaction(("INCR", "visits"), ("EXPIRE", "visits", 60))

        Raises:
            KVMemoError: the transaction was refused as a whole, as Redis's
                EXECABORT, and nothing ran: an unknown command, a wrong number
                of arguments, a command a transaction may not hold
                (``data["index"]`` names it); or it failed as a whole
                (``UNAVAILABLE``, ``OOM``, ``TIMEOUT``: nothing ran, or maybe).
        """
        self.engine.check_run()  # before _checked: its parse touches the engine
        results = await self.engine.execute_transaction(_checked(self.engine, calls))
        assert results is not None  # only watches abort a transaction
        return results

    @asynccontextmanager
    async def watch(self, *keys: Arg) -> AsyncIterator[Watch]:
        """Watch ``keys`` for an optimistic transaction (Redis's WATCH), until the block ends.

        ::

            async with kv.watch("balance") as w:
                balance = int(await kv.get("balance") or 0)
                done = await w.transaction(("SET", "balance", balance - 10))
            if done is None: ...  # "balance" changed meanwhile: nothing ran; retry

        As Redis's EXEC, the block's first transaction ends the watch,
        whatever its outcome: a second one in the same block runs unwatched.
        """
        watch = Watch(self.engine, await self.engine.watch(encode_args(keys)))
        try:
            yield watch
        finally:
            watch._end()  # synchronous: safe when cancelled

    @asynccontextmanager
    async def subscribe(
        self, *channels: Arg, patterns: Sequence[Arg] = ()
    ) -> AsyncIterator[Subscription]:
        """Receive what is published on ``channels`` and on channels matching ``patterns``.

        ::

            async with kv.subscribe("news", patterns=["chat:*"]) as sub:
                async for message in sub:
                    print(message.channel, message.data)

        Subscriptions end with the block. Messages wait in the subscription
        (up to ``pubsub_buffer_limit`` bytes; past it the subscription ends
        and iterating raises ``OverloadedError``, as Redis drops a subscriber
        that does not keep up).
        """
        self.engine.check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        subscription = Subscription(self.engine.pubsub.subscriber(), self.engine.check_run)
        try:
            if channels:
                await subscription.subscribe(*channels)
            if patterns:
                await subscription.psubscribe(*patterns)
            if not (channels or patterns):
                await trio.lowlevel.cancel_shielded_checkpoint()
            yield subscription
        finally:
            subscription.close()  # synchronous: safe when cancelled

    def actors(self) -> list[dict[str, Any]]:
        """Every actor: name, state, restarts, mailbox depth (for chaos tests)."""
        return self.engine.actors()

    def kill_actor(self, name: str) -> bool:
        """Kill an actor by name; False if it was down.

        Its supervisor restarts it, except the ``eviction`` supervisor itself,
        a temporary child: killed, it stays down, and the store runs without
        eviction (writes past ``maxmemory`` get ``OOM``), as when it gives up.
        """
        return self.engine.kill_actor(name)

    def close(self) -> None:
        """Stop the store: its actors end, then every call is refused as closed.

        Only the store stops: the code that called it (an ``open_store``
        block included) carries on, and ``serve``'s nursery no longer waits
        for the store. Closing a closed store does nothing. It returns before
        the actors have stopped: :meth:`aclose` waits for that (and for the
        data directory to be released).

        Raises:
            RuntimeError: called from another trio run than the store's
                (it stays open).
        """
        if self.engine.closed:
            return
        self.engine.check_run()
        self.engine.stop_accepting()
        self._scope.cancel()

    async def aclose(self) -> None:
        """Stop the store and wait until it has stopped: every actor has ended and
        the data directory is released (a new store may open it at once).

        :meth:`close`, then the wait. Closing a closed store only waits (if
        it is still stopping); it may be called in ``open_store``'s block
        too. Cancelled while it waits, the store still stops (as trio's
        ``aclose`` does, forcefully), without the wait.

        Raises:
            RuntimeError: called from another trio run than the store's
                (it stays open).
        """
        self.close()
        await self._stopped.wait()  # a checkpoint, set or not

    async def __aenter__(self) -> Store:
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Subscription:
    """One embedded subscriber (see :meth:`Store.subscribe`): its channels and messages.

    Iterate it, or call :meth:`get`, from one task at a time. The
    (un)subscribe methods answer Redis's subscription count after the
    change; they are coroutines so that the same code runs against the
    WebSocket client.
    """

    def __init__(self, subscriber: Subscriber, check_run: Callable[[], None]) -> None:
        self._subscriber = subscriber
        # The store's KVEngine.check_run: its hub wakes tasks of the store's run only.
        self._check_run = check_run

    @property
    def channels(self) -> list[bytes]:
        """The channels subscribed, in subscription order."""
        return list(self._subscriber.channels)

    @property
    def patterns(self) -> list[bytes]:
        """The patterns subscribed, in subscription order."""
        return list(self._subscriber.patterns)

    # Each method is a checkpoint, as trio's primitives are: a cancellation
    # check first (cancelled: nothing changes), the change (synchronous), then
    # a schedule point that cannot be cancelled (the change is not lost).

    async def subscribe(self, *channels: Arg) -> int:
        """Subscribe to more channels; the subscription count after it."""
        self._check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        count = self._last(self._subscriber.subscribe(encode_args(channels)))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def psubscribe(self, *patterns: Arg) -> int:
        """Subscribe to more glob patterns (KEYS syntax); the subscription count after it."""
        self._check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        count = self._last(self._subscriber.psubscribe(encode_args(patterns)))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def unsubscribe(self, *channels: Arg) -> int:
        """Leave ``channels`` (every channel if none named); the subscription count after it."""
        self._check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        count = self._last(self._subscriber.unsubscribe(encode_args(channels)))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def punsubscribe(self, *patterns: Arg) -> int:
        """Leave ``patterns`` (every pattern if none named); the subscription count after it."""
        self._check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        count = self._last(self._subscriber.punsubscribe(encode_args(patterns)))
        await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    def _last(self, replies: Sequence[tuple[bytes | None, int]]) -> int:
        return replies[-1][1] if replies else self._subscriber.count

    async def get(self) -> Message:
        """The next message, waiting for one.

        A checkpoint, as trio's ``MemoryReceiveChannel.receive``: in a
        cancelled scope it raises ``trio.Cancelled`` and the message waiting
        stays for the next call.

        Raises:
            OverloadedError: messages came faster than they were taken, past
                ``pubsub_buffer_limit``: the subscription ended.
            trio.EndOfChannel: the subscription's block has ended.
            RuntimeError: called from another trio run than the store's.
        """
        self._check_run()
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            message = self._subscriber.get_nowait()
        except trio.WouldBlock:
            return await self._subscriber.get()  # waits: a checkpoint
        await trio.lowlevel.cancel_shielded_checkpoint()
        return message

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """End every subscription (the block's end does it)."""
        self._subscriber.close()


class Watch:
    """The keys one :meth:`Store.watch` block watches; its transactions check them."""

    def __init__(self, engine: KVEngine, watches: list[tuple[int, bytes, int]]) -> None:
        self._engine = engine
        self._watches = watches
        self._ended = False  # the block has ended

    async def transaction(self, *calls: tuple[Arg, ...]) -> list[Any] | None:
        """:meth:`Store.transaction`, unless a watched key was written since the block began.

        The first transaction ends the watch, whatever its outcome (as
        Redis's EXEC unwatches every key): a second one in the same block
        runs unwatched, and gives results.

        Returns:
            A result for each command, or None: a watched key changed (a
            write, a delete, an expiry, an eviction) and nothing ran.

        Raises:
            RuntimeError: the watch's block has ended (its keys are no longer
                watched: None could never be told from a conflict), or the
                call comes from another trio run.
        """
        if self._ended:
            raise RuntimeError("this watch's block has ended")
        self._engine.check_run()  # before _checked: its parse touches the engine
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: the keys stay watched
        watches = self._watches
        try:
            return await self._engine.execute_transaction(_checked(self._engine, calls), watches)
        finally:
            if watches:
                # As EXEC, run or refused (EXECABORT): the keys are unwatched.
                self._watches = []
                self._engine.unwatch(watches)

    def _end(self) -> None:
        """The block ended: unwatch what is still watched; transactions now refuse."""
        self._ended = True
        watches, self._watches = self._watches, []
        self._engine.unwatch(watches)


def _checked(
    engine: KVEngine, calls: tuple[tuple[Arg, ...], ...]
) -> list[tuple[str, Sequence[bytes]]]:
    """The calls as the engine takes them, each checked as a queued command is.

    Raises:
        KVMemoError: a call refuses the whole transaction (``data["index"]``).
    """
    out = [_call(c) for c in calls]
    engine.check_transaction(out)
    return out


def _call(call: tuple[Arg, ...]) -> tuple[str, Sequence[bytes]]:
    """One call of a batch or a transaction as the engine takes it: (name, arguments).

    A ``bytes`` name is decoded (as the WebSocket client decodes it), not
    ``repr``'d; an empty call names no command, so it gets the error of an
    unknown one (``UNKNOWN_METHOD``) rather than an ``IndexError``.
    """
    if not call:
        return "", ()
    name = call[0]
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace"), encode_args(call[1:])
    return str(name), encode_args(call[1:])


def _config(config: StoreConfig | None, settings: dict[str, Any]) -> StoreConfig:
    """The store's configuration: ``config``, or one made of ``settings``.

    Raises:
        TypeError: both were given (the settings would be ignored), or an
            unknown setting.
        ValueError: an invalid setting (the message names it).
    """
    if config is None:
        known = attrs.fields_dict(StoreConfig)
        for name in settings:
            if name not in known:
                # A flag's name (dir for data_dir), else the closest field's.
                flag = {x.name: x.field for x in SETTINGS if x.target == "store"}.get(name)
                close = [flag] if flag else difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"unknown store setting {name!r}{hint}")
        return StoreConfig(**settings)
    if settings:
        raise TypeError(
            f"give a StoreConfig or settings, not both (got config and {', '.join(settings)})"
        )
    return config


async def serve(nursery: trio.Nursery, config: StoreConfig | None = None, **settings: Any) -> Store:
    """Start a store in ``nursery`` and return it once every actor is running.

    Settings are :class:`StoreConfig` fields (``shards=4``, ``maxmemory="64MiB"``).
    ``store.close()`` (or cancelling the nursery) stops it. A store whose
    root supervisor gives up fails the nursery with
    :class:`actors.SupervisorGaveUp` (see :func:`open_store`).
    """
    cfg = _config(config, settings)
    engine = KVEngine(cfg)

    async def run(*, task_status: trio.TaskStatus[Store]) -> None:
        await engine.prepare()  # recovery from disk, when persistence is on
        await _run_tree(engine, task_status=task_status)

    store: Store = await nursery.start(run)
    return store


async def _run_tree(engine: KVEngine, *, task_status: trio.TaskStatus[Store]) -> None:
    """Run the engine's supervision tree until it stops; started with its store.

    The tree runs in a nursery of its own, whose scope is the store's
    :meth:`Store.close`: closing the store stops its actors and nothing
    else (an ``open_store`` block that calls it carries on, and its calls
    are refused as closed).
    """
    stopped = trio.Event()
    try:
        async with trio.open_nursery() as inner:
            system: ActorSystem = await inner.start(engine.supervisor().run)
            engine.attach(system)
            task_status.started(Store(engine, system, inner.cancel_scope, stopped))
    except BaseExceptionGroup as group:
        # The root supervisor gave up (restart intensity exceeded): the
        # store failed, and says so as itself, not in a group of one.
        gave_up = _gave_up(group)
        if gave_up is None:
            raise
        raise gave_up from gave_up.__cause__
    finally:
        engine.close()  # the logs, once the tree has stopped
        stopped.set()  # Store.aclose returns


def _gave_up(group: BaseExceptionGroup) -> SupervisorGaveUp | None:
    """The root supervisor's give-up, when it is what ``group`` holds (besides ``Cancelled``)."""
    gave_up, rest = group.split(SupervisorGaveUp)
    if gave_up is None or (rest is not None and rest.split(trio.Cancelled)[1] is not None):
        return None
    leaves: list[BaseException] = []
    todo: list[BaseException] = [gave_up]
    while todo:
        exc = todo.pop()
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) != 1 or not isinstance(leaves[0], SupervisorGaveUp):
        return None
    return leaves[0]


@asynccontextmanager
async def open_store(config: StoreConfig | None = None, **settings: Any) -> AsyncIterator[Store]:
    """Run an embedded store for the duration of the block.

    An exception raised by the block reaches the caller unchanged (not
    wrapped in an ``ExceptionGroup``): a ``KeyboardInterrupt``, or the
    ``Cancelled`` of an enclosing scope, too.

    A store whose root supervisor gives up (its restart intensity,
    ``max_restarts`` within ``restart_period``, exceeded: actors killed or
    crashing faster than that) fails: the block is cancelled, as trio cancels
    a nursery's body when one of its tasks fails, the store closes (acknowledged
    writes stay on disk, the data directory is released) and the block ends
    with :class:`actors.SupervisorGaveUp`, unwrapped, whose ``__cause__`` is
    the last failure; unless the block raised an error of its own meanwhile
    (a ``KeyboardInterrupt``, an error of its cleanup): that error comes out,
    unchanged but for a note naming the store's failure.

    Raises:
        ValueError: invalid settings (exact message naming the setting).
        TypeError: an unknown setting, or ``config`` and settings both given.
    """
    cfg = _config(config, settings)
    error: BaseException | None = None
    engine = KVEngine(cfg)
    await engine.prepare()  # recovery from disk, when persistence is on
    try:
        async with trio.open_nursery() as nursery:
            store: Store = await nursery.start(_run_tree, engine)
            try:
                yield store
            except BaseException as exc:  # noqa: BLE001 - re-raised below, unchanged
                # The caller's block failed (or was cancelled, or interrupted):
                # stop the store, then re-raise the error outside the nursery,
                # so that it reaches the caller as itself (a KVMemoError stays
                # catchable as one, a KeyboardInterrupt as one), not wrapped
                # in an ExceptionGroup by the nursery.
                error = exc
            finally:
                engine.stop_accepting()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Under an enclosing cancellation the store's tasks end Cancelled and
        # the nursery raises them for that scope to catch; it would catch
        # the block's own error with them. That error goes first, as it
        # would without the store. The store's failure (its root supervisor
        # gave up) comes out as itself when the block only saw it as its
        # cancellation; when the block failed too (a KeyboardInterrupt, its
        # cleanup's own error), the block's error goes first, unchanged but
        # for a note naming the store's failure: neither is lost. (Anything
        # else, a crash of the tree, stays.)
        gave_up = _gave_up(group)
        if gave_up is not None:
            if error is None or isinstance(error, trio.Cancelled):
                raise gave_up from gave_up.__cause__
            error.add_note(f"meanwhile the store failed: {gave_up}")
        elif error is None or group.split(trio.Cancelled)[1] is not None:
            raise
    finally:
        engine.close()  # the logs, once the tree has stopped
    if error is not None:
        raise error
