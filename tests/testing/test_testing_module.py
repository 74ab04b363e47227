"""The public testing module checks what it claims: its network, store and checks can fail."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule
from pycrdt import Doc

import tests.support.hypothesis_profiles  # noqa: F401  (profiles, if conftest has not loaded them)
from crdtchat.document import Conversation
from crdtchat.testing import (
    ConversationMachine,
    CreateConversation,
    LocalStore,
    SimulatedNetwork,
    check_converged,
    check_kept,
    check_reader_rules,
    check_rebuild,
    check_round_trip,
    decode_state_vector,
    operations,
    read_replica,
    reference_reading,
    texts,
)
from crdtchat.testing.operations import (
    AppendMessage,
    DiscardDerived,
    ForeignMessage,
    InsertText,
    SetTitle,
)

NOW = 1_700_000_000.0


def network(count: int = 2, *, connected: bool = True) -> SimulatedNetwork:
    net = SimulatedNetwork(
        ["alice"] * count, clock=lambda: NOW, client_ids=range(1, count + 1), connected=connected
    )
    net.apply(0, CreateConversation("t"))
    net.deliver_all()
    return net


def ids(conversation: Conversation) -> list[str]:
    return [m.id for m in conversation.all_messages()]


# -- network -------------------------------------------------------------------------------


def test_a_write_reaches_connected_peers_only_when_delivered() -> None:
    net = network(3)
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    assert ids(net.replicas[1].live) == []
    assert [e.kind for e in net.queues[(0, 1)]] == ["update"]
    net.deliver(0, 1)
    assert ids(net.replicas[1].live) == ["m"]
    assert ids(net.replicas[2].live) == []


def test_a_dropped_update_is_repaired_by_the_state_vector_resync() -> None:
    net = network()
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    net.drop(0, 1, 0)
    net.deliver_all()
    assert ids(net.replicas[1].live) == []
    net.quiesce()
    assert ids(net.replicas[1].live) == ["m"]
    check_converged([r.live for r in net.replicas])


def test_reordered_and_duplicated_updates_converge() -> None:
    net = network()
    net.apply(0, AppendMessage("a", "user", "x", parent=None))
    net.apply(0, InsertText("a", 1, "😀y"))
    net.apply(0, AppendMessage("b", "user", "z", parent="a"))
    net.duplicate(0, 1, 0, 3)
    net.deliver(0, 1, 2)
    net.deliver(0, 1, 0)
    net.deliver_all()
    check_converged([r.live for r in net.replicas])
    assert net.replicas[1].live.message("a").content == "x😀y"


def test_a_partition_loses_in_flight_messages_and_heal_resyncs() -> None:
    net = network()
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    net.partition(0, 1)
    assert not net.queues[(0, 1)]
    net.apply(0, AppendMessage("n", "user", "again", parent="m"))
    assert not net.queues[(0, 1)], "nothing is sent over a cut link"
    net.heal(0, 1)
    net.deliver_all()
    assert ids(net.replicas[1].live) == ["m", "n"]


def test_a_crash_loses_exactly_what_was_not_saved() -> None:
    net = network(2, connected=False)
    net.apply(0, AppendMessage("kept", "user", "a", parent=None))
    net.save(0)
    net.apply(0, AppendMessage("lost", "user", "b", parent="kept"))
    net.crash(0)
    assert not net.replicas[0].alive
    net.restart(0, 99)
    assert ids(net.replicas[0].live) == ["kept"]
    assert net.replicas[0].live.doc.client_id == 99


def test_a_compacted_store_reopens_the_same_document() -> None:
    net = network(2, connected=False)
    for index in range(3):
        net.apply(0, AppendMessage(f"m{index}", "user", "é" * index, parent=None))
    before = read_replica(net.replicas[0].live)
    net.save(0, compact=True)
    assert len(net.replicas[0].store.saved) == 1
    net.crash(0)
    net.restart(0, 50)
    assert read_replica(net.replicas[0].live).roots == before.roots


def test_client_ids_are_never_reused() -> None:
    net = network(2)
    net.crash(1)
    with pytest.raises(ValueError, match="used before"):
        net.restart(1, 1)


def test_quiesce_restarts_heals_and_converges() -> None:
    net = network(3)
    net.partition(0, 2)
    net.apply(0, SetTitle("new"))
    net.crash(1)
    net.quiesce()
    assert all(r.alive for r in net.replicas)
    states = check_converged([r.live for r in net.replicas])
    assert states[0].roots["canonical.meta"]["title"] == "new"


def test_local_store_keeps_saved_updates_only() -> None:
    store = LocalStore()
    store.record(b"a")
    store.save()
    store.record(b"b")
    store.lose_unsaved()
    assert store.saved == [b"a"] and store.unsaved == []


# -- checks can fail ------------------------------------------------------------------------


def test_check_converged_names_the_first_difference() -> None:
    net = network(2, connected=False)
    net.apply(0, SetTitle("left"))
    with pytest.raises(AssertionError, match=r"replica 1 differs.*canonical.meta"):
        check_converged([r.live for r in net.replicas])


def test_check_rebuild_fails_when_history_misses_an_update() -> None:
    net = network(1, connected=False)
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    replica = net.replicas[0]
    check_rebuild(replica)
    replica.history.pop()
    with pytest.raises(AssertionError, match="rebuilt"):
        check_rebuild(replica)


def test_check_round_trip_passes_for_a_live_document() -> None:
    net = network(1, connected=False)
    net.apply(0, AppendMessage("m", "user", "𝔘nicode", parent=None))
    check_round_trip(net.replicas[0].live)


def test_check_kept_reports_lost_messages() -> None:
    net = network(1, connected=False)
    with pytest.raises(AssertionError, match="lost durable messages"):
        check_kept([net.replicas[0].live], accepted_ids={"gone"})


def test_reference_reading_applies_the_reader_rules() -> None:
    roots = {
        "canonical.settings": {},
        "canonical.tools": {},
        "transport.regenerate": {},
        "canonical.messages": [
            {"id": "a", "role": "user", "author": "x", "parent": None},
            {"id": "a", "role": "user", "author": "x", "parent": None},  # duplicate
            {"id": "b", "role": "robot", "author": "x", "parent": "a"},  # unknown role
            {"id": "c", "role": "user", "author": "x", "parent": "zz"},  # dangling
            {"id": "d", "role": "assistant", "author": "w", "parent": "a"},
            {"id": "e", "role": "user", "author": "x", "parent": None},
        ],
    }
    reading = reference_reading(roots)
    assert reading.accepted == ("a", "d", "e")
    assert reading.problem_positions == (1, 2, 3)
    assert reading.leaves == ("d", "e")
    assert reading.current_thread == ("e",)
    assert reading.waiting == (("e", 1),)


def test_reader_rules_hold_for_foreign_junk() -> None:
    net = network(1, connected=False)
    for fields in (None, 7, "x", {"id": 3}, {"id": "q", "role": "user", "author": "m"}):
        net.apply(0, ForeignMessage(fields))
    check_reader_rules(read_replica(net.replicas[0].live))


def test_decode_state_vector() -> None:
    doc = Doc(client_id=7)
    conversation = Conversation(doc, author="a")
    conversation.set_title("x")
    assert decode_state_vector(conversation.state_vector()) == {7: 1}


def test_discard_operation_checks_the_canonical_section() -> None:
    net = network(1, connected=False)
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    DiscardDerived().apply(net.replicas[0].live)  # must not raise: canonical untouched


# -- strategies ----------------------------------------------------------------------------


@settings(max_examples=30)
@given(st.data())
def test_every_drawn_operation_applies_to_the_state_it_was_drawn_for(data: st.DataObject) -> None:
    conversation = Conversation(Doc(client_id=1), author="alice", clock=lambda: NOW)
    CreateConversation().apply(conversation)
    for _ in range(data.draw(st.integers(1, 12))):
        data.draw(operations(conversation)).apply(conversation)
    check_reader_rules(read_replica(conversation))


@settings(max_examples=50)
@given(texts(min_size=1, max_size=20))
def test_texts_are_valid_unicode_without_surrogates(text: str) -> None:
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    text.encode()
    json.dumps(text)


def test_texts_reach_beyond_the_basic_plane() -> None:
    from hypothesis import find

    found = find(texts(min_size=1), lambda t: any(ord(c) > 0xFFFF for c in t))  # or raises
    assert max(map(ord, found)) > 0xFFFF


# -- subclassing ---------------------------------------------------------------------------


class _CountingMachine(ConversationMachine):
    """A user's subclass: an extra invariant that sees every quiescence."""

    checked: list[int] = []  # noqa: RUF012

    def extra_invariants(self, replicas):  # type: ignore[no-untyped-def]
        titles = {json.dumps(r.live.title) for r in replicas}
        assert len(titles) == 1
        type(self).checked.append(len(replicas))


