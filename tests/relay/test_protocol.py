"""The relay's protocol core, in-process: no sockets, no subprocess, no clock.

Every test drives `RoomProtocol` with wire messages built by `crdtchat.wire` from real pycrdt
documents (a `Conversation` writes them as a client would) and checks the actions it returns:
what is sent to whom, what is stored, what is acknowledged when, and which peer is closed with
what code, reason and kind (design §3, the relay's protocol core).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path

import pytest
from pycrdt import Doc, Map

import crdtchat.relay.livedoc as livedoc_module
import crdtchat.relay.protocol as protocol_module
from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.membership import (
    AccessError,
    MemberChange,
    change_member,
    claim_owner,
    members,
)
from crdtchat.relay.protocol import (
    ACCESS_REVOKED_CODE,
    TOKEN_EXPIRED_CODE,
    Acknowledge,
    Action,
    Append,
    Broadcast,
    Close,
    CloseKind,
    Compact,
    Decide,
    Peer,
    RoomProtocol,
    Send,
    VerifyToken,
)
from crdtchat.relay.ratelimit import Subjects
from crdtchat.schema import MEMBERS
from crdtchat.tokens import TokenClaims, TokenError
from crdtchat.wire import (
    AuthDenied,
    AwarenessEntry,
    AwarenessMessage,
    Extension,
    QueryAwareness,
    RefreshAnswer,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireMessage,
    decode_awareness,
    decode_frame,
    encode_awareness,
    encode_token_refresh,
)

NOW = 1_900_000_000.0  # every input takes `now`; the tests pick it
EXP = int(NOW) + 3600
ROOM = "room-1"


class Harness:
    """A room's protocol and the peers of a test, with helpers to write and read messages."""

    def __init__(self, **config: object) -> None:
        self.config = RelayConfig(secret="s", **config)  # type: ignore[arg-type]
        self.subjects = Subjects(self.config.subject_quotas())
        self.room = RoomProtocol(ROOM, self.config)
        self.room.load(b"", 1, 0, 0)

    def peer(
        self,
        sub: str = "alice",
        role: str = "writer",
        *,
        want_ack: bool = True,
        want_refresh: bool = False,
        identity: bool = False,
        exp: int = EXP,
    ) -> Peer:
        claims = TokenClaims(sub, exp, None if identity else ROOM, role)  # type: ignore[arg-type]
        subject = self.subjects.connect(sub)
        assert not isinstance(subject, str)
        peer = Peer(
            claims,
            subject,
            self.config,
            want_ack=want_ack,
            want_refresh=want_refresh,
            identity=identity,
        )
        self.room.join(peer)
        return peer

    def receive(self, peer: Peer, message: WireMessage, now: float = NOW) -> list[Action]:
        return self.room.receive(peer, message, now)


class Client:
    """A client's copy of the document: writes become SyncUpdate messages."""

    def __init__(self, author: str = "alice") -> None:
        self.conversation = Conversation(author=author)

    def write(self, text: str = "hello", *, message_id: str | None = None) -> SyncUpdate:
        doc = self.conversation.doc
        before = doc.get_state()
        self.conversation.append("user", text, message_id=message_id)
        return SyncUpdate(doc.get_update(before))


def messages_to(actions: list[Action], peer: Peer) -> list[WireMessage]:
    """The wire messages `actions` send to `peer` alone (Send), in order."""
    return [
        message
        for action in actions
        if isinstance(action, Send) and action.peer is peer
        for message in decode_frame(action.message)
    ]


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [action for action in actions if isinstance(action, kind)]


def closes(actions: list[Action]) -> list[Close]:
    return only(actions, Close)


# -- the module ----------------------------------------------------------------------------


