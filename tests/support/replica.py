"""People as real `Replica`s in tests, and waiting on a document without sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
from pycrdt import Doc

from crdtchat.document import Conversation
from crdtchat.replica import Backoff, Replica
from crdtchat.signals import Changes
from tests.support.relay import token


@asynccontextmanager
async def person(
    relays: str | Sequence[str],
    room: str,
    sub: str = "alice",
    *,
    backoff: Backoff | None = None,
    timeout: float = 20.0,
) -> AsyncIterator[Conversation]:
    """A writer `sub` in `room`, its conversation synced through a real Replica."""
    conversation = Conversation(author=sub)
    async with Replica(
        relays, room, token(room, "writer", sub), doc=conversation.doc, backoff=backoff
    ) as replica:
        await replica.wait_until(lambda status: status.synced, timeout=timeout)
        yield conversation


def watch_all(conversation: Conversation) -> Changes:
    """A signal for every change of the messages and of the streams (a reply as it grows)."""
    changes = Changes()
    conversation.view.on_change(changes.notify)
    conversation.streams.observe_deep(changes.notify)
    return changes


async def wait_for(condition: Callable[[], bool], changes: Changes, timeout: float) -> None:
    """Wait until `condition()` holds, re-checking on each of `changes`."""
    with anyio.fail_after(timeout):
        while not condition():
            await changes.wait()


async def wait_doc(doc: Doc, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a document condition, woken by the document's own change events."""
    changes = Changes()
    subscription = doc.observe(changes.notify)
    try:
        await wait_for(condition, changes, timeout)
    finally:
        doc.unobserve(subscription)
