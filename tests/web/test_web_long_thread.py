"""A 10,000-message thread in real Chromium: the thread is a virtual list (web/src/virtual.js),
so the DOM holds a screenful or so wherever the reader is, scrolling reaches every message
without gaps, and a message arriving while the reader is scrolled back does not move the view.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from anyio.from_thread import BlockingPortal
from playwright.sync_api import Browser, Page, expect

from crdtchat.document import Conversation
from crdtchat.replica import Replica
from tests.support.browser import PythonPeer, device, open_page
from tests.support.relay import RelayProcess, token

ROOM = "web-long"
COUNT = 10_000
MOST_NODES = 80  # articles in the DOM at any time: a few screens, never the thread


async def upload(url: str, count: int) -> None:
    """`count` chained user messages, stored by the relay, each as long as a chat line."""
    conversation = Conversation.create(author="alice", title="long")
    with conversation.doc.transaction():
        for n in range(count):
            conversation.append("user", f"message {n}: " + "some words of a chat line " * (n % 4))
    async with Replica(url, ROOM, token(ROOM, "writer", "alice"), doc=conversation.doc) as r:
        await r.wait_until(lambda status: status.durable, timeout=300)
    conversation.close()


@pytest.fixture(scope="module")
def long_room(relay: RelayProcess, portal: BlockingPortal) -> Iterator[str]:
    portal.call(upload, relay.ws_base, COUNT)  # Playwright's sync API owns this thread's loop
    yield ROOM


def shown_numbers(page: Page) -> list[int]:
    """The numbers of the messages in the DOM, in order."""
    texts = page.get_by_role("article").locator(".body").all_inner_texts()
    return [int(m.group(1)) for t in texts if (m := re.match(r"message (\d+):", t))]


# The number of the first message whose bottom is below the scroller's top edge.
TOP_VISIBLE = """() => {
  const top = window.crdtchat.scroller.getBoundingClientRect().top
  for (const article of document.querySelectorAll('article')) {
    const found = /message (\\d+):/.exec(article.textContent)
    if (found && article.getBoundingClientRect().bottom > top) return Number(found[1])
  }
  return -1
}"""


def top_visible(page: Page) -> int:
    return page.evaluate(TOP_VISIBLE)


def wait_until_top(page: Page, condition: str) -> None:
    """Until the first visible message's number `n` satisfies `condition` (JS, of n)."""
    page.wait_for_function(f"() => (n => {condition})(({TOP_VISIBLE})())")


def assert_contiguous(numbers: list[int]) -> None:
    assert numbers, "no message drawn"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    assert len(numbers) <= MOST_NODES


def test_scrolling_through_ten_thousand_messages_keeps_a_screenful_in_the_dom(
    browser: Browser, relay: RelayProcess, long_room: str
) -> None:
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, long_room, token(long_room, "reader", "bob"))
        expect(page.get_by_role("article").last).to_contain_text(f"message {COUNT - 1}:")
        assert_contiguous(shown_numbers(page))

        page.evaluate("window.crdtchat.scroller.scrollTop = 0")  # a jump to the first message
        expect(page.get_by_role("article").first).to_contain_text("message 0:")
        assert_contiguous(shown_numbers(page))

        # the middle, by the scrollbar: somewhere near message 5,000 (heights are estimates)
        page.evaluate("(s => { s.scrollTop = s.scrollHeight / 2 })(window.crdtchat.scroller)")
        expect(page.get_by_role("article").first).not_to_contain_text("message 0:")
        middle = top_visible(page)
        assert COUNT * 0.3 < middle < COUNT * 0.7, middle
        assert_contiguous(shown_numbers(page))

        # the wheel, back and forth: small steps move the view a little, never jump
        page.locator(".scroller").hover()
        for _ in range(10):
            before = top_visible(page)
            page.mouse.wheel(0, -400)
            wait_until_top(page, f"n < {before}")
            after = top_visible(page)
            assert before - 15 < after < before, (before, after)
            assert_contiguous(shown_numbers(page))
        page.mouse.wheel(0, 4000)  # down as far as the ten steps went up: back near the middle
        wait_until_top(page, f"n > {middle - 10}")
        assert_contiguous(shown_numbers(page))
    finally:
        laptop.close()


def test_a_new_message_keeps_a_scrolled_back_view_and_follows_at_the_end(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal, long_room: str
) -> None:
    python = PythonPeer(portal, relay, long_room, "carol")
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, long_room, token(long_room, "writer", "alice"))
        last = page.get_by_role("article").last
        expect(last).to_contain_text(f"message {COUNT - 1}:")
        page.locator(".scroller").hover()
        page.mouse.wheel(0, -3000)
        wait_until_top(page, f"n < {COUNT - 20}")
        reading = top_visible(page)
        python.call(python.conversation.append, "user", "message 10000: while you read")
        # drawn out of view (functions, not expressions: the page's CSP forbids eval)
        page.wait_for_function(f"() => window.crdtchat.thread.length === {COUNT + 1}")
        assert top_visible(page) == reading
        page.mouse.wheel(0, 100_000)  # back at the end: new messages are followed
        wait_until_top(page, f"n > {COUNT - 20}")
        python.call(python.conversation.append, "user", "message 10001: at the end")
        expect(last).to_contain_text("message 10001:")
        expect(last).to_be_in_viewport()
    finally:
        laptop.close()
        python.close()
