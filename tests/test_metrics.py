"""Tests of the metrics core: synchronous, no event loop, no clock."""

from __future__ import annotations

import ast
import json
import math
from bisect import bisect_left
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmemo.observability import metrics
from kvmemo.observability.metrics import (
    DEFAULT_LATENCY_BUCKETS,
    Histogram,
    HistogramSnapshot,
    MetricsRegistry,
)

# --- counters ---------------------------------------------------------------


def test_counter_starts_at_zero_and_adds_increments() -> None:
    counter = MetricsRegistry().counter("hits_total", "Hits.")
    assert counter.value == 0
    counter.inc()
    counter.inc(2)
    counter.inc(0.5)
    assert counter.value == 3.5


def test_counter_refuses_to_decrease_and_keeps_its_value() -> None:
    counter = MetricsRegistry().counter("hits_total", "Hits.")
    counter.inc(4)
    with pytest.raises(ValueError, match=r"^counter 'hits_total' can only increase, got -1$"):
        counter.inc(-1)
    assert counter.value == 4


# --- gauges -----------------------------------------------------------------


def test_gauge_goes_up_and_down() -> None:
    gauge = MetricsRegistry().gauge("sessions", "Open sessions.")
    gauge.set(10)
    gauge.inc()
    gauge.dec(3)
    gauge.inc(0.25)
    assert gauge.value == 8.25


def test_gauge_function_is_computed_at_every_read() -> None:
    depth = [3]
    gauge = MetricsRegistry().gauge("mailbox_depth", "Queued messages.")
    gauge.set_function(lambda: depth[0])
    assert gauge.value == 3
    depth[0] = 7
    assert gauge.value == 7


def test_gauge_set_replaces_its_function() -> None:
    gauge = MetricsRegistry().gauge("memory_bytes", "Memory.")
    gauge.set_function(lambda: 100.0)
    gauge.set(5)
    assert gauge.value == 5
    gauge.inc()
    assert gauge.value == 6


def test_gauge_computed_by_function_refuses_inc_and_dec() -> None:
    gauge = MetricsRegistry().gauge("memory_bytes", "Memory.")
    gauge.set_function(lambda: 100.0)
    message = r"^gauge 'memory_bytes' is computed by a function: call set\(\) first$"
    with pytest.raises(ValueError, match=message):
        gauge.inc()
    with pytest.raises(ValueError, match=message):
        gauge.dec()
    assert gauge.value == 100.0


# --- registry: identity, names, mismatches ----------------------------------


def test_asking_twice_for_a_name_returns_the_same_metric() -> None:
    registry = MetricsRegistry()
    assert registry.counter("a_total", "A.") is registry.counter("a_total", "A.")
    assert registry.gauge("g", "G.", ("shard",)) is registry.gauge("g", "G.", ["shard"])
    assert registry.histogram("h", "H.") is registry.histogram("h", "H.")


def test_reregistering_a_name_with_another_type_is_refused() -> None:
    registry = MetricsRegistry()
    registry.counter("x", "X.")
    with pytest.raises(
        ValueError, match=r"^metric 'x' is already registered as a counter, not a gauge$"
    ):
        registry.gauge("x", "X.")
    with pytest.raises(
        ValueError, match=r"^metric 'x' is already registered as a counter, not a histogram$"
    ):
        registry.histogram("x", "X.")


def test_reregistering_a_name_with_other_labels_is_refused() -> None:
    registry = MetricsRegistry()
    registry.counter("x", "X.", ("cmd",))
    with pytest.raises(
        ValueError,
        match=r"^metric 'x' is already registered with labels \('cmd',\), not \('cmd', 'shard'\)$",
    ):
        registry.counter("x", "X.", ("cmd", "shard"))


def test_reregistering_a_histogram_with_other_buckets_is_refused() -> None:
    registry = MetricsRegistry()
    registry.histogram("h", "H.", buckets=(1, 2))
    with pytest.raises(
        ValueError, match=r"^histogram 'h' is already registered with other buckets$"
    ):
        registry.histogram("h", "H.", buckets=(1, 2, 3))


@pytest.mark.parametrize("name", ["a", "_a", ":a", "kvmemo_commands_total", "ns:sub_x9"])
def test_prometheus_metric_names_are_accepted(name: str) -> None:
    assert MetricsRegistry().counter(name, "ok").name == name


@pytest.mark.parametrize("name", ["", "9lives", "has-dash", "has space", "dot.name", "é"])
def test_invalid_metric_names_are_refused(name: str) -> None:
    expected = rf"^metric name must match \[a-zA-Z_:\]\[a-zA-Z0-9_:\]\*, got {name!r}$"
    with pytest.raises(ValueError, match=expected):
        MetricsRegistry().gauge(name, "bad")


