"""Embedded store throughput and latency, against floors measured in the same run.

Design: every figure of the engine is printed next to the floor it cannot
beat, both measured now on this machine, so the ratio means something on any
machine (absolute numbers do not travel):

- the *trio ask floor*: the bare cost of one request/reply between trio tasks,
  with no actor runtime and no engine. A server task owns a bounded memory
  channel; an asker sends ``(message, slot)`` with ``send_nowait`` and waits on
  the slot's ``trio.Event``; the server answers, then drains every queued
  message with ``receive_nowait`` before it sleeps again (one wake-up per
  batch). Measured with 1 caller and with 64 callers over 16 server tasks,
  requests routed by key as the engine routes them to its 16 shards. The
  get / set rows use a floor measured in the same run, its rounds alternating
  with theirs (a machine whose speed drifts affects both alike); the floor
  rows at the top are measured alone, for reference;
- the *plain dict floor*: a Python loop doing the same gets / sets on a dict
  of the same keys, in keys/s.

The engine (default config, 16 shards) runs through the embedded API
(``kvmemo.open_store``): ``get`` / ``set`` with 1 task and with 64 concurrent
tasks, ``mget`` / ``mset`` in batches of 100 keys, and ``Store.execute_many``
with 100 mixed get/set per call (grouped per shard: how the server runs a
JSON-RPC batch). Keys are 16 bytes, values 32 bytes, drawn uniformly from a
preloaded keyspace. Each measurement is its own ``trio.run``; wall-clock time
(``time.perf_counter``); throughput is the best of ``--rounds`` rounds (after
one warm-up), latency percentiles are per call, from that best round.

Memory: ``--keys`` keys (default 10^6) are written with MSET batches;
bytes per key are reported both as the engine's tracked estimate
(``info()["memory"]["used_memory"] / keys``) and as the growth tracemalloc
measures, with a plain dict of the same keys as reference.

Targets are printed next to the ratios and never asserted: a slow machine or
a busy CI runner must not fail the build.

Run: ``python -m benchmarks.bench_engine [--quick] [--keys N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

import kvmemo

from ._util import Round, best, fmt_rate, fmt_us, load_average, percentile

SHARDS = 16  # the default config's shard count, and the floor's server tasks
CONCURRENCY = 64  # concurrent tasks of the "many callers" measurements
BATCH = 100  # keys per mget / mset, commands per execute_many call
MAILBOX = 4096  # the floor servers' channel bound, as StoreConfig.mailbox_capacity
PRELOAD_BATCH = 1000  # keys per MSET when loading keys
KEY_FORMAT = b"key:%012d"  # 16 bytes
VALUE_FORMAT = b"val:%028d"  # 32 bytes
TARGET_SINGLE = 0.7  # get/set with 64 tasks, fraction of the trio ask floor (ops/s)
TARGET_MGET = 0.3  # batched mget, fraction of the plain dict get floor (keys/s)
CPU_SHARED = 0.85  # CPU / wall time under which a measurement is flagged as contended
DEFAULT_KEYS = 1_000_000  # keys of the memory measurement
DICT_ROUNDS = 5  # at least, for the dict floor: its rounds are short and cheap
SEED = 2024


@attrs.frozen
class Sizes:
    """How much work each measurement does (full run or ``--quick``)."""

    keyspace: int  # preloaded keys that gets and sets draw from
    single_one: int  # get/set calls per round, 1 task
    single_many: int  # get/set calls per round, 64 tasks
    batch_keys: int  # keys per round of mget / mset / execute_many
    ask_one: int  # floor asks per round, 1 caller
    ask_many: int  # floor asks per round, 64 callers
    dict_ops: int  # dict gets / sets per round
    rounds: int


FULL = Sizes(100_000, 20_000, 40_000, 50_000, 20_000, 64_000, 1_000_000, 3)
QUICK = Sizes(10_000, 2_000, 6_400, 10_000, 4_000, 12_800, 200_000, 3)


def key(i: int) -> bytes:
    return KEY_FORMAT % i


def value(i: int) -> bytes:
    return VALUE_FORMAT % i


# -- driving concurrent callers ------------------------------------------------------------


async def drive(
    tasks: int,
    items: Sequence[tuple[Any, ...]],
    op: Callable[..., Awaitable[object]],
    units_per_item: int = 1,
) -> Round:
    """Run ``await op(*item)`` for every item, spread over ``tasks`` concurrent tasks.

    Returns the round's wall time and the latency of every call.
    """
    latencies: list[float] = []

    async def worker(part: Sequence[tuple[Any, ...]]) -> None:
        clock = time.perf_counter
        record = latencies.append
        for item in part:
            started = clock()
            await op(*item)
            record(clock() - started)

    gc.collect()
    cpu = time.process_time()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, items[t::tasks])
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    return Round(elapsed, len(items) * units_per_item, latencies, cpu)


async def timed_rounds(
    tasks: int,
    items: Sequence[tuple[Any, ...]],
    op: Callable[..., Awaitable[object]],
    rounds: int,
    units_per_item: int = 1,
) -> Round:
    """One warm-up on a tenth of the items, then the best of ``rounds`` rounds."""
    await drive(tasks, items[: max(tasks, len(items) // 10)], op, units_per_item)
    return best([await drive(tasks, items, op, units_per_item) for _ in range(rounds)])


# -- floor (a): the bare trio ask ------------------------------------------------------


class _Slot:
    """A one-shot reply: a value and the event that says it is there."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: object = None


