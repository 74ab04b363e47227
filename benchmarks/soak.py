"""The long soak (issue 12): a relay under mixed joins, writes, refusals and room unloads.

Not a CI test: the suite's soak tests (tests/relay/test_leaks.py) check the known leaks exactly in
under a minute; this one runs the whole relay for as long as it is asked to and prints, once a
minute, its resident memory, CPU and what it did, so that slow growth shows as a curve.

    .venv/bin/python benchmarks/soak.py --minutes 60 --out soak.md

The load, from one asyncio process over real websockets: `--rate` visits a second, at most
`--concurrency` at once, each to one of `--rooms` rooms drawn uniformly, so that with
`--idle-unload` seconds (default 5) most visits load a room and most rooms unload between
visits. A visit joins with the Ack extension and syncs, then with probability 0.55 appends a
user message (stored), 0.25 also tries an assistant message, which a writer may not write
(refused, so the relay rebuilds the room's document), 0.2 only reads; it announces presence
and leaves. `--idle` connections stay open all along, moved to another room every minute. The
anchor of the curve is its own first minute: growth is reported against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import (
    SECRET,
    SessionClient,
    cpu_seconds,
    parse_metrics,
    rss_kib,
    running_relay,
    session_client,
)
from crdtchat.document import Conversation
from crdtchat.tokens import mint_token
from crdtchat.wire import (
    AwarenessEntry,
    AwarenessMessage,
    encode_awareness,
)


@dataclass
class Counts:
    visits: int = 0
    writes: int = 0
    refusals: int = 0
    reads: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: list[float] = field(default_factory=list)


def url_for(base: str, room: str, role: str, sub: str) -> str:
    token = mint_token(SECRET, room, role, sub, 24 * 3600)
    return f"{base}/{room}?token={token}&ext=ack"


async def visit(base: str, room: str, rng: random.Random, counts: Counts) -> None:
    """One visit through the client core (`SessionClient` over `SyncSession`)."""
    sub = f"user{rng.randrange(50)}"
    kind = rng.random()
    role = "reader" if kind >= 0.8 else "writer"
    started = time.perf_counter()
    with Conversation(author=sub) as conversation:
        async with session_client(url_for(base, room, role, sub), conversation.doc) as client:
            presence = AwarenessEntry(rng.getrandbits(31), 1, json.dumps({"user": sub}))
            await client.send(AwarenessMessage(encode_awareness([presence])))
            if role == "writer":
                conversation.append("user", f"soak line {rng.getrandbits(32):x}")
                await _settled(client)
                if client.denied:
                    raise RuntimeError(f"an ordinary write was refused: {client.denied}")
                if kind >= 0.55:  # a write the relay must refuse: writers do not answer
                    conversation.append("assistant", "not yours to write")
                    await _settled(client)
                    if not client.denied:
                        raise RuntimeError("a forged assistant message was accepted")
                    counts.refusals += 1
                counts.writes += 1
            else:
                counts.reads += 1
    counts.visits += 1
    counts.latencies.append(time.perf_counter() - started)


async def _settled(client: SessionClient) -> None:
    """Send the local change and wait until the relay stored it (Ack) or refused it."""
    refused = len(client.denied)
    await client.flush()
    await client.wait_for(
        lambda: len(client.denied) > refused or client.acked >= client.sent_updates
    )


class Phases:
    """Whether the load runs: it stops for a drained reading, and for good at the end."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.paused = asyncio.Event()
        self.running = asyncio.Event()
        self.running.set()

    def pause(self) -> None:
        self.running.clear()
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()
        self.running.set()


async def first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of `events` is set, or after `timeout` seconds."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def idle_connections(base: str, count: int, rooms: int, phases: Phases) -> None:
    """`count` connections that only hold on, moved to other rooms each minute; closed while
    the load is paused."""
    rng = random.Random(2)
    while not phases.stop.is_set():
        await first_of(phases.running, phases.stop)
        if phases.stop.is_set():
            return
        sockets = []
        for index in range(count):
            room = f"soak-{rng.randrange(rooms)}"
            ws = await connect(url_for(base, room, "reader", f"idle{index}"), compression=None)
            sockets.append(ws)
        await first_of(phases.stop, phases.paused, timeout=60)
        for ws in sockets:
            await ws.close()


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    response = await http.get("/metrics")
    return parse_metrics(response.text)


