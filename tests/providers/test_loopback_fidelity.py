"""The loopback servers are only worth testing against if they speak the real wire formats.

Each test drives a fake with the official `openai` / `anthropic` SDK (their own HTTP stack,
SSE decoder, pydantic models, stream accumulators and error classes) and checks that what the
SDK makes of the replies is what the real services give: event types, usage fields, error
classes and codes.
"""

from __future__ import annotations

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import RawMessageStartEvent
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemDoneEvent,
    ResponseReasoningItem,
    ResponseTextDeltaEvent,
)

from crdtchat.loopback.anthropic_server import AnthropicLoopback
from crdtchat.loopback.openai_server import OpenAILoopback

KEY = "sk-fidelity"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
}


@pytest.fixture
def oa():
    with OpenAILoopback(api_key=KEY, models={"gpt-4.1", "gpt-5-mini", "o4-mini"}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        yield server, client
        client.close()


@pytest.fixture
def an():
    with AnthropicLoopback(api_key=KEY, models={"claude-a", "claude-b"}) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
        yield server, client
        client.close()


# ---------------------------------------------------------------- OpenAI Responses


def test_responses_create_parses_into_a_response_with_usage(oa) -> None:
    _, client = oa
    response = client.responses.create(model="gpt-4.1", input="hello there", instructions="hi")
    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output_text == "[turn 1] You said: hello there"
    assert response.usage.input_tokens == 3
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens == 6


def test_responses_stream_event_types_and_sequence_numbers(oa) -> None:
    _, client = oa
    events = list(client.responses.create(model="gpt-4.1", input="stream this", stream=True))
    assert isinstance(events[0], ResponseCreatedEvent)
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == "[turn 1] You said: stream this"
    assert events[-1].response.usage.output_tokens == 6


def test_responses_stream_helper_accumulates_a_consistent_final_response(oa) -> None:
    _, client = oa
    with client.responses.stream(
        model="gpt-4.1", input=[{"role": "user", "content": "ab cd"}]
    ) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.output_text == "".join(deltas) == "[turn 1] You said: ab cd"


def test_previous_response_id_chains_and_expiry_gives_the_exact_error(oa) -> None:
    server, client = oa
    first = client.responses.create(model="gpt-4.1", input="one two")
    second = client.responses.create(model="gpt-4.1", input="three", previous_response_id=first.id)
    assert second.output_text == "[turn 2] You said: three"
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens == 2 + 6
    server.expire(first.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-4.1", input="four", previous_response_id=first.id)
    err = caught.value
    assert err.status_code == 400
    assert err.code == "previous_response_not_found"
    assert err.param == "previous_response_id"
    assert err.type == "invalid_request_error"
    assert err.body == {
        "message": f"Previous response with id '{first.id}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    # The second response is still there.
    assert client.responses.retrieve(second.id).id == second.id


def test_a_developer_item_is_stored_with_the_response_and_instructions_are_not(oa) -> None:
    # The API's rule: input items become part of the stored response that
    # `previous_response_id` resumes; `instructions` apply to one request only.
    _, client = oa
    developer = {"role": "developer", "content": "be brief now"}
    with_item = client.responses.create(
        model="gpt-4.1", input=[developer, {"role": "user", "content": "one two"}]
    )
    assert with_item.instructions is None
    assert with_item.usage.input_tokens == 3 + 2
    chained = client.responses.create(
        model="gpt-4.1", input="three", previous_response_id=with_item.id
    )
    # Cached: the developer item, the question and the answer; new: "three" alone.
    assert chained.usage.input_tokens_details.cached_tokens == 3 + 2 + 6
    assert chained.usage.input_tokens == 3 + 2 + 6 + 1

    with_instructions = client.responses.create(
        model="gpt-4.1", input="one two", instructions="be brief now"
    )
    assert with_instructions.instructions == "be brief now"
    chained = client.responses.create(
        model="gpt-4.1", input="three", previous_response_id=with_instructions.id
    )
    assert chained.instructions is None
    assert chained.usage.input_tokens_details.cached_tokens == 2 + 6  # not the instructions
    assert chained.usage.input_tokens == 2 + 6 + 1


def test_function_calling_round_trip_through_the_sdk(oa) -> None:
    _, client = oa
    first = client.responses.create(model="gpt-4.1", input="use get_weather in Oslo", tools=[TOOL])
    (call,) = first.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    second = client.responses.create(
        model="gpt-4.1",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}],
        tools=[TOOL],
    )
    assert second.output_text == "The tool said: rain"
    with pytest.raises(openai.BadRequestError, match="No tool call found"):
        client.responses.create(
            model="gpt-4.1",
            input=[{"type": "function_call_output", "call_id": "call_nope", "output": "x"}],
        )


def test_streamed_function_call_arguments(oa) -> None:
    _, client = oa
    events = list(
        client.responses.create(model="gpt-4.1", input="get_weather now", tools=[TOOL], stream=True)
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if isinstance(e, ResponseOutputItemDoneEvent)]
    assert done[-1].item.type == "function_call"
    assert done[-1].item.arguments == deltas == '{"input": "get_weather now"}'


def test_store_false_encrypted_reasoning_is_bound_to_its_model(oa) -> None:
    _, client = oa
    first = client.responses.create(
        model="gpt-5-mini", input="think", store=False, include=["reasoning.encrypted_content"]
    )
    reasoning = first.output[0]
    assert isinstance(reasoning, ResponseReasoningItem) and reasoning.encrypted_content
    echoed = [
        {
            "type": "reasoning",
            "id": reasoning.id,
            "summary": [],
            "encrypted_content": reasoning.encrypted_content,
        },
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "more"},
    ]
    ok = client.responses.create(model="gpt-5-mini", input=echoed, store=False)
    assert ok.status == "completed"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="o4-mini", input=echoed, store=False)
    assert caught.value.code == "invalid_encrypted_content"
    # Without encrypted content, a store:false item cannot be found.
    with pytest.raises(openai.NotFoundError, match="Items are not persisted"):
        client.responses.create(
            model="gpt-5-mini", input=[{"type": "reasoning", "id": reasoning.id, "summary": []}]
        )