async def _floor_server(receive: trio.MemoryReceiveChannel[tuple[object, _Slot]]) -> None:
    """Answer every request with its message; drain the queue per wake-up."""
    while True:
        message, slot = await receive.receive()
        while True:
            slot.value = message
            slot.event.set()
            try:
                message, slot = receive.receive_nowait()
            except trio.WouldBlock:
                break


async def _floor_ask(send: trio.MemorySendChannel[tuple[object, _Slot]], message: object) -> object:
    slot = _Slot()
    send.send_nowait((message, slot))
    await slot.event.wait()
    return slot.value


def _start_floor(nursery: trio.Nursery, asks: int) -> list[tuple[Any, ...]]:
    """Start the floor's server tasks in ``nursery``; the items of ``asks`` asks to them."""
    sends = []
    for _ in range(SHARDS):
        send, receive = trio.open_memory_channel[tuple[object, _Slot]](MAILBOX)
        sends.append(send)
        nursery.start_soon(_floor_server, receive)
    rng = random.Random(SEED)
    return [(sends[i % SHARDS], key(i)) for i in (rng.randrange(1 << 30) for _ in range(asks))]


async def _ask_floor(callers: int, asks: int, rounds: int) -> Round:
    async with trio.open_nursery() as nursery:
        items = _start_floor(nursery, asks)
        result = await timed_rounds(callers, items, _floor_ask, rounds)
        nursery.cancel_scope.cancel()
    return result


# -- floor (b): the plain dict -----------------------------------------------------------


def _dict_floor(sizes: Sizes) -> dict[str, Round]:
    """Keys/s of a dict loop doing gets, sets and a 50/50 mix on the same keyspace."""
    rng = random.Random(SEED)
    keys = [key(i) for i in range(sizes.keyspace)]
    values = [value(i) for i in range(sizes.keyspace)]
    table = dict(zip(keys, values, strict=True))
    picks = [rng.randrange(sizes.keyspace) for _ in range(sizes.dict_ops)]
    get_keys = [keys[i] for i in picks]
    set_pairs = [(keys[i], values[i]) for i in picks]
    mixed = [(keys[i], values[i] if rng.random() < 0.5 else None) for i in picks]

    def gets() -> None:
        get = table.get
        for k in get_keys:
            get(k)

    def sets() -> None:
        for k, v in set_pairs:
            table[k] = v

    def mix() -> None:
        get = table.get
        for k, v in mixed:
            if v is None:
                get(k)
            else:
                table[k] = v

    out = {}
    for name, fn in (("get", gets), ("set", sets), ("mixed", mix)):
        rounds = []
        for _ in range(max(sizes.rounds, DICT_ROUNDS)):
            gc.collect()
            cpu = time.process_time()
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started
            rounds.append(Round(elapsed, sizes.dict_ops, cpu=time.process_time() - cpu))
        out[name] = best(rounds)
    return out


# -- the engine --------------------------------------------------------------------------


async def _preload(kv: kvmemo.Store, count: int) -> None:
    """Write keys ``0 .. count-1`` with MSET batches (the fewest temporaries per key)."""
    for start in range(0, count, PRELOAD_BATCH):
        stop = min(count, start + PRELOAD_BATCH)
        await kv.mset([(key(i), value(i)) for i in range(start, stop)])


