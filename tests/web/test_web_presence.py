"""Presence in real Chromium against a relay subprocess: what one page shows of the others
(design §6, Web client: my other devices, others typing).

The typing flag ends 3 s after the last keystroke (TYPING_IDLE_MS in web/src/app.js), so the
writer keeps typing until the other page has shown it, rather than relying on how fast a loaded
machine delivers it; that it ends is checked on sending, which clears it at once.
"""

from __future__ import annotations

from playwright.sync_api import Browser, Page, expect

from tests.support.browser import device, open_page
from tests.support.relay import RelayProcess, token


def keep_typing_until_shown(writer: Page, watcher: Page, shown: str) -> None:
    """Type a word at a time on `writer` until `watcher`'s presence line shows `shown`."""
    composer = writer.get_by_role("textbox", name="Message")
    presence = watcher.locator(".presence")
    for word in range(20):
        composer.press_sequentially(f"word{word} ")
        try:
            expect(presence).to_contain_text(shown, timeout=2000)
            return
        except AssertionError:
            continue
    expect(presence).to_contain_text(shown)


def test_another_person_sees_who_is_typing_and_my_other_devices(
    browser: Browser, relay: RelayProcess
) -> None:
    room = "web-presence"
    laptop, phone, friend = device(browser), device(browser), device(browser)
    try:
        mine = open_page(laptop, relay, room, token(room, "writer", "alice"))
        other = open_page(phone, relay, room, token(room, "writer", "alice"))
        bob = open_page(friend, relay, room, token(room, "writer", "bob"))
        device_name = mine.evaluate("localStorage.getItem('crdtchat.device')")
        expect(other.locator(".presence")).to_contain_text(f"also open on {device_name}")
        expect(bob.locator(".presence")).not_to_contain_text("also open on")  # not bob's devices

        keep_typing_until_shown(mine, bob, "alice typing…")
        expect(other.locator(".presence")).to_contain_text(f"you on {device_name} typing…")
        mine.get_by_role("textbox", name="Message").press("Enter")  # sending ends typing
        expect(bob.locator(".presence")).not_to_contain_text("typing")
        expect(other.locator(".presence")).not_to_contain_text("typing")
        expect(bob.get_by_role("article").last).to_contain_text("word0")
    finally:
        laptop.close()
        phone.close()
        friend.close()
