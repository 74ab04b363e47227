"""Many rooms and idle connections on a cluster (issue 13): the figures docs/cluster.md's
scaling plan rests on. This is the `--nats` part of benchmarks/connections.py (its load
generator, its write measurement), not an entry point.

Setups, one after the other in one run (the file-descriptor limit of 20,000 holds one at a
time), the first being the anchor:

- our single relay (SQLite);
- relay nodes on NATS: 1 server and 1 node, 1 server and 2 nodes, 3 servers (stream R3) and 2
  nodes.

Each setup: `--rooms` rooms, each loaded on every relay node by a connection that writes a
message and leaves (rooms stay loaded: --idle-unload beyond the run), so each room is a subject
with one live ordered consumer per node; then `--connections` idle connections spread over the
nodes so that every room has connections on every node. Measured per relay node: VmRSS per
loaded room and per connection; per NATS server (summed): VmRSS per loaded room, and the CPU an
idle loaded room costs (the consumers' heartbeats) beside the nodes'; a write (writer on the
first node with ext=ack, observer on the last) with one room loaded and with everything loaded:
relay and NATS CPU per write, send -> Ack (the durable point) and Ack -> observer.

`--consumers N` then measures one stream's consumer capacity on its own: one connection follows
N rooms (one ordered consumer each, as a node does) on 1 server and on 3, reporting every
`--consumers-step`: NATS memory per consumer, the time to create one, and the idle CPU of the
servers and of the following process; it stops at the first failure or after 150 s.

Latencies on a shared 2-core machine move with the load: compare within the run (ratios to the
anchor); memory figures are robust to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from nats.errors import Error as NatsError

from benchmarks._fanout_cluster import cluster_nodes
from benchmarks._support import cpu_seconds, percentile, rss_kib, running_relay
from benchmarks.connections import WriteCost, generators, write_cost
from crdtchat.cluster.connection import connect
from crdtchat.cluster.local import NatsCluster, nats_cluster
from crdtchat.cluster.names import Names
from crdtchat.cluster.roomlog import Follower, RoomLog

IDLE_WINDOW = 10.0  # seconds over which an idle loaded room's CPU is measured
CONSUMER_PHASE_LIMIT = 150.0  # seconds: the consumer capacity stops there, as a finding


@dataclass
class Write:
    relay_us: float  # CPU per write, relay processes summed
    nats_us: float  # CPU per write, NATS servers summed
    relay_net_us: float  # relay_us less what the loaded rooms cost idle over the same time
    nats_net_us: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_to_delivery_p50_ms: float  # what a peer on another node waits beyond the durable point
    delivery_p50_ms: float
    delivery_p99_ms: float

    @classmethod
    def of(cls, cost: WriteCost, relay_idle: float, nats_idle: float) -> Write:
        """`relay_idle`, `nats_idle`: CPU seconds per second with nothing written."""
        acks, deliveries = sorted(cost.ack_ms), sorted(cost.delivery_ms)
        beyond = sorted(d - a for d, a in zip(cost.delivery_ms, cost.ack_ms, strict=True))
        return cls(
            relay_us=cost.cpu_us,
            nats_us=cost.beside_us,
            relay_net_us=cost.cpu_us - relay_idle * cost.seconds / len(acks) * 1e6,
            nats_net_us=cost.beside_us - nats_idle * cost.seconds / len(acks) * 1e6,
            ack_p50_ms=percentile(acks, 0.5),
            ack_p99_ms=percentile(acks, 0.99),
            ack_to_delivery_p50_ms=percentile(beyond, 0.5),
            delivery_p50_ms=percentile(deliveries, 0.5),
            delivery_p99_ms=percentile(deliveries, 0.99),
        )


@dataclass
class SetupResult:
    setup: str
    nats_servers: int
    relay_nodes: int
    rooms: int
    connections: int
    node_base_mib: float  # mean over the nodes
    node_per_room_kib: float  # one node's memory per room it has loaded (mean over nodes)
    node_per_connection_kib: float  # one node's memory per connection it holds
    nats_base_mib: float  # summed over the servers
    nats_per_room_kib: float  # summed over the servers; a room has one consumer per node
    node_idle_us_per_room_s: float  # relay CPU per second per idle loaded room, nodes summed
    nats_idle_us_per_room_s: float  # NATS CPU per second per idle loaded room, servers summed
    consumers: int  # the stream's consumers with everything loaded (/jsz)
    open_seconds: float
    write_one_room: Write
    write_all_loaded: Write
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])


def total_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def consumers_of(nats: NatsCluster | None) -> int:
    """JetStream's consumers, summed over the servers (/jsz): an ordered consumer is R1 and
    lives on one server, even on an R3 stream. Each node's feed watcher counts too."""
    if nats is None:
        return 0
    return sum(int(node.monitor("/jsz")[1].get("consumers", 0)) for node in nats.nodes)