@pytest.mark.parametrize("label", ["9x", "a-b", "__reserved", "a:b", ""])
def test_invalid_label_names_are_refused(label: str) -> None:
    expected = (
        r"^label name must match \[a-zA-Z_\]\[a-zA-Z0-9_\]\* and not start with '__', "
        rf"got {label!r}$"
    )
    with pytest.raises(ValueError, match=expected):
        MetricsRegistry().counter("x", "X.", (label,))


def test_duplicate_label_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^label names must be distinct, got \('a', 'a'\)$"):
        MetricsRegistry().counter("x", "X.", ("a", "a"))


def test_a_string_is_not_taken_for_a_list_of_label_names() -> None:
    with pytest.raises(
        ValueError, match=r"^labelnames must be a sequence of names, got the string 'cmd'$"
    ):
        MetricsRegistry().counter("x", "X.", "cmd")


def test_histogram_refuses_the_le_label() -> None:
    registry = MetricsRegistry()
    with pytest.raises(ValueError, match=r"^label name 'le' is reserved for histogram buckets$"):
        registry.histogram("h", "H.", ("le",))
    assert registry.counter("c", "C.", ("le",)).labelnames == ("le",)


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ((), r"^buckets must not be empty$"),
        ((1.0, math.inf), r"^buckets must be finite \(\+Inf is implicit\), got inf$"),
        ((1.0, math.nan), r"^buckets must be finite \(\+Inf is implicit\), got nan$"),
        ((1.0, 1.0), r"^buckets must be strictly increasing, got \(1\.0, 1\.0\)$"),
        ((2.0, 1.0), r"^buckets must be strictly increasing, got \(2\.0, 1\.0\)$"),
    ],
)
def test_invalid_buckets_are_refused(buckets: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsRegistry().histogram("h", "H.", buckets=buckets)


# --- labels -----------------------------------------------------------------


def test_labels_returns_one_cached_child_per_tuple_of_values() -> None:
    family = MetricsRegistry().counter("commands_total", "Commands.", ("cmd", "shard"))
    get0 = family.labels("get", "0")
    assert family.labels("get", "0") is get0
    assert family.labels("get", "1") is not get0
    get0.inc()
    get0.inc()
    assert family.labels("get", "0").value == 2
    assert family.labels("get", "1").value == 0


def test_children_share_their_family_buckets() -> None:
    family = MetricsRegistry().histogram("h", "H.", ("cmd",), buckets=(1, 2))
    assert family.labels("get").buckets == (1.0, 2.0)


def test_labels_with_the_wrong_number_of_values_is_refused() -> None:
    family = MetricsRegistry().counter("x", "X.", ("cmd",))
    with pytest.raises(
        ValueError, match=r"^metric 'x' has labels \('cmd',\), got 2 values \('a', 'b'\)$"
    ):
        family.labels("a", "b")
    with pytest.raises(ValueError, match=r"^metric 'x' has labels \('cmd',\), got 0 values \(\)$"):
        family.labels()


def test_labels_on_an_unlabelled_metric_or_a_child_is_refused() -> None:
    registry = MetricsRegistry()
    with pytest.raises(ValueError, match=r"^metric 'plain' has no labels$"):
        registry.gauge("plain", "P.").labels("a")
    child = registry.gauge("fam", "F.", ("a",)).labels("1")
    with pytest.raises(ValueError, match=r"^metric 'fam' has no labels$"):
        child.labels("2")


def test_a_labelled_family_refuses_to_record_or_report_itself() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("c", "C.", ("cmd",))
    gauge = registry.gauge("g", "G.", ("cmd",))
    histogram = registry.histogram("h", "H.", ("cmd",))

    def message(name: str) -> str:
        return rf"^metric '{name}' has labels \('cmd',\): record on \.labels\(\.\.\.\)$"

    with pytest.raises(ValueError, match=message("c")):
        counter.inc()
    with pytest.raises(ValueError, match=message("c")):
        _ = counter.value
    with pytest.raises(ValueError, match=message("g")):
        gauge.set(1)
    with pytest.raises(ValueError, match=message("g")):
        gauge.set_function(lambda: 1.0)
    with pytest.raises(ValueError, match=message("h")):
        histogram.observe(0.1)
    with pytest.raises(ValueError, match=message("h")):
        histogram.quantile(0.5)
    with pytest.raises(ValueError, match=message("h")):
        histogram.snapshot()


# --- histograms -------------------------------------------------------------


def test_histogram_counts_and_sums_observations() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(1, 2))
    for value in (0.5, 1.0, 1.5, 3.0):
        histogram.observe(value)
    assert histogram.count == 4
    assert histogram.sum == 6.0


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 20)), max_size=10))
def test_observe_many_is_observe_repeated(runs: list[tuple[float, int]]) -> None:
    many = MetricsRegistry().histogram("h", "H.", buckets=(1, 2, 4))
    one_by_one = MetricsRegistry().histogram("h", "H.", buckets=(1, 2, 4))
    for value, times in runs:
        many.observe_many(value, times)
        for _ in range(times):
            one_by_one.observe(value)
    assert many.snapshot().buckets == one_by_one.snapshot().buckets
    assert many.sum == pytest.approx(one_by_one.sum)


