"""OpenAI Responses API (`POST {base}/responses`, streamed).

Server-side state saves tokens: when the thread has a usable `provider_state` entry (the
worker checked design §2's three rules), only the messages after it are sent, with
`previous_response_id`; never that id together with the full history (that bills twice).
When the server has forgotten the id (`previous_response_not_found`), the entry is discarded
and the full thread replayed within the same call.

The system prompt travels as the first input item (role `developer`, which is what
`instructions` stands for) of every full request: turn 1 and replays. It is then part of the
stored response, so later turns send only new messages; `instructions` would have to be
resent every turn, since `previous_response_id` never carries it over. A changed system prompt
changes the prefix hash, so the old response id is unusable and the thread is replayed with
the new one. Entries from before this rule lack the `system_in_input` mark, and turns chained
on them still send `instructions`.

With `store: false` nothing is kept server-side; reasoning items then come back with
`encrypted_content`, are recorded as `hidden` entries, and are echoed in front of the
assistant message that produced them whenever the worker passes them in (it passes them only
to the exact provider, api and model that made them).
"""

from __future__ import annotations

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
    latest_provider_state,
    message_text,
    pick_params,
    tool_parameters,
)
from crdtchat.schema import Message, ToolCall

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "OpenAIResponsesProvider",
    "ResponsesBody",
    "ResponsesStreamParser",
    "build_responses_body",
    "system_item",
]

NAME = "openai"
API = "responses"
DEFAULT_MODEL = "gpt-5-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEY_VAR = "OPENAI_API_KEY"
BASE_VAR = "OPENAI_BASE_URL"
# Stored responses live 30 days unless deleted; the entry says so, so it is dropped in time.
RESPONSE_TTL = 30 * 24 * 3600.0
# Marks a `provider_state` whose stored response holds the system prompt as an input item.
SYSTEM_IN_CONTEXT = "system_in_input"
# In-band `error` events worth another try (the request itself was fine).
RETRYABLE_STREAM_CODES = frozenset({"server_error", "rate_limit_exceeded", "server_is_overloaded"})

_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_output_tokens",
    "max_output_tokens": "max_output_tokens",
    "parallel_tool_calls": "parallel_tool_calls",
    "service_tier": "service_tier",
    "truncation": "truncation",
}


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class ResponsesBody:
    """A request body and the derived entries it relies on (to discard them if refused)."""

    body: dict[str, Any]
    state_key: str | None = None
    hidden_keys: tuple[str, ...] = ()


def system_item(text: str) -> dict[str, Any]:
    """The system prompt as an input item (`developer`: what `instructions` stands for)."""
    return {"type": "message", "role": "developer", "content": text}


def _message_items(message: Message, hidden: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [
            {
                "type": "function_call_output",
                "call_id": message.tool_call_id or "",
                "output": message_text(message),
            }
        ]
    if message.role != "assistant":
        return [{"type": "message", "role": message.role, "content": message_text(message)}]
    items: list[dict[str, Any]] = list(hidden or [])
    if message.content:
        items.append({"type": "message", "role": "assistant", "content": message.content})
    for call in message.tool_calls or ():
        items.append(
            {
                "type": "function_call",
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
            }
        )
    return items


def build_responses_body(
    request: TurnRequest,
    *,
    model: str,
    store: bool,
    use_state: bool = True,
    use_hidden: bool = True,
) -> ResponsesBody:
    """The JSON body for `request`: incremental after a usable response id, else complete."""
    state = latest_provider_state(request, "response_id") if use_state else None
    if state is not None and state.index >= len(request.thread) - 1:
        state = None  # nothing new to send after it: fall back to the full thread
    hidden = hidden_by_message(request, "items") if use_hidden else {}
    start = state.index + 1 if state is not None else 0

    items: list[dict[str, Any]] = []
    used_hidden: list[str] = []
    for message in request.thread[start:]:
        ref = hidden.get(message.id)
        blobs = None
        if ref is not None:
            blobs = [dict(item) for item in ref.entry.data["items"] if isinstance(item, dict)]
            used_hidden.append(ref.key)
        items.extend(_message_items(message, blobs))

    body: dict[str, Any] = {"model": model, "input": items, "stream": True, "store": store}
    if request.system:
        if state is None:
            # An input item is part of the stored response, so turns that chain on it need not
            # resend it; `instructions` would be, since the API never carries it over.
            items.insert(0, system_item(request.system))
        elif state.entry.data.get(SYSTEM_IN_CONTEXT) is not True:
            # A response stored before the system prompt travelled as an input item: its
            # chain lacks it, so it goes as `instructions`, as it did then.
            body["instructions"] = request.system
    if state is not None:
        body["previous_response_id"] = state.entry.data["response_id"]
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "name": name,
                "description": spec.description,
                "parameters": tool_parameters(spec),
            }
            for name, spec in request.tools.items()
        ]
    if not store:
        body["include"] = ["reasoning.encrypted_content"]
    if request.conversation_id:
        body["prompt_cache_key"] = request.conversation_id
    body.update(pick_params(request.params, _PARAMS))
    effort = request.params.get("reasoning_effort")
    if isinstance(effort, str):
        body["reasoning"] = {"effort": effort}
    return ResponsesBody(
        body=body,
        state_key=state.key if state is not None else None,
        hidden_keys=tuple(used_hidden),
    )


