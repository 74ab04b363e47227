"""The SSE decoder: spec cases, and any chunking of a stream gives the same events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtchat.providers.sse import SSEDecoder, SSEEvent


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    out: list[SSEEvent] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.close())
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# ---------------------------------------------------------------- spec cases


def test_basic_event_with_type_and_id() -> None:
    events = decode_all([b'event: response.created\nid: 7\ndata: {"a":1}\n\n'])
    assert events == [SSEEvent(event="response.created", data='{"a":1}', id="7")]


def test_multi_line_data_joined_with_newline() -> None:
    assert decode_all([b"data: one\ndata:two\ndata:  three\n\n"]) == [
        SSEEvent(data="one\ntwo\n three")
    ]


def test_crlf_cr_and_lf_line_ends_mix() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"
    assert [e.data for e in decode_all([stream])] == ["a", "b", "c"]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # If the CR and LF were counted as two line ends, the blank line would dispatch "x" early
    # and "y" would be a separate event.
    events = decode_all([b"data: x\r", b"\ndata: y\r\n\r\n"])
    assert events == [SSEEvent(data="x\ny")]


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": keep-alive\nfoo: bar\ndata: hi\n:another\n\n"
    assert decode_all([stream]) == [SSEEvent(data="hi")]


def test_field_without_colon_has_empty_value() -> None:
    assert decode_all([b"data\ndata\n\n"]) == [SSEEvent(data="\n")]


def test_event_without_data_is_not_dispatched_and_type_resets() -> None:
    assert decode_all([b"event: ping\n\ndata: x\n\n"]) == [SSEEvent(data="x")]


def test_id_persists_and_nul_id_is_ignored() -> None:
    events = decode_all([b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x003\ndata: c\n\n"])
    assert [(e.data, e.id) for e in events] == [("a", "1"), ("b", "1"), ("c", "1")]


def test_retry_field_digits_only() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 1500\ndata: a\n\nretry: 12x\ndata: b\n\n")
    assert [(e.data, e.retry) for e in events] == [("a", 1500), ("b", None)]
    assert decoder.retry == 1500


def test_leading_bom_is_stripped_once() -> None:
    assert decode_all([b"\xef\xbb\xbfdata: a\n\n"]) == [SSEEvent(data="a")]


def test_unfinished_event_at_end_is_dropped_and_reported_pending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: cut") == [SSEEvent(data="a")]
    assert decoder.pending
    assert decoder.close() == []


def test_trailing_lone_cr_ends_a_line_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\r") == []  # the CR might still be half of a CRLF
    assert decoder.close() == [SSEEvent(data="a")]


def test_utf8_split_inside_a_character() -> None:
    text = "héllo 😀"
    raw = f"data: {text}\n\n".encode()
    cut = raw.index("😀".encode()) + 2
    assert decode_all([raw[:cut], raw[cut:]]) == [SSEEvent(data=text)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode_all([b"data: \xff\n\n"]) == [SSEEvent(data="\ufffd")]


def test_feed_after_close_is_an_error() -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(ValueError):
        decoder.feed(b"data: x\n\n")


# ---------------------------------------------------------------- properties

field_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
    max_size=20,
)
events_strategy = st.lists(
    st.tuples(
        st.one_of(st.none(), field_text.filter(lambda s: s != "")),  # event type
        st.lists(field_text, min_size=1, max_size=4),  # data lines
        st.one_of(st.none(), field_text),  # id
        st.booleans(),  # a comment before it
    ),
    max_size=8,
)
line_end = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def encoded_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """An event stream built with random line ends, and the events it must decode to."""
    spec = draw(events_strategy)
    out = bytearray()
    expected: list[SSEEvent] = []
    last_id = ""

    def line(text: str) -> None:
        out.extend(text.encode())
        if not text and out.endswith(b"\r"):
            # A CR then a bare LF would read as one CRLF line end: the blank line would vanish.
            out.extend(draw(st.sampled_from([b"\r", b"\r\n"])))
        else:
            out.extend(draw(line_end))

    for event_type, data_lines, event_id, comment in spec:
        if comment:
            line(": comment")
        if event_type is not None:
            line(f"event: {event_type}")
        for d in data_lines:
            # "data:x" and "data: x" mean the same; a value starting with a space needs ": ".
            sep = ": " if d.startswith(" ") or draw(st.booleans()) else ":"
            line(f"data{sep}{d}")
        if event_id is not None:
            line(f"id: {event_id}")
            last_id = event_id
        line("")
        expected.append(
            SSEEvent(event=event_type or "message", data="\n".join(data_lines), id=last_id)
        )
    return bytes(out), expected


@settings(max_examples=300, deadline=None)
@given(encoded_streams(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_chunking_of_an_encoded_stream_decodes_to_its_events(
    stream: tuple[bytes, list[SSEEvent]], cuts: list[int]
) -> None:
    raw, expected = stream
    assert decode_all(split(raw, cuts)) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_arbitrary_bytes_never_crash_and_chunking_is_irrelevant(
    raw: bytes, cuts: list[int]
) -> None:
    assert decode_all(split(raw, cuts)) == decode_all([raw])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_byte_at_a_time_equals_whole(raw: bytes) -> None:
    assert decode_all([raw[i : i + 1] for i in range(len(raw))]) == decode_all([raw])
