"""Properties over random documents: the prefix hash is its definition, and the incrementally
maintained view always equals a view rebuilt from scratch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pycrdt import Array, Doc, Map, Text

from crdtchat.document import Conversation, ConversationError
from crdtchat.prefix import reference_prefix_hash
from crdtchat.schema import ToolCall
from tests.support.document import FILE, MODEL, fresh_copy

# Text with characters outside the BMP, combining marks, quotes and escapes that JSON must keep.
unicode_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(["😀", "𝄞", "é", "\u0301", '"', "\\", "\n", "\u2028", "\x00"]),
    ),
    max_size=20,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | unicode_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(unicode_text, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def threads(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A thread as a list of append arguments, root first; tool results follow their calls."""
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
        step: dict[str, Any] = {"role": role, "content": draw(unicode_text)}
        if role == "assistant" and draw(st.booleans()):
            step["tool_calls"] = [
                ToolCall(id=f"c{i}", name=draw(unicode_text) or "t", arguments=draw(unicode_text))
                for i in range(draw(st.integers(0, 2)))
            ]
        if role == "tool":
            step["tool_call_id"] = draw(unicode_text.filter(bool))
        if role in ("user", "tool") and draw(st.booleans()):
            step["files"] = [FILE]
        if role == "assistant":
            step["model"] = MODEL
            step["status"] = "complete"
        steps.append(step)
    return steps


def literal_prefix_hash(conversation: Conversation, leaf_id: str) -> str:
    """design §2 read straight off the raw document, without the project's models."""
    raw = json.loads(str(conversation.messages))
    by_id = {item["id"]: item for item in raw}
    path = []
    current: str | None = leaf_id
    while current is not None:
        path.append(by_id[current])
        current = by_id[current]["parent"]
    path.reverse()
    document = {
        "system": json.loads(str(conversation.settings_map)).get("system", ""),
        "tools": json.loads(str(conversation.tools_map)),
        "messages": [
            {
                key: item.get(key)
                for key in ("role", "content", "tool_calls", "tool_call_id", "files")
            }
            for item in path
        ],
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    steps=threads(),
    system=st.none() | unicode_text,
    tools=st.dictionaries(unicode_text, json_values, max_size=3),
)
def test_prefix_hash_is_the_literal_definition(
    steps: list[dict[str, Any]], system: str | None, tools: dict[str, Any]
) -> None:
    conversation = Conversation.create(author="ann")
    if system is not None:
        conversation.set_settings(system=system)
    for name, value in tools.items():
        conversation.tools_map[name] = value  # as stored, whatever a peer put there
    for step in steps:
        conversation.append(**step)
    thread = conversation.current_thread()
    hashes = conversation.prefix_hashes(thread)
    for index, message in enumerate(thread):
        expected = reference_prefix_hash(system or "", tools, thread[: index + 1])
        assert hashes[index] == expected
        assert conversation.prefix_hash(message.id) == expected
        assert literal_prefix_hash(conversation, message.id) == expected
    assert len(set(hashes)) == len(hashes)  # every prefix differs from every other one


@settings(max_examples=40, deadline=None)
@given(steps=threads(), position=st.integers(0, 5), addition=st.text(min_size=1, max_size=3))
def test_an_edit_anywhere_on_the_path_changes_every_later_hash(
    steps: list[dict[str, Any]], position: int, addition: str
) -> None:
    conversation = Conversation.create(author="ann")
    for step in steps:
        conversation.append(**step)
    thread = conversation.current_thread()
    before = conversation.prefix_hashes(thread)
    edited = thread[position % len(thread)]
    conversation.edit_text(edited.id, edited.content + addition)
    after = conversation.prefix_hashes(conversation.current_thread())
    index = position % len(thread)
    assert after[:index] == before[:index]
    assert all(a != b for a, b in zip(after[index:], before[index:], strict=True))


# -- the materialised view against a rebuild -----------------------------------------------

