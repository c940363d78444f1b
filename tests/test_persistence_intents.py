"""The intent log: a multi-shard write comes back whole after a crash cut it off.

The crash states are built on disk directly (shard log segments and intent
segments, as the store writes them), then a store is opened on them: every
case of :func:`kvmemo.persistence.intents.plan_redo` is reached
deterministically, without killing a process (tests/test_persistence_torn.py
does that under load).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import kvmemo
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence import Op, Scanner, SegmentedLog, encode_fields, encode_set, replay
from kvmemo.persistence.intents import (
    INTENT_DIR,
    IntentLog,
    IntentScan,
    ShardMarks,
    plan_redo,
    read_intents,
)
from kvmemo.persistence.records import encode_intent, encode_txn, intent_sections
from kvmemo.storage.durable_shard import PersistenceConfig, durable_state_factory, recover_store
from kvmemo.storage.slots import SlotMap
from kvmemo.storage.store import ShardStore

SHARDS = 2


def keys_on_each_shard() -> tuple[bytes, bytes]:
    """A key of shard 0 and a key of shard 1 (of a 2-shard store)."""
    slots = SlotMap(SHARDS)
    found: dict[int, bytes] = {}
    i = 0
    while len(found) < SHARDS:
        key = b"key%d" % i
        found.setdefault(slots.shard_of(key), key)
        i += 1
    return found[0], found[1]


K0, K1 = keys_on_each_shard()


def write_shard_log(data_dir: Path, shard: int, records: bytes) -> None:
    with SegmentedLog(data_dir / f"shard-{shard}") as log:
        log.append_encoded(records)
        log.sync()


def write_intents(data_dir: Path, *intents: tuple[int, list[tuple[int, bytes]]]) -> None:
    log = IntentLog(data_dir)
    try:
        for txid, sections in intents:
            log.append(txid, sections)
        log.sync()
    finally:
        log.close()


def crash_state(data_dir: Path, *, shard0: bytes, shard1: bytes, intents: bytes = b"") -> None:
    """Shard logs that both hold the old values, then ``shard0``/``shard1``; an intent segment."""
    write_shard_log(data_dir, 0, encode_set(K0, b"old") + shard0)
    write_shard_log(data_dir, 1, encode_set(K1, b"old") + shard1)
    if intents:
        directory = data_dir / INTENT_DIR
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "wal-00000001.log").write_bytes(intents)


ROUND_7 = [(0, encode_set(K0, b"new")), (1, encode_set(K1, b"new"))]


async def values(data_dir: Path) -> tuple[bytes | None, bytes | None]:
    with trio.fail_after(30):
        async with kvmemo.open_store(shards=SHARDS, data_dir=str(data_dir)) as kv:
            return await kv.get(K0), await kv.get(K1)


# -- the codec ----------------------------------------------------------------------------


def test_an_intent_holds_each_shards_effect_records() -> None:
    sections = [
        (3, encode_set(b"a", b"1") + encode_fields(Op.DEL, b"b")),
        (9, encode_set(b"c", b"")),
    ]
    (op, key, value, expires), *_ = list(Scanner(encode_intent(42, sections)))
    assert op == Op.INTENT
    assert int.from_bytes(key, "little") == 42
    assert expires is None
    assert intent_sections(value) == dict(sections)
    assert intent_sections(b"") == {}  # an abort


@given(st.binary(max_size=64))
def test_intent_sections_refuse_every_malformed_value(value: bytes) -> None:
    try:
        sections = intent_sections(value)
    except ValueError:
        return
    for records in sections.values():  # whatever is accepted is whole valid records
        scanner = Scanner(records)
        assert all(op not in (Op.TXN, Op.INTENT) for op, *_ in scanner)
        assert scanner.problem is None


def test_txn_marks_change_no_key_and_are_reported_by_replay() -> None:
    data: dict[bytes, bytes] = {}
    marks: dict[int, bool] = {}
    buf = encode_set(b"k", b"v") + encode_txn(5, True) + encode_txn(6, False)
    result = replay(buf, data, {}, marks=marks)
    assert result.problem is None
    assert result.count == 3
    assert data == {b"k": b"v"}
    assert marks == {5: True, 6: False}


def test_an_intent_record_in_a_shard_log_is_corruption() -> None:
    result = replay(encode_intent(1, ROUND_7), {}, {})
    assert result.problem is not None
    assert "INTENT" in getattr(result.problem, "reason", "")


def test_a_txn_record_has_an_eight_byte_txid_and_an_outcome_byte() -> None:
    with pytest.raises(ValueError, match="TXN"):
        encode_fields(Op.TXN, b"short", b"\x01")
    with pytest.raises(ValueError, match="TXN"):
        encode_fields(Op.TXN, bytes(8), b"\x02")


# -- the plan ------------------------------------------------------------------------------


def plan(
    intents: dict[int, dict[int, bytes]], marks: dict[int, tuple[dict[int, bool], int]]
) -> dict[int, list[int]]:
    scan = IntentScan(intents, max(intents, default=0))
    shards = {s: ShardMarks(m, last) for s, (m, last) in marks.items()}
    return {s: [t for t, _ in rounds] for s, rounds in plan_redo(scan, shards).items()}


def test_plan_redoes_a_round_on_the_shards_whose_log_ends_before_it() -> None:
    both = {7: dict(ROUND_7)}
    assert plan(both, {0: ({7: True}, 7), 1: ({}, 0)}) == {1: [7]}
    assert plan(both, {0: ({}, 3), 1: ({}, 6)}) == {0: [7], 1: [7]}  # neither wrote it: whole
    assert plan(both, {0: ({7: True}, 7), 1: ({7: True}, 7)}) == {}  # both have it
    assert plan(both, {0: ({}, 9), 1: ({}, 0)}) == {1: [7]}  # shard 0 is past it (a head mark)


def test_plan_redoes_nothing_of_an_aborted_round() -> None:
    assert plan({7: dict(ROUND_7)}, {0: ({7: False}, 7), 1: ({}, 0)}) == {}
    assert plan({7: {}}, {0: ({}, 0), 1: ({}, 0)}) == {}  # the engine recorded the abort


# -- recovery, through a store -------------------------------------------------------------


async def test_a_shard_missing_its_part_gets_it_back_and_keeps_it(tmp_path: Path) -> None:
    crash_state(
        tmp_path,
        shard0=encode_set(K0, b"new") + encode_txn(7, True),
        shard1=b"",  # the crash came before shard 1 appended its part
        intents=encode_intent(7, ROUND_7),
    )
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(tmp_path)) as kv:
        assert (await kv.get(K0), await kv.get(K1)) == (b"new", b"new")
        info = (await kv.info("persistence"))["persistence"]
        assert info["intents_redone_at_start"] == 1  # shard 1's part of round 7
        assert info["last_txid"] == 7
        assert info["intent_log_bytes"] > 0  # the record of the txid reached
    # The redo was logged by shard 1 and the intent log restarted: a second
    # start (even one that loses the intent log) finds the same state.
    assert await values(tmp_path) == (b"new", b"new")
    for path in (tmp_path / INTENT_DIR).iterdir():
        path.unlink()
    assert await values(tmp_path) == (b"new", b"new")


async def test_a_round_no_shard_wrote_is_redone_whole(tmp_path: Path) -> None:
    crash_state(tmp_path, shard0=b"", shard1=b"", intents=encode_intent(7, ROUND_7))
    assert await values(tmp_path) == (b"new", b"new")


async def test_an_aborted_round_is_not_redone(tmp_path: Path) -> None:
    crash_state(
        tmp_path,
        shard0=encode_txn(7, False),
        shard1=b"",
        intents=encode_intent(7, ROUND_7),
    )
    assert await values(tmp_path) == (b"old", b"old")
    crash_state(
        tmp_path / "b",
        shard0=b"",
        shard1=b"",
        intents=encode_intent(7, ROUND_7) + encode_intent(7, []),
    )
    assert await values(tmp_path / "b") == (b"old", b"old")


async def test_a_torn_intent_was_never_decided(tmp_path: Path) -> None:
    torn = encode_intent(7, ROUND_7)
    crash_state(tmp_path, shard0=b"", shard1=b"", intents=torn[: len(torn) - 3])
    assert await values(tmp_path) == (b"old", b"old")


async def test_every_retained_round_a_log_lacks_is_redone_in_order(tmp_path: Path) -> None:
    # Shard 1's log ends before round 6 (a request timeout released the
    # writer lock before its part was logged, then round 7 ran): both redone.
    crash_state(
        tmp_path,
        shard0=encode_set(K0, b"new") + encode_txn(7, True),
        shard1=b"",
        intents=encode_intent(6, [(0, encode_set(K0, b"six")), (1, encode_set(K1, b"six"))])
        + encode_intent(7, [(0, encode_set(K0, b"new")), (1, encode_set(K1, b"seven"))]),
    )
    assert await values(tmp_path) == (b"new", b"seven")


async def test_a_shard_past_a_round_does_not_redo_it(tmp_path: Path) -> None:
    # Shard 1's log opens with a later mark (its snapshot covered round 6),
    # then holds a later write: redoing round 6 would undo it.
    crash_state(
        tmp_path,
        shard0=encode_set(K0, b"six") + encode_txn(6, True),
        shard1=encode_txn(6, True) + encode_set(K1, b"later"),
        intents=encode_intent(6, [(0, encode_set(K0, b"six")), (1, encode_set(K1, b"six"))]),
    )
    assert await values(tmp_path) == (b"six", b"later")


async def test_txids_keep_increasing_across_restarts(tmp_path: Path) -> None:
    crash_state(tmp_path, shard0=encode_txn(41, True), shard1=b"")
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(tmp_path)) as kv:
        await kv.mset({K0: b"a", K1: b"b"})
    scan = read_intents(tmp_path)
    assert scan.last_txid > 41


async def test_a_snapshot_keeps_the_newest_mark_of_its_shard(tmp_path: Path) -> None:
    """A graceful stop snapshots each shard: its new segment opens with the newest mark."""
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(tmp_path)) as kv:
        await kv.mset({K0: b"a", K1: b"b"})
        last = read_intents(tmp_path).last_txid
        assert last >= 1
    for shard in range(SHARDS):
        marks: dict[int, bool] = {}
        for segment in sorted((tmp_path / f"shard-{shard}").glob("wal-*.log")):
            replay(segment.read_bytes(), {}, {}, marks=marks)
        assert max(marks) == last, f"shard-{shard} lost its newest mark in its snapshot"


async def test_multi_shard_writes_are_logged_as_intents_and_marked_by_each_shard(
    tmp_path: Path,
) -> None:
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(tmp_path), appendfsync="always") as kv:
        await kv.mset({K0: b"a", K1: b"b"})
        await kv.execute("RENAME", K0, b"moved-" + K1)  # may or may not cross shards
        await kv.set(K0, b"single")  # one shard: no intent
        scan = read_intents(tmp_path)
        assert scan.intents, "the MSET over two shards wrote an intent"
        sections = scan.intents[min(t for t in scan.intents if scan.intents[t])]
        assert set(sections) == {0, 1}
        got: dict[bytes, bytes] = {}
        for records in sections.values():
            replay(records, got, {})
        assert got == {K0: b"a", K1: b"b"}


@given(
    before=st.lists(
        st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=8), st.booleans()),
        max_size=6,
    ),
    items=st.lists(
        st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=8)), min_size=1, max_size=6
    ),
)
def test_a_part_journals_the_records_its_intent_holds(
    before: list[tuple[bytes, bytes, bool]], items: list[tuple[bytes, bytes]]
) -> None:
    """The shard journals the intent's encoded records as they are: same log, same state."""
    from kvmemo.commands.ops import MSet
    from kvmemo.eviction.memory import MemoryTracker
    from kvmemo.eviction.policies import make_policy
    from kvmemo.storage.durability import Journal
    from kvmemo.storage.store import ShardStore

    logs, states = [], []
    for via_intent in (False, True):
        store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
        for key, value, volatile in before:
            store.put(key, value, 0.0, expires_at=100.0 if volatile else None)
        store.journal = Journal()
        part = MSet(items, only_new=False).part(list(range(len(items))))
        assert part.prepare(store, 1.0) is True
        if via_intent:
            assert part.effects(0.0) is not None
        part.commit(store, 1.0)
        assert store.check_invariants()
        logs.append(store.journal.take())
        states.append((store.data, store.expires, store.used))
    assert logs[0] == logs[1]
    assert states[0] == states[1]


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_a_transaction_writing_two_shards_logs_its_effects_as_an_intent(
    tmp_path: Path, appendfsync: str
) -> None:
    """A transaction's effects are known once it ran: its intent comes after, before any log."""
    async with kvmemo.open_store(
        shards=SHARDS, data_dir=str(tmp_path), appendfsync=appendfsync
    ) as kv:
        await kv.set(K1, b"5")
        results = await kv.transaction(("SET", K0, b"x"), ("INCR", K1), ("GET", K0))
        assert results == ["OK", 6, b"x"]
        scan = read_intents(tmp_path)
        sections = scan.intents[scan.last_txid]
        assert set(sections) == {0, 1}
        got: dict[bytes, bytes] = {}
        for records in sections.values():
            replay(records, got, {})
        assert got == {K0: b"x", K1: b"6"}  # the INCR's effect, as a SET of its result
        # Each shard marked the round after its part, in its own log.
        await kv.execute("SAVE")
    for shard in range(SHARDS):
        marks: dict[int, bool] = {}
        for segment in sorted((tmp_path / f"shard-{shard}").glob("wal-*.log")):
            replay(segment.read_bytes(), {}, {}, marks=marks)
        assert marks.get(scan.last_txid) is True