HEADER = (
    "| minute | relay RSS MiB | vs minute 1 | relay CPU % of a core | rooms loaded | "
    "room loads | unloads | stored | refused | visits | visit p50 ms | messages per room | "
    "RSS with nothing loaded MiB |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


async def drained_rss(
    http: httpx.AsyncClient, pid: int, phases: Phases, visits: set[asyncio.Task[None]]
) -> float:
    """Stop the load, let every room unload, and read the relay's RSS: what is left then is
    not the working set of loaded rooms (which grows as the rooms grow) but what the loads
    left behind. The load resumes afterwards."""
    phases.pause()
    await asyncio.gather(*visits, return_exceptions=True)
    async with asyncio.timeout(300):
        while (await metrics(http))["rooms"] > 0:
            await asyncio.sleep(0.5)  # the relay has no unload event; /metrics is polled
    rss = rss_kib(pid) / 1024
    phases.resume()
    return rss


async def soak(args: argparse.Namespace, data: Path, out: Path | None) -> int:
    # Fifty subjects create every room: lift the per-subject room quota of design §7.4,
    # which exists to stop exactly that (with --rooms in the hundreds of thousands, it would).
    extra = ["--idle-unload", str(args.idle_unload), "--quota-rooms", "1e9"]
    with running_relay(data, extra) as relay:
        base = relay.url
        http_base = base.replace("ws://", "http://")
        counts = Counts()
        rng = random.Random(args.seed)
        phases = Phases()
        limit = asyncio.Semaphore(args.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(room: str) -> None:
            async with limit:
                try:
                    await asyncio.wait_for(visit(base, room, rng, counts), 60)
                except Exception as error:  # counted and shown: the soak goes on
                    counts.errors += 1
                    counts.last_error = f"{type(error).__name__}: {error}"

        idle = asyncio.create_task(idle_connections(base, args.idle, args.rooms, phases))
        lines = [
            f"relay pid {relay.pid}; {args.rate} visits/s over {args.rooms} rooms, "
            f"{args.idle} idle connections, --idle-unload {args.idle_unload}",
            "",
            HEADER,
        ]
        print("\n".join(lines), flush=True)
        first_rss: float | None = None
        drained: list[tuple[float, float]] = []  # (RSS with nothing loaded, room loads then)
        started = time.monotonic()
        cpu_before = cpu_seconds(relay.pid)
        period = args.sample_seconds
        samples = round(args.minutes * 60 / period)
        next_sample = started + period
        async with httpx.AsyncClient(base_url=http_base, timeout=30) as http:
            minute = 0
            while minute < samples:
                now = time.monotonic()
                if now >= next_sample:
                    minute += 1
                    cpu_now = cpu_seconds(relay.pid)
                    cpu = 100 * (cpu_now - cpu_before) / (now - next_sample + period)
                    rss = rss_kib(relay.pid) / 1024
                    first_rss = rss if first_rss is None else first_rss
                    m = await metrics(http)
                    latencies = sorted(counts.latencies)
                    counts.latencies.clear()
                    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
                    drain = minute in (1, samples) or (
                        args.drain_every > 0 and minute % args.drain_every == 0
                    )
                    nothing_loaded = ""
                    if drain:
                        idle_rss = await drained_rss(http, relay.pid, phases, tasks)
                        drained.append((idle_rss, m["room_loads_total"]))
                        nothing_loaded = f"{idle_rss:.1f}"
                    row = (
                        f"| {minute} | {rss:.1f} | {rss - first_rss:+.1f} | {cpu:.1f} | "
                        f"{m['rooms']:.0f} | {m['room_loads_total']:.0f} | "
                        f"{m['room_unloads_total']:.0f} | {m['updates_stored_total']:.0f} | "
                        f"{m['refused_writes_total']:.0f} | {counts.visits} | {p50:.0f} | "
                        f"{m['updates_stored_total'] / args.rooms:.1f} | {nothing_loaded} |"
                    )
                    if counts.errors:
                        row += f" errors {counts.errors}: {counts.last_error[:80]}"
                    lines.append(row)
                    print(row, flush=True)
                    if out is not None:
                        out.write_text("\n".join(lines) + "\n")
                    # A drain paused the load: the next period starts now.
                    next_sample = time.monotonic() + period if drain else next_sample + period
                    cpu_before = cpu_seconds(relay.pid)
                    continue
                room = f"soak-{rng.randrange(args.rooms)}"
                task = asyncio.create_task(one(room))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(rng.expovariate(args.rate))  # Poisson arrivals
        phases.stop.set()
        await asyncio.gather(*tasks, idle, return_exceptions=True)
        if len(drained) >= 2:
            (rss_a, loads_a), (rss_b, loads_b) = drained[0], drained[-1]
            summary = (
                f"\nWith nothing loaded: {rss_a:.1f} MiB after minute 1, {rss_b:.1f} MiB after "
                f"minute {samples}: {rss_b - rss_a:+.1f} MiB over {loads_b - loads_a:.0f} room "
                f"loads, {(rss_b - rss_a) * 2**20 / max(1.0, loads_b - loads_a):+.0f} B per load."
            )
            lines.append(summary)
            print(summary, flush=True)
            if out is not None:
                out.write_text("\n".join(lines) + "\n")
    return 0 if counts.errors == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate", type=float, default=8.0, help="visits per second")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rooms", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=100, help="connections that only hold on")
    parser.add_argument("--idle-unload", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="one row per ...")
    parser.add_argument(
        "--drain-every",
        type=int,
        default=0,
        help="also pause the load every ... rows and read RSS with nothing loaded "
        "(always after the first row and the last)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crdtchat-soak-") as tmp:
        data = Path(tmp) / "data"
        return asyncio.run(soak(args, data, args.out))


if __name__ == "__main__":
    sys.exit(main())
