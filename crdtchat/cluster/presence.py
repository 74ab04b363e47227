"""Presence across nodes on plain NATS subjects, never stored in the stream.

Awareness changes every few seconds per client and matters only while the client is there, so
it travels on core NATS (at most once, no storage), unlike the document (yhub issue 64: a
presence room stored as a stream grew to 1.56 M messages). Each node:

- publishes the awareness updates its own clients make on `<prefix>.presence.<room token>`,
  with its node id in a header, and applies (then broadcasts to its clients) what other nodes
  publish for the rooms it has joined;
- asks, when it joins a room, the other nodes to publish their states for it again (a "query"),
  so its clients see who is there without waiting for their next renewal;
- beats on `<prefix>.nodes.heartbeat` every `interval` seconds, and forgets a node it has not
  heard for `timeout` seconds: every awareness state that node introduced is removed with an
  update of null states, one clock later, which the node applies and broadcasts like any other.
  A node that stops cleanly says so in its last beat, and its peers vanish at once.

What arrives is handed out as `PresenceEvent`s from `events()`: an awareness update to apply to
a room, or a query to answer by publishing this node's own states for the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.names import room_from_token
from crdtchat.wire import AwarenessEntry, WireError, decode_awareness, encode_awareness

log = logging.getLogger("crdtchat.cluster.presence")

NODE_HEADER = "Crdtchat-Node"
KIND_HEADER = "Crdtchat-Presence"
QUERY = "query"
HEARTBEAT_INTERVAL = 1.0
NODE_TIMEOUT = 3.0


@dataclass(frozen=True)
class PresenceEvent:
    room: str
    node: str
    update: bytes = b""  # an awareness update to apply and broadcast; b"" for a query
    query: bool = False


@dataclass
class _Node:
    last_seen: float
    rooms: dict[str, dict[int, int]] = field(default_factory=dict)  # room -> client id -> clock


class PresenceBus:
    def __init__(
        self,
        connection: ClusterConnection,
        node_id: str,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        timeout: float = NODE_TIMEOUT,
    ) -> None:
        self.connection = connection
        self.names = connection.names
        self.node_id = node_id
        self.interval = interval
        self.timeout = timeout
        self._nodes: dict[str, _Node] = {}
        self._rooms: dict[str, Subscription] = {}
        self._events: asyncio.Queue[PresenceEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._heartbeats: Subscription | None = None
        self._beats: dict[str, int] = {}  # node -> heartbeats heard from it
        self._heard = asyncio.Condition()

    async def start(self) -> None:
        nc = self.connection.nc
        self._heartbeats = await nc.subscribe(self.names.heartbeat_subject, cb=self._on_heartbeat)
        await nc.flush()
        self._tasks = [
            asyncio.create_task(self._beat(), name=f"presence heartbeat {self.node_id}"),
            asyncio.create_task(self._reap(), name=f"presence reaper {self.node_id}"),
        ]
        await self._send_beat(leaving=False)

    async def close(self, *, goodbye: bool = True) -> None:
        """Stop; `goodbye` tells the other nodes to drop this node's peers now."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if goodbye:
            with contextlib.suppress(nats.errors.Error):
                await self._send_beat(leaving=True)
                await self.connection.nc.flush(timeout=2)
        subscriptions = [self._heartbeats, *self._rooms.values()]
        self._rooms.clear()
        self._heartbeats = None
        for subscription in subscriptions:
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def join(self, room: str) -> None:
        """Hear this room's presence from other nodes, and ask them for their current states."""
        if room in self._rooms:
            return
        subject = self.names.presence_subject(room)
        nc = self.connection.nc
        self._rooms[room] = await nc.subscribe(subject, cb=self._on_presence)
        # The local server has the interest once flushed; a beat sent after it reaches another
        # node only after the interest did (a route keeps its order), see `wait_for_beats`.
        await nc.flush()
        await self._send_beat(leaving=False)
        await nc.publish(subject, b"", headers={NODE_HEADER: self.node_id, KIND_HEADER: QUERY})

    async def leave(self, room: str) -> None:
        subscription = self._rooms.pop(room, None)
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        for node in self._nodes.values():
            node.rooms.pop(room, None)

    async def publish(self, room: str, update: bytes) -> None:
        """An awareness update this node's clients made in `room`, for the other nodes."""
        with contextlib.suppress(nats.errors.Error):  # at most once, like the awareness itself
            await self.connection.nc.publish(
                self.names.presence_subject(room), update, headers={NODE_HEADER: self.node_id}
            )

    def nodes(self) -> set[str]:
        """The other nodes heard within `timeout`."""
        return set(self._nodes)

    def remote_clients(self, room: str) -> dict[int, str]:
        """Awareness client id -> the node that introduced it, for `room`."""
        return {
            client: node_id
            for node_id, node in self._nodes.items()
            for client in node.rooms.get(room, {})
        }

    def beats_heard(self, node_id: str) -> int:
        return self._beats.get(node_id, 0)

    async def wait_for_beats(self, node_id: str, count: int, timeout: float) -> None:
        """Until `count` beats of `node_id` were heard: then whatever that node subscribed to
        before its `count`th beat reaches it from here."""
        async with asyncio.timeout(timeout), self._heard:
            await self._heard.wait_for(lambda: self.beats_heard(node_id) >= count)

    async def events(self) -> AsyncIterator[PresenceEvent]:
        while True:
            yield await self._events.get()

    async def next_event(self, timeout: float | None = None) -> PresenceEvent:
        return await asyncio.wait_for(self._events.get(), timeout)

    # Receiving

    def _seen(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(last_seen=time.monotonic())
            log.info("node %s heard", node_id)
            self.connection.metrics.presence_nodes = len(self._nodes)
        node.last_seen = time.monotonic()
        return node

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = json.loads(msg.data)
            node_id = str(beat["node"])
            leaving = bool(beat.get("leaving"))
        except (ValueError, KeyError, TypeError):
            return
        if node_id == self.node_id:
            return
        self._seen(node_id)
        self._beats[node_id] = self._beats.get(node_id, 0) + 1
        async with self._heard:
            self._heard.notify_all()
        if leaving:
            self._forget(node_id, "left")

    async def _on_presence(self, msg: Msg) -> None:
        headers = msg.headers or {}
        node_id = headers.get(NODE_HEADER)
        if not node_id or node_id == self.node_id:
            return
        try:
            room = room_from_token(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        node = self._seen(node_id)
        if headers.get(KIND_HEADER) == QUERY:
            self._events.put_nowait(PresenceEvent(room=room, node=node_id, query=True))
            return
        try:
            entries = decode_awareness(msg.data)
        except WireError:
            log.warning("node %s sent a malformed awareness update for %s", node_id, room)
            return
        clients = node.rooms.setdefault(room, {})
        for entry in entries:
            if entry.removed:
                clients.pop(entry.client_id, None)
            else:
                clients[entry.client_id] = entry.clock
        self._events.put_nowait(PresenceEvent(room=room, node=node_id, update=msg.data))

    def _forget(self, node_id: str, why: str) -> None:
        node = self._nodes.pop(node_id, None)
        self.connection.metrics.presence_nodes = len(self._nodes)
        if node is None:
            return
        log.info("node %s %s: removing its peers from %d rooms", node_id, why, len(node.rooms))
        for room, clients in node.rooms.items():
            if not clients:
                continue
            removal = encode_awareness(
                AwarenessEntry(client_id=client, clock=clock + 1, state="null")
                for client, clock in clients.items()
            )
            self._events.put_nowait(PresenceEvent(room=room, node=node_id, update=removal))

    # Beating

    async def _send_beat(self, *, leaving: bool) -> None:
        body = json.dumps({"node": self.node_id, "leaving": leaving}).encode()
        await self.connection.nc.publish(self.names.heartbeat_subject, body)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(nats.errors.Error):
                await self._send_beat(leaving=False)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.interval / 2)
            silent_since = time.monotonic() - self.timeout
            for node_id in [n for n, node in self._nodes.items() if node.last_seen < silent_since]:
                self._forget(node_id, f"silent for {self.timeout} s")
