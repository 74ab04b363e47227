"""A room's log in JetStream: conditional appends, snapshot-plus-tail reads, live follow, roll-ups.

Each room is one subject of the room stream (`<prefix>.room.<token>`, crdtchat/cluster/names.py).
The subject holds, in stream order, at most one snapshot (a merged Yjs update written as a
roll-up, header `Crdtchat-Kind: snapshot`) and the updates accepted after it. Reading a room is
reading its subject from the start, which is the latest snapshot plus its tail.

- **append** publishes an accepted update on the condition that the subject's last sequence is
  the one the node judged against (`Nats-Expected-Last-Subject-Sequence`; 0 for an empty
  room). Another node's write in between makes JetStream refuse it: `SequenceConflict`, and the
  node catches up and judges again, so a check and a concurrent write cannot race. Every append
  carries a `Nats-Msg-Id`: a retry after a lost acknowledgement (a timeout, a NATS node dying)
  is recognised as the same message and acknowledged with its first sequence, never stored
  twice. Failures that may be transient (no answer, no stream leader during an election) are
  retried with the same id until `deadline`; the acknowledgement is the durable point
  (`sync_interval: always` on the servers makes it a disk write on a quorum).
- **follow** delivers `(seq, bytes)` in stream order from an ordered push consumer (one
  in-memory consumer per follower, re-created from the last delivered sequence whenever it
  misses a message or its server goes away). A node broadcasts only what its follower
  delivered, so every node sends the same order and nothing reaches a peer before it is stored.
- **compact** writes a snapshot as a roll-up (`Nats-Rollup: sub`, which drops the subject's
  earlier messages atomically) on the condition that the subject's last sequence is the one the
  snapshot covers: an update that lands meanwhile makes the roll-up fail, never vanish, and
  `compact_log` tries again from a fresh read.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, Header

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.entries import Appended, LogEntry, RoomState, compact_by_reading
from crdtchat.cluster.errors import ClusterError, SequenceConflict

KIND_HEADER = "Crdtchat-Kind"
SNAPSHOT = "snapshot"
# On a snapshot: the last sequence it covers. A copy that has applied exactly that much already
# holds everything in it (the roll-up was conditional on it) and need not apply it again.
COVERS_HEADER = "Crdtchat-Covers"
# "wrong last sequence: N" (10071), and the same without N (10164), which a clustered stream's
# leader answers when the conflict is with a message still being replicated.
_WRONG_LAST_SEQUENCE = {10071, 10164}
_NO_MESSAGE = 10037
_LAST_SEQUENCE = re.compile(r"wrong last sequence: (\d+)")
# How often a follower's consumer proves it is alive; two missed beats re-create it.
FOLLOW_HEARTBEAT = 1.0
RETRY_PAUSE = 0.1
# How long a read waits out an election or a restarting server before giving up.
READ_DEADLINE = 15.0
_V1_ACK_TOKENS = 9  # a JetStream reply subject without a domain
T = TypeVar("T")


class RoomLog:
    """The room stream of one node's connection."""

    def __init__(self, connection: ClusterConnection, *, publish_timeout: float = 5.0) -> None:
        self.connection = connection
        self.names = connection.names
        self.metrics = connection.metrics
        self.publish_timeout = publish_timeout

    async def last_seq(self, room: str) -> int:
        """The room subject's last sequence: what an append must name to be accepted."""
        subject = self.names.room_subject(room)
        try:
            message = await retry_transient(
                lambda: self.connection.js.get_last_msg(self.names.stream, subject),
                f"room {room}: cannot read its last sequence",
            )
        except nats.js.errors.NotFoundError:
            return 0
        return message.seq or 0

    async def last_entry(self, room: str) -> LogEntry | None:
        """The room subject's last message (None for an empty room)."""
        subject = self.names.room_subject(room)
        try:
            message = await retry_transient(
                lambda: self.connection.js.get_last_msg(self.names.stream, subject),
                f"room {room}: cannot read its last message",
            )
        except nats.js.errors.NotFoundError:
            return None
        headers = message.headers or {}
        snapshot = headers.get(KIND_HEADER) == SNAPSHOT
        return LogEntry(
            seq=message.seq or 0,
            data=message.data or b"",
            snapshot=snapshot,
            covers=int(headers.get(COVERS_HEADER, "0") or 0) if snapshot else 0,
            msg_id=headers.get(Header.MSG_ID.value, ""),
        )

    async def append(
        self, room: str, update: bytes, *, expected_seq: int, msg_id: str, deadline: float = 10.0
    ) -> Appended:
        """Store `update` if the room's last sequence is `expected_seq`; SequenceConflict if not."""
        headers = {
            Header.MSG_ID.value: msg_id,
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(expected_seq),
        }
        try:
            return await self._publish(room, update, headers, expected_seq, deadline)
        except SequenceConflict:
            # A retry whose earlier attempt landed after all (its acknowledgement lost when
            # NATS went away) meets its own write: JetStream checks the expected sequence
            # before the Msg-Id, so this is a conflict with ourselves, and the write is stored.
            last = await self.last_entry(room)
            if last is not None and last.msg_id == msg_id:
                return Appended(seq=last.seq, duplicate=True)
            raise

    async def compact(
        self, room: str, snapshot: bytes, *, upto_seq: int, deadline: float = 10.0
    ) -> int:
        """Replace the room's messages up to `upto_seq` by `snapshot`, if nothing came after.

        SequenceConflict when an update arrived after `upto_seq`: it stays, and the caller
        builds a snapshot that includes it.
        """
        headers = {
            Header.ROLLUP.value: "sub",
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(upto_seq),
            Header.MSG_ID.value: f"{self.names.room_subject(room)}:snapshot:{upto_seq}",
            KIND_HEADER: SNAPSHOT,
            COVERS_HEADER: str(upto_seq),
        }
        appended = await self._publish(room, snapshot, headers, upto_seq, deadline)
        self.metrics.compactions += 1
        return appended.seq

    async def compact_log(self, room: str, *, attempts: int = 5) -> int:
        """Read the room, merge it, roll it up; again from a fresh read on a conflict."""
        return await compact_by_reading(self, room, attempts)

    async def _publish(
        self, room: str, data: bytes, headers: dict[str, str], expected: int, deadline: float
    ) -> Appended:
        if len(data) > self.connection.max_payload:
            raise ClusterError(
                f"room {room}: {len(data)} bytes is more than NATS's max_payload "
                f"({self.connection.max_payload})"
            )
        subject = self.names.room_subject(room)
        started = time.monotonic()
        give_up = started + deadline
        while True:
            try:
                # No `stream=` (Nats-Expected-Stream): the room subjects are the room stream's
                # alone (JetStream refuses overlapping streams), and the header would be stored
                # with every update and parsed again by every follower on every node.
                ack = await self.connection.js.publish(
                    subject,
                    data,
                    timeout=min(self.publish_timeout, max(give_up - time.monotonic(), 0.1)),
                    headers=dict(headers),
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code in _WRONG_LAST_SEQUENCE:
                    self.metrics.publish_conflicts += 1
                    found = _LAST_SEQUENCE.search(exc.description or "")
                    raise SequenceConflict(
                        room, expected, int(found.group(1)) if found else None
                    ) from exc
                if not _transient(exc) or time.monotonic() > give_up:
                    self.metrics.publish_failures += 1
                    raise ClusterError(
                        f"room {room}: JetStream refused: {exc.description}"
                    ) from exc
            except nats.errors.Error as exc:
                if time.monotonic() > give_up or isinstance(exc, nats.errors.ConnectionClosedError):
                    self.metrics.publish_failures += 1
                    raise ClusterError(f"room {room}: no acknowledgement from JetStream") from exc
            else:
                self.metrics.publishes += 1
                self.metrics.publish_seconds.observe(time.monotonic() - started)
                if ack.duplicate:
                    self.metrics.publish_duplicates += 1
                return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))
            await asyncio.sleep(RETRY_PAUSE)

    async def load(self, room: str) -> RoomState:
        """The room's latest snapshot and the updates after it, as stored now."""
        last = await self.last_seq(room)
        state = RoomState(room)
        if last == 0:
            return state
        async with self.follow(room) as follower:
            async for entry in follower:
                state.entries.append(entry)
                state.seq = entry.seq
                if entry.seq >= last:
                    break
        return state

    def follow(self, room: str, after_seq: int = 0) -> Follower:
        """The room's messages after `after_seq`, then live, in stream order."""
        return Follower(self, room, after_seq)


