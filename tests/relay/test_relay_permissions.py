"""Role enforcement (design §4) on the relay's live document, one update at a time.

These run the relay's real LiveDoc (the same object a room uses) in process; the end-to-end
behaviour over sockets (AuthDenied, nobody else notices, nothing stored) is in
test_relay_roles.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pycrdt import Array, Doc, Map, Text, merge_updates

from crdtchat import schema
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused, UndecodableUpdate
from crdtchat.updates import decode_update
from crdtchat.wire import decode_state_vector

Change = Callable[[dict[str, Array | Map]], None]


def roots_of(doc: Doc) -> dict[str, Array | Map]:
    return {
        name: doc.get(name, type=Array if name == schema.MESSAGES else Map)
        for name in schema.ALL_ROOTS
    }


def message(msg_id: str, role: str, author: str, text: str = "hi", **extra: object) -> Map:
    fields: dict[str, object] = {
        "id": msg_id,
        "role": role,
        "author": author,
        "parent": None,
        "created_at": 1.0,
        "content": Text(text),
    }
    fields.update(extra)
    return Map(fields)


def derived_entry(message_id: str = "m1") -> dict[str, object]:
    return {
        "kind": "usage",
        "message_id": message_id,
        "prefix_hash": "0" * 64,
        "provider": "local",
        "api": "local",
        "model": "m",
        "data": {},
        "created_at": 1.0,
        "expires_at": None,
        "producer": "w1",
    }


def state_of(live: LiveDoc) -> dict[str, object]:
    return {name: root.to_py() for name, root in live._roots.items()}


class Room:
    """A LiveDoc plus helpers to make a change the way a peer would and submit it."""

    def __init__(self) -> None:
        self.live = LiveDoc()

    def update_for(self, change: Change) -> bytes:
        doc: Doc = Doc()
        roots = roots_of(doc)
        doc.apply_update(self.live.doc.get_update())
        before = doc.get_state()
        with doc.transaction():
            change(roots)
        return doc.get_update(before)

    def submit(self, role: str, sub: str, change: Change) -> Accepted | Refused:
        return self.live.apply(self.update_for(change), role, sub)

    def must_accept(self, role: str, sub: str, change: Change) -> bytes:
        outcome = self.submit(role, sub, change)
        assert isinstance(outcome, Accepted), outcome
        self.check_structure()
        return outcome.delta

    def check_structure(self) -> None:
        """The structure index covers exactly what the live document holds."""
        assert self.live.structure is not None
        assert self.live.structure.state_vector() == decode_state_vector(self.live.state_vector())

    def must_refuse(self, role: str, sub: str, change: Change, reason: str) -> None:
        before = state_of(self.live)
        state_vector = decode_state_vector(self.live.state_vector())
        outcome = self.submit(role, sub, change)
        assert isinstance(outcome, Refused), outcome
        assert reason in outcome.reason
        assert state_of(self.live) == before  # no trace in the live document
        assert decode_state_vector(self.live.state_vector()) == state_vector
        self.check_structure()  # nor in the structure index


@pytest.fixture
def room() -> Room:
    room = Room()
    room.must_accept(
        "writer", "alice", lambda r: r[schema.MESSAGES].append(message("m1", "user", "alice"))
    )
    room.must_accept(
        "writer", "bob", lambda r: r[schema.MESSAGES].append(message("m2", "user", "bob"))
    )
    room.must_accept(
        "worker",
        "w1",
        lambda r: r[schema.MESSAGES].append(
            message("m1~a1", "assistant", "w1", "answer", parent="m1")
        ),
    )
    return room


def messages_of(r: dict[str, Array | Map]) -> Array:
    return r[schema.MESSAGES]  # type: ignore[return-value]


def test_readers_cannot_write_anything(room: Room) -> None:
    room.must_refuse("reader", "r", lambda r: r[schema.READ].__setitem__("r", "m1"), "reader")
    room.must_refuse(
        "reader", "r", lambda r: messages_of(r).append(message("m9", "user", "r")), "reader"
    )
    # A reader's sync step 2 that brings nothing new is fine (y-websocket always sends one).
    assert room.live.apply(b"\x00\x00", "reader", "r") == Accepted(b"")
    assert room.live.apply(room.live.doc.get_update(), "reader", "r") == Accepted(b"")


def test_writers_append_their_own_user_tool_system_messages(room: Room) -> None:
    for role in ("user", "tool", "system"):
        extra = {"tool_call_id": "c1"} if role == "tool" else {}
        delta = room.must_accept(
            "writer",
            "alice",
            lambda r, role=role, extra=extra: messages_of(r).append(
                message(f"x-{role}", role, "alice", **extra)
            ),
        )
        assert delta
    room.must_refuse(
        "writer",
        "alice",
        lambda r: messages_of(r).append(message("x", "user", "bob")),
        "author must be the token subject 'alice'",
    )
    room.must_refuse(
        "writer",
        "alice",
        lambda r: messages_of(r).append(message("x", "assistant", "alice")),
        "writer may not write assistant messages",
    )


def test_workers_append_only_their_own_assistant_messages(room: Room) -> None:
    room.must_accept(
        "worker",
        "w1",
        lambda r: messages_of(r).append(message("m2~a1", "assistant", "w1", parent="m2")),
    )
    room.must_refuse(
        "worker",
        "w1",
        lambda r: messages_of(r).append(message("x", "user", "w1")),
        "worker may not write user messages",
    )
    room.must_refuse(
        "worker",
        "w1",
        lambda r: messages_of(r).append(message("x", "assistant", "w2")),
        "token subject 'w1'",
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (lambda: {"id": "x", "role": "user", "author": "alice"}, "must be a Map"),
        (
            lambda: Map({"id": "x", "role": "user", "author": "alice", "content": "plain"}),
            "content must be a Text",
        ),
        (lambda: Map({"role": "user", "author": "alice", "content": Text("")}), "invalid message"),
        (
            lambda: Map({"id": "x", "role": "boss", "author": "alice", "content": Text("")}),
            "invalid message: role",
        ),
        (lambda: Text("just text"), "must be a Map"),
    ],
)
def test_malformed_messages_are_refused(
    room: Room, value: Callable[[], object], reason: str
) -> None:
    room.must_refuse("writer", "alice", lambda r: messages_of(r).append(value()), reason)


def test_text_edits_only_of_ones_own_messages(room: Room) -> None:
    def edit(index: int, suffix: str) -> Change:
        def change(r: dict[str, Array | Map]) -> None:
            text = messages_of(r)[index]["content"]
            text += suffix

        return change

    room.must_accept("writer", "alice", edit(0, " there"))
    assert str(room.live.messages[0]["content"]) == "hi there"
    room.must_refuse("writer", "alice", edit(1, "!"), "only its author may change message 'm2'")
    room.must_refuse("writer", "alice", edit(2, "!"), "only its author")
    room.must_accept("worker", "w1", edit(2, " more"))


def test_message_keys(room: Room) -> None:
    def set_key(index: int, key: str, value: object) -> Change:
        return lambda r: messages_of(r)[index].__setitem__(key, value)

    room.must_refuse(
        "writer", "alice", set_key(0, "status", "error"), "writer may change only the text"
    )
    room.must_accept("writer", "alice", set_key(0, "content", Text("replaced")))
    room.must_accept("worker", "w1", set_key(2, "status", "cancelled"))
    room.must_refuse("worker", "w1", set_key(2, "role", "user"), "cannot change")
    room.must_refuse("worker", "w1", set_key(2, "status", "bogus"), "invalid message: status")
    room.must_refuse("worker", "w2", set_key(2, "status", "error"), "only its author")


def test_nobody_deletes_canonical_messages(room: Room) -> None:
    for role, sub, index in (("writer", "alice", 0), ("worker", "w1", 2)):
        room.must_refuse(
            role, sub, lambda r, i=index: messages_of(r).__delitem__(i), "cannot be deleted"
        )


@pytest.mark.parametrize("root", [schema.META, schema.SETTINGS, schema.TOOLS])
def test_canonical_maps_are_for_writers(room: Room, root: str) -> None:
    room.must_accept("writer", "alice", lambda r: r[root].__setitem__("k", {"v": 1}))
    room.must_accept("writer", "alice", lambda r: r[root].__delitem__("k"))
    room.must_refuse("worker", "w1", lambda r: r[root].__setitem__("k", 1), f"may not write {root}")


def test_derived_entries(room: Room) -> None:
    put: Change = lambda r: r[schema.DERIVED].__setitem__("e1", derived_entry())  # noqa: E731
    room.must_refuse("writer", "alice", put, "may only delete entries of derived.entries")
    room.must_accept("worker", "w1", put)
    room.must_accept("worker", "w1", lambda r: r[schema.DERIVED].__setitem__("e2", {"x": 1}))
    room.must_accept("writer", "alice", lambda r: r[schema.DERIVED].__delitem__("e1"))
    room.must_accept("worker", "w1", lambda r: r[schema.DERIVED].__delitem__("e2"))
    # A sequence insert into the Map root, or a keyed one into the messages Array, is a shape
    # Yjs never writes: a protocol violation, refused before it is applied.
    other: Doc = Doc()
    other.get(schema.DERIVED, type=Array).append(1)
    with pytest.raises(UndecodableUpdate, match="puts any content inside a Map"):
        room.live.apply(other.get_update(), "writer", "alice")
    other = Doc()
    other.get(schema.MESSAGES, type=Map)["k"] = 1
    with pytest.raises(UndecodableUpdate, match="keyed entry inside an Array"):
        room.live.apply(other.get_update(), "writer", "alice")


def test_leases_and_streams_are_for_workers(room: Room) -> None:
    def start_stream(r: dict[str, Array | Map]) -> None:
        r[schema.LEASES]["m2"] = {"holder": "w1", "turn_id": "m2~a1", "expires_at": 9.0}
        r[schema.STREAMS]["m2~a1"] = Map({"parent": "m2", "holder": "w1", "text": Text("")})

    room.must_refuse("writer", "alice", start_stream, "may not write transport.")

    room.must_accept("worker", "w1", start_stream)

    def stream(r: dict[str, Array | Map]) -> None:
        text = r[schema.STREAMS]["m2~a1"]["text"]
        text += "tok"

    room.must_accept("worker", "w1", stream)
    room.must_refuse("writer", "alice", stream, "may not write transport.streams")


@pytest.mark.parametrize("root", [schema.CANCEL, schema.REGENERATE])
def test_cancel_and_regenerate(room: Room, root: str) -> None:
    def request(by: object) -> dict[str, object]:
        if root == schema.REGENERATE:
            return {"n": 2, "by": by, "at": 1.0}
        return {"by": by, "at": 1}

    value = request("alice")
    room.must_refuse(
        "worker",
        "w1",
        lambda r: r[root].__setitem__("m2", value),
        f"may only delete entries of {root}",
    )
    # A request is made in its writer's own name (design §7.2), as a plain JSON object.
    for forged in (request("bob"), request(None), {"at": 1.0}, "alice", ["alice"]):
        room.must_refuse(
            "writer", "alice", lambda r, v=forged: r[root].__setitem__("m2", v), "by = its subject"
        )
    room.must_refuse(
        "writer", "alice", lambda r: r[root].__setitem__("m2", Map(value)), "by = its subject"
    )
    room.must_accept("writer", "alice", lambda r: r[root].__setitem__("m2", value))
    # Anyone's request may be replaced by one's own, or withdrawn.
    room.must_accept("writer", "bob", lambda r: r[root].__setitem__("m2", request("bob")))
    room.must_accept("writer", "alice", lambda r: r[root].__delitem__("m2"))
    room.must_accept("writer", "bob", lambda r: r[root].__setitem__("m1", request("bob")))
    room.must_accept("worker", "w1", lambda r: r[root].__delitem__("m1"))


def test_drafts_are_per_author(room: Room) -> None:
    room.must_accept("writer", "alice", lambda r: r[schema.DRAFTS].__setitem__("alice", Text("")))
    room.must_accept("writer", "bob", lambda r: r[schema.DRAFTS].__setitem__("bob", Text("")))

    def type_into(author: str) -> Change:
        def change(r: dict[str, Array | Map]) -> None:
            text = r[schema.DRAFTS][author]
            text += "typing"

        return change

    room.must_accept("writer", "alice", type_into("alice"))
    room.must_refuse("writer", "alice", type_into("bob"), "its own entry 'alice'")
    room.must_refuse(
        "writer", "alice", lambda r: r[schema.DRAFTS].__setitem__("carol", Text("")), "own entry"
    )
    room.must_refuse("worker", "w1", type_into("alice"), "may not write transport.drafts")


def test_read_marks(room: Room) -> None:
    """A read mark is keyed by its writer's subject (design §7.2)."""
    room.must_accept("writer", "alice", lambda r: r[schema.READ].__setitem__("alice", "m1"))
    room.must_accept("writer", "alice", lambda r: r[schema.READ].__setitem__("alice", "m2"))
    room.must_accept("writer", "bob", lambda r: r[schema.READ].__setitem__("bob", "m1"))
    for key in ("bob", "phone", "alice/phone", ""):
        room.must_refuse(
            "writer", "alice", lambda r, k=key: r[schema.READ].__setitem__(k, "m1"), "own entry"
        )
    room.must_refuse("writer", "alice", lambda r: r[schema.READ].__delitem__("bob"), "own entry")
    room.must_refuse("worker", "w1", lambda r: r[schema.READ].__setitem__("w1", "m1"), "may not")


