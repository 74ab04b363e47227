"""The in-process stream stand-in (crdtchat/cluster/memory.py) behaves as real JetStream does.

One scenario runs against both and must give the same transcript (sequences relative to the
first): a machine that tests cluster nodes on the stand-in then tests what NATS would do.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pycrdt import Doc, Map, Text

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.cluster.memory import MemoryRoomLog, MemoryStream
from crdtchat.cluster.room import ClusterRoom, RefusedAt
from crdtchat.cluster.roomlog import RoomLog

pytestmark = pytest.mark.anyio


async def scenario(log: Any) -> list[object]:
    """Appends, a stale one, a retry, a roll-up, a stale roll-up, reads and a follower."""
    transcript: list[object] = []
    doc: Doc = Doc(client_id=9)
    text = doc.get("t", type=Text)
    base = None

    def rel(seq: int) -> int:
        return seq - base if base is not None else seq

    async def type_(chars: str, expected: int, msg_id: str) -> int | str:
        before = doc.get_state()
        text.insert(len(str(text)), chars)
        try:
            appended = await log.append(
                "r", doc.get_update(before), expected_seq=expected, msg_id=msg_id
            )
        except SequenceConflict as conflict:
            return f"conflict, last {rel(conflict.last_seq) if conflict.last_seq else None}"
        return f"{rel(appended.seq)}{' duplicate' if appended.duplicate else ''}"

    first = await log.append("r", Doc(client_id=1).get_update(), expected_seq=0, msg_id="empty")
    base = first.seq
    transcript.append(await type_("a", first.seq, "m1"))
    transcript.append(await type_("b", first.seq, "m2"))  # stale
    transcript.append(await type_("b", first.seq + 1, "m1"))  # a retry of m1: duplicate
    transcript.append(await type_("c", first.seq + 1, "m3"))
    last = await log.last_seq("r")
    transcript.append(rel(last))
    with pytest.raises(SequenceConflict):
        await log.compact("r", b"\x00\x00", upto_seq=last - 1)
    state = await log.load("r")
    rolled = await log.compact("r", state.merged(), upto_seq=last)
    transcript.append(rel(rolled))
    state = await log.load("r")
    transcript.append(
        [(rel(e.seq), e.snapshot, rel(e.covers) if e.covers else 0) for e in state.entries]
    )
    transcript.append(_text(state.merged()))
    async with log.follow("r", after_seq=rolled) as follower:
        with pytest.raises(TimeoutError):
            await follower.next(0.2)
        transcript.append(await type_("d", rolled, "m4"))
        entry = await follower.next(5)
        transcript.append((rel(entry.seq), entry.snapshot))
    async with log.follow("r") as from_start:
        transcript.append([(rel((await from_start.next(5)).seq)) for _ in range(2)])
    return transcript


def _text(update: bytes) -> str:
    doc: Doc = Doc()
    doc.apply_update(update)
    return str(doc.get("t", type=Text))


async def test_the_stand_in_gives_the_transcript_real_jetstream_gives(
    connection: ClusterConnection,
) -> None:
    real = await scenario(RoomLog(connection))
    stand_in = await scenario(MemoryRoomLog(MemoryStream()))
    assert stand_in == real
    assert real[1].startswith("conflict")  # the scenario exercises what it claims to
    assert real[2] == "1 duplicate"
    # "c" builds on the refused "b": stored, but pending in Yjs until "b" comes.
    assert real[7] == "a"


async def test_cluster_rooms_race_on_the_stand_in_as_on_nats() -> None:
    stream = MemoryStream()
    logs = [MemoryRoomLog(stream) for _ in range(2)]
    rooms = [ClusterRoom(log, "race") for log in logs]
    for room in rooms:
        await room.open()
    results: list[object] = []

    def once(doc: Doc, _update: bytes) -> str | None:
        return "already claimed" if "winner" in doc.get("claim", type=Map) else None

    async def claim(index: int) -> None:
        doc: Doc = Doc(client_id=100 + index)
        doc.get("claim", type=Map)["winner"] = index
        results.append(await rooms[index].submit(doc.get_update(), f"c{index}", once))

    try:
        async with anyio.create_task_group() as group:
            for index in range(2):
                group.start_soon(claim, index)
        assert sum(isinstance(result, RefusedAt) for result in results) == 1
        # Both judged at the same sequence: one publish conflicted and was judged again.
        assert sum(log.metrics.publish_conflicts for log in logs) == 1
        stream.available = False
        with pytest.raises(ClusterError):
            await rooms[0].submit(b"\x00\x00", "down", once)
    finally:
        for room in rooms:
            await room.close()