raw_items = st.one_of(
    st.just("a string item"),
    st.integers(0, 9),
    st.just("text-item"),  # becomes a Text, below
    st.just("array-item"),  # becomes an Array, below
    st.fixed_dictionaries(
        {
            "id": st.sampled_from(["m0", "m1", "m2", "x", "y", 5, ""]),
            "role": st.sampled_from(["user", "assistant", "tool", "system", "robot"]),
            "author": st.just("mallory"),
            "parent": st.sampled_from([None, "m0", "m1", "x", "missing", 3]),
            "created_at": st.sampled_from([1.0, 2, "late"]),
            "content": st.sampled_from(["text", 7, "😀"]),
        }
    ),
)


class ViewMatchesRebuild(RuleBasedStateMachine):
    """Appends, edits, raw inserts and deletes, and remote merges, in any order and grouping."""

    ids = Bundle("ids")

    @initialize()
    def start(self) -> None:
        self.live = Conversation.create(author="ann")
        self.peer = Conversation.from_update(self.live.encode_state(), author="bob")
        self.counter = 0

    def _next_id(self) -> str:
        """An id neither replica holds, accepted or not (raw writes may have taken counter ids,
        and `Conversation` refuses an id any well-formed message claims)."""
        while True:
            self.counter += 1
            candidate = f"m{self.counter}"
            if (
                self.live.view.claimed(candidate) is None
                and self.peer.view.claimed(candidate) is None
            ):
                return candidate

    @rule(target=ids, parent=st.none() | ids, batch=st.integers(1, 3), grouped=st.booleans())
    def append(self, parent: str | None, batch: int, grouped: bool) -> str:
        """Appends through the API, alone (the fast local path) or grouped in one transaction."""
        last = parent
        with self.live.doc.transaction() if grouped else contextlib.nullcontext():
            for _ in range(batch):
                try:
                    last = self.live.append(
                        "user", "hi 😀", parent=last, message_id=self._next_id()
                    ).id
                except ConversationError:
                    last = self.live.append(
                        "user", "hi", parent=None, message_id=self._next_id()
                    ).id
        return last or ""

    @rule(target=ids, parent=st.none() | ids)
    def remote_append(self, parent: str | None) -> str:
        """The peer appends after syncing what it knows, then sends its update."""
        self.peer.apply_update(self.live.update_since(self.peer.state_vector()))
        if parent is not None and self.peer.view.get(parent) is None:
            parent = None
        message = self.peer.append("user", "from bob 𝄞", parent=parent, message_id=self._next_id())
        self.live.apply_update(self.peer.update_since(self.live.state_vector()))
        return message.id

    @rule(parent=st.none() | ids, stale=st.booleans())
    def concurrent_append(self, parent: str | None, stale: bool) -> None:
        """Both write before syncing: the peer's item lands in the middle of the array."""
        if not stale:
            self.peer.apply_update(self.live.update_since(self.peer.state_vector()))
        self.live.append("user", "live side", message_id=self._next_id())
        if parent is not None and self.peer.view.get(parent) is None:
            parent = None
        self.peer.append("user", "peer side", parent=parent, message_id=self._next_id())
        self.live.apply_update(self.peer.update_since(self.live.state_vector()))

    @rule(item=raw_items, where=st.integers(0, 50))
    def raw_insert(self, item: Any, where: int) -> None:
        self.live.messages.insert(where % (len(self.live.messages) + 1), _shared(item))

    @rule(answered=ids, grouped=st.booleans())
    def commit_turn(self, answered: str, grouped: bool) -> None:
        """A worker's commit: the append travels with writes to other roots."""
        if self.live.view.get(answered) is None:
            return
        group = self.live.doc.transaction() if grouped else contextlib.nullcontext()
        with group, contextlib.suppress(ConversationError):
            self.live.commit_turn(
                answered, self._next_id(), model=MODEL, status="complete", content="ok"
            )

    @precondition(lambda self: len(self.live.messages) > 0)
    @rule(where=st.integers(0, 50), count=st.integers(1, 3))
    def raw_delete(self, where: int, count: int) -> None:
        size = len(self.live.messages)
        start = where % size
        del self.live.messages[start : min(size, start + count)]

    @precondition(lambda self: len(self.live.messages) > 0)
    @rule(
        where=st.integers(0, 50),
        key=st.sampled_from(["id", "parent", "role", "created_at", "content", "status"]),
        value=st.sampled_from(["m1", "m2", None, "user", "robot", 3.0, "x", "complete"]),
    )
    def raw_set_key(self, where: int, key: str, value: Any) -> None:
        item = self.live.messages[where % len(self.live.messages)]
        if isinstance(item, Map):
            item[key] = value

    @precondition(lambda self: len(self.live.messages) > 0)
    @rule(where=st.integers(0, 50), text=st.sampled_from(["", "edit", "😀 x 𝄞"]))
    def edit(self, where: int, text: str) -> None:
        item = self.live.messages[where % len(self.live.messages)]
        content = item.get("content") if isinstance(item, Map) else None
        if isinstance(content, Text):
            with self.live.doc.transaction():
                content.clear()
                content += text

    @rule(ops=st.lists(st.tuples(st.integers(0, 50), raw_items), min_size=1, max_size=3))
    def grouped_raw(self, ops: list[tuple[int, Any]]) -> None:
        """Several raw changes, including a delete, in one transaction."""
        with self.live.doc.transaction():
            for where, item in ops:
                self.live.messages.insert(where % (len(self.live.messages) + 1), _shared(item))
            if len(self.live.messages) > 1:
                del self.live.messages[0]

    @invariant()
    def matches_a_rebuild(self) -> None:
        rebuilt = fresh_copy(self.live)
        assert self.live.all_messages() == rebuilt.all_messages()
        assert self.live.problems() == rebuilt.problems()
        assert [m.id for m in self.live.current_thread()] == [
            m.id for m in rebuilt.current_thread()
        ]
        assert [m.id for m in self.live.leaves()] == [m.id for m in rebuilt.leaves()]


