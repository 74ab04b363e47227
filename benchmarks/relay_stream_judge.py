"""The relay's CPU per streamed update, in process: judging and committing, no sockets.

Issue 16: with 200 replies streaming at once the relay spends ~165 µs per token, most of it
judging each flush of each stream (a Yjs update appending ~2 tokens to a Y.Text under
`transport.streams`). This drives the relay's protocol core (`RoomProtocol`) the way a room
does during a reply: a writer, a screen (reader) and the worker (acknowledgements on) are
joined; per flush the worker's update is received, judged and committed, and `stored`
broadcasts it (the frame is encoded there). Reported per update: the whole core
(`receive` + `stored`) and `LiveDoc.apply` alone on a copy of the same rooms, with a plain
pycrdt `apply_update` of the same updates as the anchor, in the same run.

    .venv/bin/python benchmarks/relay_stream_judge.py [--rooms 50] [--flushes 60] [--rounds 5]
        [--profile FILE]

Then a turn's other updates, each judged by `LiveDoc.apply` in a room of its own (the
question, the worker's lease, its stream's start with the first words, its commit: the
message appended and the stream and lease deleted), beside the same reply's flushes: what a
whole turn costs the relay's judging, per kind (median µs).

`--profile FILE` writes a cProfile of the core's loop (pstats format) for one round. The
code measured is the one imported: run with `PYTHONPATH=<a worktree>` to compare two trees.
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import time
from pathlib import Path

from pycrdt import Doc

from crdtchat.document import Conversation
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.livedoc import Accepted, LiveDoc, build_structure
from crdtchat.relay.protocol import Peer, RoomProtocol
from crdtchat.relay.ratelimit import Subjects
from crdtchat.tokens import TokenClaims
from crdtchat.wire import SyncUpdate

NOW = 1_900_000_000.0
EXP = int(NOW) + 3600
WORKER = "worker-1"


def stream_room(index: int, flushes: int) -> tuple[bytes, list[bytes]]:
    """A room's state once the worker started streaming (question, lease, stream), and the
    worker's `flushes` updates that follow, each appending two tokens as its flusher does."""
    person = f"person-{index}"
    user = Conversation(author=person, role="writer")
    user.set_settings(provider="openai", model="gpt-4.1")
    question = user.append("user", "a question " * 20).id
    worker = Conversation(Doc(), author=WORKER, role="worker")
    worker.doc.apply_update(user.doc.get_update())
    worker.claim_lease(question, "turn-1", holder=WORKER, ttl=30.0)
    worker.start_stream("turn-1", parent=question)
    state = worker.doc.get_update()
    updates = []
    for flush in range(flushes):
        before = worker.doc.get_state()
        worker.append_stream("turn-1", f" word<{flush:06d}.000000> word<{flush:06d}.500000>")
        updates.append(worker.doc.get_update(before))
    return state, updates


class Room:
    """One room's core with its three peers, loaded with `state`."""

    def __init__(self, name: str, state: bytes, config: RelayConfig, subjects: Subjects) -> None:
        self.protocol = RoomProtocol(name, config)
        self.protocol.load(state, 1, 0, len(state))
        self.worker = self._join(config, subjects, WORKER, "*", "worker", want_ack=True)
        self._join(config, subjects, f"person-{name}", name, "writer", want_ack=True)
        self._join(config, subjects, f"screen-{name}", name, "reader", want_ack=False)

    def _join(
        self,
        config: RelayConfig,
        subjects: Subjects,
        sub: str,
        room: str,
        role: str,
        *,
        want_ack: bool,
    ) -> Peer:
        subject = subjects.connect(sub)
        assert not isinstance(subject, str)
        claims = TokenClaims(sub, EXP, room, role)  # type: ignore[arg-type]
        peer = Peer(claims, subject, config, want_ack=want_ack)
        self.protocol.join(peer)
        return peer


def core_round(rooms: list[Room], flushes: list[list[bytes]]) -> tuple[float, int]:
    """Every room's flushes, interleaved as the relay sees them: (seconds, updates)."""
    count = 0
    started = time.perf_counter()
    for step in range(len(flushes[0])):
        for room, updates in zip(rooms, flushes, strict=True):
            protocol = room.protocol
            protocol.receive(room.worker, SyncUpdate(updates[step]), NOW)
            protocol.stored(protocol.last_seq)
            count += 1
    return time.perf_counter() - started, count


def livedoc_round(docs: list[LiveDoc], flushes: list[list[bytes]]) -> float:
    started = time.perf_counter()
    for step in range(len(flushes[0])):
        for live, updates in zip(docs, flushes, strict=True):
            outcome = live.apply(updates[step], "worker", WORKER)
            assert isinstance(outcome, Accepted) and outcome.delta
            live.stored(1)
    return time.perf_counter() - started


