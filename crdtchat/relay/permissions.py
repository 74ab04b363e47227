"""The rights of design §4 (`crdtchat.rights`) judged over the changes one update makes.

The relay applies an update to its live document while deep observers on every root record
what changed (`crdtchat.relay.livedoc`); this module judges that record against the role's
`Access` on each root. Every change to a live shared type raises an event on that type, and
every type lives under a root, so a root's deep observer sees every visible change below it;
an event the rules cannot read (for example a sequence insert into a Map root) is refused where
the role has only partial rights. Types created in the same update raise no events of their
own, so whatever is inserted is judged whole, at the place where it is inserted.

What each `Access` accepts (a root the role is not given accepts nothing):

- FULL: any change.
- MESSAGES (canonical.messages): appending messages of the role's kinds (`Rights.messages`)
  authored by its subject; changing its own messages: the text, and with
  `Rights.message_fields` any key but id/role/author/parent. A new message's id must be free
  and, in the assistant-turn form, name the message it answers (design §7.2; the ids are kept
  by `crdtchat.relay.message_ids`). Nobody deletes a canonical message.
- DELETE_ONLY: deleting entries.
- SIGNED: deleting any entry, or writing one whose `by` is the writer's subject (a request in
  nobody else's name), as a plain JSON object.
- OWN_KEY: changing the entry whose key is the writer's subject, in any way.

Readers may not change the document at all. Subdocuments are refused wherever a role's rights
depend on content (the relay cannot see inside them).

A map event with no key changes is an invisible write: a value written under a key that a
concurrent write already holds loses on arrival (Yjs deletes it at once, and it never shows).
Two devices of one person writing their draft at the same time do that; it is accepted where
the role may write keys (drafts, message maps), and refused where it may only delete.
(Sequence items inside a Map, the other way to get such an event, are refused earlier as a
shape Yjs never writes: `crdtchat.structure`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pycrdt import Array, Doc, Map, Text
from pydantic import ValidationError

from crdtchat.rights import FIXED_MESSAGE_KEYS, RIGHTS, Access
from crdtchat.schema import Message
from crdtchat.shape import TooDeep, holds_types, read_json


@dataclass(slots=True)
class Change:
    """What one event of a deep observer says, reduced to what the rules read.

    `kind` is "array", "map", "text" or "xml"; `path` is relative to the root; `delta` (array
    and text) and `keys` (map) carry pycrdt-wrapped values.
    """

    kind: str
    path: list[int | str]
    delta: list[dict[str, Any]] | None = None
    keys: dict[str, dict[str, Any]] | None = None


def _has_subdoc(values: Iterable[Any]) -> bool:
    return any(isinstance(value, Doc) for value in values)


def _event_values(event: Change) -> list[Any]:
    """Values an event inserts, to look for subdocuments."""
    if event.keys is not None:
        return [change.get("newValue") for change in event.keys.values()]
    delta = event.delta or []
    values: list[Any] = []
    for op in delta:
        inserted = op.get("insert")
        if isinstance(inserted, list):
            values.extend(inserted)
    return values


def check_message(value: Any, role: str, sub: str) -> str | None:
    """Why `value` may not stand in canonical.messages as written by (`role`, `sub`), if so."""
    if not isinstance(value, Map):
        return "a message must be a Map"
    content = value.get("content")
    if content is not None and not isinstance(content, Text):
        return "message content must be a Text"
    try:
        # str() is the map as JSON, made in Rust: much cheaper than to_py() for each check.
        # A Map holding shared types (not a message Yjs clients write) is walked first: a
        # value nested too deeply would overflow the stack in str() (design §7.1).
        if holds_types(value):
            message = Message.model_validate(read_json(value))
        else:
            message = Message.model_validate_json(str(value))
    except TooDeep as error:
        return f"invalid message: {error}"
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "message"
        return f"invalid message: {where}: {first.get('msg', 'invalid')}"
    if message.author != sub:
        return f"message author must be the token subject {sub!r}, not {message.author!r}"
    if message.role not in RIGHTS[role].messages:
        return f"a {role} may not write {message.role} messages"
    return None


Claim = Callable[[str, str, str | None], str | None]


def _check_messages(
    event: Change, role: str, sub: str, messages: Callable[[], Array], claim: Claim | None
) -> str | None:
    path = event.path
    if not path:
        if event.kind != "array" or event.delta is None:
            return "canonical.messages changed in a way that is not an array insert"
        inserted = False
        for op in event.delta:
            if "delete" in op:
                return "canonical messages cannot be deleted"
            if "insert" in op:
                inserted = True
                for value in op["insert"]:
                    reason = check_message(value, role, sub)
                    if reason is None and claim is not None:
                        reason = claim(value.get("id"), value.get("role"), value.get("parent"))
                    if reason is not None:
                        return reason
        if not inserted:
            return "canonical.messages changed in a way that is not a message append"
        return None
    index = path[0]
    array = messages()
    if not isinstance(index, int) or not 0 <= index < len(array):
        return "change inside canonical.messages at an unknown position"
    message = array[index]
    if not isinstance(message, Map):
        return "change inside an entry of canonical.messages that is not a message"
    author = message.get("author")
    if author != sub:
        return f"only its author may change message {message.get('id')!r}"
    if path[1:] == ["content"] and event.kind == "text":
        return None
    if len(path) == 1 and event.kind == "map" and event.keys is not None:
        keys = set(event.keys)
        if not keys:
            return None  # an invisible write (module docstring)
        if not RIGHTS[role].message_fields and keys != {"content"}:
            return f"a {role} may change only the text of its messages"
        fixed = keys & FIXED_MESSAGE_KEYS
        if fixed:
            return f"message keys {sorted(fixed)} cannot change"
        return check_message(message, role, sub)
    return "unexpected change inside a message"


def _check_root(
    root: str,
    access: Access,
    event: Change | None,
    role: str,
    sub: str,
    messages: Callable[[], Array],
    claim: Claim | None,
) -> str | None:
    if access is Access.FULL:
        return None  # the role owns this root: what changed does not matter
    if event is None:
        raise AssertionError(f"no event details recorded for {root} ({access})")
    if _has_subdoc(_event_values(event)):
        return "subdocuments are not allowed"
    if access is Access.MESSAGES:
        return _check_messages(event, role, sub, messages, claim)
    path = event.path
    if access is Access.DELETE_ONLY:
        if path or event.keys is None or not event.keys:
            return f"a {role} may only delete entries of {root}"
        for key, change in event.keys.items():
            if change.get("action") != "delete":
                return f"a {role} may only delete entries of {root} (not write {key!r})"
        return None
    if access is Access.OWN_KEY:
        if path:
            keys = [path[0]]
        elif event.keys:
            keys = list(event.keys)
        elif event.kind == "map":
            return None  # an invisible write (module docstring)
        else:
            return f"{root} changed in a way that is not a key change"
        for key in keys:
            if key != sub:
                return f"a {role} may only write its own entry {sub!r} of {root}, not {key!r}"
        return None
    if access is Access.SIGNED:
        return _check_signed(root, event, role, sub)
    raise AssertionError(access)


def _check_signed(root: str, event: Change, role: str, sub: str) -> str | None:
    """Requests are plain JSON objects written whole, in the writer's own name (`by`)."""
    if event.path or event.keys is None:
        return f"{root} changed in a way that is not a key change"
    for key, change in event.keys.items():
        if change.get("action") == "delete":
            continue
        value = change.get("newValue")
        if not isinstance(value, dict) or value.get("by") != sub:
            return f"a {role} may write {root} entries only with by = its subject {sub!r} ({key!r})"
    return None  # no keys: an invisible write (module docstring)


def check_changes(
    role: str,
    sub: str,
    changes: Iterable[tuple[str, Change | None]],
    messages: Callable[[], Array],
    claim: Claim | None = None,
) -> str | None:
    """The reason to refuse an update that made `changes` (root name, event), or None.

    The event may be None for roots where the role has full rights or none: only whether the
    root changed matters there.

    `messages` returns the live canonical.messages array (after the update), to look up the
    author of a message whose text or keys changed. `claim` (`MessageIds.claim`) judges the id
    of each new message; without it, ids are not checked.
    """
    rights = RIGHTS.get(role)
    if rights is None:
        return f"unknown role {role!r}"
    for root, event in changes:
        access = rights.roots.get(root)
        if access is None:
            if role == "reader":
                return "a reader may not change the document"
            return f"a {role} may not write {root}"
        reason = _check_root(root, access, event, role, sub, messages, claim)
        if reason is not None:
            return reason
    return None
