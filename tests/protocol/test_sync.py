"""The sans-I/O client sync session, wired back to back in memory.

Every message crosses through the real wire encoding (encode_frame/decode_frame), so these tests
also check that what the session produces is what the wire module can carry. The relay in the
ordering machine is `crdtchat.testing.SimulatedRelay`, the relay's own protocol core with an
in-memory store, so the client and relay protocols run together as in production, minus sockets.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pycrdt import Array, Awareness, Doc, Map, Text

from crdtchat.document import Conversation
from crdtchat.relay.protocol import RoomProtocol
from crdtchat.sync import (
    REMOTE_ORIGIN,
    Denied,
    Durable,
    LocalUpdate,
    PresenceChanged,
    RemoteUpdate,
    SyncProtocolError,
    SyncSession,
)
from crdtchat.testing.network import Outgoing, RelayOutput, SimulatedRelay
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
    encode_frame,
)

NOW = 1_900_000_000.0


def wire(messages: list[WireMessage]) -> list[WireMessage]:
    """What the other side decodes after these messages crossed the wire as one frame."""
    if not messages:
        return []
    return decode_frame(encode_frame(messages))


def messages_root(doc: Doc) -> Array:
    return doc.get("canonical.messages", type=Array)


def append_message(doc: Doc, text: str) -> None:
    messages_root(doc).append(Map({"id": text, "role": "user", "content": Text(text)}))


def contents(doc: Doc) -> list[str]:
    return [str(m["content"]) for m in messages_root(doc)]


def message_ids(doc: Doc) -> set[str]:
    return {str(m["id"]) for m in messages_root(doc)}


def contains(doc_update: bytes, update: bytes) -> bool:
    """Whether applying `update` to the document encoded by `doc_update` would change nothing."""
    scratch: Doc = Doc()
    if doc_update:
        scratch.apply_update(doc_update)
    changed: list[bytes] = []
    scratch.observe(lambda event: changed.append(event.update))
    scratch.apply_update(update)
    return not changed


def exchange(a: SyncSession, b: SyncSession, *, rounds: int = 10) -> None:
    """Deliver everything both ways until nothing is left to send."""
    for _ in range(rounds):
        to_b, to_a = wire(a.data_to_send()), wire(b.data_to_send())
        if not to_a and not to_b:
            return
        for message in to_b:
            b.receive(message)
        for message in to_a:
            a.receive(message)
    raise AssertionError("still exchanging after many rounds")


# -- two sessions back to back -------------------------------------------------------------


def test_connect_sends_state_vector_and_presence() -> None:
    doc: Doc = Doc()
    append_message(doc, "before")
    awareness = Awareness(doc)
    awareness.set_local_state({"user": "ada", "device": "laptop"})
    session = SyncSession(doc, awareness)
    assert session.data_to_send() == []  # nothing goes out before a connection
    session.connect()
    step1, presence = wire(session.data_to_send())
    assert step1 == SyncStep1(doc.get_state())
    assert isinstance(presence, AwarenessMessage)
    other: Doc = Doc()
    other_awareness = Awareness(other)
    other_awareness.apply_awareness_update(presence.payload, "test")
    assert other_awareness.states[doc.client_id] == {"user": "ada", "device": "laptop"}


def test_two_fresh_sessions_converge_both_ways_without_echo() -> None:
    doc_a: Doc = Doc()
    doc_b: Doc = Doc()
    append_message(doc_a, "from a")
    append_message(doc_b, "from b")
    a = SyncSession(doc_a, pending=(), next_local_id=1)
    b = SyncSession(doc_b)
    a.connect()
    b.connect()
    exchange(a, b)
    assert sorted(contents(doc_a)) == sorted(contents(doc_b)) == ["from a", "from b"]
    assert a.synced and b.synced
    # Live edits flow as single updates, and the receiver does not echo them back.
    append_message(doc_a, "live")
    (update,) = wire(a.data_to_send())
    assert isinstance(update, SyncUpdate)
    b.receive(update)
    assert b.data_to_send() == []
    assert contents(doc_b)[-1] == "live" or "live" in contents(doc_b)
    events = b.events()
    assert [type(e) for e in events].count(RemoteUpdate) >= 1
    assert not any(isinstance(e, LocalUpdate) for e in events)


def test_local_edits_before_the_relay_state_vector_ride_in_step2() -> None:
    doc: Doc = Doc()
    session = SyncSession(doc)
    session.connect()
    session.data_to_send()
    append_message(doc, "one")
    append_message(doc, "two")
    assert session.data_to_send() == []  # held: the coming SyncStep2 carries them
    session.receive(SyncStep1(b"\x00"))
    (step2,) = wire(session.data_to_send())
    assert isinstance(step2, SyncStep2)
    replica: Doc = Doc()
    replica.apply_update(step2.update)
    assert contents(replica) == ["one", "two"]


def test_remote_updates_are_applied_with_the_remote_origin_and_recorded_once() -> None:
    source: Doc = Doc()
    append_message(source, "hello")
    doc: Doc = Doc()
    session = SyncSession(doc)
    session.connect()
    session.receive(SyncUpdate(source.get_update()))
    session.receive(SyncUpdate(source.get_update()))  # a duplicate changes nothing
    events = session.events()
    assert events == [RemoteUpdate(source.get_update())]
    assert session.pending_count == 0
    assert contents(doc) == ["hello"]
    assert REMOTE_ORIGIN == "crdtchat.sync.remote"


def test_a_broadcast_that_overtakes_the_step2_waits_for_it() -> None:
    """After a reconnect the relay may broadcast an update before the step 2 carrying what it
    builds on has gone out: the session holds it (pycrdt alone would integrate it behind a
    gap, and it would never be passed on), then applies it after the step 2."""
    source: Doc = Doc()
    append_message(source, "first")
    step2 = source.get_update()
    before = source.get_state()
    append_message(source, "second")
    broadcast = source.get_update(before)
    doc: Doc = Doc()
    session = SyncSession(doc)
    session.connect()
    session.receive(SyncUpdate(broadcast))
    assert contents(doc) == [] and session.events() == []
    session.receive(SyncStep2(step2))
    assert contents(doc) == ["first", "second"]
    assert doc.get_state() == source.get_state()
    # Both are stored, in the order they were applied (what the local file will replay).
    stored = [event.update for event in session.events() if isinstance(event, RemoteUpdate)]
    assert stored == [step2, broadcast]


def _holding_early() -> tuple[SyncSession, bytes, bytes, bytes]:
    """A session that holds `broadcast` early (it waits for `first`), and the writer's state
    before and after both."""
    source: Doc = Doc()
    append_message(source, "first")
    before = source.get_state()
    append_message(source, "second")
    broadcast = source.get_update(before)
    session = SyncSession(Doc())
    session.connect()
    session.receive(SyncUpdate(broadcast))
    session.data_to_send()  # our step 1
    return session, broadcast, b"\x00", source.get_state()


def test_a_step2_is_followed_by_the_held_updates_the_peer_lacks_counted_as_updates() -> None:
    """As Yjs sends its pending structs with its step 2: a peer that sent us an update and
    lost it (a crash) gets it back in one round. They follow the step 2 as SyncUpdates, which
    the peer holds until ready (a step 2 is applied as complete), and each is counted, so an
    acknowledgement covers them as it covers every other update we send."""
    session, broadcast, empty_peer, _ = _holding_early()
    session.receive(SyncStep1(empty_peer))
    sent = wire(session.data_to_send())
    assert [type(m) for m in sent] == [SyncStep2, SyncUpdate]
    assert sent[1].update == broadcast  # type: ignore[union-attr]
    assert session.sent == 2
    session.receive(Ack(2))  # would be a protocol error if the update were not counted
    assert session.acked == 2 and session.durable
    peer = SyncSession(Doc())
    peer.connect()
    peer.receive(sent[1])
    assert contents(peer.doc) == []  # held there too: "first" is still missing


def test_a_step2_is_not_followed_by_held_updates_the_peer_has() -> None:
    """Behind a relay what a client holds early came from the relay (it broadcasts only what
    it stored): nothing goes back for it to judge."""
    session, _, _, writer_state = _holding_early()
    session.receive(SyncStep1(writer_state))
    assert [type(m) for m in wire(session.data_to_send())] == [SyncStep2]
    assert session.sent == 1


def test_bad_update_from_the_relay_is_a_protocol_error_and_leaves_the_doc_alone() -> None:
    doc: Doc = Doc()
    session = SyncSession(doc)
    append_message(doc, "keep")
    before = doc.get_update()
    session.connect()
    with pytest.raises(SyncProtocolError, match="cannot apply"):
        session.receive(SyncUpdate(b"\x05\xff\xff\xff"))
    with pytest.raises(SyncProtocolError, match="state vector"):
        session.receive(SyncStep1(b"\xff\xff"))
    assert doc.get_update() == before
    assert session.pending_count == 1  # the one local edit, untouched


def test_receive_requires_a_connection_and_rejects_non_messages() -> None:
    session = SyncSession(Doc())
    with pytest.raises(RuntimeError):
        session.receive(SyncStep1(b"\x00"))
    session.connect()
    with pytest.raises(TypeError):
        session.receive("hello")  # type: ignore[arg-type]
    session.receive(Extension(150, b"whatever"))  # unknown extensions are skipped


def test_closed_session_stops_observing() -> None:
    doc: Doc = Doc()
    session = SyncSession(doc)
    session.close()
    session.close()
    append_message(doc, "after")
    assert session.events() == []
    with pytest.raises(RuntimeError):
        session.connect()


# -- acknowledgements ----------------------------------------------------------------------


def connected(doc: Doc, **kwargs: object) -> SyncSession:
    """A session that connected and answered an empty relay's SyncStep1."""
    session = SyncSession(doc, **kwargs)  # type: ignore[arg-type]
    session.connect()
    session.receive(SyncStep1(b"\x00"))
    return session


