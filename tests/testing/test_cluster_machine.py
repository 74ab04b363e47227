"""The relay as a cluster of nodes in the convergence machine (issue 13): every replica attached
to one of 2–3 `SimulatedNode`s, each a real `RoomProtocol` driven as `crdtchat serve --nats`
drives it (the same `RoomCursor`), over the in-process stand-in for the stream.

`ClusterNodesMachine` is `ConversationMachine` with the "nodes" topology only: besides the
writes and the network's faults, hypothesis picks publishes, acknowledgements, how far each
node's follower lags, node kills and restarts, and which node a replica goes through. The
machine's invariants hold on every node: acknowledged writes are in the stream at every step,
and at quiescence every replica, every node's copy and the stream read alike; a reader's
write is refused whichever node it reaches. The step-by-step tests below pin the scenarios
the machine is meant to reach (a conflict judged again, a kill before the acknowledgement, a
lagging node, a roll-up). `HYPOTHESIS_PROFILE=long` runs it for the long profile (docs/testing.md).
"""

from __future__ import annotations

import pytest
from hypothesis import settings

from crdtchat.relay.config import RelayConfig
from crdtchat.testing import ConversationMachine, CreateConversation, SimulatedNetwork
from crdtchat.testing.invariants import open_update, raw_message_ids
from crdtchat.testing.network import RELAY, ROOM, SECRET
from crdtchat.testing.operations import AppendMessage, DeleteText, ForeignMapWrite
from tests.support import hypothesis_profiles

NOW = 1_700_000_000.0
pytestmark = pytest.mark.timeout(0 if hypothesis_profiles.PROFILE == "long" else 300)


class ClusterNodesMachine(ConversationMachine):
    topologies = ("nodes",)


# CI: half the convergence suite's examples (a node step costs more than a relay's), still
# derandomized under the `ci` profile; the other profiles as they are.
if hypothesis_profiles.PROFILE in ("ci", "dev"):
    ClusterNodesMachine.TestCase.settings = settings(settings(), max_examples=50)
TestClusterNodesMachine = ClusterNodesMachine.TestCase


@pytest.fixture(scope="module", autouse=True)
def _report_steps():  # type: ignore[no-untyped-def]
    """With `-s`, say how many steps the machine ran."""
    yield
    print(
        f"\nClusterNodesMachine: {ConversationMachine.steps_taken} steps in "
        f"{ConversationMachine.runs} runs (profile {hypothesis_profiles.PROFILE})"
    )


# -- step by step -----------------------------------------------------------------------------


def clock() -> float:
    return NOW


def cluster(
    roles: tuple[str, ...] = ("writer", "writer"), *, nodes: int = 2, compact: int = 1000
) -> SimulatedNetwork:
    """Replicas alice, bob, … on `nodes` nodes (replica i on node i % nodes), created and
    synced through the cluster."""
    authors = ["alice", "bob", "carol"][: len(roles)]
    net = SimulatedNetwork(
        authors,
        clock=clock,
        client_ids=list(range(1, len(roles) + 1)),
        relay=True,
        roles=list(roles),
        nodes=nodes,
        relay_config=RelayConfig(secret=SECRET, compact_updates=compact),
    )
    net.apply(0, CreateConversation("t"))
    net.settle()
    return net


def append(net: SimulatedNetwork, index: int, message_id: str) -> None:
    net.apply(index, AppendMessage(message_id, "user", message_id, None))
    net.deliver_all()  # to the node, which judges it; nothing published yet


def stream_ids(net: SimulatedNetwork) -> set[str]:
    return raw_message_ids(open_update(net.stream_state() or None))


def test_writes_on_two_nodes_conflict_and_the_follower_judges_again() -> None:
    net = cluster()
    append(net, 0, "a")
    append(net, 1, "b")
    net.publish(0)  # lands
    net.publish(1)  # refused: node 0 wrote first
    assert net.nodes[1].conflicts == 1
    assert net.replicas[1].sessions[RELAY].pending_ids  # not acknowledged
    net.consume(1)  # node 0's write: node 1 withdraws its own and judges it again
    assert net.nodes[1].position.epoch == 1
    net.settle()
    assert stream_ids(net) == {"a", "b"}
    assert all(r.sessions[RELAY].durable for r in net.replicas)
    assert {m.id for m in net.replicas[0].live.all_messages()} == {"a", "b"}


def test_a_node_killed_after_the_stream_took_a_write_loses_nothing() -> None:
    """The stream holds the write, the acknowledgement died with the node: the replica
    resends it to another node, which finds it there (an empty delta) and acknowledges."""
    net = cluster()
    append(net, 0, "a")
    net.publish(0)
    assert "a" in stream_ids(net)
    assert net.replicas[0].sessions[RELAY].pending_ids
    net.kill_node(0)
    assert net.attached[0] == 1  # reconnected to the node still up
    net.settle()
    assert net.replicas[0].sessions[RELAY].durable
    assert len(net.stream.rooms[ROOM]) == 2  # the create and "a", once
    net.restart_node(0)
    assert net.nodes[0].state() and "a" in raw_message_ids(open_update(net.nodes[0].state()))


