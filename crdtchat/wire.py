"""The y-websocket wire format (y-protocols), without I/O: bytes in, messages out.

Shared by the relay and the clients so that both sides parse frames the same way and every
malformed input ends as one `WireError` with a message that says what was wrong, never as an
IndexError deep inside a loop. lib0 encodings: varUint is unsigned LEB128 (at most 2**53, the
largest integer a JS peer can hold), varUint8Array is a varUint length then the bytes, varString
is a varUint *UTF-8 byte* length then the bytes.

Message types (design §3): 0 sync (0 step 1, 1 step 2, 2 update), 1 awareness, 2 auth
(0 = permission denied + reason), 3 query awareness, and extensions from 100 up. Every extension
is `varUint(type) varUint8Array(payload)` so a peer can skip the ones it does not know; type 100
is `Ack`, whose payload is `varUint(seq)`; 101 the room feed's notice; 102 the token refresh
(`encode_token_refresh` and `RefreshAnswer`), whose payload depends on its direction, so it
stays an opaque `Extension` in `decode_frame`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from crdtchat.errors import ProtocolError

MAX_VAR_UINT = 2**53
# Deepest JSON an awareness state may nest. Python's json parser recurses once per level and
# raises RecursionError near 1,000 (design §7.3), so the depth is measured before parsing.
MAX_AWARENESS_DEPTH = 64
_MAX_VAR_UINT_BYTES = 10

MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
MESSAGE_AUTH = 2
MESSAGE_QUERY_AWARENESS = 3
MESSAGE_ACK = 100
MESSAGE_ROOM_WAITING = 101
MESSAGE_TOKEN_REFRESH = 102
FIRST_EXTENSION = 100
REFRESH_ACCEPTED = 0
REFRESH_REFUSED = 1

SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2
AUTH_PERMISSION_DENIED = 0


class WireError(ProtocolError, ValueError):
    """Input that is not a well-formed y-websocket frame; the text says what is wrong."""


@dataclass(frozen=True)
class SyncStep1:
    state_vector: bytes


@dataclass(frozen=True)
class SyncStep2:
    update: bytes


@dataclass(frozen=True)
class SyncUpdate:
    update: bytes


@dataclass(frozen=True)
class AwarenessMessage:
    payload: bytes  # a y-protocols awareness update, see decode_awareness()


@dataclass(frozen=True)
class AuthDenied:
    reason: str


@dataclass(frozen=True)
class QueryAwareness:
    pass


@dataclass(frozen=True)
class Ack:
    """Extension 100: the first `seq` SyncStep2/SyncUpdate messages of this connection are settled.

    Settled means durably stored by the relay, or refused: a refused message is answered with
    `AuthDenied`, and the relay always sends `Ack(k - 1)` before the `AuthDenied` of message k,
    so the refused one is the first message that the last Ack did not cover.
    """

    seq: int

    def __post_init__(self) -> None:
        _check_uint(self.seq, "ack sequence number")


@dataclass(frozen=True)
class Extension:
    """Any extension message other than Ack (type 101 and up), kept opaque."""

    type: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_uint(self.type, "extension type")
        if self.type <= MESSAGE_ACK:
            raise WireError(f"extension types start at {MESSAGE_ACK + 1}, got {self.type}")


WireMessage = (
    SyncStep1
    | SyncStep2
    | SyncUpdate
    | AwarenessMessage
    | AuthDenied
    | QueryAwareness
    | Ack
    | Extension
)


@dataclass(frozen=True)
class AwarenessEntry:
    """One client's presence in an awareness update; `state` is JSON text, "null" when gone."""

    client_id: int
    clock: int
    state: str

    @property
    def removed(self) -> bool:
        return self.state == "null"


