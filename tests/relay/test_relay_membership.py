"""Membership through a real relay (design §4): a room's owner, members by role, invite links,
access that ends when membership does, and the `share`/`invite`/`join` commands."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat import ConversationList, membership, schema
from crdtchat.conversations import list_replica
from crdtchat.errors import CommandError
from tests.support.relay import (
    REPO,
    RawClient,
    RelayProcess,
    identity_token,
    message_map,
    raw_client,
    running_relay,
    token,
    upgrade_status,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(tmp_path_factory.mktemp("membership") / "data") as relay:
        yield relay


def append(msg_id: str, author: str, text: str) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        doc.get(schema.MESSAGES, type=Array).append(message_map(msg_id, "user", author, text))

    return change


def member_table(client: RawClient) -> dict[str, Any]:
    return dict(client.doc.get(schema.MEMBERS, type=Map).to_py() or {})


async def test_owner_shares_as_reader_who_reads_and_cannot_write(relay: RelayProcess) -> None:
    room = "shared-reader"
    alice, bob = identity_token("alice"), identity_token("bob")
    async with raw_client(relay.url(room, alice, ack=True)) as owner:
        # The first identity to open an empty room owns it, and writes like a writer.
        await owner.wait_for(lambda: member_table(owner).get("alice", {}).get("role") == "owner")
        await owner.push(append("m1", "alice", "hello bob"))
        await owner.wait_acked()
        assert owner.denied == []
        status, body = await upgrade_status(relay, room, bob)
        assert status == 403 and "bob is not a member" in body
        # Nobody writes the access roots but the relay, the owner included.
        await owner.push(lambda doc: doc.get(schema.MEMBERS, type=Map).update({"mallory": {}}))
        await owner.wait_acked()
        assert owner.denied and schema.MEMBERS in owner.denied[-1]

        membership.share(relay.ws_base, room, alice, "bob", "reader")
        await owner.wait_for(lambda: member_table(owner).get("bob", {}).get("role") == "reader")
        async with raw_client(relay.url(room, bob, ack=True)) as reader:
            assert reader.texts() == ["hello bob"]
            # Another of bob's devices tries to write (its refused write stays in its own doc,
            # so it is not this connection, whose later writes must not build on it).
            async with raw_client(relay.url(room, bob, ack=True)) as device:
                await device.push(append("m2", "bob", "let me in"))
                await device.wait_acked()
                assert device.denied == ["a reader may not change the document"]
            # Only the owner changes members.
            with pytest.raises(CommandError, match="403"):
                membership.share(relay.ws_base, room, bob, "carol", "writer")
            # A downgrade or upgrade applies to the live connection's next write.
            membership.share(relay.ws_base, room, alice, "bob", "writer")
            await reader.wait_for(lambda: member_table(reader)["bob"]["role"] == "writer")
            await reader.push(append("m3", "bob", "thanks"))
            await reader.wait_acked()
            assert reader.denied == []
        await owner.wait_for(lambda: owner.texts() == ["hello bob", "thanks"])


async def test_removed_member_receives_nothing_more_on_a_live_connection(
    relay: RelayProcess,
) -> None:
    room = "shared-removed"
    alice, bob = identity_token("alice"), identity_token("bob")
    async with raw_client(relay.url(room, alice, ack=True)) as owner:
        await owner.push(append("m1", "alice", "before"))
        await owner.wait_acked()
        membership.share(relay.ws_base, room, alice, "bob", "writer")
        async with raw_client(relay.url(room, bob, ack=True)) as member:
            await member.wait_for(lambda: member.texts() == ["before"])
            await member.wait_acked()  # its own sync step 2: nothing of its own is in flight
            seen = len(member.received)
            # Removal is enforced before the relay answers the owner: the connection is
            # closed with a reason, and not even the update that removes it is sent to it.
            membership.unshare(relay.ws_base, room, alice, "bob")
            await owner.push(append("m2", "alice", "after"))
            await owner.wait_acked()
            code, reason = await member.wait_closed(timeout=2)
            assert code == 4403 and reason == "access revoked: bob is no longer a member"
            assert len(member.received) == seen
            assert member.texts() == ["before"]
            assert "bob" in member_table(member)  # it never saw its own removal
        assert "bob" not in member_table(owner)
        status, body = await upgrade_status(relay, room, bob)
        assert status == 403 and "not a member" in body
        with pytest.raises(CommandError, match="404"):
            membership.unshare(relay.ws_base, room, alice, "bob")


async def test_invite_link_used_up_and_revoked(relay: RelayProcess) -> None:
    room = "invited"
    alice = identity_token("alice")
    async with raw_client(relay.url(room, alice, ack=True)) as owner:
        await owner.push(append("m1", "alice", "welcome"))
        await owner.wait_acked()
        once = membership.invite(relay.ws_base, room, alice, "writer", uses=1)
        secret = once.link.partition("#invite=")[2]
        await owner.wait_for(lambda: once.id in owner.doc.get(schema.INVITES, type=Map))
        stored = owner.doc.get(schema.INVITES, type=Map)[once.id]
        # The document keeps only a hash: a member who reads it cannot redeem the invite.
        assert stored["hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in str(owner.doc.get(schema.INVITES, type=Map).to_py())

        joined = membership.join(once.link, identity_token("carol"))
        assert (joined.room, joined.role) == (room, "writer")
        async with raw_client(relay.url(room, identity_token("carol"), ack=True)) as carol:
            assert carol.texts() == ["welcome"]
        with pytest.raises(CommandError, match=r"403.*not valid"):  # used up
            membership.join(once.link, identity_token("dave"))
        await owner.wait_for(lambda: once.id not in owner.doc.get(schema.INVITES, type=Map))

        revoked = membership.invite(relay.ws_base, room, alice, "reader", ttl=3600)
        membership.revoke(relay.ws_base, room, alice, revoked.id)
        with pytest.raises(CommandError, match=r"403.*not valid"):
            membership.join(revoked.link, identity_token("erin"))
        assert (await upgrade_status(relay, room, identity_token("erin")))[0] == 403
        # A guessed secret for a live invite is refused the same way.
        live = membership.invite(relay.ws_base, room, alice, "reader")
        forged = live.link.rsplit(".", 1)[0] + ".guessed"
        with pytest.raises(CommandError, match=r"403.*not valid"):
            membership.join(forged, identity_token("erin"))


async def test_a_room_without_an_owner_opens_only_with_a_room_token(relay: RelayProcess) -> None:
    room = "capability-room"
    async with raw_client(relay.url(room, token(room, "writer", "app"), ack=True)) as app:
        await app.push(append("m1", "app", "made by an app token"))
        await app.wait_acked()
    status, body = await upgrade_status(relay, room, identity_token("alice"))
    assert status == 403 and "has no owner" in body
    with pytest.raises(CommandError, match="403"):
        membership.share(relay.ws_base, room, identity_token("alice"), "bob", "reader")
    with pytest.raises(CommandError, match=r"403.*identity token"):
        membership.share(relay.ws_base, room, token(room, "writer", "app"), "bob", "reader")


def cli(*args: str, tok: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CRDTCHAT_TOKEN", None)
    if tok is not None:
        env["CRDTCHAT_TOKEN"] = tok
    return subprocess.run(
        [sys.executable, "-m", "crdtchat.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(REPO),
    )


async def test_share_invite_and_join_commands(relay: RelayProcess) -> None:
    room = "by-command"
    base = relay.ws_base
    alice = identity_token("alice")
    async with raw_client(relay.url(room, alice, ack=True)) as owner:
        shared = cli("share", room, "--relay", base, "--with", "bob", "--role", "reader", tok=alice)
        assert shared.returncode == 0, shared.stderr
        await owner.wait_for(lambda: member_table(owner).get("bob", {}).get("role") == "reader")
        made = cli("invite", room, "--relay", base, "--role", "writer", "--uses", "1", tok=alice)
        assert made.returncode == 0, made.stderr
        link = made.stdout.strip()
        joined = cli("join", link, tok=identity_token("carol"))
        assert joined.returncode == 0 and "joined by-command as writer" in joined.stdout
        # Joining accepts the room into carol's own conversation list.
        async with list_replica(base, identity_token("carol")) as carols:
            await carols.wait_until(lambda status: status.synced, timeout=30)
            assert [e.room for e in ConversationList(carols.doc).entries()] == [room]
        again = cli("join", link, tok=identity_token("dave"))
        assert again.returncode == 1 and again.stderr.count("\n") == 1
        assert again.stderr.startswith("crdtchat join: refused (403)")
        invite_id = made.stderr.split()[2]
        revoke = cli("invite", room, "--relay", base, "--revoke", invite_id, tok=alice)
        assert revoke.returncode == 1 and "404" in revoke.stderr  # used up: gone already
        removed = cli("share", room, "--relay", base, "--with", "bob", "--remove", tok=alice)
        assert removed.returncode == 0, removed.stderr
        await owner.wait_for(lambda: "bob" not in member_table(owner))
    assert cli("share", room, "--relay", base, "--with", "bob", tok=alice).returncode == 2
    assert cli("join", "not-a-link", tok=alice).returncode == 2
    bad_ttl = cli("invite", room, "--relay", base, "--role", "reader", "--ttl", "-1", tok=alice)
    assert bad_ttl.returncode == 2
    unset = cli("share", room, "--relay", base, "--with", "bob", "--role", "reader", tok=None)
    assert unset.returncode == 1 and "CRDTCHAT_TOKEN" in unset.stderr


async def test_members_reach_the_rooms_files_with_their_identity_tokens(
    relay: RelayProcess,
) -> None:
    room = "shared-files"
    alice, bob = identity_token("alice"), identity_token("bob")
    body = b"a file shared with members"
    sha = hashlib.sha256(body).hexdigest()
    url = f"{relay.http_url}/blobs/{room}/{sha}"

    def with_file(doc: Doc) -> None:
        ref = [{"sha256": sha, "name": "f.txt", "mime": "text/plain", "size": len(body)}]
        fields = {"id": "m1", "role": "user", "author": "alice", "parent": None}
        message = Map({**fields, "created_at": 0.0, "content": Text("see"), "files": ref})
        doc.get(schema.MESSAGES, type=Array).append(message)

    async with raw_client(relay.url(room, alice, ack=True)) as owner:
        put = httpx.put(url, content=body, headers={"Authorization": f"Bearer {alice}"})
        assert put.status_code == 201, put.text
        await owner.push(with_file)
        await owner.wait_acked()
        assert owner.denied == []
    membership.share(relay.ws_base, room, alice, "bob", "reader")
    got = httpx.get(url, headers={"Authorization": f"Bearer {bob}"}, timeout=30)
    assert got.status_code == 200 and got.content == body
    refused = httpx.put(url, content=body, headers={"Authorization": f"Bearer {bob}"})
    assert refused.status_code == 403  # a reader uploads nothing
    membership.unshare(relay.ws_base, room, alice, "bob")
    gone = httpx.get(url, headers={"Authorization": f"Bearer {bob}"}, timeout=30)
    assert gone.status_code == 403 and "bob is not a member" in gone.text
