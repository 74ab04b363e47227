"""What a node reports about its NATS side, for `/healthz` and `/metrics`.

Three figures say whether a node can keep its promises: the publish latency (the time from
handing an update to JetStream to its acknowledgement, which the client's Ack waits for), the
consumer lag (messages stored in a room's subject that this node has not yet delivered to its
peers), and the connection state (connected, or since when it is not, and how often it
reconnected). Plain attributes updated on the event loop, rendered as Prometheus text like
crdtchat/relay/metrics.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from crdtchat.relay.metrics import Histogram

# Seconds. Fine where publishes land (a JetStream ack on loopback takes 0.5-20 ms), so that a
# quantile read from the buckets by linear interpolation (Prometheus `histogram_quantile`, or
# benchmarks/fanout.py --nats) is off by at most a third of its value there.
PUBLISH_BUCKETS = (
    0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0008, 0.001, 0.00125, 0.0015, 0.00175, 0.002,
    0.0025, 0.003, 0.0035, 0.004, 0.005, 0.006, 0.007, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def _publish_histogram() -> Histogram:
    return Histogram(PUBLISH_BUCKETS, [0] * len(PUBLISH_BUCKETS))


@dataclass
class ClusterMetrics:
    connected: bool = False
    disconnected_since: float | None = None  # time.monotonic() of the last loss, while lost
    reconnects: int = 0
    last_error: str = ""
    publishes: int = 0
    publish_conflicts: int = 0  # conditional publishes refused: the node's copy lagged
    publish_duplicates: int = 0  # retries JetStream recognised by their Nats-Msg-Id
    publish_failures: int = 0  # no acknowledgement (NATS down, timeout): nothing was promised
    publish_seconds: Histogram = field(default_factory=_publish_histogram)
    consumer_lag: dict[str, int] = field(default_factory=dict)  # room -> messages not delivered
    compactions: int = 0
    presence_nodes: int = 0  # other nodes whose heartbeat this node hears
    quota_batches_sent: int = 0  # batches of subjects' spending told to the other nodes
    quota_batches_heard: int = 0  # ... and heard from them
    quota_batches_repeated: int = 0  # ... heard again (sent again after an outage): ignored
    quota_bytes_heard: float = 0.0  # bytes written through other nodes, charged here
    quota_remote_connections: int = 0  # subjects' connections on the other nodes, as told

    def connection_changed(self, connected: bool, error: str = "") -> None:
        if connected and not self.connected and self.disconnected_since is not None:
            self.reconnects += 1
        self.connected = connected
        self.disconnected_since = None if connected else time.monotonic()
        if error:
            self.last_error = error

    def health(self) -> dict[str, object]:
        """The state `/healthz` shows: ok only while NATS acknowledges writes."""
        lost_for = (
            None
            if self.disconnected_since is None
            else round(time.monotonic() - self.disconnected_since, 3)
        )
        return {
            "nats": "connected" if self.connected else "disconnected",
            "disconnected_seconds": lost_for,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "max_consumer_lag": max(self.consumer_lag.values(), default=0),
        }

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP crdtchat_nats_{name} {help_text}")
            lines.append(f"# TYPE crdtchat_nats_{name} {kind}")
            lines.append(f"crdtchat_nats_{name} {value}")

        metric("connected", "gauge", "1 while connected to NATS.", int(self.connected))
        metric("reconnects_total", "counter", "Connections to NATS regained.", self.reconnects)
        metric("publishes_total", "counter", "Updates acknowledged by JetStream.", self.publishes)
        metric(
            "publish_conflicts_total",
            "counter",
            "Conditional publishes refused because another node wrote first.",
            self.publish_conflicts,
        )
        metric(
            "publish_duplicates_total",
            "counter",
            "Publishes JetStream de-duplicated by message id.",
            self.publish_duplicates,
        )
        metric(
            "publish_failures_total",
            "counter",
            "Publishes without an acknowledgement (NATS unreachable or too slow).",
            self.publish_failures,
        )
        metric(
            "consumer_lag_max",
            "gauge",
            "Most messages stored for one room and not yet delivered by this node.",
            max(self.consumer_lag.values(), default=0),
        )
        metric("compactions_total", "counter", "Room logs rolled up.", self.compactions)
        metric("presence_nodes", "gauge", "Other nodes heard in presence.", self.presence_nodes)
        metric(
            "quota_batches_sent_total",
            "counter",
            "Batches of subjects' spending told to the other nodes.",
            self.quota_batches_sent,
        )
        metric(
            "quota_batches_heard_total",
            "counter",
            "Batches of subjects' spending heard from the other nodes.",
            self.quota_batches_heard,
        )
        metric(
            "quota_batches_repeated_total",
            "counter",
            "Batches of spending heard again (resent after an outage), not charged twice.",
            self.quota_batches_repeated,
        )
        metric(
            "quota_bytes_heard_total",
            "counter",
            "Bytes subjects wrote through other nodes, charged to their quotas here.",
            self.quota_bytes_heard,
        )
        metric(
            "quota_remote_connections",
            "gauge",
            "Subjects' open connections on the other nodes, as they last told.",
            self.quota_remote_connections,
        )
        lines += self.publish_seconds.exposition(
            "nats_publish_seconds", "From publish to JetStream's acknowledgement."
        )
        return "\n".join(lines) + "\n"


def histogram_buckets(text: str, metric: str) -> dict[float, float]:
    """The cumulative bucket counts of histogram `metric` in Prometheus text: upper bound
    (`+Inf` as infinity) -> count. Several series of the same name (one per node) add up."""
    buckets: dict[float, float] = {}
    prefix = f'{metric}_bucket{{le="'
    for line in text.splitlines():
        if line.startswith(prefix):
            bound, _, value = line[len(prefix) :].partition('"} ')
            upper = float("inf") if bound == "+Inf" else float(bound)
            buckets[upper] = buckets.get(upper, 0.0) + float(value)
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile estimated from cumulative buckets as Prometheus's `histogram_quantile`
    does: linear interpolation within the bucket the rank falls in (from 0 in the lowest; the
    highest finite bound when it falls in +Inf). None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    below, lower = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        below, lower = count, upper
    return lower