def test_unknown_roots_and_subdocuments(room: Room) -> None:
    other: Doc = Doc()
    other.get("evil", type=Map)["x"] = 1
    before = state_of(room.live)
    outcome = room.live.apply(other.get_update(), "writer", "alice")
    assert isinstance(outcome, Refused) and "not part of the schema" in outcome.reason
    assert state_of(room.live) == before
    assert "evil" not in set(room.live.doc.keys())
    room.must_refuse(
        "writer",
        "alice",
        lambda r: messages_of(r).append(Doc()),
        "subdocuments are not allowed",
    )
    # Under a root the role owns outright, what the value is is the role's business.
    room.must_accept("writer", "alice", lambda r: r[schema.META].__setitem__("sub", Doc()))


def test_a_refusal_is_whole(room: Room) -> None:
    def mixed(r: dict[str, Array | Map]) -> None:
        r[schema.META]["title"] = "fine"
        r[schema.DERIVED]["e9"] = derived_entry()  # not for writers

    room.must_refuse("writer", "alice", mixed, "derived.entries")
    assert "title" not in room.live.doc[schema.META].to_py()
    room.must_accept("writer", "alice", lambda r: r[schema.META].__setitem__("title", "fine"))


def test_updates_with_missing_dependencies_are_refused_until_synced(room: Room) -> None:
    doc: Doc = Doc()
    roots = roots_of(doc)
    doc.apply_update(room.live.doc.get_update())
    state0 = doc.get_state()
    messages_of(roots).append(message("m3", "user", "alice", "first"))
    first = doc.get_update(state0)
    state1 = doc.get_state()
    text = messages_of(roots)[3]["content"]
    text += " second"
    second = doc.get_update(state1)
    before = state_of(room.live)

    outcome = room.live.apply(second, "writer", "alice")
    assert isinstance(outcome, Refused) and "does not have" in outcome.reason
    assert state_of(room.live) == before
    # Nothing was left pending either: the next update must not drag `second` in with it.
    assert isinstance(room.live.apply(first, "writer", "alice"), Accepted)
    assert str(room.live.messages[3]["content"]) == "first"
    assert isinstance(room.live.apply(second, "writer", "alice"), Accepted)
    assert str(room.live.messages[3]["content"]) == "first second"

    state2 = doc.get_state()
    del text[0:6]
    only_delete = doc.get_update(state2)
    fresh = LiveDoc()
    outcome = fresh.apply(only_delete, "writer", "alice")
    assert (
        isinstance(outcome, Refused) and "deletes changes the relay does not have" in outcome.reason
    )


