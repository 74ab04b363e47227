"""Anthropic Messages provider against the loopback server."""

from __future__ import annotations

import json

import pytest

from crdtchat.loopback.anthropic_server import AnthropicLoopback
from crdtchat.providers.anthropic_messages import (
    AnthropicProvider,
    MessagesStreamParser,
    build_messages_body,
    count_cache_breakpoints,
)
from crdtchat.providers.base import Finished
from crdtchat.providers.sse import SSEEvent
from crdtchat.schema import DerivedEntry, ToolCall, ToolSpec
from tests.support.providers import Thread, anthropic_server, policy, request, run_turn

pytestmark = pytest.mark.anyio

MODEL = "claude-loop-1"
OTHER = "claude-loop-2"
TOOLS = {
    "lookup": ToolSpec(description="Look a word up", parameters={}),
    "search": ToolSpec(description="Search", parameters={}),
}


def provider(server: AnthropicLoopback, **kwargs) -> AnthropicProvider:
    kwargs.setdefault("retry", policy()[0])
    return AnthropicProvider(model=MODEL, api_key="ak-loop", base_url=server.base_url, **kwargs)


def breakpoints(body: dict) -> list[str]:
    """Where the cache_control markers are, as readable labels."""
    out = []
    for i, tool in enumerate(body.get("tools", [])):
        if "cache_control" in tool:
            out.append(f"tools.{i}")
    for i, block in enumerate(body.get("system", [])):
        if "cache_control" in block:
            out.append(f"system.{i}")
    for i, message in enumerate(body["messages"]):
        for j, block in enumerate(message["content"]):
            if "cache_control" in block:
                out.append(f"messages.{i}.{j}")
    return out


async def test_two_turns_headers_system_blocks_and_cache_reads() -> None:
    with anthropic_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("hello there")
        first = await run_turn(p, request(thread, system="You are terse and precise."))
        post = server.posts("/v1/messages")[0]
        assert post.headers["x-api-key"] == "ak-loop"
        assert post.headers["anthropic-version"] == "2023-06-01"
        assert post.body["system"] == [
            {
                "type": "text",
                "text": "You are terse and precise.",
                "cache_control": {"type": "ephemeral"},
            }
        ]
        assert breakpoints(post.body) == ["system.0", "messages.0.0"]
        assert first.text == "[turn 1] You said: hello there"
        u1 = first.finished.usage
        # Nothing cached yet: both breakpoints' prefixes are written (5 + 2 words).
        assert (u1.cached_input_tokens, u1.cache_creation_input_tokens, u1.input_tokens) == (
            0,
            7,
            7,
        )

        thread.assistant(first.text)
        thread.user("and again")
        second = await run_turn(p, request(thread, system="You are terse and precise."))
        body = server.posts("/v1/messages")[1].body
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert breakpoints(body) == ["system.0", "messages.0.0", "messages.2.0"]
        assert second.text == "[turn 2] You said: and again"
        u2 = second.finished.usage
        # Turn 1's newest-turn breakpoint is read back; the new turn is written.
        assert u2.cached_input_tokens == 7
        assert u2.cache_creation_input_tokens == 6 + 2  # assistant reply + new message
        assert u2.input_tokens == 7 + 8
        assert u2.raw["cache_read_input_tokens"] == 7


def _long_thread(rounds: int) -> Thread:
    thread = Thread()
    thread.system("stay on topic")
    for n in range(rounds):
        thread.user(f"question {n}")
        if n % 2:
            calls = [
                ToolCall(id=f"c{n}a", name="lookup", arguments="{}"),
                ToolCall(id=f"c{n}b", name="search", arguments='{"q": 1}'),
            ]
            thread.assistant("let me check", calls=calls)
            thread.tool(f"c{n}a", "found a")
            thread.tool(f"c{n}b", "found b")
        thread.assistant(f"answer {n}")
    thread.user("last question")
    return thread


async def test_at_most_three_breakpoints_in_any_thread_and_the_server_accepts_them() -> None:
    with anthropic_server() as server:
        p = provider(server)
        for rounds in (0, 1, 2, 5, 9):
            for system in ("", "sys"):
                for tools in ({}, TOOLS):
                    req = request(_long_thread(rounds), system=system, tools=tools)
                    body = build_messages_body(req, model=MODEL).body
                    marks = breakpoints(body)
                    assert 1 <= count_cache_breakpoints(body) == len(marks) <= 3
                    # The newest turn is always marked, and the stable prefix on its last
                    # system block (the thread's own system message joins the system blocks).
                    assert marks[-1].startswith(f"messages.{len(body['messages']) - 1}.")
                    assert marks[0] == f"system.{len(body['system']) - 1}"
                    turn = await run_turn(p, req)
                    assert turn.finished.status == "complete", turn.finished.error


