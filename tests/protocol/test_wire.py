"""crdtchat.wire: round trips, strictness on garbage, and byte equality with pycrdt's encoders."""

from __future__ import annotations

import contextlib
import json

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Awareness, Doc, Map, Text

from crdtchat.wire import (
    MAX_VAR_UINT,
    Ack,
    AuthDenied,
    AwarenessEntry,
    AwarenessMessage,
    Extension,
    QueryAwareness,
    Reader,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireError,
    decode_awareness,
    decode_frame,
    decode_state_vector,
    encode_awareness,
    encode_frame,
    encode_message,
    write_var_string,
    write_var_uint,
)

uints = st.integers(min_value=0, max_value=MAX_VAR_UINT)
blobs = st.binary(max_size=300)

messages = st.one_of(
    st.builds(SyncStep1, blobs),
    st.builds(SyncStep2, blobs),
    st.builds(SyncUpdate, blobs),
    st.builds(AwarenessMessage, blobs),
    st.builds(AuthDenied, st.text(max_size=60)),
    st.just(QueryAwareness()),
    st.builds(Ack, uints),
    st.builds(Extension, st.integers(min_value=101, max_value=MAX_VAR_UINT), blobs),
)


@given(st.lists(messages, max_size=8))
def test_frames_round_trip(batch: list) -> None:
    assert decode_frame(encode_frame(batch)) == batch


@given(messages)
def test_a_message_is_its_own_frame(message: object) -> None:
    assert decode_frame(encode_message(message)) == [message]  # type: ignore[arg-type]


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_garbage_raises_only_wire_error(frame: bytes) -> None:
    try:
        decoded = decode_frame(frame)
    except WireError:
        return
    # Whatever decodes must re-encode to exactly the input (no silent repairs), except that
    # lib0 allows non-minimal varUints, which encode shorter.
    assert len(encode_frame(decoded)) <= len(frame)


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_garbage_awareness_and_state_vectors_raise_only_wire_error(data: bytes) -> None:
    for parse in (decode_awareness, decode_state_vector):
        with contextlib.suppress(WireError):
            parse(data)


@given(st.lists(messages, max_size=4), messages, st.data())
def test_truncation_inside_the_last_message_is_detected(
    head: list, last: object, data: st.DataObject
) -> None:
    prefix = encode_frame(head)
    whole = prefix + encode_message(last)  # type: ignore[arg-type]
    if len(whole) - len(prefix) < 2:
        return  # the last message is one byte long (QueryAwareness): nothing to cut inside
    cut = data.draw(st.integers(min_value=len(prefix) + 1, max_value=len(whole) - 1))
    with pytest.raises(WireError):
        decode_frame(whole[:cut])


@given(uints)
def test_var_uint_matches_pycrdt(value: int) -> None:
    assert write_var_uint(value) == pycrdt.write_var_uint(value)
    assert Reader(write_var_uint(value)).var_uint() == value


def test_var_uint_limits() -> None:
    assert Reader(write_var_uint(MAX_VAR_UINT)).var_uint() == MAX_VAR_UINT
    with pytest.raises(WireError, match="larger than 2\\*\\*53"):
        Reader(pycrdt.write_var_uint(MAX_VAR_UINT + 1)).var_uint()
    with pytest.raises(WireError, match="longer than 10 bytes"):
        Reader(b"\x80" * 10 + b"\x00").var_uint()
    # Non-minimal but short encodings are what lib0 accepts too.
    assert Reader(b"\x80\x80\x00").var_uint() == 0
    with pytest.raises(WireError):
        write_var_uint(-1)
    with pytest.raises(WireError):
        write_var_uint(MAX_VAR_UINT + 1)


def test_length_prefix_beyond_the_frame() -> None:
    with pytest.raises(WireError, match="claims 100 bytes but only 3 remain"):
        decode_frame(b"\x00\x02\x64abc")