def test_acks_make_pending_updates_durable_in_order() -> None:
    doc: Doc = Doc()
    session = connected(doc)
    sent = wire(session.data_to_send())
    for text in ("a", "b", "c"):
        append_message(doc, text)
        sent += wire(session.data_to_send())
    assert [type(m) for m in sent] == [SyncStep1, SyncStep2, SyncUpdate, SyncUpdate, SyncUpdate]
    assert session.pending_count == 3 and not session.durable
    assert session.sent == 4
    session.receive(Ack(1))  # the (empty) SyncStep2
    assert session.pending_count == 3
    session.receive(Ack(3))
    assert session.pending_ids == (3,)
    assert [e for e in session.events() if isinstance(e, Durable)] == [Durable((1, 2))]
    session.receive(Ack(4))
    assert session.durable and session.acked == 4


def test_messages_sent_as_they_are_are_counted_so_acks_stay_in_step() -> None:
    """A test's hostile client (tests.support.relay.RawClient) sends updates its document did
    not write, through the same session: the relay acknowledges them like any update."""
    doc: Doc = Doc()
    session = connected(doc)
    wire(session.data_to_send())  # step 1 and the step 2: 1 counted
    other: Doc = Doc()
    append_message(other, "not ours")
    session.sent_as_is([SyncUpdate(other.get_update()), QueryAwareness(), SyncStep1(b"\x00")])
    append_message(doc, "ours")
    assert [type(m) for m in wire(session.data_to_send())] == [SyncUpdate]
    assert session.sent == 3
    session.receive(Ack(2))
    assert session.pending_ids == (1,)  # the as-is update carried none of ours
    session.receive(Ack(3))
    assert session.durable


