"""Anthropic Messages API (`POST {base}/v1/messages`, streamed).

No server-side conversation state: the thread is sent in full, and prompt caching keeps that
cheap. Cache breakpoints (`cache_control: {"type": "ephemeral"}`; the API allows 4, we use at
most 3), placed so that each request reads what the previous one wrote:

1. the stable prefix: the last system block (the API orders tools → system → messages, so it
   covers the tools too), or the last tool when there is no system prompt;
2. the newest turn: the last block of the last message, written now, read by the next turn;
3. the previous turn: the last block of the user turn before the last assistant message,
   i.e. exactly where breakpoint 2 was in the previous request, so that prefix is a hit
   however many blocks the new turn added (the API only looks back 20 blocks on its own).

Thinking and redacted-thinking blocks (with their signatures) are recorded as `hidden`
entries, and sent back as the leading blocks of their assistant message only when the worker
passes them in (it does so only for the exact provider, api and model that made them; a
signature is bound to its model). Elsewhere they are absent, never turned into text. If the
API still refuses a signature, the entries are discarded and the turn replayed without them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from crdtchat.providers.base import (
    DiscardDerived,
    Finished,
    NewDerived,
    TextDelta,
    ToolCallDone,
    TurnEvent,
    TurnRequest,
    Usage,
)
from crdtchat.providers.hosted import (
    HostedProvider,
    HttpFailure,
    Recovery,
    describe_failure,
    event_object,
    stream_call,
)
from crdtchat.providers.retry import RetryableStreamError
from crdtchat.providers.sse import SSEEvent
from crdtchat.providers.wire import (
    hidden_by_message,
    message_text,
    pick_params,
    tool_arguments_object,
    tool_parameters,
)
from crdtchat.schema import Status, ToolCall

__all__ = [
    "AnthropicProvider",
    "MessagesBody",
    "MessagesStreamParser",
    "build_messages_body",
    "count_cache_breakpoints",
]

NAME = "anthropic"
API = "messages"
DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_BASE_URL = "https://api.anthropic.com"
KEY_VAR = "ANTHROPIC_API_KEY"
BASE_VAR = "ANTHROPIC_BASE_URL"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
EPHEMERAL = {"type": "ephemeral"}
# In-band `error` events worth another try.
RETRYABLE_STREAM_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
HIDDEN_BLOCK_TYPES = frozenset({"thinking", "redacted_thinking"})

_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop": "stop_sequences",
    "stop_sequences": "stop_sequences",
}


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class MessagesBody:
    body: dict[str, Any]
    hidden_keys: tuple[str, ...] = ()


def _text_block(text: str) -> dict[str, Any]:
    # The API refuses empty or whitespace-only text blocks.
    return {"type": "text", "text": text if text.strip() else "(empty)"}


def build_messages_body(
    request: TurnRequest, *, model: str, use_hidden: bool = True
) -> MessagesBody:
    """The full thread as Messages API turns, with cache breakpoints as the module says."""
    hidden = hidden_by_message(request, "blocks") if use_hidden else {}
    used_hidden: list[str] = []
    system: list[dict[str, Any]] = []
    if request.system.strip():
        system.append({"type": "text", "text": request.system})

    # (role, blocks) with consecutive same-role turns merged: the API wants alternation, and
    # all results of one round of tool calls must come back in a single user turn.
    turns: list[tuple[str, list[dict[str, Any]]]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))

    for message in request.thread:
        if message.role == "system":
            # No system role inside `messages`: these join the system prompt, in order.
            text = message_text(message)
            if text.strip():
                system.append({"type": "text", "text": text})
        elif message.role == "user":
            add("user", [_text_block(message_text(message))])
        elif message.role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": message.tool_call_id or "",
                        "content": message_text(message) or "(empty)",
                    }
                ],
            )
        else:
            blocks: list[dict[str, Any]] = []
            ref = hidden.get(message.id)
            if ref is not None:
                kept = [
                    dict(b)
                    for b in ref.entry.data["blocks"]
                    if isinstance(b, dict) and b.get("type") in HIDDEN_BLOCK_TYPES
                ]
                if kept:
                    blocks.extend(kept)
                    used_hidden.append(ref.key)
            if message.content.strip():
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls or ():
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": tool_arguments_object(call.arguments),
                    }
                )
            # A turn of only thinking blocks says nothing; drop it rather than send it bare.
            if any(b["type"] not in HIDDEN_BLOCK_TYPES for b in blocks):
                add("assistant", blocks)

    tools = [
        {"name": name, "description": spec.description, "input_schema": tool_parameters(spec)}
        for name, spec in request.tools.items()
    ]

    # Breakpoint 1: the stable prefix.
    if system:
        system[-1]["cache_control"] = dict(EPHEMERAL)
    elif tools:
        tools[-1]["cache_control"] = dict(EPHEMERAL)
    # Breakpoints 2 and 3: the newest turn, and the previous one.
    if turns:
        _mark_last_block(turns[-1][1])
        last_assistant = max(
            (i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None
        )
        if last_assistant is not None and last_assistant > 0:
            previous_user = last_assistant - 1
            if turns[previous_user][0] == "user" and previous_user != len(turns) - 1:
                _mark_last_block(turns[previous_user][1])

    body: dict[str, Any] = {
        "model": model,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": role, "content": blocks} for role, blocks in turns],
        "stream": True,
    }
    if system:
        body["system"] = system
    if tools:
        body["tools"] = tools
    body.update(pick_params(request.params, _PARAMS))
    max_tokens = request.params.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0:
        body["max_tokens"] = max_tokens
    thinking = request.params.get("thinking")
    budget = request.params.get("thinking_budget")
    if isinstance(thinking, dict):
        body["thinking"] = dict(thinking)
    elif isinstance(budget, int) and budget > 0:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    spent = body.get("thinking", {}).get("budget_tokens")
    if isinstance(spent, int) and body["max_tokens"] <= spent:
        body["max_tokens"] = spent + DEFAULT_MAX_TOKENS  # the API requires max > budget
    return MessagesBody(body=body, hidden_keys=tuple(used_hidden))


def _mark_last_block(blocks: list[dict[str, Any]]) -> None:
    for block in reversed(blocks):
        if block.get("type") not in HIDDEN_BLOCK_TYPES:  # thinking blocks cannot be marked
            block["cache_control"] = dict(EPHEMERAL)
            return


def count_cache_breakpoints(body: Mapping[str, Any]) -> int:
    """How many `cache_control` markers a body carries (the API refuses more than 4)."""
    count = 0
    for block in body.get("tools", ()):
        count += "cache_control" in block
    system = body.get("system")
    for block in system if isinstance(system, list) else ():
        count += "cache_control" in block
    for message in body.get("messages", ()):
        content = message.get("content")
        for block in content if isinstance(content, list) else ():
            count += "cache_control" in block
    return count


# ---------------------------------------------------------------- stream parser


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class _Block:
    type: str
    data: dict[str, Any]
    parts: list[str] = field(default_factory=list)


_STOP_STATUS: dict[str, Status] = {
    "end_turn": "complete",
    "tool_use": "complete",
    "stop_sequence": "complete",
    "refusal": "complete",
    "max_tokens": "incomplete",
    "model_context_window_exceeded": "incomplete",
    "pause_turn": "incomplete",
}

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


class MessagesStreamParser:
    """Messages API events → turn events. Pure: feed it decoded `SSEEvent`s."""

    def __init__(self) -> None:
        self._blocks: dict[int, _Block] = {}
        self._hidden: list[tuple[int, dict[str, Any]]] = []
        self._usage: dict[str, Any] = {}
        self._stop_reason: str | None = None
        self._done = False

    def feed(self, event: SSEEvent) -> list[TurnEvent]:
        if self._done:
            return []
        data = event_object(event)
        kind = data.get("type") or event.event
        handler = _HANDLERS.get(kind)
        return handler(self, data) if handler is not None else []

    def end_of_stream(self) -> list[TurnEvent]:
        return []  # only message_stop ends a message

    def usage(self) -> Usage:
        """Anthropic's `input_tokens` excludes cache reads and writes; ours is the total."""
        raw = dict(self._usage)
        uncached = _int(raw.get("input_tokens"))
        read = _int(raw.get("cache_read_input_tokens"))
        written = _int(raw.get("cache_creation_input_tokens"))
        return Usage(
            input_tokens=uncached + read + written,
            output_tokens=_int(raw.get("output_tokens")),
            cached_input_tokens=read,
            cache_creation_input_tokens=written,
            raw=raw,
        )

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for name in _USAGE_FIELDS:
                if usage.get(name) is not None:
                    self._usage[name] = usage[name]

    # -- handlers

    def _message_start(self, data: dict[str, Any]) -> list[TurnEvent]:
        message = data.get("message")
        if isinstance(message, dict):
            self._merge_usage(message.get("usage"))
        return []

    def _block_start(self, data: dict[str, Any]) -> list[TurnEvent]:
        index = _int(data.get("index"))
        block = data.get("content_block")
        if not isinstance(block, dict):
            return []
        kind = str(block.get("type", ""))
        self._blocks[index] = _Block(kind, dict(block))
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return [TextDelta(block["text"])]
        return []

    def _block_delta(self, data: dict[str, Any]) -> list[TurnEvent]:
        block = self._blocks.get(_int(data.get("index")))
        delta = data.get("delta")
        if block is None or not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
            return [TextDelta(delta["text"])]
        if kind == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            block.parts.append(delta["partial_json"])
        elif kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            block.data["thinking"] = str(block.data.get("thinking") or "") + delta["thinking"]
        elif kind == "signature_delta" and isinstance(delta.get("signature"), str):
            block.data["signature"] = str(block.data.get("signature") or "") + delta["signature"]
        return []

    def _block_stop(self, data: dict[str, Any]) -> list[TurnEvent]:
        index = _int(data.get("index"))
        block = self._blocks.pop(index, None)
        if block is None:
            return []
        if block.type == "tool_use":
            arguments = "".join(block.parts)
            if not arguments.strip():
                arguments = json.dumps(block.data.get("input") or {})
            call_id, name = block.data.get("id"), block.data.get("name")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise RetryableStreamError("tool_use block without id or name")
            return [ToolCallDone(ToolCall(id=call_id, name=name, arguments=arguments))]
        if block.type == "thinking" and block.data.get("signature"):
            self._hidden.append(
                (
                    index,
                    {
                        "type": "thinking",
                        "thinking": str(block.data.get("thinking") or ""),
                        "signature": str(block.data["signature"]),
                    },
                )
            )
        elif block.type == "redacted_thinking" and block.data.get("data"):
            self._hidden.append((index, {"type": "redacted_thinking", "data": block.data["data"]}))
        return []

    def _message_delta(self, data: dict[str, Any]) -> list[TurnEvent]:
        delta = data.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason"):
            self._stop_reason = str(delta["stop_reason"])
        self._merge_usage(data.get("usage"))
        return []

    def _message_stop(self, data: dict[str, Any]) -> list[TurnEvent]:
        self._done = True
        derived: tuple[NewDerived, ...] = ()
        if self._hidden:
            blocks = [block for _, block in sorted(self._hidden, key=lambda pair: pair[0])]
            derived = (NewDerived(kind="hidden", data={"blocks": blocks}),)
        reason = self._stop_reason
        status = _STOP_STATUS.get(reason or "", "complete")
        error = None if status == "complete" else f"stop_reason: {reason}"
        return [Finished(status=status, usage=self.usage(), derived=derived, error=error)]

    def _error(self, data: dict[str, Any]) -> list[TurnEvent]:
        err = data.get("error") if isinstance(data.get("error"), dict) else {}
        kind = err.get("type")
        message = err.get("message") or "error event"
        if kind in RETRYABLE_STREAM_ERRORS:
            raise RetryableStreamError(f"{kind}: {message}")
        self._done = True
        return [Finished(status="error", usage=self.usage(), error=f"{kind}: {message}")]


