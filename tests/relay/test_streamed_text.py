"""The relay's short way for text continued at its writer's own end (a stream's flushes).

`LiveDoc.apply` judges the commonest update, one flush of a streamed reply, without decoding
it into objects (`crdtchat.updates.continuing_string`, `StructureIndex.text_continued`). These
check that the short way accepts only what the full way accepts, refuses nothing it would
not, and keeps the structure index as the full way would, with the real LiveDoc in process
and updates written by real pycrdt replicas (one client each, as a device or worker is).
"""

from __future__ import annotations

import pytest
from pycrdt import Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.relay.livedoc import (
    Accepted,
    LiveDoc,
    OverLimits,
    Refused,
    UndecodableUpdate,
    build_structure,
)
from crdtchat.structure import ShapeLimits
from crdtchat.updates import continuing_string
from crdtchat.wire import decode_state_vector

TURN = "turn-1"


def streaming(live: LiveDoc) -> tuple[Conversation, str]:
    """A person's question accepted, then a worker replica (one client) that claimed it,
    started its stream and wrote its first word, accepted too. Returns the worker's
    conversation and the question."""
    person = Conversation(author="alice", role="writer")
    question = person.append("user", "a question").id
    assert isinstance(live.apply(person.doc.get_update(), "writer", "alice"), Accepted)
    worker = Conversation(Doc(), author="w1", role="worker")
    worker.doc.apply_update(live.doc.get_update())
    before = worker.doc.get_state()
    worker.claim_lease(question, TURN, holder="w1", ttl=30.0)
    worker.start_stream(TURN, parent=question)
    worker.append_stream(TURN, "Once")  # the text's first item: what follows continues it
    assert isinstance(live.apply(worker.doc.get_update(before), "worker", "w1"), Accepted)
    return worker, question


def flush(conversation: Conversation, text: str) -> bytes:
    before = conversation.doc.get_state()
    conversation.append_stream(TURN, text)
    return conversation.doc.get_update(before)


def index_as_built(live: LiveDoc) -> object:
    """The structure index's record, as the full way builds it from the whole document."""
    index = build_structure(live.doc.get_update(), live.limits)
    return index._starts, index._where, index._ends, index._types, index._shapes


def test_streamed_flushes_are_accepted_and_indexed_as_the_full_way_would() -> None:
    live = LiveDoc()
    worker, _ = streaming(live)
    parts = [" upon", " a time", " é", " 😀", " the end" * 40]
    for part in parts:
        update = flush(worker, part)
        assert continuing_string(update) is not None  # the short way's shape
        outcome = live.apply(update, "worker", "w1")
        assert isinstance(outcome, Accepted) and outcome.delta == update
    stream = live.doc.get(schema.STREAMS, type=Map)[TURN]
    assert str(stream["text"]) == "Once" + "".join(parts)
    structure = live.structure
    assert structure is not None
    # The index ends where the document does (UTF-16 lengths: the emoji counts two) ...
    assert structure.state_vector() == {
        client: clock for client, clock in decode_state_vector(live.state_vector()).items()
    }
    # ... and holds what the full way records for the same document.
    recorded = (
        structure._starts,
        structure._where,
        structure._ends,
        structure._types,
        structure._shapes,
    )
    assert recorded == index_as_built(live)
    # The next flush is placed by the index the short way kept.
    assert isinstance(live.apply(flush(worker, "!"), "worker", "w1"), Accepted)


@pytest.mark.parametrize(
    ("role", "sub", "reason"),
    [
        ("writer", "alice", "may not write transport.streams"),
        ("reader", "carol", "may not change the document"),
        ("nobody", "dave", "unknown role"),
    ],
)
def test_a_streamed_flush_from_a_role_that_may_not_write_streams_is_refused(
    role: str, sub: str, reason: str
) -> None:
    live = LiveDoc()
    worker, _ = streaming(live)
    update = flush(worker, " tokens")
    assert continuing_string(update) is not None
    before = live.doc.get_update()
    outcome = live.apply(update, role, sub)
    assert isinstance(outcome, Refused) and reason in outcome.reason
    assert live.doc.get_update() == before
    assert isinstance(live.apply(update, "worker", "w1"), Accepted)


def test_text_continued_where_the_right_depends_on_whose_it_is_is_judged_in_full() -> None:
    """A draft (its owner's key) and a message's text (its author's): typing at one's own
    end has the short way's shape, but only its owner may, so it goes the full way."""
    live = LiveDoc()
    alice = Conversation(author="alice", role="writer")
    alice.append("user", "hi")
    drafts = alice.doc.get(schema.DRAFTS, type=Map)
    drafts["alice"] = Text("dra")
    assert isinstance(live.apply(alice.doc.get_update(), "writer", "alice"), Accepted)
    before = alice.doc.get_state()
    draft = drafts["alice"]
    draft += "ft"
    typed = alice.doc.get_update(before)
    assert continuing_string(typed) is not None
    refused = live.apply(typed, "writer", "bob")
    assert isinstance(refused, Refused) and "draft" in refused.reason
    assert isinstance(live.apply(typed, "writer", "alice"), Accepted)
    content = alice.messages[0]["content"]
    content += " there"  # after the message's other fields: it starts a new item
    assert isinstance(live.apply(alice.doc.get_update(), "writer", "alice"), Accepted)
    before = alice.doc.get_state()
    content += " again"
    typed = alice.doc.get_update(before)
    assert continuing_string(typed) is not None
    assert isinstance(live.apply(typed, "writer", "bob"), Refused)
    assert isinstance(live.apply(typed, "writer", "alice"), Accepted)


def test_a_streamed_flush_over_the_value_limit_ends_the_connection() -> None:
    live = LiveDoc(limits=ShapeLimits(value_bytes=300))
    worker, _ = streaming(live)
    assert isinstance(live.apply(flush(worker, "x" * 250), "worker", "w1"), Accepted)
    too_big = flush(worker, "x" * 300)
    assert continuing_string(too_big) is not None
    with pytest.raises(OverLimits, match="limit 300"):
        live.apply(too_big, "worker", "w1")


def test_a_streamed_flush_that_is_not_utf8_is_malformed() -> None:
    live = LiveDoc()
    worker, _ = streaming(live)
    update = flush(worker, "abcd")
    broken = update.replace(b"abcd", b"ab\xff\xfe")
    assert continuing_string(broken) is None
    with pytest.raises(UndecodableUpdate, match="not UTF-8"):
        live.apply(broken, "worker", "w1")
    assert isinstance(live.apply(update, "worker", "w1"), Accepted)


def test_a_growth_gate_that_refuses_stops_a_streamed_flush_before_it_is_applied() -> None:
    live = LiveDoc()
    worker, _ = streaming(live)
    update = flush(worker, "tokens")
    assert continuing_string(update) is not None
    before = live.doc.get_update()
    sizes: list[int] = []

    class Full(Exception):
        pass

    def gate(size: int) -> None:
        sizes.append(size)
        raise Full

    with pytest.raises(Full):
        live.apply(update, "worker", "w1", gate=gate)
    assert sizes == [len(update)]
    assert live.doc.get_update() == before
    assert isinstance(live.apply(update, "worker", "w1"), Accepted)