def test_has_data_to_send_is_true_for_an_edit_and_false_after_an_ack() -> None:
    # The replica wakes its sender only when this is true: an ack must not wake it.
    doc: Doc = Doc()
    session = connected(doc)
    assert session.has_data_to_send  # our SyncStep1 and the SyncStep2 answering the relay
    session.data_to_send()
    assert not session.has_data_to_send
    append_message(doc, "a")
    assert session.has_data_to_send
    session.data_to_send()
    session.receive(Ack(2))
    assert session.durable and not session.has_data_to_send


def test_queued_local_updates_go_out_merged_and_settle_together() -> None:
    doc: Doc = Doc()
    session = connected(doc)
    session.data_to_send()
    for text in ("a", "b", "c"):
        append_message(doc, text)
    (merged,) = wire(session.data_to_send())
    assert isinstance(merged, SyncUpdate)
    replica: Doc = Doc()
    replica.apply_update(merged.update)
    assert contents(replica) == ["a", "b", "c"]
    assert session.sent == 2
    session.receive(Ack(2))
    assert session.durable


def test_step2_covers_every_update_pending_before_it() -> None:
    doc: Doc = Doc()
    session = SyncSession(doc, pending=(3, 7), next_local_id=8)  # restored from a local store
    append_message(doc, "offline")
    session.connect()
    session.receive(SyncStep1(b"\x00"))
    append_message(doc, "online")
    session.data_to_send()
    assert session.pending_ids == (3, 7, 8, 9)
    session.receive(Ack(1))
    assert session.pending_ids == (9,)
    session.receive(Ack(2))
    assert session.durable


