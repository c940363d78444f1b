"""Review 3 of the PATCH record (in-place edits logged as the bytes they changed).

The invariant attacked: after any restart recovery never gives a key a value
it never held, and with no loss at all (a clean stop without a final
snapshot, a kill -9, ``always`` and a power loss) every acknowledged edit is
present: no PATCH the writer emitted is skipped at replay.

Property tests (they pass: no false skip found):

- random command scripts over two shards (edits, every other kind of write,
  transactions on one and on two shards, SAVE, BGSAVE, snapshots by log size,
  shard kills, FLUSHALL, clean restarts with and without a final snapshot),
  with ``always``, ``everysec`` and ``no``, also with injected failed appends
  and fsyncs: the store holds after each restart what it held, and no start
  warns of a skipped PATCH;
- concurrent writers, SAVE, BGSAVE and kills, and copies of the data
  directory as a power loss (``always`` with commitlog and fsync rounds,
  ``everysec``) or a kill -9 leaves it: a key holds a value it held (any
  mode), an acknowledged edit is there and no PATCH is skipped (``always``,
  kill -9);
- the journal of any store writes (lazy and active expiry, eviction, KEEPTTL,
  MSET, RENAME, FLUSH, groups, snapshot copies, reloads), replayed from the
  last snapshot with empty chains as recovery does, is the store, and finds
  every PATCH's base.

Defects found, fixed since (their tests below): ``Journal.bases`` memory was
not bounded nor tracked (tracked usage dropped out of the project's 20 %
calibration for keys an edit created; now at most ``BASES_MAX`` keys a
shard), and a base SET took replay's general path (recovery of keys an edit
created was ~2.6x slower than before; now the inline SET paths take it).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import shutil
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_patch_records import Warned, state
from test_persistence_powerloss import QUIESCE, Durable, install

import kvmemo
from kvmemo.commands.bits import BitField, FieldAction, FieldOp, Overflow, SetBit
from kvmemo.commands.ops import Append, SetRange
from kvmemo.eviction.memory import MemoryTracker
from kvmemo.eviction.policies import make_policy
from kvmemo.persistence import AppendFsync, records
from kvmemo.persistence.records import Chains, encode_base, encode_set, replay
from kvmemo.persistence.wal import SegmentedLog
from kvmemo.storage.durability import ShardDurability
from kvmemo.storage.store import ShardStore

DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = [b"{t}a", b"{t}b", b"{u}c", b"{u}d"]  # {t} and {u}: two shards of two
LONG = 600  # the first value of {t}a and {u}c: long enough that their edits are PATCHes


# -- random scripts with restarts ----------------------------------------------------------------


ARMED: dict[tuple[str, int], bool] = {}  # one-shot failures: (what, shard)


def _armed(what: str, path: str) -> bool:
    for shard in (0, 1):
        if ARMED.get((what, shard)) and f"shard-{shard}/wal-" in path:
            del ARMED[what, shard]
            return True
    return False


def install_failures(mp: pytest.MonkeyPatch) -> None:
    """Failures armed by the script: the next append (ENOSPC) or log fsync (EIO) of a shard."""
    append = SegmentedLog._append_locked
    fsync = os.fsync

    def failing_append(log: SegmentedLog, data: bytes) -> Any:
        if _armed("FAILAPPEND", str(log.path(log.current))):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return append(log, data)

    def failing_fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if _armed("FAILSYNC", path):
            raise OSError(errno.EIO, "Input/output error (injected)")
        fsync(fd)

    mp.setattr(SegmentedLog, "_append_locked", failing_append)
    mp.setattr(os, "fsync", failing_fsync)


async def settle(kv: kvmemo.Store) -> None:
    """Wait (without sleeping for an effect) until every shard answers again."""
    for _ in range(2000):
        try:
            await kv.execute("DBSIZE")
            return
        except kvmemo.KVMemoError:
            await trio.sleep(0.001)
    raise AssertionError("the store did not come back")


def calls_of(s: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The commands of one step (for kv.execute or kv.transaction)."""
    name = s[0]
    if name == "SETKEEPTTL":
        return [("SET", s[1], s[2], "KEEPTTL")]
    if name == "EXPIRE":
        return [("EXPIRE", s[1], 100000)]
    if name == "GETEX":
        return [("GETEX", s[1], "EX", 100000) if s[2] else ("GETEX", s[1], "PERSIST")]
    if name == "COPY":
        return [("COPY", s[1], s[2], "REPLACE")]
    if name == "MSET":
        return [("MSET", s[1], b"m" * 300, s[2], b"n" * 5)]
    return [s]


