"""The room log on a real three-node JetStream cluster (crdtchat/cluster/roomlog.py)."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from nats.aio.msg import Msg
from pycrdt import Doc, Text

from crdtchat.cluster.connection import ClusterConnection, connect
from crdtchat.cluster.errors import ClusterError, SequenceConflict
from crdtchat.cluster.names import Names
from crdtchat.cluster.roomlog import RoomLog, _position
from tests.support.nats import NatsCluster

pytestmark = pytest.mark.anyio

ROOM = "chat.with_dots-and_underscores"


class Writer:
    """A pycrdt document whose edits come out as real Yjs updates."""

    def __init__(self, client_id: int) -> None:
        self.doc: Doc = Doc(client_id=client_id)
        self.text = self.doc.get("t", type=Text)

    def type(self, chars: str) -> bytes:
        before = self.doc.get_state()
        self.text += chars
        return self.doc.get_update(before)


def text_of(update: bytes) -> str:
    doc: Doc = Doc()
    doc.apply_update(update)
    return str(doc.get("t", type=Text))


async def test_conditional_append_takes_the_right_sequence_and_refuses_a_stale_one(
    connection: ClusterConnection,
) -> None:
    log = RoomLog(connection)
    writer = Writer(1)
    first = await log.append(ROOM, writer.type("a"), expected_seq=0, msg_id="m1")
    assert not first.duplicate
    assert await log.last_seq(ROOM) == first.seq
    second = await log.append(ROOM, writer.type("b"), expected_seq=first.seq, msg_id="m2")
    assert second.seq > first.seq

    # A node that judged against `first` did not see `second`: refused, told where the room is.
    with pytest.raises(SequenceConflict) as refused:
        await log.append(ROOM, writer.type("c"), expected_seq=first.seq, msg_id="m3")
    assert refused.value.last_seq == second.seq
    # An empty-room condition is a condition too.
    with pytest.raises(SequenceConflict):
        await log.append(ROOM, writer.type("d"), expected_seq=0, msg_id="m4")
    assert connection.metrics.publish_conflicts == 2
    state = await log.load(ROOM)
    assert state.seq == second.seq
    assert text_of(state.merged()) == "ab"


async def test_a_retried_publish_is_stored_once(connection: ClusterConnection) -> None:
    """A retry (same Nats-Msg-Id) after a lost ack is acknowledged with the first sequence, even
    though its condition no longer holds: de-duplication comes before the sequence check."""
    log = RoomLog(connection)
    writer = Writer(2)
    update = writer.type("once")
    first = await log.append(ROOM, update, expected_seq=0, msg_id="retry-me")
    again = await log.append(ROOM, update, expected_seq=0, msg_id="retry-me")
    assert again.duplicate
    assert again.seq == first.seq
    state = await log.load(ROOM)
    assert [entry.seq for entry in state.entries] == [first.seq]
    assert connection.metrics.publish_duplicates == 1


async def test_a_late_reader_gets_snapshot_and_tail_equal_to_the_whole_document(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    log = RoomLog(connection)
    writers = [Writer(10), Writer(11)]
    full: Doc = Doc()
    seq = 0
    for index in range(40):
        update = writers[index % 2].type(f"{index},")
        full.apply_update(update)
        for other in writers:
            other.doc.apply_update(update)
        seq = (await log.append(ROOM, update, expected_seq=seq, msg_id=f"u{index}")).seq
        if index == 24:
            seq = await log.compact_log(ROOM)

    late = await RoomLog(second).load(ROOM)  # another connection, another server first
    assert late.snapshot is not None
    assert len(late.updates) == 15
    assert late.seq == seq
    assert text_of(late.merged()) == str(full.get("t", type=Text))
    assert late.merged() != b""


async def test_follow_delivers_in_stream_order_from_a_sequence_then_live(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    log = RoomLog(connection)
    writer = Writer(3)
    seqs = []
    for index in range(3):
        expected = seqs[-1] if seqs else 0
        appended = await log.append(
            ROOM, writer.type(str(index)), expected_seq=expected, msg_id=f"f{index}"
        )
        seqs.append(appended.seq)
    async with RoomLog(second).follow(ROOM, after_seq=seqs[0]) as follower:
        assert [(await follower.next(5)).seq for _ in range(2)] == seqs[1:]
        live = await log.append(ROOM, writer.type("live"), expected_seq=seqs[-1], msg_id="f-live")
        entry = await follower.next(5)
        assert (entry.seq, entry.snapshot) == (live.seq, False)
        with pytest.raises(TimeoutError):
            await follower.next(0.2)


async def test_a_follower_waiting_for_the_next_message_ends_when_its_connection_closes(
    cluster: NatsCluster, names: Names, connection: ClusterConnection
) -> None:
    """nats-py hands the follower its messages through a callback subscription, which it just
    cancels on close: a reader waiting for the next message must hear of it, not hang."""
    own = await connect(cluster.urls, names=names)
    appended = await RoomLog(connection).append(
        ROOM, Writer(5).type("x"), expected_seq=0, msg_id="c1"
    )
    follower = RoomLog(own).follow(ROOM)
    await follower.start()
    assert (await follower.next(5)).seq == appended.seq
    waiting = asyncio.ensure_future(follower.next())
    await asyncio.sleep(0)  # one turn: the reader runs until it waits for a message
    assert not waiting.done()
    await own.close()
    with anyio.fail_after(5), pytest.raises(ClusterError, match="connection is closed"):
        await waiting
    await follower.close()


async def test_compaction_while_another_node_writes_loses_nothing(
    connection: ClusterConnection, second: ClusterConnection
) -> None:
    """Roll-ups race a writer on another connection; every acknowledged update survives."""
    compactor = RoomLog(connection)
    writer_log = RoomLog(second)
    writer = Writer(4)
    acknowledged: list[str] = []
    done = anyio.Event()

    async def write() -> None:
        seq = 0
        for index in range(60):
            chars = f"<{index}>"
            update = writer.type(chars)
            while True:  # a node catches up and publishes again after a conflict
                try:
                    seq = (
                        await writer_log.append(ROOM, update, expected_seq=seq, msg_id=f"w{index}")
                    ).seq
                    break
                except SequenceConflict as conflict:
                    seq = conflict.last_seq or await writer_log.last_seq(ROOM)
            acknowledged.append(chars)
        done.set()

    async def compact() -> None:
        while not done.is_set():
            await compactor.compact_log(ROOM, attempts=50)
            await anyio.sleep(0)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        group.start_soon(compact)
    await compactor.compact_log(ROOM, attempts=50)
    state = await RoomLog(second).load(ROOM)
    assert state.snapshot is not None and not state.updates
    assert text_of(state.merged()) == "".join(acknowledged)
    assert connection.metrics.compactions >= 2


def test_a_messages_position_is_read_from_its_reply_subject_as_nats_py_reads_it() -> None:
    """The follower reads the stream sequence and pending count itself (nats-py's `metadata`
    builds a datetime per message); with and without a JetStream domain in the subject it
    must agree with nats-py."""
    for reply in (
        "$JS.ACK.ROOMS.consumer1.1.4217.12.1796064260563496756.3",
        "$JS.ACK.hub.ACCHASH.ROOMS.consumer1.1.4217.12.1796064260563496756.3.token",
    ):
        msg = Msg(_client=None, subject="inbox", reply=reply)  # type: ignore[arg-type]
        metadata = msg.metadata
        assert _position(msg) == (metadata.sequence.stream, metadata.num_pending) == (4217, 3)