def test_step2_does_not_cover_updates_made_after_it() -> None:
    doc: Doc = Doc()
    session = SyncSession(doc)
    append_message(doc, "before")  # id 1
    session.connect()
    session.receive(SyncStep1(b"\x00"))  # SyncStep2 queued: covers id 1
    append_message(doc, "after")  # id 2, a separate SyncUpdate
    _, step2, update = wire(session.data_to_send())
    assert isinstance(step2, SyncStep2) and isinstance(update, SyncUpdate)
    session.receive(Ack(1))
    assert session.pending_ids == (2,)


def test_acks_that_lie_are_protocol_errors() -> None:
    session = connected(Doc())
    session.data_to_send()
    with pytest.raises(SyncProtocolError, match="more than"):
        session.receive(Ack(2))
    session.receive(Ack(1))
    with pytest.raises(SyncProtocolError, match="backwards"):
        session.receive(Ack(0))


def test_a_refused_update_stays_pending_and_later_ones_become_durable() -> None:
    doc: Doc = Doc()
    session = connected(doc)
    session.data_to_send()  # step2 (seq 1)
    for text in ("ok", "forbidden", "ok again"):
        append_message(doc, text)
        session.data_to_send()  # updates 1..3 (seq 2..4)
    session.receive(Ack(2))
    session.receive(AuthDenied("writers may not do that"))
    session.receive(Ack(4))
    assert session.pending_ids == (2,)
    events = session.events()
    assert Denied("writers may not do that") in events
    # The next connection's SyncStep2 carries it again; if the relay takes it now, it is durable.
    session.disconnect()
    session.connect()
    session.receive(SyncStep1(b"\x00"))
    session.data_to_send()
    session.receive(Ack(1))
    assert session.durable


def test_a_denial_with_nothing_in_flight_marks_nothing_refused() -> None:
    doc: Doc = Doc()
    session = connected(doc)
    session.data_to_send()
    session.receive(Ack(1))
    session.receive(AuthDenied("awareness too large"))
    append_message(doc, "fine")
    session.data_to_send()
    session.receive(Ack(2))
    assert session.durable


def test_disconnect_forgets_in_flight_but_keeps_pending() -> None:
    doc: Doc = Doc()
    session = connected(doc)
    append_message(doc, "x")
    session.data_to_send()
    session.disconnect()
    assert session.pending_count == 1 and session.sent == 0 and not session.connected
    append_message(doc, "offline")
    assert session.data_to_send() == []
    assert session.pending_count == 2


def test_track_local_counts_existing_content_as_pending() -> None:
    doc: Doc = Doc()
    append_message(doc, "written before the session")
    session = SyncSession(doc)
    assert session.track_local(b"\x00\x00") is None
    local = session.track_local(doc.get_update())
    assert local is not None and local.local_id == 1
    assert session.pending_ids == (1,)
    with pytest.raises(ValueError):
        SyncSession(Doc(), pending=(5,), next_local_id=5)


# -- awareness -----------------------------------------------------------------------------


def test_presence_flows_and_is_cleared_on_disconnect() -> None:
    doc_a: Doc = Doc()
    doc_b: Doc = Doc()
    aw_a, aw_b = Awareness(doc_a), Awareness(doc_b)
    aw_a.set_local_state({"user": "ada", "device": "laptop", "typing": False})
    aw_b.set_local_state({"user": "ada", "device": "phone", "typing": False})
    a, b = SyncSession(doc_a, aw_a), SyncSession(doc_b, aw_b)
    a.connect()
    b.connect()
    exchange(a, b)
    assert aw_a.states[doc_b.client_id]["device"] == "phone"
    assert any(isinstance(e, PresenceChanged) for e in a.events())
    aw_b.set_local_state({"user": "ada", "device": "phone", "typing": True})
    exchange(a, b)
    assert aw_a.states[doc_b.client_id]["typing"] is True
    assert PresenceChanged((), (doc_b.client_id,), ()) in a.events()
    # Query: the relay asks for everything we know.
    a.receive(QueryAwareness())
    (reply,) = wire(a.data_to_send())
    assert isinstance(reply, AwarenessMessage)
    # Goodbye removes us on the other side.
    b.goodbye()
    exchange(a, b)
    assert doc_b.client_id not in aw_a.states
    assert PresenceChanged((), (), (doc_b.client_id,)) in a.events()
    # A lost connection forgets everyone else but keeps our own state.
    aw_b.set_local_state({"user": "ada", "device": "phone"})
    exchange(a, b)
    a.disconnect()
    assert list(aw_a.states) == [doc_a.client_id]


