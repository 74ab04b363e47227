"""Relay counters, rendered in the Prometheus text exposition format for `/metrics`.

Plain attributes updated on the event loop; no client library, because the format is a few
lines of text and the relay must not pay a lock per update.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Seconds; covers an fsync on a fast SSD (sub-ms) up to a struggling disk.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = _BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
                break

    def exposition(self, name: str, help_text: str) -> list[str]:
        """Prometheus text lines for this histogram as `crdtchat_<name>` (cumulative buckets,
        as the format wants): one writer for the relay's and the cluster's histograms."""
        metric = f"crdtchat_{name}"
        lines = [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{metric}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{metric}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{metric}_sum {self.total}")
        lines.append(f"{metric}_count {self.count}")
        return lines


@dataclass
class Metrics:
    rooms: int = 0
    connections: int = 0
    updates_in: int = 0  # SyncStep2/SyncUpdate messages received
    updates_stored: int = 0  # effective (non-empty) updates committed
    updates_out: int = 0  # update messages delivered (one per receiving connection)
    bytes_in: int = 0
    bytes_out: int = 0
    awareness_in: int = 0
    refused_writes: int = 0
    # judged, then taken back to be judged again: a cluster node's publish met another's write
    updates_withdrawn: int = 0
    room_loads: int = 0
    room_unloads: int = 0
    room_evictions: int = 0  # idle rooms unloaded early at the room limit
    room_limit_refusals: int = 0  # joins refused: the room limit reached, no room idle
    compactions: int = 0
    # by `crdtchat.relay.protocol.CloseKind` value: what closed them, for machines
    closed_connections: Counter[str] = field(default_factory=Counter)
    store_write_seconds: Histogram = field(default_factory=Histogram)
    store_commits: int = 0  # transactions that stored updates: group commit's groups

    def store_committed(self, latencies: list[float]) -> None:
        """One commit of the store (`Store(on_commit=...)`): each update's queue-to-commit time."""
        self.store_commits += 1
        for seconds in latencies:
            self.store_write_seconds.observe(seconds)

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP crdtchat_{name} {help_text}")
            lines.append(f"# TYPE crdtchat_{name} {kind}")
            lines.append(f"crdtchat_{name} {value}")

        metric("rooms", "gauge", "Rooms loaded in memory.", self.rooms)
        metric("connections", "gauge", "Open websocket connections.", self.connections)
        metric(
            "updates_in_total",
            "counter",
            "Sync step 2 and update messages received.",
            self.updates_in,
        )
        metric(
            "updates_stored_total",
            "counter",
            "Accepted updates durably stored.",
            self.updates_stored,
        )
        metric(
            "updates_out_total",
            "counter",
            "Update messages delivered to connections.",
            self.updates_out,
        )
        metric("bytes_in_total", "counter", "Websocket payload bytes received.", self.bytes_in)
        metric("bytes_out_total", "counter", "Websocket payload bytes sent.", self.bytes_out)
        metric("awareness_in_total", "counter", "Awareness messages received.", self.awareness_in)
        metric(
            "refused_writes_total",
            "counter",
            "Updates refused by role permissions.",
            self.refused_writes,
        )
        metric(
            "updates_withdrawn_total",
            "counter",
            "Accepted updates judged again after another cluster node wrote the room first.",
            self.updates_withdrawn,
        )
        metric("room_loads_total", "counter", "Rooms loaded from the store.", self.room_loads)
        metric("room_unloads_total", "counter", "Idle rooms unloaded.", self.room_unloads)
        metric(
            "room_evictions_total",
            "counter",
            "Idle rooms unloaded early to stay within the room limit.",
            self.room_evictions,
        )
        metric(
            "room_limit_refusals_total",
            "counter",
            "Joins refused at the room limit (every loaded room in use).",
            self.room_limit_refusals,
        )
        metric(
            "store_commits_total",
            "counter",
            "Store transactions that stored updates (each one fsync; a group commit's groups).",
            self.store_commits,
        )
        metric(
            "compactions_total",
            "counter",
            "Update logs compacted into snapshots.",
            self.compactions,
        )
        lines.append(
            "# HELP crdtchat_closed_connections_total Connections closed by the relay, by kind."
        )
        lines.append("# TYPE crdtchat_closed_connections_total counter")
        for kind, count in sorted(self.closed_connections.items()):
            lines.append(f'crdtchat_closed_connections_total{{kind="{kind}"}} {count}')
        lines += self.store_write_seconds.exposition(
            "store_write_seconds", "Time from queueing an update to its commit."
        )
        return "\n".join(lines) + "\n"
