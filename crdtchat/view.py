"""A materialised, validated view of `canonical.messages`, kept up to date from change events.

Reading a 10,000-message Array of Maps item by item from Python costs seconds, while one
Rust-side JSON serialisation costs tens of milliseconds. So the view reads the whole array
once, as JSON, validates it in one pydantic call, and from then on reads only what the deep
events say has changed: inserted items, deleted ranges and the one message whose text or keys
moved.

On top of the parsed entries sits the thread index (accepted messages, ids, children). The
common case, an append at the end, extends it in place; anything else (a concurrent insert
in the middle, a delete, a change of an id or parent) rebuilds it lazily on the next read.

Cost of an append. yrs computes an array event's delta by walking the whole array, which at
10,000 messages costs as much as the append itself. pycrdt's `observe_deep` computes every
attribute of every event up front, so the view subscribes one level lower and asks for the
delta only when it needs it: a local append made in a transaction of its own (the caller says
so with `expect_append`) already knows what it inserted and where. This uses two pycrdt
internals, its read transaction for observers and its wrapping of raw values, exactly as
pycrdt's own deep observer does (`crdtchat.pycrdt_internals`; pycrdt is pinned below 0.15).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from crdtchat.errors import StorageError
from crdtchat.lifetime import weak_method
from crdtchat.pycrdt_internals import read_transaction, report_to_commit, wrap
from crdtchat.schema import MESSAGES, Message, Problem
from crdtchat.shape import TooDeep, check_items, items_of, read_json

log = logging.getLogger(__name__)

_MESSAGE_LIST = TypeAdapter(list[Message])
SNAPSHOT_TAIL = 200  # messages of the current thread a view snapshot keeps: a few screens


@dataclass(slots=True)
class Entry:
    """One item of the array: the message it holds, or why it holds none."""

    message: Message | None
    problem: str | None = None


def parse_entry(raw: Any) -> Entry:
    try:
        return Entry(Message.model_validate(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        return Entry(None, f"invalid {where}: {first['msg']}")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building thousands of objects at once.

    Allocating them triggers collections that walk every tracked object in the process,
    and none of the new ones can be garbage yet: about a tenth of opening a document.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_all(array_json: str) -> list[Entry]:
    """Every item of the array's JSON, validated; one pydantic call when all are valid."""
    with collector_paused():
        try:
            return [Entry(message) for message in _MESSAGE_LIST.validate_json(array_json)]
        except ValidationError:
            # Some foreign peer wrote something bad: validate item by item to keep the rest.
            return [parse_entry(raw) for raw in json.loads(array_json)]


def read_item(item: Any) -> Any:
    """The JSON value of one array item, as `str(array)` would render it; TooDeep for one
    nested too deeply to read (`crdtchat.shape`)."""
    return read_json(item)


def entry_of(item: Any) -> Entry:
    """The entry for one array item, read safely."""
    try:
        return parse_entry(read_item(item))
    except TooDeep as error:
        return Entry(None, str(error))


def open_entries(array: Array, items: list[Any] | None = None) -> list[Entry]:
    """The entries of a populated array, never asking yrs to render a value nested too deeply
    (design §7.1): one `str(array)` when no item holds shared types deeper than a reader's
    bound, else item by item. `items`: the array's items, raw, as the event of their arrival
    listed them, if the caller has them."""
    if len(array) == 0:
        return []
    doc = array.doc
    if items is None or len(items) != len(array):
        items, doc = items_of(array, MESSAGES)  # the items of a scratch copy
    try:
        check_items(items, doc)
    except TooDeep:
        return [entry_of(wrap(item, doc)) for item in items]
    return parse_all(str(array))


