"""A reply streamed through a relay node that is SIGKILLed, then another node, then a NATS node
(issue 13, "Shown by"): three relay processes on the real three-node NATS cluster, a worker
(loopback OpenAI provider) and people as Replicas listing several relays.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from crdtchat.cluster.names import Names
from crdtchat.document import Conversation
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.openai_chat import OpenAIChatProvider
from crdtchat.replica import Backoff, Replica
from crdtchat.schema import assistant_turn_id
from crdtchat.worker.room import ProviderPool, RoomSettings
from crdtchat.worker.service import WorkerConfig, run_worker
from crdtchat.worker.turn import Changes
from tests.support.nats import NatsCluster, relay_nodes
from tests.support.relay import RelayProcess, token

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.05, maximum=0.5)
ROOM = "streamed.reply"


@pytest.fixture
def nodes(cluster: NatsCluster, names: Names, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    with relay_nodes(cluster, names.prefix, tmp_path, 3) as relays:
        yield relays


def watch(conversation: Conversation) -> Changes:
    changes = Changes()
    conversation.view.on_change(changes.notify)
    conversation.streams.observe_deep(changes.notify)
    return changes


async def until(condition, changes: Changes, timeout: float) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not condition():
            await changes.wait()


async def test_a_reply_streamed_through_dying_nodes_completes_once(
    cluster: NatsCluster, nodes: list[RelayProcess]
) -> None:
    a, b, c = nodes
    words = [f"w{index}" for index in range(60)]
    with OpenAILoopback(event_delay=0.05) as loopback:
        providers = ProviderPool(
            "openai-chat",
            make=lambda name, model: OpenAIChatProvider(base_url=loopback.base_url, api_key="t"),
        )
        config = WorkerConfig(
            relays=(c.ws_base, a.ws_base, b.ws_base),  # streams through node C first
            token=token("*", "worker", "worker-1"),
            identity="worker-1",
            room=RoomSettings(idle_after=30),
        )
        alice = Conversation(author="alice")
        changes = watch(alice)
        async with (
            anyio.create_task_group() as workers,
            Replica(
                [a.ws_base, b.ws_base],
                ROOM,
                token(ROOM, "writer", "alice"),
                doc=alice.doc,
                backoff=FAST,
            ) as replica,
        ):
            workers.start_soon(run_worker, config, providers)
            await replica.wait_until(lambda status: status.synced, timeout=20)
            question = alice.append("user", " ".join(words))
            answer_id = assistant_turn_id(question.id, 1)
            await until(lambda: bool(alice.streams_in_flight()), changes, 60)
            c.kill()  # mid-stream: the worker's replica moves to node A and carries on
            await until(lambda: alice.view.get(answer_id) is not None, changes, 90)
            answer = alice.message(answer_id)
            assert answer.status == "complete" and answer.author == "worker-1"
            assert all(word in answer.content for word in words)

            a.kill()  # alice's node: her replica moves to node B
            cluster.kill(0)  # and one NATS node of three
            try:
                follow_up = alice.append("user", "still there", parent=answer_id)
                await replica.wait_until(
                    lambda status: status.synced and status.pending == 0, timeout=60
                )
                second_answer = assistant_turn_id(follow_up.id, 1)
                await until(lambda: alice.view.get(second_answer) is not None, changes, 90)
            finally:
                await anyio.to_thread.run_sync(cluster.restart, 0)
            workers.cancel_scope.cancel()

        # A fresh reader through the surviving node: the same document, one reply per question.
        reader = Conversation(author="reader")
        async with Replica(
            [b.ws_base], ROOM, token(ROOM, "reader", "bob"), doc=reader.doc, backoff=FAST
        ) as fresh:
            await fresh.wait_until(lambda status: status.synced, timeout=30)
        thread = [(m.id, m.role, m.status, m.content) for m in reader.current_thread()]
        assert thread == [(m.id, m.role, m.status, m.content) for m in alice.current_thread()]
        replies = [m for m in reader.current_thread() if m.role == "assistant"]
        assert [m.parent for m in replies] == [question.id, follow_up.id]
        assert all(m.status == "complete" for m in replies)


async def test_two_nodes_writing_one_room_at_once_lose_nothing(
    nodes: list[RelayProcess],
) -> None:
    """Concurrent writers on nodes A and B: a node whose publish meets the other's write
    judges its writes again, and in the end every message of both is stored once."""
    a, b, _ = nodes
    room = "contended"
    people = {"alice": Conversation(author="alice"), "bob": Conversation(author="bob")}
    async with (
        Replica(
            [a.ws_base, b.ws_base],
            room,
            token(room, "writer", "alice"),
            doc=people["alice"].doc,
            backoff=FAST,
        ) as alice,
        Replica(
            [b.ws_base, a.ws_base],
            room,
            token(room, "writer", "bob"),
            doc=people["bob"].doc,
            backoff=FAST,
        ) as bob,
    ):
        for replica in (alice, bob):
            await replica.wait_until(lambda status: status.synced, timeout=30)

        async def write(name: str) -> None:
            for index in range(25):
                people[name].append("user", f"{name}-{index}", parent=None)
                await anyio.sleep(0.01)  # a person typing, not a flood

        async with anyio.create_task_group() as group:
            group.start_soon(write, "alice")
            group.start_soon(write, "bob")
        for replica in (alice, bob):
            await replica.wait_until(
                lambda status: status.synced and status.pending == 0, timeout=90
            )
    reader = Conversation(author="reader")
    async with Replica(
        [b.ws_base], room, token(room, "reader", "carol"), doc=reader.doc, backoff=FAST
    ) as fresh:
        await fresh.wait_until(lambda status: status.synced, timeout=30)
    contents = sorted(message.content for message in reader.all_messages())
    assert contents == sorted(f"{n}-{i}" for n in ("alice", "bob") for i in range(25))
