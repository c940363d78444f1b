"""Counters, gauges and latency histograms, and their two read-outs.

Design
------
Problem: every command, actor and manager wants to count what it does and how
long it takes, without slowing the hot path and without ever changing what the
store does. Readers want two views: Prometheus text exposition (format 0.0.4)
for scrapers, and a JSON-ready dict for the ``info`` command's stats section.

Approach: a :class:`MetricsRegistry` is a pure, synchronous owner of named
metrics, kept in registration order. A metric with label names is a *family*:
``family.labels("get")`` returns a child (an unlabelled metric of the same
type), created once and cached in a dict keyed by the tuple of label values.
Callers resolve their children once, at setup, and keep them; recording on a
child is then a few attribute reads and adds:

- ``Counter.inc``: one comparison and one add;
- ``Histogram.observe``: a ``bisect`` into the sorted bucket bounds, one add to
  that bucket's count and one add to the sum. The total count is derived from
  the bucket counts at read time, so it costs nothing on the hot path.

Time: this module reads no clock. Callers time work with their own clock
(``trio.current_time()`` at the edge, STYLE.md rule 9) and pass durations, in
seconds, to ``observe``.

Percentiles as HdrHistogram gives them (Redis's ``INFO latencystats``):
:meth:`Histogram.bucket_counts` freezes a histogram's per-bucket counts in a
:class:`BucketCounts`, which subtracts an earlier read (a reset's base) and
answers ``value_at_percentile`` with a *bucket bound*, not an interpolation:
the bound that the percentile's rank is known to be under, as HdrHistogram's
``hdr_value_at_percentile`` answers the highest value equivalent to its
sub-bucket. Its precision is the buckets' (1-2-5 steps for latencies: the
true value is above the bound below), not HdrHistogram's 2 significant digits.

Staleness: values are read when a read-out is made. A gauge computed by
:meth:`Gauge.set_function` (memory use, mailbox depths) is called at read time
and may be as stale as its source. Quantiles are *estimates* from the buckets:
linear interpolation inside the bucket that holds the rank, as Prometheus's
``histogram_quantile`` does; their error is at most the width of that bucket.

Concurrency: KVMemo runs on one trio thread and nothing here awaits, so every
method is atomic with respect to cancellation and no lock is needed. Do not
share a registry across OS threads.

This module imports neither trio nor ``actors`` (STYLE.md rule 1).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import ClassVar, Self, TypeVar

import attrs

__all__ = [
    "DEFAULT_LATENCY_BUCKETS",
    "BucketCounts",
    "Counter",
    "Gauge",
    "Histogram",
    "HistogramSnapshot",
    "MetricsRegistry",
]

DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    5e-6, 1e-5, 2e-5, 5e-5,  # 5 µs .. 50 µs: dict operations, in-process asks
    1e-4, 2e-4, 5e-4,  # 100 µs .. 500 µs: WebSocket round trips, small batches
    1e-3, 2e-3, 5e-3,  # 1 ms .. 5 ms
    1e-2, 2e-2, 5e-2,  # 10 ms .. 50 ms
    0.1, 0.2, 0.5,  # 100 ms .. 500 ms: large fan-outs, eviction sweeps
    1.0, 2.0, 5.0, 10.0,  # 1 s .. 10 s: pathological; above 10 s falls in +Inf
)  # fmt: skip
"""Default histogram bucket upper bounds, in **seconds** (``le``, inclusive).

