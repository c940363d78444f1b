"""GROUP records: the effects of one command on one shard, replayed all or none.

An MSET whose keys live on one shard is one message and one journal entry:
its SETs go to the log as one ``GROUP`` record, whose CRC covers them all,
so a crash that tears the write (a power loss under ``always``, dropped
pages under ``everysec``) never brings back part of it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given
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


async def test_a_torn_one_shard_mset_comes_back_whole_or_not_at_all(tmp_path: Path) -> None:
    """The log of a real store, cut at every byte of an MSET's write: all of its keys or none."""
    data_dir, copy = tmp_path / "data", tmp_path / "copy"
    keys = [f"{{t}}k{i}" for i in range(5)]
    async with kvmemo.open_store(shards=1, data_dir=str(data_dir), appendfsync="always") as kv:
        await kv.set("before", "x")
        shard = data_dir / "shard-0"
        ((_, segment),) = list_segments(shard)
        start = segment.stat().st_size
        await kv.mset(dict.fromkeys(keys, "new"))
        end = segment.stat().st_size
        shutil.copytree(shard, copy)  # the log as the MSET left it (the close snapshots)
    assert end - start > 5 * 17  # the five SETs went in, as one write
    log = copy / segment.name
    whole = log.read_bytes()
    now_ms = int(time.time() * 1000)
    seen = set()
    for cut in range(start, end + 1):
        log.write_bytes(whole[:cut])
        got = await trio.to_thread.run_sync(lambda: recover(copy, now_ms=now_ms))
        assert got.data[b"before"] == b"x"
        values = [got.data.get(k.encode()) for k in keys]
        assert values in ([None] * 5, [b"new"] * 5), cut
        seen.add(values[0])
    assert seen == {None, b"new"}