async def run(
    directory: str, script: list[tuple[Any, ...]], fsync: str, lossy: bool = False
) -> None:
    """Run ``script``, restarting where it says; after each restart the store holds
    what it held (``lossy``: failures were injected, so only after a restart with
    a final snapshot), and no start skips a PATCH."""
    warned = Warned()
    logger = logging.getLogger("kvmemo.persistence")
    logger.addHandler(warned)
    settings_: dict[str, Any] = {
        "shards": 2,
        "data_dir": directory,
        "appendfsync": fsync,
        "snapshot_log_bytes": 3000,
        "restart_backoff": 0.001,
    }
    try:
        i = 0
        while i <= len(script):
            ARMED.clear()  # a failure armed and not met is not the next start's
            async with kvmemo.open_store(**settings_) as kv:
                try:
                    await kv.mset({b"{t}a": b"a" * LONG, b"{u}c": b"c" * LONG})
                except kvmemo.KVMemoError:
                    assert lossy
                expected = None
                final = False
                while i < len(script):
                    s = script[i]
                    i += 1
                    name = s[0]
                    if name == "RESTART":
                        final = s[1]
                        if not final:
                            kv.engine.skip_final_snapshot()
                        expected = await state(kv, KEYS)
                        break
                    if name in ("FAILAPPEND", "FAILSYNC"):
                        ARMED[name, s[1]] = True
                        continue
                    if name == "KILL":
                        kv.kill_actor(f"shard-{s[1]}")
                        await settle(kv)
                        continue
                    if name == "TXN":
                        calls = [c for sub in s[1] for c in calls_of(sub) if c[0] != "RESTORE"]
                        try:
                            await kv.transaction(*calls)
                        except kvmemo.KVMemoError:
                            pass
                        continue
                    if name == "RESTORE":
                        dump = await kv.execute("DUMP", s[1])
                        if dump is not None:
                            try:
                                await kv.execute("RESTORE", s[2], 0, dump, "REPLACE")
                            except kvmemo.KVMemoError:
                                pass
                        continue
                    for call in calls_of(s):
                        try:
                            await kv.execute(*call)
                        except kvmemo.KVMemoError:
                            pass
                else:
                    kv.engine.skip_final_snapshot()
                    expected = await state(kv, KEYS)
                    i += 1
            saved = not any("no snapshot at stop" in m for m in warned.messages)
            ARMED.clear()
            async with kvmemo.open_store(**settings_) as kv:
                if not lossy or (final and saved):
                    assert await state(kv, KEYS) == expected
                kv.engine.skip_final_snapshot()
            skipped = [m for m in warned.messages if "PATCH" in m or "skipped" in m]
            assert skipped == [], skipped
            warned.messages.clear()
    finally:
        logger.removeHandler(warned)


