"""`ConversationMachine`: replicas, a lossy network, and the invariants at quiescence.

Each run draws its topology: replicas linked to each other directly, or each connected to a
relay (one room of the real relay protocol, with a role per replica). Either way every
replica runs the client protocol real replicas run (`crdtchat.sync.SyncSession`), and every
frame goes through `crdtchat.wire` (`crdtchat.testing.network`).

Hypothesis picks a rule per step: a write on some replica (drawn from the strategies), or a
network event (deliver, reorder, drop, duplicate, partition, heal, crash, restart, save,
clock), or a relay event (its store makes writes durable, the relay crashes or its store
fails, a blocked replica recovers). `quiesce` heals everything, delivers everything and
checks every invariant; the end of each run does the same, so every run ends checked.

Subclass it to test your own merge logic:

    class MyMachine(ConversationMachine):
        @rule(data=st.data())
        def pin_message(self, data):
            index = self.draw_replica(data)
            self.apply(index, PinMessage(...))      # any object with apply(conversation)

        def extra_invariants(self, replicas):
            ...                                     # called at every quiescence

    TestMyMachine = MyMachine.TestCase
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pycrdt import get_state

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.errors import ConversationError
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.protocol import CloseKind
from crdtchat.testing import strategies
from crdtchat.testing.invariants import (
    ReplicaState,
    assert_same_state,
    check_kept,
    check_quiescent,
    open_update,
    raw_message_ids,
    read_replica,
)
from crdtchat.testing.network import (
    RELAY,
    ROOM,
    SECRET,
    Envelope,
    SimulatedNetwork,
    SimulatedNode,
    SimulatedReplica,
)
from crdtchat.testing.operations import (
    ForeignDeleteMessage,
    Operation,
)
from crdtchat.wire import decode_state_vector

StrategyFactory = Callable[[Conversation], st.SearchStrategy[Operation]]
CLIENT_IDS = st.integers(1, 2**31)  # Yjs client ids are uint32


@dataclass(frozen=True)
class CreateConversation:
    """What `Conversation.create` writes, on the replica's own (deterministic) client id."""

    title: str | None = None

    def apply(self, conversation: Conversation) -> None:
        with conversation.doc.transaction():
            conversation.meta["schema"] = schema.SCHEMA_VERSION
            conversation.meta["created_at"] = conversation.clock()
            if self.title is not None:
                conversation.meta["title"] = self.title