class Follower:
    """An ordered consumer of one room's subject; `async with` it, then iterate.

    nats-py hands each message to `_deliver` (a callback subscription), which queues it here:
    its `next_msg` would start a task, a timer and a uuid per message, a good part of a node's
    CPU per update (docs/cluster.md, fan-out). Flow control, heartbeats and re-creating the
    consumer after a gap stay nats-py's ordered consumer's."""

    def __init__(self, log: RoomLog, room: str, after_seq: int) -> None:
        self.log = log
        self.room = room
        self.seq = after_seq  # the last sequence delivered
        self._subscription: nats.js.JetStreamContext.PushSubscription | None = None
        # What nats-py delivered, in order; None once the connection is closed for good.
        self._ready: asyncio.Queue[LogEntry | None] = asyncio.Queue()

    async def __aenter__(self) -> Follower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        names = self.log.names
        if self.seq:
            policy = DeliverPolicy.BY_START_SEQUENCE
            config = ConsumerConfig(opt_start_seq=self.seq + 1)
        else:
            policy, config = DeliverPolicy.ALL, ConsumerConfig()
        connection = self.log.connection
        js = connection.js
        connection.on_close.add(self._connection_closed)
        self._subscription = await retry_transient(
            lambda: js.subscribe(
                names.room_subject(self.room),
                stream=names.stream,
                cb=self._deliver,
                ordered_consumer=True,
                idle_heartbeat=FOLLOW_HEARTBEAT,
                deliver_policy=policy,
                config=config,
            ),
            f"room {self.room}: cannot follow",
        )

    async def close(self) -> None:
        self.log.metrics.consumer_lag.pop(self.room, None)
        self.log.connection.on_close.discard(self._connection_closed)
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def _deliver(self, msg: Msg) -> None:
        entry = self._entry(msg)
        if entry is not None:
            self._ready.put_nowait(entry)

    def _connection_closed(self) -> None:
        self._ready.put_nowait(None)

    async def next(self, timeout: float | None = None) -> LogEntry:
        """The next message; TimeoutError when none comes within `timeout` seconds,
        ClusterError once the connection is closed for good."""
        assert self._subscription is not None, "start() first"
        if self._ready.empty() and self.log.connection.nc.is_closed:
            self._ready.put_nowait(None)  # closed before this follower heard of it
        if timeout is None:
            entry = await self._ready.get()
        else:
            try:
                async with asyncio.timeout(timeout):
                    entry = await self._ready.get()
            except TimeoutError as exc:
                raise TimeoutError(f"room {self.room}: nothing after {self.seq}") from exc
        if entry is None:
            self._ready.put_nowait(None)  # and so for every later call
            raise ClusterError(f"room {self.room}: the NATS connection is closed")
        return entry

    def _entry(self, msg: Msg) -> LogEntry | None:
        seq, pending = _position(msg)
        # not yet in the stream's hands to this node, plus queued here and not yet taken
        self.log.metrics.consumer_lag[self.room] = pending + self._ready.qsize()
        if seq <= self.seq:  # delivered again after the consumer was re-created
            return None
        self.seq = seq
        headers = msg.headers or {}
        msg_id = headers.get(Header.MSG_ID.value, "")
        if headers.get(KIND_HEADER) != SNAPSHOT:
            return LogEntry(seq=seq, data=msg.data, msg_id=msg_id)
        covers = int(headers.get(COVERS_HEADER, "0") or 0)
        return LogEntry(seq=seq, data=msg.data, snapshot=True, covers=covers, msg_id=msg_id)

    def __aiter__(self) -> AsyncIterator[LogEntry]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[LogEntry]:
        while True:
            yield await self.next()


