"""The quota exchange between nodes (crdtchat/cluster/quotas.py) on the real NATS cluster,
in-process: every kind of spending crosses, net of refunds, and a node that starts later
learns the connection counts the others hold. The relay processes' side is
tests/cluster/test_relay_quotas.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio
import pytest

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.presence import PresenceBus
from crdtchat.cluster.quotas import QuotaExchange
from crdtchat.relay.ratelimit import SubjectQuotas, Subjects

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
    stack: AsyncExitStack, connection: ClusterConnection, node_id: str
) -> Subjects:
    subjects = Subjects(QUOTAS, shared=True)
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
