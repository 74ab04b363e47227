"""The worker with the real hosted providers, against the loopback API servers.

Everything here goes through the worker (`serve_room` on a `Conversation`), with a
`ProviderPool` that builds the real provider classes pointed at the loopback servers. The
assertions are on what the servers received (their request logs) and on the document: this is
where "the worker finds the usable derived state on its own" is shown, which the provider
tests in tests/providers/ cannot show (they hand the provider its derived entries).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from crdtchat.document import Conversation
from crdtchat.loopback.anthropic_server import AnthropicLoopback
from crdtchat.loopback.http import LoggedRequest
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.anthropic_messages import AnthropicProvider, count_cache_breakpoints
from crdtchat.providers.base import Provider
from crdtchat.providers.openai_chat import OpenAIChatProvider
from crdtchat.providers.openai_responses import OpenAIResponsesProvider
from crdtchat.providers.retry import RetryPolicy
from crdtchat.schema import DerivedEntry, DerivedKind, Message
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room
from crdtchat.worker.titles import title_of
from crdtchat.worker.turn import Changes, TurnSettings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

OPENAI_KEY = "sk-loop"
ANTHROPIC_KEY = "ak-loop"
REASONING_MODEL = "gpt-5-mini"  # the loopback "reasons" for gpt-5*/o* models
PLAIN_MODEL = "gpt-4.1"
CLAUDE = "claude-sonnet-4-5"
# Titles from the first words: these tests count the provider's requests, one per turn.
FAST_TURNS = TurnSettings(flush_interval=0.01, titles="first-words")
ONCE = RoomSettings(idle_after=0.0, turn=FAST_TURNS)
KEEP_SERVING = RoomSettings(idle_after=30.0, turn=FAST_TURNS)


# ---------------------------------------------------------------- rig


@dataclass
class SleepRecorder:
    """The retry policy's sleep: records the delays (and runs a hook) instead of waiting."""

    delays: list[float] = field(default_factory=list)
    hook: Callable[[], None] | None = None

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.hook is not None:
            self.hook()
        await anyio.lowlevel.checkpoint()


def recording_policy(max_attempts: int = 4) -> tuple[RetryPolicy, SleepRecorder]:
    recorder = SleepRecorder()
    return RetryPolicy(max_attempts=max_attempts, sleep=recorder, random=lambda: 0.5), recorder


