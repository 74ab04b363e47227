"""A relay node's position in one room's subject, and what it does with each entry: no I/O.

`crdtchat serve --nats` (relaynode.py) and the simulated cluster of `crdtchat.testing` both
drive the relay's protocol core (`RoomProtocol`) from a room's stream; the decisions that
keep a node's core in stream order live here once, so that the simulation cannot drift from
the node it stands for:

- a write's message id names the node, its load of the room (`token`) and the epoch of
  withdrawals, so the node recognises its own writes coming back and a withdrawn write's
  publish never lands twice under the same id;
- each entry the follower hands over is this node's own write (stored), one it knows already
  (published and acknowledged before the follower got there, or a roll-up of exactly what it
  holds), or another node's write: applied unjudged, after withdrawing this node's
  unacknowledged writes when there are some (their conditional publishes fail) and judging
  them again;
- a conditional publish refused by a roll-up of exactly the state it was judged against is
  published after the roll-up; only the node whose own write crossed the compaction
  threshold rolls the room up, on the condition of its last known sequence.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from enum import Enum

from crdtchat.cluster.entries import LogEntry
from crdtchat.relay.protocol import Action, RoomProtocol

log = logging.getLogger("crdtchat.cluster.relay")
# Roll-ups by other nodes a publish waits out before it counts as a conflict.
MAX_ROLLUPS_SKIPPED = 5


class Consumed(Enum):
    """What an entry handed over by the room's follower is to this node."""

    OWN = "own"  # this node's write: stored (its acknowledgement may not have come yet)
    KNOWN = "known"  # already accounted for: nothing to do
    FOREIGN = "foreign"  # another node's write: `apply_foreign`


@dataclass
class RoomCursor:
    """One node's knowledge of one loaded room's subject."""

    node_id: str
    last: int  # the subject's last sequence this node knows (applied or published)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # unique per load
    # Bumped when the node withdraws its unstored writes; publishes of an older epoch are void.
    epoch: int = 0
    stream_seq: dict[int, int] = field(default_factory=dict)  # protocol seq -> stream seq
    own: set[int] = field(default_factory=set)  # protocol seqs this node published

    @property
    def prefix(self) -> str:
        """What every message id of this load of the room starts with."""
        return f"{self.node_id}:{self.token}:"

    def msg_id(self, seq: int) -> str:
        """The `Nats-Msg-Id` of the core's update `seq`, in the current epoch."""
        return f"{self.prefix}{self.epoch}.{seq}"

    def published(self, seq: int, stream_seq: int) -> None:
        """The stream acknowledged the core's update `seq` as its sequence `stream_seq`."""
        self.last = max(self.last, stream_seq)
        self.stream_seq[seq] = stream_seq
        self.own.add(seq)

    def consume(self, entry: LogEntry) -> Consumed:
        """Take the follower's next entry into account; say what it is to this node."""
        if entry.msg_id.startswith(self.prefix):
            self.last = max(self.last, entry.seq)
            return Consumed.OWN
        if entry.seq <= self.last:
            return Consumed.KNOWN
        if entry.snapshot and entry.covers == self.last:
            self.last = entry.seq  # a roll-up of what this node holds already
            return Consumed.KNOWN
        return Consumed.FOREIGN

    def withdraw(self) -> None:
        """Void every unacknowledged write of this node: the core judges them again."""
        self.epoch += 1

    def apply_foreign(self, entry: LogEntry, core: RoomProtocol, now: float) -> list[Action]:
        """Another node's write (`consume` said FOREIGN): applied unjudged, in stream order.
        If this node's core holds writes not yet stored, their conditional publishes fail:
        withdraw them, apply that write, judge them again."""
        actions: list[Action] = []
        rejudge = core.last_seq > core.durable_seq
        if rejudge:
            log.info("room %s: another node wrote first; judging its writes again", core.name)
            self.withdraw()
            actions += core.withdraw()
        self.last = entry.seq
        self.stream_seq[core.next_seq] = entry.seq  # the sequence it is committed as
        actions += core.apply_stored(entry.data)
        if rejudge:
            actions += core.resubmit(now)
        return actions

    def compaction_covers(self, upto_seq: int) -> int | None:
        """The stream sequence to roll the room up at for the core's `Compact(upto_seq)`, or
        None: only the node whose own write crossed the threshold compacts (every node counts
        the room's log, one roll-up is enough), and only while nothing came after it."""
        covers = self.stream_seq.get(upto_seq)
        if covers is not None and covers == self.last and upto_seq in self.own:
            return covers
        return None


def publish_after_rollup(last: LogEntry | None, expected: int) -> int | None:
    """A publish conditional on `expected` was refused and `last` is the subject's last entry:
    if it is a roll-up of exactly the state the update was judged against, nothing the update
    was judged against changed, and it may be published on the roll-up's sequence."""
    if last is not None and last.snapshot and last.covers == expected:
        return last.seq
    return None
