"""How a worker learns which rooms need it, without holding every room open.

The relay keeps, per room, whether something there waits for a worker (a message waiting
for a reply, or a regeneration request). A worker token for every room (`*`) may connect to
`ws://HOST:PORT/feed/waiting?token=...`; the relay then sends one `RoomWaiting` extension
message (type 101, payload: the room name as a varString) for every such room at once, and
again whenever an accepted update leaves a room with something waiting. The worker opens a
replica of that room, serves it, and closes it when it is idle.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from urllib.parse import quote

import anyio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from crdtchat.errors import TokenError
from crdtchat.relays import relay_urls
from crdtchat.replica import Backoff
from crdtchat.wire import (
    Extension,
    Reader,
    WireError,
    decode_frame,
    encode_frame,
    write_var_string,
)

log = logging.getLogger(__name__)

FEED_PATH = "/feed/waiting"
ROOM_WAITING = 101


class FeedRefused(TokenError):
    """The relay will not give us the feed with this token (do not retry)."""


def room_waiting(room: str) -> Extension:
    return Extension(type=ROOM_WAITING, payload=write_var_string(room))


def encode_room_waiting(room: str) -> bytes:
    return encode_frame([room_waiting(room)])


def decode_room_names(frame: bytes) -> list[str]:
    """The rooms named by a feed frame; other messages are skipped, as extensions may be."""
    rooms = []
    for message in decode_frame(frame):
        if isinstance(message, Extension) and message.type == ROOM_WAITING:
            reader = Reader(message.payload)
            rooms.append(reader.var_string("room name"))
    return rooms


async def waiting_rooms(
    relays: str | Sequence[str],
    token: str,
    *,
    backoff: Backoff | None = None,
    rng: random.Random | None = None,
    on_connected: Callable[[str], None] | None = None,
) -> AsyncIterator[str]:
    """Room names from the relay's feed, reconnecting forever with `backoff` (a `Replica`'s
    reconnection delays by default).

    With several relays (`crdtchat.relays`), a connection that fails or drops moves the feed
    to the next one, round robin, as a `Replica` moves. After a reconnect the relay resends
    every waiting room, so nothing is missed while the connection was down. `on_connected` is
    called with the relay's base URL each time the feed connects.
    """
    backoff = backoff or Backoff()
    rng = rng or random.Random()
    urls = relay_urls(relays)
    index = 0
    attempt = 0
    while True:
        relay_url = urls[index]
        url = f"{relay_url}{FEED_PATH}?token={quote(token, safe='')}"
        try:
            async with connect(url, max_size=1 << 20) as ws:
                attempt = 0
                log.info("connected to the room feed at %s", relay_url)
                if on_connected is not None:
                    on_connected(relay_url)
                async for frame in ws:
                    if isinstance(frame, str):
                        continue
                    try:
                        for room in decode_room_names(frame):
                            yield room
                    except WireError as error:
                        log.warning("ignoring a malformed feed frame: %s", error)
        except InvalidStatus as refused:
            status = refused.response.status_code
            if status in (401, 403):
                raise FeedRefused(
                    f"relay refused the room feed ({status}): "
                    f"{refused.response.body.decode(errors='replace').strip()}"
                ) from refused
            log.warning("room feed at %s: HTTP %s", relay_url, status)
        except (OSError, WebSocketException) as error:
            log.info("room feed at %s unavailable: %s", relay_url, error)
        index = (index + 1) % len(urls)
        delay = backoff.delay(attempt, rng)
        attempt += 1
        await anyio.sleep(delay)