def test_undecodable_updates_raise_and_leave_the_document_intact(room: Room) -> None:
    before = state_of(room.live)
    for garbage in (b"\xff\xff\xff", b"\x01", b"\x05\x01\x02"):
        with pytest.raises(UndecodableUpdate):
            room.live.apply(garbage, "writer", "alice")
    assert state_of(room.live) == before


def test_rebuild_keeps_every_accepted_update(room: Room) -> None:
    room.must_accept("writer", "alice", lambda r: r[schema.META].__setitem__("title", "t"))
    room.live.compact()
    room.must_accept("writer", "alice", lambda r: r[schema.SETTINGS].__setitem__("model", "m"))
    expected = state_of(room.live)
    room.live.rebuild()
    assert state_of(room.live) == expected


def _concurrent(room: Room, client: int, change: Change) -> bytes:
    doc: Doc = Doc(client_id=client)
    roots = roots_of(doc)
    doc.apply_update(room.live.doc.get_update())
    before = doc.get_state()
    change(roots)
    return doc.get_update(before)


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_a_concurrent_write_that_loses_its_key_is_accepted(
    room: Room, order: tuple[int, ...]
) -> None:
    """Two devices of alice write her draft, and two workers the status of one turn, at once:
    whichever update arrives second is integrated as a loser or a winner, never refused."""
    draft = {
        n: _concurrent(room, n, lambda r, n=n: r[schema.DRAFTS].__setitem__("alice", f"v{n}"))
        for n in (1, 2)
    }
    for n in order:
        assert isinstance(room.live.apply(draft[n], "writer", "alice"), Accepted)
    room.must_accept(
        "worker",
        "w1",
        lambda r: r[schema.MESSAGES].append(message("a1", "assistant", "w1", status="incomplete")),
    )

    def set_status(n: int) -> Change:  # n = 1, 2
        return lambda r: r[schema.MESSAGES][len(r[schema.MESSAGES]) - 1].__setitem__(
            "status", ("complete", "error")[n - 1]
        )

    status = {n: _concurrent(room, n + 10, set_status(n)) for n in (1, 2)}
    for n in order:
        assert isinstance(room.live.apply(status[n], "worker", "w1"), Accepted)
    # Where the role may only delete, even an invisible write is refused.
    derived = {
        n: _concurrent(room, n + 20, lambda r, n=n: r[schema.DERIVED].__setitem__("e", n))
        for n in (1, 2)
    }
    room.live.apply(derived[order[0]], "worker", "w1")
    refused = room.live.apply(derived[order[1]], "writer", "alice")
    assert isinstance(refused, Refused) and "may only delete" in refused.reason


