"""Refused writes as a CPU weapon (issue 10, finding 5): the relay under a flood of refusals.

A room holds `--messages` messages. Phase "quiet": a writer in another room appends a short
message every 100 ms and times each acknowledgement, while the relay's CPU time is read from
/proc. Phase "flood": the same, while `--readers` reader connections of the big room each send
one refused write (a message append) per second. Each reader has a subject of its own, so the
per-subject refusal budget (design §7.4) does not close them: what is measured is what each
refusal costs. The anchor is the quiet phase of the same relay in the same run; with
`--old-src`, an earlier relay (e.g. `git worktree add /tmp/old 69f173e`) runs first, side by
side, on the same machine.

Run: .venv/bin/python benchmarks/relay_refusal_flood.py [--old-src DIR] [--messages 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import ClientConnection, connect

from benchmarks._support import (
    SECRET,
    Server,
    SessionClient,
    cpu_seconds,
    running_relay,
    session_client,
)
from crdtchat import schema
from crdtchat.tokens import mint_token
from crdtchat.wire import SyncUpdate, encode_message

BIG = "big"
OTHER = "other"


def token(room: str, role: str, sub: str) -> str:
    return mint_token(SECRET, room, role, sub, 3600)


def message(msg_id: str, author: str, text: str) -> Map:
    return Map(
        {
            "id": msg_id,
            "role": "user",
            "author": author,
            "parent": None,
            "created_at": 1.0,
            "content": Text(text),
        }
    )


def new_doc() -> tuple[Doc, Array]:
    doc: Doc = Doc()
    for name in schema.ALL_ROOTS:
        doc.get(name, type=Array if name == schema.MESSAGES else Map)
    return doc, doc.get(schema.MESSAGES, type=Array)


def big_room(count: int) -> bytes:
    doc, messages = new_doc()
    with doc.transaction():
        for index in range(count):
            messages.append(message(f"m{index}", "alice", "lorem ipsum dolor sit amet " * 8))
    return doc.get_update()


def refused_write(state: bytes, sub: str) -> bytes:
    """A reader's message append on a replica of the big room: refused every time it comes."""
    doc, messages = new_doc()
    doc.apply_update(state)
    before = doc.get_state()
    messages.append(message(f"x-{sub}", sub, "not allowed"))
    return doc.get_update(before)


class AckedWriter:
    """A writer with ?ext=ack over the client core (`SessionClient`): `write()` returns once
    the relay acknowledged the update."""

    def __init__(self, client: SessionClient, messages: Array, sub: str) -> None:
        self.client = client
        self.messages = messages
        self.sub = sub
        self.written = 0

    async def write(self, update: bytes | None = None) -> float:
        """Append a message (or send `update` as it is); seconds from sending to the Ack."""
        start = time.perf_counter()
        if update is None:
            self.written += 1
            self.messages.append(message(f"{self.sub}-{self.written}", self.sub, "hello"))
            await self.client.flush()
        else:
            await self.client.send(SyncUpdate(update))
        target = self.client.sent_updates
        await self.client.wait_for(lambda: self.client.acked >= target, 120)
        return time.perf_counter() - start


async def acked_writer(stack: AsyncExitStack, url: str, sub: str) -> AckedWriter:
    """An `AckedWriter` of `sub`, synced, closed with `stack`."""
    doc, messages = new_doc()
    return AckedWriter(await stack.enter_async_context(session_client(url, doc)), messages, sub)


async def drain(ws: ClientConnection) -> None:
    async for _frame in ws:
        pass


async def phase(
    server: Server, writer: AckedWriter, seconds: float, flood: list[tuple[ClientConnection, bytes]]
) -> tuple[list[float], float]:
    """Ack latencies of the writer and the relay's CPU share over `seconds`."""

    async def flooder(ws: ClientConnection, frame: bytes, offset: float) -> None:
        await asyncio.sleep(offset)  # spread the readers over the second
        deadline = time.monotonic() + seconds - offset
        while time.monotonic() < deadline:
            await ws.send(frame)
            await asyncio.sleep(1.0)  # the rate under test: one refused write a second

    latencies: list[float] = []
    cpu0, wall0 = cpu_seconds(server.pid), time.monotonic()
    tasks = [
        asyncio.create_task(flooder(ws, frame, index / max(1, len(flood))))
        for index, (ws, frame) in enumerate(flood)
    ]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latencies.append(await writer.write())
        await asyncio.sleep(0.1)  # the bystander's pace
    await asyncio.gather(*tasks)
    share = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - wall0)
    return latencies, share


async def measure(server: Server, state: bytes, readers: int, seconds: float) -> dict[str, object]:
    base = server.url
    async with AsyncExitStack() as stack:
        return await _measure(stack, base, server, state, readers, seconds)


async def _measure(
    stack: AsyncExitStack, base: str, server: Server, state: bytes, readers: int, seconds: float
) -> dict[str, object]:
    url = f"{base}/{BIG}?token={token(BIG, 'writer', 'alice')}&ext=ack"
    seeder = await acked_writer(stack, url, "alice")
    await seeder.write(state)
    url = f"{base}/{OTHER}?token={token(OTHER, 'writer', 'bob')}&ext=ack"
    writer = await acked_writer(stack, url, "bob")
    tasks: list[asyncio.Task[None]] = []
    for _ in range(5):
        await writer.write()  # warm up
    quiet, quiet_cpu = await phase(server, writer, seconds, [])
    flood: list[tuple[ClientConnection, bytes]] = []
    for index in range(readers):
        sub = f"reader-{index}"
        ws = await connect(f"{base}/{BIG}?token={token(BIG, 'reader', sub)}", max_size=None)
        tasks.append(asyncio.create_task(drain(ws)))
        flood.append((ws, encode_message(SyncUpdate(refused_write(state, sub)))))
    flooded, flood_cpu = await phase(server, writer, seconds, flood)
    for ws, _ in flood:
        await ws.close()
    for task in tasks:
        task.cancel()
    return {
        "quiet": quiet,
        "quiet_cpu": quiet_cpu,
        "flood": flooded,
        "flood_cpu": flood_cpu,
        "refused": readers * seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", type=Path, help="a checkout of an earlier relay")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--readers", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    state = big_room(args.messages)
    sources = [("this tree", Path(__file__).resolve().parent.parent)]
    if args.old_src is not None:
        sources.insert(0, (f"old ({args.old_src.name})", args.old_src.resolve()))
    print(
        f"{args.messages} messages ({len(state)} bytes), {args.readers} readers x 1 refused "
        f"write/s, {args.seconds:g} s per phase"
    )
    print()
    print(
        "| relay | phase | relay CPU | bystander ack ms: median | p99 | max "
        "| median / quiet median |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, src in sources:
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_relay(Path(tmp) / "data", src=src) as server,
        ):
            result = asyncio.run(measure(server, state, args.readers, args.seconds))
        quiet_median = statistics.median(result["quiet"])  # type: ignore[arg-type]
        for label in ("quiet", "flood"):
            latencies = sorted(result[label])  # type: ignore[call-overload]
            median = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"| {name} | {label} | {result[label + '_cpu']:.0%} | {median * 1e3:.1f} "
                f"| {p99 * 1e3:.1f} | {latencies[-1] * 1e3:.1f} | {median / quiet_median:.2f} |"
            )


if __name__ == "__main__":
    main()
