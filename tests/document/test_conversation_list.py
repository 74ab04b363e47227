"""A person's conversation list through a real relay (design §2, §4): one list on three
devices, a conversation created offline that appears once its device reconnects, the list
closed to everyone else, and the relay's read-only summary of a room."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crdtchat import ConversationList, Replica, person_room, schema
from crdtchat.conversations import summary
from crdtchat.errors import CommandError
from crdtchat.replica import Backoff
from tests.support.relay import RelayProcess, identity_token, raw_client, running_relay, token

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.05, maximum=0.5)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    with running_relay(tmp_path / "data") as relay:
        yield relay


def device(relay: RelayProcess, sub: str, path: Path) -> Replica:
    return Replica(
        relay.ws_base, person_room(sub), identity_token(sub), store_path=path, backoff=FAST
    )


async def until(lists: list[ConversationList], condition: Callable[[], bool]) -> None:
    """Wait, on the lists' own change notifications, until `condition` holds."""
    changed = anyio.Event()

    def notify() -> None:
        changed.set()

    undo = [each.observe(notify) for each in lists]
    try:
        with anyio.fail_after(30):
            while not condition():
                await changed.wait()
                changed = anyio.Event()
    finally:
        for unobserve in undo:
            unobserve()


async def test_three_devices_see_one_list(relay: RelayProcess, tmp_path: Path) -> None:
    async with (
        device(relay, "alice", tmp_path / "a.db") as a,
        device(relay, "alice", tmp_path / "b.db") as b,
        device(relay, "alice", tmp_path / "c.db") as c,
    ):
        for replica in (a, b, c):
            await replica.wait_until(lambda s: s.synced, timeout=30)
        la, lb, lc = (ConversationList(r.doc) for r in (a, b, c))
        made = la.create("Trip")
        await until([lb, lc], lambda: lb.get(made.room) is not None and lc.get(made.room))
        # Different fields of one entry, changed on two devices at once, both stay.
        lb.pin(made.room)
        lc.rename(made.room, "Trip to Lisbon")
        expected = (made.room, "Trip to Lisbon", True, False)
        for mine in (la, lb, lc):
            await until(
                [mine],
                lambda mine=mine: (
                    [(e.room, e.title, e.pinned, e.archived) for e in mine.entries()] == [expected]
                ),
            )
        la.archive(made.room)
        await until([lb], lambda: lb.entries() == [] and len(lb.entries(archived=True)) == 1)


async def test_created_offline_appears_after_reconnect(relay: RelayProcess, tmp_path: Path) -> None:
    async with (
        device(relay, "alice", tmp_path / "a.db") as a,
        device(relay, "alice", tmp_path / "b.db") as b,
    ):
        for replica in (a, b):
            await replica.wait_until(lambda s: s.synced, timeout=30)
        la, lb = ConversationList(a.doc), ConversationList(b.doc)
        await anyio.to_thread.run_sync(relay.kill)
        await b.wait_until(lambda s: not s.connected, timeout=30)
        made = lb.create("Written on the train")  # offline: only in b's file and memory
        await anyio.to_thread.run_sync(relay.start)
        await until([la], lambda: la.get(made.room) is not None)
        assert la.get(made.room).title == "Written on the train"  # type: ignore[union-attr]
        await b.wait_until(lambda s: s.durable, timeout=30)


async def test_only_the_person_opens_their_list(relay: RelayProcess) -> None:
    room = person_room("alice")

    async def status(tok: str) -> int:
        try:
            async with connect(relay.url(room, tok), open_timeout=30) as conn:
                await conn.close()
                return 101
        except InvalidStatus as error:
            return error.response.status_code

    assert await status(identity_token("alice")) == 101
    assert await status(identity_token("bob")) == 403
    assert await status(token(room, "writer", "alice")) == 403  # a room token, even its own
    assert await status(token("*", "worker", "worker-1")) == 403
    # In a conversation, nobody writes the list roots.
    async with raw_client(relay.url("c-chat", identity_token("alice"), ack=True)) as chat:
        await chat.push(lambda doc: doc.get(schema.LIST_PINNED, type=Map).update({"x": True}))
        await chat.wait_acked()
        assert chat.denied and schema.LIST_PINNED in chat.denied[-1]


async def test_summary_counts_what_others_posted_since_the_read_mark(
    relay: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = identity_token("alice"), identity_token("bob")
    async with raw_client(relay.url("c-summary", alice, ack=True)) as owner:

        def post(msg_id: str, author: str, parent: str | None) -> Callable[[Doc], None]:
            def change(doc: Doc) -> None:
                messages = doc.get(schema.MESSAGES, type=Array)
                fields = {
                    "id": msg_id,
                    "role": "user",
                    "author": author,
                    "parent": parent,
                    "created_at": 1000.0 + len(messages),
                    "content": Text("hi"),
                }
                messages.append(Map(fields))

            return change

        await owner.push(post("m1", "alice", None))
        await owner.wait_acked()
        from crdtchat.membership import share

        share(relay.ws_base, "c-summary", alice, "bob", "writer")
        async with raw_client(relay.url("c-summary", bob, ack=True)) as member:
            await member.push(post("m2", "bob", "m1"))
            await member.push(post("m3", "bob", "m2"))
            await member.wait_acked()
        seen = summary(relay.ws_base, "c-summary", alice)
        assert (seen["messages"], seen["unread"], seen["last_activity"]) == (3, 2, 1002.0)
        assert summary(relay.ws_base, "c-summary", alice, read="m2")["unread"] == 1
        assert summary(relay.ws_base, "c-summary", bob, read="m3")["unread"] == 0
    with pytest.raises(CommandError, match="403"):
        summary(relay.ws_base, "c-summary", identity_token("carol"))
