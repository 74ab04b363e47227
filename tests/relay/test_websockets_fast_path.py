"""The websockets internals the relay's fast path relies on (`Room._send_many`).

The relay writes one pre-built frame to every peer's transport instead of going through
websockets' `send`/`broadcast`, which frames the message again per connection. That uses
attributes websockets does not promise to keep; these tests fail with a clear message when a
new websockets release changes them, before the relay breaks in production.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.protocol import State

HINT = (
    "websockets changed an internal that crdtchat/relay/room.py Room._send_many relies on; "
    "adapt the fast path (or route it through websockets.broadcast) and the version pin in "
    "pyproject.toml"
)


def test_an_unmasked_binary_frame_serializes_to_the_rfc6455_bytes() -> None:
    wire = Frame(Opcode.BINARY, b"\x00\x02\x01\x07").serialize(mask=False)
    # FIN + binary opcode, unmasked length 4, payload.
    assert wire == b"\x82\x04\x00\x02\x01\x07", HINT


@pytest.mark.anyio
async def test_bytes_written_to_the_transport_arrive_as_a_message() -> None:
    """The server connection exposes what the fast path reads (`transport`, `protocol.state`,
    `protocol.extensions`) and a client receives bytes written to the transport as one
    message."""
    seen: dict[str, object] = {}
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        seen["state_is_open"] = ws.protocol.state is State.OPEN
        seen["plain"] = not ws.protocol.extensions
        seen["buffer"] = ws.transport.get_write_buffer_size()
        ws.transport.write(Frame(Opcode.BINARY, b"fast path").serialize(mask=False))
        await done.wait()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
            message = await asyncio.wait_for(client.recv(), 10)
            done.set()
    assert seen == {"state_is_open": True, "plain": True, "buffer": 0}, HINT
    assert message == b"fast path", HINT
