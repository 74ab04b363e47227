"""What the relay's message-id check (design §7.2) costs, beside what it already pays.

Two measurements, each against an anchor in the same run:

- per appended message: `MessageIds.claim` + `commit` (the id check), beside
  `crdtchat.relay.permissions.check_message` on the same message (the schema/author/role check every
  append already pays);
- per room: reading the ids of a loaded room once (`MessageIds.load`, on the loop, at the
  first write that may add a message), beside loading the room's live document (`LiveDoc`).

Run: .venv/bin/python benchmarks/message_ids.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pycrdt import Array, Doc, Map
from relay_permissions import conversation, declare, message

from crdtchat import schema
from crdtchat.relay.livedoc import LiveDoc, build_structure
from crdtchat.relay.message_ids import MessageIds
from crdtchat.relay.permissions import check_message


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def new_messages(base: bytes, count: int) -> tuple[Doc, list[Map]]:
    """`count` appended message Maps, integrated in a document (as the relay reads them)."""
    doc: Doc = Doc()
    array = declare(doc)[schema.MESSAGES]
    assert isinstance(array, Array)
    if base:
        doc.apply_update(base)
    with doc.transaction():
        for index in range(count):
            array.append(message(f"new{index}", "user", "alice", "hello there"))
    return doc, [array[index] for index in range(len(array) - count, len(array))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    sizes = (0, 1000) if args.quick else (0, 1000, 10_000)
    count, runs = (200, 3) if args.quick else (2000, 5)
    print(f"python {sys.version.split()[0]}, {count} messages per row, best of {runs}")
    print()
    print(
        "| doc size (messages) | check_message µs (anchor) | id check µs | id / anchor "
        "| document load ms (anchor) | read the ids ms | ids / load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        base = conversation(size) if size else b""
        doc, items = new_messages(base, count)

        # Both inside one read transaction, as the relay judges an update.
        def anchor(doc: Doc = doc, items: list[Map] = items) -> float:
            with doc.transaction():
                start = time.perf_counter()
                for item in items:
                    assert check_message(item, "writer", "alice") is None
                return (time.perf_counter() - start) / len(items)

        def ids_check(doc: Doc = doc, items: list[Map] = items, base: bytes = base) -> float:
            ids = MessageIds()
            ids.load(LiveDoc(base).messages, shape_checked=True)
            with doc.transaction():
                start = time.perf_counter()
                for item in items:
                    reason = ids.claim(item.get("id"), item.get("role"), item.get("parent"))
                    assert reason is None
                    ids.commit()
                return (time.perf_counter() - start) / len(items)

        def load(base: bytes = base) -> float:
            start = time.perf_counter()
            LiveDoc(base)
            return time.perf_counter() - start

        def read_ids(base: bytes = base) -> float:
            # as the relay reads them: its structure index (built off the loop) vouches for
            # the shape, so the array is rendered in one go (design §7.1)
            live = LiveDoc(base, structure=build_structure(base))
            assert live.shape_checked()
            start = time.perf_counter()
            live.ids.load(live.messages, shape_checked=True)
            return time.perf_counter() - start

        checked = best_of(runs, anchor)
        claimed = best_of(runs, ids_check)
        loading = best_of(3, load)
        reading = best_of(3, read_ids)
        per_room = f"{reading / loading:.2f}" if size else "-"
        print(
            f"| {size} | {checked * 1e6:.1f} | {claimed * 1e6:.2f} | {claimed / checked:.3f} "
            f"| {loading * 1e3:.1f} | {reading * 1e3:.1f} | {per_room} |"
        )


if __name__ == "__main__":
    main()