def test_bucket_upper_bounds_are_inclusive() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(1, 2))
    histogram.observe(1.0)
    histogram.observe(2.0)
    histogram.observe(2.0000001)
    assert histogram.snapshot().buckets == ((1.0, 1), (2.0, 2), (math.inf, 3))


def test_snapshot_is_frozen_and_reports_count_sum_quantiles_and_cumulative_buckets() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(1, 2, 4))
    for value in (0.5, 1.5, 1.5, 3.0):
        histogram.observe(value)
    snap = histogram.snapshot()
    assert isinstance(snap, HistogramSnapshot)
    assert (snap.count, snap.sum) == (4, 6.5)
    assert snap.p50 == 1.5  # rank 2: 1 of the 2 values in (1, 2], so 1 + 1 * (1 / 2)
    assert snap.p99 == pytest.approx(3.92)  # rank 3.96: 0.96 of the 1 value in (2, 4]
    assert snap.p999 == pytest.approx(3.992)
    assert snap.buckets == ((1.0, 1), (2.0, 3), (4.0, 4), (math.inf, 4))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snap.count = 0  # type: ignore[misc]


def test_empty_histogram_has_nan_quantiles_and_none_in_its_snapshot() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    assert histogram.count == 0
    assert math.isnan(histogram.quantile(0.5))
    snap = histogram.snapshot()
    assert (snap.count, snap.sum, snap.p50, snap.p99, snap.p999) == (0, 0.0, None, None, None)


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan, math.inf])
def test_quantile_outside_zero_one_is_refused(q: float) -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    histogram.observe(0.001)
    with pytest.raises(ValueError, match=rf"^quantile must be in \[0, 1\], got {q!r}$"):
        histogram.quantile(q)


def test_quantiles_of_values_uniform_inside_one_bucket_are_interpolated() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    for i in range(1000):  # uniform in (0.1, 0.2], itself one default bucket
        histogram.observe(0.1 + 0.1 * (i + 0.5) / 1000)
    assert histogram.quantile(0.5) == pytest.approx(0.15, rel=1e-9)
    assert histogram.quantile(0.99) == pytest.approx(0.199, rel=1e-9)
    assert histogram.quantile(0.0) == pytest.approx(0.1)
    assert histogram.quantile(1.0) == pytest.approx(0.2)


def test_quantile_error_is_bounded_by_the_bucket_holding_the_rank() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    values = [3.0 * (i + 0.5) / 1000 for i in range(1000)]  # uniform in (0, 3)
    for value in values:
        histogram.observe(value)
    assert histogram.quantile(0.5) == pytest.approx(1.5, abs=0.01)  # inside (1, 2]
    p99 = histogram.quantile(0.99)  # true value 2.97, in the coarse bucket (2, 5]
    assert 2.0 < p99 <= 5.0
    assert p99 == pytest.approx(2.0 + 3.0 * (990 - 667) / 333)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    histogram = MetricsRegistry().histogram("h", "H.")
    for _ in range(10):
        histogram.observe(60.0)
    assert histogram.quantile(0.5) == 10.0
    assert histogram.quantile(0.0) == 10.0


def test_quantile_of_zero_is_the_lower_bound_of_the_first_occupied_bucket() -> None:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(1, 2, 4))
    histogram.observe(3.0)
    assert histogram.quantile(0.0) == 2.0
    assert histogram.quantile(1.0) == 4.0


def test_quantile_at_a_bucket_edge_is_not_pushed_past_it_by_rounding() -> None:
    # In floats 1.73 + (7.22 - 1.73) == 7.220000000000001: unclamped, p50 would
    # exceed the estimates of slightly higher quantiles in the next bucket.
    histogram = MetricsRegistry().histogram("h", "H.", buckets=(1.73, 7.22, 8.0))
    histogram.observe(5.0)
    histogram.observe(7.5)
    assert histogram.quantile(0.5) == 7.22
    assert histogram.quantile(0.5) <= histogram.quantile(0.5000001)


