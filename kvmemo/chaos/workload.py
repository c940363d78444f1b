"""The chaos workload: concurrent clients, unique values, recorded history.

Each worker loops over random operations on a small key space, recording
each one (invocation, completion, outcome) for the history checker. Every
key of a run starts with ``chaos:RUN:``, where RUN is the run's random id
(:attr:`WorkloadConfig.run_id`), so a run never touches another run's keys
or a user's, and a store that already holds data cannot confuse the checker:

- register keys ``chaos:RUN:reg:N``: ``set`` (unique values, some with a
  TTL), ``get``, ``del``, ``expire``;
- counter keys ``chaos:RUN:ctr:N``: ``incr`` (checked at the end against the
  number of acknowledged and possibly-applied increments);
- MSET groups ``chaos:RUN:grp:N:a|b|c`` (no hash tag, so a group spans
  shards): ``mset`` of one unique value per key, ``mget`` of the whole group. Against a target
  with transactions (the embedded store), half of them are MULTI/EXEC
  transactions of single-key SETs or GETs instead, checked by the same rule:
  a group is written and read whole.

Meanwhile a killer task kills actors at the given rate through the target's
own chaos API (random shards, the ttl-manager, the eviction-manager), and,
against a server, drops one of the workers' sessions now and then.
"""

from __future__ import annotations

import inspect
import itertools
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..errors import KVMemoError
from .history import Op, Outcome

WRITE_TTL = 0.5  # seconds of TTL given to a share of the sets and expires
TRANSACTION = "transaction"  # a command tuple (TRANSACTION, call, call, ...): one MULTI/EXEC


@attrs.define
class Recorder:
    """Collects the history of a run."""

    ops: list[Op] = attrs.field(factory=list)
    _next: int = 0
    baseline_until: float = 0.0

    def next_id(self) -> int:
        self._next += 1
        return self._next


NOT_APPLIED = frozenset(
    {
        "UNAVAILABLE",
        "OVERLOADED",
        "OOM",
        "TOO_LARGE",
        "SYNTAX",
        "ARITY",
        "NOT_INTEGER",
        "UNKNOWN_METHOD",
        "NOAUTH",
        "DISABLED",
        "INVALID_REQUEST",
        "PARSE",
    }
)  # error kinds that guarantee nothing was applied


def classify(exc: BaseException) -> tuple[Outcome, str]:
    """How a failed call counts: certainly not applied, or maybe applied.

    An error says "not applied" only by its kind (UNAVAILABLE, OVERLOADED,
    client errors) or by ``applied: false``; anything else (a TIMEOUT with
    ``applied`` null, INTERNAL, a dropped session) may have happened.
    """
    if isinstance(exc, KVMemoError):
        kind = exc.kind
        if kind in NOT_APPLIED or exc.data.get("applied", None) is False:
            return Outcome.FAILED, kind
        return Outcome.UNKNOWN, kind
    # Lost connection and anything else: the request may have been applied.
    return Outcome.UNKNOWN, type(exc).__name__


RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # no braces: a run id never makes a hash tag
RUN_ID_BYTES = 4  # random bytes of a generated run id (8 hex digits)


def new_run_id() -> str:
    """A fresh random run id (not drawn from the seed: two runs of one seed differ)."""
    return secrets.token_hex(RUN_ID_BYTES)


def _check_run_id(_: object, __: object, value: str) -> None:
    if not RUN_ID.fullmatch(value):
        raise ValueError(f"run_id must be 1 to 64 of [0-9A-Za-z_-], got {value!r}")


