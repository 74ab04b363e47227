"""Operations on a `Conversation` as small frozen values.

A hypothesis failure is reported as the list of values it drew, so each write a replica can
make is a value with a readable repr and one `apply(conversation)`. `apply` also checks the
local effect where the contract makes it exact (the text after an insertion, the lease after a
claim, the canonical section after a discard): a wrong offset conversion or a discard that
touches canonical data fails at the step that caused it, not later at quiescence.

Strategies (`crdtchat.testing.strategies`) draw operations that are valid for the replica's
state at draw time, so `apply` is expected to succeed; foreign writes (`Foreign*`) bypass the
`Conversation` API and write what any peer could put into a CRDT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pycrdt import Array, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.prefix import reference_prefix_hash
from crdtchat.schema import (
    DerivedEntry,
    DerivedKind,
    FileRef,
    ModelRef,
    Role,
    Status,
    ToolCall,
)

JSON = Any  # a value that survives json.dumps / json.loads unchanged


@runtime_checkable
class Operation(Protocol):
    """Anything a replica can do to its document."""

    def apply(self, conversation: Conversation) -> None: ...


def canonical_snapshot(conversation: Conversation) -> dict[str, Any]:
    """The JSON of every canonical root: what a derived discard must never change."""
    return {name: root_json(conversation, name) for name in schema.CANONICAL_ROOTS}


def root_json(conversation: Conversation, name: str) -> Any:
    """One root of the document as plain JSON (nested Text as strings)."""
    kind = Array if name == schema.MESSAGES else Map
    return json.loads(str(conversation.doc.get(name, type=kind)))


def message_problems(conversation: Conversation) -> list[schema.Problem]:
    """The problems `Conversation.problems()` reports about `canonical.messages` items."""
    return [p for p in conversation.problems() if p.root == schema.MESSAGES]


def _check_all_items_read(conversation: Conversation) -> None:
    counted = len(conversation.all_messages()) + len(message_problems(conversation))
    _check(counted == len(conversation.messages), "an item is neither accepted nor reported")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- canonical ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendMessage:
    """`Conversation.append` with every field explicit (ids too: runs must replay)."""

    message_id: str
    role: Role
    content: str
    parent: str | None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    files: tuple[FileRef, ...] | None = None
    model: ModelRef | None = None
    status: Status | None = None
    error: str | None = None

    def apply(self, conversation: Conversation) -> None:
        written = conversation.append(
            self.role,
            self.content,
            parent=self.parent,
            message_id=self.message_id,
            tool_calls=self.tool_calls,
            tool_call_id=self.tool_call_id,
            files=self.files,
            model=self.model,
            status=self.status,
            error=self.error,
        )
        read = conversation.message(self.message_id)
        _check(read == written, f"appended {written!r} but read back {read!r}")
        _check(read.author == conversation.author, "append must write the replica's author")


@dataclass(frozen=True)
class InsertText:
    """Insert `value` at code-point `index` of a message's text."""

    message_id: str
    index: int
    value: str

    def apply(self, conversation: Conversation) -> None:
        before = conversation.message(self.message_id).content
        conversation.insert_text(self.message_id, self.index, self.value)
        expected = before[: self.index] + self.value + before[self.index :]
        after = conversation.message(self.message_id).content
        _check(after == expected, f"insert: expected {expected!r}, text is {after!r}")


@dataclass(frozen=True)
class DeleteText:
    """Delete `length` code points at `index` of a message's text."""

    message_id: str
    index: int
    length: int

    def apply(self, conversation: Conversation) -> None:
        before = conversation.message(self.message_id).content
        conversation.delete_text(self.message_id, self.index, self.length)
        expected = before[: self.index] + before[self.index + self.length :]
        after = conversation.message(self.message_id).content
        _check(after == expected, f"delete: expected {expected!r}, text is {after!r}")


@dataclass(frozen=True)
class ReplaceText:
    """Replace a message's whole text (`edit_text`: the smallest edit)."""

    message_id: str
    text: str

    def apply(self, conversation: Conversation) -> None:
        conversation.edit_text(self.message_id, self.text)
        after = conversation.message(self.message_id).content
        _check(after == self.text, f"edit: expected {self.text!r}, text is {after!r}")