# --- default buckets --------------------------------------------------------


def test_default_latency_buckets_span_5us_to_10s_in_1_2_5_steps() -> None:
    assert DEFAULT_LATENCY_BUCKETS[0] == 5e-6
    assert DEFAULT_LATENCY_BUCKETS[-1] == 10.0
    ratios = {
        round(hi / lo, 9)
        for lo, hi in zip(DEFAULT_LATENCY_BUCKETS, DEFAULT_LATENCY_BUCKETS[1:], strict=False)
    }
    assert ratios == {2.0, 2.5}
    assert MetricsRegistry().histogram("h", "H.").buckets == DEFAULT_LATENCY_BUCKETS


# --- read-outs --------------------------------------------------------------


def _small_registry() -> MetricsRegistry:
    registry = MetricsRegistry()
    commands = registry.counter("kvmemo_commands_total", "Commands executed.", ("cmd",))
    commands.labels("get").inc(3)
    commands.labels("set").inc()
    registry.gauge("kvmemo_memory_bytes", "Tracked memory, in bytes.").set_function(lambda: 1024)
    registry.gauge("kvmemo_load", "Load.").set(0.5)
    latency = registry.histogram(
        "kvmemo_latency_seconds", "Command latency, in seconds.", buckets=(0.25, 0.5, 1.0)
    )
    for value in (0.125, 0.25, 0.75, 2.0):
        latency.observe(value)
    return registry


def test_render_prometheus_of_a_small_registry_is_exact() -> None:
    expected = (
        "# HELP kvmemo_commands_total Commands executed.\n"
        "# TYPE kvmemo_commands_total counter\n"
        'kvmemo_commands_total{cmd="get"} 3\n'
        'kvmemo_commands_total{cmd="set"} 1\n'
        "# HELP kvmemo_memory_bytes Tracked memory, in bytes.\n"
        "# TYPE kvmemo_memory_bytes gauge\n"
        "kvmemo_memory_bytes 1024\n"
        "# HELP kvmemo_load Load.\n"
        "# TYPE kvmemo_load gauge\n"
        "kvmemo_load 0.5\n"
        "# HELP kvmemo_latency_seconds Command latency, in seconds.\n"
        "# TYPE kvmemo_latency_seconds histogram\n"
        'kvmemo_latency_seconds_bucket{le="0.25"} 2\n'
        'kvmemo_latency_seconds_bucket{le="0.5"} 2\n'
        'kvmemo_latency_seconds_bucket{le="1"} 3\n'
        'kvmemo_latency_seconds_bucket{le="+Inf"} 4\n'
        "kvmemo_latency_seconds_sum 3.125\n"
        "kvmemo_latency_seconds_count 4\n"
    )
    assert _small_registry().render_prometheus() == expected


def test_render_prometheus_of_a_labelled_histogram_puts_le_last() -> None:
    registry = MetricsRegistry()
    family = registry.histogram("lat", "L.", ("cmd",), buckets=(5e-6, 1e-4))
    family.labels("get").observe(1e-4)
    assert registry.render_prometheus() == (
        "# HELP lat L.\n"
        "# TYPE lat histogram\n"
        'lat_bucket{cmd="get",le="5e-06"} 0\n'
        'lat_bucket{cmd="get",le="0.0001"} 1\n'
        'lat_bucket{cmd="get",le="+Inf"} 1\n'
        'lat_sum{cmd="get"} 0.0001\n'
        'lat_count{cmd="get"} 1\n'
    )


def test_render_prometheus_escapes_label_values_and_help() -> None:
    registry = MetricsRegistry()
    family = registry.counter("c_total", 'Help with \\ and\nnewline and "quotes".', ("k",))
    family.labels('a"b\\c\nd').inc()
    assert registry.render_prometheus() == (
        '# HELP c_total Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE c_total counter\n"
        'c_total{k="a\\"b\\\\c\\nd"} 1\n'
    )


def test_render_prometheus_lists_a_family_without_children_by_help_and_type_only() -> None:
    registry = MetricsRegistry()
    registry.counter("c_total", "C.", ("cmd",))
    assert registry.render_prometheus() == "# HELP c_total C.\n# TYPE c_total counter\n"
    assert MetricsRegistry().render_prometheus() == ""


