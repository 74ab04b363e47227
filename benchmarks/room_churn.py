"""Room loads and unloads in one process, to find what the soak's slow growth is (issue 12).

The long soak (benchmarks/soak.py) shows the relay's resident memory growing by about a
kilobyte per room load while Python's heap does not. This loop does what the relay does for
each room it loads, without websockets, and can leave each part out, so that the growth can be
bisected: read the room from the store (a real SQLite file: `store`; without it, a dict of
states), build its document (`LiveDoc`: `doc`), index its structure on a worker thread as
`Room` does (`structure`), watch for waiting messages (`WaitingWatch`: `watch`), hold an
awareness (`awareness`), accept a user message and refuse an assistant message (a rebuild:
`write`), store the write, and at unload compact as `Room._flush` does and close everything.
`--loaded` rooms are held at once, as the soak's relay holds ~280, and each load adds a
message to its room, so rooms grow as in the soak.

Every `--every` loads it prints resident memory after `gc.collect()` with the rooms loaded,
again after glibc's `malloc_trim(0)` (what the trim gives back was free but held by the
allocator: fragmentation), then unloads every room and prints it once more: what stays then,
against the first row, is what the loads left behind.

    .venv/bin/python benchmarks/room_churn.py --loads 20000 --rooms 2000
    .venv/bin/python benchmarks/room_churn.py --loads 20000 --without structure
    .venv/bin/python benchmarks/room_churn.py --cost-of 0 10 40   # a loaded room's memory
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import anyio
from pycrdt import Array, Awareness, Doc, Map, Text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import rss_kib
from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.relay.feed import WaitingFeed, WaitingWatch
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused, build_structure
from crdtchat.relay.store import Store, StoredRoom

PARTS = ("store", "doc", "structure", "watch", "awareness", "write")
LIBC = ctypes.CDLL("libc.so.6")
SQLITE = ctypes.CDLL("libsqlite3.so.0")  # the library the sqlite3 module loaded: one instance
SQLITE.sqlite3_memory_used.restype = ctypes.c_int64


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (every arena summed)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


LIBC.mallinfo2.restype = MallInfo2


def malloc_in_use_and_free() -> tuple[float, float]:
    """MiB that malloc has handed out (and not got back), and MiB it holds free."""
    info = LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


def regions() -> dict[tuple[int, str], int]:
    """Resident KiB of each mapping of this process, by (start address, name)."""
    found: dict[tuple[int, str], int] = {}
    key = (0, "")
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                key = (int(fields[0].split("-")[0], 16), fields[5] if len(fields) > 5 else "")
            elif fields[0] == "Rss:":
                found[key] = int(fields[1])
    return found


def print_region_growth(before: dict[tuple[int, str], int], after: dict[tuple[int, str], int]):
    """Which mappings grew between two drained rows (named: a file or [heap]; unnamed: mmap)."""
    grown = {key: after.get(key, 0) - before.get(key, 0) for key in before.keys() | after.keys()}
    print("\nresident growth by mapping, first to last row (KiB):")
    for (start, name), kib in sorted(grown.items(), key=lambda item: -abs(item[1]))[:12]:
        if kib:
            print(f"  {kib:+8d}  {start:#x} {name or '(anonymous)'}")


def trim() -> None:
    """Give free heap memory back to the system (glibc)."""
    LIBC.malloc_trim(0)


def client_updates(state: bytes, index: int) -> tuple[bytes, bytes]:
    """A user message the relay accepts, then an assistant message it refuses (a writer's)."""
    doc: Doc = Doc()
    messages = doc.get(schema.MESSAGES, type=Array)
    for name in schema.ALL_ROOTS:
        if name != schema.MESSAGES:
            doc.get(name, type=Map)
    if state:
        doc.apply_update(state)
    updates = []
    for role, text in (("user", f"line {index}"), ("assistant", "not yours")):
        before = doc.get_state()
        message = {"id": f"{role[0]}{index:x}-{random.getrandbits(32):x}", "role": role}
        message |= {"author": "alice", "parent": None, "created_at": 0.0, "content": Text(text)}
        messages.append(Map(message))
        updates.append(doc.get_update(before))
    return updates[0], updates[1]


def room_state(messages: int) -> bytes:
    """A room holding `messages` short user messages, as a client writes them."""
    with Conversation.create(author="alice", title="churn") as conversation:
        for index in range(messages):
            conversation.append("user", f"line {index} {random.getrandbits(32):x}")
        return conversation.encode_state()


class MemoryStore:
    """The store's interface over a dict: the rooms grow as with SQLite, without SQLite."""

    def __init__(self) -> None:
        self.states: dict[str, bytes] = {}
        self.waiting: set[str] = set()

    async def load(self, room: str) -> StoredRoom:
        state = self.states.get(room, b"")
        return StoredRoom(state=state, log_length=0, log_bytes=0, next_seq=1)

    async def append(self, room: str, seq: int, update: bytes) -> None:
        pass  # the compaction at unload keeps the whole state

    async def compact(self, room: str, upto_seq: int, snapshot: bytes) -> None:
        self.states[room] = snapshot

    def set_waiting(self, room: str, waiting: bool) -> None:
        if waiting:
            self.waiting.add(room)
        else:
            self.waiting.discard(room)


AnyStore = Store | MemoryStore


class LoadedRoom:
    """One room as the relay holds it between its load and its unload, with `parts` only."""

    def __init__(self, name: str, parts: set[str], grow: bool = True) -> None:
        self.name = name
        self.parts = parts
        self.grow = grow  # store the accepted write (the room grows) or forget it
        self.live: LiveDoc | None = None
        self.watch: WaitingWatch | None = None
        self.awareness: Awareness | None = None
        self.seq = 1

    async def load(self, store: AnyStore, feed: WaitingFeed) -> int:
        """Read, build, index, then accept a write and refuse one (which rebuilds); returns
        the size of the state loaded."""
        parts, name = self.parts, self.name
        state = b""
        stored = await store.load(name)
        state, self.seq = stored.whole, stored.next_seq
        live = self.live = LiveDoc(state) if "doc" in parts else None
        watch = self.watch = WaitingWatch(name, feed) if "watch" in parts else None
        if "awareness" in parts:
            self.awareness = Awareness(Doc())
            self.awareness.set_local_state(None)
        if "structure" in parts:
            index = await anyio.to_thread.run_sync(build_structure, state)
            if live is not None:
                live.adopt_structure(index)
        if "write" in parts and live is not None:
            accepted, refused = client_updates(state, random.getrandbits(30))
            outcome = live.apply(accepted, "writer", "alice")
            assert isinstance(outcome, Accepted), outcome
            if watch is not None:
                watch.check(live.doc)
            if self.grow:
                await store.append(name, self.seq, accepted)
            outcome = live.apply(refused, "writer", "alice")
            assert isinstance(outcome, Refused), outcome
            if watch is not None:
                watch.check(live.doc)
        return len(state)

    async def unload(self, store: AnyStore) -> None:
        """Compact as `Room._flush` does, then drop everything."""
        if self.live is not None:
            if "write" in self.parts and self.grow:
                await store.compact(self.name, self.seq, self.live.compact())
            self.live.close()
        if self.watch is not None:
            self.watch.close()
        self.live = self.watch = self.awareness = None


async def churn(args: argparse.Namespace, data: Path) -> None:
    parts = set(PARTS) - set(args.without)
    rng = random.Random(args.seed)
    used_parts = ", ".join(p for p in PARTS if p in parts)
    print(f"parts: {used_parts}; {args.rooms} rooms, {args.loaded} loaded at once", flush=True)
    print(
        "| loads | mean room KiB | RSS MiB, rooms loaded | after malloc_trim | "
        "all unloaded | trimmed (ms to trim) | vs first | malloc in use | malloc free | "
        "SQLite's heap MiB | Python blocks | s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    async with Store(data) as store:
        used: AnyStore = store if "store" in parts else MemoryStore()
        if args.messages:
            for index in range(args.rooms):
                await used.compact(f"room-{index}", 1, room_state(args.messages))
        feed = WaitingFeed(used)  # type: ignore[arg-type]
        loaded: deque[LoadedRoom] = deque()
        sizes: list[int] = []
        first: float | None = None
        started = time.monotonic()
        for load in range(1, args.loads + 1):
            name = f"room-{rng.randrange(args.rooms)}"
            while any(room.name == name for room in loaded):
                name = f"room-{rng.randrange(args.rooms)}"
            room = LoadedRoom(name, parts, grow=not args.no_growth)
            sizes.append(await room.load(used, feed))
            loaded.append(room)
            if len(loaded) > args.loaded:
                await loaded.popleft().unload(used)
            if load % args.every:
                continue
            gc.collect()
            with_rooms = rss_mib()
            trim()
            with_rooms_trimmed = rss_mib()
            while loaded:  # what stays once every room is gone is what a load leaves behind
                await loaded.popleft().unload(used)
            gc.collect()
            drained_untrimmed = rss_mib()
            trim_started = time.perf_counter()
            trim()
            trim_ms = (time.perf_counter() - trim_started) * 1000
            drained = rss_mib()
            in_use, free = malloc_in_use_and_free()
            if first is None:
                first, first_regions = drained, regions()
            print(
                f"| {load} | {sum(sizes) / len(sizes) / 1024:.1f} | {with_rooms:.1f} | "
                f"{with_rooms_trimmed:.1f} | {drained_untrimmed:.1f} | "
                f"{drained:.1f} ({trim_ms:.1f}) | "
                f"{drained - first:+.1f} | "
                f"{in_use:.1f} | {free:.1f} | "
                f"{SQLITE.sqlite3_memory_used() / 2**20:.2f} | {sys.getallocatedblocks()} | "
                f"{time.monotonic() - started:.0f} |",
                flush=True,
            )
            sizes.clear()
        if args.regions and first is not None:
            print_region_growth(first_regions, regions())


def loaded_cost(messages: int, rooms: int, parts: set[str]) -> float:
    """KiB of resident memory per loaded room of `messages` messages (`parts` of it held),
    measured in this process: run it in a fresh one (`--cost-of`)."""
    states = [room_state(messages) for _ in range(rooms)]
    feed = WaitingFeed(MemoryStore())  # type: ignore[arg-type]
    gc.collect()
    before = rss_mib()
    held: list[object] = []
    for index, state in enumerate(states):
        live = LiveDoc(state)
        if "structure" in parts:
            live.adopt_structure(build_structure(state))
        held.append(live)
        if "watch" in parts:
            watch = WaitingWatch(f"room-{index}", feed)
            watch.check(live.doc)
            held.append(watch)
        if "awareness" in parts:
            held.append(Awareness(Doc()))
    gc.collect()
    return (rss_mib() - before) * 1024 / rooms


def print_loaded_costs(args: argparse.Namespace) -> None:
    """What a loaded room costs by its number of messages, each figure in a fresh process."""
    variants = [("doc",), ("doc", "structure"), ("doc", "watch"), PARTS]
    print(f"resident KiB per loaded room ({args.loaded} rooms), by messages in it")
    print("| parts | " + " | ".join(f"{n} messages" for n in args.cost_of) + " | per message |")
    print("|---|" + "---:|" * (len(args.cost_of) + 1), flush=True)
    for variant in variants:
        costs = []
        for messages in args.cost_of:
            code = (
                "import sys; from benchmarks.room_churn import loaded_cost; "
                f"print(loaded_cost({messages}, {args.loaded}, {set(variant)!r}))"
            )
            result = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            costs.append(float(result.stdout.split()[-1]))
        slope = (costs[-1] - costs[0]) / max(1, args.cost_of[-1] - args.cost_of[0])
        label = "all" if variant == PARTS else " + ".join(variant)
        cells = " | ".join(f"{cost:.1f}" for cost in costs)
        print(f"| {label} | {cells} | {slope:.2f} |", flush=True)


def rss_mib() -> float:
    return rss_kib(os.getpid()) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loads", type=int, default=20_000)
    parser.add_argument("--rooms", type=int, default=2_000)
    parser.add_argument("--loaded", type=int, default=280, help="rooms held loaded at once")
    parser.add_argument("--every", type=int, default=2_000, help="one row per ... loads")
    parser.add_argument("--without", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--messages", type=int, default=0, help="messages in each room at start")
    parser.add_argument(
        "--no-growth", action="store_true", help="forget each load's write: rooms keep their size"
    )
    parser.add_argument("--regions", action="store_true", help="print growth by mapping")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cost-of",
        type=int,
        nargs="*",
        default=[],
        help="instead: memory per loaded room of these many messages, part by part",
    )
    args = parser.parse_args(argv)
    if args.cost_of:
        print_loaded_costs(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="crdtchat-churn-") as tmp:
        asyncio.run(churn(args, Path(tmp) / "data"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
