"""Two relay nodes writing one room at once (issue 13, "Message path"): a node whose
conditional publish meets the other node's write catches up and judges its writes again; no
peer is disconnected, every acknowledged write is on both nodes, and a write that became
invalid meanwhile (its message id taken by the other node's write) is refused as usual."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from pycrdt import Doc, Map

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.names import Names
from crdtchat.cluster.node import ClusterNode
from crdtchat.cluster.relaynode import ClusterRelayMetrics, ClusterRoomShell, ClusterStore
from crdtchat.cluster.roomlog import RoomLog
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.membership import AccessError, MemberChange, change_member, claim_owner
from crdtchat.relay.room import RoomManager
from crdtchat.schema import MEMBERS, MESSAGES
from tests.support.nats import NatsCluster, relay_nodes
from tests.support.relay import (
    RawClient,
    RelayProcess,
    declare_roots,
    message_map,
    metric,
    raw_client,
    token,
)

pytestmark = pytest.mark.anyio

ROOM = "contended.rejudge"
WRITES = 40  # per writer, sent without waiting: many publishes in flight on both nodes
CLASHES = 4  # rounds of two writes of one message id, one on each node


@pytest.fixture
def nodes(cluster: NatsCluster, names: Names, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    with relay_nodes(cluster, names.prefix, tmp_path, 2) as relays:
        yield relays


def url(relay: RelayProcess, sub: str, role: str = "writer") -> str:
    return relay.url(ROOM, token(ROOM, role, sub), ack=True)


def ids(client: RawClient) -> list[str]:
    return [str(message["id"]) for message in client.messages]


async def test_concurrent_writers_on_two_nodes_are_judged_again_not_disconnected(
    nodes: list[RelayProcess],
) -> None:
    a, b = nodes
    clients: list[RawClient] = []
    clash_results: list[tuple[list[str], list[str]]] = []
    async with (
        raw_client(url(a, "alice")) as alice,
        raw_client(url(b, "bob")) as bob,
    ):
        clients += [alice, bob]

        async def write(client: RawClient, name: str) -> None:
            for index in range(WRITES):
                await client.push(
                    lambda doc, index=index: client.messages.append(
                        message_map(f"{name}-{index}", "user", name, f"{name} {index}")
                    )
                )
                if index % 8 == 0:
                    await anyio.sleep(0)

        async def clash(round_: int) -> None:
            # Fresh documents: a refused write stays in its client's copy, and later writes of
            # that client would build on it.
            async with (
                raw_client(url(a, "carol"), doc=Doc()) as carol,
                raw_client(url(b, "dave"), doc=Doc()) as dave,
            ):
                clients.extend((carol, dave))
                async with anyio.create_task_group() as group:
                    for client, name in ((carol, "carol"), (dave, "dave")):
                        group.start_soon(
                            client.push,
                            lambda doc, client=client, name=name: client.messages.append(
                                message_map(f"dup-{round_}", "user", name, name)
                            ),
                        )
                for client in (carol, dave):
                    await client.wait_acked(timeout=60)  # its sync step 2 and its write
                clash_results.append((carol.denied, dave.denied))
                assert not carol.closed and not dave.closed

        async with anyio.create_task_group() as group:
            group.start_soon(write, alice, "alice")
            group.start_soon(write, bob, "bob")
            for round_ in range(CLASHES):
                group.start_soon(clash, round_)
        for client in (alice, bob):
            await client.wait_acked(timeout=120)
            assert client.denied == [], "a valid write judged again is accepted"
        for client in clients:
            assert client.close_code != 1011, f"a peer was closed: {client.close_reason}"
        assert not alice.closed and not bob.closed

    # Exactly one of each clashing pair was accepted; the other got the normal refusal.
    for carol_denied, dave_denied in clash_results:
        denied = carol_denied + dave_denied
        assert len(denied) == 1 and "is taken by another message" in denied[0], denied

    # Every acknowledged write is on both nodes, and both nodes hold the same document.
    expected = {f"{n}-{i}" for n in ("alice", "bob") for i in range(WRITES)}
    expected |= {f"dup-{r}" for r in range(CLASHES)}
    seen = []
    for relay in (a, b):
        async with raw_client(url(relay, "reader", "reader")) as reader:
            await reader.wait_for(lambda reader=reader: set(ids(reader)) >= expected, 30)
            seen.append(sorted(ids(reader)))
    assert seen[0] == seen[1] == sorted(expected), "each write once, the same on both nodes"

    conflicts = sum(metric(r, "crdtchat_nats_publish_conflicts_total") for r in nodes)
    withdrawn = sum(metric(r, "crdtchat_updates_withdrawn_total") for r in nodes)
    assert conflicts >= 1 and withdrawn >= 1, (conflicts, withdrawn)


# -- the relay's own membership write, judged again (in-process, on the real NATS cluster) ---


@pytest.fixture
async def node_rooms(
    cluster: NatsCluster, names: Names, tmp_path: Path
) -> AsyncIterator[tuple[RoomManager, ClusterStore]]:
    """One relay node's rooms in this process: the shell and store `crdtchat serve --nats`
    runs, without the websocket server."""
    node = await ClusterNode.start(cluster.urls, data=tmp_path, max_blob_size=1 << 20, names=names)
    store = ClusterStore(node)
    config = RelayConfig(secret="s" * 32, data=tmp_path)
    rooms = RoomManager(store, ClusterRelayMetrics(), config, room_class=ClusterRoomShell)
    try:
        async with anyio.create_task_group() as group:
            await group.start(rooms.run)
            yield rooms, store
            rooms.close()
    finally:
        await node.stop()


async def test_a_membership_change_withdrawn_after_a_conflict_is_decided_again(
    node_rooms: tuple[RoomManager, ClusterStore], second: ClusterConnection
) -> None:
    """An owner's change (POST /rooms/<room>/members) meets another node's write: its publish
    is withdrawn, and the change is decided again against the room with that write: stored
    when it still may be made, refused with the real reason when not (never "relay storage
    failed")."""
    rooms, store = node_rooms
    room_name = "rejudge.members"
    room = await rooms.acquire(room_name)
    try:
        await room.structure_ready.wait()
        await room.write_access(lambda _doc: claim_owner("owner@x"))
        other_node = RoomLog(second)

        async def change_meeting_a_foreign_write(sub: str, foreign: bytes) -> AccessError | None:
            """Make the owner's change while another node writes `foreign` first; what the
            HTTP caller would get: None (stored) or the refusal."""
            refusal: list[AccessError] = []

            def add(doc: Doc) -> object:
                return change_member(doc, "owner@x", MemberChange(sub=sub, role="writer"))

            async def change() -> None:
                try:
                    await room.write_access(add)
                except AccessError as error:
                    refusal.append(error)

            withdrawn = room.metrics.updates_withdrawn
            stream = store.rooms[room_name]
            async with anyio.create_task_group() as group, stream.chain:
                # this node's publish waits for the chain: the other node's write lands first
                group.start_soon(change)
                last = await other_node.last_seq(room_name)
                await other_node.append(room_name, foreign, expected_seq=last, msg_id=sub)
                with anyio.fail_after(15):
                    while room.metrics.updates_withdrawn == withdrawn:
                        await room.writes_settled.wait()
            return refusal[0] if refusal else None

        elsewhere = Doc()
        declare_roots(elsewhere)[MESSAGES].append(message_map("m-1", "user", "carol", "hi"))
        assert await change_meeting_a_foreign_write("bob@x", elsewhere.get_update()) is None
        assert room.role_for("bob@x") == "writer", "decided again and stored"

        far = Doc()
        far.apply_update(room.live.doc.get_update())
        before = far.get_state()
        del far.get(MEMBERS, type=Map)["owner@x"]  # the other node's owner left the room
        refused = await change_meeting_a_foreign_write("dave@x", far.get_update(before))
        assert refused is not None and refused.status == 403 and "owner" in refused.reason
        assert room.role_for("dave@x") is None
    finally:
        room.release()