def test_render_prometheus_spells_special_floats_as_prometheus_does() -> None:
    registry = MetricsRegistry()
    registry.gauge("up", "U.").set(math.inf)
    registry.gauge("down", "D.").set(-math.inf)
    registry.gauge("unknown", "N.").set(math.nan)
    samples = [
        line for line in registry.render_prometheus().splitlines() if not line.startswith("#")
    ]
    assert samples == ["up +Inf", "down -Inf", "unknown NaN"]


def test_to_dict_is_json_ready_and_in_registration_order() -> None:
    registry = _small_registry()
    registry.histogram("kvmemo_idle_seconds", "Never observed.")
    family = registry.histogram("kvmemo_cmd_seconds", "Per command.", ("cmd", "shard"))
    family.labels("get", "0").observe(0.15)
    result = registry.to_dict()
    assert list(result) == [
        "kvmemo_commands_total",
        "kvmemo_memory_bytes",
        "kvmemo_load",
        "kvmemo_latency_seconds",
        "kvmemo_idle_seconds",
        "kvmemo_cmd_seconds",
    ]
    assert result["kvmemo_commands_total"] == {"get": 3, "set": 1}
    assert result["kvmemo_memory_bytes"] == 1024
    assert result["kvmemo_load"] == 0.5
    assert result["kvmemo_latency_seconds"] == {
        "count": 4,
        "sum": 3.125,
        "p50": 0.25,
        "p99": 1.0,
        "p999": 1.0,
    }
    assert result["kvmemo_idle_seconds"] == {
        "count": 0,
        "sum": 0.0,
        "p50": None,
        "p99": None,
        "p999": None,
    }
    assert result["kvmemo_cmd_seconds"] == {
        "get,0": {
            "count": 1,
            "sum": 0.15,
            "p50": pytest.approx(0.15),
            "p99": pytest.approx(0.199),
            "p999": pytest.approx(0.1999),
        }
    }
    assert json.loads(json.dumps(result, allow_nan=False))["kvmemo_load"] == 0.5


# --- properties -------------------------------------------------------------

_observations = st.lists(
    st.floats(min_value=0.0, max_value=20.0, allow_nan=False), min_size=1, max_size=200
)
_bucket_sets = st.one_of(
    st.just(DEFAULT_LATENCY_BUCKETS),
    st.lists(
        st.floats(min_value=1e-6, max_value=15.0, allow_nan=False), min_size=1, max_size=12
    ).map(lambda bs: tuple(sorted(set(bs)))),
)
_quantiles = st.floats(min_value=0.0, max_value=1.0)


def _filled(buckets: tuple[float, ...], values: list[float]) -> Histogram:
    histogram = MetricsRegistry().histogram("h", "H.", buckets=buckets)
    for value in values:
        histogram.observe(value)
    return histogram


def _bucket_range(buckets: tuple[float, ...], value: float) -> tuple[float, float]:
    """The (lower, upper) estimate range of the bucket holding ``value``."""
    i = bisect_left(buckets, value)
    if i == len(buckets):  # +Inf bucket: the estimate is the highest finite bound
        return buckets[-1], buckets[-1]
    return (buckets[i - 1] if i else 0.0), buckets[i]


@given(buckets=_bucket_sets, values=_observations, q1=_quantiles, q2=_quantiles)
def test_quantile_estimates_are_monotonic_in_q(
    buckets: tuple[float, ...], values: list[float], q1: float, q2: float
) -> None:
    histogram = _filled(buckets, values)
    lo, hi = sorted((q1, q2))
    assert histogram.quantile(lo) <= histogram.quantile(hi)


@given(buckets=_bucket_sets, values=_observations, q=_quantiles)
def test_quantile_estimates_stay_within_the_occupied_buckets(
    buckets: tuple[float, ...], values: list[float], q: float
) -> None:
    histogram = _filled(buckets, values)
    estimate = histogram.quantile(q)
    lowest, _ = _bucket_range(buckets, min(values))
    _, highest = _bucket_range(buckets, max(values))
    assert 0.0 <= lowest <= estimate <= highest <= buckets[-1]


@given(buckets=_bucket_sets, values=_observations, q=_quantiles)
def test_quantile_estimate_lies_in_the_bucket_of_the_true_quantile(
    buckets: tuple[float, ...], values: list[float], q: float
) -> None:
    histogram = _filled(buckets, values)
    rank = max(math.ceil(q * len(values)), 1)
    true_value = sorted(values)[rank - 1]
    lower, upper = _bucket_range(buckets, true_value)
    assert lower <= histogram.quantile(q) <= upper


# --- purity -----------------------------------------------------------------


def test_metrics_core_imports_neither_trio_nor_actors_nor_a_clock() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"trio", "actors", "time", "datetime"})