async def test_a_transaction_reading_one_shard_and_writing_another_needs_no_intent(
    tmp_path: Path,
) -> None:
    async with kvmemo.open_store(shards=SHARDS, data_dir=str(tmp_path)) as kv:
        before = read_intents(tmp_path).last_txid
        assert await kv.transaction(("GET", K0), ("SET", K1, b"y")) == [None, "OK"]
        assert read_intents(tmp_path).last_txid == before


async def test_a_transactions_cut_off_part_is_redone(tmp_path: Path) -> None:
    crash_state(
        tmp_path,
        shard0=b"",
        shard1=encode_set(K1, b"6") + encode_txn(3, True),
        intents=encode_intent(3, [(0, encode_set(K0, b"x")), (1, encode_set(K1, b"6"))]),
    )
    assert await values(tmp_path) == (b"x", b"6")


# -- retention, and the rounds that end oddly -----------------------------------------------


def test_the_log_keeps_every_intent_not_yet_settled_across_rotations(tmp_path: Path) -> None:
    record = encode_set(K0, b"v")
    log = IntentLog(tmp_path, rotate_bytes=1)  # every append rotates first
    try:
        for txid in range(1, 6):
            log.append(txid, [(0, record), (1, record)], settled=2)
        assert sorted(read_intents(tmp_path).intents) == [3, 4, 5]  # 1 and 2 settled: gone
        log.append(6, [(0, record), (1, record)], settled=5)
        assert sorted(read_intents(tmp_path).intents) == [6]
    finally:
        log.close()


