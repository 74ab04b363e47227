"""Concurrent use of one conversation on several replicas that exchange updates."""

from __future__ import annotations

from crdtchat.document import Conversation
from crdtchat.schema import assistant_turn_id
from tests.support.document import MODEL, Clock, fresh_copy, snapshot, sync


def _reads(conversation: Conversation) -> tuple:
    """Everything a reader derives from the canonical section, as plain data."""
    current = conversation.current_thread()
    return (
        snapshot(conversation),
        [m.id for m in current],
        [(w.message.id, w.answer_number) for w in conversation.waiting_for_reply()],
        conversation.prefix_hashes(current),
        [m.id for m in conversation.leaves()],
        conversation.problems(),
    )


def test_fresh_replicas_that_write_before_syncing_keep_both_sides() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", title="from ann", clock=clock)
    bob = Conversation.create(author="bob", title="from bob", clock=clock)
    ann.set_settings(system="shared system")
    ann.set_tool("search", "Search", {"type": "object"})
    a1 = ann.append("user", "ann's first 😀")
    a2 = ann.append("user", "ann's second")
    b1 = bob.append("user", "bob's first 𝄞")
    bob.set_settings(model="gpt-x")
    sync(ann, bob)

    assert {m.id for m in ann.all_messages()} == {a1.id, a2.id, b1.id}
    assert _reads(ann) == _reads(bob)
    assert ann.settings == bob.settings
    assert (ann.settings.system, ann.settings.model) == ("shared system", "gpt-x")
    assert ann.title == bob.title in {"from ann", "from bob"}
    # Both roots wait for a reply, in the same order on both replicas.
    assert {w.message.id for w in ann.waiting_for_reply()} == {a2.id, b1.id}
    # A third replica that only ever saw merged state agrees too.
    assert _reads(fresh_copy(ann)) == _reads(ann)


def test_concurrent_appends_to_one_thread_order_identically() -> None:
    ann = Conversation.create(author="ann")
    root = ann.append("user", "root")
    bob = Conversation.from_update(ann.encode_state(), author="bob")
    carol = Conversation.from_update(ann.encode_state(), author="carol")
    for turn in range(3):
        ann.append("user", f"ann {turn}", parent=root.id)
        bob.append("user", f"bob {turn}", parent=root.id)
        carol.append("user", f"carol {turn}")
        if turn == 1:
            sync(ann, bob)  # a partial exchange in the middle
    sync(ann, bob, carol)
    order = [m.id for m in ann.all_messages()]
    assert order == [m.id for m in bob.all_messages()] == [m.id for m in carol.all_messages()]
    assert len(order) == 10
    assert _reads(ann) == _reads(bob) == _reads(carol) == _reads(fresh_copy(carol))
    # Each writer's own messages keep their relative order.
    for name in ("ann", "bob", "carol"):
        mine = [m.content for m in ann.all_messages() if m.author == name and m.id != root.id]
        assert mine == [f"{name} {turn}" for turn in range(3)]


def test_concurrent_edits_of_one_message_merge() -> None:
    phone = Conversation.create(author="ann")
    message = phone.append("user", "The quick fox 😀 jumps over the dog.")
    laptop = Conversation.from_update(phone.encode_state(), author="ann")
    phone.edit_text(message.id, "The quick brown fox 😀 jumps over the dog.")
    laptop.edit_text(message.id, "The quick fox 😀 jumps over the lazy dog 𝄞.")
    sync(phone, laptop)
    merged = "The quick brown fox 😀 jumps over the lazy dog 𝄞."
    assert phone.message(message.id).content == laptop.message(message.id).content == merged
    # Positional edits on both sides of an astral character merge too.
    emoji = merged.index("😀")
    phone.insert_text(message.id, emoji, "<")
    laptop.insert_text(message.id, emoji + 1, ">")
    sync(phone, laptop)
    expected = merged[:emoji] + "<😀>" + merged[emoji + 1 :]
    assert phone.message(message.id).content == laptop.message(message.id).content == expected
    assert fresh_copy(laptop).message(message.id).content == expected


def test_concurrent_delete_and_insert_of_the_same_text() -> None:
    phone = Conversation.create(author="ann")
    message = phone.append("user", "abc😀def")
    laptop = Conversation.from_update(phone.encode_state(), author="ann")
    phone.delete_text(message.id, 2, 3)  # "c😀d"
    laptop.insert_text(message.id, 4, "X")  # after the emoji
    sync(phone, laptop)
    assert phone.message(message.id).content == laptop.message(message.id).content == "abXef"


def test_two_workers_answering_the_same_message_show_one_reply() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    question = ann.append("user", "q")
    w1 = Conversation.from_update(ann.encode_state(), author="w1", clock=clock)
    w2 = Conversation.from_update(ann.encode_state(), author="w2", clock=clock)
    turn = assistant_turn_id(question.id, 1)
    # Both claim before they sync: both succeed, and both commit the same turn id.
    assert w1.claim_lease(question.id, turn, holder="w1", ttl=30)
    assert w2.claim_lease(question.id, turn, holder="w2", ttl=30)
    w1.commit_turn(question.id, turn, model=MODEL, status="complete", content="from w1")
    w2.commit_turn(question.id, turn, model=MODEL, status="complete", content="from w2")
    sync(ann, w1, w2)
    assert _reads(ann) == _reads(w1) == _reads(w2)
    replies = ann.children(question.id)
    assert [m.id for m in replies] == [turn]
    assert ann.waiting_for_reply() == []
    (problem,) = ann.problems()
    assert "duplicate id" in problem.reason
    # Whichever came first in document order is the one everybody shows.
    assert ann.message(turn).content in {"from w1", "from w2"}
    assert ann.message(turn).content == w2.message(turn).content


def test_updates_delivered_out_of_order_converge() -> None:
    ann = Conversation.create(author="ann")
    bob = Conversation(author="bob")
    updates: list[bytes] = [ann.encode_state()]  # the creation: delivered last of all
    ann.on_update(updates.append)
    first = ann.append("user", "1")
    second = ann.append("user", "2", parent=first.id)
    ann.edit_text(first.id, "1 edited")
    for update in reversed(updates):
        bob.apply_update(update)
    assert [m.id for m in bob.current_thread()] == [first.id, second.id]
    assert bob.message(first.id).content == "1 edited"
    assert _reads(bob) == _reads(ann)