@attrs.frozen
class WorkloadConfig:
    """What a chaos run does, and the names of the keys it uses.

    Every key starts with :attr:`prefix` (``chaos:RUN:``). The run id holds no
    ``{`` or ``}``, so it never becomes a hash tag: the keys of a group still
    spread over the shards as they would without it.
    """

    clients: int = 8
    keys: int = 20
    counters: int = 4
    groups: int = 4
    duration: float = 10.0
    kill_rate: float = 2.0  # kills per second
    baseline: float = 0.2  # fraction of the duration run without kills first
    seed: int = 0
    run_id: str = attrs.field(factory=new_run_id, validator=_check_run_id)

    @property
    def prefix(self) -> str:
        """What every key of this run starts with."""
        return f"chaos:{self.run_id}:"

    def register(self, i: int) -> str:
        return f"{self.prefix}reg:{i}"

    def counter(self, i: int) -> str:
        return f"{self.prefix}ctr:{i}"

    def group(self, g: int) -> tuple[str, ...]:
        return tuple(f"{self.prefix}grp:{g}:{part}" for part in "abc")

    def all_keys(self) -> list[str]:
        """Every key the run may write."""
        return (
            [self.register(i) for i in range(self.keys)]
            + [self.counter(i) for i in range(self.counters)]
            + [k for g in range(self.groups) for k in self.group(g)]
        )


Target = Any  # a kvmemo.api.Commands with execute(); kill via `kill(name)`


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


async def worker(
    client_id: int,
    kv: Target,
    cfg: WorkloadConfig,
    rec: Recorder,
    rng: random.Random,
    end: float,
    clock: Callable[[], float],
    seq: itertools.count[int] | None = None,
) -> None:
    """Run random operations until ``end``, recording each.

    ``seq`` numbers this client's values; pass the same counter when the
    worker resumes on a new session, so that every value stays unique.
    """
    seq = seq if seq is not None else itertools.count(1)
    transactions = callable(getattr(kv, "transaction", None))
    while clock() < end and not getattr(kv, "closed", False):
        value = f"c{client_id}-{next(seq)}"
        roll = rng.random()
        if roll < 0.3:
            key = cfg.register(rng.randrange(cfg.keys))
            ttl = WRITE_TTL if rng.random() < 0.2 else None
            args: list[Any] = [key, value] + (["PX", int(ttl * 1000)] if ttl else [])
            await _record(
                rec, client_id, kv, "set", (key,), (value,), ("set", *args), clock, ttl=ttl
            )
        elif roll < 0.6:
            key = cfg.register(rng.randrange(cfg.keys))
            await _record(rec, client_id, kv, "get", (key,), (None,), ("get", key), clock)
        elif roll < 0.65:
            key = cfg.register(rng.randrange(cfg.keys))
            await _record(rec, client_id, kv, "del", (key,), (None,), ("del", key), clock)
        elif roll < 0.7:
            key = cfg.register(rng.randrange(cfg.keys))
            await _record(
                rec,
                client_id,
                kv,
                "expire",
                (key,),
                (None,),
                ("pexpire", key, int(WRITE_TTL * 1000)),
                clock,
                ttl=WRITE_TTL,
            )
        elif roll < 0.8:
            key = cfg.counter(rng.randrange(cfg.counters))
            await _record(rec, client_id, kv, "incr", (key,), (None,), ("incr", key), clock)
        elif roll < 0.9:
            keys = cfg.group(rng.randrange(cfg.groups))
            values = tuple(f"{value}:{part}" for part in "abc")
            flat = [x for kv_ in zip(keys, values, strict=True) for x in kv_]
            command: tuple[Any, ...] = ("mset", *flat)
            if transactions and rng.random() < 0.5:
                sets = [("set", k, v) for k, v in zip(keys, values, strict=True)]
                command = (TRANSACTION, *sets)
            await _record(rec, client_id, kv, "mset", keys, values, command, clock)
        else:
            keys = cfg.group(rng.randrange(cfg.groups))
            command = ("mget", *keys)
            if transactions and rng.random() < 0.5:
                command = (TRANSACTION, *[("get", k) for k in keys])
            await _record(rec, client_id, kv, "mget", keys, (None,) * 3, command, clock)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def _record(
    rec: Recorder,
    client_id: int,
    kv: Target,
    kind: str,
    keys: tuple[str, ...],
    values: tuple[str | None, ...],
    command: tuple[Any, ...],
    clock: Callable[[], float],
    ttl: float | None = None,
) -> None:
    op_id = rec.next_id()
    start = clock()
    result: Any = None
    error: str | None = None
    try:
        if command[0] is TRANSACTION:
            result = await kv.transaction(*command[1:])
            failed = [r for r in result if isinstance(r, BaseException)]
            if failed:
                raise failed[0]  # none expected here: a SET or GET of a string key
        else:
            result = await kv.execute(*command)
        outcome = Outcome.OK
    except (KVMemoError, ConnectionError, OSError, trio.BrokenResourceError) as exc:
        outcome, error = classify(exc)
    except Exception as exc:  # noqa: BLE001 - any other failure is recorded: may have happened
        outcome, error = Outcome.UNKNOWN, type(exc).__name__
    done = clock()
    int_result: int | None = None
    if kind in ("get", "mget") and outcome is Outcome.OK:
        got = result if kind == "mget" else [result]
        values = tuple(_text(v) for v in got)
    elif kind in ("expire", "incr") and outcome is Outcome.OK:
        int_result = int(result)
    if kind == "expire" and int_result == 0:
        ttl = None
    rec.ops.append(
        Op(op_id, client_id, kind, keys, values, start, done, outcome, ttl, error, int_result)
    )