def test_unknown_types_are_refused_with_their_number() -> None:
    with pytest.raises(WireError, match="unknown message type 4"):
        decode_frame(b"\x04")
    with pytest.raises(WireError, match="unknown sync message type 3"):
        decode_frame(b"\x00\x03\x00")
    with pytest.raises(WireError, match="unknown auth message type 1"):
        decode_frame(b"\x02\x01\x00")
    with pytest.raises(WireError, match="trailing"):
        decode_frame(write_var_uint(100) + b"\x02\x05\x00")
    with pytest.raises(WireError):
        Extension(100, b"")
    with pytest.raises(WireError):
        decode_frame("text")  # type: ignore[arg-type]


def test_strings_are_utf8_byte_lengths() -> None:
    reason = "refusé 🎉"
    encoded = encode_message(AuthDenied(reason))
    assert encoded == b"\x02\x00" + bytes([len(reason.encode())]) + reason.encode()
    assert write_var_string(reason)[0] == len(reason.encode()) != len(reason)
    with pytest.raises(WireError, match="not valid UTF-8"):
        decode_frame(b"\x02\x00\x02\xc3\x28")


def test_several_messages_in_one_frame() -> None:
    frame = encode_frame([SyncStep1(b"\x00"), QueryAwareness(), SyncUpdate(b"\x00\x00"), Ack(7)])
    assert decode_frame(frame) == [
        SyncStep1(b"\x00"),
        QueryAwareness(),
        SyncUpdate(b"\x00\x00"),
        Ack(7),
    ]
    assert decode_frame(b"") == []


def test_byte_equality_with_pycrdt_encoders() -> None:
    doc: Doc = Doc()
    doc["messages"] = messages_root = Array()
    messages_root.append(Map({"id": "m1", "content": Text("héllo 🎉")}))
    assert pycrdt.create_sync_message(doc) == encode_message(SyncStep1(doc.get_state()))
    update = doc.get_update()
    assert pycrdt.create_update_message(update) == encode_message(SyncUpdate(update))
    assert pycrdt.create_awareness_message(b"\x01\x02") == encode_message(
        AwarenessMessage(b"\x01\x02")
    )
    # pycrdt answers a step 1 with exactly our step 2 encoding, and reads our messages back.
    other: Doc = Doc()
    step1 = encode_message(SyncStep1(other.get_state()))
    reply = pycrdt.handle_sync_message(step1[1:], doc)
    assert reply == encode_message(SyncStep2(doc.get_update(other.get_state())))
    assert pycrdt.handle_sync_message(encode_message(SyncUpdate(update))[1:], other) is None
    assert other.get_update() == doc.get_update()
    assert decode_frame(pycrdt.create_update_message(update)) == [SyncUpdate(update)]


def test_awareness_round_trip_and_interop_with_pycrdt() -> None:
    entries = [
        AwarenessEntry(1, 3, json.dumps({"user": {"name": "Zoë 🎉"}}, ensure_ascii=False)),
        AwarenessEntry(2**40, 0, "null"),
    ]
    payload = encode_awareness(entries)
    assert decode_awareness(payload) == entries
    awareness = Awareness(Doc())
    awareness.apply_awareness_update(payload, "test")
    assert awareness.states[1] == {"user": {"name": "Zoë 🎉"}}
    assert entries[1].removed and not entries[0].removed


def test_awareness_states_must_be_json() -> None:
    bad = encode_awareness([AwarenessEntry(1, 1, "{not json")])
    with pytest.raises(WireError, match="not JSON"):
        decode_awareness(bad)
    with pytest.raises(WireError, match="trailing"):
        decode_awareness(encode_awareness([]) + b"\x00")


def test_state_vector_decoding_matches_pycrdt() -> None:
    doc: Doc = Doc(client_id=12345)
    doc["t"] = text = Text()
    text += "abc"
    assert decode_state_vector(doc.get_state()) == {12345: 3}