Log-spaced in 1-2-5 steps from 5 µs to 10 s: 20 finite buckets, plus the
implicit ``+Inf`` bucket. A quantile estimate inside a bucket is off by at most
that bucket's width, i.e. by at most a factor of 2.5 of the true latency.
"""

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _check_metric_name(name: str) -> None:
    if not _METRIC_NAME_RE.fullmatch(name):
        raise ValueError(f"metric name must match [a-zA-Z_:][a-zA-Z0-9_:]*, got {name!r}")


def _check_labelnames(labelnames: Sequence[str], *, histogram: bool) -> tuple[str, ...]:
    if isinstance(labelnames, str):
        raise ValueError(f"labelnames must be a sequence of names, got the string {labelnames!r}")
    names = tuple(labelnames)
    for label in names:
        if not _LABEL_NAME_RE.fullmatch(label) or label.startswith("__"):
            raise ValueError(
                f"label name must match [a-zA-Z_][a-zA-Z0-9_]* and not start with '__', "
                f"got {label!r}"
            )
        if histogram and label == "le":
            raise ValueError("label name 'le' is reserved for histogram buckets")
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be distinct, got {names!r}")
    return names


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if not bounds:
        raise ValueError("buckets must not be empty")
    for bound in bounds:
        if not math.isfinite(bound):
            raise ValueError(f"buckets must be finite (+Inf is implicit), got {bound!r}")
    if any(lo >= hi for lo, hi in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"buckets must be strictly increasing, got {bounds!r}")
    return bounds


@attrs.define(eq=False)
class _Metric:
    """What every metric type shares: identity, labels, and the child cache.

    A metric with ``labelnames`` is a family: it records nothing itself, and
    its children (one per tuple of label values) do.

    Invariant: ``labelnames`` is empty, or ``labelvalues`` is empty (a child
    has no labels of its own); every child in ``_children`` has ``labelnames
    == ()`` and the same type, name and help as its family.
    """

    kind: ClassVar[str]

    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    labelvalues: tuple[str, ...] = ()
    _children: dict[tuple[str, ...], Self] = attrs.field(init=False, factory=dict, repr=False)

    def labels(self, *values: str) -> Self:
        """Return the child for these label values, creating it on first use.

        Resolve children once and keep them: this is a dict lookup, cheap but
        not free.

        Args:
            values: one value per label name, in the order of ``labelnames``.

        Returns:
            The child metric: same type, no labels of its own.

        Raises:
            ValueError: the metric has no labels, or the number of values
                differs from the number of label names.
        """
        child = self._children.get(values)
        if child is not None:
            return child
        if not self.labelnames:
            raise ValueError(f"metric {self.name!r} has no labels")
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"metric {self.name!r} has labels {self.labelnames!r}, "
                f"got {len(values)} values {values!r}"
            )
        child = self._new_child(values)
        self._children[values] = child
        return child

    def _new_child(self, values: tuple[str, ...]) -> Self:
        raise NotImplementedError

    def children(self) -> list[tuple[tuple[str, ...], Self]]:
        """Every child made so far, as ``(label values, child)``, in creation order.

        For read-outs that need the values per label (INFO's commandstats);
        empty for a metric without labels.
        """
        return list(self._children.items())

    def _series(self) -> Iterator[tuple[tuple[str, ...], Self]]:
        """Yield ``(label values, holder)`` for every series this metric exposes."""
        if self.labelnames:
            yield from self._children.items()
        else:
            yield (), self

    def _labelled_error(self) -> ValueError:
        return ValueError(
            f"metric {self.name!r} has labels {self.labelnames!r}: record on .labels(...)"
        )


@attrs.define(eq=False)
class Counter(_Metric):
    """A value that only goes up: requests served, keys expired, bytes freed.

    Invariant: ``value`` never decreases.
    """

    kind: ClassVar[str] = "counter"

    _value: float = attrs.field(init=False, default=0)

    def _new_child(self, values: tuple[str, ...]) -> Self:
        return type(self)(self.name, self.help, (), values)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the counter.

        Raises:
            ValueError: ``amount`` is negative, or this is a labelled family.
        """
        if amount < 0:
            raise ValueError(f"counter {self.name!r} can only increase, got {amount!r}")
        if self.labelnames:
            raise self._labelled_error()
        self._value += amount

    @property
    def value(self) -> float:
        """The current total.

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        return self._value


@attrs.define(eq=False)
class Gauge(_Metric):
    """A value that goes up and down, or is computed when read.

    Invariant: while a function is set (by :meth:`set_function`), ``value``
    is that function's result and ``inc``/``dec`` are refused; :meth:`set`
    removes the function.
    """

    kind: ClassVar[str] = "gauge"

    _value: float = attrs.field(init=False, default=0)
    _function: Callable[[], float] | None = attrs.field(init=False, default=None)

    def _new_child(self, values: tuple[str, ...]) -> Self:
        return type(self)(self.name, self.help, (), values)

    def set(self, value: float) -> None:
        """Set the gauge to ``value`` (and drop any function set before).

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        self._function = None
        self._value = value

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (which may be negative).

        Raises:
            ValueError: this is a labelled family, or the gauge is computed
                by a function.
        """
        if self.labelnames:
            raise self._labelled_error()
        if self._function is not None:
            raise ValueError(f"gauge {self.name!r} is computed by a function: call set() first")
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``; see :meth:`inc`."""
        self.inc(-amount)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Compute the gauge with ``fn`` each time it is read.

        ``fn`` must be cheap, synchronous and side-effect free: it runs inside
        every read-out. An exception it raises propagates to the reader.

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        self._function = fn

    @property
    def value(self) -> float:
        """The current value (calls the function, if one is set).

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        if self._function is not None:
            return float(self._function())
        return self._value


@attrs.frozen
class HistogramSnapshot:
    """A histogram's state at one moment, in the histogram's unit (seconds).

    Attributes:
        count: number of observations.
        sum: sum of the observed values.
        p50, p99, p999: estimated 0.5, 0.99 and 0.999 quantiles, or ``None``
            when there are no observations.
        buckets: ``(upper bound, cumulative count)`` pairs in increasing
            order of bound, the last one ``(inf, count)``.
    """

    count: int
    sum: float
    p50: float | None
    p99: float | None
    p999: float | None
    buckets: tuple[tuple[float, int], ...]


def _bucket_quantile(bounds: tuple[float, ...], cumulative: Sequence[int], q: float) -> float:
    """Estimate the ``q`` quantile from cumulative bucket counts.

    Prometheus's ``histogram_quantile``: find the bucket holding rank
    ``q * count``, and interpolate linearly between its lower and upper bound.
    The first bucket's lower bound is 0 (or its upper bound, if that is <= 0);
    a rank in the ``+Inf`` bucket gives the highest finite bound. Unlike
    Prometheus, ``q == 0`` picks the first non-empty bucket (its lower bound)
    instead of giving NaN, and results are clamped to the bucket so that
    rounding never breaks monotonicity in ``q``.

    Args:
        bounds: finite upper bounds, strictly increasing.
        cumulative: ``len(bounds) + 1`` cumulative counts, the last for ``+Inf``.
        q: in [0, 1] (checked by the caller).

    Returns:
        The estimate, or NaN when there are no observations.
    """
    total = cumulative[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = bisect_left(cumulative, rank) if rank > 0 else bisect_right(cumulative, 0)
    if b >= len(bounds):
        return bounds[-1]
    end = bounds[b]
    if b == 0:
        if end <= 0:
            return end
        start = 0.0
        in_bucket = cumulative[0]
    else:
        start = bounds[b - 1]
        in_bucket = cumulative[b] - cumulative[b - 1]
        rank -= cumulative[b - 1]
    estimate = start + (end - start) * (rank / in_bucket)
    return min(max(estimate, start), end)


@attrs.frozen
class BucketCounts:
    """A histogram's per-bucket counts at one moment (not cumulative).

    Two reads of the same histogram subtract (:meth:`since`: what was
    observed between them, as INFO's counters since ``CONFIG RESETSTAT``)
    and add (:meth:`plus`), and a read gives percentiles as HdrHistogram
    does (:meth:`value_at_percentile`).

    Attributes:
        bounds: the finite upper bounds (``le``), strictly increasing.
        counts: ``len(bounds) + 1`` observation counts, each of one bucket
            alone, the last for ``+Inf``.

    Invariant: every count is >= 0 when both reads came from one histogram,
    the later one first in :meth:`since` (its counts only grow).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        """The number of observations."""
        return sum(self.counts)

    def since(self, base: BucketCounts | None) -> BucketCounts:
        """The observations made after ``base`` (an earlier read of the same histogram).

        Raises:
            ValueError: ``base`` has other bounds.
        """
        if base is None:
            return self
        self._check_bounds(base)
        return BucketCounts(
            self.bounds, tuple(a - b for a, b in zip(self.counts, base.counts, strict=True))
        )

    def plus(self, other: BucketCounts | None) -> BucketCounts:
        """These observations and ``other``'s together.

        Raises:
            ValueError: ``other`` has other bounds.
        """
        if other is None:
            return self
        self._check_bounds(other)
        return BucketCounts(
            self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )

    def _check_bounds(self, other: BucketCounts) -> None:
        if other.bounds != self.bounds:
            raise ValueError("bucket counts of histograms with other buckets do not combine")

    def value_at_percentile(self, percentile: float) -> float:
        """The ``percentile`` (0 to 100) as HdrHistogram's ``hdr_value_at_percentile``,
        over these buckets.

        The rank is ``int(percentile / 100 * total + 0.5)``, at least 1 (a
        percentile over 100 counts as 100); the answer is the upper bound of
        the first bucket whose cumulative count reaches it, or for
        ``percentile == 0`` that bucket's lower bound (the bound before it,
        0 for the first), as HdrHistogram gives the highest (lowest for 0)
        value equivalent to the sub-bucket holding the rank. So the true
        value at that rank is at most the answer and above the bound below
        it: precise to a bucket (a factor of 2.5 at most with
        :data:`DEFAULT_LATENCY_BUCKETS`), never interpolated. A rank in the
        ``+Inf`` bucket gives the highest finite bound: the true value is
        *above* it then (HdrHistogram, in Redis, likewise clamps values at its
        highest trackable one, 1 s).

        Args:
            percentile: in [0, 100] (checked by the caller; over 100 reads as 100).

        Returns:
            The bound, in the histogram's unit; NaN when there are no observations.
        """
        total = self.total
        if not total:
            return math.nan
        requested = percentile if percentile < 100.0 else 100.0
        rank = max(1, int(requested / 100 * total + 0.5))
        index = bisect_left(list(accumulate(self.counts)), rank)  # rank <= total: found
        bounds = self.bounds
        if percentile == 0.0:
            return bounds[index - 1] if index else 0.0
        return bounds[index] if index < len(bounds) else bounds[-1]


@attrs.define(eq=False)
class Histogram(_Metric):
    """Observations counted into fixed buckets: latencies, batch sizes.

    A value ``v`` is counted in the first bucket whose upper bound is ``>= v``
    (Prometheus's ``le``), or in the implicit ``+Inf`` bucket.

    Invariant: ``_counts`` has ``len(buckets) + 1`` entries (the last for
    ``+Inf``), each the number of observations in that bucket alone (not
    cumulative); their total is ``count``.
    """

    kind: ClassVar[str] = "histogram"

    buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    _counts: list[int] = attrs.field(init=False)
    _sum: float = attrs.field(init=False, default=0.0)

    @_counts.default
    def _zero_counts(self) -> list[int]:
        return [0] * (len(self.buckets) + 1)

    def _new_child(self, values: tuple[str, ...]) -> Self:
        return type(self)(self.name, self.help, (), values, self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation (for latencies: a duration in seconds).

        The hot path: a bisect and two adds. ``value`` is not checked: pass a
        finite number (a NaN would poison ``sum``).

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        self._counts[bisect_left(self.buckets, value)] += 1
        self._sum += value

    def observe_many(self, value: float, times: int) -> None:
        """Record ``times`` observations of one ``value`` (a batch that ended together).

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        self._counts[bisect_left(self.buckets, value)] += times
        self._sum += value * times

    @property
    def count(self) -> int:
        """The number of observations.

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        return sum(self._counts)

    @property
    def sum(self) -> float:
        """The sum of all observed values.

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        return self._sum

    def _cumulative(self) -> list[int]:
        if self.labelnames:
            raise self._labelled_error()
        return list(accumulate(self._counts))

    def bucket_counts(self) -> BucketCounts:
        """The observations per bucket, frozen (see :class:`BucketCounts`).

        Raises:
            ValueError: this is a labelled family.
        """
        if self.labelnames:
            raise self._labelled_error()
        return BucketCounts(self.buckets, tuple(self._counts))

    def quantile(self, q: float) -> float:
        """Estimate the ``q`` quantile from the buckets.

        Linear interpolation inside the bucket holding rank ``q * count``, as
        Prometheus's ``histogram_quantile``; an estimate is never outside that
        bucket, and is monotonic non-decreasing in ``q``.

        Args:
            q: the quantile, in [0, 1] (0.99 for p99).

        Returns:
            The estimate, in the unit of the observations; NaN when the
            histogram is empty.

        Raises:
            ValueError: ``q`` is outside [0, 1], or this is a labelled family.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        return _bucket_quantile(self.buckets, self._cumulative(), q)

    def snapshot(self) -> HistogramSnapshot:
        """Return count, sum, p50/p99/p999 and cumulative buckets, frozen.

        Raises:
            ValueError: this is a labelled family.
        """
        cumulative = self._cumulative()
        total = cumulative[-1]

        def estimate(q: float) -> float | None:
            return _bucket_quantile(self.buckets, cumulative, q) if total else None

        return HistogramSnapshot(
            count=total,
            sum=self._sum,
            p50=estimate(0.5),
            p99=estimate(0.99),
            p999=estimate(0.999),
            buckets=tuple(zip((*self.buckets, math.inf), cumulative, strict=True)),
        )


_M = TypeVar("_M", Counter, Gauge, Histogram)


def _format_value(value: float) -> str:
    """A sample value or ``le`` bound as Prometheus (and Go) spell floats."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_block(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in pairs)
    return "{" + inner + "}"


@attrs.define(eq=False)
class MetricsRegistry:
    """Creates, holds and reads out named metrics.

    Asking again for a registered name returns the same metric, so that
    independent components can share one without passing it around.

    Invariant: names are unique; each maps to one metric of one type, label
    names and (for histograms) buckets, fixed at its first registration;
    read-outs list metrics in registration order.
    """

    _metrics: dict[str, Counter | Gauge | Histogram] = attrs.field(init=False, factory=dict)

    def _register(
        self,
        cls: type[_M],
        name: str,
        labelnames: tuple[str, ...],
        make: Callable[[], _M],
    ) -> _M:
        existing = self._metrics.get(name)
        if existing is None:
            metric = make()
            self._metrics[name] = metric
            return metric
        if not isinstance(existing, cls):
            raise ValueError(
                f"metric {name!r} is already registered as a {existing.kind}, not a {cls.kind}"
            )
        if existing.labelnames != labelnames:
            raise ValueError(
                f"metric {name!r} is already registered with labels "
                f"{existing.labelnames!r}, not {labelnames!r}"
            )
        return existing

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Return the counter ``name``, registering it on first use.

        Raises:
            ValueError: invalid metric or label name, or ``name`` is already
                registered with another type or other label names.
        """
        _check_metric_name(name)
        names = _check_labelnames(labelnames, histogram=False)
        return self._register(Counter, name, names, lambda: Counter(name, help, names))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Return the gauge ``name``, registering it on first use.

        Raises:
            ValueError: as for :meth:`counter`.
        """
        _check_metric_name(name)
        names = _check_labelnames(labelnames, histogram=False)
        return self._register(Gauge, name, names, lambda: Gauge(name, help, names))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        """Return the histogram ``name``, registering it on first use.

        Args:
            buckets: finite upper bounds, strictly increasing, in the unit of
                the observations (seconds by default); ``+Inf`` is implicit.

        Raises:
            ValueError: as for :meth:`counter`; the label name ``le``; empty,
                non-finite or unsorted buckets; or ``name`` is already
                registered with other buckets.
        """
        _check_metric_name(name)
        names = _check_labelnames(labelnames, histogram=True)
        bounds = _check_buckets(buckets)
        metric = self._register(
            Histogram, name, names, lambda: Histogram(name, help, names, (), bounds)
        )
        if metric.buckets != bounds:
            raise ValueError(f"histogram {name!r} is already registered with other buckets")
        return metric

    def render_prometheus(self) -> str:
        """Render every metric in Prometheus text exposition format 0.0.4.

        ``# HELP`` and ``# TYPE`` lines, then one sample per series (label
        values escaped); a histogram gives cumulative ``_bucket{le="..."}``
        samples up to ``+Inf``, then ``_sum`` and ``_count``. Metrics appear
        in registration order, children in creation order.

        Returns:
            The exposition text, ending with a newline (empty if nothing is
            registered).
        """
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            if isinstance(metric, Histogram):
                self._render_histogram(metric, lines)
            else:
                for values, series in metric._series():
                    labels = _label_block(tuple(zip(metric.labelnames, values, strict=True)))
                    lines.append(f"{metric.name}{labels} {_format_value(series.value)}")
        return "".join(line + "\n" for line in lines)

    @staticmethod
    def _render_histogram(metric: Histogram, lines: list[str]) -> None:
        for values, series in metric._series():
            pairs = tuple(zip(metric.labelnames, values, strict=True))
            snap = series.snapshot()
            for bound, cumulative in snap.buckets:
                labels = _label_block((*pairs, ("le", _format_value(bound))))
                lines.append(f"{metric.name}_bucket{labels} {cumulative}")
            labels = _label_block(pairs)
            lines.append(f"{metric.name}_sum{labels} {_format_value(snap.sum)}")
            lines.append(f"{metric.name}_count{labels} {snap.count}")

    def to_dict(self) -> dict[str, object]:
        """Return every metric as a JSON-ready dict, in registration order.

        An unlabelled counter or gauge maps to its value; a histogram to
        ``{"count", "sum", "p50", "p99", "p999"}`` (seconds; quantiles are
        ``None`` while empty). A labelled metric maps to a dict keyed by its
        label values joined with ``","``.
        """
        out: dict[str, object] = {}
        for metric in self._metrics.values():
            if metric.labelnames:
                out[metric.name] = {
                    ",".join(values): _series_to_json(series) for values, series in metric._series()
                }
            else:
                out[metric.name] = _series_to_json(metric)
        return out


def _series_to_json(series: Counter | Gauge | Histogram) -> object:
    if isinstance(series, Histogram):
        snap = series.snapshot()
        return {
            "count": snap.count,
            "sum": snap.sum,
            "p50": snap.p50,
            "p99": snap.p99,
            "p999": snap.p999,
        }
    return series.value
