"""Crash safety of a real ``kvmemo serve --dir`` process, killed with SIGKILL under load.

Design. A server process (``python -m kvmemo serve --port 0 --no-resp
--shards 4 --dir DIR``) takes a write load from several WebSocket sessions
(:func:`kvmemo.client.connect`); each session runs writer tasks, each task
owns its keys and writes them one at a time, every value unique
(``key=sequence``). The test keeps a model of every key: the latest value
acknowledged to the client, and the writes sent but not answered (at most
one per key, since a key's writes are sequential). At a random moment the
process is killed with SIGKILL; the writers see the connection drop and
stop, their unanswered writes stay "in flight". The server is restarted on
the same directory and every key is read back:

- ``appendfsync always``: each key must hold its latest acknowledged value,
  or one of its writes in flight at the kill (it may have been applied); a
  key never acknowledged may also be absent. No key or value that was never
  written may appear. Repeated for several kill rounds on the same
  directory, each round continuing from what the previous restart read.
- ``appendfsync everysec``: the acknowledged writes missing after the
  restart are measured, with how long before the kill they were
  acknowledged; they must all fall within about the last second (the
  ``everysec`` contract, ``LOSS_WINDOW``). The figure is printed. A SIGKILL
  of the process alone should lose nothing (appends reach the page cache
  before the acknowledgement; only a crash of the machine loses the
  unsynced second), so the lag of the background sync, sampled through
  ``info persistence`` during the load, is printed as well, and bounded
  (``LAG_BOUND``): it is what a crash of the machine would lose.
- MSETs with ``always``: each writer MSETs all its keys at once (half the
  writers' keys share a hash tag: one shard's ``GROUP`` record; the others
  spread over the shards: a multi-shard round with its intent). Besides the
  ``always`` rule per key, all the keys of a writer must hold the same MSET:
  none torn by the kill or by recovery.

Timing varies from run to run; the ``always`` assertions do not depend on
it (they hold for every interleaving of writes and kill), and the two time
bounds of the ``everysec`` test leave half a second and more of margin.
Every server runs on 127.0.0.1 with a port the OS picks, and is killed in a
``finally`` (the fixture kills any left running).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio

from kvmemo.client import Client, DisconnectedError, connect

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20  # seconds for a server to print its first line (recovery included)
STOP_TIMEOUT = 10  # seconds for the writers to notice a killed server
FIRST_LINE = re.compile(r"^KVMemo listening on (ws://127\.0\.0\.1:(\d+)/ws)$")

SHARDS = 4
SESSIONS = 4  # WebSocket sessions of the load
WRITERS = 4  # writer tasks per session, each owning KEYS_PER_WRITER keys
KEYS_PER_WRITER = 8
ROUNDS = 5  # SIGKILLs of the always test
KILL_AFTER = (0.3, 1.2)  # seconds of load before each kill, drawn uniformly
EVERYSEC_LOAD = 2.5  # seconds of load before the kill of the everysec test
LOSS_WINDOW = 1.5  # seconds: everysec may lose only writes acknowledged this close to the kill
LAG_SAMPLE = 0.1  # seconds between samples of the sync lag during the everysec load
LAG_BOUND = 2.5  # seconds: the sync runs every second; the rest is room for a loaded machine
SEED = 5


@attrs.define(eq=False)
class KeyModel:
    """What the test knows about one key.

    Invariants: ``current`` is the latest acknowledged value (or the value
    read after the last restart, ``base``); ``pending`` are the writes sent
    after it and not answered; ``acks`` are ``(value, ack time)`` since the
    restart.
    """

    key: bytes
    base: bytes | None = None
    current: bytes | None = None
    pending: list[bytes] = attrs.Factory(list)
    acks: list[tuple[bytes, float]] = attrs.Factory(list)
    seq: int = 0

    def next_value(self) -> bytes:
        self.seq += 1
        value = b"%s=%d" % (self.key, self.seq)
        self.pending.append(value)
        return value

    def acknowledged(self, value: bytes, at: float) -> None:
        self.current = value
        self.pending.clear()
        self.acks.append((value, at))

    def restarted(self, value: bytes | None) -> None:
        """Continue from what the restarted server holds."""
        self.base = self.current = value
        self.pending.clear()
        self.acks.clear()


def make_models() -> list[list[list[KeyModel]]]:
    """Keys per session, per writer: ``s{session}w{writer}k{n}``."""
    return [
        [
            [KeyModel(b"s%dw%dk%d" % (s, w, k)) for k in range(KEYS_PER_WRITER)]
            for w in range(WRITERS)
        ]
        for s in range(SESSIONS)
    ]


def all_keys(models: list[list[list[KeyModel]]]) -> list[KeyModel]:
    return [m for session in models for writer in session for m in writer]


# -- the server process ----------------------------------------------------------------------


def env() -> dict[str, str]:
    """The environment of a server: no KVMEMO_* from outside, this checkout first."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("KVMEMO_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


