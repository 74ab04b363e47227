"""The hosted providers' HTTP reads (crdtchat.providers.hosted.TimedReadStream): timed by
asyncio rather than by httpcore's per-read cancel scope, with the same outcomes, against a
real loopback server."""

from __future__ import annotations

import httpx
import pytest

from crdtchat.providers.hosted import TimedReadStream, new_client, reused_connections
from crdtchat.providers.openai_responses import OpenAIResponsesProvider
from tests.support.providers import Thread, openai_server, policy, request, run_turn

pytestmark = pytest.mark.anyio

MODEL = "gpt-4.1"


async def test_a_call_client_reads_through_the_timed_stream() -> None:
    # Also pins what TimedReadStream relies on: httpx's transport pool and httpcore's stream.
    with openai_server() as server:
        body = {"model": MODEL, "input": "hello", "stream": True}
        headers = {"authorization": "Bearer sk-loop"}
        async with new_client() as client:
            url = f"{server.base_url}/responses"
            async with client.stream("POST", url, json=body, headers=headers) as response:
                assert isinstance(response.extensions["network_stream"], TimedReadStream)
                text = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert b"response.completed" in text


async def test_a_streamed_turn_reads_to_its_end() -> None:
    with openai_server(event_delay=0.01) as server:
        provider = OpenAIResponsesProvider(
            model=MODEL, api_key="sk-loop", base_url=server.base_url, retry=policy()[0]
        )
        thread = Thread()
        thread.user("one two three four")
        turn = await run_turn(provider, request(thread))
    assert turn.finished.status == "complete"
    assert turn.text == "[turn 1] You said: one two three four"


@pytest.mark.parametrize("shared", [False, True], ids=["own client", "reused_connections"])
async def test_a_read_that_waits_past_the_read_timeout_cuts_the_stream(shared: bool) -> None:
    """Also through a shared client, made with the default timeouts: the provider's own
    go with each of its requests."""
    with openai_server(event_delay=1.0) as server:
        provider = OpenAIResponsesProvider(
            model=MODEL,
            api_key="sk-loop",
            base_url=server.base_url,
            retry=policy(max_attempts=1)[0],
            timeout=httpx.Timeout(5.0, read=0.2),
        )
        thread = Thread()
        thread.user("hello")
        if shared:
            async with reused_connections():
                turn = await run_turn(provider, request(thread))
        else:
            turn = await run_turn(provider, request(thread))
    assert turn.finished.status == "incomplete"
    assert "ReadTimeout" in (turn.finished.error or "")


async def test_calls_inside_reused_connections_share_one_connection() -> None:
    """A worker's room: the reply, then the title request, over one kept-alive connection;
    outside the block each call has a client and a connection of its own."""
    with openai_server() as server:
        provider = OpenAIResponsesProvider(
            model=MODEL, api_key="sk-loop", base_url=server.base_url, retry=policy()[0]
        )
        thread = Thread()
        thread.user("hello")
        async with reused_connections():
            for _ in range(2):
                assert (await run_turn(provider, request(thread))).finished.status == "complete"
        for _ in range(2):
            assert (await run_turn(provider, request(thread))).finished.status == "complete"
        ports = [post.client_port for post in server.posts("/responses")]
    assert ports[0] == ports[1] and len({*ports[1:]}) == 3
