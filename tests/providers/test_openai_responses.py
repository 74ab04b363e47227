"""OpenAI Responses provider against the loopback server (real sockets, real HTTP)."""

from __future__ import annotations

import email.utils
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtchat.loopback.http import _sse_bytes
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.base import DiscardDerived, Finished, TextDelta, ToolCallDone
from crdtchat.providers.openai_responses import (
    OpenAIResponsesProvider,
    ResponsesStreamParser,
    build_responses_body,
)
from crdtchat.providers.sse import SSEDecoder
from crdtchat.schema import DerivedEntry, ToolSpec
from tests.support.providers import Thread, openai_server, policy, request, run_turn

pytestmark = pytest.mark.anyio

MODEL = "gpt-4.1"
WEATHER = {"get_weather": ToolSpec(description="Weather for a city", parameters={})}


def provider(server: OpenAILoopback, **kwargs) -> OpenAIResponsesProvider:
    kwargs.setdefault("retry", policy()[0])
    return OpenAIResponsesProvider(
        model=MODEL, api_key="sk-loop", base_url=server.base_url, **kwargs
    )


async def two_turns(server: OpenAILoopback, p: OpenAIResponsesProvider, *, keep_state: bool = True):
    thread = Thread()
    thread.user("hello there")
    first = await run_turn(p, request(thread, system="be brief"))
    answer = thread.assistant(first.text)
    derived = first.entries(p, MODEL, answer.id) if keep_state else {}
    thread.user("and again")
    second = await run_turn(p, request(thread, system="be brief", derived=derived))
    return thread, first, second, derived


# ---------------------------------------------------------------- state: incremental turns


async def test_turn_two_sends_only_the_new_message_and_the_previous_response_id() -> None:
    with openai_server() as server:
        p = provider(server)
        _, first, second, _ = await two_turns(server, p)
        posts = server.posts("/responses")
        assert len(posts) == 2
        assert "previous_response_id" not in posts[0].body
        response_id = first.finished.derived[0].data["response_id"]
        assert [d.kind for d in first.finished.derived] == ["provider_state"]
        assert posts[1].body["previous_response_id"] == response_id
        assert posts[1].body["input"] == [
            {"type": "message", "role": "user", "content": "and again"}
        ]
        # The system prompt went once, as turn 1's first input item: the stored response
        # holds it, while `instructions` would never be carried over by the id.
        assert posts[0].body["input"][0] == {
            "type": "message",
            "role": "developer",
            "content": "be brief",
        }
        assert "instructions" not in posts[0].body and "instructions" not in posts[1].body
        # The server resolved the whole conversation from the id: it saw two user turns.
        assert second.text == "[turn 2] You said: and again"
        assert second.finished.status == "complete"
        # Tokens reached through the id count as cached: turn 1's input items ("be brief",
        # "hello there") and output ("[turn 1] You said: hello there"); only the new message
        # is new.
        usage = second.finished.usage
        assert usage.cached_input_tokens == 2 + 2 + 6
        assert usage.input_tokens - usage.cached_input_tokens == 2
        expires = first.finished.derived[0].expires_at
        assert expires is not None and expires > time.time() + 29 * 24 * 3600


async def test_a_response_id_stored_before_the_system_item_still_gets_instructions() -> None:
    # An entry written by an older worker: its stored response never saw the system prompt,
    # so chaining on it must keep sending the prompt as `instructions`.
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("hello there")
        first = await run_turn(p, request(thread, system="be brief"))
        answer = thread.assistant(first.text)
        derived = {
            key: entry.model_copy(update={"data": {"response_id": entry.data["response_id"]}})
            for key, entry in first.entries(p, MODEL, answer.id).items()
        }
        thread.user("and again")
        await run_turn(p, request(thread, system="be brief", derived=derived))
        chained = server.posts("/responses")[-1].body
        assert "previous_response_id" in chained
        assert chained["instructions"] == "be brief"
        assert chained["input"] == [{"type": "message", "role": "user", "content": "and again"}]


async def test_without_derived_state_the_full_thread_is_replayed_with_the_same_answer() -> None:
    with openai_server() as server:
        p = provider(server)
        _, _, with_state, _ = await two_turns(server, p)
        _, _, without_state, _ = await two_turns(server, p, keep_state=False)
        replay = server.posts("/responses")[-1].body
        assert "previous_response_id" not in replay
        # A replay carries the system prompt again, as its first item.
        assert [i["role"] for i in replay["input"]] == ["developer", "user", "assistant", "user"]
        assert "instructions" not in replay
        assert without_state.text == with_state.text
        assert without_state.finished.usage.cached_input_tokens == 0


