"""``kvmemo chaos``: kill actors under load, check the history, report what survived.

Runs the :mod:`~kvmemo.chaos.workload` against an embedded store (default)
or a running server started with ``--chaos`` (``--url``), kills actors at a
given rate through the target's own chaos API, then checks the recorded
history with :mod:`~kvmemo.chaos.history`. The exit status is 0 only when
no violation was found and, when kills were asked for, actors were killed.

Against a server, the run first makes sure it can do what it is asked:
that the server accepts ``debug.kill`` (it was started with ``--chaos``),
and that none of the run's keys (``chaos:RUN:*``, RUN a random id) exists.
It deletes its keys at the end unless asked to keep them.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from ..client import check_url
from ..errors import (
    CommandSyntaxError,
    KVMemoError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
    UnknownCommandError,
)
from ..storage.slots import SlotMap
from ..tooling import quiet_on_broken_pipe
from .history import Op, Outcome, Violation, check
from .workload import KillLog, Recorder, WorkloadConfig, killer, now, worker

NAME = "chaos"
# Seconds after a kill during which that shard counts as restarting: the
# restart backoff grows with repeated kills up to its cap (1 s by default),
# plus a margin. Operations on other shards must all succeed.
DISTURBED = 1.5
SETTLE = 5.0  # seconds allowed for every actor to be running again at the end
SESSION_ERRORS = frozenset({"DISCONNECTED"})  # failures caused by dropping the client's session
KEYS_PER_CALL = 256  # keys per EXISTS or DEL of the run's keys: far under any request limit
RETRY_PAUSE = 0.05  # seconds between tries of a call a restarting shard refused
# The actor the kill probe names: no actor has this name, so a server with
# chaos on answers "no actor named ..." and kills nothing.
PROBE_ACTOR = "chaos-probe-no-such-actor"
RETRYABLE = (KVMemoError, ConnectionError, OSError, trio.BrokenResourceError)
# What a shard says while it restarts: the call is tried again (see _retry).
TRANSIENT = (UnavailableError, OverloadedError, RequestTimeoutError)

T = TypeVar("T")


class ChaosSetupError(Exception):
    """The target cannot take this run (a configuration problem): nothing was written."""


@attrs.frozen
class Report:
    """What a chaos run measured."""

    duration: float
    operations: dict[str, Any]
    kills: dict[str, int]
    restarts: int
    errors: dict[str, int]
    availability_untouched: float | None
    p99_ms_baseline: float | None
    p99_ms_chaos: float | None
    violations: list[Violation]
    notes: list[str] = attrs.Factory(list)  # about the setup (see restart_room_note)
    kill_failures: dict[str, int] = attrs.Factory(dict)  # failed kill attempts by error kind
    problems: list[str] = attrs.Factory(list)  # what, besides violations, fails the run
    run_id: str = ""
    keys: str = ""  # what became of the run's keys

    @property
    def passed(self) -> bool:
        """No violation, and nothing else that makes the run fail."""
        return not self.violations and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": round(self.duration, 3),
            "operations": self.operations,
            "kills": self.kills,
            "restarts": self.restarts,
            "errors": self.errors,
            "availability_untouched": self.availability_untouched,
            "p99_ms_baseline": self.p99_ms_baseline,
            "p99_ms_chaos": self.p99_ms_chaos,
            "violations": [v.describe() for v in self.violations],
            "notes": self.notes,
            "kill_failures": self.kill_failures,
            "problems": self.problems,
            "run_id": self.run_id,
            "keys": self.keys,
            "passed": self.passed,
        }

    def render(self) -> str:
        ops = self.operations
        lines = [
            f"chaos run: {self.duration:.1f} s",
            f"operations: {ops['total']} ({ops['ok']} ok, {ops['failed']} failed,"
            f" {ops['unknown']} unknown) by kind {ops['by_kind']}",
            f"kills: {sum(self.kills.values())} {self.kills}",
        ]
        if self.kill_failures:
            lines.append(
                f"failed kill attempts: {sum(self.kill_failures.values())} {self.kill_failures}"
            )
        lines += [
            f"restarts seen: {self.restarts}",
            f"errors: {self.errors or 'none'}",
            "availability of untouched shards: "
            + (
                "n/a"
                if self.availability_untouched is None
                else f"{self.availability_untouched * 100:.3f}% (target 100%)"
            ),
            f"p99 latency: {_ms(self.p99_ms_baseline)} without chaos,"
            f" {_ms(self.p99_ms_chaos)} during chaos",
            f"violations: {len(self.violations)} (target 0)",
        ]
        lines += [v.describe() for v in self.violations]
        if self.keys:
            lines.append(f"keys: {self.keys}")
        lines += [f"note: {note}" for note in self.notes]
        if self.passed:
            lines.append("result: pass")
        else:
            why = [f"{len(self.violations)} violations"] if self.violations else []
            lines.append("result: FAIL: " + "; ".join(why + self.problems))
        return "\n".join(lines)


def restart_room_note(
    kill_rate: float,
    max_restarts: int,
    restart_period: float,
    *,
    chaos_seconds: float = math.inf,
) -> str | None:
    """A warning when kills may come faster than a supervisor allows restarts, else None.

    Past ``max_restarts`` restarts within ``restart_period`` seconds a
    supervisor gives up and its parent restarts its whole subtree (OTP): every
    shard restarts at once, and the shards that were not killed count as
    unavailable. The embedded run gives itself room; a server has its own
    settings. Kills come at random (about a Poisson process), so over a run's
    many windows the busiest one holds far more than the average: the note
    is given when the average plus four standard deviations reaches the
    limit, and it suggests twice that. A run whose kills last
    ``chaos_seconds``, less than the period, has only that long a window.
    """
    mean = kill_rate * min(restart_period, chaos_seconds)
    busiest = math.ceil(mean + 4 * math.sqrt(mean))
    if busiest < max_restarts:
        return None
    return (
        f"{kill_rate:g} kills/s may exceed the server's restart intensity ({max_restarts} in"
        f" {restart_period:g} s): its storage supervisor may give up and restart every shard,"
        " which shows as lost availability of untouched shards; start it with"
        f" --max-restarts {2 * busiest} or more"
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _p99(durations: list[float]) -> float | None:
    if not durations:
        return None
    durations.sort()
    return round(durations[min(len(durations) - 1, math.ceil(0.99 * len(durations)) - 1)] * 1000, 3)


def counter_violations(
    ops: list[Op], finals: dict[str, int | None], initial: dict[str, int] | None = None
) -> list[Violation]:
    """INCR: every acknowledged increment counted, none invented.

    Args:
        ops: the history.
        finals: each counter's value after the run (None: missing).
        initial: each counter's value before the run (missing: 0).
    """
    initial = initial or {}
    out = []
    for key, final in finals.items():
        incrs = [o for o in ops if o.kind == "incr" and o.keys[0] == key]
        acked = [o for o in incrs if o.outcome is Outcome.OK]
        maybe = [o for o in incrs if o.outcome is Outcome.UNKNOWN]
        results = [o.result for o in acked]
        if len(set(results)) != len(results):
            out.append(
                Violation("counter", key, "two INCRs returned the same value", tuple(acked[:10]))
            )
        value = final or 0
        low = initial.get(key, 0) + len(acked)
        if not low <= value <= low + len(maybe):
            out.append(
                Violation(
                    "counter",
                    key,
                    f"final value {value}, expected {low}..{low + len(maybe)}"
                    + (f" ({initial[key]} before the run, " if initial.get(key) else " (")
                    + f"{len(acked)} acknowledged, {len(maybe)} unknown increments)",
                    tuple(acked[-3:]),
                )
            )
    return out


def summarize(
    ops: list[Op],
    kills: KillLog,
    restarts: int,
    violations: list[Violation],
    *,
    shards: int,
    chaos_start: float,
    duration: float,
) -> Report:
    by_kind = Counter(o.kind for o in ops)
    outcomes = Counter(o.outcome for o in ops)
    errors = Counter(o.error for o in ops if o.error)
    slots = SlotMap(shards)
    disturbed: dict[int, list[float]] = {}
    for t, name in kills.kills:
        if name.startswith("shard-"):
            disturbed.setdefault(int(name.split("-")[1]), []).append(t)
    untouched_ok = untouched = 0
    base: list[float] = []
    during: list[float] = []
    for o in ops:
        (base if o.invoke < chaos_start else during).append(o.complete - o.invoke)
        if o.invoke < chaos_start or o.error in SESSION_ERRORS:
            continue  # a dropped session is a session kill, not a shard's availability
        op_shards = {slots.shard_of(k.encode()) for k in o.keys}
        touched = any(
            t - DISTURBED <= o.complete and o.invoke <= t + DISTURBED
            for s in op_shards
            for t in disturbed.get(s, ())
        )
        if not touched:
            untouched += 1
            untouched_ok += o.outcome is Outcome.OK
    return Report(
        duration=duration,
        operations={
            "total": len(ops),
            "ok": outcomes[Outcome.OK],
            "failed": outcomes[Outcome.FAILED],
            "unknown": outcomes[Outcome.UNKNOWN],
            "by_kind": dict(by_kind),
        },
        kills=kills.by_kind(),
        restarts=restarts,
        errors=dict(errors),
        availability_untouched=round(untouched_ok / untouched, 6) if untouched else None,
        p99_ms_baseline=_p99(base),
        p99_ms_chaos=_p99(during),
        violations=violations,
        kill_failures=dict(kills.failures),
    )


def kill_problems(kills: KillLog, kill_rate: float) -> list[str]:
    """Why a run that was asked to kill did not test anything, if it did not.

    A run with a kill rate that killed no actor must never read as a pass,
    whatever its history says: the failed kill attempts say why.
    """
    if kill_rate <= 0 or kills.actor_kills > 0:
        return []
    if kills.failures:
        why = "; ".join(
            f"{n} x {kind}: {kills.first_failure[kind]}" for kind, n in kills.failures.items()
        )
        reason = f"every kill attempt failed ({why})"
    elif kills.not_running:
        reason = f"every kill attempt ({kills.not_running}) found its actor already down"
    else:
        reason = "no kill was attempted (the run ended first)"
    return [f"kills were asked for ({kill_rate:g}/s) but no actor was killed: {reason}"]


async def _retry(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` until it succeeds: a shard may still be restarting after a kill.

    Raises:
        trio.TooSlowError: it did not succeed within ``SETTLE`` seconds.
        KVMemoError: an error that is not one of :data:`TRANSIENT`.
    """
    with trio.fail_after(SETTLE):
        while True:
            try:
                return await call()
            except TRANSIENT:
                await trio.sleep(RETRY_PAUSE)


