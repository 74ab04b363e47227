"""Yjs v1 updates decoded into their structs, without a document: bytes in, structs out.

pycrdt can apply an update but not show what is inside one, and two things need to know before
applying: the relay, which must refuse updates whose shape makes pycrdt loop forever when the
result is read (`crdtchat.structure`), and every replica, which must keep an update back until
what it builds on has arrived, as Yjs does (`crdtchat.early`). Both read the same facts: for
each struct its id, length, origins, parent and content kind.

The format (Yjs `encoding.js`, yrs `update.rs`): varUint(number of clients), then per client
varUint(number of structs), varUint(client), varUint(first clock) and the structs back to back;
then the delete set. A struct starts with an info byte: the low five bits are the content kind
(0 GC and 10 Skip carry only a length), 0x80 = has origin, 0x40 = has right origin, 0x20 = has
a parent key. Parent information is written only when both origins are absent: varUint 1 and a
root name, or varUint 0 and the id of the item holding the parent type. Lengths are in Yjs
clock units (a string counts UTF-16 code units). Every struct also keeps the span of bytes it
was decoded from, so a subset of an update can be written back without re-encoding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from crdtchat.errors import CrdtchatError, RemoteProtocolError
from crdtchat.wire import write_var_uint

MAX_ANY_DEPTH = 64

# The update that holds nothing (no structs, empty delete set): what `get_update` returns to a
# peer that lacks nothing, and what a sync step 2 from a peer in step carries.
EMPTY_UPDATE = b"\x00\x00"

GC = 0
DELETED = 1
JSON = 2
BINARY = 3
STRING = 4
EMBED = 5
FORMAT = 6
TYPE = 7
ANY = 8
DOC = 9
SKIP = 10

CONTENT_NAMES = {
    GC: "gc",
    DELETED: "deleted",
    JSON: "json",
    BINARY: "binary",
    STRING: "string",
    EMBED: "embed",
    FORMAT: "format",
    TYPE: "type",
    ANY: "any",
    DOC: "subdocument",
    SKIP: "skip",
}

# Shared type references (the varUint after a TYPE content); XmlElement and XmlHook carry a name.
ARRAY = 0
MAP = 1
TEXT = 2
XML_ELEMENT = 3
XML_FRAGMENT = 4
XML_HOOK = 5
XML_TEXT = 6
WEAK_LINK = 7  # yrs only: Yjs cannot decode it
SUBDOC = 9
UNDEFINED = 15

TYPE_NAMES = {
    ARRAY: "Array",
    MAP: "Map",
    TEXT: "Text",
    XML_ELEMENT: "XmlElement",
    XML_FRAGMENT: "XmlFragment",
    XML_HOOK: "XmlHook",
    XML_TEXT: "XmlText",
    WEAK_LINK: "WeakLink",
    SUBDOC: "Doc",
    UNDEFINED: "undefined",
}

_HAS_ORIGIN = 0x80
_HAS_RIGHT_ORIGIN = 0x40
_HAS_PARENT_SUB = 0x20
_MAX_VAR_UINT = 2**53

Id = tuple[int, int]  # (client, clock)


class UpdateFormatError(RemoteProtocolError, ValueError):
    """Bytes that are not a well-formed Yjs v1 update; the text says where and why."""


class Struct(NamedTuple):
    """One struct of an update: an item, or a GC / Skip range (`kind` GC or SKIP).

    `parent` is a root name, the id of the item that holds the parent type, or None when the
    parent is inherited from the origins. `type_ref` is set for TYPE content only. A named
    tuple, not a dataclass: a whole document decodes into tens of thousands of these.
    """

    client: int
    clock: int
    length: int
    kind: int
    origin: Id | None = None
    right_origin: Id | None = None
    parent: str | Id | None = None
    parent_sub: str | None = None
    type_ref: int | None = None
    span: tuple[int, int] = (0, 0)  # where its bytes are in the update

    @property
    def end(self) -> int:
        return self.clock + self.length


@dataclass(slots=True)
class DecodedUpdate:
    data: bytes
    structs: dict[int, list[Struct]] = field(default_factory=dict)  # client -> in clock order
    deletes: dict[int, list[tuple[int, int]]] = field(
        default_factory=dict
    )  # client -> (clock, len)

    def ranges(self) -> dict[int, tuple[int, int]]:
        """Per client, the clocks [start, end) its structs cover."""
        return {c: (runs[0].clock, runs[-1].end) for c, runs in self.structs.items() if runs}


class _Reader:
    """A bounds-checked lib0 reader; kept here rather than shared with `crdtchat.wire` so the
    hot loop stays free of per-call message formatting."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, what: str) -> UpdateFormatError:
        return UpdateFormatError(f"{what} at byte {self.pos}")

    def uint(self) -> int:
        data = self.data
        pos = self.pos
        try:
            byte = data[pos]
            if byte < 0x80:
                self.pos = pos + 1
                return byte
            value = byte & 0x7F
            shift = 7
            while True:
                pos += 1
                byte = data[pos]
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise self.fail("varUint longer than 10 bytes")
        except IndexError:
            raise self.fail("truncated varUint") from None
        if value > _MAX_VAR_UINT:
            raise self.fail("varUint larger than 2**53")
        self.pos = pos + 1
        return value

    def int(self) -> int:
        """lib0 varInt: sign in bit 6 of the first byte."""
        data = self.data
        pos = self.pos
        try:
            byte = data[pos]
            negative = byte & 0x40
            value = byte & 0x3F
            shift = 6
            while byte & 0x80:
                pos += 1
                byte = data[pos]
                value |= (byte & 0x7F) << shift
                shift += 7
                if shift > 70:
                    raise self.fail("varInt longer than 10 bytes")
        except IndexError:
            raise self.fail("truncated varInt") from None
        self.pos = pos + 1
        return -value if negative else value

    def byte(self) -> int:
        pos = self.pos
        try:
            value = self.data[pos]
        except IndexError:
            raise self.fail("truncated update") from None
        self.pos = pos + 1
        return value

    def take(self, count: int) -> bytes:
        start = self.pos
        end = start + count
        if end > len(self.data):
            raise self.fail(f"{count} bytes claimed, {len(self.data) - start} remain")
        self.pos = end
        return self.data[start:end]

    def buf(self) -> bytes:
        return self.take(self.uint())

    def skip_buf(self) -> None:
        """Step over a length-prefixed buffer without copying it."""
        count = self.uint()
        end = self.pos + count
        if end > len(self.data):
            raise self.fail(f"{count} bytes claimed, {len(self.data) - self.pos} remain")
        self.pos = end

    def string(self) -> str:
        raw = self.buf()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"string is not UTF-8 ({error.reason})") from None

    def id(self) -> Id:
        return (self.uint(), self.uint())

    def skip_any(self, depth: int = 0) -> None:
        """Step over one lib0 `Any` value (its contents are not needed)."""
        if depth > MAX_ANY_DEPTH:
            raise self.fail(f"value nested deeper than {MAX_ANY_DEPTH}")
        data, pos = self.data, self.pos
        try:
            tag = data[pos]
        except IndexError:
            raise self.fail("truncated update") from None
        if tag == 119:  # a string, the common case: its length is one byte below 128
            size = data[pos + 1] if pos + 1 < len(data) else 128
            if size < 0x80 and pos + 2 + size <= len(data):
                self.pos = pos + 2 + size
                return
        self.pos = pos + 1
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            return
        if tag == 125:
            self.int()
        elif tag == 124:
            self.take(4)
        elif tag in (123, 122):
            self.take(8)
        elif tag == 119:
            self.skip_buf()  # a string; yrs checks its UTF-8 when the update is applied
        elif tag == 118:
            for _ in range(self.uint()):
                self.skip_buf()
                self.skip_any(depth + 1)
        elif tag == 117:
            for _ in range(self.uint()):
                self.skip_any(depth + 1)
        elif tag == 116:
            self.skip_buf()
        else:
            raise self.fail(f"unknown value tag {tag}")


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _content(reader: _Reader, kind: int, check_only: bool = False) -> tuple[int, int | None]:
    """Read a content of `kind`; returns (its length in clock units, type ref if TYPE).

    `check_only`: a string's bytes are stepped over, not decoded, and its length is given as 1
    (the caller keeps no clocks then)."""
    if kind in (GC, SKIP):
        raise reader.fail(f"an item cannot hold {CONTENT_NAMES[kind]} content")
    if kind == DELETED:
        return reader.uint(), None
    if kind == STRING:
        if check_only:
            reader.skip_buf()  # yrs checks its UTF-8 when the update is applied
            return 1, None
        return _utf16_length(reader.string()), None
    if kind == ANY:
        count = reader.uint()
        for _ in range(count):
            reader.skip_any()
        return count, None
    if kind == TYPE:
        type_ref = reader.uint()
        if type_ref in (XML_ELEMENT, XML_HOOK):
            reader.string()
        elif type_ref == WEAK_LINK:
            raise reader.fail("weak link types (yrs only) are not supported")
        return 1, type_ref
    if kind == BINARY:
        reader.buf()
        return 1, None
    if kind == EMBED:
        reader.string()
        return 1, None
    if kind == FORMAT:
        reader.string()
        reader.string()
        return 1, None
    if kind == JSON:
        count = reader.uint()
        for _ in range(count):
            reader.string()
        return count, None
    if kind == DOC:
        reader.string()
        reader.skip_any()
        return 1, None
    raise reader.fail(f"unknown content kind {kind}")