async def test_tool_round_trip_merges_parallel_results_into_one_user_turn() -> None:
    with anthropic_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("please lookup crdt")
        first = await run_turn(p, request(thread, tools=TOOLS))
        (call,) = first.calls
        assert call.name == "lookup" and call.id.startswith("toolu_")
        assert json.loads(call.arguments) == {"input": "please lookup crdt"}
        body = server.posts("/v1/messages")[0].body
        # No system prompt: the stable-prefix breakpoint sits on the last tool.
        assert breakpoints(body) == ["tools.1", "messages.0.0"]
        assert body["tools"][0] == {
            "name": "lookup",
            "description": "Look a word up",
            "input_schema": {"type": "object", "properties": {}},
        }

        second_call = ToolCall(id="toolu_extra", name="search", arguments='{"q": "x"}')
        thread.assistant("checking", calls=[call, second_call])
        thread.tool(call.id, "a replicated data type")
        thread.tool(second_call.id, "many results")
        second = await run_turn(p, request(thread, tools=TOOLS))
        body = server.posts("/v1/messages")[1].body
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assistant, results = body["messages"][1]["content"], body["messages"][2]["content"]
        assert [b["type"] for b in assistant] == ["text", "tool_use", "tool_use"]
        assert assistant[2]["input"] == {"q": "x"}
        assert [(b["type"], b["tool_use_id"]) for b in results] == [
            ("tool_result", call.id),
            ("tool_result", "toolu_extra"),
        ]
        assert second.text == "The tool said: many results"
        assert second.finished.status == "complete"


async def test_thinking_blocks_are_kept_hidden_and_sent_back_only_when_given() -> None:
    with anthropic_server() as server:
        p = provider(server)
        params = {"thinking_budget": 1024}
        thread = Thread()
        thread.user("think about redact this")
        first = await run_turn(p, request(thread, params=params))
        assert first.text == "[turn 1] You said: think about redact this"
        assert "Considering" not in first.text  # thinking is never shown as text
        (hidden,) = first.finished.derived
        assert hidden.kind == "hidden"
        blocks = hidden.data["blocks"]
        assert [b["type"] for b in blocks] == ["thinking", "redacted_thinking"]
        assert blocks[0]["thinking"].startswith("Considering") and blocks[0]["signature"]
        sent = server.posts("/v1/messages")[0].body
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
        assert sent["max_tokens"] > 1024

        answer = thread.assistant(first.text)
        derived = first.entries(p, MODEL, answer.id)
        thread.user("and then?")
        second = await run_turn(p, request(thread, params=params, derived=derived))
        assistant = server.posts("/v1/messages")[1].body["messages"][1]["content"]
        assert [b["type"] for b in assistant] == ["thinking", "redacted_thinking", "text"]
        assert assistant[0]["signature"] == blocks[0]["signature"]
        assert second.finished.status == "complete"

        # Not given (another model's turn, or discarded): absent, and never turned into text.
        await run_turn(p, request(thread, params=params))
        assistant = server.posts("/v1/messages")[2].body["messages"][1]["content"]
        assert assistant == [{"type": "text", "text": first.text}]


async def test_a_refused_signature_discards_the_blocks_and_replays_in_the_same_call() -> None:
    with anthropic_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("think")
        first = await run_turn(p, request(thread, params={"thinking_budget": 1024}))
        answer = thread.assistant(first.text)
        derived = first.entries(p, MODEL, answer.id)
        thread.user("next")
        # Handed to another model by mistake: the server refuses the signature.
        second = await run_turn(p, request(thread, model=OTHER, derived=derived))
        assert [d.key for d in second.discarded] == list(derived)
        assert "Invalid `signature` in `thinking` block" in second.discarded[0].reason
        posts = server.posts("/v1/messages")
        assert [r.status for r in posts] == [200, 400, 200]
        assert [b["type"] for b in posts[2].body["messages"][1]["content"]] == ["text"]
        assert second.finished.status == "complete"


