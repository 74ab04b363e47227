"""Opening a long room the relay has not loaded (issue 16, design §7.6): the state comes first,
and a write sent at once is still judged against the whole room.

The relay builds a cold room's structure index only when a write needs it, so that a peer
opening the room to read gets the state without waiting for the index; a write waits for it.
These tests hold the second half: the first writes after a cold load are refused or stored
exactly as they would be in a warm room, through a real relay subprocess restarted on its data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from pycrdt import Doc, Map, Text

from crdtchat import schema
from crdtchat.relay.store import DB_NAME, Store
from crdtchat.wire import SyncStep1, SyncUpdate
from tests.support.relay import RawClient, RelayProcess, declare_roots, message_map, raw_client
from tests.support.relay import token as mint

pytestmark = pytest.mark.anyio

ROOM = "long"
COUNT = 3000  # enough that building the room's indexes takes a good fraction of a second


def long_room() -> bytes:
    doc: Doc = Doc()
    messages = declare_roots(doc)[schema.MESSAGES]
    with doc.transaction():
        for n in range(COUNT):
            messages.append(message_map(f"m{n}", "user", "alice", f"message {n}"))
    return doc.get_update()


def new_message(msg_id: str, author: str) -> bytes:
    """An update appending one user message, made by a client that holds nothing yet: its
    item starts its own client's clock, so it builds on nothing the room must have."""
    doc: Doc = Doc()
    declare_roots(doc)[schema.MESSAGES].append(
        message_map(msg_id, "user", author, "hello", parent=f"m{COUNT - 1}")
    )
    return doc.get_update()


def url(relay: RelayProcess, sub: str, role: str) -> str:
    return relay.url(ROOM, mint(ROOM, role, sub), ack=True)


async def open_and_write(relay: RelayProcess, sub: str, role: str, update: bytes) -> RawClient:
    """Join, and in the same frame as sync step 1 send `update`: the write reaches the relay
    before the room could have indexed anything for it. Returns once the state is in and the
    write is settled (acknowledged, or refused)."""
    async with raw_client(url(relay, sub, role), hello=False) as client:
        await client.send(SyncStep1(b"\x00"), SyncUpdate(update))
        await client.wait_for(lambda: client.synced and bool(client.acks), timeout=60)
        await client.wait_for(lambda: client.acks[-1] >= 1 or bool(client.denied), timeout=60)
        return client


async def stored_ids(relay: RelayProcess) -> list[str]:
    """The message ids of the room as stored, read after a restart by a fresh reader."""
    relay.kill()
    relay.start()
    async with raw_client(url(relay, "viewer", "reader")) as client:
        return [str(m["id"]) for m in client.messages]


async def seed(relay: RelayProcess) -> Doc:
    """Store the long room (compacted into a snapshot at once, it is that big) and one more
    message, "t1", which stays in the log after it; return a copy of what is stored."""
    async with raw_client(url(relay, "alice", "writer")) as client:
        room = long_room()
        client.doc.apply_update(room)  # so that t1 goes after the last message
        await client.send(SyncUpdate(room))
        await client.wait_acked()
        await client.push(
            lambda _: client.messages.append(
                message_map("t1", "user", "alice", "tail", parent=f"m{COUNT - 1}")
            )
        )
        await client.wait_acked()
        stored: Doc = Doc()
        stored.apply_update(client.doc.get_update())
    relay.kill()  # the room is cold on the next start: snapshot plus log, as stored
    relay.start()
    return stored


def reply_to_tail(stored: Doc) -> bytes:
    """bob's message inserted right after "t1": its item names t1's as its origin, so it can
    only be judged by an index that holds what the log added after the snapshot."""
    before = stored.get_state()
    messages = declare_roots(stored)[schema.MESSAGES]
    messages.append(message_map("b1", "user", "bob", "after the tail", parent="t1"))
    return stored.get_update(before)


async def concurrently(*calls: Callable[[], object]) -> None:
    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(call)  # type: ignore[arg-type]


async def test_first_writes_after_a_cold_load_are_judged_against_the_whole_room(
    tmp_path: Path,
) -> None:
    relay = RelayProcess(tmp_path / "data").start()
    try:
        stored = await seed(relay)
        clients: dict[str, RawClient] = {}

        async def run(sub: str, role: str, update: bytes) -> None:
            clients[sub] = await open_and_write(relay, sub, role, update)

        await concurrently(
            lambda: run("reader", "reader", new_message("r1", "reader")),
            lambda: run("alice", "writer", new_message("a1", "alice")),
            lambda: run("mallory", "writer", new_message("m0", "mallory")),  # in the snapshot
            lambda: run("carol", "writer", new_message("t1", "carol")),  # in the log
            lambda: run("bob", "writer", reply_to_tail(stored)),
        )
        for client in clients.values():
            assert len(client.messages) >= COUNT + 1  # each got the whole room
        assert clients["reader"].denied == ["a reader may not change the document"]
        assert clients["mallory"].denied == ["message id 'm0' is taken by another message"]
        assert clients["carol"].denied == ["message id 't1' is taken by another message"]
        for writer in ("alice", "bob"):
            assert clients[writer].denied == []
            assert clients[writer].acks[-1] >= 1
        ids = await stored_ids(relay)
        # a1 was made without the room, so it lands at the start: only the set matters here
        assert sorted(ids) == sorted([f"m{n}" for n in range(COUNT)] + ["t1", "a1", "b1"])
        assert ids.index("b1") == ids.index("t1") + 1
    finally:
        relay.stop()


async def test_a_message_after_a_first_write_elsewhere_is_judged_by_its_id(
    tmp_path: Path,
) -> None:
    """The first write of a cold room touches only a draft: the message ids are not read for
    it, and the next write, a message reusing an id of the snapshot, is still refused."""
    relay = RelayProcess(tmp_path / "data").start()
    try:
        await seed(relay)
        async with raw_client(url(relay, "dave", "writer"), hello=False) as client:
            draft: Doc = Doc()
            draft.get(schema.DRAFTS, type=Map)["dave"] = Text("typing")
            await client.send(SyncStep1(b"\x00"), SyncUpdate(draft.get_update()))
            await client.wait_for(
                lambda: client.synced and bool(client.acks) and client.acks[-1] >= 1
            )
            await client.send(SyncUpdate(new_message("m5", "dave")))
            await client.wait_for(lambda: bool(client.denied))
            assert client.denied == ["message id 'm5' is taken by another message"]
    finally:
        relay.stop()


async def test_a_reader_gets_a_cold_room_whole(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data").start()
    try:
        await seed(relay)
        async with raw_client(url(relay, "reader", "reader")) as client:
            assert client.texts()[-2:] == [f"message {COUNT - 1}", "tail"]
            assert len(client.messages) == COUNT + 1
    finally:
        relay.stop()


async def test_a_compacted_room_is_not_checked_again_at_its_next_load(tmp_path: Path) -> None:
    """A compaction's snapshot is the live document, made of checked bytes: the store marks it
    checked, so loading the room next time does not walk its bytes again (design §7.6)."""
    update = long_room()
    async with Store(tmp_path) as store:
        await store.append(ROOM, 1, update)
        await store.compact(ROOM, 1, update)
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        marks = db.execute("SELECT room, upto FROM checked").fetchall()
    assert marks == [(ROOM, 1)]
