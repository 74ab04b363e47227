"""Each kind of bad input closes only the connection that sent it; the room carries on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pycrdt import Doc

from crdtchat import schema
from crdtchat.wire import AwarenessMessage, SyncStep1, SyncUpdate, encode_frame, encode_message
from tests.support.relay import (
    RelayProcess,
    declare_roots,
    freezing_message_update,
    message_map,
    raw_client,
    running_relay,
    token,
)

pytestmark = pytest.mark.anyio

MAX_FRAME = 4096
RATE, BURST = 100, 200


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    args = ["--max-frame", str(MAX_FRAME), "--rate", str(RATE), "--burst", str(BURST)]
    with running_relay(Path(tmp_path_factory.mktemp("bad")) / "data", args) as process:
        yield process


def url(relay: RelayProcess, room: str, sub: str) -> str:
    return relay.url(room, token(room, "writer", sub))


def _refused_update() -> bytes:
    doc: Doc = Doc()
    declare_roots(doc)[schema.DERIVED]["planted"] = {"kind": "provider_state"}
    return doc.get_update()


REFUSED = [encode_message(SyncUpdate(_refused_update()))] * 40
FLOOD = [encode_message(SyncUpdate(b"\x00\x00"))] * (BURST * 5)

CASES: dict[str, tuple[list[bytes | str], int, str]] = {
    "unknown message type": ([b"\x07"], 1008, "malformed frame: unknown message type 7"),
    "overlong varint": ([b"\x00\x02" + b"\xff" * 11], 1008, "longer than 10 bytes"),
    "length beyond frame": ([b"\x00\x02\x64abc"], 1008, "claims 100 bytes but only 3 remain"),
    "truncated message": ([b"\x00"], 1008, "truncated sync message type"),
    "undecodable update": (
        [encode_message(SyncUpdate(b"\xff\xff\xff\xff"))],
        1008,
        "update could not be decoded",
    ),
    "update that would freeze readers": (
        [encode_message(SyncUpdate(freezing_message_update("m1", "mallory")))],
        1008,
        "puts string content inside an Array",
    ),
    "bad state vector": (
        [encode_message(SyncStep1(b"\x05\x01"))],
        1008,
        "state vector could not be decoded",
    ),
    "bad awareness": (
        [encode_message(AwarenessMessage(b"\x01\x01\x01\x03{x}"))],
        1008,
        "malformed awareness update",
    ),
    "oversized frame": ([encode_message(SyncUpdate(b"\x00" * (MAX_FRAME + 10)))], 1009, ""),
    "text frame": (["hello"], 1003, "text frames are not part of the protocol"),
    "flood": (FLOOD, 1008, "rate limit exceeded"),
    "refused writes without end": (REFUSED, 1008, "too many refused writes"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_closes_only_its_connection(relay: RelayProcess, case: str) -> None:
    frames, code, reason = CASES[case]
    room = "bad-" + case.replace(" ", "-")
    async with (
        raw_client(url(relay, room, "alice")) as alice,
        raw_client(url(relay, room, "bob")) as bob,
        raw_client(url(relay, room, "mallory")) as mallory,
    ):
        await alice.push(lambda doc: alice.messages.append(message_map("a1", "user", "alice", "x")))
        await mallory.wait_for(lambda: len(mallory.messages) == 1)
        for frame in frames:
            if mallory.closed:
                break
            await mallory.send_raw(frame)
        got_code, got_reason = await mallory.wait_closed()
        assert got_code == code
        assert reason in (got_reason or "")
        # Everyone else carries on in the same room.
        await alice.push(lambda doc: alice.messages.append(message_map("a2", "user", "alice", "y")))
        await bob.wait_for(lambda: len(bob.messages) == 2)
        await bob.push(lambda doc: bob.messages.append(message_map("b1", "user", "bob", "z")))
        await alice.wait_for(lambda: len(alice.messages) == 3)
        assert not alice.closed and not bob.closed
    if reason:
        assert reason in relay.log()


async def test_rejections_are_counted(relay: RelayProcess) -> None:
    text = httpx.get(f"{relay.http_url}/metrics", timeout=10).text
    assert 'crdtchat_closed_connections_total{kind="malformed"}' in text


async def test_a_multi_message_frame_with_one_bad_message_closes(relay: RelayProcess) -> None:
    room = "bad-mixed"
    async with (
        raw_client(url(relay, room, "alice")) as alice,
        raw_client(url(relay, room, "mallory")) as mallory,
    ):
        frame = encode_frame([SyncUpdate(b"\x00\x00")]) + b"\x00\x02\x09ab"
        await mallory.send_raw(frame)
        code, reason = await mallory.wait_closed()
        assert code == 1008 and "claims 9 bytes" in (reason or "")
        await alice.push(lambda doc: alice.messages.append(message_map("a1", "user", "alice", "x")))
        async with raw_client(url(relay, room, "bob")) as bob:
            await bob.wait_for(lambda: len(bob.messages) == 1)
        assert not alice.closed
