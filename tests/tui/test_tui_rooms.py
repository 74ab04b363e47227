"""`crdtchat chat` without a room: the conversation list screen, driven headless through
Textual's Pilot, over a list document (in memory, or a replica through a real relay)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pycrdt import Doc, Map
from textual.pilot import Pilot
from textual.widgets import Input

from crdtchat import ConversationList, schema
from crdtchat.document import Conversation
from crdtchat.replica import Backoff, Replica
from crdtchat.tui.app import ChatApp
from crdtchat.tui.link import DetachedLink, ReplicaLink
from crdtchat.tui.main import follow_membership
from crdtchat.tui.rooms import RoomsApp, relay_share
from crdtchat.tui.widgets import Line
from tests.support.relay import RelayProcess, identity_token, raw_client, running_relay
from tests.support.tui import submit

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
QUICK = Backoff(initial=0.05, maximum=0.2)


async def command(pilot: Pilot[str | None], text: str) -> None:
    pilot.app.query_one("#command", Input).value = text
    await pilot.press("enter")
    await pilot.pause()


def screen(app: RoomsApp) -> str:
    return app.query_one("#rooms", Line).text


def notice(app: RoomsApp) -> str:
    return app.query_one("#notice", Line).text


async def test_create_rename_pin_archive_leave_and_open() -> None:
    rooms = ConversationList(Doc())
    app = RoomsApp(rooms)
    async with app.run_test() as pilot:
        await command(pilot, "new Trip")
        await command(pilot, "new Groceries")
        assert [e.title for e in rooms.entries()] == ["Groceries", "Trip"]  # newest first
        await command(pilot, "pin 2")
        assert [e.title for e in rooms.entries()] == ["Trip", "Groceries"]
        assert screen(app).splitlines()[0].strip().startswith("1  📌 Trip")
        await command(pilot, "rename 2 Weekly shop")
        await command(pilot, "archive 2")
        assert [e.title for e in rooms.entries()] == ["Trip"]
        await command(pilot, "archived")
        assert "Weekly shop" in screen(app) and "Trip" not in screen(app)
        await command(pilot, "leave 1")
        assert rooms.entries(archived=None)[0].title == "Trip"
        await command(pilot, "archived")
        await command(pilot, "open 7")
        assert "no conversation number '7'" in notice(app)
        await command(pilot, "share 1 bob reader")
        assert "needs the relay" in notice(app)
        await command(pilot, "open 1")
    assert app.return_value == rooms.entries()[0].room


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    with running_relay(tmp_path / "data") as relay:
        yield relay


async def test_share_from_the_list(relay: RelayProcess) -> None:
    alice = identity_token("alice")
    base = relay.ws_base
    rooms = ConversationList(Doc())
    made = rooms.create("Shared")
    async with raw_client(relay.url(made.room, alice, ack=True)) as owner:  # creates it
        app = RoomsApp(rooms, share=relay_share(base, alice))
        async with app.run_test() as pilot:
            await command(pilot, "share 1 bob writer")
            assert notice(app) == "shared with bob as writer"
            await owner.wait_for(lambda: "bob" in owner.doc.get(schema.MEMBERS, type=Map))
            await command(pilot, "unshare 1 bob")
            assert notice(app) == "removed bob"
            await command(pilot, "unshare 1 bob")
            assert "404" in notice(app)
            await command(pilot, "quit")
        assert app.return_value is None


async def test_a_room_shared_with_you_is_added_by_name() -> None:
    rooms = ConversationList(Doc())
    app = RoomsApp(rooms)
    async with app.run_test() as pilot:
        await command(pilot, "add c-from-bob Bob's notes")
        assert [(e.room, e.title) for e in rooms.entries()] == [("c-from-bob", "Bob's notes")]
        await command(pilot, "add not/a/room")
        assert "a room name is" in notice(app)


async def test_the_chat_follows_the_persons_role_in_the_room() -> None:
    conversation = Conversation(author="bob")
    app = ChatApp(conversation, DetachedLink(conversation.doc), room="r", device="phone")
    unfollow = follow_membership(conversation, app, "bob")
    async with app.run_test() as pilot:
        # Not synced yet: the role is unknown, so the chat writes nothing the relay could refuse.
        assert conversation.role == "reader" and app.read_only
        await submit(pilot, "too early")
        assert "not known yet" in app.query_one("#notice", Line).text
        assert conversation.current_thread() == [] and conversation.draft() == ""
        members = conversation.doc.get(schema.MEMBERS, type=Map)
        members["alice"] = {"role": "owner", "by": "alice", "at": 0.0}
        assert app.read_only and "not a member" in app.read_only_reason
        members["bob"] = {"role": "reader", "by": "alice", "at": 0.0}
        assert conversation.role == "reader" and app.read_only
        await submit(pilot, "still a reader")
        assert "you are a reader" in app.query_one("#notice", Line).text
        members["bob"] = {"role": "writer", "by": "alice", "at": 1.0}
        assert conversation.role == "writer" and not app.read_only
        await submit(pilot, "now a writer")
        assert [m.content for m in conversation.current_thread()] == ["now a writer"]
        del members["bob"]  # removed from the room: back to reading
        assert conversation.role == "reader" and app.read_only
    unfollow()


async def test_a_stale_membership_in_the_local_file_is_not_trusted_before_sync(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """Bob was a writer when his device last synced, and is a reader now: opened from its
    file with the relay down, the chat stays a reader until the relay's members arrive."""
    alice = identity_token("alice")
    bob = identity_token("bob")
    base = relay.ws_base
    room = ConversationList(Doc()).create("Shared").room
    store = tmp_path / "bob.sqlite"
    share = relay_share(base, alice)

    async def bob_opens() -> tuple[Conversation, ChatApp, Replica]:
        conversation = Conversation(author="bob")
        replica = Replica(base, room, bob, doc=conversation.doc, store_path=store, backoff=QUICK)
        app = ChatApp(conversation, ReplicaLink(replica), room=room, device="phone")
        return conversation, app, replica

    async with raw_client(relay.url(room, alice, ack=True)):  # creates the room
        await share(room, "bob", "writer")
    conversation, app, replica = await bob_opens()
    unfollow = follow_membership(conversation, app, "bob", replica)
    assert app.read_only and "not known yet" in app.read_only_reason
    async with replica:
        await replica.wait_until(lambda s: s.synced, timeout=20)
        assert conversation.role == "writer" and not app.read_only
    unfollow()
    await share(room, "bob", "reader")  # while bob's device is closed

    relay.kill()
    conversation, app, replica = await bob_opens()
    unfollow = follow_membership(conversation, app, "bob", replica)
    members = conversation.doc.get(schema.MEMBERS, type=Map)
    loaded = anyio.Event()
    members.observe(lambda _event: loaded.set())
    async with replica:
        with anyio.fail_after(20):
            await loaded.wait()  # the file's members: bob a writer, as last synced
        assert members["bob"]["role"] == "writer"
        assert conversation.role == "reader" and app.read_only
        assert "not known yet" in app.read_only_reason
        relay.start()
        await replica.wait_until(lambda s: s.synced, timeout=20)
        assert members["bob"]["role"] == "reader"
        assert conversation.role == "reader" and app.read_only
        assert "you are a reader" in app.read_only_reason
        assert replica.status.refused == 0
    unfollow()