def _chunks(keys: list[str]) -> list[list[str]]:
    return [keys[i : i + KEYS_PER_CALL] for i in range(0, len(keys), KEYS_PER_CALL)]


async def check_kill_api(kv: Any, url: str) -> None:
    """Make sure the server at ``url`` lets this run kill actors.

    Asks ``debug.kill`` to kill an actor no server has (:data:`PROBE_ACTOR`):
    a server with chaos on answers that there is no such actor, and kills
    nothing.

    Raises:
        ChaosSetupError: the server refuses ``debug.kill``: it was not started
            with ``--chaos``, or refuses the command for another reason.
    """
    try:
        await kv.kill_actor(PROBE_ACTOR)
    except CommandSyntaxError:
        return  # "no actor named ...": the chaos API is there
    except UnknownCommandError:
        raise ChaosSetupError(
            f"the server at {url} was not started with --chaos (it refuses debug.kill):"
            " restart it with `kvmemo serve --chaos`, or give --kill-rate 0"
        ) from None
    except KVMemoError as exc:
        raise ChaosSetupError(
            f"the server at {url} refuses debug.kill ({exc.kind}: {exc})"
        ) from None


async def claim_keys(kv: Any, cfg: WorkloadConfig, url: str) -> None:
    """Make sure none of the run's keys exists: a run overwrites no one's data.

    Raises:
        ChaosSetupError: some do (nothing was written).
        trio.TooSlowError: the store did not answer within ``SETTLE`` seconds.
        KVMemoError: the store refused EXISTS.
    """
    found = 0
    for chunk in _chunks(cfg.all_keys()):
        found += int(await _retry(functools.partial(kv.execute, "exists", *chunk)))
    if found:
        raise ChaosSetupError(
            f"{found} keys of this run ({cfg.prefix}*) already exist on the server at {url};"
            " the run would overwrite them, nothing was written"
        )


