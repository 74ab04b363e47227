"""Losing a NATS node, and a cluster smaller than the default replicas, on real servers."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from crdtchat.cluster.connection import MAX_CONSUMERS, connect
from crdtchat.cluster.errors import ClusterError
from crdtchat.cluster.names import Names
from crdtchat.cluster.roomlog import RoomLog
from tests.cluster.test_roomlog import Writer, text_of
from tests.support.nats import NatsCluster, nats_cluster

pytestmark = pytest.mark.anyio

ROOM = "faults"


async def test_replicas_default_to_the_jetstream_servers_there_are(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One server: the default 3 replicas are refused, the stream gets 1, and the log says so."""
    caplog.set_level(logging.INFO, logger="crdtchat.cluster")
    with nats_cluster(tmp_path / "single", size=1) as single:
        conn = await connect(single.urls, names=Names("single"))
        try:
            assert conn.replicas == 1
            info = await conn.js.stream_info(conn.names.stream)
            assert info.config.num_replicas == 1
            assert info.config.allow_rollup_hdrs
            assert info.config.duplicate_window == 120
            assert info.config.max_consumers == MAX_CONSUMERS  # not the server's default 1,000
        finally:
            await conn.close()
        # A node joining later keeps what the first one created.
        again = await connect(single.urls, names=Names("single"), replicas=3)
        assert again.replicas == 1
        await again.close()
    messages = [record.getMessage() for record in caplog.records]
    assert "stream SINGLE_ROOMS: 3 replicas refused" in "\n".join(messages)
    assert "stream SINGLE_ROOMS created with 1 replicas" in messages
    assert "stream SINGLE_ROOMS exists with 1 replicas" in messages


async def test_a_retry_after_a_restart_meets_its_own_write_and_is_stored_once(
    tmp_path: Path,
) -> None:
    """A write whose acknowledgement was lost when NATS died is retried, same Msg-Id, same
    condition, after the server came back: the retry is acknowledged with the first sequence,
    not refused as a conflict (JetStream then checks the condition before the Msg-Id)."""
    with nats_cluster(tmp_path / "single", size=1) as single:
        conn = await connect(single.urls, names=Names("retry"))
        try:
            log = RoomLog(conn)
            update = Writer(3).type("once")
            first = await log.append("r", update, expected_seq=0, msg_id="node:r:0.1")
            single.kill(0)
            await anyio.to_thread.run_sync(single.restart, 0)
            again = await log.append("r", update, expected_seq=0, msg_id="node:r:0.1")
            assert again.seq == first.seq and again.duplicate
            state = await log.load("r")
            assert [entry.seq for entry in state.entries] == [first.seq]
            assert text_of(state.merged()) == "once"
        finally:
            await conn.close()


async def test_a_connection_closes_while_nats_is_away(tmp_path: Path) -> None:
    """A node shutting down while its NATS server is gone closes at once: nats-py refuses to
    drain while reconnecting, and that refusal used to escape `close()`."""
    with nats_cluster(tmp_path / "away", size=1) as single:
        conn = await connect(single.urls, names=Names("away"))
        single.kill(0)
        with anyio.fail_after(20):
            while not conn.nc.is_reconnecting:  # nats-py's own state, set by its read loop
                await anyio.sleep(0.01)
        await conn.close()
        assert conn.nc.is_closed


async def test_sigkill_of_the_stream_leader_loses_no_acknowledged_write(
    cluster: NatsCluster, names: Names
) -> None:
    """Writes go on while the NATS node leading the stream is SIGKILLed and comes back; every
    acknowledged update is in the room, read through each server, and a follower that was
    reading through the dead node delivers all of them once, in order."""
    writer_conn = await connect(cluster.urls, names=names)
    reader_conn = await connect(cluster.urls, names=names)
    log = RoomLog(writer_conn)
    writer = Writer(42)
    acknowledged: list[str] = []
    seq = 0

    async def write(count: int) -> None:
        nonlocal seq
        for _ in range(count):
            chars = f"[{len(acknowledged)}]"
            update = writer.type(chars)
            appended = await log.append(
                ROOM, update, expected_seq=seq, msg_id=f"k{len(acknowledged)}", deadline=30
            )
            seq = appended.seq
            acknowledged.append(chars)

    leader_index = None
    try:
        await write(20)
        follower = RoomLog(reader_conn).follow(ROOM)
        await follower.start()
        info = await writer_conn.js.stream_info(names.stream)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        leader_index = cluster.index_of(info.cluster.leader)
        cluster.kill(leader_index)
        await write(30)  # through the election: retried with the same Nats-Msg-Id
        cluster.restart(leader_index)
        leader_index = None
        await write(10)

        seen: list[int] = []
        with anyio.fail_after(60):
            while not seen or seen[-1] < seq:
                seen.append((await follower.next()).seq)
        await follower.close()
        assert seen == sorted(set(seen)) and len(seen) == 60

        expected = "".join(acknowledged)
        for node in cluster.nodes:  # every server, the restarted one too, has every write
            conn = await connect([node.url], names=names)
            try:
                state = await RoomLog(conn).load(ROOM)
            finally:
                await conn.close()
            assert text_of(state.merged()) == expected
            assert len(state.entries) == 60
    finally:
        if leader_index is not None:
            cluster.restart(leader_index)
        await writer_conn.close()
        await reader_conn.close()


async def test_nats_down_refuses_to_acknowledge_and_pending_writes_flush_when_it_returns(
    tmp_path: Path,
) -> None:
    """NATS gone: no acknowledgement (ClusterError, health says disconnected); an append that
    is still retrying when NATS comes back is stored once, after what was stored before."""
    with nats_cluster(tmp_path / "down", size=1) as single:
        conn = await connect(single.urls, names=Names("down"))
        log = RoomLog(conn)
        writer = Writer(7)
        try:
            first = await log.append(ROOM, writer.type("a"), expected_seq=0, msg_id="d1")
            single.kill(0)
            with pytest.raises(ClusterError):
                await log.append(
                    ROOM, writer.type("b"), expected_seq=first.seq, msg_id="d2", deadline=1
                )
            assert conn.metrics.health()["nats"] == "disconnected"
            assert conn.metrics.publish_failures == 1
            assert "crdtchat_nats_connected 0" in conn.metrics.render()

            async with anyio.create_task_group() as group:
                results: list[int] = []

                async def pending() -> None:
                    appended = await log.append(
                        ROOM, writer.type("c"), expected_seq=first.seq, msg_id="d3", deadline=60
                    )
                    results.append(appended.seq)

                group.start_soon(pending)
                await anyio.to_thread.run_sync(single.restart, 0)
            assert results and results[0] > first.seq
            assert conn.metrics.health()["nats"] == "connected"
            assert conn.metrics.reconnects == 1
            # "b" was never acknowledged and the client still holds it: it comes again later,
            # as a relay client resends what was not acknowledged.
            await log.append(ROOM, writer.doc.get_update(), expected_seq=results[0], msg_id="d4")
            state = await log.load(ROOM)
            assert text_of(state.merged()) == "abc"
        finally:
            await conn.close()
