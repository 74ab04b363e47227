"""Sync through the relay subprocess: convergence, awareness, frames, acknowledgements."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pycrdt import Doc

from crdtchat import schema
from crdtchat.wire import (
    Ack,
    AuthDenied,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    encode_frame,
)
from tests.support.relay import (
    RawClient,
    RelayProcess,
    declare_roots,
    message_map,
    raw_client,
    running_relay,
    token,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(Path(tmp_path_factory.mktemp("sync")) / "data") as process:
        yield process


def url(relay: RelayProcess, room: str, sub: str, role: str = "writer", ack: bool = False) -> str:
    return relay.url(room, token(room, role, sub), ack=ack)


async def test_clients_converge(relay: RelayProcess) -> None:
    room = "converge"
    subs = ["alice", "bob", "carol", "dave"]
    per_client = 15

    async def write(client: RawClient, sub: str) -> None:
        for k in range(per_client):
            await client.push(
                lambda doc, k=k: client.messages.append(
                    message_map(f"{sub}-{k}", "user", sub, f"{sub} says {k}")
                )
            )
            if k % 5 == 0:
                await client.push(
                    lambda doc, k=k: client.roots[schema.META].__setitem__(f"{sub}", k)
                )

    async with (
        raw_client(url(relay, room, "alice")) as a,
        raw_client(url(relay, room, "bob")) as b,
        raw_client(url(relay, room, "carol")) as c,
        raw_client(url(relay, room, "dave")) as d,
    ):
        clients = [a, b, c, d]
        async with anyio.create_task_group() as tg:
            for client, sub in zip(clients, subs, strict=True):
                tg.start_soon(write, client, sub)
        total = per_client * len(subs)
        for client in clients:
            await client.wait_for(lambda client=client: len(client.messages) == total)
        views = [(client.messages.to_py(), client.roots[schema.META].to_py()) for client in clients]
        assert all(view == views[0] for view in views)
        assert {m["id"] for m in views[0][0]} == {
            f"{s}-{k}" for s in subs for k in range(per_client)
        }
        # The relay sends one message per frame, for y-websocket 2.x clients.
        assert all(client.multi_message_frames == 0 for client in clients)

    async with raw_client(url(relay, room, "eve", "reader")) as late:
        assert late.messages.to_py() == views[0][0]
        assert late.denied == []  # its (empty) sync step 2 is not a write


async def test_sync_step1_is_answered_with_what_the_client_lacks(relay: RelayProcess) -> None:
    room = "step1"
    async with raw_client(url(relay, room, "alice", ack=True)) as a:
        for k in range(3):
            await a.push(
                lambda doc, k=k: a.messages.append(message_map(f"m{k}", "user", "alice", "x"))
            )
        # Its sync step 2 and three updates. Sent is not applied: closing before the relay
        # acknowledges them could leave the room without them when bob asks.
        await a.wait_for(lambda: a.sent_updates == 4)
        await a.wait_acked(4)
    stale: Doc = Doc()
    declare_roots(stale)
    async with raw_client(url(relay, room, "bob"), hello=False, doc=stale) as b:
        await b.send(SyncStep1(b.doc.get_state()))
        await b.wait_for(lambda: any(isinstance(m, SyncStep2) for m in b.received))
        assert [m["id"] for m in b.messages.to_py()] == ["m0", "m1", "m2"]


async def test_awareness(relay: RelayProcess) -> None:
    room = "presence"
    async with raw_client(url(relay, room, "alice")) as a, raw_client(url(relay, room, "bob")) as b:
        a_id = a.doc.client_id
        await a.set_presence(a_id, 1, {"user": {"name": "Alice"}, "typing": True})
        # Broadcast to everyone, the sender included.
        for client in (a, b):
            await client.wait_for(lambda client=client: a_id in client.awareness)
            assert json.loads(client.awareness[a_id][1])["user"]["name"] == "Alice"
        # A newcomer gets the current states when it connects.
        async with raw_client(url(relay, room, "carol", "reader")) as c:
            await c.wait_for(lambda: a_id in c.awareness)
            before = len(c.received)
            await c.send(QueryAwareness())
            await c.wait_for(lambda: len(c.received) > before)
            assert json.loads(c.awareness[a_id][1])["typing"] is True
    # Closing removes the connection's clients from everyone's awareness.
    async with raw_client(url(relay, room, "alice")) as a, raw_client(url(relay, room, "bob")) as b:
        a_id = a.doc.client_id
        await a.set_presence(a_id, 1, {"user": {"name": "Alice"}})
        await b.wait_for(lambda: a_id in b.awareness)
        await a.ws.close()
        await b.wait_for(lambda: b.awareness[a_id][1] == "null")


async def test_several_messages_per_frame_and_acks(relay: RelayProcess) -> None:
    room = "frames"
    async with (
        raw_client(url(relay, room, "alice", ack=True)) as a,
        raw_client(url(relay, room, "bob")) as b,
    ):
        await a.wait_acked()  # its sync step 2
        base = a.sent_updates
        # Written on a copy: what `a.doc` writes, its session sends on its own.
        writer: Doc = Doc()
        writer.apply_update(a.doc.get_update())
        updates = []
        for k in range(3):
            before = writer.get_state()
            declare_roots(writer)[schema.MESSAGES].append(
                message_map(f"f{k}", "user", "alice", str(k))
            )
            updates.append(writer.get_update(before))
        bad_doc: Doc = Doc()
        declare_roots(bad_doc)[schema.DERIVED]["x"] = {"kind": "usage"}  # not for writers
        refused = bad_doc.get_update()
        frame = [
            SyncUpdate(updates[0]),
            SyncUpdate(refused),
            SyncUpdate(updates[1]),
            QueryAwareness(),
            SyncUpdate(updates[2]),
        ]
        await a.send_raw(encode_frame(frame))
        await a.wait_acked(base + 4)
        await b.wait_for(lambda: len(b.messages) == 3)
        assert [m["id"] for m in b.messages.to_py()] == ["f0", "f1", "f2"]
        # Ack(k - 1) comes right before the AuthDenied of message k: the client can tell which.
        denied_at = next(i for i, m in enumerate(a.received) if isinstance(m, AuthDenied))
        acks_before = [m.seq for m in a.received[:denied_at] if isinstance(m, Ack)]
        assert acks_before[-1] == base + 1
        assert "derived.entries" in a.denied[0]
        assert a.acks[-1] == base + 4
        assert a.acks == sorted(a.acks)


async def test_acks_are_only_sent_when_asked(relay: RelayProcess) -> None:
    async with raw_client(url(relay, "noack", "alice")) as a:
        await a.push(lambda doc: a.messages.append(message_map("n1", "user", "alice", "x")))
        async with raw_client(url(relay, "noack", "bob")) as b:
            await b.wait_for(lambda: len(b.messages) == 1)
        assert a.acks == []
        assert not any(isinstance(m, Ack) for m in a.received)
