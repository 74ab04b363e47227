"""The quota exchange between nodes (crdtchat/cluster/quotas.py) on the real NATS cluster,
in-process: every kind of spending crosses, net of refunds, a node that starts later learns
the connection counts the others hold, and spending survives NATS going away, charged once.
The relay processes' side is tests/cluster/test_relay_quotas.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

import crdtchat.cluster.quotas as quotas_module
from crdtchat.cluster.connection import ClusterConnection, connect
from crdtchat.cluster.names import Names
from crdtchat.cluster.presence import PresenceBus
from crdtchat.cluster.quotas import QuotaExchange
from crdtchat.relay.ratelimit import SubjectQuotas, Subjects
from tests.support.nats import TcpGate, nats_cluster

pytestmark = pytest.mark.anyio

QUOTAS = SubjectQuotas(connections=4, rooms=10, write_bytes=100_000, interval=3600)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until another node's batch arrived (it comes on a NATS callback, no event to await)."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exits:
        yield exits


async def start_node(
    stack: AsyncExitStack,
    connection: ClusterConnection,
    node_id: str,
    quotas: SubjectQuotas = QUOTAS,
) -> Subjects:
    subjects = Subjects(quotas, shared=True)
    presence = PresenceBus(connection, node_id)
    await presence.start()
    stack.push_async_callback(presence.close)
    exchange = QuotaExchange(connection, node_id, subjects, presence, interval=0.05)
    await exchange.start()
    stack.push_async_callback(exchange.close)
    return subjects


async def test_spending_on_one_node_is_charged_on_the_other(
    connection: ClusterConnection, second: ClusterConnection, stack: AsyncExitStack
) -> None:
    here = await start_node(stack, connection, "node-a")
    there = await start_node(stack, second, "node-b")
    alice = here.get("alice")
    alice.spend_bytes(30_000)
    alice.spend_room()
    assert alice.take_refusal()
    alice.spend_bytes(5_000)
    alice.refund_bytes(5_000)  # a withdrawn write gives its charge back: nothing to tell
    far = there.get("alice")
    await until(lambda: far.refusals.tokens <= QUOTAS.refusal_burst - 1)
    assert far.write_bytes.tokens == pytest.approx(QUOTAS.write_bytes - 30_000, abs=5)
    assert far.rooms.tokens == pytest.approx(QUOTAS.rooms - 1, abs=0.01)
    assert here.get("alice").write_bytes.tokens == pytest.approx(far.write_bytes.tokens, abs=5)


async def test_a_quiet_node_sleeps_until_it_has_something_to_tell(
    connection: ClusterConnection,
    second: ClusterConnection,
    stack: AsyncExitStack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With nothing to tell, a node does not wake every interval (only once in a long while,
    here an hour): its first spending, or a connection, wakes it, and goes out as before."""
    monkeypatch.setattr(quotas_module, "IDLE_WAKE_EVERY", 3600.0)
    here = await start_node(stack, connection, "node-a")
    there = await start_node(stack, second, "node-b")
    here.get("alice").spend_bytes(20_000)
    far = there.get("alice")
    await until(lambda: far.write_bytes.tokens <= QUOTAS.write_bytes - 19_000)
    assert not isinstance(here.connect("bob"), str)
    await until(lambda: there.connections("bob") == 1)


async def test_a_node_that_starts_later_learns_the_connection_counts(
    connection: ClusterConnection, second: ClusterConnection, stack: AsyncExitStack
) -> None:
    here = await start_node(stack, connection, "node-a")
    for _ in range(3):
        assert not isinstance(here.connect("octopus"), str)
    later = await start_node(stack, second, "node-b")  # says hello: node A tells its table
    await until(lambda: later.connections("octopus") == 3)
    assert not isinstance(later.connect("octopus"), str), "the limit's fourth"
    assert "too many connections" in str(later.connect("octopus"))
    await until(lambda: here.connections("octopus") == 4)
    assert "too many connections" in str(here.connect("octopus"))


