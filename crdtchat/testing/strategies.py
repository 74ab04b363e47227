"""Hypothesis strategies for operations on a `Conversation`.

Every strategy that depends on the document (`append_messages(conversation)`, …) looks at
the replica's state when it is *called* and draws operations valid for that state, so call it
again after the state changes (a state machine does so on every step). Ids are drawn, never
random: a run replays exactly, and a small id space makes concurrent replicas pick the same
id now and then, which is how duplicate ids get tested.

Where a category has nothing to work on (no message to edit yet) its strategy is
`st.nothing()`, which `st.one_of` skips.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from pycrdt import Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.schema import DerivedEntry, FileRef, Message, ModelRef, ToolCall, assistant_turn_id
from crdtchat.shape import MAX_READ_DEPTH
from crdtchat.testing.operations import (
    AppendMessage,
    AppendStream,
    ChangeSettings,
    ClaimLease,
    ClearRegeneration,
    CommitTurn,
    DeleteText,
    DiscardDerived,
    ForeignDeleteMessage,
    ForeignMapWrite,
    ForeignMessage,
    ForeignMessageAt,
    ForeignNesting,
    InsertText,
    MarkRead,
    Operation,
    PutDerived,
    ReleaseLease,
    RemoveTool,
    RenewLease,
    ReplaceText,
    RequestCancel,
    RequestRegeneration,
    ResetStream,
    SetDraft,
    SetTitle,
    SetTool,
    StartStream,
)

SearchStrategy = st.SearchStrategy

ROLES: tuple[schema.Role, ...] = ("system", "user", "assistant", "tool")
STATUSES: tuple[schema.Status, ...] = ("complete", "incomplete", "cancelled", "error")
DERIVED_KINDS: tuple[schema.DerivedKind, ...] = (
    "provider_state",
    "hidden",
    "usage",
    "kv_checkpoint",
    "title",
    "summary",
)
MODELS = (
    ModelRef(provider="openai", api="responses", model="gpt-test"),
    ModelRef(provider="anthropic", api="messages", model="claude-test"),
    ModelRef(provider="local", api="llama", model="smollm2"),
)
HOLDERS = ("worker-1", "worker-2")
MAX_SAFE_INTEGER = 2**53 - 1  # JSON numbers travel as doubles (pycrdt and Yjs alike)


# -- values ----------------------------------------------------------------------------------


def characters() -> SearchStrategy[str]:
    """Any code point except surrogates, with astral-plane and combining ones well represented.

    Astral characters are 4 UTF-8 bytes and 2 UTF-16 units: that is where byte/code-point
    offset bugs show.
    """
    return st.one_of(
        st.characters(exclude_categories=("Cs",)),
        st.characters(min_codepoint=0x10000, exclude_categories=("Cs",)),
        st.sampled_from("a é€😀👩‍👩‍👧\u0301\n\x00𝔘"),
    )


def texts(*, min_size: int = 0, max_size: int = 8) -> SearchStrategy[str]:
    return st.text(characters(), min_size=min_size, max_size=max_size)


def json_values(*, max_leaves: int = 6) -> SearchStrategy[Any]:
    """JSON that round-trips through a Yjs document exactly (integers within ±2**53)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
        st.floats(allow_nan=False, allow_infinity=False),
        texts(max_size=4),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(texts(max_size=3), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def json_objects() -> SearchStrategy[dict[str, Any]]:
    return st.dictionaries(texts(max_size=3), json_values(max_leaves=3), max_size=3)


def message_ids() -> SearchStrategy[str]:
    """Short ids from a small space, so that concurrent replicas sometimes collide."""
    return st.text(alphabet="abcdefghij", min_size=1, max_size=2)


def tool_names() -> SearchStrategy[str]:
    return st.sampled_from(("search", "calc", "weather", "run_python"))


def tool_calls() -> SearchStrategy[tuple[ToolCall, ...]]:
    call = st.builds(
        ToolCall,
        id=st.text(alphabet="xyz0123", min_size=1, max_size=3),
        name=tool_names(),
        arguments=json_objects().map(lambda value: _dumps(value)),
    )
    return st.lists(call, min_size=1, max_size=3, unique_by=lambda c: c.id).map(tuple)


def file_refs() -> SearchStrategy[tuple[FileRef, ...]]:
    ref = st.builds(
        FileRef,
        sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
        name=texts(max_size=6),
        mime=st.sampled_from(("text/plain", "image/png", "application/pdf")),
        size=st.integers(0, 2**40),
    )
    return st.lists(ref, min_size=1, max_size=2).map(tuple)


def model_refs() -> SearchStrategy[ModelRef]:
    return st.sampled_from(MODELS)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# -- reading the replica's state -------------------------------------------------------------


def _messages(conversation: Conversation) -> list[Message]:
    return conversation.all_messages()


def _editable(conversation: Conversation) -> list[Message]:
    """This author's messages whose content is a Text (a foreign one may hold a plain str)."""
    result = []
    for message in _messages(conversation):
        if message.author != conversation.author:
            continue
        item = conversation.messages[conversation.view.position(message.id)]
        if isinstance(item, Map) and isinstance(item.get("content"), Text):
            result.append(message)
    return result


def _fresh_id(conversation: Conversation, prefix: str = "") -> SearchStrategy[str]:
    """A drawn id, suffixed until no message here has it (other replicas may: on purpose,
    unless each replica draws with a prefix of its own)."""

    def free(candidate: str) -> str:
        candidate = prefix + candidate
        while conversation.view.claimed(candidate) is not None:
            candidate += "'"
        return candidate

    return message_ids().map(free)


def _answerable(conversation: Conversation) -> list[tuple[str, str]]:
    """(answered id, next turn id) for user/tool messages whose next turn is not written here."""
    result = []
    for message in _messages(conversation):
        if message.role not in ("user", "tool"):
            continue
        number = len(conversation.assistant_answers(message.id)) + 1
        turn_id = assistant_turn_id(message.id, number)
        if conversation.view.claimed(turn_id) is None:
            result.append((message.id, turn_id))
    return result


def _open_calls(conversation: Conversation, parent: Message | None) -> list[str]:
    """Tool call ids of the assistant message at or above `parent` through tool results."""
    message = parent
    while message is not None and message.role == "tool":
        message = None if message.parent is None else conversation.view.get(message.parent)
    if message is None or message.role != "assistant" or not message.tool_calls:
        return []
    return [call.id for call in message.tool_calls]


# -- canonical ---------------------------------------------------------------------------------


def append_messages(
    conversation: Conversation, *, roles: Sequence[schema.Role] = ROLES, id_prefix: str = ""
) -> SearchStrategy[AppendMessage]:
    """A message of any role, following any existing message (or none).

    Ids start with `id_prefix`: replicas behind a relay, which refuses a taken id (design
    §7.2), each use their own so that their concurrent appends never collide.
    """
    messages = _messages(conversation)

    @st.composite
    def build(draw: st.DrawFn) -> AppendMessage:
        role = draw(st.sampled_from(roles))
        parent: Message | None = draw(st.none() | st.sampled_from(messages)) if messages else None
        if role == "tool" and parent is None and messages and draw(st.booleans()):
            assistants = [m for m in messages if m.role == "assistant" and m.tool_calls]
            if assistants:
                parent = draw(st.sampled_from(assistants))
        fields: dict[str, Any] = {}
        if role == "assistant":
            fields["model"] = draw(model_refs())
            fields["status"] = draw(st.sampled_from(STATUSES))
            if draw(st.booleans()):
                fields["tool_calls"] = draw(tool_calls())
            if fields["status"] == "error":
                fields["error"] = draw(texts(max_size=5))
        if role == "tool":
            open_calls = _open_calls(conversation, parent)
            choices = st.text(alphabet="xyz0123", min_size=1, max_size=3)
            if open_calls:
                choices = st.sampled_from(open_calls) | choices
            fields["tool_call_id"] = draw(choices)
        if role in ("user", "tool") and draw(st.integers(0, 4)) == 0:
            fields["files"] = draw(file_refs())
        return AppendMessage(
            message_id=draw(_fresh_id(conversation, id_prefix)),
            role=role,
            content=draw(texts()),
            parent=None if parent is None else parent.id,
            **fields,
        )

    return build()


def text_edits(conversation: Conversation) -> SearchStrategy[Operation]:
    """Insertions, deletions and whole replacements in this author's message texts."""
    targets = _editable(conversation)
    if not targets:
        return st.nothing()

    @st.composite
    def build(draw: st.DrawFn) -> Operation:
        message = draw(st.sampled_from(targets))
        text = message.content
        kinds = ["insert", "replace"] + (["delete"] if text else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "insert":
            index = draw(st.integers(0, len(text)))
            return InsertText(message.id, index, draw(texts(min_size=1, max_size=4)))
        if kind == "delete":
            index = draw(st.integers(0, len(text) - 1))
            length = draw(st.integers(1, len(text) - index))
            return DeleteText(message.id, index, length)
        return ReplaceText(message.id, draw(texts()))

    return build()


def settings_changes() -> SearchStrategy[Operation]:
    """Settings, tools and the title: the small canonical maps."""
    settings = st.builds(
        ChangeSettings,
        system=st.none() | texts(),
        provider=st.none() | st.sampled_from(("local", "openai", "anthropic")),
        model=st.none() | st.sampled_from(("gpt-test", "claude-test", "smollm2")),
        params=st.none() | json_objects(),
    )
    tool = st.builds(
        SetTool, name=tool_names(), description=texts(max_size=5), parameters=json_objects()
    )
    return st.one_of(
        settings, tool, st.builds(RemoveTool, tool_names()), st.builds(SetTitle, texts())
    )


# -- worker ------------------------------------------------------------------------------------


def leases(
    conversation: Conversation, *, holders: Sequence[str] = HOLDERS
) -> SearchStrategy[Operation]:
    """Claims (a takeover once the clock has passed the expiry), renewals, releases."""
    answerable = _answerable(conversation)
    held = sorted(conversation.leases.keys())
    holder = st.sampled_from(tuple(holders))
    ttl = st.floats(1, 60, allow_nan=False)
    options: list[SearchStrategy[Operation]] = []
    if answerable:
        options.append(
            st.sampled_from(answerable).flatmap(
                lambda pair: st.builds(ClaimLease, st.just(pair[0]), st.just(pair[1]), holder, ttl)
            )
        )
    if held:
        options.append(st.builds(RenewLease, st.sampled_from(held), holder, ttl))
        options.append(st.builds(ReleaseLease, st.sampled_from(held), holder))
    return st.one_of(options) if options else st.nothing()


def streams(conversation: Conversation) -> SearchStrategy[Operation]:
    """Start a stream for a turn, append to or reset one in flight."""
    answerable = _answerable(conversation)
    in_flight = sorted(conversation.streams_in_flight())
    options: list[SearchStrategy[Operation]] = []
    if answerable:
        options.append(
            st.sampled_from(answerable).map(lambda pair: StartStream(pair[1], parent=pair[0]))
        )
    if in_flight:
        options.append(st.builds(AppendStream, st.sampled_from(in_flight), texts(min_size=1)))
        options.append(st.builds(ResetStream, st.sampled_from(in_flight)))
    return st.one_of(options) if options else st.nothing()


def commits(conversation: Conversation) -> SearchStrategy[CommitTurn]:
    """The assistant turn of a message that awaits one (streamed so far, or given text)."""
    answerable = _answerable(conversation)
    if not answerable:
        return st.nothing()
    in_flight = conversation.streams_in_flight()

    @st.composite
    def build(draw: st.DrawFn) -> CommitTurn:
        answered_id, turn_id = draw(st.sampled_from(answerable))
        status = draw(st.sampled_from(STATUSES))
        use_stream = turn_id in in_flight and draw(st.booleans())
        derived = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(DERIVED_KINDS),
                    json_objects().map(lambda d: tuple(sorted(d.items()))),
                    st.none() | st.floats(1.6e9, 1.8e9),
                ),
                max_size=2,
            )
        )
        return CommitTurn(
            answered_id=answered_id,
            turn_id=turn_id,
            model=draw(model_refs()),
            status=status,
            content=None if use_stream else draw(texts()),
            tool_calls=draw(st.none() | tool_calls()),
            error=draw(texts(max_size=4)) if status == "error" else None,
            derived=tuple(derived),
        )

    return build()


