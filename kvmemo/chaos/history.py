"""The history checker: did the store keep its promises under chaos?

Every operation of a chaos run is recorded with its invocation and
completion times and its outcome. The checker then verifies, per key, the
necessary conditions of linearizability for a register whose written values
are unique (so every read names the one write it observed):

1. **No phantom value**: a read returns only a value some write produced,
   and not one whose write began after the read ended.
2. **No lost write / stale read**: a read must not return the value of a
   write W when another write W2 on that key was acknowledged before the
   read began and W2 began after W was acknowledged (W2 is certainly later).
   A read returning nothing must be explained by a delete, an expiry, or a
   write that failed or may have failed; otherwise the last acknowledged
   write was lost.
3. **Real-time order of reads**: if read R1 ended before read R2 began, R2
   must not return a value certainly older than R1's.
4. **No expired value**: a read that began after a key's expiry deadline
   (set with a TTL, or by an acknowledged EXPIRE) must not return the value
   it expired.
5. **Atomic MSET**: an MGET of an MSET group returns values of one MSET
   (never a mix), and no single-key read shows an older MSET's value after
   a read showed a newer one.

Outcomes the protocol allows count as availability loss, not violations:
``UNAVAILABLE`` and ``TIMEOUT`` with ``applied`` false mean the write did not
happen; ``TIMEOUT`` with ``applied`` unknown (and ``INTERNAL``) mean it may
have happened: such a write may be observed, and may explain a missing or
changed value, but is never required to be seen.

The checker is sound (every violation it reports is a real one); it is the
polynomial check for unique-value registers, not a full search.

**A store that was not empty.** By default the checker assumes the run's
keys did not exist before its first operation. When they did, pass their
values as ``initial``: each is taken as a write that was acknowledged before
the run began, with an unknown TTL (so it may vanish at any time). It may
then be read until a write of the run is acknowledged (after that it is
stale), it is older than every value the run writes, and an MGET of a group
may see it only together with the group's other initial values. A value
that is both an initial value and one the run wrote cannot tell which one a
read saw: reads of it are not judged (no false violation). The runners
never need this: every key of a run holds its random run id, and a run
refuses to start on a key that exists (see :func:`kvmemo.chaos.claim_keys`).
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

CLOCK_SLACK = 0.002  # seconds of tolerance for expiry deadlines (clocks of two processes)
INITIAL = "initial"  # the kind of the pseudo-operation that wrote a key's value before the run


class Outcome(enum.Enum):
    """What the client learned about an operation."""

    OK = "ok"  # acknowledged
    FAILED = "failed"  # certainly not applied (UNAVAILABLE, TIMEOUT applied false, errors)
    UNKNOWN = "unknown"  # may have been applied (TIMEOUT applied null, INTERNAL, lost session)


@attrs.frozen
class Op:
    """One recorded operation.

    Attributes:
        id: unique, in invocation order.
        client: the worker that ran it.
        kind: ``set``, ``get``, ``del``, ``expire``, ``incr``, ``mset``, ``mget``
            (and ``initial``: a value the key held before the run, see
            :func:`check`).
        keys: the keys it touched (one, or an MSET/MGET group).
        values: for writes, the values written (unique); for reads, the values
            returned (None: missing).
        invoke, complete: times (seconds, one clock for the whole run).
        outcome: see :class:`Outcome`.
        ttl: seconds of expiry this write (set EX / expire) gave, if any.
        error: the error kind, if any.
        result: an integer result (expire's 0/1, incr's value).
    """

    id: int
    client: int
    kind: str
    keys: tuple[str, ...]
    values: tuple[str | None, ...]
    invoke: float
    complete: float
    outcome: Outcome
    ttl: float | None = None
    error: str | None = None
    result: int | None = None

    @property
    def is_write(self) -> bool:
        return self.kind in ("set", "del", "expire", "mset", "incr")


@attrs.frozen
class Violation:
    """A broken promise, with the operations that show it."""

    rule: str
    key: str
    message: str
    ops: tuple[Op, ...]

    def describe(self) -> str:
        lines = [f"[{self.rule}] key {self.key!r}: {self.message}"]
        for op in sorted(self.ops, key=lambda o: o.invoke):
            values = ", ".join("nil" if v is None else v for v in op.values)
            lines.append(
                f"  op {op.id} client {op.client} {op.kind} {list(op.keys)} [{values}]"
                f" {op.outcome.value}{' ' + op.error if op.error else ''}"
                f" invoke={op.invoke:.6f} complete={op.complete:.6f}"
                f"{f' ttl={op.ttl}' if op.ttl is not None else ''}"
            )
        return "\n".join(lines)


@attrs.define
class _Write:
    op: Op
    value: str | None  # None: a delete
    start: float
    end: float  # math.inf when the outcome is unknown
    expires: float | None  # latest possible deadline of this value's expiry


def _writes_by_key(ops: Sequence[Op]) -> dict[str, list[_Write]]:
    by_key: dict[str, list[_Write]] = defaultdict(list)
    for op in ops:
        value_write = op.is_write and op.kind not in ("expire", "incr")
        if op.kind != INITIAL and (not value_write or op.outcome is Outcome.FAILED):
            continue
        end = op.complete if op.outcome is Outcome.OK else math.inf
        for key, value in zip(op.keys, op.values, strict=True):
            value = None if op.kind == "del" else value
            expires = op.complete + op.ttl if op.ttl is not None else None
            by_key[key].append(_Write(op, value, op.invoke, end, expires))
    return by_key


class _PrefixMax:
    """Points sorted by ``x`` with a running maximum of ``y``.

    ``best_before(q)`` answers, in O(log n), the point of largest ``y`` among
    those with ``x < q`` (None if there is none).
    """

    def __init__(self, points: list[tuple[float, float, Any]]) -> None:
        points.sort(key=lambda p: p[0])
        self.xs = [p[0] for p in points]
        self.best: list[tuple[float, Any]] = []
        top: tuple[float, Any] | None = None
        for _, y, item in points:
            if top is None or y > top[0]:
                top = (y, item)
            self.best.append(top)

    def best_before(self, q: float) -> tuple[float, Any] | None:
        i = bisect.bisect_left(self.xs, q)
        return self.best[i - 1] if i else None


class _KeyIndex:
    """The writes and expires of one key, indexed for the per-read rules."""

    def __init__(self, ws: list[_Write], exps: list[Op]) -> None:
        inf = math.inf
        # Rule 2 (stale read): the latest-starting write among those acknowledged before q.
        self.by_end = _PrefixMax([(w.end, w.start, w) for w in ws])
        # The latest acknowledged value write before q (for a nil read).
        self.values_by_end = _PrefixMax([(w.end, w.end, w) for w in ws if w.value is not None])
        # Writes that may have begun before q, with the latest possible end.
        self.by_start = _PrefixMax([(w.start, w.end, w) for w in ws])
        # Deletes, and writes whose TTL may have run out, that may explain a nil read.
        self.deletes = _PrefixMax([(w.start, w.end, w) for w in ws if w.value is None])
        self.vanishing = _PrefixMax(
            [(w.start + w.op.ttl - CLOCK_SLACK, w.end, w) for w in ws if w.op.ttl is not None]
        )
        # EXPIREs that may have removed the key: the earliest that began.
        self.first_expire = min(
            (e.invoke for e in exps if e.outcome is not Outcome.OK or e.result != 0), default=inf
        )
        # Acknowledged EXPIREs that set a deadline, by deadline.
        self.deadlines = _PrefixMax(
            [
                (e.complete + e.ttl + CLOCK_SLACK, e.invoke, e)
                for e in exps
                if e.outcome is Outcome.OK and e.result == 1 and e.ttl is not None
            ]
        )
        # EXPIREs that may have set a deadline (acknowledged with 1, or of
        # unknown outcome), by start: one of them may have given a value a
        # later deadline than its write's (an EXPIRE replaces the TTL).
        self.resets = sorted(
            (
                e
                for e in exps
                if e.ttl is not None
                and (e.outcome is Outcome.UNKNOWN or (e.outcome is Outcome.OK and e.result == 1))
            ),
            key=lambda e: e.invoke,
        )
        self.reset_starts = [e.invoke for e in self.resets]

    def latest_reset(self, after: float, read: Op) -> float:
        """The latest deadline an EXPIRE may have set after ``after`` and before ``read``.

        Of the EXPIREs that may have run after that moment (ended after it)
        and began before the read ended: inf for one of unknown outcome (it
        may have run at any time), -inf when there is none. An EXPIRE
        replaces the key's deadline, so a value may live until then. Called
        only for a read already past a deadline (rare), so the scan of the
        EXPIREs that began before the read ended costs nothing in a history
        without violations.
        """
        latest = -math.inf
        for e in self.resets[: bisect.bisect_left(self.reset_starts, read.complete)]:
            assert e.ttl is not None
            end = e.complete if e.outcome is Outcome.OK else math.inf
            if end > after:
                latest = max(latest, end + e.ttl)
        return latest


def initial_ops(initial: Mapping[str, str]) -> list[Op]:
    """Pseudo-writes for the values keys held before the run: done before it began."""
    return [
        Op(0, -1, INITIAL, (key,), (value,), -math.inf, -math.inf, Outcome.OK)
        for key, value in initial.items()
    ]


def check(
    ops: Iterable[Op], *, eviction: bool = False, initial: Mapping[str, str] | None = None
) -> list[Violation]:
    """Check a whole history; return every violation found.

    Cost: O(n log n) in the number of operations, so hours of history check
    in seconds.

    Args:
        ops: the recorded operations.
        eviction: whether keys may have been evicted (a missing value is then
            always explainable).
        initial: the values the run's keys held before its first operation
            (a key not in it did not exist). None: none existed.
    """
    initial = dict(initial or {})
    ops = initial_ops(initial) + list(ops)
    writes = _writes_by_key(ops)
    expires_by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "expire" and op.outcome is not Outcome.FAILED:
            expires_by_key[op.keys[0]].append(op)
    by_value: dict[tuple[str, str], _Write] = {}
    ambiguous: set[tuple[str, str]] = set()  # initial values the run wrote again
    for key, ws in writes.items():
        for w in ws:
            if w.value is not None:
                if (key, w.value) in by_value:
                    ambiguous.add((key, w.value))
                by_value[(key, w.value)] = w
    for pair in ambiguous:
        del by_value[pair]
    violations: list[Violation] = []
    reads_by_key: dict[str, list[tuple[Op, str | None]]] = defaultdict(list)
    for op in ops:
        if op.kind in ("get", "mget") and op.outcome is Outcome.OK:
            for key, value in zip(op.keys, op.values, strict=True):
                if value is None or (key, value) not in ambiguous:
                    reads_by_key[key].append((op, value))
    for key, reads in reads_by_key.items():
        index = _KeyIndex(writes.get(key, []), expires_by_key.get(key, []))
        for read, value in reads:
            violations.extend(_check_read(key, read, value, index, by_value, eviction))
        violations.extend(_check_read_order(key, reads, by_value))
    violations.extend(_check_msets(ops, initial, ambiguous))
    return violations


def _check_read(
    key: str,
    read: Op,
    value: str | None,
    index: _KeyIndex,
    by_value: dict[tuple[str, str], _Write],
    eviction: bool,
) -> list[Violation]:
    out = []
    if value is not None:
        w = by_value.get((key, value))
        if w is None:
            return [Violation("phantom", key, f"read {value!r}, never written", (read,))]
        if w.start > read.complete:
            return [
                Violation("phantom", key, f"read {value!r} before its write began", (read, w.op))
            ]
        later = index.by_end.best_before(read.invoke)
        if later is not None and later[0] > w.end:
            out.append(
                Violation(
                    "stale-read",
                    key,
                    f"read {value!r} though a later write was acknowledged before the read",
                    (read, w.op, later[1].op),
                )
            )
        if (
            w.expires is not None
            and read.invoke > w.expires + CLOCK_SLACK
            and read.invoke > index.latest_reset(w.start, read) + CLOCK_SLACK
        ):
            out.append(
                Violation(
                    "expired-read", key, f"read {value!r} after its expiry deadline", (read, w.op)
                )
            )
        due = index.deadlines.best_before(read.invoke)
        if due is not None and due[0] > w.end:
            e: Op = due[1]
            rewrite = index.by_start.best_before(read.complete)
            if (rewrite is None or rewrite[0] <= e.invoke) and read.invoke > index.latest_reset(
                e.invoke, read
            ) + CLOCK_SLACK:
                out.append(
                    Violation(
                        "expired-read",
                        key,
                        f"read {value!r} after an EXPIRE deadline",
                        (read, w.op, e),
                    )
                )
        return out
    # A missing value: explain it, or the last acknowledged write was lost.
    if eviction:
        return out
    found = index.values_by_end.best_before(read.invoke)
    if found is None:
        return out
    latest: _Write = found[1]
    # A value from before the run has an unknown TTL: it may vanish at any time.
    explained = latest.op.kind == INITIAL or _may_vanish(latest, read)
    if not explained:
        # A delete that may come after `latest` and before the read ended.
        delete = index.deletes.best_before(read.complete)
        explained = delete is not None and delete[0] > latest.start
    if not explained:
        # A write whose TTL may have run out before the read ended.
        gone = index.vanishing.best_before(read.complete)
        explained = gone is not None and gone[0] > latest.start
    if not explained:
        explained = index.first_expire < read.complete
    if not explained:
        out.append(
            Violation(
                "lost-write",
                key,
                f"read nil though {latest.value!r} was acknowledged before the read",
                (read, latest.op),
            )
        )
    return out


def _may_vanish(w: _Write, read: Op) -> bool:
    """Whether ``w``'s value may have expired before ``read`` ended."""
    ttl = w.op.ttl
    return ttl is not None and w.start + ttl < read.complete + CLOCK_SLACK