@dataclass
class Servers:
    openai: OpenAILoopback | None = None
    anthropic: AnthropicLoopback | None = None

    def pool(
        self,
        default: str = "openai",
        *,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> ProviderPool:
        """A pool of the real provider classes, each pointed at its loopback server."""
        policy = retry or recording_policy()[0]

        def make(name: str, *, model: str | None) -> Provider:
            if name in ("openai", "openai-chat"):
                assert self.openai is not None
                cls = OpenAIResponsesProvider if name == "openai" else OpenAIChatProvider
                return cls(
                    model=model,
                    api_key=OPENAI_KEY,
                    base_url=self.openai.base_url,
                    retry=policy,
                    client=client,
                )
            if name == "anthropic":
                assert self.anthropic is not None
                return AnthropicProvider(
                    model=model,
                    api_key=ANTHROPIC_KEY,
                    base_url=self.anthropic.base_url,
                    retry=policy,
                    client=client,
                )
            raise AssertionError(f"no loopback for {name}")

        return ProviderPool(default, make=make)


@contextmanager
def loopbacks(**openai_kwargs: Any) -> Iterator[Servers]:
    with (
        OpenAILoopback(api_key=OPENAI_KEY, **openai_kwargs) as openai,
        AnthropicLoopback(api_key=ANTHROPIC_KEY) as anthropic,
    ):
        yield Servers(openai, anthropic)  # type: ignore[arg-type]


def peers(**settings: Any) -> tuple[Conversation, Conversation]:
    """A person's device and a worker, two peers of one document."""
    person = Conversation.create(author="alice")
    if settings:
        person.set_settings(**settings)
    return person, Conversation(person.doc, author="worker-1")


async def answer(worker: Conversation, pool: ProviderPool, expected: int = 1) -> None:
    """Run the worker's room loop until everything waiting is answered."""
    with anyio.fail_after(20):
        assert await serve_room(worker, pool, room="conv-1", settings=ONCE) == expected


async def ask(person: Conversation, worker: Conversation, pool: ProviderPool, text: str) -> Message:
    """The person asks, the worker answers; returns the committed answer."""
    question = person.append("user", text)
    await answer(worker, pool)
    [reply] = person.assistant_answers(question.id)
    return reply


@asynccontextmanager
async def serving(worker: Conversation, pool: ProviderPool) -> AsyncIterator[None]:
    """The worker serving the room in the background for the duration of the block."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve_room, worker, pool, room="conv-1", settings=KEEP_SERVING))
        yield
        tg.cancel_scope.cancel()


async def until(conversation: Conversation, predicate: Callable[[], bool]) -> None:
    """Wait (event-driven, bounded) until `predicate` holds after some change of the messages."""
    changed = Changes()
    conversation.view.on_change(changed.notify)
    with anyio.fail_after(20):
        while not predicate():
            await changed.wait()


def entries(conversation: Conversation, message_id: str, kind: DerivedKind) -> list[DerivedEntry]:
    return [
        e
        for e in conversation.derived_entries().values()
        if e.message_id == message_id and e.kind == kind
    ]


def only(conversation: Conversation, message_id: str, kind: DerivedKind) -> DerivedEntry:
    [entry] = entries(conversation, message_id, kind)
    return entry


def user_item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def assistant_item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": text}


def last_response_id(server: OpenAILoopback) -> str:
    return list(server.responses)[-1]


def bodies(requests: list[LoggedRequest]) -> list[dict[str, Any]]:
    return [r.body for r in requests]


# ---------------------------------------------------------------- OpenAI Responses: state


async def test_turn_two_sends_only_the_new_message_and_the_response_id_the_worker_found() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        pool = servers.pool()
        person, worker = peers(system="Be brief.", provider="openai", model=PLAIN_MODEL)

        first = await ask(person, worker, pool, "hello there")
        state = only(person, first.id, "provider_state")
        assert state.data == {"response_id": last_response_id(oa), "system_in_input": True}
        assert state.prefix_hash == person.prefix_hash(first.id)
        assert (state.provider, state.api, state.model) == ("openai", "responses", PLAIN_MODEL)

        second = await ask(person, worker, pool, "how are you")
        turn1, turn2 = bodies(oa.posts("/responses"))
        assert "previous_response_id" not in turn1
        # The system prompt goes once, inside turn 1's stored input, never as `instructions`.
        assert turn1["input"] == [
            {"type": "message", "role": "developer", "content": "Be brief."},
            user_item("hello there"),
        ]
        assert turn2["previous_response_id"] == state.data["response_id"]
        assert turn2["input"] == [user_item("how are you")]
        assert "instructions" not in turn1 and "instructions" not in turn2
        assert turn2["prompt_cache_key"] == "conv-1"
        # The server rebuilt the whole conversation from the id: it counted two user turns.
        assert (second.content, second.status) == ("[turn 2] You said: how are you", "complete")
        usage = only(person, second.id, "usage").data
        # cached: "Be brief." + "hello there" + "[turn 1] You said: hello there"; new: the
        # message alone
        assert usage["cached_input_tokens"] == 2 + 2 + 6
        assert usage["input_tokens"] - usage["cached_input_tokens"] == 3
        assert oa.posts("/responses")[1].usage["input_tokens"] == usage["input_tokens"]


async def test_after_discarding_all_derived_state_the_full_thread_gives_the_same_answer() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        pool = servers.pool()
        kept = peers(provider="openai", model=PLAIN_MODEL)
        dropped = peers(provider="openai", model=PLAIN_MODEL)
        replies: list[Message] = []
        for person, worker in (kept, dropped):
            await ask(person, worker, pool, "hello there")
            if person is dropped[0]:
                person.discard_all_derived()  # e.g. a device that pruned it, or a new replica
                assert person.derived_entries() == {}
            replies.append(await ask(person, worker, pool, "how are you"))

        incremental, replay = bodies(oa.posts("/responses"))[1::2]
        assert incremental["input"] == [user_item("how are you")]
        assert "previous_response_id" not in replay
        first_answer = dropped[0].current_thread()[1].content
        assert replay["input"] == [
            user_item("hello there"),
            assistant_item(first_answer),
            user_item("how are you"),
        ]
        assert replies[0].content == replies[1].content == "[turn 2] You said: how are you"
        assert only(dropped[0], replies[1].id, "usage").data["cached_input_tokens"] == 0
        assert only(kept[0], replies[0].id, "usage").data["cached_input_tokens"] > 0
        # The replayed turn leaves fresh state behind, so the next turn is incremental again.
        await ask(*dropped, pool, "still there")
        assert oa.posts("/responses")[-1].body["input"] == [user_item("still there")]


async def test_an_expired_response_id_is_replayed_in_the_same_turn_and_replaced() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        pool = servers.pool()
        person, worker = peers(provider="openai", model=PLAIN_MODEL)
        first = await ask(person, worker, pool, "hello there")
        old = only(person, first.id, "provider_state")
        oa.expire()

        second = await ask(person, worker, pool, "still there")

        posts = oa.posts("/responses")
        assert [r.status for r in posts] == [200, 400, 200]
        assert posts[1].body["previous_response_id"] == old.data["response_id"]
        assert "previous_response_id" not in posts[2].body
        assert [i["role"] for i in posts[2].body["input"]] == ["user", "assistant", "user"]
        assert (second.content, second.status) == ("[turn 2] You said: still there", "complete")
        assert len(person.assistant_answers(person.current_thread()[-2].id)) == 1
        assert entries(person, first.id, "provider_state") == []  # the dead handle is gone
        new = only(person, second.id, "provider_state")
        assert new.data["response_id"] == last_response_id(oa) != old.data["response_id"]
        await ask(person, worker, pool, "and now")
        assert oa.posts("/responses")[-1].body["previous_response_id"] == new.data["response_id"]


async def test_store_false_keeps_encrypted_reasoning_and_sends_it_only_to_the_same_model() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        pool = servers.pool()
        person, worker = peers(provider="openai", model=REASONING_MODEL, params={"store": False})

        first = await ask(person, worker, pool, "think about owls")
        assert entries(person, first.id, "provider_state") == []  # nothing stored server-side
        [blob] = only(person, first.id, "hidden").data["items"]
        assert blob["type"] == "reasoning" and blob["encrypted_content"]

        second = await ask(person, worker, pool, "and bees")
        turn2 = oa.posts("/responses")[1].body
        assert (turn2["store"], turn2["include"]) == (False, ["reasoning.encrypted_content"])
        assert "previous_response_id" not in turn2
        assert turn2["input"] == [
            user_item("think about owls"),
            blob,  # echoed right before the assistant message that produced it
            assistant_item(first.content),
            user_item("and bees"),
        ]

        person.set_settings(model="gpt-5")  # another model: the blobs are not its to read
        third = await ask(person, worker, pool, "and trains")
        turn3 = oa.posts("/responses")[2].body
        assert [i["type"] for i in turn3["input"]] == ["message"] * 5
        # Still there for a switch back: only another model, not stale.
        assert len(entries(person, first.id, "hidden")) == 1

        person.set_settings(model=REASONING_MODEL)
        await ask(person, worker, pool, "and snow")
        turn4 = oa.posts("/responses")[3].body
        sent = [i for i in turn4["input"] if i["type"] == "reasoning"]
        own = [only(person, m.id, "hidden").data["items"][0] for m in (first, second)]
        assert sent == own  # gpt-5-mini's own blobs, and not gpt-5's blob of the third turn
        assert entries(person, third.id, "hidden")[0].model == "gpt-5"
        assert [r.status for r in oa.posts("/responses")] == [200] * 4  # nothing refused


# ---------------------------------------------------------------- switching providers


def assistant_turns_of(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [m["content"] for m in body["messages"] if m["role"] == "assistant"]


async def test_switching_providers_ignores_the_others_derived_entries() -> None:
    with loopbacks() as servers:
        oa, an = servers.openai, servers.anthropic
        pool = servers.pool()
        # One params object for all: each provider reads only the keys it knows.
        params = {"store": False, "thinking_budget": 1024}
        person, worker = peers(provider="openai", model=REASONING_MODEL, params=params)

        a1 = await ask(person, worker, pool, "tell me about owls")  # hidden reasoning blob
        person.set_settings(params={**params, "store": True})
        a2 = await ask(person, worker, pool, "tell me about bees")  # provider_state
        state = only(person, a2.id, "provider_state")

        person.set_settings(provider="anthropic", model=CLAUDE)
        a3 = await ask(person, worker, pool, "tell me about trains")
        [claude_body] = bodies(an.posts("/v1/messages"))
        text = json.dumps(claude_body)
        assert "encrypted_content" not in text and "previous_response_id" not in text
        assert all(b["type"] == "text" for turn in assistant_turns_of(claude_body) for b in turn)
        thinking = only(person, a3.id, "hidden").data["blocks"]
        assert [b["type"] for b in thinking] == ["thinking"]

        person.set_settings(provider="openai-chat", model="gpt-4.1-mini")
        a4 = await ask(person, worker, pool, "tell me about snow")
        [chat_body] = bodies(oa.posts("/chat/completions"))
        text = json.dumps(chat_body)
        assert thinking[0]["thinking"] not in text and "signature" not in text
        assert "encrypted_content" not in text
        assert [m["role"] for m in chat_body["messages"]] == ["user", "assistant"] * 3 + ["user"]
        assert a4.model is not None and a4.model.api == "chat.completions"

        person.set_settings(provider="openai", model=REASONING_MODEL)
        a5 = await ask(person, worker, pool, "tell me about tea")
        back = oa.posts("/responses")[-1].body
        # a2's entry still passes all three rules (the thread up to a2 is unchanged), so the
        # worker continues from it and sends what came after, other providers' turns as text.
        assert back["previous_response_id"] == state.data["response_id"]
        assert back["input"] == [
            user_item("tell me about trains"),
            assistant_item(a3.content),
            user_item("tell me about snow"),
            assistant_item(a4.content),
            user_item("tell me about tea"),
        ]
        assert a5.content == "[turn 5] You said: tell me about tea"

        # An edit early in the thread changes every prefix hash: no entry passes rule 1 now,
        # so the worker deletes them and the next turn replays the whole thread.
        person.edit_text(person.current_thread()[0].id, "tell me about owls, please")
        a6 = await ask(person, worker, pool, "tell me about maps")
        replay = oa.posts("/responses")[-1].body
        assert "previous_response_id" not in replay
        assert [i["type"] for i in replay["input"]] == ["message"] * 11  # a1's blob is gone too
        assert replay["input"][0] == user_item("tell me about owls, please")
        assert a6.content == "[turn 6] You said: tell me about maps"
        old = {a1.id, a2.id, a3.id, a4.id, a5.id}
        left = {
            (e.message_id, e.kind)
            for e in person.derived_entries().values()
            if e.kind not in ("usage", "title") and e.message_id in old  # records stay
        }
        assert left == set()
        assert [r.status for r in [*oa.requests, *an.requests]] == [200] * 6


# ---------------------------------------------------------------- Anthropic


async def test_anthropic_cache_breakpoints_usage_and_thinking_through_the_worker() -> None:
    with loopbacks() as servers:
        an = servers.anthropic
        pool = servers.pool()
        person, worker = peers(
            system="You are terse and exact.",
            provider="anthropic",
            model=CLAUDE,
            params={"thinking_budget": 1024},
        )
        person.set_tool("lookup", "Look a word up", {"properties": {"input": {"type": "string"}}})
        answers = [
            await ask(person, worker, pool, text)
            for text in ("first question here", "please redact this one", "third", "fourth")
        ]

        posts = an.posts("/v1/messages")
        assert [r.status for r in posts] == [200] * 4
        for post, reply in zip(posts, answers, strict=True):
            assert 1 <= count_cache_breakpoints(post.body) <= 4
            usage = only(person, reply.id, "usage").data
            assert usage["cached_input_tokens"] == post.usage["cache_read_input_tokens"]
            assert usage["cache_creation_input_tokens"] == post.usage["cache_creation_input_tokens"]
            assert usage["input_tokens"] == (
                post.usage["input_tokens"]
                + post.usage["cache_read_input_tokens"]
                + post.usage["cache_creation_input_tokens"]
            )
        first_usage = only(person, answers[0].id, "usage").data
        assert first_usage["cached_input_tokens"] == 0
        assert first_usage["cache_creation_input_tokens"] > 0
        for reply in answers[1:]:
            assert only(person, reply.id, "usage").data["cached_input_tokens"] > 0

        # Thinking blocks (and the redacted one) are hidden entries, echoed to the same model.
        hidden = [only(person, a.id, "hidden").data["blocks"] for a in answers]
        assert [b["type"] for b in hidden[1]] == ["thinking", "redacted_thinking"]
        last = posts[-1].body
        for turn, blocks in zip(assistant_turns_of(last), hidden[:3], strict=True):
            assert turn[: len(blocks)] == blocks
            assert "cache_control" not in json.dumps(blocks)
        assert all(a.content.startswith("[turn ") for a in answers)
        assert "Considering" not in "".join(a.content for a in answers)  # never made text

        person.set_settings(model="claude-opus-4-1")  # a signature is bound to its model
        await ask(person, worker, pool, "fifth")
        other = an.posts("/v1/messages")[-1]
        assert other.status == 200  # nothing refused, nothing to recover from
        sent = [b["type"] for turn in assistant_turns_of(other.body) for b in turn]
        assert set(sent) == {"text"}
        assert len(entries(person, answers[0].id, "hidden")) == 1  # kept for a switch back


# ---------------------------------------------------------------- failures


async def test_429_with_retry_after_and_500_are_retried_within_the_turn() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        policy, sleeps = recording_policy()
        pool = servers.pool(retry=policy)
        person, worker = peers(provider="openai", model=PLAIN_MODEL)
        oa.fail_next(status=429, retry_after="3")
        oa.fail_next(status=500)

        reply = await ask(person, worker, pool, "hello there")

        assert [r.status for r in oa.posts("/responses")] == [429, 500, 200]
        # Retry-After honoured; then full jitter: random 0.5 * min(20, 0.5 * 2**1)
        assert sleeps.delays == [3.0, 0.5]
        assert (reply.content, reply.status) == ("[turn 1] You said: hello there", "complete")
        assert len(person.all_messages()) == 2


class HoldTheCut(httpx.AsyncBaseTransport):
    """The real HTTP transport, except that a cut (the server dropping the connection) reaches
    the client only once `before_cut` returns: so a test can let the worker flush the partial
    text first, instead of hoping the timing works out."""

    def __init__(self, before_cut: Callable[[], Awaitable[None]]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.before_cut = before_cut

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_HeldStream(response.stream, self.before_cut),  # type: ignore[arg-type]
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _HeldStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, before_cut: Callable[[], Awaitable[None]]):
        self.inner = inner
        self.before_cut = before_cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield chunk
        except httpx.TransportError:
            await self.before_cut()
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_cut_stream_resets_the_worker_stream_and_the_answer_is_whole() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        person, worker = peers(provider="openai", model=PLAIN_MODEL)
        question_text = " ".join(f"word{n}" for n in range(40))
        expected = f"[turn 1] You said: {question_text}"
        seen: list[str] = []
        streamed = Changes()

        def record_streams(*_: object) -> None:
            seen.extend(person.streams_in_flight().values())
            streamed.notify()

        async def partial_text_shown() -> None:
            with anyio.fail_after(10):
                while not any(person.streams_in_flight().values()):
                    await streamed.wait()

        person.streams.observe_deep(record_streams)
        policy, sleeps = recording_policy()
        at_retry: list[dict[str, str]] = []
        sleeps.hook = lambda: at_retry.append(person.streams_in_flight())
        async with httpx.AsyncClient(transport=HoldTheCut(partial_text_shown)) as client:
            pool = servers.pool(retry=policy, client=client)
            oa.cut_next(after_events=12)  # eight deltas in, then the connection drops
            reply = await ask(person, worker, pool, question_text)

        assert [r.fault for r in oa.posts("/responses")] == ["cut", None]
        assert (reply.content, reply.status) == (expected, "complete")  # once, not twice
        partial = "[turn 1] You said: word0 word1 word2 word3 "
        assert partial in seen  # peers saw the text of the attempt that was cut...
        assert at_retry == [{reply.id: ""}]  # ...and saw it wiped before the retry began
        # Every text peers ever saw streaming was a prefix of the final answer.
        assert all(expected.startswith(text) for text in seen)
        assert person.streams_in_flight() == {}


async def test_a_stream_cut_every_time_commits_incomplete_with_the_reason() -> None:
    with loopbacks() as servers:
        oa = servers.openai
        policy, sleeps = recording_policy(max_attempts=3)
        pool = servers.pool(retry=policy)
        person, worker = peers(provider="openai", model=PLAIN_MODEL)
        oa.cut_next(3, after_events=6)

        reply = await ask(person, worker, pool, "one two three four five six seven")

        assert len(oa.posts("/responses")) == 3 and len(sleeps.delays) == 2
        assert reply.status == "incomplete"
        assert reply.error is not None and reply.error.startswith("stream cut:")
        assert "[turn 1] You said: one two three four five six seven".startswith(reply.content)
        assert person.waiting_for_reply() == []  # answered (incomplete), not retried forever
        assert person.streams_in_flight() == {} and person.lease(reply.parent or "") is None


async def test_no_key_is_an_error_turn_and_the_worker_serves_the_next_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real registry reads the environment like the SDKs: no OpenAI key, default URL.
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with AnthropicLoopback(api_key=ANTHROPIC_KEY) as an:
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", an.base_url)
        pool = ProviderPool("openai")
        person, worker = peers()
        async with serving(worker, pool):
            first = person.append("user", "hello there")
            await until(person, lambda: bool(person.assistant_answers(first.id)))
            [failed] = person.assistant_answers(first.id)
            assert (failed.status, failed.error) == ("error", "OPENAI_API_KEY is not set")
            assert failed.model is not None and failed.model.provider == "openai"

            person.set_settings(provider="anthropic", model=CLAUDE)
            second = person.append("user", "are you there")
            await until(person, lambda: bool(person.assistant_answers(second.id)))
        [reply] = person.assistant_answers(second.id)
        # The empty error turn is not sent, so Anthropic sees the two questions as one turn.
        assert reply.status == "complete" and reply.content.endswith("hello there are you there")
        assert len(person.assistant_answers(first.id)) == 1  # the error turn was not retried
        assert len(an.posts("/v1/messages")) == 1


async def test_an_unknown_model_is_an_error_turn_and_the_next_message_is_served() -> None:
    with loopbacks(models={REASONING_MODEL}) as servers:
        oa = servers.openai
        pool = servers.pool()
        person, worker = peers(provider="openai", model="gpt-nope")
        async with serving(worker, pool):
            first = person.append("user", "hello there")
            await until(person, lambda: bool(person.assistant_answers(first.id)))
            person.set_settings(model=REASONING_MODEL)
            second = person.append("user", "hello again")
            await until(person, lambda: bool(person.assistant_answers(second.id)))

        [failed] = person.assistant_answers(first.id)
        assert failed.status == "error"
        assert failed.error == (
            "HTTP 404 model_not_found: The model `gpt-nope` does not exist or you do not have "
            "access to it. (unknown model or endpoint?)"
        )
        [reply] = person.assistant_answers(second.id)
        assert (reply.status, reply.content) == ("complete", "[turn 2] You said: hello again")
        assert [r.status for r in oa.posts("/responses")] == [404, 200]  # a 404 is not retried


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("provider", ["openai", "anthropic", "openai-chat"])
async def test_tool_call_round_trip_with_a_client_peer(provider: str) -> None:
    with loopbacks() as servers:
        model = {"openai": PLAIN_MODEL, "anthropic": CLAUDE, "openai-chat": "gpt-4.1-mini"}
        pool = servers.pool()
        person, worker = peers(provider=provider, model=model[provider])
        person.set_tool(
            "lookup",
            "Look something up",
            {"type": "object", "properties": {"input": {"type": "string"}}},
        )
        async with serving(worker, pool):
            question = person.append("user", "please lookup the weather")
            await until(person, lambda: bool(person.assistant_answers(question.id)))
            [call_turn] = person.assistant_answers(question.id)
            assert call_turn.status == "complete" and call_turn.content == ""
            assert call_turn.tool_calls is not None
            [call] = call_turn.tool_calls
            assert call.name == "lookup"
            assert json.loads(call.arguments) == {"input": "please lookup the weather"}
            assert person.waiting_for_reply() == []  # the client runs the tool, not the worker

            result = person.append("tool", "sunny, 21 C", tool_call_id=call.id)
            await until(person, lambda: bool(person.assistant_answers(result.id)))

        [final] = person.assistant_answers(result.id)
        assert (final.status, final.content) == ("complete", "The tool said: sunny, 21 C")
        assert [m.role for m in person.current_thread()] == [
            "user",
            "assistant",
            "tool",
            "assistant",
        ]
        assert servers.openai is not None and servers.anthropic is not None
        if provider == "openai":
            first, second = bodies(servers.openai.posts("/responses"))
            assert [t["name"] for t in first["tools"]] == ["lookup"]
            state = only(person, call_turn.id, "provider_state")
            assert second["previous_response_id"] == state.data["response_id"]
            assert second["input"] == [
                {"type": "function_call_output", "call_id": call.id, "output": "sunny, 21 C"}
            ]
        elif provider == "anthropic":
            first, second = bodies(servers.anthropic.posts("/v1/messages"))
            assert [t["name"] for t in first["tools"]] == ["lookup"]
            assert [b["type"] for b in second["messages"][1]["content"]] == ["tool_use"]
            [result_block] = second["messages"][2]["content"]
            assert (result_block["type"], result_block["tool_use_id"]) == ("tool_result", call.id)
        else:
            first, second = bodies(servers.openai.posts("/chat/completions"))
            assert [t["function"]["name"] for t in first["tools"]] == ["lookup"]
            assert second["messages"][-1] == {
                "role": "tool",
                "tool_call_id": call.id,
                "content": "sunny, 21 C",
            }


async def test_turns_reuse_one_http_connection() -> None:
    """A stream read to its end goes back to httpx's pool: no new handshake per turn."""
    with loopbacks() as servers:
        async with httpx.AsyncClient() as client:
            pool = servers.pool("openai-chat", client=client)
            person, worker = peers(provider="openai-chat")
            for question in ("one", "two", "three"):
                await ask(person, worker, pool, question)
        ports = {request.client_port for request in servers.openai.posts("/chat/completions")}
        assert len(servers.openai.posts("/chat/completions")) == 3
        assert len(ports) == 1


# ---------------------------------------------------------------- titles


ASKING = RoomSettings(idle_after=0.0, turn=TurnSettings(flush_interval=0.01, titles="ask"))
TITLE_MODELS = {"openai": PLAIN_MODEL, "openai-chat": "gpt-4.1-mini", "anthropic": CLAUDE}
TITLE_PATHS = {"openai": "/responses", "openai-chat": "/chat/completions", "anthropic": "/messages"}


@pytest.mark.parametrize("provider", ["openai", "openai-chat", "anthropic"])
async def test_the_first_reply_is_titled_by_the_same_provider_and_model(provider: str) -> None:
    """The title request goes through the real provider code and the vendor's wire format;
    the answer is cleaned into the `title` entry, and the person's own title overrides it."""
    with loopbacks() as servers:
        loop = servers.anthropic if provider == "anthropic" else servers.openai
        assert loop is not None
        model = TITLE_MODELS[provider]
        person, worker = peers(provider=provider, model=model)
        question = person.append("user", "How do I bake sourdough bread at home with rye?")
        with anyio.fail_after(20):
            assert await serve_room(worker, servers.pool(), room="conv-1", settings=ASKING) == 1
        [reply] = person.assistant_answers(question.id)
        posts = loop.posts(TITLE_PATHS[provider])
        assert len(posts) == 2  # the answer, then the title
        asked = posts[1].body
        assert asked["model"] == model
        assert "sourdough" in json.dumps(asked) and "title" in json.dumps(asked)
        assert "previous_response_id" not in asked  # a conversation of its own
        entry = only(person, reply.id, "title")
        assert (entry.provider, entry.model) == (provider, model)
        # The loopback model echoes, past six words: held to the limits, cut with "…", and
        # without the brackets (markup) of its "[turn 1]".
        assert entry.data["title"] == "turn 1 You said: Write a…"
        assert title_of(person) == entry.data["title"]
        person.set_title("Rye bread")
        assert title_of(person) == "Rye bread"
