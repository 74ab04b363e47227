"""OpenAI-compatible Chat Completions (`POST {base}/chat/completions`, streamed).

Speaks to anything that implements the de-facto standard: llama.cpp server, vLLM, Ollama,
LM Studio, hosted gateways, OpenAI itself. These keep no conversation state, so the full
thread is sent every time; servers with prefix caching report the saving as
`prompt_tokens_details.cached_tokens` (llama.cpp as `timings.cache_n`), which is recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from crdtchat.providers.base import (
    Finished,
    TextDelta,
    ToolCallDone,
    TurnEvent,
    TurnRequest,
    Usage,
)
from crdtchat.providers.hosted import HostedProvider, describe_failure, event_object, stream_call
from crdtchat.providers.retry import RetryableStreamError
from crdtchat.providers.sse import SSEEvent
from crdtchat.providers.wire import message_text, pick_params, tool_parameters
from crdtchat.schema import Message, Status, ToolCall

__all__ = [
    "ChatStreamParser",
    "OpenAIChatProvider",
    "build_chat_body",
]

NAME = "openai-chat"
API = "chat.completions"
DEFAULT_MODEL = "gpt-4.1-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_VAR = "OPENAI_API_KEY"
BASE_VAR = "OPENAI_BASE_URL"

_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_completion_tokens",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "parallel_tool_calls": "parallel_tool_calls",
}


# ---------------------------------------------------------------- request


def _chat_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id or "",
            "content": message_text(message),
        }
    if message.role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": message.content or None}
        if message.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ]
        elif out["content"] is None:
            out["content"] = ""
        return out
    return {"role": message.role, "content": message_text(message)}


def build_chat_body(request: TurnRequest, *, model: str) -> dict[str, Any]:
    """The full thread as Chat Completions messages (no server state to lean on)."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend(_chat_message(m) for m in request.thread)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": spec.description,
                    "parameters": tool_parameters(spec),
                },
            }
            for name, spec in request.tools.items()
        ]
    body.update(pick_params(request.params, _PARAMS))
    return body


# ---------------------------------------------------------------- stream parser


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)


_FINISH_STATUS: dict[str, Status] = {
    "stop": "complete",
    "tool_calls": "complete",
    "function_call": "complete",
    "length": "incomplete",
    "content_filter": "incomplete",
}


class ChatStreamParser:
    """Chat Completions chunks → turn events. Pure: feed it decoded `SSEEvent`s.

    Tool calls arrive as fragments keyed by `index`; they are emitted whole once the choice
    finishes. Usage arrives in a final chunk with `choices: []`, so the turn ends at
    `[DONE]` (or, for servers that omit it, at the end of the body after a finish reason).
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PendingCall] = {}
        self._finish: str | None = None
        self._calls_emitted = False
        self._usage = Usage()
        self._done = False

    def feed(self, event: SSEEvent) -> list[TurnEvent]:
        if self._done:
            return []
        if event.data.strip() == "[DONE]":
            return self._finish_turn()
        chunk = event_object(event, "chunk")
        if isinstance(chunk.get("error"), dict):
            err = chunk["error"]
            self._done = True
            return [Finished(status="error", error=str(err.get("message") or err))]
        out: list[TurnEvent] = []
        if isinstance(chunk.get("usage"), dict):
            self._usage = self._read_usage(chunk["usage"], chunk.get("timings"))
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is never requested; ignore stray choices
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(TextDelta(content))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                out.append(TextDelta(refusal))
            for fragment in delta.get("tool_calls") or ():
                self._add_fragment(fragment)
            if choice.get("finish_reason"):
                self._finish = str(choice["finish_reason"])
                out.extend(self._emit_calls())
        return out

    def end_of_stream(self) -> list[TurnEvent]:
        # Some servers close the body without `[DONE]`: fine once the choice has finished.
        return self._finish_turn() if self._finish is not None else []

    def _add_fragment(self, fragment: Any) -> None:
        if not isinstance(fragment, dict):
            return
        index = fragment.get("index", 0)
        index = index if isinstance(index, int) else 0
        call = self._calls.setdefault(index, _PendingCall())
        if isinstance(fragment.get("id"), str) and fragment["id"]:
            call.id = fragment["id"]
        function = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
        if isinstance(function.get("name"), str) and function["name"]:
            call.name = function["name"]
        if isinstance(function.get("arguments"), str):
            call.parts.append(function["arguments"])

    def _emit_calls(self) -> list[TurnEvent]:
        if self._calls_emitted:
            return []
        self._calls_emitted = True
        out: list[TurnEvent] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                raise RetryableStreamError(f"tool call {index} has no function name")
            # Some local servers omit ids; a stable one keeps results attachable.
            call_id = call.id or f"call_{index}"
            out.append(
                ToolCallDone(ToolCall(id=call_id, name=call.name, arguments="".join(call.parts)))
            )
        return out

    @staticmethod
    def _read_usage(raw: dict[str, Any], timings: Any) -> Usage:
        details = raw.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        if not cached and isinstance(timings, dict):
            cached = _int(timings.get("cache_n"))
        return Usage(
            input_tokens=_int(raw.get("prompt_tokens")),
            output_tokens=_int(raw.get("completion_tokens")),
            cached_input_tokens=cached,
            raw=raw,
        )

    def _finish_turn(self) -> list[TurnEvent]:
        self._done = True
        out = self._emit_calls()
        reason = self._finish
        if reason is None:
            # [DONE] with no finish reason: the server gave up without saying why.
            out.append(Finished(status="incomplete", usage=self._usage, error="no finish reason"))
            return out
        status = _FINISH_STATUS.get(reason, "complete")
        error = None if status == "complete" else f"finish_reason: {reason}"
        out.append(Finished(status=status, usage=self._usage, error=error))
        return out


# ---------------------------------------------------------------- provider


class OpenAIChatProvider(HostedProvider):
    """`crdtchat worker --provider openai-chat`: any OpenAI-compatible server.

    The key is optional when `OPENAI_BASE_URL` points elsewhere than api.openai.com (local
    servers usually need none); against OpenAI itself a missing key is a config error.
    """

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
        body = build_chat_body(request, model=request.model or self.model)
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async for event in stream_call(
            url=f"{self.base_url}/chat/completions",
            headers=headers,
            body=body,
            new_parser=ChatStreamParser,
            policy=self.retry,
            describe=lambda failure: describe_failure(failure, key_var=KEY_VAR),
            client=self.client,
            timeout=self.timeout,
        ):
            yield event