def test_openai_error_classes(oa) -> None:
    server, client = oa
    server.fail_next(1, status=429, retry_after="1")
    with pytest.raises(openai.RateLimitError) as rate:
        client.responses.create(model="gpt-4.1", input="x")
    assert rate.value.code == "rate_limit_exceeded"
    assert rate.value.response.headers["retry-after"] == "1"
    assert rate.value.request_id.startswith("req_")
    server.fail_next(1, status=500)
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="gpt-4.1", input="x")
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="gpt-nope", input="x")
    assert missing.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.responses.create(model="gpt-4.1", input="x")
    assert auth.value.code == "invalid_api_key"


def test_the_sdk_retries_on_our_retry_headers(oa) -> None:
    server, _ = oa
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=2)
    server.fail_next(2, status=429, headers={"retry-after-ms": "5"})
    assert client.responses.create(model="gpt-4.1", input="x").status == "completed"
    assert [r.status for r in server.posts("/responses")] == [429, 429, 200]


def test_in_band_error_event_and_cut_stream_as_the_sdk_sees_them(oa) -> None:
    server, client = oa
    server.error_event_next(1, after_events=3)
    events = list(client.responses.create(model="gpt-4.1", input="a b c d", stream=True))
    assert isinstance(events[-1], ResponseErrorEvent) and events[-1].code == "server_error"
    server.cut_next(1, after_events=3)
    with pytest.raises(openai.APIConnectionError):
        list(client.responses.create(model="gpt-4.1", input="a b c d", stream=True))


# ---------------------------------------------------------------- OpenAI Chat Completions


def test_chat_completion_stream_with_usage_chunk(oa) -> None:
    _, client = oa
    chunks = list(
        client.chat.completions.create(
            model="gpt-4.1",
            messages=[{"role": "user", "content": "hi you"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[turn 1] You said: hi you"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 2
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_helper_assembles_tool_calls(oa) -> None:
    _, client = oa
    tool = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
    with client.chat.completions.stream(
        model="gpt-4.1", messages=[{"role": "user", "content": "get_weather please"}], tools=[tool]
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"input": "get_weather please"}'
    assert final.choices[0].finish_reason == "tool_calls"
    follow = client.chat.completions.create(
        model="gpt-4.1",
        messages=[
            {"role": "user", "content": "get_weather please"},
            final.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "hail"},
        ],
    )
    assert follow.choices[0].message.content == "The tool said: hail"
    assert follow.usage.prompt_tokens_details.cached_tokens > 0  # the prefix was seen before


def test_chat_errors_and_in_band_error(oa) -> None:
    server, client = oa
    with pytest.raises(openai.BadRequestError, match="role 'tool'"):
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "tool", "tool_call_id": "x", "content": "y"}]
        )
    server.error_event_next(1, after_events=2, message="boom")
    with pytest.raises(openai.APIError, match="boom"):
        list(
            client.chat.completions.create(
                model="gpt-4.1", messages=[{"role": "user", "content": "a b c"}], stream=True
            )
        )


# ---------------------------------------------------------------- Anthropic Messages


