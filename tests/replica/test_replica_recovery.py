"""A replica whose write the relay refused is blocked (its later writes build on the refused
one); `Replica.recover` drops the refused changes, reloads from the relay, keeps the draft and
the unsent texts, and tells the person. Through a real relay subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from pycrdt import Map, Text

from crdtchat.document import Conversation
from crdtchat.replica import Backoff, Replica
from crdtchat.schema import DRAFTS
from tests.support.relay import RelayProcess, raw_client, running_relay, token

ROOM = "recover-1"


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    with running_relay(tmp_path / "relay-data") as process:
        yield process


def _replica(relay: RelayProcess, path: Path, doc: object = None) -> Replica:
    return Replica(
        f"ws://{relay.host}:{relay.port}",
        ROOM,
        token(ROOM, "writer", "ann"),
        doc=doc,  # type: ignore[arg-type]
        store_path=path,
        backoff=Backoff(initial=0.05, maximum=0.5),
    )


def _draft(conversation: Conversation, text: str) -> None:
    drafts = conversation.doc.get(DRAFTS, type=Map)
    current = drafts.get("ann")
    if isinstance(current, Text):
        with conversation.doc.transaction():
            del current[:]
            current += text
    else:
        drafts["ann"] = Text(text)


@pytest.mark.anyio
async def test_a_refused_write_blocks_until_recover_then_writes_are_accepted(
    relay: RelayProcess, tmp_path: Path
) -> None:
    path = tmp_path / "ann.db"
    # No role given: this Conversation does not refuse up front what the relay will refuse.
    conversation = Conversation(author="ann")
    async with _replica(relay, path, conversation.doc) as rep:
        await rep.wait_until(lambda s: s.synced, timeout=30)
        first = conversation.append("user", "stored before the trouble")
        _draft(conversation, "an old draft")
        await rep.wait_until(lambda s: s.durable, timeout=30)

        # A writer may not write assistant messages: refused as a whole.
        conversation.append("assistant", "not mine to write", status="complete")
        status = await rep.wait_until(lambda s: s.blocked, timeout=30)
        assert status.denied is not None
        # Later writes build on the refused one: refused too, the replica stays blocked.
        conversation.append("user", "written while blocked")
        _draft(conversation, "half-typed while blocked")
        await rep.wait_until(lambda s: s.refused >= 3, timeout=30)
        assert rep.status.pending >= 3

        recovery = await rep.recover(timeout=30)
        assert rep.doc is recovery.doc
        status = rep.status
        assert not status.blocked and status.pending <= 1 and status.denied is None
        assert status.notice is not None and "dropped" in status.notice
        assert recovery.dropped >= 3
        assert set(recovery.unsent) == {"not mine to write", "written while blocked"}
        assert recovery.draft_kept

        fresh = Conversation(recovery.doc, author="ann")
        assert [m.content for m in fresh.all_messages()] == ["stored before the trouble"]
        assert str(fresh.drafts.get("ann")) == "half-typed while blocked"
        fresh.append("user", "after the recovery", parent=first.id)
        status = await rep.wait_until(lambda s: s.durable, timeout=30)
        assert status.denied is None and not status.blocked

    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
        assert observer.texts() == ["stored before the trouble", "after the recovery"]
        assert str(observer.roots[DRAFTS]["ann"]) == "half-typed while blocked"

    # The local file was replaced too: a re-open holds no trace of the refused writes.
    reopened = Conversation(author="ann")
    async with _replica(relay, path, reopened.doc) as rep:
        assert [m.content for m in reopened.all_messages()] == [
            "stored before the trouble",
            "after the recovery",
        ]
        status = await rep.wait_until(lambda s: s.synced and s.durable, timeout=30)
        assert not status.blocked
