"""A multi-shard write is never torn by a SIGKILL of a real ``kvmemo serve --dir`` process.

The writes are MSETs, and (``always``) MULTI/EXEC transactions of one SET per key.

Design. Each shard writes its own log, so a SIGKILL between two shards'
appends could leave an unacknowledged MSET in part on disk: after a restart
some of its keys held the new value and others the old (reproduced before
the intent log, ``docs/design-atomic-durability.md``). This test is that
reproduction, as a regression test.

A server process (started by :class:`test_persistence_process.Launcher`:
``--port 0 --no-resp --shards 16 --dir DIR``) takes the load of ``WRITERS``
writer tasks, each on its own WebSocket session. Each writer owns a group of
``GROUP`` keys (``k{n}:g{writer}``) spread over at least two shards (checked
first with :class:`~kvmemo.storage.slots.SlotMap`), and loops: MSET every
key of its group to one tag (``w{writer}:{sequence}``), one MSET at a time.
The test keeps each group's model: the latest acknowledged tag (or the tag
read after the last restart), the one in flight, and the tags acknowledged
since the restart. After a random load (seeded) the server is killed with
SIGKILL, restarted on the same directory, and every group is read back with
one MGET:

- every key of a group holds the same tag (all missing if the group was
  never written): the MSET is whole, never torn;
- ``appendfsync always``: that tag is the latest acknowledged one or the one
  in flight at the kill;
- ``appendfsync everysec``: it may also be an older tag acknowledged since
  the restart, or the one read after it (a lost suffix, still whole). A
  SIGKILL of the process alone should lose none; the count is printed.

No key outside the groups may appear. The next round continues writing from
what the restart read, on the same server; ``ROUNDS`` rounds per mode.

Sensitivity. Sixteen shards, as in the reproduction (the default), and each
group on 8 of them (keys ``g{writer}k{n}`` would differ only in their last
byte, and CRC16 then puts a group on just 4 shards); many short loads, since
each kill is a chance to land between two shards' appends. With the intent
write disabled in the engine, this test saw torn groups on every run tried
(often in the first rounds); with the launcher's 4 shards and longer loads
it missed them on most runs. Timing varies from run to run (where the kill
lands); the assertions hold for every interleaving of MSETs and kill. Every
server runs on 127.0.0.1 with a port the OS picks; the fixture kills any left
running.
"""

from __future__ import annotations

import random

import attrs
import pytest
import test_persistence_process
import trio
from test_persistence_process import (  # noqa: F401 - launcher is a fixture
    START_TIMEOUT,
    STOP_TIMEOUT,
    Launcher,
    Server,
    kill,
    launcher,
)

from kvmemo.client import DisconnectedError, connect
from kvmemo.storage.slots import SlotMap

SHARDS = 16  # the launcher's servers run with this many shards (see sixteen_shards)
WRITERS = 8  # writer tasks, one WebSocket session and one key group each
GROUP = 8  # keys per group, all set by every MSET of its writer
ROUNDS = 8  # SIGKILL + restart rounds per appendfsync mode
KILL_AFTER = (0.2, 0.6)  # seconds of load before each kill, drawn uniformly
SEED = 11


@attrs.define(eq=False)
class GroupModel:
    """What the test knows about one writer's group.

    Invariants: ``current`` is the latest acknowledged tag (or the tag read
    after the last restart, ``base``; None: never written); ``pending`` is
    the tag of the MSET sent and not answered (at most one: the writer waits
    for each); ``acked`` are the tags acknowledged since the restart, oldest
    first. Tags are unique over the whole test (the sequence never restarts).
    """

    writer: int
    keys: list[bytes]
    base: bytes | None = None
    current: bytes | None = None
    pending: bytes | None = None
    acked: list[bytes] = attrs.Factory(list)
    seq: int = 0

    def next_tag(self) -> bytes:
        self.seq += 1
        self.pending = b"w%d:%d" % (self.writer, self.seq)
        return self.pending

    def acknowledged(self, tag: bytes) -> None:
        self.current = tag
        self.pending = None
        self.acked.append(tag)

    def restarted(self, tag: bytes | None) -> None:
        """Continue from what the restarted server holds."""
        self.base = self.current = tag
        self.pending = None
        self.acked.clear()


@pytest.fixture
def sixteen_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the sibling module's launcher start its servers with ``SHARDS`` shards."""
    monkeypatch.setattr(test_persistence_process, "SHARDS", SHARDS)


async def start(servers: Launcher, fsync: str) -> Server:
    """Start a server on the launcher's directory, checking it runs with ``SHARDS`` shards."""
    server = await servers.start(fsync)
    args = server.process.args
    assert isinstance(args, list), args
    assert args[args.index("--shards") + 1] == str(SHARDS), args
    return server


def make_groups() -> list[GroupModel]:
    """Keys ``k{n}:g{writer}``: the varying byte comes first, so the CRC spreads a group."""
    return [GroupModel(w, [b"k%d:g%d" % (n, w) for n in range(GROUP)]) for w in range(WRITERS)]


def test_every_group_spans_several_shards() -> None:
    """The premise: each MSET of the load is a multi-shard round."""
    slots = SlotMap(SHARDS)
    for group in make_groups():
        shards = {slots.shard_of(key) for key in group.keys}
        assert len(shards) >= 2, f"group {group.writer} is on one shard only: {shards}"


