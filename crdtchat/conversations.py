"""A person's conversation list: one document per person, the same on every device (design §2).

The list lives in the room `person_room(sub)`, which only that person's identity tokens open
(the relay refuses every other token), so a `Replica` of it keeps it on each device, usable
offline, merged when they meet. It holds only what the person's devices write: which rooms are
in the list, their own titles, pinned, archived, and read marks, one root each so that changes
to different fields of one entry merge. What changes because others post (messages, last
activity, unread count) is read from the rooms themselves, through the relay's read-only
`GET /rooms/<room>/summary` (`summary`), never written into the person's list by anyone.

A conversation shared with a person appears in their list once they accept it (`add`, which
`crdtchat join` does for an invite); nobody else can put it there.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pycrdt import Doc, Map

from crdtchat import schema
from crdtchat.errors import CommandError
from crdtchat.membership import http_base
from crdtchat.replica import Replica
from crdtchat.schema import ROOM_NAME, person_room
from crdtchat.tokens import read_claims_unverified

__all__ = ["ConversationList", "Entry", "list_replica", "new_room_name", "person_room", "summary"]


@dataclass(frozen=True)
class Entry:
    """One conversation of the list, as the person's devices wrote it."""

    room: str
    added_at: float
    title: str | None = None
    pinned: bool = False
    archived: bool = False
    read: str | None = None  # id of the last message seen there


def new_room_name() -> str:
    """A fresh conversation id: random, so nobody can guess or take it in advance."""
    return "c-" + secrets.token_hex(12)


class ConversationList:
    """Reads and writes the list roots of a person's list document (`doc`)."""

    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self._roots = {name: doc.get(name, type=Map) for name in schema.LIST_ROOTS}

    def _root(self, name: str) -> Map:
        return self._roots[name]

    def entries(self, *, archived: bool | None = False) -> list[Entry]:
        """The list, pinned first, then the most recently added; `archived` None: all."""
        rooms = self._root(schema.LIST_ROOMS)
        titles = self._root(schema.LIST_TITLES)
        pinned = self._root(schema.LIST_PINNED)
        hidden = self._root(schema.LIST_ARCHIVED)
        marks = self._root(schema.LIST_READ)
        found = []
        for room, value in rooms.items():
            if not ROOM_NAME.fullmatch(room):
                continue  # not a room name: skipped, as every reader skips a bad entry
            added = value.get("added_at") if isinstance(value, dict) else None
            title, pin, arch, mark = (
                titles.get(room),
                pinned.get(room),
                hidden.get(room),
                marks.get(room),
            )
            entry = Entry(
                room,
                float(added) if isinstance(added, int | float) else 0.0,
                title if isinstance(title, str) else None,
                pin is True,
                arch is True,
                mark if isinstance(mark, str) else None,
            )
            if archived is None or entry.archived == archived:
                found.append(entry)
        found.sort(key=lambda e: (not e.pinned, -e.added_at, e.room))
        return found

    def get(self, room: str) -> Entry | None:
        return next((e for e in self.entries(archived=None) if e.room == room), None)

    def _check(self, room: str) -> None:
        if not ROOM_NAME.fullmatch(room):
            raise ValueError(f"a room name is 1-128 of A-Za-z0-9._-, not {room!r}")

    def add(self, room: str, title: str | None = None) -> Entry:
        """Put `room` in the list (creating a conversation, or accepting one shared with you)."""
        self._check(room)
        with self.doc.transaction():
            if room not in self._root(schema.LIST_ROOMS):
                self._root(schema.LIST_ROOMS)[room] = {"added_at": time.time()}
            if title is not None:
                self._root(schema.LIST_TITLES)[room] = title
        entry = self.get(room)
        assert entry is not None
        return entry

    def create(self, title: str | None = None) -> Entry:
        """A new conversation in the list; its room is created (you its owner) when a device
        first opens it with your identity token."""
        return self.add(new_room_name(), title)

    def rename(self, room: str, title: str | None) -> None:
        """Your own title for `room` (None: back to the conversation's own)."""
        self._check(room)
        titles = self._root(schema.LIST_TITLES)
        if title is None:
            if room in titles:
                del titles[room]
        else:
            titles[room] = title

    def pin(self, room: str, pinned: bool = True) -> None:
        self._check(room)
        self._root(schema.LIST_PINNED)[room] = pinned

    def archive(self, room: str, archived: bool = True) -> None:
        self._check(room)
        self._root(schema.LIST_ARCHIVED)[room] = archived

    def mark_read(self, room: str, message_id: str) -> None:
        self._check(room)
        self._root(schema.LIST_READ)[room] = message_id

    def remove(self, room: str) -> None:
        """Take `room` off the list (leaving it): its fields go too."""
        with self.doc.transaction():
            for name in schema.LIST_ROOTS:
                root = self._root(name)
                if room in root:
                    del root[room]

    def observe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` after any change to the list, local or remote; returns an undo."""
        subscriptions = [root.observe(lambda _event: callback()) for root in self._roots.values()]

        def unobserve() -> None:
            for root, subscription in zip(self._roots.values(), subscriptions, strict=True):
                root.unobserve(subscription)

        return unobserve


def list_replica(
    relay: str | Sequence[str], token: str, *, store_path: str | Path | None = None
) -> Replica:
    """A `Replica` of the token's person's list document; wrap `replica.doc` in a
    `ConversationList` (use as `async with list_replica(...) as replica:`)."""
    sub = read_claims_unverified(token).sub
    return Replica(relay, person_room(sub), token, store_path=store_path)


def summary(relay: str, room: str, token: str, read: str | None = None) -> dict[str, Any]:
    """The relay's read-only summary of `room` for the token's person: `messages`,
    `last_activity`, `last_message`, `unread` (after `read`, the list's read mark), `title`."""
    url = f"{http_base(relay)}/rooms/{room}/summary"
    try:
        response = httpx.get(
            url,
            params={} if read is None else {"read": read},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
    except httpx.HTTPError as error:
        raise CommandError(f"cannot reach the relay at {url}: {error}") from None
    if response.status_code != 200:
        raise CommandError(f"refused ({response.status_code}): {response.text.strip()}")
    return dict(response.json())
