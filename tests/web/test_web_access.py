"""Access that begins and ends while the page is open, in real Chromium against a relay
subprocess: an invite link redeemed in the browser, a member removed while their page is open
(the relay closes it with 4403), and a token that expires mid-session (4401).

A browser sees a refused or closed websocket without its reason when the upgrade is refused
(1006), so each case checks what the page tells the person, and that it stops there.
"""

from __future__ import annotations

from anyio.from_thread import BlockingPortal
from playwright.sync_api import Browser, Page, expect

from crdtchat.membership import accept, invite, share, unshare
from tests.support.browser import (
    PythonPeer,
    device,
    identity,
    open_page,
    wait_for_list,
)
from tests.support.relay import RelayProcess, token


def owned_room(portal: BlockingPortal, relay: RelayProcess, room: str, text: str) -> PythonPeer:
    """`room` opened first by alice's identity token (she owns it) with one message in it."""
    alice = PythonPeer(portal, relay, room, "alice", identity("alice"))
    alice.call(alice.conversation.append, "user", text)
    alice.durable()
    return alice


def signed_in(page: Page, relay: RelayProcess, sub: str) -> None:
    """The device keeps `sub`'s identity token, as after opening their sign-in link."""
    page.goto(f"http://127.0.0.1:{relay.port}/#token={identity(sub)}")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def test_an_invite_link_opened_in_the_browser_joins_and_lists_the_room(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    room = "web-invited"
    alice = owned_room(portal, relay, room, "welcome aboard")
    made = invite(relay.ws_base, room, identity("alice"), "writer", uses=1)
    bob, carol, stranger = device(browser), device(browser), device(browser)
    try:
        page = bob.new_page()
        signed_in(page, relay, "bob")
        page.goto(made.link)
        page.wait_for_url(f"**/c/{room}")
        assert "#invite" not in page.url
        expect(page.get_by_role("article")).to_contain_text(["welcome aboard"])
        composer = page.get_by_role("textbox", name="Message")
        expect(composer).to_be_editable()  # a writer by the invite's role
        composer.fill("thanks, bob here")
        composer.press("Enter")
        alice.wait(lambda c: any(m.content == "thanks, bob here" for m in c.all_messages()))
        wait_for_list(portal, relay, identity("bob"), lambda rooms: rooms.get(room) is not None)

        used = carol.new_page()  # the invite allowed one use
        signed_in(used, relay, "carol")
        used.goto(made.link)
        expect(used.get_by_role("alert")).to_contain_text(f"Could not join {room}:")
        assert used.url.endswith(f"/rooms/{room}/join")

        nobody = stranger.new_page()  # no identity on this device: says what to do first
        nobody.goto(made.link)
        expect(nobody.get_by_role("alert")).to_contain_text("needs your sign-in link first")
    finally:
        bob.close()
        carol.close()
        stranger.close()
        alice.close()


def test_a_member_removed_while_the_page_is_open_is_told_and_sees_nothing_more(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    room = "web-removed"
    alice = owned_room(portal, relay, room, "before the removal")
    share(relay.ws_base, room, identity("alice"), "bob", "writer")
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, room, identity("bob"))
        expect(page.get_by_role("article")).to_contain_text(["before the removal"])
        expect(page.locator(".connection")).to_have_text("online, all stored")
        unshare(relay.ws_base, room, identity("alice"), "bob")
        connection = page.locator(".connection")
        expect(connection).to_contain_text("Access refused:")
        expect(connection).to_have_attribute("data-state", "refused")
        alice.call(alice.conversation.append, "user", "after the removal")
        alice.durable()
        page.reload()  # the device still holds bob's token: the page asks, and stops there
        expect(connection).to_have_text(
            f"Access refused: token refused: not a member of {room}. Ask for a new link."
        )
        assert page.evaluate("window.crdtchat.provider.shouldConnect") is False
        expect(page.get_by_role("article")).to_have_count(1)
        expect(page.get_by_text("after the removal")).to_have_count(0)
    finally:
        laptop.close()
        alice.close()


def test_a_token_that_expires_mid_session_is_said_so_and_not_retried(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    room = "web-expiring"
    laptop = device(browser)
    try:
        # long enough to open the page and write once on a loaded machine, then it ends
        page = open_page(laptop, relay, room, token(room, "writer", "alice", ttl=8))
        page.get_by_role("textbox", name="Message").fill("written in time")
        page.get_by_role("button", name="Send").click()
        connection = page.locator(".connection")
        expect(connection).to_have_text("online, all stored")
        expect(connection).to_have_text(
            "Access refused: token refused: expired. Ask for a new link.", timeout=60_000
        )
        assert page.evaluate("window.crdtchat.provider.shouldConnect") is False  # no retrying
        expect(page.get_by_role("article")).to_contain_text(["written in time"])
    finally:
        laptop.close()


def test_a_reader_who_reads_a_conversation_has_it_marked_read_in_their_list(
    browser: Browser, relay: RelayProcess, portal: BlockingPortal
) -> None:
    """A reader may not write the room's `transport.read`; the page keeps the mark in the
    person's list (`list.read`), which the list's unread counts start from."""
    room = "web-list-read"
    alice = owned_room(portal, relay, room, "first")
    share(relay.ws_base, room, identity("alice"), "bob", "reader")
    alice.call(alice.conversation.append, "user", "second")
    alice.durable()
    portal.call(accept, relay.ws_base, identity("bob"), room)  # in bob's list, as `join` does
    laptop = device(browser)
    try:
        page = open_page(laptop, relay, room, identity("bob"))
        expect(page.get_by_role("article")).to_contain_text(["first", "second"])
        last = alice.call(lambda: alice.conversation.view.last().id)
        wait_for_list(
            portal,
            relay,
            identity("bob"),
            lambda rooms: getattr(rooms.get(room), "read", 0) == last,
        )
        page.get_by_role("link", name="Conversations").click()
        entry = page.locator(f"li[data-room='{room}']")
        expect(entry.get_by_role("link")).to_be_visible()
        page.evaluate("window.crdtchat.refreshSummaries()")
        expect(entry.locator(".when")).to_be_visible()  # the summary has arrived
        expect(entry.locator(".unread")).to_have_count(0)
        alice.call(alice.conversation.append, "user", "third")
        alice.durable()
        page.evaluate("window.crdtchat.refreshSummaries()")
        expect(entry.locator(".unread")).to_have_text("1 unread")
    finally:
        laptop.close()
        alice.close()
