"""Pub/sub in the embedded store: PUBLISH, PUBSUB, and ``Store.subscribe``.

The hub's rules (kvmemo.engine.pubsub): delivery to channel and pattern
subscribers at the moment of the publish, Redis's counts, FIFO per channel,
and a bounded outbox that ends a subscriber that does not keep up without
touching anyone else. A model-based test checks every count and delivery
against a plain model over random operation sequences.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmemo
from kvmemo.commands.glob import glob_match
from kvmemo.commands.pubsub import PUBSUB_HELP
from kvmemo.engine.pubsub import MESSAGE_OVERHEAD, Message, PubSubHub
from kvmemo.errors import KVMemoError


async def test_publish_reaches_channel_and_pattern_subscribers() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        assert await kv.execute("publish", "news", "nobody") == 0
        async with kv.subscribe("news") as a, kv.subscribe(patterns=["n*"]) as b:
            async with kv.subscribe("news", patterns=["*s"]) as both:
                assert await kv.execute("publish", "news", "hello") == 4
                assert await kv.execute("publish", "other", "x") == 0
                assert await kv.execute("publish", "nothing", "y") == 1
                assert await a.get() == Message(b"news", b"hello")
                assert await b.get() == Message(b"news", b"hello", b"n*")
                assert await b.get() == Message(b"nothing", b"y", b"n*")
                # A channel and a matching pattern: the message twice, as Redis sends it.
                first, second = await both.get(), await both.get()
                assert (first.kind, second.kind) == ("message", "pmessage")
                assert second == Message(b"news", b"hello", b"*s")
            # The inner block ended: its subscriptions are gone.
            assert await kv.execute("pubsub", "numsub", "news", "none") == [b"news", 1, b"none", 0]
            assert await kv.execute("pubsub", "numpat") == 1
            assert await kv.execute("pubsub", "channels") == [b"news"]
        assert await kv.execute("pubsub", "channels") == []
        assert await kv.execute("pubsub", "numpat") == 0


async def test_the_typed_methods() -> None:
    async with kvmemo.open_store(shards=2) as kv, kv.subscribe("a", patterns=["b*"]) as sub:
        assert await kv.publish("a", b"\x00bytes") == 1
        assert await sub.get() == Message(b"a", b"\x00bytes")
        assert await kv.pubsub_channels() == [b"a"]
        assert await kv.pubsub_channels("z*") == []
        assert await kv.pubsub_numsub("a", "b") == {b"a": 1, b"b": 0}
        assert await kv.pubsub_numpat() == 1


async def test_subscription_counts_follow_redis() -> None:
    async with kvmemo.open_store(shards=1) as kv, kv.subscribe() as sub:
        assert await sub.subscribe("a", "b", "a") == 2  # again is a no-op
        assert await sub.psubscribe("p*") == 3
        assert sub.channels == [b"a", b"b"]
        assert sub.patterns == [b"p*"]
        assert await sub.unsubscribe("zz") == 3  # not subscribed: the count, unchanged
        assert await sub.unsubscribe() == 1  # every channel
        assert await sub.unsubscribe() == 1  # none left: Redis answers nil and the count
        assert await sub.punsubscribe() == 0
        hub = kv.engine.pubsub
        replies = hub.subscriber().unsubscribe()
        assert replies == [(None, 0)]


async def test_messages_arrive_in_publish_order() -> None:
    async with kvmemo.open_store(shards=4) as kv, kv.subscribe("c") as sub:
        for i in range(200):
            assert await kv.execute("publish", "c", str(i)) == 1
        got = [await sub.get() for _ in range(200)]
        assert [m.data for m in got] == [str(i).encode() for i in range(200)]


async def test_iteration_ends_with_the_block_and_cancellation_unsubscribes() -> None:
    async with kvmemo.open_store(shards=1) as kv:
        received: list[bytes] = []

        async def listen(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with kv.subscribe("c") as sub:
                task_status.started()
                async for message in sub:
                    received.append(message.data)

        async with trio.open_nursery() as nursery:
            await nursery.start(listen)
            assert await kv.execute("publish", "c", "1") == 1
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert received == [b"1"]
        assert await kv.execute("pubsub", "numsub", "c") == [b"c", 0]
        assert await kv.execute("publish", "c", "2") == 0


async def test_a_subscriber_that_does_not_keep_up_is_ended_alone() -> None:
    limit = 10 * (MESSAGE_OVERHEAD + 1 + 10)  # ten messages of 10 bytes on channel "c"
    async with kvmemo.open_store(shards=1, pubsub_buffer_limit=limit) as kv:
        async with kv.subscribe("c") as slow, kv.subscribe("c") as fast:
            for i in range(10):
                assert await kv.execute("publish", "c", b"%010d" % i) == 2
                assert (await fast.get()).data == b"%010d" % i
            # The eleventh would pass the slow one's limit: it is ended, and
            # still counted by that publish (Redis counts it too).
            assert await kv.execute("publish", "c", b"x" * 10) == 2
            with pytest.raises(KVMemoError) as ended:
                await slow.get()
            assert ended.value.kind == "OVERLOADED"
            assert "pub/sub output buffer limit" in str(ended.value)
            assert slow.channels == []
            assert await kv.execute("publish", "c", "y") == 1
            assert [(await fast.get()).data for _ in range(2)] == [b"x" * 10, b"y"]
            assert await slow.subscribe("c") == 0  # an ended subscriber stays ended
        stats = (await kv.execute("info", "stats"))["stats"]
        assert stats["pubsub_overflows"] == 1
        assert stats["pubsub_messages_published"] == 12


async def test_pubsub_commands_errors_and_transactions() -> None:
    async with kvmemo.open_store(shards=2) as kv, kv.subscribe("a", "b", patterns=["x"]) as _:
        assert await kv.execute("pubsub", "help") == PUBSUB_HELP
        assert sorted(await kv.execute("pubsub", "channels", "[ab]")) == [b"a", b"b"]
        assert await kv.execute("pubsub", "channels", "zz*") == []
        assert await kv.execute("pubsub", "numsub") == []
        for call, kind in (
            (("publish", "a"), "ARITY"),
            (("pubsub", "numpat", "x"), "ARITY"),
            (("pubsub", "channels", "a", "b"), "SYNTAX"),
            (("pubsub", "nope"), "UNKNOWN_METHOD"),
        ):
            with pytest.raises(KVMemoError) as caught:
                await kv.execute(*call)
            assert caught.value.kind == kind, call
        answers = await kv.transaction(("set", "k", "v"), ("publish", "a", "m"), ("get", "k"))
        assert answers == ["OK", 1, b"v"]
        stats = (await kv.execute("info", "stats"))["stats"]
        assert (stats["pubsub_channels"], stats["pubsub_patterns"]) == (2, 1)


def test_the_buffer_limit_is_validated() -> None:
    with pytest.raises(ValueError, match="pubsub_buffer_limit must be >= 1, got 0"):
        kvmemo.StoreConfig(pubsub_buffer_limit=0)
    assert kvmemo.StoreConfig(pubsub_buffer_limit="1MiB").pubsub_buffer_limit == 1 << 20


# -- the hub against a model ---------------------------------------------------------------

NAMES = [b"a", b"b", b"ab", b"ba"]
PATTERNS = [b"a*", b"*b", b"?", b"[ab]b"]
SUBSCRIBERS = 3

operation = st.one_of(
    st.tuples(
        st.just("subscribe"),
        st.integers(0, SUBSCRIBERS - 1),
        st.lists(st.sampled_from(NAMES), max_size=3),
    ),
    st.tuples(
        st.just("unsubscribe"),
        st.integers(0, SUBSCRIBERS - 1),
        st.lists(st.sampled_from(NAMES), max_size=2),
    ),
    st.tuples(
        st.just("psubscribe"),
        st.integers(0, SUBSCRIBERS - 1),
        st.lists(st.sampled_from(PATTERNS), max_size=2),
    ),
    st.tuples(
        st.just("punsubscribe"),
        st.integers(0, SUBSCRIBERS - 1),
        st.lists(st.sampled_from(PATTERNS), max_size=2),
    ),
    st.tuples(
        st.just("publish"),
        st.integers(0, SUBSCRIBERS - 1),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=1),
    ),
    st.tuples(st.just("take"), st.integers(0, SUBSCRIBERS - 1), st.just([])),
    st.tuples(st.just("close"), st.integers(0, SUBSCRIBERS - 1), st.just([])),
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.lists(operation, max_size=40))
def test_hub_matches_a_model(ops: list[tuple[str, int, list[bytes]]]) -> None:
    hub = PubSubHub()
    subs = [hub.subscriber() for _ in range(SUBSCRIBERS)]
    model_channels: list[list[bytes]] = [[] for _ in subs]
    model_patterns: list[list[bytes]] = [[] for _ in subs]
    model_queue: list[list[Message]] = [[] for _ in subs]
    closed = [False] * SUBSCRIBERS
    for serial, (kind, who, names) in enumerate(ops):
        sub = subs[who]
        if kind in ("subscribe", "psubscribe"):
            own = model_channels[who] if kind == "subscribe" else model_patterns[who]
            replies = getattr(sub, kind)(names)
            expected = []
            for name in names:
                if not closed[who] and name not in own:
                    own.append(name)
                expected.append((name, len(model_channels[who]) + len(model_patterns[who])))
            assert replies == expected
        elif kind in ("unsubscribe", "punsubscribe"):
            own = model_channels[who] if kind == "unsubscribe" else model_patterns[who]
            chosen = list(names) or list(own)
            replies = getattr(sub, kind)(names)
            expected_un: list[tuple[bytes | None, int]] = []
            for name in chosen:
                if name in own:
                    own.remove(name)
                expected_un.append((name, len(model_channels[who]) + len(model_patterns[who])))
            assert replies == (
                expected_un or [(None, len(model_channels[who]) + len(model_patterns[who]))]
            )
        elif kind == "publish":
            channel = names[0]
            data = b"%d" % serial
            count = 0
            for i in range(SUBSCRIBERS):
                if channel in model_channels[i]:
                    model_queue[i].append(Message(channel, data))
                    count += 1
            for i in range(SUBSCRIBERS):
                for pattern in model_patterns[i]:
                    if glob_match(pattern, channel):
                        model_queue[i].append(Message(channel, data, pattern))
                        count += 1
            assert hub.publish(channel, data) == count
        elif kind == "take":
            taken = sub.take()
            mine = model_queue[who]
            # Channel messages of one publish come before its pattern messages,
            # and patterns in the hub's order: compare per publish, as multisets.
            assert sorted(taken, key=_order) == sorted(mine, key=_order)
            model_queue[who] = []
        else:
            sub.close()
            closed[who] = True
            model_channels[who].clear()
            model_patterns[who].clear()
            model_queue[who] = []
        assert sub.channels.keys() == set(model_channels[who])
        assert list(sub.channels) == model_channels[who]
        assert list(sub.patterns) == model_patterns[who]
    active = {c for chans in model_channels for c in chans}
    assert set(hub.channels()) == active
    assert hub.numpat() == len({p for pats in model_patterns for p in pats})
    assert hub.numsub(NAMES) == [(c, sum(c in chans for chans in model_channels)) for c in NAMES]


def _order(message: Message) -> tuple[int, bytes]:
    return int(message.data), message.pattern or b""


async def test_take_never_strands_a_waiting_task_and_on_end_tells_of_an_overflow() -> None:
    ended: list[str] = []
    hub = PubSubHub(limit=3 * (MESSAGE_OVERHEAD + 2))
    sub = hub.subscriber(on_end=lambda: ended.append("ended"))
    sub.subscribe([b"c"])
    woken: list[bool] = []

    async def waiter() -> None:
        await sub.wait()
        woken.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert sub.take() == []  # another task takes while one waits: the waiter stays parked
        hub.publish(b"c", b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [True]
    assert sub.take() == [Message(b"c", b"x")]
    assert ended == []
    for _ in range(3):
        hub.publish(b"c", b"y")
    assert ended == []
    hub.publish(b"c", b"z")  # past the limit: ended, once, and told
    hub.publish(b"c", b"z")
    assert ended == ["ended"]
    with pytest.raises(KVMemoError):
        sub.take()
    closing = hub.subscriber(on_end=lambda: ended.append("closed"))
    closing.close()
    assert ended == ["ended"]  # the owner's own close is not reported back to it


def test_bytes_an_owner_holds_count_against_the_limit() -> None:
    size = MESSAGE_OVERHEAD + 1 + 10  # one message of 10 bytes on channel "c"
    hub = PubSubHub(limit=3 * size)
    sub = hub.subscriber()
    sub.subscribe([b"c"])
    hub.publish(b"c", b"0123456789")
    assert len(sub.take()) == 1
    assert sub.hold(2 * size)  # the owner took it out and holds it, encoded, twice as big
    hub.publish(b"c", b"0123456789")  # fits beside what is held
    assert not sub.ended
    hub.publish(b"c", b"0123456789")  # held + queued would pass the limit
    assert sub.overflowed
    other = hub.subscriber()
    other.subscribe([b"c"])
    assert other.hold(3 * size)
    other.release(3 * size)  # delivered: no longer counted
    for _ in range(3):
        hub.publish(b"c", b"0123456789")
    assert not other.ended
    assert not other.hold(1)  # the outbox is full: holding more overflows it
    assert other.overflowed


def test_subscriptions_are_bounded_and_patterns_compiled_once() -> None:
    hub = PubSubHub(max_subscriptions=3)
    sub = hub.subscriber()
    assert sub.subscribe([b"a", b"b"]) == [(b"a", 1), (b"b", 2)]
    with pytest.raises(KVMemoError) as refused:
        sub.psubscribe([b"x*", b"y*"])  # two more: past the bound, refused whole
    assert refused.value.kind == "TOO_LARGE"
    assert (sub.count, hub.numpat()) == (2, 0)
    assert sub.subscribe([b"a", b"b"]) == [(b"a", 2), (b"b", 2)]  # nothing new: allowed
    assert sub.psubscribe([b"x*"]) == [(b"x*", 3)]
    # Many patterns: each compiled once, kept while subscribed (no shared-cache thrash).
    many = PubSubHub()
    listener = many.subscriber()
    listener.psubscribe([b"p%d:*" % i for i in range(600)])
    assert len(many._matchers) == 600
    assert many.publish(b"p599:x", b"m") == 1
    listener.punsubscribe()
    assert many._matchers == {}
