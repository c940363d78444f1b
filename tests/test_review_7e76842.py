"""Review of 7e76842 (the data directory's lock and shard count): the defects it left.

Design. Each test builds a state a real store reaches (a crash or a power
loss with acknowledged writes on disk, a forked worker) and asserts the
behaviour the commit and the README promise; each failed before the fix
that followed the review, and its docstring says what was wrong.

- The shard-count check (``layout.check_shard_count``) looks only at
  ``shard-N/`` files: acknowledged writes that live only in ``intents/``
  (a crash between a multi-shard write's intent and its shards' appends) or
  in ``commit/`` (a power loss with ``appendfsync always``: the shard logs'
  pages lost, the commit log's frames durable) count as "no data", so a
  start with another count is accepted and those keys are lost or
  unreachable.
- The lock (``flock`` on ``DIR/LOCK``) is shared with a ``fork`` child: the
  child keeps it after the store closed (and after the parent died).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

import kvmemo
from kvmemo.engine.engine import SlotMap
from kvmemo.persistence.intents import IntentLog
from kvmemo.persistence.layout import ShardCountMismatch
from kvmemo.persistence.records import Op, encode_fields

TIMEOUT = 30  # seconds per test
KEYS = [b"k%d" % i for i in range(40)]


async def test_a_crash_left_intent_counts_as_data_for_the_shard_count(tmp_path: Path) -> None:
    """Was wrong: keys held only by the intent log are lost when the count changes.

    A fresh 4-shard store whose first write is a multi-shard MSET, killed
    after the intent was written and before any shard logged its part (the
    state the intent log exists for). Every ``shard-N/`` holds only an empty
    snapshot and empty segments, so ``check_shard_count`` calls the
    directory empty, accepts ``shards=2`` and records 2; recovery then skips
    the parts of shards 2 and 3 ("a shard the intent names but that
    recovery does not know") and the redone parts of 0 and 1 sit on shards
    that no longer own their keys: 6 of 8 keys are gone. With 4 shards all 8
    come back. Fix: count a non-empty ``intents/`` segment as data.
    """
    data = tmp_path / "data"
    keys = KEYS[:8]
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=4, data_dir=str(data)):
            pass
        slots = SlotMap(4)
        sections: dict[int, bytes] = {}
        for key in keys:
            shard = slots.shard_of(key)
            sections[shard] = sections.get(shard, b"") + encode_fields(Op.SET, key, b"v", None)
        assert len(sections) > 2  # parts on shards past the new count
        intents = IntentLog(data)
        intents.append(1, sorted(sections.items()))
        intents.sync()
        intents.close()
        shutil.copytree(data, tmp_path / "same")
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path / "same")) as kv:
            assert await kv.mget(*keys) == [b"v"] * len(keys)  # the redo holds them all
        with pytest.raises(ShardCountMismatch):
            async with kvmemo.open_store(shards=2, data_dir=str(data)):
                pass


async def test_commit_log_frames_count_as_data_for_the_shard_count(tmp_path: Path) -> None:
    """Was wrong: writes acknowledged with ``appendfsync always`` are lost when the count changes.

    After a power loss the shard logs may be empty (only the commit log was
    synced; its frames put the bytes back, ``commitlog.redo``). Such a
    directory (copied while the store ran, its ``wal`` files cut to 0 bytes)
    comes back whole with 4 shards, but ``check_shard_count`` sees no data,
    accepts ``shards=2`` and records it: 9 of 40 acknowledged keys are
    readable. Fix: count a non-empty ``commit/`` segment as data.
    """
    data = tmp_path / "data"
    crashed = tmp_path / "crashed"
    with trio.fail_after(TIMEOUT):
        async with kvmemo.open_store(shards=4, data_dir=str(data), appendfsync="always") as kv:
            for key in KEYS:
                await kv.set(key, b"v")
            shutil.copytree(data, crashed)  # what the disk holds; the page cache is lost
        for wal in crashed.glob("shard-*/wal-*.log"):
            os.truncate(wal, 0)
        shutil.copytree(crashed, tmp_path / "same")
        async with kvmemo.open_store(shards=4, data_dir=str(tmp_path / "same")) as kv:
            assert await kv.mget(*KEYS) == [b"v"] * len(KEYS)
        with pytest.raises(ShardCountMismatch):
            async with kvmemo.open_store(shards=2, data_dir=str(crashed)):
                pass


async def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path: Path) -> None:
    """Was wrong: a ``fork`` child (a multiprocessing worker) holds the lock after the store closed.

    ``flock`` locks belong to the open file description, which ``fork``
    shares (``O_CLOEXEC`` only acts at ``exec``): closing the parent's
    descriptor does not release the lock while the child lives, so the same
    process cannot reopen its own directory ("in use by ... (process <its
    own pid>)"), and a new server cannot start after the parent died while
    such a child runs. Fix: close the lock descriptors in the child
    (``os.register_at_fork(after_in_child=...)``; closing, not LOCK_UN,
    which would unlock the parent's lock too).
    """
    data = str(tmp_path / "data")
    read_end, write_end = os.pipe()
    pid = 0
    try:
        with trio.fail_after(TIMEOUT):
            async with kvmemo.open_store(shards=2, data_dir=data) as kv:
                await kv.set(b"k", b"v")
                pid = os.fork()
                if pid == 0:  # the child: waits for the parent's word, then exits
                    try:
                        os.close(write_end)
                        os.read(read_end, 1)
                    finally:
                        os._exit(0)
            async with kvmemo.open_store(shards=2, data_dir=data) as kv:
                assert await kv.get(b"k") == b"v"
    finally:
        os.close(read_end)
        os.close(write_end)  # the child's read returns: it exits
        if pid:
            await trio.to_thread.run_sync(os.waitpid, pid, 0)  # at once: its pipe is closed