def test_a_node_killed_before_publishing_loses_nothing_acknowledged() -> None:
    net = cluster()
    append(net, 0, "a")
    net.kill_node(0)  # its chain is gone; the replica resends to node 1
    net.settle()
    assert stream_ids(net) == {"a"}
    assert net.replicas[0].sessions[RELAY].durable


def test_a_lagging_node_broadcasts_nothing_until_its_follower_hands_it_over() -> None:
    net = cluster()
    append(net, 0, "a")
    net.publish(0)
    net.acknowledge(0)
    net.deliver_all()
    assert net.replicas[0].sessions[RELAY].durable
    assert net.nodes[1].lag() == 1
    assert "a" not in {m.id for m in net.replicas[1].live.all_messages()}
    net.consume(1)
    net.deliver_all()
    assert "a" in {m.id for m in net.replicas[1].live.all_messages()}


def test_a_readers_write_is_refused_on_every_node() -> None:
    net = cluster(("writer", "reader", "reader"), nodes=3)
    for index in (1, 2):
        # past the API's role check, as a hostile peer would
        net.apply(index, ForeignMapWrite("canonical.meta", "title", f"by {index}"))
        net.settle()
        assert net.replicas[index].refused, f"node {net.attached[index]} took a reader's write"
    assert {net.attached[1], net.attached[2]} == {1, 2}
    assert net.replicas[0].live.title == "t"
    assert len(net.stream.rooms[ROOM]) == 1  # the creation only


def test_compaction_is_a_conditional_roll_up_and_restarted_nodes_load_it() -> None:
    net = cluster(compact=2)
    for n in range(4):
        append(net, n % 2, f"m{n}")
        net.settle()
    entries = net.stream.rooms[ROOM]
    assert entries[0].snapshot
    assert stream_ids(net) == {f"m{n}" for n in range(4)}
    net.kill_node(1)
    net.restart_node(1)
    assert raw_message_ids(open_update(net.nodes[1].state())) == stream_ids(net)


def test_a_write_whose_sender_reconnected_before_it_was_judged_again_is_not_lost() -> None:
    """Found by the machine: replica 1's write waits on node 1 (unstored) when its connection
    drops and comes back; the new connection's sync finds nothing missing (the node's copy
    holds the write) and its no-op is acknowledged after the node's writes. Node 1's publish
    then meets node 0's write: the withdrawn write's sender is gone, so it is not judged
    again, and the acknowledgement would cover a write nobody stored. The node must not
    acknowledge it: it closes the connection, and the replica's resync carries the write."""
    net = cluster()
    append(net, 0, "a")
    append(net, 1, "b")
    net.publish(0)
    net.acknowledge(0)
    net.partition(1, RELAY)
    net.heal(1, RELAY)  # back on node 1, whose copy still holds "b"
    net.deliver_all()
    net.publish(1)  # refused: node 0 wrote first
    net.consume(1)  # node 0's write: node 1 withdraws "b", whose sender has gone
    net.deliver_all()
    assert net.replicas[1].sessions[RELAY].pending_ids, "acknowledged, and never stored"
    net.quiesce()
    assert stream_ids(net) == {"a", "b"}
    assert all(r.sessions[RELAY].durable for r in net.replicas)


def test_a_write_left_out_of_a_reconnected_replicas_step_2_is_not_acknowledged_with_it() -> None:
    """Found by the long run: as above, but the replica deleted text while away, so the new
    connection's sync step 2 is not a no-op: it carries the deletion (a delete set needs none
    of the replica's earlier clocks) and leaves the waiting write out (the node's state vector
    held it). Its acknowledgement covers both, so the node closes that connection when the
    waiting write is lost, and the resync carries it."""
    net = cluster()
    append(net, 0, "m")
    net.settle()
    append(net, 0, "a")
    append(net, 1, "b")
    net.publish(1)
    net.acknowledge(1)
    net.partition(0, RELAY)
    net.apply(0, DeleteText("m", 0, 1))  # while away
    net.heal(0, RELAY)
    net.deliver_all()  # the step 2 holds the deletion only
    net.publish(0)  # refused: node 1 wrote first
    net.consume(0)  # "a" (its sender's connection gone) is lost, the deletion judged again
    node = net.nodes[0]
    while node.can_publish() or node.can_acknowledge():
        if node.can_acknowledge():
            net.acknowledge(0)
        else:
            net.publish(0)
    net.deliver_all()
    assert net.replicas[0].sessions[RELAY].pending_ids, "acknowledged, and never stored"
    net.quiesce()
    assert stream_ids(net) == {"a", "b", "m"}
    assert all(r.sessions[RELAY].durable for r in net.replicas)