def rebuilt_after_round_7(tmp_path: Path) -> tuple[ShardStore, PersistenceConfig]:
    """Shard 0 about to be rebuilt after round 7: shard 1's log holds its part, shard 0 none.

    Its journal, dropped by the rebuild, held its part; the round's mark is kept.
    """
    crash_state(
        tmp_path,
        shard0=b"",  # the rebuild dropped its journal: its part never reached the log
        shard1=encode_set(K1, b"new") + encode_txn(7, True),
        intents=encode_intent(7, ROUND_7),
    )
    config = PersistenceConfig(tmp_path)
    initial, _, _ = durable_state_factory(
        0, MemoryTracker(0, 1), lambda: make_policy("lru"), config, {}
    )
    store = initial()
    assert store.journal is not None
    store.journal.mark(7, True)  # kept by the rebuild: its part was dropped with the journal
    return store, config


async def test_a_rebuilt_shard_redoes_its_part_of_a_retained_round(tmp_path: Path) -> None:
    """A runtime rebuild (memory not trusted) reloads from disk and redoes what its log lacks."""
    store, config = rebuilt_after_round_7(tmp_path)
    warnings = await recover_store(store, config, repair=True)
    assert store.get(K0, trio.current_time()) == b"new"
    assert store.journal.last_txid == 7
    # The redo waits in the journal, first: the next append logs it, and its
    # mark keeps the intent until then.
    assert store.durability is not None
    assert store.durability.unsettled() == 7
    marks: dict[int, bool] = {}
    got: dict[bytes, bytes] = {}
    replay(store.journal.take(), got, {}, marks=marks)
    assert got == {K0: b"new"}
    assert marks == {7: True}
    assert any("redid" in w for w in warnings)


