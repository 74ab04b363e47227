"""`prefix_hash` exactly as DESIGN §2 defines it.

It keys every derived entry to the canonical content it was computed from: recomputed from
the canonical section alone, it changes when anything on the path (or the system prompt, or
the tools) changes, so stale provider state can never be used by mistake.

Because the keys are sorted, `"messages"` comes first in the hashed JSON, so the hashes of
every prefix of a thread are computed in one pass by copying a running SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
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


def prefix_hashes(system: str, tools: Mapping[str, Any], thread: Iterable[Message]) -> list[str]:
    """The prefix hash of every message of `thread` (root first), in order.

    `tools` is the JSON object of `canonical.tools` as stored.
    """
    tail = f'],"system":{canonical_json(system)},"tools":{canonical_json(dict(tools))}}}'.encode()
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
