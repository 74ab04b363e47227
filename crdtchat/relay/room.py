"""Rooms: one conversation's live document, awareness and connected peers, and their lifetime.

`Room.handle` is the protocol core for one incoming message: synchronous, so the live document
changes in the order messages arrive, and it returns what must happen once the store has caught
up (`WriteDone`, `Reply`, `Refusal`). Each connection settles those in order in its own task,
which is where broadcasts and acknowledgements happen: an update reaches other peers, and its
sender's Ack, only after the commit that holds it. Broadcast frames are encoded once and the
same bytes are written to every peer.

`RoomManager` loads a room on first use, keeps it while peers are connected and for a grace
period after the last one leaves, then flushes it (compacting its log) and drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import anyio
from anyio.abc import TaskStatus
from pycrdt import Awareness, Doc
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from crdtchat.errors import RemoteProtocolError, StorageError
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.feed import WaitingFeed, WaitingWatch
from crdtchat.relay.livedoc import Accepted, LiveDoc, UndecodableUpdate, build_structure
from crdtchat.relay.membership import members, role_of
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.ratelimit import Subject, TokenBucket
from crdtchat.relay.store import Store, StoreError
from crdtchat.schema import Member, is_person_room, person_room
from crdtchat.tokens import TokenClaims
from crdtchat.wire import (
    Ack,
    AuthDenied,
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireError,
    WireMessage,
    decode_awareness,
    encode_awareness,
    encode_message,
)

log = logging.getLogger("crdtchat.relay.room")

# Close code and reason for a connection whose token expired (design §3): in the 4400s, which
# y-websocket clients and `Replica` take as "do not come back with this token".
TOKEN_EXPIRED_CODE = 4401
TOKEN_EXPIRED = "token expired"
# A connection whose membership ended (design §4): the same path as an expiry, its own reason.
ACCESS_REVOKED_CODE = 4403


class PeerViolation(RemoteProtocolError):
    """The peer broke the protocol; close its connection with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RoomUnavailable(StorageError):
    """The room cannot be opened now (store failure, relay shutting down)."""


class RoomLimitReached(RoomUnavailable):
    """`max_rooms` rooms are loaded and every one has peers: try again later (close 1013)."""


