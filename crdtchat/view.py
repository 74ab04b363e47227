"""A materialised, validated view of `canonical.messages`, kept up to date from change events.

Reading a 10,000-message Array of Maps item by item from Python costs seconds, while one
Rust-side JSON serialisation costs tens of milliseconds. So the view reads the whole array
once, as JSON, and from then on only what pycrdt's deep events say has changed: inserted items,
deleted ranges and the one message whose text or keys moved.

On top of the parsed entries sits the thread index (accepted messages, ids, children). The
common case, an append at the end, extends it in place; anything else (a concurrent insert
in the middle, a delete, a change of an id or parent) rebuilds it lazily on the next read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, ArrayEvent, Map, Subscription
from pydantic import ValidationError

from crdtchat.schema import MESSAGES, Message, Problem

log = logging.getLogger(__name__)


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


def read_item(item: Any) -> Any:
    """The JSON value of one array item (a Map, or whatever a foreign peer put there)."""
    if isinstance(item, Map):
        return json.loads(str(item))
    return item


@dataclass
class ThreadIndex:
    """Which entries count, and how they link. Positions index `MessageView.entries`."""

    accepted: list[int] = field(default_factory=list)
    position_of: dict[str, int] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    leaves: dict[str, None] = field(default_factory=dict)  # ordered: document order
    problems: dict[int, str] = field(default_factory=dict)

    def admit(self, position: int, entry: Entry) -> None:
        """Apply the reader rules of DESIGN §2 to the next entry in document order."""
        message = entry.message
        if message is None:
            self.problems[position] = entry.problem or "invalid"
            return
        if message.id in self.position_of:
            self.problems[position] = f"duplicate id {message.id!r}"
            return
        # A parent must come earlier in document order. Honest peers only ever append after
        # what they have seen, so this holds for them, and it rules out cycles.
        if message.parent is not None and message.parent not in self.position_of:
            self.problems[position] = f"dangling parent {message.parent!r}"
            return
        self.accepted.append(position)
        self.position_of[message.id] = position
        self.children[message.id] = []
        self.leaves[message.id] = None
        if message.parent is not None:
            self.children[message.parent].append(message.id)
            self.leaves.pop(message.parent, None)


class MessageView:
    """The validated messages of one document, in document order."""

    def __init__(self, array: Array) -> None:
        self._array = array
        self.entries: list[Entry] = [parse_entry(raw) for raw in json.loads(str(array))]
        self._index: ThreadIndex | None = None
        self._listeners: list[Callable[[], None]] = []
        self._subscription: Subscription = array.observe_deep(self._on_events)

    def close(self) -> None:
        self._array.unobserve(self._subscription)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change of the messages (from any peer)."""
        self._listeners.append(listener)

    # -- events ---------------------------------------------------------------------------

    def _on_events(self, events: list[Any]) -> None:
        changed_positions: set[int] = set()
        for event in events:
            if isinstance(event, ArrayEvent) and not event.path:
                self._apply_array_delta(event.delta)
            elif event.path:
                changed_positions.add(event.path[0])
        for position in changed_positions:
            if position < len(self.entries):
                self._reread(position)
        for listener in self._listeners:
            listener()

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
                new = [parse_entry(read_item(item)) for item in op["insert"]]
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
        after = parse_entry(read_item(self._array[position]))
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
            index = ThreadIndex()
            for position, entry in enumerate(self.entries):
                index.admit(position, entry)
            self._index = index
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
        path = []
        message: Message | None = self._accepted(leaf_id)
        while message is not None:
            path.append(message)
            message = None if message.parent is None else self._accepted(message.parent)
        path.reverse()
        return path

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
