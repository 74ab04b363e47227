"""The relay's cold open of a long conversation: a client joins a 10,000-message room that the
relay has not loaded (it was just restarted) and asks for the whole state, as a browser does.

Two figures per open, from the start of the websocket handshake: when the relay's sync step 2
(the whole document) has arrived, and when the client's first write, sent right after its
step 1, is acknowledged (the relay judges it only once the room's indexes are built). The
relay is a real subprocess, restarted before every open so that every open is cold; the room
was written through the relay, so its stored bytes were checked on the way in.

`--compare DIR` runs the relay from another checkout too (a `git worktree` of an older commit),
alternating the two on copies of the same data directory, so that both see the same machine
load; ratios are new/old per pair.

Anchor, in the same run: `Conversation.from_update` of the same state (the Python client
opening the document), as in benchmarks/browser_open.py.

Run: .venv/bin/python benchmarks/relay_cold_open.py [--messages 10000] [--repeats 5]
     [--compare /tmp/old-worktree]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from pycrdt import Doc, Map, Text
from websockets.asyncio.client import connect

from benchmarks._support import REPO, SECRET, cpu_seconds, long_chat
from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.stack import RelaySubprocess
from crdtchat.tokens import mint_token
from crdtchat.wire import Ack, SyncStep1, SyncStep2, SyncUpdate, decode_frame, encode_frame

ROOM = "bench-cold"


def token(role: str = "writer") -> str:
    return mint_token(SECRET, ROOM, role, "alice", 3600)


async def upload(url: str, state: bytes) -> None:
    conversation = Conversation.from_update(state, author="alice")
    async with Replica(url, ROOM, token(), doc=conversation.doc) as replica:
        await replica.wait_until(lambda status: status.durable, timeout=300)


def a_write() -> bytes:
    """A small write of a writer's own (a draft), made by a fresh client."""
    doc = Doc()
    drafts = doc.get(schema.DRAFTS, type=Map)
    drafts["alice"] = Text("typing")
    return doc.get_update()


async def cold_open(port: int, pid: int) -> tuple[float, float, float]:
    """Seconds from the handshake to the relay's step 2, and to the ack of a first write; and
    the relay's CPU seconds (all its threads) until the step 2 arrived, which a loaded machine
    changes much less than the wall times.

    Not a client (no SyncSession): the measured side is the relay's cold load, so this sends
    one constant frame (step 1 of an empty document and a prepared write, together, before
    the relay has loaded the room, which a client core never does: it writes only after
    answering the relay's step 1) and stamps what comes back. It answers nothing and applies
    nothing: applying the >1 MB step 2 here would delay reading the Ack that follows it."""
    url = f"ws://127.0.0.1:{port}/{ROOM}?token={token()}&ext=ack"
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    state_at = acked_at = cpu = 0.0
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(encode_frame([SyncStep1(b"\x00"), SyncUpdate(a_write())]))
        while not (state_at and acked_at):
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            for message in decode_frame(frame):
                if isinstance(message, SyncStep2) and not state_at:
                    state_at = time.perf_counter() - start
                    cpu = cpu_seconds(pid) - cpu_before
                    assert len(message.update) > 1_000_000, len(message.update)
                elif isinstance(message, Ack) and message.seq >= 1:
                    acked_at = time.perf_counter() - start
    return state_at, acked_at, cpu


def relay_for(code: Path, data: Path) -> RelaySubprocess:
    env = {"PYTHONPATH": str(code)}
    return RelaySubprocess(data, SECRET, cwd=code, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout to run alternately")
    args = parser.parse_args()
    state = long_chat(args.messages)
    anchor = []
    for _ in range(3):
        start = time.perf_counter()
        Conversation.from_update(state, author="alice")
        anchor.append(time.perf_counter() - start)
    base = Path(tempfile.mkdtemp())
    seed = relay_for(REPO, base / "seed").start()
    try:
        anyio.run(upload, f"ws://127.0.0.1:{seed.port}", state)
    finally:
        seed.stop()  # SIGTERM: the room is flushed into one snapshot
    trees = {"new": REPO}
    if args.compare is not None:
        trees["old"] = args.compare.resolve()
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    relays = {}
    for name, code in trees.items():
        data = base / name
        shutil.copytree(base / "seed", data)
        relays[name] = relay_for(code, data)
        relays[name].start()
        anyio.run(cold_open, relays[name].port, relays[name].pid)  # the first load checks
        relays[name].kill()
    try:
        for _ in range(args.repeats):
            for name, relay in relays.items():
                relay.start()
                results[name].append(anyio.run(cold_open, relay.port, relay.pid))
                relay.kill()
    finally:
        for relay in relays.values():
            relay.stop()
        shutil.rmtree(base, ignore_errors=True)
    a = statistics.median(anchor)
    print(f"{args.messages} messages ({len(state)} bytes), {args.repeats} cold opens each")
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}; anchor Conversation.from_update {a * 1e3:.0f} ms")
    for name, samples in results.items():
        state_ms = [s * 1e3 for s, _, _ in samples]
        write_ms = [w * 1e3 for _, w, _ in samples]
        cpu_ms = [c * 1e3 for _, _, c in samples]
        print(
            f"{name}: state received {statistics.median(state_ms):.0f} ms "
            f"({statistics.median(state_ms) / (a * 1e3):.2f}x anchor), relay CPU until then "
            f"{statistics.median(cpu_ms):.0f} ms, first write acked "
            f"{statistics.median(write_ms):.0f} ms; samples "
            + " ".join(f"{s:.0f}/{w:.0f}" for s, w in zip(state_ms, write_ms, strict=True))
        )
    if "old" in results:
        pairs = list(zip(results["new"], results["old"], strict=True))
        ratios = [[n[k] / o[k] for k in range(3)] for n, o in pairs]
        print(
            "new/old per pair, medians: state "
            f"{statistics.median(r[0] for r in ratios):.2f}, relay CPU until the state "
            f"{statistics.median(r[2] for r in ratios):.2f}, first write "
            f"{statistics.median(r[1] for r in ratios):.2f}"
        )


if __name__ == "__main__":
    main()
