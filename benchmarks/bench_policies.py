"""Hit ratio of the eviction policies on a Zipf trace, against exact LRU and Belady.

Design: one deterministic trace, Zipf(s = 0.99) popularity over ``--keys``
keys: rank r is requested with probability proportional to 1 / r**s. Ranks are
drawn by inverse transform sampling (a uniform number located by bisection in
the cumulative weights, which is what ``Random.choices(cum_weights=...)``
does), then mapped to key ids through a seeded shuffle, so that popularity is
not correlated with key order. Every simulator replays the same trace against a
cache that holds ``--room`` of the keys:

- each policy of ``kvmemo.eviction.policies`` drives the cache exactly as a
  shard would: a hit calls ``record_access``; a miss calls ``record_insert``
  and, when the cache is over capacity, evicts ``candidates(1)[0]`` with
  ``record_remove`` (the new key itself may be that victim);
- exact LRU, a plain ``OrderedDict``: a cross-check of the ``lru`` policy,
  which must score the same hits;
- Belady's MIN, the offline optimum: on a miss that overflows the cache it
  evicts, among the cached keys *and the new one* (the same freedom the
  policies have), the one whose next request is farthest in the future. Next
  uses are precomputed in one backward pass; the farthest is the top of a
  max-heap of ``(-next_use, key)`` with lazy deletion: a hit pushes the key's
  new next use and leaves the old entry, which is skipped when popped because
  it no longer matches the key's current next use.

Run: ``python -m benchmarks.bench_policies [--requests N] [--keys K]
[--room F] [--seed S]``. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

from kvmemo.eviction.policies import make_policy

ZIPF_S = 0.99  # Zipf exponent: web and cache traces typically measure 0.6-1.0
POLICIES = ("lru", "lfu", "fifo", "random")

DEFAULT_REQUESTS = 1_000_000
DEFAULT_KEYS = 100_000
DEFAULT_ROOM = 0.10  # fraction of the keys the cache can hold
DEFAULT_SEED = 2024


def zipf_trace(requests: int, keys: int, *, s: float, seed: int) -> list[bytes]:
    """A deterministic Zipf(s) request trace over ``keys`` distinct byte keys.

    Equal arguments give an equal trace on every run and machine. Equal keys
    are the same ``bytes`` object, so their hash is computed once.
    """
    rng = random.Random(seed)
    ids = list(range(keys))
    rng.shuffle(ids)
    by_rank = [b"key:%08d" % key_id for key_id in ids]  # rank 1 is by_rank[0]
    cum_weights = list(itertools.accumulate(1.0 / rank**s for rank in range(1, keys + 1)))
    return rng.choices(by_rank, cum_weights=cum_weights, k=requests)


def policy_hits(name: str, trace: Sequence[bytes], capacity: int, *, seed: int) -> int:
    """Hits of a cache of ``capacity`` keys run by the named policy, as a shard runs it."""
    policy = make_policy(name, rng=random.Random(seed))
    record_access = policy.record_access
    record_insert = policy.record_insert
    record_remove = policy.record_remove
    candidates = policy.candidates
    cached: set[bytes] = set()
    hits = 0
    for key in trace:
        if key in cached:
            hits += 1
            record_access(key)
        else:
            cached.add(key)
            record_insert(key, volatile=False)
            if len(cached) > capacity:
                victim = candidates(1)[0][1]
                record_remove(victim)
                cached.remove(victim)
    return hits


def exact_lru_hits(trace: Sequence[bytes], capacity: int) -> int:
    """Hits of a textbook LRU cache (an ``OrderedDict``), independent of kvmemo."""
    cache: OrderedDict[bytes, None] = OrderedDict()
    hits = 0
    for key in trace:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def belady_hits(trace: Sequence[bytes], capacity: int) -> int:
    """Hits of Belady's MIN (see the module's design comment)."""
    n = len(trace)
    never = n  # the "next use" of a key that is not requested again
    next_use = [never] * n
    seen: dict[bytes, int] = {}
    for i in range(n - 1, -1, -1):
        key = trace[i]
        next_use[i] = seen.get(key, never)
        seen[key] = i
    del seen

    # cached[key] = index of its next request. Positions are unique per key and
    # only grow, so (-next, key) matches cached[key] only while it is current.
    cached: dict[bytes, int] = {}
    heap: list[tuple[int, bytes]] = []
    push, pop = heapq.heappush, heapq.heappop
    hits = 0
    for key, nxt in zip(trace, next_use, strict=True):
        if key in cached:
            hits += 1
        cached[key] = nxt
        push(heap, (-nxt, key))
        if len(cached) > capacity:
            while True:
                neg_next, victim = pop(heap)
                if cached.get(victim) == -neg_next:
                    break
            del cached[victim]
    return hits


def _timed(fn: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_policies",
        description="Hit ratio of each eviction policy on a Zipf(0.99) trace, "
        "compared with exact LRU and with Belady's optimum.",
    )
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="trace length")
    parser.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="distinct keys")
    parser.add_argument(
        "--room", type=float, default=DEFAULT_ROOM, help="cache size as a fraction of --keys"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="trace and policy seed")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests must be >= 1, got {args.requests}")
    if args.keys < 1:
        parser.error(f"--keys must be >= 1, got {args.keys}")
    if not 0 < args.room <= 1:
        parser.error(f"--room must be in (0, 1], got {args.room}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every simulation on one trace and print the comparison table."""
    args = _parse_args(argv)
    capacity = max(1, round(args.keys * args.room))
    start = time.perf_counter()
    trace = zipf_trace(args.requests, args.keys, s=ZIPF_S, seed=args.seed)
    gen_s = time.perf_counter() - start
    print(
        f"Zipf(s={ZIPF_S}) trace: {args.requests:,} requests over {args.keys:,} keys, "
        f"cache room {capacity:,} keys ({args.room:.0%}), seed {args.seed} "
        f"(generated in {gen_s:.1f} s)"
    )

    results: list[tuple[str, int, float]] = []
    lru_hits, lru_s = _timed(partial(exact_lru_hits, trace, capacity))
    opt_hits, opt_s = _timed(partial(belady_hits, trace, capacity))
    for name in POLICIES:
        hits, secs = _timed(partial(policy_hits, name, trace, capacity, seed=args.seed))
        results.append((name, hits, secs))
    results.append(("exact LRU (OrderedDict)", lru_hits, lru_s))
    results.append(("Belady MIN (optimal)", opt_hits, opt_s))

    header = f"{'policy':<24} {'hit ratio':>9} {'/ exact LRU':>11} {'/ Belady':>8} {'time':>7}"
    print(header)
    print("-" * len(header))
    for name, hits, secs in results:
        print(
            f"{name:<24} {hits / len(trace):>9.4f} {hits / max(lru_hits, 1):>11.4f} "
            f"{hits / max(opt_hits, 1):>8.4f} {secs:>6.2f}s"
        )


if __name__ == "__main__":
    main()