def plain_round(docs: list[Doc], flushes: list[list[bytes]]) -> float:
    started = time.perf_counter()
    for step in range(len(flushes[0])):
        for doc, updates in zip(docs, flushes, strict=True):
            doc.apply_update(updates[step])
    return time.perf_counter() - started


def turn_updates(live: LiveDoc, index: int, flushes: int) -> dict[str, list[float]]:
    """One whole turn in `live` (an empty room), each update timed as `LiveDoc.apply`."""
    times: dict[str, list[float]] = {}

    def judge(kind: str, update: bytes, role: str, sub: str) -> None:
        started = time.perf_counter()
        outcome = live.apply(update, role, sub)
        times.setdefault(kind, []).append((time.perf_counter() - started) * 1e6)
        assert isinstance(outcome, Accepted) and outcome.delta, (kind, outcome)
        live.stored(1)

    person = f"person-{index}"
    user = Conversation(Doc(), author=person, role="writer")
    user.doc.apply_update(live.doc.get_update())
    before = user.doc.get_state()
    question = user.append("user", "a question " * 20).id
    judge("question", user.doc.get_update(before), "writer", person)
    worker = Conversation(Doc(), author=WORKER, role="worker")
    worker.doc.apply_update(live.doc.get_update())
    before = worker.doc.get_state()
    worker.claim_lease(question, "turn-1", holder=WORKER, ttl=30.0)
    judge("lease", worker.doc.get_update(before), "worker", WORKER)
    before = worker.doc.get_state()
    worker.start_stream("turn-1", parent=question)
    worker.append_stream("turn-1", "Once")
    judge("stream start", worker.doc.get_update(before), "worker", WORKER)
    for flush in range(flushes):
        before = worker.doc.get_state()
        worker.append_stream("turn-1", f" word<{flush:06d}.000000> word<{flush:06d}.500000>")
        judge("flush", worker.doc.get_update(before), "worker", WORKER)
    before = worker.doc.get_state()
    with worker.doc.transaction():
        text = worker.stream_text("turn-1") or ""
        worker.append("assistant", text, parent=question, status="complete")
        del worker.streams["turn-1"]
        del worker.leases[question]
    judge("commit", worker.doc.get_update(before), "worker", WORKER)
    return times


def turn_table(rooms: int, flushes: int) -> None:
    times: dict[str, list[float]] = {}
    for index in range(rooms):
        settings = Conversation(author=f"person-{index}", role="writer")
        settings.set_settings(provider="openai", model="gpt-4.1")
        live = LiveDoc(settings.doc.get_update())
        live.adopt_structure(build_structure(live.doc.get_update()))  # the relay's, off the loop
        for kind, values in turn_updates(live, index, flushes).items():
            times.setdefault(kind, []).extend(values)
        live.close()
    print(f"a turn's updates, {rooms} rooms, {flushes} flushes each (median µs per update):")
    whole = 0.0
    for kind, values in times.items():
        median = statistics.median(values)
        per_turn = len(values) / rooms
        whole += median * per_turn
        print(f"  {kind:<12} {median:7.1f}  x {per_turn:g} per turn")
    print(f"  a whole turn {whole:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--flushes", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    prepared = [stream_room(i, args.flushes) for i in range(args.rooms)]
    states = [state for state, _ in prepared]
    flushes = [updates for _, updates in prepared]
    config = RelayConfig(secret="s", subject_connections=10_000)
    core_us, live_us, plain_us = [], [], []
    for round_number in range(args.rounds):
        subjects = Subjects(config.subject_quotas())
        rooms = [Room(f"r{i}", state, config, subjects) for i, state in enumerate(states)]
        docs = [LiveDoc(state) for state in states]
        plain = [Doc() for _ in states]
        for doc, state in zip(plain, states, strict=True):
            doc.apply_update(state)
        profiler = cProfile.Profile() if args.profile and round_number == 0 else None
        if profiler is not None:
            profiler.enable()
        seconds, count = core_round(rooms, flushes)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        core_us.append(seconds / count * 1e6)
        live_us.append(livedoc_round(docs, flushes) / count * 1e6)
        plain_us.append(plain_round(plain, flushes) / count * 1e6)
        for room in rooms:
            room.protocol.close()
        for live in docs:
            live.close()
    print(f"{args.rooms} rooms x {args.flushes} flushes, {args.rounds} rounds (median µs/update)")
    core, live, anchor = (statistics.median(v) for v in (core_us, live_us, plain_us))
    print(f"  plain apply_update (anchor) {anchor:7.1f}")
    print(f"  LiveDoc.apply               {live:7.1f}  {live / anchor:5.2f}x")
    print(f"  RoomProtocol receive+stored {core:7.1f}  {core / anchor:5.2f}x")
    turn_table(args.rooms, args.flushes)


if __name__ == "__main__":
    main()
