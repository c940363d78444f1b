"""Randomized store-level power-loss test for ``appendfsync always`` + commit log.

Written in review of the commit log (stop 17); it found a snapshot made durable
before its segment's head mark, a head mark kept while the tail holding its
round was lost, and torn tails refused as corruption, all fixed since.

A store (2..4 shards, tiny segments, tiny snapshot threshold, tiny commit-log
checkpoint) runs several writer tasks (SET / DEL / MSET across shards / INCR /
EXPIRE on keys each writer owns) while a chaos task sends SAVE, BGSAVE,
``kill_actor("shard-N")`` and, at random moments, takes a *power-loss copy*:

- every ``os.fsync`` is recorded (path -> file size when the fsync began);
- the copy is taken while no sync round, snapshot write or event-loop append
  runs (a global lock the round/snapshot threads hold; the copy itself runs on
  the event loop thread), so it is one instant;
- in the copy every shard, intent and commit-log segment is cut to its last
  fsynced size (variant ``truncate``), or its unsynced tail is zeroed
  (``zero``: the size reached the disk, the data did not), or random whole
  pages of the unsynced tail are zeroed (``pages``: write-back in any order).

The copy is then opened as a store; recovery must not raise, and every key
must hold one of the states the model allows: the latest acknowledged one, or
(for a write in flight at the copy, or one that failed "may or may not
last" because of a kill) the state before or after it. An MSET in flight at
the copy must be all-or-nothing.

Env knobs, for longer runs by hand: PL_SEEDS (default 16), PL_STEPS (copies
per seed, default 6), PL_VARIANTS (comma list of truncate, zero, pages; default
all three), PL_MIDROUND (chance per commit frame of a copy taken mid-round,
after the shard appends and before the frame; default 0.05), PL_REPAIR=1 (a
copy refused with CorruptLog is reopened with repair and checked), PL_KEEP=DIR
(keep failing copies there, untouched). 150 seeds x 10 copies x 3 variants
passed when this was written (stop 17).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import kvmemo
import kvmemo.engine.durable as engine_durable
import kvmemo.storage.durable_shard as ds
import kvmemo.storage.sync_coordinator as sc
from kvmemo.persistence.commitlog import CommitLog
from kvmemo.persistence.recovery import CorruptLog
from kvmemo.storage.durable_shard import PersistenceConfig
from kvmemo.storage.sync_coordinator import SyncCoordinator

PAGE = 4096
QUIESCE = threading.RLock()

State = tuple[bytes | None, bool]  # value, has a TTL


class Durable:
    """Records, per path, the size of the file when an fsync of it began."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: dict[str, int] = {}
        self.lock = threading.Lock()
        real = os.fsync

        def fsync(fd: int) -> None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                size = os.fstat(fd).st_size
            except OSError:
                path, size = "", 0
            real(fd)
            if path and os.path.isfile(path):
                with self.lock:
                    self.sizes[path] = max(self.sizes.get(path, 0), size)

        monkeypatch.setattr(os, "fsync", fsync)

    def crash_copy(
        self, data_dir: Path, target: Path, variant: str, rng: random.Random, lock: bool = True
    ) -> None:
        with QUIESCE if lock else contextlib.nullcontext():
            shutil.copytree(data_dir, target)
            with self.lock:
                sizes = dict(self.sizes)
        patterns = ["shard-*/wal-*.log", "intents/wal-*.log", "commit/commit-*.log"]
        for pattern in patterns:
            for copy in sorted(target.glob(pattern)):
                original = data_dir / copy.relative_to(target)
                keep = sizes.get(str(original), 0)
                size = copy.stat().st_size
                if size <= keep:
                    continue
                if variant == "truncate":
                    os.truncate(copy, keep)
                elif variant == "zero":
                    with open(copy, "r+b") as f:
                        f.seek(keep)
                        f.write(bytes(size - keep))
                elif variant == "pages":
                    with open(copy, "r+b") as f:
                        first = keep // PAGE
                        for page in range(first, (size - 1) // PAGE + 1):
                            if rng.random() < 0.5:
                                lo = max(keep, page * PAGE)
                                hi = min(size, (page + 1) * PAGE)
                                f.seek(lo)
                                f.write(bytes(hi - lo))
                else:
                    raise AssertionError(variant)


def _quiesced(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with QUIESCE:
            return fn(*args, **kwargs)

    return wrapper


# A power loss in the middle of a commitlog round (shard logs appended, frame not yet
# written): set by run_seed; called on the event loop from the round's thread.
MIDROUND: dict[str, Any] = {}


def install(monkeypatch: pytest.MonkeyPatch, segment_bytes: int, checkpoint_bytes: int) -> None:
    real_commit = CommitLog.commit

    def commit(self: CommitLog, entries: Any) -> None:
        hook = MIDROUND.get("hook")
        if hook is not None and MIDROUND["rng"].random() < MIDROUND["p"]:
            trio.from_thread.run_sync(hook)
        real_commit(self, entries)

    monkeypatch.setattr(CommitLog, "commit", commit)
    monkeypatch.setattr(sc, "_commit_round", _quiesced(sc._commit_round))
    monkeypatch.setattr(sc, "_run_round", _quiesced(sc._run_round))
    monkeypatch.setattr(ds, "write_snapshot", _quiesced(ds.write_snapshot))

    def persistence_config(config: Any) -> PersistenceConfig | None:
        base = real_config(config)
        if base is None:
            return None
        return PersistenceConfig(
            base.directory,
            base.appendfsync,
            repair=base.repair,
            segment_bytes=segment_bytes,
            snapshot_bytes=base.snapshot_bytes,
            sync_coordinator=SyncCoordinator(
                method=config.fsync_method,
                directory=base.directory,
                checkpoint_bytes=checkpoint_bytes,
            ),
        )

    real_config = engine_durable.persistence_config
    monkeypatch.setattr(engine_durable, "persistence_config", persistence_config)


class Model:
    """Per key, the set of states the disk may hold after a power loss."""

    def __init__(self) -> None:
        self.poss: dict[bytes, set[State]] = {}
        # worker -> (op name, keys, function state -> state or None=unknown result, kill_epoch)
        self.inflight: dict[int, tuple[str, list[bytes], dict[bytes, set[State]], int]] = {}
        self.kills = 0
        self.acks = 0

    def get(self, key: bytes) -> set[State]:
        return self.poss.setdefault(key, {(None, False)})


def after(op: str, state: State, arg: Any) -> State | None:
    value, ttl = state
    if op == "set":
        return (arg, False)
    if op == "del":
        return (None, False)
    if op == "incr":
        if value is None:
            return (b"1", ttl)
        if not value.isdigit() or len(value) > 18:
            return state  # INCR refuses it: nothing changes
        return (str(int(value) + 1).encode(), ttl)
    if op == "expire":
        return state if value is None else (value, True)
    raise AssertionError(op)


async def writer(
    kv: Any, model: Model, wid: int, keys: list[bytes], rng: random.Random, stop: trio.Event
) -> None:
    counter = 0
    while not stop.is_set():
        counter += 1
        kind = rng.choices(["set", "del", "mset", "incr", "expire"], [5, 1, 2, 2, 1])[0]
        if kind == "mset":
            chosen = rng.sample(keys, rng.randint(2, min(4, len(keys))))
            values = {
                k: b"%d" % (10**12 + wid * 10**9 + counter * 10 + i) for i, k in enumerate(chosen)
            }
            args: list[bytes] = []
            for k in chosen:
                args += [k, values[k]]
            new = {k: {(values[k], False)} for k in chosen}
            possible = {k: model.get(k) | new[k] for k in chosen}
            model.inflight[wid] = ("mset", chosen, possible, model.kills)
            try:
                await kv.execute("mset", *args)
            except Exception:  # noqa: BLE001 - killed: may or may not last
                for k in chosen:
                    model.poss[k] = possible[k]
            else:
                model.acks += 1
                for k in chosen:
                    model.poss[k] = new[k]
            finally:
                del model.inflight[wid]
            continue
        key = rng.choice(keys)
        old = model.get(key)
        arg: Any = None
        if kind == "set":
            arg = b"%d" % (10**12 + wid * 10**9 + counter * 10)
            if rng.random() < 0.05:
                arg = arg + b"x" * rng.choice([3000, 9000])  # multi-page records
        elif kind == "expire":
            arg = 100000
        maybe = {s for s in (after(kind, st, arg) for st in old) if s is not None}
        model.inflight[wid] = (kind, [key], {key: old | maybe}, model.kills)
        try:
            if kind == "set":
                await kv.execute("set", key, arg)
                got: set[State] = {(arg, False)}
            elif kind == "del":
                await kv.execute("del", key)
                got = {(None, False)}
            elif kind == "incr":
                r = await kv.execute("incr", key)
                got = {(str(int(r)).encode(), t) for _, t in old}
            else:
                r = await kv.execute("expire", key, arg)
                if int(r) == 1:
                    got = {(v, True) for v, _ in old if v is not None} or maybe
                else:
                    got = {s for s in old if s[0] is None} or old
        except Exception as exc:  # noqa: BLE001 - killed: may or may not last
            if "not an integer" in str(exc):
                model.poss[key] = old  # a long value: INCR refused, nothing changed
            else:
                model.poss[key] = old | maybe
        else:
            model.acks += 1
            model.poss[key] = got
        finally:
            del model.inflight[wid]


def expected_now(model: Model) -> tuple[dict[bytes, set[State]], list[tuple[list[bytes], dict]]]:
    """What the disk may hold if the power goes now; the MSETs that must be whole."""
    allowed = {k: set(v) for k, v in model.poss.items()}
    whole: list[tuple[list[bytes], dict]] = []
    for kind, keys, possible, epoch in model.inflight.values():
        for k in keys:
            allowed[k] = allowed.get(k, {(None, False)}) | possible[k]
        if kind == "mset" and epoch == model.kills:
            whole.append(
                (keys, {k: possible[k] - model.poss.get(k, {(None, False)}) for k in keys})
            )
    return allowed, whole


async def check_copy(
    copy: Path,
    shards: int,
    allowed: dict[bytes, set[State]],
    whole: list,
    label: str,
    repair: bool = False,
) -> None:
    async with kvmemo.open_store(
        shards=shards, data_dir=str(copy), appendfsync="always", repair=repair
    ) as kv:
        keys = sorted(allowed)
        values = await kv.execute("mget", *keys) if keys else []
        got: dict[bytes, State] = {}
        for k, v in zip(keys, values, strict=True):
            ttl = int(await kv.execute("ttl", k))
            got[k] = (v, ttl > 0)
        bad = {k: (got[k], sorted(allowed[k], key=repr)) for k in keys if got[k] not in allowed[k]}
        assert not bad, f"{label}: keys with a state no acknowledged history allows: {bad}"
        for mkeys, new in whole:
            hits = [k for k in mkeys if got[k] in new[k]]
            assert len(hits) in (0, len(mkeys)), f"{label}: MSET in part: {mkeys} new={hits}"


async def run_seed(tmp: Path, seed: int, copies: int, variants: list[str], durable: Durable) -> int:
    rng = random.Random(seed)
    shards = rng.randint(2, 4)
    data_dir = tmp / f"data-{seed}"
    model = Model()
    checked = 0
    stop = trio.Event()
    pending: list[tuple[Path, dict, list, str]] = []
    async with kvmemo.open_store(
        shards=shards,
        data_dir=str(data_dir),
        appendfsync="always",
        snapshot_log_bytes=rng.choice([4096, 16384, 65536]),
    ) as kv:
        async with trio.open_nursery() as nursery:
            copyno = [0]

            def midround() -> None:
                if copyno[0] >= 2 * copies:
                    return
                variant = rng.choice(variants)
                target = tmp / f"copy-{seed}-m{copyno[0]}-{variant}"
                copyno[0] += 1
                allowed, whole = expected_now(model)
                durable.crash_copy(data_dir, target, variant, rng, lock=False)
                pending.append((target, allowed, whole, f"seed {seed} mid-round copy ({variant})"))

            MIDROUND.update(hook=midround, rng=random.Random(rng.random()), p=MIDROUND_P)
            nwriters = rng.randint(3, 6)
            for w in range(nwriters):
                keys = [b"w%d:k%d" % (w, i) for i in range(rng.randint(3, 8))]
                nursery.start_soon(writer, kv, model, w, keys, random.Random(rng.random()), stop)
            n = 0
            while n < copies:
                await trio.sleep(rng.random() * 0.02)
                action = rng.choices(["save", "bgsave", "kill", "copy"], [1, 1, 1, 3])[0]
                if action == "save":
                    nursery.start_soon(_ignore, kv.execute, "save")
                elif action == "bgsave":
                    nursery.start_soon(_ignore, kv.execute, "bgsave")
                elif action == "kill":
                    model.kills += 1
                    kv.kill_actor(f"shard-{rng.randrange(shards)}")
                else:
                    variant = rng.choice(variants)
                    target = tmp / f"copy-{seed}-{n}-{variant}"
                    # Not blocking the event loop: a round may be waiting on it (MIDROUND).
                    # (A thread lock has no event to wait on: poll it.)
                    while not QUIESCE.acquire(blocking=False):  # noqa: ASYNC110
                        await trio.sleep(0.001)
                    try:
                        allowed, whole = expected_now(model)
                        durable.crash_copy(data_dir, target, variant, rng, lock=False)
                    finally:
                        QUIESCE.release()
                    pending.append((target, allowed, whole, f"seed {seed} copy {n} ({variant})"))
                    n += 1
            stop.set()
            MIDROUND.clear()
    for target, allowed, whole, label in pending:
        pristine = target.with_name(target.name + "-pristine")
        shutil.copytree(target, pristine)
        try:
            with trio.fail_after(30):
                try:
                    await check_copy(target, shards, allowed, whole, label)
                except CorruptLog as exc:
                    if not os.environ.get("PL_REPAIR"):
                        raise
                    REFUSED.append(f"{label}: {exc}")
                    shutil.rmtree(target)
                    shutil.copytree(pristine, target)
                    await check_copy(target, shards, allowed, whole, label, repair=True)
        except BaseException:
            if os.environ.get("PL_KEEP"):
                keep = Path(os.environ["PL_KEEP"]) / pristine.name
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(pristine, keep)
                print(f"kept {keep}")
            raise
        checked += 1
        shutil.rmtree(target)
        shutil.rmtree(pristine)
    shutil.rmtree(data_dir)
    return checked


async def _ignore(fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:  # noqa: BLE001 - a save may fail while a shard restarts
        pass


REFUSED: list[str] = []  # copies recovery refused (CorruptLog) that repair then opened


def teardown_module() -> None:
    for row in REFUSED:
        print("refused without repair:", row)


MIDROUND_P = float(os.environ.get("PL_MIDROUND", "0.05"))
SEEDS = int(os.environ.get("PL_SEEDS", "16"))
STEPS = int(os.environ.get("PL_STEPS", "6"))
VARIANTS = os.environ.get("PL_VARIANTS", "truncate,zero,pages").split(",")


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_power_loss_keeps_every_acknowledged_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    durable = Durable(monkeypatch)
    rng = random.Random(seed * 7919)
    install(
        monkeypatch,
        segment_bytes=rng.choice([512, 2048, 8192]),
        checkpoint_bytes=rng.choice([1024, 8192, 65536]),
    )
    with trio.fail_after(90):
        checked = await run_seed(tmp_path, seed, STEPS, VARIANTS, durable)
    assert checked >= STEPS
