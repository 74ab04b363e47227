"""Serving one conversation: start a turn for every message waiting for a reply.

Runs until nothing has been waiting for `idle_after` seconds, so a worker holds a room open
only while it has work there. A lease held by a live peer is left alone, and looked at again
when it expires: that is how a killed worker's turn is taken over.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from crdtchat.document import Conversation, Waiting
from crdtchat.providers.base import Provider
from crdtchat.worker.turn import Changes, TurnSettings, serve_turn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoomSettings:
    idle_after: float = 30.0
    turn: TurnSettings = field(default_factory=TurnSettings)


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
    provider: Provider,
    *,
    model: str,
    room: str,
    settings: RoomSettings = RoomSettings(),
    on_claimed: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Answer what is waiting in `conversation` until it is idle; returns turns committed."""
    changes = Changes()
    subscriptions = watch(conversation, changes)
    committed = 0
    active: set[str] = set()
    try:
        async with anyio.create_task_group() as turns:

            async def run(waiting: Waiting) -> None:
                nonlocal committed
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
