"""GROUP records: the effects of one command on one shard, replayed all or none.

An MSET whose keys live on one shard is one message and one journal entry:
its SETs go to the log as one ``GROUP`` record, whose CRC covers them all,
so a crash that tears the write (a power loss under ``always``, dropped
pages under ``everysec``) never brings back part of it.
"""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mget_fastpath import DETERMINISTIC

import kvmemo
from kvmemo.persistence import list_segments, recover
from kvmemo.persistence.records import (
    Corrupt,
    Op,
    Torn,
    encode_fields,
    encode_group,
    encode_set,
    encode_txn,
    group_contents,
    intent_sections,
    replay,
)
from kvmemo.storage import durability
from kvmemo.storage.durability import Journal

PAIRS = st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), min_size=1, max_size=6)


def sets(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(encode_set(k, v) for k, v in pairs)


@DETERMINISTIC
@given(before=PAIRS, group=PAIRS, after=PAIRS)
def test_a_group_replays_as_its_records_would(
    before: list[tuple[bytes, bytes]],
    group: list[tuple[bytes, bytes]],
    after: list[tuple[bytes, bytes]],
) -> None:
    grouped: dict[bytes, bytes] = {}
    plain: dict[bytes, bytes] = {}
    result = replay(sets(before) + encode_group(sets(group)) + sets(after), grouped, {})
    assert result.problem is None
    assert result.count == len(before) + 1 + len(after)  # the group is one record
    replay(sets(before) + sets(group) + sets(after), plain, {})
    assert grouped == plain


# Any record a shard's log holds outside marks: SETs with and without expiry
# (over few keys, so they meet), DELs, EXPIREs and FLUSHes.
_KEYS = st.sampled_from([b"a", b"b", b"c", b""])
_SET = st.builds(
    lambda k, v, exp: encode_fields(Op.SET, k, v, exp),
    _KEYS,
    st.binary(max_size=4),
    st.one_of(st.none(), st.integers(0, 10)),
)
_OTHER = st.one_of(
    st.builds(lambda k: encode_fields(Op.DEL, k), _KEYS),
    st.builds(
        lambda k, exp: encode_fields(Op.EXPIRE, k, b"", exp),
        _KEYS,
        st.one_of(st.none(), st.integers(0, 10)),
    ),
    st.just(encode_fields(Op.FLUSH, b"")),
)
_RECORDS = st.lists(st.one_of(_SET, _OTHER), max_size=8)


@settings(DETERMINISTIC, max_examples=400)
@given(
    before=_RECORDS,
    group=st.one_of(
        st.lists(_SET, min_size=1, max_size=8),  # an MSET's: the inline path
        st.lists(st.one_of(_SET, _OTHER), min_size=1, max_size=8),
    ),
    after=_RECORDS,
)
def test_a_group_of_any_records_replays_as_they_would_expiries_and_order_included(
    before: list[bytes], group: list[bytes], after: list[bytes]
) -> None:
    # A group of SETs alone takes replay's inline path through scratch dicts
    # and is merged; any other group is applied record by record. Both must
    # leave what the records alone leave: values, expiries, and the order of
    # the keys (a store's insertion order: FIFO's, SCAN's); the order of the
    # expiries does not matter (the TTL index sorts them).
    head, body, tail = b"".join(before), b"".join(group), b"".join(after)
    grouped: tuple[dict[bytes, bytes], dict[bytes, int]] = ({}, {})
    plain: tuple[dict[bytes, bytes], dict[bytes, int]] = ({}, {})
    assert replay(head + encode_group(body) + tail, *grouped).problem is None
    assert replay(head + body + tail, *plain).problem is None
    assert grouped == plain
    assert list(grouped[0]) == list(plain[0])


@DETERMINISTIC
@given(before=PAIRS, group=PAIRS.filter(lambda p: len(p) > 1), cut=st.floats(0, 1))
def test_a_group_cut_anywhere_is_applied_not_at_all(
    before: list[tuple[bytes, bytes]], group: list[tuple[bytes, bytes]], cut: float
) -> None:
    head = sets(before)
    record = encode_group(sets(group))
    end = len(head) + int(cut * (len(record) - 1))  # at least one byte short
    data: dict[bytes, bytes] = {}
    result = replay((head + record)[:end], data, {})
    expected: dict[bytes, bytes] = {}
    replay(head, expected, {})
    assert data == expected  # what came before, none of the group
    assert result.end == len(head)
    if end > len(head):
        assert isinstance(result.problem, Torn)


def test_a_group_holding_a_mark_or_damaged_records_is_refused_whole() -> None:
    for inner in (encode_set(b"a", b"1") + encode_txn(7, True), encode_set(b"a", b"1")[:-1]):
        data: dict[bytes, bytes] = {}
        result = replay(encode_fields(Op.GROUP, b"", inner), data, {})
        assert isinstance(result.problem, Corrupt)
        assert data == {}
    data = {}
    result = replay(encode_group(sets([(b"a", b"1")])), data, {}, sets_only=True)  # a snapshot
    assert isinstance(result.problem, Corrupt)
    assert data == {}


def test_a_group_has_no_key_no_expiry_and_some_records() -> None:
    message = "a GROUP record has no key, some records and no expiry"
    with pytest.raises(ValueError, match=message):
        encode_group(b"")
    with pytest.raises(ValueError, match=message):
        encode_fields(Op.GROUP, b"k", sets([(b"a", b"1")]))
    with pytest.raises(ValueError, match=message):
        encode_fields(Op.GROUP, b"", sets([(b"a", b"1")]), 5)


def test_the_journal_groups_several_sets_and_falls_back_past_the_record_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = Journal()
    journal.set_many([(b"a", b"1")])
    assert journal.take() == encode_set(b"a", b"1")  # one pair: no group needed
    pairs = [(b"a", b"1"), (b"b", b"2")]
    journal.set_many(pairs)
    assert journal.take() == encode_group(sets(pairs))
    monkeypatch.setattr(durability, "MAX_PAYLOAD", len(sets(pairs)))  # too big for one record
    journal.set_many(pairs)
    assert journal.take() == sets(pairs)


async def cut_everywhere(
    tmp_path: Path,
    setup: Callable[[kvmemo.Store], Awaitable[object]],
    write: Callable[[kvmemo.Store], Awaitable[object]],
) -> list[dict[bytes, bytes]]:
    """What recovery brings back of a 1-shard ``always`` store's log cut at every byte of ``write``.

    ``setup`` runs first (its records stay whole); the log is copied while
    the store runs (its close would snapshot). One state per cut, in order:
    the first is before ``write``, the last after all of it.
    """
    data_dir, copy = tmp_path / "data", tmp_path / "copy"
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir), appendfsync="always") as kv:
        await setup(kv)
        shard = data_dir / "shard-0"
        ((_, segment),) = list_segments(shard)
        start = segment.stat().st_size
        await write(kv)
        end = segment.stat().st_size
        shutil.copytree(shard, copy)
    log = copy / segment.name
    whole = log.read_bytes()
    now_ms = int(time.time() * 1000)
    states = []
    for cut in range(start, end + 1):
        log.write_bytes(whole[:cut])
        got = await trio.to_thread.run_sync(lambda: recover(copy, now_ms=now_ms))
        states.append(got.data)
    return states