def test_connection_counts_of_other_nodes_add_up_replace_and_are_forgotten() -> None:
    """The sums `Subjects` keeps (no I/O): changed counts replace a node's earlier ones, a
    whole table drops what it no longer lists, and a forgotten node counts no more."""
    subjects = Subjects(QUOTAS, shared=True)
    subjects.set_remote_connections("b", {"octopus": 2, "eel": 1}, full=False)
    subjects.set_remote_connections("c", {"octopus": 1}, full=False)
    assert subjects.connections("octopus") == 3 and subjects.remote_connections() == 4
    assert not isinstance(subjects.connect("octopus"), str), "the fourth, here"
    assert isinstance(subjects.connect("octopus"), str), "a fifth anywhere is over the limit"
    subjects.set_remote_connections("b", {"octopus": 1}, full=True)  # eel left node b
    assert subjects.connections("eel") == 0 and subjects.remote_connections() == 2
    subjects.forget_node("c")
    assert subjects.connections("octopus") == 2 and subjects.remote_connections() == 1
    assert subjects.take_connection_changes() == {"octopus": 1}, "this node's own, to tell"


# Nothing refills during the test, so what a node was charged is exactly what was told.
NO_REFILL = SubjectQuotas(
    connections=4, rooms=10, write_bytes=100_000, interval=1e12, refusal_rate=1e-12
)


async def test_spending_while_nats_is_away_reaches_the_other_node_once_when_it_returns(
    tmp_path: Path, stack: AsyncExitStack
) -> None:
    """The one NATS server dies; node A records spending meanwhile. The server comes back and
    node A reconnects first (node B's way back, a TCP gate, stays shut until A has told what
    it spent): core NATS keeps nothing for B, yet B is charged when it returns, because it
    says hello and A publishes its recent spending again. A's messages from before the outage
    are sent again too, and B charges none of them twice; the sum then crosses the quota on
    B, which B alone would not."""
    single = stack.enter_context(nats_cluster(tmp_path / "outage", size=1))
    gate = TcpGate(single.nodes[0].port)
    await gate.open()
    stack.push_async_callback(gate.shut)
    names = Names("outage")
    node_a = await connect(single.urls, names=names)
    stack.push_async_callback(node_a.close)
    node_b = await connect([gate.url], names=names)
    stack.push_async_callback(node_b.close)
    here = await start_node(stack, node_a, "node-a", NO_REFILL)
    there = await start_node(stack, node_b, "node-b", NO_REFILL)
    alice, far = here.get("alice"), there.get("alice")

    far.spend_bytes(50_000)  # on B itself
    alice.spend_bytes(30_000)
    await until(lambda: far.write_bytes.tokens < 20_001)
    assert far.write_bytes.can_take(1), "80,000 of 100,000 bytes spent: B takes more"

    single.kill(0)
    await gate.shut()  # B stays away until A has told what it spends during the outage
    await until(lambda: not node_a.nc.is_connected and not node_b.nc.is_connected)
    sent = node_a.metrics.quota_batches_sent
    alice.spend_bytes(30_000)
    alice.spend_room()
    assert alice.take_refusal()
    await anyio.to_thread.run_sync(single.restart, 0)
    await until(lambda: node_a.nc.is_connected and node_a.metrics.quota_batches_sent > sent)
    await node_a.nc.flush()  # the server has it: anyone subscribed got it
    await gate.open()

    await until(lambda: far.write_bytes.tokens < -9_999)
    assert far.rooms.tokens == pytest.approx(NO_REFILL.rooms - 1)
    alice.take_refusal()  # a last message from A: everything before it has been heard
    await until(lambda: far.refusals.tokens < NO_REFILL.refusal_burst - 1.5)
    assert far.write_bytes.tokens == pytest.approx(100_000 - 50_000 - 30_000 - 30_000)
    assert far.rooms.tokens == pytest.approx(NO_REFILL.rooms - 1), "charged once"
    assert node_b.metrics.quota_batches_repeated >= 1, "A's earlier messages came again"
    assert not far.write_bytes.can_take(1), "the sum is over the quota: B refuses"
    assert alice.write_bytes.tokens == pytest.approx(far.write_bytes.tokens)
