"""What a room's log holds and answers, without a NATS client: its entries, a publish's
acknowledgement, a room as read, and the compaction loop. Shared by `RoomLog` (JetStream,
roomlog.py), its in-process stand-in (memory.py) and the simulated cluster of
`crdtchat.testing`, which must not need the `cluster` extra."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.merge import merge


@dataclass(frozen=True)
class LogEntry:
    """One message of a room's subject: a snapshot (roll-up) or an update."""

    seq: int  # the stream sequence, which orders a room's messages
    data: bytes
    snapshot: bool = False
    covers: int = 0  # a snapshot's last covered sequence
    msg_id: str = ""  # its Nats-Msg-Id: a node recognises its own writes coming back


@dataclass(frozen=True)
class Appended:
    seq: int
    duplicate: bool  # JetStream had it already (the same Nats-Msg-Id): a retry


@dataclass
class RoomState:
    """A room as read from the stream: its snapshot and the updates after it, up to `seq`."""

    room: str
    seq: int = 0  # the last sequence read; 0 for a room that holds nothing
    entries: list[LogEntry] = field(default_factory=list)

    @property
    def snapshot(self) -> LogEntry | None:
        return self.entries[0] if self.entries and self.entries[0].snapshot else None

    @property
    def updates(self) -> list[LogEntry]:
        return [entry for entry in self.entries if not entry.snapshot]

    def merged(self) -> bytes:
        """The whole document as one update (b"" for an empty room)."""
        if not self.entries:
            return b""
        return merge(*(entry.data for entry in self.entries))


class Compactable(Protocol):
    """What `compact_by_reading` needs of a room log (`RoomLog`, memory.py's stand-in)."""

    async def load(self, room: str) -> RoomState: ...
    async def compact(
        self, room: str, snapshot: bytes, *, upto_seq: int, deadline: float = ...
    ) -> int: ...


async def compact_by_reading(log: Compactable, room: str, attempts: int) -> int:
    """Read the room, merge it, roll it up; again from a fresh read on a conflict. One loop for
    the stream and its in-process stand-in, which must behave alike."""
    for _ in range(attempts):
        state = await log.load(room)
        if not state.entries:
            return 0
        try:
            return await log.compact(room, state.merged(), upto_seq=state.seq)
        except SequenceConflict:
            continue
    raise ClusterError(f"room {room}: still written to after {attempts} compaction attempts")