async def test_an_expired_response_id_is_discarded_and_replayed_in_the_same_call() -> None:
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("hello there")
        first = await run_turn(p, request(thread))
        answer = thread.assistant(first.text)
        derived = first.entries(p, MODEL, answer.id)
        thread.user("still there?")
        server.expire()
        second = await run_turn(p, request(thread, derived=derived))

        (key,) = derived
        assert second.discarded == [
            DiscardDerived(
                key, f"Previous response with id '{derived[key].data['response_id']}' not found."
            )
        ]
        posts = server.posts("/responses")
        assert [r.status for r in posts] == [200, 400, 200]
        assert posts[1].body["previous_response_id"] == derived[key].data["response_id"]
        assert "previous_response_id" not in posts[2].body
        assert len(posts[2].body["input"]) == 3
        assert second.text == "[turn 2] You said: still there?"
        new_state = second.finished.derived[0].data["response_id"]
        assert new_state != derived[key].data["response_id"]


def test_the_nearest_state_to_the_end_is_used_and_never_with_the_full_history() -> None:
    thread = Thread()
    thread.user("one")
    a1 = thread.assistant("r1")
    thread.user("two")
    a2 = thread.assistant("r2")
    thread.user("three")

    def state(message_id: str, rid: str) -> DerivedEntry:
        return DerivedEntry(
            kind="provider_state",
            message_id=message_id,
            prefix_hash="x",
            provider="openai",
            api="responses",
            model=MODEL,
            data={"response_id": rid},
        )

    req = request(thread, derived={"k1": state(a1.id, "resp_1"), "k2": state(a2.id, "resp_2")})
    built = build_responses_body(req, model=MODEL, store=True)
    assert built.body["previous_response_id"] == "resp_2"
    assert built.state_key == "k2"
    assert built.body["input"] == [{"type": "message", "role": "user", "content": "three"}]
    full = build_responses_body(req, model=MODEL, store=True, use_state=False)
    assert "previous_response_id" not in full.body
    assert len(full.body["input"]) == 5
    # An entry for a message that is not on the thread is ignored.
    stray = request(thread, derived={"k": state("elsewhere", "resp_x")})
    assert "previous_response_id" not in build_responses_body(stray, model=MODEL, store=True).body


# ---------------------------------------------------------------- retries


async def test_429_is_retried_honouring_retry_after_seconds() -> None:
    with openai_server() as server:
        retry, slept = policy()
        p = provider(server, retry=retry)
        server.fail_next(2, status=429, retry_after="7")
        thread = Thread()
        thread.user("hi")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "complete"
        assert slept.delays == [7.0, 7.0]
        assert [r.status for r in server.posts("/responses")] == [429, 429, 200]


async def test_retry_after_as_http_date_and_retry_after_ms() -> None:
    with openai_server() as server:
        retry, slept = policy()
        p = provider(server, retry=retry)
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        server.fail_next(1, status=503, retry_after=when)
        server.fail_next(1, status=429, headers={"retry-after-ms": "250"})
        thread = Thread()
        thread.user("hi")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "complete"
        assert 28 <= slept.delays[0] <= 30
        assert slept.delays[1] == 0.25


async def test_500_without_retry_after_uses_jittered_exponential_backoff() -> None:
    with openai_server() as server:
        retry, slept = policy(random_value=0.5)
        p = provider(server, retry=retry)
        server.fail_next(3, status=500)
        thread = Thread()
        thread.user("hi")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "complete"
        assert slept.delays == [0.25, 0.5, 1.0]  # random() * base * 2**(n-1)


async def test_retries_are_bounded_then_the_turn_ends_with_a_readable_error() -> None:
    with openai_server() as server:
        retry, slept = policy(max_attempts=3)
        p = provider(server, retry=retry)
        server.fail_next(5, status=500)
        thread = Thread()
        thread.user("hi")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "error"
        assert (
            "HTTP 500" in turn.finished.error and "gave up after 3 attempts" in turn.finished.error
        )
        assert len(server.posts("/responses")) == 3
        assert len(slept.delays) == 2


# ---------------------------------------------------------------- cut streams


async def test_a_cut_stream_is_retried_after_a_stream_reset() -> None:
    with openai_server() as server:
        p = provider(server)
        server.cut_next(1, after_events=6)  # after a few text deltas
        thread = Thread()
        thread.user("tell me something long enough")
        turn = await run_turn(p, request(thread))
        assert len(turn.resets) == 1
        before_reset = turn.events[: turn.events.index(turn.resets[0])]
        assert any(isinstance(e, TextDelta) for e in before_reset)
        assert turn.text == "[turn 1] You said: tell me something long enough"
        assert turn.finished.status == "complete"
        assert server.posts("/responses")[0].fault == "cut"


