"""The message ids of one room, so the relay can refuse a message that would shadow another.

Readers keep the first message of an id in document order (design §2), so a new message that
reuses an id, inserted before the original, would replace it for every reader. The relay keeps
every id that a well-formed message of the room carries (the same ones `MessageView.claimed`
knows) and judges each new message against it with `crdtchat.schema.message_id_refusal`
(design §7.2).

The index is read from the document once, before the first write that could add a message,
and then kept up to date from the messages the relay accepts: an update's new ids are held
apart until the whole update is accepted, so a refused update leaves no trace here either.
"""

from __future__ import annotations

from pycrdt import Array

from crdtchat.schema import message_id_refusal
from crdtchat.view import open_entries, parse_all

Taken = tuple[str, str | None]  # (role, parent) of the message holding an id


class MessageIds:
    """id → (role, parent) of the first well-formed message carrying it."""

    def __init__(self) -> None:
        self._taken: dict[str, Taken] | None = None
        self._new: dict[str, Taken] = {}

    @property
    def loaded(self) -> bool:
        return self._taken is not None

    def load(self, messages: Array, shape_checked: bool = False) -> None:
        """Index `messages` as they are now (before the update that is about to be judged).
        Unless the room's structure index vouches for their shape (`shape_checked`), items
        nested too deeply to render are skipped first (design §7.1)."""
        taken: dict[str, Taken] = {}
        entries = parse_all(str(messages)) if shape_checked else open_entries(messages)
        for entry in entries:
            message = entry.message
            if message is not None and message.id not in taken:
                taken[message.id] = (message.role, message.parent)
        self._taken = taken

    def claim(self, message_id: str, role: str, parent: str | None) -> str | None:
        """Why a new message may not carry `message_id`; otherwise hold it for `commit`."""
        if self._taken is None:
            raise RuntimeError("MessageIds.load must run before the first claim")
        taken = self._new.get(message_id) or self._taken.get(message_id)
        reason = message_id_refusal(message_id, role, parent, taken)
        if reason is None and taken is None:
            self._new[message_id] = (role, parent)
        return reason

    def commit(self) -> None:
        """The update that made the claims since the last commit or discard was accepted."""
        if self._new:
            assert self._taken is not None
            self._taken.update(self._new)
            self._new.clear()

    def discard(self) -> None:
        """The update was refused: forget its claims."""
        self._new.clear()

    def forget(self) -> None:
        """The document changed without a judgement (a stored update from elsewhere): read
        the ids again before the next claim."""
        self._taken = None
        self._new.clear()

    def __contains__(self, message_id: str) -> bool:
        return self._taken is not None and message_id in self._taken
