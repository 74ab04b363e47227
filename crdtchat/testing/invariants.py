"""What must hold once replicas have exchanged everything (quiescence).

Each check raises `AssertionError` naming the replicas and the first thing that differs.
`read_replica` turns a conversation into plain data (every root as JSON, the state vector,
and what a reader derives: accepted messages, problems, threads, waiting messages, prefix
hashes), so two replicas are equal exactly when their readings are.

`reference_reading` derives the same from the JSON alone, by the rules of design §2 written
out directly, with no incremental view: the live, incrementally maintained view must agree
with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from pycrdt import Doc
from pydantic import ValidationError

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.merge import merge
from crdtchat.prefix import reference_prefix_hash
from crdtchat.schema import Message, RegenerateRequest, assistant_turn_id
from crdtchat.shape import MAX_READ_DEPTH
from crdtchat.testing.network import SimulatedReplica, has_gap
from crdtchat.testing.operations import message_problems, root_json
from crdtchat.wire import decode_state_vector


def json_depth(value: Any) -> int:
    """How deeply objects and arrays nest in a JSON value (a scalar is 0), iteratively.

    Foreign values of plain JSON stay shallow, so for the values the machine writes this is
    the depth of shared types that readers bound (`crdtchat.shape`)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        children = (
            current.values()
            if isinstance(current, dict)
            else current
            if isinstance(current, list)
            else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def roots_json(conversation: Conversation) -> dict[str, Any]:
    """Every root of design §2 as JSON."""
    return {name: root_json(conversation, name) for name in schema.ALL_ROOTS}


@dataclass(frozen=True)
class Reading:
    """What a reader derives from the messages: equal on every replica at quiescence."""

    accepted: tuple[str, ...]
    problem_positions: tuple[int, ...]
    leaves: tuple[str, ...]
    threads: tuple[tuple[str, ...], ...]  # one per leaf, root first
    current_thread: tuple[str, ...]
    waiting: tuple[tuple[str, int], ...]  # (message id, answer number)
    prefix_hashes: tuple[tuple[str, str], ...]  # (message id, hash of its thread)


@dataclass(frozen=True)
class ReplicaState:
    """A replica as plain data: its document and its reading."""

    roots: dict[str, Any]
    state_vector: dict[int, int]
    #: (root, key, reason) of everything `problems()` reports, sorted: map roots have no
    #: order that replicas share
    problems: tuple[tuple[str, str, str], ...]
    reading: Reading


def read_conversation(conversation: Conversation) -> Reading:
    """The reading through `Conversation`'s own (incremental) view."""
    accepted = conversation.all_messages()
    leaves = conversation.leaves()
    threads = tuple(tuple(m.id for m in conversation.thread(leaf.id)) for leaf in leaves)
    hashes: dict[str, str] = {}
    for leaf in leaves:
        thread = conversation.thread(leaf.id)
        hashes.update(zip((m.id for m in thread), conversation.prefix_hashes(thread), strict=True))
    return Reading(
        accepted=tuple(m.id for m in accepted),
        problem_positions=tuple(int(p.key) for p in message_problems(conversation)),
        leaves=tuple(m.id for m in leaves),
        threads=threads,
        current_thread=tuple(m.id for m in conversation.current_thread()),
        waiting=tuple((w.message.id, w.answer_number) for w in conversation.waiting_for_reply()),
        prefix_hashes=tuple(sorted(hashes.items())),
    )


def read_replica(conversation: Conversation) -> ReplicaState:
    return ReplicaState(
        roots=roots_json(conversation),
        state_vector=decode_state_vector(conversation.state_vector()),
        problems=tuple(sorted((p.root, str(p.key), p.reason) for p in conversation.problems())),
        reading=read_conversation(conversation),
    )


# -- the reader rules, spelled out --------------------------------------------------------------


def reference_reading(roots: dict[str, Any], *, regenerate_unanswered: bool = True) -> Reading:
    """design §2's reader rules applied to the JSON of the roots, from scratch.

    `regenerate_unanswered=False` ignores regenerate requests for a message with no answer
    (what `Conversation` does, unlike design §2's wording).
    """
    accepted: list[Message] = []
    by_id: dict[str, Message] = {}
    claimed: set[str] = set()  # ids of every well-formed message, shown or not
    problems: list[int] = []
    for position, raw in enumerate(roots[schema.MESSAGES]):
        if json_depth(raw) > MAX_READ_DEPTH:
            problems.append(position)  # too deep to read (design §7.1)
            continue
        try:
            message = Message.model_validate(raw)
        except ValidationError:
            problems.append(position)
            continue
        claimed.add(message.id)
        if message.id in by_id or (message.parent is not None and message.parent not in by_id):
            problems.append(position)  # later duplicate, or parent not (yet) a message
            continue
        by_id[message.id] = message
        accepted.append(message)
    children: dict[str, list[Message]] = {m.id: [] for m in accepted}
    for message in accepted:
        if message.parent is not None:
            children[message.parent].append(message)
    leaves = [m for m in accepted if not children[m.id]]

    def thread(message: Message) -> list[Message]:
        path = [message]
        while path[-1].parent is not None:
            path.append(by_id[path[-1].parent])
        return path[::-1]

    settings = roots[schema.SETTINGS]
    system = settings.get("system") if isinstance(settings.get("system"), str) else ""
    tools = {k: v for k, v in roots[schema.TOOLS].items() if json_depth(v) <= MAX_READ_DEPTH}
    hashes = {}
    for leaf in leaves:
        path = thread(leaf)
        for end in range(1, len(path) + 1):
            hashes[path[end - 1].id] = reference_prefix_hash(system, tools, path[:end])

    def free_number(message_id: str, number: int) -> int:
        # the next answer number whose turn id no well-formed message holds yet, shown or not
        # (a peer may have taken it)
        while assistant_turn_id(message_id, number) in claimed:
            number += 1
        return number

    waiting: dict[str, int] = {}
    for message in leaves:
        if message.role == "user" or (message.role == "tool" and _results_complete(message, by_id)):
            waiting[message.id] = free_number(message.id, 1)
    for message_id, raw in roots[schema.REGENERATE].items():
        try:
            request = RegenerateRequest.model_validate(raw)
        except ValidationError:
            continue
        message = by_id.get(message_id)
        if message is None or message.role not in ("user", "tool"):
            continue
        answers = sum(1 for child in children[message_id] if child.role == "assistant")
        if request.n > answers and (answers or regenerate_unanswered):
            waiting.setdefault(message_id, free_number(message_id, answers + 1))
    order = {m.id: i for i, m in enumerate(accepted)}
    return Reading(
        accepted=tuple(m.id for m in accepted),
        problem_positions=tuple(problems),
        leaves=tuple(m.id for m in leaves),
        threads=tuple(tuple(m.id for m in thread(leaf)) for leaf in leaves),
        current_thread=tuple(m.id for m in thread(leaves[-1])) if leaves else (),
        waiting=tuple(sorted(waiting.items(), key=lambda item: order[item[0]])),
        prefix_hashes=tuple(sorted(hashes.items())),
    )


def _results_complete(tool_message: Message, by_id: dict[str, Message]) -> bool:
    """Every call of the assistant message before the tool results has its result."""
    answered = set()
    message: Message | None = tool_message
    while message is not None and message.role == "tool":
        answered.add(message.tool_call_id)
        message = by_id.get(message.parent) if message.parent is not None else None
    if message is None or message.role != "assistant" or not message.tool_calls:
        return True
    return {call.id for call in message.tool_calls} <= answered


# -- checks -------------------------------------------------------------------------------------


def _first_difference(left: Any, right: Any, path: str = "") -> str:
    if type(left) is not type(right) and not (
        isinstance(left, int | float) and isinstance(right, int | float)
    ):
        return f"{path or 'value'}: {left!r} != {right!r}"
    if isinstance(left, dict):
        for key in sorted(set(left) | set(right), key=repr):
            if key not in left or key not in right:
                return f"{path}[{key!r}] present on one side only"
            if left[key] != right[key]:
                return _first_difference(left[key], right[key], f"{path}[{key!r}]")
    if isinstance(left, list | tuple) and len(left) == len(right):
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{path}[{index}]")
    return f"{path or 'value'}: {left!r} != {right!r}"


def assert_same_state(expected: ReplicaState, actual: ReplicaState, what: str) -> None:
    """`actual` must equal `expected`, field by field; the message names the first difference."""
    left, right = asdict(expected), asdict(actual)
    for field in fields(ReplicaState):
        if left[field.name] != right[field.name]:
            difference = _first_difference(left[field.name], right[field.name], field.name)
            raise AssertionError(f"{what}: {difference}")


def check_converged(conversations: Sequence[Conversation]) -> list[ReplicaState]:
    """All replicas hold the same document and derive the same reading from it."""
    states = [read_replica(c) for c in conversations]
    for index, state in enumerate(states[1:], start=1):
        assert_same_state(states[0], state, f"replica {index} differs from replica 0")
    return states


def open_update(update: bytes | None, *, author: str = "check") -> Conversation:
    """A fresh conversation from update bytes, on a fixed client id (it never writes)."""
    conversation = Conversation(Doc(client_id=1), author=author)
    if update is not None:
        conversation.apply_update(update)
    return conversation


def rebuild(updates: Sequence[bytes]) -> Conversation:
    """A conversation from one merge of `updates` (`crdtchat.merge`, which survives pycrdt's
    `merge_updates` panic on some histories; see tests/testing/test_convergence.py)."""
    return open_update(merge(*updates) if updates else None)


def check_rebuild(replica: SimulatedReplica, state: ReplicaState | None = None) -> None:
    """Merging every update the replica applied rebuilds exactly the live document."""
    state = state or read_replica(replica.live)
    rebuilt = rebuild(replica.history)
    assert_same_state(
        state, read_replica(rebuilt), f"replica {replica.index} rebuilt from its updates"
    )


def check_round_trip(conversation: Conversation, state: ReplicaState | None = None) -> None:
    """`encode_state` reopens as the same document, and a peer in sync is sent nothing."""
    state = state or read_replica(conversation)
    reopened = open_update(conversation.encode_state())
    assert_same_state(state, read_replica(reopened), "reopened from encode_state")
    missing = conversation.update_since(reopened.state_vector())
    reopened.apply_update(missing)
    assert_same_state(state, read_replica(reopened), "after applying update_since(own state)")


def check_reader_rules(state: ReplicaState, *, regenerate_unanswered: bool = True) -> None:
    """The view agrees with the reader rules applied from scratch, and reports every item."""
    reference = reference_reading(state.roots, regenerate_unanswered=regenerate_unanswered)
    live = state.reading
    for field in fields(Reading):
        got, wanted = getattr(live, field.name), getattr(reference, field.name)
        if got != wanted:
            raise AssertionError(f"reader rule {field.name}: view {got!r}, rules {wanted!r}")
    total = len(live.accepted) + len(live.problem_positions)
    if total != len(state.roots[schema.MESSAGES]):
        raise AssertionError("some item of canonical.messages is neither accepted nor reported")


def raw_message_ids(conversation: Conversation) -> set[str]:
    """Ids of every message-like item, accepted or not."""
    return {
        item["id"]
        for item in root_json(conversation, schema.MESSAGES)
        if isinstance(item, dict) and isinstance(item.get("id"), str)
    }


def check_kept(
    conversations: Iterable[Conversation],
    *,
    accepted_ids: Iterable[str] = (),
    present_ids: Iterable[str] = (),
    what: str = "durable",
) -> None:
    """Every id in `accepted_ids` is an accepted message, and every one in `present_ids` is
    at least an item, on every replica."""
    accepted_ids, present_ids = set(accepted_ids), set(present_ids)
    for index, conversation in enumerate(conversations):
        lost = accepted_ids - {m.id for m in conversation.all_messages()}
        if lost:
            raise AssertionError(f"replica {index} lost {what} messages {sorted(lost)}")
        gone = present_ids - raw_message_ids(conversation)
        if gone:
            raise AssertionError(f"replica {index} lost {what} message items {sorted(gone)}")


def check_no_gap(conversation: Conversation, what: str = "replica") -> None:
    """The document holds nothing beyond its state vector (see `network.has_gap`)."""
    if has_gap(conversation.doc):
        raise AssertionError(f"{what} holds updates beyond its state vector (a pycrdt gap)")


def check_quiescent(
    replicas: Sequence[SimulatedReplica], *, regenerate_unanswered: bool = True
) -> list[ReplicaState]:
    """Every check that needs no history beyond the replicas themselves."""
    for replica in replicas:
        check_no_gap(replica.live, f"replica {replica.index}")
    states = check_converged([r.live for r in replicas])
    for replica, state in zip(replicas, states, strict=True):
        check_reader_rules(state, regenerate_unanswered=regenerate_unanswered)
        check_rebuild(replica, state)
        check_round_trip(replica.live, state)
    return states


def dumps(state: ReplicaState) -> str:
    """A replica's state as text, for failure reports."""
    return json.dumps(asdict(state), ensure_ascii=False, default=str, indent=1)