def random_script(rng: random.Random, length: int, failures: int = 0) -> list[tuple[Any, ...]]:
    """A script of ``length`` steps: mostly in-place edits of long values."""

    keys = KEYS

    def key() -> bytes:
        return rng.choice(keys)

    def edit() -> tuple[Any, ...]:
        kind = rng.choice(["SETBIT", "SETRANGE", "APPEND", "BITFIELD"])
        if kind == "SETBIT":
            return ("SETBIT", key(), rng.randrange(0, 7000), rng.randrange(2))
        if kind == "SETRANGE":
            return ("SETRANGE", key(), rng.randrange(0, 900), rng.randbytes(rng.randrange(0, 10)))
        if kind == "APPEND":
            return ("APPEND", key(), rng.randbytes(rng.randrange(0, 10)))
        return (
            "BITFIELD", key(), "OVERFLOW", rng.choice(["WRAP", "SAT", "FAIL"]), "INCRBY",
            rng.choice(["i8", "u4", "u16"]), rng.randrange(0, 2700), rng.randrange(-300, 300),
        )  # fmt: skip

    def plain() -> tuple[Any, ...]:
        kind = rng.choices(
            ["SET", "SETKEEPTTL", "DEL", "GETDEL", "EXPIRE", "PERSIST", "GETEX", "RENAME",
             "COPY", "MSET", "INCR", "RESTORE"],
            [2, 1, 1, 1, 3, 2, 3, 1, 1, 1, 1, 1],
        )[0]  # fmt: skip
        if kind in ("SET", "SETKEEPTTL"):
            return (kind, key(), b"v" * rng.choice([0, 5, 300, 1000]))
        if kind == "GETEX":
            return (kind, key(), rng.random() < 0.5)
        if kind in ("RENAME", "COPY", "MSET", "RESTORE"):
            return (kind, key(), key())
        return (kind, key())

    def event() -> tuple[Any, ...]:
        kind = rng.choices(
            ["SAVE", "BGSAVE", "FLUSHALL", "KILL", "RESTART", "TXN", "FAILAPPEND", "FAILSYNC"],
            [3, 3, 1, 3, 3, 6, failures, failures],
        )[0]
        if kind in ("KILL", "FAILAPPEND", "FAILSYNC"):
            return (kind, rng.randrange(2))
        if kind == "RESTART":
            return (kind, rng.random() < 0.3)
        if kind == "TXN":
            nonlocal keys
            if rng.random() < 0.5:  # on one shard
                keys = rng.choice([KEYS[:2], KEYS[2:]])
            steps = [edit() if rng.random() < 0.3 else plain() for _ in range(rng.randint(1, 4))]
            keys = KEYS
            return (kind, steps)
        return (kind,)

    out = []
    for _ in range(length):
        r = rng.random()
        out.append(edit() if r < 0.55 else plain() if r < 0.8 else event())
    return out


@settings(DETERMINISTIC, max_examples=int(os.environ.get("R3_EXAMPLES", "25")))
@given(st.integers(0, 2**32), st.sampled_from(["everysec", "always", "no"]))
def test_no_acknowledged_edit_is_skipped_after_any_clean_restart(seed: int, fsync: str) -> None:
    script = random_script(random.Random(seed), 60)
    with tempfile.TemporaryDirectory() as directory:
        trio.run(run, directory, script, fsync)


@settings(DETERMINISTIC, max_examples=int(os.environ.get("R3_EXAMPLES", "25")))
@given(st.integers(0, 2**32), st.sampled_from(["everysec", "always", "no"]))
def test_no_patch_is_skipped_after_failed_appends_and_syncs(seed: int, fsync: str) -> None:
    script = random_script(random.Random(seed), 60, failures=4)
    ARMED.clear()
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as mp:
        install_failures(mp)
        trio.run(run, directory, script, fsync, True)


# -- power loss and kill -9: never another value; with always, every acknowledged edit ------


def edited(kind: str, old: bytes | None, arg: Any) -> bytes | None:
    """What ``kind`` makes of the value ``old`` (as the store does)."""
    base = old or b""
    if kind == "set":
        return bytes(arg)
    if kind == "del":
        return None
    if kind == "expire":
        return old
    if kind == "append":
        return base + bytes(arg)
    if kind == "setrange":
        offset, data = arg
        padded = base.ljust(offset + len(data), b"\0")
        return padded[:offset] + bytes(data) + padded[offset + len(data) :]
    assert kind == "setbit"
    offset, bit = arg
    grown = bytearray(base.ljust((offset >> 3) + 1, b"\0"))
    mask = 1 << (7 - (offset & 7))
    grown[offset >> 3] = grown[offset >> 3] | mask if bit else grown[offset >> 3] & ~mask
    return bytes(grown)


class EditModel:
    """Per key: the values the disk may hold (``poss``, with ``always``), every value
    the key ever held or was about to (``history``), and the memory's value."""

    def __init__(self) -> None:
        self.poss: dict[bytes, set[bytes | None]] = {}
        self.history: dict[bytes, set[bytes | None]] = {}
        self.memory: dict[bytes, bytes | None] = {}
        self.inflight: dict[int, tuple[bytes, bytes | None]] = {}


