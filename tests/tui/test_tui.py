"""The terminal chat client, driven headless through Textual's Pilot.

Single-client tests share one in-process document between the app and the worker's
`Conversation` (the worker code writes into it exactly as it does over a relay). The model is
a scripted stand-in, the external boundary; the worker's own turn logic is the real one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from pycrdt import Doc
from textual.widgets import Input

from crdtchat.document import Conversation
from crdtchat.providers.base import Finished, TextDelta, TurnEvent, TurnRequest
from crdtchat.replica import Backoff, Replica
from crdtchat.schema import ModelRef, assistant_turn_id
from crdtchat.tui.app import ChatApp
from crdtchat.tui.blobs import BlobUploader, blob_url
from crdtchat.tui.link import DetachedLink, ReplicaLink
from crdtchat.worker.room import unwatch, watch
from crdtchat.worker.turn import Changes, TurnSettings, serve_turn
from tests.support.relay import RelayProcess, running_relay, token
from tests.support.tui import line, submit, thread_texts, until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MODEL = ModelRef(provider="scripted", api="test", model="m")


class ScriptedModel:
    """Yields the pieces it is given, then waits for `release` (if any) before finishing."""

    name = "scripted"
    api = "test"

    def __init__(self, pieces: list[str], *, release: anyio.Event | None = None) -> None:
        self.pieces = pieces
        self.release = release

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        for piece in self.pieces:
            yield TextDelta(piece)
        if self.release is not None:
            await self.release.wait()
        yield Finished(status="complete")


def make_app(conversation: Conversation, device: str = "laptop") -> ChatApp:
    return ChatApp(conversation, DetachedLink(conversation.doc), room="room-1", device=device)


async def test_sending_appends_a_message_and_clears_the_composer() -> None:
    conversation = Conversation.create(author="alice")
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await pilot.press(*"hello there")
        assert conversation.draft() == "hello there"  # the composer is the shared draft
        await pilot.press("enter")
        await pilot.pause()

        [message] = conversation.current_thread()
        assert (message.role, message.author, message.content) == ("user", "alice", "hello there")
        assert app.query_one("#composer").value == ""
        assert conversation.draft() == ""
        assert thread_texts(app)[0].startswith("#1 you")
        assert thread_texts(app)[0].endswith("hello there")
        assert conversation.read_mark("alice") == message.id

        await submit(pilot, "and more")
        assert [m.content for m in conversation.current_thread()] == ["hello there", "and more"]
        assert len(thread_texts(app)) == 2


async def test_streaming_reply_grows_then_becomes_the_committed_message() -> None:
    conversation = Conversation.create(author="alice")
    worker = Conversation(conversation.doc, author="worker-1")
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await submit(pilot, "tell me a story")
        [question] = conversation.current_thread()
        turn = assistant_turn_id(question.id, 1)

        worker.start_stream(turn, parent=question.id)
        await until(app, lambda: len(thread_texts(app)) == 2)
        assert "writing…" in thread_texts(app)[1]
        seen = ""
        for piece in ("Once", " upon", " a time"):
            worker.append_stream(turn, piece)
            seen += piece
            await until(app, lambda seen=seen: thread_texts(app)[-1].endswith(seen + "▌"))

        worker.commit_turn(question.id, turn, model=MODEL, status="complete")
        await until(app, lambda: "writing…" not in thread_texts(app)[-1])
        texts = thread_texts(app)
        assert len(texts) == 2  # the stream turned into the message; nothing shows twice
        assert texts[1].startswith("#2 assistant · scripted/m")
        assert texts[1].endswith("Once upon a time")


async def test_regenerate_asks_for_another_answer_and_shows_it() -> None:
    conversation = Conversation.create(author="alice")
    worker = Conversation(conversation.doc, author="worker-1")
    question = conversation.append("user", "pick a number")
    first = worker.commit_turn(
        question.id, assistant_turn_id(question.id, 1), model=MODEL, status="complete", content="4"
    )
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await until(app, lambda: len(thread_texts(app)) == 2)
        await submit(pilot, "/regen")
        assert conversation.regenerate_requests()[question.id].n == 2
        assert "asked for answer 2 to #1" in line(app, "notice")

        [waiting] = worker.waiting_for_reply()
        assert waiting.answer_number == 2
        second = await serve_turn(
            worker, waiting, ScriptedModel(["7"]), model="m", changes=Changes()
        )
        assert second is not None and second.id != first.id
        await until(app, lambda: thread_texts(app)[-1].endswith("\n7"))
        assert "[branch 2/2]" in thread_texts(app)[-1]
        assert question.id not in conversation.regenerate_requests()

        # the key binding does the same
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert conversation.regenerate_requests()[question.id].n == 3


async def test_cancel_stops_the_reply_being_streamed() -> None:
    conversation = Conversation.create(author="alice")
    worker = Conversation(conversation.doc, author="worker-1")
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await submit(pilot, "/cancel")
        assert "no reply is being written" in line(app, "notice")  # an error, shown

        await submit(pilot, "write forever")
        [waiting] = worker.waiting_for_reply()
        changes = Changes()
        subscription = worker.cancels.observe(lambda _event: changes.notify())
        result = []
        async with anyio.create_task_group() as tasks:

            async def run_worker() -> None:
                model = ScriptedModel(["partial answer"], release=anyio.Event())
                result.append(await serve_turn(worker, waiting, model, model="m", changes=changes))

            tasks.start_soon(run_worker)
            await until(app, lambda: thread_texts(app)[-1].endswith("partial answer▌"))
            await pilot.press("ctrl+g")
            await until(app, lambda: "cancel requested" in line(app, "notice"))
        worker.cancels.unobserve(subscription)

        [message] = result
        assert message is not None and message.status == "cancelled"
        assert message.content == "partial answer"
        await until(app, lambda: "cancelled" in thread_texts(app)[-1])
        assert thread_texts(app)[-1].startswith("#2 assistant")


async def test_branch_and_switch_between_branches() -> None:
    conversation = Conversation.create(author="alice")
    worker = Conversation(conversation.doc, author="worker-1")

    def answer(question_id: str, text: str) -> None:
        worker.commit_turn(
            question_id,
            assistant_turn_id(question_id, 1),
            model=MODEL,
            status="complete",
            content=text,
        )

    q1 = conversation.append("user", "first question")
    answer(q1.id, "first answer")
    q2 = conversation.append("user", "second question")
    answer(q2.id, "second answer")

    app = make_app(conversation)
    async with app.run_test() as pilot:
        await until(app, lambda: len(thread_texts(app)) == 4)

        await submit(pilot, "/branch 2 nope")  # #2 is the assistant's
        assert "only user messages can be edited" in line(app, "notice")

        # edit #3 in the composer: it is loaded, changed and sent as a sibling of #3
        await submit(pilot, "/branch 3")
        assert app.query_one("#composer").value == "second question"
        assert "editing #3" in line(app, "status")
        await pilot.press(*" (reworded)", "enter")
        await pilot.pause()
        edited = conversation.current_thread()[-1]
        assert edited.content == "second question (reworded)"
        assert edited.parent == q2.parent
        await until(app, lambda: len(thread_texts(app)) == 3)
        assert "[branch 2/2]" in thread_texts(app)[-1]
        answer(edited.id, "reworded answer")
        await until(app, lambda: thread_texts(app)[-1].endswith("reworded answer"))

        # /branches lists the two leaves, the shown one marked
        await submit(pilot, "/branches")
        listing = line(app, "notice").splitlines()
        assert listing[0].startswith(" 1. 4 messages") and "second answer" in listing[0]
        assert listing[1].startswith("*2. 4 messages") and "reworded answer" in listing[1]

        # /switch 1: the old branch, a local view choice that new messages follow
        await submit(pilot, "/switch 1")
        await until(app, lambda: thread_texts(app)[-1].endswith("second answer"))
        assert "branch view" in line(app, "status")
        await submit(pilot, "follow-up on the old branch")
        follow_up = conversation.current_thread()[-1]
        assert follow_up.parent == assistant_turn_id(q2.id, 1)
        worker.append("user", "someone else's newer thread", parent=q1.id)
        answer(follow_up.id, "old branch continues")
        await until(app, lambda: thread_texts(app)[-1].endswith("old branch continues"))
        assert len(thread_texts(app)) == 6

        # /follow: back to the shared default, the thread ending at the newest leaf
        await submit(pilot, "/follow")
        await until(app, lambda: thread_texts(app)[-1].endswith("old branch continues"))
        await submit(pilot, "/switch 9")
        assert "there are" in line(app, "notice")


async def test_settings_export_and_errors_are_shown_not_raised(tmp_path: Path) -> None:
    conversation = Conversation.create(author="alice")
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await submit(pilot, "/model gpt-test")
        await submit(pilot, "/provider openai")
        assert (conversation.settings.provider, conversation.settings.model) == (
            "openai",
            "gpt-test",
        )
        await until(app, lambda: "model: openai/gpt-test" in line(app, "header"))

        await submit(pilot, "/frobnicate")
        assert "unknown command /frobnicate" in line(app, "notice")
        assert app.query_one("#composer").value == "/frobnicate"  # kept, to be corrected
        await pilot.press("ctrl+u")

        await submit(pilot, "a message")
        target = tmp_path / "out.json"
        await submit(pilot, f"/export {target}")
        exported = json.loads(target.read_text())
        assert [m["content"] for m in exported["messages"]] == ["a message"]
        assert "exported 1 messages" in line(app, "notice")

        await submit(pilot, f"/export {tmp_path}/missing/dir/out.json")
        assert "No such file or directory" in line(app, "notice")
        await submit(pilot, "/attach /nonexistent")
        assert "need a relay" in line(app, "notice")
        assert app.is_running


# -- two clients through one real relay subprocess ------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(tmp_path_factory.mktemp("relay") / "data") as process:
        yield process


FAST_RETRY = Backoff(initial=0.05, maximum=0.2)


@asynccontextmanager
async def device(
    relay: RelayProcess, room: str, store: Path, *, sub: str, name: str
) -> AsyncIterator[tuple[ChatApp, Replica]]:
    """One client device: a Replica with its own SQLite file, and the app on top of it."""
    conversation = Conversation(author=sub)
    url = f"ws://{relay.host}:{relay.port}"
    async with Replica(
        url, room, token(room, sub=sub), doc=conversation.doc, store_path=store, backoff=FAST_RETRY
    ) as replica:
        app = ChatApp(
            conversation,
            ReplicaLink(replica),
            room=room,
            device=name,
            uploader=BlobUploader(url, room, token(room, sub=sub)),
        )
        yield app, replica


async def test_presence_shows_my_other_device_and_other_people(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "presence-1"
    async with (
        device(relay, room, tmp_path / "laptop.sqlite", sub="alice", name="laptop") as (a, _),
        device(relay, room, tmp_path / "phone.sqlite", sub="alice", name="phone") as (b, _),
        a.run_test() as pilot_a,
        b.run_test() as pilot_b,
    ):
        url = f"ws://{relay.host}:{relay.port}"
        async with Replica(url, room, token(room, sub="bob"), doc=Doc()) as bob:
            bob.set_presence(user="bob", device="desk", typing=False)
            await until(a, lambda: "bob@desk" in line(a, "presence"))
            assert line(a, "presence").startswith("you: laptop (here), phone")
            await until(b, lambda: line(b, "presence").startswith("you: phone (here), laptop"))

            await pilot_b.press("h", "i")  # typing on the phone shows on the laptop
            await until(a, lambda: "phone typing…" in line(a, "presence"))
            bob.set_presence(typing=True)
            await until(a, lambda: "bob@desk typing…" in line(a, "presence"))
        await until(a, lambda: "bob" not in line(a, "presence"))  # bob left
        await pilot_a.pause()


async def test_draft_moves_between_two_devices_of_one_person(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "draft-1"
    async with (
        device(relay, room, tmp_path / "laptop.sqlite", sub="alice", name="laptop") as (a, _),
        device(relay, room, tmp_path / "phone.sqlite", sub="alice", name="phone") as (b, _),
        a.run_test() as pilot_a,
        b.run_test() as pilot_b,
    ):
        await pilot_a.press(*"half a tho")
        composer_b = b.query_one("#composer", Input)
        await until(b, lambda: composer_b.value == "half a tho")

        await pilot_b.press(*"ught")  # the phone carries on where the laptop stopped
        composer_a = a.query_one("#composer", Input)
        await until(a, lambda: composer_a.value == "half a thought")
        await pilot_b.press("enter")
        await until(a, lambda: len(thread_texts(a)) == 1)
        assert thread_texts(a)[0].endswith("half a thought")
        assert a.conversation.current_thread()[0].author == "alice"
        await until(a, lambda: composer_a.value == "")
        assert b.conversation.draft() == ""


async def test_offline_indicator_counts_pending_updates_until_stored(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "offline-1"
    async with (
        device(relay, room, tmp_path / "laptop.sqlite", sub="alice", name="laptop") as (
            app,
            replica,
        ),
        app.run_test() as pilot,
    ):
        await until(app, lambda: line(app, "status").startswith("online · all stored"))
        relay.kill()
        try:
            await until(app, lambda: line(app, "status").startswith("offline"))
            await submit(pilot, "written on the train")
            await submit(pilot, "and another")
            pending = replica.status.pending
            assert pending > 0
            await until(app, lambda: line(app, "status").startswith(f"offline · {pending} pending"))
        finally:
            relay.start()
        await until(app, lambda: line(app, "status").startswith("online · all stored"))
        assert replica.status.pending == 0


async def test_attach_uploads_to_the_relay_and_the_next_message_carries_the_file(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "attach-1"
    payload = tmp_path / "notes.txt"
    payload.write_bytes(b"some notes\n")
    async with (
        device(relay, room, tmp_path / "laptop.sqlite", sub="alice", name="laptop") as (
            app,
            replica,
        ),
        app.run_test() as pilot,
    ):
        await submit(pilot, f"/attach {payload}")
        await until(app, lambda: "attached: notes.txt" in line(app, "status"))
        await submit(pilot, "see the file")
        [message] = app.conversation.current_thread()
        [ref] = message.files or ()
        assert (ref.name, ref.size, ref.mime) == ("notes.txt", 11, "text/plain")
        # The relay serves a room's blob once a message there references it.
        await replica.wait_until(lambda s: s.durable, timeout=30)
        async with httpx.AsyncClient() as client:
            response = await client.get(
                blob_url(relay.http_url, room, ref.sha256), params={"token": token(room)}
            )
        assert response.content == b"some notes\n"
        await until(app, lambda: "📎 notes.txt" in thread_texts(app)[0])


class GatedModel:
    """Yields each piece only when the test opens its gate, so every stage can be looked at."""

    name = "scripted"
    api = "test"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.gates = [anyio.Event() for _ in pieces]
        self.finish = anyio.Event()

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        for piece, gate in zip(self.pieces, self.gates, strict=True):
            await gate.wait()
            yield TextDelta(piece)
        await self.finish.wait()
        yield Finished(status="complete")


async def test_reply_streams_in_from_a_worker_peer_through_the_relay(
    relay: RelayProcess, tmp_path: Path
) -> None:
    room = "stream-1"
    url = f"ws://{relay.host}:{relay.port}"
    worker = Conversation(author="worker-1")
    changes = Changes()
    async with (
        device(relay, room, tmp_path / "laptop.sqlite", sub="alice", name="laptop") as (app, _),
        Replica(url, room, token(room, "worker", sub="worker-1"), doc=worker.doc),
        app.run_test() as pilot,
    ):
        subscriptions = watch(worker, changes)
        await submit(pilot, "say hello")
        with anyio.fail_after(10):
            while not worker.waiting_for_reply():
                await changes.wait()
        [waiting] = worker.waiting_for_reply()
        model = GatedModel(["Hel", "lo ", "world"])
        async with anyio.create_task_group() as tasks:

            async def run_worker() -> None:
                await serve_turn(
                    worker,
                    waiting,
                    model,
                    model="m",
                    changes=changes,
                    settings=TurnSettings(flush_interval=0.02),
                )

            tasks.start_soon(run_worker)
            shown = ""
            for piece, gate in zip(model.pieces, model.gates, strict=True):
                gate.set()
                shown += piece
                await until(app, lambda shown=shown: thread_texts(app)[-1].endswith(shown + "▌"))
            model.finish.set()
        unwatch(subscriptions)
        await until(app, lambda: thread_texts(app)[-1].startswith("#2 assistant"))
        assert thread_texts(app)[-1].endswith("Hello world")
        assert len(thread_texts(app)) == 2


async def test_a_reader_token_reads_and_switches_but_writes_nothing() -> None:
    conversation = Conversation.create(author="carol")
    conversation.append("user", "someone else's question")
    before = conversation.encode_state()
    app = ChatApp(
        conversation, DetachedLink(conversation.doc), room="room-1", device="tv", read_only=True
    )
    async with app.run_test() as pilot:
        await until(app, lambda: len(thread_texts(app)) == 1)
        await submit(pilot, "let me in")
        assert "read-only" in line(app, "notice")
        await submit(pilot, "/branches")
        assert line(app, "notice").startswith("*1. 1 messages")
    assert conversation.encode_state() == before  # not even a draft or a read mark


async def test_the_header_shows_the_workers_title_until_the_person_sets_one() -> None:
    conversation = Conversation.create(author="alice")
    worker = Conversation(conversation.doc, author="worker-1")
    app = make_app(conversation)
    async with app.run_test() as pilot:
        await submit(pilot, "How do I bake sourdough bread at home?")
        [waiting] = worker.waiting_for_reply()
        model = ScriptedModel(["**Sourdough at home**"])  # the answer, then the title
        await serve_turn(worker, waiting, model, model="m", changes=Changes())
        await until(app, lambda: "room-1 · Sourdough at home · model" in line(app, "header"))
        Conversation(conversation.doc, author="alice-phone").set_title("Rye bread")
        await until(app, lambda: "room-1 · Rye bread · model" in line(app, "header"))
        assert "Sourdough" not in line(app, "header")
