"""Fan-out on a cluster (issue 13): 500 observers of one room spread over two relay nodes on one
NATS server, side by side in one run with our single relay (SQLite) and the node y-websocket
server, each holding all 500.

The writer appends chat messages at 20/s through node A (or the single server); observers are
the light clients of benchmarks/fanout.py (its `--observe` subprocesses), half on each node.
Reported per setup: delivery latency p50/p99 (writer's send to observer's receipt, one
CLOCK_MONOTONIC), the relays' CPU per delivery summed over the nodes, NATS's CPU per delivery,
and their total; for the cluster also the publish-to-acknowledgement latency p50/p99, estimated
from the nodes' `crdtchat_nats_publish_seconds` buckets over the phase by linear interpolation
within a bucket, as Prometheus's `histogram_quantile` does (buckets 0.25 to 0.33 wide where the
publishes land, so within a third of the exact figure). Setups alternate over `--runs` passes,
so the machine's load hits each alike; figures on a shared machine are noisy, compare within
one run.

Run: .venv/bin/python benchmarks/fanout.py --nats [--quick] [--observers 500] [--runs 2]
[--updates 150] (this module is the `--nats` part of benchmarks/fanout.py, not an entry point).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import httpx

from benchmarks._support import (
    REPO,
    SECRET,
    cpu_seconds,
    now_ns,
    percentile,
    running_node_server,
    running_relay,
)
from benchmarks.fanout import observe_writes, token
from crdtchat.cluster.local import NatsCluster, nats_cluster
from crdtchat.cluster.metrics import histogram_buckets, histogram_quantile
from crdtchat.stack import RelaySubprocess

RELAY_ARGS = ["--idle-unload", "1", "--subject-connections", "10000"]


@dataclass
class Setup:
    name: str
    writer_url: str  # ws:// base of the server the writer uses
    observer_urls: list[str]  # ws:// bases the observers are spread over
    relay_cpu: Callable[[], float]  # relay (or node server) CPU seconds so far, all processes
    nats_cpu: Callable[[], float]
    metrics_urls: list[str]  # http:// bases with /metrics (ours)


@dataclass
class Result:
    setup: str
    p50_ms: float
    p99_ms: float
    deliveries: int
    expected: int
    relay_us: float  # relay CPU per delivery, summed over nodes
    nats_us: float
    publish_ms: tuple[float, float] | None  # cluster: publish to JetStream ack, p50 and p99

    @property
    def total_us(self) -> float:
        return self.relay_us + self.nats_us


async def _publish_buckets(urls: Sequence[str]) -> dict[float, float]:
    """The nodes' publish histograms added up: upper bound -> cumulative count."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = "".join([(await client.get(f"{url}/metrics")).text for url in urls])
    return histogram_buckets(text, "crdtchat_nats_publish_seconds")


def _publish_quantiles(
    before: dict[float, float], after: dict[float, float]
) -> tuple[float, float] | None:
    """p50 and p99 in ms of the publishes between the two readings (interpolated)."""
    phase = {bound: count - before.get(bound, 0.0) for bound, count in after.items()}
    p50, p99 = histogram_quantile(0.5, phase), histogram_quantile(0.99, phase)
    return None if p50 is None or p99 is None else (p50 * 1e3, p99 * 1e3)


