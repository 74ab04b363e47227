"""The room feed: tells workers which rooms have something waiting for them.

Protocol in `crdtchat.worker.feed`. Each room keeps a `WaitingWatch` over its live document;
after an accepted update that touched the messages or the regeneration requests it recomputes
"is anything waiting for a reply" (the incremental message view makes that cheap), persists
the flag when it flips, and tells every feed subscriber when the answer is yes. A subscriber
first gets every flagged room from the store, so a worker that (re)connects misses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pycrdt import Subscription
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed

from crdtchat.document import Conversation
from crdtchat.relay.store import Store
from crdtchat.worker.feed import encode_room_waiting

log = logging.getLogger("crdtchat.relay.feed")


class WaitingFeed:
    """Feed subscribers, and the stored set of rooms with something waiting."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.subscribers: set[ServerConnection] = set()

    def room_waiting(self, room: str, waiting: bool, was_waiting: bool | None) -> None:
        if waiting != was_waiting:
            self.store.set_waiting(room, waiting)
        if waiting and self.subscribers:
            broadcast(self.subscribers, encode_room_waiting(room))

    async def serve(self, ws: ServerConnection) -> None:
        """Send every waiting room, then live notices until the subscriber leaves."""
        self.subscribers.add(ws)  # before the listing: a notice in between is only a repeat
        try:
            for room in await self.store.waiting_rooms():
                await ws.send(encode_room_waiting(room))
            async for _ in ws:  # subscribers have nothing to say; drain until closed
                pass
        except ConnectionClosed:
            pass
        finally:
            self.subscribers.discard(ws)


class WaitingWatch:
    """Whether one room has a message waiting for a reply, kept current cheaply."""

    def __init__(self, room: str, feed: WaitingFeed) -> None:
        self.room = room
        self.feed = feed
        self.waiting: bool | None = None  # unknown until first computed
        self._conversation: Conversation | None = None
        self._subscription: Subscription | None = None
        self._dirty = True

    def _mark(self, *_: object) -> None:
        self._dirty = True

    def _conversation_of(self, doc: object, shape_checked: Callable[[], bool]) -> Conversation:
        conversation = self._conversation
        if conversation is None or conversation.doc is not doc:
            # A refused update rebuilds the live document: follow it to the new one.
            self.close()
            conversation = Conversation(
                doc,  # type: ignore[arg-type]
                author="relay",
                shape_checked=shape_checked(),
            )
            conversation.view.on_change(self._mark)
            self._subscription = conversation.regenerations.observe(self._mark)
            self._conversation = conversation
            self._dirty = True
        return conversation

    def stored_elsewhere(self) -> None:
        """Another cluster node stored an update of this room and records whether the room
        waits (the feed's KV bucket tells every node). This node does not look (in a room it
        only relays it never builds the view, ~78 of the ~176 µs it spent on a stored 1.3 KB
        chat message, benchmarks/stored_updates.py); it forgets what it recorded last, so
        that the next update it judges records afresh rather than skip a change the other
        node recorded in between."""
        self.waiting = None

    def close(self) -> None:
        """Drop the observers on the room document (the room is unloading, or was rebuilt)."""
        if self._conversation is not None:
            self._conversation.close()  # its view's and the regenerations observer
            self._conversation = None
            self._subscription = None

    def check(self, doc: object, *, shape_checked: Callable[[], bool] = lambda: False) -> None:
        """Call after every accepted update of the room's live document. `shape_checked()`:
        whether the room's structure index holds no type nested deeper than the limit (design
        §7.1); asked only when the view is built, since bringing the index up to date is work
        a cluster node otherwise leaves until it judges a write (`LiveDoc.apply_stored`)."""
        conversation = self._conversation_of(doc, shape_checked)
        if not self._dirty:
            return
        self._dirty = False
        waiting = bool(conversation.waiting_for_reply())
        self.feed.room_waiting(self.room, waiting, self.waiting)
        self.waiting = waiting
