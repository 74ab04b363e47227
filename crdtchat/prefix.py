"""`prefix_hash` exactly as design §2 defines it.

It keys every derived entry to the canonical content it was computed from: recomputed from
the canonical section alone, it changes when anything on the path (or the system prompt, or
the tools) changes, so stale provider state can never be used by mistake.

Because the keys are sorted, `"messages"` comes first in the hashed JSON, so the hashes of
every prefix of a thread are computed in one pass by copying a running SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from crdtchat.schema import Message


def canonical_json(value: Any) -> str:
    """Keys sorted, separators `,` and `:`, no ASCII escaping."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hashed_message_fields(message: Message) -> dict[str, Any]:
    """The part of a message that the prefix hash covers, absent keys as null."""
    return {
        "role": message.role,
        "content": message.content,
        "tool_calls": (
            None if message.tool_calls is None else [c.model_dump() for c in message.tool_calls]
        ),
        "tool_call_id": message.tool_call_id,
        "files": None if message.files is None else [f.model_dump() for f in message.files],
    }


def hash_tail(system: str, tools: Mapping[str, Any]) -> bytes:
    """What follows the messages in the hashed JSON (keys sort after "messages")."""
    return f'],"system":{canonical_json(system)},"tools":{canonical_json(dict(tools))}}}'.encode()


class RunningHashes:
    """The SHA-256 state after each message of a thread, reused across calls.

    A message's running state depends only on the messages from the root to it. A cached
    state is reused only while every message up to it is still equal to the one it was
    computed from (a field comparison, much cheaper than encoding the JSON again), so edits
    anywhere on the path are noticed without any invalidation protocol.
    """

    def __init__(self) -> None:
        # message id -> (the message, the parent's running state it extended, its own state)
        self._states: dict[str, tuple[Message, Any, Any]] = {}

    def _running(self, thread: Sequence[Message]) -> list[Any]:
        states = self._states
        result: list[Any] = []
        running: Any = None
        for index, message in enumerate(thread):
            cached = states.get(message.id)
            # Valid only if computed from this very parent state (identity): an edit up the
            # path gives the parent a new state object, which invalidates every descendant,
            # also those of sibling threads hashed since.
            if (
                cached is not None
                and cached[1] is running
                and (cached[0] is message or cached[0] == message)
            ):
                running = cached[2]
            else:
                parent_state = running
                if index == 0:
                    running = hashlib.sha256(b'{"messages":[')
                else:
                    running = running.copy()
                    running.update(b",")
                running.update(canonical_json(hashed_message_fields(message)).encode())
                states[message.id] = (message, parent_state, running)
            result.append(running)
        return result

    def prefix_hashes(
        self, system: str, tools: Mapping[str, Any], thread: Sequence[Message]
    ) -> list[str]:
        tail = hash_tail(system, tools)
        hashes = []
        for running in self._running(thread):
            final = running.copy()
            final.update(tail)
            hashes.append(final.hexdigest())
        return hashes

    def prefix_hash(self, system: str, tools: Mapping[str, Any], thread: Sequence[Message]) -> str:
        if not thread:
            raise ValueError("a prefix hash needs at least one message")
        final = self._running(thread)[-1].copy()
        final.update(hash_tail(system, tools))
        return final.hexdigest()


def prefix_hashes(system: str, tools: Mapping[str, Any], thread: Iterable[Message]) -> list[str]:
    """The prefix hash of every message of `thread` (root first), in order.

    `tools` is the JSON object of `canonical.tools` as stored.
    """
    tail = hash_tail(system, tools)
    running = hashlib.sha256(b'{"messages":[')
    hashes = []
    for index, message in enumerate(thread):
        if index:
            running.update(b",")
        running.update(canonical_json(hashed_message_fields(message)).encode())
        final = running.copy()
        final.update(tail)
        hashes.append(final.hexdigest())
    return hashes


def prefix_hash(system: str, tools: Mapping[str, Any], thread: Iterable[Message]) -> str:
    """The hash of the thread from the root to its last message, inclusive."""
    hashes = prefix_hashes(system, tools, thread)
    if not hashes:
        raise ValueError("a prefix hash needs at least one message")
    return hashes[-1]


def reference_prefix_hash(system: str, tools: Mapping[str, Any], thread: list[Message]) -> str:
    """The definition, spelled out literally; tests check `prefix_hashes` against it."""
    document = {
        "system": system,
        "tools": dict(tools),
        "messages": [hashed_message_fields(m) for m in thread],
    }
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()