_HANDLERS = {
    "message_start": MessagesStreamParser._message_start,
    "content_block_start": MessagesStreamParser._block_start,
    "content_block_delta": MessagesStreamParser._block_delta,
    "content_block_stop": MessagesStreamParser._block_stop,
    "message_delta": MessagesStreamParser._message_delta,
    "message_stop": MessagesStreamParser._message_stop,
    "error": MessagesStreamParser._error,
}


# ---------------------------------------------------------------- provider


def _signature_refused(failure: HttpFailure) -> bool:
    """A 400 about a thinking block: its signature (or redacted data) is not valid here."""
    message = str(failure.error_object().get("message") or "")
    return failure.status == 400 and ("signature" in message or "thinking" in message)


class AnthropicProvider(HostedProvider):
    """`crdtchat worker --provider anthropic`. Keys and endpoint as the official SDK reads them."""

    name = NAME
    api = API
    default_model = DEFAULT_MODEL
    default_base_url = DEFAULT_BASE_URL
    key_variable = KEY_VAR
    base_variable = BASE_VAR

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        problem = self.config_error()
        if problem is not None:
            yield Finished(status="error", error=problem)
            return
        model = request.model or self.model
        built = build_messages_body(request, model=model)

        def recover(failure: HttpFailure) -> Recovery | None:
            nonlocal built
            if not built.hidden_keys or not _signature_refused(failure):
                return None
            reason = str(failure.error_object().get("message") or "thinking signature refused")
            events: list[TurnEvent] = [DiscardDerived(key, reason) for key in built.hidden_keys]
            built = build_messages_body(request, model=model, use_hidden=False)
            return Recovery(events=events, body=built.body)

        headers = {"anthropic-version": API_VERSION}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        async for event in stream_call(
            url=f"{self.base_url}/v1/messages",
            headers=headers,
            body=built.body,
            new_parser=MessagesStreamParser,
            policy=self.retry,
            describe=lambda failure: describe_failure(failure, key_var=KEY_VAR),
            recover=recover,
            client=self.client,
            timeout=self.timeout,
        ):
            yield event