async def delete_keys(kv: Any, cfg: WorkloadConfig) -> str:
    """Delete the run's keys; say what became of them (for the report)."""
    pattern = f"{cfg.prefix}*"
    try:
        for chunk in _chunks(cfg.all_keys()):
            await _retry(functools.partial(kv.execute, "del", *chunk))
    except trio.TooSlowError:
        return f"{pattern} NOT all deleted (the store did not answer within {SETTLE:g} s)"
    except RETRYABLE as exc:
        return f"{pattern} NOT all deleted ({' '.join(str(exc).split())})"
    return f"{pattern} deleted (--keep-keys keeps them)"


async def _progress(end: float, start: float, rec: Recorder, kills: KillLog) -> None:
    total = max(end - start, 1e-9)
    while True:
        t = now()
        frac = min(1.0, (t - start) / total)
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r[{bar:<30}] {t - start:5.1f}/{total:.0f} s  ops {len(rec.ops)}"
            f"  kills {len(kills.kills)} "
        )
        sys.stderr.flush()
        if t >= end:
            sys.stderr.write("\n")
            return
        await trio.sleep(0.25)


async def run_embedded(cfg: WorkloadConfig, *, shards: int = 4, progress: bool = False) -> Report:
    """A chaos run against an in-process store."""
    from ..embedded import open_store

    rng = random.Random(cfg.seed)
    rec = Recorder()
    kills = KillLog()
    async with open_store(shards=shards, max_restarts=10_000, restart_period=1.0, chaos=True) as kv:
        names = [f"shard-{i}" for i in range(shards)] + ["ttl-manager", "eviction-manager"]
        start = now()
        chaos_start = start + cfg.duration * cfg.baseline
        end = start + cfg.duration
        async with trio.open_nursery() as nursery:
            for c in range(cfg.clients):
                nursery.start_soon(worker, c, kv, cfg, rec, random.Random(rng.random()), end, now)
            nursery.start_soon(
                killer,
                kv.kill_actor,
                names,
                cfg.kill_rate,
                chaos_start,
                end,
                random.Random(rng.random()),
                kills,
                now,
            )
            if progress:
                nursery.start_soon(_progress, end, start, rec, kills)
        finals = await _settle_and_read_counters(kv, cfg)
        restarts = sum(a["restarts"] for a in kv.actors())
    return attrs.evolve(
        _report(rec, kills, restarts, finals, shards, chaos_start, cfg),
        keys=f"{cfg.prefix}* (in the embedded store, gone with it)",
    )