@dataclass(frozen=True)
class ChangeSettings:
    system: str | None = None
    provider: str | None = None
    model: str | None = None
    params: dict[str, JSON] | None = None

    def apply(self, conversation: Conversation) -> None:
        conversation.set_settings(
            system=self.system, provider=self.provider, model=self.model, params=self.params
        )
        settings = conversation.settings
        for key in ("system", "provider", "model", "params"):
            wanted = getattr(self, key)
            if wanted is not None:
                got = getattr(settings, key)
                _check(got == wanted, f"settings.{key}: wrote {wanted!r}, read {got!r}")


@dataclass(frozen=True)
class SetTool:
    name: str
    description: str
    parameters: dict[str, JSON]

    def apply(self, conversation: Conversation) -> None:
        conversation.set_tool(self.name, self.description, self.parameters)
        spec = conversation.tools.get(self.name)
        _check(
            spec is not None
            and spec.description == self.description
            and spec.parameters == self.parameters,
            f"tool {self.name!r} reads back as {spec!r}",
        )


@dataclass(frozen=True)
class RemoveTool:
    name: str

    def apply(self, conversation: Conversation) -> None:
        conversation.remove_tool(self.name)
        _check(self.name not in conversation.tools_raw(), f"tool {self.name!r} still there")


@dataclass(frozen=True)
class SetTitle:
    title: str

    def apply(self, conversation: Conversation) -> None:
        conversation.set_title(self.title)
        _check(conversation.title == self.title, "title did not read back")


# -- worker: leases, streams, turns, derived ------------------------------------------------


@dataclass(frozen=True)
class ClaimLease:
    """Claim (or take over, once expired) the lease on answering `message_id`."""

    message_id: str
    turn_id: str
    holder: str
    ttl: float

    def apply(self, conversation: Conversation) -> None:
        current = conversation.lease(self.message_id)
        now = conversation.clock()
        free = current is None or current.holder == self.holder or current.expires_at <= now
        granted = conversation.claim_lease(
            self.message_id, self.turn_id, holder=self.holder, ttl=self.ttl
        )
        _check(granted == free, f"claim returned {granted}, lease was {current!r} at {now}")
        after = conversation.lease(self.message_id)
        if granted:
            _check(
                after is not None
                and (after.holder, after.turn_id, after.expires_at)
                == (self.holder, self.turn_id, now + self.ttl),
                f"granted claim left lease {after!r}",
            )
        else:
            _check(after == current, "a refused claim changed the lease")


@dataclass(frozen=True)
class RenewLease:
    message_id: str
    holder: str
    ttl: float

    def apply(self, conversation: Conversation) -> None:
        current = conversation.lease(self.message_id)
        renewed = conversation.renew_lease(self.message_id, holder=self.holder, ttl=self.ttl)
        _check(
            renewed == (current is not None and current.holder == self.holder),
            f"renew returned {renewed} for lease {current!r}",
        )


@dataclass(frozen=True)
class ReleaseLease:
    message_id: str
    holder: str

    def apply(self, conversation: Conversation) -> None:
        current = conversation.lease(self.message_id)
        conversation.release_lease(self.message_id, holder=self.holder)
        after = conversation.lease(self.message_id)
        if current is not None and current.holder == self.holder:
            _check(after is None, "release left the lease in place")
        else:
            _check(after == current, "release of someone else's lease changed it")


@dataclass(frozen=True)
class StartStream:
    turn_id: str
    parent: str

    def apply(self, conversation: Conversation) -> None:
        conversation.start_stream(self.turn_id, parent=self.parent)
        _check(conversation.stream_text(self.turn_id) == "", "a new stream is not empty")


@dataclass(frozen=True)
class AppendStream:
    turn_id: str
    text: str

    def apply(self, conversation: Conversation) -> None:
        before = conversation.stream_text(self.turn_id)
        conversation.append_stream(self.turn_id, self.text)
        after = conversation.stream_text(self.turn_id)
        _check(after == (before or "") + self.text, f"stream reads {after!r} after append")


