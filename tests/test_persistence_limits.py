"""Size limits and the log's record limit agree: every write the limits allow can be logged.

A SET is logged as one record, whose payload is bounded (``MAX_PAYLOAD``, a
length above it reads as damage). Before, ``max_key_size`` and
``max_value_size`` were not checked against it: with persistence on, a
value the limits allowed but no record could hold made the shard crash in
the middle of the write (its memory changed, its log not). Now the
configuration refuses such limits, and a multi-shard write whose intent
would not fit in one record is refused before anything is applied.

The record limit is 2 GiB; the tests that write lower it (the encoder and
the configuration read it at call time), so no test needs gigabytes.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import trio

import kvmemo
from kvmemo.config import StoreConfig
from kvmemo.engine import engine as engine_module
from kvmemo.errors import KVMemoError, TooLargeError
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence import records
from kvmemo.persistence.records import MIN_PAYLOAD
from kvmemo.storage import durability
from kvmemo.storage.durability import Journal
from kvmemo.storage.store import ShardStore

LIMIT = 4096  # the record payload limit the writing tests use
KEY_SIZE = 64


def test_the_default_limits_fit_one_record(tmp_path: Path) -> None:
    config = StoreConfig(data_dir=str(tmp_path))
    assert config.max_key_size + config.max_value_size <= records.max_entry_bytes()


def test_limits_over_one_record_are_refused_with_persistence_on(tmp_path: Path) -> None:
    entry = records.MAX_PAYLOAD - MIN_PAYLOAD
    message = (
        f"max_key_size + max_value_size must be <= {entry} bytes with persistence on"
        f" (one log record), got {512 * 1024 * 1024} + {2 * 1024**3}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        StoreConfig(data_dir=str(tmp_path), max_value_size="2GiB")
    # The largest sum is accepted; without persistence nothing limits it.
    StoreConfig(data_dir=str(tmp_path), max_key_size=1024, max_value_size=entry - 1024)
    StoreConfig(max_value_size="4GiB")


def test_the_largest_set_the_limits_allow_is_one_valid_record() -> None:
    key = b"k" * KEY_SIZE
    value = b"v" * (records.max_entry_bytes() - KEY_SIZE)
    # Not encoded for real (2 GiB): its payload is exactly the limit.
    assert MIN_PAYLOAD + len(key) + len(value) == records.MAX_PAYLOAD


@pytest.fixture
def small_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record limit of LIMIT bytes for the encoder, configuration, journal and engine."""
    monkeypatch.setattr(records, "MAX_PAYLOAD", LIMIT)
    monkeypatch.setattr(engine_module, "MAX_PAYLOAD", LIMIT)
    monkeypatch.setattr(durability, "MAX_PAYLOAD", LIMIT)  # groups fall back past it


@pytest.mark.usefixtures("small_records")
async def test_writes_at_the_limits_are_logged_and_survive_a_restart(tmp_path: Path) -> None:
    value_size = LIMIT - MIN_PAYLOAD - KEY_SIZE
    settings = {
        "shards": 2,
        "data_dir": str(tmp_path),
        "appendfsync": "always",
        "max_key_size": KEY_SIZE,
        "max_value_size": value_size,
    }
    key = b"k" * KEY_SIZE
    with trio.fail_after(30):
        async with kvmemo.open_store(**settings) as kv:
            assert await kv.set(key, b"v" * value_size) == "OK"
            assert await kv.append(key, b"") == value_size
            with pytest.raises(KVMemoError) as info:
                await kv.append(key, b"x")  # one byte over max_value_size
            assert info.value.kind == "TOO_LARGE"
            assert [a["state"] for a in kv.actors()].count("running") == len(kv.actors())
            assert all(a["restarts"] == 0 for a in kv.actors())
        async with kvmemo.open_store(**settings) as kv:
            assert await kv.get(key) == b"v" * value_size


@pytest.mark.usefixtures("small_records")
def test_limits_over_the_lowered_record_are_refused(tmp_path: Path) -> None:
    # What used to crash a shard: a value the limits allow but no record holds.
    with pytest.raises(ValueError, match=r"^max_key_size \+ max_value_size must be <= 4079 "):
        StoreConfig(data_dir=str(tmp_path), max_key_size=KEY_SIZE, max_value_size=LIMIT)


@pytest.mark.usefixtures("small_records")
async def test_a_multi_shard_write_over_the_intent_limit_is_refused_and_applies_nothing(
    tmp_path: Path,
) -> None:
    value_size = 1500  # each pair fits a record; three of them do not fit one intent
    with trio.fail_after(30):
        async with kvmemo.open_store(
            shards=4,
            data_dir=str(tmp_path),
            appendfsync="always",
            max_key_size=KEY_SIZE,
            max_value_size=value_size,
        ) as kv:
            keys = [f"{{a}}big{i}" for i in range(2)] + ["{b}big", "{c}big"]
            pairs = [(k, "v" * value_size) for k in keys]
            with pytest.raises(KVMemoError) as info:
                await kv.mset(pairs)
            assert info.value.kind == "TOO_LARGE"
            assert info.value.data["applied"] is False
            assert await kv.mget(*keys) == [None] * len(keys)
            # A smaller multi-shard write still goes through, logged with its intent.
            assert await kv.mset([("{b}small", "1"), ("{c}small", "2")]) == "OK"
            assert all(a["restarts"] == 0 for a in kv.actors())


@pytest.mark.usefixtures("small_records")
async def test_a_transaction_over_the_intent_limit_is_applied_and_logged_per_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A transaction's effects are known only once it ran: it is not refused;
    # each shard logs its part, and the lost cross-shard atomicity is said.
    value = "v" * 1500
    settings = {
        "shards": 4,
        "data_dir": str(tmp_path),
        "appendfsync": "always",
        "max_key_size": KEY_SIZE,
        "max_value_size": 1500,
    }
    keys = ["{a}t1", "{a}t2", "{b}t"]
    with trio.fail_after(30):
        async with kvmemo.open_store(**settings) as kv:
            results = await kv.transaction(*[("SET", k, value) for k in keys])
            assert results == ["OK"] * len(keys)
        assert "over the intent log's record limit" in caplog.text
        async with kvmemo.open_store(**settings) as kv:
            assert await kv.mget(*keys) == [value.encode()] * len(keys)


@pytest.mark.usefixtures("small_records")
@pytest.mark.parametrize("ttl", [None, 100.0])
def test_a_write_no_record_holds_is_refused_before_the_store_changes(ttl: float | None) -> None:
    # Defence in depth: the limits keep every write under one record, but if
    # one ever is not, the store refuses it whole instead of crashing half-way.
    store = ShardStore(0, make_policy("lru"), MemoryTracker(1 << 30, 1))
    store.journal = Journal()
    store.put(b"k", b"old", 0.0, expires_at=None)
    before = (dict(store.data), dict(store.expires), store.used, list(store.journal.records))
    big = b"v" * LIMIT
    write = (
        partial(store.put_plain, b"k", big, 0.0)
        if ttl is None
        else partial(store.put, b"k", big, 0.0, expires_at=ttl)
    )
    with pytest.raises(TooLargeError, match="does not fit one log record"):
        write()
    assert (dict(store.data), dict(store.expires), store.used, store.journal.records) == before
    assert store.check_invariants()