# ---------------------------------------------------------------- stream parser


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    details = raw.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        input_tokens=_int(raw.get("input_tokens")),
        output_tokens=_int(raw.get("output_tokens")),
        cached_input_tokens=_int(cached),
        raw=raw,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class _Call:
    call_id: str
    name: str
    parts: list[str] = field(default_factory=list)
    final: str | None = None


class ResponsesStreamParser:
    """Responses SSE events → turn events. Pure: feed it decoded `SSEEvent`s."""

    def __init__(self, *, store: bool = True, keep_reasoning: bool = False) -> None:
        self.store = store
        self.keep_reasoning = keep_reasoning
        self.response_id: str | None = None
        self._calls: dict[str, _Call] = {}
        self._reasoning: list[dict[str, Any]] = []
        self._done = False

    def feed(self, event: SSEEvent) -> list[TurnEvent]:
        if self._done or event.data == "[DONE]":
            return []
        data = event_object(event)
        kind = data.get("type") or event.event
        handler = _HANDLERS.get(kind)
        return handler(self, data) if handler is not None else []

    def end_of_stream(self) -> list[TurnEvent]:
        return []  # a Responses stream always ends with completed/incomplete/failed

    # -- handlers

    def _created(self, data: dict[str, Any]) -> list[TurnEvent]:
        response = data.get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            self.response_id = response["id"]
        return []

    def _item_added(self, data: dict[str, Any]) -> list[TurnEvent]:
        item = data.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            item_id = str(item.get("id") or item.get("call_id") or "")
            call = _Call(
                call_id=str(item.get("call_id") or item_id), name=str(item.get("name", ""))
            )
            if item.get("arguments"):
                call.parts.append(str(item["arguments"]))
            self._calls[item_id] = call
        return []

    def _args_delta(self, data: dict[str, Any]) -> list[TurnEvent]:
        call = self._calls.get(str(data.get("item_id", "")))
        if call is not None and isinstance(data.get("delta"), str):
            call.parts.append(data["delta"])
        return []

    def _args_done(self, data: dict[str, Any]) -> list[TurnEvent]:
        call = self._calls.get(str(data.get("item_id", "")))
        if call is not None and isinstance(data.get("arguments"), str):
            call.final = data["arguments"]
        return []

    def _item_done(self, data: dict[str, Any]) -> list[TurnEvent]:
        item = data.get("item")
        if not isinstance(item, dict):
            return []
        if item.get("type") == "function_call":
            item_id = str(item.get("id") or item.get("call_id") or "")
            call = self._calls.pop(item_id, None)
            call_id = str(item.get("call_id") or (call.call_id if call else "") or item_id)
            name = str(item.get("name") or (call.name if call else ""))
            arguments = item.get("arguments")
            if not isinstance(arguments, str):
                arguments = (call.final if call and call.final is not None else None) or (
                    "".join(call.parts) if call else ""
                )
            if not call_id or not name:
                raise RetryableStreamError("function_call item without call_id or name")
            return [ToolCallDone(ToolCall(id=call_id, name=name, arguments=arguments))]
        if (
            item.get("type") == "reasoning"
            and self.keep_reasoning
            and isinstance(item.get("encrypted_content"), str)
            and item.get("id")
        ):
            kept = {
                "type": "reasoning",
                "id": item["id"],
                "summary": item.get("summary") or [],
                "encrypted_content": item["encrypted_content"],
            }
            self._reasoning.append(kept)
        return []

    def _text_delta(self, data: dict[str, Any]) -> list[TurnEvent]:
        delta = data.get("delta")
        return [TextDelta(delta)] if isinstance(delta, str) and delta else []

    def _terminal(self, data: dict[str, Any]) -> list[TurnEvent]:
        self._done = True
        response = data.get("response") if isinstance(data.get("response"), dict) else {}
        if isinstance(response.get("id"), str):
            self.response_id = response["id"]
        usage = _usage(response.get("usage"))
        kind = data.get("type")
        derived: list[NewDerived] = []
        if kind != "response.failed":
            if self.store and self.response_id:
                created = response.get("created_at")
                expires = (
                    float(created) + RESPONSE_TTL if isinstance(created, int | float) else None
                )
                derived.append(
                    NewDerived(
                        kind="provider_state",
                        data={"response_id": self.response_id, SYSTEM_IN_CONTEXT: True},
                        expires_at=expires,
                    )
                )
            if self._reasoning:
                derived.append(NewDerived(kind="hidden", data={"items": list(self._reasoning)}))
        if kind == "response.completed":
            return [Finished(status="complete", usage=usage, derived=tuple(derived))]
        if kind == "response.incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            return [
                Finished(
                    status="incomplete",
                    usage=usage,
                    derived=tuple(derived),
                    error=f"incomplete: {reason or 'unknown reason'}",
                )
            ]
        err = response.get("error") if isinstance(response.get("error"), dict) else {}
        message = err.get("message") or "the response failed"
        code = err.get("code")
        return [
            Finished(
                status="error",
                usage=usage,
                error=f"{code}: {message}" if code else str(message),
            )
        ]

    def _error(self, data: dict[str, Any]) -> list[TurnEvent]:
        # Both the documented flat shape and an `error` object are accepted.
        err = data.get("error") if isinstance(data.get("error"), dict) else data
        code = err.get("code")
        message = err.get("message") or "error event"
        if code in RETRYABLE_STREAM_CODES:
            raise RetryableStreamError(f"{code}: {message}")
        self._done = True
        return [Finished(status="error", error=f"{code}: {message}" if code else str(message))]