def _check_read_order(
    key: str, reads: list[tuple[Op, str | None]], by_value: dict[tuple[str, str], _Write]
) -> list[Violation]:
    """Rule 3: a later read never returns a value certainly older than an earlier read's."""
    known = [(r, by_value[(key, v)]) for r, v in reads if v is not None and (key, v) in by_value]
    known.sort(key=lambda rw: rw[0].complete)
    out = []
    # For each read, the newest write (by start) observed by reads that completed before it.
    ordered_by_invoke = sorted(known, key=lambda rw: rw[0].invoke)
    i = 0
    newest: tuple[Op, _Write] | None = None
    for read, w in ordered_by_invoke:
        while i < len(known) and known[i][0].complete < read.invoke:
            cand = known[i]
            if newest is None or cand[1].start > newest[1].start:
                newest = cand
            i += 1
        if newest is not None and w.end < newest[1].start:
            out.append(
                Violation(
                    "read-order",
                    key,
                    "a read returned a value older than one an earlier read had returned",
                    (newest[0], read, w.op, newest[1].op),
                )
            )
            if len(out) >= 3:
                break
    return out


def _check_msets(
    ops: Sequence[Op], initial: Mapping[str, str], ambiguous: set[tuple[str, str]]
) -> list[Violation]:
    """Rule 5: an MGET of a group sees one MSET, never parts of two.

    Each value an MGET returns comes from an MSET, or from the state before
    the run (the key's initial value, or nil for a key that did not exist);
    nil for a key that held a value before the run comes from neither. All
    of them must come from one source. Values whose source is unknown (a
    phantom, reported by the per-key rules, or an ambiguous initial value)
    are left out.
    """
    out = []
    mset_of: dict[tuple[str, str], Op] = {}
    for op in ops:
        if op.kind == "mset" and op.outcome is not Outcome.FAILED:
            for key, value in zip(op.keys, op.values, strict=True):
                if value is not None:
                    mset_of[(key, value)] = op
    before = "before the run"
    for op in ops:
        if op.kind != "mget" or op.outcome is not Outcome.OK or len(op.keys) < 2:
            continue
        sources: set[int | str] = set()
        for k, v in zip(op.keys, op.values, strict=True):
            if v is not None and (k, v) in ambiguous:
                continue
            if v is not None and (k, v) in mset_of:
                sources.add(mset_of[(k, v)].id)
            elif v == initial.get(k):  # nil for a key that did not exist, too
                sources.add(before)
            elif v is None:
                sources.add("deleted")
        if len(sources) > 1:
            parts = tuple(
                mset_of[(k, v)]
                for k, v in zip(op.keys, op.values, strict=True)
                if v is not None and (k, v) in mset_of
            )
            out.append(
                Violation(
                    "torn-mset",
                    ",".join(op.keys),
                    "an MGET saw parts of different MSETs",
                    (op, *parts),
                )
            )
    return out