def settle_all(pids: Sequence[int], seconds: float = 3.0) -> list[int]:
    """Every process's RSS once none moves for a moment (connections.settle, for several at
    once: settling them one after another cost up to 30 s each under load)."""
    last = [rss_kib(pid) for pid in pids]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = [rss_kib(pid) for pid in pids]
        if all(abs(a - b) < 256 for a, b in zip(now, last, strict=True)):
            return now
        last = now
    return last


def idle_rate(pids: Sequence[int]) -> float:
    """CPU seconds per second of `pids` over IDLE_WINDOW, nothing being written."""
    before, started = total_cpu(pids), time.monotonic()
    time.sleep(IDLE_WINDOW)  # a measurement window: nothing to wait for
    return (total_cpu(pids) - before) / (time.monotonic() - started)


def measure_setup(
    name: str,
    bases: list[str],
    node_pids: list[int],
    nats: NatsCluster | None,
    args: argparse.Namespace,
) -> SetupResult:
    nats_pids = [n.proc.pid for n in nats.nodes if n.proc is not None] if nats else []
    rooms = args.rooms

    def write(room: str, relay_idle: float, nats_idle: float) -> Write:
        cost = asyncio.run(
            write_cost(
                bases[0],
                bases[-1],
                "relay",
                room,
                args.writes,
                lambda: total_cpu(node_pids),
                lambda: total_cpu(nats_pids),
            )
        )
        return Write.of(cost, relay_idle, nats_idle)

    print(f"{name}: warming up", flush=True)
    for base in bases:
        with generators("relay", base, "seed", 1, 1, 1):
            pass
    node_idle_base, nats_idle_base = idle_rate(node_pids), idle_rate(nats_pids)
    write_one = write("room-0", node_idle_base, nats_idle_base)
    settled = settle_all([*node_pids, *nats_pids])
    node_base, nats_base = settled[: len(node_pids)], settled[len(node_pids) :]
    print(f"{name}: loading {rooms} rooms on each of {len(bases)} node(s)", flush=True)
    for base in bases:
        with generators("relay", base, "seed", rooms, rooms, args.procs):
            pass
    settled = settle_all([*node_pids, *nats_pids])
    node_loaded, nats_loaded = settled[: len(node_pids)], settled[len(node_pids) :]
    # Idle CPU beyond the base's (one room), per further room.
    node_idle_loaded, nats_idle_loaded = idle_rate(node_pids), idle_rate(nats_pids)
    node_idle = (node_idle_loaded - node_idle_base) / (rooms - 1) * 1e6
    nats_idle = (nats_idle_loaded - nats_idle_base) / (rooms - 1) * 1e6
    consumers = consumers_of(nats)
    print(f"{name}: opening {args.connections} idle connections", flush=True)
    started = time.monotonic()
    with generators("relay", ",".join(bases), "idle", args.connections, rooms, args.procs):
        opened = time.monotonic() - started
        node_connected = settle_all(node_pids)
        print(f"{name}: writing with everything loaded", flush=True)
        write_all = write("room-1", node_idle_loaded, nats_idle_loaded)
    per_node_connections = args.connections / len(bases)
    return SetupResult(
        setup=name,
        nats_servers=len(nats_pids),
        relay_nodes=len(bases),
        rooms=rooms,
        connections=args.connections,
        node_base_mib=statistics.mean(node_base) / 1024,
        # room-0 was loaded for the base
        node_per_room_kib=statistics.mean(
            (loaded - base) / (rooms - 1)
            for loaded, base in zip(node_loaded, node_base, strict=True)
        ),
        node_per_connection_kib=statistics.mean(
            (connected - loaded) / per_node_connections
            for connected, loaded in zip(node_connected, node_loaded, strict=True)
        ),
        nats_base_mib=sum(nats_base) / 1024,
        nats_per_room_kib=(sum(nats_loaded) - sum(nats_base)) / (rooms - 1),
        node_idle_us_per_room_s=node_idle,
        nats_idle_us_per_room_s=nats_idle,
        consumers=consumers,
        open_seconds=opened,
        write_one_room=write_one,
        write_all_loaded=write_all,
    )


