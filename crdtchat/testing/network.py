"""A deterministic, sans-I/O network of `Conversation` replicas.

Nothing here chooses anything: which message is delivered, dropped or duplicated, which
link is cut and which replica crashes are all arguments, so a hypothesis test draws them and
a failure shrinks to a minimal schedule and replays exactly.

The model:
- every ordered pair of replicas has a FIFO queue (a link); a local write is sent as an
  `update` on every connected link; `deliver` may take any queued message (reordering);
- a cut link (`partition`) loses what was in flight, like a broken connection; `heal`
  reconnects and both sides resync by state vectors (`sync_step1` → `sync_step2`), as the
  y-protocols sync does;
- each replica has a `LocalStore`: received and local updates are kept in memory until an
  explicit `save`; `crash` loses the unsaved ones, `restart` reopens from the store with a
  new client id (reusing a client id after losing updates would corrupt peers) and resyncs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pycrdt import Doc, Subscription, get_update

from crdtchat.document import Conversation
from crdtchat.testing.operations import Operation
from crdtchat.updates import EMPTY_UPDATE

Kind = Literal["update", "sync_step1", "sync_step2"]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Envelope:
    """One message in flight on the link sender → receiver."""

    kind: Kind
    sender: int
    receiver: int
    payload: bytes

    def __repr__(self) -> str:
        return f"<{self.kind} {self.sender}->{self.receiver} {len(self.payload)}B>"


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
    """One simulated device: a conversation (None while crashed), its store, and what it
    received. Not `crdtchat.Replica`, which syncs a real document through a real relay."""

    index: int
    author: str
    client_id: int
    conversation: Conversation | None
    store: LocalStore = field(default_factory=LocalStore)
    #: every update this incarnation applied, local or received, raw: merging them must
    #: rebuild the live document
    history: list[bytes] = field(default_factory=list)
    incarnation: int = 0
    #: updates held back because they start beyond what this replica has (hold mode)
    held: list[bytes] = field(default_factory=list)
    _subscription: Subscription | None = None
    _applying_remote: bool = False

    @property
    def alive(self) -> bool:
        return self.conversation is not None

    @property
    def live(self) -> Conversation:
        """The conversation of a replica that is up."""
        if self.conversation is None:
            raise RuntimeError(f"replica {self.index} is crashed")
        return self.conversation


class SimulatedNetwork:
    """N replicas, their links, their stores; every choice is the caller's."""

    def __init__(
        self,
        authors: Sequence[str],
        *,
        clock: Clock,
        client_ids: Sequence[int],
        connected: bool = True,
        hold_early_updates: bool = False,
    ) -> None:
        """Start every replica empty; if `connected`, each pair begins its sync handshake.

        With `hold_early_updates`, a replica keeps an update back (as Yjs keeps it pending)
        until all of it can be integrated: pycrdt 0.14 integrates some such updates behind
        a gap (see `has_gap`) and keeps others pending where a compacted save loses them.
        """
        if len(client_ids) != len(authors) or len(set(client_ids)) != len(client_ids):
            raise ValueError("one distinct client id per replica")
        self.clock = clock
        self.hold_early_updates = hold_early_updates
        self.used_client_ids: set[int] = set()
        self.replicas: list[SimulatedReplica] = []
        for index, (author, client_id) in enumerate(zip(authors, client_ids, strict=True)):
            replica = SimulatedReplica(
                index=index, author=author, client_id=client_id, conversation=None
            )
            self.replicas.append(replica)
            self._open(replica, client_id)
        size = len(self.replicas)
        self.queues: dict[tuple[int, int], list[Envelope]] = {
            (a, b): [] for a in range(size) for b in range(size) if a != b
        }
        self.cut: set[frozenset[int]] = set() if connected else self._all_pairs()
        self.delivered = 0
        self.held_total = 0
        for a, b in self._pairs():
            if self.connected(a, b):
                self._handshake(a, b)

    # -- state ------------------------------------------------------------------------------

    def connected(self, a: int, b: int) -> bool:
        return (
            a != b
            and self.replicas[a].alive
            and self.replicas[b].alive
            and frozenset((a, b)) not in self.cut
        )

    def live_replicas(self) -> list[SimulatedReplica]:
        return [r for r in self.replicas if r.alive]

    def busy_links(self) -> list[tuple[int, int]]:
        """Links with messages in flight, in a fixed order."""
        return [link for link, queue in self.queues.items() if queue]

    def in_flight(self) -> Iterator[Envelope]:
        for queue in self.queues.values():
            yield from queue

    # -- local writes -------------------------------------------------------------------------

    def apply(self, index: int, operation: Operation) -> None:
        """Replica `index` performs `operation`; its updates go out on every connected link."""
        operation.apply(self.replicas[index].live)

    def load(self, index: int, update: bytes) -> None:
        """Replica `index` receives `update` out of band (a shared file, a QR code, …)."""
        self._receive(self.replicas[index], update)

    # -- the network's choices ----------------------------------------------------------------

    def deliver(self, sender: int, receiver: int, position: int = 0) -> Envelope:
        """Deliver the message at `position` of the link (0 is FIFO order)."""
        envelope = self.queues[(sender, receiver)].pop(position)
        self.delivered += 1
        target = self.replicas[receiver]
        if envelope.kind == "sync_step1":
            if self.connected(receiver, sender):
                reply = target.live.update_since(envelope.payload)
                self._send(receiver, sender, "sync_step2", reply)
        else:
            self._receive(target, envelope.payload)
        return envelope

    def drop(self, sender: int, receiver: int, position: int) -> Envelope:
        return self.queues[(sender, receiver)].pop(position)

    def duplicate(self, sender: int, receiver: int, position: int, insert_at: int) -> None:
        queue = self.queues[(sender, receiver)]
        queue.insert(insert_at, queue[position])

    def partition(self, a: int, b: int) -> None:
        """Cut the link both ways; what was in flight is lost."""
        self.cut.add(frozenset((a, b)))
        self.queues[(a, b)].clear()
        self.queues[(b, a)].clear()

    def heal(self, a: int, b: int) -> None:
        self.cut.discard(frozenset((a, b)))
        if self.connected(a, b):
            self._handshake(a, b)

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
        if replica._subscription is not None:
            conversation.doc.unobserve(replica._subscription)
        conversation.view.close()
        replica.conversation = None
        replica.store.lose_unsaved()
        replica.history = []
        replica.held = []
        for (a, b), queue in self.queues.items():
            if index in (a, b):
                queue.clear()

    def restart(self, index: int, client_id: int) -> None:
        """Reopen a crashed replica from its store under a new client id, and resync."""
        replica = self.replicas[index]
        if replica.alive:
            raise RuntimeError(f"replica {index} is running")
        replica.incarnation += 1
        self._open(replica, client_id)
        for other in range(len(self.replicas)):
            if self.connected(index, other):
                self._handshake(index, other)

    def fresh_client_id(self) -> int:
        return max(self.used_client_ids) + 1

    def quiesce(self, *, rounds: int = 1, max_deliveries: int = 100_000) -> int:
        """Heal every link, restart every crashed replica, resync all pairs, deliver all.

        A round is one state-vector exchange between every pair (what a reconnect does),
        then delivery of everything in order. It repairs whatever dropped messages left out,
        so afterwards every replica must hold the same document. With `rounds` > 1 another
        round follows while the previous one changed some replica's state vector (peers
        reconnecting again); returns the number of rounds run.
        """
        self.cut.clear()
        for replica in self.replicas:
            if not replica.alive:
                self.restart(replica.index, self.fresh_client_id())
        for done in range(1, rounds + 1):
            before = [r.live.state_vector() for r in self.replicas]
            for a, b in self._pairs():
                self._handshake(a, b)
            self.deliver_all(max_deliveries=max_deliveries)
            if [r.live.state_vector() for r in self.replicas] == before:
                return done
        return rounds

    def deliver_all(self, *, max_deliveries: int = 100_000) -> None:
        """Deliver every message in flight, link by link in order, replies included."""
        for _ in range(max_deliveries):
            busy = self.busy_links()
            if not busy:
                return
            for sender, receiver in busy:
                self.deliver(sender, receiver)
        raise AssertionError(f"the network did not quiesce in {max_deliveries} deliveries")

    # -- internals -------------------------------------------------------------------------------

    def _pairs(self) -> list[tuple[int, int]]:
        size = len(self.replicas)
        return [(a, b) for a in range(size) for b in range(a + 1, size)]

    def _all_pairs(self) -> set[frozenset[int]]:
        return {frozenset(pair) for pair in self._pairs()}

    def _open(self, replica: SimulatedReplica, client_id: int) -> None:
        if client_id in self.used_client_ids:
            raise ValueError(f"client id {client_id} was used before: reuse corrupts peers")
        self.used_client_ids.add(client_id)
        conversation = Conversation(
            Doc(client_id=client_id), author=replica.author, clock=self.clock
        )
        replica.client_id = client_id
        replica.conversation = conversation
        saved = replica.store.load()
        replica.history = list(saved)
        replica._applying_remote = True
        try:
            for update in saved:
                conversation.apply_update(update)
        finally:
            replica._applying_remote = False
        replica._subscription = conversation.on_update(
            lambda update, replica=replica: self._on_update(replica, update)
        )

    def _on_update(self, replica: SimulatedReplica, update: bytes) -> None:
        if replica._applying_remote:
            return  # recorded raw by `_receive`; a full mesh does not forward
        replica.history.append(update)
        replica.store.record(update)
        for other in range(len(self.replicas)):
            if self.connected(replica.index, other):
                self._send(replica.index, other, "update", update)

    def _receive(self, replica: SimulatedReplica, update: bytes) -> None:
        if self.hold_early_updates and not integrates_fully(replica.live.encode_state(), update):
            replica.held.append(update)
            self.held_total += 1
            return
        self._integrate(replica, update)
        progress = True
        while progress and replica.held:
            progress = False
            for held in list(replica.held):
                if integrates_fully(replica.live.encode_state(), held):
                    replica.held.remove(held)
                    self._integrate(replica, held)
                    progress = True

    def _integrate(self, replica: SimulatedReplica, update: bytes) -> None:
        replica._applying_remote = True
        try:
            replica.live.apply_update(update)
        finally:
            replica._applying_remote = False
        if update != EMPTY_UPDATE:
            replica.history.append(update)
            replica.store.record(update)

    def _handshake(self, a: int, b: int) -> None:
        self._send(a, b, "sync_step1", self.replicas[a].live.state_vector())
        self._send(b, a, "sync_step1", self.replicas[b].live.state_vector())

    def _send(self, sender: int, receiver: int, kind: Kind, payload: bytes) -> None:
        self.queues[(sender, receiver)].append(Envelope(kind, sender, receiver, payload))


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
