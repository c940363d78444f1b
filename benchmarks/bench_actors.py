"""Cost of the actor runtime against the bare trio floor, measured in the same run.

Design: the floor is the least a trio program can do to pass a message to
another task and get an answer back, built from the same parts the runtime
uses: a bounded memory channel per server task, a one-shot reply (a result
attribute plus a ``trio.Event``), and a server that drains its channel per
wake-up with ``receive_nowait``. The runtime adds what an actor needs on top:
the reply slot, the crash bookkeeping, the handler call. Three workloads, each
a fixed count of operations, timed with ``time.perf_counter`` in a fresh
``trio.run`` (set-up excluded), best of ``--repeat`` rounds, floor and runtime
rounds interleaved so drift on a shared machine hits both alike:

- ask round trips, 1 caller, 1 server (latency bound);
- ask round trips, 100 callers spread over 8 servers (batching: a server
  wakes once for a whole batch of requests);
- tell throughput: 1 sender, 1 receiver draining; the sender uses the
  non-blocking send and waits for room only when the mailbox is full.

The runtime side runs ``ActorRef.ask`` without a timeout (and, as an extra
line, with one: it costs a cancel scope per call), and ``tell_nowait`` falling
back to ``tell``. Target: the runtime keeps at least ``TARGET_RATIO`` of the
floor's rate. CPU share (process CPU time over wall time) well under 1.0 means
other processes shared the cores: rerun before trusting the figures; the ratio
of CPU times per operation, printed beside it, is steadier then.

Run: ``python -m benchmarks.bench_actors [--quick] [--round-trips N]
[--tells N] [--repeat R]``. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from actors import Actor, ChildSpec, MailboxFull, Supervisor, open_actor_system
from actors.spec import DEFAULT_MAILBOX_CAPACITY

from ._util import Round, best, fmt_rate, fmt_us, load_average

TARGET_RATIO = 0.8  # the runtime's rate over the floor's, per workload
CALLERS = 100  # concurrent askers in the batched workload
SERVERS = 8  # server tasks (actors) they are spread over
MAILBOX = DEFAULT_MAILBOX_CAPACITY  # the floor's channels get the actors' mailbox bound

DEFAULT_ROUND_TRIPS = 50_000
DEFAULT_TELLS = 200_000
DEFAULT_REPEAT = 3
QUICK_ROUND_TRIPS = 5_000
QUICK_TELLS = 20_000


# -- the floor: bare trio -------------------------------------------------------------------


class _Reply:
    """The floor's one-shot reply: a result and an event."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.event = trio.Event()


async def _floor_server(receive: trio.MemoryReceiveChannel[tuple[Any, _Reply]]) -> None:
    while True:
        message, reply = await receive.receive()
        while True:
            reply.value = message
            reply.event.set()
            try:
                message, reply = receive.receive_nowait()
            except trio.WouldBlock:
                break


async def floor_ask(callers: int, servers: int, total: int) -> Round:
    """``total`` round trips by ``callers`` tasks spread over ``servers`` server tasks."""
    channels = [trio.open_memory_channel[tuple[Any, _Reply]](MAILBOX) for _ in range(servers)]
    per_caller = total // callers

    async def caller(send: trio.MemorySendChannel[tuple[Any, _Reply]]) -> None:
        for i in range(per_caller):
            reply = _Reply()
            try:
                send.send_nowait((i, reply))
            except trio.WouldBlock:
                await send.send((i, reply))
            await reply.event.wait()
            if reply.value != i:
                raise AssertionError("wrong reply")

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(_floor_server, receive)
        round_ = await _timed(
            callers * per_caller, _spawn(caller, [s for s, _ in channels], callers)
        )
        nursery.cancel_scope.cancel()
    return round_


async def floor_tell(total: int) -> Round:
    """``total`` one-way messages from one sender to one draining receiver."""
    send, receive = trio.open_memory_channel[int](MAILBOX)
    done = trio.Event()

    async def receiver() -> None:
        count = 0
        while True:
            await receive.receive()
            count += 1
            while True:
                try:
                    receive.receive_nowait()
                except trio.WouldBlock:
                    break
                count += 1
            if count == total:
                done.set()
                return

    async def sender() -> None:
        for i in range(total):
            try:
                send.send_nowait(i)
            except trio.WouldBlock:
                await send.send(i)
        await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        return await _timed(total, sender)


# -- the same workloads through the actor runtime ------------------------------------------


class Echo(Actor):
    async def handle(self, message: Any) -> Any:
        return message


class Count(Actor):
    def __init__(self, total: int, done: trio.Event) -> None:
        self.total = total
        self.done = done
        self.count = 0

    async def handle(self, message: Any) -> None:
        self.count += 1
        if self.count == self.total:
            self.done.set()


class SyncCount(Count):
    """``Count`` with the synchronous handler fast path (``Actor.handle_nowait``)."""

    def handle_nowait(self, message: Any) -> None:
        self.count += 1
        if self.count == self.total:
            self.done.set()


