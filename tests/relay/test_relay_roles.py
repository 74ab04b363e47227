"""Refused writes end to end: the sender is told and stays, nobody else notices, none stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from pycrdt import Doc, Map, Text

from crdtchat import schema
from crdtchat.wire import SyncUpdate
from tests.support.relay import (
    RawClient,
    RelayProcess,
    declare_roots,
    message_map,
    metric,
    raw_client,
    token,
)

pytestmark = pytest.mark.anyio


def url(relay: RelayProcess, room: str, sub: str, role: str = "writer", ack: bool = True) -> str:
    return relay.url(room, token(room, role, sub), ack=ack)


async def expect_only_next_update(observer: RawClient, alice: RawClient, marker: str) -> None:
    """alice sends an accepted update; it must be the very next thing `observer` receives."""
    seen = len(observer.received)
    await alice.push(lambda doc: alice.messages.append(message_map(marker, "user", "alice", "ok")))
    await observer.wait_for(lambda: len(observer.received) > seen)
    new = observer.received[seen:]
    assert len(new) == 1 and isinstance(new[0], SyncUpdate), new
    assert marker.encode() in new[0].update


async def test_refused_writes_leave_no_trace(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data").start()
    room = "roles"
    try:
        async with (
            raw_client(url(relay, room, "alice")) as alice,
            raw_client(url(relay, room, "bob")) as bob,
            raw_client(url(relay, room, "viewer", "reader")) as viewer,
            raw_client(url(relay, room, "w1", "worker")) as worker,
            raw_client(url(relay, room, "carol", ack=False)) as carol,
        ):
            await alice.push(
                lambda doc: alice.messages.append(message_map("m1", "user", "alice", "hello"))
            )
            for client in (bob, viewer, worker, carol):
                await client.wait_for(lambda client=client: len(client.messages) == 1)
            refused_before = metric(relay, "crdtchat_refused_writes_total")

            attempts = [
                (
                    bob,
                    lambda doc: bob.messages.append(message_map("x1", "user", "alice", "forged")),
                ),
                (
                    bob,
                    lambda doc: bob.messages.append(message_map("x2", "assistant", "bob", "fake")),
                ),
                (bob, lambda doc: bob.roots[schema.DERIVED].__setitem__("e", {"kind": "usage"})),
                (bob, lambda doc: _append_text(bob.messages[0], " (edited by bob)")),
                (bob, lambda doc: bob.messages.__delitem__(0)),
                (viewer, lambda doc: viewer.roots[schema.READ].__setitem__("viewer", "m1")),
                (worker, lambda doc: worker.roots[schema.META].__setitem__("title", "mine")),
            ]
            for number, (client, change) in enumerate(attempts):
                denied = len(client.denied)
                await client.push(change)
                await client.wait_for(lambda client=client, d=denied: len(client.denied) > d)
                await client.wait_acked()
                # Whoever else is connected sees nothing of it: the next thing they receive is
                # the next accepted update.
                await expect_only_next_update(carol, alice, f"ok{number}")
            assert metric(relay, "crdtchat_refused_writes_total") == refused_before + len(attempts)
            # The refused clients kept their connections and may still write within their role.
            # Bob's own document still holds his refused changes, and a new change made on top
            # of them depends on them, so the relay refuses that too until bob drops them:
            await bob.push(lambda doc: bob.messages.append(message_map("b0", "user", "bob", "no")))
            await bob.wait_for(lambda: len(bob.denied) == 6)
            assert "does not have" in bob.denied[-1]
            # A change made on the relay's state goes through on the same connection.
            clean: Doc = Doc()
            clean_roots = declare_roots(clean)
            clean.apply_update(carol.doc.get_update())
            before = clean.get_state()
            clean_roots[schema.MESSAGES].append(message_map("b1", "user", "bob", "hi"))  # type: ignore[union-attr]
            await bob.send(SyncUpdate(clean.get_update(before)))
            await alice.wait_for(lambda: any(m["id"] == "b1" for m in alice.messages.to_py()))
            assert not bob.closed and not viewer.closed and not worker.closed
        relay.kill()
        relay.start()
        async with raw_client(url(relay, room, "carol", "reader")) as fresh:
            ids = [m["id"] for m in fresh.messages.to_py()]
            assert ids == ["m1", *(f"ok{n}" for n in range(len(attempts))), "b1"]
            assert str(fresh.messages[0]["content"]) == "hello"
            assert fresh.roots[schema.DERIVED].to_py() == {}
            assert fresh.roots[schema.READ].to_py() == {}
            assert "title" not in fresh.roots[schema.META].to_py()
    finally:
        relay.stop()


def _append_text(message: Map, suffix: str) -> None:
    text = message["content"]
    assert isinstance(text, Text)
    text += suffix


async def test_early_updates_are_refused_and_not_integrated_later(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data").start()
    room = "early"
    try:
        async with (
            raw_client(url(relay, room, "alice")) as alice,
            raw_client(url(relay, room, "bob")) as bob,
        ):
            offline: Doc = Doc()
            roots = declare_roots(offline)
            offline.apply_update(alice.doc.get_update())
            state = offline.get_state()
            roots[schema.MESSAGES].append(message_map("p1", "user", "alice", "one"))  # type: ignore[union-attr]
            first = offline.get_update(state)
            state = offline.get_state()
            _append_text(roots[schema.MESSAGES][0], " two")  # type: ignore[index]
            second = offline.get_update(state)
            await alice.send(SyncUpdate(second))
            await alice.wait_for(lambda: alice.denied != [])
            assert "does not have" in alice.denied[0]
            await alice.send(SyncUpdate(first))
            await bob.wait_for(lambda: len(bob.messages) == 1)
            await alice.wait_acked()
            # Had `second` been held back inside the relay, `first` would have completed it.
            assert str(bob.messages[0]["content"]) == "one"
    finally:
        relay.stop()