@attrs.define
class KillLog:
    """The kills of a run, and the kill attempts that did not kill.

    Attributes:
        kills: (time, name) of every actor killed and session dropped.
        attempts: actor kills tried (sessions not counted).
        failures: kill attempts the target refused or that failed, by error
            kind (``UNKNOWN_METHOD``, ``SYNTAX``, ``DisconnectedError``, ...).
        first_failure: the first failure's message for each kind.
        not_running: kill attempts that found the actor already down (it was
            restarting): not a kill, not a failure.
    """

    kills: list[tuple[float, str]] = attrs.field(factory=list)
    attempts: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    first_failure: dict[str, str] = attrs.field(factory=dict)
    not_running: int = 0

    def by_kind(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for _, name in self.kills:
            counts["shard" if name.startswith("shard-") else name] += 1
        return dict(counts)

    @property
    def actor_kills(self) -> int:
        """Actors killed (dropped sessions not counted)."""
        return sum(1 for _, name in self.kills if name != "session")

    def failed(self, exc: BaseException) -> None:
        """Count a kill attempt that failed with ``exc``."""
        kind = exc.kind if isinstance(exc, KVMemoError) else type(exc).__name__
        self.failures[kind] += 1
        self.first_failure.setdefault(kind, " ".join(str(exc).split()) or kind)


async def killer(
    kill: Callable[[str], Awaitable[bool] | bool],
    names: list[str],
    rate: float,
    start: float,
    end: float,
    rng: random.Random,
    log: KillLog,
    clock: Callable[[], float],
    drop_session: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Kill random actors (and sessions) between ``start`` and ``end``.

    Kills come at random (a Poisson process of the given rate), except that
    the first comes by the middle of the window at the latest: a run with a
    kill rate always tries to kill. A kill the target refuses, or that fails,
    is counted in ``log.failures`` by error kind (never silently skipped).
    """
    await trio.sleep(max(0.0, start - clock()))
    if rate <= 0:
        return
    wait = min(rng.expovariate(rate), max(0.0, end - clock()) / 2)
    while True:
        await trio.sleep(wait)
        wait = rng.expovariate(rate)
        if clock() >= end:
            return
        roll = rng.random()
        if drop_session is not None and roll < 0.1:
            if await drop_session():
                log.kills.append((clock(), "session"))
            continue
        name = rng.choice(names)
        log.attempts += 1
        try:
            killed = await _call(kill, name)
        except (KVMemoError, ConnectionError, OSError, trio.BrokenResourceError) as exc:
            log.failed(exc)
            continue
        if killed is False:
            log.not_running += 1
        else:
            log.kills.append((clock(), name))


def now() -> float:
    """The run's clock (monotonic seconds)."""
    return time.monotonic()
