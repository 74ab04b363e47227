"""The terminal client and the replica's stores: the saved screen shown before the document
has loaded, /recover after the relay refused a write, and the status line while the local
file refuses writes (through a real relay)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Map

from crdtchat.document import Conversation
from crdtchat.local_store import LocalStore, SaveView
from crdtchat.replica import Backoff, Replica
from crdtchat.tui.app import ChatApp
from crdtchat.tui.link import DetachedLink, ReplicaLink
from crdtchat.tui.main import saved_screen
from tests.support.faults import Immutable, immutable_stops_open_writers
from tests.support.relay import RelayProcess, running_relay, token
from tests.support.tui import line, submit, thread_texts, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_the_saved_screen_shows_until_the_document_arrives(tmp_path: Path) -> None:
    earlier = Conversation.create(author="alice")
    for i in range(80):
        earlier.append("user", f"line {i}")
    path = tmp_path / "r.db"
    with LocalStore(path) as store:
        store.write([SaveView(earlier.view.snapshot().encode())])
    preview = saved_screen(path)
    assert preview is not None

    conversation = Conversation(author="alice")  # nothing loaded yet
    app = ChatApp(
        conversation, DetachedLink(conversation.doc), room="r", device="d", preview=preview
    )
    async with app.run_test():
        await until(app, lambda: len(thread_texts(app)) > 0)
        texts = thread_texts(app)
        assert texts[-1].startswith("#80 you") and texts[-1].endswith("line 79")
        assert conversation.read_mark("alice") is None  # a preview marks nothing read

        conversation.doc.apply_update(earlier.encode_state())  # the replica has loaded
        conversation.append("user", "newer than the saved screen")
        await until(app, lambda: thread_texts(app)[-1].endswith("newer than the saved screen"))
        assert app.preview is None

    with LocalStore(path) as store:
        store.write([SaveView(b"not a snapshot")])
    assert saved_screen(path) is None
    assert saved_screen(tmp_path / "missing.db") is None


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    with running_relay(tmp_path / "relay-data") as process:
        yield process


async def test_recover_after_a_refused_write_reloads_and_offers_the_text_again(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "tui-recover"
    conversation = Conversation(author="alice")  # no role: nothing refused up front
    async with Replica(
        f"ws://{relay.host}:{relay.port}",
        room,
        token(room, sub="alice"),
        doc=conversation.doc,
        store_path=tmp_path / "alice.db",
        view=conversation.view,
        backoff=Backoff(initial=0.05, maximum=0.2),
    ) as replica:
        app = ChatApp(conversation, ReplicaLink(replica), room=room, device="laptop")
        async with app.run_test() as pilot:
            await submit(pilot, "first")
            await replica.wait_until(lambda s: s.durable and s.synced, timeout=30)
            # A write a writer may not make: the relay refuses it, the replica is blocked.
            conversation.messages.append(
                Map({"id": "x", "role": "assistant", "author": "alice", "content": "nope"})
            )
            await replica.wait_until(lambda s: s.blocked, timeout=30)
            await submit(pilot, "sent while blocked")
            await until(app, lambda: "/recover" in line(app, "status"))

            await submit(pilot, "/recover")
            await until(app, lambda: "dropped" in line(app, "notice"))
            assert app.conversation is not conversation
            assert app.query_one("#composer").value == "sent while blocked"
            assert [t.split("\n")[-1] for t in thread_texts(app)] == ["first"]

            await submit(pilot, "sent after recovering")
            status = await replica.wait_until(lambda s: s.durable, timeout=30)
            assert not status.blocked and status.denied is None
            await until(app, lambda: len(thread_texts(app)) == 2)
            assert "/recover" not in line(app, "status")


async def test_the_status_line_says_when_the_local_file_refuses_writes(
    relay: RelayProcess, tmp_path: Path
) -> None:
    why_not = immutable_stops_open_writers(tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    room = "tui-store-fault"
    path = tmp_path / "alice.db"
    conversation = Conversation(author="alice", role="writer")
    async with Replica(
        f"ws://{relay.host}:{relay.port}",
        room,
        token(room, "writer", "alice"),
        doc=conversation.doc,
        store_path=path,
        view=conversation.view,
        backoff=Backoff(initial=0.05, maximum=0.2),
        store_retry=Backoff(initial=0.05, maximum=0.2),
    ) as replica:
        app = ChatApp(conversation, ReplicaLink(replica), room=room, device="laptop")
        with Immutable(path, path.with_name(f"{path.name}-wal")) as fault:
            async with app.run_test() as pilot:
                await submit(pilot, "first")
                await replica.wait_until(lambda s: s.durable and s.unsaved == 0, timeout=30)
                fault.inject()
                await submit(pilot, "while the disk fails")
                await until(app, lambda: "local file not written" in line(app, "status"))
                assert "disk I/O error" in line(app, "status")
                await replica.wait_until(lambda s: s.durable, timeout=30)  # the relay has it

                fault.clear()
                await replica.wait_until(lambda s: s.store_error is None, timeout=30)
                await until(app, lambda: "local file" not in line(app, "status"))
