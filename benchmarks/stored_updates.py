"""What a cluster node pays for an update another node stored (issue 13), in one process.

A node applies every update of a room that another node judged and stored (`LiveDoc.apply_stored`).
This times it for chat messages like the fan-out benchmark's (a user message of 80-300 words,
~1.3 KB), per update over `--messages` of them, beside what the node used to do on top of it:
index each update at once (`LiveDoc.shape_checked()` brings the index up to date, as every
feed check did) and look at the feed (`WaitingWatch.check`, which keeps a view of the room's
messages). Median of `--repeat` runs; the anchor is pycrdt's `Doc.apply_update` of the same
bytes, which any copy of the room pays.

    .venv/bin/python benchmarks/stored_updates.py [--messages 600] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from pycrdt import Doc

from crdtchat.document import Conversation
from crdtchat.relay.feed import WaitingFeed, WaitingWatch
from crdtchat.relay.livedoc import LiveDoc
from crdtchat.relay.store import Store


def chat_updates(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    conversation = Conversation(author="alice")
    updates = []
    for index in range(count):
        before = conversation.doc.get_state()
        words = " ".join(f"w{rng.randint(0, 9999)}" for _ in range(rng.randint(80, 300)))
        conversation.append("user", f"fanout#{index}# {words}")
        updates.append(conversation.doc.get_update(before))
    return updates


def per_update_us(updates: list[bytes], apply: Callable[[bytes], object]) -> float:
    started = time.perf_counter()
    for update in updates:
        apply(update)
    return (time.perf_counter() - started) / len(updates) * 1e6


async def main(messages: int, repeat: int) -> None:
    updates = chat_updates(messages)

    def fresh() -> LiveDoc:
        live = LiveDoc()
        live.shape_checked()  # the index of the (empty) room exists, as on a loaded room
        return live

    def anchor() -> Callable[[bytes], object]:
        return Doc().apply_update

    def now() -> Callable[[bytes], object]:
        return fresh().apply_stored

    def indexed() -> Callable[[bytes], object]:
        live = fresh()
        return lambda update: (live.apply_stored(update), live.shape_checked())

    with tempfile.TemporaryDirectory() as data:
        async with Store(Path(data)) as store:
            feed = WaitingFeed(store)

            def watched(index: bool) -> Callable[[bytes], object]:
                live = fresh()
                watch = WaitingWatch("room", feed)

                def apply(update: bytes) -> None:
                    live.apply_stored(update)
                    # before: the relay asked `shape_checked()` on every check
                    checked = live.shape_checked() if index else False
                    watch.check(live.doc, shape_checked=lambda: checked)

                return apply

            rows = [
                ("pycrdt Doc.apply_update (anchor)", anchor),
                ("apply_stored, as now", now),
                ("  + index each update", indexed),
                ("  + feed check", lambda: watched(False)),
                ("  + index and feed check (before)", lambda: watched(True)),
            ]
            results = []
            for name, make in rows:
                # a fresh document per run: every run applies the same updates from empty
                runs = [per_update_us(updates, make()) for _ in range(repeat)]
                results.append((name, statistics.median(runs)))
    base = results[0][1]
    print(f"{messages} chat messages, {sum(map(len, updates)) / len(updates):.0f} bytes each")
    print(f"{'':36} {'µs/update':>10} {'x anchor':>9}")
    for name, us in results:
        print(f"{name:36} {us:10.1f} {us / base:8.1f}x")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    anyio.run(main, args.messages, args.repeat)


if __name__ == "__main__":
    cli()
