"""Cluster nodes as a state machine over the in-process stream (crdtchat/cluster/memory.py).

Rules: a node writes to a room (a claim-once check, or free text), a node dies (its copy and
follower vanish without cleanup) and another starts, the stream compacts a room, NATS goes away
and comes back. Invariants: every acknowledged write is in the stream and in every node's copy
once caught up, copies equal the stream, and a claim is accepted at most once per room whatever
the interleaving. The stand-in is held to real JetStream by tests/cluster/test_memory.py.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pycrdt import Doc, Map, Text

from crdtchat.cluster.errors import ClusterError
from crdtchat.cluster.memory import MemoryRoomLog, MemoryStream
from crdtchat.cluster.room import ClusterRoom, RefusedAt
from crdtchat.cluster.roomlog import Appended

ROOMS = ("r.1", "r_2")
client_ids = itertools.count(1)


def claim_once(doc: Doc, _update: bytes) -> str | None:
    return "already claimed" if "winner" in doc.get("claim", type=Map) else None


def anything(_doc: Doc, _update: bytes) -> str | None:
    return None


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stream = MemoryStream()
        self.nodes: list[dict[str, ClusterRoom]] = []
        self.acknowledged: dict[str, list[str]] = {room: [] for room in ROOMS}
        self.claims: dict[str, int] = dict.fromkeys(ROOMS, 0)
        self.writes = itertools.count()
        self.run(self.start_node())
        self.run(self.start_node())

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    async def start_node(self) -> None:
        log = MemoryRoomLog(self.stream)
        rooms = {room: ClusterRoom(log, room, compact_updates=4) for room in ROOMS}
        for room in rooms.values():
            await room.open()
        self.nodes.append(rooms)

    def teardown(self) -> None:
        for rooms in self.nodes:
            for room in rooms.values():
                self.run(room.close())
        self.loop.close()

    @precondition(lambda self: self.stream.available)
    @rule(node=st.integers(0, 5), room=st.sampled_from(ROOMS), text=st.text("abc", min_size=1))
    def write_text(self, node: int, room: str, text: str) -> None:
        cluster_room = self.nodes[node % len(self.nodes)][room]
        doc: Doc = Doc(client_id=next(client_ids))
        doc.get("log", type=Map)[f"w{next(self.writes)}"] = text
        result = self.run(cluster_room.submit(doc.get_update(), f"t{next(self.writes)}", anything))
        assert isinstance(result, Appended)
        self.acknowledged[room].append(text)

    @precondition(lambda self: self.stream.available)
    @rule(first=st.integers(0, 5), second=st.integers(0, 5), room=st.sampled_from(ROOMS))
    def race_to_claim(self, first: int, second: int, room: str) -> None:
        """Two nodes claim at once: no more than one claim is ever accepted per room."""
        contenders = [self.nodes[i % len(self.nodes)][room] for i in (first, second)]

        async def both() -> list[Appended | RefusedAt]:
            updates = []
            for _ in contenders:
                doc: Doc = Doc(client_id=next(client_ids))
                doc.get("claim", type=Map)["winner"] = doc.client_id
                updates.append(doc.get_update())
            return await asyncio.gather(
                *(
                    node.submit(update, f"c{next(self.writes)}", claim_once)
                    for node, update in zip(contenders, updates, strict=True)
                )
            )

        results = self.run(both())
        self.claims[room] += sum(isinstance(result, Appended) for result in results)
        assert self.claims[room] <= 1

    @precondition(lambda self: len(self.nodes) > 1)
    @rule(node=st.integers(0, 5))
    def kill_node(self, node: int) -> None:
        """A node dies: its copies go without a goodbye; a fresh node replaces it."""
        rooms = self.nodes.pop(node % len(self.nodes))
        for room in rooms.values():
            self.run(room.close())
        if self.stream.available:
            self.run(self.start_node())

    @precondition(lambda self: self.stream.available)
    @rule(room=st.sampled_from(ROOMS))
    def compact(self, room: str) -> None:
        self.run(MemoryRoomLog(self.stream).compact_log(room))

    @rule()
    def nats_goes_away_and_comes_back(self) -> None:
        self.stream.available = False
        doc: Doc = Doc(client_id=next(client_ids))
        doc.get("log", type=Text).insert(0, "lost")
        try:
            self.run(self.nodes[0][ROOMS[0]].submit(doc.get_update(), "down", anything))
        except ClusterError:
            pass
        else:
            raise AssertionError("a write was acknowledged while NATS was away")
        self.stream.available = True

    @invariant()
    def every_copy_holds_every_acknowledged_write(self) -> None:
        for rooms in self.nodes:
            for name, room in rooms.items():
                self.run(room.caught_up(5))
                written = sorted(room.doc.get("log", type=Map).to_py().values())
                assert written == sorted(self.acknowledged[name])
                stream_doc: Doc = Doc()
                state = self.run(MemoryRoomLog(self.stream).load(name))
                if state.entries:
                    stream_doc.apply_update(state.merged())
                assert (
                    stream_doc.get("log", type=Map).to_py() == room.doc.get("log", type=Map).to_py()
                )
                winners = room.doc.get("claim", type=Map).to_py()
                assert len(winners) == self.claims[name]


ClusterMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
test_cluster_machine = ClusterMachine.TestCase