class Peer:
    """One websocket connection in a room."""

    # Slots: a relay holds one per connection, mostly idle ones (issue 12: memory per
    # connection); a per-instance dict of these ~20 attributes was about 1 KiB of each.
    __slots__ = (
        "_expiry",
        "acked",
        "awareness_ids",
        "awareness_rate",
        "claims",
        "close_code",
        "close_reason",
        "closing",
        "expires",
        "failed",
        "identity",
        "on_close_request",
        "plain",
        "protocol",
        "settled",
        "subject",
        "transport",
        "want_ack",
        "want_refresh",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        claims: TokenClaims,
        want_ack: bool,
        subject: Subject,
        config: RelayConfig,
        want_refresh: bool = False,
    ) -> None:
        self.ws = ws
        # Fixed once the handshake is done; kept here for the broadcast loop (Room._send_many).
        self.transport = ws.transport
        self.protocol = ws.protocol
        self.plain = not ws.protocol.extensions
        self.claims = claims
        # A plain attribute: the broadcast loop reads it for every peer (design §3, access ends).
        self.expires = float(claims.exp)
        # Closes the connection at `expires` (a timer, not a task per connection: most
        # connections are idle, and each task cost the relay kilobytes; issue 12).
        self._expiry: asyncio.TimerHandle | None = None
        self.want_ack = want_ack
        self.want_refresh = want_refresh
        # Opened with an identity token: its role comes from the room's membership and follows
        # every change to it (Room.enforce_access).
        self.identity = False
        self.awareness_ids: set[int] = set()
        self.settled = 0  # SyncStep2/SyncUpdate messages stored or refused, in order
        self.acked = 0
        self.failed = False
        # Most refusals rebuild the room's document (O(document)): a subject that keeps
        # sending refused writes, over however many connections, is closed rather than allowed
        # to burn the relay's CPU. Its quotas are shared by its connections too (design §7.4).
        self.subject = subject
        self.awareness_rate = TokenBucket(config.awareness_rate, config.awareness_burst)
        self.closing = False  # a close was requested
        self.close_code = 1000
        self.close_reason = ""
        # Set by the relay: closes the connection (a callback rather than a task waiting on an
        # event, for the same reason as the expiry timer).
        self.on_close_request: Callable[[Peer], None] | None = None

    def watch_expiry(self) -> None:
        """(Re)arm the timer that closes the connection when its token expires."""
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + self.expires - time.time(), self._expire)

    def stop_watching_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self) -> None:
        self._expiry = None
        if self.expires - time.time() > 0:  # the clocks drifted apart: not yet
            self.watch_expiry()
            return
        log.info("closing %r: token expired", self)
        self.request_close(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED)

    def refresh(self, claims: TokenClaims) -> None:
        """Use a newer token of the same subject from now on (extension 102)."""
        self.claims = claims
        self.expires = float(claims.exp)
        if self._expiry is not None:
            self.watch_expiry()

    def revoke(self, reason: str) -> None:
        """Access ended: nothing more is sent to it (the broadcast loop reads `expires`), it
        can neither sync nor send awareness (Room.handle), and it is closed with `reason`."""
        self.request_close(ACCESS_REVOKED_CODE, reason)
        self.expires = 0.0
        self.stop_watching_expiry()

    def request_close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.close_code = code
            self.close_reason = reason
            if self.on_close_request is not None:
                self.on_close_request(self)

    def __repr__(self) -> str:
        return f"<peer {self.claims.sub}/{self.claims.role} {self.ws.remote_address}>"


@dataclass(frozen=True)
class WriteDone:
    """An update is settled once `future` (its commit, or the last one before it) is done."""

    future: asyncio.Future[None] | None
    frame: bytes | None  # the update to broadcast, None when it changed nothing


@dataclass(frozen=True)
class Reply:
    """A reply that may only leave after `future`: it can contain not yet committed changes."""

    future: asyncio.Future[None] | None
    frame: bytes


@dataclass(frozen=True)
class Refusal:
    reason: str