@dataclass
class ThreadIndex:
    """Which entries count, and how they link. Positions index `MessageView.entries`."""

    accepted: list[int] = field(default_factory=list)
    position_of: dict[str, int] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)  # only ids that have some
    leaves: dict[str, None] = field(default_factory=dict)  # ordered: document order
    problems: dict[int, str] = field(default_factory=dict)
    # every id any well-formed message carries (first position), accepted or not: a new
    # message may not take one of them (design §7.2), whether or not readers show its holder
    claimed: dict[str, int] = field(default_factory=dict)

    def admit(self, position: int, entry: Entry) -> None:
        """Apply the reader rules of design §2 to the next entry in document order."""
        message = entry.message
        if message is None:
            self.problems[position] = entry.problem or "invalid"
            return
        message_id = message.id
        self.claimed.setdefault(message_id, position)
        if message_id in self.position_of:
            self.problems[position] = f"duplicate id {message_id!r}"
            return
        # A parent must come earlier in document order. Honest peers only ever append after
        # what they have seen, so this holds for them, and it rules out cycles.
        parent = message.parent
        if parent is not None and parent not in self.position_of:
            self.problems[position] = f"dangling parent {parent!r}"
            return
        self.accepted.append(position)
        self.position_of[message_id] = position
        self.leaves[message_id] = None
        if parent is not None:
            siblings = self.children.get(parent)
            if siblings is None:
                self.children[parent] = [message_id]
            else:
                siblings.append(message_id)
            self.leaves.pop(parent, None)

    @classmethod
    def build(cls, entries: Sequence[Entry]) -> ThreadIndex:
        """`admit` every entry in order; the common case inlined, as this runs on open."""
        index = cls()
        admit = index.admit
        accepted, position_of = index.accepted, index.position_of
        children, leaves, claimed = index.children, index.leaves, index.claimed
        with collector_paused():
            for position, entry in enumerate(entries):
                message = entry.message
                if message is None or message.id in position_of:
                    admit(position, entry)
                    continue
                claimed.setdefault(message.id, position)
                parent = message.parent
                if parent is None:
                    pass
                elif parent in position_of:
                    siblings = children.get(parent)
                    if siblings is None:
                        children[parent] = [message.id]
                    else:
                        siblings.append(message.id)
                    leaves.pop(parent, None)
                else:
                    admit(position, entry)  # dangling
                    continue
                accepted.append(position)
                position_of[message.id] = position
                leaves[message.id] = None
        return index