def test_a_subclass_invariant_runs_at_every_quiescence() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    _CountingMachine.checked.clear()
    run_state_machine_as_test(
        _CountingMachine,
        settings=settings(max_examples=3, stateful_step_count=5, derandomize=True, database=None),
    )
    assert _CountingMachine.checked, "teardown quiesces and checks every run"
    assert all(2 <= n <= 4 for n in _CountingMachine.checked)


def test_check_no_gap_flags_an_update_integrated_ahead_of_its_predecessors() -> None:
    from crdtchat.testing import check_no_gap, integrates_fully

    writer = Conversation(Doc(client_id=1), author="alice", clock=lambda: NOW)
    CreateConversation().apply(writer)
    updates: list[bytes] = []
    writer.on_update(updates.append)
    AppendMessage("m", "user", "hi", parent=None).apply(writer)
    early = Conversation(Doc(client_id=2), author="bob")
    assert not integrates_fully(early.encode_state(), updates[-1])
    assert integrates_fully(writer.encode_state(), updates[-1])
    check_no_gap(writer)
    early.apply_update(updates[-1])  # held back by the Conversation: no gap
    check_no_gap(early)
    early.doc.apply_update(updates[-1])  # straight into pycrdt: integrated behind a gap
    with pytest.raises(AssertionError, match="beyond its state vector"):
        check_no_gap(early)


