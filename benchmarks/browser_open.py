"""Opening a 10,000-message conversation in the web client (Chromium), from the relay and again
from IndexedDB: time until the latest messages are on screen, and the page's JS heap.

Anchor, in the same run: the Python client opening the same document (`Conversation.from_update`
of its state) and reading the end of the current thread it would draw (the last 60 messages);
the browser figures are reported as ratios to it. Scrolling back is measured as the time to
show each further 60 messages (the page draws a window of the thread, not all of it).

Run: .venv/bin/python benchmarks/browser_open.py [--messages 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from playwright.sync_api import expect, sync_playwright

from crdtchat.document import Conversation
from crdtchat.replica import Replica
from tests.support.browser import CHROMIUM, FLAGS
from tests.support.relay import RelayProcess, token

ROOM = "bench-open"


def build(count: int) -> bytes:
    """A chain of `count` user messages of a chat line's length, as one update."""
    conversation = Conversation.create(author="alice", title="long")
    with conversation.doc.transaction():
        for n in range(count):
            conversation.append("user", f"message {n}: " + "some words of a chat line " * 3)
    return conversation.encode_state()


async def upload(url: str, state: bytes) -> None:
    conversation = Conversation.from_update(state, author="alice")
    async with Replica(url, ROOM, token(ROOM, "writer", "alice"), doc=conversation.doc) as r:
        await r.wait_until(lambda status: status.durable, timeout=300)


def anchor(state: bytes) -> float:
    start = time.perf_counter()
    conversation = Conversation.from_update(state, author="alice")
    last = conversation.view.last()
    assert last is not None
    tail = conversation.thread(last.id)[-60:]
    assert tail[-1].content.startswith("message")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = build(args.messages)
    last = f"message {args.messages - 1}:"
    relay = RelayProcess(Path(tempfile.mkdtemp()) / "data").start()
    try:
        anyio.run(upload, f"ws://127.0.0.1:{relay.port}", state)
        link = f"http://127.0.0.1:{relay.port}/c/{ROOM}#token={token(ROOM, 'writer', 'alice')}"
        relay_times, idb_times, anchors, heaps, scrolls = [], [], [], [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            for _ in range(args.repeats):
                anchors.append(anchor(state))
                context = browser.new_context()
                page = context.new_page()
                start = time.perf_counter()
                page.goto(link)
                expect(page.get_by_role("article").last).to_contain_text(last, timeout=120_000)
                relay_times.append(time.perf_counter() - start)
                page.evaluate("navigator.serviceWorker.ready.then(() => true)")
                expect(page.locator(".connection")).to_have_text("online, all stored")
                heaps.append(page.evaluate("performance.memory.usedJSHeapSize") / 2**20)
                relay.kill()  # from IndexedDB alone now
                start = time.perf_counter()
                page.reload()
                expect(page.get_by_role("article").last).to_contain_text(last, timeout=120_000)
                idb_times.append(time.perf_counter() - start)
                for _ in range(5):  # scroll back: each step draws 60 more messages
                    shown = page.get_by_role("article").count()
                    start = time.perf_counter()
                    page.get_by_role("button", name="Show earlier messages").click()
                    expect(page.get_by_role("article").nth(shown + 59)).to_be_attached()
                    scrolls.append(time.perf_counter() - start)
                context.close()
                relay.start()
            browser.close()
    finally:
        relay.stop()
    a = statistics.median(anchors)
    r = statistics.median(relay_times)
    i = statistics.median(idb_times)
    print(f"{args.messages} messages, {args.repeats} repeats (medians)")
    print(f"anchor: Python opens the document and reads the last 60: {a * 1000:.0f} ms")
    print(f"browser, from the relay: latest on screen in {r * 1000:.0f} ms ({r / a:.1f}x anchor)")
    print(f"browser, from IndexedDB: latest on screen in {i * 1000:.0f} ms ({i / a:.1f}x anchor)")
    print(f"JS heap after opening: {statistics.median(heaps):.0f} MiB")
    print(f"scrolling back, 60 more messages: {statistics.median(scrolls) * 1000:.0f} ms median")


if __name__ == "__main__":
    main()
