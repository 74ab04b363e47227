"""The client side of y-websocket sync for one document, without I/O.

A `SyncSession` sits between a pycrdt `Doc` (plus, optionally, its `Awareness`) and one
connection to a relay at a time. The I/O layer feeds it decoded wire messages (`receive`),
tells it when a connection opens or closes (`connect`, `disconnect`), and sends whatever
`data_to_send` returns, in that order, on the current connection. Everything the I/O layer has
to persist or show comes out of `events`.

Durability accounting, the reason this module exists: every local transaction becomes a
*pending* local update with a monotonically increasing id. Each SyncStep2/SyncUpdate message we
queue on a connection gets a sequence number (1, 2, …) and remembers what it carries: a
SyncUpdate carries one local id; a SyncStep2 carries the whole difference between our document
and the relay's state vector, hence every local id pending when it was made. The relay's
cumulative `Ack(seq)` settles messages 1..seq; a settled message was durably stored unless the
relay refused it, and the relay sends `Ack(k - 1)` before the `AuthDenied` of message k, so the
refused message is the first one the last Ack did not cover. Settled, unrefused messages make
their local ids durable; a refused message's ids stay pending. After a disconnect nothing is
resent piecemeal: the next connection's SyncStep2 covers all that is still pending.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pycrdt import Awareness, Doc, Subscription, TransactionEvent

from crdtchat.early import EarlyUpdates
from crdtchat.errors import RemoteProtocolError
from crdtchat.merge import merge
from crdtchat.updates import EMPTY_UPDATE
from crdtchat.wire import (
    Ack,
    AuthDenied,
    AwarenessMessage,
    Extension,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireMessage,
    decode_state_vector,
)

log = logging.getLogger(__name__)

# Transaction origin of updates that came from the relay. Other observers of the document may
# compare against it; our own observer uses a flag because pycrdt does not let an observer read
# the origin of the transaction being committed.
REMOTE_ORIGIN = "crdtchat.sync.remote"

# Local updates queued together are merged into SyncUpdates of at most about this size.
MAX_MERGED_UPDATE = 1024 * 1024


class SyncProtocolError(RemoteProtocolError, ValueError):
    """The relay sent something a correct relay never sends; the connection should be dropped."""


@dataclass(frozen=True)
class LocalUpdate:
    """A local transaction, to persist as pending until the relay has stored it."""

    local_id: int
    update: bytes


@dataclass(frozen=True)
class RemoteUpdate:
    """An update from the relay that changed the document, to persist locally."""

    update: bytes


@dataclass(frozen=True)
class Durable:
    """These local updates are durably stored by the relay."""

    local_ids: tuple[int, ...]


@dataclass(frozen=True)
class Synced:
    """The relay's state has been received on this connection."""


@dataclass(frozen=True)
class Denied:
    """The relay refused something (a token, a write); `reason` is the relay's text."""

    reason: str


@dataclass(frozen=True)
class PresenceChanged:
    """Remote awareness states appeared, changed or went away."""

    added: tuple[int, ...]
    updated: tuple[int, ...]
    removed: tuple[int, ...]


@dataclass(frozen=True)
class _Step2:
    update: bytes
    covers_upto: int  # the highest local id pending when it was made


@dataclass(frozen=True)
class _Held:
    update: bytes  # a part of a remote update we hold early, passed on after our step 2


SessionEvent = LocalUpdate | RemoteUpdate | Durable | Synced | Denied | PresenceChanged


