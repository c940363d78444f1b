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
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import attrs

CLOCK_SLACK = 0.002  # seconds of tolerance for expiry deadlines (clocks of two processes)


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
        kind: ``set``, ``get``, ``del``, ``expire``, ``incr``, ``mset``, ``mget``.
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
        if not op.is_write or op.outcome is Outcome.FAILED or op.kind in ("expire", "incr"):
            continue
        end = op.complete if op.outcome is Outcome.OK else math.inf
        for key, value in zip(op.keys, op.values, strict=True):
            value = None if op.kind == "del" else value
            expires = op.complete + op.ttl if op.ttl is not None else None
            by_key[key].append(_Write(op, value, op.invoke, end, expires))
    return by_key


def check(ops: Iterable[Op], *, eviction: bool = False) -> list[Violation]:
    """Check a whole history; return every violation found.

    Args:
        ops: the recorded operations.
        eviction: whether keys may have been evicted (a missing value is then
            always explainable).
    """
    ops = list(ops)
    writes = _writes_by_key(ops)
    expires_by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "expire" and op.outcome is not Outcome.FAILED:
            expires_by_key[op.keys[0]].append(op)
    by_value: dict[tuple[str, str], _Write] = {}
    for key, ws in writes.items():
        for w in ws:
            if w.value is not None:
                by_value[(key, w.value)] = w
    violations: list[Violation] = []
    reads_by_key: dict[str, list[tuple[Op, str | None]]] = defaultdict(list)
    for op in ops:
        if op.kind in ("get", "mget") and op.outcome is Outcome.OK:
            for key, value in zip(op.keys, op.values, strict=True):
                reads_by_key[key].append((op, value))
    for key, reads in reads_by_key.items():
        ws = writes.get(key, [])
        exps = expires_by_key.get(key, [])
        for read, value in reads:
            violations.extend(_check_read(key, read, value, ws, exps, by_value, eviction))
        violations.extend(_check_read_order(key, reads, by_value))
    violations.extend(_check_msets(ops))
    return violations


def _check_read(
    key: str,
    read: Op,
    value: str | None,
    ws: list[_Write],
    exps: list[Op],
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
        for w2 in ws:
            if w2 is not w and w2.end < read.invoke and w2.start > w.end:
                out.append(
                    Violation(
                        "stale-read",
                        key,
                        f"read {value!r} though a later write was acknowledged before the read",
                        (read, w.op, w2.op),
                    )
                )
                break
        if w.expires is not None and read.invoke > w.expires + CLOCK_SLACK:
            out.append(
                Violation(
                    "expired-read", key, f"read {value!r} after its expiry deadline", (read, w.op)
                )
            )
        for e in exps:
            if (
                e.outcome is Outcome.OK
                and e.result == 1
                and e.ttl is not None
                and e.invoke > w.end
                and read.invoke > e.complete + e.ttl + CLOCK_SLACK
                and not _rewritten_between(ws, w, e, read)
            ):
                out.append(
                    Violation(
                        "expired-read",
                        key,
                        f"read {value!r} after an EXPIRE deadline",
                        (read, w.op, e),
                    )
                )
                break
        return out
    # A missing value: explain it, or the last acknowledged write was lost.
    if eviction:
        return out
    acked = [w for w in ws if w.end < read.invoke and w.value is not None]
    if not acked:
        return out
    latest = max(acked, key=lambda w: w.end)
    explained = _may_vanish(latest, read)
    for w in ws:
        if explained:
            break
        # A delete, or a write with a TTL, that may come after `latest` and before the read.
        if w is not latest and w.start < read.complete and w.end > latest.start:
            explained = w.value is None or _may_vanish(w, read)
    for e in exps:
        if explained:
            break
        if e.invoke < read.complete and (e.outcome is not Outcome.OK or e.result != 0):
            explained = True
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


def _rewritten_between(ws: list[_Write], w: _Write, e: Op, read: Op) -> bool:
    return any(w2 is not w and w2.start < read.complete and w2.end > e.invoke for w2 in ws)


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


def _check_msets(ops: Sequence[Op]) -> list[Violation]:
    """Rule 5: an MGET of a group sees one MSET, never parts of two."""
    out = []
    mset_of: dict[tuple[str, str], Op] = {}
    for op in ops:
        if op.kind == "mset" and op.outcome is not Outcome.FAILED:
            for key, value in zip(op.keys, op.values, strict=True):
                if value is not None:
                    mset_of[(key, value)] = op
    for op in ops:
        if op.kind != "mget" or op.outcome is not Outcome.OK or len(op.keys) < 2:
            continue
        sources = {
            mset_of[(k, v)].id if (k, v) in mset_of else None
            for k, v in zip(op.keys, op.values, strict=True)
            if v is not None
        }
        missing = any(v is None for v in op.values)
        if len(sources) > 1 or (missing and sources):
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
