"""Whether a room waits for a reply, as the relay records it for the worker feed (design §5).

A cluster node does not look at updates another node stored (`CheckWaiting(judged_here=False)`):
that node records the room's state. The watch must then record afresh at its own next write,
whatever it recorded before, or a change the other node recorded in between is never undone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crdtchat.document import Conversation
from crdtchat.relay.feed import WaitingFeed, WaitingWatch
from crdtchat.relay.store import Store
from crdtchat.schema import ModelRef

MODEL = ModelRef(provider="openai", api="responses", model="gpt-4.1")

pytestmark = pytest.mark.anyio


async def test_after_updates_stored_elsewhere_the_next_check_records_the_room_afresh(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path) as store:
        feed = WaitingFeed(store)
        watch = WaitingWatch("room", feed)
        person = Conversation(author="alice")
        worker = Conversation(author="worker", role="worker")

        question = person.append("user", "first question")
        watch.check(person.doc)  # judged here: the room waits
        assert await store.waiting_rooms() == ["room"]

        # Another node stores the answer and records that the room no longer waits.
        worker.doc.apply_update(person.doc.get_update())
        before = worker.doc.get_state()
        worker.commit_turn(
            question.id, "turn-1", model=MODEL, content="an answer", status="complete"
        )
        person.doc.apply_update(worker.doc.get_update(before))
        watch.stored_elsewhere()
        await store.set_waiting("room", False)

        person.append("user", "second question")
        watch.check(person.doc)  # judged here again: the room waits again
        assert await store.waiting_rooms() == ["room"], "the second question was not recorded"
