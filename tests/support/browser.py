"""The one way the browser tests and the browser benchmark launch Chromium, and what the
browser tests (tests/web/) share: devices, pages, and a Python peer on another thread.

The flags keep a headless Chromium off the network (no QUIC, sync or component updates) so
that only the loopback relay is talked to, and runnable as root in CI (no sandbox).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal
from playwright.sync_api import Browser, BrowserContext, Page, expect

from crdtchat.conversations import ConversationList, list_replica
from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.signals import Changes
from crdtchat.tokens import mint_token
from tests.support.relay import SECRET, RelayProcess, token

WAIT = 30_000  # ms: generous, the machine is shared

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class PythonPeer:
    """A Python replica of a room, run on an event loop in another thread (Playwright's sync
    API owns this one); every touch of its document goes through that loop."""

    def __init__(
        self, portal: BlockingPortal, relay: RelayProcess, room: str, sub: str, tok: str = ""
    ) -> None:
        """`tok` defaults to a writer's room token for `sub`."""
        self.portal = portal
        self.conversation = Conversation(author=sub, role="writer")
        self.changes = Changes()
        self.conversation.on_update(self.changes.notify)  # any change of any root wakes waiters
        url = f"ws://127.0.0.1:{relay.port}"
        replica = Replica(url, room, tok or token(room, "writer", sub), doc=self.conversation.doc)
        self._replica_cm = portal.wrap_async_context_manager(replica)
        self.replica = self._replica_cm.__enter__()
        try:
            self.call(lambda: self.replica.wait_until(lambda status: status.synced, timeout=30))
        except BaseException:
            self.close()  # or the portal waits for the replica for ever
            raise

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return self.portal.call(func, *args)

    def wait(self, condition: Callable[[Conversation], bool], timeout: float = 60) -> None:
        async def waiting() -> None:
            with anyio.fail_after(timeout):
                while not condition(self.conversation):
                    await self.changes.wait()

        self.portal.call(waiting)

    def durable(self) -> None:
        """Until the relay has acknowledged every local write as stored."""
        self.call(lambda: self.replica.wait_until(lambda status: status.durable, timeout=30))

    def close(self) -> None:
        self._replica_cm.__exit__(None, None, None)
        self.portal.call(self.conversation.close)


def open_page(context: BrowserContext, relay: RelayProcess, room: str, tok: str) -> Page:
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{relay.port}/c/{room}#token={tok}")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT)
    return page


def device(browser: Browser) -> BrowserContext:
    context = browser.new_context()
    context.set_default_timeout(WAIT)
    return context


def identity(sub: str) -> str:
    """An identity token (design §4): a person, no room."""
    return mint_token(SECRET, None, None, sub, 3600)


def list_page(context: BrowserContext, relay: RelayProcess, tok: str) -> Page:
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{relay.port}/#token={tok}")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT)
    return page


def wait_for_list(portal: BlockingPortal, relay: RelayProcess, tok: str, check: Any) -> None:
    """Until `check(ConversationList)` holds on a Python replica of the person's list."""

    async def waiting() -> None:
        async with list_replica(f"ws://127.0.0.1:{relay.port}", tok) as replica:
            rooms = ConversationList(replica.doc)
            changed = anyio.Event()

            def wake() -> None:
                nonlocal changed
                changed.set()

            unobserve = rooms.observe(wake)
            try:
                with anyio.fail_after(30):
                    while not check(rooms):
                        await changed.wait()
                        changed = anyio.Event()
            finally:
                unobserve()

    portal.call(waiting)
