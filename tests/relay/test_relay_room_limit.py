"""The limit on loaded rooms (design §7.6): idle rooms make way, busy ones refuse with 1013."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.support.relay import RelayProcess, message_map, metric, raw_client, running_relay, token

pytestmark = pytest.mark.anyio


async def until_no_connections(relay: RelayProcess) -> None:
    """The relay releases a room shortly after the close handshake: wait until it has."""
    with anyio.fail_after(30):
        while metric(relay, "crdtchat_connections") > 0:
            await anyio.sleep(0.02)  # no event to wait for: /metrics is polled


def url(relay: RelayProcess, room: str) -> str:
    return relay.url(room, token(room), ack=True)


async def write_and_leave(relay: RelayProcess, room: str, text: str) -> None:
    async with raw_client(url(relay, room)) as client:
        await client.push(
            lambda doc: client.messages.append(message_map(text, "user", "alice", text))
        )
        await client.wait_acked()
    await until_no_connections(relay)


async def test_the_least_recently_used_idle_room_makes_way_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    # A long idle unload: only the limit unloads rooms here.
    with running_relay(tmp_path / "data", ["--max-rooms", "2", "--idle-unload", "600"]) as relay:
        await write_and_leave(relay, "room-a", "in-a")
        await write_and_leave(relay, "room-b", "in-b")
        assert metric(relay, "crdtchat_rooms") == 2
        await write_and_leave(relay, "room-c", "in-c")  # room-a, used least recently, goes
        assert metric(relay, "crdtchat_room_evictions_total") == 1
        assert metric(relay, "crdtchat_rooms") == 2
        loads = metric(relay, "crdtchat_room_loads_total")
        async with raw_client(url(relay, "room-a")) as client:  # reloaded from the store
            assert client.texts() == ["in-a"]
        await until_no_connections(relay)
        assert metric(relay, "crdtchat_room_loads_total") == loads + 1
        assert metric(relay, "crdtchat_room_evictions_total") == 2  # room-b made way
        async with raw_client(url(relay, "room-b")) as client:
            assert client.texts() == ["in-b"]


async def test_a_join_beyond_the_limit_with_every_room_in_use_is_refused_with_1013(
    tmp_path: Path,
) -> None:
    with running_relay(tmp_path / "data", ["--max-rooms", "2", "--idle-unload", "600"]) as relay:
        async with raw_client(url(relay, "room-a")), raw_client(url(relay, "room-b")) as b:
            async with raw_client(url(relay, "room-c"), hello=False) as refused:
                code, reason = await refused.wait_closed()
            assert code == 1013
            assert reason is not None and "limit" in reason
            assert metric(relay, "crdtchat_room_limit_refusals_total") == 1
            assert not b.closed  # the rooms in use are untouched
            assert metric(relay, "crdtchat_rooms") == 2
        # Once a room is idle again, the same join goes through.
        await until_no_connections(relay)
        async with raw_client(url(relay, "room-c")) as client:
            assert client.synced
        assert metric(relay, "crdtchat_room_evictions_total") == 1
