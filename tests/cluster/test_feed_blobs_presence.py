"""The worker feed, blobs and presence across two connections on the real NATS cluster."""

from __future__ import annotations

import hashlib
import time

import anyio
import pytest

from crdtchat.cluster.blobs import ClusterBlobStore
from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.feed import FeedChange, WaitingFeed
from crdtchat.cluster.presence import PresenceBus
from crdtchat.relay.blobs import HttpRefusal
from crdtchat.wire import AwarenessEntry, decode_awareness, encode_awareness

pytestmark = pytest.mark.anyio


async def test_a_room_waiting_on_one_node_is_in_the_feed_of_another(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    here = await WaitingFeed.connect(connection)
    there = await WaitingFeed.connect(second)
    assert await here.set_waiting("room.one", True, seq=5)
    assert await there.waiting_rooms() == {"room.one"}

    changes = there.watch()
    assert await anext(changes) == FeedChange("room.one", True, 5)
    assert await here.set_waiting("room_two", True, seq=3)
    assert await anext(changes) == FeedChange("room_two", True, 3)
    # The room was answered at seq 9; a write about seq 7 from a slower node must not undo it.
    assert await here.set_waiting("room.one", False, seq=9)
    assert await anext(changes) == FeedChange("room.one", False, 9)
    assert not await there.set_waiting("room.one", True, seq=7)
    await changes.aclose()
    assert await there.waiting_rooms() == {"room_two"}


async def test_a_blob_uploaded_through_one_connection_is_served_through_another(
    connection: ClusterConnection, second: ClusterConnection, tmp_path
) -> None:
    body = bytes(range(256)) * 2000  # 512 000 bytes: several object-store chunks
    sha = hashlib.sha256(body).hexdigest()
    uploader = await ClusterBlobStore.connect(connection, max_size=1 << 20, temp=tmp_path / "a")
    server = await ClusterBlobStore.connect(second, max_size=1 << 20, temp=tmp_path / "b")

    upload = await uploader.begin("room-a", sha)
    await upload.write([body[:1000], body[1000:]])
    await upload.finish()

    file = await server.open("room-a", sha)
    assert file is not None
    with file:
        assert file.read() == body
    # Knowing the hash is not enough: another room never had it uploaded.
    assert await server.open("room-b", sha) is None

    wrong = await uploader.begin("room-b", hashlib.sha256(b"other").hexdigest())
    await wrong.write([b"not other"])
    with pytest.raises(HttpRefusal) as refused:
        await wrong.finish()
    assert refused.value.status == 400
    big = await uploader.begin("room-b", sha)
    with pytest.raises(HttpRefusal) as too_big:
        await big.write([body, body, body])
    assert too_big.value.status == 413
    big.discard()
    assert await server.open("room-b", sha) is None


async def test_presence_crosses_nodes_and_clears_when_a_node_stops_beating(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    node_a = PresenceBus(connection, "node-a", interval=0.2, timeout=0.8)
    node_b = PresenceBus(second, "node-b", interval=0.2, timeout=0.8)
    await node_a.start()
    await node_b.start()
    try:
        await node_b.join("room.p")
        # Once A hears a beat B sent after joining, B's interest in the room has reached A's
        # server (core NATS keeps no message for a subscriber that is not there yet).
        await node_a.wait_for_beats("node-b", node_a.beats_heard("node-b") + 1, timeout=5)
        await node_a.join("room.p")
        query = await node_b.next_event(5)  # A joined: B is asked to publish its states
        assert (query.room, query.node, query.query) == ("room.p", "node-a", True)

        state = '{"user":"alice","device":"laptop"}'
        await node_a.publish("room.p", encode_awareness([AwarenessEntry(7, 3, state)]))
        seen = await node_b.next_event(5)
        assert (seen.room, seen.node) == ("room.p", "node-a")
        assert decode_awareness(seen.update) == [AwarenessEntry(7, 3, state)]
        assert node_b.remote_clients("room.p") == {7: "node-a"}

        # Node A dies: no goodbye, its heartbeat just stops.
        await node_a.close(goodbye=False)
        stopped = time.monotonic()
        gone = await node_b.next_event(5)
        waited = time.monotonic() - stopped
        assert decode_awareness(gone.update) == [AwarenessEntry(7, 4, "null")]
        assert waited < 0.8 + 0.2 + 0.5  # the timeout, a reaper tick and slack
        assert node_b.remote_clients("room.p") == {}
        assert "node-a" not in node_b.nodes()
        # Presence is never stored: the room stream holds nothing for it.
        with anyio.fail_after(5):
            info = await connection.js.stream_info(connection.names.stream)
        assert info.state.messages == 0
    finally:
        await node_a.close()
        await node_b.close()