async def test_rate_limit_overload_and_mid_stream_errors_are_retried() -> None:
    with anthropic_server() as server:
        retry, slept = policy(max_attempts=5)
        p = provider(server, retry=retry)
        server.fail_next(1, status=429, retry_after="3")
        server.fail_next(1, status=529)
        server.error_event_next(1, after_events=5)
        server.cut_next(1, after_events=6)
        thread = Thread()
        thread.user("several words for a stream")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "complete"
        assert turn.text == "[turn 1] You said: several words for a stream"
        assert len(turn.resets) == 2
        assert slept.delays[0] == 3.0 and len(slept.delays) == 4
        assert [r.status for r in server.posts("/v1/messages")] == [429, 529, 200, 200, 200]


async def test_stream_cut_beyond_the_budget_is_incomplete() -> None:
    with anthropic_server() as server:
        p = provider(server, retry=policy(max_attempts=2)[0])
        server.cut_next(2, after_events=6)
        thread = Thread()
        thread.user("several words for a stream")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "incomplete"
        assert turn.finished.error.startswith("stream cut: ")


async def test_config_errors_are_readable() -> None:
    thread = Thread()
    thread.user("hi")
    missing = await run_turn(AnthropicProvider(env={}), request(thread))
    assert missing.events == [Finished(status="error", error="ANTHROPIC_API_KEY is not set")]
    with anthropic_server(models={MODEL}) as server:
        bad = AnthropicProvider(model=MODEL, api_key="wrong", base_url=server.base_url)
        turn = await run_turn(bad, request(thread))
        assert turn.finished.error.startswith("HTTP 401 authentication_error: invalid x-api-key")
        assert "ANTHROPIC_API_KEY" in turn.finished.error
        unknown = await run_turn(provider(server), request(thread, model="claude-nope"))
        assert unknown.finished.error == (
            "HTTP 404 not_found_error: model: claude-nope (unknown model or endpoint?)"
        )
        env = AnthropicProvider(
            env={"ANTHROPIC_API_KEY": "ak-loop", "ANTHROPIC_BASE_URL": server.base_url}
        )
        assert (await run_turn(env, request(thread, model=MODEL))).finished.status == "complete"


async def test_max_tokens_stop_is_incomplete() -> None:
    with anthropic_server() as server:
        thread = Thread()
        thread.user("a b c d")
        turn = await run_turn(provider(server), request(thread, params={"max_tokens": 2}))
        assert turn.finished.status == "incomplete"
        assert turn.finished.error == "stop_reason: max_tokens"


def test_system_messages_in_the_thread_join_the_system_blocks() -> None:
    thread = Thread()
    thread.system("from the thread")
    thread.user("hi")
    body = build_messages_body(request(thread, system="from settings"), model=MODEL).body
    assert [b["text"] for b in body["system"]] == ["from settings", "from the thread"]
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_hidden_entries_of_other_shapes_are_ignored() -> None:
    thread = Thread()
    thread.user("q")
    answer = thread.assistant("a")
    thread.user("q2")
    openai_shaped = DerivedEntry(
        kind="hidden",
        message_id=answer.id,
        prefix_hash="x",
        provider="anthropic",
        api="messages",
        model=MODEL,
        data={"items": [{"type": "reasoning"}]},
    )
    built = build_messages_body(request(thread, derived={"k": openai_shaped}), model=MODEL)
    assert built.hidden_keys == ()
    assert built.body["messages"][1]["content"] == [{"type": "text", "text": "a"}]


def test_parser_usage_totals_and_tool_json() -> None:
    parser = MessagesStreamParser()
    events = []
    for kind, data in [
        (
            "message_start",
            {
                "message": {
                    "usage": {
                        "input_tokens": 3,
                        "cache_read_input_tokens": 10,
                        "cache_creation_input_tokens": 5,
                        "output_tokens": 1,
                    }
                }
            },
        ),
        (
            "content_block_start",
            {
                "index": 0,
                "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {"index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        ),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
        ("message_stop", {}),
    ]:
        events.extend(parser.feed(SSEEvent(event=kind, data=json.dumps({"type": kind, **data}))))
    assert events[0].call.arguments == "{}"  # empty streamed input → the start block's {}
    usage = events[-1].usage
    assert (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_creation_input_tokens,
        usage.output_tokens,
    ) == (18, 10, 5, 4)
