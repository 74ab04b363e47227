"""Two cluster nodes writing one room: one order, judged against caught-up copies."""

from __future__ import annotations

import anyio
import pytest
from pycrdt import Doc, Map, Text

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.room import ClusterRoom, RefusedAt
from crdtchat.cluster.roomlog import Appended, LogEntry, RoomLog
from crdtchat.wire import decode_state_vector

pytestmark = pytest.mark.anyio

ROOM = "race"


def first_claim_only(doc: Doc, update: bytes) -> str | None:
    """A check that needs one order of writes, as a duplicate message id does: the room's
    `claim` may be set once."""
    if "winner" in doc.get("claim", type=Map):
        return "already claimed"
    return None


def claim(name: str, client_id: int) -> bytes:
    doc: Doc = Doc(client_id=client_id)
    doc.get("claim", type=Map)["winner"] = name
    return doc.get_update()


async def race(
    conn_a: ClusterConnection, conn_b: ClusterConnection, name: str, round_: int
) -> dict[str, Appended | RefusedAt]:
    """Nodes a and b claim room `name` at once; both copies end with the one accepted claim."""
    rooms = {"a": ClusterRoom(RoomLog(conn_a), name), "b": ClusterRoom(RoomLog(conn_b), name)}
    results: dict[str, Appended | RefusedAt] = {}

    async def submit(node: str, client: int) -> None:
        update = claim(node, client)
        results[node] = await rooms[node].submit(update, f"{node}-{round_}", first_claim_only)

    for room in rooms.values():
        await room.open()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(submit, "a", 1000 + round_)
            group.start_soon(submit, "b", 2000 + round_)
        winner = next(node for node, result in results.items() if isinstance(result, Appended))
        for room in rooms.values():
            await room.caught_up()
            assert room.doc.get("claim", type=Map)["winner"] == winner
    finally:
        for room in rooms.values():
            await room.close()
    return results


async def test_concurrent_checks_on_two_nodes_accept_exactly_one_write(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    delivered: dict[str, list[int]] = {"a": [], "b": []}

    def recorder(node: str):
        async def record(entry: LogEntry) -> None:
            delivered[node].append(entry.seq)

        return record

    node_a = ClusterRoom(RoomLog(connection), ROOM, on_entry=recorder("a"))
    node_b = ClusterRoom(RoomLog(second), ROOM, on_entry=recorder("b"))
    await node_a.open()
    await node_b.open()
    try:
        for round_ in range(5):  # five races, each for a fresh room's claim
            results = await race(connection, second, f"{ROOM}-{round_}", round_)
            accepted = [node for node, result in results.items() if isinstance(result, Appended)]
            refused = [result for result in results.values() if isinstance(result, RefusedAt)]
            assert len(accepted) == 1 and len(refused) == 1
            assert refused[0].reason == "already claimed"

        # Peers get only what the stream delivered, the same order on both nodes.
        for index in range(10):
            writer = node_a if index % 2 else node_b
            doc: Doc = Doc(client_id=3000 + index)
            doc.get("log", type=Text).insert(0, str(index))
            await writer.submit(doc.get_update(), f"w{index}", lambda _doc, _update: None)
        await node_a.caught_up()
        await node_b.caught_up()
        assert delivered["a"] == delivered["b"] and len(delivered["a"]) == 10
        assert decode_state_vector(node_a.doc.get_state()) == decode_state_vector(
            node_b.doc.get_state()
        )
        assert len(str(node_a.doc.get("log", type=Text))) == 10
    finally:
        await node_a.close()
        await node_b.close()


async def test_a_room_compacts_itself_and_a_late_joiner_gets_everything(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    node = ClusterRoom(RoomLog(connection), "compacting", compact_updates=10)
    await node.open()
    writer: Doc = Doc(client_id=77)
    text = writer.get("t", type=Text)
    try:
        for index in range(35):
            before = writer.get_state()
            text += f"{index};"
            result = await node.submit(writer.get_update(before), f"c{index}", lambda d, u: None)
            assert isinstance(result, Appended)
        await node.caught_up()
        with anyio.fail_after(10):
            while node.updates_since_snapshot >= 10:  # the roll-up after the 30th is delivered
                await node.wait_for_seq(node.seq + 1)
    finally:
        await node.close()
    state = await RoomLog(second).load("compacting")
    assert state.snapshot is not None
    assert len(state.entries) <= 10
    late = ClusterRoom(RoomLog(second), "compacting")
    await late.open()
    try:
        assert str(late.doc.get("t", type=Text)) == "".join(f"{i};" for i in range(35))
    finally:
        await late.close()