# -- the load ---------------------------------------------------------------------------------


async def writer(url: str, group: GroupModel, how: str, acked: trio.Event) -> None:
    """Write the whole group to a new tag, one write at a time, until the connection drops.

    ``how``: ``mset`` (one MSET) or ``transaction`` (one SET per key in a
    MULTI/EXEC transaction: its effects are known only as it runs).
    ``acked`` is set at the first acknowledgement of any writer.
    """
    try:
        async with connect(url) as client:
            while True:
                tag = group.next_tag()
                if how == "mset":
                    await client.mset({key: tag for key in group.keys})
                else:
                    results = await client.transaction(*(("SET", key, tag) for key in group.keys))
                    assert results == ["OK"] * len(group.keys), results
                group.acknowledged(tag)
                acked.set()
    except DisconnectedError:
        return  # killed: the tag in flight (if any) stays pending


async def load_then_kill(
    server: Server, groups: list[GroupModel], seconds: float, how: str
) -> None:
    """Run the load for ``seconds`` from its first acknowledgement, then SIGKILL the server.

    Counted from the first acknowledgement, not from the start: on a slow
    machine the sessions' connecting could take all of a short load, and a
    round would kill a server that acknowledged nothing.
    """
    acked = trio.Event()
    with trio.fail_after(seconds + START_TIMEOUT + STOP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(writer, server.url, group, how, acked)
            await acked.wait()
            await trio.sleep(seconds)  # the workload itself, not a wait for an effect
            await kill(server.process)


async def read_back(
    server: Server, groups: list[GroupModel]
) -> tuple[list[list[bytes | None]], set[bytes]]:
    """Every group's values (one MGET each), and every key the server holds."""
    with trio.fail_after(STOP_TIMEOUT):
        async with connect(server.url) as client:
            values = [await client.mget(*group.keys) for group in groups]
            present = set(await client.keys("*"))
    return values, present


def check_groups(
    fsync: str,
    round_no: int,
    groups: list[GroupModel],
    values: list[list[bytes | None]],
    present: set[bytes],
) -> tuple[list[str], int]:
    """Violations (torn groups, tags not allowed), and how many groups came back older."""
    problems = []
    older = 0
    for group, found in zip(groups, values, strict=True):
        tags = set(found)
        where = (
            f"round {round_no}, group {group.writer}: "
            + ", ".join(f"{k.decode()}={v!r}" for k, v in zip(group.keys, found, strict=True))
            + f"; last acknowledged {group.current!r}, in flight {group.pending!r}"
        )
        if len(tags) != 1:
            problems.append(f"TORN {where}")
            continue
        (tag,) = tags
        if tag == group.current or (tag is not None and tag == group.pending):
            continue
        if fsync != "always" and (tag in group.acked or tag == group.base):
            older += 1  # whole, but a lost suffix of acknowledged MSETs
            continue
        problems.append(f"tag not allowed with appendfsync {fsync}: {where}")
    phantoms = present - {key for group in groups for key in group.keys}
    if phantoms:
        problems.append(f"round {round_no}: keys never written: {sorted(phantoms)[:5]}")
    return problems, older


@pytest.mark.parametrize(
    ("fsync", "how"), [("always", "mset"), ("everysec", "mset"), ("always", "transaction")]
)
async def test_sigkill_never_leaves_a_multi_shard_write_torn(
    launcher: Launcher,  # noqa: F811 - the imported fixture
    sixteen_shards: None,
    fsync: str,
    how: str,
) -> None:
    rng = random.Random(f"{SEED}-{fsync}-{how}")
    groups = make_groups()
    rounds = []
    with trio.fail_after(60):
        server = await start(launcher, fsync)
        for round_no in range(ROUNDS):
            await load_then_kill(server, groups, rng.uniform(*KILL_AFTER), how)
            acked = sum(len(g.acked) for g in groups)
            in_flight = sum(g.pending is not None for g in groups)
            server = await start(launcher, fsync)  # the same directory: recovery
            values, present = await read_back(server, groups)
            problems, older = check_groups(fsync, round_no, groups, values, present)
            assert not problems, f"appendfsync {fsync}: {len(problems)} violations: " + "\n".join(
                problems[:5]
            )
            assert acked > 0, f"round {round_no}: no MSET was acknowledged before the kill"
            applied = sum(
                g.pending is not None and found[0] == g.pending
                for g, found in zip(groups, values, strict=True)
            )
            rounds.append((acked, in_flight, applied, older))
            for group, found in zip(groups, values, strict=True):
                group.restarted(found[0])  # the next round loads this same server
        await kill(server.process)
    total = sum(a for a, _, _, _ in rounds)
    print(
        f"\nappendfsync {fsync}, {how}: {ROUNDS} SIGKILLs x {WRITERS} groups of {GROUP} keys over "
        f"{SHARDS} shards, {total} acknowledged writes, no group torn; per round "
        "(acknowledged, in flight at the kill, of those applied, groups older than the last ack): "
        + ", ".join(f"({a}, {f}, {p}, {o})" for a, f, p, o in rounds)
    )