class ConversationMachine(RuleBasedStateMachine):
    """N replicas of one conversation under a network that loses, reorders and crashes."""

    #: how many replicas a run has (kept small: 2–4)
    replica_counts: ClassVar[st.SearchStrategy[int]] = st.integers(2, 4)
    #: authors replicas are drawn from; two devices of one person share an author
    authors: ClassVar[tuple[str, ...]] = ("alice", "bob", "worker-1")
    #: lease holders drawn by lease operations
    holders: ClassVar[tuple[str, ...]] = ("worker-1", "worker-2")
    #: include writes no `Conversation` method makes (junk that readers must skip)
    foreign_writes: ClassVar[bool] = True
    deep_writes: ClassVar[bool] = True  # foreign values nested around the readers' bound
    start_time: ClassVar[float] = 1_700_000_000.0
    #: state-vector exchange rounds at quiescence. One is what a reconnect does and what
    #: Yjs needs, and it is enough now that `Conversation` holds early updates and passes
    #: them on as Yjs does (`crdtchat.early`); code built on bare pycrdt needed more
    resync_rounds: ClassVar[int] = 1
    #: True: the network keeps back an update that a replica cannot integrate yet, before
    #: the replica sees it. `Conversation.apply_update` keeps such updates back itself now
    #: (pycrdt alone integrates them behind a gap: tests/testing/test_convergence.py), so by default
    #: the replica does it, which is the code path real peers take
    hold_early_updates: ClassVar[bool] = False
    #: design §2: a regenerate request asking for more answers than a message has makes it
    #: wait, even with none yet (False: ignore such requests, for code that does)
    regenerate_unanswered: ClassVar[bool] = True

    #: topologies a run is drawn from: "peers" (direct links, every fault), "relay" (each
    #: replica connected to the relay protocol, with a role) and "nodes" (the relay is a
    #: cluster of `node_counts` nodes over one stream: publishes, acknowledgements, lagging
    #: followers, conflicts, node kills and restarts are rules)
    topologies: ClassVar[tuple[str, ...]] = ("peers", "relay")
    #: how many relay nodes a "nodes" run has
    node_counts: ClassVar[st.SearchStrategy[int]] = st.integers(2, 3)
    #: node kills per run (each node restarts from the stream)
    max_node_kills: ClassVar[int] = 3
    #: roles a person's replica may get behind the relay (a worker author's is "worker";
    #: replica 0 is a writer, so that the conversation can be created)
    roles: ClassVar[tuple[str, ...]] = ("writer", "writer", "reader")
    #: writes the relay refuses (foreign, deep, duplicate ids) per run behind the relay
    relay_misfits: ClassVar[int] = 2
    #: relay crashes and store failures per run (each loses what was not durable)
    max_relay_failures: ClassVar[int] = 2
    #: the relay compacts its log after this many updates (drawn per run)
    compact_every: ClassVar[st.SearchStrategy[int]] = st.sampled_from((2, 5, 1000))

    #: steps and runs of every machine of this process, for reports (`long` promises 100,000)
    steps_taken: ClassVar[int] = 0
    runs: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        ConversationMachine.runs += 1
        self.now = self.start_time
        self.network: SimulatedNetwork | None = None
        #: message ids some replica held when it saved, and those of them it had accepted
        self.durable_ids: set[str] = set()
        self.durable_accepted: set[str] = set()
        #: ids of items deleted by foreign writes (outside the contract): exempt from keeping
        self.deleted_ids: set[str] = set()
        self.deletes_happened = False
        #: messages written before any replica ever synced (concurrent creation)
        self.presync_ids: set[str] = set()
        self.quiescences = 0
        self.misfits = 0  # foreign writes made behind the relay
        self.relay_failures = 0
        self.node_kills = 0
        self._durable_mark = 0  # how far the relay's store was read into durable_ids

    # -- helpers for subclasses ---------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    @property
    def net(self) -> SimulatedNetwork:
        if self.network is None:
            raise RuntimeError("the machine has not started")
        return self.network

    def draw_replica(self, data: st.DataObject, among: Sequence[int] | None = None) -> int:
        """The index of a running replica (one of `among` if given)."""
        live = [r.index for r in self.net.live_replicas()]
        choices = [i for i in live if among is None or i in among]
        return data.draw(st.sampled_from(choices), label="replica")

    def apply(self, index: int, operation: Operation) -> None:
        """SimulatedReplica `index` performs `operation` (sent on every connected link)."""
        conversation = self.net.replicas[index].live
        if isinstance(operation, ForeignDeleteMessage):
            self.deletes_happened = True
            item = conversation.messages[operation.position]
            identifier = getattr(item, "get", lambda _key: None)("id")
            if isinstance(identifier, str):
                self.deleted_ids.add(identifier)
        event(f"operation {type(operation).__name__}")
        role = self.net.replicas[index].role
        try:
            self.net.apply(index, operation)
        except ConversationError as error:
            if role is None or not str(error).startswith(f"a {role} may not"):
                raise
            event("operation refused by the replica's role")  # up front: nothing written

    def write_with(self, data: st.DataObject, factory: StrategyFactory) -> None:
        """Draw a replica for which `factory` has something to do, and apply one operation."""
        feasible = {
            r.index: strategy
            for r in self.net.live_replicas()
            if not (strategy := factory(r.live)).is_empty
        }
        if not feasible:
            return
        index = self.draw_replica(data, among=sorted(feasible))
        self.apply(index, data.draw(feasible[index], label="operation"))

    def extra_invariants(self, replicas: Sequence[SimulatedReplica]) -> None:
        """Override: more checks at quiescence (every replica is up and in sync)."""

    # -- start ------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        """Either one replica creates and shares, or all create and write before any sync."""
        count = data.draw(self.replica_counts, label="replica count")
        authors = data.draw(
            st.lists(st.sampled_from(self.authors), min_size=count, max_size=count),
            label="authors",
        )
        # Concurrent inserts are ordered by client id: drawing the order explores both sides.
        client_ids = data.draw(st.permutations(range(1, count + 1)), label="client ids")
        topology = data.draw(st.sampled_from(self.topologies), label="topology")
        relay = topology in ("relay", "nodes")
        nodes = data.draw(self.node_counts, label="nodes") if topology == "nodes" else 0
        roles = None
        config = None
        if relay:
            roles = [
                "worker"
                if author.startswith("worker")
                else "writer"
                if index == 0
                else data.draw(st.sampled_from(self.roles), label=f"role of {index}")
                for index, author in enumerate(authors)
            ]
            config = RelayConfig(
                secret=SECRET,
                compact_updates=data.draw(self.compact_every, label="compact every"),
            )
        event(f"topology {topology}")
        network = SimulatedNetwork(
            authors,
            clock=self.clock,
            client_ids=client_ids,
            connected=False,
            hold_early_updates=self.hold_early_updates,
            relay=relay,
            roles=roles,
            relay_config=config,
            nodes=nodes,
        )
        self.network = network
        concurrent = data.draw(st.booleans(), label="concurrent creation")
        title = data.draw(st.none() | strategies.texts(max_size=5), label="title")
        if concurrent:
            for replica in network.replicas:
                if replica.role == "worker":
                    continue  # workers write no meta: the relay would refuse it
                network.apply(replica.index, CreateConversation(title))
                for _ in range(data.draw(st.integers(0, 2), label="early writes")):
                    operation = data.draw(strategies.append_messages(replica.live))
                    self.apply(replica.index, operation)
                    if not relay:  # behind the relay, a role may refuse it
                        self.presync_ids.add(operation.message_id)
        else:
            network.apply(0, CreateConversation(title))
            if not relay:  # shared out of band; behind the relay, through it
                state = network.replicas[0].live.encode_state()
                for replica in network.replicas[1:]:
                    network.load(replica.index, state)
        for replica in network.replicas:
            self.save_replica(replica.index, compact=False)
        for a, b in network.pairs():
            network.heal(a, b)

    # -- writes --------------------------------------------------------------------------------

    @rule(data=st.data())
    def append_message(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.append_messages)

    @rule(data=st.data())
    def edit_text(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.text_edits)

    @rule(data=st.data())
    def change_settings(self, data: st.DataObject) -> None:
        self.write_with(data, lambda _conversation: strategies.settings_changes())

    @rule(data=st.data())
    def lease_step(self, data: st.DataObject) -> None:
        self.write_with(data, lambda c: strategies.leases(c, holders=self.holders))

    @rule(data=st.data())
    def stream_step(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.streams)

    @rule(data=st.data())
    def commit_turn(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.commits)

    @rule(data=st.data())
    def derived_step(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.derived_changes)

    @rule(data=st.data())
    def transport_step(self, data: st.DataObject) -> None:
        self.write_with(data, strategies.transport_changes)

    def _foreign_allowed(self) -> bool:
        """Writes our relay refuses: every one on direct links; behind the relay at most
        `relay_misfits` per run, and none while a replica is blocked (its later writes would
        all be refused too: steps spent on nothing)."""
        net = self.network
        if net is None or not net.relayed:
            return True
        return self.misfits < self.relay_misfits and not net.blocked_replicas()

    def foreign_with(self, data: st.DataObject, factory: StrategyFactory) -> None:
        if self.network is not None and self.network.relayed:
            self.misfits += 1
        self.write_with(data, factory)

    @precondition(_foreign_allowed)
    @rule(data=st.data())
    def foreign_write(self, data: st.DataObject) -> None:
        if self.foreign_writes:
            self.foreign_with(data, strategies.foreign_writes)

    @precondition(_foreign_allowed)
    @rule(data=st.data())
    def foreign_duplicate_id(self, data: st.DataObject) -> None:
        """A message reusing a taken id at any position: what our relay refuses, in a document
        that came from elsewhere. Every replica must read the same first-of-an-id."""
        if self.foreign_writes:
            self.foreign_with(data, strategies.duplicate_ids)

    @precondition(_foreign_allowed)
    @rule(data=st.data())
    def deep_write(self, data: st.DataObject) -> None:
        if self.deep_writes:
            self.foreign_with(data, strategies.deep_writes)

    # -- the network --------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self.network is not None and bool(self.network.busy_links())

    def _peer_busy(self) -> bool:
        return self.network is not None and bool(self._busy_peer_links())

    def _busy_peer_links(self) -> list[tuple[int, int]]:
        return [link for link in self.net.busy_links() if RELAY not in link]

    def _draw_frame(self, data: st.DataObject, label: str) -> Envelope:
        """Any frame of a peer link, or the first of a relay connection."""
        return data.draw(st.sampled_from(self.net.deliverable()), label=label)

    @precondition(_busy)
    @rule(data=st.data(), count=st.integers(1, 4))
    def deliver(self, data: st.DataObject, count: int) -> None:
        """Deliver `count` frames, each from any link (and any position of a peer link)."""
        for _ in range(count):
            if not self.net.busy_links():
                return
            self.net.deliver_envelope(self._draw_frame(data, "deliver"))

    @precondition(_busy)
    @rule(data=st.data())
    def flush_link(self, data: st.DataObject) -> None:
        """Deliver everything queued on one link, in order."""
        sender, receiver = data.draw(st.sampled_from(self.net.busy_links()), label="link")
        for _ in range(len(self.net.queues[(sender, receiver)])):
            if self.net.queues[(sender, receiver)]:
                self.net.deliver(sender, receiver)

    @precondition(_busy)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        """Lose a frame (on a relay connection: the connection breaks)."""
        envelope = self._draw_frame(data, "drop")
        queue = self.net.queues[(envelope.sender, envelope.receiver)]
        position = next(i for i, queued in enumerate(queue) if queued is envelope)
        self.net.drop(envelope.sender, envelope.receiver, position)

    @precondition(_peer_busy)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        """Copy a frame of a peer link to any place of its queue."""
        sender, receiver = data.draw(st.sampled_from(self._busy_peer_links()), label="link")
        size = len(self.net.queues[(sender, receiver)])
        position = data.draw(st.integers(0, size - 1), label="position")
        self.net.duplicate(
            sender, receiver, position, data.draw(st.integers(0, size), label="insert at")
        )

    @precondition(lambda self: self.network is not None)
    @rule(data=st.data())
    def partition(self, data: st.DataObject) -> None:
        """Cut a link (RELAY, -1, is the relay)."""
        self.net.partition(*data.draw(st.sampled_from(self.net.pairs()), label="pair"))

    @precondition(lambda self: self.network is not None and bool(self.network.cut))
    @rule(data=st.data())
    def heal(self, data: st.DataObject) -> None:
        cut = sorted(tuple(sorted(pair)) for pair in self.net.cut)
        a, b = data.draw(st.sampled_from(cut), label="pair")
        self.net.heal(a, b)

    # -- the relay ------------------------------------------------------------------------------

    def _relay_up(self) -> bool:
        return (
            self.network is not None and self.network.relay is not None and self.network.up(RELAY)
        )

    def _relay_may_fail(self) -> bool:
        return self._relay_up() and self.relay_failures < self.max_relay_failures

    @precondition(
        lambda self: (
            self.network is not None
            and self.network.relay is not None
            and bool(self.network.relay.store.writes)
        )
    )
    @rule(data=st.data())
    def store_writes(self, data: st.DataObject) -> None:
        """The relay's store makes some of its writes durable (then they are acknowledged
        and broadcast)."""
        writes = self.net.relay_store.writes
        self.net.store_writes(data.draw(st.integers(1, len(writes)), label="writes"))
        self.note_relay_durable()

    @precondition(_relay_may_fail)
    @rule()
    def crash_relay(self) -> None:
        """The relay dies: what its store had not made durable is lost."""
        event("relay crash")
        self.relay_failures += 1
        self.net.crash_relay()

    @precondition(
        lambda self: (
            self.network is not None
            and self.network.relay is not None
            and not self.network.up(RELAY)
        )
    )
    @rule()
    def restart_relay(self) -> None:
        self.net.restart_relay()

    @precondition(_relay_may_fail)
    @rule()
    def fail_store(self) -> None:
        """The relay's store fails a write: the room closes every connection and reloads."""
        event("relay store failure")
        self.relay_failures += 1
        self.net.fail_store()

    # -- the relay's nodes ------------------------------------------------------------------------

    def _nodes_where(self, ready: Callable[[SimulatedNode], bool]) -> list[int]:
        if self.network is None:
            return []
        return [node.index for node in self.network.nodes if ready(node)]

    @precondition(lambda self: bool(self._nodes_where(SimulatedNode.can_publish)))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        """A node publishes the head of its chain, conditionally on the last sequence it
        knows (refused if another node wrote first: a conflict)."""
        ready = self._nodes_where(SimulatedNode.can_publish)
        node = data.draw(st.sampled_from(ready), label="node")
        conflicts = self.net.nodes[node].conflicts
        self.net.publish(node)
        if self.net.nodes[node].conflicts > conflicts:
            event("node: publish conflict")
        self.note_relay_durable()

    @precondition(lambda self: bool(self._nodes_where(SimulatedNode.can_acknowledge)))
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        """The stream's acknowledgement reaches a node: its write is stored and acknowledged."""
        ready = self._nodes_where(SimulatedNode.can_acknowledge)
        self.net.acknowledge(data.draw(st.sampled_from(ready), label="node"))

    @precondition(lambda self: bool(self._nodes_where(lambda node: node.up and node.lag() > 0)))
    @rule(data=st.data(), count=st.integers(1, 3))
    def consume(self, data: st.DataObject, count: int) -> None:
        """A node's follower hands over what the stream holds (until then, the node lags)."""
        lagging = self._nodes_where(lambda node: node.up and node.lag() > 0)
        node = data.draw(st.sampled_from(lagging), label="node")
        epoch = self.net.nodes[node].position.epoch
        self.net.consume(node, count)
        if self.net.nodes[node].up and self.net.nodes[node].position.epoch > epoch:
            event("node: writes judged again after a conflict")

    def _writers_by_node(self) -> dict[int, list[int]]:
        """Replicas connected to a node that may write, by the node they reach."""
        net = self.net
        by_node: dict[int, list[int]] = {}
        for replica in net.live_replicas():
            if replica.role == "reader" or replica.blocked:
                continue
            if net.connected(replica.index, RELAY):
                by_node.setdefault(net.attached[replica.index], []).append(replica.index)
        return by_node

    @precondition(
        lambda self: (
            self.network is not None
            and bool(self.network.nodes)
            and len(self._writers_by_node()) > 1
        )
    )
    @rule(data=st.data())
    def concurrent_writes(self, data: st.DataObject) -> None:
        """Replicas on two nodes write at once: both nodes judge against the same state and
        publish on the same sequence, so one is refused; its follower withdraws and judges
        it again when it hands over the other's write."""
        by_node = self._writers_by_node()
        nodes = data.draw(
            st.lists(st.sampled_from(sorted(by_node)), min_size=2, max_size=2, unique=True),
            label="nodes",
        )
        for node in nodes:
            index = data.draw(st.sampled_from(by_node[node]), label="replica")
            self.apply(index, data.draw(strategies.append_messages(self.net.replicas[index].live)))
            while self.net.queues[(index, RELAY)] and self.net.connected(index, RELAY):
                self.net.deliver(index, RELAY)
        for node in nodes:
            target = self.net.nodes[node]
            while target.can_acknowledge():
                self.net.acknowledge(node)
            if target.can_publish():
                conflicts = target.conflicts
                self.net.publish(node)
                if target.conflicts > conflicts:
                    event("node: publish conflict")
        self.note_relay_durable()

    @precondition(
        lambda self: (
            self.network is not None
            and self.node_kills < self.max_node_kills
            and bool(self._nodes_where(lambda node: node.up))
        )
    )
    @rule(data=st.data())
    def kill_node(self, data: st.DataObject) -> None:
        """A node dies (SIGKILL): its replicas reconnect to another node and resend what was
        not acknowledged."""
        event("node killed")
        self.node_kills += 1
        up = self._nodes_where(lambda node: node.up)
        self.net.kill_node(data.draw(st.sampled_from(up), label="node"))

    @precondition(lambda self: bool(self._nodes_where(lambda node: not node.up)))
    @rule(data=st.data())
    def restart_node(self, data: st.DataObject) -> None:
        """A node starts again from the stream."""
        down = self._nodes_where(lambda node: not node.up)
        self.net.restart_node(data.draw(st.sampled_from(down), label="node"))

    @precondition(lambda self: len(self._nodes_where(lambda node: node.up)) > 1)
    @rule(data=st.data())
    def move_replica(self, data: st.DataObject) -> None:
        """A replica reconnects through another node (writers spread over the nodes)."""
        index = self.draw_replica(data)
        up = self._nodes_where(lambda node: node.up)
        self.net.move(index, data.draw(st.sampled_from(up), label="node"))

    @precondition(lambda self: self.network is not None and bool(self.network.blocked_replicas()))
    @rule(data=st.data())
    def recover(self, data: st.DataObject) -> None:
        """A replica the relay refused recovers (`crdtchat.Replica.recover`): a new document
        from the relay, with a new client id."""
        blocked = [r.index for r in self.net.blocked_replicas()]
        index = data.draw(st.sampled_from(blocked), label="replica")
        self.net.recover(index, self.new_client_id(data))

    @precondition(lambda self: self.network is not None and len(self.network.live_replicas()) > 1)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.net.crash(self.draw_replica(data))

    @precondition(
        lambda self: (
            self.network is not None
            and len(self.network.live_replicas()) < len(self.network.replicas)
        )
    )
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        crashed = [r.index for r in self.net.replicas if not r.alive]
        index = data.draw(st.sampled_from(crashed), label="replica")
        self.net.restart(index, self.new_client_id(data))

    def new_client_id(self, data: st.DataObject) -> int:
        client_id = data.draw(CLIENT_IDS, label="client id")
        while client_id in self.net.used_client_ids:
            client_id += 1
        return client_id

    @precondition(lambda self: self.network is not None)
    @rule(data=st.data(), compact=st.booleans())
    def save(self, data: st.DataObject, compact: bool) -> None:
        self.save_replica(self.draw_replica(data), compact=compact)

    @precondition(lambda self: self.network is not None)
    @rule(seconds=st.floats(0, 120, allow_nan=False))
    def advance_clock(self, seconds: float) -> None:
        """Time passes: leases expire and may be taken over."""
        self.now += seconds

    @precondition(lambda self: self.network is not None)
    @rule()
    def quiesce(self) -> None:
        """Heal, restart, deliver everything, then check every invariant."""
        self.settle_everything()
        self.check_invariants_now()

    @invariant()
    def count_step(self) -> None:
        if self.network is not None:  # not the check before the first step
            ConversationMachine.steps_taken += 1

    @invariant()
    def relay_reads_every_frame(self) -> None:
        """A client protocol never sends what the relay protocol cannot decode."""
        if self.network is not None:
            for relay in self.network.shells():
                malformed = [c for c in relay.closes if c[1] is CloseKind.MALFORMED]
                assert not malformed, f"{relay!r} found frames malformed: {malformed}"

    @invariant()
    def conflicts_never_fail_a_node(self) -> None:
        """A node whose publish met another node's write judges its writes again: its room
        never fails (the single relay's `fail_store` is the only simulated store failure)."""
        if self.network is not None:
            for node in self.network.nodes:
                assert not (node.up and node.room.failed), f"{node!r}'s room failed"

    @invariant()
    def acknowledged_writes_are_durable(self) -> None:
        """A replica whose relay acknowledged all its writes finds them in what the relay
        keeps durably (its store, or the cluster's stream), even if the node that acknowledged
        them died since."""
        net = self.network
        if net is None or not net.relayed:
            return
        durable: dict[int, int] | None = None
        for replica in net.live_replicas():
            session = replica.sessions.get(RELAY)
            if session is None or not session.durable or replica.blocked:
                continue
            own = decode_state_vector(replica.live.state_vector()).get(replica.client_id, 0)
            if not own:
                continue
            if durable is None:
                state = net.durable_state()
                durable = decode_state_vector(get_state(state)) if state else {}
            assert durable.get(replica.client_id, 0) >= own, (
                f"replica {replica.index}: writes acknowledged but not durable "
                f"({durable.get(replica.client_id, 0)} < {own} for client {replica.client_id})"
            )

    # -- invariants --------------------------------------------------------------------------

    def save_replica(self, index: int, *, compact: bool) -> None:
        """Save, and remember what became durable: it must never be lost. (Behind the relay
        the promise is the relay's store: a replica's refused writes, saved or not, are
        dropped by its recovery; `note_relay_durable`.)"""
        self.net.save(index, compact=compact)
        if not self.net.relayed:
            conversation = self.net.replicas[index].live
            self.durable_ids |= raw_message_ids(conversation)
            self.durable_accepted |= {m.id for m in conversation.all_messages()}

    def note_relay_durable(self) -> None:
        """Remember the messages the relay's store (or the stream) holds durably: they must
        never be lost."""
        mark = self.net.durable_mark()
        if mark == self._durable_mark:
            return
        self._durable_mark = mark
        conversation = open_update(self.net.durable_state() or None)
        self.durable_ids |= raw_message_ids(conversation)
        self.durable_accepted |= {m.id for m in conversation.all_messages()}

    def settle_everything(self) -> None:
        """Quiesce; behind the relay, check that refusals reached their replicas, recover
        the blocked ones, and quiesce again until none is blocked."""
        net = self.net
        net.quiesce(rounds=self.resync_rounds)
        if not net.relayed:
            return
        for _ in range(len(net.replicas) + 1):
            self.check_refusals()
            blocked = net.blocked_replicas()
            if not blocked:
                break
            event(f"quiescence: blocked replicas recovered {min(len(blocked), 2)}+")
            for replica in blocked:
                net.recover(replica.index, net.fresh_client_id())
            net.quiesce(rounds=self.resync_rounds)
        else:
            raise AssertionError("replicas stay blocked after recovering")
        self.note_relay_durable()

    def check_refusals(self) -> None:
        """At quiescence behind the relay: a reader that wrote was refused, and told; every
        other replica's writes are acknowledged as stored."""
        for replica in self.net.replicas:
            session = replica.sessions[RELAY]
            if replica.role == "reader" and replica.client_id in _clients(replica):
                assert replica.blocked, f"replica {replica.index}, a reader, wrote unrefused"
            if not replica.blocked:
                assert session.durable, (
                    f"replica {replica.index}: local updates {session.pending_ids} "
                    "not acknowledged at quiescence"
                )

    def check_invariants_now(self) -> list[ReplicaState]:
        """Every replica must be up and in sync (call after `network.quiesce()`)."""
        replicas = self.net.replicas
        states = check_quiescent(replicas, regenerate_unanswered=self.regenerate_unanswered)
        relay = self.net.relay
        if self.net.relayed:
            stored = read_replica(open_update(self.net.durable_state() or None))
            assert_same_state(states[0], stored, "the relay's store differs from replica 0")
            closes = sum(len(shell.closes) for shell in self.net.shells())
            event(f"quiescence: relay closed connections {min(closes, 1)}+")
        if relay is not None:
            event(f"quiescence: relay compacted {bool(relay.store.snapshot)}")
        for node in self.net.nodes:
            copy = read_replica(open_update(node.state() or None))
            assert_same_state(states[0], copy, f"node {node.index}'s copy differs from replica 0")
        if self.net.nodes:
            entries = self.net.stream.rooms.get(ROOM, [])
            event(f"quiescence: stream rolled up {bool(entries and entries[0].snapshot)}")
            conflicts = sum(node.conflicts for node in self.net.nodes)
            event(f"quiescence: publish conflicts {min(conflicts, 2)}+")
        conversations = [r.live for r in replicas]
        present = self.durable_ids - self.deleted_ids
        # Deleting an item can orphan its descendants, so acceptance is only promised when
        # nobody deleted anything; without deletions the accepted ids only ever grow.
        accepted = set() if self.deletes_happened else self.durable_accepted
        check_kept(conversations, accepted_ids=accepted, present_ids=present)
        check_kept(
            conversations,
            present_ids=self.presync_ids - self.deleted_ids,
            accepted_ids=set() if self.deletes_happened else self.presync_ids,
            what="concurrently created",
        )
        self.extra_invariants(replicas)
        self.quiescences += 1
        reading = states[0].reading
        event(f"quiescence: {len(replicas)} replicas")
        event(f"quiescence: problems reported {min(len(states[0].problems), 3)}+")
        duplicates = any("duplicate" in reason for _root, _key, reason in states[0].problems)
        event(f"quiescence: duplicate ids {duplicates}")
        event(f"quiescence: updates held back {self.net.held_total > 0}")
        event(f"quiescence: threads {min(len(reading.leaves), 3)}+")
        event(f"quiescence: waiting {min(len(reading.waiting), 2)}+")
        return states

    def teardown(self) -> None:
        # Every run ends at quiescence, checked; unless a step already failed, in which
        # case that failure is the one to report and shrink.
        if self.network is not None and sys.exc_info()[0] is None:
            self.settle_everything()
            self.check_invariants_now()


def _clients(replica: SimulatedReplica) -> set[int]:
    """Client ids whose writes the replica's document holds."""
    return set(decode_state_vector(replica.live.state_vector()))
