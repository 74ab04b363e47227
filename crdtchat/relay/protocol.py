"""One room of the relay as a state machine without I/O (design §3, the relay's protocol core).

`RoomProtocol` decides what every input means for one room and says what must happen as a list
of actions; it never touches a socket, a thread, a clock or the event loop, so it runs the same
in the relay (`crdtchat.relay.room` is the I/O shell around it), in tests and in the simulator.
It is modelled on websockets' `Protocol` and h11's `Connection`, and on the client side's
`crdtchat.sync.SyncSession`.

Inputs (methods): a peer joined or left, a decoded wire message from a peer, the store has
durably written up to a sequence number, the store failed, a token refresh was verified, a
token's expiry is due, a peer's access was revoked, the relay's own membership write, an
awareness `tick`, and for a cluster node, a stored update judged elsewhere (`apply_stored`) and
presence from another node (`remote_awareness`). Every input that depends on time takes `now`
(seconds since the epoch, the clock of token expiries).

Actions (returned, to be performed in order): `Send` to one peer, `Broadcast` to every peer but
one, `Append`/`Compact` to the store, `Acknowledge` (the `ext=ack` count), `Close` a peer with
a code, the wire reason and a machine-readable `CloseKind`, `VerifyToken` (a refresh's token,
verified by the shell, whose answer comes back as `refresh_verified`), and `CheckWaiting`
(the worker feed may have changed).

Ordering: an accepted update gets the next sequence number and an `Append`; it is broadcast,
and its sender's acknowledgement counted, only once `stored` says the store holds it. Each
peer's results (acknowledgements, refusals, sync step 2 replies) are finished in the order its
messages came, each after the store holds everything the result may contain.

Judging and committing are separate steps (`judge_update`, `commit_update`): the single relay
commits what it judged at once; a cluster node judges against its copy and commits what its
stream hands back, in stream order (design §3, the relay's protocol core).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from pycrdt import Awareness, Doc

from crdtchat.errors import CrdtchatError, RemoteProtocolError
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.livedoc import (
    Accepted,
    LiveDoc,
    Outcome,
    OverLimits,
    Refused,
    UndecodableUpdate,
)
from crdtchat.relay.membership import members, role_of
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.ratelimit import Subject, TokenBucket
from crdtchat.schema import Member, is_person_room, person_room
from crdtchat.tokens import TokenClaims, TokenError, refusal_text
from crdtchat.wire import (
    MESSAGE_TOKEN_REFRESH,
    AuthDenied,
    AwarenessEntry,
    AwarenessMessage,
    Extension,
    QueryAwareness,
    RefreshAnswer,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireError,
    WireMessage,
    decode_awareness,
    decode_token_refresh,
    encode_awareness,
    encode_message,
)

log = logging.getLogger("crdtchat.relay.protocol")

# Close code and reason for a connection whose token expired (design §3): in the 4400s, which
# y-websocket clients and `Replica` take as "do not come back with this token".
TOKEN_EXPIRED_CODE = 4401
TOKEN_EXPIRED = "token expired"
# A connection whose membership ended (design §4): the same path as an expiry, its own reason.
ACCESS_REVOKED_CODE = 4403
STORAGE_FAILED = "relay storage failed"
# A connection whose acknowledgement or reply rested on a write that, judged again after a
# cluster conflict, was not stored (refused, or its sender gone): it syncs again.
REJUDGED = "a write was judged again and not stored; sync again"


class CloseKind(StrEnum):
    """Why the relay closed a connection, for machines (metrics, tests, the cluster); the wire
    reason is for people and stays as clients know it."""

    MALFORMED = "malformed"  # undecodable frames, messages, updates, state vectors, text frames
    LIMITS = "limits"  # a frame, update or awareness state over a size or shape limit
    RATE = "rate"  # messages, bytes or awareness per second over the connection's rate
    REFUSALS = "refusals"  # a subject that keeps sending refused writes
    QUOTA = "quota"  # a subject's connections, rooms or bytes written (design §7.4)
    EXPIRED = "expired"  # the token expired
    REVOKED = "revoked"  # the room's membership no longer grants access
    SLOW = "slow"  # the peer does not read what is sent to it
    UNAVAILABLE = "unavailable"  # the store failed, the room limit, the relay stopping


class PeerViolation(RemoteProtocolError):
    """The peer broke the protocol or a limit; close its connection with this code and reason."""

    def __init__(self, code: int, reason: str, kind: CloseKind) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind


# A relay change decided from the room's document: returns the write to make (a function of the
# roots, `LiveDoc.local_write`), or raises a CrdtchatError (e.g. membership's AccessError) to
# refuse it.
Decide = Callable[[Doc], Callable[[dict[str, Any]], None]]


@dataclass(eq=False)
class LocalWrite:
    """A change of the relay's own (design §4, membership) until it is stored. A cluster node
    that withdraws it after a conflict decides it again in `resubmit`, against the document
    with the other node's write (judged again like a peer's write): `seq` then moves, or
    `refused` says why it can no longer be made. The shell waits for `seq` to be durable."""

    decide: Decide
    seq: int
    refused: CrdtchatError | None = field(default=None)


class Peer:
    """What the protocol keeps about one connection; the I/O shell subclasses it."""

    # Slots: a relay holds one per connection, mostly idle ones (issue 12: memory per connection).
    __slots__ = (
        "acked",
        "awareness_ids",
        "awareness_rate",
        "claims",
        "close_code",
        "close_kind",
        "close_reason",
        "closing",
        "expires",
        "identity",
        "queue",
        "settled",
        "shown_seq",
        "subject",
        "want_ack",
        "want_refresh",
    )

    def __init__(
        self,
        claims: TokenClaims,
        subject: Subject,
        config: RelayConfig,
        *,
        want_ack: bool = False,
        want_refresh: bool = False,
        identity: bool = False,
    ) -> None:
        self.claims = claims
        # A plain attribute: the broadcast loop reads it for every peer (design §3, access ends).
        self.expires = float(claims.exp)
        self.want_ack = want_ack
        self.want_refresh = want_refresh
        # Opened with an identity token: its role comes from the room's membership and follows
        # every change to it (RoomProtocol.enforce_access).
        self.identity = identity
        self.awareness_ids: set[int] = set()
        self.settled = 0  # SyncStep2/SyncUpdate messages stored or refused, in order
        self.acked = 0
        # The last sequence committed (stored or not) when it was sent the room's state vector:
        # its sync step 2 leaves out every write up to there (RoomProtocol.resubmit).
        self.shown_seq = 0
        # Results waiting for the store, in message order: (sequence, what, payload). None
        # until first needed: most peers never have one.
        self.queue: deque[tuple[int, int, Any]] | None = None
        # Most refusals rebuild the room's document (O(document)): a subject that keeps
        # sending refused writes, over however many connections, is closed rather than allowed
        # to burn the relay's CPU. Its quotas are shared by its connections too (design §7.4).
        self.subject = subject
        self.awareness_rate = TokenBucket(config.awareness_rate, config.awareness_burst)
        self.closing = False  # a close was decided
        self.close_code = 1000
        self.close_reason = ""
        self.close_kind: CloseKind | None = None

    @property
    def queued(self) -> int:
        """Results of this peer still waiting for the store (the shell's back-pressure)."""
        return 0 if self.queue is None else len(self.queue)

    def __repr__(self) -> str:
        return f"<peer {self.claims.sub}/{self.claims.role}>"


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` (one encoded wire message) to `peer`."""

    peer: Peer
    message: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send `message` to every peer of the room but `exclude` (the same bytes to each)."""

    message: bytes
    exclude: Peer | None = None


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """Tell `peer` (ext=ack) that its first `count` updates are settled: stored or refused."""

    peer: Peer
    count: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close `peer`'s connection; nothing more is sent to it."""

    peer: Peer
    code: int
    reason: str
    kind: CloseKind


@dataclass(frozen=True, slots=True)
class Append:
    """Store `update` as the room's update number `seq`; report `stored(seq)` once durable."""

    seq: int
    update: bytes


@dataclass(frozen=True, slots=True)
class Compact:
    """Replace the room's stored snapshot and log up to `upto_seq` by `snapshot`."""

    upto_seq: int
    snapshot: bytes


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Verify a refresh token of `peer`, then call `refresh_verified` with the outcome."""

    peer: Peer
    token: str


@dataclass(frozen=True, slots=True)
class CheckWaiting:
    """An accepted update may have changed whether the room waits for a worker (the feed).

    `judged_here` is False for a cluster node's update stored by another node: that node
    records whether the room waits, and this one only forgets what it recorded last."""

    judged_here: bool = True


Action = Send | Broadcast | Acknowledge | Close | Append | Compact | VerifyToken | CheckWaiting


# What waits in a peer's queue.
_UPDATE = 0  # an update (accepted or refused-less no-op) to count as settled
_REPLY = 1  # a message to send
_REFUSAL = 2  # an AuthDenied to send, counted as settled
_WITHDRAWN = 3  # an update `withdraw` took back (payload: its old sequence), until `resubmit`
_HELD = 2**62  # the gate of results that wait for `resubmit`: no store reaches it


class RoomProtocol:
    """One room's relay protocol: inputs in, actions out (see the module docstring)."""

    def __init__(self, name: str, config: RelayConfig, metrics: Metrics | None = None) -> None:
        self.name = name
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        # empty until `load`; the shell closes it when the room is done
        self.live = LiveDoc(limits=config.shape_limits)
        self.awareness = Awareness(Doc())
        self.awareness.set_local_state(None)  # the relay itself is not present
        # Which connection introduced each awareness client id: only it may change or clear
        # that state (design §3, presence is bound to its connection).
        self.awareness_owners: dict[int, Peer] = {}
        self.peers: dict[Peer, None] = {}  # insertion-ordered set
        self._members: dict[str, Member] | None = None  # see members()
        self.next_seq = 1
        self.durable_seq = 0  # the store holds every update up to here
        # Committed updates not yet durable: (seq, sender, the update), broadcast once stored.
        self._unstored: deque[tuple[int, Peer | None, bytes]] = deque()
        # Updates `withdraw` took back, to be judged again by `resubmit` (seq, sender, update).
        self._withdrawn: list[tuple[int, Peer | None, bytes]] = []
        self._local_writes: dict[int, LocalWrite] = {}  # the relay's own unstored writes, by seq
        # The unstored write that created the room and the subject charged for it (design
        # §7.4): refunded if that write is withdrawn (charged once, when judged again).
        self._creation: tuple[int, Subject] | None = None
        self._queued: dict[Peer, None] = {}  # peers with results waiting for the store
        self._log_length = 0
        self._log_bytes = 0
        self._snapshot_bytes = 0
        self._created = False  # the store holds something of this room (design §7.4 quotas)
        self.failed = False
        self.watches_feed = False  # set by the shell when a worker feed follows this room

    # -- lifetime ------------------------------------------------------------------------

    def load(
        self,
        state: bytes,
        next_seq: int,
        log_length: int,
        log_bytes: int,
        log: Sequence[bytes] = (),
    ) -> list[Action]:
        """The room as stored: its state, then the updates of `log` stored after it (or none:
        the whole room in `state`), the next sequence number and the size of the store's log.
        May ask for a compaction at once."""
        self.live.close()
        self.live = LiveDoc(state, limits=self.config.shape_limits, log=log)
        self._members = None
        self.next_seq = next_seq
        self.durable_seq = next_seq - 1
        self._log_length = log_length
        self._log_bytes = log_bytes
        self._snapshot_bytes = len(state)
        self._created = bool(state) or next_seq > 1
        if self._should_compact():
            return [self._compact(self.next_seq - 1)]
        return []

    def close(self) -> None:
        """Drop the live document's observers (yrs holds them; issue 12)."""
        self.live.close()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last update committed (stored or not yet)."""
        return self.next_seq - 1

    def flush(self) -> list[Action]:
        """Compact what the log holds (the room is unloading); nothing if the store failed."""
        if self.failed or not self._log_length:
            return []
        return [self._compact(self.next_seq - 1)]

    # -- peers ---------------------------------------------------------------------------

    def join(self, peer: Peer) -> list[Action]:
        """A peer connected: it gets the room's state vector and everyone's presence."""
        self.peers[peer] = None
        peer.shown_seq = self.last_seq
        actions: list[Action] = [Send(peer, encode_message(SyncStep1(self.live.state_vector())))]
        entries = self._awareness_entries()
        if entries:
            actions.append(Send(peer, encode_message(AwarenessMessage(encode_awareness(entries)))))
        return actions

    def leave(self, peer: Peer) -> list[Action]:
        """A peer's connection ended. What it wrote and was accepted is still broadcast once
        stored; its own pending results are dropped; its presence goes."""
        self.peers.pop(peer, None)
        self._queued.pop(peer, None)
        peer.queue = None
        owners = self.awareness_owners
        for cid in peer.awareness_ids:
            if owners.get(cid) is peer:
                del owners[cid]
        gone = [cid for cid in peer.awareness_ids if cid in self.awareness.states]
        if gone:
            self.awareness.remove_awareness_states(gone, "close")
            return [self._removal(gone)]
        return []

    def close_peer(self, peer: Peer, code: int, reason: str, kind: CloseKind) -> Close | None:
        """Decide to close `peer` (once): the action, or None if it is closing already."""
        if peer.closing:
            return None
        peer.closing = True
        peer.close_code = code
        peer.close_reason = reason
        peer.close_kind = kind
        return Close(peer, code, reason, kind)

    # -- messages ------------------------------------------------------------------------

    def receive(self, peer: Peer, message: WireMessage, now: float) -> list[Action]:
        """One decoded message from `peer`; a violation becomes a Close of that peer."""
        if peer.closing:
            return []  # its close is decided: what it still sends is dropped
        try:
            return self._receive(peer, message, now)
        except PeerViolation as violation:
            close = self.close_peer(peer, violation.code, violation.reason, violation.kind)
            return [] if close is None else [close]

    def _receive(self, peer: Peer, message: WireMessage, now: float) -> list[Action]:
        if peer.expires <= now:  # no sync, no awareness once the token has expired
            raise PeerViolation(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED, CloseKind.EXPIRED)
        if isinstance(message, SyncStep2 | SyncUpdate):
            return self._receive_update(peer, message.update, now)
        if isinstance(message, SyncStep1):
            try:
                update = self.live.update_since(message.state_vector)
            except WireError as error:
                raise PeerViolation(1008, str(error), CloseKind.MALFORMED) from None
            actions: list[Action] = []
            # The state vector stays with the reply: a cluster node that withdraws a write
            # the reply holds builds it again (`withdraw`).
            reply = (encode_message(SyncStep2(update)), message.state_vector)
            self._settle_after(peer, self.last_seq, _REPLY, reply, actions)
            return actions
        if isinstance(message, AwarenessMessage):
            return self._receive_awareness(peer, message.payload, now)
        if isinstance(message, QueryAwareness):
            self._take_awareness_rate(peer, now)  # a small query, a reply of every state
            entries = self._awareness_entries()
            return [Send(peer, encode_message(AwarenessMessage(encode_awareness(entries))))]
        if (
            isinstance(message, Extension)
            and message.type == MESSAGE_TOKEN_REFRESH
            and peer.want_refresh
        ):
            try:
                token = decode_token_refresh(message.payload)
            except WireError as error:
                raise PeerViolation(
                    1008, f"malformed token refresh: {error}", CloseKind.MALFORMED
                ) from None
            return [VerifyToken(peer, token)]
        # AuthDenied, Ack and other extensions are relay-to-client messages: nothing to do.
        return []

    # -- updates: judge, then commit -------------------------------------------------------

    def _receive_update(self, peer: Peer, update: bytes, now: float) -> list[Action]:
        actions: list[Action] = []
        verdict = self.judge_update(peer, update, now)
        if isinstance(verdict, Refused):
            self._settle_after(peer, 0, _REFUSAL, verdict.reason, actions)
        elif not verdict.delta:
            self._settle_after(peer, self.last_seq, _UPDATE, None, actions)
        else:
            seq = self.commit_update(verdict.delta, peer, actions)
            self._settle_after(peer, seq, _UPDATE, None, actions)
        return actions

    def judge_update(self, peer: Peer, update: bytes, now: float) -> Outcome:
        """Judge `update` from `peer` against the live document, which it changes if accepted
        (all or nothing); raises PeerViolation for input that ends the peer. Charges the
        subject's quotas for what it accepts. Returns livedoc's verdict as it is: Accepted
        (its delta to commit, b"" when it changed nothing) or Refused (told with AuthDenied)."""
        self.metrics.updates_in += 1
        if self.failed:  # its live document may hold unstored writes: nothing builds on it
            raise PeerViolation(1011, STORAGE_FAILED, CloseKind.UNAVAILABLE)
        claims = peer.claims
        subject = peer.subject
        try:
            outcome = self.live.apply(
                update,
                claims.role,
                claims.sub,
                partial=not peer.want_ack,
                gate=lambda size: self._admit_growth(subject, size, now),
            )
        except OverLimits as error:
            raise PeerViolation(1008, str(error), CloseKind.LIMITS) from None
        except UndecodableUpdate as error:
            raise PeerViolation(1008, str(error), CloseKind.MALFORMED) from None
        if not isinstance(outcome, Accepted):
            self.metrics.refused_writes += 1
            log.info("room %s: refused update from %r: %s", self.name, peer, outcome.reason)
            if not subject.take_refusal(now):
                raise PeerViolation(
                    1008,
                    f"too many refused writes from subject {subject.sub!r}",
                    CloseKind.REFUSALS,
                )
            return outcome
        if outcome.delta:
            subject.spend_bytes(len(outcome.delta), now)
            if not self._created:
                self._created = True
                subject.spend_room(now)
                self._creation = (self.next_seq, subject)  # committed next, as that seq
        return outcome

    def commit_update(self, delta: bytes, sender: Peer | None, actions: list[Action]) -> int:
        """Give an applied update its sequence number and store it; it is broadcast (to all
        but `sender`) once `stored` reaches it. Returns its sequence number."""
        if self.watches_feed:
            actions.append(CheckWaiting())
        seq = self.next_seq
        self.next_seq += 1
        self._unstored.append((seq, sender, delta))
        actions.append(Append(seq, delta))
        self._log_length += 1
        self._log_bytes += len(delta)
        self._created = True
        if self._should_compact():
            actions.append(self._compact(seq))
        return seq

    def _admit_growth(self, subject: Subject, size: int, now: float) -> None:
        """Called by LiveDoc.apply, before applying, for an update that adds `size` bytes of
        new structs: the room's size and the subject's quotas (design §7.4)."""
        config = self.config
        held = self._snapshot_bytes + self._log_bytes
        if held + size > config.max_document:
            raise PeerViolation(
                1009,
                f"room is full: its document holds {held} bytes, limit {config.max_document}",
                CloseKind.LIMITS,
            )
        if not self._created and not subject.rooms.can_take(1, now):
            raise PeerViolation(
                1013,
                f"quota: subject {subject.sub!r} created {config.quota_rooms:g} rooms "
                f"in {config.quota_interval:g} s; try again later",
                CloseKind.QUOTA,
            )
        if not subject.write_bytes.can_take(size, now):
            raise PeerViolation(
                1013,
                f"quota: subject {subject.sub!r} wrote {config.quota_bytes:g} bytes "
                f"in {config.quota_interval:g} s; try again later",
                CloseKind.QUOTA,
            )

    def apply_stored(self, update: bytes) -> list[Action]:
        """An update judged elsewhere and already stored (a cluster node's stream hands back
        another node's write): applied unjudged, committed as durable at once and broadcast
        to every peer; membership changes in it are enforced.

        Stream order is the contract: the shell hands these over between its own writes'
        `stored`, never while one of them is unstored (that write was judged against a copy
        without this update, so its conditional publish fails). If it does, the room fails
        (`store_failed`): peers reconnect and resend what was not acknowledged.
        """
        if self.failed:
            return []
        if self._unstored:
            return self.store_failed("a stored update arrived before this node's own write")
        if not self.live.apply_stored(update):
            return []
        actions: list[Action] = []
        if self.live.members_changed:  # another node's membership change (`local_write`)
            self._members = None
            actions = self.enforce_access()
        if self.watches_feed:
            actions.append(CheckWaiting(judged_here=False))
        seq = self.next_seq
        self.next_seq += 1
        self.durable_seq = seq
        self._log_length += 1
        self._log_bytes += len(update)
        self._created = True
        self.metrics.updates_stored += 1
        self.metrics.updates_out += len(self.peers)
        actions.append(Broadcast(encode_message(SyncUpdate(update))))
        if self._queued:
            for peer in list(self._queued):
                self._release(peer, actions)
        if self._should_compact():
            actions.append(self._compact(seq))
        return actions

    def withdraw(self) -> list[Action]:
        """Take back every update judged here and not yet stored: a cluster node's conditional
        publish was refused because another node wrote the room first. The live document is
        rebuilt without them (as after a refusal); their senders' results wait. The shell
        then applies what the stream holds (`apply_stored`) and calls `resubmit`, which
        judges them again in their original order; their Append actions are void (the shell
        drops those writes). Returns nothing to do now (a list, for symmetry)."""
        if self.failed or not self._unstored:
            return []
        withdrawn = list(self._unstored)
        self._unstored.clear()
        updates = self.live.withdraw()
        assert updates == [delta for _, _, delta in withdrawn], "document and core disagree"
        self._members = None
        self._withdrawn.extend(withdrawn)
        self.next_seq = self.durable_seq + 1
        self._log_length -= len(withdrawn)
        self._log_bytes -= sum(len(delta) for delta in updates)
        self.metrics.updates_withdrawn += len(withdrawn)
        # Quotas are charged for what is stored, once: what the withdrawn writes spent is given
        # back, and `resubmit` charges what it accepts again (design §7.4).
        for seq, sender, delta in withdrawn:
            if sender is not None:
                sender.subject.refund_bytes(len(delta))
            elif (local := self._local_writes.get(seq)) is not None:
                local.seq = _HELD  # not stored under that number: `resubmit` gives a new one
        if self._creation is not None:
            self._creation[1].refund_room()
            self._creation = None
            self._created = self.durable_seq > 0 or bool(self._snapshot_bytes)
        durable = self.durable_seq
        for peer in self._queued:
            queue = peer.queue
            if queue is None:
                continue
            for index, (seq, what, payload) in enumerate(queue):
                if seq <= durable:
                    continue
                if what == _UPDATE and payload is None:
                    queue[index] = (_HELD, _WITHDRAWN, seq)
                    continue
                if what == _REPLY:
                    # Built from a document that held the withdrawn writes, some of which may
                    # be refused when judged again: built again from what is stored (the live
                    # document now), so a reply never shows a peer an unstored write.
                    state_vector = payload[1]
                    payload = (
                        encode_message(SyncStep2(self.live.update_since(state_vector))),
                        state_vector,
                    )
                queue[index] = (_HELD, what, payload)  # after `resubmit`
        return []

    def resubmit(self, now: float) -> list[Action]:
        """Judge again what `withdraw` took back, in its original order, against the document
        as it is now (with what the stream held). A peer gone meanwhile drops its own; the
        relay's own writes are applied again unjudged. Each sender's results stay in the
        order of its messages; acknowledgements wait for the new writes to be stored.

        A withdrawn write that is not stored again (refused, or its sender gone) was in the
        state vector this room sent to every connection that joined after it was judged: a
        connection of the same subject (the same device reconnecting, most often) then left
        it out of its sync step 2, and acknowledging that step 2 would promise a write nobody
        stores. Those connections are closed instead, and sync again. (Held replies were
        rebuilt from what is stored by `withdraw`.)"""
        withdrawn, self._withdrawn = self._withdrawn, []
        actions: list[Action] = []
        if self.failed:
            return actions
        lost: dict[str, int] = {}  # subject -> first sequence of its writes not committed again
        for old_seq, sender, delta in withdrawn:
            if sender is None and (local := self._local_writes.pop(old_seq, None)) is not None:
                self._redo_local_write(local, actions)
                continue
            if sender is None:
                if self.live.apply_stored(delta, unstored=True):
                    if self.live.members_changed:
                        self._members = None
                        actions.extend(self.enforce_access())
                    self.commit_update(delta, None, actions)
                continue
            if sender not in self.peers or sender.queue is None:
                lost.setdefault(sender.claims.sub, old_seq)
                continue  # gone, or closed: its results were dropped
            try:
                verdict = self.judge_update(sender, delta, now)
            except PeerViolation as violation:
                close = self.close_peer(sender, violation.code, violation.reason, violation.kind)
                if close is not None:
                    actions.append(close)
                lost.setdefault(sender.claims.sub, old_seq)
                continue
            if isinstance(verdict, Refused):
                lost.setdefault(sender.claims.sub, old_seq)
                result: tuple[int, int, Any] = (0, _REFUSAL, verdict.reason)
            elif not verdict.delta:
                result = (self.last_seq, _UPDATE, None)
            else:
                result = (self.commit_update(verdict.delta, sender, actions), _UPDATE, None)
            queue = sender.queue
            queue[queue.index((_HELD, _WITHDRAWN, old_seq))] = result
        for peer in list(self.peers):
            first = lost.get(peer.claims.sub)
            if first is not None and peer.shown_seq >= first:  # its step 2 may be in flight
                self._queued.pop(peer, None)
                peer.queue = None
                close = self.close_peer(peer, 1011, REJUDGED, CloseKind.UNAVAILABLE)
                if close is not None:
                    actions.append(close)
        for peer in list(self._queued):
            queue = peer.queue
            if queue is None:
                continue
            for index, (seq, what, payload) in enumerate(queue):
                if seq == _HELD:
                    queue[index] = (self.last_seq, what, payload)
            self._release(peer, actions)
        return actions

    # -- the store -----------------------------------------------------------------------

    def stored(self, upto_seq: int) -> list[Action]:
        """The store durably holds every update up to `upto_seq`: broadcast them, in order,
        then finish what each peer had waiting for them."""
        actions: list[Action] = []
        if upto_seq <= self.durable_seq:
            return actions
        self.durable_seq = upto_seq
        unstored = self._unstored
        metrics = self.metrics
        count = 0
        while unstored and unstored[0][0] <= upto_seq:
            seq, sender, delta = unstored.popleft()
            if sender is None:
                self._local_writes.pop(seq, None)
            count += 1
            metrics.updates_stored += 1
            peers = self.peers
            metrics.updates_out += len(peers) - (sender is not None and sender in peers)
            actions.append(Broadcast(encode_message(SyncUpdate(delta)), sender))
        self.live.stored(count)
        if self._creation is not None and self._creation[0] <= upto_seq:
            self._creation = None
        if self._queued:
            for peer in list(self._queued):
                self._release(peer, actions)
        return actions

    def store_failed(self, reason: str) -> list[Action]:
        """The store lost a write: every peer is closed and nothing more is accepted; the shell
        drops the room and loads it again from the store later."""
        if self.failed:
            return []
        self.failed = True
        log.error("room %s failed: %s", self.name, reason)
        self._unstored.clear()
        self._queued.clear()
        self._local_writes.clear()
        actions: list[Action] = []
        for peer in self.peers:
            peer.queue = None
            close = self.close_peer(peer, 1011, STORAGE_FAILED, CloseKind.UNAVAILABLE)
            if close is not None:
                actions.append(close)
        return actions

    # -- settling, per peer --------------------------------------------------------------

    def _settle_after(
        self, peer: Peer, seq: int, what: int, payload: Any, actions: list[Action]
    ) -> None:
        """Finish a result of `peer` once the store holds `seq`, after its earlier results."""
        queue = peer.queue
        if not queue and seq <= self.durable_seq:
            self._finish(peer, what, payload, False, actions)
            return
        if queue is None:
            queue = peer.queue = deque()
        queue.append((seq, what, payload))
        self._queued[peer] = None

    def _release(self, peer: Peer, actions: list[Action]) -> None:
        queue = peer.queue
        durable = self.durable_seq
        while queue and queue[0][0] <= durable:
            _, what, payload = queue.popleft()
            self._finish(peer, what, payload, bool(queue), actions)
        if not queue:
            del self._queued[peer]

    def _finish(
        self, peer: Peer, what: int, payload: Any, more_queued: bool, actions: list[Action]
    ) -> None:
        """One result, in order; the acknowledgement waits while more are queued, and comes
        before a refusal so that the client can tell which message was refused."""
        if what == _REPLY:
            actions.append(Send(peer, payload[0]))
        elif what == _REFUSAL:
            self._ack(peer, actions)
            actions.append(Send(peer, encode_message(AuthDenied(payload))))
            peer.settled += 1
        else:
            peer.settled += 1
        if not more_queued:
            self._ack(peer, actions)

    @staticmethod
    def _ack(peer: Peer, actions: list[Action]) -> None:
        if peer.want_ack and peer.settled > peer.acked:
            peer.acked = peer.settled
            actions.append(Acknowledge(peer, peer.settled))

    # -- tokens and access ---------------------------------------------------------------

    def refresh_verified(
        self, peer: Peer, verified: TokenClaims | TokenError, now: float
    ) -> list[Action]:
        """The token of a refresh (extension 102) was verified (or not): answer either way.

        Whether it came in time was judged when it arrived (`receive`); verifying may take a
        while (a trusted issuer's keys), and an expiry meanwhile is the expiry timer's to
        close, as without a refresh.
        """
        if peer.closing:
            return []
        answer: RefreshAnswer
        try:
            if isinstance(verified, TokenError):
                raise verified
            claims = verified
            if peer.identity and claims.identity:
                role = self.role_for(claims.sub)
                if role is None:
                    raise TokenError("not a member of this room")
                claims = replace(claims, room=self.name, role=role)
            elif claims.identity:
                raise TokenError("identity token")
            elif not claims.allows_room(self.name):
                raise TokenError("wrong room")
        except TokenError as error:
            answer = RefreshAnswer(False, reason=f"token refused: {refusal_text(error.reason)}")
        else:
            if claims.sub != peer.claims.sub:
                answer = RefreshAnswer(False, reason="a refreshed token must name the same subject")
            else:
                peer.claims = claims
                peer.expires = float(claims.exp)
                answer = RefreshAnswer(True, exp=claims.exp)
        if not answer.accepted:
            log.info("room %s: refused a token refresh from %r: %s", self.name, peer, answer.reason)
        return [Send(peer, encode_message(answer.encode()))]

    def expire(self, peer: Peer, now: float) -> list[Action]:
        """The token's expiry is due: close the peer, unless a refresh moved it (then the shell
        waits until `peer.expires`)."""
        if peer.expires > now:
            return []
        close = self.close_peer(peer, TOKEN_EXPIRED_CODE, TOKEN_EXPIRED, CloseKind.EXPIRED)
        return [] if close is None else [close]

    def revoke(self, peer: Peer, reason: str) -> list[Action]:
        """Access ended: nothing more is sent to it (the broadcast loop reads `expires`), it
        can neither sync nor send awareness, and it is closed with `reason`."""
        close = self.close_peer(peer, ACCESS_REVOKED_CODE, reason, CloseKind.REVOKED)
        peer.expires = 0.0
        return [] if close is None else [close]

    def members(self) -> dict[str, Member]:
        """The room's membership, read once per change: only `local_write` changes it (no
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

    def enforce_access(self) -> list[Action]:
        """Give every identity connection the role its membership now grants, or end it."""
        table = self.members()
        actions: list[Action] = []
        for peer in list(self.peers):
            if not peer.identity or peer.expires == 0.0:
                continue
            sub = peer.claims.sub
            role = self.role_for(sub) if is_person_room(self.name) else role_of(table, sub)
            if role is None:
                log.info("room %s: %r is no longer a member", self.name, peer)
                actions.extend(
                    self.revoke(peer, f"access revoked: {peer.claims.sub} is no longer a member")
                )
            elif role != peer.claims.role:
                peer.claims = replace(peer.claims, role=role)  # type: ignore[arg-type]
        return actions

    def local_write(self, write: Callable[[dict[str, Any]], None]) -> tuple[int, list[Action]]:
        """A membership change of the relay's own (design §4): applied, enforced on every
        connection at once, then stored and sent to every peer. Returns its sequence number
        (the shell waits for `stored` to reach it) and the actions."""
        local, actions = self.local_change(lambda _doc: write)
        return local.seq, actions

    def local_change(self, decide: Decide) -> tuple[LocalWrite, list[Action]]:
        """`local_write` of what `decide` makes of the document now (it raises to refuse, and
        nothing is applied). After a conflict, `resubmit` decides it again (`LocalWrite`)."""
        if self.failed:
            raise PeerViolation(1011, STORAGE_FAILED, CloseKind.UNAVAILABLE)
        write = decide(self.live.doc)
        update = self.live.local_write(write)
        self._members = None
        actions = self.enforce_access()
        seq = self.commit_update(update, None, actions)
        local = self._local_writes[seq] = LocalWrite(decide, seq)
        return local, actions

    def _redo_local_write(self, local: LocalWrite, actions: list[Action]) -> None:
        """Decide a withdrawn change of the relay's own again, against the document as it is
        now: made under a new sequence number, or refused with `decide`'s reason."""
        try:
            write = local.decide(self.live.doc)
        except CrdtchatError as error:
            local.refused = error
            return
        update = self.live.local_write(write)
        self._members = None
        actions.extend(self.enforce_access())
        local.seq = self.commit_update(update, None, actions)
        self._local_writes[local.seq] = local

    # -- awareness -----------------------------------------------------------------------

    def _awareness_entries(self) -> list[AwarenessEntry]:
        own = self.awareness.client_id
        meta = self.awareness.meta
        return [
            AwarenessEntry(cid, int(meta[cid]["clock"]), json.dumps(state, separators=(",", ":")))
            for cid, state in self.awareness.states.items()
            if cid != own and cid in meta
        ]

    def _removal(self, client_ids: list[int]) -> Broadcast:
        meta = self.awareness.meta
        entries = [AwarenessEntry(cid, int(meta[cid]["clock"]), "null") for cid in client_ids]
        return Broadcast(encode_message(AwarenessMessage(encode_awareness(entries))))

    def tick(self, now: float) -> list[Action]:
        """Drop presence not renewed within the awareness timeout (what y-protocols'
        Awareness does on a timer); the shell calls this every few seconds."""
        awareness = self.awareness
        timeout = awareness._outdated_timeout  # milliseconds, as pycrdt counts them
        now_ms = now * 1000
        own = awareness.client_id
        states = awareness.states
        gone = [
            cid
            for cid, meta in awareness.meta.items()
            if cid != own and cid in states and timeout <= now_ms - meta["lastUpdated"]
        ]
        if not gone:
            return []
        awareness.remove_awareness_states(gone, "timeout")
        for peer in self.peers:
            peer.awareness_ids.difference_update(gone)
        for cid in gone:
            self.awareness_owners.pop(cid, None)
        return [self._removal(gone)]

    def remote_awareness(self, payload: bytes) -> list[Action]:
        """Presence from peers of another node (a cluster's presence subject): applied and
        broadcast to every peer here, owned by no connection of this node. Entries for client
        ids a local connection owns are dropped, as from any other connection."""
        try:
            entries = decode_awareness(payload, self.config.awareness_depth)
        except WireError:
            log.warning("room %s: dropped malformed remote awareness", self.name)
            return []
        owners = self.awareness_owners
        relay_id = self.awareness.client_id
        remote = [e for e in entries if e.client_id not in owners and e.client_id != relay_id]
        if not remote:
            return []
        if len(remote) < len(entries):
            payload = encode_awareness(remote)
        self.awareness.apply_awareness_update(payload, "remote")
        return [Broadcast(encode_message(AwarenessMessage(payload)))]

    def _take_awareness_rate(self, peer: Peer, now: float) -> None:
        if not peer.awareness_rate.take(1, now):
            rate = f"{self.config.awareness_rate:g}"
            raise PeerViolation(
                1008, f"rate limit exceeded: more than {rate} awareness messages/s", CloseKind.RATE
            )

    def _receive_awareness(self, peer: Peer, payload: bytes, now: float) -> list[Action]:
        """Relay one awareness update within the limits of design §7.3, or end the peer.

        Entries for client ids another connection owns are dropped first (design §3: presence
        is bound to its connection), so they count for nothing here.
        """
        config = self.config
        self._take_awareness_rate(peer, now)
        try:
            entries = decode_awareness(payload, config.awareness_depth)
        except WireError as error:
            raise PeerViolation(
                1008, f"malformed awareness update: {error}", CloseKind.MALFORMED
            ) from None
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
                return []
            payload = encode_awareness(own)
        held = set(peer.awareness_ids)
        for entry in own:
            size = len(entry.state.encode("utf-8"))
            if size > config.awareness_state_bytes:
                raise PeerViolation(
                    1009,
                    f"awareness state of client {entry.client_id} is {size} bytes, "
                    f"limit {config.awareness_state_bytes}",
                    CloseKind.LIMITS,
                )
            if entry.removed:
                held.discard(entry.client_id)
            else:
                held.add(entry.client_id)
        if len(held) > config.awareness_clients:
            raise PeerViolation(
                1008,
                f"awareness for more than {config.awareness_clients} client ids on one connection",
                CloseKind.LIMITS,
            )
        self.metrics.awareness_in += 1
        self.awareness.apply_awareness_update(payload, peer)
        peer.awareness_ids = held
        for entry in own:
            if entry.removed:
                owners.pop(entry.client_id, None)
            else:
                owners[entry.client_id] = peer
        return [Broadcast(encode_message(AwarenessMessage(payload)))]

    # -- compaction ----------------------------------------------------------------------

    def _should_compact(self) -> bool:
        if self._log_length == 0:
            return False
        if self._log_length >= self.config.compact_updates:
            return True
        return self._log_bytes >= max(self.config.compact_min_bytes, self._snapshot_bytes)

    def _compact(self, upto_seq: int) -> Compact:
        """Snapshot the live document (it holds every accepted update up to `upto_seq`)."""
        snapshot = self.live.compact()
        self._snapshot_bytes = len(snapshot)
        self._log_length = 0
        self._log_bytes = 0
        return Compact(upto_seq, snapshot)
