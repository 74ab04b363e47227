"""Full disks and broken stores: the relay's SQLite on a small tmpfs that fills up, on a file
that turns read-only under it (SQLite's real writes fail: SQLITE_IOERR_WRITE), and behind a
read-only connection (SQLITE_READONLY); a replica's file that refuses writes. Nothing unstored
is acknowledged or broadcast, nothing stored is damaged, edits stay pending, /healthz says so,
and both recover by themselves when the fault goes away (design §3, "Broken stores")."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pycrdt import Array, Doc

from crdtchat.document import Conversation
from crdtchat.local_store import LocalStore
from crdtchat.relay.store import Store, StoreError
from crdtchat.replica import Backoff, Replica
from crdtchat.updates import check_update
from tests.support.faults import Immutable, immutable_stops_open_writers
from tests.support.relay import SECRET, RelayProcess, raw_client, running_relay, token
from tests.support.replica import wait_doc

ROOM = "disk-1"
FAST = Backoff(initial=0.05, maximum=0.5)


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class TmpfsRelay(RelayProcess):
    """The relay with its data directory on a tmpfs of `size_kb`, mounted in a mount namespace
    of its own (`unshare -m`), so that the test can fill and free the disk under it."""

    def __init__(self, data: Path, size_kb: int) -> None:
        data.mkdir(parents=True, exist_ok=True)
        super().__init__(data)
        self.size_kb = size_kb

    def command(self) -> list[str]:
        mount = f'mount -t tmpfs -o size={self.size_kb}k crdtchat-test "$0" && exec "$@"'
        unshare = ["unshare", "-m", "--propagation", "private"]
        return [*unshare, "sh", "-c", mount, str(self.data), *super().command()]

    def inside(self, *command: str) -> subprocess.CompletedProcess[str]:
        assert self.proc is not None
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", *command],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def fill(self) -> None:
        """Write zeros until the filesystem is full (cat fails with ENOSPC: expected)."""
        self.inside("sh", "-c", f'cat /dev/zero > "{self.data}/filler"')
        assert self.inside("df", "--output=avail", str(self.data)).stdout.split()[-1] == "0"

    def free(self) -> None:
        assert self.inside("rm", "-f", f"{self.data}/filler").returncode == 0

    def integrity(self) -> str:
        check = (
            "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
            "print(db.execute('PRAGMA integrity_check').fetchone()[0])"
        )
        done = self.inside(sys.executable, "-c", check, f"{self.data}/relay.sqlite3")
        return done.stdout.strip() or done.stderr


def _health(relay: RelayProcess) -> tuple[int, str]:
    response = httpx.get(f"{relay.http_url}/healthz", timeout=10)
    return response.status_code, response.text


@pytest.fixture
def tmpfs_relay(tmp_path: Path) -> Iterator[TmpfsRelay]:
    if not _can_mount_tmpfs():
        pytest.skip("needs root and unshare/nsenter to mount a small tmpfs")
    relay = TmpfsRelay(tmp_path / "relay-data", size_kb=6 * 1024).start()
    try:
        yield relay
    finally:
        relay.stop()


@pytest.mark.anyio
async def test_relay_on_a_full_disk_acknowledges_nothing_and_recovers_without_restart(
    tmpfs_relay: TmpfsRelay,
) -> None:
    relay = tmpfs_relay
    url = f"ws://{relay.host}:{relay.port}"
    pid = relay.proc.pid if relay.proc else None
    writer = Replica(url, ROOM, token(ROOM, "writer", "ann"), backoff=FAST)
    reader = Replica(url, ROOM, token(ROOM, "reader", "eve"), backoff=FAST)
    async with writer, reader:
        conversation = Conversation(writer.doc, author="ann")
        conversation.append("user", "stored before the disk filled")
        await writer.wait_until(lambda s: s.durable, timeout=30)
        seen = Conversation(reader.doc, author="eve")
        await wait_doc(reader.doc, lambda: len(seen) == 1)
        assert await anyio.to_thread.run_sync(_health, relay) == (200, "ok\n")

        await anyio.to_thread.run_sync(relay.fill)
        big = " ".join(f"word{i}" for i in range(60_000))  # ~530 kB: needs fresh pages
        conversation.append("user", big)
        # The commit fails: the relay closes the room's connections (1011) without an Ack.
        await writer.wait_until(lambda s: not s.connected, timeout=60)
        assert writer.status.pending == 1
        status, body = await anyio.to_thread.run_sync(_health, relay)
        assert status == 503 and "store write failed" in body, body
        assert len(seen) == 1  # never broadcast
        assert await anyio.to_thread.run_sync(relay.integrity) == "ok"

        # Space returns; nobody restarts anything. The writer's reconnect carries its pending
        # edit, the room is loaded again from what is stored, and the write goes through.
        await anyio.to_thread.run_sync(relay.free)
        await writer.wait_until(lambda s: s.durable and s.connected, timeout=60)
        await wait_doc(reader.doc, lambda: len(seen) == 2, timeout=60)
        assert seen.current_thread()[-1].content == big
        assert await anyio.to_thread.run_sync(_health, relay) == (200, "ok\n")

    assert relay.proc is not None and relay.proc.pid == pid and relay.proc.poll() is None
    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as fresh:
        assert fresh.texts() == ["stored before the disk filled", big]
    assert await anyio.to_thread.run_sync(relay.integrity) == "ok"


@pytest.mark.anyio
async def test_the_relay_store_probe_clears_health_when_space_returns(
    tmpfs_relay: TmpfsRelay,
) -> None:
    """Nobody writes after the failure: the relay still notices by itself."""
    relay = tmpfs_relay
    url = f"ws://{relay.host}:{relay.port}"
    writer = Replica(url, ROOM, token(ROOM, "writer", "ann"), backoff=FAST)
    async with writer:
        await writer.wait_until(lambda s: s.synced, timeout=30)
        await anyio.to_thread.run_sync(relay.fill)
        Conversation(writer.doc, author="ann").append("user", "y" * 300_000)
        await writer.wait_until(lambda s: not s.connected, timeout=60)
    assert (await anyio.to_thread.run_sync(_health, relay))[0] == 503
    await anyio.to_thread.run_sync(relay.free)
    with anyio.fail_after(30):
        # The probe runs once a second; ask until it has (the relay has no event to wait on).
        while (await anyio.to_thread.run_sync(_health, relay))[0] != 200:
            await anyio.sleep(0.2)


@pytest.mark.anyio
async def test_a_replica_whose_file_is_full_keeps_its_edits_and_writes_them_later(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ann.db"
    with running_relay(tmp_path / "relay-data") as relay:
        conversation = Conversation(author="ann", role="writer")
        async with Replica(
            f"ws://{relay.host}:{relay.port}",
            ROOM,
            token(ROOM, "writer", "ann"),
            doc=conversation.doc,
            store_path=path,
            backoff=FAST,
            store_retry=Backoff(initial=0.05, maximum=0.2),
        ) as rep:
            first = conversation.append("user", "saved normally")
            await rep.wait_until(lambda s: s.durable and s.unsaved == 0, timeout=30)
            store = rep.local_store
            assert store is not None
            await store.set_size_limit(path.stat().st_size)  # SQLite: "database or disk is full"

            big = conversation.append("user", "z" * 200_000)
            status = await rep.wait_until(lambda s: s.store_error is not None, timeout=30)
            assert "full" in (status.store_error or "")
            # Not on disk, still in memory, and the relay stores it meanwhile.
            status = await rep.wait_until(lambda s: s.durable, timeout=30)
            assert status.unsaved >= 1 and status.store_error is not None
            assert conversation.message(big.id).content == big.content
            with LocalStore(path) as other:  # what is on disk is intact
                saved = Conversation.from_update(other.load().update, author="ann")
                assert [m.id for m in saved.all_messages()] == [first.id]
                assert other._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

            await store.set_size_limit(None)  # space returns
            rep.reconnect_now()  # skip the retry wait; it would come anyway
            status = await rep.wait_until(
                lambda s: s.store_error is None and s.unsaved == 0, timeout=30
            )
        with LocalStore(path) as reopened:
            state = reopened.load()
        saved = Conversation.from_update(state.update, author="ann")
        assert [m.id for m in saved.all_messages()] == [first.id, big.id]
        assert state.pending == ()


def _stored_texts(path: Path) -> list[str]:
    """Every stored row of the relay's file, each checked and applied (a damaged or partial
    row fails here), as the message texts of the room they make up."""
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        snapshots = db.execute("SELECT data FROM snapshots WHERE room = ?", (ROOM,)).fetchall()
        updates = db.execute(
            "SELECT data FROM updates WHERE room = ? ORDER BY seq", (ROOM,)
        ).fetchall()
    doc = Doc()
    for (data,) in [*snapshots, *updates]:
        check_update(bytes(data))
        doc.apply_update(bytes(data))
    return [m.content for m in Conversation(doc, author="check").current_thread()]


@pytest.fixture
def relay_and_fault(tmp_path: Path) -> Iterator[tuple[RelayProcess, Immutable]]:
    """A relay whose store file and write-ahead log the test can make immutable: every write
    SQLite makes to them then fails for real (EPERM, reported as SQLITE_IOERR_WRITE)."""
    data = tmp_path / "relay-data"
    data.mkdir()
    why_not = immutable_stops_open_writers(data)
    if why_not is not None:
        pytest.skip(why_not)
    relay = RelayProcess(data).start()
    db = data / "relay.sqlite3"
    try:
        with Immutable(db, db.with_name(f"{db.name}-wal")) as fault:
            yield relay, fault
    finally:
        relay.stop()


@pytest.mark.anyio
async def test_relay_whose_store_file_turns_read_only_acknowledges_nothing_and_recovers(
    relay_and_fault: tuple[RelayProcess, Immutable],
) -> None:
    relay, fault = relay_and_fault
    url = f"ws://{relay.host}:{relay.port}"
    pid = relay.proc.pid if relay.proc else None
    writer = Replica(url, ROOM, token(ROOM, "writer", "ann"), backoff=FAST)
    reader = Replica(url, ROOM, token(ROOM, "reader", "eve"), backoff=FAST)
    async with writer, reader:
        conversation = Conversation(writer.doc, author="ann")
        conversation.append("user", "stored before the fault")
        await writer.wait_until(lambda s: s.durable, timeout=30)
        seen = Conversation(reader.doc, author="eve")
        await wait_doc(reader.doc, lambda: len(seen) == 1)

        fault.inject()
        conversation.append("user", "written while the file refuses")
        # The commit fails: no Ack, the room's connections are closed (1011), the edit waits.
        await writer.wait_until(lambda s: not s.connected, timeout=60)
        assert writer.status.pending == 1
        status, body = await anyio.to_thread.run_sync(_health, relay)
        assert status == 503 and "disk I/O error" in body, body
        assert len(seen) == 1  # never broadcast
        # The writer keeps reconnecting; each attempt reloads the room from the file (reads
        # work), resends, and fails again. More edits pile up behind, unacknowledged.
        conversation.append("user", "and one more meanwhile")
        await writer.wait_until(lambda s: s.pending == 2 and not s.durable, timeout=30)
        path = relay.data / "relay.sqlite3"
        assert await anyio.to_thread.run_sync(_stored_texts, path) == ["stored before the fault"]

        fault.clear()  # nobody restarts anything
        await writer.wait_until(lambda s: s.durable and s.connected, timeout=60)
        await wait_doc(reader.doc, lambda: len(seen) == 3, timeout=60)
        assert await anyio.to_thread.run_sync(_health, relay) == (200, "ok\n")

    assert relay.proc is not None and relay.proc.pid == pid and relay.proc.poll() is None
    every = ["stored before the fault", "written while the file refuses", "and one more meanwhile"]
    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as fresh:
        assert fresh.texts() == every
    assert await anyio.to_thread.run_sync(_stored_texts, path) == every


@pytest.mark.anyio
async def test_relay_started_on_a_read_only_database_says_so_and_writes_once_it_can(
    tmp_path: Path,
) -> None:
    """SQLite opens a file it cannot write read-only, without a word: the relay must say so
    from the start, serve what is stored, and open it again once it is writable."""
    data = tmp_path / "relay-data"
    data.mkdir()
    why_not = immutable_stops_open_writers(data)
    if why_not is not None:
        pytest.skip(why_not)
    with running_relay(data) as relay:
        async with Replica(
            f"ws://{relay.host}:{relay.port}", ROOM, token(ROOM, "writer", "ann"), backoff=FAST
        ) as writer:
            Conversation(writer.doc, author="ann").append("user", "stored before")
            await writer.wait_until(lambda s: s.durable, timeout=30)
    path = data / "relay.sqlite3"
    with Immutable(path) as fault:
        fault.inject()
        with running_relay(data) as relay:
            pid = relay.proc.pid if relay.proc else None
            status, body = await anyio.to_thread.run_sync(_health, relay)
            assert status == 503 and "readonly" in body, body
            async with raw_client(
                relay.url(ROOM, token(ROOM, "reader", "eve"))
            ) as fresh:  # reads are served
                assert fresh.texts() == ["stored before"]
            url = f"ws://{relay.host}:{relay.port}"
            async with Replica(url, ROOM, token(ROOM, "writer", "ann"), backoff=FAST) as writer:
                await writer.wait_until(lambda s: s.synced, timeout=30)
                Conversation(writer.doc, author="ann").append("user", "written after")
                await writer.wait_until(lambda s: not s.connected, timeout=30)
                assert writer.status.pending == 1

                fault.clear()  # no restart: the relay opens the file again by itself
                await writer.wait_until(lambda s: s.durable and s.connected, timeout=60)
                assert await anyio.to_thread.run_sync(_health, relay) == (200, "ok\n")
            async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as fresh:
                assert fresh.texts() == ["stored before", "written after"]
            assert relay.proc is not None and relay.proc.pid == pid
    assert await anyio.to_thread.run_sync(_stored_texts, path) == ["stored before", "written after"]


def test_relay_does_not_start_on_a_data_directory_it_cannot_write(tmp_path: Path) -> None:
    """Without its write-ahead log files SQLite cannot open the database at all: the relay
    exits at once and says why, rather than serve nothing."""
    data = tmp_path / "relay-data"
    data.mkdir()
    why_not = immutable_stops_open_writers(data)
    if why_not is not None:
        pytest.skip(why_not)
    with running_relay(data):
        pass  # a database and nothing else (a clean close removes the WAL files)
    command = [sys.executable, "-m", "crdtchat.relay.main", "--data", str(data), "--port", "0"]
    with Immutable(data) as fault:
        fault.inject()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "CRDTCHAT_SECRET": SECRET},
        )
    assert done.returncode == 1
    assert f"cannot open {data / 'relay.sqlite3'}: unable to open" in done.stderr


class ReadOnlyStore(Store):
    """The relay's store, whose SQLite connection is made read-only while `read_only` is set
    (PRAGMA query_only: SQLite then fails writes with SQLITE_READONLY, as for a read-only
    file). Everything else is the real store."""

    read_only = False

    def _commit(self, db: sqlite3.Connection, writes: list[Any]) -> None:
        db.execute(f"PRAGMA query_only = {int(self.read_only)}")
        super()._commit(db, writes)

    def _probe(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA query_only = {int(self.read_only)}")
        super()._probe(db)


def _update(text: str, doc: Doc) -> bytes:
    before = doc.get_state()
    doc.get("canonical.messages", type=Array).append(text)
    return doc.get_update(before)


@pytest.mark.anyio
async def test_relay_store_refuses_writes_behind_a_failed_one_until_the_room_reloads(
    tmp_path: Path,
) -> None:
    doc_a, doc_b = Doc(), Doc()
    async with ReadOnlyStore(tmp_path, probe_interval=0.05) as store:
        await store.append("a", 1, _update("a1", doc_a))
        assert store.health() is None

        store.read_only = True
        failed = store.append("a", 2, _update("a2", doc_a))
        with pytest.raises(StoreError, match="readonly"):
            await failed
        assert "readonly" in (store.health() or "")
        # Writable again, but "a" 3 builds on the lost "a" 2: it must not be stored.
        store.read_only = False
        with pytest.raises(StoreError, match="earlier write"):
            await store.append("a", 3, _update("a3", doc_a))
        await store.append("b", 1, _update("b1", doc_b))  # other rooms are unaffected
        assert store.health() is None

        loaded = await store.load("a")  # what a reloaded room starts from: no gap
        assert loaded.next_seq == 2
        reopened = Doc()
        reopened.apply_update(loaded.whole)
        assert list(reopened.get("canonical.messages", type=Array)) == ["a1"]
        await store.append("a", 2, _update("again", reopened))  # after a reload: accepted

        # Health comes back by itself (the idle probe) when nobody writes.
        store.read_only = True
        with pytest.raises(StoreError):
            await store.append("b", 2, _update("b2", doc_b))
        assert store.health() is not None
        store.read_only = False
        with anyio.fail_after(10):
            while store.health() is not None:  # the probe runs every 0.05 s
                await anyio.sleep(0.02)

    with sqlite3.connect(tmp_path / "relay.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT room, seq FROM updates ORDER BY room, seq").fetchall()
    assert rows == [("a", 1), ("a", 2), ("b", 1)]