@dataclass(frozen=True)
class ResetStream:
    turn_id: str

    def apply(self, conversation: Conversation) -> None:
        conversation.reset_stream(self.turn_id)
        _check(conversation.stream_text(self.turn_id) == "", "reset left text in the stream")


@dataclass(frozen=True)
class CommitTurn:
    """The worker's one-transaction commit of an assistant turn (design §5)."""

    answered_id: str
    turn_id: str
    model: ModelRef
    status: Status
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    error: str | None = None
    derived: tuple[tuple[DerivedKind, tuple[tuple[str, JSON], ...], float | None], ...] = ()

    def apply(self, conversation: Conversation) -> None:
        streamed = conversation.stream_text(self.turn_id)
        message = conversation.commit_turn(
            self.answered_id,
            self.turn_id,
            model=self.model,
            status=self.status,
            content=self.content,
            tool_calls=self.tool_calls,
            error=self.error,
            derived=[(kind, dict(data), expires) for kind, data, expires in self.derived],
        )
        expected = self.content if self.content is not None else (streamed or "")
        _check(message.content == expected, "committed text is not the streamed text")
        _check(conversation.message(self.turn_id) == message, "the turn is not readable")
        _check(self.turn_id not in conversation.streams_in_flight(), "the stream survived")
        thread = conversation.thread(self.turn_id)
        truth = reference_prefix_hash(
            conversation.settings.system, conversation.tools_raw(), thread
        )
        written = {kind: dict(data) for kind, data, _expires in self.derived}  # last one wins
        entries = conversation.derived_entries()
        for kind, data in written.items():
            key = f"{kind}:{self.turn_id}:{self.model.provider}:{self.model.api}:{self.model.model}"
            entry = entries.get(key)
            _check(entry is not None and entry.data == data, f"derived entry {key!r} missing")
            assert entry is not None
            _check(entry.prefix_hash == truth, "derived entry keyed to a wrong prefix hash")


@dataclass(frozen=True)
class PutDerived:
    entry: DerivedEntry

    def apply(self, conversation: Conversation) -> None:
        before = canonical_snapshot(conversation)
        key = conversation.put_derived(self.entry)
        _check(conversation.derived_entries().get(key) == self.entry, "entry did not read back")
        _check(canonical_snapshot(conversation) == before, "a derived put changed canonical")


@dataclass(frozen=True)
class DiscardDerived:
    """Discard one entry (`key`), one kind, or everything (`key` and `kind` both None)."""

    key: str | None = None
    kind: DerivedKind | None = None

    def apply(self, conversation: Conversation) -> None:
        before = canonical_snapshot(conversation)
        if self.key is not None:
            conversation.discard_derived(self.key)
            _check(self.key not in conversation.derived, f"entry {self.key!r} survived")
        elif self.kind is not None:
            conversation.discard_derived_kind(self.kind)
            kinds = {e.kind for e in conversation.derived_entries().values()}
            _check(self.kind not in kinds, f"entries of kind {self.kind} survived")
        else:
            conversation.discard_all_derived()
            _check(len(conversation.derived) == 0, "discard_all_derived left entries")
        after = canonical_snapshot(conversation)
        _check(after == before, "discarding derived entries changed the canonical section")


# -- transport written by people ---------------------------------------------------------


@dataclass(frozen=True)
class SetDraft:
    text: str

    def apply(self, conversation: Conversation) -> None:
        conversation.set_draft(self.text)
        got = conversation.draft()
        _check(got == self.text, f"draft reads {got!r}, wrote {self.text!r}")


@dataclass(frozen=True)
class MarkRead:
    """This author's read mark (keyed by the author: design §7.2)."""

    message_id: str

    def apply(self, conversation: Conversation) -> None:
        conversation.mark_read(self.message_id)
        _check(conversation.read_mark() == self.message_id, "read mark not kept")


@dataclass(frozen=True)
class RequestCancel:
    turn_id: str

    def apply(self, conversation: Conversation) -> None:
        conversation.request_cancel(self.turn_id)
        _check(conversation.cancel_requested(self.turn_id), "cancel request not readable")


