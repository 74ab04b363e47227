"""crdtchat.updates: the v1 update decoder agrees with what pycrdt writes, and bad bytes get
one clear error."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, merge_updates

from crdtchat.updates import (
    ANY,
    ARRAY,
    DELETED,
    GC,
    MAX_ANY_DEPTH,
    STRING,
    TEXT,
    TYPE,
    UpdateFormatError,
    _plainly_safe,
    _walk,
    check_update,
    continuing_string,
    decode_update,
    encode_update,
)
from crdtchat.wire import decode_state_vector
from tests.support.updates import edited_docs


def _structs_without_spans(data: bytes) -> tuple[object, ...]:
    decoded = decode_update(data)
    return (
        {c: [s._replace(span=(0, 0)) for s in runs] for c, runs in decoded.structs.items()},
        decoded.deletes,
    )


@settings(max_examples=150)
@given(edited_docs())
def test_decoding_pycrdt_updates_and_writing_them_back(case: tuple[Doc, list[bytes]]) -> None:
    doc, updates = case
    for data in [*updates, doc.get_update()]:
        decoded = decode_update(data)
        again = encode_update(data, decoded.structs, decoded.deletes)
        assert _structs_without_spans(again) == _structs_without_spans(data)
        doc.apply_update(again)  # pycrdt accepts what we wrote back
    # A whole-document update covers exactly the clocks of the state vector.
    state = decode_update(doc.get_update())
    assert {c: end for c, (_, end) in state.ranges().items()} == {
        c: clock for c, clock in decode_state_vector(doc.get_state()).items() if clock
    }


def test_what_the_structs_of_a_small_document_say() -> None:
    doc = Doc(client_id=7)
    root = doc.get("m", type=Map)
    root["t"] = Text("😀x")
    root["n"] = 1
    root["l"] = Array([1, 2])
    del root["n"]
    structs = decode_update(doc.get_update()).structs[7]
    assert [(s.clock, s.length, s.kind) for s in structs] == [
        (0, 1, TYPE),
        (1, 3, STRING),  # UTF-16 code units: the emoji counts 2
        (4, 1, DELETED),
        (5, 1, TYPE),
        (6, 2, ANY),
    ]
    assert structs[0].parent == "m" and structs[0].parent_sub == "t"
    assert structs[0].type_ref == TEXT and structs[3].type_ref == ARRAY
    assert structs[1].parent == (7, 0) and structs[4].parent == (7, 5)
    assert decode_update(doc.get_update()).deletes == {7: [(4, 1)]}


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_one_error(data: bytes) -> None:
    try:
        decode_update(data)
    except UpdateFormatError as error:
        assert " at byte " in str(error)


@settings(max_examples=300)
@given(edited_docs(), st.data())
def test_damaged_updates_decode_or_raise_one_error(
    case: tuple[Doc, list[bytes]], data: st.DataObject
) -> None:
    update = bytearray(case[0].get_update())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(update) - 1))
        update[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(update)))
    with contextlib.suppress(UpdateFormatError):
        decode_update(bytes(update[:cut]))


def _continuing_as_decoded(data: bytes) -> tuple[int, int, int, int] | None:
    """What `continuing_string` must say of `data`, read from the full decoder."""
    try:
        decoded = decode_update(data)
    except UpdateFormatError:
        return None
    if decoded.deletes or len(decoded.structs) != 1:
        return None
    [(client, runs)] = decoded.structs.items()
    if len(runs) != 1:
        return None
    [struct] = runs
    if (
        struct.kind != STRING
        or struct.origin != (client, struct.clock - 1)
        or struct.right_origin is not None
        or struct.parent is not None
        or data[struct.span[0]] != 0x84  # no flag but the origin's
    ):
        return None
    return client, struct.clock, struct.length, struct.span[1] - struct.span[0]


def _text_flushes() -> list[bytes]:
    """A writer's own text created, then continued flush by flush (ASCII, two-byte and
    four-byte UTF-8, a long one)."""
    doc = Doc(client_id=5)
    text = doc.get("streams", type=Map)["t"] = Text("")
    flushes = [doc.get_update()]
    for part in ["first", " tokens", " é", " 😀 and", "x" * 300]:
        before = doc.get_state()
        text += part
        flushes.append(doc.get_update(before))
    return flushes


def test_a_continued_text_is_recognised_as_the_full_decoder_reads_it() -> None:
    flushes = _text_flushes()
    created, first, *continued = flushes
    assert continuing_string(created) is None
    assert continuing_string(first) is None  # the text's first item: no origin
    for flush in continued:
        found = continuing_string(flush)
        assert found is not None and found == _continuing_as_decoded(flush)
    assert [continuing_string(flush)[2] for flush in continued] == [7, 2, 7, 300]  # type: ignore[index]
    doc = Doc(client_id=5)
    for flush in flushes[:3]:
        doc.apply_update(flush)
    text = doc.get("streams", type=Map)["t"]
    before = doc.get_state()
    del text[0:2]  # deletions: not the shape
    assert continuing_string(doc.get_update(before)) is None
    before = doc.get_state()
    text.insert(0, "a")  # an insert at the start: a right origin, no origin
    assert continuing_string(doc.get_update(before)) is None
    joined = merge_updates(flushes[3], flushes[4])  # two flushes merged: the two agree
    assert continuing_string(joined) == _continuing_as_decoded(joined)
    for cut in range(len(flushes[2])):  # truncated: never recognised, never raises
        assert continuing_string(flushes[2][:cut]) is None
    assert continuing_string(flushes[2] + b"\x00") is None


@settings(max_examples=300)
@given(st.sampled_from(_text_flushes()[2:]), st.data())
def test_a_damaged_continued_text_is_recognised_only_if_it_decodes_the_same(
    flush: bytes, data: st.DataObject
) -> None:
    update = bytearray(flush)
    for _ in range(data.draw(st.integers(1, 2))):
        update[data.draw(st.integers(0, len(update) - 1))] = data.draw(st.integers(0, 255))
    damaged = bytes(update)
    assert continuing_string(damaged) == _continuing_as_decoded(damaged)


@settings(max_examples=150)
@given(edited_docs())
def test_continued_text_recognition_agrees_with_the_decoder(
    case: tuple[Doc, list[bytes]],
) -> None:
    doc, updates = case
    for data in [*updates, doc.get_update()]:
        assert continuing_string(data) == _continuing_as_decoded(data)


def _full_check_passes(data: bytes) -> bool:
    try:
        _walk(data, check_only=True)
    except UpdateFormatError:
        return False
    return True


@settings(max_examples=150)
@given(edited_docs())
def test_the_short_check_takes_what_pycrdt_writes(case: tuple[Doc, list[bytes]]) -> None:
    """Every update of these documents (strings, JSON values of every tag nested a few deep,
    binaries, Maps, Arrays, Texts, deletions) is found safe the short way, as in full."""
    doc, updates = case
    for data in [*updates, doc.get_update()]:
        assert _plainly_safe(data)
        assert _full_check_passes(data)


@settings(max_examples=300)
@given(edited_docs(), st.data())
def test_the_short_check_passes_nothing_the_full_walk_refuses(
    case: tuple[Doc, list[bytes]], data: st.DataObject
) -> None:
    update = bytearray(case[0].get_update())
    for _ in range(data.draw(st.integers(1, 3))):
        update[data.draw(st.integers(0, len(update) - 1))] = data.draw(st.integers(0, 255))
    damaged = bytes(update[: data.draw(st.integers(1, len(update)))])
    if _plainly_safe(damaged):
        assert _full_check_passes(damaged)
    try:
        check_update(damaged)
    except UpdateFormatError:
        assert not _full_check_passes(damaged)
    else:
        assert _full_check_passes(damaged)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_the_short_check_passes_no_bytes_the_full_walk_refuses(data: bytes) -> None:
    if _plainly_safe(data):
        assert _full_check_passes(data)


def _nested(depth: int) -> bytes:
    """A root Map entry holding a JSON list nested `depth` deep, as lib0 writes it."""
    value = b"\x7e"  # null
    for _ in range(depth):
        value = b"\x75\x01" + value  # a list of one
    entry = b"\x28\x01\x01m\x01k\x01" + value  # Any, keyed, parent root "m", key "k"
    return b"\x01\x01\x07\x00" + entry + b"\x00"


def test_the_short_check_leaves_what_it_does_not_read_to_the_full_walk() -> None:
    """Values nested past the limit, weak links, varUints written long or too large, and the
    rare kinds: the short way says no, and the full walk decides."""
    assert _plainly_safe(_nested(MAX_ANY_DEPTH)) and _full_check_passes(_nested(MAX_ANY_DEPTH))
    too_deep = _nested(MAX_ANY_DEPTH + 1)
    assert not _plainly_safe(too_deep) and not _full_check_passes(too_deep)
    weak = b"\x01\x01\x07\x00\x27\x01\x01m\x01k\x07\x00"  # a WeakLink type under "m"
    assert not _plainly_safe(weak) and not _full_check_passes(weak)
    long_one = b"\x01\x01\x07\x00\x28\x81\x00\x01m\x01k\x01\x7e\x00"  # "a root" as 2 bytes
    assert not _plainly_safe(long_one) and _full_check_passes(long_one)
    # The same "a root", two bytes long, read as an id instead would find a whole update:
    misread = b"\x01\x01\x07\x00\x08\x81\x00\x01\x01\x7e\x00"
    assert not _plainly_safe(misread) and not _full_check_passes(misread)
    unknown_tag = b"\x01\x01\x07\x00\x28\x01\x01m\x01k\x01\x80\x00"
    assert not _plainly_safe(unknown_tag) and not _full_check_passes(unknown_tag)
    too_large = b"\x01\x01" + b"\xff" * 7 + b"\x7f" + b"\x00\x28\x01\x01m\x01k\x01\x7e\x00"
    assert not _plainly_safe(too_large) and not _full_check_passes(too_large)
    embedded = b"\x01\x01\x07\x00\x25\x01\x01m\x01k\x02{}\x00"  # an embed (not Yjs's today)
    assert not _plainly_safe(embedded) and _full_check_passes(embedded)


def test_trailing_bytes_and_truncation_are_errors() -> None:
    doc = Doc()
    doc.get("m", type=Map)["k"] = "v"
    update = doc.get_update()
    for bad, why in [(update + b"\x00", "after the end"), (update[:-3], "")]:
        try:
            decode_update(bad)
        except UpdateFormatError as error:
            assert why in str(error)
        else:
            raise AssertionError(f"{bad!r} decoded")


def test_gc_and_items_with_flags() -> None:
    # A GC range of 3 clocks for client 9; then an "item" whose info byte is GC with a flag,
    # which yrs rejects: so do we.
    assert decode_update(b"\x01\x01\x09\x00\x00\x03\x00").structs[9][0].kind == GC
    try:
        decode_update(b"\x01\x01\x09\x00\x20\x01\x01m\x01k\x03\x00")
    except UpdateFormatError as error:
        assert "cannot hold gc content" in str(error)
    else:
        raise AssertionError("decoded")