def run_setup(servers: int, nodes: int, directory: Path, args: argparse.Namespace) -> SetupResult:
    relay_args = ["--idle-unload", "1000000", "--max-rooms", str(args.rooms + 10)]
    if servers == 0:
        with running_relay(directory / "single" / "data", relay_args) as relay:
            return measure_setup("our single relay", [relay.url], [relay.pid], None, args)
    name = f"{servers} NATS, {nodes} node{'s' if nodes > 1 else ''}"
    with ExitStack() as stack:
        nats = stack.enter_context(nats_cluster(directory / "nats", size=servers))
        relays = cluster_nodes(stack, directory, nats, nodes, relay_args, "connections")
        pids = [relay.proc.pid for relay in relays if relay.proc is not None]
        try:
            return measure_setup(name, [relay.ws_base for relay in relays], pids, nats, args)
        except Exception:
            for relay in relays:  # why a node let the load generator down
                print(f"--- {relay.log_path}", "\n".join(tail(relay.log_path)), sep="\n")
            raise


def tail(path: Path, lines: int = 40) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


# -- one stream's consumers ---------------------------------------------------------------------


@dataclass
class ConsumerStep:
    nats_servers: int
    consumers: int
    nats_rss_mib: float  # summed over the servers
    kib_per_consumer: float  # over the whole run so far
    create_ms: float  # per consumer, in this step
    nats_idle_cpu_pct: float  # of one core, servers summed, nothing written
    follower_idle_cpu_pct: float  # the following process (a relay node's NATS side)
    error: str = ""


async def consumer_capacity(nats: NatsCluster, target: int, step: int) -> list[ConsumerStep]:
    """Follow rooms from one connection, `step` at a time, until `target` or a refusal."""
    pids = [n.proc.pid for n in nats.nodes if n.proc is not None]
    conn = await connect(nats.urls, names=Names(f"consumers{len(pids)}"))
    log = RoomLog(conn)
    followers: list[Follower] = []
    base = sum(rss_kib(pid) for pid in pids)
    steps: list[ConsumerStep] = []
    phase_started = time.perf_counter()
    try:
        while len(followers) < target:
            error = ""
            started = time.perf_counter()
            created = 0
            try:
                for _ in range(step):
                    if time.perf_counter() - phase_started > CONSUMER_PHASE_LIMIT:
                        error = f"stopped: {CONSUMER_PHASE_LIMIT:.0f} s spent creating consumers"
                        break
                    follower = log.follow(f"room-{len(followers)}")
                    await follower.start()
                    followers.append(follower)
                    created += 1
            except Exception as exc:  # what breaks is the finding: report it
                error = f"{type(exc).__name__}: {exc}"
            create_ms = (time.perf_counter() - started) / max(created, 1) * 1e3
            nats_before, own_before = total_cpu(pids), time.process_time()
            window_started = time.perf_counter()
            await asyncio.sleep(5.0)  # a measurement window: the consumers' heartbeats flow
            window = time.perf_counter() - window_started
            rss = sum(rss_kib(pid) for pid in pids)
            steps.append(
                ConsumerStep(
                    nats_servers=len(pids),
                    consumers=len(followers),
                    nats_rss_mib=rss / 1024,
                    kib_per_consumer=(rss - base) / max(len(followers), 1),
                    create_ms=create_ms,
                    nats_idle_cpu_pct=(total_cpu(pids) - nats_before) / window * 100,
                    follower_idle_cpu_pct=(time.process_time() - own_before) / window * 100,
                    error=error,
                )
            )
            print(steps[-1], flush=True)
            if error:
                break
        slow = sum(
            line.count("Slow Consumer")
            for node in nats.nodes
            for line in tail(node.log_path, 10**6)
        )
        if slow and steps:
            steps[-1].error += f"; the servers logged {slow} slow-consumer disconnects"
            print(steps[-1].error, flush=True)
    finally:
        for follower in followers:
            await follower.close()
        try:
            await conn.close()
        except NatsError:  # closing while reconnecting, after the connection was lost
            await conn.nc.close()
    return steps


