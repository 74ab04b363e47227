"""Two relay nodes' NATS sides started as wholes: rooms, feed, blobs and presence together."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from crdtchat.cluster.names import Names
from crdtchat.cluster.node import ClusterNode
from crdtchat.cluster.roomlog import Appended, LogEntry
from crdtchat.wire import AwarenessEntry, decode_awareness, encode_awareness
from tests.support.nats import NatsCluster

pytestmark = pytest.mark.anyio


async def test_two_nodes_share_rooms_feed_blobs_and_presence(
    cluster: NatsCluster, names: Names, tmp_path: Path
) -> None:
    common = {"max_blob_size": 1 << 20, "names": names, "heartbeat": 0.2}
    node_a = await ClusterNode.start(cluster.urls, data=tmp_path / "a", node_id="a", **common)
    node_b = await ClusterNode.start(cluster.urls[::-1], data=tmp_path / "b", node_id="b", **common)
    try:
        delivered: list[LogEntry] = []

        async def deliver(entry: LogEntry) -> None:
            delivered.append(entry)

        room_b = await node_b.open_room("shared.room", on_entry=deliver)
        # Two beats of b after it joined: its interest in the room's presence has reached a's
        # server (a route keeps its order), so a's query on joining reaches b.
        await node_a.presence.wait_for_beats("b", node_a.presence.beats_heard("b") + 2, 5)
        room_a = await node_a.open_room("shared.room")
        doc: Doc = Doc(client_id=5)
        doc.get("t", type=Text).insert(0, "hello")
        result = await room_a.submit(doc.get_update(), "h1", lambda _doc, _update: None)
        assert isinstance(result, Appended)
        await room_b.wait_for_seq(result.seq)
        assert str(room_b.doc.get("t", type=Text)) == "hello"
        assert [entry.seq for entry in delivered] == [result.seq]

        await node_a.feed.set_waiting("shared.room", True, seq=result.seq)
        assert await node_b.feed.waiting_rooms() == {"shared.room"}

        body = b"file bytes" * 100
        sha = hashlib.sha256(body).hexdigest()
        upload = await node_a.blobs.begin("shared.room", sha)
        await upload.write([body])
        await upload.finish()
        file = await node_b.blobs.open("shared.room", sha)
        assert file is not None
        with file:
            assert file.read() == body

        # Node b's presence in the room, then b stops cleanly: a drops b's peer at once.
        query = await node_b.presence.next_event(5)  # a joined after b: b is asked
        assert query.query and query.node == "a"
        await node_b.presence.publish("shared.room", encode_awareness([AwarenessEntry(9, 1, "{}")]))
        seen = await node_a.presence.next_event(5)
        assert decode_awareness(seen.update) == [AwarenessEntry(9, 1, "{}")]
        await room_b.close()
        await node_b.stop()
        gone = await node_a.presence.next_event(5)
        assert decode_awareness(gone.update) == [AwarenessEntry(9, 2, "null")]
        assert node_a.health()["nats"] == "connected"
        assert "crdtchat_nats_publish_seconds_count 1" in node_a.metrics.render()
        await room_a.close()
    finally:
        await node_a.stop()
        if not node_b.connection.nc.is_closed:
            await node_b.stop()
