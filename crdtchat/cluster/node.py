"""A relay node's whole NATS side, started and stopped as one: what `crdtchat serve --nats` holds.

`ClusterNode.start` connects (checking the stream's replicas), opens the waiting feed, the blob
store and the presence bus under one node id, and shares one `ClusterMetrics` among them, so
`/healthz` and `/metrics` read one object. Rooms are opened on demand (`open_room`), each a
`ClusterRoom` fed by its own follower.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdtchat.cluster.blobs import ClusterBlobStore
from crdtchat.cluster.connection import ClusterConnection, connect
from crdtchat.cluster.feed import WaitingFeed
from crdtchat.cluster.metrics import ClusterMetrics
from crdtchat.cluster.names import Names
from crdtchat.cluster.presence import PresenceBus
from crdtchat.cluster.room import ClusterRoom
from crdtchat.cluster.roomlog import LogEntry, RoomLog

log = logging.getLogger("crdtchat.cluster")


@dataclass
class ClusterNode:
    node_id: str
    connection: ClusterConnection
    rooms: RoomLog
    feed: WaitingFeed
    blobs: ClusterBlobStore
    presence: PresenceBus

    @property
    def metrics(self) -> ClusterMetrics:
        return self.connection.metrics

    @classmethod
    async def start(
        cls,
        servers: list[str],
        *,
        data: Path,
        max_blob_size: int,
        replicas: int | None = None,
        names: Names | None = None,
        node_id: str | None = None,
        heartbeat: float = 1.0,
        node_timeout: float = 3.0,
        **options: Any,
    ) -> ClusterNode:
        """Connect and open everything; `data` holds only what may be lost (temporary files)."""
        node_id = node_id or f"node-{uuid.uuid4().hex[:12]}"
        connection = await connect(
            servers, names=names, replicas=replicas, node_name=node_id, **options
        )
        try:
            feed = await WaitingFeed.connect(connection)
            blobs = await ClusterBlobStore.connect(connection, max_blob_size, Path(data) / "tmp")
            presence = PresenceBus(connection, node_id, interval=heartbeat, timeout=node_timeout)
            await presence.start()
        except BaseException:
            await connection.close()
            raise
        log.info(
            "node %s on NATS %s: stream %s, %d replicas",
            node_id,
            ",".join(servers),
            connection.names.stream,
            connection.replicas,
        )
        return cls(node_id, connection, RoomLog(connection), feed, blobs, presence)

    async def open_room(
        self,
        room: str,
        on_entry: Callable[[LogEntry], Awaitable[None]] | None = None,
        **limits: int,
    ) -> ClusterRoom:
        """A room's copy, caught up with the stream and following it; join its presence."""
        cluster_room = ClusterRoom(self.rooms, room, on_entry=on_entry, **limits)
        await cluster_room.open()
        await self.presence.join(room)
        return cluster_room

    def health(self) -> dict[str, object]:
        return {"node": self.node_id, **self.metrics.health()}

    async def stop(self) -> None:
        """Say goodbye (peers drop this node's presence at once) and close the connection."""
        await self.presence.close(goodbye=True)
        await self.connection.close()