def test_the_core_imports_no_io_and_reads_no_clock() -> None:
    tree = ast.parse(Path(protocol_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"asyncio", "anyio", "websockets", "trio", "threading", "socket", "time", "sqlite3"}
    assert imported, "the walk found no import at all"
    assert not imported & forbidden, f"the protocol core imports {imported & forbidden}"


# -- joining, sync step 1 and 2 --------------------------------------------------------------


def test_a_joining_peer_gets_the_rooms_state_vector() -> None:
    h = Harness()
    client = Client()
    writer = h.peer()
    h.room.stored(max(a.seq for a in only(h.receive(writer, client.write()), Append)))
    reader = Peer(TokenClaims("bob", EXP, ROOM, "reader"), h.subjects.get("bob"), h.config)
    (step1,) = messages_to(h.room.join(reader), reader)
    assert isinstance(step1, SyncStep1)
    assert step1.state_vector == h.room.live.doc.get_state()


def test_sync_step_1_is_answered_with_what_the_peer_lacks() -> None:
    h = Harness()
    writer = h.peer()
    assert only(h.receive(writer, Client().write("one")), Append)
    h.room.stored(1)
    reader = h.peer("bob", "reader")
    (reply,) = messages_to(h.receive(reader, SyncStep1(Doc().get_state())), reader)
    assert isinstance(reply, SyncStep2)
    copy = Conversation(author="bob")
    copy.doc.apply_update(reply.update)
    assert [m.content for m in copy.all_messages()] == ["one"]


def test_a_sync_step_2_reply_waits_until_what_it_may_contain_is_stored() -> None:
    h = Harness()
    writer = h.peer()
    reader = h.peer("bob", "reader")
    actions = h.receive(writer, Client().write())
    assert only(actions, Append) == [Append(1, only(actions, Append)[0].update)]
    waiting = h.receive(reader, SyncStep1(Doc().get_state()))
    assert messages_to(waiting, reader) == [], "a reply left before the write it holds was stored"
    released = h.room.stored(1)
    (reply,) = messages_to(released, reader)
    assert isinstance(reply, SyncStep2)


def test_a_sync_step_2_from_a_writer_is_judged_stored_and_broadcast() -> None:
    h = Harness()
    writer = h.peer()
    other = h.peer("bob", "reader")
    update = Client().write().update
    actions = h.receive(writer, SyncStep2(update))
    (append,) = only(actions, Append)
    assert append.seq == 1
    after = h.room.stored(1)
    (broadcast,) = only(after, Broadcast)
    assert broadcast.exclude is writer
    assert decode_frame(broadcast.message) == [SyncUpdate(append.update)]
    assert other in h.room.peers


def test_a_malformed_state_vector_closes_the_peer_as_malformed() -> None:
    h = Harness()
    peer = h.peer()
    (close,) = closes(h.receive(peer, SyncStep1(b"\xff\xff\xff")))
    assert (close.code, close.kind) == (1008, CloseKind.MALFORMED)
    assert close.reason.startswith("state vector")


# -- updates, acknowledgements and their order ------------------------------------------------


def test_an_update_is_broadcast_and_acknowledged_only_after_it_is_stored() -> None:
    h = Harness()
    writer = h.peer()
    reader = h.peer("bob", "reader")
    actions = h.receive(writer, Client().write())
    assert only(actions, Append) and not only(actions, Broadcast)
    assert not only(actions, Acknowledge), "acknowledged before the store held it"
    after = h.room.stored(1)
    assert [type(a) for a in after] == [Broadcast, Acknowledge]
    assert after[1] == Acknowledge(writer, 1)
    assert h.room.metrics.updates_out == 1  # the reader; not the writer itself
    assert reader in h.room.peers


def test_broadcasts_follow_the_order_of_sequence_numbers() -> None:
    h = Harness()
    alice, bob = h.peer("alice"), h.peer("bob")
    first = only(h.receive(alice, Client("alice").write("a")), Append)[0]
    second = only(h.receive(bob, Client("bob").write("b")), Append)[0]
    assert (first.seq, second.seq) == (1, 2)
    assert h.room.stored(0) == []
    after = h.room.stored(2)
    sent = [decode_frame(b.message)[0] for b in only(after, Broadcast)]
    assert sent == [SyncUpdate(first.update), SyncUpdate(second.update)]
    assert only(after, Acknowledge) == [Acknowledge(alice, 1), Acknowledge(bob, 1)]


def test_the_acknowledgement_waits_while_more_of_the_peer_is_unstored() -> None:
    h = Harness()
    writer = h.peer()
    client = Client()
    h.receive(writer, client.write("a"))
    h.receive(writer, client.write("b"))
    assert only(h.room.stored(1), Acknowledge) == [], "acked with a later write still unstored"
    assert only(h.room.stored(2), Acknowledge) == [Acknowledge(writer, 2)]


def test_an_update_that_changes_nothing_is_settled_without_a_store_write() -> None:
    h = Harness()
    writer = h.peer()
    update = Client().write()
    h.receive(writer, update)
    h.room.stored(1)
    again = h.receive(writer, update)
    assert not only(again, Append) and not only(again, Broadcast)
    assert only(again, Acknowledge) == [Acknowledge(writer, 2)]


def test_a_peer_without_the_ack_extension_gets_no_acknowledgement() -> None:
    h = Harness()
    writer = h.peer(want_ack=False)
    h.receive(writer, Client().write())
    assert only(h.room.stored(1), Acknowledge) == []


def test_an_update_accepted_before_its_sender_left_is_still_broadcast() -> None:
    h = Harness()
    writer = h.peer()
    h.peer("bob", "reader")
    h.receive(writer, Client().write())
    h.room.leave(writer)
    after = h.room.stored(1)
    assert len(only(after, Broadcast)) == 1
    assert only(after, Acknowledge) == []


# -- refusals -----------------------------------------------------------------------------------


def test_a_refused_update_is_acknowledged_before_its_auth_denied_and_never_stored() -> None:
    h = Harness()
    reader = h.peer("bob", "reader")
    actions = h.receive(reader, Client("bob").write())
    assert not only(actions, Append) and not only(actions, Broadcast)
    (denied,) = messages_to(actions, reader)
    assert isinstance(denied, AuthDenied)
    assert "reader" in denied.reason
    assert only(actions, Acknowledge) == [Acknowledge(reader, 1)]
    assert h.room.metrics.refused_writes == 1


def test_a_refusal_waits_behind_the_peers_earlier_unstored_update() -> None:
    h = Harness()
    writer = h.peer()
    client = Client()
    h.receive(writer, client.write("mine", message_id="m1"))
    duplicate = Client("alice")
    refused = h.receive(writer, duplicate.write("again", message_id="m1"))
    assert messages_to(refused, writer) == [], "the refusal overtook the earlier update"
    after = h.room.stored(1)
    ordered = [a for a in after if not isinstance(a, Broadcast)]
    assert ordered[0] == Acknowledge(writer, 1)
    (denied,) = messages_to(ordered, writer)
    assert isinstance(denied, AuthDenied) and "m1" in denied.reason
    assert ordered[-1] == Acknowledge(writer, 2)


def test_a_subject_that_keeps_being_refused_is_closed() -> None:
    h = Harness()
    reader = h.peer("bob", "reader")
    client = Client("bob")
    result: list[Action] = []
    for _ in range(int(h.config.subject_quotas().refusal_burst) + 1):
        result = h.receive(reader, client.write())
    (close,) = closes(result)
    assert (close.code, close.kind) == (1008, CloseKind.REFUSALS)
    assert close.reason.startswith("too many refused writes")
    assert h.receive(reader, client.write()) == [], "a closing peer's messages are dropped"


# -- protocol violations and limits -------------------------------------------------------------


def test_an_undecodable_update_closes_the_peer_as_malformed() -> None:
    h = Harness()
    peer = h.peer()
    (close,) = closes(h.receive(peer, SyncUpdate(b"\x05\xff\x00garbage")))
    assert (close.code, close.kind) == (1008, CloseKind.MALFORMED)
    assert close.reason.startswith("update could not be decoded")
    assert peer.closing


def test_an_update_over_the_shape_limits_closes_the_peer_as_limits() -> None:
    h = Harness(max_value_bytes=64)
    peer = h.peer()
    (close,) = closes(h.receive(peer, Client().write("x" * 1000)))
    assert (close.code, close.kind) == (1008, CloseKind.LIMITS)
    assert close.reason.startswith("update exceeds limits")


def test_a_full_room_closes_the_writer_with_1009() -> None:
    h = Harness(max_document=64)
    peer = h.peer()
    (close,) = closes(h.receive(peer, Client().write("y" * 200)))
    assert (close.code, close.kind) == (1009, CloseKind.LIMITS)
    assert close.reason.startswith("room is full")


def test_a_subject_over_its_byte_quota_is_told_to_come_back_later() -> None:
    h = Harness(quota_bytes=100)
    peer = h.peer()
    (close,) = closes(h.receive(peer, Client().write("z" * 300)))
    assert (close.code, close.kind) == (1013, CloseKind.QUOTA)
    assert close.reason.startswith("quota")
    assert not only(h.room.stored(1), Broadcast)


# -- awareness -----------------------------------------------------------------------------------


def awareness(client_id: int, clock: int, state: object) -> AwarenessMessage:
    entry = AwarenessEntry(client_id, clock, json.dumps(state))
    return AwarenessMessage(encode_awareness([entry]))


def test_awareness_is_broadcast_and_its_owner_alone_may_change_it() -> None:
    h = Harness()
    alice, bob = h.peer("alice"), h.peer("bob")
    (sent,) = only(h.receive(alice, awareness(7, 1, {"user": "alice"})), Broadcast)
    assert sent.exclude is None
    assert h.room.awareness_owners[7] is alice
    assert h.receive(bob, awareness(7, 2, None)) == [], "bob cleared alice's presence"
    assert 7 in h.room.awareness.states


def test_query_awareness_is_answered_with_every_state() -> None:
    h = Harness()
    alice, bob = h.peer("alice"), h.peer("bob")
    h.receive(alice, awareness(7, 1, {"user": "alice"}))
    (reply,) = messages_to(h.receive(bob, QueryAwareness()), bob)
    assert isinstance(reply, AwarenessMessage)
    assert [e.client_id for e in decode_awareness(reply.payload)] == [7]


def test_a_peer_that_leaves_takes_its_presence_with_it() -> None:
    h = Harness()
    alice = h.peer("alice")
    h.peer("bob")
    h.receive(alice, awareness(7, 1, {"user": "alice"}))
    (removal,) = only(h.room.leave(alice), Broadcast)
    (message,) = decode_frame(removal.message)
    assert isinstance(message, AwarenessMessage)
    assert [e.removed for e in decode_awareness(message.payload)] == [True]
    assert 7 not in h.room.awareness_owners


def test_presence_not_renewed_times_out_on_a_tick() -> None:
    h = Harness()
    alice = h.peer("alice")
    h.receive(alice, awareness(7, 1, {"user": "alice"}))
    # pycrdt stamps presence with the real clock, so the ticks here use it too
    assert h.room.tick(time.time()) == []
    (removal,) = only(h.room.tick(time.time() + 31), Broadcast)
    assert 7 not in alice.awareness_ids and 7 not in h.room.awareness_owners
    assert decode_awareness(decode_frame(removal.message)[0].payload)[0].removed  # type: ignore[union-attr]


def test_awareness_over_its_rate_is_closed_as_rate() -> None:
    h = Harness(awareness_rate=1.0, awareness_burst=2.0)
    alice = h.peer("alice")
    results = [h.receive(alice, awareness(7, clock, {"n": clock})) for clock in range(1, 4)]
    (close,) = closes(results[-1])
    assert (close.code, close.kind) == (1008, CloseKind.RATE)
    # the rate refills with `now`, the only clock the core has
    h2 = Harness(awareness_rate=1.0, awareness_burst=2.0)
    bob = h2.peer("bob")
    for clock in range(1, 6):
        assert not closes(h2.receive(bob, awareness(8, clock, {"n": clock}), NOW + 2 * clock))


def test_awareness_too_large_or_for_too_many_ids_is_closed_as_limits() -> None:
    h = Harness(awareness_state_bytes=32)
    (close,) = closes(h.receive(h.peer(), awareness(7, 1, {"text": "w" * 100})))
    assert (close.code, close.kind) == (1009, CloseKind.LIMITS)
    h = Harness(awareness_clients=1)
    entries = [AwarenessEntry(cid, 1, "{}") for cid in (7, 8)]
    (close,) = closes(h.receive(h.peer(), AwarenessMessage(encode_awareness(entries))))
    assert (close.code, close.kind) == (1008, CloseKind.LIMITS)


def test_malformed_awareness_is_closed_as_malformed() -> None:
    h = Harness()
    (close,) = closes(h.receive(h.peer(), AwarenessMessage(b"\x01\x07")))
    assert (close.code, close.kind) == (1008, CloseKind.MALFORMED)
    assert close.reason.startswith("malformed awareness update")


# -- tokens: expiry, refresh, revocation -----------------------------------------------------------


def test_every_message_after_the_expiry_closes_the_peer_as_expired() -> None:
    h = Harness()
    peer = h.peer()
    assert h.room.expire(peer, EXP - 1) == []
    (close,) = closes(h.receive(peer, SyncStep1(Doc().get_state()), EXP))
    assert (close.code, close.reason, close.kind) == (
        TOKEN_EXPIRED_CODE,
        "token expired",
        CloseKind.EXPIRED,
    )
    assert h.room.expire(peer, EXP) == [], "closed once"


def test_the_expiry_input_closes_the_peer() -> None:
    h = Harness()
    peer = h.peer()
    (close,) = closes(h.room.expire(peer, EXP))
    assert close.kind is CloseKind.EXPIRED


def test_a_token_refresh_is_verified_by_the_shell_then_answered() -> None:
    h = Harness()
    peer = h.peer(want_refresh=True)
    (verify,) = h.receive(peer, encode_token_refresh("a.new.token"))
    assert verify == VerifyToken(peer, "a.new.token")
    newer = TokenClaims("alice", EXP + 600, ROOM, "writer")
    (answer,) = messages_to(h.room.refresh_verified(peer, newer, NOW), peer)
    assert isinstance(answer, Extension)
    assert RefreshAnswer.decode(answer.payload) == RefreshAnswer(True, exp=EXP + 600)
    assert peer.expires == EXP + 600
    assert h.room.expire(peer, EXP) == [], "the refresh moved the expiry"


def test_a_refresh_is_refused_for_another_subject_a_bad_token_or_another_room() -> None:
    h = Harness()
    peer = h.peer(want_refresh=True)
    refusals = [
        TokenClaims("mallory", EXP + 600, ROOM, "writer"),
        TokenError("expired"),
        TokenClaims("alice", EXP + 600, "another-room", "writer"),
    ]
    for verified in refusals:
        (answer,) = messages_to(h.room.refresh_verified(peer, verified, NOW), peer)
        decoded = RefreshAnswer.decode(answer.payload)  # type: ignore[union-attr]
        assert not decoded.accepted and decoded.reason
    assert peer.expires == EXP


def test_a_malformed_or_late_refresh_closes_the_peer() -> None:
    h = Harness()
    peer = h.peer(want_refresh=True)
    (close,) = closes(h.receive(peer, Extension(102, b"\xff")))
    assert (close.code, close.kind) == (1008, CloseKind.MALFORMED)
    late = h.peer("bob", want_refresh=True)
    (close,) = closes(h.receive(late, encode_token_refresh("t"), EXP))
    assert close.kind is CloseKind.EXPIRED
    assert h.room.refresh_verified(late, TokenClaims("bob", EXP + 60, ROOM, "writer"), EXP) == []


def test_a_refresh_without_the_extension_is_ignored() -> None:
    h = Harness()
    assert h.receive(h.peer(), encode_token_refresh("t")) == []


def test_a_membership_change_revokes_an_identity_connection_that_lost_access() -> None:
    h = Harness()
    seq, actions = h.room.local_write(claim_owner("owner@x"))
    assert only(actions, Append)[0].seq == seq
    h.room.stored(seq)
    owner = h.peer("owner@x", "writer", identity=True)
    stranger = h.peer("eve@x", "writer", identity=True)
    assert h.room.role_for("owner@x") is not None
    assert h.room.role_for("eve@x") is None

    def remove_owner(roots: dict) -> None:  # type: ignore[type-arg]
        del roots["access.members"]["owner@x"]

    assert "owner@x" in members(h.room.live.doc)
    _, actions = h.room.local_write(remove_owner)
    revoked = {c.peer: c for c in closes(actions)}
    assert set(revoked) == {owner, stranger}
    assert revoked[owner].code == ACCESS_REVOKED_CODE
    assert revoked[owner].kind is CloseKind.REVOKED
    assert owner.expires == 0.0
    # the relay's own write is broadcast to everyone once stored
    (broadcast,) = only(h.room.stored(seq + 1), Broadcast)
    assert broadcast.exclude is None


# -- the store ------------------------------------------------------------------------------------


def test_a_store_failure_closes_every_peer_and_accepts_nothing_more() -> None:
    h = Harness()
    writer, reader = h.peer(), h.peer("bob", "reader")
    h.receive(writer, Client().write())
    failed = h.room.store_failed("disk gone")
    assert {c.peer for c in closes(failed)} == {writer, reader}
    assert {(c.code, c.reason, c.kind) for c in closes(failed)} == {
        (1011, "relay storage failed", CloseKind.UNAVAILABLE)
    }
    assert h.room.stored(1) == [], "nothing of a failed room is broadcast"
    late = h.peer("carol")
    (close,) = closes(h.receive(late, Client("carol").write()))
    assert close.kind is CloseKind.UNAVAILABLE
    assert h.room.flush() == []


def test_the_log_is_compacted_after_compact_updates_writes() -> None:
    h = Harness(compact_updates=2)
    writer = h.peer()
    client = Client()
    assert not only(h.receive(writer, client.write("a")), Compact)
    (compact,) = only(h.receive(writer, client.write("b")), Compact)
    assert compact.upto_seq == 2
    copy = Doc()
    copy.apply_update(compact.snapshot)
    assert copy.get_state() == h.room.live.doc.get_state()
    assert h.room.flush() == [], "nothing logged since the compaction"


def test_a_loaded_room_with_a_long_log_is_compacted_at_once() -> None:
    h = Harness(compact_updates=5)
    doc = Doc()
    doc["x"] = Map()
    room = RoomProtocol(ROOM, h.config)
    (compact,) = only(room.load(doc.get_update(), 8, 7, 100), Compact)
    assert compact.upto_seq == 7
    assert room.durable_seq == 7


def test_every_close_kind_is_a_stable_string() -> None:
    assert {kind.value for kind in CloseKind} == {
        "malformed",
        "limits",
        "rate",
        "refusals",
        "quota",
        "expired",
        "revoked",
        "slow",
        "unavailable",
    }
    assert dataclasses.is_dataclass(Close)


@pytest.mark.parametrize("role", ["writer", "worker"])
def test_writers_and_workers_may_post_what_their_role_allows(role: str) -> None:
    h = Harness()
    peer = h.peer("w", role)
    conversation = Conversation(author="w", role=role)  # type: ignore[arg-type]
    before = conversation.doc.get_state()
    conversation.append("user" if role == "writer" else "assistant", "hi")
    actions = h.receive(peer, SyncUpdate(conversation.doc.get_update(before)))
    assert only(actions, Append), [messages_to(actions, peer)]


# -- a cluster node's inputs -----------------------------------------------------------------------


def test_an_update_stored_elsewhere_is_applied_and_broadcast_to_everyone_at_once() -> None:
    h = Harness()
    writer, reader = h.peer(), h.peer("bob", "reader")
    elsewhere = Client("carol").write("from another node", message_id="m-far").update
    actions = h.room.apply_stored(elsewhere)
    (broadcast,) = only(actions, Broadcast)
    assert broadcast.exclude is None and decode_frame(broadcast.message) == [SyncUpdate(elsewhere)]
    assert not only(actions, Append), "it is stored already"
    assert h.room.durable_seq == h.room.last_seq == 1
    assert {writer, reader} <= set(h.room.peers)
    assert h.room.apply_stored(elsewhere) == [], "applied twice, it changes nothing"
    # its message id is known to the next judgement here
    (denied,) = messages_to(h.receive(writer, Client().write("again", message_id="m-far")), writer)
    assert isinstance(denied, AuthDenied) and "m-far" in denied.reason


@pytest.mark.parametrize("backlog", ["indexed when needed", "index dropped and rebuilt"])
def test_updates_stored_elsewhere_are_indexed_before_this_node_judges_the_next_write(
    backlog: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node indexes another node's writes only when it next judges one of its own peers'
    (`LiveDoc.apply_stored`), or drops the index past a bound and builds it from the
    document. Either way the judgement sees them: a worker that streamed the start of a reply
    through another node continues it here, which only an index that knows where the
    earlier text lives can place."""
    if backlog == "index dropped and rebuilt":
        monkeypatch.setattr(livedoc_module, "MAX_UNINDEXED_BYTES", 1)
    h = Harness()
    worker = h.peer("w", "worker")
    far = Conversation(author="w", role="worker")
    before = far.doc.get_state()
    far.start_stream("t1", parent="m1")
    far.append_stream("t1", "The start of the reply, ")
    assert only(h.room.apply_stored(far.doc.get_update(before)), Broadcast)
    for words in ("streamed elsewhere, ", "and then more"):
        before = far.doc.get_state()
        far.append_stream("t1", words)
        assert only(h.room.apply_stored(far.doc.get_update(before)), Broadcast)
    before = far.doc.get_state()
    far.append_stream("t1", " continued here.")
    actions = h.receive(worker, SyncUpdate(far.doc.get_update(before)))
    assert only(actions, Append), [messages_to(actions, worker)]
    streamed = h.room.live.doc.get(schema.STREAMS, type=Map)["t1"]["text"]
    assert (
        str(streamed) == "The start of the reply, streamed elsewhere, and then more continued here."
    )


def test_an_update_stored_elsewhere_while_a_local_write_is_unstored_fails_the_room() -> None:
    h = Harness()
    writer = h.peer()
    h.receive(writer, Client().write("local"))
    (close,) = closes(h.room.apply_stored(Client("carol").write("far").update))
    assert close.kind is CloseKind.UNAVAILABLE and h.room.failed


def test_presence_from_another_node_is_broadcast_but_cannot_take_a_local_id() -> None:
    h = Harness()
    alice = h.peer("alice")
    h.receive(alice, awareness(7, 1, {"user": "alice"}))
    far = awareness(9, 1, {"user": "carol"})
    (broadcast,) = only(h.room.remote_awareness(far.payload), Broadcast)
    assert broadcast.exclude is None
    assert 9 in h.room.awareness.states and 9 not in h.room.awareness_owners
    assert h.room.remote_awareness(awareness(7, 5, None).payload) == []
    assert 7 in h.room.awareness.states


def test_a_peers_queue_holds_its_results_until_stored_for_the_shells_back_pressure() -> None:
    h = Harness()
    writer = h.peer()
    client = Client()
    for text in ("a", "b", "c"):
        h.receive(writer, client.write(text))
    assert writer.queued == 3
    h.room.stored(2)
    assert writer.queued == 1
    h.room.stored(3)
    assert writer.queued == 0


def test_withdrawn_updates_are_judged_again_after_the_stored_ones_in_their_order() -> None:
    """A cluster node's publish met another node's write: the node withdraws what it judged,
    applies the stored write, and judges its own again; one that became invalid (its message
    id taken by the stored write) is refused as usual, and no acknowledgement goes out before
    the new writes are stored."""
    h = Harness()
    alice, bob, watcher = h.peer("alice"), h.peer("bob"), h.peer("carol", "reader")
    first = h.receive(alice, Client("alice").write("first", message_id="m-a"))
    taken = h.receive(bob, Client("bob").write("clash", message_id="m-shared"))
    second = h.receive(alice, Client("alice").write("second", message_id="m-b"))
    assert [a.seq for a in only(first + taken + second, Append)] == [1, 2, 3]
    assert h.room.withdraw() == []
    assert h.room.last_seq == h.room.durable_seq == 0
    assert "m-a" not in str(h.room.live.messages), "the document no longer holds them"
    far = Client("dave").write("from another node", message_id="m-shared").update
    assert only(h.room.apply_stored(far), Broadcast)
    actions = h.room.resubmit(NOW)
    appends = only(actions, Append)
    assert [a.seq for a in appends] == [2, 3], "alice's two writes, after the stored one"
    (denied,) = messages_to(actions, bob)
    assert isinstance(denied, AuthDenied) and "m-shared" in denied.reason
    assert Acknowledge(bob, 1) in actions, "bob's refusal is settled at once"
    assert not [a for a in only(actions, Acknowledge) if a.peer is alice]
    stored = h.room.stored(3)
    assert only(stored, Acknowledge) == [Acknowledge(alice, 2)]
    sent = [decode_frame(b.message)[0] for b in only(stored, Broadcast)]
    assert sent == [SyncUpdate(a.update) for a in appends]
    assert h.room.metrics.updates_withdrawn == 3
    assert watcher in h.room.peers and not closes(actions + stored)
    ids = [m["id"] for m in h.room.live.messages.to_py()]  # type: ignore[union-attr]
    assert sorted(ids) == ["m-a", "m-b", "m-shared"], "each message once"


def test_a_reply_held_behind_a_withdrawn_write_never_shows_it_once_it_is_refused() -> None:
    """A sync step 1 answered while a write was unstored: its reply waits for the write. The
    write is withdrawn and then refused (another node took its message id): the reply that
    goes out holds only what is stored."""
    h = Harness()
    alice, reader = h.peer("alice"), h.peer("bob", "reader")
    h.receive(alice, Client("alice").write("refused later", message_id="m-shared"))
    assert messages_to(h.receive(reader, SyncStep1(Doc().get_state())), reader) == []
    h.room.withdraw()
    far = Client("dave").write("from another node", message_id="m-shared").update
    sent = h.room.apply_stored(far)
    actions = h.room.resubmit(NOW)
    (denied,) = messages_to(actions, alice)
    assert isinstance(denied, AuthDenied) and "m-shared" in denied.reason
    sent += actions + h.room.stored(h.room.last_seq)
    (reply,) = [m for m in messages_to(sent, reader) if isinstance(m, SyncStep2)]
    broadcasts = [m for b in only(sent, Broadcast) for m in decode_frame(b.message)]
    copy = Conversation(author="bob")
    for message in [reply, *broadcasts]:
        if isinstance(message, SyncStep2 | SyncUpdate):
            copy.doc.apply_update(message.update)
    assert [m.content for m in copy.all_messages()] == ["from another node"]
    assert b"refused later" not in reply.update, "the refused write reached a peer"


def test_a_write_judged_again_after_a_conflict_is_charged_once() -> None:
    """Bytes and the room created are charged for what is stored (design §7.4): a withdrawn
    write gives back what it was charged, and judged again is charged again; the room it
    would have created was created by the other node's write."""
    h = Harness()
    alice = h.peer("alice")
    subject = alice.subject
    quotas = subject.quotas
    (first,) = only(h.receive(alice, Client("alice").write("mine")), Append)
    assert quotas.write_bytes - subject.write_bytes.tokens == len(first.update)
    assert subject.rooms.tokens == quotas.rooms - 1, "alice's write creates the room"
    h.room.withdraw()
    h.room.apply_stored(Client("dave").write("from another node").update)
    (again,) = only(h.room.resubmit(NOW), Append)
    assert quotas.write_bytes - subject.write_bytes.tokens == len(again.update), "charged once"
    assert subject.rooms.tokens == quotas.rooms, "the other node's write created the room"


def test_a_membership_change_stored_elsewhere_revokes_a_connection_here() -> None:
    """Another node's membership change reaches this one as a stored update: an identity
    connected here that lost access is closed, as for this relay's own change. (Other
    stored updates skip that look at every connection: only membership changes roles.)"""
    h = Harness()
    seq, _ = h.room.local_write(claim_owner("owner@x"))
    h.room.stored(seq)
    owner = h.peer("owner@x", "writer", identity=True)
    assert not closes(h.room.apply_stored(Client("dave").write("from another node").update))
    far = Doc()
    far.apply_update(h.room.live.doc.get_update())
    before = far.get_state()
    del far.get(MEMBERS, type=Map)["owner@x"]
    (revoked,) = closes(h.room.apply_stored(far.get_update(before)))
    assert revoked.peer is owner and revoked.kind is CloseKind.REVOKED
    assert h.room.role_for("owner@x") is None


def test_a_withdrawn_membership_change_of_the_relay_is_decided_again() -> None:
    """The relay's own change (an owner's HTTP call) withdrawn after a conflict is decided
    again against the document with the other node's write: made under a new number when it
    still may be, refused with the real reason when not."""
    h = Harness()
    seq, _ = h.room.local_write(claim_owner("owner@x"))
    h.room.stored(seq)

    def add(sub: str) -> Decide:
        return lambda doc: change_member(doc, "owner@x", MemberChange(sub=sub, role="writer"))

    kept, _ = h.room.local_change(add("bob@x"))
    assert kept.seq == 2
    h.room.withdraw()
    h.room.apply_stored(Client("dave").write("from another node").update)  # stored as 2
    appends = only(h.room.resubmit(NOW), Append)
    assert [a.seq for a in appends] == [kept.seq] == [3] and kept.refused is None
    h.room.stored(3)
    assert h.room.role_for("bob@x") == "writer"

    refused, _ = h.room.local_change(add("carol@x"))
    h.room.withdraw()
    far = Doc()
    far.apply_update(h.room.live.doc.get_update())
    before = far.get_state()
    del far.get(MEMBERS, type=Map)["owner@x"]  # another node's owner left the room meanwhile
    h.room.apply_stored(far.get_update(before))
    assert only(h.room.resubmit(NOW), Append) == []
    assert isinstance(refused.refused, AccessError) and refused.refused.status == 403
    assert h.room.role_for("carol@x") is None


def test_a_reconnected_peer_is_closed_not_acknowledged_when_its_withdrawn_write_is_lost() -> None:
    """A peer's write waits for the store; its connection drops and comes back, and the new
    connection's update adds nothing (the document holds it). The write is withdrawn after a
    conflict and dropped (its sender is gone): acknowledging the new connection's no-op would
    promise a write nobody stores, so that connection is closed and syncs again (found by
    tests/testing/test_cluster_machine.py)."""
    h = Harness()
    client = Client("alice")
    first = h.peer("alice")
    write = client.write("kept?", message_id="m-1")
    assert only(h.receive(first, write), Append), "accepted; it waits for the store"
    h.room.leave(first)
    again = h.peer("alice")
    assert not only(h.receive(again, write), Append), "nothing new: it waits for the store"
    h.room.withdraw()
    h.room.apply_stored(Client("carol").write("far", message_id="m-far").update)
    actions = h.room.resubmit(NOW)
    assert not only(actions, Append), "the withdrawn write's sender is gone"
    (close,) = closes(actions)
    assert close.peer is again and close.kind is CloseKind.UNAVAILABLE
    assert not [a for a in only(actions, Acknowledge) if a.peer is again]


def test_a_connection_that_got_a_lost_write_in_its_state_vector_is_closed_before_its_step_2() -> (
    None
):
    """The same, with the new connection's sync step 2 not yet arrived: it will leave the lost
    write out, and its acknowledgement would cover it. Connections of other subjects, and
    those that joined before the write, never had it in their state vector: they stay."""
    h = Harness()
    before = h.peer("alice")
    first = h.peer("alice")
    assert only(h.receive(first, Client("alice").write("kept?", message_id="m-1")), Append)
    h.room.leave(first)
    again, bob = h.peer("alice"), h.peer("bob")
    h.room.withdraw()
    h.room.apply_stored(Client("carol").write("far", message_id="m-far").update)
    (close,) = closes(h.room.resubmit(NOW))
    assert close.peer is again
    assert not (before.closing or bob.closing)


def test_a_withdrawn_update_of_a_peer_gone_meanwhile_is_dropped() -> None:
    h = Harness()
    alice, bob = h.peer("alice"), h.peer("bob")
    h.receive(alice, Client("alice").write("a"))
    h.receive(bob, Client("bob").write("b"))
    h.room.withdraw()
    h.room.leave(alice)
    actions = h.room.resubmit(NOW)
    (append,) = only(actions, Append)
    assert append.seq == 1
    assert only(h.room.stored(1), Acknowledge) == [Acknowledge(bob, 1)]
