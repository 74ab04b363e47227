"""The web client in real Chromium (Debian's, driven by Playwright), against a relay subprocess,
a worker subprocess on the loopback OpenAI server, and a Python replica.

Two browser contexts are two devices of one person (each has its own IndexedDB and
localStorage). Nothing is mocked: the relay is stopped with SIGKILL to cut the page off, since
`context.set_offline` holds websocket traffic back without closing the socket. The page's
Content-Security-Policy stays on, so the XSS test shows what a real page would run.

The browser is launched once for the module (tests/web/conftest.py). Chromium is installed
by `make test` (Makefile,
`browser`); these tests fail, never skip, when it is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from anyio.from_thread import BlockingPortal
from playwright.sync_api import Browser, expect

from crdtchat.document import Conversation
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.schema import assistant_turn_id
from crdtchat.tokens import LOCAL_ALGORITHM, LOCAL_AUDIENCE, LOCAL_ISSUER
from tests.support.browser import (
    PythonPeer,
    device,
    identity,
    list_page,
    open_page,
    wait_for_list,
)
from tests.support.relay import REPO, SECRET, RelayProcess, token

EVENT_DELAY = 0.15  # s between streamed words: a reply is seen streaming, and a reload lands in it
ROOM = "web-chat"


@pytest.fixture(scope="module")
def model() -> Iterator[OpenAILoopback]:
    with OpenAILoopback(event_delay=EVENT_DELAY) as server:
        yield server


@pytest.fixture(scope="module")
def worker(
    relay: RelayProcess, model: OpenAILoopback, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    env = {
        **os.environ,
        "CRDTCHAT_TOKEN": token("*", "worker", "worker-1"),
        "CRDTCHAT_SECRET": SECRET,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_KEY": "test",
        "PYTHONUNBUFFERED": "1",
    }
    args = [sys.executable, "-m", "crdtchat.cli", "worker", "--relay"]
    args += [f"ws://127.0.0.1:{relay.port}", "--provider", "openai-chat", "--idle-after", "5"]
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out)
    yield
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_question_streams_into_both_devices_and_the_python_replica(
    browser: Browser, relay: RelayProcess, worker: None, portal: BlockingPortal
) -> None:
    room = f"{ROOM}-stream"
    tok = token(room, "writer", "alice")
    python = PythonPeer(portal, relay, room, "carol")
    laptop, phone = device(browser), device(browser)
    try:
        first, second = open_page(laptop, relay, room, tok), open_page(phone, relay, room, tok)
        assert "#token" not in first.url  # the token left the address bar
        question = "tell me " + " ".join(f"w{i}" for i in range(30))
        first.get_by_role("textbox", name="Message").fill(question)
        first.get_by_role("button", name="Send").click()
        for page in (first, second):  # streaming on both devices at once
            expect(page.locator("article.streaming")).to_contain_text("You said: tell me")
        for page in (first, second):
            reply = page.get_by_role("article").filter(has_text="w29").last
            expect(reply).to_contain_text("[turn 1] You said: tell me w0")
            expect(page.locator("article.streaming")).to_have_count(0)
            expect(page.get_by_role("article")).to_have_count(2)
            expect(page.locator(".connection")).to_have_text("online, all stored")

        def answered(conversation: Conversation) -> bool:
            last = conversation.view.last()
            return last is not None and last.role == "assistant" and last.status == "complete"

        python.wait(answered)
        thread = python.call(lambda: python.conversation.thread(python.conversation.view.last().id))
        assert [m.role for m in thread] == ["user", "assistant"]
        assert thread[0].content == question and thread[0].author == "alice"
        assert thread[1].id == assistant_turn_id(thread[0].id, 1)
    finally:
        laptop.close()
        phone.close()
        python.close()


def test_the_draft_typed_on_one_device_appears_on_the_other(
    browser: Browser, relay: RelayProcess
) -> None:
    room = f"{ROOM}-draft"
    tok = token(room, "writer", "alice")
    laptop, phone = device(browser), device(browser)
    try:
        first, second = open_page(laptop, relay, room, tok), open_page(phone, relay, room, tok)
        first.get_by_role("textbox", name="Message").press_sequentially("half a thought")
        expect(second.get_by_role("textbox", name="Message")).to_have_value("half a thought")
        expect(first.locator(".presence")).to_contain_text("also open on")
        second.get_by_role("textbox", name="Message").press("End")
        second.get_by_role("textbox", name="Message").press_sequentially(", finished")
        expect(first.get_by_role("textbox", name="Message")).to_have_value(
            "half a thought, finished"
        )
        second.get_by_role("textbox", name="Message").press("Enter")  # Enter sends
        for page in (first, second):
            expect(page.get_by_role("article")).to_contain_text(["half a thought, finished"])
            expect(page.get_by_role("textbox", name="Message")).to_have_value("")
        first.goto(f"http://127.0.0.1:{relay.port}/")  # the list: rooms this device opened
        first.get_by_role("link", name=room).click()
        expect(first.get_by_role("article")).to_contain_text(["half a thought, finished"])
    finally:
        laptop.close()
        phone.close()


def test_edits_made_offline_survive_a_reload_and_merge_on_reconnect(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    room = f"{ROOM}-offline"
    tok = token(room, "writer", "alice")
    laptop = device(browser)
    python = PythonPeer(portal, relay, room, "carol")
    try:
        page = open_page(laptop, relay, room, tok)
        assert page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        relay.kill()
        expect(page.locator(".connection")).to_have_text("offline")
        page.get_by_role("textbox", name="Message").fill("written on a train")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".connection")).to_contain_text("offline, ")
        expect(page.locator(".connection")).to_contain_text("pending")
        page.reload()  # the shell from the service worker, the document from IndexedDB
        expect(page.get_by_role("article")).to_contain_text(["written on a train"])
        python.call(python.conversation.append, "user", "meanwhile, from Python")
        relay.start()
        expect(page.get_by_role("article")).to_have_count(2, timeout=60_000)
        expect(page.locator(".connection")).to_have_text("online, all stored", timeout=60_000)

        def merged(conversation: Conversation) -> bool:
            contents = {m.content for m in conversation.all_messages()}
            return {"written on a train", "meanwhile, from Python"} <= contents

        python.wait(merged)
    finally:
        laptop.close()
        python.close()
        if relay.proc is None or relay.proc.poll() is not None:
            relay.start()


def test_a_reload_in_the_middle_of_a_stream_picks_it_up(
    browser: Browser, relay: RelayProcess, worker: None
) -> None:
    room = f"{ROOM}-reload"
    tok = token(room, "writer", "alice")
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, room, tok)
        page.get_by_role("textbox", name="Message").fill(" ".join(f"x{i}" for i in range(80)))
        page.get_by_role("button", name="Send").click()
        expect(page.locator("article.streaming")).to_contain_text("x1 ")
        page.reload()
        expect(page.locator("article.streaming")).to_contain_text("You said:")
        expect(page.get_by_role("article").last).to_contain_text("x79", timeout=60_000)
        expect(page.locator("article.streaming")).to_have_count(0)
    finally:
        laptop.close()


def test_markup_in_a_message_renders_as_text_and_runs_nothing(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal, model: OpenAILoopback
) -> None:
    room = f"{ROOM}-xss"
    python = PythonPeer(portal, relay, room, "mallory")
    tracker = f"{model.base_url}/tracker.png"
    hostile = (
        "<img src=x onerror=\"document.title='pwned'\"> and "
        "[click me](javascript:document.title='pwned') and "
        f"![tracker]({tracker}) and <script>document.title='pwned'</script>"
    )
    python.call(python.conversation.append, "user", hostile)
    python.durable()
    laptop = device(browser)
    requests: list[str] = []
    dialogs: list[str] = []
    try:
        page = laptop.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        page.goto(f"http://127.0.0.1:{relay.port}/c/{room}#token={token(room, 'reader', 'bob')}")
        article = page.get_by_role("article").first  # the worker answers it too
        expect(article).to_contain_text("<img src=x onerror=")
        expect(article).to_contain_text("<script>document.title='pwned'</script>")
        assert article.locator("img, script, [onerror]").count() == 0
        assert article.locator("a[href^='javascript']").count() == 0
        assert article.locator(f"a[href='{tracker}']").count() == 1  # a link, not an image
        assert page.title() != "pwned" and not dialogs
        assert not [url for url in requests if "tracker" in url or url.endswith("/x")]
    finally:
        laptop.close()
        python.close()


def test_a_reader_sees_the_conversation_but_cannot_send(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    room = f"{ROOM}-reader"
    python = PythonPeer(portal, relay, room, "alice")
    python.call(python.conversation.append, "user", "for your eyes")
    python.durable()
    reader = device(browser)
    try:
        page = open_page(reader, relay, room, token(room, "reader", "bob"))
        expect(page.get_by_role("article")).to_contain_text(["for your eyes"])
        expect(page.get_by_role("button", name="Send")).to_have_count(0)
        expect(page.get_by_role("textbox", name="Message")).to_have_count(0)
        expect(
            page.get_by_text("You can read this conversation but not write to it.")
        ).to_be_visible()
        wrong = open_page(reader, relay, room, token("another-room", "writer", "bob"))
        expect(wrong.locator(".connection")).to_contain_text("Access refused: token refused")
    finally:
        reader.close()
        python.close()


def test_regenerate_switch_branches_edit_into_a_branch_and_stop(
    browser: Browser, relay: RelayProcess, worker: None
) -> None:
    room = f"{ROOM}-branches"
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, room, token(room, "writer", "alice"))
        articles = page.get_by_role("article")
        page.get_by_role("textbox", name="Message").fill("first question")
        page.get_by_role("button", name="Send").click()
        expect(articles.nth(1)).to_contain_text("[turn 1] You said: first question")
        expect(articles.nth(1)).not_to_have_attribute("aria-busy", "true")
        page.get_by_role("button", name="Regenerate").click()  # answer 2, shown as 2/2
        expect(articles.nth(1).locator(".branch")).to_have_text("2/2")
        expect(articles.nth(1)).to_contain_text("You said: first question")
        page.get_by_role("button", name="Previous branch").click()
        expect(articles.nth(1).locator(".branch")).to_have_text("1/2")
        page.get_by_role("button", name="Edit").click()
        page.get_by_role("textbox", name="Edited message").fill("second question")
        page.get_by_role("button", name="Save as new branch").click()
        expect(articles.first).to_contain_text("second question")
        expect(articles.first.locator(".branch")).to_have_text("2/2")
        expect(articles.nth(1)).to_contain_text("[turn 1] You said: second question")
        expect(articles.nth(1)).not_to_have_attribute("aria-busy", "true")
        page.get_by_role("textbox", name="Message").fill(" ".join(f"s{i}" for i in range(80)))
        page.get_by_role("button", name="Send").click()
        expect(page.locator("article.streaming")).to_contain_text("s1 ")
        page.keyboard.press("Escape")  # Esc stops the reply
        expect(articles.last.locator(".status")).to_have_text("stopped")
    finally:
        laptop.close()


def test_settings_and_an_attached_file_reach_the_python_replica(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal, tmp_path: Path
) -> None:
    room = f"{ROOM}-settings"
    python = PythonPeer(portal, relay, room, "carol")
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, room, token(room, "writer", "alice"))
        page.get_by_role("button", name="Settings").click()
        page.get_by_label("Model").fill("gpt-test")
        page.get_by_label("System prompt").fill("Be brief.")
        page.get_by_label("Parameters (JSON)").fill("[1, 2]")
        page.get_by_role("button", name="Save settings").click()
        expect(page.get_by_text("Parameters must be a JSON object")).to_be_visible()
        page.get_by_label("Parameters (JSON)").fill('{"temperature": 0.2}')
        page.get_by_role("button", name="Save settings").click()
        python.wait(
            lambda c: (
                (c.settings.model, c.settings.system, c.settings.params)
                == ("gpt-test", "Be brief.", {"temperature": 0.2})
            )
        )
        notes = tmp_path / "notes.txt"
        notes.write_bytes(b"hello blob")
        page.locator("input[type=file]").set_input_files(str(notes))
        expect(page.locator(".attachments")).to_contain_text("notes.txt (10 bytes)")
        page.get_by_role("textbox", name="Message").fill("see attached")
        page.get_by_role("button", name="Send").click()
        python.wait(lambda c: any(m.files for m in c.all_messages()))
        files = python.call(lambda: next(m.files for m in python.conversation.all_messages()))
        assert [(f.name, f.size, f.sha256) for f in files] == [
            ("notes.txt", 10, hashlib.sha256(b"hello blob").hexdigest())
        ]
    finally:
        laptop.close()
        python.close()


def test_one_list_on_two_devices_and_sharing_from_it(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    alice = identity("alice")
    laptop, phone, friend = device(browser), device(browser), device(browser)
    try:
        first, second = list_page(laptop, relay, alice), list_page(phone, relay, alice)
        expect(second.get_by_text("No conversations yet")).to_be_visible()
        expect(first.locator(".connection")).to_have_text("online")  # else New reaches only IDB
        first.get_by_role("textbox", name="New conversation title").fill("Trip plans")
        first.get_by_role("button", name="New conversation").click()
        composer = first.get_by_role("textbox", name="Message")
        expect(composer).to_be_editable()  # the first to open it owns it, and writes
        room = first.url.rsplit("/c/", 1)[1]
        entry = second.locator(f"li[data-room='{room}']")
        expect(entry.get_by_role("link", name="Trip plans")).to_be_visible()  # live, no reload
        composer.fill("hello from the laptop")
        composer.press("Enter")
        expect(first.locator(".connection")).to_have_text("online, all stored")
        first.get_by_role("link", name="Conversations").click()  # back to the list: nothing read
        expect(first.locator(f"li[data-room='{room}']")).to_contain_text("Trip plans")
        carol = PythonPeer(portal, relay, room, "carol")  # another writer posts: unread on the list
        try:
            carol.call(carol.conversation.append, "user", "and from carol")
            carol.call(carol.conversation.set_title, "Oslo in May")  # the room's own title
            carol.durable()
        finally:
            carol.close()
        second.evaluate("window.crdtchat.refreshSummaries()")  # else at the next poll (15 s)
        # carol's, and the worker's replies if the module's worker has answered by now; alice's
        # own message is never unread
        expect(entry.locator(".unread")).to_have_text(re.compile(r"^[123] unread$"))

        entry.get_by_role("button", name="Pin").click()
        entry.get_by_role("button", name="Share").click()
        entry.get_by_label("Share with (subject)").fill("bob")
        entry.get_by_label("Role").select_option("reader")
        entry.locator("form").get_by_role("button", name="Share").click()
        expect(second.locator(".notice")).to_have_text("shared with bob as reader")
        entry.get_by_role("button", name="Rename").click()
        entry.get_by_label("Title").fill("Trip to Oslo")
        entry.get_by_role("button", name="Save title").click()
        expect(first.get_by_role("link", name="Trip to Oslo")).to_be_visible()
        # The Python ConversationList reads the same entry from the person's list document.
        wait_for_list(
            portal,
            relay,
            alice,
            lambda rooms: (
                (e := rooms.get(room)) is not None and e.pinned and e.title == "Trip to Oslo"
            ),
        )

        late = {"iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "bob", "exp": 1_000_000}
        stale = list_page(friend, relay, jwt.encode(late, SECRET, LOCAL_ALGORITHM))
        expect(stale.locator(".notice")).to_contain_text("Access refused: token refused: expired")
        reader = list_page(friend, relay, identity("bob"))  # bob accepts it into his list
        reader.get_by_role("textbox", name="Conversation shared with you").fill(room)
        reader.get_by_role("button", name="Add", exact=True).click()
        shared = reader.locator(f"li[data-room='{room}']")
        expect(shared.locator(".unread")).to_have_text(re.compile(r"^[234] unread$"))  # for bob
        shared.get_by_role("link", name="Oslo in May").click()  # bob has no title of his own
        expect(reader.get_by_role("article")).to_contain_text(["hello from the laptop"])
        expect(reader.get_by_text("You can read this conversation but not write")).to_be_visible()
        expect(reader.get_by_role("textbox", name="Message")).to_have_count(0)

        first.locator(f"li[data-room='{room}']").get_by_role("button", name="Archive").click()
        expect(entry).to_have_count(0)  # archived on the other device too
        second.get_by_role("button", name="Show archived").click()
        entry.get_by_role("button", name="Leave").click()
        wait_for_list(portal, relay, alice, lambda rooms: rooms.get(room) is None)
    finally:
        laptop.close()
        phone.close()
        friend.close()
