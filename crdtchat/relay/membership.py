"""Who may open a room with an identity token: its owner and members (design §4, membership).

Membership lives in the room's own document, in the roots `access.members` and
`access.invites`, so that every node of a future cluster sees it where it sees the room
(a relay's disk would be seen by one node only). No role may write those roots; the relay
writes them itself (`LiveDoc.local_write`) when the owner acts through the HTTP endpoints of
`crdtchat.relay.http` (`/rooms/<room>/members`, `/rooms/<room>/invites`, `/rooms/<room>/join`), and
the owner is the first identity that opens a room that holds nothing yet.

An invite link carries a secret `<id>.<random>`; the document keeps only the SHA-256 of the
whole secret under the id, so members who read the document cannot use an invite.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any, Literal

from pycrdt import Array, Doc, Map
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crdtchat import schema
from crdtchat.errors import CrdtchatError
from crdtchat.schema import Invite, Member

GrantedRole = Literal["writer", "reader"]
_RANK = {"reader": 0, "writer": 1, "owner": 2}


class AccessError(CrdtchatError, ValueError):
    """An owner action or an invite that cannot be done; `status` is its HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def members(doc: Doc) -> dict[str, Member]:
    """The valid entries of `access.members`; a malformed one is skipped (only the relay
    writes there, but a document may come from elsewhere)."""
    found: dict[str, Member] = {}
    root = doc.get(schema.MEMBERS, type=Map)
    for sub, value in root.items():
        if not isinstance(value, dict):
            continue
        try:
            found[sub] = Member.model_validate(value)
        except ValidationError:
            continue
    return found


def invites(doc: Doc) -> dict[str, Invite]:
    found: dict[str, Invite] = {}
    root = doc.get(schema.INVITES, type=Map)
    for key, value in root.items():
        if not isinstance(value, dict):
            continue
        try:
            found[key] = Invite.model_validate(value)
        except ValidationError:
            continue
    return found


def owner_of(table: dict[str, Member]) -> str | None:
    owners = sorted(sub for sub, member in table.items() if member.role == "owner")
    return owners[0] if owners else None  # one, unless two nodes created it at once


def role_of(table: dict[str, Member], sub: str) -> GrantedRole | None:
    """The connection role a subject gets in the room: the owner writes, like a writer."""
    member = table.get(sub)
    if member is None:
        return None
    return "reader" if member.role == "reader" else "writer"


def is_empty(doc: Doc) -> bool:
    """Whether the room holds nothing yet (so an identity that opens it becomes its owner)."""
    return doc.get_state() == b"\x00"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> tuple[str, str]:
    """(id, secret) of a new invite: the secret starts with the id, so it finds its entry."""
    invite_id = secrets.token_hex(6)
    return invite_id, f"{invite_id}.{secrets.token_urlsafe(32)}"


def _entry(value: BaseModel) -> dict[str, Any]:
    return value.model_dump(mode="json")


class MemberChange(BaseModel):
    """Body of `POST /rooms/<room>/members`: add or change a member, or remove one."""

    model_config = ConfigDict(extra="forbid")

    sub: str = Field(min_length=1, max_length=1024)
    role: GrantedRole | None = None
    remove: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> MemberChange:
        if (self.role is None) == (not self.remove):
            raise ValueError('give either "role" (reader or writer) or "remove": true')
        return self


class InviteRequest(BaseModel):
    """Body of `POST /rooms/<room>/invites`."""

    model_config = ConfigDict(extra="forbid")

    role: GrantedRole
    ttl: float | None = Field(default=None, gt=0)
    uses: int | None = Field(default=None, ge=1)


class JoinRequest(BaseModel):
    """Body of `POST /rooms/<room>/join`."""

    model_config = ConfigDict(extra="forbid")

    secret: str = Field(min_length=1, max_length=256)


Roots = dict[str, Array | Map]


def claim_owner(sub: str) -> Any:
    """A `local_write` that makes `sub` the owner."""

    def write(roots: Roots) -> None:
        entry = Member(role="owner", by=sub, at=time.time())
        roots[schema.MEMBERS][sub] = _entry(entry)  # type: ignore[index]

    return write


def change_member(doc: Doc, actor: str, change: MemberChange) -> Any:
    """Check an owner's change against the table; the `local_write` that makes it."""
    table = members(doc)
    if owner_of(table) != actor:
        raise AccessError(403, "only the room's owner may change its members")
    if change.sub == actor:
        raise AccessError(400, "the owner's own role cannot be changed")
    if change.remove:
        if change.sub not in table:
            raise AccessError(404, f"{change.sub!r} is not a member")

        def remove(roots: Roots) -> None:
            del roots[schema.MEMBERS][change.sub]  # type: ignore[attr-defined]

        return remove
    entry = Member(role=change.role or "reader", by=actor, at=time.time())

    def add(roots: Roots) -> None:
        roots[schema.MEMBERS][change.sub] = _entry(entry)  # type: ignore[index]

    return add


def create_invite(doc: Doc, actor: str, request: InviteRequest) -> tuple[str, str, Any]:
    """(id, secret, write) of a new invite by the owner."""
    if owner_of(members(doc)) != actor:
        raise AccessError(403, "only the room's owner may create invites")
    invite_id, secret = new_secret()
    now = time.time()
    entry = Invite(
        hash=hash_secret(secret),
        role=request.role,
        expires_at=None if request.ttl is None else now + request.ttl,
        uses=request.uses,
        by=actor,
        at=now,
    )

    def write(roots: Roots) -> None:
        roots[schema.INVITES][invite_id] = _entry(entry)  # type: ignore[index]

    return invite_id, secret, write


def revoke_invite(doc: Doc, actor: str, invite_id: str) -> Any:
    if owner_of(members(doc)) != actor:
        raise AccessError(403, "only the room's owner may revoke invites")
    if invite_id not in invites(doc):
        raise AccessError(404, f"no invite {invite_id!r} in this room")

    def write(roots: Roots) -> None:
        del roots[schema.INVITES][invite_id]  # type: ignore[attr-defined]

    return write


def redeem(doc: Doc, sub: str, secret: str) -> tuple[GrantedRole, Any]:
    """The role an invite grants `sub` and the write that records it (and spends a use).

    Every failure is the same 403, so that the answer tells nothing about which invites exist.
    """
    invite_id = secret.partition(".")[0]
    invite = invites(doc).get(invite_id)
    refused = AccessError(403, "this invite is not valid: revoked, used up, expired or mistyped")
    if invite is None or not hmac.compare_digest(invite.hash, hash_secret(secret)):
        raise refused
    now = time.time()
    if invite.expires_at is not None and invite.expires_at <= now:
        raise refused
    table = members(doc)
    current = table.get(sub)
    keep = current is not None and _RANK[current.role] >= _RANK[invite.role]
    granted: GrantedRole = role_of(table, sub) if keep else invite.role  # type: ignore[assignment]

    def write(roots: Roots) -> None:
        if not keep:
            entry = Member(role=invite.role, by=sub, at=now)
            roots[schema.MEMBERS][sub] = _entry(entry)  # type: ignore[index]
        if invite.uses is None:
            return
        if invite.uses <= 1:
            del roots[schema.INVITES][invite_id]  # type: ignore[attr-defined]
        else:
            spent = invite.model_copy(update={"uses": invite.uses - 1})
            roots[schema.INVITES][invite_id] = _entry(spent)  # type: ignore[index]

    return granted, write