async def actors_ask(callers: int, servers: int, total: int, timeout: float | None) -> Round:
    """Like :func:`floor_ask`, through ``ActorRef.ask`` to ``servers`` echo actors."""
    names = [f"echo{i}" for i in range(servers)]
    root = Supervisor("bench", [ChildSpec(name, lambda ctx: Echo()) for name in names])
    per_caller = total // callers
    async with open_actor_system(root) as system:
        refs = [system.ref(name) for name in names]

        async def caller(ref: Any) -> None:
            ask = ref.ask
            for i in range(per_caller):
                if timeout is None:
                    value = await ask(i)
                else:
                    value = await ask(i, timeout=timeout)
                if value != i:
                    raise AssertionError("wrong reply")

        return await _timed(callers * per_caller, _spawn(caller, refs, callers))


async def actors_tell(total: int, sync: bool = False) -> Round:
    """Like :func:`floor_tell`, through ``tell_nowait`` (``tell`` when the mailbox is full).

    ``sync``: the receiver handles messages with ``handle_nowait`` (no coroutine each).
    """
    done = trio.Event()
    actor = SyncCount if sync else Count
    root = Supervisor("bench", [ChildSpec("count", lambda ctx: actor(total, done))])
    async with open_actor_system(root) as system:
        ref = system.ref("count")

        async def sender() -> None:
            tell_nowait = ref.tell_nowait
            for i in range(total):
                try:
                    tell_nowait(i)
                except MailboxFull:
                    await ref.tell(i)
            await done.wait()

        return await _timed(total, sender)


# -- measuring ------------------------------------------------------------------------------------


def _spawn(
    task: Callable[[Any], Awaitable[None]], targets: list[Any], count: int
) -> Callable[[], Awaitable[None]]:
    """A body that runs ``count`` copies of ``task``, spread round-robin over ``targets``."""

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(task, targets[i % len(targets)])

    return body


async def _timed(units: int, body: Callable[[], Awaitable[None]]) -> Round:
    started, cpu = time.perf_counter(), time.process_time()
    await body()
    return Round(time.perf_counter() - started, units, cpu=time.process_time() - cpu)


Measure = Callable[[], Round]


def _rows(round_trips: int, tells: int) -> list[tuple[str, Measure, Measure]]:
    def run(fn: Callable[..., Awaitable[Round]], *args: Any) -> Measure:
        return lambda: trio.run(fn, *args)

    one, many = (1, 1, round_trips), (CALLERS, SERVERS, round_trips)
    return [
        ("ask, 1 caller", run(floor_ask, *one), run(actors_ask, *one, None)),
        ("ask(timeout=10), 1 caller", run(floor_ask, *one), run(actors_ask, *one, 10.0)),
        (
            f"ask, {CALLERS} callers / {SERVERS} servers",
            run(floor_ask, *many),
            run(actors_ask, *many, None),
        ),
        (
            f"ask(timeout=10), {CALLERS} / {SERVERS}",
            run(floor_ask, *many),
            run(actors_ask, *many, 10.0),
        ),
        ("tell, 1 sender draining", run(floor_tell, tells), run(actors_tell, tells)),
        (
            "tell, handle_nowait",
            run(floor_tell, tells),
            run(actors_tell, tells, True),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_actors",
        description="Actor runtime against the bare trio floor (ask, batched ask, tell).",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (~3 s)")
    parser.add_argument("--round-trips", type=int, default=None, help="asks per measurement")
    parser.add_argument("--tells", type=int, default=None, help="tells per measurement")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="best of R rounds")
    args = parser.parse_args(argv)
    round_trips = args.round_trips or (QUICK_ROUND_TRIPS if args.quick else DEFAULT_ROUND_TRIPS)
    tells = args.tells or (QUICK_TELLS if args.quick else DEFAULT_TELLS)
    if round_trips < CALLERS or tells < 1 or args.repeat < 1:
        parser.error(f"round trips must be >= {CALLERS}, tells and repeat >= 1")

    print(
        f"actor runtime vs bare trio: {round_trips} round trips, {tells} tells,"
        f" best of {args.repeat}; load {load_average()}"
    )
    header = f"{'operation':<34}{'floor ops/s':>12}{'actors ops/s':>13}"
    print(f"{header}{'floor us':>10}{'actors us':>11}{'ratio':>7}{'cpu':>6}{'cpu ratio':>10}")
    for label, floor, actors in _rows(round_trips, tells):
        floor_rounds, actor_rounds = [], []
        for _ in range(args.repeat):  # interleaved: drift hits both alike
            floor_rounds.append(floor())
            actor_rounds.append(actors())
        f, a = best(floor_rounds), best(actor_rounds)
        ratio = a.rate / f.rate
        mark = "" if ratio >= TARGET_RATIO else " <"
        print(
            f"{label:<34}{fmt_rate(f.rate):>12}{fmt_rate(a.rate):>13}"
            f"{fmt_us(1 / f.rate):>10}{fmt_us(1 / a.rate):>11}{ratio:>7.2f}"
            f"{min(f.cpu_share, a.cpu_share):>6.2f}{f.cpu / a.cpu:>10.2f}{mark}"
        )
    print(
        f"target: actors >= {TARGET_RATIO:.0%} of the floor's rate ('<' marks a miss);"
        " cpu: lowest CPU share of the two best rounds (under ~0.9: the cores were shared);"
        " cpu ratio: the same ratio from CPU time, steadier on a shared machine"
    )


if __name__ == "__main__":
    main()