async def edit_writer(
    kv: Any, model: EditModel, wid: int, keys: list[bytes], rng: random.Random, stop: trio.Event
) -> None:
    for key in keys:
        model.poss[key] = {None}
        model.history[key] = {None}
        model.memory[key] = None
    n = 0
    while not stop.is_set():
        n += 1
        key = rng.choice(keys)
        cur = model.memory[key]
        kind = rng.choices(
            ["set", "append", "setbit", "setrange", "del", "expire"], [2, 4, 5, 4, 1, 1]
        )[0]
        arg: Any = None
        if kind == "set":
            arg = (b"%d:%d:" % (wid, n)) * rng.choice([1, 60, 200])
        elif kind == "append":
            arg = rng.randbytes(rng.randint(1, 8))
        elif kind == "setbit":
            arg = (rng.randrange(8 * len(cur or b"") + 64), rng.randrange(2))
        elif kind == "setrange":
            arg = (rng.randrange(len(cur or b"") + 16), rng.randbytes(rng.randint(1, 8)))
        new = edited(kind, cur, arg)
        model.history[key].add(new)
        model.inflight[wid] = (key, new)
        args: tuple[Any, ...] = {
            "set": ("SET", key, arg),
            "del": ("DEL", key),
            "expire": ("EXPIRE", key, 100000),
            "append": ("APPEND", key, arg),
            "setbit": ("SETBIT", key, *(arg or ())),
            "setrange": ("SETRANGE", key, *(arg or ())),
        }[kind]
        try:
            await kv.execute(*args)
        except kvmemo.KVMemoError:  # killed: may or may not last
            model.poss[key] = model.poss[key] | {new}
            while True:  # what the memory holds now
                try:
                    model.memory[key] = await kv.execute("GET", key)
                    break
                except kvmemo.KVMemoError:
                    await trio.sleep(0.001)
            model.poss[key].add(model.memory[key])
            model.history[key].add(model.memory[key])
        else:
            model.poss[key] = {new}
            model.memory[key] = new
        finally:
            del model.inflight[wid]


def allowed_now(model: EditModel, strict: bool) -> dict[bytes, set[bytes | None]]:
    """What the disk may hold for each key: ``strict``, every acknowledged edit
    (``always``, or a kill -9: its appends are in the page cache); else any value
    the key ever held."""
    if not strict:
        return {k: set(v) for k, v in model.history.items()}
    allowed = {k: set(v) for k, v in model.poss.items()}
    for key, new in model.inflight.values():
        allowed[key].add(new)
    return allowed


async def edits_under_power_loss(
    tmp: Path, seed: int, fsync: str, durable: Durable, method: str = "commitlog"
) -> None:
    rng = random.Random(seed)
    data_dir = tmp / "data"
    model = EditModel()
    copies: list[tuple[Path, dict[bytes, set[bytes | None]], bool]] = []
    stop = trio.Event()
    async with kvmemo.open_store(
        shards=2,
        data_dir=str(data_dir),
        appendfsync=fsync,
        snapshot_log_bytes=20000,
        fsync_method=method,
    ) as kv:
        async with trio.open_nursery() as nursery:
            for w in range(4):
                keys = [b"w%d:k%d" % (w, i) for i in range(3)]
                nursery.start_soon(
                    edit_writer, kv, model, w, keys, random.Random(rng.random()), stop
                )
            for n in range(8):
                await trio.sleep(rng.random() * 0.02)
                action = rng.choices(["save", "bgsave", "kill", "copy"], [1, 1, 1, 2])[0]
                if action in ("save", "bgsave"):
                    nursery.start_soon(_ignore, kv.execute, action)
                elif action == "kill":
                    kv.kill_actor(f"shard-{rng.randrange(2)}")
                else:
                    target = tmp / f"copy-{n}"
                    while not QUIESCE.acquire(blocking=False):  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    try:
                        variant = rng.choice(["truncate", "zero", "pages", "kill"])
                        strict = fsync == "always" or variant == "kill"
                        allowed = allowed_now(model, strict)
                        if variant == "kill":  # the files as a kill -9 leaves them
                            shutil.copytree(data_dir, target)
                        else:
                            durable.crash_copy(data_dir, target, variant, rng, lock=False)
                    finally:
                        QUIESCE.release()
                    copies.append((target, allowed, strict))
            stop.set()
    warned = Warned()
    logger = logging.getLogger("kvmemo.persistence")
    logger.addHandler(warned)
    try:
        for target, allowed, strict in copies:
            # everysec: pages written back in any order may leave damage to repair.
            repair = not strict
            async with kvmemo.open_store(
                shards=2, data_dir=str(target), appendfsync=fsync, repair=repair
            ) as kv:
                keys = sorted(allowed)
                got = dict(zip(keys, await kv.execute("MGET", *keys), strict=True)) if keys else {}
                kv.engine.skip_final_snapshot()
            bad = {k: got[k] for k in keys if got[k] not in allowed[k]}
            assert not bad, f"{target.name}: values the keys never held: {bad}"
            if strict:  # every acknowledged edit is durable, its base too
                skipped = [m for m in warned.messages if "skipped" in m]
                assert skipped == [], skipped
            warned.messages.clear()
    finally:
        logger.removeHandler(warned)


