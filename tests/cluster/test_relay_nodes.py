"""Three relay processes in cluster mode on the real three-node NATS cluster (docs/cluster.md).

Clients spread over the nodes: writes on one node reach peers on the others in one order,
a reader's write is refused on any node, a node that is SIGKILLed loses nothing acknowledged,
a late joiner after compaction gets everything, and the feed and /healthz speak for the node.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from crdtchat.cluster.names import Names
from crdtchat.worker.feed import FEED_PATH, decode_room_names
from tests.support.nats import NatsCluster, nats_cluster, relay_nodes
from tests.support.relay import RelayProcess, message_map, metric, raw_client, token

pytestmark = pytest.mark.anyio

ROOM = "chat.nodes"


@pytest.fixture
def nodes(cluster: NatsCluster, names: Names, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    with relay_nodes(cluster, names.prefix, tmp_path, 3, ["--compact-updates", "8"]) as relays:
        yield relays


def url(relay: RelayProcess, sub: str, role: str = "writer") -> str:
    return relay.url(ROOM, token(ROOM, role, sub), ack=True)


async def test_writes_on_one_node_reach_peers_on_the_others(nodes: list[RelayProcess]) -> None:
    a, b, c = nodes
    async with (
        raw_client(url(a, "alice")) as alice,
        raw_client(url(b, "bob")) as bob,
        raw_client(url(c, "viewer", "reader")) as viewer,
    ):
        await alice.push(
            lambda doc: alice.messages.append(message_map("m1", "user", "alice", "hi"))
        )
        await alice.wait_acked()
        for client in (bob, viewer):
            await client.wait_for(lambda client=client: len(client.messages) == 1)
        await bob.push(
            lambda doc: bob.messages.append(message_map("m2", "user", "bob", "yo", "m1"))
        )
        await bob.wait_acked()
        await alice.wait_for(lambda: len(alice.messages) == 2)
        await viewer.wait_for(lambda: len(viewer.messages) == 2)

        # A reader's write is refused on its node; nobody else sees it.
        await viewer.push(
            lambda doc: viewer.messages.append(message_map("x", "user", "viewer", "no"))
        )
        await viewer.wait_for(lambda: len(viewer.denied) == 1)
        assert "reader" in viewer.denied[0]

        for index in range(12):  # past --compact-updates 8: the room is rolled up
            marker = f"a{index}"
            await alice.push(
                lambda doc, marker=marker: alice.messages.append(
                    message_map(marker, "user", "alice", marker)
                )
            )
        await alice.wait_acked()
        await bob.wait_for(lambda: len(bob.messages) == 14)
        ids = [message["id"] for message in bob.messages.to_py()]
        assert [message["id"] for message in alice.messages.to_py()] == ids
    assert metric(a, "crdtchat_nats_connected") == 1
    assert metric(a, "crdtchat_nats_compactions_total") >= 1  # rolled up in the stream
    assert httpx.get(f"{c.http_url}/healthz", timeout=10).status_code == 200

    # A late joiner on the third node, after compaction: the whole room.
    async with raw_client(url(c, "carol")) as late:
        await late.wait_for(lambda: len(late.messages) == 14)
        assert [message["id"] for message in late.messages.to_py()] == ids


async def test_a_killed_node_loses_nothing_acknowledged(nodes: list[RelayProcess]) -> None:
    a, b, _ = nodes
    async with raw_client(url(a, "alice")) as alice:
        for index in range(5):
            marker = f"k{index}"
            await alice.push(
                lambda doc, marker=marker: alice.messages.append(
                    message_map(marker, "user", "alice", marker)
                )
            )
        await alice.wait_acked()
    a.kill()
    async with raw_client(url(b, "bob")) as bob:
        await bob.wait_for(lambda: len(bob.messages) == 5)
        assert [m["id"] for m in bob.messages.to_py()] == [f"k{i}" for i in range(5)]


async def test_presence_crosses_nodes_and_clears_when_a_node_dies(
    nodes: list[RelayProcess],
) -> None:
    a, b, _ = nodes
    async with raw_client(url(b, "bob")) as bob, raw_client(url(a, "alice")) as alice:
        state = {"user": "alice", "device": "laptop", "typing": False}
        clock = 0
        with anyio.fail_after(15):  # renewed as y-protocols clients do, until node B hears it
            while 77 not in bob.awareness:
                clock += 1
                await alice.set_presence(77, clock, state)
                with anyio.move_on_after(0.5):
                    await bob.wait_for(lambda: 77 in bob.awareness)
        assert json.loads(bob.awareness[77][1]) == state
        # A node that loads the room later asks the others: carol on node C sees alice at once.
        async with raw_client(url(nodes[2], "carol")) as carol:
            await carol.wait_for(lambda: 77 in carol.awareness, timeout=10)
        a.kill()  # node A dies: its heartbeat stops, and node B drops A's peers within seconds
        killed = time.monotonic()
        await bob.wait_for(lambda: bob.awareness[77][1] == "null", timeout=15)
        assert time.monotonic() - killed < 8


async def test_the_feed_on_any_node_reports_a_room_waiting_on_another(
    nodes: list[RelayProcess],
) -> None:
    a, _, c = nodes
    feed_url = f"{c.ws_base}{FEED_PATH}?token={token('*', 'worker', 'w1')}"
    async with connect(feed_url) as feed:
        async with raw_client(url(a, "alice")) as alice:
            await alice.push(
                lambda doc: alice.messages.append(message_map("q1", "user", "alice", "?"))
            )
            await alice.wait_acked()
        with anyio.fail_after(15):
            rooms: list[str] = []
            while ROOM not in rooms:
                rooms += decode_room_names(await feed.recv())


async def test_writes_wait_while_nats_is_away_and_are_stored_when_it_returns(
    tmp_path: Path,
) -> None:
    """One NATS server, stopped under a relay node: /healthz says so, a write is not
    acknowledged; NATS back, the write is acknowledged and a fresh reader has it."""
    with nats_cluster(tmp_path / "nats", size=1) as single:
        relay = RelayProcess(
            tmp_path / "node", ["--nats", single.url], env={"CRDTCHAT_NATS_PREFIX": "away"}
        ).start()
        try:
            async with raw_client(url(relay, "alice")) as alice:
                await alice.push(
                    lambda doc: alice.messages.append(message_map("m1", "user", "alice", "a"))
                )
                await alice.wait_acked()  # everything sent so far, m1 included, is stored
                stored = alice.acks[-1]
                single.kill(0)
                with anyio.fail_after(15):
                    while httpx.get(f"{relay.http_url}/healthz", timeout=5).status_code != 503:
                        await anyio.sleep(0.1)  # polling an HTTP endpoint: there is no event
                await alice.push(
                    lambda doc: alice.messages.append(message_map("m2", "user", "alice", "b"))
                )
                with anyio.move_on_after(1):
                    await alice.wait_acked()
                assert alice.acks[-1] == stored  # not acknowledged while NATS is away
                await anyio.to_thread.run_sync(single.restart, 0)
                await alice.wait_acked(timeout=30)
            assert httpx.get(f"{relay.http_url}/healthz", timeout=5).status_code == 200
            async with raw_client(url(relay, "reader", "reader")) as reader:
                await reader.wait_for(lambda: len(reader.messages) == 2)
        finally:
            relay.stop()
