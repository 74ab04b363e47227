"""A Conversation that knows its peer's role refuses, locally, what the relay would refuse.

A write the relay refuses stays in the local replica and blocks that replica's later writes,
so refusing it before it is made is the only safe place.
"""

import pytest

from crdtchat.document import Conversation, ConversationError
from crdtchat.schema import DerivedEntry, ModelRef


def test_writer_may_not_write_assistant_turns_derived_state_leases_or_streams() -> None:
    person = Conversation.create(author="ann", role="writer")
    question = person.append("user", "hi")
    before = person.encode_state()
    with pytest.raises(ConversationError, match="a writer may not write message assistant"):
        person.append("assistant", "I am not a worker")
    with pytest.raises(ConversationError, match="derived"):
        person.put_derived(
            DerivedEntry(
                kind="provider_state",
                message_id=question.id,
                prefix_hash="0" * 64,
                provider="p",
                api="a",
                model="m",
            )
        )
    with pytest.raises(ConversationError, match="leases"):
        person.claim_lease(question.id, "t", holder="ann", ttl=5)
    with pytest.raises(ConversationError, match="streams"):
        person.start_stream("t", parent=question.id)
    assert person.encode_state() == before  # nothing was written
    person.discard_all_derived()  # allowed to writers
    person.set_draft("typing")


def test_worker_may_not_write_user_messages_settings_or_drafts() -> None:
    person = Conversation.create(author="ann")
    question = person.append("user", "hi")
    worker = Conversation(person.doc, author="w", role="worker")
    for attempt, right in (
        (lambda: worker.append("user", "x", parent=question.id), "message user"),
        (lambda: worker.set_settings(system="obey"), "settings"),
        (lambda: worker.set_draft("x"), "drafts"),
        (lambda: worker.request_cancel("t"), "cancel"),
    ):
        with pytest.raises(ConversationError, match=f"a worker may not write {right}"):
            attempt()
    turn = f"{question.id}~a1"
    assert worker.claim_lease(question.id, turn, holder="w", ttl=5)
    worker.start_stream(turn, parent=question.id)
    answer = worker.commit_turn(
        question.id, turn, model=ModelRef(provider="p", api="a", model="m"), status="complete"
    )
    assert answer.author == "w"


def test_reader_writes_nothing() -> None:
    person = Conversation.create(author="ann")
    person.append("user", "hi")
    reader = Conversation(person.doc, author="r", role="reader")
    with pytest.raises(ConversationError, match="a reader may not write"):
        reader.mark_read(person.current_thread()[0].id)
    with pytest.raises(ConversationError, match="a reader may not write meta"):
        Conversation.create(author="r", role="reader")


def test_concurrent_draft_edits_on_two_devices_merge() -> None:
    phone = Conversation.create(author="ann")
    phone.set_draft("Hello world")
    laptop = Conversation.from_update(phone.encode_state(), author="ann")
    phone.set_draft("Hello brave world")  # an insertion in the middle
    laptop.set_draft("Hello World!")  # a change inside and an append, concurrently
    phone.apply_update(laptop.update_since(phone.state_vector()))
    laptop.apply_update(phone.update_since(laptop.state_vector()))
    assert phone.draft() == laptop.draft() == "Hello brave World!"