async def test_after_recover_the_chat_follows_the_new_documents_members(
    relay: RelayProcess, tmp_path: Path
) -> None:
    alice = identity_token("alice")
    bob = identity_token("bob")
    base = relay.ws_base
    room = ConversationList(Doc()).create("Shared").room
    share = relay_share(base, alice)
    async with raw_client(relay.url(room, alice, ack=True)):  # creates the room
        await share(room, "bob", "writer")
    conversation = Conversation(author="bob")
    replica = Replica(
        base, room, bob, doc=conversation.doc, store_path=tmp_path / "bob.db", backoff=QUICK
    )
    app = ChatApp(conversation, ReplicaLink(replica), room=room, device="phone")
    unfollow = follow_membership(conversation, app, "bob", replica)
    async with replica, app.run_test() as pilot:
        await replica.wait_until(lambda s: s.synced, timeout=20)
        assert conversation.role == "writer" and not app.read_only
        # A write no writer may make (straight into the document): refused, then /recover.
        conversation.messages.append(
            Map({"id": "x", "role": "assistant", "author": "bob", "content": "nope"})
        )
        await replica.wait_until(lambda s: s.blocked, timeout=20)
        await submit(pilot, "/recover")
        with anyio.fail_after(20):
            while app.conversation is conversation:
                await app.updated.wait()
        members = app.conversation.doc.get(schema.MEMBERS, type=Map)
        changed = anyio.Event()
        members.observe(lambda _event: changed.set())
        await share(room, "bob", "reader")
        with anyio.fail_after(20):
            await changed.wait()
        assert members["bob"]["role"] == "reader"
        assert app.conversation.role == "reader" and app.read_only
    unfollow()