def _workload(
    kind: str, kv: kvmemo.Store, sizes: Sizes, tasks: int
) -> tuple[Sequence[tuple[Any, ...]], Callable[..., Awaitable[object]], int]:
    """(items, op, keys per item) of one engine measurement."""
    rng = random.Random(SEED)
    n = sizes.keyspace

    def pick() -> int:
        return rng.randrange(n)

    if kind in ("get", "set"):
        calls = sizes.single_one if tasks == 1 else sizes.single_many
        picks = [pick() for _ in range(calls)]
        if kind == "get":
            return [(key(i),) for i in picks], kv.get, 1
        return [(key(i), value(i)) for i in picks], kv.set, 1
    batches = [[pick() for _ in range(BATCH)] for _ in range(sizes.batch_keys // BATCH)]
    if kind == "mget":
        return [tuple(key(i) for i in b) for b in batches], kv.mget, BATCH
    if kind == "mset":
        return [([(key(i), value(i)) for i in b],) for b in batches], kv.mset, BATCH
    assert kind == "execute_many"
    calls_of = [
        tuple(("get", key(i)) if rng.random() < 0.5 else ("set", key(i), value(i)) for i in b)
        for b in batches
    ]
    return calls_of, kv.execute_many, BATCH


async def _engine_and_floor(kind: str, tasks: int, sizes: Sizes) -> tuple[Round, Round]:
    """(the ask floor, the engine's ``kind``), in alternating rounds of one run.

    The targets of get and set are ratios to the ask floor; measured at other
    moments, a machine whose speed drifts (shared cores) would bias them.
    Here both see the same moments: the floor's server tasks run beside the
    store, round for round, and the best round of each is kept.
    """
    async with kvmemo.open_store(shards=SHARDS) as kv:
        await _preload(kv, sizes.keyspace)
        items, op, units = _workload(kind, kv, sizes, tasks)
        async with trio.open_nursery() as nursery:
            floor_items = _start_floor(nursery, sizes.ask_one if tasks == 1 else sizes.ask_many)
            await drive(tasks, floor_items[: max(tasks, len(floor_items) // 10)], _floor_ask)
            await drive(tasks, items[: max(tasks, len(items) // 10)], op, units)
            floors, engines = [], []
            for _ in range(sizes.rounds):
                floors.append(await drive(tasks, floor_items, _floor_ask))
                engines.append(await drive(tasks, items, op, units))
            nursery.cancel_scope.cancel()
        if kind == "set":
            assert await kv.dbsize() == sizes.keyspace  # writes overwrote, none was lost
    return best(floors), best(engines)


async def _engine(kind: str, tasks: int, sizes: Sizes) -> Round:
    async with kvmemo.open_store(shards=SHARDS) as kv:
        await _preload(kv, sizes.keyspace)
        items, op, units = _workload(kind, kv, sizes, tasks)
        result = await timed_rounds(tasks, items, op, sizes.rounds, units)
        if kind in ("mset", "execute_many", "set"):
            assert await kv.dbsize() == sizes.keyspace  # writes overwrote, none was lost
    return result


# -- memory --------------------------------------------------------------------------


@attrs.frozen
class Memory:
    keys: int
    tracked: int  # info()["memory"]["used_memory"]
    traced: int  # tracemalloc growth while loading
    dict_traced: int  # tracemalloc growth of a plain dict of the same items


async def _engine_memory(count: int) -> tuple[int, int, int]:
    """(keys, tracked bytes, tracemalloc growth) after writing ``count`` keys."""
    async with kvmemo.open_store(shards=SHARDS) as kv:
        await kv.set(key(0), value(0))  # lazily created structures come before the baseline
        await kv.info("memory")
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            # Keys and values are created inside the traced window and only the
            # store keeps them: their bytes objects count, as they would for a server.
            await _preload(kv, count)
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        keys = await kv.dbsize()
        info = await kv.info("memory")
    return keys, int(info["memory"]["used_memory"]), traced


def _dict_memory(count: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        table = {key(i): value(i) for i in range(count)}
        traced = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    del table
    return traced


def measure_memory(count: int) -> Memory:
    keys, tracked, traced = trio.run(_engine_memory, count)
    return Memory(keys, tracked, traced, _dict_memory(count))


# -- the report --------------------------------------------------------------------------


def _row(
    name: str,
    tasks: int,
    r: Round,
    unit: str,
    floor: tuple[str, Round] | None = None,
    target: float | None = None,
) -> str:
    p50 = fmt_us(percentile(r.latencies, 0.50)) if r.latencies else "-"
    p99 = fmt_us(percentile(r.latencies, 0.99)) if r.latencies else "-"
    ratio = cpu_ratio = target_col = floor_col = ""
    if floor is not None:
        floor_name, floor_round = floor
        value_ = r.rate / floor_round.rate
        floor_col = f"{floor_name} {fmt_rate(floor_round.rate)}"
        ratio = f"{value_:.3f}"
        cpu_ratio = f"{r.cpu_rate / floor_round.cpu_rate:.3f}"
        if target is not None:
            target_col = f">= {target:.2f} {'met' if value_ >= target else 'MISSED'}"
    cpu = f"{r.cpu_share:.0%}" if r.cpu_share == r.cpu_share else "-"  # NaN: not recorded
    return (
        f"{name:<24} {tasks:>5} {fmt_rate(r.rate):>9} {unit:<6} {p50:>8} {p99:>8} {cpu:>4}  "
        f"{floor_col:<30} {ratio:>6} {cpu_ratio:>6}  {target_col}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_engine",
        description="Embedded store get/set/mget/mset/execute_many throughput and latency "
        "against the trio ask floor and the plain dict floor, and bytes per key.",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (~10 s)")
    parser.add_argument(
        "--keys", type=int, default=None, help=f"keys of the memory measurement ({DEFAULT_KEYS:,})"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (best is kept)")
    args = parser.parse_args(argv)
    if args.keys is not None and args.keys < 1:
        parser.error(f"--keys must be >= 1, got {args.keys}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure the floors, then the engine, then memory; print one table."""
    args = _parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = attrs.evolve(sizes, rounds=args.rounds)
    mem_keys = args.keys if args.keys is not None else (50_000 if args.quick else DEFAULT_KEYS)
    run_started = time.perf_counter()
    print(
        f"embedded store, {SHARDS} shards, default config; {sizes.keyspace:,} preloaded keys "
        f"(16 B keys, 32 B values); best of {sizes.rounds} rounds; latency per call in µs;\n"
        f"cpu = process CPU / wall time of the best round (well under 100%: the cores were "
        f"shared, figures are low and noisy);\n"
        f"ratio = rate / the floor's rate, by the wall clock (what the targets are judged on); "
        f"cpu-r = the same ratio per\nsecond of process CPU (steadier when other processes "
        f"share the cores); load average {load_average()}"
    )
    rows: list[Round] = []
    header = (
        f"{'measurement':<24} {'tasks':>5} {'rate':>9} {'unit':<6} {'p50 µs':>8} {'p99 µs':>8} "
        f"{'cpu':>4}  "
        f"{'floor':<30} {'ratio':>6} {'cpu-r':>6}  target"
    )
    print(header)
    print("-" * len(header))

    ask = {}
    for callers, asks in ((1, sizes.ask_one), (CONCURRENCY, sizes.ask_many)):
        ask[callers] = trio.run(_ask_floor, callers, asks, sizes.rounds)
        rows.append(ask[callers])
        print(_row("floor: trio ask", callers, ask[callers], "ops/s"), flush=True)
    plain = _dict_floor(sizes)
    for name, r in plain.items():
        rows.append(r)
        print(_row(f"floor: dict {name}", 1, r, "keys/s"), flush=True)

    for kind in ("get", "set"):
        for tasks in (1, CONCURRENCY):
            paired, r = trio.run(_engine_and_floor, kind, tasks, sizes)
            target = TARGET_SINGLE if tasks == CONCURRENCY else None
            floor = (f"ask x{tasks} (same run)", paired)
            rows.append(r)
            print(_row(kind, tasks, r, "ops/s", floor, target), flush=True)
    for kind, floor_name in (("mget", "get"), ("mset", "set"), ("execute_many", "mixed")):
        for tasks in (1, CONCURRENCY):
            r = trio.run(_engine, kind, tasks, sizes)
            target = TARGET_MGET if kind == "mget" else None
            name = f"{kind} x{BATCH}" if kind != "execute_many" else f"execute_many {BATCH} mix"
            floor = (f"dict {floor_name}", plain[floor_name])
            rows.append(r)
            print(_row(name, tasks, r, "keys/s", floor, target), flush=True)

    mem_started = time.perf_counter()
    mem = measure_memory(mem_keys)
    print(
        f"\nmemory, {mem.keys:,} keys of 16 B -> 32 B, eviction policy "
        f"{kvmemo.StoreConfig().eviction_policy} "
        f"(loaded in {time.perf_counter() - mem_started:.1f} s under tracemalloc):\n"
        f"  tracked estimate (used_memory / keys): {mem.tracked / mem.keys:7.1f} B/key\n"
        f"  tracemalloc growth / keys:             {mem.traced / mem.keys:7.1f} B/key\n"
        f"  plain dict, tracemalloc / keys:        {mem.dict_traced / mem_keys:7.1f} B/key"
    )
    shared = sum(1 for r in rows if r.cpu_share < CPU_SHARED)
    if shared:
        print(
            f"\nnote: {shared} of {len(rows)} measurements ran below {CPU_SHARED:.0%} CPU: "
            "other processes shared the cores; rerun on an idle machine for firm figures"
        )
    print(f"\ntotal {time.perf_counter() - run_started:.1f} s, load average {load_average()}")


if __name__ == "__main__":
    main()
