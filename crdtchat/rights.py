"""Who may write what (design §4): one table, read by `Conversation` and by the relay.

The relay judges an incoming update against it (`crdtchat.relay.permissions`, over the changes
the update makes; `crdtchat.relay.prejudge`, over where its items land), and a `Conversation`
that knows its role refuses a write up front by the same table: a write the relay refuses
stays in the local replica and blocks that replica's later writes, which build on it.
tests/document/test_rights.py holds the two sides to each other: every operation of
`crdtchat.testing.operations` under every role, allowed locally exactly when the relay
accepts the update it makes.

`RIGHTS` gives each role an `Access` per root (a root it is not given is closed to it), the
kinds of message it appends, and whether it edits its messages beyond their text. Design §4
says the same in words: a reader writes nothing; a writer (a person's device) appends user,
tool and system messages and edits their text, writes meta, settings and tools, deletes
derived entries, asks for cancels and answers in its own name, and writes its own draft and
read mark; a worker appends assistant turns and changes them, and writes derived entries,
leases and streams, and deletes the requests it has served; a person writes its own list
document (design §2) and nothing else.

Nobody writes `access.*` (the relay does, design §4) nor a root outside the schema, and
nobody deletes canonical messages. A message is always authored by the writer's subject.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from crdtchat import schema

PeerRole = Literal["reader", "writer", "worker"]

FIXED_MESSAGE_KEYS = frozenset({"id", "role", "author", "parent"})  # nobody changes these


class Access(Enum):
    """What a role may do to one root; the relay judges each kind over the changes made."""

    FULL = "full"  # any change
    DELETE_ONLY = "delete-only"  # deleting entries
    OWN_KEY = "own-key"  # the entry whose key is the writer's subject
    SIGNED = "signed"  # writing entries whose `by` is the writer's subject; deleting any
    MESSAGES = "messages"  # appending messages (`Rights.messages`); changing its own


@dataclass(frozen=True)
class Rights:
    """One role's rights: an `Access` per root, and what `Access.MESSAGES` lets it do."""

    roots: Mapping[str, Access]
    messages: frozenset[str] = frozenset()  # the message roles it appends
    message_fields: bool = False  # changes its messages' keys (but the fixed ones), not only text


RIGHTS: Mapping[str, Rights] = {
    "reader": Rights({}),
    "writer": Rights(
        {
            schema.META: Access.FULL,
            schema.SETTINGS: Access.FULL,
            schema.TOOLS: Access.FULL,
            schema.MESSAGES: Access.MESSAGES,
            schema.DERIVED: Access.DELETE_ONLY,
            schema.CANCEL: Access.SIGNED,
            schema.REGENERATE: Access.SIGNED,
            schema.DRAFTS: Access.OWN_KEY,
            schema.READ: Access.OWN_KEY,
        },
        messages=frozenset({"user", "tool", "system"}),
    ),
    "worker": Rights(
        {
            schema.MESSAGES: Access.MESSAGES,
            schema.DERIVED: Access.FULL,
            schema.LEASES: Access.FULL,
            schema.STREAMS: Access.FULL,
            schema.CANCEL: Access.DELETE_ONLY,
            schema.REGENERATE: Access.DELETE_ONLY,
        },
        messages=frozenset({"assistant"}),
        message_fields=True,
    ),
    # A person's devices in their own list document: every list root, and nothing else.
    "person": Rights({root: Access.FULL for root in schema.LIST_ROOTS}),
}


# -- the local side: what a `Conversation` method does to a root -------------------------------


class Write(Enum):
    """The kind of change one `Conversation` method makes to a root."""

    SET = "set"  # write or replace entries under any key
    SET_OWN = "set own"  # write the entry keyed by the writer's subject
    SET_SIGNED = "set signed"  # write an entry whose `by` is the writer's subject
    DELETE = "delete"  # delete entries
    APPEND = "append"  # append a message of `LocalWrite.message_role`, authored by the writer
    EDIT = "edit"  # change the text of one of the writer's messages


PERMITS: Mapping[Access, frozenset[Write]] = {
    Access.FULL: frozenset(Write),
    Access.DELETE_ONLY: frozenset({Write.DELETE}),
    Access.OWN_KEY: frozenset({Write.SET_OWN}),
    Access.SIGNED: frozenset({Write.SET_SIGNED, Write.DELETE}),
    Access.MESSAGES: frozenset({Write.APPEND, Write.EDIT}),
}


@dataclass(frozen=True)
class LocalWrite:
    """One kind of write a `Conversation` makes; `name` is how a refusal names it."""

    name: str
    root: str
    write: Write
    message_role: str | None = None


SET_META = LocalWrite("meta", schema.META, Write.SET)
SET_SETTINGS = LocalWrite("settings", schema.SETTINGS, Write.SET)
SET_TOOLS = LocalWrite("tools", schema.TOOLS, Write.SET)
EDIT_TEXT = LocalWrite("edit", schema.MESSAGES, Write.EDIT)
PUT_DERIVED = LocalWrite("derived", schema.DERIVED, Write.SET)
DISCARD_DERIVED = LocalWrite("discard derived", schema.DERIVED, Write.DELETE)
WRITE_LEASES = LocalWrite("leases", schema.LEASES, Write.SET)
WRITE_STREAMS = LocalWrite("streams", schema.STREAMS, Write.SET)
REQUEST_CANCEL = LocalWrite("cancel", schema.CANCEL, Write.SET_SIGNED)
CLEAR_CANCEL = LocalWrite("cancel", schema.CANCEL, Write.DELETE)
REQUEST_REGENERATION = LocalWrite("regenerate", schema.REGENERATE, Write.SET_SIGNED)
CLEAR_REGENERATION = LocalWrite("regenerate", schema.REGENERATE, Write.DELETE)
SET_DRAFT = LocalWrite("drafts", schema.DRAFTS, Write.SET_OWN)
MARK_READ = LocalWrite("read marks", schema.READ, Write.SET_OWN)


def append_message(message_role: str) -> LocalWrite:
    """Appending a message of `message_role` ("user", "assistant", ...)."""
    return LocalWrite(f"message {message_role}", schema.MESSAGES, Write.APPEND, message_role)


def local_refusal(role: str, write: LocalWrite) -> str | None:
    """Why a peer of `role` may not make `write`, or None when the relay would take it."""
    rights = RIGHTS.get(role)
    if rights is None:
        return f"unknown role {role!r}"
    access = rights.roots.get(write.root)
    allowed = access is not None and write.write in PERMITS[access]
    if allowed and write.message_role is not None and access is Access.MESSAGES:
        allowed = write.message_role in rights.messages
    return None if allowed else f"a {role} may not write {write.name}"
