"""BGSAVE and the Redis port's INFO persistence section.

BGSAVE asks every shard for a snapshot and answers once each shard has
copied its dicts, while the snapshots are written in the background. To
hold a snapshot "in progress" deterministically, the snapshot writer is
gated on a ``threading.Event`` (it runs in a worker thread); no test sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_resp_server import Client, running

import kvmemo
from kvmemo.errors import KVMemoError
from kvmemo.storage import durable_shard

TIMEOUT = 30  # seconds per test


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Snapshot writes wait until the returned event is set (set at teardown anyway)."""
    event = threading.Event()
    write: Callable[..., Any] = durable_shard.write_snapshot

    def gated(*args: Any, **kwargs: Any) -> Any:
        event.wait(TIMEOUT)
        return write(*args, **kwargs)

    monkeypatch.setattr(durable_shard, "write_snapshot", gated)
    yield event
    event.set()


async def finish_bgsave(kv: kvmemo.Store) -> None:
    """Wait for the last BGSAVE's snapshots (the engine's tickets) to be durable."""
    for ticket in kv.engine._bgsave:
        await ticket.done.wait()


async def test_bgsave_without_persistence_is_disabled() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        for call in (("bgsave",), ("bgsave", "schedule")):
            with pytest.raises(KVMemoError) as info:
                await kv.execute(*call)
            assert info.value.kind == "DISABLED"
        assert (await kv.info("persistence"))["persistence"] == {"enabled": False}


async def test_bgsave_arguments_are_checked_as_redis_does() -> None:
    async with kvmemo.open_store(shards=2) as kv:
        for call in (("bgsave", "now"), ("bgsave", "schedule", "x")):
            with pytest.raises(KVMemoError) as info:
                await kv.execute(*call)
            assert (info.value.kind, info.value.message) == ("SYNTAX", "syntax error")


async def test_bgsave_answers_at_once_and_snapshots_every_shard(
    tmp_path: Path, gate: threading.Event
) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
            await kv.mset({f"k{i}": f"v{i}" for i in range(100)})
            before = (await kv.info("persistence"))["persistence"]
            assert before["bgsave_in_progress"] is False
            assert before["last_bgsave_status"] is None  # no BGSAVE yet
            assert await kv.execute("bgsave") == "Background saving started"
            during = (await kv.info("persistence"))["persistence"]
            assert during["bgsave_in_progress"] is True
            assert during["last_bgsave_status"] is None
            # While it runs: BGSAVE and SAVE are refused, as Redis refuses them.
            for call in (("bgsave",), ("save",)):
                with pytest.raises(KVMemoError) as info:
                    await kv.execute(*call)
                assert info.value.message == "Background save already in progress"
            await kv.set("late", "x")  # the shards keep serving meanwhile
            gate.set()
            await finish_bgsave(kv)
            after = (await kv.info("persistence"))["persistence"]
            assert after["bgsave_in_progress"] is False
            assert after["last_bgsave_status"] == "ok"
            assert after["last_save"] is not None
            assert await kv.lastsave() == int(after["last_save"])
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path)) as kv:
            assert await kv.dbsize() == 101
            assert await kv.get("k7") == b"v7"


async def test_bgsave_schedule_queues_the_next_snapshot_behind_the_running_one(
    tmp_path: Path, gate: threading.Event
) -> None:
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=2, data_dir=str(tmp_path)) as kv:
            await kv.set("a", "1")
            assert await kv.execute("bgsave", "SCHEDULE") == "Background saving started"
            await kv.set("b", "2")
            assert await kv.execute("bgsave", "schedule") == "Background saving scheduled"
            gate.set()
            await finish_bgsave(kv)  # the scheduled snapshots: they hold "b"
            persistence = (await kv.info("persistence"))["persistence"]
            assert persistence["last_bgsave_status"] == "ok"
            assert persistence["bgsave_in_progress"] is False
            # Nothing is left to the log: both keys are in the snapshots.
            assert persistence["log_bytes"] == 0
            assert await kv.execute("bgsave") == "Background saving started"
            await finish_bgsave(kv)


async def test_info_persistence_on_the_redis_port_reports_the_log_and_bgsave(
    tmp_path: Path, gate: threading.Event
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running(data_dir=str(tmp_path)) as server:
            client = await Client.connect(server)
            assert await client.call("SET", "k", "v") == "OK"

            async def persistence() -> dict[str, str]:
                text = await client.call("INFO", "persistence")
                assert isinstance(text, bytes)
                lines = text.decode().splitlines()[1:]
                return dict(line.split(":", 1) for line in lines if line)

            fields = await persistence()
            assert fields["aof_enabled"] == "1"
            assert int(fields["aof_current_size"]) > 0  # the SET's log record
            assert fields["aof_last_write_status"] == "ok"
            assert fields["rdb_bgsave_in_progress"] == "0"
            assert "rdb_changes_since_last_save" not in fields  # not measured: not made up
            assert await client.call("BGSAVE") == "Background saving started"
            assert (await persistence())["rdb_bgsave_in_progress"] == "1"
            gate.set()
            for ticket in server.engine._bgsave:
                await ticket.done.wait()
            fields = await persistence()
            assert fields["rdb_bgsave_in_progress"] == "0"
            assert fields["rdb_last_bgsave_status"] == "ok"
            assert int(fields["rdb_last_save_time"]) == await client.call("LASTSAVE")
            assert fields["aof_current_size"] == "0"  # the snapshot covers the log
        async with running() as server:
            client = await Client.connect(server)
            text = await client.call("INFO", "persistence")
            assert isinstance(text, bytes)
            assert "aof_enabled:0" in text.decode()
            assert "aof_current_size" not in text.decode()
