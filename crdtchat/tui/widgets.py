"""The widgets of the chat screen: the thread, with its streaming replies, and the status lines.

Everything shown comes from other peers and may hold anything, so text is put into `Content`
as plain text (never parsed as markup, control codes stripped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Static

from crdtchat.schema import Message
from crdtchat.tui.threads import StreamView


def status_label(status: str) -> str:
    """How a reply's status reads: one cut at the token limit is incomplete, not an error
    (the web client says the same, web/src/rules.js `statusLabel`)."""
    return "incomplete (cut at the token limit)" if status == "incomplete" else status


@dataclass(frozen=True)
class MessageItem:
    number: int  # 1-based position on the shown thread: what /branch N refers to
    message: Message
    branch: tuple[int, int] | None  # (k, n): k-th of n siblings, when there are several
    mine: bool

    @property
    def key(self) -> str:
        return f"m:{self.message.id}"


@dataclass(frozen=True)
class StreamItem:
    stream: StreamView
    cancel_requested: bool

    @property
    def key(self) -> str:
        return f"s:{self.stream.turn_id}"


Item = MessageItem | StreamItem


def render_item(item: Item) -> Content:
    if isinstance(item, StreamItem):
        stream = item.stream
        state = "cancelling…" if item.cancel_requested else "writing…"
        return Content.assemble(
            ("assistant ", "bold $accent"),
            (f"({stream.holder}) {state}", "italic $text-muted"),
            "\n",
            stream.text,
            ("▌", "$accent"),
        )
    message = item.message
    head: list[str | tuple[str, str]] = [(f"#{item.number} ", "bold")]
    if message.role == "user":
        head.append(("you" if item.mine else message.author, "bold $primary"))
    elif message.role == "assistant":
        head.append(("assistant", "bold $accent"))
        if message.model is not None:
            head.append((f" · {message.model.provider}/{message.model.model}", "$text-muted"))
        if message.status and message.status != "complete":
            head.append((f" · {status_label(message.status)}", "bold $warning"))
    else:
        head.append((f"{message.role} ({message.author})", "bold $secondary"))
    if message.created_at:
        stamp = time.strftime("%H:%M", time.localtime(message.created_at))
        head.append((f" · {stamp}", "$text-muted"))
    if item.branch is not None:
        k, n = item.branch
        head.append((f"  [branch {k}/{n}]", "$text-muted"))
    parts: list[str | tuple[str, str]] = [*head, "\n", message.content]
    if message.error:
        parts.extend(["\n", (f"error: {message.error}", "$error")])
    for call in message.tool_calls or ():
        parts.extend(["\n", (f"→ {call.name}({call.arguments})", "$text-muted")])
    for file in message.files or ():
        parts.extend(["\n", (f"📎 {file.name} ({file.mime}, {file.size} bytes)", "$text-muted")])
    return Content.assemble(*parts)


class ItemBox(Static):
    """One message or one stream of the thread."""

    DEFAULT_CSS = """
    ItemBox { padding: 0 1; margin-bottom: 1; }
    ItemBox.user { border-left: thick $primary; }
    ItemBox.assistant { border-left: thick $accent; }
    ItemBox.stream { border-left: dashed $accent; }
    ItemBox.other { border-left: thick $secondary; }
    """

    def __init__(self, item: Item) -> None:
        super().__init__(render_item(item), markup=False)
        self.item = item
        self.add_class(_css_class(item))

    def show(self, item: Item) -> None:
        if item != self.item:
            self.item = item
            self.update(render_item(item))


def _css_class(item: Item) -> str:
    if isinstance(item, StreamItem):
        return "stream"
    role = item.message.role
    return role if role in ("user", "assistant") else "other"


class ThreadView(VerticalScroll):
    """The shown thread; updated in place so a growing stream does not rebuild the screen."""

    DEFAULT_CSS = """
    ThreadView { height: 1fr; }
    ThreadView > #elided { color: $text-muted; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.boxes: list[ItemBox] = []

    def compose(self):  # type: ignore[no-untyped-def]
        yield Static("", id="elided", markup=False)

    async def show(self, items: list[Item], *, elided: int) -> None:
        """Make the boxes match `items`: keep the common prefix, replace the rest."""
        follow = self.is_vertical_scroll_end or not self.boxes
        elided_note = self.query_one("#elided", Static)
        elided_note.update(f"… {elided} earlier messages" if elided else "")
        elided_note.display = bool(elided)
        keep = 0
        for box, item in zip(self.boxes, items, strict=False):
            if box.item.key != item.key:
                break
            box.show(item)
            keep += 1
        stale, self.boxes = self.boxes[keep:], self.boxes[:keep]
        if stale:
            await self.remove_children(stale)
        fresh = [ItemBox(item) for item in items[keep:]]
        if fresh:
            await self.mount_all(fresh)
            self.boxes.extend(fresh)
        if follow:
            self.scroll_end(animate=False)

    def texts(self) -> list[str]:
        """The plain text of every box, top to bottom (what a reader of the screen sees)."""
        return [str(box.visual) for box in self.boxes]


class Line(Static):
    """A one-line status display."""

    DEFAULT_CSS = """
    Line { height: auto; padding: 0 1; color: $text-muted; }
    Line.error { color: $error; }
    """

    def __init__(self, *, id: str) -> None:
        super().__init__("", id=id, markup=False)

    def say(self, text: str, *, error: bool = False) -> None:
        self.update(Content(text))
        self.set_class(error, "error")

    @property
    def text(self) -> str:
        return str(self.visual)