def test_held_updates_wait_for_their_predecessors() -> None:
    net = SimulatedNetwork(
        ["alice", "bob"], clock=lambda: NOW, client_ids=[1, 2], hold_early_updates=True
    )
    net.deliver_all()  # the handshake: from now on writes go out as updates
    net.apply(0, CreateConversation())
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    assert [e.kind for e in net.queues[(0, 1)]] == ["update", "update"]
    net.drop(0, 1, 0)  # the creation is lost: the message starts beyond what replica 1 has
    net.deliver(0, 1, 0)
    assert net.replicas[1].held and ids(net.replicas[1].live) == []
    net.quiesce()
    assert not net.replicas[1].held
    assert ids(net.replicas[1].live) == ["m"]
    check_converged([r.live for r in net.replicas])


# -- the examples of docs/testing.md ---------------------------------------------------------


def test_the_network_example_of_the_docs() -> None:
    from crdtchat.testing import check_quiescent

    net = SimulatedNetwork(["alice", "bob"], clock=lambda: 1.7e9, client_ids=[1, 2])
    net.apply(0, CreateConversation("notes"))
    net.apply(0, AppendMessage("m1", "user", "hi", parent=None))
    assert net.drop(0, 1, 0).kind == "sync_step1"
    net.partition(0, 1)
    net.crash(1)
    net.restart(1, client_id=7)
    net.quiesce()
    check_quiescent(net.replicas)
    assert ids(net.replicas[1].live) == ["m1"]


@dataclass(frozen=True)
class Pin:
    message_id: str

    def apply(self, conversation: Conversation) -> None:
        conversation.meta["pinned"] = self.message_id


class PinningMachine(ConversationMachine):
    replica_counts = st.integers(2, 3)
    foreign_writes = False
    pins = 0

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        index = self.draw_replica(data)
        message_ids = [m.id for m in self.net.replicas[index].live.all_messages()]
        if message_ids:
            self.apply(index, Pin(data.draw(st.sampled_from(message_ids))))
            PinningMachine.pins += 1

    def extra_invariants(self, replicas):  # type: ignore[no-untyped-def]
        pinned = {r.live.meta.get("pinned") for r in replicas}
        assert len(pinned) == 1, pinned


def test_the_subclassing_example_of_the_docs() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    PinningMachine.pins = 0
    run_state_machine_as_test(
        PinningMachine,
        settings=settings(max_examples=15, stateful_step_count=20, derandomize=True, database=None),
    )
    assert PinningMachine.pins > 0


# -- behind the relay -------------------------------------------------------------------------


def relayed(roles: list[str], **config: object) -> SimulatedNetwork:
    """Replicas behind the in-process relay, synced, with the conversation created by 0."""
    from crdtchat.relay.config import RelayConfig
    from crdtchat.testing.network import SECRET

    net = SimulatedNetwork(
        ["alice", "bob", "worker-1"][: len(roles)],
        clock=lambda: NOW,
        client_ids=range(1, len(roles) + 1),
        relay=True,
        roles=roles,
        relay_config=RelayConfig(secret=SECRET, **config),  # type: ignore[arg-type]
    )
    net.apply(0, CreateConversation("t"))
    net.settle()
    return net


