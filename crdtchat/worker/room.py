"""Serving one conversation: start a turn for every message waiting for a reply.

Runs until nothing has been waiting for `idle_after` seconds, so a worker holds a room open
only while it has work there. A lease held by a live peer is left alone, and looked at again
when it expires: that is how a killed worker's turn is taken over.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from crdtchat.document import Conversation, Waiting
from crdtchat.providers.base import Provider, ProviderError, TurnEvent, TurnRequest
from crdtchat.providers.registry import make_provider
from crdtchat.worker.turn import Changes, TurnSettings, serve_turn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoomSettings:
    idle_after: float = 30.0
    turn: TurnSettings = field(default_factory=TurnSettings)


class UnavailableProvider:
    """Stands in for a provider that could not be built, so the turn records why."""

    api = "unavailable"

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        raise ProviderError(self.reason)
        yield  # pragma: no cover - makes this an async generator


class ProviderPool:
    """The provider and model for a turn: the conversation's settings, else the worker's.

    Built lazily and kept, so switching a conversation to another provider mid-way just
    works, and a provider that cannot be built becomes an error turn rather than a crash.
    """

    def __init__(
        self,
        default: str,
        default_model: str | None = None,
        make: Callable[..., Provider] = make_provider,
    ) -> None:
        self.default = default
        self.default_model = default_model
        self._make = make
        self._built: dict[str, Provider] = {}

    def check_default(self) -> None:
        """Build the worker's own provider now: a typo should fail at start, not per turn."""
        self._built[self.default] = self._make(self.default, model=self.default_model)

    def choose(self, conversation: Conversation) -> tuple[Provider, str]:
        settings = conversation.settings
        name = settings.provider or self.default
        provider = self._built.get(name)
        if provider is None:
            model = self.default_model if name == self.default else None
            try:
                provider = self._make(name, model=model)
            except ProviderError as error:
                return UnavailableProvider(name, str(error)), settings.model or "unknown"
            self._built[name] = provider
        model = settings.model or getattr(provider, "model", None) or "default"
        return provider, model


def watch(conversation: Conversation, changes: Changes) -> list[object]:
    """Subscribe `changes` to what a worker reacts to; returns the subscriptions."""
    conversation.view.on_change(changes.notify)
    return [
        (root, root.observe(changes.notify))
        for root in (conversation.leases, conversation.cancels, conversation.regenerations)
    ]


def unwatch(subscriptions: list[object]) -> None:
    for root, subscription in subscriptions:  # type: ignore[misc]
        root.unobserve(subscription)


async def serve_room(
    conversation: Conversation,
    providers: ProviderPool,
    *,
    room: str,
    settings: RoomSettings = RoomSettings(),
    on_claimed: Callable[[], Awaitable[None]] | None = None,
    on_foreign_leases: Callable[[float], None] | None = None,
) -> int:
    """Answer what is waiting in `conversation` until it is idle; returns turns committed.

    With `on_foreign_leases`, a room where everything waiting is being answered by another
    live worker is left at once, and the callback gets the seconds until the first of those
    leases expires (when the caller should look again, to take over from a dead worker).
    Without it the room stays open and watched until then, receiving every streamed token.
    """
    changes = Changes()
    subscriptions = watch(conversation, changes)
    committed = 0
    active: set[str] = set()
    try:
        async with anyio.create_task_group() as turns:

            async def run(waiting: Waiting) -> None:
                nonlocal committed
                provider, model = providers.choose(conversation)
                try:
                    message = await serve_turn(
                        conversation,
                        waiting,
                        provider,
                        model=model,
                        changes=changes,
                        conversation_id=room,
                        settings=settings.turn,
                        on_claimed=on_claimed,
                    )
                    if message is not None:
                        committed += 1
                        log.info("room %s: committed %s (%s)", room, message.id, message.status)
                finally:
                    active.discard(waiting.turn_id)
                    changes.notify()

            idle_since = anyio.current_time()
            while True:
                now = conversation.clock()
                next_expiry: float | None = None
                for waiting in conversation.waiting_for_reply():
                    if waiting.turn_id in active:
                        continue
                    lease = conversation.lease(waiting.message.id)
                    if lease and lease.holder != conversation.author and lease.expires_at > now:
                        wait = lease.expires_at - now
                        next_expiry = wait if next_expiry is None else min(next_expiry, wait)
                        continue
                    active.add(waiting.turn_id)
                    turns.start_soon(run, waiting)
                if not active and next_expiry is not None and on_foreign_leases is not None:
                    on_foreign_leases(next_expiry)
                    break
                if active or next_expiry is not None:
                    idle_since = anyio.current_time()
                timeout = settings.idle_after - (anyio.current_time() - idle_since)
                if next_expiry is not None:
                    timeout = min(timeout, next_expiry + 0.05)
                if timeout <= 0:
                    break
                with anyio.move_on_after(timeout):
                    await changes.wait()
    finally:
        unwatch(subscriptions)
    return committed
