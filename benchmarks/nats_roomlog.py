"""What the cluster's room log costs on real NATS: the figures docs/cluster.md's plan rests on.

Side by side in one run, on loopback: a three-node JetStream cluster (stream R3) and a single
JetStream server (R1), both with `sync_interval: always` (every acknowledgement is an fsync):

- **sequential**: one room, one conditional append at a time (`RoomLog.append`): the
  publish-to-acknowledgement latency a client's Ack waits for, p50/p99;
- **concurrent**: `--rooms` rooms, each with its own writer appending conditionally, all at
  once: appends per second, latency p50/p99, and the NATS servers' CPU per append (summed over
  the servers, from /proc) beside this client's;
- **delivery**: an append through one connection to its arrival at a follower (ordered consumer)
  on another connection: what a peer on another relay node waits beyond the acknowledgement;
- **followers**: `--followers` rooms followed at once from one connection (a node with that
  many rooms loaded holds one ordered consumer each): the time to create one, the NATS servers'
  memory per follower, and the delivery latency when every room gets one append.

Updates are real Yjs updates of about `--size` bytes of typed text. Figures on a shared 2-core
machine are noisy: compare the two engines within one run, not across runs.

Run: .venv/bin/python benchmarks/nats_roomlog.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import cpu_seconds, percentile, rss_kib
from pycrdt import Doc, Text

from crdtchat.cluster.connection import ClusterConnection, connect
from crdtchat.cluster.errors import SequenceConflict
from crdtchat.cluster.local import NatsCluster, nats_cluster
from crdtchat.cluster.names import Names
from crdtchat.cluster.roomlog import RoomLog


class Typist:
    def __init__(self, client_id: int, size: int) -> None:
        self.doc: Doc = Doc(client_id=client_id)
        self.text = self.doc.get("t", type=Text)
        self.chunk = "x" * size
        self.seq = 0
        self.count = 0

    def next_update(self) -> bytes:
        before = self.doc.get_state()
        self.text += self.chunk
        self.count += 1
        return self.doc.get_update(before)


def ms(values: list[float], fraction: float) -> float:
    return percentile(sorted(values), fraction) * 1000


def nats_cpu(cluster: NatsCluster) -> float:
    return sum(cpu_seconds(node.proc.pid) for node in cluster.nodes if node.proc is not None)


async def append_once(log: RoomLog, room: str, typist: Typist) -> float:
    update = typist.next_update()
    started = time.perf_counter()
    while True:
        try:
            appended = await log.append(
                room, update, expected_seq=typist.seq, msg_id=f"{room}:{typist.count}"
            )
            break
        except SequenceConflict as conflict:  # not expected: one writer per room
            typist.seq = conflict.last_seq or await log.last_seq(room)
    typist.seq = appended.seq
    return time.perf_counter() - started


async def sequential(conn: ClusterConnection, count: int, size: int) -> list[float]:
    log = RoomLog(conn)
    typist = Typist(1, size)
    return [await append_once(log, "sequential", typist) for _ in range(count)]


async def concurrent(
    conn: ClusterConnection, cluster: NatsCluster, rooms: int, each: int, size: int
) -> dict[str, float]:
    log = RoomLog(conn)
    typists = [Typist(100 + index, size) for index in range(rooms)]
    latencies: list[float] = []

    async def writer(index: int) -> None:
        for _ in range(each):
            latencies.append(await append_once(log, f"room-{index}", typists[index]))

    nats_before, client_before = nats_cpu(cluster), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(writer(index) for index in range(rooms)))
    elapsed = time.perf_counter() - started
    total = rooms * each
    return {
        "appends_per_s": total / elapsed,
        "p50_ms": ms(latencies, 0.5),
        "p99_ms": ms(latencies, 0.99),
        "nats_cpu_us_per_append": (nats_cpu(cluster) - nats_before) / total * 1e6,
        "client_cpu_us_per_append": (time.process_time() - client_before) / total * 1e6,
    }


async def delivery(
    conn: ClusterConnection, other: ClusterConnection, count: int, size: int
) -> list[float]:
    log = RoomLog(conn)
    typist = Typist(7, size)
    latencies = []
    async with RoomLog(other).follow("delivery") as follower:
        for _ in range(count):
            started = time.perf_counter()
            await append_once(log, "delivery", typist)
            while (await follower.next(10)).seq < typist.seq:
                pass
            latencies.append(time.perf_counter() - started)
    return latencies


def nats_rss_kib(cluster: NatsCluster) -> int:
    return sum(rss_kib(node.proc.pid) for node in cluster.nodes if node.proc is not None)


async def followers(
    conn: ClusterConnection, other: ClusterConnection, cluster: NatsCluster, count: int
) -> dict[str, float]:
    """`count` rooms, one follower each on `other`; then one append to every room."""
    log = RoomLog(conn)
    typists = [Typist(5000 + index, 10) for index in range(count)]
    for index, typist in enumerate(typists):
        await append_once(log, f"followed-{index}", typist)
    rss_before = nats_rss_kib(cluster)
    started = time.perf_counter()
    follows = []
    for index in range(count):
        follower = RoomLog(other).follow(f"followed-{index}")
        await follower.start()
        await follower.next(30)  # the room's first message: the consumer is live
        follows.append(follower)
    create_s = (time.perf_counter() - started) / count
    rss_after = nats_rss_kib(cluster)
    sent: dict[int, float] = {}
    latencies: list[float] = []

    async def receive(index: int) -> None:
        await follows[index].next(60)
        latencies.append(time.perf_counter() - sent[index])

    receivers = [asyncio.create_task(receive(index)) for index in range(count)]
    for index, typist in enumerate(typists):
        sent[index] = time.perf_counter()
        await append_once(log, f"followed-{index}", typist)
    await asyncio.gather(*receivers)
    for follower in follows:
        await follower.close()
    return {
        "create_ms": create_s * 1000,
        "kib_per_follower": (rss_after - rss_before) / count,
        "p50_ms": ms(latencies, 0.5),
        "p99_ms": ms(latencies, 0.99),
    }


async def measure(cluster: NatsCluster, args: argparse.Namespace, label: str) -> dict[str, str]:
    names = Names(f"bench{int(time.time() * 1000) % 10**9}")
    conn = await connect(cluster.urls, names=names)
    other = await connect(list(reversed(cluster.urls)), names=names)
    try:
        seq = await sequential(conn, args.count, args.size)
        conc = await concurrent(conn, cluster, args.rooms, args.each, args.size)
        deliv = await delivery(conn, other, args.count, args.size)
        follow = await followers(conn, other, cluster, args.followers)
        return {
            "engine": label,
            "replicas": str(conn.replicas),
            "append p50/p99 ms": f"{ms(seq, 0.5):.2f} / {ms(seq, 0.99):.2f}",
            "append+delivery p50/p99 ms": f"{ms(deliv, 0.5):.2f} / {ms(deliv, 0.99):.2f}",
            f"{args.rooms} rooms: appends/s": f"{conc['appends_per_s']:.0f}",
            f"{args.rooms} rooms: p50/p99 ms": f"{conc['p50_ms']:.1f} / {conc['p99_ms']:.1f}",
            "NATS CPU us/append (all servers)": f"{conc['nats_cpu_us_per_append']:.0f}",
            "client CPU us/append": f"{conc['client_cpu_us_per_append']:.0f}",
            f"{args.followers} followers: ms to create one": f"{follow['create_ms']:.2f}",
            f"{args.followers} followers: NATS KiB each": f"{follow['kib_per_follower']:.1f}",
            f"{args.followers} followers: delivery p50/p99 ms": (
                f"{follow['p50_ms']:.1f} / {follow['p99_ms']:.1f}"
            ),
        }
    finally:
        await conn.close()
        await other.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer appends, for a smoke run")
    parser.add_argument("--count", type=int, default=300, help="sequential appends")
    parser.add_argument("--rooms", type=int, default=50, help="rooms written at once")
    parser.add_argument("--each", type=int, default=40, help="appends per room, concurrent")
    parser.add_argument("--size", type=int, default=40, help="characters typed per update")
    parser.add_argument("--followers", type=int, default=1000, help="rooms followed at once")
    args = parser.parse_args()
    if args.quick:
        args.count, args.rooms, args.each, args.followers = 50, 10, 10, 50
    rows = []
    with (
        tempfile.TemporaryDirectory() as directory,
        nats_cluster(Path(directory) / "three", size=3) as three,
        nats_cluster(Path(directory) / "one", size=1) as one,
    ):
        # Alternate, so that a burst of load from other processes hits both.
        rows.append(await measure(three, args, "3 servers, R3"))
        rows.append(await measure(one, args, "1 server, R1"))
        rows.append(await measure(three, args, "3 servers, R3 (again)"))
        rows.append(await measure(one, args, "1 server, R1 (again)"))
    width = max(len(key) for key in rows[0])
    for key in rows[0]:
        print(f"{key:<{width}}  " + "  ".join(f"{row[key]:>22}" for row in rows))


if __name__ == "__main__":
    asyncio.run(main())
