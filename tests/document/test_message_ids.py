"""Message ids that cannot shadow others, and requests and read marks in one's own name
(design §7.2): the rule, the relay's id index on its live document, and a `Conversation` that
refuses locally what the relay refuses while its legitimate writes all pass the relay.

End to end through a relay subprocess: test_relay_forgery.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation, ConversationError
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused
from crdtchat.schema import ModelRef, answered_id_of, assistant_turn_id, message_id_refusal

MODEL = ModelRef(provider="p", api="a", model="m")
Change = Callable[[dict[str, Array | Map]], None]


def roots_of(doc: Doc) -> dict[str, Array | Map]:
    return {
        name: doc.get(name, type=Array if name == schema.MESSAGES else Map)
        for name in schema.ALL_ROOTS
    }


def message(msg_id: str, role: str, author: str, parent: str | None = None, text: str = "") -> Map:
    fields = {"id": msg_id, "role": role, "author": author, "parent": parent, "created_at": 1.0}
    return Map({**fields, "content": Text(text or f"{author} wrote {msg_id}")})


def update_on(base: bytes, change: Change, client_id: int | None = None) -> bytes:
    """The update a peer holding `base` sends after making `change`."""
    doc: Doc = Doc() if client_id is None else Doc(client_id=client_id)
    roots = roots_of(doc)
    doc.apply_update(base)
    before = doc.get_state()
    with doc.transaction():
        change(roots)
    return doc.get_update(before)


def append(*messages: Map, at: int | None = None) -> Change:
    def change(roots: dict[str, Array | Map]) -> None:
        array = roots[schema.MESSAGES]
        assert isinstance(array, Array)
        if at is None:
            array.extend(list(messages))
        else:
            for offset, item in enumerate(messages):
                array.insert(at + offset, item)

    return change


def submit(live: LiveDoc, role: str, sub: str, change: Change) -> Accepted | Refused:
    return live.apply(update_on(live.doc.get_update(), change), role, sub)


def accept(live: LiveDoc, role: str, sub: str, change: Change) -> None:
    outcome = submit(live, role, sub, change)
    assert isinstance(outcome, Accepted), outcome


def refuse(live: LiveDoc, role: str, sub: str, change: Change, reason: str) -> None:
    before = live.doc.get_update()
    outcome = submit(live, role, sub, change)
    assert isinstance(outcome, Refused), outcome
    assert reason in outcome.reason, outcome.reason
    assert live.doc.get_update() == before


def ids_of(live: LiveDoc) -> list[str]:
    return [item["id"] for item in live.messages.to_py()]


@pytest.fixture
def live() -> LiveDoc:
    """alice asked q1, w1 answered it, bob asked q2."""
    live = LiveDoc()
    accept(live, "writer", "alice", append(message("q1", "user", "alice")))
    accept(live, "worker", "w1", append(message("q1~a1", "assistant", "w1", "q1")))
    accept(live, "writer", "bob", append(message("q2", "user", "bob", "q1~a1")))
    return live


# -- the rule --------------------------------------------------------------------------------


def test_the_assistant_turn_form() -> None:
    assert answered_id_of(assistant_turn_id("q", 1)) == "q"
    assert answered_id_of(assistant_turn_id("q~a1", 12)) == "q~a1"
    assert answered_id_of("line\n~a3") == "line\n"
    for plain in ("q", "q~a", "q~a0", "q~a01", "~a1", "q~a1 ", "q~a1\n", "q~b1"):
        assert answered_id_of(plain) is None, plain


@pytest.mark.parametrize(
    ("message_id", "role", "parent", "taken", "refused"),
    [
        ("new", "user", None, None, None),
        ("q", "user", None, ("user", None), "taken"),
        ("q", "assistant", None, ("user", None), "taken"),
        ("q~a1", "assistant", "q", None, None),
        ("q~a1", "assistant", "q", ("assistant", "q"), None),  # two workers, one turn
        ("q~a1", "assistant", "q", ("user", "q"), "taken"),
        ("q~a1", "assistant", "x", None, "form of an answer"),
        ("q~a1", "user", "q", None, "form of an answer"),
        ("q~a1", "tool", "q", None, "form of an answer"),
        ("a", "assistant", "q", ("assistant", "q"), None),
        ("a", "assistant", "q", ("assistant", "x"), "taken"),
    ],
)
def test_message_id_refusal(
    message_id: str,
    role: str,
    parent: str | None,
    taken: tuple[str, str | None] | None,
    refused: str | None,
) -> None:
    reason = message_id_refusal(message_id, role, parent, taken)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


# -- the relay's live document ---------------------------------------------------------------


def test_a_message_that_would_shadow_another_is_refused_at_any_position(live: LiveDoc) -> None:
    for position in (0, 1, 2, 3):
        refuse(
            live,
            "writer",
            "mallory",
            append(message("q1", "user", "mallory"), at=position),
            "taken",
        )
    refuse(live, "writer", "mallory", append(message("q2", "system", "mallory")), "taken")
    # Neither a worker with a person's message id, nor a worker's answer under another parent.
    refuse(live, "worker", "w2", append(message("q1", "assistant", "w2")), "taken")
    refuse(live, "worker", "w2", append(message("q1~a1", "assistant", "w2", "q2")), "form of")
    assert ids_of(live) == ["q1", "q1~a1", "q2"]


def test_answer_ids_cannot_be_taken_in_advance(live: LiveDoc) -> None:
    for role in ("user", "tool", "system"):
        refuse(
            live, "writer", "mallory", append(message("q2~a1", role, "mallory", "q2")), "form of"
        )
    refuse(live, "writer", "mallory", append(message("q9~a3", "user", "mallory")), "form of")
    accept(live, "worker", "w1", append(message("q2~a1", "assistant", "w1", "q2")))


def test_two_workers_committing_the_same_turn_are_both_accepted(live: LiveDoc) -> None:
    base = live.doc.get_update()
    first = update_on(base, append(message("q2~a1", "assistant", "w1", "q2", "one")), 101)
    second = update_on(base, append(message("q2~a1", "assistant", "w2", "q2", "two")), 102)
    assert isinstance(live.apply(first, "worker", "w1"), Accepted)
    assert isinstance(live.apply(second, "worker", "w2"), Accepted)
    reader = Conversation(live.doc, author="reader")
    assert len(reader.assistant_answers("q2")) == 1
    assert [p.reason for p in reader.problems()] == ["duplicate id 'q2~a1'"]


def test_ids_within_one_update(live: LiveDoc) -> None:
    twice = append(message("n1", "user", "alice"), message("n1", "user", "alice"))
    refuse(live, "writer", "alice", twice, "taken")
    accept(live, "writer", "alice", append(message("n1", "user", "alice")))  # not held back


def test_a_refused_update_claims_no_id(live: LiveDoc) -> None:
    forged = append(message("n2", "user", "alice"), message("n3", "user", "mallory"))
    refuse(live, "writer", "alice", forged, "author")
    accept(live, "writer", "alice", append(message("n2", "user", "alice")))
    refuse(live, "writer", "bob", append(message("n2", "user", "bob")), "taken")


def test_a_room_loaded_from_elsewhere_keeps_the_reading_rule() -> None:
    """A document written before the check (or through another relay) may hold duplicates and
    invalid messages: readers keep the first of an id, and every well-formed id stays taken."""
    doc: Doc = Doc()
    array = roots_of(doc)[schema.MESSAGES]
    assert isinstance(array, Array)
    array.append(message("q1", "user", "mallory", text="shadow"))
    array.append(message("q1", "user", "alice", text="original"))
    array.append(message("q1~a1", "user", "mallory", "nowhere"))  # dangling: not shown
    array.append(message("orphan", "user", "x", "nowhere"))
    array.append(Map({"id": "broken", "role": "nobody"}))  # not a message: id stays free
    live = LiveDoc(doc.get_update())
    assert Conversation(live.doc, author="r").message("q1").content == "shadow"
    refuse(live, "writer", "alice", append(message("orphan", "user", "alice")), "taken")
    refuse(live, "worker", "w1", append(message("q1~a1", "assistant", "w1", "q1")), "taken")
    accept(live, "writer", "alice", append(message("broken", "user", "alice")))
    # The worker answers q1 with the next free turn id, which the relay accepts.
    worker = Conversation(Doc(), author="w1", role="worker")
    worker.apply_update(live.doc.get_update())
    turns = {waiting.message.id: waiting.turn_id for waiting in worker.waiting_for_reply()}
    assert turns == {"q1": "q1~a2", "broken": "broken~a1"}
    before = worker.state_vector()
    worker.commit_turn("q1", turns["q1"], model=MODEL, status="complete", content="hi")
    assert isinstance(live.apply(worker.update_since(before), "worker", "w1"), Accepted)


def test_the_index_survives_rebuilds_and_compaction(live: LiveDoc) -> None:
    refuse(live, "writer", "alice", append(message("x", "user", "bob")), "author")  # rebuilds
    live.compact()
    refuse(live, "writer", "mallory", append(message("q1", "user", "mallory"), at=0), "taken")
    accept(live, "writer", "alice", append(message("x", "user", "alice")))


# -- transport: requests and read marks --------------------------------------------------------


def test_requests_and_read_marks_from_a_conversation_pass_the_relay(live: LiveDoc) -> None:
    """Whatever Conversation writes for a writer, the relay accepts: it writes in its own name."""
    alice = Conversation(Doc(), author="alice", role="writer")
    alice.apply_update(live.doc.get_update())
    for write in (
        lambda: alice.mark_read("q2"),
        lambda: alice.request_cancel("q2~a1"),
        lambda: alice.request_regeneration("q1"),
        lambda: alice.clear_regeneration("q1"),
        lambda: alice.append("user", "more", message_id="q3"),
    ):
        before = alice.state_vector()
        write()
        outcome = live.apply(alice.update_since(before), "writer", "alice")
        assert isinstance(outcome, Accepted), outcome
    assert live.doc.get(schema.READ, type=Map).to_py() == {"alice": "q2"}
    assert live.doc.get(schema.CANCEL, type=Map).to_py()["q2~a1"]["by"] == "alice"


# -- Conversation refuses locally what the relay would refuse ----------------------------------


def test_conversation_refuses_ids_the_relay_would_refuse() -> None:
    ann = Conversation.create(author="ann", role="writer")
    question = ann.append("user", "hi", message_id="q")
    before = ann.encode_state()
    with pytest.raises(ConversationError, match="exists already"):
        ann.append("user", "again", message_id="q", parent=None)
    with pytest.raises(ConversationError, match="form of an answer"):
        ann.append("user", "mine now", message_id=assistant_turn_id(question.id, 1))
    with pytest.raises(ConversationError, match="form of an answer"):
        ann.append_message(
            schema.Message(id="q~a1", role="user", author="ann", parent="q", content="import")
        )
    assert ann.encode_state() == before
    worker = Conversation(ann.doc, author="w", role="worker")
    with pytest.raises(ConversationError, match="form of an answer"):
        worker.commit_turn("q", "x~a1", model=MODEL, status="complete", content="")
    with pytest.raises(ConversationError, match="exists already"):
        worker.commit_turn("q", "q", model=MODEL, status="complete", content="")
    assert ann.encode_state() == before


def test_a_taken_id_that_readers_do_not_show_is_still_skipped() -> None:
    """An id held by a message readers skip (its parent is unknown) is taken all the same:
    the relay would refuse it, so answer numbers skip it and appends refuse it."""
    ann = Conversation.create(author="ann")
    ann.append("user", "hi", message_id="q")
    ann.messages.append(message("q~a1", "user", "mallory", "nowhere"))
    ann.messages.append(message("z", "user", "mallory", "nowhere"))
    assert [w.turn_id for w in ann.waiting_for_reply()] == ["q~a2"]
    with pytest.raises(ConversationError, match="exists already"):
        ann.append("user", "z", message_id="z")
