"""`Conversation`: one conversation as a Yjs document with the roots of design §2.

Every write goes through the pycrdt document so that a local write and a remote update take
the same path into the materialised view. Reads validate what they find: any peer can write
anything into a CRDT, so a bad value is reported and skipped, never trusted.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pycrdt import Array, Doc, Map, Subscription, Text
from pydantic import BaseModel, ValidationError

from crdtchat import rights, schema
from crdtchat.early import EarlyUpdates
from crdtchat.errors import ConversationError
from crdtchat.lifetime import ClosesOnExit
from crdtchat.merge import merge
from crdtchat.prefix import RunningHashes
from crdtchat.pycrdt_internals import in_transaction, subscriptions
from crdtchat.rights import LocalWrite, PeerRole
from crdtchat.schema import (
    CancelRequest,
    DerivedEntry,
    DerivedKind,
    FileRef,
    Lease,
    Message,
    Meta,
    ModelRef,
    Problem,
    RegenerateRequest,
    Role,
    Settings,
    Status,
    ToolCall,
    ToolSpec,
    assistant_turn_id,
    message_id_refusal,
)
from crdtchat.shape import read_map
from crdtchat.updates import UpdateFormatError, check_update
from crdtchat.view import MessageView

Clock = Callable[[], float]
ModelT = TypeVar("ModelT", bound=BaseModel)


class _FollowCurrentThread:
    """Default parent: the end of the current thread."""


FOLLOW_CURRENT = _FollowCurrentThread()


@dataclass(frozen=True)
class Waiting:
    """A message waiting for a reply, and the answer number the reply will carry."""

    message: Message
    answer_number: int

    @property
    def turn_id(self) -> str:
        return assistant_turn_id(self.message.id, self.answer_number)


def new_doc() -> Doc:
    """A Doc with a random 32-bit client id, as Yjs picks them.

    yrs picks 53-bit ids, and every item of an update names its parent by (client, clock):
    a 32-bit id takes 5 bytes instead of 7 each time, which is about 16 bytes of every
    appended message's update, a tenth of a short chat line's.
    """
    return Doc(client_id=random.getrandbits(32))


def _new_id() -> str:
    return uuid.uuid4().hex


def _utf8_offset(text: str, index: int) -> int:
    """pycrdt (yrs) counts UTF-8 bytes; callers count code points."""
    return len(text[:index].encode())


class Conversation(ClosesOnExit):
    """A conversation document, as written and read by one peer (`author`).

    `author` is the subject of the token this peer writes with (design §4): the relay refuses
    writes in anyone else's name, so the document fills `author` in itself.

    `close()` it (or use `with`) when done: observers live on the native side of pycrdt, out of
    reach of Python's cycle collector, and only dropping them frees what they refer to.
    """

    def __init__(
        self,
        doc: Doc | None = None,
        *,
        author: str,
        clock: Clock = time.time,
        role: PeerRole | None = None,
        shape_checked: bool = False,
        _items: list[Any] | None = None,
    ) -> None:
        """`shape_checked`: the caller knows `doc` holds no value nested too deeply to read
        (design §7.1), so the messages are read in one go without checking first."""
        self.doc = doc if doc is not None else new_doc()
        self.author = author
        self.role = role
        self.clock = clock
        get_map = self._root_map
        self.meta = get_map(schema.META)
        self.settings_map = get_map(schema.SETTINGS)
        self.tools_map = get_map(schema.TOOLS)
        self.messages = self.doc.get(schema.MESSAGES, type=Array)
        self.derived = get_map(schema.DERIVED)
        self.leases = get_map(schema.LEASES)
        self.streams = get_map(schema.STREAMS)
        self.cancels = get_map(schema.CANCEL)
        self.regenerations = get_map(schema.REGENERATE)
        self.drafts = get_map(schema.DRAFTS)
        self.read_marks = get_map(schema.READ)
        self.view = MessageView(self.messages, items=_items, shape_checked=shape_checked)
        self._running_hashes = RunningHashes()
        # Messages appended inside a transaction that is still open: the view sees them only
        # when it commits, but later appends in the same transaction may follow them.
        self._uncommitted: dict[str, Message] = {}
        self.view.on_change(self._uncommitted.clear)
        self.early = EarlyUpdates()  # updates waiting for what they build on
        self._update_subscriptions: list[Subscription] = []

    def close(self) -> None:
        """Drop every subscription made through this conversation (idempotent).

        That is the view's, `on_update`'s and any made on its roots (`conversation.leases
        .observe(...)`): their callbacks usually refer back to their owner, and yrs holding
        them keeps owner, document and view alive otherwise. The document itself stays usable
        (it may be shared, e.g. with a `Replica`); this object's view no longer follows it.
        """
        self.view.close()
        held = subscriptions(self.doc)
        for subscription in self._update_subscriptions:
            if subscription in held:
                self.doc.unobserve(subscription)
        self._update_subscriptions.clear()
        for root in self._roots():
            for subscription in subscriptions(root):
                root.unobserve(subscription)

    def _roots(self) -> tuple[Map | Array, ...]:
        return (
            self.meta,
            self.settings_map,
            self.tools_map,
            self.messages,
            self.derived,
            self.leases,
            self.streams,
            self.cancels,
            self.regenerations,
            self.drafts,
            self.read_marks,
        )

    def _require(self, write: LocalWrite) -> None:
        """Refuse a write the relay would refuse from this peer's role (design §4): it would
        stay in this replica and block the writes built on it. No check when the role is
        unknown."""
        if self.role is not None:
            reason = rights.local_refusal(self.role, write)
            if reason is not None:
                raise ConversationError(reason)

    def _root_map(self, name: str) -> Map:
        return self.doc.get(name, type=Map)

    # -- creating, opening, exchanging ---------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        author: str,
        title: str | None = None,
        clock: Clock = time.time,
        role: PeerRole | None = None,
    ) -> Conversation:
        """A new conversation with its `canonical.meta` filled in."""
        conversation = cls(author=author, clock=clock, role=role)
        conversation._require(rights.SET_META)
        with conversation.doc.transaction():
            conversation.meta["schema"] = schema.SCHEMA_VERSION
            conversation.meta["created_at"] = clock()
            if title is not None:
                conversation.meta["title"] = title
        return conversation

    @classmethod
    def from_update(
        cls,
        update: bytes,
        *,
        author: str,
        clock: Clock = time.time,
        role: PeerRole | None = None,
    ) -> Conversation:
        """Open a conversation from update bytes (a saved state is one update)."""
        doc = new_doc()
        # The messages arrive as one array event: its delta lists them all, which is how the
        # view checks their shape without reading items one by one (`view.open_entries`).
        items: list[Any] = []

        def collect(event: Any) -> None:
            for op in event.delta:  # raw values: see `crdtchat.shape.check_items`
                items.extend(op.get("insert", ()))

        try:  # never applied unchecked: a JSON value nested too deep crashes pycrdt (§7.1)
            check_update(update)
        except UpdateFormatError as error:
            raise ConversationError(f"not a Yjs update that can be read safely: {error}") from None
        subscription = doc.get(schema.MESSAGES, type=Array).integrated.observe(collect)
        try:
            doc.apply_update(update)
        except ValueError as error:
            raise ConversationError(f"not a Yjs update: {error}") from error
        except RuntimeError as error:
            raise ConversationError(f"a malformed Yjs update: {error}") from error
        finally:
            subscription.drop()
        return cls(doc, author=author, clock=clock, role=role, _items=items)

    def encode_state(self) -> bytes:
        """The whole document as one update: save it, or send it to a new peer."""
        return self.doc.get_update()

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes) -> bytes:
        """What a peer with `state_vector` is missing, with the updates held here (as Yjs
        sends its pending structs too: the peer may have what they wait for)."""
        update = self.doc.get_update(state_vector)
        if self.early:
            return merge(update, *self.early.held)
        return update

    def apply_update(self, update: bytes, *, origin: Any = None) -> None:
        """Merge a peer's update, or hold it until what it builds on has arrived (as Yjs does;
        see `crdtchat.early`). Held updates are in `early`.

        Bytes that do not decode are refused before anything changes. An update that decodes
        but cannot be integrated (an item whose parent is not a shared type) is refused too,
        but yrs may already have integrated the well-formed items before it: nothing that
        was here is lost, and the view shows what was merged, validated as always.
        """

        def apply(data: bytes) -> None:
            with self.doc.transaction(origin=origin):
                self.doc.apply_update(data)

        try:
            self.early.offer(update, self.doc.get_state, apply)
        except ValueError as error:
            raise ConversationError(f"not a Yjs update: {error}") from error
        except RuntimeError as error:
            raise ConversationError(f"a malformed Yjs update: {error}") from error

    def on_update(self, callback: Callable[[bytes], None]) -> Subscription:
        """Call `callback` with the update bytes of every transaction, local or remote."""
        subscription = self.doc.observe(lambda event: callback(event.update))
        self._update_subscriptions.append(subscription)
        return subscription

    def on_messages_change(self, callback: Callable[[], None]) -> None:
        self.view.on_change(callback)

    # -- canonical: settings, tools, meta ------------------------------------------------

    @property
    def settings(self) -> Settings:
        raw = read_map(self.settings_map)[0]  # too deep to read: skipped (problems())
        try:
            return Settings.model_validate(raw)
        except ValidationError:
            # keep whichever keys are valid; a broken `params` must not hide the system prompt
            good = {}
            for key, value in raw.items():
                try:
                    Settings.model_validate({key: value})
                except ValidationError:
                    continue
                good[key] = value
            return Settings.model_validate(good)

    def set_settings(
        self,
        *,
        system: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self._require(rights.SET_SETTINGS)
        if params is not None:
            json.dumps(params)  # refuse what cannot travel as JSON, before writing anything
        with self.doc.transaction():
            for key, value in (("system", system), ("provider", provider), ("model", model)):
                if value is not None:
                    self.settings_map[key] = value
            if params is not None:
                self.settings_map["params"] = dict(params)

    @property
    def tools(self) -> dict[str, ToolSpec]:
        tools = {}
        for name, raw in self.tools_raw().items():
            try:
                tools[name] = ToolSpec.model_validate(raw)
            except ValidationError:
                continue
        return tools

    def tools_raw(self) -> dict[str, Any]:
        """`canonical.tools` as stored: this is what the prefix hash covers."""
        return read_map(self.tools_map)[0]  # too deep to read: skipped (problems())

    def set_tool(self, name: str, description: str, parameters: Mapping[str, Any]) -> None:
        self._require(rights.SET_TOOLS)
        spec = ToolSpec(description=description, parameters=dict(parameters))
        self.tools_map[name] = spec.model_dump()

    def remove_tool(self, name: str) -> None:
        self._require(rights.SET_TOOLS)
        self.tools_map.pop(name, None)

    @property
    def title(self) -> str | None:
        value = self.meta.get("title")
        return value if isinstance(value, str) else None

    def set_title(self, title: str) -> None:
        self._require(rights.SET_META)
        self.meta["title"] = title

    # -- canonical: messages -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.view)

    def message(self, message_id: str) -> Message:
        message = self.view.get(message_id)
        if message is None:
            raise KeyError(f"no message {message_id!r}")
        return message

    def all_messages(self) -> list[Message]:
        """Every accepted message, in document order."""
        return list(self.view)

    def problems(self) -> list[Problem]:
        """What readers skip, and why, in every root (design §2: reported, never a crash)."""
        found = self.view.problems()
        for name, model in (
            (schema.DERIVED, DerivedEntry),
            (schema.LEASES, Lease),
            (schema.CANCEL, CancelRequest),
            (schema.REGENERATE, RegenerateRequest),
            (schema.TOOLS, ToolSpec),
        ):
            values, too_deep = read_map(self._root_map(name))
            found.extend(Problem(root=name, key=k, reason=r) for k, r in too_deep.items())
            for key, raw in values.items():
                reason = _invalid_reason(model, raw)
                if reason is not None:
                    found.append(Problem(root=name, key=key, reason=reason))
        for name, model in ((schema.SETTINGS, Settings), (schema.META, Meta)):
            values, too_deep = read_map(self._root_map(name))
            found.extend(Problem(root=name, key=k, reason=r) for k, r in too_deep.items())
            for key, value in values.items():
                reason = _invalid_reason(model, {key: value})
                if reason is not None:
                    found.append(Problem(root=name, key=key, reason=reason))
        for turn_id in list(self.streams.keys()):
            if self.stream_text(turn_id) is None:
                reason = "a stream is a Map with a Text under 'text'"
                found.append(Problem(root=schema.STREAMS, key=turn_id, reason=reason))
        for author in list(self.drafts.keys()):
            if not isinstance(self.drafts.get(author), Text):
                found.append(Problem(root=schema.DRAFTS, key=author, reason="a draft is a Text"))
        marks, too_deep = read_map(self.read_marks)
        found.extend(Problem(root=schema.READ, key=k, reason=r) for k, r in too_deep.items())
        for peer, value in marks.items():
            if not isinstance(value, str):
                reason = "a read mark is a message id"
                found.append(Problem(root=schema.READ, key=peer, reason=reason))
        return found

    def append(
        self,
        role: Role,
        content: str,
        *,
        parent: str | _FollowCurrentThread | None = FOLLOW_CURRENT,
        message_id: str | None = None,
        tool_calls: Sequence[ToolCall] | None = None,
        tool_call_id: str | None = None,
        files: Sequence[FileRef] | None = None,
        model: ModelRef | None = None,
        status: Status | None = None,
        error: str | None = None,
    ) -> Message:
        """Append a message; by default it follows the end of the current thread."""
        self._require(rights.append_message(role))
        if isinstance(parent, _FollowCurrentThread):
            last = self._last()
            parent = None if last is None else last.id
        message = self._checked_message(
            id=_new_id() if message_id is None else message_id,
            role=role,
            author=self.author,
            parent=parent,
            created_at=self.clock(),
            content=content,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
            files=files,
            model=model,
            status=status,
            error=error,
        )
        self._write_message(message)
        return message

    def append_message(self, message: Message) -> None:
        """Append an already validated message as it is, author included (for imports).

        A peer that knows its role writes only in its own name: the relay refuses a message
        authored by anyone but the writer's subject (design §4)."""
        self._require(rights.append_message(message.role))
        if self.role is not None and message.author != self.author:
            raise ConversationError(
                f"a {self.role} writes messages as {self.author!r}, not as {message.author!r}"
            )
        self._check_id(message)
        self._write_message(message)

    def _write_message(self, message: Message, *, alone: bool | None = None) -> None:
        """Append one message's Map.

        `alone`: no other change of the messages array is in this transaction (by default:
        no transaction is open yet, so the one opened here holds only this append). The view
        then takes the message as validated here, which saves yrs walking the whole array to
        compute the event's delta, and re-reading and re-validating the Map.
        """
        if alone is None:
            alone = not in_transaction(self.doc)
        self._uncommitted[message.id] = message
        try:
            with self.doc.transaction():
                if alone:
                    self.view.expect_append([message])
                self.messages.append(self._message_map(message, Text(message.content)))
        except BaseException:
            self._uncommitted.pop(message.id, None)
            raise
        finally:
            self.view.forget_expected()

    def _check_id(self, message: Message) -> None:
        """Refuse an id the relay would refuse (design §7.2): a write the relay refuses would
        block this replica's later writes, which build on it.

        Stricter than the relay in one way: no id held here is reused at all, not even for
        the same assistant turn (a worker that sees the turn committed has nothing to add).
        """
        taken = self.view.claimed(message.id) or self._uncommitted.get(message.id)
        if taken is not None:
            raise ConversationError(f"a message {message.id!r} exists already")
        reason = message_id_refusal(message.id, message.role, message.parent, None)
        if reason is not None:
            raise ConversationError(reason)

    def _lookup(self, message_id: str) -> Message | None:
        """An accepted message, or one appended earlier in the transaction still open."""
        message = self.view.get(message_id)
        return message if message is not None else self._uncommitted.get(message_id)

    def _last(self) -> Message | None:
        if self._uncommitted:
            return next(reversed(self._uncommitted.values()))
        return self.view.last()

    def _checked_message(self, **fields: Any) -> Message:
        try:
            message = Message.model_validate(fields)
        except ValidationError as error:
            raise ConversationError(str(error)) from error
        if message.parent is not None and self._lookup(message.parent) is None:
            raise ConversationError(f"parent {message.parent!r} is not a message here")
        self._check_id(message)
        if message.role == "assistant":
            if message.tool_call_id is not None:
                raise ConversationError("an assistant message carries no tool_call_id")
        else:
            if message.tool_calls is not None or message.model is not None:
                raise ConversationError("only assistant messages carry tool_calls and model")
            if message.status is not None:
                raise ConversationError("only assistant messages carry a status")
        if message.role == "tool" and not message.tool_call_id:
            raise ConversationError("a tool message needs the tool_call_id it answers")
        return message

    @staticmethod
    def _message_map(message: Message, content: Text) -> Map:
        fields: dict[str, Any] = {
            "id": message.id,
            "role": message.role,
            "author": message.author,
            "parent": message.parent,
            "created_at": message.created_at,
            "content": content,
        }
        optional = {
            "tool_calls": (
                None
                if message.tool_calls is None
                else [call.model_dump() for call in message.tool_calls]
            ),
            "tool_call_id": message.tool_call_id,
            "files": None if message.files is None else [f.model_dump() for f in message.files],
            "model": None if message.model is None else message.model.model_dump(),
            "status": message.status,
            "error": message.error,
        }
        fields.update((key, value) for key, value in optional.items() if value is not None)
        return Map(fields)

    def _content_text(self, message_id: str) -> Text:
        self._require(rights.EDIT_TEXT)
        message = self.message(message_id)
        if message.author != self.author:
            raise ConversationError(
                f"message {message_id!r} is {message.author!r}'s; only its author edits it"
            )
        item = self.messages[self.view.position(message_id)]
        content = item.get("content")
        if not isinstance(content, Text):
            raise ConversationError(f"message {message_id!r} has no editable text")
        return content

    def edit_text(self, message_id: str, new_text: str) -> None:
        """Replace a message's text by the smallest edit, so concurrent edits merge."""
        self._replace_text(self._content_text(message_id), new_text)

    def _replace_text(self, text: Text, new_text: str) -> None:
        """Turn `text` into `new_text` by replacing only what differs between them."""
        old = str(text)
        start = 0
        limit = min(len(old), len(new_text))
        while start < limit and old[start] == new_text[start]:
            start += 1
        end_old, end_new = len(old), len(new_text)
        while end_old > start and end_new > start and old[end_old - 1] == new_text[end_new - 1]:
            end_old -= 1
            end_new -= 1
        with self.doc.transaction():
            self._splice(text, old, start, end_old - start, new_text[start:end_new])

    def insert_text(self, message_id: str, index: int, value: str) -> None:
        """Insert at a code-point index of the message's text."""
        text = self._content_text(message_id)
        old = str(text)
        if not 0 <= index <= len(old):
            raise ConversationError(f"index {index} outside the text (length {len(old)})")
        self._splice(text, old, index, 0, value)

    def delete_text(self, message_id: str, index: int, length: int) -> None:
        """Delete `length` code points from `index` of the message's text."""
        text = self._content_text(message_id)
        old = str(text)
        if index < 0 or length < 0 or index + length > len(old):
            raise ConversationError(f"range {index}+{length} outside the text")
        self._splice(text, old, index, length, "")

    @staticmethod
    def _splice(text: Text, old: str, index: int, length: int, value: str) -> None:
        start = _utf8_offset(old, index)
        if length:
            del text[start : start + len(old[index : index + length].encode())]
        if value:
            text.insert(start, value)

    # -- threads ---------------------------------------------------------------------------

    def thread(self, leaf_id: str) -> list[Message]:
        """The path from the root to `leaf_id`, inclusive."""
        return self.view.thread(leaf_id)

    def current_thread(self) -> list[Message]:
        """The thread ending at the last leaf in document order (design §2).

        Parents always precede their children in document order, so the last accepted
        message is that leaf.
        """
        last = self.view.last()
        return [] if last is None else self.view.thread(last.id)

    def children(self, message_id: str) -> list[Message]:
        return self.view.children(message_id)

    def leaves(self) -> list[Message]:
        """Messages with no children, in document order."""
        return [self.message(message_id) for message_id in self.view.index.leaves]

    def assistant_answers(self, message_id: str) -> list[Message]:
        return [m for m in self.view.children(message_id) if m.role == "assistant"]

    def waiting_for_reply(self) -> list[Waiting]:
        """Messages a worker should answer now, in document order (design §2)."""
        waiting: list[Waiting] = []
        for leaf_id in self.view.index.leaves:
            message = self.message(leaf_id)
            if message.role == "user" or (
                message.role == "tool" and self._tool_results_complete(message)
            ):
                waiting.append(Waiting(message, self._free_answer_number(message.id, 1)))
        already = {w.message.id for w in waiting}
        for message_id, request in self.regenerate_requests().items():
            message = self.view.get(message_id)
            if message is None or message.role not in ("user", "tool") or message_id in already:
                continue
            answers = len(self.assistant_answers(message_id))
            if request.n > answers:
                waiting.append(Waiting(message, self._free_answer_number(message_id, answers + 1)))
        position = self.view.index.position_of
        waiting.sort(key=lambda w: position[w.message.id])
        return waiting

    def _free_answer_number(self, message_id: str, number: int) -> int:
        """`number`, or the next one whose turn id no message has taken yet.

        Any peer may have written a message with the id the next answer would get (before the
        relay refused that, or through another relay); a worker must not then be stuck
        committing a turn id that exists, shown or not (design §7.2). Every replica skips the
        same ids, so workers still agree on the turn id.
        """
        while self.view.claimed(assistant_turn_id(message_id, number)) is not None:
            number += 1
        return number

    def _tool_results_complete(self, tool_message: Message) -> bool:
        """Every call of the assistant message before it has its result on this path."""
        answered: set[str] = set()
        message: Message | None = tool_message
        while message is not None and message.role == "tool":
            if message.tool_call_id is not None:
                answered.add(message.tool_call_id)
            message = None if message.parent is None else self.view.get(message.parent)
        if message is None or message.role != "assistant" or not message.tool_calls:
            return True  # a tool result with no open call still asks for a reply
        return {call.id for call in message.tool_calls} <= answered

    def regenerate_requests(self) -> dict[str, RegenerateRequest]:
        return _valid_entries(self.regenerations, RegenerateRequest)

    def request_regeneration(self, message_id: str) -> int:
        """Ask for one more answer to `message_id`; returns the answer number asked for."""
        self._require(rights.REQUEST_REGENERATION)
        message = self.message(message_id)
        if message.role not in ("user", "tool"):
            raise ConversationError("only user and tool messages are answered")
        current = self.regenerate_requests().get(message_id)
        answers = len(self.assistant_answers(message_id))
        n = max(answers, current.n if current else 0) + 1
        self.regenerations[message_id] = {"n": n, "by": self.author, "at": self.clock()}
        return n

    def clear_regeneration(self, message_id: str) -> None:
        self._require(rights.CLEAR_REGENERATION)
        self.regenerations.pop(message_id, None)

    # -- prefix hashes and derived state -------------------------------------------------

    def prefix_hashes(self, thread: Sequence[Message]) -> list[str]:
        return self._running_hashes.prefix_hashes(self.settings.system, self.tools_raw(), thread)

    def prefix_hash(self, message_id: str) -> str:
        return self.prefix_hash_of(self.thread(message_id))

    def prefix_hash_of(self, thread: Sequence[Message]) -> str:
        """The prefix hash of the last message of `thread`."""
        return self._running_hashes.prefix_hash(self.settings.system, self.tools_raw(), thread)

    def put_derived(self, entry: DerivedEntry) -> str:
        self._require(rights.PUT_DERIVED)
        key = derived_key(entry)
        self.derived[key] = entry.model_dump(mode="json")
        return key

    def derived_entries(self) -> dict[str, DerivedEntry]:
        """Every well-formed derived entry, usable or not."""
        return _valid_entries(self.derived, DerivedEntry)

    def usable_derived(
        self,
        thread: Sequence[Message],
        *,
        provider: str,
        api: str,
        model: str,
        kinds: Iterable[DerivedKind] | None = None,
        now: float | None = None,
    ) -> tuple[dict[str, DerivedEntry], list[str]]:
        """Entries for messages of `thread` that pass the three rules of design §2.

        Returns (usable entries by key, keys of entries for this thread that failed a rule and
        should be deleted by the worker).
        """
        now = self.clock() if now is None else now
        wanted = None if kinds is None else set(kinds)
        hashes = dict(zip((m.id for m in thread), self.prefix_hashes(thread), strict=True))
        usable: dict[str, DerivedEntry] = {}
        stale: list[str] = []
        for key, entry in self.derived_entries().items():
            if entry.message_id not in hashes or (wanted and entry.kind not in wanted):
                continue
            if wanted is None and entry.kind in ("usage", "title", "summary"):
                continue  # records, not state to reuse, unless asked for by kind
            if (
                entry.prefix_hash == hashes[entry.message_id]
                and (entry.provider, entry.api, entry.model) == (provider, api, model)
                and (entry.expires_at is None or entry.expires_at > now)
            ):
                usable[key] = entry
            elif entry.prefix_hash != hashes[entry.message_id] or (
                entry.expires_at is not None and entry.expires_at <= now
            ):
                stale.append(key)  # another provider's entries stay: a switch back may use them
        return usable, stale

    def discard_derived(self, key: str) -> None:
        self._require(rights.DISCARD_DERIVED)
        self.derived.pop(key, None)

    def discard_derived_kind(self, kind: DerivedKind) -> None:
        self._require(rights.DISCARD_DERIVED)
        with self.doc.transaction():
            for key, entry in self.derived_entries().items():
                if entry.kind == kind:
                    del self.derived[key]

    def discard_all_derived(self) -> None:
        self._require(rights.DISCARD_DERIVED)
        with self.doc.transaction():
            for key in list(self.derived.keys()):
                del self.derived[key]

    # -- transport: leases ---------------------------------------------------------------

    def lease(self, message_id: str) -> Lease | None:
        return _valid_entries(self.leases, Lease).get(message_id)

    def claim_lease(self, message_id: str, turn_id: str, *, holder: str, ttl: float) -> bool:
        """Take the lease on answering `message_id` if it is free, expired or already ours.

        Two workers may both succeed before they sync; the deterministic turn id and the
        first-id-wins rule keep the reply single anyway.
        """
        self._require(rights.WRITE_LEASES)
        current = self.lease(message_id)
        now = self.clock()
        if current is not None and current.holder != holder and current.expires_at > now:
            return False
        self.leases[message_id] = {"holder": holder, "turn_id": turn_id, "expires_at": now + ttl}
        return True

    def renew_lease(self, message_id: str, *, holder: str, ttl: float) -> bool:
        self._require(rights.WRITE_LEASES)
        current = self.lease(message_id)
        if current is None or current.holder != holder:
            return False
        self.leases[message_id] = {
            "holder": holder,
            "turn_id": current.turn_id,
            "expires_at": self.clock() + ttl,
        }
        return True

    def release_lease(self, message_id: str, *, holder: str) -> None:
        self._require(rights.WRITE_LEASES)
        current = self.lease(message_id)
        if current is not None and current.holder == holder:
            del self.leases[message_id]

    # -- transport: streams --------------------------------------------------------------

    def start_stream(self, turn_id: str, *, parent: str) -> None:
        self._require(rights.WRITE_STREAMS)
        self.streams[turn_id] = Map({"parent": parent, "holder": self.author, "text": Text()})

    def append_stream(self, turn_id: str, text: str) -> None:
        self._require(rights.WRITE_STREAMS)
        with self.doc.transaction():  # one for the look-up and the append
            stream_text = self._stream_text(turn_id)
            stream_text += text

    def reset_stream(self, turn_id: str) -> None:
        self._require(rights.WRITE_STREAMS)
        self._stream_text(turn_id).clear()

    def stream_text(self, turn_id: str) -> str | None:
        stream = self.streams.get(turn_id)
        if not isinstance(stream, Map):
            return None
        text = stream.get("text")
        return str(text) if isinstance(text, Text) else None

    def streams_in_flight(self) -> dict[str, str]:
        """turn id → text streamed so far, for every well-formed stream."""
        result = {}
        for turn_id in list(self.streams.keys()):
            text = self.stream_text(turn_id)
            if text is not None:
                result[turn_id] = text
        return result

    def _stream_text(self, turn_id: str) -> Text:
        # Runs on every flush of every streamed reply: indexing in one transaction, where
        # Map.get opens a transaction of its own and looks the key up twice.
        with self.doc.transaction():
            try:
                stream = self.streams[turn_id]
                text = stream["text"] if isinstance(stream, Map) else None
            except KeyError:
                text = None
        if not isinstance(text, Text):
            raise ConversationError(f"no stream {turn_id!r}")
        return text

    def commit_turn(
        self,
        answered_id: str,
        turn_id: str,
        *,
        model: ModelRef,
        status: Status,
        content: str | None = None,
        tool_calls: Sequence[ToolCall] | None = None,
        error: str | None = None,
        derived: Iterable[tuple[DerivedKind, Mapping[str, Any], float | None]] = (),
    ) -> Message:
        """Append the assistant turn, drop its stream and lease, record derived state.

        One transaction, so peers see the streamed text turn into a message atomically.
        `content` defaults to the streamed text. Derived entries are keyed to the new message.
        """
        self._require(rights.append_message("assistant"))
        entries = list(derived)
        if content is None:
            content = self.stream_text(turn_id) or ""
        message = self._checked_message(
            id=turn_id,
            role="assistant",
            author=self.author,
            parent=answered_id,
            created_at=self.clock(),
            content=content,
            tool_calls=tool_calls,
            model=model,
            status=status,
            error=error,
        )
        thread = [*self.thread(answered_id), message]
        hash_of_turn = self.prefix_hash_of(thread)
        answers_after = len(self.assistant_answers(answered_id)) + 1
        lease = self.lease(answered_id)
        drop_lease = lease is not None and lease.holder == self.author
        request = self.regenerate_requests().get(answered_id)
        drop_request = request is not None and request.n <= answers_after
        # Every root this commit changes, checked before any of it is written: a transaction
        # is not rolled back when it raises.
        for write, needed in (
            (rights.WRITE_STREAMS, turn_id in self.streams),
            (rights.WRITE_LEASES, drop_lease),
            (rights.CLEAR_CANCEL, turn_id in self.cancels),
            (rights.CLEAR_REGENERATION, drop_request),
            (rights.PUT_DERIVED, bool(entries)),
        ):
            if needed:
                self._require(write)
        alone = not in_transaction(self.doc)
        with self.doc.transaction():
            self._write_message(message, alone=alone)
            self.streams.pop(turn_id, None)
            if drop_lease:
                del self.leases[answered_id]
            self.cancels.pop(turn_id, None)
            if drop_request:
                del self.regenerations[answered_id]
            for kind, data, expires_at in entries:
                self.put_derived(
                    DerivedEntry(
                        kind=kind,
                        message_id=message.id,
                        prefix_hash=hash_of_turn,
                        provider=model.provider,
                        api=model.api,
                        model=model.model,
                        data=dict(data),
                        created_at=self.clock(),
                        expires_at=expires_at,
                        producer=self.author,
                    )
                )
        return message

    # -- transport: cancel, drafts, read marks -------------------------------------------

    def request_cancel(self, turn_id: str) -> None:
        self._require(rights.REQUEST_CANCEL)
        self.cancels[turn_id] = {"by": self.author, "at": self.clock()}

    def cancel_requested(self, turn_id: str) -> bool:
        return turn_id in _valid_entries(self.cancels, CancelRequest)

    def set_draft(self, text: str) -> None:
        """Replace this author's composer text by the smallest edit."""
        self._require(rights.SET_DRAFT)
        draft = self.drafts.get(self.author)
        if not isinstance(draft, Text):
            self.drafts[self.author] = Text(text)
            return
        self._replace_text(draft, text)

    def draft(self, author: str | None = None) -> str:
        draft = self.drafts.get(author or self.author)
        return str(draft) if isinstance(draft, Text) else ""

    def mark_read(self, message_id: str) -> None:
        """Record that this author has been shown `message_id`.

        Keyed by the author (the token's subject), shared by that person's devices: the relay
        refuses a read mark under any other key (design §7.2).
        """
        self._require(rights.MARK_READ)
        self.read_marks[self.author] = message_id

    def read_mark(self, subject: str | None = None) -> str | None:
        """The last message `subject` (default: this author) has been shown."""
        value = self.read_marks.get(self.author if subject is None else subject)
        return value if isinstance(value, str) else None


def derived_key(entry: DerivedEntry) -> str:
    """One entry per kind, message and model: a newer one replaces an older one."""
    return f"{entry.kind}:{entry.message_id}:{entry.provider}:{entry.api}:{entry.model}"


def _invalid_reason(model: type[BaseModel], raw: Any) -> str | None:
    try:
        model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        return f"invalid {where}: {first['msg']}"
    return None


def _valid_entries(root: Map, model: type[ModelT]) -> dict[str, ModelT]:
    """The entries of a JSON-valued root map that validate; the rest are skipped."""
    result: dict[str, ModelT] = {}
    for key, raw in read_map(root)[0].items():  # too deep to read: skipped (problems())
        try:
            result[key] = model.model_validate(raw)
        except ValidationError:
            continue
    return result