def derived_changes(conversation: Conversation) -> SearchStrategy[Operation]:
    """Derived puts (keyed to the real prefix hash or a stale one) and discards of all sizes."""
    messages = _messages(conversation)
    keys = sorted(conversation.derived.keys())
    options: list[SearchStrategy[Operation]] = [
        st.builds(DiscardDerived, kind=st.sampled_from(DERIVED_KINDS)),
        st.just(DiscardDerived()),
    ]
    if keys:
        options.append(st.builds(DiscardDerived, key=st.sampled_from(keys)))
    if messages:

        @st.composite
        def put(draw: st.DrawFn) -> PutDerived:
            message = draw(st.sampled_from(messages))
            model = draw(model_refs())
            stale = draw(st.booleans())
            prefix = (
                draw(st.binary(min_size=32, max_size=32).map(bytes.hex))
                if stale
                else conversation.prefix_hash(message.id)
            )
            entry = DerivedEntry(
                kind=draw(st.sampled_from(DERIVED_KINDS)),
                message_id=message.id,
                prefix_hash=prefix,
                provider=model.provider,
                api=model.api,
                model=model.model,
                data=draw(json_objects()),
                created_at=conversation.clock(),
                expires_at=draw(st.none() | st.floats(1.6e9, 1.8e9)),
                producer=conversation.author,
            )
            return PutDerived(entry)

        options.append(put())
    return st.one_of(options)


