"""Offline edits on two devices, then a merge.

Kim's desktop and tablet share a conversation. The relay goes down. Each device, while
offline, starts from its own SQLite file, adds a message, and shuts down. The relay comes back;
each device starts again from its file and reconnects. Both edits are then on both devices,
in the same order: Yjs orders concurrent inserts the same way on every replica.

    python demos/offline_merge.py
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from _kit import Device, check, run, say

from crdtchat.stack import LocalStack

ROOM = "shopping-list"
PERSON = "kim"


def listing(device: Device) -> list[tuple[str, str | None, str]]:
    """Every message in document order: (id, parent, content)."""
    return [(m.id, m.parent, m.content) for m in device.conversation.all_messages()]


async def demo(tmp: Path) -> None:
    files = {name: tmp / f"{name}.sqlite" for name in ("desktop", "tablet")}
    with LocalStack(tmp / "stack") as stack:
        stack.start_relay()
        say(f"relay on {stack.url}, storing rooms in {stack.data / 'relay'}")

        async with (
            Device(stack, ROOM, PERSON, "desktop", files["desktop"]) as desktop,
            Device(stack, ROOM, PERSON, "tablet", files["tablet"]) as tablet,
        ):
            await desktop.synced()
            await tablet.synced()
            first = desktop.conversation.append("user", "Things to buy for the weekend:")
            await tablet.until(lambda: len(tablet.conversation) == 1, "first message")
            await desktop.durable()
            say(f"online: desktop writes {first.content!r}; the tablet has it too")

        assert stack.relay is not None
        stack.relay.stop()
        say("the relay is down")

        edits = {"desktop": "bread and olives", "tablet": "coffee beans"}
        for name, text in edits.items():
            async with Device(stack, ROOM, PERSON, name, files[name]) as device:
                check(not device.replica.status.connected, f"{name} is connected to a dead relay")
                loaded = [m.content for m in device.conversation.all_messages()]
                check(loaded == [first.content], f"{name} did not load its file: {loaded}")
                device.conversation.append("user", text)
                await device.saved()
                pending = device.replica.status.pending
                say(
                    f"{name} starts offline from its file ({len(loaded)} message), "
                    f"adds {text!r}, shuts down with {pending} edit(s) the relay has not seen"
                )
                check(pending >= 1, f"{name} should have an edit pending")

        stack.start_relay()
        say(f"the relay is back on {stack.url}, with what it had stored")

        opened: dict[str, Device] = {}
        async with AsyncExitStack() as devices:
            for name in ("desktop", "tablet"):
                opened[name] = device = await devices.enter_async_context(
                    Device(stack, ROOM, PERSON, name, files[name])
                )
                contents = [m.content for m in device.conversation.all_messages()]
                say(f"{name} starts again from its file: {contents}")
                check(edits[name] in contents, f"{name} lost its offline edit in a restart")
            desktop, tablet = opened["desktop"], opened["tablet"]
            await desktop.synced()
            await tablet.synced()
            await desktop.durable()
            await tablet.durable()
            for device in (desktop, tablet):
                await device.until(lambda d=device: len(d.conversation) == 3, "merged messages")
            say("both reconnected and synced; every message on each device, in document order:")
            for device in (desktop, tablet):
                say(f"  {device.name}: {[content for _, _, content in listing(device)]}")
            check(listing(desktop) == listing(tablet), "the devices disagree on the order")
            contents = {content for _, _, content in listing(desktop)}
            check(set(edits.values()) <= contents, "an offline edit was lost")
            parents = {
                parent for _, parent, content in listing(desktop) if content != first.content
            }
            check(parents == {first.id}, "both offline messages should follow the first one")
            current = [m.content for m in desktop.conversation.current_thread()]
            check(
                current == [m.content for m in tablet.conversation.current_thread()],
                "the devices show different current threads",
            )
            say(
                "both offline messages answer the same message, so the conversation now has two"
                " branches;"
            )
            say(f"every replica picks the same current thread: {current}")


if __name__ == "__main__":
    run(demo)