def test_the_part_of_an_update_that_builds_on_missing_changes_is_cut_off(room: Room) -> None:
    """As a Yjs client's sync step 2 carrying its pending structs: without acks, the part the
    room can integrate is accepted alone; with acks (all or nothing) the update is refused."""
    alice: Doc = Doc(client_id=31)
    roots = roots_of(alice)
    alice.apply_update(room.live.doc.get_update())
    before = alice.get_state()
    roots[schema.READ]["alice"] = 1.0  # the room never gets this write
    middle = alice.get_state()
    roots[schema.READ]["alice"] = 2.0
    gap = alice.get_update(middle)  # builds on it
    bob: Doc = Doc(client_id=32)
    bob_roots = roots_of(bob)
    bob.apply_update(room.live.doc.get_update())
    before = bob.get_state()
    bob_roots[schema.READ]["bob"] = 3.0
    ready = bob.get_update(before)
    both = merge_updates(ready, gap)
    # bob's device relays alice's pending structs along with its own write
    refused = room.live.apply(both, "writer", "bob")
    assert isinstance(refused, Refused) and "sync first" in refused.reason
    accepted = room.live.apply(both, "writer", "bob", partial=True)
    assert isinstance(accepted, Accepted) and accepted.delta != both
    assert room.live.doc.get(schema.READ, type=Map).to_py() == {"bob": 3.0}
    room.check_structure()
    check: Doc = Doc()
    check.apply_update(accepted.delta)
    assert check.get(schema.READ, type=Map).to_py() == {"bob": 3.0}


