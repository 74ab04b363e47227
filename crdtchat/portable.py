"""The portable form of a conversation: its canonical section as plain JSON.

Derived and transport state are left out on purpose: they are caches and in-flight work,
and a conversation imported elsewhere must not carry another provider's handles.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crdtchat.document import Conversation, ConversationError
from crdtchat.schema import SCHEMA_VERSION, Message, Settings, ToolSpec

FORMAT = "crdtchat.conversation"


class PortableConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["crdtchat.conversation"] = FORMAT
    schema_: Literal[1] = Field(default=SCHEMA_VERSION, alias="schema")
    title: str | None = None
    created_at: float | None = None
    settings: Settings = Field(default_factory=Settings)
    tools: dict[str, ToolSpec] = Field(default_factory=dict)
    messages: list[Message] = Field(default_factory=list)


def export_conversation(conversation: Conversation) -> dict[str, Any]:
    """The canonical section as a JSON-ready dict (accepted messages, document order)."""
    created_at = conversation.meta.get("created_at")
    portable = PortableConversation(
        title=conversation.title,
        created_at=created_at if isinstance(created_at, int | float) else None,
        settings=conversation.settings,
        tools=conversation.tools,
        messages=conversation.all_messages(),
    )
    return portable.model_dump(mode="json", by_alias=True, exclude_none=True)


def export_json(conversation: Conversation) -> str:
    return json.dumps(export_conversation(conversation), ensure_ascii=False, indent=2)


def import_conversation(data: Any, *, author: str) -> Conversation:
    """A new document holding an exported conversation; authors are kept as exported.

    Raises ConversationError naming the first problem; nothing is half-imported.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ConversationError(f"not JSON: {error}") from error
    try:
        portable = PortableConversation.model_validate(data)
    except ValidationError as error:
        raise ConversationError(f"not a crdtchat conversation: {error}") from error
    seen: set[str] = set()
    for message in portable.messages:
        if message.id in seen:
            raise ConversationError(f"duplicate message id {message.id!r}")
        if message.parent is not None and message.parent not in seen:
            raise ConversationError(f"message {message.id!r}: parent must come before it")
        seen.add(message.id)

    conversation = Conversation(author=author)
    doc = conversation.doc
    with doc.transaction():
        conversation.meta["schema"] = SCHEMA_VERSION
        conversation.meta["created_at"] = portable.created_at or time.time()
        if portable.title is not None:
            conversation.meta["title"] = portable.title
        settings = portable.settings.model_dump(exclude_none=True)
        for key, value in settings.items():
            conversation.settings_map[key] = value
        for name, spec in portable.tools.items():
            conversation.tools_map[name] = spec.model_dump()
        for message in portable.messages:
            conversation.append_message(message)
    return conversation
