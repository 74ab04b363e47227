"""Whatever a foreign peer writes, readers report it, skip it and go on (design §2).

The bad values are written with raw pycrdt, as a buggy or hostile peer would, both into the
reader's own document and into a peer whose update the reader then applies.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.schema import assistant_turn_id
from tests.support.document import MODEL, Clock, fresh_copy, snapshot

GOOD = {"role": "user", "author": "eve", "parent": None, "created_at": 1.0}


def _msg(message_id: str, **overrides: object) -> Map:
    fields: dict = {"id": message_id, **GOOD, "content": Text(f"text of {message_id}")}
    fields.update(overrides)
    return Map(fields)


BAD_ITEMS: list[tuple[str, Callable[[], object], str]] = [
    ("a plain string", lambda: "just a string", "invalid"),
    ("a number", lambda: 42, "invalid"),
    ("a Text", lambda: Text("text item"), "invalid"),
    ("an Array", lambda: Array([1, 2]), "invalid"),
    ("a JSON object", lambda: {"id": "plain", **GOOD}, None),  # valid shape, plain JSON
    ("a number id", lambda: _msg("x", id=7), "invalid id"),
    ("no id", lambda: Map({**GOOD, "content": Text("x")}), "invalid id"),
    ("an empty id", lambda: _msg(""), "invalid id"),
    ("an unknown role", lambda: _msg("r", role="robot"), "invalid role"),
    ("a number content", lambda: _msg("c", content=5), "invalid content"),
    ("a Map content", lambda: _msg("cm", content=Map({"a": 1})), "invalid content"),
    ("a string created_at", lambda: _msg("t", created_at="yesterday"), "invalid created_at"),
    ("a number author", lambda: _msg("au", author=3), "invalid author"),
    ("a number parent", lambda: _msg("p", parent=3), "invalid parent"),
    ("tool_calls not a list", lambda: _msg("tc", role="assistant", tool_calls="x"), "tool_calls"),
    (
        "a tool call without name",
        lambda: _msg("tn", role="assistant", tool_calls=[{"id": "c", "arguments": "{}"}]),
        "tool_calls",
    ),
    ("a bad file ref", lambda: _msg("f", files=[{"sha256": "zz"}]), "files"),
    ("an unknown status", lambda: _msg("s", role="assistant", status="finished"), "status"),
    ("a dangling parent", lambda: _msg("d", parent="nowhere"), "dangling parent"),
]


@pytest.mark.parametrize(("label", "make", "reason"), BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_bad_message_items_are_reported_and_skipped(
    label: str, make: Callable[[], object], reason: str | None, remote: bool
) -> None:
    ann = Conversation.create(author="ann")
    first = ann.append("user", "before")
    target = Conversation.from_update(ann.encode_state(), author="mallory") if remote else ann
    target.messages.append(make())
    if remote:
        ann.apply_update(target.update_since(ann.state_vector()))
    later = ann.append("user", "after 😀")
    reply = ann.append("user", "and a reply", parent=later.id)

    ids = [m.id for m in ann.all_messages()]
    if reason is None:
        assert ann.problems() == []
        assert "plain" in ids
    else:
        (problem,) = ann.problems()
        assert problem.root == schema.MESSAGES
        assert problem.key == 1
        assert reason in problem.reason
        assert ids == [first.id, later.id, reply.id]
    assert [m.id for m in ann.current_thread()][-2:] == [later.id, reply.id]
    assert ann.waiting_for_reply()[-1].message.id == reply.id
    ann.edit_text(later.id, "after 😀, edited")
    assert ann.message(later.id).content == "after 😀, edited"
    # A full rebuild sees exactly what the live view sees.
    opened = fresh_copy(ann)
    assert snapshot(opened) == snapshot(ann)
    assert opened.problems() == ann.problems()


def test_duplicate_ids_first_in_document_order_wins() -> None:
    ann = Conversation.create(author="ann")
    first = ann.append("user", "original")
    ann.messages.append(_msg(first.id, content=Text("impostor")))
    assert ann.message(first.id).content == "original"
    (problem,) = ann.problems()
    assert problem.key == 1 and "duplicate id" in problem.reason
    # Deleting the original makes the second one count, on every reader.
    del ann.messages[0]
    assert ann.message(first.id).content == "impostor"
    assert ann.problems() == []
    assert snapshot(fresh_copy(ann)) == snapshot(ann)


def test_children_of_a_skipped_message_are_dangling() -> None:
    ann = Conversation.create(author="ann")
    ann.messages.append(_msg("bad", role="robot"))
    ann.messages.append(_msg("child", parent="bad"))
    ann.messages.append(_msg("ok"))
    reasons = [p.reason for p in ann.problems()]
    assert "invalid role" in reasons[0]
    assert "dangling parent 'bad'" in reasons[1]
    assert [m.id for m in ann.all_messages()] == ["ok"]
    # Fixing the bad message in place brings its child back.
    ann.messages[0]["role"] = "user"
    assert [m.id for m in ann.all_messages()] == ["bad", "child", "ok"]
    assert ann.problems() == []


def test_a_parent_later_in_document_order_is_refused() -> None:
    ann = Conversation.create(author="ann")
    ann.messages.append(_msg("child", parent="later"))
    ann.messages.append(_msg("later"))
    assert [m.id for m in ann.all_messages()] == ["later"]
    assert "dangling parent" in ann.problems()[0].reason
    # a message that names itself as parent
    ann.messages.append(_msg("self", parent="self"))
    assert "self" not in [m.id for m in ann.all_messages()]


def test_a_valid_message_broken_later_is_skipped_and_its_subtree_with_it() -> None:
    ann = Conversation.create(author="ann")
    a = ann.append("user", "a")
    b = ann.append("user", "b")
    ann.messages[0]["created_at"] = "not a time"
    assert ann.all_messages() == []
    assert [p.key for p in ann.problems()] == [0, 1]
    ann.messages[0]["created_at"] = 2.0
    assert [m.id for m in ann.all_messages()] == [a.id, b.id]
    ann.messages[0]["content"] = 17  # a plain number replaces the Text
    assert ann.all_messages() == []
    with pytest.raises(KeyError):
        ann.edit_text(a.id, "x")


def test_a_message_whose_content_is_not_text_cannot_be_edited() -> None:
    ann = Conversation.create(author="ann")
    ann.messages.append(Map({"id": "plain", **{**GOOD, "author": "ann"}, "content": "a str"}))
    assert ann.message("plain").content == "a str"
    from crdtchat.document import ConversationError

    with pytest.raises(ConversationError, match="no editable text"):
        ann.edit_text("plain", "x")


def test_garbage_in_the_other_roots_is_reported_and_skipped() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    question = ann.append("user", "q")
    turn = assistant_turn_id(question.id, 1)
    peer = Conversation.from_update(ann.encode_state(), author="mallory", clock=clock)
    with peer.doc.transaction():
        peer.derived["junk"] = "not an entry"
        peer.derived["half"] = {"kind": "provider_state", "message_id": question.id}
        peer.derived["wrongkind"] = {
            "kind": "secret",
            "message_id": question.id,
            "prefix_hash": "x",
            "provider": "p",
            "api": "a",
            "model": "m",
        }
        peer.derived["nested"] = Map({"kind": "usage"})
        peer.leases[question.id] = {"holder": "", "turn_id": turn, "expires_at": "soon"}
        peer.leases["other"] = 17
        peer.streams["s1"] = "not a map"
        peer.streams["s2"] = Map({"parent": question.id, "holder": "w"})  # no text
        peer.cancels[turn] = {"by": 1}
        peer.regenerations[question.id] = {"n": 0, "by": "x", "at": 1.0}
        peer.drafts["ann"] = 42
        peer.read_marks["phone"] = ["x"]
        peer.tools_map["broken"] = "not a spec"
        peer.settings_map["params"] = "not an object"
    ann.apply_update(peer.update_since(ann.state_vector()))

    problems = {(p.root, p.key) for p in ann.problems()}
    assert {
        (schema.DERIVED, "junk"),
        (schema.DERIVED, "half"),
        (schema.DERIVED, "wrongkind"),
        (schema.DERIVED, "nested"),
        (schema.LEASES, question.id),
        (schema.LEASES, "other"),
        (schema.STREAMS, "s1"),
        (schema.STREAMS, "s2"),
        (schema.CANCEL, turn),
        (schema.REGENERATE, question.id),
        (schema.DRAFTS, "ann"),
        (schema.READ, "phone"),
        (schema.TOOLS, "broken"),
        (schema.SETTINGS, "params"),
    } <= problems
    # Every reader skips them and goes on.
    assert ann.derived_entries() == {}
    assert ann.lease(question.id) is None
    assert ann.streams_in_flight() == {}
    assert not ann.cancel_requested(turn)
    assert ann.regenerate_requests() == {}
    assert ann.draft() == ""
    assert ann.read_mark("phone") is None
    assert ann.tools == {}
    assert ann.settings.params == {}
    assert [w.message.id for w in ann.waiting_for_reply()] == [question.id]
    usable, stale = ann.usable_derived(ann.current_thread(), **MODEL.model_dump())
    assert (usable, stale) == ({}, [])
    # ... and the valid operations overwrite the garbage.
    worker = Conversation.from_update(ann.encode_state(), author="w", clock=clock)
    assert worker.claim_lease(question.id, turn, holder="w", ttl=30)
    worker.start_stream(turn, parent=question.id)
    worker.append_stream(turn, "hi")
    worker.commit_turn(question.id, turn, model=MODEL, status="complete")
    ann.set_draft("new draft")
    ann.mark_read(turn)
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.message(turn).content == "hi"
    assert ann.draft() == "new draft"
    assert ann.read_mark() == turn
    ann.discard_all_derived()
    assert not any(p.root == schema.DERIVED for p in ann.problems())


def test_a_foreign_doc_with_only_some_roots_opens() -> None:
    doc = Doc()
    messages = doc.get(schema.MESSAGES, type=Array)
    messages.append(_msg("only"))
    opened = Conversation.from_update(doc.get_update(), author="ann")
    assert [m.id for m in opened.all_messages()] == ["only"]
    assert opened.settings.system == ""
    assert opened.title is None
    opened.append("user", "more")
    assert len(opened) == 2
