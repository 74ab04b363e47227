"""A relay node in cluster mode: the relay's room shell with its rooms in JetStream.

`crdtchat serve --nats URLS` runs the ordinary relay (connections, the protocol core, HTTP)
with three things swapped (docs/cluster.md):

- `ClusterStore` stands where the SQLite `Store` stands. `load` reads a room's snapshot and
  tail from its subject. `append` publishes an accepted update conditionally on the room
  subject's last sequence this node knows (a per-room chain: one publish in flight per room,
  each naming the sequence the previous one got) with a unique `Nats-Msg-Id`; its future
  resolves on JetStream's acknowledgement, the durable point, which is when the protocol core
  acknowledges the write and broadcasts it. A conflict (another node wrote first) is settled
  by the follower: the node withdraws what it judged and has not stored
  (`RoomProtocol.withdraw`), applies the other node's write, and judges its own again
  (`resubmit`), so a check never races a write on another node and no peer is disconnected.
  `compact` rolls the room up conditionally; a conflict just skips that compaction.
- `ClusterRoomShell` is the relay's `Room` plus a follower of the room's subject: what other
  nodes stored is applied unjudged (`RoomProtocol.apply_stored`) and broadcast to this node's
  peers, in stream order. This node's own messages coming back are recognised by their id.
  A foreign message arriving while one of this node's publishes is still unacknowledged means
  that publish will conflict: the node withdraws, catches up and judges again at once.
- the feed reads and writes the KV bucket, and every node tells its feed subscribers about a
  room that starts waiting anywhere; blobs live in the object store; `/healthz` says when NATS
  is away and `/metrics` adds the `crdtchat_nats_*` figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import broadcast

from crdtchat.cluster.cursor import (
    MAX_ROLLUPS_SKIPPED,
    Consumed,
    RoomCursor,
    publish_after_rollup,
)
from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.cluster.metrics import ClusterMetrics
from crdtchat.cluster.node import ClusterNode
from crdtchat.cluster.roomlog import Appended, Follower
from crdtchat.relay.feed import WaitingFeed
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.protocol import Action, Broadcast
from crdtchat.relay.room import Room, RoomManager, RoomState
from crdtchat.relay.store import StoredRoom, StoreError
from crdtchat.wire import (
    MESSAGE_AWARENESS,
    AwarenessEntry,
    AwarenessMessage,
    decode_frame,
    encode_awareness,
)
from crdtchat.worker.feed import encode_room_waiting

log = logging.getLogger("crdtchat.cluster.relay")
COMPACT = (",", ":")  # JSON as y-protocols writes it
AWARENESS_TAG = bytes([MESSAGE_AWARENESS])  # the first byte of an encoded awareness message
# How long a refused publish waits for the follower to hand over the write it conflicted with
# (then the node judges again); past it, the room fails as on a store failure.
CONFLICT_WAIT = 30.0


class Withdrawn(StoreError):
    """A write this node judged was taken back after a conflict, to be judged again."""


@dataclass
class _RoomStream(RoomCursor):
    """This node's knowledge of one loaded room's subject, with the publishes in flight."""

    # msg id -> the store future of this node's write, until it is stored
    pending: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    chain: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: str | None = None  # a publish failed: later ones must not land without it
    withdrawn: asyncio.Event = field(default_factory=asyncio.Event)  # set when epoch moves on

    def withdraw(self) -> None:
        """Void every unacknowledged write of this node (the core judges them again)."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Withdrawn("withdrawn after a conflict"))
        self.pending.clear()
        super().withdraw()
        self.withdrawn.set()
        self.withdrawn = asyncio.Event()


