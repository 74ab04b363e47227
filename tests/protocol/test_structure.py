"""crdtchat.structure: every update Yjs types write is accepted; every item that its parent
type cannot hold is refused, however its parent is reached (written in the item, inherited
from either origin, behind known clocks)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text

from crdtchat.document import Conversation
from crdtchat.relay.livedoc import ROOT_TYPES
from crdtchat.structure import MissingDependency, StructureError, StructureIndex
from crdtchat.testing.machine import CreateConversation
from crdtchat.testing.strategies import operations
from crdtchat.updates import ARRAY, MAP, UpdateFormatError, decode_update
from crdtchat.wire import decode_state_vector
from crdtchat.wire import write_var_string as string
from crdtchat.wire import write_var_uint as uint
from tests.support.updates import edited_docs

ROOTS = {"m": MAP, "a": ARRAY}
C = 9  # the client of every crafted item


# -- a tiny hand-written v1 encoder (lib0 from crdtchat.wire), independent of the decoder


def item(
    kind: int,
    content: bytes,
    *,
    origin: tuple[int, int] | None = None,
    right: tuple[int, int] | None = None,
    parent: str | tuple[int, int] | None = None,
    key: str | None = None,
) -> bytes:
    info = kind | (0x80 if origin else 0) | (0x40 if right else 0) | (0x20 if key else 0)
    out = bytes([info])
    if origin:
        out += uint(origin[0]) + uint(origin[1])
    if right:
        out += uint(right[0]) + uint(right[1])
    if not origin and not right:
        assert parent is not None
        if isinstance(parent, str):
            out += uint(1) + string(parent)
        else:
            out += uint(0) + uint(parent[0]) + uint(parent[1])
        if key:
            out += string(key)
    return out + content


def update(clock: int, *structs: bytes, client: int = C) -> bytes:
    return uint(1) + uint(len(structs)) + uint(client) + uint(clock) + b"".join(structs) + b"\x00"


def type_content(type_ref: int) -> bytes:
    return uint(type_ref)


def string_content(text: str) -> bytes:
    return string(text)


def any_content(*numbers: int) -> bytes:
    return uint(len(numbers)) + b"".join(b"\x7d" + uint(n) for n in numbers)  # varInt ≥ 0


TYPE, STRING, ANY, DELETED, JSON = 7, 4, 8, 1, 2
ARRAY_REF, TEXT_REF = 0, 2


def check(*updates: bytes) -> StructureIndex:
    """Feed `updates` in order; raise what the last one raises."""
    index = StructureIndex(ROOTS)
    for data in updates:
        index.add(decode_update(data))
    return index


def refuses(message: str, *updates: bytes) -> None:
    with pytest.raises(StructureError, match=message):
        check(*updates)


# -- everything Yjs types write is accepted ------------------------------------------------------


@settings(max_examples=100)
@given(edited_docs())
def test_updates_of_the_pycrdt_api_are_accepted(case: tuple[Doc, list[bytes]]) -> None:
    doc, updates = case
    incremental = StructureIndex({"m": MAP})
    for data in updates:
        incremental.add(decode_update(data))
    whole = StructureIndex({"m": MAP})
    whole.add(decode_update(doc.get_update()))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_conversation_operations_are_accepted(data: st.DataObject) -> None:
    """Every operation crdtchat.testing knows, foreign writes included, in one replica."""
    conversation = Conversation(Doc(client_id=3), author="alice", clock=lambda: 1.7e9)
    updates: list[bytes] = []
    conversation.on_update(updates.append)
    CreateConversation("t").apply(conversation)
    for _ in range(data.draw(st.integers(1, 25))):
        data.draw(operations(conversation)).apply(conversation)
    index = StructureIndex(ROOT_TYPES)
    for data_ in updates:
        index.add(decode_update(data_))
    whole = StructureIndex(ROOT_TYPES)
    whole.add(decode_update(conversation.encode_state()))
    state = decode_state_vector(conversation.state_vector())
    assert index.state_vector() == whole.state_vector() == state


def test_the_index_stays_small_for_streamed_text() -> None:
    doc = Doc(client_id=C)
    root = doc.get("m", type=Map)
    root["t"] = Text()
    text = root["t"]
    index = StructureIndex(ROOTS)
    index.add(decode_update(doc.get_update()))
    for n in range(500):
        before = doc.get_state()
        text += f"token{n} "
        index.add(decode_update(doc.get_update(before)))
    assert index.ranges == 2  # the Text under "t", and its 500 chunks as one range


# -- refused shapes ------------------------------------------------------------------------------

ARRAY_AT_C = item(TYPE, type_content(ARRAY_REF), parent="m", key="c")  # clock 0


def test_a_string_inside_an_array_named_as_parent() -> None:
    refuses(
        "9:1 puts string content inside an Array",
        update(0, ARRAY_AT_C, item(STRING, string_content("😀"), parent=(C, 0))),
    )
    # The same in a second update: the Array is known from the index.
    refuses(
        "string content inside an Array",
        update(0, ARRAY_AT_C),
        update(1, item(STRING, string_content("😀"), parent=(C, 0))),
    )


def test_a_string_inheriting_an_array_from_either_origin() -> None:
    array_with_one = update(0, ARRAY_AT_C, item(ANY, any_content(1), parent=(C, 0)))
    refuses(
        "inside an Array",
        array_with_one,
        update(2, item(STRING, string_content("😀"), origin=(C, 1))),
    )
    refuses(
        "inside an Array",
        array_with_one,
        update(2, item(STRING, string_content("😀"), right=(C, 1))),
    )


def test_an_origin_that_was_garbage_collected_does_not_hide_the_other_side() -> None:
    gc_then_array = update(0, ARRAY_AT_C, item(ANY, any_content(1), parent=(C, 0)))
    collected = uint(1) + uint(1) + uint(5) + uint(0) + b"\x00" + uint(2) + b"\x00"  # GC 5:0..2
    refuses(
        "inside an Array",
        gc_then_array,
        collected,
        update(2, item(STRING, string_content("x"), origin=(5, 1), right=(C, 1))),
    )


def test_content_that_does_not_fit_its_parent() -> None:
    text_at_c = item(TYPE, type_content(TEXT_REF), parent="m", key="c")
    refuses(
        "any content inside a Text", update(0, text_at_c, item(ANY, any_content(1), parent=(C, 0)))
    )
    refuses(
        "keyed entry inside an Array", update(0, item(ANY, any_content(1), parent="a", key="k"))
    )
    refuses("any content inside a Map", update(0, item(ANY, any_content(1), parent="m")))
    refuses(
        "string content under a key of a Map",
        update(0, item(STRING, string_content("s"), parent="m", key="k")),
    )
    refuses("json content", update(0, item(JSON, uint(1) + string("1"), parent="a")))
    refuses("creates a type Yjs does not have", update(0, item(TYPE, type_content(12), parent="a")))
    refuses(
        "not a shared type",
        update(0, item(ANY, any_content(1), parent="a"), item(ANY, any_content(2), parent=(C, 0))),
    )
    with pytest.raises(UpdateFormatError, match="weak link"):
        decode_update(update(0, item(TYPE, type_content(7) + b"\x00", parent="a")))


def test_known_clocks_cannot_move_to_another_parent() -> None:
    text_with_abc = update(
        0,
        item(TYPE, type_content(TEXT_REF), parent="m", key="t"),
        item(STRING, string_content("abc"), parent=(C, 0)),
    )
    # Client 9 re-sends clocks 1..6 claiming the Array root as parent: yrs would keep its known
    # part (1..4, in the Text) and splice the rest next to it.
    refuses(
        "another parent",
        text_with_abc,
        update(1, item(STRING, string_content("abcde"), parent="a")),
    )
    # Re-sending them unchanged, plus two more characters, is fine.
    check(text_with_abc, update(1, item(STRING, string_content("abcde"), parent=(C, 0))))


def test_cycles_and_missing_dependencies() -> None:
    with pytest.raises(StructureError, match="cycle"):
        check(
            update(
                0,
                item(STRING, string_content("a"), origin=(C, 1)),
                item(STRING, string_content("b"), origin=(C, 0)),
            )
        )
    with pytest.raises(MissingDependency, match="4:0"):
        check(update(0, item(STRING, string_content("a"), origin=(4, 0))))
    with pytest.raises(MissingDependency, match=r"skips clocks 0\.\.3"):
        check(update(3, item(ANY, any_content(1), parent="a")))
    with pytest.raises(MissingDependency):  # a Skip struct is a gap too
        check(update(0, b"\x0a" + uint(2), item(ANY, any_content(1), parent="a")))


def test_deleted_parents_drop_their_new_children() -> None:
    # A deleted type (ContentDeleted where the Text was) drops what is inserted into it: yrs
    # does the same, so there is nothing to refuse.
    index = check(update(0, item(DELETED, uint(1), parent="m", key="c")))
    index.add(decode_update(update(1, item(ANY, any_content(1), parent=(C, 0)))))


def test_pycrdt_still_loops_on_a_string_inside_an_array() -> None:
    """Why the check exists: reading the refused shape never returns (pycrdt 0.14.13).

    If this starts failing, pycrdt fixed it; the check is then still right (Yjs never writes
    the shape) but no longer load-bearing.
    """
    freezing = update(0, ARRAY_AT_C, item(STRING, string_content("😀"), parent=(C, 0)))
    program = (
        "from pycrdt import Doc, Map\n"
        f"doc = Doc(); doc.apply_update({freezing!r})\n"
        "print(str(doc.get('m', type=Map)))\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", program], timeout=5, capture_output=True)