def _position(msg: Msg) -> tuple[int, int]:
    """A delivered message's stream sequence and the consumer's pending count, read from its
    reply subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`)
    without nats-py's `metadata`, which also builds a datetime per message; other forms
    (a domain in the subject) go through `metadata`."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == _V1_ACK_TOKENS and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[8])
    metadata = msg.metadata
    return metadata.sequence.stream, metadata.num_pending


async def retry_transient(
    call: Callable[[], Awaitable[T]], what: str, deadline: float = READ_DEADLINE
) -> T:
    """`call()`, again while NATS answers nothing or "unavailable" (an election, a server
    restarting), until `deadline` seconds; then ClusterError. Reads only: they repeat safely."""
    give_up = time.monotonic() + deadline
    while True:
        try:
            return await call()
        except nats.js.errors.NotFoundError:
            raise
        except nats.js.errors.APIError as exc:
            if not _transient(exc) or time.monotonic() > give_up:
                raise ClusterError(f"{what}: {exc.description}") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise ClusterError(f"{what}: the NATS connection is closed") from exc
        except nats.errors.Error as exc:
            if time.monotonic() > give_up:
                raise ClusterError(f"{what}: {exc}") from exc
        await asyncio.sleep(RETRY_PAUSE)


def _transient(exc: nats.js.errors.APIError) -> bool:
    """JetStream errors that an election or a restart clears: worth the same publish again."""
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.code in (503, 500)