def _report(
    rec: Recorder,
    kills: KillLog,
    restarts: int,
    finals: dict[str, int | None],
    shards: int,
    chaos_start: float,
    cfg: WorkloadConfig,
) -> Report:
    """Check the recorded history and summarise the run."""
    violations = check(rec.ops) + counter_violations(rec.ops, finals)
    report = summarize(
        rec.ops,
        kills,
        restarts,
        violations,
        shards=shards,
        chaos_start=chaos_start,
        duration=cfg.duration,
    )
    return attrs.evolve(report, problems=kill_problems(kills, cfg.kill_rate), run_id=cfg.run_id)


async def _settle_and_read_counters(kv: Any, cfg: WorkloadConfig) -> dict[str, int | None]:
    finals: dict[str, int | None] = {}
    with trio.move_on_after(SETTLE):
        for i in range(cfg.counters):
            key = cfg.counter(i)
            while True:
                try:
                    value = await kv.execute("get", key)
                except RETRYABLE:  # retried until the shard is back
                    await trio.sleep(RETRY_PAUSE)
                    continue
                finals[key] = None if value is None else int(value)
                break
    return finals


async def run_remote(
    cfg: WorkloadConfig,
    url: str,
    *,
    token: str | None = None,
    progress: bool = False,
    keep_keys: bool = False,
) -> Report:
    """A chaos run against a running server started with ``--chaos``.

    Before any load it checks that the server accepts ``debug.kill`` (when
    ``cfg.kill_rate`` is above 0) and that none of the run's keys exists; it
    deletes them at the end unless ``keep_keys``.

    Raises:
        ChaosSetupError: the server was not started with ``--chaos``, or some
            of the run's keys exist (nothing was written).
        KVMemoError: the server cannot be reached, or refused the token.
    """
    from ..client import connect

    rng = random.Random(cfg.seed)
    rec = Recorder()
    kills = KillLog()
    async with connect(url, token=token) as admin:
        info = await admin.info("server")
        shards = int(info["server"]["shards"])
        if cfg.kill_rate > 0:
            await check_kill_api(admin, url)
        try:
            await claim_keys(admin, cfg, url)
        except trio.TooSlowError:
            raise UnavailableError(
                f"the server at {url} did not answer EXISTS within {SETTLE:g} s"
            ) from None
        notes = []
        if "max_restarts" in info["server"]:  # servers of before 2026-11 do not say
            note = restart_room_note(
                cfg.kill_rate,
                int(info["server"]["max_restarts"]),
                float(info["server"]["restart_period"]),
                chaos_seconds=cfg.duration * (1 - cfg.baseline),
            )
            if note is not None:
                notes.append(note)
        names = [f"shard-{i}" for i in range(shards)] + ["ttl-manager", "eviction-manager"]
        start = now()
        chaos_start = start + cfg.duration * cfg.baseline
        end = start + cfg.duration
        sessions: list[_Session] = []
        async with trio.open_nursery() as nursery:
            for c in range(cfg.clients):
                session = _Session(url, token)
                sessions.append(session)
                nursery.start_soon(session.run, c, cfg, rec, random.Random(rng.random()), end)

            async def drop() -> bool:
                live = [s for s in sessions if s.kv is not None]
                if not live:
                    return False
                await rng.choice(live).drop()
                return True

            nursery.start_soon(
                killer,
                admin.kill_actor,
                names,
                cfg.kill_rate,
                chaos_start,
                end,
                random.Random(rng.random()),
                kills,
                now,
                drop,
            )
            if progress:
                nursery.start_soon(_progress, end, start, rec, kills)
        finals = await _settle_and_read_counters(admin, cfg)
        restarts = sum(a["restarts"] for a in await admin.actors())
        if keep_keys:
            keys = f"{cfg.prefix}* kept (--keep-keys)"
        else:
            keys = await delete_keys(admin, cfg)
    if kills.actor_kills == 0:
        notes = []  # advice on the restart intensity means nothing without kills
    return attrs.evolve(
        _report(rec, kills, restarts, finals, shards, chaos_start, cfg), notes=notes, keys=keys
    )


