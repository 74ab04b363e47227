"""How the client's document reaches the relay, as far as the UI needs to know.

The UI shows three facts (online or not, how many local updates the relay has not stored,
whether everything is stored) and publishes presence through an Awareness. `Link` is that
much and no more, so the app runs against a real `Replica` or with no relay at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pycrdt import Awareness, Doc

from crdtchat.document import Conversation

if TYPE_CHECKING:
    from crdtchat.replica import Recovery, Replica

Unsubscribe = Callable[[], None]


@dataclass(frozen=True)
class LinkStatus:
    online: bool
    pending: int  # local updates the relay has not acknowledged as durably stored
    detail: str = ""  # why offline, or the relay's last refusal

    @property
    def stored(self) -> bool:
        return self.pending == 0

    def describe(self) -> str:
        if self.online:
            text = "online · all stored" if self.stored else f"online · {self.pending} pending"
        else:
            text = f"offline · {self.pending} pending" if self.pending else "offline · all stored"
        return f"{text} · {self.detail}" if self.detail else text


class Link(Protocol):
    awareness: Awareness

    def status(self) -> LinkStatus: ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        """Call `callback` (with no arguments, on the event loop) when the status changes."""
        ...


class DetachedLink:
    """No relay: the document lives only in this process (tests, or a look at a saved file)."""

    def __init__(self, doc: Doc, *, detail: str = "no relay") -> None:
        self.awareness = Awareness(doc)
        self._detail = detail

    def status(self) -> LinkStatus:
        return LinkStatus(online=False, pending=0, detail=self._detail)

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return lambda: None


class ReplicaLink:
    """A `crdtchat.replica.Replica`, seen through `Link`."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.awareness = replica.awareness

    def status(self) -> LinkStatus:
        status = self.replica.status
        if status.rejected:
            detail = f"refused: {status.rejected}"
        elif status.blocked:
            detail = f"the relay refused a write ({status.denied}); /recover to drop it"
        elif status.denied:
            detail = f"relay refused a write: {status.denied}"
        elif status.store_error:
            detail = f"local file not written ({status.store_error}); edits kept in memory"
        else:
            detail = ""
        return LinkStatus(online=status.connected, pending=status.pending, detail=detail)

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self.replica.on_status(lambda _status: callback())

    async def recover(self, reopen: Callable[[Doc], Conversation]) -> tuple[Conversation, Recovery]:
        """`Replica.recover`, and the new document wrapped by `reopen`, whose view the replica
        keeps snapshots of from now on."""
        recovery = await self.replica.recover()
        conversation = reopen(recovery.doc)
        self.replica.set_view(conversation.view)
        return conversation, recovery