async def test_a_rebuilt_shard_does_not_redo_a_round_it_had_aborted(tmp_path: Path) -> None:
    from kvmemo.eviction.memory import MemoryTracker
    from kvmemo.eviction.policies import make_policy
    from kvmemo.storage.durable_shard import PersistenceConfig, durable_state_factory, recover_store

    crash_state(tmp_path, shard0=b"", shard1=b"", intents=encode_intent(7, ROUND_7))
    config = PersistenceConfig(tmp_path)
    tracker = MemoryTracker(0, 1)
    initial, _, _ = durable_state_factory(0, tracker, lambda: make_policy("lru"), config, {})
    store = initial()
    assert store.journal is not None
    store.journal.mark(7, False)  # its abort, journalled but not logged when it was rebuilt
    await recover_store(store, config, repair=True)
    assert store.get(K0, trio.current_time()) == b"old"


def test_a_failed_append_puts_the_whole_batch_back_first(tmp_path: Path) -> None:
    """A log that holds a round's mark must hold its part: the failed batch is retried whole."""
    from kvmemo.persistence import AppendFsync
    from kvmemo.storage.durability import ShardDurability

    (tmp_path / "file").write_bytes(b"")
    directory = tmp_path / "file" / "shard-0"  # under a file: cannot be created
    dur = ShardDurability(
        directory, AppendFsync.EVERYSEC, segment_bytes=1 << 20, snapshot_bytes=1 << 30
    )
    dur.journal.set(K0, b"part", None)
    dur.journal.mark(7, True)
    with pytest.raises(NotADirectoryError):
        dur.append()
    assert dur.unsettled() == 7
    dur.journal.set(K1, b"later", None)
    marks: dict[int, bool] = {}
    got: dict[bytes, bytes] = {}
    data = dur.journal.take()
    replay(data, got, {}, marks=marks)
    assert got == {K0: b"part", K1: b"later"}
    assert marks == {7: True}
    assert data.index(K0) < data.index(K1)