# -- report -------------------------------------------------------------------------------------


def report(results: list[SetupResult], steps: list[ConsumerStep], load: float) -> str:
    lines = [
        f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores",
    ]
    if results:
        lines += setup_tables(results)
    if steps:
        lines += consumer_table(steps)
    return "\n".join(lines)


def setup_tables(results: list[SetupResult]) -> list[str]:
    anchor = results[0]  # the first setup: our single relay unless --setups says otherwise
    lines = [
        "",
        "| setup | load | node base MiB | per room KiB (each node) | per connection KiB "
        "(each node) | NATS base MiB | NATS per room KiB | idle room: relay µs/s | "
        "idle room: NATS µs/s | consumers | opening s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {r.load_average:.1f} | {r.node_base_mib:.1f} | "
            f"{r.node_per_room_kib:.1f} | {r.node_per_connection_kib:.1f} | "
            f"{r.nats_base_mib:.1f} | {r.nats_per_room_kib:.1f} | "
            f"{r.node_idle_us_per_room_s:.1f} | {r.nats_idle_us_per_room_s:.1f} | "
            f"{r.consumers} | {r.open_seconds:.1f} |"
        )
    lines += [
        "",
        "| setup | rooms loaded | relay CPU µs/write (less idle) | NATS µs/write (less idle) "
        "| send→Ack p50 / p99 ms | Ack→observer p50 ms | send→observer p50 / p99 ms "
        "| p50 vs anchor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for loaded, w, a in (
            (1, r.write_one_room, anchor.write_one_room),
            (r.rooms, r.write_all_loaded, anchor.write_all_loaded),
        ):
            lines.append(
                f"| {r.setup} | {loaded} | {w.relay_us:.0f} ({w.relay_net_us:.0f}) | "
                f"{w.nats_us:.0f} ({w.nats_net_us:.0f}) | "
                f"{w.ack_p50_ms:.2f} / {w.ack_p99_ms:.2f} | {w.ack_to_delivery_p50_ms:.2f} | "
                f"{w.delivery_p50_ms:.2f} / {w.delivery_p99_ms:.2f} | "
                f"{w.delivery_p50_ms / a.delivery_p50_ms:.2f}x |"
            )
    return lines


def consumer_table(steps: list[ConsumerStep]) -> list[str]:
    lines = [
        "",
        "| NATS servers | consumers | NATS RSS MiB | KiB per consumer | ms to create one "
        "| NATS idle CPU % | follower idle CPU % | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s.nats_servers} | {s.consumers} | {s.nats_rss_mib:.0f} | "
            f"{s.kib_per_consumer:.1f} | {s.create_ms:.2f} | {s.nats_idle_cpu_pct:.1f} | "
            f"{s.follower_idle_cpu_pct:.1f} | {s.error or '-'} |"
        )
    return lines


def run_cluster(args: argparse.Namespace) -> int:
    """`connections.py --nats`: every setup, then the consumer capacity; prints the tables."""
    load = os.getloadavg()[0]
    print(f"load average {os.getloadavg()}; {os.cpu_count()} cores", flush=True)
    results: list[SetupResult] = []
    steps: list[ConsumerStep] = []
    with tempfile.TemporaryDirectory(prefix="crdtchat-connections-cluster-") as tmp:
        setups = [tuple(int(n) for n in pair.split(":")) for pair in args.setups.split(",") if pair]
        for index, (servers, nodes) in enumerate(setups):
            results.append(run_setup(servers, nodes, Path(tmp) / f"setup{index}", args))
            print(results[-1], flush=True)
        for servers in (1, 3) if args.consumers else ():
            with nats_cluster(Path(tmp) / f"consumers{servers}", size=servers) as nats:
                steps += asyncio.run(consumer_capacity(nats, args.consumers, args.consumers_step))
    text = report(results, steps, load)
    print()
    print(text)
    if args.json is not None:
        data = {"setups": [asdict(r) for r in results], "consumers": [asdict(s) for s in steps]}
        args.json.write_text(json.dumps(data, indent=1))
    return 0
