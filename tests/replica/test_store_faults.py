"""A replica whose local SQLite file turns read-only under it (immutable: SQLite's real writes
fail, SQLITE_IOERR_WRITE, as on a disk that returns I/O errors or a filesystem remounted
read-only). The replica keeps working in memory, says why in `status.store_error`, leaves the
file as it was, and writes everything once the fault clears (design §3, "Broken stores").
The full-file case is in tests/relay/test_store_failures.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pycrdt import Doc

from crdtchat.document import Conversation
from crdtchat.local_store import AppendRemote, LocalStore
from crdtchat.replica import Backoff, Replica
from crdtchat.updates import check_update
from tests.support.faults import Immutable, immutable_stops_open_writers
from tests.support.relay import running_relay, token
from tests.support.replica import wait_doc

ROOM = "faults-1"
FAST = Backoff(initial=0.05, maximum=0.5)


def _saved_ids(path: Path) -> list[str]:
    """The messages of the file as it is, read without writing to it (every row checked and
    applied: a damaged row fails here)."""
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT data FROM updates ORDER BY id").fetchall()
    doc = Doc()
    for (data,) in rows:
        check_update(bytes(data))
        doc.apply_update(bytes(data))
    return [m.id for m in Conversation(doc, author="check").all_messages()]


@pytest.mark.anyio
async def test_a_replica_whose_file_turns_read_only_keeps_working_and_saves_everything_later(
    tmp_path: Path,
) -> None:
    why_not = immutable_stops_open_writers(tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    path = tmp_path / "ann.db"
    with running_relay(tmp_path / "relay-data") as relay:
        url = f"ws://{relay.host}:{relay.port}"
        conversation = Conversation(author="ann", role="writer")
        ann = Replica(
            url,
            ROOM,
            token(ROOM, "writer", "ann"),
            doc=conversation.doc,
            store_path=path,
            backoff=FAST,
            store_retry=Backoff(initial=0.05, maximum=0.2),
        )
        bob = Replica(url, ROOM, token(ROOM, "writer", "bob"), backoff=FAST)
        fault = Immutable(path, path.with_name(f"{path.name}-wal"))
        with fault:
            async with ann, bob:
                first = conversation.append("user", "saved normally")
                await ann.wait_until(lambda s: s.durable and s.unsaved == 0, timeout=30)

                fault.inject()
                mine = conversation.append("user", "written while the file refuses")
                status = await ann.wait_until(lambda s: s.store_error is not None, timeout=30)
                assert "disk I/O error" in (status.store_error or "")
                # Working in memory: the relay stores the edit, another device's edit arrives.
                theirs = Conversation(bob.doc, author="bob").append("user", "from another device")
                await wait_doc(conversation.doc, lambda: len(conversation) == 3)
                status = await ann.wait_until(lambda s: s.durable, timeout=30)
                assert status.unsaved >= 2 and status.store_error is not None
                assert _saved_ids(path) == [first.id]  # the file as it was, intact

                fault.clear()  # the retry finds out by itself
                status = await ann.wait_until(
                    lambda s: s.store_error is None and s.unsaved == 0, timeout=30
                )
        assert sorted(_saved_ids(path)) == sorted([first.id, mine.id, theirs.id])
        with LocalStore(path) as reopened:
            assert reopened.load().pending == ()


@pytest.mark.anyio
async def test_a_replica_opened_on_a_read_only_file_saves_once_it_is_writable(
    tmp_path: Path,
) -> None:
    """SQLite opens a file it cannot write read-only, without a word, and such a connection
    never writes again: the store must open the file again to find out it can."""
    why_not = immutable_stops_open_writers(tmp_path)
    if why_not is not None:
        pytest.skip(why_not)
    path = tmp_path / "ann.db"
    conversation = Conversation(author="ann", role="writer")
    first = conversation.append("user", "saved before")
    with LocalStore(path) as store:
        store.write([AppendRemote(conversation.doc.get_update())])
    fault = Immutable(path)
    with running_relay(tmp_path / "relay-data") as relay, fault:
        fault.inject()
        ann = Replica(
            f"ws://{relay.host}:{relay.port}",
            ROOM,
            token(ROOM, "writer", "ann"),
            store_path=path,
            backoff=FAST,
            store_retry=Backoff(initial=0.05, maximum=0.2),
        )
        async with ann:
            mine = Conversation(ann.doc, author="ann").append("user", "written after")
            status = await ann.wait_until(lambda s: s.store_error is not None, timeout=30)
            assert "readonly" in (status.store_error or "")
            await ann.wait_until(lambda s: s.durable, timeout=30)  # the relay has it

            fault.clear()
            await ann.wait_until(lambda s: s.store_error is None and s.unsaved == 0, timeout=30)
    assert sorted(_saved_ids(path)) == sorted([first.id, mine.id])
