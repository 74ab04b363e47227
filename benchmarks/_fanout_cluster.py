"""Fan-out on a cluster (issue 13): 500 observers of one room spread over two relay nodes on one
NATS server, side by side in one run with our single relay (SQLite) and the node y-websocket
server, each holding all 500.

The writer appends chat messages at 20/s through node A (or the single server); observers are
the light clients of benchmarks/fanout.py (its `--observe` subprocesses), half on each node.
Reported per setup: delivery latency p50/p99 (writer's send to observer's receipt, one
CLOCK_MONOTONIC), the relays' CPU per delivery summed over the nodes, NATS's CPU per delivery,
and their total; for the cluster also the publish-to-acknowledgement latency (the nodes'
`crdtchat_nats_publish_seconds`). Setups alternate over `--runs` passes, so the machine's load
hits each alike; figures on a shared machine are noisy, compare within one run.

Run: .venv/bin/python benchmarks/fanout.py --nats [--quick] [--observers 500] [--runs 2]
[--updates 150] (this module is the `--nats` part of benchmarks/fanout.py, not an entry point).
"""

from __future__ import annotations

import os
import random
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
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from benchmarks._support import (
    REPO,
    SECRET,
    cpu_seconds,
    now_ns,
    parse_metrics,
    percentile,
    running_node_server,
    running_relay,
)
from benchmarks.fanout import LINE_LIMIT, peer, token, words
from crdtchat.cluster.local import NatsCluster, nats_cluster
from crdtchat.stack import RelaySubprocess
from crdtchat.wire import SyncUpdate

FANOUT = Path(__file__).resolve().parent / "fanout.py"
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
    publish_mean_ms: float | None  # cluster: publish to JetStream ack, mean over the phase

    @property
    def total_us(self) -> float:
        return self.relay_us + self.nats_us


async def _line(stream: BufferedByteReceiveStream) -> str:
    return (await stream.receive_until(b"\n", LINE_LIMIT)).decode()


async def _publish_totals(urls: Sequence[str]) -> tuple[float, float]:
    total = count = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        for url in urls:
            metrics = parse_metrics((await client.get(f"{url}/metrics")).text)
            total += metrics.get("nats_publish_seconds_sum", 0.0)
            count += metrics.get("nats_publish_seconds_count", 0.0)
    return total, count


async def fanout(setup: Setup, observers: int, updates: int, rate: float, warmup: int) -> Result:
    import json

    room = f"fanout-{observers}-{now_ns()}"
    shares = [observers // 2 + (i < observers % 2) for i in range(2)]
    bases = [setup.observer_urls[i % len(setup.observer_urls)] for i in range(2)]
    processes: list[Process] = []
    lines: list[BufferedByteReceiveStream] = []
    rng = random.Random(observers)
    try:
        for share, base in zip(shares, bases, strict=True):
            url = f"{base}/{room}?token={token(room, 'reader', 'observer')}"
            process = await anyio.open_process(
                [
                    sys.executable,
                    str(FANOUT),
                    "--observe",
                    url,
                    "--clients",
                    str(share),
                    "--last",
                    str(updates - 1),
                ],
                stderr=None,
            )
            processes.append(process)
            assert process.stdout is not None
            lines.append(BufferedByteReceiveStream(process.stdout))
        with anyio.fail_after(180):
            for stream in lines:
                if (await _line(stream)).strip() != "ready":
                    raise RuntimeError("an observer process did not get ready")
        sent: dict[int, int] = {}
        writer_url = f"{setup.writer_url}/{room}?token={token(room, 'writer', 'alice')}"
        async with peer(writer_url, "alice", apply_remote=False) as writer:
            publish_before = await _publish_totals(setup.metrics_urls)
            relay_before, nats_before = setup.relay_cpu(), setup.nats_cpu()
            start = now_ns()
            for seq in range(updates):
                wait = (start + seq * 1e9 / rate - now_ns()) / 1e9
                if wait > 0:
                    await anyio.sleep(wait)
                text = f"fanout#{seq}# " + words(rng, rng.randint(80, 300))
                update = writer.update_of(lambda text=text: writer.conv.append("user", text))
                sent[seq] = now_ns()
                await writer.send(SyncUpdate(update))
            with anyio.move_on_after(60):
                for stream in lines:
                    while (await _line(stream)).strip() != "done":
                        pass
            relay_after, nats_after = setup.relay_cpu(), setup.nats_cpu()
            publish_after = await _publish_totals(setup.metrics_urls)
        latencies: list[float] = []
        deliveries = 0
        for process, stream in zip(processes, lines, strict=True):
            assert process.stdin is not None
            await process.stdin.send(b"stop\n")
            with anyio.fail_after(60):
                line = await _line(stream)
                while not line.startswith("{"):
                    line = await _line(stream)
            receipts = json.loads(line)["receipts"]
            for index in range(0, len(receipts), 2):
                deliveries += 1
                if receipts[index] >= warmup:
                    latencies.append((receipts[index + 1] - sent[receipts[index]]) / 1e6)
        latencies.sort()
    finally:
        for process in processes:
            with anyio.move_on_after(30, shield=True):
                if process.returncode is None:
                    if process.stdin is not None:
                        await process.stdin.aclose()
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.aclose()
    published = publish_after[1] - publish_before[1]
    return Result(
        setup=setup.name,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        deliveries=deliveries,
        expected=observers * updates,
        relay_us=(relay_after - relay_before) / max(deliveries, 1) * 1e6,
        nats_us=(nats_after - nats_before) / max(deliveries, 1) * 1e6,
        publish_mean_ms=(publish_after[0] - publish_before[0]) / published * 1e3
        if published
        else None,
    )


def cluster_nodes(stack: ExitStack, directory: Path, nats: NatsCluster) -> list[RelaySubprocess]:
    nodes = []
    for index in range(2):
        node = RelaySubprocess(
            directory / f"node{index}",
            SECRET,
            [*RELAY_ARGS, "--nats", nats.url],
            env={"PYTHONPATH": str(REPO), "CRDTCHAT_NATS_PREFIX": "fanout"},
            cwd=REPO,
            log_path=directory / f"node{index}.log",
        )
        node.start(60.0)
        stack.callback(node.stop)
        nodes.append(node)
    return nodes


def run_cluster(quick: bool, observers: int, runs: int, updates: int) -> int:
    """`fanout.py --nats`: the three setups, alternated over `runs` passes; prints the table."""
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
        nodes = cluster_nodes(stack, directory, nats)
        single = stack.enter_context(running_relay(directory / "single", RELAY_ARGS))
        node_server = stack.enter_context(running_node_server(directory))
        setups = [
            Setup(
                "cluster: 2 relay nodes + 1 NATS",
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
        "| publish→ack ms (mean) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        publish = "-" if r.publish_mean_ms is None else f"{r.publish_mean_ms:.2f}"
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