def test_non_ascii_presence_survives_the_wire() -> None:
    doc_a: Doc = Doc()
    aw_a = Awareness(doc_a)
    aw_a.set_local_state({"user": "Zoë 🦊", "device": "téléphone"})
    a = SyncSession(doc_a, aw_a)
    a.connect()
    _, presence = wire(a.data_to_send())
    other = Awareness(Doc())
    other.apply_awareness_update(presence.payload, "test")  # type: ignore[union-attr]
    assert other.states[doc_a.client_id] == {"user": "Zoë 🦊", "device": "téléphone"}


def test_malformed_awareness_is_a_protocol_error() -> None:
    session = SyncSession(Doc(), Awareness(Doc()))
    session.connect()
    with pytest.raises(SyncProtocolError, match="awareness"):
        session.receive(AwarenessMessage(b"\x01\x01\x01\x05{bad"))


# -- the relay's protocol core, and every ordering hypothesis can find ------------------------


@dataclass
class CoreConnection:
    """One client connection to the relay; queues are ordered like TCP."""

    to_relay: deque[WireMessage] = field(default_factory=deque)
    to_client: deque[WireMessage] = field(default_factory=deque)


class CoreRelay:
    """`crdtchat.testing.SimulatedRelay` (the relay's own protocol core with an in-memory
    store: appends are durable only once `store` runs, so acknowledgements lag; a crash loses
    what was not stored, then loads the room again from the store) and the clients' queues.
    Writes to the root "forbidden" are refused, as every root outside the schema is.
    """

    def __init__(self) -> None:
        self.relay = SimulatedRelay()
        self.connections: dict[int, CoreConnection] = {}
        self._route(self.relay.start())

    @property
    def room(self) -> RoomProtocol:
        return self.relay.room

    @property
    def doc(self) -> Doc:
        return self.relay.room.live.doc

    def durable_update(self) -> bytes:
        return self.relay.store.state()

    def _route(self, output: RelayOutput) -> None:
        for item in output:
            if not isinstance(item, Outgoing):
                raise AssertionError(f"the relay closed a connection: {item}")
            self.connections[item.receiver].to_client.extend(decode_frame(item.frame))

    def open(self, client: int) -> CoreConnection:
        connection = CoreConnection()
        self.connections[client] = connection
        self._route(self.relay.connect(client, "writer", f"c{client}"))
        return connection

    def close(self, client: int) -> None:
        if self.connections.pop(client, None) is not None:
            self._route(self.relay.disconnect(client))

    def deliver_one(self, client: int) -> None:
        connection = self.connections[client]
        for message in wire([connection.to_relay.popleft()]):
            self._route(self.relay.receive(client, message, NOW))

    def store(self) -> None:
        """The store commits everything appended so far."""
        self._route(self.relay.store_writes())

    def crash(self) -> None:
        self.connections.clear()
        self.relay.stop()
        self._route(self.relay.start())


CLIENTS = 3
client_ids = st.integers(0, CLIENTS - 1)


