"""Rooms: the I/O shell around the relay's protocol core (design §3, `crdtchat.relay.protocol`).

A `Room` holds one conversation's `RoomProtocol` and performs the actions it returns: writes
to the peers' sockets, store writes on the store thread (whose completion it reports back as
`stored`), closes, the worker feed. The protocol decides; this module only carries out, which
is why every function here is small except the websockets fast path (`Room._send_many`).

`RoomManager` loads a room on first use, keeps it while peers are connected and for a grace
period after the last one leaves, then flushes it (compacting its log) and drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from enum import Enum
from functools import partial
from typing import Any, cast

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from crdtchat.errors import StorageError
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.feed import WaitingFeed, WaitingWatch
from crdtchat.relay.livedoc import LiveDoc, build_structure
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.protocol import (
    TOKEN_EXPIRED,
    TOKEN_EXPIRED_CODE,
    Acknowledge,
    Action,
    Append,
    Broadcast,
    CheckWaiting,
    Close,
    CloseKind,
    Compact,
    Decide,
    Peer,
    PeerViolation,
    RoomProtocol,
    Send,
)
from crdtchat.relay.ratelimit import Subject
from crdtchat.relay.store import Store, StoreError
from crdtchat.schema import Member
from crdtchat.signals import Changes
from crdtchat.tokens import TokenClaims
from crdtchat.wire import Ack, encode_message

log = logging.getLogger("crdtchat.relay.room")

# How often presence is checked for clients gone quiet (pycrdt's Awareness: a tenth of its
# 30 s timeout).
AWARENESS_TICK = 3.0


class RoomUnavailable(StorageError):
    """The room cannot be opened now (store failure, relay shutting down)."""


class RoomLimitReached(RoomUnavailable):
    """`max_rooms` rooms are loaded and every one has peers: try again later (close 1013)."""


class RelayPeer(Peer):
    """A peer with its websocket connection: what the shell needs to write to it and close it."""

    __slots__ = ("_expiry", "on_close", "plain", "protocol", "transport", "ws")

    def __init__(
        self,
        ws: ServerConnection,
        claims: TokenClaims,
        subject: Subject,
        config: RelayConfig,
        *,
        want_ack: bool = False,
        want_refresh: bool = False,
        identity: bool = False,
    ) -> None:
        super().__init__(
            claims,
            subject,
            config,
            want_ack=want_ack,
            want_refresh=want_refresh,
            identity=identity,
        )
        self.ws = ws
        # Fixed once the handshake is done; kept here for the broadcast loop (Room._send_many).
        self.transport = ws.transport
        self.protocol = ws.protocol
        self.plain = not ws.protocol.extensions
        # Closes the connection at `expires` (a timer, not a task per connection: most
        # connections are idle, and each task cost the relay kilobytes; issue 12).
        self._expiry: asyncio.TimerHandle | None = None
        # Set by the relay: closes the connection (a callback rather than a task waiting on an
        # event, for the same reason as the expiry timer).
        self.on_close: Callable[[RelayPeer], None] | None = None

    def watch_expiry(self, room: Room) -> None:
        """(Re)arm the timer that tells `room` when the token expires."""
        self.stop_watching_expiry()
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + self.expires - time.time(), self._expire, room)

    def stop_watching_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self, room: Room) -> None:
        self._expiry = None
        actions = room.core.expire(self, time.time())
        if actions:
            log.info("closing %r: token expired", self)
            room.perform(actions)
        else:  # the clocks drifted apart, or a refresh moved the expiry: not yet
            self.watch_expiry(room)

    def __repr__(self) -> str:
        return f"<peer {self.claims.sub}/{self.claims.role} {self.ws.remote_address}>"


class IndexOnDemand:
    """An event whose first waiter starts what sets it: the room's structure index is built
    only once a write needs it (`Room._start_indexing`), so a room opened to be read never
    pays for it, and its readers get the state before the build competes for the GIL."""

    def __init__(self, start: Callable[[], None]) -> None:
        self._event = anyio.Event()
        self._start: Callable[[], None] | None = start

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._start = None
        self._event.set()

    async def wait(self) -> None:
        start, self._start = self._start, None
        if start is not None:
            start()
        await self._event.wait()


class RoomState(Enum):
    LOADING = "loading"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Room:
    def __init__(
        self,
        name: str,
        store: Store,
        metrics: Metrics,
        config: RelayConfig,
        feed: WaitingFeed | None = None,
    ) -> None:
        self.name = name
        self.waiting = None if feed is None else WaitingWatch(name, feed)
        self.store = store
        self.metrics = metrics
        self.config = config
        self.state = RoomState.LOADING
        self.error: str | None = None
        self.refs = 0
        self.ready = anyio.Event()  # set when open, or when loading failed
        # Writes wait for the structure index; waiting is what starts building it.
        self.structure_ready = IndexOnDemand(self._start_indexing)
        self.finished = anyio.Event()
        self.core = RoomProtocol(name, config, metrics)
        self.core.watches_feed = self.waiting is not None
        self._last_write: asyncio.Future[None] | None = None
        self.writes_settled = Changes()  # stored, failed, or judged again (`write_access`)
        self.failure: str | None = None  # why the store failed, once it has
        self._last_compaction: asyncio.Future[None] | None = None
        # Readers waiting for their peer's queue to shrink (back-pressure, `wait_for_queue`).
        self._backpressured: dict[Peer, asyncio.Future[None]] = {}
        self._stopping = False
        self._evicted = False
        self.last_used = time.monotonic()  # for unloading the least recently used idle room
        self._wake = anyio.Event()
        # What the structure index will be built from: the stored state and log.
        self._loaded_state: tuple[bytes, tuple[bytes, ...]] | None = None
        self._tasks: anyio.abc.TaskGroup | None = None  # the room's own, while it is open

    @property
    def live(self) -> LiveDoc:
        return self.core.live

    @property
    def peers(self) -> dict[Peer, None]:
        return self.core.peers

    # -- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._release_documents()

    def _release_documents(self) -> None:
        """Drop the observers of the room's documents: yrs holds their callbacks, and without
        this every room ever loaded would stay in memory (issue 12)."""
        self.core.close()
        if self.waiting is not None:
            self.waiting.close()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        try:
            stored = await self.store.load(self.name)
            actions = self.core.load(
                stored.state, stored.next_seq, stored.log_length, stored.log_bytes, stored.log
            )
        except (StoreError, ValueError) as error:
            self.error = f"room {self.name!r} could not be loaded: {error}"
            log.error("%s", self.error)
            self.state = RoomState.CLOSED
            self.ready.set()
            task_status.started()
            return
        self.metrics.room_loads += 1
        self.perform(actions)
        self._loaded_state = (stored.state, stored.log)
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            tg.start_soon(self._tick_awareness)
            self.state = RoomState.OPEN
            self.ready.set()
            task_status.started()
            await self._live_until_done()
            self.state = RoomState.CLOSING
            tg.cancel_scope.cancel()
        self._tasks = None
        self.structure_ready.set()  # no index is coming: a write still waiting goes on
        await self._flush()
        self.state = RoomState.CLOSED

    def _start_indexing(self) -> None:
        """Build the structure index now: a write is waiting for it (design §7.6).

        Not at load: the index is only needed to judge a write, and building it holds the GIL
        for about as long as loading took, which would delay the step 2 replies of the peers
        that opened the room to read it. Once the room's task group is gone (the room is
        closing) nothing is started and the event is set: a write that still comes is judged
        after `LiveDoc` builds the index itself.
        """
        loaded, self._loaded_state = self._loaded_state, None
        if loaded is None or self._tasks is None or self.state is not RoomState.OPEN:
            self.structure_ready.set()
            return
        self._tasks.start_soon(self._index_structure, *loaded)

    async def _index_structure(self, state: bytes, updates: tuple[bytes, ...]) -> None:
        """Index the loaded state and log on a thread: the event loop keeps serving meanwhile."""
        try:
            index = await anyio.to_thread.run_sync(
                build_structure, state, self.config.shape_limits, updates
            )
        except ValueError as error:  # a stored state we cannot decode: writes are refused
            log.error("room %s: structure index failed: %s", self.name, error)
            self.live.structure_error = str(error)
        else:
            self.live.adopt_structure(index)
        finally:
            self.structure_ready.set()

    async def _tick_awareness(self) -> None:
        while True:
            await anyio.sleep(AWARENESS_TICK)
            self.perform(self.core.tick(time.time()))

    async def _live_until_done(self) -> None:
        while not (self._stopping or self.core.failed or self._evicted):
            wake = self._wake = anyio.Event()
            if self.refs == 0:
                with anyio.move_on_after(self.config.idle_unload) as scope:
                    await wake.wait()
                if scope.cancelled_caught and self.refs == 0:
                    log.info("room %s idle, unloading", self.name)
                    self.metrics.room_unloads += 1
                    return
            else:
                await wake.wait()

    async def _flush(self) -> None:
        if self.core.failed:
            return
        if self._last_write is not None:
            try:
                await asyncio.shield(self._last_write)
            except StoreError:
                return
        self.perform(self.core.flush())
        if self._last_compaction is not None:
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._last_compaction)

    @property
    def writes(self) -> int:
        """Changes with every stored write: what readers of the document may cache against."""
        return self.core.next_seq

    def attach(self) -> None:
        self.refs += 1
        self.last_used = time.monotonic()
        self._wake.set()

    def release(self) -> None:
        self.refs -= 1
        self.last_used = time.monotonic()
        if self.refs == 0:
            self._wake.set()

    @property
    def idle(self) -> bool:
        """Open with no peer attached: it may be unloaded early to make room for another."""
        return self.state is RoomState.OPEN and self.refs == 0 and not self._evicted

    def evict(self) -> None:
        """Unload this idle room now (flushed as on an idle unload) to make room for another.

        Marked CLOSING at once, so a join that was about to attach waits and reloads it.
        """
        assert self.idle
        self._evicted = True
        self.state = RoomState.CLOSING
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def failed(self) -> bool:
        return self.core.failed

    def fail(self, reason: str) -> None:
        """The store lost a write: close every peer, drop the room, reload it from disk later."""
        if self.core.failed:
            return
        self.failure = reason
        self.perform(self.core.store_failed(reason))
        self.writes_settled.notify()
        self._wake_readers()
        self._wake.set()

    # -- carrying out the protocol's actions ---------------------------------------------

    def perform(self, actions: list[Action]) -> None:
        """Carry out `actions`, in order (VerifyToken is the caller's: it must be awaited)."""
        for action in actions:
            if isinstance(action, Broadcast):
                peers = cast("list[RelayPeer]", list(self.core.peers))  # a copy: peers may leave
                self._send_many(peers, action.message, action.exclude)
            elif isinstance(action, Send):
                self._send_many((cast(RelayPeer, action.peer),), action.message)
            elif isinstance(action, Acknowledge):
                self._send_many((cast(RelayPeer, action.peer),), encode_message(Ack(action.count)))
            elif isinstance(action, Append):
                self._append(action)
            elif isinstance(action, Compact):
                self._compact(action)
            elif isinstance(action, Close):
                self._close(action)
            elif isinstance(action, CheckWaiting) and self.waiting is not None:
                if action.judged_here:
                    self.waiting.check(self.live.doc, shape_checked=self.live.shape_checked)
                else:
                    self.waiting.stored_elsewhere()

    def _append(self, action: Append) -> None:
        future = self.store.append(self.name, action.seq, action.update)
        self._last_write = future
        future.add_done_callback(partial(self._stored, action.seq))

    def _stored(self, seq: int, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            self.writes_settled.notify()
            return
        error = future.exception()
        if error is not None:
            self.fail(str(error))
            return
        self.perform(self.core.stored(seq))
        self.writes_settled.notify()
        if self._backpressured:
            self._wake_readers()

    def _compact(self, action: Compact) -> None:
        future = self.store.compact(self.name, action.upto_seq, action.snapshot)
        self._last_compaction = future
        future.add_done_callback(self._compacted)

    def _compacted(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("room %s: compaction failed (the log is kept): %s", self.name, error)
        else:
            self.metrics.compactions += 1

    def _close(self, action: Close) -> None:
        peer = cast(RelayPeer, action.peer)
        log.warning("closing %r (%d, %s): %s", peer, action.code, action.kind, action.reason)
        self.metrics.closed_connections[action.kind.value] += 1
        peer.stop_watching_expiry()
        if peer.on_close is not None:
            peer.on_close(peer)

    async def wait_for_queue(self, peer: Peer, limit: int) -> None:
        """Back-pressure: wait while `peer` has `limit` results waiting for the store."""
        while peer.queued >= limit and not peer.closing:
            future = self._backpressured.get(peer)
            if future is None:
                future = self._backpressured[peer] = asyncio.get_running_loop().create_future()
            await future

    def _wake_readers(self) -> None:
        limit = self.config.max_in_flight
        for peer, future in list(self._backpressured.items()):
            if peer.queued < limit or peer.closing:
                del self._backpressured[peer]
                if not future.done():
                    future.set_result(None)

    # -- peers ---------------------------------------------------------------------------

    def join(self, peer: RelayPeer) -> None:
        self.perform(self.core.join(peer))

    def leave(self, peer: RelayPeer) -> None:
        future = self._backpressured.pop(peer, None)
        if future is not None and not future.done():
            future.set_result(None)
        self.perform(self.core.leave(peer))

    def receive(self, peer: RelayPeer, message: Any) -> list[Action]:
        """Hand one message to the protocol and carry out what it says; returns the actions
        (the caller awaits a VerifyToken among them)."""
        actions = self.core.receive(peer, message, time.time())
        self.perform(actions)
        return actions

    def close_peer(self, peer: RelayPeer, code: int, reason: str, kind: CloseKind) -> None:
        """Close `peer` for something the shell saw (the frame layer, a slow reader)."""
        close = self.core.close_peer(peer, code, reason, kind)
        if close is not None:
            self._close(close)

    def _send_many(
        self, peers: Iterable[RelayPeer], frame: bytes, exclude: Peer | None = None
    ) -> None:
        """Write `frame` to every open peer, as one websocket frame built once.

        The websockets fast path, and the only place that relies on websockets' internals
        (`tests/relay/test_websockets_fast_path.py` fails with a clear message if they change):
        the relay's frames are unmasked and uncompressed (compression=None), so they are the
        same bytes on every connection. websockets.broadcast would frame the message again per
        connection, which was a third of the relay's CPU per delivered update at 500 peers
        (benchmarks/fanout.py). This makes the same check it does (skip connections that are
        not OPEN) and writes the bytes to each transport; the relay never sends fragmented
        messages, so no frame can be interleaved. A connection with a negotiated extension
        (none today) still goes through websockets.
        """
        wire: bytes | None = None
        limit = self.config.max_write_buffer
        is_open = State.OPEN
        sent = 0
        now = time.time()
        for peer in peers:  # the hot loop at 500 peers: keep it lean
            if peer is exclude or peer.protocol.state is not is_open:
                continue
            if peer.expires <= now:  # its token expired: nothing more, its close is coming
                self.close_peer(peer, TOKEN_EXPIRED_CODE, TOKEN_EXPIRED, CloseKind.EXPIRED)
                continue
            transport = peer.transport
            if transport is None:
                continue
            if transport.get_write_buffer_size() > limit:
                log.warning("closing %r: send buffer over %d bytes", peer, limit)
                self.close_peer(peer, 1008, "client too slow: send buffer full", CloseKind.SLOW)
                continue
            if peer.plain:
                if wire is None:
                    wire = Frame(Opcode.BINARY, frame).serialize(mask=False)
                try:
                    transport.write(wire)
                except (RuntimeError, OSError) as error:  # e.g. after write_eof; like broadcast
                    log.warning("skipped a write to %r: %s", peer, error)
                    continue
            else:
                broadcast([peer.ws], frame)
            sent += 1
        self.metrics.bytes_out += len(frame) * sent

    # -- membership (design §4) ----------------------------------------------------------

    def members(self) -> dict[str, Member]:
        return self.core.members()

    def role_for(self, sub: str) -> str | None:
        return self.core.role_for(sub)

    async def write_access(self, decide: Decide) -> None:
        """Make a membership change of the relay's own: `decide` reads the document and
        returns the write (or raises, e.g. AccessError, to refuse it); the write is applied,
        enforced on every connection at once (before anything more is sent), stored, then
        sent to the room's peers.

        Nothing is awaited between deciding and applying: a decision read from the
        membership is not raced by another change. A cluster node that withdraws the write
        after a conflict decides it again (`RoomProtocol.resubmit`): this waits for the new
        write to be stored, or raises what `decide` raised then.
        """
        try:
            local, actions = self.core.local_change(decide)
        except PeerViolation:
            raise RoomUnavailable("relay storage failed") from None
        self.perform(actions)
        while True:
            if local.refused is not None:
                raise local.refused
            if self.core.failed:
                raise RoomUnavailable(f"relay storage failed: {self.failure}")
            if local.seq <= self.core.durable_seq:
                return
            await self.writes_settled.wait()


class RoomManager:
    """Owns every room's task; `run` returns after `close` once every room is flushed."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        config: RelayConfig,
        feed: WaitingFeed | None = None,
        room_class: type[Room] | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.feed = feed
        self.room_class = room_class or Room  # cluster mode: crdtchat.cluster.relaynode
        self.rooms: dict[str, Room] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._closed = anyio.Event()
        # Called with the number of rooms left once a room is gone (the relay gives freed
        # memory back: crdtchat.relay.heap).
        self.after_unload: Callable[[int], None] | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await self._closed.wait()
            for room in list(self.rooms.values()):
                room.stop()

    def close(self) -> None:
        self._closing = True
        self._closed.set()

    async def acquire(self, name: str) -> Room:
        """The open room `name`, loaded if needed, with one more reference."""
        while True:
            if self._closing or self._tg is None:
                raise RoomUnavailable("relay shutting down")
            room = self.rooms.get(name)
            if room is None:
                if len(self.rooms) >= self.config.max_rooms:
                    await self._make_room()
                    continue  # the room may have been loaded meanwhile
                room = self.room_class(name, self.store, self.metrics, self.config, self.feed)
                self.rooms[name] = room
                self.metrics.rooms = len(self.rooms)
                self._tg.start_soon(self._run_room, room)
            await room.ready.wait()
            if room.failed:  # unloading after a store failure: wait, then load it again
                await room.finished.wait()
                continue
            if room.state is RoomState.OPEN:
                room.attach()
                return room
            if room.error is not None:
                raise RoomUnavailable(room.error)
            await room.finished.wait()

    async def _make_room(self) -> None:
        """Unload the least recently used idle room and wait until it is gone (design §7.6).

        Raises RoomLimitReached when every loaded room has peers: memory stays bounded, and
        the joining peer is told to come back later rather than left waiting.
        """
        idle = [room for room in self.rooms.values() if room.idle]
        if idle:
            victim = min(idle, key=lambda room: room.last_used)
            log.info("room limit %d reached: unloading idle room %s", len(self.rooms), victim.name)
            victim.evict()
            self.metrics.room_evictions += 1
        else:
            leaving = [room for room in self.rooms.values() if room.state is RoomState.CLOSING]
            if not leaving:
                self.metrics.room_limit_refusals += 1
                raise RoomLimitReached(
                    f"the relay has {len(self.rooms)} rooms loaded (its limit), all in use"
                )
            victim = leaving[0]
        await victim.finished.wait()

    async def _run_room(self, room: Room) -> None:
        try:
            await room.run()
        finally:
            if self.rooms.get(room.name) is room:
                del self.rooms[room.name]
            self.metrics.rooms = len(self.rooms)
            room.ready.set()
            room.finished.set()
            if self.after_unload is not None:
                self.after_unload(len(self.rooms))
