"""An in-process stand-in for the room stream, with the semantics `RoomLog` relies on.

For state machines and unit tests of cluster nodes that must run many steps per second, where
three nats-server processes would cost more than the test: one stream-wide sequence; per room,
the condition on the subject's last sequence; de-duplication by message id within a window;
roll-ups that replace a room's earlier messages atomically; followers that get a room's
messages in order, then live. `tests/cluster/test_memory.py` runs one scenario against this and
against real JetStream and requires the same transcript, so the stand-in cannot drift from the
engine. `available = False` makes every call fail as an unreachable NATS does.

`MemoryRoomLog` has `RoomLog`'s methods (those `ClusterRoom` calls), so a `ClusterRoom` runs on
either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from crdtchat.cluster.entries import Appended, LogEntry, RoomState, compact_by_reading
from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.cluster.metrics import ClusterMetrics


@dataclass
class MemoryStream:
    duplicate_window: float = 120.0
    available: bool = True
    seq: int = 0
    rooms: dict[str, list[LogEntry]] = field(default_factory=dict)
    _ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # msg id -> (seq, when)
    _changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # made on first use, inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    def check(self) -> None:
        if not self.available:
            raise ClusterError("NATS unavailable (the in-memory stream is switched off)")

    def last_seq(self, room: str) -> int:
        entries = self.rooms.get(room)
        return entries[-1].seq if entries else 0

    async def publish(
        self, room: str, data: bytes, *, expected: int, msg_id: str, rollup: bool, covers: int = 0
    ) -> Appended:
        self.check()
        await asyncio.sleep(0)  # the network: other nodes' publishes may land first
        appended = self.store(
            room, data, expected=expected, msg_id=msg_id, rollup=rollup, covers=covers
        )
        async with self.changed:
            self.changed.notify_all()
        return appended

    def store(
        self, room: str, data: bytes, *, expected: int, msg_id: str, rollup: bool, covers: int = 0
    ) -> Appended:
        """The publish as the stream takes it, at once (a synchronous simulation's publish;
        followers waiting in a loop are woken by `publish`)."""
        self.check()
        now = time.monotonic()
        seen = self._ids.get(msg_id)
        if seen is not None and now - seen[1] <= self.duplicate_window:
            return Appended(seq=seen[0], duplicate=True)  # de-duplication comes first
        last = self.last_seq(room)
        if last != expected:
            raise SequenceConflict(room, expected, last)
        self.seq += 1
        entry = LogEntry(seq=self.seq, data=data, snapshot=rollup, covers=covers, msg_id=msg_id)
        if rollup:
            self.rooms[room] = [entry]
        else:
            self.rooms.setdefault(room, []).append(entry)
        self._ids[msg_id] = (self.seq, now)
        return Appended(seq=self.seq, duplicate=False)


class MemoryRoomLog:
    """`RoomLog` over a `MemoryStream`: one per node, all sharing the stream."""

    def __init__(self, stream: MemoryStream, metrics: ClusterMetrics | None = None) -> None:
        self.stream = stream
        self.metrics = metrics or ClusterMetrics(connected=True)

    async def last_seq(self, room: str) -> int:
        self.stream.check()
        return self.stream.last_seq(room)

    async def append(
        self, room: str, update: bytes, *, expected_seq: int, msg_id: str, deadline: float = 10.0
    ) -> Appended:
        try:
            appended = await self.stream.publish(
                room, update, expected=expected_seq, msg_id=msg_id, rollup=False
            )
        except SequenceConflict:
            self.metrics.publish_conflicts += 1
            raise
        self.metrics.publishes += 1
        self.metrics.publish_duplicates += appended.duplicate
        return appended

    async def compact(
        self, room: str, snapshot: bytes, *, upto_seq: int, deadline: float = 10.0
    ) -> int:
        appended = await self.stream.publish(
            room,
            snapshot,
            expected=upto_seq,
            msg_id=f"{room}:snapshot:{upto_seq}",
            rollup=True,
            covers=upto_seq,
        )
        self.metrics.compactions += 1
        return appended.seq

    async def compact_log(self, room: str, *, attempts: int = 5) -> int:
        return await compact_by_reading(self, room, attempts)

    async def load(self, room: str) -> RoomState:
        self.stream.check()
        entries = list(self.stream.rooms.get(room, []))
        return RoomState(room, entries[-1].seq if entries else 0, entries)

    def follow(self, room: str, after_seq: int = 0) -> MemoryFollower:
        return MemoryFollower(self, room, after_seq)


class MemoryFollower:
    def __init__(self, log: MemoryRoomLog, room: str, after_seq: int) -> None:
        self.log = log
        self.room = room
        self.seq = after_seq

    async def __aenter__(self) -> MemoryFollower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.log.stream.check()

    async def close(self) -> None:
        self.log.metrics.consumer_lag.pop(self.room, None)

    def _after(self) -> LogEntry | None:
        for entry in self.log.stream.rooms.get(self.room, []):
            if entry.seq > self.seq:
                return entry
        return None

    async def next(self, timeout: float | None = None) -> LogEntry:
        stream = self.log.stream
        try:
            async with asyncio.timeout(timeout), stream.changed:
                await stream.changed.wait_for(lambda: self._after() is not None)
        except TimeoutError:
            raise TimeoutError(f"room {self.room}: nothing after {self.seq}") from None
        entry = self._after()
        assert entry is not None
        self.seq = entry.seq
        pending = sum(1 for e in stream.rooms.get(self.room, []) if e.seq > self.seq)
        self.log.metrics.consumer_lag[self.room] = pending
        return entry

    def __aiter__(self) -> AsyncIterator[LogEntry]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[LogEntry]:
        while True:
            yield await self.next()