@dataclass(frozen=True)
class RequestRegeneration:
    message_id: str

    def apply(self, conversation: Conversation) -> None:
        answers = len(conversation.assistant_answers(self.message_id))
        n = conversation.request_regeneration(self.message_id)
        _check(n > answers, f"asked for answer {n} with {answers} answers present")
        request = conversation.regenerate_requests().get(self.message_id)
        _check(request is not None and request.n == n, "regenerate request not readable")


@dataclass(frozen=True)
class ClearRegeneration:
    message_id: str

    def apply(self, conversation: Conversation) -> None:
        conversation.clear_regeneration(self.message_id)
        _check(self.message_id not in conversation.regenerate_requests(), "request survived")


# -- foreign writes: what any peer can put into a CRDT ------------------------------------


@dataclass(frozen=True)
class ForeignMessage:
    """Append a raw item to `canonical.messages`, bypassing validation.

    `fields` is a JSON object written as a Map (with its `content` as a Text when
    `content_as_text`), or any other JSON value appended as it is.
    """

    fields: JSON
    content_as_text: bool = True

    def apply(self, conversation: Conversation) -> None:
        if isinstance(self.fields, dict):
            values = dict(self.fields)
            if self.content_as_text and isinstance(values.get("content"), str):
                values["content"] = Text(values["content"])
            conversation.messages.append(Map(values))
        else:
            conversation.messages.append(self.fields)
        _check_all_items_read(conversation)


@dataclass(frozen=True)
class ForeignMessageAt:
    """Insert a message Map at `position` of `canonical.messages`, bypassing validation: a
    message reusing an id that is already taken, anywhere (design §7.2).

    The relay refuses such a message from its own peers; a document from elsewhere may still
    hold one, and readers keep the first of an id in document order.
    """

    position: int
    fields: dict[str, JSON]

    def apply(self, conversation: Conversation) -> None:
        values = dict(self.fields)
        values["content"] = Text(str(values.get("content", "")))
        conversation.messages.insert(self.position, Map(values))
        _check_all_items_read(conversation)


@dataclass(frozen=True)
class ForeignDeleteMessage:
    """Delete the item at `position` of `canonical.messages` (outside the contract: §4)."""

    position: int

    def apply(self, conversation: Conversation) -> None:
        del conversation.messages[self.position]
        _check_all_items_read(conversation)


@dataclass(frozen=True)
class ForeignMapWrite:
    """Write any JSON value under `key` of the Map root `root`, or delete the key."""

    root: str
    key: str
    value: JSON = None
    delete: bool = False

    def apply(self, conversation: Conversation) -> None:
        target = conversation.doc.get(self.root, type=Map)
        if self.delete:
            target.pop(self.key, None)
        else:
            target[self.key] = self.value


@dataclass(frozen=True)
class ForeignNesting:
    """Hang shared types nested `depth` deep (Maps, with Arrays every other level when
    `arrays`) under `key` of the Map root `target`, or, with `target` "message", under `key`
    of a new, otherwise valid message `message_id`.

    Readers bound how deep they read (design §7.1, `crdtchat.shape.MAX_READ_DEPTH`): past
    it the value is reported and skipped, identically on every replica, and never crashes.
    """

    target: str
    key: str
    depth: int
    arrays: bool = False
    message_id: str = "deep"

    def apply(self, conversation: Conversation) -> None:
        with conversation.doc.transaction():
            top: Map = Map()
            if self.target == "message":
                message = Map(
                    {
                        "id": self.message_id,
                        "role": "user",
                        "author": conversation.author,
                        "parent": None,
                        "created_at": 0.0,
                        "content": Text("deep"),
                    }
                )
                conversation.messages.append(message)
                message[self.key] = top
            else:
                conversation.doc.get(self.target, type=Map)[self.key] = top
            current: Map | Array = top
            for level in range(1, self.depth):
                inner: Map | Array = Array() if self.arrays and level % 2 else Map()
                if isinstance(current, Map):
                    current["k"] = inner
                else:
                    current.append(inner)
                current = inner
        _check_all_items_read(conversation)
