"""The chat screen: one conversation, its shown thread, presence, the shared draft, commands.

The app redraws on document change events (pycrdt observers on the roots it shows) and on
awareness and link status callbacks. Observers run inside pycrdt's commit, where nothing may
write to the document, so they only mark what changed and schedule one refresh on Textual's
message queue; the refresh does the reading, and any writing (read marks).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pycrdt import Subscription
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.timer import Timer
from textual.widgets import Input

from crdtchat.document import FOLLOW_CURRENT, Conversation, ConversationError
from crdtchat.errors import ConfigError
from crdtchat.portable import export_json
from crdtchat.schema import SCHEMA_VERSION, FileRef, Message
from crdtchat.signals import Changes
from crdtchat.tui import commands
from crdtchat.tui.blobs import AttachmentError
from crdtchat.tui.link import Link
from crdtchat.tui.presence import describe, local_state, summarise
from crdtchat.tui.threads import (
    newest_leaf_under,
    regeneration_target,
    shown_thread,
    streams_on,
)
from crdtchat.tui.widgets import Item, Line, MessageItem, StreamItem, ThreadView
from crdtchat.view import ViewSnapshot
from crdtchat.worker.titles import title_of

log = logging.getLogger(__name__)

# Messages rendered at the end of a long thread (the rest is summarised in one line): layout
# cost grows with the number of widgets, and a stream redraw relays them all out.
MAX_SHOWN = 60


READER_TOKEN = "this token is read-only: you can read, switch branches and export"


class UserError(ConfigError):
    """Something the person asked for that cannot be done; shown, never raised further."""


class Uploader(Protocol):
    async def upload(self, path: Path) -> FileRef: ...


class ChatApp(App[None]):
    CSS = """
    #header { background: $panel; color: $text; text-style: bold; }
    #notice { max-height: 12; }
    #presence, #status { background: $panel; }
    #composer { dock: bottom; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("ctrl+g", "cancel_reply", "Cancel reply", priority=True),
        Binding("escape", "stop_editing", "Stop editing", show=False),
    ]

    def __init__(
        self,
        conversation: Conversation,
        link: Link,
        *,
        room: str,
        device: str,
        uploader: Uploader | None = None,
        typing_idle: float = 3.0,
        read_only: bool = False,
        preview: ViewSnapshot | None = None,
    ) -> None:
        super().__init__()
        # The end of the thread as it was last time (the replica's stored view snapshot):
        # shown until the document has loaded, never used for anything but showing.
        self.preview = preview
        self._document_unsubscribe: list[Callable[[], None]] = []
        self.conversation = conversation
        self.link = link
        self.room = room
        self.device = device
        self.uploader = uploader
        self.typing_idle = typing_idle
        self.read_only = read_only  # a reader token: the relay would refuse every write
        # Why writes are refused, shown when one is tried (the role may be unknown, not reader).
        self.read_only_reason = READER_TOKEN
        self.anchor: str | None = None  # None: follow the current thread (design §2)
        self.shown: list[Message] = []
        self._shown_items: list[MessageItem] = []
        self._shown_positions: dict[str, int] = {}
        self.editing: str | None = None  # id of the message the next send replaces
        self.attachments: list[FileRef] = []
        self.listed_leaves: list[str] = []
        self._typing = False
        self._typing_timer: Timer | None = None
        self._dirty: set[str] = set()
        self._refresh_queued = False
        self._unsubscribe: list[Callable[[], None]] = []
        self.updated = Changes()  # notified after every redraw of the thread or status lines
        # Called with the new Conversation after /recover replaced the document, so whoever
        # follows the old one (the membership) can follow the new one.
        self.reopened: list[Callable[[Conversation], None]] = []
        self.title = f"crdtchat · {room}"

    # -- layout and lifecycle --------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Line(id="header")
        yield ThreadView(id="thread")
        yield Line(id="notice")
        yield Line(id="presence")
        yield Line(id="status")
        yield Input(placeholder="Message, or /help for commands", id="composer")

    async def on_mount(self) -> None:
        self._watch_document()
        awareness = self.link.awareness
        awareness_id = awareness.observe(self._on_awareness)
        self._unsubscribe.append(lambda: awareness.unobserve(awareness_id))
        self._unsubscribe.append(self.link.subscribe(lambda: self._changed("status")))
        awareness.set_local_state(local_state(self.conversation.author, self.device, False))
        self._dirty |= {"thread", "draft", "header", "presence", "status"}
        await self._apply_changes()
        self.query_one("#composer", Input).focus()

    def on_unmount(self) -> None:
        for unsubscribe in self._unsubscribe + self._document_unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._document_unsubscribe.clear()

    def _watch_document(self) -> None:
        for unsubscribe in self._document_unsubscribe:
            unsubscribe()
        self._document_unsubscribe.clear()
        conversation = self.conversation
        parts = [
            (conversation.messages, "thread"),
            (conversation.streams, "streams"),
            (conversation.cancels, "streams"),
            (conversation.drafts, "draft"),
            (conversation.settings_map, "header"),
            (conversation.meta, "header"),
        ]
        for root, part in parts:
            subscription = root.observe_deep(self._observer(part))
            self._document_unsubscribe.append(_unobserver(root, subscription))
        # The worker's title (a `title` derived entry) shows when the person has set none;
        # other derived entries (usage, provider state) do not touch the header.
        derived = conversation.derived
        subscription = derived.observe(self._on_derived)
        self._document_unsubscribe.append(_unobserver(derived, subscription))

    def _observer(self, part: str) -> Callable[[Any], None]:
        # One positional parameter: pycrdt passes the transaction too to two-parameter callbacks.
        return lambda _events: self._changed(part)

    # -- change events ---------------------------------------------------------------------

    def _changed(self, part: str) -> None:
        """Called from observers (inside a pycrdt commit): only note it and schedule."""
        self._dirty.add(part)
        if not self._refresh_queued and self.is_running:
            self._refresh_queued = True
            self.call_later(self._apply_changes)

    def _on_derived(self, event: Any) -> None:
        if any(str(key).startswith("title:") for key in event.keys):
            self._changed("header")

    def _on_awareness(self, topic: str, _change: tuple[dict[str, Any], Any]) -> None:
        if topic == "change":
            self._changed("presence")

    async def _apply_changes(self) -> None:
        self._refresh_queued = False
        dirty, self._dirty = self._dirty, set()
        try:
            if "thread" in dirty:
                await self._refresh_thread()
            elif "streams" in dirty:
                await self._show_items()  # a stream grew: the messages are as they were
            if "draft" in dirty:
                self._refresh_draft()
            if "header" in dirty:
                self._refresh_header()
            if "presence" in dirty:
                self._refresh_presence()
            if dirty & {"status", "thread"}:
                self._refresh_status()
        except Exception as error:  # a peer wrote something we did not foresee: show it, go on
            log.exception("refresh failed")
            self.notice(f"display error: {error}", error=True)
        self.updated.notify()

    async def _refresh_thread(self) -> None:
        conversation = self.conversation
        thread = shown_thread(conversation, self.anchor)
        if not thread and self.preview is not None:
            await self._show_preview(self.preview)
            return
        self.preview = None
        self.shown = thread
        self._shown_positions = {message.id: number for number, message in enumerate(thread)}
        if self.editing is not None and conversation.view.get(self.editing) is None:
            self.editing = None
        start = max(0, len(thread) - MAX_SHOWN)
        self._shown_items = [
            MessageItem(
                number=number,
                message=message,
                branch=self._branch_position(message),
                mine=message.author == conversation.author,
            )
            for number, message in enumerate(thread[start:], start + 1)
        ]
        await self._show_items()
        if not self.read_only and thread and conversation.read_mark() != thread[-1].id:
            conversation.mark_read(thread[-1].id)

    async def _show_preview(self, preview: ViewSnapshot) -> None:
        """The stored end of the thread, numbered as it was, while the document loads."""
        tail = preview.tail[-MAX_SHOWN:]
        first = preview.thread_length - len(tail) + 1
        author = self.conversation.author
        items: list[Item] = [
            MessageItem(number=number, message=message, branch=None, mine=message.author == author)
            for number, message in enumerate(tail, first)
        ]
        await self.query_one("#thread", ThreadView).show(items, elided=first - 1)

    async def _show_items(self) -> None:
        conversation = self.conversation
        items: list[Item] = list(self._shown_items)
        for stream in streams_on(conversation, self._shown_positions):
            items.append(StreamItem(stream, conversation.cancel_requested(stream.turn_id)))
        elided = self._shown_items[0].number - 1 if self._shown_items else 0
        await self.query_one("#thread", ThreadView).show(items, elided=elided)

    def _branch_position(self, message: Message) -> tuple[int, int] | None:
        if message.parent is None:
            return None
        siblings = self.conversation.view.index.children.get(message.parent, [])
        if len(siblings) < 2:
            return None
        return siblings.index(message.id) + 1, len(siblings)

    def _refresh_draft(self) -> None:
        composer = self.query_one("#composer", Input)
        remote = self.conversation.draft()
        if composer.value == remote:
            return
        cursor = composer.cursor_position
        at_end = cursor >= len(composer.value)
        with composer.prevent(Input.Changed):
            composer.value = remote
        composer.cursor_position = len(remote) if at_end else min(cursor, len(remote))

    def _refresh_header(self) -> None:
        conversation = self.conversation
        settings = conversation.settings
        model = "/".join(x for x in (settings.provider, settings.model) if x) or "worker default"
        parts = [self.room]
        title = title_of(conversation)  # the person's own, else the worker's
        if title:
            parts.append(title)
        parts.append(f"model: {model}")
        self.query_one("#header", Line).say(" · ".join(parts))

    def _refresh_presence(self) -> None:
        awareness = self.link.awareness
        summary = summarise(
            awareness.states, my_client_id=awareness.client_id, me=self.conversation.author
        )
        self.query_one("#presence", Line).say(describe(summary, self.device))

    def _refresh_status(self) -> None:
        status = self.link.status()
        parts = [status.describe()]
        if self.anchor is not None:
            parts.append("branch view (/follow for the newest thread)")
        if self.editing is not None:
            number = self._number_of(self.editing)
            parts.append(f"editing #{number} (esc to stop)" if number else "editing")
        if self.attachments:
            names = ", ".join(f.name for f in self.attachments)
            parts.append(f"attached: {names}")
        self.query_one("#status", Line).say(" · ".join(parts), error=bool(status.detail))

    def notice(self, text: str, *, error: bool = False) -> None:
        self.query_one("#notice", Line).say(text, error=error)
        self.updated.notify()

    # -- the composer ----------------------------------------------------------------------

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "composer":
            return
        if not self.read_only and event.value != self.conversation.draft():
            self.conversation.set_draft(event.value)
        self._set_typing(bool(event.value))

    def _set_typing(self, typing: bool) -> None:
        if self._typing_timer is not None:
            self._typing_timer.stop()
            self._typing_timer = None
        if typing:
            self._typing_timer = self.set_timer(self.typing_idle, lambda: self._set_typing(False))
        if typing != self._typing:
            self._typing = typing
            state = local_state(self.conversation.author, self.device, typing)
            self.link.awareness.set_local_state(state)

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "composer":
            return
        line = event.value
        try:
            command = commands.parse(line)
        except commands.ChatCommandError as error:
            self.notice(str(error), error=True)  # the line stays in the composer to be fixed
            return
        if command is None:
            return
        self._set_composer("")
        self._set_typing(False)
        if not await self.run_command(command) and isinstance(command, commands.Send):
            self._set_composer(line)  # not sent: give the text back

    def _set_composer(self, text: str) -> None:
        composer = self.query_one("#composer", Input)
        with composer.prevent(Input.Changed):
            composer.value = text
        composer.cursor_position = len(text)
        if not self.read_only and self.conversation.draft() != text:
            self.conversation.set_draft(text)

    # -- commands --------------------------------------------------------------------------

    async def execute(self, command: commands.Command) -> None:
        """Carry out one command; raises UserError (and document errors) to be shown."""
        c = commands
        if self.read_only and isinstance(command, _WRITES):
            raise UserError(self.read_only_reason)
        if isinstance(command, c.Send):
            self.send(command.text)
        elif isinstance(command, c.Regenerate):
            self.regenerate()
        elif isinstance(command, c.Cancel):
            self.cancel_reply()
        elif isinstance(command, c.SetModel):
            self.conversation.set_settings(model=command.name)
            self.notice(f"model set to {command.name} for the next answers")
        elif isinstance(command, c.SetProvider):
            self.conversation.set_settings(provider=command.name)
            self.notice(f"provider set to {command.name} for the next answers")
        elif isinstance(command, c.SetSystem):
            self.conversation.set_settings(system=command.text)
            self.notice("system prompt set" if command.text else "system prompt cleared")
        elif isinstance(command, c.Branch):
            self.branch(command.number, command.text)
        elif isinstance(command, c.ListBranches):
            self.list_branches()
        elif isinstance(command, c.Switch):
            self.switch(command.number)
        elif isinstance(command, c.Follow):
            self.anchor = None
            self._changed("thread")
            self.notice("following the newest thread")
        elif isinstance(command, c.Attach):
            self.run_worker(self.attach(command.path), group="attach", exit_on_error=False)
        elif isinstance(command, c.Detach):
            self.attachments.clear()
            self.notice("attachments dropped")
        elif isinstance(command, c.Export):
            self.export(command.path)
        elif isinstance(command, c.Recover):
            await self.recover()
        elif isinstance(command, c.Help):
            self.notice(commands.HELP)
        elif isinstance(command, c.Quit):
            self.exit()
        else:
            raise UserError(f"unhandled command {command!r}")

    def send(self, text: str) -> Message:
        """Append a user message at the end of the shown thread (or as an edit)."""
        conversation = self.conversation
        if self.editing is not None:
            parent = conversation.message(self.editing).parent
        elif self.anchor is not None and conversation.view.get(self.anchor) is not None:
            parent = newest_leaf_under(conversation, self.anchor)
        else:
            parent = FOLLOW_CURRENT
        with conversation.doc.transaction():
            if conversation.meta.get("schema") is None:  # the room's first write
                conversation.meta["schema"] = SCHEMA_VERSION
                conversation.meta["created_at"] = conversation.clock()
            message = conversation.append(
                "user", text, parent=parent, files=list(self.attachments) or None
            )
        was_editing = self.editing is not None
        self.editing = None
        self.attachments.clear()
        if self.anchor is not None:
            self.anchor = message.id
        self.notice("sent as a new branch" if was_editing else "")
        self._changed("thread")
        return message

    async def recover(self) -> None:
        """Drop the local changes the relay refused, reload from it, and say what was kept."""
        recover = getattr(self.link, "recover", None)
        if recover is None:
            raise UserError("nothing to recover from: this client has no relay")
        old = self.conversation
        self.notice("reloading from the relay…")
        conversation, recovery = await recover(
            lambda doc: Conversation(doc, author=old.author, clock=old.clock, role=old.role)
        )
        self.conversation = conversation
        self._watch_document()
        for callback in list(self.reopened):
            callback(conversation)
        old.close()
        self.editing = None
        composer = self.query_one("#composer", Input)
        if recovery.unsent and not conversation.draft():
            self._set_composer(recovery.unsent[-1])  # the last unsent message, to send again
        elif composer.value != conversation.draft():
            self._dirty.add("draft")
        self._dirty |= {"thread", "header", "status"}
        await self._apply_changes()
        self.notice(recovery.describe())

    def regenerate(self) -> None:
        target = regeneration_target(self.shown)
        if target is None:
            raise UserError("nothing to regenerate: there is no answer on this thread yet")
        n = self.conversation.request_regeneration(target.id)
        if self.anchor is not None:
            self.anchor = target.id
        self.notice(f"asked for answer {n} to #{self._number_of(target.id)}")

    def cancel_reply(self) -> None:
        conversation = self.conversation
        turns = [s.turn_id for s in streams_on(conversation, self._shown_positions)]
        for answered, turn_id in _leases(conversation).items():
            committed = conversation.view.get(turn_id) is not None
            if answered in self._shown_positions and turn_id not in turns and not committed:
                turns.append(turn_id)
        if not turns:
            raise UserError("no reply is being written on this thread")
        for turn_id in turns:
            conversation.request_cancel(turn_id)
        self.notice("cancel requested" if len(turns) == 1 else f"{len(turns)} cancels requested")

    def branch(self, number: int, text: str | None) -> None:
        message = self._numbered(number)
        if message.role != "user":
            raise UserError(
                f"#{number} is a{'n' if message.role[0] in 'aeiou' else ''} {message.role} "
                "message; only user messages can be edited (/regen asks for another answer)"
            )
        self.editing = message.id
        if text is not None:
            self.send(text)
            return
        self._set_composer(message.content)
        self.notice(f"editing #{number}: change it and press enter to send it as a new branch")

    def list_branches(self) -> None:
        conversation = self.conversation
        leaves = conversation.leaves()
        self.listed_leaves = [leaf.id for leaf in leaves]
        shown_leaf = self.shown[-1].id if self.shown else None
        lines = []
        for number, leaf in enumerate(leaves, 1):
            marker = "*" if leaf.id == shown_leaf else " "
            length = len(conversation.thread(leaf.id))
            snippet = " ".join(leaf.content.split())[:50] or "(empty)"
            lines.append(f"{marker}{number}. {length} messages, ends with {leaf.role}: {snippet}")
        lines.append("/switch N shows branch N; /follow goes back to the newest")
        self.notice("\n".join(lines))

    def switch(self, number: int) -> None:
        leaves = self.listed_leaves or [leaf.id for leaf in self.conversation.leaves()]
        if number > len(leaves):
            raise UserError(f"there are {len(leaves)} branches (/branches lists them)")
        leaf = leaves[number - 1]
        if self.conversation.view.get(leaf) is None:
            raise UserError("that branch is gone; /branches lists them again")
        self.anchor = leaf
        self.editing = None
        self._changed("thread")
        self.notice(f"showing branch {number}")

    async def attach(self, path: Path) -> None:
        """Upload in a worker so the screen stays live; errors are shown like any other."""
        if self.uploader is None:
            self.notice("attachments need a relay to upload to", error=True)
            return
        self.notice(f"uploading {path.name}…")
        try:
            ref = await self.uploader.upload(path)
        except (AttachmentError, OSError) as error:
            self.notice(_reason(error), error=True)
            return
        self.attachments.append(ref)
        self.notice(f"{ref.name} attached to your next message ({ref.size} bytes)")
        self._changed("status")

    def export(self, path: Path) -> None:
        data = export_json(self.conversation)
        directory = path.parent if str(path.parent) else Path(".")
        # write next to the target and rename: a failed export never leaves half a file
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.notice(f"exported {len(self.conversation)} messages to {path}")

    # -- key bindings ----------------------------------------------------------------------

    async def action_regenerate(self) -> None:
        await self.run_command(commands.Regenerate())

    async def action_cancel_reply(self) -> None:
        await self.run_command(commands.Cancel())

    def action_stop_editing(self) -> None:
        if self.editing is not None:
            self.editing = None
            self._set_composer("")
            self.notice("edit dropped")
            self._changed("status")

    async def run_command(self, command: commands.Command) -> bool:
        """Execute `command`, showing any failure instead of raising it; True if it worked."""
        try:
            await self.execute(command)
        except (UserError, ConversationError, AttachmentError, OSError, KeyError) as error:
            self.notice(_reason(error), error=True)
            return False
        except Exception as error:  # the UI boundary: never let a command take the app down
            log.exception("command failed")
            self.notice(f"{type(error).__name__}: {error}", error=True)
            return False
        finally:
            self._changed("status")
        return True

    # -- helpers ---------------------------------------------------------------------------

    def _numbered(self, number: int) -> Message:
        if not 1 <= number <= len(self.shown):
            raise UserError(f"no message #{number} on this thread (1–{len(self.shown)})")
        return self.shown[number - 1]

    def _number_of(self, message_id: str) -> int | None:
        for number, message in enumerate(self.shown, 1):
            if message.id == message_id:
                return number
        return None


_WRITES = (
    commands.Send,
    commands.Regenerate,
    commands.Cancel,
    commands.SetModel,
    commands.SetProvider,
    commands.SetSystem,
    commands.Branch,
    commands.Attach,
)


def _leases(conversation: Conversation) -> dict[str, str]:
    """answered message id → turn id of its live lease."""
    result = {}
    for answered in list(conversation.leases.keys()):
        lease = conversation.lease(answered)
        if lease is not None:
            result[answered] = lease.turn_id
    return result


def _unobserver(root: Any, subscription: Subscription) -> Callable[[], None]:
    return lambda: root.unobserve(subscription)


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, OSError) and error.strerror:
        name = f" {error.filename}" if error.filename else ""
        return f"{error.strerror}{name}"
    return str(error) or type(error).__name__