async def test_a_torn_one_shard_mset_comes_back_whole_or_not_at_all(tmp_path: Path) -> None:
    keys = [f"{{t}}k{i}".encode() for i in range(5)]
    states = await cut_everywhere(
        tmp_path,
        lambda kv: kv.set("before", "x"),
        lambda kv: kv.mset(dict.fromkeys(keys, "new")),
    )
    assert len(states) > 5 * 17  # the five SETs went in, as one write
    for data in states:
        assert data[b"before"] == b"x"
        assert [data.get(k) for k in keys] in ([None] * 5, [b"new"] * 5)
    assert states[0].get(keys[0]) is None
    assert states[-1].get(keys[0]) == b"new"


async def test_a_torn_rename_on_one_shard_leaves_its_source_or_its_target(tmp_path: Path) -> None:
    states = await cut_everywhere(
        tmp_path,
        lambda kv: kv.set("{t}src", "v"),
        lambda kv: kv.execute("rename", "{t}src", "{t}dst"),
    )
    for data in states:
        assert (data.get(b"{t}src"), data.get(b"{t}dst")) in ((b"v", None), (None, b"v"))
    assert states[-1].get(b"{t}dst") == b"v"


async def test_a_torn_one_shard_transaction_comes_back_whole_or_not_at_all(
    tmp_path: Path,
) -> None:
    async def setup(kv: kvmemo.Store) -> None:
        await kv.mset({"{t}a": "0", "{t}c": "0"})

    states = await cut_everywhere(
        tmp_path,
        setup,
        lambda kv: kv.transaction(
            ("set", "{t}a", "1"), ("mset", "{t}b", "1", "{t}d", "1"), ("del", "{t}c")
        ),
    )
    old = {b"{t}a": b"0", b"{t}c": b"0"}
    new = {b"{t}a": b"1", b"{t}b": b"1", b"{t}d": b"1"}
    for data in states:
        assert data in (old, new)
    assert states[-1] == new