class SyncSession:
    """One document's sync state machine; see the module docstring.

    `pending` are the ids of local updates restored from storage that the relay has not yet
    acknowledged; `next_local_id` must be larger than any id ever handed out for this document
    (the local store keeps it). `on_change` is called, synchronously and from inside the
    document's commit, whenever a local change produced events or data to send: it must only
    schedule work, never touch the document.
    """

    def __init__(
        self,
        doc: Doc,
        awareness: Awareness | None = None,
        *,
        pending: Iterable[int] = (),
        next_local_id: int = 1,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.doc = doc
        self.awareness = awareness
        self._on_change = on_change
        # Insertion-ordered, hence sorted: ids only grow.
        self._pending: dict[int, None] = dict.fromkeys(sorted(set(pending)))
        if self._pending and next_local_id <= max(self._pending):
            raise ValueError("next_local_id must be larger than every pending id")
        self._next_local_id = max(next_local_id, 1)
        self._events: list[SessionEvent] = []
        # Messages waiting for data_to_send(): wire messages as they are, plus our SyncStep2
        # (with the highest local id it covers) and local updates, which are counted there.
        self._outbox: list[WireMessage | _Step2 | _Held | LocalUpdate] = []
        self._applying_remote = False
        self._remote_changed = False
        self._early = EarlyUpdates()  # remote updates waiting for what they build on
        # Local ids the relay refused. They stay pending (the document holds them), and every
        # later local write builds on them, so the relay refuses those too: the replica is
        # blocked until `Replica.recover` drops them.
        self._refused_ids: set[int] = set()
        self._closed = False
        # Per-connection state, reset by connect()/disconnect().
        self._connected = False
        self._answered_step1 = False
        self._synced = False
        self._sent = 0
        self._acked = 0
        self._refused: set[int] = set()  # sequence numbers the relay refused
        # (message seq, covers_upto, local ids): a SyncUpdate carries `local ids`; a SyncStep2
        # carries every id pending when it was made, i.e. every id still pending <= covers_upto.
        self._inflight: deque[tuple[int, int, tuple[int, ...]]] = deque()
        self._subscription: Subscription = doc.observe(self._on_transaction)
        self._awareness_subscription: str | None = None
        if awareness is not None:
            self._awareness_subscription = awareness.observe(self._on_awareness)

    # -- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def synced(self) -> bool:
        """Whether the relay's state has been applied on the current connection."""
        return self._synced

    @property
    def pending_ids(self) -> tuple[int, ...]:
        """Ids of local updates the relay has not acknowledged as durably stored."""
        return tuple(self._pending)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def refused_ids(self) -> tuple[int, ...]:
        """Pending local ids whose message the relay refused (see `blocked`)."""
        return tuple(sorted(self._refused_ids))

    @property
    def blocked(self) -> bool:
        """A local write was refused: it and what builds on it can never be stored."""
        return bool(self._refused_ids)

    @property
    def durable(self) -> bool:
        """Whether every local update is durably stored by the relay."""
        return not self._pending

    @property
    def next_local_id(self) -> int:
        return self._next_local_id

    @property
    def has_data_to_send(self) -> bool:
        """Whether `data_to_send` would return something now."""
        return bool(self._outbox)

    @property
    def sent(self) -> int:
        """SyncStep2/SyncUpdate messages handed out on this connection."""
        return self._sent

    @property
    def acked(self) -> int:
        """How many of them the relay has acknowledged as durably stored."""
        return self._acked

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop observing the document and the awareness (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.doc.unobserve(self._subscription)
        if self.awareness is not None and self._awareness_subscription is not None:
            self.awareness.unobserve(self._awareness_subscription)
            self._awareness_subscription = None
        self._connected = False

    def connect(self) -> None:
        """A connection opened: queue our state vector and our presence."""
        self._check_open()
        self._reset_connection()
        self._connected = True
        self._outbox.append(SyncStep1(self.doc.get_state()))
        if self.awareness is not None and self.awareness.get_local_state() is not None:
            self._outbox.append(self._awareness_message([self.awareness.client_id]))

    def disconnect(self) -> None:
        """The connection closed: forget what was in flight and the others' presence.

        Unacknowledged local updates stay pending; the next connection's SyncStep2 covers them.
        """
        self._reset_connection()
        if self.awareness is not None:
            others = [c for c in self.awareness.states if c != self.awareness.client_id]
            if others:
                self.awareness.remove_awareness_states(others, REMOTE_ORIGIN)

    def goodbye(self) -> None:
        """Queue the removal of our presence, for a clean shutdown of the connection."""
        if self.awareness is not None and self._connected:
            self.awareness.set_local_state(None)

    def _reset_connection(self) -> None:
        self._connected = False
        self._answered_step1 = False
        self._synced = False
        self._sent = 0
        self._acked = 0
        self._refused.clear()
        self._inflight.clear()
        self._outbox.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the sync session is closed")

    # -- I/O-facing --------------------------------------------------------------------------

    def data_to_send(self) -> list[WireMessage]:
        """Messages to send now, in this order, on the current connection.

        Consecutive local updates are merged into one SyncUpdate (fewer messages against the
        relay's rate limit). Sequence numbers are assigned here, so the I/O layer must send all
        of them, in order, or drop the connection (and call `disconnect`)."""
        items, self._outbox = self._outbox, []
        messages: list[WireMessage] = []
        batch: list[LocalUpdate] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if batch:
                update = (
                    batch[0].update
                    if len(batch) == 1
                    else merge(*(local.update for local in batch))
                )
                ids = tuple(local.local_id for local in batch)
                messages.append(self._count(SyncUpdate(update), 0, ids))
                batch.clear()
                size = 0

        for item in items:
            if isinstance(item, LocalUpdate):
                if size + len(item.update) > MAX_MERGED_UPDATE:
                    flush()
                batch.append(item)
                size += len(item.update)
                continue
            flush()
            if isinstance(item, _Step2):
                messages.append(self._count(SyncStep2(item.update), item.covers_upto, ()))
            elif isinstance(item, _Held):
                messages.append(self._count(SyncUpdate(item.update), 0, ()))
            else:
                messages.append(item)
        flush()
        return messages

    def events(self) -> list[SessionEvent]:
        """What happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    def track_local(self, update: bytes) -> LocalUpdate | None:
        """Track content already in the document (e.g. written before the session existed)
        as a pending local update. Returns None when `update` is empty."""
        self._check_open()
        if update == EMPTY_UPDATE:
            return None
        local = self._record_local(update)
        if self._answered_step1:
            self._outbox.append(local)
        return local

    def sent_as_is(self, messages: Iterable[WireMessage]) -> None:
        """The I/O layer is about to send `messages`, which this session did not produce (a
        test's hostile peer, a forwarder), on the current connection. The SyncStep2 and
        SyncUpdate among them are counted as every update sent is, carrying no local update,
        so that the relay's acknowledgements stay in step. Call it right before sending them,
        in the order they go out with what `data_to_send` returns."""
        self._check_open()
        if not self._connected:
            raise RuntimeError("sent_as_is() called while not connected")
        for message in messages:
            if isinstance(message, SyncStep2 | SyncUpdate):
                self._count(message, 0, ())

    def receive(self, message: WireMessage) -> None:
        """Handle one decoded message from the relay."""
        self._check_open()
        if not self._connected:
            raise RuntimeError("receive() called while not connected")
        if isinstance(message, SyncStep1):
            self._answer_step1(message.state_vector)
        elif isinstance(message, SyncStep2):
            # The relay computed it from our state vector and holds nothing back: complete.
            self._apply_remote(message.update, complete=True)
            if not self._synced:
                self._synced = True
                self._events.append(Synced())
        elif isinstance(message, SyncUpdate):
            self._apply_remote(message.update)
        elif isinstance(message, AwarenessMessage):
            self._apply_awareness(message.payload)
        elif isinstance(message, QueryAwareness):
            if self.awareness is not None:
                self._outbox.append(self._awareness_message(list(self.awareness.states)))
        elif isinstance(message, Ack):
            self._acknowledge(message.seq)
        elif isinstance(message, AuthDenied):
            self._denied(message.reason)
        elif isinstance(message, Extension):
            log.debug("ignoring unknown extension message type %d", message.type)
        else:
            raise TypeError(f"not a wire message: {message!r}")

    # -- sync --------------------------------------------------------------------------------

    def _answer_step1(self, state_vector: bytes) -> None:
        try:
            update = self.doc.get_update(state_vector)
            peer_state = decode_state_vector(state_vector)
        except Exception as error:  # pycrdt raises a bare ValueError/… on a bad state vector
            raise SyncProtocolError(f"undecodable state vector from the relay: {error}") from error
        self._outbox.append(_Step2(update, next(reversed(self._pending), 0)))
        # What we hold early follows as ordinary updates (Yjs puts its pending structs in the
        # step 2 itself, but ours is applied as complete, straight into pycrdt, which would
        # integrate a held part behind a gap): the peer may have what it waits for, and may
        # be the only one who still needs it (it crashed after sending it to us).
        for part in self._early.missing_from(peer_state):
            self._outbox.append(_Held(part))
        self._answered_step1 = True

    def _apply_remote(self, update: bytes, *, complete: bool = False) -> None:
        """Apply what of `update` can be integrated now; `crdtchat.early` holds the rest
        (a broadcast can overtake the sync step 2 carrying what it builds on)."""
        if update == EMPTY_UPDATE:
            return
        try:
            self._early.offer(update, self.doc.get_state, self._integrate, complete=complete)
        except Exception as error:
            raise SyncProtocolError(f"the relay sent an update pycrdt cannot apply: {error}") from (
                error
            )

    def _integrate(self, update: bytes) -> None:
        self._applying_remote = True
        self._remote_changed = False
        try:
            with self.doc.transaction(origin=REMOTE_ORIGIN):
                self.doc.apply_update(update)
        finally:
            self._applying_remote = False
        if self._remote_changed:
            # Persisted as received (not as pycrdt's re-encoding of what it integrated).
            self._events.append(RemoteUpdate(update))

    def _on_transaction(self, event: TransactionEvent) -> None:
        # Runs inside pycrdt's commit: never raise, never write to the document.
        if self._closed:
            return
        if self._applying_remote:
            self._remote_changed = True
            return
        local = self._record_local(event.update)
        if self._answered_step1:
            self._outbox.append(local)
        if self._on_change is not None:
            self._on_change()

    def _record_local(self, update: bytes) -> LocalUpdate:
        local = LocalUpdate(self._next_local_id, update)
        self._next_local_id += 1
        self._pending[local.local_id] = None
        self._events.append(local)
        return local

    def _count(
        self, message: SyncStep2 | SyncUpdate, covers_upto: int, local_ids: tuple[int, ...]
    ) -> SyncStep2 | SyncUpdate:
        self._sent += 1
        self._inflight.append((self._sent, covers_upto, local_ids))
        return message

    def _acknowledge(self, seq: int) -> None:
        if seq > self._sent:
            raise SyncProtocolError(f"ack {seq} for more than the {self._sent} messages sent")
        if seq < self._acked:
            raise SyncProtocolError(f"ack {seq} went backwards from {self._acked}")
        self._acked = seq
        durable: list[int] = []
        while self._inflight and self._inflight[0][0] <= seq:
            message_seq, covers_upto, local_ids = self._inflight.popleft()
            settled = list(local_ids)
            for pending_id in self._pending:
                if pending_id > covers_upto:
                    break
                settled.append(pending_id)
            if message_seq in self._refused:
                self._refused_ids.update(i for i in settled if i in self._pending)
                continue
            for local_id in settled:
                if local_id in self._pending:
                    del self._pending[local_id]
                    durable.append(local_id)
        if durable:
            self._events.append(Durable(tuple(sorted(set(durable)))))

    def _denied(self, reason: str) -> None:
        # The relay acks every message before the one it refuses: that one is acked + 1.
        if self._sent > self._acked:
            self._refused.add(self._acked + 1)
        self._events.append(Denied(reason))

    # -- awareness ---------------------------------------------------------------------------

    def _awareness_message(self, client_ids: list[int]) -> AwarenessMessage:
        assert self.awareness is not None
        return AwarenessMessage(self.awareness.encode_awareness_update(client_ids))

    def _apply_awareness(self, payload: bytes) -> None:
        if self.awareness is None:
            return
        try:
            self.awareness.apply_awareness_update(payload, REMOTE_ORIGIN)
        except (ValueError, IndexError, RuntimeError, UnicodeDecodeError) as error:
            raise SyncProtocolError(f"malformed awareness update from the relay: {error}") from (
                error
            )

    def _on_awareness(self, topic: str, change: tuple[dict[str, Any], Any]) -> None:
        assert self.awareness is not None
        changes, origin = change
        if origin == REMOTE_ORIGIN or origin == "timeout":
            if topic == "change":
                mine = self.awareness.client_id
                event = PresenceChanged(
                    added=tuple(c for c in changes["added"] if c != mine),
                    updated=tuple(c for c in changes["updated"] if c != mine),
                    removed=tuple(c for c in changes["removed"] if c != mine),
                )
                if event.added or event.updated or event.removed:
                    self._events.append(event)
                    if self._on_change is not None:
                        self._on_change()
            return
        # A local change ("update" fires on every renewal too, which keeps us alive remotely).
        if topic == "update" and self._connected:
            ids = changes["added"] + changes["updated"] + changes["removed"]
            if ids:
                self._outbox.append(self._awareness_message(ids))
                if self._on_change is not None:
                    self._on_change()
