"""Which thread the client shows, and what is streaming into it.

The shared default is the current thread (design §2). A person may anchor the view on another
message instead (after /switch or a branch): the view then shows the newest thread through that
message, so a reply arriving under it still appears. This is a local choice, never written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pycrdt import Map, Text

from crdtchat.document import Conversation
from crdtchat.schema import Message


@dataclass(frozen=True)
class StreamView:
    """A reply being written by a worker, as far as it has got."""

    turn_id: str
    parent: str
    holder: str
    text: str


def newest_leaf_under(conversation: Conversation, message_id: str) -> str:
    """The leaf, last in document order, among `message_id` and its descendants."""
    index = conversation.view.index
    newest = message_id
    stack = [message_id]
    while stack:
        current = stack.pop()
        children = index.children.get(current)
        if children:
            stack.extend(children)
        elif newest == message_id or index.position_of[current] > index.position_of[newest]:
            newest = current
    return newest


def shown_thread(conversation: Conversation, anchor: str | None) -> list[Message]:
    """The current thread, or the newest thread through `anchor` (if it still exists)."""
    if anchor is None or conversation.view.get(anchor) is None:
        return conversation.current_thread()
    return conversation.thread(newest_leaf_under(conversation, anchor))


def streams_on(
    conversation: Conversation, thread: Sequence[Message] | Mapping[str, int]
) -> list[StreamView]:
    """Streams in flight whose parent is on `thread`, in the order of their parents.

    `thread` may be given as its messages or as message id → position on it (which the
    caller can keep between redraws of a long thread).
    """
    if isinstance(thread, Mapping):
        on_thread = thread
    else:
        on_thread = {message.id: number for number, message in enumerate(thread)}
    found = []
    for turn_id in list(conversation.streams.keys()):
        stream = conversation.streams.get(turn_id)
        if not isinstance(stream, Map):
            continue  # anyone can write anything: skip what does not fit
        parent, holder, text = stream.get("parent"), stream.get("holder"), stream.get("text")
        if not isinstance(parent, str) or parent not in on_thread or not isinstance(text, Text):
            continue
        if conversation.view.get(turn_id) is not None:
            continue  # already committed; a stale stream entry must not show twice
        found.append(
            StreamView(turn_id, parent, holder if isinstance(holder, str) else "?", str(text))
        )
    found.sort(key=lambda s: (on_thread[s.parent], s.turn_id))
    return found


def last_answer(thread: list[Message]) -> Message | None:
    """The last assistant message on `thread`."""
    for message in reversed(thread):
        if message.role == "assistant":
            return message
    return None


def regeneration_target(thread: list[Message]) -> Message | None:
    """The message whose answer /regen asks for again.

    That is the message the last answer on the thread answers; if the thread ends in a user
    or tool message that has not been answered yet, there is nothing to regenerate.
    """
    answer = last_answer(thread)
    if answer is None or answer.parent is None:
        return None
    for message in thread:
        if message.id == answer.parent:
            return message
    return None
