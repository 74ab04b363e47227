"""`ConversationMachine`: replicas, a lossy network, and the invariants at quiescence.

Hypothesis picks a rule per step: a write on some replica (drawn from the strategies), or a
network event (deliver, reorder, drop, duplicate, partition, heal, crash, restart, save,
clock). `quiesce` heals everything, delivers everything and checks every invariant; the
end of each run does the same, so every run ends checked.

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

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.testing import strategies
from crdtchat.testing.invariants import (
    ReplicaState,
    check_kept,
    check_quiescent,
    raw_message_ids,
)
from crdtchat.testing.network import SimulatedNetwork, SimulatedReplica
from crdtchat.testing.operations import (
    ForeignDeleteMessage,
    Operation,
)

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
        """Replica `index` performs `operation` (sent on every connected link)."""
        conversation = self.net.replicas[index].live
        if isinstance(operation, ForeignDeleteMessage):
            self.deletes_happened = True
            item = conversation.messages[operation.position]
            identifier = getattr(item, "get", lambda _key: None)("id")
            if isinstance(identifier, str):
                self.deleted_ids.add(identifier)
        event(f"operation {type(operation).__name__}")
        self.net.apply(index, operation)

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
        network = SimulatedNetwork(
            authors,
            clock=self.clock,
            client_ids=client_ids,
            connected=False,
            hold_early_updates=self.hold_early_updates,
        )
        self.network = network
        concurrent = data.draw(st.booleans(), label="concurrent creation")
        title = data.draw(st.none() | strategies.texts(max_size=5), label="title")
        if concurrent:
            for replica in network.replicas:
                network.apply(replica.index, CreateConversation(title))
                for _ in range(data.draw(st.integers(0, 2), label="early writes")):
                    operation = data.draw(strategies.append_messages(replica.live))
                    network.apply(replica.index, operation)
                    self.presync_ids.add(operation.message_id)
        else:
            network.apply(0, CreateConversation(title))
            state = network.replicas[0].live.encode_state()
            for replica in network.replicas[1:]:
                network.load(replica.index, state)
        for replica in network.replicas:
            self.save_replica(replica.index, compact=False)
        for a in range(count):
            for b in range(a + 1, count):
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

    @rule(data=st.data())
    def foreign_write(self, data: st.DataObject) -> None:
        if self.foreign_writes:
            self.write_with(data, strategies.foreign_writes)

    @rule(data=st.data())
    def foreign_duplicate_id(self, data: st.DataObject) -> None:
        """A message reusing a taken id at any position: what our relay refuses, in a document
        that came from elsewhere. Every replica must read the same first-of-an-id."""
        if self.foreign_writes:
            self.write_with(data, strategies.duplicate_ids)

    @rule(data=st.data())
    def deep_write(self, data: st.DataObject) -> None:
        if self.deep_writes:
            self.write_with(data, strategies.deep_writes)

    # -- the network --------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self.network is not None and bool(self.network.busy_links())

    def _draw_link(self, data: st.DataObject) -> tuple[int, int, int]:
        sender, receiver = data.draw(st.sampled_from(self.net.busy_links()), label="link")
        queue = self.net.queues[(sender, receiver)]
        position = data.draw(st.integers(0, len(queue) - 1), label="position")
        return sender, receiver, position

    @precondition(_busy)
    @rule(data=st.data(), count=st.integers(1, 4))
    def deliver(self, data: st.DataObject, count: int) -> None:
        """Deliver `count` messages, each from any link and any position (0 = in order)."""
        for _ in range(count):
            if not self.net.busy_links():
                return
            self.net.deliver(*self._draw_link(data))

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
        self.net.drop(*self._draw_link(data))

    @precondition(_busy)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        sender, receiver, position = self._draw_link(data)
        size = len(self.net.queues[(sender, receiver)])
        self.net.duplicate(
            sender, receiver, position, data.draw(st.integers(0, size), label="insert at")
        )

    @precondition(lambda self: self.network is not None)
    @rule(data=st.data())
    def partition(self, data: st.DataObject) -> None:
        size = len(self.net.replicas)
        pairs = [(a, b) for a in range(size) for b in range(a + 1, size)]
        self.net.partition(*data.draw(st.sampled_from(pairs), label="pair"))

    @precondition(lambda self: self.network is not None and bool(self.network.cut))
    @rule(data=st.data())
    def heal(self, data: st.DataObject) -> None:
        cut = sorted(tuple(sorted(pair)) for pair in self.net.cut)
        a, b = data.draw(st.sampled_from(cut), label="pair")
        self.net.heal(a, b)

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
        client_id = data.draw(CLIENT_IDS, label="client id")
        while client_id in self.net.used_client_ids:
            client_id += 1
        self.net.restart(index, client_id)

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
        self.net.quiesce(rounds=self.resync_rounds)
        self.check_invariants_now()

    @invariant()
    def count_step(self) -> None:
        if self.network is not None:  # not the check before the first step
            ConversationMachine.steps_taken += 1

    # -- invariants --------------------------------------------------------------------------

    def save_replica(self, index: int, *, compact: bool) -> None:
        """Save, and remember what became durable: it must never be lost."""
        self.net.save(index, compact=compact)
        conversation = self.net.replicas[index].live
        self.durable_ids |= raw_message_ids(conversation)
        self.durable_accepted |= {m.id for m in conversation.all_messages()}

    def check_invariants_now(self) -> list[ReplicaState]:
        """Every replica must be up and in sync (call after `network.quiesce()`)."""
        replicas = self.net.replicas
        states = check_quiescent(replicas, regenerate_unanswered=self.regenerate_unanswered)
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
            self.net.quiesce(rounds=self.resync_rounds)
            self.check_invariants_now()