def test_messages_create_and_usage_fields(an) -> None:
    _, client = an
    message = client.messages.create(
        model="claude-a",
        max_tokens=100,
        system=[{"type": "text", "text": "be kind", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hello"}],
    )
    assert message.type == "message" and message.stop_reason == "end_turn"
    assert message.content[0].text == "[turn 1] You said: hello"
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (
        2,
        0,
    )
    assert message.usage.input_tokens == 1
    again = client.messages.create(
        model="claude-a",
        max_tokens=100,
        system=[{"type": "text", "text": "be kind", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hello"}],
    )
    assert again.usage.cache_read_input_tokens == 2 and again.usage.cache_creation_input_tokens == 0


def test_messages_stream_with_thinking_and_redacted_thinking(an) -> None:
    _, client = an
    with client.messages.stream(
        model="claude-a",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "please redact it"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "thinking" in kinds and "signature" in kinds and "text" in kinds
    assert [b.type for b in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].signature and final.content[1].data
    assert final.content[2].text == "[turn 1] You said: please redact it"
    history = [
        {"role": "user", "content": "please redact it"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": "next"},
    ]
    ok = client.messages.create(model="claude-a", max_tokens=100, messages=history)
    assert ok.content[-1].text == "[turn 2] You said: next"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="claude-b", max_tokens=100, messages=history)
    assert caught.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "messages.1.content.0: Invalid `signature` in `thinking` block",
    }


def test_messages_tool_use_stream_and_pairing_rules(an) -> None:
    _, client = an
    tools = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}]
    with client.messages.stream(
        model="claude-a",
        max_tokens=100,
        tools=tools,
        messages=[{"role": "user", "content": "lookup cats"}],
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert isinstance(events[0], RawMessageStartEvent)
    (block,) = final.content
    assert block.type == "tool_use" and block.input == {"input": "lookup cats"}
    assert final.stop_reason == "tool_use"
    history = [
        {"role": "user", "content": "lookup cats"},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
    ]
    with pytest.raises(anthropic.BadRequestError, match="without `tool_result`"):
        client.messages.create(
            model="claude-a",
            max_tokens=100,
            tools=tools,
            messages=[*history, {"role": "user", "content": "no result"}],
        )
    reply = client.messages.create(
        model="claude-a",
        max_tokens=100,
        tools=tools,
        messages=[
            *history,
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "purr"}],
            },
        ],
    )
    assert reply.content[0].text == "The tool said: purr"


def test_anthropic_error_classes(an) -> None:
    server, client = an
    server.fail_next(1, status=429, retry_after="2")
    with pytest.raises(anthropic.RateLimitError) as rate:
        client.messages.create(
            model="claude-a", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert rate.value.body["error"]["type"] == "rate_limit_error"
    assert rate.value.response.headers["retry-after"] == "2"
    server.fail_next(1, status=529)
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(
            model="claude-a", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    server.fail_next(1, status=500)
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(
            model="claude-a", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="claude-z", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="bad", max_retries=0).messages.create(
            model="claude-a", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks with cache_control"):
        client.messages.create(
            model="claude-a",
            max_tokens=10,
            system=[dict(marked) for _ in range(3)],
            messages=[{"role": "user", "content": [dict(marked), dict(marked)]}],
        )


def test_anthropic_mid_stream_error_and_cut(an) -> None:
    server, client = an
    server.error_event_next(1, after_events=4)
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client.messages.stream(
            model="claude-a", max_tokens=50, messages=[{"role": "user", "content": "a b c"}]
        ) as stream,
    ):
        list(stream)
    assert caught.value.body["error"]["type"] == "overloaded_error"
    server.cut_next(1, after_events=4)
    # This SDK version lets the transport's error through from a stream helper rather than
    # wrapping it: either way, the body is seen as broken, not as a short complete message.
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)),
        client.messages.stream(
            model="claude-a", max_tokens=50, messages=[{"role": "user", "content": "a b c"}]
        ) as stream,
    ):
        list(stream)


def test_the_anthropic_sdk_retries_on_our_retry_headers(an) -> None:
    server, _ = an
    client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=1)
    server.fail_next(1, status=529, headers={"retry-after-ms": "5"})
    message = client.messages.create(
        model="claude-a", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert [r.status for r in server.posts("/v1/messages")] == [529, 200]


@pytest.mark.parametrize(
    ("module", "variable"),
    [
        ("crdtchat.loopback.openai_server", "OPENAI_BASE_URL"),
        ("crdtchat.loopback.anthropic_server", "ANTHROPIC_BASE_URL"),
    ],
)
def test_servers_run_as_python_m_for_demos(module: str, variable: str) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        name, _, base_url = line.partition("=")
        assert name == variable, (line, proc.stderr.read() if proc.poll() is not None else "")
        if variable == "OPENAI_BASE_URL":
            client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
            assert client.responses.create(model="m", input="demo").output_text.endswith("demo")
        else:
            client = anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0)
            message = client.messages.create(
                model="m", max_tokens=20, messages=[{"role": "user", "content": "demo"}]
            )
            assert message.content[0].text.endswith("demo")
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