async def test_a_round_aborted_by_a_hold_timeout_never_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose hold timed out aborted the round before the engine woke: no intent then.

    Shard 1's prepare blocks the event loop past shard 0's hold timeout; the
    engine and shard 0 then race to wake. A copy of the data directory taken
    right after any intent's write (what a kill -9 leaves) must recover to
    what the live store answered: the new values only if the MSET succeeded.
    """
    import shutil
    import time

    from kvmemo.commands import ops

    hold = 0.05
    real_prepare = ops._MSetPart.prepare
    real_append = IntentLog.append

    def slow_prepare(self: ops._MSetPart, store: object, now: float) -> object:
        if getattr(store, "shard_id", None) == 1 and self.items == [(K1, b"new")]:
            time.sleep(hold * 1.5)
        return real_prepare(self, store, now)  # type: ignore[arg-type]

    for attempt in range(6):
        data_dir = tmp_path / f"d{attempt}"
        crashed = tmp_path / f"crashed{attempt}"

        def append(
            self: IntentLog,
            txid: int,
            sections: list[tuple[int, bytes]],
            settled: int = 0,
            data_dir: Path = data_dir,
            crashed: Path = crashed,
        ) -> None:
            real_append(self, txid, sections, settled)
            if sections and not crashed.exists():
                shutil.copytree(data_dir, crashed)

        monkeypatch.setattr(ops._MSetPart, "prepare", slow_prepare)
        monkeypatch.setattr(IntentLog, "append", append)
        async with kvmemo.open_store(
            shards=SHARDS, data_dir=str(data_dir), hold_timeout=hold
        ) as kv:
            try:
                await kv.mset({K0: b"new", K1: b"new"})
                committed = True
            except kvmemo.KVMemoError:
                committed = False
            live = (await kv.get(K0), await kv.get(K1))
        monkeypatch.undo()
        assert live == ((b"new", b"new") if committed else (None, None))
        if crashed.exists():
            assert await values(crashed) == live, f"attempt {attempt}: committed={committed}"
        else:
            assert not committed