@attrs.frozen
class Server:
    process: trio.Process
    url: str


@attrs.define
class Launcher:
    """Starts servers on one data directory; the fixture kills every one still running."""

    data_dir: Path
    logs: Path
    processes: list[trio.Process] = attrs.Factory(list)

    async def start(self, fsync: str) -> Server:
        """Start a server and wait for its first line (recovery is done by then)."""
        log = self.logs / f"server-{len(self.processes)}.log"
        with log.open("wb") as stderr:  # a local file, opened once: no need for a thread
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "kvmemo",
                    "serve",
                    "--port",
                    "0",
                    "--no-resp",
                    "--shards",
                    str(SHARDS),
                    "--dir",
                    str(self.data_dir),
                    "--appendfsync",
                    fsync,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env(),
            )
        self.processes.append(process)
        assert process.stdout is not None
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in data:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the server exited before its first line: {log.read_text()}"
                data += chunk
        first = data.partition(b"\n")[0].decode()
        match = FIRST_LINE.match(first)
        assert match, first
        return Server(process, match[1])


async def kill(process: trio.Process) -> None:
    """SIGKILL ``process`` (if it runs) and reap it."""
    if process.returncode is None:
        process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    logs = tmp_path / "logs"
    logs.mkdir()
    launcher = Launcher(tmp_path / "data", logs)
    try:
        yield launcher
    finally:
        for process in launcher.processes:
            await kill(process)


# -- the load ---------------------------------------------------------------------------------


async def writer(client: Client, keys: list[KeyModel], acked: trio.Event) -> None:
    """Write ``keys`` round-robin, one write at a time, until the connection drops.

    ``acked`` is set at the first acknowledgement of any writer.
    """
    while True:
        for model in keys:
            value = model.next_value()
            try:
                await client.set(model.key, value)
            except DisconnectedError:
                return
            model.acknowledged(value, time.monotonic())
            acked.set()


Writer = Callable[[Client, list[KeyModel], trio.Event], Awaitable[None]]


async def session(
    url: str, writers: list[list[KeyModel]], acked: trio.Event, write: Writer | None = None
) -> None:
    """One connection running ``write`` (:func:`writer` by default) for each list of keys."""
    try:
        async with connect(url) as client, trio.open_nursery() as nursery:
            for keys in writers:
                nursery.start_soon(write or writer, client, keys, acked)
    except DisconnectedError:
        pass  # the server was killed before this session was set up


