"""A deterministic network of replicas running the real sync cores, without I/O.

Every replica is a `Conversation` whose connections are `crdtchat.sync.SyncSession`s, the
client protocol a real `crdtchat.Replica` runs (its early-update path included); the relay,
when there is one, is `crdtchat.relay.protocol.RoomProtocol`, the core the relay runs, with
roles from tokens minted and verified by `crdtchat.tokens`. Every frame on a link is one
message encoded by `crdtchat.wire` and decoded on arrival. What is not real is I/O: links are
lists, the relay's store is `RelayStore` (a list that makes writes durable when told), and a
device's file is `LocalStore`.

Nothing here chooses anything: which frame is delivered, dropped or duplicated, which link is
cut, which replica or the relay crashes, when the relay's store makes its writes durable, are
all arguments, so a hypothesis test draws them and a failure shrinks to a minimal schedule and
replays exactly.

Topology: replicas are numbered 0..n-1 and the relay is the node `RELAY`. With `relay=True`
every replica has a connection to the relay; with `peers=True` (the default without a relay)
every pair of replicas has a direct link, each end a `SyncSession` (y-protocols sync is
symmetric: each side sends its state vector, answers the other's, then sends its updates;
a replica passes what it receives on one link to its others, as y-webrtc does).

- Peer links lose, reorder and duplicate frames (`drop`, `deliver` at any position,
  `duplicate`). A relay connection is a websocket: ordered and lossless while it lasts, so a
  frame on it is delivered first-in first-out, and `drop` there breaks the connection.
- `partition(a, b)` cuts a link (a connection drop; what was in flight is lost); `heal(a, b)`
  reconnects and both sides start the sync again.
- Each replica has a `LocalStore`: received and local updates stay unsaved until `save`;
  `crash` loses them, `restart` reopens from the store with a new client id (reusing a client
  id after losing updates would corrupt peers) and reconnects.
- The relay: what it asks its store to write is durable only after `store_writes` (the
  store's acknowledgement, `RoomProtocol.stored`); `crash_relay` loses the rest, `restart_relay`
  loads the room from what is durable. A write the relay refuses comes back to its replica as
  `Denied` (`SimulatedReplica.refused`, `.blocked`); `recover` gives it a way back, as
  `crdtchat.Replica.recover` does: a new document with a new client id, from the relay.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from pycrdt import Doc, Subscription, get_update

from crdtchat.cluster.cursor import (
    MAX_ROLLUPS_SKIPPED,
    Consumed,
    RoomCursor,
    publish_after_rollup,
)
from crdtchat.cluster.entries import Appended, RoomState
from crdtchat.cluster.errors import SequenceConflict
from crdtchat.cluster.memory import MemoryStream
from crdtchat.document import Conversation
from crdtchat.merge import merge
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.protocol import (
    Acknowledge,
    Action,
    Append,
    Broadcast,
    Close,
    CloseKind,
    Compact,
    Peer,
    RoomProtocol,
    Send,
)
from crdtchat.relay.ratelimit import Subject, Subjects
from crdtchat.sync import Denied, Durable, RemoteUpdate, SyncSession
from crdtchat.testing.operations import Operation
from crdtchat.tokens import mint_token, verify_token
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
    decode_frame,
    encode_message,
)

Clock = Callable[[], float]

#: The relay's node number on links (`queues[(0, RELAY)]`, `partition(0, RELAY)`).
RELAY: Final = -1
#: The simulated relay's room and token secret.
ROOM: Final = "simulated-room"
SECRET: Final = "crdtchat.testing: the simulated relay's token secret"
#: Closes that will happen again on every reconnection while the replica holds what caused
#: them: like a refusal, they block it.
STUCK: Final = frozenset(
    {CloseKind.MALFORMED, CloseKind.LIMITS, CloseKind.REFUSALS, CloseKind.QUOTA}
)
_TOKEN_TTL = 10 * 365 * 86400.0  # tokens never expire within a run

_KINDS: dict[type, str] = {
    SyncStep1: "sync_step1",
    SyncStep2: "sync_step2",
    SyncUpdate: "update",
    AwarenessMessage: "awareness",
    QueryAwareness: "query_awareness",
    Ack: "ack",
    AuthDenied: "auth_denied",
    Extension: "extension",
}


def node_name(node: int) -> str:
    return "relay" if node == RELAY else str(node)


@dataclass(frozen=True, eq=False)
class Envelope:
    """One frame in flight on the link sender → receiver: a message encoded by
    `crdtchat.wire`. `serial` numbers frames in the order they were sent (for reports)."""

    kind: str
    sender: int
    receiver: int
    payload: bytes
    serial: int = 0

    def message(self) -> WireMessage:
        """The frame decoded, as the receiver reads it."""
        (message,) = decode_frame(self.payload)
        return message

    def __repr__(self) -> str:
        detail = ""
        if self.kind == "ack":
            detail = f" {self.message().seq}"  # type: ignore[union-attr]
        elif self.kind == "auth_denied":
            detail = f" {self.message().reason!r}"  # type: ignore[union-attr]
        route = f"{node_name(self.sender)}->{node_name(self.receiver)}"
        return f"<#{self.serial} {self.kind}{detail} {route} {len(self.payload)}B>"


@dataclass
class LocalStore:
    """A device's storage: only what `save` moved into `saved` survives a crash."""

    saved: list[bytes] = field(default_factory=list)
    unsaved: list[bytes] = field(default_factory=list)

    def record(self, update: bytes) -> None:
        self.unsaved.append(update)

    def save(self) -> None:
        self.saved.extend(self.unsaved)
        self.unsaved.clear()

    def compact(self, state: bytes) -> None:
        """Replace the log by one update holding the whole document (`state`)."""
        self.saved = [state]
        self.unsaved.clear()

    def lose_unsaved(self) -> None:
        self.unsaved.clear()

    def load(self) -> list[bytes]:
        """What a restart replays, in the order it was saved."""
        return list(self.saved)


