"""The view snapshot a replica keeps for an instant re-open: shown first, never trusted over the
document (a stale or corrupt one is ignored), and the view's fast path when a whole stored
document arrives under an open Conversation."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdtchat.document import Conversation
from crdtchat.local_store import AppendRemote, LocalStore, SaveView, read_view
from crdtchat.replica import Backoff, Replica
from crdtchat.view import SNAPSHOT_TAIL, SnapshotError, ViewSnapshot, state_key
from tests.support.relay import RelayProcess, running_relay, token

ROOM = "snap-1"


def _chat(count: int) -> Conversation:
    conversation = Conversation.create(author="ann", clock=lambda: 1.7e9)
    with conversation.doc.transaction():
        for i in range(count):
            conversation.append("user", f"line {i} ✓ 😀")
    return conversation


def test_snapshot_holds_the_end_of_the_current_thread_and_round_trips() -> None:
    conversation = _chat(SNAPSHOT_TAIL + 30)
    snapshot = conversation.view.snapshot()
    thread = conversation.current_thread()
    assert snapshot.thread_length == len(thread)
    assert list(snapshot.tail) == thread[-SNAPSHOT_TAIL:]
    decoded = ViewSnapshot.decode(snapshot.encode())
    assert decoded == snapshot
    assert decoded.matches(conversation.doc)


def test_snapshot_of_another_branch_follows_the_current_thread() -> None:
    conversation = _chat(3)
    first = conversation.all_messages()[0]
    branch = conversation.append("user", "a new branch", parent=first.id)
    assert [m.id for m in conversation.view.snapshot().tail] == [first.id, branch.id]


def test_any_flipped_byte_makes_the_snapshot_unreadable() -> None:
    data = _chat(5).view.snapshot().encode()
    for position in (0, 40, len(data) // 2, len(data) - 1):
        broken = bytearray(data)
        broken[position] ^= 0x01
        with pytest.raises(SnapshotError):
            ViewSnapshot.decode(bytes(broken))
    with pytest.raises(SnapshotError):
        ViewSnapshot.decode(data[:20])


def test_the_key_changes_with_any_change_even_a_deletion_alone() -> None:
    conversation = _chat(3)
    snapshot = conversation.view.snapshot()
    conversation.edit_text(conversation.all_messages()[0].id, "edited")
    assert not snapshot.matches(conversation.doc)

    # A deletion advances no clock: the state vector stays, the key must not.
    conversation = _chat(3)
    before = conversation.doc.get_state()
    snapshot = conversation.view.snapshot()
    del conversation.messages[2]
    assert conversation.doc.get_state() == before
    assert not snapshot.matches(conversation.doc)


def test_the_key_survives_a_round_trip_through_the_local_store(tmp_path: Path) -> None:
    conversation = _chat(50)
    conversation.edit_text(conversation.all_messages()[3].id, "shorter")  # some deletions
    with LocalStore(tmp_path / "r.db", compact_every=2) as store:
        store.write([AppendRemote(conversation.encode_state())])
        store.write([AppendRemote(conversation.encode_state())])  # compacts (GC)
        assert store.log_rows == 1
        reopened = Conversation.from_update(store.load().update, author="ann")
    assert state_key(reopened.doc) == state_key(conversation.doc)


def test_a_stored_document_arriving_under_an_open_view_is_read_whole() -> None:
    source = _chat(300)
    opened = Conversation(author="ann")  # as `crdtchat chat` does before the replica loads
    changes: list[int] = []
    opened.on_messages_change(lambda: changes.append(len(opened)))
    opened.doc.apply_update(source.encode_state())
    assert opened.current_thread() == source.current_thread()
    assert changes == [300]
    opened.append("user", "after")  # and the incremental path goes on from there
    assert len(opened.current_thread()) == 301


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_relay(tmp_path / "relay-data") as process:
        yield process


def _replica(relay: RelayProcess, path: Path, conversation: Conversation) -> Replica:
    return Replica(
        f"ws://{relay.host}:{relay.port}",
        ROOM,
        token(ROOM, "writer", "ann"),
        doc=conversation.doc,
        store_path=path,
        view=conversation.view,
        backoff=Backoff(initial=0.05, maximum=0.5),
    )


@pytest.mark.anyio
async def test_a_replica_reopens_from_its_snapshot_and_ignores_a_stale_one(
    relay: RelayProcess, tmp_path: Path
) -> None:
    path = tmp_path / "ann.db"
    assert read_view(path) is None
    conversation = Conversation(author="ann", role="writer")
    async with _replica(relay, path, conversation) as rep:
        for i in range(20):
            conversation.append("user", f"message {i}")
        await rep.wait_until(lambda s: s.durable and s.synced, timeout=30)
        assert rep.opening_snapshot is None
    shown = ViewSnapshot.decode(read_view(path) or b"")
    assert [m.content for m in shown.tail] == [f"message {i}" for i in range(20)]

    again = Conversation(author="ann", role="writer")
    async with _replica(relay, path, again) as rep:
        assert rep.opening_snapshot == shown
        assert rep.opening_snapshot_matched is True
        again.append("user", "one more")
        await rep.wait_until(lambda s: s.durable, timeout=30)

    # The file gains an update behind the snapshot's back (as after a crash between the two):
    # the stored snapshot no longer describes the document and is reported as stale.
    stale = read_view(path)
    extra = Conversation.from_update(again.encode_state(), author="ann")
    extra.append("user", "written elsewhere")
    with LocalStore(path) as store:
        store.write([AppendRemote(extra.encode_state()), SaveView(stale or b"")])
    third = Conversation(author="ann", role="writer")
    async with _replica(relay, path, third) as rep:
        assert rep.opening_snapshot is not None
        assert rep.opening_snapshot_matched is False
        assert third.current_thread()[-1].content == "written elsewhere"

    # A corrupt snapshot is ignored, and the document opens as always.
    with LocalStore(path) as store:
        store.write([SaveView(b"\x00" * 40)])
    fourth = Conversation(author="ann", role="writer")
    async with _replica(relay, path, fourth) as rep:
        assert rep.opening_snapshot is None
        assert fourth.current_thread()[-1].content == "written elsewhere"


@pytest.mark.anyio
async def test_a_closed_view_leaves_no_snapshot_that_claims_to_be_current(
    relay: RelayProcess, tmp_path: Path
) -> None:
    path = tmp_path / "ann.db"
    conversation = Conversation(author="ann", role="writer")
    async with _replica(relay, path, conversation) as rep:
        conversation.append("user", "seen by the view")
        await rep.wait_until(lambda s: s.durable, timeout=30)
        conversation.close()  # the view stops following; the document goes on
        Conversation(conversation.doc, author="ann").append("user", "not in the closed view")
        await rep.wait_until(lambda s: s.durable, timeout=30)
    data = read_view(path)
    if data is not None:  # one taken while the view was open is fine, if its key is old
        reopened = Conversation(author="ann", role="writer")
        async with _replica(relay, path, reopened) as rep:
            assert rep.opening_snapshot_matched is False