def _shared(item: Any) -> Any:
    """A drawn raw item as what a peer would insert: Maps with Text content, Text, Array."""
    if item == "text-item":
        return Text("a text item 😀")
    if item == "array-item":
        return Array([1, "two"])
    if isinstance(item, dict):
        content = item["content"]
        return Map({**item, "content": Text(content) if isinstance(content, str) else content})
    return item


ViewMatchesRebuild.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_view_matches_a_rebuild = ViewMatchesRebuild.TestCase


def _sample_update() -> bytes:
    """Fixed bytes (client id, ids, clock), so that the mangled variants below are too."""
    writer = Conversation(Doc(client_id=12345), author="w", clock=lambda: 1_700_000_000.5)
    for index in range(4):
        writer.append("user", f"hello 😀 {index}", message_id=f"w{index}")
    writer.set_settings(system="s")
    return writer.encode_state()


SAMPLE_UPDATE = _sample_update()


def _mangled(seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(SAMPLE_UPDATE)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(SAMPLE_UPDATE))
        if rng.random() < 0.2:
            del data[position % max(1, len(data)) :]
        elif data:
            data[position % len(data)] = rng.randrange(256)
    return bytes(data)


# Seeded, not drawn by hypothesis: some byte changes turn a Text into an Array that holds
# string content, and yrs 0.14 then loops forever reading that array (the relay must refuse
# such updates; see the report). These seeds are checked not to produce one.
@pytest.mark.parametrize("seed", range(0, 3000, 10))
def test_a_mangled_update_is_refused_or_merged_never_a_crash(seed: int) -> None:
    data = _mangled(seed)
    reader = Conversation.create(author="r")
    mine = reader.append("user", "mine 😀")
    with contextlib.suppress(ConversationError):
        reader.apply_update(bytes(data))
    assert reader.message(mine.id).content == "mine 😀"
    rebuilt = fresh_copy(reader)
    assert rebuilt.all_messages() == reader.all_messages()
    assert rebuilt.problems() == reader.problems()
    reader.append("user", "after", parent=mine.id)