async def _ignore(fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except kvmemo.KVMemoError:  # a save may fail while a shard restarts
        pass


@pytest.mark.parametrize(
    ("fsync", "method"),
    [("always", "commitlog"), ("always", "fsync"), ("everysec", "commitlog")],
)
@pytest.mark.parametrize("seed", range(int(os.environ.get("R3_PL_SEEDS", "3"))))
async def test_power_loss_never_applies_an_edit_to_another_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, fsync: str, method: str
) -> None:
    durable = Durable(monkeypatch)
    install(monkeypatch, segment_bytes=4096, checkpoint_bytes=8192)
    with trio.fail_after(90):
        await edits_under_power_loss(tmp_path, seed, fsync, durable, method)


# -- the journal of any writes, replayed from the last snapshot, is the store ------------------

CORE_KEYS = [b"k", b"j", b"i"]


def core_script(rng: random.Random, length: int) -> list[tuple[Any, ...]]:
    """``length`` steps on CORE_KEYS: in-place edits, and every other kind of write or
    event, weighted so that a key's edits often have other writes between them."""

    def key() -> bytes:
        return rng.choice(CORE_KEYS)

    def edit() -> tuple[Any, ...]:
        kind = rng.choice(["setbit", "setrange", "append", "bitfield"])
        if kind == "setbit":
            return ("op", SetBit(key(), rng.randrange(9600), rng.randrange(2), 1 << 20))
        if kind == "setrange":
            return (
                "op",
                SetRange(key(), rng.randrange(1300), rng.randbytes(rng.randint(1, 9)), 1 << 20),
            )
        if kind == "append":
            return ("op", Append(key(), rng.randbytes(rng.randint(0, 9)), 1 << 20))
        fields = [
            FieldOp(
                rng.choice([FieldAction.SET, FieldAction.INCRBY, FieldAction.GET]),
                rng.random() < 0.5,
                rng.randint(1, 16),
                rng.randrange(8 * 1200),
                rng.randint(-70000, 70000),
                rng.choice(list(Overflow)),
            )
            for _ in range(rng.randint(1, 3))
        ]
        fields[0] = attrs.evolve(fields[0], action=FieldAction.INCRBY)
        return ("op", BitField(key(), fields, 1 << 20))

    def other(inner: bool = False) -> tuple[Any, ...]:
        kinds = ["put", "plain", "many", "delete", "expire", "due", "evict", "rename", "tick"]
        weights = [2, 2, 1, 1, 4, 2, 1, 1, 3]
        if not inner:
            kinds += ["flush", "snapshot", "reload", "group"]
            weights += [1, 1, 1, 5]
        kind = rng.choices(kinds, weights)[0]
        if kind == "put":
            return (
                kind,
                key(),
                rng.choice([0, 10, 300, 1100]),
                rng.choice([None, 5.0, 50.0]),
                rng.random() < 0.5,
            )
        if kind == "plain":
            return (kind, key(), rng.choice([0, 300, 1100]))
        if kind in ("many", "evict"):
            return (kind, [key() for _ in range(rng.randint(1, 3))])
        if kind == "delete":
            return (kind, key())
        if kind == "expire":
            return (kind, key(), rng.choice([None, 5.0, 50.0]))
        if kind == "rename":
            return (kind, key(), key())
        if kind == "tick":
            return (kind, rng.randint(1, 30))
        if kind == "group":
            return (
                kind,
                [edit() if rng.random() < 0.3 else other(True) for _ in range(rng.randint(1, 3))],
            )
        return (kind,)

    return [edit() if rng.random() < 0.6 else other() for _ in range(length)]  # fmt: skip