Pending = WriteDone | Reply | Refusal


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
        self.peers: dict[ServerConnection, Peer] = {}
        self.refs = 0
        self.ready = anyio.Event()  # set when open, or when loading failed
        self.structure_ready = anyio.Event()  # writes wait for the structure index
        self.finished = anyio.Event()
        # empty until loaded; closed when the room is done
        self.live = LiveDoc(limits=config.shape_limits)
        self.awareness = Awareness(Doc())
        self.awareness.set_local_state(None)  # the relay itself is not present
        self.awareness.observe(self._on_awareness)
        # Which connection introduced each awareness client id: only it may change or clear
        # that state (design §3, presence is bound to its connection).
        self.awareness_owners: dict[int, Peer] = {}
        self._members: dict[str, Member] | None = None  # see members()
        self._next_seq = 1
        self._last_write: asyncio.Future[None] | None = None
        self._log_length = 0
        self._log_bytes = 0
        self._snapshot_bytes = 0
        self._created = False  # the store holds something of this room (design §7.4 quotas)
        self._stopping = False
        self._failed = False
        self._evicted = False
        self.last_used = time.monotonic()  # for unloading the least recently used idle room
        self._wake = anyio.Event()

    # -- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._release_documents()

    def _release_documents(self) -> None:
        """Drop the observers of the room's documents: yrs holds their callbacks, and without
        this every room ever loaded would stay in memory (issue 12)."""
        self.live.close()
        if self.waiting is not None:
            self.waiting.close()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        try:
            stored = await self.store.load(self.name)
            self.live.close()
            self.live = LiveDoc(stored.state, limits=self.config.shape_limits)
            self._members = None
        except (StoreError, ValueError) as error:
            self.error = f"room {self.name!r} could not be loaded: {error}"
            log.error("%s", self.error)
            self.state = RoomState.CLOSED
            self.ready.set()
            task_status.started()
            return
        self._next_seq = stored.next_seq
        self._log_length = stored.log_length
        self._log_bytes = stored.log_bytes
        self._snapshot_bytes = len(stored.state)
        self._created = bool(stored.state) or stored.next_seq > 1
        self.metrics.room_loads += 1
        if self._should_compact():
            self._compact(self._next_seq - 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._index_structure, stored.state)
            await tg.start(self.awareness.start)
            self.state = RoomState.OPEN
            self.ready.set()
            task_status.started()
            await self._live_until_done()
            self.state = RoomState.CLOSING
            tg.cancel_scope.cancel()
        await self._flush()
        self.state = RoomState.CLOSED

    async def _index_structure(self, state: bytes) -> None:
        """Index the loaded state on a thread: joins and reads need not wait for it."""
        try:
            index = await anyio.to_thread.run_sync(build_structure, state, self.config.shape_limits)
        except ValueError as error:  # a stored state we cannot decode: writes are refused
            log.error("room %s: structure index failed: %s", self.name, error)
            self.live.structure_error = str(error)
        else:
            self.live.adopt_structure(index)
        finally:
            self.structure_ready.set()

    async def _live_until_done(self) -> None:
        while not (self._stopping or self._failed or self._evicted):
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
        if self._failed:
            return
        if self._last_write is not None:
            try:
                await asyncio.shield(self._last_write)
            except StoreError:
                return
        if self._log_length:
            future = self._compact(self._next_seq - 1)
            with contextlib.suppress(StoreError):
                await asyncio.shield(future)

    @property
    def writes(self) -> int:
        """Changes with every stored write: what readers of the document may cache against."""
        return self._next_seq

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
        return self._failed

    def fail(self, reason: str) -> None:
        """The store lost a write: close every peer, drop the room, reload it from disk later."""
        if self._failed:
            return
        self._failed = True
        log.error("room %s failed: %s", self.name, reason)
        for peer in self.peers.values():
            peer.failed = True
            peer.request_close(1011, "relay storage failed")
        self._wake.set()

    # -- peers ---------------------------------------------------------------------------

    def send(self, peer: Peer, frame: bytes) -> None:
        self._send_many([peer], frame)

    def broadcast(self, frame: bytes, exclude: Peer | None = None) -> int:
        """Send `frame` to every peer but `exclude`; returns how many it was meant for."""
        self._send_many(list(self.peers.values()), frame, exclude)  # a copy: peers may leave
        return len(self.peers) - (exclude is not None and exclude.ws in self.peers)

    def _send_many(self, peers: Iterable[Peer], frame: bytes, exclude: Peer | None = None) -> None:
        """Write `frame` to every open peer, as one websocket frame built once.

        The relay's frames are unmasked and uncompressed (compression=None), so they are the
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
                peer.request_close(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED)
                continue
            transport = peer.transport
            if transport is None:
                continue
            if transport.get_write_buffer_size() > limit:
                log.warning("closing %r: send buffer over %d bytes", peer, limit)
                peer.request_close(1008, "client too slow: send buffer full")
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

    def join(self, peer: Peer) -> None:
        self.peers[peer.ws] = peer
        self.send(peer, encode_message(SyncStep1(self.live.state_vector())))
        entries = self._awareness_entries()
        if entries:
            self.send(peer, encode_message(AwarenessMessage(encode_awareness(entries))))

    def leave(self, peer: Peer) -> None:
        self.peers.pop(peer.ws, None)
        for cid in peer.awareness_ids:
            if self.awareness_owners.get(cid) is peer:
                del self.awareness_owners[cid]
        gone = [cid for cid in peer.awareness_ids if cid in self.awareness.states]
        if gone:
            self.awareness.remove_awareness_states(gone, "close")
            self._broadcast_removal(gone)

    # -- membership (design §4) ----------------------------------------------------------

    def members(self) -> dict[str, Member]:
        """The room's membership, read once per change: only `write_access` changes it (no
        peer may write `access.*`), and every identity join reads it."""
        if self._members is None:
            self._members = members(self.live.doc)
        return self._members

    def role_for(self, sub: str) -> str | None:
        """The role an identity gets in this room from its membership, if any; in a
        person's list document, "person" for that person and nobody else."""
        if is_person_room(self.name):
            return "person" if person_room(sub) == self.name else None
        return role_of(self.members(), sub)

    def enforce_access(self) -> None:
        """Give every identity connection the role its membership now grants, or end it."""
        table = self.members()
        for peer in list(self.peers.values()):
            if not peer.identity or peer.expires == 0.0:
                continue
            sub = peer.claims.sub
            role = self.role_for(sub) if is_person_room(self.name) else role_of(table, sub)
            if role is None:
                log.info("room %s: %r is no longer a member", self.name, peer)
                peer.revoke(f"access revoked: {peer.claims.sub} is no longer a member")
            elif role != peer.claims.role:
                peer.claims = replace(peer.claims, role=role)  # type: ignore[arg-type]

    async def write_access(self, write: Any) -> None:
        """Make a membership change of the relay's own: applied, enforced on every connection
        at once (before anything more is sent), stored, then sent to the room's peers.

        Nothing is awaited before the write is applied: a caller that read the membership
        to decide on `write` is not raced by another change.
        """
        if self._failed:
            raise RoomUnavailable("relay storage failed")
        update = self.live.local_write(write)
        self._members = None
        self.enforce_access()
        seq = self._next_seq
        self._next_seq += 1
        future = self.store.append(self.name, seq, update)
        self._last_write = future
        self._log_length += 1
        self._log_bytes += len(update)
        self._created = True
        if self._should_compact():
            self._compact(seq)
        try:
            await asyncio.shield(future)
        except StoreError as error:
            self.fail(str(error))
            raise RoomUnavailable(f"relay storage failed: {error}") from None
        self.metrics.updates_stored += 1
        self.metrics.updates_out += self.broadcast(encode_message(SyncUpdate(update)))

    # -- awareness -----------------------------------------------------------------------

    def _awareness_entries(self) -> list[AwarenessEntry]:
        own = self.awareness.client_id
        meta = self.awareness.meta
        return [
            AwarenessEntry(cid, int(meta[cid]["clock"]), json.dumps(state, separators=(",", ":")))
            for cid, state in self.awareness.states.items()
            if cid != own and cid in meta
        ]

    def _broadcast_removal(self, client_ids: list[int]) -> None:
        meta = self.awareness.meta
        entries = [AwarenessEntry(cid, int(meta[cid]["clock"]), "null") for cid in client_ids]
        self.broadcast(encode_message(AwarenessMessage(encode_awareness(entries))))

    def _on_awareness(self, topic: str, change: tuple[dict[str, Any], Any]) -> None:
        changes, origin = change
        if topic == "update" and origin == "timeout" and changes["removed"]:
            for peer in self.peers.values():
                peer.awareness_ids.difference_update(changes["removed"])
            for cid in changes["removed"]:
                self.awareness_owners.pop(cid, None)
            self._broadcast_removal(list(changes["removed"]))

    # -- the protocol core ---------------------------------------------------------------

    def handle(self, peer: Peer, message: WireMessage) -> Pending | None:
        """Apply one message from `peer`; raises PeerViolation for input that ends the peer."""
        if peer.expires <= time.time():  # no sync, no awareness once the token has expired
            raise PeerViolation(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED)
        if isinstance(message, SyncStep2 | SyncUpdate):
            return self._handle_update(peer, message.update)
        if isinstance(message, SyncStep1):
            try:
                update = self.live.update_since(message.state_vector)
            except WireError as error:
                raise PeerViolation(1008, str(error)) from None
            return Reply(self._last_write, encode_message(SyncStep2(update)))
        if isinstance(message, AwarenessMessage):
            self._handle_awareness(peer, message.payload)
            return None
        if isinstance(message, QueryAwareness):
            self._take_awareness_rate(peer)  # a small query, a reply of every state
            entries = self._awareness_entries()
            self.send(peer, encode_message(AwarenessMessage(encode_awareness(entries))))
            return None
        # AuthDenied, Ack and extensions are relay-to-client messages: nothing to do.
        return None

    def _handle_update(self, peer: Peer, update: bytes) -> Pending:
        self.metrics.updates_in += 1
        if self._failed:  # its live document may hold unstored writes: nothing builds on it
            raise PeerViolation(1011, "relay storage failed")
        claims = peer.claims
        subject = peer.subject
        try:
            outcome = self.live.apply(
                update,
                claims.role,
                claims.sub,
                partial=not peer.want_ack,
                gate=lambda size: self._admit_growth(subject, size),
            )
        except UndecodableUpdate as error:
            raise PeerViolation(1008, str(error)) from None
        if not isinstance(outcome, Accepted):
            self.metrics.refused_writes += 1
            log.info("room %s: refused update from %r: %s", self.name, peer, outcome.reason)
            if not subject.refusals.take(1):
                raise PeerViolation(1008, f"too many refused writes from subject {subject.sub!r}")
            return Refusal(outcome.reason)
        if not outcome.delta:
            return WriteDone(self._last_write, None)
        subject.write_bytes.charge(len(outcome.delta))
        if not self._created:
            self._created = True
            subject.rooms.charge(1)
        if self.waiting is not None:
            self.waiting.check(self.live.doc, shape_checked=self.live.shape_checked())
        seq = self._next_seq
        self._next_seq += 1
        future = self.store.append(self.name, seq, outcome.delta)
        self._last_write = future
        self._log_length += 1
        self._log_bytes += len(outcome.delta)
        if self._should_compact():
            self._compact(seq)
        return WriteDone(future, encode_message(SyncUpdate(outcome.delta)))

    def _admit_growth(self, subject: Subject, size: int) -> None:
        """Called by LiveDoc.apply, before applying, for an update that adds `size` bytes of
        new structs: the room's size and the subject's quotas (design §7.4)."""
        config = self.config
        held = self._snapshot_bytes + self._log_bytes
        if held + size > config.max_document:
            raise PeerViolation(
                1009, f"room is full: its document holds {held} bytes, limit {config.max_document}"
            )
        if not self._created and not subject.rooms.can_take(1):
            raise PeerViolation(
                1013,
                f"quota: subject {subject.sub!r} created {config.quota_rooms:g} rooms "
                f"in {config.quota_interval:g} s; try again later",
            )
        if not subject.write_bytes.can_take(size):
            raise PeerViolation(
                1013,
                f"quota: subject {subject.sub!r} wrote {config.quota_bytes:g} bytes "
                f"in {config.quota_interval:g} s; try again later",
            )

    def _take_awareness_rate(self, peer: Peer) -> None:
        if not peer.awareness_rate.take(1):
            rate = f"{self.config.awareness_rate:g}"
            raise PeerViolation(1008, f"rate limit exceeded: more than {rate} awareness messages/s")

    def _handle_awareness(self, peer: Peer, payload: bytes) -> None:
        """Relay one awareness update within the limits of design §7.3, or end the peer.

        Entries for client ids another connection owns are dropped first (design §3: presence
        is bound to its connection), so they count for nothing here.
        """
        config = self.config
        self._take_awareness_rate(peer)
        try:
            entries = decode_awareness(payload, config.awareness_depth)
        except WireError as error:
            raise PeerViolation(1008, f"malformed awareness update: {error}") from None
        owners = self.awareness_owners
        relay_id = self.awareness.client_id
        own = [
            e for e in entries if owners.get(e.client_id, peer) is peer and e.client_id != relay_id
        ]
        if len(own) < len(entries):
            log.info(
                "room %s: %r may not change the presence of another connection's client ids %s",
                self.name,
                peer,
                sorted({e.client_id for e in entries} - {e.client_id for e in own}),
            )
            if not own:
                return
            payload = encode_awareness(own)
        held = set(peer.awareness_ids)
        for entry in own:
            size = len(entry.state.encode("utf-8"))
            if size > config.awareness_state_bytes:
                raise PeerViolation(
                    1009,
                    f"awareness state of client {entry.client_id} is {size} bytes, "
                    f"limit {config.awareness_state_bytes}",
                )
            if entry.removed:
                held.discard(entry.client_id)
            else:
                held.add(entry.client_id)
        if len(held) > config.awareness_clients:
            raise PeerViolation(
                1008,
                f"awareness for more than {config.awareness_clients} client ids on one connection",
            )
        self.metrics.awareness_in += 1
        self.awareness.apply_awareness_update(payload, peer)
        peer.awareness_ids = held
        for entry in own:
            if entry.removed:
                owners.pop(entry.client_id, None)
            else:
                owners[entry.client_id] = peer
        self.broadcast(encode_message(AwarenessMessage(payload)))

    # -- compaction ----------------------------------------------------------------------

    def _should_compact(self) -> bool:
        if self._log_length == 0:
            return False
        if self._log_length >= self.config.compact_updates:
            return True
        return self._log_bytes >= max(self.config.compact_min_bytes, self._snapshot_bytes)

    def _compact(self, upto_seq: int) -> asyncio.Future[None]:
        """Snapshot the live document (it holds every accepted update up to `upto_seq`)."""
        snapshot = self.live.compact()
        self._snapshot_bytes = len(snapshot)
        self._log_length = 0
        self._log_bytes = 0
        future = self.store.compact(self.name, upto_seq, snapshot)
        future.add_done_callback(self._compacted)
        return future

    def _compacted(self, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("room %s: compaction failed (the log is kept): %s", self.name, error)
        else:
            self.metrics.compactions += 1

    # -- settling, per connection --------------------------------------------------------

    async def settle(self, peer: Peer, item: Pending, more_queued: bool) -> None:
        """Finish one pending item of `peer`, in order; `more_queued` delays the Ack."""
        if peer.failed:
            return
        if isinstance(item, Refusal):
            self._ack(peer)
            self.send(peer, encode_message(AuthDenied(item.reason)))
            peer.settled += 1
        else:
            if item.future is not None:
                try:
                    await asyncio.shield(item.future)
                except StoreError as error:
                    peer.failed = True
                    self.fail(str(error))
                    return
            if isinstance(item, Reply):
                self.send(peer, item.frame)
            else:
                if item.frame is not None:
                    self.metrics.updates_stored += 1
                    self.metrics.updates_out += self.broadcast(item.frame, exclude=peer)
                peer.settled += 1
        if not more_queued:
            self._ack(peer)

    def _ack(self, peer: Peer) -> None:
        if peer.want_ack and peer.settled > peer.acked:
            peer.acked = peer.settled
            self.send(peer, encode_message(Ack(peer.settled)))


class RoomManager:
    """Owns every room's task; `run` returns after `close` once every room is flushed."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        config: RelayConfig,
        feed: WaitingFeed | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.feed = feed
        self.rooms: dict[str, Room] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self._closed = anyio.Event()

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
                room = Room(name, self.store, self.metrics, self.config, self.feed)
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