def worker_operations(
    conversation: Conversation, *, holders: Sequence[str] = HOLDERS
) -> SearchStrategy[Operation]:
    """What a worker does: leases, streams, commits, derived entries."""
    return st.one_of(
        leases(conversation, holders=holders),
        streams(conversation),
        commits(conversation),
        derived_changes(conversation),
    )


# -- transport written by people ---------------------------------------------------------------


def transport_changes(
    conversation: Conversation, *, regenerate_unanswered: bool = False
) -> SearchStrategy[Operation]:
    """Drafts, read marks, cancel and regenerate requests.

    Regeneration is asked for answered messages only (where a client shows the button),
    unless `regenerate_unanswered`.
    """
    messages = _messages(conversation)
    options: list[SearchStrategy[Operation]] = [st.builds(SetDraft, texts(max_size=10))]
    if messages:
        ids = [m.id for m in messages]
        options.append(st.builds(MarkRead, st.sampled_from(ids)))
        answerable = [
            m.id
            for m in messages
            if m.role in ("user", "tool")
            and (regenerate_unanswered or conversation.assistant_answers(m.id))
        ]
        if answerable:
            options.append(st.builds(RequestRegeneration, st.sampled_from(answerable)))
    turns = sorted({*conversation.streams_in_flight(), *(t for _, t in _answerable(conversation))})
    if turns:
        options.append(st.builds(RequestCancel, st.sampled_from(turns)))
    requested = sorted(conversation.regenerations.keys())
    if requested:
        options.append(st.builds(ClearRegeneration, st.sampled_from(requested)))
    return st.one_of(options)