class _Session:
    """One worker's own WebSocket session, which the killer may drop."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self.kv: Any = None
        self._scope: trio.CancelScope | None = None

    async def drop(self) -> None:
        kv = self.kv
        if kv is not None:
            await kv.abort()

    async def run(
        self, client_id: int, cfg: WorkloadConfig, rec: Recorder, rng: random.Random, end: float
    ) -> None:
        from ..client import connect

        seq = itertools.count(1)  # shared by every session of this client: values stay unique
        while now() < end:
            try:
                async with connect(self.url, token=self.token) as kv:
                    self.kv = kv
                    await worker(client_id, kv, cfg, rec, rng, end, now, seq)
            except (ConnectionError, OSError, trio.BrokenResourceError):
                pass
            finally:
                self.kv = None


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="kill actors under load and check the history")
    p.add_argument("--url", help="a server started with --chaos (default: embedded store)")
    p.add_argument("--token", help="auth token for --url")
    p.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--keys", type=int, default=20, help="register keys (20)")
    p.add_argument("--kill-rate", type=float, default=2.0, help="kills per second (2)")
    p.add_argument("--shards", type=int, default=4, help="shards of the embedded store (4)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the workload's random choices (default 0); the timing of a run,"
        " and so its history, still differ from run to run",
    )
    p.add_argument(
        "--keep-keys",
        action="store_true",
        help="with --url: keep the run's keys (chaos:RUN:*) at the end, for inspection"
        " (default: delete them)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal and not --json)",
    )


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flags the run cannot use, before anything starts.

    Raises:
        ValueError: naming the flag.
    """
    for name, value, low in (
        ("duration", args.duration, 0.0),
        ("kill-rate", args.kill_rate, 0.0),
        ("clients", args.clients, 1),
        ("keys", args.keys, 1),
        ("shards", args.shards, 1),
    ):
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"--{name} must be >= {low:g}, got {value:g}")
    if args.shards > 16384:
        raise ValueError(f"--shards must be <= 16384, got {args.shards}")
    if args.url:
        check_url(args.url, "--url")


def run(args: argparse.Namespace) -> int:
    """Run ``kvmemo chaos``.

    Returns:
        0 when the run passed; 1 with a violation, a run that was asked to
        kill and killed no actor, or a failed connection; 2 on bad flags or a
        target that cannot take the run (a server without ``--chaos``, keys of
        the run that exist): each error is one ``kvmemo: error:`` line on stderr.
    """
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 2
    cfg = WorkloadConfig(
        clients=args.clients,
        keys=args.keys,
        duration=args.duration,
        kill_rate=args.kill_rate,
        seed=args.seed,
    )
    progress = args.progress
    if progress is None:
        progress = sys.stderr.isatty() and not args.json
    runner: Callable[[], Any]
    if args.url:

        def runner() -> Any:
            return run_remote(
                cfg, args.url, token=args.token, progress=progress, keep_keys=args.keep_keys
            )
    else:

        def runner() -> Any:
            return run_embedded(cfg, shards=args.shards, progress=progress)

    try:
        report: Report = trio.run(runner)
    except ChaosSetupError as exc:
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 2
    except (KVMemoError, ValueError) as exc:  # cannot connect, a refused token, a bad URL
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 1

    def show() -> int:
        print(json.dumps(report.to_json()) if args.json else report.render())
        return 0 if report.passed else 1

    return quiet_on_broken_pipe(show)  # `kvmemo chaos | head`: no traceback
