"""Per-subject quotas counted across relay nodes (issue 13; design §7.4; docs/cluster.md,
"Quotas across nodes"): bytes written through node A count on node B, connections on both
nodes count against one limit, and a killed node's connections stop counting."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from crdtchat.cluster.names import Names
from tests.support.nats import NatsCluster, relay_nodes
from tests.support.relay import RawClient, RelayProcess, message_map, metric, raw_client, token

pytestmark = pytest.mark.anyio

QUOTA_BYTES = 6000
CONNECTIONS = 3
TEXT = "x" * 2000  # one message: about a third of the byte quota


@pytest.fixture
def nodes(cluster: NatsCluster, names: Names, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    options = ["--quota-bytes", str(QUOTA_BYTES), "--subject-connections", str(CONNECTIONS)]
    with relay_nodes(cluster, names.prefix, tmp_path, 2, options) as relays:
        yield relays


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll another process's /metrics (there is no event to wait on across processes)."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.05)


def write(client: RawClient, msg_id: str, text: str = TEXT) -> Callable[[object], None]:
    return lambda _doc: client.messages.append(message_map(msg_id, "user", "alice", text))


async def test_bytes_written_through_one_node_count_on_another(
    nodes: list[RelayProcess],
) -> None:
    a, b = nodes
    written = 0
    async with raw_client(a.url("quota.a", token("quota.a"), ack=True)) as on_a:
        for n in range(2):
            written += len(await on_a.push(write(on_a, f"a-{n}")))
            await on_a.wait_acked()
    assert written < QUOTA_BYTES, "node A alone lets alice write all of this"
    await until(lambda: metric(b, "crdtchat_nats_quota_bytes_heard_total") >= written)
    async with raw_client(b.url("quota.b", token("quota.b"), ack=True)) as on_b:
        await on_b.push(write(on_b, "b-0", "x" * 3000))  # alone, well within the quota
        code, reason = await on_b.wait_closed(timeout=30)
    assert code == 1013, (code, reason)
    assert f"quota: subject 'alice' wrote {QUOTA_BYTES}" in (reason or "")


async def test_connections_on_two_nodes_count_against_one_limit_until_a_node_dies(
    nodes: list[RelayProcess],
) -> None:
    a, b = nodes

    def url(relay: RelayProcess) -> str:
        return relay.url("quota.conn", token("quota.conn", "reader", "octopus"))

    async def refused(relay: RelayProcess) -> None:
        async with raw_client(url(relay), hello=False) as extra:
            code, reason = await extra.wait_closed(timeout=30)
        assert code == 1013, (code, reason)
        assert "too many connections for subject 'octopus'" in (reason or "")

    async with AsyncExitStack() as stack:
        for _ in range(CONNECTIONS - 1):
            await stack.enter_async_context(raw_client(url(a)))
        await until(lambda: metric(b, "crdtchat_nats_quota_remote_connections") >= CONNECTIONS - 1)
        last = await stack.enter_async_context(raw_client(url(b)))
        assert last.synced, "the limit's last connection, on the other node"
        await refused(b)
        await until(lambda: metric(a, "crdtchat_nats_quota_remote_connections") >= 1)
        await refused(a)

        a.kill()  # its heartbeat stops: node B forgets its connections within seconds
        await until(lambda: metric(b, "crdtchat_nats_quota_remote_connections") == 0)
        for _ in range(CONNECTIONS - 1):
            again = await stack.enter_async_context(raw_client(url(b)))
            assert again.synced
        await refused(b)