def _check_uint(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0 or value > MAX_VAR_UINT:
        raise WireError(f"{what} {value} is outside 0..2**53")


class Reader:
    """A bounds-checked lib0 decoder over one buffer."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def var_uint(self, what: str = "varUint") -> int:
        data = self.data
        pos = self.pos
        end = len(data)
        value = 0
        shift = 0
        for _ in range(_MAX_VAR_UINT_BYTES):
            if pos >= end:
                raise WireError(f"truncated {what} at byte {self.pos}")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value > MAX_VAR_UINT:
                    raise WireError(f"{what} at byte {self.pos} is larger than 2**53")
                self.pos = pos
                return value
            shift += 7
        raise WireError(f"{what} at byte {self.pos} is longer than {_MAX_VAR_UINT_BYTES} bytes")

    def var_bytes(self, what: str = "varUint8Array") -> bytes:
        start = self.pos
        length = self.var_uint(f"length of {what}")
        if length > len(self.data) - self.pos:
            raise WireError(
                f"{what} at byte {start} claims {length} bytes but only "
                f"{len(self.data) - self.pos} remain"
            )
        value = self.data[self.pos : self.pos + length]
        self.pos += length
        return bytes(value)

    def var_string(self, what: str = "varString") -> str:
        start = self.pos
        raw = self.var_bytes(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise WireError(f"{what} at byte {start} is not valid UTF-8: {error.reason}") from None


def write_var_uint(value: int) -> bytes:
    """lib0 varUint; byte-identical to pycrdt.write_var_uint for 0..2**53."""
    _check_uint(value, "varUint")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def write_var_bytes(value: bytes) -> bytes:
    return write_var_uint(len(value)) + value


def write_var_string(value: str) -> bytes:
    """lib0 varString: the length is in UTF-8 bytes (pycrdt's Encoder counts characters)."""
    return write_var_bytes(value.encode("utf-8"))


def _decode_one(reader: Reader) -> WireMessage:
    start = reader.pos
    kind = reader.var_uint("message type")
    if kind == MESSAGE_SYNC:
        step = reader.var_uint("sync message type")
        if step == SYNC_STEP1:
            return SyncStep1(reader.var_bytes("state vector"))
        if step == SYNC_STEP2:
            return SyncStep2(reader.var_bytes("sync step 2 update"))
        if step == SYNC_UPDATE:
            return SyncUpdate(reader.var_bytes("update"))
        raise WireError(f"unknown sync message type {step} at byte {start}")
    if kind == MESSAGE_AWARENESS:
        return AwarenessMessage(reader.var_bytes("awareness update"))
    if kind == MESSAGE_AUTH:
        auth = reader.var_uint("auth message type")
        if auth != AUTH_PERMISSION_DENIED:
            raise WireError(f"unknown auth message type {auth} at byte {start}")
        return AuthDenied(reader.var_string("permission denied reason"))
    if kind == MESSAGE_QUERY_AWARENESS:
        return QueryAwareness()
    if kind >= FIRST_EXTENSION:
        payload = reader.var_bytes(f"payload of extension {kind}")
        if kind != MESSAGE_ACK:
            return Extension(kind, payload)
        inner = Reader(payload)
        seq = inner.var_uint("ack sequence number")
        if inner.remaining:
            raise WireError(f"ack at byte {start} has {inner.remaining} trailing bytes")
        return Ack(seq)
    raise WireError(f"unknown message type {kind} at byte {start}")


def decode_frame(frame: bytes) -> list[WireMessage]:
    """All messages of one websocket frame, in order; raises WireError on anything malformed."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise WireError(f"a frame is binary, got {type(frame).__name__}")
    reader = Reader(bytes(frame))
    messages: list[WireMessage] = []
    while reader.remaining:
        messages.append(_decode_one(reader))
    return messages


def encode_message(message: WireMessage) -> bytes:
    if isinstance(message, SyncUpdate):
        return b"\x00\x02" + write_var_bytes(message.update)
    if isinstance(message, SyncStep1):
        return b"\x00\x00" + write_var_bytes(message.state_vector)
    if isinstance(message, SyncStep2):
        return b"\x00\x01" + write_var_bytes(message.update)
    if isinstance(message, AwarenessMessage):
        return b"\x01" + write_var_bytes(message.payload)
    if isinstance(message, AuthDenied):
        return b"\x02\x00" + write_var_string(message.reason)
    if isinstance(message, QueryAwareness):
        return b"\x03"
    if isinstance(message, Ack):
        return write_var_uint(MESSAGE_ACK) + write_var_bytes(write_var_uint(message.seq))
    if isinstance(message, Extension):
        return write_var_uint(message.type) + write_var_bytes(message.payload)
    raise WireError(f"not a wire message: {type(message).__name__}")


def encode_frame(messages: Iterable[WireMessage]) -> bytes:
    """Several messages back to back in one frame (y-websocket 4.x clients read them all;
    2.x clients read only the first, so the relay sends one message per frame)."""
    return b"".join(encode_message(message) for message in messages)


@dataclass(frozen=True)
class RefreshAnswer:
    """The relay's answer to a token refresh: the new expiry, or why it kept the old token."""

    accepted: bool
    exp: int = 0  # unix seconds, when accepted
    reason: str = ""  # when refused

    def encode(self) -> Extension:
        if self.accepted:
            payload = write_var_uint(REFRESH_ACCEPTED) + write_var_uint(self.exp)
        else:
            payload = write_var_uint(REFRESH_REFUSED) + write_var_string(self.reason)
        return Extension(MESSAGE_TOKEN_REFRESH, payload)

    @classmethod
    def decode(cls, payload: bytes) -> RefreshAnswer:
        reader = Reader(payload)
        status = reader.var_uint("token refresh status")
        if status == REFRESH_ACCEPTED:
            answer = cls(True, exp=reader.var_uint("token refresh expiry"))
        elif status == REFRESH_REFUSED:
            answer = cls(False, reason=reader.var_string("token refresh reason"))
        else:
            raise WireError(f"unknown token refresh status {status}")
        if reader.remaining:
            raise WireError(f"token refresh answer has {reader.remaining} trailing bytes")
        return answer


def encode_token_refresh(token: str) -> Extension:
    """Client to relay: use `token` for this connection from now on (design §3)."""
    return Extension(MESSAGE_TOKEN_REFRESH, write_var_string(token))


def decode_token_refresh(payload: bytes) -> str:
    reader = Reader(payload)
    token = reader.var_string("refreshed token")
    if reader.remaining:
        raise WireError(f"token refresh has {reader.remaining} trailing bytes")
    return token


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest, without parsing it (no recursion).

    Brackets inside strings do not count; for text that is not JSON the number means nothing,
    and the parser that runs next refuses it.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode_awareness(payload: bytes, max_depth: int = MAX_AWARENESS_DEPTH) -> list[AwarenessEntry]:
    """Parse an awareness update, checking that every state is JSON (a JS peer would throw)
    nested at most `max_depth` deep."""
    reader = Reader(payload)
    count = reader.var_uint("awareness entry count")
    entries: list[AwarenessEntry] = []
    for index in range(count):
        client_id = reader.var_uint(f"client id of awareness entry {index}")
        clock = reader.var_uint(f"clock of awareness entry {index}")
        state = reader.var_string(f"state of awareness entry {index}")
        if "[" in state or "{" in state:
            depth = json_depth(state)
            if depth > max_depth:
                raise WireError(
                    f"state of awareness entry {index} nests {depth} deep, more than {max_depth}"
                )
        try:
            json.loads(state)
        except ValueError as error:
            raise WireError(f"state of awareness entry {index} is not JSON: {error}") from None
        entries.append(AwarenessEntry(client_id, clock, state))
    if reader.remaining:
        raise WireError(f"awareness update has {reader.remaining} trailing bytes")
    return entries


def encode_awareness(entries: Iterable[AwarenessEntry]) -> bytes:
    items = list(entries)
    parts = [write_var_uint(len(items))]
    for entry in items:
        parts.append(write_var_uint(entry.client_id))
        parts.append(write_var_uint(entry.clock))
        parts.append(write_var_string(entry.state))
    return b"".join(parts)


def decode_state_vector(state_vector: bytes) -> dict[int, int]:
    """A Yjs state vector: client id -> number of structs seen from it."""
    reader = Reader(state_vector)
    count = reader.var_uint("state vector length")
    result: dict[int, int] = {}
    for _ in range(count):
        client = reader.var_uint("state vector client id")
        result[client] = reader.var_uint("state vector clock")
    if reader.remaining:
        raise WireError(f"state vector has {reader.remaining} trailing bytes")
    return result