class MessageView:
    """The validated messages of one document, in document order."""

    def __init__(
        self, array: Array, *, items: list[Any] | None = None, shape_checked: bool = False
    ) -> None:
        """`shape_checked`: the caller knows no value is nested too deeply to read (the relay's
        structure index says so); else the array is checked first (`open_entries`)."""
        self._array = array
        self._doc = array.doc
        self.entries: list[Entry] = (
            parse_all(str(array)) if shape_checked else open_entries(array, items)
        )
        self._index: ThreadIndex | None = None
        self._listeners: list[Callable[[], None]] = []
        self._expected: list[Message] | None = None
        # Held weakly: yrs holds the callback, and a strong reference back to the view would
        # keep the view, its document and every entry alive for good (crdtchat.lifetime).
        self._subscription = array.integrated.observe_deep(weak_method(self._on_raw_events))
        self._closed = False

    @property
    def doc(self) -> Doc:
        """The document whose array this view reads."""
        return self._doc

    @property
    def closed(self) -> bool:
        """Closed views no longer follow the document: what they hold may be out of date."""
        return self._closed

    def close(self) -> None:
        """Stop following the array (idempotent); the view keeps what it last read."""
        if not self._closed:
            self._closed = True
            self._subscription.drop()
            self._listeners.clear()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the messages (from any peer)."""
        self._listeners.append(listener)

    def expect_append(self, messages: Sequence[Message]) -> None:
        """The caller is about to append exactly `messages`, in a transaction that holds no
        other change of the array: the view takes them as they are instead of asking yrs for
        the delta and re-reading them. Cleared by the next event, or by `forget_expected`."""
        self._expected = list(messages)

    def forget_expected(self) -> None:
        self._expected = None

    # -- events ---------------------------------------------------------------------------

    def _on_raw_events(self, events: list[Any]) -> None:
        # What pycrdt's observe_deep callback does, minus computing every attribute eagerly.
        with read_transaction(self._doc, events[0].transaction):
            try:
                self._on_events(events)
            except Exception as error:  # surfaces when the transaction ends, as in pycrdt
                report_to_commit(self._doc, error)

    def _on_events(self, events: list[Any]) -> None:
        expected, self._expected = self._expected, None
        if not self.entries and expected is None:
            # The first content of an empty view (a replica applying its stored document
            # under an open Conversation): one JSON read, as on open, instead of the delta's
            # item-by-item reads, which cost seconds at 10,000 messages. The delta lists the
            # items, so their shape is checked first without reading them (design §7.1).
            items = [
                item
                for event in events
                if not event.path
                for op in event.delta  # raw values: see `crdtchat.shape.check_items`
                for item in op.get("insert", ())
            ]
            self.entries = open_entries(self._array, items)
            self._index = None
            for listener in self._listeners:
                listener()
            return
        changed_positions: set[int] = set()
        for event in events:
            path = event.path
            if path:
                changed_positions.add(path[0])
            elif expected is not None:
                self._extend(expected)
                expected = None
            else:
                self._apply_array_delta(wrap(event.delta, self._doc))
        for position in changed_positions:
            if position < len(self.entries):
                self._reread(position)
        for listener in self._listeners:
            listener()

    def _extend(self, messages: list[Message]) -> None:
        start = len(self.entries)
        new = [Entry(message) for message in messages]
        self.entries.extend(new)
        if self._index is not None:
            for offset, entry in enumerate(new):
                self._index.admit(start + offset, entry)

    def _apply_array_delta(self, delta: list[dict[str, Any]]) -> None:
        cursor = 0
        appended_from: int | None = None
        structural = False
        for op in delta:
            if "retain" in op:
                cursor += op["retain"]
            elif "delete" in op:
                del self.entries[cursor : cursor + op["delete"]]
                structural = True
            elif "insert" in op:
                new = [entry_of(item) for item in op["insert"]]
                if cursor == len(self.entries) and appended_from is None:
                    appended_from = cursor
                else:
                    structural = True
                self.entries[cursor:cursor] = new
                cursor += len(new)
        if self._index is None:
            return
        if structural:
            self._index = None
        elif appended_from is not None:
            for position in range(appended_from, len(self.entries)):
                self._index.admit(position, self.entries[position])

    def _reread(self, position: int) -> None:
        before = self.entries[position]
        after = entry_of(self._array[position])
        self.entries[position] = after
        if self._index is None:
            return
        same_links = (
            before.message is not None
            and after.message is not None
            and before.message.id == after.message.id
            and before.message.parent == after.message.parent
        )
        if not same_links:
            self._index = None

    # -- reads ----------------------------------------------------------------------------

    @property
    def index(self) -> ThreadIndex:
        if self._index is None:
            self._index = ThreadIndex.build(self.entries)
        return self._index

    def __len__(self) -> int:
        return len(self.index.accepted)

    def __iter__(self) -> Iterator[Message]:
        entries = self.entries
        for position in self.index.accepted:
            message = entries[position].message
            assert message is not None
            yield message

    def get(self, message_id: str) -> Message | None:
        position = self.index.position_of.get(message_id)
        return None if position is None else self.entries[position].message

    def claimed(self, message_id: str) -> Message | None:
        """The first well-formed message carrying `message_id`, shown by readers or not."""
        position = self.index.claimed.get(message_id)
        return None if position is None else self.entries[position].message

    def position(self, message_id: str) -> int:
        """Where the message's Map sits in the array (for writes)."""
        return self.index.position_of[message_id]

    def children(self, message_id: str) -> list[Message]:
        return [self._accepted(child) for child in self.index.children.get(message_id, ())]

    def last(self) -> Message | None:
        accepted = self.index.accepted
        return self.entries[accepted[-1]].message if accepted else None

    def thread(self, leaf_id: str) -> list[Message]:
        """Root → `leaf_id` inclusive."""
        position_of = self.index.position_of
        entries = self.entries
        message = self._accepted(leaf_id)
        path = [message]
        while message.parent is not None:
            message = entries[position_of[message.parent]].message  # type: ignore[assignment]
            path.append(message)
        path.reverse()
        return path

    def snapshot(self, tail: int = SNAPSHOT_TAIL) -> ViewSnapshot:
        """What a device needs to show this view at once next time, keyed by the document's
        state (see `ViewSnapshot`)."""
        last = self.last()
        messages: list[Message] = []
        length = 0
        if last is not None:
            position_of, entries = self.index.position_of, self.entries
            message: Message | None = last
            while message is not None:
                length += 1
                if len(messages) < tail:
                    messages.append(message)
                parent = message.parent
                message = None if parent is None else entries[position_of[parent]].message
            messages.reverse()
        return ViewSnapshot(state_key(self._doc), length, tuple(messages))

    def problems(self) -> list[Problem]:
        return [
            Problem(root=MESSAGES, key=position, reason=reason)
            for position, reason in sorted(self.index.problems.items())
        ]

    def _accepted(self, message_id: str) -> Message:
        position = self.index.position_of.get(message_id)
        if position is None:
            raise KeyError(f"no message {message_id!r}")
        message = self.entries[position].message
        assert message is not None
        return message


