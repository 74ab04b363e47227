"""Driving the chat app in tests: reading its lines and thread, typing, waiting for a redraw."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from textual.pilot import Pilot
from textual.widgets import Input

from crdtchat.tui.app import ChatApp
from crdtchat.tui.widgets import Line, ThreadView


def thread_texts(app: ChatApp) -> list[str]:
    return app.query_one("#thread", ThreadView).texts()


def line(app: ChatApp, name: str) -> str:
    return app.query_one(f"#{name}", Line).text


async def until(app: ChatApp, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds, re-checking after each redraw of the app."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await app.updated.wait()
    except TimeoutError:
        screen = {name: line(app, name) for name in ("notice", "presence", "status")}
        raise AssertionError(f"condition not met; screen: {screen}, {thread_texts(app)}") from None


async def submit(pilot: Pilot[Any], text: str) -> None:
    """Put `text` in the composer (as a paste would) and press enter."""
    pilot.app.query_one("#composer", Input).value = text
    await pilot.press("enter")
    await pilot.pause()
