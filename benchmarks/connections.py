"""Many rooms and idle connections on one server: memory per room and per connection, and
what a write costs when thousands of rooms are loaded (issues 12 and 16).

Our relay and the node y-websocket server (benchmarks/node) are measured one after the other
with the same load generator (the file-descriptor limit of 20,000 would not hold both at
10,000 connections), the relay first, then node, in one run:

1. the server alone, one room warmed up: resident memory (VmRSS) is the base;
2. a write's cost with that one room: a writer sends `--writes` user messages one at a time,
   each waiting until an observer in the room has it; server CPU per write;
3. `--rooms` rooms, each loaded by one connection that writes a message and leaves (the relay
   keeps them: --idle-unload is set beyond the run; node never unloads without persistence):
   memory per loaded room;
4. `--connections` idle connections over those rooms (synced, then silent), opened by
   `--procs` generator processes: memory per connection;
5. the write's cost again, now with every room loaded and every connection open.

    .venv/bin/python benchmarks/connections.py                       # small: checks the script
    .venv/bin/python benchmarks/connections.py --connections 2000 --rooms 200
    .venv/bin/python benchmarks/connections.py --connections 10000 --rooms 2000 --procs 4

`--nats` measures relay nodes on a NATS cluster the same way, our single relay first as the
anchor (benchmarks/_connections_cluster.py says what and how):

    .venv/bin/python benchmarks/connections.py --nats --consumers 200   # small: checks it
    .venv/bin/python benchmarks/connections.py --nats --connections 10000 --rooms 2000 \
        --procs 4 --consumers 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import (
    SECRET,
    LightClient,
    Server,
    now_ns,
    open_light_client,
    rss_kib,
    running_node_server,
    running_relay,
    session_client,
)
from crdtchat.document import Conversation
from crdtchat.tokens import mint_token
from crdtchat.wire import (
    SyncStep1,
    SyncUpdate,
    encode_message,
)

STEP1_EMPTY = encode_message(SyncStep1(b"\x00"))
MARKER = b"conn#"


def room_url(base: str, kind: str, room: str, role: str, sub: str = "bench") -> str:
    """The same room on either server: the relay wants a token, node ignores the query.

    Each generated connection has a subject of its own: the relay's per-subject limits
    (design §7.4) are not what this measures.
    """
    if kind == "node":
        return f"{base}/{room}"
    return f"{base}/{room}?token={mint_token(SECRET, room, role, sub, 24 * 3600)}"


def message_update(text: str, author: str) -> bytes:
    """One user message appended to an empty conversation (valid for the relay's rules)."""
    with Conversation(author=author) as conversation:
        conversation.append("user", text)
        return conversation.encode_state()


# -- generator processes -------------------------------------------------------------------


async def generate(kind: str, base: str, mode: str, first: int, count: int, rooms: int) -> None:
    """Child process. mode "seed": rooms first..first+count-1 each get a message, then the
    connection leaves. mode "idle": connections first..first+count-1 join room i % rooms,
    sync and stay; prints "ready" once all are synced and holds them until stdin closes.

    These are load, not clients (thousands per process; the measured side is the server), so
    no SyncSession: each sends constant pre-encoded frames (a prepared message, a step 1 of
    an empty document) and waits for the server's step 2; it answers and applies nothing.

    `base` may list several servers, comma-separated (relay nodes of one cluster): connection
    i goes to server (i // rooms) % servers, so every room has connections on every server."""
    loop = asyncio.get_running_loop()
    bases = base.split(",")
    synced: dict[LightClient, asyncio.Future[None]] = {}

    def on_frame(client: LightClient, data: bytes, arrived: int) -> None:
        if data[:2] == b"\x00\x01":  # the server's step 2: synced (its step 1 needs no answer)
            future = synced.get(client)
            if future is not None and not future.done():
                future.set_result(None)

    limiter = asyncio.Semaphore(64)
    opened: list[LightClient] = []
    resets = 0

    async def open_with_retries(
        url: str, on_frame: Callable[[LightClient, bytes, int], None]
    ) -> LightClient:
        """At load 10+ on 2 cores a server now and then resets a handshake among thousands
        (seen on our single relay and on relay nodes alike): open it again, and say so."""
        nonlocal resets
        for attempt in range(5):
            try:
                return await open_light_client(url, on_frame, 120)
            except ConnectionResetError:
                if attempt == 4:
                    raise
                resets += 1
        raise AssertionError("unreachable")

    async def one(index: int) -> None:
        async with limiter:
            room = f"room-{index % rooms}"
            role = "writer" if mode == "seed" else "reader"
            sub = f"bench-{index}"
            url = room_url(bases[(index // rooms) % len(bases)], kind, room, role, sub)
            client = await open_with_retries(url, on_frame)
            future = synced[client] = loop.create_future()
            if mode == "seed":
                client.send(encode_message(SyncUpdate(message_update(f"hello {room}", sub))))
            client.send(STEP1_EMPTY)  # answered after the update is applied (and stored)
            await asyncio.wait_for(future, 120)
            if mode == "seed":
                client.close()
                await client.lost
            else:
                opened.append(client)

    await asyncio.gather(*(one(index) for index in range(first, first + count)))
    if resets:
        print(f"generator {mode} {first}: {resets} handshakes reset, retried", file=sys.stderr)
    print("ready", flush=True)
    if mode == "idle":
        await loop.run_in_executor(None, sys.stdin.readline)
        for client in opened:
            client.close()


@contextmanager
def generators(
    kind: str, base: str, mode: str, total: int, rooms: int, procs: int
) -> Iterator[list[subprocess.Popen[str]]]:
    """Split `total` connections over `procs` child processes; returns once all are ready."""
    share, rest = divmod(total, procs)
    children: list[subprocess.Popen[str]] = []
    first = 0
    try:
        for index in range(procs):
            count = share + (index < rest)
            if count == 0:
                continue
            command = [sys.executable, __file__, "--generate", kind, base, mode]
            command += [str(first), str(count), str(rooms)]
            children.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            first += count
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a generator failed (exit {child.wait(30)})")
        yield children
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# -- writes ----------------------------------------------------------------------------------


@dataclass
class WriteCost:
    """One writer's sequential writes, each waiting until an observer has it."""

    cpu_us: float  # the measured server processes' CPU per write (relay nodes summed)
    beside_us: float  # the processes measured beside them (NATS servers), CPU per write
    seconds: float  # how long the timed writes took (idle CPU over it is in the figures)
    ack_ms: list[float]  # send -> the relay's Ack (ext=ack: stored); empty for node
    delivery_ms: list[float]  # send -> the observer has it


async def write_cost(
    writer_base: str,
    observer_base: str,
    kind: str,
    room: str,
    writes: int,
    cpu: Callable[[], float],
    beside_cpu: Callable[[], float] = lambda: 0.0,
) -> WriteCost:
    """Server CPU per write and its latencies: each write waits until an observer in the room
    (on `observer_base`: another relay node, in a cluster) has it. Our relay's writer asks for
    `ext=ack`, so the time to the durable point (send -> Ack) is split from the rest."""
    loop = asyncio.get_running_loop()
    seen: dict[int, asyncio.Future[None]] = {}

    def on_observer(client: LightClient, data: bytes, arrived: int) -> None:
        """A silent observer: it only looks for the writer's marker in the frames."""
        start = data.find(MARKER)
        if start >= 0:
            start += len(MARKER)
            seq = int(data[start : data.index(b"#", start)])
            future = seen.get(seq)
            if future is not None and not future.done():
                future.set_result(None)

    observer = await open_light_client(room_url(observer_base, kind, room, "reader"), on_observer)
    writer_url = room_url(writer_base, kind, room, "writer")
    if kind == "relay":
        writer_url += "&ext=ack"
    conversation = Conversation(author="bench")
    try:
        async with session_client(writer_url, conversation.doc) as writer:
            for warm in (True, False):
                count = max(1, writes // 10) if warm else writes
                ack_ms: list[float] = []
                delivery_ms: list[float] = []
                cpu_before, beside_before = cpu(), beside_cpu()
                timed_from = time.perf_counter()
                for index in range(count):
                    seq = index + (0 if warm else writes)
                    seen[seq] = loop.create_future()
                    conversation.append("user", f"{MARKER.decode()}{seq}# a short chat line")
                    started = now_ns()
                    await writer.flush()
                    await asyncio.wait_for(seen[seq], 60)
                    delivery_ms.append((now_ns() - started) / 1e6)
                    if kind == "relay":  # the Ack may come after the delivery
                        target = writer.sent_updates
                        await writer.wait_for(lambda target=target: writer.acked >= target, 60)
                        ack_ms.append((writer.ack_arrived_ns - started) / 1e6)
                used, beside = cpu() - cpu_before, beside_cpu() - beside_before
                seconds = time.perf_counter() - timed_from
            return WriteCost(
                used / writes * 1e6, beside / writes * 1e6, seconds, ack_ms, delivery_ms
            )
    finally:
        conversation.close()
        observer.close()


# -- one server --------------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    base_mib: float
    rooms: int
    connections: int
    per_room_kib: float
    per_connection_kib: float
    write_one_room_us: float
    write_all_loaded_us: float
    open_seconds: float


def settle(pid: int, seconds: float = 3.0) -> int:
    """RSS once it has stopped moving for a moment (allocations trail the last reply)."""
    last = rss_kib(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = rss_kib(pid)
        if abs(now - last) < 256:
            return now
        last = now
    return last


def measure(server: Server, kind: str, args: argparse.Namespace) -> Result:
    print(f"{server.name}: warming up", flush=True)
    with generators(kind, server.url, "seed", 1, 1, 1):
        pass
    write_one = asyncio.run(
        write_cost(server.url, server.url, kind, "room-0", args.writes, server.cpu)
    ).cpu_us
    base = settle(server.pid)
    print(f"{server.name}: loading {args.rooms} rooms", flush=True)
    with generators(kind, server.url, "seed", args.rooms, args.rooms, args.procs):
        pass
    loaded = settle(server.pid)
    print(f"{server.name}: opening {args.connections} idle connections", flush=True)
    started = time.monotonic()
    with generators(kind, server.url, "idle", args.connections, args.rooms, args.procs):
        opened = time.monotonic() - started
        connected = settle(server.pid)
        print(f"{server.name}: writing with everything loaded", flush=True)
        write_all = asyncio.run(
            write_cost(server.url, server.url, kind, "room-1", args.writes, server.cpu)
        ).cpu_us
    return Result(
        server=server.name,
        base_mib=base / 1024,
        rooms=args.rooms,
        connections=args.connections,
        per_room_kib=(loaded - base) / (args.rooms - 1),  # room-0 was loaded for the base
        per_connection_kib=(connected - loaded) / args.connections,
        write_one_room_us=write_one,
        write_all_loaded_us=write_all,
        open_seconds=opened,
    )


def report(results: list[Result], load: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    relay, node = results
    lines = [
        f"load average before {load[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} cores",
        "",
        "| server | base MiB | rooms | per loaded room KiB | connections | per connection KiB "
        "| write µs CPU, 1 room | write µs CPU, all loaded | opening s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.base_mib:.1f} | {r.rooms} | {r.per_room_kib:.1f} | "
            f"{r.connections} | {r.per_connection_kib:.1f} | {r.write_one_room_us:.0f} | "
            f"{r.write_all_loaded_us:.0f} | {r.open_seconds:.1f} |"
        )
    lines += [
        "",
        f"relay / node: per connection {relay.per_connection_kib / node.per_connection_kib:.2f}x, "
        f"per loaded room {relay.per_room_kib / node.per_room_kib:.2f}x, write with all loaded "
        f"{relay.write_all_loaded_us / node.write_all_loaded_us:.2f}x; relay write, all loaded "
        f"vs one room: {relay.write_all_loaded_us / relay.write_one_room_us:.2f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--nats", action="store_true", help="relay nodes on NATS beside our single relay"
    )
    parser.add_argument(
        "--setups",
        default="0:1,1:1,1:2,3:2",
        help="with --nats: NATS servers:relay nodes, comma-separated; 0 is our single relay",
    )
    parser.add_argument(
        "--consumers", type=int, default=0, help="with --nats: then follow this many rooms"
    )
    parser.add_argument("--consumers-step", type=int, default=5000)
    parser.add_argument("--generate", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        kind, base, mode, first, count, rooms = args.generate
        asyncio.run(generate(kind, base, mode, int(first), int(count), int(rooms)))
        return 0
    if args.nats:
        from benchmarks._connections_cluster import run_cluster  # imports this module

        return run_cluster(args)
    load = os.getloadavg()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="crdtchat-connections-") as tmp:
        relay_args = ["--idle-unload", "1000000", "--max-rooms", str(args.rooms + 10)]
        with running_relay(Path(tmp) / "data", relay_args) as relay:
            results.append(measure(relay, "relay", args))
        with running_node_server(Path(tmp)) as node:
            results.append(measure(node, "node", args))
    text = report(results, load, os.getloadavg())
    print()
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