class ClusterStore:
    """The relay's store interface (crdtchat/relay/store.py) on JetStream."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.log = node.rooms
        self.rooms: dict[str, _RoomStream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        """Run `coroutine` in the background, kept referenced until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def health(self) -> str | None:
        metrics = self.node.metrics
        if not metrics.connected:
            return f"NATS disconnected ({metrics.last_error or 'reconnecting'})"
        return None

    async def load(self, room: str) -> StoredRoom:
        try:
            state = await self.log.load(room)
        except ClusterError as error:
            raise StoreError(str(error)) from error
        self.rooms[room] = _RoomStream(node_id=self.node.node_id, last=state.seq)
        updates = state.updates
        return StoredRoom(
            state=state.merged(),
            log_length=len(updates),
            log_bytes=sum(len(entry.data) for entry in updates),
            next_seq=1,
        )

    def append(self, room: str, seq: int, update: bytes) -> asyncio.Future[None]:
        stream = self.rooms[room]
        msg_id = stream.msg_id(seq)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a withdrawn write's exception is nobody's error
        stream.pending[msg_id] = future
        self.spawn(self._publish(room, stream, seq, update, msg_id, future, stream.epoch))
        return future

    async def _publish(
        self,
        room: str,
        stream: _RoomStream,
        seq: int,
        update: bytes,
        msg_id: str,
        future: asyncio.Future[None],
        epoch: int,
    ) -> None:
        async with stream.chain:
            if epoch != stream.epoch:
                return  # withdrawn while it waited for the chain: judged again, published anew
            if stream.broken is not None:
                stream.pending.pop(msg_id, None)
                if not future.done():
                    future.set_exception(StoreError(stream.broken))
                return
            withdrawn = stream.withdrawn
            try:
                appended = await self._append_over_rollups(room, stream, update, msg_id)
            except SequenceConflict as conflict:
                # Another node wrote first: its write reaches the follower, which withdraws
                # this one and has it judged again. The chain waits, so that no later write
                # judged after this one is published meanwhile.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(withdrawn.wait(), CONFLICT_WAIT)
                    return
                error: Exception = StoreError(f"another node wrote room {room} first: {conflict}")
            except ClusterError as exc:
                error = StoreError(str(exc))
            else:
                stream.pending.pop(msg_id, None)
                stream.published(seq, appended.seq)
                if not future.done():
                    future.set_result(None)
                return
            stream.broken = str(error)
            stream.pending.pop(msg_id, None)
            if not future.done():
                future.set_exception(error)

    async def _append_over_rollups(
        self, room: str, stream: _RoomStream, update: bytes, msg_id: str
    ) -> Appended:
        """Publish on the condition of `stream.last`; a roll-up of exactly that state by
        another node changed nothing the update was judged against: publish after it."""
        expected = stream.last
        for _ in range(MAX_ROLLUPS_SKIPPED):
            try:
                return await self.log.append(
                    room, update, expected_seq=expected, msg_id=msg_id, deadline=30.0
                )
            except SequenceConflict:
                after = publish_after_rollup(await self.log.last_entry(room), expected)
                if after is None:
                    raise
                expected = after
        raise SequenceConflict(room, expected, None)

    def compact(self, room: str, upto_seq: int, snapshot: bytes) -> asyncio.Future[None]:
        stream = self.rooms[room]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.spawn(self._compact(room, stream, upto_seq, snapshot, future))
        return future

    async def _compact(
        self,
        room: str,
        stream: _RoomStream,
        upto_seq: int,
        snapshot: bytes,
        future: asyncio.Future[None],
    ) -> None:
        async with stream.chain:  # after the append of `upto_seq`
            covers = stream.compaction_covers(upto_seq)
            if covers is not None:
                try:
                    stream.last = await self.log.compact(room, snapshot, upto_seq=covers)
                except SequenceConflict:
                    log.info("room %s: written meanwhile, compaction skipped", room)
                except ClusterError as exc:
                    log.warning("room %s: compaction failed: %s", room, exc)
        if not future.done():
            future.set_result(None)

    def set_waiting(self, room: str, waiting: bool) -> asyncio.Future[None]:
        stream = self.rooms.get(room)
        seq = stream.last if stream is not None else 0
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def write() -> None:
            with contextlib.suppress(ClusterError):
                await self.node.feed.set_waiting(room, waiting, seq=seq)
            future.set_result(None)

        self.spawn(write())
        return future

    async def waiting_rooms(self) -> list[str]:
        try:
            return sorted(await self.node.feed.waiting_rooms())
        except ClusterError as exc:
            raise StoreError(str(exc)) from exc

    def forget(self, room: str) -> None:
        self.rooms.pop(room, None)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class ClusterRoomShell(Room):
    """The relay's room shell, fed also by the room's subject (other nodes' writes) and by the
    presence of other nodes' peers, to which it publishes its own peers' presence."""

    store: ClusterStore  # type: ignore[assignment]
    _applying_remote_presence = False

    def perform(self, actions: list[Action]) -> None:
        super().perform(actions)
        if self._applying_remote_presence:
            return  # what another node published goes no further than this node's peers
        for action in actions:
            if isinstance(action, Broadcast) and action.message[:1] == AWARENESS_TAG:
                for message in decode_frame(action.message):
                    if isinstance(message, AwarenessMessage):
                        self.store.spawn(
                            self.store.node.presence.publish(self.name, message.payload)
                        )

    def answer_presence_query(self) -> None:
        """Another node loaded this room: publish the presence of this node's own peers."""
        core = self.core
        states, meta = core.awareness.states, core.awareness.meta
        entries = [
            AwarenessEntry(cid, int(meta[cid]["clock"]), json.dumps(state, separators=COMPACT))
            for cid in core.awareness_owners
            if (state := states.get(cid)) is not None and cid in meta
        ]
        if entries:
            payload = encode_awareness(entries)
            self.store.spawn(self.store.node.presence.publish(self.name, payload))

    def apply_remote_presence(self, update: bytes) -> None:
        """Presence from another node's peers (or their removal when that node died)."""
        self._applying_remote_presence = True
        try:
            self.perform(self.core.remote_awareness(update))
        finally:
            self._applying_remote_presence = False

    async def _run(self, task_status: Any) -> None:
        async def follow_when_loaded() -> None:
            await self.ready.wait()
            stream = self.store.rooms.get(self.name)
            if stream is None or self.error is not None:
                return
            follower = self.store.log.follow(self.name, after_seq=stream.last)
            presence = self.store.node.presence
            try:
                await presence.join(self.name)
                await follower.start()
                await self.structure_ready.wait()  # remote writes are indexed like local ones
                await self._follow(follower, stream)
            except ClusterError as exc:
                self.fail(f"following the room's stream failed: {exc}")
            finally:
                await follower.close()
                await presence.leave(self.name)

        follower_task: asyncio.Task[None] = asyncio.ensure_future(follow_when_loaded())
        try:
            await super()._run(task_status)
        finally:
            follower_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower_task
            self.store.forget(self.name)

    async def _follow(self, follower: Follower, stream: _RoomStream) -> None:
        async for entry in follower:
            if self.core.failed:
                return
            consumed = stream.consume(entry)
            if consumed is Consumed.OWN:  # this node's write, handed back: it is stored
                future = stream.pending.pop(entry.msg_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
                    # its done callback (the core's `stored`) runs before the next entry
                    await asyncio.sleep(0)
                continue
            if consumed is Consumed.KNOWN:
                continue
            core = self.core
            # Writes acknowledged a moment ago may not have reached the core yet (their
            # callbacks run on the next turn of the loop): only what is unacknowledged is
            # withdrawn.
            for _ in range(100):
                if core.last_seq - core.durable_seq <= len(stream.pending):
                    break
                await asyncio.sleep(0)
            self.perform(stream.apply_foreign(entry, core, time.time()))
            # The relay's own writes judged again have new numbers, or a refusal.
            self.writes_settled.notify()

    def _stored(self, seq: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and isinstance(future.exception(), Withdrawn):
            return  # judged again under a new sequence
        super()._stored(seq, future)


class ClusterRelayMetrics(Metrics):
    """The relay's counters, then the node's NATS figures."""

    cluster: ClusterMetrics | None = None

    def render(self) -> str:
        text = super().render()
        return text if self.cluster is None else text + self.cluster.render()


async def relay_presence(node: ClusterNode, rooms: RoomManager) -> None:
    """Hand presence from other nodes (and removals for nodes gone silent) to loaded rooms."""
    async for event in node.presence.events():
        room = rooms.rooms.get(event.room)
        if not isinstance(room, ClusterRoomShell) or room.state is not RoomState.OPEN:
            continue
        if event.query:
            room.answer_presence_query()
        else:
            room.apply_remote_presence(event.update)


async def relay_feed_from_kv(node: ClusterNode, feed: WaitingFeed) -> None:
    """Tell this node's feed subscribers of every room that starts waiting, on any node."""
    known: dict[str, bool] = {}
    while True:
        try:
            async for change in node.feed.watch():
                if change.waiting and not known.get(change.room) and feed.subscribers:
                    broadcast(feed.subscribers, encode_room_waiting(change.room))
                known[change.room] = change.waiting
        except ClusterError as exc:
            log.warning("feed watch failed, watching again: %s", exc)
        await asyncio.sleep(1.0)
