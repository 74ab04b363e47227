"""Answering one message: lease, stream, commit (design §5).

The turn owns three helper tasks for its lifetime: a flusher that moves buffered text into
`transport.streams` every `flush_interval` (peers see text arrive without one update per
token), a lease renewer, and a cancel watcher. All of them stop when the turn ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio

from crdtchat.document import Conversation, Waiting
from crdtchat.providers.base import (
    DiscardDerived,
    Finished,
    Provider,
    ProviderError,
    StreamReset,
    TextDelta,
    ToolCallDone,
    TurnRequest,
    Usage,
)
from crdtchat.schema import Message, ModelRef, ToolCall
from crdtchat.signals import Changes
from crdtchat.worker.checkpoints import drop_superseded_checkpoints
from crdtchat.worker.titles import write_title

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnSettings:
    lease_ttl: float = 30.0
    flush_interval: float = 0.1
    # After the first reply (crdtchat.worker.titles): "ask" the provider for a title (the
    # local model gets the first words anyway), "first-words" for every provider, or "off".
    titles: Literal["ask", "first-words", "off"] = "ask"


@dataclass
class _Progress:
    text: list[str] = field(default_factory=list)
    unflushed: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: Finished | None = None

    def add(self, text: str) -> None:
        self.text.append(text)
        self.unflushed.append(text)

    def reset(self) -> None:
        self.text.clear()
        self.unflushed.clear()
        self.tool_calls.clear()


def build_request(
    conversation: Conversation,
    waiting: Waiting,
    provider: Provider,
    model: str,
    conversation_id: str,
) -> TurnRequest:
    """The thread up to the answered message, with the derived state still usable for it."""
    thread = conversation.thread(waiting.message.id)
    usable, stale = conversation.usable_derived(
        thread, provider=provider.name, api=provider.api, model=model
    )
    for key in stale:
        conversation.discard_derived(key)
    # A regeneration: the earlier answers' KV checkpoints hold this whole prompt (and then
    # their reply). Only the last checkpoint of a branch is kept, so without these the new
    # answer would evaluate its thread from scratch. Hosted providers ignore entries off the
    # thread; the local one checks the tokens before it resumes from one.
    for answer in conversation.assistant_answers(waiting.message.id):
        extra, _ = conversation.usable_derived(
            [*thread, answer],
            provider=provider.name,
            api=provider.api,
            model=model,
            kinds=["kv_checkpoint"],
        )
        usable.update((k, e) for k, e in extra.items() if e.message_id == answer.id)
    settings = conversation.settings
    return TurnRequest(
        conversation_id=conversation_id,
        model=model,
        system=settings.system,
        tools=conversation.tools,
        thread=thread,
        prefix_hashes=conversation.prefix_hashes(thread),
        derived=usable,
        params=settings.params,
    )


async def serve_turn(
    conversation: Conversation,
    waiting: Waiting,
    provider: Provider,
    *,
    model: str,
    changes: Changes,
    conversation_id: str = "",
    settings: TurnSettings = TurnSettings(),
    on_claimed: Callable[[], Awaitable[None]] | None = None,
) -> Message | None:
    """Answer `waiting` once; returns the committed message, or None if someone else has it."""
    turn_id = waiting.turn_id
    holder = conversation.author
    answered = waiting.message.id
    if conversation.view.get(turn_id) is not None:
        return None
    if not conversation.claim_lease(answered, turn_id, holder=holder, ttl=settings.lease_ttl):
        return None
    if on_claimed is not None:
        await on_claimed()  # e.g. wait until the relay stored the lease, then re-check
        lease = conversation.lease(answered)
        if lease is None or lease.holder != holder:
            return None

    model_ref = ModelRef(provider=provider.name, api=provider.api, model=model)
    conversation.start_stream(turn_id, parent=answered)
    progress = _Progress()
    cancelled = False
    lost = False  # the lease went to another worker: the reply is theirs to finish
    work = anyio.CancelScope()

    def flush() -> None:
        if progress.unflushed:
            conversation.append_stream(turn_id, "".join(progress.unflushed))
            progress.unflushed.clear()

    async with anyio.create_task_group() as helpers:

        async def flusher() -> None:
            while True:
                await anyio.sleep(settings.flush_interval)
                flush()

        async def renewer() -> None:
            nonlocal lost
            while True:
                await anyio.sleep(settings.lease_ttl / 3)
                if not conversation.renew_lease(answered, holder=holder, ttl=settings.lease_ttl):
                    # Two workers can both pass the claim before their claims cross (the
                    # relay stored the other's after ours), or ours expired while stalled and
                    # was taken over: the lease now names the other, who streams and commits.
                    # Stop rather than stream into its reply and leave a second turn running.
                    lost = True
                    work.cancel()
                    return

        async def generate(scope: anyio.CancelScope) -> None:
            request = build_request(conversation, waiting, provider, model, conversation_id)
            try:
                async for event in provider.stream_turn(request):
                    if isinstance(event, TextDelta):
                        progress.add(event.text)
                    elif isinstance(event, ToolCallDone):
                        progress.tool_calls.append(event.call)
                    elif isinstance(event, StreamReset):
                        progress.reset()
                        conversation.reset_stream(turn_id)
                    elif isinstance(event, DiscardDerived):
                        conversation.discard_derived(event.key)
                    elif isinstance(event, Finished):
                        progress.finished = event
            except ProviderError as error:
                progress.finished = Finished(status="error", error=str(error))
            scope.cancel()

        async def watch_cancel(scope: anyio.CancelScope) -> None:
            nonlocal cancelled
            while not conversation.cancel_requested(turn_id):
                await changes.wait()
            cancelled = True
            scope.cancel()

        helpers.start_soon(flusher)
        helpers.start_soon(renewer)
        with work:
            async with anyio.create_task_group() as turn:
                turn.start_soon(generate, work)
                turn.start_soon(watch_cancel, work)
        helpers.cancel_scope.cancel()

    if lost:
        log.info("turn %s: the lease is another worker's now; leaving the reply to it", turn_id)
        return None
    finished = progress.finished
    if cancelled:
        finished = Finished(status="cancelled", usage=finished.usage if finished else Usage())
    elif finished is None:
        finished = Finished(status="incomplete", error="the provider ended without finishing")
    if conversation.view.get(turn_id) is not None:  # another worker committed first
        conversation.streams.pop(turn_id, None)
        conversation.release_lease(answered, holder=holder)
        return None
    usage = finished.usage
    derived = [(d.kind, d.data, d.expires_at) for d in finished.derived]
    derived.append(("usage", _usage_data(usage), None))
    message = conversation.commit_turn(
        answered,
        turn_id,
        model=model_ref,
        status=finished.status,
        content="".join(progress.text),
        tool_calls=progress.tool_calls or None,
        error=finished.error,
        derived=derived,
    )
    if finished.status == "complete" and settings.titles != "off":  # the first reply names it
        ask = settings.titles == "ask"
        await write_title(conversation, message, provider, model, conversation_id, ask=ask)
    if any(d.kind == "kv_checkpoint" for d in finished.derived):
        # The new checkpoint supersedes the one this turn resumed from (if no other branch
        # still needs it): about 23 MB each, they must not pile up one per turn.
        await drop_superseded_checkpoints(
            conversation, provider, name=provider.name, api=provider.api, model=model
        )
    return message


def _usage_data(usage: Usage) -> dict[str, object]:
    data: dict[str, object] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
    }
    saved = usage.raw.get("kv_checkpoint_bytes")
    if isinstance(saved, int):
        data["kv_checkpoint_bytes"] = saved  # what this turn added to the local cache
    return data