# -- foreign writes ----------------------------------------------------------------------------


def foreign_writes(conversation: Conversation) -> SearchStrategy[Operation]:
    """Writes no `Conversation` method makes: broken messages, junk in every map root.

    Any peer can write anything into a CRDT; readers must report and skip it, identically
    on every replica. Deleting a message item is outside the contract (§4) but a reader
    must survive it too.
    """
    messages = _messages(conversation)
    ids = [m.id for m in messages]

    @st.composite
    def message_fields(draw: st.DrawFn) -> Any:
        if draw(st.integers(0, 5)) == 0:
            return draw(json_values(max_leaves=3))
        fields: dict[str, Any] = {
            "id": draw(st.sampled_from(ids) | message_ids()) if ids else draw(message_ids()),
            "role": draw(st.sampled_from(ROLES)),
            "author": draw(st.sampled_from(("alice", "bob", "mallory"))),
            "parent": draw(
                st.none() | (st.sampled_from(ids) if ids else st.nothing()) | message_ids()
            ),
            "created_at": 0.0,
            "content": draw(texts()),
        }
        if fields["role"] == "tool":
            fields["tool_call_id"] = "x"
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from((*fields, "tool_calls", "status", "model", "files")))
            if draw(st.booleans()):
                fields.pop(key, None)
            else:
                fields[key] = draw(json_values(max_leaves=2))
        return fields

    options: list[SearchStrategy[Operation]] = [
        st.builds(ForeignMessage, message_fields(), st.booleans()),
        st.builds(
            ForeignMapWrite,
            root=st.sampled_from(schema.MAP_ROOTS),
            key=(st.sampled_from(ids) | texts(max_size=3)) if ids else texts(max_size=3),
            value=json_values(max_leaves=4),
            delete=st.booleans(),
        ),
    ]
    if len(conversation.messages):
        positions = st.integers(0, len(conversation.messages) - 1)
        options.append(st.builds(ForeignDeleteMessage, positions))
    return st.one_of(options)