def test_every_frame_to_and_from_the_relay_is_a_wire_message() -> None:
    from crdtchat.testing import RELAY
    from crdtchat.wire import SyncUpdate

    net = relayed(["writer", "writer"])
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    [frame] = net.queues[(0, RELAY)]
    assert frame.kind == "update" and isinstance(frame.message(), SyncUpdate)
    assert repr(frame).endswith(f"update 0->relay {len(frame.payload)}B>")


def test_the_relay_broadcasts_and_acknowledges_only_what_its_store_made_durable() -> None:
    from crdtchat.testing import RELAY

    net = relayed(["writer", "writer"])
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    net.deliver_all()
    assert len(net.relay_store.writes) == 1, "asked to store, not yet durable"
    assert not net.queues[(RELAY, 1)] and not net.queues[(RELAY, 0)]
    assert net.replicas[0].sessions[RELAY].pending_count == 1
    net.store_writes(1)
    assert [e.kind for e in net.queues[(RELAY, 1)]] == ["update"]
    assert [repr(e).split()[1:3] for e in net.queues[(RELAY, 0)]] == [["ack", "2"]]
    net.deliver_all()
    assert ids(net.replicas[1].live) == ["m"]
    assert net.replicas[0].sessions[RELAY].durable


def test_a_relay_crash_loses_what_its_store_had_not_made_durable_and_resync_repairs_it() -> None:
    net = relayed(["writer", "writer"])
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    net.deliver_all()
    net.crash_relay()
    assert "m" not in ids(open_store(net))
    net.restart_relay()
    net.settle()
    assert ids(net.replicas[1].live) == ["m"], "replica 0 sent it again: it was not acked"
    assert "m" in ids(open_store(net))


def open_store(net: SimulatedNetwork) -> Conversation:
    from crdtchat.testing.invariants import open_update

    return open_update(net.relay_store.state() or None)


def test_a_readers_write_is_refused_by_the_relay_and_blocks_it_until_it_recovers() -> None:
    from crdtchat.testing.operations import ForeignMapWrite

    net = relayed(["writer", "reader"])
    net.apply(1, ForeignMapWrite("canonical.meta", "title", "mine"))  # bypasses the role check
    net.settle()
    assert net.replicas[1].blocked
    assert net.refusals == [(1, "a reader may not change the document")]
    assert net.replicas[0].live.title == "t"
    net.recover(1, client_id=50)
    net.settle()
    assert not net.replicas[1].blocked and net.replicas[1].live.title == "t"
    check_converged([r.live for r in net.replicas])


def test_a_conversation_behind_the_relay_refuses_up_front_what_its_role_may_not_write() -> None:
    from crdtchat.errors import ConversationError

    net = relayed(["writer", "reader"])
    with pytest.raises(ConversationError, match="a reader may not"):
        net.apply(1, SetTitle("no"))
    assert not net.queues[(1, -1)]


def test_the_relay_compacts_its_store_and_a_restart_loads_the_snapshot() -> None:
    net = relayed(["writer", "writer"], compact_updates=2)
    for index in range(3):
        net.apply(0, AppendMessage(f"m{index}", "user", "x", parent=None))
        net.settle()
    assert net.relay_store.snapshot, "compacted"
    net.crash_relay()
    net.restart_relay()
    net.crash(1)
    net.restart(1, client_id=60)
    net.settle()
    assert ids(net.replicas[1].live) == ["m0", "m1", "m2"]


def test_a_store_failure_closes_every_connection_and_the_room_reloads() -> None:
    from crdtchat.relay.protocol import CloseKind

    net = relayed(["writer", "writer"])
    net.fail_store()
    assert {kind for _, kind, _ in net.relay.closes} == {CloseKind.UNAVAILABLE}  # type: ignore[union-attr]
    assert not net.connected(0, -1)
    net.quiesce()
    check_converged([r.live for r in net.replicas])


def test_a_relay_connection_neither_reorders_nor_duplicates_and_a_lost_frame_breaks_it() -> None:
    from crdtchat.testing import RELAY

    net = relayed(["writer", "writer"])
    net.apply(0, AppendMessage("m", "user", "hi", parent=None))
    net.apply(0, SetTitle("u"))
    net.deliver_all()
    net.store_writes()
    with pytest.raises(ValueError, match="in order"):
        net.deliver(RELAY, 1, 1)
    with pytest.raises(ValueError, match="duplicate"):
        net.duplicate(RELAY, 1, 0, 0)
    net.drop(RELAY, 1, 0)
    assert not net.connected(1, RELAY) and not net.queues[(RELAY, 1)]
    net.quiesce()
    assert ids(net.replicas[1].live) == ["m"]
