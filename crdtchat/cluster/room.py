"""One room on one cluster node: a copy fed only by the stream, and the write path against it.

The relay's guarantees need one order of writes per room (a duplicate message id, a quota, a
role change are judged against everything before them). On a cluster that order is the room
subject's, so a node:

1. keeps a copy of the room (a pycrdt `Doc`) built from the snapshot and tail and then fed
   only by its follower, with `seq`, the last stream sequence applied to it;
2. before judging a write, catches up: waits until the copy has applied everything the stream
   held when the write arrived (`caught_up`);
3. judges the write against the copy at `seq` and, if accepted, publishes it conditionally on
   `seq`. A conflict means another node wrote first: catch up and judge again, so a check and
   a concurrent write on another node cannot race;
4. gives the write's acknowledgement after JetStream's (the durable point), and hands peers only
   what the follower delivers (`on_entry`), so every node sends the same order and nothing
   reaches a peer before it is stored;
5. compacts: after `compact_updates` updates or `compact_bytes` bytes since the snapshot, rolls
   the copy up at `seq`, conditional on `seq` (an update landing meanwhile fails the roll-up;
   the next update tries again).

The websocket side (frames, roles, acknowledgements numbering) stays in the relay's protocol
core; this is what that core's "store" and "broadcast" mean on a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pycrdt import Doc

from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.cluster.roomlog import Appended, LogEntry, RoomState

log = logging.getLogger("crdtchat.cluster.room")

# How long a conflict with a write still in flight waits for that write before reading again.
IN_FLIGHT_WAIT = 0.5

Judge = Callable[[Doc, bytes], "str | None"]
"""Judges an update against the caught-up copy: None to accept, else the refusal's reason."""


class FollowerLike(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def __aiter__(self) -> AsyncIterator[LogEntry]: ...


class RoomLogLike(Protocol):
    """What a `ClusterRoom` needs of its log: `RoomLog` on NATS, or `MemoryRoomLog`."""

    async def last_seq(self, room: str) -> int: ...
    async def load(self, room: str) -> RoomState: ...
    def follow(self, room: str, after_seq: int = 0) -> FollowerLike: ...
    async def append(
        self, room: str, update: bytes, *, expected_seq: int, msg_id: str, deadline: float = ...
    ) -> Appended: ...
    async def compact(
        self, room: str, snapshot: bytes, *, upto_seq: int, deadline: float = ...
    ) -> int: ...


@dataclass(frozen=True)
class RefusedAt:
    """An update the copy refused at sequence `seq` (livedoc's Refused plus where it was judged,
    so a caller can tell a refusal of a stale copy from one of the current state)."""

    reason: str
    seq: int  # the copy's sequence the update was judged at


class ClusterRoom:
    def __init__(
        self,
        log: RoomLogLike,
        room: str,
        *,
        on_entry: Callable[[LogEntry], Awaitable[None]] | None = None,
        compact_updates: int = 1000,
        compact_bytes: int = 256 * 1024,
        max_attempts: int = 50,
    ) -> None:
        self.log = log
        self.room = room
        self.on_entry = on_entry
        self.compact_updates = compact_updates
        self.compact_bytes = compact_bytes
        self.max_attempts = max_attempts
        self.doc: Doc = Doc()
        self.seq = 0
        self.updates_since_snapshot = 0
        self.bytes_since_snapshot = 0
        self._advanced = asyncio.Condition()
        self._follower: FollowerLike | None = None
        self._task: asyncio.Task[None] | None = None
        self._compacting: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    async def open(self) -> None:
        """Load the snapshot and tail, then follow the room live."""
        state = await self.log.load(self.room)
        for entry in state.entries:
            self._apply(entry)
        self._follower = self.log.follow(self.room, after_seq=self.seq)
        await self._follower.start()
        self._task = asyncio.create_task(self._follow(), name=f"follow {self.room}")

    async def close(self) -> None:
        for task in (self._task, self._compacting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._follower is not None:
            await self._follower.close()

    def _apply(self, entry: LogEntry) -> None:
        if not (entry.snapshot and entry.covers and entry.covers == self.seq):
            self.doc.apply_update(entry.data)
        self.seq = entry.seq
        if entry.snapshot:
            self.updates_since_snapshot = self.bytes_since_snapshot = 0
        else:
            self.updates_since_snapshot += 1
            self.bytes_since_snapshot += len(entry.data)

    async def _follow(self) -> None:
        assert self._follower is not None
        try:
            async for entry in self._follower:
                self._apply(entry)
                async with self._advanced:
                    self._advanced.notify_all()
                if self.on_entry is not None:
                    await self.on_entry(entry)
                self._maybe_compact()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the copy can no longer be trusted: writes must stop
            self.failure = exc
            log.exception("room %s: following the stream failed", self.room)
            async with self._advanced:
                self._advanced.notify_all()

    async def wait_for_seq(self, seq: int, timeout: float = 30.0) -> None:
        """Until the copy has applied sequence `seq` (or a later one)."""
        async with asyncio.timeout(timeout), self._advanced:
            await self._advanced.wait_for(lambda: self.seq >= seq or self.failure is not None)
        if self.failure is not None:
            raise ClusterError(f"room {self.room}: the copy stopped following") from self.failure

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Until the copy holds everything the stream holds now."""
        await self.wait_for_seq(await self.log.last_seq(self.room), timeout)

    async def submit(self, update: bytes, msg_id: str, judge: Judge) -> Appended | RefusedAt:
        """Judge `update` against the caught-up copy and store it if accepted.

        Returns once JetStream acknowledged it (the durable point) or it was refused; peers get
        it when the follower delivers it (`on_entry`), on this node and every other.
        """
        target = await self.log.last_seq(self.room)
        for _ in range(self.max_attempts):
            await self.wait_for_seq(target)
            seq = self.seq  # judged at, and the condition of the publish: no await in between
            reason = judge(self.doc, update)
            if reason is not None:
                return RefusedAt(reason, seq)
            try:
                return await self.log.append(self.room, update, expected_seq=seq, msg_id=msg_id)
            except SequenceConflict as conflict:
                if conflict.last_seq is not None:
                    target = conflict.last_seq
                    continue
            # Another node's write to this room is still being replicated (JetStream does not
            # say its sequence yet): wait for it to arrive, briefly, in case it fails.
            with contextlib.suppress(TimeoutError):
                await self.wait_for_seq(seq + 1, timeout=IN_FLIGHT_WAIT)
            target = await self.log.last_seq(self.room)
        raise ClusterError(f"room {self.room}: written by others {self.max_attempts} times over")

    def _maybe_compact(self) -> None:
        due = (
            self.updates_since_snapshot >= self.compact_updates
            or self.bytes_since_snapshot >= self.compact_bytes
        )
        if due and (self._compacting is None or self._compacting.done()):
            self._compacting = asyncio.create_task(self._compact(), name=f"compact {self.room}")

    async def _compact(self) -> None:
        upto, snapshot = self.seq, self.doc.get_update()
        try:
            await self.log.compact(self.room, snapshot, upto_seq=upto)
        except SequenceConflict:
            pass  # an update came after `upto`: the next one that arrives tries again
        except ClusterError as exc:
            log.warning("room %s: compaction failed: %s", self.room, exc)