# -- duplicate ids (design §7.2) ---------------------------------------------------------------


def taken_ids(conversation: Conversation) -> list[str]:
    """Ids a new message may not carry here: every well-formed message's, and the next answer
    id of each user and tool message (a shadow can be written in advance)."""
    messages = [entry.message for entry in conversation.view.entries if entry.message is not None]
    ids = dict.fromkeys(m.id for m in messages)
    for message in messages:
        if message.role in ("user", "tool"):
            number = len(conversation.assistant_answers(message.id)) + 1
            ids[assistant_turn_id(message.id, number)] = None
    return list(ids)


def duplicate_ids(
    conversation: Conversation, *, authors: Sequence[str] = ("alice", "bob", "mallory")
) -> SearchStrategy[ForeignMessageAt]:
    """A well-formed message reusing a taken id (`taken_ids`), inserted at any position.

    What a writer would do to shadow someone's message, or to block an answer by taking its
    id first. The relay refuses it (test_relay_stateful.py); a replica that gets it from
    elsewhere shows the first message of the id in document order, like every other replica.
    """
    ids = taken_ids(conversation)
    if not ids:
        return st.nothing()
    parents = [m.id for m in _messages(conversation)]
    size = len(conversation.messages)

    @st.composite
    def build(draw: st.DrawFn) -> ForeignMessageAt:
        role = draw(st.sampled_from(ROLES))
        fields: dict[str, Any] = {
            "id": draw(st.sampled_from(ids)),
            "role": role,
            "author": draw(st.sampled_from(tuple(authors))),
            "parent": draw(st.none() | st.sampled_from(parents)) if parents else None,
            "created_at": 0.0,
            "content": draw(texts()),
        }
        if role == "tool":
            fields["tool_call_id"] = "x"
        position = draw(st.integers(0, size))
        return ForeignMessageAt(position, fields)

    return build()


# -- deep nesting ----------------------------------------------------------------------------


def deep_writes(conversation: Conversation) -> SearchStrategy[Operation]:
    """Foreign values of shared types nested around a reader's bound (design §7.1): under a
    key of any Map root, or in an otherwise valid new message. Depths cluster at the bound
    (`crdtchat.shape.MAX_READ_DEPTH`), where off-by-one mistakes live; deep enough to crash
    natively (~20,000) would make every example slow, so that is tested apart."""
    bound = MAX_READ_DEPTH
    depths = st.sampled_from((1, 2, 30, bound - 2, bound - 1, bound, bound + 1, 2 * bound))
    return st.builds(
        ForeignNesting,
        target=st.sampled_from((*schema.MAP_ROOTS, "message")),
        key=st.sampled_from(("extra", "system", "k", "content")),
        depth=depths,
        arrays=st.booleans(),
        message_id=message_ids(),
    )


# -- everything ------------------------------------------------------------------------------


def operations(
    conversation: Conversation,
    *,
    holders: Sequence[str] = HOLDERS,
    foreign: bool = True,
) -> SearchStrategy[Operation]:
    """Any operation valid for the replica's current state."""
    options = [
        append_messages(conversation),
        text_edits(conversation),
        settings_changes(),
        worker_operations(conversation, holders=holders),
        transport_changes(conversation),
    ]
    if foreign:
        options.append(foreign_writes(conversation))
    return st.one_of(options)