async def test_a_stream_cut_every_time_ends_incomplete_with_the_reason() -> None:
    with openai_server() as server:
        retry, _ = policy(max_attempts=2)
        p = provider(server, retry=retry)
        server.cut_next(5, after_events=6)
        thread = Thread()
        thread.user("tell me something long enough")
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "incomplete"
        assert turn.finished.error.startswith("stream cut: ")
        assert len(turn.resets) == 1  # between the two attempts, not before the final verdict
        assert turn.text  # the last attempt's partial text is kept for the incomplete turn


async def test_an_in_band_server_error_event_is_retried() -> None:
    with openai_server() as server:
        p = provider(server)
        server.error_event_next(1, after_events=5)
        thread = Thread()
        thread.user("tell me something long enough")
        turn = await run_turn(p, request(thread))
        assert len(turn.resets) == 1
        assert turn.finished.status == "complete"
        assert turn.text == "[turn 1] You said: tell me something long enough"


async def test_an_unreachable_server_is_an_error_turn() -> None:
    with openai_server() as server:
        base = server.base_url
    retry, slept = policy(max_attempts=2)
    p = OpenAIResponsesProvider(model=MODEL, api_key="k", base_url=base, retry=retry)
    thread = Thread()
    thread.user("hi")
    turn = await run_turn(p, request(thread))
    assert turn.finished.status == "error"
    assert "cannot reach" in turn.finished.error
    assert len(slept.delays) == 1


# ---------------------------------------------------------------- tools


async def test_tool_call_round_trip_with_and_without_state() -> None:
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("please use get_weather for Paris")
        first = await run_turn(p, request(thread, tools=WEATHER))
        (call,) = first.calls
        assert call.name == "get_weather"
        assert json.loads(call.arguments) == {"input": "please use get_weather for Paris"}
        assert first.text == ""
        tools_sent = server.posts("/responses")[0].body["tools"]
        assert tools_sent == [
            {
                "type": "function",
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {}},
            }
        ]
        answer = thread.assistant("", calls=[call])
        thread.tool(call.id, "sunny, 21 C")
        derived = first.entries(p, MODEL, answer.id)

        second = await run_turn(p, request(thread, tools=WEATHER, derived=derived))
        assert second.text == "The tool said: sunny, 21 C"
        assert server.posts("/responses")[-1].body["input"] == [
            {"type": "function_call_output", "call_id": call.id, "output": "sunny, 21 C"}
        ]
        # Full replay: the server checks the output matches a function_call in the input.
        replay = await run_turn(p, request(thread, tools=WEATHER))
        assert replay.text == "The tool said: sunny, 21 C"
        kinds = [i["type"] for i in server.posts("/responses")[-1].body["input"]]
        assert kinds == ["message", "function_call", "function_call_output"]


# ---------------------------------------------------------------- store: false


async def test_store_false_keeps_encrypted_reasoning_and_echoes_it_only_when_given() -> None:
    with openai_server() as server:
        p = provider(server, store=False)
        reasoning_model = "gpt-5-mini"
        thread = Thread()
        thread.user("think first")
        first = await run_turn(p, request(thread, model=reasoning_model))
        body = server.posts("/responses")[0].body
        assert body["store"] is False and body["include"] == ["reasoning.encrypted_content"]
        (hidden,) = first.finished.derived
        assert hidden.kind == "hidden"
        (item,) = hidden.data["items"]
        assert item["type"] == "reasoning" and item["encrypted_content"]
        assert not server.responses  # nothing stored server-side

        answer = thread.assistant(first.text)
        derived = first.entries(p, reasoning_model, answer.id)
        thread.user("and now?")
        second = await run_turn(p, request(thread, model=reasoning_model, derived=derived))
        sent = server.posts("/responses")[-1].body["input"]
        assert [i["type"] for i in sent] == ["message", "reasoning", "message", "message"]
        assert sent[1]["encrypted_content"] == item["encrypted_content"]
        assert second.finished.status == "complete" and second.text.startswith("[turn 2]")

        # Without the entry (e.g. another model answered turn 1): no reasoning item, no text.
        await run_turn(p, request(thread, model=reasoning_model))
        sent = server.posts("/responses")[-1].body["input"]
        assert [i["type"] for i in sent] == ["message", "message", "message"]


async def test_refused_encrypted_reasoning_is_discarded_and_the_turn_replayed() -> None:
    with openai_server() as server:
        p = provider(server, store=False)
        thread = Thread()
        thread.user("think first")
        first = await run_turn(p, request(thread, model="gpt-5-mini"))
        answer = thread.assistant(first.text)
        derived = first.entries(p, "gpt-5-mini", answer.id)
        thread.user("and now?")
        # A blob bound to gpt-5-mini sent to o4-mini (a worker filter bug, or a key rotation).
        second = await run_turn(p, request(thread, model="o4-mini", derived=derived))
        assert [d.key for d in second.discarded] == list(derived)
        assert [r.status for r in server.posts("/responses")[-2:]] == [400, 200]
        assert second.finished.status == "complete"