def test_refusals_the_structure_index_can_judge_cost_no_rebuild(room: Room) -> None:
    """design §7.4: such refusals are made before applying, so the document is not rebuilt
    (a rebuild makes a new Doc); refusals that depend on content still rebuild."""
    cases: list[tuple[str, str, Change, str]] = [
        ("reader", "r", lambda r: messages_of(r).append(message("m9", "user", "r")), "reader"),
        ("reader", "r", lambda r: r[schema.READ].__setitem__("r", "m1"), "reader"),
        ("writer", "alice", lambda r: r[schema.LEASES].__setitem__("x", "y"), "may not write"),
        ("writer", "alice", lambda r: r[schema.DERIVED].__setitem__("e", 1), "only delete"),
        ("worker", "w1", lambda r: r[schema.META].__setitem__("title", "x"), "may not write"),
        ("worker", "w1", lambda r: r[schema.CANCEL].__setitem__("c", "x"), "only delete"),
        # Nested: a Text inside a stream entry, written by a writer.
        ("writer", "alice", lambda r: r[schema.STREAMS].__setitem__("t", Text("x")), "may not"),
    ]
    room.must_accept(
        "worker", "w1", lambda r: r[schema.STREAMS].__setitem__("s1", Map({"text": Text("")}))
    )
    cases.append(
        ("writer", "alice", lambda r: r[schema.STREAMS]["s1"]["text"].insert(0, "x"), "may not")
    )
    for role, sub, change, reason in cases:
        doc = room.live.doc
        room.must_refuse(role, sub, change, reason)
        assert room.live.doc is doc, f"{role} {reason}: rebuilt"
    doc = room.live.doc
    forged = message("m9", "assistant", "alice")
    room.must_refuse("writer", "alice", lambda r: messages_of(r).append(forged), "may not write")
    assert room.live.doc is not doc  # judged on content, after applying: rebuilt


