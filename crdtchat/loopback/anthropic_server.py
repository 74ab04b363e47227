"""A loopback Anthropic server: the subset of the Messages API we use.

Faithful where our code depends on it (checked with the official `anthropic` SDK in the
tests): the streamed event sequence, error bodies `{"type": "error", "error": {...}}`,
thinking blocks whose signatures are valid only for the model that produced them, tool_use /
tool_result pairing rules, the 4-breakpoint limit, and prompt-cache accounting.

Cache rule: each `cache_control` breakpoint writes its prefix (model + tools + system +
messages up to that block) for 5 minutes (`ttl: "1h"` for an hour); a request reads the
longest written prefix ending at a breakpoint or up to 20 blocks before one, as the API does.
`cache_read_input_tokens` counts that prefix, `cache_creation_input_tokens` the rest up to
the last breakpoint, `input_tokens` what follows. Tokens are whitespace words; thinking
blocks of earlier turns count as none (the API strips them).

`python -m crdtchat.loopback.anthropic_server --port 8081` for demos; then
`ANTHROPIC_BASE_URL=http://127.0.0.1:8081`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
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

__all__ = ["AnthropicLoopback"]

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
TTL = {"5m": 300.0, "1h": 3600.0}


class _BadRequest(RemoteProtocolError):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass(frozen=True)
class _Block:
    digest: str  # hash of the prefix ending with this block
    tokens: int
    breakpoint_ttl: float | None


def _block_text(block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return f"{block.get('name', '')} {json.dumps(block.get('input', {}))}"
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
        return str(content)
    return ""  # thinking, redacted_thinking, images: no tokens in this fake


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


class AnthropicLoopback(LoopbackServer):
    """`with AnthropicLoopback() as server: Anthropic(base_url=server.base_url, api_key="x")`."""

    def __init__(self, *, min_cache_tokens: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_cache_tokens = min_cache_tokens
        self.signer = Signer()
        self._cache: dict[str, float] = {}  # prefix digest → expires_at

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- vendor shapes

    def common_headers(self) -> dict[str, str]:
        return {"request-id": self.new_id("req")}

    def error_reply(self, status: int, kind: str, message: str, **extra: Any) -> JSONReply:
        return JSONReply(
            status,
            {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": self.new_id("req"),
            },
            dict(extra.get("headers") or {}),
        )

    def fault_reply(self, fault: Fault) -> JSONReply:
        kinds = {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error"}
        messages = {
            429: "Number of request tokens has exceeded your per-minute rate limit",
            529: "Overloaded",
            500: "Internal server error",
        }
        kind = kinds.get(
            fault.status, "api_error" if fault.status >= 500 else "invalid_request_error"
        )
        return self.error_reply(
            fault.status,
            kind,
            fault.message or messages.get(fault.status, "injected error"),
            headers=fault.headers,
        )

    # -- dispatch

    def handle(self, request: LoggedRequest) -> JSONReply | SSEReply:
        path = request.path.split("?", 1)[0]
        if self.api_key is not None:
            # `x-api-key` (API version 2023-06-01) or a bearer key (what newer SDKs send).
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.api_key not in (request.headers.get("x-api-key"), bearer):
                return self.error_reply(401, "authentication_error", "invalid x-api-key")
        if request.method != "POST" or path != "/v1/messages":
            return self.error_reply(404, "not_found_error", f"Not Found: {request.method} {path}")
        if "anthropic-version" not in request.headers:
            return self.error_reply(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        if not isinstance(request.body, dict):
            return self.error_reply(400, "invalid_request_error", "body: must be a JSON object")
        try:
            return self._messages(request, request.body)
        except _BadRequest as bad:
            return self.error_reply(bad.status, bad.kind, bad.message)

    # -- validation

    def _validate(self, body: dict[str, Any], model: str) -> list[dict[str, Any]]:
        if not isinstance(body.get("max_tokens"), int):
            raise _BadRequest(400, "invalid_request_error", "max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(
                400, "invalid_request_error", "messages: at least one message is required"
            )
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget >= body["max_tokens"]:
                raise _BadRequest(
                    400,
                    "invalid_request_error",
                    "`max_tokens` must be greater than `thinking.budget_tokens`.",
                )
        marks = 0
        for block in body.get("tools") or []:
            marks += isinstance(block, dict) and "cache_control" in block
        system = body.get("system")
        for block in system if isinstance(system, list) else []:
            marks += isinstance(block, dict) and "cache_control" in block

        previous_tool_uses: list[str] = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("user", "assistant"):
                raise _BadRequest(
                    400,
                    "invalid_request_error",
                    f"messages.{i}.role: Input should be 'user' or 'assistant'",
                )
            blocks = _blocks(message.get("content"))
            if not blocks:
                raise _BadRequest(
                    400, "invalid_request_error", f"messages.{i}: content must not be empty"
                )
            results: list[str] = []
            for j, block in enumerate(blocks):
                marks += "cache_control" in block
                kind = block.get("type")
                where = f"messages.{i}.content.{j}"
                if kind == "text" and not str(block.get("text", "")).strip():
                    raise _BadRequest(
                        400,
                        "invalid_request_error",
                        f"{where}.text: text content blocks must contain non-whitespace text",
                    )
                if kind in ("thinking", "redacted_thinking") and role != "assistant":
                    raise _BadRequest(
                        400,
                        "invalid_request_error",
                        f"{where}: thinking blocks must be in assistant turns",
                    )
                if kind == "thinking" and not self.signer.verify(
                    model, str(block.get("thinking", "")), block.get("signature")
                ):
                    raise _BadRequest(
                        400,
                        "invalid_request_error",
                        f"{where}: Invalid `signature` in `thinking` block",
                    )
                if kind == "redacted_thinking" and not self.signer.verify_blob(
                    model, block.get("data")
                ):
                    raise _BadRequest(
                        400,
                        "invalid_request_error",
                        f"{where}: Invalid `data` in `redacted_thinking` block",
                    )
                if kind == "tool_result":
                    tool_use_id = str(block.get("tool_use_id", ""))
                    if tool_use_id not in previous_tool_uses:
                        raise _BadRequest(
                            400,
                            "invalid_request_error",
                            f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{tool_use_id}. Each `tool_result` block must have a corresponding "
                            "`tool_use` block in the previous message.",
                        )
                    results.append(tool_use_id)
            missing = [t for t in previous_tool_uses if t not in results]
            if missing:
                raise _BadRequest(
                    400,
                    "invalid_request_error",
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                    "corresponding `tool_result` block in the next message.",
                )
            previous_tool_uses = (
                [str(b.get("id")) for b in blocks if b.get("type") == "tool_use"]
                if role == "assistant"
                else []
            )
        if previous_tool_uses:
            raise _BadRequest(
                400,
                "invalid_request_error",
                f"messages.{len(messages) - 1}: `tool_use` ids were found without `tool_result` "
                f"blocks immediately after: {', '.join(previous_tool_uses)}.",
            )
        if marks > MAX_BREAKPOINTS:
            raise _BadRequest(
                400,
                "invalid_request_error",
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {marks}.",
            )
        return messages

    # -- cache accounting

    def _prefix_blocks(self, body: dict[str, Any], model: str) -> list[_Block]:
        digest = hashlib.sha256(model.encode())
        out: list[_Block] = []

        def add(section: str, role: str, block: dict[str, Any], text: str) -> None:
            clean = {k: v for k, v in block.items() if k != "cache_control"}
            digest.update(json.dumps([section, role, clean], sort_keys=True).encode())
            control = block.get("cache_control")
            ttl = None
            if isinstance(control, dict) and control.get("type") == "ephemeral":
                ttl = TTL.get(str(control.get("ttl", "5m")), TTL["5m"])
            out.append(_Block(digest.copy().hexdigest(), count_tokens(text), ttl))

        for tool in body.get("tools") or []:
            text = f"{tool.get('name', '')} {tool.get('description', '')} "
            text += json.dumps(tool.get("input_schema", {}))
            add("tools", "", tool, text)
        system = body.get("system")
        for block in _blocks(system) if system is not None else []:
            add("system", "", block, str(block.get("text", "")))
        for message in body["messages"]:
            for block in _blocks(message.get("content")):
                add("messages", message["role"], block, _block_text(block))
        return out

    def _cache_usage(self, blocks: list[_Block]) -> tuple[int, int, int]:
        """(uncached input, cache read, cache creation) tokens, updating the cache."""
        now = self.clock()
        prefix_tokens = []
        running = 0
        for block in blocks:
            running += block.tokens
            prefix_tokens.append(running)
        breakpoints = [i for i, b in enumerate(blocks) if b.breakpoint_ttl is not None]
        read_end = 0
        with self._lock:
            for bp in breakpoints:
                for i in range(bp, max(-1, bp - LOOKBACK_BLOCKS - 1), -1):
                    expires = self._cache.get(blocks[i].digest)
                    if expires is not None and expires > now:
                        read_end = max(read_end, i + 1)
                        break
            write_end = read_end
            for bp in breakpoints:
                if prefix_tokens[bp] >= self.min_cache_tokens and prefix_tokens[bp] > 0:
                    ttl = blocks[bp].breakpoint_ttl or TTL["5m"]
                    self._cache[blocks[bp].digest] = now + ttl
                    write_end = max(write_end, bp + 1)
        total = running
        read = prefix_tokens[read_end - 1] if read_end else 0
        written = (prefix_tokens[write_end - 1] if write_end else 0) - read
        return total - read - written, read, written

    # -- the endpoint

    def _messages(self, request: LoggedRequest, body: dict[str, Any]) -> JSONReply | SSEReply:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(400, "invalid_request_error", "model: Field required")
        if self.models is not None and model not in self.models:
            raise _BadRequest(404, "not_found_error", f"model: {model}")
        messages = self._validate(body, model)
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        last_blocks = _blocks(messages[-1].get("content"))
        tool_output = None
        if messages[-1]["role"] == "user":
            results = [b for b in last_blocks if b.get("type") == "tool_result"]
            if results:
                tool_output = _block_text(results[-1])
        user_texts = [
            " ".join(_block_text(b) for b in _blocks(m.get("content")) if b.get("type") == "text")
            for m in messages
            if m["role"] == "user"
        ]
        user_texts = [t for t in user_texts if t.strip()]
        reply = script_reply(
            last_user_text=user_texts[-1] if user_texts else "",
            user_turns=len(user_texts),
            tool_names=[str(t.get("name")) for t in tools],
            tool_output=tool_output,
        )
        uncached, read, written = self._cache_usage(self._prefix_blocks(body, model))

        content: list[dict[str, Any]] = []
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            thought = f"Considering: {user_texts[-1] if user_texts else 'nothing'}"
            content.append(
                {
                    "type": "thinking",
                    "thinking": thought,
                    "signature": self.signer.sign(model, thought),
                }
            )
            if user_texts and "redact" in user_texts[-1]:
                content.append({"type": "redacted_thinking", "data": self.signer.blob(model)})
        stop_reason = "end_turn"
        if reply.tool_name is not None:
            content.append(
                {
                    "type": "tool_use",
                    "id": self.new_id("toolu"),
                    "name": reply.tool_name,
                    "input": json.loads(reply.tool_arguments),
                }
            )
            stop_reason = "tool_use"
            out_tokens = count_tokens(reply.tool_arguments)
        else:
            text = reply.text
            if count_tokens(text) > body["max_tokens"]:
                text = " ".join(text.split()[: body["max_tokens"]])
                stop_reason = "max_tokens"
            content.append({"type": "text", "text": text})
            out_tokens = count_tokens(text)
        out_tokens += sum(count_tokens(b.get("thinking", "")) for b in content)
        usage = {
            "input_tokens": uncached,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": out_tokens,
            "service_tier": "standard",
        }
        request.usage = usage
        message = {
            "id": self.new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return JSONReply(200, message)
        return SSEReply(self._events(message), error_event=self._error_event)

    @staticmethod
    def _events(message: dict[str, Any]) -> list[SSEEventSpec]:
        events: list[SSEEventSpec] = []

        def emit(kind: str, **fields: Any) -> None:
            events.append((kind, {"type": kind, **fields}))

        usage = message["usage"]
        emit(
            "message_start",
            message={
                **message,
                "content": [],
                "stop_reason": None,
                "usage": {**usage, "output_tokens": 1},
            },
        )
        emit("ping")
        for index, block in enumerate(message["content"]):
            kind = block["type"]
            if kind == "thinking":
                emit(
                    "content_block_start",
                    index=index,
                    content_block={"type": "thinking", "thinking": "", "signature": ""},
                )
                for piece in word_pieces(block["thinking"]):
                    emit(
                        "content_block_delta",
                        index=index,
                        delta={"type": "thinking_delta", "thinking": piece},
                    )
                emit(
                    "content_block_delta",
                    index=index,
                    delta={"type": "signature_delta", "signature": block["signature"]},
                )
            elif kind == "redacted_thinking":
                emit("content_block_start", index=index, content_block=block)
            elif kind == "tool_use":
                emit("content_block_start", index=index, content_block={**block, "input": {}})
                emit(
                    "content_block_delta",
                    index=index,
                    delta={"type": "input_json_delta", "partial_json": ""},
                )
                for piece in word_pieces(json.dumps(block["input"])):
                    emit(
                        "content_block_delta",
                        index=index,
                        delta={"type": "input_json_delta", "partial_json": piece},
                    )
            else:
                emit("content_block_start", index=index, content_block={"type": "text", "text": ""})
                for piece in word_pieces(block["text"]):
                    emit(
                        "content_block_delta",
                        index=index,
                        delta={"type": "text_delta", "text": piece},
                    )
            emit("content_block_stop", index=index)
        emit(
            "message_delta",
            delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
            usage={
                "input_tokens": usage["input_tokens"],
                "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                "cache_read_input_tokens": usage["cache_read_input_tokens"],
                "output_tokens": usage["output_tokens"],
            },
        )
        emit("message_stop")
        return events

    @staticmethod
    def _error_event(index: int, fault: Fault) -> SSEEventSpec:
        return (
            "error",
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": fault.message or "Overloaded"},
            },
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback Anthropic Messages API for demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="require this key (default: any)")
    args = parser.parse_args(argv)
    run_until_interrupted(
        AnthropicLoopback(host=args.host, port=args.port, api_key=args.api_key),
        "ANTHROPIC_BASE_URL",
    )


if __name__ == "__main__":
    main()