async def fanout(setup: Setup, observers: int, updates: int, rate: float, warmup: int) -> Result:
    room = f"fanout-{observers}-{now_ns()}"
    groups = max(2, len(setup.observer_urls))  # observer processes, one per node at least
    shares = [observers // groups + (i < observers % groups) for i in range(groups)]
    bases = [setup.observer_urls[i % len(setup.observer_urls)] for i in range(groups)]
    reader = token(room, "reader", "observer")
    writer_url = f"{setup.writer_url}/{room}?token={token(room, 'writer', 'alice')}"

    async def measure() -> tuple[dict[float, float], float, float]:
        return await _publish_buckets(setup.metrics_urls), setup.relay_cpu(), setup.nats_cpu()

    observed, before, after = await observe_writes(
        [
            (f"{base}/{room}?token={reader}", share)
            for base, share in zip(bases, shares, strict=True)
        ],
        writer_url,
        updates,
        rate,
        warmup,
        observers,
        measure,
    )
    publish_before, relay_before, nats_before = before
    publish_after, relay_after, nats_after = after
    deliveries = observed.deliveries
    return Result(
        setup=setup.name,
        p50_ms=percentile(observed.latencies_ms, 0.5),
        p99_ms=percentile(observed.latencies_ms, 0.99),
        deliveries=deliveries,
        expected=observers * updates,
        relay_us=(relay_after - relay_before) / max(deliveries, 1) * 1e6,
        nats_us=(nats_after - nats_before) / max(deliveries, 1) * 1e6,
        publish_ms=_publish_quantiles(publish_before, publish_after),
    )


def cluster_nodes(
    stack: ExitStack,
    directory: Path,
    nats: NatsCluster,
    count: int = 2,
    args: Sequence[str] = RELAY_ARGS,
    prefix: str = "fanout",
) -> list[RelaySubprocess]:
    """`count` relay nodes on `nats`, node i listing the servers from the i-th on (so their
    connections spread over the servers); `stack` stops them. benchmarks/connections.py too."""
    nodes = []
    for index in range(count):
        first = index % len(nats.urls)
        servers = ",".join(nats.urls[first:] + nats.urls[:first])
        node = RelaySubprocess(
            directory / f"node{index}",
            SECRET,
            [*args, "--nats", servers],
            env={"PYTHONPATH": str(REPO), "CRDTCHAT_NATS_PREFIX": prefix},
            cwd=REPO,
            log_path=directory / f"node{index}.log",
        )
        node.start(60.0)
        stack.callback(node.stop)
        nodes.append(node)
    return nodes


def run_cluster(quick: bool, observers: int, runs: int, updates: int, count: int = 2) -> int:
    """`fanout.py --nats`: the three setups, alternated over `runs` passes; prints the table.
    `count` relay nodes share the observers (1 shows what a node costs without another)."""
    if not 1 <= count <= 4:
        raise SystemExit(f"--nodes must be 1 to 4, not {count}")
    if quick:
        observers, updates = 20, 30
    print(f"load average {os.getloadavg()}; {os.cpu_count()} cores", flush=True)
    results: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="crdtchat-fanout-cluster-") as tmp,
        ExitStack() as stack,
    ):
        directory = Path(tmp)
        nats = stack.enter_context(nats_cluster(directory / "nats", size=1))
        nats_pid = nats.nodes[0].proc.pid  # type: ignore[union-attr]
        nodes = cluster_nodes(stack, directory, nats, count=count)
        single = stack.enter_context(running_relay(directory / "single", RELAY_ARGS))
        node_server = stack.enter_context(running_node_server(directory))
        setups = [
            Setup(
                f"cluster: {count} relay node{'s' if count > 1 else ''} + 1 NATS",
                nodes[0].ws_base,
                [node.ws_base for node in nodes],
                lambda: sum(cpu_seconds(node.proc.pid) for node in nodes),  # type: ignore[union-attr]
                lambda: cpu_seconds(nats_pid),
                [node.http_url for node in nodes],
            ),
            Setup("our single relay", single.url, [single.url], single.cpu, lambda: 0.0, []),
            Setup(
                "node y-websocket",
                node_server.url,
                [node_server.url],
                node_server.cpu,
                lambda: 0.0,
                [],
            ),
        ]
        for run in range(runs):
            for setup in setups if run % 2 == 0 else setups[::-1]:
                print(f"run {run + 1}: {setup.name}, {observers} observers ...", flush=True)
                results.append(anyio.run(fanout, setup, observers, updates, 20.0, 10))
    print()
    print(
        "| setup | p50 ms | p99 ms | delivered | relay CPU µs/delivery | NATS µs | total µs "
        "| publish→ack p50 / p99 ms (interpolated in buckets) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        publish = "-" if r.publish_ms is None else f"{r.publish_ms[0]:.2f} / {r.publish_ms[1]:.2f}"
        print(
            f"| {r.setup} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.deliveries}/{r.expected} "
            f"| {r.relay_us:.1f} | {r.nats_us:.1f} | {r.total_us:.1f} | {publish} |"
        )
    cluster = [r for r in results if r.setup == setups[0].name]
    ours = [r for r in results if r.setup == setups[1].name]
    p99 = statistics.median(c.p99_ms / o.p99_ms for c, o in zip(cluster, ours, strict=True))
    cpu = statistics.median(c.total_us / o.total_us for c, o in zip(cluster, ours, strict=True))
    print(
        f"\ncluster / single relay, median over runs: p99 {p99:.2f}x (target <= 1.3), "
        f"total CPU per delivery {cpu:.2f}x (target <= 1.5)"
    )
    print(f"load average after {os.getloadavg()}")
    return 0