async def load_then_kill(
    server: Server, models: list[list[list[KeyModel]]], seconds: float
) -> float:
    """Run the load for ``seconds`` from its first acknowledgement (connecting may be
    slow on a loaded machine), SIGKILL the server under it; the kill's monotonic time."""
    killed_at = 0.0
    acked = trio.Event()
    with trio.fail_after(seconds + START_TIMEOUT + STOP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for writers in models:
                nursery.start_soon(session, server.url, writers, acked)
            await acked.wait()
            await trio.sleep(seconds)  # the workload itself, not a wait for an effect
            killed_at = time.monotonic()
            await kill(server.process)
    return killed_at


async def read_back(server: Server, keys: list[KeyModel]) -> tuple[list[bytes | None], set[bytes]]:
    """Every key's value, and every key the server holds."""
    with trio.fail_after(STOP_TIMEOUT):
        async with connect(server.url) as client:
            values = await client.mget(*[m.key for m in keys])
            present = set(await client.keys("*"))
    return values, present


def check_always(
    keys: list[KeyModel], values: list[bytes | None], present: set[bytes]
) -> list[str]:
    """Violations of: each key holds its latest ack or a write in flight; nothing else exists."""
    problems = []
    for model, value in zip(keys, values, strict=True):
        if value != model.current and value not in model.pending:
            problems.append(
                f"{model.key!r}: read {value!r}, expected the last acknowledged "
                f"{model.current!r} or one in flight {model.pending!r}"
            )
    phantoms = present - {m.key for m in keys}
    if phantoms:
        problems.append(f"keys never written: {sorted(phantoms)[:5]}")
    return problems


async def test_sigkill_under_load_loses_no_acknowledged_write_with_appendfsync_always(
    launcher: Launcher,
) -> None:
    rng = random.Random(SEED)
    models = make_models()
    keys = all_keys(models)
    rounds = []
    with trio.fail_after(60):
        server = await launcher.start("always")
        for round_no in range(ROUNDS):
            await load_then_kill(server, models, rng.uniform(*KILL_AFTER))
            acked = sum(len(m.acks) for m in keys)
            in_flight = sum(len(m.pending) for m in keys)
            server = await launcher.start("always")  # the same directory: recovery
            values, present = await read_back(server, keys)
            problems = check_always(keys, values, present)
            assert not problems, f"round {round_no}: {len(problems)} violations: {problems[:5]}"
            assert acked > 0, f"round {round_no}: no write was acknowledged before the kill"
            applied = sum(1 for m, v in zip(keys, values, strict=True) if v in m.pending)
            rounds.append((acked, in_flight, applied))
            for model, value in zip(keys, values, strict=True):
                model.restarted(value)  # the next round loads this same server
        await kill(server.process)
    total = sum(a for a, _, _ in rounds)
    print(
        f"\nappendfsync always: {ROUNDS} SIGKILLs, {total} acknowledged writes, none lost; "
        "per round (acknowledged, in flight at the kill, of those applied): "
        + ", ".join(f"({a}, {f}, {p})" for a, f, p in rounds)
    )


@attrs.frozen
class Loss:
    """Acknowledged writes missing after a restart."""

    acknowledged: int
    missing: list[float]  # how long before the kill each missing write was acknowledged

    def describe(self) -> str:
        if not self.missing:
            return f"0 of {self.acknowledged} acknowledged writes missing"
        return (
            f"{len(self.missing)} of {self.acknowledged} acknowledged writes missing, "
            f"acknowledged {min(self.missing):.3f}..{max(self.missing):.3f} s before the kill "
            f"(span {max(self.missing) - min(self.missing):.3f} s)"
        )


def measure_loss(
    keys: list[KeyModel], values: list[bytes | None], present: set[bytes], killed_at: float
) -> tuple[Loss, list[str]]:
    """The acknowledged writes each key lost, and any value that was never written."""
    missing: list[float] = []
    problems = []
    for model, value in zip(keys, values, strict=True):
        if value == model.current or value in model.pending:
            continue
        acked = [v for v, _ in model.acks]
        if value in acked:  # an older acknowledged value: the later ones are lost
            lost = model.acks[acked.index(value) + 1 :]
        elif value == model.base:  # what the server held before this round: all lost
            lost = model.acks
        else:
            problems.append(f"{model.key!r}: read {value!r}, which was never written")
            continue
        missing += [killed_at - at for _, at in lost]
    phantoms = present - {m.key for m in keys}
    if phantoms:
        problems.append(f"keys never written: {sorted(phantoms)[:5]}")
    return Loss(sum(len(m.acks) for m in keys), missing), problems


async def sample_sync_lag(url: str, lags: list[float]) -> None:
    """Record ``info persistence``'s sync lag until cancelled or the server dies."""
    try:
        async with connect(url) as client:
            while True:
                info = await client.info("persistence")
                lags.append(float(info["persistence"]["sync_lag_seconds"]))
                await trio.sleep(LAG_SAMPLE)
    except DisconnectedError:
        return


async def test_sigkill_with_appendfsync_everysec_loses_at_most_about_a_second_of_writes(
    launcher: Launcher,
) -> None:
    models = make_models()
    keys = all_keys(models)
    lags: list[float] = []
    with trio.fail_after(60):
        server = await launcher.start("everysec")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_sync_lag, server.url, lags)
            killed_at = await load_then_kill(server, models, EVERYSEC_LOAD)
        server = await launcher.start("everysec")
        values, present = await read_back(server, keys)
        await kill(server.process)
    loss, problems = measure_loss(keys, values, present, killed_at)
    assert not problems, problems[:5]
    assert loss.acknowledged > 0, "no write was acknowledged before the kill"
    late = [age for age in loss.missing if age > LOSS_WINDOW]
    assert not late, (
        f"{len(late)} lost writes were acknowledged more than {LOSS_WINDOW} s before the kill: "
        + loss.describe()
    )
    assert lags, "the sync lag was never sampled"
    assert max(lags) <= LAG_BOUND, f"the log went unsynced for {max(lags)} s under load"
    print(
        f"\nappendfsync everysec, SIGKILL after {EVERYSEC_LOAD} s of load: {loss.describe()}; "
        f"sync lag under load (exposure to a machine crash): max {max(lags, default=0):.3f} s "
        f"over {len(lags)} samples"
    )


