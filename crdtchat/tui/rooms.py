"""`crdtchat chat` without a room: the person's conversation list (design §2, the list document).

The screen shows the list document of the token's person, kept by a `Replica` like any room,
so it works offline and follows the other devices live. Commands, typed in the input line:
`new [TITLE]`, `add ROOM [TITLE]` (a room shared with you), `open N`, `rename N [TITLE]`,
`pin N`, `unpin N`, `archive N`, `unarchive N`,
`archived` (show the archived ones, or the others again), `share N SUB reader|writer`,
`unshare N SUB`, `leave N`, `quit`. `open N` ends the screen with that room chosen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar

import anyio.to_thread
from textual.app import App, ComposeResult
from textual.widgets import Input

from crdtchat.conversations import ConversationList, Entry
from crdtchat.errors import CrdtchatError
from crdtchat.relays import RelaySource, current_relay
from crdtchat.tui.widgets import Line

HELP = (
    "new [TITLE] · add ROOM [TITLE] · open N · rename N [TITLE] · pin/unpin N · "
    "archive/unarchive N · archived · share N SUB reader|writer · unshare N SUB · leave N · quit"
)

# share(room, sub, role or None to remove): the membership call (crdtchat.membership)
Share = Callable[[str, str, str | None], Awaitable[None]]


def describe(number: int, entry: Entry) -> str:
    marks = ("📌 " if entry.pinned else "") + ("[archived] " if entry.archived else "")
    return f"{number:>3}  {marks}{entry.title or entry.room}  ({entry.room})"


class RoomsApp(App[str | None]):
    """The conversation list; returns the room to open, or None to quit."""

    CSS = """
    #header { background: $panel; color: $text; text-style: bold; }
    #rooms { height: 1fr; }
    #notice { background: $panel; }
    #command { dock: bottom; }
    """
    BINDINGS: ClassVar[list[tuple[str, str, str]]] = []

    def __init__(self, rooms: ConversationList, *, share: Share | None = None) -> None:
        super().__init__()
        self.rooms = rooms
        self.share = share
        self.show_archived = False
        self.shown: list[Entry] = []
        self._unobserve: Callable[[], None] | None = None
        self.title = "crdtchat · conversations"

    def compose(self) -> ComposeResult:
        yield Line(id="header")
        yield Line(id="rooms")
        yield Line(id="notice")
        yield Input(placeholder=HELP, id="command")

    def on_mount(self) -> None:
        self._unobserve = self.rooms.observe(self._redraw)
        self._redraw()
        self.query_one("#command", Input).focus()

    def on_unmount(self) -> None:
        if self._unobserve is not None:
            self._unobserve()

    def _redraw(self) -> None:
        self.shown = self.rooms.entries(archived=self.show_archived)
        which = "archived conversations" if self.show_archived else "conversations"
        self.query_one("#header", Line).say(f"{len(self.shown)} {which}")
        lines = [describe(n, e) for n, e in enumerate(self.shown, 1)]
        self.query_one("#rooms", Line).say("\n".join(lines) or "(none yet: type `new TITLE`)")

    def say(self, text: str, *, error: bool = False) -> None:
        self.query_one("#notice", Line).say(text, error=error)

    def _entry(self, word: str) -> Entry:
        if not word.isdigit() or not 1 <= int(word) <= len(self.shown):
            raise ValueError(f"no conversation number {word!r} on the screen")
        return self.shown[int(word) - 1]

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.value = ""
        try:
            await self.run_command(event.value.strip())
        except (ValueError, CrdtchatError) as error:
            self.say(str(error), error=True)

    async def run_command(self, line: str) -> None:
        """One command of the input line (the module docstring lists them)."""
        verb, _, rest = line.partition(" ")
        rest = rest.strip()
        args = rest.split()
        rooms = self.rooms
        if verb == "new":
            made = rooms.create(rest or None)
            self.say(f"created {made.room}")
        elif verb == "add" and args:
            rooms.add(args[0], rest.partition(" ")[2].strip() or None)
            self.say(f"added {args[0]}")
        elif verb == "open" and args:
            self.exit(self._entry(args[0]).room)
        elif verb == "rename" and args:
            entry = self._entry(args[0])
            rooms.rename(entry.room, rest.partition(" ")[2].strip() or None)
        elif verb in ("pin", "unpin") and args:
            rooms.pin(self._entry(args[0]).room, verb == "pin")
        elif verb in ("archive", "unarchive") and args:
            rooms.archive(self._entry(args[0]).room, verb == "archive")
        elif verb == "archived":
            self.show_archived = not self.show_archived
        elif verb == "leave" and args:
            entry = self._entry(args[0])
            rooms.remove(entry.room)
            self.say(f"left {entry.title or entry.room}")
        elif verb in ("share", "unshare") and len(args) >= 2:
            if self.share is None:
                raise ValueError("sharing needs the relay: not connected")
            entry = self._entry(args[0])
            role = args[2] if verb == "share" and len(args) > 2 else None
            if verb == "share" and role not in ("reader", "writer"):
                raise ValueError("share N SUB reader|writer")
            await self.share(entry.room, args[1], role)
            self.say(f"shared with {args[1]} as {role}" if role else f"removed {args[1]}")
        elif verb == "quit":
            self.exit(None)
        else:
            raise ValueError(f"commands: {HELP}")
        self._redraw()


def relay_share(relay: RelaySource, token: str) -> Share:
    """A `Share` through the relay's membership endpoints, off the event loop; `relay` may be
    a function naming the list replica's current relay."""
    from crdtchat import membership

    async def share(room: str, sub: str, role: str | None) -> None:
        url = current_relay(relay)
        if role is None:
            await anyio.to_thread.run_sync(membership.unshare, url, room, token, sub)
        else:
            await anyio.to_thread.run_sync(
                membership.share,
                url,
                room,
                token,
                sub,
                role,  # type: ignore[arg-type]
            )

    return share
