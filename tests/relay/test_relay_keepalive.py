"""The relay's keepalive (crdtchat/relay/keepalive.py): one loop pings every connection; a peer that
stops answering is closed with 1011, a peer that answers stays."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import anyio
import pytest

from tests.support.relay import raw_client, running_relay, token

pytestmark = pytest.mark.anyio


async def silent_connection(host: str, port: int, room: str) -> anyio.abc.ByteStream:
    """A websocket handshake by hand, after which nothing is ever answered (no pong)."""
    stream = await anyio.connect_tcp(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /{room}?token={token(room)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive()
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


def close_code(data: bytes) -> int | None:
    """The code of the first close frame (opcode 8) in unmasked server frames, if any."""
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[at : at + 2])
            at += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[at : at + 8])
            at += 8
        if opcode == 8 and length >= 2:
            return int(struct.unpack("!H", data[at : at + 2])[0])
        at += length
    return None


async def test_a_peer_that_stops_answering_pings_is_closed_and_others_stay(
    tmp_path: Path,
) -> None:
    with running_relay(tmp_path / "data", ["--ping-interval", "0.3"]) as relay:
        async with raw_client(relay.url("room-1", token("room-1"))) as alive:
            stream = await silent_connection(relay.host, relay.port, "room-1")
            received = b""
            with anyio.fail_after(30):  # closed after one unanswered interval (0.3-0.6 s)
                while close_code(received) is None:  # the TCP close follows after a timeout
                    received += await stream.receive()
            await stream.aclose()
            assert close_code(received) == 1011
            assert b"keepalive ping timeout" in received
            # The client that answers (websockets answers pings itself) was pinged as often.
            assert not alive.closed
            await alive.hello()  # and still syncs
