"""A loopback OpenAI server: the subset of the Responses and Chat Completions APIs we use.

Faithful where our code depends on it (checked with the official `openai` SDK in the tests):
streamed events with `sequence_number`, stored responses that expire, the exact
`previous_response_not_found` error body, `store: false` with encrypted reasoning bound to
its model, function calls, usage with `cached_tokens`. The "model" is the scripted rule of
`loopback.http.script_reply`; tokens are whitespace words; tokens reached through
`previous_response_id` count as cached (Responses), as does the longest message prefix seen
before (Chat Completions, like automatic prefix caching).

Run `python -m crdtchat.loopback.openai_server --port 8080` for demos; then
`OPENAI_BASE_URL=http://127.0.0.1:8080/v1`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from crdtchat.errors import RemoteProtocolError
from crdtchat.loopback.http import (
    Fault,
    JSONReply,
    LoggedRequest,
    LoopbackServer,
    Signer,
    SSEEventSpec,
    SSEReply,
    count_tokens,
    run_until_interrupted,
    script_reply,
    word_pieces,
)

__all__ = ["OpenAILoopback", "StoredResponse"]

DEFAULT_TTL = 30 * 24 * 3600.0
REASONING_TOKENS = 4  # what the fake "spends" thinking, when it reasons


@dataclass
class StoredResponse:
    id: str
    model: str
    context: list[dict[str, Any]]  # every input item the response saw, in order
    output: list[dict[str, Any]]
    expires_at: float
    response: dict[str, Any] = field(default_factory=dict)


class _BadRequest(RemoteProtocolError):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _item_tokens(item: dict[str, Any]) -> int:
    kind = item["type"]
    if kind == "message":
        return count_tokens(item["text"])
    if kind == "function_call":
        return count_tokens(item["name"]) + count_tokens(item["arguments"])
    if kind == "function_call_output":
        return count_tokens(item["output"])
    return 0  # reasoning: opaque


class OpenAILoopback(LoopbackServer):
    """`with OpenAILoopback() as server: OpenAI(base_url=server.base_url, api_key="x")`."""

    path_prefix = "/v1"

    def __init__(self, *, response_ttl: float = DEFAULT_TTL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.response_ttl = response_ttl
        self.responses: dict[str, StoredResponse] = {}
        self._stored_items: dict[str, dict[str, Any]] = {}
        self._chat_prefixes: dict[str, int] = {}  # hash of a message prefix → its tokens
        self.signer = Signer()

    # -- knobs

    def expire(self, response_id: str | None = None) -> None:
        """Make one stored response (or all) expire now, as if its TTL had passed."""
        with self._lock:
            for rid, stored in self.responses.items():
                if response_id is None or rid == response_id:
                    stored.expires_at = self.clock() - 1

    # -- vendor shapes

    def common_headers(self) -> dict[str, str]:
        return {"x-request-id": self.new_id("req"), "openai-version": "2020-10-01"}

    def error_reply(self, status: int, kind: str, message: str, **extra: Any) -> JSONReply:
        return JSONReply(
            status,
            {
                "error": {
                    "message": message,
                    "type": kind,
                    "param": extra.get("param"),
                    "code": extra.get("code"),
                }
            },
            dict(extra.get("headers") or {}),
        )

    def fault_reply(self, fault: Fault) -> JSONReply:
        if fault.status == 429:
            return self.error_reply(
                429,
                "requests",
                fault.message or "Rate limit reached for requests. Please try again later.",
                code="rate_limit_exceeded",
                headers=fault.headers,
            )
        if fault.status >= 500:
            return self.error_reply(
                fault.status,
                "server_error",
                fault.message
                or "The server had an error while processing your request. Sorry about that!",
                headers=fault.headers,
            )
        return self.error_reply(
            fault.status,
            "invalid_request_error",
            fault.message or "injected error",
            headers=fault.headers,
        )

    # -- dispatch

    def handle(self, request: LoggedRequest) -> JSONReply | SSEReply:
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                shown = auth.removeprefix("Bearer ")[-4:]
                return self.error_reply(
                    401,
                    "invalid_request_error",
                    f"Incorrect API key provided: ...{shown}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                )
        path = request.path.split("?", 1)[0]
        body = request.body
        if request.method == "POST" and not isinstance(body, dict):
            return self.error_reply(400, "invalid_request_error", "The body must be a JSON object.")
        try:
            if request.method == "POST" and path == "/v1/responses":
                return self._responses(request, body)
            if request.method == "POST" and path == "/v1/chat/completions":
                return self._chat(request, body)
            if request.method == "GET" and path.startswith("/v1/responses/"):
                return self._get_response(path.rsplit("/", 1)[1])
        except _BadRequest as bad:
            return self.error_reply(
                bad.status, bad.kind, bad.message, param=bad.param, code=bad.code
            )
        return self.error_reply(
            404, "invalid_request_error", f"Invalid URL ({request.method} {path})"
        )

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(
                400,
                "Missing required parameter: 'model'.",
                param="model",
                code="missing_required_parameter",
            )
        if self.models is not None and model not in self.models:
            raise _BadRequest(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return model

    # ------------------------------------------------------------ Responses

    def _get_response(self, response_id: str) -> JSONReply:
        with self._lock:
            stored = self.responses.get(response_id)
            if stored is None or stored.expires_at <= self.clock():
                return self.error_reply(
                    404,
                    "invalid_request_error",
                    f"Response with id '{response_id}' not found.",
                    param="response_id",
                )
            return JSONReply(200, stored.response)

    def _normalise_input(self, raw: Any, model: str) -> list[dict[str, Any]]:
        if isinstance(raw, str):
            return [{"type": "message", "role": "user", "text": raw}]
        if not isinstance(raw, list):
            raise _BadRequest(
                400,
                "Invalid type for 'input': expected a string or an array.",
                param="input",
                code="invalid_type",
            )
        items: list[dict[str, Any]] = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise _BadRequest(
                    400, f"Invalid type for 'input[{i}]'.", param=f"input[{i}]", code="invalid_type"
                )
            kind = item.get("type") or ("message" if "role" in item else None)
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    raise _BadRequest(
                        400,
                        f"Invalid value: '{role}'. Supported values are: "
                        "'assistant', 'system', 'developer', and 'user'.",
                        param=f"input[{i}].role",
                        code="invalid_value",
                    )
                items.append(
                    {"type": "message", "role": role, "text": _text_of(item.get("content"))}
                )
            elif kind == "function_call":
                items.append(
                    {
                        "type": "function_call",
                        "call_id": str(item.get("call_id", "")),
                        "name": str(item.get("name", "")),
                        "arguments": str(item.get("arguments", "")),
                    }
                )
            elif kind == "function_call_output":
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": str(item.get("call_id", "")),
                        "output": _text_of(item.get("output")),
                    }
                )
            elif kind == "reasoning":
                items.append(self._check_reasoning(item, model))
            else:
                raise _BadRequest(
                    400, f"Invalid value: '{kind}'.", param=f"input[{i}].type", code="invalid_value"
                )
        return items

    def _check_reasoning(self, item: dict[str, Any], model: str) -> dict[str, Any]:
        item_id = str(item.get("id", ""))
        blob = item.get("encrypted_content")
        if blob is not None:
            if not self.signer.verify_blob(model, blob):
                raise _BadRequest(
                    400,
                    f"The encrypted content for item {item_id} could not be verified.",
                    code="invalid_encrypted_content",
                )
            return {"type": "reasoning", "id": item_id}
        with self._lock:
            if item_id not in self._stored_items:
                raise _BadRequest(
                    404,
                    f"Item with id '{item_id}' not found. Items are not persisted when `store` is "
                    "set to false. Try again with `store` set to true, or remove this item from "
                    "your input.",
                    param="input",
                )
        return {"type": "reasoning", "id": item_id}

    def _responses(self, request: LoggedRequest, body: dict[str, Any]) -> JSONReply | SSEReply:
        model = self._check_model(body)
        store = body.get("store", True) is not False
        include = body.get("include") or []
        prev_id = body.get("previous_response_id")
        if prev_id is not None and body.get("conversation") is not None:
            raise _BadRequest(
                400,
                "Mutually exclusive parameters: 'previous_response_id' and 'conversation'.",
                param="previous_response_id",
            )
        prior: list[dict[str, Any]] = []
        if prev_id is not None:
            with self._lock:
                stored = self.responses.get(str(prev_id))
                if stored is None or stored.expires_at <= self.clock():
                    raise _BadRequest(
                        400,
                        f"Previous response with id '{prev_id}' not found.",
                        param="previous_response_id",
                        code="previous_response_not_found",
                    )
                prior = stored.context + stored.output
        new_items = self._normalise_input(body.get("input", []), model)
        context = prior + new_items
        self._check_tool_outputs(context)

        instructions = (
            body.get("instructions") if isinstance(body.get("instructions"), str) else None
        )
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        tool_names = [str(t.get("name")) for t in tools if t.get("type") == "function"]
        reply = self._script(context, tool_names)
        reasons = bool(body.get("reasoning")) or model.startswith(("o1", "o3", "o4", "gpt-5"))

        response_id = self.new_id("resp")
        output: list[dict[str, Any]] = []
        if reasons:
            rs = {"id": self.new_id("rs"), "type": "reasoning", "summary": []}
            if "reasoning.encrypted_content" in include:
                rs["encrypted_content"] = self.signer.blob(model)
            output.append(rs)
        status, incomplete = "completed", None
        limit = body.get("max_output_tokens")
        if reply.tool_name is not None:
            output.append(
                {
                    "id": self.new_id("fc"),
                    "type": "function_call",
                    "status": "completed",
                    "call_id": self.new_id("call"),
                    "name": reply.tool_name,
                    "arguments": reply.tool_arguments,
                }
            )
            out_tokens = count_tokens(reply.tool_arguments)
        else:
            text = reply.text
            if isinstance(limit, int) and count_tokens(text) > limit:
                text = " ".join(text.split()[:limit])
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            output.append(
                {
                    "id": self.new_id("msg"),
                    "type": "message",
                    "status": status,
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                    ],
                }
            )
            out_tokens = count_tokens(text)

        cached = sum(_item_tokens(i) for i in prior)
        input_tokens = count_tokens(instructions or "") + sum(_item_tokens(i) for i in context)
        reasoning_tokens = REASONING_TOKENS if reasons else 0
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": out_tokens + reasoning_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + out_tokens + reasoning_tokens,
        }
        request.usage = usage
        created = int(self.clock())
        response = {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": instructions,
            "max_output_tokens": limit if isinstance(limit, int) else None,
            "model": model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": prev_id,
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": store,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": [{**t, "strict": t.get("strict", True)} for t in tools],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": None,
            "metadata": body.get("metadata") or {},
        }
        if store:
            with self._lock:
                self.responses[response_id] = StoredResponse(
                    id=response_id,
                    model=model,
                    context=context,
                    output=[self._as_context(o) for o in output],
                    expires_at=self.clock() + self.response_ttl,
                    response=response,
                )
                for item in output:
                    self._stored_items[item["id"]] = item
        if not body.get("stream"):
            return JSONReply(200, response)
        return SSEReply(self._response_events(response), error_event=self._response_error_event)

    def _check_tool_outputs(self, context: list[dict[str, Any]]) -> None:
        calls = {i["call_id"] for i in context if i["type"] == "function_call"}
        for item in context:
            if item["type"] == "function_call_output" and item["call_id"] not in calls:
                raise _BadRequest(
                    400,
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    param="input",
                )

    @staticmethod
    def _as_context(item: dict[str, Any]) -> dict[str, Any]:
        if item["type"] == "message":
            return {"type": "message", "role": "assistant", "text": _text_of(item["content"])}
        if item["type"] == "function_call":
            return {
                "type": "function_call",
                "call_id": item["call_id"],
                "name": item["name"],
                "arguments": item["arguments"],
            }
        return {"type": "reasoning", "id": item["id"]}

    @staticmethod
    def _script(context: list[dict[str, Any]], tool_names: list[str]) -> Any:
        users = [i for i in context if i["type"] == "message" and i["role"] == "user"]
        last = context[-1] if context else None
        tool_output = last["output"] if last and last["type"] == "function_call_output" else None
        return script_reply(
            last_user_text=users[-1]["text"] if users else "",
            user_turns=len(users),
            tool_names=tool_names,
            tool_output=tool_output,
        )

    @staticmethod
    def _response_events(response: dict[str, Any]) -> list[SSEEventSpec]:
        events: list[SSEEventSpec] = []

        def emit(kind: str, **fields: Any) -> None:
            events.append((kind, {"type": kind, "sequence_number": len(events), **fields}))

        start = {
            **response,
            "status": "in_progress",
            "output": [],
            "usage": None,
            "incomplete_details": None,
        }
        emit("response.created", response=start)
        emit("response.in_progress", response=start)
        for index, item in enumerate(response["output"]):
            if item["type"] == "reasoning":
                emit("response.output_item.added", output_index=index, item=item)
                emit("response.output_item.done", output_index=index, item=item)
            elif item["type"] == "function_call":
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
                for piece in word_pieces(item["arguments"]):
                    emit(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=index,
                        delta=piece,
                    )
                emit(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
                emit("response.output_item.done", output_index=index, item=item)
            else:
                part = item["content"][0]
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
                emit(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part={**part, "text": ""},
                )
                for piece in word_pieces(part["text"]):
                    emit(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        delta=piece,
                        logprobs=[],
                    )
                emit(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                )
                emit(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
                emit("response.output_item.done", output_index=index, item=item)
        final = "response.completed" if response["status"] == "completed" else "response.incomplete"
        emit(final, response=response)
        return events

    @staticmethod
    def _response_error_event(index: int, fault: Fault) -> SSEEventSpec:
        return (
            "error",
            {
                "type": "error",
                "sequence_number": index,
                "code": "server_error",
                "message": fault.message
                or "The server had an error while processing your request.",
                "param": None,
            },
        )

    # ------------------------------------------------------------ Chat Completions

    def _chat(self, request: LoggedRequest, body: dict[str, Any]) -> JSONReply | SSEReply:
        model = self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(
                400,
                "Invalid 'messages': empty array. Expected an array with "
                "minimum length 1, but got an empty array instead.",
                param="messages",
                code="empty_array",
            )
        open_calls: set[str] = set()
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise _BadRequest(
                    400,
                    f"Invalid value: '{role}'.",
                    param=f"messages[{i}].role",
                    code="invalid_value",
                )
            if role == "assistant":
                open_calls = {str(c.get("id")) for c in m.get("tool_calls") or []}
            elif role == "tool":
                if str(m.get("tool_call_id")) not in open_calls:
                    raise _BadRequest(
                        400,
                        "Invalid parameter: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'.",
                        param=f"messages.[{i}].role",
                    )
            else:
                open_calls = set()
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        tool_names = [str((t.get("function") or {}).get("name")) for t in tools]
        users = [m for m in messages if m["role"] == "user"]
        last = messages[-1]
        reply = script_reply(
            last_user_text=_text_of(users[-1].get("content")) if users else "",
            user_turns=len(users),
            tool_names=tool_names,
            tool_output=_text_of(last.get("content")) if last["role"] == "tool" else None,
        )

        # Prefix caching: the longest message prefix of an earlier request is "cached".
        tokens = [self._chat_tokens(m) for m in messages]
        cached = 0
        digest = hashlib.sha256(model.encode())
        hashes = []
        for m in messages:
            digest.update(json.dumps(m, sort_keys=True).encode())
            hashes.append(digest.copy().hexdigest())
        with self._lock:
            for n, h in enumerate(hashes):
                if h in self._chat_prefixes:
                    cached = sum(tokens[: n + 1])
            for n, h in enumerate(hashes):
                self._chat_prefixes[h] = sum(tokens[: n + 1])
        prompt_tokens = sum(tokens)

        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        tool_call = None
        text = reply.text
        if reply.tool_name is not None:
            finish = "tool_calls"
            tool_call = {
                "id": self.new_id("call"),
                "type": "function",
                "function": {"name": reply.tool_name, "arguments": reply.tool_arguments},
            }
            completion_tokens = count_tokens(reply.tool_arguments)
        else:
            if isinstance(limit, int) and count_tokens(text) > limit:
                text, finish = " ".join(text.split()[:limit]), "length"
            completion_tokens = count_tokens(text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        request.usage = usage
        completion_id = self.new_id("chatcmpl")
        created = int(self.clock())
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if tool_call else text,
                "refusal": None,
                "annotations": [],
            }
            if tool_call:
                message["tool_calls"] = [tool_call]
            return JSONReply(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_loopback",
                    "service_tier": "default",
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": usage,
                },
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_loopback",
            "service_tier": "default",
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> SSEEventSpec:
            return (
                None,
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                },
            )

        events: list[SSEEventSpec] = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if tool_call:
            fn = tool_call["function"]
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": tool_call["id"],
                                "type": "function",
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            for piece in word_pieces(fn["arguments"]):
                events.append(
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                )
        else:
            for piece in word_pieces(text):
                events.append(chunk({"content": piece}))
        events.append(chunk({}, finish))
        if include_usage:
            events.append((None, {**base, "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return SSEReply(events, error_event=self._chat_error_event)

    @staticmethod
    def _chat_tokens(message: dict[str, Any]) -> int:
        n = count_tokens(_text_of(message.get("content")))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            n += count_tokens(str(fn.get("name", ""))) + count_tokens(str(fn.get("arguments", "")))
        return n

    @staticmethod
    def _chat_error_event(index: int, fault: Fault) -> SSEEventSpec:
        return (
            None,
            {
                "error": {
                    "message": fault.message
                    or "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback OpenAI API (Responses + Chat) for demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="require this key (default: any)")
    parser.add_argument(
        "--event-delay", type=float, default=0.0, help="seconds between streamed events"
    )
    args = parser.parse_args(argv)
    server = OpenAILoopback(
        host=args.host, port=args.port, api_key=args.api_key, event_delay=args.event_delay
    )
    run_until_interrupted(server, "OPENAI_BASE_URL")


if __name__ == "__main__":
    main()
