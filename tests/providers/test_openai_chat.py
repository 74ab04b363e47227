"""OpenAI-compatible Chat Completions provider against the loopback server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.base import Finished, TextDelta, ToolCallDone
from crdtchat.providers.openai_chat import ChatStreamParser, OpenAIChatProvider
from crdtchat.providers.sse import SSEDecoder, SSEEvent
from crdtchat.schema import DerivedEntry, ToolSpec
from tests.support.providers import Thread, openai_server, policy, request, run_turn

pytestmark = pytest.mark.anyio

MODEL = "local-model"
TOOLS = {
    "lookup": ToolSpec(
        description="Look a word up",
        parameters={"type": "object", "properties": {"input": {"type": "string"}}},
    )
}


def provider(server: OpenAILoopback, **kwargs) -> OpenAIChatProvider:
    kwargs.setdefault("retry", policy()[0])
    return OpenAIChatProvider(model=MODEL, api_key="sk-loop", base_url=server.base_url, **kwargs)


async def test_full_thread_every_time_with_usage_and_cached_prefix() -> None:
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("hello there")
        first = await run_turn(p, request(thread, system="be brief"))
        assert first.text == "[turn 1] You said: hello there"
        body = server.posts("/chat/completions")[0].body
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
        ]
        assert (first.finished.usage.input_tokens, first.finished.usage.output_tokens) == (4, 6)
        assert first.finished.usage.cached_input_tokens == 0
        assert first.finished.derived == ()  # nothing server-side to remember

        answer = thread.assistant(first.text)
        thread.user("and again")
        # Even if handed a stray entry, Chat Completions has no state to use: full thread.
        stray = {
            "k": DerivedEntry(
                kind="provider_state",
                message_id=answer.id,
                prefix_hash="x",
                provider="openai",
                api="responses",
                model=MODEL,
                data={"response_id": "r"},
            )
        }
        second = await run_turn(p, request(thread, system="be brief", derived=stray))
        body = server.posts("/chat/completions")[1].body
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
        assert second.text == "[turn 2] You said: and again"
        # The server's prefix cache covered system + first user message.
        assert second.finished.usage.cached_input_tokens == 4
        assert second.finished.usage.raw["prompt_tokens_details"]["cached_tokens"] == 4


async def test_tool_calls_are_assembled_from_streamed_fragments_and_results_go_back() -> None:
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("please lookup crdt")
        first = await run_turn(p, request(thread, tools=TOOLS))
        (call,) = first.calls
        assert call.name == "lookup" and call.id.startswith("call_")
        assert json.loads(call.arguments) == {"input": "please lookup crdt"}
        sent_tools = server.posts("/chat/completions")[0].body["tools"]
        assert sent_tools[0]["function"]["name"] == "lookup"
        assert first.finished.status == "complete"

        thread.assistant("", calls=[call])
        thread.tool(call.id, "a replicated data type")
        second = await run_turn(p, request(thread, tools=TOOLS))
        body = server.posts("/chat/completions")[1].body
        assert body["messages"][-2]["tool_calls"][0]["id"] == call.id
        assert body["messages"][-1] == {
            "role": "tool",
            "tool_call_id": call.id,
            "content": "a replicated data type",
        }
        assert second.text == "The tool said: a replicated data type"


async def test_length_finish_is_incomplete() -> None:
    with openai_server() as server:
        thread = Thread()
        thread.user("a b c d")
        turn = await run_turn(provider(server), request(thread, params={"max_tokens": 2}))
        assert turn.finished.status == "incomplete"
        assert turn.finished.error == "finish_reason: length"
        assert turn.text == "[turn 1]"


async def test_429_then_cut_stream_then_success() -> None:
    with openai_server() as server:
        retry, slept = policy()
        p = provider(server, retry=retry)
        server.fail_next(1, status=429, retry_after="2")
        server.cut_next(1, after_events=3)
        thread = Thread()
        thread.user("some words to stream here")
        turn = await run_turn(p, request(thread))
        assert slept.delays[0] == 2.0 and len(slept.delays) == 2
        assert len(turn.resets) == 1
        assert turn.text == "[turn 1] You said: some words to stream here"
        assert [r.status for r in server.posts("/chat/completions")] == [429, 200, 200]


async def test_in_band_error_chunk_ends_the_turn_with_its_message() -> None:
    with openai_server() as server:
        server.error_event_next(1, after_events=2, message="model crashed")
        thread = Thread()
        thread.user("some words to stream here")
        turn = await run_turn(provider(server), request(thread))
        assert turn.finished.status == "error"
        assert turn.finished.error == "model crashed"


async def test_a_server_that_ignores_stream_true_is_a_clear_error_not_a_retry_loop() -> None:
    with openai_server() as server:
        server.ignore_stream_next(1)
        thread = Thread()
        thread.user("hi")
        turn = await run_turn(provider(server), request(thread))
        assert turn.finished.status == "error"
        assert turn.finished.error.startswith("expected an event stream from ")
        assert "application/json" in turn.finished.error
        assert len(server.posts("/chat/completions")) == 1


async def test_no_key_is_fine_for_a_local_server_but_not_for_openai() -> None:
    with openai_server() as server:
        server.api_key = None
        p = OpenAIChatProvider(model=MODEL, env={"OPENAI_BASE_URL": server.base_url})
        thread = Thread()
        thread.user("hi")
        assert (await run_turn(p, request(thread))).finished.status == "complete"
        assert "authorization" not in server.posts("/chat/completions")[0].headers
    missing = await run_turn(OpenAIChatProvider(env={}), request(thread))
    assert missing.finished == Finished(status="error", error="OPENAI_API_KEY is not set")


# ---------------------------------------------------------------- the pure parser


def feed(parser: ChatStreamParser, *chunks: object) -> list:
    out = []
    for chunk in chunks:
        data = chunk if isinstance(chunk, str) else json.dumps(chunk)
        out.extend(parser.feed(SSEEvent(data=data)))
    return out


def delta(d: dict, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def test_parser_assembles_parallel_tool_calls_by_index_and_names_idless_calls() -> None:
    parser = ChatStreamParser()
    events = feed(
        parser,
        delta({"tool_calls": [{"index": 1, "function": {"name": "b", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 0, "id": "x", "function": {"name": "a"}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": '{"q":'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": " 2}"}}]}),
        delta({}, "tool_calls"),
        {
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3},
            "timings": {"cache_n": 7},
        },
        "[DONE]",
    )
    calls = [e.call for e in events if isinstance(e, ToolCallDone)]
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("x", "a", "{}"),
        ("call_1", "b", '{"q": 2}'),
    ]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status == "complete"
    # llama.cpp reports its prompt cache as timings.cache_n
    assert (finished.usage.input_tokens, finished.usage.cached_input_tokens) == (9, 7)


def test_parser_accepts_a_body_without_done_once_finished_but_not_before() -> None:
    parser = ChatStreamParser()
    feed(parser, delta({"content": "hi"}), delta({}, "stop"))
    (finished,) = parser.end_of_stream()
    assert finished.status == "complete"
    cut = ChatStreamParser()
    feed(cut, delta({"content": "hi"}))
    assert cut.end_of_stream() == []  # a cut: the driver retries


_TEXTS = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(_TEXTS, st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
def test_parsed_text_is_chunking_independent(pieces: list[str], cuts: list[int]) -> None:
    raw = (
        b"".join(f"data: {json.dumps(delta({'content': p}))}\r\n\r\n".encode() for p in pieces)
        + b"data: "
        + json.dumps(delta({}, "stop")).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    parser, decoder, events = ChatStreamParser(), SSEDecoder(), []
    for chunk in chunks:
        for sse in decoder.feed(chunk):
            events.extend(parser.feed(sse))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "".join(pieces)
    assert isinstance(events[-1], Finished) and events[-1].status == "complete"
