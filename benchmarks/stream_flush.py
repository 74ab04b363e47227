"""What one streamed flush costs a worker's replica, without a provider or an observer.

`concurrent_replies.py` measures the whole path, but its CPU per token moves with the machine's
load (a loaded worker batches more per wake-up) by more than most changes to the worker. This
isolates the part that is ours: N worker replicas (`Replica` + `Conversation`, no local file,
as `crdtchat worker` opens them) in this process, each appending to its reply's stream every
100 ms like `serve_turn`'s flusher, through our relay in a subprocess; flushes are spread over
the 100 ms as turns start at different times. Reported: this process's CPU per flush (the
document transaction, the sync session, the replica's tasks, the websocket send, the relay's
acks) and the relay's, from the first flush until every replica is durable again.

Compare two checkouts by alternating PYTHONPATH (the relay runs from the same tree as the
replicas, the one `crdtchat` is imported from):

    for i in 1 2 3; do for t in ../old .; do PYTHONPATH=$t \\
        .venv/bin/python benchmarks/stream_flush.py --rooms 100 --flushes 50; done; done
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import SECRET, running_relay

import crdtchat
from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.tokens import mint_token

FLUSH_SECONDS = 0.1
CHUNK = "<1234.567890> <1234.567891> "  # two stamped tokens: 20 tokens/s flushed every 100 ms
SOURCE = Path(crdtchat.__file__).resolve().parent.parent  # the tree under measurement


async def measure(rooms: int, flushes: int) -> tuple[float, float, float]:
    """(our CPU µs per flush, the relay's, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="crdtchat-flush-") as directory:
        data = Path(directory) / "relay"
        data.mkdir()
        limit = ["--subject-connections", str(2 * rooms)]
        with running_relay(data, limit, src=SOURCE) as relay:
            questions = []
            for i in range(rooms):
                room = f"flush-{i:04d}"
                person = Conversation.create(author=f"person-{i}")
                question = person.append("user", "hello")
                token = mint_token(SECRET, room, "writer", f"person-{i}", 3600)
                async with Replica(relay.url, room, token, doc=person.doc) as replica:
                    await replica.wait_until(lambda s: s.synced and s.durable, timeout=60)
                questions.append((room, question.id))
            worker_token = mint_token(SECRET, "*", "worker", "worker-1", 3600)
            async with contextlib.AsyncExitStack() as stack:
                streams: list[tuple[Conversation, Replica, str]] = []
                for room, question_id in questions:
                    conversation = Conversation(author="worker-1", role="worker")
                    replica = await stack.enter_async_context(
                        Replica(relay.url, room, worker_token, doc=conversation.doc)
                    )
                    await replica.wait_until(lambda s: s.synced, timeout=60)
                    turn_id = f"{question_id}~a1"
                    conversation.start_stream(turn_id, parent=question_id)
                    streams.append((conversation, replica, turn_id))
                for _, replica, _ in streams:
                    await replica.wait_until(lambda s: s.durable, timeout=60)

                async def flusher(conversation: Conversation, turn_id: str, offset: float) -> None:
                    await asyncio.sleep(offset)
                    for _ in range(flushes):
                        await asyncio.sleep(FLUSH_SECONDS)
                        conversation.append_stream(turn_id, CHUNK)

                ours, theirs, started = time.process_time(), relay.cpu(), time.monotonic()
                async with asyncio.TaskGroup() as tasks:
                    for index, (conversation, _, turn_id) in enumerate(streams):
                        offset = FLUSH_SECONDS * index / rooms
                        tasks.create_task(flusher(conversation, turn_id, offset))
                for _, replica, _ in streams:
                    await replica.wait_until(lambda s: s.durable, timeout=120)
                ours = time.process_time() - ours
                theirs = relay.cpu() - theirs
                wall = time.monotonic() - started
    total = rooms * flushes
    return ours / total * 1e6, theirs / total * 1e6, wall


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--flushes", type=int, default=50, help="per room, 100 ms apart")
    args = parser.parse_args()
    if min(args.rooms, args.flushes) < 1:
        parser.error("--rooms and --flushes must be positive")
    ours, relay, wall = asyncio.run(measure(args.rooms, args.flushes))
    print(
        f"{SOURCE}: {args.rooms} rooms x {args.flushes} flushes: worker replicas "
        f"{ours:.1f} µs/flush, relay {relay:.1f} µs/flush, {wall:.1f} s; "
        f"load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    cli()