# ---------------------------------------------------------------- configuration errors


async def test_missing_key_against_openai_itself_is_an_error_turn_without_a_request() -> None:
    p = OpenAIResponsesProvider(model=MODEL, env={})
    thread = Thread()
    thread.user("hi")
    turn = await run_turn(p, request(thread))
    assert turn.events == [Finished(status="error", error="OPENAI_API_KEY is not set")]


async def test_env_vars_are_read_like_the_sdk() -> None:
    with openai_server() as server:
        p = OpenAIResponsesProvider(
            env={"OPENAI_API_KEY": "sk-loop", "OPENAI_BASE_URL": server.base_url + "/"}
        )
        assert p.base_url == server.base_url and p.api_key == "sk-loop"
        thread = Thread()
        thread.user("hi")
        assert (await run_turn(p, request(thread))).finished.status == "complete"
        assert server.posts("/responses")[0].headers["authorization"] == "Bearer sk-loop"


async def test_wrong_key_and_unknown_model_are_readable_error_turns() -> None:
    with openai_server(models={MODEL}) as server:
        thread = Thread()
        thread.user("hi")
        bad_key = OpenAIResponsesProvider(model=MODEL, api_key="nope", base_url=server.base_url)
        turn = await run_turn(bad_key, request(thread))
        assert turn.finished.status == "error"
        assert "HTTP 401 invalid_api_key" in turn.finished.error
        assert "check OPENAI_API_KEY" in turn.finished.error
        unknown = await run_turn(provider(server), request(thread, model="gpt-nope"))
        assert unknown.finished.status == "error"
        assert "model_not_found" in unknown.finished.error and "gpt-nope" in unknown.finished.error


async def test_max_output_tokens_gives_an_incomplete_turn_that_still_has_state() -> None:
    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("a b c d e f")
        turn = await run_turn(p, request(thread, params={"max_tokens": 3}))
        assert server.posts("/responses")[0].body["max_output_tokens"] == 3
        assert turn.finished.status == "incomplete"
        assert turn.finished.error == "incomplete: max_output_tokens"
        assert turn.text == "[turn 1] You"
        assert turn.finished.derived[0].kind == "provider_state"


# ---------------------------------------------------------------- the pure parser


def _recorded_stream() -> bytes:
    """A stream with reasoning, text and a function call, as the loopback would send it."""
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": MODEL,
        "usage": {
            "input_tokens": 5,
            "output_tokens": 3,
            "input_tokens_details": {"cached_tokens": 2},
        },
        "output": [
            {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "blob"},
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "héllo wörld 😀", "annotations": []}],
            },
            {
                "id": "fc_1",
                "type": "function_call",
                "status": "completed",
                "call_id": "call_1",
                "name": "f",
                "arguments": '{"a": 1}',
            },
        ],
    }
    events = OpenAILoopback._response_events(response)
    return b"".join(_sse_bytes(name, data) for name, data in events)


RECORDED = _recorded_stream()


def _parse(chunks: list[bytes], *, store: bool) -> list:
    parser = ResponsesStreamParser(store=store, keep_reasoning=not store)
    decoder = SSEDecoder()
    out = []
    for chunk in chunks:
        for sse in decoder.feed(chunk):
            out.extend(parser.feed(sse))
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=20), st.booleans())
def test_parser_output_does_not_depend_on_chunking(cuts: list[int], store: bool) -> None:
    points = sorted(set(cuts))
    chunks = [RECORDED[a:b] for a, b in zip([0, *points], [*points, len(RECORDED)], strict=True)]
    assert _parse(chunks, store=store) == _parse([RECORDED], store=store)


def test_parser_events_from_a_recorded_stream() -> None:
    events = _parse([RECORDED], store=True)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "héllo wörld 😀"
    calls = [e.call for e in events if isinstance(e, ToolCallDone)]
    assert [(c.id, c.name, c.arguments) for c in calls] == [("call_1", "f", '{"a": 1}')]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status == "complete"
    assert (finished.usage.input_tokens, finished.usage.cached_input_tokens) == (5, 2)
    assert [d.kind for d in finished.derived] == ["provider_state"]
    hidden = _parse([RECORDED], store=False)[-1].derived
    assert [d.kind for d in hidden] == ["hidden"]
    assert hidden[0].data["items"][0]["encrypted_content"] == "blob"


async def test_closing_the_stream_early_releases_the_connection() -> None:
    """The worker cancels by no longer iterating; the HTTP stream must close cleanly."""
    from contextlib import aclosing

    with openai_server() as server:
        p = provider(server)
        thread = Thread()
        thread.user("a fairly long message to stream back")
        async with aclosing(p.stream_turn(request(thread))) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
        # The provider is still usable afterwards (nothing half-open left behind).
        turn = await run_turn(p, request(thread))
        assert turn.finished.status == "complete"