@dataclass
class SimulatedReplica:
    """One simulated device: a conversation (None while crashed), its sessions, its store.
    Not `crdtchat.Replica`, the real thing, whose client protocol (`SyncSession`) it runs."""

    index: int
    author: str
    client_id: int
    conversation: Conversation | None
    store: LocalStore = field(default_factory=LocalStore)
    #: every update this incarnation applied, local or received, raw: merging them must
    #: rebuild the live document
    history: list[bytes] = field(default_factory=list)
    incarnation: int = 0
    #: frames held back because their update starts beyond what this replica has (hold mode)
    held: list[Envelope] = field(default_factory=list)
    #: the role its relay token grants (None: no relay)
    role: str | None = None
    #: one client protocol per link, keyed by the node at the other end
    sessions: dict[int, SyncSession] = field(default_factory=dict)
    #: the relay's refusals (`AuthDenied` reasons) since this incarnation started
    refused: list[str] = field(default_factory=list)
    #: connections the relay closed since this incarnation started: (kind, reason)
    closes: list[tuple[CloseKind, str]] = field(default_factory=list)
    #: local ids the relay acknowledged as stored, this incarnation
    durable: int = 0
    _subscription: Subscription | None = None
    _receiving: bool = False

    @property
    def alive(self) -> bool:
        return self.conversation is not None

    @property
    def live(self) -> Conversation:
        """The conversation of a replica that is up."""
        if self.conversation is None:
            raise RuntimeError(f"replica {self.index} is crashed")
        return self.conversation

    @property
    def blocked(self) -> bool:
        """The relay refused something of this replica's: its document holds what the relay
        will never store, and later writes build on it (`SimulatedNetwork.recover`)."""
        return (
            bool(self.refused)
            or any(kind in STUCK for kind, _ in self.closes)
            or any(s.blocked for s in self.sessions.values())
        )

    def __repr__(self) -> str:
        state = "up" if self.alive else "crashed"
        return f"<replica {self.index} {self.author}/{self.role} {state} id={self.client_id}>"


@dataclass
class RelayStore:
    """The relay's store: `writes` it was asked for, durable once `acknowledge` says so.

    The protocol is real; the store is this list. Durable: a snapshot and a log of
    (sequence number, update), as `crdtchat.relay.store` keeps them."""

    snapshot: bytes = b""
    log: list[tuple[int, bytes]] = field(default_factory=list)
    durable_seq: int = 0
    writes: list[Append | Compact] = field(default_factory=list)

    def acknowledge(self, count: int) -> int:
        """Make the first `count` writes durable, in order; the highest sequence number the
        store now holds."""
        done, self.writes = self.writes[:count], self.writes[count:]
        for write in done:
            if isinstance(write, Append):
                self.log.append((write.seq, write.update))
                self.durable_seq = write.seq
            else:
                self.snapshot = write.snapshot
                self.log = [(seq, update) for seq, update in self.log if seq > write.upto_seq]
        return self.durable_seq

    def lose_unacknowledged(self) -> None:
        self.writes.clear()

    def state(self) -> bytes:
        """Everything durable, as one update."""
        parts = [self.snapshot] if self.snapshot else []
        parts += [update for _, update in self.log]
        return merge(*parts) if parts else b""


@dataclass(frozen=True)
class Outgoing:
    """A frame the relay sends on connection `receiver` (a replica's index)."""

    receiver: int
    frame: bytes


@dataclass(frozen=True)
class Closed:
    """The relay closed connection `index` (its I/O shell then drops the connection)."""

    index: int
    kind: CloseKind
    reason: str


#: What the relay's I/O shell does with the protocol's actions, in order.
RelayOutput = list[Outgoing | Closed]


class RelayShell:
    """A relay's I/O shell without I/O: one room's `RoomProtocol` and its connections, each
    numbered by the caller (a replica's index). Each method hands the protocol an event and
    returns what the shell would do (`RelayOutput`: frames to send, connections closed, in
    order). The single relay (`SimulatedRelay`) and a cluster's node (`SimulatedNode`) differ
    in where the protocol's writes go (`write`) and how the room loads (`start`)."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig(secret=SECRET)
        self.protocol: RoomProtocol | None = None
        self.subjects = Subjects(self.config.subject_quotas())
        #: the protocol's peer of each connection, by its number
        self.peers: dict[int, Peer] = {}
        #: every connection the relay closed: (connection, kind, reason)
        self.closes: list[tuple[int, CloseKind, str]] = []
        self.crashes = 0

    @property
    def up(self) -> bool:
        return self.protocol is not None

    @property
    def room(self) -> RoomProtocol:
        if self.protocol is None:
            raise RuntimeError(f"{self!r} is crashed")
        return self.protocol

    def start(self) -> RelayOutput:
        """Load the room from what is durable."""
        raise NotImplementedError

    def write(self, action: Append | Compact) -> None:
        """Take a write the protocol asked for."""
        raise NotImplementedError

    def stop(self) -> None:
        """The process dies: its connections are gone."""
        if self.protocol is not None:
            self.protocol.close()
        self.protocol = None
        self.peers.clear()
        self.subjects = Subjects(self.config.subject_quotas())
        self.crashes += 1

    def peer(self, role: str, author: str) -> Peer:
        """A new connection's peer, with the role its (real) token grants."""
        token = mint_token(SECRET, ROOM, role, author, _TOKEN_TTL)
        claims = verify_token(SECRET, token, ROOM)
        subject = self.subjects.connect(claims.sub)
        if not isinstance(subject, Subject):
            raise AssertionError(subject)
        return Peer(claims, subject, self.config, want_ack=True)

    def connect(self, index: int, role: str, author: str) -> RelayOutput:
        """Connection `index` opens with a token for (`role`, `author`)."""
        peer = self.peer(role, author)
        self.peers[index] = peer
        return self.perform(self.room.join(peer))

    def disconnect(self, index: int) -> RelayOutput:
        """Connection `index` ended (the client left, or the link broke)."""
        peer = self.peers.pop(index, None)
        if peer is None:
            return []
        self.subjects.disconnect(peer.subject)
        return self.perform(self.room.leave(peer))

    def receive(self, index: int, message: WireMessage, now: float) -> RelayOutput:
        """A message arrived on connection `index`."""
        return self.perform(self.room.receive(self.peers[index], message, now))

    def perform(self, actions: list[Action]) -> RelayOutput:
        """Carry out the protocol's actions as the I/O shell does; writes go to `write`.
        VerifyToken (no refresh here) and CheckWaiting (no worker feed) do nothing."""
        output: RelayOutput = []
        for action in actions:
            if isinstance(action, Send | Acknowledge):
                index = self._index_of(action.peer)
                if index is None or action.peer.closing:
                    continue
                frame = (
                    action.message
                    if isinstance(action, Send)
                    else encode_message(Ack(action.count))
                )
                output.append(Outgoing(index, frame))
            elif isinstance(action, Broadcast):
                for index, peer in self.peers.items():
                    if peer is not action.exclude and not peer.closing:
                        output.append(Outgoing(index, action.message))
            elif isinstance(action, Append | Compact):
                self.write(action)
            elif isinstance(action, Close):
                index = self._index_of(action.peer)
                if index is not None:
                    self.closes.append((index, action.kind, action.reason))
                    output.append(Closed(index, action.kind, action.reason))
        return output

    def _index_of(self, peer: Peer) -> int | None:
        for index, connected in self.peers.items():
            if connected is peer:
                return index
        return None