# -- MSETs under SIGKILL: whole, and durable once acknowledged -------------------------------


def make_mset_models() -> list[list[list[KeyModel]]]:
    """Keys per session, per writer; even writers' keys share a hash tag (one shard: one
    ``GROUP`` record), odd writers' keys spread over the shards (a multi-shard round: an
    intent and a part per shard)."""
    return [
        [
            [
                KeyModel(b"{s%dw%d}k%d" % (s, w, k) if w % 2 == 0 else b"s%dw%dk%d" % (s, w, k))
                for k in range(KEYS_PER_WRITER)
            ]
            for w in range(WRITERS)
        ]
        for s in range(SESSIONS)
    ]


async def mset_writer(client: Client, keys: list[KeyModel], acked: trio.Event) -> None:
    """MSET all of ``keys`` at once, each time with the next value of each, until the drop.

    ``acked`` is set at the first acknowledgement of any writer.
    """
    while True:
        pairs = [(model.key, model.next_value()) for model in keys]
        try:
            await client.mset(pairs)
        except DisconnectedError:
            return
        at = time.monotonic()
        for model, (_, value) in zip(keys, pairs, strict=True):
            model.acknowledged(value, at)
        acked.set()


def seq_of(value: bytes | None) -> int | None:
    return None if value is None else int(value.rpartition(b"=")[2])


async def test_sigkill_leaves_every_mset_whole_and_every_acknowledged_one_durable(
    launcher: Launcher,
) -> None:
    # Each key holds its writer's last acknowledged MSET or one in flight
    # (check_always), and all the keys of one writer hold the same MSET:
    # none is torn, whether it was one shard's GROUP record or a multi-shard
    # round with its intent, acknowledged or cut by the kill.
    rng = random.Random(SEED + 1)
    models = make_mset_models()
    keys = all_keys(models)
    acked_total = 0
    with trio.fail_after(60):
        server = await launcher.start("always")
        for round_no in range(ROUNDS):
            acked = trio.Event()
            with trio.fail_after(KILL_AFTER[1] + START_TIMEOUT + STOP_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for writers in models:
                        nursery.start_soon(session, server.url, writers, acked, mset_writer)
                    await acked.wait()  # the load runs from its first acknowledgement
                    await trio.sleep(rng.uniform(*KILL_AFTER))  # the workload, not a wait
                    await kill(server.process)
            acked_total += sum(len(m.acks) for m in keys)
            server = await launcher.start("always")
            values, present = await read_back(server, keys)
            problems = check_always(keys, values, present)
            by_key = dict(zip((m.key for m in keys), values, strict=True))
            for per_session in models:
                for writer_keys in per_session:
                    seqs = {seq_of(by_key[m.key]) for m in writer_keys}
                    if len(seqs) != 1:
                        problems.append(f"torn MSET of {writer_keys[0].key!r}...: seqs {seqs}")
            assert not problems, f"round {round_no}: {len(problems)} violations: {problems[:5]}"
            for model, value in zip(keys, values, strict=True):
                model.restarted(value)
        await kill(server.process)
    assert acked_total > 0
    msets = acked_total // KEYS_PER_WRITER
    print(f"\nMSETs under {ROUNDS} SIGKILLs: {msets} acknowledged, none torn or lost")
