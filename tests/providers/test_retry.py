"""Retry policy: what is retried, how long it waits, and that the budget is bounded."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtchat.providers import hosted
from crdtchat.providers.anthropic_messages import MessagesStreamParser
from crdtchat.providers.base import ProviderError
from crdtchat.providers.openai_chat import ChatStreamParser
from crdtchat.providers.openai_responses import OpenAIResponsesProvider, ResponsesStreamParser
from crdtchat.providers.registry import PROVIDER_NAMES, make_provider
from crdtchat.providers.retry import (
    RetryableStreamError,
    RetryPolicy,
    parse_retry_after,
    zero_delay_policy,
)
from crdtchat.providers.sse import SSEEvent
from tests.support.providers import SleepRecorder

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (429, True),
        (408, True),
        (409, True),
        (500, True),
        (502, True),
        (503, True),
        (529, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
    ],
)
def test_retryable_statuses(status: int, retry: bool) -> None:
    assert RetryPolicy.retryable_status(status) is retry


def test_x_should_retry_overrides_the_status() -> None:
    assert RetryPolicy.retryable_status(400, {"x-should-retry": "true"})
    assert not RetryPolicy.retryable_status(503, {"X-Should-Retry": "false"})


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}, now=now) == 3.0
    assert parse_retry_after({"Retry-After": "1.5"}, now=now) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, now=now) == 0.25
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(42)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0
    for junk in ("soon", "-1", "nan", "inf", ""):
        assert parse_retry_after({"retry-after": junk}, now=now) is None
    assert parse_retry_after({}, now=now) is None


def test_a_server_wait_longer_than_the_cap_means_give_up() -> None:
    p = RetryPolicy(max_retry_after=60)
    assert p.delay(1, {"retry-after": "61"}) is None
    assert p.delay(1, {"retry-after": "60"}) == 60


@given(st.integers(min_value=1, max_value=40), st.floats(min_value=0, max_value=1))
def test_full_jitter_stays_within_the_capped_exponential(failures: int, r: float) -> None:
    p = RetryPolicy(base_delay=0.5, max_delay=20, random=lambda: r)
    delay = p.backoff(failures)
    assert 0 <= delay <= min(20, 0.5 * 2 ** (failures - 1))
    assert delay == pytest.approx(r * min(20, 0.5 * 2 ** (failures - 1)))


async def test_wait_uses_the_injected_sleep_and_stops_at_the_budget() -> None:
    slept = SleepRecorder()
    p = RetryPolicy(max_attempts=3, sleep=slept, random=lambda: 1.0)
    assert await p.wait(1) and await p.wait(2, {"retry-after": "4"})
    assert not await p.wait(3)
    assert slept.delays == [0.5, 4.0]


async def test_zero_delay_policy_does_not_wait() -> None:
    p = zero_delay_policy(2)
    assert await p.wait(1) is True
    assert await p.wait(2) is False


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_registry_builds_hosted_providers_and_refuses_unknown_names() -> None:
    assert set(PROVIDER_NAMES) == {"local", "openai", "openai-chat", "anthropic"}
    for name, api in [
        ("openai", "responses"),
        ("openai-chat", "chat.completions"),
        ("anthropic", "messages"),
    ]:
        provider = make_provider(name, model="m-1")
        assert (provider.name, provider.api, provider.model) == (name, api, "m-1")
    assert make_provider("anthropic", model=None).model  # a default model
    with pytest.raises(ProviderError, match="unknown provider 'nope'"):
        make_provider("nope", model=None)


@pytest.mark.parametrize(
    "parser",
    [ChatStreamParser, ResponsesStreamParser, MessagesStreamParser],
    ids=["openai-chat", "openai-responses", "anthropic"],
)
@pytest.mark.parametrize("data", ['{"type": "message_st', "[1, 2]"])
def test_a_garbled_stream_event_is_retried_by_every_hosted_parser(
    parser: Callable[[], Any], data: str
) -> None:
    """A stream cut mid-event, or an event that is not a JSON object, is a stream to try again
    (`providers.hosted.event_object`), not a turn that failed for good."""
    with pytest.raises(RetryableStreamError, match=r"malformed|not a JSON object"):
        parser().feed(SSEEvent(data=data))


def test_the_tls_context_is_built_with_the_provider_not_in_a_turn() -> None:
    """Building it takes ~70 ms: in a worker's first turns that stalls every stream beside."""
    hosted._ssl_context.cache_clear()
    OpenAIResponsesProvider(api_key="sk-test")
    assert hosted._ssl_context.cache_info().currsize == 1
