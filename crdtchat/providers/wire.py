"""Pure helpers the hosted request builders share: finding usable derived entries on the
thread, and the little conversions every vendor needs (file notes, tool schemas).

No I/O here, so builders stay testable without a network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crdtchat.providers.base import TurnRequest
from crdtchat.schema import DerivedEntry, Message, ToolSpec

__all__ = [
    "DerivedRef",
    "hidden_by_message",
    "latest_provider_state",
    "message_text",
    "pick_params",
    "tool_arguments_object",
    "tool_parameters",
]


@dataclass(frozen=True)
class DerivedRef:
    """A derived entry with its key (needed to discard it) and its message's thread index."""

    key: str
    index: int
    entry: DerivedEntry


def _thread_index(thread: Sequence[Message]) -> dict[str, int]:
    return {message.id: i for i, message in enumerate(thread)}


def latest_provider_state(request: TurnRequest, field: str) -> DerivedRef | None:
    """The `provider_state` entry nearest the end of the thread whose data has `field`.

    Ties (two entries for one message) go to the newer `created_at`, then the key, so the
    choice is deterministic.
    """
    index = _thread_index(request.thread)
    best: DerivedRef | None = None
    for key, entry in request.derived.items():
        if entry.kind != "provider_state":
            continue
        value = entry.data.get(field)
        at = index.get(entry.message_id)
        if at is None or not isinstance(value, str) or not value:
            continue
        candidate = DerivedRef(key, at, entry)
        if best is None or (at, entry.created_at, key) > (
            best.index,
            best.entry.created_at,
            best.key,
        ):
            best = candidate
    return best


def hidden_by_message(request: TurnRequest, field: str) -> dict[str, DerivedRef]:
    """`hidden` entries per message id, keeping only those whose data[field] is a list.

    The worker already filtered entries to this provider, api and model; the `field` check
    keeps a blob of another shape from ever being sent.
    """
    index = _thread_index(request.thread)
    found: dict[str, DerivedRef] = {}
    for key, entry in sorted(request.derived.items()):
        if entry.kind != "hidden":
            continue
        at = index.get(entry.message_id)
        blobs = entry.data.get(field)
        if at is None or not isinstance(blobs, list) or not blobs:
            continue
        if request.thread[at].role != "assistant":
            continue
        previous = found.get(entry.message_id)
        if previous is None or entry.created_at > previous.entry.created_at:
            found[entry.message_id] = DerivedRef(key, at, entry)
    return found


def message_text(message: Message) -> str:
    """The text of a message plus a note per attached file.

    File bytes live in a blob store the providers cannot see, so the model is at least told
    that a file is there rather than silently missing it.
    """
    text = message.content
    if message.files:
        notes = "\n".join(
            f"[attached file: {f.name} ({f.mime}, {f.size} bytes, sha256 {f.sha256})]"
            for f in message.files
        )
        text = f"{text}\n{notes}" if text else notes
    return text


def tool_parameters(spec: ToolSpec) -> dict[str, Any]:
    """A JSON Schema every vendor accepts: an empty schema becomes an empty object schema."""
    params = dict(spec.parameters)
    if not params:
        return {"type": "object", "properties": {}}
    params.setdefault("type", "object")
    return params


def tool_arguments_object(arguments: str) -> dict[str, Any]:
    """Arguments as an object, for APIs that want one (Anthropic `tool_use.input`).

    A model may have produced arguments that are not a JSON object; they are wrapped rather
    than dropped so the replayed history still says what was called.
    """
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_arguments": value}


def pick_params(params: Mapping[str, Any], allowed: Mapping[str, str]) -> dict[str, Any]:
    """Copy the settings params a vendor understands, renamed to its spelling."""
    out: dict[str, Any] = {}
    for ours, theirs in allowed.items():
        if ours in params and params[ours] is not None:
            out[theirs] = params[ours]
    return out