class SyncMachine(RuleBasedStateMachine):
    """Clients edit, disconnect and reconnect while messages cross in any order the
    per-connection FIFO allows; the relay (its real protocol core) stores, acks, refuses and
    crashes."""

    @initialize()
    def setup(self) -> None:
        self.relay = CoreRelay()
        self.conversations = [
            Conversation(author=f"c{client}", role="writer") for client in range(CLIENTS)
        ]
        self.docs: list[Doc] = [conversation.doc for conversation in self.conversations]
        self.sessions = [SyncSession(doc) for doc in self.docs]
        self.local_updates: dict[tuple[int, int], bytes] = {}
        self.forbidden_ids: set[tuple[int, int]] = set()
        self.edits = 0

    def _collect(self, client: int) -> None:
        for event in self.sessions[client].events():
            if isinstance(event, LocalUpdate):
                self.local_updates[(client, event.local_id)] = event.update
            if isinstance(event, Durable):
                for local_id in event.local_ids:
                    assert (client, local_id) not in self.forbidden_ids

    def _flush_client(self, client: int) -> None:
        connection = self.relay.connections.get(client)
        messages = self.sessions[client].data_to_send()
        if connection is not None:
            connection.to_relay.extend(messages)

    @rule(client=client_ids, text=st.text(min_size=1, max_size=5), send=st.booleans())
    def edit(self, client: int, text: str, send: bool) -> None:
        self.edits += 1
        self.conversations[client].append("user", f"{client}:{self.edits}:{text}")
        self._collect(client)
        if send:  # otherwise it waits, and goes out merged with later ones
            self._flush_client(client)

    @rule(client=client_ids, title=st.text(min_size=1, max_size=5), send=st.booleans())
    def set_the_title(self, client: int, title: str, send: bool) -> None:
        """A map write that concurrent writes overwrite, beside the appended messages."""
        self.conversations[client].set_title(title)
        self._collect(client)
        if send:
            self._flush_client(client)

    @rule(client=client_ids, send=st.booleans())
    def forbidden_edit(self, client: int, send: bool) -> None:
        self.docs[client].get("forbidden", type=Map)[f"k{self.edits}"] = client
        self.edits += 1
        before = set(self.local_updates)
        self._collect(client)
        self.forbidden_ids |= set(self.local_updates) - before
        if send:
            self._flush_client(client)

    @rule(client=client_ids)
    def send_queued(self, client: int) -> None:
        self._flush_client(client)

    @precondition(lambda self: len(self.relay.connections) < CLIENTS)
    @rule(client=client_ids)
    def connect(self, client: int) -> None:
        if client in self.relay.connections:
            return
        connection = self.relay.open(client)
        self.sessions[client].connect()
        connection.to_relay.extend(self.sessions[client].data_to_send())

    @rule(client=client_ids, roll=st.integers(0, 3))
    def disconnect(self, client: int, roll: int) -> None:
        # Rolls keep connections alive long enough for acks and refusals to interleave.
        if roll == 0 and client in self.relay.connections:
            self.relay.close(client)
            self.sessions[client].disconnect()

    @rule(client=client_ids, count=st.integers(1, 4))
    def deliver_to_relay(self, client: int, count: int) -> None:
        connection = self.relay.connections.get(client)
        while connection is not None and connection.to_relay and count:
            self.relay.deliver_one(client)
            count -= 1

    @rule(client=client_ids, count=st.integers(1, 4))
    def deliver_to_client(self, client: int, count: int) -> None:
        connection = self.relay.connections.get(client)
        while connection is not None and connection.to_client and count:
            for message in wire([connection.to_client.popleft()]):
                self.sessions[client].receive(message)
            self._collect(client)
            self._flush_client(client)
            count -= 1

    @rule()
    def relay_stores(self) -> None:
        self.relay.store()

    @rule(roll=st.integers(0, 7))
    def relay_crashes(self, roll: int) -> None:
        if roll:
            return
        for client in list(self.relay.connections):
            self.sessions[client].disconnect()
        self.relay.crash()

    @invariant()
    def durable_means_stored(self) -> None:
        """Every local update a session no longer counts as pending is in the relay's store."""
        if not hasattr(self, "relay"):
            return
        stored = self.relay.durable_update()
        for (client, local_id), update in self.local_updates.items():
            if local_id not in self.sessions[client].pending_ids:
                assert contains(stored, update), (client, local_id)

    def teardown(self) -> None:
        if not hasattr(self, "relay"):
            return
        # Heal: everyone reconnects and all queues drain; the unforbidden state converges.
        for client in range(CLIENTS):
            if client in self.relay.connections:
                self.relay.close(client)
                self.sessions[client].disconnect()
            self.connect(client)
        for _ in range(200):
            busy = False
            for client in range(CLIENTS):
                connection = self.relay.connections[client]
                while connection.to_relay:
                    self.relay.deliver_one(client)
                    busy = True
                self.relay.store()
                while connection.to_client:
                    busy = True
                    for message in wire([connection.to_client.popleft()]):
                        self.sessions[client].receive(message)
                    self._collect(client)
                    self._flush_client(client)
            if not busy:
                break
        else:
            raise AssertionError("did not quiesce")
        relay_messages = sorted(contents(self.relay.doc))
        for client, doc in enumerate(self.docs):
            session = self.sessions[client]
            if any(c == client for (c, _) in self.forbidden_ids):
                # Its SyncStep2 always carries the refused write, so the relay refuses it whole:
                # it keeps receiving, but stays not durable and may hold edits nobody else has.
                assert not session.durable
                assert message_ids(self.relay.doc) <= message_ids(doc)
            else:
                assert session.durable, session.pending_ids
                assert sorted(contents(doc)) == relay_messages
                assert doc.get_state() == self.relay.doc.get_state()
        self.durable_means_stored()
        for session in self.sessions:
            session.close()
        for conversation in self.conversations:
            conversation.close()
        self.relay.room.close()


TestSyncOrderings = SyncMachine.TestCase
TestSyncOrderings.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