class CoreRun:
    """A journalled store, and the state its log's replay starts from (the last snapshot)."""

    def __init__(self) -> None:
        self.store = ShardStore(0, make_policy("allkeys-lru"), MemoryTracker(0, 1))
        self.store.durability = ShardDurability(
            Path("/nonexistent"), AppendFsync.EVERYSEC, segment_bytes=1 << 20, snapshot_bytes=0
        )
        self.store.journal = self.store.durability.journal
        self.now = 1000.0
        self.base: tuple[dict[bytes, bytes], dict[bytes, int]] = ({}, {})

    def replayed(self) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
        journal = self.store.journal
        assert journal is not None
        data, expires = dict(self.base[0]), dict(self.base[1])
        chains = Chains()  # empty after a snapshot, as recovery's
        result = replay(b"".join(journal.records), data, expires, chains=chains)
        assert result.problem is None
        assert chains.skipped == 0, "a PATCH the writer journalled was skipped"
        return data, expires

    def check(self) -> None:
        data, expires = self.replayed()
        live = {k: v for k, v in data.items() if k not in expires or expires[k] > self.now * 1000}
        assert live == {k: self.store.data[k] for k in self.store.live_keys(self.now)}

    def apply(self, s: tuple[Any, ...]) -> None:
        store, now = self.store, self.now
        name = s[0]
        if name == "op":
            try:
                s[1].apply(store, now)
            except kvmemo.KVMemoError:
                pass
        elif name == "put":
            _, key, size, ttl, keep = s
            store.put(
                key, b"p" * size, now, expires_at=None if ttl is None else now + ttl, keep_ttl=keep
            )
        elif name == "plain":
            store.put_plain(s[1], b"q" * s[2], now)
        elif name == "many":
            items = [(k, b"m" * 300) for k in s[1]]
            delta = store.put_delta(items, now)
            store.tracker.try_reserve(0, delta)
            store.put_many(items, now)
        elif name == "delete":
            store.delete(s[1], now)
        elif name == "expire":
            if store.contains(s[1], now):
                store.set_expiry(s[1], None if s[2] is None else now + s[2])
        elif name == "due":
            store.expire_due(now, 100)
        elif name == "evict":
            store.evict(s[1])
        elif name == "flush":
            store.flush()
        elif name == "rename":
            value = store.peek(s[1], now)
            if value is not None and s[1] != s[2]:
                expires_at = store.expiry_of(s[1])
                with store.one_record():
                    store.put(s[2], value, now, expires_at=expires_at)
                    store.delete(s[1], now)
        elif name == "tick":
            self.now += s[1]
        elif name == "snapshot":  # the shard's copy: the log's records so far are covered
            self.check()
            journal = store.journal
            assert journal is not None
            self.base = self.replayed()
            journal.records.clear()
            journal.bases.clear()
        elif name == "reload":  # a restart: recovery's state, loaded
            self.check()
            data, expires = self.replayed()
            live = {k: v for k, v in data.items() if k not in expires or expires[k] > now * 1000}
            store.load(live, {k: expires[k] / 1000 for k in live if k in expires})
            journal = store.journal
            assert journal is not None
            journal.records.clear()
            self.base = (live, {k: expires[k] for k in live if k in expires})
        elif name == "group":
            with store.one_record():
                for inner in s[1]:
                    if inner[0] not in ("snapshot", "reload", "group"):
                        self.apply(inner)


@settings(DETERMINISTIC, max_examples=int(os.environ.get("R3_CORE", "300")))
@given(st.integers(0, 2**32))
def test_the_journal_of_any_writes_replays_to_the_store_without_a_skip(seed: int) -> None:
    """Expiry (lazy and active), eviction, KEEPTTL, MSET, RENAME, FLUSH, groups,
    snapshots (the writer's copy) and restarts (a load): replayed from the last
    snapshot with empty chains, as recovery does, the journal gives the store's
    live keys, and every PATCH in it finds its base."""
    steps = core_script(random.Random(seed), 60)
    run_ = CoreRun()
    for key in CORE_KEYS:
        run_.store.put(key, bytes(range(256)) * 4, run_.now, expires_at=None)
    for s in steps:
        run_.apply(s)
    run_.check()