_HANDLERS = {
    "response.created": ResponsesStreamParser._created,
    "response.in_progress": ResponsesStreamParser._created,
    "response.output_item.added": ResponsesStreamParser._item_added,
    "response.output_item.done": ResponsesStreamParser._item_done,
    "response.function_call_arguments.delta": ResponsesStreamParser._args_delta,
    "response.function_call_arguments.done": ResponsesStreamParser._args_done,
    "response.output_text.delta": ResponsesStreamParser._text_delta,
    "response.refusal.delta": ResponsesStreamParser._text_delta,
    "response.completed": ResponsesStreamParser._terminal,
    "response.incomplete": ResponsesStreamParser._terminal,
    "response.failed": ResponsesStreamParser._terminal,
    "error": ResponsesStreamParser._error,
}


# ---------------------------------------------------------------- provider


def _hidden_refused(err: Mapping[str, Any]) -> bool:
    """Does a 400/404 say that echoed reasoning items are unusable?"""
    message = str(err.get("message") or "")
    code = str(err.get("code") or "")
    return (
        "encrypted" in code
        or "encrypted content" in message
        or (message.startswith("Item with id") and "not found" in message)
    )


class OpenAIResponsesProvider(HostedProvider):
    """`crdtchat worker --provider openai`. Keys and endpoint as the official SDK reads them."""

    name = NAME
    api = API
    default_model = DEFAULT_MODEL
    default_base_url = DEFAULT_BASE_URL
    key_variable = KEY_VAR
    base_variable = BASE_VAR

    def __init__(self, *, store: bool = True, **config: Any) -> None:
        """`store=False` keeps nothing on OpenAI's side (reasoning comes back encrypted)."""
        super().__init__(**config)
        self.store = store

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        problem = self.config_error()
        if problem is not None:
            yield Finished(status="error", error=problem)
            return
        model = request.model or self.model
        store = request.params.get("store", self.store)
        store = store if isinstance(store, bool) else self.store
        built = build_responses_body(request, model=model, store=store)
        use_state = True
        use_hidden = True

        def recover(failure: HttpFailure) -> Recovery | None:
            nonlocal built, use_state, use_hidden
            err = failure.error_object()
            events: list[TurnEvent] = []
            if (
                failure.status == 400
                and err.get("code") == "previous_response_not_found"
                and built.state_key is not None
            ):
                use_state = False
                events.append(DiscardDerived(built.state_key, str(err.get("message") or "")))
            elif failure.status in (400, 404) and built.hidden_keys and _hidden_refused(err):
                use_hidden = False
                reason = str(err.get("message") or "reasoning items refused")
                events.extend(DiscardDerived(key, reason) for key in built.hidden_keys)
            else:
                return None
            built = build_responses_body(
                request, model=model, store=store, use_state=use_state, use_hidden=use_hidden
            )
            return Recovery(events=events, body=built.body)

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async for event in stream_call(
            url=f"{self.base_url}/responses",
            headers=headers,
            body=built.body,
            new_parser=lambda: ResponsesStreamParser(store=store, keep_reasoning=not store),
            policy=self.retry,
            describe=lambda failure: describe_failure(failure, key_var=KEY_VAR),
            recover=recover,
            client=self.client,
            timeout=self.timeout,
        ):
            yield event
