"""The publish histogram of a cluster node (crdtchat/cluster/metrics.py): valid Prometheus text
with buckets fine enough where JetStream acknowledgements land, and quantiles read back from
it as Prometheus's `histogram_quantile` does (benchmarks/fanout.py --nats reports them)."""

from __future__ import annotations

import random

import pytest

from crdtchat.cluster.metrics import (
    PUBLISH_BUCKETS,
    ClusterMetrics,
    histogram_buckets,
    histogram_quantile,
)

METRIC = "crdtchat_nats_publish_seconds"


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_the_publish_histogram_is_valid_prometheus_text() -> None:
    metrics = ClusterMetrics()
    for value in (0.0004, 0.0011, 0.0011, 0.019, 3.0):
        metrics.publish_seconds.observe(value)
    lines = metrics.render().splitlines()
    assert f"# TYPE {METRIC} histogram" in lines
    buckets = [line for line in lines if line.startswith(f"{METRIC}_bucket")]
    bounds = [line.split('"')[1] for line in buckets]
    assert bounds[-1] == "+Inf" and len(bounds) == len(PUBLISH_BUCKETS) + 1
    assert [float(b) for b in bounds[:-1]] == sorted(PUBLISH_BUCKETS)
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts), "cumulative"
    assert counts[-1] == 5 and f"{METRIC}_count 5" in lines
    assert counts[bounds.index("0.00125")] == 3 and counts[bounds.index("2.5")] == 4
    names = [line.split(" ")[2] for line in lines if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "each metric once"
    for line in lines:  # every sample: a name (labels optional) and a number
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_quantiles_read_from_the_buckets_are_close_to_the_exact_ones() -> None:
    """Between 0.5 and 20 ms, a bucket is at most a third wider than its lower bound, so the
    interpolated quantile is within a third of the exact one (a lognormal spread like the
    benchmark's: median ~2 ms, tail to ~20 ms)."""
    draw = random.Random(13)
    values = [min(0.02, max(0.0005, draw.lognormvariate(-6.2, 0.7))) for _ in range(5000)]
    one, two = ClusterMetrics(), ClusterMetrics()
    for index, value in enumerate(values):  # two nodes: their series add up
        (one if index % 2 else two).publish_seconds.observe(value)
    buckets = histogram_buckets(one.render() + two.render(), METRIC)
    assert buckets[float("inf")] == len(values)
    for q in (0.5, 0.9, 0.99):
        estimate = histogram_quantile(q, buckets)
        assert estimate == pytest.approx(exact_quantile(values, q), rel=1 / 3), q


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    buckets = {0.001: 10.0, 0.002: 30.0, 0.004: 40.0, float("inf"): 42.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.00155)  # rank 21: 11 of 20 in
    assert histogram_quantile(0.125, buckets) == pytest.approx(0.000525)  # rank 5.25, from 0
    assert histogram_quantile(0.99, buckets) == 0.004  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
