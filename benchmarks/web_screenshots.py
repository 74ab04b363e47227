"""The screenshots of the web client in docs/images (linked from the README): a short
conversation on a relay subprocess, drawn by headless Debian Chromium at desktop size (light
and dark) and at a phone's size. Regenerate them after a change to how the page looks:

    make screenshots        # or: .venv/bin/python benchmarks/web_screenshots.py [--out DIR]

Not a benchmark; it lives here because, like browser_open.py, it drives the real page against
a real relay. The conversation is written by two replicas as the real writers would: alice's
questions with a writer's token, the answers with a worker's (one cut at the token limit, to
show how an incomplete reply reads).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from playwright.sync_api import Browser, expect, sync_playwright

from benchmarks._support import REPO, SECRET, running_relay
from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.schema import ModelRef, assistant_turn_id
from crdtchat.tokens import mint_token
from tests.support.browser import CHROMIUM, FLAGS

ROOM = "screenshots"
DRAFT = "Thanks! One more question"
TURNS = [
    (
        "How do I merge two Python dicts, keeping the second one's values?",
        ModelRef(provider="openai", api="responses", model="gpt-4o-mini"),
        "Use the `|` operator (Python 3.9+):\n\n```python\nmerged = first | second\n```\n\n"
        "Keys in **both** take the value from `second`. For older versions: "
        "`{**first, **second}`.",
        "complete",
    ),
    (
        "And for nested dicts?",
        ModelRef(provider="local", api="llama-cpp", model="SmolLM2-135M-Instruct"),
        "Nested dicts need a recursive merge: walk the keys of the second dict and, where both "
        "values are dicts, merge those",
        "incomplete",
    ),
]


def token(role: str, sub: str) -> str:
    return mint_token(SECRET, ROOM, role, sub, 3600)


async def arrived(conversation: Conversation, message_id: str) -> None:
    """Until the other replica's message is in `conversation` (a script: polling is fine)."""
    with anyio.fail_after(30):
        while conversation.view.get(message_id) is None:
            await anyio.sleep(0.05)


async def write_conversation(url: str) -> None:
    """Each turn: alice asks (writer), the worker answers (worker), each stored by the relay."""
    alice = Conversation(author="alice", role="writer")
    worker = Conversation(author="worker-1", role="worker")
    async with (
        Replica(url, ROOM, token("writer", "alice"), doc=alice.doc) as asks,
        Replica(url, ROOM, token("worker", "worker-1"), doc=worker.doc) as answers,
    ):
        for question, model, answer, status in TURNS:
            asked = alice.append("user", question).id
            await asks.wait_until(lambda s: s.durable, timeout=30)
            await arrived(worker, asked)
            worker.append(
                "assistant",
                answer,
                parent=asked,
                message_id=assistant_turn_id(asked, 1),
                model=model,
                status=status,
            )
            await answers.wait_until(lambda s: s.durable, timeout=30)
            await arrived(alice, assistant_turn_id(asked, 1))
    alice.close()
    worker.close()


def shoot(browser: Browser, link: str, path: Path, **context: object) -> None:
    page = browser.new_context(**context).new_page()  # type: ignore[arg-type]
    page.goto(link)
    expect(page.get_by_role("article").last).to_contain_text("Nested dicts")
    expect(page.locator(".connection")).to_have_text("online, all stored")
    page.get_by_role("textbox", name="Message").fill(DRAFT)
    page.locator("body").click(position={"x": 1, "y": 1})  # no focus ring on the composer
    page.screenshot(path=str(path))
    page.context.close()
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with running_relay(Path(tempfile.mkdtemp()) / "data") as relay:
        anyio.run(write_conversation, relay.url)
        http = relay.url.replace("ws://", "http://", 1)
        link = f"{http}/c/{ROOM}#token={token('writer', 'alice')}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            desktop = {"viewport": {"width": 1200, "height": 760}}
            shoot(browser, link, args.out / "web-desktop.png", **desktop)
            shoot(browser, link, args.out / "web-desktop-dark.png", color_scheme="dark", **desktop)
            phone = {"width": 390, "height": 780}
            shoot(
                browser,
                link,
                args.out / "web-phone.png",
                viewport=phone,
                device_scale_factor=2,
                is_mobile=True,
                has_touch=True,
            )
            browser.close()


if __name__ == "__main__":
    main()
