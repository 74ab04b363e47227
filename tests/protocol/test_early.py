"""crdtchat.early: updates delivered in any order, duplicated, end in the same document as
delivered in order, and nothing is ever integrated behind a gap (which pycrdt would do)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtchat.early import EarlyUpdates, split
from crdtchat.merge import merge
from crdtchat.testing.network import has_gap
from crdtchat.updates import decode_update
from crdtchat.wire import decode_state_vector
from tests.support.updates import edited_docs


def _json(doc: Doc) -> object:
    return doc.get("m", type=Map).to_py()


@settings(max_examples=200)
@given(edited_docs(), st.data())
def test_any_delivery_order_ends_in_the_same_document(
    case: tuple[Doc, list[bytes]], data: st.DataObject
) -> None:
    expected, updates = case
    deliveries = data.draw(st.permutations(updates), label="order")
    if updates:
        deliveries += data.draw(st.lists(st.sampled_from(updates), max_size=3), label="again")
    doc = Doc()
    early = EarlyUpdates()
    for update in deliveries:
        early.offer(update, doc.get_state, doc.apply_update)
        assert not has_gap(doc)
    assert len(early) == 0
    assert decode_state_vector(doc.get_state()) == decode_state_vector(expected.get_state())
    assert _json(doc) == _json(expected)


def test_the_ready_part_of_an_update_is_applied_and_the_rest_waits() -> None:
    writer = Doc(client_id=1)
    root = writer.get("m", type=Map)
    root["a"] = 1
    first = writer.get_update()
    other = Doc(client_id=2)
    other.apply_update(first)
    before_b = other.get_state()
    other.get("m", type=Map)["b"] = 2  # client 2, needs nothing
    b_update = other.get_update(before_b)
    before_c = writer.get_state()
    root["c"] = 3  # client 1, clock 1: needs clock 0 ("a")
    c_update = writer.get_update(before_c)
    # One update holding both: "b" can be integrated without "a", "c" cannot.
    both = merge(b_update, c_update)
    reader = Doc()
    ready, rest = split(decode_update(both), {})
    assert ready is not None and rest is not None
    early = EarlyUpdates()
    applied = early.offer(both, reader.get_state, reader.apply_update)
    assert len(applied) == 1 and reader.get("m", type=Map).to_py() == {"b": 2.0}
    assert len(early) == 1
    applied = early.offer(first, reader.get_state, reader.apply_update)
    assert reader.get("m", type=Map).to_py() == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert len(early) == 0 and len(applied) == 2


def test_a_deletion_of_unknown_clocks_waits_for_them() -> None:
    writer = Doc(client_id=1)
    root = writer.get("m", type=Map)
    root["a"] = 1
    created = writer.get_update()
    before = writer.get_state()
    del root["a"]
    deletion = writer.get_update(before)
    reader = Doc()
    early = EarlyUpdates()
    early.offer(deletion, reader.get_state, reader.apply_update)
    assert len(early) == 1
    early.offer(created, reader.get_state, reader.apply_update)
    assert reader.get("m", type=Map).to_py() == {} and len(early) == 0


def test_what_is_held_is_bounded() -> None:
    writer = Doc(client_id=1)
    root = writer.get("m", type=Map)
    root["a"] = "x" * 100
    held_back = []
    for n in range(5):
        before = writer.get_state()
        root[f"k{n}"] = "y" * 100
        held_back.append(writer.get_update(before))  # each needs "a", which never arrives
    reader = Doc()
    early = EarlyUpdates(max_bytes=300)
    for update in held_back:
        early.offer(update, reader.get_state, reader.apply_update)
    assert 0 < sum(map(len, early.held)) <= 300
    assert early.held == held_back[-len(early.held) :]  # the newest are kept