def test_deletions_the_structure_index_can_judge_cost_no_rebuild(room: Room) -> None:
    """design §7.4: a deletion the role may not make, of an item not deleted yet, is refused
    before applying; re-stating a deletion the room holds (a sync step 2) changes nothing and
    is accepted; a deletion inside a message still depends on whose message it is."""
    room.must_accept("writer", "alice", lambda r: r[schema.SETTINGS].__setitem__("k", 1))
    room.must_accept("writer", "alice", lambda r: r[schema.SETTINGS].__setitem__("gone", 1))
    room.must_accept("writer", "alice", lambda r: r[schema.SETTINGS].__delitem__("gone"))
    cases: list[tuple[str, str, Change, str]] = [
        ("reader", "r", lambda r: messages_of(r).__delitem__(0), "reader"),
        ("reader", "r", lambda r: r[schema.SETTINGS].__delitem__("k"), "reader"),
        ("reader", "r", lambda r: messages_of(r)[0]["content"].__delitem__(0), "reader"),
        ("writer", "alice", lambda r: messages_of(r).__delitem__(0), "cannot be deleted"),
        ("worker", "w1", lambda r: messages_of(r).__delitem__(2), "cannot be deleted"),
        ("worker", "w1", lambda r: r[schema.SETTINGS].__delitem__("k"), "may not write"),
    ]
    for role, sub, change, reason in cases:
        doc = room.live.doc
        room.must_refuse(role, sub, change, reason)
        assert room.live.doc is doc, f"{role} {reason}: rebuilt"
    # The whole document, deletions included, from a reader: nothing new, accepted.
    assert room.live.apply(room.live.doc.get_update(), "reader", "r") == Accepted(b"")
    # Deleting clocks the room does not have: refused before applying too.
    doc = room.live.doc
    outcome = room.live.apply(b"\x00\x01\x07\x01\x00\x05", "writer", "alice")
    assert isinstance(outcome, Refused) and "sync first" in outcome.reason
    assert room.live.doc is doc
    # Text inside someone else's message: judged after applying, on whose message it is.
    room.must_refuse(
        "writer", "bob", lambda r: messages_of(r)[0]["content"].__delitem__(0), "only its author"
    )
    assert room.live.doc is not doc


def test_a_deletion_the_room_made_itself_is_not_new(room: Room) -> None:
    """A concurrent map write that loses is deleted by the room on arrival, in no update's
    delete set; a reader's sync step 2 then restates that deletion, which must pass, even
    right after the room's delete set was read for an earlier refusal."""
    earlier = room.live.doc.get_update()
    room.must_accept("writer", "alice", lambda r: r[schema.SETTINGS].__setitem__("k", 1))
    room.must_refuse("reader", "r", lambda r: r[schema.SETTINGS].__delitem__("k"), "reader")
    concurrent: Doc = Doc()
    roots = roots_of(concurrent)
    concurrent.apply_update(earlier)
    before = concurrent.get_state()
    roots[schema.SETTINGS]["k"] = 2
    outcome = room.live.apply(concurrent.get_update(before), "writer", "bob")
    assert isinstance(outcome, Accepted) and outcome.delta
    everything = room.live.doc.get_update()
    assert decode_update(everything).deletes  # the loser's deletion
    assert room.live.apply(everything, "reader", "r") == Accepted(b"")
