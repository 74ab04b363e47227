"""The relay store's group commit (`crdtchat.relay.store`, design §3): writes of many rooms
queued together are committed together, and each caller hears back only from the commit that
holds its row. A group whose commit fails leaves none of its rows and acknowledges none."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from crdtchat.relay.store import Store, StoreError
from crdtchat.updates import EMPTY_UPDATE

ROOMS = [f"room-{i}" for i in range(8)]


def _rows(directory: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(directory / "relay.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {(str(room), int(seq)) for room, seq in db.execute("SELECT room, seq FROM updates")}


@pytest.mark.anyio
async def test_writes_of_many_rooms_are_stored_in_order_and_acknowledged_when_committed(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path) as store:
        # Queued without waiting: the store thread takes what is queued in one transaction.
        futures = {
            (room, seq): store.append(room, seq, EMPTY_UPDATE)
            for seq in range(1, 31)
            for room in ROOMS
        }
        compaction = store.compact(ROOMS[0], 10, EMPTY_UPDATE)  # in the middle of the appends
        futures |= {
            (room, seq): store.append(room, seq, EMPTY_UPDATE)
            for seq in range(31, 41)
            for room in ROOMS
        }
        compacted = {(ROOMS[0], seq) for seq in range(1, 11)}  # replaced by the snapshot
        for key, future in futures.items():
            await future
            if key not in compacted:  # acknowledged: the row is there for any other reader
                assert key in await asyncio.to_thread(_rows, tmp_path)
        await compaction
        loaded = await store.load(ROOMS[1])
        assert loaded.next_seq == 41
    stored = _rows(tmp_path)
    assert stored == set(futures) - compacted


@pytest.mark.anyio
async def test_a_failed_group_commit_acknowledges_none_of_its_writes(tmp_path: Path) -> None:
    async with Store(tmp_path, probe_interval=0.05) as store:
        await store.append("a", 1, b"a1")
        # Hold the database's write lock from another connection, so that the writes below
        # pile up behind the store thread's first attempt and are committed together.
        blocker = sqlite3.connect(tmp_path / "relay.sqlite3", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        others = [store.append(room, 1, room.encode()) for room in ("b", "c", "d")]
        clash = store.append("a", 1, b"a1 again")  # (room, seq) is taken: the commit fails
        after = [store.append(room, 1, room.encode()) for room in ("e", "f")]
        blocker.execute("COMMIT")
        blocker.close()
        outcomes = await asyncio.gather(*others, clash, *after, return_exceptions=True)
    assert isinstance(outcomes[3], StoreError)
    assert any(isinstance(outcome, StoreError) for outcome in outcomes[4:])  # its group
    stored = _rows(tmp_path)
    for room, outcome in zip("bcdef", outcomes[:3] + outcomes[4:], strict=True):
        # Acknowledged exactly when stored: a failed group leaves none of its rows behind.
        assert (outcome is None) == ((room, 1) in stored), (room, outcome)
    assert ("a", 1) in stored  # the first one, untouched


@pytest.mark.anyio
async def test_under_load_a_commit_waits_for_the_writes_about_to_come(tmp_path: Path) -> None:
    """After a commit that held several writes, the store waits `commit_delay` before the next
    one: a write that comes meanwhile shares its commit (one fsync for both)."""
    commits: list[int] = []  # updates per commit, as /metrics counts them
    async with Store(
        tmp_path, commit_delay=0.5, on_commit=lambda s: commits.append(len(s))
    ) as store:
        await store.append("a", 1, b"a1")
        # Writes piled up behind a held lock are committed together: the store is under load.
        blocker = sqlite3.connect(tmp_path / "relay.sqlite3", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        piled = [store.append(room, 1, room.encode()) for room in ("b", "c", "d")]
        blocker.execute("COMMIT")
        blocker.close()
        await asyncio.gather(*piled)
        assert max(commits[1:]) >= 2
        before = len(commits)
        first = store.append("e", 1, b"e1")
        await asyncio.sleep(0.05)  # the next write comes 50 ms later, within the delay
        second = store.append("f", 1, b"f1")
        await asyncio.gather(first, second)
        assert commits[before:] == [2], "the second write was not in the first one's commit"
    assert {("e", 1), ("f", 1)} <= _rows(tmp_path)