# -- defects --------------------------------------------------------------------------------------

CALIBRATION_ENTRIES = 20_000


def traced_growth(create: Any, journalled: bool) -> tuple[int, int]:
    """A store filled by ``create(store, key)``: (traced growth, tracked usage).

    ``journalled``: persistence on; the journal's records are dropped after each
    write, as the shard's append would (they are in the log).
    """
    store = ShardStore(0, make_policy("lru"), MemoryTracker(0, 1))
    if journalled:
        store.durability = ShardDurability(
            Path("/nonexistent"), AppendFsync.EVERYSEC, segment_bytes=1 << 30, snapshot_bytes=0
        )
        store.journal = store.durability.journal
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(CALIBRATION_ENTRIES):
            create(store, i.to_bytes(16, "big"))
            if store.journal is not None:
                store.journal.records.clear()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return grown, store.tracker.used


@pytest.mark.parametrize(
    "create",
    [
        lambda store, key: Append(key, bytes(300), 1 << 20).apply(store, 0.0),
        lambda store, key: SetBit(key, 2047, 1, 1 << 20).apply(store, 0.0),
    ],
    ids=["APPEND", "SETBIT"],
)
def test_a_key_an_edit_created_costs_no_untracked_memory_with_persistence_on(
    create: Any,
) -> None:
    """Was a defect (every key edited kept a ``Journal.bases`` entry). Expected: with
    persistence on, once the batch is appended, a key costs the
    memory it costs without persistence (within 10 %), which is what the tracker
    counts for both (497 B per key for 300-byte values made by APPEND, 465 B for
    256-byte bitmaps made by SETBIT; so it was before the change). Actual: 25-35 %
    more (about 140 B per key): each key's first edit is a base SET, and its
    ``Journal.bases`` entry stays until the key is written otherwise or a snapshot
    copy clears the map. The tracker does not know it: ``maxmemory`` is overshot
    by that much (ARCHITECTURE: no write succeeds without registering its bytes;
    the calibration of tests/test_memory.py drops from 0.97 to 0.76-0.84)."""
    plain, tracked_plain = traced_growth(create, journalled=False)
    journalled, tracked = traced_growth(create, journalled=True)
    assert tracked == tracked_plain  # the tracker counts the same bytes either way
    extra = (journalled - plain) / CALIBRATION_ENTRIES
    assert journalled <= 1.10 * plain, f"{extra:.0f} B per key the tracker does not count"


@pytest.mark.parametrize("expires_ms", [None, 10**13], ids=["no-expiry", "expiry"])
def test_a_base_set_replays_on_the_inline_set_path(
    monkeypatch: pytest.MonkeyPatch, expires_ms: int | None
) -> None:
    """Was a defect (a base SET took the general path). Expected: a log of base
    SETs replays as a log of plain SETs does, on the
    inline path (no call of the general decoder), keeping ``Chains.bases``.
    Actual: every base SET is decoded by ``_decode_at`` and applied by ``_apply``.
    Every key an edit command (APPEND, SETBIT, SETRANGE, BITFIELD) creates with
    256 bytes or more, and every key's first edit after a snapshot, is a base SET:
    replaying 200,000 keys created by APPEND (300 bytes) took 0.28-0.40 s before
    the change (plain SETs) and 0.79-0.99 s after it (500-700k keys/s down to
    200-255k keys/s on the development VM)."""
    calls = []
    decode = records._decode_at

    def counting(*args: Any) -> Any:
        calls.append(args[2])
        return decode(*args)

    monkeypatch.setattr(records, "_decode_at", counting)
    keys = [b"key:%04d" % i for i in range(50)]
    plain = b"".join(encode_set(k, bytes(300)) for k in keys) if expires_ms is None else b""
    if plain:
        replay(plain, {}, {}, chains=Chains())
        assert calls == []  # a plain SET's path (the baseline)
    log = b"".join(encode_base(k, bytes(300), expires_ms) for k in keys)
    chains = Chains()
    data: dict[bytes, bytes] = {}
    assert replay(log, data, {}, chains=chains).problem is None
    assert set(chains.bases) == set(keys)
    assert len(data) == len(keys)
    assert calls == [], f"{len(calls)} of {len(keys)} base SETs took the general path"