def test_a_group_holding_a_group_is_refused_whole_however_deep() -> None:
    nested = encode_group(sets([(b"b", b"2")]) + encode_txn(7, True))
    data: dict[bytes, bytes] = {}
    result = replay(encode_group(sets([(b"a", b"1")]) + nested), data, {})
    assert isinstance(result.problem, Corrupt)
    assert data == {}  # not even the SET before the inner group
    deep = sets([(b"a", b"1")])
    for _ in range(1200):  # no recursion: refused at the first level
        deep = encode_group(deep)
    result = replay(deep, data, {})
    assert isinstance(result.problem, Corrupt)
    assert data == {}


def test_grouping_entries_unwraps_the_groups_among_them() -> None:
    journal = Journal()
    journal.set(b"x", b"0", None)
    mark = len(journal.records)
    journal.set(b"x", b"1", None)
    journal.set_many([(b"a", b"1"), (b"b", b"2")])  # a transaction's MSET step: a group
    journal.delete(b"c")
    journal.group_since(mark)
    inner = sets([(b"x", b"1"), (b"a", b"1"), (b"b", b"2")]) + encode_fields(Op.DEL, b"c")
    assert journal.take() == encode_set(b"x", b"0") + encode_group(inner)
    assert group_contents(encode_group(inner)) == inner
    assert group_contents(inner) is None


def test_an_intent_section_with_a_bad_group_is_refused() -> None:
    bad = encode_group(sets([(b"a", b"1")]) + encode_txn(3, True))
    with pytest.raises(ValueError, match="a TXN record inside a GROUP record in an intent section"):
        intent_sections(intent_value([(0, bad)]))
    good = encode_group(sets([(b"a", b"1"), (b"b", b"2")]))
    assert intent_sections(intent_value([(0, good)])) == {0: good}


def intent_value(sections: list[tuple[int, bytes]]) -> bytes:
    """The value of an INTENT record holding ``sections`` (as encode_intent lays it out)."""
    return b"".join(struct.pack("<II", shard, len(r)) + r for shard, r in sections)


async def test_a_torn_del_of_several_keys_on_one_shard_comes_back_whole_or_not_at_all(
    tmp_path: Path,
) -> None:
    keys = [f"{{t}}{c}" for c in "abc"]
    states = await cut_everywhere(
        tmp_path,
        lambda kv: kv.mset(dict.fromkeys(keys, "v")),
        lambda kv: kv.delete(*keys),
    )
    for data in states:
        assert [data.get(k.encode()) for k in keys] in ([b"v"] * 3, [None] * 3)
    assert states[-1] == {}
