"""One keepalive for every connection of the relay.

websockets' own (`ping_interval`) runs a task per connection that sleeps between pings: about
1.7 KiB of each idle connection (docs/performance.md, "Connections and rooms"), and a relay's
connections are mostly idle. This loop pings every open connection once per interval and
closes (1011) one whose previous ping got no pong within the interval, as websockets does with
ping_timeout equal to ping_interval. A connection whose send buffer is over websockets' high
water mark is not pinged (the ping would wait for it to drain, and so would every other
connection's); if it is still not drained at the next round, it is closed the same way.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

log = logging.getLogger("crdtchat.relay.keepalive")

HIGH_WATER = 32 * 1024  # websockets' default write_limit: above it, sending waits for a drain
TIMEOUT_REASON = "keepalive ping timeout"


async def keep_alive(server: Server, interval: float, stop: anyio.Event) -> None:
    """Until `stop`: every `interval` seconds, ping each open connection of `server`."""
    waiting: dict[ServerConnection, asyncio.Future[float]] = {}
    closing: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with anyio.move_on_after(interval):
            await stop.wait()
        if stop.is_set():
            break
        previous, waiting = waiting, {}
        for ws in list(server.connections):
            if ws.protocol.state is not State.OPEN:
                continue
            pong = previous.get(ws)
            if pong is not None and not pong.done():
                log.info("closing %s: %s", ws.remote_address, TIMEOUT_REASON)
                task = loop.create_task(ws.close(1011, TIMEOUT_REASON))
                closing.add(task)
                task.add_done_callback(closing.discard)
                continue
            transport = ws.transport
            if transport is not None and transport.get_write_buffer_size() > HIGH_WATER:
                waiting[ws] = loop.create_future()  # counts as unanswered until next round
                continue
            try:
                waiting[ws] = await ws.ping()  # type: ignore[assignment]
            except ConnectionClosed:
                continue
    for pong in waiting.values():
        pong.cancel()  # nobody reads them now (a closed connection's would log an error)