# -- snapshots of the view --------------------------------------------------------------------
#
# Opening a long conversation means applying the whole document and reading it as JSON (several
# times `json.loads` of its messages, docs/performance.md). What the screen needs first is the
# end of the current thread, so a replica stores that next to the document, keyed by the
# document state it was taken from. A re-open shows it at once, then loads the document and
# compares keys: the snapshot is only ever a first picture, the document always wins.

SNAPSHOT_VERSION = 1
_DIGEST = 32


class SnapshotError(StorageError, ValueError):
    """Bytes that are not a snapshot this version can read (corrupt, truncated, newer)."""


def state_key(doc: Doc) -> bytes:
    """The identity of `doc`'s content: its state vector and its delete set.

    A deletion advances no clock, so the state vector alone would not see it; the update a
    document sends to itself holds exactly its delete set. ~1 ms at 10,000 messages.
    """
    state = doc.get_state()
    return hashlib.sha256(state + doc.get_update(state)).digest()


class _SnapshotBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    key: str
    thread_length: int
    tail: tuple[Message, ...]


_SNAPSHOT_BODY = TypeAdapter(_SnapshotBody)


@dataclass(frozen=True)
class ViewSnapshot:
    """The end of the current thread as it was when the document had state `key`."""

    key: bytes
    thread_length: int  # messages on the whole current thread
    tail: tuple[Message, ...]  # its last messages, oldest first

    def encode(self) -> bytes:
        """Checksummed JSON: a flipped bit anywhere makes `decode` refuse it."""
        body = (
            _SnapshotBody(
                version=SNAPSHOT_VERSION,
                key=self.key.hex(),
                thread_length=self.thread_length,
                tail=self.tail,
            )
            .model_dump_json(exclude_defaults=True)
            .encode()
        )
        return hashlib.sha256(body).digest() + body

    @classmethod
    def decode(cls, data: bytes) -> ViewSnapshot:
        digest, body = data[:_DIGEST], data[_DIGEST:]
        if len(digest) < _DIGEST or hashlib.sha256(body).digest() != digest:
            raise SnapshotError("view snapshot checksum mismatch")
        try:
            parsed = _SNAPSHOT_BODY.validate_json(body)
            key = bytes.fromhex(parsed.key)
        except (ValidationError, ValueError) as error:
            raise SnapshotError(f"unreadable view snapshot: {error}") from error
        if parsed.version != SNAPSHOT_VERSION:
            raise SnapshotError(f"view snapshot version {parsed.version} is not {SNAPSHOT_VERSION}")
        return cls(key, parsed.thread_length, parsed.tail)

    def matches(self, doc: Doc) -> bool:
        """Whether this snapshot shows `doc` as it is now (else it is stale: ignore it)."""
        return self.key == state_key(doc)
