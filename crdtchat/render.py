"""A thread as the message lists of the two common chat API shapes.

These are the plain, stateless renderings (no derived state, no cache markers): what a
client shows or exports, and what a provider starts from before it adds its own optimisations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from crdtchat.schema import FileRef, Message


def file_note(files: Sequence[FileRef] | None) -> str:
    """File references as text: the bytes live in the blob store, not in the prompt."""
    if not files:
        return ""
    return "".join(
        f"\n[attached file: {f.name} ({f.mime}, {f.size} bytes, sha256 {f.sha256})]" for f in files
    )


def openai_messages(system: str, thread: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI Chat Completions `messages`."""
    rendered: list[dict[str, Any]] = []
    if system:
        rendered.append({"role": "system", "content": system})
    for message in thread:
        content = message.content + file_note(message.files)
        if message.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": content or None}
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in message.tool_calls
                ]
            rendered.append(item)
        elif message.role == "tool":
            rendered.append(
                {"role": "tool", "tool_call_id": message.tool_call_id, "content": content}
            )
        else:
            rendered.append({"role": message.role, "content": content})
    return rendered


def _tool_input(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}


def anthropic_messages(system: str, thread: Sequence[Message]) -> tuple[str, list[dict[str, Any]]]:
    """Anthropic Messages `(system, messages)`.

    Anthropic has no system or tool roles inside `messages`, and turns must alternate:
    system messages of the thread join the system prompt, tool results become `tool_result`
    blocks of a user turn, and consecutive same-role turns are merged.
    """
    system_parts = [system] if system else []
    rendered: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if rendered and rendered[-1]["role"] == role:
            rendered[-1]["content"].extend(blocks)
        else:
            rendered.append({"role": role, "content": blocks})

    for message in thread:
        text = message.content + file_note(message.files)
        if message.role == "system":
            system_parts.append(text)
        elif message.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            blocks += [
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": _tool_input(call.arguments),
                }
                for call in message.tool_calls or ()
            ]
            add("assistant", blocks)
        elif message.role == "tool":
            add(
                "user",
                [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": text}],
            )
        else:
            add("user", [{"type": "text", "text": text}])
    return "\n\n".join(system_parts), rendered
