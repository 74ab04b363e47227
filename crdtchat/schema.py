"""The document schema of design §2 as names and pydantic models.

Anything in a CRDT may have been written by any peer, so every read goes through these
models: a value that does not fit is reported and skipped, never trusted.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1

# Root type names: fixed by the wire contract, JS clients read them by these names.
META = "canonical.meta"
SETTINGS = "canonical.settings"
TOOLS = "canonical.tools"
MESSAGES = "canonical.messages"
DERIVED = "derived.entries"
LEASES = "transport.leases"
STREAMS = "transport.streams"
CANCEL = "transport.cancel"
REGENERATE = "transport.regenerate"
DRAFTS = "transport.drafts"
READ = "transport.read"
# Who may open the room (design §4, membership): written only by the relay, read by everyone.
MEMBERS = "access.members"
INVITES = "access.invites"

CANONICAL_ROOTS = (META, SETTINGS, TOOLS, MESSAGES)
DERIVED_ROOTS = (DERIVED,)
TRANSPORT_ROOTS = (LEASES, STREAMS, CANCEL, REGENERATE, DRAFTS, READ)
MAP_ROOTS = (META, SETTINGS, TOOLS, DERIVED, *TRANSPORT_ROOTS)
ACCESS_ROOTS = (MEMBERS, INVITES)
# A person's conversation list (design §2, the list document): room name -> a field each, so
# that two devices changing different fields of one entry at once keep both changes.
LIST_ROOMS = "list.rooms"  # room -> {"added_at": float}: in the list while the key is there
LIST_TITLES = "list.titles"  # room -> str: the person's own title for it
LIST_PINNED = "list.pinned"  # room -> bool
LIST_ARCHIVED = "list.archived"  # room -> bool
LIST_READ = "list.read"  # room -> id of the last message the person has seen there
LIST_ROOTS = (LIST_ROOMS, LIST_TITLES, LIST_PINNED, LIST_ARCHIVED, LIST_READ)
ALL_ROOTS = (*CANONICAL_ROOTS, *DERIVED_ROOTS, *TRANSPORT_ROOTS, *ACCESS_ROOTS, *LIST_ROOTS)
# The room of a person's list: this prefix and the first 40 hex digits of the SHA-256 of the
# subject's UTF-8 bytes (`person_room`); only that subject's identity tokens open it.
PERSON_PREFIX = "person."

Role = Literal["system", "user", "assistant", "tool"]
Status = Literal["complete", "incomplete", "cancelled", "error"]
DerivedKind = Literal["provider_state", "hidden", "usage", "kv_checkpoint", "title", "summary"]

# Anchored with \A and \Z, and used with fullmatch: "$" also matches before a final newline,
# which let "abc\n" through as a room of its own (issue 10, finding 8).
ROOM_NAME = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")


def person_room(sub: str) -> str:
    """The room name of the conversation list of subject `sub` (any string: an email,
    `auth0|abc`, an issuer-namespaced subject), the same on every device."""
    return PERSON_PREFIX + hashlib.sha256(sub.encode("utf-8")).hexdigest()[:40]


def is_person_room(room: str) -> bool:
    return room.startswith(PERSON_PREFIX)


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Model(BaseModel):
    # Unknown keys are ignored so that a newer peer's additions do not make us drop its data.
    model_config = ConfigDict(frozen=True, extra="ignore")


class ToolCall(_Model):
    id: NonEmpty
    name: NonEmpty
    arguments: str  # a JSON string, as the providers send it


class FileRef(_Model):
    sha256: Sha256Hex
    name: str
    mime: str
    size: Annotated[int, Field(ge=0)]


class ModelRef(_Model):
    provider: str
    api: str
    model: str


class Message(_Model):
    """One entry of `canonical.messages`, as every reader must see it."""

    id: NonEmpty
    role: Role
    author: str
    parent: str | None = None
    created_at: float = 0.0
    content: str = ""
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    files: tuple[FileRef, ...] | None = None
    model: ModelRef | None = None
    status: Status | None = None
    error: str | None = None


class ToolSpec(_Model):
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class Settings(_Model):
    system: str = ""
    provider: str | None = None
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Meta(_Model):
    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    created_at: float | None = None
    title: str | None = None


class DerivedEntry(_Model):
    """Provider state that saves time or tokens; always safe to throw away."""

    kind: DerivedKind
    message_id: str
    prefix_hash: str
    provider: str
    api: str
    model: str
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    producer: str = ""


class Lease(_Model):
    holder: NonEmpty
    turn_id: NonEmpty
    expires_at: float


class CancelRequest(_Model):
    by: str
    at: float


class RegenerateRequest(_Model):
    n: Annotated[int, Field(ge=1)]
    by: str
    at: float


class Problem(_Model):
    """A value in the document that readers skip, and why."""

    root: str
    key: str | int
    reason: str


def assistant_turn_id(answered_id: str, number: int) -> str:
    """The id of answer `number` (1-based) to `answered_id`.

    Deterministic, so two workers answering the same request write the same id and readers
    keep only the first (design §2): this is what makes "exactly one visible reply" hold.
    """
    if number < 1:
        raise ValueError("answer numbers start at 1")
    return f"{answered_id}~a{number}"


# What `assistant_turn_id` makes: the answered id, "~a", then the answer number (no leading 0).
_TURN_ID = re.compile(r"\A(.+)~a([1-9][0-9]*)\Z", re.DOTALL)


def answered_id_of(message_id: str) -> str | None:
    """The id that `message_id` answers if it has the assistant-turn form, else None."""
    match = _TURN_ID.fullmatch(message_id)
    return None if match is None else match.group(1)


def message_id_refusal(
    message_id: str, role: str, parent: str | None, taken: tuple[str, str | None] | None
) -> str | None:
    """Why a new message may not carry `message_id`, or None (design §7.2).

    `taken` is (role, parent) of the message that already holds the id, if one does. Readers
    keep the first message of an id in document order, so a new message with a taken id would
    shadow the other one wherever it is inserted before it. The one designed exception is two
    workers committing the same assistant turn (same id, role assistant, same parent): either
    copy is the same answer. An assistant-turn id is predictable, so only the answer it names
    may carry it: otherwise anybody could take it in advance and block that answer.
    """
    answered = answered_id_of(message_id)
    if answered is not None and (role != "assistant" or parent != answered):
        return (
            f"message id {message_id!r} has the form of an answer to {answered!r}: only that "
            "assistant turn may carry it"
        )
    if taken is not None and not (role == "assistant" and taken == ("assistant", parent)):
        return f"message id {message_id!r} is taken by another message"
    return None


MemberRole = Literal["owner", "writer", "reader"]


class Member(_Model):
    """`access.members[<subject>]`: the owner is the room's creator, the others were added."""

    role: MemberRole
    by: str  # the subject who added this member (the owner, or the invitee itself by link)
    at: float


class Invite(_Model):
    """`access.invites[<id>]`: a link's secret is never stored, only its SHA-256."""

    hash: Sha256Hex
    role: Literal["writer", "reader"]
    expires_at: float | None = None  # unix seconds
    uses: int | None = Field(default=None, ge=1)  # redemptions left; None: unlimited
    by: str
    at: float