def decode_update(data: bytes) -> DecodedUpdate:
    """Decode a v1 update; UpdateFormatError if it is not one (trailing bytes included)."""
    update = _walk(data, check_only=False)
    assert update is not None
    return update


_CONTINUING_STRING = _HAS_ORIGIN | STRING  # the info byte of text typed at its own end


def continuing_string(data: bytes) -> tuple[int, int, int, int] | None:
    """(client, clock, length, size) when `data` is one string item that continues its
    client's own previous item and deletes nothing; None for anything else.

    That is how a stream flush and a keystroke at the end of a text look: one client, one
    struct with origin `client:clock - 1`, no right origin and no parent written. `length`
    is in clock units (UTF-16), `size` the struct's encoded bytes (what the value limit
    measures). Why: the relay judges one such update per flush of every streamed reply,
    and `decode_update` builds objects it does not need for this shape. Bytes that are not
    exactly this, malformed ones included, give None: the caller then decodes them in full,
    which refuses what is malformed.
    """
    if len(data) < 8 or data[0] != 1 or data[1] != 1 or data[-1] != 0:
        return None
    try:
        client, pos = _uint_at(data, 2)
        clock, pos = _uint_at(data, pos)
        start = pos
        if clock == 0 or data[pos] != _CONTINUING_STRING:
            return None
        origin_client, pos = _uint_at(data, pos + 1)
        origin_clock, pos = _uint_at(data, pos)
        if origin_client != client or origin_clock != clock - 1:
            return None
        size, pos = _uint_at(data, pos)
    except (IndexError, _Unusual):
        return None
    end = pos + size
    if end != len(data) - 1:  # then the empty delete set, and nothing after it
        return None
    raw = data[pos:end]
    if raw.isascii():
        length = size
    else:
        try:
            length = _utf16_length(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    if length == 0 or clock + length > _MAX_VAR_UINT:
        return None
    return client, clock, length, end - start


def check_update(data: bytes) -> None:
    """Raise UpdateFormatError unless `data` is an update that is safe to apply and read.

    For bytes applied whole without being decoded (a sync step 2, a saved document, a local
    store, a stored room): the same walk as `decode_update`, so the same refusals (a JSON
    value nested past MAX_ANY_DEPTH, weak links, malformed bytes), but it builds nothing and
    steps over strings. Why: yrs and pycrdt handle a JSON value by native recursion, so one
    nested ~20,000 deep kills a reader with SIGSEGV and ~100,000 kills `apply_update` itself
    (design §7.1); no exception handler catches that, so it must be refused before applying.
    """
    if not _plainly_safe(data):
        _walk(data, check_only=True)  # says what is wrong, or finds nothing after all


class _Unusual(CrdtchatError):
    """Something the short ways leave to the full walk (rare, or wrong); never escapes."""


def _uint_at(data: bytes, pos: int) -> tuple[int, int]:
    """A varUint at `pos` and the position after it; _Unusual where `_Reader.uint` raises."""
    value = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 63:
            raise _Unusual
    if value > _MAX_VAR_UINT:
        raise _Unusual
    return value, pos


# Two varUints (an id: client, clock), each at most 2**53 - 1 as written: seven bytes or
# fewer, or eight whose last holds no more than the top four bits. A match is a valid id as
# `_Reader.uint` reads it; no match (a longer or larger one, bytes running out) is left to
# `_uint_at`, which says whether it is valid.
_ID = re.compile(rb"(?:[\x80-\xff]{0,6}[\x00-\x7f]|[\x80-\xff]{7}[\x00-\x0f]){2}")


def _id_end(data: bytes, pos: int) -> int:
    """Where the id at `pos` ends: client ids are long varUints, read here in one match."""
    match = _ID.match(data, pos)
    if match is not None:
        return match.end()
    _, pos = _uint_at(data, pos)
    _, pos = _uint_at(data, pos)
    return pos


def _any_end(data: bytes, pos: int, depth: int) -> int:
    """Where the lib0 `Any` value at `pos` ends (what `_Reader.skip_any` steps over)."""
    if depth > MAX_ANY_DEPTH:
        raise _Unusual
    tag = data[pos]
    pos += 1
    if tag in (119, 116):  # a string (its UTF-8 is checked when applied), a buffer
        size = data[pos]
        if size < 0x80:
            return pos + 1 + size
        size, pos = _uint_at(data, pos)
        return pos + size
    if 120 <= tag <= 127:
        if tag == 125:  # a varInt: at most 10 bytes
            for _ in range(10):
                pos += 1
                if data[pos - 1] < 0x80:
                    return pos
            raise _Unusual
        if tag == 124:
            return pos + 4
        if tag in (123, 122):
            return pos + 8
        return pos  # 127, 126, 121, 120
    if tag == 118:
        count, pos = _uint_at(data, pos)
        for _ in range(count):
            size, pos = _uint_at(data, pos)
            pos = _any_end(data, pos + size, depth + 1)
        return pos
    if tag == 117:
        count, pos = _uint_at(data, pos)
        for _ in range(count):
            pos = _any_end(data, pos, depth + 1)
        return pos
    raise _Unusual


def _plainly_safe(data: bytes) -> bool:
    """Whether `data` is an update the full check-only walk accepts, found the short way:
    True only then; False when it is not, or holds anything this walk leaves to it.

    `check_update` runs on every update applied whole (a client's join, a stored room), so
    this is its hot loop: positions are local integers, one-byte varUints are read inline,
    ids and clocks are stepped over (a check keeps none), and only the kinds a conversation
    is made of are handled (strings, JSON values, types, deleted runs, GC); anything else
    (JSON strings, embeds, formats, subdocuments, XML names, weak links, a varUint written
    long, a value nested past MAX_ANY_DEPTH, bytes that run out) goes to the full walk,
    which then refuses it or finds it fine.
    """
    end = len(data)
    try:
        clients, pos = _uint_at(data, 0)
        seen: set[int] = set()
        for _ in range(clients):
            count, pos = _uint_at(data, pos)
            client, pos = _uint_at(data, pos)
            if client in seen:
                return False
            seen.add(client)
            _, pos = _uint_at(data, pos)  # the first clock
            for _ in range(count):
                info = data[pos]
                pos += 1
                if info in (GC, SKIP):
                    _, pos = _uint_at(data, pos)
                    continue
                if info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
                    if info & _HAS_ORIGIN:
                        pos = _id_end(data, pos)
                    if info & _HAS_RIGHT_ORIGIN:
                        pos = _id_end(data, pos)
                else:
                    named = data[pos]
                    if named >= 0x80:
                        return False  # a varUint written long
                    if named == 1:  # a root's name
                        size = data[pos + 1]
                        if size >= 0x80:
                            size, pos = _uint_at(data, pos + 1)
                            pos += size
                        else:
                            pos += 2 + size
                    else:  # the id of the item holding the parent type
                        pos = _id_end(data, pos + 1)
                    if info & _HAS_PARENT_SUB:
                        size = data[pos]
                        if size >= 0x80:
                            size, pos = _uint_at(data, pos)
                            pos += size
                        else:
                            pos += 1 + size
                kind = info & 0x1F
                if kind == ANY:
                    count_values = data[pos]
                    if count_values >= 0x80:
                        count_values, pos = _uint_at(data, pos)
                    else:
                        pos += 1
                    for _ in range(count_values):
                        tag = data[pos]  # the commonest values inline: a short string, a float
                        if tag == 119 and data[pos + 1] < 0x80:
                            pos += 2 + data[pos + 1]
                        elif tag == 123:
                            pos += 9
                        else:
                            pos = _any_end(data, pos, 0)
                elif kind == STRING:
                    size = data[pos]
                    if size >= 0x80:
                        size, pos = _uint_at(data, pos)
                        pos += size
                    else:
                        pos += 1 + size
                elif kind == TYPE:
                    type_ref, pos = _uint_at(data, pos)
                    if type_ref in (XML_ELEMENT, XML_HOOK, WEAK_LINK):
                        return False
                elif kind == DELETED:
                    _, pos = _uint_at(data, pos)
                else:
                    return False
        deletes, pos = _uint_at(data, pos)
        for _ in range(deletes):
            _, pos = _uint_at(data, pos)
            ranges, pos = _uint_at(data, pos)
            for _ in range(ranges):
                _, pos = _uint_at(data, pos)
                _, pos = _uint_at(data, pos)
    except (IndexError, _Unusual):
        return False
    return pos == end


def _walk(data: bytes, *, check_only: bool) -> DecodedUpdate | None:
    """The one decoder behind `decode_update` and `check_update`."""
    reader = _Reader(data)
    uint = reader.uint
    update = DecodedUpdate(data)
    for _ in range(reader.uint()):
        count = reader.uint()
        client = reader.uint()
        clock = reader.uint()
        if client in update.structs:
            raise reader.fail(f"client {client} listed twice")
        runs: list[Struct] = []
        for _ in range(count):
            start = reader.pos
            info = reader.byte()
            kind = info & 0x1F
            if info in (GC, SKIP):  # as in yrs: with any flag set it is an item of kind 0/10
                length = reader.uint()
                if check_only:
                    continue
                runs.append(Struct(client, clock, length, kind, span=(start, reader.pos)))
            else:
                parent: str | Id | None = None
                parent_sub = None
                if check_only:  # only the content matters: step over the rest
                    if info & _HAS_ORIGIN:
                        uint()
                        uint()
                    if info & _HAS_RIGHT_ORIGIN:
                        uint()
                        uint()
                    if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
                        if reader.uint() == 1:
                            reader.skip_buf()
                        else:
                            reader.uint()
                            reader.uint()
                        if info & _HAS_PARENT_SUB:
                            reader.skip_buf()
                    if kind == ANY:  # most items of a conversation: inlined for speed
                        for _ in range(uint()):
                            reader.skip_any()
                    else:
                        _content(reader, kind, check_only)
                    continue  # no clocks kept: they only place structs
                origin = reader.id() if info & _HAS_ORIGIN else None
                right = reader.id() if info & _HAS_RIGHT_ORIGIN else None
                if origin is None and right is None:
                    parent = reader.string() if reader.uint() == 1 else reader.id()
                    if info & _HAS_PARENT_SUB:
                        parent_sub = reader.string()
                length, type_ref = _content(reader, kind)
                if length == 0:
                    continue  # yrs drops empty items (an old bug wrote empty strings)
                runs.append(
                    Struct(
                        client,
                        clock,
                        length,
                        kind,
                        origin,
                        right,
                        parent,
                        parent_sub,
                        type_ref,
                        (start, reader.pos),
                    )
                )
            clock += length
            if clock > _MAX_VAR_UINT:
                raise reader.fail("clock beyond 2**53")
        update.structs[client] = runs
    for _ in range(reader.uint()):
        client = reader.uint()
        ranges = update.deletes.setdefault(client, [])
        for _ in range(reader.uint()):
            ranges.append((reader.uint(), reader.uint()))
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} bytes after the end of the update")
    return None if check_only else update


def encode_update(
    data: bytes,
    structs: dict[int, list[Struct]],
    deletes: dict[int, list[tuple[int, int]]],
) -> bytes:
    """Write an update holding `structs` (decoded from `data`, contiguous per client) and
    `deletes`: the struct bytes are copied from `data` as they were."""
    out = bytearray(write_var_uint(sum(1 for runs in structs.values() if runs)))
    for client, runs in structs.items():
        if not runs:
            continue
        out += write_var_uint(len(runs)) + write_var_uint(client) + write_var_uint(runs[0].clock)
        for run in runs:
            out += data[run.span[0] : run.span[1]]
    kept = {client: ranges for client, ranges in deletes.items() if ranges}
    out += write_var_uint(len(kept))
    for client, ranges in kept.items():
        out += write_var_uint(client) + write_var_uint(len(ranges))
        for clock, length in ranges:
            out += write_var_uint(clock) + write_var_uint(length)
    return bytes(out)
