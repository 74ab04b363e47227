"""Shared helpers for the provider tests: threads of `Message`s, requests, and a minimal
stand-in for what the worker does with a provider's events (join text, honour StreamReset,
turn `Finished.derived` into entries) — no CRDT involved, as providers never see one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from crdtchat.loopback.anthropic_server import AnthropicLoopback
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.base import (
    DiscardDerived,
    Finished,
    Provider,
    StreamReset,
    TextDelta,
    ToolCallDone,
    TurnEvent,
    TurnRequest,
)
from crdtchat.providers.retry import RetryPolicy
from crdtchat.schema import DerivedEntry, Message, ModelRef, ToolCall, ToolSpec


@dataclass
class SleepRecorder:
    """An injectable sleep that records the delays instead of waiting."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def policy(
    max_attempts: int = 4, *, random_value: float = 0.5
) -> tuple[RetryPolicy, SleepRecorder]:
    recorder = SleepRecorder()
    return (
        RetryPolicy(max_attempts=max_attempts, sleep=recorder, random=lambda: random_value),
        recorder,
    )


@contextmanager
def openai_server(**kwargs: Any) -> Iterator[OpenAILoopback]:
    with OpenAILoopback(api_key="sk-loop", **kwargs) as server:
        yield server


@contextmanager
def anthropic_server(**kwargs: Any) -> Iterator[AnthropicLoopback]:
    with AnthropicLoopback(api_key="ak-loop", **kwargs) as server:
        yield server


class Thread:
    """Builds a linear thread of messages with parents and unique ids."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def _add(self, role: str, content: str = "", **extra: Any) -> Message:
        parent = self.messages[-1].id if self.messages else None
        message = Message(
            id=f"m{len(self.messages) + 1}",
            role=role,
            author="alice" if role in ("user", "tool", "system") else "worker",
            parent=parent,
            content=content,
            **extra,
        )
        self.messages.append(message)
        return message

    def user(self, text: str) -> Message:
        return self._add("user", text)

    def system(self, text: str) -> Message:
        return self._add("system", text)

    def tool(self, call_id: str, output: str) -> Message:
        return self._add("tool", output, tool_call_id=call_id)

    def assistant(
        self, text: str = "", calls: Sequence[ToolCall] = (), model: ModelRef | None = None
    ) -> Message:
        return self._add(
            "assistant", text, tool_calls=tuple(calls) or None, model=model, status="complete"
        )


def request(
    thread: Thread | Sequence[Message],
    *,
    model: str = "",
    system: str = "",
    tools: Mapping[str, ToolSpec] | None = None,
    derived: Mapping[str, DerivedEntry] | None = None,
    params: Mapping[str, Any] | None = None,
    conversation_id: str = "conv-1",
) -> TurnRequest:
    messages = list(thread.messages if isinstance(thread, Thread) else thread)
    hashes = [hashlib.sha256(m.id.encode()).hexdigest() for m in messages]
    return TurnRequest(
        conversation_id=conversation_id,
        model=model,
        system=system,
        tools=dict(tools or {}),
        thread=messages,
        prefix_hashes=hashes,
        derived=dict(derived or {}),
        params=dict(params or {}),
    )


@dataclass
class Turn:
    """What the worker would make of one `stream_turn` call."""

    events: list[TurnEvent]

    @property
    def finished(self) -> Finished:
        last = self.events[-1]
        assert isinstance(last, Finished), self.events
        return last

    @property
    def text(self) -> str:
        out: list[str] = []
        for event in self.events:
            if isinstance(event, StreamReset):
                out.clear()
            elif isinstance(event, TextDelta):
                out.append(event.text)
        return "".join(out)

    @property
    def calls(self) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for event in self.events:
            if isinstance(event, StreamReset):
                calls.clear()
            elif isinstance(event, ToolCallDone):
                calls.append(event.call)
        return calls

    @property
    def resets(self) -> list[StreamReset]:
        return [e for e in self.events if isinstance(e, StreamReset)]

    @property
    def discarded(self) -> list[DiscardDerived]:
        return [e for e in self.events if isinstance(e, DiscardDerived)]

    def entries(self, provider: Provider, model: str, message_id: str) -> dict[str, DerivedEntry]:
        """The derived entries the worker would record for the assistant turn `message_id`."""
        out: dict[str, DerivedEntry] = {}
        for n, new in enumerate(self.finished.derived):
            key = f"{message_id}:{new.kind}:{n}"
            out[key] = DerivedEntry(
                kind=new.kind,
                message_id=message_id,
                prefix_hash=hashlib.sha256(message_id.encode()).hexdigest(),
                provider=provider.name,
                api=provider.api,
                model=model,
                data=dict(new.data),
                expires_at=new.expires_at,
            )
        return out


async def run_turn(provider: Provider, req: TurnRequest) -> Turn:
    events: list[TurnEvent] = []
    async with aclosing(provider.stream_turn(req)) as stream:
        async for event in stream:
            events.append(event)
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and events[-1] is finished[0], events
    return Turn(events)
