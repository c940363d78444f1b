"""A small trio application embedding KVMemo: a rate limiter, a cache and change events.

Run it with ``python examples/embedded.py``.
"""

from __future__ import annotations

import trio

import kvmemo


async def allow(kv: kvmemo.Store, user: str, limit: int, window: int) -> bool:
    """Fixed-window rate limiting: at most ``limit`` calls per ``window`` seconds.

    One transaction, so the counter never exists without its expiry.
    """
    key = f"rate:{user}"
    count, _ = await kv.transaction(("INCR", key), ("EXPIRE", key, window, "NX"))
    return int(count) <= limit


async def transfer(kv: kvmemo.Store, src: str, dst: str, amount: int) -> bool:
    """Move ``amount`` between two balances if ``src`` has it (optimistic, with WATCH)."""
    while True:
        async with kv.watch(src, dst) as w:
            balance = int(await kv.get(src) or 0)
            if balance < amount:
                return False
            done = await w.transaction(("DECRBY", src, amount), ("INCRBY", dst, amount))
        if done is not None:
            return True  # else a balance changed meanwhile: read again and retry


async def cached_square(kv: kvmemo.Store, n: int) -> int:
    """Memoise an expensive computation for 30 seconds."""
    key = f"square:{n}"
    hit = await kv.get(key)
    if hit is not None:
        return int(hit)
    await trio.sleep(0.01)  # pretend to work
    value = n * n
    await kv.set(key, value, ex=30)
    return value


async def watch_orders(kv: kvmemo.Store, *, task_status: trio.TaskStatus[None]) -> None:
    """Print the first two events published on any ``orders:*`` channel."""
    async with kv.subscribe(patterns=["orders:*"]) as events:
        task_status.started()  # subscribed: nothing published from now on is missed
        for _ in range(2):
            event = await events.get()
            print("event:", event.channel.decode(), event.data.decode())


async def main() -> None:
    async with kvmemo.open_store(shards=4, maxmemory="16MiB", eviction_policy="lru") as kv:
        results = [await allow(kv, "alice", limit=3, window=60) for _ in range(5)]
        print("rate limit:", results)  # [True, True, True, False, False]

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(cached_square, kv, n)
        print("cached keys:", sorted(await kv.keys("square:*")))

        await kv.set("balance:alice", 100)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(transfer, kv, "balance:alice", "balance:bob", 40)
        print("balances:", await kv.mget("balance:alice", "balance:bob"))  # [b'20', b'80']

        await kv.mset({"a": "1", "b": "2"})
        print("mget:", await kv.mget("a", "b", "missing"))
        print("ttl of rate:alice:", await kv.ttl("rate:alice"))
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_orders, kv)
            await kv.publish("orders:new", "order 17")
            await kv.publish("orders:paid", "order 17")

        print("actors:", [(a["name"], a["state"]) for a in kv.actors()][:4], "...")


if __name__ == "__main__":
    trio.run(main)