class SimulatedRelay(RelayShell):
    """The relay: one room's `RoomProtocol` over a `RelayStore`, and its connections; the
    store's writes wait in `store` until `store_writes`. `SimulatedNetwork` runs it between
    replicas; a test can drive it alone."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        super().__init__(config)
        self.store = RelayStore()

    def __repr__(self) -> str:
        return "<relay>"

    def start(self) -> RelayOutput:
        """Load the room from what the store holds durably."""
        self.protocol = RoomProtocol(ROOM, self.config)
        store = self.store
        log_bytes = sum(len(update) for _, update in store.log)
        return self.perform(
            self.protocol.load(store.state(), store.durable_seq + 1, len(store.log), log_bytes)
        )

    def stop(self) -> None:
        """The process dies: connections and unacknowledged writes are gone."""
        super().stop()
        self.store.lose_unacknowledged()

    def write(self, action: Append | Compact) -> None:
        self.store.writes.append(action)

    def store_writes(self, count: int | None = None) -> RelayOutput:
        """The store makes its first `count` writes (all: None) durable and says so."""
        store = self.store
        before = store.durable_seq
        durable = store.acknowledge(len(store.writes) if count is None else count)
        if self.up and durable > before:
            return self.perform(self.room.stored(durable))
        return []


@dataclass
class Publish:
    """An accepted update in a node's chain: published on the room subject's last sequence the
    node knows, one at a time, in the order the protocol committed them (relaynode.py's
    per-room chain); `landed` once the stream took it, until its acknowledgement arrives."""

    seq: int  # the protocol's sequence number
    update: bytes
    msg_id: str
    epoch: int  # the cursor's epoch when it was committed: a withdrawal voids it
    landed: Appended | None = None


class NodeCursor(RoomCursor):
    """The node's `RoomCursor` and its writes not yet stored (relaynode.py's futures)."""

    def __init__(self, node_id: str, last: int, token: str) -> None:
        super().__init__(node_id=node_id, last=last, token=token)
        self.pending: dict[str, int] = {}  # msg id -> the protocol's sequence number

    def withdraw(self) -> None:
        self.pending.clear()
        super().withdraw()


class SimulatedNode(RelayShell):
    """One relay node of a cluster: the room's `RoomProtocol` driven as `crdtchat serve --nats`
    drives it (crdtchat/cluster/relaynode.py), over the in-process stand-in for the stream
    (`crdtchat.cluster.memory.MemoryStream`), its position kept by the same `RoomCursor`.

    Each of its steps is the caller's choice: `publish` (the chain's head goes to the stream,
    conditional on the last sequence the node knows), `acknowledge` (the stream's
    acknowledgement reaches the node: the protocol's `stored`, which broadcasts and acks),
    `consume` (its follower hands over the next entry: its own write, or another node's,
    applied unjudged, or judged again after a withdrawal). Not consuming is lag."""

    def __init__(self, index: int, config: RelayConfig, stream: MemoryStream) -> None:
        super().__init__(config)
        self.index = index
        self.stream = stream
        self.cursor: NodeCursor | None = None
        self.consumed = 0  # the last stream sequence its follower handed over
        self.chain: list[Publish | Compact] = []
        self.loads = 0
        self.conflicts = 0  # publishes the stream refused: another node wrote first

    def __repr__(self) -> str:
        return f"<node {self.index} {'up' if self.up else 'down'}>"

    @property
    def position(self) -> NodeCursor:
        if self.cursor is None:
            raise RuntimeError(f"{self!r} is crashed")
        return self.cursor

    def start(self) -> RelayOutput:
        """Load the room from the stream (snapshot and tail), as `ClusterStore.load` does."""
        entries = list(self.stream.rooms.get(ROOM, []))
        state = RoomState(ROOM, entries[-1].seq if entries else 0, entries)
        self.loads += 1
        self.cursor = NodeCursor(f"node{self.index}", state.seq, f"load{self.loads}")
        self.consumed = state.seq
        self.protocol = RoomProtocol(ROOM, self.config)
        updates = state.updates
        log_bytes = sum(len(entry.data) for entry in updates)
        return self.perform(self.protocol.load(state.merged(), 1, len(updates), log_bytes))

    def stop(self) -> None:
        """The node dies: connections, the chain and acknowledgements in flight are gone;
        what the stream took stays."""
        super().stop()
        self.cursor = None
        self.chain.clear()

    def write(self, action: Append | Compact) -> None:
        if isinstance(action, Append):
            cursor = self.position
            msg_id = cursor.msg_id(action.seq)
            cursor.pending[msg_id] = action.seq
            self.chain.append(Publish(action.seq, action.update, msg_id, cursor.epoch))
        else:
            self.chain.append(action)

    # -- what the node may do next -------------------------------------------------------

    def _head(self) -> Publish | Compact | None:
        """The chain's first write that is not void (withdrawn before it was published)."""
        epoch = self.position.epoch
        while self.chain:
            head = self.chain[0]
            if isinstance(head, Compact) or head.landed is not None or head.epoch == epoch:
                return head
            self.chain.pop(0)
        return None

    def can_publish(self) -> bool:
        head = self._head() if self.up else None
        return head is not None and not (isinstance(head, Publish) and head.landed is not None)

    def can_acknowledge(self) -> bool:
        head = self.chain[0] if self.up and self.chain else None
        return isinstance(head, Publish) and head.landed is not None

    def lag(self) -> int:
        """Entries of the room's subject its follower has not handed over yet."""
        return sum(1 for entry in self.stream.rooms.get(ROOM, []) if entry.seq > self.consumed)

    # -- steps ---------------------------------------------------------------------------

    def publish(self) -> RelayOutput:
        """The chain's head goes to the stream: an update conditionally on the last sequence
        the node knows (after a roll-up of exactly that state, on the roll-up), a compaction
        as a conditional roll-up by the node whose write crossed the threshold. A refused
        update stays at the head: the follower's next foreign entry withdraws it."""
        head = self._head()
        cursor = self.position
        if isinstance(head, Compact):
            self.chain.pop(0)
            covers = cursor.compaction_covers(head.upto_seq)
            if covers is not None:
                with contextlib.suppress(SequenceConflict):  # written meanwhile: skipped
                    cursor.last = self.stream.store(
                        ROOM,
                        head.snapshot,
                        expected=covers,
                        msg_id=f"{ROOM}:snapshot:{covers}",  # as MemoryRoomLog.compact names it
                        rollup=True,
                        covers=covers,
                    ).seq
            return []
        if head is None or head.landed is not None:
            raise RuntimeError(f"{self!r} has nothing to publish")
        expected = cursor.last
        for _ in range(MAX_ROLLUPS_SKIPPED):
            try:
                head.landed = self.stream.store(
                    ROOM, head.update, expected=expected, msg_id=head.msg_id, rollup=False
                )
                return []
            except SequenceConflict:
                entries = self.stream.rooms.get(ROOM)
                after = publish_after_rollup(entries[-1] if entries else None, expected)
                if after is None:
                    break
                expected = after
        self.conflicts += 1
        return []

    def acknowledge(self) -> RelayOutput:
        """The stream's acknowledgement of the head's publish: the write is stored."""
        head = self.chain.pop(0)
        assert isinstance(head, Publish) and head.landed is not None
        cursor = self.position
        cursor.published(head.seq, head.landed.seq)
        seq = cursor.pending.pop(head.msg_id, None)
        return [] if seq is None else self.perform(self.room.stored(seq))

    def consume(self, now: float) -> RelayOutput:
        """The follower hands over the subject's next entry (a lagging follower after a
        roll-up gets the roll-up)."""
        entry = next(e for e in self.stream.rooms.get(ROOM, []) if e.seq > self.consumed)
        self.consumed = entry.seq
        cursor = self.position
        consumed = cursor.consume(entry)
        if self.room.failed or consumed is Consumed.KNOWN:
            return []
        if consumed is Consumed.OWN:  # its own write, handed back: it is stored
            seq = cursor.pending.pop(entry.msg_id, None)
            return [] if seq is None else self.perform(self.room.stored(seq))
        return self.perform(cursor.apply_foreign(entry, self.room, now))

    def state(self) -> bytes:
        """The node's copy of the room, as one update."""
        return self.room.live.doc.get_update()


class SimulatedNetwork:
    """N replicas, maybe a relay, their links and stores; every choice is the caller's."""

    def __init__(
        self,
        authors: Sequence[str],
        *,
        clock: Clock,
        client_ids: Sequence[int],
        connected: bool = True,
        hold_early_updates: bool = False,
        relay: bool = False,
        roles: Sequence[str] | None = None,
        peers: bool | None = None,
        relay_config: RelayConfig | None = None,
        nodes: int = 0,
    ) -> None:
        """Start every replica empty; if `connected`, every link connects (and syncs).

        With `relay`, each replica connects to a relay with the role `roles[i]` ("writer"
        by default; its author is the token's subject). `peers` links every pair directly
        (default: when there is no relay). With `nodes` > 0 the relay is a cluster of that
        many `SimulatedNode`s over one stream, replica i attached to node i % nodes.

        With `hold_early_updates`, the network keeps an update back before the replica sees
        it, until all of it can be integrated; by default the replica's `SyncSession` does
        that itself (`crdtchat.early`), which is the code path real peers take.
        """
        if len(client_ids) != len(authors) or len(set(client_ids)) != len(client_ids):
            raise ValueError("one distinct client id per replica")
        if roles is not None and len(roles) != len(authors):
            raise ValueError("one role per replica")
        self.clock = clock
        self.hold_early_updates = hold_early_updates
        self.used_client_ids: set[int] = set()
        #: whether replicas connect to a relay (the single one, or a cluster's nodes)
        self.relayed = relay
        self.relay: SimulatedRelay | None = None
        #: the cluster: its stream and its nodes (none without one)
        self.stream = MemoryStream()
        self.nodes: list[SimulatedNode] = []
        config = relay_config or RelayConfig(secret=SECRET)
        if relay and nodes:
            self.nodes = [SimulatedNode(n, config, self.stream) for n in range(nodes)]
        elif relay:
            self.relay = SimulatedRelay(config)
        #: the node each replica's relay connection goes to (a cluster's)
        self.attached: list[int] = [i % nodes if nodes else 0 for i in range(len(authors))]
        size = len(authors)
        self.peer_links = (not relay) if peers is None else peers
        links: list[tuple[int, int]] = []
        if self.peer_links:
            links += [(a, b) for a in range(size) for b in range(size) if a != b]
        if relay:
            links += [pair for i in range(size) for pair in ((i, RELAY), (RELAY, i))]
        self.queues: dict[tuple[int, int], list[Envelope]] = {link: [] for link in links}
        self.cut: set[frozenset[int]] = set() if connected else self._all_pairs(size)
        self.delivered = 0
        self.held_total = 0
        #: every refusal the relay sent: (replica, reason)
        self.refusals: list[tuple[int, str]] = []
        self._serials = itertools.count(1)
        #: replicas whose relay connection closed for a passing reason (`settle` reconnects)
        self._closed_transiently: list[int] = []
        self.replicas: list[SimulatedReplica] = []
        for index, (author, client_id) in enumerate(zip(authors, client_ids, strict=True)):
            role = None if not relay else (roles[index] if roles is not None else "writer")
            replica = SimulatedReplica(
                index=index, author=author, client_id=client_id, conversation=None, role=role
            )
            self.replicas.append(replica)
        for shell in self.shells():
            self._route(shell.start())
        for replica in self.replicas:
            self._open(replica, replica.client_id)

    # -- state ------------------------------------------------------------------------------

    def linked(self, a: int, b: int) -> bool:
        """Whether the topology has a link between `a` and `b` (cut or not)."""
        return (a, b) in self.queues

    def up(self, node: int) -> bool:
        if node == RELAY:
            return any(shell.up for shell in self.shells())
        return self.replicas[node].alive

    def shells(self) -> list[RelayShell]:
        """The relay, or the cluster's nodes."""
        return [self.relay] if self.relay is not None else list(self.nodes)

    def shell(self, index: int) -> RelayShell:
        """What replica `index`'s relay connection reaches: the relay, or its node; when that
        node is down, the next one up in order (a client tries its relays in turn)."""
        if self.relay is not None:
            return self.relay
        if not self.nodes:
            raise RuntimeError("this network has no relay")
        count = len(self.nodes)
        first = self.attached[index]
        for step in range(count):
            node = self.nodes[(first + step) % count]
            if node.up:
                self.attached[index] = node.index
                return node
        return self.nodes[first]

    def connected(self, a: int, b: int) -> bool:
        return self.linked(a, b) and self.up(a) and self.up(b) and frozenset((a, b)) not in self.cut

    def live_replicas(self) -> list[SimulatedReplica]:
        return [r for r in self.replicas if r.alive]

    def blocked_replicas(self) -> list[SimulatedReplica]:
        return [r for r in self.replicas if r.alive and r.blocked]

    def busy_links(self) -> list[tuple[int, int]]:
        """Links with frames in flight, in a fixed order."""
        return [link for link, queue in self.queues.items() if queue]

    def in_flight(self) -> Iterator[Envelope]:
        for queue in self.queues.values():
            yield from queue

    def deliverable(self) -> list[Envelope]:
        """Frames `deliver_envelope` may take now: any on a peer link, the first on a relay
        connection (a websocket delivers in order)."""
        frames: list[Envelope] = []
        for (sender, receiver), queue in self.queues.items():
            if queue:
                frames += queue[:1] if RELAY in (sender, receiver) else queue
        return frames

    def pairs(self) -> list[tuple[int, int]]:
        """Every link once, (a, b) with a < b (the relay, -1, comes first)."""
        return sorted({(min(a, b), max(a, b)) for a, b in self.queues})

    # -- local writes -------------------------------------------------------------------------

    def apply(self, index: int, operation: Operation) -> None:
        """SimulatedReplica `index` performs `operation`; its sessions send it on their links."""
        replica = self.replicas[index]
        operation.apply(replica.live)
        self._pump(replica)

    def load(self, index: int, update: bytes) -> None:
        """SimulatedReplica `index` receives `update` out of band (a shared file, a QR code, …): to
        its sessions it is a local change, which they send on."""
        replica = self.replicas[index]
        replica._receiving = True
        try:
            replica.live.apply_update(update)
        finally:
            replica._receiving = False
        replica.history.append(update)
        replica.store.record(update)
        self._pump(replica)

    # -- the network's choices ----------------------------------------------------------------

    def deliver(self, sender: int, receiver: int, position: int = 0) -> Envelope:
        """Deliver the frame at `position` of the link (0 is FIFO order; only 0 on a relay
        connection)."""
        if position and RELAY in (sender, receiver):
            raise ValueError("a relay connection delivers in order: position must be 0")
        envelope = self.queues[(sender, receiver)].pop(position)
        self.delivered += 1
        if receiver == RELAY:
            self._relay_receive(sender, envelope)
        else:
            self._replica_receive(self.replicas[receiver], envelope)
        return envelope

    def deliver_envelope(self, envelope: Envelope) -> None:
        """Deliver this frame (one of `deliverable()`)."""
        queue = self.queues[(envelope.sender, envelope.receiver)]
        position = next(i for i, queued in enumerate(queue) if queued is envelope)
        self.deliver(envelope.sender, envelope.receiver, position)

    def drop(self, sender: int, receiver: int, position: int) -> Envelope:
        """Lose a frame. On a relay connection a lost frame is a broken connection: the link
        is cut (`heal` reconnects)."""
        envelope = self.queues[(sender, receiver)][position]
        if RELAY in (sender, receiver):
            self.partition(sender, receiver)
        else:
            self.queues[(sender, receiver)].pop(position)
        return envelope

    def duplicate(self, sender: int, receiver: int, position: int, insert_at: int) -> None:
        """Copy a frame of a peer link (a websocket never duplicates one)."""
        if RELAY in (sender, receiver):
            raise ValueError("a relay connection does not duplicate frames")
        queue = self.queues[(sender, receiver)]
        queue.insert(insert_at, queue[position])

    def partition(self, a: int, b: int) -> None:
        """Cut the link both ways; what was in flight is lost."""
        if not self.linked(a, b):
            raise ValueError(f"no link between {node_name(a)} and {node_name(b)}")
        was_connected = self.connected(a, b)
        self.cut.add(frozenset((a, b)))
        if was_connected:
            self._disconnect(a, b)

    def heal(self, a: int, b: int) -> None:
        self.cut.discard(frozenset((a, b)))
        if self.connected(a, b):
            self._connect(a, b)

    def save(self, index: int, *, compact: bool = False) -> None:
        """Make what replica `index` holds durable (as one compacted update if `compact`)."""
        replica = self.replicas[index]
        if compact:
            replica.store.compact(replica.live.encode_state())
        else:
            replica.store.save()

    def crash(self, index: int) -> None:
        """The replica dies: unsaved updates and its connections are lost."""
        replica = self.replicas[index]
        conversation = replica.live
        for other in self._others(index):
            if self.connected(index, other):
                self._disconnect(index, other)
        for session in replica.sessions.values():
            session.close()
        replica.sessions.clear()
        if replica._subscription is not None:
            conversation.doc.unobserve(replica._subscription)
        conversation.view.close()
        replica.conversation = None
        replica.store.lose_unsaved()
        replica.history = []
        replica.held = []

    def restart(self, index: int, client_id: int) -> None:
        """Reopen a crashed replica from its store under a new client id, and reconnect."""
        replica = self.replicas[index]
        if replica.alive:
            raise RuntimeError(f"replica {index} is running")
        replica.incarnation += 1
        self._open(replica, client_id)

    def recover(self, index: int, client_id: int) -> None:
        """What `crdtchat.Replica.recover` does for a blocked replica: drop the document and
        everything the relay has not stored, and start again from the relay with a new
        client id (the old one's clocks went to what was refused)."""
        replica = self.replicas[index]
        if replica.alive:
            self.crash(index)
        replica.store = LocalStore()
        self.restart(index, client_id)

    def fresh_client_id(self) -> int:
        return max(self.used_client_ids) + 1

    # -- the relay ------------------------------------------------------------------------------

    @property
    def relay_store(self) -> RelayStore:
        if self.relay is None:
            raise RuntimeError("this network has no relay")
        return self.relay.store

    def store_writes(self, count: int | None = None) -> None:
        """The relay's store makes its first `count` writes (all: None) durable."""
        self._route(self._relay().store_writes(count))

    def crash_relay(self) -> None:
        """The relay dies: every connection drops, writes not yet durable are lost."""
        relay = self._relay()
        if not relay.up:
            raise RuntimeError("the relay is crashed")
        for replica in self.replicas:
            if self.connected(replica.index, RELAY):
                self._disconnect(replica.index, RELAY, relay_side=False)
        relay.stop()

    def restart_relay(self) -> None:
        """The relay starts again from its store; replicas whose link is not cut reconnect."""
        relay = self._relay()
        if relay.up:
            raise RuntimeError("the relay is running")
        self._route(relay.start())
        for replica in self.replicas:
            if self.connected(replica.index, RELAY):
                self._connect(replica.index, RELAY)

    def fail_store(self) -> None:
        """The store loses a write: the room closes every connection (`store_failed`), and
        the relay loads it again from the store, as its I/O shell does."""
        relay = self._relay()
        self._route(relay.perform(relay.room.store_failed("simulated store failure")))
        self.crash_relay()
        self.restart_relay()

    # -- the cluster ----------------------------------------------------------------------------

    def stream_state(self) -> bytes:
        """Everything the cluster's stream holds for the room, as one update."""
        entries = list(self.stream.rooms.get(ROOM, []))
        return RoomState(ROOM, entries[-1].seq if entries else 0, entries).merged()

    def durable_state(self) -> bytes:
        """What the relay promised to keep: its store's durable state, or the stream's."""
        if self.relay is not None:
            return self.relay.store.state()
        return self.stream_state()

    def durable_mark(self) -> int:
        """Moves whenever `durable_state` may have changed."""
        return self.relay.store.durable_seq if self.relay is not None else self.stream.seq

    def _node(self, node: int) -> SimulatedNode:
        if not self.nodes:
            raise RuntimeError("this network has no cluster")
        return self.nodes[node]

    def publish(self, node: int) -> None:
        """Node `node` publishes the head of its chain to the stream (`SimulatedNode.publish`)."""
        target = self._node(node)
        self._route(target.publish())

    def acknowledge(self, node: int) -> None:
        """The stream's acknowledgement of its publish reaches node `node`: stored, so it is
        broadcast to the node's peers and acknowledged to its sender."""
        target = self._node(node)
        self._route(target.acknowledge())

    def consume(self, node: int, count: int = 1) -> None:
        """Node `node`'s follower hands over the stream's next `count` entries (fewer if it
        catches up first)."""
        target = self._node(node)
        for _ in range(count):
            if not target.up or not target.lag():
                return
            self._route(target.consume(self.clock()))

    def run_nodes(self) -> bool:
        """Every node up catches up, publishes and takes its acknowledgements, until none
        has anything to do; whether anything happened."""
        progressed = False
        busy = True
        while busy:
            busy = False
            for node in self.nodes:
                if not node.up:
                    continue
                if node.lag():
                    self.consume(node.index, node.lag())
                    busy = True
                while node.up and (node.can_publish() or node.can_acknowledge()):
                    if node.can_acknowledge():
                        self.acknowledge(node.index)
                    else:
                        conflicts = node.conflicts
                        self.publish(node.index)
                        if node.conflicts > conflicts:
                            break  # its follower must hand over the other node's write first
                    busy = True
            progressed |= busy
        return progressed

    def kill_node(self, node: int) -> None:
        """Node `node` dies: its chain and acknowledgements in flight are lost (what the stream
        took stays); its replicas' connections drop and they reconnect to the next node up,
        resending what was not acknowledged."""
        target = self._node(node)
        if not target.up:
            raise RuntimeError(f"{target!r} is not running")
        moved = [i for i, n in enumerate(self.attached) if n == node and self.connected(i, RELAY)]
        for index in moved:
            self._disconnect(index, RELAY, relay_side=False)
        target.stop()
        for index in moved:
            if self.connected(index, RELAY):
                self._connect(index, RELAY)

    def restart_node(self, node: int) -> None:
        """Node `node` starts again, loading the room from the stream; replicas with no node
        to connect to (their link not cut) connect to it."""
        target = self._node(node)
        if target.up:
            raise RuntimeError(f"{target!r} is running")
        stranded = [i for i in range(len(self.replicas)) if not self.connected(i, RELAY)]
        self._route(target.start())
        for index in stranded:
            if self.connected(index, RELAY):
                self.attached[index] = node
                self._connect(index, RELAY)

    def move(self, index: int, node: int) -> None:
        """Replica `index` reconnects through node `node` (a load balancer's choice)."""
        if not self._node(node).up:
            raise RuntimeError(f"node {node} is not running")
        if self.connected(index, RELAY):
            self._disconnect(index, RELAY)
            self.attached[index] = node
            self._connect(index, RELAY)
        else:
            self.attached[index] = node

    # -- quiescence -------------------------------------------------------------------------

    def quiesce(self, *, rounds: int = 1, max_deliveries: int = 100_000) -> int:
        """Heal every link, restart everything crashed, reconnect every link, deliver all.

        A round is one reconnection of every link (a state-vector exchange both ways), then
        delivery of everything, with the relay's store making every write durable, until
        nothing is in flight. It repairs whatever lost frames left out, so afterwards every
        replica must hold the same document. Blocked replicas are not recovered here (see
        `recover`). With `rounds` > 1 another round follows while the previous one changed
        some replica's state vector; returns the number of rounds run.
        """
        self.cut.clear()
        if self.relay is not None and not self.relay.up:
            self.restart_relay()
        for node in self.nodes:
            if not node.up:
                self.restart_node(node.index)
        for replica in self.replicas:
            if not replica.alive:
                self.restart(replica.index, self.fresh_client_id())
        for done in range(1, rounds + 1):
            before = [r.live.state_vector() for r in self.replicas]
            for a, b in self.pairs():
                self._disconnect(a, b)
                self._connect(a, b)
            self.settle(max_deliveries=max_deliveries)
            if [r.live.state_vector() for r in self.replicas] == before:
                return done
        return rounds

    def settle(self, *, max_deliveries: int = 100_000) -> None:
        """Deliver everything in flight and make every relay write durable, until done. A
        connection the relay closes meanwhile for a passing reason (not one of `STUCK`)
        reconnects, as a client does."""
        self._closed_transiently.clear()
        for _ in range(max_deliveries):
            self.deliver_all(max_deliveries=max_deliveries)
            if self._closed_transiently:
                for index in self._closed_transiently:
                    self.heal(index, RELAY)
                self._closed_transiently.clear()
                continue
            if self.nodes:
                if not self.run_nodes():
                    return
            elif self.relay is None or not self.relay.store.writes:
                return
            else:
                self.store_writes()
        raise AssertionError(f"the network did not settle in {max_deliveries} rounds")

    def deliver_all(self, *, max_deliveries: int = 100_000) -> None:
        """Deliver every frame in flight, link by link in order, replies included."""
        for _ in range(max_deliveries):
            busy = self.busy_links()
            if not busy:
                return
            for sender, receiver in busy:
                if self.queues[(sender, receiver)]:
                    self.deliver(sender, receiver)
        raise AssertionError(f"the network did not quiesce in {max_deliveries} deliveries")

    # -- internals: replicas -------------------------------------------------------------------

    def _relay(self) -> SimulatedRelay:
        if self.relay is None:
            raise RuntimeError("this network has no relay")
        return self.relay

    def _others(self, index: int) -> list[int]:
        return [b for a, b in self.queues if a == index]

    @staticmethod
    def _all_pairs(size: int) -> set[frozenset[int]]:
        nodes = [*range(size), RELAY]
        return {frozenset((a, b)) for a in nodes for b in nodes if a != b}

    def _open(self, replica: SimulatedReplica, client_id: int) -> None:
        if client_id in self.used_client_ids:
            raise ValueError(f"client id {client_id} was used before: reuse corrupts peers")
        self.used_client_ids.add(client_id)
        # Behind the relay the conversation knows its role, as a real client's does: it
        # refuses up front what the relay would refuse (`crdtchat.rights`), and only writes
        # that bypass its API reach the relay's judgement.
        conversation = Conversation(
            Doc(client_id=client_id),
            author=replica.author,
            clock=self.clock,
            role=replica.role,  # type: ignore[arg-type]
        )
        replica.client_id = client_id
        replica.conversation = conversation
        replica.refused = []
        replica.closes = []
        replica.durable = 0
        saved = replica.store.load()
        replica.history = list(saved)
        for update in saved:  # before any session observes: not a new local change
            conversation.apply_update(update)
        replica._subscription = conversation.on_update(
            lambda update, replica=replica: self._on_update(replica, update)
        )
        for other in self._others(replica.index):
            replica.sessions[other] = SyncSession(conversation.doc)
        for other in self._others(replica.index):
            if self.connected(replica.index, other):
                self._connect(replica.index, other)

    def _on_update(self, replica: SimulatedReplica, update: bytes) -> None:
        if replica._receiving:
            return  # recorded raw, as received (RemoteUpdate)
        replica.history.append(update)
        replica.store.record(update)

    def _pump(self, replica: SimulatedReplica) -> None:
        """Move what each session of `replica` has to send onto its link, and its events
        into the replica's history, store and refusals."""
        if not replica.alive:
            return
        for other, session in replica.sessions.items():
            for event in session.events():
                if isinstance(event, RemoteUpdate):
                    replica.history.append(event.update)
                    replica.store.record(event.update)
                elif isinstance(event, Denied):
                    replica.refused.append(event.reason)
                    self.refusals.append((replica.index, event.reason))
                elif isinstance(event, Durable):
                    replica.durable += len(event.local_ids)
            if session.has_data_to_send:
                messages = session.data_to_send()
                if self.connected(replica.index, other):
                    for message in messages:
                        self._send(replica.index, other, message)

    def _replica_receive(self, replica: SimulatedReplica, envelope: Envelope) -> None:
        message = envelope.message()
        if (
            self.hold_early_updates
            and isinstance(message, SyncUpdate)
            and not integrates_fully(replica.live.encode_state(), message.update)
        ):
            replica.held.append(envelope)
            self.held_total += 1
            return
        self._feed(replica, envelope.sender, message)
        progress = True
        while progress and replica.held:
            progress = False
            for held in list(replica.held):
                update = held.message().update  # type: ignore[union-attr]
                if integrates_fully(replica.live.encode_state(), update):
                    replica.held.remove(held)
                    self._feed(replica, held.sender, held.message())
                    progress = True
        self._pump(replica)

    def _feed(self, replica: SimulatedReplica, sender: int, message: WireMessage) -> None:
        replica._receiving = True
        try:
            replica.sessions[sender].receive(message)
        finally:
            replica._receiving = False

    # -- internals: links ----------------------------------------------------------------------

    def _connect(self, a: int, b: int) -> None:
        """A connection opens between `a` and `b`: both ends start the sync."""
        for node, other in ((a, b), (b, a)):
            if node == RELAY:
                replica = self.replicas[other]
                assert replica.role is not None
                self._route(self.shell(other).connect(other, replica.role, replica.author))
            else:
                self.replicas[node].sessions[other].connect()
        for node in (a, b):
            if node != RELAY:
                self._pump(self.replicas[node])

    def _disconnect(self, a: int, b: int, *, relay_side: bool = True) -> None:
        """The connection between `a` and `b` ends; what was in flight is lost."""
        self.queues[(a, b)].clear()
        self.queues[(b, a)].clear()
        for node, other in ((a, b), (b, a)):
            if node == RELAY:
                if relay_side:
                    self._route(self.shell(other).disconnect(other))
                else:
                    self.shell(other).peers.pop(other, None)
            elif self.up(node):
                replica = self.replicas[node]
                replica.sessions[other].disconnect()
                replica.held = [e for e in replica.held if e.sender != other]
                self._pump(replica)

    def _send(self, sender: int, receiver: int, message: WireMessage) -> None:
        self.queues[(sender, receiver)].append(
            Envelope(
                _KINDS[type(message)],
                sender,
                receiver,
                encode_message(message),
                next(self._serials),
            )
        )

    def _send_frame(self, receiver: int, frame: bytes) -> None:
        (message,) = decode_frame(frame)
        self.queues[(RELAY, receiver)].append(
            Envelope(_KINDS[type(message)], RELAY, receiver, frame, next(self._serials))
        )

    # -- internals: the relay -------------------------------------------------------------------

    def _relay_receive(self, sender: int, envelope: Envelope) -> None:
        self._route(self.shell(sender).receive(sender, envelope.message(), self.clock()))

    def _route(self, output: RelayOutput) -> None:
        """What the relay sends goes onto its links; a connection it closes is cut."""
        for item in output:
            if isinstance(item, Outgoing):
                self._send_frame(item.receiver, item.frame)
            else:
                self.replicas[item.index].closes.append((item.kind, item.reason))
                self.partition(item.index, RELAY)
                if item.kind not in STUCK:
                    self._closed_transiently.append(item.index)


def has_gap(doc: Doc) -> bool:
    """Does `doc` hold structs beyond its state vector?

    pycrdt 0.14 integrates an item whose client's earlier clocks are missing as soon as its
    origins are present (Yjs keeps it pending): it is shown, but its clock is not in the
    state vector, so `get_update(state_vector)` never sends it on, and edits inside it fire
    no events. The full encoding still holds it, past the state vector.
    """
    beyond = get_update(doc.get_update(), doc.get_state())
    return beyond[:1] != b"\x00"  # structs, not only a delete set (always included)


def integrates_fully(state: bytes, update: bytes) -> bool:
    """Would every struct of `update` be integrated into a document holding `state`?

    Not when some of it waits for what the document lacks: pycrdt then keeps part of it
    pending, invisibly to `get_update()`, or integrates it behind a gap (`has_gap`).
    """
    probe = Doc()
    probe.apply_update(state)
    probe.apply_update(update)
    return get_update(update, probe.get_state())[:1] == b"\x00"
