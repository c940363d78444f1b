"""Small helpers shared by the benchmarks: timing rounds, percentiles, formatting."""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs


@attrs.frozen
class Round:
    """One timed round: ``units`` of work (ops or keys) in ``elapsed`` seconds.

    ``latencies`` are per-call seconds (empty when not recorded); ``cpu`` is
    the process CPU time of the round (NaN when not recorded): well under
    ``elapsed`` means the machine's cores were shared with other processes.
    """

    elapsed: float
    units: int
    latencies: Sequence[float] = ()
    cpu: float = float("nan")

    @property
    def cpu_share(self) -> float:
        """CPU time over wall time (about 1.0 for a single-threaded, uncontended run)."""
        return self.cpu / self.elapsed if self.elapsed > 0 else float("nan")

    @property
    def cpu_rate(self) -> float:
        """Units per second of process CPU (steadier than ``rate`` on shared cores)."""
        return self.units / self.cpu if self.cpu > 0 else float("nan")

    @property
    def rate(self) -> float:
        """Units per second."""
        return self.units / self.elapsed if self.elapsed > 0 else float("inf")


def best(rounds: Sequence[Round]) -> Round:
    """The round with the highest throughput (best of N)."""
    return max(rounds, key=lambda r: r.rate)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def fmt_rate(rate: float) -> str:
    """A rate with a k/M suffix: ``123.4k``."""
    if rate >= 1e6:
        return f"{rate / 1e6:.2f}M"
    if rate >= 1e3:
        return f"{rate / 1e3:.1f}k"
    return f"{rate:.0f}"


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. ``"1.2 on 2 cores"``."""
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    return f"{load} on {os.cpu_count()} cores"


def fmt_us(seconds: float) -> str:
    """Seconds as microseconds, one decimal."""
    return f"{seconds * 1e6:.1f}"
