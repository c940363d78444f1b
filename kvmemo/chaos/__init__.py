"""``kvmemo chaos``: kill actors under load, check the history, report what survived.

Runs the :mod:`~kvmemo.chaos.workload` against an embedded store (default)
or a running server started with ``--chaos`` (``--url``), kills actors at a
given rate through the target's own chaos API, then checks the recorded
history with :mod:`~kvmemo.chaos.history`. The exit status is 0 only when
no violation was found.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..client import check_url
from ..storage.slots import SlotMap
from .history import Op, Outcome, Violation, check
from .workload import KillLog, Recorder, WorkloadConfig, killer, now, worker

NAME = "chaos"
# Seconds after a kill during which that shard counts as restarting: the
# restart backoff grows with repeated kills up to its cap (1 s by default),
# plus a margin. Operations on other shards must all succeed.
DISTURBED = 1.5
SETTLE = 5.0  # seconds allowed for every actor to be running again at the end
SESSION_ERRORS = frozenset({"DISCONNECTED"})  # failures caused by dropping the client's session


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
        }

    def render(self) -> str:
        ops = self.operations
        lines = [
            f"chaos run: {self.duration:.1f} s",
            f"operations: {ops['total']} ({ops['ok']} ok, {ops['failed']} failed,"
            f" {ops['unknown']} unknown) by kind {ops['by_kind']}",
            f"kills: {sum(self.kills.values())} {self.kills}",
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
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def restart_room_note(kill_rate: float, max_restarts: int, restart_period: float) -> str | None:
    """A warning when kills may come faster than a supervisor allows restarts, else None.

    Past ``max_restarts`` restarts within ``restart_period`` seconds a
    supervisor gives up and its parent restarts its whole subtree (OTP): every
    shard restarts at once, and the shards that were not killed count as
    unavailable. The embedded run gives itself room; a server has its own
    settings. Kills come at random (about a Poisson process), so over a run's
    many windows the busiest one holds far more than the average: the note
    is given when the average plus four standard deviations reaches the
    limit, and it suggests twice that.
    """
    mean = kill_rate * restart_period
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


def counter_violations(ops: list[Op], finals: dict[str, int | None]) -> list[Violation]:
    """INCR: every acknowledged increment counted, none invented."""
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
        if not len(acked) <= value <= len(acked) + len(maybe):
            out.append(
                Violation(
                    "counter",
                    key,
                    f"final value {value}, expected {len(acked)}..{len(acked) + len(maybe)}"
                    f" ({len(acked)} acknowledged, {len(maybe)} unknown increments)",
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
    )


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
    return _report(rec, kills, restarts, finals, shards, chaos_start, cfg)


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
    return summarize(
        rec.ops,
        kills,
        restarts,
        violations,
        shards=shards,
        chaos_start=chaos_start,
        duration=cfg.duration,
    )


async def _settle_and_read_counters(kv: Any, cfg: WorkloadConfig) -> dict[str, int | None]:
    finals: dict[str, int | None] = {}
    with trio.move_on_after(SETTLE):
        for i in range(cfg.counters):
            key = f"ctr:{i}"
            while True:
                try:
                    value = await kv.execute("get", key)
                except Exception:  # noqa: BLE001 - retried until the shard is back
                    await trio.sleep(0.05)
                    continue
                finals[key] = None if value is None else int(value)
                break
    return finals


async def run_remote(
    cfg: WorkloadConfig, url: str, *, token: str | None = None, progress: bool = False
) -> Report:
    """A chaos run against a running server started with ``--chaos``."""
    from ..client import connect

    rng = random.Random(cfg.seed)
    rec = Recorder()
    kills = KillLog()
    async with connect(url, token=token) as admin:
        info = await admin.info("server")
        shards = int(info["server"]["shards"])
        notes = []
        if "max_restarts" in info["server"]:  # servers of before 2026-11 do not say
            note = restart_room_note(
                cfg.kill_rate,
                int(info["server"]["max_restarts"]),
                float(info["server"]["restart_period"]),
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
    return attrs.evolve(
        _report(rec, kills, restarts, finals, shards, chaos_start, cfg), notes=notes
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true")


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
    """Run ``kvmemo chaos``: 0 without violations, 1 with some or a failed
    connection, 2 on bad flags (one ``kvmemo: error:`` line on stderr)."""
    from ..errors import KVMemoError

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
    progress = not args.no_progress and not args.json
    runner: Callable[[], Any]
    if args.url:

        def runner() -> Any:
            return run_remote(cfg, args.url, token=args.token, progress=progress)
    else:

        def runner() -> Any:
            return run_embedded(cfg, shards=args.shards, progress=progress)

    try:
        report: Report = trio.run(runner)
    except (KVMemoError, ValueError) as exc:  # cannot connect, a refused token, a bad URL
        print(f"kvmemo: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.render())
    return 0 if not report.violations else 1
